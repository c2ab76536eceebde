//! A trigger, or a retry of a dead task, becomes a run: validated against the catalog,
//! journaled, answered `Accepted`, and its first step started, or held: `scheduled` until
//! it is due (`delay=`, `at=`), `waiting` until the runs it depends on have succeeded
//! (`depends=`). A message id is ingested once: a resent trigger gets the run its first
//! delivery made.
//!
//! The states of the runs a trigger depends on come from memory when it can: the active
//! runs, and the last [`super::holds::FinishedRuns`] that ended. A run that ended before
//! those is only in the store, and the engine never reads the store itself: the trigger
//! is then decided in two phases. The engine hands it to the journal as a [`RunLookup`];
//! the journal reads the states after committing everything before it (so a run that
//! ended is in the store with its final state) and hands the trigger back to
//! [`Engine::on_lookup`], which decides it with the answers. Nothing is journaled or
//! answered before that, so a resent trigger meanwhile is only looked up again, and the
//! first decision is remembered for the second.

use std::collections::{BTreeMap, BTreeSet};

use jobz::envelope::{Envelope, MessageId};
use jobz::jobfile::{is_valid_name, Delivery};
use jobz::message::{
    is_valid_idempotency_key, Message, Params, ReplyBody, RunState, TriggerRequest,
    MAX_IDEMPOTENCY_KEY,
};
use tracing::{info, warn};

use super::effects::{reply, Effects, RunLookup, Write};
use super::feed;
use super::holds::dependency_reason;
use super::recent::Recent;
use super::{is_valid_id, truncate, Engine};
use crate::ids::{RunId, TaskId};
use crate::model::Run;
use jobz::message::FeedKind;

/// Trigger ids remembered for ingesting a resent trigger once.
const REMEMBERED_REQUESTS: usize = 100_000;

/// Most runs one trigger may depend on.
pub const MAX_DEPENDS: usize = 100;

/// Most tags one trigger may add.
pub const MAX_TRIGGER_TAGS: usize = 32;

/// Longest tag a trigger may add.
pub const MAX_TAG_BYTES: usize = 64;

/// Furthest ahead a run may be scheduled: a year and a day (a typo in `at=` must not park
/// a run for ever).
pub const MAX_DELAY_MS: i64 = 366 * 24 * 3600 * 1000;

/// The run each recent trigger made, by the trigger's message id (bounded: the oldest go).
#[derive(Debug)]
pub(super) struct RecentTriggers(Recent<MessageId, RunId>);

impl Default for RecentTriggers {
    fn default() -> Self {
        RecentTriggers(Recent::new(REMEMBERED_REQUESTS))
    }
}

impl RecentTriggers {
    pub fn remember(&mut self, request: MessageId, run_id: RunId) {
        self.0.remember(request, run_id);
    }

    pub fn run_of(&self, request: &MessageId) -> Option<&RunId> {
        self.0.get(request)
    }
}

/// A run about to be made: its job and parameters, and what its trigger asked of it.
#[derive(Debug, Clone, Default)]
pub(super) struct NewRun {
    pub job: String,
    pub params: Params,
    pub parent_runs: Vec<RunId>,
    pub priority: i32,
    pub tags: Vec<String>,
    pub not_before_ms: Option<i64>,
    pub depends_on: Vec<RunId>,
    /// What identifies its trigger for deduplication; `None`: the message id.
    pub request_id: Option<String>,
}

/// Is this a tag a trigger may add (`tags=`): 1 to 64 of `[A-Za-z0-9_.:/@+-]`.
pub fn is_valid_tag(tag: &str) -> bool {
    (1..=MAX_TAG_BYTES).contains(&tag.len())
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.:/@+-".contains(&b))
}

/// What a trigger asks of its run beyond its job and parameters.
#[derive(Debug, PartialEq)]
struct RunOptions {
    not_before_ms: Option<i64>,
    /// The job's tags first, then the trigger's, each once.
    tags: Vec<String>,
    /// Each once, in the order given.
    depends_on: Vec<RunId>,
}

