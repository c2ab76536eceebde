//! HTTP to the frontend.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use ureq::tls::{Certificate, RootCerts, TlsConfig};

use crate::exit;

/// What may stand unencoded in a path segment.
const PATH_SEGMENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.');

/// How long to wait for a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// An error with the exit code it ends the command with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub code: i32,
    pub message: String,
}

impl Failure {
    pub fn refused(message: impl Into<String>) -> Failure {
        Failure {
            code: exit::REFUSED,
            message: message.into(),
        }
    }

    pub fn unavailable(message: impl Into<String>) -> Failure {
        Failure {
            code: exit::UNAVAILABLE,
            message: message.into(),
        }
    }

    /// The failure an HTTP answer other than 2xx stands for, with the frontend's `error`.
    pub fn from_status(status: u16, body: &str) -> Failure {
        let error = serde_json::from_str::<serde_json::Value>(body)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
            .unwrap_or_else(|| body.trim().chars().take(300).collect());
        let message = format!("{status}: {error}");
        if status >= 500 {
            Failure::unavailable(message)
        } else {
            Failure::refused(message)
        }
    }
}

/// An answer: status and body.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub body: String,
}

/// The frontend at one URL, with a token.
pub struct Client {
    agent: ureq::Agent,
    base: String,
    token: Option<String>,
}

impl Client {
    /// A client of the frontend at `url` (`http://` or `https://`).
    pub fn new(url: &str, token: Option<String>, ca: Option<&Path>) -> Result<Client, Failure> {
        let base = url.trim_end_matches('/').to_owned();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(Failure::refused(format!(
                "--url {url:?}: give http://HOST:PORT or https://HOST:PORT"
            )));
        }
        let mut tls = TlsConfig::builder();
        if let Some(ca) = ca {
            let pem = std::fs::read(ca)
                .map_err(|e| Failure::refused(format!("reading --ca {}: {e}", ca.display())))?;
            let certs: Vec<Certificate<'static>> = ureq::tls::parse_pem(&pem)
                .filter_map(|item| match item {
                    Ok(ureq::tls::PemItem::Certificate(cert)) => Some(Ok(cert)),
                    Ok(_) => None,
                    Err(e) => Some(Err(e)),
                })
                .collect::<Result<_, _>>()
                .map_err(|e| Failure::refused(format!("--ca {}: {e}", ca.display())))?;
            if certs.is_empty() {
                return Err(Failure::refused(format!(
                    "--ca {}: no certificate in it",
                    ca.display()
                )));
            }
            tls = tls.root_certs(RootCerts::new_with_certs(&certs));
        }
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(CONNECT_TIMEOUT))
            .max_redirects(0)
            .tls_config(tls.build())
            .build()
            .into();
        Ok(Client { agent, base, token })
    }

    /// `GET path?query`; `path`'s segments are taken as they are (see [`segment`]).
    pub fn get<K: AsRef<str>>(&self, path: &str, query: &[(K, String)]) -> Result<Answer, Failure> {
        let request = self.prepare(self.agent.get(format!("{}{path}", self.base)), query);
        answer(request.call())
    }

    /// `POST path?query` with an empty body.
    pub fn post<K: AsRef<str>>(
        &self,
        path: &str,
        query: &[(K, String)],
    ) -> Result<Answer, Failure> {
        let request = self.prepare(self.agent.post(format!("{}{path}", self.base)), query);
        answer(request.send_empty())
    }

    /// The query and the token on a request.
    fn prepare<B, K: AsRef<str>>(
        &self,
        mut request: ureq::RequestBuilder<B>,
        query: &[(K, String)],
    ) -> ureq::RequestBuilder<B> {
        for (name, value) in query {
            request = request.query(name.as_ref(), value);
        }
        match &self.token {
            Some(token) => request.header("Authorization", format!("Bearer {token}")),
            None => request,
        }
    }

    /// `GET path?query`, the body copied to `out` as it arrives (a followed log).
    pub fn stream<K: AsRef<str>>(
        &self,
        path: &str,
        query: &[(K, String)],
        out: &mut dyn Write,
    ) -> Result<(), Failure> {
        let request = self.prepare(self.agent.get(format!("{}{path}", self.base)), query);
        let mut response = request.call().map_err(unreachable)?;
        let status = response.status().as_u16();
        if !(200..300).contains(&status) {
            let body = response.body_mut().read_to_string().unwrap_or_default();
            return Err(Failure::from_status(status, &body));
        }
        let mut reader = response.body_mut().as_reader();
        let mut buf = [0u8; 8192];
        loop {
            let n = match std::io::Read::read(&mut reader, &mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Failure::unavailable(format!("the stream broke: {e}"))),
            };
            // Each piece as it comes: a followed log shows lines as they are written.
            let written = out.write_all(&buf[..n]).and_then(|()| out.flush());
            if written.is_err() {
                return Ok(()); // our reader went away (a closed pipe): nothing more to do
            }
        }
    }
}

