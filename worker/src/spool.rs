//! The spool: what a worker must remember across its own crash, on local disk.
//!
//! Layout under `--spool` (beside the per-task working directories under `work/`):
//! - `seen.log`: every attempt this worker accepted (started, or refused with a valid id),
//!   one line each, `<task_id> <attempt> <accepted_at_ms> <crc32 hex>`. Appended before
//!   the command starts, so a re-published assignment is never run twice, not even after a
//!   restart: fsynced for a refused attempt; for a started one the fsynced running entry
//!   (then its outbox entry) stands for the line until the broker has the result. Bounded: on open, and whenever the file has grown to twice
//!   [`SEEN_CAPACITY`] lines, it is rewritten without the entries older than
//!   [`SEEN_RETENTION_MS`] and beyond the newest [`SEEN_CAPACITY`].
//! - `running/<task_id>.<attempt>.json`: one file per attempt whose command may be running,
//!   written before the command starts and removed once its result is in the outbox. A file
//!   found here at start is an attempt the worker lost by dying.
//! - `outbox/<task_id>.<attempt>.json`: one file per result the broker has not
//!   acknowledged yet, written before the result is first sent and removed when the
//!   broker's `Ack` arrives. Results of refused tasks whose id is not a valid file name are
//!   stored as `refused-<uuid>.json`.
//!
//! Entry files are written whole under a temporary name (`.<name>.tmp`), fsynced, renamed
//! into place, and their directory fsynced: an entry is complete or absent, never torn.
//! Removals are not fsynced: a removal lost in a crash only means a result is sent once
//! more (the broker takes the first result of an attempt and acknowledges repeats) or a
//! stale running entry is found next to its result (then it is dropped). A line of
//! `seen.log` is checked by its CRC; a torn last line (the worker died mid-append, before
//! the command could start) fails the check like any other damage.
//!
//! Nothing corrupt is dropped silently and nothing corrupt stops the worker: a damaged
//! entry file is renamed `<name>.corrupt` and a damaged `seen.log` line is appended to
//! `seen.log.corrupt`, each with an error in the log.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use jobz::message::{TaskFinished, TaskOutcome, TaskRef};
use serde::{Deserialize, Serialize};
use tracing::{error, info, warn};

use crate::schedule::{is_valid_id, SEEN_CAPACITY};

/// How long an accepted attempt is remembered: far longer than the broker keeps offering
/// an assignment nobody started.
pub const SEEN_RETENTION_MS: i64 = 7 * 24 * 3600 * 1000;

/// Whether a `seen.log` line is fsynced before the append returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sync {
    /// Now: nothing else records the attempt durably.
    Now,
    /// Not: a spool entry fsynced just before records it (see [`Spool::start`]).
    Covered,
}

/// The error reported for an attempt found running at start.
pub const LOST_ERROR: &str = "worker restarted while the task ran; attempt lost";

/// The `worker.log` event for an attempt found running at start.
pub const LOST_EVENT: &str = "failed: worker restarted; attempt lost";

/// The file of accepted attempts.
pub const SEEN_FILE: &str = "seen.log";
/// Where damaged lines of [`SEEN_FILE`] are kept.
pub const SEEN_CORRUPT_FILE: &str = "seen.log.corrupt";
/// The directory of running attempts.
pub const RUNNING_DIR: &str = "running";
/// The directory of unacknowledged results.
pub const OUTBOX_DIR: &str = "outbox";

/// Entry files larger than this are damaged by definition (a result is a few KiB).
const MAX_ENTRY_BYTES: u64 = 1 << 20;

/// An attempt whose command may be running.
#[derive(Debug, Clone, PartialEq)]
pub struct RunningEntry {
    /// The run.
    pub run_id: String,
    /// The step.
    pub step_id: String,
    /// The job.
    pub job: String,
    /// Task id and attempt (the id is valid: it names the entry's file).
    pub task: TaskRef,
    /// The worker name the attempt was accepted under.
    pub worker: String,
    /// When the worker started it, ms since the epoch.
    pub started_at_ms: i64,
}

/// A result the broker has not acknowledged.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxEntry {
    /// The run.
    pub run_id: String,
    /// The step.
    pub step_id: String,
    /// The job.
    pub job: String,
    /// The message, as sent (and resent).
    pub result: TaskFinished,
}

/// What [`Spool::open`] found.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Every attempt remembered as accepted, oldest first (running and outbox ones too).
    pub seen: Vec<TaskRef>,
    /// Attempts that were running when the worker stopped, without a result: lost.
    pub running: Vec<RunningEntry>,
    /// Results still to be acknowledged, oldest first.
    pub outbox: Vec<OutboxEntry>,
    /// Damaged entries moved aside during this open (each was logged).
    pub set_aside: Vec<PathBuf>,
}

