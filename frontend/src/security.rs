//! Who may reach the HTTP API: the settings, protected mode, and the per-request gate.
//!
//! Protected mode (as in Redis): a frontend with neither tokens nor a client CA answers
//! anyone who can connect, so it only listens on a loopback address unless the operator
//! says `--insecure`; the same goes for the optional health listener, which serves `/healthz`
//! and `/metrics` only, to anyone. On the main listener with tokens, every request but
//! `/healthz` needs a token with the scope of its route (see [`crate::route`] and
//! [`crate::auth`]).
//!
//! What changes a run is `POST` only, and [`guard_post`] stands between such a request and
//! its handler against cross-site request forgery: a browser that holds Basic credentials
//! for this frontend sends them with any request a page elsewhere makes it send, and a
//! plain HTML form may POST across sites without a preflight. So a POST is refused (403)
//! when the browser says it comes from another site (`Sec-Fetch-Site` other than
//! `same-origin` or `none`) or names an `Origin` other than this frontend's own (scheme,
//! and the `Host` it was sent to), `null` included; a request from a script or `curl`
//! carries neither and passes. On a frontend without credentials (protected mode, loopback
//! only) a page could still reach it by DNS rebinding, where its origin *is* the `Host` it
//! names: there a POST must name a loopback `Host`. A POST takes no body (400): its
//! arguments are in the query string, where the route checks them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use serde_json::json;

use crate::admission::Limits;
use crate::api::HttpReply;
use crate::auth::{TokenFile, Tokens};
use crate::relay::{ConnectionPolicy, DEFAULT_HEADER_TIMEOUT, DEFAULT_IDLE_TIMEOUT};
use crate::route::Parsed;
use crate::tls::TlsFiles;

/// Concurrent connections per listener when `--max-connections` is not given.
pub const DEFAULT_MAX_CONNECTIONS: usize = 256;

/// Concurrent connections from one IP address when `--max-connections-per-address` is
/// not given.
pub const DEFAULT_MAX_CONNECTIONS_PER_ADDRESS: usize = 32;

/// HTTP security settings of a frontend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Security {
    /// The token file; `None`: no tokens asked for.
    pub tokens: Option<PathBuf>,
    /// HTTPS; `None`: plain HTTP.
    pub tls: Option<TlsFiles>,
    /// Allow a non-loopback listener without tokens or client certificates.
    pub insecure: bool,
    /// A second, open listener serving only `/healthz` and `/metrics`.
    pub health_listen: Option<SocketAddr>,
    /// Most connections open at once on each listener; more are closed at once.
    pub max_connections: usize,
    /// Most connections open at once from one IP address, on each listener.
    pub max_connections_per_address: usize,
    /// Places of the main listener held for authenticated connections; `None`: a quarter
    /// of `max_connections`. Only when tokens or client certificates are configured.
    pub reserved_connections: Option<usize>,
    /// An idle keep-alive connection is closed after this.
    pub idle_timeout: Duration,
    /// A TLS handshake or a request head must be complete within this.
    pub header_timeout: Duration,
}

impl Default for Security {
    fn default() -> Self {
        Security {
            tokens: None,
            tls: None,
            insecure: false,
            health_listen: None,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_address: DEFAULT_MAX_CONNECTIONS_PER_ADDRESS,
            reserved_connections: None,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            header_timeout: DEFAULT_HEADER_TIMEOUT,
        }
    }
}

impl Security {
    /// Loads the token file and TLS files and decides the [`Exposure`] of `listen`; any
    /// problem is an error that stops the start.
    pub fn prepare(&self, listen: SocketAddr) -> anyhow::Result<Prepared> {
        let tokens = match &self.tokens {
            None => None,
            Some(path) => Some(Arc::new(TokenFile::load(path).map_err(anyhow::Error::msg)?)),
        };
        let tls = match &self.tls {
            None => None,
            Some(files) => Some(crate::tls::server_config(files).context("setting up TLS")?),
        };
        let client_certs = self.tls.as_ref().is_some_and(|t| t.client_ca.is_some());
        let exposure = Exposure::decide(listen, tokens.is_some(), client_certs, self.insecure)
            .map_err(anyhow::Error::msg)?;
        if let Some(health) = self.health_listen {
            // Open by design, so only where protected mode would allow an open listener.
            Exposure::decide(health, tokens.is_some(), client_certs, self.insecure)
                .map_err(|e| anyhow::anyhow!("--health-listen: {e}"))?;
        }
        let authenticated = tokens.is_some() || client_certs;
        let policy = self.connection_policy(authenticated)?;
        let health_policy = ConnectionPolicy {
            limits: Limits {
                reserved: 0,
                ..policy.limits
            },
            ..policy
        };
        Ok(Prepared {
            exposure,
            tokens,
            tls,
            health_listen: self.health_listen,
            policy,
            health_policy,
        })
    }

