//! Barrier counting: every decision of the semaphore, with no sockets, no disk and no clock.
//!
//! [`Barriers`] holds the semaphore definitions and one [`Barrier`] per (semaphore, key).
//! [`Barriers::on_completion`], [`Barriers::on_tick`], [`Barriers::set_specs`] and
//! [`Barriers::on_accepted`] take an event and the current time (ms since the epoch) and
//! return [`Action`]s: what must be made durable. Triggers to send are part of a barrier's
//! state ([`Barrier::triggers`]); the service sends the ones without a run id once the
//! actions that created them are on disk, so a trigger is never sent for a decision that a
//! crash could undo.
//!
//! # Rules
//! - A completion counts for a barrier when its job is awaited and its parameters render
//!   the semaphore's `key`; it is identified by (job, run, worker), so a duplicate or a
//!   replay never counts twice.
//! - `count: N` holds with N counted completions of the job; `count: all` holds when every
//!   run counted has reached its `fanout` (the number of tasks its broadcast reached).
//! - `on: success` (the default) counts succeeded completions; a failed one fails the
//!   barrier at once and starts `on_failure`. `on: finished` counts both.
//! - When every condition holds the barrier fires: each `then` job is triggered once, with
//!   the parameters of the key's first completion, naming every run counted as a parent.
//! - `timeout` counts from the key's first completion; a barrier still waiting then, or a
//!   completion that finished after it, times the barrier out and starts `on_timeout`.
//! - A barrier that fired, failed or timed out stays closed: later completions for its key
//!   are ignored. Closed barriers are forgotten after [`CLOSED_RETENTION_MS`].
//! - Every trigger has a deterministic message id ([`trigger_id`]); the broker ingests an
//!   id once, so a restarted or second semaphore process cannot start a job twice.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

use jobz::jobfile::{SemaphoreSpec, WaitFor};
use jobz::message::{BarrierView, Completion, ConditionView, Params, TaskState};
use jobz::template::Template;
use tracing::{debug, info, warn};

/// A closed barrier is forgotten this long after it closed.
pub const CLOSED_RETENTION_MS: i64 = 7 * 24 * 3600 * 1000;

/// Completions that finished longer ago than this are ignored: their barrier may already
/// have been forgotten, and counting them again could fire it a second time.
pub const MAX_COMPLETION_AGE_MS: i64 = 6 * 24 * 3600 * 1000;

/// Closed barriers stay in the status report this long.
pub const REPORT_CLOSED_FOR_MS: i64 = 3600 * 1000;

/// Most barriers in one status report (the frame limit is 1 MiB).
pub const MAX_REPORTED_BARRIERS: usize = 500;

/// Most run ids listed per barrier in a status report.
pub const MAX_REPORTED_RUNS: usize = 100;

/// One barrier: a semaphore and a rendered key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BarrierId {
    /// Semaphore name.
    pub semaphore: String,
    /// Rendered key (e.g. the date).
    pub key: String,
}

impl fmt::Display for BarrierId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[{}]", self.semaphore, self.key)
    }
}

/// Where a barrier is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarrierState {
    /// Counting.
    Waiting,
    /// Every condition held; `then` was triggered.
    Fired,
    /// An awaited job failed (`on: success`); `on_failure` was triggered.
    Failed,
    /// Not complete within `timeout`; `on_timeout` was triggered.
    TimedOut,
}

impl BarrierState {
    /// The name used in the store and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            BarrierState::Waiting => "waiting",
            BarrierState::Fired => "fired",
            BarrierState::Failed => "failed",
            BarrierState::TimedOut => "timed_out",
        }
    }

    /// Parses [`BarrierState::as_str`].
    pub fn parse(s: &str) -> Option<BarrierState> {
        match s {
            "waiting" => Some(BarrierState::Waiting),
            "fired" => Some(BarrierState::Fired),
            "failed" => Some(BarrierState::Failed),
            "timed_out" => Some(BarrierState::TimedOut),
            _ => None,
        }
    }
}

/// Why a trigger was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TriggerKind {
    /// The barrier fired: a `then` job.
    Then,
    /// An awaited job failed: an `on_failure` job.
    Failure,
    /// The barrier timed out: an `on_timeout` job.
    Timeout,
}

impl TriggerKind {
    /// The name used in the store and in trigger ids.
    pub fn as_str(self) -> &'static str {
        match self {
            TriggerKind::Then => "then",
            TriggerKind::Failure => "failure",
            TriggerKind::Timeout => "timeout",
        }
    }

    /// Parses [`TriggerKind::as_str`].
    pub fn parse(s: &str) -> Option<TriggerKind> {
        match s {
            "then" => Some(TriggerKind::Then),
            "failure" => Some(TriggerKind::Failure),
            "timeout" => Some(TriggerKind::Timeout),
            _ => None,
        }
    }
}

/// One job a closed barrier starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trigger {
    /// Message id of the trigger: the same for every process and every resend.
    pub id: String,
    /// Why.
    pub kind: TriggerKind,
    /// The job to start.
    pub job: String,
    /// Parameters (the service passes those the job declares).
    pub params: Params,
    /// Runs the barrier counted, sorted.
    pub parent_runs: Vec<String>,
    /// The run the broker started, once it accepted the trigger.
    pub run_id: Option<String>,
}

