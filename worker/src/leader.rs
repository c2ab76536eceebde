//! The step leader: a small process between the worker and a task's shell, so that a
//! worker that dies, even by SIGKILL, takes its commands with it.
//!
//! [`crate::runner`] starts the worker's own binary as
//! `jobz-worker --lead-step <worker pid> [--max-output BYTES] [--run-as UID:GID:GROUPS]
//! <command>` ([`FLAG`]; not a documented flag) as the leader of a new process group, with
//! stdin a pipe whose write end only the worker holds, stdout and stderr the task's output
//! file, and the task's environment and working directory. With `--run-as` the leader
//! takes those credentials (supplementary groups, gid, uid: it never keeps root) before
//! anything of the task runs. It starts `/bin/sh -c <command>` in its group (stdin
//! `/dev/null`, stdout and stderr one pipe) and waits for it.
//!
//! **Output.** The leader copies the pipe into the output file, at most `--max-output`
//! bytes; beyond that it reads on and drops what it reads (the command neither blocks nor
//! dies of SIGPIPE) and, at the end, appends one line `[jobz: output truncated after N
//! bytes]` ([`crate::runner::truncation_marker`]). When the shell has ended the leader
//! copies what is still in the pipe (at most [`DRAIN_AFTER_EXIT`] more bytes: background
//! processes the worker is about to kill may hold it open) and ends. As soon as it learns that the worker is gone it sends SIGKILL to its
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
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, ExitStatus, Stdio};

use crossbeam_channel::unbounded;
use signal_hook::consts::{SIGHUP, SIGINT, SIGKILL, SIGQUIT, SIGTERM, SIGUSR1, SIGUSR2};

/// The small step-leader binary, installed beside `jobz-worker`.
pub const STEP_BINARY: &str = "jobz-step";

/// The program the worker starts as each step's leader: `jobz-step` when it is installed
/// beside the worker's binary (a small binary starts in about half the time of the
/// worker's own, which loads libzmq and libstdc++), else the worker's own binary. Either
/// is opened now and started through `/proc/self/fd/N`, so an upgrade that replaces the
/// files while this worker runs never pairs it with another version's leader.
pub fn program() -> std::path::PathBuf {
    static KEPT_OPEN: std::sync::OnceLock<Option<File>> = std::sync::OnceLock::new();
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(STEP_BINARY)));
    let opened = KEPT_OPEN.get_or_init(|| {
        open_step_binary(beside.as_deref()).or_else(|| File::open("/proc/self/exe").ok())
    });
    match opened {
        // Opened close-on-exec: `/proc/self/fd/N` still names it while the leader's
        // exec resolves the path, and no step inherits the descriptor.
        Some(file) => std::path::PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd())),
        None => std::path::PathBuf::from("/proc/self/exe"),
    }
}

