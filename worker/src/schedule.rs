//! Which assignments to run and when: deduplication, validation, slots and the FIFO queue.
//!
//! [`Scheduler`] is pure: it takes published [`Work`] and task completions and answers with
//! [`Action`]s for the service loop to carry out. It never touches a socket, a file or a
//! process, so every rule here is tested without any.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::time::Duration;

use jobz::jobfile::{InvalidPattern, JobSpec, ParamRules};
use jobz::message::{CancelWork, Params, TaskRef, Work};
use jobz::template::Template;

/// Remembered (task, attempt) pairs: the broker re-publishes pending assignments every
/// couple of seconds, and a worker must run each attempt once. Bounded, oldest forgotten
/// first; far more than can be pending at once.
pub const SEEN_CAPACITY: usize = 100_000;

/// Ids that become parts of file paths (run, step and task ids) must match
/// `^[0-9A-Za-z-]{1,64}$`; anything else is refused before a path is built from it.
pub fn is_valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// A job this worker serves: its definition, and its parameter patterns compiled once, when
/// the job file was loaded (not for every task).
#[derive(Debug, Clone)]
pub struct ServedJob {
    /// The definition, as the worker registers it.
    pub spec: JobSpec,
    /// Its parameter patterns, compiled.
    pub params: ParamRules,
}

impl ServedJob {
    /// Compiles `spec`'s patterns.
    pub fn new(spec: JobSpec) -> Result<ServedJob, InvalidPattern> {
        let params = ParamRules::compile(&spec)?;
        Ok(ServedJob { spec, params })
    }
}

/// A task this worker accepted, with everything needed to run it, captured on arrival.
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    /// The run.
    pub run_id: String,
    /// The step.
    pub step_id: String,
    /// The job (a job this worker serves, unless the task was refused).
    pub job: String,
    /// Task id and attempt.
    pub task: TaskRef,
    /// Parameters of the run.
    pub params: Params,
    /// The command with every parameter shell-quoted; empty for a refused task.
    pub command: String,
    /// The job's timeout.
    pub timeout: Option<Duration>,
    /// The job's `run_as` user, captured with the command (a job file changed or removed
    /// while the task waits must not change whom it runs as).
    pub run_as: Option<String>,
}

/// What the service loop must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// An assignment for this worker arrived for the first time: log `received`.
    Received(Task),
    /// Run the task's command now (a slot is reserved for it).
    Start(Task),
    /// Report the task failed without running anything.
    Fail {
        /// The refused task.
        task: Task,
        /// Why, for the run's record.
        error: String,
    },
    /// Kill the running command of this task: its run was cancelled (its result says so).
    Kill(TaskRef),
    /// Report the task cancelled without running it: it was queued, or not seen yet (a
    /// later assignment of it is then a repeat and is ignored).
    Withdraw(Task),
}

/// Deduplication, slots and the FIFO queue of one worker.
#[derive(Debug)]
pub struct Scheduler {
    me: String,
    slots: usize,
    seen: SeenSet,
    queue: VecDeque<Task>,
    running: BTreeMap<TaskRef, Task>,
    draining: bool,
}

impl Scheduler {
    /// A scheduler for the worker named `me`, running at most `slots` commands at once.
    pub fn new(me: impl Into<String>, slots: usize) -> Scheduler {
        Scheduler {
            me: me.into(),
            slots: slots.max(1),
            seen: SeenSet::new(SEEN_CAPACITY),
            queue: VecDeque::new(),
            running: BTreeMap::new(),
            draining: false,
        }
    }

    /// Work published on the topic of `work.job` (the caller checked the topic matches).
    /// `served` is the worker's current job set.
    pub fn on_work(&mut self, work: &Work, served: &BTreeMap<String, ServedJob>) -> Vec<Action> {
        let mut actions = Vec::new();
        if self.draining {
            // Not even remembered: the broker hands these to someone else later.
            return actions;
        }
        for assignment in work.assignments.iter().filter(|a| a.worker == self.me) {
            if !self.seen.insert(assignment.task.clone()) {
                continue;
            }
            let mut task = Task {
                run_id: work.run_id.clone(),
                step_id: work.step_id.clone(),
                job: work.job.clone(),
                task: assignment.task.clone(),
                params: work.params.clone(),
                command: String::new(),
                timeout: None,
                run_as: None,
            };
            actions.push(Action::Received(task.clone()));
            match prepare(&mut task, served) {
                Ok(()) => self.queue.push_back(task),
                Err(error) => actions.push(Action::Fail { task, error }),
            }
        }
        self.fill_slots(&mut actions);
        actions
    }

