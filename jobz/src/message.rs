//! Every message of the jobz protocol, one documented variant each.
//!
//! Clients (workers, semaphores, frontends) send on PUSH to the broker's PULL socket.
//! The broker answers and publishes on its PUB socket under a [`crate::topic::Topic`]:
//! work for a job goes to the job's topic, replies to the asking node's topic,
//! completion events to the job's event topic.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::envelope::MessageId;
use crate::jobfile::JobSpec;

/// Parameters of a run: name to value, as they came from the trigger.
pub type Params = BTreeMap<String, String>;

/// The body of an [`crate::envelope::Envelope`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Message {
    /// Client → broker: "I am here". Answered with [`ReplyBody::Welcome`] on the sender's
    /// topic, which proves the reply path (SUB subscription) works: ZeroMQ's slow joiner.
    Hello {
        /// What kind of node says hello.
        role: Role,
    },
    /// Worker → broker, every heartbeat interval: registration and liveness in one.
    /// Carries the full status so a restarted broker rebuilds its registry from one beat.
    Heartbeat(WorkerStatus),
    /// Client → broker: start a run of a job. Answered with `Accepted` once journaled,
    /// or `Rejected` (unknown job, bad parameters).
    Trigger(TriggerRequest),
    /// Worker → broker: a task's command has started. Answered with `Ack`.
    TaskStarted(TaskStarted),
    /// Worker → broker: a task has ended. Answered with `Ack` once journaled; the worker
    /// resends (same message id) until then.
    TaskFinished(TaskFinished),
    /// Client → broker: read state. Answered with the matching `ReplyBody`.
    Query(Query),
    /// Semaphore → broker: the state of its barriers and schedules, for `GET /semaphores`
    /// and `GET /schedules`. Not answered.
    SemaphoreStatus {
        /// Every barrier key it tracks (open ones and recently closed ones).
        barriers: Vec<BarrierView>,
        /// Every schedule it serves (absent from semaphores older than schedules).
        #[serde(default)]
        schedules: Vec<ScheduleView>,
    },
    /// Client → broker: run a dead task's job again, as a new run with the same parameters
    /// naming the old run as its parent. Answered with `Accepted` (the same run id if it
    /// was retried before) or `Rejected` (404 unknown task or job, 400 parameters no
    /// longer valid).
    RetryDead {
        /// The dead task.
        task_id: String,
    },
    /// Frontend → broker: cancel a run. A scheduled, waiting or pending run ends
    /// `cancelled` at once; a running one is `cancelled` at once and ends when its workers
    /// have killed its tasks ([`Message::CancelWork`]). Runs that depend on it fail. Answered
    /// `Run(Some(run))` once journaled (also for a run cancelled before: cancelling is
    /// idempotent), `Run(None)` for an unknown run, or `Rejected` with 409 when the run has
    /// ended otherwise or other runs wait for it and `force` is false.
    CancelRun {
        /// The run.
        run_id: String,
        /// Cancel it even though other runs wait for it (they fail).
        force: bool,
    },
    /// Frontend → broker: change the priority of an unfinished run; its steps waiting for a
    /// slot move in line, and its later steps take it. Answered `Run(Some(run))`,
    /// `Run(None)` for an unknown run, or `Rejected` with 409 for a finished one.
    PrioritizeRun {
        /// The run.
        run_id: String,
        /// The new priority: higher starts first.
        priority: i32,
    },
    /// Frontend → broker: mark a run tracked or not (`/runs?tracked=1` lists the tracked
    /// ones). Answered `Run(Some(run))`, or `Run(None)` for an unknown run; `Rejected` 409
    /// when `notify` is given for a run that has ended.
    TrackRun {
        /// The run.
        run_id: String,
        /// Tracked from now on, or not.
        tracked: bool,
        /// Targets told when the run ends, however it ends (added to those of its job).
        #[serde(default)]
        notify: Vec<crate::jobfile::NotifyTarget>,
    },
    /// Frontend → broker: an operator creates a resource (it exists from now on, as if a
    /// step had written it) or clears one (it is missing until written again). Answered
    /// `Resources` with that resource's view.
    ControlResource {
        /// The resource name.
        name: String,
        /// Create or clear.
        action: ResourceAction,
    },
    /// Frontend → broker: an operator forgets a worker that is lost (no heartbeat within
    /// the expiry) or leaving: it leaves the worker list and the store. Answered `Ack`, or
    /// `Rejected` with 404 for an unknown worker and 409 for a live one.
    ForgetWorker {
        /// The worker's name.
        name: String,
    },
    /// Broker → workers (on the job's topic): stop these tasks of a cancelled run. A worker
    /// kills the process group of each it runs, drops each it has queued, and refuses each
    /// it has not seen yet; it reports every one with [`TaskOutcome::Cancelled`] (one it had
    /// already finished is reported as it ended). Published again until reported.
    CancelWork(CancelWork),
    /// Broker → one node (on the node's topic): the answer to a message it sent.
    Reply(Reply),
    /// Broker → workers (on the job's topic): tasks to run.
    Work(Work),
    /// Broker → subscribers (on the job's event topic): something finished.
    Event(Event),
    /// Worker → broker: output a running step wrote, shipped while it runs (at most
    /// [`TASK_OUTPUT_CHUNK_BYTES`] a message, [`TASK_OUTPUT_LIVE_CAP`] an attempt). Not
    /// answered: a lost chunk shows as a gap, and the result's tail still ends the story.
    TaskOutput(TaskOutput),
}

