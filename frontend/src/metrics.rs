//! The frontend's own counters and `/metrics`: every family the mesh shows, encoded by the
//! `prometheus-client` crate in the Prometheus text format or, when the scraper asks for it
//! (`Accept: application/openmetrics-text`), in OpenMetrics.
//!
//! A scrape gathers a [`Snapshot`] (the frontend's [`Stats`], the broker's
//! [`HealthView`] and the workers' counters) and [`render`]s it: one collector encodes it
//! whole, so every family is written once per scrape with the numbers of that moment.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use jobz::message::{HealthView, HistogramView};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use crate::broker::LinkStatus;
use crate::route::{Parsed, Route};

/// Every reason the relay refuses or closes a connection for (see
/// [`Stats::connection_closed`]), shown at 0 until it happens.
pub const CLOSE_REASONS: &[&str] = &["full", "per_address", "reserved", "idle", "header_timeout"];

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
#[derive(Debug, Clone, Default)]
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

/// The two text formats `/metrics` speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The Prometheus text format, version 0.0.4: the default.
    Prometheus,
    /// OpenMetrics 1.0, for a scraper that asks for it.
    OpenMetrics,
}

/// The `Content-Type` of OpenMetrics text.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

impl Format {
    /// The format an `Accept` header asks for: OpenMetrics when it names
    /// `application/openmetrics-text` with a weight at least that of anything else it
    /// names; the Prometheus text format otherwise.
    pub fn from_accept(accept: Option<&str>) -> Format {
        let Some(accept) = accept else {
            return Format::Prometheus;
        };
        let (mut openmetrics, mut other) = (0.0f32, 0.0f32);
        for range in accept.split(',') {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or_default().to_ascii_lowercase();
            let weight = parts
                .filter_map(|p| p.strip_prefix("q="))
                .find_map(|q| q.parse::<f32>().ok())
                .unwrap_or(1.0);
            if media == "application/openmetrics-text" {
                openmetrics = openmetrics.max(weight);
            } else if !media.is_empty() {
                other = other.max(weight);
            }
        }
        if openmetrics > 0.0 && openmetrics >= other {
            Format::OpenMetrics
        } else {
            Format::Prometheus
        }
    }

    /// Its `Content-Type`.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Prometheus => prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            Format::OpenMetrics => OPENMETRICS,
        }
    }
}

/// Takes the `Accept` header of a `/metrics` request into its route.
pub fn with_accept_header(parsed: &mut Parsed, accept: Option<&str>) {
    if let Ok(Route::Metrics { openmetrics }) = &mut parsed.route {
        *openmetrics = Format::from_accept(accept) == Format::OpenMetrics;
    }
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

/// The name of a counter family for a raw counter name: sanitised, without a `_total` of
/// its own (the encoder adds it).
fn counter_name(prefix: &str, raw: &str) -> String {
    let name = metric_name(raw);
    let name = name.strip_suffix("_total").unwrap_or(&name);
    format!("{prefix}{name}")
}

/// Renders `snapshot` in `format`.
pub fn render(snapshot: &Snapshot, format: Format) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Exposition(snapshot.clone())));
    let mut out = String::new();
    let encoded = match format {
        Format::Prometheus => {
            prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)
        }
        Format::OpenMetrics => prometheus_client::encoding::text::encode(&mut out, &registry),
    };
    // Writing to a String fails only if an encoder refuses what it was given (a bug here).
    if let Err(e) = encoded {
        tracing::error!(error = %e, "cannot encode /metrics");
    }
    out
}

/// Broker counters that have a family of their own (labelled), not `jobz_broker_<name>`.
const BROKER_COUNTERS_SHOWN_ELSEWHERE: &[&str] = &[
    "frames_received",
    "frames_dropped",
    "runs_succeeded",
    "runs_failed",
    "runs_cancelled",
];

/// Family names the frontend writes itself, which no broker counter may take.
const FIXED_FAMILIES: &[&str] = &[
    "jobz_broker_up",
    "jobz_broker_active_runs",
    "jobz_broker_live_workers",
    "jobz_broker_runs",
    "jobz_broker_frames_received",
    "jobz_broker_frames_sent",
    "jobz_broker_frames_dropped",
];

/// The collector that encodes one snapshot.
#[derive(Debug)]
struct Exposition(Snapshot);

