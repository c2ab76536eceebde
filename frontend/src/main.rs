//! `jobz-frontend`: flags, logging and signals; everything else is in the library.

use std::net::{SocketAddr, ToSocketAddrs};
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;

use jobz::logging::LogArgs;
use jobz::socket::BrokerAddr;

/// HTTP gateway, dashboard and metrics for a jobz mesh.
#[derive(Debug, Parser)]
#[command(name = "jobz-frontend", version, about)]
struct Args {
    /// The broker: host and optional base port (PUB at the base port, PULL at base + 1).
    #[arg(
        long,
        env = "JOBZ_BROKER",
        value_name = "HOST[:BASE_PORT]",
        default_value = "127.0.0.1"
    )]
    broker: BrokerAddr,
    /// Where to listen for HTTP: ADDR:PORT.
    #[arg(
        long,
        env = "JOBZ_LISTEN",
        value_name = "ADDR:PORT",
        default_value = "0.0.0.0:6769",
        value_parser = parse_listen
    )]
    listen: SocketAddr,
    /// How long a request may wait for the broker before the answer is 503 (e.g. 5s, 500ms).
    #[arg(
        long,
        env = "JOBZ_REQUEST_TIMEOUT",
        value_name = "DURATION",
        default_value = "5s",
        value_parser = parse_timeout
    )]
    request_timeout: Duration,
    /// HTTP worker threads.
    #[arg(
        long,
        env = "JOBZ_THREADS",
        value_name = "N",
        default_value_t = 8,
        value_parser = clap::value_parser!(u16).range(1..=256)
    )]
    threads: u16,
    #[command(flatten)]
    log: LogArgs,
}

fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    s.to_socket_addrs()
        .map_err(|e| format!("{s:?}: {e}"))?
        .next()
        .ok_or_else(|| format!("{s:?} resolves to no address"))
}

fn parse_timeout(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e}"))?;
    if d.is_zero() || d > Duration::from_secs(600) {
        return Err(format!("{s:?}: must be more than 0 and at most 10m"));
    }
    Ok(d)
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(e) = args.log.init() {
        eprintln!("jobz-frontend: {e:#}");
        return ExitCode::from(2);
    }
    let shutdown = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        if let Err(e) = signal_hook::flag::register(signal, shutdown.clone()) {
            eprintln!("jobz-frontend: installing the handler for signal {signal}: {e}");
            return ExitCode::FAILURE;
        }
    }
    let config = frontend::Config {
        broker: args.broker,
        listen: args.listen,
        request_timeout: args.request_timeout,
        threads: usize::from(args.threads),
    };
    match frontend::run(config, shutdown) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("jobz-frontend: {e:#}");
            ExitCode::FAILURE
        }
    }
}