/// The kind of node, as it introduces itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// `jobz-worker`.
    Worker,
    /// `jobz-frontend`.
    Frontend,
    /// `jobz-semaphore`.
    Semaphore,
    /// A command-line or test client.
    Client,
}

/// A worker's registration, resent on every heartbeat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerStatus {
    /// Unique worker name (`--name`, default host name).
    pub name: String,
    /// Random id of this worker process; a new one means the worker restarted.
    pub instance: String,
    /// Jobs this worker serves, as loaded from its `jobs.d`.
    pub jobs: Vec<JobSpec>,
    /// Capabilities (`--capability`).
    #[serde(default)]
    pub capabilities: Vec<String>,
    /// Steps it runs at once (`--slots`).
    pub slots: u32,
    /// Tasks it is running now: (task id, attempt).
    #[serde(default)]
    pub running: Vec<TaskRef>,
    /// Version of the worker binary.
    pub version: String,
    /// The worker's own counters since it started (`output_files_pruned`, …), shown per
    /// worker in `/metrics`. The broker keeps at most [`MAX_WORKER_COUNTERS`] with names
    /// that pass [`is_valid_counter_name`].
    #[serde(default)]
    pub counters: BTreeMap<String, u64>,
    /// The worker is stopping (SIGTERM): it takes no new work and drains what it runs; with
    /// `running` empty it is about to exit. The broker gives it nothing new at once, takes
    /// it off the live list, and forgets it once nothing of it runs.
    #[serde(default)]
    pub leaving: bool,
}

/// Counters the broker keeps per worker.
pub const MAX_WORKER_COUNTERS: usize = 32;

/// A counter name: `[a-z][a-z0-9_]{0,63}`, a metric name as it stands.
pub fn is_valid_counter_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// A task at one attempt.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TaskRef {
    /// The task id.
    pub task_id: String,
    /// Attempt number, from 1.
    pub attempt: u32,
}

/// Most bytes of output one [`Message::TaskOutput`] carries.
pub const TASK_OUTPUT_CHUNK_BYTES: usize = 16 * 1024;

/// Most bytes of one attempt's output shipped while it runs; the rest stays in the output
/// file on the worker's host (and the result's tail).
pub const TASK_OUTPUT_LIVE_CAP: u64 = 1024 * 1024;

/// A piece of a running attempt's output ([`Message::TaskOutput`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskOutput {
    /// The task attempt.
    pub task: TaskRef,
    /// The worker running it (must be the sender).
    pub worker: String,
    /// Byte offset of this piece in the attempt's output.
    pub offset: u64,
    /// Bytes of output this piece covers (the text may differ in length: invalid UTF-8 is
    /// replaced).
    pub bytes: u64,
    /// The output, as text.
    pub text: String,
    /// Set on the last piece shipped live when the attempt's output passed
    /// [`TASK_OUTPUT_LIVE_CAP`]: nothing more comes until the result.
    #[serde(default)]
    pub capped: bool,
}

/// Output of a task attempt as the broker holds it (`Query::TaskOutput`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LiveOutputView {
    /// Byte offset of `text`'s start: above the asked `from` when older output was
    /// dropped (or never arrived).
    pub from: u64,
    /// The output from `from` on, as far as the broker has it.
    pub text: String,
    /// The offset to ask from next time.
    pub next: u64,
    /// The worker stopped shipping: the output passed the live cap.
    pub capped: bool,
    /// The attempt has ended: no more output will come.
    pub finished: bool,
}

/// Request to start a run. Every field after `params` is optional on the wire, so a
/// frontend or semaphore that does not know it still triggers as before.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TriggerRequest {
    /// The job to start.
    pub job: String,
    /// Its parameters (validated by the broker against the job's declaration).
    pub params: Params,
    /// Runs this one was waiting for (set by semaphores).
    #[serde(default)]
    pub parent_runs: Vec<String>,
    /// Priority of the run's steps (`priority=`); `None`: the job's `priority:`.
    #[serde(default)]
    pub priority: Option<i32>,
    /// Start no earlier than this long after the broker accepts the run (`delay=`).
    #[serde(default)]
    pub delay_ms: Option<u64>,
    /// Start no earlier than this time, ms since the epoch (`at=`).
    #[serde(default)]
    pub at_ms: Option<i64>,
    /// Runs that must all succeed before this one starts (`depends=`).
    #[serde(default)]
    pub depends: Vec<String>,
    /// Labels of the run, added to its job's `tags:` (`tags=`).
    #[serde(default)]
    pub tags: Vec<String>,
    /// The client's key for this trigger (`idempotency_key=`, `Idempotency-Key:`): a
    /// trigger of the same job with the same key within a day gets the run the first one
    /// made, also across a broker restart ([`is_valid_idempotency_key`]).
    #[serde(default)]
    pub idempotency_key: Option<String>,
}

