//! `jobz`: the command line for a jobz mesh. It talks HTTP to the frontend (the same API
//! as `curl` and the dashboard), with a token from `JOBZ_TOKEN`, `--token-file` or
//! `~/.config/jobz/token`.
//!
//! - [`args`]: the commands and flags (clap).
//! - [`client`]: HTTP to the frontend: URL, token, TLS roots, retries of a trigger.
//! - [`render`]: the human tables, from the frontend's JSON (pure).
//! - [`commands`]: each command, and the exit code it ends with ([`exit`]).

pub mod args;
pub mod client;
pub mod commands;
pub mod render;

/// Exit codes that scripts can rely on.
pub mod exit {
    /// Done; with `start --wait`, the run succeeded.
    pub const OK: i32 = 0;
    /// `start --wait`: the run failed or was cancelled.
    pub const RUN_FAILED: i32 = 1;
    /// Bad usage, or the frontend refused the request (`4xx`: unknown job or run, bad
    /// parameters, a token without the scope).
    pub const REFUSED: i32 = 2;
    /// The frontend (or the broker behind it) could not be reached or failed (`5xx`).
    pub const UNAVAILABLE: i32 = 3;
    /// `start --wait=SECONDS`: the run had not ended when the time ran out.
    pub const STILL_RUNNING: i32 = 4;
}
