//! Failed and lost attempts: whether a task is tried again, when and where; leases that
//! lapse; the unstarted tasks of a lost worker.

use jobz::jobfile::Delivery;
use jobz::message::{FeedKind, TaskState};
use tracing::info;

use super::active::RetryWait;
use super::effects::{Effects, Write};
use super::feed;
use super::Engine;
use crate::ids::TaskId;
use crate::model::{Attempt, Task};

/// Longest wait between retries.
const MAX_BACKOFF_MS: u64 = 10 * 60 * 1000;

/// How an attempt failed; it decides whether the task is tried again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Failure {
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

/// What becomes of a task after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RetryPlan {
    /// It failed for good (and goes to the dead list).
    GiveUp,
    /// It is tried again, as a new attempt.
    Retry {
        /// The failure counts against the job's `retries`, and the retry waits its backoff.
        uses_budget: bool,
        /// It leaves its worker (a queue task): any live worker with a free slot may take
        /// it, the previous one only if no other can.
        on_another_worker: bool,
    },
}

impl RetryPlan {
    /// The plan for a task of a `delivery` step after an attempt failed as `failure`,
    /// with `budget_left` when its job's `retries` are not used up.
    pub fn after(failure: Failure, delivery: Delivery, budget_left: bool) -> RetryPlan {
        let queue = delivery == Delivery::Queue;
        let retry = |uses_budget, on_another_worker| RetryPlan::Retry {
            uses_budget,
            on_another_worker,
        };
        match failure {
            Failure::Permanent => RetryPlan::GiveUp,
            Failure::Ran if budget_left => retry(true, queue),
            Failure::Lost if budget_left && queue => retry(true, true),
            Failure::Unstarted if queue => retry(false, true),
            _ => RetryPlan::GiveUp,
        }
    }
}

impl Engine {
    // Unstarted tasks of a lost worker go elsewhere (queue) or fail; running ones keep their
    // lease, which the worker may still renew if it was only slow.
    pub(super) fn fail_unstarted_of(
        &mut self,
        fx: &mut Effects,
        worker: &str,
        reason: &str,
        now: i64,
    ) {
        for task_id in self.unstarted_tasks_of(worker, false) {
            self.task_failed(fx, &task_id, Failure::Unstarted, reason, now);
        }
    }

    /// Unstarted queue tasks of a worker that is leaving: placed on another worker now.
    pub(super) fn replace_unstarted_queue_tasks_of(
        &mut self,
        fx: &mut Effects,
        worker: &str,
        reason: &str,
        now: i64,
    ) {
        for task_id in self.unstarted_tasks_of(worker, true) {
            self.task_failed(fx, &task_id, Failure::Unstarted, reason, now);
        }
    }

    /// Tasks given to `worker` and not started (of queue steps only, with `queue_only`),
    /// oldest first, so a replay decides in the same order.
    fn unstarted_tasks_of(&self, worker: &str, queue_only: bool) -> Vec<TaskId> {
        let mut unstarted: Vec<(i64, TaskId)> = self
            .active
            .tasks()
            .map(|t| &t.record)
            .filter(|t| t.worker.as_deref() == Some(worker) && t.state == TaskState::Pending)
            .filter(|t| {
                !queue_only
                    || self
                        .active
                        .step(&t.step_id)
                        .is_some_and(|s| s.delivery == Delivery::Queue)
            })
            .map(|t| (t.created_at_ms, t.task_id.clone()))
            .collect();
        unstarted.sort();
        unstarted.into_iter().map(|(_, id)| id).collect()
    }