/// A completion a barrier has seen, identified by (job, run, worker).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counted {
    /// The awaited job.
    pub job: String,
    /// Its run.
    pub run_id: String,
    /// The worker that ran it (`task:<id>` when no worker could).
    pub worker: String,
    /// The task.
    pub task_id: String,
    /// Succeeded or failed.
    pub state: TaskState,
    /// How many tasks the broadcast behind it reached.
    pub fanout: u32,
    /// When it finished, ms since the epoch.
    pub finished_at_ms: i64,
}

impl Counted {
    fn from_completion(c: &Completion) -> Counted {
        let worker = if c.worker.is_empty() {
            format!("task:{}", c.task.task_id)
        } else {
            c.worker.clone()
        };
        Counted {
            job: c.job.clone(),
            run_id: c.run_id.clone(),
            worker,
            task_id: c.task.task_id.clone(),
            state: c.state,
            fanout: c.fanout.max(1),
            finished_at_ms: c.finished_at_ms,
        }
    }

    /// The identity a completion counts under.
    pub fn identity(&self) -> (String, String, String) {
        (self.job.clone(), self.run_id.clone(), self.worker.clone())
    }
}

/// The state of one (semaphore, key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Barrier {
    /// Which barrier.
    pub id: BarrierId,
    /// Parameters of the first completion counted: what the triggered jobs get.
    pub params: Params,
    /// Where it is.
    pub state: BarrierState,
    /// When it opened: the first completion's end (never later than when it was seen).
    pub opened_at_ms: i64,
    /// When it fired, failed or timed out.
    pub closed_at_ms: Option<i64>,
    /// Completions seen, by (job, run, worker).
    pub counted: BTreeMap<(String, String, String), Counted>,
    /// Jobs it started or is starting.
    pub triggers: Vec<Trigger>,
}

impl Barrier {
    fn new(id: BarrierId, params: Params, opened_at_ms: i64) -> Barrier {
        Barrier {
            id,
            params,
            state: BarrierState::Waiting,
            opened_at_ms,
            closed_at_ms: None,
            counted: BTreeMap::new(),
            triggers: Vec::new(),
        }
    }

    /// Progress of one condition: (have, need, holds).
    fn condition(&self, wait: &WaitFor, count_failures: bool) -> (u32, Option<u32>, bool) {
        let entries: Vec<&Counted> = self
            .counted
            .values()
            .filter(|c| c.job == wait.job && (count_failures || c.state == TaskState::Succeeded))
            .collect();
        let have = entries.len() as u32;
        match wait.count {
            Some(n) => (have, Some(n), have >= n),
            None => {
                // `all`: every run counted must have reached its own fanout.
                let mut per_run: BTreeMap<&str, (u32, u32)> = BTreeMap::new();
                for c in &entries {
                    let e = per_run.entry(c.run_id.as_str()).or_insert((0, 0));
                    e.0 += 1;
                    e.1 = e.1.max(c.fanout);
                }
                if per_run.is_empty() {
                    return (0, None, false);
                }
                let need = per_run.values().map(|(_, f)| *f).sum();
                let holds = per_run.values().all(|(n, f)| n >= f);
                (have, Some(need), holds)
            }
        }
    }

    fn complete(&self, spec: &SemaphoreSpec) -> bool {
        spec.wait_for
            .iter()
            .all(|w| self.condition(w, spec.count_failures).2)
    }

    /// Run ids counted, sorted and distinct.
    pub fn runs(&self) -> Vec<String> {
        let runs: BTreeSet<&String> = self.counted.values().map(|c| &c.run_id).collect();
        runs.into_iter().cloned().collect()
    }

    /// True once it fired, failed or timed out.
    pub fn is_closed(&self) -> bool {
        self.state != BarrierState::Waiting
    }

    fn close(&mut self, state: BarrierState, kind: TriggerKind, jobs: &[String], now: i64) {
        self.state = state;
        self.closed_at_ms = Some(now);
        let parent_runs = self.runs();
        self.triggers = jobs
            .iter()
            .map(|job| Trigger {
                id: trigger_id(&self.id, kind, job),
                kind,
                job: job.clone(),
                params: self.params.clone(),
                parent_runs: parent_runs.clone(),
                run_id: None,
            })
            .collect();
    }

    /// The barrier as `GET /semaphores` shows it.
    pub fn view(&self, spec: Option<&SemaphoreSpec>, reporter: &str) -> BarrierView {
        let conditions = spec
            .map(|spec| {
                spec.wait_for
                    .iter()
                    .map(|w| {
                        let (have, need, _) = self.condition(w, spec.count_failures);
                        ConditionView {
                            job: w.job.clone(),
                            have,
                            need,
                        }
                    })
                    .collect()
            })
            .unwrap_or_default();
        let mut runs = self.runs();
        runs.truncate(MAX_REPORTED_RUNS);
        BarrierView {
            semaphore: self.id.semaphore.clone(),
            key: self.id.key.clone(),
            params: self.params.clone(),
            conditions,
            state: self.state.as_str().to_owned(),
            runs,
            started_run: self.triggers.iter().find_map(|t| t.run_id.clone()),
            opened_at_ms: self.opened_at_ms,
            reporter: reporter.to_owned(),
        }
    }
}

/// What must be made durable before any trigger it implies is sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Store the barrier as it now is (its row and triggers), plus a newly seen completion.
    Save {
        /// The barrier.
        barrier: BarrierId,
        /// The completion that changed it, if one did.
        counted: Option<Counted>,
    },
    /// Forget the barrier.
    Remove(BarrierId),
}

