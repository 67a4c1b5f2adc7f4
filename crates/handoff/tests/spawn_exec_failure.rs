//! An exec failure in the spawned child comes back as the child's errno,
//! through the public spawn API, and leaves no child behind: not running,
//! not a zombie. With the vfork-style start the parent resumes the moment
//! the child calls `_exit`, before it is a zombie; `spawn` must still reap
//! it. The check is the kernel's: `waitpid(-1, WNOHANG)` says ECHILD only
//! when this process has no children at all, which is why this file holds
//! a single test and is a test binary of its own (tests of one binary run in
//! parallel threads, and any child of theirs would be seen or reaped here).
#![cfg(target_os = "linux")]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use handoff::spawn::{spawn_activated, Program};
use handoff::SpawnError;
use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag};
use nix::unistd::Pid;

fn file(dir: &Path, name: &str, body: &[u8], mode: u32) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, body).expect("write test file");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).expect("chmod");
    p
}

#[test]
fn exec_failures_report_errno_and_leave_no_child() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases = [
        // Not executable at all (root too needs an x bit to exec).
        (
            file(dir.path(), "plain", b"#!/bin/sh\n", 0o644),
            libc::EACCES,
        ),
        // The kernel finds the script but not its interpreter.
        (
            file(dir.path(), "script", b"#!/nonexistent/interp\n", 0o755),
            libc::ENOENT,
        ),
        // Executable bit, but neither ELF nor `#!`.
        (
            file(dir.path(), "garbage", b"\x7fNOT-ELF\x00\x01", 0o755),
            libc::ENOEXEC,
        ),
    ];
    assert_eq!(
        waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)),
        Err(Errno::ECHILD),
        "precondition: no children before the first spawn"
    );
    for (path, errno) in cases {
        let got = spawn_activated(&Program::new(&path), &[], &[]);
        match got {
            Err(SpawnError::Exec { source, .. }) => {
                assert_eq!(source.raw_os_error(), Some(errno), "{path:?}: {source}")
            }
            Err(other) => panic!("{path:?}: expected an exec error, got {other}"),
            Ok(child) => {
                let _ = child.kill_and_reap(std::time::Duration::from_secs(10));
                panic!("{path:?}: spawned although it cannot be exec'd");
            }
        }
        assert_eq!(
            waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)),
            Err(Errno::ECHILD),
            "{path:?}: a child (zombie or running) was left behind"
        );
    }
}
