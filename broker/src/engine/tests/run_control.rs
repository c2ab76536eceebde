//! The engine's run-control decisions (issue 11): priority, delay, dependencies, cancel,
//! `max_concurrency`, tags and tracking. Same harness as the rest of the engine's tests:
//! every event is replayed with the deterministic id source, and the indexes are checked
//! against a count from scratch after each one.

use jobz::message::{CancelWork, HealthView};

use super::*;
use crate::engine::effects::{ReadQuery, RunAction};

impl Harness {
    fn trigger_with(&mut self, request: TriggerRequest) -> (Effects, Option<String>) {
        let fx = self.send("frontend:x", Message::Trigger(request));
        let run_id = replies(&fx).into_iter().find_map(|r| match r {
            ReplyBody::Accepted { run_id } => Some(run_id),
            _ => None,
        });
        (fx, run_id)
    }

    /// A trigger of `job` as `adjust` makes it; its run id (it must be accepted).
    fn accepted(
        &mut self,
        job: &str,
        adjust: impl FnOnce(&mut TriggerRequest),
    ) -> (Effects, String) {
        let mut request = TriggerRequest {
            job: job.into(),
            ..Default::default()
        };
        adjust(&mut request);
        let (fx, run_id) = self.trigger_with(request);
        let run_id = run_id.unwrap_or_else(|| panic!("refused: {:?}", replies(&fx)));
        (fx, run_id)
    }

    fn tick(&mut self) -> Effects {
        let fx = self.engine.tick(self.now);
        self.engine.active.assert_consistent();
        fx
    }

    fn cancel(&mut self, run_id: &str, force: bool) -> Effects {
        let run_id = run_id.into();
        self.send("frontend:x", Message::CancelRun { run_id, force })
    }

    fn prioritize(&mut self, run_id: &str, priority: i32) -> Effects {
        let run_id = run_id.into();
        self.send("frontend:x", Message::PrioritizeRun { run_id, priority })
    }

    /// Hands the journal's lookups back to the engine with the store's answers from
    /// `store` (what is not in it, it does not hold).
    fn answer_lookups(&mut self, fx: &Effects, store: &[(&str, RunState)]) -> Effects {
        let mut all = Effects::default();
        for lookup in &fx.lookups {
            let mut lookup = lookup.clone();
            for run_id in std::mem::take(&mut lookup.ask) {
                let state = store.iter().find(|(id, _)| run_id == *id).map(|(_, s)| *s);
                lookup.known.insert(run_id, state);
            }
            let more = self.engine.on_lookup(lookup, self.now);
            self.engine.active.assert_consistent();
            all.writes.extend(more.writes);
            all.publish.extend(more.publish);
            all.reads.extend(more.reads);
            all.lookups.extend(more.lookups);
        }
        all
    }
}

/// The runs written, with the state each was written in.
fn run_writes(fx: &Effects) -> Vec<(String, RunState)> {
    fx.writes
        .iter()
        .filter_map(|w| match w {
            Write::Run(r) => Some((r.run_id.to_string(), r.state)),
            _ => None,
        })
        .collect()
}

/// The last write of `run_id` in `fx`.
fn written(fx: &Effects, run_id: &str) -> Option<Run> {
    fx.writes.iter().rev().find_map(|w| match w {
        Write::Run(r) if r.run_id == run_id => Some(r.clone()),
        _ => None,
    })
}

fn cancels(fx: &Effects) -> Vec<CancelWork> {
    fx.publish
        .iter()
        .filter_map(|p| match &p.body {
            Message::CancelWork(c) => {
                assert_eq!(p.topic, Topic::Job(c.job.clone()));
                Some(c.clone())
            }
            _ => None,
        })
        .collect()
}

fn events(fx: &Effects) -> usize {
    fx.publish
        .iter()
        .filter(|p| matches!(p.body, Message::Event(_)))
        .count()
}

fn reads(fx: &Effects) -> Vec<ReadQuery> {
    fx.reads.iter().map(|r| r.query.clone()).collect()
}

/// A harness with one worker `w1` of one slot serving `jobs`.
fn one_slot(jobs: Vec<JobSpec>) -> Harness {
    let mut h = Harness::new(vec![], &[]);
    h.jobs = jobs;
    register_with_slots(&mut h, "w1", 1);
    h
}

fn with_priority(mut spec: JobSpec, priority: i32) -> JobSpec {
    spec.priority = priority;
    spec
}

fn with_max(mut spec: JobSpec, max: u32) -> JobSpec {
    spec.max_concurrency = Some(max);
    spec
}

