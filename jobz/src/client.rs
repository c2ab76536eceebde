//! The client side of the mesh: one thread that owns a PUSH and a SUB socket to the broker.
//!
//! Workers, semaphores and frontends talk to the broker through a [`Client`]. It proves the
//! reply path with `Hello`/`Welcome` before it reports itself connected (a SUB socket misses
//! whatever is published before its subscription reaches the broker), resends a request
//! under the same message id until the reply comes or the caller's deadline passes (the
//! broker ingests each id once), and hands every other publication to the caller over a
//! channel. Callers never touch a socket, so any thread may use it.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, unbounded, Receiver, Sender};
use thiserror::Error;
use tracing::{debug, info, warn};

use crate::envelope::{self, Envelope, MessageId};
use crate::keys::NodeIdentity;
use crate::message::{Message, Reply, ReplyBody, Role};
use crate::seal::{NodeSeal, OpenError};
use crate::socket::{self, BrokerAddr};
use crate::topic::Topic;

mod held;
use held::{HeldFrames, NotHeld};

/// Settings of a [`Client`].
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Where the broker is.
    pub broker: BrokerAddr,
    /// This node's id; replies come on `Topic::Node(node_id)`.
    pub node_id: String,
    /// What kind of node this is.
    pub role: Role,
    /// Resend an unanswered request after this long.
    pub resend_after: Duration,
    /// This node's key and the broker keys it trusts: frames are sealed when set.
    pub identity: Option<NodeIdentity>,
}

impl ClientConfig {
    /// Defaults: resend after one second.
    pub fn new(broker: BrokerAddr, node_id: String, role: Role) -> Self {
        ClientConfig {
            broker,
            node_id,
            role,
            resend_after: Duration::from_secs(1),
            identity: None,
        }
    }
}

/// Why a request got no answer.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ClientError {
    /// No reply before the deadline: the broker is down or unreachable.
    #[error("the broker did not answer within {0:?}")]
    Timeout(Duration),
    /// The message could not be encoded (too large).
    #[error("cannot send: {0}")]
    Encode(String),
    /// The client thread has stopped.
    #[error("the broker link is shut down")]
    Closed,
}

enum Command {
    Request {
        id: MessageId,
        body: Message,
        timeout: Duration,
        reply: Sender<Result<ReplyBody, ClientError>>,
    },
    Send(Message),
    Subscribe(Topic),
    Unsubscribe(Topic),
    Shutdown,
}

/// Counters of a client link.
#[derive(Debug, Default)]
pub struct ClientStats {
    /// Frames dropped because they did not decode or had a foreign topic.
    pub dropped_frames: AtomicU64,
    /// Requests resent after no reply.
    pub resends: AtomicU64,
    /// Sealed frames refused: not authentic, replayed, stale or unreadable.
    pub rejected_frames: AtomicU64,
    /// Authentic group frames held until the mesh key they are sealed under arrived.
    pub held_frames: AtomicU64,
}

/// A handle on the link thread; cheap to clone.
#[derive(Clone)]
pub struct Client {
    commands: Sender<Command>,
    /// Write end of the link thread's wake-up pipe: a byte after each command, so the
    /// thread reacts at once instead of at its next tick.
    waker: Arc<UnixStream>,
    publications: Receiver<(Topic, Envelope)>,
    welcomed: Arc<AtomicBool>,
    broker_instance: Arc<std::sync::Mutex<String>>,
    stats: Arc<ClientStats>,
    node_id: String,
    thread: Arc<std::sync::Mutex<Option<JoinHandle<()>>>>,
}