/// The options a trigger asks for, or why it is refused (400).
fn run_options(
    request: &TriggerRequest,
    job_tags: &[String],
    now: i64,
) -> Result<RunOptions, String> {
    let not_before_ms = match (request.delay_ms, request.at_ms) {
        (Some(_), Some(_)) => return Err("give delay or at, not both".into()),
        (Some(delay), None) => {
            let delay = i64::try_from(delay).unwrap_or(i64::MAX);
            if delay > MAX_DELAY_MS {
                return Err(format!(
                    "delay of {delay} ms is more than a year and a day ({MAX_DELAY_MS} ms)"
                ));
            }
            Some(now + delay)
        }
        (None, Some(at)) => {
            if at > now.saturating_add(MAX_DELAY_MS) {
                return Err("at is more than a year and a day ahead".into());
            }
            Some(at)
        }
        (None, None) => None,
    };
    if request.tags.len() > MAX_TRIGGER_TAGS {
        return Err(format!(
            "{} tags, at most {MAX_TRIGGER_TAGS}",
            request.tags.len()
        ));
    }
    if let Some(bad) = request.tags.iter().find(|t| !is_valid_tag(t)) {
        return Err(format!(
            "tag {:?} must be 1 to {MAX_TAG_BYTES} of [A-Za-z0-9_.:/@+-]",
            truncate(bad, 80)
        ));
    }
    let mut tags: Vec<String> = Vec::new();
    for tag in job_tags.iter().chain(&request.tags) {
        if !tags.contains(tag) {
            tags.push(tag.clone());
        }
    }
    if request.depends.len() > MAX_DEPENDS {
        return Err(format!(
            "depends on {} runs, at most {MAX_DEPENDS}",
            request.depends.len()
        ));
    }
    if let Some(bad) = request.depends.iter().find(|r| !is_valid_id(r)) {
        return Err(format!("depends: {:?} is not a run id", truncate(bad, 80)));
    }
    let mut depends: Vec<RunId> = Vec::new();
    for run_id in &request.depends {
        let run_id = RunId::from(run_id.as_str());
        if !depends.contains(&run_id) {
            depends.push(run_id);
        }
    }
    Ok(RunOptions {
        not_before_ms,
        tags,
        depends_on: depends,
    })
}

impl Engine {
    pub(super) fn on_trigger(
        &mut self,
        fx: &mut Effects,
        env: &Envelope,
        request: TriggerRequest,
        now: i64,
    ) {
        self.trigger(fx, env, request, BTreeMap::new(), now);
    }

    /// Decides a trigger, knowing of the runs it depends on what `known` says (the store's
    /// answers to an earlier lookup: `None`, the store does not hold the run).
    pub(super) fn trigger(
        &mut self,
        fx: &mut Effects,
        env: &Envelope,
        request: TriggerRequest,
        known: BTreeMap<RunId, Option<RunState>>,
        now: i64,
    ) {
        let refuse = |engine: &mut Engine, fx: &mut Effects, status: u16, error: String| {
            engine.count("triggers_rejected");
            reply(fx, env, ReplyBody::Rejected { status, error });
        };
        // What identifies the trigger: the client's key (per job), else its message id (a
        // resend of one message).
        let request_id = match &request.idempotency_key {
            Some(key) if !is_valid_idempotency_key(key) => {
                let error = format!(
                    "idempotency key {:?} must be 1 to {MAX_IDEMPOTENCY_KEY} of A-Z a-z 0-9 . _ : @ / + = -",
                    truncate(key, 130)
                );
                return refuse(self, fx, 400, error);
            }
            Some(key) => format!("key:{}:{key}", truncate(&request.job, 130)),
            None => env.id.clone(),
        };
        if let Some(run_id) = self.triggers.run_of(&request_id).cloned() {
            self.count("duplicate_triggers");
            let run_id = run_id.into();
            reply(fx, env, ReplyBody::Accepted { run_id });
            return;
        }
        if !is_valid_name(&request.job) {
            let error = format!("invalid job name {:?}", truncate(&request.job, 130));
            return refuse(self, fx, 400, error);
        }
        let job = self
            .registry
            .job_and_params(&request.job)
            .map(|(spec, rules)| {
                let params = rules.validate_params(&request.params);
                (spec.delivery, spec.tags.clone(), spec.priority, params)
            });
        let Some((delivery, job_tags, job_priority, params)) = job else {
            let error = format!("unknown job {:?}: no worker has registered it", request.job);
            return refuse(self, fx, 404, error);
        };
        if delivery == Delivery::Local {
            let error = format!(
                "job {:?} has delivery `local`: it runs only as a successor",
                request.job
            );
            return refuse(self, fx, 400, error);
        }
        if let Err(e) = params {
            return refuse(self, fx, 400, e.to_string());
        }
        if request.parent_runs.len() > 10_000 || request.parent_runs.iter().any(|r| !is_valid_id(r))
        {
            return refuse(self, fx, 400, "invalid parent_runs".into());
        }
        let RunOptions {
            not_before_ms,
            tags,
            depends_on,
        } = match run_options(&request, &job_tags, now) {
            Ok(options) => options,
            Err(error) => return refuse(self, fx, 400, error),
        };
        let priority = request.priority.unwrap_or(job_priority);

        // What the runs it depends on are: active, recently ended, or as the store said.
        let mut states = Vec::new();
        let mut ask = Vec::new();
        let mut unknown = Vec::new();
        for run_id in &depends_on {
            let state = match self.active.run(run_id) {
                Some(run) => Some(run.state),
                None => self.finished.state_of(run_id),
            };
            match (state, known.get(run_id)) {
                (Some(state), _) => states.push((run_id.clone(), state)),
                (None, Some(Some(state))) => states.push((run_id.clone(), *state)),
                (None, Some(None)) => unknown.push(run_id.to_string()),
                (None, None) => ask.push(run_id.clone()),
            }
        }
        if !ask.is_empty() {
            self.count("trigger_lookups");
            // The trigger goes with it (the engine took the body out of `env`).
            let env = Envelope {
                body: Message::Trigger(request),
                ..env.clone()
            };
            fx.lookups.push(RunLookup { env, known, ask });
            return;
        }
        if !unknown.is_empty() {
            let error = format!("depends on unknown runs: {}", unknown.join(", "));
            return refuse(self, fx, 400, error);
        }
        let new = NewRun {
            job: request.job,
            params: request.params,
            parent_runs: request.parent_runs.into_iter().map(RunId::from).collect(),
            priority,
            tags,
            not_before_ms,
            depends_on,
            request_id: Some(request_id),
        };
        self.create_run(fx, env, new, &states, now);
    }

