//! The runner with real processes: outcomes, output, environment, timeouts and the kill
//! of the process group (here because commands are started by the step supervisor, the
//! `jobz-step` binary, which only integration tests can name).

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::Duration;

use crossbeam_channel::bounded;
use jobz::message::TaskOutcome;
use worker::runner::{run, RunResult, RunSpec, Stop, CANCELLED_ERROR, OUTPUT_TAIL_BYTES};

use crate::harness::{is_alive, read_pid, wait_until, Fixture};

fn run_plain(spec: &RunSpec) -> RunResult {
    let (_keep, cancel) = bounded::<Stop>(1);
    run(spec, &cancel, |_, _| {})
}

#[test]
fn exit_codes_become_outcomes() {
    let f = Fixture::new();
    let ok = run_plain(&f.spec("echo hello; echo oops >&2"));
    assert_eq!(ok.outcome, TaskOutcome::Succeeded);
    assert_eq!(ok.exit_code, Some(0));
    assert_eq!(ok.error, None);
    assert_eq!(ok.output_tail, "hello\noops\n");
    let failed = run_plain(&f.spec("exit 3"));
    assert_eq!(failed.outcome, TaskOutcome::Failed);
    assert_eq!(failed.exit_code, Some(3));
    assert_eq!(failed.error, None);
    assert_eq!(f.output(), "hello\noops\n", "output is appended");
}

#[test]
fn a_signalled_command_has_no_exit_code() {
    let f = Fixture::new();
    let r = run_plain(&f.spec("kill -9 $$"));
    assert_eq!(r.outcome, TaskOutcome::Failed);
    assert_eq!(r.exit_code, None);
    assert_eq!(r.error.as_deref(), Some("killed by signal 9"));
}

#[test]
fn timeout_kills_the_whole_process_group() {
    let f = Fixture::new();
    let pidfile = f.dir.path().join("child.pid");
    let mut spec = f.spec(&format!("sleep 30 & echo $! > {}; wait", pidfile.display()));
    spec.timeout = Some(Duration::from_millis(300));
    let r = run_plain(&spec);
    assert_eq!(r.outcome, TaskOutcome::TimedOut);
    assert_eq!(r.error.as_deref(), Some("timed out after 300ms"));
    assert!(r.elapsed < Duration::from_secs(5), "{:?}", r.elapsed);
    let pid = read_pid(&pidfile);
    wait_until("the background sleep to die", || !is_alive(pid));
}

#[test]
fn a_command_ignoring_sigterm_is_killed_after_the_grace() {
    let f = Fixture::new();
    let mut spec = f.spec("trap '' TERM; sleep 30");
    spec.timeout = Some(Duration::from_millis(200));
    let r = run_plain(&spec);
    assert_eq!(r.outcome, TaskOutcome::TimedOut);
    assert_eq!(r.exit_code, None, "SIGKILL, not an exit");
    assert!(r.elapsed >= Duration::from_millis(500), "{:?}", r.elapsed);
    assert!(r.elapsed < Duration::from_secs(5), "{:?}", r.elapsed);
}

#[test]
fn leftover_background_processes_die_when_the_command_ends() {
    let f = Fixture::new();
    let pidfile = f.dir.path().join("child.pid");
    let spec = f.spec(&format!(
        "sleep 30 >/dev/null 2>&1 & echo $! > {}",
        pidfile.display()
    ));
    let r = run_plain(&spec);
    assert_eq!(r.outcome, TaskOutcome::Succeeded);
    let pid = read_pid(&pidfile);
    wait_until("the leftover sleep to die", || !is_alive(pid));
}

#[test]
fn cancel_kills_and_fails_with_the_reason() {
    let f = Fixture::new();
    let spec = f.spec("sleep 30");
    let (tx, cancel) = bounded::<Stop>(1);
    let (started_tx, started) = bounded(1);
    let handle = std::thread::spawn(move || {
        run(&spec, &cancel, |at, _| {
            started_tx.send(at).unwrap();
        })
    });
    started.recv_timeout(Duration::from_secs(10)).unwrap();
    tx.send(Stop::Fail("worker shut down".into())).unwrap();
    let r = handle.join().unwrap();
    assert_eq!(r.outcome, TaskOutcome::Failed);
    assert_eq!(r.error.as_deref(), Some("worker shut down"));
    assert!(r.elapsed < Duration::from_secs(5));
}

