//! `jobz-worker`: runs the jobs of its `jobs.d` when the broker publishes work for them.
//!
//! A worker loads its job files, subscribes to the topic of each job it serves, and
//! heartbeats its registration (jobs, slots, capabilities, running tasks) to the broker.
//! When work names it, it runs the command in a process group of its own, appends the
//! output to a file under `<log-dir>/runs/`, logs each event to `<log-dir>/worker.log`, and
//! reports the result until the broker acknowledges it.
//!
//! # Guarantees and limits
//! - Each (task, attempt) runs at most once per worker process (an in-memory, bounded set;
//!   a restarted worker does not remember what it ran).
//! - A result is resent until the broker acknowledges it, for up to a day, so a broker
//!   restart loses nothing; a worker stopped while the broker is unreachable waits only 5 s.
//! - Ids that become paths are checked (`^[0-9A-Za-z-]{1,64}$`) before any path is built.
//! - When a command ends, times out or is cancelled, its whole process group is killed. If
//!   the worker itself dies, the shell dies with it (parent-death signal), but its children
//!   only if the service manager kills the worker's cgroup (systemd's default
//!   `KillMode=control-group`): run the worker under such a unit.
//!
//! # Layout
//! - [`service`]: the loop that ties everything together; start reading at [`run`].
//! - [`schedule`]: pure decisions: deduplication, id checks, slots, the FIFO queue.
//! - [`runner`]: one command: spawn, timeout, kill of the process group, output tail.
//! - [`eventlog`]: the `worker.log` line format and writer.
//! - [`config`]: settings and their defaults.
//! - [`check`]: `--check`, validating a jobs dir without connecting.

pub mod check;
pub mod config;
pub mod eventlog;
pub mod runner;
pub mod schedule;
pub mod service;

pub use config::Config;
pub use service::run;
