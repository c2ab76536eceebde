//! The broker's key directory: its own key pair and the enrolled node keys (Salt's
//! `salt-key` model).
//!
//! ```text
//! DIR/broker.key                 the broker's secret key (0600), made at first start
//! DIR/broker.key.pub             its public key: give it to every node (--broker-key)
//! DIR/accepted/ROLE:NAME.pub     keys that may use the mesh
//! DIR/pending/ROLE:NAME.pub      keys that asked under that name, one a line, with when
//!                                they were first and last seen; they wait for an operator
//! DIR/rejected/ROLE:NAME.pub     keys refused or revoked
//! ```
//!
//! Every change is a rename inside DIR, so the running broker (which re-reads the
//! directory when it changes) never sees half a file, and an operator or Ansible can
//! pre-seed `accepted/` with plain files. A `.pub` file may hold two keys while a node's
//! key is being rotated. A key in `rejected/` is never served, whatever `accepted/` says.
//!
//! Only the broker adds to `pending/` ([`pending::PendingBook`] decides what it keeps);
//! the `keys` commands move keys out of it. A name with two pending keys is ambiguous:
//! `keys accept` then needs the fingerprint, so a key that said hello first under a name
//! does not win it.

pub mod pending;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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

/// The keys of one name in `accepted/` or `rejected/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyEntry {
    /// Enrolment name, `ROLE:NAME`.
    pub name: String,
    /// The keys in its file.
    pub keys: Vec<PublicKey>,
}

/// One key waiting under one name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingKey {
    /// The name it asked for, `ROLE:NAME`.
    pub name: String,
    /// The key.
    pub key: PublicKey,
    /// When the broker first saw it ask (Unix ms).
    pub first_seen_ms: i64,
    /// When it last asked (Unix ms; written at most every few minutes).
    pub last_seen_ms: i64,
}

/// Everything in a key directory, for `keys list`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listing {
    /// Accepted keys by name.
    pub accepted: Vec<KeyEntry>,
    /// Pending keys, by name then first sighting; keys also accepted or rejected are left
    /// out (the broker removes them from `pending/` shortly).
    pub pending: Vec<PendingKey>,
    /// Rejected keys by name.
    pub rejected: Vec<KeyEntry>,
}

/// What a `keys` command acted on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chosen {
    /// The enrolment name.
    pub name: String,
    /// The keys moved.
    pub keys: Vec<PublicKey>,
}

/// A broker key directory.
#[derive(Debug, Clone)]
pub struct KeyDir {
    root: PathBuf,
}

