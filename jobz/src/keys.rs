//! Node identities: one Ed25519 key pair per node, in files an operator can handle.
//!
//! The same key serves two purposes: Ed25519 signatures (the broker signs what it publishes
//! to many nodes) and X25519 key agreement (each node and the broker derive a pairwise
//! frame key). The X25519 pair is derived from the Ed25519 one, the conversion libsodium
//! uses, so a node has one secret to protect and one public key to enrol.
//!
//! Files:
//! - secret key: one line `jobz-secret-key-v1 BASE64(seed)`, mode 0600, never readable by
//!   group or others (refused otherwise, like ssh does);
//! - public keys: one key a line, `jobz1:BASE64URL [comment]`, `#` comments; a file may hold
//!   two keys while one is being rotated.

use std::fmt;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use anyhow::{bail, Context};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use ed25519_dalek::{SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

const SECRET_PREFIX: &str = "jobz-secret-key-v1";
const PUBLIC_PREFIX: &str = "jobz1:";

/// A node's public key (Ed25519), as enrolled on the broker.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey([u8; 32]);

impl PublicKey {
    /// The key from its 32 raw bytes; `None` unless they are a valid Ed25519 point.
    pub fn from_bytes(bytes: [u8; 32]) -> Option<PublicKey> {
        VerifyingKey::from_bytes(&bytes).ok()?;
        Some(PublicKey(bytes))
    }

    /// The key as a frame names it, not yet checked: compared with trusted keys or looked
    /// up in a cache of derived keys, which only hold checked ones. Checking (a point
    /// decompression) on every frame would cost as much as opening a small frame.
    pub(crate) fn from_raw(bytes: [u8; 32]) -> PublicKey {
        PublicKey(bytes)
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The Ed25519 verifying key (always valid: checked on construction).
    pub(crate) fn verifying_key(&self) -> Option<VerifyingKey> {
        VerifyingKey::from_bytes(&self.0).ok()
    }

    /// Short, stable fingerprint for logs and `keys list`: `SHA256:` and 16 hex digits.
    pub fn fingerprint(&self) -> String {
        let digest = Sha256::digest(self.0);
        let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        format!("SHA256:{hex}")
    }

    /// Parses `jobz1:BASE64URL`.
    pub fn parse(text: &str) -> anyhow::Result<PublicKey> {
        let Some(encoded) = text.trim().strip_prefix(PUBLIC_PREFIX) else {
            bail!("a public key starts with {PUBLIC_PREFIX:?}");
        };
        let bytes = URL_SAFE_NO_PAD
            .decode(encoded)
            .context("public key is not base64url")?;
        let bytes: [u8; 32] = bytes
            .try_into()
            .map_err(|b: Vec<u8>| anyhow::anyhow!("public key has {} bytes, not 32", b.len()))?;
        PublicKey::from_bytes(bytes).context("not a valid Ed25519 public key")
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PUBLIC_PREFIX}{}", URL_SAFE_NO_PAD.encode(self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.fingerprint())
    }
}

/// A node's secret key. Zeroed on drop; never printed.
pub struct NodeKey {
    signing: SigningKey,
}

impl fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeKey({})", self.public().fingerprint())
    }
}

impl Clone for NodeKey {
    fn clone(&self) -> Self {
        NodeKey {
            signing: SigningKey::from_bytes(&self.signing.to_bytes()),
        }
    }
}

impl NodeKey {
    /// A new random key from the operating system's generator.
    pub fn generate() -> anyhow::Result<NodeKey> {
        let mut seed = Zeroizing::new([0u8; 32]);
        getrandom::getrandom(seed.as_mut()).context("reading the system random generator")?;
        Ok(NodeKey {
            signing: SigningKey::from_bytes(&seed),
        })
    }

    /// This key's public half.
    pub fn public(&self) -> PublicKey {
        PublicKey(self.signing.verifying_key().to_bytes())
    }

    pub(crate) fn signing(&self) -> &SigningKey {
        &self.signing
    }

    /// The X25519 secret scalar derived from the Ed25519 key.
    pub(crate) fn x25519_secret(&self) -> x25519_dalek::StaticSecret {
        x25519_dalek::StaticSecret::from(self.signing.to_scalar_bytes())
    }

    /// Reads a secret key file, refusing one that group or others may read.
    pub fn load(path: &Path) -> anyhow::Result<NodeKey> {
        let meta = fs::metadata(path)
            .with_context(|| format!("reading the key file {}", path.display()))?;
        let mode = meta.permissions().mode();
        if mode & 0o077 != 0 {
            bail!(
                "key file {} has mode {:o}: it must not be readable by group or others (chmod 600)",
                path.display(),
                mode & 0o777
            );
        }
        let text = Zeroizing::new(
            fs::read_to_string(path)
                .with_context(|| format!("reading the key file {}", path.display()))?,
        );
        Self::parse_secret(&text).with_context(|| format!("key file {}", path.display()))
    }

