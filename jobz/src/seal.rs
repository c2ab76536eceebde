//! Sealed frames: every frame authenticated and encrypted, replays refused.
//!
//! libzmq as bundled by the `zmq` crate has no CURVE, so protection lives in the frame.
//! A sealed frame wraps one plain frame ([`crate::envelope`]) in one of two modes:
//!
//! - **pair** (node → broker, and broker → one node): XChaCha20-Poly1305 under a key only
//!   the two ends can compute: HKDF-SHA256 over X25519(sender, recipient), bound to both
//!   public keys and the direction. Opening it proves who sent it.
//! - **group** (broker → every node on a job or event topic): XChaCha20-Poly1305 under the
//!   broker's current *mesh key*, then an Ed25519 signature by the broker over header and
//!   ciphertext, so enrolled
//!   nodes can read it and nobody else can forge it. Mesh keys travel to each node inside
//!   the pair frames the broker sends it (every reply, including the welcome to its
//!   periodic hello), are numbered by epoch, and rotate by announcing the next key ahead of
//!   its use: every node learns it at its own hello, so a rotation never makes the whole
//!   mesh re-authenticate at once.
//!
//! Layout (all integers big-endian):
//!
//! ```text
//! "JS" version:u16 mode:u8 sender:[32]  pair: recipient:[32] | group: epoch:u32
//!      sent_at_ms:i64 nonce:[24]  ciphertext(+16 tag)  group: signature:[64]
//! ```
//!
//! The associated data is the topic frame and the whole header, so a frame cannot be moved
//! to another topic or have its header changed. A receiver refuses a frame whose clock is
//! more than [`MAX_CLOCK_SKEW_MS`] off its own, and any nonce it has already accepted
//! within that window.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use ed25519_dalek::{Signature, Signer};
use hkdf::Hkdf;
use sha2::Sha256;
use thiserror::Error;
use zeroize::Zeroizing;

use crate::keys::{NodeIdentity, NodeKey, PublicKey};

/// First bytes of every sealed frame (plain frames start with `JZ`).
pub const SEALED_MAGIC: [u8; 2] = *b"JS";
/// Version of the sealed-frame format.
pub const SEAL_VERSION: u16 = 1;
/// Largest clock difference between sender and receiver a frame may show.
pub const MAX_CLOCK_SKEW_MS: i64 = 120_000;
/// A new mesh key is announced this long before it is used.
pub const MESH_KEY_ANNOUNCE_MS: i64 = 12_000;
/// A superseded mesh key stays readable this long, for frames in flight.
pub const MESH_KEY_RETAIN_MS: i64 = 60_000;

const MODE_PAIR: u8 = 1;
const MODE_GROUP: u8 = 2;
const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;
const SIG_LEN: usize = 64;
const PREFIX_LEN: usize = 2 + 2 + 1 + 32;
const PAIR_HEADER_LEN: usize = PREFIX_LEN + 32 + 8 + NONCE_LEN;
const GROUP_HEADER_LEN: usize = PREFIX_LEN + 4 + 8 + NONCE_LEN;
/// Room a sealed frame needs beyond its plain frame (header, tag, signature, key block).
pub const SEAL_OVERHEAD: usize = 1024;
/// Most mesh keys a pair frame carries.
const MAX_MESH_KEYS: usize = 4;
/// Nonces the broker remembers per node key at most: about 1,000 frames a second over the
/// whole replay window. A key sending faster has its frames dropped; its unexpired nonces
/// are never forgotten early (that would let its older frames be replayed).
const BROKER_NONCES_PER_KEY: usize = 250_000;
/// Nonces the broker remembers in all before it holds every key to a fair share (see
/// [`ReplayGuard::admit`]); the memory stays under twice this.
const BROKER_NONCES: usize = 500_000;
/// Nonces a node remembers: all from its broker, so one quota.
const NODE_NONCES: usize = 1_000_000;
/// Pair keys cached at most (one per peer).
const MAX_CACHED_PAIR_KEYS: usize = 100_000;

