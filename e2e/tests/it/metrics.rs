//! Issue 14, metrics (acceptance 1): `/metrics` is encoded by the `prometheus-client` crate
//! in the Prometheus text format, or in OpenMetrics when the scraper asks for it; both are
//! read back with the Python `prometheus_client` parsers. On a fresh mesh every family is
//! there, at 0 where nothing happened yet; a succeeding and a failing run move the run
//! counters and the task, queue-wait and journal histograms.
//!
//! The parsers come from a venv that `scripts/test.sh` makes (`JOBZ_TEST_PYTHON` names its
//! python). Without it the test fails under CI and is skipped, loudly, elsewhere.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::harness::{http_request, str_of, wait_for, Mesh, DEADLINE};

const JOBS: &str = r#"
jobs:
  - name: fine
    command: "true"
  - name: broken
    command: "exit 3"
"#;

/// Every family `/metrics` shows on a mesh whose broker answers, with its type as the
/// parsers name it (counters without their `_total`).
const FAMILIES: &[(&str, &str)] = &[
    ("jobz_build_info", "gauge"),
    ("jobz_broker_up", "gauge"),
    ("jobz_broker_active_runs", "gauge"),
    ("jobz_broker_live_workers", "gauge"),
    ("jobz_broker_runs", "gauge"),
    ("jobz_broker_frames_received", "counter"),
    ("jobz_broker_frames_sent", "counter"),
    ("jobz_broker_frames_dropped", "counter"),
    ("jobz_broker_runs_accepted", "counter"),
    ("jobz_broker_retries", "counter"),
    ("jobz_broker_workers_lost", "counter"),
    ("jobz_runs", "counter"),
    ("jobz_task_duration_seconds", "histogram"),
    ("jobz_queue_wait_seconds", "histogram"),
    ("jobz_journal_commit_seconds", "histogram"),
    ("jobz_workers", "gauge"),
    ("jobz_dead_tasks", "gauge"),
    ("jobz_frontend_broker_connected", "gauge"),
    ("jobz_frontend_broker_resends", "counter"),
    ("jobz_frontend_broker_dropped_frames", "counter"),
    ("jobz_frontend_http_requests", "counter"),
    ("jobz_frontend_waiting_requests", "gauge"),
    ("jobz_frontend_log_streams", "gauge"),
    ("jobz_frontend_connections_closed", "counter"),
    ("jobz_worker_output_files_pruned", "counter"),
];

/// The python with `prometheus_client`: `JOBZ_TEST_PYTHON`, else the venv
/// `scripts/test.sh` makes in the target directory; `None` (and a note) outside CI when
/// neither is there.
fn python() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("JOBZ_TEST_PYTHON") {
        return Some(PathBuf::from(path));
    }
    // target/debug/deps/it-… → target/pyvenv/bin/python
    let venv = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.ancestors().nth(3).map(|t| t.join("pyvenv/bin/python")))
        .filter(|p| p.exists());
    if venv.is_some() {
        return venv;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "JOBZ_TEST_PYTHON is not set: scripts/test.sh makes the venv and sets it"
    );
    eprintln!(
        "SKIPPED: no python with prometheus_client (run scripts/test.sh once, or set \
         JOBZ_TEST_PYTHON to a python that has it)"
    );
    None
}

/// A metrics text as a parser read it.
struct Parsed(BTreeMap<String, Value>);

impl Parsed {
    /// The value of sample `name` with exactly these labels.
    fn value(&self, family: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let samples = self.0.get(family)?["samples"].as_array()?;
        samples.iter().find_map(|s| {
            let found = s[0].as_str() == Some(name)
                && s[1].as_object().is_some_and(|l| {
                    l.len() == labels.len()
                        && labels
                            .iter()
                            .all(|(k, v)| l.get(*k).and_then(Value::as_str) == Some(v))
                });
            found.then(|| s[2].as_f64()).flatten()
        })
    }

    /// Like [`Parsed::value`], failing with what the family holds.
    fn get(&self, family: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(family, name, labels).unwrap_or_else(|| {
            panic!(
                "no sample {name}{labels:?} in {family}: {}",
                self.0.get(family).unwrap_or(&Value::Null)
            )
        })
    }

