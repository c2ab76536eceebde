//! The journal thread: the only owner of the store.
//!
//! It takes [`Effects`] in order, commits the writes of everything queued so far in one
//! transaction (group commit: one fsync for many messages under load; a record written
//! more than once in it is written once, in its last state: [`coalesce`]), and only then
//! hands their publications to the publisher and answers their reads. So an `Accepted`
//! or an `Ack` never leaves the broker before what it acknowledges is on disk. A trigger
//! that needs the states of runs only the store holds ([`RunLookup`]) goes back to the
//! server loop with them, for the engine to decide.
//!
//! Between commits it prunes history ([`Pruning`]): one small transaction at a time, a
//! batch per broker tick while a backlog lasts, then only a look every
//! [`Pruning::every`]. Commits never wait for more than one batch.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use jobz::message::{Message, Reply, ReplyBody, RunState};
use jobz::topic::Topic;
use tracing::{debug, error};

use crate::engine::{
    coalesce, Effects, Publish, ReadQuery, RunAction, RunLookup, StoreRead, Write,
};
use crate::feed_log::FeedLog;
use crate::meters::IoMeters;
use crate::notify::Notice;
use crate::store::{Pruned, Retention, Store, StoreError};

/// Most effects committed in one transaction.
const MAX_BATCH: usize = 1024;

/// While pruning has a backlog, the next batch follows after this (the broker's tick).
const PRUNE_BACKLOG_EVERY: Duration = Duration::from_millis(100);

/// How the journal prunes the store's history.
#[derive(Debug, Clone)]
pub struct Pruning {
    /// What to keep.
    pub retention: Retention,
    /// How often to look again once nothing more was due (`--prune-every`).
    pub every: Duration,
    /// Where every batch that removed anything is reported (the engine forgets what the
    /// store no longer holds, and counts it).
    pub report: Sender<Pruned>,
}

/// Where the journal hands what it committed beyond publications.
#[derive(Debug, Clone, Default)]
pub struct Handoff {
    /// Notices, once journaled, to the notifier (`None`: no notifier; they wait in the
    /// store for a broker started with `--notify`).
    pub notices: Option<Sender<Notice>>,
    /// Where each commit's duration is recorded (`/metrics`).
    pub io: Arc<IoMeters>,
}

/// Starts the journal thread; it times every commit into `handoff.io`. It ends when
/// `effects` is closed and drained, or on the first failed commit (returned as its error:
/// the broker must stop, not run ahead of its disk).
pub fn spawn(
    mut store: Box<dyn Store>,
    effects: Receiver<Effects>,
    publish: Sender<Publish>,
    pruning: Pruning,
    looked_up: Sender<Option<RunLookup>>,
    handoff: Handoff,
) -> anyhow::Result<JoinHandle<anyhow::Result<()>>> {
    std::thread::Builder::new()
        .name("journal".into())
        .spawn(move || {
            let mut next_prune = Instant::now();
            let mut feed = FeedLog::starting_at(jobz::now_ms());
            loop {
                let wait = next_prune.saturating_duration_since(Instant::now());
                match effects.recv_timeout(wait) {
                    Ok(first) => commit(
                        store.as_mut(),
                        &mut feed,
                        first,
                        &effects,
                        &publish,
                        &looked_up,
                        &handoff,
                    )?,
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => return Ok(()),
                }
                if Instant::now() >= next_prune {
                    let result = store.prune(&pruning.retention, jobz::now_ms());
                    next_prune = Instant::now() + next_prune_after(&result, pruning.every);
                    match result {
                        Ok(pruned) if !pruned.is_empty() => {
                            debug!(runs = pruned.runs, rows = pruned.rows, "pruned history");
                            // The server gone means the broker is stopping.
                            let _ = pruning.report.send(pruned);
                        }
                        Ok(_) => {}
                        // Nothing acknowledged depends on it: said, and tried again later.
                        Err(e) => error!(error = %e, "pruning the history failed"),
                    }
                }
            }
        })
        .context("starting the journal thread")
}

