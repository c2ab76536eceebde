//! `&wait=` with the real binaries (issue 12: completion is an event, not a poll): the
//! frontend asks the broker for the run's end once, the broker holds the question and
//! answers it after the commit that ends the run; a broker killed meanwhile gets the
//! question again from the frontend's resend and answers it when the run ends.

use std::fs;
use std::time::Duration;

use serde_json::Value;

use crate::harness::{http_request, job_start_path, str_of, wait_for, Mesh, DEADLINE};

/// A step that ends when `@DIR@/open` exists.
const JOBS: &str = r#"
jobs:
  - name: gated
    delivery: queue
    timeout: 60s
    command: "while [ ! -e @DIR@/open ]; do sleep 0.02; done"
"#;

/// `GET /job_start?job_name=gated&wait=30` on its own thread: the answer's status and body.
fn wait_in_background(port: u16) -> std::thread::JoinHandle<(u16, Value)> {
    std::thread::spawn(move || {
        let path = format!("{}&wait=30", job_start_path("gated", &[]));
        let raw =
            format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
        let response = http_request(port, raw.as_bytes(), Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        let body = serde_json::from_slice(&response.body).unwrap_or(Value::Null);
        (response.status, body)
    })
}

#[test]
fn a_wait_is_answered_by_the_runs_end_even_across_a_broker_kill() {
    let mut mesh = Mesh::builder().worker("w1", JOBS).start();
    mesh.wait_workers_live(1);

    // Answered by the end of the run: the broker held the question until then.
    let waiting = wait_in_background(mesh.frontend_port);
    wait_for(DEADLINE, "the broker to hold the question", || {
        match mesh.broker_counter("run_end_queries_held") {
            0 => Err("not held yet".to_owned()),
            n => Ok(n),
        }
    });
    fs::write(mesh.dir().join("open"), b"").unwrap();
    let (status, run) = waiting.join().unwrap();
    assert_eq!(status, 200, "{run}");
    assert_eq!(str_of(&run, "state"), "succeeded", "{run}");
    assert_eq!(mesh.broker_counter("run_end_queries_answered"), 1);
    fs::remove_file(mesh.dir().join("open")).unwrap();

    // A broker killed while the question is held: the frontend's resend asks the new one,
    // which answers when the run ends.
    let waiting = wait_in_background(mesh.frontend_port);
    wait_for(DEADLINE, "the second question to be held", || {
        match mesh.broker_counter("run_end_queries_held") {
            n if n >= 2 => Ok(n),
            n => Err(format!("{n} held")),
        }
    });
    mesh.kill9("broker");
    mesh.restart("broker");
    wait_for(
        DEADLINE,
        "the restarted broker to hold the question",
        || match mesh.broker_counter("run_end_queries_held") {
            0 => Err("not held yet".to_owned()),
            n => Ok(n),
        },
    );
    fs::write(mesh.dir().join("open"), b"").unwrap();
    let (status, run) = waiting.join().unwrap();
    assert_eq!(status, 200, "{run}");
    assert_eq!(str_of(&run, "state"), "succeeded", "{run}");
    assert_eq!(mesh.broker_counter("run_end_queries_answered"), 1);
}
