//! Semaphores (issue 3): barriers that count completions per key, survive `kill -9` and a
//! broker restart, fire exactly once even with two semaphore processes, and time out.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{list_of, steps_of_job, str_of, wait_for, Mesh, DEADLINE};

/// Runs of `job`, newest first.
fn runs_of(mesh: &Mesh, job: &str) -> Vec<Value> {
    let (status, body) = mesh.get_json(&format!("/runs?job={job}&limit=100"));
    assert_eq!(status, 200, "GET /runs?job={job}: {body}");
    list_of(&body, "runs")
}

/// Waits until `job` has at least `n` runs; returns them.
fn wait_runs(mesh: &Mesh, job: &str, n: usize, timeout: Duration) -> Vec<Value> {
    wait_for(timeout, &format!("{n} runs of {job}"), || {
        let runs = runs_of(mesh, job);
        if runs.len() >= n {
            Ok(runs)
        } else {
            Err(format!("{} runs", runs.len()))
        }
    })
}

/// The barriers `GET /semaphores` lists.
fn barriers(mesh: &Mesh) -> Vec<Value> {
    let (status, body) = mesh.get_json("/semaphores");
    assert_eq!(status, 200, "GET /semaphores: {body}");
    list_of(&body, "semaphores")
}

/// Waits until the barrier (semaphore, key) satisfies `accept`; returns it.
fn wait_barrier(
    mesh: &Mesh,
    semaphore: &str,
    key: &str,
    what: &str,
    accept: impl Fn(&Value) -> bool,
) -> Value {
    wait_for(
        DEADLINE,
        &format!("barrier {semaphore}[{key}] {what}"),
        || {
            let all = barriers(mesh);
            match all
                .iter()
                .find(|b| str_of(b, "semaphore") == semaphore && str_of(b, "key") == key)
            {
                Some(b) if accept(b) => Ok(b.clone()),
                Some(b) => Err(b.to_string()),
                None => Err(format!("not listed: {all:?}")),
            }
        },
    )
}

/// `have` of the barrier's first condition.
fn have(barrier: &Value) -> u64 {
    barrier["conditions"][0]["have"].as_u64().unwrap_or(0)
}

fn parent_runs(run: &Value) -> BTreeSet<String> {
    run["parent_runs"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// The latest `finished_at` of the run's steps of `job` (RFC 3339 strings of one format
/// compare as times).
fn last_finished(run: &Value, job: &str) -> String {
    steps_of_job(run, job)
        .iter()
        .map(|s| str_of(s, "finished_at").to_owned())
        .max()
        .unwrap_or_default()
}

/// Run ids a semaphore's stderr says the broker accepted for its triggers.
fn accepted_runs(mesh: &Mesh, semaphore: &str) -> Vec<String> {
    mesh.stderr_of(semaphore)
        .lines()
        .filter(|l| l.contains("trigger accepted"))
        .filter_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("run_id=")))
        .map(str::to_owned)
        .collect()
}

/// A worker's jobs: `s1` (broadcast) → `s2` → `s3` → `s4` (local), each run with the run's
/// `date`; with `publish`, also the jobs the semaphores start.
fn chain_worker(publish: bool) -> String {
    let mut yaml = String::from(
        r#"
jobs:
  - name: s1
    command: "true"
    params:
      date: { required: true }
    on_success: s2
  - name: s2
    command: "true"
    params:
      date: { required: true }
    delivery: local
    on_success: s3
  - name: s3
    command: "true"
    params:
      date: { required: true }
    delivery: local
    on_success: s4
  - name: s4
    command: "true"
    params:
      date: { required: true }
    delivery: local
"#,
    );
    if publish {
        yaml.push_str(
            r#"
  - name: publish
    command: "true"
    params:
      date: { required: true }
  - name: publish_all
    command: "true"
    params:
      date: { required: true }
"#,
        );
    }
    yaml
}

