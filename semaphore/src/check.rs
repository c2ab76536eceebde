//! `jobz-semaphore --check`: validate the semaphores and schedules of a jobs directory
//! without connecting.
//!
//! Every job file gets one line, `ok <file>: N semaphores, M schedules` or `error
//! <file>[:<line>]: <reason>`, then each semaphore with what it waits for and each schedule
//! with its next slot, then a summary. The answer is good only if every file parses and no
//! semaphore or schedule is defined twice.

use std::io::Write;
use std::path::Path;

use anyhow::Context;
use jobz::jobfile::{check_dir, unknown_targets, FileProblem, ScheduleSpec, SemaphoreSpec};

/// Checks every job file in `dir`, writing to `out`. Ok(true) if all are good; an error only
/// if the directory itself cannot be read. Only what concerns semaphores and schedules
/// counts here: a job defined twice is the workers' `--check`'s business.
pub fn check_jobs_dir(dir: &Path, out: &mut impl Write) -> anyhow::Result<bool> {
    let checks = check_dir(dir).with_context(|| format!("reading jobs dir {}", dir.display()))?;
    let mut good = true;
    let mut defined: Vec<(&String, &SemaphoreSpec)> = Vec::new();
    let mut schedules: Vec<(&String, &ScheduleSpec)> = Vec::new();
    for check in &checks {
        let mut file_ok = true;
        for problem in &check.problems {
            match problem {
                FileProblem::Invalid(_) => writeln!(out, "error {problem}")?,
                FileProblem::DuplicateSemaphore { .. } | FileProblem::DuplicateSchedule { .. } => {
                    writeln!(out, "error {}: {problem}", check.path.display())?
                }
                FileProblem::DuplicateJob { .. } => continue,
            }
            file_ok = false;
        }
        match &check.set {
            Some(set) if file_ok => {
                writeln!(
                    out,
                    "ok {}: {} semaphores, {} schedules",
                    check.path.display(),
                    set.semaphores.len(),
                    set.schedules.len()
                )?;
                defined.extend(&set.semaphores);
                schedules.extend(&set.schedules);
            }
            _ => good = false,
        }
    }
    // Semaphores name jobs that usually live in the workers' files: warnings, not errors.
    for unknown in unknown_targets(&checks) {
        writeln!(out, "warning {}: {unknown}", unknown.path.display())?;
    }
    defined.sort_by_key(|(name, _)| *name);
    let files = checks.len();
    for (name, spec) in &defined {
        let waits: Vec<String> = spec
            .wait_for
            .iter()
            .map(|w| match w.count {
                Some(n) => format!("{} x{n}", w.job),
                None => format!("{} x all", w.job),
            })
            .collect();
        writeln!(
            out,
            "semaphore {name}: waits for {} per key {:?}, then {}",
            waits.join(", "),
            spec.key,
            spec.then.join(", ")
        )?;
    }
    schedules.sort_by_key(|(name, _)| *name);
    let now = jobz::now_ms();
    for (name, spec) in &schedules {
        let next = spec
            .timing
            .next_after(now)
            .map_or_else(|| "never".to_owned(), jobz::format_time_ms);
        writeln!(
            out,
            "schedule {name}: {} {}, catch_up {}, next {next}",
            spec.job,
            spec.timing,
            spec.catch_up.as_str()
        )?;
    }
    writeln!(
        out,
        "{} files, {} semaphores, {} schedules in {}{}",
        files,
        defined.len(),
        schedules.len(),
        dir.display(),
        if good { "" } else { " (with errors)" }
    )?;
    Ok(good)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(files: &[(&str, &str)]) -> (bool, String) {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        let mut out = Vec::new();
        let good = check_jobs_dir(dir.path(), &mut out).unwrap();
        (good, String::from_utf8(out).unwrap())
    }

    const SEM: &str = "semaphores:\n  - name: s\n    wait_for: [{job: a, count: 3}, {job: b, count: all}]\n    key: '{date}'\n    then: publish\n";

    #[test]
    fn good_files_pass_and_list_their_semaphores() {
        let (good, out) = check(&[("a.yaml", SEM), ("notes.txt", "x")]);
        assert!(good, "{out}");
        assert!(out.contains("a.yaml: 1 semaphores, 0 schedules"), "{out}");
        assert!(
            out.contains("semaphore s: waits for a x3, b x all per key \"{date}\", then publish"),
            "{out}"
        );
    }

    const SCHEDULE: &str = "schedules:\n  - name: nightly\n    job: import\n    cron: '30 2 * * *'\n    timezone: Europe/Berlin\n";

    #[test]
    fn schedules_are_checked_and_listed_with_their_next_slot() {
        let (good, out) = check(&[("a.yaml", SCHEDULE)]);
        assert!(good, "{out}");
        assert!(out.contains("a.yaml: 0 semaphores, 1 schedules"), "{out}");
        assert!(
            out.contains("schedule nightly: import cron \"30 2 * * *\" in Europe/Berlin, catch_up none, next 20"),
            "{out}"
        );
        let (good, out) = check(&[("a.yaml", SCHEDULE), ("b.yaml", SCHEDULE)]);
        assert!(!good);
        assert!(
            out.contains("schedule \"nightly\" is already defined"),
            "{out}"
        );
        let (good, out) = check(&[(
            "a.yaml",
            "# a comment\nschedules:\n  - name: bad\n    job: import\n    cron: '0 0 31 2 *'\n",
        )]);
        assert!(!good);
        assert!(
            out.contains("a.yaml:3:5: schedule \"bad\": cron \"0 0 31 2 *\" never matches"),
            "{out}"
        );
    }

    #[test]
    fn bad_and_duplicate_files_fail() {
        let (good, out) = check(&[("a.yaml", SEM), ("b.yaml", SEM)]);
        assert!(!good);
        assert!(out.contains("already defined"), "{out}");
        let (good, out) = check(&[(
            "a.yaml",
            "semaphores:\n  - name: s\n    wait_for: []\n    then: x\n",
        )]);
        assert!(!good);
        assert!(out.contains("wait_for is empty"), "{out}");
    }
}