impl Client {
    /// Connects and starts the link thread. Connecting is asynchronous: the call returns at
    /// once; [`Client::wait_connected`] waits for the broker's welcome.
    pub fn start(config: ClientConfig) -> anyhow::Result<Client> {
        use anyhow::Context;
        let ctx = zmq::Context::new();
        let push = ctx.socket(zmq::PUSH).context("creating PUSH socket")?;
        let sub = ctx.socket(zmq::SUB).context("creating SUB socket")?;
        socket::configure(&push, &config.broker).context("configuring PUSH socket")?;
        socket::configure(&sub, &config.broker).context("configuring SUB socket")?;
        sub.set_subscribe(&Topic::Node(config.node_id.clone()).to_bytes())
            .context("subscribing to own topic")?;
        sub.connect(&config.broker.pub_endpoint())
            .with_context(|| format!("connecting to {}", config.broker.pub_endpoint()))?;
        push.connect(&config.broker.pull_endpoint())
            .with_context(|| format!("connecting to {}", config.broker.pull_endpoint()))?;

        let (commands, command_rx) = unbounded();
        let (waker, wake_rx) = UnixStream::pair().context("creating the link's wake-up pipe")?;
        waker
            .set_nonblocking(true)
            .context("configuring the wake-up pipe")?;
        wake_rx
            .set_nonblocking(true)
            .context("configuring the wake-up pipe")?;
        let (publication_tx, publications) = unbounded();
        let welcomed = Arc::new(AtomicBool::new(false));
        let broker_instance = Arc::new(std::sync::Mutex::new(String::new()));
        let stats = Arc::new(ClientStats::default());
        let seal = config.identity.clone().map(NodeSeal::new);
        let mut link = Link {
            seal,
            unanswered_hellos: 0,
            held: HeldFrames::default(),
            last_key_hello: None,
            logged_missing_epoch: None,
            last_hint: None,
            last_drop_log: None,
            suppressed_drops: 0,
            wake_rx,
            config: config.clone(),
            push,
            sub,
            commands: command_rx,
            publications: publication_tx,
            pending: HashMap::new(),
            welcomed: welcomed.clone(),
            broker_instance: broker_instance.clone(),
            stats: stats.clone(),
            hello_id: None,
            next_hello: Instant::now(),
        };
        let thread = std::thread::Builder::new()
            .name("broker-link".into())
            .spawn(move || link.run())
            .context("starting the broker link thread")?;
        Ok(Client {
            commands,
            waker: Arc::new(waker),
            publications,
            welcomed,
            broker_instance,
            stats,
            node_id: config.node_id,
            thread: Arc::new(std::sync::Mutex::new(Some(thread))),
        })
    }

    fn command(&self, command: Command) -> bool {
        let sent = self.commands.send(command).is_ok();
        // Non-blocking: a full pipe already holds a wake-up.
        let _ = (&*self.waker).write(&[1]);
        sent
    }

    /// This node's id.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// True once the broker has welcomed this link (the reply path works).
    pub fn is_connected(&self) -> bool {
        self.welcomed.load(Ordering::Relaxed)
    }

    /// Random id of the broker process last seen; changes when the broker restarts.
    pub fn broker_instance(&self) -> String {
        self.broker_instance
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }

    /// Waits up to `timeout` for the broker's welcome.
    pub fn wait_connected(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.is_connected() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.is_connected()
    }

    /// Sends a request and waits for its reply, resending under the same id meanwhile.
    pub fn request(&self, body: Message, timeout: Duration) -> Result<ReplyBody, ClientError> {
        self.request_async(body, timeout)
            .recv()
            .unwrap_or(Err(ClientError::Closed))
    }

    /// Sends a request; the reply (or the timeout) arrives on the returned channel.
    pub fn request_async(
        &self,
        body: Message,
        timeout: Duration,
    ) -> Receiver<Result<ReplyBody, ClientError>> {
        self.request_with_id(crate::new_id(), body, timeout)
    }

    /// Like [`Client::request_async`] under a message id the caller chooses. The broker
    /// ingests a trigger id once, so a deterministic id (e.g. derived from a semaphore and
    /// key) makes an action happen once however many processes or restarts send it.
    pub fn request_with_id(
        &self,
        id: MessageId,
        body: Message,
        timeout: Duration,
    ) -> Receiver<Result<ReplyBody, ClientError>> {
        let (reply, rx) = bounded(1);
        let request = Command::Request {
            id,
            body,
            timeout,
            reply: reply.clone(),
        };
        if !self.command(request) {
            let _ = reply.send(Err(ClientError::Closed));
        }
        rx
    }

    /// Sends without waiting for any reply.
    pub fn send(&self, body: Message) {
        self.command(Command::Send(body));
    }

