//! Notices (JobX's and qless's notifications): when a run ends, each `notify:` entry of its
//! job that asks for that end becomes a [`Notice`], journaled in the commit that ends the
//! run (so a crash loses none), then delivered by the notifier thread ([`spawn`]): a
//! webhook POST with a signed JSON body, or an e-mail over SMTP. A failed delivery is
//! tried again after 1 s, 2 s, 4 s … (at most 10 min apart) for a day; each attempt is
//! journaled, so a restarted broker goes on where it was. Delivery is at least once: a
//! receiver tells a repeat by `X-Jobz-Delivery` (the notice's id).

pub mod config;
mod deliver;

use std::collections::{BTreeSet, HashMap};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use jobz::jobfile::NotifyTarget;
use jobz::message::FeedKind;
use serde_json::json;
use tracing::{info, warn};

use crate::engine::{Effects, Write};
use crate::ids::RunId;
use crate::model::Run;
pub use config::NotifyConfig;

/// A notice is given up this long after it was made.
pub const GIVE_UP_AFTER_MS: i64 = 24 * 3600 * 1000;

/// Longest wait between two attempts.
const MAX_BACKOFF_MS: i64 = 600_000;

/// One notice to deliver.
#[derive(Debug, Clone, PartialEq)]
pub struct Notice {
    /// `<run id>/<index of the job's notify entry>`: unique, and the same however often
    /// it is tried (`X-Jobz-Delivery`).
    pub id: String,
    /// The run that ended.
    pub run_id: RunId,
    /// Where it goes.
    pub target: NotifyTarget,
    /// `run.succeeded`, `run.failed` or `run.cancelled`.
    pub event: String,
    /// What is told, as JSON (without the link, which the notifier adds).
    pub payload: String,
    /// When the run ended, ms since the epoch.
    pub created_at_ms: i64,
    /// Attempts so far.
    pub attempts: u32,
    /// Not tried again before this.
    pub next_at_ms: i64,
}

impl Notice {
    /// The notice of entry `index` of `run`'s job, for its end told as `kind`.
    pub fn of_run(
        run: &Run,
        index: usize,
        target: NotifyTarget,
        kind: FeedKind,
        now: i64,
    ) -> Notice {
        let event = kind.as_str().to_owned();
        let id = format!("{}/{index}", run.run_id);
        let payload = json!({
            "event": event,
            "delivery": id,
            "run": {
                "run_id": run.run_id.as_str(),
                "job": run.job,
                "state": run.state.as_str(),
                "params": run.params,
                "tags": run.tags,
                "parent_runs": run.parent_runs.iter().map(RunId::as_str).collect::<Vec<_>>(),
                "created_at": jobz::format_time_ms(run.created_at_ms),
                "finished_at": jobz::format_time_ms(run.finished_at_ms.unwrap_or(now)),
                "reason": run.reason,
            },
        });
        Notice {
            id,
            run_id: run.run_id.clone(),
            target,
            event,
            payload: payload.to_string(),
            created_at_ms: now,
            attempts: 0,
            next_at_ms: now,
        }
    }
}

/// How an attempt ended, as the journal records it.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Tried again at `next_at_ms`.
    Retry {
        /// When.
        next_at_ms: i64,
    },
    /// Delivered.
    Delivered,
    /// Not delivered, and not tried again (a day passed, or the target is unknown).
    GaveUp,
}

/// An attempt's record: a partial update of the notice's row.
#[derive(Debug, Clone, PartialEq)]
pub struct Tried {
    /// The notice.
    pub id: String,
    /// Attempts so far, this one included.
    pub attempts: u32,
    /// When it ended.
    pub at_ms: i64,
    /// What the receiver said, when it was not a success.
    pub error: Option<String>,
    /// What happens next.
    pub outcome: Outcome,
}

/// When attempt `attempts + 1` follows a failed attempt number `attempts`.
fn next_attempt_ms(notice: &Notice, now: i64) -> Option<i64> {
    let exponent = notice.attempts.saturating_sub(1).min(20);
    let wait = (1000i64 << exponent).min(MAX_BACKOFF_MS);
    let next = now + wait;
    (next - notice.created_at_ms <= GIVE_UP_AFTER_MS).then_some(next)
}

/// The notices waiting for their next attempt, soonest first.
#[derive(Debug, Default)]
struct Queue {
    due: BTreeSet<(i64, String)>,
    notices: HashMap<String, Notice>,
}

impl Queue {
    fn add(&mut self, notice: Notice) {
        if let Some(old) = self.notices.remove(&notice.id) {
            self.due.remove(&(old.next_at_ms, old.id));
        }
        self.due.insert((notice.next_at_ms, notice.id.clone()));
        self.notices.insert(notice.id.clone(), notice);
    }

    fn next_due(&self) -> Option<i64> {
        self.due.first().map(|(at, _)| *at)
    }

