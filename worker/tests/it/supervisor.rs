//! The step supervisor: whoever dies, worker or supervisor, every step's process group goes
//! with it, and nothing else kills it.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::bounded;
use jobz::message::TaskOutcome;
use worker::runner::{run, RunResult, RunSpec, Stop};
use worker::spool::LOST_ERROR;
use worker::supervisor::{StepSupervisor, FLAG, SUPERVISOR_LOST_ERROR};

use crate::harness::{
    is_alive, kill_9, read_pid, send_signal, step_binary, wait_until, wait_within, work,
    worker_binary, worker_log, write_jobs, FakeBroker, Fixture,
};

/// How soon the processes of a step must be gone after its worker or supervisor died.
const GONE_WITHIN: Duration = Duration::from_secs(1);

/// `sleep 30` in the background, its pid in `child.pid`, the shell's in `sh.pid`; then the
/// shell waits for a file `go` and exits 7.
fn gated(f: &Fixture) -> String {
    let dir = f.dir.path().display();
    format!(
        "sleep 30 & echo $! > {dir}/child.pid; echo $$ > {dir}/sh.pid; \
         while [ ! -e {dir}/go ]; do sleep 0.01; done; exit 7"
    )
}

/// Runs `spec` on a thread; the result comes on the handle.
fn run_on_thread(spec: RunSpec) -> JoinHandle<RunResult> {
    std::thread::spawn(move || {
        let (_keep, cancel) = bounded::<Stop>(1);
        run(&spec, &cancel, |_, _| {})
    })
}

/// The [`gated`] step started by `steps` on a thread, once its shell runs: its runner
/// and the supervisor's pid.
fn start_gated(f: &Fixture, steps: &Arc<StepSupervisor>) -> (JoinHandle<RunResult>, i32) {
    let mut spec = f.spec(&gated(f));
    spec.steps = steps.clone();
    let runner = run_on_thread(spec);
    read_pid(&f.path("sh.pid"));
    let supervisor = steps.pid().expect("the supervisor runs") as i32;
    (runner, supervisor)
}

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
        Command::new(worker_binary())
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
        log.contains("task=t1 job=long attempt=1 worker=w1 failed: worker restarted; attempt lost"),
        "{log}"
    );
    assert_eq!(log.matches(" started\n").count(), 1, "not run again: {log}");
    second.kill().unwrap();
    second.wait().unwrap();
}

#[test]
fn a_supervisor_killed_with_sigkill_takes_its_steps_along_and_the_next_step_gets_a_new_one() {
    let f = Fixture::new();
    let steps = StepSupervisor::new(step_binary());
    let (runner, first) = start_gated(&f, &steps);
    let sleep_pid = read_pid(&f.path("child.pid"));
    kill_9(first);
    wait_within("the sleep to die with its supervisor", GONE_WITHIN, || {
        !is_alive(sleep_pid)
    });
    let r = runner.join().unwrap();
    assert_eq!(r.outcome, TaskOutcome::Failed);
    assert_eq!(r.error.as_deref(), Some(SUPERVISOR_LOST_ERROR));

    let mut spec = f.spec("echo again");
    spec.steps = steps.clone();
    let (_keep, cancel) = bounded::<Stop>(1);
    let r = run(&spec, &cancel, |_, _| {});
    assert_eq!(r.outcome, TaskOutcome::Succeeded, "{r:?}");
    assert_eq!(r.output_tail, "again\n");
    let second = steps.pid().expect("a new supervisor runs");
    assert_ne!(first, second as i32);
    assert!(!is_alive(first), "the dead one was reaped");
}

#[test]
fn the_end_of_the_control_socket_kills_every_group() {
    // What the kernel does to the socket when the worker dies, however it dies.
    let f = Fixture::new();
    let steps = StepSupervisor::new(step_binary());
    let (runner, supervisor) = start_gated(&f, &steps);
    let sleep_pid = read_pid(&f.path("child.pid"));
    let sh_pid = read_pid(&f.path("sh.pid"));
    steps.shutdown();
    wait_within("the step's processes to die", GONE_WITHIN, || {
        !is_alive(sleep_pid) && !is_alive(sh_pid)
    });
    wait_within("the supervisor to exit", GONE_WITHIN, || {
        !is_alive(supervisor)
    });
    let r = runner.join().unwrap();
    assert_eq!(r.error.as_deref(), Some(SUPERVISOR_LOST_ERROR));
}

#[test]
fn signals_to_the_supervisor_alone_are_ignored_while_the_worker_lives() {
    let f = Fixture::new();
    let steps = StepSupervisor::new(step_binary());
    // Once the step runs, the supervisor's handlers are in place.
    let (runner, supervisor) = start_gated(&f, &steps);
    for signal in ["-TERM", "-INT", "-HUP", "-USR1", "-USR2", "-QUIT"] {
        send_signal(signal, supervisor);
    }
    std::fs::write(f.path("go"), "").unwrap();
    let r = runner.join().unwrap();
    assert_eq!(r.exit_code, Some(7), "the shell's exit code: {r:?}");
    assert!(is_alive(supervisor));
}

#[test]
fn the_end_of_the_starting_thread_does_not_kill_the_supervisor() {
    // PR_SET_PDEATHSIG fires when the *thread* that started the supervisor ends; the
    // supervisor must not mistake that for the worker's death.
    let f = Fixture::new();
    let steps = StepSupervisor::new(step_binary());
    let starter = steps.clone();
    std::thread::spawn(move || starter.ensure_started().unwrap())
        .join()
        .unwrap();
    let started = steps.pid().expect("started by the thread");
    let (runner, supervisor) = start_gated(&f, &steps);
    assert_eq!(supervisor, started as i32, "the same supervisor");
    std::fs::write(f.path("go"), "").unwrap();
    let r = runner.join().unwrap();
    assert_eq!(r.exit_code, Some(7), "{r:?}");
}

#[test]
fn the_worker_binary_supervises_steps_when_jobz_step_is_missing() {
    let f = Fixture::new();
    let mut spec = f.spec("echo hello; echo oops >&2; exit 3");
    spec.steps = StepSupervisor::new(worker_binary());
    let (_keep, cancel) = bounded::<Stop>(1);
    let r = run(&spec, &cancel, |_, _| {});
    assert_eq!((r.outcome, r.exit_code), (TaskOutcome::Failed, Some(3)));
    assert_eq!(r.output_tail, "hello\noops\n");
}

#[test]
fn the_supervisor_refuses_bad_arguments_and_hand_starts() {
    for binary in [step_binary(), worker_binary()] {
        let out = Command::new(&binary)
            .args([FLAG, "not-a-pid"])
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(worker::supervisor::EXIT_SUPERVISOR_FAILED)
        );
        assert!(String::from_utf8_lossy(&out.stderr).contains("not a worker pid"));
    }
    let out = Command::new(step_binary()).output().unwrap();
    assert!(!out.status.success());
    // Started with a pid that is not its parent's: it exits at once, running nothing.
    let out = Command::new(step_binary())
        .args([FLAG, "2"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
}

#[test]
fn the_supervisor_flag_is_not_in_the_help() {
    let out = Command::new(worker_binary())
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("--spool"), "{help}");
    assert!(!help.contains("supervise"), "{help}");
}