    /// Tasks of a cancelled run, published on the topic of `cancel.job`: each of this
    /// worker's is killed if it runs, withdrawn if it is queued or was never seen, and left
    /// alone if it has ended (its result is reported as it ended).
    pub fn on_cancel(&mut self, cancel: &CancelWork) -> Vec<Action> {
        let mut actions = Vec::new();
        for assignment in cancel.assignments.iter().filter(|a| a.worker == self.me) {
            let task_ref = &assignment.task;
            if self.running.contains_key(task_ref) {
                actions.push(Action::Kill(task_ref.clone()));
            } else if let Some(at) = self.queue.iter().position(|t| t.task == *task_ref) {
                if let Some(task) = self.queue.remove(at) {
                    actions.push(Action::Withdraw(task));
                }
            } else if self.seen.insert(task_ref.clone()) {
                actions.push(Action::Withdraw(Task {
                    run_id: cancel.run_id.clone(),
                    step_id: cancel.step_id.clone(),
                    job: cancel.job.clone(),
                    task: task_ref.clone(),
                    params: Params::new(),
                    command: String::new(),
                    timeout: None,
                    run_as: None,
                }));
            }
        }
        actions
    }

    /// Remembers `task` as seen without running it: an attempt the spool knows from an
    /// earlier run of this worker.
    pub fn remember(&mut self, task: TaskRef) {
        self.seen.insert(task);
    }

    /// A started task ended: its slot is free for the next queued one.
    pub fn on_finished(&mut self, task: &TaskRef) -> Vec<Action> {
        self.running.remove(task);
        let mut actions = Vec::new();
        self.fill_slots(&mut actions);
        actions
    }

    /// Stops taking work: later assignments are ignored, queued tasks are dropped (the broker
    /// still counts them as not started, and the spool never recorded them, so a restarted
    /// worker runs them when they are offered again). Returns the dropped tasks.
    pub fn drain(&mut self) -> Vec<Task> {
        self.draining = true;
        self.queue.drain(..).collect()
    }

    /// True once [`Scheduler::drain`] was called.
    pub fn is_draining(&self) -> bool {
        self.draining
    }

    /// Tasks whose command runs now.
    pub fn running(&self) -> Vec<TaskRef> {
        self.running.keys().cloned().collect()
    }

    /// Tasks waiting for a slot.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    fn fill_slots(&mut self, actions: &mut Vec<Action>) {
        while self.running.len() < self.slots && !self.draining {
            let Some(task) = self.queue.pop_front() else {
                break;
            };
            self.running.insert(task.task.clone(), task.clone());
            actions.push(Action::Start(task));
        }
    }
}

/// Checks an accepted assignment and renders its command; the error says why it is refused.
fn prepare(task: &mut Task, served: &BTreeMap<String, ServedJob>) -> Result<(), String> {
    for (what, id) in [
        ("run id", &task.run_id),
        ("step id", &task.step_id),
        ("task id", &task.task.task_id),
    ] {
        if !is_valid_id(id) {
            return Err(format!(
                "refused: {what} {:?} does not match ^[0-9A-Za-z-]{{1,64}}$",
                truncate(id, 80)
            ));
        }
    }
    let Some(ServedJob { spec, params }) = served.get(&task.job) else {
        return Err("job not served by this worker".into());
    };
    // The broker checked the parameters against the definition of the job that was
    // triggered, which may come from another worker; this worker runs its own definition,
    // so it checks again what that declares (a successor also carries the run's others).
    params.validate_declared_params(&task.params).map_err(|e| {
        format!(
            "parameters refused by this worker's definition of {:?}: {e}",
            task.job
        )
    })?;
    let template = Template::parse(&spec.command)
        .map_err(|e| format!("job {:?}: bad command template: {e}", task.job))?;
    task.command = template
        .render_shell(&task.params)
        .map_err(|e| format!("cannot render the command: {e}"))?;
    task.timeout = spec.timeout_ms.map(Duration::from_millis);
    task.run_as = spec.run_as.clone();
    Ok(())
}

