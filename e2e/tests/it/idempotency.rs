//! Issue 14, idempotent triggers (acceptance 4): the same `idempotency_key` (query or
//! `Idempotency-Key` header) for the same job returns the same run, also across a broker
//! `kill -9`; the run runs once.

use std::time::Duration;

use crate::harness::{http_request, str_of, wait_until, Mesh, ECHO_JOB};

/// `GET path` with extra header lines: status and JSON body.
fn get_with(mesh: &Mesh, path: &str, headers: &str) -> (u16, serde_json::Value) {
    let raw = format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: close\r\n{headers}\r\n",
        mesh.frontend_port
    );
    let response = http_request(mesh.frontend_port, raw.as_bytes(), Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    let body = serde_json::from_slice(&response.body).unwrap_or(serde_json::Value::Null);
    (response.status, body)
}

fn ledger_lines(mesh: &Mesh) -> Vec<String> {
    std::fs::read_to_string(mesh.dir().join("ledger"))
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_same_idempotency_key_gets_the_same_run_also_across_a_broker_kill() {
    let mut mesh = Mesh::builder().worker("w1", ECHO_JOB).start();
    mesh.wait_workers_live(1);
    let key = "c0ffee-2026-12-05";
    let path = format!("/job_start?job_name=echo&msg=once&idempotency_key={key}");
    let (status, first) = mesh.get_json(&path);
    assert_eq!(status, 202, "{first}");
    let run_id = str_of(&first, "run_id").to_owned();
    assert_eq!(str_of(&mesh.wait_run_final(&run_id), "state"), "succeeded");

    // Again, as a client retrying after a lost answer would: by query, then by header.
    let (status, again) = mesh.get_json(&path);
    assert_eq!(
        (status, str_of(&again, "run_id")),
        (202, run_id.as_str()),
        "{again}"
    );
    let (status, by_header) = get_with(
        &mesh,
        "/job_start?job_name=echo&msg=once",
        &format!("Idempotency-Key: {key}\r\n"),
    );
    assert_eq!(status, 202, "{by_header}");
    assert_eq!(str_of(&by_header, "run_id"), run_id);
    // Another key is another run; a bad key is refused and starts nothing.
    let (status, other) = mesh.get_json("/job_start?job_name=echo&msg=other&idempotency_key=k2");
    assert_eq!(status, 202, "{other}");
    assert_ne!(str_of(&other, "run_id"), run_id);
    let (status, bad) = mesh.get_json("/job_start?job_name=echo&msg=x&idempotency_key=a%20b");
    assert_eq!(status, 400, "{bad}");

    // The broker dies and comes back: the key still names the same run.
    mesh.kill9("broker");
    mesh.restart("broker");
    wait_until(
        Duration::from_secs(30),
        "the broker to answer again",
        || mesh.get_json("/workers").0 == 200,
    );
    let (status, after) = mesh.get_json(&path);
    assert_eq!(status, 202, "{after}");
    assert_eq!(str_of(&after, "run_id"), run_id, "after the restart");
    let other_id = str_of(&other, "run_id").to_owned();
    mesh.wait_run_final(&other_id);
    assert_eq!(ledger_lines(&mesh), vec!["once", "other"], "each ran once");
}
