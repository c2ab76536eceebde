//! Schedules: which slots to fire, with no sockets, no disk and no clock.
//!
//! [`Schedules`] holds the `schedules:` definitions, each schedule's *mark* (every slot up
//! to it has been decided: fired or skipped) and its *fires* (slots decided to fire, with
//! the run the broker started for each once it accepted). [`Schedules::set_specs`],
//! [`Schedules::on_tick`] and [`Schedules::on_accepted`] take an event and the time (ms
//! since the epoch) and return [`ScheduleAction`]s: what must be made durable before the
//! triggers they imply are sent, as for barriers.
//!
//! # Rules
//! - A slot fires at most once per process: deciding moves the mark past it, in the same
//!   commit that records the fire. A slot fires once across processes and restarts because
//!   its trigger id ([`trigger_id`]) is derived from the schedule name and the slot alone,
//!   and the broker ingests an id once.
//! - A slot due while this process runs (since it started, or since a pause longer than
//!   [`STALL_MS`]) fires. A slot that fell due while it did not run is *missed*: `catch_up:
//!   none` skips it, `one` fires the latest missed slot, `all` the latest `backlog` of them.
//! - A new schedule (no mark yet) starts from now: slots before it existed are not missed.
//!   A schedule removed from `jobs.d` loses its mark, so one added back starts from then
//!   too: a disabled schedule does not catch up.
//! - Missed means missed by every process: at start, a schedule whose slots another process
//!   reports settled up to some slot (fired and accepted, or skipped) has its mark moved there
//!   ([`Schedules::note_peers`]), so a process back from a stop does not catch up on what
//!   its partner served (the broker would ingest those once anyway, but only while it
//!   remembers their ids).
//! - Nothing older than [`MAX_SLOT_AGE_MS`] is fired, missed slots and unsent fires alike:
//!   the broker remembers trigger ids for 24 h across a restart, and a slot fired twice
//!   further apart than that could start two runs.

use std::collections::BTreeMap;

use jobz::jobfile::{CatchUp, ScheduleSpec};
use jobz::message::{Params, ScheduleView};
use tracing::{error, info, warn};

/// Slots (and unsent fires) older than this are never sent: 23 h, one hour inside the
/// broker's 24 h memory of trigger ids, for clock skew between this host and the broker.
pub const MAX_SLOT_AGE_MS: i64 = 23 * 3600 * 1000;

/// A gap this long between two ticks means the process was not running (suspended,
/// stopped): slots in it count as missed.
pub const STALL_MS: i64 = 30_000;

/// Most schedules in one status report (the broker keeps as many).
pub const MAX_REPORTED_SCHEDULES: usize = 500;

/// One slot decided to fire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fire {
    /// Trigger message id: the same in every process.
    pub id: String,
    /// The schedule.
    pub schedule: String,
    /// The slot, ms since the epoch.
    pub slot_ms: i64,
    /// The job it starts.
    pub job: String,
    /// The run's parameters, rendered for the slot.
    pub params: Params,
    /// The run the broker started, once it accepted the trigger.
    pub run_id: Option<String>,
}

/// What must be made durable before any trigger it implies is sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScheduleAction {
    /// Every slot of `schedule` up to `mark_ms` is decided.
    Mark {
        /// The schedule.
        schedule: String,
        /// ms since the epoch.
        mark_ms: i64,
    },
    /// A slot to fire.
    Fire(Fire),
    /// The broker accepted a fire as `run_id`.
    Accepted {
        /// The fire's trigger id.
        id: String,
        /// The run.
        run_id: String,
    },
    /// The schedule is no longer defined: forget its mark.
    Unmark {
        /// The schedule.
        schedule: String,
    },
    /// A fire no longer kept (superseded, or too old to send).
    Forget {
        /// The fire's trigger id.
        id: String,
    },
}

/// The trigger id of a slot: `sch-<schedule>-<unix seconds>`. Names are
/// `[A-Za-z0-9_.-]{1,128}`, so it stays within the broker's 256 bytes, and the last `-`
/// separates the slot.
pub fn trigger_id(schedule: &str, slot_ms: i64) -> String {
    format!("sch-{schedule}-{}", slot_ms.div_euclid(1000))
}

/// Every schedule, its mark and its fires.
#[derive(Debug, Default)]
pub struct Schedules {
    specs: BTreeMap<String, ScheduleSpec>,
    marks: BTreeMap<String, i64>,
    fires: BTreeMap<String, Fire>,
    /// The next slot of each defined schedule (after its mark): nothing to do before.
    next: BTreeMap<String, Option<i64>>,
    /// Slots before this are missed (see the module docs).
    serving_since_ms: i64,
    last_tick_ms: Option<i64>,
}

impl Schedules {
    /// Schedules resumed from the store by a process that started at `started_ms`;
    /// definitions come with [`Schedules::set_specs`].
    pub fn restore(marks: BTreeMap<String, i64>, fires: Vec<Fire>, started_ms: i64) -> Self {
        Schedules {
            marks,
            fires: fires.into_iter().map(|f| (f.id.clone(), f)).collect(),
            serving_since_ms: started_ms,
            ..Schedules::default()
        }
    }