#[test]
fn a_cancelled_run_kills_the_whole_group_and_reports_cancelled() {
    let f = Fixture::new();
    let pidfile = f.dir.path().join("child.pid");
    let spec = f.spec(&format!("sleep 30 & echo $! > {}; wait", pidfile.display()));
    let (tx, stop) = bounded::<Stop>(1);
    let (started_tx, started) = bounded(1);
    let handle = std::thread::spawn(move || {
        run(&spec, &stop, |at, _| {
            started_tx.send(at).unwrap();
        })
    });
    started.recv_timeout(Duration::from_secs(10)).unwrap();
    let pid = read_pid(&pidfile);
    tx.send(Stop::Cancel).unwrap();
    let r = handle.join().unwrap();
    assert_eq!(r.outcome, TaskOutcome::Cancelled);
    assert_eq!(r.error.as_deref(), Some(CANCELLED_ERROR));
    assert!(r.elapsed < Duration::from_secs(5), "{:?}", r.elapsed);
    wait_until("the background sleep to die", || !is_alive(pid));
}

#[test]
fn a_dropped_cancel_sender_cancels_nothing() {
    let f = Fixture::new();
    let (tx, cancel) = bounded::<Stop>(1);
    drop(tx);
    let r = run(&f.spec("sleep 0.2; exit 4"), &cancel, |_, _| {});
    assert_eq!(r.exit_code, Some(4));
}

#[test]
fn hostile_parameter_values_reach_the_command_as_one_argument() {
    let template = jobz::template::Template::parse("printf '%s' {v}").unwrap();
    for hostile in [
        ";rm -rf /",
        "$(id)",
        "`id`",
        "a'b\"c",
        "x\ny",
        " spaced  out ",
        "*",
        "~",
        "$HOME",
        "-n",
        "\\",
        "a\tb|c&d>e<f",
    ] {
        let f = Fixture::new();
        let values = BTreeMap::from([("v".to_string(), hostile.to_string())]);
        let command = template.render_shell(&values).unwrap();
        let r = run_plain(&f.spec(&command));
        assert_eq!(r.outcome, TaskOutcome::Succeeded, "{hostile:?}");
        assert_eq!(f.output(), hostile, "{command}");
    }
}

#[test]
fn runs_in_a_fresh_workdir_that_is_removed_after() {
    let f = Fixture::new();
    let spec = f.spec("pwd; ls -A | wc -l; touch left-behind");
    std::fs::create_dir_all(&spec.workdir).unwrap();
    std::fs::write(spec.workdir.join("stale"), "x").unwrap();
    let r = run_plain(&spec);
    assert_eq!(r.outcome, TaskOutcome::Succeeded);
    let out = f.output();
    let mut lines = out.lines();
    let pwd = PathBuf::from(lines.next().unwrap());
    assert_eq!(
        pwd.canonicalize().ok(),
        None,
        "the directory it ran in is gone"
    );
    assert!(pwd.ends_with("work/t1.1"));
    assert_eq!(
        lines.next().unwrap().trim(),
        "0",
        "stale files were cleared"
    );
    assert!(!spec.workdir.exists());
}

#[test]
fn the_environment_carries_task_variables_but_no_inherited_params() {
    let f = Fixture::new();
    std::env::set_var("JOBZ_PARAM_LEAKED", "from the worker");
    let mut spec = f.spec("echo \"$JOBZ_RUN_ID|$JOBZ_PARAM_DATE|${JOBZ_PARAM_LEAKED-unset}\"");
    spec.env = vec![
        ("JOBZ_RUN_ID".into(), "r1".into()),
        ("JOBZ_PARAM_DATE".into(), "2024_01_01".into()),
    ];
    let r = run_plain(&spec);
    assert_eq!(r.output_tail, "r1|2024_01_01|unset\n");
}

#[test]
fn stdin_is_empty() {
    let f = Fixture::new();
    let r = run_plain(&f.spec("wc -c"));
    assert_eq!(r.output_tail.trim(), "0");
}

#[test]
fn the_tail_is_the_last_4k_of_this_runs_output_at_a_char_boundary() {
    let f = Fixture::new();
    run_plain(&f.spec("echo previous run"));
    let r = run_plain(&f.spec("echo this run"));
    assert_eq!(r.output_tail, "this run\n");
    let big = run_plain(&f.spec("i=0; while [ $i -lt 1000 ]; do echo line$i; i=$((i+1)); done"));
    assert!(big.output_tail.len() <= OUTPUT_TAIL_BYTES);
    assert!(big.output_tail.ends_with("line999\n"));
}

