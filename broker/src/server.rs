//! The broker's sockets: a thin shell around the [`Engine`].
//!
//! Three threads: this loop owns the PULL socket and the engine; the journal thread owns
//! the store; the publisher thread owns the PUB socket. They talk over channels.

use std::path::PathBuf;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use crossbeam_channel::{bounded, unbounded, Receiver, Sender};
use jobz::envelope::{self, Envelope};
use jobz::socket::{self, BrokerAddr};
use tracing::{error, info, warn};

use crate::authority::{self, Principal};
use crate::engine::{Effects, Engine, EngineConfig, Publish, RunLookup};
use crate::guard::{self, Inbound, Outbound, Refusal, Security};
use crate::ids::Uuid7Ids;
use crate::journal::{self, Handoff, Pruning};
use crate::notify::{self, NotifyConfig};
use crate::store::{Pruned, Retention, SqliteStore, Store};

/// Everything the broker needs to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where PUB (base port) and PULL (base + 1) bind.
    pub bind: BrokerAddr,
    /// Directory of the SQLite store.
    pub state_dir: PathBuf,
    /// A worker silent this long is lost.
    pub worker_expiry: Duration,
    /// Publish an unstarted task again after this long.
    pub redeliver_after: Duration,
    /// A running task's lease: lost unless its worker's heartbeats renew it.
    pub lease_timeout: Duration,
    /// Extra time after a lease expires before the attempt counts as lost.
    pub lease_grace: Duration,
    /// Plain (loopback) or sealed frames.
    pub security: Security,
    /// What is kept of finished runs (`--history-days`, `--history-count`).
    pub history: Retention,
    /// How often to look for history to prune once nothing more was due.
    pub prune_every: Duration,
    /// Where notices go (`--notify`); `None`: notices wait in the store, undelivered.
    pub notify: Option<std::sync::Arc<NotifyConfig>>,
}

/// How often the engine's periodic duties run.
const TICK: Duration = Duration::from_millis(100);

/// How often the loop looks for the journal's answers while lookups are out.
const LOOKUP_POLL: Duration = Duration::from_millis(1);

