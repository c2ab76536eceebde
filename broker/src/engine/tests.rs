use super::*;
use jobz::jobfile::{Delivery, JobSpec};
use jobz::message::{
    Assignment, Event, Params, Query, RunState, TaskFinished, TaskOutcome, TaskRef, TaskStarted,
    TriggerRequest, Work, WorkerStatus,
};
use jobz::topic::Topic;

use super::reports::MAX_REPORTED_TEXT;
use crate::ids::SequentialIds;

pub(super) fn config() -> EngineConfig {
    EngineConfig {
        worker_expiry_ms: 10_000,
        redeliver_after_ms: 2_000,
        lease_timeout_ms: 60_000,
        lease_grace_ms: 10_000,
        instance: "b1".into(),
        version: "test".into(),
    }
}

fn job(name: &str, delivery: Delivery, on_success: &[&str], on_failure: &[&str]) -> JobSpec {
    JobSpec {
        name: name.into(),
        description: String::new(),
        command: "true".into(),
        params: Default::default(),
        on_success: on_success.iter().map(|s| s.to_string()).collect(),
        on_failure: on_failure.iter().map(|s| s.to_string()).collect(),
        delivery,
        timeout_ms: None,
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

struct Harness {
    engine: Engine,
    now: i64,
    jobs: Vec<JobSpec>,
    /// Messages sent so far: message ids come from it, so a script replays exactly.
    sent: u64,
    /// Check after each event that the engine's indexes agree with a count from scratch
    /// (off where a test holds too much for that).
    check: bool,
}

impl Harness {
    fn new(jobs: Vec<JobSpec>, workers: &[&str]) -> Harness {
        let mut h = Harness {
            engine: Engine::restore(
                config(),
                Snapshot::default(),
                Box::new(SequentialIds::default()),
                0,
            ),
            now: 1_000,
            jobs,
            sent: 0,
            check: true,
        };
        for w in workers {
            h.heartbeat(w, "i1");
        }
        h
    }

    fn send(&mut self, sender: &str, body: Message) -> Effects {
        self.sent += 1;
        let env = Envelope {
            id: format!("m{}", self.sent),
            sender: sender.into(),
            sent_at_ms: self.now,
            body,
        };
        self.deliver(env)
    }

    /// What the server does with a message: authorize it, then hand it to the engine (or
    /// count the refusal).
    fn deliver(&mut self, env: Envelope) -> Effects {
        let fx = match crate::authority::authorize(&env) {
            Ok(from) => self.engine.on_envelope(env, &from, self.now),
            Err(refusal) => {
                self.engine.count_dropped_frame(refusal.reason());
                Effects::default()
            }
        };
        if self.check {
            self.engine.active.assert_consistent();
        }
        fx
    }

    fn heartbeat(&mut self, worker: &str, instance: &str) -> Effects {
        let status = WorkerStatus {
            name: worker.into(),
            instance: instance.into(),
            jobs: self.jobs.clone(),
            capabilities: vec![],
            slots: 4,
            running: vec![],
            version: "t".into(),
            counters: Default::default(),
            leaving: false,
        };
        self.send(&format!("worker:{worker}"), Message::Heartbeat(status))
    }

    fn trigger(&mut self, job: &str) -> (Effects, Option<String>) {
        let fx = self.send(
            "frontend:x",
            Message::Trigger(TriggerRequest {
                job: job.into(),
                params: Params::new(),
                ..Default::default()
            }),
        );
        let run_id = replies(&fx).into_iter().find_map(|r| match r {
            ReplyBody::Accepted { run_id } => Some(run_id),
            _ => None,
        });
        (fx, run_id)
    }

    fn finish(&mut self, a: &Assignment, outcome: TaskOutcome) -> Effects {
        let f = self.report(a, outcome);
        self.send(&format!("worker:{}", a.worker), Message::TaskFinished(f))
    }

    /// The report the worker of `a` sends when its command ends with `outcome`.
    fn report(&self, a: &Assignment, outcome: TaskOutcome) -> TaskFinished {
        TaskFinished {
            task: a.task.clone(),
            worker: a.worker.clone(),
            outcome,
            exit_code: Some(if outcome == TaskOutcome::Succeeded {
                0
            } else {
                1
            }),
            error: None,
            started_at_ms: self.now,
            finished_at_ms: self.now,
            output_tail: String::new(),
        }
    }

    fn run_state(&self, run_id: &str) -> Option<RunState> {
        self.engine
            .active
            .run(&RunId::from(run_id))
            .map(|r| r.state)
    }

    /// The active run `run_id` (a wire id).
    fn run(&self, run_id: &str) -> &Run {
        self.engine.active.run(&RunId::from(run_id)).unwrap()
    }

    /// The active task `task_id` (a wire id).
    fn task(&self, task_id: &str) -> &Task {
        &self
            .engine
            .active
            .task(&TaskId::from(task_id))
            .unwrap()
            .record
    }
}

fn replies(fx: &Effects) -> Vec<ReplyBody> {
    fx.publish
        .iter()
        .filter_map(|p| match &p.body {
            Message::Reply(r) => Some(r.body.clone()),
            _ => None,
        })
        .collect()
}

fn works(fx: &Effects) -> Vec<Work> {
    fx.publish
        .iter()
        .filter_map(|p| match &p.body {
            Message::Work(w) => {
                assert_eq!(p.topic, Topic::Job(w.job.clone()));
                Some(w.clone())
            }
            _ => None,
        })
        .collect()
}

fn final_run_write(fx: &Effects) -> Option<RunState> {
    fx.writes.iter().rev().find_map(|w| match w {
        Write::Run(r) if r.state.is_final() => Some(r.state),
        _ => None,
    })
}

#[test]
fn unknown_job_is_refused_with_404_and_nothing_written() {
    let mut h = Harness::new(vec![job("a", Delivery::Broadcast, &[], &[])], &["w1"]);
    let (fx, run) = h.trigger("nope");
    assert!(run.is_none());
    assert!(fx.writes.is_empty());
    assert!(matches!(
        replies(&fx)[..],
        [ReplyBody::Rejected { status: 404, .. }]
    ));
}

#[test]
fn local_job_cannot_be_triggered_directly() {
    let mut h = Harness::new(vec![job("l", Delivery::Local, &[], &[])], &["w1"]);
    let (fx, run) = h.trigger("l");
    assert!(run.is_none());
    assert!(matches!(
        replies(&fx)[..],
        [ReplyBody::Rejected { status: 400, .. }]
    ));
}

#[test]
fn broadcast_runs_once_per_worker_and_successors_once_per_step() {
    let jobs = vec![
        job("a", Delivery::Broadcast, &["b", "c"], &[]),
        job("b", Delivery::Broadcast, &[], &[]),
        job("c", Delivery::Broadcast, &[], &[]),
    ];
    let mut h = Harness::new(jobs, &["w1", "w2"]);
    let (fx, run_id) = h.trigger("a");
    let run_id = run_id.unwrap();
    // The acceptance is published before the work (both after the commit of `writes`).
    assert!(matches!(fx.publish[0].body, Message::Reply(_)));
    let work = works(&fx);
    assert_eq!(work.len(), 1);
    assert_eq!(work[0].assignments.len(), 2);

    let fx1 = h.finish(&work[0].assignments[0], TaskOutcome::Succeeded);
    assert!(works(&fx1).is_empty(), "successors wait for the whole step");
    let fx2 = h.finish(&work[0].assignments[1], TaskOutcome::Succeeded);
    let next = works(&fx2);
    let jobs: Vec<&str> = next.iter().map(|w| w.job.as_str()).collect();
    assert_eq!(jobs, vec!["b", "c"]);
    assert!(next.iter().all(|w| w.assignments.len() == 2));

    // A duplicate result changes nothing.
    let dup = h.finish(&work[0].assignments[1], TaskOutcome::Succeeded);
    assert!(works(&dup).is_empty() && dup.writes.is_empty());
    assert_eq!(replies(&dup), vec![ReplyBody::Ack]);

    let mut last = Effects::default();
    for w in &next {
        for a in &w.assignments {
            assert_eq!(h.run_state(&run_id), Some(RunState::Running));
            last = h.finish(a, TaskOutcome::Succeeded);
        }
    }
    assert_eq!(final_run_write(&last), Some(RunState::Succeeded));
    assert!(
        h.engine.active.run_count() == 0 && h.engine.active.task_count() == 0,
        "finished runs leave memory"
    );
}

#[test]
fn local_successor_follows_each_task_on_its_own_worker() {
    let jobs = vec![
        job("a", Delivery::Broadcast, &["l"], &[]),
        job("l", Delivery::Local, &[], &[]),
    ];
    let mut h = Harness::new(jobs, &["w1", "w2"]);
    let (fx, _) = h.trigger("a");
    let a = works(&fx).remove(0);
    let fx = h.finish(&a.assignments[0], TaskOutcome::Succeeded);
    let l = works(&fx);
    assert_eq!(
        l.len(),
        1,
        "the local successor starts right after its own task"
    );
    assert_eq!(l[0].assignments.len(), 1);
    assert_eq!(l[0].assignments[0].worker, a.assignments[0].worker);
    let fx = h.finish(&a.assignments[1], TaskOutcome::Succeeded);
    let l2 = works(&fx);
    assert_eq!(l2[0].assignments[0].worker, a.assignments[1].worker);
    assert_ne!(l[0].step_id, l2[0].step_id);
}

#[test]
fn failure_runs_on_failure_and_the_run_fails() {
    let jobs = vec![
        job("a", Delivery::Queue, &["never"], &["alert"]),
        job("alert", Delivery::Queue, &[], &[]),
    ];
    let mut h = Harness::new(jobs, &["w1", "w2"]);
    let (fx, _) = h.trigger("a");
    let a = works(&fx).remove(0);
    assert_eq!(a.assignments.len(), 1, "queue mode: exactly one worker");
    let fx = h.finish(&a.assignments[0], TaskOutcome::Failed);
    let next = works(&fx);
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].job, "alert");
    let fx = h.finish(&next[0].assignments[0], TaskOutcome::Succeeded);
    assert_eq!(final_run_write(&fx), Some(RunState::Failed));
}

