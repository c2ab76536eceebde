//! The step leader: whoever dies, worker or leader, the task's process group goes with it,
//! and nothing else kills it.

use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crossbeam_channel::bounded;
use jobz::message::TaskOutcome;
use worker::leader::FLAG;
use worker::runner::{run, Stop};
use worker::spool::LOST_ERROR;

use crate::harness::{
    is_alive, kill_9, leader, read_pid, send_signal, wait_until, wait_within, work, worker_log,
    write_jobs, FakeBroker, Fixture,
};

/// How soon the processes of a task must be gone after its worker or leader died.
const GONE_WITHIN: Duration = Duration::from_secs(1);

/// Starts a leader as the worker would, but with this test process as the worker.
fn start_leader(dir: &Path, command: &str) -> Child {
    Command::new(leader())
        .arg(FLAG)
        .arg(std::process::id().to_string())
        .arg(command)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap()
}

/// `sleep 30` in the background, its pid in `child.pid`, the shell's in `sh.pid`; then the
/// shell waits for a file `go` and exits 7.
const GATED: &str = "sleep 30 & echo $! > child.pid; echo $$ > sh.pid; \
                     while [ ! -e go ]; do sleep 0.01; done; exit 7";

#[test]
fn a_worker_killed_with_sigkill_takes_its_command_along_and_reports_it_lost_on_restart() {
    let broker = FakeBroker::start(true);
    let root = tempfile::tempdir().unwrap();
    let pidfile = root.path().join("child.pid");
    write_jobs(
        root.path(),
        &format!(
            "  - name: long\n    command: \"sleep 30 & echo $! > {}; echo started; wait\"\n",
            pidfile.display()
        ),
    );
    let start_worker = || -> Child {
        Command::new(leader())
            .arg("--broker")
            .arg(broker.addr.to_string())
            .arg("--name=w1")
            .arg("--jobs-dir")
            .arg(root.path().join("jobs.d"))
            .arg("--spool")
            .arg(root.path().join("spool"))
            .arg("--log-dir")
            .arg(root.path().join("log"))
            .arg("--log-file")
            .arg(root.path().join("stderr.log"))
            .arg("--heartbeat=300ms")
            .stdin(Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut first = start_worker();
    broker.offer(work("long", "t1", 1, "w1"));
    let sleep_pid = read_pid(&pidfile);
    assert!(is_alive(sleep_pid));

    first.kill().unwrap(); // SIGKILL: no handler, no drain, no goodbye
    first.wait().unwrap();
    wait_within(
        "the task's sleep to die with its worker",
        GONE_WITHIN,
        || !is_alive(sleep_pid),
    );

    let mut second = start_worker();
    let lost = broker.wait_finished("t1");
    assert_eq!(lost.outcome, TaskOutcome::Failed);
    assert_eq!(lost.error.as_deref(), Some(LOST_ERROR));
    assert_eq!(lost.worker, "w1");
    assert!(
        lost.output_tail.contains("started"),
        "{:?}",
        lost.output_tail
    );
    wait_until("the lost result to leave the outbox", || {
        crate::harness::outbox(root.path()).is_empty()
    });
    let log = worker_log(root.path());
    assert!(
        log.contains("task=t1 job=long attempt=1 failed: worker restarted; attempt lost"),
        "{log}"
    );
    assert_eq!(log.matches(" started\n").count(), 1, "not run again: {log}");
    second.kill().unwrap();
    second.wait().unwrap();
}

#[test]
fn a_leader_killed_with_sigkill_takes_its_group_along() {
    let f = Fixture::new();
    let spec = f.spec(&format!(
        "echo $PPID > {}; sleep 30 & echo $! > {}; wait",
        f.path("leader.pid").display(),
        f.path("child.pid").display()
    ));
    let (_keep, cancel) = bounded::<Stop>(1);
    let runner = std::thread::spawn(move || run(&spec, &cancel, |_| {}));
    let leader_pid = read_pid(&f.path("leader.pid"));
    let sleep_pid = read_pid(&f.path("child.pid"));
    kill_9(leader_pid);
    wait_within("the sleep to die with its leader", GONE_WITHIN, || {
        !is_alive(sleep_pid)
    });
    let r = runner.join().unwrap();
    assert_eq!(r.outcome, TaskOutcome::Failed);
    assert_eq!(r.error.as_deref(), Some("killed by signal 9"));
}

#[test]
fn the_end_of_the_control_pipe_kills_the_group() {
    let f = Fixture::new();
    let mut leader = start_leader(f.dir.path(), GATED);
    let sleep_pid = read_pid(&f.path("child.pid"));
    read_pid(&f.path("sh.pid"));
    drop(leader.stdin.take()); // what the kernel does when the worker dies
    wait_within("the sleep to die", GONE_WITHIN, || !is_alive(sleep_pid));
    let status = leader.wait().unwrap();
    assert_eq!(status.signal(), Some(9), "{status:?}");
}

#[test]
fn signals_to_the_leader_alone_are_ignored_while_the_worker_lives() {
    let f = Fixture::new();
    let mut leader = start_leader(f.dir.path(), GATED);
    read_pid(&f.path("sh.pid")); // the leader's handlers are in place by now
    for signal in ["-TERM", "-INT", "-HUP", "-USR1", "-USR2"] {
        send_signal(signal, leader.id() as i32);
    }
    std::fs::write(f.path("go"), "").unwrap();
    // `Child::wait` closes stdin first, which would tell the leader the worker is gone.
    let _control = leader.stdin.take();
    let status = leader.wait().unwrap();
    assert_eq!(status.code(), Some(7), "the shell's exit code: {status:?}");
}

#[test]
fn the_end_of_the_spawning_thread_does_not_kill_the_task() {
    // PR_SET_PDEATHSIG fires when the *thread* that forked the leader ends; the worker runs
    // each task on a thread of its own, and the leader must not mistake that for its death.
    let f = Fixture::new();
    let dir = f.dir.path().to_owned();
    let mut leader = std::thread::spawn(move || start_leader(&dir, GATED))
        .join()
        .unwrap();
    read_pid(&f.path("sh.pid"));
    std::fs::write(f.path("go"), "").unwrap();
    let _control = leader.stdin.take(); // see above
    let status = leader.wait().unwrap();
    assert_eq!(status.code(), Some(7), "{status:?}");
}

#[test]
fn the_leader_refuses_bad_arguments() {
    let out = Command::new(leader())
        .args([FLAG, "not-a-pid", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(worker::leader::EXIT_LEADER_FAILED));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a worker pid"));
}

#[test]
fn the_leader_flag_is_not_in_the_help() {
    let out = Command::new(leader()).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("--spool"), "{help}");
    assert!(!help.contains("lead"), "{help}");
}