/// The worker's durable memory; see the module docs for the layout and its guarantees.
#[derive(Debug)]
pub struct Spool {
    running_dir: PathBuf,
    outbox_dir: PathBuf,
    seen: SeenLog,
    running: HashMap<TaskRef, PathBuf>,
    outbox: HashMap<TaskRef, PathBuf>,
}

impl Spool {
    /// Opens (creating) the spool under `root`, sets damaged entries aside, drops running
    /// entries whose result is already in the outbox, and returns what it holds.
    pub fn open(root: &Path, now_ms: i64) -> anyhow::Result<(Spool, Recovered)> {
        let running_dir = root.join(RUNNING_DIR);
        let outbox_dir = root.join(OUTBOX_DIR);
        for dir in [&running_dir, &outbox_dir] {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating spool directory {}", dir.display()))?;
        }
        let mut set_aside = Vec::new();
        let mut seen = SeenLog::open(root, now_ms, SEEN_CAPACITY, SEEN_RETENTION_MS)?;

        let mut outbox = HashMap::new();
        let mut outbox_entries = Vec::new();
        for (entry, path) in load_dir(&outbox_dir, decode_outbox, &mut set_aside)? {
            let task = entry.result.task.clone();
            if outbox.contains_key(&task) {
                // Only `refused-<uuid>` names can repeat an attempt: the first result stands.
                warn!(file = %path.display(), task_id = %entry.result.task.task_id,
                    attempt = entry.result.task.attempt, "dropping a second result of one attempt");
                remove_quietly(&path);
                continue;
            }
            outbox.insert(task, path);
            outbox_entries.push(entry);
        }
        outbox_entries.sort_by_key(|e| e.result.finished_at_ms);

        let mut running = HashMap::new();
        let mut running_entries = Vec::new();
        for (entry, path) in load_dir(&running_dir, decode_running, &mut set_aside)? {
            if outbox.contains_key(&entry.task) {
                // The result was written; only the removal of this entry was lost.
                remove_quietly(&path);
                continue;
            }
            running.insert(entry.task.clone(), path);
            running_entries.push(entry);
        }
        running_entries.sort_by_key(|e| e.started_at_ms);

        // An attempt in either directory counts as seen even if its line was damaged.
        let pending = running_entries
            .iter()
            .map(|e| &e.task)
            .chain(outbox_entries.iter().map(|e| &e.result.task));
        for task in pending {
            if is_valid_id(&task.task_id) && !seen.contains(task) {
                seen.append(task, now_ms, Sync::Now)?;
            }
        }

        let recovered = Recovered {
            seen: seen.tasks(),
            running: running_entries,
            outbox: outbox_entries,
            set_aside,
        };
        let spool = Spool {
            running_dir,
            outbox_dir,
            seen,
            running,
            outbox,
        };
        Ok((spool, recovered))
    }

    /// Records, durably, that `entry` is about to start: it is seen, and running. The
    /// command must not start unless this succeeded.
    pub fn start(&mut self, entry: &RunningEntry, now_ms: i64) -> anyhow::Result<()> {
        if !is_valid_id(&entry.task.task_id) {
            bail!("task id {:?} cannot name a spool entry", entry.task.task_id);
        }
        // The running entry first: a crash between the two writes then leaves an attempt
        // that is reported lost on restart (and retried). The other order left it "seen"
        // but never started, so the restarted worker ignored its redelivery for ever
        // (found by the 1,000-run kill -9 test).
        let name = format!("{}.{}.json", entry.task.task_id, entry.task.attempt);
        let path = self.running_dir.join(name);
        let bytes = encode(&RunningRecord::from(entry))?;
        write_atomically(&path, &bytes)?;
        self.running.insert(entry.task.clone(), path);
        // Not fsynced: until the broker has the attempt's result, the running entry just
        // written (fsynced) or the outbox entry that replaces it carries the attempt across
        // a crash (`open` counts both as seen); once both are gone the broker has
        // acknowledged the result and never offers the attempt again. One fsync fewer per
        // step.
        self.seen.append(&entry.task, now_ms, Sync::Covered)?;
        Ok(())
    }

    /// Records, durably, that `task` was accepted without starting (refused). Ids that are
    /// not valid are not remembered: refusing them again after a restart is harmless.
    pub fn mark_seen(&mut self, task: &TaskRef, now_ms: i64) -> anyhow::Result<()> {
        if is_valid_id(&task.task_id) {
            self.seen.append(task, now_ms, Sync::Now)?;
        }
        Ok(())
    }

    /// Stores a result durably, then forgets the attempt's running entry. Only after this
    /// may the result be sent.
    pub fn put_result(&mut self, entry: &OutboxEntry) -> anyhow::Result<()> {
        let task = &entry.result.task;
        let path = match self.outbox.get(task) {
            Some(path) => path.clone(),
            None if is_valid_id(&task.task_id) => self
                .outbox_dir
                .join(format!("{}.{}.json", task.task_id, task.attempt)),
            None => self
                .outbox_dir
                .join(format!("refused-{}.json", jobz::new_id())),
        };
        let bytes = encode(&OutboxRecord::from(entry))?;
        write_atomically(&path, &bytes)?;
        self.outbox.insert(task.clone(), path);
        if let Some(running) = self.running.remove(task) {
            remove_quietly(&running);
        }
        Ok(())
    }

