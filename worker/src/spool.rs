//! The spool: what a worker must remember across its own crash, on local disk.
//!
//! Layout under `--spool` (beside the per-task working directories under `work/`):
//! - `seen.log`: every attempt this worker accepted (started, or refused with a valid id),
//!   one line each, `<task_id> <attempt> <accepted_at_ms> <crc32 hex>`. Appended before
//!   the command starts, so a re-published assignment is never run twice, not even after a
//!   restart: fsynced for a refused attempt; for a started one the fsynced `running`
//!   record of the journal (then its `result`) stands for the line until the broker has
//!   the result. Bounded: on open, and whenever the file has grown to twice
//!   [`SEEN_CAPACITY`] lines, it is rewritten without the entries older than
//!   [`SEEN_RETENTION_MS`] and beyond the newest [`SEEN_CAPACITY`].
//! - `journal.log`: the attempts whose command may be running and the results the broker
//!   has not acknowledged, as appended records, one line each, `<crc32 hex> <json>`:
//!   `running` (written and fdatasynced before the command starts; found at start without
//!   a result, it is an attempt the worker lost by dying), `result` (written and
//!   fdatasynced before the result is first sent; it supersedes the attempt's `running`)
//!   and `done` (the broker acknowledged the result). One append and one fdatasync per
//!   event, where a file per entry cost a create, a rename, two fsyncs and an unlink.
//!   `done` is not synced: lost in a crash, it only means a result is sent once more (the
//!   broker takes the first result of an attempt and acknowledges repeats). The journal is
//!   rewritten with only what it still holds at every start and once it has grown past
//!   [`JOURNAL_COMPACT_BYTES`] (under a temporary name, fsynced, renamed, the directory
//!   fsynced).
//!
//! Spools of earlier versions (`running/*.json`, `outbox/*.json`, one file per entry) are
//! read at start, taken into the journal, and their files removed.
//!
//! Nothing corrupt is dropped silently and nothing corrupt stops the worker: a damaged
//! line of `seen.log` or `journal.log` is appended to `seen.log.corrupt` or
//! `journal.log.corrupt` (a torn last line too: the worker died mid-append, before it
//! acted on it), a damaged legacy entry file is renamed `<name>.corrupt`, each with an
//! error in the log.

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
    /// Not: a journal record fsynced just before records it (see [`Spool::start`]).
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
/// The journal of running attempts and unacknowledged results.
pub const JOURNAL_FILE: &str = "journal.log";
/// Where damaged lines of [`JOURNAL_FILE`], and results that can never be sent, are kept.
pub const JOURNAL_CORRUPT_FILE: &str = "journal.log.corrupt";
/// The directory of running attempts of spools before the journal (read at start).
pub const RUNNING_DIR: &str = "running";
/// The directory of unacknowledged results of spools before the journal (read at start).
pub const OUTBOX_DIR: &str = "outbox";

/// The journal is rewritten with only what it holds once it is this long.
pub const JOURNAL_COMPACT_BYTES: u64 = 1 << 20;

/// Legacy entry files larger than this are damaged by definition (a result is a few KiB).
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
    /// Task id and attempt (the id is valid: it names the attempt's paths).
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
    /// Where damaged entries went during this open, one item per entry (each was logged).
    pub set_aside: Vec<PathBuf>,
}

/// The worker's durable memory; see the module docs for the layout and its guarantees.
#[derive(Debug)]
pub struct Spool {
    root: PathBuf,
    seen: SeenLog,
    journal: Journal,
    running: HashMap<TaskRef, RunningEntry>,
    outbox: HashMap<TaskRef, OutboxEntry>,
}

