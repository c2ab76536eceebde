//! What the engine asks of the rest of the broker: records to journal, messages to
//! publish once those are durable, and reads the store answers.

use jobz::envelope::{Envelope, MessageId};
use std::collections::BTreeMap;

use jobz::message::{Message, Reply, ReplyBody, RunFilter, RunState};
use jobz::topic::Topic;

use super::resources::{Edge, Written};
use crate::ids::RunId;
use crate::model::{Attempt, Dead, Run, Step, Task};
use crate::notify::{Notice, Tried};
use crate::registry::{CatalogEntry, Worker};

/// A record to journal; the store upserts it.
#[derive(Debug, Clone, PartialEq)]
pub enum Write {
    Run(Run),
    Step(Step),
    Task(Task),
    Worker(Worker),
    /// A worker that left or that an operator forgot.
    WorkerForgotten {
        name: String,
    },
    Job(CatalogEntry),
    Attempt(Attempt),
    /// A result for a task of a run that has ended (so it is no longer in memory): the
    /// store records it as a late attempt unless it is the task's current attempt (then it
    /// is a plain duplicate). `run_id` is filled in by the store.
    ResultAfterRunEnd(Attempt),
    Dead(Dead),
    /// A task ended for good (succeeded or failed): counted once in its job's statistics
    /// of the day. Made only where the engine ends a task, so never counted twice.
    TaskEnded(Task),
    /// A run marked tracked or not; nothing if the store does not hold it (the read that
    /// follows answers 404).
    Tracked {
        run_id: RunId,
        tracked: bool,
    },
    /// A resource written by a step or created by an operator.
    Resource(Written),
    /// A resource an operator cleared.
    ResourceCleared {
        name: String,
    },
    /// A lineage edge seen for the first time.
    Edge(Edge),
    /// A notice to deliver, made as its run ended.
    Notice(Notice),
    /// An attempt to deliver a notice (from the notifier, not the engine).
    NoticeTried(Tried),
}

impl Write {
    /// What a write replaces whole: a later write with the same key leaves nothing of an
    /// earlier one (each carries its whole record, and the fields an upsert leaves alone
    /// never change). `None` for writes that update part of a row or depend on what is
    /// already stored.
    fn whole_record_key(&self) -> Option<(u8, &str, u32)> {
        match self {
            Write::Run(r) => Some((0, r.run_id.as_str(), 0)),
            Write::Step(s) => Some((1, s.step_id.as_str(), 0)),
            Write::Task(t) => Some((2, t.task_id.as_str(), 0)),
            Write::Worker(w) => Some((3, w.name.as_str(), 0)),
            Write::WorkerForgotten { name } => Some((3, name.as_str(), 0)),
            Write::Job(c) => Some((4, c.spec.name.as_str(), 0)),
            Write::Attempt(a) => Some((5, a.task_id.as_str(), a.attempt)),
            Write::Dead(d) => Some((6, d.task_id.as_str(), 0)),
            // Written or cleared: the last one says what the resource is.
            Write::Resource(w) => Some((7, w.name.as_str(), 0)),
            Write::ResourceCleared { name } => Some((7, name.as_str(), 0)),
            Write::Notice(n) => Some((8, n.id.as_str(), 0)),
            Write::ResultAfterRunEnd(_)
            | Write::Tracked { .. }
            | Write::Edge(_)
            | Write::TaskEnded(_)
            | Write::NoticeTried(_) => None,
        }
    }
}

