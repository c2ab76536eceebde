//! The feed: what changed in runs and tasks, told as [`FeedEvent`]s (`GET /events`).
//!
//! The engine says what happened where it happens; the journal numbers the events, keeps
//! the last [`jobz::message::FEED_RETAINED`] for `Query::Feed`, and publishes each
//! commit's events as one message on the feed topic after the commit (so nobody hears of a
//! change that a crash could still undo).

use jobz::jobfile::NotifyTarget;
use jobz::message::{FeedEvent, FeedKind, FeedTask, RunState};

use super::effects::{Effects, Write};
use super::Engine;
use crate::model::{Run, Task};
use crate::notify::Notice;

impl Engine {
    /// Tells of `run`'s end (`kind` is `run.succeeded`, `run.failed` or `run.cancelled`):
    /// the feed's event, and a notice for each `notify:` entry of its job that asks for
    /// this end, journaled with the end.
    pub(super) fn tell_run_ended(&self, fx: &mut Effects, kind: FeedKind, run: &Run, now: i64) {
        run_event(fx, kind, run, now);
        let succeeded = match run.state {
            RunState::Succeeded => Some(true),
            RunState::Failed => Some(false),
            _ => None,
        };
        let job_targets = self
            .registry
            .job(&run.job)
            .map(|spec| spec.notify.as_slice())
            .unwrap_or_default()
            .iter()
            .filter(|entry| entry.on.matches(succeeded))
            .map(|entry| &entry.to);
        // The run's own targets hear of every end (`track?notify=`); a target both name is
        // told once.
        let mut told: Vec<&NotifyTarget> = Vec::new();
        for target in job_targets.chain(run.notify.iter()) {
            if !told.contains(&target) {
                let notice = Notice::of_run(run, told.len(), target.clone(), kind, now);
                fx.writes.push(Write::Notice(notice));
                told.push(target);
            }
        }
    }
}

/// Tells of a change of `run`.
pub(super) fn run_event(fx: &mut Effects, kind: FeedKind, run: &Run, now: i64) {
    fx.feed.push(FeedEvent {
        seq: 0,
        kind,
        at_ms: now,
        run_id: run.run_id.to_string(),
        job: run.job.clone(),
        run_state: run.state,
        tags: run.tags.clone(),
        tracked: run.tracked,
        task: None,
    });
}

/// Tells of a change of `task`, a task of `run` (`None`: its run has just ended and is
/// no longer held; the event then names the task's job as the run's).
pub(super) fn task_event(
    fx: &mut Effects,
    kind: FeedKind,
    run: Option<&Run>,
    task: &Task,
    now: i64,
) {
    fx.feed.push(FeedEvent {
        seq: 0,
        kind,
        at_ms: now,
        run_id: task.run_id.to_string(),
        job: run.map_or_else(|| task.job.clone(), |r| r.job.clone()),
        run_state: run.map(|r| r.state).unwrap_or_default(),
        tags: run.map(|r| r.tags.clone()).unwrap_or_default(),
        tracked: run.is_some_and(|r| r.tracked),
        task: Some(FeedTask {
            step_id: task.step_id.to_string(),
            task_id: task.task_id.to_string(),
            job: task.job.clone(),
            attempt: task.attempt,
            worker: task.worker.clone(),
            state: task.state,
        }),
    });
}