    /// Journals a new run and answers `Accepted`. What happens to it then depends on the
    /// runs it depends on (`dependencies`, with their states) and its due time: one of them
    /// failed or was cancelled, it fails at once; it is due later, it is scheduled; some
    /// have not ended, it waits; else its first step starts.
    fn create_run(
        &mut self,
        fx: &mut Effects,
        env: &Envelope,
        new: NewRun,
        dependencies: &[(RunId, RunState)],
        now: i64,
    ) -> RunId {
        let request_id = new.request_id.unwrap_or_else(|| env.id.clone());
        let mut run = Run::new(
            self.ids.run_id(),
            &new.job,
            new.params,
            RunState::Pending,
            request_id.clone(),
            now,
        );
        run.parent_runs = new.parent_runs;
        run.priority = new.priority;
        run.tags = new.tags;
        run.not_before_ms = new.not_before_ms;
        run.depends_on = new.depends_on;
        let run_id = run.run_id.clone();
        self.count("runs_accepted");
        self.triggers.remember(request_id, run_id.clone());

        let broken = dependencies
            .iter()
            .find(|(_, state)| matches!(state, RunState::Failed | RunState::Cancelled));
        let waiting_for: BTreeSet<RunId> = dependencies
            .iter()
            .filter(|(_, state)| !state.is_final())
            .map(|(run_id, _)| run_id.clone())
            .collect();
        let due_later = run.not_before_ms.is_some_and(|due| due > now);
        run.state = match (broken, due_later, waiting_for.is_empty()) {
            (Some(_), _, _) => RunState::Failed,
            (None, true, _) => RunState::Scheduled,
            (None, false, false) => RunState::Waiting,
            (None, false, true) => RunState::Pending,
        };
        info!(run_id = %run_id, job = %run.job, sender = %env.sender, state = %run.state,
            priority = run.priority, "run accepted");
        if let Some((dependency, state)) = broken {
            let reason = dependency_reason(dependency, *state);
            warn!(run_id = %run_id, job = %run.job, %reason, "run failed before it started");
            run.reason = Some(reason);
            run.finished_at_ms = Some(now);
            self.count("runs_failed");
            self.meters.run_ended(&run.job, RunState::Failed);
            self.finished.remember(run_id.clone(), RunState::Failed);
        }
        let state = run.state;
        fx.writes.push(Write::Run(run.clone()));
        feed::run_event(fx, FeedKind::RunAccepted, &run, now);
        if state == RunState::Failed {
            self.tell_run_ended(fx, FeedKind::RunFailed, &run, now);
        }
        // The reply goes first in `publish`: it is sent only after the run is durable.
        reply(
            fx,
            env,
            ReplyBody::Accepted {
                run_id: run_id.to_string(),
            },
        );
        match state {
            RunState::Failed => {}
            RunState::Pending => {
                self.active.insert_run(run, waiting_for);
                self.start_step(fx, &run_id, &new.job, None, now);
                self.finish_run_if_done(fx, &run_id, now);
            }
            _ => {
                self.count(&format!("runs_{state}"));
                self.active.insert_run(run, waiting_for);
            }
        }
        run_id
    }

