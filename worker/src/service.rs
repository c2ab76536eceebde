//! The worker's loop: the thin shell around [`Scheduler`] that owns the broker link, the job
//! directory, the worker log and the threads that run commands.
//!
//! One thread (the caller's) selects over four channels: publications from the broker
//! (work), events from the command threads (started, finished), a tick (job-file refresh,
//! heartbeats, acknowledgements) and the shutdown trigger. Commands run on a thread each
//! ([`runner::run`]), so the loop never waits for a process.
//!
//! The loop writes the [`Spool`] before it acts: an attempt is recorded (seen, running)
//! before its command starts, and a result is in the outbox before it is first sent; the
//! outbox entry goes when the broker acknowledges it. At start, the spool's outbox is sent
//! again and attempts it finds running are reported lost.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use crossbeam_channel::{bounded, never, select, tick, unbounded, Receiver, Sender, TryRecvError};
use jobz::client::{Client, ClientConfig, ClientError};
use jobz::envelope::Envelope;
use jobz::jobfile::{JobDir, Refresh};
use jobz::message::{Message, ReplyBody, Role, TaskFinished, TaskRef, TaskStarted, WorkerStatus};
use jobz::topic::Topic;
use tracing::{debug, error, info, info_span, warn, Span};

use crate::config::Config;
use crate::eventlog::{self, EventLog};
use crate::live_output::{self, OutputShipper};
use crate::retention::{self, InUse, OutputRetention, Pruned};
use crate::runner::{self, RunResult, RunSpec, Stop};
use crate::schedule::{is_valid_id, Action, Scheduler, ServedJob, Task};
use crate::spool::{self, OutboxEntry, Recovered, RunningEntry, Spool};
use crate::supervisor::StepSupervisor;

/// How often the loop wakes without any message.
const TICK: Duration = Duration::from_millis(100);
/// How often `--jobs-dir` is looked at for changed files.
const JOBS_REFRESH: Duration = Duration::from_secs(1);
/// How long the broker link keeps resending a result until the broker acknowledges it:
/// a broker restart, however long, must not lose a result.
const RESULT_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// The same for "started" notices, which matter less once the result is in.
const STARTED_TIMEOUT: Duration = Duration::from_secs(3600);
/// At shutdown, how long after SIGKILL to wait for a command thread before giving up on it.
const REAP_WAIT: Duration = Duration::from_secs(5);
/// The error of tasks killed because the worker stops.
pub const SHUTDOWN_ERROR: &str = "worker shut down";
/// The error of a task withdrawn before it started because its run was cancelled.
pub const WITHDRAWN_ERROR: &str = "the run was cancelled before the task started";
/// The `worker.log` event of a queued task given back at shutdown.
pub const HANDED_BACK_EVENT: &str = "handed back: not started before shutdown";

/// Runs the worker until `shutdown` receives a message (or its sender is dropped): loads
/// the jobs, connects, serves work, then drains. Errors only if it cannot start.
pub fn run(config: Config, shutdown: Receiver<()>) -> anyhow::Result<()> {
    config.validate()?;
    // Started now, on this thread, which lives as long as the worker: its parent-death
    // signal then means the worker's end, and a broken installation shows at once.
    let steps = StepSupervisor::new(config.step_program.clone());
    steps.ensure_started().map_err(anyhow::Error::msg)?;
    let (spool, recovered) = Spool::open(&config.spool, jobz::now_ms())
        .with_context(|| format!("opening the spool {}", config.spool.display()))?;
    let work_root = config.spool.join("work");
    std::fs::create_dir_all(&work_root)
        .with_context(|| format!("creating spool directory {}", work_root.display()))?;
    clear_stale_workdirs(&work_root);
    let runs = config.log_dir.join("runs");
    std::fs::create_dir_all(&runs)
        .with_context(|| format!("creating output directory {}", runs.display()))?;
    let log = EventLog::open(&config.log_dir, &config.name, config.worker_log_format)?;
    let mut jobs = JobDir::new(&config.jobs_dir);
    let first = jobs
        .refresh()
        .with_context(|| format!("reading jobs dir {}", config.jobs_dir.display()))?;
    let mut client_config =
        ClientConfig::new(config.broker.clone(), config.node_id(), Role::Worker);
    client_config.identity = config.identity.clone();
    let client = Client::start(client_config)
        .with_context(|| format!("connecting to the broker at {}", config.broker))?;

    let (events_tx, events) = unbounded();
    let mut service = Service {
        instance: jobz::new_id(),
        scheduler: Scheduler::new(config.name.clone(), config.slots as usize),
        spool,
        steps,
        config,
        client,
        jobs,
        served: BTreeMap::new(),
        jobs_dir_readable: true,
        log,
        events_tx,
        events,
        running: HashMap::new(),
        outputs_in_use: Arc::default(),
        pruned: Arc::default(),
        acks: Vec::new(),
        heartbeat_reply: None,
        heartbeat_sent_at: Instant::now(),
        broker_answering: None,
        next_heartbeat: Instant::now(),
        next_refresh: Instant::now() + JOBS_REFRESH,
    };
    info!(
        worker = %service.config.name,
        instance = %service.instance,
        broker = %service.config.broker,
        slots = service.config.slots,
        jobs_dir = %service.config.jobs_dir.display(),
        version = jobz::VERSION,
        "worker starting"
    );
    service.recover(recovered);
    // After the recovery, which reads the output of attempts found running.
    let (stop_pruning, pruning_stopped) = bounded(1);
    let retention = OutputRetention {
        log_dir: service.config.log_dir.clone(),
        spool: service.config.spool.clone(),
        keep: service.config.output_retention,
        every: service.config.prune_every,
    };
    let in_use = service.outputs_in_use.clone();
    let pruner = match retention::spawn(retention, in_use, service.pruned.clone(), pruning_stopped)
    {
        Ok(pruner) => pruner,
        Err(e) => {
            service.client.shutdown();
            return Err(e);
        }
    };
    service.on_refresh(first);
    if service.served.is_empty() {
        warn!(jobs_dir = %service.config.jobs_dir.display(), "this worker serves no jobs yet");
    }
    if service.heartbeat_reply.is_none() {
        service.heartbeat(); // unless loading the jobs just sent one
    }
    let result = service.serve(shutdown);
    service.client.shutdown();
    drop(stop_pruning);
    if pruner.join().is_err() {
        error!("the output retention thread panicked");
    }
    result
}

