//! The broker's decisions, with no sockets and no clock of its own.
//!
//! [`Engine::on_envelope`] and [`Engine::tick`] take an event and the current time and
//! return [`Effects`]: records to journal, then messages to publish once they are durable,
//! and reads to answer from the store. The engine keeps only active runs in memory; a run
//! that ends is written and forgotten (the store answers for it from then on).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use jobz::envelope::{Envelope, MessageId};
use jobz::jobfile::{is_valid_name, Delivery};
use jobz::message::{
    Assignment, Event, HealthView, Message, Query, Reply, ReplyBody, RunFilter, RunState,
    TaskFinished, TaskOutcome, TaskRef, TaskStarted, TaskState, TriggerRequest, Work, WorkerStatus,
};
use jobz::topic::Topic;
use tracing::{debug, info, warn};

use crate::authority::Principal;
use crate::ids::{IdSource, RunId, StepId, TaskId};
use crate::model::{Attempt, Dead, Run, Step, Task};
use crate::registry::{CatalogEntry, Registry, Worker};
use crate::semaphore_reports::SemaphoreReports;
use active::{ActiveRuns, ActiveTask, RetryWait};

mod active;

/// A run may not grow beyond this many steps: it stops a successor cycle (`a` → `a`).
pub const MAX_STEPS_PER_RUN: usize = 1000;

/// Trigger ids remembered for ingesting a resent trigger once.
const REMEMBERED_REQUESTS: usize = 100_000;

/// Settings the engine's decisions depend on.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// A worker without a heartbeat for this long is lost; its unfinished tasks fail.
    pub worker_expiry_ms: i64,
    /// A published task not reported started after this long is published again.
    pub redeliver_after_ms: i64,
    /// A running task's lease: lost unless the worker's heartbeat renews it within this.
    pub lease_timeout_ms: i64,
    /// Extra time after a lease expires before the attempt is declared lost.
    pub lease_grace_ms: i64,
    /// Random id of this broker process, sent in `Welcome`.
    pub instance: String,
    /// Broker version, for `Health`.
    pub version: String,
}

/// A record to journal; the store upserts it.
#[derive(Debug, Clone, PartialEq)]
pub enum Write {
    Run(Run),
    Step(Step),
    Task(Task),
    Worker(Worker),
    Job(CatalogEntry),
    Attempt(Attempt),
    /// A result for a task of a run that has ended (so it is no longer in memory): the
    /// store records it as a late attempt unless it is the task's current attempt (then it
    /// is a plain duplicate). `run_id` is filled in by the store.
    ResultAfterRunEnd(Attempt),
    Dead(Dead),
}

/// A message to publish.
#[derive(Debug, Clone, PartialEq)]
pub struct Publish {
    pub topic: Topic,
    pub body: Message,
}

/// A read the journal answers from the store, after the writes before it are committed.
#[derive(Debug, Clone, PartialEq)]
pub struct StoreRead {
    pub reply_to: String,
    pub in_reply_to: MessageId,
    pub query: ReadQuery,
}

/// Reads that need the store.
#[derive(Debug, Clone, PartialEq)]
pub enum ReadQuery {
    Run(RunId),
    Runs(RunFilter),
    Completions {
        jobs: Vec<String>,
        since_ms: i64,
        limit: u32,
    },
}

/// What one event makes the broker do, in order: journal `writes` in one transaction,
/// then publish `publish`, then answer `reads`.
#[derive(Debug, Default)]
pub struct Effects {
    pub writes: Vec<Write>,
    pub publish: Vec<Publish>,
    pub reads: Vec<StoreRead>,
}

impl Effects {
    pub fn is_empty(&self) -> bool {
        self.writes.is_empty() && self.publish.is_empty() && self.reads.is_empty()
    }
}

/// What the store holds of unfinished business, to resume from.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub runs: Vec<Run>,
    pub steps: Vec<Step>,
    pub tasks: Vec<Task>,
    pub workers: Vec<Worker>,
    pub catalog: Vec<CatalogEntry>,
    /// (trigger message id, run id) of recent runs.
    pub recent_requests: Vec<(MessageId, RunId)>,
    /// The newest dead tasks.
    pub dead: Vec<Dead>,
}

/// Dead tasks held in memory for listing and retrying (older ones stay in the store).
const REMEMBERED_DEAD: usize = 10_000;

/// Longest wait between retries.
const MAX_BACKOFF_MS: u64 = 10 * 60 * 1000;

/// How an attempt failed; it decides whether the task is tried again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// The command ran and failed (non-zero exit, timeout): retried while `retries` allow,
    /// on the same worker (broadcast, local) or on the least loaded one (queue).
    Ran,
    /// The attempt was lost (lease expired, worker restarted): a queue task is retried
    /// elsewhere while `retries` allow; a broadcast or local task is marked failed.
    Lost,
    /// The task never started and its worker is gone: a queue task is placed again without
    /// using a retry; a broadcast or local task is marked failed.
    Unstarted,
    /// The task can never run (unknown job, worker does not serve it).
    Permanent,
}

pub struct Engine {
    config: EngineConfig,
    /// Where the ids of new runs, steps and tasks come from (given, like the time).
    ids: Box<dyn IdSource>,
    registry: Registry,
    /// Unfinished runs with their steps and tasks (a run that ends is written and forgotten).
    active: ActiveRuns,
    dead: BTreeMap<TaskId, Dead>,
    dead_order: VecDeque<TaskId>,
    /// The barriers the semaphores last reported, bounded per principal.
    semaphores: SemaphoreReports,
    requests: HashMap<MessageId, RunId>,
    request_order: VecDeque<MessageId>,
    counters: BTreeMap<String, u64>,
}

impl Engine {
    /// An engine resuming from `snapshot`, making new ids with `ids`.
    pub fn restore(
        config: EngineConfig,
        snapshot: Snapshot,
        ids: Box<dyn IdSource>,
        now_ms: i64,
    ) -> Engine {
        let mut engine = Engine {
            config,
            ids,
            registry: Registry::restore(snapshot.workers, snapshot.catalog, now_ms),
            active: ActiveRuns::default(),
            dead: BTreeMap::new(),
            dead_order: VecDeque::new(),
            semaphores: SemaphoreReports::default(),
            requests: HashMap::new(),
            request_order: VecDeque::new(),
            counters: BTreeMap::new(),
        };
        for (request, run) in snapshot.recent_requests {
            engine.remember_request(request, run);
        }
        let mut dead = snapshot.dead;
        dead.sort_by_key(|d| d.failed_at_ms);
        for d in dead {
            engine.remember_dead(d);
        }
        engine.resume(snapshot.runs, snapshot.steps, snapshot.tasks, now_ms);
        engine
    }