#[test]
fn resent_trigger_is_ingested_once() {
    let mut h = Harness::new(vec![job("a", Delivery::Broadcast, &[], &[])], &["w1"]);
    let env = Envelope {
        id: "m1".into(),
        sender: "frontend:x".into(),
        sent_at_ms: 0,
        body: Message::Trigger(TriggerRequest {
            job: "a".into(),
            params: Params::new(),
            ..Default::default()
        }),
    };
    let first = h.deliver(env.clone());
    let second = h.deliver(env);
    assert_eq!(replies(&first)[0], replies(&second)[0]);
    assert!(second.writes.is_empty() && works(&second).is_empty());
}

#[test]
fn a_trigger_with_the_key_of_an_earlier_one_of_its_job_gets_that_run() {
    let jobs = vec![
        job("a", Delivery::Broadcast, &[], &[]),
        job("b", Delivery::Broadcast, &[], &[]),
    ];
    let mut h = Harness::new(jobs, &["w1"]);
    let keyed = |id: &str, job: &str, key: &str| Envelope {
        id: id.into(),
        sender: "frontend:x".into(),
        sent_at_ms: 0,
        body: Message::Trigger(TriggerRequest {
            job: job.into(),
            params: Params::new(),
            idempotency_key: Some(key.into()),
            ..Default::default()
        }),
    };
    let first = h.deliver(keyed("m1", "a", "k1"));
    let again = h.deliver(keyed("m2", "a", "k1"));
    assert_eq!(
        replies(&first)[0],
        replies(&again)[0],
        "another message, same key"
    );
    assert!(again.writes.is_empty() && works(&again).is_empty());
    let other_job = h.deliver(keyed("m3", "b", "k1"));
    assert_ne!(
        replies(&first)[0],
        replies(&other_job)[0],
        "keys are per job"
    );
    let other_key = h.deliver(keyed("m4", "a", "k2"));
    assert_ne!(replies(&first)[0], replies(&other_key)[0]);
    let bad = h.deliver(keyed("m5", "a", "a b"));
    assert!(
        matches!(&replies(&bad)[0], ReplyBody::Rejected { status: 400, .. }),
        "{:?}",
        replies(&bad)
    );
    // The key is what the run is stored under, so a restarted broker knows it too.
    let stored = first.writes.iter().find_map(|w| match w {
        Write::Run(r) => Some(r.request_id.clone()),
        _ => None,
    });
    assert_eq!(stored.as_deref(), Some("key:a:k1"));
}

#[test]
fn step_waits_for_a_worker_and_starts_when_one_registers() {
    let mut h = Harness::new(vec![job("a", Delivery::Broadcast, &[], &[])], &[]);
    // The catalog knows the job (from an earlier worker), but nobody is live now.
    h.heartbeat("w1", "i1");
    h.now += 20_000;
    let _ = h.engine.tick(h.now);
    let (fx, run_id) = h.trigger("a");
    assert!(run_id.is_some());
    assert!(works(&fx).is_empty());
    let fx = h.heartbeat("w1", "i1");
    assert_eq!(works(&fx).len(), 1);
}

#[test]
fn lost_worker_fails_its_tasks() {
    let mut h = Harness::new(vec![job("a", Delivery::Broadcast, &[], &[])], &["w1", "w2"]);
    let (fx, _) = h.trigger("a");
    let a = works(&fx).remove(0);
    h.finish(&a.assignments[0], TaskOutcome::Succeeded);
    h.now += 5_000;
    let keep = a.assignments[0].worker.clone();
    h.heartbeat(&keep, "i1");
    h.now += 6_000;
    let fx = h.engine.tick(h.now);
    assert_eq!(final_run_write(&fx), Some(RunState::Failed));
}

#[test]
fn restarted_worker_loses_its_running_attempt() {
    let mut h = Harness::new(vec![job("a", Delivery::Broadcast, &[], &[])], &["w1"]);
    let (fx, _) = h.trigger("a");
    let a = works(&fx).remove(0).assignments.remove(0);
    let started = TaskStarted {
        task: a.task.clone(),
        worker: "w1".into(),
        instance: "i1".into(),
        started_at_ms: h.now,
    };
    h.send("worker:w1", Message::TaskStarted(started));
    let fx = h.heartbeat("w1", "i2");
    assert_eq!(final_run_write(&fx), Some(RunState::Failed));
}

