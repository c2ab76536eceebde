//! Bearer tokens: the token file, scopes, and the check of a presented token against the
//! scope a request needs (which [`crate::route`] decides).
//!
//! A token is `jobz_` followed by 32 random bytes in base64url. The file keeps only each
//! token's SHA-256, one token per line:
//!
//! ```text
//! # NAME   SCOPES         HASH
//! ci       trigger        sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
//! grafana  read           sha256:...
//! ops      admin          sha256:...
//! ```
//!
//! A fast hash is right here, unlike for passwords: a token has 256 bits of entropy, so
//! nobody can guess one from its hash however fast the hash is. A presented token is hashed
//! and looked up by its hash, so the comparison never runs over secret bytes.
//!
//! Clients send `Authorization: Bearer TOKEN`, or HTTP Basic with the token as the password
//! (any user name), so a browser can open the dashboard. Tokens in the query string are
//! never read.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use sha2::{Digest, Sha256};

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    /// Every `GET` view: dashboard, runs, logs, jobs, workers, dead tasks, semaphores,
    /// metrics.
    Read,
    /// `/job_start`.
    Trigger,
    /// Everything, including `/dead/{task}/retry`.
    Admin,
}

impl Scope {
    /// The name used in the token file.
    pub fn name(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Trigger => "trigger",
            Scope::Admin => "admin",
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Scope {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "read" => Ok(Scope::Read),
            "trigger" => Ok(Scope::Trigger),
            "admin" => Ok(Scope::Admin),
            other => Err(format!(
                "unknown scope {other:?}: expected read, trigger or admin"
            )),
        }
    }
}

/// A set of scopes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Scopes {
    read: bool,
    trigger: bool,
    admin: bool,
}

impl Scopes {
    /// Parses `read,trigger`: comma-separated, at least one, no repeats.
    pub fn parse(list: &str) -> Result<Scopes, String> {
        let mut scopes = Scopes::default();
        for word in list.split(',') {
            let scope: Scope = word.trim().parse()?;
            if scopes.contains_exactly(scope) {
                return Err(format!("scope {scope} given twice"));
            }
            match scope {
                Scope::Read => scopes.read = true,
                Scope::Trigger => scopes.trigger = true,
                Scope::Admin => scopes.admin = true,
            }
        }
        Ok(scopes)
    }

    fn contains_exactly(self, scope: Scope) -> bool {
        match scope {
            Scope::Read => self.read,
            Scope::Trigger => self.trigger,
            Scope::Admin => self.admin,
        }
    }

    /// True if these scopes allow what `needed` allows (`admin` allows everything).
    pub fn allow(self, needed: Scope) -> bool {
        self.admin || self.contains_exactly(needed)
    }
}

impl fmt::Display for Scopes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = [Scope::Read, Scope::Trigger, Scope::Admin]
            .into_iter()
            .filter(|s| self.contains_exactly(*s))
            .map(Scope::name)
            .collect();
        f.write_str(&names.join(","))
    }
}

/// Why a token file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    /// The file cannot be read.
    #[error("reading the token file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A line is not `NAME SCOPES sha256:HEX`.
    #[error("{path}:{line}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: String,
    },
}

/// How often, at most, the token file is looked at for a change.
pub const TOKEN_FILE_CHECK: Duration = Duration::from_secs(1);

/// The token file, re-read when it changes, so that a token added or removed (revoked)
/// takes effect within [`TOKEN_FILE_CHECK`] without a restart. It is looked at when a
/// request needs the tokens. A changed file that does not parse, or holds no token, leaves
/// the tokens in force and is logged once per change.
#[derive(Debug)]
pub struct TokenFile {
    path: PathBuf,
    state: Mutex<TokenFileState>,
}

#[derive(Debug)]
struct TokenFileState {
    tokens: Arc<Tokens>,
    stamp: Option<FileStamp>,
    checked: Instant,
}

/// What tells a changed file: modification time, size, inode (an editor's rename).
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

impl FileStamp {
    fn of(path: &Path) -> Option<FileStamp> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(path).ok()?;
        Some(FileStamp {
            modified: meta.modified().ok(),
            len: meta.len(),
            inode: meta.ino(),
        })
    }
}

impl TokenFile {
    /// Loads the file; an error (or a file with no token) stops the start.
    pub fn load(path: &Path) -> Result<TokenFile, String> {
        let stamp = FileStamp::of(path);
        let tokens = Tokens::load(path).map_err(|e| e.to_string())?;
        if tokens.is_empty() {
            return Err(format!(
                "the token file {} holds no token: nobody could use the API",
                path.display()
            ));
        }
        Ok(TokenFile {
            path: path.to_owned(),
            state: Mutex::new(TokenFileState {
                tokens: Arc::new(tokens),
                stamp,
                checked: Instant::now(),
            }),
        })
    }

