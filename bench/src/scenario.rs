//! The scenarios, each bounded in count and time, each adding rows to the table:
//!
//! 1. trigger acceptance: a burst of `GET /job_start` from several client threads;
//! 2. end to end: the same runs until every one has ended, plus sequential runs on an idle
//!    mesh for the latency without a queue;
//! 3. broadcast fan-out: runs of a job every worker takes;
//! 4. idle cost: resident memory and the CPU each process burns doing nothing;
//! 5. broker restart: stop, start, time to `/healthz` 200 with the finished runs stored;
//! 8. throughput over kept-alive connections: the runs/s the targets compare with Celery,
//!    and the CPU each process (children included) spends per run.
//!
//! Scenarios 9 (`latency`) and 10 (`drain`) are methods of [`Bench`] too, in their own
//! modules.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::Value;

use crate::drain::Drain;
use crate::http;
use crate::latency::Latencies;
use crate::mesh::{Mesh, HTTP_TIMEOUT};
use crate::procfs::{self, CpuTicks};
use crate::report::{self, Row, Target, Unit};
use crate::stats::{self, Summary};
use crate::targets;
use crate::Config;

/// The queue job of scenarios 1 and 2.
pub const QUEUE_JOB: &str = "bench_queue";
/// The broadcast job of scenario 3.
pub const BROADCAST_JOB: &str = "bench_broadcast";

/// The job file every worker loads (`@DIR@`: the mesh's directory).
pub fn jobs_yaml() -> String {
    format!(
        "jobs:\n  \
         - name: {QUEUE_JOB}\n    command: \"true\"\n    delivery: queue\n  \
         - name: {BROADCAST_JOB}\n    command: \"true\"\n    delivery: broadcast\n{}{}",
        crate::latency::jobs_yaml(),
        crate::drain::jobs_yaml()
    )
}

/// What a burst of triggers gave.
#[derive(Debug, Default)]
pub struct Burst {
    /// Run ids of the `202`s.
    pub run_ids: Vec<String>,
    /// Time to each `202`, request sent to response read.
    pub latencies: Vec<Duration>,
    /// Other answers and failures, by kind.
    pub errors: BTreeMap<String, usize>,
    /// From the first request to the last answer.
    pub wall: Duration,
}

impl Burst {
    /// `accepted / asked`, with the errors if any.
    pub fn outcome(&self, asked: usize) -> String {
        let mut text = format!("{} / {asked}", self.run_ids.len());
        if !self.errors.is_empty() {
            let errors: Vec<String> = self
                .errors
                .iter()
                .map(|(kind, n)| format!("{kind} x{n}"))
                .collect();
            text.push_str(&format!(" ({})", errors.join(", ")));
        }
        text
    }
}

/// `count` triggers of `job` from `clients` threads, each request on its own connection
/// or, with `keep_alive`, each thread's requests on one kept-alive connection (opened
/// before the clock starts). Requests stop being sent at `deadline`.
pub fn trigger_burst(
    port: u16,
    job: &str,
    count: usize,
    clients: usize,
    deadline: Instant,
    keep_alive: bool,
) -> Burst {
    let next = AtomicUsize::new(0);
    let path = format!("/job_start?job_name={job}");
    let clients = clients.max(1);
    let mut merged = Burst::default();
    let mut conns: Vec<Option<http::Connection>> = if keep_alive {
        match http::warmed(port, clients, HTTP_TIMEOUT) {
            Ok(conns) => conns.into_iter().map(Some).collect(),
            Err(e) => {
                merged.errors.insert(format!("{e:#}"), count);
                return merged;
            }
        }
    } else {
        (0..clients).map(|_| None).collect()
    };
    let merged = Mutex::new(merged);
    let gate = std::sync::Barrier::new(clients + 1);
    let mut started = Instant::now();
    std::thread::scope(|scope| {
        for conn in conns.iter_mut() {
            let (next, merged, gate, path) = (&next, &merged, &gate, &path);
            scope.spawn(move || {
                let mut mine = Burst::default();
                gate.wait();
                while next.fetch_add(1, Ordering::Relaxed) < count && Instant::now() < deadline {
                    let sent = Instant::now();
                    let answer = match conn.as_mut() {
                        Some(conn) => conn.get(path),
                        None => http::get(port, path, HTTP_TIMEOUT),
                    };
                    let took = sent.elapsed();
                    let kind = match answer {
                        Ok(r) if r.status == 202 => {
                            match r
                                .json()
                                .ok()
                                .as_ref()
                                .and_then(|v| v.get("run_id"))
                                .and_then(Value::as_str)
                            {
                                Some(id) => {
                                    mine.run_ids.push(id.to_owned());
                                    mine.latencies.push(took);
                                    continue;
                                }
                                None => String::from("202 without run_id"),
                            }
                        }
                        Ok(r) => format!("HTTP {}", r.status),
                        Err(e) => format!("{:?}", e.kind()),
                    };
                    *mine.errors.entry(kind).or_default() += 1;
                }
                let mut all = merged.lock().unwrap_or_else(|e| e.into_inner());
                all.run_ids.append(&mut mine.run_ids);
                all.latencies.append(&mut mine.latencies);
                for (kind, n) in mine.errors {
                    *all.errors.entry(kind).or_default() += n;
                }
            });
        }
        gate.wait();
        started = Instant::now();
    });
    let mut burst = merged.into_inner().unwrap_or_else(|e| e.into_inner());
    burst.wall = started.elapsed();
    burst
}

