//! What a request asks for, decided once: the method and the raw request target become a
//! typed [`Route`] (or an [`Invalid`] request), and everything after this reads that value.
//!
//! The gate takes the scope from [`Parsed::scope`] and the handlers take the [`Route`], so
//! the two can never disagree about which endpoint a target names: no other code reads the
//! raw target. (They once did: the gate read `/job%5Fstart` as a read-only path while the
//! router decoded it to `/job_start` and started the job.)
//!
//! The rules for the target:
//! - at most [`MAX_TARGET_BYTES`] (414);
//! - origin-form `/path?query`, or absolute-form `http://authority/path?query` (scheme in
//!   any case; RFC 9112 §3.2.2 makes servers accept it), whose authority is dropped: it
//!   must be non-empty and hold no `@` (user info). Anything else is 400;
//! - no `#`: a fragment never belongs in a request target (400);
//! - path segments are percent-decoded strictly (see [`crate::query`]), so `/job%5Fstart`
//!   *is* `/job_start`, for the scope as for the handler;
//! - refused with 400: an empty segment (`//`, except one trailing `/`), a `.` or `..`
//!   segment (encoded or not), a segment holding `/` or `\` after decoding (`%2F`, `%5C`),
//!   and control characters;
//! - the query is parsed strictly ([`crate::query::parse_query`]) and each endpoint takes
//!   only its own parameters.
//!
//! Methods: reads and `/job_start` (SPEC) take `GET` and `HEAD` (which never starts
//! anything); what changes a run takes `POST` only, its arguments in the query string
//! (`POST /runs/{id}/cancel`, `/priority`, `/track`, `/untrack`). Any other method, or a
//! method an endpoint does not take, is 405 with the endpoint's `Allow`.

use std::time::Duration;

use jobz::jobfile::NotifyTarget;
use jobz::message::{
    is_valid_idempotency_key, Params, ResourceAction, RunState, MAX_IDEMPOTENCY_KEY,
};
use serde_json::{json, Value};
use thiserror::Error;

use crate::auth::Scope;
use crate::events::EventFilter;
use crate::query::{decode, parse_query, QueryParams, TargetError, MAX_TARGET_BYTES};

/// Longest `wait=` accepted, in seconds.
pub const MAX_WAIT_SECS: f64 = 3600.0;

/// Runs listed when `limit` is not given.
pub const DEFAULT_RUN_LIMIT: u32 = 50;

/// Most runs one list may hold.
pub const MAX_RUN_LIMIT: u32 = 1000;

/// Days `/stats` covers when `days` is not given.
pub const DEFAULT_STATS_DAYS: u32 = 14;

/// Most days `/stats` covers.
pub const MAX_STATS_DAYS: u32 = 90;

/// Dead tasks listed when `limit` is not given.
pub const DEFAULT_DEAD_LIMIT: u32 = 50;

/// Most dead tasks one list may hold.
pub const MAX_DEAD_LIMIT: u32 = 1000;

/// How much of a path goes into a log line.
const LOG_PATH_CHARS: usize = 200;

/// The request method.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Method {
    /// `GET`.
    Get,
    /// `HEAD`: answered like `GET`; the server drops the body. Never starts anything.
    Head,
    /// `POST`: only what changes a run, with an empty body.
    Post,
    /// Anything else: refused with 405.
    Other(String),
}

impl Method {
    /// The method's name, for logs.
    pub fn as_str(&self) -> &str {
        match self {
            Method::Get => "GET",
            Method::Head => "HEAD",
            Method::Post => "POST",
            Method::Other(other) => other,
        }
    }
}

/// The endpoints, without their arguments: what decides the scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `/`.
    Dashboard,
    /// `/job_start`.
    JobStart,
    /// `/runs`.
    Runs,
    /// `/runs/{id}`.
    Run,
    /// `/runs/{id}/log`.
    RunLog,
    /// `/runs/{id}/tasks/{task}/attempts/{n}/log`.
    AttemptLog,
    /// `POST /runs/{id}/cancel`.
    CancelRun,
    /// `POST /runs/{id}/priority`.
    PrioritizeRun,
    /// `POST /runs/{id}/track`.
    TrackRun,
    /// `POST /runs/{id}/untrack`.
    UntrackRun,
    /// `/jobs`.
    Jobs,
    /// `/workers`.
    Workers,
    /// `/dead`.
    Dead,
    /// `/dead/{task}/retry`.
    RetryDead,
    /// `/semaphores`.
    Semaphores,
    /// `/schedules`.
    Schedules,
    /// `/resources`.
    Resources,
    /// `POST /resources/{name}?action=create|clear`.
    ControlResource,
    /// `POST /workers/{name}?action=forget`.
    ForgetWorker,
    /// `/graph?format=dot`.
    Graph,
    /// `/healthz`.
    Healthz,
    /// `/metrics`.
    Metrics,
    /// `/events`: Server-Sent Events.
    Events,
    /// `/stats?job=J&days=N`.
    Stats,
}

impl Endpoint {
    /// The scope a token needs here; `None` for the open `/healthz`.
    pub fn scope(self) -> Option<Scope> {
        match self {
            Endpoint::Healthz => None,
            // What one could trigger, one may delay, cancel and watch.
            Endpoint::JobStart
            | Endpoint::CancelRun
            | Endpoint::TrackRun
            | Endpoint::UntrackRun => Some(Scope::Trigger),
            // Reordering the line, or making data exist or vanish, affects everybody's runs.
            Endpoint::RetryDead
            | Endpoint::PrioritizeRun
            | Endpoint::ControlResource
            | Endpoint::ForgetWorker => Some(Scope::Admin),
            Endpoint::Dashboard
            | Endpoint::Runs
            | Endpoint::Run
            | Endpoint::RunLog
            | Endpoint::AttemptLog
            | Endpoint::Jobs
            | Endpoint::Workers
            | Endpoint::Dead
            | Endpoint::Semaphores
            | Endpoint::Schedules
            | Endpoint::Resources
            | Endpoint::Graph
            | Endpoint::Events
            | Endpoint::Stats
            | Endpoint::Metrics => Some(Scope::Read),
        }
    }

    /// True for what the open health listener serves.
    pub fn is_health(self) -> bool {
        matches!(self, Endpoint::Healthz | Endpoint::Metrics)
    }

    /// True for what changes a run: `POST` only, guarded against cross-site requests
    /// ([`crate::security::guard_post`]).
    pub fn is_post(self) -> bool {
        matches!(
            self,
            Endpoint::CancelRun
                | Endpoint::PrioritizeRun
                | Endpoint::TrackRun
                | Endpoint::UntrackRun
                | Endpoint::ControlResource
                | Endpoint::ForgetWorker
        )
    }

    /// The methods it takes (its `Allow` header).
    pub fn allow(self) -> &'static str {
        match self {
            _ if self.is_post() => "POST",
            // HEAD must not start anything (link checkers and proxies send it freely); the
            // dashboard starts and retries with POST, which the CSRF guard covers.
            Endpoint::JobStart | Endpoint::RetryDead => "GET, POST",
            // A stream: nothing to say to HEAD.
            Endpoint::Events => "GET",
            _ => "GET, HEAD",
        }
    }
}

/// `GET /job_start?job_name=J&k=v…`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobStart {
    /// The job.
    pub job: String,
    /// Every other parameter but the reserved ones, for the job.
    pub params: Params,
    /// `wait=SECONDS`, when given and not zero.
    pub wait: Option<Duration>,
    /// `priority=N`: before lower ones in the waiting line.
    pub priority: Option<i32>,
    /// `delay=DURATION`: start no earlier than this long from now (the broker's now).
    pub delay: Option<Duration>,
    /// `at=RFC3339`: start no earlier than this time, ms since the epoch.
    pub at_ms: Option<i64>,
    /// `depends=RUN_ID[,RUN_ID…]`: start once all of these have succeeded.
    pub depends: Vec<String>,
    /// `tags=a,b`: labels added to the job's own.
    pub tags: Vec<String>,
    /// `idempotency_key=K` (or the `Idempotency-Key` header, [`with_idempotency_header`]):
    /// the same key for the same job within a day gets the same run.
    pub idempotency_key: Option<String>,
}