    /// The broker acknowledged the result of `task`: forgets it.
    pub fn remove_result(&mut self, task: &TaskRef) {
        if let Some(path) = self.outbox.remove(task) {
            remove_quietly(&path);
        }
    }

    /// A result that can never be sent (it does not encode): moved aside, not dropped.
    pub fn set_aside_result(&mut self, task: &TaskRef, reason: &str) {
        if let Some(path) = self.outbox.remove(task) {
            set_aside(&path, reason);
        }
    }

    /// True if `task` is remembered as accepted.
    pub fn is_seen(&self, task: &TaskRef) -> bool {
        self.seen.contains(task)
    }

    /// Results not yet acknowledged.
    pub fn outbox_len(&self) -> usize {
        self.outbox.len()
    }

    /// Attempts recorded as running.
    pub fn running_len(&self) -> usize {
        self.running.len()
    }
}

/// The result to report for an attempt found running at start.
pub fn lost_result(entry: &RunningEntry, output_tail: String, now_ms: i64) -> OutboxEntry {
    OutboxEntry {
        run_id: entry.run_id.clone(),
        step_id: entry.step_id.clone(),
        job: entry.job.clone(),
        result: TaskFinished {
            task: entry.task.clone(),
            worker: entry.worker.clone(),
            outcome: TaskOutcome::Failed,
            exit_code: None,
            error: Some(LOST_ERROR.to_owned()),
            started_at_ms: entry.started_at_ms,
            // When the loss was found: the moment of the crash is not known.
            finished_at_ms: now_ms.max(entry.started_at_ms),
            output_tail,
        },
    }
}

// ---- Entry files ----------------------------------------------------------------------------

/// `running/*.json`, as stored. Fields added later must be `#[serde(default)]`.
#[derive(Debug, Serialize, Deserialize)]
struct RunningRecord {
    run_id: String,
    step_id: String,
    job: String,
    task_id: String,
    attempt: u32,
    worker: String,
    started_at_ms: i64,
}

impl From<&RunningEntry> for RunningRecord {
    fn from(e: &RunningEntry) -> Self {
        RunningRecord {
            run_id: e.run_id.clone(),
            step_id: e.step_id.clone(),
            job: e.job.clone(),
            task_id: e.task.task_id.clone(),
            attempt: e.task.attempt,
            worker: e.worker.clone(),
            started_at_ms: e.started_at_ms,
        }
    }
}