/// The message id of a barrier's trigger: `sem-<semaphore>-<kind>-<hash>`, where the hash
/// (FNV-1a, 128 bits) covers semaphore, key, kind and job. At most 170 printable ASCII
/// characters with no spaces, the same in every process.
pub fn trigger_id(barrier: &BarrierId, kind: TriggerKind, job: &str) -> String {
    let mut hash: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
    let fields = [
        barrier.semaphore.as_str(),
        barrier.key.as_str(),
        kind.as_str(),
        job,
    ];
    for field in fields {
        // Length-prefixed, so no two different field lists hash the same bytes.
        for b in (field.len() as u64)
            .to_le_bytes()
            .iter()
            .chain(field.as_bytes())
        {
            hash ^= *b as u128;
            hash = hash.wrapping_mul(0x0000_0000_0100_0000_0000_0000_0000_013b);
        }
    }
    // Semaphore names are `[A-Za-z0-9_.-]{1,128}`; the name is there for humans only.
    format!("sem-{}-{}-{hash:032x}", barrier.semaphore, kind.as_str())
}

struct Compiled {
    spec: SemaphoreSpec,
    key: Template,
}

/// Every barrier of every semaphore, and the definitions they follow.
#[derive(Default)]
pub struct Barriers {
    specs: BTreeMap<String, Compiled>,
    barriers: BTreeMap<BarrierId, Barrier>,
    by_trigger: HashMap<String, BarrierId>,
}

impl Barriers {
    /// Barriers resumed from the store; definitions come with [`Barriers::set_specs`].
    pub fn restore(barriers: Vec<Barrier>) -> Barriers {
        let mut this = Barriers::default();
        for barrier in barriers {
            for t in &barrier.triggers {
                this.by_trigger.insert(t.id.clone(), barrier.id.clone());
            }
            this.barriers.insert(barrier.id.clone(), barrier);
        }
        this
    }

    /// Replaces the definitions (after `jobs.d` changed) and fires the waiting barriers that
    /// the new definitions consider complete.
    pub fn set_specs(&mut self, specs: &BTreeMap<String, SemaphoreSpec>, now: i64) -> Vec<Action> {
        self.specs.clear();
        for (name, spec) in specs {
            match Template::parse(&spec.key) {
                Ok(key) => {
                    self.specs.insert(
                        name.clone(),
                        Compiled {
                            spec: spec.clone(),
                            key,
                        },
                    );
                }
                // The loader validated the key; a failure here means a bug, not bad input.
                Err(e) => {
                    warn!(semaphore = %name, error = %e, "ignoring a semaphore with a bad key")
                }
            }
        }
        let mut actions = Vec::new();
        let ids: Vec<BarrierId> = self
            .barriers
            .iter()
            .filter(|(_, b)| !b.is_closed())
            .map(|(id, _)| id.clone())
            .collect();
        for id in ids {
            let Some(compiled) = self.specs.get(&id.semaphore) else {
                continue;
            };
            let Some(barrier) = self.barriers.get_mut(&id) else {
                continue;
            };
            if barrier.complete(&compiled.spec) {
                fire(barrier, &compiled.spec, now);
                self.index_triggers(&id);
                actions.push(Action::Save {
                    barrier: id,
                    counted: None,
                });
            }
        }
        actions
    }

    /// Jobs whose completions some semaphore awaits.
    pub fn awaited_jobs(&self) -> BTreeSet<String> {
        self.specs
            .values()
            .flat_map(|c| c.spec.wait_for.iter().map(|w| w.job.clone()))
            .collect()
    }

    /// The definition of a semaphore.
    pub fn spec(&self, name: &str) -> Option<&SemaphoreSpec> {
        self.specs.get(name).map(|c| &c.spec)
    }

    /// A barrier.
    pub fn get(&self, id: &BarrierId) -> Option<&Barrier> {
        self.barriers.get(id)
    }

    /// Every barrier.
    pub fn iter(&self) -> impl Iterator<Item = &Barrier> {
        self.barriers.values()
    }

    /// Parameter names a semaphore's key uses (what a trigger passes when the broker's
    /// job catalog is not known).
    pub fn key_params(&self, semaphore: &str) -> Vec<String> {
        self.specs
            .get(semaphore)
            .map(|c| c.key.params().into_iter().map(str::to_owned).collect())
            .unwrap_or_default()
    }

    /// Triggers not yet accepted by the broker, with their barrier.
    pub fn pending_triggers(&self) -> impl Iterator<Item = (&BarrierId, &Trigger)> {
        self.barriers.values().flat_map(|b| {
            b.triggers
                .iter()
                .filter(|t| t.run_id.is_none())
                .map(move |t| (&b.id, t))
        })
    }

    /// Counts one completion, live or replayed.
    pub fn on_completion(&mut self, c: &Completion, now: i64) -> Vec<Action> {
        let mut actions = Vec::new();
        if !c.state.is_final() || c.run_id.is_empty() {
            debug!(run_id = %c.run_id, job = %c.job, state = %c.state, "ignoring a completion that is not final");
            return actions;
        }
        if c.finished_at_ms < now - MAX_COMPLETION_AGE_MS {
            debug!(run_id = %c.run_id, job = %c.job, "ignoring a completion older than the retention");
            return actions;
        }
        let awaiting: Vec<String> = self
            .specs
            .iter()
            .filter(|(_, s)| s.spec.wait_for.iter().any(|w| w.job == c.job))
            .map(|(name, _)| name.clone())
            .collect();
        for name in awaiting {
            if let Some(action) = self.count_for(&name, c, now) {
                actions.push(action);
            }
        }
        actions
    }