    /// Takes up the unfinished runs of a snapshot. A step or task whose run the snapshot
    /// does not hold cannot be finished or answered for: it is left out, with a warning.
    fn resume(&mut self, runs: Vec<Run>, steps: Vec<Step>, tasks: Vec<Task>, now_ms: i64) {
        for run in runs {
            self.active.insert_run(run);
        }
        let mut orphans = 0;
        for step in steps {
            let (step_id, pending) = (step.step_id.clone(), step.state == TaskState::Pending);
            if !self.active.insert_step(step) {
                orphans += 1;
            } else if pending {
                self.active.wait(&step_id);
            }
        }
        for record in tasks {
            let mut task = ActiveTask::new(record);
            // Leases restart with the broker: each worker gets a full lease to renew.
            if task.record.state == TaskState::Running {
                task.lease_expires_ms = Some(now_ms + self.config.lease_timeout_ms);
            }
            // A pending task may never have reached its worker before the broker stopped:
            // publish it again at the first tick (placed ones) or place it (retries).
            if task.record.state == TaskState::Pending {
                if task.record.worker.is_some() {
                    task.last_sent_ms = Some(i64::MIN / 2);
                } else {
                    task.retry = Some(RetryWait {
                        not_before_ms: i64::MIN,
                        avoid: None,
                    });
                }
            }
            if !self.active.insert_task(task) {
                orphans += 1;
            }
        }
        if orphans > 0 {
            warn!(
                orphans,
                "the store holds steps or tasks of no unfinished run; left out"
            );
        }
        if self.active.run_count() > 0 {
            info!(
                runs = self.active.run_count(),
                tasks = self.active.task_count(),
                "resuming active runs"
            );
        }
    }

    fn count(&mut self, name: &str) {
        self.count_by(name, 1);
    }

    fn count_by(&mut self, name: &str, n: u64) {
        if n > 0 {
            *self.counters.entry(name.to_owned()).or_default() += n;
        }
    }

    /// Counts a frame that was refused before it reached the engine (it did not decode,
    /// authenticate or pass [`crate::authority::authorize`]): the server refuses, the engine
    /// counts.
    pub fn count_dropped_frame(&mut self, reason: &str) {
        self.count("frames_dropped");
        self.count(&format!("frames_dropped_{reason}"));
    }

    pub fn active_runs(&self) -> usize {
        self.active.run_count()
    }

    fn remember_request(&mut self, request: MessageId, run_id: RunId) {
        if self.requests.insert(request.clone(), run_id).is_none() {
            self.request_order.push_back(request);
        }
        while self.request_order.len() > REMEMBERED_REQUESTS {
            if let Some(old) = self.request_order.pop_front() {
                self.requests.remove(&old);
            }
        }
    }

    fn remember_dead(&mut self, dead: Dead) {
        if self
            .dead
            .insert(dead.task_id.clone(), dead.clone())
            .is_none()
        {
            self.dead_order.push_back(dead.task_id);
        }
        while self.dead_order.len() > REMEMBERED_DEAD {
            if let Some(old) = self.dead_order.pop_front() {
                self.dead.remove(&old);
            }
        }
    }

    /// Handles one message that [`crate::authority::authorize`] let through for `from`: its
    /// sender may send it and every name in it is the sender's own.
    pub fn on_envelope(&mut self, env: Envelope, from: &Principal, now: i64) -> Effects {
        let mut fx = Effects::default();
        self.count("frames_received");
        match env.body.clone() {
            Message::Hello { role } => {
                debug!(sender = %env.sender, ?role, "hello");
                let instance = self.config.instance.clone();
                reply(
                    &mut fx,
                    &env,
                    ReplyBody::Welcome {
                        broker_instance: instance,
                    },
                );
            }
            Message::Heartbeat(status) => self.on_heartbeat(&mut fx, &env, status, now),
            Message::Trigger(request) => self.on_trigger(&mut fx, &env, request, now),
            Message::TaskStarted(started) => self.on_started(&mut fx, &env, started, now),
            Message::TaskFinished(finished) => self.on_finished(&mut fx, &env, finished, now),
            Message::Query(query) => self.on_query(&mut fx, &env, query, now),
            Message::RetryDead { task_id } => {
                self.on_retry_dead(&mut fx, &env, &TaskId::from(task_id), now)
            }
            Message::SemaphoreStatus { barriers } => {
                let principal = from.to_string();
                let recorded = self
                    .semaphores
                    .record(&principal, &env.sender, barriers, now);
                self.count_by("semaphore_views_trimmed", recorded.trimmed as u64);
                self.count_by("semaphore_reports_evicted", recorded.evicted as u64);
            }
            // `authorize` lets none of these through; dropped all the same should it change.
            Message::Reply(_) | Message::Work(_) | Message::Event(_) => {
                self.count_dropped_frame("unexpected");
                warn!(sender = %env.sender, "dropping a broker-to-client message sent to the broker");
            }
        }
        fx
    }

