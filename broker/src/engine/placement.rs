//! Where work goes: the workers of a broadcast or queue step, steps that wait for a live
//! worker, a free slot or room under their job's `max_concurrency`, and work published
//! (and published again until started).
//!
//! `max_concurrency: N` counts the unfinished tasks of the job placed on workers, across
//! the mesh. A queue or local step needs one place; a broadcast step one per live worker
//! it goes to, all at once (a broadcast is never split). A broadcast wider than N runs
//! when nothing else of its job does, so that it can run at all.

use std::collections::BTreeMap;

use jobz::jobfile::Delivery;
use jobz::message::{Assignment, Message, TaskRef, TaskState, Work};
use jobz::topic::Topic;
use tracing::{info, warn};

use super::active::ActiveTask;
use super::effects::{Effects, Publish, Write};
use super::feed;
use super::retry::Failure;
use super::Engine;
use crate::ids::{StepId, TaskId};
use crate::model::Task;
use jobz::message::FeedKind;

impl Engine {
    /// Publishes again each task published `redeliver_after` ago that its worker has not
    /// reported started (it may have missed it: a slow joiner, a reconnect, a restart), and
    /// each cancel its worker has not answered by reporting the task.
    pub(super) fn redeliver(&mut self, fx: &mut Effects, now: i64) {
        let after = self.config.redeliver_after_ms;
        let again = |sent: Option<i64>| sent.is_some_and(|sent| now - sent >= after);
        let mut cancels: BTreeMap<StepId, Vec<TaskId>> = BTreeMap::new();
        for t in self.active.tasks().filter(|t| again(t.cancel_sent_ms)) {
            if !t.record.state.is_final() {
                let step = cancels.entry(t.record.step_id.clone()).or_default();
                step.push(t.record.task_id.clone());
            }
        }
        for (step_id, mut task_ids) in cancels {
            task_ids.sort();
            self.count("cancel_redeliveries");
            self.publish_cancel(fx, &step_id, &task_ids);
            for task_id in &task_ids {
                if let Some(mut task) = self.active.task_mut(task_id) {
                    task.cancel_sent_ms = Some(now);
                }
            }
        }
        let due: Vec<TaskId> = self
            .active
            .tasks()
            .filter(|t| again(t.last_sent_ms))
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
        let live = self.registry.live_workers_for(&step.job).count();
        if live == 0 {
            let (run_id, job) = (step.run_id.clone(), step.job.clone());
            if self.active.wait(step_id) {
                info!(run_id = %run_id, step_id = %step_id, job = %job, "step waits for a live worker");
            }
            return;
        }
        // First come, first served: a step does not overtake steps of its job that
        // already wait; it joins the line at its priority.
        self.placement_work(1);
        if !self.active.is_waiting(step_id) && self.active.has_waiting_of(&step.job) {
            self.active.wait(step_id);
            return;
        }
        let job = step.job.clone();
        let workers = match step.delivery {
            // Credits: a queue step goes only to a worker with a free slot, else it waits.
            Delivery::Queue if self.job_has_room(&job, 1) => {
                self.pick_queue_worker(&job, None).map(|w| vec![w])
            }
            Delivery::Queue => None,
            _ => self.job_has_room(&job, live).then(|| {
                self.registry
                    .live_workers_for(&job)
                    .map(|w| w.name.clone())
                    .collect()
            }),
        };
        match workers {
            Some(workers) => self.assign(fx, step_id, workers, now),
            None => {
                self.active.wait(step_id);
            }
        }
    }

    /// Whether `needed` more tasks of `job` may be placed under its `max_concurrency`:
    /// always when it has none, or nothing of it is placed (a broadcast wider than the
    /// limit runs alone rather than never).
    pub(super) fn job_has_room(&self, job: &str, needed: usize) -> bool {
        let Some(max) = self.registry.job(job).and_then(|s| s.max_concurrency) else {
            return true;
        };
        let placed = self.active.load_of_job(job);
        placed == 0 || placed as usize + needed <= max as usize
    }

