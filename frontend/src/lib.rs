//! `jobz-frontend`: the HTTP gateway to a jobz mesh. It starts runs (`/job_start`), shows
//! runs, jobs and workers as JSON, serves a dashboard and Prometheus metrics, and talks to
//! the broker only through the shared crate's `Client`.
//!
//! # Layout
//! - [`route`]: the one parse of a request: method and target to a typed `Route` and the
//!   scope it needs; start reading here.
//! - [`api`]: the handlers, a `Route` in, an `Outcome` out.
//! - [`query`]: strict percent-decoding and query strings (repeated keys, limits).
//! - [`views`]: the broker's views as API JSON and the plain-text run log.
//! - [`broker`]: the `Broker` trait the handlers use (the real one is `jobz::client::Client`).
//! - [`waiter`]: `job_start?wait=`: requests held open on one thread until their run ends.
//! - [`follow`]: `runs/{id}/log?follow=1`: a run's log streamed as its tasks end.
//! - [`events`]: `/events`: the broker's feed of run and task changes as Server-Sent Events.
//! - [`metrics`]: the frontend's counters and the Prometheus exposition.
//! - [`server`]: the thin `tiny_http` shell and [`run`].
//! - [`security`]: protected mode and the per-request gate; [`auth`]: tokens and scopes.
//! - [`relay`]: the public listener in front of `tiny_http`: TLS ([`tls`]), request limits
//!   ([`limits`]), the connection policy ([`admission`]: caps and the reserve for
//!   authenticated clients) and the keep-alive idle timeout ([`responses`]).
//!
//! The dashboard (`src/dashboard.html`) is one self-contained page compiled into the binary.

pub mod admission;
pub mod api;
pub mod auth;
pub mod broker;
pub mod events;
pub mod follow;
pub mod limits;
pub mod metrics;
pub mod query;
pub mod relay;
pub mod responses;
pub mod route;
pub mod security;
pub mod server;
pub mod tls;
pub mod views;
pub mod waiter;

pub use security::Security;
pub use server::{run, Config, Frontend};
