//! The frontend's own counters and the Prometheus text exposition of `/metrics`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use jobz::message::HealthView;

use crate::broker::LinkStatus;

/// Counters shared by every HTTP thread.
#[derive(Debug, Default)]
pub struct Stats {
    /// Answers sent, by HTTP status code.
    responses: Mutex<BTreeMap<u16, u64>>,
    /// Requests held open by `job_start?wait=` right now.
    pub waiting: AtomicU64,
    /// `/runs/{id}/log?follow=1` streams open right now.
    pub following: AtomicU64,
    /// Connections the relay refused or closed, by reason.
    connections_closed: Mutex<BTreeMap<&'static str, u64>>,
}

impl Stats {
    /// Counts one answer with this status.
    pub fn record(&self, status: u16) {
        if let Ok(mut map) = self.responses.lock() {
            *map.entry(status).or_default() += 1;
        }
    }

    /// Answers sent so far, by status.
    pub fn responses(&self) -> BTreeMap<u16, u64> {
        self.responses.lock().map(|m| m.clone()).unwrap_or_default()
    }

    /// Counts one connection refused or closed by the relay's policy (`full`,
    /// `per_address`, `reserved`, `idle`, `header_timeout`).
    pub fn connection_closed(&self, reason: &'static str) {
        if let Ok(mut map) = self.connections_closed.lock() {
            *map.entry(reason).or_default() += 1;
        }
    }
}

/// Everything `/metrics` shows.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// The broker's health, if it answered.
    pub broker: Option<HealthView>,
    /// The frontend's link to the broker.
    pub link: Option<LinkStatus>,
    /// Answers by status.
    pub responses: BTreeMap<u16, u64>,
    /// Requests waiting for their run.
    pub waiting: u64,
    /// Log streams open.
    pub following: u64,
    /// Connections refused or closed by policy, by reason.
    pub connections_closed: BTreeMap<&'static str, u64>,
    /// Each worker's own counters, by worker name.
    pub worker_counters: BTreeMap<String, BTreeMap<String, u64>>,
}