/// Why a frame was refused. Each is counted under [`OpenError::reason`].
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum OpenError {
    /// A plain frame where sealed ones are required.
    #[error("frame is not sealed")]
    Unsealed,
    /// Too short, wrong magic, version or mode.
    #[error("malformed sealed frame: {0}")]
    Malformed(&'static str),
    /// Sealed for another recipient.
    #[error("frame is sealed for another node")]
    NotForMe,
    /// Sent by a key this receiver does not trust (not the broker, or not enrolled).
    #[error("sender key {0:?} is not trusted")]
    UntrustedSender(PublicKey),
    /// The sender's clock is too far from ours: an old frame replayed, or a bad clock.
    #[error("frame is {skew_ms} ms off this node's clock (limit {MAX_CLOCK_SKEW_MS} ms)")]
    Stale {
        /// Receiver clock minus sender clock.
        skew_ms: i64,
    },
    /// A nonce already seen: the frame is a replay.
    #[error("frame was already received (replay)")]
    Replay,
    /// Authentication failed: the frame was changed, or the key is wrong.
    #[error("frame failed authentication (tampered or wrong key)")]
    Tampered,
    /// A group frame, signed by the broker, under a mesh key this node does not hold (yet).
    #[error("frame uses mesh key epoch {0}, which this node does not hold")]
    UnknownEpoch(u32),
    /// The sender sent more frames within the clock window than the replay memory holds
    /// for one key: dropped rather than forgetting nonces that still matter.
    #[error("the sender is over its share of the replay memory (a flood): frame dropped")]
    OverQuota,
    /// A group frame signed by the broker that this node's key of its epoch does not open:
    /// moved to another topic, or sealed under a key that reuses the epoch number (a broker
    /// that lost its ring and started again within the second).
    #[error("frame signed by the broker does not open under this node's mesh key epoch {0} (moved to another topic, or a key from before a broker restart)")]
    MeshKeyMismatch(u32),
}

impl OpenError {
    /// The metric label of this refusal.
    pub fn reason(&self) -> &'static str {
        match self {
            OpenError::Unsealed => "unsealed",
            OpenError::Malformed(_) => "malformed_sealed",
            OpenError::NotForMe => "not_for_me",
            OpenError::UntrustedSender(_) => "untrusted_key",
            OpenError::Stale { .. } => "stale",
            OpenError::Replay => "replay",
            OpenError::Tampered => "tampered",
            OpenError::UnknownEpoch(_) => "unknown_epoch",
            OpenError::OverQuota => "nonce_quota",
            OpenError::MeshKeyMismatch(_) => "mesh_key_mismatch",
        }
    }
}

/// Why a frame could not be sealed (only an absurdly large payload).
#[derive(Debug, Error)]
#[error("cannot seal a frame of {0} bytes")]
pub struct SealError(usize);

/// Whether a frame is sealed (by its magic).
pub fn is_sealed(frame: &[u8]) -> bool {
    frame.starts_with(&SEALED_MAGIC)
}

// ---- Header ------------------------------------------------------------------------------

enum Route {
    Pair { recipient: [u8; 32] },
    Group { epoch: u32 },
}

struct Parsed<'a> {
    sender: [u8; 32],
    route: Route,
    sent_at_ms: i64,
    nonce: [u8; NONCE_LEN],
    header: &'a [u8],
    ciphertext: &'a [u8],
    signature: Option<&'a [u8]>,
}

fn array<const N: usize>(bytes: &[u8], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&bytes[at..at + N]);
    out
}

fn parse(frame: &[u8]) -> Result<Parsed<'_>, OpenError> {
    if frame.len() > crate::envelope::MAX_FRAME_BYTES + SEAL_OVERHEAD {
        return Err(OpenError::Malformed("too large"));
    }
    if !is_sealed(frame) {
        return Err(if frame.starts_with(b"JZ") {
            OpenError::Unsealed
        } else {
            OpenError::Malformed("bad magic")
        });
    }
    if frame.len() < PREFIX_LEN {
        return Err(OpenError::Malformed("truncated header"));
    }
    if u16::from_be_bytes([frame[2], frame[3]]) != SEAL_VERSION {
        return Err(OpenError::Malformed("unsupported version"));
    }
    let mode = frame[4];
    let sender = array::<32>(frame, 5);
    let (header_len, trailer) = match mode {
        MODE_PAIR => (PAIR_HEADER_LEN, 0),
        MODE_GROUP => (GROUP_HEADER_LEN, SIG_LEN),
        _ => return Err(OpenError::Malformed("unknown mode")),
    };
    if frame.len() < header_len + TAG_LEN + trailer {
        return Err(OpenError::Malformed("truncated"));
    }
    let (route, at) = match mode {
        MODE_PAIR => (
            Route::Pair {
                recipient: array::<32>(frame, PREFIX_LEN),
            },
            PREFIX_LEN + 32,
        ),
        _ => (
            Route::Group {
                epoch: u32::from_be_bytes(array::<4>(frame, PREFIX_LEN)),
            },
            PREFIX_LEN + 4,
        ),
    };
    let sent_at_ms = i64::from_be_bytes(array::<8>(frame, at));
    let nonce = array::<NONCE_LEN>(frame, at + 8);
    let body_end = frame.len() - trailer;
    Ok(Parsed {
        sender,
        route,
        sent_at_ms,
        nonce,
        header: &frame[..header_len],
        ciphertext: &frame[header_len..body_end],
        signature: (trailer > 0).then(|| &frame[body_end..]),
    })
}

