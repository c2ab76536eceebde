//! The feed tells each change of a run and its tasks once, in order.

use jobz::message::FeedKind;

use super::*;

/// Every feed event of the effects, as (kind, attempt).
fn told(fx: &Effects) -> Vec<(FeedKind, Option<u32>)> {
    fx.feed
        .iter()
        .map(|e| (e.kind, e.task.as_ref().map(|t| t.attempt)))
        .collect()
}

#[test]
fn a_run_retried_after_a_failure_and_a_lost_worker_is_told_step_by_step() {
    let jobs = vec![with_retries(job("a", Delivery::Queue, &[], &[]), 2, 10)];
    let mut h = Harness::new(jobs, &["w1", "w2"]);
    let (fx, run_id) = h.trigger("a");
    let run_id = run_id.unwrap();
    assert_eq!(
        told(&fx),
        [
            (FeedKind::RunAccepted, None),
            (FeedKind::TaskScheduled, Some(1))
        ]
    );
    assert!(fx.feed.iter().all(|e| e.run_id == run_id && e.job == "a"));
    let first = works(&fx).remove(0).assignments.remove(0);
    let fx = h.send(
        &format!("worker:{}", first.worker),
        Message::TaskStarted(TaskStarted {
            task: first.task.clone(),
            worker: first.worker.clone(),
            instance: "i1".into(),
            started_at_ms: h.now,
        }),
    );
    assert_eq!(
        told(&fx),
        [
            (FeedKind::TaskStarted, Some(1)),
            (FeedKind::RunStarted, None)
        ]
    );
    assert_eq!(fx.feed[1].run_state, RunState::Running);
    // Attempt 1 fails: retried as attempt 2, placed once its backoff is over.
    let fx = h.finish(&first, TaskOutcome::Failed);
    assert_eq!(told(&fx), [(FeedKind::TaskRetried, Some(2))]);
    let mut second = None;
    for _ in 0..10 {
        h.now += 1_000;
        let fx = h.engine.tick(h.now);
        if let Some(mut w) = works(&fx).pop() {
            assert_eq!(told(&fx), [(FeedKind::TaskScheduled, Some(2))]);
            second = Some(w.assignments.remove(0));
            break;
        }
    }
    let second = second.expect("attempt 2 was placed");
    start(&mut h, &second);
    // Its worker goes silent: the attempt is lost, and retried.
    let other = if second.worker == "w1" { "w2" } else { "w1" };
    let mut lost = Vec::new();
    for _ in 0..20 {
        h.now += 5_000;
        heartbeat_running(&mut h, other, vec![]);
        let fx = h.engine.tick(h.now);
        lost.extend(told(&fx));
        if lost.iter().any(|(k, _)| *k == FeedKind::TaskLost) {
            break;
        }
    }
    assert_eq!(
        lost[..2],
        [
            (FeedKind::TaskLost, Some(2)),
            (FeedKind::TaskRetried, Some(3))
        ]
    );
    // A cancel is told once, though the run ends only when its task stops.
    let fx = h.send(
        "frontend:x",
        Message::CancelRun {
            run_id: run_id.clone(),
            force: false,
        },
    );
    let kinds: Vec<FeedKind> = told(&fx).into_iter().map(|(k, _)| k).collect();
    assert_eq!(kinds.first(), Some(&FeedKind::RunCancelled));
    assert_eq!(
        kinds
            .iter()
            .filter(|k| **k == FeedKind::RunCancelled)
            .count(),
        1,
        "{kinds:?}"
    );
}

#[test]
fn a_succeeding_run_ends_with_its_task_then_itself() {
    let mut h = Harness::new(vec![job("a", Delivery::Broadcast, &[], &[])], &["w1"]);
    let (fx, _) = h.trigger("a");
    let a = works(&fx).remove(0).assignments.remove(0);
    start(&mut h, &a);
    let fx = h.finish(&a, TaskOutcome::Succeeded);
    assert_eq!(
        told(&fx),
        [
            (FeedKind::TaskSucceeded, Some(1)),
            (FeedKind::RunSucceeded, None)
        ]
    );
    assert_eq!(fx.feed[1].run_state, RunState::Succeeded);
    assert_eq!(
        fx.feed[0].task.as_ref().unwrap().worker.as_deref(),
        Some("w1")
    );
    // Counted once in the job's statistics, in the commit that ends it.
    let counted = fx
        .writes
        .iter()
        .filter(|w| matches!(w, Write::TaskEnded(t) if t.task_id.as_str() == a.task.task_id))
        .count();
    assert_eq!(counted, 1);
    let again = h.finish(&a, TaskOutcome::Succeeded);
    assert!(!again
        .writes
        .iter()
        .any(|w| matches!(w, Write::TaskEnded(_))));
}

