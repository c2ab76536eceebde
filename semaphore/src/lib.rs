//! `jobz-semaphore`: dependency barriers between jobs ("run X once N others are done") and
//! schedules ("run X at 02:30 Berlin time", "every 5 minutes").
//!
//! A semaphore process loads the `semaphores:` of its `jobs.d`, subscribes to the
//! completion events of every job they await, and counts completions per barrier: one
//! barrier per semaphore and rendered `key` (e.g. per date). When every condition of a
//! barrier holds it triggers the `then` jobs once, as new runs naming the runs it counted.
//!
//! # Guarantees
//! - **A completion counts once**, however often it is delivered: barriers count distinct
//!   (job, run, worker) triples, in memory and under a primary key on disk.
//! - **Nothing is acted on before it is durable**: a decision (counted, fired, failed,
//!   timed out) is committed to SQLite under `--state` before any trigger it implies is
//!   sent. A process killed at any point resumes from what it wrote.
//! - **A barrier fires once**: every trigger carries a message id derived from semaphore,
//!   key, kind and job; the broker ingests an id once (for a day), so resends, restarts and
//!   a second semaphore process on the same barriers all get the same run back.
//! - **Nothing is missed while away**: completions are also fetched from the broker
//!   (`Query::Completions`) at start, when new jobs are awaited and every 10 s (which also
//!   covers a broker restart), from where the last complete catch-up began, minus a minute.
//! - **Old news is ignored**: completions more than six days old are not counted, and
//!   closed barriers are forgotten after a week (the broker remembers trigger ids for a day).
//! - **A schedule's slot fires once**: its trigger id is derived from the schedule name and
//!   the slot, so two processes serving the same `schedules:` (for availability) and a
//!   restarted one name a slot alike; each process decides a slot once (durably, before
//!   sending) and never sends one older than 23 h, which the broker still remembers.
//!
//! # Layout
//! - [`barrier`]: the counting rules, pure and unit-tested; start reading here.
//! - [`schedule`]: which slots of which schedule to fire (catch-up included), pure too;
//!   when slots fall is `jobz::schedule`'s.
//! - [`service`]: the loop around both: broker link, catch-up, triggers, status reports.
//! - [`state`]: the SQLite store.
//! - [`config`]: settings and defaults.
//! - [`check`]: `--check`, validating a jobs dir without connecting.

pub mod barrier;
pub mod check;
pub mod config;
pub mod schedule;
pub mod service;
pub mod state;

pub use config::Config;
pub use service::run;
