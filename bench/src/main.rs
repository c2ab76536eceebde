//! `bench`: flags; everything else is in the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

/// The jobz benchmark: real binaries on loopback, plain and sealed, bounded scenarios, one
/// table.
#[derive(Debug, Parser)]
#[command(name = "bench", version, about)]
struct Args {
    /// Smaller counts and a shorter idle window: a smoke run, not figures to quote.
    #[arg(long, env = "JOBZ_BENCH_QUICK")]
    quick: bool,
    /// Directory of jobz-broker, jobz-frontend and jobz-worker (default: the bench's own).
    #[arg(long, env = "JOBZ_BENCH_BIN_DIR", value_name = "DIR")]
    bin_dir: Option<PathBuf>,
    /// Do not run `cargo build` first.
    #[arg(long, env = "JOBZ_BENCH_NO_BUILD")]
    no_build: bool,
    /// Workers in the mesh.
    #[arg(long, env = "JOBZ_BENCH_WORKERS", default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    workers: u16,
    /// `--slots` of each worker.
    #[arg(long, env = "JOBZ_BENCH_SLOTS", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=256))]
    slots: u32,
    /// Queue runs of scenarios 1 and 2 (default 2000; 200 with --quick).
    #[arg(long, env = "JOBZ_BENCH_RUNS", value_parser = clap::value_parser!(u32).range(1..=100_000))]
    runs: Option<u32>,
    /// Broadcast runs of scenario 3 (default 200; 20 with --quick).
    #[arg(long, env = "JOBZ_BENCH_BROADCAST_RUNS", value_parser = clap::value_parser!(u32).range(1..=10_000))]
    broadcast_runs: Option<u32>,
    /// Client threads sending triggers.
    #[arg(long, env = "JOBZ_BENCH_CLIENTS", default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=64))]
    clients: u16,
    /// Idle window of scenario 4 (default 10s; 3s with --quick).
    #[arg(long, env = "JOBZ_BENCH_IDLE", value_parser = humantime::parse_duration)]
    idle: Option<Duration>,
    /// Each scenario fails after this long.
    #[arg(long, env = "JOBZ_BENCH_SCENARIO_TIMEOUT", default_value = "5m", value_parser = humantime::parse_duration)]
    scenario_timeout: Duration,
    /// Keep the mesh's temporary directory (logs, state) and print where it is.
    #[arg(long, env = "JOBZ_BENCH_KEEP")]
    keep: bool,
    /// Run every scenario on a sealed mesh (broker --keys, nodes with pre-accepted keys)
    /// instead of the plain one, with no comparison.
    #[arg(long, env = "JOBZ_BENCH_SEALED", conflicts_with = "plain")]
    sealed: bool,
    /// Plain mesh only: skip the sealed mesh of scenario 6.
    #[arg(long, env = "JOBZ_BENCH_PLAIN")]
    plain: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let bin_dir = match args.bin_dir {
        Some(dir) => dir,
        None => match std::env::current_exe() {
            Ok(exe) => exe.parent().map(PathBuf::from).unwrap_or_default(),
            Err(e) => {
                eprintln!("bench: cannot find the bench's own directory ({e}); pass --bin-dir");
                return ExitCode::from(2);
            }
        },
    };
    let quick = args.quick;
    let config = bench::Config {
        bin_dir,
        build: !args.no_build,
        quick,
        workers: usize::from(args.workers),
        slots: args.slots,
        heartbeat: String::from("200ms"),
        runs: args
            .runs
            .map_or(if quick { 200 } else { 2000 }, |n| n as usize),
        sequential_runs: if quick { 5 } else { 20 },
        broadcast_runs: args
            .broadcast_runs
            .map_or(if quick { 20 } else { 200 }, |n| n as usize),
        clients: usize::from(args.clients),
        idle: args
            .idle
            .unwrap_or(Duration::from_secs(if quick { 3 } else { 10 })),
        scenario_timeout: args.scenario_timeout,
        keep: args.keep,
        sealed: args.sealed,
        sealed_pass: !args.sealed && !args.plain,
        seal_cost_budget: Duration::from_millis(if quick { 100 } else { 300 }),
    };
    match bench::run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