    fn on_heartbeat(&mut self, fx: &mut Effects, env: &Envelope, status: WorkerStatus, now: i64) {
        if !is_valid_name(&status.name) || status.jobs.iter().any(|j| !is_valid_name(&j.name)) {
            self.count_dropped_frame("bad_heartbeat");
            warn!(sender = %env.sender, "dropping a heartbeat with an invalid worker or job name");
            return;
        }
        let reg = self.registry.heartbeat(&status, now);
        for _ in &reg.refused {
            self.count("job_definitions_refused");
        }
        if reg.changed {
            if let Some(w) = self.registry.worker(&status.name) {
                fx.writes.push(Write::Worker(w.clone()));
            }
            for job in &status.jobs {
                if let Some(entry) = self.registry.catalog_entry(&job.name) {
                    fx.writes.push(Write::Job(entry.clone()));
                }
            }
        }
        // Renew the leases of what the worker says it runs; a task whose `TaskStarted` was
        // lost is running all the same.
        for running in &status.running {
            let task_id = TaskId::from(running.task_id.as_str());
            let Some(mut task) = self.active.task_mut(&task_id) else {
                continue;
            };
            if task.record.attempt != running.attempt
                || task.record.worker.as_deref() != Some(status.name.as_str())
            {
                continue;
            }
            if task.record.state == TaskState::Pending {
                task.record.state = TaskState::Running;
                task.record.started_at_ms = Some(now);
                task.record.instance = Some(status.instance.clone());
                task.last_sent_ms = None;
                fx.writes.push(Write::Task(task.record.clone()));
            }
            if task.record.state == TaskState::Running {
                task.lease_expires_ms = Some(now + self.config.lease_timeout_ms);
            }
        }
        if reg.restarted_from.is_some() {
            // Tasks the previous process started died with it (oldest first, so a replay
            // decides in the same order).
            let mut lost: Vec<(i64, TaskId)> = self
                .active
                .tasks()
                .map(|t| &t.record)
                .filter(|t| {
                    t.worker.as_deref() == Some(status.name.as_str())
                        && t.state == TaskState::Running
                        && t.instance.as_deref() != Some(status.instance.as_str())
                })
                .map(|t| (t.created_at_ms, t.task_id.clone()))
                .collect();
            lost.sort();
            for (_, task_id) in lost {
                warn!(worker = %status.name, task_id = %task_id, "worker restarted; its running attempt is lost");
                let reason = "worker restarted while the task ran; attempt lost";
                self.task_failed(fx, &task_id, Failure::Lost, reason, now);
            }
        }
        if reg.became_live || reg.changed {
            self.dispatch_waiting(fx, now);
        }
        reply(fx, env, ReplyBody::Ack);
    }

    fn on_trigger(&mut self, fx: &mut Effects, env: &Envelope, request: TriggerRequest, now: i64) {
        if let Some(run_id) = self.requests.get(&env.id).cloned() {
            self.count("duplicate_triggers");
            let run_id = run_id.into();
            reply(fx, env, ReplyBody::Accepted { run_id });
            return;
        }
        let rejected = |status: u16, error: String| ReplyBody::Rejected { status, error };
        if !is_valid_name(&request.job) {
            self.count("triggers_rejected");
            reply(
                fx,
                env,
                rejected(
                    400,
                    format!("invalid job name {:?}", truncate(&request.job, 130)),
                ),
            );
            return;
        }
        let Some((spec, param_rules)) = self.registry.job_and_params(&request.job) else {
            self.count("triggers_rejected");
            reply(
                fx,
                env,
                rejected(
                    404,
                    format!("unknown job {:?}: no worker has registered it", request.job),
                ),
            );
            return;
        };
        if spec.delivery == Delivery::Local {
            self.count("triggers_rejected");
            reply(
                fx,
                env,
                rejected(
                    400,
                    format!(
                        "job {:?} has delivery `local`: it runs only as a successor",
                        request.job
                    ),
                ),
            );
            return;
        }
        if let Err(e) = param_rules.validate_params(&request.params) {
            self.count("triggers_rejected");
            reply(fx, env, rejected(400, e.to_string()));
            return;
        }
        if request.parent_runs.len() > 10_000 || request.parent_runs.iter().any(|r| !is_valid_id(r))
        {
            self.count("triggers_rejected");
            reply(fx, env, rejected(400, "invalid parent_runs".into()));
            return;
        }
        let parent_runs = request.parent_runs.into_iter().map(RunId::from).collect();
        self.create_run(fx, env, &request.job, request.params, parent_runs, now);
    }

    /// Journals a new run, answers `Accepted` and starts its first step.
    fn create_run(
        &mut self,
        fx: &mut Effects,
        env: &Envelope,
        job: &str,
        params: jobz::message::Params,
        parent_runs: Vec<RunId>,
        now: i64,
    ) -> RunId {
        let run = Run {
            run_id: self.ids.run_id(),
            job: job.to_owned(),
            params,
            state: RunState::Pending,
            parent_runs,
            request_id: env.id.clone(),
            created_at_ms: now,
            finished_at_ms: None,
        };
        let run_id = run.run_id.clone();
        info!(run_id = %run_id, job = %run.job, sender = %env.sender, "run accepted");
        self.count("runs_accepted");
        fx.writes.push(Write::Run(run.clone()));
        self.active.insert_run(run);
        self.remember_request(env.id.clone(), run_id.clone());
        // The reply goes first in `publish`: it is sent only after the run is durable.
        reply(
            fx,
            env,
            ReplyBody::Accepted {
                run_id: run_id.to_string(),
            },
        );
        self.start_step(fx, &run_id, job, None, now);
        self.finish_run_if_done(fx, &run_id, now);
        run_id
    }

    fn on_retry_dead(&mut self, fx: &mut Effects, env: &Envelope, task_id: &TaskId, now: i64) {
        if let Some(run_id) = self.requests.get(&env.id).cloned() {
            let run_id = run_id.into();
            reply(fx, env, ReplyBody::Accepted { run_id });
            return;
        }
        let rejected = |status: u16, error: String| ReplyBody::Rejected { status, error };
        let Some(dead) = self.dead.get(task_id).cloned() else {
            reply(
                fx,
                env,
                rejected(
                    404,
                    format!("no dead task {:?}", truncate(task_id.as_str(), 80)),
                ),
            );
            return;
        };
        if let Some(run_id) = dead.retried_as {
            let run_id = run_id.into();
            reply(fx, env, ReplyBody::Accepted { run_id });
            return;
        }
        let Some((spec, param_rules)) = self.registry.job_and_params(&dead.job) else {
            let error = format!("unknown job {:?}: no worker has registered it", dead.job);
            reply(fx, env, rejected(404, error));
            return;
        };
        if spec.delivery == Delivery::Local {
            let error = format!(
                "job {:?} has delivery `local`: retry the run that led to it",
                dead.job
            );
            reply(fx, env, rejected(400, error));
            return;
        }
        if let Err(e) = param_rules.validate_params(&dead.params) {
            reply(
                fx,
                env,
                rejected(400, format!("the job's parameters changed: {e}")),
            );
            return;
        }
        self.count("dead_retried");
        let parents = vec![dead.run_id.clone()];
        let run_id = self.create_run(fx, env, &dead.job, dead.params.clone(), parents, now);
        let mut dead = dead;
        dead.retried_as = Some(run_id);
        fx.writes.push(Write::Dead(dead.clone()));
        self.remember_dead(dead);
    }