fn aad(topic: &[u8], header: &[u8]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(2 + topic.len() + header.len());
    aad.extend_from_slice(&(topic.len().min(u16::MAX as usize) as u16).to_be_bytes());
    aad.extend_from_slice(topic);
    aad.extend_from_slice(header);
    aad
}

fn random_nonce() -> [u8; NONCE_LEN] {
    let mut nonce = [0u8; NONCE_LEN];
    // A failing system generator is not recoverable: sealing with a fixed nonce would be
    // far worse than stopping.
    if let Err(e) = getrandom::getrandom(&mut nonce) {
        panic!("the system random generator failed: {e}");
    }
    nonce
}

fn check_clock(sent_at_ms: i64, now_ms: i64) -> Result<(), OpenError> {
    let skew_ms = now_ms.saturating_sub(sent_at_ms);
    if skew_ms.abs() > MAX_CLOCK_SKEW_MS {
        return Err(OpenError::Stale { skew_ms });
    }
    Ok(())
}

// ---- Keys --------------------------------------------------------------------------------

type SymmetricKey = Zeroizing<[u8; 32]>;

/// Pair keys of one identity, derived once per peer and direction.
struct PairKeys {
    secret: x25519_dalek::StaticSecret,
    me: PublicKey,
    cache: HashMap<(PublicKey, bool), SymmetricKey>,
}

impl PairKeys {
    fn new(key: &NodeKey) -> PairKeys {
        PairKeys {
            secret: key.x25519_secret(),
            me: key.public(),
            cache: HashMap::new(),
        }
    }

    /// The key for frames between this identity and `peer`; `outgoing` picks the direction.
    fn key(&mut self, peer: &PublicKey, outgoing: bool) -> Result<SymmetricKey, OpenError> {
        if let Some(k) = self.cache.get(&(*peer, outgoing)) {
            return Ok(k.clone());
        }
        let verifying = peer
            .verifying_key()
            .ok_or(OpenError::UntrustedSender(*peer))?;
        let their = x25519_dalek::PublicKey::from(verifying.to_montgomery().to_bytes());
        let shared = self.secret.diffie_hellman(&their);
        if !shared.was_contributory() {
            // A low-order point would make the "shared" secret known to everyone.
            return Err(OpenError::UntrustedSender(*peer));
        }
        let (sender, recipient) = if outgoing {
            (self.me, *peer)
        } else {
            (*peer, self.me)
        };
        let mut info = [0u8; 64];
        info[..32].copy_from_slice(sender.as_bytes());
        info[32..].copy_from_slice(recipient.as_bytes());
        let mut okm = Zeroizing::new([0u8; 32]);
        Hkdf::<Sha256>::new(Some(b"jobz-pair-v1"), shared.as_bytes())
            .expand(&info, okm.as_mut())
            .map_err(|_| OpenError::Malformed("key derivation"))?;
        if self.cache.len() >= MAX_CACHED_PAIR_KEYS {
            self.cache.clear();
        }
        self.cache.insert((*peer, outgoing), okm.clone());
        Ok(okm)
    }
}

/// One mesh key and the epoch it belongs to.
#[derive(Clone)]
pub struct MeshKey {
    /// Number of the key; larger is newer.
    pub epoch: u32,
    key: SymmetricKey,
}

impl std::fmt::Debug for MeshKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MeshKey(epoch {})", self.epoch)
    }
}

/// The broker's mesh keys: the one in use, the next one being announced, recent old ones.
#[derive(Debug)]
pub struct MeshRing {
    /// Keys with the time each became (or becomes) the one in use.
    epochs: Vec<(MeshKey, i64)>,
    /// Highest epoch ever made, withdrawn ones included: numbers are never reused.
    last_epoch: u32,
}

impl MeshRing {
    /// A ring with one fresh key in use from now.
    pub fn new(now_ms: i64) -> MeshRing {
        let mut ring = MeshRing {
            epochs: Vec::new(),
            last_epoch: 0,
        };
        let key = ring.fresh_key(now_ms);
        ring.epochs.push((key, now_ms));
        ring
    }

    fn fresh_key(&mut self, now_ms: i64) -> MeshKey {
        let mut key = Zeroizing::new([0u8; 32]);
        if let Err(e) = getrandom::getrandom(key.as_mut()) {
            panic!("the system random generator failed: {e}");
        }
        // Epochs count seconds, so a restarted broker never reuses a number a node still
        // holds with another key.
        let by_clock = (now_ms / 1000).clamp(0, u32::MAX as i64) as u32;
        let epoch = by_clock.max(self.last_epoch.saturating_add(1));
        self.last_epoch = epoch;
        MeshKey { epoch, key }
    }