#[test]
fn output_beyond_the_limit_is_cut_marked_and_reported_without_stopping_the_writer() {
    let f = Fixture::new();
    let status = f.path("status");
    let mut spec = f.spec(&format!(
        "head -c 100000 /dev/zero | tr '\\0' x; echo $? > {}; exit 3",
        status.display()
    ));
    spec.max_output = 1000;
    let r = run_plain(&spec);
    assert_eq!(r.exit_code, Some(3), "the exit status still decides");
    assert_eq!(r.outcome, TaskOutcome::Failed);
    assert_eq!(r.truncated, Some(1000));
    assert_eq!(
        r.reported_error().as_deref(),
        Some("output truncated after 1000 bytes")
    );
    assert_eq!(std::fs::read_to_string(&status).unwrap().trim(), "0");
    let out = f.output();
    assert_eq!(
        out,
        format!(
            "{}\n[jobz: output truncated after 1000 bytes]\n",
            "x".repeat(1000)
        )
    );
    assert!(r
        .output_tail
        .ends_with("[jobz: output truncated after 1000 bytes]\n"));
}

#[test]
fn output_up_to_the_limit_is_not_reported_cut() {
    let f = Fixture::new();
    let mut spec = f.spec("printf 0123456789");
    spec.max_output = 10;
    let r = run_plain(&spec);
    assert_eq!(r.truncated, None);
    assert_eq!(r.reported_error(), None);
    assert_eq!(f.output(), "0123456789");
}

#[test]
fn output_left_in_the_pipe_when_the_shell_ends_is_kept() {
    // The shell's last words are in the pipe when it exits; a background child that keeps
    // the pipe open does not hold the step up (it is killed with the group).
    let f = Fixture::new();
    let r = run_plain(
        &f.spec("sleep 30 & i=0; while [ $i -lt 2000 ]; do echo line$i; i=$((i+1)); done"),
    );
    assert_eq!(r.outcome, TaskOutcome::Succeeded);
    assert!(r.elapsed < Duration::from_secs(10), "{:?}", r.elapsed);
    assert!(f.output().ends_with("line1999\n"));
}

#[test]
fn the_environment_is_only_the_allow_list_and_the_task_variables() {
    let f = Fixture::new();
    std::env::set_var("WORKER_TEST_SECRET", "s3cret");
    std::env::set_var("WORKER_TEST_ALLOWED", "yes");
    let mut spec = f.spec("env");
    spec.env = vec![("JOBZ_RUN_ID".into(), "r1".into())];
    spec.env_allow = vec!["WORKER_TEST_ALLOWED".into()];
    run_plain(&spec);
    let out = f.output();
    assert!(!out.contains("s3cret"), "{out}");
    assert!(out.contains("WORKER_TEST_ALLOWED=yes\n"), "{out}");
    assert!(out.contains("JOBZ_RUN_ID=r1\n"), "{out}");
    assert!(
        out.contains(&format!("PATH={}\n", worker::runner::SAFE_PATH)),
        "{out}"
    );
}

#[test]
fn run_as_an_unknown_user_fails_without_starting() {
    let f = Fixture::new();
    let mut spec = f.spec("touch ran");
    spec.run_as = Some("no-such-user-jobz".into());
    let mut called = false;
    let (_keep, cancel) = bounded::<Stop>(1);
    let r = run(&spec, &cancel, |_, _| called = true);
    assert!(!called && !r.started);
    assert!(r.error.unwrap().contains("no such user"));
}

/// `nobody`, when this test runs as root and the host has that user.
fn root_and_nobody() -> Option<worker::runner::User> {
    if std::fs::metadata("/proc/self")
        .ok()
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
        != Some(0)
    {
        eprintln!("skipped: needs root");
        return None;
    }
    let Ok(Some(nobody)) = worker::runner::lookup_user("nobody") else {
        eprintln!("skipped: no user nobody");
        return None;
    };
    Some(nobody)
}

