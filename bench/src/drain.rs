//! Scenario 10: a backlog on the real mesh, built with every slot busy, then drained.
//!
//! 1. Every worker slot gets a run of `bench_hold`, whose command blocks opening a named
//!    pipe (`: < gate.fifo`) until the bench opens it.
//! 2. With every slot busy, `--drain-backlog` runs of the queue job are triggered from
//!    the keep-alive clients: they all wait. Their acceptance rate and the broker's memory
//!    with them waiting are recorded.
//! 3. The bench opens the pipe: the held commands end, the slots free up, and the waiting
//!    runs drain. Runs/s is timed on the completion events of the next `--drain-measure`
//!    runs (or those ended within a minute), with the CPU each process used meanwhile.
//!
//! Placement must not cost more per freed slot when more runs wait, so that rate is held
//! to the no-backlog throughput of scenario 8 (targets section). The runs left waiting are
//! not waited for: this is the mesh's last scenario.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use jobz::message::TaskState;
use serde_json::Value;

use crate::events::{open_fifo, EventWatch};
use crate::report::{Row, Unit};
use crate::scenario::{cpu_delta, cpu_snapshot, trigger_burst, Bench, CpuPerRun, QUEUE_JOB};
use crate::{procfs, stats};

/// The scenario's label in the table.
pub const SCENARIO: &str = "10 backlog drain";

/// The job that keeps a slot busy until the bench opens the gate.
pub const HOLD_JOB: &str = "bench_hold";
/// The named pipe the holding commands wait on, in the mesh's directory.
pub const GATE_FIFO: &str = "gate.fifo";

/// Longest the drain is timed.
const MEASURE_AT_MOST: Duration = Duration::from_secs(60);

/// The holding job (`@DIR@`: the mesh's directory).
pub fn jobs_yaml() -> String {
    format!(
        "  - name: {HOLD_JOB}\n    command: \": < @DIR@/{GATE_FIFO}\"\n    delivery: queue\n    timeout: 30m\n"
    )
}

/// What the drain measured.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Drain {
    /// Runs waiting when the gate opened.
    pub backlog: usize,
    /// Runs ended while timed.
    pub drained: usize,
    /// Runs ended per second while timed.
    pub runs_per_sec: f64,
}

impl Bench {
    /// Scenario 10 (see the module docs).
    pub fn backlog_drain(&mut self) -> anyhow::Result<()> {
        let slots = self.mesh.worker_names().len() * self.config.slots as usize;
        let backlog = self.config.drain_backlog;
        let measure = self.config.drain_measure.min(backlog).max(1);
        let gate_path = self.mesh.root().join(GATE_FIFO);
        // Made before anything may open it; opened for writing only when the gate opens.
        let status = std::process::Command::new("mkfifo")
            .arg(&gate_path)
            .status()
            .context("running mkfifo")?;
        if !status.success() {
            bail!("mkfifo {} failed: {status}", gate_path.display());
        }
        let s = SCENARIO;

        eprintln!("bench: scenario 10: holding {slots} slots");
        let holds = trigger_burst(
            self.mesh.frontend_port,
            HOLD_JOB,
            slots,
            self.config.clients,
            self.deadline(),
            true,
        );
        if holds.run_ids.len() != slots {
            bail!("holding runs: {}", holds.outcome(slots));
        }
        self.wait_tasks_running(&holds.run_ids)?;

        let (watch, mut events) = EventWatch::start(self.mesh.base_port, &[QUEUE_JOB])?;
        eprintln!("bench: scenario 10: {backlog} runs into the backlog");
        let burst = trigger_burst(
            self.mesh.frontend_port,
            QUEUE_JOB,
            backlog,
            self.config.clients,
            self.deadline(),
            true,
        );
        self.rows.push(Row {
            met: Some(burst.run_ids.len() == backlog),
            target: String::from("all"),
            ..Row::info(
                s,
                "backlog runs accepted (every slot busy)",
                burst.outcome(backlog),
            )
        });
        self.rows.push(Row::figure(
            s,
            &format!(
                "accepted/s into the backlog ({} keep-alive clients)",
                self.config.clients
            ),
            stats::rate(burst.run_ids.len(), burst.wall),
            Unit::PerSec,
            crate::report::Target::None,
        ));
        let broker = self
            .mesh
            .pids()
            .into_iter()
            .find(|(n, _)| n == "broker")
            .map(|(_, p)| p);
        if let Some(pid) = broker {
            self.rows.push(Row::figure(
                s,
                &format!("broker RSS with {} runs waiting", burst.run_ids.len()),
                procfs::rss_kib(pid)? as f64,
                Unit::MiB,
                crate::report::Target::None,
            ));
        }
        if !self.still_waiting(QUEUE_JOB)? {
            bail!("no run of {QUEUE_JOB} waits: the slots were not all busy");
        }

        eprintln!("bench: scenario 10: opening the gate, timing {measure} runs");
        let cpu_before = cpu_snapshot(&self.mesh)?;
        let gate = open_fifo(&gate_path)?;
        let opened = Instant::now();
        let deadline = opened + MEASURE_AT_MOST;
        let (mut first, mut last, mut drained) = (None, opened, 0usize);
        while drained < measure {
            let Some((at, completion)) = events.next(deadline) else {
                break;
            };
            if completion.state != TaskState::Succeeded {
                bail!("a drained run ended {}: {completion:?}", completion.state);
            }
            first.get_or_insert(at);
            last = at;
            drained += 1;
        }
        let cpu = cpu_delta(&cpu_before, &cpu_snapshot(&self.mesh)?);
        drop(watch);
        // Open as long as the mesh lives: a holding command that reaches the pipe late
        // must not block again.
        self.keep.push(Box::new(gate));
        let Some(first) = first else {
            bail!("no run ended within {MEASURE_AT_MOST:?} of freeing the slots");
        };
        // From the first drained run's end to the last: the steady drain, without the
        // moment the held commands take to end.
        let rate = stats::rate(drained.saturating_sub(1), last - first);
        self.rows.push(Row::time(
            s,
            "gate opened -> first drained run succeeded",
            first - opened,
            crate::report::Target::None,
        ));
        self.rows.push(Row::figure(
            s,
            &format!("runs/s while draining ({drained} runs timed)"),
            rate,
            Unit::PerSec,
            crate::report::Target::None,
        ));
        let per_run = CpuPerRun::from_delta(&cpu, self.hz, drained);
        self.rows.extend(per_run.rows(s, " while draining"));
        self.figures.drain = Some(Drain {
            backlog: burst.run_ids.len(),
            drained,
            runs_per_sec: rate,
        });
        Ok(())
    }