    /// Announces a new key now, used from `now + MESH_KEY_ANNOUNCE_MS`. A key announced but
    /// not yet in use is withdrawn first: after a revocation, the revoked node may hold it.
    pub fn rotate(&mut self, now_ms: i64) -> u32 {
        self.epochs.retain(|(_, from)| *from <= now_ms);
        let key = self.fresh_key(now_ms);
        let epoch = key.epoch;
        self.epochs.push((key, now_ms + MESH_KEY_ANNOUNCE_MS));
        epoch
    }

    /// The key in use at `now_ms`.
    pub fn current(&self, now_ms: i64) -> &MeshKey {
        let mut current = &self.epochs[0].0;
        for (key, from) in &self.epochs {
            if *from <= now_ms {
                current = key;
            }
        }
        current
    }

    /// When the newest key was announced or made (to pace periodic rotation).
    pub fn newest_from_ms(&self) -> i64 {
        self.epochs.last().map(|(_, from)| *from).unwrap_or(0)
    }

    /// The keys every node should hold now: in use, announced, and recently superseded.
    pub fn distributable(&mut self, now_ms: i64) -> Vec<MeshKey> {
        let current = self.current(now_ms).epoch;
        // A key superseded for longer than the retention is dropped for good.
        let mut superseded_at: HashMap<u32, i64> = HashMap::new();
        for pair in self.epochs.windows(2) {
            superseded_at.insert(pair[0].0.epoch, pair[1].1);
        }
        self.epochs.retain(|(k, _)| {
            k.epoch >= current
                || superseded_at
                    .get(&k.epoch)
                    .is_none_or(|at| now_ms - at < MESH_KEY_RETAIN_MS)
        });
        let skip = self.epochs.len().saturating_sub(MAX_MESH_KEYS);
        self.epochs[skip..].iter().map(|(k, _)| k.clone()).collect()
    }

    /// The ring as text, for the broker to keep across restarts. A secret: it reads (not
    /// forges) the group frames sealed under these keys.
    pub fn to_text(&self) -> Zeroizing<String> {
        let mut text = Zeroizing::new(format!(
            "# jobz broker mesh keys: SECRET, they read the mesh's work and events.\n\
             # Rewritten by the broker at start and at each rotation; safe to delete.\n\
             {RING_TEXT_HEADER} last_epoch={}\n",
            self.last_epoch
        ));
        for (key, from) in &self.epochs {
            let encoded = Zeroizing::new(STANDARD.encode(key.key.as_ref()));
            text.push_str(&format!("key {} {from} {}\n", key.epoch, encoded.as_str()));
        }
        text
    }

    /// The ring a broker starting at `now_ms` continues from the text of
    /// [`MeshRing::to_text`], so nodes still read its group frames without a new hello.
    ///
    /// Dropped on the way in: keys superseded longer ago than [`MESH_KEY_RETAIN_MS`], keys
    /// said to start more than an announcement ahead (a clock set back, or an edited file),
    /// and the key in use if it has been for longer than `max_in_use_ms` (the lifetime plus
    /// an announcement, as long as a running broker would use it); with no key in use left,
    /// the ring starts afresh (epoch numbers still never repeat). A kept ring announces a
    /// new key at once, as after a revocation: a node revoked while the broker was down may
    /// hold the kept keys, and it reads for [`MESH_KEY_ANNOUNCE_MS`] at most, as it would
    /// after a revocation seen live.
    pub fn restore(
        text: &str,
        now_ms: i64,
        max_in_use_ms: i64,
    ) -> Result<RestoredRing, RingTextError> {
        let (last_epoch, mut epochs) = parse_ring_text(text)?;
        epochs.retain(|(_, from)| *from <= now_ms.saturating_add(MESH_KEY_ANNOUNCE_MS));
        let in_use_since = epochs
            .iter()
            .rev()
            .map(|(_, from)| *from)
            .find(|from| *from <= now_ms);
        let mut ring = MeshRing { epochs, last_epoch };
        if in_use_since.is_none_or(|from| now_ms.saturating_sub(from) > max_in_use_ms) {
            ring.epochs.clear();
            let key = ring.fresh_key(now_ms);
            ring.epochs.push((key, now_ms));
            return Ok(RestoredRing {
                ring,
                kept: None,
                announced: None,
            });
        }
        ring.distributable(now_ms); // prunes the expired superseded keys
        let kept = ring.current(now_ms).epoch;
        let announced = ring.rotate(now_ms);
        Ok(RestoredRing {
            ring,
            kept: Some(kept),
            announced: Some(announced),
        })
    }
}

