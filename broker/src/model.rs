//! The broker's records of runs, steps and tasks, and their conversion to API views.
//!
//! A *run* is everything one trigger set off. A *step* is one job started within a run
//! (by the trigger or as a successor). A *task* is a step on one worker: a broadcast step
//! has one task per live worker, a queue or local step exactly one.

use jobz::jobfile::{Delivery, NotifyTarget};
use jobz::message::{
    AttemptView, Completion, DeadView, Params, RunState, RunView, StepView, TaskRef, TaskState,
};

use crate::ids::{RunId, StepId, TaskId};

/// One run.
#[derive(Debug, Clone, PartialEq)]
pub struct Run {
    pub run_id: RunId,
    pub job: String,
    pub params: Params,
    pub state: RunState,
    pub parent_runs: Vec<RunId>,
    /// Message id of the trigger, for ingesting a resent trigger once.
    pub request_id: String,
    pub created_at_ms: i64,
    pub finished_at_ms: Option<i64>,
    /// Its steps' place in the waiting line: higher first.
    pub priority: i32,
    /// Its job's tags and its trigger's.
    pub tags: Vec<String>,
    /// Marked for attention by an operator.
    pub tracked: bool,
    /// Not started before this time (`delay=`, `at=`).
    pub not_before_ms: Option<i64>,
    /// Runs that had to succeed before it could start.
    pub depends_on: Vec<RunId>,
    /// Why it ended as it did when no step says so.
    pub reason: Option<String>,
    /// Told when it ends, however it ends (`POST /runs/{id}/track?notify=`).
    pub notify: Vec<NotifyTarget>,
}

impl Run {
    /// A new run of `job` in `state`, with no priority, tags, delay or dependencies.
    pub fn new(
        run_id: RunId,
        job: &str,
        params: Params,
        state: RunState,
        request_id: String,
        now: i64,
    ) -> Run {
        Run {
            run_id,
            job: job.to_owned(),
            params,
            state,
            parent_runs: Vec::new(),
            request_id,
            created_at_ms: now,
            finished_at_ms: None,
            priority: 0,
            tags: Vec::new(),
            tracked: false,
            not_before_ms: None,
            depends_on: Vec::new(),
            reason: None,
            notify: Vec::new(),
        }
    }
}

/// One step of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub step_id: StepId,
    pub run_id: RunId,
    pub job: String,
    pub delivery: Delivery,
    /// `Pending` while no worker could take it; then `Running` until every task is final.
    pub state: TaskState,
    /// For a `local` successor: the task whose worker runs it.
    pub origin_task: Option<TaskId>,
    pub created_at_ms: i64,
    pub finished_at_ms: Option<i64>,
}

/// One step on one worker.
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    pub task_id: TaskId,
    pub step_id: StepId,
    pub run_id: RunId,
    pub job: String,
    /// `None` only for a task that failed before any worker was chosen (unknown job).
    pub worker: Option<String>,
    pub state: TaskState,
    /// Attempt number, from 1; every retry or reassignment takes the next one, so a late
    /// report from an older attempt is told apart (fencing).
    pub attempt: u32,
    /// Failed attempts so far, counted against the job's `retries`.
    pub failures: u32,
    /// Tasks the broadcast behind this task reached (see `Completion::fanout`).
    pub fanout: u32,
    pub exit_code: Option<i32>,
    pub error: Option<String>,
    /// Worker process that started it; a different one later means the attempt was lost.
    pub instance: Option<String>,
    pub created_at_ms: i64,
    pub started_at_ms: Option<i64>,
    pub finished_at_ms: Option<i64>,
    /// When the broker recorded the final state (its own clock): what completion catch-up
    /// pages by, since `finished_at_ms` is the worker's clock and a result may come late.
    pub recorded_at_ms: Option<i64>,
    pub output_tail: String,
}

/// One finished attempt of a task, kept as history (also late reports of old attempts).
#[derive(Debug, Clone, PartialEq)]
pub struct Attempt {
    pub task_id: TaskId,
    pub run_id: RunId,
    pub attempt: u32,
    pub worker: Option<String>,
    pub state: TaskState,
    pub exit_code: Option<i32>,
    pub error: Option<String>,
    pub started_at_ms: Option<i64>,
    pub finished_at_ms: i64,
    /// Reported after a newer attempt had taken over; recorded, never applied.
    pub late: bool,
    /// The end of its output as the worker reported it (empty if it never reported).
    pub output_tail: String,
}

