//! Scenario 13: the peers, measured in the same bench run by their own drivers, which live
//! beside the repository (`../shared/peers`, never copied here): Celery 5 + Redis
//! (`bench_celery.py`) and the spawn limit (`bench_spawn.sh`: processes started and reaped
//! per second, two loops in parallel).
//!
//! `setup.sh` there installs Debian's redis-server, gcc and Python packages into a venv
//! (`$VENV`, default `/tmp/peersvenv`); it runs only when something the drivers need is
//! missing, and what counts is whether the drivers can run afterwards, not its exit code.
//! When they cannot (no network, no root, no peers directory) the rows say why and the
//! bench goes on. The drivers' output is parsed here ([`parse_celery`], [`parse_spawn`]).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::report::{Row, Unit};

/// The scenario's label in the table.
pub const SCENARIO: &str = "13 peers";

/// The spawn-limit case the targets compare with.
pub const SPAWN_CASE: &str = "C posix_spawn par=2 sh -c true";

/// How long setup and each driver may take.
const DRIVER_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// The driver counts: the (`--reps 3 --tasks 3000 --chains 300 --iso 50`,
/// `bench_spawn.sh 3 3000`), or small ones for a quick run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    /// Repetitions (medians are printed).
    pub reps: u32,
    /// Tasks of the burst.
    pub tasks: u32,
    /// Chains of the chain burst.
    pub chains: u32,
    /// Samples of each isolated series.
    pub iso: u32,
    /// Processes per spawn measurement.
    pub spawns: u32,
}

impl Counts {
    /// The counts of issue 12's figures.
    pub const FULL: Counts = Counts {
        reps: 3,
        tasks: 3000,
        chains: 300,
        iso: 50,
        spawns: 3000,
    };
    /// Small counts, for trying the integration out.
    pub const QUICK: Counts = Counts {
        reps: 1,
        tasks: 300,
        chains: 30,
        iso: 10,
        spawns: 300,
    };
}

/// Celery's figures, medians over the repetitions.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Celery {
    /// One task at a time: enqueue → the task recorded its end, p50 and p99 (ms).
    pub task_p50_ms: Option<f64>,
    /// p99 of the same.
    pub task_p99_ms: Option<f64>,
    /// 3-step chain one at a time, p50 (ms).
    pub chain_p50_ms: Option<f64>,
    /// p99 of the same.
    pub chain_p99_ms: Option<f64>,
    /// 10 → 1 chord one at a time, p50 (ms).
    pub chord_p50_ms: Option<f64>,
    /// p99 of the same.
    pub chord_p99_ms: Option<f64>,
    /// The burst: tasks/s, first enqueue → last end.
    pub burst_per_s: Option<f64>,
    /// Tasks of the burst that never ended.
    pub burst_lost: Option<f64>,
    /// Tasks of the burst.
    pub burst_tasks: Option<u32>,
    /// The chain burst: chains/s.
    pub chains_per_s: Option<f64>,
    /// Idle worker (main process and its pool) RSS before any task, MiB.
    pub worker_rss_mib: Option<f64>,
    /// Idle redis-server RSS before any task, MiB.
    pub redis_rss_mib: Option<f64>,
}

/// What the peers gave, or why they could not run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Peers {
    /// Celery's figures, if its driver ran.
    pub celery: Option<Celery>,
    /// Processes per second of [`SPAWN_CASE`] (median), if the spawn driver ran.
    pub spawn_per_s: Option<f64>,
    /// Why something is missing (one line each).
    pub notes: Vec<String>,
}

