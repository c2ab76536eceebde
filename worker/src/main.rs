//! `jobz-worker`: flags, logging and signals; everything else is in the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use jobz::logging::LogArgs;
use jobz::socket::BrokerAddr;
use worker::config::{self, Config};

/// Runs the jobs of a jobs.d directory when the jobz broker publishes work for them.
#[derive(Debug, Parser)]
#[command(name = "jobz-worker", version = jobz::VERSION)]
struct Args {
    // Help as an attribute: rustdoc would read `[...]` and `<...>` as links and HTML.
    #[arg(
        long,
        env = "JOBZ_BROKER",
        default_value = "127.0.0.1",
        help = "Broker address, HOST[:BASE_PORT] (PUB at the base port, PULL at base + 1)"
    )]
    broker: BrokerAddr,
    /// Directory of job files served by this worker.
    #[arg(long, env = "JOBZ_JOBS_DIR", default_value = "/etc/jobz/jobs.d")]
    jobs_dir: PathBuf,
    /// Unique worker name [default: the host name].
    #[arg(long, env = "JOBZ_NAME")]
    name: Option<String>,
    /// Commands run at once [default: the CPU count].
    #[arg(long, env = "JOBZ_SLOTS", value_parser = clap::value_parser!(u32).range(1..))]
    slots: Option<u32>,
    /// A capability of this host (repeatable; comma-separated in JOBZ_CAPABILITY).
    #[arg(
        long = "capability",
        env = "JOBZ_CAPABILITY",
        value_name = "CAP",
        value_delimiter = ','
    )]
    capabilities: Vec<String>,
    /// Spool directory: seen attempts, running attempts and unacknowledged results (kept
    /// across restarts), and per-task working directories.
    #[arg(long, env = "JOBZ_SPOOL", default_value = "/var/lib/jobz/worker")]
    spool: PathBuf,
    /// Log directory: worker.log and every task's output under runs/.
    #[arg(long, env = "JOBZ_LOG_DIR", default_value = "/var/log/jobz")]
    log_dir: PathBuf,
    /// Format of worker.log: `text` (`<time> run=… step=… … <event>`) or `json` (one
    /// object per line with the same fields).
    #[arg(
        long,
        env = "JOBZ_WORKER_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    worker_log_format: jobz::logging::LogFormat,
    /// Heartbeat interval.
    #[arg(long, env = "JOBZ_HEARTBEAT", default_value = "2s", value_parser = humantime::parse_duration)]
    heartbeat: Duration,
    #[arg(
        long,
        env = "JOBZ_FRONTEND",
        value_name = "URL",
        help = "Base URL of the HTTP API, exported to commands as JOBZ_FRONTEND \
                [default: http://<broker host>:6769]"
    )]
    frontend: Option<String>,
    /// On SIGTERM/SIGINT, how long to wait for running commands before killing them.
    #[arg(long, env = "JOBZ_DRAIN_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    drain_timeout: Duration,
    /// A variable passed from the worker's environment to every step, besides PATH (a
    /// fixed safe value unless PATH is named here), HOME, USER, LOGNAME, LANG, LC_ALL, TZ
    /// and the JOBZ_* task variables (repeatable; comma-separated in JOBZ_ENV_ALLOW).
    #[arg(
        long = "env-allow",
        env = "JOBZ_ENV_ALLOW",
        value_name = "NAME",
        value_delimiter = ','
    )]
    env_allow: Vec<String>,
    /// Output kept per step attempt (bytes, or 512KiB, 64MiB, 1GiB); the rest is dropped
    /// and the log ends with "[jobz: output truncated after N bytes]".
    #[arg(long, env = "JOBZ_MAX_STEP_OUTPUT", value_name = "BYTES", default_value = "64MiB",
        value_parser = config::parse_size)]
    max_step_output: u64,
    /// The user steps without run_as run as (a root worker switches to it) [default: the
    /// worker's own user].
    #[arg(long, env = "JOBZ_DEFAULT_RUN_AS", value_name = "USER")]
    default_run_as: Option<String>,
    /// Step outputs under runs/ (and damaged spool entries set aside) not modified for
    /// this long are removed; never the output of a running step.
    #[arg(long, env = "JOBZ_OUTPUT_RETENTION", default_value = "7days", value_name = "DURATION",
        value_parser = humantime::parse_duration)]
    output_retention: Duration,
    /// How often the output retention runs. For tests.
    #[arg(long, env = "JOBZ_PRUNE_EVERY", default_value = "1min", hide = true,
        value_parser = humantime::parse_duration)]
    prune_every: Duration,
    /// Validate the job files of --jobs-dir, print one line per file, and exit
    /// (0 if all are good, 1 otherwise) without connecting anywhere.
    #[arg(long, env = "JOBZ_CHECK", value_parser = clap::builder::BoolishValueParser::new())]
    check: bool,
    #[command(flatten)]
    keys: jobz::keys::KeyArgs,
    #[command(flatten)]
    log: LogArgs,
}

fn main() -> ExitCode {
    // The hidden step-supervisor mode (see worker::supervisor), before any flag parsing: the
    // worker starts its own binary this way when `jobz-step` is not installed beside it.
    // starts its own binary this way under each task.
    let mut raw = std::env::args_os();
    if raw.nth(1).as_deref() == Some(std::ffi::OsStr::new(worker::supervisor::FLAG)) {
        worker::supervisor::main(raw.collect());
    }
    // Before any secret is read: a step running as this user must not read the worker's
    // environment or memory through /proc (see worker::secrets).
    if let Err(e) = worker::secrets::forbid_inspection() {
        eprintln!("jobz-worker: {e:#}");
        return ExitCode::FAILURE;
    }
    let args = Args::parse();
    if let Some(code) = args.keys.print_public_key() {
        return code;
    }
    if args.check {
        let mut out = std::io::stdout().lock();
        return match worker::check::check_jobs_dir(&args.jobs_dir, &mut out) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::FAILURE,
            Err(e) => {
                eprintln!("jobz-worker: {e:#}");
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
            eprintln!("jobz-worker: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn start(args: Args) -> anyhow::Result<()> {
    args.log.init()?;
    let name = match args.name {
        Some(name) => name,
        None => config::default_name()?,
    };
    let mut config = Config::new(args.broker, name);
    config.jobs_dir = args.jobs_dir;
    if let Some(slots) = args.slots {
        config.slots = slots;
    }
    config.capabilities = args.capabilities;
    config.spool = args.spool;
    config.log_dir = args.log_dir;
    config.worker_log_format = args.worker_log_format;
    config.heartbeat = args.heartbeat;
    if let Some(frontend) = args.frontend {
        config.frontend = frontend;
    }
    config.drain_timeout = args.drain_timeout;
    config.env_allow = args.env_allow;
    config.max_step_output = args.max_step_output;
    config.default_run_as = args.default_run_as;
    config.output_retention = args.output_retention;
    config.prune_every = args.prune_every;
    config.identity = args.keys.identity()?;
    config.step_program = worker::supervisor::program();
    config.validate()?;
    if let Some(why) =
        args.keys.key.as_deref().and_then(|key| {
            worker::secrets::steps_can_read_key(key, config.default_run_as.as_deref())
        })
    {
        tracing::warn!("{why}");
    }

    let shutdown = jobz::signals::shutdown_on_signals()?;
    worker::run(config, shutdown)
}
