//! `jobz-worker --check`: validate a jobs directory without connecting anywhere.
//!
//! Deployment tools (the Ansible role) run it before they install new job files. Every file
//! gets one line, `ok <file>: N jobs, M semaphores`, or one `error <file>:<line>:<column>:
//! <reason>` for each of its problems, then a summary; the answer is good only if every file parses and no name is defined twice. A
//! successor, semaphore or schedule naming a job no file defines gets a `warning` line (the
//! job may live in another host's jobs.d), which does not make the answer bad.

use std::io::Write;
use std::path::Path;

use anyhow::Context;
use jobz::jobfile::{check_dir, unknown_targets, FileProblem};

/// Checks every job file in `dir`, writing one line per file to `out`. Ok(true) if all are
/// good; an error only if the directory itself cannot be read.
pub fn check_jobs_dir(dir: &Path, out: &mut impl Write) -> anyhow::Result<bool> {
    let checks = check_dir(dir).with_context(|| format!("reading jobs dir {}", dir.display()))?;
    let (mut total_jobs, mut bad_files) = (0, 0);
    for check in &checks {
        match &check.set {
            Some(set) if check.problems.is_empty() => {
                total_jobs += set.jobs.len();
                writeln!(
                    out,
                    "ok {}: {} jobs, {} semaphores",
                    check.path.display(),
                    set.jobs.len(),
                    set.semaphores.len()
                )?;
            }
            _ => bad_files += 1,
        }
        for problem in &check.problems {
            // A parse error names its file (and line) itself; a duplicate does not.
            match problem {
                FileProblem::Invalid(_) => writeln!(out, "error {problem}")?,
                _ => writeln!(out, "error {}: {problem}", check.path.display())?,
            }
        }
    }
    // Warnings only: another host may serve the job (and a semaphore's then-job usually does).
    for unknown in unknown_targets(&checks) {
        writeln!(out, "warning {}: {unknown}", unknown.path.display())?;
    }
    writeln!(
        out,
        "{} files, {bad_files} rejected, {total_jobs} jobs in {}",
        checks.len(),
        dir.display()
    )?;
    Ok(bad_files == 0)
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

    #[test]
    fn good_files_pass() {
        let (good, out) = check(&[
            ("a.yaml", "jobs:\n  - name: a\n    command: \"true\"\n"),
            ("notes.txt", "not a job file"),
            (".a.yaml.swp", "junk"),
        ]);
        assert!(good, "{out}");
        assert!(out.contains("ok "), "{out}");
        assert!(out.contains("a.yaml: 1 jobs, 0 semaphores"), "{out}");
        assert!(out.contains("\n1 files, 0 rejected, 1 jobs in "), "{out}");
    }

    #[test]
    fn a_bad_file_fails_with_file_and_line() {
        let (good, out) = check(&[
            ("a.yaml", "jobs:\n  - name: a\n    command: \"true\"\n"),
            ("b.yaml", "jobs:\n  - name: bravo\n    comand: x\n"),
        ]);
        assert!(!good);
        assert!(out.contains("error "), "{out}");
        assert!(out.contains("b.yaml:2:"), "{out}");
    }

    #[test]
    fn a_quoted_placeholder_fails_naming_file_line_and_placeholder() {
        let (good, out) = check(&[
            (
                "a.yaml",
                "jobs:\n  - name: a\n    command: echo {date} 'ok'\n",
            ),
            (
                "b.yaml",
                "jobs:\n  - name: b\n    command: echo \"day {date}\"\n",
            ),
        ]);
        assert!(!good, "{out}");
        assert!(out.contains("ok "), "{out}");
        assert!(out.contains("b.yaml:3: "), "{out}");
        assert!(out.contains("{date}"), "{out}");
        assert!(out.contains("drop the quotes"), "{out}");
        assert!(out.contains("1 rejected"), "{out}");
    }

    #[test]
    fn every_problem_of_a_file_gets_its_own_line_with_line_and_column() {
        let (good, out) = check(&[(
            "a.yaml",
            "jobs:\n  - name: a\n    command: x\n    retries: lots\n  - name: b\n    command: y\n    delivery: sideways\n",
        )]);
        assert!(!good, "{out}");
        let errors: Vec<&str> = out.lines().filter(|l| l.starts_with("error ")).collect();
        assert_eq!(errors.len(), 2, "{out}");
        assert!(errors[0].contains("a.yaml:2:5: "), "{out}");
        assert!(errors[1].contains("a.yaml:5:5: "), "{out}");
        assert!(out.contains("1 rejected"), "{out}");
    }

    #[test]
    fn a_name_defined_in_two_files_fails() {
        let (good, out) = check(&[
            ("a.yaml", "jobs:\n  - name: a\n    command: \"true\"\n"),
            ("b.yaml", "jobs:\n  - name: a\n    command: \"false\"\n"),
        ]);
        assert!(!good);
        assert!(out.contains("already defined"), "{out}");
    }

    #[test]
    fn a_successor_or_semaphore_naming_an_undefined_job_is_a_warning_only() {
        let (good, out) = check(&[
            (
                "a.yaml",
                "jobs:\n  - name: import\n    command: \"true\"\n    on_success: [reindex, nonexistent_job]\n",
            ),
            (
                "b.yaml",
                "jobs:\n  - name: reindex\n    command: \"true\"\nsemaphores:\n  - name: gate\n    wait_for: [{job: reindex, count: 2}]\n    key: \"{date}\"\n    then: [pubilsh]\n",
            ),
        ]);
        assert!(good, "warnings do not fail the check: {out}");
        let warnings: Vec<&str> = out.lines().filter(|l| l.starts_with("warning ")).collect();
        assert_eq!(warnings.len(), 2, "{out}");
        assert!(
            warnings[0].contains("a.yaml: job import: on_success names job `nonexistent_job`"),
            "{out}"
        );
        assert!(
            warnings[1].contains("b.yaml: semaphore gate: then names job `pubilsh`"),
            "{out}"
        );
    }

    #[test]
    fn a_missing_dir_is_an_error() {
        let mut out = Vec::new();
        let err = check_jobs_dir(Path::new("/nonexistent/jobs.d"), &mut out).unwrap_err();
        assert!(format!("{err:#}").contains("/nonexistent/jobs.d"));
    }
}
