//! The jobz benchmark: starts real binaries on loopback (a broker with its state in a
//! temporary directory, a frontend, N workers, a semaphore), runs bounded scenarios on
//! them, runs the throughput ones again on a sealed mesh, times the sealing code in
//! process, drives a broker alone with simulated workers (at scale too), runs the peers'
//! own benchmarks (Celery + Redis, the spawn limit) when asked, and prints one table: each
//! target of issue 12 with the figure, Celery's figure and the ratio, then every scenario's
//! detail. Speed and memory targets live here, never in timed tests. Run it with
//! `bench/run.sh` (or `cargo run --release -p bench`); `bench/README.md` has the targets
//! and the figures measured.
//!
//! # Layout
//! - [`run`] is the whole bench, in order; start reading there.
//! - `scenario`: the mesh's scenarios (trigger burst, end to end, broadcast, idle cost,
//!   broker restart, keep-alive throughput) as methods of `Bench`, and the pure summaries
//!   of what they measured; `latency` (9: idle-mesh latencies) and `drain` (10: a backlog
//!   drained) add theirs.
//! - `events`: exact times from the mesh: the broker's completion events, and lines a
//!   command writes into a named pipe.
//! - `sealed`: scenario 6, the sealed mesh's figures against the plain one's.
//! - `seal_cost`: scenario 7, sealing and opening frames in process.
//! - `broker_alone`: scenarios 11 and 12 on `sim`, simulated workers and frontend over
//!   raw ZeroMQ.
//! - `peers`: scenario 13, the peers' drivers and their output.
//! - `targets`: what we aim for, and the table's first section.
//! - `mesh`: the processes (plain or sealed), each killed by PID on drop or on
//!   SIGINT/SIGTERM.
//! - `http`: a minimal HTTP/1.1 client over `TcpStream`, kept alive or not.
//! - `procfs`: resident memory and CPU time from `/proc`.
//! - `stats`: percentiles, rates, API times.
//! - `report`: the table.
//! - `machine`: the machine, its load and the git commit.

pub mod broker_alone;
pub mod drain;
pub mod events;
pub mod http;
pub mod latency;
pub mod machine;
pub mod mesh;
pub mod pages;
pub mod peers;
pub mod procfs;
pub mod report;
pub mod scenario;
pub mod seal_cost;
pub mod sealed;
pub mod sim;
pub mod stats;
pub mod targets;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::broker_alone::BrokerFigures;
use crate::machine::Machine;
use crate::mesh::{Mesh, MeshConfig};
use crate::report::Row;
use crate::scenario::{Bench, Figures};

/// Parts of the bench that `--skip` can leave out: the whole mesh (scenarios 1–6, 8–10),
/// each of its scenarios, and the other scenarios.
pub const PARTS: [&str; 14] = [
    "mesh",
    "idle",
    "latency",
    "sequential",
    "burst",
    "keep-alive",
    "broadcast",
    "restart",
    "drain",
    "sealed",
    "seal-cost",
    "broker-alone",
    "scale",
    "pages",
];

