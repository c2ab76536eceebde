//! `job_start?wait=SECONDS`: requests held open until their run ends.
//!
//! Waiting requests are handed from the HTTP threads to one waiter thread, so that a few
//! long waits cannot occupy every HTTP thread. [`Waiters`] is the decision part: for each
//! open request it asks the broker for the run's end (`Query::RunEnd`, which the broker
//! holds until the run ends and then answers with the final run: completion is an event,
//! not a poll), answers 200 with the run once it is final, and 202 (the accepted answer)
//! when the wait runs out, on shutdown, or when too many are waiting. An answer that is
//! not final (the broker had no room to hold the query), an error or a timeout is asked
//! again after [`POLL_EVERY`]. The thread sleeps until a new request, an answer or the
//! next deadline. Time is a parameter, so it is tested without sockets or sleeping.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Select, TryRecvError};
use jobz::message::{Message, Query, ReplyBody};
use tracing::{debug, info};

use crate::api::{HttpReply, WaitRequest};
use crate::broker::{Broker, ReplyReceiver};
use crate::metrics::Stats;
use crate::views;

/// How soon a run's end is asked again after an answer that was not it.
pub const POLL_EVERY: Duration = Duration::from_millis(100);

/// Longest the waiter thread sleeps without looking at the shutdown flag.
const IDLE_LOOK: Duration = Duration::from_millis(200);

/// Most requests waiting at once; beyond it `wait` is not honoured (202 at once).
pub const MAX_WAITING: usize = 256;

/// Something an answer can be sent to: an HTTP request, or a channel in tests.
pub trait Responder: Send {
    /// Sends the answer.
    fn respond(self, reply: HttpReply);
}

struct Entry<R> {
    responder: R,
    run_id: String,
    job: String,
    deadline: Instant,
    accepted: HttpReply,
    next_poll: Instant,
    in_flight: Option<ReplyReceiver>,
}

/// What a poll said.
enum Polled {
    Final(HttpReply),
    Gone,
    NotYet,
}

/// The open requests.
pub struct Waiters<R> {
    entries: Vec<Entry<R>>,
    capacity: usize,
}

impl<R: Responder> Waiters<R> {
    /// At most `capacity` requests wait at once.
    pub fn new(capacity: usize) -> Self {
        Waiters {
            entries: Vec::new(),
            capacity,
        }
    }

    /// Requests waiting now.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True if none waits.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Holds a request until its run ends or its wait runs out; answers at once if full.
    pub fn add(&mut self, responder: R, wait: WaitRequest, now: Instant) {
        if self.entries.len() >= self.capacity {
            info!(run_id = %wait.run_id, job = %wait.job, "too many waiting requests; answering at once");
            responder.respond(wait.accepted);
            return;
        }
        self.entries.push(Entry {
            responder,
            run_id: wait.run_id,
            job: wait.job,
            deadline: now + wait.wait,
            accepted: wait.accepted,
            next_poll: now,
            in_flight: None,
        });
    }

    /// Collects poll answers, answers finished and expired requests, sends due polls.
    pub fn tick(&mut self, now: Instant, broker: &dyn Broker) {
        let mut i = 0;
        while i < self.entries.len() {
            let entry = &mut self.entries[i];
            let polled = match entry.in_flight.as_ref().map(|rx| rx.try_recv()) {
                None | Some(Err(TryRecvError::Empty)) => Polled::NotYet,
                Some(Err(TryRecvError::Disconnected)) => {
                    entry.in_flight = None;
                    Polled::NotYet
                }
                Some(Ok(result)) => {
                    entry.in_flight = None;
                    match result {
                        Ok(ReplyBody::Run(Some(run))) if run.state.is_final() => {
                            Polled::Final(HttpReply::json(200, &views::run(&run, true)))
                        }
                        Ok(ReplyBody::Run(None)) => Polled::Gone,
                        // Not final, an error or a timeout: ask again at the next poll.
                        _ => Polled::NotYet,
                    }
                }
            };
            let answer = match polled {
                Polled::Final(reply) => Some(reply),
                Polled::Gone => Some(entry.accepted.clone()),
                Polled::NotYet if now >= entry.deadline => Some(entry.accepted.clone()),
                Polled::NotYet => None,
            };
            if let Some(reply) = answer {
                let entry = self.entries.swap_remove(i);
                debug!(run_id = %entry.run_id, job = %entry.job, status = reply.status, "wait over");
                entry.responder.respond(reply);
                continue;
            }
            if entry.in_flight.is_none() && now >= entry.next_poll {
                let left = entry.deadline.saturating_duration_since(now);
                let query = Message::Query(Query::RunEnd {
                    run_id: entry.run_id.clone(),
                    wait_ms: u64::try_from(left.as_millis()).unwrap_or(u64::MAX),
                });
                entry.in_flight = Some(broker.request_async(query, left));
                entry.next_poll = now + POLL_EVERY;
            }
            i += 1;
        }
    }

