//! Notices (JobX's and qless's notifications): when a run ends, each `notify:` entry of its
//! job that asks for that end becomes a [`Notice`], journaled in the commit that ends the
//! run (so a crash loses none), then delivered by the notifier ([`spawn`]): a
//! webhook POST with a signed JSON body, or an e-mail over SMTP. A failed delivery is
//! tried again after 1 s, 2 s, 4 s … (at most 10 min apart) for a day; each attempt is
//! journaled, so a restarted broker goes on where it was. Delivery is at least once: a
//! receiver tells a repeat by `X-Jobz-Delivery` (the notice's id).
//!
//! Attempts run on [`DELIVERERS`] threads, at most one at a time per target (a webhook,
//! or the SMTP server), so a receiver that hangs holds up only its own notices, for at
//! most one attempt's timeout each, never the others'.

pub mod config;
mod deliver;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context;
use crossbeam_channel::{bounded, select, unbounded, Receiver, Sender};
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

/// Threads that make attempts: as many targets are tried at once.
pub const DELIVERERS: usize = 4;

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

/// What one attempt at a time goes to: a webhook by name, or the SMTP server (every
/// e-mail goes through it).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Destination {
    Webhook(String),
    Smtp,
}

impl Notice {
    fn destination(&self) -> Destination {
        match &self.target {
            NotifyTarget::Webhook(name) => Destination::Webhook(name.clone()),
            NotifyTarget::Email(_) => Destination::Smtp,
        }
    }

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

    #[cfg(test)]
    fn next_due(&self) -> Option<i64> {
        self.due.first().map(|(at, _)| *at)
    }

    /// The soonest notice whose destination is not `busy`, due or not.
    fn soonest_free(&self, busy: &HashSet<Destination>) -> Option<&(i64, String)> {
        self.due.iter().find(|(_, id)| {
            self.notices
                .get(id)
                .is_some_and(|n| !busy.contains(&n.destination()))
        })
    }

    /// The soonest notice due by `now` whose destination is not `busy`.
    fn take_due(&mut self, now: i64, busy: &HashSet<Destination>) -> Option<Notice> {
        let key = self
            .soonest_free(busy)
            .filter(|(at, _)| *at <= now)?
            .clone();
        self.due.remove(&key);
        self.notices.remove(&key.1)
    }

    /// How long the scheduler may wait for news (ms): until the soonest notice it could
    /// hand out falls due, at most 500. A notice of a busy destination, or any while
    /// every deliverer is busy, waits for an attempt to end, which wakes the scheduler
    /// itself: counting it would spin every millisecond until then.
    fn wait_ms(&self, now: i64, busy: &HashSet<Destination>) -> i64 {
        if busy.len() >= DELIVERERS {
            return 500;
        }
        self.soonest_free(busy)
            .map_or(500, |(at, _)| (at - now).clamp(1, 500))
    }
}

/// Starts the notifier: `pending` (from the store) and what `incoming` brings (from the
/// journal, after each commit) are delivered; each attempt goes to the journal as an
/// effect on `journal`. It ends when `stop` is closed, once the attempts under way have
/// ended and been journaled.
pub fn spawn(
    config: Arc<NotifyConfig>,
    pending: Vec<Notice>,
    incoming: Receiver<Notice>,
    journal: Sender<Effects>,
    stop: Receiver<()>,
) -> anyhow::Result<JoinHandle<()>> {
    // Each deliverer takes one notice at a time and answers what became of it.
    let (work_tx, work_rx) = bounded::<Notice>(DELIVERERS);
    let (done_tx, done_rx) = unbounded::<Attempted>();
    for n in 0..DELIVERERS {
        let config = Arc::clone(&config);
        let work_rx = work_rx.clone();
        let done_tx = done_tx.clone();
        std::thread::Builder::new()
            .name(format!("notifier-{n}"))
            .spawn(move || {
                let sender = deliver::Sender::new(&config);
                for notice in work_rx {
                    if done_tx.send(attempt(&sender, notice)).is_err() {
                        return;
                    }
                }
            })
            .context("starting a notifier thread")?;
    }
    drop(done_tx);
    std::thread::Builder::new()
        .name("notifier".into())
        .spawn(move || {
            let mut queue = Queue::default();
            for notice in pending {
                queue.add(notice);
            }
            let mut busy = HashSet::new();
            loop {
                let now = jobz::now_ms();
                while busy.len() < DELIVERERS {
                    let Some(notice) = queue.take_due(now, &busy) else {
                        break;
                    };
                    busy.insert(notice.destination());
                    if work_tx.send(notice).is_err() {
                        return;
                    }
                }
                let wait = queue.wait_ms(now, &busy);
                select! {
                    recv(stop) -> _ => break,
                    recv(incoming) -> notice => match notice {
                        Ok(notice) => queue.add(notice),
                        Err(_) => break,
                    },
                    recv(done_rx) -> done => match done {
                        Ok(done) => {
                            if !settle(done, &mut queue, &mut busy, &journal) {
                                return;
                            }
                        }
                        Err(_) => return,
                    },
                    default(Duration::from_millis(wait as u64)) => {}
                }
            }
            // Nothing more is handed out; what was is attempted, and journaled as each
            // attempt ends.
            drop(work_tx);
            for done in done_rx {
                if !settle(done, &mut queue, &mut busy, &journal) {
                    return;
                }
            }
        })
        .context("starting the notifier thread")
}

