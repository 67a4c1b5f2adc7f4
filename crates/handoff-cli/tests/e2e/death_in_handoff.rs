//! An incumbent that dies *during* a handoff is the handoff's business, not
//! a crash outside an upgrade (issue 13): the handoff carries on with the
//! successor and commits, and the crash monitor stays out of it — no
//! "died outside an upgrade" line, no restart, no service-manager status,
//! and no step of its restart back-off (the next real crash still waits the
//! initial 100 ms, not 200 ms).
//!
//! Library mode: the demo panics inside its `Drainable::drain`
//! (`HANDOFF_DEMO_FAULT=panic-in-drain`, exit status 101). Notify mode: the
//! old process is SIGKILLed while its successor is still starting (it sends
//! READY=1 only when the test says so).
#![cfg(target_os = "linux")]

use crate::support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use support::*;

const SETTLE: Duration = Duration::from_secs(20);
const DIED: &str = "died outside an upgrade";

fn kill9(pid: u32) {
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).expect("SIGKILL");
}

/// Asserts the supervisor neither logged a crash nor restarted anything.
fn assert_no_crash_restart(sup: &Supervisor, stdout: &[String]) {
    let log = sup.stderr_log();
    assert!(
        !log.contains(DIED),
        "the death during the handoff was taken for a crash:\n{log}"
    );
    assert!(
        !stdout.iter().any(|l| l.starts_with("restarted pid=")),
        "the supervisor restarted the service: {stdout:?}\n{log}"
    );
}

/// The next crash outside an upgrade is restarted after the *initial*
/// back-off: the death during the handoff did not count as a crash. Returns
/// the restarted pid.
fn next_crash_waits_the_initial_backoff(sup: &Supervisor, pid: u32) -> u32 {
    kill9(pid);
    let mut stdout = vec![];
    let mut restarted = None;
    wait_until(SETTLE, "the crashed incumbent restarted", || {
        stdout.extend(sup.take_stdout_lines());
        restarted = stdout
            .iter()
            .find_map(|l| l.strip_prefix("restarted pid="))
            .map(|p| p.trim().parse::<u32>().expect("restarted pid"));
        restarted.is_some()
    });
    let log = sup.stderr_log();
    let crashes: Vec<&str> = log.lines().filter(|l| l.contains(DIED)).collect();
    assert_eq!(crashes.len(), 1, "one crash, one line:\n{log}");
    assert!(
        crashes[0].contains(&format!("the incumbent (pid {pid}) {DIED}"))
            && crashes[0].ends_with("restarting in 100ms"),
        "the back-off stepped up before this crash: {:?}\n{log}",
        crashes[0]
    );
    restarted.expect("polled until some")
}

#[test]
fn incumbent_panicking_in_drain_is_no_crash_restart() {
    let _guard = begin_test("panic_in_drain", Duration::from_secs(120));
    let dirs = TestDirs::new();
    let panicky = dirs.fault_wrapper("panic-in-drain");
    let sup = Supervisor::start(&dirs.runtime, &dirs.state, &panicky, &[]);
    let old = sup.first_pid;
    sup.wait_settled(old, SETTLE);

    // A clean build as the successor: the one that panics is the incumbent.
    let demo = demo_bin();
    let out = sup.upgrade(&["--binary", demo.to_str().expect("UTF-8 path")]);
    let c = out.expect_committed();
    assert_eq!(c.old_pid, old, "{out}");
    assert_ne!(c.new_pid, old, "{out}");
    assert!(
        sup.stderr_log().contains("injected fault: panic-in-drain"),
        "the incumbent did not panic in its drain:\n{out}"
    );
    // One incumbent, the successor, serving; the old one reaped.
    sup.wait_settled(c.new_pid, SETTLE);
    assert_eq!(
        status_json(&dirs.runtime)["incumbent_pid"],
        c.new_pid,
        "{out}"
    );
    assert_no_crash_restart(&sup, &sup.take_stdout_lines());
    let restarted = next_crash_waits_the_initial_backoff(&sup, c.new_pid);
    sup.wait_settled(restarted, SETTLE);
}