/// A path segment, percent-encoded (an id or a name typed by the user).
pub fn segment(value: &str) -> String {
    utf8_percent_encode(value, PATH_SEGMENT).to_string()
}

fn answer(
    result: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
) -> Result<Answer, Failure> {
    let mut response = result.map_err(unreachable)?;
    let status = response.status().as_u16();
    let body = response
        .body_mut()
        .read_to_string()
        .map_err(|e| Failure::unavailable(format!("reading the answer: {e}")))?;
    Ok(Answer { status, body })
}

fn unreachable(e: ureq::Error) -> Failure {
    Failure::unavailable(format!("cannot reach the frontend: {e}"))
}

/// The token: `JOBZ_TOKEN` (`from_env`), else the file `token_file`, else the default
/// file if it exists. A token file holds the token on its first line.
pub fn token(
    from_env: Option<String>,
    token_file: Option<&Path>,
    default_file: Option<PathBuf>,
) -> Result<Option<String>, Failure> {
    if let Some(token) = from_env.filter(|t| !t.trim().is_empty()) {
        return Ok(Some(token.trim().to_owned()));
    }
    let (path, required) = match (token_file, default_file) {
        (Some(path), _) => (path.to_owned(), true),
        (None, Some(path)) => (path, false),
        (None, None) => return Ok(None),
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let token = text.lines().next().unwrap_or("").trim().to_owned();
            if token.is_empty() {
                return Err(Failure::refused(format!(
                    "the token file {} is empty",
                    path.display()
                )));
            }
            Ok(Some(token))
        }
        Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Failure::refused(format!(
            "reading the token file {}: {e}",
            path.display()
        ))),
    }
}

/// `${XDG_CONFIG_HOME:-~/.config}/jobz/token`.
pub fn default_token_file(
    xdg_config_home: Option<String>,
    home: Option<String>,
) -> Option<PathBuf> {
    let config = xdg_config_home
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            home.filter(|h| !h.is_empty())
                .map(|h| Path::new(&h).join(".config"))
        })?;
    Some(config.join("jobz").join("token"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_comes_from_the_environment_then_the_files() {
        let dir = std::env::temp_dir().join(format!("jobz-cli-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("token");
        std::fs::write(&file, "file-token\nignored\n").unwrap();
        assert_eq!(
            token(Some(" env-token\n".into()), Some(&file), None),
            Ok(Some("env-token".into()))
        );
        assert_eq!(
            token(None, Some(&file), None),
            Ok(Some("file-token".into()))
        );
        assert_eq!(
            token(None, None, Some(file.clone())),
            Ok(Some("file-token".into()))
        );
        let missing = dir.join("missing");
        assert_eq!(
            token(None, None, Some(missing.clone())),
            Ok(None),
            "optional"
        );
        assert_eq!(
            token(None, Some(&missing), None).map_err(|f| f.code),
            Err(exit::REFUSED),
            "a named file must exist"
        );
        std::fs::write(&file, "\n").unwrap();
        assert!(token(None, Some(&file), None).is_err(), "empty");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_default_token_file_follows_xdg() {
        assert_eq!(
            default_token_file(Some("/x".into()), Some("/home/a".into())),
            Some(PathBuf::from("/x/jobz/token"))
        );
        assert_eq!(
            default_token_file(None, Some("/home/a".into())),
            Some(PathBuf::from("/home/a/.config/jobz/token"))
        );
        assert_eq!(default_token_file(Some(String::new()), None), None);
    }

    #[test]
    fn statuses_map_to_exit_codes_with_the_frontends_error() {
        let f = Failure::from_status(404, r#"{"error":"no such job","job":"x"}"#);
        assert_eq!(
            (f.code, f.message.as_str()),
            (exit::REFUSED, "404: no such job")
        );
        let f = Failure::from_status(503, "broker down");
        assert_eq!(
            (f.code, f.message.as_str()),
            (exit::UNAVAILABLE, "503: broker down")
        );
    }

    #[test]
    fn segments_are_encoded() {
        assert_eq!(segment("01a2-b_c.d"), "01a2-b_c.d");
        assert_eq!(segment("../x y"), "..%2Fx%20y");
    }

    #[test]
    fn only_http_urls_are_taken() {
        assert!(Client::new("ftp://x", None, None).is_err());
        assert!(Client::new("http://127.0.0.1:6769/", None, None).is_ok());
    }
}