/// Polls `/runs?job=J&state=pending|running&limit=1` every 200 ms until neither has a
/// run (every accepted run has ended); returns when that was seen.
pub fn wait_all_ended(mesh: &Mesh, job: &str, deadline: Instant) -> anyhow::Result<Instant> {
    loop {
        let mut open = false;
        for state in ["pending", "running"] {
            let path = format!("/runs?job={job}&state={state}&limit=1");
            let (status, body) = mesh.get_json(&path)?;
            if status != 200 {
                bail!("GET {path}: {status} {body}");
            }
            let runs = body.get("runs").and_then(Value::as_array);
            open |= runs.is_some_and(|r| !r.is_empty());
        }
        let now = Instant::now();
        if !open {
            return Ok(now);
        }
        if now >= deadline {
            bail!("runs of {job} still pending or running at the deadline");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// What the bench needs of a finished run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunFacts {
    /// `succeeded`, `failed`, …
    pub state: String,
    /// Broker time of the trigger, epoch ms.
    pub created_ms: i64,
    /// Broker time of the end, epoch ms.
    pub finished_ms: Option<i64>,
    /// Tasks of the run.
    pub tasks: usize,
}

impl RunFacts {
    fn from_json(run: &Value) -> anyhow::Result<RunFacts> {
        let text = |key: &str| run.get(key).and_then(Value::as_str);
        let created_ms = text("created_at")
            .and_then(stats::parse_time_ms)
            .with_context(|| format!("no created_at in {run}"))?;
        Ok(RunFacts {
            state: text("state").unwrap_or("").to_owned(),
            created_ms,
            finished_ms: text("finished_at").and_then(stats::parse_time_ms),
            tasks: run
                .get("steps")
                .and_then(Value::as_array)
                .map_or(0, Vec::len),
        })
    }
}

/// `GET /runs/{id}` for every id, from `threads` threads (one kept-alive connection each).
pub fn fetch_runs(mesh: &Mesh, ids: &[String], threads: usize) -> anyhow::Result<Vec<RunFacts>> {
    let chunk = ids.len().div_ceil(threads.max(1)).max(1);
    let conns = http::warmed(mesh.frontend_port, ids.chunks(chunk).len(), HTTP_TIMEOUT)?;
    let results: Vec<anyhow::Result<Vec<RunFacts>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = ids
            .chunks(chunk)
            .zip(conns)
            .map(|(part, mut conn)| {
                scope.spawn(move || {
                    part.iter()
                        .map(|id| {
                            let (status, run) = conn.get_json(&format!("/runs/{id}"))?;
                            if status != 200 {
                                bail!("GET /runs/{id}: {status} {run}");
                            }
                            RunFacts::from_json(&run)
                        })
                        .collect()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a fetch thread panicked")))
            })
            .collect()
    });
    let mut all = Vec::with_capacity(ids.len());
    for part in results {
        all.extend(part?);
    }
    Ok(all)
}

/// How a set of runs went, by the broker's clock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Runs that succeeded.
    pub succeeded: usize,
    /// Runs in any other state.
    pub other: BTreeMap<String, usize>,
    /// From the first run's trigger to the last run's end.
    pub span: Duration,
    /// Trigger to end of each succeeded run.
    pub latency: Option<Summary>,
    /// Tasks of all runs.
    pub tasks: usize,
    /// Fewest tasks in one run.
    pub min_tasks: usize,
    /// Median latency of the first and of the last quarter of the succeeded runs, in
    /// trigger order: whether old runs are served first (FIFO: the first quarter is
    /// faster under a growing backlog) or overtaken by new ones.
    pub quarters_p50: Option<(Duration, Duration)>,
}

/// Sums up fetched runs.
pub fn outcome(runs: &[RunFacts]) -> Outcome {
    let mut other = BTreeMap::new();
    let mut by_trigger = Vec::new();
    for run in runs {
        match (run.state.as_str(), run.finished_ms) {
            ("succeeded", Some(end)) => {
                by_trigger.push((run.created_ms, stats::span_ms(run.created_ms, end)))
            }
            (state, _) => *other.entry(state.to_owned()).or_insert(0) += 1,
        }
    }
    by_trigger.sort();
    let latencies: Vec<Duration> = by_trigger.iter().map(|(_, l)| *l).collect();
    let quarter = latencies.len() / 4;
    let quarters_p50 = (quarter > 0)
        .then(|| {
            let first = stats::summarize(&latencies[..quarter])?.p50;
            let last = stats::summarize(&latencies[latencies.len() - quarter..])?.p50;
            Some((first, last))
        })
        .flatten();
    let first = runs.iter().map(|r| r.created_ms).min();
    let last = runs.iter().filter_map(|r| r.finished_ms).max();
    Outcome {
        succeeded: latencies.len(),
        other,
        span: match (first, last) {
            (Some(a), Some(b)) => stats::span_ms(a, b),
            _ => Duration::ZERO,
        },
        latency: stats::summarize(&latencies),
        tasks: runs.iter().map(|r| r.tasks).sum(),
        min_tasks: runs.iter().map(|r| r.tasks).min().unwrap_or(0),
        quarters_p50,
    }
}

/// CPU ticks of every process of the mesh, by name.
pub fn cpu_snapshot(mesh: &Mesh) -> anyhow::Result<Vec<(String, CpuTicks)>> {
    mesh.pids()
        .into_iter()
        .map(|(name, pid)| Ok((name, procfs::cpu_ticks(pid)?)))
        .collect()
}

/// Ticks each process used between two snapshots.
pub fn cpu_delta(
    before: &[(String, CpuTicks)],
    after: &[(String, CpuTicks)],
) -> Vec<(String, CpuTicks)> {
    after
        .iter()
        .filter_map(|(name, a)| {
            let b = before.iter().find(|(n, _)| n == name)?.1;
            Some((name.clone(), a.since(b)))
        })
        .collect()
}

/// Splits per-process figures into broker, frontend and the workers (the semaphore, which
/// only listens to the barrier's events, is none of them).
fn by_role<T: Copy>(figures: &[(String, T)]) -> (Option<T>, Option<T>, Vec<T>) {
    let find = |role: &str| figures.iter().find(|(n, _)| n == role).map(|(_, v)| *v);
    let workers = figures
        .iter()
        .filter(|(n, _)| !["broker", "frontend", crate::mesh::SEMAPHORE].contains(&n.as_str()))
        .map(|(_, v)| *v)
        .collect();
    (find("broker"), find("frontend"), workers)
}

/// CPU per run of each kind of process, in ms, from the ticks each used over some runs.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CpuPerRun {
    /// The broker.
    pub broker_ms: f64,
    /// Share of the broker's in the kernel.
    pub broker_system: f64,
    /// The frontend.
    pub frontend_ms: f64,
    /// The worker processes themselves.
    pub workers_ms: f64,
    /// Share of the workers' in the kernel (fsync, fork).
    pub workers_system: f64,
    /// The workers' children: the step supervisor and the commands it started.
    pub children_ms: f64,
}