    /// Runs a `local` step on the worker of the task it follows, if that worker serves its
    /// job; else it fails at once.
    pub(super) fn place_local(
        &mut self,
        fx: &mut Effects,
        step_id: &StepId,
        worker: String,
        now: i64,
    ) {
        let Some(job) = self.active.step(step_id).map(|s| s.job.clone()) else {
            return;
        };
        let serves = self
            .registry
            .worker(&worker)
            .is_some_and(|w| w.jobs.contains(&job));
        if serves {
            self.assign(fx, step_id, vec![worker], now);
        } else {
            let reason = format!("worker {worker} does not serve local job {job:?}");
            self.fail_unplaced(fx, step_id, Some(worker), reason, now);
        }
    }

    /// Places waiting steps, by priority then first come first served across jobs: it
    /// walks the jobs in the order of their first waiting step, places that step if the job
    /// has a live worker (and, for a queue step, a free slot) and room under its
    /// `max_concurrency`, and meets the job again at its next step; a job that cannot place
    /// its first step is passed over for the rest of the walk. So a pass looks at each job
    /// with waiting steps once, plus once per step it places, however many steps wait.
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
                Delivery::Queue if self.job_has_room(&head.job, 1) => {
                    self.pick_queue_worker(&head.job, None).map(|w| vec![w])
                }
                Delivery::Queue => None,
                Delivery::Broadcast => {
                    let live: Vec<&crate::registry::Worker> =
                        self.registry.live_workers_for(&head.job).collect();
                    self.placement_work(live.len());
                    let room = self.job_has_room(&head.job, live.len());
                    (!live.is_empty() && room)
                        .then(|| live.iter().map(|w| w.name.clone()).collect())
                }
                // A local step waits only for room; it runs where the task it follows ran.
                Delivery::Local => {
                    if self.job_has_room(&head.job, 1) {
                        let origin = self.origin_worker(&head.step_id);
                        match origin {
                            Some(worker) => self.place_local(fx, &head.step_id, worker, now),
                            None => {
                                let reason = "the task this local step follows is gone".into();
                                self.fail_unplaced(fx, &head.step_id, None, reason, now);
                            }
                        }
                    }
                    None
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
        // The least loaded worker with a free slot (by name among equals), other than
        // `avoid` if there is one; found in one pass, without collecting the candidates.
        let mut best: Option<(u32, &str)> = None;
        let mut best_avoided: Option<(u32, &str)> = None;
        for w in self.registry.live_workers_for(job) {
            self.placement_work(1);
            let used = self.active.load_of(&w.name);
            if used >= w.slots.max(1) {
                continue;
            }
            let candidate = Some((used, w.name.as_str()));
            let slot = match avoid == Some(w.name.as_str()) {
                true => &mut best_avoided,
                false => &mut best,
            };
            if slot.is_none() || candidate < *slot {
                *slot = candidate;
            }
        }
        best.or(best_avoided).map(|(_, name)| name.to_owned())
    }

    /// The worker of the task a `local` step follows.
    pub(super) fn origin_worker(&self, step_id: &StepId) -> Option<String> {
        let origin = self.active.step(step_id)?.origin_task.as_ref()?;
        self.active.task(origin)?.record.worker.clone()
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
                    let run = self.active.run(&t.record.run_id);
                    feed::task_event(fx, FeedKind::TaskScheduled, run, &t.record, now);
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
        self.active.stop_waiting(step_id);
        let fanout = self.fanout_of(step_id, 1);
        if let Some(task_id) = self.new_task(step_id, worker, fanout, now) {
            if let Some(step) = self.active.step_mut(step_id) {
                step.state = TaskState::Running;
            }
            self.task_failed(fx, &task_id, Failure::Permanent, &reason, now);
        }
    }
}
