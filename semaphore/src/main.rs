//! `jobz-semaphore`: dependency barriers ("run X once N others are done").
//!
//! This build loads and validates the `semaphores:` of its `jobs.d` and connects to the
//! broker; counting and firing barriers is not implemented yet (see ARCHITECTURE.md).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use jobz::client::{Client, ClientConfig};
use jobz::jobfile::JobDir;
use jobz::logging::LogArgs;
use jobz::message::Role;
use jobz::socket::BrokerAddr;
use tracing::{error, info, warn};

/// The jobz semaphore: dependency barriers between jobs.
#[derive(Debug, Parser)]
#[command(name = "jobz-semaphore", version)]
struct Args {
    /// The broker, HOST[:BASE_PORT].
    #[arg(long, env = "JOBZ_BROKER", default_value = "127.0.0.1")]
    broker: BrokerAddr,
    /// Directory of job files; only their `semaphores:` are used.
    #[arg(long, env = "JOBZ_JOBS_DIR", default_value = "/etc/jobz/jobs.d")]
    jobs_dir: PathBuf,
    /// Directory of the durable barrier state.
    #[arg(long, env = "JOBZ_STATE", default_value = "/var/lib/jobz/semaphore")]
    state: PathBuf,
    #[command(flatten)]
    log: LogArgs,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(e) = args.log.init() {
        eprintln!("jobz-semaphore: {e:#}");
        return ExitCode::from(2);
    }
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            eprintln!("jobz-semaphore: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])
        .context("installing signal handlers")?;
    let mut jobs = JobDir::new(&args.jobs_dir);
    let report = jobs
        .refresh()
        .with_context(|| format!("reading jobs dir {}", args.jobs_dir.display()))?;
    for rejected in &report.rejected {
        error!("{rejected}");
    }
    let (set, conflicts) = jobs.job_set();
    for c in &conflicts {
        error!("{c}");
    }
    let node_id = format!("semaphore:{}", jobz::new_id());
    let client = Client::start(ClientConfig::new(
        args.broker.clone(),
        node_id,
        Role::Semaphore,
    ))?;
    info!(broker = %args.broker, semaphores = set.semaphores.len(), "semaphore started");
    if !set.semaphores.is_empty() {
        warn!("barrier counting is not implemented in this version; semaphores are loaded but never fire");
    }
    let _ = client.wait_connected(Duration::from_secs(5));
    // Wait for SIGTERM/SIGINT.
    let _ = signals.forever().next();
    info!("semaphore stopped");
    client.shutdown();
    Ok(())
}
