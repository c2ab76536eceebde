//! Where HTTP bytes enter: the public TCP listener, TLS, limits, and the connection
//! policy, in front of `tiny_http`.
//!
//! `tiny_http` 0.12 cannot verify client certificates, reads request heads without a
//! bound and keeps idle connections for ever, so it does not face the network. It listens
//! on a Unix socket in a private (mode 0700) directory, and a [`Relay`] owns the public
//! address: an acceptor thread takes each connection, asks the listener's [`Admission`]
//! for a place (cap, per-address cap, places reserved for authenticated clients) and
//! otherwise closes it at once; an admitted connection gets a thread that does the TLS
//! handshake (when configured), then relays both directions with poll(2), passing the
//! client's bytes through a [`RequestGuard`] and watching the server's answers with a
//! [`ResponseTracker`].
//!
//! Timeouts ([`ConnectionPolicy`]): the TLS handshake and every request head, once its
//! first byte is in, must arrive whole within `header_timeout`; a connection whose answers
//! are all out and that starts no new request within `idle_timeout` is closed (a new
//! connection gets the same time for its first request). A connection waiting for its
//! answer (`job_start?wait=`, a followed log) is not idle; it is closed only after
//! [`MAX_SILENCE`] without traffic either way.
//!
//! Why not a maintained HTTP server here (hyper, axum)? The frontend is synchronous, one
//! thread per connection, with `tiny_http` behind; moving it onto an async stack would
//! rewrite the server, the waiter and the log streams for no gain in what the relay
//! decides. What was hand-written and risky, the request-head parser, is `httparse`
//! (hyper's own parser) now; the relay keeps the policy: caps, timeouts, TLS.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use rustls::{ServerConfig, ServerConnection};
use tracing::{debug, warn};

use crate::admission::{Admission, Class, Limits, Ticket};
use crate::auth::{presented_token, TokenFile};
use crate::limits::{Head, Refusal, RequestGuard};
use crate::metrics::Stats;
use crate::responses::ResponseTracker;

/// A connection with no traffic either way for this long is closed, even while it waits
/// for an answer. It must outlast the longest `job_start?wait=` and the longest followed
/// log, which are silent while they wait.
pub const MAX_SILENCE: Duration = Duration::from_secs(3660);

/// Keep-alive idle timeout when `--idle-timeout` is not given.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Request-head (and TLS handshake) timeout when `--header-timeout` is not given.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a write to either side may block.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// How long, and for how many bytes, a refused client's remaining request is read and
/// dropped before the connection closes.
const LINGER: Duration = Duration::from_secs(2);
const MAX_LINGER_BYTES: usize = 1024 * 1024;

/// How often blocked threads look at the shutdown flag.
const TICK: Duration = Duration::from_millis(200);

/// Connections open through one relay, shared with the server for its drain.
pub type OpenCount = Arc<AtomicUsize>;

/// How one listener treats its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionPolicy {
    /// The caps and the reserve (see [`crate::admission`]).
    pub limits: Limits,
    /// An idle keep-alive connection (or a new one without a request) is closed after this.
    pub idle_timeout: Duration,
    /// A TLS handshake, or a request head once begun, must be complete within this.
    pub header_timeout: Duration,
}

/// What makes a connection authenticated in the relay's eyes: a request with a token from
/// the file, or a TLS handshake that verified a client certificate.
#[derive(Clone, Default)]
pub struct Credentials {
    /// The token file, if any.
    pub tokens: Option<Arc<TokenFile>>,
    /// The TLS handshake verifies client certificates.
    pub client_certs: bool,
}

impl Credentials {
    fn token_is_valid(&self, authorization: Option<&str>) -> bool {
        let (Some(tokens), Some(header)) = (&self.tokens, authorization) else {
            return false;
        };
        presented_token(header).is_some_and(|token| tokens.current().holder(&token).is_some())
    }
}

/// A public listener relaying to a `tiny_http` server on a Unix socket.
pub struct Relay {
    listener: TcpListener,
    tls: Option<Arc<ServerConfig>>,
    backend: PathBuf,
    policy: ConnectionPolicy,
    credentials: Credentials,
    admission: Arc<Mutex<Admission>>,
    stats: Arc<Stats>,
    open: OpenCount,
}

