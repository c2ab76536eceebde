//! The jobz benchmark: starts real binaries on loopback (a broker with its state in a
//! temporary directory, a frontend, N workers), runs five bounded scenarios, runs the
//! throughput ones again on a sealed mesh (every frame authenticated and encrypted), times
//! the sealing code in process, and prints one table with the target each figure is held
//! to. Speed and memory targets live here, never in timed tests. Run it with
//! `bench/run.sh` (or `cargo run --release -p bench`); `bench/README.md` has the targets
//! and the figures measured.
//!
//! # Layout
//! - [`run`] is the whole bench, in order; start reading there.
//! - `scenario`: the scenarios (trigger burst, end to end, broadcast, idle cost, broker
//!   restart) as methods of `Bench`, and the pure summaries of what they measured.
//! - `sealed`: scenario 6, the sealed mesh's figures against the plain one's.
//! - `seal_cost`: scenario 7, sealing and opening frames in process.
//! - `mesh`: the processes (plain or sealed), each killed by PID on drop or on
//!   SIGINT/SIGTERM.
//! - `http`: a minimal HTTP/1.1 client over `TcpStream`.
//! - `procfs`: resident memory and CPU time from `/proc`.
//! - `stats`: percentiles, rates, API times.
//! - `report`: the table.
//! - `machine`: the machine, its load and the git commit.
//! - [`targets`]: what we aim for.

pub mod http;
pub mod machine;
pub mod mesh;
pub mod procfs;
pub mod report;
pub mod scenario;
pub mod seal_cost;
pub mod sealed;
pub mod stats;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::machine::Machine;
use crate::mesh::{Mesh, MeshConfig};
use crate::report::Row;
use crate::scenario::{Bench, Figures};

/// What we aim for, on a 2-CPU machine with everything on loopback (times in seconds,
/// memory in KiB). `bench/README.md` shows the same table.
pub mod targets {
    /// Scenario 1: `202`s per second from 8 clients.
    pub const ACCEPTED_PER_SEC: f64 = 500.0;
    /// Scenario 1: median time to a `202`.
    pub const ACCEPT_P50: f64 = 0.020;
    /// Scenario 1: 99th percentile time to a `202`.
    pub const ACCEPT_P99: f64 = 0.100;
    /// Scenario 2: runs of `true` ended per second, first trigger to last end.
    pub const RUNS_PER_SEC: f64 = 200.0;
    /// Scenario 2: trigger→succeeded of one run on an idle mesh.
    pub const SINGLE_RUN_P50: f64 = 0.050;
    /// Scenario 3: broadcast tasks ended per second.
    pub const BROADCAST_TASKS_PER_SEC: f64 = 400.0;
    /// Scenario 4: resident memory of an idle, fresh broker.
    pub const RSS_IDLE_BROKER_KIB: f64 = 32.0 * 1024.0;
    /// Scenario 4: resident memory of an idle, fresh frontend.
    pub const RSS_IDLE_FRONTEND_KIB: f64 = 16.0 * 1024.0;
    /// Scenario 4: resident memory of an idle, fresh worker.
    pub const RSS_IDLE_WORKER_KIB: f64 = 16.0 * 1024.0;
    /// Scenario 4: resident memory of the broker after scenario 2.
    pub const RSS_LOADED_BROKER_KIB: f64 = 64.0 * 1024.0;
    /// Scenario 4: resident memory of the frontend after scenario 2.
    pub const RSS_LOADED_FRONTEND_KIB: f64 = 32.0 * 1024.0;
    /// Scenario 4: resident memory of a worker after scenario 2.
    pub const RSS_LOADED_WORKER_KIB: f64 = 32.0 * 1024.0;
    /// Scenario 4: CPU seconds a process may use per 10 s of idling (1 % of a core).
    pub const IDLE_CPU_PER_10S: f64 = 0.10;
    /// Scenario 5: broker start → `/healthz` 200, with the finished runs in the store.
    pub const RESTART_HEALTHY: f64 = 1.0;
    /// Scenario 6: a sealed mesh's throughput (accepted/s, runs/s, broadcast tasks/s) as a
    /// share of the plain mesh's, measured in the same bench run.
    pub const SEALED_THROUGHPUT_SHARE: f64 = 0.80;
}

/// The bench's settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where `jobz-broker`, `jobz-frontend` and `jobz-worker` are.
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
    /// After the plain mesh, run scenarios 2, 1+2, 3 and 5 on a sealed mesh and compare
    /// (scenario 6).
    pub sealed_pass: bool,
    /// Scenario 7: time spent on each of its four figures.
    pub seal_cost_budget: Duration,
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
        "build", "--bins", "-p", "broker", "-p", "frontend", "-p", "worker",
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

