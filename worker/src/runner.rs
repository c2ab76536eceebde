//! Running one command: process group, output file, working directory, timeout and kill.
//!
//! [`run`] blocks until the command has ended and its process group is gone, so the service
//! calls it on a thread of its own per task. The worker's step supervisor
//! ([`crate::supervisor`]) starts `/bin/sh -c <rendered>` as the leader of a new process
//! group, stdout and stderr appended to one file, in a fresh working directory that is
//! removed afterwards; a timeout or a cancel signals the whole group through it. Whatever
//! the command left running in its group when it ends (background children) is killed: a
//! task owns nothing after it has finished.

use std::collections::BTreeMap;
use std::ffi::{CStr, CString, OsStr, OsString};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{after, never, select, Receiver};
use jobz::message::TaskOutcome;
use tracing::warn;

use crate::supervisor::{
    path_bytes, SpawnRequest, StepEvent, StepSupervisor, SUPERVISOR_LOST_ERROR,
};

/// How much of the output's end goes into a task's result.
pub const OUTPUT_TAIL_BYTES: usize = 4096;

/// `PATH` of every step, unless `--env-allow PATH` passes the worker's own.
pub const SAFE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Variables a step gets from the worker's environment when they are set there (`HOME`,
/// `USER` and `LOGNAME` come from the `run_as` user's entry instead when it has one).
pub const BASE_ENV: [&str; 6] = ["HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "TZ"];

/// Longest file name the runner builds (Linux's `NAME_MAX`).
const MAX_FILE_NAME: usize = 255;

/// What to run and how.
#[derive(Debug, Clone)]
pub struct RunSpec {
    /// The rendered command, given to `/bin/sh -c`.
    pub command: String,
    /// The worker's step supervisor, which starts the shell.
    pub steps: Arc<StepSupervisor>,
    /// The task's own variables (`JOBZ_*`), on top of the allow-listed ones ([`step_env`]).
    pub env: Vec<(String, String)>,
    /// Further names passed through from the worker's environment (`--env-allow`).
    pub env_allow: Vec<String>,
    /// The user to run as (`run_as:` or `--default-run-as`); `None`: the worker's own.
    pub run_as: Option<String>,
    /// Output beyond this many bytes is dropped, with a marker line (`--max-step-output`).
    pub max_output: u64,
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
    /// `Some(n)`: the command wrote more than `n` bytes (`--max-step-output`); the first
    /// `n` were kept, followed by [`truncation_marker`].
    pub truncated: Option<u64>,
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
            truncated: None,
        }
    }

    /// The `error` reported to the broker: why it failed, and a note when the output was
    /// cut. The outcome stays what the exit status says: a step that succeeded with too much
    /// output still succeeded.
    pub fn reported_error(&self) -> Option<String> {
        match (&self.error, self.truncated) {
            (error, None) => error.clone(),
            (None, Some(n)) => Some(truncated_note(n)),
            (Some(error), Some(n)) => Some(format!("{error}; {}", truncated_note(n))),
        }
    }
}

/// `output truncated after N bytes`: what a result and `worker.log` say about a cut output.
pub fn truncated_note(kept: u64) -> String {
    format!("output truncated after {kept} bytes")
}

/// The line the step supervisor appends to an output it cut after `kept` bytes.
pub fn truncation_marker(kept: u64) -> String {
    format!("[jobz: {}]\n", truncated_note(kept))
}

/// Why the service stops a running command (sent on the channel [`run`] watches).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    /// The task fails with this error (the worker shuts down).
    Fail(String),
    /// Its run was cancelled: the task is reported [`TaskOutcome::Cancelled`].
    Cancel,
}

/// The error of a task whose command was killed because its run was cancelled.
pub const CANCELLED_ERROR: &str = "the run was cancelled; its process group was killed";

/// Why the runner killed a command before it ended by itself.
enum Kill {
    Timeout(Duration),
    Stop(Stop),
}