/// First words of the significant part of [`MeshRing::to_text`].
const RING_TEXT_HEADER: &str = "jobz-mesh-ring v1";
/// Most keys a saved ring may hold; a running ring holds a handful.
const MAX_SAVED_KEYS: usize = 16;

/// Why a saved mesh-key ring could not be read.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("line {line}: {reason}")]
pub struct RingTextError {
    /// Line number, from 1 (0: the text as a whole).
    pub line: usize,
    /// What is wrong.
    pub reason: &'static str,
}

/// What [`MeshRing::restore`] made of a saved ring.
#[derive(Debug)]
pub struct RestoredRing {
    /// The ring to run with.
    pub ring: MeshRing,
    /// The saved key still in use, if any was fit to keep (else the ring is fresh).
    pub kept: Option<u32>,
    /// The key announced at once over a kept ring.
    pub announced: Option<u32>,
}

type SavedKeys = (u32, Vec<(MeshKey, i64)>);

fn parse_ring_text(text: &str) -> Result<SavedKeys, RingTextError> {
    let fail = |line: usize, reason: &'static str| RingTextError { line, reason };
    let mut lines = text
        .lines()
        .enumerate()
        .map(|(n, l)| (n + 1, l.trim()))
        .filter(|(_, l)| !l.is_empty() && !l.starts_with('#'));
    let (n, header) = lines.next().ok_or(fail(0, "no ring in the text"))?;
    let last_epoch = header
        .strip_prefix(RING_TEXT_HEADER)
        .and_then(|rest| rest.trim().strip_prefix("last_epoch="))
        .and_then(|v| v.parse::<u32>().ok())
        .ok_or(fail(n, "expected `jobz-mesh-ring v1 last_epoch=N`"))?;
    let mut epochs: Vec<(MeshKey, i64)> = Vec::new();
    for (n, line) in lines {
        let words: Vec<&str> = line.split_whitespace().collect();
        let [kind, epoch, from, encoded] = words.as_slice() else {
            return Err(fail(n, "expected `key EPOCH FROM_MS BASE64`"));
        };
        if *kind != "key" {
            return Err(fail(n, "expected `key EPOCH FROM_MS BASE64`"));
        }
        let epoch: u32 = epoch.parse().map_err(|_| fail(n, "bad epoch"))?;
        let from: i64 = from.parse().map_err(|_| fail(n, "bad start time"))?;
        let bytes = Zeroizing::new(
            STANDARD
                .decode(encoded)
                .map_err(|_| fail(n, "key is not base64"))?,
        );
        let key: [u8; 32] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| fail(n, "key is not 32 bytes"))?;
        if epoch > last_epoch {
            return Err(fail(n, "epoch above last_epoch"));
        }
        if let Some((previous, previous_from)) = epochs.last() {
            if epoch <= previous.epoch || from < *previous_from {
                return Err(fail(n, "keys out of order"));
            }
        }
        if epochs.len() == MAX_SAVED_KEYS {
            return Err(fail(n, "too many keys"));
        }
        epochs.push((
            MeshKey {
                epoch,
                key: Zeroizing::new(key),
            },
            from,
        ));
    }
    Ok((last_epoch, epochs))
}

// ---- Replays ------------------------------------------------------------------------------

/// Nonces accepted within the clock window, with the key that sent each; a second frame
/// with one of them is a replay. Bounded per sender and overall by refusing frames, never
/// by forgetting a nonce whose frame could still pass the clock check.
struct ReplayGuard {
    seen: HashSet<[u8; NONCE_LEN]>,
    order: VecDeque<(i64, PublicKey, [u8; NONCE_LEN])>,
    per_sender: HashMap<PublicKey, usize>,
    /// Most nonces one sender may hold.
    quota: usize,
    /// Nonces held in all beyond which only senders under their fair share are admitted.
    capacity: usize,
}

impl ReplayGuard {
    fn new(quota: usize, capacity: usize) -> ReplayGuard {
        ReplayGuard {
            seen: HashSet::new(),
            order: VecDeque::new(),
            per_sender: HashMap::new(),
            quota,
            capacity,
        }
    }

    fn is_replay(&self, nonce: &[u8; NONCE_LEN]) -> bool {
        self.seen.contains(nonce)
    }

