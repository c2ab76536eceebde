//! Scenario 9: latencies on an idle mesh, one sample at a time, all on the bench's clock.
//!
//! The trigger is the moment the bench starts writing `GET /job_start` on a kept-alive
//! connection. The command's start is the moment the bench reads the run id from a named
//! pipe that the job's command (`echo $JOBZ_RUN_ID > started.fifo`: shell built-ins, no
//! extra process) writes to. A run's success is the moment the bench receives the broker's
//! completion event of its last task, which the broker publishes after committing the
//! run's end (see `events`). Samples are 10 ms apart, so each finds the mesh idle.
//!
//! - one run: trigger → command started, trigger → succeeded;
//! - a 3-step chain (`queue → queue → queue`): trigger → third step succeeded;
//! - a 10 → 1 barrier: 10 runs of a member job triggered at once over 10 connections, a
//!   `jobz-semaphore` counting them under one key, its `then` job: first trigger → the
//!   joining run succeeded;
//! - `job_start?…&wait=30`: the answer's delay after the run's end (completion event).

use std::sync::Barrier;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use jobz::message::{Completion, TaskState};
use serde_json::Value;

use crate::events::{Arrivals, EventWatch, FifoLines, ARRIVAL_TIMEOUT};
use crate::http::Connection;
use crate::mesh::HTTP_TIMEOUT;
use crate::report::{self, Row, Unit};
use crate::scenario::{Bench, QUEUE_JOB};
use crate::stats::{self, Summary};

/// The scenario's label in the table.
pub const SCENARIO: &str = "9 idle latency";

/// The job whose command says when it started.
pub const MARK_JOB: &str = "bench_mark";
/// The three steps of the chain.
pub const CHAIN_JOBS: [&str; 3] = ["bench_chain1", "bench_chain2", "bench_chain3"];
/// The barrier's members and the job it triggers.
pub const MEMBER_JOB: &str = "bench_member";
/// The job the barrier triggers once 10 members of a key have succeeded.
pub const JOIN_JOB: &str = "bench_join";
/// Members per barrier.
pub const MEMBERS: usize = 10;
/// The named pipe the marking job writes to, in the mesh's directory.
pub const STARTED_FIFO: &str = "started.fifo";

/// Time between two samples: each finds the mesh idle.
const PAUSE: Duration = Duration::from_millis(10);

/// Jobs for this scenario (`@DIR@`: the mesh's directory).
pub fn jobs_yaml() -> String {
    let [c1, c2, c3] = CHAIN_JOBS;
    format!(
        "  - name: {MARK_JOB}\n    command: \"echo $JOBZ_RUN_ID > @DIR@/{STARTED_FIFO}\"\n    delivery: queue\n    timeout: 30s\n  \
         - name: {c1}\n    command: \"true\"\n    delivery: queue\n    on_success: {c2}\n  \
         - name: {c2}\n    command: \"true\"\n    delivery: queue\n    on_success: {c3}\n  \
         - name: {c3}\n    command: \"true\"\n    delivery: queue\n  \
         - name: {MEMBER_JOB}\n    command: \"true\"\n    delivery: queue\n    params:\n      batch: {{ required: true }}\n  \
         - name: {JOIN_JOB}\n    command: \"true\"\n    delivery: queue\n    params:\n      batch: {{ required: true }}\n"
    )
}

/// The semaphores file of the mesh's `jobz-semaphore`: the 10 → 1 barrier.
pub fn semaphores_yaml() -> String {
    format!(
        "semaphores:\n  - name: bench_barrier\n    wait_for: [{{ job: {MEMBER_JOB}, count: {MEMBERS} }}]\n    key: \"{{batch}}\"\n    then: {JOIN_JOB}\n"
    )
}

