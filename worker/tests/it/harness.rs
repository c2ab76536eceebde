//! What the tests share: the binaries' paths, waiting with a deadline, process checks,
//! a fake broker on loopback and a worker running in this process.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, unbounded, Receiver, Sender};
use jobz::envelope::{self, Envelope};
use jobz::message::{
    Assignment, Message, Reply, ReplyBody, TaskFinished, TaskRef, TaskStarted, Work,
};
use jobz::socket::BrokerAddr;
use jobz::topic::Topic;
use worker::runner::RunSpec;
use worker::supervisor::StepSupervisor;
use worker::Config;

/// The `jobz-worker` binary (which can also be its own step supervisor).
pub fn worker_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_jobz-worker"))
}

/// The `jobz-step` binary: the step supervisor.
pub fn step_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_jobz-step"))
}

/// A temporary directory and a [`RunSpec`] writing into it.
pub struct Fixture {
    pub dir: tempfile::TempDir,
}

impl Fixture {
    pub fn new() -> Fixture {
        Fixture {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn spec(&self, command: &str) -> RunSpec {
        RunSpec {
            command: command.into(),
            steps: StepSupervisor::new(step_binary()),
            env: vec![],
            env_allow: vec![],
            run_as: None,
            max_output: 1 << 20,
            output: self.dir.path().join("runs/r1/job.t1.1.log"),
            workdir: self.dir.path().join("work/t1.1"),
            timeout: None,
            kill_grace: Duration::from_millis(300),
        }
    }

    pub fn output(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("runs/r1/job.t1.1.log")).unwrap()
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// True if process `pid` exists and is not a zombie.
pub fn is_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // A zombie is dead; `pid (comm) S ...`, comm may contain spaces.
        Ok(stat) => !stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z')),
        Err(_) => false,
    }
}

/// Waits up to 10 s for `f`.
pub fn wait_until(what: &str, f: impl FnMut() -> bool) {
    wait_within(what, Duration::from_secs(10), f);
}

/// Waits up to `limit` for `f`, polling every 10 ms.
pub fn wait_within(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The pid a command wrote to `path` (waits for the file to be complete).
pub fn read_pid(path: &Path) -> i32 {
    let mut pid = 0;
    wait_until(&format!("a pid in {}", path.display()), || {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        match text.strip_suffix('\n').map(str::parse) {
            Some(Ok(p)) => {
                pid = p;
                true
            }
            _ => false,
        }
    });
    pid
}

/// Sends `signal` (`-9`, `-TERM`, ...) to `pid` with the shell's built-in `kill`, keeping
/// unsafe code out of tests and needing no `kill` binary.
pub fn send_signal(signal: &str, pid: i32) {
    let status = std::process::Command::new("/bin/sh")
        .args(["-c", &format!("kill {signal} {pid}")])
        .status()
        .unwrap();
    assert!(status.success(), "kill {signal} {pid}");
}

/// Sends SIGKILL to `pid`.
pub fn kill_9(pid: i32) {
    send_signal("-9", pid);
}

/// Writes `jobs.d/jobs.yaml` under `root` with `jobs` (YAML list items, indented).
pub fn write_jobs(root: &Path, jobs: &str) {
    let dir = root.join("jobs.d");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("jobs.yaml"), format!("jobs:\n{jobs}")).unwrap();
}

/// A worker configuration under `root`, for `broker`, named `w1`.
pub fn worker_config(root: &Path, broker: &BrokerAddr) -> Config {
    let mut config = Config::new(broker.clone(), "w1".into());
    config.jobs_dir = root.join("jobs.d");
    config.spool = root.join("spool");
    config.log_dir = root.join("log");
    config.step_program = step_binary();
    config.heartbeat = Duration::from_millis(300);
    config.kill_grace = Duration::from_millis(300);
    config.slots = 2;
    config
}

/// `worker.log` under `root`, or empty.
pub fn worker_log(root: &Path) -> String {
    std::fs::read_to_string(root.join("log/worker.log")).unwrap_or_default()
}

/// The results the worker's spool under `root` holds, as `<task id>.<attempt>`.
pub fn outbox(root: &Path) -> Vec<String> {
    worker::spool::pending_results(&root.join("spool"))
        .unwrap()
        .into_iter()
        .map(|task| format!("{}.{}", task.task_id, task.attempt))
        .collect()
}

/// A worker running in this process; stopped (drained) on [`InProcessWorker::stop`] or drop.
pub struct InProcessWorker {
    stop: Sender<()>,
    thread: Option<JoinHandle<anyhow::Result<()>>>,
}

impl InProcessWorker {
    pub fn start(config: Config) -> InProcessWorker {
        let (stop, shutdown) = bounded(1);
        let thread = std::thread::spawn(move || worker::run(config, shutdown));
        InProcessWorker {
            stop,
            thread: Some(thread),
        }
    }