impl Collector for Exposition {
    fn encode(&self, mut out: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = &self.0;
        let (version, commit) = jobz::VERSION
            .split_once('+')
            .unwrap_or((jobz::VERSION, "unknown"));
        let mut m = family(
            &mut out,
            "jobz_build_info",
            "This frontend's version and commit; always 1.",
            MetricType::Gauge,
        )?;
        labelled(&mut m, &[("version", version), ("commit", commit)], |m| {
            m.encode_gauge(&1u64)
        })?;
        gauge(
            &mut out,
            "jobz_broker_up",
            "1 if the broker answered the health query.",
            u64::from(s.broker.is_some()),
        )?;
        if let Some(health) = &s.broker {
            encode_broker(&mut out, health)?;
        }
        encode_workers(&mut out, &s.worker_counters)?;
        let link = s.link.unwrap_or_default();
        gauge(
            &mut out,
            "jobz_frontend_broker_connected",
            "1 once the broker has welcomed this frontend.",
            u64::from(link.connected),
        )?;
        counter(
            &mut out,
            "jobz_frontend_broker_resends",
            "Requests to the broker resent after no reply.",
            link.resends,
        )?;
        counter(
            &mut out,
            "jobz_frontend_broker_dropped_frames",
            "Frames from the broker dropped as malformed or foreign.",
            link.dropped_frames,
        )?;
        let mut m = family(
            &mut out,
            "jobz_frontend_http_requests",
            "HTTP requests answered, by status code.",
            MetricType::Counter,
        )?;
        for (code, count) in &s.responses {
            let code = code.to_string();
            labelled(&mut m, &[("code", code.as_str())], |m| {
                m.encode_counter::<NoLabelSet, _, u64>(count, None)
            })?;
        }
        gauge(
            &mut out,
            "jobz_frontend_waiting_requests",
            "job_start requests waiting for their run to end.",
            s.waiting,
        )?;
        gauge(
            &mut out,
            "jobz_frontend_log_streams",
            "Run logs being followed.",
            s.following,
        )?;
        let mut m = family(
            &mut out,
            "jobz_frontend_connections_closed",
            "HTTP connections refused or closed by the connection policy, by reason.",
            MetricType::Counter,
        )?;
        let mut closed: BTreeMap<&str, u64> = CLOSE_REASONS.iter().map(|r| (*r, 0)).collect();
        closed.extend(s.connections_closed.iter().map(|(r, n)| (*r, *n)));
        for (reason, count) in &closed {
            labelled(&mut m, &[("reason", *reason)], |m| {
                m.encode_counter::<NoLabelSet, _, u64>(count, None)
            })?;
        }
        Ok(())
    }
}

/// The broker's families.
fn encode_broker(out: &mut DescriptorEncoder, health: &HealthView) -> Result<(), std::fmt::Error> {
    let metrics = &health.metrics;
    gauge(
        out,
        "jobz_broker_active_runs",
        "Runs not yet final.",
        health.active_runs,
    )?;
    gauge(
        out,
        "jobz_broker_live_workers",
        "Workers with a recent heartbeat.",
        health.live_workers,
    )?;
    let mut m = family(out, "jobz_broker_runs", "Unfinished runs by state (scheduled, waiting, pending, running, cancelled while their tasks are stopped).", MetricType::Gauge)?;
    for (state, count) in &health.runs_by_state {
        labelled(&mut m, &[("state", state.as_str())], |m| {
            m.encode_gauge(count)
        })?;
    }
    let counters = &health.counters;
    let get = |name: &str| counters.get(name).copied().unwrap_or(0);
    counter(
        out,
        "jobz_broker_frames_received",
        "Frames the broker took off its PULL socket.",
        get("frames_received"),
    )?;
    counter(
        out,
        "jobz_broker_frames_sent",
        "Frames the broker published (replies, work, events).",
        metrics.frames_sent,
    )?;
    let mut m = family(
        out,
        "jobz_broker_frames_dropped",
        "Frames the broker dropped, by reason.",
        MetricType::Counter,
    )?;
    for (raw, count) in counters {
        if let Some(reason) = raw.strip_prefix("frames_dropped_") {
            let reason = metric_name(reason);
            labelled(&mut m, &[("reason", reason.as_str())], |m| {
                m.encode_counter::<NoLabelSet, _, u64>(count, None)
            })?;
        }
    }
    let mut m = family(
        out,
        "jobz_runs",
        "Runs ended since the broker started, by job and final state.",
        MetricType::Counter,
    )?;
    for (job, states) in &metrics.runs_ended {
        for (state, count) in states {
            labelled(
                &mut m,
                &[("job", job.as_str()), ("state", state.as_str())],
                |m| m.encode_counter::<NoLabelSet, _, u64>(count, None),
            )?;
        }
    }
    histograms(
        out,
        "jobz_task_duration",
        "Seconds a task attempt ran, by job (the worker's clock).",
        &metrics.task_duration,
    )?;
    histograms(
        out,
        "jobz_queue_wait",
        "Seconds from a step's creation to its first attempt's start, by job.",
        &metrics.queue_wait,
    )?;
    let mut m = out.encode_descriptor(
        "jobz_journal_commit",
        "Seconds each journal commit (one store transaction) took.",
        Some(&Unit::Seconds),
        MetricType::Histogram,
    )?;
    histogram(&mut m, &metrics.journal_commit)?;
    let mut m = family(
        out,
        "jobz_workers",
        "Known workers by state (live, leaving, lost).",
        MetricType::Gauge,
    )?;
    for (state, count) in &metrics.workers {
        labelled(&mut m, &[("state", state.as_str())], |m| {
            m.encode_gauge(count)
        })?;
    }
    gauge(
        out,
        "jobz_dead_tasks",
        "Dead tasks (failed for good) the broker holds in memory.",
        metrics.dead_tasks,
    )?;
    // Every other named counter as jobz_broker_<name>_total; two raw names may sanitise to
    // one name: the first one wins.
    let mut written: BTreeSet<String> = FIXED_FAMILIES.iter().map(|n| (*n).to_owned()).collect();
    for (raw, value) in counters {
        if raw.starts_with("frames_dropped_")
            || BROKER_COUNTERS_SHOWN_ELSEWHERE.contains(&raw.as_str())
        {
            continue;
        }
        let name = counter_name("jobz_broker_", raw);
        if !written.insert(name.clone()) {
            continue;
        }
        counter(
            out,
            &name,
            &format!("Broker counter {}.", metric_name(raw)),
            *value,
        )?;
    }
    Ok(())
}