/// The step binary at `path`, opened, if it is an executable file.
pub fn open_step_binary(path: Option<&std::path::Path>) -> Option<File> {
    use std::os::unix::fs::PermissionsExt;
    path.and_then(|path| File::open(path).ok()).filter(|file| {
        file.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

/// The first argument that makes `jobz-worker` a step leader.
pub const FLAG: &str = "--lead-step";

/// Leader option: keep at most this many bytes of the command's output.
pub const MAX_OUTPUT: &str = "--max-output";

/// Leader option: run the command with these credentials (`UID:GID:G1,G2,…`).
pub const RUN_AS: &str = "--run-as";

/// After the shell ended, at most this much more output is copied from the pipe.
pub const DRAIN_AFTER_EXIT: u64 = 1 << 20;

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
    /// The output was copied, as far as it will be.
    Copied,
}

/// What the worker asks of the leader.
#[derive(Debug, PartialEq)]
struct LeaderArgs {
    worker_pid: u32,
    max_output: u64,
    run_as: Option<crate::runner::Switch>,
    command: OsString,
}

/// Runs the leader with the arguments after [`FLAG`]: `<worker pid> [options] <command>`.
/// Never returns: the process ends like the shell, or by SIGKILL with its group.
pub fn main(args: Vec<OsString>) -> ! {
    let LeaderArgs {
        worker_pid,
        max_output,
        run_as,
        command,
    } = match parse_args(args) {
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
    if let Some(switch) = &run_as {
        if let Err(e) = take_credentials(switch) {
            fail(&format!(
                "cannot switch to uid {} gid {}: {e}",
                switch.uid, switch.gid
            ));
        }
    }
    // After the switch: a change of credentials clears the parent-death signal.
    set_parent_death_signal(SIGTERM);
    if std::os::unix::process::parent_id() != worker_pid {
        kill_group("the worker exited before the task started");
    }

    // The output file (our stdout) for the copier; the shell writes into a pipe.
    let sink = match std::io::stdout().as_fd().try_clone_to_owned() {
        Ok(fd) => File::from(fd),
        Err(e) => fail(&format!("cannot use the output file: {e}")),
    };
    let (output, output_writer) = match pipe() {
        Ok(ends) => ends,
        Err(e) => fail(&format!("cannot make the output pipe: {e}")),
    };
    // Closed when the shell has ended: tells the copier to finish.
    let (shell_done, shell_done_writer) = match pipe() {
        Ok(ends) => ends,
        Err(e) => fail(&format!("cannot make a pipe: {e}")),
    };
    let spawned = output_writer.try_clone().and_then(|stderr| {
        Command::new("/bin/sh")
            .arg("-c")
            .arg(&command)
            .stdin(Stdio::null())
            .stdout(output_writer)
            .stderr(stderr)
            .spawn()
    }); // the Command is dropped here, and our ends of the pipe with it
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) => {
            eprintln!("jobz-worker: cannot start /bin/sh: {e}");
            std::process::exit(EXIT_NO_SHELL);
        }
    };

    let tx = events_tx.clone();
    spawn("output", move || {
        let mut capped = CappedOutput::new(sink, max_output);
        copy_output(&output, &shell_done, &mut capped);
        capped.finish();
        let _ = tx.send(Event::Copied);
    });

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
            drop(shell_done_writer);
            let _ = tx.send(Event::Exited(status));
        }
        // A failed wait on our own child cannot happen; if it did, the worker's death
        // still ends this process through the other events.
    });

    let mut exited = None;
    let mut copied = false;
    loop {
        match events.recv() {
            Ok(Event::WorkerGone(why)) => kill_group(why),
            Ok(Event::Exited(status)) => exited = Some(status),
            Ok(Event::Copied) => copied = true,
            Err(_) => kill_group("the leader lost track of the task"),
        }
        if let (Some(status), true) = (exited, copied) {
            end_like(status);
        }
    }
}

fn parse_args(args: Vec<OsString>) -> Result<LeaderArgs, String> {
    let usage = || {
        format!(
            "usage: jobz-worker {FLAG} <worker pid> [{MAX_OUTPUT} BYTES] \
             [{RUN_AS} UID:GID:GROUPS] <command>"
        )
    };
    let mut args: Vec<OsString> = args;
    let command = args.pop().ok_or_else(usage)?;
    let mut args = args.into_iter();
    let pid = args.next().ok_or_else(usage)?;
    let worker_pid = pid
        .to_str()
        .and_then(|p| p.parse::<u32>().ok())
        .filter(|&p| p > 1)
        .ok_or_else(|| format!("{FLAG}: {pid:?} is not a worker pid"))?;
    let mut parsed = LeaderArgs {
        worker_pid,
        max_output: u64::MAX,
        run_as: None,
        command,
    };
    while let Some(option) = args.next() {
        let value = args.next().ok_or_else(usage)?;
        let value = value.to_str().ok_or_else(usage)?;
        match option.to_str() {
            Some(MAX_OUTPUT) => {
                parsed.max_output = value
                    .parse()
                    .map_err(|_| format!("{MAX_OUTPUT}: {value:?} is not a byte count"))?
            }
            Some(RUN_AS) => {
                parsed.run_as = Some(
                    crate::runner::Switch::parse_arg(value)
                        .ok_or_else(|| format!("{RUN_AS}: {value:?} is not UID:GID:GROUPS"))?,
                )
            }
            _ => return Err(usage()),
        }
    }
    Ok(parsed)
}

