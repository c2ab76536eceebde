//! The step supervisor: one small long-lived process per worker that starts every step's
//! shell, copies its output, and takes every step down with the worker.
//!
//! **Why a process of its own.** The worker is multi-threaded, so it may only start a
//! program with a fresh `exec`, and a process between it and each shell was the way to
//! make a shell's whole process group die with the worker (an exec'd step leader per
//! step: about 1.3 ms of CPU and 1 ms of latency per step here, more than `sh` itself).
//! The supervisor is exec'd once, when the worker starts (`jobz-step --supervise-steps
//! <worker pid>`, [`FLAG`]; the worker's own binary takes the same hidden flag when
//! `jobz-step` is not installed beside it). It is single-threaded, so it may fork freely,
//! and it runs nothing of a step itself.
//!
//! **What it does per step** ([`SpawnRequest`] from the worker over a socket pair, its
//! stdin): opens the output file (append), starts `/bin/sh -c <command>` as the leader of
//! a new process group, with stdin `/dev/null`, stdout and stderr one pipe, the step's
//! environment and working directory, and, for `run_as`, the user's supplementary groups,
//! group and user taken before the shell runs (it never keeps root; the switch is checked).
//! It copies the pipe into the file, at most `max_output` bytes, then reads on and drops
//! the rest (the command neither blocks nor dies of SIGPIPE) and appends one line
//! `[jobz: output truncated after N bytes]` at the end. When the shell has ended (seen with
//! `waitid(WNOWAIT)`: the zombie keeps the group id reserved), it copies what is still in
//! the pipe (at most [`DRAIN_AFTER_EXIT`] more bytes), kills whatever the command left in
//! its group, reaps the shell and reports its status. Signals asked for by the worker
//! (timeout, cancel) go to the whole group.
//!
//! **Whoever dies, the steps die.**
//! - The worker dies, however (also SIGKILL): the kernel closes its end of the socket; the
//!   supervisor reads the end of file, sends SIGKILL to every step's group and exits. A
//!   parent-death signal (SIGTERM) is a second way: on it, or any other catchable
//!   termination signal, the supervisor checks whether its parent is still the worker
//!   (the signal also fires when the worker *thread* that started it ends) and otherwise
//!   acts the same. While the worker lives, those signals are ignored: the worker decides.
//! - The supervisor dies alone (the OOM killer, an operator): the worker reads the end of
//!   file, kills every group it was told of, fails those steps with
//!   [`SUPERVISOR_LOST_ERROR`], and starts a new supervisor for the next step.
//!
//! Not covered: a command that leaves its group (`setsid`, a daemonizing double fork)
//! escapes, as it escapes timeouts; both processes killed at the same instant leave the
//! steps running (systemd's control group still ends them with the service).
//!
//! The supervisor is not dumpable and starts with an empty environment: a step running as
//! the worker's user can read neither its memory (other steps' variables) nor the worker's
//! environment through it.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crossbeam_channel::{bounded, unbounded, Receiver, Sender};
use serde::{Deserialize, Serialize};
use signal_hook::consts::{SIGCHLD, SIGHUP, SIGINT, SIGKILL, SIGQUIT, SIGTERM, SIGUSR1, SIGUSR2};
use tracing::{error, warn};

use crate::runner::Switch;

/// The small binary that serves as step supervisor, installed beside `jobz-worker`.
pub const STEP_BINARY: &str = "jobz-step";

/// The first argument that makes `jobz-step` (or `jobz-worker`) a step supervisor.
pub const FLAG: &str = "--supervise-steps";

/// After the shell ended, at most this much more output is copied from the pipe.
pub const DRAIN_AFTER_EXIT: u64 = 1 << 20;

/// Exit code when the supervisor cannot work (bad arguments, no signal handling).
pub const EXIT_SUPERVISOR_FAILED: i32 = 125;

/// The error of a step whose supervisor died under it.
pub const SUPERVISOR_LOST_ERROR: &str =
    "the step supervisor died; the command's processes were killed";

