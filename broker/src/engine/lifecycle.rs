//! How runs move on: a step starts (placed, or failed at once when it cannot run), a
//! task finishes (its successors follow), a step finishes when all its tasks have, and a
//! run ends when none of its steps is pending or running. Nothing follows a task of a
//! cancelled run, and a cancelled run ends `cancelled`.

use jobz::jobfile::Delivery;
use jobz::message::{Event, Message, RunState, TaskState};
use jobz::topic::Topic;
use tracing::{debug, info, warn};

use super::effects::{Effects, Publish, Write};
use super::feed;
use super::{Engine, MAX_STEPS_PER_RUN};
use crate::ids::{RunId, StepId, TaskId};
use crate::model::{Dead, Step};
use jobz::message::FeedKind;

/// When successors start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Follow {
    /// After each task, on its worker: the `local` successors.
    EachTask,
    /// Once after the whole step: the others.
    WholeStep,
}

impl Engine {
    pub(super) fn mark_run_running(&mut self, fx: &mut Effects, run_id: &RunId, now: i64) {
        if let Some(run) = self.active.run_mut(run_id) {
            if run.state == RunState::Pending {
                run.state = RunState::Running;
                fx.writes.push(Write::Run(run.clone()));
                feed::run_event(fx, FeedKind::RunStarted, run, now);
            }
        }
    }

    /// Starts `job` as a new step of `run_id`. `origin` is the (task, worker) a `local`
    /// successor follows.
    pub(super) fn start_step(
        &mut self,
        fx: &mut Effects,
        run_id: &RunId,
        job: &str,
        origin: Option<(&TaskId, &str)>,
        now: i64,
    ) {
        let delivery = self.registry.job(job).map(|s| s.delivery);
        let step = Step {
            step_id: self.ids.step_id(),
            run_id: run_id.clone(),
            job: job.to_owned(),
            delivery: delivery.unwrap_or_default(),
            state: TaskState::Pending,
            origin_task: origin.map(|(task, _)| task.clone()),
            created_at_ms: now,
            finished_at_ms: None,
        };
        let step_id = step.step_id.clone();
        debug!(run_id = %run_id, step_id = %step_id, job = %job, "step created");
        if !self.active.insert_step(step.clone()) {
            return; // the run is not active: nothing may start in it
        }
        fx.writes.push(Write::Step(step));

        let origin_worker = origin.map(|(_, w)| w.to_owned());
        let Some(delivery) = delivery else {
            self.fail_unplaced(
                fx,
                &step_id,
                origin_worker,
                format!("unknown job {job:?}: no worker has registered it"),
                now,
            );
            return;
        };
        // A job with inputs or outputs starts only once it holds them (see `gates`).
        if !self.gate_step(fx, &step_id, run_id, job, origin_worker.clone(), now) {
            return;
        }
        self.place_new_step(fx, &step_id, delivery, origin_worker, now);
    }

    /// Places a step that may start: on the worker it follows (`local`), or on workers
    /// chosen by its delivery; else it waits in line for them.
    pub(super) fn place_new_step(
        &mut self,
        fx: &mut Effects,
        step_id: &StepId,
        delivery: Delivery,
        origin_worker: Option<String>,
        now: i64,
    ) {
        let Some(step) = self.active.step(step_id) else {
            return;
        };
        let (run_id, job) = (step.run_id.clone(), step.job.clone());
        match delivery {
            Delivery::Local => match origin_worker {
                // At its job's max_concurrency: it waits in line for room, on its worker.
                Some(_) if !self.job_has_room(&job, 1) => {
                    self.active.wait(step_id);
                    info!(run_id = %run_id, step_id = %step_id, job = %job, "step waits for room under the job's max_concurrency");
                }
                Some(worker) => self.place_local(fx, step_id, worker, now),
                None => {
                    let reason =
                        format!("job {job:?} has delivery `local` but no predecessor task");
                    self.fail_unplaced(fx, step_id, None, reason, now);
                }
            },
            Delivery::Broadcast | Delivery::Queue => self.place(fx, step_id, now),
        }
    }