#[test]
fn a_run_ending_makes_the_notices_its_job_asks_for_in_the_same_commit() {
    use jobz::jobfile::{Notify, NotifyOn, NotifyTarget};

    let mut spec = job("a", Delivery::Broadcast, &[], &[]);
    spec.notify = vec![
        Notify {
            to: NotifyTarget::Webhook("ops".into()),
            on: NotifyOn::Always,
        },
        Notify {
            to: NotifyTarget::Email("oncall@example.com".into()),
            on: NotifyOn::Failure,
        },
        Notify {
            to: NotifyTarget::Webhook("wins".into()),
            on: NotifyOn::Success,
        },
    ];
    let mut h = Harness::new(vec![spec], &["w1"]);
    let notices = |fx: &Effects| -> Vec<(String, String, String)> {
        fx.writes
            .iter()
            .filter_map(|w| match w {
                Write::Notice(n) => {
                    Some((n.id.clone(), format!("{:?}", n.target), n.event.clone()))
                }
                _ => None,
            })
            .collect()
    };
    let (fx, run_id) = h.trigger("a");
    assert!(notices(&fx).is_empty(), "nothing until the run ends");
    let a = works(&fx).remove(0).assignments.remove(0);
    start(&mut h, &a);
    let fx = h.finish(&a, TaskOutcome::Failed);
    let run_id = run_id.unwrap();
    assert_eq!(
        notices(&fx),
        [
            (
                format!("{run_id}/0"),
                "Webhook(\"ops\")".into(),
                "run.failed".into()
            ),
            (
                format!("{run_id}/1"),
                "Email(\"oncall@example.com\")".into(),
                "run.failed".into()
            ),
        ]
    );
    let payload: serde_json::Value = match fx.writes.iter().find(|w| matches!(w, Write::Notice(_)))
    {
        Some(Write::Notice(n)) => serde_json::from_str(&n.payload).unwrap(),
        _ => unreachable!(),
    };
    assert_eq!(payload["run"]["state"], "failed");
    assert_eq!(payload["run"]["job"], "a");
    // The run's own record comes first in the commit.
    let first_notice = fx.writes.iter().position(|w| matches!(w, Write::Notice(_)));
    let run_end = fx
        .writes
        .iter()
        .position(|w| matches!(w, Write::Run(r) if r.state == RunState::Failed));
    assert!(run_end < first_notice);
}

#[test]
fn a_tracked_run_tells_its_own_targets_of_any_end_once_each() {
    use jobz::jobfile::{Notify, NotifyOn, NotifyTarget};

    let mut spec = job("a", Delivery::Broadcast, &[], &[]);
    spec.notify = vec![Notify {
        to: NotifyTarget::Webhook("ops".into()),
        on: NotifyOn::Failure,
    }];
    let mut h = Harness::new(vec![spec], &["w1"]);
    let (fx, run_id) = h.trigger("a");
    let run_id = run_id.unwrap();
    let track = |h: &mut Harness, notify: Vec<NotifyTarget>| {
        h.send(
            "frontend:x",
            Message::TrackRun {
                run_id: run_id.clone(),
                tracked: true,
                notify,
            },
        )
    };
    track(
        &mut h,
        vec![
            NotifyTarget::Email("me@example.com".into()),
            NotifyTarget::Webhook("ops".into()),
        ],
    );
    let a = works(&fx).remove(0).assignments.remove(0);
    start(&mut h, &a);
    let fx = h.finish(&a, TaskOutcome::Succeeded);
    let targets: Vec<String> = fx
        .writes
        .iter()
        .filter_map(|w| match w {
            Write::Notice(n) => Some(format!("{}={:?}", n.id, n.target)),
            _ => None,
        })
        .collect();
    // The job's webhook is for failures; the run's own targets hear of a success too.
    assert_eq!(
        targets,
        [
            format!("{run_id}/0=Email(\"me@example.com\")"),
            format!("{run_id}/1=Webhook(\"ops\")"),
        ]
    );
    // Once the run has ended, nobody can be added: the store answers 409 (or 404).
    let fx = track(&mut h, vec![NotifyTarget::Webhook("late".into())]);
    assert!(fx.writes.is_empty());
    assert!(matches!(
        fx.reads[0].query,
        ReadQuery::EndedRun {
            action: RunAction::Notify,
            ..
        }
    ));
}
