use super::*;
use jobz::jobfile::JobSpec;
use jobz::message::{Params, TaskOutcome};

fn config() -> EngineConfig {
    EngineConfig {
        worker_expiry_ms: 10_000,
        redeliver_after_ms: 2_000,
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
        tags: vec![],
    }
}

struct Harness {
    engine: Engine,
    now: i64,
    jobs: Vec<JobSpec>,
}

impl Harness {
    fn new(jobs: Vec<JobSpec>, workers: &[&str]) -> Harness {
        let mut h = Harness {
            engine: Engine::restore(config(), Snapshot::default(), 0),
            now: 1_000,
            jobs,
        };
        for w in workers {
            h.heartbeat(w, "i1");
        }
        h
    }

    fn send(&mut self, sender: &str, body: Message) -> Effects {
        let env = Envelope {
            id: jobz::new_id(),
            sender: sender.into(),
            sent_at_ms: self.now,
            body,
        };
        self.engine.on_envelope(env, self.now)
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
        };
        self.send(&format!("worker:{worker}"), Message::Heartbeat(status))
    }

    fn trigger(&mut self, job: &str) -> (Effects, Option<String>) {
        let fx = self.send(
            "frontend:x",
            Message::Trigger(TriggerRequest {
                job: job.into(),
                params: Params::new(),
                parent_runs: vec![],
            }),
        );
        let run_id = replies(&fx).into_iter().find_map(|r| match r {
            ReplyBody::Accepted { run_id } => Some(run_id),
            _ => None,
        });
        (fx, run_id)
    }

    fn finish(&mut self, a: &Assignment, outcome: TaskOutcome) -> Effects {
        let f = TaskFinished {
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
        };
        self.send(&format!("worker:{}", a.worker), Message::TaskFinished(f))
    }

    fn run_state(&self, run_id: &str) -> Option<RunState> {
        self.engine.runs.get(run_id).map(|r| r.state)
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
        h.engine.runs.is_empty() && h.engine.tasks.is_empty(),
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
            parent_runs: vec![],
        }),
    };
    let first = h.engine.on_envelope(env.clone(), h.now);
    let second = h.engine.on_envelope(env, h.now);
    assert_eq!(replies(&first)[0], replies(&second)[0]);
    assert!(second.writes.is_empty() && works(&second).is_empty());
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
    assert!(h.engine.runs.is_empty());
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
