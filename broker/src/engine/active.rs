//! The runs the engine is working on, with their steps and tasks, kept consistent by one
//! owner.
//!
//! [`ActiveRuns`] is the only place runs, steps and tasks are added or removed: a step
//! belongs to an active run, a task to an active step, and removing a run removes all of
//! it. What the engine needs to find without scanning (tasks waiting for a retry, steps
//! waiting for a worker or a slot, the load of each worker and of each job, scheduled runs
//! by due time, the runs each run is waited for by) is indexed here and updated by the same
//! methods that change what it indexes, so no caller can let an index drift: a task is
//! changed only through [`TaskMut`], which re-indexes it when dropped, and a run's priority
//! only through [`ActiveRuns::set_priority`], which moves its waiting steps and retries.

use std::cmp::Reverse;
use std::collections::{BTreeSet, HashMap};
use std::ops::{Deref, DerefMut};

use jobz::message::RunState;

use super::waiting::{Head, Position, WaitingSteps};
use crate::ids::{RunId, StepId, TaskId};
use crate::model::{Run, Step, Task};

/// A task as the engine holds it: its record, and what only memory needs.
#[derive(Debug, Clone, PartialEq)]
pub struct ActiveTask {
    /// What the store keeps of it.
    pub record: Task,
    /// When it was last published, while its worker has not reported it started; `None`
    /// when it is not waiting for a start.
    pub last_sent_ms: Option<i64>,
    /// A running task's lease: its worker's heartbeats renew it (reset on a restart).
    pub lease_expires_ms: Option<i64>,
    /// Set while the task waits for a retry: its backoff, or a worker to retry on.
    pub retry: Option<RetryWait>,
    /// When its worker was last told to stop it (its run was cancelled), while it has not
    /// reported it.
    pub cancel_sent_ms: Option<i64>,
}

/// A task waiting to be tried again.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryWait {
    /// Not placed before this time.
    pub not_before_ms: i64,
    /// The worker of the failed attempt, avoided when another can take the task.
    pub avoid: Option<String>,
}

impl ActiveTask {
    /// A task that is neither published, running nor waiting for a retry yet.
    pub fn new(record: Task) -> ActiveTask {
        ActiveTask {
            record,
            last_sent_ms: None,
            lease_expires_ms: None,
            retry: None,
            cancel_sent_ms: None,
        }
    }

    /// The worker whose slot this task occupies: the one it is placed on, until it ends.
    /// The same task counts against its job's `max_concurrency`.
    fn occupies(&self) -> Option<&str> {
        match self.record.state.is_final() {
            true => None,
            false => self.record.worker.as_deref(),
        }
    }
}

#[derive(Debug)]
struct ActiveRun {
    run: Run,
    /// Its steps, in the order they were made.
    steps: Vec<StepId>,
    /// The runs it depends on that have not succeeded yet (only a held run has any).
    waiting_for: BTreeSet<RunId>,
}

#[derive(Debug)]
struct ActiveStep {
    step: Step,
    /// Its tasks, in the order they were made.
    tasks: Vec<TaskId>,
    /// Its place in line should it wait for a worker or a slot.
    position: Position,
    /// It waits (it is in line in `Index::waiting`).
    waiting: bool,
}

/// Where a task waiting for a retry stands: higher priority first, then in the order the
/// tasks were made (ids are time-ordered).
type RetryKey = (Reverse<i32>, TaskId);

/// What [`ActiveRuns`] keeps to find things without a scan. Changed only by its methods.
#[derive(Debug, Default)]
struct Index {
    /// Tasks with a [`RetryWait`].
    retrying: BTreeSet<RetryKey>,
    /// Steps waiting for a live worker, a free slot or room under their job's
    /// `max_concurrency`, by job, each job's in line.
    waiting: WaitingSteps,
    /// Per worker, the unfinished tasks placed on it: what occupies its slots.
    load: HashMap<String, u32>,
    /// Per job, the same tasks: what its `max_concurrency` counts.
    job_load: HashMap<String, u32>,
    /// Scheduled runs, by the time they are due.
    due: BTreeSet<(i64, RunId)>,
    /// Per run, the held runs that wait for it to succeed.
    dependents: HashMap<RunId, BTreeSet<RunId>>,
}

