//! `jobz-semaphore`: flags, logging and signals; everything else is in the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use jobz::logging::LogArgs;
use jobz::socket::BrokerAddr;
use semaphore::config::{self, Config};

/// Dependency barriers between jobs and schedules: triggers a job once others have
/// finished, or at the slots of a cron expression or interval.
#[derive(Debug, Parser)]
#[command(name = "jobz-semaphore", version = jobz::VERSION)]
struct Args {
    #[arg(
        long,
        env = "JOBZ_BROKER",
        default_value = "127.0.0.1",
        help = "Broker address, HOST[:BASE_PORT] (PUB at the base port, PULL at base + 1)"
    )]
    broker: BrokerAddr,
    /// Directory of job files; only their `semaphores:` and `schedules:` are used.
    #[arg(long, env = "JOBZ_JOBS_DIR", default_value = "/etc/jobz/jobs.d")]
    jobs_dir: PathBuf,
    /// Directory of the durable barrier and schedule state (one process per directory).
    #[arg(long, env = "JOBZ_STATE", default_value = config::DEFAULT_STATE_DIR)]
    state: PathBuf,
    /// How often the barriers and schedules are reported to the broker, for
    /// `GET /semaphores` and `GET /schedules`.
    #[arg(long, env = "JOBZ_STATUS_INTERVAL", default_value = "2s", value_parser = humantime::parse_duration)]
    status_interval: Duration,
    /// Validate the semaphores and schedules of --jobs-dir, print one line per file, and exit
    /// (0 if all are good, 1 otherwise) without connecting anywhere.
    #[arg(long, env = "JOBZ_CHECK", value_parser = clap::builder::BoolishValueParser::new())]
    check: bool,
    /// Name of this semaphore; its key is enrolled as `semaphore:NAME` (default: host name).
    #[arg(long, env = "JOBZ_NAME", value_name = "NAME")]
    name: Option<String>,
    #[command(flatten)]
    keys: jobz::keys::KeyArgs,
    #[command(flatten)]
    log: LogArgs,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(code) = args.keys.print_public_key() {
        return code;
    }
    if args.check {
        let mut out = std::io::stdout().lock();
        return match semaphore::check::check_jobs_dir(&args.jobs_dir, &mut out) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::FAILURE,
            Err(e) => {
                eprintln!("jobz-semaphore: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let logs_to_file = args.log.log_file.is_some();
    match start(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if logs_to_file {
                tracing::error!("{e:#}");
            }
            eprintln!("jobz-semaphore: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn start(args: Args) -> anyhow::Result<()> {
    args.log.init()?;
    let mut config = Config::new(args.broker, config::node_id(args.name.as_deref())?);
    config.identity = args.keys.identity()?;
    config.jobs_dir = args.jobs_dir;
    config.state_dir = args.state;
    config.status_interval = args.status_interval;
    config.validate()?;

    let shutdown = jobz::signals::shutdown_on_signals()?;
    semaphore::run(config, shutdown)
}