/// What a command thread tells the loop.
enum RunnerEvent {
    Started {
        task: TaskRef,
        at_ms: i64,
        /// Where the attempt's output begins in its file.
        output_offset: u64,
    },
    Finished {
        task: TaskRef,
        result: RunResult,
    },
}

struct Running {
    task: Task,
    /// Held in `outputs_in_use` until the task ends.
    output: PathBuf,
    stop: Sender<Stop>,
    started_at_ms: Option<i64>,
    /// Ships the output to the broker while the step runs (from its start).
    shipper: Option<OutputShipper>,
}

/// A message the broker has yet to acknowledge.
struct PendingAck {
    what: Pending,
    task: Task,
    reply: Receiver<Result<ReplyBody, ClientError>>,
}

/// What a [`PendingAck`] waits for.
enum Pending {
    Started,
    /// A result, kept to be sent again if the broker link gives up on it (its outbox entry
    /// is removed when the broker acknowledges it).
    Finished(Box<TaskFinished>),
}

impl Pending {
    fn name(&self) -> &'static str {
        match self {
            Pending::Started => "TaskStarted",
            Pending::Finished(_) => "TaskFinished",
        }
    }
}

/// Where a stopping worker is.
struct Drain {
    deadline: Instant,
    killed_at: Option<Instant>,
}

struct Service {
    config: Config,
    instance: String,
    client: Client,
    jobs: JobDir,
    served: BTreeMap<String, ServedJob>,
    jobs_dir_readable: bool,
    scheduler: Scheduler,
    spool: Spool,
    /// Starts every step's command (see [`crate::supervisor`]).
    steps: Arc<StepSupervisor>,
    log: EventLog,
    events_tx: Sender<RunnerEvent>,
    events: Receiver<RunnerEvent>,
    running: HashMap<TaskRef, Running>,
    /// Outputs of running tasks, which the output retention leaves alone.
    outputs_in_use: Arc<InUse>,
    /// What the output retention removed, for the heartbeats.
    pruned: Arc<Pruned>,
    acks: Vec<PendingAck>,
    heartbeat_reply: Option<Receiver<Result<ReplyBody, ClientError>>>,
    heartbeat_sent_at: Instant,
    broker_answering: Option<bool>,
    next_heartbeat: Instant,
    next_refresh: Instant,
}