impl Spool {
    /// Opens (creating) the spool under `root`, sets damaged entries aside, takes a legacy
    /// spool's entry files into the journal, drops running attempts whose result is
    /// already kept, and returns what it holds.
    pub fn open(root: &Path, now_ms: i64) -> anyhow::Result<(Spool, Recovered)> {
        std::fs::create_dir_all(root)
            .with_context(|| format!("creating spool directory {}", root.display()))?;
        let mut set_aside = Vec::new();
        let mut seen = SeenLog::open(root, now_ms, SEEN_CAPACITY, SEEN_RETENTION_MS)?;
        let (mut running, mut outbox) = read_journal(root, &mut set_aside)?;
        let legacy = read_legacy_dirs(root, &mut running, &mut outbox, &mut set_aside)?;
        // The result was kept; only the end of the running attempt's record was lost.
        running.retain(|task, _| !outbox.contains_key(task));

        // An attempt still pending counts as seen even if its seen line was damaged.
        for task in running.keys().chain(outbox.keys()) {
            if is_valid_id(&task.task_id) && !seen.contains(task) {
                seen.append(task, now_ms, Sync::Now)?;
            }
        }
        let mut spool = Spool {
            journal: Journal::open(root)?,
            root: root.to_owned(),
            seen,
            running,
            outbox,
        };
        // Acknowledged results, damaged and torn lines and legacy files: all gone from here.
        spool.compact()?;
        for path in legacy {
            remove_quietly(&path);
        }
        for dir in [RUNNING_DIR, OUTBOX_DIR] {
            let _ = std::fs::remove_dir(root.join(dir)); // only if nothing was set aside there
        }
        let recovered = Recovered {
            seen: spool.seen.tasks(),
            running: spool.running_entries(),
            outbox: spool.outbox_entries(),
            set_aside,
        };
        Ok((spool, recovered))
    }

