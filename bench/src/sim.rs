//! Simulated workers and a simulated frontend, speaking the wire protocol to a broker alone
//! from the bench process: the broker's own cost without HTTP, processes or fsyncs on the
//! worker side.
//!
//! - The workers ([`Workers`], the decisions; a thread owns the sockets): N worker names
//!   (`sim0001` …) over one PUSH and one SUB socket. Each registers with heartbeats (every
//!   2 s, as a real worker, carrying the job and the tasks it runs), and answers every
//!   assignment of the job's `Work` at once with `TaskStarted` then `TaskFinished`
//!   (succeeded), unless told to *hold*: then it reports the task started and keeps it
//!   running (its slot busy, its lease renewed by the heartbeats) until released.
//! - The frontend (a second thread): sends `Trigger`s of the job, keeping at most a given
//!   number of runs unfinished (`outstanding`) and at most a given total (`limit`), and
//!   counts the `Accepted` answers.
//!
//! A *cycle* is one run of the job: trigger accepted, its task dispatched, reported
//! started, reported finished, and that report acknowledged (journaled). Every message id
//! starts with a letter saying what it is ([`Kind`]), so the broker's answers are counted
//! by kind without remembering ids.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use jobz::envelope::Envelope;
use jobz::jobfile::JobSpec;
use jobz::message::{
    Message, Reply, ReplyBody, Role, TaskFinished, TaskOutcome, TaskRef, TaskStarted,
    TriggerRequest, Work, WorkerStatus,
};
use jobz::topic::Topic;

/// The job the simulated workers serve: a queue job (its command is never run).
pub const SIM_JOB: &str = "bench_sim";

/// Node id of the simulated frontend.
const FRONTEND_ID: &str = "frontend:bench/sim";

/// How often each simulated worker heartbeats (a real worker's default).
pub const HEARTBEAT: Duration = Duration::from_secs(2);

/// Most triggers sent and not yet answered.
const MAX_UNANSWERED: u64 = 1_000;

/// The job definition the simulated workers register.
pub fn job_spec() -> anyhow::Result<JobSpec> {
    let yaml = format!("jobs:\n  - name: {SIM_JOB}\n    command: \"true\"\n    delivery: queue\n");
    let mut set = jobz::jobfile::parse_job_file(std::path::Path::new("sim.yaml"), &yaml)
        .context("the simulated job definition")?;
    set.jobs
        .remove(SIM_JOB)
        .context("the simulated job is missing from its own definition")
}

/// What a message is: the first letter of its id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `Hello`.
    Hello,
    /// `Heartbeat`.
    Heartbeat,
    /// `TaskStarted`.
    Started,
    /// `TaskFinished`.
    Finished,
    /// `Trigger`.
    Trigger,
}

impl Kind {
    fn letter(self) -> char {
        match self {
            Kind::Hello => 'w',
            Kind::Heartbeat => 'h',
            Kind::Started => 's',
            Kind::Finished => 'f',
            Kind::Trigger => 't',
        }
    }

    /// A fresh message id of this kind.
    pub fn id(self) -> String {
        format!("{}{}", self.letter(), jobz::new_id())
    }

    /// The kind of the message a reply answers.
    pub fn of_reply(reply: &Reply) -> Option<Kind> {
        [
            Kind::Hello,
            Kind::Heartbeat,
            Kind::Started,
            Kind::Finished,
            Kind::Trigger,
        ]
        .into_iter()
        .find(|k| reply.in_reply_to.starts_with(k.letter()))
    }
}

fn envelope(kind: Kind, sender: &str, body: Message) -> Envelope {
    Envelope {
        id: kind.id(),
        sender: sender.to_owned(),
        sent_at_ms: jobz::now_ms(),
        body,
    }
}

/// The simulated workers' decisions: pure, the sockets are the thread's.
pub struct Workers {
    names: Vec<String>,
    by_name: HashMap<String, usize>,
    instance: String,
    slots: u32,
    job: JobSpec,
    hold: bool,
    /// Tasks each worker runs (held).
    held: Vec<Vec<TaskRef>>,
}