/// A frame between worker and supervisor is at most this long (a step's command and
/// environment; far above what a job file may hold).
const MAX_FRAME: usize = 64 << 20;

/// How long the worker waits for the supervisor to say a step started.
const START_ANSWER_WITHIN: Duration = Duration::from_secs(30);

/// Signals the supervisor catches; see the module docs.
const CAUGHT: [i32; 7] = [SIGCHLD, SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2];

// ---- What worker and supervisor say --------------------------------------------------------

/// Start one step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpawnRequest {
    /// Chosen by the worker, unique for the supervisor's life.
    pub id: u64,
    /// Given to `/bin/sh -c`.
    pub command: String,
    /// The whole environment (names and values as bytes).
    pub env: Vec<(Vec<u8>, Vec<u8>)>,
    /// Working directory (bytes of the path).
    pub workdir: Vec<u8>,
    /// Output file, appended to (bytes of the path).
    pub output: Vec<u8>,
    /// Output kept at most.
    pub max_output: u64,
    /// Credentials to take, [`Switch::to_arg`]'s form.
    pub run_as: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Request {
    Spawn(SpawnRequest),
    Signal { id: u64, signal: i32 },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Reply {
    Started {
        id: u64,
        pgid: i32,
    },
    NotStarted {
        id: u64,
        error: String,
    },
    /// The shell's raw wait status; its group is gone.
    Exited {
        id: u64,
        wait_status: i32,
    },
}

fn write_frame<T: Serialize>(out: &mut impl Write, value: &T) -> std::io::Result<()> {
    let body = rmp_serde::to_vec(value).map_err(std::io::Error::other)?;
    if body.len() > MAX_FRAME {
        return Err(std::io::Error::other(format!(
            "a frame of {} bytes is over the limit of {MAX_FRAME}",
            body.len()
        )));
    }
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
    frame.extend_from_slice(&body);
    out.write_all(&frame)
}

/// The next frame's body; `None` at a clean end of file (between frames).
fn read_frame(input: &mut impl Read) -> std::io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < len.len() {
        match input.read(&mut len[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(std::io::Error::other(format!(
            "a frame of {len} bytes is over the limit of {MAX_FRAME}"
        )));
    }
    let mut body = vec![0u8; len];
    input.read_exact(&mut body)?;
    Ok(Some(body))
}

fn decode<T: for<'de> Deserialize<'de>>(body: &[u8]) -> std::io::Result<T> {
    rmp_serde::from_slice(body).map_err(std::io::Error::other)
}

// ---- The worker's side ------------------------------------------------------------------------

/// The program the worker starts as its step supervisor: `jobz-step` when it is installed
/// beside the worker's binary (a small binary without libzmq), else the worker's own. It
/// is opened once and started through `/proc/self/fd/N`, so an upgrade that replaces the
/// files while this worker runs never pairs it with another version's supervisor.
pub fn program() -> PathBuf {
    static KEPT_OPEN: std::sync::OnceLock<Option<File>> = std::sync::OnceLock::new();
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(STEP_BINARY)));
    let opened = KEPT_OPEN.get_or_init(|| {
        open_step_binary(beside.as_deref()).or_else(|| File::open("/proc/self/exe").ok())
    });
    match opened {
        // Opened close-on-exec: `/proc/self/fd/N` still names it while the exec resolves
        // the path, and no step inherits the descriptor.
        Some(file) => PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd())),
        None => PathBuf::from("/proc/self/exe"),
    }
}

