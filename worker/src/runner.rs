//! Running one command: step leader, process group, output file, working directory,
//! timeout and kill.
//!
//! [`run`] blocks until the command has ended and its process group is gone, so the service
//! calls it on a thread of its own per task. The worker's own binary is started as the
//! task's step leader ([`crate::leader`]) in a new process group, stdin a pipe the leader
//! watches (the worker's death closes it and the leader kills the group), stdout and stderr
//! appended to one file, in a fresh working directory that is removed afterwards. The
//! leader runs `/bin/sh -c <rendered>` in the same group and ends the way the shell ends.
//!
//! The leader is waited for with `waitid(WNOWAIT)`, which leaves it a zombie until the
//! group has been signalled: its pid, and so the group id, cannot be reused while this
//! module may still send signals to it. Whatever the command left running in its group when
//! it ends (background children) is killed: a task owns nothing after it has finished.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crossbeam_channel::{after, bounded, never, select, Receiver};
use jobz::message::TaskOutcome;
use tracing::warn;

/// How much of the output's end goes into a task's result.
pub const OUTPUT_TAIL_BYTES: usize = 4096;

/// Environment variables a command must not inherit from the worker: they describe a task.
const TASK_ENV_PREFIX: &str = "JOBZ_PARAM_";

/// What to run and how.
#[derive(Debug, Clone)]
pub struct RunSpec {
    /// The rendered command, given to `/bin/sh -c`.
    pub command: String,
    /// The step leader's program: the worker's own binary (`/proc/self/exe`).
    pub leader: PathBuf,
    /// Variables added to the worker's own environment.
    pub env: Vec<(String, String)>,
    /// Output file; stdout and stderr are both appended to it. Its directory is created.
    pub output: PathBuf,
    /// Working directory, created fresh (an old one is removed first) and removed after.
    pub workdir: PathBuf,
    /// Kill the process group after this long.
    pub timeout: Option<Duration>,
    /// Between SIGTERM and SIGKILL when the group is killed.
    pub kill_grace: Duration,
}

/// How a command ended.
#[derive(Debug, Clone, PartialEq)]
pub struct RunResult {
    /// Succeeded (exit 0), failed, or timed out.
    pub outcome: TaskOutcome,
    /// Exit code, if the shell exited (none if a signal ended it or it never started).
    pub exit_code: Option<i32>,
    /// Why it failed, when that is more than the exit code.
    pub error: Option<String>,
    /// When it started (or failed to), ms since the epoch.
    pub started_at_ms: i64,
    /// When it ended, ms since the epoch.
    pub finished_at_ms: i64,
    /// How long it ran.
    pub elapsed: Duration,
    /// The end of this run's output, lossy UTF-8, at most [`OUTPUT_TAIL_BYTES`].
    pub output_tail: String,
    /// False if the command could not be started at all.
    pub started: bool,
}

impl RunResult {
    /// A task that failed before any process ran, with its reason.
    pub fn not_started(error: String) -> RunResult {
        let now = jobz::now_ms();
        RunResult {
            outcome: TaskOutcome::Failed,
            exit_code: None,
            error: Some(error),
            started_at_ms: now,
            finished_at_ms: now,
            elapsed: Duration::ZERO,
            output_tail: String::new(),
            started: false,
        }
    }
}

/// Why the runner killed a command before it ended by itself.
enum Kill {
    Timeout(Duration),
    Cancel(String),
}

/// Runs `spec` to its end. `on_started` is called with the start time once the process is
/// running. A message on `cancel` kills the process group and makes the task fail with that
/// message as its error (a dropped sender cancels nothing).
pub fn run(spec: &RunSpec, cancel: &Receiver<String>, on_started: impl FnOnce(i64)) -> RunResult {
    let prepared = prepare_workdir(&spec.workdir).and_then(|()| open_output(&spec.output));
    let (output, offset) = match prepared {
        Ok(x) => x,
        Err(e) => {
            remove_workdir(&spec.workdir);
            return RunResult::not_started(e);
        }
    };
    let result = run_in(spec, output, offset, cancel, on_started);
    remove_workdir(&spec.workdir);
    result
}