/// `key=value` pairs of a driver line (`MEDIAN p50_ms=2.0  p99_ms=3.1`).
fn pairs(line: &str) -> BTreeMap<String, f64> {
    line.split_whitespace()
        .filter_map(|word| {
            let (key, value) = word.split_once('=')?;
            Some((key.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// The RSS in `  celery worker: RSS 137.8 MiB, PSS 77.4 MiB (3 processes)`.
fn rss_of(line: &str) -> Option<f64> {
    let after = line.split_once("RSS ")?.1;
    after.split_whitespace().next()?.parse().ok()
}

/// Parses `bench_celery.py`'s output: each `== <name>: N runs` section's `MEDIAN` line,
/// and the first memory section. Sections that are missing leave their fields `None`.
pub fn parse_celery(text: &str) -> Celery {
    let mut c = Celery::default();
    let mut section = String::new();
    let mut memory_seen = 0;
    for line in text.lines() {
        let trimmed = line.trim();
        if let Some(header) = trimmed.strip_prefix("== ") {
            section = header.to_owned();
            if header.starts_with("memory") {
                memory_seen += 1;
            }
            continue;
        }
        if memory_seen == 1 && section.starts_with("memory") {
            if trimmed.starts_with("celery worker:") {
                c.worker_rss_mib = rss_of(trimmed);
            } else if trimmed.starts_with("redis-server:") {
                c.redis_rss_mib = rss_of(trimmed);
            }
            continue;
        }
        let Some(rest) = trimmed.strip_prefix("MEDIAN") else {
            continue;
        };
        let v = pairs(rest);
        let name = section.split(':').next().unwrap_or("");
        if name == "task isolated" {
            c.task_p50_ms = v.get("p50_ms").copied();
            c.task_p99_ms = v.get("p99_ms").copied();
        } else if name == "chain3 isolated" {
            c.chain_p50_ms = v.get("p50_ms").copied();
            c.chain_p99_ms = v.get("p99_ms").copied();
        } else if name.starts_with("chord") {
            c.chord_p50_ms = v.get("p50_ms").copied();
            c.chord_p99_ms = v.get("p99_ms").copied();
        } else if let Some(tasks) = name.strip_prefix("batch of ") {
            c.burst_per_s = v.get("per_s").copied();
            c.burst_lost = v.get("lost").copied();
            c.burst_tasks = tasks.split_whitespace().next().and_then(|n| n.parse().ok());
        } else if name.contains("chains of 3") {
            c.chains_per_s = v.get("per_s").copied();
        }
    }
    c
}

/// Parses `bench_spawn.sh`'s table: the median of each case, by its name with spaces
/// squeezed (`C posix_spawn par=2 sh -c true`).
pub fn parse_spawn(text: &str) -> BTreeMap<String, f64> {
    let mut cases = BTreeMap::new();
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        // name … median min max: the last three words are numbers.
        if words.len() < 4 || words[0] == "case" {
            continue;
        }
        let numbers: Option<Vec<f64>> = words[words.len() - 3..]
            .iter()
            .map(|w| w.parse().ok())
            .collect();
        if let Some(numbers) = numbers {
            cases.insert(words[..words.len() - 3].join(" "), numbers[0]);
        }
    }
    cases
}

/// Where the peers' drivers are: `$JOBZ_BENCH_PEERS_DIR`, else `../shared/peers` beside
/// the repository, else beside the main checkout of a git worktree.
pub fn locate(repo: &Path) -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("JOBZ_BENCH_PEERS_DIR") {
        return Some(PathBuf::from(dir));
    }
    let beside = repo.join("../shared/peers");
    if beside.join("bench_celery.py").is_file() {
        return Some(beside);
    }
    let out = Command::new("git")
        .args(["rev-parse", "--path-format=absolute", "--git-common-dir"])
        .current_dir(repo)
        .output()
        .ok()?;
    let common = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let main = common.parent()?;
    let beside_main = main.join("../shared/peers");
    beside_main
        .join("bench_celery.py")
        .is_file()
        .then_some(beside_main)
}

/// The peers' venv (`$VENV`, as their scripts read it).
fn venv() -> PathBuf {
    std::env::var_os("VENV").map_or_else(|| PathBuf::from("/tmp/peersvenv"), PathBuf::from)
}

/// What the drivers need and is missing, if anything.
fn missing() -> Option<String> {
    let python = venv().join("bin/python");
    let imports = Command::new(&python)
        .args(["-c", "import celery, redis, psutil"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !imports.is_ok_and(|s| s.success()) {
        return Some(format!(
            "{} cannot import celery, redis and psutil",
            python.display()
        ));
    }
    let on_path = |cmd: &str| {
        Command::new("sh")
            .args(["-c", &format!("command -v {cmd}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    for cmd in ["redis-server", "gcc"] {
        if !on_path(cmd) {
            return Some(format!("{cmd} is not installed"));
        }
    }
    None
}

/// Runs `cmd` in `dir` in its own process group, its output into `log`, stopped
/// (SIGTERM to the group, then SIGKILL) after `timeout`. Returns its exit status.
fn run_logged(
    mut cmd: Command,
    dir: &Path,
    log: &Path,
    timeout: Duration,
) -> anyhow::Result<std::process::ExitStatus> {
    use std::os::unix::process::CommandExt;
    let file = fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    cmd.current_dir(dir)
        .stdin(Stdio::null())
        .stdout(file.try_clone().context("cloning a file handle")?)
        .stderr(file)
        .process_group(0);
    let mut child = crate::mesh::spawn_group(&mut cmd)?;
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if started.elapsed() >= timeout {
            child.stop();
            bail!("stopped after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The last `n` lines of a file, on one line.
fn tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

/// The peers' directory once what their drivers need is there (running `setup.sh` if it
/// is not), or why they cannot run, with notes worth showing either way. Logs go to
/// `log_dir`.
pub fn prepare(repo: &Path, log_dir: &Path) -> (Option<PathBuf>, Vec<String>) {
    let mut notes = Vec::new();
    let Some(dir) = locate(repo) else {
        notes.push(String::from(
            "peers not found: no ../shared/peers beside the repository (set JOBZ_BENCH_PEERS_DIR)",
        ));
        return (None, notes);
    };
    if let Some(what) = missing() {
        eprintln!("bench: peers: {what}; running {}/setup.sh", dir.display());
        let log = log_dir.join("peers-setup.log");
        let mut cmd = Command::new("sh");
        cmd.arg("setup.sh");
        let status = run_logged(cmd, &dir, &log, DRIVER_TIMEOUT);
        if let Some(still) = missing() {
            notes.push(format!(
                "peers could not be set up ({still}; setup.sh: {}): {}",
                match status {
                    Ok(s) => s.to_string(),
                    Err(e) => format!("{e:#}"),
                },
                tail(&log, 3)
            ));
            return (None, notes);
        }
        if status.as_ref().is_ok_and(|s| !s.success()) {
            notes.push(format!(
                "setup.sh failed but the drivers have what they need: {}",
                tail(&log, 1)
            ));
        }
    }
    (Some(dir), notes)
}

/// Runs the drivers in `dir` with `counts`, logs in `log_dir`. Never fails: what could
/// not run is said in [`Peers::notes`].
pub fn measure(dir: &Path, counts: Counts, log_dir: &Path) -> Peers {
    let mut peers = Peers::default();

    eprintln!(
        "bench: peers: spawn limit (bench_spawn.sh {} {})",
        counts.reps, counts.spawns
    );
    let log = log_dir.join("peers-spawn.log");
    let mut cmd = Command::new("bash");
    cmd.args([
        "bench_spawn.sh",
        &counts.reps.to_string(),
        &counts.spawns.to_string(),
    ]);
    match run_logged(cmd, dir, &log, DRIVER_TIMEOUT) {
        Ok(status) if status.success() => {
            let cases = parse_spawn(&fs::read_to_string(&log).unwrap_or_default());
            peers.spawn_per_s = cases.get(SPAWN_CASE).copied();
            if peers.spawn_per_s.is_none() {
                peers.notes.push(format!(
                    "bench_spawn.sh printed no {SPAWN_CASE:?}: {}",
                    tail(&log, 3)
                ));
            }
        }
        Ok(status) => peers
            .notes
            .push(format!("bench_spawn.sh {status}: {}", tail(&log, 3))),
        Err(e) => peers.notes.push(format!("bench_spawn.sh: {e:#}")),
    }

    eprintln!(
        "bench: peers: Celery + Redis (bench_celery.py --reps {} --tasks {} --chains {} --iso {})",
        counts.reps, counts.tasks, counts.chains, counts.iso
    );
    let log = log_dir.join("peers-celery.log");
    let mut cmd = Command::new(venv().join("bin/python"));
    cmd.args([
        "bench_celery.py",
        "--reps",
        &counts.reps.to_string(),
        "--tasks",
        &counts.tasks.to_string(),
        "--chains",
        &counts.chains.to_string(),
        "--iso",
        &counts.iso.to_string(),
    ]);
    match run_logged(cmd, dir, &log, DRIVER_TIMEOUT) {
        Ok(status) if status.success() => {
            let celery = parse_celery(&fs::read_to_string(&log).unwrap_or_default());
            if celery.burst_per_s.is_none() {
                peers.notes.push(format!(
                    "bench_celery.py printed no burst figure: {}",
                    tail(&log, 3)
                ));
            }
            peers.celery = Some(celery);
        }
        Ok(status) => peers
            .notes
            .push(format!("bench_celery.py {status}: {}", tail(&log, 3))),
        Err(e) => peers.notes.push(format!("bench_celery.py: {e:#}")),
    }
    peers
}

/// A figure in ms as the table prints times.
fn ms(value: f64) -> String {
    crate::report::format(value / 1e3, Unit::Time)
}

/// The scenario's rows: every figure the drivers gave, and why any is missing.
pub fn rows(peers: &Peers, run: bool) -> Vec<Row> {
    let s = SCENARIO;
    if !run {
        return vec![Row::info(
            s,
            "Celery + Redis, spawn limit",
            "not run (bench/run.sh --peers)",
        )];
    }
    let mut rows = Vec::new();
    if let Some(spawn) = peers.spawn_per_s {
        rows.push(Row::figure(
            s,
            "spawn limit: `sh -c true`, 2 posix_spawn loops",
            spawn,
            Unit::PerSec,
            crate::report::Target::None,
        ));
    }
    if let Some(c) = &peers.celery {
        let pair = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) => Some(format!("{} / {}", ms(a), ms(b))),
            _ => None,
        };
        let mut push = |metric: &str, value: Option<String>| {
            if let Some(value) = value {
                rows.push(Row::info(s, metric, value));
            }
        };
        push(
            "Celery: one task at a time, enqueue -> end p50 / p99",
            pair(c.task_p50_ms, c.task_p99_ms),
        );
        push(
            "Celery: 3-step chain one at a time, p50 / p99",
            pair(c.chain_p50_ms, c.chain_p99_ms),
        );
        push(
            "Celery: chord 10 -> 1 one at a time, p50 / p99",
            pair(c.chord_p50_ms, c.chord_p99_ms),
        );
        push(
            "Celery: burst, tasks/s (lost)",
            c.burst_per_s.map(|r| {
                format!(
                    "{r:.0}/s ({} of {})",
                    c.burst_lost.unwrap_or(0.0),
                    c.burst_tasks.unwrap_or(0)
                )
            }),
        );
        push(
            "Celery: burst of 3-step chains, chains/s",
            c.chains_per_s.map(|r| format!("{r:.0}/s")),
        );
        push(
            "Celery: idle RSS, worker (with its 2 pool processes) / redis-server",
            c.worker_rss_mib
                .zip(c.redis_rss_mib)
                .map(|(w, r)| format!("{w:.1} / {r:.1} MiB")),
        );
    }
    for note in &peers.notes {
        rows.push(Row::info(s, "note", note.clone()));
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `bench_celery.py --reps 1 --tasks 300 --chains 30 --iso 10`, as it printed on this
    /// machine kind (the first lines, from the worker's start, cut).
    const CELERY: &str = "\
== memory, idle, before any task
  celery worker: RSS 137.8 MiB, PSS 77.4 MiB (3 processes)
  redis-server: RSS 12.3 MiB, PSS 6.7 MiB (1 processes)

== task isolated: 1 runs
  run 1 p50_ms=9.4  p99_ms=99.8
  MEDIAN p50_ms=9.4  p99_ms=99.8

== chain3 isolated: 1 runs
  run 1 p50_ms=23.8  p99_ms=92.0
  MEDIAN p50_ms=23.8  p99_ms=92.0

== chord 10->1 isolated: 1 runs
  run 1 p50_ms=59.3  p99_ms=72.0
  MEDIAN p50_ms=59.3  p99_ms=72.0

== batch of 300 tasks: 1 runs
  run 1 per_s=330.0  lost=0.0  enqueue_per_s=684.6  p50_ms=381.6  p99_ms=488.6
  MEDIAN per_s=330.0  lost=0.0  enqueue_per_s=684.6  p50_ms=381.6  p99_ms=488.6

== 30 chains of 3, burst: 1 runs
  run 1 per_s=77.0  lost=0.0  enqueue_per_s=350.5  p50_ms=289.8  p99_ms=317.4
  MEDIAN per_s=77.0  lost=0.0  enqueue_per_s=350.5  p50_ms=289.8  p99_ms=317.4

== memory, idle, after the load
  celery worker: RSS 143.1 MiB, PSS 84.5 MiB (3 processes)
  redis-server: RSS 12.9 MiB, PSS 7.5 MiB (1 processes)
";

    /// `bench_spawn.sh 1 300` on this machine kind.
    const SPAWN: &str = "\
case                                       median      min      max   (processes/s, 1 runs x 300)
C fork+exec      par=2  /bin/true             861      861      861
C fork+exec      par=2  sh -c true           1272     1272     1272
C posix_spawn    par=2  /bin/true            1929     1929     1929
C posix_spawn    par=2  sh -c true           1751     1751     1751
py subprocess.run par=2 sh -c true           1548     1548     1548
xargs -P2 -n1    par=2  sh -c true            962      962      962
";

    #[test]
    fn celery_medians_and_idle_memory_are_read_by_section() {
        let c = parse_celery(CELERY);
        assert_eq!((c.task_p50_ms, c.task_p99_ms), (Some(9.4), Some(99.8)));
        assert_eq!((c.chain_p50_ms, c.chord_p50_ms), (Some(23.8), Some(59.3)));
        assert_eq!(
            (c.burst_per_s, c.burst_lost, c.burst_tasks),
            (Some(330.0), Some(0.0), Some(300))
        );
        assert_eq!(c.chains_per_s, Some(77.0));
        // Memory before any task, not after the load.
        assert_eq!(
            (c.worker_rss_mib, c.redis_rss_mib),
            (Some(137.8), Some(12.3))
        );
    }

    #[test]
    fn a_cut_or_foreign_celery_output_leaves_fields_empty_without_failing() {
        let cut = &CELERY[..CELERY.find("== batch").unwrap()];
        let c = parse_celery(cut);
        assert_eq!(c.task_p50_ms, Some(9.4));
        assert_eq!((c.burst_per_s, c.chains_per_s), (None, None));
        assert_eq!(
            parse_celery("Traceback (most recent call last):\n  oops"),
            Celery::default()
        );
        // A run line is not a median.
        let c = parse_celery("== task isolated: 1 runs\n  run 1 p50_ms=1.0  p99_ms=2.0\n");
        assert_eq!(c.task_p50_ms, None);
        // A value that is not a number is skipped, not a panic.
        let c = parse_celery("== task isolated: 1 runs\n  MEDIAN p50_ms=nan?  p99_ms=2.0\n");
        assert_eq!((c.task_p50_ms, c.task_p99_ms), (None, Some(2.0)));
    }

    #[test]
    fn spawn_cases_are_keyed_by_their_squeezed_names() {
        let cases = parse_spawn(SPAWN);
        assert_eq!(cases.get(SPAWN_CASE), Some(&1751.0));
        assert_eq!(cases.get("C fork+exec par=2 /bin/true"), Some(&861.0));
        assert_eq!(
            cases.get("py subprocess.run par=2 sh -c true"),
            Some(&1548.0)
        );
        assert_eq!(cases.len(), 6, "the header is not a case: {cases:?}");
        assert!(parse_spawn("child failed\n").is_empty());
    }

    #[test]
    fn rows_say_what_ran_and_why_the_rest_did_not() {
        let peers = Peers {
            celery: Some(parse_celery(CELERY)),
            spawn_per_s: Some(1751.0),
            notes: vec![String::from(
                "setup.sh failed but the drivers have what they need",
            )],
        };
        let rows = rows(&peers, true);
        let find = |m: &str| rows.iter().find(|r| r.metric.starts_with(m)).unwrap();
        assert_eq!(find("spawn limit").value, "1751/s");
        assert_eq!(find("Celery: one task").value, "9.4 ms / 99.8 ms");
        assert_eq!(find("Celery: burst, tasks/s").value, "330/s (0 of 300)");
        assert_eq!(find("Celery: idle RSS").value, "137.8 / 12.3 MiB");
        assert_eq!(find("note").met, None);
        let not_run = super::rows(&Peers::default(), false);
        assert_eq!(not_run.len(), 1);
        assert!(not_run[0].value.contains("--peers"));
    }
}
