//! Library half of `handoff-demo`: what other crates need to know about the
//! demo without building its server.
//!
//! - [`counters`]: the layout of the live counters the demo keeps in a
//!   shared region in its state dir, so the supervisor's `handoff status`
//!   can read them without asking the service.
//!
//! Depends on `handoff` and `serde` only; the HTTP server and its tokio
//! runtime belong to the binary (feature `server`, on by default).
#![deny(unsafe_code)]

pub mod counters;