/// `GET /runs?job=&state=&tag=&tracked=&limit=`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunsQuery {
    /// Only runs of this job.
    pub job: Option<String>,
    /// Only runs in this state.
    pub state: Option<RunState>,
    /// Only runs with this tag (their job's or their trigger's).
    pub tag: Option<String>,
    /// Only tracked (or untracked) runs.
    pub tracked: Option<bool>,
    /// At most this many.
    pub limit: u32,
    /// Only runs with a task on this worker.
    pub worker: Option<String>,
    /// The next page: runs listed after this run id (a list's `next`).
    pub before: Option<String>,
    /// Only runs accepted at or after this time (`since=RFC3339`), ms since the epoch.
    pub since_ms: Option<i64>,
    /// Only runs accepted before this time (`until=RFC3339`).
    pub until_ms: Option<i64>,
}

/// A request the handlers serve, with its arguments parsed.
#[derive(Debug, Clone, PartialEq)]
pub enum Route {
    /// The dashboard page.
    Dashboard,
    /// Start a run.
    JobStart(JobStart),
    /// List runs.
    Runs(RunsQuery),
    /// One run.
    Run {
        /// Its id.
        run_id: String,
    },
    /// One run's log.
    RunLog {
        /// Its id.
        run_id: String,
        /// Stream it until the run ends (never for `HEAD`).
        follow: bool,
    },
    /// One attempt's output.
    AttemptLog {
        /// The run.
        run_id: String,
        /// The task.
        task_id: String,
        /// The attempt, from 1.
        attempt: u32,
    },
    /// Known jobs.
    Jobs,
    /// Known workers.
    Workers,
    /// Tasks that failed for good.
    Dead {
        /// At most this many.
        limit: u32,
    },
    /// Run a dead task's job again.
    RetryDead {
        /// The dead task.
        task_id: String,
    },
    /// Cancel a run.
    CancelRun {
        /// Its id.
        run_id: String,
        /// `force=1`: even though other runs wait for it (they fail).
        force: bool,
    },
    /// Change an unfinished run's priority.
    PrioritizeRun {
        /// Its id.
        run_id: String,
        /// `value=N`.
        priority: i32,
    },
    /// Mark a run tracked (`/track`) or not (`/untrack`).
    TrackRun {
        /// Its id.
        run_id: String,
        /// Tracked from now on.
        tracked: bool,
        /// `notify=`: told when it ends (`/track` only).
        notify: Vec<NotifyTarget>,
    },
    /// Barrier keys.
    Semaphores,
    /// Schedules, their next and last slots.
    Schedules,
    /// Resources written, held or waited for.
    Resources,
    /// An operator creates or clears a resource.
    ControlResource {
        /// Its name.
        name: String,
        /// `action=create|clear`.
        action: ResourceAction,
    },
    /// An operator forgets a lost or leaving worker (`action=forget`).
    ForgetWorker {
        /// Its name.
        name: String,
    },
    /// The lineage graph (`format=dot`: Graphviz text; else JSON edges).
    Graph {
        /// DOT text rather than JSON.
        dot: bool,
    },
    /// Liveness.
    Healthz,
    /// Prometheus metrics.
    Metrics {
        /// OpenMetrics text rather than the Prometheus text format (the `Accept` header).
        openmetrics: bool,
    },
    /// The feed of run and task changes, as Server-Sent Events.
    Events(EventFilter),
    /// A job's tasks per day over the last `days` days.
    Stats {
        /// The job.
        job: String,
        /// How many days back, from 1 to [`MAX_STATS_DAYS`].
        days: u32,
    },
}

impl Route {
    /// The endpoint, without arguments.
    pub fn endpoint(&self) -> Endpoint {
        match self {
            Route::Dashboard => Endpoint::Dashboard,
            Route::JobStart(_) => Endpoint::JobStart,
            Route::Runs(_) => Endpoint::Runs,
            Route::Run { .. } => Endpoint::Run,
            Route::RunLog { .. } => Endpoint::RunLog,
            Route::AttemptLog { .. } => Endpoint::AttemptLog,
            Route::Jobs => Endpoint::Jobs,
            Route::Workers => Endpoint::Workers,
            Route::Dead { .. } => Endpoint::Dead,
            Route::RetryDead { .. } => Endpoint::RetryDead,
            Route::CancelRun { .. } => Endpoint::CancelRun,
            Route::PrioritizeRun { .. } => Endpoint::PrioritizeRun,
            Route::TrackRun { tracked: true, .. } => Endpoint::TrackRun,
            Route::TrackRun { tracked: false, .. } => Endpoint::UntrackRun,
            Route::Semaphores => Endpoint::Semaphores,
            Route::Schedules => Endpoint::Schedules,
            Route::Resources => Endpoint::Resources,
            Route::ControlResource { .. } => Endpoint::ControlResource,
            Route::ForgetWorker { .. } => Endpoint::ForgetWorker,
            Route::Graph { .. } => Endpoint::Graph,
            Route::Healthz => Endpoint::Healthz,
            Route::Metrics { .. } => Endpoint::Metrics,
            Route::Events(_) => Endpoint::Events,
            Route::Stats { .. } => Endpoint::Stats,
        }
    }

    /// The scope a token needs for this route; `None` for the open `/healthz`.
    pub fn scope(&self) -> Option<Scope> {
        match self {
            // Having the broker call or mail whom one names is more than tracking a run: a
            // trigger token must not turn it into a relay to any address.
            Route::TrackRun { notify, .. } if !notify.is_empty() => Some(Scope::Admin),
            _ => self.endpoint().scope(),
        }
    }
}

/// Why a request cannot be served. Every variant is a 4xx answer.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum RouteError {
    /// Too long, not origin- or absolute-form, a bad escape, not UTF-8, a bad query.
    #[error(transparent)]
    Target(#[from] TargetError),
    /// Absolute-form with an empty authority or user info.
    #[error("the authority of an absolute-form target must be a host[:port]")]
    BadAuthority,
    /// A `#` in the target.
    #[error("a request target may not hold a fragment ('#')")]
    Fragment,
    /// `//` inside the path.
    #[error("empty path segment ('//') in the request target")]
    EmptySegment,
    /// A `.` or `..` segment.
    #[error("'.' and '..' path segments are not accepted")]
    DotSegment,
    /// `%2F` or `%5C` (or a raw `\`) inside a segment.
    #[error("a path segment may not hold '/' or '\\' (encoded or not)")]
    EncodedSeparator,
    /// A control character in a decoded segment.
    #[error("control character in the request path")]
    ControlCharacter,
    /// No endpoint has this path.
    #[error("no such endpoint")]
    NotFound {
        /// The decoded path, for the answer.
        path: String,
    },
    /// A method the endpoint does not take.
    #[error("method {method} is not allowed here")]
    Method {
        /// The method sent.
        method: String,
        /// What is allowed (the `Allow` header).
        allow: &'static str,
    },
    /// A parameter the endpoint does not take.
    #[error("unknown parameter {key:?}")]
    UnknownParameter {
        /// The parameter.
        key: String,
        /// What the endpoint takes.
        allowed: &'static [&'static str],
    },
    /// A parameter whose value is wrong.
    #[error("{message}")]
    BadValue {
        /// The parameter.
        name: &'static str,
        /// Its value.
        value: String,
        /// What is wrong.
        message: String,
    },
    /// `/job_start` without `job_name`.
    #[error("missing job_name")]
    MissingJobName,
    /// `job_name=`.
    #[error("job_name is empty")]
    EmptyJobName,
    /// `/job_start` with both `delay` and `at`.
    #[error("give delay or at, not both")]
    DelayAndAt,
    /// `/runs/{id}/priority` without `value`.
    #[error("missing value: the new priority, a whole number")]
    MissingValue,
}