/// Finishes `running` and each step that takes the freed slot after it, successfully;
/// the runs in the order their steps started.
fn drain(h: &mut Harness, mut running: Assignment) -> Vec<String> {
    let mut order = Vec::new();
    loop {
        let next = works(&h.finish(&running, TaskOutcome::Succeeded));
        let Some(work) = next.into_iter().next() else {
            return order;
        };
        order.push(work.run_id.clone());
        running = work.assignments[0].clone();
    }
}

// ---- Priority -----------------------------------------------------------------------------

#[test]
fn waiting_steps_start_by_priority_then_in_the_order_they_came() {
    let mut h = one_slot(vec![job("a", Delivery::Queue, &[], &[])]);
    let (fx, _) = h.trigger("a");
    let gate = works(&fx).remove(0).assignments.remove(0);
    let mut expected: Vec<(i32, usize, String)> = Vec::new();
    for (i, priority) in [0, 5, 0, -3, 5, 10, 0].into_iter().enumerate() {
        let (fx, run_id) = h.accepted("a", |r| r.priority = Some(priority));
        assert!(works(&fx).is_empty(), "no free slot");
        assert_eq!(h.run(&run_id).priority, priority);
        expected.push((-priority, i, run_id));
    }
    expected.sort();
    let expected: Vec<String> = expected.into_iter().map(|(_, _, id)| id).collect();
    assert_eq!(drain(&mut h, gate), expected);
}

#[test]
fn a_jobs_priority_is_the_default_and_a_trigger_overrides_it() {
    let mut h = one_slot(vec![
        with_priority(job("low", Delivery::Queue, &[], &[]), -1),
        with_priority(job("high", Delivery::Queue, &[], &[]), 4),
    ]);
    let gate = works(&h.trigger("low").0).remove(0).assignments.remove(0);
    let (_, low) = h.accepted("low", |_| {});
    let (_, high) = h.accepted("high", |_| {});
    let (_, raised) = h.accepted("low", |r| r.priority = Some(9));
    assert_eq!(
        (h.run(&low).priority, h.run(&high).priority),
        (-1, 4),
        "the job file's"
    );
    assert_eq!(drain(&mut h, gate), [raised, high, low]);
}

#[test]
fn a_new_priority_moves_a_waiting_run_in_line_and_is_answered_from_the_store() {
    let mut h = one_slot(vec![job("a", Delivery::Queue, &[], &[])]);
    let gate = works(&h.trigger("a").0).remove(0).assignments.remove(0);
    let (_, first) = h.accepted("a", |_| {});
    let (_, second) = h.accepted("a", |_| {});
    let fx = h.prioritize(&second, 3);
    assert_eq!(written(&fx, &second).map(|r| r.priority), Some(3));
    assert_eq!(reads(&fx), [ReadQuery::Run(RunId::from(second.as_str()))]);
    assert_eq!(
        h.engine.health().counters.get("runs_reprioritized"),
        Some(&1)
    );
    assert_eq!(drain(&mut h, gate), [second, first.clone()]);
    // An ended or unknown run is the store's to answer (409 or 404).
    for run_id in [first.as_str(), "nope"] {
        let fx = h.prioritize(run_id, 1);
        let action = RunAction::Prioritize;
        assert_eq!(
            reads(&fx),
            [ReadQuery::EndedRun {
                run_id: run_id.into(),
                action
            }]
        );
        assert!(fx.writes.is_empty());
    }
}

#[test]
fn a_successor_inherits_its_runs_priority() {
    let mut h = one_slot(vec![
        job("a", Delivery::Queue, &["b"], &[]),
        job("b", Delivery::Queue, &[], &[]),
    ]);
    let (fx, high) = h.accepted("a", |r| r.priority = Some(7));
    let running = works(&fx).remove(0).assignments.remove(0);
    let (_, waiting) = h.accepted("b", |r| r.priority = Some(3));
    // `a` ends: its successor `b` (priority 7) goes before the waiting `b` (priority 3).
    let next = works(&h.finish(&running, TaskOutcome::Succeeded));
    assert_eq!(
        (next[0].run_id.as_str(), next[0].job.as_str()),
        (high.as_str(), "b")
    );
    let next = works(&h.finish(&next[0].assignments[0], TaskOutcome::Succeeded));
    assert_eq!(next[0].run_id, waiting);
}

#[test]
fn retries_waiting_for_a_slot_are_placed_by_priority() {
    let jobs = vec![with_retries(job("a", Delivery::Queue, &[], &[]), 1, 10)];
    let mut h = Harness::new(vec![], &[]);
    h.jobs = jobs;
    register_with_slots(&mut h, "w1", 2);
    let low = works(&h.accepted("a", |r| r.priority = Some(0)).0).remove(0);
    let high = works(&h.accepted("a", |r| r.priority = Some(9)).0).remove(0);
    h.finish(&low.assignments[0], TaskOutcome::Failed);
    h.finish(&high.assignments[0], TaskOutcome::Failed);
    // One slot left for the two retries: the higher priority takes it, though it failed
    // second.
    register_with_slots(&mut h, "w1", 1);
    h.now += 1_000;
    let placed = works(&h.tick());
    assert_eq!(placed.len(), 1);
    assert_eq!(placed[0].run_id, high.run_id);
}