    fn count_for(&mut self, name: &str, c: &Completion, now: i64) -> Option<Action> {
        let compiled = self.specs.get(name)?;
        let spec = &compiled.spec;
        let key = match compiled.key.render_plain(&c.params) {
            Ok(key) => key,
            Err(e) => {
                debug!(semaphore = %name, run_id = %c.run_id, job = %c.job, error = %e,
                    "completion does not render the key; not counted");
                return None;
            }
        };
        let id = BarrierId {
            semaphore: name.to_owned(),
            key,
        };
        let barrier = self.barriers.entry(id.clone()).or_insert_with(|| {
            info!(semaphore = %id.semaphore, key = %id.key, run_id = %c.run_id, "barrier opened");
            Barrier::new(id.clone(), c.params.clone(), c.finished_at_ms.min(now))
        });
        if barrier.is_closed() {
            debug!(semaphore = %id.semaphore, key = %id.key, run_id = %c.run_id, job = %c.job,
                state = barrier.state.as_str(), "completion for a closed barrier ignored");
            return None;
        }
        let counted = Counted::from_completion(c);
        if barrier.counted.contains_key(&counted.identity()) {
            debug!(semaphore = %id.semaphore, key = %id.key, run_id = %c.run_id, job = %c.job,
                worker = %counted.worker, "duplicate completion ignored");
            return None;
        }
        if let Some(timeout) = spec.timeout_ms {
            let deadline = barrier.opened_at_ms.saturating_add(timeout as i64);
            if c.finished_at_ms > deadline {
                time_out(barrier, spec, now);
                self.index_triggers(&id);
                return Some(Action::Save {
                    barrier: id,
                    counted: None,
                });
            }
        }
        barrier.counted.insert(counted.identity(), counted.clone());
        if c.state == TaskState::Failed && !spec.count_failures {
            warn!(semaphore = %id.semaphore, key = %id.key, run_id = %c.run_id, job = %c.job,
                worker = %counted.worker, on_failure = ?spec.on_failure, "awaited job failed; barrier failed");
            barrier.close(
                BarrierState::Failed,
                TriggerKind::Failure,
                &spec.on_failure,
                now,
            );
        } else if barrier.complete(spec) {
            fire(barrier, spec, now);
        } else {
            info!(semaphore = %id.semaphore, key = %id.key, run_id = %c.run_id, job = %c.job,
                worker = %counted.worker, counted = barrier.counted.len(), "completion counted");
        }
        self.index_triggers(&id);
        Some(Action::Save {
            barrier: id,
            counted: Some(counted),
        })
    }

    /// Times out waiting barriers past their `timeout`.
    pub fn on_tick(&mut self, now: i64) -> Vec<Action> {
        let mut expired = Vec::new();
        for (id, barrier) in &self.barriers {
            if barrier.is_closed() {
                continue;
            }
            let Some(timeout) = self.spec(&id.semaphore).and_then(|s| s.timeout_ms) else {
                continue;
            };
            if now >= barrier.opened_at_ms.saturating_add(timeout as i64) {
                expired.push(id.clone());
            }
        }
        let mut actions = Vec::new();
        for id in expired {
            let Some(compiled) = self.specs.get(&id.semaphore) else {
                continue;
            };
            let Some(barrier) = self.barriers.get_mut(&id) else {
                continue;
            };
            time_out(barrier, &compiled.spec, now);
            self.index_triggers(&id);
            actions.push(Action::Save {
                barrier: id,
                counted: None,
            });
        }
        actions
    }

    /// The broker accepted a trigger as `run_id`.
    pub fn on_accepted(&mut self, trigger_id: &str, run_id: &str) -> Option<Action> {
        let id = self.by_trigger.get(trigger_id)?.clone();
        let barrier = self.barriers.get_mut(&id)?;
        let trigger = barrier.triggers.iter_mut().find(|t| t.id == trigger_id)?;
        if trigger.run_id.as_deref() == Some(run_id) {
            return None;
        }
        trigger.run_id = Some(run_id.to_owned());
        info!(semaphore = %id.semaphore, key = %id.key, job = %trigger.job, kind = trigger.kind.as_str(),
            run_id = %run_id, "trigger accepted");
        Some(Action::Save {
            barrier: id,
            counted: None,
        })
    }

    /// Forgets barriers closed longer than [`CLOSED_RETENTION_MS`] ago (once their triggers
    /// are accepted), and waiting barriers of semaphores no longer defined that opened
    /// longer ago than that. Waiting barriers of defined semaphores are kept: give a
    /// semaphore a `timeout` to bound them.
    pub fn prune(&mut self, now: i64) -> Vec<Action> {
        let cutoff = now - CLOSED_RETENTION_MS;
        let old: Vec<BarrierId> = self
            .barriers
            .values()
            .filter(|b| match b.closed_at_ms {
                Some(at) => at < cutoff && b.triggers.iter().all(|t| t.run_id.is_some()),
                None => b.opened_at_ms < cutoff && !self.specs.contains_key(&b.id.semaphore),
            })
            .map(|b| b.id.clone())
            .collect();
        for id in &old {
            if let Some(b) = self.barriers.remove(id) {
                for t in b.triggers {
                    self.by_trigger.remove(&t.id);
                }
            }
        }
        old.into_iter().map(Action::Remove).collect()
    }