impl KeyDir {
    /// Opens a key directory, creating it if needed (the broker at start, `keys show`);
    /// the broker key is made on first use.
    pub fn open(root: &Path) -> anyhow::Result<KeyDir> {
        for state in KeyState::ALL {
            let dir = root.join(state.dir_name());
            fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        Ok(KeyDir {
            root: root.to_owned(),
        })
    }

    /// Opens a key directory that must exist already (the `keys` commands): a mistyped
    /// `--keys` is an error, not a new empty directory.
    pub fn existing(root: &Path) -> anyhow::Result<KeyDir> {
        let kd = KeyDir {
            root: root.to_owned(),
        };
        let is_key_dir =
            root.join(KeyState::Accepted.dir_name()).is_dir() || kd.broker_key_path().is_file();
        if !is_key_dir {
            bail!(
                "no key directory at {}: it holds neither broker.key nor accepted/ (is --keys right? \
                 The broker makes one at its first start with --keys, or `jobz-broker keys show`)",
                root.display()
            );
        }
        Ok(kd)
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

    /// The valid names with a file in `state`, sorted (a missing directory holds none).
    fn names(&self, state: KeyState) -> anyhow::Result<Vec<String>> {
        let dir = self.root.join(state.dir_name());
        let listing = match fs::read_dir(&dir) {
            Ok(listing) => listing,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
        };
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
        Ok(names)
    }

    /// The keys of `name` in `state` (none if it has no file).
    fn keys_of(&self, state: KeyState, name: &str) -> anyhow::Result<Vec<PublicKey>> {
        let path = self.file(state, name);
        match fs::read_to_string(&path) {
            Ok(text) => {
                keys::parse_public_keys(&text).with_context(|| format!("in {}", path.display()))
            }
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    fn entries(&self, state: KeyState) -> anyhow::Result<Vec<KeyEntry>> {
        let mut entries = Vec::new();
        for name in self.names(state)? {
            let keys = self.keys_of(state, &name)?;
            if !keys.is_empty() {
                entries.push(KeyEntry { name, keys });
            }
        }
        Ok(entries)
    }

    /// Every key, by state and name.
    pub fn list(&self) -> anyhow::Result<Listing> {
        let accepted = self.entries(KeyState::Accepted)?;
        let rejected = self.entries(KeyState::Rejected)?;
        let settled: HashSet<PublicKey> = accepted
            .iter()
            .chain(&rejected)
            .flat_map(|e| e.keys.iter().copied())
            .collect();
        let mut pending = self.pending()?;
        pending.retain(|p| !settled.contains(&p.key));
        Ok(Listing {
            accepted,
            pending,
            rejected,
        })
    }

    /// The accepted keys and whose they are. A key accepted under two names is refused
    /// for both: which node it is would be ambiguous. A key also in `rejected/` is left out.
    pub fn accepted(&self) -> anyhow::Result<HashMap<PublicKey, String>> {
        let rejected = self.rejected()?;
        let mut by_key: HashMap<PublicKey, String> = HashMap::new();
        let mut ambiguous = Vec::new();
        for entry in self.entries(KeyState::Accepted)? {
            for key in entry.keys {
                if rejected.contains(&key) {
                    continue;
                }
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

    /// Every rejected key.
    pub fn rejected(&self) -> anyhow::Result<HashSet<PublicKey>> {
        Ok(self
            .entries(KeyState::Rejected)?
            .into_iter()
            .flat_map(|e| e.keys)
            .collect())
    }

    /// When `name`'s accepted file was last written: when its newest key was accepted.
    pub fn accepted_at(&self, name: &str) -> Option<SystemTime> {
        fs::metadata(self.file(KeyState::Accepted, name))
            .and_then(|m| m.modified())
            .ok()
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

    /// The pending keys of one name.
    pub fn pending_of(&self, name: &str) -> anyhow::Result<Vec<PendingKey>> {
        let path = self.file(KeyState::Pending, name);
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        // Files written before the times were recorded: the file's time stands in.
        let modified = fs::metadata(&path)
            .and_then(|m| m.modified())
            .map(unix_ms)
            .unwrap_or(0);
        let mut found = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut words = line.split_whitespace();
            let key = PublicKey::parse(words.next().unwrap_or_default())
                .with_context(|| format!("{} line {}", path.display(), n + 1))?;
            let (mut first_seen_ms, mut last_seen_ms) = (modified, modified);
            for word in words {
                let time = |prefix: &str| {
                    word.strip_prefix(prefix)
                        .and_then(|t| humantime::parse_rfc3339_weak(t).ok())
                        .map(unix_ms)
                };
                if let Some(t) = time("first-seen=") {
                    first_seen_ms = t;
                } else if let Some(t) = time("last-seen=") {
                    last_seen_ms = t;
                }
            }
            found.push(PendingKey {
                name: name.to_owned(),
                key,
                first_seen_ms,
                last_seen_ms: last_seen_ms.max(first_seen_ms),
            });
        }
        Ok(found)
    }

    /// The names with a file in `pending/`.
    pub fn pending_names(&self) -> anyhow::Result<Vec<String>> {
        self.names(KeyState::Pending)
    }

    /// Every pending key, by name then first sighting.
    pub fn pending(&self) -> anyhow::Result<Vec<PendingKey>> {
        let mut all = Vec::new();
        for name in self.names(KeyState::Pending)? {
            let mut of_name = self.pending_of(&name)?;
            of_name.sort_by_key(|p| (p.first_seen_ms, p.key));
            all.extend(of_name);
        }
        Ok(all)
    }

    /// Makes `pending/NAME.pub` hold exactly `entries` (removed when empty). Not synced to
    /// disk: a pending record lost in a crash is made again at the node's next hello, and
    /// the broker writes these on its receiving thread.
    pub fn write_pending(&self, name: &str, entries: &[PendingKey]) -> anyhow::Result<()> {
        if !is_valid_principal(name) {
            bail!("{name:?} is not a valid key name (ROLE:NAME)");
        }
        let path = self.file(KeyState::Pending, name);
        if entries.is_empty() {
            return remove_if_present(&path);
        }
        let text: String = entries
            .iter()
            .map(|p| {
                format!(
                    "{} {name} first-seen={} last-seen={}\n",
                    p.key,
                    rfc3339(p.first_seen_ms),
                    rfc3339(p.last_seen_ms)
                )
            })
            .collect();
        replace_unsynced(&path, text.as_bytes())
    }

    /// Accepts a new key for a name that has none (`--auto-accept`). Returns false, doing
    /// nothing, if the name has an accepted key already.
    pub fn accept_new(&self, name: &str, key: &PublicKey) -> anyhow::Result<bool> {
        if !self.keys_of(KeyState::Accepted, name)?.is_empty() {
            return Ok(false);
        }
        self.add(name, &[*key])?;
        Ok(true)
    }

    /// `keys accept`: a pending key (or, given in full as ROLE:NAME, a rejected one) becomes
    /// the name's accepted key. `fingerprint` (as `keys list` shows it, or the whole public
    /// key) picks one of several; without it a name with two candidate keys is refused as
    /// ambiguous. A name that has an accepted key already is refused: its key is replaced
    /// only after `keys revoke`, or by editing the accepted file for a rotation.
    pub fn accept(&self, typed: &str, fingerprint: Option<&str>) -> anyhow::Result<Chosen> {
        let listing = self.list()?;
        let pending_names: Vec<&str> = listing.pending.iter().map(|p| p.name.as_str()).collect();
        let (name, candidates) = match resolve(typed, &pending_names) {
            Ok(name) => {
                let keys = self.pending_keys(&listing, &name);
                if keys.is_empty() {
                    // A full name with nothing pending: perhaps a rejected key to take back.
                    let rejected = self.keys_of(KeyState::Rejected, &name)?;
                    if rejected.is_empty() {
                        bail!("no pending key named {name:?} (see `jobz-broker keys list`)");
                    }
                    (name, rejected)
                } else {
                    (name, keys)
                }
            }
            Err(e) => return Err(e),
        };
        let key = pick_one(&name, &candidates, fingerprint, &listing, "accept")?;
        let current = self.keys_of(KeyState::Accepted, &name)?;
        if !current.is_empty() {
            bail!(
                "{name} already has an accepted key ({}). If {} is its new key, run \
                 `jobz-broker keys revoke {name}` first; to let both work during a rotation, \
                 add it as a second line of {}",
                fingerprints(&current, ", "),
                key.fingerprint(),
                self.file(KeyState::Accepted, &name).display()
            );
        }
        if let Some(other) = listing.accepted.iter().find(|e| e.keys.contains(&key)) {
            bail!(
                "key {} is already accepted as {}",
                key.fingerprint(),
                other.name
            );
        }
        self.add(&name, &[key])?;
        Ok(Chosen {
            name,
            keys: vec![key],
        })
    }

    /// `keys reject`: a pending key moves to `rejected/`; several pending under the name
    /// need `fingerprint`, as for [`KeyDir::accept`].
    pub fn reject(&self, typed: &str, fingerprint: Option<&str>) -> anyhow::Result<Chosen> {
        let listing = self.list()?;
        let pending_names: Vec<&str> = listing.pending.iter().map(|p| p.name.as_str()).collect();
        let name = resolve(typed, &pending_names)?;
        let candidates = self.pending_keys(&listing, &name);
        if candidates.is_empty() {
            bail!("no pending key named {name:?} (see `jobz-broker keys list`)");
        }
        let key = pick_one(&name, &candidates, fingerprint, &listing, "reject")?;
        self.move_keys(&name, &[key], KeyState::Pending, KeyState::Rejected)?;
        Ok(Chosen {
            name,
            keys: vec![key],
        })
    }

    /// `keys revoke`: every accepted key of the name (or only the one `fingerprint` names)
    /// moves to `rejected/`.
    pub fn revoke(&self, typed: &str, fingerprint: Option<&str>) -> anyhow::Result<Chosen> {
        let names = self.names(KeyState::Accepted)?;
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let name = resolve(typed, &names)?;
        let current = self.keys_of(KeyState::Accepted, &name)?;
        if current.is_empty() {
            bail!("no accepted key named {name:?} (see `jobz-broker keys list`)");
        }
        let keys = match fingerprint {
            None => current,
            Some(fp) => vec![matching(&name, &current, fp)?],
        };
        self.move_keys(&name, &keys, KeyState::Accepted, KeyState::Rejected)?;
        Ok(Chosen { name, keys })
    }

    /// Accepts keys given directly (pre-seeding): `accepted/NAME.pub` holds them, and they
    /// leave `pending/` and `rejected/`.
    pub fn add(&self, name: &str, keys: &[PublicKey]) -> anyhow::Result<()> {
        if !is_valid_principal(name) {
            bail!("{name:?} is not a valid key name: ROLE:NAME with ROLE worker, frontend or semaphore");
        }
        if keys.is_empty() {
            bail!("no public key given");
        }
        self.write_keys(KeyState::Accepted, name, keys)?;
        self.drop_keys(KeyState::Pending, name, keys)?;
        self.drop_keys(KeyState::Rejected, name, keys)
    }

    fn pending_keys(&self, listing: &Listing, name: &str) -> Vec<PublicKey> {
        listing
            .pending
            .iter()
            .filter(|p| p.name == name)
            .map(|p| p.key)
            .collect()
    }

    /// Moves keys of `name` from one state to another: added to the destination file
    /// first, so a crash in between leaves the key in both (and `rejected/` wins).
    fn move_keys(
        &self,
        name: &str,
        keys: &[PublicKey],
        from: KeyState,
        to: KeyState,
    ) -> anyhow::Result<()> {
        let mut merged = self.keys_of(to, name)?;
        for key in keys {
            if !merged.contains(key) {
                merged.push(*key);
            }
        }
        self.write_keys(to, name, &merged)?;
        self.drop_keys(from, name, keys)
    }

    fn write_keys(&self, state: KeyState, name: &str, keys: &[PublicKey]) -> anyhow::Result<()> {
        let dir = self.root.join(state.dir_name());
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let text: String = keys.iter().map(|k| format!("{k} {name}\n")).collect();
        let path = self.file(state, name);
        keys::write_atomically(&path, text.as_bytes())
            .with_context(|| format!("writing {}", path.display()))
    }

    /// Removes `keys` from `name`'s file in `state` (the file goes when none is left).
    fn drop_keys(&self, state: KeyState, name: &str, keys: &[PublicKey]) -> anyhow::Result<()> {
        if state == KeyState::Pending {
            let mut left = self.pending_of(name)?;
            left.retain(|p| !keys.contains(&p.key));
            return self.write_pending(name, &left);
        }
        let mut left = self.keys_of(state, name)?;
        let before = left.len();
        left.retain(|k| !keys.contains(k));
        if left.len() == before {
            return Ok(());
        }
        if left.is_empty() {
            return remove_if_present(&self.file(state, name));
        }
        self.write_keys(state, name, &left)
    }
}

/// Resolves a name as typed: exact `ROLE:NAME`, or a bare `NAME` that matches one of
/// `names`.
fn resolve(typed: &str, names: &[&str]) -> anyhow::Result<String> {
    if is_valid_principal(typed) {
        return Ok(typed.to_owned());
    }
    let mut matches: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| n.split_once(':').map(|(_, n)| n) == Some(typed))
        .collect();
    matches.sort_unstable();
    matches.dedup();
    match matches.as_slice() {
        [one] => Ok((*one).to_owned()),
        [] => bail!("no key named {typed:?} (see `jobz-broker keys list`)"),
        _ => bail!(
            "{typed:?} is ambiguous: {}; give ROLE:NAME",
            matches.join(", ")
        ),
    }
}

/// The one candidate key: the only one, or the one `fingerprint` names.
fn pick_one(
    name: &str,
    candidates: &[PublicKey],
    fingerprint: Option<&str>,
    listing: &Listing,
    verb: &str,
) -> anyhow::Result<PublicKey> {
    if let Some(fp) = fingerprint {
        return matching(name, candidates, fp);
    }
    match candidates {
        [one] => Ok(*one),
        _ => {
            let described: Vec<String> = candidates
                .iter()
                .map(|k| {
                    let seen = listing
                        .pending
                        .iter()
                        .find(|p| p.name == name && p.key == *k)
                        .map(|p| format!(" (first seen {})", rfc3339(p.first_seen_ms)))
                        .unwrap_or_default();
                    format!("  {}{seen}", k.fingerprint())
                })
                .collect();
            bail!(
                "{name} is ambiguous: {} keys ask for it; someone may be posing as the node. \
                 Compare with the node's own key (`--print-public-key` on its host), then \
                 `jobz-broker keys {verb} {name} --fingerprint FINGERPRINT`:\n{}",
                candidates.len(),
                described.join("\n")
            )
        }
    }
}

/// The key of `candidates` a fingerprint (`SHA256:…`, the `SHA256:` optional) or a whole
/// public key (`jobz1:…`) names.
fn matching(name: &str, candidates: &[PublicKey], given: &str) -> anyhow::Result<PublicKey> {
    let given = given.trim();
    let wanted = |k: &PublicKey| {
        if given.starts_with("jobz1:") {
            return PublicKey::parse(given).is_ok_and(|g| g == *k);
        }
        let print = k.fingerprint();
        let hex = print.trim_start_matches("SHA256:");
        given.eq_ignore_ascii_case(&print) || given.eq_ignore_ascii_case(hex)
    };
    let found: Vec<PublicKey> = candidates.iter().copied().filter(wanted).collect();
    match found.as_slice() {
        [one] => Ok(*one),
        [] => bail!(
            "no key of {name} has the fingerprint {given:?}; its keys: {}",
            fingerprints(candidates, ", ")
        ),
        _ => bail!(
            "{given:?} names {} keys of {name}: give the whole public key",
            found.len()
        ),
    }
}

fn fingerprints(keys: &[PublicKey], separator: &str) -> String {
    keys.iter()
        .map(PublicKey::fingerprint)
        .collect::<Vec<_>>()
        .join(separator)
}

/// Renders `keys list` at `now_ms`: one line per accepted or rejected name, one per
/// pending key, with a warning where a name is claimed twice.
pub fn render_list(listing: &Listing, now_ms: i64) -> String {
    let mut out = String::from("accepted:\n");
    for e in &listing.accepted {
        out.push_str(&format!(
            "  {:<40} {}\n",
            e.name,
            fingerprints(&e.keys, " ")
        ));
    }
    out.push_str("pending:\n");
    let accepted_names: HashSet<&str> = listing.accepted.iter().map(|e| e.name.as_str()).collect();
    let mut per_name: BTreeMap<&str, usize> = BTreeMap::new();
    for p in &listing.pending {
        *per_name.entry(&p.name).or_default() += 1;
    }
    for p in &listing.pending {
        let age = Duration::from_secs((now_ms - p.last_seen_ms).max(0) as u64 / 1000);
        let mut line = format!(
            "  {:<40} {}  seen {} ago",
            p.name,
            p.key.fingerprint(),
            humantime::format_duration(age)
        );
        if accepted_names.contains(p.name.as_str()) {
            line.push_str("  ! the name already has an accepted key");
        }
        let keys = per_name.get(p.name.as_str()).copied().unwrap_or(0);
        if keys > 1 {
            line.push_str(&format!(
                "  ! {keys} keys ask for this name: accept with --fingerprint"
            ));
        }
        out.push_str(&line);
        out.push('\n');
    }
    out.push_str("rejected:\n");
    for e in &listing.rejected {
        out.push_str(&format!(
            "  {:<40} {}\n",
            e.name,
            fingerprints(&e.keys, " ")
        ));
    }
    out
}

fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis().min(i64::MAX as u128) as i64)
}

fn rfc3339(ms: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

fn remove_if_present(path: &Path) -> anyhow::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", path.display()))
        }
        _ => Ok(()),
    }
}

/// Replaces a file by renaming a temporary sibling over it, without syncing.
fn replace_unsynced(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let written = fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(contents))
        .and_then(|()| fs::rename(&tmp, path));
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written.with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests;
