//! What an operator does to a run: cancel it, change its priority, mark it tracked (and to
//! a worker: forget it once it is lost or leaving). Each
//! is answered with the run as the store holds it once the change is committed (a read
//! after the writes), or with why not.
//!
//! Cancelling a held run (scheduled, waiting) or one whose steps all wait ends it at once.
//! A run with tasks out on workers is `cancelled` at once and ends when they are stopped:
//! tasks waiting for a retry and steps waiting for a slot are withdrawn; each task on a
//! worker (published, or running) gets a [`CancelWork`] on its job's topic, published
//! again every `redeliver_after` until the worker reports the task; the worker kills its
//! process group, drops it from its queue, or refuses it if it never saw it. A task of a
//! cancelled run is never retried and starts no successor; a worker lost meanwhile ends
//! its tasks as cancelled too. The runs that wait for a cancelled run fail with that
//! reason; cancelling a run others wait for needs `force`.

use jobz::envelope::Envelope;
use jobz::jobfile::NotifyTarget;
use jobz::message::{Assignment, CancelWork, Message, ReplyBody, RunState, TaskRef, TaskState};
use jobz::topic::Topic;
use tracing::info;

use super::effects::{read, reply, Effects, Publish, ReadQuery, RunAction, Write};
use super::feed;
use super::Engine;
use crate::authority::Principal;
use crate::ids::{RunId, StepId, TaskId};
use crate::registry::ForgetRefusal;
use jobz::message::FeedKind;

/// The error of a task withdrawn before it reached a worker because its run was cancelled.
pub(super) const WITHDRAWN: &str = "withdrawn: the run was cancelled";

impl Engine {
    pub(super) fn on_cancel_run(
        &mut self,
        fx: &mut Effects,
        env: &Envelope,
        run_id: &RunId,
        force: bool,
        from: &Principal,
        now: i64,
    ) {
        let Some(run) = self.active.run(run_id) else {
            let action = RunAction::Cancel;
            let run_id = run_id.clone();
            return read(fx, env, ReadQuery::EndedRun { run_id, action });
        };
        if run.state == RunState::Cancelled {
            // Cancelling is idempotent: the run as it stands.
            return read(fx, env, ReadQuery::Run(run_id.clone()));
        }
        let dependents: Vec<String> = self
            .active
            .dependents_of(run_id)
            .map(RunId::to_string)
            .collect();
        if !dependents.is_empty() && !force {
            let error = format!(
                "runs wait for run {run_id}: {}; cancel it with force=1 to fail them too",
                dependents.join(", ")
            );
            return reply(fx, env, ReplyBody::Rejected { status: 409, error });
        }
        let held = run.state.is_held();
        self.meters.run_ended(&run.job.clone(), RunState::Cancelled);
        let reason = format!("cancelled through {from}");
        info!(run_id = %run_id, job = %run.job, state = %run.state, sender = %env.sender, "run cancelled");
        self.count("runs_cancelled");
        if held {
            if let Some(mut run) = self.active.remove_run(run_id) {
                run.state = RunState::Cancelled;
                run.finished_at_ms = Some(now);
                run.reason = Some(reason);
                fx.writes.push(Write::Run(run.clone()));
                self.tell_run_ended(fx, FeedKind::RunCancelled, &run, now);
            }
        } else if let Some(run) = self.active.run_mut(run_id) {
            run.state = RunState::Cancelled;
            run.reason = Some(reason);
            let run = run.clone();
            fx.writes.push(Write::Run(run.clone()));
            self.tell_run_ended(fx, FeedKind::RunCancelled, &run, now);
        }
        // It can no longer succeed: the runs waiting for it fail now.
        self.run_ended(fx, run_id, RunState::Cancelled, now);
        if !held {
            self.stop_cancelled(fx, run_id, now);
        }
        read(fx, env, ReadQuery::Run(run_id.clone()));
    }

    /// Stops what is left of a cancelled run: steps waiting for a worker, a slot or room
    /// are cancelled, tasks waiting for a retry withdrawn, and each task out on a worker is
    /// told to stop ([`CancelWork`]). The run ends when none is left.
    pub(super) fn stop_cancelled(&mut self, fx: &mut Effects, run_id: &RunId, now: i64) {
        let steps: Vec<StepId> = self
            .active
            .steps_of(run_id)
            .filter(|s| !s.state.is_final())
            .map(|s| s.step_id.clone())
            .collect();
        for step_id in steps {
            let tasks: Vec<TaskId> = self
                .active
                .tasks_of(&step_id)
                .filter(|t| !t.record.state.is_final())
                .map(|t| t.record.task_id.clone())
                .collect();
            if self.active.tasks_of(&step_id).next().is_none() {
                // It never had a task: it waited for a worker, a slot, room or resources.
                self.active.stop_waiting(&step_id);
                self.release_resources(fx, &step_id, false, now);
                if let Some(step) = self.active.step_mut(&step_id) {
                    step.state = TaskState::Cancelled;
                    step.finished_at_ms = Some(now);
                    fx.writes.push(Write::Step(step.clone()));
                }
                continue;
            }
            let mut on_workers = Vec::new();
            for task_id in tasks {
                let Some(mut task) = self.active.task_mut(&task_id) else {
                    continue;
                };
                if task.record.worker.is_some() && task.retry.is_none() {
                    // Published or running: only its worker can stop it.
                    task.last_sent_ms = None;
                    task.cancel_sent_ms = Some(now);
                    on_workers.push(task_id);
                } else {
                    task.retry = None;
                    task.record.error = Some(WITHDRAWN.into());
                    drop(task);
                    self.finish_task(fx, &task_id, TaskState::Cancelled, now);
                }
            }
            self.publish_cancel(fx, &step_id, &on_workers);
        }
        self.finish_run_if_done(fx, run_id, now);
    }