/// The bench's settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where `jobz-broker`, `jobz-frontend`, `jobz-worker` and `jobz-semaphore` are.
    pub bin_dir: PathBuf,
    /// Build the binaries first (`cargo build`, same profile as the bench).
    pub build: bool,
    /// Smaller counts (the header says so).
    pub quick: bool,
    /// Workers in the mesh.
    pub workers: usize,
    /// `--slots` of each worker.
    pub slots: u32,
    /// `--heartbeat` of each worker.
    pub heartbeat: String,
    /// Scenarios 1–2: runs of the queue job.
    pub runs: usize,
    /// Scenario 2: sequential runs on the idle mesh.
    pub sequential_runs: usize,
    /// Scenario 3: runs of the broadcast job.
    pub broadcast_runs: usize,
    /// Client threads sending triggers.
    pub clients: usize,
    /// Scenario 4: the idle window.
    pub idle: Duration,
    /// Each scenario stops (and fails) after this long.
    pub scenario_timeout: Duration,
    /// Keep the mesh's temporary directory.
    pub keep: bool,
    /// Run every scenario on a sealed mesh instead of a plain one (and no scenario 6).
    pub sealed: bool,
    /// Scenario 7: time spent on each of its four figures.
    pub seal_cost_budget: Duration,
    /// Scenario 8: runs triggered over kept-alive connections.
    pub keepalive_runs: usize,
    /// Scenario 9: samples of each latency.
    pub latency_samples: usize,
    /// Scenario 10: runs in the backlog.
    pub drain_backlog: usize,
    /// Scenario 10: drained runs timed.
    pub drain_measure: usize,
    /// Scenario 11: cycles timed.
    pub broker_cycles: usize,
    /// Scenario 12: simulated workers.
    pub sim_workers: usize,
    /// Scenario 12: runs in the backlog.
    pub backlog: usize,
    /// Scenario 12: cycles timed, with and without the backlog.
    pub scale_cycles: usize,
    /// Scenario 14: runs in the store when the pages are timed.
    pub page_runs: usize,
    /// Scenario 13: run the peers' drivers, with these counts.
    pub peers: Option<peers::Counts>,
    /// Parts left out (see [`PARTS`]).
    pub skip: Vec<String>,
}

impl Config {
    /// True if `part` (one of [`PARTS`]) runs.
    pub fn runs(&self, part: &str) -> bool {
        !self.skip.iter().any(|s| s == part)
    }
}

/// The workspace root (where `Cargo.toml` and `.git` are).
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_owned()
}

/// True when the bench itself was built without optimisations: its figures, and those of
/// binaries built alongside, are then not worth reporting.
pub const DEBUG_BUILD: bool = cfg!(debug_assertions);

/// `cargo build` of the broker, frontend, worker (and the bench), in the bench's own
/// profile.
pub fn build_binaries() -> anyhow::Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(&cargo);
    // The same package set as `bench/run.sh`: features are unified over the packages of
    // one build, so another set would rebuild the binaries every other time.
    cmd.args([
        "build",
        "--bins",
        "-p",
        "broker",
        "-p",
        "frontend",
        "-p",
        "worker",
        "-p",
        "semaphore",
    ]);
    cmd.args(["-p", "bench"]);
    if !DEBUG_BUILD {
        cmd.arg("--release");
    }
    eprintln!("bench: building the binaries ({cmd:?})");
    let status = cmd
        .current_dir(workspace_root())
        .stdin(Stdio::null())
        .status()
        .with_context(|| format!("running {cargo:?}"))?;
    if !status.success() {
        bail!("building the binaries failed: {status}");
    }
    Ok(())
}

/// A step of a mesh: the part that `--skip` names, its scenario (for a `FAILED` row), what
/// it is, and the work.
struct Step {
    part: &'static str,
    scenario: &'static str,
    what: &'static str,
    run: fn(&mut Bench) -> anyhow::Result<()>,
}

/// Scenario 4, fresh: memory and idle CPU before anything ran (the targets judge them).
fn idle_fresh(b: &mut Bench) -> anyhow::Result<()> {
    b.figures.rss_idle_kib = Some(b.rss_rows("idle, fresh", None)?);
    b.figures.idle_cpu_per_10s = Some(b.idle_cpu_rows("fresh", false)?);
    Ok(())
}

/// Scenario 4 after the load, once the last runs' work has settled.
fn idle_after(b: &mut Bench) -> anyhow::Result<()> {
    std::thread::sleep(Duration::from_secs(1));
    b.idle_cpu_rows("after scenarios 1-3", true).map(|_| ())
}

