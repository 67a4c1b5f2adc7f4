//! Library half of `handoff-demo`: the demo's counters, without building
//! its server.
//!
//! - [`counters`]: the layout of the live counters the demo keeps in a
//!   shared region in its state dir (every process of the service adds to
//!   the same record, across upgrades), and how each update is published as
//!   JSON for `handoff status`, which reads that file and never this crate.
//!
//! Depends on `handoff`, `serde` and `serde_json` only; the HTTP server and
//! its tokio runtime belong to the binary (feature `server`, on by default).
#![deny(unsafe_code)]

pub mod counters;