    fn parse_secret(text: &str) -> anyhow::Result<NodeKey> {
        let line = text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with('#'))
            .context("the file holds no key")?;
        let Some(encoded) = line.strip_prefix(SECRET_PREFIX) else {
            bail!("not a jobz secret key (expected a line starting with {SECRET_PREFIX:?})");
        };
        let bytes = Zeroizing::new(
            STANDARD
                .decode(encoded.trim())
                .context("secret key is not base64")?,
        );
        let seed: &[u8; 32] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| anyhow::anyhow!("secret key has {} bytes, not 32", bytes.len()))?;
        Ok(NodeKey {
            signing: SigningKey::from_bytes(seed),
        })
    }

    /// Writes this key to a new file (mode 0600); an existing file is never overwritten.
    /// The public key goes next to it as `<path>.pub`.
    pub fn save_new(&self, path: &Path) -> anyhow::Result<()> {
        let seed = Zeroizing::new(self.signing.to_bytes());
        let line = Zeroizing::new(format!("{SECRET_PREFIX} {}\n", STANDARD.encode(*seed)));
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("creating the key file {}", path.display()))?;
        file.write_all(line.as_bytes())
            .and_then(|()| file.sync_all())
            .with_context(|| format!("writing the key file {}", path.display()))?;
        let public_path = public_path_for(path);
        write_atomically(&public_path, format!("{}\n", self.public()).as_bytes())
            .with_context(|| format!("writing {}", public_path.display()))?;
        Ok(())
    }

    /// Loads the key at `path`, or creates it if the file does not exist.
    /// Returns the key and whether it was created now.
    pub fn load_or_create(path: &Path) -> anyhow::Result<(NodeKey, bool)> {
        if path.exists() {
            return Ok((Self::load(path)?, false));
        }
        let key = Self::generate()?;
        match key.save_new(path) {
            Ok(()) => Ok((key, true)),
            // Another process created it first: use theirs.
            Err(_) if path.exists() => Ok((Self::load(path)?, false)),
            Err(e) => Err(e),
        }
    }
}

/// `<key path>.pub`.
pub fn public_path_for(secret: &Path) -> std::path::PathBuf {
    let mut name = secret.as_os_str().to_owned();
    name.push(".pub");
    name.into()
}

/// Parses public keys, one a line (`#` comments and text after the key ignored).
pub fn parse_public_keys(text: &str) -> anyhow::Result<Vec<PublicKey>> {
    let mut keys = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let word = line.split_whitespace().next().unwrap_or_default();
        keys.push(PublicKey::parse(word).with_context(|| format!("line {}", n + 1))?);
    }
    Ok(keys)
}

/// Reads a public-key file (see [`parse_public_keys`]); it must hold at least one key.
pub fn read_public_keys(path: &Path) -> anyhow::Result<Vec<PublicKey>> {
    let text = fs::read_to_string(path)
        .with_context(|| format!("reading public keys from {}", path.display()))?;
    let keys = parse_public_keys(&text).with_context(|| format!("in {}", path.display()))?;
    if keys.is_empty() {
        bail!("{} holds no public key", path.display());
    }
    Ok(keys)
}