impl CpuPerRun {
    /// From the ticks each process used (see [`cpu_delta`]) over `runs` runs.
    pub fn from_delta(delta: &[(String, CpuTicks)], hz: u64, runs: usize) -> CpuPerRun {
        let (broker, frontend, workers) = by_role(delta);
        let ms = |ticks: u64| {
            procfs::ticks_to_duration(ticks, hz).as_secs_f64() * 1e3 / runs.max(1) as f64
        };
        let share = |part: u64, whole: u64| part as f64 / whole.max(1) as f64;
        let broker = broker.unwrap_or_default();
        let own: u64 = workers.iter().map(|t| t.own).sum();
        let system: u64 = workers.iter().map(|t| t.system).sum();
        CpuPerRun {
            broker_ms: ms(broker.own),
            broker_system: share(broker.system, broker.own),
            frontend_ms: ms(frontend.unwrap_or_default().own),
            workers_ms: ms(own),
            workers_system: share(system, own),
            children_ms: ms(workers.iter().map(|t| t.children).sum()),
        }
    }

    /// All of it.
    pub fn total_ms(&self) -> f64 {
        self.as_array().iter().sum()
    }

    /// Broker, frontend, workers, workers' children.
    pub fn as_array(&self) -> [f64; 4] {
        [
            self.broker_ms,
            self.frontend_ms,
            self.workers_ms,
            self.children_ms,
        ]
    }

    /// `0.67 / 0.34 / 1.82 / 2.74 ms`: broker / frontend / workers / their children.
    pub fn split_ms(&self) -> String {
        format!(
            "{:.2} / {:.2} / {:.2} / {:.2} ms",
            self.broker_ms, self.frontend_ms, self.workers_ms, self.children_ms
        )
    }

    /// One row per kind of process, and the total, under `scenario`; `what` says over
    /// which runs (`while draining`).
    pub fn rows(&self, scenario: &str, what: &str) -> Vec<Row> {
        let row = |who: &str, value: String| {
            Row::info(scenario, &format!("CPU per run{what}: {who}"), value)
        };
        vec![
            row(
                "broker",
                format!(
                    "{:.2} ms ({:.0}% system)",
                    self.broker_ms,
                    self.broker_system * 100.0
                ),
            ),
            row("frontend", format!("{:.2} ms", self.frontend_ms)),
            row(
                "workers",
                format!(
                    "{:.2} ms ({:.0}% system)",
                    self.workers_ms,
                    self.workers_system * 100.0
                ),
            ),
            row(
                "workers' children (step supervisor, sh)",
                format!("{:.2} ms", self.children_ms),
            ),
            row("all of these", format!("{:.2} ms", self.total_ms())),
        ]
    }
}

/// Scenario 8's figures.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Throughput {
    /// Runs that succeeded.
    pub runs: usize,
    /// Runs ended per second, first trigger to last end.
    pub runs_per_sec: f64,
    /// `202`s per second while triggering.
    pub accepted_per_sec: f64,
    /// CPU per run of each process while triggering and running them.
    pub cpu: CpuPerRun,
}

/// A burst and every run it made, to its end.
struct BurstRun {
    burst: Burst,
    /// Just before the first trigger.
    started: Instant,
    /// When every run was seen ended.
    ended: Instant,
    outcome: Outcome,
    /// CPU ticks of each process from the first trigger to the last end.
    cpu: Vec<(String, CpuTicks)>,
    /// The bench's own CPU while triggering.
    bench_cpu: CpuTicks,
}

