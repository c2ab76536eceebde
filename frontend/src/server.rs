//! The thin shell: a `tiny_http` server, N threads taking requests and handing them to
//! [`Api::handle`], the waiter thread, and one thread per followed log.
//!
//! `tiny_http` listens on a Unix socket in a private directory; the public address belongs
//! to a [`Relay`] (TLS, limits, connection cap). Each request passes the
//! [`security::gate`] before it reaches the handlers.

use std::io::Cursor;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use crossbeam_channel::Sender;
use tracing::{debug, info, warn};

use jobz::client::{Client, ClientConfig};
use jobz::message::{Role, RunView};
use jobz::socket::BrokerAddr;

use crate::api::{self, Api, HttpReply, Outcome, WaitRequest};
use crate::auth::TokenFile;
use crate::broker::Broker;
use crate::events::{self, EventFilter};
use crate::follow;
use crate::metrics::{self, Stats};
use crate::relay::{ConnectionPolicy, Credentials, OpenCount, Relay};
use crate::route::{self, Method};
use crate::security::{self, Exposure, Listener, OwnOrigin, PostHeaders, Prepared, Security};
use crate::waiter::{self, Responder};

/// How long an HTTP thread blocks for a request before it looks at the shutdown flag.
const RECV_TIMEOUT: Duration = Duration::from_millis(200);

/// Settings of a frontend.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the broker is.
    pub broker: BrokerAddr,
    /// Name on the mesh (default: the host name); the key is enrolled as `frontend:NAME`.
    pub name: Option<String>,
    /// This frontend's key and the broker keys it trusts: frames are sealed when set.
    pub identity: Option<jobz::keys::NodeIdentity>,
    /// Where to listen for HTTP.
    pub listen: SocketAddr,
    /// How long a request to the broker may take before the answer is 503.
    pub request_timeout: Duration,
    /// HTTP worker threads.
    pub threads: usize,
    /// `--public-url`, checked by [`crate::api::parse_public_url`]: answers give absolute
    /// URLs under it; `None`: paths.
    pub public_url: Option<String>,
    /// Tokens, TLS, protected mode, the health listener, the connection cap.
    pub security: Security,
}

/// Connects to the broker, serves HTTP until `shutdown` is set, then drains and stops.
pub fn run(config: Config, shutdown: Arc<AtomicBool>) -> anyhow::Result<()> {
    // Refuse a dangerous or broken set-up before anything connects anywhere.
    let prepared = config.security.prepare(config.listen)?;
    let node_id = format!(
        "frontend:{}/{}",
        jobz::keys::node_name("frontend", config.name.as_deref())?,
        jobz::new_id()
    );
    let mut client_config =
        ClientConfig::new(config.broker.clone(), node_id.clone(), Role::Frontend);
    client_config.identity = config.identity.clone();
    let client = Client::start(client_config).context("starting the broker link")?;
    let mut api = Api::new(Arc::new(client.clone()), config.request_timeout);
    api.public_base = config.public_url.clone().unwrap_or_default();
    let listener = crate::events::spawn_listener(
        client.clone(),
        api.feed.clone(),
        config.request_timeout,
        shutdown.clone(),
    );
    if let Err(e) = listener {
        client.shutdown();
        return Err(e);
    }
    let frontend = match Frontend::bind(config.listen, config.threads, api, prepared) {
        Ok(f) => f,
        Err(e) => {
            client.shutdown();
            return Err(e);
        }
    };
    info!(
        listen = %frontend.local_addr().map_or_else(|| config.listen.to_string(), |a| a.to_string()),
        broker = %config.broker,
        node_id = %node_id,
        threads = config.threads,
        "frontend listening"
    );
    frontend.log_security();
    let result = frontend.serve(shutdown);
    client.shutdown();
    info!("frontend stopped");
    result
}

