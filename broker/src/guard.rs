//! What stands between the sockets and the engine: frames in are opened, authenticated
//! and matched to an enrolled key before the engine sees them; frames out are sealed.
//!
//! Two modes. **Plain** (no key directory): frames are not protected, so the broker binds
//! loopback only unless the operator says `--insecure`. **Sealed**: every frame is a
//! [`jobz::seal`] frame; a node's frames count only if its key is accepted in the key
//! directory, the node id it claims belongs to that key's enrolment name, and it was
//! sealed after the key was accepted. A proven key that is not accepted is filed as
//! pending ([`PendingBook`]) and its frame dropped.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use jobz::envelope::{self, DecodeError, Envelope};
use jobz::keys::{is_valid_principal, principal_of, PublicKey};
use jobz::seal::{self, BrokerOpener, BrokerSealer, MeshRing, MAX_CLOCK_SKEW_MS};
use jobz::topic::Topic;
use tracing::{error, info, warn};

use crate::keys::pending::PendingBook;
use crate::keys::KeyDir;
use crate::ring_file::RingFile;

/// How the broker protects its sockets.
#[derive(Debug, Clone)]
pub enum Security {
    /// Plain frames: loopback only, unless `--insecure`.
    Plain,
    /// Sealed frames from enrolled keys.
    Sealed(SealedConfig),
}

/// Settings of the sealed mode.
#[derive(Debug, Clone)]
pub struct SealedConfig {
    /// The key directory.
    pub keys: KeyDir,
    /// Accept every new key at once (for labs; loudly logged).
    pub auto_accept: bool,
    /// Make a new mesh key this often.
    pub mesh_key_lifetime: Duration,
}

