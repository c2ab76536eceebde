//! `worker.log`: one line per task event, for operators who `tail -f` a host.
//!
//! Format (SPEC "Logs on each host"):
//! `<RFC 3339 time, ms> run=<run_id> step=<step_id> task=<task_id> job=<job> attempt=<n> worker=<name> <event>`
//! (the fields of SPEC's order first: `worker=` came last, so scripts that read `run=` as
//! the second field keep working)
//! where the event is `received`, `started`, `finished exit=0 in 0.12s`,
//! `failed exit=3 in 1.00s`, `failed: <reason>` or `timed out after 2s`; and, about the
//! worker's own job files, `<time> worker=<name> <note>` (a rejected file, a job defined
//! twice), with no `run=`.
//! With `--worker-log-format json`, each line is one JSON object with the same fields:
//! `{"time", "run", "step", "task", "job", "attempt", "worker", "event"}`, or
//! `{"time", "worker", "note"}` about the job files.
//! Each line is written with one `write` on a file opened for appending, so lines from
//! concurrent writers never interleave; a file renamed away by log rotation is reopened.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use jobz::logging::LogFormat;
use jobz::message::TaskOutcome;
use tracing::warn;

use crate::runner::RunResult;
use crate::schedule::Task;

/// File name of the worker log inside `--log-dir`.
pub const FILE_NAME: &str = "worker.log";

/// How often the writer checks whether the file was rotated away.
const ROTATION_CHECK: Duration = Duration::from_secs(1);

/// The appending writer of `worker.log`.
#[derive(Debug)]
pub struct EventLog {
    path: PathBuf,
    file: File,
    checked_at: Instant,
    /// `worker=<name>`, as every text line carries it.
    worker: String,
    /// The worker's own name, for JSON lines.
    worker_name: String,
    format: LogFormat,
}