/// The figures measured on one mesh, as numbers: scenario 6 compares a plain and a sealed
/// mesh on them, and the targets section judges the plain one's.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Figures {
    /// Scenario 1: `202`s per second.
    pub accepted_per_sec: Option<f64>,
    /// Scenario 2: runs ended per second under the burst.
    pub runs_per_sec: Option<f64>,
    /// Scenario 2: runs succeeded of runs accepted.
    pub runs_succeeded: Option<(usize, usize)>,
    /// Scenario 2: trigger→succeeded p50 of one run at a time on the idle mesh.
    pub single_run_p50: Option<Duration>,
    /// Scenario 2: CPU milliseconds per run: broker, frontend, workers, workers' children.
    pub cpu_ms_per_run: Option<[f64; 4]>,
    /// Scenario 3: broadcast tasks ended per second.
    pub broadcast_tasks_per_sec: Option<f64>,
    /// Scenario 3: runs succeeded of runs asked.
    pub broadcast_succeeded: Option<(usize, usize)>,
    /// Scenario 5: broker start → `/healthz` 200.
    pub restart_healthy: Option<Duration>,
    /// Scenario 4: RSS (KiB) of the idle, fresh broker, frontend and worker (the largest).
    pub rss_idle_kib: Option<[f64; 3]>,
    /// Scenario 4: CPU seconds per 10 s of the idle, fresh broker, frontend and worker
    /// (the busiest).
    pub idle_cpu_per_10s: Option<[f64; 3]>,
    /// Scenario 8: throughput over kept-alive connections.
    pub keepalive: Option<Throughput>,
    /// Scenario 9: latencies on the idle mesh.
    pub latencies: Option<Latencies>,
    /// Scenario 10: the backlog drain.
    pub drain: Option<Drain>,
}

/// The bench: a mesh, the settings, and the rows measured so far.
pub struct Bench {
    /// The mesh under test.
    pub mesh: Mesh,
    /// The settings.
    pub config: Config,
    /// The table so far.
    pub rows: Vec<Row>,
    /// Ticks per CPU second.
    pub hz: u64,
    /// Finished runs stored by the broker so far.
    pub finished_runs: usize,
    /// The figures measured, as numbers.
    pub figures: Figures,
    /// What must stay open as long as the mesh runs (named pipes its commands write to).
    pub keep: Vec<Box<dyn std::any::Any>>,
}

impl Bench {
    /// When the current scenario must have ended.
    pub fn deadline(&self) -> Instant {
        Instant::now() + self.config.scenario_timeout
    }

    fn cpu_secs(&self, ticks: u64) -> f64 {
        procfs::ticks_to_duration(ticks, self.hz).as_secs_f64()
    }

    /// Scenario 4, memory half: resident memory of every process now, each held to its
    /// target if given; returns broker, frontend and the largest worker, in KiB.
    pub fn rss_rows(&mut self, when: &str, limits: Option<[f64; 3]>) -> anyhow::Result<[f64; 3]> {
        let rss: Vec<(String, u64)> = self
            .mesh
            .pids()
            .into_iter()
            .map(|(name, pid)| Ok((name, procfs::rss_kib(pid)?)))
            .collect::<anyhow::Result<_>>()?;
        let (broker, frontend, workers) = by_role(&rss);
        let s = "4 idle cost";
        let n = workers.len();
        let figures = [
            broker.unwrap_or(0) as f64,
            frontend.unwrap_or(0) as f64,
            workers.iter().max().copied().unwrap_or(0) as f64,
        ];
        let metrics = [
            format!("broker RSS, {when}"),
            format!("frontend RSS, {when}"),
            format!("worker RSS (max of {n}), {when}"),
        ];
        for (i, metric) in metrics.iter().enumerate() {
            let target = limits.map_or(Target::None, |l| Target::AtMost(l[i]));
            self.rows
                .push(Row::figure(s, metric, figures[i], Unit::MiB, target));
        }
        let threads: Vec<(String, u64)> = self
            .mesh
            .pids()
            .into_iter()
            .map(|(name, pid)| Ok((name, procfs::threads(pid)?)))
            .collect::<anyhow::Result<_>>()?;
        let (broker, frontend, workers) = by_role(&threads);
        let show = |n: Option<u64>| n.map_or(String::from("?"), |n| n.to_string());
        self.rows.push(Row::info(
            s,
            &format!("threads, {when}"),
            format!(
                "broker {}, frontend {}, worker {} (max)",
                show(broker),
                show(frontend),
                show(workers.iter().max().copied())
            ),
        ));
        Ok(figures)
    }