#[test]
fn unstarted_tasks_are_published_again() {
    let mut h = Harness::new(vec![job("a", Delivery::Broadcast, &[], &[])], &["w1"]);
    let (fx, _) = h.trigger("a");
    let a = works(&fx).remove(0);
    h.now += 1_000;
    assert!(works(&h.engine.tick(h.now)).is_empty());
    h.now += 1_500;
    let again = works(&h.engine.tick(h.now));
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].assignments, a.assignments);
    let started = TaskStarted {
        task: a.assignments[0].task.clone(),
        worker: "w1".into(),
        instance: "i1".into(),
        started_at_ms: h.now,
    };
    h.send("worker:w1", Message::TaskStarted(started));
    h.now += 5_000;
    assert!(
        works(&h.engine.tick(h.now)).is_empty(),
        "started tasks are not republished"
    );
}

#[test]
fn successor_cycle_is_bounded() {
    let mut h = Harness::new(vec![job("a", Delivery::Queue, &["a"], &[])], &["w1"]);
    let (fx, _) = h.trigger("a");
    let mut work = works(&fx);
    let mut steps = 1;
    while let Some(w) = work.pop() {
        let fx = h.finish(&w.assignments[0], TaskOutcome::Succeeded);
        work = works(&fx);
        steps += work.len();
        assert!(steps <= MAX_STEPS_PER_RUN);
    }
    assert_eq!(h.engine.active.run_count(), 0);
}

#[test]
fn invalid_senders_are_dropped() {
    let mut h = Harness::new(vec![], &[]);
    let fx = h.send(
        "bad sender\0",
        Message::Hello {
            role: jobz::message::Role::Client,
        },
    );
    assert!(fx.is_empty());
    assert_eq!(h.engine.health().counters.get("frames_dropped"), Some(&1));
}

fn with_retries(mut spec: JobSpec, retries: u32, backoff_ms: u64) -> JobSpec {
    spec.retries = retries;
    spec.retry_backoff_ms = backoff_ms;
    spec
}

fn start(h: &mut Harness, a: &Assignment) {
    let started = TaskStarted {
        task: a.task.clone(),
        worker: a.worker.clone(),
        instance: "i1".into(),
        started_at_ms: h.now,
    };
    h.send(
        &format!("worker:{}", a.worker),
        Message::TaskStarted(started),
    );
}

fn heartbeat_running(h: &mut Harness, worker: &str, running: Vec<TaskRef>) -> Effects {
    let status = WorkerStatus {
        name: worker.into(),
        instance: "i1".into(),
        jobs: h.jobs.clone(),
        capabilities: vec![],
        slots: 4,
        running,
        version: "t".into(),
        counters: Default::default(),
        leaving: false,
    };
    h.send(&format!("worker:{worker}"), Message::Heartbeat(status))
}

#[test]
fn failed_attempts_are_retried_with_backoff_until_success() {
    let jobs = vec![with_retries(job("a", Delivery::Queue, &[], &[]), 3, 1_000)];
    let mut h = Harness::new(jobs, &["w1"]);
    let (fx, run_id) = h.trigger("a");
    let mut a = works(&fx).remove(0).assignments.remove(0);
    for attempt in 1..=2u32 {
        assert_eq!(a.task.attempt, attempt);
        let fx = h.finish(&a, TaskOutcome::Failed);
        assert!(works(&fx).is_empty() && final_run_write(&fx).is_none());
        let recorded: Vec<u32> = fx
            .writes
            .iter()
            .filter_map(|w| match w {
                Write::Attempt(h) if !h.late && h.state == TaskState::Failed => Some(h.attempt),
                _ => None,
            })
            .collect();
        assert_eq!(
            recorded,
            vec![attempt],
            "the failed attempt goes to the history at once"
        );
        // Not before the backoff (base · 2^(n-1), up to +25 %).
        let base = 1_000 * (1 << (attempt - 1));
        h.now += base - 1;
        assert!(
            works(&h.engine.tick(h.now)).is_empty(),
            "retried before its backoff"
        );
        h.now += base / 4 + 2;
        let mut w = works(&h.engine.tick(h.now));
        assert_eq!(w.len(), 1, "retry published after its backoff");
        a = w.remove(0).assignments.remove(0);
    }
    assert_eq!(a.task.attempt, 3);
    let fx = h.finish(&a, TaskOutcome::Succeeded);
    let run = fx.writes.iter().find_map(|w| match w {
        Write::Run(r) if r.state.is_final() => Some(r.clone()),
        _ => None,
    });
    let run = run.expect("the run did not end");
    assert_eq!(
        (run.run_id, run.state),
        (RunId::from(run_id.unwrap()), RunState::Succeeded)
    );
}

#[test]
fn exhausted_retries_go_to_the_dead_list_and_can_be_rerun() {
    let jobs = vec![with_retries(job("a", Delivery::Queue, &[], &[]), 1, 10)];
    let mut h = Harness::new(jobs, &["w1"]);
    let (fx, run_id) = h.trigger("a");
    let a = works(&fx).remove(0).assignments.remove(0);
    h.finish(&a, TaskOutcome::Failed);
    h.now += 100;
    let a2 = works(&h.engine.tick(h.now)).remove(0).assignments.remove(0);
    let fx = h.finish(&a2, TaskOutcome::Failed);
    assert_eq!(final_run_write(&fx), Some(RunState::Failed));
    let fx = h.send("frontend:x", Message::Query(Query::Dead { limit: 10 }));
    let ReplyBody::Dead(dead) = replies(&fx).remove(0) else {
        panic!("not a dead list")
    };
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].attempts, 2);
    assert_eq!(dead[0].run_id, run_id.clone().unwrap());

    let task_id = dead[0].task_id.clone();
    let fx = h.send(
        "frontend:x",
        Message::RetryDead {
            task_id: task_id.clone(),
        },
    );
    let ReplyBody::Accepted { run_id: rerun } = replies(&fx).remove(0) else {
        panic!("not accepted")
    };
    assert_eq!(works(&fx).len(), 1, "the re-run starts at once");
    assert_eq!(h.run(&rerun).parent_runs, vec![run_id.unwrap()]);
    let again = h.send("frontend:x", Message::RetryDead { task_id });
    assert_eq!(
        replies(&again),
        vec![ReplyBody::Accepted { run_id: rerun }],
        "a second retry is the same run"
    );
    let unknown = h.send(
        "frontend:x",
        Message::RetryDead {
            task_id: "nope".into(),
        },
    );
    assert!(matches!(
        replies(&unknown)[..],
        [ReplyBody::Rejected { status: 404, .. }]
    ));
}

