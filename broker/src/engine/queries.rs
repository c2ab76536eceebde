//! Queries: answered from memory (jobs, workers, health, semaphores, the dead list) or
//! handed to the store as a read that is answered after the writes before it commit.

use jobz::envelope::Envelope;
use jobz::message::{BrokerMetrics, HealthView, Query, ReplyBody, RunState};

use super::effects::StoreRead;
use super::effects::{read, reply, Effects, ReadQuery};
use super::watchers::{Watcher, MAX_WATCH_MS};
use super::Engine;
use crate::ids::{RunId, TaskId};
use crate::model::Dead;

impl Engine {
    pub(super) fn on_query(&mut self, fx: &mut Effects, env: &Envelope, query: Query, now: i64) {
        match query {
            Query::Run { run_id } => read(fx, env, ReadQuery::Run(run_id.into())),
            Query::RunEnd { run_id, wait_ms } => {
                let run_id = RunId::from(run_id);
                let wait_ms = i64::try_from(wait_ms).unwrap_or(i64::MAX);
                let watcher = Watcher {
                    reply_to: env.sender.clone(),
                    in_reply_to: env.id.clone(),
                    until_ms: now.saturating_add(wait_ms.min(MAX_WATCH_MS)),
                };
                let held =
                    self.active.run(&run_id).is_some() && self.watchers.watch(&run_id, watcher);
                if held {
                    self.count("run_end_queries_held");
                } else {
                    // Ended, unknown, or no room to hold it: the run as the store has it.
                    read(fx, env, ReadQuery::Run(run_id));
                }
            }
            Query::Runs(filter) => read(fx, env, ReadQuery::Runs(filter)),
            // The journal holds the feed: it numbers events as it commits them.
            Query::Feed { after, limit } => read(fx, env, ReadQuery::Feed { after, limit }),
            Query::JobStats { job, since_ms } => {
                read(fx, env, ReadQuery::JobStats { job, since_ms })
            }
            Query::TaskOutput {
                task_id,
                attempt,
                from,
            } => {
                let task_id = TaskId::from(task_id);
                let view = self.live.read(&task_id, attempt, from).map(|mut view| {
                    // Ended for the follower as soon as the engine says so, before the next
                    // tick retires the buffer.
                    view.finished |= !self.is_current_attempt(&task_id, attempt, None);
                    view
                });
                reply(fx, env, ReplyBody::TaskOutput(view));
            }
            Query::Jobs => reply(fx, env, ReplyBody::Jobs(self.registry.job_views())),
            Query::Workers => reply(fx, env, ReplyBody::Workers(self.registry.worker_views())),
            Query::Health => {
                let health = self.health();
                reply(fx, env, ReplyBody::Health(health));
            }
            Query::Completions {
                jobs,
                since_ms,
                limit,
            } => {
                let query = ReadQuery::Completions {
                    jobs,
                    since_ms,
                    limit: limit.clamp(1, 10_000),
                };
                read(fx, env, query);
            }
            Query::Semaphores => {
                let barriers = self.semaphores.views(now);
                reply(fx, env, ReplyBody::Semaphores(barriers));
            }
            Query::Schedules => {
                let schedules = self.semaphores.schedules(now);
                reply(fx, env, ReplyBody::Schedules(schedules));
            }
            Query::Resources => reply(fx, env, ReplyBody::Resources(self.resources.views(now))),
            Query::ResourceGraph => reply(fx, env, ReplyBody::ResourceGraph(self.lineage())),
            Query::Dead { limit } => {
                let limit = limit.clamp(1, 1000) as usize;
                let views = self.dead.newest().take(limit).map(Dead::view).collect();
                reply(fx, env, ReplyBody::Dead(views));
            }
        }
    }

    /// Answers the queries held for runs that ended since the last look: the store reads
    /// each run after the commit that ended it.
    pub(super) fn answer_watchers(&mut self, fx: &mut Effects) {
        let removed = self.active.take_removed();
        if self.watchers.is_empty() {
            return;
        }
        for run_id in removed {
            for watcher in self.watchers.take(&run_id) {
                self.count("run_end_queries_answered");
                fx.reads.push(StoreRead {
                    reply_to: watcher.reply_to,
                    in_reply_to: watcher.in_reply_to,
                    query: ReadQuery::Run(run_id.clone()),
                });
            }
        }
    }

    pub fn health(&self) -> HealthView {
        HealthView {
            version: self.config.version.clone(),
            instance: self.config.instance.clone(),
            counters: self.counters.clone(),
            active_runs: self.active.run_count() as u64,
            live_workers: self.registry.live_count() as u64,
            runs_by_state: self.runs_by_state(),
            metrics: BrokerMetrics {
                workers: self.registry.count_by_state(),
                dead_tasks: self.dead.len() as u64,
                ..self.meters.view(&self.io, self.registry.job_names())
            },
        }
    }

    /// The unfinished runs by state, every unfinished state named (zero included).
    fn runs_by_state(&self) -> std::collections::BTreeMap<String, u64> {
        let mut counts: std::collections::BTreeMap<String, u64> = RunState::ALL
            .iter()
            .filter(|s| !s.is_final() || **s == RunState::Cancelled)
            .map(|s| (s.to_string(), 0))
            .collect();
        for run in self.active.runs() {
            *counts.entry(run.state.to_string()).or_default() += 1;
        }
        counts
    }
}
