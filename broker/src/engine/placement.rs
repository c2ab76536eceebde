//! Where work goes: the workers of a broadcast or queue step, steps that wait for a live
//! worker or a free slot, and work published (and published again until started).

use std::collections::BTreeMap;

use jobz::jobfile::Delivery;
use jobz::message::{Assignment, Message, TaskRef, TaskState, Work};
use jobz::topic::Topic;
use tracing::{info, warn};

use super::active::ActiveTask;
use super::effects::{Effects, Publish, Write};
use super::retry::Failure;
use super::Engine;
use crate::ids::{StepId, TaskId};
use crate::model::Task;

impl Engine {
    /// Publishes again each task published `redeliver_after` ago that its worker has not
    /// reported started (it may have missed it: a slow joiner, a reconnect, a restart).
    pub(super) fn redeliver(&mut self, fx: &mut Effects, now: i64) {
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

    /// Chooses the workers of a broadcast or queue step, or leaves it waiting for one.
    pub(super) fn place(&mut self, fx: &mut Effects, step_id: &StepId, now: i64) {
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
        self.placement_work(1);
        if step.delivery == Delivery::Queue
            && !self.active.is_waiting(step_id)
            && self.active.has_waiting_of(&step.job)
        {
            self.active.wait(step_id);
            return;
        }
        let workers = match step.delivery {
            // Credits: a queue step goes only to a worker with a free slot, else it waits.
            Delivery::Queue => match self.pick_queue_worker(&step.job, None) {
                Some(w) => vec![w],
                None => {
                    self.active.wait(step_id);
                    return;
                }
            },
            _ => live,
        };
        self.assign(fx, step_id, workers, now);
    }

    /// Places waiting steps, first come first served across jobs: it walks the jobs in the
    /// order of their first waiting step, places that step if the job has a live worker
    /// (and, for a queue step, a free slot), and meets the job again at its next step; a
    /// job that cannot place its first step is passed over for the rest of the walk. So a
    /// pass looks at each job with waiting steps once, plus once per step it places,
    /// however many steps wait.
    pub(super) fn dispatch_waiting(&mut self, fx: &mut Effects, now: i64) {
        if !self.active.has_waiting() {
            return;
        }
        let mut cursor = None;
        while let Some(next) = self.active.next_waiting(cursor.as_ref()) {
            let head = &*cursor.insert(next);
            self.placement_work(1);
            let Some(delivery) = self.active.step(&head.step_id).map(|s| s.delivery) else {
                continue; // cannot be: a step leaves the line when it leaves ActiveRuns
            };
            let workers = match delivery {
                Delivery::Queue => self.pick_queue_worker(&head.job, None).map(|w| vec![w]),
                Delivery::Broadcast | Delivery::Local => {
                    let live = self.registry.live_workers_for(&head.job);
                    self.placement_work(live.len());
                    (!live.is_empty()).then(|| live.iter().map(|w| w.name.clone()).collect())
                }
            };
            if let Some(workers) = workers {
                self.assign(fx, &head.step_id, workers, now);
            }
        }
    }

    /// The live worker serving `job` with a free slot and the lightest load; ties go by
    /// name. `avoid` is taken only if no other worker can.
    pub(super) fn pick_queue_worker(&self, job: &str, avoid: Option<&str>) -> Option<String> {
        let candidates: Vec<(u32, &str)> = self
            .registry
            .live_workers_for(job)
            .into_iter()
            .map(|w| {
                self.placement_work(1);
                (
                    self.active.load_of(&w.name),
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

    /// Runs a step on `workers`, one new task each, and publishes the work. A step that
    /// waited leaves the line.
    pub(super) fn assign(
        &mut self,
        fx: &mut Effects,
        step_id: &StepId,
        workers: Vec<String>,
        now: i64,
    ) {
        self.active.stop_waiting(step_id);
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

    pub(super) fn publish_work(
        &mut self,
        fx: &mut Effects,
        step_id: &StepId,
        task_ids: &[TaskId],
        now: i64,
    ) {
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
    pub(super) fn fail_unplaced(
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
}
