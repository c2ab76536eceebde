//! `GET /runs/{id}/log?follow=1`: the run's log, streamed until the run ends.
//!
//! Workers report a task's output when the task ends (`TaskFinished.output_tail`), so
//! following a run means: print the output of every task that has ended, then poll the run
//! and print each task's output as it ends, until the run is final. [`LogFollower`] decides
//! what is new; [`stream`] writes it as an HTTP/1.1 chunked response, flushing every chunk
//! (tiny_http's own writer would buffer a slow stream).
//!
//! A stream lasts at most [`MAX_FOLLOW`], ends on shutdown, and stops when the client goes.

use std::collections::HashSet;
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use jobz::message::{Message, Query, ReplyBody, RunView};

use crate::broker::Broker;
use crate::views;

/// How often a followed run is polled.
pub const POLL_EVERY: Duration = Duration::from_millis(500);

/// Longest a stream stays open.
pub const MAX_FOLLOW: Duration = Duration::from_secs(3600);

/// Most streams open at once; beyond it the answer is 503.
pub const MAX_FOLLOWERS: u64 = 32;

/// Remembers which task attempts have been printed.
#[derive(Debug, Default)]
pub struct LogFollower {
    printed: HashSet<(String, u32)>,
}

impl LogFollower {
    /// The log lines of the tasks that ended since the last call, in task order.
    pub fn advance(&mut self, run: &RunView) -> String {
        let mut out = String::new();
        for step in &run.steps {
            if step.state.is_final() && self.printed.insert((step.task_id.clone(), step.attempt)) {
                out.push_str(&views::task_log(step));
            }
        }
        out
    }
}

/// The response head of a stream.
pub const HEAD: &str = "HTTP/1.1 200 OK\r\n\
    Content-Type: text/plain; charset=utf-8\r\n\
    Transfer-Encoding: chunked\r\n\
    Cache-Control: no-store\r\n\
    X-Content-Type-Options: nosniff\r\n\r\n";

fn write_chunk(out: &mut impl Write, text: &str) -> io::Result<()> {
    if text.is_empty() {
        return Ok(());
    }
    write!(out, "{:x}\r\n", text.len())?;
    out.write_all(text.as_bytes())?;
    out.write_all(b"\r\n")?;
    out.flush()
}