    /// Scenario 4, CPU half: CPU seconds each process uses while the mesh sits idle for
    /// the configured window (nothing is sent to it meanwhile), held to the idle target if
    /// `judged`; returns broker, frontend and the busiest worker, per 10 s.
    pub fn idle_cpu_rows(&mut self, when: &str, judged: bool) -> anyhow::Result<[f64; 3]> {
        let window = self.config.idle;
        let switches = |mesh: &Mesh| -> anyhow::Result<Vec<(String, procfs::Switches)>> {
            mesh.pids()
                .into_iter()
                .map(|(name, pid)| Ok((name, procfs::context_switches(pid)?)))
                .collect()
        };
        let before = cpu_snapshot(&self.mesh)?;
        let switches_before = switches(&self.mesh)?;
        std::thread::sleep(window);
        let after = cpu_snapshot(&self.mesh)?;
        let switches_after = switches(&self.mesh)?;
        let delta = cpu_delta(&before, &after);
        let own: Vec<(String, u64)> = delta.iter().map(|(n, t)| (n.clone(), t.own)).collect();
        let (broker, frontend, workers) = by_role(&own);
        // The target is per 10 s of idling; scale it to the window.
        let target = if judged {
            Target::AtMost(targets::IDLE_CPU_PER_10S * window.as_secs_f64() / 10.0)
        } else {
            Target::None
        };
        let s = "4 idle cost";
        let secs = window.as_secs_f64();
        let per_10s = |t: Option<u64>| t.map_or(0.0, |t| self.cpu_secs(t) * 10.0 / secs.max(1e-3));
        let figures = [
            per_10s(broker),
            per_10s(frontend),
            per_10s(workers.iter().max().copied()),
        ];
        if let Some(t) = broker {
            let metric = format!("broker CPU in {secs:.0} s idle, {when}");
            self.rows.push(Row::figure(
                s,
                &metric,
                self.cpu_secs(t),
                Unit::CpuSec,
                target,
            ));
        }
        if let Some(t) = frontend {
            let metric = format!("frontend CPU in {secs:.0} s idle, {when}");
            self.rows.push(Row::figure(
                s,
                &metric,
                self.cpu_secs(t),
                Unit::CpuSec,
                target,
            ));
        }
        if let Some(t) = workers.iter().max() {
            let n = workers.len();
            let metric = format!("worker CPU in {secs:.0} s idle (max of {n}), {when}");
            self.rows.push(Row::figure(
                s,
                &metric,
                self.cpu_secs(*t),
                Unit::CpuSec,
                target,
            ));
        }
        // Wake-ups: what the CPU ticks are made of.
        let woke: Vec<(String, u64)> = switches_after
            .iter()
            .filter_map(|(name, a)| {
                let b = &switches_before.iter().find(|(n, _)| n == name)?.1;
                Some((name.clone(), a.since(b)))
            })
            .collect();
        let (broker, frontend, workers) = by_role(&woke);
        let per_sec = |n: Option<u64>| n.map_or(0.0, |n| n as f64 / secs);
        self.rows.push(Row::info(
            s,
            &format!("thread wake-ups/s idle, {when}"),
            format!(
                "broker {:.0}, frontend {:.0}, worker {:.0} (max)",
                per_sec(broker),
                per_sec(frontend),
                per_sec(workers.iter().max().copied())
            ),
        ));
        Ok(figures)
    }

    /// Sequential runs on an idle mesh with `&wait=`: the pipeline's latency without a
    /// queue in front of it (part of scenario 2).
    pub fn unloaded_latency(&mut self) -> anyhow::Result<()> {
        let count = self.config.sequential_runs;
        let deadline = self.deadline();
        let mut latencies = Vec::with_capacity(count);
        let mut http_latencies = Vec::with_capacity(count);
        for _ in 0..count {
            if Instant::now() >= deadline {
                bail!(
                    "sequential runs: deadline passed after {} runs",
                    latencies.len()
                );
            }
            let path = format!("/job_start?job_name={QUEUE_JOB}&wait=30");
            let sent = Instant::now();
            let (status, run) = self.mesh.get_json(&path)?;
            http_latencies.push(sent.elapsed());
            if status != 200 {
                bail!("GET {path}: {status} {run}");
            }
            let facts = RunFacts::from_json(&run)?;
            match (facts.state.as_str(), facts.finished_ms) {
                ("succeeded", Some(end)) => latencies.push(stats::span_ms(facts.created_ms, end)),
                _ => bail!("a sequential run did not succeed: {run}"),
            }
        }
        self.finished_runs += count;
        let s = "2 end-to-end";
        if let Some(l) = stats::summarize(&latencies) {
            self.figures.single_run_p50 = Some(l.p50);
            // Broker clock, in ms: scenario 9 times it exactly, and the targets judge that.
            let metric =
                format!("idle mesh, 1 run at a time ({count}): created->finished p50 (run record)");
            self.rows.push(Row::time(s, &metric, l.p50, Target::None));
        }
        if let Some(h) = stats::summarize(&http_latencies) {
            let metric = "idle mesh: job_start&wait= answered, p50";
            self.rows.push(Row::time(s, metric, h.p50, Target::None));
        }
        Ok(())
    }

    /// A burst of `count` triggers of `job` from the configured clients, then every run
    /// to its end, with the CPU every process used meanwhile.
    fn burst_to_end(
        &mut self,
        job: &str,
        count: usize,
        keep_alive: bool,
    ) -> anyhow::Result<BurstRun> {
        let clients = self.config.clients;
        let cpu_before = cpu_snapshot(&self.mesh)?;
        let bench_before = procfs::cpu_ticks(std::process::id())?;
        let started = Instant::now();
        let how = if keep_alive {
            "kept-alive connections"
        } else {
            "a connection per request"
        };
        eprintln!("bench: {count} triggers of {job} from {clients} clients, {how}");
        let burst = trigger_burst(
            self.mesh.frontend_port,
            job,
            count,
            clients,
            self.deadline(),
            keep_alive,
        );
        let bench_cpu = procfs::cpu_ticks(std::process::id())?.since(bench_before);
        eprintln!("bench: waiting for {} runs to end", burst.run_ids.len());
        let ended = wait_all_ended(&self.mesh, job, self.deadline())?;
        let cpu = cpu_delta(&cpu_before, &cpu_snapshot(&self.mesh)?);
        let runs = fetch_runs(&self.mesh, &burst.run_ids, 4)?;
        self.finished_runs += runs.len();
        Ok(BurstRun {
            outcome: outcome(&runs),
            burst,
            started,
            ended,
            cpu,
            bench_cpu,
        })
    }

