//! What workers report: heartbeats (registration, lease renewal, restarts), a task
//! started, its output while it runs, a task finished. A report is applied only for the attempt the worker holds
//! (fencing); a late one is recorded as history, a foreign one dropped.

use jobz::envelope::Envelope;
use jobz::jobfile::is_valid_name;
use jobz::message::{
    ReplyBody, TaskFinished, TaskOutcome, TaskOutput, TaskStarted, TaskState, WorkerStatus,
    TASK_OUTPUT_CHUNK_BYTES, TASK_OUTPUT_LIVE_CAP,
};
use tracing::{debug, info, warn};

use super::effects::{reply, Effects, Write};
use super::feed;
use super::retry::Failure;
use super::{live_output, truncate, Engine};
use crate::ids::{RunId, StepId, TaskId};
use crate::model::Attempt;
use jobz::message::FeedKind;

/// Longest output tail or error text kept of a worker's report.
pub(super) const MAX_REPORTED_TEXT: usize = 8192;

impl Engine {
    /// Queue wait of a step whose first attempt just started (`first`: its step and job):
    /// from the step's creation to now, both on the broker's clock.
    fn note_queue_wait(&mut self, first: Option<(StepId, String)>, now: i64) {
        let Some((step_id, job)) = first else {
            return;
        };
        if let Some(step) = self.active.step(&step_id) {
            self.meters.step_waited(&job, now - step.created_at_ms);
        }
    }

    pub(super) fn on_heartbeat(
        &mut self,
        fx: &mut Effects,
        env: &Envelope,
        status: WorkerStatus,
        now: i64,
    ) {
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
            let mut started_run = None;
            let mut first = None;
            if task.record.state == TaskState::Pending {
                first = (task.record.attempt == 1)
                    .then(|| (task.record.step_id.clone(), task.record.job.clone()));
                task.record.state = TaskState::Running;
                task.record.started_at_ms = Some(now);
                task.record.instance = Some(status.instance.clone());
                task.last_sent_ms = None;
                fx.writes.push(Write::Task(task.record.clone()));
                started_run = Some(task.record.clone());
            }
            if task.record.state == TaskState::Running {
                task.lease_expires_ms = Some(now + self.config.lease_timeout_ms);
            }
            drop(task);
            self.note_queue_wait(first, now);
            // As `TaskStarted` would: the run runs once any of its tasks does.
            if let Some(started) = started_run {
                let run = self.active.run(&started.run_id);
                feed::task_event(fx, FeedKind::TaskStarted, run, &started, now);
                self.mark_run_running(fx, &started.run_id, now);
            }
        }
        if reg.started_leaving {
            // After the renewals above: what it says it runs is running, not unstarted.
            info!(worker = %status.name, running = status.running.len(),
                "worker leaving: it gets no new work and drains what it runs");
            // Queue tasks it was given but has not started (it hands them back) go to
            // another worker now; a broadcast task waits for it to come back (a restart)
            // until its heartbeats expire.
            let reason = format!("worker {} left before starting the task", status.name);
            self.replace_unstarted_queue_tasks_of(fx, &status.name, &reason, now);
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

    pub(super) fn on_started(
        &mut self,
        fx: &mut Effects,
        env: &Envelope,
        started: TaskStarted,
        now: i64,
    ) {
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
            debug!(run_id = %t.run_id, task_id = %t.task_id, job = %t.job, worker = %started.worker, "task started");
            let run_id = t.run_id.clone();
            fx.writes.push(Write::Task(t.clone()));
            let t = t.clone();
            let first = (t.attempt == 1).then(|| (t.step_id.clone(), t.job.clone()));
            drop(task);
            self.note_queue_wait(first, now);
            feed::task_event(fx, FeedKind::TaskStarted, self.active.run(&run_id), &t, now);
            self.mark_run_running(fx, &run_id, now);
        }
        reply(fx, env, ReplyBody::Ack);
    }

    /// A piece of a running attempt's output: kept for log followers if the attempt is
    /// current, run by its sender, and not over; counted and dropped otherwise.
    pub(super) fn on_task_output(&mut self, output: TaskOutput) {
        let bounded = output.bytes <= TASK_OUTPUT_CHUNK_BYTES as u64
            && output.text.len() <= 4 * TASK_OUTPUT_CHUNK_BYTES
            && output.offset <= TASK_OUTPUT_LIVE_CAP;
        if !bounded {
            self.count_dropped_frame("bad_task_output");
            warn!(worker = %output.worker, task_id = %output.task.task_id,
                "dropping task output beyond the bounds of a piece");
            return;
        }
        let task_id = TaskId::from(output.task.task_id.as_str());
        if !self.is_current_attempt(&task_id, output.task.attempt, Some(&output.worker))
            || !self.live.is_open(&task_id, output.task.attempt)
        {
            self.count("task_output_stale");
            return;
        }
        match self.live.take(output) {
            live_output::Taken::Appended => self.count("task_output_pieces"),
            live_output::Taken::AppendedAfterGap => {
                self.count("task_output_pieces");
                self.count("task_output_gaps");
            }
            live_output::Taken::Duplicate => self.count("task_output_duplicates"),
        }
    }

    /// Whether `attempt` of `task_id` is unfinished and current (run by `worker`, if
    /// given).
    pub(super) fn is_current_attempt(
        &self,
        task_id: &TaskId,
        attempt: u32,
        worker: Option<&str>,
    ) -> bool {
        self.active.task(task_id).is_some_and(|t| {
            t.record.attempt == attempt
                && !t.record.state.is_final()
                && worker.is_none_or(|w| t.record.worker.as_deref() == Some(w))
        })
    }

    pub(super) fn on_finished(
        &mut self,
        fx: &mut Effects,
        env: &Envelope,
        finished: TaskFinished,
        now: i64,
    ) {
        let state = match finished.outcome {
            TaskOutcome::Succeeded => TaskState::Succeeded,
            TaskOutcome::Cancelled => TaskState::Cancelled,
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
            output_tail: truncate(&finished.output_tail, MAX_REPORTED_TEXT).to_owned(),
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
        self.mark_run_running(fx, &run_id, now);
        self.count("tasks_finished");
        self.meters
            .task_ran(&task.job, finished.finished_at_ms - finished.started_at_ms);
        // Ack first: it is published after the commit that records the result.
        reply(fx, env, ReplyBody::Ack);
        // A worker stops a task as cancelled only when its run was; said of a run that was
        // not, it is a failure like any other.
        let cancelled = state == TaskState::Cancelled && self.run_is_cancelled(&run_id);
        if state == TaskState::Succeeded || cancelled {
            self.finish_task(fx, &task_id, state, now);
        } else {
            let reason = match (finished.outcome, finished.exit_code) {
                (TaskOutcome::TimedOut, _) => "timed out".to_owned(),
                (TaskOutcome::Cancelled, _) => "cancelled on the worker".to_owned(),
                (_, Some(code)) => format!("exit code {code}"),
                (_, None) => "failed".to_owned(),
            };
            self.task_failed(fx, &task_id, Failure::Ran, &reason, now);
        }
    }
}

fn bounded_text(text: Option<&str>) -> Option<String> {
    text.map(|t| truncate(t, MAX_REPORTED_TEXT).to_owned())
}
