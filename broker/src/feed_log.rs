//! The feed's numbering and memory, owned by the journal thread: each committed event
//! takes the next sequence number, the last [`FEED_RETAINED`] are kept for
//! `Query::Feed`, and each commit's events go out as one message on the feed topic.
//!
//! A broker process starts numbering at its start time in ms × 1000, so numbers grow
//! across restarts (unless the broker averaged a thousand events a millisecond, which is
//! fifty times what it can do); a client that asks after a number from before the
//! restart is told its catch-up is incomplete.

use std::collections::VecDeque;

use jobz::message::{Event, FeedEvent, FeedPage, Message, FEED_RETAINED, MAX_FEED_PAGE};
use jobz::topic::Topic;

use crate::engine::Publish;

/// The numbered events of this broker process.
#[derive(Debug)]
pub struct FeedLog {
    retained: VecDeque<FeedEvent>,
    capacity: usize,
    /// The number the next event takes.
    next: u64,
}

impl FeedLog {
    /// A feed whose first event takes `first` (see the module doc), keeping `capacity`.
    pub fn new(first: u64, capacity: usize) -> Self {
        FeedLog {
            retained: VecDeque::with_capacity(capacity.min(1024)),
            capacity: capacity.max(1),
            next: first.max(1),
        }
    }

    /// The feed of a broker starting at `now_ms`, keeping [`FEED_RETAINED`] events.
    pub fn starting_at(now_ms: i64) -> Self {
        Self::new(
            u64::try_from(now_ms).unwrap_or(0).saturating_mul(1000),
            FEED_RETAINED,
        )
    }

    /// Numbers and keeps `events`; the message that publishes them, if any.
    pub fn record(&mut self, events: Vec<FeedEvent>) -> Option<Publish> {
        if events.is_empty() {
            return None;
        }
        let mut numbered = Vec::with_capacity(events.len());
        for mut event in events {
            event.seq = self.next;
            self.next += 1;
            if self.retained.len() == self.capacity {
                self.retained.pop_front();
            }
            self.retained.push_back(event.clone());
            numbered.push(event);
        }
        Some(Publish {
            topic: Topic::feed(),
            body: Message::Event(Event::Feed(numbered)),
        })
    }

    /// The events after `after`, at most `limit` (capped at [`MAX_FEED_PAGE`]).
    pub fn page(&self, after: u64, limit: u32) -> FeedPage {
        let newest = self.next - 1;
        let oldest = self.retained.front().map_or(self.next, |e| e.seq);
        // Complete when nothing after `after` is missing: it is at or past the oldest
        // event held (minus one), and not from the future (another process's number).
        let complete = after.saturating_add(1) >= oldest && after <= newest;
        let limit = limit.clamp(1, MAX_FEED_PAGE) as usize;
        let skip = after.saturating_add(1).saturating_sub(oldest) as usize;
        let events = self
            .retained
            .iter()
            .skip(skip)
            .take(limit)
            .cloned()
            .collect();
        FeedPage {
            events,
            complete,
            newest,
        }
    }
}

#[cfg(test)]
mod tests {
    use jobz::message::{FeedKind, RunState};

    use super::*;

    fn event(run: &str) -> FeedEvent {
        FeedEvent {
            seq: 0,
            kind: FeedKind::RunAccepted,
            at_ms: 1,
            run_id: run.into(),
            job: "a".into(),
            run_state: RunState::Pending,
            tags: vec![],
            tracked: false,
            task: None,
        }
    }

    fn seqs(page: &FeedPage) -> Vec<u64> {
        page.events.iter().map(|e| e.seq).collect()
    }

    #[test]
    fn numbers_events_in_order_and_publishes_each_commit_as_one_message() {
        let mut log = FeedLog::new(100, 10);
        assert!(log.record(vec![]).is_none());
        let published = log.record(vec![event("r1"), event("r2")]).unwrap();
        assert_eq!(published.topic, Topic::feed());
        let Message::Event(Event::Feed(events)) = published.body else {
            panic!("not a feed message");
        };
        assert_eq!(events.iter().map(|e| e.seq).collect::<Vec<_>>(), [100, 101]);
        assert_eq!(events[1].run_id, "r2");
        let page = log.page(0, 100);
        assert_eq!(seqs(&page), [100, 101]);
        assert!(!page.complete, "events before 100 were never held");
        assert_eq!(page.newest, 101);
    }

    #[test]
    fn a_page_after_a_held_event_is_complete_and_bounded() {
        let mut log = FeedLog::new(1, 1000);
        log.record((0..20).map(|i| event(&format!("r{i}"))).collect());
        let page = log.page(5, 3);
        assert_eq!(seqs(&page), [6, 7, 8]);
        assert!(page.complete);
        let page = log.page(20, 10);
        assert!(page.events.is_empty());
        assert!(page.complete, "nothing is missing after the newest");
    }

    #[test]
    fn forgets_the_oldest_and_says_when_a_catch_up_is_incomplete() {
        let mut log = FeedLog::new(1, 5);
        log.record((0..12).map(|i| event(&format!("r{i}"))).collect());
        assert_eq!(seqs(&log.page(0, 100)), [8, 9, 10, 11, 12]);
        assert!(!log.page(3, 100).complete, "4..7 are gone");
        assert!(log.page(7, 100).complete);
        // A number from a later process (or a made-up one) is not this feed's.
        let page = log.page(1_000_000, 100);
        assert!(!page.complete);
        assert!(page.events.is_empty());
    }

    #[test]
    fn a_restarted_broker_numbers_past_the_last_one() {
        let before = FeedLog::starting_at(1_700_000_000_000);
        let after = FeedLog::starting_at(1_700_000_000_001);
        assert!(after.next >= before.next + 1000);
    }
}