/// Longest idempotency key.
pub const MAX_IDEMPOTENCY_KEY: usize = 128;

/// An idempotency key: 1 to 128 of `[A-Za-z0-9._:@/+=-]` (a UUID, a hash, a job id).
pub fn is_valid_idempotency_key(key: &str) -> bool {
    (1..=MAX_IDEMPOTENCY_KEY).contains(&key.len())
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:@/+=-".contains(&b))
}

/// A task's command started on a worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskStarted {
    /// Which task, which attempt.
    pub task: TaskRef,
    /// Worker name.
    pub worker: String,
    /// Worker instance (see [`WorkerStatus::instance`]).
    pub instance: String,
    /// When the command started, ms since the epoch.
    pub started_at_ms: i64,
}

/// How a task ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskOutcome {
    /// Exit code 0.
    Succeeded,
    /// Non-zero exit, killed by a signal, or could not start.
    Failed,
    /// Ran past its `timeout`; its process group was killed.
    TimedOut,
    /// Stopped because its run was cancelled ([`Message::CancelWork`]): its process group
    /// was killed, or it never started.
    Cancelled,
}

/// A task's command ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskFinished {
    /// Which task, which attempt.
    pub task: TaskRef,
    /// Worker name.
    pub worker: String,
    /// How it ended.
    pub outcome: TaskOutcome,
    /// Exit code, if the process exited (none when killed by a signal or not started).
    pub exit_code: Option<i32>,
    /// Why it failed, when that is not just the exit code.
    #[serde(default)]
    pub error: Option<String>,
    /// When the command started, ms since the epoch.
    pub started_at_ms: i64,
    /// When it ended, ms since the epoch.
    pub finished_at_ms: i64,
    /// The last lines of output (bounded; the whole output stays in the worker's log dir).
    #[serde(default)]
    pub output_tail: String,
}

/// Tasks of one step, published on the job's topic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Work {
    /// The run this step belongs to.
    pub run_id: String,
    /// The step.
    pub step_id: String,
    /// The job to run (equal to the topic's job name).
    pub job: String,
    /// Parameters of the run.
    pub params: Params,
    /// One entry per worker that must run it; a worker runs only its own.
    pub assignments: Vec<Assignment>,
}

/// Tasks of one step of a cancelled run, published on the job's topic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CancelWork {
    /// The run.
    pub run_id: String,
    /// The step.
    pub step_id: String,
    /// The job (equal to the topic's job name).
    pub job: String,
    /// One entry per worker that must stop a task; a worker acts only on its own.
    pub assignments: Vec<Assignment>,
}

/// One task of a step, for one worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Assignment {
    /// Worker that runs it.
    pub worker: String,
    /// Task id and attempt.
    pub task: TaskRef,
}

/// A read request to the broker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Query {
    /// One run with its tasks.
    Run {
        /// The run id.
        run_id: String,
    },
    /// Runs, newest first.
    Runs(RunFilter),
    /// Known jobs with the workers that serve them.
    Jobs,
    /// Known workers.
    Workers,
    /// Broker liveness and counters.
    Health,
    /// Tasks that failed for good (retries exhausted), newest first.
    Dead {
        /// At most this many (the broker caps it).
        limit: u32,
    },
    /// Completions of these jobs that ended at or after `since_ms`, oldest first: how a
    /// semaphore catches up on events published while it was away.
    Completions {
        /// Job names.
        jobs: Vec<String>,
        /// Broker time, ms since the epoch.
        since_ms: i64,
        /// At most this many (the broker caps it at 10,000).
        limit: u32,
    },
    /// The barriers the semaphores last reported.
    Semaphores,
    /// The schedules the semaphores last reported.
    Schedules,
    /// The run once it has ended: answered `Run(Some(run))` after the commit that ends it
    /// (at once if it has ended; `Run(None)` if unknown). The broker holds the query
    /// meanwhile, at most `wait_ms` (and an hour); when it cannot hold more it answers at
    /// once with the run as it is, and the asker polls.
    RunEnd {
        /// The run.
        run_id: String,
        /// How long the asker waits.
        wait_ms: u64,
    },
    /// Resources written, held or waited for.
    Resources,
    /// The lineage graph: which jobs read and write which resources.
    ResourceGraph,
    /// The output a task attempt shipped while it ran ([`Message::TaskOutput`]), from byte
    /// `from` of that attempt's output on. Answered `TaskOutput(None)` when the broker
    /// holds none for it (never shipped, or dropped after the task ended).
    TaskOutput {
        /// The task.
        task_id: String,
        /// The attempt, from 1.
        attempt: u32,
        /// Byte offset in the attempt's output to read from.
        from: u64,
    },
    /// A job's tasks that ended at or after `since_ms`, counted per UTC day (qless's job
    /// stats), answered `JobStats`.
    JobStats {
        /// The job.
        job: String,
        /// Broker time, ms since the epoch.
        since_ms: i64,
    },
    /// The feed's events after `after` ([`FEED_RETAINED`] are kept), answered `Feed`.
    Feed {
        /// The last event the asker has (0: none).
        after: u64,
        /// At most this many (the broker caps it at [`MAX_FEED_PAGE`]).
        limit: u32,
    },
}