#[test]
fn run_as_switches_user_groups_and_home_when_the_worker_is_root() {
    let Some(nobody) = root_and_nobody() else {
        return;
    };
    let f = Fixture::new();
    let mut spec = f.spec("id -u; id -g; id -G; echo \"$HOME $USER\"; touch mine && echo ok");
    spec.run_as = Some("nobody".into());
    let r = run_plain(&spec);
    assert_eq!(r.outcome, TaskOutcome::Succeeded, "{}", f.output());
    let out = f.output();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], nobody.uid.to_string(), "{out}");
    assert_eq!(lines[1], nobody.gid.to_string(), "{out}");
    assert!(
        !lines[2].split(' ').any(|g| g == "0"),
        "root's group kept: {out}"
    );
    assert_eq!(
        lines[3],
        format!("{} nobody", nobody.home.display()),
        "{out}"
    );
    assert_eq!(lines[4], "ok", "the working directory is the user's: {out}");
}

#[test]
fn a_step_run_as_another_user_reaches_its_workdir_by_its_absolute_path() {
    let Some(_) = root_and_nobody() else {
        return;
    };
    let f = Fixture::new();
    // As a worker under `UMask=0027` leaves them: the spool open to others for traversal
    // (as deployed), the `work/` it made closed.
    let spool = f.path("");
    std::fs::set_permissions(&spool, std::fs::Permissions::from_mode(0o751)).unwrap();
    std::fs::create_dir(f.path("work")).unwrap();
    std::fs::set_permissions(f.path("work"), std::fs::Permissions::from_mode(0o750)).unwrap();
    // `$PWD`, `realpath .` and `cd` all go through the path from /.
    let mut spec = f.spec("cd \"$PWD\" && touch \"$PWD/mine\" && realpath . && echo ok");
    spec.run_as = Some("nobody".into());
    let r = run_plain(&spec);
    let out = f.output();
    assert_eq!(r.outcome, TaskOutcome::Succeeded, "{out}");
    assert!(out.ends_with("ok\n"), "{out}");
    let mode = std::fs::metadata(f.path("work"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(
        mode & 0o777,
        0o751,
        "work/ is traversable, not listable: {mode:o}"
    );
}

/// The small `jobz-step` binary, opened and named through `/proc/self/fd/N` as the worker
/// does (`worker::supervisor::program`).
fn step_binary() -> (std::fs::File, std::path::PathBuf) {
    use std::os::fd::AsRawFd;
    let path = std::path::Path::new(env!("CARGO_BIN_EXE_jobz-step"));
    let file = worker::supervisor::open_step_binary(Some(path)).expect("jobz-step is executable");
    let named = std::path::PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
    (file, named)
}

#[test]
fn the_step_binary_named_through_its_open_descriptor_supervises_steps() {
    let f = Fixture::new();
    let (_open, named) = step_binary();
    let steps = worker::supervisor::StepSupervisor::new(named);
    let mut spec = f.spec("echo hello; echo oops >&2; exit 3");
    spec.steps = steps.clone();
    let r = run_plain(&spec);
    assert_eq!((r.outcome, r.exit_code), (TaskOutcome::Failed, Some(3)));
    assert_eq!(r.output_tail, "hello\noops\n");
    // Its output cap and the group kill on a timeout work the same.
    let pidfile = f.path("child.pid");
    let mut spec = f.spec(&format!(
        "head -c 5000 /dev/zero | tr '\\0' x; sleep 30 & echo $! > {}; wait",
        pidfile.display()
    ));
    spec.steps = steps;
    spec.max_output = 1000;
    spec.timeout = Some(Duration::from_millis(300));
    let r = run_plain(&spec);
    assert_eq!(r.outcome, TaskOutcome::TimedOut);
    assert_eq!(r.truncated, Some(1000));
    wait_until("the background sleep to die", || {
        !is_alive(read_pid(&pidfile))
    });
}

#[test]
fn only_an_executable_file_is_taken_as_the_step_binary() {
    use std::os::unix::fs::PermissionsExt;
    let f = Fixture::new();
    let plain = f.path("jobz-step");
    std::fs::write(&plain, b"#!/bin/sh\n").unwrap();
    std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert!(worker::supervisor::open_step_binary(Some(&plain)).is_none());
    std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o755)).unwrap();
    assert!(worker::supervisor::open_step_binary(Some(&plain)).is_some());
    assert!(
        worker::supervisor::open_step_binary(Some(f.dir.path())).is_none(),
        "a directory"
    );
    assert!(worker::supervisor::open_step_binary(Some(&f.path("missing"))).is_none());
    assert!(worker::supervisor::open_step_binary(None).is_none());
}
