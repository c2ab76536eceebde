//! The worker with a (fake) broker: results stay in the spool until acknowledged, a seen
//! attempt is not run again after a restart, queued tasks are handed back at shutdown.

use std::path::Path;
use std::time::Duration;

use jobz::message::TaskOutcome;

use crate::harness::{
    outbox, wait_until, work, worker_config, worker_log, write_jobs, FakeBroker, InProcessWorker,
};

/// A job `count` that appends a line to `<root>/ran.<task id>` each time it runs.
fn write_count_job(root: &Path) {
    write_jobs(
        root,
        &format!(
            "  - name: count\n    command: \"echo ran >> {}/ran.$JOBZ_TASK_ID\"\n",
            root.display()
        ),
    );
}

fn runs(root: &Path, task_id: &str) -> usize {
    std::fs::read_to_string(root.join(format!("ran.{task_id}")))
        .unwrap_or_default()
        .lines()
        .count()
}

fn log_lines(root: &Path, task_id: &str, event: &str) -> usize {
    worker_log(root)
        .lines()
        .filter(|l| l.contains(&format!(" task={task_id} ")) && l.ends_with(event))
        .count()
}

#[test]
fn a_result_stays_in_the_outbox_until_the_broker_acknowledges_it() {
    let broker = FakeBroker::start(false);
    let root = tempfile::tempdir().unwrap();
    write_count_job(root.path());
    let worker = InProcessWorker::start(worker_config(root.path(), &broker.addr));
    broker.offer(work("count", "t1", 1, "w1"));
    let result = broker.wait_finished("t1");
    assert_eq!(result.outcome, TaskOutcome::Succeeded);
    assert_eq!(outbox(root.path()), vec!["t1.1"]);
    wait_until("the result to be resent", || {
        broker.finished_messages("t1").len() >= 2
    });
    let ids: Vec<String> = broker
        .finished_messages("t1")
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert!(ids.iter().all(|id| *id == ids[0]), "resent under its id");
    assert_eq!(outbox(root.path()), vec!["t1.1"]);

    broker.set_ack_results(true);
    wait_until("the acknowledged result to leave the outbox", || {
        outbox(root.path()).is_empty()
    });
    worker.stop();
    assert_eq!(runs(root.path(), "t1"), 1);
}

#[test]
fn a_restarted_worker_resends_its_outbox_and_never_reruns_a_seen_attempt() {
    let broker = FakeBroker::start(false);
    let root = tempfile::tempdir().unwrap();
    write_count_job(root.path());
    let mut config = worker_config(root.path(), &broker.addr);
    config.ack_wait = Duration::from_millis(100);

    let worker = InProcessWorker::start(config.clone());
    broker.offer(work("count", "t1", 1, "w1"));
    broker.wait_finished("t1");
    worker.stop(); // unacknowledged: the result stays in the spool
    assert_eq!(outbox(root.path()), vec!["t1.1"]);
    let sent_before = broker.finished_messages("t1");

    broker.set_ack_results(true);
    let worker = InProcessWorker::start(config);
    wait_until("the kept result to be sent and acknowledged", || {
        outbox(root.path()).is_empty()
    });
    let sent = broker.finished_messages("t1");
    assert!(sent.len() > sent_before.len());
    let (resent_id, resent) = sent.last().unwrap();
    assert_eq!(resent, &sent_before[0].1, "the same content");
    assert_ne!(resent_id, &sent_before[0].0, "a new message id");

    // The broker offers the old attempt again, then new work on the same topic: once the
    // new task is done, the old publication was handled before it.
    broker.publish(work("count", "t1", 1, "w1"));
    broker.offer(work("count", "t2", 1, "w1"));
    broker.wait_finished("t2");
    worker.stop();
    assert_eq!(runs(root.path(), "t1"), 1, "t1 ran once across the restart");
    assert_eq!(log_lines(root.path(), "t1", " received"), 1);
    assert_eq!(runs(root.path(), "t2"), 1);
}

#[test]
fn queued_tasks_are_handed_back_at_shutdown_and_run_after_a_restart() {
    let broker = FakeBroker::start(true);
    let root = tempfile::tempdir().unwrap();
    let gate = root.path().join("open");
    write_jobs(
        root.path(),
        &format!(
            "  - name: gated\n    command: \"while [ ! -e {} ]; do sleep 0.02; done; \
             echo ran >> {}/ran.$JOBZ_TASK_ID\"\n",
            gate.display(),
            root.path().display()
        ),
    );
    let mut config = worker_config(root.path(), &broker.addr);
    config.slots = 1;

    let worker = InProcessWorker::start(config.clone());
    broker.offer(work("gated", "a", 1, "w1"));
    broker.offer(work("gated", "b", 1, "w1"));
    wait_until("a to start and b to be queued", || {
        log_lines(root.path(), "a", " started") == 1
            && log_lines(root.path(), "b", " received") == 1
    });
    let stopping = std::thread::spawn(move || worker.stop());
    wait_until("b to be handed back", || {
        log_lines(root.path(), "b", worker::service::HANDED_BACK_EVENT) == 1
    });
    std::fs::write(&gate, "").unwrap(); // the running task finishes within the drain
    stopping.join().unwrap();
    assert_eq!(broker.wait_finished("a").outcome, TaskOutcome::Succeeded);
    assert!(broker.started().iter().all(|s| s.task.task_id != "b"));
    assert!(broker.finished().iter().all(|f| f.task.task_id != "b"));

    // The broker kept offering b; the worker back runs it, and a not again.
    let worker = InProcessWorker::start(config);
    assert_eq!(broker.wait_finished("b").outcome, TaskOutcome::Succeeded);
    worker.stop();
    assert_eq!(runs(root.path(), "a"), 1);
    assert_eq!(runs(root.path(), "b"), 1);
}

#[test]
fn worker_log_lines_name_the_worker_and_record_a_rejected_job_file() {
    let broker = FakeBroker::start(true);
    let root = tempfile::tempdir().unwrap();
    write_count_job(root.path());
    std::fs::write(
        root.path().join("jobs.d/broken.yaml"),
        "jobs:\n  - name: x\n    command: [unclosed\n",
    )
    .unwrap();
    let worker = InProcessWorker::start(worker_config(root.path(), &broker.addr));
    broker.offer(work("count", "t1", 1, "w1"));
    broker.wait_finished("t1");
    wait_until("the task's lines", || {
        log_lines(root.path(), "t1", "started") == 1
    });
    worker.stop();
    let log = worker_log(root.path());
    let rejected: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("job file rejected"))
        .collect();
    assert_eq!(rejected.len(), 1, "once, not at every refresh: {log}");
    assert!(rejected[0].contains(" worker=w1 "), "{log}");
    assert!(rejected[0].contains("broken.yaml"), "{log}");
    for line in log.lines() {
        assert!(line.contains(" worker=w1 "), "{line}");
    }
}
