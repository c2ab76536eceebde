//! Where the figures were measured: the machine, its load, and the commit.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::SystemTime;

/// A description of the machine and the code under test.
#[derive(Debug, Clone)]
pub struct Machine {
    /// CPUs this process may use.
    pub nproc: usize,
    /// `uname -sr`-like kernel release.
    pub kernel: String,
    /// First `model name` of `/proc/cpuinfo`.
    pub cpu: String,
    /// `MemTotal` of `/proc/meminfo`.
    pub memory: String,
    /// `git rev-parse --short HEAD`, with `+dirty` when the work tree has changes.
    pub commit: String,
    /// When the bench started (UTC).
    pub date: String,
}

impl Machine {
    /// Reads everything; fields that cannot be read say `unknown`.
    pub fn describe(repo: &Path) -> Machine {
        let unknown = || String::from("unknown");
        let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|r| format!("Linux {}", r.trim()))
            .unwrap_or_else(|_| unknown());
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
        Machine {
            nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
            kernel,
            cpu: field(&cpuinfo, "model name").unwrap_or_else(unknown),
            memory: field(&meminfo, "MemTotal").unwrap_or_else(unknown),
            commit: commit(repo).unwrap_or_else(unknown),
            date: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        }
    }
}

/// The 1, 5 and 15 minute load averages, as `/proc/loadavg` gives them.
pub fn load_average() -> String {
    fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_else(|| String::from("unknown"))
}

/// The value of the first `name: value` line of a `/proc` file.
fn field(text: &str, name: &str) -> Option<String> {
    text.lines()
        .filter_map(|line| line.split_once(':'))
        .find(|(key, _)| key.trim() == name)
        .map(|(_, value)| value.trim().to_owned())
}

fn commit(repo: &Path) -> Option<String> {
    let git = |args: &[&str]| -> Option<String> {
        let out = Command::new("git")
            .args(args)
            .current_dir(repo)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    };
    let head = git(&["rev-parse", "--short", "HEAD"])?;
    let dirty =
        git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    Some(if dirty { format!("{head}+dirty") } else { head })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_fields_are_found_by_name() {
        let text = "processor\t: 0\nmodel name\t: Some CPU @ 2.0GHz\nmodel name\t: other\n";
        assert_eq!(
            field(text, "model name").as_deref(),
            Some("Some CPU @ 2.0GHz")
        );
        assert_eq!(field(text, "flags"), None);
    }
}