/// The step binary at `path`, opened, if it is an executable file.
pub fn open_step_binary(path: Option<&Path>) -> Option<File> {
    use std::os::unix::fs::PermissionsExt;
    path.and_then(|path| File::open(path).ok()).filter(|file| {
        file.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

/// What the worker hears about one step.
#[derive(Debug, Clone, PartialEq)]
pub enum StepEvent {
    /// The shell ended this way; its group is gone.
    Exited(ExitStatus),
    /// The supervisor died; the step's group was killed.
    Lost,
}

/// The worker's handle on its supervisor, started on first use and again after it died.
pub struct StepSupervisor {
    program: PathBuf,
    link: Mutex<Option<Arc<Link>>>,
    next_id: AtomicU64,
}

impl std::fmt::Debug for StepSupervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StepSupervisor")
            .field("program", &self.program)
            .finish_non_exhaustive()
    }
}

/// One running supervisor process.
struct Link {
    writer: Mutex<UnixStream>,
    steps: Mutex<HashMap<u64, Watched>>,
    alive: AtomicBool,
    pid: u32,
    /// Set once the supervisor is reaped: its pid may then be another process's.
    reaped: Mutex<bool>,
}

/// A step the worker waits for.
struct Watched {
    /// Until the answer to the spawn request: its group id, or why it did not start.
    started: Option<Sender<Result<i32, String>>>,
    events: Sender<StepEvent>,
    pgid: Option<i32>,
}

/// A step the supervisor started.
pub struct Step {
    id: u64,
    pgid: i32,
    link: Arc<Link>,
    /// Its one [`StepEvent`].
    pub events: Receiver<StepEvent>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere while holding the lock leaves plain data, still consistent.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl StepSupervisor {
    /// A supervisor that will run `program` (see [`program`]); nothing starts yet.
    pub fn new(program: PathBuf) -> Arc<StepSupervisor> {
        Arc::new(StepSupervisor {
            program,
            link: Mutex::new(None),
            next_id: AtomicU64::new(1),
        })
    }

    /// Starts the supervisor now if it is not running (the worker does this at start, so
    /// that the first step does not wait for it and a broken installation shows at once).
    pub fn ensure_started(&self) -> Result<(), String> {
        self.link().map(drop)
    }

    /// The supervisor's pid, if it runs.
    pub fn pid(&self) -> Option<u32> {
        lock(&self.link)
            .as_ref()
            .filter(|link| link.alive.load(Ordering::SeqCst))
            .map(|link| link.pid)
    }

    fn link(&self) -> Result<Arc<Link>, String> {
        let mut current = lock(&self.link);
        if let Some(link) = current.as_ref().filter(|l| l.alive.load(Ordering::SeqCst)) {
            return Ok(link.clone());
        }
        let link = Link::start(&self.program)?;
        *current = Some(link.clone());
        Ok(link)
    }

    /// Ends the supervisor as the worker's death would: it reads the end of file, kills
    /// every step's group and exits; their runners hear [`StepEvent::Lost`]. The next
    /// [`StepSupervisor::start`] starts a new one.
    pub fn shutdown(&self) {
        if let Some(link) = lock(&self.link).take() {
            let _ = lock(&link.writer).shutdown(std::net::Shutdown::Both);
        }
    }

    /// Starts a step; returns once its shell runs, or why it did not start.
    pub fn start(&self, mut request: SpawnRequest) -> Result<Step, String> {
        // A supervisor that died since the last step is replaced; one that dies while we
        // ask is not asked again: the step may have started (its group was killed).
        let link = self.link()?;
        request.id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let id = request.id;
        let (started_tx, started) = bounded(1);
        let (events_tx, events) = unbounded();
        lock(&link.steps).insert(
            id,
            Watched {
                started: Some(started_tx),
                events: events_tx,
                pgid: None,
            },
        );
        if let Err(e) = link.send(&Request::Spawn(request)) {
            lock(&link.steps).remove(&id);
            link.abandon();
            return Err(format!("cannot reach the step supervisor: {e}"));
        }
        match started.recv_timeout(START_ANSWER_WITHIN) {
            Ok(Ok(pgid)) => Ok(Step {
                id,
                pgid,
                link,
                events,
            }),
            Ok(Err(error)) => {
                lock(&link.steps).remove(&id);
                Err(error)
            }
            Err(_) => {
                lock(&link.steps).remove(&id);
                link.abandon();
                Err("the step supervisor did not answer".to_owned())
            }
        }
    }
}

impl Drop for StepSupervisor {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl Link {
    fn start(program: &Path) -> Result<Arc<Link>, String> {
        let (ours, theirs) =
            UnixStream::pair().map_err(|e| format!("cannot make a socket pair: {e}"))?;
        let reader = ours
            .try_clone()
            .map_err(|e| format!("cannot clone a socket: {e}"))?;
        let mut child = Command::new(program)
            .arg0(STEP_BINARY)
            .arg(FLAG)
            .arg(std::process::id().to_string())
            .stdin(Stdio::from(OwnedFd::from(theirs)))
            .stdout(Stdio::null())
            .env_clear()
            .current_dir("/")
            .spawn()
            .map_err(|e| {
                format!(
                    "cannot start the step supervisor {}: {e}",
                    program.display()
                )
            })?;
        let link = Arc::new(Link {
            writer: Mutex::new(ours),
            steps: Mutex::new(HashMap::new()),
            alive: AtomicBool::new(true),
            pid: child.id(),
            reaped: Mutex::new(false),
        });
        let watching = link.clone();
        let spawned = std::thread::Builder::new()
            .name("step-supervisor".into())
            .spawn(move || watching.read_replies(reader, &mut child));
        if let Err(e) = spawned {
            link.abandon();
            return Err(format!("cannot start a thread: {e}"));
        }
        Ok(link)
    }

    fn send(&self, request: &Request) -> std::io::Result<()> {
        write_frame(&mut *lock(&self.writer), request)
    }

    /// Gives up on this supervisor: it is killed, and the reader thread then kills every
    /// group it was told of and fails its steps.
    fn abandon(&self) {
        self.alive.store(false, Ordering::SeqCst);
        let reaped = lock(&self.reaped);
        if !*reaped {
            // SAFETY: kill(2) takes integers and has no memory effects. The pid is our
            // child's, not reaped (the lock keeps the reader thread from reaping it now).
            #[allow(unsafe_code)]
            unsafe {
                libc::kill(self.pid as libc::pid_t, SIGKILL);
            }
        }
    }

    /// Passes the supervisor's replies to the steps, until it is gone; then kills what it
    /// left and reaps it.
    fn read_replies(&self, mut reader: UnixStream, child: &mut Child) {
        let why = loop {
            let body = match read_frame(&mut reader) {
                Ok(Some(body)) => body,
                Ok(None) => break "it exited".to_owned(),
                Err(e) => break format!("reading from it failed: {e}"),
            };
            let reply: Reply = match decode(&body) {
                Ok(reply) => reply,
                Err(e) => break format!("it sent an unreadable reply: {e}"),
            };
            let mut steps = lock(&self.steps);
            match reply {
                Reply::Started { id, pgid } => {
                    if let Some(step) = steps.get_mut(&id) {
                        step.pgid = Some(pgid);
                        if let Some(started) = step.started.take() {
                            let _ = started.send(Ok(pgid));
                        }
                    }
                }
                Reply::NotStarted { id, error } => {
                    if let Some(started) = steps.remove(&id).and_then(|s| s.started) {
                        let _ = started.send(Err(error));
                    }
                }
                Reply::Exited { id, wait_status } => {
                    if let Some(step) = steps.remove(&id) {
                        let status = ExitStatus::from_raw(wait_status);
                        let _ = step.events.send(StepEvent::Exited(status));
                    }
                }
            }
        };
        self.alive.store(false, Ordering::SeqCst);
        let orphans: Vec<(u64, Watched)> = lock(&self.steps).drain().collect();
        if !orphans.is_empty() {
            error!(
                pid = self.pid,
                steps = orphans.len(),
                "the step supervisor is gone ({why}); killing its steps' process groups"
            );
        }
        for (_, step) in orphans {
            if let Some(pgid) = step.pgid {
                kill_group(pgid, SIGKILL);
            }
            match step.started {
                // It may have started: a group the supervisor never named cannot be killed.
                Some(started) => {
                    let _ = started.send(Err(format!(
                        "the step supervisor died while starting the command ({why})"
                    )));
                }
                None => {
                    let _ = step.events.send(StepEvent::Lost);
                }
            }
        }
        // Closing our end makes a supervisor that still lives kill its steps and exit.
        let _ = lock(&self.writer).shutdown(std::net::Shutdown::Both);
        // Waited for without reaping first, so that `abandon` never signals a reused pid.
        wait_exited(self.pid as i32);
        let mut reaped = lock(&self.reaped);
        if let Err(e) = child.wait() {
            warn!(pid = self.pid, error = %e, "cannot reap the step supervisor");
        }
        *reaped = true;
    }
}

impl Step {
    /// The step's process group (the shell's pid).
    pub fn pgid(&self) -> i32 {
        self.pgid
    }

    /// Sends `signal` to the step's whole process group (through the supervisor, which
    /// knows whether the group is still its step's).
    pub fn signal(&self, signal: i32) {
        if self
            .link
            .send(&Request::Signal {
                id: self.id,
                signal,
            })
            .is_err()
        {
            // The supervisor is gone: the reader thread kills the group and reports it.
            self.link.abandon();
        }
    }
}

impl Drop for Step {
    fn drop(&mut self) {
        lock(&self.link.steps).remove(&self.id);
    }
}

/// Sends `signal` to every process of group `pgid`. A group already gone is not an error.
pub fn kill_group(pgid: i32, signal: libc::c_int) {
    if pgid <= 1 {
        return; // never signal "every process" or init's group
    }
    // SAFETY: kill(2) takes plain integers and has no memory effects.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::kill(-pgid, signal) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ESRCH) {
            warn!(pgid, signal, error = %e, "cannot signal a command's process group");
        }
    }
}

// ---- The supervisor's side ----------------------------------------------------------------

/// One step, as the supervisor holds it.
struct Running {
    child: Child,
    pgid: i32,
    /// The read end of the shell's output pipe, until it ends.
    pipe: Option<File>,
    output: CappedOutput<File>,
}

/// Runs the supervisor with the arguments after [`FLAG`]: `<worker pid>`. Never returns.
pub fn main(args: Vec<OsString>) -> ! {
    let worker_pid = match parse_worker_pid(&args) {
        Ok(pid) => pid,
        Err(e) => fail(&e),
    };
    // Other steps' variables pass through this process: no same-user inspection.
    // SAFETY: prctl(PR_SET_DUMPABLE) takes integers only and has no memory effects.
    #[allow(unsafe_code)]
    unsafe {
        libc::prctl(libc::PR_SET_DUMPABLE, 0 as libc::c_ulong, 0, 0, 0);
    }
    // Handlers first, so that the parent-death signal never meets the default action.
    let (wakeups, wakeup_writer) = match pipe() {
        Ok(ends) => ends,
        Err(e) => fail(&format!("cannot make a pipe: {e}")),
    };
    for signal in CAUGHT {
        let registered = wakeup_writer
            .try_clone()
            .and_then(|writer| set_nonblocking(&writer).map(|()| writer))
            .and_then(|writer| signal_hook::low_level::pipe::register(signal, writer));
        if let Err(e) = registered {
            fail(&format!("cannot handle signal {signal}: {e}"));
        }
    }
    drop(wakeup_writer);
    if let Err(e) = set_nonblocking(&wakeups) {
        fail(&format!("cannot set up the signal pipe: {e}"));
    }
    set_parent_death_signal(SIGTERM);
    if std::os::unix::process::parent_id() != worker_pid {
        std::process::exit(0); // the worker is gone already; nothing started
    }
    // SAFETY: fd 0 is the socket the worker gave us as stdin; only this value owns it
    // from here on (nothing reads the process's stdin).
    #[allow(unsafe_code)]
    let control = UnixStream::from(unsafe { OwnedFd::from_raw_fd(0) });
    serve(control, File::from(wakeups), worker_pid)
}

fn parse_worker_pid(args: &[OsString]) -> Result<u32, String> {
    let usage = || format!("usage: jobz-step {FLAG} <worker pid>");
    match args {
        [pid] => pid
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
            .filter(|&p| p > 1)
            .ok_or_else(|| format!("{FLAG}: {pid:?} is not a worker pid")),
        _ => Err(usage()),
    }
}

fn serve(mut control: UnixStream, mut wakeups: File, worker_pid: u32) -> ! {
    let mut steps: HashMap<u64, Running> = HashMap::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let ids: Vec<u64> = steps
            .iter()
            .filter(|(_, s)| s.pipe.is_some())
            .map(|(id, _)| *id)
            .collect();
        let mut fds = Vec::with_capacity(2 + ids.len());
        for fd in [control.as_raw_fd(), wakeups.as_raw_fd()] {
            fds.push(libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            });
        }
        for id in &ids {
            if let Some(pipe) = steps.get(id).and_then(|s| s.pipe.as_ref()) {
                fds.push(libc::pollfd {
                    fd: pipe.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                });
            }
        }
        // SAFETY: poll reads and writes the `fds.len()` entries of the vector we own.
        #[allow(unsafe_code)]
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if rc < 0 {
            if std::io::Error::last_os_error().kind() == ErrorKind::Interrupted {
                continue;
            }
            abandon_all(&steps, "poll failed");
        }
        for (slot, id) in ids.iter().enumerate() {
            if fds[2 + slot].revents == 0 {
                continue;
            }
            if let Some(step) = steps.get_mut(id) {
                copy_available(step, &mut buf, u64::MAX, false);
            }
        }
        if fds[1].revents != 0 {
            while matches!(wakeups.read(&mut buf), Ok(n) if n > 0) {}
            if std::os::unix::process::parent_id() != worker_pid {
                abandon_all(&steps, "the worker died (parent-death signal)");
            }
            finish_ended(&mut steps, &mut control, &mut buf);
        }
        if fds[0].revents != 0 {
            match read_frame(&mut control) {
                Ok(Some(body)) => match decode::<Request>(&body) {
                    Ok(Request::Spawn(request)) => {
                        let id = request.id;
                        let reply = match start_step(request) {
                            Ok(step) => {
                                let pgid = step.pgid;
                                steps.insert(id, step);
                                Reply::Started { id, pgid }
                            }
                            Err(error) => Reply::NotStarted { id, error },
                        };
                        answer(&mut control, &reply, &steps);
                    }
                    Ok(Request::Signal { id, signal }) => {
                        if let Some(step) = steps.get(&id) {
                            kill_group(step.pgid, signal);
                        }
                    }
                    Err(e) => abandon_all(&steps, &format!("unreadable request: {e}")),
                },
                Ok(None) => abandon_all(&steps, "the worker died (control socket closed)"),
                Err(e) => abandon_all(&steps, &format!("the control socket failed: {e}")),
            }
            // A step may have ended while the request was read; its SIGCHLD is in the pipe.
        }
    }
}