    /// Replaces the definitions (after `jobs.d` changed). A schedule seen for the first
    /// time starts from `now`; one no longer defined loses its mark. Fires already decided
    /// are sent even if their schedule is gone: they were decided while it existed.
    pub fn set_specs(
        &mut self,
        specs: &BTreeMap<String, ScheduleSpec>,
        now: i64,
    ) -> Vec<ScheduleAction> {
        let mut actions = Vec::new();
        let gone: Vec<String> = self
            .marks
            .keys()
            .filter(|name| !specs.contains_key(*name))
            .cloned()
            .collect();
        for schedule in gone {
            info!(schedule = %schedule, "schedule no longer defined: forgotten");
            self.marks.remove(&schedule);
            actions.push(ScheduleAction::Unmark { schedule });
        }
        self.specs = specs.clone();
        self.next.clear();
        for (name, spec) in specs {
            let mark = *self.marks.entry(name.clone()).or_insert_with(|| {
                info!(schedule = %name, job = %spec.job, timing = %spec.timing, "new schedule: starting from now");
                actions.push(ScheduleAction::Mark {
                    schedule: name.clone(),
                    mark_ms: now,
                });
                now
            });
            self.next.insert(name.clone(), spec.timing.next_after(mark));
        }
        actions
    }

    /// Decides the slots due by `now`, and gives up fires too old to send.
    pub fn on_tick(&mut self, now: i64) -> Vec<ScheduleAction> {
        let mut actions = Vec::new();
        if let Some(last) = self.last_tick_ms {
            if now - last > STALL_MS {
                warn!(
                    paused_ms = now - last,
                    "no tick for a while (suspended or stopped?): slots in between count as missed"
                );
                self.serving_since_ms = now;
            }
        }
        self.last_tick_ms = Some(now);
        let due: Vec<String> = self
            .next
            .iter()
            .filter(|(_, next)| next.is_some_and(|n| n <= now))
            .map(|(name, _)| name.clone())
            .collect();
        for name in due {
            self.decide(&name, now, &mut actions);
        }
        self.give_up_old_fires(now, &mut actions);
        actions
    }

    fn decide(&mut self, name: &str, now: i64, actions: &mut Vec<ScheduleAction>) {
        let Some(spec) = self.specs.get(name) else {
            return;
        };
        let mark = self.marks.get(name).copied().unwrap_or(now);
        let oldest = now - MAX_SLOT_AGE_MS;
        let from = mark.max(oldest - 1);
        if mark < oldest - 1 {
            warn!(schedule = %name, since = %jobz::format_time_ms(mark),
                "slots older than 23 h are not fired: the broker may have forgotten their trigger ids");
        }
        let missed_until = (self.serving_since_ms - 1).max(from);
        let keep = match spec.catch_up {
            CatchUp::None => 0,
            CatchUp::One => 1,
            CatchUp::All => spec.backlog as usize,
        };
        let missed = spec.timing.slots_in(from, missed_until, keep);
        if missed.total > 0 {
            warn!(schedule = %name, missed = missed.total, firing = missed.latest.len(),
                catch_up = spec.catch_up.as_str(),
                serving_since = %jobz::format_time_ms(self.serving_since_ms),
                "slots missed while no semaphore process ran");
        }
        let on_time = spec.timing.slots_in(missed_until, now, usize::MAX);
        for slot_ms in missed.latest.iter().chain(&on_time.latest) {
            let id = trigger_id(name, *slot_ms);
            if self.fires.contains_key(&id) {
                continue;
            }
            let params = match spec.params_for(*slot_ms) {
                Ok(params) => params,
                // Rendered once at load; a failure now is a slot out of range.
                Err(e) => {
                    error!(schedule = %name, slot = %jobz::format_time_ms(*slot_ms), error = %e,
                        "cannot render the parameters of a slot; not fired");
                    continue;
                }
            };
            info!(schedule = %name, job = %spec.job, slot = %jobz::format_time_ms(*slot_ms),
                trigger_id = %id, "schedule slot fired");
            let fire = Fire {
                id: id.clone(),
                schedule: name.to_owned(),
                slot_ms: *slot_ms,
                job: spec.job.clone(),
                params,
                run_id: None,
            };
            actions.push(ScheduleAction::Fire(fire.clone()));
            self.fires.insert(id, fire);
        }
        let mark = mark.max(now);
        self.marks.insert(name.to_owned(), mark);
        actions.push(ScheduleAction::Mark {
            schedule: name.to_owned(),
            mark_ms: mark,
        });
        self.next
            .insert(name.to_owned(), spec.timing.next_after(mark));
    }