    /// Records, durably, that `entry` is about to start: it is seen, and running. The
    /// command must not start unless this succeeded.
    pub fn start(&mut self, entry: &RunningEntry, now_ms: i64) -> anyhow::Result<()> {
        if !is_valid_id(&entry.task.task_id) {
            bail!("task id {:?} cannot name a spool entry", entry.task.task_id);
        }
        // The running record first: a crash between the two writes then leaves an attempt
        // that is reported lost on restart (and retried). The other order left it "seen"
        // but never started, so the restarted worker ignored its redelivery for ever
        // (found by the 1,000-run kill -9 test).
        self.journal.append(
            &JournalRecord::Running(RunningRecord::from(entry)),
            Durably::Yes,
        )?;
        self.running.insert(entry.task.clone(), entry.clone());
        // Not fsynced: until the broker has the attempt's result, the running record just
        // written (fsynced) or the result that supersedes it carries the attempt across a
        // crash (`open` counts both as seen); once the result is done the broker has
        // acknowledged it and never offers the attempt again.
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

    /// Stores a result durably, superseding the attempt's running record. Only after this
    /// may the result be sent.
    pub fn put_result(&mut self, entry: &OutboxEntry) -> anyhow::Result<()> {
        self.journal.append(
            &JournalRecord::Result(OutboxRecord::from(entry)),
            Durably::Yes,
        )?;
        let task = &entry.result.task;
        self.outbox.insert(task.clone(), entry.clone());
        self.running.remove(task);
        Ok(())
    }

    /// The broker acknowledged the result of `task`: forgets it.
    pub fn remove_result(&mut self, task: &TaskRef) {
        if self.outbox.remove(task).is_some() {
            self.forget(task);
        }
    }

    /// A result that can never be sent (it does not encode): moved aside, not dropped.
    pub fn set_aside_result(&mut self, task: &TaskRef, reason: &str) {
        let Some(entry) = self.outbox.remove(task) else {
            return;
        };
        let corrupt = self.root.join(JOURNAL_CORRUPT_FILE);
        match journal_line(&JournalRecord::Result(OutboxRecord::from(&entry))) {
            Ok(line) => set_aside_lines(
                &corrupt,
                &[line],
                &format!("a result that cannot be sent ({reason})"),
            ),
            Err(e) => error!(task_id = %task.task_id, attempt = task.attempt, error = %e,
                %reason, "a result that cannot be sent cannot be set aside either; dropped"),
        }
        self.forget(task);
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

    /// Appends the `done` record of `task` (not synced: see the module docs), and
    /// compacts the journal when it has grown enough.
    fn forget(&mut self, task: &TaskRef) {
        let done = JournalRecord::Done {
            task_id: task.task_id.clone(),
            attempt: task.attempt,
        };
        if let Err(e) = self.journal.append(&done, Durably::No) {
            // Harmless: the result is sent again after a restart, and acknowledged again.
            warn!(error = %e, "cannot record an acknowledged result in the spool journal");
        }
        if self.journal.len >= JOURNAL_COMPACT_BYTES {
            if let Err(e) = self.compact() {
                warn!(error = %e, "cannot compact the spool journal; appending on");
            }
        }
    }

    fn running_entries(&self) -> Vec<RunningEntry> {
        let mut entries: Vec<RunningEntry> = self.running.values().cloned().collect();
        entries.sort_by(|a, b| (a.started_at_ms, &a.task).cmp(&(b.started_at_ms, &b.task)));
        entries
    }

    fn outbox_entries(&self) -> Vec<OutboxEntry> {
        let mut entries: Vec<OutboxEntry> = self.outbox.values().cloned().collect();
        entries.sort_by(|a, b| {
            (a.result.finished_at_ms, &a.result.task)
                .cmp(&(b.result.finished_at_ms, &b.result.task))
        });
        entries
    }

    /// Rewrites the journal with what it holds: running attempts, then results.
    fn compact(&mut self) -> anyhow::Result<()> {
        let mut text = Vec::new();
        for entry in self.running_entries() {
            text.extend(journal_line(&JournalRecord::Running(RunningRecord::from(
                &entry,
            )))?);
        }
        for entry in self.outbox_entries() {
            text.extend(journal_line(&JournalRecord::Result(OutboxRecord::from(
                &entry,
            )))?);
        }
        self.journal.rewrite(&text)
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

// ---- The journal ----------------------------------------------------------------------------

/// One line of `journal.log`. Fields added later must be `#[serde(default)]`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum JournalRecord {
    /// The attempt's command may be running.
    Running(RunningRecord),
    /// The attempt's result, not yet acknowledged.
    Result(OutboxRecord),
    /// The broker acknowledged the attempt's result (or it was set aside).
    Done { task_id: String, attempt: u32 },
}

/// Whether an append is fdatasynced before it returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Durably {
    Yes,
    No,
}

/// The append-only file behind [`Spool`]'s running attempts and results.
#[derive(Debug)]
struct Journal {
    path: PathBuf,
    file: File,
    /// Bytes of whole lines in the file: a failed append is cut back to this.
    len: u64,
}

impl Journal {
    fn open(root: &Path) -> anyhow::Result<Journal> {
        let path = root.join(JOURNAL_FILE);
        let file = open_append(&path)?;
        let len = file
            .metadata()
            .with_context(|| format!("reading {}", path.display()))?
            .len();
        Ok(Journal { path, file, len })
    }

    fn append(&mut self, record: &JournalRecord, durably: Durably) -> anyhow::Result<()> {
        let line = journal_line(record)?;
        let written = self.file.write_all(&line).and_then(|()| match durably {
            Durably::Yes => self.file.sync_data(),
            Durably::No => Ok(()),
        });
        if let Err(e) = written {
            // Cut a partial line back off, so the next append starts on a line of its own.
            let _ = self.file.set_len(self.len);
            return Err(e).with_context(|| format!("appending to {}", self.path.display()));
        }
        self.len += line.len() as u64;
        Ok(())
    }

    /// Replaces the file with `text` (whole lines), atomically.
    fn rewrite(&mut self, text: &[u8]) -> anyhow::Result<()> {
        write_atomically(&self.path, text)?;
        self.file = open_append(&self.path)?;
        self.len = text.len() as u64;
        Ok(())
    }
}

/// `<crc32 of the json, 8 hex digits> <json>\n` (JSON escapes every newline in a string).
fn journal_line(record: &JournalRecord) -> anyhow::Result<Vec<u8>> {
    let body = serde_json::to_vec(record).context("encoding a spool journal record")?;
    let mut line = format!("{:08x} ", crc32(&body)).into_bytes();
    line.extend_from_slice(&body);
    line.push(b'\n');
    Ok(line)
}

fn parse_journal_line(line: &[u8]) -> Result<JournalRecord, String> {
    if line.len() <= 9 || line[8] != b' ' {
        return Err("no checksum".into());
    }
    let (crc, body) = (&line[..8], &line[9..]);
    let crc = std::str::from_utf8(crc)
        .ok()
        .and_then(|c| u32::from_str_radix(c, 16).ok())
        .ok_or("no checksum")?;
    if crc != crc32(body) {
        return Err("checksum mismatch".into());
    }
    serde_json::from_slice(body).map_err(|e| e.to_string())
}

/// What `journal.log` holds: running attempts and unacknowledged results. Damaged lines
/// (and a torn last one) go to `journal.log.corrupt`.
type Pending = (
    HashMap<TaskRef, RunningEntry>,
    HashMap<TaskRef, OutboxEntry>,
);

/// Damaged lines, each with why.
type Damaged = Vec<(Vec<u8>, String)>;

fn read_journal(root: &Path, set_aside_paths: &mut Vec<PathBuf>) -> anyhow::Result<Pending> {
    let path = root.join(JOURNAL_FILE);
    let bytes = read_if_there(&path)?;
    let (running, outbox, damaged) = replay(&bytes);
    for (_, reason) in &damaged {
        error!(file = %path.display(), %reason, "damaged spool journal line");
    }
    if !damaged.is_empty() {
        let corrupt = root.join(JOURNAL_CORRUPT_FILE);
        let lines: Vec<Vec<u8>> = damaged.into_iter().map(|(line, _)| line).collect();
        set_aside_lines(&corrupt, &lines, "damaged lines of the spool journal");
        set_aside_paths.extend(lines.iter().map(|_| corrupt.clone()));
    }
    Ok((running, outbox))
}

/// The results the spool under `root` holds now, oldest first, read without changing
/// anything (for tests and for a look at a live worker's spool).
pub fn pending_results(root: &Path) -> anyhow::Result<Vec<TaskRef>> {
    let (_, outbox, _) = replay(&read_if_there(&root.join(JOURNAL_FILE))?);
    let mut entries: Vec<OutboxEntry> = outbox.into_values().collect();
    entries.sort_by_key(|e| (e.result.finished_at_ms, e.result.task.clone()));
    Ok(entries.into_iter().map(|e| e.result.task).collect())
}

fn read_if_there(path: &Path) -> anyhow::Result<Vec<u8>> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(bytes),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Applies the journal's lines in order; returns what is pending and the damaged lines
/// with why.
fn replay(
    bytes: &[u8],
) -> (
    HashMap<TaskRef, RunningEntry>,
    HashMap<TaskRef, OutboxEntry>,
    Damaged,
) {
    let mut running = HashMap::new();
    let mut outbox = HashMap::new();
    let mut damaged = Vec::new();
    for (line, torn) in lines(bytes) {
        let record = if torn {
            Err("torn: the worker died while appending it, before it acted on it".to_owned())
        } else {
            parse_journal_line(line).and_then(|record| match record {
                JournalRecord::Running(r) => running_from_record(r).map(|entry| {
                    running.insert(entry.task.clone(), entry);
                }),
                JournalRecord::Result(r) => {
                    let entry = outbox_from_record(r);
                    running.remove(&entry.result.task);
                    outbox.insert(entry.result.task.clone(), entry);
                    Ok(())
                }
                JournalRecord::Done { task_id, attempt } => {
                    let task = TaskRef { task_id, attempt };
                    running.remove(&task);
                    outbox.remove(&task);
                    Ok(())
                }
            })
        };
        if let Err(reason) = record {
            damaged.push((line.to_vec(), reason));
        }
    }
    (running, outbox, damaged)
}

/// The lines of `bytes` without their newline, each with whether it is torn (a last line
/// without a newline).
fn lines(bytes: &[u8]) -> impl Iterator<Item = (&[u8], bool)> {
    let mut rest = bytes;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        Some(match rest.iter().position(|&b| b == b'\n') {
            Some(end) => {
                let line = &rest[..end];
                rest = &rest[end + 1..];
                (line, false)
            }
            None => (std::mem::take(&mut rest), true),
        })
    })
}

