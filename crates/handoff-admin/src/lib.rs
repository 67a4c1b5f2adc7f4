//! The admin protocol of `handoff run`: how `handoff upgrade`, `handoff
//! status` and `handoff stop` (and `handoff demo`) talk to the supervisor
//! over `<runtime-dir>/admin.sock`.
//!
//! One request frame from the client, then a stream of event frames from
//! the supervisor ending with a final one. Frames are the `handoff`
//! library's (magic, length cap checked before allocating, crc32c) carrying
//! JSON, so a hostile client can cost the supervisor at most a 16-byte read
//! before being refused.
//!
//! - [`schema`]: what is said — [`schema::Request`], [`schema::Event`] and
//!   the status and stop reports they carry. Plain data: it depends on
//!   neither end, nor on what the supervisor does to produce it.
//! - [`wire`]: one message per frame, both directions.
//! - [`client`]: connecting, trusting only a socket served by our own uid
//!   or root.
//! - [`server`]: the supervisor's accept loop — peer check, a connection
//!   cap, a budget for the request — handing each request to its caller.
//!
//! Its own crate so that the dependency points one way: the supervisor
//! binary, its tests and anything else that speaks to a supervisor use this,
//! and this knows nothing of them (the service's counters travel as opaque
//! JSON, not as the demo's type).

#![warn(missing_docs)]

pub mod client;
pub mod schema;
pub mod server;
pub mod wire;