/// Replaces every character that a Prometheus metric name may not hold with `_`.
pub fn metric_name(raw: &str) -> String {
    let mut name: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if name.is_empty() {
        name.push('_');
    }
    name
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Renders the Prometheus text format (version 0.0.4).
pub fn render(snapshot: &Snapshot) -> String {
    let mut out = String::new();
    family(
        &mut out,
        "jobz_broker_up",
        "gauge",
        "1 if the broker answered the health query.",
    );
    let _ = writeln!(
        out,
        "jobz_broker_up {}",
        u8::from(snapshot.broker.is_some())
    );
    if let Some(health) = &snapshot.broker {
        family(
            &mut out,
            "jobz_broker_active_runs",
            "gauge",
            "Runs not yet final.",
        );
        let _ = writeln!(out, "jobz_broker_active_runs {}", health.active_runs);
        family(
            &mut out,
            "jobz_broker_live_workers",
            "gauge",
            "Workers with a recent heartbeat.",
        );
        let _ = writeln!(out, "jobz_broker_live_workers {}", health.live_workers);
        if !health.runs_by_state.is_empty() {
            family(
                &mut out,
                "jobz_broker_runs",
                "gauge",
                "Unfinished runs by state (scheduled, waiting, pending, running, cancelled while their tasks are stopped).",
            );
            for (state, count) in &health.runs_by_state {
                let state = metric_name(state);
                let _ = writeln!(out, "jobz_broker_runs{{state=\"{state}\"}} {count}");
            }
        }
        // Two raw names may sanitise to the same metric name; the first one wins.
        let mut written = std::collections::BTreeSet::new();
        for (raw, value) in &health.counters {
            let name = format!("jobz_broker_{}", metric_name(raw));
            if matches!(
                name.as_str(),
                "jobz_broker_up"
                    | "jobz_broker_active_runs"
                    | "jobz_broker_live_workers"
                    | "jobz_broker_runs"
            ) || !written.insert(name.clone())
            {
                continue;
            }
            family(
                &mut out,
                &name,
                "counter",
                &format!("Broker counter {raw}."),
            );
            let _ = writeln!(out, "{name} {value}");
        }
    }
    render_worker_counters(&mut out, &snapshot.worker_counters);
    if let Some(link) = snapshot.link {
        family(
            &mut out,
            "jobz_frontend_broker_connected",
            "gauge",
            "1 once the broker has welcomed this frontend.",
        );
        let _ = writeln!(
            out,
            "jobz_frontend_broker_connected {}",
            u8::from(link.connected)
        );
        family(
            &mut out,
            "jobz_frontend_broker_resends_total",
            "counter",
            "Requests to the broker resent after no reply.",
        );
        let _ = writeln!(out, "jobz_frontend_broker_resends_total {}", link.resends);
        family(
            &mut out,
            "jobz_frontend_broker_dropped_frames_total",
            "counter",
            "Frames from the broker dropped as malformed or foreign.",
        );
        let _ = writeln!(
            out,
            "jobz_frontend_broker_dropped_frames_total {}",
            link.dropped_frames
        );
    }
    family(
        &mut out,
        "jobz_frontend_http_requests_total",
        "counter",
        "HTTP requests answered, by status code.",
    );
    for (code, count) in &snapshot.responses {
        let _ = writeln!(
            out,
            "jobz_frontend_http_requests_total{{code=\"{code}\"}} {count}"
        );
    }
    family(
        &mut out,
        "jobz_frontend_waiting_requests",
        "gauge",
        "job_start requests waiting for their run to end.",
    );
    let _ = writeln!(out, "jobz_frontend_waiting_requests {}", snapshot.waiting);
    family(
        &mut out,
        "jobz_frontend_log_streams",
        "gauge",
        "Run logs being followed.",
    );
    let _ = writeln!(out, "jobz_frontend_log_streams {}", snapshot.following);
    if !snapshot.connections_closed.is_empty() {
        family(
            &mut out,
            "jobz_frontend_connections_closed_total",
            "counter",
            "HTTP connections refused or closed by the connection policy, by reason.",
        );
    }
    for (reason, count) in &snapshot.connections_closed {
        let _ = writeln!(
            out,
            "jobz_frontend_connections_closed_total{{reason=\"{reason}\"}} {count}"
        );
    }
    out
}

/// `jobz_worker_<counter>{worker="…"}`: one family per counter, a line per worker.
fn render_worker_counters(out: &mut String, workers: &BTreeMap<String, BTreeMap<String, u64>>) {
    let mut families: BTreeMap<String, BTreeMap<&str, u64>> = BTreeMap::new();
    for (worker, counters) in workers {
        for (raw, value) in counters {
            // Two raw names may sanitise to one metric name; the first one wins.
            let name = format!("jobz_worker_{}", metric_name(raw));
            families
                .entry(name)
                .or_default()
                .entry(worker)
                .or_insert(*value);
        }
    }
    for (name, values) in families {
        family(out, &name, "counter", "Worker counter, per worker.");
        for (worker, value) in values {
            let _ = writeln!(out, "{name}{{worker=\"{}\"}} {value}", label_value(worker));
        }
    }
}

/// A Prometheus label value: backslash, double quote and newline escaped.
fn label_value(raw: &str) -> String {
    raw.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Stats {
    /// A snapshot of the frontend's own numbers; the caller adds the broker's.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            responses: self.responses(),
            waiting: self.waiting.load(Ordering::Relaxed),
            following: self.following.load(Ordering::Relaxed),
            connections_closed: self
                .connections_closed
                .lock()
                .map(|m| m.clone())
                .unwrap_or_default(),
            ..Snapshot::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sanitises_metric_names() {
        assert_eq!(metric_name("frames_received"), "frames_received");
        assert_eq!(metric_name("runs.accepted-total"), "runs_accepted_total");
        assert_eq!(metric_name("a b\n{c=\"1\"}"), "a_b__c__1__");
        assert_eq!(metric_name(""), "_");
    }

    #[test]
    fn renders_broker_counters_and_own_requests() {
        let stats = Stats::default();
        stats.record(202);
        stats.record(202);
        stats.record(404);
        stats.connection_closed("idle");
        stats.connection_closed("idle");
        stats.connection_closed("per_address");
        let mut snapshot = stats.snapshot();
        snapshot.broker = Some(HealthView {
            version: "0.0.0".into(),
            instance: "i".into(),
            counters: BTreeMap::from([
                ("frames_received".into(), 10),
                ("runs accepted".into(), 3),
                ("up".into(), 99),
            ]),
            active_runs: 2,
            live_workers: 5,
            runs_by_state: BTreeMap::from([("scheduled".into(), 4), ("waiting".into(), 1)]),
        });
        snapshot.link = Some(LinkStatus {
            connected: true,
            resends: 1,
            dropped_frames: 0,
        });
        let text = render(&snapshot);
        for line in [
            "jobz_broker_up 1",
            "# TYPE jobz_broker_frames_received counter",
            "jobz_broker_frames_received 10",
            "jobz_broker_runs_accepted 3",
            "jobz_broker_active_runs 2",
            "# TYPE jobz_broker_live_workers gauge",
            "jobz_broker_live_workers 5",
            "# TYPE jobz_broker_runs gauge",
            "jobz_broker_runs{state=\"scheduled\"} 4",
            "jobz_broker_runs{state=\"waiting\"} 1",
            "jobz_frontend_broker_connected 1",
            "jobz_frontend_http_requests_total{code=\"202\"} 2",
            "jobz_frontend_connections_closed_total{reason=\"idle\"} 2",
            "jobz_frontend_connections_closed_total{reason=\"per_address\"} 1",
            "jobz_frontend_http_requests_total{code=\"404\"} 1",
            "jobz_frontend_waiting_requests 0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        // A broker counter cannot shadow the frontend's own gauge.
        assert!(!text.contains("jobz_broker_up 99"));
        // Every sample line's metric has exactly one TYPE line.
        let types = text.lines().filter(|l| l.starts_with("# TYPE ")).count();
        let names: std::collections::BTreeSet<_> = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| l.split(['{', ' ']).next().unwrap())
            .collect();
        assert_eq!(types, names.len());
    }

    #[test]
    fn broker_down_shows_up_zero_and_no_broker_counters() {
        let text = render(&Snapshot::default());
        assert!(text.contains("jobz_broker_up 0\n"));
        assert!(!text.contains("jobz_broker_active_runs"));
    }

    #[test]
    fn worker_counters_are_one_family_each_with_a_line_per_worker() {
        let snapshot = Snapshot {
            worker_counters: BTreeMap::from([
                (
                    "w1".to_string(),
                    BTreeMap::from([
                        ("output_files_pruned".to_string(), 3),
                        ("spool_files_pruned".to_string(), 0),
                    ]),
                ),
                (
                    "w\"2\\\n".to_string(),
                    BTreeMap::from([("output_files_pruned".to_string(), 0)]),
                ),
            ]),
            ..Snapshot::default()
        };
        let text = render(&snapshot);
        for line in [
            "# TYPE jobz_worker_output_files_pruned counter",
            "jobz_worker_output_files_pruned{worker=\"w1\"} 3",
            "jobz_worker_output_files_pruned{worker=\"w\\\"2\\\\\\n\"} 0",
            "jobz_worker_spool_files_pruned{worker=\"w1\"} 0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        let families = text
            .lines()
            .filter(|l| l.starts_with("# TYPE jobz_worker_"))
            .count();
        assert_eq!(families, 2);
    }
}