// ---- Delay --------------------------------------------------------------------------------

#[test]
fn a_delayed_run_is_scheduled_until_due_then_starts_as_if_triggered_then() {
    let mut h = Harness::new(vec![job("a", Delivery::Queue, &[], &[])], &["w1"]);
    let (fx, run_id) = h.accepted("a", |r| r.delay_ms = Some(5_000));
    assert_eq!(run_writes(&fx), [(run_id.clone(), RunState::Scheduled)]);
    assert!(works(&fx).is_empty());
    assert_eq!(h.run(&run_id).not_before_ms, Some(h.now + 5_000));
    let due = h.now + 5_000;
    h.now = due - 1;
    assert!(h.tick().writes.is_empty(), "not due yet");
    h.now = due;
    let fx = h.tick();
    assert_eq!(run_writes(&fx)[0], (run_id.clone(), RunState::Pending));
    let work = works(&fx);
    assert_eq!(work.len(), 1);
    assert_eq!(work[0].run_id, run_id);
    assert_eq!(h.engine.health().counters.get("runs_scheduled"), Some(&1));
}

#[test]
fn at_names_a_time_and_one_in_the_past_starts_at_once() {
    let mut h = Harness::new(vec![job("a", Delivery::Queue, &[], &[])], &["w1"]);
    let at = h.now + 2_500;
    let (fx, later) = h.accepted("a", |r| r.at_ms = Some(at));
    assert_eq!(run_writes(&fx), [(later.clone(), RunState::Scheduled)]);
    let (fx, past) = h.accepted("a", |r| r.at_ms = Some(1));
    assert_eq!(run_writes(&fx)[0], (past, RunState::Pending));
    assert_eq!(works(&fx).len(), 1);
    let (fx, refused) = h.trigger_with(TriggerRequest {
        job: "a".into(),
        at_ms: Some(at),
        delay_ms: Some(1),
        ..Default::default()
    });
    assert!(refused.is_none() && fx.writes.is_empty());
    assert!(
        matches!(&replies(&fx)[..], [ReplyBody::Rejected { status: 400, error }] if error.contains("not both"))
    );
}

#[test]
fn a_scheduled_run_is_taken_up_after_a_restart_and_starts_when_due_even_if_overdue() {
    let mut h = Harness::new(vec![job("a", Delivery::Queue, &[], &[])], &["w1"]);
    let (_, soon) = h.accepted("a", |r| r.delay_ms = Some(1_000));
    let (_, later) = h.accepted("a", |r| r.delay_ms = Some(60_000));
    let snapshot = Snapshot {
        runs: vec![h.run(&soon).clone(), h.run(&later).clone()],
        ..Default::default()
    };
    // The broker was down past the first one's time.
    let now = h.now + 30_000;
    let ids = Box::new(SequentialIds::after(1_000));
    let mut restored = Engine::restore(config(), snapshot, ids, now);
    restored.heartbeat_for_test(&h.jobs, "w1", now);
    restored.active.assert_consistent();
    let fx = restored.tick(now);
    let started: Vec<String> = works(&fx).into_iter().map(|w| w.run_id).collect();
    assert_eq!(started, [soon]);
    assert_eq!(
        restored
            .active
            .run(&RunId::from(later.as_str()))
            .map(|r| r.state),
        Some(RunState::Scheduled)
    );
}

// ---- Dependencies ---------------------------------------------------------------------------

#[test]
fn a_held_run_restored_starts_if_its_dependency_was_pruned_and_fails_if_it_failed() {
    let mut h = Harness::new(vec![job("a", Delivery::Queue, &[], &[])], &["w1"]);
    let (fx, dependency) = h.accepted("a", |_| {});
    let (_, pruned) = h.accepted("a", |r| {
        r.delay_ms = Some(1_000);
        r.depends = vec![dependency.clone()];
    });
    let (_, broken) = h.accepted("a", |r| {
        r.delay_ms = Some(1_000);
        r.depends = vec![dependency.clone()];
    });
    h.finish(&works(&fx)[0].assignments[0], TaskOutcome::Succeeded);
    // The store no longer holds the dependency (pruned), or holds it failed (it cannot
    // be, as the failure would have failed both in the same commit: the restore says so).
    let snapshot = |state: Option<RunState>| Snapshot {
        runs: vec![h.run(&pruned).clone(), h.run(&broken).clone()],
        dependency_states: state
            .map(|s| vec![(RunId::from(dependency.as_str()), s)])
            .unwrap_or_default(),
        ..Default::default()
    };
    let now = h.now + 1_000;
    for (state, starts) in [(None, 2), (Some(RunState::Failed), 0)] {
        let ids = Box::new(SequentialIds::after(1_000));
        let mut restored = Engine::restore(config(), snapshot(state), ids, now);
        restored.heartbeat_for_test(&h.jobs, "w1", now);
        let fx = restored.tick(now);
        restored.active.assert_consistent();
        assert_eq!(works(&fx).len(), starts, "dependency {state:?}");
        if starts == 0 {
            let failed = written(&fx, &broken).unwrap();
            assert_eq!(failed.state, RunState::Failed);
            assert_eq!(
                failed.reason,
                Some(format!("dependency run {dependency} failed"))
            );
        }
    }
}