    fn on_started(&mut self, fx: &mut Effects, env: &Envelope, started: TaskStarted, now: i64) {
        let task_id = TaskId::from(started.task.task_id.as_str());
        let current = self.active.task(&task_id).is_some_and(|t| {
            t.record.attempt == started.task.attempt
                && t.record.worker.as_deref() == Some(started.worker.as_str())
        });
        let Some(mut task) = self.active.task_mut(&task_id).filter(|_| current) else {
            self.count("stale_reports");
            reply(fx, env, ReplyBody::Ack);
            return;
        };
        if task.record.state == TaskState::Pending {
            task.record.state = TaskState::Running;
            task.record.started_at_ms = Some(started.started_at_ms);
            task.record.instance = Some(started.instance);
            task.lease_expires_ms = Some(now + self.config.lease_timeout_ms);
            task.last_sent_ms = None;
            let t = &task.record;
            info!(run_id = %t.run_id, task_id = %t.task_id, job = %t.job, worker = %started.worker, "task started");
            let run_id = t.run_id.clone();
            fx.writes.push(Write::Task(t.clone()));
            drop(task);
            self.mark_run_running(fx, &run_id);
        }
        reply(fx, env, ReplyBody::Ack);
    }

    fn on_finished(&mut self, fx: &mut Effects, env: &Envelope, finished: TaskFinished, now: i64) {
        let state = match finished.outcome {
            TaskOutcome::Succeeded => TaskState::Succeeded,
            TaskOutcome::Failed | TaskOutcome::TimedOut => TaskState::Failed,
        };
        // A report that must not be applied, kept as history (the store fills in the run
        // of a task whose run has already ended).
        let task_id = TaskId::from(finished.task.task_id.as_str());
        let late = |run_id: RunId| Attempt {
            task_id: task_id.clone(),
            run_id,
            attempt: finished.task.attempt,
            worker: Some(finished.worker.clone()),
            state,
            exit_code: finished.exit_code,
            error: bounded_text(finished.error.as_deref()),
            started_at_ms: Some(finished.started_at_ms),
            finished_at_ms: finished.finished_at_ms,
            late: true,
        };
        let Some(task) = self.active.task(&task_id).map(|t| t.record.clone()) else {
            self.count("results_after_run_end");
            fx.writes
                .push(Write::ResultAfterRunEnd(late(RunId::from(""))));
            reply(fx, env, ReplyBody::Ack);
            return;
        };
        if task.state.is_final() {
            self.count("duplicate_results");
            reply(fx, env, ReplyBody::Ack);
            return;
        }
        if task.attempt != finished.task.attempt
            || task.worker.as_deref() != Some(finished.worker.as_str())
        {
            if finished.task.attempt >= task.attempt {
                // Not a superseded attempt but one this worker was never given (the current
                // one is another worker's, or the number was never issued): nothing to keep.
                self.count("foreign_results");
                debug!(task_id = %task.task_id, worker = %finished.worker, attempt = finished.task.attempt,
                    current = task.attempt, "result for an attempt the worker was not given");
                reply(fx, env, ReplyBody::Ack);
                return;
            }
            // A superseded attempt: recorded as history, never applied over the newer one.
            self.count("late_results");
            warn!(run_id = %task.run_id, task_id = %task.task_id, worker = %finished.worker,
                attempt = finished.task.attempt, current = task.attempt, "late result of a superseded attempt");
            fx.writes.push(Write::Attempt(late(task.run_id.clone())));
            reply(fx, env, ReplyBody::Ack);
            return;
        }
        let task_id = task.task_id.clone();
        let run_id = task.run_id.clone();
        if let Some(mut task) = self.active.task_mut(&task_id) {
            let task = &mut task.record;
            task.started_at_ms = task.started_at_ms.or(Some(finished.started_at_ms));
            task.exit_code = finished.exit_code;
            task.error = bounded_text(finished.error.as_deref());
            task.output_tail = truncate(&finished.output_tail, MAX_REPORTED_TEXT).to_owned();
            task.finished_at_ms = Some(finished.finished_at_ms);
        }
        self.mark_run_running(fx, &run_id);
        self.count("tasks_finished");
        // Ack first: it is published after the commit that records the result.
        reply(fx, env, ReplyBody::Ack);
        if state == TaskState::Failed {
            let reason = match (finished.outcome, finished.exit_code) {
                (TaskOutcome::TimedOut, _) => "timed out".to_owned(),
                (_, Some(code)) => format!("exit code {code}"),
                (_, None) => "failed".to_owned(),
            };
            self.task_failed(fx, &task_id, Failure::Ran, &reason, now);
        } else {
            self.finish_task(fx, &task_id, state, now);
        }
    }

    fn on_query(&mut self, fx: &mut Effects, env: &Envelope, query: Query, now: i64) {
        let read = |query| StoreRead {
            reply_to: env.sender.clone(),
            in_reply_to: env.id.clone(),
            query,
        };
        match query {
            Query::Run { run_id } => fx.reads.push(read(ReadQuery::Run(run_id.into()))),
            Query::Runs(filter) => fx.reads.push(read(ReadQuery::Runs(filter))),
            Query::Jobs => reply(fx, env, ReplyBody::Jobs(self.registry.job_views())),
            Query::Workers => reply(fx, env, ReplyBody::Workers(self.registry.worker_views())),
            Query::Health => {
                let health = self.health();
                reply(fx, env, ReplyBody::Health(health));
            }
            Query::Completions {
                jobs,
                since_ms,
                limit,
            } => {
                let query = ReadQuery::Completions {
                    jobs,
                    since_ms,
                    limit: limit.clamp(1, 10_000),
                };
                fx.reads.push(read(query));
            }
            Query::Semaphores => {
                let barriers = self.semaphores.views(now);
                reply(fx, env, ReplyBody::Semaphores(barriers));
            }
            Query::Dead { limit } => {
                let limit = limit.clamp(1, 1000) as usize;
                let views = self
                    .dead_order
                    .iter()
                    .rev()
                    .filter_map(|id| self.dead.get(id))
                    .take(limit)
                    .map(Dead::view)
                    .collect();
                reply(fx, env, ReplyBody::Dead(views));
            }
        }
    }

    pub fn health(&self) -> HealthView {
        HealthView {
            version: self.config.version.clone(),
            instance: self.config.instance.clone(),
            counters: self.counters.clone(),
            active_runs: self.active.run_count() as u64,
            live_workers: self.registry.live_count() as u64,
        }
    }

