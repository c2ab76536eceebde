//! Runs that wait before they start. A *scheduled* run (`delay=`, `at=`) is due at a time:
//! the tick takes the due ones from an index by time (no scan of the runs). A *waiting* run
//! depends on others (`depends=`): it is indexed under each of them, and when one ends it
//! is told: one that succeeded is done with; one that failed or was cancelled fails it, with
//! a reason naming that run, and so on down the chain. A held run whose wait is over starts
//! as if it had been triggered then (its parameters were checked when it was triggered).
//!
//! A run that depends on others and is due later is `scheduled` until due, then `waiting`
//! if some have not ended yet; a dependency that fails fails it whichever it is.

use jobz::message::RunState;
use tracing::{info, warn};

use super::effects::{Effects, Write};
use super::feed;
use super::recent::Recent;
use super::Engine;
use crate::ids::RunId;
use jobz::message::FeedKind;

/// Ended runs whose final state is remembered (older ones are asked of the store).
const REMEMBERED_ENDINGS: usize = 10_000;

/// How the most recently ended runs ended: what a trigger's `depends=` needs without
/// asking the store (bounded: the oldest go).
#[derive(Debug)]
pub(super) struct FinishedRuns(Recent<RunId, RunState>);

impl Default for FinishedRuns {
    fn default() -> Self {
        FinishedRuns(Recent::new(REMEMBERED_ENDINGS))
    }
}

impl FinishedRuns {
    pub fn remember(&mut self, run_id: RunId, state: RunState) {
        self.0.remember(run_id, state);
    }

    pub fn state_of(&self, run_id: &RunId) -> Option<RunState> {
        self.0.get(run_id).copied()
    }
}

/// Why a run fails when a run it depends on ended in `state`.
pub(super) fn dependency_reason(dependency: &RunId, state: RunState) -> String {
    match state {
        RunState::Cancelled => format!("dependency run {dependency} was cancelled"),
        _ => format!("dependency run {dependency} failed"),
    }
}

impl Engine {
    /// Scheduled runs that are due: each starts, or waits for the runs it depends on that
    /// have not ended yet.
    pub(super) fn release_due(&mut self, fx: &mut Effects, now: i64) {
        for run_id in self.active.take_due(now) {
            let waits = self.active.waiting_for(&run_id).next().is_some();
            if !waits {
                self.start_held(fx, &run_id, now);
                continue;
            }
            if let Some(run) = self.active.run_mut(&run_id) {
                run.state = RunState::Waiting;
                info!(run_id = %run_id, job = %run.job, "scheduled run is due; it waits for the runs it depends on");
                fx.writes.push(Write::Run(run.clone()));
            }
        }
    }

    /// A held run starts as if it were triggered now: its first step is made and placed.
    fn start_held(&mut self, fx: &mut Effects, run_id: &RunId, now: i64) {
        let Some(run) = self.active.run_mut(run_id) else {
            return;
        };
        let waited = run.state;
        run.state = RunState::Pending;
        let job = run.job.clone();
        info!(run_id = %run_id, job = %job, %waited, "held run starts");
        fx.writes.push(Write::Run(run.clone()));
        feed::run_event(fx, FeedKind::RunDue, run, now);
        self.count("held_runs_started");
        self.start_step(fx, run_id, &job, None, now);
        self.finish_run_if_done(fx, run_id, now);
    }

    /// What follows from a run ending in `state`: it is remembered, and each run waiting
    /// for it is done waiting for it (and starts if it waits for nothing more and is not
    /// due later), or fails if it did not succeed, which its own dependents learn in turn.
    pub(super) fn run_ended(
        &mut self,
        fx: &mut Effects,
        run_id: &RunId,
        state: RunState,
        now: i64,
    ) {
        let mut ended = vec![(run_id.clone(), state)];
        while let Some((run_id, state)) = ended.pop() {
            self.finished.remember(run_id.clone(), state);
            for (dependent, left) in self.active.take_dependents(&run_id) {
                if state == RunState::Succeeded {
                    let waiting = self
                        .active
                        .run(&dependent)
                        .is_some_and(|r| r.state == RunState::Waiting);
                    if left == 0 && waiting {
                        self.start_held(fx, &dependent, now);
                    }
                } else {
                    let reason = dependency_reason(&run_id, state);
                    if self.fail_held(fx, &dependent, reason, now) {
                        ended.push((dependent, RunState::Failed));
                    }
                }
            }
        }
    }

    /// Ends a held run as failed, for `reason`; false if it is not active. The runs that
    /// wait for it are left to the caller ([`Engine::run_ended`]).
    fn fail_held(&mut self, fx: &mut Effects, run_id: &RunId, reason: String, now: i64) -> bool {
        let Some(mut run) = self.active.remove_run(run_id) else {
            return false;
        };
        warn!(run_id = %run_id, job = %run.job, %reason, "run failed before it started");
        run.state = RunState::Failed;
        run.finished_at_ms = Some(now);
        run.reason = Some(reason);
        self.count("runs_failed");
        self.meters.run_ended(&run.job, RunState::Failed);
        fx.writes.push(Write::Run(run.clone()));
        self.tell_run_ended(fx, FeedKind::RunFailed, &run, now);
        true
    }

    /// What the restore left for the first tick: held runs whose dependency the store says
    /// ended otherwise than in success (never, if every write went through), and cancelled
    /// runs whose tasks must still be stopped.
    pub(super) fn resume_fixups(&mut self, fx: &mut Effects, now: i64) {
        for (run_id, dependency, state) in std::mem::take(&mut self.resumed_broken) {
            let reason = dependency_reason(&dependency, state);
            if self.fail_held(fx, &run_id, reason, now) {
                self.run_ended(fx, &run_id, RunState::Failed, now);
            }
        }
        for run_id in std::mem::take(&mut self.resumed_cancels) {
            self.stop_cancelled(fx, &run_id, now);
        }
    }
}
