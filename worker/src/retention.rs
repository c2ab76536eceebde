//! Output retention: what grows in the worker's directories, removed once older than
//! `--output-retention`, on a background thread, in small batches.
//!
//! What goes, by modification time:
//! - step output files, `<log-dir>/runs/<run_id>/<file>`, and a run's directory once it
//!   is empty; never the output of a step that may still write ([`InUse`]: the service
//!   holds an output's path from before its command starts until its result is in);
//! - damaged spool entries set aside for an operator: `seen.log.corrupt`,
//!   `journal.log.corrupt`, and an earlier version's `running/*.corrupt`,
//!   `outbox/*.corrupt`.
//!
//! What stays, whatever its age (the spool's guarantees need it, see [`crate::spool`]):
//! `seen.log` (it bounds itself: it is rewritten without attempts older than 7 days or
//! beyond the newest 100,000 when it reaches twice that many lines, about 13 MiB) and
//! `journal.log` (it holds every attempt to report lost and every result the broker has
//! not acknowledged, kept and resent for as long as that takes; it rewrites itself without
//! the rest once past 1 MiB). Working
//! directories under `work/` go when their task ends and, if a crash left them, at start.
//! `worker.log` is rotated by logrotate.
//!
//! Only names the worker makes are touched: a run directory must be a valid id, and
//! nothing is followed through a symbolic link.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use crossbeam_channel::{Receiver, RecvTimeoutError};
use tracing::{info, warn};

use crate::schedule::is_valid_id;
use crate::spool::{JOURNAL_CORRUPT_FILE, OUTBOX_DIR, RUNNING_DIR, SEEN_CORRUPT_FILE};

/// Files removed between two pauses, and entries looked at between two checks for a stop.
pub const BATCH: usize = 1000;
/// The pause between two batches, so that a large backlog does not hog the disk.
pub const BATCH_PAUSE: Duration = Duration::from_millis(50);

/// What to prune and when.
#[derive(Debug, Clone)]
pub struct OutputRetention {
    /// `--log-dir`: step outputs are under `runs/` in it.
    pub log_dir: PathBuf,
    /// `--spool`.
    pub spool: PathBuf,
    /// A file not modified for this long goes (`--output-retention`).
    pub keep: Duration,
    /// How often a pass runs (`--prune-every`).
    pub every: Duration,
}

/// Output files of steps that may still write: never pruned.
#[derive(Debug, Default)]
pub struct InUse {
    paths: Mutex<HashSet<PathBuf>>,
}

impl InUse {
    /// Holds `path` until [`InUse::release`]: called before the step's command starts.
    pub fn hold(&self, path: &Path) {
        self.lock().insert(path.to_owned());
    }

    /// The step has ended and its output will not be written again.
    pub fn release(&self, path: &Path) {
        self.lock().remove(path);
    }

    fn lock(&self) -> MutexGuard<'_, HashSet<PathBuf>> {
        // A panic while holding the lock leaves a plain set: still valid.
        self.paths.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Totals since the worker started, sent in its heartbeats.
#[derive(Debug, Default)]
pub struct Pruned {
    /// Step output files removed.
    pub output_files: AtomicU64,
    /// Their bytes.
    pub output_bytes: AtomicU64,
    /// Damaged spool entries removed.
    pub spool_files: AtomicU64,
}

impl Pruned {
    /// The counters by name, as the heartbeat carries them.
    pub fn counters(&self) -> [(&'static str, u64); 3] {
        [
            (
                "output_files_pruned",
                self.output_files.load(Ordering::Relaxed),
            ),
            (
                "output_bytes_pruned",
                self.output_bytes.load(Ordering::Relaxed),
            ),
            (
                "spool_files_pruned",
                self.spool_files.load(Ordering::Relaxed),
            ),
        ]
    }
}

/// One pass over the directories: removes what is older than `retention.keep` at `now`.
/// `pause(d)` waits `d` and returns false to stop the pass: [`BATCH_PAUSE`] after every
/// [`BATCH`] removals, no time after every [`BATCH`] entries looked at (a stop is heard
/// however few files are old).
pub fn prune_pass(
    retention: &OutputRetention,
    in_use: &InUse,
    pruned: &Pruned,
    now: SystemTime,
    pause: &mut dyn FnMut(Duration) -> bool,
) {
    let cutoff = now
        .checked_sub(retention.keep)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let mut pass = Pass {
        cutoff,
        in_use,
        pruned,
        pause,
        removed_since_pause: 0,
        seen_since_check: 0,
        stopped: false,
        removed: Removed::default(),
    };
    pass.outputs(&retention.log_dir.join("runs"));
    let spool = &retention.spool;
    for dir in [spool.join(RUNNING_DIR), spool.join(OUTBOX_DIR)] {
        pass.set_aside_entries(&dir);
    }
    pass.spool_file(&spool.join(SEEN_CORRUPT_FILE));
    pass.spool_file(&spool.join(JOURNAL_CORRUPT_FILE));
    let Removed {
        files,
        bytes,
        dirs,
        spool_files,
    } = pass.removed;
    if files + dirs + spool_files > 0 {
        info!(
            files,
            bytes,
            dirs,
            spool_files,
            keep = %humantime::format_duration(retention.keep),
            "pruned old step outputs"
        );
    }
}

/// Starts the background thread: a pass at once, then every `retention.every`, until
/// `stop` receives or is dropped.
pub fn spawn(
    retention: OutputRetention,
    in_use: Arc<InUse>,
    pruned: Arc<Pruned>,
    stop: Receiver<()>,
) -> anyhow::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("output-retention".into())
        .spawn(move || loop {
            let mut pause =
                |wait| matches!(stop.recv_timeout(wait), Err(RecvTimeoutError::Timeout));
            prune_pass(&retention, &in_use, &pruned, SystemTime::now(), &mut pause);
            if !matches!(
                stop.recv_timeout(retention.every),
                Err(RecvTimeoutError::Timeout)
            ) {
                return;
            }
        })
        .context("starting the output retention thread")
}

struct Pass<'a> {
    cutoff: SystemTime,
    in_use: &'a InUse,
    pruned: &'a Pruned,
    pause: &'a mut dyn FnMut(Duration) -> bool,
    removed_since_pause: usize,
    seen_since_check: usize,
    stopped: bool,
    removed: Removed,
}