/// Takes the credentials of `switch` for good: supplementary groups, then the group, then
/// the user (in this order: each step needs the privilege the next one drops), and checks
/// that root cannot be taken back.
fn take_credentials(switch: &crate::runner::Switch) -> std::io::Result<()> {
    let last = || Err(std::io::Error::last_os_error());
    let groups: Vec<libc::gid_t> = switch.groups.clone();
    // SAFETY: setgroups reads `groups.len()` ids from a buffer we own; setgid and setuid
    // take integers. None has other memory effects. The leader has no other threads yet
    // that could run with mixed credentials (glibc applies set*id to all threads anyway).
    #[allow(unsafe_code)]
    unsafe {
        if libc::setgroups(groups.len(), groups.as_ptr()) != 0 {
            return last();
        }
        if libc::setgid(switch.gid) != 0 {
            return last();
        }
        if libc::setuid(switch.uid) != 0 {
            return last();
        }
    }
    // SAFETY: the get*id calls take nothing and cannot fail; setuid(0) only tests that
    // root is gone for good (it must fail for any other uid).
    #[allow(unsafe_code)]
    let held = unsafe {
        libc::getuid() == switch.uid
            && libc::geteuid() == switch.uid
            && libc::getgid() == switch.gid
            && libc::getegid() == switch.gid
            && (switch.uid == 0 || libc::setuid(0) != 0)
    };
    if !held {
        return Err(std::io::Error::other("the new credentials did not hold"));
    }
    Ok(())
}

/// A pipe, both ends close-on-exec (the shell gets the write end as its stdout and stderr,
/// which clears the flag on those two).
fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: pipe2 writes two descriptors into the array we own.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded: both descriptors are open and owned by nobody else.
    #[allow(unsafe_code)]
    let ends = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    Ok(ends)
}