fn truncate(s: &str, max_chars: usize) -> String {
    s.chars().take(max_chars).collect()
}

/// A set that forgets its oldest members beyond a capacity.
#[derive(Debug)]
struct SeenSet {
    capacity: usize,
    members: HashSet<TaskRef>,
    order: VecDeque<TaskRef>,
}

impl SeenSet {
    fn new(capacity: usize) -> SeenSet {
        SeenSet {
            capacity: capacity.max(1),
            members: HashSet::new(),
            order: VecDeque::new(),
        }
    }

    /// Adds `task`; false if it was already there.
    fn insert(&mut self, task: TaskRef) -> bool {
        if self.members.contains(&task) {
            return false;
        }
        if self.order.len() >= self.capacity {
            if let Some(oldest) = self.order.pop_front() {
                self.members.remove(&oldest);
            }
        }
        self.members.insert(task.clone());
        self.order.push_back(task);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jobz::jobfile::{Delivery, ParamSpec};
    use jobz::message::Assignment;

    fn spec(name: &str, command: &str) -> JobSpec {
        let mut params = BTreeMap::new();
        params.insert(
            "v".to_string(),
            ParamSpec {
                required: false,
                pattern: "^.*$".into(),
            },
        );
        JobSpec {
            name: name.into(),
            description: String::new(),
            command: command.into(),
            params,
            on_success: vec![],
            on_failure: vec![],
            delivery: Delivery::Broadcast,
            timeout_ms: Some(2000),
            retries: 0,
            retry_backoff_ms: 10,
            tags: vec![],
            run_as: None,
            priority: 0,
            max_concurrency: None,
            inputs: vec![],
            outputs: vec![],
            output_ttl_ms: None,
            notify: vec![],
        }
    }

    fn served() -> BTreeMap<String, ServedJob> {
        [spec("build", "make {v}"), spec("plain", "true")]
            .into_iter()
            .map(|s| (s.name.clone(), ServedJob::new(s).unwrap()))
            .collect()
    }

    fn work(job: &str, tasks: &[(&str, &str, u32)], params: &[(&str, &str)]) -> Work {
        Work {
            run_id: "run-1".into(),
            step_id: "step-1".into(),
            job: job.into(),
            params: params
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            assignments: tasks
                .iter()
                .map(|(worker, id, attempt)| Assignment {
                    worker: worker.to_string(),
                    task: TaskRef {
                        task_id: id.to_string(),
                        attempt: *attempt,
                    },
                })
                .collect(),
        }
    }

    fn cancel(tasks: &[(&str, &str, u32)]) -> CancelWork {
        let w = work("plain", tasks, &[]);
        CancelWork {
            run_id: w.run_id,
            step_id: w.step_id,
            job: w.job,
            assignments: w.assignments,
        }
    }

    #[test]
    fn a_cancel_kills_what_runs_withdraws_what_waits_and_refuses_what_is_to_come() {
        let mut s = Scheduler::new("w1", 1);
        let served = served();
        let a = s.on_work(
            &work("plain", &[("w1", "t1", 1), ("w1", "t2", 1)], &[]),
            &served,
        );
        assert_eq!(started(&a), ["t1.1"]);
        let actions = s.on_cancel(&cancel(&[
            ("w1", "t1", 1),
            ("w1", "t2", 1),
            ("w1", "t3", 1),
            ("w2", "t4", 1),
        ]));
        let described: Vec<String> = actions
            .iter()
            .map(|a| match a {
                Action::Kill(t) => format!("kill {}", t.task_id),
                Action::Withdraw(t) => format!("withdraw {}", t.task.task_id),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(described, ["kill t1", "withdraw t2", "withdraw t3"]);
        assert_eq!(s.queued(), 0, "the queued task left the queue");
        // The cancel comes again until the broker has the results: nothing more happens
        // but another kill of what still runs.
        let again = s.on_cancel(&cancel(&[
            ("w1", "t1", 1),
            ("w1", "t2", 1),
            ("w1", "t3", 1),
        ]));
        assert!(
            matches!(again.as_slice(), [Action::Kill(t)] if t.task_id == "t1"),
            "{again:?}"
        );
        // The work of a withdrawn task arriving late is a repeat.
        let late = s.on_work(&work("plain", &[("w1", "t3", 1)], &[]), &served);
        assert!(late.is_empty(), "{late:?}");
        // Once the killed one ends, the freed slot takes nothing cancelled.
        assert!(s
            .on_finished(&TaskRef {
                task_id: "t1".into(),
                attempt: 1
            })
            .is_empty());
        assert!(
            s.on_cancel(&cancel(&[("w1", "t1", 1)])).is_empty(),
            "ended: left alone"
        );
    }

    fn started(actions: &[Action]) -> Vec<String> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Start(t) => Some(format!("{}.{}", t.task.task_id, t.task.attempt)),
                _ => None,
            })
            .collect()
    }