/// Why a frame was dropped: a metric label and a description for the log.
pub type Refusal = (&'static str, String);

/// State shared by the receiving and the publishing side.
#[derive(Clone)]
struct Shared {
    /// The key each node id authenticated with, to seal replies to it.
    reply_keys: Arc<Mutex<ReplyKeys>>,
    ring: Arc<Mutex<MeshRing>>,
}

/// The receiving side.
pub enum Inbound {
    /// Plain frames.
    Plain,
    /// Sealed frames.
    Sealed(Box<SealedInbound>),
}

/// The receiving side of the sealed mode.
pub struct SealedInbound {
    config: SealedConfig,
    opener: BrokerOpener,
    accepted: HashMap<PublicKey, String>,
    accepted_names: HashSet<String>,
    rejected: HashSet<PublicKey>,
    /// Keys that asked to join, mirrored to `pending/`.
    pending: PendingBook,
    /// Recently accepted keys, whose frames sealed before their acceptance are refused.
    cutoffs: AcceptanceCutoffs,
    keys_version: Option<Vec<(SystemTime, u64)>>,
    /// Whether the key directory was read once (keys found at start were not accepted
    /// "now").
    loaded: bool,
    next_check: Instant,
    shared: Shared,
    /// Enrolment log lines, throttled: new keys, conflicts, evictions, write failures.
    log_new: LogThrottle,
    log_conflict: LogThrottle,
    log_evicted: LogThrottle,
    log_write: LogThrottle,
    ring_file: RingFile,
}

/// The publishing side.
pub enum Outbound {
    /// Plain frames.
    Plain,
    /// Sealed frames.
    Sealed(Box<SealedOutbound>),
}

/// The publishing side of the sealed mode.
pub struct SealedOutbound {
    sealer: BrokerSealer,
    shared: Shared,
}

/// How often the key directory is looked at for changes (a revocation takes effect
/// within this, well inside one worker heartbeat).
const KEYS_CHECK_EVERY: Duration = Duration::from_millis(500);

/// Sender ids remembered per enrolment name for replies. A worker uses one
/// (`worker:NAME`); a frontend or semaphore one per run of the process
/// (`frontend:NAME/INSTANCE`), so a few restarts overlap; the least recently heard goes.
const MAX_SENDER_IDS_PER_PRINCIPAL: usize = 8;

/// Longest sender id remembered: the engine refuses longer node ids (they become topics).
const MAX_SENDER_ID_BYTES: usize = 200;

/// `pending/` files written per tick at most, so a flood of new keys costs the receiving
/// thread a bounded time; the rest wait for the next tick.
const PENDING_WRITES_PER_TICK: usize = 64;

/// How long an acceptance cutoff matters: past it, a frame sealed before the acceptance
/// is refused as stale anyway.
const CUTOFF_KEPT_MS: i64 = 2 * MAX_CLOCK_SKEW_MS + 1000;

/// Unaccepted keys whose latest frame time is remembered (see [`AcceptanceCutoffs`]).
const MAX_WATERMARKS: usize = 10_000;

/// Builds both sides for a security mode.
pub fn build(security: &Security, now_ms: i64) -> anyhow::Result<(Inbound, Outbound)> {
    let Security::Sealed(config) = security else {
        return Ok((Inbound::Plain, Outbound::Plain));
    };
    let (key, created) = config.keys.broker_key()?;
    info!(
        keys = %config.keys.root().display(),
        public_key = %key.public(),
        fingerprint = %key.public().fingerprint(),
        created,
        "sealed mode: frames are authenticated and encrypted; only accepted keys are served"
    );
    if config.auto_accept {
        warn!("--auto-accept is on: ANY node that connects is enrolled; use it only on a trusted lab network");
    }
    // The ring of the last run, if fit to keep, so nodes read on without a new hello.
    let ring_file = RingFile::in_dir(config.keys.root());
    let ring = ring_file.load(now_ms, max_key_in_use_ms(config));
    save_ring(&ring_file, &ring.to_text());
    let shared = Shared {
        reply_keys: Arc::new(Mutex::new(ReplyKeys::default())),
        ring: Arc::new(Mutex::new(ring)),
    };
    let mut inbound = SealedInbound {
        config: config.clone(),
        opener: BrokerOpener::new(&key),
        accepted: HashMap::new(),
        accepted_names: HashSet::new(),
        rejected: HashSet::new(),
        pending: PendingBook::load(load_pending(&config.keys), now_ms),
        cutoffs: AcceptanceCutoffs::default(),
        keys_version: None,
        loaded: false,
        next_check: Instant::now(),
        shared: shared.clone(),
        log_new: LogThrottle::default(),
        log_conflict: LogThrottle::default(),
        log_evicted: LogThrottle::default(),
        log_write: LogThrottle::default(),
        ring_file,
    };
    inbound.reload_keys(now_ms);
    if !inbound.pending.is_empty() {
        info!(
            pending = inbound.pending.len(),
            "keys waiting for an operator (`jobz-broker keys list`)"
        );
    }
    Ok((
        Inbound::Sealed(Box::new(inbound)),
        Outbound::Sealed(Box::new(SealedOutbound {
            sealer: BrokerSealer::new(&key),
            shared,
        })),
    ))
}

/// What `pending/` holds; a file that cannot be read is logged and left out (it is
/// rewritten from what the broker sees next under that name).
fn load_pending(keys: &KeyDir) -> Vec<crate::keys::PendingKey> {
    let names = match keys.pending_names() {
        Ok(names) => names,
        Err(e) => {
            error!(error = %format!("{e:#}"), "cannot list the pending keys");
            return Vec::new();
        }
    };
    let mut found = Vec::new();
    for name in names {
        match keys.pending_of(&name) {
            Ok(of_name) => found.extend(of_name),
            Err(e) => error!(error = %format!("{e:#}"), "cannot read a pending key file; skipped"),
        }
    }
    found
}

impl Inbound {
    /// Opens and decodes one message from the PULL socket.
    pub fn admit(&mut self, frames: &[Vec<u8>], now_ms: i64) -> Result<Envelope, Refusal> {
        let [frame] = frames else {
            return Err((
                "multipart",
                format!("{} frames in one message, expected 1", frames.len()),
            ));
        };
        match self {
            Inbound::Plain => {
                if seal::is_sealed(frame) {
                    return Err((
                        "sealed_but_plain_broker",
                        "a sealed frame, but this broker runs without keys (--keys)".into(),
                    ));
                }
                decode(frame)
            }
            Inbound::Sealed(inbound) => inbound.admit(frame, now_ms),
        }
    }

    /// Periodic duties: notices accepted and revoked keys, rotates the mesh key, expires
    /// and writes pending keys. Returns the enrolment names whose keys were revoked since
    /// the last call.
    pub fn tick(&mut self, now_ms: i64) -> Vec<String> {
        match self {
            Inbound::Plain => Vec::new(),
            Inbound::Sealed(inbound) => inbound.tick(now_ms),
        }
    }
}

fn decode(frame: &[u8]) -> Result<Envelope, Refusal> {
    envelope::decode(frame).map_err(|e| {
        let kind = match e {
            DecodeError::TooLarge { .. } => "too_large",
            DecodeError::BadMagic { .. } => "bad_magic",
            DecodeError::UnsupportedVersion { .. } => "bad_version",
            DecodeError::Malformed(_) => "malformed",
        };
        (kind, e.to_string())
    })
}

impl SealedInbound {
    fn admit(&mut self, frame: &[u8], now_ms: i64) -> Result<Envelope, Refusal> {
        let accepted = &self.accepted;
        let opened = self
            .opener
            .open(frame, now_ms, |k| accepted.contains_key(k))
            .map_err(|e| (e.reason(), e.to_string()))?;
        let env = decode(&opened.inner)?;
        let claimed = principal_of(&env.sender);
        let Some(enrolled) = self.accepted.get(&opened.sender) else {
            self.cutoffs
                .note_unaccepted(opened.sender, opened.sent_at_ms);
            return Err(self.unenrolled(claimed, &opened.sender, now_ms));
        };
        if claimed != enrolled {
            return Err((
                "wrong_sender",
                format!(
                    "key of {enrolled} sent a message as {:?}: refused",
                    env.sender.chars().take(80).collect::<String>()
                ),
            ));
        }
        if let Some(not_before) = self.cutoffs.refuses(&opened.sender, opened.sent_at_ms) {
            return Err((
                "before_acceptance",
                format!(
                    "frame of {enrolled} sealed at {} ms, before its key was accepted ({not_before} ms): \
                     a replay of a frame sent while it was pending, or the node's clock is behind",
                    opened.sent_at_ms
                ),
            ));
        }
        if let Ok(mut keys) = self.shared.reply_keys.lock() {
            keys.note(&env.sender, opened.sender);
        }
        Ok(env)
    }

    /// A proven but unaccepted key: filed as pending (or accepted, with --auto-accept).
    fn unenrolled(&mut self, claimed: &str, key: &PublicKey, now_ms: i64) -> Refusal {
        let fingerprint = key.fingerprint();
        if !is_valid_principal(claimed) {
            return (
                "unknown_key",
                format!("unknown key {fingerprint} with an invalid node id"),
            );
        }
        if self.rejected.contains(key) {
            return (
                "unknown_key",
                format!("key {fingerprint} ({claimed}) was rejected"),
            );
        }
        let refusal = (
            "unknown_key",
            format!("key {fingerprint} ({claimed}) is not accepted"),
        );
        let name_accepted = self.accepted_names.contains(claimed);
        if self.config.auto_accept && !name_accepted {
            match self.config.keys.accept_new(claimed, key) {
                Ok(true) => {
                    warn!(name = %claimed, %fingerprint, "auto-accepted a new key");
                    self.accepted.insert(*key, claimed.to_owned());
                    self.accepted_names.insert(claimed.to_owned());
                    self.cutoffs.accepted(*key, now_ms, now_ms);
                }
                Ok(false) => {} // accepted for another key meanwhile: seen at the next reload
                Err(e) => error!(error = %format!("{e:#}"), "cannot auto-accept a key"),
            }
            return refusal;
        }
        let sighted = self.pending.sight(claimed, key, now_ms, name_accepted);
        if sighted.new {
            if let Some(suppressed) = self.log_new.allow(now_ms) {
                warn!(
                    name = %claimed,
                    %fingerprint,
                    suppressed,
                    "a new key asks to join: compare its fingerprint with the node's (`--print-public-key` on its host), \
                     then `jobz-broker keys accept {claimed} --fingerprint {fingerprint}`"
                );
            }
        }
        if let Some(conflict) = sighted.conflict {
            if let Some(suppressed) = self.log_conflict.allow(now_ms) {
                if conflict.name_accepted {
                    warn!(
                        name = %claimed,
                        %fingerprint,
                        suppressed,
                        "a key that is not the accepted one asks to join under an enrolled name: \
                         the node's key changed, or someone poses as the node"
                    );
                } else {
                    warn!(
                        name = %claimed,
                        %fingerprint,
                        other_keys = conflict.other_pending,
                        suppressed,
                        "another key asks to join under a name that has a pending key: \
                         someone may pose as the node; compare fingerprints before accepting (`jobz-broker keys list`)"
                    );
                }
            }
        }
        if let Some((name, evicted)) = sighted.evicted.first() {
            if let Some(suppressed) = self.log_evicted.allow(now_ms) {
                warn!(
                    %name,
                    fingerprint = %evicted.fingerprint(),
                    suppressed,
                    "pending keys at their bound: the least recently seen was dropped (a flood of new keys?)"
                );
            }
        }
        refusal
    }

    fn tick(&mut self, now_ms: i64) -> Vec<String> {
        let mut revoked = Vec::new();
        if Instant::now() >= self.next_check {
            self.next_check = Instant::now() + KEYS_CHECK_EVERY;
            let version = self.config.keys.version();
            if version.is_none() || version != self.keys_version {
                revoked = self.reload_keys(now_ms);
            }
            let expired = self.pending.expire(now_ms);
            if expired > 0 {
                info!(expired, "pending keys not seen for a day dropped");
            }
            self.cutoffs.prune(now_ms);
        }
        self.write_pending(now_ms);
        let mut rotated = None;
        if let Ok(mut ring) = self.shared.ring.lock() {
            let lifetime = self.config.mesh_key_lifetime.as_millis() as i64;
            let after_revocation = !revoked.is_empty();
            if after_revocation || now_ms - ring.newest_from_ms() >= lifetime {
                let epoch = ring.rotate(now_ms);
                info!(
                    epoch,
                    after_revocation,
                    "mesh key rotation: announced, in use in {} s",
                    seal::MESH_KEY_ANNOUNCE_MS / 1000
                );
                rotated = Some(ring.to_text());
            }
        }
        // Written outside the lock: the publisher seals with the ring meanwhile.
        if let Some(text) = rotated {
            save_ring(&self.ring_file, &text);
        }
        revoked
    }

    /// Mirrors a bounded number of changed pending entries to `pending/`.
    fn write_pending(&mut self, now_ms: i64) {
        for (name, entries) in self.pending.take_dirty(PENDING_WRITES_PER_TICK) {
            if let Err(e) = self.config.keys.write_pending(&name, &entries) {
                if let Some(suppressed) = self.log_write.allow(now_ms) {
                    error!(error = %format!("{e:#}"), suppressed, "cannot write a pending key file; will try again");
                }
                self.pending.mark_dirty(&name);
            }
        }
    }

    /// Re-reads the accepted and rejected keys; returns the names that lost all their keys.
    fn reload_keys(&mut self, now_ms: i64) -> Vec<String> {
        self.keys_version = self.config.keys.version();
        let (accepted, rejected) = match self
            .config
            .keys
            .accepted()
            .and_then(|a| Ok((a, self.config.keys.rejected()?)))
        {
            Ok(both) => both,
            Err(e) => {
                // Keep the last good set: a half-edited file must not lock the mesh out.
                error!(error = %format!("{e:#}"), "cannot read the accepted keys; keeping the previous set");
                return Vec::new();
            }
        };
        for (key, name) in &accepted {
            if self.accepted.contains_key(key) {
                continue;
            }
            // Keys found at start were accepted when their file was written; a key
            // accepted while running, when the operator wrote it (the keys commands run on
            // this host, on this clock), or now.
            let fallback = if self.loaded { now_ms } else { 0 };
            let accepted_at = self
                .config
                .keys
                .accepted_at(name)
                .map_or(fallback, unix_ms)
                .min(now_ms);
            self.cutoffs.accepted(*key, accepted_at, now_ms);
        }
        self.loaded = true;
        // A name that lost one key but keeps another is rotating, not revoked.
        let names: BTreeSet<&String> = accepted.values().collect();
        let mut revoked: Vec<String> = self
            .accepted
            .values()
            .filter(|name| !names.contains(name))
            .cloned()
            .collect();
        revoked.sort();
        revoked.dedup();
        if accepted.len() != self.accepted.len() || !revoked.is_empty() {
            info!(accepted = accepted.len(), "accepted keys loaded");
        }
        for name in &revoked {
            warn!(name = %name, "key revoked: the node's frames are refused from now on");
        }
        if let Ok(mut keys) = self.shared.reply_keys.lock() {
            keys.retain_keys(|key| accepted.contains_key(key));
        }
        self.pending
            .forget_keys(|key| accepted.contains_key(key) || rejected.contains(key));
        self.accepted_names = accepted.values().cloned().collect();
        self.accepted = accepted;
        self.rejected = rejected;
        revoked
    }
}

fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis().min(i64::MAX as u128) as i64)
}

