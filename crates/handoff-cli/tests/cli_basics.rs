//! The supervisor binary's contract at its edges: sockets restricted to
//! their owner, clear errors and exit status 2 for usage and connection
//! problems.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use support::*;

fn mode(p: &std::path::Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn admin_and_control_sockets_are_owner_only() {
    let _guard = begin_test("owner_only", Duration::from_secs(60));
    let dirs = TestDirs::new();
    let sup = Supervisor::start(&dirs.runtime, &dirs.state, &demo_bin(), &[]);
    assert_eq!(mode(&dirs.runtime), 0o700, "runtime dir");
    assert_eq!(
        mode(&dirs.runtime.join("admin.sock")),
        0o600,
        "admin socket"
    );
    assert_eq!(
        mode(&dirs.runtime.join("control.sock")),
        0o600,
        "control socket"
    );
    // And after an upgrade (the successor re-binds the control socket).
    sup.upgrade(&[]).expect_committed();
    assert_eq!(
        mode(&dirs.runtime.join("control.sock")),
        0o600,
        "control socket after upgrade"
    );
}

#[test]
fn upgrade_without_a_supervisor_exits_2_and_says_what_to_do() {
    let dirs = TestDirs::new();
    let out = Command::new(handoff_bin())
        .args(["upgrade", "--runtime-dir"])
        .arg(&dirs.runtime)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot reach the supervisor") && err.contains("handoff run --runtime-dir"),
        "{err}"
    );
}

#[test]
fn usage_errors_exit_2() {
    for args in [
        &["upgrade"][..],
        &["upgrade", "--runtime-dir", "/tmp", "--deadline", "soon"],
        &["frobnicate"],
    ] {
        let out = Command::new(handoff_bin()).args(args).output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn run_refuses_a_bad_listen_spec_before_starting_anything() {
    let dirs = TestDirs::new();
    let out = Command::new(handoff_bin())
        .args(["run", "--runtime-dir"])
        .arg(&dirs.runtime)
        .arg("--state-dir")
        .arg(&dirs.state)
        .args(["--listen", "http=udp://127.0.0.1:0", "--"])
        .arg(demo_bin())
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("must start with tcp:// or unix:"), "{err}");
}
