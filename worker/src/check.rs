//! `jobz-worker --check`: validate a jobs directory without connecting anywhere.
//!
//! Deployment tools (the Ansible role) run it before they install new job files. Every file
//! gets one line, `ok <file>: N jobs, M semaphores` or `error <file>:<line>: <reason>`, then a
//! summary; the answer is good only if every file parses and no name is defined twice.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use jobz::jobfile::{parse_job_file, InvalidJobFile};

/// Checks every job file in `dir`, writing one line per file to `out`. Ok(true) if all are
/// good; an error only if the directory itself cannot be read.
pub fn check_jobs_dir(dir: &Path, out: &mut impl Write) -> anyhow::Result<bool> {
    let mut files = Vec::new();
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("reading jobs dir {}", dir.display()))?;
    for entry in entries {
        let path = entry
            .with_context(|| format!("reading jobs dir {}", dir.display()))?
            .path();
        if jobz::jobfile::is_job_file(&path) {
            files.push(path);
        }
    }
    files.sort();

    let mut all_good = true;
    let mut jobs_defined: BTreeMap<String, PathBuf> = BTreeMap::new();
    let mut semaphores_defined: BTreeMap<String, PathBuf> = BTreeMap::new();
    let (mut total_jobs, mut bad_files) = (0, 0);
    for path in &files {
        let parsed = std::fs::read_to_string(path)
            .map_err(|e| InvalidJobFile {
                path: path.clone(),
                line: None,
                reason: e.to_string(),
            })
            .and_then(|text| parse_job_file(path, &text));
        let mut problems = Vec::new();
        match parsed {
            Ok(set) => {
                for name in set.jobs.keys() {
                    if let Some(first) = jobs_defined.get(name) {
                        problems.push(format!(
                            "job {name:?} is already defined in {}",
                            first.display()
                        ));
                    } else {
                        jobs_defined.insert(name.clone(), path.clone());
                    }
                }
                for name in set.semaphores.keys() {
                    if let Some(first) = semaphores_defined.get(name) {
                        problems.push(format!(
                            "semaphore {name:?} is already defined in {}",
                            first.display()
                        ));
                    } else {
                        semaphores_defined.insert(name.clone(), path.clone());
                    }
                }
                if problems.is_empty() {
                    total_jobs += set.jobs.len();
                    writeln!(
                        out,
                        "ok {}: {} jobs, {} semaphores",
                        path.display(),
                        set.jobs.len(),
                        set.semaphores.len()
                    )?;
                }
            }
            Err(e) => problems.push(e.to_string()),
        }
        for problem in &problems {
            // A parse error already starts with the file (and line); a conflict does not.
            if problem.starts_with(&path.display().to_string()) {
                writeln!(out, "error {problem}")?;
            } else {
                writeln!(out, "error {}: {problem}", path.display())?;
            }
        }
        if !problems.is_empty() {
            all_good = false;
            bad_files += 1;
        }
    }
    writeln!(
        out,
        "{} files, {bad_files} rejected, {total_jobs} jobs in {}",
        files.len(),
        dir.display()
    )?;
    Ok(all_good)
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
    fn a_name_defined_in_two_files_fails() {
        let (good, out) = check(&[
            ("a.yaml", "jobs:\n  - name: a\n    command: \"true\"\n"),
            ("b.yaml", "jobs:\n  - name: a\n    command: \"false\"\n"),
        ]);
        assert!(!good);
        assert!(out.contains("already defined"), "{out}");
    }

    #[test]
    fn a_missing_dir_is_an_error() {
        let mut out = Vec::new();
        let err = check_jobs_dir(Path::new("/nonexistent/jobs.d"), &mut out).unwrap_err();
        assert!(format!("{err:#}").contains("/nonexistent/jobs.d"));
    }
}