    /// The main listener's connection policy; the reserve only when something can
    /// authenticate a connection.
    fn connection_policy(&self, authenticated: bool) -> anyhow::Result<ConnectionPolicy> {
        let max = self.max_connections.max(1);
        let reserved = match (authenticated, self.reserved_connections) {
            (false, _) => 0,
            (true, None) => max / 4,
            (true, Some(n)) if n < max => n,
            (true, Some(n)) => anyhow::bail!(
                "--reserved-connections {n} must be less than --max-connections {max}: \
                 clients without a token (health probes) need a place too"
            ),
        };
        Ok(ConnectionPolicy {
            limits: Limits {
                max,
                per_address: self.max_connections_per_address.max(1),
                reserved,
            },
            idle_timeout: self.idle_timeout,
            header_timeout: self.header_timeout,
        })
    }
}

/// [`Security`] with its files loaded, ready for the listeners.
#[derive(Clone)]
pub struct Prepared {
    /// How the main listener is protected.
    pub exposure: Exposure,
    /// The token file (re-read when it changes), when tokens are required.
    pub tokens: Option<Arc<TokenFile>>,
    /// The TLS configuration, when HTTPS.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// The open health listener's address.
    pub health_listen: Option<SocketAddr>,
    /// How the main listener treats connections.
    pub policy: ConnectionPolicy,
    /// How the health listener treats connections (no reserve: nothing authenticates).
    pub health_policy: ConnectionPolicy,
}

/// How the main listener is protected; said at every start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exposure {
    /// Tokens and/or client certificates are required.
    Authenticated {
        /// Requests need a token.
        tokens: bool,
        /// Connections need a client certificate.
        client_certs: bool,
    },
    /// No authentication, on a loopback address: only this host can connect.
    LoopbackOnly,
    /// No authentication on a reachable address, because the operator said `--insecure`.
    Insecure,
}

impl Exposure {
    /// Decides the mode, or refuses to start (protected mode).
    pub fn decide(
        listen: SocketAddr,
        tokens: bool,
        client_certs: bool,
        insecure: bool,
    ) -> Result<Exposure, String> {
        if tokens || client_certs {
            return Ok(Exposure::Authenticated {
                tokens,
                client_certs,
            });
        }
        if listen.ip().is_loopback() {
            return Ok(Exposure::LoopbackOnly);
        }
        if insecure {
            return Ok(Exposure::Insecure);
        }
        Err(format!(
            "refusing to listen on {listen} without authentication (protected mode): anyone \
             who can reach it could start jobs. Give --tokens FILE (see `jobz-frontend token \
             new`) and/or --tls-cert, --tls-key and --tls-client-ca, listen on a loopback \
             address (127.0.0.1:PORT), or pass --insecure if a firewall or proxy in front \
             does the authentication"
        ))
    }

    /// A short name for the start-up log.
    pub fn describe(self) -> &'static str {
        match self {
            Exposure::Authenticated {
                tokens: true,
                client_certs: true,
            } => "authenticated: client certificates and tokens",
            Exposure::Authenticated {
                tokens: true,
                client_certs: false,
            } => "authenticated: tokens",
            Exposure::Authenticated { .. } => "authenticated: client certificates",
            Exposure::LoopbackOnly => "protected: no authentication, loopback only",
            Exposure::Insecure => "INSECURE: no authentication on a reachable address",
        }
    }
}

/// Which listener a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// The API, dashboard and metrics, behind tokens when configured.
    Main,
    /// `/healthz` and `/metrics` only, open.
    Health,
}

