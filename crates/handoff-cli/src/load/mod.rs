//! HTTP load against the demo service, shared by `handoff demo` and the end-to-end tests.
//!
//! - [`client`]: the failure taxonomy ([`Failure`], [`classify`]; the async generator of
//!   `handoff-bench` uses it too) and a blocking HTTP/1.1 client ([`Conn`], [`Client`]) that
//!   classifies every failure and retries a request once, counted apart, when the server
//!   closed an idle keep-alive connection (RFC 9112 §9.3.1).
//! - [`generator`]: [`Load`], threads of unthrottled PUTs of unique values and GETs that
//!   check earlier acknowledged values byte for byte, and [`verify_acked`] to read every
//!   acknowledged write back at the end.

pub mod client;
pub mod generator;

pub use client::{
    classify, get_version, serving_pid, Client, Conn, Failure, RequestError, Response, IO_TIMEOUT,
};
pub use generator::{value_for, verify_acked, verify_acked_with, Load, LoadReport, VerifyReport};
