//! Scenario 14: the API's and the dashboard's pages with a big history (issue 13: under
//! 200 ms a page with 100,000 runs in the store).
//!
//! A broker alone takes `--page-runs` runs through the simulated workers and frontend of
//! scenario 11 (each triggered, placed, started and finished, so the store holds them as an
//! operator's history would), then a real `jobz-frontend` is started beside it and each
//! page is asked 20 times over one kept-alive connection: the first page of runs,
//! each filter, a page deep in the history, one run, its log, the other lists and the
//! dashboard's own pages. The slowest answer of each is held to the target.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::http::Connection;
use crate::mesh::Mesh;
use crate::report::{Row, Target, Unit};
use crate::sim::{Sim, SIM_JOB};
use crate::{stats, Config};

/// The scenario's label in the table.
pub const SCENARIO: &str = "14 pages";

/// The acceptance bound of a page.
pub const PAGE_TARGET: Duration = Duration::from_millis(200);

/// Times each page is asked.
const ASKED: usize = 20;

/// Simulated workers, and the slots of each, that make the history.
const WORKERS: usize = 16;
const SLOTS: u32 = 16;

/// Scenario 14's rows.
pub fn pages(config: &Config) -> anyhow::Result<Vec<Row>> {
    let mut mesh = Mesh::start_broker_alone(&config.bin_dir, config.keep)?;
    if config.keep {
        println!("pages directory (kept): {}", mesh.root().display());
    }
    let result = (|| -> anyhow::Result<Vec<Row>> {
        let runs = config.page_runs as u64;
        let deadline = Instant::now() + config.scenario_timeout;
        let made = Instant::now();
        let mut sim = Sim::start(mesh.base_port, WORKERS, SLOTS, Duration::from_secs(60))?;
        sim.set_outstanding(u64::from(SLOTS) * WORKERS as u64);
        sim.set_limit(runs);
        sim.wait_until(
            |c| &c.finished,
            runs,
            deadline,
            "the history's runs finished",
        )?;
        sim.stop()?;
        let made = made.elapsed();
        mesh.start_frontend(&config.bin_dir)?;
        let mut conn = Connection::new(mesh.frontend_port, Duration::from_secs(30));
        let (deep, listed) = deep_run(&mut conn, runs)?;
        let worker = crate::sim::Workers::new(1, 1, crate::sim::job_spec()?)
            .names()
            .first()
            .cloned()
            .unwrap_or_default();
        let mid_time = listed.1;
        let pages: Vec<(String, String)> = vec![
            ("runs, first page".into(), "/runs".into()),
            ("runs of a job".into(), format!("/runs?job={SIM_JOB}")),
            (
                "runs in a state none is in".into(),
                "/runs?state=failed".into(),
            ),
            ("runs with a tag none has".into(), "/runs?tag=none".into()),
            (
                "runs of one worker".into(),
                format!("/runs?worker={worker}"),
            ),
            (
                "runs of a worker that ran none".into(),
                "/runs?worker=nobody".into(),
            ),
            (
                "runs, a page half-way back".into(),
                format!("/runs?before={deep}"),
            ),
            (
                "runs before a time half-way back".into(),
                format!("/runs?until={mid_time}"),
            ),
            ("one run".into(), format!("/runs/{deep}")),
            ("one run's log".into(), format!("/runs/{deep}/log")),
            (
                "a job's statistics, 14 days".into(),
                format!("/stats?job={SIM_JOB}"),
            ),
            ("dead tasks".into(), "/dead".into()),
            ("jobs".into(), "/jobs".into()),
            ("workers".into(), "/workers".into()),
            ("dashboard page".into(), "/ui".into()),
            ("dashboard run page".into(), format!("/ui/runs/{deep}")),
        ];
        let mut rows = vec![Row::info(
            SCENARIO,
            "runs in the store (made through the broker)",
            format!("{runs} in {:.0} s", made.as_secs_f64()),
        )];
        for (what, path) in pages {
            let mut samples = Vec::with_capacity(ASKED);
            for _ in 0..ASKED {
                let started = Instant::now();
                let response = conn.get(&path).with_context(|| format!("GET {path}"))?;
                samples.push(started.elapsed());
                if response.status != 200 {
                    bail!("GET {path}: {} {}", response.status, response.text());
                }
            }
            let summary = stats::summarize(&samples).context("no samples")?;
            rows.push(Row::figure(
                SCENARIO,
                &format!(
                    "{what}: slowest of {ASKED} (p50 {:.1} ms)",
                    summary.p50.as_secs_f64() * 1e3
                ),
                summary.max.as_secs_f64(),
                Unit::Time,
                Target::AtMost(PAGE_TARGET.as_secs_f64()),
            ));
        }
        Ok(rows)
    })();
    if result.is_err() {
        eprintln!("{}", mesh.diagnostics(20));
    }
    let _ = mesh.terminate("frontend", Duration::from_secs(5));
    let _ = mesh.terminate("broker", Duration::from_secs(5));
    result
}

/// A run half-way back in the history, found by paging with `next` (1,000 a page), and
/// the time it was accepted.
fn deep_run(conn: &mut Connection, runs: u64) -> anyhow::Result<(String, (u64, String))> {
    let mut before: Option<String> = None;
    let mut seen = 0u64;
    loop {
        let path = match &before {
            Some(id) => format!("/runs?limit=1000&before={id}"),
            None => String::from("/runs?limit=1000"),
        };
        let (status, body) = conn.get_json(&path)?;
        if status != 200 {
            bail!("GET {path}: {status} {body}");
        }
        let list = body["runs"].as_array().cloned().unwrap_or_default();
        let Some(last) = list.last() else {
            bail!("the history ended after {seen} runs, before half of {runs}");
        };
        seen += list.len() as u64;
        let id = last["run_id"]
            .as_str()
            .context("a run without an id")?
            .to_owned();
        if seen >= runs / 2 || body["next"].is_null() {
            let created = last["created_at"].as_str().unwrap_or_default().to_owned();
            return Ok((id, (seen, created)));
        }
        before = Some(id);
    }
}