    /// Periodic duties: expire silent workers, republish unstarted tasks, place waiting steps.
    pub fn tick(&mut self, now: i64) -> Effects {
        let mut fx = Effects::default();
        let expiry = self.config.worker_expiry_ms;
        for worker in self.registry.expire(now, expiry) {
            warn!(worker = %worker, "worker lost: no heartbeat for {} ms", expiry);
            self.count("workers_lost");
            let reason = format!(
                "worker {worker} lost before starting the task: no heartbeat for {} s",
                expiry / 1000
            );
            self.fail_unstarted_of(&mut fx, &worker, &reason, now);
        }
        self.expire_leases(&mut fx, now);
        self.redeliver(&mut fx, now);
        self.place_retries(&mut fx, now);
        self.dispatch_waiting(&mut fx, now);
        self.semaphores.prune(now);
        fx
    }

    /// A worker whose key was revoked: lost at once. Its unstarted tasks go elsewhere or
    /// fail now; its running ones keep their lease, which it can no longer renew (its
    /// frames are refused), so they are lost and retried when the lease ends.
    pub fn revoke_worker(&mut self, worker: &str, now: i64) -> Effects {
        let mut fx = Effects::default();
        if self.registry.mark_lost(worker) {
            warn!(worker = %worker, "worker lost: its key was revoked");
            self.count("workers_revoked");
            let reason = format!("worker {worker} lost before starting the task: key revoked");
            self.fail_unstarted_of(&mut fx, worker, &reason, now);
        }
        fx
    }

    // Unstarted tasks of a lost worker go elsewhere (queue) or fail; running ones keep their
    // lease, which the worker may still renew if it was only slow.
    fn fail_unstarted_of(&mut self, fx: &mut Effects, worker: &str, reason: &str, now: i64) {
        let mut unstarted: Vec<(i64, TaskId)> = self
            .active
            .tasks()
            .map(|t| &t.record)
            .filter(|t| t.worker.as_deref() == Some(worker) && t.state == TaskState::Pending)
            .map(|t| (t.created_at_ms, t.task_id.clone()))
            .collect();
        unstarted.sort();
        for (_, task_id) in unstarted {
            self.task_failed(fx, &task_id, Failure::Unstarted, reason, now);
        }
    }

    fn expire_leases(&mut self, fx: &mut Effects, now: i64) {
        let deadline = now - self.config.lease_grace_ms;
        let mut expired: Vec<(i64, TaskId)> = self
            .active
            .tasks()
            .filter(|t| {
                t.record.state == TaskState::Running
                    && t.lease_expires_ms.is_some_and(|l| l < deadline)
            })
            .map(|t| (t.record.created_at_ms, t.record.task_id.clone()))
            .collect();
        expired.sort();
        for (_, task_id) in expired {
            let worker = self
                .active
                .task(&task_id)
                .and_then(|t| t.record.worker.clone())
                .unwrap_or_default();
            self.count("leases_expired");
            let reason =
                format!("lease expired: worker {worker} stopped renewing it; attempt lost");
            self.task_failed(fx, &task_id, Failure::Lost, &reason, now);
        }
    }

    /// Publishes retries whose backoff has passed, choosing a worker for queue tasks.
    fn place_retries(&mut self, fx: &mut Effects, now: i64) {
        let due: Vec<TaskId> = self
            .active
            .retrying()
            .filter(|id| {
                self.active
                    .task(id)
                    .and_then(|t| t.retry.as_ref())
                    .is_some_and(|r| r.not_before_ms <= now)
            })
            .cloned()
            .collect();
        let mut load = self.load();
        for task_id in due {
            let Some(task) = self.active.task(&task_id) else {
                continue;
            };
            if task.record.state != TaskState::Pending {
                if let Some(mut task) = self.active.task_mut(&task_id) {
                    task.retry = None;
                }
                continue;
            }
            let worker = match &task.record.worker {
                Some(w) => {
                    if !self.registry.worker(w).is_some_and(|w| w.live) {
                        let reason = format!("worker {w} lost before the retry could start");
                        if let Some(mut task) = self.active.task_mut(&task_id) {
                            task.retry = None;
                        }
                        self.task_failed(fx, &task_id, Failure::Unstarted, &reason, now);
                        continue;
                    }
                    w.clone()
                }
                None => {
                    let avoid = task.retry.as_ref().and_then(|r| r.avoid.as_deref());
                    match self.pick_queue_worker(&task.record.job, &load, avoid) {
                        Some(w) => w,
                        None => continue, // nobody has a free slot: try again next tick
                    }
                }
            };
            *load.entry(worker.clone()).or_default() += 1;
            let step_id = match self.active.task_mut(&task_id) {
                Some(mut t) => {
                    t.retry = None;
                    t.record.worker = Some(worker);
                    fx.writes.push(Write::Task(t.record.clone()));
                    t.record.step_id.clone()
                }
                None => continue,
            };
            self.publish_work(fx, &step_id, std::slice::from_ref(&task_id), now);
        }
    }

    /// Unfinished tasks per worker: what occupies its slots, as far as the broker knows.
    fn load(&self) -> HashMap<String, u32> {
        let mut load: HashMap<String, u32> = HashMap::new();
        for t in self.active.tasks().map(|t| &t.record) {
            if t.state.is_final() {
                continue;
            }
            if let Some(w) = &t.worker {
                *load.entry(w.clone()).or_default() += 1;
            }
        }
        load
    }

    /// The live worker serving `job` with a free slot and the lightest load; ties go by
    /// name. `avoid` is taken only if no other worker can.
    fn pick_queue_worker(
        &self,
        job: &str,
        load: &HashMap<String, u32>,
        avoid: Option<&str>,
    ) -> Option<String> {
        let candidates: Vec<(u32, &str)> = self
            .registry
            .live_workers_for(job)
            .into_iter()
            .map(|w| {
                (
                    load.get(&w.name).copied().unwrap_or(0),
                    w.slots.max(1),
                    w.name.as_str(),
                )
            })
            .filter(|(used, slots, _)| used < slots)
            .map(|(used, _, name)| (used, name))
            .collect();
        let best = |skip: Option<&str>| {
            candidates
                .iter()
                .filter(|(_, n)| Some(*n) != skip)
                .min()
                .map(|(_, n)| n.to_string())
        };
        best(avoid).or_else(|| best(None))
    }