/// The writes of one commit without those a later write of the same record replaces:
/// under load a task is often started and finished, or a run made and ended, within one
/// group commit, and only its last state needs writing. What is left keeps its order
/// (each record at the place of its last write), so the store ends in the same state.
pub fn coalesce(writes: Vec<Write>) -> Vec<Write> {
    let mut seen = std::collections::HashSet::new();
    let mut keep = vec![true; writes.len()];
    for (i, write) in writes.iter().enumerate().rev() {
        if let Some(key) = write.whole_record_key() {
            keep[i] = seen.insert(key);
        }
    }
    let mut keep = keep.into_iter();
    writes
        .into_iter()
        .filter(|_| keep.next().unwrap_or(true))
        .collect()
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
    /// A run-control request for a run no longer in memory (ended, or never made): the run
    /// if `action` leaves it as it is (cancelling a cancelled run), else 409 saying how it
    /// ended, or `Run(None)` when the store does not hold it.
    EndedRun {
        run_id: RunId,
        action: RunAction,
    },
    /// A job's per-day task statistics since `since_ms`.
    JobStats {
        job: String,
        since_ms: i64,
    },
    /// The feed's events after `after` (the journal's, not the store's).
    Feed {
        after: u64,
        limit: u32,
    },
}

/// What a run-control request asked of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunAction {
    Cancel,
    Prioritize,
    /// Given targets to tell of its end (`track?notify=`).
    Notify,
}

impl RunAction {
    /// "cancelled", "given a new priority": for the 409 of an ended run.
    pub fn done_to_it(self) -> &'static str {
        match self {
            RunAction::Cancel => "cancelled",
            RunAction::Prioritize => "given a new priority",
            RunAction::Notify => "given targets to notify of its end",
        }
    }
}

/// A trigger that needs the states of runs only the store knows (its `depends=` names runs
/// that ended long ago): the journal reads them after committing what came before, and
/// hands the trigger back to the engine with the answers ([`crate::engine::Engine::on_lookup`]).
#[derive(Debug, Clone, PartialEq)]
pub struct RunLookup {
    /// The trigger, as it came.
    pub env: Envelope,
    /// What is known so far of the runs it depends on: `None`, the store does not hold it.
    pub known: BTreeMap<RunId, Option<RunState>>,
    /// The runs to look up.
    pub ask: Vec<RunId>,
}

/// What one event makes the broker do, in order: journal `writes` in one transaction,
/// then publish `publish`, then answer `reads` and look up what `lookups` need.
#[derive(Debug, Default)]
pub struct Effects {
    pub writes: Vec<Write>,
    pub publish: Vec<Publish>,
    /// What changed, for the feed: numbered and published by the journal after the commit.
    pub feed: Vec<jobz::message::FeedEvent>,
    pub reads: Vec<StoreRead>,
    pub lookups: Vec<RunLookup>,
}

impl Effects {
    pub fn is_empty(&self) -> bool {
        self.writes.is_empty()
            && self.publish.is_empty()
            && self.feed.is_empty()
            && self.reads.is_empty()
            && self.lookups.is_empty()
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

/// Answers the sender of `env` with what the store reads for `query`, after the writes
/// before it are committed.
pub(super) fn read(fx: &mut Effects, env: &Envelope, query: ReadQuery) {
    fx.reads.push(StoreRead {
        reply_to: env.sender.clone(),
        in_reply_to: env.id.clone(),
        query,
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use jobz::message::TaskState;

    fn task_write(id: &str, state: TaskState) -> Write {
        Write::Task(Task {
            task_id: id.into(),
            step_id: "s".into(),
            run_id: "r".into(),
            job: "j".into(),
            worker: None,
            state,
            attempt: 1,
            failures: 0,
            fanout: 1,
            exit_code: None,
            error: None,
            instance: None,
            created_at_ms: 0,
            started_at_ms: None,
            finished_at_ms: None,
            recorded_at_ms: None,
            output_tail: String::new(),
        })
    }

    #[test]
    fn only_the_last_write_of_a_record_is_kept_at_its_place() {
        let tracked = Write::Tracked {
            run_id: "r".into(),
            tracked: true,
        };
        let writes = vec![
            task_write("t1", TaskState::Pending),
            task_write("t2", TaskState::Pending),
            tracked.clone(),
            task_write("t1", TaskState::Running),
            tracked.clone(),
            task_write("t1", TaskState::Succeeded),
        ];
        assert_eq!(
            coalesce(writes),
            vec![
                task_write("t2", TaskState::Pending),
                tracked.clone(),
                tracked,
                task_write("t1", TaskState::Succeeded),
            ]
        );
    }
}
