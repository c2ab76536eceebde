//! Issue 11, resources (jobspy's inputs and outputs), with the real binaries on loopback
//! (acceptance 6): two writers of one output never overlap; a reader waits for a missing
//! input and starts when a writer produces it; a failed writer leaves it unwritten; an
//! operator's `create` unblocks a reader; what was written survives a broker `kill -9`;
//! the DOT export of a three-stage pipeline has exactly the expected edges.

use std::collections::BTreeSet;

use serde_json::Value;

use crate::harness::{list_of, str_of, wait_for, Mesh, DEADLINE};
use crate::scheduling::ledger;

/// Writers of `data.{day}` (each noting its start and end), and its reader.
const JOBS: &str = r#"
jobs:
  - name: produce
    delivery: queue
    outputs: ["data.{day}"]
    params:
      day: { required: true, pattern: '^[0-9_]+$' }
      tag: { required: true, pattern: '^[a-z0-9]+$' }
      fail: { required: true, pattern: '^[01]$' }
    command: "printf 'start %s %s\n' $(date +%s%N) {tag} >> @DIR@/ledger; sleep 0.3; printf 'end %s %s\n' $(date +%s%N) {tag} >> @DIR@/ledger; [ {fail} = 0 ]"
  - name: consume
    delivery: queue
    inputs: ["data.{day}"]
    params:
      day: { required: true, pattern: '^[0-9_]+$' }
    command: "printf 'read %s %s\n' $(date +%s%N) {day} >> @DIR@/ledger"
  - name: extract
    delivery: queue
    outputs: ["raw.{day}"]
    on_success: transform
    params:
      day: { required: true }
    command: "true"
  - name: transform
    delivery: queue
    inputs: ["raw.{day}"]
    outputs: ["clean.{day}"]
    on_success: load
    params:
      day: { required: true }
    command: "true"
  - name: load
    delivery: queue
    inputs: ["clean.{day}"]
    outputs: ["report.{day}"]
    params:
      day: { required: true }
    command: "true"
"#;

/// The time (ns) of the ledger line `<what> <time> <tag>`.
fn stamp(lines: &[String], what: &str, tag: &str) -> u128 {
    lines
        .iter()
        .find_map(|l| {
            let mut words = l.split(' ');
            let (w, t, m) = (words.next()?, words.next()?, words.next()?);
            (w == what && m == tag).then(|| t.parse().ok())?
        })
        .unwrap_or_else(|| panic!("no `{what} … {tag}` in {lines:?}"))
}

/// `GET /resources`: the resource named `name`, if listed.
fn resource(mesh: &Mesh, name: &str) -> Option<Value> {
    let (status, body) = mesh.get_json("/resources");
    assert_eq!(status, 200, "{body}");
    list_of(&body, "resources")
        .into_iter()
        .find(|r| str_of(r, "name") == name)
}

fn waiter_runs(resource: &Value) -> Vec<String> {
    list_of(resource, "waiters")
        .iter()
        .map(|w| str_of(w, "run_id").to_owned())
        .collect()
}

#[test]
fn writers_never_overlap_and_a_reader_starts_only_once_its_input_is_written() {
    let mesh = Mesh::builder().worker("w1", JOBS).start();
    mesh.wait_workers_live(1);

    // The reader of a missing input waits, listed as the input's waiter.
    let reader = mesh.start_run("consume", &[("day", "1")]);
    let listed = wait_for(DEADLINE, "the reader to wait for data.1", || {
        resource(&mesh, "data.1").ok_or_else(|| "not listed".to_owned())
    });
    assert_eq!(listed["exists"], Value::Bool(false), "{listed}");
    assert_eq!(waiter_runs(&listed), vec![reader.clone()], "{listed}");

    // A failed writer leaves it unwritten: the reader still waits.
    let failed = mesh.start_run("produce", &[("day", "1"), ("tag", "f"), ("fail", "1")]);
    assert_eq!(str_of(&mesh.wait_run_final(&failed), "state"), "failed");
    let after_failure = resource(&mesh, "data.1").expect("data.1 listed");
    assert_eq!(
        after_failure["exists"],
        Value::Bool(false),
        "{after_failure}"
    );
    assert_eq!(waiter_runs(&after_failure), vec![reader.clone()]);
    assert_eq!(str_of(&mesh.run(&reader), "state"), "pending");

    // Two writers at once (the worker has 4 slots): one at a time.
    let a = mesh.start_run("produce", &[("day", "1"), ("tag", "a"), ("fail", "0")]);
    let b = mesh.start_run("produce", &[("day", "1"), ("tag", "b"), ("fail", "0")]);
    for run in [&a, &b, &reader] {
        assert_eq!(str_of(&mesh.wait_run_final(run), "state"), "succeeded");
    }
    let lines = ledger(&mesh);
    let (a_span, b_span) = (
        (stamp(&lines, "start", "a"), stamp(&lines, "end", "a")),
        (stamp(&lines, "start", "b"), stamp(&lines, "end", "b")),
    );
    let (first, second) = if a_span < b_span {
        (a_span, b_span)
    } else {
        (b_span, a_span)
    };
    assert!(
        second.0 > first.1,
        "the two writers overlapped: {first:?} {second:?} (ns)"
    );
    // The reader ran only after the first successful write.
    assert!(
        stamp(&lines, "read", "1") > first.1,
        "the reader started before its input was written: {lines:?}"
    );
    let written = resource(&mesh, "data.1").expect("data.1 listed");
    assert_eq!(written["exists"], Value::Bool(true), "{written}");
    assert_eq!(str_of(&written, "written_by_job"), "produce");
}