fn run_in(
    spec: &RunSpec,
    output: File,
    offset: u64,
    cancel: &Receiver<String>,
    on_started: impl FnOnce(i64),
) -> RunResult {
    let mut child = match spawn(spec, output) {
        Ok(child) => child,
        Err(e) => {
            return RunResult::not_started(format!(
                "cannot start the step leader {}: {e}",
                spec.leader.display()
            ))
        }
    };
    // Held until the leader has ended: closing it tells the leader the worker is gone.
    let control = child.stdin.take();
    let started_at_ms = jobz::now_ms();
    let start = Instant::now();
    on_started(started_at_ms);
    let pgid = child.id() as i32;

    // A thread waits for the leader without reaping it (see the module docs).
    let (exited_tx, exited) = bounded(1);
    let waiter = std::thread::Builder::new()
        .name(format!("wait-{pgid}"))
        .spawn(move || {
            wait_no_reap(pgid);
            let _ = exited_tx.send(());
        });
    if let Err(e) = waiter {
        // Without a waiter there is no safe way to time the command: stop it now.
        signal_group(pgid, libc::SIGKILL);
        let _ = child.wait();
        drop(control);
        return finish(
            spec,
            offset,
            started_at_ms,
            start,
            None,
            Some(Kill::Cancel(format!("cannot watch the command: {e}"))),
        );
    }

    let deadline = spec.timeout.map(|t| start + t);
    let timer = deadline.map(crossbeam_channel::at).unwrap_or_else(never);
    let mut cancel = cancel.clone();
    let mut kill = None;
    loop {
        select! {
            recv(exited) -> _ => break,
            recv(timer) -> _ => {
                kill = spec.timeout.map(Kill::Timeout);
                break;
            }
            recv(cancel) -> reason => match reason {
                Ok(reason) => {
                    kill = Some(Kill::Cancel(reason));
                    break;
                }
                Err(_) => cancel = never(),
            },
        }
    }
    if kill.is_some() {
        signal_group(pgid, libc::SIGTERM);
        select! {
            recv(exited) -> _ => {}
            recv(after(spec.kill_grace)) -> _ => {
                signal_group(pgid, libc::SIGKILL);
                let _ = exited.recv();
            }
        }
    }
    // The leader is a zombie now: its group id is still ours. Leftovers of the group die.
    signal_group(pgid, libc::SIGKILL);
    let status = match child.wait() {
        Ok(status) => Some(status),
        Err(e) => {
            warn!(pid = pgid, error = %e, "cannot reap the command");
            None
        }
    };
    drop(control);
    finish(spec, offset, started_at_ms, start, status, kill)
}

fn finish(
    spec: &RunSpec,
    offset: u64,
    started_at_ms: i64,
    start: Instant,
    status: Option<std::process::ExitStatus>,
    kill: Option<Kill>,
) -> RunResult {
    let elapsed = start.elapsed();
    let exit_code = status.and_then(|s| s.code());
    let (outcome, error) = match (kill, status) {
        (Some(Kill::Timeout(t)), _) => (
            TaskOutcome::TimedOut,
            Some(format!("timed out after {}", humantime::format_duration(t))),
        ),
        (Some(Kill::Cancel(reason)), _) => (TaskOutcome::Failed, Some(reason)),
        (None, Some(s)) if s.success() => (TaskOutcome::Succeeded, None),
        (None, Some(s)) => match s.signal() {
            Some(sig) => (TaskOutcome::Failed, Some(format!("killed by signal {sig}"))),
            None => (TaskOutcome::Failed, None),
        },
        (None, None) => (
            TaskOutcome::Failed,
            Some("the command's exit status is unknown".into()),
        ),
    };
    RunResult {
        outcome,
        exit_code,
        error,
        started_at_ms,
        finished_at_ms: jobz::now_ms(),
        elapsed,
        output_tail: output_tail(&spec.output, offset),
        started: true,
    }
}

fn spawn(spec: &RunSpec, output: File) -> std::io::Result<Child> {
    let stderr = output.try_clone()?;
    let mut command = Command::new(&spec.leader);
    command
        .arg(crate::leader::FLAG)
        .arg(std::process::id().to_string())
        .arg(&spec.command)
        .stdin(Stdio::piped())
        .stdout(output)
        .stderr(stderr)
        .current_dir(&spec.workdir);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with(TASK_ENV_PREFIX) {
            command.env_remove(name);
        }
    }
    command.envs(spec.env.iter().map(|(k, v)| (k, v)));
    // A group of its own, led by the step leader, so a timeout kills the command's
    // children too, and the leader can kill them all if the worker dies.
    command.process_group(0);
    command.spawn()
}

/// Sends `signal` to every process of group `pgid`. A group already gone is not an error.
fn signal_group(pgid: i32, signal: libc::c_int) {
    if pgid <= 1 {
        return; // never signal "every process" or init's group
    }
    // SAFETY: kill(2) takes plain integers and has no memory effects. The group id is the
    // leader's pid, which stays reserved while the leader is an unreaped zombie.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::kill(-pgid, signal) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ESRCH) {
            warn!(pgid, signal, error = %e, "cannot signal a command's process group");
        }
    }
}

/// Blocks until process `pid` (our child) has exited, without reaping it.
fn wait_no_reap(pid: i32) {
    loop {
        // SAFETY: waitid writes only into the siginfo we own, which is plain old data and
        // valid when zeroed.
        #[allow(unsafe_code)]
        let rc = unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT,
            )
        };
        if rc == 0 {
            return;
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            // ECHILD: already reaped or not ours; nothing left to wait for.
            return;
        }
    }
}