/// Filter for [`Query::Runs`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunFilter {
    /// Only runs of this job.
    pub job: Option<String>,
    /// Only runs in this state.
    pub state: Option<RunState>,
    /// At most this many (the broker caps it).
    pub limit: u32,
    /// Only runs with this tag (their job's or their trigger's).
    #[serde(default)]
    pub tag: Option<String>,
    /// Only tracked runs (`Some(true)`) or untracked ones (`Some(false)`).
    #[serde(default)]
    pub tracked: Option<bool>,
    /// Only runs with a task placed on this worker.
    #[serde(default)]
    pub worker: Option<String>,
    /// Only runs listed after this one (the next page: older runs).
    #[serde(default)]
    pub before: Option<String>,
    /// Only runs accepted at or after this time, ms since the epoch.
    #[serde(default)]
    pub since_ms: Option<i64>,
    /// Only runs accepted before this time, ms since the epoch.
    #[serde(default)]
    pub until_ms: Option<i64>,
}

/// The broker's answer to one message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    /// Id of the message this answers.
    pub in_reply_to: MessageId,
    /// The answer.
    pub body: ReplyBody,
}

/// Answers, one per kind of request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ReplyBody {
    /// Answer to `Hello`.
    Welcome {
        /// Random id of the broker process.
        broker_instance: String,
    },
    /// The message was received and journaled.
    Ack,
    /// The trigger was journaled as this run.
    Accepted {
        /// Id of the new run.
        run_id: String,
    },
    /// The request was refused; `status` is the HTTP status it maps to.
    Rejected {
        /// 400 bad parameters, 404 unknown job, 503 broker cannot store.
        status: u16,
        /// What was wrong, for a human.
        error: String,
    },
    /// Answer to `Query::Run`.
    Run(Option<RunView>),
    /// Answer to `Query::Runs`.
    Runs(Vec<RunView>),
    /// Answer to `Query::Jobs`.
    Jobs(Vec<JobView>),
    /// Answer to `Query::Workers`.
    Workers(Vec<WorkerView>),
    /// Answer to `Query::Health`.
    Health(HealthView),
    /// Answer to `Query::Dead`.
    Dead(Vec<DeadView>),
    /// Answer to `Query::Completions`.
    Completions(Vec<Completion>),
    /// Answer to `Query::Semaphores`.
    Semaphores(Vec<BarrierView>),
    /// Answer to `Query::Schedules`.
    Schedules(Vec<ScheduleView>),
    /// Answer to `Query::Resources` and `Message::ControlResource`.
    Resources(Vec<ResourceView>),
    /// Answer to `Query::ResourceGraph`.
    ResourceGraph(Vec<LineageEdge>),
    /// Answer to `Query::TaskOutput`.
    TaskOutput(Option<LiveOutputView>),
    /// Answer to `Query::Feed`.
    Feed(FeedPage),
    /// Answer to `Query::JobStats`: one entry per day with a task, oldest first.
    JobStats(Vec<JobDayStats>),
}

/// Upper bounds (ms, exclusive) of the histogram buckets of [`DurationStats`]; one more
/// bucket holds the rest.
pub const STATS_BUCKETS_MS: [i64; 7] = [10, 100, 1_000, 10_000, 60_000, 600_000, 3_600_000];

/// One day of a job's tasks that ended for good (succeeded or failed).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct JobDayStats {
    /// The day's start (UTC midnight), ms since the epoch.
    pub day_ms: i64,
    /// Tasks that ended that day.
    pub count: u64,
    /// Of those, the ones that failed.
    pub failed: u64,
    /// From the task's creation to its start (the wait for a worker, a slot, retries).
    pub wait: DurationStats,
    /// From its start to its end.
    pub run: DurationStats,
}

/// Count, mean, standard deviation and histogram of durations.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DurationStats {
    /// Durations counted (tasks that never started have none).
    pub count: u64,
    /// Their mean, ms.
    pub mean_ms: f64,
    /// Their standard deviation (population), ms.
    pub std_dev_ms: f64,
    /// How many fell in each bucket of [`STATS_BUCKETS_MS`] (and the last, beyond).
    pub histogram: Vec<u64>,
}

/// What an operator does to a resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ResourceAction {
    /// It exists from now on.
    Create,
    /// It is missing from now on.
    Clear,
}

