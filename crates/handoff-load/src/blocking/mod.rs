//! The load for code that is not async — `handoff demo` and the end-to-end
//! tests: the generator behind a blocking handle ([`Load`]), the read-back
//! of every acknowledged write ([`verify_acked_with`]), and a small
//! blocking client ([`Client`], [`Conn`]) for one-off requests and probes.

mod client;
mod load;
mod verify;

pub use client::{get_version, serving_pid, Client, Conn, RequestError, Response, IO_TIMEOUT};
pub use load::{Load, LoadReport};
pub use verify::{verify_acked, verify_acked_with, VerifyReport};
