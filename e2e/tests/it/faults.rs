//! Faults: a broker killed mid-run, a step that outlives its timeout.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::harness::{
    kill_if_alive, pid_alive, steps_of, steps_of_job, str_of, wait_for, wait_until, Mesh, DEADLINE,
};

#[test]
fn broker_killed_after_accept_still_completes_run() {
    let mut mesh = Mesh::builder()
        .worker(
            "w1",
            r#"
jobs:
  - name: first
    command: "echo first"
    on_success: second
  - name: second
    command: "echo second"
"#,
        )
        .start();
    mesh.wait_workers_live(1);

    // 202 means durably accepted: the run must survive the broker dying right after.
    let run_id = mesh.start_run("first", &[]);
    mesh.kill9("broker");
    mesh.restart("broker");

    let run = mesh.wait_run_final_within(&run_id, Duration::from_secs(60));
    assert_eq!(str_of(&run, "state"), "succeeded", "{run:#}");
    for job in ["first", "second"] {
        let steps = steps_of_job(&run, job);
        assert!(!steps.is_empty(), "`{job}` never ran: {run:#}");
        assert!(
            steps.iter().any(|s| str_of(s, "state") == "succeeded"),
            "{run:#}"
        );
    }
    for s in steps_of(&run) {
        assert!(
            matches!(str_of(&s, "state"), "succeeded" | "failed"),
            "a step left dangling after the restart: {run:#}"
        );
    }
    // And the restarted broker takes new work.
    let again = mesh.start_run("first", &[]);
    let run = mesh.wait_run_final(&again);
    assert_eq!(str_of(&run, "state"), "succeeded", "{run:#}");
}

/// Kills the test's stray `sleep`s if the worker did not.
struct KillOnDrop(Vec<u32>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for pid in &self.0 {
            kill_if_alive(*pid, "sleep");
        }
    }
}

fn read_pid(path: &Path) -> Result<u32, String> {
    let text = fs::read_to_string(path).map_err(|e| e.to_string())?;
    text.trim()
        .parse()
        .map_err(|e| format!("{:?}: {e}", text.trim()))
}

#[test]
fn timeout_kills_the_step_and_its_children() {
    let mesh = Mesh::builder()
        .worker(
            "w1",
            r#"
jobs:
  - name: hang
    # A grandchild in the background and a foreground child, both far past the timeout.
    command: "sh -c 'sleep 300 & echo $! > @DIR@/bg.pid; echo $$ > @DIR@/fg.pid; exec sleep 300'"
    timeout: 1s
"#,
        )
        .start();
    mesh.wait_workers_live(1);

    let started = Instant::now();
    let run_id = mesh.start_run("hang", &[]);
    let bg = mesh.dir().join("bg.pid");
    let fg = mesh.dir().join("fg.pid");
    let pids = wait_for(DEADLINE, "the job to write its pid files", || {
        Ok::<_, String>((read_pid(&bg)?, read_pid(&fg)?))
    });
    let _cleanup = KillOnDrop(vec![pids.0, pids.1]);

    let run = mesh.wait_run_final(&run_id);
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "the step was not stopped at its 1 s timeout"
    );
    assert_eq!(str_of(&run, "state"), "failed", "{run:#}");
    let steps = steps_of_job(&run, "hang");
    assert_eq!(steps.len(), 1, "{run:#}");
    assert_eq!(str_of(&steps[0], "state"), "failed", "{run:#}");

    wait_until(
        Duration::from_secs(5),
        "the step's processes to be gone",
        || !pid_alive(pids.0) && !pid_alive(pids.1),
    );
    wait_until(DEADLINE, "`timed out` in worker.log", || {
        mesh.worker_log("w1", &run_id)
            .iter()
            .any(|l| l.event.starts_with("timed out"))
    });
}

/// A second broker started on a running broker's state directory (a manual start beside
/// the service, a copied unit) refuses to start, naming the directory, and the first
/// broker goes on serving: two brokers never write one store.
#[test]
fn a_second_broker_on_the_same_state_directory_refuses_to_start() {
    let mesh = Mesh::builder()
        .worker("w1", "jobs:\n  - name: hello\n    command: \"true\"\n")
        .start();
    mesh.wait_workers_live(1);
    let port = crate::harness::free_ports(1);
    let mut second = std::process::Command::new(crate::harness::bin("jobz-broker"))
        .args(["--bind", &format!("127.0.0.1:{port}"), "--state"])
        .arg(mesh.dir().join("broker"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("starting a second broker");
    let pid = second.id();
    let status = wait_for(DEADLINE, "the second broker to exit", || {
        match second.try_wait() {
            Ok(Some(status)) => Ok(status),
            Ok(None) => Err("still running".to_owned()),
            Err(e) => Err(e.to_string()),
        }
    });
    let mut stderr = String::new();
    if let Some(mut pipe) = second.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut pipe, &mut stderr);
    }
    kill_if_alive(pid, "jobz-broker");
    assert!(!status.success(), "the second broker exited with {status}");
    assert!(
        stderr.contains("in use by another broker"),
        "the refusal names why: {stderr}"
    );
    let run_id = mesh.start_run("hello", &[]);
    let run = mesh.wait_run_final(&run_id);
    assert_eq!(str_of(&run, "state"), "succeeded", "{run}");
}