/// When to prune next: soon while there is a backlog, after `every` otherwise.
fn next_prune_after(result: &Result<Pruned, StoreError>, every: Duration) -> Duration {
    match result {
        Ok(pruned) if pruned.more => PRUNE_BACKLOG_EVERY.min(every),
        _ => every,
    }
}

/// Commits `first` and whatever else is queued (up to [`MAX_BATCH`]) in one transaction,
/// then publishes and answers for them, and hands back their lookups answered.
fn commit(
    store: &mut dyn Store,
    feed: &mut FeedLog,
    first: Effects,
    effects: &Receiver<Effects>,
    publish: &Sender<Publish>,
    looked_up: &Sender<Option<RunLookup>>,
    handoff: &Handoff,
) -> anyhow::Result<()> {
    let mut batch = vec![first];
    while batch.len() < MAX_BATCH {
        match effects.try_recv() {
            Ok(fx) => batch.push(fx),
            Err(_) => break,
        }
    }
    let writes: Vec<_> = batch
        .iter_mut()
        .flat_map(|fx| std::mem::take(&mut fx.writes))
        .collect();
    let writes = coalesce(writes);
    let began = Instant::now();
    if let Err(e) = store.apply(&writes) {
        error!(error = %e, "journal commit failed; stopping the broker");
        return Err(e).context("committing the journal");
    }
    // A batch of reads only (a dashboard, a follower, the feed's catch-up) commits
    // nothing: it is no sample of commit latency.
    if !writes.is_empty() {
        handoff.io.committed(began.elapsed());
    }
    if let Some(notifier) = &handoff.notices {
        for write in &writes {
            if let Write::Notice(notice) = write {
                // The notifier gone means the broker is stopping; the store keeps it.
                let _ = notifier.send(notice.clone());
            }
        }
    }
    debug!(
        effects = batch.len(),
        writes = writes.len(),
        "journal committed"
    );
    let events = batch
        .iter_mut()
        .flat_map(|fx| std::mem::take(&mut fx.feed))
        .collect();
    if let Some(told) = feed.record(events) {
        if publish.send(told).is_err() {
            anyhow::bail!("publisher stopped");
        }
    }
    for fx in batch {
        for p in fx.publish {
            if publish.send(p).is_err() {
                anyhow::bail!("publisher stopped");
            }
        }
        for read in fx.reads {
            if publish.send(answer(&*store, feed, read)).is_err() {
                anyhow::bail!("publisher stopped");
            }
        }
        for lookup in fx.lookups {
            // Every lookup is handed back, answered or not (`None`: refused here), so the
            // server knows when none is out.
            let answered = match look_up(&*store, lookup) {
                Ok(lookup) => Some(lookup),
                Err(refusal) => {
                    if publish.send(*refusal).is_err() {
                        anyhow::bail!("publisher stopped");
                    }
                    None
                }
            };
            if looked_up.send(answered).is_err() {
                anyhow::bail!("the server loop stopped");
            }
        }
    }
    Ok(())
}

/// The lookup with the store's answers in `known`, or the 503 its trigger gets when the
/// store cannot be read.
fn look_up(store: &dyn Store, mut lookup: RunLookup) -> Result<RunLookup, Box<Publish>> {
    match store.run_states(&lookup.ask) {
        Ok(states) => {
            let states: std::collections::HashMap<_, _> = states.into_iter().collect();
            for run_id in std::mem::take(&mut lookup.ask) {
                let state = states.get(&run_id).copied();
                lookup.known.insert(run_id, state);
            }
            Ok(lookup)
        }
        Err(e) => {
            error!(error = %e, "store read failed");
            Err(Box::new(Publish {
                topic: Topic::Node(lookup.env.sender.clone()),
                body: Message::Reply(Reply {
                    in_reply_to: lookup.env.id.clone(),
                    body: ReplyBody::Rejected {
                        status: 503,
                        error: e.to_string(),
                    },
                }),
            }))
        }
    }
}