/// One resource (`GET /resources`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResourceView {
    /// Its name.
    pub name: String,
    /// Written (or created) and not expired.
    pub exists: bool,
    /// When it was last written, ms since the epoch.
    pub written_at_ms: Option<i64>,
    /// When it stops counting as written.
    pub expires_at_ms: Option<i64>,
    /// The run that wrote it (none: an operator created it).
    pub written_by_run: Option<String>,
    /// The job that wrote it.
    pub written_by_job: Option<String>,
    /// Steps holding it now.
    pub holders: Vec<ResourceHolder>,
    /// Steps waiting for it, first come first.
    pub waiters: Vec<ResourceHolder>,
}

/// A step holding or waiting for a resource.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResourceHolder {
    /// The step.
    pub step_id: String,
    /// Its run.
    pub run_id: String,
    /// Its job.
    pub job: String,
    /// `read` or `write`.
    pub mode: String,
}

/// One edge of the lineage graph: `from` -> `to`, between a resource (digit runs
/// collapsed to `*`) and a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LineageEdge {
    /// A resource a job reads, or a job that writes a resource.
    pub from: String,
    /// The job that reads it, or the resource written.
    pub to: String,
    /// `reads` or `writes`.
    pub kind: String,
}

/// One barrier key as a semaphore reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BarrierView {
    /// Semaphore name.
    pub semaphore: String,
    /// Rendered key (e.g. the date).
    pub key: String,
    /// Parameters the `then` run gets.
    pub params: Params,
    /// One entry per awaited job.
    pub conditions: Vec<ConditionView>,
    /// `waiting`, `fired`, `failed` or `timed_out`.
    pub state: String,
    /// Runs counted so far.
    pub runs: Vec<String>,
    /// The run it started (fired, failed or timed out), if any.
    pub started_run: Option<String>,
    /// First completion counted, ms since the epoch.
    pub opened_at_ms: i64,
    /// Node id of the semaphore process that reported it.
    pub reporter: String,
}

/// One schedule as a semaphore process reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScheduleView {
    /// Schedule name.
    pub schedule: String,
    /// The job it starts.
    pub job: String,
    /// The cron expression as written, for a cron schedule.
    pub cron: Option<String>,
    /// The interval in ms, for an `every` schedule.
    pub every_ms: Option<i64>,
    /// Its offset in ms, for an `every` schedule.
    pub offset_ms: Option<i64>,
    /// IANA time zone of the cron expression (`UTC` for `every`).
    pub timezone: String,
    /// `none`, `one` or `all`.
    pub catch_up: String,
    /// The next slot, ms since the epoch (none if it never comes).
    pub next_fire_ms: Option<i64>,
    /// The latest slot it fired, ms since the epoch.
    pub last_slot_ms: Option<i64>,
    /// The run that slot started, once the broker accepted it.
    pub last_run: Option<String>,
    /// Slots fired and not yet accepted by the broker.
    pub pending: u32,
    /// Every slot up to this one (ms since the epoch) is settled by the reporter: fired
    /// and accepted by the broker, or skipped by its `catch_up`. A process back from a
    /// stop does not catch up on what another one settled.
    #[serde(default)]
    pub settled_ms: Option<i64>,
    /// Node id of the semaphore process that reported it.
    pub reporter: String,
}

/// Progress of one condition of a barrier.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConditionView {
    /// The awaited job.
    pub job: String,
    /// Completions counted.
    pub have: u32,
    /// Completions needed (for `count: all`, known once the first arrives).
    pub need: Option<u32>,
}

/// A task that failed for good, as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadView {
    /// The task.
    pub task_id: String,
    /// Its run.
    pub run_id: String,
    /// Its step.
    pub step_id: String,
    /// The job.
    pub job: String,
    /// Worker of the last attempt.
    pub worker: Option<String>,
    /// Parameters of the run.
    pub params: Params,
    /// Attempts made.
    pub attempts: u32,
    /// Why the last attempt failed.
    pub error: Option<String>,
    /// Exit code of the last attempt.
    pub exit_code: Option<i32>,
    /// When it failed for good, ms since the epoch.
    pub failed_at_ms: i64,
    /// The run that re-ran it, once retried.
    pub retried_as: Option<String>,
}

/// Published when a task ends, for semaphores and other watchers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Event {
    /// One task of a step ended for good.
    TaskFinished(Completion),
    /// What changed in runs and tasks in one journal commit, in order, on [`Topic::Feed`]
    /// (`GET /events`).
    ///
    /// [`Topic::Feed`]: crate::topic::Topic::Feed
    Feed(Vec<FeedEvent>),
}

/// Events the broker keeps for [`Query::Feed`]: a client that missed fewer than this many
/// catches up without a gap.
pub const FEED_RETAINED: usize = 10_000;

/// Most events one [`Query::Feed`] answer holds.
pub const MAX_FEED_PAGE: u32 = 1000;