#[test]
fn a_long_step_keeps_its_lease_while_the_worker_heartbeats() {
    let jobs = vec![with_retries(job("a", Delivery::Queue, &[], &[]), 3, 10)];
    let mut h = Harness::new(jobs, &["w1", "w2"]);
    let (fx, _) = h.trigger("a");
    let a = works(&fx).remove(0).assignments.remove(0);
    start(&mut h, &a);
    for _ in 0..50 {
        h.now += 5_000; // 250 s in all, four times the lease
        heartbeat_running(&mut h, &a.worker, vec![a.task.clone()]);
        let other = if a.worker == "w1" { "w2" } else { "w1" };
        heartbeat_running(&mut h, other, vec![]);
        let fx = h.engine.tick(h.now);
        assert!(
            works(&fx).is_empty() && fx.writes.is_empty(),
            "the step was given to someone else"
        );
    }
    let fx = h.finish(&a, TaskOutcome::Succeeded);
    assert_eq!(final_run_write(&fx), Some(RunState::Succeeded));
}

#[test]
fn a_partitioned_worker_loses_its_lease_and_its_late_result_is_only_recorded() {
    let jobs = vec![with_retries(job("a", Delivery::Queue, &[], &[]), 2, 10)];
    let mut h = Harness::new(jobs, &["w1", "w2"]);
    let (fx, _) = h.trigger("a");
    let first = works(&fx).remove(0).assignments.remove(0);
    start(&mut h, &first);
    let other = if first.worker == "w1" { "w2" } else { "w1" };
    // The first worker goes silent; the other keeps beating.
    let mut retried = None;
    for _ in 0..20 {
        h.now += 5_000;
        heartbeat_running(&mut h, other, vec![]);
        let mut w = works(&h.engine.tick(h.now));
        if let Some(w) = w.pop() {
            retried = Some(w.assignments[0].clone());
            break;
        }
    }
    let second = retried.expect("the step was not retried after the lease expired");
    assert_eq!(second.worker, other, "retried on the other worker");
    assert_eq!(second.task.attempt, 2);
    // The partition heals: the old attempt's result arrives late.
    let fx = h.finish(&first, TaskOutcome::Succeeded);
    assert!(
        fx.writes
            .iter()
            .all(|w| matches!(w, Write::Attempt(a) if a.late)),
        "a late result changed state"
    );
    assert_eq!(fx.writes.len(), 1, "the late result is recorded");
    assert_eq!(h.task(&second.task.task_id).attempt, 2);
    let fx = h.finish(&second, TaskOutcome::Succeeded);
    assert_eq!(final_run_write(&fx), Some(RunState::Succeeded));
}

#[test]
fn queue_steps_wait_for_a_free_slot() {
    let mut h = Harness::new(vec![job("a", Delivery::Queue, &[], &[])], &[]);
    for w in ["w1", "w2"] {
        let status = WorkerStatus {
            name: w.into(),
            instance: "i1".into(),
            jobs: h.jobs.clone(),
            capabilities: vec![],
            slots: 1,
            running: vec![],
            version: "t".into(),
            counters: Default::default(),
            leaving: false,
        };
        h.send(&format!("worker:{w}"), Message::Heartbeat(status));
    }
    let placed: Vec<Assignment> = (0..3)
        .flat_map(|_| works(&h.trigger("a").0))
        .flat_map(|w| w.assignments)
        .collect();
    assert_eq!(placed.len(), 2, "one per free slot");
    assert_ne!(
        placed[0].worker, placed[1].worker,
        "spread over the workers"
    );
    let fx = h.finish(&placed[0], TaskOutcome::Succeeded);
    let next = works(&fx);
    assert_eq!(next.len(), 1, "the waiting step takes the freed slot");
    assert_eq!(next[0].assignments[0].worker, placed[0].worker);
    assert!(works(&h.engine.tick(h.now)).is_empty(), "and only once");
}

#[test]
fn an_unstarted_queue_task_of_a_lost_worker_moves_without_using_a_retry() {
    let jobs = vec![job("a", Delivery::Queue, &[], &[])]; // retries: 0
    let mut h = Harness::new(jobs, &["w1", "w2"]);
    let (fx, _) = h.trigger("a");
    let first = works(&fx).remove(0).assignments.remove(0);
    let other = if first.worker == "w1" { "w2" } else { "w1" };
    let mut moved = None;
    for _ in 0..5 {
        h.now += 4_000;
        heartbeat_running(&mut h, other, vec![]);
        let w = works(&h.engine.tick(h.now));
        if let Some(w) = w.into_iter().find(|w| w.assignments[0].worker == other) {
            moved = Some(w.assignments[0].clone());
            break;
        }
    }
    let moved = moved.expect("not moved to the live worker");
    assert_eq!(moved.task.attempt, 2, "a new attempt fences the old worker");
    let fx = h.finish(&moved, TaskOutcome::Succeeded);
    assert_eq!(final_run_write(&fx), Some(RunState::Succeeded));
}

#[test]
fn the_same_events_replay_to_the_same_decisions() {
    // Regression: the engine made its ids from the clock and a random source, so two
    // replays of one sequence of events made different runs, steps and tasks.
    let jobs = vec![
        with_retries(job("a", Delivery::Broadcast, &["l", "q"], &["q"]), 1, 100),
        job("l", Delivery::Local, &[], &[]),
        with_retries(job("q", Delivery::Queue, &[], &[]), 2, 100),
    ];
    let script = |mut h: Harness| -> Vec<String> {
        let mut decisions = Vec::new();
        for _ in 0..3 {
            let (fx, _) = h.trigger("a");
            let mut work: Vec<Assignment> =
                works(&fx).into_iter().flat_map(|w| w.assignments).collect();
            decisions.push(format!("{fx:?}"));
            for round in 0..20 {
                for (i, a) in std::mem::take(&mut work).iter().enumerate() {
                    let outcome = if (i + round) % 3 == 0 {
                        TaskOutcome::Failed
                    } else {
                        TaskOutcome::Succeeded
                    };
                    let fx = h.finish(a, outcome);
                    work.extend(works(&fx).into_iter().flat_map(|w| w.assignments));
                    decisions.push(format!("{fx:?}"));
                }
                h.now += 500;
                let fx = h.engine.tick(h.now);
                work.extend(works(&fx).into_iter().flat_map(|w| w.assignments));
                decisions.push(format!("{fx:?}"));
            }
        }
        decisions
    };
    let first = script(Harness::new(jobs.clone(), &["w1", "w2", "w3"]));
    let second = script(Harness::new(jobs, &["w1", "w2", "w3"]));
    assert!(first.len() > 20);
    for (i, (a, b)) in first.iter().zip(&second).enumerate() {
        assert_eq!(a, b, "decision {i} differs between two replays");
    }
}