fn answer(store: &dyn Store, feed: &FeedLog, read: StoreRead) -> Publish {
    let body = match &read.query {
        ReadQuery::Feed { after, limit } => Ok(ReplyBody::Feed(feed.page(*after, *limit))),
        ReadQuery::JobStats { job, since_ms } => {
            store.job_stats(job, *since_ms).map(ReplyBody::JobStats)
        }
        ReadQuery::Run(run_id) => store.run(run_id.as_str()).map(ReplyBody::Run),
        ReadQuery::Runs(filter) => store.runs(filter).map(ReplyBody::Runs),
        ReadQuery::Completions {
            jobs,
            since_ms,
            limit,
        } => store
            .completions(jobs, *since_ms, *limit)
            .map(ReplyBody::Completions),
        ReadQuery::EndedRun { run_id, action } => {
            store.run(run_id.as_str()).map(|view| match view {
                None => ReplyBody::Run(None),
                // Cancelling a cancelled run changes nothing: it is answered as it stands.
                Some(view) if *action == RunAction::Cancel && view.state == RunState::Cancelled => {
                    ReplyBody::Run(Some(view))
                }
                Some(view) => ReplyBody::Rejected {
                    status: 409,
                    error: format!(
                        "run {run_id} has {}: it cannot be {} any more",
                        view.state,
                        action.done_to_it()
                    ),
                },
            })
        }
    }
    .unwrap_or_else(|e| {
        error!(error = %e, "store read failed");
        ReplyBody::Rejected {
            status: 503,
            error: e.to_string(),
        }
    });
    Publish {
        topic: Topic::Node(read.reply_to),
        body: Message::Reply(Reply {
            in_reply_to: read.in_reply_to,
            body,
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use crossbeam_channel::unbounded;
    use jobz::envelope::Envelope;
    use jobz::message::TriggerRequest;

    use super::*;
    use crate::ids::RunId;
    use crate::model::Run;
    use crate::store::SqliteStore;

    fn run(id: &str, state: RunState, finished_at_ms: Option<i64>) -> Write {
        let mut run = Run::new(
            id.into(),
            "a",
            Default::default(),
            state,
            format!("req-{id}"),
            1,
        );
        run.finished_at_ms = finished_at_ms;
        Write::Run(run)
    }

    #[test]
    fn history_is_pruned_in_small_batches_while_commits_go_on() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = SqliteStore::open(dir.path()).unwrap();
        let old: Vec<Write> = (0..30)
            .map(|i| run(&format!("old{i}"), RunState::Succeeded, Some(2 + i)))
            .collect();
        store.apply(&old).unwrap();
        let (effects_tx, effects_rx) = unbounded();
        let (publish_tx, publish_rx) = unbounded();
        let (report_tx, report_rx) = unbounded();
        let pruning = Pruning {
            retention: Retention {
                batch_rows: 4,
                ..Retention::new(7, 0)
            },
            every: Duration::from_secs(3600),
            report: report_tx,
        };
        let (looked_up, _) = unbounded();
        let io = Arc::new(IoMeters::default());
        let handoff = Handoff {
            notices: None,
            io: Arc::clone(&io),
        };
        let journal = spawn(
            Box::new(store),
            effects_rx,
            publish_tx,
            pruning,
            looked_up,
            handoff,
        )
        .unwrap();

        // A run triggered meanwhile is committed and acknowledged between batches.
        let ack = Publish {
            topic: Topic::Node("frontend:x".into()),
            body: Message::Reply(Reply {
                in_reply_to: "m1".into(),
                body: ReplyBody::Ack,
            }),
        };
        effects_tx
            .send(Effects {
                writes: vec![run("active", RunState::Running, None)],
                publish: vec![ack.clone()],
                ..Effects::default()
            })
            .unwrap();
        assert_eq!(
            publish_rx.recv_timeout(Duration::from_secs(10)).unwrap(),
            ack
        );

        let deadline = Instant::now() + Duration::from_secs(10);
        let mut runs = 0;
        let mut batches = 0;
        while runs < 30 {
            let batch = report_rx.recv_deadline(deadline).expect("a prune report");
            assert!(batch.rows <= 4, "{batch:?}");
            runs += batch.runs;
            batches += 1;
        }
        assert_eq!((runs, batches), (30, 8));
        drop(effects_tx);
        journal.join().unwrap().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        let left = store.runs(&jobz::message::RunFilter {
            limit: 100,
            ..Default::default()
        });
        let left: Vec<String> = left.unwrap().into_iter().map(|r| r.run_id).collect();
        assert_eq!(left, ["active"]);
    }

    #[test]
    fn a_backlog_is_pruned_a_batch_a_tick_and_an_idle_store_only_looked_at() {
        let every = Duration::from_secs(5);
        let backlog = Ok(Pruned {
            more: true,
            ..Pruned::default()
        });
        assert_eq!(next_prune_after(&backlog, every), PRUNE_BACKLOG_EVERY);
        assert_eq!(next_prune_after(&Ok(Pruned::default()), every), every);
        let failed = Err(StoreError::Io("disk".into()));
        assert_eq!(next_prune_after(&failed, every), every);
    }

    fn store_with(runs: &[(&str, RunState)]) -> SqliteStore {
        let mut store = SqliteStore::in_memory().unwrap();
        let writes: Vec<Write> = runs
            .iter()
            .map(|(id, state)| {
                let mut run = Run::new(
                    (*id).into(),
                    "a",
                    Default::default(),
                    *state,
                    id.to_string(),
                    1,
                );
                run.finished_at_ms = state.is_final().then_some(2);
                Write::Run(run)
            })
            .collect();
        store.apply(&writes).unwrap();
        store
    }

    fn body(publish: &Publish) -> &ReplyBody {
        match &publish.body {
            Message::Reply(reply) => &reply.body,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_control_request_for_an_ended_run_is_answered_by_how_it_ended() {
        let store = store_with(&[("done", RunState::Succeeded), ("off", RunState::Cancelled)]);
        let ask = |run_id: &str, action| {
            let read = StoreRead {
                reply_to: "frontend:f".into(),
                in_reply_to: "m1".into(),
                query: ReadQuery::EndedRun {
                    run_id: run_id.into(),
                    action,
                },
            };
            body(&answer(&store, &FeedLog::new(1, 1), read)).clone()
        };
        assert!(
            matches!(ask("off", RunAction::Cancel), ReplyBody::Run(Some(r)) if r.state == RunState::Cancelled)
        );
        assert!(matches!(ask("done", RunAction::Cancel),
            ReplyBody::Rejected { status: 409, error } if error.contains("succeeded") && error.contains("cancelled")));
        assert!(matches!(
            ask("off", RunAction::Prioritize),
            ReplyBody::Rejected { status: 409, .. }
        ));
        assert_eq!(ask("nope", RunAction::Cancel), ReplyBody::Run(None));
    }

    #[test]
    fn a_lookup_gets_the_state_of_each_run_asked_or_none() {
        let store = store_with(&[("done", RunState::Succeeded)]);
        let lookup = RunLookup {
            env: Envelope::new("frontend:f", Message::Trigger(TriggerRequest::default())),
            known: BTreeMap::from([(RunId::from("before"), None)]),
            ask: vec!["done".into(), "nope".into()],
        };
        let answered = look_up(&store, lookup).unwrap();
        assert!(answered.ask.is_empty());
        assert_eq!(
            answered.known,
            BTreeMap::from([
                (RunId::from("before"), None),
                (RunId::from("done"), Some(RunState::Succeeded)),
                (RunId::from("nope"), None),
            ])
        );
    }
}