/// What the scenario measured.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Latencies {
    /// One run: trigger → command started.
    pub started: Option<Summary>,
    /// One run: trigger → succeeded.
    pub succeeded: Option<Summary>,
    /// One run: trigger → `202` read.
    pub accepted: Option<Summary>,
    /// 3-step chain: trigger → last step succeeded.
    pub chain: Option<Summary>,
    /// 10 → 1 barrier: first trigger → the joining run succeeded.
    pub barrier: Option<Summary>,
    /// `&wait=`: the answer after the run's end.
    pub wait_delay: Option<Summary>,
    /// `&wait=`: trigger → answer.
    pub wait_answer: Option<Summary>,
}

/// The run id of a `202` or `200` answer to `/job_start`.
pub fn run_id_of(status: u16, body: &Value, expect: u16) -> anyhow::Result<String> {
    if status != expect {
        bail!("expected {expect}, got {status}: {body}");
    }
    body.get("run_id")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .with_context(|| format!("no run_id in {body}"))
}

/// `end - start`, or zero when `end` came first (the answer may beat the event).
pub fn after(start: Instant, end: Instant) -> Duration {
    end.saturating_duration_since(start)
}

impl Bench {
    /// Scenario 9 (see the module docs).
    pub fn idle_latency(&mut self) -> anyhow::Result<()> {
        let samples = self.config.latency_samples.max(1);
        let port = self.mesh.frontend_port;
        let (fifo, mut started) = FifoLines::start(&self.mesh.root().join(STARTED_FIFO))?;
        // The pipe stays open as long as the mesh: a late writer must never block.
        self.keep.push(Box::new(fifo));
        let jobs = [MARK_JOB, CHAIN_JOBS[2], JOIN_JOB, QUEUE_JOB];
        let (watch, mut events) = EventWatch::start(self.mesh.base_port, &jobs)?;
        // One connection for the single runs, one per barrier member; see `http::warmed`.
        let mut conns = crate::http::warmed(port, 1 + MEMBERS, HTTP_TIMEOUT)?;
        let mut members = conns.split_off(1);
        let mut conn = conns.pop().context("no connection")?;
        self.warm_up(&mut conn, &mut events)?;
        started.clear();
        let mut l = Latencies::default();

        eprintln!("bench: scenario 9: {samples} single runs, chains, barriers and waits");
        let (mut to_start, mut to_end, mut to_202) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..samples {
            let sent = Instant::now();
            let (status, body) = conn.get_json(&format!("/job_start?job_name={MARK_JOB}"))?;
            let answered = Instant::now();
            let run_id = run_id_of(status, &body, 202)?;
            let deadline = Instant::now() + ARRIVAL_TIMEOUT;
            let (began, _) = started
                .wait_for(deadline, |line| *line == run_id)
                .with_context(|| {
                    format!("run {run_id}'s command did not start within {ARRIVAL_TIMEOUT:?}")
                })?;
            let ended = succeeded_run(&mut events, MARK_JOB, &run_id)?;
            to_202.push(after(sent, answered));
            to_start.push(after(sent, began));
            to_end.push(after(sent, ended));
            std::thread::sleep(PAUSE);
        }
        l.started = stats::summarize(&to_start);
        l.succeeded = stats::summarize(&to_end);
        l.accepted = stats::summarize(&to_202);

        let mut chain = Vec::new();
        for _ in 0..samples {
            let sent = Instant::now();
            let (status, body) =
                conn.get_json(&format!("/job_start?job_name={}", CHAIN_JOBS[0]))?;
            let run_id = run_id_of(status, &body, 202)?;
            chain.push(after(
                sent,
                succeeded_run(&mut events, CHAIN_JOBS[2], &run_id)?,
            ));
            std::thread::sleep(PAUSE);
        }
        l.chain = stats::summarize(&chain);

        let mut barrier = Vec::new();
        let batch_prefix = jobz::new_id();
        for i in 0..samples {
            let batch = format!("{}-{i}", &batch_prefix[..8]);
            let sent = fire_together(
                &mut members,
                &format!("/job_start?job_name={MEMBER_JOB}&batch={batch}"),
            )?;
            let ended =
                succeeded_where(&mut events, &format!("{JOIN_JOB} of batch {batch}"), |c| {
                    c.job == JOIN_JOB && c.params.get("batch") == Some(&batch)
                })?;
            barrier.push(after(sent, ended));
            std::thread::sleep(PAUSE);
        }
        l.barrier = stats::summarize(&barrier);

        let (mut delays, mut answers) = (Vec::new(), Vec::new());
        for _ in 0..samples {
            let sent = Instant::now();
            let (status, body) =
                conn.get_json(&format!("/job_start?job_name={QUEUE_JOB}&wait=30"))?;
            let answered = Instant::now();
            let run_id = run_id_of(status, &body, 200)?;
            let ended = succeeded_run(&mut events, QUEUE_JOB, &run_id)?;
            delays.push(after(ended, answered));
            answers.push(after(sent, answered));
            std::thread::sleep(PAUSE);
        }
        l.wait_delay = stats::summarize(&delays);
        l.wait_answer = stats::summarize(&answers);
        drop(watch);

        self.finished_runs += samples * (2 + MEMBERS + 1) + 1;
        self.rows.extend(rows(&l, samples));
        self.figures.latencies = Some(l);
        Ok(())
    }

