//! Retention (issue 11): the broker prunes finished runs beyond `--history-count` while it
//! serves, keeps what `/dead` still lists, and a worker prunes old step outputs, never a
//! running step's.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use crate::harness::*;

/// The broker looks for history to prune this often (hidden `--prune-every`).
const PRUNE_EVERY: &str = "100ms";

/// Run ids `/runs` lists, newest first.
fn listed_runs(mesh: &Mesh) -> Vec<String> {
    let (status, runs) = mesh.get_json("/runs?limit=100");
    assert_eq!(status, 200, "{runs}");
    list_of(&runs, "runs")
        .iter()
        .map(|r| str_of(r, "run_id").to_owned())
        .collect()
}

fn dead_tasks(mesh: &Mesh) -> Vec<Value> {
    let (status, dead) = mesh.get_json("/dead");
    assert_eq!(status, 200, "{dead}");
    list_of(&dead, "dead")
}

#[test]
fn a_broker_keeps_only_the_newest_finished_runs_it_is_told_to() {
    let mesh = Mesh::builder()
        .broker_args(&["--history-count", "5", "--prune-every", PRUNE_EVERY])
        .worker("w1", ECHO_JOB)
        .start();
    mesh.wait_workers_live(1);
    assert_eq!(
        mesh.metric("jobz_broker_runs_pruned_total"),
        Some(0),
        "the counter shows from the start"
    );

    let mut runs = Vec::new();
    for i in 0..20 {
        let run_id = mesh.start_run("echo", &[("msg", &format!("m{i}"))]);
        let run = mesh.wait_run_final(&run_id);
        assert_eq!(str_of(&run, "state"), "succeeded", "{run:#}");
        runs.push(run_id);
    }
    let newest: Vec<String> = runs.iter().rev().take(5).cloned().collect();
    wait_for(Duration::from_secs(10), "the 15 oldest runs pruned", || {
        let listed = listed_runs(&mesh);
        if listed == newest {
            Ok(())
        } else {
            Err(format!("{} runs listed: {listed:?}", listed.len()))
        }
    });
    for old in &runs[..15] {
        let (status, body) = mesh.http_get(&format!("/runs/{old}"));
        assert_eq!(status, 404, "GET /runs/{old}: {body}");
    }
    wait_until(Duration::from_secs(10), "15 runs counted as pruned", || {
        mesh.metric("jobz_broker_runs_pruned_total") == Some(15)
    });
    // All 20 ran, once each.
    let ledger = fs::read_to_string(mesh.dir().join("ledger")).unwrap();
    assert_eq!(ledger.lines().count(), 20, "{ledger}");
}