    /// Asks the worker to stop and waits for it.
    pub fn stop(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        let _ = self.stop.try_send(());
        if let Some(thread) = self.thread.take() {
            let result = thread.join().expect("the worker thread panicked");
            result.expect("the worker failed");
        }
    }
}

impl Drop for InProcessWorker {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            self.stop_and_join();
        } else {
            let _ = self.stop.try_send(());
        }
    }
}

/// One step's work for `worker` on `job`: one assignment, attempt `attempt`.
pub fn work(job: &str, task_id: &str, attempt: u32, worker: &str) -> Work {
    Work {
        run_id: format!("run-{task_id}"),
        step_id: format!("step-{task_id}"),
        job: job.into(),
        params: Default::default(),
        assignments: vec![Assignment {
            worker: worker.into(),
            task: TaskRef {
                task_id: task_id.into(),
                attempt,
            },
        }],
    }
}

enum BrokerCommand {
    Publish(Work),
    Offer(Work),
    Stop,
}

#[derive(Default)]
struct BrokerState {
    received: Vec<Envelope>,
    ack_results: bool,
}

/// Enough of a broker for a worker: welcomes it, acknowledges heartbeats and started
/// notices (results only when told to), records every message, and publishes work,
/// re-publishing "offered" assignments every 100 ms until the worker reports them started
/// or finished, like the real broker.
pub struct FakeBroker {
    pub addr: BrokerAddr,
    commands: Sender<BrokerCommand>,
    state: Arc<Mutex<BrokerState>>,
    thread: Option<JoinHandle<()>>,
}

impl FakeBroker {
    pub fn start(ack_results: bool) -> FakeBroker {
        let ctx = zmq::Context::new();
        let publisher = ctx.socket(zmq::PUB).unwrap();
        let pull = ctx.socket(zmq::PULL).unwrap();
        publisher.set_linger(0).unwrap();
        pull.set_linger(0).unwrap();
        let mut seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
            ^ std::process::id();
        let base = loop {
            seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            let base = 20_000 + (seed >> 8) % 40_000;
            if publisher.bind(&format!("tcp://127.0.0.1:{base}")).is_err() {
                continue;
            }
            if pull.bind(&format!("tcp://127.0.0.1:{}", base + 1)).is_ok() {
                break base;
            }
            publisher
                .unbind(&format!("tcp://127.0.0.1:{base}"))
                .unwrap();
        };
        let addr: BrokerAddr = format!("127.0.0.1:{base}").parse().unwrap();
        let state = Arc::new(Mutex::new(BrokerState {
            received: Vec::new(),
            ack_results,
        }));
        let (commands, command_rx) = unbounded();
        let thread_state = state.clone();
        let thread = std::thread::spawn(move || {
            broker_loop(&publisher, &pull, &command_rx, &thread_state);
            drop(ctx);
        });
        FakeBroker {
            addr,
            commands,
            state,
            thread: Some(thread),
        }
    }

    /// Publishes `work` once.
    pub fn publish(&self, work: Work) {
        self.commands.send(BrokerCommand::Publish(work)).unwrap();
    }

    /// Publishes `work` now and again every 100 ms while any of its assignments is
    /// neither started nor finished.
    pub fn offer(&self, work: Work) {
        self.commands.send(BrokerCommand::Offer(work)).unwrap();
    }

    pub fn set_ack_results(&self, ack: bool) {
        self.state.lock().unwrap().ack_results = ack;
    }

    pub fn finished(&self) -> Vec<TaskFinished> {
        self.received(|m| match m {
            Message::TaskFinished(f) => Some(f.clone()),
            _ => None,
        })
    }