#[test]
fn a_dependent_run_waits_and_starts_when_its_dependencies_have_succeeded() {
    let mut h = Harness::new(vec![job("a", Delivery::Queue, &[], &[])], &["w1"]);
    let (fx1, first) = h.accepted("a", |_| {});
    let (fx2, second) = h.accepted("a", |_| {});
    let (fx, dependent) = h.accepted("a", |r| r.depends = vec![first.clone(), second.clone()]);
    assert_eq!(run_writes(&fx), [(dependent.clone(), RunState::Waiting)]);
    assert!(works(&fx).is_empty());
    let waits: Vec<&RunId> = h
        .engine
        .active
        .waiting_for(&dependent.as_str().into())
        .collect();
    assert_eq!(waits.len(), 2);
    let fx = h.finish(&works(&fx1)[0].assignments[0], TaskOutcome::Succeeded);
    assert!(works(&fx).is_empty(), "still waits for the second");
    let fx = h.finish(&works(&fx2)[0].assignments[0], TaskOutcome::Succeeded);
    assert_eq!(
        written(&fx, &dependent).map(|r| r.state),
        Some(RunState::Pending)
    );
    assert_eq!(works(&fx)[0].run_id, dependent);
}

#[test]
fn a_dependency_that_fails_fails_its_dependents_down_the_chain_naming_it() {
    let mut h = Harness::new(vec![job("a", Delivery::Queue, &[], &[])], &["w1"]);
    let (fx, root) = h.accepted("a", |_| {});
    let (_, middle) = h.accepted("a", |r| r.depends = vec![root.clone()]);
    let (_, leaf) = h.accepted("a", |r| r.depends = vec![middle.clone()]);
    let (_, other) = h.accepted("a", |r| r.depends = vec![middle.clone(), root.clone()]);
    let fx = h.finish(&works(&fx)[0].assignments[0], TaskOutcome::Failed);
    for (run_id, cause) in [(&middle, &root), (&leaf, &middle), (&other, &root)] {
        let run = written(&fx, run_id).unwrap_or_else(|| panic!("{run_id} not written"));
        assert_eq!(run.state, RunState::Failed, "{run_id}");
        assert_eq!(
            run.reason,
            Some(format!("dependency run {cause} failed")),
            "{run_id}"
        );
        assert!(run.finished_at_ms.is_some());
    }
    assert_eq!(h.engine.active.run_count(), 0);
    // A run triggered later on a failed one fails at once, and is still a run (202).
    let (fx, late) = h.accepted("a", |r| r.depends = vec![leaf.clone()]);
    let run = written(&fx, &late).unwrap();
    assert_eq!(run.state, RunState::Failed);
    assert_eq!(run.reason, Some(format!("dependency run {leaf} failed")));
}

