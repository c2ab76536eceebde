//! A worker's settings, as `main` builds them from the flags, and their defaults.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use jobz::jobfile::is_valid_name;
use jobz::socket::BrokerAddr;

/// Port the frontend listens on by default (SPEC: `0.0.0.0:6769`).
pub const DEFAULT_FRONTEND_PORT: u16 = 6769;

/// Everything [`crate::run`] needs to know.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the broker is (`--broker`).
    pub broker: BrokerAddr,
    /// The job files this worker serves (`--jobs-dir`).
    pub jobs_dir: PathBuf,
    /// Unique worker name (`--name`); assignments name it.
    pub name: String,
    /// Commands run at once (`--slots`); further tasks wait in a FIFO queue.
    pub slots: u32,
    /// Capabilities announced in heartbeats (`--capability`).
    pub capabilities: Vec<String>,
    /// Spool directory (`--spool`): what survives a crash (seen attempts, running attempts,
    /// unacknowledged results; see [`crate::spool`]) and per-task working directories
    /// under `work/`.
    pub spool: PathBuf,
    /// Log directory (`--log-dir`): `worker.log` and each task's output under `runs/`.
    pub log_dir: PathBuf,
    /// Heartbeat interval (`--heartbeat`).
    pub heartbeat: Duration,
    /// Base URL of the HTTP API, exported to commands as `JOBZ_FRONTEND` (`--frontend`).
    pub frontend: String,
    /// How long a stopping worker waits for running commands (`--drain-timeout`).
    pub drain_timeout: Duration,
    /// Between SIGTERM and SIGKILL when a command's process group is killed. Not a flag:
    /// 5 s in production, shorter in tests.
    pub kill_grace: Duration,
    /// At shutdown, how long to wait for the broker to acknowledge what was sent (results
    /// not acknowledged stay in the spool). Not a flag: 5 s in production.
    pub ack_wait: Duration,
    /// The step leader's program, the worker's own binary ([`crate::leader`]). Not a flag:
    /// `/proc/self/exe`, which still runs this worker's binary after an upgrade replaced
    /// the file; tests point it at the built `jobz-worker`.
    pub leader: PathBuf,
}

impl Config {
    /// A configuration with every default except the broker, name and directories' roots.
    pub fn new(broker: BrokerAddr, name: String) -> Config {
        let frontend = default_frontend(&broker);
        Config {
            broker,
            jobs_dir: PathBuf::from("/etc/jobz/jobs.d"),
            name,
            slots: default_slots(),
            capabilities: Vec::new(),
            spool: PathBuf::from("/var/lib/jobz/worker"),
            log_dir: PathBuf::from("/var/log/jobz"),
            heartbeat: Duration::from_secs(2),
            frontend,
            drain_timeout: Duration::from_secs(30),
            kill_grace: Duration::from_secs(5),
            ack_wait: Duration::from_secs(5),
            leader: PathBuf::from("/proc/self/exe"),
        }
    }

    /// The node id this worker uses on the mesh: `worker:<name>`.
    pub fn node_id(&self) -> String {
        format!("worker:{}", self.name)
    }

    /// Refuses settings the worker cannot run with, saying which flag to fix.
    pub fn validate(&self) -> anyhow::Result<()> {
        if !is_valid_name(&self.name) {
            bail!(
                "worker name {:?} must match [A-Za-z0-9_.-]{{1,128}} (set --name)",
                self.name
            );
        }
        if self.slots == 0 {
            bail!("--slots must be at least 1");
        }
        if self.heartbeat < Duration::from_millis(100) {
            bail!("--heartbeat must be at least 100ms");
        }
        if let Some(bad) = self
            .capabilities
            .iter()
            .find(|c| c.is_empty() || c.chars().any(|ch| ch.is_control() || ch == ' '))
        {
            bail!("capability {bad:?} must be a non-empty word");
        }
        if self.frontend.trim().is_empty() {
            bail!("--frontend must not be empty");
        }
        Ok(())
    }
}

/// `http://<broker host>:6769`: the frontend usually runs beside the broker.
pub fn default_frontend(broker: &BrokerAddr) -> String {
    if broker.host.contains(':') {
        format!("http://[{}]:{DEFAULT_FRONTEND_PORT}", broker.host)
    } else {
        format!("http://{}:{DEFAULT_FRONTEND_PORT}", broker.host)
    }
}

/// The host name, the default worker name.
pub fn default_name() -> anyhow::Result<String> {
    let name = hostname::get().context("reading the host name (set --name)")?;
    name.into_string()
        .map_err(|n| anyhow::anyhow!("host name {n:?} is not UTF-8 (set --name)"))
}

/// The CPU count, the default number of slots.
pub fn default_slots() -> u32 {
    std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config::new("127.0.0.1".parse().unwrap(), "web1".into())
    }

    #[test]
    fn defaults_follow_the_spec() {
        let c = config();
        assert_eq!(c.node_id(), "worker:web1");
        assert_eq!(c.frontend, "http://127.0.0.1:6769");
        assert_eq!(c.heartbeat, Duration::from_secs(2));
        assert!(c.slots >= 1);
        c.validate().unwrap();
    }

    #[test]
    fn frontend_default_brackets_ipv6_hosts() {
        let b: BrokerAddr = "[::1]:7000".parse().unwrap();
        assert_eq!(default_frontend(&b), "http://[::1]:6769");
    }

    #[test]
    fn bad_settings_are_refused_with_the_flag_to_fix() {
        let mut c = config();
        c.name = "web 1".into();
        assert!(c.validate().unwrap_err().to_string().contains("--name"));
        let mut c = config();
        c.slots = 0;
        assert!(c.validate().unwrap_err().to_string().contains("--slots"));
        let mut c = config();
        c.capabilities = vec!["".into()];
        assert!(c.validate().is_err());
    }
}