fn answer(control: &mut UnixStream, reply: &Reply, steps: &HashMap<u64, Running>) {
    if let Err(e) = write_frame(control, reply) {
        abandon_all(steps, &format!("cannot answer the worker: {e}"));
    }
}

/// Reads what the pipe has now. At its end (or with `all_available` once nothing more is
/// ready, or `limit` bytes read) the pipe is closed.
fn copy_available(step: &mut Running, buf: &mut [u8], limit: u64, all_available: bool) {
    let mut taken = 0u64;
    while let Some(pipe) = step.pipe.as_mut() {
        match pipe.read(buf) {
            Ok(0) => step.pipe = None,
            Ok(n) => {
                step.output.feed(&buf[..n]);
                taken += n as u64;
                if taken >= limit {
                    step.pipe = None;
                } else if !all_available {
                    return; // one read per wakeup: every step gets its turn
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if all_available {
                    step.pipe = None;
                }
                return;
            }
            Err(_) => step.pipe = None,
        }
    }
}

/// Finishes every step whose shell has ended: the rest of its output, the group's
/// leftovers killed, the shell reaped, the status reported.
fn finish_ended(steps: &mut HashMap<u64, Running>, control: &mut UnixStream, buf: &mut [u8]) {
    let ended: Vec<u64> = steps
        .iter()
        .filter(|(_, s)| has_ended(s.pgid))
        .map(|(id, _)| *id)
        .collect();
    for id in ended {
        let Some(mut step) = steps.remove(&id) else {
            continue;
        };
        copy_available(&mut step, buf, DRAIN_AFTER_EXIT, true);
        step.output.finish();
        // The shell is a zombie until reaped below: its pid, the group id, is still ours.
        kill_group(step.pgid, SIGKILL);
        let wait_status = match step.child.wait() {
            Ok(status) => status.into_raw(),
            // Cannot happen for our own unreaped child; report a kill rather than success.
            Err(_) => SIGKILL,
        };
        answer(control, &Reply::Exited { id, wait_status }, steps);
    }
}

/// Blocks until our child `pid` has ended, without reaping it.
fn wait_exited(pid: i32) {
    loop {
        // SAFETY: waitid writes only into the siginfo we own, plain old data valid when
        // zeroed.
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
        if rc == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return; // ended, or not ours to wait for (ECHILD)
        }
    }
}