/// Writes a file by writing a temporary sibling and renaming it over the target.
pub fn write_atomically(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp{}", std::process::id()));
    let tmp = std::path::PathBuf::from(tmp);
    let result = (|| {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .open(&tmp)?;
        file.write_all(contents)?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// What a node's security settings are on the mesh: its own key and the broker keys it trusts.
#[derive(Debug, Clone)]
pub struct NodeIdentity {
    /// This node's secret key.
    pub key: NodeKey,
    /// Broker public keys this node accepts (more than one while the broker key rotates).
    pub brokers: Vec<PublicKey>,
}

impl NodeIdentity {
    /// Loads (or, on first start, creates) the node key and reads the trusted broker keys.
    /// Logs the node's public key when it was created, for enrolment.
    pub fn load(key: &Path, broker_keys: &Path) -> anyhow::Result<NodeIdentity> {
        let (key_pair, created) = NodeKey::load_or_create(key)?;
        if created {
            tracing::warn!(
                key = %key.display(),
                public_key = %key_pair.public(),
                fingerprint = %key_pair.public().fingerprint(),
                "created a new node key: the broker must accept it (jobz-broker keys accept NAME)"
            );
        }
        let brokers = read_public_keys(broker_keys)?;
        Ok(NodeIdentity {
            key: key_pair,
            brokers,
        })
    }
}

/// The key flags every node (worker, frontend, semaphore) takes.
#[derive(Debug, Clone, clap::Args)]
pub struct KeyArgs {
    /// This node's secret key; made (mode 0600, public half in FILE.pub) at first start.
    /// With --broker-key, every frame to and from the broker is sealed.
    #[arg(long = "key", env = "JOBZ_KEY", value_name = "FILE")]
    pub key: Option<std::path::PathBuf>,
    /// The broker public key(s) this node trusts, one a line (two while it rotates).
    #[arg(
        long = "broker-key",
        env = "JOBZ_BROKER_KEY",
        value_name = "FILE",
        requires = "key"
    )]
    pub broker_key: Option<std::path::PathBuf>,
    /// Print this node's public key (making the --key file if missing) and exit: for
    /// enrolment (`jobz-broker keys add ROLE:NAME KEY`, or Ansible's pre-seeding).
    #[arg(long, requires = "key")]
    pub print_public_key: bool,
}

impl KeyArgs {
    /// With `--print-public-key`: prints the public key (making the key if missing) and
    /// returns the exit status; `None` otherwise.
    pub fn print_public_key(&self) -> Option<std::process::ExitCode> {
        if !self.print_public_key {
            return None;
        }
        let path = self.key.as_deref()?;
        Some(match NodeKey::load_or_create(path) {
            Ok((key, _)) => {
                println!("{}", key.public());
                std::process::ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e:#}");
                std::process::ExitCode::FAILURE
            }
        })
    }

    /// The node's identity, if keys are configured.
    pub fn identity(&self) -> anyhow::Result<Option<NodeIdentity>> {
        match (&self.key, &self.broker_key) {
            (Some(key), Some(brokers)) => Ok(Some(NodeIdentity::load(key, brokers)?)),
            (None, None) => Ok(None),
            _ => bail!("--key and --broker-key go together"),
        }
    }
}

/// A node's name on the mesh: `given`, or the host name reduced to `[A-Za-z0-9_.-]`;
/// refused unless `ROLE:NAME` is a valid enrolment name.
pub fn node_name(role: &str, given: Option<&str>) -> anyhow::Result<String> {
    let name: String = match given {
        Some(n) => n.to_owned(),
        None => hostname::get()
            .context("reading the host name (set --name)")?
            .to_string_lossy()
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
            .take(128)
            .collect(),
    };
    let name = if name.is_empty() {
        "host".to_owned()
    } else {
        name
    };
    if !is_valid_principal(&format!("{role}:{name}")) {
        bail!("{role} name {name:?} must match [A-Za-z0-9_.-]{{1,128}} (set --name)");
    }
    Ok(name)
}

/// The enrolment name of a node id: everything before the first `/`, e.g.
/// `frontend:front1/0190…` → `frontend:front1`; `worker:web1` → `worker:web1`.
pub fn principal_of(node_id: &str) -> &str {
    node_id.split('/').next().unwrap_or(node_id)
}

/// Whether `name` is a valid enrolment name: `ROLE:NAME` with a known role and a name of
/// `[A-Za-z0-9_.-]{1,128}` (the worker name rule), so it is also a safe file name.
pub fn is_valid_principal(name: &str) -> bool {
    let Some((role, rest)) = name.split_once(':') else {
        return false;
    };
    matches!(role, "worker" | "frontend" | "semaphore")
        && (1..=128).contains(&rest.len())
        && rest
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        && rest != "."
        && rest != ".."
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_key_text_round_trips_and_rejects_garbage() {
        let key = NodeKey::generate().unwrap();
        let text = key.public().to_string();
        assert_eq!(PublicKey::parse(&text).unwrap(), key.public());
        assert!(PublicKey::parse("jobz1:AAAA").is_err());
        assert!(PublicKey::parse(&text[1..]).is_err());
        assert!(PublicKey::parse("").is_err());
    }

    #[test]
    fn secret_key_file_round_trips_and_refuses_loose_permissions() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.key");
        let (key, created) = NodeKey::load_or_create(&path).unwrap();
        assert!(created);
        let (again, created) = NodeKey::load_or_create(&path).unwrap();
        assert!(!created);
        assert_eq!(key.public(), again.public());
        let published = read_public_keys(&public_path_for(&path)).unwrap();
        assert_eq!(published, vec![key.public()]);
        assert!(key.save_new(&path).is_err(), "overwrote an existing key");

        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = NodeKey::load(&path).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
    }

    #[test]
    fn public_key_files_allow_comments_and_two_keys() {
        let a = NodeKey::generate().unwrap().public();
        let b = NodeKey::generate().unwrap().public();
        let text = format!("# rotating\n{a} old\n\n{b} new\n");
        assert_eq!(parse_public_keys(&text).unwrap(), vec![a, b]);
        let err = parse_public_keys("jobz1:nope\n").unwrap_err();
        assert!(format!("{err:#}").contains("line 1"), "{err:#}");
    }

    #[test]
    fn principals() {
        assert_eq!(principal_of("worker:web1"), "worker:web1");
        assert_eq!(principal_of("frontend:f1/0190-ab"), "frontend:f1");
        assert!(is_valid_principal("worker:web-1.example_2"));
        for bad in [
            "web1",
            "worker:",
            "admin:x",
            "worker:a/b",
            "worker:..",
            "worker:a b",
            "worker:\0",
        ] {
            assert!(!is_valid_principal(bad), "{bad:?}");
        }
    }
}