/// Runs `spec` to its end. `on_started` is called with the start time once the process is
/// running, and the offset in the output file where this run's output begins. A message on `stop` kills the process group and makes the task fail with its
/// error or end cancelled (a dropped sender stops nothing).
pub fn run(spec: &RunSpec, stop: &Receiver<Stop>, on_started: impl FnOnce(i64, u64)) -> RunResult {
    let user = match spec.run_as.as_deref().map(resolve_run_as).transpose() {
        Ok(user) => user,
        Err(e) => return RunResult::not_started(e),
    };
    let switch = user.as_ref().and_then(|u| u.switch.as_ref());
    let prepared = prepare_workdir(&spec.workdir, switch).and_then(|()| open_output(&spec.output));
    let offset = match prepared {
        Ok(offset) => offset,
        Err(e) => {
            remove_workdir(&spec.workdir);
            return RunResult::not_started(e);
        }
    };
    let result = run_in(spec, user.as_ref(), offset, stop, on_started);
    remove_workdir(&spec.workdir);
    result
}

fn run_in(
    spec: &RunSpec,
    user: Option<&RunAs>,
    offset: u64,
    stop: &Receiver<Stop>,
    on_started: impl FnOnce(i64, u64),
) -> RunResult {
    let request = SpawnRequest {
        id: 0, // chosen by the supervisor's handle
        command: spec.command.clone(),
        env: step_env(
            |name| std::env::var_os(name),
            &spec.env_allow,
            user.map(|u| &u.user),
            &spec.env,
        )
        .into_iter()
        .map(|(name, value)| (name.into_vec(), value.into_vec()))
        .collect(),
        workdir: path_bytes(&spec.workdir),
        output: path_bytes(&spec.output),
        max_output: spec.max_output,
        run_as: user.and_then(|u| u.switch.as_ref()).map(Switch::to_arg),
    };
    let step = match spec.steps.start(request) {
        Ok(step) => step,
        Err(e) => return RunResult::not_started(format!("cannot start the command: {e}")),
    };
    let started_at_ms = jobz::now_ms();
    let start = Instant::now();
    on_started(started_at_ms, offset);

    let deadline = spec.timeout.map(|t| start + t);
    let timer = deadline.map(crossbeam_channel::at).unwrap_or_else(never);
    let mut stop = stop.clone();
    let mut kill = None;
    let mut ended = None;
    while ended.is_none() {
        select! {
            recv(step.events) -> event => ended = Some(event.unwrap_or(StepEvent::Lost)),
            recv(timer) -> _ => {
                kill = spec.timeout.map(Kill::Timeout);
                break;
            }
            recv(stop) -> why => match why {
                Ok(why) => {
                    kill = Some(Kill::Stop(why));
                    break;
                }
                Err(_) => stop = never(),
            },
        }
    }
    if ended.is_none() {
        step.signal(libc::SIGTERM);
        select! {
            recv(step.events) -> event => ended = Some(event.unwrap_or(StepEvent::Lost)),
            recv(after(spec.kill_grace)) -> _ => {
                step.signal(libc::SIGKILL);
                ended = Some(step.events.recv().unwrap_or(StepEvent::Lost));
            }
        }
    }
    let status = match ended {
        Some(StepEvent::Exited(status)) => Some(status),
        Some(StepEvent::Lost) | None => {
            kill = Some(Kill::Stop(Stop::Fail(SUPERVISOR_LOST_ERROR.to_owned())));
            None
        }
    };
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
        (Some(Kill::Stop(Stop::Fail(reason))), _) => (TaskOutcome::Failed, Some(reason)),
        (Some(Kill::Stop(Stop::Cancel)), _) => {
            (TaskOutcome::Cancelled, Some(CANCELLED_ERROR.to_owned()))
        }
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
    let output_tail = output_tail(&spec.output, offset);
    let written = std::fs::metadata(&spec.output)
        .map(|m| m.len().saturating_sub(offset))
        .unwrap_or(0);
    // The supervisor keeps at most `max_output` bytes and then appends the marker, so a cut
    // output is longer than the limit and ends with the marker.
    let truncated = (written > spec.max_output
        && output_tail.ends_with(&truncation_marker(spec.max_output)))
    .then_some(spec.max_output);
    RunResult {
        outcome,
        exit_code,
        error,
        started_at_ms,
        finished_at_ms: jobz::now_ms(),
        elapsed,
        output_tail,
        started: true,
        truncated,
    }
}

