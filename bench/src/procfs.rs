//! What a process costs, read from `/proc/<pid>/status` (resident memory) and
//! `/proc/<pid>/stat` (CPU time).

use std::collections::BTreeMap;
use std::fs;
use std::process::Command;
use std::time::Duration;

use anyhow::Context;

/// CPU time of one process, in clock ticks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuTicks {
    /// `utime + stime`: the process's own threads.
    pub own: u64,
    /// `stime`: the part of `own` spent in the kernel (system calls, fsync, fork).
    pub system: u64,
    /// Its children: `cutime + cstime` (those it has waited for) and everything its live
    /// children used so far (a worker's step supervisor and, through it, the commands).
    pub children: u64,
}

impl CpuTicks {
    /// Ticks used between `earlier` and `self`.
    pub fn since(self, earlier: CpuTicks) -> CpuTicks {
        CpuTicks {
            own: self.own.saturating_sub(earlier.own),
            system: self.system.saturating_sub(earlier.system),
            children: self.children.saturating_sub(earlier.children),
        }
    }
}

/// Resident set size of `pid` in KiB (`VmRSS`).
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_rss_kib(&text).with_context(|| format!("no VmRSS line in {path}"))
}

/// CPU ticks used so far by `pid`, its live children's included in `children`.
pub fn cpu_ticks(pid: u32) -> anyhow::Result<CpuTicks> {
    let path = format!("/proc/{pid}/stat");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let mut ticks = parse_stat_ticks(&text)
        .with_context(|| format!("unexpected layout of {path}: {text:?}"))?;
    for child in live_children(pid) {
        // A child that ended meanwhile is counted in `cutime` once its parent reaps it.
        if let Ok(child) = cpu_ticks(child) {
            ticks.children += child.own + child.children;
        }
    }
    Ok(ticks)
}

/// The pids of `pid`'s children now (`/proc/<pid>/task/*/children`).
fn live_children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|task| fs::read_to_string(task.path().join("children")).ok())
        .flat_map(|list| {
            list.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

/// Context switches of each thread of a process so far, by thread id: roughly how often
/// its threads woke up.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Switches(BTreeMap<u64, u64>);

impl Switches {
    /// Switches between `earlier` and `self`, over the threads alive at both times (a
    /// thread that ended or began in between would make a difference of totals wrong).
    pub fn since(&self, earlier: &Switches) -> u64 {
        self.0
            .iter()
            .filter_map(|(tid, now)| Some(now.saturating_sub(*earlier.0.get(tid)?)))
            .sum()
    }
}

/// Context switches of every thread of `pid` (voluntary and not).
pub fn context_switches(pid: u32) -> anyhow::Result<Switches> {
    let dir = format!("/proc/{pid}/task");
    let mut threads = BTreeMap::new();
    for entry in fs::read_dir(&dir).with_context(|| format!("listing {dir}"))? {
        let entry = entry.with_context(|| format!("listing {dir}"))?;
        let Some(tid) = entry.file_name().to_str().and_then(|t| t.parse().ok()) else {
            continue;
        };
        // A thread may end between the listing and the read.
        if let Ok(text) = fs::read_to_string(entry.path().join("status")) {
            threads.insert(tid, parse_switches(&text));
        }
    }
    Ok(Switches(threads))
}

/// Threads of `pid` (`Threads:` of its status file).
pub fn threads(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    status_field(&text, "Threads:").with_context(|| format!("no Threads line in {path}"))
}

/// True if `pid` has ended and waits to be reaped (or cannot be read at all).
pub fn is_zombie(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            stat.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

/// Clock ticks per second (`getconf CLK_TCK`; 100, Linux's USER_HZ, if that fails).
pub fn ticks_per_second() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .and_then(|text| text.trim().parse().ok())
        .filter(|&hz| hz > 0)
        .unwrap_or(100)
}

/// Ticks as a duration.
pub fn ticks_to_duration(ticks: u64, per_second: u64) -> Duration {
    Duration::from_secs_f64(ticks as f64 / per_second.max(1) as f64)
}

fn parse_rss_kib(status: &str) -> Option<u64> {
    status_field(status, "VmRSS:")
}

/// The first number on the line of a status file that starts with `name`.
fn status_field(status: &str, name: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with(name))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn parse_switches(status: &str) -> u64 {
    status_field(status, "voluntary_ctxt_switches:").unwrap_or(0)
        + status_field(status, "nonvoluntary_ctxt_switches:").unwrap_or(0)
}

fn parse_stat_ticks(stat: &str) -> Option<CpuTicks> {
    // The command name (field 2) is in parentheses and may hold spaces: count fields from
    // the last ')'. After it come field 3 (state) … field 17 (cstime).
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| -> Option<u64> { fields.get(n - 3)?.parse().ok() };
    Some(CpuTicks {
        own: field(14)? + field(15)?,
        system: field(15)?,
        children: field(16)? + field(17)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        let stat = "25836 (my (odd) cmd) S 1 2 3 0 -1 4194304 98 0 0 0 17 5 40 2 20 0 1 0 468747";
        assert_eq!(
            parse_stat_ticks(stat),
            Some(CpuTicks {
                own: 22,
                system: 5,
                children: 42
            })
        );
        assert_eq!(parse_stat_ticks("12 (x) S 1"), None);
    }

    #[test]
    fn rss_is_read_from_the_status_file() {
        let status = "Name:\tjobz-broker\nVmPeak:\t  99999 kB\nVmRSS:\t   12345 kB\n";
        assert_eq!(parse_rss_kib(status), Some(12_345));
        assert_eq!(parse_rss_kib("Name:\tkthread\n"), None);
    }

    #[test]
    fn switches_add_both_kinds() {
        let status = "Threads:\t3\nvoluntary_ctxt_switches:\t10\nnonvoluntary_ctxt_switches:\t2\n";
        assert_eq!(parse_switches(status), 12);
        assert_eq!(status_field(status, "Threads:"), Some(3));
        assert_eq!(parse_switches(""), 0);
    }

    #[test]
    fn switches_count_only_threads_alive_before_and_after() {
        let before = Switches(BTreeMap::from([(1, 100), (2, 500)]));
        // Thread 2 ended, thread 3 began: only thread 1's 20 count.
        let after = Switches(BTreeMap::from([(1, 120), (3, 7)]));
        assert_eq!(after.since(&before), 20);
    }

    #[test]
    fn this_process_can_be_measured() {
        let me = std::process::id();
        assert!(threads(me).unwrap() >= 1);
        let switches = context_switches(me).unwrap();
        assert!(switches.since(&switches) == 0);
        assert!(rss_kib(me).unwrap() > 0);
        let a = cpu_ticks(me).unwrap();
        assert_eq!(a.since(a), CpuTicks::default());
        assert_eq!(ticks_to_duration(150, 100), Duration::from_millis(1500));
        assert!(!is_zombie(me));
    }
}
