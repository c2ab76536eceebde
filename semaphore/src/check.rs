//! `jobz-semaphore --check`: validate the semaphores of a jobs directory without connecting.
//!
//! Every job file gets one line, `ok <file>: N semaphores` or `error <file>[:<line>]:
//! <reason>`, then each semaphore with what it waits for, then a summary. The answer is
//! good only if every file parses and no semaphore is defined twice.

use std::io::Write;
use std::path::Path;

use anyhow::Context;
use jobz::jobfile::{check_dir, FileProblem, SemaphoreSpec};

/// Checks every job file in `dir`, writing to `out`. Ok(true) if all are good; an error only
/// if the directory itself cannot be read. Only what concerns semaphores counts here: a job
/// defined twice is the workers' `--check`'s business.
pub fn check_jobs_dir(dir: &Path, out: &mut impl Write) -> anyhow::Result<bool> {
    let checks = check_dir(dir).with_context(|| format!("reading jobs dir {}", dir.display()))?;
    let mut good = true;
    let mut defined: Vec<(&String, &SemaphoreSpec)> = Vec::new();
    for check in &checks {
        let mut file_ok = true;
        for problem in &check.problems {
            match problem {
                FileProblem::Invalid(_) => writeln!(out, "error {problem}")?,
                FileProblem::DuplicateSemaphore { .. } => {
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
                    "ok {}: {} semaphores",
                    check.path.display(),
                    set.semaphores.len()
                )?;
                defined.extend(&set.semaphores);
            }
            _ => good = false,
        }
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
    writeln!(
        out,
        "{} files, {} semaphores in {}{}",
        files,
        defined.len(),
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
        assert!(out.contains("a.yaml: 1 semaphores"), "{out}");
        assert!(
            out.contains("semaphore s: waits for a x3, b x all per key \"{date}\", then publish"),
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