fn prepare_workdir(dir: &Path, owner: Option<&Switch>) -> Result<(), String> {
    let create_error =
        |e: std::io::Error| format!("cannot create working directory {}: {e}", dir.display());
    // One mkdir in the common case (`work/` exists, the attempt's directory does not).
    match std::fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            // Left by an attempt this worker did not clean up: start empty.
            std::fs::remove_dir_all(dir)
                .map_err(|e| format!("cannot clear working directory {}: {e}", dir.display()))?;
            std::fs::create_dir(dir).map_err(create_error)?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).map_err(create_error)?;
        }
        Err(e) => return Err(create_error(e)),
    }
    if let Some(owner) = owner {
        // The step runs as another user: its working directory is its own.
        std::os::unix::fs::chown(dir, Some(owner.uid), Some(owner.gid)).map_err(|e| {
            format!(
                "cannot hand working directory {} to uid {}: {e}",
                dir.display(),
                owner.uid
            )
        })?;
        if let Some(parent) = dir.parent() {
            let_others_traverse(parent)?;
        }
    }
    Ok(())
}

/// Adds search (not read) permission for group and others to `dir`, the spool's `work/`,
/// which a worker under a umask like 027 makes closed: a step running as another user
/// must reach its working directory by its absolute path too (`cd "$PWD"`, `realpath .`),
/// without listing the other tasks' directories. The spool itself must be traversable
/// (the Ansible role makes it 0751).
fn let_others_traverse(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let error = |e: std::io::Error| {
        format!(
            "cannot let steps of other users reach {}: {e}",
            dir.display()
        )
    };
    let mode = std::fs::metadata(dir).map_err(error)?.permissions().mode();
    if mode & 0o011 != 0o011 {
        std::fs::set_permissions(
            dir,
            std::fs::Permissions::from_mode((mode | 0o011) & 0o7777),
        )
        .map_err(error)?;
    }
    Ok(())
}

fn remove_workdir(dir: &Path) {
    // Most steps leave their directory empty: one rmdir, not a directory walk.
    if std::fs::remove_dir(dir).is_ok() {
        return;
    }
    if let Err(e) = std::fs::remove_dir_all(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            warn!(dir = %dir.display(), error = %e, "cannot remove a task's working directory");
        }
    }
}

/// Opens the output file for appending; returns it and its length before this run.
/// Creates the output file (and its directory) if needed; returns its length, where this
/// run's output will begin.
fn open_output(path: &Path) -> Result<u64, String> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| format!("cannot create output directory {}: {e}", parent.display()))?;
    }
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| format!("cannot open output file {}: {e}", path.display()))?;
    Ok(file.metadata().map(|m| m.len()).unwrap_or(0))
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

// ---- Environment ----------------------------------------------------------------------------

/// The whole environment of a step: [`SAFE_PATH`] (or the worker's `PATH` if `allow` names
/// it), the [`BASE_ENV`] names and those of `allow` that the worker has (`worker_env`
/// looks one up), `HOME`/`USER`/`LOGNAME` of `user` when there is one, and last `task` (the
/// `JOBZ_*` variables), which win over everything else.
pub fn step_env(
    worker_env: impl Fn(&str) -> Option<OsString>,
    allow: &[String],
    user: Option<&User>,
    task: &[(String, String)],
) -> BTreeMap<OsString, OsString> {
    let mut env = BTreeMap::new();
    let path = allow
        .iter()
        .any(|n| n == "PATH")
        .then(|| worker_env("PATH"))
        .flatten()
        .unwrap_or_else(|| SAFE_PATH.into());
    env.insert(OsString::from("PATH"), path);
    for name in BASE_ENV
        .iter()
        .copied()
        .chain(allow.iter().map(String::as_str))
        .filter(|n| *n != "PATH")
    {
        if let Some(value) = worker_env(name) {
            env.insert(name.into(), value);
        }
    }
    if let Some(user) = user {
        env.insert("HOME".into(), user.home.clone().into_os_string());
        env.insert("USER".into(), user.name.clone().into());
        env.insert("LOGNAME".into(), user.name.clone().into());
    }
    for (name, value) in task {
        env.insert(name.into(), value.into());
    }
    env
}

