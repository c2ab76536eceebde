//! Nothing dropped, nothing twice: issue 4's fault-injection suite.
//!
//! Every command appends `<run> <task> <attempt> <worker>` to a ledger file as it starts,
//! so the books are kept by the commands themselves, not by the broker under test: after
//! the fault, every acknowledged run must reach a final state and no (task, attempt) may
//! appear twice in the ledger.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;
use std::time::Duration;

use crate::harness::{list_of, steps_of, str_of, wait_until, Mesh};

const LEDGER_LINE: &str =
    r#"echo "$JOBZ_RUN_ID $JOBZ_TASK_ID $JOBZ_ATTEMPT $JOBZ_WORKER" >> @DIR@/ledger"#;

/// Broker flags that make leases and expiry short enough for a test.
const FAST_LEASES: [&str; 6] = [
    "--lease-timeout",
    "1s",
    "--lease-grace",
    "500ms",
    "--worker-expiry",
    "3s",
];

struct Entry {
    run: String,
    task: String,
    attempt: u32,
    worker: String,
}

fn ledger(dir: &Path) -> Vec<Entry> {
    fs::read_to_string(dir.join("ledger"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some(Entry {
                run: f.next()?.to_owned(),
                task: f.next()?.to_owned(),
                attempt: f.next()?.parse().ok()?,
                worker: f.next()?.to_owned(),
            })
        })
        .collect()
}

/// Asserts that no (task, attempt) ran twice; returns executions per run.
fn assert_no_attempt_ran_twice(dir: &Path) -> BTreeMap<String, usize> {
    let mut seen = BTreeSet::new();
    let mut per_run: BTreeMap<String, usize> = BTreeMap::new();
    for e in ledger(dir) {
        assert!(
            seen.insert((e.task.clone(), e.attempt)),
            "task {} attempt {} ran twice (second time on {})",
            e.task,
            e.attempt,
            e.worker
        );
        *per_run.entry(e.run).or_default() += 1;
    }
    per_run
}

fn ledger_len(dir: &Path) -> usize {
    ledger(dir).len()
}