    /// Rows saying how many of a burst's runs succeeded (`all` is the target).
    fn succeeded_row(scenario: &str, run: &BurstRun) -> Row {
        let o = &run.outcome;
        let mut text = format!("{} / {}", o.succeeded, run.burst.run_ids.len());
        for (state, n) in &o.other {
            text.push_str(&format!(" ({state} x{n})"));
        }
        Row {
            met: Some(o.succeeded == run.burst.run_ids.len()),
            target: String::from("all"),
            ..Row::info(scenario, "runs succeeded", text)
        }
    }

    /// Scenarios 1 and 2: a burst of triggers of the queue job, then every run to its end.
    /// Memory is sampled once every run has ended.
    pub fn queue_burst(&mut self) -> anyhow::Result<()> {
        let count = self.config.runs;
        let clients = self.config.clients;
        let run = self.burst_to_end(QUEUE_JOB, count, false)?;
        let (burst, started, ended) = (&run.burst, run.started, run.ended);
        let bench_burst = run.bench_cpu;

        let s = "1 trigger";
        self.rows.push(Row {
            met: Some(burst.run_ids.len() == count),
            target: String::from("all"),
            ..Row::info(s, "202 Accepted", burst.outcome(count))
        });
        let rate = stats::rate(burst.run_ids.len(), burst.wall);
        self.figures.accepted_per_sec = Some(rate);
        self.rows.push(Row::figure(
            s,
            "accepted/s",
            rate,
            Unit::PerSec,
            Target::AtLeast(targets::ACCEPTED_PER_SEC),
        ));
        if let Some(l) = stats::summarize(&burst.latencies) {
            self.rows.push(Row::time(
                s,
                "202 latency p50",
                l.p50,
                Target::AtMost(targets::ACCEPT_P50),
            ));
            self.rows.push(Row::time(
                s,
                "202 latency p99",
                l.p99,
                Target::AtMost(targets::ACCEPT_P99),
            ));
            self.rows
                .push(Row::time(s, "202 latency max", l.max, Target::None));
        }
        self.rows.push(Row::figure(
            s,
            &format!("CPU of the bench's {clients} client threads"),
            self.cpu_secs(bench_burst.own),
            Unit::CpuSec,
            Target::None,
        ));

        self.rss_rows(
            "after scenario 2",
            Some([
                targets::RSS_LOADED_BROKER_KIB,
                targets::RSS_LOADED_FRONTEND_KIB,
                targets::RSS_LOADED_WORKER_KIB,
            ]),
        )?;
        let o = &run.outcome;

        let s = "2 end-to-end";
        self.rows.push(Bench::succeeded_row(s, &run));
        let rate = stats::rate(o.succeeded, o.span);
        self.figures.runs_per_sec = Some(rate);
        self.figures.runs_succeeded = Some((o.succeeded, burst.run_ids.len()));
        self.rows.push(Row::figure(
            s,
            "runs/s (first trigger -> last end, broker clock)",
            rate,
            Unit::PerSec,
            Target::AtLeast(targets::RUNS_PER_SEC),
        ));
        if let Some(l) = o.latency {
            self.rows.push(Row::time(
                s,
                "trigger->succeeded p50 (burst: mostly queueing)",
                l.p50,
                Target::None,
            ));
            self.rows.push(Row::time(
                s,
                "trigger->succeeded p99 (burst: mostly queueing)",
                l.p99,
                Target::None,
            ));
        }
        if let Some((first, last)) = o.quarters_p50 {
            self.rows.push(Row::info(
                s,
                "trigger->succeeded p50, first / last quarter triggered",
                format!(
                    "{} / {}",
                    report::format(first.as_secs_f64(), Unit::Time),
                    report::format(last.as_secs_f64(), Unit::Time)
                ),
            ));
        }
        self.rows.push(Row::time(
            s,
            "first request -> all seen ended (bench clock)",
            ended - started,
            Target::None,
        ));

        // Where the CPU went during scenarios 1 and 2.
        let per_run = CpuPerRun::from_delta(&run.cpu, self.hz, o.succeeded);
        self.figures.cpu_ms_per_run = Some(per_run.as_array());
        self.rows.extend(per_run.rows(s, ""));
        Ok(())
    }

    /// Scenario 8: a burst over kept-alive connections, every run to its end: the
    /// throughput the targets compare with Celery, and the CPU per run of each process,
    /// its children included.
    pub fn keepalive_throughput(&mut self) -> anyhow::Result<()> {
        let count = self.config.keepalive_runs;
        let clients = self.config.clients;
        let run = self.burst_to_end(QUEUE_JOB, count, true)?;
        let s = "8 keep-alive";
        let burst = &run.burst;
        self.rows.push(Row {
            met: Some(burst.run_ids.len() == count),
            target: String::from("all"),
            ..Row::info(s, "202 Accepted", burst.outcome(count))
        });
        let accepted = stats::rate(burst.run_ids.len(), burst.wall);
        self.rows.push(Row::figure(
            s,
            &format!("accepted/s ({clients} kept-alive connections)"),
            accepted,
            Unit::PerSec,
            Target::None,
        ));
        self.rows.push(Bench::succeeded_row(s, &run));
        let o = &run.outcome;
        let runs_per_sec = stats::rate(o.succeeded, o.span);
        self.rows.push(Row::figure(
            s,
            "runs/s (first trigger -> last end, broker clock)",
            runs_per_sec,
            Unit::PerSec,
            Target::None,
        ));
        if let Some(l) = o.latency {
            self.rows.push(Row::info(
                s,
                "trigger->succeeded p50 / p99 (burst: mostly queueing)",
                format!(
                    "{} / {}",
                    report::format(l.p50.as_secs_f64(), Unit::Time),
                    report::format(l.p99.as_secs_f64(), Unit::Time)
                ),
            ));
        }
        let cpu = CpuPerRun::from_delta(&run.cpu, self.hz, o.succeeded);
        self.rows.extend(cpu.rows(s, ""));
        let bench_ms = self.cpu_secs(run.bench_cpu.own) * 1e3 / o.succeeded.max(1) as f64;
        self.rows.push(Row::info(
            s,
            "CPU per run, the bench's client threads",
            format!("{bench_ms:.2} ms"),
        ));
        self.figures.keepalive = Some(Throughput {
            runs: o.succeeded,
            runs_per_sec,
            accepted_per_sec: accepted,
            cpu,
        });
        Ok(())
    }

