//! Prepared upgrades through the real binaries: `handoff upgrade --prepare`
//! starts and holds the next build while the incumbent serves untouched, and
//! the next upgrade — `handoff upgrade` or SIGHUP — hands over to exactly
//! that process. Also what happens around it: a held process that died is
//! replaced, a build that fails to start fails only the prepare, an upgrade
//! of another binary replaces the held one, and discard and stop leave no
//! process behind.

use crate::support;

use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use support::*;

const SETTLE: Duration = Duration::from_secs(20);

fn pid_of(v: &Value, what: &str) -> u32 {
    v.as_u64()
        .and_then(|p| u32::try_from(p).ok())
        .unwrap_or_else(|| panic!("{what} is not a pid: {v}"))
}

/// Runs `handoff upgrade --prepare EXTRA…`, asserts it succeeded, and
/// returns the held pid after checking `status` and the process tree agree.
fn prepare(sup: &Supervisor, incumbent: u32, extra: &[&str]) -> u32 {
    let mut args = vec!["--prepare"];
    args.extend_from_slice(extra);
    let out = sup.upgrade(&args);
    assert_eq!(out.code, Some(0), "prepare failed\n{out}");
    let ev = out.events_of("prepared");
    assert_eq!(ev.len(), 1, "expected one `prepared` event\n{out}");
    let held = pid_of(&ev[0]["pid"], "prepared pid");
    assert_ne!(held, incumbent);
    let s = status_json(&sup.runtime_dir);
    assert_eq!(pid_of(&s["prepared"]["pid"], "status prepared.pid"), held);
    assert_eq!(
        pid_of(&s["incumbent_pid"], "status incumbent_pid"),
        incumbent
    );
    let mut kids = sup.children();
    kids.sort();
    let mut want = vec![incumbent, held];
    want.sort();
    assert_eq!(kids, want, "children while a successor is held");
    // The incumbent was told nothing: it still serves.
    assert_eq!(sup.serving_pid().ok(), Some(incumbent));
    held
}

/// The headline: six prepared upgrades under saturating load, alternating
/// `handoff upgrade` and SIGHUP as the trigger; each hands over to the very
/// process that was prepared, and nothing is refused, reset or lost.
#[test]
fn prepared_upgrades_under_load_hand_over_to_the_held_process() {
    let _guard = begin_test("prepared_under_load", Duration::from_secs(180));
    let dirs = TestDirs::new();
    let sup = Supervisor::start(&dirs.runtime, &dirs.state, &demo_bin(), &[]);
    sup.wait_settled(sup.first_pid, SETTLE);
    let load = Load::start(sup.addr, 2, 2).expect("start the load");
    load.wait_progress(50, SETTLE, "before the first prepare");

    let mut incumbent = sup.first_pid;
    for i in 1..=6 {
        let held = prepare(&sup, incumbent, &[]);
        // The held process is not in the way of the load meanwhile.
        load.wait_progress(20, SETTLE, &format!("while {held} is held ({i})"));
        if i % 2 == 1 {
            let out = sup.upgrade(&[]);
            let c = out.expect_committed();
            assert_eq!(c.old_pid, incumbent, "{out}");
            assert_eq!(
                c.new_pid, held,
                "upgrade {i} did not use the prepared process\n{out}"
            );
            let committed = &out.events_of("committed")[0];
            assert!(
                committed["prepared_for_ms"].as_f64().is_some(),
                "no prepared_for_ms in {committed}"
            );
        } else {
            kill(Pid::from_raw(sup.pid as i32), Signal::SIGHUP).expect("SIGHUP");
            let mut last = Value::Null;
            let done = poll_until(SETTLE, || {
                last = status_json(&sup.runtime_dir);
                last["last_handoff"]["new_pid"] == held
            });
            assert!(done, "SIGHUP {i} did not hand over to {held}: {last:#}");
            assert_eq!(last["last_handoff"]["trigger"], "sighup");
        }
        sup.wait_settled(held, SETTLE);
        assert!(status_json(&sup.runtime_dir)["prepared"].is_null());
        load.wait_progress(20, SETTLE, &format!("after prepared upgrade {i}"));
        incumbent = held;
    }
    let report = load.stop();
    eprintln!("{report}");
    let lost = verify_acked(sup.addr, &report.acked);
    assert!(
        report.failure_count() == 0 && report.ok > 0 && lost.is_empty(),
        "{report}\nlost writes: {lost:?}"
    );
    assert!(
        !dirs.state.join(handoff::journal::JOURNAL_FILE).exists(),
        "journal left after the last upgrade"
    );
}