/// Decides whether a request reaches the handlers: `Err` is the answer to send instead.
/// Both listeners judge the request by its [`Parsed`] route, the value the handlers take.
pub fn gate(
    listener: Listener,
    tokens: Option<&Tokens>,
    request: &Parsed,
    authorization: Option<&str>,
) -> Result<(), HttpReply> {
    match listener {
        Listener::Health => {
            if request.endpoint().is_some_and(|e| e.is_health()) {
                Ok(())
            } else {
                Err(HttpReply::error(
                    404,
                    "this listener serves only /healthz and /metrics",
                    &[("path", json!(request.log_path))],
                ))
            }
        }
        Listener::Main => {
            let Some(tokens) = tokens else {
                return Ok(());
            };
            match tokens.check(request.scope(), authorization) {
                Ok(_) => Ok(()),
                Err(denied) => {
                    let mut reply = HttpReply::error(denied.status(), &denied.message(), &[]);
                    if denied.status() == 401 {
                        reply
                            .headers
                            .push(("WWW-Authenticate", "Basic realm=\"jobz\"".to_owned()));
                    }
                    Err(reply)
                }
            }
        }
    }
}

/// Where a POST says it comes from: the headers [`guard_post`] judges.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PostHeaders<'a> {
    /// `Origin`.
    pub origin: Option<&'a str>,
    /// `Sec-Fetch-Site`.
    pub sec_fetch_site: Option<&'a str>,
    /// `Host`.
    pub host: Option<&'a str>,
    /// The request body's length (`Content-Length`), if it has one.
    pub body_length: Option<usize>,
}

/// How this listener is reached, for the origin a POST must come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OwnOrigin {
    /// HTTPS.
    pub tls: bool,
    /// No credentials are asked for (protected mode): only a loopback `Host` may POST.
    pub loopback_only: bool,
}

impl OwnOrigin {
    /// The origin of the main listener as `prepared` sets it up.
    pub fn of(prepared: &Prepared) -> OwnOrigin {
        OwnOrigin {
            tls: prepared.tls.is_some(),
            loopback_only: prepared.exposure == Exposure::LoopbackOnly,
        }
    }
}

/// Refuses a POST that a page on another site could have made a browser send (see the
/// module documentation), or one with a body.
pub fn guard_post(own: OwnOrigin, request: &PostHeaders<'_>) -> Result<(), HttpReply> {
    let forbidden = |why: String| {
        Err(HttpReply::error(
            403,
            &format!("cross-site request refused: {why}"),
            &[],
        ))
    };
    if request.body_length.is_some_and(|n| n > 0) {
        return Err(HttpReply::error(
            400,
            "this endpoint takes no request body: its arguments go in the query string",
            &[],
        ));
    }
    if let Some(site) = request.sec_fetch_site {
        let site = site.trim();
        if !(site.eq_ignore_ascii_case("same-origin") || site.eq_ignore_ascii_case("none")) {
            return forbidden(format!("Sec-Fetch-Site is {site:?}"));
        }
    }
    let scheme = if own.tls { "https" } else { "http" };
    if let Some(origin) = request.origin {
        let Some(host) = request.host else {
            return forbidden("an Origin without a Host".into());
        };
        let own_origin = normalized_origin(&format!("{scheme}://{host}"), own.tls);
        if normalized_origin(origin, own.tls) != own_origin {
            return forbidden(format!("Origin {origin:?} is not {own_origin:?}"));
        }
    }
    if own.loopback_only {
        if let Some(host) = request.host.filter(|h| !is_loopback_host(h)) {
            return forbidden(format!(
                "Host {host:?} is not a loopback name, and this frontend asks for no credentials"
            ));
        }
    }
    Ok(())
}

/// An origin in lower case without its scheme's default port, for comparing.
fn normalized_origin(origin: &str, tls: bool) -> String {
    let origin = origin.trim().to_ascii_lowercase();
    let default_port = if tls { ":443" } else { ":80" };
    origin
        .strip_suffix(default_port)
        .map_or(origin.clone(), str::to_owned)
}