/// Adds one to a count in `map`.
fn count_up(map: &mut HashMap<String, u32>, key: &str) {
    match map.get_mut(key) {
        Some(n) => *n += 1,
        None => {
            map.insert(key.to_owned(), 1);
        }
    }
}

/// Takes one from a count in `map`, forgetting it at zero.
fn count_down(map: &mut HashMap<String, u32>, key: &str) {
    if let Some(n) = map.get_mut(key) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            map.remove(key);
        }
    }
}

impl Index {
    fn retry_changed(&mut self, task_id: &TaskId, priority: i32, retrying: bool) {
        let key = (Reverse(priority), task_id.clone());
        if retrying {
            self.retrying.insert(key);
        } else {
            self.retrying.remove(&key);
        }
    }

    fn occupy(&mut self, worker: &str, job: &str) {
        count_up(&mut self.load, worker);
        count_up(&mut self.job_load, job);
    }

    fn vacate(&mut self, worker: &str, job: &str) {
        count_down(&mut self.load, worker);
        count_down(&mut self.job_load, job);
    }
}

/// The unfinished runs, their steps and their tasks.
#[derive(Debug, Default)]
pub struct ActiveRuns {
    // Boxed: a map's empty buckets then cost a pointer, not a whole record (a million
    // waiting runs leave up to half of each table empty after it grows).
    runs: HashMap<RunId, Box<ActiveRun>>,
    steps: HashMap<StepId, Box<ActiveStep>>,
    tasks: HashMap<TaskId, ActiveTask>,
    index: Index,
    /// Steps made so far: the next one's place in line.
    arrivals: u64,
    /// Runs removed since [`ActiveRuns::take_removed`] last looked (whoever waits for a
    /// run's end learns it from here, whichever way it ended).
    removed: Vec<RunId>,
}

impl ActiveRuns {
    pub fn run_count(&self) -> usize {
        self.runs.len()
    }

    pub fn task_count(&self) -> usize {
        self.tasks.len()
    }

    /// Every active run, in no particular order.
    pub fn runs(&self) -> impl Iterator<Item = &Run> {
        self.runs.values().map(|r| &r.run)
    }

    pub fn run(&self, run_id: &RunId) -> Option<&Run> {
        self.runs.get(run_id).map(|r| &r.run)
    }

    /// The run to change. Its priority changes only through [`ActiveRuns::set_priority`];
    /// a scheduled run leaves the due index through [`ActiveRuns::take_due`] before its
    /// state changes.
    pub fn run_mut(&mut self, run_id: &RunId) -> Option<&mut Run> {
        self.runs.get_mut(run_id).map(|r| &mut r.run)
    }

    pub fn step(&self, step_id: &StepId) -> Option<&Step> {
        self.steps.get(step_id).map(|s| &s.step)
    }

    pub fn step_mut(&mut self, step_id: &StepId) -> Option<&mut Step> {
        self.steps.get_mut(step_id).map(|s| &mut s.step)
    }

    pub fn task(&self, task_id: &TaskId) -> Option<&ActiveTask> {
        self.tasks.get(task_id)
    }

