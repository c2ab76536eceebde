//! Issue 14, the `jobz` command (acceptance 3), against a real mesh: `start --wait` exits
//! 0 when the run succeeds and non-zero when it fails, `runs --json` prints the runs,
//! `log -f` follows a step to its end, and every failure has its exit code.

use std::process::{Command, Output, Stdio};

use serde_json::Value;

use crate::harness::{bin, free_ports, list_of, str_of, Mesh};

const JOBS: &str = r#"
jobs:
  - name: echo
    params:
      msg: { required: true }
    command: "printf '%s\n' {msg}"
  - name: fail
    command: "echo about to fail; exit 3"
  - name: lines
    command: "for i in 1 2 3; do echo line $i; sleep 0.2; done"
  - name: slow
    command: "sleep 5"
"#;

/// `jobz ARGS` against the mesh's frontend.
fn jobz(mesh: &Mesh, args: &[&str]) -> Output {
    Command::new(bin("jobz"))
        .args(args)
        .env(
            "JOBZ_URL",
            format!("http://127.0.0.1:{}", mesh.frontend_port),
        )
        .env_remove("JOBZ_TOKEN")
        .env("HOME", mesh.dir())
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_jobz_command_starts_waits_lists_shows_and_follows_runs() {
    let mesh = Mesh::builder().worker("w1", JOBS).start();
    mesh.wait_workers_live(1);

    let ok = jobz(&mesh, &["start", "echo", "msg=hello", "--wait"]);
    assert_eq!(ok.status.code(), Some(0), "{}", text(&ok));
    assert!(stdout(&ok).contains("succeeded"), "{}", text(&ok));
    let failed = jobz(&mesh, &["start", "fail", "--wait"]);
    assert_eq!(
        failed.status.code(),
        Some(1),
        "a failed run: {}",
        text(&failed)
    );
    assert!(stdout(&failed).contains("failed"), "{}", text(&failed));

    let runs = jobz(&mesh, &["runs", "--json"]);
    assert_eq!(runs.status.code(), Some(0), "{}", text(&runs));
    let runs: Value = serde_json::from_slice(&runs.stdout).unwrap();
    let jobs: Vec<String> = list_of(&runs, "runs")
        .iter()
        .map(|r| str_of(r, "job").to_owned())
        .collect();
    assert_eq!(jobs, vec!["fail", "echo"], "newest first: {runs}");
    let echo_id = str_of(&list_of(&runs, "runs")[1], "run_id").to_owned();
    let table = jobz(&mesh, &["runs", "--job", "echo"]);
    let table = stdout(&table);
    assert!(table.starts_with("RUN "), "{table}");
    assert!(
        table.contains(&echo_id) && !table.contains("fail"),
        "{table}"
    );

    let show = jobz(&mesh, &["show", &echo_id]);
    assert_eq!(show.status.code(), Some(0), "{}", text(&show));
    assert!(
        stdout(&show).contains("job echo  succeeded"),
        "{}",
        text(&show)
    );
    assert!(stdout(&show).contains("w1"), "{}", text(&show));
    let log = jobz(&mesh, &["log", &echo_id]);
    assert_eq!(stdout(&log), "[w1 echo] hello\n", "{}", text(&log));

    // Follow a running step: every line, and the command ends with the run.
    let started = jobz(&mesh, &["start", "lines", "--json"]);
    assert_eq!(started.status.code(), Some(0), "{}", text(&started));
    let started: Value = serde_json::from_slice(&started.stdout).unwrap();
    let lines_id = str_of(&started, "run_id").to_owned();
    let follow = jobz(&mesh, &["log", &lines_id, "-f"]);
    assert_eq!(follow.status.code(), Some(0), "{}", text(&follow));
    assert_eq!(
        stdout(&follow),
        "[w1 lines] line 1\n[w1 lines] line 2\n[w1 lines] line 3\n",
        "{}",
        text(&follow)
    );

    let workers = jobz(&mesh, &["workers"]);
    assert!(stdout(&workers).contains("w1") && stdout(&workers).contains("live"));
    let listed = jobz(&mesh, &["jobs", "--json"]);
    let listed: Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(list_of(&listed, "jobs").len(), 4, "{listed}");
}

#[test]
fn the_jobz_command_exits_with_a_code_that_says_what_went_wrong() {
    let mesh = Mesh::builder().worker("w1", JOBS).start();
    mesh.wait_workers_live(1);

    let unknown = jobz(&mesh, &["start", "no_such_job"]);
    assert_eq!(unknown.status.code(), Some(2), "{}", text(&unknown));
    assert!(
        String::from_utf8_lossy(&unknown.stderr).starts_with("jobz: 404"),
        "{}",
        text(&unknown)
    );
    let bad = jobz(&mesh, &["start", "echo", "no-equals-sign"]);
    assert_eq!(bad.status.code(), Some(2), "{}", text(&bad));
    let missing = jobz(&mesh, &["show", "01a2452a-0000-7000-8000-000000000000"]);
    assert_eq!(missing.status.code(), Some(2), "{}", text(&missing));

    // The wait runs out before the run ends; the run goes on.
    let still = jobz(&mesh, &["start", "slow", "--wait=0.5", "--json"]);
    assert_eq!(still.status.code(), Some(4), "{}", text(&still));
    let accepted: Value = serde_json::from_slice(&still.stdout).unwrap();
    let slow_id = str_of(&accepted, "run_id").to_owned();
    let cancel = jobz(&mesh, &["cancel", &slow_id]);
    assert_eq!(cancel.status.code(), Some(0), "{}", text(&cancel));
    assert!(stdout(&cancel).contains("cancelled"), "{}", text(&cancel));

    // Nobody listening: unavailable.
    let port = free_ports(1);
    let out = Command::new(bin("jobz"))
        .args(["workers", "--url", &format!("http://127.0.0.1:{port}")])
        .env("HOME", mesh.dir())
        .env_remove("JOBZ_TOKEN")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    // A token file that is named but missing is refused before anything is sent.
    let out = jobz(&mesh, &["workers", "--token-file", "/nonexistent/token"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
}

#[test]
fn every_binary_reports_the_workspace_version_and_its_commit() {
    let version = env!("CARGO_PKG_VERSION");
    assert_ne!(version, "0.0.0", "the workspace has a real version");
    let mut seen = std::collections::BTreeSet::new();
    for name in [
        "jobz-broker",
        "jobz-worker",
        "jobz-step",
        "jobz-frontend",
        "jobz-semaphore",
        "jobz",
    ] {
        let out = Command::new(bin(name)).arg("--version").output().unwrap();
        assert!(out.status.success(), "{name}: {}", text(&out));
        let said = stdout(&out);
        let rest = said
            .strip_prefix(&format!("{name} {version}+"))
            .unwrap_or_else(|| panic!("{name} said {said:?}"));
        let commit = rest.trim_end();
        assert!(
            commit == "unknown"
                || (commit.len() == 11
                    && commit.starts_with('g')
                    && commit[1..].bytes().all(|b| b.is_ascii_hexdigit())),
            "{name} said {said:?}"
        );
        seen.insert(commit.to_owned());
    }
    assert_eq!(seen.len(), 1, "one tree, one commit: {seen:?}");
}