    pub(super) fn expire_leases(&mut self, fx: &mut Effects, now: i64) {
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
    pub(super) fn place_retries(&mut self, fx: &mut Effects, now: i64) {
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
                    let job = &task.record.job;
                    let picked = match self.job_has_room(job, 1) {
                        true => self.pick_queue_worker(job, avoid),
                        false => None,
                    };
                    match picked {
                        Some(w) => w,
                        // No free slot, or the job is at its max_concurrency: next tick.
                        None => continue,
                    }
                }
            };
            let record = match self.active.task_mut(&task_id) {
                Some(mut t) => {
                    t.retry = None;
                    t.record.worker = Some(worker);
                    fx.writes.push(Write::Task(t.record.clone()));
                    t.record.clone()
                }
                None => continue,
            };
            let run = self.active.run(&record.run_id);
            feed::task_event(fx, FeedKind::TaskScheduled, run, &record, now);
            let step_id = record.step_id;
            self.publish_work(fx, &step_id, std::slice::from_ref(&task_id), now);
        }
    }

    /// An attempt failed: retry the task if its job and the kind of failure allow, else
    /// record it failed for good. A task of a cancelled run is never tried again: it ends
    /// cancelled.
    pub(super) fn task_failed(
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
        let cancelled = self.run_is_cancelled(&task.run_id);
        let plan = match cancelled {
            true => RetryPlan::GiveUp,
            false => RetryPlan::after(failure, delivery, task.failures < retries),
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
                // Only a report carries this attempt's output; a lost one has none.
                output_tail: match failure {
                    Failure::Ran => task.output_tail.clone(),
                    _ => String::new(),
                },
            }));
        }
        task.error = Some(error.clone());
        if failure == Failure::Lost {
            let lost = Task {
                state: TaskState::Failed,
                ..task.clone()
            };
            drop(active);
            feed::task_event(
                fx,
                FeedKind::TaskLost,
                self.active.run(&lost.run_id),
                &lost,
                now,
            );
            let Some(again) = self.active.task_mut(task_id) else {
                return;
            };
            active = again;
        }
        let task = &mut active.record;
        let RetryPlan::Retry {
            uses_budget,
            on_another_worker,
        } = plan
        else {
            task.finished_at_ms = task.finished_at_ms.or(Some(now));
            drop(active);
            let state = match cancelled {
                true => TaskState::Cancelled,
                false => TaskState::Failed,
            };
            self.finish_task(fx, task_id, state, now);
            return;
        };
        if uses_budget {
            task.failures += 1;
        }
        let delay = if uses_budget {
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
        let avoid = if on_another_worker {
            task.worker.take()
        } else {
            None
        };
        info!(run_id = %task.run_id, task_id = %task_id, job = %task.job, attempt = task.attempt,
            delay_ms = delay, error = %error, "task will be retried");
        fx.writes.push(Write::Task(task.clone()));
        let retried = task.clone();
        active.lease_expires_ms = None;
        active.last_sent_ms = None;
        active.retry = Some(RetryWait {
            not_before_ms: now + delay as i64,
            avoid,
        });
        drop(active);
        let run = self.active.run(&retried.run_id);
        feed::task_event(fx, FeedKind::TaskRetried, run, &retried, now);
        self.count("retries");
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retry_is_planned_by_the_kind_of_failure_the_delivery_and_the_budget() {
        use Delivery::{Broadcast, Local, Queue};
        use Failure::{Lost, Permanent, Ran, Unstarted};
        let retry = |uses_budget, on_another_worker| RetryPlan::Retry {
            uses_budget,
            on_another_worker,
        };
        let give_up = RetryPlan::GiveUp;
        #[rustfmt::skip]
        let table = [
            // failure,   delivery,  budget left, plan
            (Ran,       Queue,     true,  retry(true, true)),
            (Ran,       Broadcast, true,  retry(true, false)),
            (Ran,       Local,     true,  retry(true, false)),
            (Ran,       Queue,     false, give_up),
            (Lost,      Queue,     true,  retry(true, true)),
            (Lost,      Broadcast, true,  give_up),
            (Lost,      Local,     true,  give_up),
            (Lost,      Queue,     false, give_up),
            (Unstarted, Queue,     false, retry(false, true)),
            (Unstarted, Broadcast, true,  give_up),
            (Unstarted, Local,     true,  give_up),
            (Permanent, Queue,     true,  give_up),
        ];
        for (failure, delivery, budget_left, plan) in table {
            assert_eq!(
                RetryPlan::after(failure, delivery, budget_left),
                plan,
                "{failure:?} of a {delivery:?} task, budget left: {budget_left}"
            );
        }
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        assert!((1_000..=1_250).contains(&backoff_ms_for(1_000, 1, &"t".into())));
        assert!((4_000..=5_000).contains(&backoff_ms_for(1_000, 3, &"t".into())));
        assert!(backoff_ms_for(1_000, 30, &"t".into()) <= MAX_BACKOFF_MS * 5 / 4);
        assert_eq!(
            backoff_ms_for(1_000, 2, &"t".into()),
            backoff_ms_for(1_000, 2, &"t".into())
        );
    }
}