impl RouteError {
    /// The HTTP status this error is answered with.
    pub fn status(&self) -> u16 {
        match self {
            RouteError::Target(e) => e.status(),
            RouteError::NotFound { .. } => 404,
            RouteError::Method { .. } => 405,
            _ => 400,
        }
    }

    /// Fields added to the JSON error beside `error`.
    pub fn details(&self) -> Vec<(&'static str, Value)> {
        match self {
            RouteError::NotFound { path } => vec![("path", json!(path))],
            RouteError::Method { allow, .. } => vec![("allow", json!(allow))],
            RouteError::UnknownParameter { allowed, .. } => vec![("allowed", json!(allowed))],
            RouteError::BadValue { name, value, .. } => vec![(*name, json!(value))],
            _ => Vec::new(),
        }
    }

    /// The `Allow` header of a 405.
    pub fn allow(&self) -> Option<&'static str> {
        match self {
            RouteError::Method { allow, .. } => Some(allow),
            _ => None,
        }
    }
}

/// A request that cannot be served, and the endpoint it was aimed at when that is known.
#[derive(Debug, Clone, PartialEq)]
pub struct Invalid {
    /// The endpoint the path names, if it names one.
    pub endpoint: Option<Endpoint>,
    /// Why it cannot be served.
    pub error: RouteError,
}

impl Invalid {
    /// The scope needed to be told why: the endpoint's (so a `trigger` token learns what is
    /// wrong with its `/job_start`), else `read`, so that nobody without a token learns
    /// anything from a refusal, not even on the open `/healthz`.
    pub fn scope(&self) -> Option<Scope> {
        Some(
            self.endpoint
                .and_then(Endpoint::scope)
                .unwrap_or(Scope::Read),
        )
    }
}

/// A parsed request: the route or why there is none, and its path for log lines.
#[derive(Debug, Clone, PartialEq)]
pub struct Parsed {
    /// What the request asks for.
    pub route: Result<Route, Invalid>,
    /// The path (without the query) for logs, at most 200 characters.
    pub log_path: String,
}

impl Parsed {
    /// The scope a token needs for this request; `None`: open.
    pub fn scope(&self) -> Option<Scope> {
        match &self.route {
            Ok(route) => route.scope(),
            Err(invalid) => invalid.scope(),
        }
    }

    /// The endpoint the request names, if any.
    pub fn endpoint(&self) -> Option<Endpoint> {
        match &self.route {
            Ok(route) => Some(route.endpoint()),
            Err(invalid) => invalid.endpoint,
        }
    }
}

/// Parses a request: the one place that reads the raw target.
pub fn parse(method: &Method, target: &str) -> Parsed {
    let log_path = target
        .split('?')
        .next()
        .unwrap_or("")
        .chars()
        .take(LOG_PATH_CHARS)
        .collect();
    Parsed {
        route: route(method, target),
        log_path,
    }
}

fn route(method: &Method, target: &str) -> Result<Route, Invalid> {
    let unaimed = |error: RouteError| Invalid {
        endpoint: None,
        error,
    };
    let (path, query) = split_target(target).map_err(unaimed)?;
    let segments = segments(path).map_err(unaimed)?;
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    let endpoint = match segments.as_slice() {
        // The dashboard's own views (`/ui/runs/{id}`, …) are the same page.
        [] | ["ui", ..] => Some(Endpoint::Dashboard),
        ["events"] => Some(Endpoint::Events),
        ["stats"] => Some(Endpoint::Stats),
        ["job_start"] => Some(Endpoint::JobStart),
        ["runs"] => Some(Endpoint::Runs),
        ["runs", _] => Some(Endpoint::Run),
        ["runs", _, "log"] => Some(Endpoint::RunLog),
        ["runs", _, "tasks", _, "attempts", _, "log"] => Some(Endpoint::AttemptLog),
        ["runs", _, "cancel"] => Some(Endpoint::CancelRun),
        ["runs", _, "priority"] => Some(Endpoint::PrioritizeRun),
        ["runs", _, "track"] => Some(Endpoint::TrackRun),
        ["runs", _, "untrack"] => Some(Endpoint::UntrackRun),
        ["jobs"] => Some(Endpoint::Jobs),
        ["workers"] => Some(Endpoint::Workers),
        ["workers", _] => Some(Endpoint::ForgetWorker),
        ["dead"] => Some(Endpoint::Dead),
        ["dead", _, "retry"] => Some(Endpoint::RetryDead),
        ["semaphores"] => Some(Endpoint::Semaphores),
        ["schedules"] => Some(Endpoint::Schedules),
        ["resources"] => Some(Endpoint::Resources),
        ["resources", _] => Some(Endpoint::ControlResource),
        ["graph"] => Some(Endpoint::Graph),
        ["healthz"] => Some(Endpoint::Healthz),
        ["metrics"] => Some(Endpoint::Metrics),
        _ => None,
    };
    let aimed = |error: RouteError| Invalid { endpoint, error };
    // The methods the endpoint takes (an unknown path: those of the reads).
    let allow = endpoint.map_or("GET, HEAD", Endpoint::allow);
    let allowed = match method {
        Method::Get => allow.contains("GET"),
        Method::Head => allow.contains("HEAD"),
        Method::Post => allow.contains("POST"),
        Method::Other(_) => false,
    };
    if !allowed {
        return Err(aimed(RouteError::Method {
            method: method.as_str().chars().take(32).collect(),
            allow,
        }));
    }
    let Some(endpoint) = endpoint else {
        return Err(unaimed(RouteError::NotFound {
            path: format!("/{}", segments.join("/")),
        }));
    };
    let query = parse_query(query).map_err(|e| aimed(e.into()))?;
    let head = *method == Method::Head;
    arguments(endpoint, &segments, query, head).map_err(aimed)
}