/// Is `name` a variable name `--env-allow` accepts (`[A-Za-z_][A-Za-z0-9_]*`, at most 128)?
pub fn is_valid_env_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && name.len() <= 128
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

// ---- run_as ---------------------------------------------------------------------------------

/// A local user, as the password database has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// Login name.
    pub name: String,
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Home directory.
    pub home: PathBuf,
}

/// The credentials a step's shell takes before it runs (see [`crate::supervisor`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Switch {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary groups (the user's, as `initgroups` would set them).
    pub groups: Vec<u32>,
}

impl Switch {
    /// The wire form: `UID:GID:G1,G2,…`.
    pub fn to_arg(&self) -> String {
        let groups: Vec<String> = self.groups.iter().map(u32::to_string).collect();
        format!("{}:{}:{}", self.uid, self.gid, groups.join(","))
    }

    /// Reads [`Switch::to_arg`]'s form.
    pub fn parse_arg(arg: &str) -> Option<Switch> {
        let mut parts = arg.splitn(3, ':');
        let uid = parts.next()?.parse().ok()?;
        let gid = parts.next()?.parse().ok()?;
        let groups = match parts.next()? {
            "" => Vec::new(),
            list => list
                .split(',')
                .map(|g| g.parse().ok())
                .collect::<Option<Vec<u32>>>()?,
        };
        Some(Switch { uid, gid, groups })
    }
}

/// Whom a step runs as: the user (for its environment) and, when the worker must change
/// identity for it, the credentials to take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    /// The user.
    pub user: User,
    /// `None` when the worker already is that user.
    pub switch: Option<Switch>,
}

/// Looks `name` up and decides how to become it: a root worker switches, a worker that is
/// that user already runs the step as it is, any other worker refuses (the error is the
/// task's; the step is not run, not even as the worker's own user).
pub fn resolve_run_as(name: &str) -> Result<RunAs, String> {
    if !jobz::jobfile::is_valid_user_name(name) {
        return Err(format!("run_as {:?} is not a valid user name", name));
    }
    let user = lookup_user(name)
        .map_err(|e| format!("run_as {name:?}: cannot read the user database: {e}"))?
        .ok_or_else(|| format!("run_as {name:?}: no such user on this worker"))?;
    // SAFETY: geteuid takes nothing, cannot fail and has no memory effects.
    #[allow(unsafe_code)]
    let euid = unsafe { libc::geteuid() };
    plan_run_as(euid, user, group_list)
}

/// [`resolve_run_as`]'s decision, given the worker's effective uid and a way to list a
/// user's groups.
fn plan_run_as(
    euid: u32,
    user: User,
    groups: impl FnOnce(&User) -> Result<Vec<u32>, String>,
) -> Result<RunAs, String> {
    if user.uid == euid {
        return Ok(RunAs { user, switch: None });
    }
    if euid != 0 {
        return Err(format!(
            "run_as {:?}: this worker runs as uid {euid}, not root, so it cannot run a step as \
             uid {}; the step was not run",
            user.name, user.uid
        ));
    }
    let switch = Switch {
        uid: user.uid,
        gid: user.gid,
        groups: groups(&user)?,
    };
    Ok(RunAs {
        user,
        switch: Some(switch),
    })
}

