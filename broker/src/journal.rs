//! The journal thread: the only owner of the store.
//!
//! It takes [`Effects`] in order, commits the writes of everything queued so far in one
//! transaction (group commit: one fsync for many messages under load), and only then
//! hands their publications to the publisher and answers their reads. So an `Accepted`
//! or an `Ack` never leaves the broker before what it acknowledges is on disk.
//!
//! Between commits it prunes history ([`Pruning`]): one small transaction at a time, a
//! batch per broker tick while a backlog lasts, then only a look every
//! [`Pruning::every`]. Commits never wait for more than one batch.

use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use jobz::message::{Message, Reply, ReplyBody};
use jobz::topic::Topic;
use tracing::{debug, error};

use crate::engine::{Effects, Publish, ReadQuery, StoreRead};
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

/// Starts the journal thread. It ends when `effects` is closed and drained, or on the
/// first failed commit (returned as its error: the broker must stop, not run ahead of
/// its disk).
pub fn spawn(
    mut store: Box<dyn Store>,
    effects: Receiver<Effects>,
    publish: Sender<Publish>,
    pruning: Pruning,
) -> anyhow::Result<JoinHandle<anyhow::Result<()>>> {
    std::thread::Builder::new()
        .name("journal".into())
        .spawn(move || {
            let mut next_prune = Instant::now();
            loop {
                let wait = next_prune.saturating_duration_since(Instant::now());
                match effects.recv_timeout(wait) {
                    Ok(first) => commit(store.as_mut(), first, &effects, &publish)?,
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
/// then publishes and answers for them.
fn commit(
    store: &mut dyn Store,
    first: Effects,
    effects: &Receiver<Effects>,
    publish: &Sender<Publish>,
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
    if let Err(e) = store.apply(&writes) {
        error!(error = %e, "journal commit failed; stopping the broker");
        return Err(e).context("committing the journal");
    }
    debug!(
        effects = batch.len(),
        writes = writes.len(),
        "journal committed"
    );
    for fx in batch {
        for p in fx.publish {
            if publish.send(p).is_err() {
                anyhow::bail!("publisher stopped");
            }
        }
        for read in fx.reads {
            if publish.send(answer(&*store, read)).is_err() {
                anyhow::bail!("publisher stopped");
            }
        }
    }
    Ok(())
}

fn answer(store: &dyn Store, read: StoreRead) -> Publish {
    let body = match &read.query {
        ReadQuery::Run(run_id) => store.run(run_id.as_str()).map(ReplyBody::Run),
        ReadQuery::Runs(filter) => store.runs(filter).map(ReplyBody::Runs),
        ReadQuery::Completions {
            jobs,
            since_ms,
            limit,
        } => store
            .completions(jobs, *since_ms, *limit)
            .map(ReplyBody::Completions),
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
    use crossbeam_channel::unbounded;
    use jobz::message::RunState;

    use super::*;
    use crate::engine::Write;
    use crate::model::Run;
    use crate::store::SqliteStore;

    fn run(id: &str, state: RunState, finished_at_ms: Option<i64>) -> Write {
        Write::Run(Run {
            run_id: id.into(),
            job: "a".into(),
            params: Default::default(),
            state,
            parent_runs: vec![],
            request_id: format!("req-{id}"),
            created_at_ms: 1,
            finished_at_ms,
        })
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
        let journal = spawn(Box::new(store), effects_rx, publish_tx, pruning).unwrap();

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
                reads: vec![],
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
}