/// `outbox/*.json`, as stored. Kept apart from the wire type so either can change.
#[derive(Debug, Serialize, Deserialize)]
struct OutboxRecord {
    run_id: String,
    step_id: String,
    job: String,
    task_id: String,
    attempt: u32,
    worker: String,
    outcome: OutcomeRecord,
    #[serde(default)]
    exit_code: Option<i32>,
    #[serde(default)]
    error: Option<String>,
    started_at_ms: i64,
    finished_at_ms: i64,
    #[serde(default)]
    output_tail: String,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum OutcomeRecord {
    Succeeded,
    Failed,
    TimedOut,
    Cancelled,
}

impl From<&OutboxEntry> for OutboxRecord {
    fn from(e: &OutboxEntry) -> Self {
        let r = &e.result;
        OutboxRecord {
            run_id: e.run_id.clone(),
            step_id: e.step_id.clone(),
            job: e.job.clone(),
            task_id: r.task.task_id.clone(),
            attempt: r.task.attempt,
            worker: r.worker.clone(),
            outcome: match r.outcome {
                TaskOutcome::Succeeded => OutcomeRecord::Succeeded,
                TaskOutcome::Failed => OutcomeRecord::Failed,
                TaskOutcome::TimedOut => OutcomeRecord::TimedOut,
                TaskOutcome::Cancelled => OutcomeRecord::Cancelled,
            },
            exit_code: r.exit_code,
            error: r.error.clone(),
            started_at_ms: r.started_at_ms,
            finished_at_ms: r.finished_at_ms,
            output_tail: r.output_tail.clone(),
        }
    }
}

fn encode<T: Serialize>(record: &T) -> anyhow::Result<Vec<u8>> {
    let mut bytes = serde_json::to_vec(record).context("encoding a spool entry")?;
    bytes.push(b'\n');
    Ok(bytes)
}

fn decode_running(bytes: &[u8]) -> Result<RunningEntry, String> {
    let r: RunningRecord = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    // They were checked before the task started; a path is built from them again.
    for (what, id) in [
        ("run", &r.run_id),
        ("step", &r.step_id),
        ("task", &r.task_id),
    ] {
        if !is_valid_id(id) {
            return Err(format!("{what} id {id:?} is not valid"));
        }
    }
    if !jobz::jobfile::is_valid_name(&r.job) {
        return Err(format!("job name {:?} is not valid", r.job));
    }
    Ok(RunningEntry {
        run_id: r.run_id,
        step_id: r.step_id,
        job: r.job,
        task: TaskRef {
            task_id: r.task_id,
            attempt: r.attempt,
        },
        worker: r.worker,
        started_at_ms: r.started_at_ms,
    })
}

fn decode_outbox(bytes: &[u8]) -> Result<OutboxEntry, String> {
    let r: OutboxRecord = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    Ok(OutboxEntry {
        run_id: r.run_id,
        step_id: r.step_id,
        job: r.job,
        result: TaskFinished {
            task: TaskRef {
                task_id: r.task_id,
                attempt: r.attempt,
            },
            worker: r.worker,
            outcome: match r.outcome {
                OutcomeRecord::Succeeded => TaskOutcome::Succeeded,
                OutcomeRecord::Failed => TaskOutcome::Failed,
                OutcomeRecord::TimedOut => TaskOutcome::TimedOut,
                OutcomeRecord::Cancelled => TaskOutcome::Cancelled,
            },
            exit_code: r.exit_code,
            error: r.error,
            started_at_ms: r.started_at_ms,
            finished_at_ms: r.finished_at_ms,
            output_tail: r.output_tail,
        },
    })
}

/// Every `*.json` entry of `dir`, decoded; damaged ones are set aside, leftovers of an
/// interrupted write removed.
fn load_dir<T>(
    dir: &Path,
    decode: fn(&[u8]) -> Result<T, String>,
    set_aside_paths: &mut Vec<PathBuf>,
) -> anyhow::Result<Vec<(T, PathBuf)>> {
    let entries = std::fs::read_dir(dir)
        .with_context(|| format!("reading spool directory {}", dir.display()))?;
    let mut loaded = Vec::new();
    let mut old_corrupt = 0;
    for entry in entries {
        let entry = entry.with_context(|| format!("reading spool directory {}", dir.display()))?;
        let path = entry.path();
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            warn!(file = %path.display(), "ignoring a spool file whose name is not UTF-8");
            continue;
        };
        if name.starts_with('.') && name.ends_with(".tmp") {
            // Never renamed into place: the write it belongs to did not complete, and
            // nothing went ahead on its account.
            info!(file = %path.display(), "removing an incomplete spool write");
            remove_quietly(&path);
        } else if name.ends_with(".corrupt") {
            old_corrupt += 1;
        } else if name.ends_with(".json") {
            match read_limited(&path).and_then(|bytes| decode(&bytes)) {
                Ok(value) => loaded.push((value, path)),
                Err(reason) => {
                    set_aside(&path, &reason);
                    set_aside_paths.push(path);
                }
            }
        }
    }
    if old_corrupt > 0 {
        warn!(dir = %dir.display(), count = old_corrupt,
            "damaged spool entries set aside earlier are still there (*.corrupt)");
    }
    Ok(loaded)
}