/// The password-database entry of `name` (`getpwnam_r`), `None` if there is none.
pub fn lookup_user(name: &str) -> std::io::Result<Option<User>> {
    let c_name = CString::new(name)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "NUL in a user name"))?;
    let mut buf = vec![0u8; 1024];
    loop {
        // SAFETY: `passwd` is plain old data (integers and pointers), valid when zeroed.
        #[allow(unsafe_code)]
        let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call: a NUL-terminated name, an entry and a
        // buffer we own (its true length given), and an out-pointer. The entry's strings
        // point into `buf`, which outlives their use below.
        #[allow(unsafe_code)]
        let rc = unsafe {
            libc::getpwnam_r(
                c_name.as_ptr(),
                &mut entry,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut found,
            )
        };
        if rc == libc::ERANGE && buf.len() < 1 << 20 {
            buf.resize(buf.len() * 2, 0);
            continue;
        }
        if rc != 0 {
            return Err(std::io::Error::from_raw_os_error(rc));
        }
        if found.is_null() {
            return Ok(None);
        }
        let home = if entry.pw_dir.is_null() {
            PathBuf::from("/")
        } else {
            // SAFETY: a non-null pw_dir from a successful getpwnam_r is a NUL-terminated
            // string inside `buf`, alive here.
            #[allow(unsafe_code)]
            let dir = unsafe { CStr::from_ptr(entry.pw_dir) };
            PathBuf::from(OsStr::from_bytes(dir.to_bytes()))
        };
        return Ok(Some(User {
            name: name.to_owned(),
            uid: entry.pw_uid,
            gid: entry.pw_gid,
            home,
        }));
    }
}

/// The user's groups, primary included, as `initgroups(3)` would set them
/// (`getgrouplist`).
pub(crate) fn group_list(user: &User) -> Result<Vec<u32>, String> {
    let c_name = CString::new(user.name.as_str())
        .map_err(|_| format!("user name {:?} contains NUL", user.name))?;
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    for _ in 0..8 {
        let mut count = groups.len() as libc::c_int;
        // SAFETY: the name is NUL-terminated; `groups` holds `count` entries and getgrouplist
        // writes at most that many, then stores how many there are in `count`.
        #[allow(unsafe_code)]
        let rc = unsafe {
            libc::getgrouplist(c_name.as_ptr(), user.gid, groups.as_mut_ptr(), &mut count)
        };
        let count = usize::try_from(count).unwrap_or(0);
        if rc >= 0 {
            groups.truncate(count.min(groups.len()));
            return Ok(groups);
        }
        groups.resize(count.max(groups.len() * 2), 0);
    }
    Err(format!("cannot list the groups of user {:?}", user.name))
}

// ---- Paths ----------------------------------------------------------------------------------