#[test]
fn a_dependency_only_the_store_knows_is_looked_up_before_anything_is_decided() {
    let mut h = Harness::new(vec![job("a", Delivery::Queue, &[], &[])], &["w1"]);
    let (fx, active) = h.accepted("a", |_| {});
    let running = works(&fx).remove(0).assignments.remove(0);
    let request = TriggerRequest {
        job: "a".into(),
        depends: vec!["old-ok".into(), active.clone()],
        ..Default::default()
    };
    let fx = h.send("frontend:x", Message::Trigger(request.clone()));
    assert!(
        fx.writes.is_empty() && replies(&fx).is_empty(),
        "nothing decided yet"
    );
    assert_eq!(fx.lookups.len(), 1);
    assert_eq!(fx.lookups[0].ask, [RunId::from("old-ok")]);
    // The run it waits for in memory ends meanwhile: the answer comes back, and the
    // decision uses what the engine knows now.
    h.finish(&running, TaskOutcome::Succeeded);
    let decided = h.answer_lookups(&fx, &[("old-ok", RunState::Succeeded)]);
    let (run_id, state) = run_writes(&decided)[0].clone();
    assert_eq!(state, RunState::Pending, "both succeeded: it starts");
    assert_eq!(works(&decided)[0].run_id, run_id);
    // The same trigger again (its answer was lost) gets the same run.
    let env_id = format!("m{}", h.sent - 1);
    let again = h.deliver(Envelope {
        id: env_id,
        sender: "frontend:x".into(),
        sent_at_ms: h.now,
        body: Message::Trigger(request),
    });
    assert_eq!(replies(&again), [ReplyBody::Accepted { run_id }]);

    // A run the store does not hold either is refused, naming it.
    let fx = h.send(
        "frontend:x",
        Message::Trigger(TriggerRequest {
            job: "a".into(),
            depends: vec!["old-failed".into(), "never".into()],
            ..Default::default()
        }),
    );
    let decided = h.answer_lookups(&fx, &[("old-failed", RunState::Failed)]);
    assert!(decided.writes.is_empty());
    assert!(matches!(&replies(&decided)[..],
        [ReplyBody::Rejected { status: 400, error }] if error.contains("unknown runs: never")));
    // One the store says failed long ago fails the new run at once.
    let fx = h.send(
        "frontend:x",
        Message::Trigger(TriggerRequest {
            job: "a".into(),
            depends: vec!["old-failed".into()],
            ..Default::default()
        }),
    );
    let decided = h.answer_lookups(&fx, &[("old-failed", RunState::Failed)]);
    let (_, state) = run_writes(&decided)[0].clone();
    assert_eq!(state, RunState::Failed);
    assert_eq!(h.engine.health().counters.get("trigger_lookups"), Some(&3));
}

#[test]
fn a_run_that_ended_recently_is_known_without_the_store() {
    let mut h = Harness::new(vec![job("a", Delivery::Queue, &[], &[])], &["w1"]);
    let (fx, done) = h.accepted("a", |_| {});
    h.finish(&works(&fx)[0].assignments[0], TaskOutcome::Succeeded);
    let (fx, dependent) = h.accepted("a", |r| r.depends = vec![done]);
    assert!(fx.lookups.is_empty());
    assert_eq!(run_writes(&fx)[0], (dependent, RunState::Pending));
}

#[test]
fn a_delayed_dependent_is_scheduled_then_waits_for_what_has_not_ended() {
    let mut h = Harness::new(vec![job("a", Delivery::Queue, &[], &[])], &["w1"]);
    let (fx, dependency) = h.accepted("a", |_| {});
    let running = works(&fx).remove(0).assignments.remove(0);
    let (fx, run_id) = h.accepted("a", |r| {
        r.delay_ms = Some(1_000);
        r.depends = vec![dependency.clone()];
    });
    assert_eq!(run_writes(&fx), [(run_id.clone(), RunState::Scheduled)]);
    h.now += 1_000;
    let fx = h.tick();
    assert_eq!(run_writes(&fx), [(run_id.clone(), RunState::Waiting)]);
    let fx = h.finish(&running, TaskOutcome::Succeeded);
    assert_eq!(works(&fx)[0].run_id, run_id);
    // The other way round: it succeeded before the run was due; it starts when due.
    let (fx, dependency) = h.accepted("a", |_| {});
    let (_, run_id) = h.accepted("a", |r| {
        r.delay_ms = Some(1_000);
        r.depends = vec![dependency.clone()];
    });
    h.finish(&works(&fx)[0].assignments[0], TaskOutcome::Succeeded);
    assert_eq!(h.run(&run_id).state, RunState::Scheduled);
    h.now += 1_000;
    assert_eq!(works(&h.tick())[0].run_id, run_id);
}

// ---- Cancel -------------------------------------------------------------------------------

#[test]
fn cancelling_a_run_others_wait_for_needs_force_and_fails_them_naming_it() {
    let mut h = Harness::new(vec![job("a", Delivery::Queue, &[], &[])], &["w1"]);
    let (_, scheduled) = h.accepted("a", |r| r.delay_ms = Some(60_000));
    let (_, dependent) = h.accepted("a", |r| r.depends = vec![scheduled.clone()]);
    let fx = h.cancel(&scheduled, false);
    assert!(fx.writes.is_empty());
    assert!(matches!(&replies(&fx)[..],
        [ReplyBody::Rejected { status: 409, error }] if error.contains(&dependent) && error.contains("force=1")));
    let fx = h.cancel(&scheduled, true);
    let cancelled = written(&fx, &scheduled).unwrap();
    assert_eq!(cancelled.state, RunState::Cancelled);
    assert!(
        cancelled.finished_at_ms.is_some(),
        "a held run ends at once"
    );
    assert_eq!(
        cancelled.reason.as_deref(),
        Some("cancelled through frontend:x")
    );
    let failed = written(&fx, &dependent).unwrap();
    assert_eq!(failed.state, RunState::Failed);
    assert_eq!(
        failed.reason,
        Some(format!("dependency run {scheduled} was cancelled"))
    );
    assert_eq!(reads(&fx), [ReadQuery::Run(scheduled.as_str().into())]);
    assert_eq!(h.engine.active.run_count(), 0);
    h.now += 60_000;
    assert!(works(&h.tick()).is_empty(), "it never starts");
}

