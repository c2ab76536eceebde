//! What the engine asks of the rest of the broker: records to journal, messages to
//! publish once those are durable, and reads the store answers.

use jobz::envelope::{Envelope, MessageId};
use jobz::message::{Message, Reply, ReplyBody, RunFilter};
use jobz::topic::Topic;

use crate::ids::RunId;
use crate::model::{Attempt, Dead, Run, Step, Task};
use crate::registry::{CatalogEntry, Worker};

/// A record to journal; the store upserts it.
#[derive(Debug, Clone, PartialEq)]
pub enum Write {
    Run(Run),
    Step(Step),
    Task(Task),
    Worker(Worker),
    Job(CatalogEntry),
    Attempt(Attempt),
    /// A result for a task of a run that has ended (so it is no longer in memory): the
    /// store records it as a late attempt unless it is the task's current attempt (then it
    /// is a plain duplicate). `run_id` is filled in by the store.
    ResultAfterRunEnd(Attempt),
    Dead(Dead),
}

/// A message to publish.
#[derive(Debug, Clone, PartialEq)]
pub struct Publish {
    pub topic: Topic,
    pub body: Message,
}

/// A read the journal answers from the store, after the writes before it are committed.
#[derive(Debug, Clone, PartialEq)]
pub struct StoreRead {
    pub reply_to: String,
    pub in_reply_to: MessageId,
    pub query: ReadQuery,
}

/// Reads that need the store.
#[derive(Debug, Clone, PartialEq)]
pub enum ReadQuery {
    Run(RunId),
    Runs(RunFilter),
    Completions {
        jobs: Vec<String>,
        since_ms: i64,
        limit: u32,
    },
}

/// What one event makes the broker do, in order: journal `writes` in one transaction,
/// then publish `publish`, then answer `reads`.
#[derive(Debug, Default)]
pub struct Effects {
    pub writes: Vec<Write>,
    pub publish: Vec<Publish>,
    pub reads: Vec<StoreRead>,
}

impl Effects {
    pub fn is_empty(&self) -> bool {
        self.writes.is_empty() && self.publish.is_empty() && self.reads.is_empty()
    }
}

/// Answers the sender of `env` (published after the writes before it are committed).
pub(super) fn reply(fx: &mut Effects, env: &Envelope, body: ReplyBody) {
    fx.publish.push(Publish {
        topic: Topic::Node(env.sender.clone()),
        body: Message::Reply(Reply {
            in_reply_to: env.id.clone(),
            body,
        }),
    });
}