/// The endpoint's arguments from its path segments and query.
fn arguments(
    endpoint: Endpoint,
    segments: &[&str],
    mut query: QueryParams,
    head: bool,
) -> Result<Route, RouteError> {
    let second = || {
        segments
            .get(1)
            .map_or_else(String::new, |s| (*s).to_owned())
    };
    Ok(match endpoint {
        // The dashboard and the probes ignore their query (cache busters and the like).
        Endpoint::Dashboard => Route::Dashboard,
        Endpoint::Healthz => Route::Healthz,
        Endpoint::Metrics => Route::Metrics { openmetrics: false },
        Endpoint::Events => {
            only(&query, &["job", "tag", "tracked", "run"])?;
            let tracked = flag(&mut query, "tracked")?.unwrap_or(false);
            let mut text = |name: &str| query.remove(name).filter(|v| !v.is_empty());
            Route::Events(EventFilter {
                job: text("job"),
                tag: text("tag"),
                run: text("run"),
                tracked,
            })
        }
        Endpoint::Stats => {
            only(&query, &["job", "days"])?;
            let job = query
                .remove("job")
                .filter(|j| !j.is_empty())
                .ok_or(RouteError::MissingValue)?;
            let days = whole_number(&mut query, "days", DEFAULT_STATS_DAYS, MAX_STATS_DAYS)?;
            Route::Stats { job, days }
        }
        Endpoint::JobStart => Route::JobStart(job_start(query)?),
        Endpoint::Runs => Route::Runs(runs_query(query)?),
        Endpoint::Run => {
            only(&query, &[])?;
            Route::Run { run_id: second() }
        }
        Endpoint::RunLog => {
            only(&query, &["follow"])?;
            let follow = match query.remove("follow").as_deref() {
                None | Some("0") | Some("false") | Some("no") => false,
                Some("1") | Some("true") | Some("yes") | Some("") => true,
                Some(other) => {
                    return Err(bad_value("follow", other, "follow must be 1 or 0".into()))
                }
            };
            Route::RunLog {
                run_id: second(),
                follow: follow && !head,
            }
        }
        Endpoint::AttemptLog => {
            only(&query, &[])?;
            let raw = segments.get(5).copied().unwrap_or_default();
            let attempt = raw.parse::<u32>().ok().filter(|n| *n >= 1).ok_or_else(|| {
                bad_value("attempt", raw, "the attempt is a number from 1".into())
            })?;
            Route::AttemptLog {
                run_id: second(),
                task_id: segments
                    .get(3)
                    .map_or_else(String::new, |s| (*s).to_owned()),
                attempt,
            }
        }
        Endpoint::Jobs => {
            only(&query, &[])?;
            Route::Jobs
        }
        Endpoint::Workers => {
            only(&query, &[])?;
            Route::Workers
        }
        Endpoint::Semaphores => {
            only(&query, &[])?;
            Route::Semaphores
        }
        Endpoint::Schedules => {
            only(&query, &[])?;
            Route::Schedules
        }
        Endpoint::Resources => {
            only(&query, &[])?;
            Route::Resources
        }
        Endpoint::ControlResource => {
            only(&query, &["action"])?;
            let raw = query.remove("action").ok_or(RouteError::MissingValue)?;
            let action = match raw.as_str() {
                "create" => ResourceAction::Create,
                "clear" => ResourceAction::Clear,
                _ => {
                    return Err(bad_value(
                        "action",
                        &raw,
                        "action must be create or clear".into(),
                    ))
                }
            };
            Route::ControlResource {
                name: second(),
                action,
            }
        }
        Endpoint::ForgetWorker => {
            only(&query, &["action"])?;
            let raw = query.remove("action").ok_or(RouteError::MissingValue)?;
            if raw != "forget" {
                return Err(bad_value("action", &raw, "action must be forget".into()));
            }
            Route::ForgetWorker { name: second() }
        }
        Endpoint::Graph => {
            only(&query, &["format"])?;
            let dot = match query.remove("format").as_deref() {
                None | Some("json") => false,
                Some("dot") => true,
                Some(other) => {
                    return Err(bad_value(
                        "format",
                        other,
                        "format must be dot or json".into(),
                    ))
                }
            };
            Route::Graph { dot }
        }
        Endpoint::Dead => {
            only(&query, &["limit"])?;
            let limit = limit(&mut query, DEFAULT_DEAD_LIMIT, MAX_DEAD_LIMIT)?;
            Route::Dead { limit }
        }
        Endpoint::RetryDead => {
            only(&query, &[])?;
            Route::RetryDead { task_id: second() }
        }
        Endpoint::CancelRun => {
            only(&query, &["force"])?;
            let force = flag(&mut query, "force")?.unwrap_or(false);
            Route::CancelRun {
                run_id: second(),
                force,
            }
        }
        Endpoint::PrioritizeRun => {
            only(&query, &["value"])?;
            let raw = query.remove("value").ok_or(RouteError::MissingValue)?;
            Route::PrioritizeRun {
                run_id: second(),
                priority: parse_priority("value", &raw)?,
            }
        }
        Endpoint::TrackRun => {
            only(&query, &["notify"])?;
            let notify = match query.remove("notify") {
                None => Vec::new(),
                Some(raw) => parse_notify(&raw)?,
            };
            Route::TrackRun {
                run_id: second(),
                tracked: true,
                notify,
            }
        }
        Endpoint::UntrackRun => {
            only(&query, &[])?;
            Route::TrackRun {
                run_id: second(),
                tracked: false,
                notify: Vec::new(),
            }
        }
    })
}

/// Most targets one `notify=` names.
const MAX_NOTIFY_TARGETS: usize = 8;

/// `notify=webhook:NAME,ADDRESS,…`: webhooks of the broker's `--notify` file and e-mail
/// addresses, told when the run ends.
fn parse_notify(raw: &str) -> Result<Vec<NotifyTarget>, RouteError> {
    let targets: Vec<&str> = raw.split(',').filter(|t| !t.is_empty()).collect();
    if targets.is_empty() || targets.len() > MAX_NOTIFY_TARGETS {
        return Err(bad_value(
            "notify",
            raw,
            format!("notify takes 1 to {MAX_NOTIFY_TARGETS} targets, comma-separated"),
        ));
    }
    targets
        .into_iter()
        .map(|target| {
            NotifyTarget::parse(target).map_err(|problem| {
                let message = format!(
                    "a notify target is webhook:NAME (a webhook of the broker's --notify \
                     file) or an e-mail address: {problem}"
                );
                bad_value("notify", target, message)
            })
        })
        .collect()
}

/// A yes/no parameter: `1`, `true`, `yes` or empty; `0`, `false`, `no`.
fn flag(query: &mut QueryParams, name: &'static str) -> Result<Option<bool>, RouteError> {
    match query.remove(name).as_deref() {
        None => Ok(None),
        Some("1") | Some("true") | Some("yes") | Some("") => Ok(Some(true)),
        Some("0") | Some("false") | Some("no") => Ok(Some(false)),
        Some(other) => Err(bad_value(name, other, format!("{name} must be 1 or 0"))),
    }
}

/// A priority: a whole number (higher first).
fn parse_priority(name: &'static str, raw: &str) -> Result<i32, RouteError> {
    raw.parse::<i32>().map_err(|_| {
        bad_value(
            name,
            raw,
            format!(
                "{name} must be a whole number from {} to {}",
                i32::MIN,
                i32::MAX
            ),
        )
    })
}

/// `delay=DURATION`: `90s`, `5m`, `1h 30m` (or a number of seconds).
fn parse_delay(raw: &str) -> Result<Duration, RouteError> {
    let seconds = raw
        .parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s >= 0.0)
        .and_then(|s| Duration::try_from_secs_f64(s).ok());
    seconds
        .or_else(|| humantime::parse_duration(raw.trim()).ok())
        .ok_or_else(|| {
            bad_value(
                "delay",
                raw,
                "delay must be a duration such as 90s, 5m or 1h 30m".into(),
            )
        })
}

/// A comma-separated list; empty items are dropped (`a,,b`, a trailing comma).
fn list(raw: &str) -> Vec<String> {
    raw.split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(str::to_owned)
        .collect()
}

fn job_start(mut query: QueryParams) -> Result<JobStart, RouteError> {
    let job = match query.remove("job_name") {
        Some(job) if !job.is_empty() => job,
        Some(_) => return Err(RouteError::EmptyJobName),
        None => return Err(RouteError::MissingJobName),
    };
    let wait = match query.remove("wait") {
        None => None,
        Some(raw) => Some(parse_wait(&raw)?).filter(|w| !w.is_zero()),
    };
    let priority = match query.remove("priority") {
        None => None,
        Some(raw) => Some(parse_priority("priority", &raw)?),
    };
    let delay = match query.remove("delay") {
        None => None,
        Some(raw) => Some(parse_delay(&raw)?),
    };
    let at_ms = match query.remove("at") {
        None => None,
        Some(raw) => Some(jobz::parse_time_ms(&raw).map_err(|e| bad_value("at", &raw, e))?),
    };
    if delay.is_some() && at_ms.is_some() {
        return Err(RouteError::DelayAndAt);
    }
    let depends = query
        .remove("depends")
        .map_or_else(Vec::new, |raw| list(&raw));
    let tags = query.remove("tags").map_or_else(Vec::new, |raw| list(&raw));
    let idempotency_key = match query.remove("idempotency_key") {
        None => None,
        Some(raw) => Some(idempotency_key(&raw)?),
    };
    Ok(JobStart {
        job,
        params: query,
        wait,
        priority,
        delay,
        at_ms,
        depends,
        tags,
        idempotency_key,
    })
}