/// One change of a run or of one of its tasks, after the commit that holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeedEvent {
    /// Its place in the broker's feed: consecutive within one broker process, and larger
    /// after a restart (a new process starts at its start time in ms × 1000).
    pub seq: u64,
    /// What happened.
    pub kind: FeedKind,
    /// When, ms since the epoch (broker clock).
    pub at_ms: i64,
    /// The run.
    pub run_id: String,
    /// The run's job.
    pub job: String,
    /// The run's state after the change.
    pub run_state: RunState,
    /// The run's tags.
    #[serde(default)]
    pub tags: Vec<String>,
    /// The run is tracked.
    #[serde(default)]
    pub tracked: bool,
    /// The task, for task events.
    #[serde(default)]
    pub task: Option<FeedTask>,
}

/// The task a [`FeedEvent`] is about.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeedTask {
    /// The step.
    pub step_id: String,
    /// The task.
    pub task_id: String,
    /// The step's job.
    pub job: String,
    /// The attempt.
    pub attempt: u32,
    /// The worker it is placed on.
    pub worker: Option<String>,
    /// Its state after the change.
    pub state: TaskState,
}

/// What a [`FeedEvent`] says happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FeedKind {
    /// A trigger became a run (pending, scheduled or waiting).
    RunAccepted,
    /// A scheduled or waiting run became due: its first step is next.
    RunDue,
    /// A run's first task started.
    RunStarted,
    /// A run ended: every step succeeded.
    RunSucceeded,
    /// A run ended with a failed step (or a dependency failed).
    RunFailed,
    /// An operator cancelled a run.
    RunCancelled,
    /// An operator changed a run's priority or tracking.
    RunUpdated,
    /// A task was placed on a worker.
    TaskScheduled,
    /// A task's command started.
    TaskStarted,
    /// A task succeeded.
    TaskSucceeded,
    /// A task failed for good (retries spent, or none).
    TaskFailed,
    /// A task failed and will run again (a new attempt).
    TaskRetried,
    /// A task's worker was lost; the attempt is over (retried or failed after).
    TaskLost,
    /// A task was stopped because its run was cancelled.
    TaskCancelled,
}

impl FeedKind {
    /// The name `GET /events` gives it (the SSE `event:` field): `run.accepted`, …
    pub fn as_str(self) -> &'static str {
        match self {
            FeedKind::RunAccepted => "run.accepted",
            FeedKind::RunDue => "run.due",
            FeedKind::RunStarted => "run.started",
            FeedKind::RunSucceeded => "run.succeeded",
            FeedKind::RunFailed => "run.failed",
            FeedKind::RunCancelled => "run.cancelled",
            FeedKind::RunUpdated => "run.updated",
            FeedKind::TaskScheduled => "task.scheduled",
            FeedKind::TaskStarted => "task.started",
            FeedKind::TaskSucceeded => "task.succeeded",
            FeedKind::TaskFailed => "task.failed",
            FeedKind::TaskRetried => "task.retried",
            FeedKind::TaskLost => "task.lost",
            FeedKind::TaskCancelled => "task.cancelled",
        }
    }

    /// The kind for a run that ended in `state`; `None` for a state that is not an end.
    pub fn run_ended(state: RunState) -> Option<FeedKind> {
        match state {
            RunState::Succeeded => Some(FeedKind::RunSucceeded),
            RunState::Failed => Some(FeedKind::RunFailed),
            RunState::Cancelled => Some(FeedKind::RunCancelled),
            _ => None,
        }
    }

    /// The kind for a task that ended for good in `state`.
    pub fn task_ended(state: TaskState) -> Option<FeedKind> {
        match state {
            TaskState::Succeeded => Some(FeedKind::TaskSucceeded),
            TaskState::Failed => Some(FeedKind::TaskFailed),
            TaskState::Cancelled => Some(FeedKind::TaskCancelled),
            TaskState::Pending | TaskState::Running => None,
        }
    }
}

/// The broker's answer to [`Query::Feed`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FeedPage {
    /// Events after the asked `after`, oldest first, at most the asked limit.
    pub events: Vec<FeedEvent>,
    /// False when the broker no longer holds (or never held) the event right after
    /// `after`: events were missed, and the asker must read the state afresh.
    pub complete: bool,
    /// The last event the broker has published (0: none yet).
    pub newest: u64,
}

/// A task that ended for good (succeeded, or failed after its retries).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Completion {
    /// Run id.
    pub run_id: String,
    /// Step id.
    pub step_id: String,
    /// Task id and attempt.
    pub task: TaskRef,
    /// The job.
    pub job: String,
    /// The worker that ran it (empty if none could).
    pub worker: String,
    /// Parameters of the run.
    pub params: Params,
    /// Final state of the task.
    pub state: TaskState,
    /// Ended at, ms since the epoch (broker clock).
    pub finished_at_ms: i64,
    /// How many tasks the broadcast that led here reached: the step's own task count, or
    /// for a `local` step that of the step it follows. `count: all` barriers wait for this many.
    pub fanout: u32,
}