/// Refuses frames of a newly accepted key that were sealed before it was accepted: a
/// frame a node sent while pending was dropped and its nonce not remembered (strangers
/// must not fill the replay memory), so without this it could be replayed, and run,
/// once the key is accepted.
///
/// The line is the later of two times: when the key was accepted (by the broker's clock),
/// and just after the newest frame the broker saw from the key while it was not accepted
/// (by the node's clock, so a node whose clock runs ahead is covered too). A node's own
/// frames after acceptance are newer than both, unless its clock is behind the broker's;
/// then they are refused for as long as it is behind (clocks must agree within 2 minutes
/// anyway). Nothing is kept past the clock window: older frames are stale.
#[derive(Debug, Default)]
struct AcceptanceCutoffs {
    /// Newest `sent_at_ms` seen from each unaccepted key (bounded; see `MAX_WATERMARKS`).
    watermarks: HashMap<PublicKey, i64>,
    /// The first `sent_at_ms` each recently accepted key's frames must have.
    not_before: HashMap<PublicKey, i64>,
}

impl AcceptanceCutoffs {
    /// A frame of a key that is not accepted was opened.
    /// Full of fresh entries (a flood of keys), a new key is not noted: its line falls
    /// back to its acceptance time. Stale entries are pruned every tick.
    fn note_unaccepted(&mut self, key: PublicKey, sent_at_ms: i64) {
        if let Some(seen) = self.watermarks.get_mut(&key) {
            *seen = (*seen).max(sent_at_ms);
        } else if self.watermarks.len() < MAX_WATERMARKS {
            self.watermarks.insert(key, sent_at_ms);
        }
    }