/// Takes the entry files of a spool from before the journal into `running` and `outbox`
/// (the journal's entries win: they are newer). Returns the files taken, to remove once
/// the journal holds them.
fn read_legacy_dirs(
    root: &Path,
    running: &mut HashMap<TaskRef, RunningEntry>,
    outbox: &mut HashMap<TaskRef, OutboxEntry>,
    set_aside_paths: &mut Vec<PathBuf>,
) -> anyhow::Result<Vec<PathBuf>> {
    let mut taken = Vec::new();
    let outbox_dir = root.join(OUTBOX_DIR);
    if outbox_dir.is_dir() {
        for (entry, path) in load_dir(&outbox_dir, decode_outbox, set_aside_paths)? {
            outbox.entry(entry.result.task.clone()).or_insert(entry);
            taken.push(path);
        }
    }
    let running_dir = root.join(RUNNING_DIR);
    if running_dir.is_dir() {
        for (entry, path) in load_dir(&running_dir, decode_running, set_aside_paths)? {
            running.entry(entry.task.clone()).or_insert(entry);
            taken.push(path);
        }
    }
    if !taken.is_empty() {
        info!(
            entries = taken.len(),
            "taking a spool of an earlier version into the journal"
        );
    }
    Ok(taken)
}

fn decode_running(bytes: &[u8]) -> Result<RunningEntry, String> {
    running_from_record(serde_json::from_slice(bytes).map_err(|e| e.to_string())?)
}