#[test]
fn completion_events_carry_the_fanout_of_the_broadcast_behind_them() {
    let jobs = vec![
        job("a", Delivery::Broadcast, &["l"], &[]),
        job("l", Delivery::Local, &[], &[]),
    ];
    let mut h = Harness::new(jobs, &["w1", "w2", "w3"]);
    let (fx, _) = h.trigger("a");
    let a = works(&fx).remove(0);
    let fx = h.finish(&a.assignments[0], TaskOutcome::Succeeded);
    let events: Vec<jobz::message::Completion> = fx
        .publish
        .iter()
        .filter_map(|p| match &p.body {
            Message::Event(Event::TaskFinished(c)) => Some(c.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(events.len(), 1);
    assert_eq!((events[0].job.as_str(), events[0].fanout), ("a", 3));
    let l = works(&fx).remove(0).assignments.remove(0);
    let fx = h.finish(&l, TaskOutcome::Succeeded);
    let fanouts: Vec<u32> = fx
        .publish
        .iter()
        .filter_map(|p| match &p.body {
            Message::Event(Event::TaskFinished(c)) if c.job == "l" => Some(c.fanout),
            _ => None,
        })
        .collect();
    assert_eq!(
        fanouts,
        vec![3],
        "a local step inherits the fanout of the step it follows"
    );
}

#[test]
fn a_restored_pending_task_is_published_again_at_once() {
    // Regression: a broker killed between journaling a task and its worker receiving it
    // never published the task again after restart.
    let mut h = Harness::new(vec![job("a", Delivery::Broadcast, &[], &[])], &["w1"]);
    let (_, run_id) = h.trigger("a");
    let run = h.run(&run_id.unwrap()).clone();
    let steps: Vec<Step> = h.engine.active.steps().cloned().collect();
    let tasks: Vec<Task> = h.engine.active.tasks().map(|t| t.record.clone()).collect();
    let snapshot = Snapshot {
        runs: vec![run],
        steps,
        tasks,
        ..Default::default()
    };
    let ids = Box::new(SequentialIds::after(1_000));
    let mut restored = Engine::restore(config(), snapshot, ids, h.now);
    restored.heartbeat_for_test(&h.jobs, "w1", h.now);
    let again = works(&restored.tick(h.now));
    assert_eq!(
        again.len(),
        1,
        "the pending task was not published after restore"
    );
}

/// Registers `worker` serving `h.jobs` with `slots` slots.
fn register_with_slots(h: &mut Harness, worker: &str, slots: u32) {
    let mut status = worker_status(worker, "i1", h.jobs.clone());
    status.slots = slots;
    h.send(&format!("worker:{worker}"), Message::Heartbeat(status));
}

#[test]
fn waiting_steps_of_several_jobs_go_in_the_order_they_came_and_a_full_job_holds_none_up() {
    let mut h = Harness::new(vec![], &[]);
    h.jobs = vec![
        job("a", Delivery::Queue, &[], &[]),
        job("b", Delivery::Queue, &[], &[]),
    ];
    register_with_slots(&mut h, "w1", 1);
    let trigger = |h: &mut Harness, job: &str| {
        let (fx, run_id) = h.trigger(job);
        (works(&fx), run_id.unwrap())
    };
    let (first, _) = trigger(&mut h, "a");
    let (_, b1) = trigger(&mut h, "b");
    let (_, a2) = trigger(&mut h, "a");
    let (_, b2) = trigger(&mut h, "b");
    let mut running = first[0].assignments[0].clone();
    for expected in [b1, a2, b2] {
        let next = works(&h.finish(&running, TaskOutcome::Succeeded));
        assert_eq!(next.len(), 1);
        assert_eq!(next[0].run_id, expected, "not the step that came first");
        running = next[0].assignments[0].clone();
    }

    // `c` waits behind a full worker; `d`, behind it in line, has a free one.
    let mut h = Harness::new(vec![], &[]);
    h.jobs = vec![job("c", Delivery::Queue, &[], &[])];
    register_with_slots(&mut h, "w1", 1);
    h.jobs = vec![job("d", Delivery::Queue, &[], &[])];
    register_with_slots(&mut h, "w2", 1);
    let (_, _) = trigger(&mut h, "c");
    let (d1, _) = trigger(&mut h, "d");
    let (_, _) = trigger(&mut h, "c");
    let (_, d2) = trigger(&mut h, "d");
    let next = works(&h.finish(&d1[0].assignments[0], TaskOutcome::Succeeded));
    assert_eq!(next.len(), 1, "the waiting `c` held up `d`");
    assert_eq!(
        (next[0].run_id.as_str(), next[0].job.as_str()),
        (d2.as_str(), "d")
    );
}

#[test]
fn placing_after_a_freed_slot_costs_the_same_whatever_the_backlog() {
    // Regression (issue 12): every freed slot copied the whole waiting set and recounted the
    // load of every task, so each placement cost O(backlog) and a drain was quadratic.
    const BACKLOG: usize = 100_000;
    /// Things placement may look at per step placed: the job's first waiting step and the
    /// candidate workers, for this step and for the next one it cannot place.
    const BOUND: u64 = 12;
    let mut h = Harness::new(vec![], &[]);
    h.check = false; // a count from scratch per event would make the drain quadratic
    h.jobs = vec![job("a", Delivery::Queue, &[], &[])];
    register_with_slots(&mut h, "w1", 2);
    register_with_slots(&mut h, "w2", 2);
    let mut running = std::collections::VecDeque::new();
    let mut triggered = Vec::with_capacity(BACKLOG);
    for _ in 0..BACKLOG {
        let (fx, run_id) = h.trigger("a");
        triggered.push(run_id.expect("not accepted"));
        running.extend(works(&fx).into_iter().flat_map(|w| w.assignments));
    }
    assert_eq!(running.len(), 4, "one step per free slot, the rest wait");
    let mut placed_runs: Vec<String> = triggered[..4].to_vec();
    let (mut worst, started) = (0, h.engine.placement_work.get());
    let clock = std::time::Instant::now();
    while let Some(a) = running.pop_front() {
        let before = h.engine.placement_work.get();
        let next = works(&h.finish(&a, TaskOutcome::Succeeded));
        let work = h.engine.placement_work.get() - before;
        let waiting = BACKLOG - placed_runs.len();
        assert!(
            work <= BOUND,
            "placement {} with {waiting} steps waiting looked at {work} things",
            placed_runs.len()
        );
        worst = worst.max(work);
        for w in next {
            placed_runs.push(w.run_id);
            running.extend(w.assignments);
        }
    }
    assert_eq!(
        placed_runs, triggered,
        "the backlog drained first come, first served"
    );
    assert_eq!(h.engine.active.run_count(), 0);
    h.engine.active.assert_consistent();
    let placements = (BACKLOG - 4) as u64;
    eprintln!(
        "drained {placements} waiting steps in {:?}: {} things looked at, {:.2} per placement, worst {worst}",
        clock.elapsed(),
        h.engine.placement_work.get() - started,
        (h.engine.placement_work.get() - started) as f64 / placements as f64,
    );
}

#[test]
fn queue_steps_waiting_for_a_slot_are_served_first_come_first_served() {
    // Regression (found by the bench): a new trigger took a freed slot ahead of steps that
    // were already waiting, so latency under a burst was not FIFO.
    let mut h = Harness::new(vec![], &[]);
    h.jobs = vec![job("a", Delivery::Queue, &[], &[])];
    let status = WorkerStatus {
        name: "w1".into(),
        instance: "i1".into(),
        jobs: h.jobs.clone(),
        capabilities: vec![],
        slots: 1,
        running: vec![],
        version: "t".into(),
        counters: Default::default(),
        leaving: false,
    };
    h.send("worker:w1", Message::Heartbeat(status));
    let (fx, _) = h.trigger("a");
    let first = works(&fx).remove(0).assignments.remove(0);
    let (_, waiting_run) = h.trigger("a");
    assert!(works(&h.trigger("a").0).is_empty(), "no free slot");
    // The slot frees: the oldest waiting step takes it at once, in the same effects.
    let fx = h.finish(&first, TaskOutcome::Succeeded);
    let next = works(&fx);
    assert_eq!(
        next.len(),
        1,
        "the freed slot is taken without waiting for a tick"
    );
    assert_eq!(
        next[0].run_id,
        waiting_run.unwrap(),
        "the oldest waiting step goes first"
    );
    // A new trigger does not jump the queue while others wait.
    let (fx, _) = h.trigger("a");
    assert!(works(&fx).is_empty());
}

// ---- Principals: names bound to their sender (issue 10) -----------------------------------

fn barrier_view(reporter: &str, key: &str) -> jobz::message::BarrierView {
    jobz::message::BarrierView {
        semaphore: "nightly".into(),
        key: key.into(),
        params: Params::new(),
        conditions: vec![],
        state: "waiting".into(),
        runs: vec!["r1".into()],
        started_run: None,
        opened_at_ms: 0,
        reporter: reporter.into(),
    }
}

/// A registration as a forger would send it: any name, instance and jobs.
fn worker_status(name: &str, instance: &str, jobs: Vec<JobSpec>) -> WorkerStatus {
    WorkerStatus {
        name: name.into(),
        instance: instance.into(),
        jobs,
        capabilities: vec![],
        slots: 4,
        running: vec![],
        version: "t".into(),
        counters: Default::default(),
        leaving: false,
    }
}

fn shown_barriers(h: &mut Harness) -> Vec<jobz::message::BarrierView> {
    let fx = h.send("frontend:x", Message::Query(Query::Semaphores));
    match replies(&fx).remove(0) {
        ReplyBody::Semaphores(views) => views,
        other => panic!("{other:?}"),
    }
}

#[test]
fn semaphore_reports_under_many_sender_ids_of_one_principal_stay_bounded() {
    // Regression: reports were kept per sender id, and one principal may use any number
    // (`semaphore:s1/<anything>`): 150 frames took the broker from 24 MB to 211 MB.
    let mut h = Harness::new(vec![], &[]);
    for i in 0..1000 {
        let sender = format!("semaphore:s1/{i:08x}");
        let barriers = (0..3)
            .map(|j| barrier_view(&sender, &format!("k{i}-{j}")))
            .collect();
        h.send(
            &sender,
            Message::SemaphoreStatus {
                barriers,
                schedules: vec![],
            },
        );
    }
    let shown = shown_barriers(&mut h);
    assert!(
        shown.len() <= crate::semaphore_reports::MAX_REPORTERS_PER_PRINCIPAL * 3,
        "{} barriers held for one principal",
        shown.len()
    );
    let held = h.engine.semaphores.bytes();
    assert!(
        held < 8_000,
        "{held} bytes held for one principal's four small reports"
    );
    // Stale reports go at a tick.
    h.now += crate::semaphore_reports::REPORT_TTL_MS + 1;
    let _ = h.engine.tick(h.now);
    assert_eq!(h.engine.semaphores.bytes(), 0);
}

#[test]
fn an_oversized_semaphore_status_is_trimmed_and_counted() {
    let mut h = Harness::new(vec![], &[]);
    let sender = "semaphore:s1/a";
    let barriers = (0..2_000)
        .map(|i| barrier_view(sender, &format!("k{i}")))
        .collect();
    h.send(
        sender,
        Message::SemaphoreStatus {
            barriers,
            schedules: vec![],
        },
    );
    assert_eq!(
        shown_barriers(&mut h).len(),
        crate::semaphore_reports::MAX_VIEWS_PER_REPORT
    );
    let trimmed = h.engine.health().counters["semaphore_views_trimmed"];
    assert_eq!(
        trimmed as usize,
        2_000 - crate::semaphore_reports::MAX_VIEWS_PER_REPORT
    );
}

/// A broker with `a` running on w1.
fn running_on_w1() -> (Harness, Assignment) {
    let mut h = Harness::new(vec![job("a", Delivery::Broadcast, &[], &[])], &["w1"]);
    let (fx, _) = h.trigger("a");
    let a = works(&fx).remove(0).assignments.remove(0);
    start(&mut h, &a);
    (h, a)
}

#[test]
fn a_semaphore_cannot_finish_a_workers_task() {
    let (mut h, a) = running_on_w1();
    let forged = h.report(&a, TaskOutcome::Succeeded);
    let fx = h.send("semaphore:s1/x", Message::TaskFinished(forged));
    assert!(fx.is_empty(), "{fx:?}");
    assert_eq!(h.task(&a.task.task_id).state, TaskState::Running);
    assert_eq!(
        h.engine.health().counters.get("frames_dropped_wrong_role"),
        Some(&1)
    );
    let fx = h.finish(&a, TaskOutcome::Succeeded);
    assert_eq!(final_run_write(&fx), Some(RunState::Succeeded));
}

#[test]
fn a_heartbeat_in_another_workers_name_is_refused() {
    let (mut h, a) = running_on_w1();
    let forged = worker_status("w1", "forged", vec![]);
    let fx = h.send("worker:mallory", Message::Heartbeat(forged));
    assert!(fx.is_empty(), "{fx:?}");
    let task = h.task(&a.task.task_id);
    assert_eq!((task.state, task.attempt), (TaskState::Running, 1));
    assert!(h.engine.registry.worker("mallory").is_none());
    assert_eq!(
        h.engine
            .health()
            .counters
            .get("frames_dropped_name_mismatch"),
        Some(&1)
    );
}

/// The workers a new run of `job` is placed on.
fn placed_on_trigger(h: &mut Harness, job: &str) -> Vec<String> {
    let (fx, _) = h.trigger(job);
    works(&fx)
        .into_iter()
        .flat_map(|w| w.assignments)
        .map(|a| a.worker)
        .collect()
}

#[test]
fn a_non_worker_cannot_register_and_get_work() {
    let mut h = Harness::new(vec![job("a", Delivery::Broadcast, &[], &[])], &["w1"]);
    for sender in ["frontend:f1/x", "semaphore:s1/x", "client:c1"] {
        let name = jobz::keys::principal_of(sender).split_once(':').unwrap().1;
        let forged = worker_status(name, "forged", h.jobs.clone());
        assert!(h.send(sender, Message::Heartbeat(forged)).is_empty());
    }
    assert_eq!(placed_on_trigger(&mut h, "a"), ["w1"]);
}

#[test]
fn a_revoked_worker_is_not_revived_by_another_workers_heartbeat() {
    let mut h = Harness::new(vec![job("a", Delivery::Broadcast, &[], &[])], &["w1", "w2"]);
    let _ = h.engine.revoke_worker("w2", h.now);
    let forged = worker_status("w2", "i1", h.jobs.clone());
    h.send("worker:w1", Message::Heartbeat(forged));
    assert!(!h.engine.registry.worker("w2").unwrap().live);
    assert_eq!(
        placed_on_trigger(&mut h, "a"),
        ["w1"],
        "the revoked w2 got new work"
    );
}

#[test]
fn a_result_for_an_attempt_never_given_to_the_worker_is_not_recorded() {
    let mut h = Harness::new(vec![job("a", Delivery::Broadcast, &[], &[])], &["w1", "w2"]);
    let (fx, _) = h.trigger("a");
    let work = works(&fx).remove(0);
    let a = work.assignments.iter().find(|a| a.worker == "w1").unwrap();
    for attempt in [1, 2, u32::MAX] {
        let forged = Assignment {
            worker: "w2".into(),
            task: TaskRef {
                task_id: a.task.task_id.clone(),
                attempt,
            },
        };
        let fx = h.finish(&forged, TaskOutcome::Failed);
        assert!(fx.writes.is_empty(), "attempt {attempt}: {:?}", fx.writes);
        assert_eq!(replies(&fx), vec![ReplyBody::Ack]);
    }
    assert_eq!(h.engine.health().counters["foreign_results"], 3);
    assert_eq!(h.task(&a.task.task_id).state, TaskState::Pending);
}

#[test]
fn a_reports_error_text_is_bounded() {
    let mut h = Harness::new(vec![job("a", Delivery::Broadcast, &[], &[])], &["w1"]);
    let (fx, _) = h.trigger("a");
    let a = works(&fx).remove(0).assignments.remove(0);
    let mut report = h.report(&a, TaskOutcome::Failed);
    report.error = Some("e".repeat(500_000));
    report.output_tail = "o".repeat(500_000);
    let fx = h.send("worker:w1", Message::TaskFinished(report));
    let task = fx
        .writes
        .iter()
        .find_map(|w| match w {
            Write::Task(t) => Some(t.clone()),
            _ => None,
        })
        .unwrap();
    assert!(task.error.unwrap().len() <= 2 * MAX_REPORTED_TEXT);
    assert!(task.output_tail.len() <= MAX_REPORTED_TEXT);
}

/// `spec` with a parameter `v` whose pattern is `pattern`.
fn with_param_v(mut spec: JobSpec, required: bool, pattern: &str) -> JobSpec {
    let pattern = pattern.into();
    let param = jobz::jobfile::ParamSpec { required, pattern };
    spec.params.insert("v".into(), param);
    spec
}

#[test]
fn triggers_check_parameters_with_the_patterns_compiled_at_registration() {
    let spec = with_param_v(job("p", Delivery::Queue, &[], &[]), true, "[a-z]+");
    let mut h = Harness::new(vec![spec], &["w1"]);
    let compiled_at_registration = jobz::jobfile::patterns_compiled_on_this_thread();
    for (value, accepted) in [("abc", true), ("a;b", false), ("xyz", true), ("", false)] {
        let fx = h.send(
            "frontend:x",
            Message::Trigger(TriggerRequest {
                job: "p".into(),
                params: [("v".to_string(), value.to_string())].into(),
                ..Default::default()
            }),
        );
        let reply = &replies(&fx)[0];
        match reply {
            ReplyBody::Accepted { .. } => assert!(accepted, "{value:?} accepted"),
            ReplyBody::Rejected { status: 400, .. } => assert!(!accepted, "{value:?} refused"),
            other => panic!("{value:?}: {other:?}"),
        }
    }
    // Heartbeats that repeat the definition compile nothing either.
    h.heartbeat("w1", "i1");
    assert_eq!(
        jobz::jobfile::patterns_compiled_on_this_thread(),
        compiled_at_registration,
        "triggers and unchanged heartbeats must not compile patterns"
    );
}

#[test]
fn a_job_definition_with_an_oversized_pattern_is_refused_and_counted() {
    let huge = with_param_v(job("huge", Delivery::Queue, &[], &[]), false, r"^\w{100}$");
    let mut h = Harness::new(vec![job("fine", Delivery::Queue, &[], &[]), huge], &["w1"]);
    assert_eq!(
        h.engine.health().counters.get("job_definitions_refused"),
        Some(&1)
    );
    let (fx, run) = h.trigger("huge");
    assert!(run.is_none());
    assert!(matches!(
        replies(&fx)[..],
        [ReplyBody::Rejected { status: 404, .. }]
    ));
    assert!(
        h.trigger("fine").1.is_some(),
        "the worker's other job registered"
    );
    // Sent again unchanged, the refusal is not counted again.
    h.heartbeat("w1", "i1");
    assert_eq!(
        h.engine.health().counters.get("job_definitions_refused"),
        Some(&1)
    );
}

mod feed;
mod run_control;

#[test]
fn a_run_is_running_when_a_heartbeat_reports_its_task_before_task_started_does() {
    // A heartbeat listing the task can overtake the worker's `TaskStarted`; the run must
    // not stay `pending` while its task runs (seen in the bench, one run in 16).
    let mut h = Harness::new(vec![job("a", Delivery::Queue, &[], &[])], &["w1"]);
    let (fx, run_id) = h.trigger("a");
    let run_id = run_id.unwrap();
    let a = works(&fx).remove(0).assignments.remove(0);
    heartbeat_running(&mut h, &a.worker, vec![a.task.clone()]);
    assert_eq!(h.task(&a.task.task_id).state, TaskState::Running);
    assert_eq!(h.run_state(&run_id), Some(RunState::Running));
    // The late `TaskStarted` changes nothing, and the run still ends as it should.
    start(&mut h, &a);
    assert_eq!(h.run_state(&run_id), Some(RunState::Running));
    let fx = h.finish(&a, TaskOutcome::Succeeded);
    assert_eq!(final_run_write(&fx), Some(RunState::Succeeded));
}

/// The store after `writes`, each effect's writes committed on their own.
fn store_after(batches: &[Vec<Write>]) -> crate::store::SqliteStore {
    use crate::store::Store;
    let mut store = crate::store::SqliteStore::in_memory().unwrap();
    for writes in batches {
        store.apply(writes).unwrap();
    }
    store
}

/// Everything a client can read of `store`: each run with its tasks, the run list, the
/// snapshot a restart resumes from.
fn readable(store: &crate::store::SqliteStore) -> String {
    use crate::store::Store;
    let filter = jobz::message::RunFilter {
        limit: 1000,
        ..Default::default()
    };
    let runs = store.runs(&filter).unwrap();
    let each: Vec<_> = runs.iter().map(|r| store.run(&r.run_id).unwrap()).collect();
    format!("{runs:?}\n{each:?}\n{:?}", store.load().unwrap())
}

#[test]
fn a_coalesced_commit_leaves_the_store_as_the_writes_one_by_one_do() {
    let jobs = vec![
        with_retries(job("a", Delivery::Queue, &["b"], &["f"]), 1, 10),
        job("b", Delivery::Broadcast, &[], &[]),
        job("f", Delivery::Queue, &[], &[]),
    ];
    let mut h = Harness::new(jobs, &["w1", "w2"]);
    let mut batches: Vec<Vec<Write>> = Vec::new();
    let mut keep = |fx: &Effects| batches.push(fx.writes.clone());
    // A run that succeeds through a broadcast successor.
    let (fx, _) = h.trigger("a");
    keep(&fx);
    let a = works(&fx).remove(0).assignments.remove(0);
    let fx = h.finish(&a, TaskOutcome::Succeeded);
    keep(&fx);
    for b in works(&fx).remove(0).assignments {
        keep(&h.finish(&b, TaskOutcome::Succeeded));
    }
    // A run that fails, is retried, fails for good, runs its failure handler, and whose
    // dead task is re-run.
    let (fx, _) = h.trigger("a");
    keep(&fx);
    let a = works(&fx).remove(0).assignments.remove(0);
    keep(&h.finish(&a, TaskOutcome::Failed));
    h.now += 100;
    let fx = h.engine.tick(h.now);
    keep(&fx);
    let a2 = works(&fx).remove(0).assignments.remove(0);
    let fx = h.finish(&a2, TaskOutcome::Failed);
    keep(&fx);
    let f = works(&fx).remove(0).assignments.remove(0);
    keep(&h.finish(&f, TaskOutcome::Succeeded));
    let fx = h.send(
        "frontend:x",
        Message::RetryDead {
            task_id: a2.task.task_id.clone(),
        },
    );
    keep(&fx);
    // A run left unfinished, tracked.
    let (fx, run_id) = h.trigger("f");
    keep(&fx);
    keep(&h.send(
        "frontend:x",
        Message::TrackRun {
            run_id: run_id.unwrap(),
            tracked: true,
            notify: vec![],
        },
    ));

    let all: Vec<Write> = batches.concat();
    let coalesced = super::effects::coalesce(all.clone());
    assert!(coalesced.len() < all.len(), "nothing was coalesced");
    assert_eq!(
        readable(&store_after(&[coalesced])),
        readable(&store_after(&batches))
    );
}

#[test]
fn after_a_restart_a_placed_writer_still_holds_its_output_and_the_next_one_waits() {
    let mut writer = job("w", Delivery::Queue, &[], &[]);
    writer.outputs = vec!["out".into()];
    let mut h = Harness::new(vec![writer.clone()], &["w1"]);
    let (fx, first) = h.trigger("w");
    let placed = works(&fx).remove(0).assignments.remove(0);
    let (fx, second) = h.trigger("w");
    assert!(
        works(&fx).is_empty(),
        "the second writer waits for the output"
    );
    let runs: Vec<Run> = [&first, &second]
        .into_iter()
        .map(|r| h.run(r.as_deref().unwrap()).clone())
        .collect();
    let snapshot = Snapshot {
        runs,
        steps: h.engine.active.steps().cloned().collect(),
        tasks: h.engine.active.tasks().map(|t| t.record.clone()).collect(),
        catalog: vec![CatalogEntry {
            spec: writer,
            source: "w1".into(),
            updated_at_ms: 0,
        }],
        ..Default::default()
    };
    let ids = Box::new(SequentialIds::after(1_000));
    h.engine = Engine::restore(config(), snapshot, ids, h.now);
    h.heartbeat("w1", "i1");
    let fx = h.engine.tick(h.now);
    let republished: Vec<String> = works(&fx)
        .into_iter()
        .flat_map(|w| w.assignments)
        .map(|a| a.task.task_id)
        .collect();
    assert_eq!(
        republished,
        vec![placed.task.task_id.clone()],
        "only the placed writer goes out again"
    );
    let fx = h.finish(&placed, TaskOutcome::Succeeded);
    let next = works(&fx);
    assert_eq!(
        next.len(),
        1,
        "the second writer starts once the first ends"
    );
    assert_eq!(next[0].run_id, second.unwrap());
}

#[test]
fn a_run_end_query_is_held_until_the_run_ends_then_read_from_the_store() {
    use super::effects::ReadQuery;
    let mut h = Harness::new(vec![job("a", Delivery::Queue, &[], &[])], &["w1"]);
    let (fx, run_id) = h.trigger("a");
    let run_id = run_id.unwrap();
    let a = works(&fx).remove(0).assignments.remove(0);
    let ask = |h: &mut Harness| {
        h.send(
            "frontend:f",
            Message::Query(Query::RunEnd {
                run_id: run_id.clone(),
                wait_ms: 60_000,
            }),
        )
    };
    let held = ask(&mut h);
    assert!(
        held.reads.is_empty() && held.publish.is_empty(),
        "answered before the run ended"
    );
    let fx = h.finish(&a, TaskOutcome::Succeeded);
    let reads: Vec<_> = fx.reads.iter().map(|r| (&r.reply_to, &r.query)).collect();
    assert_eq!(
        reads,
        vec![(
            &"frontend:f".to_string(),
            &ReadQuery::Run(RunId::from(run_id.as_str()))
        )],
        "the run's end answers the held query, from the store"
    );
    // Asked again once it has ended (or for an unknown run): read at once.
    assert_eq!(ask(&mut h).reads.len(), 1);
}

fn output_piece(a: &Assignment, worker: &str, offset: u64, text: &str) -> Message {
    Message::TaskOutput(jobz::message::TaskOutput {
        task: a.task.clone(),
        worker: worker.into(),
        offset,
        bytes: text.len() as u64,
        text: text.into(),
        capped: false,
    })
}

fn read_output(
    h: &mut Harness,
    a: &Assignment,
    from: u64,
) -> Option<jobz::message::LiveOutputView> {
    let fx = h.send(
        "frontend:f1",
        Message::Query(jobz::message::Query::TaskOutput {
            task_id: a.task.task_id.clone(),
            attempt: a.task.attempt,
            from,
        }),
    );
    match replies(&fx).pop() {
        Some(ReplyBody::TaskOutput(view)) => view,
        other => panic!("expected a TaskOutput answer, got {other:?}"),
    }
}

#[test]
fn live_output_is_kept_from_the_worker_running_the_attempt_only_and_ends_with_it() {
    let (mut h, a) = running_on_w1();
    h.heartbeat("w2", "i1");
    assert!(h
        .send("worker:w1", output_piece(&a, "w1", 0, "one\n"))
        .is_empty());
    // Another worker (under its own name) cannot add to it, and a piece too big is dropped.
    h.send("worker:w2", output_piece(&a, "w2", 4, "forged\n"));
    let huge = "x".repeat(jobz::message::TASK_OUTPUT_CHUNK_BYTES + 1);
    h.send("worker:w1", output_piece(&a, "w1", 4, &huge));
    let view = read_output(&mut h, &a, 0).expect("output held");
    assert_eq!(
        (view.text.as_str(), view.next, view.finished),
        ("one\n", 4, false)
    );
    let counters = h.engine.health().counters;
    assert_eq!(counters.get("task_output_stale"), Some(&1));
    assert_eq!(counters.get("frames_dropped_bad_task_output"), Some(&1));
    h.finish(&a, TaskOutcome::Succeeded);
    // Ended: readable, marked finished, and takes nothing more.
    h.send("worker:w1", output_piece(&a, "w1", 4, "late\n"));
    let view = read_output(&mut h, &a, 0).expect("output held after the end");
    assert_eq!((view.text.as_str(), view.finished), ("one\n", true));
}

#[test]
fn every_listed_drop_reason_shows_at_zero_and_an_unlisted_one_is_caught() {
    let mut h = Harness::new(vec![], &[]);
    let counters = h.engine.health().counters;
    for reason in DROP_REASONS {
        assert_eq!(
            counters.get(&format!("frames_dropped_{reason}")),
            Some(&0),
            "{reason}"
        );
    }
    if cfg!(debug_assertions) {
        let unlisted = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            h.engine.count_dropped_frame("made_up_reason")
        }));
        assert!(
            unlisted.is_err(),
            "a reason missing from DROP_REASONS passes"
        );
    }
}
