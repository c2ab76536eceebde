//! Hostile input: parameter values, raw HTTP, raw ZeroMQ frames.

use std::fs;
use std::time::Duration;

use jobz::envelope::{encode, Envelope};
use jobz::message::{Message, Role, TaskFinished, TaskOutcome, TaskRef};

use crate::harness::{http_request, job_start_path, str_of, wait_for, wait_until, Mesh, DEADLINE};

/// Two jobs writing `v` to the file `out`: one takes anything, one has the default pattern.
const ECHO_JOBS: &str = r#"
jobs:
  - name: echo_param
    command: "printf '%s' {v} > {out}"
    params:
      v: { required: true, pattern: '(?s)^.*$' }
      out: { required: true }
  - name: strict
    command: "printf '%s' {v} > {out}"
    params:
      v: { required: true }
      out: { required: true }
"#;

#[test]
fn hostile_parameters_are_refused_or_reach_the_command_literally() {
    let mesh = Mesh::builder().worker("w1", ECHO_JOBS).start();
    let dir = mesh.dir().to_owned();
    let out = dir.join("out");
    fs::create_dir_all(&out).unwrap();
    let canary = dir.join("canary");
    let victim = dir.join("victim");
    fs::create_dir_all(&victim).unwrap();
    let (c, v) = (canary.display(), victim.display());

    // Each has a byte outside the default pattern, or is too long for it.
    let mut hostile: Vec<String> = vec![
        format!(";rm -rf {v}"),
        format!("; touch {c}"),
        format!("$(touch {c})"),
        format!("`touch {c}`"),
        format!("'; touch {c}; echo '"),
        format!("\"; touch {c}; echo \""),
        format!("x\ntouch {c}\n"),
        format!("a && touch {c} || touch {c}"),
        format!("| touch {c}"),
        format!("> {c}"),
        format!("$HOME ~ * ? [a] {{out}} {{v}} ${{IFS}} \\ \\\\ \\'"),
        "%s %d %n \\n \\x41".into(),
        "ünïcödé ✓ 日本語".into(),
        "  two leading, two trailing spaces  ".into(),
        "tab\there\rcarriage return".into(),
        "--help".repeat(50) + "x", // 301 bytes: only the length breaks the default pattern
    ];
    let mut big = String::new();
    while big.len() < 10_240 {
        big.push_str(&format!("0123456789$(touch {c});'\"`\n"));
    }
    big.truncate(10_240);
    hostile.push(big);
    // Plain enough for the default pattern, but odd for a shell.
    let plain: Vec<String> = vec![String::new(), "-n".into(), "--help".into()];

    mesh.wait_workers_live(1);
    // Every check runs; the test fails at the end with the whole list.
    let mut problems: Vec<String> = Vec::new();
    let mut runs = Vec::new();
    for (i, value) in hostile.iter().chain(&plain).enumerate() {
        let file = out.join(format!("{i}.txt"));
        let file_param = file.to_string_lossy().into_owned();
        let (status, body) = mesh.trigger("echo_param", &[("v", value), ("out", &file_param)]);
        if status == 202 {
            runs.push((str_of(&body, "run_id").to_owned(), value.clone(), file));
        } else {
            problems.push(format!(
                "echo_param refused {}: {status} {body}",
                preview(value)
            ));
        }
    }
    for value in &hostile {
        let file = out.join("strict.txt").to_string_lossy().into_owned();
        let (status, body) = mesh.trigger("strict", &[("v", value), ("out", &file)]);
        // 414 is a refusal too, for a value whose URL is over the frontend's limit.
        if !matches!(status, 400 | 414) || body.get("error").is_none() {
            problems.push(format!(
                "the default pattern must refuse {} with 400: {status} {body}",
                preview(value)
            ));
        }
    }

    // Bytes that are not UTF-8, in a value or a name, are refused, not replaced.
    let out_param = out.join("x.txt").to_string_lossy().into_owned();
    let encoded_out = crate::harness::percent_encode(out_param.as_bytes());
    for path in [
        format!("/job_start?job_name=echo_param&v=%ff&out={encoded_out}"),
        format!("/job_start?job_name=echo_param&v=a%C3&out={encoded_out}"),
        format!("/job_start?job_name=echo_param&v%ff=a&out={encoded_out}"),
        "/job_start?job_name=echo%ff".to_string(),
    ] {
        let (status, body) = mesh.get_json(&path);
        if status != 400 {
            problems.push(format!("{path}: {status} {body}, expected 400"));
        }
    }
    // Missing, undeclared, unknown, too long.
    let (status, body) = mesh.trigger("echo_param", &[("out", &out_param)]);
    if status != 400 {
        problems.push(format!("missing parameter: {status} {body}, expected 400"));
    }
    let (status, body) = mesh.trigger(
        "echo_param",
        &[("v", "a"), ("out", &out_param), ("extra", "1")],
    );
    if status != 400 {
        problems.push(format!(
            "undeclared parameter: {status} {body}, expected 400"
        ));
    }
    let (status, body) = mesh.trigger("no_such_job", &[]);
    if status != 404 {
        problems.push(format!("unknown job: {status} {body}, expected 404"));
    }
    let too_long = "A".repeat(70_000);
    let (status, body) = mesh.http_get(&job_start_path(
        "echo_param",
        &[("v", &too_long), ("out", &out_param)],
    ));
    if !(400..500).contains(&status) {
        problems.push(format!("a 70 kB value: {status} {body}, expected 4xx"));
    }

    // A NUL byte cannot reach a shell: refused, or the run fails; never silently altered.
    let nul_file = out.join("nul.txt").to_string_lossy().into_owned();
    let (status, body) = mesh.trigger("echo_param", &[("v", "a\0b"), ("out", &nul_file)]);
    match status {
        400 => {}
        202 => {
            let run = mesh.wait_run_final(str_of(&body, "run_id"));
            if str_of(&run, "state") != "failed" {
                problems.push(format!("a NUL value must be refused or fail: {run}"));
            }
        }
        _ => problems.push(format!("a NUL value: {status} {body}")),
    }

    // Every accepted value reached printf as one word, byte for byte.
    for (run_id, value, file) in &runs {
        let run = mesh.wait_run_final(run_id);
        if str_of(&run, "state") != "succeeded" {
            problems.push(format!("{}: run {}", preview(value), str_of(&run, "state")));
            continue;
        }
        if run["params"]["v"] != value.as_str() {
            problems.push(format!(
                "{}: the run's params show {}",
                preview(value),
                preview(&run["params"]["v"].to_string())
            ));
        }
        match fs::read(file) {
            Ok(written) if written == value.as_bytes() => {}
            Ok(written) => problems.push(format!(
                "{} reached the command as {}",
                preview(value),
                preview(&String::from_utf8_lossy(&written))
            )),
            Err(e) => problems.push(format!("{}: {}: {e}", preview(value), file.display())),
        }
    }
    if canary.exists() || !victim.exists() {
        problems.push("a parameter value was executed by the shell".into());
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

/// A value short enough for a failure message.
fn preview(value: &str) -> String {
    if value.len() <= 60 {
        format!("{value:?}")
    } else {
        let cut = (0..=60)
            .rev()
            .find(|&i| value.is_char_boundary(i))
            .unwrap_or(0);
        format!("{:?}… ({} bytes)", &value[..cut], value.len())
    }
}

/// A response status, or why there was none.
fn status_of(port: u16, raw: &[u8]) -> Result<u16, String> {
    http_request(port, raw, Duration::from_secs(10))
        .map(|r| r.status)
        .map_err(|e| e.to_string())
}

#[test]
fn hostile_http_input_gets_4xx_and_frontend_keeps_serving() {
    let mut mesh = Mesh::builder().start();
    let port = mesh.frontend_port;
    let host = format!("Host: 127.0.0.1:{port}\r\nConnection: close\r\n");

    // A client that connects and says nothing must not block anyone else.
    let silent = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();

    let long_path = format!("/runs/{}", "a".repeat(20_000));
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("garbage request line", b"GARBAGE\r\n\r\n".to_vec()),
        (
            "20 kB URL",
            format!("GET {long_path} HTTP/1.1\r\n{host}\r\n").into_bytes(),
        ),
        (
            "POST",
            format!("POST /job_start?job_name=x HTTP/1.1\r\n{host}Content-Length: 5\r\n\r\nhello")
                .into_bytes(),
        ),
        (
            "unknown path",
            format!("GET /no/such/path HTTP/1.1\r\n{host}\r\n").into_bytes(),
        ),
        (
            "job_start without job_name",
            format!("GET /job_start HTTP/1.1\r\n{host}\r\n").into_bytes(),
        ),
        (
            "unknown run",
            format!("GET /runs/does-not-exist HTTP/1.1\r\n{host}\r\n").into_bytes(),
        ),
        (
            "path traversal",
            format!("GET /../../etc/passwd HTTP/1.1\r\n{host}\r\n").into_bytes(),
        ),
    ];
    let mut wrong = Vec::new();
    for (what, raw) in &cases {
        match status_of(port, raw) {
            Ok(status) if (400..500).contains(&status) => {}
            other => wrong.push(format!("{what}: {other:?}")),
        }
    }
    // Bytes that are not even text: a 4xx, or the connection closed without an answer
    // (there is no HTTP peer to answer).
    let binary = b"\x00\xff\xfe GET \x01\x02 HTTP/1.1\r\n\r\n";
    match http_request(port, binary, Duration::from_secs(10)) {
        Ok(r) if (400..500).contains(&r.status) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {}
        other => wrong.push(format!("binary garbage: {other:?}")),
    }

    // A 100 kB header: any answer, or a closed connection, as long as the server survives.
    let big_header = format!(
        "GET /healthz HTTP/1.1\r\n{host}X-Junk: {}\r\n\r\n",
        "j".repeat(100_000)
    );
    let _ = status_of(port, big_header.as_bytes());

    let (status, body) = mesh.http_get("/healthz");
    assert_eq!(status, 200, "/healthz after hostile input: {body}");
    drop(silent);
    assert!(
        mesh.is_running("frontend"),
        "the frontend died on hostile input"
    );
    assert!(wrong.is_empty(), "expected a 4xx for each of: {wrong:#?}");
}

#[test]
fn malformed_and_oversized_frames_are_dropped_and_broker_keeps_serving() {
    let mut mesh = Mesh::builder()
        .worker("w1", "jobs:\n  - name: ping\n    command: \"echo pong\"\n")
        .start();
    let pull = format!("tcp://127.0.0.1:{}", mesh.base_port + 1);
    let ctx = zmq::Context::new();

    // 2 MiB, twice the frame limit: the broker's libzmq cuts this connection.
    let big = ctx.socket(zmq::PUSH).unwrap();
    big.set_linger(0).unwrap();
    big.connect(&pull).unwrap();
    big.send(vec![b'J'; 2 << 20], 0).unwrap();

    let push = ctx.socket(zmq::PUSH).unwrap();
    push.set_linger(0).unwrap();
    push.connect(&pull).unwrap();
    let hello = encode(&Envelope::new(
        "client:e2e",
        Message::Hello { role: Role::Client },
    ))
    .unwrap();
    let mut wrong_version = hello.clone();
    wrong_version[2] = 0x7f;
    let mut bad_body = b"JZ\x00\x01".to_vec();
    bad_body.extend_from_slice(&[0xc1, 0xff, 0x00, 0x93, 0xa1]);
    let unknown_task = encode(&Envelope::new(
        "worker:ghost",
        Message::TaskFinished(TaskFinished {
            task: TaskRef {
                task_id: "no-such-task".into(),
                attempt: 1,
            },
            worker: "ghost".into(),
            outcome: TaskOutcome::Succeeded,
            exit_code: Some(0),
            error: None,
            started_at_ms: 0,
            finished_at_ms: 0,
            output_tail: String::new(),
        }),
    ))
    .unwrap();
    let frames: Vec<Vec<u8>> = vec![
        Vec::new(),
        b"garbage \x00\xff".to_vec(),
        hello[..hello.len() / 2].to_vec(),
        hello[..3].to_vec(),
        wrong_version,
        bad_body,
        unknown_task,
    ];
    for frame in &frames {
        push.send(frame.as_slice(), 0).unwrap();
    }
    push.send_multipart([b"two".to_vec(), b"parts".to_vec()], 0)
        .unwrap();

    wait_for(DEADLINE, "a broker warning about dropped frames", || {
        let log = mesh.stderr_of("broker");
        let warned = log.lines().any(|l| {
            let l = l.to_ascii_lowercase();
            l.contains("warn")
                && [
                    "drop",
                    "discard",
                    "ignor",
                    "refus",
                    "reject",
                    "malformed",
                    "invalid",
                ]
                .iter()
                .any(|w| l.contains(w))
        });
        if warned {
            Ok(())
        } else {
            Err(log.lines().rev().take(5).collect::<Vec<_>>().join(" | "))
        }
    });

    assert!(
        mesh.is_running("broker"),
        "the broker died on hostile frames"
    );
    mesh.wait_workers_live(1);
    let run_id = mesh.start_run("ping", &[]);
    let run = mesh.wait_run_final(&run_id);
    assert_eq!(str_of(&run, "state"), "succeeded", "{run:#}");
    wait_until(DEADLINE, "/healthz 200", || {
        mesh.try_http_get("/healthz").is_ok_and(|(s, _)| s == 200)
    });
    assert!(
        mesh.is_running("broker"),
        "the broker died on hostile frames"
    );
}