    pub fn started(&self) -> Vec<TaskStarted> {
        self.received(|m| match m {
            Message::TaskStarted(s) => Some(s.clone()),
            _ => None,
        })
    }

    /// Results for `task_id` and the ids of the messages that carried them.
    pub fn finished_messages(&self, task_id: &str) -> Vec<(String, TaskFinished)> {
        let state = self.state.lock().unwrap();
        state
            .received
            .iter()
            .filter_map(|e| match &e.body {
                Message::TaskFinished(f) if f.task.task_id == task_id => {
                    Some((e.id.clone(), f.clone()))
                }
                _ => None,
            })
            .collect()
    }

    /// Waits for a result of `task_id` and returns the first.
    pub fn wait_finished(&self, task_id: &str) -> TaskFinished {
        let mut found = None;
        wait_until(&format!("a result for {task_id}"), || {
            found = self
                .finished()
                .into_iter()
                .find(|f| f.task.task_id == task_id);
            found.is_some()
        });
        found.unwrap()
    }

    fn received<T>(&self, f: impl Fn(&Message) -> Option<T>) -> Vec<T> {
        let state = self.state.lock().unwrap();
        state.received.iter().filter_map(|e| f(&e.body)).collect()
    }
}

impl Drop for FakeBroker {
    fn drop(&mut self) {
        let _ = self.commands.send(BrokerCommand::Stop);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn broker_loop(
    publisher: &zmq::Socket,
    pull: &zmq::Socket,
    commands: &Receiver<BrokerCommand>,
    state: &Mutex<BrokerState>,
) {
    let publish = |work: &Work| {
        let frame =
            envelope::encode(&Envelope::new("broker", Message::Work(work.clone()))).unwrap();
        publisher
            .send_multipart([Topic::Job(work.job.clone()).to_bytes(), frame], 0)
            .unwrap();
    };
    let reply = |to: &Envelope, body: ReplyBody| {
        let message = Message::Reply(Reply {
            in_reply_to: to.id.clone(),
            body,
        });
        let frame = envelope::encode(&Envelope::new("broker", message)).unwrap();
        publisher
            .send_multipart([Topic::Node(to.sender.clone()).to_bytes(), frame], 0)
            .unwrap();
    };
    let mut offers: Vec<Work> = Vec::new();
    let mut next_offer = Instant::now();
    loop {
        while let Ok(command) = commands.try_recv() {
            match command {
                BrokerCommand::Publish(work) => publish(&work),
                BrokerCommand::Offer(work) => {
                    publish(&work);
                    offers.push(work);
                }
                BrokerCommand::Stop => return,
            }
        }
        if pull.poll(zmq::POLLIN, 10).unwrap_or(0) > 0 {
            while let Ok(frame) = pull.recv_bytes(zmq::DONTWAIT) {
                let Ok(env) = envelope::decode(&frame) else {
                    continue;
                };
                let answer = match &env.body {
                    Message::Hello { .. } => Some(ReplyBody::Welcome {
                        broker_instance: "fake".into(),
                    }),
                    Message::Heartbeat(_) | Message::TaskStarted(_) => Some(ReplyBody::Ack),
                    Message::TaskFinished(_) if state.lock().unwrap().ack_results => {
                        Some(ReplyBody::Ack)
                    }
                    _ => None,
                };
                if let Some(answer) = answer {
                    reply(&env, answer);
                }
                if !matches!(env.body, Message::Hello { .. }) {
                    state.lock().unwrap().received.push(env);
                }
            }
        }
        if Instant::now() >= next_offer {
            next_offer = Instant::now() + Duration::from_millis(100);
            let reported: HashSet<TaskRef> = {
                let state = state.lock().unwrap();
                state
                    .received
                    .iter()
                    .filter_map(|e| match &e.body {
                        Message::TaskStarted(s) => Some(s.task.clone()),
                        Message::TaskFinished(f) => Some(f.task.clone()),
                        _ => None,
                    })
                    .collect()
            };
            offers.retain(|w| w.assignments.iter().any(|a| !reported.contains(&a.task)));
            for work in &offers {
                publish(work);
            }
        }
    }
}
