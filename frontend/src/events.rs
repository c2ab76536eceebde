//! `GET /events`: the broker's feed of run and task changes as Server-Sent Events.
//!
//! The broker numbers each change after the commit that holds it and publishes each
//! commit's changes on the feed topic (`jobz::message::FeedEvent`). One thread here
//! ([`spawn_listener`]) subscribes, fills a gap it notices by asking the broker
//! (`Query::Feed`), and keeps the last [`KEPT`] events in a [`Feed`] that every stream
//! reads. A stream ([`stream`]) starts after `Last-Event-ID` when the client gives one:
//! from the frontend's memory, or else from the broker's; when neither holds what comes
//! right after it (a long absence, a broker restart), the client gets a `reset` event,
//! meaning "read the state afresh", and the stream goes on from there. A gap seen later is
//! told the same way. Each event's `id:` is its broker number.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use jobz::client::Client;
use jobz::message::{Event, FeedEvent, FeedPage, Message, Query, ReplyBody, MAX_FEED_PAGE};
use jobz::topic::Topic;
use serde_json::json;
use tracing::{debug, warn};

use crate::broker::Broker;
use crate::follow::write_chunk;
use crate::views;

/// Events the frontend keeps for streams that fall behind or come back.
pub const KEPT: usize = 4096;

/// Most event streams open at once; beyond it the answer is 503.
pub const MAX_STREAMS: u64 = 64;

/// A stream with nothing to say sends a comment this often (proxies and the relay's idle
/// timeout see traffic; a client that went away is noticed).
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// Longest a stream stays open; the browser's `EventSource` reconnects with its
/// `Last-Event-ID` and loses nothing.
pub const MAX_STREAM: Duration = Duration::from_secs(3600);

/// The response head of a stream.
pub const HEAD: &str = "HTTP/1.1 200 OK\r\n\
    Content-Type: text/event-stream; charset=utf-8\r\n\
    Transfer-Encoding: chunked\r\n\
    Cache-Control: no-store\r\n\
    X-Accel-Buffering: no\r\n\
    X-Content-Type-Options: nosniff\r\n\r\n";

/// What a client asked to see (`/events?job=&tag=&tracked=1&run=`); every given field
/// must match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventFilter {
    /// Only events of runs of this job.
    pub job: Option<String>,
    /// Only events of runs with this tag.
    pub tag: Option<String>,
    /// Only events of tracked runs.
    pub tracked: bool,
    /// Only events of this run.
    pub run: Option<String>,
}

impl EventFilter {
    /// True if `event` passes.
    pub fn matches(&self, event: &FeedEvent) -> bool {
        self.job.as_ref().is_none_or(|job| *job == event.job)
            && self.tag.as_ref().is_none_or(|tag| event.tags.contains(tag))
            && (!self.tracked || event.tracked)
            && self.run.as_ref().is_none_or(|run| *run == event.run_id)
    }
}

/// The events this frontend has heard, newest last, shared by the listener and streams.
#[derive(Default)]
pub struct Feed {
    kept: Mutex<VecDeque<Arc<FeedEvent>>>,
    grew: Condvar,
    /// Streams open now.
    pub streams: AtomicU64,
}

/// What a stream reads next.
#[derive(Debug, Default, PartialEq)]
pub struct Read {
    /// Events were missed between the cursor and `events` (or before the oldest kept).
    pub gap: bool,
    /// The events after the cursor, oldest first.
    pub events: Vec<Arc<FeedEvent>>,
}

impl Feed {
    /// Keeps `event` unless it is not newer than the newest kept (a repeat), and wakes the
    /// streams. True if kept.
    pub fn push(&self, event: FeedEvent) -> bool {
        let Ok(mut kept) = self.kept.lock() else {
            return false;
        };
        if kept.back().is_some_and(|last| last.seq >= event.seq) {
            return false;
        }
        if kept.len() == KEPT {
            kept.pop_front();
        }
        kept.push_back(Arc::new(event));
        drop(kept);
        self.grew.notify_all();
        true
    }

    /// The newest number kept (0: none).
    pub fn newest(&self) -> u64 {
        self.kept
            .lock()
            .ok()
            .and_then(|k| k.back().map(|e| e.seq))
            .unwrap_or(0)
    }

    /// True if the events right after `cursor` are kept (or none came after it yet).
    pub fn covers(&self, cursor: u64) -> bool {
        let Ok(kept) = self.kept.lock() else {
            return false;
        };
        match (kept.front(), kept.back()) {
            (Some(first), Some(last)) => {
                first.seq <= cursor.saturating_add(1) && cursor <= last.seq
            }
            _ => false,
        }
    }

