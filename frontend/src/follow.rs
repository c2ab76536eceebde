//! `GET /runs/{id}/log?follow=1`: the run's log, streamed until the run ends.
//!
//! Workers ship a running step's output to the broker as it is written (`TaskOutput`,
//! bounded) and report its last 4 KiB with the result (`TaskFinished.output_tail`). Following
//! a run means: read the run when the feed says it changed ([`crate::events`]); for each
//! running task, print the whole lines its shipped output gained (`Query::TaskOutput`);
//! when a task ends, print the rest of what it shipped, or, for a task nothing was shipped
//! of (it ended within a tick), its tail; until the run is final. [`LogFollower`] decides what is new; [`stream`] writes it as an HTTP/1.1
//! chunked response, flushing every chunk (tiny_http's own writer would buffer a slow
//! stream).
//!
//! A stream lasts at most [`MAX_FOLLOW`], ends on shutdown, and stops when the client goes.

use std::collections::{HashMap, HashSet};
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use jobz::message::{LiveOutputView, Message, Query, ReplyBody, RunView, StepView, TaskState};

use crate::broker::Broker;
use crate::events::Feed;
use crate::views;

/// How often a running task's shipped output is read (a line reaches the follower within
/// about this plus the worker's tick, 100 ms).
pub const POLL_EVERY: Duration = Duration::from_millis(250);

/// Longest a stream stays open.
pub const MAX_FOLLOW: Duration = Duration::from_secs(3600);

/// Most streams open at once; beyond it the answer is 503.
pub const MAX_FOLLOWERS: u64 = 32;

/// Remembers which task attempts have been printed, and how far the output of those
/// followed live has been.
#[derive(Debug, Default)]
pub struct LogFollower {
    printed: HashSet<(String, u32)>,
    live: HashMap<(String, u32), Live>,
}

/// A task attempt whose output is being printed as it comes.
#[derive(Debug)]
struct Live {
    /// `[worker job] `, before each line.
    prefix: String,
    /// The offset to ask from next.
    next: u64,
    /// The last line, not ended yet.
    partial: String,
    /// The worker stopped shipping at its cap.
    capped: bool,
}

impl LogFollower {
    /// The log lines that are new since the last call, in task order: attempts that have
    /// given way to a retry first (what they shipped live), then the current ones.
    /// `read_live` gives a task attempt's shipped output from an offset on
    /// (`Query::TaskOutput`).
    pub fn advance(
        &mut self,
        run: &RunView,
        mut read_live: impl FnMut(&str, u32, u64) -> Option<LiveOutputView>,
    ) -> String {
        let mut out = String::new();
        let current: HashSet<(String, u32)> = run
            .steps
            .iter()
            .map(|s| (s.task_id.clone(), s.attempt))
            .collect();
        for attempt in &run.attempts {
            let key = (attempt.task_id.clone(), attempt.attempt);
            if attempt.late || current.contains(&key) || self.printed.contains(&key) {
                continue;
            }
            // An earlier attempt: what it shipped live if the broker still holds it, else
            // the tail its worker reported (kept with the attempt's record).
            let next = self.live.get(&key).map_or(0, |l| l.next);
            let view = read_live(&attempt.task_id, attempt.attempt, next);
            let job = run
                .steps
                .iter()
                .find(|s| s.task_id == attempt.task_id)
                .map_or(run.job.as_str(), |s| s.job.as_str());
            let prefix = format!("[{} {}] ", attempt.worker.as_deref().unwrap_or("-"), job);
            match (view, self.live.remove(&key)) {
                // Never followed live and nothing held: the tail its worker reported.
                (None, None) => out.push_str(&views::prefixed_lines(
                    attempt.worker.as_deref(),
                    job,
                    &attempt.output_tail,
                )),
                (view, live) => {
                    let mut live = live.unwrap_or_else(|| Live::new(prefix));
                    if let Some(view) = view {
                        live.take(view, &mut out);
                    }
                    live.end(None, &mut out);
                }
            }
            self.printed.insert(key);
        }
        for step in &run.steps {
            let key = (step.task_id.clone(), step.attempt);
            if self.printed.contains(&key) {
                continue;
            }
            if step.state == TaskState::Running || self.live.contains_key(&key) {
                let next = self.live.get(&key).map_or(0, |l| l.next);
                if let Some(view) = read_live(&step.task_id, step.attempt, next) {
                    let prefix =
                        format!("[{} {}] ", step.worker.as_deref().unwrap_or("-"), step.job);
                    let live = self
                        .live
                        .entry(key.clone())
                        .or_insert_with(|| Live::new(prefix));
                    live.take(view, &mut out);
                }
            }
            if !step.state.is_final() {
                continue;
            }
            self.printed.insert(key.clone());
            match self.live.remove(&key) {
                Some(live) => live.end(Some(step), &mut out),
                None => out.push_str(&views::task_log(step)),
            }
        }
        out
    }
}