    /// What the status report shows: waiting barriers and those closed within the last
    /// hour, newest first, bounded.
    pub fn views(&self, now: i64, reporter: &str) -> Vec<BarrierView> {
        let mut shown: Vec<&Barrier> = self
            .barriers
            .values()
            .filter(|b| match b.closed_at_ms {
                None => true,
                Some(at) => now - at <= REPORT_CLOSED_FOR_MS,
            })
            .collect();
        shown.sort_by_key(|b| std::cmp::Reverse(b.opened_at_ms));
        shown.truncate(MAX_REPORTED_BARRIERS);
        shown
            .into_iter()
            .map(|b| b.view(self.spec(&b.id.semaphore), reporter))
            .collect()
    }

    fn index_triggers(&mut self, id: &BarrierId) {
        if let Some(b) = self.barriers.get(id) {
            for t in &b.triggers {
                self.by_trigger.insert(t.id.clone(), id.clone());
            }
        }
    }
}

fn fire(barrier: &mut Barrier, spec: &SemaphoreSpec, now: i64) {
    barrier.close(BarrierState::Fired, TriggerKind::Then, &spec.then, now);
    info!(semaphore = %barrier.id.semaphore, key = %barrier.id.key, then = ?spec.then,
        runs = barrier.runs().len(), counted = barrier.counted.len(), "barrier fired");
}

fn time_out(barrier: &mut Barrier, spec: &SemaphoreSpec, now: i64) {
    barrier.close(
        BarrierState::TimedOut,
        TriggerKind::Timeout,
        &spec.on_timeout,
        now,
    );
    warn!(semaphore = %barrier.id.semaphore, key = %barrier.id.key, on_timeout = ?spec.on_timeout,
        counted = barrier.counted.len(), "barrier timed out");
}

#[cfg(test)]
mod tests {
    use super::*;
    use jobz::message::TaskRef;

    const T0: i64 = 1_800_000_000_000;

    fn spec(name: &str, wait_for: &[(&str, Option<u32>)]) -> SemaphoreSpec {
        SemaphoreSpec {
            name: name.into(),
            wait_for: wait_for
                .iter()
                .map(|(job, count)| WaitFor {
                    job: job.to_string(),
                    count: *count,
                })
                .collect(),
            key: "{date}".into(),
            then: vec!["publish".into()],
            timeout_ms: None,
            on_timeout: vec!["alert".into()],
            on_failure: vec!["cleanup".into()],
            count_failures: false,
        }
    }

    fn barriers(specs: Vec<SemaphoreSpec>) -> Barriers {
        let mut b = Barriers::default();
        let map = specs.into_iter().map(|s| (s.name.clone(), s)).collect();
        assert!(b.set_specs(&map, T0).is_empty());
        b
    }

    fn done(job: &str, run: &str, worker: &str, date: &str, fanout: u32) -> Completion {
        Completion {
            run_id: run.into(),
            step_id: format!("step-{run}-{job}"),
            task: TaskRef {
                task_id: format!("task-{run}-{job}-{worker}"),
                attempt: 1,
            },
            job: job.into(),
            worker: worker.into(),
            params: [("date".to_string(), date.to_string())].into(),
            state: TaskState::Succeeded,
            finished_at_ms: T0,
            fanout,
        }
    }

    fn failed(mut c: Completion) -> Completion {
        c.state = TaskState::Failed;
        c
    }

    fn id(sem: &str, key: &str) -> BarrierId {
        BarrierId {
            semaphore: sem.into(),
            key: key.into(),
        }
    }

    fn state(b: &Barriers, sem: &str, key: &str) -> Option<BarrierState> {
        b.get(&id(sem, key)).map(|b| b.state)
    }

    fn pending_jobs(b: &Barriers) -> Vec<String> {
        b.pending_triggers().map(|(_, t)| t.job.clone()).collect()
    }

    #[test]
    fn fires_once_after_n_distinct_completions() {
        let mut b = barriers(vec![spec("s", &[("s4", Some(3))])]);
        for w in ["w1", "w2"] {
            let actions = b.on_completion(&done("s4", "r1", w, "d1", 3), T0);
            assert_eq!(actions.len(), 1);
        }
        assert_eq!(state(&b, "s", "d1"), Some(BarrierState::Waiting));
        assert!(pending_jobs(&b).is_empty());
        b.on_completion(&done("s4", "r1", "w3", "d1", 3), T0 + 5);
        assert_eq!(state(&b, "s", "d1"), Some(BarrierState::Fired));
        let triggers: Vec<&Trigger> = b.pending_triggers().map(|(_, t)| t).collect();
        assert_eq!(triggers.len(), 1);
        assert_eq!(triggers[0].job, "publish");
        assert_eq!(triggers[0].kind, TriggerKind::Then);
        assert_eq!(triggers[0].parent_runs, vec!["r1".to_string()]);
        assert_eq!(triggers[0].params["date"], "d1");
        // A fourth completion changes nothing: the barrier is closed.
        assert!(b
            .on_completion(&done("s4", "r1", "w4", "d1", 3), T0 + 6)
            .is_empty());
        assert_eq!(b.pending_triggers().count(), 1);
    }