/// What one pass removed, for its log line.
#[derive(Debug, Default)]
struct Removed {
    files: u64,
    bytes: u64,
    dirs: u64,
    spool_files: u64,
}

impl Pass<'_> {
    /// `runs/<run_id>/*`: old files not in use, then the directory if that emptied it.
    fn outputs(&mut self, runs: &Path) {
        let Some(entries) = read_dir(runs) else {
            return;
        };
        for entry in entries.flatten() {
            if self.stopped {
                return;
            }
            let name = entry.file_name();
            let is_run_dir = name.to_str().is_some_and(is_valid_id)
                && entry.file_type().is_ok_and(|t| t.is_dir());
            if !is_run_dir {
                continue;
            }
            let dir = entry.path();
            let Some(files) = read_dir(&dir) else {
                continue;
            };
            for file in files.flatten() {
                if self.stopped {
                    return;
                }
                let path = file.path();
                if let Some(bytes) = self.remove_if_old(&path, true) {
                    self.pruned.output_files.fetch_add(1, Ordering::Relaxed);
                    self.pruned.output_bytes.fetch_add(bytes, Ordering::Relaxed);
                    self.removed.files += 1;
                    self.removed.bytes += bytes;
                }
            }
            self.remove_dir_if_empty(&dir);
        }
    }

    /// `*.corrupt` in a spool directory.
    fn set_aside_entries(&mut self, dir: &Path) {
        let Some(entries) = read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            if self.stopped {
                return;
            }
            if entry
                .file_name()
                .to_str()
                .is_some_and(|n| n.ends_with(".corrupt"))
            {
                self.spool_file(&entry.path());
            }
        }
    }

    fn spool_file(&mut self, path: &Path) {
        if !self.stopped && self.remove_if_old(path, false).is_some() {
            self.pruned.spool_files.fetch_add(1, Ordering::Relaxed);
            self.removed.spool_files += 1;
        }
    }

    /// Removes `path` if it is a regular file last modified before the cutoff (and, for an
    /// output, not in use); returns its size if it went.
    fn remove_if_old(&mut self, path: &Path, output: bool) -> Option<u64> {
        self.seen_since_check += 1;
        if self.seen_since_check >= BATCH {
            self.seen_since_check = 0;
            self.stopped = !(self.pause)(Duration::ZERO);
            if self.stopped {
                return None;
            }
        }
        let meta = std::fs::symlink_metadata(path).ok()?;
        let old = meta.modified().is_ok_and(|at| at < self.cutoff);
        if !meta.file_type().is_file() || !old {
            return None;
        }
        {
            // Held while removing: a step cannot take the path between check and removal.
            let in_use = self.in_use.lock();
            if output && in_use.contains(path) {
                return None;
            }
            if let Err(e) = std::fs::remove_file(path) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    warn!(file = %path.display(), error = %e, "cannot prune a file");
                }
                return None;
            }
        }
        self.removed_since_pause += 1;
        if self.removed_since_pause >= BATCH {
            self.removed_since_pause = 0;
            self.stopped = !(self.pause)(BATCH_PAUSE);
        }
        Some(meta.len())
    }

    /// A run directory with nothing left in it goes, unless a step about to write there
    /// holds a path in it (it made the directory, or is about to).
    fn remove_dir_if_empty(&mut self, dir: &Path) {
        let in_use = self.in_use.lock();
        if in_use.iter().any(|p| p.parent() == Some(dir)) {
            return;
        }
        // Fails, as it should, if anything is left in it.
        if std::fs::remove_dir(dir).is_ok() {
            self.removed.dirs += 1;
        }
    }
}