    fn failures(actions: &[Action]) -> Vec<String> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Fail { error, .. } => Some(error.clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn runs_only_its_own_assignments_with_the_command_rendered() {
        let mut s = Scheduler::new("me", 4);
        let actions = s.on_work(
            &work(
                "build",
                &[("other", "t1", 1), ("me", "t2", 1)],
                &[("v", "a b")],
            ),
            &served(),
        );
        assert_eq!(started(&actions), vec!["t2.1"]);
        let Action::Start(task) = &actions[1] else {
            panic!("{actions:?}")
        };
        assert_eq!(task.command, "make 'a b'");
        assert_eq!(task.timeout, Some(Duration::from_secs(2)));
        assert!(matches!(&actions[0], Action::Received(t) if t.task.task_id == "t2"));
    }

    #[test]
    fn republished_assignments_run_once_per_attempt() {
        let mut s = Scheduler::new("me", 4);
        let w = work("plain", &[("me", "t1", 1)], &[]);
        assert_eq!(started(&s.on_work(&w, &served())), vec!["t1.1"]);
        assert!(s.on_work(&w, &served()).is_empty());
        s.on_finished(&TaskRef {
            task_id: "t1".into(),
            attempt: 1,
        });
        assert!(
            s.on_work(&w, &served()).is_empty(),
            "finished is still seen"
        );
        let retry = work("plain", &[("me", "t1", 2)], &[]);
        assert_eq!(started(&s.on_work(&retry, &served())), vec!["t1.2"]);
    }

    #[test]
    fn slots_bound_concurrency_and_the_queue_is_fifo() {
        let mut s = Scheduler::new("me", 2);
        let w = work(
            "plain",
            &[
                ("me", "a", 1),
                ("me", "b", 1),
                ("me", "c", 1),
                ("me", "d", 1),
            ],
            &[],
        );
        assert_eq!(started(&s.on_work(&w, &served())), vec!["a.1", "b.1"]);
        assert_eq!(s.queued(), 2);
        let b = TaskRef {
            task_id: "b".into(),
            attempt: 1,
        };
        assert_eq!(started(&s.on_finished(&b)), vec!["c.1"]);
        assert_eq!(
            s.running(),
            vec![
                TaskRef {
                    task_id: "a".into(),
                    attempt: 1
                },
                TaskRef {
                    task_id: "c".into(),
                    attempt: 1
                }
            ]
        );
        // A completion for a task not running frees nothing extra.
        assert!(started(&s.on_finished(&b)).is_empty());
        let a = TaskRef {
            task_id: "a".into(),
            attempt: 1,
        };
        assert_eq!(started(&s.on_finished(&a)), vec!["d.1"]);
    }

    #[test]
    fn ids_that_could_escape_a_path_are_refused() {
        for bad in ["../etc", "a/b", "", "a.b", "x\n", &"a".repeat(65)] {
            let mut s = Scheduler::new("me", 1);
            let actions = s.on_work(&work("plain", &[("me", bad, 1)], &[]), &served());
            assert!(started(&actions).is_empty(), "{bad:?}");
            assert_eq!(failures(&actions).len(), 1, "{bad:?}");
            assert!(failures(&actions)[0].contains("task id"));
        }
        let mut s = Scheduler::new("me", 1);
        let mut w = work("plain", &[("me", "t", 1)], &[]);
        w.run_id = "../../root".into();
        let f = failures(&s.on_work(&w, &served()));
        assert!(f[0].contains("run id"), "{f:?}");
        assert!(is_valid_id("0190f2a4-7c3e-7d2a-9b1e-3c4d5e6f7a8b"));
    }

    #[test]
    fn a_job_not_served_is_reported_failed() {
        let mut s = Scheduler::new("me", 1);
        let actions = s.on_work(&work("gone", &[("me", "t", 1)], &[]), &served());
        assert_eq!(failures(&actions), vec!["job not served by this worker"]);
        assert!(s.running().is_empty());
    }

    #[test]
    fn declared_parameters_are_checked_against_this_workers_definition() {
        let mut served = served();
        let mut build = spec("build", "make {v}");
        build.params.get_mut("v").unwrap().pattern = "[a-z]+".into();
        served.insert("build".into(), ServedJob::new(build).unwrap());
        let compiled = jobz::jobfile::patterns_compiled_on_this_thread();
        let mut s = Scheduler::new("me", 2);
        let refused = s.on_work(&work("build", &[("me", "t", 1)], &[("v", "A;B")]), &served);
        assert!(
            failures(&refused)[0].contains("does not match"),
            "{refused:?}"
        );
        // A successor carries the run's other parameters: they flow on, unchecked here.
        let flows = s.on_work(
            &work("plain", &[("me", "u", 1)], &[("undeclared", "x")]),
            &served,
        );
        assert!(failures(&flows).is_empty(), "{flows:?}");
        assert_eq!(started(&flows).len(), 1);
        // Checked with the patterns compiled when the job was loaded.
        assert_eq!(jobz::jobfile::patterns_compiled_on_this_thread(), compiled);
    }

    #[test]
    fn a_render_error_fails_the_task_and_runs_nothing() {
        let mut s = Scheduler::new("me", 1);
        let actions = s.on_work(&work("build", &[("me", "t", 1)], &[]), &served());
        assert!(started(&actions).is_empty());
        assert!(failures(&actions)[0].contains("no value for parameter"));
    }

    #[test]
    fn draining_drops_the_queue_and_ignores_new_work() {
        let mut s = Scheduler::new("me", 1);
        let w = work("plain", &[("me", "a", 1), ("me", "b", 1)], &[]);
        assert_eq!(started(&s.on_work(&w, &served())), vec!["a.1"]);
        let dropped = s.drain();
        assert_eq!(dropped.len(), 1);
        assert!(s
            .on_work(&work("plain", &[("me", "c", 1)], &[]), &served())
            .is_empty());
        let a = TaskRef {
            task_id: "a".into(),
            attempt: 1,
        };
        assert!(s.on_finished(&a).is_empty());
        assert!(s.running().is_empty());
    }

    #[test]
    fn remembered_attempts_are_not_run() {
        let mut s = Scheduler::new("me", 4);
        s.remember(TaskRef {
            task_id: "t1".into(),
            attempt: 1,
        });
        let w = work("plain", &[("me", "t1", 1), ("me", "t1", 2)], &[]);
        assert_eq!(started(&s.on_work(&w, &served())), vec!["t1.2"]);
    }

    #[test]
    fn the_seen_set_forgets_its_oldest_beyond_capacity() {
        let mut seen = SeenSet::new(2);
        let t = |id: &str| TaskRef {
            task_id: id.into(),
            attempt: 1,
        };
        assert!(seen.insert(t("a")));
        assert!(seen.insert(t("b")));
        assert!(!seen.insert(t("a")));
        assert!(seen.insert(t("c")));
        assert!(seen.insert(t("a")), "a was forgotten");
        assert!(!seen.insert(t("c")));
    }
}
