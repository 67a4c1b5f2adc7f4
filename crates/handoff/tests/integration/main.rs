//! The library's integration tests: real processes (the crate's examples
//! `peer`, `shm_peer`, `line_echo`), real sockets, real signals.
//!
//! One test binary on purpose: each file below used to be its own, and each
//! linked the crate and its dependencies again. `tests/spawn_exec_failure.rs`
//! stays apart: it asserts that its process has no child at all.
//!
//! Run one area with a filter:
//! `cargo test -p handoff --all-features --test integration -- shm_`.

mod common;
mod shm_support;

mod control_emfile;
mod frame_props;
mod move_sync;
mod no_import_cycles;
mod notify_supervisor;
mod protocol_errors;
mod recovery;
mod restart_lock;
mod self_recovery;
mod shm_recovery;
mod shm_region;
mod shm_stress;
mod spawn_many_fds;
mod stop_request;