/// A `tiny_http` server on a Unix socket in `dir`, and the relay from `listen` to it.
fn bind(
    listen: SocketAddr,
    dir: &std::path::Path,
    name: &str,
    tls: Option<Arc<rustls::ServerConfig>>,
    policy: ConnectionPolicy,
    credentials: Credentials,
    stats: Arc<Stats>,
) -> anyhow::Result<(Arc<tiny_http::Server>, Relay)> {
    let socket = dir.join(format!("{name}.sock"));
    let server = tiny_http::Server::http_unix(&socket)
        .map_err(|e| anyhow::anyhow!("listening on {}: {e}", socket.display()))?;
    let relay = Relay::bind(listen, tls, socket, policy, credentials, stats)?;
    Ok((Arc::new(server), relay))
}

/// A private directory (mode 0700) for the Unix sockets behind the relays.
fn socket_dir() -> anyhow::Result<tempfile::TempDir> {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::Builder::new()
        .prefix("jobz-frontend.")
        .tempdir()
        .context("creating a private directory for the HTTP sockets")?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))
        .context("restricting the HTTP socket directory")?;
    Ok(dir)
}

/// One listener: its relay, and the `tiny_http` server behind it.
struct Endpoint {
    listener: Listener,
    server: Arc<tiny_http::Server>,
    relay: Relay,
}

/// A bound HTTP server with its handlers, ready to serve.
pub struct Frontend {
    endpoints: Vec<Endpoint>,
    api: Arc<Api>,
    threads: usize,
    prepared: Prepared,
    /// Removed (with the sockets) when the frontend is dropped.
    _sockets: tempfile::TempDir,
}

impl Frontend {
    /// Binds `listen` (port 0 picks a free port), and the health listener if any, with
    /// these handlers.
    pub fn bind(
        listen: SocketAddr,
        threads: usize,
        api: Api,
        prepared: Prepared,
    ) -> anyhow::Result<Frontend> {
        let sockets = socket_dir()?;
        let credentials = Credentials {
            tokens: prepared.tokens.clone(),
            client_certs: matches!(
                prepared.exposure,
                Exposure::Authenticated {
                    client_certs: true,
                    ..
                }
            ),
        };
        let (server, relay) = bind(
            listen,
            sockets.path(),
            "http",
            prepared.tls.clone(),
            prepared.policy,
            credentials,
            api.stats.clone(),
        )?;
        let mut endpoints = vec![Endpoint {
            listener: Listener::Main,
            server,
            relay,
        }];
        if let Some(health) = prepared.health_listen {
            let (server, relay) = bind(
                health,
                sockets.path(),
                "health",
                None,
                prepared.health_policy,
                Credentials::default(),
                api.stats.clone(),
            )?;
            endpoints.push(Endpoint {
                listener: Listener::Health,
                server,
                relay,
            });
        }
        Ok(Frontend {
            endpoints,
            api: Arc::new(api),
            threads,
            prepared,
            _sockets: sockets,
        })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.endpoints.first().and_then(|e| e.relay.local_addr())
    }

    /// The health listener's address actually bound, if there is one.
    pub fn health_addr(&self) -> Option<SocketAddr> {
        self.endpoints
            .iter()
            .find(|e| e.listener == Listener::Health)
            .and_then(|e| e.relay.local_addr())
    }

    /// Says how the listeners are protected; loudly when they are not.
    pub fn log_security(&self) {
        let p = &self.prepared;
        let scheme = if p.tls.is_some() { "https" } else { "http" };
        let tokens = p.tokens.as_ref().map_or(0, |t| t.current().len());
        info!(
            mode = p.exposure.describe(),
            scheme,
            tokens,
            max_connections = p.policy.limits.max,
            max_connections_per_address = p.policy.limits.per_address,
            reserved_connections = p.policy.limits.reserved,
            idle_timeout = ?p.policy.idle_timeout,
            header_timeout = ?p.policy.header_timeout,
            "HTTP security"
        );
        if p.exposure == Exposure::Insecure {
            warn!(
                listen = %self.local_addr().map_or_else(String::new, |a| a.to_string()),
                "INSECURE: --insecure is set and neither --tokens nor --tls-client-ca is \
                 given: anyone who can reach this address can start jobs and read every run"
            );
        }
        if let Some(health) = self.health_addr() {
            info!(health_listen = %health, "open health listener: /healthz and /metrics only");
        }
    }