/// State of a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    /// Accepted with a delay (`delay=`, `at=`): starts when it is due.
    Scheduled,
    /// Accepted, waiting for the runs it depends on (`depends=`) to succeed.
    Waiting,
    /// Accepted, nothing started yet.
    #[default]
    Pending,
    /// At least one step started, some still pending or running.
    Running,
    /// Every step succeeded.
    Succeeded,
    /// Ended with at least one failed step.
    Failed,
    /// Stopped by an operator (while its tasks are being killed, it is `cancelled` without
    /// `finished_at`).
    Cancelled,
}

/// State of one task (one step on one worker).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    /// Waiting for a worker, or published and not yet started.
    Pending,
    /// The command runs.
    Running,
    /// Exit code 0.
    Succeeded,
    /// Anything else: non-zero exit, timeout, lost worker, unknown job.
    Failed,
    /// Its run was cancelled: killed on its worker, or withdrawn before it started.
    Cancelled,
}

macro_rules! state_names {
    ($ty:ty { $($variant:ident => $name:literal),* $(,)? }) => {
        impl $ty {
            /// The lower-case name used in the API and the store.
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $name),* }
            }
        }
        impl std::str::FromStr for $ty {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($name => Ok(Self::$variant),)*
                    other => Err(format!("unknown state {other:?}")),
                }
            }
        }
        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

state_names!(RunState { Scheduled => "scheduled", Waiting => "waiting", Pending => "pending", Running => "running", Succeeded => "succeeded", Failed => "failed", Cancelled => "cancelled" });
state_names!(TaskState { Pending => "pending", Running => "running", Succeeded => "succeeded", Failed => "failed", Cancelled => "cancelled" });

impl RunState {
    /// True once the run can change no more.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }
}

impl RunState {
    /// Every state, in the order a run goes through them.
    pub const ALL: [RunState; 7] = [
        Self::Scheduled,
        Self::Waiting,
        Self::Pending,
        Self::Running,
        Self::Succeeded,
        Self::Failed,
        Self::Cancelled,
    ];

    /// True while the run has not started because it is due later or waits for others.
    pub fn is_held(self) -> bool {
        matches!(self, Self::Scheduled | Self::Waiting)
    }
}

impl TaskState {
    /// True once the task can change no more.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }
}

/// A run as the API shows it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunView {
    /// Run id.
    pub run_id: String,
    /// The job that was triggered.
    pub job: String,
    /// Its parameters.
    pub params: Params,
    /// Current state.
    pub state: RunState,
    /// Runs this one waited for (semaphore runs).
    pub parent_runs: Vec<String>,
    /// Accepted at, ms since the epoch.
    pub created_at_ms: i64,
    /// Ended at, ms since the epoch.
    pub finished_at_ms: Option<i64>,
    /// One entry per task, in the order they were created (empty in run lists).
    pub steps: Vec<StepView>,
    /// Earlier attempts of retried tasks, and late reports of superseded attempts.
    #[serde(default)]
    pub attempts: Vec<AttemptView>,
    /// Priority of its steps when they wait for a slot: higher first.
    #[serde(default)]
    pub priority: i32,
    /// Its labels: its job's `tags:` and its trigger's `tags=`.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Marked for attention (`POST /runs/{id}/track`).
    #[serde(default)]
    pub tracked: bool,
    /// Not started before this time (`delay=`, `at=`), ms since the epoch.
    #[serde(default)]
    pub not_before_ms: Option<i64>,
    /// The runs it depends on (`depends=`).
    #[serde(default)]
    pub depends_on: Vec<String>,
    /// Of those, the ones that have not succeeded yet (what a `waiting` run waits for).
    #[serde(default)]
    pub waiting_for: Vec<String>,
    /// Runs that name this one among their `parent_runs`: those a semaphore's `then`
    /// started once it was done, and its dead tasks' retries (at most 100, oldest first;
    /// empty in run lists).
    #[serde(default)]
    pub child_runs: Vec<String>,
    /// Told when it ends, however it ends, beyond its job's `notify:` (`track?notify=`).
    #[serde(default)]
    pub notify: Vec<crate::jobfile::NotifyTarget>,
    /// Why it ended so when no step says why: a dependency failed, it was cancelled.
    #[serde(default)]
    pub reason: Option<String>,
}

/// One finished attempt of a task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttemptView {
    /// The task.
    pub task_id: String,
    /// Attempt number.
    pub attempt: u32,
    /// Worker that ran it.
    pub worker: Option<String>,
    /// How it ended.
    pub state: TaskState,
    /// Exit code, if it exited.
    pub exit_code: Option<i32>,
    /// Why it failed.
    pub error: Option<String>,
    /// Started at, ms since the epoch.
    pub started_at_ms: Option<i64>,
    /// Ended at, ms since the epoch.
    pub finished_at_ms: i64,
    /// Reported after a newer attempt had taken over: recorded, not applied.
    pub late: bool,
    /// The end of its output (the last 4 KiB) as its worker reported it; empty if it never
    /// reported (lost) or was recorded before brokers kept it.
    #[serde(default)]
    pub output_tail: String,
}