#[test]
fn ten_workers_four_step_chains_then_publish_runs_once_after_the_last() {
    let started = Instant::now();
    let mut builder = Mesh::builder();
    for i in 0..10 {
        builder = builder.worker(&format!("w{i}"), &chain_worker(i == 0));
    }
    let mut mesh = builder.start();
    mesh.start_semaphore(
        "sem",
        r#"
semaphores:
  - name: ten_done
    wait_for: [{ job: s4, count: 10 }]
    key: "{date}"
    then: publish
  - name: all_done
    wait_for: [{ job: s4, count: all }]
    key: "{date}"
    then: publish_all
"#,
    );
    mesh.wait_workers_live(10);
    let ready = started.elapsed();

    let t0 = Instant::now();
    let run_id = mesh.start_run("s1", &[("date", "2026_11_23")]);
    let run = mesh.wait_run_final_within(&run_id, Duration::from_secs(60));
    let chains_done = t0.elapsed();
    assert_eq!(str_of(&run, "state"), "succeeded", "{run:#}");
    for job in ["s1", "s2", "s3", "s4"] {
        assert_eq!(steps_of_job(&run, job).len(), 10, "{job}: {run:#}");
    }
    let last_s4 = last_finished(&run, "s4");

    for (semaphore, then) in [("ten_done", "publish"), ("all_done", "publish_all")] {
        let runs = wait_runs(&mesh, then, 1, DEADLINE);
        let fired = t0.elapsed();
        let publish = mesh.wait_run_final(str_of(&runs[0], "run_id"));
        assert_eq!(str_of(&publish, "state"), "succeeded", "{publish:#}");
        assert_eq!(publish["params"]["date"], "2026_11_23", "{publish:#}");
        assert_eq!(
            parent_runs(&publish),
            BTreeSet::from([run_id.clone()]),
            "{publish:#}"
        );
        assert!(
            str_of(&publish, "created_at") >= last_s4.as_str(),
            "{then} started at {} before the last s4 finished at {last_s4}",
            str_of(&publish, "created_at")
        );
        let barrier = wait_barrier(&mesh, semaphore, "2026_11_23", "fired", |b| {
            str_of(b, "state") == "fired" && !str_of(b, "started_run").is_empty()
        });
        assert_eq!(have(&barrier), 10, "{barrier}");
        assert_eq!(barrier["conditions"][0]["need"], 10, "{barrier}");
        assert_eq!(
            str_of(&barrier, "started_run"),
            str_of(&publish, "run_id"),
            "{barrier}"
        );
        assert_eq!(runs_of(&mesh, then).len(), 1, "{then} ran more than once");
        eprintln!("{semaphore}: {then} started {fired:?} after the trigger");
    }
    eprintln!(
        "ten workers: mesh ready in {ready:?}, 40 tasks done in {chains_done:?}, whole test {:?}",
        started.elapsed()
    );
}

#[test]
fn two_keys_interleaved_each_fire_once_with_their_own_params() {
    two_keys_interleaved(false);
}

/// The same through sealed frames: events reach the semaphore as broker-signed group
/// frames, its triggers go as pair frames from an enrolled key.
#[test]
fn two_keys_interleaved_fire_once_on_a_sealed_mesh() {
    two_keys_interleaved(true);
}

fn two_keys_interleaved(sealed: bool) {
    let jobs = r#"
jobs:
  - name: k
    command: "sleep 0.2"
    params:
      date: { required: true }
  - name: publish
    command: "true"
    params:
      date: { required: true }
"#;
    let builder = Mesh::builder().worker("w1", jobs).worker("w2", jobs);
    let mut mesh = if sealed { builder.sealed() } else { builder }.start();
    mesh.start_semaphore(
        "sem",
        r#"
semaphores:
  - name: both
    wait_for: [{ job: k, count: all }]
    key: "{date}"
    then: publish
"#,
    );
    mesh.wait_workers_live(2);
    let t0 = Instant::now();
    let a = mesh.start_run("k", &[("date", "2026_11_23")]);
    let b = mesh.start_run("k", &[("date", "2026_11_24")]);
    let runs = wait_runs(&mesh, "publish", 2, DEADLINE);
    let mut seen = BTreeSet::new();
    for publish in &runs {
        let date = publish["params"]["date"].as_str().unwrap_or("").to_owned();
        let expected = match date.as_str() {
            "2026_11_23" => &a,
            "2026_11_24" => &b,
            other => panic!("publish with date {other:?}: {publish:#}"),
        };
        assert_eq!(
            parent_runs(publish),
            BTreeSet::from([expected.clone()]),
            "{publish:#}"
        );
        assert!(
            seen.insert(date),
            "two publish runs for one date: {runs:#?}"
        );
    }
    for key in ["2026_11_23", "2026_11_24"] {
        let barrier = wait_barrier(&mesh, "both", key, "fired", |b| {
            str_of(b, "state") == "fired" && !str_of(b, "started_run").is_empty()
        });
        assert_eq!(have(&barrier), 2, "{barrier}");
    }
    assert_eq!(runs_of(&mesh, "publish").len(), 2);
    eprintln!("two keys: both fired {:?} after the triggers", t0.elapsed());
}