#[test]
fn a_dead_task_keeps_its_run_until_it_is_retried_and_dead_stays_consistent() {
    let jobs = r#"
jobs:
  - name: echo
    params:
      msg: { required: true }
    command: "printf '%s\n' {msg} >> @DIR@/ledger"
  - name: doomed
    delivery: queue
    command: "exit 3"
"#;
    let mut mesh = Mesh::builder()
        .broker_args(&["--history-count", "2", "--prune-every", PRUNE_EVERY])
        .worker("w1", jobs)
        .start();
    mesh.wait_workers_live(1);

    let doomed = mesh.start_run("doomed", &[]);
    assert_eq!(str_of(&mesh.wait_run_final(&doomed), "state"), "failed");
    for i in 0..4 {
        let run_id = mesh.start_run("echo", &[("msg", &format!("m{i}"))]);
        mesh.wait_run_final(&run_id);
    }
    wait_until(Duration::from_secs(10), "two echo runs pruned", || {
        mesh.metric("jobz_broker_runs_pruned_total") == Some(2)
    });
    // Beyond the count, but /dead lists its task: it stays, and the entry can be retried.
    assert_eq!(listed_runs(&mesh).len(), 3);
    mesh.run(&doomed);
    let dead = dead_tasks(&mesh);
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(str_of(&dead[0], "run_id"), doomed);
    let retry_url = str_of(&dead[0], "retry_url").to_owned();

    let (status, rerun) = mesh.get_json(&retry_url);
    assert_eq!(status, 202, "{rerun}");
    let rerun = str_of(&rerun, "run_id").to_owned();
    assert_eq!(str_of(&mesh.wait_run_final(&rerun), "state"), "failed");

    // Retried, it follows its run: both go, and the retry is no longer offered.
    wait_for(Duration::from_secs(10), "the retried run pruned", || {
        let (status, _) = mesh.http_get(&format!("/runs/{doomed}"));
        let dead = dead_tasks(&mesh);
        if status == 404 && dead.len() == 1 {
            Ok(dead)
        } else {
            Err(format!("/runs/{doomed}: {status}; dead: {dead:?}"))
        }
    });
    let listed: Vec<Value> = dead_tasks(&mesh);
    assert_eq!(str_of(&listed[0], "run_id"), rerun, "{listed:?}");
    let (status, body) = mesh.http_get(&retry_url);
    assert_eq!(status, 404, "{body}");
    wait_until(
        Duration::from_secs(10),
        "the dead task counted as pruned",
        || mesh.metric("jobz_broker_dead_tasks_pruned_total") == Some(1),
    );

    // A restarted broker lists exactly what the running one did.
    mesh.restart("broker");
    wait_for(DEADLINE, "the restarted broker's dead list", || {
        let (status, body) = mesh.try_http_get("/dead").map_err(|e| e.to_string())?;
        let dead: Value = serde_json::from_str(&body).map_err(|e| format!("{status} {e}"))?;
        let now = list_of(&dead, "dead");
        if status == 200 && now == listed {
            Ok(())
        } else {
            Err(format!("{status} {now:?}"))
        }
    });
}

/// Step output files under the worker's `runs/<run_id>/`.
fn outputs_of(log_dir: &Path, run_id: &str) -> Vec<PathBuf> {
    fs::read_dir(log_dir.join("runs").join(run_id))
        .map(|entries| entries.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

#[test]
fn a_worker_prunes_old_step_outputs_but_never_a_running_steps() {
    let jobs = r#"
jobs:
  - name: quick
    command: "echo quick"
  - name: quiet
    command: "echo start; sleep 2.5; echo end"
"#;
    let mesh = Mesh::builder()
        .worker_with_args(
            "w1",
            jobs,
            &["--output-retention", "1s", "--prune-every", PRUNE_EVERY],
        )
        .start();
    mesh.wait_workers_live(1);
    let files_pruned = r#"jobz_worker_output_files_pruned_total{worker="w1"}"#;
    wait_until(DEADLINE, "the worker's counter at 0", || {
        mesh.metric(files_pruned) == Some(0)
    });
    let log_dir = mesh.dir().join("w1/log");

    let quick = mesh.start_run("quick", &[]);
    mesh.wait_run_final(&quick);
    assert_eq!(outputs_of(&log_dir, &quick).len(), 1);
    wait_until(Duration::from_secs(10), "the old output pruned", || {
        !log_dir.join("runs").join(&quick).exists()
    });

    // Silent for longer than the retention while it runs: its file stays, so the tail the
    // worker reads from it when the command ends has both lines.
    let quiet = mesh.start_run("quiet", &[]);
    let run = mesh.wait_run_final(&quiet);
    assert_eq!(str_of(&run, "state"), "succeeded", "{run:#}");
    let (status, log) = mesh.http_get(&format!("/runs/{quiet}/log"));
    assert_eq!(status, 200, "{log}");
    assert!(
        log.contains("start") && log.contains("end"),
        "a running step's output was pruned: {log:?}"
    );
    wait_until(Duration::from_secs(10), "both outputs counted", || {
        mesh.metric(files_pruned) == Some(2)
    });
}
