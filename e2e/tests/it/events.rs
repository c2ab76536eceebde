//! `GET /events` (issue 13): the broker's feed of run and task changes as Server-Sent
//! Events, through the real frontend: every change of a run in order with rising ids,
//! filters, resuming after `Last-Event-ID` (and `reset` when that cannot be done), and a
//! stream that outlives a broker restart.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};

use serde_json::Value;

use crate::harness::{free_ports, http_request, str_of, wait_for, Mesh, DEADLINE};

/// One event as a client sees it.
#[derive(Debug, Clone)]
struct Sse {
    id: Option<u64>,
    event: String,
    data: Value,
}

/// A client of `/events`: a thread de-chunks the response and parses its records.
struct Stream {
    events: Receiver<Sse>,
    socket: TcpStream,
}

impl Drop for Stream {
    fn drop(&mut self) {
        let _ = self.socket.shutdown(Shutdown::Both);
    }
}

impl Stream {
    fn open(port: u16, query: &str, last_event_id: Option<&str>) -> Stream {
        let mut socket = TcpStream::connect(("127.0.0.1", port)).expect("connecting");
        let resume =
            last_event_id.map_or_else(String::new, |id| format!("Last-Event-ID: {id}\r\n"));
        write!(
            socket,
            "GET /events{query} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n{resume}\r\n"
        )
        .unwrap();
        let reader = socket.try_clone().unwrap();
        let (tx, events) = channel();
        let (ready_tx, ready) = channel();
        std::thread::spawn(move || read_stream(reader, &tx, &ready_tx));
        // The head and `retry:` have come: the stream is registered from here on.
        ready
            .recv_timeout(DEADLINE)
            .expect("the event stream did not start");
        Stream { events, socket }
    }

    /// The next event, waiting up to the deadline.
    fn next(&self) -> Sse {
        match self.events.recv_timeout(DEADLINE) {
            Ok(e) => e,
            Err(RecvTimeoutError::Timeout) => panic!("no event within {DEADLINE:?}"),
            Err(RecvTimeoutError::Disconnected) => panic!("the event stream ended"),
        }
    }

    /// Events until one of `run_id` of kind `kind` (included).
    fn until(&self, run_id: &str, kind: &str) -> Vec<Sse> {
        let mut seen = Vec::new();
        loop {
            let e = self.next();
            let done = e.event == kind && e.data["run_id"] == run_id;
            seen.push(e);
            if done {
                return seen;
            }
        }
    }
}

/// Reads the chunked body, hands each complete record to `tx`; says `ready` at `retry:`.
fn read_stream(
    mut socket: TcpStream,
    tx: &std::sync::mpsc::Sender<Sse>,
    ready: &std::sync::mpsc::Sender<()>,
) {
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    let mut body = String::new();
    let mut head_done = false;
    loop {
        match socket.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
        }
        if !head_done {
            let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
                continue;
            };
            let head = String::from_utf8_lossy(&raw[..end]).to_string();
            assert!(head.starts_with("HTTP/1.1 200"), "{head}");
            assert!(head.contains("text/event-stream"), "{head}");
            raw.drain(..end + 4);
            head_done = true;
        }
        // De-chunk what is complete.
        while let Some(line_end) = raw.windows(2).position(|w| w == b"\r\n") {
            let size = usize::from_str_radix(String::from_utf8_lossy(&raw[..line_end]).trim(), 16)
                .expect("chunk size");
            if size == 0 {
                return;
            }
            if raw.len() < line_end + 2 + size + 2 {
                break;
            }
            body.push_str(&String::from_utf8_lossy(
                &raw[line_end + 2..line_end + 2 + size],
            ));
            raw.drain(..line_end + 2 + size + 2);
        }
        while let Some(end) = body.find("\n\n") {
            let record: String = body.drain(..end + 2).collect();
            let mut sse = Sse {
                id: None,
                event: "message".into(),
                data: Value::Null,
            };
            let mut any = false;
            for line in record.lines() {
                if let Some(v) = line.strip_prefix("id: ") {
                    sse.id = v.parse().ok();
                } else if let Some(v) = line.strip_prefix("event: ") {
                    sse.event = v.to_owned();
                    any = true;
                } else if let Some(v) = line.strip_prefix("data: ") {
                    sse.data = serde_json::from_str(v).expect("event data is JSON");
                } else if line.starts_with("retry: ") {
                    let _ = ready.send(());
                }
            }
            if any && tx.send(sse).is_err() {
                return;
            }
        }
    }
}

