//! `jobz-worker`: runs the jobs of its `jobs.d` when the broker publishes work for them.
//!
//! A worker loads its job files, subscribes to the topic of each job it serves, and
//! heartbeats its registration (jobs, slots, capabilities, running tasks) to the broker.
//! When work names it, it runs the command in a process group of its own, appends the
//! output to a file under `<log-dir>/runs/`, logs each event to `<log-dir>/worker.log`, and
//! reports the result until the broker acknowledges it.
//!
//! # Guarantees and limits
//! What survives a crash of the worker (`kill -9`, power loss) lives in the spool
//! (`--spool`, [`spool`]); every record there is on disk (appended and fdatasynced, or
//! written whole and renamed) before the worker acts on it.
//! - **An attempt runs at most once on a worker, across restarts.** Each (task, attempt) is
//!   recorded as seen, durably, before its command starts; a re-published assignment that
//!   is seen is ignored. Remembered for 7 days and at most 100,000 attempts (oldest
//!   forgotten first), far longer than the broker offers a task nobody started. Refused
//!   tasks are remembered too, except those whose task id is not a valid id (refusing them
//!   again is harmless).
//! - **No result is lost.** A result is written to the spool's outbox before it is first
//!   sent and removed only when the broker acknowledges it; until then it is resent under
//!   the same message id, and after a restart again (same content, new message id; the
//!   broker keeps the first result of an attempt). A worker killed after its command
//!   finished reports the result when it starts again.
//! - **No attempt is silently lost.** An attempt whose command was running when the worker
//!   died is found at the next start and reported `failed` with the error
//!   `worker restarted while the task ran; attempt lost` (and `failed: worker restarted;
//!   attempt lost` in `worker.log`); it is not run again (the broker decides about a retry,
//!   which is a new attempt).
//! - **A dead worker leaves no command running.** Every command is started by the worker's
//!   step supervisor ([`supervisor`]), which kills every command's whole process group
//!   when the worker dies, by whatever signal (and the worker kills them if the supervisor
//!   dies): a step retried elsewhere never runs twice at the same time. A command that
//!   leaves its process group (`setsid`) escapes this, as it escapes timeouts.
//! - **Shutdown hands back what it did not start.** On SIGTERM the worker takes no new
//!   work; queued tasks are not recorded in the spool, so the broker offers them again (to
//!   this worker once it is back). Running commands get `--drain-timeout`, then are killed
//!   and reported failed (`worker shut down`). Results not acknowledged within 5 s stay in
//!   the outbox for the next start.
//! - A damaged spool entry is set aside (`*.corrupt`, or `seen.log.corrupt` for a line)
//!   with an error in the log, never a panic and never a silent drop. What it described is
//!   then unknown to the worker: a damaged seen line lets that attempt run again if it is
//!   offered again; a damaged running entry is not reported lost (the broker still fails
//!   the attempt when it sees the worker's new instance or its lease expires).
//! - Not kept across a crash: queued tasks not yet started (the broker still has them),
//!   `TaskStarted` notices not yet acknowledged (the result supersedes them), and a spool
//!   that cannot be written: then a task is refused (failed with the reason) rather than
//!   run without its record, and a result is sent without its outbox copy.
//! - Ids that become paths are checked (`^[0-9A-Za-z-]{1,64}$`) before any path is built.
//! - **What grows is pruned** ([`retention`]): step outputs not modified for
//!   `--output-retention` (7 days) go on a background thread, in batches, never the output
//!   of a running step; damaged entries set aside go after as long. The spool keeps what
//!   the guarantees above need: `seen.log` bounds itself (7 days, 100,000 attempts), and
//!   running and outbox entries stay until they are used.
//!
//! # Layout
//! - [`service`]: the loop that ties everything together; start reading at [`run`].
//! - [`schedule`]: pure decisions: deduplication, id checks, slots, the FIFO queue.
//! - [`spool`]: the durable part: seen attempts, running attempts, the outbox.
//! - [`runner`]: one command: spawn, timeout, kill of the process group, output tail.
//! - [`supervisor`]: the step supervisor that starts every command (`jobz-step`).
//! - [`retention`]: the background pruning of old step outputs.
//! - [`eventlog`]: the `worker.log` line format and writer.
//! - [`config`]: settings and their defaults.
//! - [`check`]: `--check`, validating a jobs dir without connecting.
//! - [`secrets`]: what a step can reach of the worker's secrets (the worker is not
//!   dumpable; a warning when the steps' default user can read the key).

pub mod check;
pub mod config;
pub mod eventlog;
pub mod live_output;
pub mod retention;
pub mod runner;
pub mod schedule;
pub mod secrets;
pub mod service;
pub mod spool;
pub mod supervisor;

pub use config::Config;
pub use service::run;
