//! The supervisor's own resources stay flat over many handoffs: its fd
//! count, its thread count and its children (every retired process
//! reaped). A leak of one fd per handoff would take a busy deployment's
//! supervisor to EMFILE within days; this catches it in seconds.
//!
//! `HANDOFF_SOAK_HANDOFFS` sets the number of handoffs (default 1000; the
//! CI suite runs the default).

use crate::support;

use std::time::{Duration, Instant};

use support::*;

fn threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// The settled fd count: an admin connection's socket may still be closing
/// right after `handoff upgrade` exits, so take the lowest of a short poll.
fn settled_fds(pid: u32) -> usize {
    let mut low = usize::MAX;
    poll_until(Duration::from_millis(300), || {
        low = low.min(count_open_fds(pid).unwrap_or(usize::MAX));
        false
    });
    low
}

#[test]
fn supervisor_fds_threads_and_children_stay_flat_over_a_thousand_handoffs() {
    let n: usize = std::env::var("HANDOFF_SOAK_HANDOFFS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let _guard = begin_test("fd_soak", Duration::from_secs(60 + n as u64 / 4));
    let dirs = TestDirs::new();
    let sup = Supervisor::start(&dirs.runtime, &dirs.state, &demo_bin(), &[]);

    // Warm up: the first handoffs create the journal writer, lazily opened
    // files and the like. The baseline is taken after them.
    for _ in 0..5 {
        sup.upgrade(&[]).expect_committed();
    }
    let base_fds = settled_fds(sup.pid);
    let base_threads = threads(sup.pid);
    let started = Instant::now();
    let mut last_pid = 0;
    for i in 0..n {
        let c = sup.upgrade(&[]).expect_committed();
        assert_ne!(c.new_pid, last_pid);
        last_pid = c.new_pid;
        if (i + 1) % 250 == 0 {
            eprintln!(
                "fd_soak: {} handoffs in {:.1?}, supervisor fds {:?} (baseline {base_fds})",
                i + 1,
                started.elapsed(),
                count_open_fds(sup.pid)
            );
        }
    }
    // Everything retired has been reaped: the only child left is the
    // incumbent (a retiring one may still be finishing: wait for it).
    wait_until(Duration::from_secs(20), "retired processes reaped", || {
        sup.children() == vec![last_pid]
    });
    // The last admin connection may still be closing: poll, bounded.
    let mut fds = 0;
    let flat = poll_until(Duration::from_secs(5), || {
        fds = count_open_fds(sup.pid).unwrap_or(usize::MAX);
        fds == base_fds
    });
    assert!(
        flat,
        "supervisor fd count changed over {n} handoffs: {base_fds} -> {fds}"
    );
    // Threads: per-child waiter threads end with their child.
    let mut t = 0;
    let flat = poll_until(Duration::from_secs(5), || {
        t = threads(sup.pid);
        t <= base_threads
    });
    assert!(
        flat,
        "supervisor threads grew over {n} handoffs: {base_threads} -> {t}"
    );
    assert!(get_version(sup.addr).is_ok(), "still serving");
}