    /// Scenario 3: runs of a job every worker takes, triggered over kept-alive
    /// connections.
    pub fn broadcast(&mut self) -> anyhow::Result<()> {
        let count = self.config.broadcast_runs;
        let workers = self.mesh.worker_names().len();
        eprintln!("bench: scenario 3: {count} broadcast runs on {workers} workers");
        let burst = trigger_burst(
            self.mesh.frontend_port,
            BROADCAST_JOB,
            count,
            self.config.clients,
            self.deadline(),
            true,
        );
        let s = "3 broadcast";
        if burst.run_ids.len() != count {
            self.rows.push(Row {
                met: Some(false),
                target: String::from("all"),
                ..Row::info(s, "202 Accepted", burst.outcome(count))
            });
        }
        wait_all_ended(&self.mesh, BROADCAST_JOB, self.deadline())?;
        let runs = fetch_runs(&self.mesh, &burst.run_ids, 4)?;
        self.finished_runs += runs.len();
        let o = outcome(&runs);
        let mut text = format!("{} / {}", o.succeeded, burst.run_ids.len());
        for (state, n) in &o.other {
            text.push_str(&format!(" ({state} x{n})"));
        }
        self.rows.push(Row {
            met: Some(o.succeeded == count),
            target: String::from("all"),
            ..Row::info(s, "runs succeeded", text)
        });
        self.rows.push(Row {
            met: Some(o.min_tasks == workers),
            target: format!("{workers} per run"),
            ..Row::info(
                s,
                "tasks",
                format!("{} (fewest in a run: {})", o.tasks, o.min_tasks),
            )
        });
        let rate = stats::rate(o.tasks, o.span);
        self.figures.broadcast_tasks_per_sec = Some(rate);
        self.figures.broadcast_succeeded = Some((o.succeeded, count));
        self.rows.push(Row::figure(
            s,
            "tasks/s (first trigger -> last end, broker clock)",
            rate,
            Unit::PerSec,
            Target::None,
        ));
        if let Some(l) = o.latency {
            self.rows
                .push(Row::time(s, "trigger->succeeded p50", l.p50, Target::None));
            self.rows
                .push(Row::time(s, "trigger->succeeded p99", l.p99, Target::None));
        }
        Ok(())
    }

