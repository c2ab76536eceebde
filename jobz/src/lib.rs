//! What every jobz binary shares: the wire protocol, the job-file model, template
//! rendering and the socket set-up.
//!
//! # Layout
//! - [`message`]: every message of the protocol, one variant each; start reading here.
//! - [`envelope`]: the frame format (magic, protocol version, MessagePack) and its limits.
//! - [`topic`]: exact PUB/SUB topics (no prefix matches).
//! - [`jobfile`]: `jobs.d` files: parsing both formats, validation, the reloading loader.
//! - [`schedule`]: when schedules fire: cron in a time zone (Vixie rules), intervals.
//! - [`template`]: `{param}` rendering, shell-quoted for commands.
//! - [`socket`]: broker addresses and the socket options every process uses.
//! - [`keys`]: node key pairs and public-key files, enrolment names.
//! - [`seal`]: sealed frames (authenticated encryption, replay refusal, mesh keys).
//! - [`client`]: the link a worker, semaphore or frontend keeps to the broker.
//! - [`logging`]: the `--log-file`/`--log-format` flags.
//! - [`signals`]: SIGTERM/SIGINT as a shutdown channel.
#![deny(missing_docs)]

pub mod client;
pub mod envelope;
pub mod jobfile;
pub mod keys;
pub mod logging;
pub mod message;
pub mod schedule;
pub mod seal;
pub mod signals;
pub mod socket;
pub mod template;
pub mod topic;

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A new unique, time-ordered id (UUIDv7, hyphenated).
pub fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// Formats epoch milliseconds as RFC 3339 UTC, e.g. `2026-11-23T10:00:00.123Z`.
pub fn format_time_ms(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}