fn read_limited(path: &Path) -> Result<Vec<u8>, String> {
    let file = File::open(path).map_err(|e| format!("cannot open: {e}"))?;
    let mut bytes = Vec::new();
    file.take(MAX_ENTRY_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read: {e}"))?;
    if bytes.len() as u64 > MAX_ENTRY_BYTES {
        return Err(format!("larger than {MAX_ENTRY_BYTES} bytes"));
    }
    Ok(bytes)
}

/// Renames a damaged entry to `<name>.corrupt`, saying why in the log.
fn set_aside(path: &Path, reason: &str) {
    let mut aside = path.as_os_str().to_owned();
    aside.push(".corrupt");
    let aside = PathBuf::from(aside);
    match std::fs::rename(path, &aside) {
        Ok(()) => error!(file = %path.display(), moved_to = %aside.display(), %reason,
            "damaged spool entry set aside"),
        Err(e) => error!(file = %path.display(), %reason, error = %e,
            "damaged spool entry cannot be set aside; it will be found again at the next start"),
    }
}

fn remove_quietly(path: &Path) {
    if let Err(e) = std::fs::remove_file(path) {
        if e.kind() != std::io::ErrorKind::NotFound {
            warn!(file = %path.display(), error = %e, "cannot remove a spool entry");
        }
    }
}

/// Writes `bytes` to `path` so that the file is complete or absent after a crash: written
/// under a temporary name, fsynced, renamed, and the directory fsynced.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = path
        .parent()
        .with_context(|| format!("{} has no directory", path.display()))?;
    let name = path
        .file_name()
        .with_context(|| format!("{} has no file name", path.display()))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    let written = (|| -> std::io::Result<()> {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        sync_dir(dir)
    })();
    if let Err(e) = written {
        remove_quietly(&tmp);
        return Err(e).with_context(|| format!("writing spool file {}", path.display()));
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

// ---- seen.log -----------------------------------------------------------------------------

/// The append-only, checksummed, bounded file of accepted attempts, and its contents.
#[derive(Debug)]
struct SeenLog {
    path: PathBuf,
    file: File,
    /// Bytes of whole lines in the file: a failed append is cut back to this.
    len: u64,
    /// Lines in the file, including ones superseded in memory.
    lines: usize,
    entries: VecDeque<(TaskRef, i64)>,
    members: HashSet<TaskRef>,
    capacity: usize,
    retention_ms: i64,
}

impl SeenLog {
    fn open(root: &Path, now_ms: i64, capacity: usize, retention_ms: i64) -> anyhow::Result<Self> {
        let path = root.join(SEEN_FILE);
        let corrupt_path = root.join(SEEN_CORRUPT_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let (parsed, damaged) = parse_seen(&bytes);
        if !damaged.is_empty() {
            set_aside_lines(&corrupt_path, &damaged);
        }
        let file_lines = parsed.len() + damaged.len();
        let mut log = SeenLog {
            file: open_append(&path)?,
            len: bytes.len() as u64,
            path,
            lines: file_lines,
            entries: VecDeque::new(),
            members: HashSet::new(),
            capacity: capacity.max(1),
            retention_ms,
        };
        for (task, at_ms) in parsed {
            log.remember(task, at_ms);
        }
        log.expire(now_ms);
        if log.entries.len() != file_lines {
            // Damaged, duplicate, expired or surplus lines: write the file as memory has it.
            log.rewrite()?;
        }
        Ok(log)
    }

    fn contains(&self, task: &TaskRef) -> bool {
        self.members.contains(task)
    }

    fn tasks(&self) -> Vec<TaskRef> {
        self.entries.iter().map(|(t, _)| t.clone()).collect()
    }

    /// Appends `task` and fsyncs; a task already remembered is not written again.
    fn append(&mut self, task: &TaskRef, now_ms: i64, sync: Sync) -> anyhow::Result<()> {
        if self.members.contains(task) {
            return Ok(());
        }
        let line = seen_line(task, now_ms);
        let written = self
            .file
            .write_all(line.as_bytes())
            .and_then(|()| match sync {
                Sync::Now => self.file.sync_data(),
                Sync::Covered => Ok(()),
            });
        if let Err(e) = written {
            // Cut a partial line back off, so the next append starts on a line of its own.
            let _ = self.file.set_len(self.len);
            return Err(e).with_context(|| format!("appending to {}", self.path.display()));
        }
        self.len += line.len() as u64;
        self.lines += 1;
        self.remember(task.clone(), now_ms);
        if self.lines >= 2 * self.capacity {
            self.expire(now_ms);
            self.rewrite()?;
        }
        Ok(())
    }

    fn remember(&mut self, task: TaskRef, at_ms: i64) {
        if !self.members.insert(task.clone()) {
            return;
        }
        self.entries.push_back((task, at_ms));
        while self.entries.len() > self.capacity {
            if let Some((oldest, _)) = self.entries.pop_front() {
                self.members.remove(&oldest);
            }
        }
    }

    fn expire(&mut self, now_ms: i64) {
        let horizon = now_ms.saturating_sub(self.retention_ms);
        while let Some((task, at_ms)) = self.entries.front() {
            if *at_ms >= horizon {
                break;
            }
            self.members.remove(task);
            self.entries.pop_front();
        }
        // Entries are in append order, which is time order unless the clock went back; an
        // entry out of order expires once those before it have.
    }

    /// Replaces the file with the entries in memory.
    fn rewrite(&mut self) -> anyhow::Result<()> {
        let text: String = self
            .entries
            .iter()
            .map(|(task, at_ms)| seen_line(task, *at_ms))
            .collect();
        write_atomically(&self.path, text.as_bytes())?;
        self.file = open_append(&self.path)?;
        self.len = text.len() as u64;
        self.lines = self.entries.len();
        Ok(())
    }
}

fn open_append(path: &Path) -> anyhow::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))
}

fn seen_line(task: &TaskRef, at_ms: i64) -> String {
    let body = format!("{} {} {}", task.task_id, task.attempt, at_ms);
    format!("{body} {:08x}\n", crc32(body.as_bytes()))
}

/// The good lines of a `seen.log` and the damaged ones (raw, without their newline). A last
/// line without a newline is torn and counts as damaged.
fn parse_seen(bytes: &[u8]) -> (Vec<(TaskRef, i64)>, Vec<Vec<u8>>) {
    let mut good = Vec::new();
    let mut damaged = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        let (line, torn) = match rest.iter().position(|&b| b == b'\n') {
            Some(end) => {
                let line = &rest[..end];
                rest = &rest[end + 1..];
                (line, false)
            }
            None => {
                let line = rest;
                rest = &[];
                (line, true)
            }
        };
        match (torn, parse_seen_line(line)) {
            (false, Some(entry)) => good.push(entry),
            _ => damaged.push(line.to_vec()),
        }
    }
    (good, damaged)
}

