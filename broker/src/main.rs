use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use jobz::logging::LogArgs;
use jobz::socket::BrokerAddr;

/// The jobz broker: receives triggers and step results, keeps durable state, publishes work.
#[derive(Debug, Parser)]
#[command(name = "jobz-broker", version)]
struct Args {
    /// Address to bind; PUB takes the base port, PULL base + 1.
    #[arg(
        long,
        env = "JOBZ_BIND",
        default_value = "0.0.0.0:6795",
        value_name = "ADDR[:BASE_PORT]"
    )]
    bind: BrokerAddr,
    /// Directory of the durable state.
    #[arg(
        long,
        env = "JOBZ_STATE",
        default_value = "/var/lib/jobz/broker",
        value_name = "DIR"
    )]
    state: PathBuf,
    /// A worker with no heartbeat for this long is lost and its unfinished tasks fail.
    #[arg(long, env = "JOBZ_WORKER_EXPIRY", default_value = "30s", value_parser = humantime::parse_duration)]
    worker_expiry: Duration,
    /// Publish a task again if its worker has not reported it started after this long.
    #[arg(long, env = "JOBZ_REDELIVER_AFTER", default_value = "2s", value_parser = humantime::parse_duration)]
    redeliver_after: Duration,
    #[command(flatten)]
    log: LogArgs,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(e) = args.log.init() {
        eprintln!("jobz-broker: {e:#}");
        return ExitCode::from(2);
    }
    let shutdown = match signals() {
        Ok(rx) => rx,
        Err(e) => {
            eprintln!("jobz-broker: {e:#}");
            return ExitCode::from(2);
        }
    };
    let config = broker::Config {
        bind: args.bind,
        state_dir: args.state,
        worker_expiry: args.worker_expiry,
        redeliver_after: args.redeliver_after,
    };
    match broker::run(config, shutdown) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("jobz-broker: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// SIGTERM and SIGINT, as a channel the broker loop watches.
fn signals() -> anyhow::Result<crossbeam_channel::Receiver<()>> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let (tx, rx) = crossbeam_channel::bounded(1);
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])?;
    std::thread::spawn(move || {
        if signals.forever().next().is_some() {
            let _ = tx.send(());
        }
    });
    Ok(rx)
}