/// A task that failed for good.
#[derive(Debug, Clone, PartialEq)]
pub struct Dead {
    pub task_id: TaskId,
    pub run_id: RunId,
    pub step_id: StepId,
    pub job: String,
    pub worker: Option<String>,
    pub params: Params,
    pub attempts: u32,
    pub error: Option<String>,
    pub exit_code: Option<i32>,
    pub failed_at_ms: i64,
    pub retried_as: Option<RunId>,
}

impl Dead {
    pub fn view(&self) -> DeadView {
        DeadView {
            task_id: self.task_id.to_string(),
            run_id: self.run_id.to_string(),
            step_id: self.step_id.to_string(),
            job: self.job.clone(),
            worker: self.worker.clone(),
            params: self.params.clone(),
            attempts: self.attempts,
            error: self.error.clone(),
            exit_code: self.exit_code,
            failed_at_ms: self.failed_at_ms,
            retried_as: self.retried_as.as_ref().map(RunId::to_string),
        }
    }
}

impl Attempt {
    pub fn view(&self) -> AttemptView {
        AttemptView {
            task_id: self.task_id.to_string(),
            attempt: self.attempt,
            worker: self.worker.clone(),
            state: self.state,
            exit_code: self.exit_code,
            error: self.error.clone(),
            started_at_ms: self.started_at_ms,
            finished_at_ms: self.finished_at_ms,
            late: self.late,
            output_tail: self.output_tail.clone(),
        }
    }
}

impl Task {
    /// The completion event of a finished task.
    pub fn completion(&self, params: Params) -> Completion {
        Completion {
            run_id: self.run_id.to_string(),
            step_id: self.step_id.to_string(),
            task: TaskRef {
                task_id: self.task_id.to_string(),
                attempt: self.attempt,
            },
            job: self.job.clone(),
            worker: self.worker.clone().unwrap_or_default(),
            params,
            state: self.state,
            finished_at_ms: self
                .recorded_at_ms
                .or(self.finished_at_ms)
                .unwrap_or(self.created_at_ms),
            fanout: self.fanout,
        }
    }

    pub fn view(&self) -> StepView {
        StepView {
            step_id: self.step_id.to_string(),
            task_id: self.task_id.to_string(),
            job: self.job.clone(),
            worker: self.worker.clone(),
            state: self.state,
            attempt: self.attempt,
            exit_code: self.exit_code,
            error: self.error.clone(),
            started_at_ms: self.started_at_ms,
            finished_at_ms: self.finished_at_ms,
            output_tail: self.output_tail.clone(),
        }
    }
}

impl Step {
    /// The placeholder the API shows for a step that has no task: one waiting for a live
    /// worker, a free slot or its job's `max_concurrency`, or one cancelled while it waited.
    pub fn waiting_view(&self) -> StepView {
        let (state, error) = match self.state {
            TaskState::Cancelled => (TaskState::Cancelled, "cancelled before it was placed"),
            _ => (
                TaskState::Pending,
                "waiting for a live worker that serves this job, a free slot, or room under \
                 the job's max_concurrency",
            ),
        };
        StepView {
            step_id: self.step_id.to_string(),
            task_id: String::new(),
            job: self.job.clone(),
            worker: None,
            state,
            attempt: 0,
            exit_code: None,
            error: Some(error.into()),
            started_at_ms: None,
            finished_at_ms: None,
            output_tail: String::new(),
        }
    }
}

impl Run {
    /// The run as the API shows it; `waiting_for` are the runs it depends on that have not
    /// succeeded yet (only a held run has any).
    pub fn view(
        &self,
        steps: Vec<StepView>,
        attempts: Vec<AttemptView>,
        waiting_for: Vec<String>,
    ) -> RunView {
        RunView {
            run_id: self.run_id.to_string(),
            job: self.job.clone(),
            params: self.params.clone(),
            state: self.state,
            parent_runs: self.parent_runs.iter().map(RunId::to_string).collect(),
            created_at_ms: self.created_at_ms,
            finished_at_ms: self.finished_at_ms,
            steps,
            attempts,
            priority: self.priority,
            tags: self.tags.clone(),
            tracked: self.tracked,
            not_before_ms: self.not_before_ms,
            depends_on: self.depends_on.iter().map(RunId::to_string).collect(),
            waiting_for,
            child_runs: Vec::new(),
            notify: self.notify.clone(),
            reason: self.reason.clone(),
        }
    }
}

pub fn delivery_name(d: Delivery) -> &'static str {
    match d {
        Delivery::Broadcast => "broadcast",
        Delivery::Queue => "queue",
        Delivery::Local => "local",
    }
}

pub fn parse_delivery(s: &str) -> Option<Delivery> {
    match s {
        "broadcast" => Some(Delivery::Broadcast),
        "queue" => Some(Delivery::Queue),
        "local" => Some(Delivery::Local),
        _ => None,
    }
}
