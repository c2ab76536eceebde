//! Live step output (issue 13): a running step's lines reach `GET /runs/{id}/log?follow=1`
//! while it runs, each within a second of being written, once each and in order; a retried
//! task's attempts are each shown and addressable; a short step's output still arrives
//! (from its result).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::harness::{steps_of, str_of, Mesh, DEADLINE};

/// The acceptance bound: a line is shown within this of being written.
const SHOWN_WITHIN_MS: u64 = 1_000;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Follows the run's log until the stream ends, returning each line with the wall-clock
/// time (ms) at which it arrived.
fn follow(port: u16, run_id: &str) -> Vec<(String, u64)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connecting");
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    write!(
        stream,
        "GET /runs/{run_id}/log?follow=1 HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let deadline = Instant::now() + DEADLINE;
    let mut pending = Vec::new();
    let mut lines = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let at = now_ms();
                pending.extend_from_slice(&buf[..n]);
                while let Some(end) = pending.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=end).collect();
                    let line = String::from_utf8_lossy(&line).trim_end().to_owned();
                    lines.push((line, at));
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) => {}
            Err(e) => panic!("reading the followed log: {e}"),
        }
    }
    lines
}

/// `[w1 ticker] tick N <written ms>` lines: (N, written, arrived).
fn ticks(lines: &[(String, u64)]) -> Vec<(u32, u64, u64)> {
    lines
        .iter()
        .filter_map(|(line, at)| {
            let rest = line.split("] tick ").nth(1)?;
            let (n, written) = rest.split_once(' ')?;
            Some((n.parse().ok()?, written.parse().ok()?, *at))
        })
        .collect()
}

#[test]
fn a_followed_step_shows_each_line_within_a_second_while_it_runs() {
    let mesh = Mesh::builder()
        .worker(
            "w1",
            r#"
jobs:
  - name: ticker
    command: "for i in 1 2 3 4 5; do echo \"tick $i $(date +%s%3N)\"; sleep 0.7; done; printf 'no newline at the end'"
"#,
        )
        .start();
    mesh.wait_workers_live(1);
    let run_id = mesh.start_run("ticker", &[]);
    let lines = follow(mesh.frontend_port, &run_id);
    let ticks = ticks(&lines);
    let numbers: Vec<u32> = ticks.iter().map(|t| t.0).collect();
    assert_eq!(
        numbers,
        [1, 2, 3, 4, 5],
        "each line once, in order: {lines:?}"
    );
    for (n, written, arrived) in &ticks {
        assert!(
            arrived.saturating_sub(*written) <= SHOWN_WITHIN_MS,
            "tick {n} written at {written} shown at {arrived}: {lines:?}"
        );
    }
    // Live, not at the end: the first line was shown before the last was written.
    assert!(ticks[0].2 < ticks[4].1, "{ticks:?}");
    assert!(
        lines
            .iter()
            .any(|(l, _)| l == "[w1 ticker] no newline at the end"),
        "the unterminated last line is shown at the end: {lines:?}"
    );
    let run = mesh.wait_run_final(&run_id);
    assert_eq!(str_of(&run, "state"), "succeeded");
}

#[test]
fn a_short_step_is_followed_from_its_result_and_each_attempt_is_shown() {
    let mesh = Mesh::builder()
        .worker(
            "w1",
            r#"
jobs:
  - name: flaky
    command: "echo attempt $JOBZ_ATTEMPT; sleep 0.5; echo done $JOBZ_ATTEMPT; test $JOBZ_ATTEMPT -ge 2"
    retries: 1
    retry_backoff: 100ms
  - name: quick
    command: "echo quick line"
"#,
        )
        .start();
    mesh.wait_workers_live(1);
    let quick = mesh.start_run("quick", &[]);
    mesh.wait_run_final(&quick);
    let lines = follow(mesh.frontend_port, &quick);
    assert!(
        lines.iter().any(|(l, _)| l == "[w1 quick] quick line"),
        "{lines:?}"
    );
    let flaky = mesh.start_run("flaky", &[]);
    let lines = follow(mesh.frontend_port, &flaky);
    let text: Vec<&str> = lines.iter().map(|(l, _)| l.as_str()).collect();
    for expected in [
        "[w1 flaky] attempt 1",
        "[w1 flaky] done 1",
        "[w1 flaky] attempt 2",
        "[w1 flaky] done 2",
    ] {
        assert_eq!(
            text.iter().filter(|l| **l == expected).count(),
            1,
            "{expected:?} once: {text:?}"
        );
    }
    let run = mesh.wait_run_final(&flaky);
    assert_eq!(str_of(&run, "state"), "succeeded", "{run}");

    // Every attempt's output is addressable, and the run's log shows both.
    let task_id = str_of(&steps_of(&run)[0], "task_id").to_owned();
    let attempt_log =
        |n: &str| mesh.http_get(&format!("/runs/{flaky}/tasks/{task_id}/attempts/{n}/log"));
    assert_eq!(attempt_log("1"), (200, "attempt 1\ndone 1\n".to_owned()));
    assert_eq!(attempt_log("2"), (200, "attempt 2\ndone 2\n".to_owned()));
    assert_eq!(attempt_log("3").0, 404);
    assert_eq!(attempt_log("0").0, 400);
    assert_eq!(attempt_log("x").0, 400);
    let (status, log) = mesh.http_get(&format!("/runs/{flaky}/log"));
    assert_eq!(status, 200);
    assert_eq!(
        log,
        "[w1 flaky] attempt 1\n[w1 flaky] done 1\n[w1 flaky] attempt 2\n[w1 flaky] done 2\n"
    );
}
