//! Issue 13, graceful leave (acceptance 3): a worker stopped with SIGTERM leaves the live
//! list at once, gets no new work (a broadcast triggered right after does not wait for
//! it), drains what it runs, and is forgotten rather than lost once it is gone; an
//! operator forgets a lost worker, never a live one.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{list_of, steps_of, str_of, wait_until, Mesh, DEADLINE};

/// `hold` (on w2 only) runs until the file `open` exists; `everywhere` is a broadcast
/// that notes which worker ran it.
const W1_JOBS: &str = r#"
jobs:
  - name: everywhere
    delivery: broadcast
    command: "echo $JOBZ_WORKER >> @DIR@/everywhere"
"#;
const W2_JOBS: &str = r#"
jobs:
  - name: everywhere
    delivery: broadcast
    command: "echo $JOBZ_WORKER >> @DIR@/everywhere"
  - name: hold
    delivery: queue
    command: "touch @DIR@/holding; while [ ! -e @DIR@/open ]; do sleep 0.05; done"
"#;

fn sigterm(pid: u32) {
    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// The worker `name` as `/workers` lists it, if it does.
fn listed(mesh: &Mesh, name: &str) -> Option<Value> {
    let (_, workers) = mesh.get_json("/workers");
    list_of(&workers, "workers")
        .into_iter()
        .find(|w| str_of(w, "name") == name)
}

fn ran_on(dir: &Path) -> Vec<String> {
    let mut workers: Vec<String> = std::fs::read_to_string(dir.join("everywhere"))
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect();
    workers.sort();
    workers
}

#[test]
fn a_worker_stopped_with_sigterm_leaves_the_live_list_at_once_and_a_broadcast_does_not_wait_for_it()
{
    // A short expiry, so that the stopped worker's end is seen within the test.
    let mut mesh = Mesh::builder()
        .broker_args(&["--worker-expiry", "2s"])
        .worker("w1", W1_JOBS)
        .worker("w2", W2_JOBS)
        .start();
    mesh.wait_workers_live(2);
    let dir = mesh.dir().to_owned();
    let held = mesh.start_run("hold", &[]);
    wait_until(DEADLINE, "the held step to run on w2", || {
        dir.join("holding").exists()
    });

    let stopped_at = Instant::now();
    sigterm(mesh.pid("w2"));
    wait_until(DEADLINE, "w2 to leave the live list", || {
        listed(&mesh, "w2").is_some_and(|w| w["live"] == Value::Bool(false))
    });
    // Its leaving heartbeat goes out at once, not at the next beat (200 ms here).
    let left_after = stopped_at.elapsed();
    assert!(left_after < Duration::from_secs(2), "{left_after:?}");
    let w2 = listed(&mesh, "w2").unwrap();
    assert_eq!(str_of(&w2, "state"), "leaving", "{w2}");
    assert!(mesh.is_running("w2"), "it drains its running step");

    // A broadcast triggered now runs on w1 alone and ends while w2 still drains.
    let run_id = mesh.start_run("everywhere", &[]);
    let run = mesh.wait_run_final_within(&run_id, Duration::from_secs(10));
    assert_eq!(str_of(&run, "state"), "succeeded", "{run:#}");
    let tasks = steps_of(&run); // one entry per task
    assert_eq!(tasks.len(), 1, "one task: {run:#}");
    assert_eq!(str_of(&tasks[0], "worker"), "w1", "{run:#}");
    assert_eq!(ran_on(&dir), vec!["w1"]);
    assert!(mesh.is_running("w2"), "the broadcast did not wait for w2");

    // Its running step was drained, then it exited, and is forgotten (not lost).
    std::fs::write(dir.join("open"), "").unwrap();
    let run = mesh.wait_run_final(&held);
    assert_eq!(str_of(&run, "state"), "succeeded", "{run:#}");
    wait_until(DEADLINE, "w2 to exit", || !mesh.is_running("w2"));
    wait_until(DEADLINE, "w2 to be forgotten", || {
        listed(&mesh, "w2").is_none()
    });
    assert_eq!(mesh.broker_counter("workers_lost"), 0);
    assert_eq!(mesh.broker_counter("workers_left"), 1);
    assert!(listed(&mesh, "w1").is_some_and(|w| str_of(&w, "state") == "live"));
}

#[test]
fn an_operator_forgets_a_lost_worker_but_not_a_live_one() {
    let mut mesh = Mesh::builder()
        .broker_args(&["--worker-expiry", "1s"])
        .worker("w1", W1_JOBS)
        .worker("w2", W1_JOBS)
        .start();
    mesh.wait_workers_live(2);

    let (status, body) = mesh.http_post("/workers/w1?action=forget", &[]);
    assert_eq!(status, 409, "a live worker: {body}");
    assert!(listed(&mesh, "w1").is_some());
    let (status, body) = mesh.http_post("/workers/nobody?action=forget", &[]);
    assert_eq!(status, 404, "{body}");
    for bad in ["/workers/w1?action=drop", "/workers/w1"] {
        let (status, body) = mesh.http_post(bad, &[]);
        assert_eq!(status, 400, "{bad}: {body}");
    }
    let (status, _) = mesh.get_json("/workers/w1?action=forget");
    assert_eq!(status, 405, "changes take POST");

    mesh.kill9("w2");
    wait_until(DEADLINE, "w2 to be lost", || {
        listed(&mesh, "w2").is_some_and(|w| str_of(&w, "state") == "lost")
    });
    let (status, body) = mesh.http_post("/workers/w2?action=forget", &[]);
    assert_eq!(status, 200, "{body}");
    assert!(listed(&mesh, "w2").is_none(), "gone from the list");
    assert!(listed(&mesh, "w1").is_some());

    // Forgotten in the store too: a restarted broker does not list it again.
    mesh.restart("broker");
    wait_until(DEADLINE, "the broker to be back with w1", || {
        mesh.get_json("/workers").0 == 200 && listed(&mesh, "w1").is_some()
    });
    assert!(listed(&mesh, "w2").is_none());
}