    /// One marked run until its completion event arrives: the subscription is in place
    /// (a subscriber misses what is published before it reaches the broker).
    fn warm_up(
        &mut self,
        conn: &mut Connection,
        events: &mut Arrivals<Completion>,
    ) -> anyhow::Result<()> {
        for _ in 0..20 {
            let (status, body) = conn.get_json(&format!("/job_start?job_name={MARK_JOB}"))?;
            let run_id = run_id_of(status, &body, 202)?;
            let deadline = Instant::now() + Duration::from_secs(2);
            if events.wait_for(deadline, |c| c.run_id == run_id).is_some() {
                events.clear();
                return Ok(());
            }
        }
        bail!("no completion event reached the bench's subscription in 20 runs")
    }
}

/// Waits for the completion of `job` in run `run_id`; it must have succeeded.
fn succeeded_run(
    events: &mut Arrivals<Completion>,
    job: &str,
    run_id: &str,
) -> anyhow::Result<Instant> {
    succeeded_where(events, &format!("{job} of run {run_id}"), |c| {
        c.job == job && c.run_id == run_id
    })
}

/// Waits for the completion event `wanted` picks; it must say succeeded.
fn succeeded_where(
    events: &mut Arrivals<Completion>,
    what: &str,
    wanted: impl Fn(&Completion) -> bool,
) -> anyhow::Result<Instant> {
    let deadline = Instant::now() + ARRIVAL_TIMEOUT;
    let (at, completion) = events
        .wait_for(deadline, wanted)
        .with_context(|| format!("no completion event for {what} within {ARRIVAL_TIMEOUT:?}"))?;
    if completion.state != TaskState::Succeeded {
        bail!("{what} ended {}: {completion:?}", completion.state);
    }
    Ok(at)
}

/// The same request on every connection at once (one thread each, released together);
/// returns when they were released. Every answer must be a `202`.
fn fire_together(conns: &mut [Connection], path: &str) -> anyhow::Result<Instant> {
    let gate = Barrier::new(conns.len() + 1);
    let (released, results): (Instant, Vec<anyhow::Result<()>>) = std::thread::scope(|scope| {
        let handles: Vec<_> = conns
            .iter_mut()
            .map(|conn| {
                let gate = &gate;
                scope.spawn(move || {
                    gate.wait();
                    let (status, body) = conn.get_json(path)?;
                    run_id_of(status, &body, 202).map(|_| ())
                })
            })
            .collect();
        let released = Instant::now();
        gate.wait();
        let results = handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a trigger thread panicked")))
            })
            .collect();
        (released, results)
    });
    for result in results {
        result?;
    }
    Ok(released)
}