fn running_from_record(r: RunningRecord) -> Result<RunningEntry, String> {
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
    Ok(outbox_from_record(r))
}

fn outbox_from_record(r: OutboxRecord) -> OutboxEntry {
    OutboxEntry {
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
    }
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
            set_aside_lines(
                &corrupt_path,
                &damaged,
                "damaged lines of the seen-attempts log (a torn last line means the worker \
                 died while recording an attempt it had not started)",
            );
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

/// Appends damaged `lines` (`what` they are) to `corrupt_path` before the file they came
/// from is rewritten without them.
fn set_aside_lines(corrupt_path: &Path, lines: &[Vec<u8>], what: &str) {
    let mut text = Vec::new();
    for line in lines {
        text.extend_from_slice(line);
        if !line.ends_with(b"\n") {
            text.push(b'\n');
        }
    }
    let written = OpenOptions::new()
        .create(true)
        .append(true)
        .open(corrupt_path)
        .and_then(|mut f| f.write_all(&text).and_then(|()| f.sync_data()));
    match written {
        Ok(()) => error!(count = lines.len(), moved_to = %corrupt_path.display(),
            "{what}: set aside"),
        Err(e) => error!(count = lines.len(), file = %corrupt_path.display(), error = %e,
            "{what}: cannot be set aside; dropped"),
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

    /// The journal's records, as JSON text, one per line.
    fn journal(dir: &Path) -> Vec<String> {
        std::fs::read_to_string(dir.join(JOURNAL_FILE))
            .unwrap()
            .lines()
            .map(|l| l[9..].to_owned())
            .collect()
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
        assert_eq!(spool.running_len(), 1);
        spool.put_result(&result("a", 1)).unwrap();
        assert_eq!(spool.running_len(), 0);
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
        let records = journal(dir.path());
        assert_eq!(
            records.len(),
            1,
            "rewritten at open with what it holds: {records:?}"
        );
        assert!(records[0].starts_with(r#"{"result":{"#), "{records:?}");
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
    fn a_legacy_running_entry_next_to_its_result_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let (mut spool, _) = Spool::open(dir.path(), NOW).unwrap();
        spool.start(&running("a"), NOW).unwrap();
        spool.put_result(&result("a", 1)).unwrap();
        drop(spool);
        // A running entry of an earlier version's spool, whose removal was lost.
        std::fs::create_dir(dir.path().join(RUNNING_DIR)).unwrap();
        let bytes = serde_json::to_vec(&RunningRecord::from(&running("a"))).unwrap();
        std::fs::write(dir.path().join("running/a.1.json"), bytes).unwrap();

        let (_, recovered) = Spool::open(dir.path(), NOW).unwrap();
        assert!(recovered.running.is_empty());
        assert_eq!(recovered.outbox.len(), 1);
        assert!(!dir.path().join(RUNNING_DIR).exists());
    }

    #[test]
    fn damaged_and_torn_journal_lines_are_set_aside_and_the_rest_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (mut spool, _) = Spool::open(dir.path(), NOW).unwrap();
        spool.put_result(&result("good", 1)).unwrap();
        spool.put_result(&result("bad", 1)).unwrap();
        spool.start(&running("run"), NOW).unwrap();
        drop(spool);
        let path = dir.path().join(JOURNAL_FILE);
        let mut text = std::fs::read_to_string(&path).unwrap();
        text = text.replacen(r#""task_id":"bad""#, r#""task_id":"bxd""#, 1); // checksum
        text.push_str("0badc0de {\"result\":{\"run_id"); // torn: died mid-append
        std::fs::write(&path, text).unwrap();

        let (mut spool, recovered) = Spool::open(dir.path(), NOW).unwrap();
        assert_eq!(recovered.outbox, vec![result("good", 1)]);
        assert_eq!(recovered.running, vec![running("run")]);
        assert_eq!(recovered.set_aside.len(), 2);
        let corrupt = std::fs::read_to_string(dir.path().join(JOURNAL_CORRUPT_FILE)).unwrap();
        assert_eq!(corrupt.lines().count(), 2, "{corrupt}");
        assert!(
            corrupt.contains("bxd") && corrupt.contains("0badc0de"),
            "{corrupt}"
        );
        // Rewritten clean, and appends start on a line of their own.
        spool.put_result(&result("later", 1)).unwrap();
        drop(spool);
        let (_, recovered) = Spool::open(dir.path(), NOW).unwrap();
        assert!(recovered.set_aside.is_empty(), "set aside once");
        assert_eq!(recovered.outbox.len(), 2);
    }

    #[test]
    fn damaged_legacy_entries_are_set_aside_and_incomplete_writes_removed() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = dir.path().join(OUTBOX_DIR);
        std::fs::create_dir_all(&outbox).unwrap();
        std::fs::create_dir_all(dir.path().join(RUNNING_DIR)).unwrap();
        let good = serde_json::to_vec(&OutboxRecord::from(&result("good", 1))).unwrap();
        std::fs::write(outbox.join("good.1.json"), good).unwrap();
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
            vec!["bad.1.json.corrupt", "huge.1.json.corrupt"],
            "the good entry is in the journal now"
        );
        assert_eq!(
            files(&dir.path().join(RUNNING_DIR)),
            vec!["x.1.json.corrupt"]
        );
        // Set aside once: a second open finds nothing new, and the result still.
        let (_, recovered) = Spool::open(dir.path(), NOW).unwrap();
        assert!(recovered.set_aside.is_empty());
        assert_eq!(recovered.outbox, vec![result("good", 1)]);
    }

    #[test]
    fn the_journal_is_compacted_once_it_grows_and_keeps_what_is_pending() {
        let dir = tempfile::tempdir().unwrap();
        let (mut spool, _) = Spool::open(dir.path(), NOW).unwrap();
        spool.start(&running("long"), NOW).unwrap();
        let mut big = result("x", 1);
        big.result.output_tail = "y".repeat(4000);
        let mut compacted = false;
        for i in 0..400 {
            let mut r = big.clone();
            r.result.task = t(&format!("t{i}"), 1);
            spool.put_result(&r).unwrap();
            spool.remove_result(&r.result.task);
            let len = spool.journal.len;
            assert!(len < JOURNAL_COMPACT_BYTES + 8192, "bounded: {len}");
            compacted |= len < 8192;
        }
        assert!(compacted, "the journal was rewritten on the way");
        spool.put_result(&result("kept", 1)).unwrap();
        drop(spool);
        let (_, recovered) = Spool::open(dir.path(), NOW).unwrap();
        assert_eq!(recovered.running, vec![running("long")]);
        assert_eq!(recovered.outbox, vec![result("kept", 1)]);
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
        spool.put_result(&refused).unwrap(); // the same attempt again: one entry
        assert_eq!(spool.outbox_len(), 1);
        drop(spool);
        let (mut spool, recovered) = Spool::open(dir.path(), NOW).unwrap();
        assert_eq!(recovered.outbox, vec![refused.clone()]);
        spool.remove_result(&refused.result.task);
        drop(spool);
        let (_, recovered) = Spool::open(dir.path(), NOW).unwrap();
        assert!(recovered.outbox.is_empty());
        assert!(!dir.path().join("etc").exists() && !dir.path().join("..").join("etc").exists());
    }

    #[test]
    fn an_unsendable_result_is_set_aside_not_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let (mut spool, _) = Spool::open(dir.path(), NOW).unwrap();
        spool.put_result(&result("a", 1)).unwrap();
        spool.set_aside_result(&t("a", 1), "too large");
        assert_eq!(spool.outbox_len(), 0);
        drop(spool);
        let corrupt = std::fs::read_to_string(dir.path().join(JOURNAL_CORRUPT_FILE)).unwrap();
        let (record, _) = corrupt.split_once('\n').unwrap();
        assert!(matches!(
            parse_journal_line(record.as_bytes()),
            Ok(JournalRecord::Result(r)) if r.task_id == "a"
        ));
        let (_, recovered) = Spool::open(dir.path(), NOW).unwrap();
        assert!(recovered.outbox.is_empty(), "not sent again");
    }

    #[test]
    fn stored_entries_of_earlier_versions_and_this_one_still_load() {
        // The on-disk format is a compatibility promise: these bytes must keep loading.
        let dir = tempfile::tempdir().unwrap();
        for legacy in [OUTBOX_DIR, RUNNING_DIR] {
            std::fs::create_dir(dir.path().join(legacy)).unwrap();
        }
        let record = |json: &str| format!("{:08x} {json}\n", crc32(json.as_bytes()));
        let journal = [
            r#"{"running":{"run_id":"r1","step_id":"s1","job":"build","task_id":"t3","attempt":1,"worker":"w1","started_at_ms":5}}"#,
            r#"{"running":{"run_id":"r1","step_id":"s1","job":"build","task_id":"t4","attempt":1,"worker":"w1","started_at_ms":6}}"#,
            r#"{"result":{"run_id":"r1","step_id":"s1","job":"build","task_id":"t4","attempt":1,"worker":"w1","outcome":"succeeded","exit_code":0,"started_at_ms":6,"finished_at_ms":7,"output_tail":"ok\n"}}"#,
            r#"{"result":{"run_id":"r1","step_id":"s1","job":"build","task_id":"t5","attempt":1,"worker":"w1","outcome":"timed_out","started_at_ms":6,"finished_at_ms":8}}"#,
            r#"{"done":{"task_id":"t5","attempt":1}}"#,
        ];
        std::fs::write(
            dir.path().join(JOURNAL_FILE),
            journal.iter().map(|j| record(j)).collect::<String>(),
        )
        .unwrap();
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
        assert!(recovered.set_aside.is_empty(), "{:?}", recovered.set_aside);
        let outbox: Vec<&TaskRef> = recovered.outbox.iter().map(|e| &e.result.task).collect();
        assert_eq!(outbox, vec![&t("t1", 2), &t("t4", 1)]);
        assert_eq!(recovered.outbox[0].result.exit_code, Some(3));
        assert_eq!(recovered.outbox[0].result.output_tail, "");
        assert_eq!(recovered.outbox[1].result.output_tail, "ok\n");
        let running: Vec<&TaskRef> = recovered.running.iter().map(|e| &e.task).collect();
        assert_eq!(running, vec![&t("t2", 1), &t("t3", 1)]);
        assert!(recovered.seen.contains(&t("t0", 1)) && recovered.seen.contains(&t("t1", 2)));
        // Taken into the journal: the legacy directories are gone.
        assert!(!dir.path().join(OUTBOX_DIR).exists());
        assert!(!dir.path().join(RUNNING_DIR).exists());
    }
}
