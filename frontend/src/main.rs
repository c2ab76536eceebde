//! `jobz-frontend`: flags, logging and signals; everything else is in the library.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};

use jobz::logging::LogArgs;
use jobz::socket::BrokerAddr;

/// HTTP gateway, dashboard and metrics for a jobz mesh.
#[derive(Debug, Parser)]
#[command(name = "jobz-frontend", version = jobz::VERSION, about)]
struct Args {
    /// The broker: host and optional base port (PUB at the base port, PULL at base + 1).
    #[arg(
        long,
        env = "JOBZ_BROKER",
        value_name = "HOST[:BASE_PORT]",
        default_value = "127.0.0.1"
    )]
    broker: BrokerAddr,
    /// Where to listen for HTTP: ADDR:PORT. Default 0.0.0.0:6769 when --tokens or
    /// --tls-client-ca protect it, else 127.0.0.1:6769 (protected mode).
    #[arg(
        long,
        env = "JOBZ_LISTEN",
        value_name = "ADDR:PORT",
        value_parser = parse_listen
    )]
    listen: Option<SocketAddr>,
    /// Token file (`NAME SCOPES sha256:HEX` per line; see `token new`): every request but
    /// /healthz then needs `Authorization: Bearer TOKEN` with the right scope.
    #[arg(long, env = "JOBZ_TOKENS", value_name = "FILE")]
    tokens: Option<PathBuf>,
    /// Serve HTTPS with this PEM certificate chain (needs --tls-key).
    #[arg(long, env = "JOBZ_TLS_CERT", value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, env = "JOBZ_TLS_KEY", value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Require client certificates signed by a CA in this PEM file (mutual TLS).
    #[arg(
        long,
        env = "JOBZ_TLS_CLIENT_CA",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    tls_client_ca: Option<PathBuf>,
    /// Allow a non-loopback --listen with neither --tokens nor --tls-client-ca (protected
    /// mode otherwise refuses to start). Only behind a firewall or authenticating proxy.
    #[arg(long, env = "JOBZ_INSECURE")]
    insecure: bool,
    /// Also serve /healthz and /metrics, and nothing else, without authentication here.
    #[arg(
        long,
        env = "JOBZ_HEALTH_LISTEN",
        value_name = "ADDR:PORT",
        value_parser = parse_listen
    )]
    health_listen: Option<SocketAddr>,
    /// Most HTTP connections open at once per listener; more are closed at once.
    #[arg(
        long,
        env = "JOBZ_MAX_CONNECTIONS",
        value_name = "N",
        default_value_t = 256,
        value_parser = clap::value_parser!(u32).range(1..=65536)
    )]
    max_connections: u32,
    /// Most HTTP connections open at once from one IP address, per listener (raise it for
    /// clients behind a proxy or NAT that share one address).
    #[arg(
        long,
        env = "JOBZ_MAX_CONNECTIONS_PER_ADDRESS",
        value_name = "N",
        default_value_t = 32,
        value_parser = clap::value_parser!(u32).range(1..=65536)
    )]
    max_connections_per_address: u32,
    /// Connections of --max-connections that only clients with a valid token (or client
    /// certificate) may hold; others get 503 there. Default: a quarter of
    /// --max-connections when --tokens or --tls-client-ca is given, else none.
    #[arg(
        long,
        env = "JOBZ_RESERVED_CONNECTIONS",
        value_name = "N",
        value_parser = clap::value_parser!(u32).range(0..=65535)
    )]
    reserved_connections: Option<u32>,
    /// Close a keep-alive connection that sends no new request for this long after its
    /// last answer (also the time a new connection has for its first request).
    #[arg(
        long,
        env = "JOBZ_IDLE_TIMEOUT",
        value_name = "DURATION",
        default_value = "10s",
        value_parser = parse_timeout
    )]
    idle_timeout: Duration,
    /// A TLS handshake, or a request head once begun, must be complete within this
    /// (slow or partial heads are closed).
    #[arg(
        long,
        env = "JOBZ_HEADER_TIMEOUT",
        value_name = "DURATION",
        default_value = "10s",
        value_parser = parse_timeout
    )]
    header_timeout: Duration,
    /// How long a request may wait for the broker before the answer is 503 (e.g. 5s, 500ms).
    #[arg(
        long,
        env = "JOBZ_REQUEST_TIMEOUT",
        value_name = "DURATION",
        default_value = "5s",
        value_parser = parse_timeout
    )]
    request_timeout: Duration,
    /// The URL clients reach this frontend by (e.g. `https://jobs.example.com` or
    /// `https://example.com/jobz` behind a proxy): `status_url`, `retry_url` and `Location`
    /// are then absolute URLs under it. Default: they are paths.
    #[arg(long, env = "JOBZ_PUBLIC_URL", value_name = "URL", value_parser = frontend::api::parse_public_url)]
    public_url: Option<String>,
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
    /// Name of this frontend on the mesh; its key is enrolled as `frontend:NAME`
    /// (default: the host name).
    #[arg(long, env = "JOBZ_NAME", value_name = "NAME")]
    name: Option<String>,
    #[command(flatten)]
    keys: jobz::keys::KeyArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Manage API tokens.
    #[command(subcommand)]
    Token(TokenCommand),
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Makes a new token: prints the token on stdout (give it to the client) and the line
    /// for the --tokens file on stderr (the file keeps only the token's SHA-256).
    New {
        /// A name for logs, unique in the file (e.g. ci, grafana, alice).
        name: String,
        /// Comma-separated: read (every view), trigger (/job_start), admin (everything).
        #[arg(long, value_name = "SCOPES", value_parser = frontend::auth::Scopes::parse)]
        scopes: frontend::auth::Scopes,
    },
    /// Lists the tokens of a token file: name and scopes, one per line (never the token,
    /// which the file does not hold). Exit 1 if the file cannot be read or does not parse.
    /// A running frontend takes in a changed file within a second: remove a line to
    /// revoke that token.
    List {
        /// The token file.
        #[arg(long, value_name = "FILE", env = "JOBZ_TOKENS")]
        tokens: PathBuf,
    },
}