fn parse_seen_line(line: &[u8]) -> Option<(TaskRef, i64)> {
    let line = std::str::from_utf8(line).ok()?;
    let (body, crc) = line.rsplit_once(' ')?;
    if crc.len() != 8 || u32::from_str_radix(crc, 16).ok()? != crc32(body.as_bytes()) {
        return None;
    }
    let mut fields = body.split(' ');
    let (task_id, attempt, at_ms) = (fields.next()?, fields.next()?, fields.next()?);
    if fields.next().is_some() || !is_valid_id(task_id) {
        return None;
    }
    let task = TaskRef {
        task_id: task_id.to_owned(),
        attempt: attempt.parse().ok()?,
    };
    Some((task, at_ms.parse().ok()?))
}

/// Appends damaged lines to `seen.log.corrupt` before the log is rewritten without them.
fn set_aside_lines(corrupt_path: &Path, lines: &[Vec<u8>]) {
    let mut text = Vec::new();
    for line in lines {
        text.extend_from_slice(line);
        text.push(b'\n');
    }
    let written = OpenOptions::new()
        .create(true)
        .append(true)
        .open(corrupt_path)
        .and_then(|mut f| f.write_all(&text).and_then(|()| f.sync_data()));
    match written {
        Ok(()) => error!(count = lines.len(), moved_to = %corrupt_path.display(),
            "damaged lines of the seen-attempts log set aside (a torn last line means the \
             worker died while recording an attempt it had not started)"),
        Err(e) => error!(count = lines.len(), file = %corrupt_path.display(), error = %e,
            "damaged lines of the seen-attempts log cannot be set aside; they are dropped"),
    }
}

/// CRC-32 (IEEE 802.3, the one of zlib and PNG), with a table built at compile time.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc = (crc >> 8) ^ CRC_TABLE[((crc ^ u32::from(b)) & 0xFF) as usize];
    }
    !crc
}