/// Every scenario on one mesh: 4 (fresh), 9 (idle latencies), 2 (idle mesh), 1+2, 8, 3,
/// 4 (after load), 5, and 10 last (it leaves runs waiting).
const ALL_STEPS: [Step; 9] = [
    Step {
        part: "idle",
        scenario: "4 idle cost",
        what: "4: idle, fresh",
        run: idle_fresh,
    },
    Step {
        part: "latency",
        scenario: latency::SCENARIO,
        what: "9: idle latencies",
        run: Bench::idle_latency,
    },
    Step {
        part: "sequential",
        scenario: "2 end-to-end",
        what: "2: sequential runs",
        run: Bench::unloaded_latency,
    },
    Step {
        part: "burst",
        scenario: "1 trigger",
        what: "1+2: queue burst",
        run: Bench::queue_burst,
    },
    Step {
        part: "keep-alive",
        scenario: "8 keep-alive",
        what: "8: keep-alive throughput",
        run: Bench::keepalive_throughput,
    },
    Step {
        part: "broadcast",
        scenario: "3 broadcast",
        what: "3: broadcast",
        run: Bench::broadcast,
    },
    Step {
        part: "idle",
        scenario: "4 idle cost",
        what: "4: idle after load",
        run: idle_after,
    },
    Step {
        part: "restart",
        scenario: "5 restart",
        what: "5: broker restart",
        run: Bench::restart,
    },
    Step {
        part: "drain",
        scenario: drain::SCENARIO,
        what: "10: backlog drain",
        run: Bench::backlog_drain,
    },
];

/// What the sealed mesh of scenario 6 runs: the figures it is compared on (no idle
/// windows, which would make the bench half as long again).
const SEALED_PASS_STEPS: [Step; 4] = [
    Step {
        part: "sequential",
        scenario: "2 end-to-end",
        what: "sealed 2: sequential runs",
        run: Bench::unloaded_latency,
    },
    Step {
        part: "burst",
        scenario: "1 trigger",
        what: "sealed 1+2: queue burst",
        run: Bench::queue_burst,
    },
    Step {
        part: "broadcast",
        scenario: "3 broadcast",
        what: "sealed 3: broadcast",
        run: Bench::broadcast,
    },
    Step {
        part: "restart",
        scenario: "5 restart",
        what: "sealed 5: broker restart",
        run: Bench::restart,
    },
];

/// Starts a mesh (plain or sealed), runs `steps` on it and stops it; the rows and the
/// figures measured. A step that fails leaves a `FAILED` row and the others still run.
fn run_mesh(config: &Config, sealed: bool, steps: &[Step]) -> anyhow::Result<(Vec<Row>, Figures)> {
    let kind = if sealed { "sealed" } else { "plain" };
    eprintln!("bench: starting the {kind} mesh");
    let mesh = Mesh::start(&MeshConfig {
        bin_dir: config.bin_dir.clone(),
        workers: config.workers,
        slots: config.slots,
        heartbeat: config.heartbeat.clone(),
        jobs_yaml: scenario::jobs_yaml(),
        semaphores_yaml: (!sealed).then(latency::semaphores_yaml),
        keep: config.keep,
        sealed,
    })
    .with_context(|| format!("starting the {kind} mesh"))?;
    if config.keep {
        println!("{kind} mesh directory (kept): {}", mesh.root().display());
    }
    let mut bench = Bench {
        mesh,
        config: config.clone(),
        rows: Vec::new(),
        hz: procfs::ticks_per_second(),
        finished_runs: 0,
        figures: Figures::default(),
        keep: Vec::new(),
    };
    // Let start-up work (first heartbeats, job catalog) settle before measuring.
    std::thread::sleep(Duration::from_secs(1));
    for step in steps {
        // The idle latencies need the plain mesh (completion events, the semaphore).
        if !config.runs(step.part) || (step.part == "latency" && sealed) {
            continue;
        }
        eprintln!("bench: {}", step.what);
        if let Err(e) = (step.run)(&mut bench) {
            eprintln!(
                "bench: {} FAILED: {e:#}\n{}",
                step.what,
                bench.mesh.diagnostics(20)
            );
            bench.rows.push(Row::failed(step.scenario, &e));
        }
    }
    // Dropping the bench kills the mesh, so the next one has the CPUs to itself.
    Ok((std::mem::take(&mut bench.rows), bench.figures))
}