/// `jobz_worker_<counter>_total{worker="…"}`: one family per counter, a sample per worker.
fn encode_workers(
    out: &mut DescriptorEncoder,
    workers: &BTreeMap<String, BTreeMap<String, u64>>,
) -> Result<(), std::fmt::Error> {
    let mut families: BTreeMap<String, BTreeMap<&str, u64>> = BTreeMap::new();
    for (worker, counters) in workers {
        for (raw, value) in counters {
            // Two raw names may sanitise to one metric name; the first one wins.
            families
                .entry(counter_name("jobz_worker_", raw))
                .or_default()
                .entry(worker)
                .or_insert(*value);
        }
    }
    for (name, values) in &families {
        let mut m = family(
            out,
            name,
            "Worker counter, per worker (from its heartbeats).",
            MetricType::Counter,
        )?;
        for (worker, value) in values {
            labelled(&mut m, &[("worker", *worker)], |m| {
                m.encode_counter::<NoLabelSet, _, u64>(value, None)
            })?;
        }
    }
    Ok(())
}

fn family<'a>(
    out: &'a mut DescriptorEncoder,
    name: &'a str,
    help: &str,
    kind: MetricType,
) -> Result<MetricEncoder<'a>, std::fmt::Error> {
    out.encode_descriptor(name, help, None, kind)
}

fn labelled<'a>(
    m: &'a mut MetricEncoder,
    labels: &'a [(&str, &str)],
    encode: impl FnOnce(&mut MetricEncoder) -> Result<(), std::fmt::Error>,
) -> Result<(), std::fmt::Error> {
    let mut sample = m.encode_family(&labels)?;
    encode(&mut sample)
}

fn gauge(
    out: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), std::fmt::Error> {
    family(out, name, help, MetricType::Gauge)?.encode_gauge(&value)
}

fn counter(
    out: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), std::fmt::Error> {
    family(out, name, help, MetricType::Counter)?.encode_counter::<NoLabelSet, _, u64>(&value, None)
}

/// A histogram family in seconds, a histogram per job.
fn histograms(
    out: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    by_job: &BTreeMap<String, HistogramView>,
) -> Result<(), std::fmt::Error> {
    let mut m = out.encode_descriptor(name, help, Some(&Unit::Seconds), MetricType::Histogram)?;
    for (job, h) in by_job {
        let labels = [("job", job.as_str())];
        let mut sample = m.encode_family(&labels)?;
        histogram(&mut sample, h)?;
    }
    Ok(())
}