    /// Tells the workers of `task_ids` (tasks of one step) to stop them.
    pub(super) fn publish_cancel(
        &mut self,
        fx: &mut Effects,
        step_id: &StepId,
        task_ids: &[TaskId],
    ) {
        let Some(step) = self.active.step(step_id) else {
            return;
        };
        let assignments: Vec<Assignment> = task_ids
            .iter()
            .filter_map(|id| self.active.task(id))
            .filter_map(|t| {
                Some(Assignment {
                    worker: t.record.worker.clone()?,
                    task: TaskRef {
                        task_id: t.record.task_id.to_string(),
                        attempt: t.record.attempt,
                    },
                })
            })
            .collect();
        if assignments.is_empty() {
            return;
        }
        fx.publish.push(Publish {
            topic: Topic::Job(step.job.clone()),
            body: Message::CancelWork(CancelWork {
                run_id: step.run_id.to_string(),
                step_id: step_id.to_string(),
                job: step.job.clone(),
                assignments,
            }),
        });
    }

    pub(super) fn on_prioritize_run(
        &mut self,
        fx: &mut Effects,
        env: &Envelope,
        run_id: &RunId,
        priority: i32,
        now: i64,
    ) {
        let Some(run) = self.active.run(run_id) else {
            let action = RunAction::Prioritize;
            let run_id = run_id.clone();
            return read(fx, env, ReadQuery::EndedRun { run_id, action });
        };
        if run.state == RunState::Cancelled {
            let error = format!("run {run_id} is cancelled: its priority no longer matters");
            return reply(fx, env, ReplyBody::Rejected { status: 409, error });
        }
        info!(run_id = %run_id, job = %run.job, from = run.priority, to = priority, sender = %env.sender,
            "run priority changed");
        self.active.set_priority(run_id, priority);
        self.count("runs_reprioritized");
        if let Some(run) = self.active.run(run_id) {
            fx.writes.push(Write::Run(run.clone()));
            feed::run_event(fx, FeedKind::RunUpdated, run, now);
        }
        read(fx, env, ReadQuery::Run(run_id.clone()));
    }

    pub(super) fn on_track_run(
        &mut self,
        fx: &mut Effects,
        env: &Envelope,
        run_id: &RunId,
        tracked: bool,
        notify: Vec<NotifyTarget>,
        now: i64,
    ) {
        match self.active.run_mut(run_id) {
            Some(run) => {
                run.tracked = tracked;
                for target in notify {
                    if !run.notify.contains(&target) && run.notify.len() < MAX_RUN_NOTIFY {
                        run.notify.push(target);
                    }
                }
                fx.writes.push(Write::Run(run.clone()));
                feed::run_event(fx, FeedKind::RunUpdated, run, now);
            }
            // Nobody can be told of an end that has passed: 409 (or 404 if unknown).
            None if !notify.is_empty() => {
                let action = RunAction::Notify;
                let run_id = run_id.clone();
                return read(fx, env, ReadQuery::EndedRun { run_id, action });
            }
            // An ended run is tracked in the store alone; an unknown one is answered 404.
            None => fx.writes.push(Write::Tracked {
                run_id: run_id.clone(),
                tracked,
            }),
        }
        read(fx, env, ReadQuery::Run(run_id.clone()));
    }

    /// An operator forgets a worker that is lost or leaving: it leaves the list and the
    /// store. A live one is refused: stopped cleanly, it leaves by itself.
    pub(super) fn on_forget_worker(&mut self, fx: &mut Effects, env: &Envelope, name: String) {
        match self.registry.forget(&name) {
            Ok(()) => {
                info!(worker = %name, sender = %env.sender, "worker forgotten by an operator");
                fx.writes.push(Write::WorkerForgotten { name });
                reply(fx, env, ReplyBody::Ack);
            }
            Err(ForgetRefusal::Unknown) => reply(
                fx,
                env,
                ReplyBody::Rejected {
                    status: 404,
                    error: format!("no worker {name:?}"),
                },
            ),
            Err(ForgetRefusal::Live) => reply(
                fx,
                env,
                ReplyBody::Rejected {
                    status: 409,
                    error: format!(
                        "worker {name:?} is live; a worker stopped cleanly leaves the list by \
                         itself, a lost one can be forgotten once its heartbeats have expired"
                    ),
                },
            ),
        }
    }
}

/// Most targets one run's end is told to (beyond its job's own `notify:`).
pub(super) const MAX_RUN_NOTIFY: usize = 8;