/// Is `name` safe as one file name of a path the worker builds: non-empty, at most
/// `MAX_FILE_NAME` bytes, only `[A-Za-z0-9_.-]`, and not `.` or `..`? Nothing else can
/// hide a separator, a NUL, a parent reference or an absolute path.
pub fn is_safe_file_name(name: &str) -> bool {
    (1..=MAX_FILE_NAME).contains(&name.len())
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

fn safe(what: &str, name: &str) -> Result<(), String> {
    if is_safe_file_name(name) {
        Ok(())
    } else {
        let shown: String = name.chars().take(80).collect();
        Err(format!(
            "refused: {what} {shown:?} cannot be part of a file name"
        ))
    }
}

/// `<log-dir>/runs/<run_id>/<job>.<task_id>.<attempt>.log`, or why not: every part must be
/// a [safe file name](is_safe_file_name), so the file is always two levels under
/// `<log-dir>/runs/`.
pub fn output_path(
    log_dir: &Path,
    run_id: &str,
    job: &str,
    task_id: &str,
    attempt: u32,
) -> Result<PathBuf, String> {
    safe("run id", run_id)?;
    safe("task id", task_id)?;
    let file = format!("{job}.{task_id}.{attempt}.log");
    safe("output file name", &file)?;
    Ok(log_dir.join("runs").join(run_id).join(file))
}

/// `<spool>/work/<task_id>.<attempt>`, or why not (see [`output_path`]).
pub fn workdir_path(spool: &Path, task_id: &str, attempt: u32) -> Result<PathBuf, String> {
    safe("task id", task_id)?;
    let dir = format!("{task_id}.{attempt}");
    safe("working directory name", &dir)?;
    Ok(spool.join("work").join(dir))
}

#[cfg(test)]
mod tests {
    // Tests that run commands are in `tests/it/runner.rs`: they need the `jobz-step`
    // binary as the step supervisor, which only integration tests can name.
    use super::*;
    use crossbeam_channel::bounded;

    fn spec(dir: &Path) -> RunSpec {
        RunSpec {
            command: "true".into(),
            steps: StepSupervisor::new(dir.join("no-such-supervisor")),
            env: vec![],
            env_allow: vec![],
            run_as: None,
            max_output: 1 << 20,
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
        let (_keep, cancel) = bounded::<Stop>(1);
        let r = run(&spec, &cancel, |_, _| called = true);
        assert!(!called);
        assert!(!r.started);
        assert_eq!(r.outcome, TaskOutcome::Failed);
        assert!(r.error.unwrap().contains("output directory"));
        assert!(!spec.workdir.exists());
    }

    #[test]
    fn a_missing_supervisor_fails_the_task_without_starting_it() {
        let dir = tempfile::tempdir().unwrap();
        let spec = spec(dir.path());
        let mut called = false;
        let (_keep, cancel) = bounded::<Stop>(1);
        let r = run(&spec, &cancel, |_, _| called = true);
        assert!(!called);
        assert!(!r.started);
        let error = r.error.unwrap();
        assert!(
            error.contains("cannot start the step supervisor"),
            "{error}"
        );
        assert!(error.contains("no-such-supervisor"), "{error}");
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

    #[test]
    fn paths_follow_the_documented_layout() {
        assert_eq!(
            output_path(Path::new("/var/log/jobz"), "r1", "build", "t1", 2).unwrap(),
            Path::new("/var/log/jobz/runs/r1/build.t1.2.log")
        );
        assert_eq!(
            workdir_path(Path::new("/var/lib/jobz/worker"), "t1", 2).unwrap(),
            Path::new("/var/lib/jobz/worker/work/t1.2")
        );
        // A job named like a parent reference is harmless inside a longer file name.
        assert_eq!(
            output_path(Path::new("/l"), "r1", "..", "t1", 1).unwrap(),
            Path::new("/l/runs/r1/...t1.1.log")
        );
    }

    #[test]
    fn hostile_ids_and_names_never_become_paths() {
        let long = "a".repeat(300);
        let hostile = [
            "",
            ".",
            "..",
            "../..",
            "../../etc",
            "/etc/passwd",
            "/",
            "a/b",
            "a\0b",
            "a\\b",
            "a b",
            "~root",
            "$(id)",
            "a\nb",
            long.as_str(),
        ];
        let log = Path::new("/var/log/jobz");
        for bad in hostile {
            assert!(!is_safe_file_name(bad), "{bad:?}");
            assert!(
                output_path(log, bad, "job", "t1", 1).is_err(),
                "run id {bad:?}"
            );
            assert!(
                output_path(log, "r1", "job", bad, 1).is_err(),
                "task id {bad:?}"
            );
            assert!(workdir_path(log, bad, 1).is_err(), "task id {bad:?}");
            if !bad.is_empty() && bad != "." && bad != ".." {
                let r = output_path(log, "r1", bad, "t1", 1);
                assert!(r.is_err(), "job {bad:?}: {r:?}");
            }
        }
        // Long parts that are each fine but make too long a file name are refused too.
        let job = "j".repeat(250);
        assert!(output_path(log, "r1", &job, "t1", 1).is_err());
        let err = output_path(log, "../x", "job", "t1", 1).unwrap_err();
        assert!(err.contains("run id"), "{err}");
    }

    #[test]
    fn the_step_environment_is_the_allow_list_only() {
        let worker: BTreeMap<&str, &str> = BTreeMap::from([
            ("PATH", "/opt/worker/bin:/usr/bin"),
            ("HOME", "/root"),
            ("LANG", "C.UTF-8"),
            ("JOBZ_KEY", "/etc/jobz/worker.key"),
            ("AWS_SECRET_ACCESS_KEY", "hunter2"),
            ("FOO", "bar"),
            ("JOBZ_PARAM_LEAKED", "x"),
        ]);
        let lookup = |n: &str| worker.get(n).map(OsString::from);
        let task = vec![("JOBZ_RUN_ID".to_string(), "r1".to_string())];
        let env = step_env(lookup, &[], None, &task);
        let names: Vec<&str> = env.keys().map(|k| k.to_str().unwrap()).collect();
        assert_eq!(names, ["HOME", "JOBZ_RUN_ID", "LANG", "PATH"]);
        assert_eq!(env[OsStr::new("PATH")], SAFE_PATH);

        let allow = vec!["FOO".to_string(), "PATH".to_string(), "UNSET".to_string()];
        let env = step_env(lookup, &allow, None, &task);
        assert_eq!(env[OsStr::new("FOO")], "bar");
        assert_eq!(env[OsStr::new("PATH")], "/opt/worker/bin:/usr/bin");
        assert!(!env.contains_key(OsStr::new("UNSET")));

        let user = User {
            name: "nobody".into(),
            uid: 65534,
            gid: 65534,
            home: "/nonexistent".into(),
        };
        // The user's entry wins over the worker's; the task's variables win over all.
        let task = vec![("USER".to_string(), "task".to_string())];
        let env = step_env(lookup, &[], Some(&user), &task);
        assert_eq!(env[OsStr::new("HOME")], "/nonexistent");
        assert_eq!(env[OsStr::new("LOGNAME")], "nobody");
        assert_eq!(env[OsStr::new("USER")], "task");
    }

    #[test]
    fn env_allow_names_are_variable_names() {
        for good in ["FOO", "_x", "PATH", "A1_B"] {
            assert!(is_valid_env_name(good), "{good}");
        }
        for bad in ["", "1A", "A-B", "A=B", "A B", "A\0"] {
            assert!(!is_valid_env_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn run_as_switches_only_from_root_and_refuses_otherwise() {
        let user = |uid| User {
            name: "svc".into(),
            uid,
            gid: 500,
            home: "/home/svc".into(),
        };
        let groups = |_: &User| Ok(vec![500, 20]);
        let root = plan_run_as(0, user(1000), groups).unwrap();
        assert_eq!(
            root.switch,
            Some(Switch {
                uid: 1000,
                gid: 500,
                groups: vec![500, 20]
            })
        );
        let same = plan_run_as(1000, user(1000), groups).unwrap();
        assert_eq!(same.switch, None);
        let err = plan_run_as(1001, user(1000), groups).unwrap_err();
        assert!(err.contains("not root") && err.contains("not run"), "{err}");
        assert!(resolve_run_as("no-such-user-jobz")
            .unwrap_err()
            .contains("no such user"));
        assert!(resolve_run_as("../root")
            .unwrap_err()
            .contains("not a valid"));
    }

    #[test]
    fn users_are_found_in_the_password_database() {
        let root = lookup_user("root").unwrap().unwrap();
        assert_eq!((root.uid, root.gid), (0, 0));
        assert_eq!(lookup_user("no-such-user-jobz").unwrap(), None);
        assert!(lookup_user("a\0b").is_err());
        let groups = group_list(&root).unwrap();
        assert!(groups.contains(&0), "{groups:?}");
    }

    #[test]
    fn the_credentials_wire_form_round_trips() {
        for switch in [
            Switch {
                uid: 65534,
                gid: 65534,
                groups: vec![],
            },
            Switch {
                uid: 1,
                gid: 2,
                groups: vec![2, 3, 4],
            },
        ] {
            assert_eq!(Switch::parse_arg(&switch.to_arg()), Some(switch));
        }
        for bad in ["", "1", "1:2", "x:2:", "1:2:a", "1:2:3,", "-1:2:"] {
            assert_eq!(Switch::parse_arg(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn truncation_is_reported_with_the_error_and_keeps_the_outcome() {
        let mut r = RunResult::not_started("boom".into());
        assert_eq!(r.reported_error().as_deref(), Some("boom"));
        r.truncated = Some(10);
        assert_eq!(
            r.reported_error().as_deref(),
            Some("boom; output truncated after 10 bytes")
        );
        r.error = None;
        assert_eq!(
            r.reported_error().as_deref(),
            Some("output truncated after 10 bytes")
        );
        assert_eq!(
            truncation_marker(10),
            "[jobz: output truncated after 10 bytes]\n"
        );
    }
}
