//! Queries: answered from memory (jobs, workers, health, semaphores, the dead list) or
//! handed to the store as a read that is answered after the writes before it commit.

use jobz::envelope::Envelope;
use jobz::message::{HealthView, Query, ReplyBody, RunState};

use super::effects::{read, reply, Effects, ReadQuery};
use super::Engine;
use crate::model::Dead;

impl Engine {
    pub(super) fn on_query(&mut self, fx: &mut Effects, env: &Envelope, query: Query, now: i64) {
        match query {
            Query::Run { run_id } => read(fx, env, ReadQuery::Run(run_id.into())),
            Query::Runs(filter) => read(fx, env, ReadQuery::Runs(filter)),
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

    pub fn health(&self) -> HealthView {
        HealthView {
            version: self.config.version.clone(),
            instance: self.config.instance.clone(),
            counters: self.counters.clone(),
            active_runs: self.active.run_count() as u64,
            live_workers: self.registry.live_count() as u64,
            runs_by_state: self.runs_by_state(),
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