/// A step of the bench: its scenario (for a `FAILED` row), what it is, and the work.
type Step = (
    &'static str,
    &'static str,
    fn(&mut Bench) -> anyhow::Result<()>,
);

/// Every scenario on one mesh: 4 (fresh), 2 (idle mesh), 1+2, 3, 4 (after load), 5.
const ALL_STEPS: [Step; 6] = [
    ("4 idle cost", "4: idle, fresh", |b| {
        b.rss_rows(
            "idle, fresh",
            [
                targets::RSS_IDLE_BROKER_KIB,
                targets::RSS_IDLE_FRONTEND_KIB,
                targets::RSS_IDLE_WORKER_KIB,
            ],
        )?;
        b.idle_cpu_rows("fresh")
    }),
    (
        "2 end-to-end",
        "2: sequential runs",
        Bench::unloaded_latency,
    ),
    ("1 trigger", "1+2: queue burst", Bench::queue_burst),
    ("3 broadcast", "3: broadcast", Bench::broadcast),
    ("4 idle cost", "4: idle after load", |b| {
        std::thread::sleep(Duration::from_secs(1));
        b.idle_cpu_rows("after scenarios 1-3")
    }),
    ("5 restart", "5: broker restart", Bench::restart),
];

/// What the sealed mesh of scenario 6 runs: the figures it is compared on (no idle
/// windows, which would make the bench half as long again).
const SEALED_PASS_STEPS: [Step; 4] = [
    (
        "2 end-to-end",
        "sealed 2: sequential runs",
        Bench::unloaded_latency,
    ),
    ("1 trigger", "sealed 1+2: queue burst", Bench::queue_burst),
    ("3 broadcast", "sealed 3: broadcast", Bench::broadcast),
    ("5 restart", "sealed 5: broker restart", Bench::restart),
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
    };
    // Let start-up work (first heartbeats, job catalog) settle before measuring.
    std::thread::sleep(Duration::from_secs(1));
    for (scenario, what, step) in steps {
        eprintln!("bench: {what}");
        if let Err(e) = step(&mut bench) {
            eprintln!(
                "bench: {what} FAILED: {e:#}\n{}",
                bench.mesh.diagnostics(20)
            );
            bench.rows.push(Row::failed(scenario, &e));
        }
    }
    // Dropping the bench kills the mesh, so the next one has the CPUs to itself.
    Ok((std::mem::take(&mut bench.rows), bench.figures))
}

/// The whole bench: the header; every scenario on a plain mesh (or, with
/// [`Config::sealed`], on a sealed one); the sealed pass and its comparison (scenario 6);
/// the seal cost in process (scenario 7); then the table. A scenario that fails leaves a
/// `FAILED` row and the others still run.
pub fn run(config: Config) -> anyhow::Result<()> {
    mesh::install_cleanup()?;
    let machine = Machine::describe(&workspace_root());
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
    if config.build {
        build_binaries()?;
    }
    println!(
        "mesh: {}broker + frontend + {} workers (--slots {}, --heartbeat {}), binaries in {}",
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
    if config.sealed_pass && !config.sealed {
        println!("then a sealed mesh: scenarios 2, 1+2, 3 and 5 again, compared in 6");
    }

    let started = Instant::now();
    let (mut rows, plain) = run_mesh(&config, config.sealed, &ALL_STEPS)?;
    let mut took = format!("first mesh {:.0} s", started.elapsed().as_secs_f64());
    if config.sealed_pass && !config.sealed {
        let started = Instant::now();
        let sealed = run_mesh(&config, true, &SEALED_PASS_STEPS);
        took.push_str(&format!(
            ", sealed pass {:.0} s",
            started.elapsed().as_secs_f64()
        ));
        match sealed {
            Ok((sealed_rows, figures)) => {
                let misses = sealed::new_misses(&rows, sealed_rows);
                rows.extend(sealed::rows(&plain, &figures, misses));
            }
            Err(e) => {
                eprintln!("bench: the sealed mesh FAILED: {e:#}");
                rows.push(Row::failed(sealed::SCENARIO, &e));
            }
        }
    }
    eprintln!("bench: 7: seal cost in process");
    let started = Instant::now();
    rows.extend(seal_cost::rows(config.seal_cost_budget));
    took.push_str(&format!(
        ", seal cost {:.1} s",
        started.elapsed().as_secs_f64()
    ));

    // Grouped by scenario, in the order measured within each.
    rows.sort_by(|a, b| a.scenario.cmp(&b.scenario));
    println!();
    print!("{}", report::render(&rows));
    println!();
    println!("load average at end: {}", machine::load_average());
    let misses = rows.iter().filter(|r| r.met == Some(false)).count();
    println!("{misses} figure(s) missed their target");
    println!("took: {took}");
    Ok(())
}