impl Service {
    fn serve(&mut self, shutdown: Receiver<()>) -> anyhow::Result<()> {
        let publications = self.client.publications().clone();
        let events = self.events.clone();
        let ticker = tick(TICK);
        let mut shutdown = shutdown;
        let mut drain: Option<Drain> = None;
        loop {
            select! {
                recv(shutdown) -> _ => {
                    shutdown = never();
                    drain = Some(self.begin_drain());
                }
                recv(publications) -> publication => match publication {
                    Ok((topic, envelope)) => self.on_publication(topic, envelope),
                    Err(_) => bail!("the broker link stopped"),
                },
                recv(events) -> event => {
                    if let Ok(event) = event {
                        self.on_runner_event(event);
                    }
                }
                recv(ticker) -> _ => self.on_tick(Instant::now()),
            }
            if let Some(drain) = &mut drain {
                if self.running.is_empty() {
                    break;
                }
                let now = Instant::now();
                match drain.killed_at {
                    None if now >= drain.deadline => {
                        warn!(
                            running = self.running.len(),
                            "drain timeout: killing the commands still running"
                        );
                        for running in self.running.values() {
                            let _ = running.stop.try_send(Stop::Fail(SHUTDOWN_ERROR.to_owned()));
                        }
                        drain.killed_at = Some(now);
                    }
                    Some(at) if now >= at + self.config.kill_grace + REAP_WAIT => {
                        self.abandon_running();
                        break;
                    }
                    _ => {}
                }
            }
        }
        // Its last heartbeat: leaving with nothing running, so the broker forgets it.
        self.heartbeat();
        self.wait_for_acks(self.config.ack_wait);
        info!("worker stopped");
        Ok(())
    }

    // ---- Work ---------------------------------------------------------------------------

    fn on_publication(&mut self, topic: Topic, envelope: Envelope) {
        match (topic, envelope.body) {
            (Topic::Job(job), Message::Work(work)) => {
                if work.job != job {
                    warn!(topic = %job, job = %eventlog::field(&work.job), "dropping work whose job differs from its topic");
                    return;
                }
                let actions = self.scheduler.on_work(&work, &self.served);
                self.apply(actions);
            }
            (Topic::Job(job), Message::CancelWork(cancel)) => {
                if cancel.job != job {
                    warn!(topic = %job, job = %eventlog::field(&cancel.job), "dropping a cancel whose job differs from its topic");
                    return;
                }
                let actions = self.scheduler.on_cancel(&cancel);
                self.apply(actions);
            }
            (topic, body) => debug!(%topic, message = ?body, "ignoring a publication"),
        }
    }

