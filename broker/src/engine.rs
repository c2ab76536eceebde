//! The broker's decisions, with no sockets and no clock of its own.
//!
//! [`Engine::on_envelope`] and [`Engine::tick`] take an event and the current time and
//! return [`Effects`]: records to journal, then messages to publish once they are durable,
//! and reads to answer from the store. The engine keeps only active runs in memory; a run
//! that ends is written and forgotten (the store answers for it from then on).
//!
//! # Layout
//! This file holds the [`Engine`], the dispatch of each message to its handler, and the
//! periodic [`Engine::tick`]. The handlers are split by concern, each an `impl Engine`:
//! - `trigger`: a trigger or a dead-task retry becomes a run (once per message id);
//! - `reports`: what workers report (heartbeats, started, finished);
//! - `placement`: which workers a step goes to, waiting steps, (re)publishing work;
//! - `retry`: failed and lost attempts, backoff, leases, lost workers;
//! - `lifecycle`: steps start, tasks, steps and runs finish, successors follow;
//! - `holds`: runs that wait before they start: scheduled until due (`delay=`, `at=`),
//!   waiting for the runs they depend on (`depends=`);
//! - `control`: what operators do to a run: cancel it, change its priority, track it;
//! - `queries`: answers from memory, or reads handed to the store;
//! - `pruned`: what the store pruned, counted and forgotten by the dead list.
//!
//! The state they share: `active` (`ActiveRuns`: runs, steps and tasks, kept consistent
//! in one place, with the indexes placement needs: per-job lines of waiting steps in
//! `waiting` ordered by priority then arrival, the load of each worker and each job,
//! tasks waiting for a retry, scheduled runs by due time, dependents), `dead` (the dead
//! list), `finished` (the final states of recently ended runs), the worker `registry`;
//! `effects` holds the types the rest of the broker sees.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use jobz::envelope::{Envelope, MessageId};
use jobz::message::{Message, Query, ReplyBody, RunState, TaskState};
use tracing::{debug, info, warn};

use crate::authority::Principal;
use crate::ids::{IdSource, RunId, TaskId};
use crate::meters::{IoMeters, JobMeters};
use crate::model::{Dead, Run, Step, Task};
use crate::registry::{CatalogEntry, Registry, Worker};
use crate::semaphore_reports::SemaphoreReports;
use active::{ActiveRuns, ActiveTask, RetryWait};
use dead::DeadList;
use effects::reply;
pub use effects::{coalesce, Effects, Publish, ReadQuery, RunAction, RunLookup, StoreRead, Write};
use holds::FinishedRuns;
use resources::Resources;
pub use resources::{Edge, Written};
use trigger::RecentTriggers;
use watchers::RunWatchers;

mod active;
mod control;
mod dead;
mod effects;
mod feed;
mod gates;
mod holds;
mod lifecycle;
mod live_output;
mod placement;
mod pruned;
mod queries;
mod recent;
mod reports;
mod resources;
mod retry;
mod trigger;
mod waiting;
mod watchers;

/// A run may not grow beyond this many steps: it stops a successor cycle (`a` → `a`).
pub const MAX_STEPS_PER_RUN: usize = 1000;

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
    /// The states of the runs that scheduled and waiting runs depend on.
    pub dependency_states: Vec<(RunId, RunState)>,
    /// Resources written (or created) and not cleared.
    pub resources: Vec<Written>,
    /// The lineage graph's edges.
    pub edges: Vec<Edge>,
}

/// Every named counter the engine keeps, present at 0 from the start so that `/metrics`
/// shows each family on a fresh mesh (a name counted but missing here still shows once
/// counted).
pub const COUNTERS: &[&str] = &[
    "cancel_redeliveries",
    "dead_retried",
    "dead_tasks_pruned",
    "duplicate_results",
    "duplicate_triggers",
    "foreign_results",
    "frames_dropped",
    "frames_received",
    "held_runs_started",
    "job_definitions_refused",
    "late_results",
    "leases_expired",
    "redeliveries",
    "results_after_run_end",
    "retries",
    "run_end_queries_answered",
    "run_end_queries_held",
    "runs_accepted",
    "runs_cancelled",
    "runs_failed",
    "runs_pruned",
    "runs_reprioritized",
    "runs_scheduled",
    "runs_succeeded",
    "runs_waiting",
    "semaphore_reports_evicted",
    "semaphore_views_trimmed",
    "stale_reports",
    "task_output_duplicates",
    "task_output_gaps",
    "task_output_pieces",
    "task_output_stale",
    "tasks_finished",
    "trigger_lookups",
    "triggers_rejected",
    "workers_left",
    "workers_lost",
    "workers_revoked",
];