/// The same death, but the handoff then aborts (the successor fails its
/// health check): nothing replaced the dead incumbent, so once the handoff
/// is over it is a crash like any other — restarted, once, saying when it
/// died.
#[test]
fn incumbent_dead_after_an_aborted_handoff_is_restarted() {
    let _guard = begin_test("panic_in_drain_then_abort", Duration::from_secs(120));
    let dirs = TestDirs::new();
    let panicky = dirs.fault_wrapper("panic-in-drain");
    let unhealthy = dirs.fault_wrapper("fail-health");
    let sup = Supervisor::start(&dirs.runtime, &dirs.state, &panicky, &[]);
    let old = sup.first_pid;
    sup.wait_settled(old, SETTLE);
    let out = sup.upgrade(&["--binary", unhealthy.to_str().expect("UTF-8 path")]);
    out.expect_aborted(&["health"]);
    let mut stdout = vec![];
    let mut restarted = None;
    wait_until(SETTLE, "the dead incumbent restarted", || {
        stdout.extend(sup.take_stdout_lines());
        restarted = stdout
            .iter()
            .find_map(|l| l.strip_prefix("restarted pid="))
            .map(|p| p.trim().parse::<u32>().expect("restarted pid"));
        restarted.is_some()
    });
    let restarted = restarted.expect("polled until some");
    sup.wait_settled(restarted, SETTLE);
    let log = sup.stderr_log();
    let crashes: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("restarting in"))
        .collect();
    assert_eq!(crashes.len(), 1, "{log}");
    assert!(
        crashes[0].contains(&format!(
            "the incumbent (pid {old}) died during a handoff that did not replace it (exit status 101)"
        )),
        "{log}"
    );
    assert_eq!(
        stdout
            .iter()
            .filter(|l| l.starts_with("restarted pid="))
            .count(),
        1,
        "{stdout:?}"
    );
}

fn notify_service() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/notify_service.py")
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

#[test]
fn notify_mode_old_process_dying_mid_upgrade_is_no_crash_restart() {
    let _guard = begin_test("notify_death_mid_upgrade", Duration::from_secs(120));
    let dirs = TestDirs::new();
    let behaviour = dirs.root.path().join("behaviour");
    let sup = Supervisor::start_with(
        &dirs.runtime,
        &dirs.state,
        &notify_service(),
        &["--mode", "notify"],
        &StartOpts {
            env: vec![(
                "NOTIFY_TEST_BEHAVIOUR_FILE".into(),
                behaviour.display().to_string(),
            )],
            ..StartOpts::default()
        },
    );
    let old = sup.first_pid;
    // The next process waits for `<behaviour>.go` before READY=1.
    write(&behaviour, "ready-on-go");
    let mut cmd = Command::new(handoff_bin());
    cmd.args(["upgrade", "--json", "--runtime-dir"])
        .arg(&dirs.runtime);
    let upgrade = spawn_piped(cmd);
    wait_until(SETTLE, "the new process waiting for its go", || {
        sup.stderr_log().contains("waiting for the go")
    });
    kill9(old);
    // Reaped: the crash monitor has seen the death by now.
    wait_until(SETTLE, "the old process reaped", || {
        proc_stat(old).is_none()
    });
    write(&PathBuf::from(format!("{}.go", behaviour.display())), "");
    let out = finish_within(upgrade, SETTLE, "handoff upgrade");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{}", sup.stderr_log());
    let new = status_json(&dirs.runtime)["incumbent_pid"]
        .as_u64()
        .and_then(|p| u32::try_from(p).ok())
        .expect("an incumbent pid");
    assert_ne!(new, old);
    wait_until(SETTLE, "only the new process left", || {
        sup.children() == [new]
            && Client::new(sup.addr, false)
                .get("/pid")
                .is_ok_and(|r| r.body_str().trim() == format!("pid={new} build=notify-service"))
    });
    assert_no_crash_restart(&sup, &sup.take_stdout_lines());
    write(&behaviour, "");
    next_crash_waits_the_initial_backoff(&sup, new);
}
