//! The thin shell: a `tiny_http` server, N threads taking requests and handing them to
//! [`Api::handle`], the waiter thread, and one thread per followed log.

use std::io::Cursor;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use crossbeam_channel::Sender;
use tracing::{debug, info, warn};

use jobz::client::{Client, ClientConfig};
use jobz::message::{Role, RunView};
use jobz::socket::BrokerAddr;

use crate::api::{Api, HttpReply, HttpRequest, Method, Outcome, WaitRequest};
use crate::broker::Broker;
use crate::follow;
use crate::metrics::Stats;
use crate::waiter::{self, Responder};

/// How long an HTTP thread blocks for a request before it looks at the shutdown flag.
const RECV_TIMEOUT: Duration = Duration::from_millis(200);

/// Settings of a frontend.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the broker is.
    pub broker: BrokerAddr,
    /// Where to listen for HTTP.
    pub listen: SocketAddr,
    /// How long a request to the broker may take before the answer is 503.
    pub request_timeout: Duration,
    /// HTTP worker threads.
    pub threads: usize,
}

/// Connects to the broker, serves HTTP until `shutdown` is set, then drains and stops.
pub fn run(config: Config, shutdown: Arc<AtomicBool>) -> anyhow::Result<()> {
    let node_id = format!("frontend:{}", jobz::new_id());
    let client = Client::start(ClientConfig::new(
        config.broker.clone(),
        node_id.clone(),
        Role::Frontend,
    ))
    .context("starting the broker link")?;
    let api = Api::new(Arc::new(client.clone()), config.request_timeout);
    let frontend = match Frontend::bind(config.listen, config.threads, api) {
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
    let result = frontend.serve(shutdown);
    client.shutdown();
    info!("frontend stopped");
    result
}

fn bind(listen: SocketAddr) -> anyhow::Result<tiny_http::Server> {
    tiny_http::Server::http(listen).map_err(|e| anyhow::anyhow!("listening on {listen}: {e}"))
}

/// A bound HTTP server with its handlers, ready to serve.
pub struct Frontend {
    server: Arc<tiny_http::Server>,
    api: Arc<Api>,
    threads: usize,
}

impl Frontend {
    /// Binds `listen` (port 0 picks a free port) with these handlers.
    pub fn bind(listen: SocketAddr, threads: usize, api: Api) -> anyhow::Result<Frontend> {
        Ok(Frontend {
            server: Arc::new(bind(listen)?),
            api: Arc::new(api),
            threads,
        })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.server.server_addr().to_ip()
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
        let mut workers: Vec<JoinHandle<()>> = Vec::with_capacity(self.threads);
        for n in 0..self.threads.max(1) {
            let shell = Shell {
                server: self.server.clone(),
                api: self.api.clone(),
                waits: wait_tx.clone(),
                shutdown: shutdown.clone(),
            };
            let handle = std::thread::Builder::new()
                .name(format!("http-{n}"))
                .spawn(move || shell.serve())
                .context("starting an HTTP thread");
            match handle {
                Ok(h) => workers.push(h),
                Err(e) => {
                    shutdown.store(true, Ordering::Relaxed);
                    for h in workers {
                        let _ = h.join();
                    }
                    return Err(e);
                }
            }
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
        // Log streams see the flag within one poll; give them a moment to end cleanly.
        let deadline = Instant::now() + Duration::from_secs(3);
        while self.api.stats.following.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

/// What each HTTP thread holds.
struct Shell {
    server: Arc<tiny_http::Server>,
    api: Arc<Api>,
    waits: Sender<(Pending, WaitRequest)>,
    shutdown: Arc<AtomicBool>,
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
        let http = HttpRequest {
            method: match request.method() {
                tiny_http::Method::Get => Method::Get,
                tiny_http::Method::Head => Method::Head,
                other => Method::Other(other.as_str().to_owned()),
            },
            target: request.url().to_owned(),
        };
        let pending = Pending {
            request,
            stats: self.api.stats.clone(),
            started,
        };
        match self.api.handle(&http) {
            Outcome::Reply(reply) => pending.respond(reply),
            Outcome::Wait(wait) => {
                if let Err(e) = self.waits.send((pending, wait)) {
                    // The waiter has stopped (shutdown): the run is accepted; say so.
                    let (pending, wait) = e.into_inner();
                    pending.respond(wait.accepted);
                }
            }
            Outcome::Follow(run) => self.follow(pending, *run),
        }
    }

    fn follow(&self, pending: Pending, run: RunView) {
        let version = pending.request.http_version();
        if (version.0, version.1) < (1, 1) {
            pending.respond(HttpReply::error(
                400,
                "follow=1 needs HTTP/1.1 (chunked transfer)",
                &[],
            ));
            return;
        }
        let stats = self.api.stats.clone();
        let admitted = stats
            .following
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < follow::MAX_FOLLOWERS).then_some(n + 1)
            })
            .is_ok();
        if !admitted {
            pending.respond(HttpReply::error(
                503,
                "too many log streams open; retry later or drop follow=1",
                &[],
            ));
            return;
        }
        let broker = self.api.broker.clone();
        let timeout = self.api.request_timeout;
        let shutdown = self.shutdown.clone();
        let spawned = std::thread::Builder::new()
            .name("http-follow".into())
            .spawn(move || {
                stats.record(200);
                let run_id = run.run_id.clone();
                let mut out = pending.request.into_writer();
                let result = follow::stream(
                    &mut out,
                    &run,
                    broker.as_ref() as &dyn Broker,
                    follow::POLL_EVERY,
                    timeout,
                    &shutdown,
                );
                match result {
                    Ok(()) => debug!(run_id = %run_id, "log stream ended"),
                    Err(e) => {
                        debug!(run_id = %run_id, error = %e, "log stream closed by the client")
                    }
                }
                stats.following.fetch_sub(1, Ordering::Relaxed);
            });
        if let Err(e) = spawned {
            warn!(error = %e, "cannot start a log stream thread");
            self.api.stats.following.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// A request waiting for its answer.
struct Pending {
    request: tiny_http::Request,
    stats: Arc<Stats>,
    started: Instant,
}

impl Responder for Pending {
    fn respond(self, reply: HttpReply) {
        let status = reply.status;
        self.stats.record(status);
        let method = self.request.method().as_str().to_owned();
        // Targets can be 64 KiB of parameters; the log needs the path only.
        let path = self
            .request
            .url()
            .split('?')
            .next()
            .unwrap_or("")
            .chars()
            .take(200)
            .collect::<String>();
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