    /// Records an authenticated frame's nonce, or refuses the frame if its sender holds
    /// its quota, or more than its fair share of a full memory (so one flooding key cannot
    /// crowd the others out). Nonces too old to matter are forgotten first: a frame older
    /// than the clock window is refused as stale before its nonce is looked at.
    fn admit(
        &mut self,
        sender: PublicKey,
        nonce: [u8; NONCE_LEN],
        now_ms: i64,
    ) -> Result<(), OpenError> {
        self.expire(now_ms);
        let held = self.per_sender.get(&sender).copied().unwrap_or(0);
        let senders = self.per_sender.len() + usize::from(held == 0);
        let fair_share = self.capacity / senders.max(1);
        if held >= self.quota || (self.seen.len() >= self.capacity && held >= fair_share) {
            return Err(OpenError::OverQuota);
        }
        self.seen.insert(nonce);
        self.order.push_back((now_ms, sender, nonce));
        *self.per_sender.entry(sender).or_default() += 1;
        Ok(())
    }

    fn expire(&mut self, now_ms: i64) {
        while let Some(&(at, sender, old)) = self.order.front() {
            if now_ms - at <= 2 * MAX_CLOCK_SKEW_MS + 1000 {
                break;
            }
            self.order.pop_front();
            self.seen.remove(&old);
            if let Some(held) = self.per_sender.get_mut(&sender) {
                *held -= 1;
                if *held == 0 {
                    self.per_sender.remove(&sender);
                }
            }
        }
    }
}

// ---- Sealing ------------------------------------------------------------------------------

fn seal_with(
    key: &SymmetricKey,
    mut frame: Vec<u8>,
    topic: &[u8],
    plaintext: &[u8],
) -> Result<Vec<u8>, SealError> {
    let nonce = XNonce::clone_from_slice(&frame[frame.len() - NONCE_LEN..]);
    let cipher = XChaCha20Poly1305::new(key.as_ref().into());
    let ciphertext = cipher
        .encrypt(
            &nonce,
            Payload {
                msg: plaintext,
                aad: &aad(topic, &frame),
            },
        )
        .map_err(|_| SealError(plaintext.len()))?;
    frame.extend_from_slice(&ciphertext);
    Ok(frame)
}

fn open_with(key: &SymmetricKey, parsed: &Parsed<'_>, topic: &[u8]) -> Result<Vec<u8>, OpenError> {
    XChaCha20Poly1305::new(key.as_ref().into())
        .decrypt(
            XNonce::from_slice(&parsed.nonce),
            Payload {
                msg: parsed.ciphertext,
                aad: &aad(topic, parsed.header),
            },
        )
        .map_err(|_| OpenError::Tampered)
}

fn header(mode: u8, sender: &PublicKey, route: &[u8], now_ms: i64) -> Vec<u8> {
    let mut frame = Vec::with_capacity(PAIR_HEADER_LEN + 512);
    frame.extend_from_slice(&SEALED_MAGIC);
    frame.extend_from_slice(&SEAL_VERSION.to_be_bytes());
    frame.push(mode);
    frame.extend_from_slice(sender.as_bytes());
    frame.extend_from_slice(route);
    frame.extend_from_slice(&now_ms.to_be_bytes());
    frame.extend_from_slice(&random_nonce());
    frame
}

/// The plaintext of a pair frame: the mesh keys the recipient should hold, then the frame.
fn pair_plaintext(keys: &[MeshKey], inner: &[u8]) -> Zeroizing<Vec<u8>> {
    let mut out = Zeroizing::new(Vec::with_capacity(1 + keys.len() * 36 + inner.len()));
    out.push(keys.len() as u8);
    for k in keys {
        out.extend_from_slice(&k.epoch.to_be_bytes());
        out.extend_from_slice(k.key.as_ref());
    }
    out.extend_from_slice(inner);
    out
}

fn split_pair_plaintext(plain: &[u8]) -> Result<(Vec<MeshKey>, Vec<u8>), OpenError> {
    let (&count, mut rest) = plain
        .split_first()
        .ok_or(OpenError::Malformed("empty pair payload"))?;
    let count = usize::from(count);
    if count > MAX_MESH_KEYS || rest.len() < count * 36 {
        return Err(OpenError::Malformed("bad mesh key block"));
    }
    let mut keys = Vec::with_capacity(count);
    for _ in 0..count {
        let epoch = u32::from_be_bytes(array::<4>(rest, 0));
        keys.push(MeshKey {
            epoch,
            key: Zeroizing::new(array::<32>(rest, 4)),
        });
        rest = &rest[36..];
    }
    Ok((keys, rest.to_vec()))
}

// ---- Node side ----------------------------------------------------------------------------