/// Runs the broker until `shutdown` receives a message or is closed.
pub fn run(config: Config, shutdown: Receiver<()>) -> anyhow::Result<()> {
    let store = SqliteStore::open(&config.state_dir)
        .with_context(|| format!("opening the store in {}", config.state_dir.display()))?;
    let snapshot = store.load().context("loading the store")?;
    let pending_notices = store
        .pending_notices()
        .context("reading the notices to deliver")?;
    let instance = jobz::new_id();
    let mut engine = Engine::restore(
        EngineConfig {
            worker_expiry_ms: config.worker_expiry.as_millis() as i64,
            redeliver_after_ms: config.redeliver_after.as_millis() as i64,
            lease_timeout_ms: config.lease_timeout.as_millis() as i64,
            lease_grace_ms: config.lease_grace.as_millis() as i64,
            instance: instance.clone(),
            version: jobz::VERSION.to_owned(),
        },
        snapshot,
        Box::new(Uuid7Ids),
        jobz::now_ms(),
    );

    let (mut inbound, outbound) = guard::build(&config.security, jobz::now_ms())?;
    let ctx = zmq::Context::new();
    let pub_socket = ctx.socket(zmq::PUB).context("creating PUB socket")?;
    let pull = ctx.socket(zmq::PULL).context("creating PULL socket")?;
    socket::configure(&pub_socket, &config.bind).context("configuring PUB socket")?;
    socket::configure(&pull, &config.bind).context("configuring PULL socket")?;
    pub_socket
        .bind(&config.bind.pub_endpoint())
        .with_context(|| format!("binding PUB on {}", config.bind.pub_endpoint()))?;
    pull.bind(&config.bind.pull_endpoint())
        .with_context(|| format!("binding PULL on {}", config.bind.pull_endpoint()))?;
    info!(
        pub_endpoint = %config.bind.pub_endpoint(),
        pull_endpoint = %config.bind.pull_endpoint(),
        state = %config.state_dir.display(),
        %instance,
        "broker started"
    );

    let (publish_tx, publish_rx) = unbounded();
    let (effects_tx, effects_rx) = unbounded();
    let (pruned_tx, pruned_rx) = unbounded();
    let (looked_up_tx, looked_up) = unbounded();
    let publisher = spawn_publisher(pub_socket, publish_rx, outbound, engine.io_meters())?;
    let pruning = Pruning {
        retention: config.history.clone(),
        every: config.prune_every,
        report: pruned_tx,
    };
    engine.note_pruned(0, &[]); // the counters show from the start
                                // The notifier stops before the journal: it sends the journal what it delivered.
    let (notices_tx, notices_rx) = unbounded();
    let (stop_notifier, notifier_stop) = bounded::<()>(0);
    let notifier = match &config.notify {
        Some(notify) => {
            if !pending_notices.is_empty() {
                info!(notices = pending_notices.len(), "notices still to deliver");
            }
            let handle = notify::spawn(
                notify.clone(),
                pending_notices,
                notices_rx,
                effects_tx.clone(),
                notifier_stop,
            )?;
            Some(handle)
        }
        None => {
            if !pending_notices.is_empty() {
                warn!(
                    notices = pending_notices.len(),
                    "notices wait to be delivered, but no --notify file is given"
                );
            }
            None
        }
    };
    let handoff = Handoff {
        notices: notifier.as_ref().map(|_| notices_tx),
        io: engine.io_meters(),
    };
    let journal = journal::spawn(
        Box::new(store),
        effects_rx,
        publish_tx,
        pruning,
        looked_up_tx,
        handoff,
    )?;

    let result = serve(
        &mut engine,
        &mut inbound,
        &pull,
        Loop {
            effects: &effects_tx,
            pruned: &pruned_rx,
            looked_up: &looked_up,
            journal: &journal,
            shutdown: &shutdown,
        },
    );
    // The notifier's attempt in flight ends (at most its timeout) and is journaled; then
    // closing the effects channel lets the journal commit what is queued and stop; its
    // end closes the publisher's channel, and the publisher flushes within its linger.
    drop(stop_notifier);
    if let Some(notifier) = notifier {
        let _ = notifier.join();
    }
    drop(effects_tx);
    let journal_result = journal
        .join()
        .map_err(|_| anyhow::anyhow!("journal thread panicked"))?;
    let _ = publisher.join();
    info!("broker stopped");
    result.and(journal_result)
}

/// The channels the server loop talks over.
struct Loop<'a> {
    /// To the journal: what each event makes the broker do.
    effects: &'a Sender<Effects>,
    /// From the journal: what it pruned.
    pruned: &'a Receiver<Pruned>,
    /// From the journal: triggers with the states of the runs they depend on.
    looked_up: &'a Receiver<Option<RunLookup>>,
    journal: &'a JoinHandle<anyhow::Result<()>>,
    shutdown: &'a Receiver<()>,
}