    /// The events after `cursor`, waiting up to `wait` for one; `gap` when some between the
    /// cursor and them are not kept.
    pub fn read_after(&self, cursor: u64, wait: Duration) -> Read {
        let Ok(mut kept) = self.kept.lock() else {
            return Read::default();
        };
        if kept.back().is_none_or(|last| last.seq <= cursor) {
            kept = match self.grew.wait_timeout(kept, wait) {
                Ok((kept, _)) => kept,
                Err(_) => return Read::default(),
            };
        }
        let start = kept.partition_point(|e| e.seq <= cursor);
        let events: Vec<_> = kept.range(start..).cloned().collect();
        // Cursor 0: the stream began before the first event this frontend heard.
        let gap = cursor != 0 && events.first().is_some_and(|e| e.seq != cursor + 1);
        Read { gap, events }
    }
}

/// The listener: subscribes to the feed topic on `client` and keeps what comes in `feed`,
/// asking the broker for what it missed, until `shutdown`.
pub fn spawn_listener(
    client: Client,
    feed: Arc<Feed>,
    timeout: Duration,
    shutdown: Arc<AtomicBool>,
) -> anyhow::Result<JoinHandle<()>> {
    client.subscribe(Topic::feed());
    std::thread::Builder::new()
        .name("feed".into())
        .spawn(move || {
            let publications = client.publications().clone();
            while !shutdown.load(Ordering::Relaxed) {
                let Ok((topic, envelope)) = publications.recv_timeout(Duration::from_millis(200))
                else {
                    continue;
                };
                let Message::Event(Event::Feed(events)) = envelope.body else {
                    continue;
                };
                if topic != Topic::feed() {
                    continue;
                }
                for event in events {
                    fill_gap(&feed, &client, event.seq, timeout);
                    feed.push(event);
                }
            }
        })
        .context("starting the feed thread")
}

/// Before keeping event `next`: asks the broker for the events between the newest kept
/// and it. What the broker no longer holds stays a gap (streams say `reset`), and what it
/// holds after that gap is kept.
fn fill_gap(feed: &Feed, broker: &dyn Broker, next: u64, timeout: Duration) {
    let mut newest = feed.newest();
    while newest != 0 && next > newest + 1 {
        let page = match broker.request(
            Message::Query(Query::Feed {
                after: newest,
                limit: MAX_FEED_PAGE,
            }),
            timeout,
        ) {
            Ok(ReplyBody::Feed(page)) => page,
            other => {
                warn!(after = newest, answer = ?other.err(), "cannot fill a gap in the feed");
                return;
            }
        };
        // Incomplete: the broker no longer holds what came right after `newest` (or it
        // restarted), but what it holds from there on is still worth keeping.
        if !page.complete {
            debug!(after = newest, next, "feed gap the broker no longer holds");
        }
        let before = newest;
        for event in page.events.into_iter().filter(|e| e.seq < next) {
            feed.push(event);
        }
        newest = feed.newest();
        if newest == before {
            return;
        }
    }
}

/// One event in the stream's format: `id`, `event` (its kind) and its JSON on one line.
pub fn format_event(event: &FeedEvent) -> String {
    format!(
        "id: {}\nevent: {}\ndata: {}\n\n",
        event.seq,
        event.kind.as_str(),
        views::feed_event(event)
    )
}

/// The `reset` event: events were missed; read the state afresh.
fn format_reset(newest: u64) -> String {
    let data = json!({ "reason": "events were missed: read the state afresh" });
    let id = if newest > 0 {
        format!("id: {newest}\n")
    } else {
        String::new()
    };
    format!("{id}event: reset\ndata: {data}\n\n")
}

/// How a stream starts: where its cursor is, and what it sends first.
fn resume(
    feed: &Feed,
    broker: &dyn Broker,
    filter: &EventFilter,
    last_event_id: Option<u64>,
    timeout: Duration,
) -> (u64, String) {
    let Some(mut cursor) = last_event_id else {
        return (feed.newest(), String::new());
    };
    let mut first = String::new();
    // The frontend's memory may not reach back that far; the broker's may.
    while !feed.covers(cursor) {
        let page: Option<FeedPage> = match broker.request(
            Message::Query(Query::Feed {
                after: cursor,
                limit: MAX_FEED_PAGE,
            }),
            timeout,
        ) {
            Ok(ReplyBody::Feed(page)) => Some(page),
            _ => None,
        };
        match page {
            Some(page) if page.complete && !page.events.is_empty() => {
                for event in &page.events {
                    if filter.matches(event) {
                        first.push_str(&format_event(event));
                    }
                    cursor = event.seq;
                }
            }
            // Nothing newer anywhere yet: go on from here.
            Some(page) if page.complete => break,
            _ => {
                let newest = feed.newest();
                first.push_str(&format_reset(newest));
                return (newest, first);
            }
        }
    }
    (cursor, first)
}