    #[test]
    fn a_replayed_completion_never_counts_twice() {
        let mut b = barriers(vec![spec("s", &[("s4", Some(2))])]);
        let c = done("s4", "r1", "w1", "d1", 2);
        assert_eq!(b.on_completion(&c, T0).len(), 1);
        for _ in 0..5 {
            assert!(
                b.on_completion(&c, T0 + 1).is_empty(),
                "a replay is a no-op"
            );
        }
        // The same (run, worker, job) under another task id or attempt is still one.
        let mut again = c.clone();
        again.task.task_id = "other".into();
        again.task.attempt = 2;
        assert!(b.on_completion(&again, T0 + 2).is_empty());
        assert_eq!(state(&b, "s", "d1"), Some(BarrierState::Waiting));
        let view = b.get(&id("s", "d1")).unwrap().view(b.spec("s"), "me");
        assert_eq!(view.conditions[0].have, 1);
        assert_eq!(view.conditions[0].need, Some(2));
    }

    #[test]
    fn keys_keep_barriers_apart() {
        let mut b = barriers(vec![spec("s", &[("s4", Some(2))])]);
        b.on_completion(&done("s4", "ra", "w1", "d1", 2), T0);
        b.on_completion(&done("s4", "rb", "w1", "d2", 2), T0);
        b.on_completion(&done("s4", "rb", "w2", "d2", 2), T0);
        assert_eq!(state(&b, "s", "d1"), Some(BarrierState::Waiting));
        assert_eq!(state(&b, "s", "d2"), Some(BarrierState::Fired));
        b.on_completion(&done("s4", "ra", "w2", "d1", 2), T0);
        assert_eq!(state(&b, "s", "d1"), Some(BarrierState::Fired));
        let mut by_key: Vec<(String, String, Vec<String>)> = b
            .pending_triggers()
            .map(|(id, t)| {
                (
                    id.key.clone(),
                    t.params["date"].clone(),
                    t.parent_runs.clone(),
                )
            })
            .collect();
        by_key.sort();
        assert_eq!(
            by_key,
            vec![
                ("d1".into(), "d1".into(), vec!["ra".into()]),
                ("d2".into(), "d2".into(), vec!["rb".into()])
            ]
        );
    }

    #[test]
    fn a_completion_without_the_key_param_is_not_counted() {
        let mut b = barriers(vec![spec("s", &[("s4", Some(1))])]);
        let mut c = done("s4", "r1", "w1", "d1", 1);
        c.params.clear();
        assert!(b.on_completion(&c, T0).is_empty());
        assert_eq!(b.iter().count(), 0);
        // Jobs no semaphore awaits are ignored too.
        assert!(b
            .on_completion(&done("other", "r1", "w1", "d1", 1), T0)
            .is_empty());
    }

    #[test]
    fn count_all_waits_for_every_task_of_each_run() {
        let mut b = barriers(vec![spec("s", &[("s4", None)])]);
        let first = b.on_completion(&done("s4", "r1", "w1", "d1", 3), T0);
        assert_eq!(first.len(), 1);
        let view = b.get(&id("s", "d1")).unwrap().view(b.spec("s"), "me");
        assert_eq!(
            (view.conditions[0].have, view.conditions[0].need),
            (1, Some(3))
        );
        // A second run of the same key must complete as well.
        b.on_completion(&done("s4", "r2", "w1", "d1", 1), T0);
        b.on_completion(&done("s4", "r1", "w2", "d1", 3), T0);
        assert_eq!(state(&b, "s", "d1"), Some(BarrierState::Waiting));
        b.on_completion(&done("s4", "r1", "w3", "d1", 3), T0);
        assert_eq!(state(&b, "s", "d1"), Some(BarrierState::Fired));
        let (_, t) = b.pending_triggers().next().unwrap();
        assert_eq!(t.parent_runs, vec!["r1".to_string(), "r2".to_string()]);
    }

    #[test]
    fn every_condition_must_hold() {
        let mut b = barriers(vec![spec("s", &[("a", Some(1)), ("b", Some(2))])]);
        b.on_completion(&done("a", "r1", "w1", "d1", 1), T0);
        b.on_completion(&done("b", "r2", "w1", "d1", 2), T0);
        assert_eq!(state(&b, "s", "d1"), Some(BarrierState::Waiting));
        b.on_completion(&done("b", "r2", "w2", "d1", 2), T0);
        assert_eq!(state(&b, "s", "d1"), Some(BarrierState::Fired));
    }

    #[test]
    fn a_failure_fails_the_barrier_at_once_unless_on_finished() {
        let mut b = barriers(vec![spec("s", &[("s4", Some(3))])]);
        b.on_completion(&done("s4", "r1", "w1", "d1", 3), T0);
        b.on_completion(&failed(done("s4", "r1", "w2", "d1", 3)), T0 + 1);
        assert_eq!(state(&b, "s", "d1"), Some(BarrierState::Failed));
        let (_, t) = b.pending_triggers().next().unwrap();
        assert_eq!((t.job.as_str(), t.kind), ("cleanup", TriggerKind::Failure));
        // The rest arriving later does not fire it.
        b.on_completion(&done("s4", "r1", "w2", "d1", 3), T0 + 2);
        b.on_completion(&done("s4", "r1", "w3", "d1", 3), T0 + 3);
        assert_eq!(state(&b, "s", "d1"), Some(BarrierState::Failed));
        assert_eq!(pending_jobs(&b), vec!["cleanup".to_string()]);

        let mut finished = spec("f", &[("s4", Some(2))]);
        finished.count_failures = true;
        let mut b = barriers(vec![finished]);
        b.on_completion(&failed(done("s4", "r1", "w1", "d1", 2)), T0);
        assert_eq!(state(&b, "f", "d1"), Some(BarrierState::Waiting));
        b.on_completion(&done("s4", "r1", "w2", "d1", 2), T0);
        assert_eq!(state(&b, "f", "d1"), Some(BarrierState::Fired));
    }

