//! Integration tests of the worker with real processes: the built `jobz-step` is the step
//! supervisor of every command, `jobz-worker` the worker itself in the kill tests, and a
//! fake broker on loopback stands in for `jobz-broker`.
//!
//! - `harness.rs`: helpers, the fake broker, a worker running in this process.
//! - `runner.rs`: one command: outcomes, output, environment, timeouts, process groups.
//! - `supervisor.rs`: the step supervisor: a worker or supervisor killed with SIGKILL
//!   leaves nothing running.
//! - `service.rs`: the spool at work: outbox until acknowledged, no second run of a seen
//!   attempt after a restart, queued tasks handed back at shutdown.

// Test code through and through, helpers included: a panic here is a test failure with a
// message, which is what `allow-unwrap-in-tests` means but cannot see outside `#[test]`s.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;
mod runner;
mod service;
mod supervisor;
