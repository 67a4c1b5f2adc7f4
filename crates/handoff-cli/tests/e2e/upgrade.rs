//! End-to-end tests: the real `handoff run` supervising the real `handoff-demo`, upgraded
//! with the real `handoff upgrade`, under HTTP load.
//!
//! What they prove, from the outside only (HTTP and `/proc`):
//! - repeated upgrades under load refuse, reset, cut or lose nothing, and leave exactly one
//!   service process, no zombie and no leaked supervisor fd behind;
//! - every way an upgrade can fail before the successor is Ready (it exits, fails its health
//!   check, hangs past the deadline, cannot be executed, or the incumbent cannot seal) is an
//!   abort: exit code 1 with the reason, the old process serving again as if nothing happened,
//!   no leftover process, and — where the failure was the successor's — a later upgrade works.
//!
//! The binaries must be built: `cargo test --workspace` builds `handoff-demo` too (see
//! `support::demo_bin`). The tests serialize themselves (`support::begin_test`), so they may
//! run in one `cargo test` invocation with other tests.

use crate::support;

use std::path::PathBuf;
use std::time::Duration;

use support::{
    begin_test, count_open_fds, demo_bin, poll_until, verify_acked, Load, LoadExt, LoadReport,
    Supervisor, TestDirs,
};

/// Time for a retiring incumbent to finish its connections and exit, and for the supervisor
/// to reap it (idle keep-alive connections are closed by the server after a short idle time
/// during drain, so this is generous).
const SETTLE: Duration = Duration::from_secs(10);
/// Time for the load to show progress after a change of incumbent.
const PROGRESS: Duration = Duration::from_secs(10);

/// Asserts the load saw no failed request (and made progress) and that every acknowledged
/// write reads back intact. Both are checked before either is asserted, so a failure
/// message shows the whole picture (e.g. reset connections *and* the writes they lost).
fn assert_load_clean(sup: &Supervisor, report: &LoadReport) {
    let lost = verify_acked(sup.addr, &report.acked);
    assert!(
        report.failure_count() == 0 && report.ok > 0 && lost.is_empty(),
        "{report}\n{} of {} acknowledged writes are missing or wrong{}{}",
        lost.len(),
        report.acked.len(),
        if lost.is_empty() {
            ""
        } else {
            "; first ones:\n"
        },
        lost.iter().take(20).cloned().collect::<Vec<_>>().join("\n")
    );
}

/// One line per upgrade for the CI log: total and per-phase times.
fn describe_upgrade(i: usize, c: &support::Committed, out: &support::UpgradeOutcome) -> String {
    let phases: Vec<String> = out
        .phases()
        .iter()
        .map(|(name, ms)| format!("{name} {ms:.1}"))
        .collect();
    format!(
        "upgrade {i:2}: {} -> {} total {:.1} ms ({})",
        c.old_pid,
        c.new_pid,
        c.total_ms,
        phases.join(", ")
    )
}