fn token_list(path: &std::path::Path) -> ExitCode {
    match frontend::auth::Tokens::load(path) {
        Ok(tokens) => {
            for holder in tokens.holders() {
                println!("{} {}", holder.name, holder.scopes);
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("jobz-frontend: {e}");
            ExitCode::FAILURE
        }
    }
}

fn token_new(name: &str, scopes: frontend::auth::Scopes) -> ExitCode {
    if let Err(e) = frontend::auth::check_name(name) {
        eprintln!("jobz-frontend: {e}");
        return ExitCode::from(2);
    }
    let token = match frontend::auth::new_token() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("jobz-frontend: no randomness from the operating system: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("{token}");
    eprintln!("# Add this line to the --tokens file; the token above is shown only once.");
    eprintln!("{}", frontend::auth::file_line(name, scopes, &token));
    ExitCode::SUCCESS
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
    if let Some(code) = args.keys.print_public_key() {
        return code;
    }
    match &args.command {
        Some(Command::Token(TokenCommand::New { name, scopes })) => {
            return token_new(name, *scopes)
        }
        Some(Command::Token(TokenCommand::List { tokens })) => return token_list(tokens),
        None => {}
    }
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
    let identity = match args.keys.identity() {
        Ok(identity) => identity,
        Err(e) => {
            eprintln!("jobz-frontend: {e:#}");
            return ExitCode::from(2);
        }
    };
    let protected = args.tokens.is_some() || args.tls_client_ca.is_some();
    let listen = args.listen.unwrap_or_else(|| {
        if protected {
            SocketAddr::from(([0, 0, 0, 0], 6769))
        } else {
            tracing::info!("protected mode: no --tokens or --tls-client-ca, so the default listen address is 127.0.0.1:6769");
            SocketAddr::from(([127, 0, 0, 1], 6769))
        }
    });
    let config = frontend::Config {
        name: args.name,
        identity,
        broker: args.broker,
        listen,
        request_timeout: args.request_timeout,
        threads: usize::from(args.threads),
        public_url: args.public_url,
        security: frontend::Security {
            tokens: args.tokens,
            tls: match (args.tls_cert, args.tls_key) {
                (Some(cert), Some(key)) => Some(frontend::tls::TlsFiles {
                    cert,
                    key,
                    client_ca: args.tls_client_ca,
                }),
                _ => None,
            },
            insecure: args.insecure,
            health_listen: args.health_listen,
            max_connections: args.max_connections as usize,
            max_connections_per_address: args.max_connections_per_address as usize,
            reserved_connections: args.reserved_connections.map(|n| n as usize),
            idle_timeout: args.idle_timeout,
            header_timeout: args.header_timeout,
        },
    };
    match frontend::run(config, shutdown) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("jobz-frontend: {e:#}");
            ExitCode::FAILURE
        }
    }
}
