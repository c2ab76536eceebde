//! Where work goes: the workers of a broadcast or queue step, steps that wait for a live
//! worker or a free slot, and work published (and published again until started).

use std::collections::{BTreeMap, BTreeSet, HashMap};

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
    pub(super) fn dispatch_waiting(&mut self, fx: &mut Effects, now: i64) {
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

    /// Unfinished tasks per worker: what occupies its slots, as far as the broker knows.
    pub(super) fn load(&self) -> HashMap<String, u32> {
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
    pub(super) fn pick_queue_worker(
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

    pub(super) fn assign(
        &mut self,
        fx: &mut Effects,
        step_id: &StepId,
        workers: Vec<String>,
        now: i64,
    ) {
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
