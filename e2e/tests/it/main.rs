//! One integration-test binary for the whole mesh (see `e2e/src/lib.rs` for the layout).
//! Each test starts its own [`harness::Mesh`] of real binaries on free loopback ports.

// Test code through and through, helpers included: a panic here is a test failure with a
// message, which is what `allow-unwrap-in-tests` means but cannot see outside `#[test]`s.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cli;
mod dashboard;
mod delivery;
mod enrolment;
mod events;
mod faults;
mod harness;
mod hostile;
mod http_security;
mod hygiene;
mod idempotency;
mod ipv6;
mod jobfiles;
mod live_output;
mod mesh_security;
mod metrics;
mod notify;
mod pipeline;
mod principals;
mod resources;
mod restart;
mod retention;
mod schedules;
mod scheduling;
mod semaphores;
mod waiting;
mod workers;