    pub(super) fn on_retry_dead(
        &mut self,
        fx: &mut Effects,
        env: &Envelope,
        task_id: &TaskId,
        now: i64,
    ) {
        if let Some(run_id) = self.triggers.run_of(&env.id).cloned() {
            let run_id = run_id.into();
            reply(fx, env, ReplyBody::Accepted { run_id });
            return;
        }
        let rejected = |status: u16, error: String| ReplyBody::Rejected { status, error };
        let Some(dead) = self.dead.get(task_id).cloned() else {
            reply(
                fx,
                env,
                rejected(
                    404,
                    format!("no dead task {:?}", truncate(task_id.as_str(), 80)),
                ),
            );
            return;
        };
        if let Some(run_id) = dead.retried_as {
            let run_id = run_id.into();
            reply(fx, env, ReplyBody::Accepted { run_id });
            return;
        }
        let job = self
            .registry
            .job_and_params(&dead.job)
            .map(|(spec, rules)| {
                let params = rules.validate_params(&dead.params);
                (spec.delivery, spec.priority, spec.tags.clone(), params)
            });
        let Some((delivery, priority, tags, params)) = job else {
            let error = format!("unknown job {:?}: no worker has registered it", dead.job);
            reply(fx, env, rejected(404, error));
            return;
        };
        if delivery == Delivery::Local {
            let error = format!(
                "job {:?} has delivery `local`: retry the run that led to it",
                dead.job
            );
            reply(fx, env, rejected(400, error));
            return;
        }
        if let Err(e) = params {
            reply(
                fx,
                env,
                rejected(400, format!("the job's parameters changed: {e}")),
            );
            return;
        }
        self.count("dead_retried");
        let new = NewRun {
            job: dead.job.clone(),
            params: dead.params.clone(),
            parent_runs: vec![dead.run_id.clone()],
            priority,
            tags,
            ..NewRun::default()
        };
        let run_id = self.create_run(fx, env, new, &[], now);
        let mut dead = dead;
        dead.retried_as = Some(run_id);
        fx.writes.push(Write::Dead(dead.clone()));
        self.dead.remember(dead);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> TriggerRequest {
        TriggerRequest {
            job: "a".into(),
            ..Default::default()
        }
    }

    #[test]
    fn run_options_merge_tags_once_and_refuse_what_cannot_be_meant() {
        let job_tags = ["etl".to_string(), "nightly".to_string()];
        let ok = TriggerRequest {
            tags: vec!["nightly".into(), "urgent".into(), "urgent".into()],
            depends: vec!["r-1".into(), "r-2".into(), "r-1".into()],
            delay_ms: Some(1_500),
            ..request()
        };
        let options = run_options(&ok, &job_tags, 10_000).unwrap();
        assert_eq!(options.not_before_ms, Some(11_500));
        assert_eq!(options.tags, ["etl", "nightly", "urgent"]);
        assert_eq!(options.depends_on, [RunId::from("r-1"), RunId::from("r-2")]);
        let at = TriggerRequest {
            at_ms: Some(5),
            ..request()
        };
        assert_eq!(
            run_options(&at, &[], 10_000).unwrap().not_before_ms,
            Some(5),
            "past: due now"
        );
        for (bad, needle) in [
            (
                TriggerRequest {
                    delay_ms: Some(1),
                    at_ms: Some(1),
                    ..request()
                },
                "not both",
            ),
            (
                TriggerRequest {
                    delay_ms: Some(u64::MAX),
                    ..request()
                },
                "year and a day",
            ),
            (
                TriggerRequest {
                    at_ms: Some(i64::MAX),
                    ..request()
                },
                "year and a day",
            ),
            (
                TriggerRequest {
                    tags: vec!["a,b".into()],
                    ..request()
                },
                "tag",
            ),
            (
                TriggerRequest {
                    tags: vec![String::new()],
                    ..request()
                },
                "tag",
            ),
            (
                TriggerRequest {
                    tags: vec!["t".into(); MAX_TRIGGER_TAGS + 1],
                    ..request()
                },
                "tags, at most",
            ),
            (
                TriggerRequest {
                    depends: vec!["../etc".into()],
                    ..request()
                },
                "not a run id",
            ),
            (
                TriggerRequest {
                    depends: vec!["r".into(); MAX_DEPENDS + 1],
                    ..request()
                },
                "at most",
            ),
        ] {
            let error = run_options(&bad, &[], 10_000).unwrap_err();
            assert!(error.contains(needle), "{bad:?}: {error}");
        }
    }
}