    /// `key` was accepted at `accepted_at_ms`.
    fn accepted(&mut self, key: PublicKey, accepted_at_ms: i64, now_ms: i64) {
        let after_seen = self
            .watermarks
            .remove(&key)
            .map_or(i64::MIN, |t| t.saturating_add(1));
        let not_before = accepted_at_ms.max(after_seen);
        if now_ms - not_before < CUTOFF_KEPT_MS {
            self.not_before.insert(key, not_before);
        }
    }

    /// The line a frame of `key` sealed at `sent_at_ms` falls short of, if it does.
    fn refuses(&self, key: &PublicKey, sent_at_ms: i64) -> Option<i64> {
        self.not_before
            .get(key)
            .copied()
            .filter(|not_before| sent_at_ms < *not_before)
    }

    /// Forgets what the clock window has made irrelevant.
    fn prune(&mut self, now_ms: i64) {
        self.not_before.retain(|_, t| now_ms - *t < CUTOFF_KEPT_MS);
        self.watermarks.retain(|_, t| now_ms - *t < CUTOFF_KEPT_MS);
    }
}

/// The key each node id authenticated with, to seal replies to it; at most
/// [`MAX_SENDER_IDS_PER_PRINCIPAL`] ids per enrolment name, so one key cannot grow it by
/// inventing ids (`frontend:f1/<anything>`).
#[derive(Debug, Default)]
struct ReplyKeys {
    by_principal: HashMap<String, Vec<ReplyKey>>,
    /// Counts frames, to tell which id was heard least recently.
    heard: u64,
}