/// Every reason a frame is dropped for (`frames_dropped_<reason>`): the guard's, the
/// sealing layer's, the authority's and the engine's own.
pub const DROP_REASONS: &[&str] = &[
    // guard
    "multipart",
    "sealed_but_plain_broker",
    "too_large",
    "bad_magic",
    "bad_version",
    "malformed",
    "wrong_sender",
    "before_acceptance",
    "unknown_key",
    // jobz::seal
    "unsealed",
    "malformed_sealed",
    "not_for_me",
    "untrusted_key",
    "stale",
    "replay",
    "tampered",
    "unknown_epoch",
    "nonce_quota",
    "mesh_key_mismatch",
    // authority
    "bad_sender",
    "bad_message_id",
    "wrong_role",
    "name_mismatch",
    // engine
    "unexpected",
    "bad_heartbeat",
    "bad_task_output",
];

pub struct Engine {
    config: EngineConfig,
    /// Where the ids of new runs, steps and tasks come from (given, like the time).
    ids: Box<dyn IdSource>,
    registry: Registry,
    /// Unfinished runs with their steps and tasks (a run that ends is written and forgotten).
    active: ActiveRuns,
    /// Tasks that failed for good, the newest of them.
    dead: DeadList,
    /// The barriers the semaphores last reported, bounded per principal.
    semaphores: SemaphoreReports,
    /// The run each recent trigger (or dead-task retry) made, by message id.
    triggers: RecentTriggers,
    /// How recently ended runs ended: what `depends=` needs without asking the store.
    finished: FinishedRuns,
    /// Cancelled runs taken up from the store, whose unfinished tasks the first tick stops.
    resumed_cancels: Vec<RunId>,
    /// Held runs taken up from the store whose dependency ended otherwise than in success
    /// (the store should never hold one): the first tick fails them.
    resumed_broken: Vec<(RunId, RunId, RunState)>,
    counters: BTreeMap<String, u64>,
    /// Runs ended and task times, by job.
    meters: JobMeters,
    /// Journal commit times and frames sent, kept by the journal and publisher threads.
    io: Arc<IoMeters>,
    /// Queries held until their run ends (`Query::RunEnd`).
    watchers: RunWatchers,
    /// Resources: which exist, which steps hold them, which wait (jobs' inputs/outputs).
    resources: Resources,
    /// Output of running steps as workers ship it, for log followers.
    live: live_output::LiveOutputs,
    /// What placement has looked at (waiting steps, tasks counted, candidate workers): the
    /// work the drain test holds to a bound per placement, whatever the backlog.
    placement_work: std::cell::Cell<u64>,
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
            dead: DeadList::restore(snapshot.dead),
            semaphores: SemaphoreReports::default(),
            triggers: RecentTriggers::default(),
            finished: FinishedRuns::default(),
            resumed_cancels: Vec::new(),
            resumed_broken: Vec::new(),
            counters: COUNTERS
                .iter()
                .map(|name| ((*name).to_owned(), 0))
                .chain(
                    DROP_REASONS
                        .iter()
                        .map(|reason| (format!("frames_dropped_{reason}"), 0)),
                )
                .collect(),
            meters: JobMeters::default(),
            io: Arc::default(),
            placement_work: Default::default(),
            live: live_output::LiveOutputs::default(),
            watchers: RunWatchers::default(),
            resources: Resources::restore(
                snapshot
                    .resources
                    .into_iter()
                    .filter(|w| w.expires_at_ms.is_none_or(|t| t > now_ms))
                    .collect(),
                snapshot.edges,
            ),
        };
        for (request, run) in snapshot.recent_requests {
            engine.triggers.remember(request, run);
        }
        let dependency_states: HashMap<RunId, RunState> =
            snapshot.dependency_states.into_iter().collect();
        engine.resume(
            snapshot.runs,
            snapshot.steps,
            snapshot.tasks,
            &dependency_states,
            now_ms,
        );
        engine
    }

    /// Takes up the unfinished runs of a snapshot. A step or task whose run the snapshot
    /// does not hold cannot be finished or answered for: it is left out, with a warning.
    /// A held run waits again for those of its dependencies still unfinished; a cancelled
    /// one has its unfinished tasks stopped at the first tick.
    fn resume(
        &mut self,
        runs: Vec<Run>,
        steps: Vec<Step>,
        tasks: Vec<Task>,
        dependency_states: &HashMap<RunId, RunState>,
        now_ms: i64,
    ) {
        let unfinished: BTreeSet<RunId> = runs.iter().map(|r| r.run_id.clone()).collect();
        for run in runs {
            let mut waiting_for = BTreeSet::new();
            if run.state.is_held() {
                for dependency in &run.depends_on {
                    if unfinished.contains(dependency) {
                        waiting_for.insert(dependency.clone());
                        continue;
                    }
                    // Gone from the store, it was pruned, so it had ended; had it failed,
                    // this run would have failed in the same commit: it succeeded.
                    match dependency_states.get(dependency) {
                        Some(RunState::Succeeded) | None => {}
                        Some(state) => self.resumed_broken.push((
                            run.run_id.clone(),
                            dependency.clone(),
                            *state,
                        )),
                    }
                }
            }
            if run.state == RunState::Cancelled {
                self.resumed_cancels.push(run.run_id.clone());
            }
            self.active.insert_run(run, waiting_for);
        }
        let mut orphans = 0;
        let mut unfinished_steps = Vec::new();
        for step in steps {
            let (step_id, pending) = (step.step_id.clone(), step.state == TaskState::Pending);
            if !step.state.is_final() {
                unfinished_steps.push(step_id.clone());
            }
            let cancelled = self.run_is_cancelled(&step.run_id);
            if !self.active.insert_step(step) {
                orphans += 1;
            } else if pending && !cancelled {
                self.active.wait(&step_id);
            }
        }
        for record in tasks {
            let cancelled = self.run_is_cancelled(&record.run_id);
            let mut task = ActiveTask::new(record);
            // Leases restart with the broker: each worker gets a full lease to renew.
            if task.record.state == TaskState::Running {
                task.lease_expires_ms = Some(now_ms + self.config.lease_timeout_ms);
            }
            // A pending task may never have reached its worker before the broker stopped:
            // publish it again at the first tick (placed ones) or place it (retries). The
            // tasks of a cancelled run are stopped instead (`resumed_cancels`).
            if task.record.state == TaskState::Pending && !cancelled {
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
        self.resume_resources(&unfinished_steps, now_ms);
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

    /// Notes `n` things placement looked at.
    fn placement_work(&self, n: usize) {
        self.placement_work
            .set(self.placement_work.get() + n as u64);
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
        // A reason missing from the list would not show at 0 before its first drop: every
        // test that makes a frame be dropped checks the list (debug builds).
        debug_assert!(
            DROP_REASONS.contains(&reason),
            "frames_dropped_{reason} is not in DROP_REASONS"
        );
        self.count("frames_dropped");
        self.count(&format!("frames_dropped_{reason}"));
    }

    /// What the journal and publisher threads measure, shown with the engine's health.
    pub fn io_meters(&self) -> Arc<IoMeters> {
        Arc::clone(&self.io)
    }

    pub fn active_runs(&self) -> usize {
        self.active.run_count()
    }

    /// Whether `run_id` is active and cancelled (its tasks are being stopped).
    fn run_is_cancelled(&self, run_id: &RunId) -> bool {
        self.active
            .run(run_id)
            .is_some_and(|r| r.state == RunState::Cancelled)
    }

    /// Handles one message that [`crate::authority::authorize`] let through for `from`: its
    /// sender may send it and every name in it is the sender's own.
    pub fn on_envelope(&mut self, mut env: Envelope, from: &Principal, now: i64) -> Effects {
        let mut fx = Effects::default();
        self.count("frames_received");
        // The handlers read the envelope's id and sender, never its body: taken out rather
        // than copied (a result carries up to 4 KiB of output).
        let body = std::mem::replace(&mut env.body, Message::Query(Query::Health));
        match body {
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
            Message::TaskOutput(output) => self.on_task_output(output),
            Message::Query(query) => self.on_query(&mut fx, &env, query, now),
            Message::RetryDead { task_id } => {
                self.on_retry_dead(&mut fx, &env, &TaskId::from(task_id), now)
            }
            Message::SemaphoreStatus {
                barriers,
                schedules,
            } => {
                let principal = from.to_string();
                let recorded =
                    self.semaphores
                        .record(&principal, &env.sender, barriers, schedules, now);
                self.count_by("semaphore_views_trimmed", recorded.trimmed as u64);
                self.count_by("semaphore_reports_evicted", recorded.evicted as u64);
            }
            Message::CancelRun { run_id, force } => {
                self.on_cancel_run(&mut fx, &env, &RunId::from(run_id), force, from, now)
            }
            Message::PrioritizeRun { run_id, priority } => {
                self.on_prioritize_run(&mut fx, &env, &RunId::from(run_id), priority, now)
            }
            Message::TrackRun {
                run_id,
                tracked,
                notify,
            } => self.on_track_run(&mut fx, &env, &RunId::from(run_id), tracked, notify, now),
            Message::ControlResource { name, action } => {
                self.on_control_resource(&mut fx, &env, name, action, now)
            }
            Message::ForgetWorker { name } => self.on_forget_worker(&mut fx, &env, name),
            // `authorize` lets none of these through; dropped all the same should it change.
            Message::Reply(_) | Message::Work(_) | Message::CancelWork(_) | Message::Event(_) => {
                self.count_dropped_frame("unexpected");
                warn!(sender = %env.sender, "dropping a broker-to-client message sent to the broker");
            }
        }
        self.answer_watchers(&mut fx);
        fx
    }

    /// A trigger handed back by the journal with the states of the runs it depends on
    /// that only the store knew (see [`RunLookup`]).
    pub fn on_lookup(&mut self, lookup: RunLookup, now: i64) -> Effects {
        let mut fx = Effects::default();
        let RunLookup { mut env, known, .. } = lookup;
        let body = std::mem::replace(&mut env.body, Message::Query(Query::Health));
        match body {
            Message::Trigger(request) => self.trigger(&mut fx, &env, request, known, now),
            _ => {
                warn!(sender = %env.sender, "a lookup for something other than a trigger; dropped")
            }
        }
        self.answer_watchers(&mut fx);
        fx
    }

    /// Periodic duties: expire silent workers, republish unstarted tasks and cancels,
    /// start runs that came due, place waiting steps.
    pub fn tick(&mut self, now: i64) -> Effects {
        let mut fx = Effects::default();
        self.resume_fixups(&mut fx, now);
        let active = &self.active;
        self.live.retire(now, |task_id, attempt| {
            active
                .task(task_id)
                .is_some_and(|t| t.record.attempt == attempt && !t.record.state.is_final())
        });
        let expiry = self.config.worker_expiry_ms;
        for expired in self.registry.expire(now, expiry) {
            let worker = expired.name;
            let reason = if expired.left {
                info!(worker = %worker, "worker left");
                self.count("workers_left");
                fx.writes.push(Write::WorkerForgotten {
                    name: worker.clone(),
                });
                format!("worker {worker} left before starting the task")
            } else {
                warn!(worker = %worker, "worker lost: no heartbeat for {} ms", expiry);
                self.count("workers_lost");
                format!(
                    "worker {worker} lost before starting the task: no heartbeat for {} s",
                    expiry / 1000
                )
            };
            self.fail_unstarted_of(&mut fx, &worker, &reason, now);
        }
        self.expire_leases(&mut fx, now);
        self.redeliver(&mut fx, now);
        self.release_due(&mut fx, now);
        self.place_retries(&mut fx, now);
        self.dispatch_waiting(&mut fx, now);
        self.semaphores.prune(now);
        // Expired outputs count as missing already; this forgets them (the store keeps
        // them, with their expiry, and leaves them out at the next start).
        self.resources.expire(now);
        self.answer_watchers(&mut fx);
        self.watchers.expire(now);
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
        self.answer_watchers(&mut fx);
        fx
    }
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
        let status = jobz::message::WorkerStatus {
            name: worker.into(),
            instance: "i1".into(),
            jobs: jobs.to_vec(),
            capabilities: vec![],
            slots: 4,
            running: vec![],
            version: "t".into(),
            counters: Default::default(),
            leaving: false,
        };
        self.registry.heartbeat(&status, now);
    }
}

#[cfg(test)]
mod tests;
