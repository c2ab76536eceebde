//! The broker's key directory: its own key pair and the enrolled node keys (Salt's
//! `salt-key` model).
//!
//! ```text
//! DIR/broker.key                 the broker's secret key (0600), made at first start
//! DIR/broker.key.pub             its public key: give it to every node (--broker-key)
//! DIR/accepted/ROLE:NAME.pub     keys that may use the mesh
//! DIR/pending/ROLE:NAME.pub      keys that asked and wait for an operator
//! DIR/rejected/ROLE:NAME.pub     keys refused or revoked
//! ```
//!
//! Every change is a rename inside DIR, so the running broker (which re-reads the
//! directory when it changes) never sees half a file, and an operator or Ansible can
//! pre-seed `accepted/` with plain files. A `.pub` file may hold two keys while a node's
//! key is being rotated.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{bail, Context};
use jobz::keys::{self, is_valid_principal, NodeKey, PublicKey};

/// The state a key is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum KeyState {
    /// May use the mesh.
    Accepted,
    /// Asked, waiting for an operator.
    Pending,
    /// Refused or revoked.
    Rejected,
}

impl KeyState {
    fn dir_name(self) -> &'static str {
        match self {
            KeyState::Accepted => "accepted",
            KeyState::Pending => "pending",
            KeyState::Rejected => "rejected",
        }
    }

    const ALL: [KeyState; 3] = [KeyState::Accepted, KeyState::Pending, KeyState::Rejected];
}

/// One entry of `keys list`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyEntry {
    /// Enrolment name, `ROLE:NAME`.
    pub name: String,
    /// Where it is.
    pub state: KeyState,
    /// The keys in its file.
    pub keys: Vec<PublicKey>,
}

/// Most pending requests kept: a flood of new keys cannot fill the disk.
const MAX_PENDING: usize = 1000;

/// A broker key directory.
#[derive(Debug, Clone)]
pub struct KeyDir {
    root: PathBuf,
}