#[test]
fn an_operator_creates_an_input_and_written_resources_survive_a_broker_kill() {
    let mut mesh = Mesh::builder().worker("w1", JOBS).start();
    mesh.wait_workers_live(1);

    let reader = mesh.start_run("consume", &[("day", "2")]);
    wait_for(DEADLINE, "the reader to wait for data.2", || {
        resource(&mesh, "data.2")
            .filter(|r| !waiter_runs(r).is_empty())
            .ok_or_else(|| "not waiting".to_owned())
    });
    let (status, created) = mesh.http_post("/resources/data.2?action=create", &[]);
    assert_eq!(status, 200, "{created}");
    assert_eq!(created["exists"], Value::Bool(true), "{created}");
    assert_eq!(str_of(&mesh.wait_run_final(&reader), "state"), "succeeded");

    // Bad requests are refused and change nothing.
    for bad in [
        "/resources/data.2?action=drop",
        "/resources/data.2",
        "/resources/bad%20name?action=create",
    ] {
        let (status, body) = mesh.http_post(bad, &[]);
        assert_eq!(status, 400, "POST {bad}: {body}");
    }
    let (status, _) = mesh.get_json("/resources/data.2?action=create");
    assert_eq!(status, 405, "a GET must not create");

    // What was written is journaled: a broker killed and restarted still knows it.
    mesh.kill9("broker");
    mesh.restart("broker");
    mesh.wait_workers_live(1);
    let kept = wait_for(DEADLINE, "data.2 after the restart", || {
        resource(&mesh, "data.2").ok_or_else(|| "not listed".to_owned())
    });
    assert_eq!(kept["exists"], Value::Bool(true), "{kept}");
    let again = mesh.start_run("consume", &[("day", "2")]);
    assert_eq!(str_of(&mesh.wait_run_final(&again), "state"), "succeeded");

    // Cleared, it is missing again: a new reader waits.
    let (status, cleared) = mesh.http_post("/resources/data.2?action=clear", &[]);
    assert_eq!(status, 200, "{cleared}");
    assert_eq!(cleared["exists"], Value::Bool(false), "{cleared}");
    let waiting = mesh.start_run("consume", &[("day", "2")]);
    wait_for(DEADLINE, "the new reader to wait", || {
        resource(&mesh, "data.2")
            .filter(|r| waiter_runs(r) == vec![waiting.clone()])
            .ok_or_else(|| "not waiting".to_owned())
    });
}

#[test]
fn the_dot_export_of_a_three_stage_pipeline_has_the_expected_edges() {
    let mesh = Mesh::builder().worker("w1", JOBS).start();
    mesh.wait_workers_live(1);
    // Two days: lineage names the flow once, with the days collapsed.
    for day in ["2026_11_23", "2026_11_24"] {
        let run = mesh.start_run("extract", &[("day", day)]);
        assert_eq!(str_of(&mesh.wait_run_final(&run), "state"), "succeeded");
        let report = resource(&mesh, &format!("report.{day}")).expect("report written");
        assert_eq!(report["exists"], Value::Bool(true), "{report}");
    }
    let (status, dot) = mesh.http_get("/graph?format=dot");
    assert_eq!(status, 200, "{dot}");
    assert!(dot.starts_with("digraph jobz {"), "{dot}");
    let edges: BTreeSet<String> = dot
        .lines()
        .filter(|l| l.contains("->"))
        .map(|l| l.trim().to_owned())
        .collect();
    let expected: BTreeSet<String> = [
        r#""job:extract" -> "resource:raw.*";"#,
        r#""resource:raw.*" -> "job:transform";"#,
        r#""job:transform" -> "resource:clean.*";"#,
        r#""resource:clean.*" -> "job:load";"#,
        r#""job:load" -> "resource:report.*";"#,
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    assert_eq!(edges, expected, "{dot}");
    let (status, _) = mesh.http_get("/graph?format=svg");
    assert_eq!(status, 400);
}
