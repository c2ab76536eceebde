//! Queries held until a run ends (`Query::RunEnd`): how `&wait=` learns of a run's end
//! when it happens instead of polling for it.
//!
//! A watcher is the query's reply address and message id, kept under the run until the
//! run ends (then the store answers it with the final run, after the commit that ended
//! it) or until the wait it asked for is over (then it is dropped: its client stopped
//! asking). A client resends an unanswered query under the same id, so a watcher is kept
//! once per (sender, id), and a broker restart loses nothing for long: the next resend
//! registers it again. Bounded in total and per sender; beyond that a query is answered at
//! once with the run as it is, and its client polls.

use std::collections::HashMap;

use jobz::envelope::MessageId;

use crate::ids::RunId;

/// Most watchers at once.
pub const MAX_WATCHERS: usize = 10_000;

/// Most watchers of one sender.
pub const MAX_WATCHERS_PER_SENDER: usize = 1_000;

/// Longest wait a watcher is kept for.
pub const MAX_WATCH_MS: i64 = 3_600_000;

/// A held query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Watcher {
    pub reply_to: String,
    pub in_reply_to: MessageId,
    /// Dropped unanswered after this (broker time, ms).
    pub until_ms: i64,
}

/// The held queries, by run.
#[derive(Debug, Default)]
pub struct RunWatchers {
    by_run: HashMap<RunId, Vec<Watcher>>,
    per_sender: HashMap<String, usize>,
    total: usize,
}

impl RunWatchers {
    /// Holds `watcher` until `run_id` ends. False if it cannot be held (too many): the
    /// caller answers at once. A resend of a held query is held once.
    pub fn watch(&mut self, run_id: &RunId, watcher: Watcher) -> bool {
        if let Some(held) = self.by_run.get_mut(run_id) {
            if let Some(same) = held
                .iter_mut()
                .find(|w| w.reply_to == watcher.reply_to && w.in_reply_to == watcher.in_reply_to)
            {
                same.until_ms = watcher.until_ms;
                return true;
            }
        }
        let of_sender = self.per_sender.get(&watcher.reply_to).copied().unwrap_or(0);
        if self.total >= MAX_WATCHERS || of_sender >= MAX_WATCHERS_PER_SENDER {
            return false;
        }
        *self.per_sender.entry(watcher.reply_to.clone()).or_default() += 1;
        self.total += 1;
        self.by_run.entry(run_id.clone()).or_default().push(watcher);
        true
    }

    /// The watchers of a run that ended, no longer held.
    pub fn take(&mut self, run_id: &RunId) -> Vec<Watcher> {
        let taken = self.by_run.remove(run_id).unwrap_or_default();
        for watcher in &taken {
            self.forget(&watcher.reply_to);
        }
        taken
    }

    /// Drops the watchers whose wait is over at `now`; how many.
    pub fn expire(&mut self, now: i64) -> usize {
        let mut dropped = Vec::new();
        self.by_run.retain(|_, held| {
            held.retain(|w| {
                let keep = w.until_ms > now;
                if !keep {
                    dropped.push(w.reply_to.clone());
                }
                keep
            });
            !held.is_empty()
        });
        for sender in &dropped {
            self.forget(sender);
        }
        dropped.len()
    }

    /// True if nothing is held.
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    fn forget(&mut self, sender: &str) {
        self.total = self.total.saturating_sub(1);
        if let Some(n) = self.per_sender.get_mut(sender) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_sender.remove(sender);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn watcher(sender: &str, id: &str, until_ms: i64) -> Watcher {
        Watcher {
            reply_to: sender.into(),
            in_reply_to: id.into(),
            until_ms,
        }
    }

    #[test]
    fn a_resent_query_is_held_once_and_taken_when_the_run_ends() {
        let mut w = RunWatchers::default();
        let run = RunId::from("r1");
        assert!(w.watch(&run, watcher("frontend:f", "m1", 100)));
        assert!(w.watch(&run, watcher("frontend:f", "m1", 200)), "a resend");
        assert!(w.watch(&run, watcher("frontend:g", "m9", 100)));
        let taken = w.take(&run);
        assert_eq!(taken.len(), 2);
        assert_eq!(taken[0].until_ms, 200);
        assert!(w.is_empty());
        assert!(w.take(&run).is_empty());
    }

    #[test]
    fn one_sender_cannot_hold_every_place_and_waits_that_are_over_are_dropped() {
        let mut w = RunWatchers::default();
        for i in 0..MAX_WATCHERS_PER_SENDER {
            assert!(w.watch(
                &RunId::from(format!("r{i}")),
                watcher("client:x", &format!("m{i}"), 10)
            ));
        }
        assert!(!w.watch(&RunId::from("r"), watcher("client:x", "more", 10)));
        assert!(
            w.watch(&RunId::from("r"), watcher("frontend:f", "m", 50)),
            "others still can"
        );
        assert_eq!(w.expire(10), MAX_WATCHERS_PER_SENDER);
        assert!(w.watch(&RunId::from("r"), watcher("client:x", "again", 20)));
        assert_eq!(w.expire(100), 2);
        assert!(w.is_empty());
    }
}