    fn redeliver(&mut self, fx: &mut Effects, now: i64) {
        let due: Vec<TaskId> = self
            .active
            .tasks()
            .filter(|t| {
                t.last_sent_ms
                    .is_some_and(|sent| now - sent >= self.config.redeliver_after_ms)
            })
            .map(|t| t.record.task_id.clone())
            .collect();
        let mut by_step: BTreeMap<StepId, Vec<TaskId>> = BTreeMap::new();
        for task_id in due {
            let Some(mut t) = self.active.task_mut(&task_id) else {
                continue;
            };
            if t.record.state == TaskState::Pending {
                by_step
                    .entry(t.record.step_id.clone())
                    .or_default()
                    .push(task_id);
            } else {
                t.last_sent_ms = None;
            }
        }
        for (step_id, mut task_ids) in by_step {
            task_ids.sort(); // in the order they were made, whatever the map's order
            self.count("redeliveries");
            self.publish_work(fx, &step_id, &task_ids, now);
        }
    }

    fn mark_run_running(&mut self, fx: &mut Effects, run_id: &RunId) {
        if let Some(run) = self.active.run_mut(run_id) {
            if run.state == RunState::Pending {
                run.state = RunState::Running;
                fx.writes.push(Write::Run(run.clone()));
            }
        }
    }

    /// Starts `job` as a new step of `run_id`. `origin` is the (task, worker) a `local`
    /// successor follows.
    fn start_step(
        &mut self,
        fx: &mut Effects,
        run_id: &RunId,
        job: &str,
        origin: Option<(&TaskId, &str)>,
        now: i64,
    ) {
        let spec = self.registry.job(job).cloned();
        let step = Step {
            step_id: self.ids.step_id(),
            run_id: run_id.clone(),
            job: job.to_owned(),
            delivery: spec.as_ref().map(|s| s.delivery).unwrap_or_default(),
            state: TaskState::Pending,
            origin_task: origin.map(|(task, _)| task.clone()),
            created_at_ms: now,
            finished_at_ms: None,
        };
        let step_id = step.step_id.clone();
        info!(run_id = %run_id, step_id = %step_id, job = %job, "step created");
        if !self.active.insert_step(step.clone()) {
            return; // the run is not active: nothing may start in it
        }
        fx.writes.push(Write::Step(step));

        let origin_worker = origin.map(|(_, w)| w.to_owned());
        let Some(spec) = spec else {
            self.fail_unplaced(
                fx,
                &step_id,
                origin_worker,
                format!("unknown job {job:?}: no worker has registered it"),
                now,
            );
            return;
        };
        match spec.delivery {
            Delivery::Local => match origin_worker {
                Some(worker) => {
                    let serves = self
                        .registry
                        .worker(&worker)
                        .is_some_and(|w| w.jobs.contains(job));
                    if serves {
                        self.assign(fx, &step_id, vec![worker], now);
                    } else {
                        let reason = format!("worker {worker} does not serve local job {job:?}");
                        self.fail_unplaced(fx, &step_id, Some(worker), reason, now);
                    }
                }
                None => {
                    let reason =
                        format!("job {job:?} has delivery `local` but no predecessor task");
                    self.fail_unplaced(fx, &step_id, None, reason, now);
                }
            },
            Delivery::Broadcast | Delivery::Queue => self.place(fx, &step_id, now),
        }
    }

    /// Chooses the workers of a broadcast or queue step, or leaves it waiting for one.
    fn place(&mut self, fx: &mut Effects, step_id: &StepId, now: i64) {
        let Some(step) = self.active.step(step_id) else {
            return;
        };
        let live: Vec<String> = self
            .registry
            .live_workers_for(&step.job)
            .iter()
            .map(|w| w.name.clone())
            .collect();
        if live.is_empty() {
            let (run_id, job) = (step.run_id.clone(), step.job.clone());
            if self.active.wait(step_id) {
                info!(run_id = %run_id, step_id = %step_id, job = %job, "step waits for a live worker");
            }
            return;
        }
        // First come, first served: a queue step does not overtake steps of its job that
        // already wait for a slot.
        if step.delivery == Delivery::Queue
            && !self.active.is_waiting(step_id)
            && self
                .active
                .waiting()
                .any(|w| self.active.step(w).is_some_and(|s| s.job == step.job))
        {
            self.active.wait(step_id);
            return;
        }
        let workers = match step.delivery {
            // Credits: a queue step goes only to a worker with a free slot, else it waits.
            Delivery::Queue => match self.pick_queue_worker(&step.job, &self.load(), None) {
                Some(w) => vec![w],
                None => {
                    self.active.wait(step_id);
                    return;
                }
            },
            _ => live,
        };
        self.active.stop_waiting(step_id);
        self.assign(fx, step_id, workers, now);
    }

    /// Places waiting steps, oldest first (step ids are time-ordered). The load is counted
    /// once per pass and a job with no free slot is skipped for the rest of the pass, so a
    /// pass costs one scan of the tasks plus one of the waiting steps.
    fn dispatch_waiting(&mut self, fx: &mut Effects, now: i64) {
        if !self.active.has_waiting() {
            return;
        }
        let waiting: Vec<StepId> = self.active.waiting().cloned().collect();
        let mut load = self.load();
        let mut blocked: BTreeSet<String> = BTreeSet::new();
        for step_id in waiting {
            let (job, delivery) = match self.active.step(&step_id) {
                Some(s) => (s.job.clone(), s.delivery),
                None => {
                    self.active.stop_waiting(&step_id);
                    continue;
                }
            };
            if blocked.contains(&job) {
                continue;
            }
            if self.registry.live_workers_for(&job).is_empty() {
                blocked.insert(job);
                continue;
            }
            if delivery != Delivery::Queue {
                self.place(fx, &step_id, now);
                continue;
            }
            match self.pick_queue_worker(&job, &load, None) {
                Some(worker) => {
                    *load.entry(worker.clone()).or_default() += 1;
                    self.active.stop_waiting(&step_id);
                    self.assign(fx, &step_id, vec![worker], now);
                }
                None => {
                    blocked.insert(job);
                }
            }
        }
    }

    /// How many tasks the broadcast behind a new task of `step_id` reached: the step's own
    /// count (`placed`), or for a `local` step that of the task it follows.
    fn fanout_of(&self, step_id: &StepId, placed: usize) -> u32 {
        let origin = self
            .active
            .step(step_id)
            .and_then(|s| s.origin_task.as_ref());
        match origin.and_then(|t| self.active.task(t)) {
            Some(origin) => origin.record.fanout,
            None => placed.max(1) as u32,
        }
    }

