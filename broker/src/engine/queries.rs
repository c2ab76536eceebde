//! Queries: answered from memory (jobs, workers, health, semaphores, the dead list) or
//! handed to the store as a read that is answered after the writes before it commit.

use jobz::envelope::Envelope;
use jobz::message::{HealthView, Query, ReplyBody};

use super::effects::{reply, Effects, ReadQuery, StoreRead};
use super::Engine;
use crate::model::Dead;

impl Engine {
    pub(super) fn on_query(&mut self, fx: &mut Effects, env: &Envelope, query: Query, now: i64) {
        let read = |query| StoreRead {
            reply_to: env.sender.clone(),
            in_reply_to: env.id.clone(),
            query,
        };
        match query {
            Query::Run { run_id } => fx.reads.push(read(ReadQuery::Run(run_id.into()))),
            Query::Runs(filter) => fx.reads.push(read(ReadQuery::Runs(filter))),
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
                fx.reads.push(read(query));
            }
            Query::Semaphores => {
                let barriers = self.semaphores.views(now);
                reply(fx, env, ReplyBody::Semaphores(barriers));
            }
            Query::Schedules => {
                let schedules = self.semaphores.schedules(now);
                reply(fx, env, ReplyBody::Schedules(schedules));
            }
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
            runs_by_state: Default::default(),
        }
    }
}
