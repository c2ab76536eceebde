//! `jobz-broker`: receives triggers and step results, keeps the durable state of every run,
//! and publishes work to the workers that serve each job.
//!
//! # Layout
//! - [`engine`]: every decision, as a pure state machine (event + time → effects). Start here.
//! - [`ids`]: where the ids of new runs, steps and tasks come from.
//! - [`model`]: runs, steps and tasks as the broker records them.
//! - [`registry`]: live workers and the job catalog they register.
//! - [`store`]: the narrow durable-state interface and its SQLite implementation.
//! - [`journal`]: the thread that group-commits effects before they are published.
//! - [`guard`]: sealed frames in and out: authentication, enrolment, mesh keys.
//! - [`authority`]: which role may send which message, names bound to their sender.
//! - [`semaphore_reports`]: the semaphores' barrier reports, bounded per principal.
//! - [`meters`]: what `/metrics` shows beyond the named counters (histograms, runs by job).
//! - [`keys`]: the key directory (`jobz-broker keys …`).
//! - [`ring_file`]: the mesh keys kept across restarts (`DIR/mesh-keys`).
//! - [`server`]: the sockets and threads around the engine; [`server::run`] is the entry.

pub mod authority;
pub mod engine;
pub mod feed_log;
pub mod guard;
pub mod ids;
pub mod journal;
pub mod keys;
pub mod meters;
pub mod model;
pub mod notify;
pub mod registry;
pub mod ring_file;
pub mod semaphore_reports;
pub mod server;
pub mod store;

pub use server::{run, Config};