/// One attempt's end, from a deliverer.
struct Attempted {
    /// Free again.
    destination: Destination,
    /// What goes to the journal.
    tried: Tried,
    /// The notice, when it is to be tried again.
    again: Option<Notice>,
}

/// An attempt ended: its destination is free again, its record goes to the journal, and a
/// notice to try again goes back in `queue`. `false` when the journal is gone.
fn settle(
    done: Attempted,
    queue: &mut Queue,
    busy: &mut HashSet<Destination>,
    journal: &Sender<Effects>,
) -> bool {
    busy.remove(&done.destination);
    if let Some(notice) = done.again {
        queue.add(notice);
    }
    let fx = Effects {
        writes: vec![Write::NoticeTried(done.tried)],
        ..Effects::default()
    };
    journal.send(fx).is_ok()
}

/// Delivers `notice` once.
fn attempt(sender: &deliver::Sender, mut notice: Notice) -> Attempted {
    let destination = notice.destination();
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
    let again = matches!(outcome, Outcome::Retry { .. }).then_some(notice);
    Attempted {
        destination,
        tried,
        again,
    }
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
        let free = HashSet::new();
        let mut q = Queue::default();
        q.add(notice("b", 20));
        q.add(notice("a", 10));
        assert_eq!(q.next_due(), Some(10));
        assert!(q.take_due(5, &free).is_none());
        q.add(notice("a", 30));
        assert_eq!(q.take_due(25, &free).map(|n| n.id), Some("b".into()));
        assert!(q.take_due(25, &free).is_none());
        assert_eq!(q.take_due(30, &free).map(|n| n.id), Some("a".into()));
        assert!(q.next_due().is_none());
    }

    /// A notice to the webhook `slow`, due at `next`.
    fn to_slow_webhook(id: &str, next: i64) -> Notice {
        Notice {
            target: NotifyTarget::Webhook("slow".into()),
            ..notice(id, next)
        }
    }

    #[test]
    fn a_busy_destination_waits_and_the_others_go_by() {
        let mut q = Queue::default();
        q.add(to_slow_webhook("h1", 10));
        q.add(to_slow_webhook("h2", 11));
        q.add(notice("m1", 12));
        let busy: HashSet<Destination> = [Destination::Webhook("slow".into())].into();
        assert_eq!(q.take_due(20, &busy).map(|n| n.id), Some("m1".into()));
        assert!(
            q.take_due(20, &busy).is_none(),
            "both notices of the busy webhook wait"
        );
        let busy: HashSet<Destination> = [Destination::Smtp].into();
        assert_eq!(q.take_due(20, &busy).map(|n| n.id), Some("h1".into()));
        assert_eq!(q.next_due(), Some(11));
    }

    #[test]
    fn a_due_notice_of_a_busy_destination_does_not_make_the_scheduler_spin() {
        let mut q = Queue::default();
        q.add(to_slow_webhook("h1", 10));
        let busy: HashSet<Destination> = [Destination::Webhook("slow".into())].into();
        assert_eq!(
            q.wait_ms(20, &busy),
            500,
            "its attempt's end wakes the scheduler"
        );
        assert_eq!(q.wait_ms(20, &HashSet::new()), 1, "free and due: at once");
        q.add(notice("m1", 120));
        assert_eq!(
            q.wait_ms(20, &busy),
            100,
            "until the free destination's notice is due"
        );
        let all: HashSet<Destination> = (0..DELIVERERS)
            .map(|n| Destination::Webhook(format!("w{n}")))
            .collect();
        assert_eq!(q.wait_ms(200, &all), 500, "every deliverer busy");
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
