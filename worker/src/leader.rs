//! The step leader: a small process between the worker and a task's shell, so that a
//! worker that dies, even by SIGKILL, takes its commands with it.
//!
//! [`crate::runner`] starts the worker's own binary as
//! `jobz-worker --lead-step <worker pid> <command>` ([`FLAG`]; not a documented flag) as
//! the leader of a new process group, with stdin a pipe whose write end only the worker
//! holds, stdout and stderr the task's output file, and the task's environment and working
//! directory. The leader starts `/bin/sh -c <command>` in its group (stdin `/dev/null`)
//! and waits for it. As soon as it learns that the worker is gone it sends SIGKILL to its
//! whole process group, itself included. It learns it two ways, whichever comes first:
//! - **end of file on stdin**: the kernel closes the worker's end of the pipe when the
//!   worker process dies, however it dies (also before the leader got to run);
//! - **its parent-death signal** (SIGTERM, set with `PR_SET_PDEATHSIG`), when its parent
//!   process has changed. The signal alone proves nothing: it also fires when the worker
//!   *thread* that spawned the leader ends, and SIGTERM also comes from the worker's own
//!   kill of the group on a timeout.
//!
//! Every other catchable termination signal (SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1,
//! SIGUSR2) is caught and ignored while the worker lives: on a timeout or cancel the worker
//! signals the whole group, the shell decides how to react, and the leader just waits for
//! it. When the shell ends, the leader ends the same way (same exit code, or killed by the
//! same signal), so the worker sees the shell's status. The worker then kills whatever the
//! command left behind in the group; the leader's pid, which is the group id, stays
//! reserved while the worker has not reaped it.
//!
//! Why the leader is in the group rather than the parent of a group led by the shell: the
//! worker can still time and kill the group itself (the leader is its child), and if the
//! leader is SIGKILLed on its own (by the OOM killer, an operator), the worker sees its
//! child end and kills the rest of the group.
//!
//! Not covered: a command that leaves the group (`setsid`, a daemonizing double fork into
//! a new group) escapes both the leader and the worker, as it did before.

use std::ffi::OsString;
use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, ExitStatus, Stdio};

use crossbeam_channel::unbounded;
use signal_hook::consts::{SIGHUP, SIGINT, SIGKILL, SIGQUIT, SIGTERM, SIGUSR1, SIGUSR2};

/// The first argument that makes `jobz-worker` a step leader.
pub const FLAG: &str = "--lead-step";

/// Exit code when the leader itself cannot work (bad arguments, no signal handling).
pub const EXIT_LEADER_FAILED: i32 = 125;

/// Exit code when `/bin/sh` cannot be started (as a shell reports a command not found).
pub const EXIT_NO_SHELL: i32 = 127;

/// Signals the leader catches; see the module docs.
const CAUGHT: [i32; 6] = [SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2];

enum Event {
    /// The worker is gone, for this reason.
    WorkerGone(&'static str),
    /// The shell ended.
    Exited(ExitStatus),
}

/// Runs the leader with the arguments after [`FLAG`]: `<worker pid> <command>`. Never
/// returns: the process ends like the shell, or by SIGKILL with its group.
pub fn main(args: Vec<OsString>) -> ! {
    let (worker_pid, command) = match parse_args(args) {
        Ok(parsed) => parsed,
        Err(e) => fail(&e),
    };
    become_group_leader();
    let (events_tx, events) = unbounded();

    // Handlers first, so that the parent-death signal never meets the default action.
    let mut signals = match signal_hook::iterator::Signals::new(CAUGHT) {
        Ok(signals) => signals,
        Err(e) => fail(&format!("cannot handle signals: {e}")),
    };
    set_parent_death_signal(SIGTERM);
    if std::os::unix::process::parent_id() != worker_pid {
        kill_group("the worker exited before the task started");
    }

    let mut child = match Command::new("/bin/sh")
        .arg("-c")
        .arg(&command)
        .stdin(Stdio::null())
        .spawn()
    {
        Ok(child) => child,
        Err(e) => {
            eprintln!("jobz-worker: cannot start /bin/sh: {e}");
            std::process::exit(EXIT_NO_SHELL);
        }
    };

    let tx = events_tx.clone();
    spawn("signals", move || {
        for _signal in signals.forever() {
            if std::os::unix::process::parent_id() != worker_pid {
                let _ = tx.send(Event::WorkerGone("the worker died (parent-death signal)"));
            }
            // Otherwise the worker signalled the group: the shell decides, we wait.
        }
    });
    let tx = events_tx.clone();
    spawn("control", move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = [0u8; 64];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => {} // nothing is sent on the pipe today; its end is the message
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        let _ = tx.send(Event::WorkerGone("the worker died (control pipe closed)"));
    });
    let tx = events_tx;
    spawn("wait", move || {
        if let Ok(status) = child.wait() {
            let _ = tx.send(Event::Exited(status));
        }
        // A failed wait on our own child cannot happen; if it did, the worker's death
        // still ends this process through the other events.
    });