/// Runs a part that makes its own rows; a failure becomes a `FAILED` row.
fn part(rows: &mut Vec<Row>, scenario: &str, result: anyhow::Result<Vec<Row>>) {
    match result {
        Ok(part) => rows.extend(part),
        Err(e) => {
            eprintln!("bench: {scenario} FAILED: {e:#}");
            rows.push(Row::failed(scenario, &e));
        }
    }
}

/// The whole bench: the header; the peers' set-up (with `--peers`); every scenario on a
/// plain mesh (or, with [`Config::sealed`], on a sealed one); the sealed pass and its
/// comparison (scenario 6); the seal cost in process (7); the broker alone (11) and at
/// scale (12); the peers' drivers (13); then the table, targets first. A scenario that
/// fails leaves a `FAILED` row and the others still run. Returns how many failed.
pub fn run(config: Config) -> anyhow::Result<usize> {
    mesh::install_cleanup()?;
    let repo = workspace_root();
    let machine = Machine::describe(&repo);
    println!(
        "jobz bench ({}{}), commit {}, {}",
        if config.quick { "--quick" } else { "full" },
        if DEBUG_BUILD {
            ", DEBUG BUILD: figures not meaningful"
        } else {
            ""
        },
        machine.commit,
        machine.date
    );
    println!(
        "machine: {} CPUs ({}), {}, memory {}",
        machine.nproc, machine.cpu, machine.kernel, machine.memory
    );
    println!("load average at start: {}", machine::load_average());
    let started = Instant::now();
    let logs = tempfile::Builder::new()
        .prefix("jobz-bench-peers-")
        .tempdir()
        .context("creating a directory for the peers' logs")?;
    let peers_dir = match config.peers {
        Some(_) => {
            let (dir, notes) = peers::prepare(&repo, logs.path());
            Some((dir, notes))
        }
        None => None,
    };
    if config.build {
        build_binaries()?;
    }
    let sealed_pass = !config.sealed && config.runs("sealed");
    println!(
        "mesh: {}broker + frontend + {} workers (--slots {}, --heartbeat {}) + semaphore, binaries in {}",
        if config.sealed {
            "SEALED (every frame sealed) "
        } else {
            ""
        },
        config.workers,
        config.slots,
        config.heartbeat,
        config.bin_dir.display()
    );
    println!(
        "counts: {} queue runs from {} clients, {} sequential runs, {} broadcast runs, idle window {:?}",
        config.runs, config.clients, config.sequential_runs, config.broadcast_runs, config.idle
    );
    println!(
        "        {} keep-alive runs, {} samples of each latency, a backlog of {} ({} timed draining)",
        config.keepalive_runs, config.latency_samples, config.drain_backlog, config.drain_measure
    );
    println!(
        "        broker alone {} cycles; scale: {} simulated workers, {} runs waiting, {} cycles timed",
        config.broker_cycles, config.sim_workers, config.backlog, config.scale_cycles
    );
    println!(
        "        pages timed with {} runs in the store",
        config.page_runs
    );
    if sealed_pass {
        println!("then a sealed mesh: scenarios 2, 1+2, 3 and 5 again, compared in 6");
    }
    if !config.skip.is_empty() {
        println!("skipped: {}", config.skip.join(", "));
    }
    if let Some(counts) = config.peers {
        println!(
            "peers: bench_celery.py --reps {} --tasks {} --chains {} --iso {}; bench_spawn.sh {} {}",
            counts.reps, counts.tasks, counts.chains, counts.iso, counts.reps, counts.spawns
        );
    }

    let mut rows = Vec::new();
    let mut took = Vec::new();
    let mut plain = Figures::default();
    let mut sealed_figures = None;
    if config.runs("mesh") {
        let t = Instant::now();
        let (mesh_rows, figures) = run_mesh(&config, config.sealed, &ALL_STEPS)?;
        rows.extend(mesh_rows);
        plain = figures;
        took.push(format!("first mesh {:.0} s", t.elapsed().as_secs_f64()));
        if sealed_pass {
            let t = Instant::now();
            let sealed = run_mesh(&config, true, &SEALED_PASS_STEPS);
            took.push(format!("sealed pass {:.0} s", t.elapsed().as_secs_f64()));
            match sealed {
                Ok((sealed_rows, figures)) => {
                    let misses = sealed::new_misses(&rows, sealed_rows);
                    rows.extend(sealed::rows(&plain, &figures, misses));
                    sealed_figures = Some(figures);
                }
                Err(e) => {
                    eprintln!("bench: the sealed mesh FAILED: {e:#}");
                    rows.push(Row::failed(sealed::SCENARIO, &e));
                }
            }
        }
    }
    if config.runs("seal-cost") {
        eprintln!("bench: 7: seal cost in process");
        let t = Instant::now();
        rows.extend(seal_cost::rows(config.seal_cost_budget));
        took.push(format!("seal cost {:.1} s", t.elapsed().as_secs_f64()));
    }
    let hz = procfs::ticks_per_second();
    let mut broker = BrokerFigures::default();
    if config.runs("broker-alone") {
        eprintln!("bench: 11: broker alone");
        let t = Instant::now();
        part(
            &mut rows,
            broker_alone::ALONE,
            broker_alone::alone(&config, hz, &mut broker),
        );
        took.push(format!("broker alone {:.0} s", t.elapsed().as_secs_f64()));
    }
    if config.runs("scale") {
        eprintln!("bench: 12: scale");
        let t = Instant::now();
        part(
            &mut rows,
            broker_alone::SCALE,
            broker_alone::scale(&config, hz, &mut broker),
        );
        took.push(format!("scale {:.0} s", t.elapsed().as_secs_f64()));
    }
    if config.runs("pages") {
        eprintln!("bench: 14: pages with a big history");
        let t = Instant::now();
        part(&mut rows, pages::SCENARIO, pages::pages(&config));
        took.push(format!("pages {:.0} s", t.elapsed().as_secs_f64()));
    }
    let peers = match (config.peers, peers_dir) {
        (Some(counts), Some((dir, notes))) => {
            let t = Instant::now();
            let mut measured = match dir {
                Some(dir) => peers::measure(&dir, counts, logs.path()),
                None => peers::Peers::default(),
            };
            measured.notes.splice(0..0, notes);
            took.push(format!("peers {:.0} s", t.elapsed().as_secs_f64()));
            Some(measured)
        }
        _ => None,
    };
    rows.extend(peers::rows(
        &peers.clone().unwrap_or_default(),
        peers.is_some(),
    ));
    rows.extend(targets::rows(&targets::Inputs {
        plain: &plain,
        sealed: sealed_figures.as_ref(),
        broker: &broker,
        peers: peers.as_ref(),
    }));
    if config.keep {
        println!("peers' logs (kept): {}", logs.keep().display());
    }

    report::sort_by_section(&mut rows);
    println!();
    print!("{}", report::render(&rows));
    println!();
    println!("load average at end: {}", machine::load_average());
    let misses = rows.iter().filter(|r| r.met == Some(false)).count();
    let failures = rows.iter().filter(|r| r.is_failure()).count();
    println!("{misses} figure(s) missed their target, {failures} scenario(s) failed");
    println!(
        "took: {:.0} s in all ({})",
        started.elapsed().as_secs_f64(),
        took.join(", ")
    );
    Ok(failures)
}
