//! HTTP load against a service being upgraded, and what counts as a failed
//! request: the one load generator of the workspace, shared by `handoff
//! demo`, the end-to-end tests and the side-by-side benchmark.
//!
//! The product promise is "no refused, no reset, no lost request", so the
//! whole point is telling failures apart ([`failure`]): refused, reset,
//! EOF before or in the middle of a response, timeout — and the one benign
//! case, a server closing an idle keep-alive connection (RFC 9112 §9.3.1),
//! which every client retries once on a fresh connection and counts apart.
//!
//! - [`failure`]: the taxonomy ([`failure::Failure`], [`failure::classify`])
//!   and the coarser [`failure::Kind`]s the benchmark reports.
//! - [`conn`]: one async HTTP/1.1 connection that classifies every failure.
//! - [`generator`]: the generator — keep-alive, fresh-connection and idle
//!   clients on tokio, each request timed and judged; `GET /` for the
//!   benchmark ([`generator::run`]), or PUTs of unique values and GETs that
//!   check them byte for byte for the demo service.
//! - [`blocking`]: the same generator behind a blocking handle
//!   ([`blocking::Load`], on a runtime of its own, for `handoff demo` and
//!   the tests), the read-back of every acknowledged write, and a small
//!   blocking client for one-off requests and probes.
//!
//! Its own crate so that the dependency points one way: the `handoff`
//! binary (for `handoff demo`) and the benchmark depend on it, it on
//! neither.

#![warn(missing_docs)]

pub mod blocking;
pub mod conn;
pub mod failure;
pub mod generator;