    #[test]
    fn a_failure_without_on_failure_just_closes() {
        let mut s = spec("s", &[("s4", Some(2))]);
        s.on_failure.clear();
        let mut b = barriers(vec![s]);
        b.on_completion(&failed(done("s4", "r1", "w1", "d1", 2)), T0);
        assert_eq!(state(&b, "s", "d1"), Some(BarrierState::Failed));
        assert_eq!(b.pending_triggers().count(), 0);
    }

    #[test]
    fn timeout_runs_on_timeout_once() {
        let mut s = spec("s", &[("s4", Some(2))]);
        s.timeout_ms = Some(2000);
        let mut b = barriers(vec![s]);
        b.on_completion(&done("s4", "r1", "w1", "d1", 2), T0);
        assert!(b.on_tick(T0 + 1999).is_empty());
        let actions = b.on_tick(T0 + 2000);
        assert_eq!(actions.len(), 1);
        assert_eq!(state(&b, "s", "d1"), Some(BarrierState::TimedOut));
        assert!(b.on_tick(T0 + 5000).is_empty(), "times out once");
        // The last completion arriving late does not fire it.
        assert!(b
            .on_completion(&done("s4", "r1", "w2", "d1", 2), T0 + 6000)
            .is_empty());
        let triggers: Vec<(String, TriggerKind)> = b
            .pending_triggers()
            .map(|(_, t)| (t.job.clone(), t.kind))
            .collect();
        assert_eq!(triggers, vec![("alert".to_string(), TriggerKind::Timeout)]);
    }

    #[test]
    fn a_completion_that_finished_after_the_timeout_times_the_barrier_out() {
        // Replayed after a long outage: both completions arrive at once, the second one
        // finished three seconds after the first with a two-second timeout.
        let mut s = spec("s", &[("s4", Some(2))]);
        s.timeout_ms = Some(2000);
        let mut b = barriers(vec![s]);
        let now = T0 + 60_000;
        b.on_completion(&done("s4", "r1", "w1", "d1", 2), now);
        let mut late = done("s4", "r1", "w2", "d1", 2);
        late.finished_at_ms = T0 + 3000;
        b.on_completion(&late, now);
        assert_eq!(state(&b, "s", "d1"), Some(BarrierState::TimedOut));
    }

    #[test]
    fn trigger_ids_are_deterministic_and_distinct() {
        let a = trigger_id(&id("s", "d1"), TriggerKind::Then, "publish");
        assert_eq!(a, trigger_id(&id("s", "d1"), TriggerKind::Then, "publish"));
        assert!(a.starts_with("sem-s-then-"), "{a}");
        let others = [
            trigger_id(&id("s", "d2"), TriggerKind::Then, "publish"),
            trigger_id(&id("s", "d1"), TriggerKind::Timeout, "publish"),
            trigger_id(&id("s", "d1"), TriggerKind::Then, "publish2"),
            trigger_id(&id("t", "d1"), TriggerKind::Then, "publish"),
            // Field boundaries matter: ("s", "d1x") is not ("s", "d1") + "x…".
            trigger_id(&id("s", "d1p"), TriggerKind::Then, "ublish"),
        ];
        for o in &others {
            assert_ne!(&a, o);
        }
        let long = trigger_id(
            &id(&"n".repeat(128), &"k".repeat(5000)),
            TriggerKind::Timeout,
            &"j".repeat(128),
        );
        assert!(long.len() <= 200, "{}", long.len());
        assert!(long.bytes().all(|b| b.is_ascii_graphic()));
    }

    #[test]
    fn two_processes_seeing_completions_in_another_order_send_the_same_trigger() {
        let s = spec("s", &[("s4", Some(3))]);
        let cs: Vec<Completion> = ["w1", "w2", "w3"]
            .iter()
            .enumerate()
            .map(|(i, w)| done("s4", &format!("r{i}"), w, "d1", 1))
            .collect();
        let mut a = barriers(vec![s.clone()]);
        let mut b = barriers(vec![s]);
        for c in &cs {
            a.on_completion(c, T0);
        }
        for c in cs.iter().rev() {
            b.on_completion(c, T0 + 100);
        }
        let ta: Vec<Trigger> = a.pending_triggers().map(|(_, t)| t.clone()).collect();
        let tb: Vec<Trigger> = b.pending_triggers().map(|(_, t)| t.clone()).collect();
        assert_eq!(ta.len(), 1);
        assert_eq!(ta[0].id, tb[0].id);
        assert_eq!(ta[0].parent_runs, tb[0].parent_runs);
    }