/// The headline property: 20 sequential upgrades under saturating load (2 keep-alive and
/// 2 connection-per-request clients), with zero failed requests and zero lost writes.
#[test]
fn twenty_upgrades_under_load_lose_nothing() {
    let _guard = begin_test(
        "twenty_upgrades_under_load_lose_nothing",
        Duration::from_secs(180),
    );
    let dirs = TestDirs::new();
    let demo = demo_bin();
    let demo_arg = demo.to_str().expect("UTF-8 path");
    let sup = Supervisor::start(&dirs.runtime, &dirs.state, &demo, &[]);
    sup.wait_settled(sup.first_pid, SETTLE);

    let load = Load::start(sup.addr, 2, 2).expect("start the load");
    load.wait_progress(50, PROGRESS, "before the first upgrade");

    let mut incumbent = sup.first_pid;
    let mut fd_baseline = None;
    let mut handoff_ids = Vec::new();
    let mut totals_ms = Vec::new();
    for i in 1..=20 {
        // Alternate between the default binary (the program `handoff run` was given) and an
        // explicit `--binary`, so both paths are exercised.
        let args: &[&str] = if i % 2 == 0 {
            &["--binary", demo_arg]
        } else {
            &[]
        };
        let out = sup.upgrade(args);
        let c = out.expect_committed();
        assert_eq!(
            c.old_pid, incumbent,
            "upgrade {i}: old_pid is not the incumbent\n{out}"
        );
        assert_ne!(
            c.new_pid, incumbent,
            "upgrade {i}: new_pid is the old pid\n{out}"
        );
        assert!(
            !out.phases().is_empty(),
            "upgrade {i}: no phase events\n{out}"
        );
        eprintln!("{}", describe_upgrade(i, &c, &out));

        // Exactly one child of the supervisor, the new incumbent, serving: the retiring
        // process has finished its connections, exited and been reaped (no zombie).
        sup.wait_settled(c.new_pid, SETTLE);
        // And the load is actually being served by it, not just a probe.
        load.wait_progress(20, PROGRESS, &format!("after upgrade {i}"));

        if i == 1 {
            // Measured once the supervisor has done one full handoff, so lazily created fds
            // (admin socket connections, event loop internals) are part of the baseline.
            fd_baseline = count_open_fds(sup.pid);
        }
        handoff_ids.push(c.handoff_id);
        totals_ms.push(c.total_ms);
        incumbent = c.new_pid;
    }

    // No fd leaked by the supervisor over 19 more handoffs (allowing for the last admin
    // connection to be closed asynchronously).
    let baseline = fd_baseline.expect("supervisor fd count");
    let mut now = None;
    let fds_ok = poll_until(SETTLE, || {
        now = count_open_fds(sup.pid);
        now.is_some_and(|n| n <= baseline)
    });
    assert!(
        fds_ok,
        "supervisor fd count grew from {baseline} after the 1st upgrade to {now:?} after the \
         20th: {:?}",
        std::fs::read_dir(format!("/proc/{}/fd", sup.pid)).map(|d| d
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .collect::<Vec<_>>())
    );

    let mut unique = handoff_ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(
        unique.len(),
        handoff_ids.len(),
        "handoff ids repeat: {handoff_ids:?}"
    );

    let report = load.stop();
    let mut sorted = totals_ms.clone();
    sorted.sort_by(f64::total_cmp);
    eprintln!("{report}");
    eprintln!(
        "upgrade total_ms over {} upgrades: min {:.1}, median {:.1}, max {:.1}",
        sorted.len(),
        sorted[0],
        sorted[sorted.len() / 2],
        sorted[sorted.len() - 1]
    );
    assert_load_clean(&sup, &report);
    // Still exactly one service process at the end.
    sup.wait_settled(incumbent, SETTLE);
}

/// What a failed-upgrade scenario needs to say; the rest is common (see [`run_abort_case`]).
struct AbortCase<'a> {
    name: &'a str,
    /// Given the test's scratch dirs (to write wrapper scripts into), returns the PROGRAM
    /// for `handoff run` (the real demo, or a wrapper for incumbent-side faults) and the
    /// arguments of the failing `handoff upgrade`. Scripts it writes go through
    /// `support::write_executable`, as every executable a test writes (ETXTBSY).
    setup: &'a dyn Fn(&TestDirs) -> (PathBuf, Vec<String>),
    /// The abort reason must mention at least one of these (case-insensitive).
    reason_any_of: &'a [&'a str],
    /// The failing upgrade must finish within this long (proves deadlines are honoured).
    max_duration: Duration,
    /// Whether a later upgrade to the real demo must commit. False when the fault is in the
    /// incumbent itself (it will fail to seal every time): then the failing upgrade is
    /// repeated instead, to prove the abort left everything as it was.
    then_upgrade_succeeds: bool,
}

/// Runs one failed-upgrade scenario under light load (1 keep-alive + 1 fresh client):
/// exit code 1 with an `aborted` event naming the cause, the original process still (or
/// again) serving, no extra child left, zero failed requests, and then either a successful
/// upgrade or an identical second abort.
fn run_abort_case(case: AbortCase<'_>) {
    let _guard = begin_test(case.name, Duration::from_secs(120));
    let dirs = TestDirs::new();
    let (program, upgrade_args) = (case.setup)(&dirs);
    let sup = Supervisor::start(&dirs.runtime, &dirs.state, &program, &[]);
    let old = sup.first_pid;
    sup.wait_settled(old, SETTLE);

    let load = Load::start(sup.addr, 1, 1).expect("start the load");
    load.wait_progress(20, PROGRESS, "before the failing upgrade");

    let args: Vec<&str> = upgrade_args.iter().map(String::as_str).collect();
    let attempts = if case.then_upgrade_succeeds { 1 } else { 2 };
    for attempt in 1..=attempts {
        let out = sup.upgrade(&args);
        let aborted = out.expect_aborted(case.reason_any_of);
        eprintln!(
            "{} attempt {attempt}: aborted in phase {:?} after {:?}: {}",
            case.name, aborted.phase, out.elapsed, aborted.reason
        );
        assert!(
            out.elapsed <= case.max_duration,
            "the failing upgrade took {:?}, more than {:?}\n{out}",
            out.elapsed,
            case.max_duration
        );
        // The old process serves again right away (a GET that has to wait in the backlog
        // for it to resume is fine; an error is not).
        assert_eq!(
            sup.serving_pid(),
            Ok(old),
            "after the abort, GET /version is not served by the original incumbent\n{out}"
        );
        // The failed successor was killed and reaped: the incumbent is the only child.
        sup.wait_settled(old, SETTLE);
        load.wait_progress(20, PROGRESS, &format!("after aborted attempt {attempt}"));
    }

    if case.then_upgrade_succeeds {
        let demo = demo_bin();
        let out = sup.upgrade(&["--binary", demo.to_str().expect("UTF-8 path")]);
        let c = out.expect_committed();
        assert_eq!(
            c.old_pid, old,
            "the recovery upgrade replaced the wrong process\n{out}"
        );
        sup.wait_settled(c.new_pid, SETTLE);
        load.wait_progress(20, PROGRESS, "after the recovery upgrade");
    }

    let report = load.stop();
    eprintln!("{report}");
    assert_load_clean(&sup, &report);
}