/// A node's sealing state: seals what it sends to the broker, opens what the broker publishes.
pub struct NodeSeal {
    identity: NodeKey,
    brokers: Vec<PublicKey>,
    /// The brokers' verifying keys, decompressed once (not per frame: it costs as much as
    /// the rest of opening a small frame).
    broker_verifying: Vec<Option<ed25519_dalek::VerifyingKey>>,
    /// The broker key frames are sealed to (the one that last answered).
    current_broker: usize,
    pair: PairKeys,
    mesh: BTreeMap<u32, SymmetricKey>,
    replay: ReplayGuard,
}

impl NodeSeal {
    /// Sealing state for a node identity.
    pub fn new(identity: NodeIdentity) -> NodeSeal {
        NodeSeal {
            pair: PairKeys::new(&identity.key),
            broker_verifying: identity
                .brokers
                .iter()
                .map(PublicKey::verifying_key)
                .collect(),
            identity: identity.key,
            brokers: identity.brokers,
            current_broker: 0,
            mesh: BTreeMap::new(),
            replay: ReplayGuard::new(NODE_NONCES, NODE_NONCES),
        }
    }

    /// This node's public key.
    pub fn public(&self) -> PublicKey {
        self.identity.public()
    }

    /// Whether the broker has given this node a mesh key yet.
    pub fn has_mesh_keys(&self) -> bool {
        !self.mesh.is_empty()
    }

    /// Whether this node holds the mesh key of `epoch`.
    pub fn holds_mesh_key(&self, epoch: u32) -> bool {
        self.mesh.contains_key(&epoch)
    }

    /// Seals a plain frame for the broker (pair mode).
    pub fn seal(&mut self, inner: &[u8], now_ms: i64) -> Result<Vec<u8>, SealError> {
        let Some(broker) = self.brokers.get(self.current_broker).copied() else {
            return Err(SealError(inner.len()));
        };
        let key = self
            .pair
            .key(&broker, true)
            .map_err(|_| SealError(inner.len()))?;
        let frame = header(MODE_PAIR, &self.public(), broker.as_bytes(), now_ms);
        seal_with(&key, frame, b"", &pair_plaintext(&[], inner))
    }

    /// After a hello went unanswered: seal to the next trusted broker key, in case the
    /// broker's key was rotated.
    pub fn try_next_broker_key(&mut self) {
        if self.brokers.len() > 1 {
            self.current_broker = (self.current_broker + 1) % self.brokers.len();
        }
    }

    /// Opens a frame the broker published on `topic`; returns the plain frame inside.
    pub fn open(&mut self, topic: &[u8], frame: &[u8], now_ms: i64) -> Result<Vec<u8>, OpenError> {
        let parsed = parse(frame)?;
        // Trusted broker keys were checked when loaded: equality is enough.
        let sender = PublicKey::from_raw(parsed.sender);
        let Some(broker_index) = self.brokers.iter().position(|b| *b == sender) else {
            return Err(OpenError::UntrustedSender(sender));
        };
        check_clock(parsed.sent_at_ms, now_ms)?;
        let inner = match parsed.route {
            Route::Pair { recipient } => {
                if recipient != *self.public().as_bytes() {
                    return Err(OpenError::NotForMe);
                }
                let key = self.pair.key(&sender, false)?;
                let plain = Zeroizing::new(open_with(&key, &parsed, topic)?);
                let (keys, inner) = split_pair_plaintext(&plain)?;
                if !keys.is_empty() {
                    self.mesh = keys.into_iter().map(|k| (k.epoch, k.key)).collect();
                }
                inner
            }
            Route::Group { epoch } => {
                let verifying = self
                    .broker_verifying
                    .get(broker_index)
                    .copied()
                    .flatten()
                    .ok_or(OpenError::UntrustedSender(sender))?;
                let signature = parsed
                    .signature
                    .and_then(|s| Signature::from_slice(s).ok())
                    .ok_or(OpenError::Malformed("bad signature"))?;
                verifying
                    .verify_strict(&frame[..frame.len() - SIG_LEN], &signature)
                    .map_err(|_| OpenError::Tampered)?;
                let key = self
                    .mesh
                    .get(&epoch)
                    .ok_or(OpenError::UnknownEpoch(epoch))?;
                // The broker signed this frame, so either it was moved to another topic (the
                // signature does not cover the topic; the AEAD does) or this node's key of that
                // epoch is not the broker's: a broker that lost its ring and started again
                // within the second reuses the number with another key.
                open_with(key, &parsed, topic).map_err(|_| OpenError::MeshKeyMismatch(epoch))?
            }
        };
        // Checked after authentication, so a changed frame counts as tampered, not replayed.
        if self.replay.is_replay(&parsed.nonce) {
            return Err(OpenError::Replay);
        }
        self.replay.admit(sender, parsed.nonce, now_ms)?;
        self.current_broker = broker_index;
        Ok(inner)
    }
}