fn idempotency_key(raw: &str) -> Result<String, RouteError> {
    if is_valid_idempotency_key(raw) {
        Ok(raw.to_owned())
    } else {
        Err(bad_value(
            "idempotency_key",
            raw,
            format!(
                "an idempotency key is 1 to {MAX_IDEMPOTENCY_KEY} of A-Z a-z 0-9 . _ : @ / + = -"
            ),
        ))
    }
}

/// Takes the `Idempotency-Key` header of a `job_start` into its route: the same as
/// `idempotency_key=`; both, and different, are refused (400).
pub fn with_idempotency_header(parsed: &mut Parsed, header: Option<&str>) {
    let Some(header) = header else {
        return;
    };
    let Ok(Route::JobStart(start)) = &mut parsed.route else {
        return;
    };
    let error = match (idempotency_key(header), &start.idempotency_key) {
        (Ok(key), None) => {
            start.idempotency_key = Some(key);
            return;
        }
        (Ok(key), Some(query)) if key == *query => return,
        (Ok(_), Some(_)) => bad_value(
            "idempotency_key",
            header,
            "the Idempotency-Key header and idempotency_key= differ".into(),
        ),
        (Err(error), _) => error,
    };
    parsed.route = Err(Invalid {
        endpoint: Some(Endpoint::JobStart),
        error,
    });
}

fn runs_query(mut query: QueryParams) -> Result<RunsQuery, RouteError> {
    only(
        &query,
        &[
            "job", "state", "tag", "tracked", "limit", "worker", "before", "since", "until",
        ],
    )?;
    let mut time = |name: &'static str| -> Result<Option<i64>, RouteError> {
        match query.remove(name).filter(|t| !t.is_empty()) {
            None => Ok(None),
            Some(raw) => jobz::parse_time_ms(&raw)
                .map(Some)
                .map_err(|e| bad_value(name, &raw, e)),
        }
    };
    let since_ms = time("since")?;
    let until_ms = time("until")?;
    let tracked = flag(&mut query, "tracked")?;
    let limit = limit(&mut query, DEFAULT_RUN_LIMIT, MAX_RUN_LIMIT)?;
    let state = match query.remove("state").filter(|s| !s.is_empty()) {
        None => None,
        Some(raw) => Some(raw.parse::<RunState>().map_err(|_| {
            bad_value(
                "state",
                &raw,
                "state must be one of scheduled, waiting, pending, running, succeeded, failed, cancelled".into(),
            )
        })?),
    };
    Ok(RunsQuery {
        job: query.remove("job").filter(|j| !j.is_empty()),
        state,
        tag: query.remove("tag").filter(|t| !t.is_empty()),
        tracked,
        limit,
        worker: query.remove("worker").filter(|w| !w.is_empty()),
        before: query.remove("before").filter(|b| !b.is_empty()),
        since_ms,
        until_ms,
    })
}

/// `limit=N`, from 1 to `max`.
fn limit(query: &mut QueryParams, default: u32, max: u32) -> Result<u32, RouteError> {
    whole_number(query, "limit", default, max)
}

/// `name=N`, a whole number from 1 to `max`; `default` when not given.
fn whole_number(
    query: &mut QueryParams,
    name: &'static str,
    default: u32,
    max: u32,
) -> Result<u32, RouteError> {
    match query.remove(name) {
        None => Ok(default),
        Some(raw) => raw
            .parse::<u32>()
            .ok()
            .filter(|n| (1..=max).contains(n))
            .ok_or_else(|| {
                bad_value(
                    name,
                    &raw,
                    format!("{name} must be a whole number from 1 to {max}"),
                )
            }),
    }
}

/// `wait=SECONDS`: a number from 0 to [`MAX_WAIT_SECS`], fractions allowed.
pub fn parse_wait(raw: &str) -> Result<Duration, RouteError> {
    raw.parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && (0.0..=MAX_WAIT_SECS).contains(s))
        .and_then(|s| Duration::try_from_secs_f64(s.max(0.0)).ok())
        .ok_or_else(|| {
            bad_value(
                "wait",
                raw,
                format!("wait must be a number of seconds from 0 to {MAX_WAIT_SECS}"),
            )
        })
}

fn bad_value(name: &'static str, value: &str, message: String) -> RouteError {
    RouteError::BadValue {
        name,
        value: value.to_owned(),
        message,
    }
}

/// Refuses parameters other than `allowed`: a typo (`stat=failed`) must not silently
/// widen a query.
fn only(query: &QueryParams, allowed: &'static [&'static str]) -> Result<(), RouteError> {
    match query.keys().find(|k| !allowed.contains(&k.as_str())) {
        None => Ok(()),
        Some(key) => Err(RouteError::UnknownParameter {
            key: key.clone(),
            allowed,
        }),
    }
}

/// Splits a target into its path (starting with `/`) and its query (without the `?`).
fn split_target(target: &str) -> Result<(&str, &str), RouteError> {
    if target.len() > MAX_TARGET_BYTES {
        return Err(TargetError::TooLong { len: target.len() }.into());
    }
    if target.contains('#') {
        return Err(RouteError::Fragment);
    }
    let rest = if target.starts_with('/') {
        target
    } else {
        let after_scheme = strip_scheme(target).ok_or(TargetError::NotOriginForm)?;
        let end = after_scheme.find(['/', '?']).unwrap_or(after_scheme.len());
        let authority = &after_scheme[..end];
        let acceptable = |c: char| !(c == '@' || c.is_whitespace() || c.is_control());
        if authority.is_empty() || !authority.chars().all(acceptable) {
            return Err(RouteError::BadAuthority);
        }
        &after_scheme[end..]
    };
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    // `http://host` and `http://host?q` name the root.
    Ok((if path.is_empty() { "/" } else { path }, query))
}

/// `http://` or `https://` in any case, and what follows it.
fn strip_scheme(target: &str) -> Option<&str> {
    ["http://", "https://"].into_iter().find_map(|scheme| {
        let head = target.get(..scheme.len())?;
        head.eq_ignore_ascii_case(scheme)
            .then(|| &target[scheme.len()..])
    })
}