impl Workers {
    /// `count` workers `sim0001` … with `slots` slots each, serving `job`.
    pub fn new(count: usize, slots: u32, job: JobSpec) -> Workers {
        let names: Vec<String> = (1..=count).map(|i| format!("sim{i:04}")).collect();
        let by_name = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.clone(), i))
            .collect();
        Workers {
            held: vec![Vec::new(); names.len()],
            names,
            by_name,
            instance: format!("sim-{}", jobz::new_id()),
            slots,
            job,
            hold: false,
        }
    }

    /// Worker names.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Node id of worker `i`.
    pub fn node_id(&self, i: usize) -> String {
        format!("worker:{}", self.names[i])
    }

    /// Tasks held now.
    pub fn held(&self) -> usize {
        self.held.iter().map(Vec::len).sum()
    }

    /// From now on, hold every task received (or stop holding: see [`Workers::release`]).
    pub fn set_hold(&mut self, hold: bool) {
        self.hold = hold;
    }

    /// The heartbeat of worker `i`: its registration and the tasks it runs.
    pub fn heartbeat(&self, i: usize) -> Envelope {
        envelope(
            Kind::Heartbeat,
            &self.node_id(i),
            Message::Heartbeat(WorkerStatus {
                name: self.names[i].clone(),
                instance: self.instance.clone(),
                jobs: vec![self.job.clone()],
                capabilities: Vec::new(),
                slots: self.slots,
                running: self.held[i].clone(),
                version: String::from("bench-sim"),
                counters: Default::default(),
                leaving: false,
            }),
        )
    }

    /// What the workers send for a `Work`: for each assignment to one of them, the task
    /// started and (unless holding) finished. Assignments to others are not theirs.
    pub fn on_work(&mut self, work: &Work, now_ms: i64) -> Vec<Envelope> {
        let mut out = Vec::new();
        for assignment in &work.assignments {
            let Some(&i) = self.by_name.get(&assignment.worker) else {
                continue;
            };
            out.push(self.started(i, &assignment.task, now_ms));
            if self.hold {
                self.held[i].push(assignment.task.clone());
            } else {
                out.push(self.finished(i, &assignment.task, now_ms));
            }
        }
        out
    }

    /// Stops holding: every held task finishes now.
    pub fn release(&mut self, now_ms: i64) -> Vec<Envelope> {
        self.hold = false;
        let mut out = Vec::new();
        for i in 0..self.held.len() {
            for task in std::mem::take(&mut self.held[i]) {
                out.push(self.finished(i, &task, now_ms));
            }
        }
        out
    }

    fn started(&self, i: usize, task: &TaskRef, now_ms: i64) -> Envelope {
        envelope(
            Kind::Started,
            &self.node_id(i),
            Message::TaskStarted(TaskStarted {
                task: task.clone(),
                worker: self.names[i].clone(),
                instance: self.instance.clone(),
                started_at_ms: now_ms,
            }),
        )
    }

    fn finished(&self, i: usize, task: &TaskRef, now_ms: i64) -> Envelope {
        envelope(
            Kind::Finished,
            &self.node_id(i),
            Message::TaskFinished(TaskFinished {
                task: task.clone(),
                worker: self.names[i].clone(),
                outcome: TaskOutcome::Succeeded,
                exit_code: Some(0),
                error: None,
                started_at_ms: now_ms,
                finished_at_ms: now_ms,
                output_tail: String::new(),
            }),
        )
    }
}

/// Counters both threads keep, read by the scenarios.
#[derive(Debug, Default)]
pub struct Counters {
    /// Heartbeats acknowledged.
    pub heartbeats_acked: AtomicU64,
    /// Assignments received for the simulated workers.
    pub assignments: AtomicU64,
    /// `TaskFinished` reports acknowledged: cycles done.
    pub finished: AtomicU64,
    /// Tasks held now.
    pub held: AtomicU64,
    /// Triggers sent.
    pub triggers_sent: AtomicU64,
    /// Triggers accepted.
    pub accepted: AtomicU64,
    /// Triggers rejected.
    pub rejected: AtomicU64,
    /// Frames that did not decode.
    pub bad_frames: AtomicU64,
}

/// What the scenario asks of the threads.
#[derive(Debug)]
struct Control {
    stop: AtomicBool,
    hold: AtomicBool,
    /// Most triggers (accepted or not yet answered) in all.
    limit: AtomicU64,
    /// Most runs triggered and not yet finished.
    outstanding: AtomicU64,
    /// The frontend has been welcomed.
    frontend_ready: AtomicBool,
    /// The workers' sockets are subscribed and welcomed.
    workers_ready: AtomicBool,
}