    /// The task to change; its indexes follow when the returned guard is dropped.
    pub fn task_mut(&mut self, task_id: &TaskId) -> Option<TaskMut<'_>> {
        let task = self.tasks.get_mut(task_id)?;
        let priority = self
            .runs
            .get(&task.record.run_id)
            .map_or(0, |r| r.run.priority);
        let was_retrying = task.retry.is_some();
        let occupied = task.occupies().map(str::to_owned);
        Some(TaskMut {
            task,
            index: &mut self.index,
            priority,
            was_retrying,
            occupied,
        })
    }

    /// Every active step, in no particular order.
    #[cfg(test)]
    pub fn steps(&self) -> impl Iterator<Item = &Step> {
        self.steps.values().map(|s| &s.step)
    }

    /// Every active task, in no particular order.
    pub fn tasks(&self) -> impl Iterator<Item = &ActiveTask> {
        self.tasks.values()
    }

    /// The steps of a run, in the order they were made.
    pub fn steps_of(&self, run_id: &RunId) -> impl Iterator<Item = &Step> {
        let ids = self.runs.get(run_id).map(|r| r.steps.as_slice());
        ids.unwrap_or_default()
            .iter()
            .filter_map(|id| self.step(id))
    }

    /// How many steps a run has made.
    pub fn step_count(&self, run_id: &RunId) -> usize {
        self.runs.get(run_id).map_or(0, |r| r.steps.len())
    }

    /// The tasks of a step, in the order they were made.
    pub fn tasks_of(&self, step_id: &StepId) -> impl Iterator<Item = &ActiveTask> {
        let ids = self.steps.get(step_id).map(|s| s.tasks.as_slice());
        ids.unwrap_or_default()
            .iter()
            .filter_map(|id| self.tasks.get(id))
    }

    /// Tasks waiting for a retry: the higher their run's priority the sooner, and among
    /// equals in the order they were made.
    pub fn retrying(&self) -> impl Iterator<Item = &TaskId> {
        self.index.retrying.iter().map(|(_, id)| id)
    }

    pub fn has_waiting(&self) -> bool {
        !self.index.waiting.is_empty()
    }

    pub fn is_waiting(&self, step_id: &StepId) -> bool {
        self.steps.get(step_id).is_some_and(|s| s.waiting)
    }

    /// Whether steps of `job` wait (a new one must not overtake them).
    pub fn has_waiting_of(&self, job: &str) -> bool {
        self.index.waiting.has_job(job)
    }

    /// The next waiting step to try after `after` (see [`WaitingSteps::next_head`]).
    pub fn next_waiting(&self, after: Option<&Head>) -> Option<Head> {
        self.index.waiting.next_head(after)
    }

    /// Puts an active step in line to wait; false if it was already there (or is not
    /// active).
    pub fn wait(&mut self, step_id: &StepId) -> bool {
        let Some(step) = self.steps.get_mut(step_id) else {
            return false;
        };
        if step.waiting {
            return false;
        }
        step.waiting = true;
        let (job, position) = (&step.step.job, step.position);
        self.index.waiting.insert(job, position, step_id.clone())
    }

    /// Takes a step out of line (it was placed, or its run was cancelled).
    pub fn stop_waiting(&mut self, step_id: &StepId) {
        if let Some(step) = self.steps.get_mut(step_id).filter(|s| s.waiting) {
            step.waiting = false;
            self.index.waiting.remove(&step.step.job, step.position);
        }
    }

    /// The unfinished tasks placed on `worker`.
    pub fn load_of(&self, worker: &str) -> u32 {
        self.index.load.get(worker).copied().unwrap_or(0)
    }

    /// The unfinished tasks of `job` placed on a worker, across the mesh.
    pub fn load_of_job(&self, job: &str) -> u32 {
        self.index.job_load.get(job).copied().unwrap_or(0)
    }

    /// Changes a run's priority: its steps waiting in line move to their new place, its
    /// tasks waiting for a retry too, and its later steps take the new one. False if the
    /// run is not active.
    pub fn set_priority(&mut self, run_id: &RunId, priority: i32) -> bool {
        let Some(run) = self.runs.get_mut(run_id) else {
            return false;
        };
        let old = std::mem::replace(&mut run.run.priority, priority);
        for step_id in &run.steps {
            let Some(step) = self.steps.get_mut(step_id) else {
                continue;
            };
            let moved = Position {
                priority,
                ..step.position
            };
            if step.waiting {
                self.index.waiting.remove(&step.step.job, step.position);
                self.index
                    .waiting
                    .insert(&step.step.job, moved, step_id.clone());
            }
            step.position = moved;
            for task_id in &step.tasks {
                if self.tasks.get(task_id).is_some_and(|t| t.retry.is_some()) {
                    self.index.retry_changed(task_id, old, false);
                    self.index.retry_changed(task_id, priority, true);
                }
            }
        }
        true
    }

    /// Adds a run. A scheduled one is indexed by its due time; `waiting_for` are the
    /// active runs it depends on that have not succeeded yet.
    pub fn insert_run(&mut self, run: Run, waiting_for: BTreeSet<RunId>) {
        let run_id = run.run_id.clone();
        if run.state == RunState::Scheduled {
            let due = run.not_before_ms.unwrap_or(i64::MIN);
            self.index.due.insert((due, run_id.clone()));
        }
        for dependency in &waiting_for {
            self.index
                .dependents
                .entry(dependency.clone())
                .or_default()
                .insert(run_id.clone());
        }
        self.runs.insert(
            run_id,
            Box::new(ActiveRun {
                run,
                steps: Vec::new(),
                waiting_for,
            }),
        );
    }

    /// Scheduled runs due at `now`, earliest first, taken out of the due index (the caller
    /// moves each on: it waits for its dependencies or starts).
    pub fn take_due(&mut self, now: i64) -> Vec<RunId> {
        let mut due = Vec::new();
        while let Some(first) = self.index.due.first() {
            if first.0 > now {
                break;
            }
            if let Some((_, run_id)) = self.index.due.pop_first() {
                due.push(run_id);
            }
        }
        due
    }

    /// The runs `run_id` depends on that have not succeeded yet.
    pub fn waiting_for(&self, run_id: &RunId) -> impl Iterator<Item = &RunId> {
        self.runs
            .get(run_id)
            .into_iter()
            .flat_map(|r| r.waiting_for.iter())
    }

    /// The held runs waiting for `run_id`, in id order.
    pub fn dependents_of(&self, run_id: &RunId) -> impl Iterator<Item = &RunId> {
        self.index.dependents.get(run_id).into_iter().flatten()
    }

    /// `run_id` has ended: the runs that waited for it stop waiting for it. Returns each
    /// with the number of runs it still waits for, in id order.
    pub fn take_dependents(&mut self, run_id: &RunId) -> Vec<(RunId, usize)> {
        let dependents = self.index.dependents.remove(run_id).unwrap_or_default();
        dependents
            .into_iter()
            .map(|dependent| {
                let left = match self.runs.get_mut(&dependent) {
                    Some(run) => {
                        run.waiting_for.remove(run_id);
                        run.waiting_for.len()
                    }
                    None => 0,
                };
                (dependent, left)
            })
            .collect()
    }

    /// Adds a step to its run, in line after every step made before it among those of its
    /// run's priority; false (and nothing added) if the run is not active.
    pub fn insert_step(&mut self, step: Step) -> bool {
        let Some(run) = self.runs.get_mut(&step.run_id) else {
            return false;
        };
        // Most runs have one step: room for exactly one first (a Vec's first push makes
        // room for four, which a million waiting runs pay for).
        if run.steps.capacity() == 0 {
            run.steps.reserve_exact(1);
        }
        run.steps.push(step.step_id.clone());
        let step_id = step.step_id.clone();
        self.arrivals += 1;
        self.steps.insert(
            step_id,
            Box::new(ActiveStep {
                step,
                tasks: Vec::new(),
                position: Position {
                    priority: run.run.priority,
                    arrival: self.arrivals,
                },
                waiting: false,
            }),
        );
        true
    }

    /// Adds a task to its step; false (and nothing added) if the step is not active.
    pub fn insert_task(&mut self, task: ActiveTask) -> bool {
        let Some(step) = self.steps.get_mut(&task.record.step_id) else {
            return false;
        };
        let priority = self
            .runs
            .get(&task.record.run_id)
            .map_or(0, |r| r.run.priority);
        let task_id = task.record.task_id.clone();
        step.tasks.push(task_id.clone());
        self.index
            .retry_changed(&task_id, priority, task.retry.is_some());
        if let Some(worker) = task.occupies() {
            self.index.occupy(worker, &task.record.job);
        }
        self.tasks.insert(task_id, task);
        true
    }

    /// The runs removed since the last call.
    pub fn take_removed(&mut self) -> Vec<RunId> {
        std::mem::take(&mut self.removed)
    }

    /// Removes a run with all its steps and tasks, and everything indexed of them. The
    /// runs waiting for it are left to [`ActiveRuns::take_dependents`].
    pub fn remove_run(&mut self, run_id: &RunId) -> Option<Run> {
        let run = self.runs.remove(run_id)?;
        self.removed.push(run_id.clone());
        let priority = run.run.priority;
        if let Some(due) = run.run.not_before_ms {
            self.index.due.remove(&(due, run_id.clone()));
        }
        for dependency in &run.waiting_for {
            if let Some(set) = self.index.dependents.get_mut(dependency) {
                set.remove(run_id);
                if set.is_empty() {
                    self.index.dependents.remove(dependency);
                }
            }
        }
        for step_id in &run.steps {
            self.stop_waiting(step_id);
            let Some(step) = self.steps.remove(step_id) else {
                continue;
            };
            for task_id in &step.tasks {
                let Some(task) = self.tasks.remove(task_id) else {
                    continue;
                };
                self.index.retry_changed(task_id, priority, false);
                if let Some(worker) = task.occupies() {
                    self.index.vacate(worker, &task.record.job);
                }
            }
        }
        Some(run.run)
    }
}