/// `localhost`, `127.x.y.z` or `[::1]`, with or without a port.
fn is_loopback_host(host: &str) -> bool {
    let host = host.trim();
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            _ => host,
        }
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::auth::{file_line, new_token, Scopes};

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn protected_mode_refuses_reachable_addresses_without_authentication() {
        let any = addr("0.0.0.0:6769");
        let e = Exposure::decide(any, false, false, false).unwrap_err();
        for flag in ["--tokens", "--tls-client-ca", "--insecure"] {
            assert!(e.contains(flag), "{e}");
        }
        assert_eq!(
            Exposure::decide(any, false, false, true),
            Ok(Exposure::Insecure)
        );
        assert!(Exposure::decide(addr("[::]:1"), false, false, false).is_err());
        assert!(Exposure::decide(addr("10.1.2.3:1"), false, false, false).is_err());
        assert_eq!(
            Exposure::decide(addr("127.0.0.1:6769"), false, false, false),
            Ok(Exposure::LoopbackOnly)
        );
        assert_eq!(
            Exposure::decide(addr("[::1]:6769"), false, false, false),
            Ok(Exposure::LoopbackOnly)
        );
        assert!(matches!(
            Exposure::decide(any, true, false, false),
            Ok(Exposure::Authenticated { tokens: true, .. })
        ));
        assert!(matches!(
            Exposure::decide(any, false, true, false),
            Ok(Exposure::Authenticated {
                client_certs: true,
                ..
            })
        ));
    }

    #[test]
    fn a_reachable_health_listener_needs_authentication_or_insecure() {
        let loopback = addr("127.0.0.1:0");
        let open_health = |health: &str, insecure: bool| Security {
            health_listen: Some(addr(health)),
            insecure,
            ..Security::default()
        };
        let e = match open_health("0.0.0.0:0", false).prepare(loopback) {
            Ok(_) => panic!("a reachable open health listener in protected mode started"),
            Err(e) => format!("{e:#}"),
        };
        for needle in [
            "--health-listen",
            "protected mode",
            "--tokens",
            "--insecure",
        ] {
            assert!(e.contains(needle), "{needle} not in {e}");
        }
        assert!(open_health("[::]:0", false).prepare(loopback).is_err());
        assert!(open_health("0.0.0.0:0", true).prepare(loopback).is_ok());
        assert!(open_health("127.0.0.1:0", false).prepare(loopback).is_ok());
        assert!(open_health("[::1]:0", false).prepare(loopback).is_ok());
    }

    #[test]
    fn the_reserve_exists_only_where_connections_can_authenticate() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tokens");
        let token = new_token().unwrap();
        std::fs::write(
            &file,
            file_line("r", Scopes::parse("read").unwrap(), &token),
        )
        .unwrap();
        let loopback = addr("127.0.0.1:0");
        let open = Security::default().prepare(loopback).unwrap();
        assert_eq!(open.policy.limits.reserved, 0);
        assert_eq!(open.policy.limits.max, DEFAULT_MAX_CONNECTIONS);
        assert_eq!(open.policy.idle_timeout, Duration::from_secs(10));
        let with_tokens = Security {
            tokens: Some(file.clone()),
            ..Security::default()
        };
        let prepared = with_tokens.prepare(loopback).unwrap();
        assert_eq!(prepared.policy.limits.reserved, DEFAULT_MAX_CONNECTIONS / 4);
        assert_eq!(prepared.health_policy.limits.reserved, 0);
        let too_many = Security {
            max_connections: 8,
            reserved_connections: Some(8),
            ..with_tokens
        };
        let e = too_many.prepare(loopback).err().unwrap().to_string();
        assert!(e.contains("--reserved-connections 8 must be less"), "{e}");
    }

    #[test]
    fn the_gate_asks_for_basic_auth_and_the_health_listener_is_narrow() {
        let token = new_token().unwrap();
        let tokens = Tokens::parse(
            &file_line("r", Scopes::parse("read").unwrap(), &token),
            Path::new("t"),
        )
        .unwrap();
        let get = |target: &str| crate::route::parse(&crate::route::Method::Get, target);
        let reply = gate(Listener::Main, Some(&tokens), &get("/runs"), None).unwrap_err();
        assert_eq!(reply.status, 401);
        assert!(reply
            .headers
            .contains(&("WWW-Authenticate", "Basic realm=\"jobz\"".to_owned())));
        let bearer = format!("Bearer {token}");
        assert!(gate(Listener::Main, Some(&tokens), &get("/runs"), Some(&bearer)).is_ok());
        let reply = gate(
            Listener::Main,
            Some(&tokens),
            &get("/job_start?job_name=x"),
            Some(&bearer),
        )
        .unwrap_err();
        assert_eq!(reply.status, 403);
        assert!(reply.headers.is_empty());
        assert!(gate(Listener::Main, Some(&tokens), &get("/healthz"), None).is_ok());
        assert!(gate(Listener::Main, None, &get("/job_start?job_name=x"), None).is_ok());

        assert!(gate(Listener::Health, None, &get("/healthz"), None).is_ok());
        assert!(gate(Listener::Health, None, &get("http://x/%68ealthz/"), None).is_ok());
        assert!(gate(Listener::Health, None, &get("/metrics"), None).is_ok());
        for target in [
            "/runs",
            "/job_start?job_name=x",
            "/",
            "/metrics/x",
            "/metrics/../job_start?job_name=x",
            "/healthz%2F..%2Fjob_start",
            "http://x/dead/t/retry",
        ] {
            let reply = gate(Listener::Health, Some(&tokens), &get(target), Some(&bearer));
            assert_eq!(reply.unwrap_err().status, 404, "{target}");
        }
    }

    #[test]
    fn a_post_from_another_site_is_refused_and_one_from_a_script_or_this_origin_passes() {
        let own = OwnOrigin {
            tls: false,
            loopback_only: false,
        };
        let post = |origin, site, host| PostHeaders {
            origin,
            sec_fetch_site: site,
            host,
            body_length: None,
        };
        let host = Some("jobz.example:6769");
        // Passes: curl (nothing), the dashboard (same origin), a typed URL (none).
        for ok in [
            post(None, None, host),
            post(None, None, None),
            post(Some("http://jobz.example:6769"), Some("same-origin"), host),
            post(Some("HTTP://JOBZ.example:6769"), None, host),
            post(None, Some("none"), host),
        ] {
            assert_eq!(guard_post(own, &ok), Ok(()), "{ok:?}");
        }
        assert_eq!(
            guard_post(
                own,
                &post(Some("http://jobz.example"), None, Some("jobz.example:80"))
            ),
            Ok(()),
            "the default port is the same origin"
        );
        for bad in [
            post(Some("https://evil.example"), None, host),
            post(Some("http://jobz.example:6769.evil.example"), None, host),
            post(Some("https://jobz.example:6769"), None, host),
            post(Some("http://jobz.example:6770"), None, host),
            post(Some("null"), None, host),
            post(Some("http://jobz.example:6769"), None, None),
            post(None, Some("cross-site"), host),
            post(None, Some("same-site"), host),
            post(Some("http://jobz.example:6769"), Some("cross-site"), host),
        ] {
            let refused = guard_post(own, &bad).unwrap_err();
            assert_eq!(refused.status, 403, "{bad:?}");
        }
        let with_body = PostHeaders {
            body_length: Some(3),
            ..post(None, None, host)
        };
        assert_eq!(guard_post(own, &with_body).unwrap_err().status, 400);
        let empty_body = PostHeaders {
            body_length: Some(0),
            ..post(None, None, host)
        };
        assert_eq!(guard_post(own, &empty_body), Ok(()));
        // Over TLS, the origin is https.
        let tls = OwnOrigin { tls: true, ..own };
        assert_eq!(
            guard_post(tls, &post(Some("https://jobz.example:6769"), None, host)),
            Ok(())
        );
        assert!(guard_post(tls, &post(Some("http://jobz.example:6769"), None, host)).is_err());
    }

    #[test]
    fn without_credentials_a_post_must_name_a_loopback_host() {
        // DNS rebinding: a page at evil.example re-resolved to 127.0.0.1 is "same origin".
        let own = OwnOrigin {
            tls: false,
            loopback_only: true,
        };
        let judged = |host: &str| {
            let origin = format!("http://{host}");
            let post = PostHeaders {
                origin: Some(&origin),
                host: Some(host),
                ..PostHeaders::default()
            };
            guard_post(own, &post).map_err(|r| r.status)
        };
        for ok in [
            "127.0.0.1:6769",
            "localhost:6769",
            "LOCALHOST",
            "[::1]:6769",
            "127.1.2.3",
        ] {
            assert_eq!(judged(ok), Ok(()), "{ok}");
        }
        for bad in [
            "evil.example:6769",
            "10.0.0.1:6769",
            "localhost.evil.example",
            "[::2]:1",
        ] {
            assert_eq!(judged(bad), Err(403), "{bad}");
        }
    }
}