fn serve(
    engine: &mut Engine,
    inbound: &mut Inbound,
    pull: &zmq::Socket,
    channels: Loop<'_>,
) -> anyhow::Result<()> {
    let Loop {
        effects,
        pruned,
        looked_up,
        journal,
        shutdown,
    } = channels;
    let mut next_tick = Instant::now();
    let mut drops = DropLog::default();
    // Lookups handed to the journal whose answers have not come back: while there are
    // any, PULL is polled briefly so that an answer waits a millisecond, not a tick.
    let lookups_out = std::cell::Cell::new(0usize);
    let send = |fx: Effects| -> anyhow::Result<()> {
        if fx.is_empty() {
            return Ok(());
        }
        lookups_out.set(lookups_out.get() + fx.lookups.len());
        effects
            .send(fx)
            .map_err(|_| anyhow::anyhow!("the journal has stopped"))
    };
    loop {
        match shutdown.try_recv() {
            Ok(()) | Err(crossbeam_channel::TryRecvError::Disconnected) => {
                info!("shutting down");
                return Ok(());
            }
            Err(crossbeam_channel::TryRecvError::Empty) => {}
        }
        if journal.is_finished() {
            anyhow::bail!("the journal has stopped");
        }
        let mut wait = next_tick.saturating_duration_since(Instant::now());
        if lookups_out.get() > 0 {
            wait = wait.min(LOOKUP_POLL);
        }
        // Rounded up: rounding down polled with timeout 0 in a loop for the last sub-millisecond
        // before each tick (found by the bench: the idle broker spun).
        let wait_ms = wait.as_micros().div_ceil(1000) as i64;
        let ready = match pull.poll(zmq::POLLIN, wait_ms) {
            Ok(n) => n,
            Err(zmq::Error::EINTR) => continue, // a signal: the shutdown check comes next
            Err(e) => return Err(e).context("polling PULL"),
        };
        if ready > 0 {
            // Bounded, so ticks keep their rhythm under a flood.
            for _ in 0..1000 {
                let frames = match pull.recv_multipart(zmq::DONTWAIT) {
                    Ok(frames) => frames,
                    Err(zmq::Error::EAGAIN | zmq::Error::EINTR) => break,
                    Err(e) => return Err(e).context("receiving from PULL"),
                };
                match admit(inbound, &frames) {
                    Ok((env, from)) => send(engine.on_envelope(env, &from, jobz::now_ms()))?,
                    Err((kind, reason)) => {
                        engine.count_dropped_frame(kind);
                        drops.note(kind, &reason);
                    }
                }
            }
        }
        // Triggers the journal looked runs up for (at most LOOKUP_POLL late).
        while let Ok(answer) = looked_up.try_recv() {
            lookups_out.set(lookups_out.get().saturating_sub(1));
            let Some(lookup) = answer else {
                continue; // refused by the journal, which answered its sender
            };
            send(engine.on_lookup(lookup, jobz::now_ms()))?;
        }
        if Instant::now() >= next_tick {
            let now = jobz::now_ms();
            for name in inbound.tick(now) {
                if let Some(worker) = name.strip_prefix("worker:") {
                    send(engine.revoke_worker(worker, now))?;
                }
            }
            for batch in pruned.try_iter() {
                engine.note_pruned(batch.runs, &batch.dead_tasks);
            }
            send(engine.tick(now))?;
            next_tick = Instant::now() + TICK;
        }
    }
}

/// One message off PULL as the engine may see it: opened and authenticated by the guard,
/// then allowed for its sender by the authority.
fn admit(inbound: &mut Inbound, frames: &[Vec<u8>]) -> Result<(Envelope, Principal), Refusal> {
    let env = inbound.admit(frames, jobz::now_ms())?;
    match authority::authorize(&env) {
        Ok(from) => Ok((env, from)),
        Err(refusal) => Err((refusal.reason(), refusal.to_string())),
    }
}

/// Logs dropped frames without letting a flood of garbage flood the log: at most one line
/// a second, with the number suppressed since.
#[derive(Default)]
struct DropLog {
    last: Option<Instant>,
    suppressed: u64,
}

impl DropLog {
    fn note(&mut self, kind: &str, reason: &str) {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
        {
            self.suppressed += 1;
            return;
        }
        warn!(
            kind,
            reason,
            suppressed = self.suppressed,
            "dropped a frame on PULL"
        );
        self.last = Some(now);
        self.suppressed = 0;
    }
}

fn spawn_publisher(
    socket: zmq::Socket,
    publications: Receiver<Publish>,
    mut outbound: Outbound,
    io: std::sync::Arc<crate::meters::IoMeters>,
) -> anyhow::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("publisher".into())
        .spawn(move || {
            for p in publications {
                let env = Envelope::new("broker", p.body);
                match envelope::encode(&env) {
                    Ok(frame) => {
                        let Some(frame) = outbound.seal(&p.topic, frame) else {
                            continue;
                        };
                        match socket.send_multipart([p.topic.to_bytes(), frame], zmq::DONTWAIT) {
                            Ok(()) => io.sent(),
                            Err(e) => warn!(topic = %p.topic, error = %e, "cannot publish"),
                        }
                    }
                    Err(e) => error!(topic = %p.topic, error = %e, "cannot encode a publication"),
                }
            }
        })
        .context("starting the publisher thread")
}