    /// Receives publications on `topic` from now on.
    pub fn subscribe(&self, topic: Topic) {
        self.command(Command::Subscribe(topic));
    }

    /// Stops receiving publications on `topic`.
    pub fn unsubscribe(&self, topic: Topic) {
        self.command(Command::Unsubscribe(topic));
    }

    /// Publications on subscribed topics other than this node's own (work, events).
    pub fn publications(&self) -> &Receiver<(Topic, Envelope)> {
        &self.publications
    }

    /// Link counters.
    pub fn stats(&self) -> &ClientStats {
        &self.stats
    }

    /// Stops the link thread after flushing what was sent (bounded by the socket linger).
    pub fn shutdown(&self) {
        self.command(Command::Shutdown);
        if let Some(thread) = self.thread.lock().ok().and_then(|mut t| t.take()) {
            let _ = thread.join();
        }
    }
}

struct Pending {
    envelope: Envelope,
    /// The plain frame; sealed afresh at every (re)send, so a resend is never a replay.
    frame: Vec<u8>,
    deadline: Instant,
    timeout: Duration,
    resend_at: Instant,
    reply: Sender<Result<ReplyBody, ClientError>>,
}

struct Link {
    /// Sealing state when the mesh is secured.
    seal: Option<NodeSeal>,
    /// Hellos sent since the last welcome.
    unanswered_hellos: u32,
    /// Group frames waiting for the mesh key they are sealed under.
    held: HeldFrames,
    /// When the link last greeted the broker for a mesh key it lacked.
    last_key_hello: Option<Instant>,
    /// The last missing epoch logged, so a burst of frames logs once.
    logged_missing_epoch: Option<u32>,
    /// When the link last logged why the broker stays silent.
    last_hint: Option<Instant>,
    /// When the link last logged a dropped frame, and how many it did not log since.
    last_drop_log: Option<Instant>,
    suppressed_drops: u64,
    wake_rx: UnixStream,
    config: ClientConfig,
    push: zmq::Socket,
    sub: zmq::Socket,
    commands: Receiver<Command>,
    publications: Sender<(Topic, Envelope)>,
    pending: HashMap<MessageId, Pending>,
    welcomed: Arc<AtomicBool>,
    broker_instance: Arc<std::sync::Mutex<String>>,
    stats: Arc<ClientStats>,
    hello_id: Option<MessageId>,
    next_hello: Instant,
}

/// How often a connected link greets the broker again, to notice a restart.
const HELLO_WHEN_CONNECTED: Duration = Duration::from_secs(5);

/// How often an unwelcomed link says why the broker may be silent.
const HINT_EVERY: Duration = Duration::from_secs(30);

/// How often the link thread wakes without a message or command, to resend and greet.
const TICK: Duration = Duration::from_millis(50);

/// Least time between two hellos for a missing mesh key, so a flood of frames under an
/// unknown epoch cannot make the link flood the broker.
const KEY_HELLO_GAP: Duration = Duration::from_millis(250);

/// Whether a frame comes off the socket or out of the held frames: a released frame the
/// keys that came for it do not open is dropped, never held again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arrival {
    Fresh,
    Released,
}

/// Why a frame from the broker was not taken.
enum Refusal {
    /// Held until its mesh key arrives.
    Held,
    /// Dropped, for this reason.
    Dropped(String),
}

impl Link {
    fn run(&mut self) {
        loop {
            let now = Instant::now();
            self.say_hello_if_due(now);
            self.resend_or_expire(now);
            self.expire_held(now);
            loop {
                match self.commands.try_recv() {
                    Ok(Command::Shutdown) => return,
                    Ok(command) => self.on_command(command),
                    Err(crossbeam_channel::TryRecvError::Empty) => break,
                    Err(crossbeam_channel::TryRecvError::Disconnected) => return,
                }
            }
            let mut items = [
                self.sub.as_poll_item(zmq::POLLIN),
                zmq::PollItem::from_fd(self.wake_rx.as_raw_fd(), zmq::POLLIN),
            ];
            match zmq::poll(&mut items, TICK.as_millis() as i64) {
                Ok(_) => {
                    let (sub_ready, woken) = (items[0].is_readable(), items[1].is_readable());
                    if woken {
                        let mut sink = [0u8; 256];
                        while matches!((&self.wake_rx).read(&mut sink), Ok(n) if n > 0) {}
                    }
                    if sub_ready {
                        self.drain_sub();
                    }
                }
                Err(zmq::Error::EINTR) => {}
                Err(e) => {
                    warn!(error = %e, "polling the broker's PUB socket failed");
                    std::thread::sleep(TICK);
                }
            }
        }
    }

