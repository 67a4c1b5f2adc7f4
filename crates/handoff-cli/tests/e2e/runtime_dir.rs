//! A runtime dir deleted under a running supervisor (issue 14, item 8),
//! the way it was found: `rm -rf` of the runtime dir while the demo serves.
//! Upgrades used to fail ("cannot reach the supervisor"), SIGHUP too
//! ("control.sock: No such file"), and a supervisor started on the same
//! dirs exited after 20 s. Now the supervisor re-creates the dir and its
//! admin socket, the incumbent re-binds its control socket by itself, and
//! upgrades work again without touching the serving process; a second
//! supervisor is refused, as before the deletion.

use crate::support;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use support::*;

#[test]
fn a_deleted_runtime_dir_is_restored_and_upgrades_work_again() {
    deleted_runtime_dir("runtime_dir_deleted", &[]);
}

/// The same under `--mode notify`: the admin socket comes back (there is
/// no control socket), and the next upgrade's process gets its notify
/// socket in the re-created dir.
#[test]
fn notify_mode_a_deleted_runtime_dir_is_restored_and_upgrades_work_again() {
    deleted_runtime_dir("runtime_dir_deleted_notify", &["--mode", "notify"]);
}

/// Waits until `pid` is the supervisor's only child: the old process of
/// an upgrade has exited and been reaped.
fn settle(sup: &Supervisor, pid: u32) {
    wait_until(
        Duration::from_secs(20),
        &format!("pid {pid} is the only service process"),
        || sup.children() == [pid],
    );
}

fn deleted_runtime_dir(name: &str, extra: &[&str]) {
    let _guard = begin_light_test(name, Duration::from_secs(120));
    let notify = !extra.is_empty();
    let dirs = TestDirs::new();
    // Notify mode runs a plain socket-activated service (the demo needs
    // library mode for its state handoff).
    let program = if notify {
        handoff_bin().with_file_name("example-axum")
    } else {
        demo_bin()
    };
    let sup = Supervisor::start(&dirs.runtime, &dirs.state, &program, extra);
    let first = sup.upgrade(&[]).expect_committed();
    settle(&sup, first.new_pid);

    std::fs::remove_dir_all(&dirs.runtime).unwrap();
    let admin = dirs.runtime.join("admin.sock");
    let control = dirs.runtime.join("control.sock");
    wait_until(
        Duration::from_secs(20),
        "the supervisor re-creates the runtime dir and its admin socket, the incumbent its control socket",
        || admin.exists() && (notify || control.exists()),
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
    settle(&sup, c.new_pid);
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
    let mut args = vec!["run"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&[
        "--state-dir",
        dirs.state.to_str().unwrap(),
        "--listen",
        "http=tcp://127.0.0.1:0",
        "--",
        program.to_str().unwrap(),
    ]);
    let second = run_handoff(&args, &dirs.runtime, Duration::from_secs(30));
    assert!(!second.status.success(), "a second supervisor started");
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(
        err.contains("another handoff supervisor is running"),
        "{err}"
    );
}
