//! End-to-end tests of the `handoff` binary: the real supervisor, the real
//! services (`handoff-demo`, the examples, a Python notify-mode program), real
//! sockets and signals, judged only by what a client and the kernel observe.
//!
//! One test binary on purpose: each file below used to be its own, and each
//! compiled and linked `support` and the dependency graph again (25 links per
//! `cargo test`, 25 crates for clippy). The tests that drive services run one at
//! a time ([`support::begin_test`] holds a process-wide lock), as they did within
//! each former binary — except that each of the few that mostly wait on timers
//! ([`support::begin_light_test`], a few percent of a core each) runs beside
//! one of them. Two stay binaries of their own: the crash matrix
//! (`tests/crash_matrix.rs`), which `scripts/crash-matrix-loop` runs alone, and
//! `tests/demo.rs`, which makes its process a child subreaper (a process-wide
//! setting that would re-parent every other test's orphans to it).
//!
//! Run one area with a filter: `cargo test -p handoff-cli --all-features --test e2e
//! -- notify_mode::`.

#[path = "../support/mod.rs"]
mod support;

mod http_load;
mod sd;

mod admin_peer;
mod ansible_fleet;
mod cli_basics;
mod cli_ops;
mod config_metrics;
mod death_in_handoff;
mod demo_http;
mod disk_full;
mod fd_exhaustion;
mod fd_soak;
mod large_store;
mod log_lines;
mod moved_connections;
mod notify_mode;
mod notify_recovery;
mod prepared;
mod private_state;
mod runtime_dir;
mod service_manager;
mod shared_state;
mod slow_clients;
mod stop_report;
mod supervisor_reexec;
mod systemd;
mod systemd_tools;
mod tokio_services;
mod upgrade;