    /// When the next thing is due without an answer: the earliest deadline or re-ask.
    pub fn next_due(&self) -> Option<Instant> {
        self.entries
            .iter()
            .map(|e| match e.in_flight {
                Some(_) => e.deadline,
                None => e.deadline.min(e.next_poll),
            })
            .min()
    }

    /// The answers being waited for.
    fn in_flight(&self) -> impl Iterator<Item = &ReplyReceiver> {
        self.entries.iter().filter_map(|e| e.in_flight.as_ref())
    }

    /// Answers every open request with its 202 (shutdown).
    pub fn release_all(&mut self) {
        for entry in self.entries.drain(..) {
            entry.responder.respond(entry.accepted);
        }
    }
}

/// The waiter thread's loop: takes new waits from `incoming` until it is closed or
/// `shutdown` is set, then answers what is still open.
pub fn run<R: Responder>(
    incoming: Receiver<(R, WaitRequest)>,
    broker: Arc<dyn Broker>,
    stats: Arc<Stats>,
    shutdown: Arc<AtomicBool>,
) {
    let mut waiters = Waiters::new(MAX_WAITING);
    loop {
        // Sleeps until a new request, an answer, the next deadline, or a look at the
        // shutdown flag (at least every 200 ms).
        let now = Instant::now();
        let nap = waiters
            .next_due()
            .map_or(IDLE_LOOK, |due| due.saturating_duration_since(now))
            .min(IDLE_LOOK);
        let mut select = Select::new();
        let new_request = select.recv(&incoming);
        for answer in waiters.in_flight() {
            select.recv(answer);
        }
        // Answers are taken by `tick`; here only a new request is received.
        if let Ok(ready) = select.ready_timeout(nap) {
            if ready == new_request {
                match incoming.try_recv() {
                    Ok((responder, wait)) => waiters.add(responder, wait, Instant::now()),
                    Err(TryRecvError::Empty) => {}
                    Err(TryRecvError::Disconnected) => break,
                }
            }
        }
        if shutdown.load(Ordering::Relaxed) {
            break;
        }
        waiters.tick(Instant::now(), broker.as_ref());
        stats.waiting.store(waiters.len() as u64, Ordering::Relaxed);
    }
    // Requests that arrived after the last look are answered too.
    while let Ok((responder, wait)) = incoming.try_recv() {
        responder.respond(wait.accepted);
    }
    waiters.release_all();
    stats.waiting.store(0, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use jobz::client::ClientError;
    use jobz::message::{Params, RunState, RunView};
    use serde_json::{json, Value};

    use super::*;
    use crate::broker::fake::FakeBroker;

    /// Records answers by request name.
    #[derive(Clone, Default)]
    struct Answers(Arc<Mutex<Vec<(String, HttpReply)>>>);

    struct Probe(String, Answers);

    impl Responder for Probe {
        fn respond(self, reply: HttpReply) {
            self.1 .0.lock().unwrap().push((self.0, reply));
        }
    }

    impl Answers {
        fn probe(&self, name: &str) -> Probe {
            Probe(name.into(), self.clone())
        }
        fn taken(&self) -> Vec<(String, u16)> {
            self.0
                .lock()
                .unwrap()
                .iter()
                .map(|(n, r)| (n.clone(), r.status))
                .collect()
        }
        fn body(&self, i: usize) -> Value {
            serde_json::from_slice(&self.0.lock().unwrap()[i].1.body).unwrap()
        }
    }

    fn wait(run_id: &str, secs: u64) -> WaitRequest {
        WaitRequest {
            run_id: run_id.into(),
            job: "build".into(),
            wait: Duration::from_secs(secs),
            accepted: HttpReply::json(202, &json!({"run_id": run_id})),
        }
    }

    fn run_in(state: RunState, run_id: &str) -> RunView {
        RunView {
            run_id: run_id.into(),
            job: "build".into(),
            params: Params::new(),
            state,
            parent_runs: vec![],
            created_at_ms: 0,
            finished_at_ms: None,
            steps: vec![],
            attempts: vec![],
            ..Default::default()
        }
    }

    /// Runs whose id starts with `done` are final, `gone` unknown, others running (the
    /// fake answers a run's end at once, as a broker with no room to hold the query does).
    fn broker() -> FakeBroker {
        FakeBroker::new(|m| match m {
            Message::Query(Query::RunEnd { run_id, .. }) if run_id.starts_with("done") => {
                Ok(ReplyBody::Run(Some(run_in(RunState::Succeeded, run_id))))
            }
            Message::Query(Query::RunEnd { run_id, .. }) if run_id.starts_with("gone") => {
                Ok(ReplyBody::Run(None))
            }
            Message::Query(Query::RunEnd { run_id, .. }) => {
                Ok(ReplyBody::Run(Some(run_in(RunState::Running, run_id))))
            }
            other => panic!("{other:?}"),
        })
    }

    #[test]
    fn the_run_end_is_asked_for_the_time_left_to_wait() {
        let broker = broker();
        let mut w = Waiters::new(10);
        let t0 = Instant::now();
        w.add(Answers::default().probe("a"), wait("running-2", 60), t0);
        w.tick(t0 + Duration::from_secs(20), &broker);
        assert_eq!(
            broker.seen(),
            vec![Message::Query(Query::RunEnd {
                run_id: "running-2".into(),
                wait_ms: 40_000
            })]
        );
    }

    #[test]
    fn answers_200_with_the_run_once_it_is_final() {
        let answers = Answers::default();
        let broker = broker();
        let mut w = Waiters::new(10);
        let t0 = Instant::now();
        w.add(answers.probe("a"), wait("done-1", 60), t0);
        w.tick(t0, &broker); // sends the poll
        assert!(answers.taken().is_empty());
        w.tick(t0, &broker); // reads its answer
        assert_eq!(answers.taken(), [("a".to_string(), 200)]);
        assert_eq!(answers.body(0)["run_id"], "done-1");
        assert_eq!(answers.body(0)["state"], "succeeded");
        assert!(w.is_empty());
    }

    #[test]
    fn asks_again_after_an_answer_that_is_not_the_end_and_202_at_the_deadline() {
        let answers = Answers::default();
        let broker = broker();
        let mut w = Waiters::new(10);
        let t0 = Instant::now();
        w.add(answers.probe("a"), wait("running-1", 1), t0);
        w.tick(t0, &broker);
        w.tick(t0 + Duration::from_millis(50), &broker); // answer read, next poll not due
        assert_eq!(broker.seen().len(), 1);
        w.tick(t0 + Duration::from_millis(100), &broker);
        assert_eq!(broker.seen().len(), 2);
        w.tick(t0 + Duration::from_millis(999), &broker);
        assert!(answers.taken().is_empty());
        w.tick(t0 + Duration::from_secs(1), &broker);
        assert_eq!(answers.taken(), [("a".to_string(), 202)]);
        assert!(w.is_empty());
    }

    #[test]
    fn a_slow_broker_gets_no_second_query_while_one_is_open() {
        struct Silent(
            Mutex<usize>,
            Mutex<Vec<crossbeam_channel::Sender<Result<ReplyBody, ClientError>>>>,
        );
        impl Broker for Silent {
            fn request_async(&self, _: Message, _: Duration) -> ReplyReceiver {
                *self.0.lock().unwrap() += 1;
                let (tx, rx) = crossbeam_channel::bounded(1);
                self.1.lock().unwrap().push(tx); // kept open, never answered
                rx
            }
        }
        let broker = Silent(Mutex::new(0), Mutex::new(Vec::new()));
        let answers = Answers::default();
        let mut w = Waiters::new(10);
        let t0 = Instant::now();
        w.add(answers.probe("a"), wait("x", 5), t0);
        for ms in [0, 100, 200, 300, 4_000] {
            w.tick(t0 + Duration::from_millis(ms), &broker);
        }
        assert_eq!(*broker.0.lock().unwrap(), 1);
        w.tick(t0 + Duration::from_secs(5), &broker);
        assert_eq!(answers.taken(), [("a".to_string(), 202)]);
    }

    #[test]
    fn errors_keep_waiting_and_an_unknown_run_gets_its_202() {
        let answers = Answers::default();
        let down = FakeBroker::down();
        let mut w = Waiters::new(10);
        let t0 = Instant::now();
        w.add(answers.probe("a"), wait("x", 5), t0);
        w.tick(t0, &down);
        w.tick(t0, &down);
        assert!(answers.taken().is_empty());
        let broker = broker();
        w.add(answers.probe("b"), wait("gone-1", 5), t0);
        w.tick(t0, &broker);
        w.tick(t0, &broker);
        assert_eq!(answers.taken(), [("b".to_string(), 202)]);
        assert_eq!(w.len(), 1);
    }

    #[test]
    fn over_capacity_answers_202_at_once_and_shutdown_releases_everyone() {
        let answers = Answers::default();
        let mut w = Waiters::new(2);
        let t0 = Instant::now();
        for name in ["a", "b", "c"] {
            w.add(answers.probe(name), wait("running", 60), t0);
        }
        assert_eq!(answers.taken(), [("c".to_string(), 202)]);
        w.release_all();
        assert_eq!(answers.taken().len(), 3);
        assert!(w.is_empty());
    }

    #[test]
    fn thread_answers_and_stops_when_the_channel_closes() {
        let answers = Answers::default();
        let (tx, rx) = crossbeam_channel::unbounded();
        let stats = Arc::new(Stats::default());
        let shutdown = Arc::new(AtomicBool::new(false));
        let thread = {
            let stats = stats.clone();
            let shutdown = shutdown.clone();
            std::thread::spawn(move || run(rx, Arc::new(broker()), stats, shutdown))
        };
        tx.send((answers.probe("done"), wait("done-7", 60)))
            .unwrap();
        tx.send((answers.probe("open"), wait("running-7", 60)))
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while answers.taken().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(answers.taken(), [("done".to_string(), 200)]);
        drop(tx);
        thread.join().unwrap();
        assert_eq!(
            answers.taken(),
            [("done".to_string(), 200), ("open".to_string(), 202)]
        );
        assert_eq!(stats.waiting.load(Ordering::Relaxed), 0);
    }
}