#[derive(Debug)]
struct ReplyKey {
    sender: String,
    key: PublicKey,
    heard: u64,
}

impl ReplyKeys {
    fn note(&mut self, sender: &str, key: PublicKey) {
        if sender.len() > MAX_SENDER_ID_BYTES {
            return;
        }
        self.heard += 1;
        let principal = principal_of(sender);
        let ids = match self.by_principal.get_mut(principal) {
            Some(ids) => ids,
            None => self.by_principal.entry(principal.to_owned()).or_default(),
        };
        if let Some(known) = ids.iter_mut().find(|id| id.sender == sender) {
            known.key = key;
            known.heard = self.heard;
            return;
        }
        if ids.len() >= MAX_SENDER_IDS_PER_PRINCIPAL {
            if let Some(oldest) = (0..ids.len()).min_by_key(|&i| ids[i].heard) {
                ids.swap_remove(oldest);
            }
        }
        ids.push(ReplyKey {
            sender: sender.to_owned(),
            key,
            heard: self.heard,
        });
    }

    fn get(&self, sender: &str) -> Option<PublicKey> {
        self.by_principal
            .get(principal_of(sender))?
            .iter()
            .find(|id| id.sender == sender)
            .map(|id| id.key)
    }

    fn retain_keys(&mut self, keep: impl Fn(&PublicKey) -> bool) {
        for ids in self.by_principal.values_mut() {
            ids.retain(|id| keep(&id.key));
        }
        self.by_principal.retain(|_, ids| !ids.is_empty());
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.by_principal.values().map(Vec::len).sum()
    }
}

