//! Library half of the `handoff` binary's crate: code shared by the binary and its
//! end-to-end tests.
//!
//! - [`load`]: the HTTP client and load generator behind `handoff demo`, also used by the
//!   tests to prove that upgrades refuse, reset, cut and lose nothing.

pub mod load;