#[cfg(test)]
impl ActiveRuns {
    /// Panics unless every index says what a count from scratch says: what the engine's
    /// tests check after each event.
    pub fn assert_consistent(&self) {
        let mut load: HashMap<String, u32> = HashMap::new();
        let mut job_load: HashMap<String, u32> = HashMap::new();
        for t in self.tasks.values() {
            if let Some(w) = t.occupies() {
                *load.entry(w.to_owned()).or_default() += 1;
                *job_load.entry(t.record.job.clone()).or_default() += 1;
            }
            let step = &self.steps[&t.record.step_id];
            assert!(
                step.tasks.contains(&t.record.task_id),
                "task not in its step"
            );
        }
        assert_eq!(self.index.load, load, "load counters drifted");
        assert_eq!(self.index.job_load, job_load, "job load counters drifted");
        let retrying: BTreeSet<RetryKey> = self
            .tasks
            .values()
            .filter(|t| t.retry.is_some())
            .map(|t| {
                let priority = self.runs[&t.record.run_id].run.priority;
                (Reverse(priority), t.record.task_id.clone())
            })
            .collect();
        assert_eq!(self.index.retrying, retrying, "retry index drifted");
        let mut waiting = 0;
        for (id, s) in &self.steps {
            let run = &self.runs[&s.step.run_id];
            assert!(run.steps.contains(id), "step not in its run");
            assert_eq!(
                s.position.priority, run.run.priority,
                "step priority drifted"
            );
            if s.waiting {
                waiting += 1;
                assert!(self.index.waiting.holds(&s.step.job, s.position, id));
            }
        }
        assert_eq!(self.index.waiting.len(), waiting, "waiting line drifted");
        let due: BTreeSet<(i64, RunId)> = self
            .runs
            .values()
            .filter(|r| r.run.state == RunState::Scheduled)
            .map(|r| {
                (
                    r.run.not_before_ms.unwrap_or(i64::MIN),
                    r.run.run_id.clone(),
                )
            })
            .collect();
        assert_eq!(self.index.due, due, "due index drifted");
        let mut dependents: HashMap<RunId, BTreeSet<RunId>> = HashMap::new();
        for r in self.runs.values() {
            assert!(
                r.waiting_for.is_empty() || r.run.state.is_held(),
                "a run that is not held waits for others"
            );
            for dependency in &r.waiting_for {
                assert!(self.runs.contains_key(dependency), "waits for an ended run");
                dependents
                    .entry(dependency.clone())
                    .or_default()
                    .insert(r.run.run_id.clone());
            }
        }
        assert_eq!(self.index.dependents, dependents, "dependents drifted");
    }
}