impl EventLog {
    /// Opens (creating it and its directory) `<log_dir>/worker.log`, for the worker `worker`.
    pub fn open(log_dir: &Path, worker: &str, format: LogFormat) -> anyhow::Result<EventLog> {
        std::fs::create_dir_all(log_dir)
            .with_context(|| format!("creating log directory {}", log_dir.display()))?;
        let path = log_dir.join(FILE_NAME);
        let file = open_append(&path)?;
        Ok(EventLog {
            path,
            file,
            checked_at: Instant::now(),
            worker: field(worker),
            worker_name: worker.to_owned(),
            format,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one event line about `task`, stamped now. Failures are logged, not returned:
    /// a full disk must not stop the worker from running and reporting tasks.
    pub fn append(&mut self, task: &Task, event: &str) {
        let now = jobz::now_ms();
        let line = match self.format {
            LogFormat::Text => format_line(now, &self.worker, task, event),
            LogFormat::Json => json_line(&serde_json::json!({
                "time": jobz::format_time_ms(now),
                "run": task.run_id,
                "step": task.step_id,
                "task": task.task.task_id,
                "job": task.job,
                "attempt": task.task.attempt,
                "worker": self.worker_name,
                "event": event,
            })),
        };
        self.write(&line);
    }

    /// Appends one line about the worker itself (not a task), stamped now.
    pub fn note(&mut self, note: &str) {
        let now = jobz::now_ms();
        let line = match self.format {
            LogFormat::Text => format!(
                "{} worker={} {}\n",
                jobz::format_time_ms(now),
                self.worker,
                text(note)
            ),
            LogFormat::Json => json_line(&serde_json::json!({
                "time": jobz::format_time_ms(now),
                "worker": self.worker_name,
                "note": note,
            })),
        };
        self.write(&line);
    }

    fn write(&mut self, line: &str) {
        self.reopen_if_rotated();
        let written = self
            .file
            .write_all(line.as_bytes())
            .and_then(|()| self.file.flush());
        if let Err(e) = written {
            warn!(file = %self.path.display(), error = %e, "cannot write the worker log");
        }
    }

    fn reopen_if_rotated(&mut self) {
        if self.checked_at.elapsed() < ROTATION_CHECK {
            return;
        }
        self.checked_at = Instant::now();
        use std::os::unix::fs::MetadataExt;
        let current = self.file.metadata().map(|m| (m.dev(), m.ino())).ok();
        let on_disk = std::fs::metadata(&self.path)
            .map(|m| (m.dev(), m.ino()))
            .ok();
        if current != on_disk || on_disk.is_none() {
            match open_append(&self.path) {
                Ok(file) => self.file = file,
                Err(e) => warn!(error = %format!("{e:#}"), "cannot reopen the worker log"),
            }
        }
    }
}

/// One JSON object and a newline (escaping keeps it on one line whatever the text holds).
fn json_line(value: &serde_json::Value) -> String {
    let mut line = value.to_string();
    line.push('\n');
    line
}

fn open_append(path: &Path) -> anyhow::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening the worker log {}", path.display()))
}

/// One line, newline included (`worker` arrives escaped by `field` already).
pub fn format_line(time_ms: i64, worker: &str, task: &Task, event: &str) -> String {
    format!(
        "{} run={} step={} task={} job={} attempt={} worker={worker} {}\n",
        jobz::format_time_ms(time_ms),
        field(&task.run_id),
        field(&task.step_id),
        field(&task.task.task_id),
        field(&task.job),
        task.task.attempt,
        text(event),
    )
}

/// The event text for a task that ran (or could not start); `; output truncated after N
/// bytes` is appended when `--max-step-output` cut its output.
pub fn finished_event(result: &RunResult) -> String {
    let event = ended_event(result);
    match result.truncated {
        Some(kept) => format!("{event}; {}", crate::runner::truncated_note(kept)),
        None => event,
    }
}

fn ended_event(result: &RunResult) -> String {
    let secs = result.elapsed.as_secs_f64();
    match (&result.outcome, &result.error, result.exit_code) {
        (TaskOutcome::Succeeded, _, code) => {
            format!("finished exit={} in {secs:.2}s", code.unwrap_or(0))
        }
        (TaskOutcome::TimedOut, Some(error), _) => error.clone(),
        (TaskOutcome::TimedOut, None, _) => "timed out".into(),
        (TaskOutcome::Failed, Some(error), _) => format!("failed: {error}"),
        (TaskOutcome::Failed, None, Some(code)) => format!("failed exit={code} in {secs:.2}s"),
        (TaskOutcome::Failed, None, None) => format!("failed in {secs:.2}s"),
        (TaskOutcome::Cancelled, Some(error), _) => format!("cancelled: {error}"),
        (TaskOutcome::Cancelled, None, _) => format!("cancelled in {secs:.2}s"),
    }
}

/// A field value is one word: anything but `[A-Za-z0-9._:@+/-]` is escaped, so a hostile id
/// cannot forge a field or a line. Ids that passed validation are written as they are.
pub(crate) fn field(value: &str) -> String {
    if value.is_empty() {
        return "-".into();
    }
    let mut out = String::with_capacity(value.len());
    for c in value.chars().take(128) {
        if c.is_ascii_alphanumeric() || "._:@+/-".contains(c) {
            out.push(c);
        } else {
            out.extend(c.escape_unicode());
        }
    }
    out
}

/// Free text stays on its line: control characters are escaped.
fn text(value: &str) -> String {
    value
        .chars()
        .flat_map(|c| {
            if c.is_control() {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use jobz::message::TaskRef;

    fn task(task_id: &str) -> Task {
        Task {
            run_id: "0190f2a4-7c3e".into(),
            step_id: "s1".into(),
            job: "import_dump".into(),
            task: TaskRef {
                task_id: task_id.into(),
                attempt: 2,
            },
            params: Default::default(),
            command: String::new(),
            timeout: None,
            run_as: None,
        }
    }

    fn result(outcome: TaskOutcome, exit_code: Option<i32>, error: Option<&str>) -> RunResult {
        RunResult {
            outcome,
            exit_code,
            error: error.map(str::to_owned),
            started_at_ms: 0,
            finished_at_ms: 0,
            elapsed: Duration::from_millis(1234),
            output_tail: String::new(),
            started: true,
            truncated: None,
        }
    }

    #[test]
    fn lines_have_the_documented_format() {
        let line = format_line(1_700_000_000_123, "w1", &task("t1"), "received");
        assert_eq!(
            line,
            "2023-11-14T22:13:20.123Z run=0190f2a4-7c3e step=s1 task=t1 job=import_dump attempt=2 worker=w1 received\n"
        );
    }

    #[test]
    fn hostile_ids_and_reasons_cannot_break_a_line() {
        let line = format_line(0, "w1", &task("a b\nrun=forged"), "failed: x\ny");
        assert_eq!(line.matches('\n').count(), 1);
        assert!(
            line.contains("task=a\\u{20}b\\u{a}run\\u{3d}forged "),
            "{line}"
        );
        assert!(line.ends_with("failed: x\\ny\n"), "{line}");
    }

    #[test]
    fn finished_events_read_as_documented() {
        assert_eq!(
            finished_event(&result(TaskOutcome::Succeeded, Some(0), None)),
            "finished exit=0 in 1.23s"
        );
        assert_eq!(
            finished_event(&result(TaskOutcome::Failed, Some(3), None)),
            "failed exit=3 in 1.23s"
        );
        assert_eq!(
            finished_event(&result(
                TaskOutcome::Failed,
                None,
                Some("killed by signal 9")
            )),
            "failed: killed by signal 9"
        );
        assert_eq!(
            finished_event(&result(
                TaskOutcome::TimedOut,
                None,
                Some("timed out after 2s")
            )),
            "timed out after 2s"
        );
        assert_eq!(
            finished_event(&result(
                TaskOutcome::Cancelled,
                None,
                Some("the run was cancelled; its process group was killed")
            )),
            "cancelled: the run was cancelled; its process group was killed"
        );
        let mut cut = result(TaskOutcome::Succeeded, Some(0), None);
        cut.truncated = Some(1024);
        assert_eq!(
            finished_event(&cut),
            "finished exit=0 in 1.23s; output truncated after 1024 bytes"
        );
    }

    #[test]
    fn appends_lines_and_survives_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = EventLog::open(&dir.path().join("logs"), "w 1", LogFormat::Text).unwrap();
        log.append(&task("t1"), "received");
        std::fs::rename(log.path(), dir.path().join("worker.log.1")).unwrap();
        log.checked_at = Instant::now() - ROTATION_CHECK;
        log.append(&task("t1"), "started");
        let rotated = std::fs::read_to_string(dir.path().join("worker.log.1")).unwrap();
        let current = std::fs::read_to_string(log.path()).unwrap();
        assert!(rotated.ends_with("received\n"));
        assert!(current.ends_with("started\n"));
        assert_eq!(current.lines().count(), 1);
        // Notes about the worker itself carry its name (as a field) and no run.
        log.note("job file rejected: bad\nline");
        let current = std::fs::read_to_string(log.path()).unwrap();
        let note = current.lines().last().unwrap();
        assert!(
            note.contains(" worker=w\\u{20}1 job file rejected: bad\\nline"),
            "{note}"
        );
        assert!(!note.contains("run="), "{note}");
    }

    #[test]
    fn json_lines_carry_the_same_fields_one_object_per_line() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = EventLog::open(dir.path(), "w 1", LogFormat::Json).unwrap();
        log.append(&task("t1"), "failed: bad\nthing");
        log.note("job file rejected: x.yaml");
        let text = std::fs::read_to_string(log.path()).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert_eq!(lines[0]["task"], "t1");
        assert_eq!(lines[0]["worker"], "w 1");
        assert_eq!(lines[0]["event"], "failed: bad\nthing");
        assert_eq!(lines[0]["attempt"], 2);
        assert!(lines[0]["time"].as_str().unwrap().ends_with('Z'));
        assert_eq!(lines[1]["note"], "job file rejected: x.yaml");
        assert!(lines[1].get("run").is_none());
    }
}
