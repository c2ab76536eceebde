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
    /// A running task's lease; its worker's heartbeats renew it. A lease not renewed for
    /// this long (plus the grace) loses the attempt: queue tasks are retried elsewhere.
    #[arg(long, env = "JOBZ_LEASE_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    lease_timeout: Duration,
    /// Extra time after a lease expires before the attempt counts as lost.
    #[arg(long, env = "JOBZ_LEASE_GRACE", default_value = "10s", value_parser = humantime::parse_duration)]
    lease_grace: Duration,
    #[command(flatten)]
    log: LogArgs,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(e) = args.log.init() {
        eprintln!("jobz-broker: {e:#}");
        return ExitCode::from(2);
    }
    let shutdown = match jobz::signals::shutdown_on_signals() {
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
        lease_timeout: args.lease_timeout,
        lease_grace: args.lease_grace,
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
