//! A worker's settings, as `main` builds them from the flags, and their defaults.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use jobz::jobfile::{is_valid_name, is_valid_user_name};
use jobz::socket::BrokerAddr;

use crate::runner::is_valid_env_name;

/// Port the frontend listens on by default (SPEC: `0.0.0.0:6769`).
pub const DEFAULT_FRONTEND_PORT: u16 = 6769;

/// Default `--max-step-output`: 64 MiB of output per step attempt.
pub const DEFAULT_MAX_STEP_OUTPUT: u64 = 64 << 20;

/// Default `--output-retention`: a week.
pub const DEFAULT_OUTPUT_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

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
    /// Format of `worker.log` (`--worker-log-format`).
    pub worker_log_format: jobz::logging::LogFormat,
    /// Heartbeat interval (`--heartbeat`).
    pub heartbeat: Duration,
    /// This worker's key and the broker keys it trusts (`--key`, `--broker-key`): frames
    /// are sealed when set.
    pub identity: Option<jobz::keys::NodeIdentity>,
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
    /// The step supervisor's program ([`crate::supervisor::program`]: `jobz-step` beside
    /// the worker, else the worker's own binary). Not a flag: `/proc/self/exe` by default,
    /// which still runs this worker's binary after an upgrade replaced the file; tests
    /// point it at the built `jobz-step`.
    pub step_program: PathBuf,
    /// Names passed from the worker's environment to every step, besides the fixed
    /// allow-list (`--env-allow`; see [`crate::runner::step_env`]).
    pub env_allow: Vec<String>,
    /// Bytes of output kept per step attempt; the rest is dropped with a marker line
    /// (`--max-step-output`).
    pub max_step_output: u64,
    /// The user steps without `run_as:` run as (`--default-run-as`); `None`: the worker's.
    pub default_run_as: Option<String>,
    /// Step outputs (and damaged spool entries set aside) not modified for this long are
    /// removed (`--output-retention`; see [`crate::retention`]).
    pub output_retention: Duration,
    /// How often the output retention runs (`--prune-every`, hidden).
    pub prune_every: Duration,
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
            worker_log_format: jobz::logging::LogFormat::Text,
            heartbeat: Duration::from_secs(2),
            identity: None,
            frontend,
            drain_timeout: Duration::from_secs(30),
            kill_grace: Duration::from_secs(5),
            ack_wait: Duration::from_secs(5),
            step_program: PathBuf::from("/proc/self/exe"),
            env_allow: Vec::new(),
            max_step_output: DEFAULT_MAX_STEP_OUTPUT,
            default_run_as: None,
            output_retention: DEFAULT_OUTPUT_RETENTION,
            prune_every: Duration::from_secs(60),
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
        if let Some(bad) = self.env_allow.iter().find(|n| !is_valid_env_name(n)) {
            bail!("--env-allow {bad:?} is not a variable name ([A-Za-z_][A-Za-z0-9_]*)");
        }
        if self.output_retention < Duration::from_secs(1) {
            bail!("--output-retention must be at least 1s");
        }
        if self.prune_every < Duration::from_millis(10) {
            bail!("--prune-every must be at least 10ms");
        }
        if self.max_step_output == 0 {
            bail!("--max-step-output must be at least 1 byte");
        }
        if let Some(user) = self
            .default_run_as
            .as_deref()
            .filter(|u| !is_valid_user_name(u))
        {
            bail!("--default-run-as {user:?} is not a valid user name");
        }
        Ok(())
    }
}

/// A byte count: `1048576`, or a whole number with a binary unit, `64MiB`, `512KiB`,
/// `1GiB` (`K`, `M`, `G`, `KB`, `MB`, `GB` mean the same; case does not matter).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let digits = text.len() - text.trim_start_matches(|c: char| c.is_ascii_digit()).len();
    let (number, unit) = text.split_at(digits);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size (e.g. 1048576, 512KiB, 64MiB)"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        other => return Err(format!("{other:?} is not a size unit (KiB, MiB, GiB)")),
    };
    number
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("{text:?} is too large"))
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
        let mut c = config();
        c.env_allow = vec!["FOO".into(), "A=B".into()];
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("--env-allow"));
        let mut c = config();
        c.max_step_output = 0;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("--max-step-output"), "{e}");
        let mut c = config();
        c.output_retention = Duration::ZERO;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("--output-retention"), "{e}");
        let mut c = config();
        c.default_run_as = Some("../root".into());
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("--default-run-as"), "{e}");
    }

    #[test]
    fn sizes_take_binary_units() {
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("512 kib"), Ok(512 << 10));
        assert_eq!(parse_size("1GB"), Ok(1 << 30));
        assert_eq!(parse_size("10b"), Ok(10));
        for bad in [
            "",
            "MiB",
            "-1",
            "1.5MiB",
            "64 TiB",
            "99999999999999999999",
            "99999999999GiB",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
    }
}