#[test]
fn cancelling_a_running_run_stops_its_tasks_on_their_workers_and_it_ends_when_they_report() {
    let jobs = vec![
        with_retries(job("a", Delivery::Broadcast, &["next"], &["next"]), 3, 10),
        job("next", Delivery::Broadcast, &[], &[]),
    ];
    let mut h = Harness::new(jobs, &["w1", "w2"]);
    let (fx, run_id) = h.accepted("a", |_| {});
    let work = works(&fx).remove(0);
    start(&mut h, &work.assignments[0]); // running on w1; published, unstarted on w2
    let fx = h.cancel(&run_id, false);
    let run = written(&fx, &run_id).unwrap();
    assert_eq!(run.state, RunState::Cancelled);
    assert_eq!(
        run.finished_at_ms, None,
        "it ends when its tasks are stopped"
    );
    let stop = cancels(&fx);
    assert_eq!(stop.len(), 1);
    assert_eq!(
        stop[0].assignments, work.assignments,
        "both, on their workers"
    );
    // Not published again as work, but as a cancel until the workers report.
    h.now += 2_000;
    let fx = h.tick();
    assert!(works(&fx).is_empty());
    assert_eq!(cancels(&fx)[0].assignments, work.assignments);
    // w1 killed its running task; w2's attempt had failed just before (it raced): neither
    // is retried, no successor starts, nothing goes to the dead list or to semaphores.
    let fx = h.finish(&work.assignments[0], TaskOutcome::Cancelled);
    assert_eq!(
        h.task(&work.assignments[0].task.task_id).state,
        TaskState::Cancelled
    );
    assert_eq!(events(&fx), 0);
    let fx = h.finish(&work.assignments[1], TaskOutcome::Failed);
    assert!(works(&fx).is_empty(), "no retry, no successor");
    let run = written(&fx, &run_id).unwrap();
    assert_eq!(
        (run.state, run.finished_at_ms.is_some()),
        (RunState::Cancelled, true)
    );
    assert!(h.engine.dead.newest().next().is_none());
    assert_eq!(h.engine.active.run_count(), 0);
    h.now += 2_000;
    assert!(cancels(&h.tick()).is_empty(), "nothing left to stop");
}

#[test]
fn cancelling_withdraws_steps_waiting_for_a_slot_and_tasks_waiting_for_a_retry() {
    let mut h = one_slot(vec![with_retries(
        job("a", Delivery::Queue, &[], &[]),
        3,
        60_000,
    )]);
    let gate = works(&h.trigger("a").0).remove(0).assignments.remove(0);
    let (_, waiting) = h.accepted("a", |_| {});
    let fx = h.cancel(&waiting, false);
    assert!(cancels(&fx).is_empty(), "it never reached a worker");
    let run = written(&fx, &waiting).unwrap();
    assert_eq!(
        (run.state, run.finished_at_ms.is_some()),
        (RunState::Cancelled, true)
    );
    assert!(fx
        .writes
        .iter()
        .any(|w| matches!(w, Write::Step(s) if s.state == TaskState::Cancelled)));
    // The gate fails and waits for its retry (a minute): cancelled, it is withdrawn.
    h.finish(&gate, TaskOutcome::Failed);
    let gate_run = h.task(&gate.task.task_id).run_id.to_string();
    let fx = h.cancel(&gate_run, false);
    assert!(cancels(&fx).is_empty());
    assert_eq!(
        written(&fx, &gate_run).map(|r| r.state),
        Some(RunState::Cancelled)
    );
    assert_eq!(h.engine.active.run_count(), 0);
}

#[test]
fn cancelling_is_idempotent_and_an_ended_run_is_the_stores_to_answer() {
    let mut h = Harness::new(vec![job("a", Delivery::Queue, &[], &[])], &["w1"]);
    let (fx, run_id) = h.accepted("a", |_| {});
    let a = works(&fx).remove(0).assignments.remove(0);
    h.cancel(&run_id, false);
    let again = h.cancel(&run_id, false);
    assert!(again.writes.is_empty() && cancels(&again).is_empty());
    assert_eq!(reads(&again), [ReadQuery::Run(run_id.as_str().into())]);
    assert_eq!(h.engine.health().counters.get("runs_cancelled"), Some(&1));
    h.finish(&a, TaskOutcome::Cancelled);
    // Ended (cancelled or otherwise) or unknown: the store says which (200, 409, 404).
    let (fx, done) = h.accepted("a", |_| {});
    h.finish(&works(&fx)[0].assignments[0], TaskOutcome::Succeeded);
    for id in [run_id.as_str(), done.as_str(), "nope"] {
        let fx = h.cancel(id, true);
        let action = RunAction::Cancel;
        assert_eq!(
            reads(&fx),
            [ReadQuery::EndedRun {
                run_id: id.into(),
                action
            }]
        );
        assert!(fx.writes.is_empty());
    }
}