fn histogram(m: &mut MetricEncoder, h: &HistogramView) -> Result<(), std::fmt::Error> {
    m.encode_histogram::<NoLabelSet>(h.sum, h.count(), &h.buckets(), None)
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
    use jobz::message::BrokerMetrics;

    fn histogram(bounds: &[f64], counts: &[u64], sum: f64) -> HistogramView {
        HistogramView {
            bounds: bounds.to_vec(),
            counts: counts.to_vec(),
            sum,
        }
    }

    /// A snapshot with a broker that answered, its counters and metrics as given.
    fn snapshot() -> Snapshot {
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
                ("frames_dropped".into(), 3),
                ("frames_dropped_malformed".into(), 2),
                ("frames_dropped_wrong_role".into(), 1),
                ("frames_dropped_replay".into(), 0),
                ("runs accepted".into(), 3),
                ("runs_failed".into(), 1),
                ("runs_pruned_total".into(), 4),
                ("up".into(), 99),
            ]),
            active_runs: 2,
            live_workers: 5,
            runs_by_state: BTreeMap::from([("scheduled".into(), 4), ("waiting".into(), 1)]),
            metrics: BrokerMetrics {
                runs_ended: BTreeMap::from([(
                    "build".into(),
                    BTreeMap::from([
                        ("succeeded".into(), 2),
                        ("failed".into(), 1),
                        ("cancelled".into(), 0),
                    ]),
                )]),
                task_duration: BTreeMap::from([(
                    "build".into(),
                    histogram(&[1.0, 5.0], &[1, 1, 1], 9.5),
                )]),
                queue_wait: BTreeMap::from([("build".into(), histogram(&[0.5], &[0, 0], 0.0))]),
                journal_commit: histogram(&[0.001, 0.01], &[4, 1, 0], 0.009),
                frames_sent: 12,
                workers: BTreeMap::from([
                    ("live".into(), 5),
                    ("leaving".into(), 1),
                    ("lost".into(), 0),
                ]),
                dead_tasks: 1,
            },
        });
        snapshot.link = Some(LinkStatus {
            connected: true,
            resends: 1,
            dropped_frames: 0,
        });
        snapshot
    }

    fn assert_lines(text: &str, lines: &[&str]) {
        for line in lines {
            assert!(
                text.lines().any(|l| l == *line),
                "missing {line:?} in\n{text}"
            );
        }
    }

    #[test]
    fn sanitises_metric_names() {
        assert_eq!(metric_name("frames_received"), "frames_received");
        assert_eq!(metric_name("runs.accepted-total"), "runs_accepted_total");
        assert_eq!(metric_name("a b\n{c=\"1\"}"), "a_b__c__1__");
        assert_eq!(metric_name(""), "_");
        assert_eq!(counter_name("p_", "x_total"), "p_x");
    }

    #[test]
    fn renders_every_family_in_the_prometheus_text_format() {
        let text = render(&snapshot(), Format::Prometheus);
        assert_lines(
            &text,
            &[
                "jobz_broker_up 1",
                "# TYPE jobz_build_info gauge",
                "# TYPE jobz_broker_frames_received_total counter",
                "jobz_broker_frames_received_total 10",
                "jobz_broker_frames_sent_total 12",
                "jobz_broker_frames_dropped_total{reason=\"malformed\"} 2",
                "jobz_broker_frames_dropped_total{reason=\"wrong_role\"} 1",
                "jobz_broker_frames_dropped_total{reason=\"replay\"} 0",
                "jobz_broker_runs_accepted_total 3",
                "jobz_broker_runs_pruned_total 4",
                "jobz_broker_active_runs 2",
                "# TYPE jobz_broker_live_workers gauge",
                "jobz_broker_live_workers 5",
                "# TYPE jobz_broker_runs gauge",
                "jobz_broker_runs{state=\"scheduled\"} 4",
                "# TYPE jobz_runs_total counter",
                "jobz_runs_total{job=\"build\",state=\"succeeded\"} 2",
                "jobz_runs_total{job=\"build\",state=\"failed\"} 1",
                "jobz_runs_total{job=\"build\",state=\"cancelled\"} 0",
                "# TYPE jobz_task_duration_seconds histogram",
                "jobz_task_duration_seconds_bucket{job=\"build\",le=\"1\"} 1",
                "jobz_task_duration_seconds_bucket{job=\"build\",le=\"5\"} 2",
                "jobz_task_duration_seconds_bucket{job=\"build\",le=\"+Inf\"} 3",
                "jobz_task_duration_seconds_count{job=\"build\"} 3",
                "jobz_task_duration_seconds_sum{job=\"build\"} 9.5",
                "jobz_queue_wait_seconds_count{job=\"build\"} 0",
                "jobz_journal_commit_seconds_bucket{le=\"0.01\"} 5",
                "jobz_journal_commit_seconds_count 5",
                "jobz_workers{state=\"leaving\"} 1",
                "jobz_workers{state=\"lost\"} 0",
                "jobz_dead_tasks 1",
                "jobz_frontend_broker_connected 1",
                "jobz_frontend_broker_resends_total 1",
                "jobz_frontend_http_requests_total{code=\"202\"} 2",
                "jobz_frontend_http_requests_total{code=\"404\"} 1",
                "jobz_frontend_connections_closed_total{reason=\"idle\"} 2",
                "jobz_frontend_connections_closed_total{reason=\"per_address\"} 1",
                "jobz_frontend_connections_closed_total{reason=\"header_timeout\"} 0",
                "jobz_frontend_waiting_requests 0",
            ],
        );
        // A broker counter cannot shadow the frontend's own gauge, the labelled families
        // replace the separate names, and nothing is counted twice.
        assert!(!text.contains("jobz_broker_up 99"));
        assert!(!text.contains("jobz_broker_runs_failed"));
        assert!(!text.contains("jobz_broker_frames_dropped_malformed"));
        assert!(!text.contains("_total_total"));
        assert!(!text.contains("# EOF"));
        // Every family has one TYPE line, and every counter's samples end in `_total`.
        let types: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .collect();
        let names: BTreeSet<&str> = types.iter().map(|t| t.split(' ').next().unwrap()).collect();
        assert_eq!(types.len(), names.len(), "a family typed twice:\n{text}");
        for t in &types {
            if let Some(name) = t.strip_suffix(" counter") {
                assert!(name.ends_with("_total"), "{name}");
            }
        }
    }

    #[test]
    fn renders_openmetrics_when_asked() {
        let text = render(&snapshot(), Format::OpenMetrics);
        assert_lines(
            &text,
            &[
                "# TYPE jobz_runs counter",
                "jobz_runs_total{job=\"build\",state=\"failed\"} 1",
                "# TYPE jobz_task_duration_seconds histogram",
                "# UNIT jobz_task_duration_seconds seconds",
            ],
        );
        // The version and commit are this build's.
        let (version, commit) = jobz::VERSION.split_once('+').unwrap();
        let build = format!("jobz_build_info{{version=\"{version}\",commit=\"{commit}\"}} 1");
        assert_lines(&text, &[build.as_str()]);
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn the_accept_header_chooses_the_format() {
        for (accept, format) in [
            (None, Format::Prometheus),
            (Some("*/*"), Format::Prometheus),
            (Some("text/plain"), Format::Prometheus),
            (Some("application/openmetrics-text"), Format::OpenMetrics),
            // What Prometheus itself sends.
            (
                Some("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"),
                Format::OpenMetrics,
            ),
            (
                Some("text/plain;q=1, Application/OpenMetrics-Text; q=0.5"),
                Format::Prometheus,
            ),
            (Some("application/openmetrics-text;q=0"), Format::Prometheus),
        ] {
            assert_eq!(Format::from_accept(accept), format, "{accept:?}");
        }
        assert_eq!(
            Format::OpenMetrics.content_type(),
            "application/openmetrics-text; version=1.0.0; charset=utf-8"
        );
        assert_eq!(
            Format::Prometheus.content_type(),
            "text/plain; version=0.0.4; charset=utf-8"
        );
    }

    #[test]
    fn broker_down_shows_up_zero_and_no_broker_families() {
        let text = render(&Snapshot::default(), Format::Prometheus);
        assert_lines(
            &text,
            &[
                "jobz_broker_up 0",
                "jobz_frontend_broker_connected 0",
                "jobz_frontend_connections_closed_total{reason=\"full\"} 0",
            ],
        );
        assert!(!text.contains("jobz_broker_active_runs"));
        assert!(!text.contains("jobz_runs_total"));
    }

    #[test]
    fn worker_counters_are_one_family_each_with_a_sample_per_worker() {
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
        let text = render(&snapshot, Format::Prometheus);
        assert_lines(
            &text,
            &[
                "# TYPE jobz_worker_output_files_pruned_total counter",
                "jobz_worker_output_files_pruned_total{worker=\"w1\"} 3",
                "jobz_worker_output_files_pruned_total{worker=\"w\\\"2\\\\\\n\"} 0",
                "jobz_worker_spool_files_pruned_total{worker=\"w1\"} 0",
            ],
        );
        let families = text
            .lines()
            .filter(|l| l.starts_with("# TYPE jobz_worker_"))
            .count();
        assert_eq!(families, 2);
    }
}
