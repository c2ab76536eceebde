//! Handlers of the HTTP API: a parsed request ([`crate::route`]) in, an [`Outcome`] out.
//!
//! Nothing here touches a socket or reads a raw request target. The broker is reached through the [`Broker`] trait and
//! the answer is a plain [`HttpReply`]; the server shell turns it into an HTTP response.
//! Two requests outlive their handler: `job_start?wait=` ([`Outcome::Wait`], answered by
//! the waiter thread when the run ends) and `runs/{id}/log?follow=1` ([`Outcome::Follow`],
//! streamed by a thread of its own).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde_json::{json, Value};
use tracing::{info, warn};

use jobz::client::ClientError;
use jobz::message::{
    Message, Query, ReplyBody, ResourceAction, RunFilter, RunView, TriggerRequest,
};

use crate::broker::Broker;
use crate::metrics::{self, Stats};
pub use crate::route::Method;
use crate::route::{Invalid, JobStart, Route, RunsQuery};
use crate::views;

/// The dashboard page, served at `/`.
pub const DASHBOARD: &str = include_str!("dashboard.html");

/// How long `/healthz` and `/metrics` wait for the broker.
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);

/// `Content-Type` of JSON answers.
pub const JSON: &str = "application/json";
/// `Content-Type` of plain-text answers.
pub const TEXT: &str = "text/plain; charset=utf-8";
/// `Content-Type` of the dashboard.
pub const HTML: &str = "text/html; charset=utf-8";

/// The dashboard loads nothing from elsewhere and talks only to this origin.
const DASHBOARD_CSP: &str = "default-src 'none'; script-src 'unsafe-inline'; \
    style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; \
    form-action 'none'; frame-ancestors 'none'";

/// Characters escaped in a run id placed in a URL path.
const PATH_SEGMENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.');

/// A complete answer.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpReply {
    /// HTTP status code.
    pub status: u16,
    /// `Content-Type`.
    pub content_type: &'static str,
    /// Further headers.
    pub headers: Vec<(&'static str, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl HttpReply {
    /// A JSON answer.
    /// A JSON answer; the body ends with a newline, as a terminal (`curl`) wants it.
    pub fn json(status: u16, value: &Value) -> Self {
        let mut body = value.to_string().into_bytes();
        body.push(b'\n');
        HttpReply {
            status,
            content_type: JSON,
            headers: Vec::new(),
            body,
        }
    }

    /// A JSON error: `{"error": message, ...extra}`.
    pub fn error(status: u16, message: &str, extra: &[(&str, Value)]) -> Self {
        Self::json(status, &views::error(message, extra))
    }

    /// A plain-text answer.
    pub fn text(status: u16, content_type: &'static str, body: String) -> Self {
        HttpReply {
            status,
            content_type,
            headers: Vec::new(),
            body: body.into_bytes(),
        }
    }

    pub fn with_header(mut self, name: &'static str, value: String) -> Self {
        self.headers.push((name, value));
        self
    }
}

/// A `job_start` request that waits for its run.
#[derive(Debug, Clone, PartialEq)]
pub struct WaitRequest {
    /// The accepted run.
    pub run_id: String,
    /// Its job.
    pub job: String,
    /// How long to wait at most.
    pub wait: Duration,
    /// The 202 answer, sent if the wait runs out.
    pub accepted: HttpReply,
}

/// What to do with a request.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Answer now.
    Reply(HttpReply),
    /// The trigger was accepted; answer when the run ends or the wait runs out.
    Wait(WaitRequest),
    /// Stream the run's log as its tasks finish, starting from this state of the run.
    Follow(Box<RunView>),
    /// Stream the feed's events that pass the filter (`/events`).
    Events(crate::events::EventFilter),
}

/// The handlers and what they share.
pub struct Api {
    /// The broker.
    pub broker: Arc<dyn Broker>,
    /// How long a request to the broker may take before the answer is 503.
    pub request_timeout: Duration,
    /// The frontend's counters.
    pub stats: Arc<Stats>,
    /// `--public-url` without its trailing `/`: the base of the URLs answers give
    /// (`status_url`, `retry_url`, `Location`); empty: they are paths.
    pub public_base: String,
    /// The broker's feed as this frontend heard it (`/events`).
    pub feed: Arc<crate::events::Feed>,
}

/// Checks a `--public-url`: `http://` or `https://`, a host, an optional path prefix, no
/// query or fragment. Returns it without a trailing `/`.
pub fn parse_public_url(raw: &str) -> Result<String, String> {
    let rest = raw
        .strip_prefix("https://")
        .or_else(|| raw.strip_prefix("http://"))
        .ok_or_else(|| format!("{raw:?}: must start with http:// or https://"))?;
    let host = rest.split('/').next().unwrap_or_default();
    if host.is_empty() {
        return Err(format!("{raw:?}: names no host"));
    }
    if let Some(bad) = raw
        .chars()
        .find(|c| c.is_whitespace() || c.is_control() || matches!(c, '?' | '#' | '"' | '<' | '>'))
    {
        return Err(format!(
            "{raw:?}: may not hold {bad:?} (no query or fragment)"
        ));
    }
    Ok(raw.trim_end_matches('/').to_owned())
}

type Handled = Result<Outcome, HttpReply>;

impl Api {
    /// A new set of handlers.
    pub fn new(broker: Arc<dyn Broker>, request_timeout: Duration) -> Self {
        Api {
            broker,
            request_timeout,
            stats: Arc::new(Stats::default()),
            public_base: String::new(),
            feed: Arc::default(),
        }
    }