/// One task of a run (one step on one worker) as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepView {
    /// The step; the tasks of one broadcast step share it.
    pub step_id: String,
    /// The task.
    pub task_id: String,
    /// The job.
    pub job: String,
    /// Worker that runs or ran it (none while waiting for one).
    pub worker: Option<String>,
    /// Task state.
    pub state: TaskState,
    /// Attempt number, from 1.
    pub attempt: u32,
    /// Exit code, once exited.
    pub exit_code: Option<i32>,
    /// Why it failed, beyond the exit code.
    pub error: Option<String>,
    /// Started at, ms since the epoch.
    pub started_at_ms: Option<i64>,
    /// Ended at, ms since the epoch.
    pub finished_at_ms: Option<i64>,
    /// Last lines of output.
    pub output_tail: String,
}

/// A job as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobView {
    /// The job definition, as its serving worker registered it.
    pub spec: JobSpec,
    /// Workers that serve it, live or not.
    pub workers: Vec<String>,
}

/// A worker as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerView {
    /// Worker name.
    pub name: String,
    /// Job names it serves.
    pub jobs: Vec<String>,
    /// Capabilities.
    pub capabilities: Vec<String>,
    /// Slots.
    pub slots: u32,
    /// Tasks running now.
    pub running: u32,
    /// Last heartbeat, ms since the epoch.
    pub last_seen_ms: i64,
    /// Heartbeat within the expiry, and not leaving.
    pub live: bool,
    /// Stopping: it drains what it runs and gets nothing new.
    #[serde(default)]
    pub leaving: bool,
    /// Worker binary version.
    pub version: String,
    /// Its counters as its last heartbeat gave them (see [`WorkerStatus::counters`]).
    #[serde(default)]
    pub counters: BTreeMap<String, u64>,
}

/// Broker health and counters.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HealthView {
    /// Broker binary version.
    pub version: String,
    /// Random id of the broker process.
    pub instance: String,
    /// Named counters (frames received, dropped, runs accepted, …).
    pub counters: BTreeMap<String, u64>,
    /// Runs not yet final.
    pub active_runs: u64,
    /// Workers with a heartbeat within the expiry.
    pub live_workers: u64,
    /// Unfinished runs by state (`scheduled`, `waiting`, `pending`, `running`, and
    /// `cancelled` while their tasks are being killed).
    #[serde(default)]
    pub runs_by_state: BTreeMap<String, u64>,
    /// Labelled counters, gauges and histograms for `/metrics` (empty from a broker
    /// older than them).
    #[serde(default)]
    pub metrics: BrokerMetrics,
}

/// What the broker measures for `/metrics` beyond its named counters. Per-job maps hold
/// at most [`MAX_METRIC_JOBS`] jobs; the others are folded into [`OTHER_JOBS`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BrokerMetrics {
    /// Runs ended since the broker started, by job, then by final state (`succeeded`,
    /// `failed`, `cancelled`).
    #[serde(default)]
    pub runs_ended: BTreeMap<String, BTreeMap<String, u64>>,
    /// Seconds from a task attempt's start to its end (the worker's clock), by job.
    #[serde(default)]
    pub task_duration: BTreeMap<String, HistogramView>,
    /// Seconds from a step's creation to its first task's start (the broker's clock), by job.
    #[serde(default)]
    pub queue_wait: BTreeMap<String, HistogramView>,
    /// Seconds each journal commit (one store transaction) took.
    #[serde(default)]
    pub journal_commit: HistogramView,
    /// Frames the broker sent (replies and publications).
    #[serde(default)]
    pub frames_sent: u64,
    /// Known workers by state: `live`, `leaving`, `lost`.
    #[serde(default)]
    pub workers: BTreeMap<String, u64>,
    /// Dead tasks (failed for good) the broker holds in memory.
    #[serde(default)]
    pub dead_tasks: u64,
}

/// Most distinct jobs a per-job metric names; the rest are counted under [`OTHER_JOBS`].
pub const MAX_METRIC_JOBS: usize = 200;

/// The job label under which jobs beyond [`MAX_METRIC_JOBS`] are counted.
pub const OTHER_JOBS: &str = "_other";

/// A histogram of observations: `counts[i]` observations were at most `bounds[i]` and more
/// than the bound before it (not cumulative); `counts` has one more entry than `bounds`,
/// for those above the last bound.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HistogramView {
    /// Upper bounds of the buckets, ascending.
    pub bounds: Vec<f64>,
    /// Observations per bucket, the last for those above every bound.
    pub counts: Vec<u64>,
    /// Sum of the observations.
    pub sum: f64,
}

impl HistogramView {
    /// Observations in all.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// `(upper bound, count)` per bucket (not cumulative), ending with `+Inf` and what is
    /// above every bound.
    pub fn buckets(&self) -> Vec<(f64, u64)> {
        let mut out: Vec<(f64, u64)> = self
            .bounds
            .iter()
            .zip(&self.counts)
            .map(|(bound, n)| (*bound, *n))
            .collect();
        let above: u64 = self.counts.iter().skip(self.bounds.len()).sum();
        out.push((f64::INFINITY, above));
        out
    }
}
