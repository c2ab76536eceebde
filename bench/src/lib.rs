//! The jobz benchmark: starts real binaries on loopback (a broker with its state in a
//! temporary directory, a frontend, N workers), runs five bounded scenarios, and prints
//! one table with the target each figure is held to. Speed and memory targets live here,
//! never in timed tests. Run it with `bench/run.sh` (or `cargo run --release -p bench`);
//! `bench/README.md` has the targets and the figures measured.
//!
//! # Layout
//! - [`run`] is the whole bench, in order; start reading there.
//! - `scenario`: the scenarios (trigger burst, end to end, broadcast, idle cost, broker
//!   restart) as methods of `Bench`, and the pure summaries of what they measured.
//! - `mesh`: the processes, each killed by PID on drop or on SIGINT/SIGTERM.
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
pub mod stats;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};

use crate::machine::Machine;
use crate::mesh::{Mesh, MeshConfig};
use crate::report::Row;
use crate::scenario::Bench;

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

/// The whole bench: the header, the mesh, scenarios 4 (fresh), 2 (idle mesh), 1+2, 3,
/// 4 (after load) and 5, then the table. A scenario that fails leaves a `FAILED` row and
/// the others still run.
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
        "mesh: broker + frontend + {} workers (--slots {}, --heartbeat {}), binaries in {}",
        config.workers,
        config.slots,
        config.heartbeat,
        config.bin_dir.display()
    );
    println!(
        "counts: {} queue runs from {} clients, {} sequential runs, {} broadcast runs, idle window {:?}",
        config.runs, config.clients, config.sequential_runs, config.broadcast_runs, config.idle
    );

    eprintln!("bench: starting the mesh");
    let mesh = Mesh::start(&MeshConfig {
        bin_dir: config.bin_dir.clone(),
        workers: config.workers,
        slots: config.slots,
        heartbeat: config.heartbeat.clone(),
        jobs_yaml: scenario::jobs_yaml(),
        keep: config.keep,
    })?;
    if config.keep {
        println!("mesh directory (kept): {}", mesh.root().display());
    }
    let mut bench = Bench {
        mesh,
        config,
        rows: Vec::new(),
        hz: procfs::ticks_per_second(),
        finished_runs: 0,
    };
    // Let start-up work (first heartbeats, job catalog) settle before measuring idling.
    std::thread::sleep(Duration::from_secs(1));

    type Step = fn(&mut Bench) -> anyhow::Result<()>;
    let steps: [(&str, &str, Step); 6] = [
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

    let mut rows = std::mem::take(&mut bench.rows);
    // Grouped by scenario, in the order measured within each.
    rows.sort_by(|a, b| a.scenario.cmp(&b.scenario));
    println!();
    print!("{}", report::render(&rows));
    println!();
    println!("load average at end: {}", machine::load_average());
    let misses = rows.iter().filter(|r| r.met == Some(false)).count();
    println!("{misses} figure(s) missed their target");
    drop(bench);
    Ok(())
}