/// The decoded segments of a path that starts with `/`; one trailing `/` is dropped.
fn segments(path: &str) -> Result<Vec<String>, RouteError> {
    let inner = &path[1..];
    let inner = inner.strip_suffix('/').unwrap_or(inner);
    if inner.is_empty() {
        return Ok(Vec::new());
    }
    inner
        .split('/')
        .map(|raw| {
            if raw.is_empty() {
                return Err(RouteError::EmptySegment);
            }
            let segment = decode(raw, false, "the path")?;
            if segment.contains(['/', '\\']) {
                return Err(RouteError::EncodedSeparator);
            }
            if segment == "." || segment == ".." {
                return Err(RouteError::DotSegment);
            }
            if segment.chars().any(char::is_control) {
                return Err(RouteError::ControlCharacter);
            }
            Ok(segment)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(target: &str) -> Result<Route, Invalid> {
        parse(&Method::Get, target).route
    }

    fn scope(method: &Method, target: &str) -> Option<Scope> {
        parse(method, target).scope()
    }

    fn status(target: &str) -> u16 {
        match get(target) {
            Ok(route) => panic!("{target} parsed as {route:?}"),
            Err(invalid) => invalid.error.status(),
        }
    }

    /// Every way of writing one segment with letters percent-encoded: each letter alone,
    /// all of them, in upper and lower case hex.
    fn encodings(segment: &str) -> Vec<String> {
        let mut out = Vec::new();
        for (i, c) in segment.char_indices() {
            for hex in [format!("%{:02X}", c as u8), format!("%{:02x}", c as u8)] {
                out.push(format!("{}{hex}{}", &segment[..i], &segment[i + 1..]));
            }
        }
        out.push(segment.bytes().map(|b| format!("%{b:02X}")).collect());
        out
    }

    #[test]
    fn routes_and_their_arguments() {
        assert_eq!(get("/"), Ok(Route::Dashboard));
        assert_eq!(get("/?anything=1"), Ok(Route::Dashboard));
        assert_eq!(
            get("/job_start?job_name=build&date=2026_01_02&wait=2.5"),
            Ok(Route::JobStart(JobStart {
                job: "build".into(),
                params: Params::from([("date".into(), "2026_01_02".into())]),
                wait: Some(Duration::from_millis(2500)),
                ..Default::default()
            }))
        );
        assert!(matches!(
            get("/job_start?job_name=a&wait=0"),
            Ok(Route::JobStart(JobStart { wait: None, .. }))
        ));
        assert_eq!(
            get("/runs?job=build&state=failed&limit=1000&tag="),
            Ok(Route::Runs(RunsQuery {
                job: Some("build".into()),
                state: Some(RunState::Failed),
                tag: None,
                tracked: None,
                limit: 1000,
                worker: None,
                before: None,
                since_ms: None,
                until_ms: None,
            }))
        );
        // Path segments are decoded, but `+` stays a `+` there.
        assert_eq!(
            get("/runs/r%201+2"),
            Ok(Route::Run {
                run_id: "r 1+2".into()
            })
        );
        assert_eq!(
            get("/runs/r1/log?follow=1"),
            Ok(Route::RunLog {
                run_id: "r1".into(),
                follow: true
            })
        );
        assert_eq!(
            parse(&Method::Head, "/runs/r1/log?follow=1").route,
            Ok(Route::RunLog {
                run_id: "r1".into(),
                follow: false
            }),
            "HEAD never streams"
        );
        assert_eq!(get("/dead"), Ok(Route::Dead { limit: 50 }));
        assert_eq!(
            get("/dead/t1/retry"),
            Ok(Route::RetryDead {
                task_id: "t1".into()
            })
        );
        for (target, route) in [
            ("/jobs", Route::Jobs),
            ("/workers", Route::Workers),
            ("/semaphores", Route::Semaphores),
            ("/schedules", Route::Schedules),
            ("/healthz?probe=1", Route::Healthz),
            ("/metrics", Route::Metrics { openmetrics: false }),
            (
                "/runs/",
                Route::Runs(runs_query(QueryParams::new()).unwrap()),
            ),
        ] {
            assert_eq!(get(target), Ok(route), "{target}");
        }
    }

    #[test]
    fn scopes_map_to_endpoints() {
        let get = Method::Get;
        assert_eq!(scope(&get, "/healthz"), None);
        assert_eq!(scope(&Method::Head, "/healthz?x=1"), None);
        for target in [
            "/",
            "/runs",
            "/runs/r1",
            "/runs/r1/log?follow=1",
            "/jobs",
            "/workers",
            "/dead",
            "/semaphores",
            "/schedules",
            "/resources",
            "/graph?format=dot",
            "/metrics",
            "/no/such",
        ] {
            assert_eq!(scope(&get, target), Some(Scope::Read), "{target}");
        }
        assert_eq!(scope(&get, "/job_start?job_name=x"), Some(Scope::Trigger));
        assert_eq!(scope(&get, "/dead/t1/retry"), Some(Scope::Admin));
        // The query string cannot make a path look like /healthz.
        assert_eq!(scope(&get, "/job_start?/healthz"), Some(Scope::Trigger));
        // Refusals say nothing to a caller without a token, even on /healthz.
        let post = Method::Post;
        assert_eq!(scope(&post, "/healthz"), Some(Scope::Read));
        assert_eq!(scope(&get, "/healthz?%zz"), Some(Scope::Read));
        assert_eq!(scope(&post, "/nowhere"), Some(Scope::Read));
        // …but a trigger token is told what is wrong with its /job_start.
        assert_eq!(scope(&post, "/job_start?job_name=x"), Some(Scope::Trigger));
        assert_eq!(
            scope(&get, "/job_start?job_name=x&d=%zz"),
            Some(Scope::Trigger)
        );
        assert_eq!(scope(&Method::Head, "/dead/t/retry"), Some(Scope::Admin));
    }

    #[test]
    fn encoded_letters_in_any_segment_of_a_privileged_path_keep_its_scope() {
        let mut checked = 0;
        type IsRoute = fn(&Route) -> bool;
        let privileged: [(Vec<&str>, &str, Scope, IsRoute); 2] = [
            (
                vec!["job_start"],
                "?job_name=j",
                Scope::Trigger,
                |r| matches!(r, Route::JobStart(j) if j.job == "j"),
            ),
            (
                vec!["dead", "t1", "retry"],
                "",
                Scope::Admin,
                |r| matches!(r, Route::RetryDead { task_id } if task_id == "t1"),
            ),
        ];
        for (segments, q, scope_needed, is_route) in privileged {
            for (i, segment) in segments.iter().enumerate() {
                for encoded in encodings(segment) {
                    let mut path = segments.clone();
                    path[i] = &encoded;
                    let path = path.join("/");
                    for target in [
                        format!("/{path}{q}"),
                        format!("/{path}/{q}"),
                        format!("http://x/{path}{q}"),
                        format!("HTTPS://x:1/{path}{q}"),
                    ] {
                        let parsed = parse(&Method::Get, &target);
                        assert_eq!(parsed.scope(), Some(scope_needed), "{target}");
                        let route = parsed.route.unwrap_or_else(|e| panic!("{target}: {e:?}"));
                        assert!(is_route(&route), "{target}: {route:?}");
                        // The same target as HEAD or POST keeps the scope and is refused
                        // (but POST where the endpoint takes it: the dashboard's forms).
                        let takes_post = route.endpoint().allow().contains("POST");
                        for method in [Method::Head, Method::Post] {
                            if method == Method::Post && takes_post {
                                let parsed = parse(&method, &target);
                                assert_eq!(parsed.scope(), Some(scope_needed), "POST {target}");
                                assert_eq!(
                                    parsed.route.map(|r| r.endpoint()),
                                    Ok(route.endpoint())
                                );
                                continue;
                            }
                            let parsed = parse(&method, &target);
                            assert_eq!(parsed.scope(), Some(scope_needed), "{method:?} {target}");
                            let error = parsed.route.unwrap_err().error;
                            assert_eq!(error.status(), 405, "{method:?} {target}");
                        }
                        checked += 1;
                    }
                }
            }
        }
        assert!(checked > 100, "{checked}");
    }

    #[test]
    fn encoded_admin_paths_keep_the_admin_scope_and_their_name() {
        let cases = [
            (
                "resources",
                "create",
                Route::ControlResource {
                    name: "data.1".into(),
                    action: ResourceAction::Create,
                },
            ),
            (
                "workers",
                "forget",
                Route::ForgetWorker {
                    name: "data.1".into(),
                },
            ),
        ];
        for (collection, action, expected) in cases {
            let mut checked = 0;
            for encoded in encodings(collection) {
                for target in [
                    format!("/{encoded}/data.1?action={action}"),
                    format!("http://x/{encoded}/data.1?action={action}"),
                ] {
                    let parsed = parse(&Method::Post, &target);
                    assert_eq!(parsed.scope(), Some(Scope::Admin), "{target}");
                    assert_eq!(parsed.route, Ok(expected.clone()), "{target}");
                    checked += 1;
                }
                // Changes take POST only.
                let target = format!("/{encoded}/data.1?action={action}");
                let error = parse(&Method::Get, &target).route.unwrap_err().error;
                assert_eq!(error.status(), 405, "{target}");
            }
            assert!(checked > 10, "{collection}: {checked}");
            // A name with an encoded separator is refused, not split.
            let target = format!("/{collection}/a%2Fb?action={action}");
            let error = parse(&Method::Post, &target).route.unwrap_err().error;
            assert_eq!(error.status(), 400, "{target}");
        }
    }

    #[test]
    fn hostile_targets_are_refused_or_keep_their_scope() {
        let get = Method::Get;
        // Each is refused (400), whatever it names.
        for target in [
            "//job_start?job_name=j",
            "/job_start//?job_name=j",
            "/./job_start",
            "/runs/../job_start?job_name=j",
            "/runs/%2e%2e/job_start",
            "/runs/%2E./job_start",
            "/healthz/..",
            "/dead/t/./retry",
            "/dead/t/x/../retry",
            "/dead//t/retry",
            "/dead/t%2Fretry",
            "/dead%2ft/retry",
            "/job%5Cstart",
            "/job\\start",
            "/runs/a%00b",
            "/runs/a%0Ab",
            "/job_start#?job_name=j",
            "/healthz#/job_start",
            "/%zz",
            "/%ff",
            "http:///job_start?job_name=j",
            "http://user@x/job_start?job_name=j",
            "http://x y/job_start",
            "ftp://x/job_start?job_name=j",
            "job_start?job_name=j",
            "*",
            "x:1",
            "",
        ] {
            let parsed = parse(&get, target);
            let Err(invalid) = &parsed.route else {
                panic!("{target:?} parsed as {:?}", parsed.route);
            };
            assert_eq!(
                invalid.error.status(),
                400,
                "{target:?}: {:?}",
                invalid.error
            );
            assert_eq!(parsed.scope(), Some(Scope::Read), "{target:?}");
        }
        // The query and the authority never decide the path.
        assert_eq!(get_route("http://x?a=/job_start"), Route::Dashboard);
        assert_eq!(get_route("http://x"), Route::Dashboard);
        assert_eq!(get_route("/healthz?/job_start"), Route::Healthz);
        assert_eq!(
            scope(&get, "/job_start%3Fjob_name=j"),
            Some(Scope::Read),
            "an encoded '?' is part of the segment"
        );
        assert_eq!(status("/job_start%3Fjob_name=j"), 404);
        assert_eq!(status("/Job_start?job_name=j"), 404);
        assert_eq!(status("/job_start/x?job_name=j"), 404);
        assert_eq!(status("/dead/t/Retry"), 404);
        assert_eq!(status("/dead/t/retry/x"), 404);
    }

    fn get_route(target: &str) -> Route {
        get(target).unwrap_or_else(|e| panic!("{target}: {e:?}"))
    }

    #[test]
    fn bad_queries_are_refused_naming_the_problem() {
        for (target, status, needle) in [
            ("/job_start", 400, "missing job_name"),
            ("/job_start?date=1", 400, "missing job_name"),
            ("/job_start?job_name=", 400, "job_name is empty"),
            ("/job_start?job_name=a&job_name=b", 400, "more than once"),
            ("/job_start?job_name=a&=1", 400, "empty parameter name"),
            ("/job_start?job_name=a&date=%ff%fe", 400, "not valid UTF-8"),
            ("/job_start?job_name=a&date=%zz", 400, "bad percent-escape"),
            ("/job_start?job_name=a&wait=abc", 400, "wait must be"),
            ("/job_start?job_name=a&wait=3601", 400, "wait must be"),
            ("/job_start?job_name=a&wait=-1", 400, "wait must be"),
            ("/job_start?job_name=a&wait=NaN", 400, "wait must be"),
            ("/job_start?job_name=a&wait=inf", 400, "wait must be"),
            ("/runs?state=bogus", 400, "state must be"),
            ("/runs?limit=0", 400, "limit must be"),
            ("/runs?limit=1001", 400, "limit must be"),
            ("/runs?stat=failed", 400, "unknown parameter"),
            ("/runs/r1?x=1", 400, "unknown parameter"),
            ("/runs/r1/log?follow=maybe", 400, "follow must be"),
            ("/dead?limit=ten", 400, "limit must be"),
            ("/dead/t/retry?now=1", 400, "unknown parameter"),
            ("/jobs?x", 400, "unknown parameter"),
        ] {
            let error = get(target).unwrap_err().error;
            assert_eq!(error.status(), status, "{target}");
            assert!(error.to_string().contains(needle), "{target}: {error}");
        }
        let long = format!("/job_start?job_name=a&v={}", "x".repeat(MAX_TARGET_BYTES));
        assert_eq!(status(&long), 414);
        let exact = format!("/?v={}", "a".repeat(MAX_TARGET_BYTES - 4));
        assert_eq!(get(&exact), Ok(Route::Dashboard));
    }

    #[test]
    fn an_idempotency_key_comes_from_the_query_or_the_header_and_is_checked() {
        let key_of = |target: &str, header: Option<&str>| {
            let mut parsed = parse(&Method::Get, target);
            with_idempotency_header(&mut parsed, header);
            parsed.route.map_err(|e| e.error.status()).map(|r| match r {
                Route::JobStart(start) => start.idempotency_key,
                other => panic!("{other:?}"),
            })
        };
        let uuid = "0b2f7c1e-8d3a-4c55-9a51-6f0e2d1c9b7a";
        assert_eq!(key_of("/job_start?job_name=a", None), Ok(None));
        assert_eq!(
            key_of(
                &format!("/job_start?job_name=a&idempotency_key={uuid}"),
                None
            ),
            Ok(Some(uuid.into()))
        );
        assert_eq!(
            key_of("/job_start?job_name=a", Some(uuid)),
            Ok(Some(uuid.into()))
        );
        assert_eq!(
            key_of(
                &format!("/job_start?job_name=a&idempotency_key={uuid}"),
                Some(uuid)
            ),
            Ok(Some(uuid.into())),
            "the same in both"
        );
        assert_eq!(
            key_of("/job_start?job_name=a&idempotency_key=one", Some("two")),
            Err(400)
        );
        let long = "k".repeat(MAX_IDEMPOTENCY_KEY + 1);
        for bad in ["", "a b", "a%00b", "caf%C3%A9", "a;b", long.as_str()] {
            let target = format!("/job_start?job_name=a&idempotency_key={bad}");
            assert_eq!(key_of(&target, None), Err(400), "{bad:?}");
        }
        assert_eq!(key_of("/job_start?job_name=a", Some("a b")), Err(400));
        // Only a trigger takes it: another route ignores the header.
        let mut parsed = parse(&Method::Get, "/runs");
        with_idempotency_header(&mut parsed, Some("a b"));
        assert!(parsed.route.is_ok());
    }

    #[test]
    fn job_start_takes_the_run_options_out_of_the_parameters() {
        let route = get(
            "/job_start?job_name=a&date=1&priority=-3&delay=1m+30s&depends=r1,+r2,&tags=x,y&wait=1&idempotency_key=k-1",
        );
        assert_eq!(
            route,
            Ok(Route::JobStart(JobStart {
                job: "a".into(),
                params: Params::from([("date".into(), "1".into())]),
                wait: Some(Duration::from_secs(1)),
                priority: Some(-3),
                delay: Some(Duration::from_secs(90)),
                at_ms: None,
                depends: vec!["r1".into(), "r2".into()],
                tags: vec!["x".into(), "y".into()],
                idempotency_key: Some("k-1".into()),
            }))
        );
        let Ok(Route::JobStart(at)) = get("/job_start?job_name=a&at=2026-11-23T11:00:00%2B01:00")
        else {
            panic!("at");
        };
        assert_eq!(at.at_ms, jobz::parse_time_ms("2026-11-23T10:00:00Z").ok());
        let Ok(Route::JobStart(seconds)) = get("/job_start?job_name=a&delay=2.5&depends=&tags=")
        else {
            panic!("delay in seconds");
        };
        assert_eq!(seconds.delay, Some(Duration::from_millis(2500)));
        assert!(seconds.depends.is_empty() && seconds.tags.is_empty());
        for (target, needle) in [
            (
                "/job_start?job_name=a&priority=high",
                "priority must be a whole number",
            ),
            (
                "/job_start?job_name=a&priority=",
                "priority must be a whole number",
            ),
            (
                "/job_start?job_name=a&priority=99999999999",
                "priority must be a whole number",
            ),
            (
                "/job_start?job_name=a&delay=soon",
                "delay must be a duration",
            ),
            ("/job_start?job_name=a&delay=-1", "delay must be a duration"),
            ("/job_start?job_name=a&at=tomorrow", "RFC 3339"),
            ("/job_start?job_name=a&at=2026-11-23T10:00:00", "offset"),
            (
                "/job_start?job_name=a&delay=1s&at=2026-11-23T10:00:00Z",
                "not both",
            ),
        ] {
            let error = get(target).unwrap_err().error;
            assert_eq!(error.status(), 400, "{target}");
            assert!(error.to_string().contains(needle), "{target}: {error}");
        }
    }

    #[test]
    fn what_changes_a_run_is_post_only_with_its_scope() {
        let post = Method::Post;
        assert_eq!(
            parse(&post, "/runs/r1/cancel?force=1").route,
            Ok(Route::CancelRun {
                run_id: "r1".into(),
                force: true
            })
        );
        assert_eq!(
            parse(&post, "/runs/r1/cancel").route,
            Ok(Route::CancelRun {
                run_id: "r1".into(),
                force: false
            })
        );
        assert_eq!(
            parse(&post, "/runs/r1/priority?value=-7").route,
            Ok(Route::PrioritizeRun {
                run_id: "r1".into(),
                priority: -7
            })
        );
        for (target, tracked) in [("/runs/r1/track", true), ("/runs/r1/untrack", false)] {
            assert_eq!(
                parse(&post, target).route,
                Ok(Route::TrackRun {
                    run_id: "r1".into(),
                    tracked,
                    notify: vec![],
                })
            );
        }
        assert_eq!(
            parse(&post, "/runs/r1/track?notify=webhook:ops,me@example.com").route,
            Ok(Route::TrackRun {
                run_id: "r1".into(),
                tracked: true,
                notify: vec![
                    NotifyTarget::Webhook("ops".into()),
                    NotifyTarget::Email("me@example.com".into()),
                ],
            })
        );
        assert_eq!(
            parse(&post, "/runs/r1/track?notify=webhook:ops").scope(),
            Some(Scope::Admin),
            "naming targets needs admin"
        );
        assert_eq!(parse(&post, "/runs/r1/track").scope(), Some(Scope::Trigger));
        for bad in [
            "/runs/r1/track?notify=",
            "/runs/r1/track?notify=nobody",
            "/runs/r1/track?notify=webhook:a%20b",
            "/runs/r1/track?notify=a@b.c,a@b.c,a@b.c,a@b.c,a@b.c,a@b.c,a@b.c,a@b.c,a@b.c",
            "/runs/r1/untrack?notify=webhook:ops",
        ] {
            let error = parse(&post, bad).route.unwrap_err().error;
            assert_eq!(error.status(), 400, "{bad}");
        }
        for (target, scope_needed) in [
            ("/runs/r1/cancel", Scope::Trigger),
            ("/runs/r1/track", Scope::Trigger),
            ("/runs/r1/untrack", Scope::Trigger),
            ("/runs/r1/priority?value=1", Scope::Admin),
            ("/resources/data.1?action=create", Scope::Admin),
            ("/resources/data.1?action=clear", Scope::Admin),
        ] {
            assert_eq!(scope(&post, target), Some(scope_needed), "{target}");
            // GET or HEAD (a link, a prefetch, an image tag) never changes a run: 405,
            // told with the endpoint's scope.
            for method in [Method::Get, Method::Head, Method::Other("PUT".into())] {
                let parsed = parse(&method, target);
                assert_eq!(parsed.scope(), Some(scope_needed), "{method:?} {target}");
                let error = parsed.route.unwrap_err().error;
                assert_eq!(
                    (error.status(), error.allow()),
                    (405, Some("POST")),
                    "{target}"
                );
            }
        }
        for (target, needle) in [
            ("/runs/r1/cancel?force=maybe", "force must be 1 or 0"),
            ("/runs/r1/cancel?now=1", "unknown parameter"),
            ("/runs/r1/priority", "missing value"),
            ("/runs/r1/priority?value=1.5", "whole number"),
            ("/runs/r1/track?x=1", "unknown parameter"),
        ] {
            let error = parse(&post, target).route.unwrap_err().error;
            assert_eq!(error.status(), 400, "{target}");
            assert!(error.to_string().contains(needle), "{target}: {error}");
        }
        // Reads are not changed by POST; /job_start and a dead task's retry take it.
        assert!(matches!(
            parse(&post, "/job_start?job_name=a").route,
            Ok(Route::JobStart(_))
        ));
        assert!(matches!(
            parse(&post, "/dead/t1/retry").route,
            Ok(Route::RetryDead { .. })
        ));
        for (target, allow) in [
            ("/runs", "GET, HEAD"),
            ("/events", "GET"),
            ("/runs/r1", "GET, HEAD"),
        ] {
            let error = parse(&post, target).route.unwrap_err().error;
            assert_eq!(
                (error.status(), error.allow()),
                (405, Some(allow)),
                "{target}"
            );
        }
        assert_eq!(
            get("/runs?tracked=1"),
            Ok(Route::Runs(RunsQuery {
                job: None,
                state: None,
                tag: None,
                tracked: Some(true),
                limit: DEFAULT_RUN_LIMIT,
                worker: None,
                before: None,
                since_ms: None,
                until_ms: None,
            }))
        );
    }

    #[test]
    fn only_get_and_head_are_allowed_and_head_never_starts_anything() {
        let post = Method::Post;
        let error = parse(&post, "/runs").route.unwrap_err().error;
        assert_eq!((error.status(), error.allow()), (405, Some("GET, HEAD")));
        let error = parse(&post, "/nowhere").route.unwrap_err().error;
        assert_eq!(error.status(), 405);
        for target in ["/job_start?job_name=a", "/dead/t/retry"] {
            let error = parse(&Method::Head, target).route.unwrap_err().error;
            assert_eq!(
                (error.status(), error.allow()),
                (405, Some("GET, POST")),
                "{target}"
            );
        }
        assert_eq!(parse(&Method::Head, "/").route, Ok(Route::Dashboard));
        assert_eq!(
            parse(&Method::Get, "/ui/runs/r1?x=1").route,
            Ok(Route::Dashboard)
        );
        assert_eq!(
            parse(&Method::Get, "/events?job=a&tracked=1&run=r1").route,
            Ok(Route::Events(EventFilter {
                job: Some("a".into()),
                tag: None,
                tracked: true,
                run: Some("r1".into()),
            }))
        );
        assert_eq!(
            parse(&Method::Get, "/stats?job=a").route,
            Ok(Route::Stats {
                job: "a".into(),
                days: DEFAULT_STATS_DAYS
            })
        );
        for bad in [
            "/stats",
            "/stats?job=a&days=0",
            "/stats?job=a&days=91",
            "/stats?job=a&x=1",
        ] {
            let error = parse(&Method::Get, bad).route.unwrap_err();
            assert_eq!(error.error.status(), 400, "{bad}");
        }
        let error = parse(&Method::Get, "/events?jobs=a").route.unwrap_err();
        assert_eq!(error.error.status(), 400);
        assert_eq!(error.scope(), Some(Scope::Read));
    }

    #[test]
    fn log_paths_are_short_and_leave_out_the_query() {
        let parsed = parse(&Method::Get, "/job_start?job_name=secret");
        assert_eq!(parsed.log_path, "/job_start");
        let long = format!("/{}", "a".repeat(1000));
        assert_eq!(parse(&Method::Get, &long).log_path.len(), 200);
    }
}