fn read_dir(dir: &Path) -> Option<std::fs::ReadDir> {
    match std::fs::read_dir(dir) {
        Ok(entries) => Some(entries),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            warn!(dir = %dir.display(), error = %e, "cannot read a directory to prune");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use jobz::message::{TaskFinished, TaskOutcome, TaskRef};

    use super::*;
    use crate::spool::{OutboxEntry, RunningEntry, Spool, JOURNAL_FILE, SEEN_FILE};

    const DAY: Duration = Duration::from_secs(24 * 3600);

    struct Dirs {
        _root: tempfile::TempDir,
        retention: OutputRetention,
    }

    impl Dirs {
        fn new() -> Dirs {
            let root = tempfile::tempdir().unwrap();
            let retention = OutputRetention {
                log_dir: root.path().join("log"),
                spool: root.path().join("spool"),
                keep: 7 * DAY,
                every: Duration::from_secs(60),
            };
            Dirs {
                _root: root,
                retention,
            }
        }

        /// `runs/<run>/<name>`, last modified `age` ago.
        fn output(&self, run: &str, name: &str, age: Duration) -> PathBuf {
            let path = self.retention.log_dir.join("runs").join(run).join(name);
            write_aged(&path, b"output\n", age);
            path
        }

        fn prune(&self, in_use: &InUse) -> Pruned {
            let pruned = Pruned::default();
            prune_pass(
                &self.retention,
                in_use,
                &pruned,
                SystemTime::now(),
                &mut |_| true,
            );
            pruned
        }
    }

    fn write_aged(path: &Path, bytes: &[u8], age: Duration) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, bytes).unwrap();
        age_file(path, age);
    }

    fn age_file(path: &Path, age: Duration) {
        let file = fs::OpenOptions::new().append(true).open(path).unwrap();
        file.set_modified(SystemTime::now() - age).unwrap();
    }

    #[test]
    fn outputs_older_than_the_retention_go_with_their_emptied_run_directory() {
        let dirs = Dirs::new();
        let old = dirs.output("r1", "a.t1.1.log", 8 * DAY);
        let young = dirs.output("r2", "b.t2.1.log", 6 * DAY);
        let mixed_old = dirs.output("r3", "c.t3.1.log", 8 * DAY);
        let mixed_young = dirs.output("r3", "d.t4.1.log", DAY);

        let pruned = dirs.prune(&InUse::default());
        assert!(!old.exists() && !old.parent().unwrap().exists());
        assert!(young.exists());
        assert!(!mixed_old.exists() && mixed_young.exists());
        let counters = pruned.counters();
        assert_eq!(counters[0], ("output_files_pruned", 2));
        assert_eq!(counters[1], ("output_bytes_pruned", 14));
        assert_eq!(counters[2], ("spool_files_pruned", 0));
    }

    #[test]
    fn the_output_of_a_running_step_stays_however_old() {
        let dirs = Dirs::new();
        let running = dirs.output("r1", "a.t1.1.log", 30 * DAY);
        let in_use = InUse::default();
        in_use.hold(&running);
        // A step about to start holds its path before its directory exists.
        let starting = dirs.retention.log_dir.join("runs/r2/b.t2.1.log");
        fs::create_dir_all(starting.parent().unwrap()).unwrap();
        in_use.hold(&starting);

        dirs.prune(&in_use);
        assert!(running.exists());
        assert!(starting.parent().unwrap().is_dir());
        in_use.release(&running);
        in_use.release(&starting);
        dirs.prune(&in_use);
        assert!(!running.exists());
        assert!(!starting.parent().unwrap().exists());
    }

    #[test]
    fn only_the_workers_own_names_are_touched_and_links_are_not_followed() {
        let dirs = Dirs::new();
        let outside = dirs.retention.log_dir.join("elsewhere/secret");
        write_aged(&outside, b"keep", 30 * DAY);
        let runs = dirs.retention.log_dir.join("runs");
        let foreign = dirs.output("lost+found", "x.log", 30 * DAY);
        fs::create_dir_all(runs.join("r1")).unwrap();
        std::os::unix::fs::symlink(&outside, runs.join("r1/link.log")).unwrap();
        std::os::unix::fs::symlink(outside.parent().unwrap(), runs.join("r2")).unwrap();
        write_aged(&runs.join("stray.log"), b"x", 30 * DAY);

        let pruned = dirs.prune(&InUse::default());
        assert!(outside.exists());
        assert!(foreign.exists());
        assert!(runs.join("stray.log").exists());
        assert!(runs.join("r1/link.log").symlink_metadata().is_ok());
        assert_eq!(pruned.output_files.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn the_spool_keeps_what_the_at_most_once_guarantee_needs() {
        let dirs = Dirs::new();
        let spool_dir = &dirs.retention.spool;
        let now = jobz::now_ms();
        let (mut spool, _) = Spool::open(spool_dir, now).unwrap();
        let running = RunningEntry {
            run_id: "r1".into(),
            step_id: "s1".into(),
            job: "a".into(),
            task: TaskRef {
                task_id: "t1".into(),
                attempt: 1,
            },
            worker: "w1".into(),
            started_at_ms: now,
        };
        spool.start(&running, now).unwrap();
        let finished = TaskRef {
            task_id: "t2".into(),
            attempt: 3,
        };
        spool
            .put_result(&OutboxEntry {
                run_id: "r2".into(),
                step_id: "s2".into(),
                job: "a".into(),
                result: TaskFinished {
                    task: finished.clone(),
                    worker: "w1".into(),
                    outcome: TaskOutcome::Succeeded,
                    exit_code: Some(0),
                    error: None,
                    started_at_ms: now,
                    finished_at_ms: now,
                    output_tail: String::new(),
                },
            })
            .unwrap();
        drop(spool);
        // Everything months old; damaged entries set aside beside them.
        // (An earlier version's spool set damaged entries aside in these directories.)
        for dir in [RUNNING_DIR, OUTBOX_DIR] {
            fs::create_dir_all(spool_dir.join(dir)).unwrap();
        }
        let corrupt = [
            spool_dir.join("outbox/t9.1.json.corrupt"),
            spool_dir.join("running/t8.1.json.corrupt"),
            spool_dir.join(SEEN_CORRUPT_FILE),
            spool_dir.join(JOURNAL_CORRUPT_FILE),
        ];
        for path in &corrupt {
            fs::write(path, b"damaged").unwrap();
        }
        let kept = [spool_dir.join(SEEN_FILE), spool_dir.join(JOURNAL_FILE)];
        for path in corrupt.iter().chain(&kept) {
            age_file(path, 90 * DAY);
        }

        let pruned = dirs.prune(&InUse::default());
        assert_eq!(pruned.spool_files.load(Ordering::Relaxed), 4);
        assert!(corrupt.iter().all(|p| !p.exists()));
        assert!(kept.iter().all(|p| p.exists()), "{kept:?}");
        // Both attempts are still known after a restart: neither can run again.
        let (spool, recovered) = Spool::open(spool_dir, now).unwrap();
        assert!(spool.is_seen(&running.task) && spool.is_seen(&finished));
        assert_eq!(recovered.running.len(), 1);
        assert_eq!(recovered.outbox.len(), 1);
    }

    #[test]
    fn a_pass_pauses_after_each_batch_and_stops_when_asked() {
        let dirs = Dirs::new();
        for i in 0..(2 * BATCH + 5) {
            dirs.output(&format!("r{}", i % 7), &format!("a.t{i}.1.log"), 8 * DAY);
        }
        let pruned = Pruned::default();
        let mut waits = Vec::new();
        let mut pause = |wait| {
            waits.push(wait);
            true
        };
        prune_pass(
            &dirs.retention,
            &InUse::default(),
            &pruned,
            SystemTime::now(),
            &mut pause,
        );
        let pauses = waits.iter().filter(|w| **w == BATCH_PAUSE).count();
        assert_eq!(pauses, 2, "{waits:?}");
        let removed = pruned.output_files.load(Ordering::Relaxed);
        assert_eq!(removed, 2 * BATCH as u64 + 5);

        let dirs = Dirs::new();
        for i in 0..(BATCH + 5) {
            dirs.output("r1", &format!("a.t{i}.1.log"), 8 * DAY);
        }
        let pruned = Pruned::default();
        let mut stop_at_pause = |wait| wait != BATCH_PAUSE;
        prune_pass(
            &dirs.retention,
            &InUse::default(),
            &pruned,
            SystemTime::now(),
            &mut stop_at_pause,
        );
        assert_eq!(pruned.output_files.load(Ordering::Relaxed), BATCH as u64);
    }

    #[test]
    fn a_pass_over_young_files_still_hears_a_stop() {
        let dirs = Dirs::new();
        for i in 0..(2 * BATCH) {
            dirs.output("r1", &format!("a.t{i}.1.log"), Duration::ZERO);
        }
        let mut checks = 0;
        let mut stop = |_| {
            checks += 1;
            false
        };
        prune_pass(
            &dirs.retention,
            &InUse::default(),
            &Pruned::default(),
            SystemTime::now(),
            &mut stop,
        );
        assert_eq!(checks, 1, "the pass went on after a stop");
    }
}