impl KeyDir {
    /// Opens (creating if needed) a key directory; the broker key is made on first use.
    pub fn open(root: &Path) -> anyhow::Result<KeyDir> {
        for state in KeyState::ALL {
            let dir = root.join(state.dir_name());
            fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        Ok(KeyDir {
            root: root.to_owned(),
        })
    }

    /// The directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Path of the broker's secret key.
    pub fn broker_key_path(&self) -> PathBuf {
        self.root.join("broker.key")
    }

    /// Loads the broker's key, creating it on first start.
    pub fn broker_key(&self) -> anyhow::Result<(NodeKey, bool)> {
        NodeKey::load_or_create(&self.broker_key_path())
    }

    fn file(&self, state: KeyState, name: &str) -> PathBuf {
        self.root.join(state.dir_name()).join(format!("{name}.pub"))
    }

    /// Every key, by state and name.
    pub fn list(&self) -> anyhow::Result<Vec<KeyEntry>> {
        let mut entries = Vec::new();
        for state in KeyState::ALL {
            let dir = self.root.join(state.dir_name());
            let listing =
                fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))?;
            let mut names = Vec::new();
            for item in listing {
                let item = item.with_context(|| format!("listing {}", dir.display()))?;
                let file_name = item.file_name();
                let Some(name) = file_name.to_str().and_then(|n| n.strip_suffix(".pub")) else {
                    continue; // temporary files, editor backups
                };
                if is_valid_principal(name) {
                    names.push(name.to_owned());
                }
            }
            names.sort();
            for name in names {
                let path = self.file(state, &name);
                let keys = keys::read_public_keys(&path)?;
                entries.push(KeyEntry { name, state, keys });
            }
        }
        Ok(entries)
    }

    /// The accepted keys and whose they are. A key accepted under two names is refused
    /// for both: which node it is would be ambiguous.
    pub fn accepted(&self) -> anyhow::Result<HashMap<PublicKey, String>> {
        let mut by_key: HashMap<PublicKey, String> = HashMap::new();
        let mut ambiguous = Vec::new();
        for entry in self.list()? {
            if entry.state != KeyState::Accepted {
                continue;
            }
            for key in entry.keys {
                if let Some(other) = by_key.insert(key, entry.name.clone()) {
                    if other != entry.name {
                        ambiguous.push(key);
                        tracing::error!(%key, first = %other, second = %entry.name, "a key is accepted under two names: refused for both");
                    }
                }
            }
        }
        for key in ambiguous {
            by_key.remove(&key);
        }
        Ok(by_key)
    }

    /// A fingerprint of the accepted and rejected directories' state: it changes whenever
    /// a key is accepted, revoked or edited.
    pub fn version(&self) -> Option<Vec<(SystemTime, u64)>> {
        let mut version = Vec::new();
        for state in [KeyState::Accepted, KeyState::Rejected] {
            let dir = self.root.join(state.dir_name());
            let meta = fs::metadata(&dir).ok()?;
            version.push((meta.modified().ok()?, meta.len()));
            for item in fs::read_dir(&dir).ok()?.flatten() {
                let meta = item.metadata().ok()?;
                version.push((meta.modified().ok()?, meta.len()));
            }
        }
        Some(version)
    }

    /// Records a key that asked to join. Does nothing for a key already known in any state
    /// under this name (a changed key of an accepted node must be handled by an operator,
    /// as with ssh host keys), or when too many requests are pending.
    pub fn record_pending(&self, name: &str, key: &PublicKey) -> anyhow::Result<bool> {
        if !is_valid_principal(name) {
            bail!("{name:?} is not a valid key name (ROLE:NAME)");
        }
        for state in KeyState::ALL {
            if self.file(state, name).exists() {
                return Ok(false);
            }
        }
        let pending = self.root.join(KeyState::Pending.dir_name());
        let count = fs::read_dir(&pending)
            .with_context(|| format!("listing {}", pending.display()))?
            .count();
        if count >= MAX_PENDING {
            return Ok(false);
        }
        let path = self.file(KeyState::Pending, name);
        keys::write_atomically(&path, format!("{key} {name}\n").as_bytes())
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(true)
    }

    /// Resolves a name as typed: exact `ROLE:NAME`, or a bare `NAME` that matches one entry.
    pub fn resolve(&self, typed: &str, state: KeyState) -> anyhow::Result<String> {
        if is_valid_principal(typed) {
            return Ok(typed.to_owned());
        }
        let matches: Vec<String> = self
            .list()?
            .into_iter()
            .filter(|e| e.state == state && e.name.split_once(':').map(|(_, n)| n) == Some(typed))
            .map(|e| e.name)
            .collect();
        match matches.as_slice() {
            [one] => Ok(one.clone()),
            [] => bail!(
                "no {} key named {typed:?} (see `jobz-broker keys list`)",
                state.dir_name()
            ),
            _ => bail!(
                "{typed:?} is ambiguous: {}; give ROLE:NAME",
                matches.join(", ")
            ),
        }
    }

    /// Moves a key from one state to another.
    pub fn transition(&self, name: &str, from: &[KeyState], to: KeyState) -> anyhow::Result<()> {
        for state in from {
            let src = self.file(*state, name);
            if src.exists() {
                let dst = self.file(to, name);
                fs::rename(&src, &dst)
                    .with_context(|| format!("moving {} to {}", src.display(), dst.display()))?;
                return Ok(());
            }
        }
        let states: Vec<&str> = from.iter().map(|s| s.dir_name()).collect();
        bail!("no key named {name:?} in {}", states.join(" or "))
    }

    /// Accepts a key given directly (pre-seeding): writes `accepted/NAME.pub`.
    pub fn add(&self, name: &str, keys: &[PublicKey]) -> anyhow::Result<()> {
        if !is_valid_principal(name) {
            bail!("{name:?} is not a valid key name: ROLE:NAME with ROLE worker, frontend or semaphore");
        }
        if keys.is_empty() {
            bail!("no public key given");
        }
        let text: String = keys.iter().map(|k| format!("{k} {name}\n")).collect();
        let path = self.file(KeyState::Accepted, name);
        keys::write_atomically(&path, text.as_bytes())
            .with_context(|| format!("writing {}", path.display()))?;
        for state in [KeyState::Pending, KeyState::Rejected] {
            let _ = fs::remove_file(self.file(state, name));
        }
        Ok(())
    }
}