const GATED: &str = r#"
jobs:
  - name: g
    command: "if [ {n} -ge 4 ]; then while [ ! -e @DIR@/gate ]; do sleep 0.05; done; fi"
    params:
      date: { required: true }
      n: { required: true, pattern: '^[0-9]+$' }
  - name: publish
    command: "true"
    params:
      date: { required: true }
"#;

#[test]
fn semaphore_killed_halfway_counts_replays_once_and_fires_once_at_the_right_moment() {
    let mut mesh = Mesh::builder().worker("w1", GATED).start();
    mesh.start_semaphore(
        "sem",
        r#"
semaphores:
  - name: four
    wait_for: [{ job: g, count: 4 }]
    key: "{date}"
    then: publish
"#,
    );
    mesh.wait_workers_live(1);
    let run = |mesh: &Mesh, n: &str| mesh.start_run("g", &[("date", "2026_11_23"), ("n", n)]);
    let r1 = run(&mesh, "1");
    let r2 = run(&mesh, "2");
    mesh.wait_run_final(&r1);
    mesh.wait_run_final(&r2);
    wait_barrier(&mesh, "four", "2026_11_23", "with 2 counted", |b| {
        have(b) == 2
    });

    mesh.kill9("sem");
    // One completion while the semaphore is down, one held back by the gate.
    let r3 = run(&mesh, "3");
    let r4 = run(&mesh, "4");
    mesh.wait_run_final(&r3);
    let t0 = Instant::now();
    mesh.restart("sem");
    mesh.wait_semaphore_ready("sem", 2);
    let restarted = t0.elapsed();
    // Catch-up replays r1 and r2 (already counted) and brings r3: three, not five.
    let barrier = wait_barrier(&mesh, "four", "2026_11_23", "with r3 counted", |b| {
        b["runs"].as_array().is_some_and(|r| r.len() == 3)
    });
    assert_eq!(
        have(&barrier),
        3,
        "replayed completions counted again: {barrier}"
    );
    assert_eq!(str_of(&barrier, "state"), "waiting", "{barrier}");
    assert!(
        runs_of(&mesh, "publish").is_empty(),
        "publish ran before the last completion"
    );

    std::fs::write(mesh.dir().join("gate"), "").unwrap();
    let last = mesh.wait_run_final(&r4);
    let runs = wait_runs(&mesh, "publish", 1, DEADLINE);
    let publish = mesh.run(str_of(&runs[0], "run_id"));
    assert!(
        str_of(&publish, "created_at") >= last_finished(&last, "g").as_str(),
        "publish started before the last g finished: {publish:#} {last:#}"
    );
    assert_eq!(
        parent_runs(&publish),
        BTreeSet::from([r1, r2, r3, r4]),
        "{publish:#}"
    );
    // `n` is not a parameter of publish: only what it declares is passed.
    assert_eq!(
        publish["params"],
        serde_json::json!({"date": "2026_11_23"}),
        "{publish:#}"
    );
    let barrier = wait_barrier(&mesh, "four", "2026_11_23", "fired", |b| {
        str_of(b, "state") == "fired" && !str_of(b, "started_run").is_empty()
    });
    assert_eq!(have(&barrier), 4, "{barrier}");
    assert_eq!(
        barrier["params"],
        serde_json::json!({"date": "2026_11_23"}),
        "{barrier}"
    );
    assert_eq!(runs_of(&mesh, "publish").len(), 1);
    eprintln!("kill -9: restarted and caught up in {restarted:?}");
}

#[test]
fn two_semaphore_processes_fire_once() {
    let mut mesh = Mesh::builder()
        .worker(
            "w1",
            r#"
jobs:
  - name: a
    command: "true"
    params:
      date: { required: true }
  - name: publish
    command: "true"
    params:
      date: { required: true }
"#,
        )
        .start();
    let yaml = r#"
semaphores:
  - name: one
    wait_for: [{ job: a, count: 1 }]
    key: "{date}"
    then: publish
"#;
    mesh.start_semaphore("sem1", yaml);
    mesh.start_semaphore("sem2", yaml);
    mesh.wait_workers_live(1);
    let t0 = Instant::now();
    mesh.start_run("a", &[("date", "2026_11_23")]);
    let (first, second) = wait_for(DEADLINE, "both semaphores to have fired", || {
        let (one, two) = (accepted_runs(&mesh, "sem1"), accepted_runs(&mesh, "sem2"));
        match (one.as_slice(), two.as_slice()) {
            ([a], [b]) => Ok((a.clone(), b.clone())),
            _ => Err(format!("sem1 {one:?}, sem2 {two:?}")),
        }
    });
    assert_eq!(first, second, "the two processes started different runs");
    let runs = runs_of(&mesh, "publish");
    assert_eq!(runs.len(), 1, "{runs:#?}");
    assert_eq!(str_of(&runs[0], "run_id"), first);
    eprintln!("two semaphores: fired once in {:?}", t0.elapsed());
}