    /// Serves until `shutdown` is set: requests in progress are finished, waiting requests
    /// get their 202, log streams end.
    pub fn serve(self, shutdown: Arc<AtomicBool>) -> anyhow::Result<()> {
        let (wait_tx, wait_rx) = crossbeam_channel::unbounded::<(Pending, WaitRequest)>();
        let waiter = {
            let broker = self.api.broker.clone();
            let stats = self.api.stats.clone();
            let shutdown = shutdown.clone();
            std::thread::Builder::new()
                .name("http-waiter".into())
                .spawn(move || waiter::run(wait_rx, broker, stats, shutdown))
                .context("starting the waiter thread")?
        };
        let mut workers: Vec<JoinHandle<()>> = Vec::with_capacity(self.threads + 2);
        let mut open: Vec<OpenCount> = Vec::new();
        let mut started = Ok(());
        for endpoint in self.endpoints {
            let threads = match endpoint.listener {
                Listener::Main => self.threads.max(1),
                Listener::Health => 2,
            };
            for n in 0..threads {
                let shell = Shell {
                    server: endpoint.server.clone(),
                    api: self.api.clone(),
                    waits: wait_tx.clone(),
                    shutdown: shutdown.clone(),
                    listener: endpoint.listener,
                    tokens: self.prepared.tokens.clone(),
                    own_origin: OwnOrigin::of(&self.prepared),
                };
                let name = match endpoint.listener {
                    Listener::Main => format!("http-{n}"),
                    Listener::Health => format!("health-{n}"),
                };
                let handle = std::thread::Builder::new()
                    .name(name)
                    .spawn(move || shell.serve())
                    .context("starting an HTTP thread");
                match handle {
                    Ok(h) => workers.push(h),
                    Err(e) => started = Err(e),
                }
            }
            open.push(endpoint.relay.open_connections());
            let name = match endpoint.listener {
                Listener::Main => "http",
                Listener::Health => "health",
            };
            match endpoint.relay.spawn(name, shutdown.clone()) {
                Ok(h) => workers.push(h),
                Err(e) => started = Err(e),
            }
        }
        if started.is_err() {
            shutdown.store(true, Ordering::Relaxed);
        }
        drop(wait_tx);
        for h in workers {
            if h.join().is_err() {
                warn!("an HTTP thread panicked");
            }
        }
        if waiter.join().is_err() {
            warn!("the waiter thread panicked");
        }
        // Log streams see the flag within one poll, and connections stop taking requests
        // and end once their answers are out; give both a moment to end cleanly.
        let deadline = Instant::now() + Duration::from_secs(3);
        let busy = || {
            self.api.stats.following.load(Ordering::Relaxed) > 0
                || self.api.feed.streams.load(Ordering::Relaxed) > 0
                || open.iter().any(|n| n.load(Ordering::Relaxed) > 0)
        };
        while busy() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        started
    }
}

/// What each HTTP thread holds.
struct Shell {
    server: Arc<tiny_http::Server>,
    api: Arc<Api>,
    waits: Sender<(Pending, WaitRequest)>,
    shutdown: Arc<AtomicBool>,
    listener: Listener,
    tokens: Option<Arc<TokenFile>>,
    /// What a POST must come from.
    own_origin: OwnOrigin,
}