const CRC_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
};

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_750_000_000_000;
    const DAY: i64 = 24 * 3600 * 1000;

    fn t(id: &str, attempt: u32) -> TaskRef {
        TaskRef {
            task_id: id.into(),
            attempt,
        }
    }

    fn running(id: &str) -> RunningEntry {
        RunningEntry {
            run_id: "r1".into(),
            step_id: "s1".into(),
            job: "build".into(),
            task: t(id, 1),
            worker: "w1".into(),
            started_at_ms: NOW,
        }
    }

    fn result(id: &str, attempt: u32) -> OutboxEntry {
        OutboxEntry {
            run_id: "r1".into(),
            step_id: "s1".into(),
            job: "build".into(),
            result: TaskFinished {
                task: t(id, attempt),
                worker: "w1".into(),
                outcome: TaskOutcome::TimedOut,
                exit_code: None,
                error: Some("timed out after 1s".into()),
                started_at_ms: NOW,
                finished_at_ms: NOW + 1000,
                output_tail: "é\nlast line\n".into(),
            },
        }
    }

    fn files(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn seen_attempts_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (mut spool, recovered) = Spool::open(dir.path(), NOW).unwrap();
        assert!(recovered.seen.is_empty());
        spool.start(&running("a"), NOW).unwrap();
        spool.mark_seen(&t("b", 2), NOW).unwrap();
        spool.mark_seen(&t("b", 2), NOW).unwrap();
        spool.mark_seen(&t("../x", 1), NOW).unwrap(); // not a valid id: not remembered
        drop(spool);
        let (spool, recovered) = Spool::open(dir.path(), NOW + 1).unwrap();
        assert_eq!(recovered.seen, vec![t("a", 1), t("b", 2)]);
        assert!(spool.is_seen(&t("b", 2)));
        assert!(!spool.is_seen(&t("b", 1)));
        let log = std::fs::read_to_string(dir.path().join(SEEN_FILE)).unwrap();
        assert_eq!(log.lines().count(), 2, "{log}");
    }

    #[test]
    fn results_come_back_until_removed_and_replace_their_running_entry() {
        let dir = tempfile::tempdir().unwrap();
        let (mut spool, _) = Spool::open(dir.path(), NOW).unwrap();
        spool.start(&running("a"), NOW).unwrap();
        assert_eq!(files(&dir.path().join(RUNNING_DIR)), vec!["a.1.json"]);
        spool.put_result(&result("a", 1)).unwrap();
        assert!(files(&dir.path().join(RUNNING_DIR)).is_empty());
        spool.put_result(&result("b", 3)).unwrap();
        assert_eq!(spool.outbox_len(), 2);
        drop(spool);

        let (mut spool, recovered) = Spool::open(dir.path(), NOW).unwrap();
        assert!(recovered.running.is_empty());
        assert_eq!(recovered.outbox, vec![result("a", 1), result("b", 3)]);
        spool.remove_result(&t("a", 1));
        drop(spool);
        let (_, recovered) = Spool::open(dir.path(), NOW).unwrap();
        assert_eq!(recovered.outbox, vec![result("b", 3)]);
        assert_eq!(files(&dir.path().join(OUTBOX_DIR)), vec!["b.3.json"]);
    }

    #[test]
    fn an_attempt_left_running_comes_back_as_lost() {
        let dir = tempfile::tempdir().unwrap();
        let (mut spool, _) = Spool::open(dir.path(), NOW).unwrap();
        spool.start(&running("a"), NOW).unwrap();
        drop(spool); // the worker dies while `a` runs

        let (mut spool, recovered) = Spool::open(dir.path(), NOW + 5000).unwrap();
        assert_eq!(recovered.running, vec![running("a")]);
        assert_eq!(spool.running_len(), 1);
        let lost = lost_result(&recovered.running[0], "partial\n".into(), NOW + 5000);
        assert_eq!(lost.result.outcome, TaskOutcome::Failed);
        assert_eq!(lost.result.error.as_deref(), Some(LOST_ERROR));
        assert_eq!(lost.result.worker, "w1");
        assert_eq!(lost.result.finished_at_ms, NOW + 5000);
        spool.put_result(&lost).unwrap();
        assert_eq!(spool.running_len(), 0);
        drop(spool);

        let (_, recovered) = Spool::open(dir.path(), NOW + 6000).unwrap();
        assert!(recovered.running.is_empty(), "reported once, not again");
        assert_eq!(recovered.outbox, vec![lost]);
        assert!(recovered.seen.contains(&t("a", 1)));
    }

    #[test]
    fn a_running_entry_next_to_its_result_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let (mut spool, _) = Spool::open(dir.path(), NOW).unwrap();
        spool.start(&running("a"), NOW).unwrap();
        spool.put_result(&result("a", 1)).unwrap();
        drop(spool);
        // As if the removal of the running entry had been lost in a crash.
        let bytes = encode(&RunningRecord::from(&running("a"))).unwrap();
        write_atomically(&dir.path().join("running/a.1.json"), &bytes).unwrap();

        let (_, recovered) = Spool::open(dir.path(), NOW).unwrap();
        assert!(recovered.running.is_empty());
        assert_eq!(recovered.outbox.len(), 1);
        assert!(files(&dir.path().join(RUNNING_DIR)).is_empty());
    }

    #[test]
    fn damaged_entries_are_set_aside_and_incomplete_writes_removed() {
        let dir = tempfile::tempdir().unwrap();
        let (mut spool, _) = Spool::open(dir.path(), NOW).unwrap();
        spool.put_result(&result("good", 1)).unwrap();
        drop(spool);
        let outbox = dir.path().join(OUTBOX_DIR);
        std::fs::write(outbox.join("bad.1.json"), b"{\"run_id\": \"r1\", tr").unwrap();
        std::fs::write(outbox.join(".half.1.json.tmp"), b"{").unwrap();
        std::fs::write(dir.path().join("running/x.1.json"), b"\xff\xfe").unwrap();
        let mut huge = vec![b' '; MAX_ENTRY_BYTES as usize + 1];
        huge[0] = b'{';
        std::fs::write(outbox.join("huge.1.json"), huge).unwrap();

        let (_, recovered) = Spool::open(dir.path(), NOW).unwrap();
        assert_eq!(recovered.outbox, vec![result("good", 1)]);
        assert!(recovered.running.is_empty());
        assert_eq!(recovered.set_aside.len(), 3);
        assert_eq!(
            files(&outbox),
            vec!["bad.1.json.corrupt", "good.1.json", "huge.1.json.corrupt"]
        );
        assert_eq!(
            files(&dir.path().join(RUNNING_DIR)),
            vec!["x.1.json.corrupt"]
        );
        // Set aside once: a second open finds nothing new.
        let (_, recovered) = Spool::open(dir.path(), NOW).unwrap();
        assert!(recovered.set_aside.is_empty());
    }

    #[test]
    fn damaged_and_torn_seen_lines_are_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let (mut spool, _) = Spool::open(dir.path(), NOW).unwrap();
        for id in ["a", "b", "c"] {
            spool.mark_seen(&t(id, 1), NOW).unwrap();
        }
        drop(spool);
        let path = dir.path().join(SEEN_FILE);
        let mut text = std::fs::read_to_string(&path).unwrap();
        text = text.replacen("b 1", "b 7", 1); // checksum no longer matches
        text.push_str("d 1 17500"); // torn: the worker died mid-append
        std::fs::write(&path, text).unwrap();

        let (mut spool, recovered) = Spool::open(dir.path(), NOW).unwrap();
        assert_eq!(recovered.seen, vec![t("a", 1), t("c", 1)]);
        let corrupt = std::fs::read_to_string(dir.path().join(SEEN_CORRUPT_FILE)).unwrap();
        assert_eq!(corrupt.lines().count(), 2, "{corrupt}");
        assert!(corrupt.contains("b 7 ") && corrupt.contains("d 1 17500"));
        // The log was rewritten clean, and appends start on a line of their own.
        spool.mark_seen(&t("e", 1), NOW).unwrap();
        drop(spool);
        let (_, recovered) = Spool::open(dir.path(), NOW).unwrap();
        assert_eq!(recovered.seen, vec![t("a", 1), t("c", 1), t("e", 1)]);
    }

    #[test]
    fn seen_entries_expire_after_the_retention_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let (mut spool, _) = Spool::open(dir.path(), NOW).unwrap();
        spool.mark_seen(&t("old", 1), NOW - 8 * DAY).unwrap();
        spool.mark_seen(&t("recent", 1), NOW - 6 * DAY).unwrap();
        drop(spool);
        let (_, recovered) = Spool::open(dir.path(), NOW).unwrap();
        assert_eq!(recovered.seen, vec![t("recent", 1)]);
        let log = std::fs::read_to_string(dir.path().join(SEEN_FILE)).unwrap();
        assert!(!log.contains("old"), "{log}");
    }

    #[test]
    fn the_seen_log_is_bounded_and_compacted_when_it_doubles() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = SeenLog::open(dir.path(), NOW, 3, SEEN_RETENTION_MS).unwrap();
        for i in 0..5 {
            log.append(&t(&format!("t{i}"), 1), NOW, Sync::Now).unwrap();
        }
        assert_eq!(log.tasks(), vec![t("t2", 1), t("t3", 1), t("t4", 1)]);
        assert_eq!(log.lines, 5, "not yet compacted");
        log.append(&t("t5", 1), NOW, Sync::Now).unwrap();
        assert_eq!(log.lines, 3, "compacted at twice the capacity");
        let text = std::fs::read_to_string(dir.path().join(SEEN_FILE)).unwrap();
        assert_eq!(text.lines().count(), 3);
        drop(log);
        let log = SeenLog::open(dir.path(), NOW, 3, SEEN_RETENTION_MS).unwrap();
        assert_eq!(log.tasks(), vec![t("t3", 1), t("t4", 1), t("t5", 1)]);
        assert!(!log.contains(&t("t0", 1)));
    }

    #[test]
    fn a_result_with_an_id_unfit_for_a_file_name_is_still_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (mut spool, _) = Spool::open(dir.path(), NOW).unwrap();
        let mut refused = result("x", 1);
        refused.result.task.task_id = "../../etc/passwd".into();
        spool.put_result(&refused).unwrap();
        spool.put_result(&refused).unwrap(); // the same attempt again: one file
        let names = files(&dir.path().join(OUTBOX_DIR));
        assert_eq!(names.len(), 1);
        assert!(names[0].starts_with("refused-"), "{names:?}");
        drop(spool);
        let (mut spool, recovered) = Spool::open(dir.path(), NOW).unwrap();
        assert_eq!(recovered.outbox, vec![refused.clone()]);
        spool.remove_result(&refused.result.task);
        assert!(files(&dir.path().join(OUTBOX_DIR)).is_empty());
    }

    #[test]
    fn an_unsendable_result_is_set_aside_not_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let (mut spool, _) = Spool::open(dir.path(), NOW).unwrap();
        spool.put_result(&result("a", 1)).unwrap();
        spool.set_aside_result(&t("a", 1), "too large");
        assert_eq!(
            files(&dir.path().join(OUTBOX_DIR)),
            vec!["a.1.json.corrupt"]
        );
    }

    #[test]
    fn stored_entries_of_this_version_still_load() {
        // The on-disk format is a compatibility promise: these bytes must keep loading.
        let dir = tempfile::tempdir().unwrap();
        let (spool, _) = Spool::open(dir.path(), NOW).unwrap();
        drop(spool);
        std::fs::write(
            dir.path().join("outbox/t1.2.json"),
            r#"{"run_id":"r1","step_id":"s1","job":"build","task_id":"t1","attempt":2,
               "worker":"w1","outcome":"failed","exit_code":3,"started_at_ms":1,
               "finished_at_ms":2}"#,
        )
        .unwrap();
        std::fs::write(
            dir.path().join("running/t2.1.json"),
            r#"{"run_id":"r1","step_id":"s1","job":"build","task_id":"t2","attempt":1,
               "worker":"w1","started_at_ms":1}"#,
        )
        .unwrap();
        std::fs::write(
            dir.path().join(SEEN_FILE),
            format!(
                "t0 1 {NOW} {:08x}\n",
                crc32(format!("t0 1 {NOW}").as_bytes())
            ),
        )
        .unwrap();
        let (_, recovered) = Spool::open(dir.path(), NOW).unwrap();
        assert_eq!(recovered.outbox[0].result.exit_code, Some(3));
        assert_eq!(recovered.outbox[0].result.output_tail, "");
        assert_eq!(recovered.running[0].task, t("t2", 1));
        assert_eq!(recovered.seen, vec![t("t0", 1), t("t2", 1), t("t1", 2)]);
    }
}