impl Live {
    fn new(prefix: String) -> Live {
        Live {
            prefix,
            next: 0,
            partial: String::new(),
            capped: false,
        }
    }

    /// Prints the whole lines `view` completes.
    fn take(&mut self, view: LiveOutputView, out: &mut String) {
        let prefix = self.prefix.as_str();
        if view.from > self.next {
            out.push_str(&format!(
                "{prefix}[... {} bytes of output not shown: the full output is on the worker]\n",
                view.from - self.next
            ));
            self.partial.clear();
        }
        self.partial.push_str(&view.text);
        self.next = view.next;
        self.capped |= view.capped;
        if let Some(end) = self.partial.rfind('\n') {
            for line in self.partial[..end].split('\n') {
                out.push_str(prefix);
                out.push_str(line);
                out.push('\n');
            }
            self.partial.drain(..=end);
        }
    }

    /// Prints what is left once the attempt has ended (with the result's tail, if it is
    /// the task's current attempt, when the output passed the live cap).
    fn end(self, step: Option<&StepView>, out: &mut String) {
        let prefix = self.prefix.as_str();
        if !self.partial.is_empty() {
            out.push_str(prefix);
            out.push_str(&self.partial);
            out.push('\n');
        }
        if self.capped {
            out.push_str(&format!(
                "{prefix}[the output passed what is shipped live; the full output is on the worker]\n"
            ));
            if let Some(step) = step {
                out.push_str(&format!("{prefix}[it ended with:]\n"));
                out.push_str(&views::task_log(step));
            }
        }
    }
}

/// The response head of a stream.
pub const HEAD: &str = "HTTP/1.1 200 OK\r\n\
    Content-Type: text/plain; charset=utf-8\r\n\
    Transfer-Encoding: chunked\r\n\
    Cache-Control: no-store\r\n\
    X-Content-Type-Options: nosniff\r\n\r\n";

/// Writes `text` as one HTTP/1.1 chunk and flushes it (nothing for empty text).
pub(crate) fn write_chunk(out: &mut impl Write, text: &str) -> io::Result<()> {
    if text.is_empty() {
        return Ok(());
    }
    write!(out, "{:x}\r\n", text.len())?;
    out.write_all(text.as_bytes())?;
    out.write_all(b"\r\n")?;
    out.flush()
}

/// How a follower paces its reads.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    /// How often a running task's shipped output is read ([`POLL_EVERY`]).
    pub live_every: Duration,
    /// The run is read again when the feed says it changed, and at least this often
    /// ([`REREAD_EVERY`]: for changes the frontend did not hear of).
    pub reread_every: Duration,
}

/// A followed run is read again at least this often, whatever the feed says.
pub const REREAD_EVERY: Duration = Duration::from_secs(2);

impl Default for Pace {
    fn default() -> Self {
        Pace {
            live_every: POLL_EVERY,
            reread_every: REREAD_EVERY,
        }
    }
}

