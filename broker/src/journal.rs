//! The journal thread: the only owner of the store.
//!
//! It takes [`Effects`] in order, commits the writes of everything queued so far in one
//! transaction (group commit: one fsync for many messages under load), and only then
//! hands their publications to the publisher and answers their reads. So an `Accepted`
//! or an `Ack` never leaves the broker before what it acknowledges is on disk.

use std::thread::JoinHandle;

use anyhow::Context;
use crossbeam_channel::{Receiver, Sender};
use jobz::message::{Message, Reply, ReplyBody};
use jobz::topic::Topic;
use tracing::{debug, error};

use crate::engine::{Effects, Publish, ReadQuery, StoreRead};
use crate::store::Store;

/// Most effects committed in one transaction.
const MAX_BATCH: usize = 1024;

/// Starts the journal thread. It ends when `effects` is closed and drained, or on the
/// first failed commit (returned as its error: the broker must stop, not run ahead of
/// its disk).
pub fn spawn(
    mut store: Box<dyn Store>,
    effects: Receiver<Effects>,
    publish: Sender<Publish>,
) -> anyhow::Result<JoinHandle<anyhow::Result<()>>> {
    std::thread::Builder::new()
        .name("journal".into())
        .spawn(move || {
            while let Ok(first) = effects.recv() {
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
                        if publish.send(answer(store.as_ref(), read)).is_err() {
                            anyhow::bail!("publisher stopped");
                        }
                    }
                }
            }
            Ok(())
        })
        .context("starting the journal thread")
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