    fn take_due(&mut self, now: i64) -> Option<Notice> {
        let (at, id) = self.due.first()?.clone();
        if at > now {
            return None;
        }
        self.due.remove(&(at, id.clone()));
        self.notices.remove(&id)
    }
}

/// Starts the notifier: `pending` (from the store) and what `incoming` brings (from the
/// journal, after each commit) are delivered; each attempt goes to the journal as an
/// effect on `journal`. It ends when `stop` is closed.
pub fn spawn(
    config: std::sync::Arc<NotifyConfig>,
    pending: Vec<Notice>,
    incoming: Receiver<Notice>,
    journal: Sender<Effects>,
    stop: Receiver<()>,
) -> anyhow::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("notifier".into())
        .spawn(move || {
            let mut queue = Queue::default();
            for notice in pending {
                queue.add(notice);
            }
            let sender = deliver::Sender::new(&config);
            loop {
                if !matches!(stop.try_recv(), Err(crossbeam_channel::TryRecvError::Empty)) {
                    return;
                }
                let now = jobz::now_ms();
                if let Some(notice) = queue.take_due(now) {
                    let tried = attempt(&sender, notice, &mut queue);
                    let fx = Effects {
                        writes: vec![Write::NoticeTried(tried)],
                        ..Effects::default()
                    };
                    if journal.send(fx).is_err() {
                        return;
                    }
                    continue;
                }
                let wait = queue.next_due().map_or(500, |at| (at - now).clamp(1, 500));
                match incoming.recv_timeout(Duration::from_millis(wait as u64)) {
                    Ok(notice) => queue.add(notice),
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            }
        })
        .context("starting the notifier thread")
}

/// Delivers `notice` once; what to journal. A notice to try again goes back in `queue`.
fn attempt(sender: &deliver::Sender, mut notice: Notice, queue: &mut Queue) -> Tried {
    notice.attempts += 1;
    let result = sender.send(&notice);
    let now = jobz::now_ms();
    let (outcome, error) = match result {
        Ok(()) => {
            info!(notice = %notice.id, event = %notice.event, attempts = notice.attempts, "notice delivered");
            (Outcome::Delivered, None)
        }
        Err(deliver::Failure::Permanent(e)) => {
            warn!(notice = %notice.id, error = %e, "notice cannot be delivered; given up");
            (Outcome::GaveUp, Some(e))
        }
        Err(deliver::Failure::Transient(e)) => match next_attempt_ms(&notice, now) {
            Some(next_at_ms) => {
                warn!(notice = %notice.id, error = %e, attempts = notice.attempts,
                    retry_in_ms = next_at_ms - now, "notice not delivered; will try again");
                notice.next_at_ms = next_at_ms;
                (Outcome::Retry { next_at_ms }, Some(e))
            }
            None => {
                warn!(notice = %notice.id, error = %e, attempts = notice.attempts,
                    "notice not delivered within a day; given up");
                (Outcome::GaveUp, Some(e))
            }
        },
    };
    let tried = Tried {
        id: notice.id.clone(),
        attempts: notice.attempts,
        at_ms: now,
        error,
        outcome: outcome.clone(),
    };
    if matches!(outcome, Outcome::Retry { .. }) {
        queue.add(notice);
    }
    tried
}

/// A notice of run `r1` to `ops@example.com`, due at `next`, for tests.
#[cfg(test)]
pub(crate) fn test_notice(id: &str, next: i64) -> Notice {
    Notice {
        id: id.into(),
        run_id: "r1".into(),
        target: NotifyTarget::Email("ops@example.com".into()),
        event: "run.failed".into(),
        payload: "{}".into(),
        created_at_ms: 0,
        attempts: 0,
        next_at_ms: next,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn notice(id: &str, next: i64) -> Notice {
        test_notice(id, next)
    }

    #[test]
    fn the_soonest_due_notice_comes_first_and_a_requeued_one_moves() {
        let mut q = Queue::default();
        q.add(notice("b", 20));
        q.add(notice("a", 10));
        assert_eq!(q.next_due(), Some(10));
        assert!(q.take_due(5).is_none());
        q.add(notice("a", 30));
        assert_eq!(q.take_due(25).map(|n| n.id), Some("b".into()));
        assert!(q.take_due(25).is_none());
        assert_eq!(q.take_due(30).map(|n| n.id), Some("a".into()));
        assert!(q.next_due().is_none());
    }

    #[test]
    fn waits_double_up_to_ten_minutes_and_stop_after_a_day() {
        let mut n = notice("a", 0);
        let waits: Vec<i64> = (1..=12)
            .map(|attempts| {
                n.attempts = attempts;
                next_attempt_ms(&n, 1_000).unwrap() - 1_000
            })
            .collect();
        assert_eq!(
            waits,
            [
                1_000, 2_000, 4_000, 8_000, 16_000, 32_000, 64_000, 128_000, 256_000, 512_000,
                600_000, 600_000
            ]
        );
        n.attempts = 40;
        assert_eq!(next_attempt_ms(&n, GIVE_UP_AFTER_MS - 1_000), None);
    }
}