// ---- Broker side --------------------------------------------------------------------------

/// A frame the broker opened: who sealed it and the plain frame inside.
#[derive(Debug)]
pub struct Opened {
    /// The sender's key, proven by the pair key.
    pub sender: PublicKey,
    /// When the sender sealed it (its clock, Unix ms; authenticated).
    pub sent_at_ms: i64,
    /// The plain frame.
    pub inner: Vec<u8>,
}

/// What the broker's receiving side needs: its identity and the nonces it has seen.
pub struct BrokerOpener {
    pair: PairKeys,
    replay: ReplayGuard,
}

impl BrokerOpener {
    /// The opener for the broker's key.
    pub fn new(key: &NodeKey) -> BrokerOpener {
        BrokerOpener {
            pair: PairKeys::new(key),
            replay: ReplayGuard::new(BROKER_NONCES_PER_KEY, BROKER_NONCES),
        }
    }

    /// Opens a frame a node sent. Proves the sender holds the key named in the frame; the
    /// caller decides whether that key is enrolled. A frame from a key that is not
    /// (`enrolled` returns false) is opened but its nonce is not remembered, so strangers
    /// cannot fill the replay memory; it must be dropped. An enrolled key over its share of
    /// the replay memory has its frames refused ([`OpenError::OverQuota`]).
    pub fn open(
        &mut self,
        frame: &[u8],
        now_ms: i64,
        enrolled: impl Fn(&PublicKey) -> bool,
    ) -> Result<Opened, OpenError> {
        let parsed = parse(frame)?;
        let Route::Pair { recipient } = parsed.route else {
            return Err(OpenError::Malformed("nodes send pair frames"));
        };
        if recipient != *self.pair.me.as_bytes() {
            return Err(OpenError::NotForMe);
        }
        // Checked by the pair-key derivation on a cache miss; the cache holds checked keys.
        let sender = PublicKey::from_raw(parsed.sender);
        check_clock(parsed.sent_at_ms, now_ms)?;
        let key = self.pair.key(&sender, false)?;
        let plain = Zeroizing::new(open_with(&key, &parsed, b"")?);
        // Checked after authentication, so a changed frame counts as tampered, not replayed.
        if self.replay.is_replay(&parsed.nonce) {
            return Err(OpenError::Replay);
        }
        let (_, inner) = split_pair_plaintext(&plain)?;
        if enrolled(&sender) {
            self.replay.admit(sender, parsed.nonce, now_ms)?;
        }
        Ok(Opened {
            sender,
            sent_at_ms: parsed.sent_at_ms,
            inner,
        })
    }
}

/// What the broker's publishing side needs: its identity, pair keys and the mesh keys.
pub struct BrokerSealer {
    identity: NodeKey,
    pair: PairKeys,
}

impl BrokerSealer {
    /// The sealer for the broker's key.
    pub fn new(key: &NodeKey) -> BrokerSealer {
        BrokerSealer {
            pair: PairKeys::new(key),
            identity: key.clone(),
        }
    }

    /// Seals a frame for one node, carrying the mesh keys it should hold.
    pub fn seal_to(
        &mut self,
        recipient: &PublicKey,
        topic: &[u8],
        inner: &[u8],
        mesh_keys: &[MeshKey],
        now_ms: i64,
    ) -> Result<Vec<u8>, SealError> {
        let key = self
            .pair
            .key(recipient, true)
            .map_err(|_| SealError(inner.len()))?;
        let frame = header(
            MODE_PAIR,
            &self.identity.public(),
            recipient.as_bytes(),
            now_ms,
        );
        seal_with(&key, frame, topic, &pair_plaintext(mesh_keys, inner))
    }

    /// Seals a frame for every enrolled node under the mesh key, signed by the broker.
    pub fn seal_group(
        &mut self,
        mesh_key: &MeshKey,
        topic: &[u8],
        inner: &[u8],
        now_ms: i64,
    ) -> Result<Vec<u8>, SealError> {
        let frame = header(
            MODE_GROUP,
            &self.identity.public(),
            &mesh_key.epoch.to_be_bytes(),
            now_ms,
        );
        let mut frame = seal_with(&mesh_key.key, frame, topic, inner)?;
        // The signature covers header and ciphertext; the topic is bound by the AEAD's
        // associated data, so a signed frame moved to another topic fails to decrypt.
        let signature = self.identity.signing().sign(&frame);
        frame.extend_from_slice(&signature.to_bytes());
        Ok(frame)
    }
}

#[cfg(test)]
mod tests;