/// At most one log line a second of one kind: a flood of new keys must not flood the log.
#[derive(Debug, Default)]
struct LogThrottle {
    next_ms: i64,
    suppressed: u64,
}

impl LogThrottle {
    /// Whether to log now; if so, how many lines were suppressed since the last one.
    fn allow(&mut self, now_ms: i64) -> Option<u64> {
        if now_ms < self.next_ms {
            self.suppressed += 1;
            return None;
        }
        self.next_ms = now_ms + 1000;
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// How long a running broker uses one mesh key at most: its lifetime, then the
/// announcement of the next.
fn max_key_in_use_ms(config: &SealedConfig) -> i64 {
    (config.mesh_key_lifetime.as_millis() as i64).saturating_add(seal::MESH_KEY_ANNOUNCE_MS)
}

/// Keeps the ring for the next run; a failure only costs each node a hello after a restart.
fn save_ring(file: &RingFile, ring_text: &str) {
    if let Err(e) = file.save(ring_text) {
        error!(error = %format!("{e:#}"), "cannot keep the mesh keys for a restart");
    }
}

impl Outbound {
    /// The frame to publish on `topic` for a plain frame; `None` if it cannot be sealed
    /// (a reply to a node whose key is not known).
    pub fn seal(&mut self, topic: &Topic, frame: Vec<u8>) -> Option<Vec<u8>> {
        match self {
            Outbound::Plain => Some(frame),
            Outbound::Sealed(out) => out.seal(topic, &frame),
        }
    }
}

impl SealedOutbound {
    fn seal(&mut self, topic: &Topic, frame: &[u8]) -> Option<Vec<u8>> {
        let now_ms = jobz::now_ms();
        let topic_bytes = topic.to_bytes();
        let result = match topic {
            Topic::Node(node) => {
                let key = self
                    .shared
                    .reply_keys
                    .lock()
                    .ok()
                    .and_then(|keys| keys.get(node));
                let Some(key) = key else {
                    warn!(%topic, "no key known for this node: reply dropped");
                    return None;
                };
                let mesh_keys = self
                    .shared
                    .ring
                    .lock()
                    .map(|mut r| r.distributable(now_ms))
                    .unwrap_or_default();
                self.sealer
                    .seal_to(&key, &topic_bytes, frame, &mesh_keys, now_ms)
            }
            Topic::Job(_) | Topic::Events(_) | Topic::Feed(_) => {
                let mesh_key = match self.shared.ring.lock() {
                    Ok(ring) => ring.current(now_ms).clone(),
                    Err(_) => return None,
                };
                self.sealer
                    .seal_group(&mesh_key, &topic_bytes, frame, now_ms)
            }
        };
        match result {
            Ok(sealed) => Some(sealed),
            Err(e) => {
                error!(%topic, error = %e, "cannot seal a publication");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests;