    /// Records a task's final state, then starts what follows it.
    pub(super) fn finish_task(
        &mut self,
        fx: &mut Effects,
        task_id: &TaskId,
        state: TaskState,
        now: i64,
    ) {
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
        if matches!(state, TaskState::Succeeded | TaskState::Failed) {
            fx.writes.push(Write::TaskEnded(task.clone()));
        }
        if let Some(kind) = FeedKind::task_ended(state) {
            feed::task_event(fx, kind, self.active.run(&task.run_id), &task, now);
        }
        // A cancelled task did not fail: no dead-list entry, no completion for semaphores.
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
            self.dead.remember(dead);
        }
        if let Some(run) = self
            .active
            .run(&task.run_id)
            .filter(|_| state != TaskState::Cancelled)
        {
            fx.publish.push(Publish {
                topic: Topic::Events(task.job.clone()),
                body: Message::Event(Event::TaskFinished(task.completion(run.params.clone()))),
            });
        }
        // `local` successors follow each task on its own worker, before the step is judged,
        // so the run cannot end while they are still to come.
        if let Some(worker) = task.worker.clone() {
            for next in self.successors(&task.job, state, &task.run_id, Follow::EachTask) {
                self.start_step(fx, &task.run_id, &next, Some((&task.task_id, &worker)), now);
            }
        }
        self.finish_step_if_done(fx, &task.step_id, now);
        self.finish_run_if_done(fx, &task.run_id, now);
        // The task freed a slot: a waiting queue step can take it now, not at the next tick.
        self.dispatch_waiting(fx, now);
    }

    /// Successor job names of `job` after it ended in `state` (`on_success` after
    /// `Succeeded`, else `on_failure`): the `local` ones after each task, the others after
    /// the whole step.
    fn successors(
        &self,
        job: &str,
        state: TaskState,
        run_id: &RunId,
        after: Follow,
    ) -> Vec<String> {
        let Some(spec) = self.registry.job(job) else {
            return Vec::new();
        };
        if self.run_is_cancelled(run_id) {
            return Vec::new();
        }
        if self.active.step_count(run_id) >= MAX_STEPS_PER_RUN {
            warn!(run_id = %run_id, "run reached {MAX_STEPS_PER_RUN} steps; no more successors start");
            return Vec::new();
        }
        let names = if state == TaskState::Succeeded {
            &spec.on_success
        } else {
            &spec.on_failure
        };
        names
            .iter()
            .filter(|n| {
                let local = self.registry.job(n).map(|s| s.delivery) == Some(Delivery::Local);
                local == (after == Follow::EachTask)
            })
            .cloned()
            .collect()
    }

    pub(super) fn finish_step_if_done(&mut self, fx: &mut Effects, step_id: &StepId, now: i64) {
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
        let state = if states.iter().all(|s| *s == TaskState::Succeeded) {
            TaskState::Succeeded
        } else if states.contains(&TaskState::Failed) {
            TaskState::Failed
        } else {
            TaskState::Cancelled
        };
        let (run_id, job) = (step.run_id.clone(), step.job.clone());
        if let Some(step) = self.active.step_mut(step_id) {
            step.state = state;
            step.finished_at_ms = Some(now);
            fx.writes.push(Write::Step(step.clone()));
        }
        // Before its successors start: they may read what it wrote.
        self.release_resources(fx, step_id, state == TaskState::Succeeded, now);
        for next in self.successors(&job, state, &run_id, Follow::WholeStep) {
            self.start_step(fx, &run_id, &next, None, now);
        }
    }

    pub(super) fn finish_run_if_done(&mut self, fx: &mut Effects, run_id: &RunId, now: i64) {
        if self.active.step_count(run_id) == 0 {
            return;
        }
        let mut failed = false;
        for step in self.active.steps_of(run_id) {
            match step.state {
                TaskState::Succeeded => {}
                TaskState::Failed | TaskState::Cancelled => failed = true,
                TaskState::Pending | TaskState::Running => return,
            }
        }
        // The run is durable from here on; the store answers for it.
        let Some(mut run) = self.active.remove_run(run_id) else {
            return;
        };
        let was_cancelled = run.state == RunState::Cancelled;
        run.state = match (run.state, failed) {
            // Counted when it was cancelled.
            (RunState::Cancelled, _) => RunState::Cancelled,
            (_, true) => {
                self.count("runs_failed");
                RunState::Failed
            }
            (_, false) => {
                self.count("runs_succeeded");
                RunState::Succeeded
            }
        };
        if run.state != RunState::Cancelled {
            self.meters.run_ended(&run.job, run.state);
        }
        run.finished_at_ms = Some(now);
        info!(run_id = %run_id, job = %run.job, state = %run.state, "run finished");
        let state = run.state;
        // A cancelled run was told of when it was cancelled.
        fx.writes.push(Write::Run(run.clone()));
        if let Some(kind) = FeedKind::run_ended(state).filter(|_| !was_cancelled) {
            self.tell_run_ended(fx, kind, &run, now);
        }
        self.run_ended(fx, run_id, state, now);
    }
}
