//! Issue 11, run control, with the real binaries on loopback: priority (acceptance 1),
//! delay across a broker `kill -9` (2), run dependencies (5), cancel of a running step (7),
//! `max_concurrency` across workers (8), and what comes with them: `POST` run control and
//! its CSRF guard, tags, tracking, the new states in `/runs` and `/metrics`.
//!
//! Steps are short and heartbeats fast, so the whole file takes seconds.

use std::fs;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{list_of, pid_alive, str_of, wait_for, wait_until, Mesh, DEADLINE};

/// A step that waits until `@DIR@/open` exists: it holds the only slot while the test
/// queues work behind it.
const GATE: &str = r#"
  - name: gate
    delivery: queue
    timeout: 60s
    command: "while [ ! -e @DIR@/open ]; do sleep 0.02; done"
"#;

/// The lines of `<dir>/ledger` so far.
pub(crate) fn ledger(mesh: &Mesh) -> Vec<String> {
    fs::read_to_string(mesh.dir().join("ledger"))
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Waits until `run_id`'s state is `state`; the run.
fn wait_state(mesh: &Mesh, run_id: &str, state: &str) -> Value {
    wait_for(DEADLINE, &format!("run {run_id} to be {state}"), || {
        let run = mesh.run(run_id);
        match str_of(&run, "state") {
            s if s == state => Ok(run),
            _ => Err(run.to_string()),
        }
    })
}

fn runs(mesh: &Mesh, query: &str) -> Vec<Value> {
    let (status, body) = mesh.get_json(&format!("/runs?{query}"));
    assert_eq!(status, 200, "{body}");
    list_of(&body, "runs")
}

/// The number a step wrote to `<dir>/<file>`, once it is there.
fn number_in(mesh: &Mesh, file: &str) -> i64 {
    let path = mesh.dir().join(file);
    wait_for(DEADLINE, &format!("{file} to be written"), || {
        let text = fs::read_to_string(&path).map_err(|e| e.to_string())?;
        text.trim()
            .parse::<i64>()
            .map_err(|e| format!("{text:?}: {e}"))
    })
}

/// An RFC 3339 time of the API as epoch milliseconds.
fn ms_of(value: &Value) -> i64 {
    let text = value.as_str().unwrap_or_default();
    jobz::parse_time_ms(text).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn queued_runs_start_by_priority_and_in_arrival_order_within_a_priority() {
    let jobs = format!(
        r#"
jobs:{GATE}
  - name: step
    delivery: queue
    tags: [batch]
    params:
      n: {{ required: true, pattern: '^[0-9]+$' }}
    command: "printf '%s\n' {{n}} >> @DIR@/ledger"
"#
    );
    let mesh = Mesh::builder()
        .worker_with_args("w1", &jobs, &["--slots", "1"])
        .start();
    mesh.wait_workers_live(1);
    let gate = mesh.start_run("gate", &[]);
    wait_state(&mesh, &gate, "running");

    // 100 runs of mixed priority queue behind the gate, in this order.
    let mut expected: Vec<(i32, usize, String)> = Vec::new();
    let mut ids = Vec::new();
    for i in 0..100 {
        let priority = ((i * 7) % 5) as i32 - 2;
        let n = i.to_string();
        let run_id = mesh.start_run("step", &[("n", &n), ("priority", &priority.to_string())]);
        ids.push(run_id);
        expected.push((-priority, i, n));
    }
    let run = mesh.run(&ids[3]);
    assert_eq!(
        (str_of(&run, "state"), run["priority"].as_i64()),
        ("pending", Some(((3 * 7) % 5) - 2))
    );
    // An operator moves the last one to the front.
    let (status, moved) = mesh.http_post(&format!("/runs/{}/priority?value=100", ids[99]), &[]);
    assert_eq!(
        (status, moved["priority"].as_i64()),
        (200, Some(100)),
        "{moved}"
    );
    expected[99].0 = -100;
    expected.sort();
    let expected: Vec<String> = expected.into_iter().map(|(_, _, n)| n).collect();

    fs::write(mesh.dir().join("open"), b"").unwrap();
    wait_until(DEADLINE, "the 100 runs to succeed", || {
        runs(&mesh, "job=step&state=succeeded&limit=1000").len() == 100
    });
    assert_eq!(ledger(&mesh), expected, "start order");

    // Every run carries its job's tag; one tracked run is listed as such.
    assert_eq!(runs(&mesh, "tag=batch&limit=1000").len(), 100);
    let (status, tracked) = mesh.http_post(&format!("/runs/{}/track", ids[5]), &[]);
    assert_eq!((status, &tracked["tracked"]), (200, &Value::Bool(true)));
    let listed: Vec<String> = runs(&mesh, "tracked=1")
        .iter()
        .map(|r| str_of(r, "run_id").to_owned())
        .collect();
    assert_eq!(listed, [ids[5].clone()]);
}

#[test]
fn a_delayed_run_starts_when_due_even_across_a_broker_kill() {
    let jobs = r#"
jobs:
  - name: stamp
    delivery: queue
    params:
      name: { required: true, pattern: '^[a-z]+$' }
    command: "date +%s%3N > @DIR@/{name}.started"
"#;
    let mut mesh = Mesh::builder().worker("w1", jobs).start();
    mesh.wait_workers_live(1);
    let soon = mesh.start_run("stamp", &[("name", "soon"), ("delay", "1s")]);
    let later = mesh.start_run(
        "stamp",
        &[
            ("name", "later"),
            ("at", &jobz::format_time_ms(jobz::now_ms() + 4_000)),
        ],
    );
    let due = |run_id: &str| {
        let run = mesh.run(run_id);
        assert_eq!(str_of(&run, "state"), "scheduled", "{run}");
        ms_of(&run["due_at"])
    };
    let (soon_due, later_due) = (due(&soon), due(&later));
    assert_eq!(mesh.broker_counter("runs{state=\"scheduled\"}"), 2);

    // The broker dies and stays down until the first one is overdue.
    mesh.kill9("broker");
    wait_until(DEADLINE, "the first run to be overdue", || {
        jobz::now_ms() > soon_due + 300
    });
    assert!(!mesh.dir().join("soon.started").exists());
    mesh.restart("broker");
    let restarted = jobz::now_ms();

    let started = |name: &str| number_in(&mesh, &format!("{name}.started"));
    let soon_started = started("soon");
    assert!(
        soon_started - restarted < 3_000,
        "overdue run started {} ms after the broker came back",
        soon_started - restarted
    );
    let later_started = started("later");
    eprintln!(
        "overdue run started {} ms after the restart; the other {} ms after its time",
        soon_started - restarted,
        later_started - later_due
    );
    assert!(
        later_started >= later_due,
        "started {} ms early",
        later_due - later_started
    );
    assert!(
        later_started - later_due <= 1_000,
        "started {} ms late",
        later_started - later_due
    );
    for run_id in [&soon, &later] {
        assert_eq!(str_of(&mesh.wait_run_final(run_id), "state"), "succeeded");
    }
}

#[test]
fn a_dependent_run_starts_after_its_dependency_and_fails_when_it_fails_or_is_cancelled() {
    let jobs = r#"
jobs:
  - name: task
    delivery: queue
    params:
      name: { required: true, pattern: '^[a-z]+$' }
      code: { required: true, pattern: '^[0-9]$' }
    command: "printf '%s start\n' {name} >> @DIR@/ledger; sleep 0.2; printf '%s end\n' {name} >> @DIR@/ledger; exit {code}"
  - name: long
    delivery: queue
    command: "sleep 30"
"#;
    let mut mesh = Mesh::builder().worker("w1", jobs).start();
    mesh.wait_workers_live(1);
    let task = |mesh: &Mesh, name: &str, code: &str, depends: &str| {
        let mut params = vec![("name", name), ("code", code)];
        if !depends.is_empty() {
            params.push(("depends", depends));
        }
        mesh.start_run("task", &params)
    };

    // It waits, showing what for, and starts once its dependency succeeded.
    let a = task(&mesh, "a", "0", "");
    let b = task(&mesh, "b", "0", &a);
    let waiting = mesh.run(&b);
    assert_eq!(str_of(&waiting, "state"), "waiting", "{waiting}");
    assert_eq!(waiting["waiting_for"], serde_json::json!([a.clone()]));
    assert_eq!(str_of(&mesh.wait_run_final(&b), "state"), "succeeded");
    let lines = ledger(&mesh);
    let at = |line: &str| lines.iter().position(|l| l == line).unwrap_or(usize::MAX);
    assert!(at("a end") < at("b start"), "{lines:?}");

    // Its dependency fails: it fails, naming it, and never runs.
    let c = task(&mesh, "c", "1", "");
    let d = task(&mesh, "d", "0", &c);
    let failed = mesh.wait_run_final(&d);
    assert_eq!(str_of(&failed, "state"), "failed");
    assert_eq!(
        str_of(&failed, "reason"),
        format!("dependency run {c} failed")
    );

    // Its dependency is cancelled: only with force, and then it fails, naming it.
    let e = mesh.start_run("long", &[]);
    let f = task(&mesh, "f", "0", &e);
    let (status, refused) = mesh.http_post(&format!("/runs/{e}/cancel"), &[]);
    assert_eq!(status, 409, "{refused}");
    assert!(str_of(&refused, "error").contains(&f), "{refused}");
    let (status, cancelled) = mesh.http_post(&format!("/runs/{e}/cancel?force=1"), &[]);
    assert_eq!((status, str_of(&cancelled, "state")), (200, "cancelled"));
    let failed = mesh.wait_run_final(&f);
    assert_eq!(
        (str_of(&failed, "state"), str_of(&failed, "reason")),
        (
            "failed",
            format!("dependency run {e} was cancelled").as_str()
        )
    );
    assert!(!ledger(&mesh)
        .iter()
        .any(|l| l.starts_with('d') || l.starts_with('f')));

    let (status, body) = mesh.trigger(
        "task",
        &[("name", "x"), ("code", "0"), ("depends", "no-such-run")],
    );
    assert_eq!(status, 400, "{body}");

    // A broker that restarted knows `a` only from its store: it is looked up.
    mesh.kill9("broker");
    mesh.restart("broker");
    wait_until(DEADLINE, "the broker to answer again", || {
        matches!(mesh.try_http_get("/healthz"), Ok((200, _)))
    });
    let g = task(&mesh, "g", "0", &a);
    assert_eq!(str_of(&mesh.wait_run_final(&g), "state"), "succeeded");
    assert_eq!(mesh.broker_counter("trigger_lookups"), 1);
}

#[test]
fn cancelling_a_running_step_kills_its_processes_within_a_second() {
    let jobs = r#"
jobs:
  - name: long
    delivery: queue
    command: "echo $$ > @DIR@/shell.pid; sleep 60 & echo $! > @DIR@/sleep.pid; wait"
  - name: quick
    delivery: queue
    command: "true"
"#;
    // Sealed: the cancel reaches the worker as a group frame, like work.
    let mesh = Mesh::builder().sealed().worker("w1", jobs).start();
    mesh.wait_workers_live(1);
    let run_id = mesh.start_run("long", &[]);
    let pid = |file: &str| number_in(&mesh, file) as u32;
    let pids = [pid("shell.pid"), pid("sleep.pid")];
    assert!(pids.iter().all(|p| pid_alive(*p)));

    // A page on another site cannot cancel it, nor can a GET.
    let cancel = format!("/runs/{run_id}/cancel");
    for header in [
        "Origin: http://evil.example",
        "Sec-Fetch-Site: cross-site",
        "Origin: null",
    ] {
        let (status, body) = mesh.http_post(&cancel, &[header]);
        assert_eq!(status, 403, "{header}: {body}");
    }
    let (status, _) = mesh.http_get(&cancel);
    assert_eq!(status, 405);
    assert_eq!(str_of(&mesh.run(&run_id), "state"), "running");
    assert!(
        pids.iter().all(|p| pid_alive(*p)),
        "refused requests killed nothing"
    );

    let own = format!("Origin: http://127.0.0.1:{}", mesh.frontend_port);
    let asked = Instant::now();
    let (status, body) = mesh.http_post(&cancel, &[&own, "Sec-Fetch-Site: same-origin"]);
    assert_eq!(
        (status, str_of(&body, "state")),
        (200, "cancelled"),
        "{body}"
    );
    wait_until(
        Duration::from_secs(1),
        "the step's processes to be gone",
        || pids.iter().all(|p| !pid_alive(*p)),
    );
    eprintln!("processes gone {:?} after the cancel", asked.elapsed());
    // `cancelled` at once; ended once the worker has reported the killed task.
    let run = wait_for(DEADLINE, "the cancelled run to end", || {
        let run = mesh.run(&run_id);
        match run["finished_at"].is_string() {
            true => Ok(run),
            false => Err(run.to_string()),
        }
    });
    assert_eq!(str_of(&run, "state"), "cancelled");
    let step = &run["steps"][0];
    assert_eq!(str_of(step, "state"), "cancelled", "{run}");
    assert!(mesh
        .worker_log("w1", &run_id)
        .iter()
        .any(|l| l.event.starts_with("cancelled")));

    // Cancelling again changes nothing; an ended run cannot be cancelled.
    let (status, again) = mesh.http_post(&cancel, &[]);
    assert_eq!((status, str_of(&again, "state")), (200, "cancelled"));
    let done = mesh.start_run("quick", &[]);
    mesh.wait_run_final(&done);
    let (status, body) = mesh.http_post(&format!("/runs/{done}/cancel"), &[]);
    assert_eq!(status, 409, "{body}");
    let (status, _) = mesh.http_post("/runs/no-such-run/cancel", &[]);
    assert_eq!(status, 404);
    assert_eq!(runs(&mesh, "state=cancelled").len(), 1);
}

#[test]
fn max_concurrency_one_never_overlaps_across_three_workers() {
    let jobs = r#"
jobs:
  - name: one
    delivery: queue
    max_concurrency: 1
    params:
      n: { required: true, pattern: '^[0-9]+$' }
    command: "printf 'start %s %s\n' $(date +%s%N) {n} >> @DIR@/ledger; sleep 0.05; printf 'end %s %s\n' $(date +%s%N) {n} >> @DIR@/ledger"
"#;
    let mesh = Mesh::builder()
        .worker("w1", jobs)
        .worker("w2", jobs)
        .worker("w3", jobs)
        .start();
    mesh.wait_workers_live(3);
    let ids: Vec<String> = (0..20)
        .map(|n| mesh.start_run("one", &[("n", &n.to_string())]))
        .collect();
    for run_id in &ids {
        assert_eq!(str_of(&mesh.wait_run_final(run_id), "state"), "succeeded");
    }
    // (start, end) of each run from the steps' own clocks, in start order.
    let mut spans: Vec<(u128, u128)> = Vec::new();
    let lines = ledger(&mesh);
    for n in 0..20 {
        let time = |what: &str| -> u128 {
            lines
                .iter()
                .find_map(|l| {
                    let mut words = l.split(' ');
                    let (w, t, m) = (words.next()?, words.next()?, words.next()?);
                    (w == what && m == n.to_string()).then(|| t.parse().ok())?
                })
                .unwrap_or_else(|| panic!("no {what} of {n} in {lines:?}"))
        };
        spans.push((time("start"), time("end")));
    }
    spans.sort();
    for pair in spans.windows(2) {
        assert!(
            pair[1].0 > pair[0].1,
            "two runs overlapped: {pair:?} (ns since the epoch)"
        );
    }
}