/// Writes the whole stream to `out`: head, the log so far, then new output as tasks end,
/// until the run is final, [`MAX_FOLLOW`] passes, `shutdown` is set or writing fails.
pub fn stream(
    out: &mut impl Write,
    first: &RunView,
    broker: &dyn Broker,
    poll_every: Duration,
    request_timeout: Duration,
    shutdown: &AtomicBool,
) -> io::Result<()> {
    let started = Instant::now();
    let mut follower = LogFollower::default();
    out.write_all(HEAD.as_bytes())?;
    out.flush()?;
    write_chunk(out, &follower.advance(first))?;
    let mut run_over = first.state.is_final();
    while !run_over && !shutdown.load(Ordering::Relaxed) && started.elapsed() < MAX_FOLLOW {
        std::thread::sleep(poll_every);
        let query = Message::Query(Query::Run {
            run_id: first.run_id.clone(),
        });
        match broker.request(query, request_timeout) {
            Ok(ReplyBody::Run(Some(run))) => {
                write_chunk(out, &follower.advance(&run))?;
                run_over = run.state.is_final();
            }
            Ok(ReplyBody::Run(None)) => run_over = true,
            // The broker is away or odd: keep trying until the stream's time is up.
            _ => {}
        }
    }
    out.write_all(b"0\r\n\r\n")?;
    out.flush()
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use jobz::message::{Params, RunState, StepView, TaskState};

    use super::*;
    use crate::broker::fake::FakeBroker;

    fn task(id: &str, attempt: u32, state: TaskState, output: &str) -> StepView {
        StepView {
            step_id: "s".into(),
            task_id: id.into(),
            job: "build".into(),
            worker: Some(format!("w-{id}")),
            state,
            attempt,
            exit_code: None,
            error: None,
            started_at_ms: None,
            finished_at_ms: None,
            output_tail: output.into(),
        }
    }

    fn run(state: RunState, steps: Vec<StepView>) -> RunView {
        RunView {
            run_id: "r".into(),
            job: "build".into(),
            params: Params::new(),
            state,
            parent_runs: vec![],
            created_at_ms: 0,
            finished_at_ms: None,
            steps,
            attempts: vec![],
            ..Default::default()
        }
    }

    #[test]
    fn prints_each_task_attempt_once_when_it_ends() {
        let mut f = LogFollower::default();
        let r1 = run(
            RunState::Running,
            vec![
                task("a", 1, TaskState::Succeeded, "a out\n"),
                task("b", 1, TaskState::Running, ""),
            ],
        );
        assert_eq!(f.advance(&r1), "[w-a build] a out\n");
        assert_eq!(f.advance(&r1), "");
        let r2 = run(
            RunState::Running,
            vec![
                task("a", 1, TaskState::Succeeded, "a out\n"),
                task("b", 1, TaskState::Failed, "b1\n"),
            ],
        );
        assert_eq!(f.advance(&r2), "[w-b build] b1\n");
        let r3 = run(
            RunState::Failed,
            vec![
                task("a", 1, TaskState::Succeeded, "a out\n"),
                task("b", 2, TaskState::Failed, "b2\n"),
            ],
        );
        assert_eq!(f.advance(&r3), "[w-b build] b2\n");
    }

    #[test]
    fn streams_chunks_until_the_run_is_final() {
        let polls = Mutex::new(0);
        let broker = FakeBroker::new(move |_| {
            let mut n = polls.lock().unwrap();
            *n += 1;
            let b_state = if *n >= 2 {
                TaskState::Succeeded
            } else {
                TaskState::Running
            };
            let state = if *n >= 2 {
                RunState::Succeeded
            } else {
                RunState::Running
            };
            Ok(ReplyBody::Run(Some(run(
                state,
                vec![
                    task("a", 1, TaskState::Succeeded, "one\n"),
                    task("b", 1, b_state, "two\n"),
                ],
            ))))
        });
        let first = run(
            RunState::Running,
            vec![
                task("a", 1, TaskState::Succeeded, "one\n"),
                task("b", 1, TaskState::Running, ""),
            ],
        );
        let mut out = Vec::new();
        stream(
            &mut out,
            &first,
            &broker,
            Duration::from_millis(1),
            Duration::from_secs(1),
            &AtomicBool::new(false),
        )
        .unwrap();
        let text = String::from_utf8(out).unwrap();
        let body = text.strip_prefix(HEAD).unwrap();
        assert_eq!(
            body,
            "10\r\n[w-a build] one\n\r\n10\r\n[w-b build] two\n\r\n0\r\n\r\n"
        );
        assert_eq!(broker.seen().len(), 2);
    }

    #[test]
    fn a_final_run_is_written_without_polling_and_shutdown_ends_a_stream() {
        let broker = FakeBroker::down();
        let mut out = Vec::new();
        let done = run(RunState::Succeeded, vec![]);
        stream(
            &mut out,
            &done,
            &broker,
            Duration::from_millis(1),
            Duration::from_secs(1),
            &AtomicBool::new(false),
        )
        .unwrap();
        assert!(broker.seen().is_empty());
        assert!(String::from_utf8(out)
            .unwrap()
            .ends_with("\r\n\r\n0\r\n\r\n"));
        let mut out = Vec::new();
        let running = run(RunState::Running, vec![]);
        stream(
            &mut out,
            &running,
            &broker,
            Duration::from_millis(1),
            Duration::from_secs(1),
            &AtomicBool::new(true),
        )
        .unwrap();
        assert!(String::from_utf8(out).unwrap().ends_with("0\r\n\r\n"));
    }
}