#[test]
fn a_task_of_a_cancelled_run_lost_with_its_worker_ends_cancelled() {
    let mut h = Harness::new(
        vec![with_retries(job("a", Delivery::Queue, &[], &[]), 3, 10)],
        &["w1", "w2"],
    );
    let (fx, run_id) = h.accepted("a", |_| {});
    let a = works(&fx).remove(0).assignments.remove(0);
    let other = if a.worker == "w1" { "w2" } else { "w1" };
    h.cancel(&run_id, false);
    // Its worker never answers: it is lost, and the task is not moved to the other one.
    let mut ended = None;
    for _ in 0..5 {
        h.now += 4_000;
        heartbeat_running(&mut h, other, vec![]);
        let fx = h.tick();
        assert!(works(&fx).is_empty());
        if let Some(run) = written(&fx, &run_id) {
            ended = Some(run);
            break;
        }
    }
    let run = ended.expect("the run never ended");
    assert_eq!(
        (run.state, run.finished_at_ms.is_some()),
        (RunState::Cancelled, true)
    );
}

#[test]
fn a_worker_saying_cancelled_of_a_run_that_was_not_has_failed() {
    let mut h = Harness::new(
        vec![with_retries(job("a", Delivery::Queue, &[], &[]), 1, 10)],
        &["w1"],
    );
    let (fx, _) = h.accepted("a", |_| {});
    let a = works(&fx).remove(0).assignments.remove(0);
    h.finish(&a, TaskOutcome::Cancelled);
    let task = h.task(&a.task.task_id);
    assert_eq!(
        (task.state, task.attempt),
        (TaskState::Pending, 2),
        "retried"
    );
    assert!(task
        .error
        .as_deref()
        .unwrap_or("")
        .contains("cancelled on the worker"));
}

#[test]
fn a_cancelled_run_taken_up_after_a_restart_has_its_tasks_stopped_at_the_first_tick() {
    let mut h = one_slot(vec![job("a", Delivery::Queue, &[], &[])]);
    let (fx, run_id) = h.accepted("a", |_| {});
    let a = works(&fx).remove(0).assignments.remove(0);
    let (_, waiting) = h.accepted("a", |_| {});
    h.cancel(&run_id, false);
    h.cancel(&waiting, false);
    let snapshot = Snapshot {
        runs: h.engine.active.runs().cloned().collect(),
        steps: h.engine.active.steps().cloned().collect(),
        tasks: h.engine.active.tasks().map(|t| t.record.clone()).collect(),
        ..Default::default()
    };
    assert_eq!(snapshot.runs.len(), 1, "the waiting one has ended");
    let ids = Box::new(SequentialIds::after(1_000));
    let mut restored = Engine::restore(config(), snapshot, ids, h.now);
    restored.heartbeat_for_test(&h.jobs, "w1", h.now);
    let fx = restored.tick(h.now);
    restored.active.assert_consistent();
    assert!(
        works(&fx).is_empty(),
        "its task is not published again as work"
    );
    assert_eq!(cancels(&fx)[0].assignments, [a]);
}

// ---- max_concurrency ------------------------------------------------------------------------

#[test]
fn max_concurrency_holds_a_jobs_tasks_across_workers_and_the_rest_wait_by_priority() {
    let jobs = vec![with_max(job("a", Delivery::Queue, &[], &[]), 1)];
    let mut h = Harness::new(jobs, &["w1", "w2", "w3"]);
    let (fx, _) = h.accepted("a", |_| {});
    let first = works(&fx).remove(0).assignments.remove(0);
    let (fx, low) = h.accepted("a", |_| {});
    assert!(
        works(&fx).is_empty(),
        "free slots elsewhere, but the job is at its limit"
    );
    let (_, high) = h.accepted("a", |r| r.priority = Some(1));
    h.now += 1_000;
    assert!(works(&h.tick()).is_empty());
    assert_eq!(drain(&mut h, first), [high, low]);
    assert_eq!(h.engine.active.load_of_job("a"), 0);
}