/// A task being changed. Dropping it brings the indexes of [`ActiveRuns`] up to date
/// with what changed.
pub struct TaskMut<'a> {
    task: &'a mut ActiveTask,
    index: &'a mut Index,
    /// Its run's priority (the retry index orders by it).
    priority: i32,
    was_retrying: bool,
    /// The worker whose slot it occupied when the guard was made.
    occupied: Option<String>,
}

impl Deref for TaskMut<'_> {
    type Target = ActiveTask;

    fn deref(&self) -> &ActiveTask {
        self.task
    }
}

impl DerefMut for TaskMut<'_> {
    fn deref_mut(&mut self) -> &mut ActiveTask {
        self.task
    }
}

impl Drop for TaskMut<'_> {
    fn drop(&mut self) {
        let retrying = self.task.retry.is_some();
        if retrying != self.was_retrying {
            self.index
                .retry_changed(&self.task.record.task_id, self.priority, retrying);
        }
        let occupies = self.task.occupies();
        if occupies != self.occupied.as_deref() {
            let job = &self.task.record.job;
            if let Some(before) = &self.occupied {
                self.index.vacate(before, job);
            }
            if let Some(now) = occupies {
                self.index.occupy(now, job);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use jobz::jobfile::Delivery;
    use jobz::message::TaskState;

    use super::*;

    fn run(id: &str) -> Run {
        Run::new(
            id.into(),
            "a",
            Default::default(),
            RunState::Pending,
            format!("m-{id}"),
            0,
        )
    }

    fn step(id: &str, run: &str) -> Step {
        Step {
            step_id: id.into(),
            run_id: run.into(),
            job: "a".into(),
            delivery: Delivery::Queue,
            state: TaskState::Pending,
            origin_task: None,
            created_at_ms: 0,
            finished_at_ms: None,
        }
    }

    fn task(id: &str, step: &str, run: &str) -> ActiveTask {
        ActiveTask::new(Task {
            task_id: id.into(),
            step_id: step.into(),
            run_id: run.into(),
            job: "a".into(),
            worker: Some("w1".into()),
            state: TaskState::Pending,
            attempt: 1,
            failures: 0,
            fanout: 1,
            exit_code: None,
            error: None,
            instance: None,
            created_at_ms: 0,
            started_at_ms: None,
            finished_at_ms: None,
            recorded_at_ms: None,
            output_tail: String::new(),
        })
    }

    fn retry_in(ms: i64) -> Option<RetryWait> {
        Some(RetryWait {
            not_before_ms: ms,
            avoid: None,
        })
    }

    /// Two runs: r1 with steps s1 (tasks t1, t2) and s2 (waiting), r2 with s3 (task t3).
    fn two_runs() -> ActiveRuns {
        let mut active = ActiveRuns::default();
        active.insert_run(run("r1"), BTreeSet::new());
        active.insert_run(run("r2"), BTreeSet::new());
        for (s, r) in [("s1", "r1"), ("s2", "r1"), ("s3", "r2")] {
            assert!(active.insert_step(step(s, r)));
        }
        for (t, s, r) in [("t1", "s1", "r1"), ("t2", "s1", "r1"), ("t3", "s3", "r2")] {
            let mut t = task(t, s, r);
            t.retry = retry_in(5);
            assert!(active.insert_task(t));
        }
        active.wait(&"s2".into());
        active
    }

    #[test]
    fn removing_a_run_removes_its_steps_tasks_and_what_is_indexed_of_them() {
        let mut active = two_runs();
        let removed = active.remove_run(&"r1".into()).unwrap();
        assert_eq!(removed.run_id, "r1");
        assert_eq!((active.run_count(), active.task_count()), (1, 1));
        for gone in ["s1", "s2"] {
            assert!(active.step(&gone.into()).is_none());
        }
        assert!(active.task(&"t1".into()).is_none() && active.task(&"t2".into()).is_none());
        assert!(!active.has_waiting(), "a removed step still waits");
        let retrying: Vec<&TaskId> = active.retrying().collect();
        assert_eq!(
            retrying,
            [&TaskId::from("t3")],
            "a removed task still retries"
        );
        assert!(active.remove_run(&"r1".into()).is_none());
    }

    #[test]
    fn a_task_changed_through_its_guard_is_reindexed() {
        let mut active = two_runs();
        active.task_mut(&"t2".into()).unwrap().retry = None;
        let retrying: Vec<&str> = active.retrying().map(TaskId::as_str).collect();
        assert_eq!(retrying, ["t1", "t3"]);
        active.task_mut(&"t2".into()).unwrap().retry = retry_in(9);
        let retrying: Vec<&str> = active.retrying().map(TaskId::as_str).collect();
        assert_eq!(retrying, ["t1", "t2", "t3"], "in the order they were made");
    }

    #[test]
    fn a_step_or_task_of_nothing_active_is_refused() {
        let mut active = two_runs();
        assert!(!active.insert_step(step("s9", "r9")));
        assert!(!active.insert_task(task("t9", "s9", "r9")));
        assert!(!active.wait(&"s9".into()));
        assert_eq!(active.task_count(), 3);
        let tasks: Vec<&str> = active
            .tasks_of(&"s1".into())
            .map(|t| t.record.task_id.as_str())
            .collect();
        assert_eq!(tasks, ["t1", "t2"]);
        assert_eq!(active.step_count(&"r1".into()), 2);
    }

    #[test]
    fn a_new_priority_moves_the_waiting_steps_and_the_retries_of_a_run() {
        let mut active = two_runs();
        active.insert_step(step("s4", "r2"));
        active.wait(&"s4".into());
        let order = |a: &ActiveRuns| {
            let mut seen = Vec::new();
            let mut cursor = None;
            while let Some(head) = a.next_waiting(cursor.as_ref()) {
                seen.push(head.step_id.to_string());
                cursor = Some(head);
            }
            seen
        };
        // Both in the line of job a: s2 (r1) came first.
        assert_eq!(order(&active), ["s2"], "one job, one head");
        assert!(active.set_priority(&"r2".into(), 5));
        assert_eq!(order(&active), ["s4"], "r2's step now leads its job's line");
        let retrying: Vec<&str> = active.retrying().map(TaskId::as_str).collect();
        assert_eq!(retrying, ["t3", "t1", "t2"], "r2's retry comes first");
        active.assert_consistent();
        // A step made after the change stands at the new priority.
        assert!(active.insert_step(step("s5", "r2")));
        active.wait(&"s5".into());
        active.assert_consistent();
        assert!(!active.set_priority(&"r9".into(), 1));
    }

    #[test]
    fn scheduled_runs_come_due_in_time_order_and_dependents_follow_their_dependencies() {
        let mut active = ActiveRuns::default();
        active.insert_run(run("d"), BTreeSet::new());
        for (id, due) in [("s2", 20), ("s1", 10), ("s3", 30)] {
            let mut r = run(id);
            r.state = RunState::Scheduled;
            r.not_before_ms = Some(due);
            active.insert_run(r, BTreeSet::from([RunId::from("d")]));
        }
        active.assert_consistent();
        let due = active.take_due(20);
        assert_eq!(due, [RunId::from("s1"), RunId::from("s2")]);
        for id in &due {
            active.run_mut(id).unwrap().state = RunState::Waiting;
        }
        active.assert_consistent();
        assert_eq!(active.dependents_of(&"d".into()).count(), 3);
        // s3 is cancelled while scheduled: it leaves both indexes.
        active.remove_run(&"s3".into());
        active.assert_consistent();
        let freed = active.take_dependents(&"d".into());
        assert_eq!(
            freed,
            [(RunId::from("s1"), 0), (RunId::from("s2"), 0)],
            "each waits for nothing more"
        );
        assert_eq!(active.waiting_for(&"s1".into()).count(), 0);
        assert!(active.take_due(i64::MAX).is_empty());
    }
}