    fn give_up_old_fires(&mut self, now: i64, actions: &mut Vec<ScheduleAction>) {
        let old: Vec<String> = self
            .fires
            .values()
            .filter(|f| f.run_id.is_none() && f.slot_ms < now - MAX_SLOT_AGE_MS)
            .map(|f| f.id.clone())
            .collect();
        for id in old {
            if let Some(f) = self.fires.remove(&id) {
                error!(schedule = %f.schedule, slot = %jobz::format_time_ms(f.slot_ms), trigger_id = %id,
                    "a slot the broker never accepted is over 23 h old; given up so that it cannot run twice");
            }
            actions.push(ScheduleAction::Forget { id });
        }
    }

    /// Takes in what other processes reported (`GET /schedules`, via the broker): slots up
    /// to what another process settled (fired and accepted, or skipped by `catch_up`) were
    /// served by it and are not this process's to catch up on.
    pub fn note_peers(
        &mut self,
        views: &[ScheduleView],
        own: &str,
        now: i64,
    ) -> Vec<ScheduleAction> {
        let mut actions = Vec::new();
        for view in views {
            let served = match view.settled_ms {
                Some(slot) if view.reporter != own => slot,
                _ => continue,
            };
            let Some(spec) = self.specs.get(&view.schedule) else {
                continue;
            };
            let Some(mark) = self.marks.get_mut(&view.schedule) else {
                continue;
            };
            if served <= *mark || served > now {
                continue;
            }
            info!(schedule = %view.schedule, served_until = %jobz::format_time_ms(served),
                by = %view.reporter, "another semaphore process served this schedule; catching up from there");
            *mark = served;
            self.next
                .insert(view.schedule.clone(), spec.timing.next_after(served));
            actions.push(ScheduleAction::Mark {
                schedule: view.schedule.clone(),
                mark_ms: served,
            });
        }
        actions
    }

    /// Fires not yet accepted by the broker.
    pub fn pending(&self) -> impl Iterator<Item = &Fire> {
        self.fires.values().filter(|f| f.run_id.is_none())
    }

    /// True if `id` is one of this module's trigger ids.
    pub fn owns(&self, id: &str) -> bool {
        self.fires.contains_key(id)
    }

    /// The broker accepted the fire `id` as `run_id`. Of a schedule's accepted fires only
    /// the latest slot's is kept (for the status report).
    pub fn on_accepted(&mut self, id: &str, run_id: &str) -> Vec<ScheduleAction> {
        let mut actions = Vec::new();
        let Some(fire) = self.fires.get_mut(id) else {
            return actions;
        };
        if fire.run_id.as_deref() == Some(run_id) {
            return actions;
        }
        fire.run_id = Some(run_id.to_owned());
        info!(schedule = %fire.schedule, slot = %jobz::format_time_ms(fire.slot_ms), job = %fire.job,
            run_id = %run_id, "schedule trigger accepted");
        actions.push(ScheduleAction::Accepted {
            id: id.to_owned(),
            run_id: run_id.to_owned(),
        });
        let schedule = fire.schedule.clone();
        let latest = self
            .fires
            .values()
            .filter(|f| f.schedule == schedule && f.run_id.is_some())
            .map(|f| f.slot_ms)
            .max();
        let superseded: Vec<String> = self
            .fires
            .values()
            .filter(|f| f.schedule == schedule && f.run_id.is_some())
            .filter(|f| Some(f.slot_ms) != latest)
            .map(|f| f.id.clone())
            .collect();
        for id in superseded {
            self.fires.remove(&id);
            actions.push(ScheduleAction::Forget { id });
        }
        actions
    }

    /// The schedules as `GET /schedules` shows them.
    pub fn views(&self, reporter: &str) -> Vec<ScheduleView> {
        self.specs
            .values()
            .take(MAX_REPORTED_SCHEDULES)
            .map(|spec| {
                let fires: Vec<&Fire> = self
                    .fires
                    .values()
                    .filter(|f| f.schedule == spec.name)
                    .collect();
                let last = fires.iter().max_by_key(|f| f.slot_ms);
                let interval = spec.timing.interval();
                let oldest_pending = fires
                    .iter()
                    .filter(|f| f.run_id.is_none())
                    .map(|f| f.slot_ms)
                    .min();
                let mark = self.marks.get(&spec.name).copied();
                let settled = match oldest_pending {
                    Some(slot) => mark.map(|m| m.min(slot - 1)),
                    None => mark,
                };
                ScheduleView {
                    schedule: spec.name.clone(),
                    job: spec.job.clone(),
                    cron: spec.timing.cron_expr().map(str::to_owned),
                    every_ms: interval.map(|(every, _)| every),
                    offset_ms: interval.map(|(_, offset)| offset),
                    timezone: spec.timing.zone_name().to_owned(),
                    catch_up: spec.catch_up.as_str().to_owned(),
                    next_fire_ms: self.next.get(&spec.name).copied().flatten(),
                    last_slot_ms: last.map(|f| f.slot_ms),
                    last_run: last.and_then(|f| f.run_id.clone()),
                    pending: fires.iter().filter(|f| f.run_id.is_none()).count() as u32,
                    settled_ms: settled,
                    reporter: reporter.to_owned(),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests;