fn kinds(events: &[Sse]) -> Vec<String> {
    events.iter().map(|e| e.event.clone()).collect()
}

const JOBS: &str = r#"
jobs:
  - name: ok
    command: "echo ok"
    tags: [nightly]
  - name: other
    command: "true"
"#;

#[test]
fn a_run_is_told_change_by_change_filtered_and_resumable() {
    let mesh = Mesh::builder().worker("w1", JOBS).start();
    mesh.wait_workers_live(1);
    let all = Stream::open(mesh.frontend_port, "", None);
    let only_other = Stream::open(mesh.frontend_port, "?job=other", None);
    let only_nightly = Stream::open(mesh.frontend_port, "?tag=nightly", None);

    let run_id = mesh.start_run("ok", &[]);
    let told = all.until(&run_id, "run.succeeded");
    let mine: Vec<Sse> = told
        .into_iter()
        .filter(|e| e.data["run_id"] == run_id.as_str())
        .collect();
    assert_eq!(
        kinds(&mine),
        [
            "run.accepted",
            "task.scheduled",
            "task.started",
            "run.started",
            "task.succeeded",
            "run.succeeded"
        ]
    );
    let ids: Vec<u64> = mine
        .iter()
        .map(|e| e.id.expect("every event has an id"))
        .collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids rise: {ids:?}");
    assert_eq!(mine[0].data["job"], "ok");
    assert_eq!(mine[0].data["tags"][0], "nightly");
    assert_eq!(mine[2].data["task"]["worker"], "w1");
    assert_eq!(mine[5].data["run_state"], "succeeded");
    // The tag filter saw it; the job filter did not: its first event is of `other`.
    assert_eq!(only_nightly.next().data["run_id"], run_id.as_str());
    let other = mesh.start_run("other", &[]);
    assert_eq!(only_other.next().data["run_id"], other.as_str());
    all.until(&other, "run.succeeded");

    // Resumed after the acceptance: exactly what came after it, from the same ids.
    let resumed = Stream::open(
        mesh.frontend_port,
        &format!("?run={run_id}"),
        Some(&ids[0].to_string()),
    );
    let again: Vec<Sse> = (0..5).map(|_| resumed.next()).collect();
    assert_eq!(
        again.iter().map(|e| e.id.unwrap()).collect::<Vec<_>>(),
        ids[1..]
    );
    // An id nobody holds any more (or never gave): `reset`, then live events.
    let stale = Stream::open(mesh.frontend_port, "", Some("1"));
    assert_eq!(stale.next().event, "reset");
    let bogus = Stream::open(mesh.frontend_port, "", Some("not-a-number"));
    assert_eq!(bogus.next().event, "reset");
}

#[test]
fn an_open_stream_survives_a_broker_restart_and_says_what_it_missed() {
    let mut mesh = Mesh::builder().worker("w1", JOBS).start();
    mesh.wait_workers_live(1);
    let stream = Stream::open(mesh.frontend_port, "", None);
    let first = mesh.start_run("ok", &[]);
    stream.until(&first, "run.succeeded");
    mesh.kill9("broker");
    mesh.restart("broker");
    // The restarted broker numbers on from a larger number: the stream cannot know what
    // it missed meanwhile, so it says `reset`, then goes on live.
    let second = wait_for(
        DEADLINE,
        "the restarted broker to accept a run",
        || match mesh.trigger("ok", &[]) {
            (202, body) => Ok(str_of(&body, "run_id").to_owned()),
            (status, body) => Err(format!("{status} {body}")),
        },
    );
    let told = stream.until(&second, "run.succeeded");
    assert_eq!(told[0].event, "reset", "{:?}", kinds(&told));
    assert!(told
        .iter()
        .any(|e| e.event == "run.accepted" && e.data["run_id"] == second.as_str()));
}

