use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::bail;
use clap::{Parser, Subcommand};
use jobz::logging::LogArgs;
use jobz::socket::BrokerAddr;

use broker::guard::{SealedConfig, Security};
use broker::keys::{render_list, KeyDir};

/// The jobz broker: receives triggers and step results, keeps durable state, publishes work.
#[derive(Debug, Parser)]
#[command(name = "jobz-broker", version = jobz::VERSION)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// Address to bind; PUB takes the base port, PULL base + 1. Default 0.0.0.0:6795 with
    /// --keys; without keys only loopback is allowed (default 127.0.0.1:6795) unless
    /// --insecure.
    #[arg(long, env = "JOBZ_BIND", value_name = "ADDR[:BASE_PORT]")]
    bind: Option<BrokerAddr>,
    /// Key directory: turns on sealed frames (authenticated, encrypted) and enrolment.
    /// Holds the broker's key (made at first start) and the accepted, pending and
    /// rejected node keys.
    #[arg(long, env = "JOBZ_KEYS", value_name = "DIR")]
    keys: Option<PathBuf>,
    /// Serve plain frames on a non-loopback address: anyone who reaches the ports can
    /// trigger jobs and read parameters. For isolated test networks only.
    #[arg(long, env = "JOBZ_INSECURE")]
    insecure: bool,
    /// Accept every new node key at once instead of keeping it pending (labs only).
    #[arg(long, env = "JOBZ_AUTO_ACCEPT", requires = "keys")]
    auto_accept: bool,
    /// Make a new mesh key this often (it is also renewed after every revocation).
    #[arg(long, env = "JOBZ_MESH_KEY_LIFETIME", default_value = "1h", value_parser = humantime::parse_duration)]
    mesh_key_lifetime: Duration,
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
    /// Days a finished run is kept (by its end); older ones are pruned with their steps,
    /// tasks and attempts. A run with a dead task not yet retried stays while /dead lists it.
    #[arg(
        long,
        env = "JOBZ_HISTORY_DAYS",
        default_value_t = 7,
        value_name = "DAYS"
    )]
    history_days: u32,
    /// Finished runs kept at most (the newest); older ones are pruned likewise.
    #[arg(
        long,
        env = "JOBZ_HISTORY_COUNT",
        default_value_t = 100_000,
        value_name = "N"
    )]
    history_count: u64,
    /// How often to look for history to prune when the last look found nothing more
    /// (a backlog goes a batch every 100 ms). For tests.
    #[arg(long, env = "JOBZ_PRUNE_EVERY", default_value = "5s", hide = true,
        value_parser = humantime::parse_duration)]
    prune_every: Duration,
    /// Where notices go: a YAML file naming webhooks (URL and secret file) and the SMTP
    /// server that the jobs' `notify:` entries use. Without it, notices wait in the store.
    #[arg(long, env = "JOBZ_NOTIFY", value_name = "FILE")]
    notify: Option<PathBuf>,
    /// Check the --notify file (its webhooks, SMTP server and the secret files they name)
    /// and exit: 0 if it is good, 2 otherwise, binding nothing. For deployment tools, to
    /// refuse a broken file before it replaces a good one.
    #[arg(long)]
    check: bool,
    #[command(flatten)]
    log: LogArgs,
}

/// Offline commands on the key directory; the running broker notices changes within a second.
#[derive(Debug, Subcommand)]
enum Command {
    /// Manage node keys (Salt's salt-key model).
    Keys {
        #[command(subcommand)]
        action: KeysAction,
        /// The broker's key directory.
        #[arg(
            long,
            global = true,
            env = "JOBZ_KEYS",
            value_name = "DIR",
            default_value = "/etc/jobz/broker-keys"
        )]
        keys: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum KeysAction {
    /// Lists accepted, pending and rejected keys with their fingerprints: each pending key
    /// on its own line, flagged when two keys ask for one name or the name is enrolled.
    List,
    /// Accepts a pending key. NAME is ROLE:NAME, or NAME alone if unambiguous; when more
    /// than one key asks for the name, --fingerprint says which.
    Accept {
        name: String,
        #[command(flatten)]
        which: WhichKey,
    },
    /// Rejects a pending key (--fingerprint as for accept).
    Reject {
        name: String,
        #[command(flatten)]
        which: WhichKey,
    },
    /// Revokes an accepted key: the node is refused within a second. Every key of the
    /// name, or only the one --fingerprint names (the old key after a rotation).
    Revoke {
        name: String,
        #[command(flatten)]
        which: WhichKey,
    },
    /// Accepts a key given directly, e.g. pre-seeded by Ansible: ROLE:NAME and the key
    /// text (`jobz1:…`) or a file holding it.
    Add { name: String, key: String },
    /// Prints the broker's public key (made if missing, with the directory), for the
    /// nodes' --broker-key.
    Show,
}

