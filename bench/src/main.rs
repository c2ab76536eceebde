//! `bench`: flags; everything else is in the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

/// The jobz benchmark: real binaries on loopback, plain and sealed, a broker alone with
/// simulated workers, optionally Celery + Redis beside it; bounded scenarios, one table.
#[derive(Debug, Parser)]
#[command(name = "bench", version, about)]
struct Args {
    /// Small counts, no peers: a smoke run (under a minute), not figures to quote.
    #[arg(long, env = "JOBZ_BENCH_QUICK")]
    quick: bool,
    /// Also run the peers' own benchmarks (Celery + Redis, the spawn limit) from
    /// ../shared/peers, setting them up first if needed (apt-get, pip: needs root and the
    /// network; if that fails the table says so). With --quick, with small counts.
    #[arg(long, env = "JOBZ_BENCH_PEERS")]
    peers: bool,
    /// Directory of jobz-broker, jobz-frontend, jobz-worker and jobz-semaphore (default:
    /// the bench's own).
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
    /// Queue runs of scenarios 1 and 2, one connection per trigger (default 2000; 200
    /// with --quick).
    #[arg(long, env = "JOBZ_BENCH_RUNS", value_parser = clap::value_parser!(u32).range(1..=100_000))]
    runs: Option<u32>,
    /// Queue runs of scenario 8, over kept-alive connections (default 3000; 200 with
    /// --quick).
    #[arg(long, env = "JOBZ_BENCH_KEEPALIVE_RUNS", value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    keepalive_runs: Option<u32>,
    /// Broadcast runs of scenario 3 (default 200; 20 with --quick).
    #[arg(long, env = "JOBZ_BENCH_BROADCAST_RUNS", value_parser = clap::value_parser!(u32).range(1..=10_000))]
    broadcast_runs: Option<u32>,
    /// Samples of each latency of scenario 9 (default 50; 5 with --quick).
    #[arg(long, env = "JOBZ_BENCH_LATENCY_SAMPLES", value_parser = clap::value_parser!(u32).range(1..=10_000))]
    latency_samples: Option<u32>,
    /// Runs in scenario 10's backlog on the mesh (default 100000; 300 with --quick).
    #[arg(long, env = "JOBZ_BENCH_DRAIN_BACKLOG", value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    drain_backlog: Option<u32>,
    /// Drained runs timed in scenario 10 (default 3000; 100 with --quick).
    #[arg(long, env = "JOBZ_BENCH_DRAIN_MEASURE", value_parser = clap::value_parser!(u32).range(2..=10_000_000))]
    drain_measure: Option<u32>,
    /// Cycles timed with the broker alone, scenario 11 (default 30000; 1000 with --quick).
    #[arg(long, env = "JOBZ_BENCH_BROKER_CYCLES", value_parser = clap::value_parser!(u32).range(1..=100_000_000))]
    broker_cycles: Option<u32>,
    /// Simulated workers of scenario 12 (default 1000; 20 with --quick).
    #[arg(long, env = "JOBZ_BENCH_SIM_WORKERS", value_parser = clap::value_parser!(u32).range(1..=100_000))]
    sim_workers: Option<u32>,
    /// Runs waiting in scenario 12 (default 1000000; 2000 with --quick).
    #[arg(long, env = "JOBZ_BENCH_BACKLOG", value_parser = clap::value_parser!(u32).range(1..=100_000_000))]
    backlog: Option<u32>,
    /// Cycles timed in scenario 12, with and without the backlog (default 20000; 500 with
    /// --quick).
    #[arg(long, env = "JOBZ_BENCH_SCALE_CYCLES", value_parser = clap::value_parser!(u32).range(1..=100_000_000))]
    scale_cycles: Option<u32>,
    /// Runs in the store when scenario 14 times the pages (default 100000; 1000 with
    /// --quick).
    #[arg(long, env = "JOBZ_BENCH_PAGE_RUNS", value_parser = clap::value_parser!(u32).range(1..=100_000_000))]
    page_runs: Option<u32>,
    /// Client threads sending triggers.
    #[arg(long, env = "JOBZ_BENCH_CLIENTS", default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=64))]
    clients: u16,
    /// Idle window of scenario 4 (default 10s; 3s with --quick).
    #[arg(long, env = "JOBZ_BENCH_IDLE", value_parser = humantime::parse_duration)]
    idle: Option<Duration>,
    /// Each scenario fails after this long (building scenario 12's backlog: four times).
    #[arg(long, env = "JOBZ_BENCH_SCENARIO_TIMEOUT", default_value = "5m", value_parser = humantime::parse_duration)]
    scenario_timeout: Duration,
    /// Keep the mesh's temporary directory (logs, state) and print where it is.
    #[arg(long, env = "JOBZ_BENCH_KEEP")]
    keep: bool,
    /// Run the mesh's scenarios on a sealed mesh (broker --keys, nodes with pre-accepted
    /// keys) instead of the plain one, with no comparison.
    #[arg(long, env = "JOBZ_BENCH_SEALED", conflicts_with = "plain")]
    sealed: bool,
    /// Plain mesh only: skip the sealed mesh of scenario 6 (same as --skip sealed).
    #[arg(long, env = "JOBZ_BENCH_PLAIN")]
    plain: bool,
    /// Leave parts out, comma-separated: mesh (scenarios 1-6 and 8-10), or some of them
    /// (idle, latency, sequential, burst, keep-alive, broadcast, restart, drain, sealed),
    /// seal-cost, broker-alone, scale.
    #[arg(long, env = "JOBZ_BENCH_SKIP", value_delimiter = ',', value_parser = clap::builder::PossibleValuesParser::new(bench::PARTS))]
    skip: Vec<String>,
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
    // The full run's count, the quick one's, or the flag's.
    let count = |flag: Option<u32>, full: usize, small: usize| {
        flag.map_or(if quick { small } else { full }, |n| n as usize)
    };
    let mut skip = args.skip;
    if args.plain {
        skip.push(String::from("sealed"));
    }
    let config = bench::Config {
        bin_dir,
        build: !args.no_build,
        quick,
        workers: usize::from(args.workers),
        slots: args.slots,
        heartbeat: String::from("200ms"),
        runs: count(args.runs, 2000, 200),
        sequential_runs: if quick { 5 } else { 20 },
        broadcast_runs: count(args.broadcast_runs, 200, 20),
        clients: usize::from(args.clients),
        idle: args
            .idle
            .unwrap_or(Duration::from_secs(if quick { 3 } else { 10 })),
        scenario_timeout: args.scenario_timeout,
        keep: args.keep,
        sealed: args.sealed,
        seal_cost_budget: Duration::from_millis(if quick { 100 } else { 300 }),
        keepalive_runs: count(args.keepalive_runs, 3000, 200),
        latency_samples: count(args.latency_samples, 50, 5),
        drain_backlog: count(args.drain_backlog, 100_000, 300),
        drain_measure: count(args.drain_measure, 3000, 100),
        broker_cycles: count(args.broker_cycles, 30_000, 1000),
        sim_workers: count(args.sim_workers, 1000, 20),
        backlog: count(args.backlog, 1_000_000, 2000),
        scale_cycles: count(args.scale_cycles, 20_000, 500),
        page_runs: count(args.page_runs, 100_000, 1000),
        peers: args.peers.then_some(if quick {
            bench::peers::Counts::QUICK
        } else {
            bench::peers::Counts::FULL
        }),
        skip,
    };
    match bench::run(config) {
        Ok(0) => ExitCode::SUCCESS,
        Ok(failed) => {
            eprintln!("bench: {failed} scenario(s) FAILED (see the table)");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