    fn apply(&mut self, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::Received(task) => {
                    let _span = task_span(&task).entered();
                    info!("task received");
                    self.log.append(&task, "received");
                }
                Action::Start(task) => self.start(task),
                Action::Fail { task, error } => {
                    task_span(&task).in_scope(|| warn!(%error, "task refused"));
                    if let Err(e) = self.spool.mark_seen(&task.task, jobz::now_ms()) {
                        // Refusing it again after a restart would be harmless.
                        task_span(&task).in_scope(|| {
                            warn!(error = %format!("{e:#}"), "cannot record the refused attempt in the spool")
                        });
                    }
                    self.finish(&task, RunResult::not_started(error));
                }
                Action::Kill(task_ref) => {
                    if let Some(running) = self.running.get(&task_ref) {
                        task_span(&running.task)
                            .in_scope(|| info!("run cancelled: killing the task's process group"));
                        // Full: a stop is already on its way (a cancel published again).
                        let _ = running.stop.try_send(Stop::Cancel);
                    }
                }
                Action::Withdraw(task) => {
                    task_span(&task).in_scope(|| info!("run cancelled: task withdrawn unstarted"));
                    if let Err(e) = self.spool.mark_seen(&task.task, jobz::now_ms()) {
                        task_span(&task).in_scope(|| {
                            warn!(error = %format!("{e:#}"), "cannot record the withdrawn attempt in the spool")
                        });
                    }
                    let mut result = RunResult::not_started(WITHDRAWN_ERROR.to_owned());
                    result.outcome = jobz::message::TaskOutcome::Cancelled;
                    self.finish(&task, result);
                }
            }
        }
    }

    fn start(&mut self, task: Task) {
        let spec = match self.run_spec(&task) {
            Ok(spec) => spec,
            Err(error) => {
                task_span(&task).in_scope(|| warn!(%error, "task refused"));
                self.finish(&task, RunResult::not_started(error));
                let actions = self.scheduler.on_finished(&task.task);
                self.apply(actions);
                return;
            }
        };
        // Durably seen and running before anything runs: after a crash, the attempt is
        // neither run again nor forgotten.
        let entry = RunningEntry {
            run_id: task.run_id.clone(),
            step_id: task.step_id.clone(),
            job: task.job.clone(),
            task: task.task.clone(),
            worker: self.config.name.clone(),
            started_at_ms: jobz::now_ms(),
        };
        if let Err(e) = self.spool.start(&entry, entry.started_at_ms) {
            let error = format!("cannot record the attempt in the worker's spool: {e:#}");
            task_span(&task).in_scope(|| error!(%error, "not running the task"));
            self.finish(&task, RunResult::not_started(error));
            let actions = self.scheduler.on_finished(&task.task);
            self.apply(actions);
            return;
        }
        let output = spec.output.clone();
        self.outputs_in_use.hold(&output);
        let (stop, stopped) = bounded(1);
        let events = self.events_tx.clone();
        let task_ref = task.task.clone();
        let span = task_span(&task);
        let thread = std::thread::Builder::new()
            .name(format!("task-{}", task.task.task_id))
            .spawn(move || {
                let _span = span.entered();
                let started = task_ref.clone();
                let result = runner::run(&spec, &stopped, |at_ms, output_offset| {
                    let _ = events.send(RunnerEvent::Started {
                        task: started,
                        at_ms,
                        output_offset,
                    });
                });
                let _ = events.send(RunnerEvent::Finished {
                    task: task_ref,
                    result,
                });
            });
        match thread {
            Ok(_) => {
                self.running.insert(
                    task.task.clone(),
                    Running {
                        task,
                        output,
                        stop,
                        started_at_ms: None,
                        shipper: None,
                    },
                );
            }
            Err(e) => {
                self.outputs_in_use.release(&output);
                task_span(&task)
                    .in_scope(|| error!(error = %e, "cannot start a thread for the task"));
                self.finish(
                    &task,
                    RunResult::not_started(format!("cannot start a thread: {e}")),
                );
                let actions = self.scheduler.on_finished(&task.task);
                self.apply(actions);
            }
        }
    }

    /// How to run `task`, or why it cannot be run (a path would not be safe).
    fn run_spec(&self, task: &Task) -> Result<RunSpec, String> {
        Ok(RunSpec {
            command: task.command.clone(),
            steps: self.steps.clone(),
            env: self.task_env(task),
            env_allow: self.config.env_allow.clone(),
            run_as: task
                .run_as
                .clone()
                .or_else(|| self.config.default_run_as.clone()),
            max_output: self.config.max_step_output,
            output: output_path(&self.config.log_dir, task)?,
            workdir: workdir_path(&self.config.spool, task)?,
            timeout: task.timeout,
            kill_grace: self.config.kill_grace,
        })
    }

    /// The task's variables (see SPEC "Job files"), added to the allow-listed environment
    /// ([`runner::step_env`]).
    fn task_env(&self, task: &Task) -> Vec<(String, String)> {
        let mut env = vec![
            ("JOBZ_RUN_ID".to_owned(), task.run_id.clone()),
            ("JOBZ_STEP_ID".to_owned(), task.step_id.clone()),
            ("JOBZ_TASK_ID".to_owned(), task.task.task_id.clone()),
            ("JOBZ_JOB".to_owned(), task.job.clone()),
            ("JOBZ_WORKER".to_owned(), self.config.name.clone()),
            ("JOBZ_ATTEMPT".to_owned(), task.task.attempt.to_string()),
            ("JOBZ_FRONTEND".to_owned(), self.config.frontend.clone()),
        ];
        for (name, value) in &task.params {
            match param_env_name(name) {
                Some(var) => env.push((var, value.clone())),
                None => warn!(
                    parameter = %eventlog::field(name),
                    "parameter name cannot be an environment variable; not exported"
                ),
            }
        }
        env
    }

    fn on_runner_event(&mut self, event: RunnerEvent) {
        match event {
            RunnerEvent::Started {
                task,
                at_ms,
                output_offset,
            } => {
                let Some(running) = self.running.get_mut(&task) else {
                    return;
                };
                running.started_at_ms = Some(at_ms);
                running.shipper = Some(OutputShipper::new(running.output.clone(), output_offset));
                let task = running.task.clone();
                let _span = task_span(&task).entered();
                info!("task started");
                self.log.append(&task, "started");
                let reply = self.client.request_async(
                    Message::TaskStarted(TaskStarted {
                        task: task.task.clone(),
                        worker: self.config.name.clone(),
                        instance: self.instance.clone(),
                        started_at_ms: at_ms,
                    }),
                    STARTED_TIMEOUT,
                );
                self.acks.push(PendingAck {
                    what: Pending::Started,
                    task,
                    reply,
                });
            }
            RunnerEvent::Finished { task, result } => {
                let Some(mut running) = self.running.remove(&task) else {
                    return;
                };
                // A step followed live gets the rest of its output shipped before its
                // result, so a follower reads it whole and in order; a short step's output
                // travels in the result's tail alone.
                if let Some(shipper) = running.shipper.as_mut().filter(|s| s.has_shipped()) {
                    self.ship_output(&running.task, shipper, usize::MAX, true);
                }
                self.outputs_in_use.release(&running.output);
                self.finish(&running.task, result);
                let actions = self.scheduler.on_finished(&task);
                self.apply(actions);
            }
        }
    }

    /// Logs the end of a task and reports it to the broker until acknowledged.
    fn finish(&mut self, task: &Task, result: RunResult) {
        let event = eventlog::finished_event(&result);
        {
            let _span = task_span(task).entered();
            match result.outcome {
                jobz::message::TaskOutcome::Succeeded => info!(
                    exit_code = result.exit_code,
                    elapsed_ms = result.elapsed.as_millis() as u64,
                    "task finished"
                ),
                _ => warn!(
                    outcome = ?result.outcome,
                    exit_code = result.exit_code,
                    error = result.error.as_deref().unwrap_or(""),
                    elapsed_ms = result.elapsed.as_millis() as u64,
                    "task failed"
                ),
            }
        }
        self.log.append(task, &event);
        let entry = OutboxEntry {
            run_id: task.run_id.clone(),
            step_id: task.step_id.clone(),
            job: task.job.clone(),
            result: TaskFinished {
                task: task.task.clone(),
                worker: self.config.name.clone(),
                outcome: result.outcome,
                exit_code: result.exit_code,
                error: result.reported_error(),
                started_at_ms: result.started_at_ms,
                finished_at_ms: result.finished_at_ms,
                output_tail: result.output_tail,
            },
        };
        self.report(task.clone(), entry);
    }

    /// Puts a result in the spool's outbox, then sends it until the broker acknowledges it.
    fn report(&mut self, task: Task, entry: OutboxEntry) {
        if let Err(e) = self.spool.put_result(&entry) {
            task_span(&task).in_scope(|| {
                error!(
                    error = %format!("{e:#}"),
                    "cannot write the result to the spool; sending it anyway, but it is lost \
                     if the worker stops before the broker acknowledges it"
                )
            });
        }
        self.send_result(task, entry.result);
    }

    fn send_result(&mut self, task: Task, result: TaskFinished) {
        let reply = self
            .client
            .request_async(Message::TaskFinished(result.clone()), RESULT_TIMEOUT);
        self.acks.push(PendingAck {
            what: Pending::Finished(Box::new(result)),
            task,
            reply,
        });
    }

    // ---- Restart --------------------------------------------------------------------------

    /// Takes over what the spool remembers from an earlier run of this worker.
    fn recover(&mut self, recovered: Recovered) {
        let Recovered {
            seen,
            running,
            outbox,
            set_aside,
        } = recovered;
        if !seen.is_empty() || !running.is_empty() || !outbox.is_empty() || !set_aside.is_empty() {
            info!(
                seen = seen.len(),
                lost = running.len(),
                unacknowledged = outbox.len(),
                set_aside = set_aside.len(),
                spool = %self.config.spool.display(),
                "spool loaded"
            );
        }
        for task in seen {
            self.scheduler.remember(task);
        }
        for entry in outbox {
            let task = spooled_task(
                &entry.run_id,
                &entry.step_id,
                &entry.job,
                &entry.result.task,
            );
            task_span(&task).in_scope(|| info!("resending a result kept in the spool"));
            self.scheduler.remember(task.task.clone());
            self.send_result(task, entry.result);
        }
        for entry in running {
            let task = spooled_task(&entry.run_id, &entry.step_id, &entry.job, &entry.task);
            task_span(&task).in_scope(|| {
                warn!(started_at = %jobz::format_time_ms(entry.started_at_ms),
                    "attempt lost: the worker stopped while the task ran")
            });
            self.scheduler.remember(task.task.clone());
            self.log.append(&task, spool::LOST_EVENT);
            let tail = output_path(&self.config.log_dir, &task)
                .map(|path| runner::output_tail(&path, 0))
                .unwrap_or_default();
            let lost = spool::lost_result(&entry, tail, jobz::now_ms());
            self.report(task, lost);
        }
    }

    // ---- Periodic -----------------------------------------------------------------------

    /// Sends what `shipper` has of the task's output beyond what it sent (see
    /// [`live_output`]); nothing while the link to the broker is down.
    fn ship_output(&self, task: &Task, shipper: &mut OutputShipper, max: usize, ended: bool) {
        if !self.client.is_connected() {
            return;
        }
        match shipper.pieces(&task.task, &self.config.name, max, ended) {
            Ok(pieces) => {
                for piece in pieces {
                    self.client.send(Message::TaskOutput(piece));
                }
            }
            // Not there yet, or unreadable: the result's tail still carries the end.
            Err(e) => {
                task_span(task).in_scope(|| debug!(error = %e, "cannot read the output to ship"))
            }
        }
    }

    fn ship_running_output(&mut self) {
        let mut running = std::mem::take(&mut self.running);
        for entry in running.values_mut() {
            if let Some(shipper) = entry.shipper.as_mut() {
                self.ship_output(&entry.task, shipper, live_output::PIECES_PER_TICK, false);
            }
        }
        self.running = running;
    }

    fn on_tick(&mut self, now: Instant) {
        self.ship_running_output();
        self.poll_acks();
        self.poll_heartbeat(false);
        if now >= self.next_refresh && !self.scheduler.is_draining() {
            self.next_refresh = now + JOBS_REFRESH;
            match self.jobs.refresh() {
                Ok(report) => {
                    if !self.jobs_dir_readable {
                        info!(jobs_dir = %self.config.jobs_dir.display(), "the jobs dir is readable again");
                        self.jobs_dir_readable = true;
                    }
                    self.on_refresh(report);
                }
                Err(e) => {
                    if self.jobs_dir_readable {
                        error!(
                            jobs_dir = %self.config.jobs_dir.display(),
                            error = %e,
                            "cannot read the jobs dir; the jobs loaded stay in force"
                        );
                        self.jobs_dir_readable = false;
                    }
                }
            }
        }
        if now >= self.next_heartbeat {
            self.heartbeat();
        }
    }

    fn on_refresh(&mut self, report: Refresh) {
        for rejected in &report.rejected {
            error!("job file rejected, its previous good version (if any) stays: {rejected}");
            self.log.note(&format!(
                "job file rejected, its previous good version (if any) stays: {rejected}"
            ));
        }
        if !report.changed() {
            return;
        }
        let (set, conflicts) = self.jobs.job_set();
        for conflict in &conflicts {
            error!("{conflict}");
            self.log.note(&conflict.to_string());
        }
        let mut new = BTreeMap::new();
        for (name, spec) in set.jobs {
            // Compiled once per definition: an unchanged job keeps what it has.
            let served = match self.served.get(&name) {
                Some(old) if old.spec == spec => Ok(old.clone()),
                _ => ServedJob::new(spec),
            };
            match served {
                Ok(job) => {
                    new.insert(name, job);
                }
                // The file was checked when it was read; say so if that ever changes.
                Err(e) => error!(job = %name, "job not served: {e}"),
            }
        }
        let mut changed = false;
        for name in self.served.keys().filter(|n| !new.contains_key(*n)) {
            info!(job = %name, "no longer serving job");
            self.client.unsubscribe(Topic::Job(name.clone()));
            changed = true;
        }
        for (name, job) in &new {
            match self.served.get(name) {
                None => {
                    info!(job = %name, "serving job");
                    self.client.subscribe(Topic::Job(name.clone()));
                    changed = true;
                }
                Some(old) if old.spec != job.spec => {
                    info!(job = %name, "job definition changed");
                    changed = true;
                }
                Some(_) => {}
            }
        }
        self.served = new;
        if changed {
            self.heartbeat();
        }
    }

    fn heartbeat(&mut self) {
        self.poll_heartbeat(true);
        let status = WorkerStatus {
            name: self.config.name.clone(),
            instance: self.instance.clone(),
            jobs: self.served.values().map(|job| job.spec.clone()).collect(),
            capabilities: self.config.capabilities.clone(),
            slots: self.config.slots,
            running: self.scheduler.running(),
            leaving: self.scheduler.is_draining(),
            version: jobz::VERSION.to_owned(),
            counters: self
                .pruned
                .counters()
                .into_iter()
                .map(|(name, n)| (name.to_owned(), n))
                .collect(),
        };
        self.heartbeat_reply = Some(
            self.client
                .request_async(Message::Heartbeat(status), self.config.heartbeat),
        );
        self.heartbeat_sent_at = Instant::now();
        self.next_heartbeat = self.heartbeat_sent_at + self.config.heartbeat;
    }

    /// Looks at the last heartbeat's answer; `replacing` means a new one is about to go out,
    /// so no answer within a heartbeat interval counts as none (an earlier replacement, after
    /// a change of jobs, says nothing about the broker).
    fn poll_heartbeat(&mut self, replacing: bool) {
        let Some(reply) = &self.heartbeat_reply else {
            return;
        };
        let overdue = self.heartbeat_sent_at.elapsed() >= self.config.heartbeat;
        let answering = match reply.try_recv() {
            Ok(Ok(ReplyBody::Rejected { status, error })) => {
                warn!(status, %error, "the broker rejected a heartbeat");
                true
            }
            Ok(Ok(_)) => true,
            Ok(Err(ClientError::Encode(e))) => {
                error!(error = %e, "cannot send a heartbeat (too many jobs?)");
                false
            }
            Ok(Err(_)) => false,
            Err(TryRecvError::Empty) if !replacing => return,
            Err(TryRecvError::Empty) if !overdue => {
                self.heartbeat_reply = None;
                return;
            }
            Err(_) => false,
        };
        self.heartbeat_reply = None;
        if self.broker_answering != Some(answering) {
            if answering {
                info!(broker = %self.config.broker, "the broker acknowledges heartbeats");
            } else {
                warn!(broker = %self.config.broker, "the broker does not answer heartbeats; results are kept and resent");
            }
            self.broker_answering = Some(answering);
        }
    }

    fn poll_acks(&mut self) {
        let mut resend = Vec::new();
        for ack in std::mem::take(&mut self.acks) {
            let answer = match ack.reply.try_recv() {
                Err(TryRecvError::Empty) => {
                    self.acks.push(ack);
                    continue;
                }
                Ok(answer) => answer,
                // The link dropped the request (it is shutting down): a result stays in the
                // outbox for the next start.
                Err(TryRecvError::Disconnected) => continue,
            };
            let _span = task_span(&ack.task).entered();
            match (answer, ack.what) {
                (Ok(ReplyBody::Ack), Pending::Finished(result)) => {
                    self.spool.remove_result(&result.task);
                }
                (Ok(ReplyBody::Ack), Pending::Started) => {}
                (Ok(other), what) => {
                    // The broker answered, so it has the message; resending cannot change
                    // the answer.
                    warn!(message = what.name(), reply = ?other, "unexpected reply from the broker");
                    if let Pending::Finished(result) = what {
                        self.spool.remove_result(&result.task);
                    }
                }
                (Err(ClientError::Timeout(after)), Pending::Finished(result)) => {
                    warn!(after = %humantime::format_duration(after),
                        "the broker has not acknowledged a result; still sending it");
                    resend.push((ack.task, *result));
                }
                (Err(ClientError::Encode(e)), Pending::Finished(result)) => {
                    error!(error = %e, "a result cannot be encoded; setting it aside in the spool");
                    self.spool.set_aside_result(&result.task, &e);
                }
                (Err(ClientError::Closed), Pending::Finished(_)) => {}
                (Err(e), Pending::Started) => {
                    warn!(error = %e, "the broker never acknowledged that the task started");
                }
            }
        }
        for (task, result) in resend {
            self.send_result(task, result);
        }
    }

    // ---- Shutdown -----------------------------------------------------------------------

    fn begin_drain(&mut self) -> Drain {
        let dropped = self.scheduler.drain();
        info!(
            running = self.running.len(),
            queued = dropped.len(),
            drain_timeout = %humantime::format_duration(self.config.drain_timeout),
            "shutting down: taking no new work, waiting for running commands"
        );
        for task in &dropped {
            // Not recorded in the spool: the broker still counts the task as not started
            // and offers it again (to this worker when it is back), or gives it up when this
            // worker expires.
            task_span(task)
                .in_scope(|| info!("queued task handed back: not started before shutdown"));
            self.log.append(task, HANDED_BACK_EVENT);
        }
        // Tell the broker at once: it gives this worker nothing new from now on and takes
        // it off the live list (a broadcast triggered now does not wait for it).
        self.heartbeat();
        Drain {
            deadline: Instant::now() + self.config.drain_timeout,
            killed_at: None,
        }
    }

    /// Commands that did not end even after SIGKILL: report them lost and stop waiting.
    fn abandon_running(&mut self) {
        let running: Vec<Running> = self.running.drain().map(|(_, r)| r).collect();
        for r in running {
            error!(
                task_id = %r.task.task.task_id,
                "a command did not end after SIGKILL; reporting it failed"
            );
            let now = jobz::now_ms();
            let mut result = RunResult::not_started(SHUTDOWN_ERROR.to_owned());
            result.started_at_ms = r.started_at_ms.unwrap_or(now);
            self.finish(&r.task, result);
        }
    }

    fn wait_for_acks(&mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            self.poll_acks();
            self.poll_heartbeat(false);
            if self.acks.is_empty() && self.heartbeat_reply.is_none() {
                return;
            }
            if Instant::now() >= deadline {
                warn!(
                    unacknowledged = self.acks.len(),
                    results_in_outbox = self.spool.outbox_len(),
                    "stopping with messages the broker has not acknowledged; the results stay \
                     in the spool and are sent again at the next start"
                );
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// `JOBZ_PARAM_<NAME>`, or none if the name would not be a portable variable name.
fn param_env_name(name: &str) -> Option<String> {
    let upper = name.to_ascii_uppercase();
    let portable = !upper.is_empty()
        && upper
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_');
    portable.then(|| format!("JOBZ_PARAM_{upper}"))
}

/// `<log-dir>/runs/<run_id>/<job>.<task_id>.<attempt>.log`, refused unless every part is a
/// safe file name ([`runner::output_path`]).
fn output_path(log_dir: &Path, task: &Task) -> Result<PathBuf, String> {
    runner::output_path(
        log_dir,
        &task.run_id,
        &task.job,
        &task.task.task_id,
        task.task.attempt,
    )
}

/// `<spool>/work/<task_id>.<attempt>`, refused unless safe ([`runner::workdir_path`]).
fn workdir_path(spool: &Path, task: &Task) -> Result<PathBuf, String> {
    runner::workdir_path(spool, &task.task.task_id, task.task.attempt)
}

/// Working directories left by a worker that died mid-task are removed at start. Only
/// names this worker creates (`<task_id>.<attempt>`) are touched.
fn clear_stale_workdirs(work_root: &Path) {
    let Ok(entries) = std::fs::read_dir(work_root) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let ours = name
            .rsplit_once('.')
            .is_some_and(|(id, attempt)| is_valid_id(id) && attempt.parse::<u32>().is_ok());
        if !ours {
            continue;
        }
        let path = entry.path();
        match std::fs::remove_dir_all(&path) {
            Ok(()) => {
                info!(dir = %path.display(), "removed a working directory left by an earlier run")
            }
            Err(e) => {
                warn!(dir = %path.display(), error = %e, "cannot remove a stale working directory")
            }
        }
    }
}

/// A task rebuilt from the spool, for logs: no command or parameters.
fn spooled_task(run_id: &str, step_id: &str, job: &str, task: &TaskRef) -> Task {
    Task {
        run_id: run_id.to_owned(),
        step_id: step_id.to_owned(),
        job: job.to_owned(),
        task: task.clone(),
        params: Default::default(),
        command: String::new(),
        timeout: None,
        run_as: None,
    }
}

/// The fields every log line about a task carries.
fn task_span(task: &Task) -> Span {
    info_span!(
        "task",
        run_id = %eventlog::field(&task.run_id),
        step_id = %eventlog::field(&task.step_id),
        task_id = %eventlog::field(&task.task.task_id),
        attempt = task.task.attempt,
        job = %eventlog::field(&task.job),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_names_become_upper_case_variables() {
        assert_eq!(param_env_name("date").as_deref(), Some("JOBZ_PARAM_DATE"));
        assert_eq!(param_env_name("a_1").as_deref(), Some("JOBZ_PARAM_A_1"));
        assert_eq!(param_env_name("a-b"), None);
        assert_eq!(param_env_name("a=b"), None);
        assert_eq!(param_env_name(""), None);
    }

    #[test]
    fn paths_follow_the_documented_layout() {
        let task = Task {
            run_id: "r1".into(),
            step_id: "s1".into(),
            job: "build".into(),
            task: TaskRef {
                task_id: "t1".into(),
                attempt: 2,
            },
            params: Default::default(),
            command: String::new(),
            timeout: None,
            run_as: None,
        };
        assert_eq!(
            output_path(Path::new("/var/log/jobz"), &task),
            Ok(PathBuf::from("/var/log/jobz/runs/r1/build.t1.2.log"))
        );
        assert_eq!(
            workdir_path(Path::new("/var/lib/jobz/worker"), &task),
            Ok(PathBuf::from("/var/lib/jobz/worker/work/t1.2"))
        );
    }

    fn test_config(root: &Path) -> Config {
        // Nothing listens on port 1 of loopback: the worker runs without a broker.
        let mut config = Config::new("127.0.0.1:1".parse().unwrap(), "w1".into());
        config.jobs_dir = root.join("jobs.d");
        config.spool = root.join("spool");
        config.log_dir = root.join("log");
        config
    }

    #[test]
    fn a_missing_jobs_dir_stops_the_start_with_its_name() {
        let root = tempfile::tempdir().unwrap();
        let (_tx, shutdown) = bounded(1);
        let err = run(test_config(root.path()), shutdown).unwrap_err();
        assert!(format!("{err:#}").contains("jobs.d"), "{err:#}");
    }

    #[test]
    fn stops_on_the_shutdown_trigger_even_without_a_broker() {
        let root = tempfile::tempdir().unwrap();
        let config = test_config(root.path());
        std::fs::create_dir_all(&config.jobs_dir).unwrap();
        std::fs::create_dir_all(config.spool.join("work/stale-task.1")).unwrap();
        let (tx, shutdown) = bounded(1);
        let started = Instant::now();
        let worker = std::thread::spawn(move || run(config, shutdown));
        tx.send(()).unwrap();
        worker.join().unwrap().unwrap();
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(root.path().join("log/worker.log").exists());
        assert!(root.path().join("log/runs").is_dir());
        assert!(!root.path().join("spool/work/stale-task.1").exists());
    }

    #[test]
    fn only_our_own_stale_workdirs_are_cleared() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["t-1.1", "keep-me", "x.y"] {
            std::fs::create_dir(dir.path().join(name)).unwrap();
        }
        clear_stale_workdirs(dir.path());
        assert!(!dir.path().join("t-1.1").exists());
        assert!(dir.path().join("keep-me").exists());
        assert!(dir.path().join("x.y").exists());
    }
}