    fn new_task(
        &mut self,
        step_id: &StepId,
        worker: Option<String>,
        fanout: u32,
        now: i64,
    ) -> Option<TaskId> {
        let step = self.active.step(step_id)?;
        let task = Task {
            task_id: self.ids.task_id(),
            step_id: step_id.clone(),
            run_id: step.run_id.clone(),
            job: step.job.clone(),
            worker,
            state: TaskState::Pending,
            attempt: 1,
            failures: 0,
            fanout,
            exit_code: None,
            error: None,
            instance: None,
            created_at_ms: now,
            started_at_ms: None,
            finished_at_ms: None,
            recorded_at_ms: None,
            output_tail: String::new(),
        };
        let task_id = task.task_id.clone();
        self.active
            .insert_task(ActiveTask::new(task))
            .then_some(task_id)
    }

    fn assign(&mut self, fx: &mut Effects, step_id: &StepId, workers: Vec<String>, now: i64) {
        let fanout = self.fanout_of(step_id, workers.len());
        let mut task_ids = Vec::new();
        for worker in workers {
            if let Some(id) = self.new_task(step_id, Some(worker), fanout, now) {
                if let Some(t) = self.active.task(&id) {
                    fx.writes.push(Write::Task(t.record.clone()));
                }
                task_ids.push(id);
            }
        }
        if let Some(step) = self.active.step_mut(step_id) {
            step.state = TaskState::Running;
            fx.writes.push(Write::Step(step.clone()));
        }
        self.publish_work(fx, step_id, &task_ids, now);
    }

    fn publish_work(&mut self, fx: &mut Effects, step_id: &StepId, task_ids: &[TaskId], now: i64) {
        let Some(step) = self.active.step(step_id) else {
            return;
        };
        let Some(run) = self.active.run(&step.run_id) else {
            return;
        };
        let (sent, assignments): (Vec<TaskId>, Vec<Assignment>) = task_ids
            .iter()
            .filter_map(|id| self.active.task(id))
            .map(|t| &t.record)
            .filter_map(|t| {
                let assignment = Assignment {
                    worker: t.worker.clone()?,
                    task: TaskRef {
                        task_id: t.task_id.to_string(),
                        attempt: t.attempt,
                    },
                };
                Some((t.task_id.clone(), assignment))
            })
            .unzip();
        if assignments.is_empty() {
            return;
        }
        fx.publish.push(Publish {
            topic: Topic::Job(step.job.clone()),
            body: Message::Work(Work {
                run_id: run.run_id.to_string(),
                step_id: step_id.to_string(),
                job: step.job.clone(),
                params: run.params.clone(),
                assignments,
            }),
        });
        for task_id in sent {
            if let Some(mut task) = self.active.task_mut(&task_id) {
                task.last_sent_ms = Some(now);
            }
        }
    }

    /// A step that cannot be placed fails at once with one task that says why.
    fn fail_unplaced(
        &mut self,
        fx: &mut Effects,
        step_id: &StepId,
        worker: Option<String>,
        reason: String,
        now: i64,
    ) {
        warn!(step_id = %step_id, %reason, "step cannot run");
        let fanout = self.fanout_of(step_id, 1);
        if let Some(task_id) = self.new_task(step_id, worker, fanout, now) {
            if let Some(step) = self.active.step_mut(step_id) {
                step.state = TaskState::Running;
            }
            self.task_failed(fx, &task_id, Failure::Permanent, &reason, now);
        }
    }

    /// An attempt failed: retry the task if its job and the kind of failure allow, else
    /// record it failed for good.
    fn task_failed(
        &mut self,
        fx: &mut Effects,
        task_id: &TaskId,
        failure: Failure,
        reason: &str,
        now: i64,
    ) {
        let Some(task) = self.active.task(task_id).map(|t| &t.record) else {
            return;
        };
        if task.state.is_final() {
            return;
        }
        let delivery = self
            .active
            .step(&task.step_id)
            .map(|s| s.delivery)
            .unwrap_or_default();
        let (retries, backoff_ms) = self
            .registry
            .job(&task.job)
            .map_or((0, 0), |s| (s.retries, s.retry_backoff_ms));
        let budget_left = task.failures < retries;
        // (counts against `retries`, moves to another worker)
        let retry = match failure {
            Failure::Permanent => None,
            Failure::Ran if budget_left => Some((true, delivery == Delivery::Queue)),
            Failure::Lost if budget_left && delivery == Delivery::Queue => Some((true, true)),
            Failure::Unstarted if delivery == Delivery::Queue => Some((false, true)),
            _ => None,
        };
        let Some(mut active) = self.active.task_mut(task_id) else {
            return;
        };
        let task = &mut active.record;
        let error = match (failure, task.error.as_deref()) {
            (Failure::Ran, Some(detail)) => format!("{reason}: {detail}"),
            _ => reason.to_owned(),
        };
        if task.state == TaskState::Running || failure == Failure::Ran {
            fx.writes.push(Write::Attempt(Attempt {
                task_id: task.task_id.clone(),
                run_id: task.run_id.clone(),
                attempt: task.attempt,
                worker: task.worker.clone(),
                state: TaskState::Failed,
                exit_code: task.exit_code,
                error: Some(error.clone()),
                started_at_ms: task.started_at_ms,
                finished_at_ms: task.finished_at_ms.unwrap_or(now),
                late: false,
            }));
        }
        task.error = Some(error.clone());
        let Some((counts, moves)) = retry else {
            task.finished_at_ms = task.finished_at_ms.or(Some(now));
            drop(active);
            self.finish_task(fx, task_id, TaskState::Failed, now);
            return;
        };
        if counts {
            task.failures += 1;
        }
        let delay = if counts {
            backoff_ms_for(backoff_ms, task.failures, task_id)
        } else {
            0
        };
        task.attempt += 1;
        task.state = TaskState::Pending;
        task.exit_code = None;
        task.instance = None;
        task.started_at_ms = None;
        task.finished_at_ms = None;
        // Moved off its worker, which is avoided when another can take it.
        let avoid = if moves { task.worker.take() } else { None };
        info!(run_id = %task.run_id, task_id = %task_id, job = %task.job, attempt = task.attempt,
            delay_ms = delay, error = %error, "task will be retried");
        fx.writes.push(Write::Task(task.clone()));
        active.lease_expires_ms = None;
        active.last_sent_ms = None;
        active.retry = Some(RetryWait {
            not_before_ms: now + delay as i64,
            avoid,
        });
        drop(active);
        self.count("retries");
    }