/// A running simulation: the worker thread and the frontend thread. Stops when dropped.
pub struct Sim {
    control: Arc<Control>,
    /// What happened so far.
    pub counters: Arc<Counters>,
    workers: usize,
    slots: u32,
    threads: Vec<(&'static str, JoinHandle<anyhow::Result<()>>)>,
}

/// A measured stretch of cycles.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Window {
    /// Cycles finished in it.
    pub cycles: u64,
    /// How long it lasted.
    pub elapsed: Duration,
}

impl Window {
    /// Cycles per second.
    pub fn rate(&self) -> f64 {
        crate::stats::rate(self.cycles as usize, self.elapsed)
    }
}

impl Sim {
    /// Starts `workers` simulated workers with `slots` slots each and the simulated
    /// frontend against the broker at 127.0.0.1:`base_port`, and waits until the broker
    /// has welcomed both and acknowledged every worker's first heartbeat. Nothing is
    /// triggered until [`Sim::set_limit`] allows it.
    pub fn start(
        base_port: u16,
        workers: usize,
        slots: u32,
        timeout: Duration,
    ) -> anyhow::Result<Sim> {
        let ctx = zmq::Context::new();
        let control = Arc::new(Control {
            stop: AtomicBool::new(false),
            hold: AtomicBool::new(false),
            limit: AtomicU64::new(0),
            outstanding: AtomicU64::new(0),
            frontend_ready: AtomicBool::new(false),
            workers_ready: AtomicBool::new(false),
        });
        let counters = Arc::new(Counters::default());
        let sim_workers = Workers::new(workers, slots, job_spec()?);
        let mut threads = Vec::new();
        {
            let (ctx, control, counters) = (ctx.clone(), control.clone(), counters.clone());
            let thread = std::thread::Builder::new()
                .name("sim-workers".into())
                .spawn(move || run_workers(&ctx, base_port, sim_workers, &control, &counters))
                .context("starting the simulated workers")?;
            threads.push(("simulated workers", thread));
        }
        {
            let (control, counters) = (control.clone(), counters.clone());
            let thread = std::thread::Builder::new()
                .name("sim-frontend".into())
                .spawn(move || run_frontend(&ctx, base_port, &control, &counters))
                .context("starting the simulated frontend")?;
            threads.push(("simulated frontend", thread));
        }
        let mut sim = Sim {
            control,
            counters,
            workers,
            slots,
            threads,
        };
        let deadline = Instant::now() + timeout;
        let n = workers as u64;
        while !(sim.control.frontend_ready.load(Ordering::Relaxed)
            && sim.control.workers_ready.load(Ordering::Relaxed)
            && sim.counters.heartbeats_acked.load(Ordering::Relaxed) >= n)
        {
            sim.check_threads()?;
            if Instant::now() >= deadline {
                bail!(
                    "the simulation was not ready within {timeout:?}: frontend welcomed {}, workers welcomed {}, heartbeats acknowledged {} of {n}",
                    sim.control.frontend_ready.load(Ordering::Relaxed),
                    sim.control.workers_ready.load(Ordering::Relaxed),
                    sim.counters.heartbeats_acked.load(Ordering::Relaxed),
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(sim)
    }

    /// Slots of all workers together.
    pub fn total_slots(&self) -> u64 {
        self.workers as u64 * u64::from(self.slots)
    }

    /// Hold every task from now on (`true`), or finish the held ones and stop holding.
    pub fn set_hold(&self, hold: bool) {
        self.control.hold.store(hold, Ordering::Relaxed);
    }

    /// Most triggers sent in all.
    pub fn set_limit(&self, limit: u64) {
        self.control.limit.store(limit, Ordering::Relaxed);
    }

    /// Most runs triggered and not finished.
    pub fn set_outstanding(&self, outstanding: u64) {
        self.control
            .outstanding
            .store(outstanding, Ordering::Relaxed);
    }

    /// A counter's value now.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// Fails if a thread has stopped (with its error).
    pub fn check_threads(&mut self) -> anyhow::Result<()> {
        if let Some(i) = self.threads.iter().position(|(_, t)| t.is_finished()) {
            let (name, thread) = self.threads.remove(i);
            match thread.join() {
                Ok(Ok(())) => bail!("the {name} stopped"),
                Ok(Err(e)) => return Err(e.context(format!("the {name} failed"))),
                Err(_) => bail!("the {name} panicked"),
            }
        }
        Ok(())
    }

    /// Waits until `counter` reaches `value`; fails at `deadline`, saying `what`.
    pub fn wait_until(
        &mut self,
        counter: fn(&Counters) -> &AtomicU64,
        value: u64,
        deadline: Instant,
        what: &str,
    ) -> anyhow::Result<()> {
        loop {
            let now = Sim::get(counter(&self.counters));
            if now >= value {
                return Ok(());
            }
            self.check_threads()?;
            if Instant::now() >= deadline {
                bail!("{what}: {now} of {value} by the deadline");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Times the next `cycles` finished cycles (or as many as finish by `deadline`, if at
    /// least one did).
    pub fn measure(&mut self, cycles: u64, deadline: Instant) -> anyhow::Result<Window> {
        let from = Sim::get(&self.counters.finished);
        let started = Instant::now();
        loop {
            let done = Sim::get(&self.counters.finished) - from;
            if done >= cycles || Instant::now() >= deadline {
                if done == 0 {
                    bail!("no cycle finished by the deadline");
                }
                return Ok(Window {
                    cycles: done,
                    elapsed: started.elapsed(),
                });
            }
            self.check_threads()?;
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Stops both threads and waits for them.
    pub fn stop(mut self) -> anyhow::Result<()> {
        self.control.stop.store(true, Ordering::Relaxed);
        for (name, thread) in self.threads.drain(..) {
            match thread.join() {
                Ok(result) => result.with_context(|| format!("the {name}"))?,
                Err(_) => bail!("the {name} panicked"),
            }
        }
        Ok(())
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        self.control.stop.store(true, Ordering::Relaxed);
        for (_, thread) in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// A PUSH socket to the broker's PULL and a SUB socket on its PUB, with jobz's options.
fn sockets(
    ctx: &zmq::Context,
    base_port: u16,
    topics: &[Topic],
) -> anyhow::Result<(zmq::Socket, zmq::Socket)> {
    let broker = jobz::socket::BrokerAddr {
        host: String::from("127.0.0.1"),
        base_port,
    };
    let push = ctx.socket(zmq::PUSH).context("creating a PUSH socket")?;
    let sub = ctx.socket(zmq::SUB).context("creating a SUB socket")?;
    jobz::socket::configure(&push, &broker).context("configuring PUSH")?;
    jobz::socket::configure(&sub, &broker).context("configuring SUB")?;
    push.set_linger(0).context("setting linger")?;
    sub.set_linger(0).context("setting linger")?;
    for topic in topics {
        sub.set_subscribe(&topic.to_bytes())
            .context("subscribing")?;
    }
    sub.connect(&broker.pub_endpoint())
        .context("connecting SUB")?;
    push.connect(&broker.pull_endpoint())
        .context("connecting PUSH")?;
    Ok((push, sub))
}

fn send(push: &zmq::Socket, env: &Envelope) -> anyhow::Result<()> {
    let frame = jobz::envelope::encode(env).context("encoding a message")?;
    push.send(frame, 0).context("sending to the broker")
}

/// A publication: its topic and envelope, or `None` (counted) if it does not decode.
fn receive(
    sub: &zmq::Socket,
    counters: &Counters,
) -> anyhow::Result<Option<Option<(Topic, Envelope)>>> {
    match sub.recv_multipart(zmq::DONTWAIT) {
        Ok(frames) => {
            let decoded = match &frames[..] {
                [topic, frame] => Topic::parse(topic).zip(jobz::envelope::decode(frame).ok()),
                _ => None,
            };
            if decoded.is_none() {
                counters.bad_frames.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Some(decoded))
        }
        Err(zmq::Error::EAGAIN) => Ok(None),
        Err(zmq::Error::EINTR) => Ok(Some(None)),
        Err(e) => Err(e).context("receiving from the broker"),
    }
}

/// Polls `sub` up to `wait`; false on EINTR or timeout.
fn readable(sub: &zmq::Socket, wait: Duration) -> anyhow::Result<bool> {
    match sub.poll(zmq::POLLIN, wait.as_millis() as i64) {
        Ok(n) => Ok(n > 0),
        Err(zmq::Error::EINTR) => Ok(false),
        Err(e) => Err(e).context("polling the broker's PUB socket"),
    }
}

fn run_workers(
    ctx: &zmq::Context,
    base_port: u16,
    mut workers: Workers,
    control: &Control,
    counters: &Counters,
) -> anyhow::Result<()> {
    let n = workers.names().len();
    if n == 0 {
        bail!("no simulated worker to run");
    }
    let mut topics = vec![Topic::Job(SIM_JOB.to_owned())];
    topics.extend((0..n).map(|i| Topic::Node(workers.node_id(i))));
    let (push, sub) = sockets(ctx, base_port, &topics)?;
    // Subscriptions reach the broker in order: a welcome on the last worker's topic proves
    // every one before it is in place.
    let last = n.saturating_sub(1);
    let mut next_hello = Instant::now();
    while !control.workers_ready.load(Ordering::Relaxed) {
        if control.stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        if Instant::now() >= next_hello {
            let hello = envelope(
                Kind::Hello,
                &workers.node_id(last),
                Message::Hello { role: Role::Worker },
            );
            send(&push, &hello)?;
            next_hello = Instant::now() + Duration::from_millis(100);
        }
        if readable(&sub, Duration::from_millis(10))? {
            while let Some(publication) = receive(&sub, counters)? {
                if let Some((
                    _,
                    Envelope {
                        body: Message::Reply(reply),
                        ..
                    },
                )) = publication
                {
                    if Kind::of_reply(&reply) == Some(Kind::Hello) {
                        control.workers_ready.store(true, Ordering::Relaxed);
                    }
                }
            }
        }
    }
    // Every worker registers now; then each heartbeats every HEARTBEAT, spread evenly.
    let started = Instant::now();
    let mut next_beat: Vec<Instant> = (0..n)
        .map(|i| started + HEARTBEAT.mul_f64(i as f64 / n.max(1) as f64))
        .collect();
    for (i, next) in next_beat.iter_mut().enumerate() {
        send(&push, &workers.heartbeat(i))?;
        *next += HEARTBEAT;
    }
    let mut beat_cursor = 0;
    while !control.stop.load(Ordering::Relaxed) {
        let hold = control.hold.load(Ordering::Relaxed);
        if !hold && workers.held() > 0 {
            for env in workers.release(jobz::now_ms()) {
                send(&push, &env)?;
            }
        }
        workers.set_hold(hold);
        // Heartbeats due, in order of their schedule.
        let now = Instant::now();
        for _ in 0..n {
            if next_beat[beat_cursor] > now {
                break;
            }
            send(&push, &workers.heartbeat(beat_cursor))?;
            next_beat[beat_cursor] += HEARTBEAT;
            beat_cursor = (beat_cursor + 1) % n;
        }
        if !readable(&sub, Duration::from_millis(2))? {
            continue;
        }
        // Bounded, so heartbeats keep their rhythm under a flood.
        for _ in 0..10_000 {
            let Some(publication) = receive(&sub, counters)? else {
                break;
            };
            match publication {
                Some((
                    Topic::Job(_),
                    Envelope {
                        body: Message::Work(work),
                        ..
                    },
                )) => {
                    let out = workers.on_work(&work, jobz::now_ms());
                    counters
                        .assignments
                        .fetch_add(work.assignments.len() as u64, Ordering::Relaxed);
                    for env in &out {
                        send(&push, env)?;
                    }
                }
                Some((
                    Topic::Node(_),
                    Envelope {
                        body: Message::Reply(reply),
                        ..
                    },
                )) => match (Kind::of_reply(&reply), &reply.body) {
                    (Some(Kind::Finished), ReplyBody::Ack) => {
                        counters.finished.fetch_add(1, Ordering::Relaxed);
                    }
                    (Some(Kind::Heartbeat), ReplyBody::Ack) => {
                        counters.heartbeats_acked.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {}
                },
                _ => {}
            }
        }
        counters
            .held
            .store(workers.held() as u64, Ordering::Relaxed);
    }
    Ok(())
}

fn run_frontend(
    ctx: &zmq::Context,
    base_port: u16,
    control: &Control,
    counters: &Counters,
) -> anyhow::Result<()> {
    let (push, sub) = sockets(ctx, base_port, &[Topic::Node(FRONTEND_ID.to_owned())])?;
    let trigger = || {
        envelope(
            Kind::Trigger,
            FRONTEND_ID,
            Message::Trigger(TriggerRequest {
                job: SIM_JOB.to_owned(),
                ..Default::default()
            }),
        )
    };
    let mut next_hello = Instant::now();
    let (mut sent, mut answered) = (0u64, 0u64);
    while !control.stop.load(Ordering::Relaxed) {
        let ready = control.frontend_ready.load(Ordering::Relaxed);
        if !ready && Instant::now() >= next_hello {
            let hello = envelope(
                Kind::Hello,
                FRONTEND_ID,
                Message::Hello {
                    role: Role::Frontend,
                },
            );
            send(&push, &hello)?;
            next_hello = Instant::now() + Duration::from_millis(100);
        }
        if ready {
            let finished = Sim::get(&counters.finished);
            let rejected = Sim::get(&counters.rejected);
            let allowed = control.limit.load(Ordering::Relaxed).min(
                finished
                    .saturating_add(control.outstanding.load(Ordering::Relaxed))
                    .saturating_add(rejected),
            );
            while sent < allowed && sent - answered < MAX_UNANSWERED {
                send(&push, &trigger())?;
                sent += 1;
            }
            counters.triggers_sent.store(sent, Ordering::Relaxed);
        }
        if !readable(&sub, Duration::from_millis(1))? {
            continue;
        }
        while let Some(publication) = receive(&sub, counters)? {
            let Some((
                _,
                Envelope {
                    body: Message::Reply(reply),
                    ..
                },
            )) = publication
            else {
                continue;
            };
            match (Kind::of_reply(&reply), &reply.body) {
                (Some(Kind::Hello), ReplyBody::Welcome { .. }) => {
                    control.frontend_ready.store(true, Ordering::Relaxed);
                }
                (Some(Kind::Trigger), ReplyBody::Accepted { .. }) => {
                    answered += 1;
                    counters.accepted.fetch_add(1, Ordering::Relaxed);
                }
                (Some(Kind::Trigger), _) => {
                    answered += 1;
                    counters.rejected.fetch_add(1, Ordering::Relaxed);
                }
                _ => {}
            }
        }
    }
    Ok(())
}

/// Greets the broker at 127.0.0.1:`base_port` as a client every 20 ms until it answers;
/// how long that took. For the time a restarted broker takes to serve again.
pub fn time_to_welcome(base_port: u16, timeout: Duration) -> anyhow::Result<Duration> {
    const ID: &str = "client:bench/probe";
    let ctx = zmq::Context::new();
    let counters = Counters::default();
    let (push, sub) = sockets(&ctx, base_port, &[Topic::Node(ID.to_owned())])?;
    let started = Instant::now();
    let mut next_hello = started;
    while started.elapsed() < timeout {
        if Instant::now() >= next_hello {
            let hello = envelope(Kind::Hello, ID, Message::Hello { role: Role::Client });
            // DONTWAIT: while the broker is down the PUSH queue must not block the probe.
            let frame = jobz::envelope::encode(&hello).context("encoding a hello")?;
            let _ = push.send(frame, zmq::DONTWAIT);
            next_hello += Duration::from_millis(20);
        }
        if readable(&sub, Duration::from_millis(5))? {
            while let Some(publication) = receive(&sub, &counters)? {
                if let Some((
                    _,
                    Envelope {
                        body:
                            Message::Reply(Reply {
                                body: ReplyBody::Welcome { .. },
                                ..
                            }),
                        ..
                    },
                )) = publication
                {
                    return Ok(started.elapsed());
                }
            }
        }
    }
    bail!("the broker did not welcome a client within {timeout:?}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use jobz::message::Assignment;

    fn work(assignments: &[(&str, &str)]) -> Work {
        Work {
            run_id: "r".into(),
            step_id: "s".into(),
            job: SIM_JOB.into(),
            params: Default::default(),
            assignments: assignments
                .iter()
                .map(|(worker, task)| Assignment {
                    worker: (*worker).into(),
                    task: TaskRef {
                        task_id: (*task).into(),
                        attempt: 1,
                    },
                })
                .collect(),
        }
    }

    fn kinds(out: &[Envelope]) -> Vec<(String, &'static str)> {
        out.iter()
            .map(|e| {
                let what = match &e.body {
                    Message::TaskStarted(_) => "started",
                    Message::TaskFinished(_) => "finished",
                    _ => "other",
                };
                (e.sender.clone(), what)
            })
            .collect()
    }

    #[test]
    fn a_worker_starts_and_finishes_its_own_assignments_only() {
        let mut w = Workers::new(2, 4, job_spec().unwrap());
        assert_eq!(w.names(), ["sim0001", "sim0002"]);
        let out = w.on_work(&work(&[("sim0002", "t1"), ("someone", "t2")]), 5);
        assert_eq!(
            kinds(&out),
            [
                ("worker:sim0002".into(), "started"),
                ("worker:sim0002".into(), "finished")
            ]
        );
        let Message::TaskFinished(f) = &out[1].body else {
            panic!("{out:?}")
        };
        assert_eq!(
            (f.worker.as_str(), f.task.task_id.as_str()),
            ("sim0002", "t1")
        );
        assert_eq!(f.outcome, TaskOutcome::Succeeded);
        assert!(out[1].id.starts_with('f') && out[0].id.starts_with('s'));
        // The broker would refuse a report whose worker is not the sender's own name.
        for env in &out {
            assert!(broker_would_accept_names(env), "{env:?}");
        }
    }

    fn broker_would_accept_names(env: &Envelope) -> bool {
        let own = jobz::keys::principal_of(&env.sender)
            .strip_prefix("worker:")
            .map(str::to_owned);
        match &env.body {
            Message::TaskStarted(s) => own.as_deref() == Some(s.worker.as_str()),
            Message::TaskFinished(f) => own.as_deref() == Some(f.worker.as_str()),
            Message::Heartbeat(h) => own.as_deref() == Some(h.name.as_str()),
            _ => false,
        }
    }

    #[test]
    fn held_tasks_run_until_released_and_heartbeats_carry_them() {
        let mut w = Workers::new(1, 2, job_spec().unwrap());
        w.set_hold(true);
        let out = w.on_work(&work(&[("sim0001", "t1"), ("sim0001", "t2")]), 5);
        assert_eq!(
            kinds(&out).iter().filter(|(_, k)| *k == "started").count(),
            2
        );
        assert!(kinds(&out).iter().all(|(_, k)| *k == "started"));
        assert_eq!(w.held(), 2);
        let Message::Heartbeat(status) = w.heartbeat(0).body else {
            panic!("not a heartbeat")
        };
        let running: Vec<&str> = status.running.iter().map(|t| t.task_id.as_str()).collect();
        assert_eq!(running, ["t1", "t2"], "held tasks keep their leases");
        assert_eq!((status.slots, status.jobs[0].name.as_str()), (2, SIM_JOB));
        assert!(broker_would_accept_names(&w.heartbeat(0)));
        let released = w.release(9);
        assert_eq!(kinds(&released).len(), 2);
        assert!(kinds(&released).iter().all(|(_, k)| *k == "finished"));
        assert_eq!(w.held(), 0);
        // Released: the next task finishes at once.
        let out = w.on_work(&work(&[("sim0001", "t3")]), 10);
        assert_eq!(kinds(&out).len(), 2);
    }

    #[test]
    fn replies_are_told_apart_by_the_first_letter_of_what_they_answer() {
        for kind in [
            Kind::Hello,
            Kind::Heartbeat,
            Kind::Started,
            Kind::Finished,
            Kind::Trigger,
        ] {
            let reply = Reply {
                in_reply_to: kind.id(),
                body: ReplyBody::Ack,
            };
            assert_eq!(Kind::of_reply(&reply), Some(kind));
        }
        let foreign = Reply {
            in_reply_to: "0190-uuid".into(),
            body: ReplyBody::Ack,
        };
        assert_eq!(Kind::of_reply(&foreign), None);
        // Message ids must be printable ASCII of at most 256 bytes for the broker.
        let id = Kind::Trigger.id();
        assert!(id.len() <= 256 && id.bytes().all(|b| b.is_ascii_graphic()));
    }
}