/// Writes the stream to `out`: head, `retry:`, the events after `last_event_id` (or from
/// now on), then each new event that passes `filter` as it comes, until
/// [`MAX_STREAM`] passes, `shutdown` is set or writing fails.
pub fn stream(
    out: &mut impl Write,
    feed: &Feed,
    broker: &dyn Broker,
    filter: &EventFilter,
    last_event_id: Option<u64>,
    timeout: Duration,
    shutdown: &AtomicBool,
) -> io::Result<()> {
    let started = Instant::now();
    out.write_all(HEAD.as_bytes())?;
    let (mut cursor, first) = resume(feed, broker, filter, last_event_id, timeout);
    write_chunk(out, &format!("retry: 2000\n\n{first}"))?;
    let mut quiet_since = Instant::now();
    while !shutdown.load(Ordering::Relaxed) && started.elapsed() < MAX_STREAM {
        // A short wait: the shutdown flag is looked at often.
        let read = feed.read_after(cursor, Duration::from_millis(500));
        let mut text = String::new();
        if read.gap {
            let last = read.events.first().map_or(cursor, |e| e.seq - 1);
            text.push_str(&format_reset(last));
        }
        for event in &read.events {
            cursor = event.seq;
            if filter.matches(event) {
                text.push_str(&format_event(event));
            }
        }
        if text.is_empty() && quiet_since.elapsed() >= KEEP_ALIVE {
            text.push_str(": keep-alive\n\n");
        }
        if !text.is_empty() {
            write_chunk(out, &text)?;
            quiet_since = Instant::now();
        }
    }
    out.write_all(b"0\r\n\r\n")?;
    out.flush()
}

#[cfg(test)]
mod tests {
    use jobz::message::{FeedKind, FeedTask, RunState, TaskState};

    use super::*;
    use crate::broker::fake::FakeBroker;

    fn event(seq: u64, job: &str) -> FeedEvent {
        FeedEvent {
            seq,
            kind: FeedKind::RunAccepted,
            at_ms: 1_700_000_000_000,
            run_id: format!("r{seq}"),
            job: job.into(),
            run_state: RunState::Pending,
            tags: vec!["nightly".into()],
            tracked: seq.is_multiple_of(2),
            task: None,
        }
    }

    fn seqs(read: &Read) -> Vec<u64> {
        read.events.iter().map(|e| e.seq).collect()
    }

    #[test]
    fn reads_what_came_after_the_cursor_and_says_when_some_is_missing() {
        let feed = Feed::default();
        for seq in [5, 6, 7] {
            assert!(feed.push(event(seq, "a")));
        }
        assert!(!feed.push(event(6, "a")), "a repeat is not kept");
        let read = feed.read_after(5, Duration::ZERO);
        assert_eq!(seqs(&read), [6, 7]);
        assert!(!read.gap);
        let read = feed.read_after(2, Duration::ZERO);
        assert_eq!(seqs(&read), [5, 6, 7]);
        assert!(read.gap, "3 and 4 were never kept");
        assert!(feed.push(event(10, "a")));
        let read = feed.read_after(7, Duration::ZERO);
        assert!(read.gap, "8 and 9 are missing");
        assert!(feed.covers(7) && feed.covers(4) && !feed.covers(3));
    }