    /// The tokens in force, after taking in the file if it changed since it was last
    /// looked at (at most once per [`TOKEN_FILE_CHECK`]).
    pub fn current(&self) -> Arc<Tokens> {
        let Ok(mut state) = self.state.lock() else {
            // A thread panicked while reloading: nothing is served rather than stale
            // tokens. (It cannot: nothing in the reload panics.)
            return Arc::new(Tokens::default());
        };
        if state.checked.elapsed() >= TOKEN_FILE_CHECK {
            state.checked = Instant::now();
            let stamp = FileStamp::of(&self.path);
            if stamp != state.stamp {
                state.stamp = stamp;
                match Tokens::load(&self.path) {
                    Ok(tokens) if !tokens.is_empty() => {
                        tracing::info!(file = %self.path.display(), tokens = tokens.len(),
                            before = state.tokens.len(), "token file changed: tokens reloaded");
                        state.tokens = Arc::new(tokens);
                    }
                    Ok(_) => {
                        tracing::error!(file = %self.path.display(), tokens = state.tokens.len(),
                        "token file changed and holds no token; keeping the tokens in force")
                    }
                    Err(e) => tracing::error!(file = %self.path.display(), error = %e,
                        tokens = state.tokens.len(),
                        "token file changed and cannot be used; keeping the tokens in force"),
                }
            }
        }
        state.tokens.clone()
    }
}

/// Who a token belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// The name in the token file (for logs).
    pub name: String,
    /// What it may do.
    pub scopes: Scopes,
}

/// The known tokens, by SHA-256.
#[derive(Debug, Clone, Default)]
pub struct Tokens {
    by_hash: HashMap<[u8; 32], Holder>,
}

impl Tokens {
    /// Reads and parses a token file.
    pub fn load(path: &Path) -> Result<Tokens, TokenFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokenFileError::Read {
            path: path.to_owned(),
            source,
        })?;
        Tokens::parse(&text, path)
    }

    /// Parses the text of a token file; `path` is for messages.
    pub fn parse(text: &str, path: &Path) -> Result<Tokens, TokenFileError> {
        let mut by_hash = HashMap::new();
        let mut names: HashMap<String, usize> = HashMap::new();
        for (n, raw) in text.lines().enumerate() {
            let line = n + 1;
            let invalid = |reason: String| TokenFileError::Invalid {
                path: path.to_owned(),
                line,
                reason,
            };
            let content = raw.trim();
            if content.is_empty() || content.starts_with('#') {
                continue;
            }
            let fields: Vec<&str> = content.split_whitespace().collect();
            let [name, scopes, hash] = fields.as_slice() else {
                return Err(invalid(format!(
                    "expected `NAME SCOPES sha256:HEX`, found {} fields",
                    fields.len()
                )));
            };
            if hash.starts_with("jobz_") {
                return Err(invalid(
                    "this is a token, not its hash: the file must hold only `sha256:HEX` \
                     (see `jobz-frontend token new`)"
                        .into(),
                ));
            }
            let scopes = Scopes::parse(scopes).map_err(invalid)?;
            let hash = parse_hash(hash).map_err(invalid)?;
            if let Some(first) = names.insert((*name).to_owned(), line) {
                return Err(invalid(format!(
                    "token name {name:?} already used on line {first}"
                )));
            }
            let holder = Holder {
                name: (*name).to_owned(),
                scopes,
            };
            if by_hash.insert(hash, holder).is_some() {
                return Err(invalid("the same token hash appears twice".into()));
            }
        }
        Ok(Tokens { by_hash })
    }

    /// How many tokens there are.
    pub fn len(&self) -> usize {
        self.by_hash.len()
    }

    /// True if the file held no token.
    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }

    /// Every holder, by name (`token list`).
    pub fn holders(&self) -> Vec<&Holder> {
        let mut holders: Vec<&Holder> = self.by_hash.values().collect();
        holders.sort_by(|a, b| a.name.cmp(&b.name));
        holders
    }

    /// The holder of a presented token, if it is known.
    pub fn holder(&self, token: &str) -> Option<&Holder> {
        self.by_hash.get(&hash_token(token))
    }

    /// Decides a request that needs `needed` (`None`: open): `Ok` to serve it, `Err` with
    /// the reason otherwise. `authorization` is the `Authorization` header, if any.
    pub fn check(
        &self,
        needed: Option<Scope>,
        authorization: Option<&str>,
    ) -> Result<Option<&Holder>, Denied> {
        let Some(needed) = needed else {
            return Ok(None);
        };
        let token = match authorization {
            None => return Err(Denied::NoToken),
            Some(value) => presented_token(value).ok_or(Denied::Unusable)?,
        };
        let holder = self.holder(&token).ok_or(Denied::UnknownToken)?;
        if holder.scopes.allow(needed) {
            Ok(Some(holder))
        } else {
            Err(Denied::Scope {
                holder: holder.name.clone(),
                needed,
            })
        }
    }
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    /// No `Authorization` header (401).
    NoToken,
    /// An `Authorization` header that is neither Bearer nor Basic (401).
    Unusable,
    /// A token that is not in the file (401).
    UnknownToken,
    /// A known token without the scope needed (403).
    Scope {
        /// Its name.
        holder: String,
        /// The scope the request needs.
        needed: Scope,
    },
}