/// Whether our child `pid` has ended, without reaping it.
fn has_ended(pid: i32) -> bool {
    // SAFETY: waitid writes only into the siginfo we own, plain old data valid when zeroed;
    // si_pid reads a field of it.
    #[allow(unsafe_code)]
    unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        let rc = libc::waitid(
            libc::P_PID,
            pid as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        );
        rc == 0 && info.si_pid() == pid
    }
}

fn start_step(request: SpawnRequest) -> Result<Running, String> {
    let output_path = PathBuf::from(OsString::from_vec(request.output));
    let output = OpenOptions::new()
        .append(true)
        .create(true)
        .open(&output_path)
        .map_err(|e| format!("cannot open the output {}: {e}", output_path.display()))?;
    let switch = match request.run_as.as_deref() {
        None => None,
        Some(arg) => Some(
            Switch::parse_arg(arg)
                .ok_or_else(|| format!("{arg:?} is not a credentials argument"))?,
        ),
    };
    let (pipe, writer) = pipe().map_err(|e| format!("cannot make the output pipe: {e}"))?;
    set_nonblocking(&pipe).map_err(|e| format!("cannot set up the output pipe: {e}"))?;
    let stderr = writer
        .try_clone()
        .map_err(|e| format!("cannot set up the output pipe: {e}"))?;
    let mut command = Command::new("/bin/sh");
    command
        .arg("-c")
        .arg(&request.command)
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(stderr)
        .current_dir(OsString::from_vec(request.workdir))
        .env_clear()
        .envs(
            request
                .env
                .into_iter()
                .map(|(k, v)| (OsString::from_vec(k), OsString::from_vec(v))),
        )
        // A group of its own, led by the shell: a timeout, a cancel or our end kills the
        // command's children too.
        .process_group(0);
    if let Some(switch) = switch {
        // SAFETY: this process is single-threaded, so the forked child may run ordinary
        // code; take_credentials only calls set*id functions on data it owns.
        #[allow(unsafe_code)]
        unsafe {
            command.pre_exec(move || take_credentials(&switch));
        }
    }
    let child = command
        .spawn()
        .map_err(|e| format!("cannot start /bin/sh: {e}"))?;
    let pgid = child.id() as i32;
    Ok(Running {
        child,
        pgid,
        pipe: Some(File::from(pipe)),
        output: CappedOutput::new(output, request.max_output),
    })
}