#[test]
fn a_barrier_that_never_completes_runs_on_timeout_once() {
    let mut mesh = Mesh::builder()
        .worker(
            "w1",
            r#"
jobs:
  - name: t
    command: "true"
    params:
      date: { required: true }
  - name: publish
    command: "true"
    params:
      date: { required: true }
  - name: alert
    command: "true"
    params:
      date: { required: true }
"#,
        )
        .start();
    mesh.start_semaphore(
        "sem",
        r#"
semaphores:
  - name: slow
    wait_for: [{ job: t, count: 2 }]
    key: "{date}"
    then: publish
    timeout: 2s
    on_timeout: alert
"#,
    );
    mesh.wait_workers_live(1);
    let t0 = Instant::now();
    let run_id = mesh.start_run("t", &[("date", "2026_11_23")]);
    let finished = mesh.wait_run_final(&run_id);
    let runs = wait_runs(&mesh, "alert", 1, DEADLINE);
    let timed_out = t0.elapsed();
    let alert = mesh.run(str_of(&runs[0], "run_id"));
    assert_eq!(alert["params"]["date"], "2026_11_23", "{alert:#}");
    assert_eq!(parent_runs(&alert), BTreeSet::from([run_id]), "{alert:#}");
    let t_end = last_finished(&finished, "t");
    assert!(
        str_of(&alert, "created_at") > t_end.as_str(),
        "alert at {} but t ended at {t_end}",
        str_of(&alert, "created_at")
    );
    assert!(
        timed_out >= Duration::from_secs(2),
        "timed out after {timed_out:?}"
    );
    let barrier = wait_barrier(&mesh, "slow", "2026_11_23", "timed out", |b| {
        str_of(b, "state") == "timed_out" && !str_of(b, "started_run").is_empty()
    });
    assert_eq!(str_of(&barrier, "started_run"), str_of(&alert, "run_id"));
    assert_eq!(runs_of(&mesh, "alert").len(), 1);
    assert!(runs_of(&mesh, "publish").is_empty());
    eprintln!("timeout: on_timeout started {timed_out:?} after the trigger");
}

#[test]
fn broker_killed_mid_barrier_then_the_barrier_still_fires_once() {
    let mut mesh = Mesh::builder()
        .worker(
            "w1",
            r#"
jobs:
  - name: a
    command: "true"
    params:
      date: { required: true }
      n: { required: true }
  - name: publish
    command: "true"
    params:
      date: { required: true }
"#,
        )
        .start();
    mesh.start_semaphore(
        "sem",
        r#"
semaphores:
  - name: two
    wait_for: [{ job: a, count: 2 }]
    key: "{date}"
    then: publish
"#,
    );
    mesh.wait_workers_live(1);
    let r1 = mesh.start_run("a", &[("date", "2026_11_23"), ("n", "1")]);
    mesh.wait_run_final(&r1);
    wait_barrier(&mesh, "two", "2026_11_23", "with 1 counted", |b| {
        have(b) == 1
    });

    mesh.kill9("broker");
    mesh.restart("broker");
    mesh.wait_workers_live(1);
    let t0 = Instant::now();
    let r2 = mesh.start_run("a", &[("date", "2026_11_23"), ("n", "2")]);
    let runs = wait_runs(&mesh, "publish", 1, DEADLINE);
    let publish = mesh.run(str_of(&runs[0], "run_id"));
    assert_eq!(
        parent_runs(&publish),
        BTreeSet::from([r1, r2]),
        "{publish:#}"
    );
    wait_barrier(&mesh, "two", "2026_11_23", "fired", |b| {
        str_of(b, "state") == "fired" && !str_of(b, "started_run").is_empty()
    });
    assert_eq!(runs_of(&mesh, "publish").len(), 1);
    eprintln!(
        "broker restart: fired {:?} after the last trigger",
        t0.elapsed()
    );
}