fn prepare_workdir(dir: &Path) -> Result<(), String> {
    if dir.exists() {
        std::fs::remove_dir_all(dir)
            .map_err(|e| format!("cannot clear working directory {}: {e}", dir.display()))?;
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| format!("cannot create working directory {}: {e}", dir.display()))
}

fn remove_workdir(dir: &Path) {
    if let Err(e) = std::fs::remove_dir_all(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            warn!(dir = %dir.display(), error = %e, "cannot remove a task's working directory");
        }
    }
}

/// Opens the output file for appending; returns it and its length before this run.
fn open_output(path: &Path) -> Result<(File, u64), String> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| format!("cannot create output directory {}: {e}", parent.display()))?;
    }
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| format!("cannot open output file {}: {e}", path.display()))?;
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    Ok((file, len))
}

/// The last [`OUTPUT_TAIL_BYTES`] of the file written after `offset`; empty (and a warning)
/// if it cannot be read.
pub fn output_tail(path: &Path, offset: u64) -> String {
    let read = || -> std::io::Result<Vec<u8>> {
        let mut file = File::open(path)?;
        let len = file.metadata()?.len();
        let from = len
            .saturating_sub(OUTPUT_TAIL_BYTES as u64)
            .max(offset.min(len));
        file.seek(SeekFrom::Start(from))?;
        let mut bytes = Vec::with_capacity((len - from) as usize);
        file.take(OUTPUT_TAIL_BYTES as u64)
            .read_to_end(&mut bytes)?;
        Ok(bytes)
    };
    match read() {
        Ok(bytes) => tail_text(&bytes),
        Err(e) => {
            warn!(file = %path.display(), error = %e, "cannot read a command's output");
            String::new()
        }
    }
}

/// Lossy UTF-8 of the end of `bytes`, starting at a character boundary.
pub fn tail_text(bytes: &[u8]) -> String {
    let tail = &bytes[bytes.len().saturating_sub(OUTPUT_TAIL_BYTES)..];
    // Skip the continuation bytes of a character cut by the window (at most three).
    let cut = tail
        .iter()
        .take(3)
        .take_while(|&&b| b & 0xC0 == 0x80)
        .count();
    String::from_utf8_lossy(&tail[cut..]).into_owned()
}

#[cfg(test)]
mod tests {
    // Tests that run commands are in `tests/it/runner.rs`: they need the `jobz-worker`
    // binary as the step leader, which only integration tests can name.
    use super::*;

    fn spec(dir: &Path) -> RunSpec {
        RunSpec {
            command: "true".into(),
            leader: dir.join("no-such-leader"),
            env: vec![],
            output: dir.join("runs/r1/job.t1.1.log"),
            workdir: dir.join("work/t1.1"),
            timeout: None,
            kill_grace: Duration::from_millis(300),
        }
    }

    #[test]
    fn an_output_file_that_cannot_be_opened_fails_without_starting() {
        let dir = tempfile::tempdir().unwrap();
        let mut spec = spec(dir.path());
        std::fs::write(dir.path().join("file"), "").unwrap();
        spec.output = dir.path().join("file/sub/out.log");
        let mut called = false;
        let (_keep, cancel) = bounded::<String>(1);
        let r = run(&spec, &cancel, |_| called = true);
        assert!(!called);
        assert!(!r.started);
        assert_eq!(r.outcome, TaskOutcome::Failed);
        assert!(r.error.unwrap().contains("output directory"));
        assert!(!spec.workdir.exists());
    }

    #[test]
    fn a_missing_leader_fails_the_task_without_starting_it() {
        let dir = tempfile::tempdir().unwrap();
        let spec = spec(dir.path());
        let mut called = false;
        let (_keep, cancel) = bounded::<String>(1);
        let r = run(&spec, &cancel, |_| called = true);
        assert!(!called);
        assert!(!r.started);
        let error = r.error.unwrap();
        assert!(error.contains("cannot start the step leader"), "{error}");
        assert!(error.contains("no-such-leader"), "{error}");
        assert!(!spec.workdir.exists());
    }

    #[test]
    fn the_tail_of_bytes_starts_at_a_char_boundary() {
        let mut bytes = "é".repeat(3000).into_bytes(); // 2 bytes each
        bytes.push(b'!');
        let tail = tail_text(&bytes);
        assert!(tail.len() <= OUTPUT_TAIL_BYTES);
        assert!(!tail.contains('\u{FFFD}'), "cut inside a character");
        assert!(tail.ends_with("é!"));
        assert_eq!(tail_text(b"short"), "short");
        assert_eq!(tail_text(b"\xff\xfebad"), "\u{FFFD}\u{FFFD}bad");
    }

    #[test]
    fn the_output_tail_is_what_this_run_wrote() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.log");
        std::fs::write(&path, "previous run\nthis run\n").unwrap();
        assert_eq!(output_tail(&path, 13), "this run\n");
        assert_eq!(output_tail(&path, 0), "previous run\nthis run\n");
        assert_eq!(output_tail(&dir.path().join("missing"), 0), "");
    }
}