/// SIGKILL to every step's group, then exit: the steps die with the worker.
fn abandon_all(steps: &HashMap<u64, Running>, why: &str) -> ! {
    if !steps.is_empty() {
        eprintln!(
            "jobz-step: {why}; killing the process groups of {} step(s)",
            steps.len()
        );
    }
    for step in steps.values() {
        kill_group(step.pgid, SIGKILL);
    }
    std::process::exit(0);
}

fn fail(message: &str) -> ! {
    eprintln!("jobz-step: step supervisor: {message}");
    std::process::exit(EXIT_SUPERVISOR_FAILED);
}

fn set_parent_death_signal(signal: i32) {
    // SAFETY: prctl(PR_SET_PDEATHSIG) takes integers only and has no memory effects.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, signal as libc::c_ulong, 0, 0, 0) };
    if rc != 0 {
        // The control socket still reports the worker's death; the signal is a second way.
        eprintln!(
            "jobz-step: cannot set the parent-death signal: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Takes the credentials of `switch` for good: supplementary groups, then the group, then
/// the user (in this order: each step needs the privilege the next one drops), and checks
/// that root cannot be taken back.
fn take_credentials(switch: &Switch) -> std::io::Result<()> {
    let last = || Err(std::io::Error::last_os_error());
    // SAFETY: setgroups reads `groups.len()` ids from a buffer we own; setgid and setuid
    // take integers. None has other memory effects.
    #[allow(unsafe_code)]
    unsafe {
        if libc::setgroups(switch.groups.len(), switch.groups.as_ptr()) != 0 {
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
        return Err(std::io::Error::other(format!(
            "the credentials uid {} gid {} did not hold",
            switch.uid, switch.gid
        )));
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

fn set_nonblocking(fd: &OwnedFd) -> std::io::Result<()> {
    // SAFETY: fcntl on a descriptor we own, with integer arguments only.
    #[allow(unsafe_code)]
    let rc = unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        if flags < 0 {
            flags
        } else {
            libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK)
        }
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The bytes of a path, as the wire carries them.
pub fn path_bytes(path: &Path) -> Vec<u8> {
    path.as_os_str().as_bytes().to_vec()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_only_argument_is_a_worker_pid() {
        let args = |a: &[&str]| a.iter().map(OsString::from).collect::<Vec<_>>();
        assert_eq!(parse_worker_pid(&args(&["1234"])), Ok(1234));
        assert!(parse_worker_pid(&args(&[])).is_err());
        assert!(parse_worker_pid(&args(&["1234", "x"])).is_err());
        assert!(parse_worker_pid(&args(&["x"])).is_err());
        assert!(
            parse_worker_pid(&args(&["1"])).is_err(),
            "init is nobody's worker"
        );
    }

    #[test]
    fn frames_round_trip_and_oversized_or_torn_ones_are_refused() {
        let request = Request::Spawn(SpawnRequest {
            id: 7,
            command: "echo 'a b'".into(),
            env: vec![(b"PATH".to_vec(), b"/bin".to_vec())],
            workdir: b"/tmp/w\xff".to_vec(),
            output: b"/tmp/o".to_vec(),
            max_output: 10,
            run_as: Some("65534:65534:".into()),
        });
        let mut wire = Vec::new();
        write_frame(&mut wire, &request).unwrap();
        write_frame(&mut wire, &Request::Signal { id: 7, signal: 15 }).unwrap();
        let mut input = &wire[..];
        let first = read_frame(&mut input).unwrap().unwrap();
        assert_eq!(decode::<Request>(&first).unwrap(), request);
        let second = read_frame(&mut input).unwrap().unwrap();
        assert_eq!(
            decode::<Request>(&second).unwrap(),
            Request::Signal { id: 7, signal: 15 }
        );
        assert_eq!(read_frame(&mut input).unwrap(), None, "a clean end");

        let torn = &wire[..wire.len() - 1];
        let mut input = torn;
        read_frame(&mut input).unwrap();
        assert!(read_frame(&mut input).is_err(), "a frame cut short");
        let huge = ((MAX_FRAME + 1) as u32).to_le_bytes();
        assert!(read_frame(&mut &huge[..]).is_err(), "over the limit");
        assert!(decode::<Request>(b"\xc1").is_err());
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