    /// Sends one plain frame, sealed first when the mesh is secured.
    fn send_frame(&mut self, frame: &[u8]) {
        let sealed;
        let wire = match self.seal.as_mut() {
            Some(seal) => match seal.seal(frame, crate::now_ms()) {
                Ok(f) => {
                    sealed = f;
                    &sealed
                }
                Err(e) => {
                    warn!(error = %e, "cannot seal a message to the broker");
                    return;
                }
            },
            None => frame,
        };
        // DONTWAIT: a full queue is reported, never a silent stall of the link thread.
        if let Err(e) = self.push.send(wire, zmq::DONTWAIT) {
            warn!(error = %e, "cannot queue a message to the broker (will resend if it is a request)");
        }
    }

    /// Says, at most every 30 s, why an unwelcomed link may stay silent.
    fn hint_if_unanswered(&mut self, now: Instant) {
        if self.unanswered_hellos < 10 || self.last_hint.is_some_and(|t| now - t < HINT_EVERY) {
            return;
        }
        self.last_hint = Some(now);
        match &self.seal {
            Some(seal) => warn!(
                node = %self.config.node_id,
                public_key = %seal.public(),
                fingerprint = %seal.public().fingerprint(),
                "the broker does not answer: it may be down, or this node's key is not accepted yet (on the broker: jobz-broker keys accept {})",
                crate::keys::principal_of(&self.config.node_id)
            ),
            None => warn!(
                broker = %self.config.broker.pub_endpoint(),
                "the broker does not answer: it may be down, or it requires sealed frames (give this node --key and --broker-key)"
            ),
        }
    }

    fn say_hello_if_due(&mut self, now: Instant) {
        if now < self.next_hello {
            return;
        }
        let welcomed = self.welcomed.load(Ordering::Relaxed);
        let env = Envelope::new(
            &self.config.node_id,
            Message::Hello {
                role: self.config.role,
            },
        );
        if !welcomed {
            self.unanswered_hellos = self.unanswered_hellos.saturating_add(1);
            // The broker's key may have been rotated: try the next trusted one.
            if self.unanswered_hellos.is_multiple_of(3) {
                if let Some(seal) = self.seal.as_mut() {
                    seal.try_next_broker_key();
                }
            }
            self.hint_if_unanswered(now);
        }
        if let Ok(frame) = envelope::encode(&env) {
            self.send_frame(&frame);
        }
        self.hello_id = Some(env.id);
        // Until welcomed, greet often; afterwards every few seconds, which tells a restarted
        // broker apart (its instance id changes). Jittered, so a restarted broker is not
        // greeted by every client at once.
        let every = if welcomed {
            HELLO_WHEN_CONNECTED
        } else {
            Duration::from_millis(300)
        };
        self.next_hello = now + socket::with_jitter(every, 1.0);
    }