#[test]
fn a_browser_opening_a_run_link_gets_the_page_and_scripts_get_json() {
    let mesh = Mesh::builder().worker("w1", JOBS).start();
    mesh.wait_workers_live(1);
    let run_id = mesh.start_run("ok", &[]);
    let request = |accept: &str| {
        let raw = format!(
            "GET /runs/{run_id} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: {accept}\r\nConnection: close\r\n\r\n"
        );
        crate::harness::http_request(mesh.frontend_port, raw.as_bytes(), DEADLINE).unwrap()
    };
    let page = request("text/html,application/xhtml+xml,*/*;q=0.8");
    assert_eq!(page.status, 200);
    assert!(page
        .header("content-type")
        .unwrap()
        .starts_with("text/html"));
    assert!(page.text().contains("new EventSource(\"/events\")"));
    let json = request("*/*");
    assert!(json
        .header("content-type")
        .unwrap()
        .starts_with("application/json"));
    let run: Value = serde_json::from_str(&json.text()).unwrap();
    assert_eq!(run["run_id"], run_id.as_str());
}

/// `GET path` on `port` with `Connection: close`: the status and body.
fn get(port: u16, path: &str) -> (u16, String) {
    let raw = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    let r = http_request(port, raw.as_bytes(), DEADLINE).unwrap();
    (r.status, r.text())
}

#[test]
fn one_client_holding_every_stream_locks_out_no_request_and_gone_streams_are_given_back() {
    let mut mesh = Mesh::builder().worker("w1", JOBS).start();
    mesh.wait_workers_live(1);
    // One address may hold more connections than there are streams: the stream cap is the
    // only thing between this client and the rest.
    let port = free_ports(1);
    let flags = [
        "--listen".to_owned(),
        format!("127.0.0.1:{port}"),
        "--max-connections-per-address".to_owned(),
        "200".to_owned(),
    ];
    let flags: Vec<OsString> = flags.iter().map(OsString::from).collect();
    mesh.start_frontend("wide", &flags);
    wait_for(DEADLINE, "the second frontend to answer", || {
        let raw = "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
        match http_request(port, raw.as_bytes(), DEADLINE) {
            Ok(r) if r.status == 200 => Ok(()),
            Ok(r) => Err(format!("{} {}", r.status, r.text())),
            Err(e) => Err(e.to_string()),
        }
    });
    let held: Vec<Stream> = (0..64).map(|_| Stream::open(port, "", None)).collect();
    let raw = "GET /events HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
    let refused = http_request(port, raw.as_bytes(), DEADLINE).unwrap();
    assert_eq!(refused.status, 503, "{}", refused.text());
    assert_eq!(refused.header("retry-after"), Some("5"));
    // Everything else is still served, and the held streams hear of it.
    assert_eq!(get(port, "/runs").0, 200);
    let (status, body) = get(port, "/job_start?job_name=ok");
    assert_eq!(status, 202, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    let run_id = str_of(&body, "run_id").to_owned();
    held[63].until(&run_id, "run.succeeded");
    // The client goes: its streams are given back once the frontend writes to them again
    // (each run's events do).
    drop(held);
    let back = wait_for(DEADLINE, "a stream to be admitted again", || {
        let _ = mesh.trigger("ok", &[]);
        let raw = "GET /events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";
        let mut socket = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
        socket
            .write_all(raw.as_bytes())
            .map_err(|e| e.to_string())?;
        let mut head = [0u8; 12];
        socket.read_exact(&mut head).map_err(|e| e.to_string())?;
        match &head {
            b"HTTP/1.1 200" => Ok(socket),
            other => Err(String::from_utf8_lossy(other).into_owned()),
        }
    });
    let _ = back.shutdown(Shutdown::Both);
}