/// Setup for a fault in the successor: serve the real demo, upgrade to `--binary <path>`.
fn successor_binary(path: impl Into<PathBuf>, extra: &[&str]) -> (PathBuf, Vec<String>) {
    let mut args = vec!["--binary".to_owned(), path.into().display().to_string()];
    args.extend(extra.iter().map(|s| s.to_string()));
    (demo_bin(), args)
}

/// Reasons a successor's death before Ready may be reported with.
const DIED: &[&str] = &[
    "exit",
    "died",
    "dead",
    "eof",
    "closed",
    "terminat",
    "signal",
    "crash",
    "before ready",
];

#[test]
fn abort_when_successor_exits_before_ready() {
    run_abort_case(AbortCase {
        name: "abort_when_successor_exits_before_ready",
        setup: &|dirs| successor_binary(dirs.fault_wrapper("exit-before-ready"), &[]),
        reason_any_of: DIED,
        max_duration: Duration::from_secs(20),
        then_upgrade_succeeds: true,
    });
}

#[test]
fn abort_when_successor_fails_health_check() {
    run_abort_case(AbortCase {
        name: "abort_when_successor_fails_health_check",
        setup: &|dirs| successor_binary(dirs.fault_wrapper("fail-health"), &[]),
        reason_any_of: &["health"],
        max_duration: Duration::from_secs(20),
        then_upgrade_succeeds: true,
    });
}

#[test]
fn abort_when_successor_hangs_past_deadline() {
    run_abort_case(AbortCase {
        name: "abort_when_successor_hangs_past_deadline",
        setup: &|dirs| {
            successor_binary(
                dirs.fault_wrapper("hang-before-ready"),
                &["--deadline", "2s"],
            )
        },
        reason_any_of: &["deadline", "timed out", "timeout", "time out"],
        // 2 s deadline + 1 s wire slack + abort/kill/resume, with room for a slow machine,
        // but far short of the 5-minute default: the deadline was honoured.
        max_duration: Duration::from_secs(12),
        then_upgrade_succeeds: true,
    });
}

/// The fault is in the incumbent: it refuses to seal. The upgrade must abort and the
/// incumbent resume; since it will refuse every time, the check after the abort is that a
/// second attempt aborts the same way, cleanly.
#[test]
fn abort_when_incumbent_fails_to_seal() {
    run_abort_case(AbortCase {
        name: "abort_when_incumbent_fails_to_seal",
        setup: &|dirs| {
            let demo = demo_bin().display().to_string();
            (
                dirs.fault_wrapper("fail-seal"),
                vec!["--binary".to_owned(), demo],
            )
        },
        reason_any_of: &["seal"],
        max_duration: Duration::from_secs(20),
        then_upgrade_succeeds: false,
    });
}

/// Reasons a successor that cannot be executed may be reported with.
const CANNOT_EXEC: &[&str] = &[
    "spawn",
    "exec",
    "no such file",
    "not found",
    "nonexistent",
    "permission",
    "denied",
    "executable",
    "os error",
];

#[test]
fn abort_when_successor_binary_is_missing() {
    run_abort_case(AbortCase {
        name: "abort_when_successor_binary_is_missing",
        setup: &|_| successor_binary("/nonexistent/x", &[]),
        reason_any_of: CANNOT_EXEC,
        max_duration: Duration::from_secs(20),
        then_upgrade_succeeds: true,
    });
}

#[test]
fn abort_when_successor_binary_is_not_executable() {
    run_abort_case(AbortCase {
        name: "abort_when_successor_binary_is_not_executable",
        setup: &|dirs| successor_binary(dirs.non_executable(), &[]),
        reason_any_of: CANNOT_EXEC,
        max_duration: Duration::from_secs(20),
        then_upgrade_succeeds: true,
    });
}
