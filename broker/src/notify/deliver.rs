//! One delivery attempt of a notice: the webhook POST (signed) or the e-mail.
//!
//! A webhook's body is the notice's JSON with `url` (the run's link, when the `--notify`
//! file gives `run_url`); the headers say what it is: `X-Jobz-Event` (`run.failed`, …),
//! `X-Jobz-Delivery` (the notice's id, the same on every attempt) and
//! `X-Jobz-Signature: sha256=HEX`, the HMAC-SHA256 of the body under the webhook's
//! secret (as GitHub's `X-Hub-Signature-256`). Any 2xx answer is a delivery; 4xx and 5xx,
//! a timeout or a refused connection are tried again.

use std::time::Duration;

use hmac::{Hmac, Mac};
use jobz::jobfile::NotifyTarget;
use lettre::message::header::ContentType;
use lettre::transport::smtp::authentication::Credentials;
use lettre::{SmtpTransport, Transport};
use sha2::Sha256;

use super::config::{NotifyConfig, SmtpTls, Webhook};
use super::Notice;

/// How long one attempt may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why an attempt did not deliver.
#[derive(Debug)]
pub enum Failure {
    /// Worth trying again (the receiver refused or was away).
    Transient(String),
    /// Never deliverable as configured (an unknown webhook, no SMTP server).
    Permanent(String),
}

/// What the notifier delivers with.
pub struct Sender<'a> {
    config: &'a NotifyConfig,
    http: ureq::Agent,
    smtp: Option<SmtpTransport>,
    smtp_error: Option<String>,
}

/// `HMAC-SHA256(secret, body)` as lower-case hex.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    // HMAC takes a key of any length; the error case cannot happen.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else {
        return String::new();
    };
    mac.update(body);
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl<'a> Sender<'a> {
    /// A sender for `config`'s targets.
    pub fn new(config: &'a NotifyConfig) -> Sender<'a> {
        let http = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(ATTEMPT_TIMEOUT))
            .max_redirects(0)
            .build()
            .into();
        let (smtp, smtp_error) = match &config.smtp {
            None => (None, None),
            Some(s) => {
                let builder = match s.tls {
                    SmtpTls::Starttls => SmtpTransport::starttls_relay(&s.host),
                    SmtpTls::Tls => SmtpTransport::relay(&s.host),
                    SmtpTls::None => Ok(SmtpTransport::builder_dangerous(&s.host)),
                };
                match builder {
                    Ok(builder) => {
                        let mut builder = builder.port(s.port).timeout(Some(ATTEMPT_TIMEOUT));
                        if let Some((user, password)) = &s.credentials {
                            builder = builder
                                .credentials(Credentials::new(user.clone(), password.to_string()));
                        }
                        (Some(builder.build()), None)
                    }
                    Err(e) => (None, Some(format!("SMTP server {}: {e}", s.host))),
                }
            }
        };
        Sender {
            config,
            http,
            smtp,
            smtp_error,
        }
    }

    /// The body a webhook gets: the notice with the run's link.
    fn body(&self, notice: &Notice) -> String {
        let mut value: serde_json::Value =
            serde_json::from_str(&notice.payload).unwrap_or(serde_json::Value::Null);
        if let (Some(url), Some(object)) = (&self.config.run_url, value.as_object_mut()) {
            let link = url.replace("{run_id}", notice.run_id.as_str());
            object.insert("url".into(), serde_json::Value::String(link));
        }
        value.to_string()
    }

    /// One attempt.
    pub fn send(&self, notice: &Notice) -> Result<(), Failure> {
        match &notice.target {
            NotifyTarget::Webhook(name) => match self.config.webhooks.get(name) {
                Some(hook) => self.post(hook, notice),
                None => Err(Failure::Permanent(format!(
                    "no webhook {name:?} in the broker's --notify file"
                ))),
            },
            NotifyTarget::Email(address) => self.mail(address, notice),
        }
    }

    fn post(&self, hook: &Webhook, notice: &Notice) -> Result<(), Failure> {
        let body = self.body(notice);
        let signature = format!("sha256={}", signature(&hook.secret, body.as_bytes()));
        let answer = self
            .http
            .post(&hook.url)
            .header("Content-Type", "application/json")
            .header("User-Agent", format!("jobz-broker/{}", jobz::VERSION))
            .header("X-Jobz-Event", &notice.event)
            .header("X-Jobz-Delivery", &notice.id)
            .header("X-Jobz-Signature", &signature)
            .send(body.as_bytes());
        match answer {
            Ok(response) if response.status().is_success() => Ok(()),
            Ok(response) => Err(Failure::Transient(format!(
                "{} answered {}",
                hook.url,
                response.status()
            ))),
            Err(e) => Err(Failure::Transient(format!("{}: {e}", hook.url))),
        }
    }

    fn mail(&self, address: &str, notice: &Notice) -> Result<(), Failure> {
        let (Some(smtp), Some(server)) = (&self.smtp, &self.config.smtp) else {
            let why = self
                .smtp_error
                .clone()
                .unwrap_or_else(|| "no smtp: server in the broker's --notify file".into());
            return Err(Failure::Permanent(why));
        };
        let payload: serde_json::Value =
            serde_json::from_str(&notice.payload).unwrap_or(serde_json::Value::Null);
        let run = &payload["run"];
        let text = |v: &serde_json::Value| v.as_str().unwrap_or("").to_owned();
        let job = text(&run["job"]);
        let state = text(&run["state"]);
        let subject = format!("[jobz] {job} {state} (run {})", notice.run_id);
        let mut body = format!(
            "Run {} of job {job} {state}.\n\nstarted: {}\nended:   {}\nparams:  {}\n",
            notice.run_id,
            text(&run["created_at"]),
            text(&run["finished_at"]),
            run["params"],
        );
        if let Some(reason) = run["reason"].as_str() {
            body.push_str(&format!("reason:  {reason}\n"));
        }
        if let Some(url) = &self.config.run_url {
            body.push_str(&format!(
                "\n{}\n",
                url.replace("{run_id}", notice.run_id.as_str())
            ));
        }
        let from = server
            .from
            .parse()
            .map_err(|e| Failure::Permanent(format!("smtp from {:?}: {e}", server.from)))?;
        let to = address
            .parse()
            .map_err(|e| Failure::Permanent(format!("address {address:?}: {e}")))?;
        // The same on every attempt, as X-Jobz-Delivery is: a repeat (delivery is at least
        // once) is told by it.
        let message_id = format!("<{}@jobz>", notice.id.replace('/', "."));
        let message = lettre::Message::builder()
            .message_id(Some(message_id))
            .from(from)
            .to(to)
            .subject(subject)
            .header(ContentType::TEXT_PLAIN)
            .body(body)
            .map_err(|e| Failure::Permanent(format!("building the mail: {e}")))?;
        smtp.send(&message)
            .map(|_| ())
            .map_err(|e| Failure::Transient(format!("SMTP {}:{}: {e}", server.host, server.port)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_hmac_sha256_in_hex() {
        // RFC 4231 test case 2.
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
