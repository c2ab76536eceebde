//! A trigger, or a retry of a dead task, becomes a run: validated against the catalog,
//! journaled, answered `Accepted`, and its first step started. A message id is ingested
//! once: a resent trigger gets the run its first delivery made.

use std::collections::{HashMap, VecDeque};

use jobz::envelope::{Envelope, MessageId};
use jobz::jobfile::{is_valid_name, Delivery};
use jobz::message::{ReplyBody, RunState, TriggerRequest};
use tracing::info;

use super::effects::{reply, Effects, Write};
use super::{is_valid_id, truncate, Engine};
use crate::ids::{RunId, TaskId};
use crate::model::Run;

/// Trigger ids remembered for ingesting a resent trigger once.
const REMEMBERED_REQUESTS: usize = 100_000;

/// The run each recent trigger made, by the trigger's message id (bounded: the oldest go).
#[derive(Debug, Default)]
pub(super) struct RecentTriggers {
    runs: HashMap<MessageId, RunId>,
    order: VecDeque<MessageId>,
}

impl RecentTriggers {
    pub fn remember(&mut self, request: MessageId, run_id: RunId) {
        if self.runs.insert(request.clone(), run_id).is_none() {
            self.order.push_back(request);
        }
        while self.order.len() > REMEMBERED_REQUESTS {
            if let Some(old) = self.order.pop_front() {
                self.runs.remove(&old);
            }
        }
    }

    pub fn run_of(&self, request: &MessageId) -> Option<&RunId> {
        self.runs.get(request)
    }
}

impl Engine {
    pub(super) fn on_trigger(
        &mut self,
        fx: &mut Effects,
        env: &Envelope,
        request: TriggerRequest,
        now: i64,
    ) {
        if let Some(run_id) = self.triggers.run_of(&env.id).cloned() {
            self.count("duplicate_triggers");
            let run_id = run_id.into();
            reply(fx, env, ReplyBody::Accepted { run_id });
            return;
        }
        let rejected = |status: u16, error: String| ReplyBody::Rejected { status, error };
        if !is_valid_name(&request.job) {
            self.count("triggers_rejected");
            reply(
                fx,
                env,
                rejected(
                    400,
                    format!("invalid job name {:?}", truncate(&request.job, 130)),
                ),
            );
            return;
        }
        let Some((spec, param_rules)) = self.registry.job_and_params(&request.job) else {
            self.count("triggers_rejected");
            reply(
                fx,
                env,
                rejected(
                    404,
                    format!("unknown job {:?}: no worker has registered it", request.job),
                ),
            );
            return;
        };
        if spec.delivery == Delivery::Local {
            self.count("triggers_rejected");
            reply(
                fx,
                env,
                rejected(
                    400,
                    format!(
                        "job {:?} has delivery `local`: it runs only as a successor",
                        request.job
                    ),
                ),
            );
            return;
        }
        if let Err(e) = param_rules.validate_params(&request.params) {
            self.count("triggers_rejected");
            reply(fx, env, rejected(400, e.to_string()));
            return;
        }
        if request.parent_runs.len() > 10_000 || request.parent_runs.iter().any(|r| !is_valid_id(r))
        {
            self.count("triggers_rejected");
            reply(fx, env, rejected(400, "invalid parent_runs".into()));
            return;
        }
        let parent_runs = request.parent_runs.into_iter().map(RunId::from).collect();
        self.create_run(fx, env, &request.job, request.params, parent_runs, now);
    }

    /// Journals a new run, answers `Accepted` and starts its first step.
    fn create_run(
        &mut self,
        fx: &mut Effects,
        env: &Envelope,
        job: &str,
        params: jobz::message::Params,
        parent_runs: Vec<RunId>,
        now: i64,
    ) -> RunId {
        let run = Run {
            run_id: self.ids.run_id(),
            job: job.to_owned(),
            params,
            state: RunState::Pending,
            parent_runs,
            request_id: env.id.clone(),
            created_at_ms: now,
            finished_at_ms: None,
        };
        let run_id = run.run_id.clone();
        info!(run_id = %run_id, job = %run.job, sender = %env.sender, "run accepted");
        self.count("runs_accepted");
        fx.writes.push(Write::Run(run.clone()));
        self.active.insert_run(run);
        self.triggers.remember(env.id.clone(), run_id.clone());
        // The reply goes first in `publish`: it is sent only after the run is durable.
        reply(
            fx,
            env,
            ReplyBody::Accepted {
                run_id: run_id.to_string(),
            },
        );
        self.start_step(fx, &run_id, job, None, now);
        self.finish_run_if_done(fx, &run_id, now);
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
        let Some((spec, param_rules)) = self.registry.job_and_params(&dead.job) else {
            let error = format!("unknown job {:?}: no worker has registered it", dead.job);
            reply(fx, env, rejected(404, error));
            return;
        };
        if spec.delivery == Delivery::Local {
            let error = format!(
                "job {:?} has delivery `local`: retry the run that led to it",
                dead.job
            );
            reply(fx, env, rejected(400, error));
            return;
        }
        if let Err(e) = param_rules.validate_params(&dead.params) {
            reply(
                fx,
                env,
                rejected(400, format!("the job's parameters changed: {e}")),
            );
            return;
        }
        self.count("dead_retried");
        let parents = vec![dead.run_id.clone()];
        let run_id = self.create_run(fx, env, &dead.job, dead.params.clone(), parents, now);
        let mut dead = dead;
        dead.retried_as = Some(run_id);
        fx.writes.push(Write::Dead(dead.clone()));
        self.dead.remember(dead);
    }
}