#[derive(Debug, clap::Args)]
struct WhichKey {
    /// The key meant: its fingerprint as `keys list` shows it (`SHA256:…`), or the whole
    /// public key as `--print-public-key` prints it on the node (`jobz1:…`).
    #[arg(long, value_name = "FINGERPRINT")]
    fingerprint: Option<String>,
}

fn run_keys(dir: &std::path::Path, action: KeysAction) -> anyhow::Result<()> {
    // Only `show` may make the directory (it makes the broker key): a mistyped --keys
    // must fail, not list an empty new directory.
    let existing = || KeyDir::existing(dir);
    match action {
        KeysAction::List => print!("{}", render_list(&existing()?.list()?, jobz::now_ms())),
        KeysAction::Accept { name, which } => {
            let chosen = existing()?.accept(&name, which.fingerprint.as_deref())?;
            println!("accepted {}", chosen.name);
        }
        KeysAction::Reject { name, which } => {
            let chosen = existing()?.reject(&name, which.fingerprint.as_deref())?;
            println!("rejected {}", chosen.name);
        }
        KeysAction::Revoke { name, which } => {
            let chosen = existing()?.revoke(&name, which.fingerprint.as_deref())?;
            println!("revoked {}", chosen.name);
        }
        KeysAction::Add { name, key } => {
            let keys = if key.starts_with("jobz1:") {
                jobz::keys::parse_public_keys(&key)?
            } else {
                jobz::keys::read_public_keys(std::path::Path::new(&key))?
            };
            existing()?.add(&name, &keys)?;
            println!("accepted {name}");
        }
        KeysAction::Show => {
            let (key, _) = KeyDir::open(dir)?.broker_key()?;
            println!("{}", key.public());
        }
    }
    Ok(())
}

/// The address to bind: as given, or the default for the security mode.
fn bind_address(args: &Args) -> BrokerAddr {
    let (host, default) = if args.keys.is_some() {
        ("0.0.0.0", "sealed")
    } else {
        ("127.0.0.1", "protected")
    };
    args.bind.clone().unwrap_or_else(|| {
        tracing::info!("{default} mode: binding {host} by default");
        BrokerAddr {
            host: host.into(),
            base_port: jobz::socket::DEFAULT_BASE_PORT,
        }
    })
}

/// Protected mode: plain frames only on loopback, unless the operator insists.
fn security(args: &Args, bind: &BrokerAddr) -> anyhow::Result<Security> {
    let Some(dir) = &args.keys else {
        if !bind.is_loopback() {
            if !args.insecure {
                bail!(
                    "refusing to bind {} without keys: anyone reaching it could run jobs on every host. \
                     Give --keys DIR (sealed frames, enrolled nodes), bind a loopback address, \
                     or pass --insecure on an isolated network",
                    bind.pub_endpoint()
                );
            }
            tracing::warn!(
                bind = %bind.pub_endpoint(),
                "INSECURE: plain frames on a non-loopback address; anyone who reaches these ports can trigger jobs and read parameters"
            );
        } else {
            tracing::info!("protected mode: no --keys, so plain frames and loopback peers only");
        }
        return Ok(Security::Plain);
    };
    Ok(Security::Sealed(SealedConfig {
        keys: KeyDir::open(dir)?,
        auto_accept: args.auto_accept,
        mesh_key_lifetime: args.mesh_key_lifetime,
    }))
}

/// `--check`: the notify file, loaded as a start would load it.
fn check_notify(file: Option<&std::path::Path>) -> ExitCode {
    let Some(file) = file else {
        println!("jobz-broker: nothing to check (no --notify file)");
        return ExitCode::SUCCESS;
    };
    match broker::notify::NotifyConfig::load(file) {
        Ok(config) => {
            println!(
                "{}: ok ({} webhook(s), {})",
                file.display(),
                config.webhooks.len(),
                if config.smtp.is_some() {
                    "SMTP"
                } else {
                    "no SMTP"
                }
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("jobz-broker: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn main() -> ExitCode {
    let mut args = Args::parse();
    if let Some(Command::Keys { action, keys }) = args.command.take() {
        return match run_keys(&keys, action) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("jobz-broker keys: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    if args.check {
        return check_notify(args.notify.as_deref());
    }
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
    let bind = bind_address(&args);
    let security = match security(&args, &bind) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("jobz-broker: {e:#}");
            return ExitCode::from(2);
        }
    };
    let notify = match args
        .notify
        .as_deref()
        .map(broker::notify::NotifyConfig::load)
    {
        None => None,
        Some(Ok(config)) => Some(std::sync::Arc::new(config)),
        Some(Err(e)) => {
            tracing::error!("{e:#}");
            eprintln!("jobz-broker: {e:#}");
            return ExitCode::from(2);
        }
    };
    let config = broker::Config {
        notify,
        security,
        bind,
        state_dir: args.state,
        worker_expiry: args.worker_expiry,
        redeliver_after: args.redeliver_after,
        lease_timeout: args.lease_timeout,
        lease_grace: args.lease_grace,
        history: broker::store::Retention::new(args.history_days, args.history_count),
        prune_every: args.prune_every,
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