/// Writes the whole stream to `out`: head, the log so far, then new output as it comes,
/// until the run is final, [`MAX_FOLLOW`] passes, `shutdown` is set or writing fails.
/// The run is read from the broker when the feed says it changed (completion is an
/// event), not polled; only a running task's output is read every `pace.live_every`.
pub fn stream(
    out: &mut impl Write,
    first: &RunView,
    broker: &dyn Broker,
    feed: &Feed,
    pace: Pace,
    request_timeout: Duration,
    shutdown: &AtomicBool,
) -> io::Result<()> {
    let started = Instant::now();
    let mut follower = LogFollower::default();
    let read_live = |task_id: &str, attempt: u32, from: u64| {
        let query = Message::Query(Query::TaskOutput {
            task_id: task_id.to_owned(),
            attempt,
            from,
        });
        match broker.request(query, request_timeout) {
            Ok(ReplyBody::TaskOutput(view)) => view,
            _ => None,
        }
    };
    out.write_all(HEAD.as_bytes())?;
    out.flush()?;
    write_chunk(out, &follower.advance(first, read_live))?;
    let mut run = first.clone();
    let mut cursor = feed.newest();
    let (mut read_at, mut live_at) = (Instant::now(), Instant::now());
    while !run.state.is_final()
        && !shutdown.load(Ordering::Relaxed)
        && started.elapsed() < MAX_FOLLOW
    {
        let heard = feed.read_after(cursor, pace.live_every.saturating_sub(live_at.elapsed()));
        let changed = heard.gap || heard.events.iter().any(|e| e.run_id == run.run_id);
        if let Some(last) = heard.events.last() {
            cursor = last.seq;
        }
        if changed || read_at.elapsed() >= pace.reread_every {
            let query = Message::Query(Query::Run {
                run_id: first.run_id.clone(),
            });
            match broker.request(query, request_timeout) {
                Ok(ReplyBody::Run(Some(now))) => run = now,
                Ok(ReplyBody::Run(None)) => break,
                // The broker is away or odd: keep trying until the stream's time is up.
                _ => {}
            }
            read_at = Instant::now();
        } else if live_at.elapsed() < pace.live_every {
            continue;
        }
        live_at = Instant::now();
        write_chunk(out, &follower.advance(&run, read_live))?;
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

    fn no_live(_: &str, _: u32, _: u64) -> Option<LiveOutputView> {
        None
    }

    fn live(from: u64, text: &str, finished: bool) -> LiveOutputView {
        LiveOutputView {
            from,
            text: text.into(),
            next: from + text.len() as u64,
            capped: false,
            finished,
        }
    }

    #[test]
    fn prints_whole_lines_of_a_running_task_as_they_come_and_the_rest_at_its_end() {
        let mut f = LogFollower::default();
        let running = run(
            RunState::Running,
            vec![task("b", 1, TaskState::Running, "")],
        );
        let asked = std::cell::RefCell::new(Vec::new());
        let mut pieces = vec![
            live(0, "li", false),
            live(2, "ne1\nline2\npar", false),
            live(15, "tial", true),
        ]
        .into_iter();
        let mut reader = |task: &str, attempt: u32, from: u64| {
            asked.borrow_mut().push((task.to_owned(), attempt, from));
            pieces.next()
        };
        assert_eq!(f.advance(&running, &mut reader), "");
        assert_eq!(
            f.advance(&running, &mut reader),
            "[w-b build] line1\n[w-b build] line2\n"
        );
        // Ended: the rest it shipped, not its tail again.
        let ended = run(
            RunState::Succeeded,
            vec![task("b", 1, TaskState::Succeeded, "line2\npartial")],
        );
        assert_eq!(f.advance(&ended, &mut reader), "[w-b build] partial\n");
        assert_eq!(f.advance(&ended, &mut reader), "");
        let froms: Vec<u64> = asked.borrow().iter().map(|a| a.2).collect();
        assert_eq!(froms, [0, 2, 15]);
    }

    #[test]
    fn an_earlier_attempt_not_followed_live_is_shown_from_its_reported_tail() {
        let mut f = LogFollower::default();
        let mut r = run(
            RunState::Succeeded,
            vec![task("b", 2, TaskState::Succeeded, "a2\n")],
        );
        r.attempts = vec![jobz::message::AttemptView {
            task_id: "b".into(),
            attempt: 1,
            worker: Some("w-old".into()),
            state: TaskState::Failed,
            exit_code: Some(1),
            error: None,
            started_at_ms: None,
            finished_at_ms: 0,
            late: false,
            output_tail: "a1\n".into(),
        }];
        assert_eq!(f.advance(&r, no_live), "[w-old build] a1\n[w-b build] a2\n");
        assert_eq!(views::run_log(&r), "[w-old build] a1\n[w-b build] a2\n");
    }

    #[test]
    fn says_when_output_was_skipped() {
        let mut f = LogFollower::default();
        let running = run(
            RunState::Running,
            vec![task("b", 1, TaskState::Running, "")],
        );
        let mut pieces = vec![live(0, "a\n", false), live(100, "z\n", false)].into_iter();
        let mut reader = |_: &str, _: u32, _: u64| pieces.next();
        assert_eq!(f.advance(&running, &mut reader), "[w-b build] a\n");
        assert_eq!(
            f.advance(&running, &mut reader),
            "[w-b build] [... 98 bytes of output not shown: the full output is on the worker]\n\
             [w-b build] z\n"
        );
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
        assert_eq!(f.advance(&r1, no_live), "[w-a build] a out\n");
        assert_eq!(f.advance(&r1, no_live), "");
        let r2 = run(
            RunState::Running,
            vec![
                task("a", 1, TaskState::Succeeded, "a out\n"),
                task("b", 1, TaskState::Failed, "b1\n"),
            ],
        );
        assert_eq!(f.advance(&r2, no_live), "[w-b build] b1\n");
        let r3 = run(
            RunState::Failed,
            vec![
                task("a", 1, TaskState::Succeeded, "a out\n"),
                task("b", 2, TaskState::Failed, "b2\n"),
            ],
        );
        assert_eq!(f.advance(&r3, no_live), "[w-b build] b2\n");
    }

    #[test]
    fn streams_chunks_until_the_run_is_final() {
        let polls = Mutex::new(0);
        let broker = FakeBroker::new(move |message| {
            if let Message::Query(Query::TaskOutput { .. }) = message {
                return Ok(ReplyBody::TaskOutput(None));
            }
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
        // No feed here: the run is read every `reread_every`.
        let pace = Pace {
            live_every: Duration::from_millis(1),
            reread_every: Duration::from_millis(1),
        };
        let feed = Feed::default();
        let timeout = Duration::from_secs(1);
        let shutdown = AtomicBool::new(false);
        stream(&mut out, &first, &broker, &feed, pace, timeout, &shutdown).unwrap();
        let text = String::from_utf8(out).unwrap();
        let body = text.strip_prefix(HEAD).unwrap();
        assert_eq!(
            body,
            "10\r\n[w-a build] one\n\r\n10\r\n[w-b build] two\n\r\n0\r\n\r\n"
        );
        // Two polls of the run; b's shipped output asked for while it ran (none).
        assert_eq!(broker.seen().len(), 4);
    }

    #[test]
    fn the_run_is_read_again_when_the_feed_tells_of_its_change_not_before() {
        use std::sync::atomic::AtomicU64;
        use std::sync::Arc;

        use jobz::message::{FeedEvent, FeedKind};

        let reads = Arc::new(AtomicU64::new(0));
        let broker = {
            let reads = reads.clone();
            FakeBroker::new(move |message| match message {
                Message::Query(Query::Run { .. }) => {
                    reads.fetch_add(1, Ordering::SeqCst);
                    Ok(ReplyBody::Run(Some(run(
                        RunState::Succeeded,
                        vec![task("b", 1, TaskState::Succeeded, "done\n")],
                    ))))
                }
                _ => Ok(ReplyBody::TaskOutput(None)),
            })
        };
        let feed = Arc::new(Feed::default());
        let told = |seq: u64, run_id: &str| FeedEvent {
            seq,
            kind: FeedKind::RunSucceeded,
            at_ms: 0,
            run_id: run_id.into(),
            job: "build".into(),
            run_state: RunState::Succeeded,
            tags: vec![],
            tracked: false,
            task: None,
        };
        feed.push(told(1, "other"));
        let running = run(
            RunState::Running,
            vec![task("b", 1, TaskState::Running, "")],
        );
        let pace = Pace {
            live_every: Duration::from_millis(5),
            // Long against the test's steps, short enough that a slow start cannot hang it.
            reread_every: Duration::from_secs(2),
        };
        let follower = {
            let feed = feed.clone();
            std::thread::spawn(move || {
                let mut out = Vec::new();
                let shutdown = AtomicBool::new(false);
                let timeout = Duration::from_secs(1);
                stream(&mut out, &running, &broker, &feed, pace, timeout, &shutdown).unwrap();
                String::from_utf8(out).unwrap()
            })
        };
        // Another run's change is no reason to read this one.
        feed.push(told(2, "other"));
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(reads.load(Ordering::SeqCst), 0);
        feed.push(told(3, "r"));
        let text = follower.join().unwrap();
        assert_eq!(reads.load(Ordering::SeqCst), 1);
        assert!(text.contains("[w-b build] done"), "{text}");
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
            &Feed::default(),
            Pace::default(),
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
            &Feed::default(),
            Pace::default(),
            Duration::from_secs(1),
            &AtomicBool::new(true),
        )
        .unwrap();
        assert!(String::from_utf8(out).unwrap().ends_with("0\r\n\r\n"));
    }
}