    fn resend_or_expire(&mut self, now: Instant) {
        let mut expired = Vec::new();
        let mut resend = Vec::new();
        for (id, p) in self.pending.iter_mut() {
            if now >= p.deadline {
                expired.push(id.clone());
            } else if now >= p.resend_at {
                self.stats.resends.fetch_add(1, Ordering::Relaxed);
                debug!(message_id = %id, "resending unanswered request");
                resend.push(p.frame.clone());
                p.resend_at = now + self.config.resend_after;
            }
        }
        for frame in resend {
            self.send_frame(&frame);
        }
        for id in expired {
            if let Some(p) = self.pending.remove(&id) {
                let _ = p.reply.send(Err(ClientError::Timeout(p.timeout)));
            }
        }
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Request {
                id,
                body,
                timeout,
                reply,
            } => {
                let mut envelope = Envelope::new(&self.config.node_id, body);
                envelope.id = id;
                match envelope::encode(&envelope) {
                    Ok(frame) => {
                        self.send_frame(&frame);
                        let now = Instant::now();
                        self.pending.insert(
                            envelope.id.clone(),
                            Pending {
                                envelope,
                                frame,
                                deadline: now + timeout,
                                timeout,
                                resend_at: now + self.config.resend_after,
                                reply,
                            },
                        );
                    }
                    Err(e) => {
                        let _ = reply.send(Err(ClientError::Encode(e.to_string())));
                    }
                }
            }
            Command::Send(body) => {
                let envelope = Envelope::new(&self.config.node_id, body);
                match envelope::encode(&envelope) {
                    Ok(frame) => self.send_frame(&frame),
                    Err(e) => warn!(error = %e, "dropping a message that cannot be encoded"),
                }
            }
            Command::Subscribe(topic) => {
                if let Err(e) = self.sub.set_subscribe(&topic.to_bytes()) {
                    warn!(%topic, error = %e, "cannot subscribe");
                }
            }
            Command::Unsubscribe(topic) => {
                if let Err(e) = self.sub.set_unsubscribe(&topic.to_bytes()) {
                    warn!(%topic, error = %e, "cannot unsubscribe");
                }
            }
            Command::Shutdown => {}
        }
    }

    fn drain_sub(&mut self) {
        loop {
            match self.sub.recv_multipart(zmq::DONTWAIT) {
                Ok(frames) => self.receive(&frames, Arrival::Fresh),
                Err(zmq::Error::EAGAIN) => return,
                Err(e) => {
                    warn!(error = %e, "receiving from the broker failed");
                    return;
                }
            }
        }
    }

    /// Takes one message from the broker's PUB socket: a reply for this node, a
    /// publication for the caller, a frame to hold for its mesh key, or a drop.
    fn receive(&mut self, frames: &[Vec<u8>], arrival: Arrival) {
        let decoded = match frames {
            [topic, payload] => Topic::parse(topic)
                .ok_or_else(|| Refusal::Dropped("unknown topic".to_owned()))
                .and_then(|t| {
                    let plain = self.unseal(topic, payload, arrival)?;
                    envelope::decode(&plain)
                        .map(|e| (t, e))
                        .map_err(|e| Refusal::Dropped(e.to_string()))
                }),
            _ => Err(Refusal::Dropped(format!(
                "{} frames, expected 2",
                frames.len()
            ))),
        };
        match decoded {
            Ok((Topic::Node(node), env)) if node == self.config.node_id => {
                self.on_own(env);
                // A pair frame may have brought the mesh key held frames wait for.
                self.release_held();
            }
            Ok((Topic::Node(_), _)) => {
                // A prefix match on another node's topic cannot happen (topics are
                // NUL-terminated), but if it did, it is not ours.
                self.stats.dropped_frames.fetch_add(1, Ordering::Relaxed);
            }
            Ok((topic, env)) => {
                let _ = self.publications.send((topic, env));
            }
            Err(Refusal::Held) => {}
            Err(Refusal::Dropped(reason)) => self.note_drop(&reason),
        }
    }

    /// Counts a dropped frame and logs it, at most one line a second: a mismatched mesh
    /// would flood the log.
    fn note_drop(&mut self, reason: &str) {
        self.stats.dropped_frames.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        if self
            .last_drop_log
            .is_none_or(|t| now - t >= Duration::from_secs(1))
        {
            warn!(%reason, suppressed = self.suppressed_drops, "dropping a frame from the broker");
            self.last_drop_log = Some(now);
            self.suppressed_drops = 0;
        } else {
            self.suppressed_drops += 1;
        }
    }

    /// The plain frame of a publication: opened when the mesh is secured; a sealed frame
    /// without a key, or an unsealed one with a key, is refused. A group frame the broker
    /// signed but this node's mesh keys do not open is held (once), and the broker greeted
    /// for its keys.
    fn unseal(
        &mut self,
        topic: &[u8],
        payload: &[u8],
        arrival: Arrival,
    ) -> Result<Vec<u8>, Refusal> {
        let Some(seal) = self.seal.as_mut() else {
            if crate::seal::is_sealed(payload) {
                return Err(Refusal::Dropped(
                    "sealed frame, but this node has no key (give it --key and --broker-key)"
                        .into(),
                ));
            }
            return Ok(payload.to_vec());
        };
        match seal.open(topic, payload, crate::now_ms()) {
            Ok(plain) => Ok(plain),
            Err(OpenError::UnknownEpoch(epoch) | OpenError::MeshKeyMismatch(epoch))
                if arrival == Arrival::Fresh =>
            {
                let now = Instant::now();
                self.greet_for_mesh_key(now);
                match self.held.hold(epoch, topic, payload, now) {
                    Ok(()) => {
                        self.stats.held_frames.fetch_add(1, Ordering::Relaxed);
                        if self.logged_missing_epoch != Some(epoch) {
                            self.logged_missing_epoch = Some(epoch);
                            info!(epoch, "a frame uses mesh key epoch {epoch}, which this node does not hold (yet): held, and the broker asked for its keys");
                        }
                        Err(Refusal::Held)
                    }
                    Err(NotHeld::Duplicate) => {
                        self.stats.rejected_frames.fetch_add(1, Ordering::Relaxed);
                        Err(Refusal::Dropped(OpenError::Replay.to_string()))
                    }
                    Err(NotHeld::Full) => {
                        self.stats.rejected_frames.fetch_add(1, Ordering::Relaxed);
                        Err(Refusal::Dropped(format!(
                            "{} (no room left to hold it until the key arrives)",
                            OpenError::UnknownEpoch(epoch)
                        )))
                    }
                }
            }
            Err(e) => {
                self.stats.rejected_frames.fetch_add(1, Ordering::Relaxed);
                Err(Refusal::Dropped(e.to_string()))
            }
        }
    }

    /// Greets the broker at once for a mesh key this node lacks (its welcome carries the
    /// keys), at most once per [`KEY_HELLO_GAP`].
    fn greet_for_mesh_key(&mut self, now: Instant) {
        if self
            .last_key_hello
            .is_some_and(|t| now.saturating_duration_since(t) < KEY_HELLO_GAP)
        {
            return;
        }
        self.last_key_hello = Some(now);
        self.next_hello = now;
        self.say_hello_if_due(now);
    }

    /// Hands on the held frames whose mesh key this node now holds.
    fn release_held(&mut self) {
        let Some(seal) = self.seal.as_ref() else {
            return;
        };
        if self.held.is_empty() {
            return;
        }
        for (topic, frame) in self.held.release(|epoch| seal.holds_mesh_key(epoch)) {
            self.receive(&[topic, frame], Arrival::Released);
        }
    }

    /// Drops, counted and logged, the held frames whose key did not come in time.
    fn expire_held(&mut self, now: Instant) {
        let expired = self.held.expire(now);
        for _ in 0..expired {
            self.stats.rejected_frames.fetch_add(1, Ordering::Relaxed);
            self.note_drop(
                "no mesh key came for a held frame in time (the broker publishes work again)",
            );
        }
    }

    fn on_own(&mut self, env: Envelope) {
        let Message::Reply(Reply { in_reply_to, body }) = env.body else {
            warn!(sender = %env.sender, "unexpected non-reply on own topic");
            return;
        };
        if let ReplyBody::Welcome { broker_instance } = &body {
            if let Ok(mut current) = self.broker_instance.lock() {
                if *current != *broker_instance {
                    info!(broker_instance = %broker_instance, "connected to the broker");
                    *current = broker_instance.clone();
                }
            }
            self.welcomed.store(true, Ordering::Relaxed);
            self.unanswered_hellos = 0;
            self.hello_id = None;
            return;
        }
        if let Some(p) = self.pending.remove(&in_reply_to) {
            debug!(message_id = %p.envelope.id, "reply received");
            let _ = p.reply.send(Ok(body));
        }
        // Else: the reply to a resend that was already answered; nothing to do.
    }
}