/// `p50 / p99 (n)` of a series.
fn p50_p99(s: &Summary) -> String {
    format!(
        "{} / {} ({})",
        report::format(s.p50.as_secs_f64(), Unit::Time),
        report::format(s.p99.as_secs_f64(), Unit::Time),
        s.count
    )
}

/// The scenario's rows (their targets are held in the targets section).
pub fn rows(l: &Latencies, samples: usize) -> Vec<Row> {
    let mut rows = Vec::new();
    let mut push = |metric: &str, s: &Option<Summary>| {
        if let Some(s) = s {
            rows.push(Row::info(SCENARIO, metric, p50_p99(s)));
        }
    };
    push(
        "one run: trigger -> command started, p50 / p99 (n)",
        &l.started,
    );
    push(
        "one run: trigger -> succeeded (completion event), p50 / p99 (n)",
        &l.succeeded,
    );
    push("one run: trigger -> 202 read, p50 / p99 (n)", &l.accepted);
    push(
        "3-step chain: trigger -> third step succeeded, p50 / p99 (n)",
        &l.chain,
    );
    push(
        &format!(
            "{MEMBERS} -> 1 barrier: {MEMBERS} triggers -> joining run succeeded, p50 / p99 (n)"
        ),
        &l.barrier,
    );
    push(
        "&wait=30: answer after the run's end, p50 / p99 (n)",
        &l.wait_delay,
    );
    push("&wait=30: trigger -> answer, p50 / p99 (n)", &l.wait_answer);
    if rows.is_empty() {
        rows.push(Row::info(SCENARIO, "samples", samples.to_string()));
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_run_id_comes_from_the_expected_answer_only() {
        let body = json!({"run_id": "r1", "job": "j"});
        assert_eq!(run_id_of(202, &body, 202).unwrap(), "r1");
        assert!(run_id_of(200, &body, 202).is_err());
        assert!(run_id_of(202, &json!({"job": "j"}), 202).is_err());
    }

    #[test]
    fn an_answer_before_the_event_counts_as_no_delay() {
        let t = Instant::now();
        assert_eq!(
            after(t, t + Duration::from_millis(3)),
            Duration::from_millis(3)
        );
        assert_eq!(after(t + Duration::from_millis(3), t), Duration::ZERO);
    }

    #[test]
    fn the_jobs_and_the_barrier_parse_as_the_mesh_will_read_them() {
        use jobz::jobfile::{parse_job_file, Delivery};
        let yaml = format!("jobs:\n{}", jobs_yaml()).replace("@DIR@", "/tmp/x");
        let set = parse_job_file(std::path::Path::new("bench.yaml"), &yaml).unwrap();
        let mark = &set.jobs[MARK_JOB];
        assert_eq!(mark.command, "echo $JOBZ_RUN_ID > /tmp/x/started.fifo");
        assert_eq!(set.jobs[CHAIN_JOBS[0]].on_success, [CHAIN_JOBS[1]]);
        assert_eq!(set.jobs[CHAIN_JOBS[1]].on_success, [CHAIN_JOBS[2]]);
        for job in [MEMBER_JOB, JOIN_JOB] {
            assert_eq!(set.jobs[job].delivery, Delivery::Queue);
            assert!(set.jobs[job].params.contains_key("batch"), "{job}");
        }
        let semaphores =
            parse_job_file(std::path::Path::new("s.yaml"), &semaphores_yaml()).unwrap();
        assert_eq!(semaphores.semaphores.len(), 1);
    }

    #[test]
    fn rows_show_p50_p99_and_the_count() {
        let s = stats::summarize(&[Duration::from_micros(1500), Duration::from_millis(4)]);
        let l = Latencies {
            started: s,
            ..Latencies::default()
        };
        let rows = rows(&l, 2);
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].value, "1.5 ms / 4.0 ms (2)");
        assert_eq!(rows[0].met, None);
    }
}