    /// Waits until the task of each run is running. (The runs' own state is no guide: a
    /// run whose task the broker learns is running from a heartbeat before the worker's
    /// `TaskStarted` stays `pending` until it ends.)
    fn wait_tasks_running(&self, run_ids: &[String]) -> anyhow::Result<()> {
        let deadline = self.deadline();
        let mut conn =
            crate::http::Connection::new(self.mesh.frontend_port, crate::mesh::HTTP_TIMEOUT);
        for run_id in run_ids {
            loop {
                let path = format!("/runs/{run_id}");
                let (status, run) = conn.get_json(&path)?;
                if status != 200 {
                    bail!("GET {path}: {status} {run}");
                }
                if task_running(&run) {
                    break;
                }
                if Instant::now() >= deadline {
                    bail!("the task of run {run_id} was not running by the deadline: {run}");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    /// True if a run of `job` is still pending.
    fn still_waiting(&self, job: &str) -> anyhow::Result<bool> {
        let path = format!("/runs?job={job}&state=pending&limit=1");
        let (status, body) = self.mesh.get_json(&path)?;
        if status != 200 {
            bail!("GET {path}: {status} {body}");
        }
        Ok(body
            .get("runs")
            .and_then(Value::as_array)
            .is_some_and(|r| !r.is_empty()))
    }
}

/// True if a run (as `GET /runs/{id}` shows it) has a task running.
fn task_running(run: &Value) -> bool {
    run.get("steps")
        .and_then(Value::as_array)
        .is_some_and(|steps| {
            steps
                .iter()
                .any(|s| s.get("state").and_then(Value::as_str) == Some("running"))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_holding_job_waits_on_the_gate() {
        let yaml = format!("jobs:\n{}", jobs_yaml()).replace("@DIR@", "/m");
        let set = jobz::jobfile::parse_job_file(std::path::Path::new("b.yaml"), &yaml).unwrap();
        let hold = &set.jobs[HOLD_JOB];
        assert_eq!(hold.command, ": < /m/gate.fifo");
        assert_eq!(hold.delivery, jobz::jobfile::Delivery::Queue);
    }

    #[test]
    fn a_run_pending_with_its_task_running_counts_as_running() {
        let run = |state: &str, task: &str| serde_json::json!({"state": state, "steps": [{"state": task}]});
        assert!(task_running(&run("pending", "running")));
        assert!(task_running(&run("running", "running")));
        assert!(!task_running(&run("pending", "pending")));
        assert!(!task_running(&serde_json::json!({"state": "running"})));
    }
}
