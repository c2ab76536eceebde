//! Settings of a semaphore process and their defaults.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;
use jobz::socket::BrokerAddr;

/// Default `--state`.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/jobz/semaphore";

/// Everything [`crate::run`] needs.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the broker is.
    pub broker: BrokerAddr,
    /// Job files; only their `semaphores:` and `schedules:` are used.
    pub jobs_dir: PathBuf,
    /// Directory of the durable barrier and schedule state.
    pub state_dir: PathBuf,
    /// How often the barriers are reported to the broker (for `GET /semaphores`).
    pub status_interval: Duration,
    /// How often completions are fetched again from the broker, to make up for events lost
    /// on the way (a slow subscription, a broker restart).
    pub catch_up_interval: Duration,
    /// This process's node id: `semaphore:<name>/<random>`; its key is enrolled as
    /// `semaphore:<name>`.
    pub node_id: String,
    /// This semaphore's key and the broker keys it trusts: frames are sealed when set.
    pub identity: Option<jobz::keys::NodeIdentity>,
}

impl Config {
    /// Defaults for everything but the broker and the node id.
    pub fn new(broker: BrokerAddr, node_id: String) -> Config {
        Config {
            broker,
            jobs_dir: PathBuf::from("/etc/jobz/jobs.d"),
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            status_interval: Duration::from_secs(2),
            catch_up_interval: Duration::from_secs(10),
            node_id,
            identity: None,
        }
    }

    /// Refuses settings that cannot work.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.status_interval < Duration::from_millis(10) {
            bail!("--status-interval must be at least 10ms");
        }
        if self.catch_up_interval < Duration::from_millis(100) {
            bail!("the catch-up interval must be at least 100ms");
        }
        if !(1..=200).contains(&self.node_id.len())
            || !self.node_id.bytes().all(|b| b.is_ascii_graphic())
        {
            bail!(
                "node id {:?} must be 1 to 200 printable characters",
                self.node_id
            );
        }
        Ok(())
    }
}

/// `semaphore:<name>/<8 hex digits>`: unique per process, so two semaphores on one host
/// (for availability) never read each other's replies. `name` defaults to the host name;
/// `semaphore:<name>` is what its key is enrolled as.
pub fn node_id(name: Option<&str>) -> anyhow::Result<String> {
    let name = jobz::keys::node_name("semaphore", name)?;
    let random = uuid::Uuid::new_v4().simple().to_string();
    Ok(format!("semaphore:{name}/{}", &random[..8]))
}

/// [`node_id`] named after the host.
pub fn default_node_id() -> anyhow::Result<String> {
    node_id(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids_are_valid_and_distinct() {
        let a = default_node_id().unwrap();
        let b = default_node_id().unwrap();
        assert!(a.starts_with("semaphore:"), "{a}");
        assert_ne!(a, b);
        let config = Config::new("127.0.0.1".parse().unwrap(), a);
        config.validate().unwrap();
        let mut bad = config.clone();
        bad.node_id = "has space".into();
        assert!(bad.validate().is_err());
    }
}
