//! `jobz-semaphore --check`: validate the semaphores of a jobs directory without connecting.
//!
//! Every job file gets one line, `ok <file>: N semaphores` or `error <file>[:<line>]:
//! <reason>`, then each semaphore with what it waits for, then a summary. The answer is
//! good only if every file parses and no semaphore is defined twice.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use jobz::jobfile::{parse_job_file, InvalidJobFile, SemaphoreSpec};

/// Checks every job file in `dir`, writing to `out`. Ok(true) if all are good; an error only
/// if the directory itself cannot be read.
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
    let mut good = true;
    let mut defined: BTreeMap<String, (PathBuf, SemaphoreSpec)> = BTreeMap::new();
    for path in &files {
        let parsed = std::fs::read_to_string(path)
            .map_err(|e| InvalidJobFile {
                path: path.clone(),
                line: None,
                reason: e.to_string(),
            })
            .and_then(|text| parse_job_file(path, &text));
        match parsed {
            Ok(set) => {
                let mut file_ok = true;
                for (name, spec) in set.semaphores {
                    if let Some((first, _)) = defined.get(&name) {
                        writeln!(
                            out,
                            "error {}: semaphore {name:?} is already defined in {}",
                            path.display(),
                            first.display()
                        )?;
                        file_ok = false;
                    } else {
                        defined.insert(name, (path.clone(), spec));
                    }
                }
                if file_ok {
                    let count = defined.values().filter(|(p, _)| p == path).count();
                    writeln!(out, "ok {}: {count} semaphores", path.display())?;
                } else {
                    good = false;
                }
            }
            Err(e) => {
                writeln!(out, "error {e}")?;
                good = false;
            }
        }
    }
    for (name, (_, spec)) in &defined {
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
        files.len(),
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