impl Relay {
    /// Binds `listen` (port 0 picks a free port); connections go to `backend`.
    pub fn bind(
        listen: SocketAddr,
        tls: Option<Arc<ServerConfig>>,
        backend: PathBuf,
        policy: ConnectionPolicy,
        credentials: Credentials,
        stats: Arc<Stats>,
    ) -> anyhow::Result<Relay> {
        let listener =
            TcpListener::bind(listen).with_context(|| format!("listening on {listen}"))?;
        listener
            .set_nonblocking(true)
            .context("making the listener non-blocking")?;
        Ok(Relay {
            listener,
            tls,
            backend,
            policy,
            credentials,
            admission: Arc::new(Mutex::new(Admission::new(policy.limits))),
            stats,
            open: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Connections open right now.
    pub fn open_connections(&self) -> OpenCount {
        self.open.clone()
    }

    /// Starts the acceptor thread; it stops when `shutdown` is set, and open connections
    /// stop taking requests and end once their answers are out.
    pub fn spawn(self, name: &str, shutdown: Arc<AtomicBool>) -> anyhow::Result<JoinHandle<()>> {
        std::thread::Builder::new()
            .name(format!("{name}-accept"))
            .spawn(move || self.accept_loop(&shutdown))
            .context("starting the acceptor thread")
    }

    fn accept_loop(self, shutdown: &Arc<AtomicBool>) {
        while !shutdown.load(Ordering::Relaxed) {
            let mut fds = [pollfd(self.listener.as_raw_fd())];
            if let Err(e) = poll(&mut fds, TICK) {
                warn!(error = %e, "poll on the listener failed");
                std::thread::sleep(TICK);
                continue;
            }
            loop {
                match self.listener.accept() {
                    Ok((stream, peer)) => self.admit(stream, peer, shutdown),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        // Out of file descriptors and the like: back off, keep serving.
                        warn!(error = %e, "accepting a connection failed");
                        std::thread::sleep(Duration::from_millis(50));
                        break;
                    }
                }
            }
        }
    }

    fn admit(&self, stream: TcpStream, peer: SocketAddr, shutdown: &Arc<AtomicBool>) {
        let ticket = match Ticket::take(&self.admission, peer.ip()) {
            Ok(ticket) => ticket,
            Err(refused) => {
                debug!(%peer, reason = refused.reason(), "connection refused");
                self.stats.connection_closed(refused.reason());
                drop(stream);
                return;
            }
        };
        self.open.fetch_add(1, Ordering::AcqRel);
        let slot = Slot(self.open.clone());
        let mut session = Session {
            peer: peer.ip(),
            policy: self.policy,
            credentials: self.credentials.clone(),
            ticket,
            stats: self.stats.clone(),
        };
        let tls = self.tls.clone();
        let backend = self.backend.clone();
        let shutdown = shutdown.clone();
        let spawned = std::thread::Builder::new()
            .name("http-conn".into())
            .spawn(move || {
                let _slot = slot;
                if let Err(e) = connection(stream, tls, &backend, &shutdown, &mut session) {
                    debug!(%peer, error = %e, "connection ended");
                }
            });
        if let Err(e) = spawned {
            // The closure (and with it the slot, the ticket and the stream) is dropped.
            warn!(error = %e, "cannot start a connection thread");
        }
    }
}

/// One connection's place and what its thread needs to apply the policy.
struct Session {
    peer: IpAddr,
    policy: ConnectionPolicy,
    credentials: Credentials,
    ticket: Ticket,
    stats: Arc<Stats>,
}

impl Session {
    /// Decides a complete request head before it is passed on: a valid token makes the
    /// connection authenticated; a connection still on probation is refused.
    fn admit(&mut self, head: &Head, responses: &mut ResponseTracker) -> Result<(), Refusal> {
        if self.ticket.class() != Class::Authenticated
            && self
                .credentials
                .token_is_valid(head.authorization.as_deref())
        {
            self.ticket.authenticate();
        }
        if self.ticket.class() == Class::Probation {
            debug!(peer = %self.peer, "request on a reserved place without a valid token");
            self.stats.connection_closed("reserved");
            return Err(Refusal::new(
                503,
                "the server is busy: its remaining connections are held for clients with a \
                 valid token; retry later"
                    .into(),
            ));
        }
        responses.request_passed(head.is_head);
        Ok(())
    }
}

/// Frees a connection's place when its thread ends, however it ends.
struct Slot(OpenCount);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The client's side of a connection: TCP, or TLS over TCP.
enum Front {
    Plain(TcpStream),
    Tls(Box<ServerConnection>, TcpStream),
}

impl Front {
    fn fd(&self) -> RawFd {
        match self {
            Front::Plain(s) | Front::Tls(_, s) => s.as_raw_fd(),
        }
    }

    /// Reads what the client sent into `out`; `Ok(false)` at the end of its stream.
    fn read(&mut self, buf: &mut [u8], out: &mut Vec<u8>) -> io::Result<bool> {
        match self {
            Front::Plain(s) => match s.read(buf) {
                Ok(0) => Ok(false),
                Ok(n) => {
                    out.extend_from_slice(&buf[..n]);
                    Ok(true)
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(true),
                Err(e) => Err(e),
            },
            Front::Tls(conn, s) => {
                let n = match conn.read_tls(s) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(true),
                    Err(e) => return Err(e),
                };
                let state = conn.process_new_packets().map_err(|e| {
                    // Send the alert before giving up.
                    let _ = conn.write_tls(s);
                    io::Error::new(io::ErrorKind::InvalidData, e)
                })?;
                let available = state.plaintext_bytes_to_read();
                let closed = state.peer_has_closed();
                let mut left = available;
                while left > 0 {
                    let want = left.min(buf.len());
                    let got = conn.reader().read(&mut buf[..want])?;
                    if got == 0 {
                        break;
                    }
                    out.extend_from_slice(&buf[..got]);
                    left -= got;
                }
                flush_tls(conn, s)?;
                Ok(n > 0 && !closed)
            }
        }
    }

    /// Plaintext rustls already holds (TLS only), into `out`.
    fn buffered(&mut self, buf: &mut [u8], out: &mut Vec<u8>) -> io::Result<()> {
        if let Front::Tls(conn, _) = self {
            loop {
                match conn.reader().read(buf) {
                    Ok(0) => break,
                    Ok(n) => out.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }

    /// Writes everything to the client.
    fn write_all(&mut self, mut data: &[u8]) -> io::Result<()> {
        match self {
            Front::Plain(s) => s.write_all(data),
            Front::Tls(conn, s) => {
                while !data.is_empty() {
                    let n = conn.writer().write(data)?;
                    data = &data[n..];
                    flush_tls(conn, s)?;
                }
                Ok(())
            }
        }
    }

    /// After answering a refused request: stop writing, and read and drop what the client
    /// is still sending for a moment, so that closing does not reset the connection (which
    /// could destroy the answer before the client reads it).
    fn linger(&mut self) {
        let s = match self {
            Front::Plain(s) => s,
            Front::Tls(conn, s) => {
                conn.send_close_notify();
                let _ = flush_tls(conn, s);
                s
            }
        };
        let _ = s.shutdown(Shutdown::Write);
        let _ = s.set_read_timeout(Some(LINGER));
        let deadline = Instant::now() + LINGER;
        let mut buf = [0u8; 16 * 1024];
        let mut total = 0usize;
        while Instant::now() < deadline && total < MAX_LINGER_BYTES {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    }

    fn close(&mut self) {
        match self {
            Front::Plain(s) => {
                let _ = s.shutdown(Shutdown::Both);
            }
            Front::Tls(conn, s) => {
                conn.send_close_notify();
                let _ = flush_tls(conn, s);
                let _ = s.shutdown(Shutdown::Both);
            }
        }
    }
}

fn flush_tls(conn: &mut ServerConnection, s: &mut TcpStream) -> io::Result<()> {
    while conn.wants_write() {
        conn.write_tls(s)?;
    }
    Ok(())
}

/// Completes the TLS handshake within `timeout`.
fn handshake(
    config: Arc<ServerConfig>,
    mut stream: TcpStream,
    timeout: Duration,
) -> io::Result<Front> {
    let mut conn = ServerConnection::new(config).map_err(io::Error::other)?;
    stream.set_read_timeout(Some(timeout))?;
    let deadline = Instant::now() + timeout;
    while conn.is_handshaking() {
        if Instant::now() > deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "TLS handshake too slow",
            ));
        }
        match conn.complete_io(&mut stream) {
            Ok((0, 0)) if conn.is_handshaking() => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "closed during the TLS handshake",
                ))
            }
            Ok(_) => {}
            Err(e) => {
                // Tell the client why (bad certificate, …) before closing.
                let _ = flush_tls(&mut conn, &mut stream);
                return Err(e);
            }
        }
    }
    stream.set_read_timeout(None)?;
    Ok(Front::Tls(Box::new(conn), stream))
}

