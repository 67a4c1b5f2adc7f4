//! A runtime dir deleted under a running supervisor (issue 14, item 8),
//! the way it was found: `rm -rf` of the runtime dir while the demo serves.
//! Upgrades used to fail ("cannot reach the supervisor"), SIGHUP too
//! ("control.sock: No such file"), and a supervisor started on the same
//! dirs exited after 20 s. Now the supervisor re-creates the dir and its
//! admin socket, the incumbent re-binds its control socket by itself, and
//! upgrades work again without touching the serving process; a second
//! supervisor is refused, as before the deletion.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use support::*;

#[test]
fn a_deleted_runtime_dir_is_restored_and_upgrades_work_again() {
    let _guard = begin_test("runtime_dir_deleted", Duration::from_secs(120));
    let dirs = TestDirs::new();
    let sup = Supervisor::start(&dirs.runtime, &dirs.state, &demo_bin(), &[]);
    let first = sup.upgrade(&[]).expect_committed();
    sup.wait_settled(first.new_pid, Duration::from_secs(20));

    std::fs::remove_dir_all(&dirs.runtime).unwrap();
    let admin = dirs.runtime.join("admin.sock");
    let control = dirs.runtime.join("control.sock");
    wait_until(
        Duration::from_secs(20),
        "the supervisor re-creates the runtime dir and its admin socket, the incumbent its control socket",
        || admin.exists() && control.exists(),
    );
    let mode = std::fs::metadata(&dirs.runtime)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o700, "re-created {mode:o}");
    // Served without touching the service: the same incumbent upgrades.
    let c = sup.upgrade(&[]).expect_committed();
    assert_eq!(c.old_pid, first.new_pid, "the incumbent was not restarted");
    sup.wait_settled(c.new_pid, Duration::from_secs(20));
    let status = run_handoff(
        &["status", "--json"],
        &dirs.runtime,
        Duration::from_secs(20),
    );
    assert!(status.status.success(), "{status:?}");
    assert!(
        sup.stderr_log().contains("re-created it (mode 0700)"),
        "{}",
        sup.stderr_log()
    );

    // One supervisor per runtime dir still: the lock was taken again.
    let second = run_handoff(
        &[
            "run",
            "--state-dir",
            dirs.state.to_str().unwrap(),
            "--listen",
            "http=tcp://127.0.0.1:0",
            "--",
            demo_bin().to_str().unwrap(),
        ],
        &dirs.runtime,
        Duration::from_secs(30),
    );
    assert!(!second.status.success(), "a second supervisor started");
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(
        err.contains("another handoff supervisor is running"),
        "{err}"
    );
}
