//! End-to-end tests of the jobz mesh. This library is empty on purpose (Cargo needs one
//! target besides tests); everything lives in the integration-test binary `tests/it`:
//!
//! - `tests/it/main.rs`: the module list.
//! - `tests/it/harness.rs`: builds the binaries once, starts a `Mesh` of real processes
//!   (broker, frontend, workers) on free loopback ports in a temporary directory, talks
//!   HTTP to the frontend, and kills every child by PID on drop. Start reading here.
//! - `tests/it/pipeline.rs`: triggering, successors, delivery modes, exact topics.
//! - `tests/it/hostile.rs`: hostile parameters, HTTP requests and ZeroMQ frames.
//! - `tests/it/faults.rs`: a broker killed mid-run, step time-outs.
//! - `tests/it/jobfiles.rs`: the shipped job files and compatibility fixtures still parse.
//! - `tests/it/delivery.rs`: the fault-injection suite (kill -9, a frozen worker, leases,
//!   retries, the dead list), with a ledger every command writes.
//! - `tests/it/semaphores.rs`: barriers: counts, keys, restarts, two processes, timeouts.
//!
//! Run with `cargo test -p e2e`; set `JOBZ_E2E_KEEP=1` to keep a failed test's directory.
