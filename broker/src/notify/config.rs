//! The broker's `--notify FILE`: where notices go, with the secrets job files must not
//! carry (job files travel the mesh in every worker's registration).
//!
//! ```yaml
//! webhooks:
//!   ops:
//!     url: https://hooks.example.com/jobz
//!     secret_file: /etc/jobz/ops-webhook.secret
//! smtp:
//!   host: smtp.example.com
//!   port: 587                # default: 587 (starttls), 465 (tls), 25 (none)
//!   tls: starttls            # starttls (default), tls or none
//!   from: "jobz <jobz@example.com>"
//!   username: jobz           # optional, with password_file
//!   password_file: /etc/jobz/smtp.password
//! run_url: "https://jobs.example.com/runs/{run_id}"   # optional: a link in each notice
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::Deserialize;
use zeroize::Zeroizing;

/// What the notifier may send to.
#[derive(Debug, Default)]
pub struct NotifyConfig {
    /// Webhooks by name.
    pub webhooks: BTreeMap<String, Webhook>,
    /// The SMTP server for `email:` targets; `None`: none configured.
    pub smtp: Option<Smtp>,
    /// `{run_id}` replaced: the link each notice carries.
    pub run_url: Option<String>,
}

/// A webhook: its URL and the secret its bodies are signed with.
pub struct Webhook {
    /// `http://` or `https://`.
    pub url: String,
    /// The HMAC-SHA256 key.
    pub secret: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhook")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

/// How the SMTP connection is secured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum SmtpTls {
    /// Plain, then STARTTLS (required).
    #[default]
    Starttls,
    /// TLS from the first byte (SMTPS).
    Tls,
    /// No encryption: a relay on the same host or network only.
    None,
}

/// The SMTP server.
pub struct Smtp {
    /// Host name (also the name its certificate must carry).
    pub host: String,
    /// Port.
    pub port: u16,
    /// Encryption.
    pub tls: SmtpTls,
    /// The `From:` mailbox.
    pub from: String,
    /// Login, if the server asks for one.
    pub credentials: Option<(String, Zeroizing<String>)>,
}

impl std::fmt::Debug for Smtp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Smtp")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls)
            .field("from", &self.from)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    webhooks: BTreeMap<String, RawWebhook>,
    #[serde(default)]
    smtp: Option<RawSmtp>,
    #[serde(default)]
    run_url: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWebhook {
    url: String,
    secret_file: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSmtp {
    host: String,
    #[serde(default)]
    port: Option<u16>,
    #[serde(default)]
    tls: SmtpTls,
    from: String,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password_file: Option<PathBuf>,
}

/// A secret file: its content without the trailing newline; empty is an error.
fn read_secret(path: &Path, what: &str) -> anyhow::Result<Zeroizing<String>> {
    let text = Zeroizing::new(
        std::fs::read_to_string(path)
            .with_context(|| format!("reading the {what} {}", path.display()))?,
    );
    let secret = Zeroizing::new(text.trim_end_matches(['\r', '\n']).to_owned());
    if secret.is_empty() {
        bail!("the {what} {} is empty", path.display());
    }
    Ok(secret)
}

impl NotifyConfig {
    /// Reads and checks `path` (secrets included): every problem is an error at start.
    pub fn load(path: &Path) -> anyhow::Result<NotifyConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the notify file {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("in the notify file {}", path.display()))
    }

    fn parse(text: &str) -> anyhow::Result<NotifyConfig> {
        let raw: RawConfig = serde_yaml::from_str(text).context("parsing YAML")?;
        let mut webhooks = BTreeMap::new();
        for (name, hook) in raw.webhooks {
            if !jobz::jobfile::is_valid_name(&name) {
                bail!("webhook name {name:?} must match [A-Za-z0-9_.-]{{1,128}}");
            }
            let lower = hook.url.to_ascii_lowercase();
            if !(lower.starts_with("http://") || lower.starts_with("https://")) {
                bail!(
                    "webhook {name}: url {:?} must be http:// or https://",
                    hook.url
                );
            }
            let secret = read_secret(&hook.secret_file, &format!("secret of webhook {name}"))?;
            webhooks.insert(
                name,
                Webhook {
                    url: hook.url,
                    secret: Zeroizing::new(secret.as_bytes().to_vec()),
                },
            );
        }
        let smtp = match raw.smtp {
            None => None,
            Some(s) => {
                if s.from.parse::<lettre::message::Mailbox>().is_err() {
                    bail!("smtp: from {:?} is not a mailbox", s.from);
                }
                let credentials = match (s.username, s.password_file) {
                    (None, None) => None,
                    (Some(user), Some(file)) => Some((user, read_secret(&file, "SMTP password")?)),
                    _ => bail!("smtp: username and password_file go together"),
                };
                let port = s.port.unwrap_or(match s.tls {
                    SmtpTls::Starttls => 587,
                    SmtpTls::Tls => 465,
                    SmtpTls::None => 25,
                });
                Some(Smtp {
                    host: s.host,
                    port,
                    tls: s.tls,
                    from: s.from,
                    credentials,
                })
            }
        };
        if let Some(url) = &raw.run_url {
            if !url.contains("{run_id}") {
                bail!("run_url {url:?} must hold {{run_id}}");
            }
        }
        Ok(NotifyConfig {
            webhooks,
            smtp,
            run_url: raw.run_url,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_webhooks_with_their_secrets_and_the_smtp_server() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("hook.secret");
        std::fs::write(&secret, "s3cret\n").unwrap();
        let text = format!(
            "webhooks:\n  ops:\n    url: http://127.0.0.1:9/h\n    secret_file: {}\n\
             smtp:\n  host: 127.0.0.1\n  tls: none\n  from: jobz@example.com\n\
             run_url: https://jobs/runs/{{run_id}}\n",
            secret.display()
        );
        let config = NotifyConfig::parse(&text).unwrap();
        assert_eq!(config.webhooks["ops"].secret.as_slice(), b"s3cret");
        let smtp = config.smtp.unwrap();
        assert_eq!((smtp.port, smtp.tls), (25, SmtpTls::None));
        assert!(!format!("{:?}", config.webhooks).contains("s3cret"));
        for (bad, needle) in [
            (
                "webhooks:\n  ops:\n    url: ftp://x\n    secret_file: /x\n",
                "http://",
            ),
            (
                "webhooks:\n  ops:\n    url: http://x\n    secret_file: /nonexistent\n",
                "reading the secret",
            ),
            ("smtp:\n  host: h\n  from: not a mailbox\n", "not a mailbox"),
            (
                "smtp:\n  host: h\n  from: a@b.c\n  username: u\n",
                "go together",
            ),
            ("run_url: https://x/\n", "{run_id}"),
            ("hooks: {}\n", "unknown field"),
        ] {
            let err = format!("{:#}", NotifyConfig::parse(bad).unwrap_err());
            assert!(err.contains(needle), "{bad}: {err}");
        }
    }
}
