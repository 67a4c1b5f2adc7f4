//! # handoff-tokio
//!
//! Makes a tokio service — axum, hyper, tonic, any tower service —
//! upgradeable by `handoff` with no failed request and a few lines
//! of glue. Run it under `handoff run`, replace the binary, `handoff
//! upgrade`: the new build takes the listening sockets, the old one finishes
//! every request it accepted, and no client sees a refused, reset or
//! dropped connection.
//!
//! ```no_run
//! use axum::{routing::get, Router};
//!
//! #[tokio::main]
//! async fn main() -> Result<(), handoff_tokio::Error> {
//!     let app = Router::new().route("/", get(|| async { "hello\n" }));
//!     let handoff = handoff_tokio::Handoff::builder("hello 1.0").start()?;
//!     let listener = handoff.tcp_listener("http")?; // `--listen http=tcp://…`
//!     handoff.serve(listener, app).await
//! }
//! ```
//!
//! ```sh
//! handoff run --runtime-dir /tmp/hello --state-dir /tmp/hello \
//!     --listen http=tcp://127.0.0.1:8080 -- ./hello &
//! handoff upgrade --runtime-dir /tmp/hello     # after replacing ./hello
//! handoff stop --runtime-dir /tmp/hello        # finishes every request, then exits
//! ```
//!
//! What it does for you:
//!
//! * **Listeners by name**: [`Handoff::tcp_listener`] (or
//!   [`Handoff::unix_listener`], for a service behind a reverse proxy)
//!   returns the tokio listener the supervisor passed as `--listen NAME=…`.
//! * **A drain that keeps keep-alive clients whole** ([`Handoff::serve`]):
//!   requests in flight are answered; the next response on each HTTP/1.1
//!   connection says `Connection: close`; idle connections close only after
//!   a grace; a client stalled halfway through a request head — or its
//!   body — gets `408` after [`Builder::head_grace`], so no client can hold
//!   the drain (the service reads bodies as [`Incoming`], hyper's body
//!   watched for that; axum and tonic never name it); HTTP/2
//!   gets GOAWAY; closes never reset. hyper's own graceful
//!   shutdown closes idle keep-alive connections at once and fails the
//!   request each client was about to send.
//! * **Stateless by default**: a new build accepts from its start, beside
//!   the old one, so an upgrade never makes a connection wait. A service
//!   with state says [`Builder::stateful`] and gives `async` hooks
//!   ([`Builder::seal`], [`Builder::on_begin`], [`Builder::resume`]); it then
//!   accepts only once the handoff commits.
//! * **Aborts**: a health check ([`Builder::health`]) that fails aborts the
//!   upgrade; the old build accepts again, the new one finishes what it took
//!   and [`Handoff::serve`] returns the reason.
//! * **Bounded**: at most [`Builder::max_connections`] open at once (by
//!   default the descriptor limit less 64): past it, connections wait in
//!   the backlog instead of `accept` failing with EMFILE.
//! * **`handoff stop`** (through the control protocol, or SIGTERM from a
//!   service manager) finishes every request, then `serve`
//!   returns `Ok`: no signal handler to write.
//! * **Other servers**: [`Handoff::shutdown_signal`] plugs into tonic's
//!   `serve_with_incoming_shutdown` or any `with_graceful_shutdown`.
#![warn(missing_docs)]
#![deny(unsafe_code)]

mod control;
mod error;
mod handoff;
#[cfg(feature = "http")]
mod http;
mod phase;
mod say;

pub use crate::control::Begin;
pub use crate::error::{BoxError, Error};
pub use crate::handoff::{Builder, Handoff};
#[cfg(feature = "http")]
pub use crate::http::{Incoming, Listen};
pub use ::handoff::{CatchUpPolicy, CatchUpRound};