    /// The URL answers give for `path` (which starts with `/`).
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.public_base)
    }

    /// Answers one parsed request (see [`crate::route::parse`]).
    pub fn handle(&self, route: Result<Route, Invalid>) -> Outcome {
        let route = match route {
            Ok(route) => route,
            Err(invalid) => return Outcome::Reply(refusal(&invalid)),
        };
        let handled = match route {
            Route::Dashboard => Ok(dashboard()),
            Route::JobStart(request) => self.job_start(request),
            Route::Runs(query) => self.list_runs(query),
            Route::Run { run_id } => self.get_run(&run_id),
            Route::RunLog { run_id, follow } => self.run_log(&run_id, follow),
            Route::AttemptLog {
                run_id,
                task_id,
                attempt,
            } => self.attempt_log(&run_id, &task_id, attempt),
            Route::Jobs => self.list_jobs(),
            Route::Workers => self.list_workers(),
            Route::Dead { limit } => self.list_dead(limit),
            Route::RetryDead { task_id } => self.retry_dead(&task_id),
            Route::CancelRun { run_id, force } => self.control(
                &run_id,
                Message::CancelRun {
                    run_id: run_id.clone(),
                    force,
                },
            ),
            Route::PrioritizeRun { run_id, priority } => self.control(
                &run_id,
                Message::PrioritizeRun {
                    run_id: run_id.clone(),
                    priority,
                },
            ),
            Route::TrackRun {
                run_id,
                tracked,
                notify,
            } => self.control(
                &run_id,
                Message::TrackRun {
                    run_id: run_id.clone(),
                    tracked,
                    notify,
                },
            ),
            Route::Semaphores => self.list_semaphores(),
            Route::Schedules => self.list_schedules(),
            Route::Resources => self.list_resources(),
            Route::ControlResource { name, action } => self.control_resource(name, action),
            Route::ForgetWorker { name } => self.forget_worker(name),
            Route::Graph { dot } => self.graph(dot),
            Route::Healthz => Ok(self.healthz()),
            Route::Metrics { openmetrics } => Ok(self.metrics(if openmetrics {
                metrics::Format::OpenMetrics
            } else {
                metrics::Format::Prometheus
            })),
            Route::Events(filter) => Ok(Outcome::Events(filter)),
            Route::Stats { job, days } => self.job_stats(job, days),
        };
        handled.unwrap_or_else(Outcome::Reply)
    }

    /// Asks the broker, mapping a missing answer to 503 and a foreign one to 502.
    fn ask(&self, query: Query) -> Result<ReplyBody, HttpReply> {
        self.broker
            .request(Message::Query(query), self.request_timeout)
            .map_err(|e| broker_error(&e))
    }

    fn job_start(&self, request: JobStart) -> Handled {
        let JobStart {
            job,
            params,
            wait,
            priority,
            delay,
            at_ms,
            depends,
            tags,
            idempotency_key,
        } = request;
        let param_count = params.len();
        // A PUSH socket queues messages before its connection exists, so a trigger sent to
        // a broker that was never reached could be delivered (and run) long after this
        // request was answered 503. Send nothing until the broker has answered once.
        if !self.broker.wait_connected(self.request_timeout) {
            warn!(job = %job, "trigger refused: never connected to the broker");
            return Err(HttpReply::error(
                503,
                &format!(
                    "broker unreachable: no connection within {:?}; nothing was sent",
                    self.request_timeout
                ),
                &[("job", json!(job))],
            ));
        }
        let trigger = TriggerRequest {
            job: job.clone(),
            params,
            parent_runs: Vec::new(),
            priority,
            delay_ms: delay.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            at_ms,
            depends,
            tags,
            idempotency_key,
        };
        let reply = self
            .broker
            .request(Message::Trigger(trigger), self.request_timeout);
        match reply {
            Ok(ReplyBody::Accepted { run_id }) => {
                info!(run_id = %run_id, job = %job, params = param_count, "run accepted");
                let status_url = self.url(&format!(
                    "/runs/{}",
                    utf8_percent_encode(&run_id, PATH_SEGMENT)
                ));
                let accepted = HttpReply::json(
                    202,
                    &json!({ "run_id": run_id, "job": job, "status_url": status_url }),
                )
                .with_header("Location", status_url);
                Ok(match wait {
                    Some(wait) => Outcome::Wait(WaitRequest {
                        run_id,
                        job,
                        wait,
                        accepted,
                    }),
                    None => Outcome::Reply(accepted),
                })
            }
            Ok(ReplyBody::Rejected { status, error }) => {
                info!(job = %job, status, error = %error, "trigger rejected");
                let status = if (400..=599).contains(&status) {
                    status
                } else {
                    502
                };
                Err(HttpReply::error(status, &error, &[("job", json!(job))]))
            }
            Ok(other) => Err(unexpected(&other)),
            Err(e) => {
                warn!(job = %job, error = %e, "trigger not answered");
                let mut reply = broker_error(&e);
                if reply.status == 503 {
                    reply = HttpReply::error(
                        503,
                        &format!(
                            "broker unreachable: {e}; the run was not confirmed and may \
                             still start if the broker receives the request later"
                        ),
                        &[("job", json!(job))],
                    );
                }
                Err(reply)
            }
        }
    }

    fn get_run(&self, run_id: &str) -> Handled {
        match self.ask(Query::Run {
            run_id: run_id.to_owned(),
        })? {
            ReplyBody::Run(Some(run)) => Ok(Outcome::Reply(HttpReply::json(
                200,
                &views::run(&run, true),
            ))),
            ReplyBody::Run(None) => Err(unknown_run(run_id)),
            other => Err(unexpected(&other)),
        }
    }

    fn run_log(&self, run_id: &str, follow: bool) -> Handled {
        match self.ask(Query::Run {
            run_id: run_id.to_owned(),
        })? {
            ReplyBody::Run(Some(run)) if follow => Ok(Outcome::Follow(Box::new(run))),
            ReplyBody::Run(Some(run)) => Ok(Outcome::Reply(HttpReply::text(
                200,
                TEXT,
                views::run_log(&run),
            ))),
            ReplyBody::Run(None) => Err(unknown_run(run_id)),
            other => Err(unexpected(&other)),
        }
    }

    /// One attempt's output, as it is (no prefixes): what the broker holds of it live when
    /// that is all of it from the start (up to 256 KiB), else the tail its worker reported
    /// (4 KiB). The whole output stays in the file on the worker's host.
    fn attempt_log(&self, run_id: &str, task_id: &str, attempt: u32) -> Handled {
        let run = match self.ask(Query::Run {
            run_id: run_id.to_owned(),
        })? {
            ReplyBody::Run(Some(run)) => run,
            ReplyBody::Run(None) => return Err(unknown_run(run_id)),
            other => return Err(unexpected(&other)),
        };
        let current = run
            .steps
            .iter()
            .find(|s| s.task_id == task_id && s.attempt == attempt)
            .map(|s| s.output_tail.as_str());
        // An attempt recorded twice (its result came late too) shows the applied record.
        let earlier = run
            .attempts
            .iter()
            .filter(|a| a.task_id == task_id && a.attempt == attempt)
            .min_by_key(|a| a.late)
            .map(|a| a.output_tail.as_str());
        let Some(tail) = current.or(earlier) else {
            return Err(HttpReply::error(
                404,
                "no such attempt in this run",
                &[
                    ("run_id", json!(run_id)),
                    ("task_id", json!(task_id)),
                    ("attempt", json!(attempt)),
                ],
            ));
        };
        let live = match self.broker.request(
            Message::Query(Query::TaskOutput {
                task_id: task_id.to_owned(),
                attempt,
                from: 0,
            }),
            self.request_timeout,
        ) {
            Ok(ReplyBody::TaskOutput(Some(view))) if view.from == 0 && !view.capped => {
                Some(view.text)
            }
            _ => None,
        };
        let text = live
            .filter(|text| text.len() >= tail.len())
            .unwrap_or_else(|| tail.to_owned());
        Ok(Outcome::Reply(HttpReply::text(200, TEXT, text)))
    }

    fn list_runs(&self, query: RunsQuery) -> Handled {
        let RunsQuery {
            job,
            state,
            tag,
            tracked,
            limit,
            worker,
            before,
            since_ms,
            until_ms,
        } = query;
        let filter = RunFilter {
            job,
            state,
            limit,
            tag,
            tracked,
            worker,
            before,
            since_ms,
            until_ms,
        };
        let runs = match self.ask(Query::Runs(filter))? {
            ReplyBody::Runs(runs) => runs,
            other => return Err(unexpected(&other)),
        };
        // A full page may have more after it: `next` is the `before=` that lists them.
        let next = match runs.len() == limit as usize {
            true => runs.last().map(|r| Value::String(r.run_id.clone())),
            false => None,
        };
        let runs: Vec<Value> = runs.iter().map(|r| views::run(r, false)).collect();
        Ok(Outcome::Reply(HttpReply::json(
            200,
            &json!({ "runs": runs, "next": next }),
        )))
    }

    /// Cancels, reprioritizes or tracks a run: the broker answers with the run as it is
    /// once the change is durable, `Run(None)` for an unknown run, or why not (409).
    fn control(&self, run_id: &str, message: Message) -> Handled {
        let what = match &message {
            Message::CancelRun { .. } => "cancelled",
            Message::PrioritizeRun { .. } => "reprioritized",
            _ => "tracking changed",
        };
        match self
            .broker
            .request(message, self.request_timeout)
            .map_err(|e| broker_error(&e))?
        {
            ReplyBody::Run(Some(run)) => {
                info!(run_id = %run_id, state = %run.state, "run {what}");
                Ok(Outcome::Reply(HttpReply::json(
                    200,
                    &views::run(&run, true),
                )))
            }
            ReplyBody::Run(None) => Err(unknown_run(run_id)),
            ReplyBody::Rejected { status, error } => {
                Err(rejected(status, &error, ("run_id", json!(run_id))))
            }
            other => Err(unexpected(&other)),
        }
    }

    fn list_jobs(&self) -> Handled {
        match self.ask(Query::Jobs)? {
            ReplyBody::Jobs(jobs) => {
                let jobs: Vec<Value> = jobs.iter().map(views::job).collect();
                Ok(Outcome::Reply(HttpReply::json(
                    200,
                    &json!({ "jobs": jobs }),
                )))
            }
            other => Err(unexpected(&other)),
        }
    }

    /// `/stats`: the job's tasks per UTC day since the start of the day `days - 1` ago.
    fn job_stats(&self, job: String, days: u32) -> Handled {
        const DAY_MS: i64 = 86_400_000;
        let today = jobz::now_ms().div_euclid(DAY_MS) * DAY_MS;
        let since_ms = today - (i64::from(days) - 1) * DAY_MS;
        let query = Query::JobStats {
            job: job.clone(),
            since_ms,
        };
        match self.ask(query)? {
            ReplyBody::JobStats(stats) => Ok(Outcome::Reply(HttpReply::json(
                200,
                &views::job_stats(&job, since_ms, &stats),
            ))),
            other => Err(unexpected(&other)),
        }
    }

    fn list_semaphores(&self) -> Handled {
        match self.ask(Query::Semaphores)? {
            ReplyBody::Semaphores(barriers) => {
                let barriers: Vec<Value> = barriers.iter().map(views::barrier).collect();
                Ok(Outcome::Reply(HttpReply::json(
                    200,
                    &json!({ "semaphores": barriers }),
                )))
            }
            other => Err(unexpected(&other)),
        }
    }

    fn list_schedules(&self) -> Handled {
        match self.ask(Query::Schedules)? {
            ReplyBody::Schedules(schedules) => {
                let schedules: Vec<Value> = schedules.iter().map(views::schedule).collect();
                Ok(Outcome::Reply(HttpReply::json(
                    200,
                    &json!({ "schedules": schedules }),
                )))
            }
            other => Err(unexpected(&other)),
        }
    }

    fn list_resources(&self) -> Handled {
        match self.ask(Query::Resources)? {
            ReplyBody::Resources(resources) => {
                let resources: Vec<Value> = resources.iter().map(views::resource).collect();
                Ok(Outcome::Reply(HttpReply::json(
                    200,
                    &json!({ "resources": resources }),
                )))
            }
            other => Err(unexpected(&other)),
        }
    }

    fn control_resource(&self, name: String, action: ResourceAction) -> Handled {
        let message = Message::ControlResource {
            name: name.clone(),
            action,
        };
        match self
            .broker
            .request(message, self.request_timeout)
            .map_err(|e| broker_error(&e))?
        {
            ReplyBody::Resources(mut views) if views.len() == 1 => {
                info!(resource = %name, ?action, "resource changed");
                let view = views.remove(0);
                Ok(Outcome::Reply(HttpReply::json(
                    200,
                    &views::resource(&view),
                )))
            }
            // Cleared and neither held nor waited for: nothing left to show.
            ReplyBody::Resources(_) => Ok(Outcome::Reply(HttpReply::json(
                200,
                &json!({ "name": name, "exists": false, "holders": [], "waiters": [] }),
            ))),
            ReplyBody::Rejected { status, error } => {
                Err(rejected(status, &error, ("resource", json!(name))))
            }
            other => Err(unexpected(&other)),
        }
    }

    fn forget_worker(&self, name: String) -> Handled {
        let message = Message::ForgetWorker { name: name.clone() };
        match self
            .broker
            .request(message, self.request_timeout)
            .map_err(|e| broker_error(&e))?
        {
            ReplyBody::Ack => {
                info!(worker = %name, "worker forgotten");
                Ok(Outcome::Reply(HttpReply::json(
                    200,
                    &json!({ "worker": name, "forgotten": true }),
                )))
            }
            ReplyBody::Rejected { status, error } => {
                Err(rejected(status, &error, ("worker", json!(name))))
            }
            other => Err(unexpected(&other)),
        }
    }

    fn graph(&self, dot: bool) -> Handled {
        match self.ask(Query::ResourceGraph)? {
            ReplyBody::ResourceGraph(edges) if dot => Ok(Outcome::Reply(HttpReply::text(
                200,
                "text/vnd.graphviz; charset=utf-8",
                views::lineage_dot(&edges),
            ))),
            ReplyBody::ResourceGraph(edges) => {
                let edges: Vec<Value> = edges
                    .iter()
                    .map(|e| json!({ "from": e.from, "to": e.to, "kind": e.kind }))
                    .collect();
                Ok(Outcome::Reply(HttpReply::json(
                    200,
                    &json!({ "edges": edges }),
                )))
            }
            other => Err(unexpected(&other)),
        }
    }

    fn list_dead(&self, limit: u32) -> Handled {
        match self.ask(Query::Dead { limit })? {
            ReplyBody::Dead(dead) => {
                let dead: Vec<Value> = dead
                    .iter()
                    .map(|d| views::dead(d, &self.public_base))
                    .collect();
                Ok(Outcome::Reply(HttpReply::json(
                    200,
                    &json!({ "dead": dead }),
                )))
            }
            other => Err(unexpected(&other)),
        }
    }

    /// Runs a dead task's job again as a new run; retrying twice gives the same run.
    fn retry_dead(&self, task_id: &str) -> Handled {
        let message = Message::RetryDead {
            task_id: task_id.to_owned(),
        };
        match self
            .broker
            .request(message, self.request_timeout)
            .map_err(|e| broker_error(&e))?
        {
            ReplyBody::Accepted { run_id } => {
                info!(run_id = %run_id, task_id = %task_id, "dead task re-run");
                let status_url = self.url(&format!(
                    "/runs/{}",
                    utf8_percent_encode(&run_id, PATH_SEGMENT)
                ));
                let body = json!({ "run_id": run_id, "retried_task_id": task_id, "status_url": status_url });
                Ok(Outcome::Reply(
                    HttpReply::json(202, &body).with_header("Location", status_url),
                ))
            }
            other => Err(unexpected(&other)),
        }
    }

    fn list_workers(&self) -> Handled {
        match self.ask(Query::Workers)? {
            ReplyBody::Workers(workers) => {
                let workers: Vec<Value> = workers.iter().map(views::worker).collect();
                Ok(Outcome::Reply(HttpReply::json(
                    200,
                    &json!({ "workers": workers }),
                )))
            }
            other => Err(unexpected(&other)),
        }
    }

    fn health(&self) -> Result<jobz::message::HealthView, String> {
        match self
            .broker
            .request(Message::Query(Query::Health), HEALTH_TIMEOUT)
        {
            Ok(ReplyBody::Health(health)) => Ok(health),
            Ok(other) => Err(format!("unexpected answer {}", reply_kind(&other))),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Each worker's counters, for `/metrics` (none if the broker does not answer).
    fn worker_counters(&self) -> BTreeMap<String, BTreeMap<String, u64>> {
        match self
            .broker
            .request(Message::Query(Query::Workers), HEALTH_TIMEOUT)
        {
            Ok(ReplyBody::Workers(workers)) => {
                workers.into_iter().map(|w| (w.name, w.counters)).collect()
            }
            _ => BTreeMap::new(),
        }
    }

    fn healthz(&self) -> Outcome {
        Outcome::Reply(match self.health() {
            Ok(health) => HttpReply::json(
                200,
                &json!({ "status": "ok", "broker": views::health(&health) }),
            ),
            Err(error) => HttpReply::json(
                503,
                &json!({ "status": "unavailable", "error": format!("broker unreachable: {error}") }),
            ),
        })
    }

    fn metrics(&self, format: metrics::Format) -> Outcome {
        let mut snapshot = self.stats.snapshot();
        snapshot.broker = self.health().ok();
        if snapshot.broker.is_some() {
            snapshot.worker_counters = self.worker_counters();
        }
        snapshot.link = self.broker.link_status();
        Outcome::Reply(HttpReply::text(
            200,
            format.content_type(),
            metrics::render(&snapshot, format),
        ))
    }
}

fn dashboard() -> Outcome {
    Outcome::Reply(
        HttpReply::text(200, HTML, DASHBOARD.to_owned())
            .with_header("Content-Security-Policy", DASHBOARD_CSP.to_owned()),
    )
}

/// True when a request's `Accept` header prefers a page to JSON: a browser opening a
/// run's link (`$JOBZ_FRONTEND/runs/$JOBZ_RUN_ID`) gets the dashboard's run page, while
/// scripts (`*/*`, `application/json`, no header) keep getting JSON.
pub fn wants_html(accept: Option<&str>) -> bool {
    let Some(accept) = accept else {
        return false;
    };
    let position = |wanted: &str| {
        accept.split(',').position(|part| {
            let media = part.split(';').next().unwrap_or("").trim();
            media.eq_ignore_ascii_case(wanted)
        })
    };
    match (position("text/html"), position("application/json")) {
        (Some(html), Some(json)) => html < json,
        (Some(_), None) => true,
        (None, _) => false,
    }
}

/// The answer to a request that cannot be served.
fn refusal(invalid: &Invalid) -> HttpReply {
    let error = &invalid.error;
    let reply = HttpReply::error(error.status(), &error.to_string(), &error.details());
    match error.allow() {
        Some(allow) => reply.with_header("Allow", allow.to_owned()),
        None => reply,
    }
}

fn unknown_run(run_id: &str) -> HttpReply {
    HttpReply::error(404, "unknown run", &[("run_id", json!(run_id))])
}

fn broker_error(error: &ClientError) -> HttpReply {
    match error {
        ClientError::Timeout(_) | ClientError::Closed => {
            HttpReply::error(503, &format!("broker unreachable: {error}"), &[])
        }
        ClientError::Encode(_) => HttpReply::error(
            400,
            &format!("request too large for the broker: {error}"),
            &[],
        ),
    }
}

/// The broker's refusal as an HTTP error (a status outside 4xx/5xx is the broker's
/// fault: 502), naming what it was about.
fn rejected(status: u16, error: &str, about: (&str, Value)) -> HttpReply {
    let status = if (400..=599).contains(&status) {
        status
    } else {
        502
    };
    HttpReply::error(status, error, &[about])
}

fn reply_kind(body: &ReplyBody) -> &'static str {
    match body {
        ReplyBody::Welcome { .. } => "Welcome",
        ReplyBody::Ack => "Ack",
        ReplyBody::Accepted { .. } => "Accepted",
        ReplyBody::Rejected { .. } => "Rejected",
        ReplyBody::Run(_) => "Run",
        ReplyBody::Runs(_) => "Runs",
        ReplyBody::Jobs(_) => "Jobs",
        ReplyBody::Workers(_) => "Workers",
        ReplyBody::Health(_) => "Health",
        ReplyBody::Dead(_) => "Dead",
        ReplyBody::Completions(_) => "Completions",
        ReplyBody::Semaphores(_) => "Semaphores",
        ReplyBody::Schedules(_) => "Schedules",
        ReplyBody::Resources(_) => "Resources",
        ReplyBody::ResourceGraph(_) => "ResourceGraph",
        ReplyBody::TaskOutput(_) => "TaskOutput",
        ReplyBody::Feed(_) => "Feed",
        ReplyBody::JobStats(_) => "JobStats",
    }
}

