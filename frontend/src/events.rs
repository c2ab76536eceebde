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
/// asking the broker for what it missed, until `shutdown`. It listens whether or not a
/// stream is open: a subscription takes effect some time after it is made (ZeroMQ's slow
/// joiner), and a stream must not wait for the next change to learn of the ones before.
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
            let mut catching = Catching::default();
            let mut heard_at = Instant::now();
            catching.look(&feed, &client, timeout);
            while !shutdown.load(Ordering::Relaxed) {
                let Ok((topic, envelope)) = publications.recv_timeout(Duration::from_millis(200))
                else {
                    // Quiet for a while: was anything published that did not arrive (a
                    // subscription not yet in effect, a reconnect)?
                    if heard_at.elapsed() >= LOOK_WHEN_QUIET {
                        catching.look(&feed, &client, timeout);
                        heard_at = Instant::now();
                    }
                    continue;
                };
                let Message::Event(Event::Feed(events)) = envelope.body else {
                    continue;
                };
                if topic != Topic::feed() {
                    continue;
                }
                heard_at = Instant::now();
                for event in events {
                    catching.heard(&feed, &client, event, timeout);
                }
            }
        })
        .context("starting the feed thread")
}

/// How long the listener hears nothing before it asks the broker what it missed.
pub const LOOK_WHEN_QUIET: Duration = Duration::from_secs(1);

/// How far the listener has caught up with the broker's feed.
#[derive(Debug, Default)]
struct Catching {
    /// The broker's number up to which the feed holds everything it could get (0: not
    /// known yet).
    known: u64,
}

impl Catching {
    /// An event heard: what came between the last one and it is asked for first.
    fn heard(&mut self, feed: &Feed, broker: &dyn Broker, event: FeedEvent, timeout: Duration) {
        if self.known != 0 && event.seq > self.known + 1 {
            self.known = fill(feed, broker, self.known, event.seq, timeout);
        }
        self.known = self.known.max(event.seq);
        feed.push(event);
    }

    /// Nothing heard for a while: whatever the broker published since is asked for (the
    /// first time, only where its feed stands).
    fn look(&mut self, feed: &Feed, broker: &dyn Broker, timeout: Duration) {
        if self.known == 0 {
            if let Some(page) = ask_feed(broker, STANDING, timeout) {
                self.known = page.newest;
            }
            return;
        }
        self.known = fill(feed, broker, self.known, u64::MAX, timeout);
    }
}

/// Asked `after`, the broker answers only where its feed stands (`newest`).
const STANDING: u64 = u64::MAX;

/// A page of the broker's feed after `after` ([`STANDING`]: none, just `newest`); `None`
/// when the broker does not answer in `timeout`.
fn ask_feed(broker: &dyn Broker, after: u64, timeout: Duration) -> Option<FeedPage> {
    let ask = Message::Query(Query::Feed {
        after,
        limit: MAX_FEED_PAGE,
    });
    match broker.request(ask, timeout) {
        Ok(ReplyBody::Feed(page)) => Some(page),
        _ => None,
    }
}