/// Triggers `n` runs from eight client threads (as many callers would), returning the
/// acknowledged run ids.
fn trigger_many(mesh: &Mesh, job: &str, n: usize) -> Vec<String> {
    let started = std::time::Instant::now();
    let runs: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|t| {
                s.spawn(move || {
                    (t..n)
                        .step_by(8)
                        .map(|_| mesh.start_run(job, &[]))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    eprintln!("{n} runs of {job} accepted in {:.1?}", started.elapsed());
    runs
}

fn wait_all_final(mesh: &Mesh, runs: &[String], timeout: Duration) -> Vec<serde_json::Value> {
    runs.iter()
        .map(|r| mesh.wait_run_final_within(r, timeout))
        .collect()
}

fn signal(pid: u32, sig: &str) {
    let status = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill {sig} {pid} failed");
}

#[test]
fn thousand_queue_runs_survive_a_worker_killed_twice_and_none_runs_twice() {
    let jobs = format!(
        r#"
jobs:
  - name: q
    delivery: queue
    retries: 5
    retry_backoff: 100ms
    command: '{LEDGER_LINE}; sleep 0.02'
"#
    );
    let mut mesh = Mesh::builder()
        .broker_args(&FAST_LEASES)
        .worker("w1", &jobs)
        .worker("w2", &jobs)
        .worker("w3", &jobs)
        .start();
    mesh.wait_workers_live(3);
    let dir = mesh.dir().to_owned();
    let started = std::time::Instant::now();
    let runs = trigger_many(&mesh, "q", 1000);
    for threshold in [200, 500] {
        wait_until(Duration::from_secs(60), "progress before the kill", || {
            ledger_len(&dir) >= threshold
        });
        mesh.kill9("w1");
        mesh.restart("w1");
    }
    let finals = wait_all_final(&mesh, &runs, Duration::from_secs(120));
    eprintln!("1000 queue runs final after {:.1?}", started.elapsed());
    for run in &finals {
        assert_eq!(str_of(run, "state"), "succeeded", "{run:#}");
        let ok = steps_of(run)
            .iter()
            .filter(|s| str_of(s, "state") == "succeeded")
            .count();
        assert_eq!(ok, 1, "a queue run must succeed exactly once: {run:#}");
    }
    let per_run = assert_no_attempt_ran_twice(&dir);
    let retried = per_run.values().filter(|&&n| n > 1).count();
    eprintln!("1000 queue runs: {retried} needed more than one attempt after the kills");
}

#[test]
fn broadcast_published_while_a_worker_is_down_runs_there_once_when_it_returns() {
    let jobs = format!("jobs:\n  - name: b\n    command: '{LEDGER_LINE}'\n");
    let mut mesh = Mesh::builder()
        .broker_args(&["--worker-expiry", "30s"])
        .worker("w1", &jobs)
        .worker("w2", &jobs)
        .start();
    mesh.wait_workers_live(2);
    mesh.kill9("w2");
    let run_id = mesh.start_run("b", &[]);
    let dir = mesh.dir().to_owned();
    wait_until(Duration::from_secs(10), "w1 to run its task", || {
        ledger(&dir).iter().any(|e| e.worker == "w1")
    });
    assert!(ledger(&dir).iter().all(|e| e.worker != "w2"));
    mesh.restart("w2");
    let run = mesh.wait_run_final(&run_id);
    assert_eq!(str_of(&run, "state"), "succeeded", "{run:#}");
    let on_w2: Vec<_> = ledger(&dir)
        .into_iter()
        .filter(|e| e.worker == "w2")
        .collect();
    assert_eq!(on_w2.len(), 1, "ran on the returning worker exactly once");
    assert_no_attempt_ran_twice(&dir);
}

#[test]
fn broker_killed_under_load_loses_nothing_and_runs_nothing_twice() {
    let jobs = format!(
        "jobs:\n  - name: q\n    delivery: queue\n    command: '{LEDGER_LINE}; sleep 0.1'\n"
    );
    let mut mesh = Mesh::builder()
        .worker("w1", &jobs)
        .worker("w2", &jobs)
        .start();
    mesh.wait_workers_live(2);
    let dir = mesh.dir().to_owned();
    let runs = trigger_many(&mesh, "q", 200);
    wait_until(Duration::from_secs(30), "some progress", || {
        ledger_len(&dir) >= 40
    });
    mesh.kill9("broker");
    mesh.restart("broker");
    let finals = wait_all_final(&mesh, &runs, Duration::from_secs(120));
    for run in &finals {
        assert_eq!(str_of(run, "state"), "succeeded", "{run:#}");
    }
    let per_run = assert_no_attempt_ran_twice(&dir);
    for run in &runs {
        assert_eq!(
            per_run.get(run),
            Some(&1),
            "run {run} executed {:?} times",
            per_run.get(run)
        );
    }
}

#[test]
fn a_step_longer_than_the_lease_on_a_healthy_worker_is_not_given_to_anyone_else() {
    let jobs = format!(
        "jobs:\n  - name: long\n    delivery: queue\n    retries: 3\n    command: '{LEDGER_LINE}; sleep 4'\n"
    );
    let mesh = Mesh::builder()
        .broker_args(&FAST_LEASES)
        .worker("w1", &jobs)
        .worker("w2", &jobs)
        .start();
    mesh.wait_workers_live(2);
    let run_id = mesh.start_run("long", &[]);
    let run = mesh.wait_run_final(&run_id);
    assert_eq!(str_of(&run, "state"), "succeeded", "{run:#}");
    let entries = ledger(mesh.dir());
    assert_eq!(entries.len(), 1, "the long step ran more than once");
    assert_eq!(entries[0].attempt, 1);
    assert!(list_of(&run, "attempts").is_empty(), "{run:#}");
}

#[test]
fn a_frozen_worker_loses_its_lease_and_its_late_result_does_not_overwrite_the_retry() {
    // SIGSTOP freezes the worker but not its step (another process group): to the broker it
    // is a partition; the step still finishes and its result arrives late after SIGCONT.
    let jobs = format!(
        "jobs:\n  - name: p\n    delivery: queue\n    retries: 2\n    retry_backoff: 100ms\n    command: '{LEDGER_LINE}; sleep 3'\n"
    );
    let mut mesh = Mesh::builder()
        .broker_args(&FAST_LEASES)
        .worker("w1", &jobs)
        .worker("w2", &jobs)
        .start();
    mesh.wait_workers_live(2);
    let dir = mesh.dir().to_owned();
    let run_id = mesh.start_run("p", &[]);
    wait_until(
        Duration::from_secs(10),
        "the first attempt to start",
        || ledger_len(&dir) == 1,
    );
    let first = ledger(&dir).remove(0);
    let frozen_pid = mesh.pid(&first.worker);
    signal(frozen_pid, "-STOP");
    wait_until(
        Duration::from_secs(20),
        "the retry on the other worker",
        || ledger(&dir).iter().any(|e| e.attempt == 2),
    );
    signal(frozen_pid, "-CONT");
    let retry = ledger(&dir).into_iter().find(|e| e.attempt == 2).unwrap();
    assert_ne!(retry.worker, first.worker, "retried on the frozen worker");
    let run = mesh.wait_run_final(&run_id);
    assert_eq!(str_of(&run, "state"), "succeeded", "{run:#}");
    let late = || {
        list_of(&mesh.run(&run_id), "attempts")
            .into_iter()
            .find(|a| a["late"] == true && a["attempt"] == 1)
    };
    wait_until(
        Duration::from_secs(20),
        "the late result to be recorded",
        || late().is_some(),
    );
    let run = mesh.run(&run_id);
    let steps = steps_of(&run);
    assert_eq!(steps.len(), 1, "{run:#}");
    assert_eq!(
        steps[0]["attempt"], 2,
        "the late result overwrote the newer attempt: {run:#}"
    );
    assert_eq!(str_of(&steps[0], "worker"), retry.worker);
    assert_no_attempt_ran_twice(&dir);
}

#[test]
fn retries_with_backoff_then_the_dead_list_and_a_rerun_from_it() {
    let jobs = r#"
jobs:
  - name: flaky
    delivery: queue
    retries: 3
    retry_backoff: 100ms
    command: 'f=@DIR@/count.$JOBZ_RUN_ID; n=$(( $(cat $f 2>/dev/null || echo 0) + 1 )); echo $n > $f; test $n -ge 3'
  - name: doomed
    delivery: queue
    retries: 1
    retry_backoff: 100ms
    command: 'test -e @DIR@/fixed'
"#;
    let mesh = Mesh::builder().worker("w1", jobs).start();
    mesh.wait_workers_live(1);

    let run = mesh.wait_run_final(&mesh.start_run("flaky", &[]));
    assert_eq!(str_of(&run, "state"), "succeeded", "{run:#}");
    assert_eq!(steps_of(&run)[0]["attempt"], 3, "{run:#}");
    assert_eq!(
        list_of(&run, "attempts").len(),
        2,
        "two failed attempts in the history: {run:#}"
    );

    let doomed = mesh.start_run("doomed", &[]);
    let run = mesh.wait_run_final(&doomed);
    assert_eq!(str_of(&run, "state"), "failed", "{run:#}");
    let (status, dead) = mesh.get_json("/dead");
    assert_eq!(status, 200);
    let entry = list_of(&dead, "dead")
        .into_iter()
        .find(|d| d["run_id"] == doomed.as_str())
        .unwrap_or_else(|| panic!("not in the dead list: {dead:#}"));
    assert_eq!(entry["attempts"], 2, "{entry:#}");

    fs::write(mesh.dir().join("fixed"), "").unwrap();
    let (status, rerun) = mesh.get_json(str_of(&entry, "retry_url"));
    assert_eq!(status, 202, "{rerun:#}");
    let rerun_id = str_of(&rerun, "run_id").to_owned();
    let run = mesh.wait_run_final(&rerun_id);
    assert_eq!(str_of(&run, "state"), "succeeded", "{run:#}");
    assert_eq!(run["parent_runs"][0], doomed.as_str());
    let (_, again) = mesh.get_json(str_of(&entry, "retry_url"));
    assert_eq!(
        str_of(&again, "run_id"),
        rerun_id,
        "a second retry must be the same run"
    );
}

/// A network namespace joined to this one by a veth pair, for a worker to live behind a
/// link the test can cut. Removed (with its veth) on drop, also when the test fails.
struct Netns {
    name: String,
    host_veth: String,
    host_ip: String,
}

impl Netns {
    fn new(tag: &str) -> Netns {
        // A /30 of 10.253.0.0/16 of our own; nothing else uses it, and it has no route out.
        let n = (std::process::id() % 250) as u8 + 1;
        let name = format!("jzp-{tag}-{}", std::process::id());
        let host_veth = format!("jzp{n}h");
        let ns_veth = format!("jzp{n}n");
        let host_ip = format!("10.253.{n}.1");
        let ns_ip = format!("10.253.{n}.2");
        let net = Netns {
            name: name.clone(),
            host_veth: host_veth.clone(),
            host_ip: host_ip.clone(),
        };
        for cmd in [
            vec!["netns", "add", &name],
            vec![
                "link", "add", &host_veth, "type", "veth", "peer", "name", &ns_veth,
            ],
            vec!["link", "set", &ns_veth, "netns", &name],
            vec!["addr", "add", &format!("{host_ip}/30"), "dev", &host_veth],
            vec!["link", "set", &host_veth, "up"],
            vec![
                "-n",
                &name,
                "addr",
                "add",
                &format!("{ns_ip}/30"),
                "dev",
                &ns_veth,
            ],
            vec!["-n", &name, "link", "set", &ns_veth, "up"],
            vec!["-n", &name, "link", "set", "lo", "up"],
        ] {
            ip(&cmd);
        }
        net
    }

    fn link(&self, state: &str) {
        ip(&["link", "set", &self.host_veth, state]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.host_veth])
            .status();
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn ip(args: &[&str]) {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .expect("running ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_worker_partitioned_mid_step_is_retried_elsewhere_and_its_late_result_is_only_recorded() {
    let net = Netns::new("lease");
    let jobs = format!(
        "jobs:\n  - name: p\n    delivery: queue\n    retries: 2\n    retry_backoff: 100ms\n    command: '{LEDGER_LINE}; sleep 3'\n"
    );
    // `a-ns` sorts first, so the first attempt goes to the worker behind the veth.
    // Sealed: the broker binds a non-loopback address, which needs keys.
    let mesh = Mesh::builder()
        .sealed()
        .broker_host(&net.host_ip)
        .broker_args(&FAST_LEASES)
        .worker("a-ns", &jobs)
        .worker_in_netns("a-ns", &net.name)
        .worker("b-host", &jobs)
        .start();
    mesh.wait_workers_live(2);
    let dir = mesh.dir().to_owned();
    let run_id = mesh.start_run("p", &[]);
    wait_until(
        Duration::from_secs(10),
        "the first attempt to start",
        || ledger_len(&dir) == 1,
    );
    let first = ledger(&dir).remove(0);
    assert_eq!(
        first.worker, "a-ns",
        "the first attempt should run behind the veth"
    );

    net.link("down");
    wait_until(
        Duration::from_secs(20),
        "the retry on the other worker",
        || ledger(&dir).iter().any(|e| e.attempt == 2),
    );
    let retry = ledger(&dir).into_iter().find(|e| e.attempt == 2).unwrap();
    assert_eq!(retry.worker, "b-host");
    let run = mesh.wait_run_final(&run_id);
    assert_eq!(str_of(&run, "state"), "succeeded", "{run:#}");

    net.link("up");
    let late = || {
        list_of(&mesh.run(&run_id), "attempts")
            .into_iter()
            .any(|a| a["late"] == true && a["attempt"] == 1 && a["worker"] == "a-ns")
    };
    wait_until(
        Duration::from_secs(30),
        "the late result once the link is back",
        late,
    );
    let run = mesh.run(&run_id);
    let steps = steps_of(&run);
    assert_eq!(steps.len(), 1, "{run:#}");
    assert_eq!(
        steps[0]["attempt"], 2,
        "the late result overwrote the retry: {run:#}"
    );
    assert_eq!(str_of(&steps[0], "state"), "succeeded");
    assert_no_attempt_ran_twice(&dir);
    drop(mesh);
}