    /// Records a task's final state, then starts what follows it.
    fn finish_task(&mut self, fx: &mut Effects, task_id: &TaskId, state: TaskState, now: i64) {
        let Some(mut active) = self.active.task_mut(task_id) else {
            return;
        };
        let task = &mut active.record;
        task.state = state;
        task.finished_at_ms = task.finished_at_ms.or(Some(now));
        task.recorded_at_ms = Some(now);
        let task = task.clone();
        active.last_sent_ms = None;
        active.retry = None;
        drop(active);
        info!(run_id = %task.run_id, step_id = %task.step_id, task_id = %task.task_id, job = %task.job,
            worker = task.worker.as_deref().unwrap_or("-"), state = %state, "task finished");
        fx.writes.push(Write::Task(task.clone()));
        if state == TaskState::Failed {
            let dead = Dead {
                task_id: task.task_id.clone(),
                run_id: task.run_id.clone(),
                step_id: task.step_id.clone(),
                job: task.job.clone(),
                worker: task.worker.clone(),
                params: self
                    .active
                    .run(&task.run_id)
                    .map(|r| r.params.clone())
                    .unwrap_or_default(),
                attempts: task.attempt,
                error: task.error.clone(),
                exit_code: task.exit_code,
                failed_at_ms: now,
                retried_as: None,
            };
            fx.writes.push(Write::Dead(dead.clone()));
            self.remember_dead(dead);
        }
        if let Some(run) = self.active.run(&task.run_id) {
            fx.publish.push(Publish {
                topic: Topic::Events(task.job.clone()),
                body: Message::Event(Event::TaskFinished(task.completion(run.params.clone()))),
            });
        }
        // `local` successors follow each task on its own worker, before the step is judged,
        // so the run cannot end while they are still to come.
        if let Some(worker) = task.worker.clone() {
            for next in
                self.successors(&task.job, state == TaskState::Succeeded, &task.run_id, true)
            {
                self.start_step(fx, &task.run_id, &next, Some((&task.task_id, &worker)), now);
            }
        }
        self.finish_step_if_done(fx, &task.step_id, now);
        self.finish_run_if_done(fx, &task.run_id, now);
        // The task freed a slot: a waiting queue step can take it now, not at the next tick.
        self.dispatch_waiting(fx, now);
    }

    /// Successor job names of `job` after success or failure; `local` ones or the others.
    fn successors(&self, job: &str, succeeded: bool, run_id: &RunId, local: bool) -> Vec<String> {
        let Some(spec) = self.registry.job(job) else {
            return Vec::new();
        };
        if self.active.step_count(run_id) >= MAX_STEPS_PER_RUN {
            warn!(run_id = %run_id, "run reached {MAX_STEPS_PER_RUN} steps; no more successors start");
            return Vec::new();
        }
        let names = if succeeded {
            &spec.on_success
        } else {
            &spec.on_failure
        };
        names
            .iter()
            .filter(|n| {
                (self.registry.job(n).map(|s| s.delivery) == Some(Delivery::Local)) == local
            })
            .cloned()
            .collect()
    }

    fn finish_step_if_done(&mut self, fx: &mut Effects, step_id: &StepId, now: i64) {
        let Some(step) = self.active.step(step_id) else {
            return;
        };
        if step.state.is_final() || step.state == TaskState::Pending {
            return;
        }
        let states: Vec<TaskState> = self
            .active
            .tasks_of(step_id)
            .map(|t| t.record.state)
            .collect();
        if states.is_empty() || states.iter().any(|s| !s.is_final()) {
            return;
        }
        let succeeded = states.iter().all(|s| *s == TaskState::Succeeded);
        let (run_id, job) = (step.run_id.clone(), step.job.clone());
        if let Some(step) = self.active.step_mut(step_id) {
            step.state = if succeeded {
                TaskState::Succeeded
            } else {
                TaskState::Failed
            };
            step.finished_at_ms = Some(now);
            fx.writes.push(Write::Step(step.clone()));
        }
        for next in self.successors(&job, succeeded, &run_id, false) {
            self.start_step(fx, &run_id, &next, None, now);
        }
    }

    fn finish_run_if_done(&mut self, fx: &mut Effects, run_id: &RunId, now: i64) {
        if self.active.step_count(run_id) == 0 {
            return;
        }
        let mut failed = false;
        for step in self.active.steps_of(run_id) {
            match step.state {
                TaskState::Succeeded => {}
                TaskState::Failed => failed = true,
                _ => return,
            }
        }
        // The run is durable from here on; the store answers for it.
        let Some(mut run) = self.active.remove_run(run_id) else {
            return;
        };
        run.state = if failed {
            RunState::Failed
        } else {
            RunState::Succeeded
        };
        run.finished_at_ms = Some(now);
        info!(run_id = %run_id, job = %run.job, state = %run.state, "run finished");
        self.count(if failed {
            "runs_failed"
        } else {
            "runs_succeeded"
        });
        fx.writes.push(Write::Run(run));
    }
}

/// Exponential backoff with jitter: `base · 2^(failures-1)`, capped, plus up to a quarter
/// more. The jitter is a hash of the task and attempt, so a replay decides the same.
fn backoff_ms_for(base_ms: u64, failures: u32, task_id: &TaskId) -> u64 {
    let exp = base_ms
        .saturating_mul(1u64 << failures.saturating_sub(1).min(20))
        .min(MAX_BACKOFF_MS);
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in task_id.as_str().bytes().chain(failures.to_le_bytes()) {
        hash = (hash ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    exp + hash % (exp / 4 + 1)
}

fn reply(fx: &mut Effects, env: &Envelope, body: ReplyBody) {
    fx.publish.push(Publish {
        topic: Topic::Node(env.sender.clone()),
        body: Message::Reply(Reply {
            in_reply_to: env.id.clone(),
            body,
        }),
    });
}

/// Longest output tail or error text kept of a worker's report.
const MAX_REPORTED_TEXT: usize = 8192;

fn bounded_text(text: Option<&str>) -> Option<String> {
    text.map(|t| truncate(t, MAX_REPORTED_TEXT).to_owned())
}

/// Ids the broker made (UUIDs); anything else is refused where an id is expected.
pub fn is_valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// `s` cut to at most `max` bytes, on a character boundary (for logs and stored text).
pub(crate) fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
impl Engine {
    fn heartbeat_for_test(&mut self, jobs: &[jobz::jobfile::JobSpec], worker: &str, now: i64) {
        let status = WorkerStatus {
            name: worker.into(),
            instance: "i1".into(),
            jobs: jobs.to_vec(),
            capabilities: vec![],
            slots: 4,
            running: vec![],
            version: "t".into(),
        };
        self.registry.heartbeat(&status, now);
    }
}

#[cfg(test)]
mod tests;