/// A held process that died is noticed at the upgrade: a fresh one is
/// spawned, the upgrade commits, and the report says what happened.
#[test]
fn a_held_process_that_died_is_replaced_at_the_upgrade() {
    let _guard = begin_test("prepared_died", Duration::from_secs(120));
    let dirs = TestDirs::new();
    let sup = Supervisor::start(&dirs.runtime, &dirs.state, &demo_bin(), &[]);
    sup.wait_settled(sup.first_pid, SETTLE);
    let held = prepare(&sup, sup.first_pid, &[]);
    kill(Pid::from_raw(held as i32), Signal::SIGKILL).expect("SIGKILL");
    let out = sup.upgrade(&[]);
    let c = out.expect_committed();
    assert_ne!(c.new_pid, held);
    let warnings = out.events_of("committed")[0]["warnings"].to_string();
    assert!(
        warnings.contains(&format!("prepared successor (pid {held}) had exited")),
        "no warning about the dead held process: {warnings}\n{out}"
    );
    sup.wait_settled(c.new_pid, SETTLE);
}

/// A build that cannot start fails the prepare (exit 1, reason given) and
/// nothing else: the incumbent serves on, no process is left, no journal.
#[test]
fn a_build_that_fails_to_start_fails_only_the_prepare() {
    let _guard = begin_test("prepared_fails", Duration::from_secs(120));
    let dirs = TestDirs::new();
    let sup = Supervisor::start(&dirs.runtime, &dirs.state, &demo_bin(), &[]);
    sup.wait_settled(sup.first_pid, SETTLE);
    let load = Load::start(sup.addr, 1, 1).expect("start the load");
    load.wait_progress(20, SETTLE, "before the prepare");
    let out = sup.upgrade(&["--prepare", "--binary", "/bin/false"]);
    assert_eq!(out.code, Some(1), "a failed prepare exits 1\n{out}");
    assert!(
        out.stderr
            .contains("prepare failed (the running process was not touched)"),
        "{out}"
    );
    assert!(out.events_of("aborted")[0]["reason"]
        .as_str()
        .is_some_and(|r| r.contains("exited")));
    sup.wait_settled(sup.first_pid, SETTLE);
    assert!(status_json(&sup.runtime_dir)["prepared"].is_null());
    assert!(!dirs.state.join(handoff::journal::JOURNAL_FILE).exists());
    load.wait_progress(20, SETTLE, "after the failed prepare");
    let report = load.stop();
    assert_eq!(report.failure_count(), 0, "{report}");
    // And a real upgrade still works.
    let c = sup.upgrade(&[]).expect_committed();
    sup.wait_settled(c.new_pid, SETTLE);
}

/// An upgrade naming another binary stops the held process and spawns what
/// it asked for; discard stops it too; a stop with one held leaves nothing.
#[test]
fn held_process_is_replaced_discarded_and_stopped_cleanly() {
    let _guard = begin_test("prepared_lifecycle", Duration::from_secs(120));
    let dirs = TestDirs::new();
    let sup = Supervisor::start(&dirs.runtime, &dirs.state, &demo_bin(), &[]);
    sup.wait_settled(sup.first_pid, SETTLE);
    let other = dirs.env_wrapper("other", &[]);
    let other = other.to_str().expect("UTF-8 path");

    // Another binary: the held one is stopped, with a warning.
    let held = prepare(&sup, sup.first_pid, &[]);
    let out = sup.upgrade(&["--binary", other]);
    let c = out.expect_committed();
    assert_ne!(c.new_pid, held);
    let warnings = out.events_of("committed")[0]["warnings"].to_string();
    assert!(
        warnings.contains("successor prepared for") && warnings.contains(other),
        "no warning about the replaced held process: {warnings}\n{out}"
    );
    sup.wait_settled(c.new_pid, SETTLE);

    // Prepared with --binary, then a plain upgrade: it uses that binary.
    let held = prepare(&sup, c.new_pid, &["--binary", other]);
    let out = sup.upgrade(&[]);
    assert_eq!(out.expect_committed().new_pid, held, "{out}");
    sup.wait_settled(held, SETTLE);

    // Discard: told to stop, gone, nothing held, journal cleared.
    let spare = prepare(&sup, held, &[]);
    let out = sup.upgrade(&["--discard-prepared"]);
    assert_eq!(out.code, Some(0), "{out}");
    assert_eq!(
        pid_of(&out.events_of("discarded")[0]["pid"], "discarded pid"),
        spare
    );
    sup.wait_settled(held, SETTLE);
    assert!(status_json(&sup.runtime_dir)["prepared"].is_null());
    assert!(!dirs.state.join(handoff::journal::JOURNAL_FILE).exists());
    let out = sup.upgrade(&["--discard-prepared"]);
    assert_eq!(out.code, Some(0), "{out}");
    assert!(out.events_of("discarded")[0]["pid"].is_null());

    // Stop with one held: both processes end, the supervisor exits 0.
    let spare = prepare(&sup, held, &[]);
    let out = run_handoff(&["stop"], &sup.runtime_dir, SETTLE);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let gone = poll_until(SETTLE, || sup.children().is_empty());
    assert!(gone, "left running after stop: {:?}", sup.children());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("prepared  pid {spare}")),
        "the stop report does not mention the held pid {spare}: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}