impl Denied {
    /// The HTTP status: 401 without a valid token, 403 with one that may not do this.
    pub fn status(&self) -> u16 {
        match self {
            Denied::Scope { .. } => 403,
            _ => 401,
        }
    }

    /// What the client is told.
    pub fn message(&self) -> String {
        match self {
            Denied::NoToken => "authentication required: send Authorization: Bearer TOKEN".into(),
            Denied::Unusable => {
                "unsupported Authorization header: use Bearer TOKEN or Basic with the token \
                 as the password"
                    .into()
            }
            Denied::UnknownToken => "invalid token".into(),
            Denied::Scope { needed, .. } => format!("this token lacks the {needed} scope"),
        }
    }
}

/// The token in an `Authorization` header: `Bearer TOKEN`, or `Basic base64(user:TOKEN)`.
pub fn presented_token(header: &str) -> Option<String> {
    let (scheme, rest) = header.trim().split_once(' ')?;
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        return (!rest.is_empty()).then(|| rest.to_owned());
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = STANDARD.decode(rest).ok()?;
        let text = String::from_utf8(decoded).ok()?;
        let (_user, password) = text.split_once(':')?;
        return (!password.is_empty()).then(|| password.to_owned());
    }
    None
}

/// SHA-256 of a token.
pub fn hash_token(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn parse_hash(field: &str) -> Result<[u8; 32], String> {
    let hex = field
        .strip_prefix("sha256:")
        .ok_or_else(|| format!("hash {field:?} must start with sha256:"))?;
    if hex.len() != 64 {
        return Err(format!(
            "sha256 hash must be 64 hex digits, found {}",
            hex.len()
        ));
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
            .map_err(|_| format!("hash {hex:?} is not hexadecimal"))?;
    }
    Ok(out)
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A new token: `jobz_` and 32 random bytes from the operating system, base64url.
pub fn new_token() -> Result<String, getrandom::Error> {
    let mut secret = [0u8; 32];
    getrandom::getrandom(&mut secret)?;
    Ok(format!("jobz_{}", URL_SAFE_NO_PAD.encode(secret)))
}

/// The token-file line for a token.
pub fn file_line(name: &str, scopes: Scopes, token: &str) -> String {
    format!("{name} {scopes} sha256:{}", to_hex(&hash_token(token)))
}

/// Checks a token name for the file: letters, digits, `-`, `_`, `.`, `@`, at most 64.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('#')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'@'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "token name {name:?}: use 1 to 64 letters, digits, '-', '_', '.' or '@'"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(text: &str) -> Result<Tokens, TokenFileError> {
        Tokens::parse(text, Path::new("tokens"))
    }

    fn error_of(text: &str) -> String {
        match tokens(text) {
            Ok(_) => panic!("{text:?} parsed"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn a_generated_token_round_trips_through_its_file_line() {
        let token = new_token().unwrap();
        assert!(token.starts_with("jobz_"));
        assert_eq!(token.len(), 5 + 43);
        let line = file_line("ci", Scopes::parse("read,trigger").unwrap(), &token);
        assert!(!line.contains(&token), "the line must not hold the token");
        let t = tokens(&format!("# comment\n\n  {line}  \n")).unwrap();
        assert_eq!(t.len(), 1);
        let holder = t.holder(&token).unwrap();
        assert_eq!(holder.name, "ci");
        assert!(holder.scopes.allow(Scope::Read));
        assert!(holder.scopes.allow(Scope::Trigger));
        assert!(!holder.scopes.allow(Scope::Admin));
        assert!(t.holder("jobz_other").is_none());
        assert_ne!(new_token().unwrap(), token);
    }

    #[test]
    fn known_hash_matches() {
        // sha256("test")
        let t = tokens(
            "x read sha256:9F86D081884C7D659A2FEAA0C55AD015A3BF4F1B2B0B822CD15D6C15B0F00A08",
        )
        .unwrap();
        assert_eq!(t.holder("test").unwrap().name, "x");
    }

    #[test]
    fn malformed_token_files_name_the_line() {
        let h = format!("sha256:{}", "ab".repeat(32));
        let cases = [
            (
                "a read\n".to_string(),
                ":1: expected `NAME SCOPES sha256:HEX`",
            ),
            (format!("# c\na read {h} extra"), ":2: expected"),
            (format!("\na wrte {h}"), ":2: unknown scope \"wrte\""),
            (format!("a read,read {h}"), "given twice"),
            (format!("a read,,trigger {h}"), "unknown scope \"\""),
            (
                format!("a read md5:{}", "ab".repeat(16)),
                "must start with sha256:",
            ),
            ("a read sha256:abc".to_string(), "64 hex digits"),
            (
                format!("a read sha256:{}", "zz".repeat(32)),
                "not hexadecimal",
            ),
            (
                "a read jobz_secret".to_string(),
                "this is a token, not its hash",
            ),
            (
                format!("a read {h}\na admin sha256:{}", "cd".repeat(32)),
                ":2: token name \"a\" already used on line 1",
            ),
            (
                format!("a read {h}\nb admin {h}"),
                ":2: the same token hash",
            ),
        ];
        for (text, expected) in cases {
            let e = error_of(&text);
            assert!(e.contains(expected), "{text:?}: {e:?} lacks {expected:?}");
            assert!(e.starts_with("tokens:"), "{e}");
        }
    }

    #[test]
    fn checks_give_401_without_a_valid_token_and_403_without_the_scope() {
        let read = new_token().unwrap();
        let trigger = new_token().unwrap();
        let admin = new_token().unwrap();
        let file = [
            file_line("r", Scopes::parse("read").unwrap(), &read),
            file_line("t", Scopes::parse("trigger").unwrap(), &trigger),
            file_line("a", Scopes::parse("admin").unwrap(), &admin),
        ]
        .join("\n");
        let t = tokens(&file).unwrap();
        let (read_scope, trigger_scope, admin_scope) =
            (Some(Scope::Read), Some(Scope::Trigger), Some(Scope::Admin));
        let bearer = |tok: &str| format!("Bearer {tok}");
        assert_eq!(t.check(None, None), Ok(None));
        assert_eq!(t.check(read_scope, None), Err(Denied::NoToken));
        assert_eq!(
            t.check(read_scope, Some("Bearer nope")),
            Err(Denied::UnknownToken)
        );
        assert_eq!(t.check(read_scope, Some("Digest x")), Err(Denied::Unusable));
        assert_eq!(
            t.check(read_scope, Some(&bearer(&read)))
                .unwrap()
                .unwrap()
                .name,
            "r"
        );
        let denied = t.check(trigger_scope, Some(&bearer(&read))).unwrap_err();
        assert_eq!(denied.status(), 403);
        assert_eq!(Denied::NoToken.status(), 401);
        assert!(t.check(trigger_scope, Some(&bearer(&trigger))).is_ok());
        assert_eq!(
            t.check(read_scope, Some(&bearer(&trigger)))
                .unwrap_err()
                .status(),
            403
        );
        assert_eq!(
            t.check(admin_scope, Some(&bearer(&trigger)))
                .unwrap_err()
                .status(),
            403
        );
        for needed in [admin_scope, trigger_scope, read_scope] {
            assert!(t.check(needed, Some(&bearer(&admin))).is_ok(), "{needed:?}");
        }
        // Basic with the token as the password; any user name.
        let basic = format!("Basic {}", STANDARD.encode(format!("me:{read}")));
        assert!(t.check(read_scope, Some(&basic)).is_ok());
        let basic_user = format!("Basic {}", STANDARD.encode(format!("{read}:")));
        assert_eq!(
            t.check(read_scope, Some(&basic_user)),
            Err(Denied::Unusable)
        );
    }

    #[test]
    fn token_names_are_checked() {
        assert!(check_name("ci-deploy_1.x@host").is_ok());
        for bad in ["", "a b", "#x", "ä", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }
}