impl Shell {
    fn serve(self) {
        while !self.shutdown.load(Ordering::Relaxed) {
            match self.server.recv_timeout(RECV_TIMEOUT) {
                Ok(Some(request)) => self.on_request(request),
                Ok(None) => {}
                Err(e) => {
                    warn!(error = %e, "accepting an HTTP request failed");
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }

    fn on_request(&self, request: tiny_http::Request) {
        let started = Instant::now();
        let method = match request.method() {
            tiny_http::Method::Get => Method::Get,
            tiny_http::Method::Head => Method::Head,
            tiny_http::Method::Post => Method::Post,
            other => Method::Other(other.as_str().to_owned()),
        };
        // The one reading of the target: the gate and the handlers both take this.
        let mut parsed = route::parse(&method, request.url());
        let header = |name: &'static str| {
            request
                .headers()
                .iter()
                .find(|h| h.field.equiv(name))
                .map(|h| h.value.as_str().to_owned())
        };
        route::with_idempotency_header(&mut parsed, header("Idempotency-Key").as_deref());
        metrics::with_accept_header(&mut parsed, header("Accept").as_deref());
        let authorization = header("Authorization");
        let accept = header("Accept");
        let last_event_id = header("Last-Event-ID");
        let is_post = method == Method::Post;
        let (origin, sec_fetch_site, host) =
            (header("Origin"), header("Sec-Fetch-Site"), header("Host"));
        let body_length = request.body_length();
        let pending = Pending {
            request,
            stats: self.api.stats.clone(),
            started,
            method,
            path: parsed.log_path.clone(),
        };
        let tokens = self.tokens.as_ref().map(|t| t.current());
        let admitted = security::gate(
            self.listener,
            tokens.as_deref(),
            &parsed,
            authorization.as_deref(),
        );
        if let Err(reply) = admitted {
            info!(status = reply.status, path = %parsed.log_path, "request not authorised");
            pending.respond(reply);
            return;
        }
        // What changes a run must not come from a page on another site (CSRF).
        if is_post && parsed.route.is_ok() {
            let post = PostHeaders {
                origin: origin.as_deref(),
                sec_fetch_site: sec_fetch_site.as_deref(),
                host: host.as_deref(),
                body_length,
            };
            if let Err(reply) = security::guard_post(self.own_origin, &post) {
                warn!(status = reply.status, path = %parsed.log_path,
                    origin = origin.as_deref().unwrap_or("-"),
                    sec_fetch_site = sec_fetch_site.as_deref().unwrap_or("-"),
                    "POST refused");
                pending.respond(reply);
                return;
            }
        }
        // A browser opening a run's link gets the dashboard's run page (same scope).
        let route = match parsed.route {
            Ok(route::Route::Run { .. }) if !is_post && api::wants_html(accept.as_deref()) => {
                Ok(route::Route::Dashboard)
            }
            other => other,
        };
        match self.api.handle(route) {
            Outcome::Reply(reply) => pending.respond(reply),
            Outcome::Wait(wait) => {
                if let Err(e) = self.waits.send((pending, wait)) {
                    // The waiter has stopped (shutdown): the run is accepted; say so.
                    let (pending, wait) = e.into_inner();
                    pending.respond(wait.accepted);
                }
            }
            Outcome::Follow(run) => self.follow(pending, *run),
            Outcome::Events(filter) => self.events(pending, filter, last_event_id.as_deref()),
        }
    }

    /// `/events`: one thread per stream, at most [`events::MAX_STREAMS`].
    fn events(&self, pending: Pending, filter: EventFilter, last_event_id: Option<&str>) {
        // An id this frontend did not give is not an error: the stream starts with `reset`.
        let last_event_id = match last_event_id.map(|id| id.trim().parse::<u64>()) {
            None => None,
            Some(Ok(id)) => Some(id),
            Some(Err(_)) => Some(0),
        };
        let feed = self.api.feed.clone();
        let broker = self.api.broker.clone();
        let timeout = self.api.request_timeout;
        let shutdown = self.shutdown.clone();
        let limit = StreamLimit {
            kind: "event stream",
            open: feed.clone(),
            max: events::MAX_STREAMS,
        };
        self.start_stream(pending, limit, move |out| {
            let broker = broker.as_ref() as &dyn Broker;
            events::stream(
                out,
                &feed,
                broker,
                &filter,
                last_event_id,
                timeout,
                &shutdown,
            )
        });
    }

    fn follow(&self, pending: Pending, run: RunView) {
        let broker = self.api.broker.clone();
        let timeout = self.api.request_timeout;
        let shutdown = self.shutdown.clone();
        let limit = StreamLimit {
            kind: "log stream",
            open: self.api.stats.clone(),
            max: follow::MAX_FOLLOWERS,
        };
        let feed = self.api.feed.clone();
        self.start_stream(pending, limit, move |out| {
            let broker = broker.as_ref() as &dyn Broker;
            let pace = follow::Pace::default();
            follow::stream(out, &run, broker, &feed, pace, timeout, &shutdown)
        });
    }

    /// Answers with a stream written by `write` on a thread of its own: HTTP/1.1 only
    /// (it is chunked), and at most `limit.max` of its kind open at once (503 beyond).
    fn start_stream(
        &self,
        pending: Pending,
        limit: StreamLimit,
        write: impl FnOnce(&mut Box<dyn std::io::Write + Send>) -> std::io::Result<()> + Send + 'static,
    ) {
        let kind = limit.kind;
        let version = pending.request.http_version();
        if (version.0, version.1) < (1, 1) {
            let error = format!("a {kind} needs HTTP/1.1 (chunked transfer)");
            pending.respond(HttpReply::error(400, &error, &[]));
            return;
        }
        let open = limit.open;
        let admitted = open
            .open()
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < limit.max).then_some(n + 1)
            })
            .is_ok();
        if !admitted {
            let error = format!("too many {kind}s open; retry later");
            let reply = HttpReply::error(503, &error, &[]).with_header("Retry-After", "5".into());
            pending.respond(reply);
            return;
        }
        let stats = self.api.stats.clone();
        let spawned = std::thread::Builder::new()
            .name("http-stream".into())
            .spawn({
                let open = open.clone();
                move || {
                    stats.record(200);
                    let mut out = pending.request.into_writer();
                    match write(&mut out) {
                        Ok(()) => debug!(kind, "stream ended"),
                        Err(e) => debug!(kind, error = %e, "stream closed by the client"),
                    }
                    open.open().fetch_sub(1, Ordering::Relaxed);
                }
            });
        if let Err(e) = spawned {
            warn!(kind, error = %e, "cannot start a stream thread");
            open.open().fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// What counts the open streams of one kind.
trait OpenStreams: Send + Sync {
    fn open(&self) -> &AtomicU64;
}

impl OpenStreams for events::Feed {
    fn open(&self) -> &AtomicU64 {
        &self.streams
    }
}

impl OpenStreams for Stats {
    fn open(&self) -> &AtomicU64 {
        &self.following
    }
}

/// How many streams of a kind may be open at once.
struct StreamLimit {
    /// "log stream", for answers and logs.
    kind: &'static str,
    open: Arc<dyn OpenStreams>,
    max: u64,
}

/// A request waiting for its answer.
struct Pending {
    request: tiny_http::Request,
    stats: Arc<Stats>,
    started: Instant,
    /// For the log line.
    method: Method,
    /// For the log line: the path without the query (which can be 64 KiB of parameters).
    path: String,
}

impl Responder for Pending {
    fn respond(self, reply: HttpReply) {
        let status = reply.status;
        self.stats.record(status);
        let method = self.method.as_str().to_owned();
        let path = self.path;
        let elapsed_ms = self.started.elapsed().as_millis() as u64;
        if let Err(e) = self.request.respond(to_response(reply)) {
            debug!(error = %e, %path, "the client went away before the answer");
        }
        if status >= 500 {
            warn!(%method, %path, status, elapsed_ms, "request failed");
        } else {
            debug!(%method, %path, status, elapsed_ms, "request answered");
        }
    }
}

fn header(name: &str, value: &str) -> Option<tiny_http::Header> {
    let header = tiny_http::Header::from_bytes(name.as_bytes(), value.as_bytes()).ok();
    if header.is_none() {
        warn!(name, "dropping a header that is not ASCII");
    }
    header
}

fn to_response(reply: HttpReply) -> tiny_http::Response<Cursor<Vec<u8>>> {
    let mut response = tiny_http::Response::from_data(reply.body).with_status_code(reply.status);
    let fixed = [
        ("Content-Type", reply.content_type),
        ("Cache-Control", "no-store"),
        ("X-Content-Type-Options", "nosniff"),
    ];
    for (name, value) in fixed {
        if let Some(h) = header(name, value) {
            response.add_header(h);
        }
    }
    for (name, value) in &reply.headers {
        if let Some(h) = header(name, value) {
            response.add_header(h);
        }
    }
    response
}