    #[test]
    fn a_reader_waits_for_the_next_event() {
        let feed = Arc::new(Feed::default());
        feed.push(event(1, "a"));
        let pusher = {
            let feed = feed.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                feed.push(event(2, "a"));
            })
        };
        let read = feed.read_after(1, Duration::from_secs(10));
        pusher.join().unwrap();
        assert_eq!(seqs(&read), [2]);
    }

    #[test]
    fn keeps_the_newest_and_forgets_the_oldest() {
        let feed = Feed::default();
        for seq in 1..=(KEPT as u64 + 10) {
            feed.push(event(seq, "a"));
        }
        assert!(!feed.covers(5));
        assert!(feed.covers(11));
        assert_eq!(feed.newest(), KEPT as u64 + 10);
    }

    #[test]
    fn filters_by_job_tag_tracking_and_run() {
        let mut e = event(2, "a");
        assert!(EventFilter::default().matches(&e));
        let only = |f: EventFilter| f.matches(&e);
        assert!(only(EventFilter {
            job: Some("a".into()),
            tag: Some("nightly".into()),
            tracked: true,
            run: Some("r2".into()),
        }));
        assert!(!only(EventFilter {
            job: Some("b".into()),
            ..Default::default()
        }));
        assert!(!only(EventFilter {
            tag: Some("weekly".into()),
            ..Default::default()
        }));
        assert!(!only(EventFilter {
            run: Some("r3".into()),
            ..Default::default()
        }));
        e.tracked = false;
        assert!(!EventFilter {
            tracked: true,
            ..Default::default()
        }
        .matches(&e));
    }

    #[test]
    fn a_gap_is_filled_from_the_broker_when_it_still_holds_it() {
        let feed = Feed::default();
        feed.push(event(10, "a"));
        let broker = FakeBroker::new(|m| match m {
            Message::Query(Query::Feed { after: 10, .. }) => Ok(ReplyBody::Feed(FeedPage {
                events: (11..=13).map(|s| event(s, "a")).collect(),
                complete: true,
                newest: 13,
            })),
            _ => Ok(ReplyBody::Feed(FeedPage::default())),
        });
        fill_gap(&feed, &broker, 13, Duration::from_secs(1));
        feed.push(event(13, "a"));
        let read = feed.read_after(10, Duration::ZERO);
        assert_eq!(seqs(&read), [11, 12, 13]);
        assert!(!read.gap);
    }

    #[test]
    fn resumes_from_the_broker_or_resets_when_nobody_holds_the_next_event() {
        let feed = Feed::default();
        feed.push(event(50, "a"));
        let broker = FakeBroker::new(|m| match m {
            Message::Query(Query::Feed { after: 47, .. }) => Ok(ReplyBody::Feed(FeedPage {
                events: vec![event(48, "a"), event(49, "b")],
                complete: true,
                newest: 50,
            })),
            _ => Ok(ReplyBody::Feed(FeedPage {
                events: vec![],
                complete: false,
                newest: 50,
            })),
        });
        let only_a = EventFilter {
            job: Some("a".into()),
            ..Default::default()
        };
        let (cursor, first) = resume(&feed, &broker, &only_a, Some(47), Duration::from_secs(1));
        assert_eq!(cursor, 49);
        assert_eq!(first, format_event(&event(48, "a")));
        let (cursor, first) = resume(&feed, &broker, &only_a, Some(3), Duration::from_secs(1));
        assert_eq!(cursor, 50);
        assert!(first.starts_with("id: 50\nevent: reset\n"), "{first}");
        let (cursor, first) = resume(&feed, &broker, &only_a, None, Duration::from_secs(1));
        assert_eq!((cursor, first.as_str()), (50, ""));
    }

    #[test]
    fn an_event_is_one_sse_record_with_its_number_and_kind() {
        let mut e = event(7, "a");
        e.kind = FeedKind::TaskFailed;
        e.task = Some(FeedTask {
            step_id: "s".into(),
            task_id: "t".into(),
            job: "a".into(),
            attempt: 2,
            worker: Some("w1".into()),
            state: TaskState::Failed,
        });
        let text = format_event(&e);
        let mut lines = text.lines();
        assert_eq!(lines.next(), Some("id: 7"));
        assert_eq!(lines.next(), Some("event: task.failed"));
        let data: serde_json::Value =
            serde_json::from_str(lines.next().unwrap().strip_prefix("data: ").unwrap()).unwrap();
        assert_eq!(data["kind"], "task.failed");
        assert_eq!(data["task"]["attempt"], 2);
        assert_eq!(data["task"]["worker"], "w1");
        assert!(text.ends_with("\n\n"));
    }

    /// A writer the test can read while the stream writes.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Shared {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    #[test]
    fn a_stream_resumes_after_its_last_event_and_sends_matching_ones_until_shutdown() {
        let feed = Arc::new(Feed::default());
        feed.push(event(1, "a"));
        let shutdown = Arc::new(AtomicBool::new(false));
        let out = Shared::default();
        let writer = {
            let (feed, shutdown, mut out) = (feed.clone(), shutdown.clone(), out.clone());
            std::thread::spawn(move || {
                let broker = FakeBroker::down();
                let filter = EventFilter {
                    job: Some("a".into()),
                    ..Default::default()
                };
                let timeout = Duration::from_millis(10);
                stream(
                    &mut out,
                    &feed,
                    &broker,
                    &filter,
                    Some(1),
                    timeout,
                    &shutdown,
                )
            })
        };
        feed.push(event(2, "b"));
        feed.push(event(3, "a"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !out.text().contains("id: 3\n") && Instant::now() < deadline {
            std::thread::yield_now();
        }
        shutdown.store(true, Ordering::Relaxed);
        writer.join().unwrap().unwrap();
        let text = out.text();
        assert!(text.starts_with(HEAD));
        assert!(text.contains("retry: 2000"));
        assert!(text.contains("id: 3\nevent: run.accepted\n"), "{text}");
        assert!(
            !text.contains("id: 2\n") && !text.contains("id: 1\n"),
            "{text}"
        );
        assert!(text.ends_with("0\r\n\r\n"));
    }
}