/// Renders `keys list`.
pub fn render_list(entries: &[KeyEntry]) -> String {
    let mut by_state: BTreeMap<KeyState, Vec<&KeyEntry>> = BTreeMap::new();
    for e in entries {
        by_state.entry(e.state).or_default().push(e);
    }
    let mut out = String::new();
    for state in KeyState::ALL {
        out.push_str(&format!("{}:\n", state.dir_name()));
        for e in by_state.get(&state).into_iter().flatten() {
            let prints: Vec<String> = e.keys.iter().map(|k| k.fingerprint()).collect();
            out.push_str(&format!("  {:<40} {}\n", e.name, prints.join(" ")));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> PublicKey {
        NodeKey::generate().unwrap().public()
    }

    #[test]
    fn pending_accept_revoke_cycle() {
        let dir = tempfile::tempdir().unwrap();
        let kd = KeyDir::open(dir.path()).unwrap();
        let k = key();
        assert!(kd.record_pending("worker:web1", &k).unwrap());
        assert!(
            !kd.record_pending("worker:web1", &key()).unwrap(),
            "replaced a pending key"
        );
        assert!(kd.accepted().unwrap().is_empty());

        let v0 = kd.version();
        let name = kd.resolve("web1", KeyState::Pending).unwrap();
        assert_eq!(name, "worker:web1");
        kd.transition(&name, &[KeyState::Pending], KeyState::Accepted)
            .unwrap();
        assert_ne!(kd.version(), v0);
        assert_eq!(
            kd.accepted().unwrap().get(&k).map(String::as_str),
            Some("worker:web1")
        );
        // A known name never gets a second pending entry (a changed key needs an operator).
        assert!(!kd.record_pending("worker:web1", &key()).unwrap());

        kd.transition(&name, &[KeyState::Accepted], KeyState::Rejected)
            .unwrap();
        assert!(kd.accepted().unwrap().is_empty());
        let listed = render_list(&kd.list().unwrap());
        assert!(listed.contains("rejected:\n  worker:web1"), "{listed}");
    }

    #[test]
    fn add_preseeds_and_bad_names_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let kd = KeyDir::open(dir.path()).unwrap();
        let (a, b) = (key(), key());
        kd.add("frontend:front1", &[a, b]).unwrap();
        let accepted = kd.accepted().unwrap();
        assert_eq!(accepted.len(), 2, "both keys of a rotation are accepted");
        for bad in ["../x", "worker:../../etc", "web1", "worker:a/b"] {
            assert!(kd.add(bad, &[a]).is_err(), "{bad}");
            assert!(kd.record_pending(bad, &a).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_key_accepted_under_two_names_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let kd = KeyDir::open(dir.path()).unwrap();
        let k = key();
        kd.add("worker:a", &[k]).unwrap();
        kd.add("worker:b", &[k]).unwrap();
        assert!(kd.accepted().unwrap().is_empty());
    }

    #[test]
    fn ambiguous_short_names_need_the_role() {
        let dir = tempfile::tempdir().unwrap();
        let kd = KeyDir::open(dir.path()).unwrap();
        kd.record_pending("worker:h1", &key()).unwrap();
        kd.record_pending("frontend:h1", &key()).unwrap();
        let err = kd.resolve("h1", KeyState::Pending).unwrap_err().to_string();
        assert!(err.contains("ambiguous"), "{err}");
    }
}