/// Copies the command's output from `pipe` into `out` until the pipe ends, or until
/// `shell_done` is closed and the pipe has nothing more to read right now (then at most
/// [`DRAIN_AFTER_EXIT`] bytes more are taken).
fn copy_output<W: Write>(pipe: &OwnedFd, shell_done: &OwnedFd, out: &mut CappedOutput<W>) {
    let mut reader = match pipe.try_clone() {
        Ok(fd) => File::from(fd),
        Err(_) => return,
    };
    let mut buf = vec![0u8; 64 * 1024];
    let mut after_exit: Option<u64> = None;
    loop {
        let mut fds = [
            libc::pollfd {
                fd: pipe.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: shell_done.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // Once the shell is gone, only look whether something is ready now.
        let (count, timeout) = match after_exit {
            Some(_) => (1, 0),
            None => (2, -1),
        };
        // SAFETY: poll reads and writes `count` pollfd entries of the array we own.
        #[allow(unsafe_code)]
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), count, timeout) };
        if rc < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        if fds[0].revents != 0 {
            match reader.read(&mut buf) {
                Ok(0) => return, // every writer is gone
                Ok(n) => {
                    out.feed(&buf[..n]);
                    if let Some(taken) = &mut after_exit {
                        *taken += n as u64;
                        if *taken >= DRAIN_AFTER_EXIT {
                            return;
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
            continue;
        }
        if after_exit.is_some() {
            return; // the shell ended and nothing more is waiting in the pipe
        }
        if fds[1].revents != 0 {
            after_exit = Some(0);
        }
    }
}

/// Writes at most `limit` bytes to its sink, counts the rest, and marks a cut at the end.
pub struct CappedOutput<W: Write> {
    sink: W,
    limit: u64,
    kept: u64,
    seen: u64,
    last: Option<u8>,
    broken: bool,
}

impl<W: Write> CappedOutput<W> {
    /// Keeps at most `limit` bytes in `sink`.
    pub fn new(sink: W, limit: u64) -> Self {
        CappedOutput {
            sink,
            limit,
            kept: 0,
            seen: 0,
            last: None,
            broken: false,
        }
    }

    /// Takes the next piece of output.
    pub fn feed(&mut self, bytes: &[u8]) {
        self.seen = self.seen.saturating_add(bytes.len() as u64);
        let room = self.limit.saturating_sub(self.kept);
        let take = bytes.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        if take == 0 || self.broken {
            return;
        }
        match self.sink.write_all(&bytes[..take]) {
            Ok(()) => {
                self.kept += take as u64;
                self.last = bytes[..take].last().copied();
            }
            // A full disk: the command still runs to its end, its output is lost.
            Err(_) => self.broken = true,
        }
    }

    /// The output ended: appends the marker line if it was cut. Returns the number of
    /// bytes kept if it was.
    pub fn finish(&mut self) -> Option<u64> {
        if self.seen <= self.limit {
            return None;
        }
        let mut marker = String::new();
        if self.last.is_some_and(|b| b != b'\n') {
            marker.push('\n'); // the marker has a line of its own
        }
        marker.push_str(&crate::runner::truncation_marker(self.kept));
        let _ = self.sink.write_all(marker.as_bytes());
        Some(self.kept)
    }

    /// The sink.
    pub fn into_inner(self) -> W {
        self.sink
    }
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
    fn arguments_are_a_worker_pid_options_and_one_command() {
        let args = |a: &[&str]| a.iter().map(OsString::from).collect::<Vec<_>>();
        let parsed = parse_args(args(&["1234", "echo 'a b'"])).unwrap();
        assert_eq!(parsed.worker_pid, 1234);
        assert_eq!(parsed.command, "echo 'a b'");
        assert_eq!(parsed.max_output, u64::MAX);
        assert_eq!(parsed.run_as, None);
        let parsed = parse_args(args(&[
            "1234",
            MAX_OUTPUT,
            "100",
            RUN_AS,
            "65534:65534:",
            "id",
        ]))
        .unwrap();
        assert_eq!(parsed.max_output, 100);
        assert_eq!(parsed.run_as.unwrap().uid, 65534);
        assert_eq!(parsed.command, "id");
        assert!(parse_args(args(&["1234"])).is_err());
        assert!(parse_args(args(&["1234", "a", "b"])).is_err());
        assert!(parse_args(args(&["1234", MAX_OUTPUT, "x", "true"])).is_err());
        assert!(parse_args(args(&["1234", RUN_AS, "root", "true"])).is_err());
        assert!(parse_args(args(&["1234", MAX_OUTPUT, "true"])).is_err());
        assert!(parse_args(args(&["x", "true"])).is_err());
        assert!(
            parse_args(args(&["1", "true"])).is_err(),
            "init is nobody's worker"
        );
    }

    #[test]
    fn output_beyond_the_limit_is_dropped_and_marked_once() {
        let mut out = CappedOutput::new(Vec::new(), 10);
        out.feed(b"12345");
        out.feed(b"67890abc");
        out.feed(&[b'x'; 100_000]);
        assert_eq!(out.finish(), Some(10));
        let text = String::from_utf8(out.into_inner()).unwrap();
        assert_eq!(
            text,
            "1234567890\n[jobz: output truncated after 10 bytes]\n"
        );

        let mut out = CappedOutput::new(Vec::new(), 4);
        out.feed(b"abc\nd");
        assert_eq!(out.finish(), Some(4));
        assert_eq!(
            out.into_inner(),
            b"abc\n[jobz: output truncated after 4 bytes]\n"
        );
    }

    #[test]
    fn output_within_the_limit_is_kept_as_it_is() {
        let mut out = CappedOutput::new(Vec::new(), 10);
        out.feed(b"0123456789");
        assert_eq!(out.finish(), None);
        assert_eq!(out.into_inner(), b"0123456789");
    }

    #[test]
    fn a_failing_sink_stops_writing_but_not_counting() {
        struct Full;
        impl Write for Full {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                Err(std::io::Error::other("disk full"))
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut out = CappedOutput::new(Full, 10);
        out.feed(b"abc");
        out.feed(&[0; 100]);
        assert_eq!(out.finish(), Some(0));
    }
}