    /// Scenario 5: SIGTERM the broker, start it again on the same state, and time the
    /// way back.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        let s = "5 restart";
        eprintln!(
            "bench: scenario 5: restarting the broker with {} finished runs",
            self.finished_runs
        );
        self.rows.push(Row::info(
            s,
            "finished runs in the store",
            self.finished_runs.to_string(),
        ));
        let starts_before = self.mesh.log_of("broker").matches("broker started").count();
        let stopped = self.mesh.terminate("broker", Duration::from_secs(10))?;
        match stopped {
            Some(took) => self
                .rows
                .push(Row::time(s, "SIGTERM -> exit", took, Target::None)),
            None => self.rows.push(Row {
                met: Some(false),
                ..Row::info(s, "SIGTERM -> exit", "no exit in 10 s: killed")
            }),
        }
        let started = Instant::now();
        self.mesh.restart("broker")?;
        // The broker logs `broker started` once it has loaded the store and bound.
        let deadline = started + Duration::from_secs(30);
        let logged = loop {
            if self.mesh.log_of("broker").matches("broker started").count() > starts_before {
                break started.elapsed();
            }
            if Instant::now() >= deadline {
                bail!("the restarted broker did not log `broker started` within 30 s");
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        let healthy = self
            .mesh
            .wait_healthy(Duration::from_secs(30))
            .map(|_| started.elapsed())?;
        self.figures.restart_healthy = Some(healthy);
        self.rows.push(Row::time(
            s,
            "start -> `broker started` logged (store loaded, bound)",
            logged,
            Target::None,
        ));
        self.rows.push(Row::time(
            s,
            "start -> /healthz 200 via the frontend",
            healthy,
            Target::AtMost(targets::RESTART_HEALTHY),
        ));
        // The stored runs are still there.
        let (status, body) = self
            .mesh
            .get_json(&format!("/runs?job={QUEUE_JOB}&state=succeeded&limit=1000"))?;
        let listed = body
            .get("runs")
            .and_then(Value::as_array)
            .map_or(0, Vec::len);
        let expect = self.config.runs.min(1000);
        self.rows.push(Row {
            met: Some(status == 200 && listed >= expect),
            target: format!(">= {expect}"),
            ..Row::info(
                s,
                "succeeded runs listed after the restart (limit 1000)",
                listed.to_string(),
            )
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn run_facts_come_from_the_api_view() {
        let run = json!({
            "run_id": "r1", "state": "succeeded",
            "created_at": "1970-01-01T00:00:01.000Z",
            "finished_at": "1970-01-01T00:00:01.250Z",
            "steps": [{}, {}],
        });
        let facts = RunFacts::from_json(&run).unwrap();
        assert_eq!(
            facts,
            RunFacts {
                state: "succeeded".into(),
                created_ms: 1_000,
                finished_ms: Some(1_250),
                tasks: 2
            }
        );
        assert!(RunFacts::from_json(&json!({"state": "pending"})).is_err());
    }

    #[test]
    fn outcomes_span_from_first_trigger_to_last_end() {
        let run = |state: &str, created_ms, finished_ms, tasks| RunFacts {
            state: state.into(),
            created_ms,
            finished_ms,
            tasks,
        };
        let o = outcome(&[
            run("succeeded", 1_000, Some(1_100), 4),
            run("succeeded", 1_010, Some(2_000), 4),
            run("failed", 1_020, Some(1_500), 3),
        ]);
        assert_eq!(o.succeeded, 2);
        assert_eq!(o.other, BTreeMap::from([("failed".to_owned(), 1)]));
        assert_eq!(o.span, Duration::from_millis(1_000));
        assert_eq!((o.tasks, o.min_tasks), (11, 3));
        assert_eq!(o.quarters_p50, None); // fewer than 4 succeeded
        let l = o.latency.unwrap();
        assert_eq!(
            (l.p50, l.max),
            (Duration::from_millis(100), Duration::from_millis(990))
        );
    }

    #[test]
    fn quarters_tell_old_runs_from_new_ones() {
        // Triggered at 0..8 ms; the oldest wait longest (overtaken by newer ones).
        let runs: Vec<RunFacts> = (0..8)
            .map(|i| RunFacts {
                state: "succeeded".into(),
                created_ms: i,
                finished_ms: Some(100 + (8 - i) * 10),
                tasks: 1,
            })
            .collect();
        let (first, last) = outcome(&runs).quarters_p50.unwrap();
        assert_eq!(first, Duration::from_millis(169)); // runs 0 and 1: 180, 169 ms
        assert_eq!(last, Duration::from_millis(103)); // runs 6 and 7: 114, 103 ms
    }

    #[test]
    fn the_job_file_declares_every_job_of_the_scenarios() {
        use jobz::jobfile::{parse_job_file, Delivery};
        let yaml = jobs_yaml().replace("@DIR@", "/tmp/mesh");
        let set = parse_job_file(std::path::Path::new("bench.yaml"), &yaml).unwrap();
        for job in [
            crate::latency::MARK_JOB,
            crate::latency::CHAIN_JOBS[2],
            crate::latency::MEMBER_JOB,
            crate::latency::JOIN_JOB,
            crate::drain::HOLD_JOB,
        ] {
            assert!(set.jobs.contains_key(job), "{job} missing");
        }
        let queue = &set.jobs[QUEUE_JOB];
        assert_eq!(
            (queue.command.as_str(), queue.delivery),
            ("true", Delivery::Queue)
        );
        let broadcast = &set.jobs[BROADCAST_JOB];
        assert_eq!(
            (broadcast.command.as_str(), broadcast.delivery),
            ("true", Delivery::Broadcast)
        );
    }

    #[test]
    fn figures_split_by_role() {
        let figures = vec![
            ("broker".to_owned(), 1),
            ("frontend".to_owned(), 2),
            ("w1".to_owned(), 3),
            ("w2".to_owned(), 4),
            ("semaphore".to_owned(), 5),
        ];
        assert_eq!(by_role(&figures), (Some(1), Some(2), vec![3, 4]));
    }

    #[test]
    fn cpu_per_run_splits_by_process_and_counts_the_workers_children() {
        let ticks = |own, system, children| CpuTicks {
            own,
            system,
            children,
        };
        let delta = vec![
            ("broker".to_owned(), ticks(100, 40, 0)),
            ("frontend".to_owned(), ticks(50, 10, 0)),
            ("w1".to_owned(), ticks(150, 120, 200)),
            ("w2".to_owned(), ticks(50, 40, 100)),
            ("semaphore".to_owned(), ticks(999, 0, 0)),
        ];
        // 100 ticks per second, 1,000 runs: 1 tick = 0.01 ms per run.
        let cpu = CpuPerRun::from_delta(&delta, 100, 1000);
        assert_eq!(cpu.as_array(), [1.0, 0.5, 2.0, 3.0]);
        assert_eq!(cpu.total_ms(), 6.5);
        assert_eq!((cpu.broker_system, cpu.workers_system), (0.4, 0.8));
        assert_eq!(cpu.split_ms(), "1.00 / 0.50 / 2.00 / 3.00 ms");
        let rows = cpu.rows("8", " while draining");
        assert_eq!(rows[0].metric, "CPU per run while draining: broker");
        assert_eq!(rows[0].value, "1.00 ms (40% system)");
        assert_eq!(rows[4].value, "6.50 ms");
        // No runs: no division by zero.
        assert!(CpuPerRun::from_delta(&delta, 100, 0).total_ms().is_finite());
    }
}