    match events.recv() {
        Ok(Event::WorkerGone(why)) => kill_group(why),
        Ok(Event::Exited(status)) => end_like(status),
        Err(_) => kill_group("the leader lost track of the task"),
    }
}

fn parse_args(args: Vec<OsString>) -> Result<(u32, OsString), String> {
    let mut args = args.into_iter();
    let (Some(pid), Some(command), None) = (args.next(), args.next(), args.next()) else {
        return Err(format!("usage: jobz-worker {FLAG} <worker pid> <command>"));
    };
    let pid = pid
        .to_str()
        .and_then(|p| p.parse::<u32>().ok())
        .filter(|&p| p > 1)
        .ok_or_else(|| format!("{FLAG}: {pid:?} is not a worker pid"))?;
    Ok((pid, command))
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) {
    if let Err(e) = std::thread::Builder::new().name(name.into()).spawn(f) {
        // Without its watchers the leader cannot keep its promise: take the task down.
        eprintln!("jobz-worker: step leader cannot start a thread: {e}");
        kill_group("the step leader cannot watch the worker");
    }
}

fn fail(message: &str) -> ! {
    eprintln!("jobz-worker: step leader: {message}");
    std::process::exit(EXIT_LEADER_FAILED);
}

/// Makes this process the leader of a group of its own, unless it is one already (the
/// worker starts it so): [`kill_group`] must never reach a group it does not own.
fn become_group_leader() {
    let me = std::process::id() as libc::pid_t;
    // SAFETY: getpgrp and setpgid take and return plain integers and touch no memory.
    #[allow(unsafe_code)]
    let ok = unsafe { libc::getpgrp() == me || libc::setpgid(0, 0) == 0 };
    if !ok {
        fail(&format!(
            "cannot lead a process group: {}",
            std::io::Error::last_os_error()
        ));
    }
}

fn set_parent_death_signal(signal: i32) {
    // SAFETY: prctl(PR_SET_PDEATHSIG) takes integers only and changes a property of this
    // process; it has no memory effects.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, signal as libc::c_ulong, 0, 0, 0) };
    if rc != 0 {
        // The control pipe still reports the worker's death; the signal is a second way.
        eprintln!(
            "jobz-worker: step leader: cannot set the parent-death signal: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// SIGKILL to the whole group, this process included: the task dies with its worker.
fn kill_group(why: &str) -> ! {
    eprintln!("jobz-worker: {why}; killing the task's process group");
    let me = std::process::id() as libc::pid_t;
    // SAFETY: kill(2) takes integers and has no memory effects. `-me` is this process's own
    // group (see `become_group_leader`), so only the task's processes are reached.
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(-me, SIGKILL);
    }
    // SIGKILL to our own group includes us; this line is never reached.
    std::process::exit(EXIT_LEADER_FAILED);
}

/// Ends this process the way the shell ended: same exit code, or the same signal.
fn end_like(status: ExitStatus) -> ! {
    if let Some(code) = status.code() {
        std::process::exit(code);
    }
    if let Some(signal) = status.signal() {
        // No core file of the leader for a shell that dumped core: it would be the wrong one.
        let none = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: setrlimit reads the struct we own and changes a limit of this process.
        #[allow(unsafe_code)]
        unsafe {
            libc::setrlimit(libc::RLIMIT_CORE, &none);
        }
        // Restores the default action (also for signals caught above or ignored by the
        // Rust runtime, like SIGPIPE), unblocks the signal and raises it.
        let _ = signal_hook::low_level::emulate_default_handler(signal);
        std::process::exit(128 + signal);
    }
    std::process::exit(EXIT_LEADER_FAILED);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_are_a_worker_pid_and_one_command() {
        let args = |a: &[&str]| a.iter().map(OsString::from).collect::<Vec<_>>();
        let (pid, command) = parse_args(args(&["1234", "echo 'a b'"])).unwrap();
        assert_eq!(pid, 1234);
        assert_eq!(command, "echo 'a b'");
        assert!(parse_args(args(&["1234"])).is_err());
        assert!(parse_args(args(&["1234", "a", "b"])).is_err());
        assert!(parse_args(args(&["x", "true"])).is_err());
        assert!(
            parse_args(args(&["1", "true"])).is_err(),
            "init is nobody's worker"
        );
    }
}
