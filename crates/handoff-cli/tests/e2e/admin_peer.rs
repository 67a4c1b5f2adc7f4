//! `handoff upgrade`, `status` and `stop` believe the admin socket only if
//! the kernel says its server runs as our uid or root (issue 14, item 3):
//! another user who could write the runtime dir put their own `admin.sock`
//! there, and `handoff upgrade` printed `committed: pid 1 -> 31337
//! (attacker-build)` and exited 0. Done the same way: `examples/fake_admin`
//! as uid `nobody` (when the tests run as root; skipped with a visible
//! reason otherwise) in a runtime dir the test lets it write.

use crate::support;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use support::*;

/// The user `nobody`, to act as another uid: only when the tests run as root
/// (the test is skipped with a visible reason otherwise).
fn another_user() -> Option<nix::unistd::User> {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED: acting as another uid needs root (run the tests as root to cover it)");
        return None;
    }
    let user = nix::unistd::User::from_name("nobody").ok().flatten();
    if user.is_none() {
        eprintln!("SKIPPED: no user `nobody` to act as another uid");
    }
    user
}

/// Kills the fake server however the test ends.
struct Fake(std::process::Child);

impl Drop for Fake {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn clients_refuse_an_admin_socket_served_by_another_uid() {
    let _guard = begin_test("admin_peer", Duration::from_secs(60));
    let Some(nobody) = another_user() else {
        return;
    };
    let dirs = TestDirs::new();
    // A runtime dir the other user can write: reachable, and theirs.
    std::fs::set_permissions(dirs.root.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::chown(&dirs.runtime, Some(nobody.uid.as_raw()), None).unwrap();
    let sock = dirs.runtime.join("admin.sock");
    let mut fake = Fake(
        Command::new(example_bin("fake_admin"))
            .arg(&sock)
            .uid(nobody.uid.as_raw())
            .gid(nobody.gid.as_raw())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    BufReader::new(fake.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready");
    for cmd in ["upgrade", "status", "stop"] {
        let out = run_handoff(&[cmd], &dirs.runtime, Duration::from_secs(20));
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(2),
            "handoff {cmd}\nstdout: {stdout}\nstderr: {stderr}"
        );
        assert!(
            stderr.contains(&format!("served by uid {}", nobody.uid)),
            "handoff {cmd}: {stderr}"
        );
        assert!(
            !stdout.contains("31337") && !stderr.contains("31337"),
            "handoff {cmd} believed the fake\nstdout: {stdout}\nstderr: {stderr}"
        );
    }
}

/// Another user trying the admin commands on a real supervisor's 0700
/// runtime dir is refused by the kernel (EACCES), and told why and as whom to
/// run instead — not "is `handoff run` running?", which it is.
#[test]
fn another_uid_is_told_whose_supervisor_it_is() {
    let _guard = begin_test("admin_other_uid", Duration::from_secs(60));
    let Some(nobody) = another_user() else {
        return;
    };
    let dirs = TestDirs::new();
    // The other user can reach the runtime dir's path, not enter the dir.
    std::fs::set_permissions(dirs.root.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let sup = Supervisor::start(&dirs.runtime, &dirs.state, &demo_bin(), &[]);
    for cmd in ["status", "upgrade", "stop"] {
        let out = Command::new(handoff_bin())
            .args([cmd, "--runtime-dir"])
            .arg(&dirs.runtime)
            .uid(nobody.uid.as_raw())
            .gid(nobody.gid.as_raw())
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "handoff {cmd}: {stderr}");
        assert!(
            stderr.contains("Permission denied")
                && stderr.contains(&format!("this runs as uid {}", nobody.uid))
                && stderr.contains("run the command as root"),
            "handoff {cmd}: {stderr}"
        );
        assert!(!stderr.contains("running?"), "handoff {cmd}: {stderr}");
    }
    // Nothing happened to the service.
    let st = status_json(&dirs.runtime);
    assert_eq!(st["incumbent_pid"], sup.first_pid, "{st}");
    assert_eq!(st["handoffs"]["committed"], 0, "{st}");
}