    fn samples(&self, family: &str) -> Vec<Value> {
        self.0[family]["samples"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }
}

/// `GET /metrics` with this `Accept`, its `Content-Type` and the text parsed by the
/// parser of that format.
fn scrape(mesh: &Mesh, python: &PathBuf, accept: Option<&str>) -> (String, Parsed) {
    let accept = accept.map_or_else(String::new, |a| format!("Accept: {a}\r\n"));
    let raw = format!(
        "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: close\r\n{accept}\r\n",
        mesh.frontend_port
    );
    let response = http_request(mesh.frontend_port, raw.as_bytes(), Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("GET /metrics: {e}"));
    assert_eq!(response.status, 200, "{}", response.text());
    let content_type = response
        .header("content-type")
        .unwrap_or_default()
        .to_owned();
    let format = if content_type.starts_with("application/openmetrics-text") {
        "openmetrics"
    } else {
        "prometheus"
    };
    let file = mesh.dir().join(format!("metrics.{format}"));
    std::fs::write(&file, &response.body).unwrap();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/it/parse_metrics.py");
    let out = Command::new(python)
        .arg(&script)
        .arg(format)
        .arg(&file)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", python.display()));
    assert!(
        out.status.success(),
        "the {format} parser refused /metrics: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        response.text()
    );
    let families: BTreeMap<String, Value> = serde_json::from_slice(&out.stdout).unwrap();
    (content_type, Parsed(families))
}

/// Every family is there with its type.
fn assert_families(parsed: &Parsed, format: &str) {
    for (family, kind) in FAMILIES {
        let found = parsed.0.get(*family).map(|f| f["type"].clone());
        assert_eq!(
            found.as_ref().and_then(Value::as_str),
            Some(*kind),
            "{format}: family {family}"
        );
    }
}

#[test]
fn every_family_is_there_at_zero_and_runs_move_the_counters_and_histograms() {
    let Some(python) = python() else {
        return;
    };
    let mesh = Mesh::builder().worker("w1", JOBS).start();
    mesh.wait_workers_live(1);

    // A fresh mesh: every family, at 0 where nothing happened.
    let (content_type, fresh) = scrape(&mesh, &python, None);
    assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8");
    assert_families(&fresh, "prometheus");
    for job in ["fine", "broken"] {
        for state in ["succeeded", "failed", "cancelled"] {
            let labels = [("job", job), ("state", state)];
            assert_eq!(fresh.get("jobz_runs", "jobz_runs_total", &labels), 0.0);
        }
        for family in ["jobz_task_duration_seconds", "jobz_queue_wait_seconds"] {
            let count = format!("{family}_count");
            assert_eq!(fresh.get(family, &count, &[("job", job)]), 0.0);
        }
    }
    let dropped = fresh.samples("jobz_broker_frames_dropped");
    assert!(
        dropped.len() >= 20,
        "every drop reason is named: {dropped:?}"
    );
    assert!(
        dropped.iter().all(|s| s[2].as_f64() == Some(0.0)),
        "{dropped:?}"
    );
    let reason = [("reason", "malformed")];
    let name = "jobz_broker_frames_dropped_total";
    assert_eq!(fresh.get("jobz_broker_frames_dropped", name, &reason), 0.0);
    assert_eq!(
        fresh.get("jobz_workers", "jobz_workers", &[("state", "live")]),
        1.0
    );
    assert_eq!(
        fresh.get("jobz_workers", "jobz_workers", &[("state", "lost")]),
        0.0
    );
    assert_eq!(fresh.get("jobz_dead_tasks", "jobz_dead_tasks", &[]), 0.0);
    assert_eq!(fresh.get("jobz_broker_up", "jobz_broker_up", &[]), 1.0);
    let idle = [("reason", "idle")];
    let closed = "jobz_frontend_connections_closed_total";
    assert_eq!(
        fresh.get("jobz_frontend_connections_closed", closed, &idle),
        0.0
    );
    let (version, commit) = jobz::VERSION.split_once('+').unwrap();
    let build = [("version", version), ("commit", commit)];
    assert_eq!(fresh.get("jobz_build_info", "jobz_build_info", &build), 1.0);
    let worker = [("worker", "w1")];
    let pruned = "jobz_worker_output_files_pruned_total";
    assert_eq!(
        fresh.get("jobz_worker_output_files_pruned", pruned, &worker),
        0.0
    );
    let commits = "jobz_journal_commit_seconds_count";
    let commits_before = fresh.get("jobz_journal_commit_seconds", commits, &[]);

    // OpenMetrics when asked, as Prometheus asks.
    let accept = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5";
    let (content_type, open) = scrape(&mesh, &python, Some(accept));
    assert_eq!(
        content_type,
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    assert_families(&open, "openmetrics");

    // One run that succeeds, one that fails for good.
    let fine = mesh.start_run("fine", &[]);
    let broken = mesh.start_run("broken", &[]);
    assert_eq!(str_of(&mesh.wait_run_final(&fine), "state"), "succeeded");
    assert_eq!(str_of(&mesh.wait_run_final(&broken), "state"), "failed");

    let moved = wait_for(DEADLINE, "the run counters to move", || {
        let (_, now) = scrape(&mesh, &python, None);
        let ended = |job, state| {
            now.get(
                "jobz_runs",
                "jobz_runs_total",
                &[("job", job), ("state", state)],
            )
        };
        let seen = (ended("fine", "succeeded"), ended("broken", "failed"));
        if seen == (1.0, 1.0) {
            Ok(now)
        } else {
            Err(format!("(fine succeeded, broken failed) = {seen:?}"))
        }
    });
    assert_eq!(
        moved.get(
            "jobz_runs",
            "jobz_runs_total",
            &[("job", "fine"), ("state", "failed")]
        ),
        0.0
    );
    for job in ["fine", "broken"] {
        let labels = [("job", job)];
        let count = "jobz_task_duration_seconds_count";
        assert_eq!(
            moved.get("jobz_task_duration_seconds", count, &labels),
            1.0,
            "{job}"
        );
        let inf = [("job", job), ("le", "+Inf")];
        let bucket = "jobz_task_duration_seconds_bucket";
        assert_eq!(
            moved.get("jobz_task_duration_seconds", bucket, &inf),
            1.0,
            "{job}"
        );
        let count = "jobz_queue_wait_seconds_count";
        assert_eq!(
            moved.get("jobz_queue_wait_seconds", count, &labels),
            1.0,
            "{job}"
        );
    }
    assert!(moved.get("jobz_journal_commit_seconds", commits, &[]) > commits_before);
    assert_eq!(moved.get("jobz_dead_tasks", "jobz_dead_tasks", &[]), 1.0);
    let sent = moved.get(
        "jobz_broker_frames_sent",
        "jobz_broker_frames_sent_total",
        &[],
    );
    assert!(sent > 0.0);
    let ok = [("code", "202")];
    let requests = "jobz_frontend_http_requests_total";
    assert!(moved.get("jobz_frontend_http_requests", requests, &ok) >= 2.0);
}