#[test]
fn a_broadcast_counts_each_of_its_tasks_and_one_wider_than_the_limit_runs_alone() {
    let jobs = vec![
        with_max(job("wide", Delivery::Broadcast, &[], &[]), 2),
        with_max(job("two", Delivery::Broadcast, &[], &[]), 3),
    ];
    let mut h = Harness::new(jobs, &["w1", "w2", "w3"]);
    // Three live workers, a limit of two: it runs on all three, but alone.
    let (fx, _) = h.accepted("wide", |_| {});
    let wide = works(&fx).remove(0);
    assert_eq!(wide.assignments.len(), 3);
    let (fx, second) = h.accepted("wide", |_| {});
    assert!(works(&fx).is_empty());
    h.finish(&wide.assignments[0], TaskOutcome::Succeeded);
    h.finish(&wide.assignments[1], TaskOutcome::Succeeded);
    let fx = h.finish(&wide.assignments[2], TaskOutcome::Succeeded);
    assert_eq!(works(&fx)[0].run_id, second);
    // A limit of three: one broadcast of three fills it.
    let (fx, _) = h.accepted("two", |_| {});
    assert_eq!(works(&fx)[0].assignments.len(), 3);
    let (fx, _) = h.accepted("two", |_| {});
    assert!(works(&fx).is_empty());
}

#[test]
fn a_local_successor_waits_for_room_and_then_runs_on_its_own_worker() {
    let jobs = vec![
        job("a", Delivery::Broadcast, &["l"], &[]),
        with_max(job("l", Delivery::Local, &[], &[]), 1),
    ];
    let mut h = Harness::new(jobs, &["w1", "w2"]);
    let (fx, _) = h.accepted("a", |_| {});
    let a = works(&fx).remove(0);
    let first = works(&h.finish(&a.assignments[0], TaskOutcome::Succeeded)).remove(0);
    assert_eq!(first.assignments[0].worker, a.assignments[0].worker);
    let fx = h.finish(&a.assignments[1], TaskOutcome::Succeeded);
    assert!(works(&fx).is_empty(), "l is at its limit");
    let next = works(&h.finish(&first.assignments[0], TaskOutcome::Succeeded));
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].job, "l");
    assert_eq!(next[0].assignments[0].worker, a.assignments[1].worker);
}

// ---- Tags, tracking, health -------------------------------------------------------------------

#[test]
fn a_runs_tags_are_its_jobs_then_its_triggers() {
    let mut spec = job("a", Delivery::Queue, &[], &[]);
    spec.tags = vec!["etl".into(), "nightly".into()];
    let mut h = Harness::new(vec![spec], &["w1"]);
    let (_, run_id) = h.accepted("a", |r| r.tags = vec!["urgent".into(), "etl".into()]);
    assert_eq!(h.run(&run_id).tags, ["etl", "nightly", "urgent"]);
    let (fx, refused) = h.trigger_with(TriggerRequest {
        job: "a".into(),
        tags: vec!["a b".into()],
        ..Default::default()
    });
    assert!(refused.is_none() && fx.writes.is_empty());
}

#[test]
fn tracking_writes_an_active_run_and_an_ended_one_in_place() {
    let mut h = Harness::new(vec![job("a", Delivery::Queue, &[], &[])], &["w1"]);
    let (fx, run_id) = h.accepted("a", |_| {});
    let track = |h: &mut Harness, run_id: &str, tracked| {
        let run_id = run_id.into();
        let notify = vec![];
        h.send(
            "frontend:x",
            Message::TrackRun {
                run_id,
                tracked,
                notify,
            },
        )
    };
    let fx2 = track(&mut h, &run_id, true);
    assert_eq!(written(&fx2, &run_id).map(|r| r.tracked), Some(true));
    assert_eq!(reads(&fx2), [ReadQuery::Run(run_id.as_str().into())]);
    h.finish(&works(&fx)[0].assignments[0], TaskOutcome::Succeeded);
    let fx = track(&mut h, &run_id, false);
    assert_eq!(
        fx.writes,
        [Write::Tracked {
            run_id: run_id.as_str().into(),
            tracked: false
        }]
    );
    assert_eq!(reads(&fx), [ReadQuery::Run(run_id.as_str().into())]);
}

#[test]
fn unfinished_runs_are_counted_by_state() {
    let mut h = one_slot(vec![job("a", Delivery::Queue, &[], &[])]);
    let (fx, running) = h.accepted("a", |_| {});
    start(&mut h, &works(&fx)[0].assignments[0]);
    h.accepted("a", |_| {});
    h.accepted("a", |r| r.delay_ms = Some(1_000));
    h.accepted("a", |r| r.depends = vec![running.clone()]);
    let HealthView { runs_by_state, .. } = h.engine.health();
    let counts: Vec<(&str, u64)> = runs_by_state
        .iter()
        .map(|(k, v)| (k.as_str(), *v))
        .collect();
    assert_eq!(
        counts,
        [
            ("cancelled", 0),
            ("pending", 1),
            ("running", 1),
            ("scheduled", 1),
            ("waiting", 1)
        ]
    );
}