/// One connection: handshake, then relay until either side is done.
fn connection(
    stream: TcpStream,
    tls: Option<Arc<ServerConfig>>,
    backend: &std::path::Path,
    shutdown: &AtomicBool,
    session: &mut Session,
) -> io::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let mut front = match tls {
        None => Front::Plain(stream),
        Some(config) => {
            let front = handshake(config, stream, session.policy.header_timeout)?;
            // The verifier refuses in the handshake any client without a good certificate.
            if session.credentials.client_certs {
                session.ticket.authenticate();
            }
            front
        }
    };
    let mut back = UnixStream::connect(backend)?;
    back.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let result = relay(&mut front, &mut back, shutdown, session);
    let _ = back.shutdown(Shutdown::Both);
    if let Ok(true) = result {
        front.linger();
    }
    front.close();
    result.map(|_| ())
}

/// Relays until either side is done; `Ok(true)` if a request was refused (and answered).
fn relay(
    front: &mut Front,
    back: &mut UnixStream,
    shutdown: &AtomicBool,
    session: &mut Session,
) -> io::Result<bool> {
    let policy = session.policy;
    let mut guard = RequestGuard::default();
    let mut responses = ResponseTracker::default();
    let mut buf = vec![0u8; 16 * 1024];
    let mut plain = Vec::new();
    // Set once no more client bytes go to the backend: the client's stream ended, a request
    // was refused (answered after the backend's answers to earlier ones), or shutdown.
    let mut client_done = false;
    let mut refusal: Option<Vec<u8>> = None;
    let mut last_traffic = Instant::now();
    let mut head_started: Option<Instant> = None;
    // A TLS client's first request may have arrived with the end of the handshake.
    front.buffered(&mut buf, &mut plain)?;
    loop {
        if !plain.is_empty() && !client_done {
            let mut pass = Vec::new();
            let verdict = guard.feed(&plain, &mut pass, &mut |head| {
                session.admit(head, &mut responses)
            });
            plain.clear();
            if !pass.is_empty() {
                back.write_all(&pass)?;
            }
            if let Err(refused) = verdict {
                debug!(status = refused.status, reason = %refused.message, "request refused");
                refusal = Some(refused.response());
                client_done = true;
                let _ = back.shutdown(Shutdown::Write);
            }
        }
        if !client_done && shutdown.load(Ordering::Relaxed) {
            client_done = true;
            let _ = back.shutdown(Shutdown::Write);
        }
        let now = Instant::now();
        if guard.head_in_progress() {
            let started = *head_started.get_or_insert(now);
            if !client_done && now.duration_since(started) > policy.header_timeout {
                session.stats.connection_closed("header_timeout");
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "request head too slow",
                ));
            }
        } else {
            head_started = None;
            // A connection whose answers cannot be followed counts as idle once silent, so
            // no odd exchange can hold a place for the whole silence limit.
            let idle = responses.idle() || responses.lost();
            if idle && now.duration_since(last_traffic) > policy.idle_timeout {
                session.stats.connection_closed("idle");
                debug!(peer = %session.peer, "idle connection closed");
                return Ok(false);
            }
        }
        if now.duration_since(last_traffic) > MAX_SILENCE {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "silent"));
        }

        let mut fds = [pollfd(front.fd()), pollfd(back.as_raw_fd())];
        if client_done {
            fds[0].events = 0;
        }
        poll(&mut fds, TICK)?;
        let ready =
            |fd: &libc::pollfd| fd.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0;

        if !client_done && ready(&fds[0]) {
            last_traffic = Instant::now();
            if !front.read(&mut buf, &mut plain)? {
                client_done = true;
                // Pass on what came with the end of the stream, then let the server finish.
                let mut pass = Vec::new();
                let verdict = guard.feed(&plain, &mut pass, &mut |head| {
                    session.admit(head, &mut responses)
                });
                if verdict.is_ok() && !pass.is_empty() {
                    back.write_all(&pass)?;
                }
                plain.clear();
                let _ = back.shutdown(Shutdown::Write);
            }
        }
        if ready(&fds[1]) {
            last_traffic = Instant::now();
            let n = match back.read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if n == 0 {
                // The server is done with this connection: answer a refused request last.
                if let Some(response) = refusal.take() {
                    front.write_all(&response)?;
                    return Ok(true);
                }
                return Ok(false);
            }
            responses.feed(&buf[..n]);
            front.write_all(&buf[..n])?;
        }
    }
}

fn pollfd(fd: RawFd) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

/// poll(2) with a timeout; an interrupted call counts as "nothing ready".
#[allow(unsafe_code)]
fn poll(fds: &mut [libc::pollfd], timeout: Duration) -> io::Result<usize> {
    let millis = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: `fds` is a valid, exclusively borrowed slice of initialised `pollfd`s that
    // lives for the whole call, and its exact length is passed as `nfds`.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, millis) };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(0);
        }
        return Err(e);
    }
    Ok(n as usize)
}