    #[test]
    fn accepted_triggers_stop_being_pending_and_survive_restore() {
        let mut b = barriers(vec![spec("s", &[("s4", Some(1))])]);
        b.on_completion(&done("s4", "r1", "w1", "d1", 1), T0);
        let (_, t) = b.pending_triggers().next().unwrap();
        let tid = t.id.clone();
        assert!(b.on_accepted(&tid, "run-9").is_some());
        assert!(
            b.on_accepted(&tid, "run-9").is_none(),
            "a repeat changes nothing"
        );
        assert_eq!(b.pending_triggers().count(), 0);
        let view = b.get(&id("s", "d1")).unwrap().view(b.spec("s"), "me");
        assert_eq!(view.started_run.as_deref(), Some("run-9"));
        assert_eq!(view.state, "fired");

        let saved: Vec<Barrier> = b.iter().cloned().collect();
        let mut restored = Barriers::restore(saved);
        let specs = [("s".to_string(), spec("s", &[("s4", Some(1))]))].into();
        assert!(restored.set_specs(&specs, T0).is_empty());
        assert!(restored
            .on_completion(&done("s4", "r1", "w1", "d1", 1), T0)
            .is_empty());
        assert_eq!(restored.pending_triggers().count(), 0);
    }

    #[test]
    fn a_restored_waiting_barrier_keeps_its_count() {
        let mut b = barriers(vec![spec("s", &[("s4", Some(3))])]);
        b.on_completion(&done("s4", "r1", "w1", "d1", 3), T0);
        b.on_completion(&done("s4", "r1", "w2", "d1", 3), T0);
        let mut restored = Barriers::restore(b.iter().cloned().collect());
        let specs = [("s".to_string(), spec("s", &[("s4", Some(3))]))].into();
        restored.set_specs(&specs, T0);
        // Catch-up replays what was counted: no change.
        assert!(restored
            .on_completion(&done("s4", "r1", "w1", "d1", 3), T0)
            .is_empty());
        assert_eq!(state(&restored, "s", "d1"), Some(BarrierState::Waiting));
        restored.on_completion(&done("s4", "r1", "w3", "d1", 3), T0);
        assert_eq!(state(&restored, "s", "d1"), Some(BarrierState::Fired));
    }

    #[test]
    fn a_lowered_count_fires_on_reload() {
        let mut b = barriers(vec![spec("s", &[("s4", Some(3))])]);
        b.on_completion(&done("s4", "r1", "w1", "d1", 3), T0);
        b.on_completion(&done("s4", "r1", "w2", "d1", 3), T0);
        let specs = [("s".to_string(), spec("s", &[("s4", Some(2))]))].into();
        let actions = b.set_specs(&specs, T0 + 1);
        assert_eq!(actions.len(), 1);
        assert_eq!(state(&b, "s", "d1"), Some(BarrierState::Fired));
    }

    #[test]
    fn old_completions_are_ignored_and_closed_barriers_are_pruned() {
        let mut b = barriers(vec![spec("s", &[("s4", Some(1))])]);
        let mut old = done("s4", "r0", "w1", "d0", 1);
        old.finished_at_ms = T0 - MAX_COMPLETION_AGE_MS - 1;
        assert!(b.on_completion(&old, T0).is_empty());

        b.on_completion(&done("s4", "r1", "w1", "d1", 1), T0);
        let tid = b.pending_triggers().next().unwrap().1.id.clone();
        // Not pruned while its trigger is unaccepted, nor before the retention.
        assert!(b.prune(T0 + CLOSED_RETENTION_MS + 1).is_empty());
        b.on_accepted(&tid, "run-1");
        assert!(b.prune(T0 + 10).is_empty());
        assert_eq!(
            b.prune(T0 + CLOSED_RETENTION_MS + 1),
            vec![Action::Remove(id("s", "d1"))]
        );
        assert_eq!(b.iter().count(), 0);

        // A waiting barrier stays while its semaphore is defined, and goes a week after its
        // semaphore was removed from the job files.
        let mut b = barriers(vec![spec("s", &[("s4", Some(2))])]);
        b.on_completion(&done("s4", "r2", "w1", "d2", 2), T0);
        let much_later = T0 + CLOSED_RETENTION_MS + 1;
        assert!(b.prune(much_later).is_empty());
        b.set_specs(&BTreeMap::new(), much_later);
        assert_eq!(b.prune(much_later), vec![Action::Remove(id("s", "d2"))]);
    }

    #[test]
    fn views_show_open_and_recently_closed_barriers() {
        let mut b = barriers(vec![spec("s", &[("s4", Some(2))])]);
        b.on_completion(&done("s4", "r1", "w1", "d1", 2), T0);
        b.on_completion(&done("s4", "r2", "w1", "d2", 2), T0);
        b.on_completion(&done("s4", "r2", "w2", "d2", 2), T0);
        let views = b.views(T0 + 1000, "semaphore:me");
        assert_eq!(views.len(), 2);
        let d2 = views.iter().find(|v| v.key == "d2").unwrap();
        assert_eq!(d2.state, "fired");
        assert_eq!(d2.runs, vec!["r2".to_string()]);
        assert_eq!(d2.reporter, "semaphore:me");
        let views = b.views(T0 + REPORT_CLOSED_FOR_MS + 1, "semaphore:me");
        assert_eq!(views.len(), 1);
        assert_eq!(views[0].key, "d1");
    }

    #[test]
    fn a_completion_with_no_worker_counts_by_task() {
        let mut s = spec("s", &[("s4", Some(2))]);
        s.count_failures = true;
        let mut b = barriers(vec![s]);
        let mut a = failed(done("s4", "r1", "", "d1", 2));
        a.task.task_id = "t1".into();
        let mut c = a.clone();
        c.task.task_id = "t2".into();
        b.on_completion(&a, T0);
        b.on_completion(&c, T0);
        assert_eq!(state(&b, "s", "d1"), Some(BarrierState::Fired));
    }
}