/// Keeps the broker's events after `after` and before `until`; the number it got to. What
/// the broker no longer holds stays a gap (streams say `reset`); what it holds after that
/// gap (a restarted broker's events) is kept.
fn fill(feed: &Feed, broker: &dyn Broker, after: u64, until: u64, timeout: Duration) -> u64 {
    let mut cursor = after;
    while cursor.saturating_add(1) < until {
        let Some(page) = ask_feed(broker, cursor, timeout) else {
            warn!(
                after = cursor,
                "cannot fill a gap in the feed: the broker did not answer"
            );
            return cursor;
        };
        if !page.complete {
            debug!(after = cursor, until, "feed gap the broker no longer holds");
        }
        let Some(last) = page.events.last().map(|e| e.seq) else {
            return cursor;
        };
        for event in page.events.into_iter().filter(|e| e.seq < until) {
            feed.push(event);
        }
        if last <= cursor {
            return cursor;
        }
        cursor = last.min(until.saturating_sub(1));
    }
    cursor
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

/// Where a stream that starts now begins: after the broker's newest event (this frontend
/// may not be listening yet, or only just), else after the newest it kept.
fn now_cursor(feed: &Feed, broker: &dyn Broker, timeout: Duration) -> u64 {
    match ask_feed(broker, STANDING, timeout) {
        Some(page) if page.newest > 0 => page.newest,
        _ => feed.newest(),
    }
}

/// The events after `cursor` that the frontend does not keep, from the broker's memory:
/// the new cursor and the text to send (ending in `reset`, at the newest event kept, when
/// the broker no longer holds them either).
fn catch_up(
    feed: &Feed,
    broker: &dyn Broker,
    filter: &EventFilter,
    mut cursor: u64,
    timeout: Duration,
) -> (u64, String) {
    let mut text = String::new();
    while !feed.covers(cursor) {
        match ask_feed(broker, cursor, timeout) {
            Some(page) if page.complete && !page.events.is_empty() => {
                for event in &page.events {
                    if filter.matches(event) {
                        text.push_str(&format_event(event));
                    }
                    cursor = event.seq;
                }
            }
            // Nothing newer anywhere yet: go on from here.
            Some(page) if page.complete => break,
            _ => {
                let newest = feed.newest();
                text.push_str(&format_reset(newest));
                return (newest, text);
            }
        }
    }
    (cursor, text)
}

/// How a stream starts: where its cursor is, and what it sends first.
fn resume(
    feed: &Feed,
    broker: &dyn Broker,
    filter: &EventFilter,
    last_event_id: Option<u64>,
    timeout: Duration,
) -> (u64, String) {
    match last_event_id {
        None => (now_cursor(feed, broker, timeout), String::new()),
        Some(cursor) => catch_up(feed, broker, filter, cursor, timeout),
    }
}

/// Writes the stream to `out`: head, `retry:`, the events after `last_event_id` (or from
/// now on), then each new event that passes `filter` as it comes, until
/// [`MAX_STREAM`] passes, `shutdown` is set or writing fails. What the frontend missed is
/// asked of the broker; what neither holds is a `reset`.
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
        let mut read = feed.read_after(cursor, Duration::from_millis(500));
        let mut text = String::new();
        if read.gap {
            let (caught_up, missed) = catch_up(feed, broker, filter, cursor, timeout);
            text.push_str(&missed);
            cursor = caught_up;
            read = feed.read_after(cursor, Duration::ZERO);
            if read.gap {
                let last = read.events.first().map_or(cursor, |e| e.seq - 1);
                text.push_str(&format_reset(last));
            }
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
        let mut catching = Catching { known: 10 };
        catching.heard(&feed, &broker, event(13, "a"), Duration::from_secs(1));
        assert_eq!(catching.known, 13);
        let read = feed.read_after(10, Duration::ZERO);
        assert_eq!(seqs(&read), [11, 12, 13]);
        assert!(!read.gap);
    }

    #[test]
    fn a_quiet_listener_asks_for_what_never_arrived_also_from_a_restarted_broker() {
        let feed = Feed::default();
        // The broker's feed stands at 20; then 21 and 22 are published but never arrive.
        let broker = FakeBroker::new(|m| match m {
            Message::Query(Query::Feed {
                after: u64::MAX, ..
            }) => Ok(ReplyBody::Feed(FeedPage {
                events: vec![],
                complete: false,
                newest: 20,
            })),
            Message::Query(Query::Feed { after: 20, .. }) => Ok(ReplyBody::Feed(FeedPage {
                events: vec![event(21, "a"), event(22, "a")],
                complete: true,
                newest: 22,
            })),
            // Restarted: it numbers from 900 on and no longer holds 23.
            Message::Query(Query::Feed { after: 22, .. }) => Ok(ReplyBody::Feed(FeedPage {
                events: vec![event(900, "a")],
                complete: false,
                newest: 900,
            })),
            _ => Ok(ReplyBody::Feed(FeedPage {
                events: vec![],
                complete: true,
                newest: 900,
            })),
        });
        let mut catching = Catching::default();
        let timeout = Duration::from_secs(1);
        catching.look(&feed, &broker, timeout);
        assert_eq!(
            catching.known, 20,
            "the first look learns where the feed stands"
        );
        // One look reads on until the broker has nothing newer.
        catching.look(&feed, &broker, timeout);
        assert_eq!(catching.known, 900);
        assert_eq!(seqs(&feed.read_after(20, Duration::ZERO)), [21, 22, 900]);
        let read = feed.read_after(22, Duration::ZERO);
        assert_eq!(seqs(&read), [900]);
        assert!(read.gap, "a stream says reset for what nobody holds");
        catching.look(&feed, &broker, timeout);
        assert_eq!(catching.known, 900);
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