fn unexpected(body: &ReplyBody) -> HttpReply {
    if let ReplyBody::Rejected { status, error } = body {
        let status = if (400..=599).contains(status) {
            *status
        } else {
            502
        };
        return HttpReply::error(status, error, &[]);
    }
    let kind = reply_kind(body);
    warn!(reply = kind, "unexpected answer from the broker");
    HttpReply::error(
        502,
        &format!("unexpected answer from the broker: {kind}"),
        &[],
    )
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use jobz::jobfile::{Delivery, JobSpec};
    use jobz::message::{HealthView, JobView, Params, RunState, StepView, TaskState, WorkerView};

    use super::*;
    use crate::broker::fake::FakeBroker;

    fn new_api(broker: FakeBroker) -> (Api, Arc<FakeBroker>) {
        let broker = Arc::new(broker);
        (Api::new(broker.clone(), Duration::from_secs(5)), broker)
    }

    fn get(api: &Api, target: &str) -> Outcome {
        send(api, Method::Get, target)
    }

    fn send(api: &Api, method: Method, target: &str) -> Outcome {
        api.handle(crate::route::parse(&method, target).route)
    }

    fn reply(outcome: Outcome) -> HttpReply {
        match outcome {
            Outcome::Reply(r) => r,
            other => panic!("expected a reply, got {other:?}"),
        }
    }

    fn body(reply: &HttpReply) -> Value {
        assert_eq!(reply.content_type, JSON);
        let v: Value = serde_json::from_slice(&reply.body).unwrap();
        assert!(v.is_object(), "every JSON answer is an object");
        v
    }

    fn accepting() -> FakeBroker {
        FakeBroker::new(|m| match m {
            Message::Trigger(_) => Ok(ReplyBody::Accepted {
                run_id: "run-1".into(),
            }),
            other => panic!("unexpected {other:?}"),
        })
    }

    fn sample_run(state: RunState) -> RunView {
        RunView {
            run_id: "run-1".into(),
            job: "build".into(),
            params: Params::new(),
            state,
            parent_runs: vec![],
            created_at_ms: 1_000,
            finished_at_ms: None,
            steps: vec![StepView {
                step_id: "s".into(),
                task_id: "t".into(),
                job: "build".into(),
                worker: Some("w1".into()),
                state: TaskState::Succeeded,
                attempt: 1,
                exit_code: Some(0),
                error: None,
                started_at_ms: Some(1_000),
                finished_at_ms: Some(2_000),
                output_tail: "hello\n".into(),
            }],
            attempts: vec![],
            ..Default::default()
        }
    }

    fn job_view(name: &str, tags: &[&str]) -> JobView {
        JobView {
            spec: JobSpec {
                name: name.into(),
                description: String::new(),
                command: "true".into(),
                params: BTreeMap::new(),
                on_success: vec![],
                on_failure: vec![],
                delivery: Delivery::Broadcast,
                timeout_ms: None,
                retries: 0,
                retry_backoff_ms: 10,
                tags: tags.iter().map(|t| t.to_string()).collect(),
                run_as: None,
                priority: 0,
                max_concurrency: None,
                inputs: vec![],
                outputs: vec![],
                output_ttl_ms: None,
                notify: vec![],
            },
            workers: vec!["w1".into()],
        }
    }

    #[test]
    fn json_answers_end_with_a_newline() {
        let reply = HttpReply::json(200, &json!({"a": 1}));
        assert_eq!(reply.body, b"{\"a\":1}\n");
        assert!(HttpReply::error(404, "no", &[]).body.ends_with(b"}\n"));
    }

    #[test]
    fn with_a_public_url_answers_give_absolute_urls_under_it() {
        let (mut api, _) = new_api(accepting());
        api.public_base = parse_public_url("https://example.com/jobz/").unwrap();
        let r = reply(get(&api, "/job_start?job_name=import"));
        assert_eq!(r.status, 202);
        assert_eq!(
            body(&r)["status_url"],
            json!("https://example.com/jobz/runs/run-1")
        );
        assert!(r
            .headers
            .contains(&("Location", "https://example.com/jobz/runs/run-1".into())));
    }

    #[test]
    fn a_public_url_must_be_http_with_a_host_and_no_query() {
        assert_eq!(
            parse_public_url("http://front:6769").as_deref(),
            Ok("http://front:6769")
        );
        for bad in [
            "front:6769",
            "ftp://front",
            "https://",
            "https:///runs",
            "https://front/?x=1",
            "https://front/#top",
            "https://fr ont",
            "https://front/\n",
        ] {
            assert!(parse_public_url(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn job_start_sends_every_other_key_as_a_parameter() {
        let (api, broker) = new_api(accepting());
        let r = reply(get(
            &api,
            "/job_start?job_name=import&date=2026_01_02&note=%24%28id%29+x",
        ));
        assert_eq!(r.status, 202);
        assert_eq!(
            body(&r),
            json!({"run_id": "run-1", "job": "import", "status_url": "/runs/run-1"})
        );
        assert!(r.headers.contains(&("Location", "/runs/run-1".into())));
        assert_eq!(
            broker.seen(),
            vec![Message::Trigger(TriggerRequest {
                job: "import".into(),
                params: BTreeMap::from([
                    ("date".into(), "2026_01_02".into()),
                    ("note".into(), "$(id) x".into()),
                ]),
                ..Default::default()
            })]
        );
    }

    #[test]
    fn job_start_passes_hostile_values_verbatim_to_the_broker() {
        let (api, broker) = new_api(accepting());
        let long = "v".repeat(7_000);
        let target =
            format!("/job_start?job_name=j&a=%3Brm+-rf+%2F&b=%60id%60&c=%27%22&d=x%0Ay&e={long}");
        assert_eq!(reply(get(&api, &target)).status, 202);
        let Message::Trigger(t) = &broker.seen()[0] else {
            panic!()
        };
        assert_eq!(t.params["a"], ";rm -rf /");
        assert_eq!(t.params["b"], "`id`");
        assert_eq!(t.params["c"], "'\"");
        assert_eq!(t.params["d"], "x\ny");
        assert_eq!(t.params["e"], long);
    }

    /// The whole table of bad queries is in `route`'s tests; here, that a few of them
    /// are answered as JSON and never reach the broker.
    #[test]
    fn bad_queries_are_refused_before_reaching_the_broker() {
        let (api, broker) = new_api(accepting());
        for (target, status, needle) in [
            ("/job_start?job_name=a&x=1&x=1", 400, "more than once"),
            ("/job_start?job_name=%ff", 400, "not valid UTF-8"),
            ("/job_start?job_name=a&wait=", 400, "wait must be"),
        ] {
            let r = reply(get(&api, target));
            assert_eq!(r.status, status, "{target}");
            let b = body(&r);
            let error = b["error"].as_str().unwrap();
            assert!(error.contains(needle), "{target}: {error}");
        }
        assert!(broker.seen().is_empty());
    }

    #[test]
    fn overlong_target_is_414() {
        let (api, broker) = new_api(accepting());
        let target = format!(
            "/job_start?job_name=a&v={}",
            "x".repeat(crate::query::MAX_TARGET_BYTES)
        );
        let r = reply(get(&api, &target));
        assert_eq!(r.status, 414);
        assert!(body(&r)["error"].as_str().unwrap().contains("exceeds"));
        assert!(broker.seen().is_empty());
    }

    #[test]
    fn wait_returns_a_wait_outcome_and_zero_means_no_wait() {
        let (api, _) = new_api(accepting());
        match get(&api, "/job_start?job_name=a&wait=2.5") {
            Outcome::Wait(w) => {
                assert_eq!(w.run_id, "run-1");
                assert_eq!(w.job, "a");
                assert_eq!(w.wait, Duration::from_millis(2500));
                assert_eq!(w.accepted.status, 202);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(reply(get(&api, "/job_start?job_name=a&wait=0")).status, 202);
        assert!(matches!(
            get(&api, "/job_start?job_name=a&wait=3600"),
            Outcome::Wait(_)
        ));
    }

    #[test]
    fn rejection_keeps_the_brokers_status_and_names_the_job() {
        let (api, _) = new_api(FakeBroker::new(|_| {
            Ok(ReplyBody::Rejected {
                status: 404,
                error: "unknown job \"nope\"".into(),
            })
        }));
        let r = reply(get(&api, "/job_start?job_name=nope"));
        assert_eq!(r.status, 404);
        assert_eq!(
            body(&r),
            json!({"error": "unknown job \"nope\"", "job": "nope"})
        );
    }

    #[test]
    fn rejection_with_a_non_error_status_becomes_502() {
        let (api, _) = new_api(FakeBroker::new(|_| {
            Ok(ReplyBody::Rejected {
                status: 200,
                error: "odd".into(),
            })
        }));
        assert_eq!(reply(get(&api, "/job_start?job_name=a")).status, 502);
    }

    #[test]
    fn broker_timeout_is_503() {
        let (api, _) = new_api(FakeBroker::down());
        let r = reply(get(&api, "/job_start?job_name=a"));
        assert_eq!(r.status, 503);
        assert!(body(&r)["error"]
            .as_str()
            .unwrap()
            .starts_with("broker unreachable"));
        assert_eq!(reply(get(&api, "/runs")).status, 503);
        assert_eq!(reply(get(&api, "/runs/x")).status, 503);
        assert_eq!(reply(get(&api, "/jobs")).status, 503);
    }

    #[test]
    fn trigger_is_not_sent_before_the_broker_ever_answered() {
        let mut fake = accepting();
        fake.connected = false;
        let (api, broker) = new_api(fake);
        let r = reply(get(&api, "/job_start?job_name=a"));
        assert_eq!(r.status, 503);
        assert!(body(&r)["error"]
            .as_str()
            .unwrap()
            .contains("nothing was sent"));
        assert!(broker.seen().is_empty());
    }

    #[test]
    fn only_get_and_head_are_allowed_and_head_never_triggers() {
        let (api, broker) = new_api(accepting());
        let put = send(&api, Method::Other("PUT".into()), "/job_start?job_name=a");
        let r = reply(put);
        assert_eq!(r.status, 405);
        assert!(r.headers.contains(&("Allow", "GET, POST".into())));
        let head = send(&api, Method::Head, "/job_start?job_name=a");
        let r = reply(head);
        assert_eq!(r.status, 405);
        assert!(r.headers.contains(&("Allow", "GET, POST".into())));
        assert!(broker.seen().is_empty());
        let head = send(&api, Method::Head, "/");
        assert_eq!(reply(head).status, 200);
    }

    #[test]
    fn unknown_paths_are_404_json() {
        let (api, _) = new_api(accepting());
        for target in ["/nope", "/runs/a/b", "/runs/a/log/x", "/job_start/x"] {
            let r = reply(get(&api, target));
            assert_eq!(r.status, 404, "{target}");
            assert_eq!(body(&r)["error"], "no such endpoint");
        }
        let r = reply(get(&api, "/%2e%2e/etc"));
        assert_eq!(r.status, 400);
        assert!(body(&r)["error"].as_str().unwrap().contains("'..'"));
    }

    #[test]
    fn gets_a_run_or_404() {
        let (api, broker) = new_api(FakeBroker::new(|m| match m {
            Message::Query(Query::Run { run_id }) if run_id == "run-1" => {
                Ok(ReplyBody::Run(Some(sample_run(RunState::Succeeded))))
            }
            Message::Query(Query::Run { .. }) => Ok(ReplyBody::Run(None)),
            other => panic!("{other:?}"),
        }));
        let r = reply(get(&api, "/runs/run-1"));
        assert_eq!(r.status, 200);
        let b = body(&r);
        assert_eq!(b["state"], "succeeded");
        assert_eq!(b["steps"][0]["worker"], "w1");
        let r = reply(get(&api, "/runs/other"));
        assert_eq!(r.status, 404);
        assert_eq!(body(&r), json!({"error": "unknown run", "run_id": "other"}));
        assert_eq!(reply(get(&api, "/runs/run-1?x=1")).status, 400);
        assert_eq!(broker.seen().len(), 2);
    }

    #[test]
    fn lists_runs_with_filters() {
        let (api, broker) = new_api(FakeBroker::new(|m| match m {
            Message::Query(Query::Runs(_)) => {
                Ok(ReplyBody::Runs(vec![sample_run(RunState::Running)]))
            }
            other => panic!("{other:?}"),
        }));
        let r = reply(get(&api, "/runs"));
        assert_eq!(r.status, 200);
        let b = body(&r);
        assert_eq!(b["runs"][0]["run_id"], "run-1");
        assert_eq!(b["runs"][0]["steps"], json!([]));
        let r = reply(get(&api, "/runs?job=build&state=failed&limit=1000"));
        assert_eq!(r.status, 200);
        assert_eq!(
            broker.seen(),
            vec![
                Message::Query(Query::Runs(RunFilter {
                    job: None,
                    state: None,
                    limit: crate::route::DEFAULT_RUN_LIMIT,
                    ..Default::default()
                })),
                Message::Query(Query::Runs(RunFilter {
                    job: Some("build".into()),
                    state: Some(RunState::Failed),
                    limit: 1000,
                    ..Default::default()
                })),
            ]
        );
        for target in [
            "/runs?state=bogus",
            "/runs?limit=0",
            "/runs?limit=1001",
            "/runs?limit=ten",
            "/runs?limit=-1",
            "/runs?stat=failed",
        ] {
            assert_eq!(reply(get(&api, target)).status, 400, "{target}");
        }
        assert_eq!(broker.seen().len(), 2);
    }

    #[test]
    fn tag_and_tracked_filters_go_to_the_broker() {
        let (api, broker) = new_api(FakeBroker::new(|m| match m {
            Message::Query(Query::Runs(_)) => Ok(ReplyBody::Runs(vec![])),
            other => panic!("{other:?}"),
        }));
        let b = body(&reply(get(
            &api,
            "/runs?tag=etl&tracked=1&limit=4&worker=w1&before=r9\
             &since=2026-12-01T00:00:00Z&until=2026-12-02T00:00:00Z",
        )));
        assert_eq!(b, json!({"runs": [], "next": null}));
        assert_eq!(
            broker.seen(),
            vec![Message::Query(Query::Runs(RunFilter {
                job: None,
                state: None,
                limit: 4,
                tag: Some("etl".into()),
                tracked: Some(true),
                worker: Some("w1".into()),
                before: Some("r9".into()),
                since_ms: Some(1_796_083_200_000),
                until_ms: Some(1_796_169_600_000),
            }))]
        );
        let bad = reply(get(&api, "/runs?since=yesterday"));
        assert_eq!(bad.status, 400);
    }

    #[test]
    fn job_start_passes_the_run_options_to_the_broker() {
        let (api, broker) = new_api(accepting());
        let target = "/job_start?job_name=a&priority=5&delay=2s&depends=r1,r2&tags=x";
        assert_eq!(reply(get(&api, target)).status, 202);
        let Message::Trigger(t) = &broker.seen()[0] else {
            panic!()
        };
        assert_eq!(
            (t.priority, t.delay_ms, t.at_ms),
            (Some(5), Some(2_000), None)
        );
        assert_eq!(
            (t.depends.clone(), t.tags.clone()),
            (
                vec!["r1".to_string(), "r2".to_string()],
                vec!["x".to_string()]
            )
        );
        assert!(t.params.is_empty(), "no option is a parameter");
    }

    #[test]
    fn run_control_answers_with_the_run_or_the_brokers_refusal() {
        let (api, broker) = new_api(FakeBroker::new(|m| match m {
            Message::CancelRun { run_id, .. } if run_id == "run-1" => {
                Ok(ReplyBody::Run(Some(sample_run(RunState::Cancelled))))
            }
            Message::CancelRun { run_id, .. } if run_id == "busy" => Ok(ReplyBody::Rejected {
                status: 409,
                error: "runs wait for run busy: r2".into(),
            }),
            Message::CancelRun { .. } => Ok(ReplyBody::Run(None)),
            Message::PrioritizeRun { .. } | Message::TrackRun { .. } => {
                Ok(ReplyBody::Run(Some(sample_run(RunState::Waiting))))
            }
            other => panic!("{other:?}"),
        }));
        let r = reply(send(&api, Method::Post, "/runs/run-1/cancel?force=1"));
        assert_eq!(r.status, 200);
        assert_eq!(body(&r)["state"], "cancelled");
        let r = reply(send(&api, Method::Post, "/runs/busy/cancel"));
        assert_eq!(r.status, 409);
        assert_eq!(body(&r)["run_id"], "busy");
        assert_eq!(
            reply(send(&api, Method::Post, "/runs/nope/cancel")).status,
            404
        );
        assert_eq!(
            reply(send(&api, Method::Post, "/runs/run-1/priority?value=3")).status,
            200
        );
        assert_eq!(
            reply(send(&api, Method::Post, "/runs/run-1/untrack")).status,
            200
        );
        // GET on a POST endpoint reaches nothing.
        let r = reply(get(&api, "/runs/run-1/cancel"));
        assert_eq!(r.status, 405);
        assert!(r.headers.contains(&("Allow", "POST".into())));
        assert_eq!(
            broker.seen(),
            vec![
                Message::CancelRun {
                    run_id: "run-1".into(),
                    force: true
                },
                Message::CancelRun {
                    run_id: "busy".into(),
                    force: false
                },
                Message::CancelRun {
                    run_id: "nope".into(),
                    force: false
                },
                Message::PrioritizeRun {
                    run_id: "run-1".into(),
                    priority: 3
                },
                Message::TrackRun {
                    run_id: "run-1".into(),
                    tracked: false,
                    notify: vec![],
                },
            ]
        );
    }

    #[test]
    fn log_is_text_and_follow_hands_over_the_run() {
        let (api, _) = new_api(FakeBroker::new(|m| match m {
            Message::Query(Query::Run { run_id }) if run_id == "run-1" => {
                Ok(ReplyBody::Run(Some(sample_run(RunState::Running))))
            }
            Message::Query(Query::Run { .. }) => Ok(ReplyBody::Run(None)),
            other => panic!("{other:?}"),
        }));
        let r = reply(get(&api, "/runs/run-1/log"));
        assert_eq!((r.status, r.content_type), (200, TEXT));
        assert_eq!(String::from_utf8(r.body).unwrap(), "[w1 build] hello\n");
        assert!(
            matches!(get(&api, "/runs/run-1/log?follow=1"), Outcome::Follow(run) if run.run_id == "run-1")
        );
        assert!(matches!(
            get(&api, "/runs/run-1/log?follow=0"),
            Outcome::Reply(_)
        ));
        // HEAD never streams.
        let head = send(&api, Method::Head, "/runs/run-1/log?follow=1");
        assert!(matches!(head, Outcome::Reply(_)));
        assert_eq!(reply(get(&api, "/runs/run-1/log?follow=maybe")).status, 400);
        assert_eq!(reply(get(&api, "/runs/nope/log")).status, 404);
    }

    #[test]
    fn lists_jobs_and_workers() {
        let (api, _) = new_api(FakeBroker::new(|m| match m {
            Message::Query(Query::Jobs) => Ok(ReplyBody::Jobs(vec![job_view("a", &[])])),
            Message::Query(Query::Workers) => Ok(ReplyBody::Workers(vec![WorkerView {
                name: "w1".into(),
                jobs: vec!["a".into()],
                capabilities: vec![],
                slots: 2,
                running: 0,
                last_seen_ms: 0,
                live: false,
                version: "1".into(),
                counters: Default::default(),
                leaving: false,
            }])),
            other => panic!("{other:?}"),
        }));
        let b = body(&reply(get(&api, "/jobs")));
        assert_eq!(b["jobs"][0]["name"], "a");
        assert_eq!(b["jobs"][0]["workers"], json!(["w1"]));
        let b = body(&reply(get(&api, "/workers")));
        assert_eq!(b["workers"][0]["last_seen"], "1970-01-01T00:00:00.000Z");
        assert_eq!(b["workers"][0]["live"], false);
    }

    fn healthy() -> FakeBroker {
        FakeBroker::new(|m| match m {
            Message::Query(Query::Health) => Ok(ReplyBody::Health(HealthView {
                version: "0.0.0".into(),
                instance: "b1".into(),
                counters: BTreeMap::from([("frames_received".into(), 7)]),
                active_runs: 1,
                live_workers: 2,
                ..Default::default()
            })),
            Message::Query(Query::Workers) => Ok(ReplyBody::Workers(vec![WorkerView {
                name: "w1".into(),
                jobs: vec![],
                capabilities: vec![],
                slots: 2,
                running: 0,
                last_seen_ms: 0,
                live: true,
                version: "1".into(),
                counters: BTreeMap::from([("output_files_pruned".into(), 4)]),
                leaving: false,
            }])),
            other => panic!("{other:?}"),
        })
    }

    #[test]
    fn healthz_reports_the_broker_or_503() {
        let (api, _) = new_api(healthy());
        let r = reply(get(&api, "/healthz"));
        assert_eq!(r.status, 200);
        let b = body(&r);
        assert_eq!(b["status"], "ok");
        assert_eq!(b["broker"]["live_workers"], 2);
        let (api, _) = new_api(FakeBroker::down());
        let r = reply(get(&api, "/healthz"));
        assert_eq!(r.status, 503);
        assert_eq!(body(&r)["status"], "unavailable");
    }

    #[test]
    fn metrics_show_broker_counters_and_own_requests() {
        let (api, _) = new_api(healthy());
        api.stats.record(202);
        let r = reply(get(&api, "/metrics"));
        assert_eq!(
            (r.status, r.content_type),
            (200, "text/plain; version=0.0.4; charset=utf-8")
        );
        let text = String::from_utf8(r.body).unwrap();
        assert!(text.contains("jobz_broker_up 1\n"));
        assert!(text.contains("jobz_broker_frames_received_total 7\n"));
        assert!(text.contains("jobz_worker_output_files_pruned_total{worker=\"w1\"} 4\n"));
        assert!(text.contains("jobz_frontend_http_requests_total{code=\"202\"} 1\n"));
        let (api, _) = new_api(FakeBroker::down());
        let text = String::from_utf8(reply(get(&api, "/metrics")).body).unwrap();
        assert!(text.contains("jobz_broker_up 0\n"));
    }

    #[test]
    fn a_browser_asking_for_a_page_gets_html_and_scripts_get_json() {
        let chromium = "text/html,application/xhtml+xml,application/xml;q=0.9,\
                        image/avif,image/webp,*/*;q=0.8";
        assert!(wants_html(Some(chromium)));
        assert!(wants_html(Some("TEXT/HTML")));
        for script in [
            None,
            Some("*/*"),
            Some("application/json"),
            Some("application/json, text/html"),
            Some("text/plain"),
        ] {
            assert!(!wants_html(script), "{script:?}");
        }
    }

    #[test]
    fn dashboard_is_self_contained_html() {
        let (api, _) = new_api(accepting());
        let r = reply(get(&api, "/"));
        assert_eq!((r.status, r.content_type), (200, HTML));
        assert!(r
            .headers
            .iter()
            .any(|(k, v)| *k == "Content-Security-Policy" && v.contains("default-src 'none'")));
        let page = String::from_utf8(r.body).unwrap();
        assert!(page.contains("new EventSource(\"/events\")"));
        for banned in [
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "src=\"http",
            "href=\"http",
            "eval(",
        ] {
            assert!(!page.contains(banned), "dashboard uses {banned}");
        }
    }
}
