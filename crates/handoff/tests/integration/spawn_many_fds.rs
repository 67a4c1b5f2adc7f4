//! Every listener reaches the child, however many: the fork/exec path once
//! passed only the first 64 (a fixed-size scratch array in the child) and
//! the 65th listener onwards was silently missing, found by the benchmark's
//! 256-listener point. The check is the kernel's: the child's fd N must be
//! the very socket the parent passed as listener N - 3.
#![cfg(target_os = "linux")]

use crate::common;

use std::net::TcpListener;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::time::Duration;

use handoff::spawn::{spawn_activated, Program};
use handoff::Listener;

/// What an fd is (`socket:[inode]`), or why it could not be read; never
/// panics, so the child is always killed before the asserts.
fn link(path: String) -> Result<PathBuf, String> {
    std::fs::read_link(&path).map_err(|e| format!("readlink {path}: {e}"))
}

#[test]
fn three_hundred_listeners_all_arrive_in_order() {
    const N: usize = 300;
    let listeners: Vec<Listener> = (0..N)
        .map(|i| Listener {
            name: format!("l{i}"),
            fd: OwnedFd::from(TcpListener::bind("127.0.0.1:0").expect("bind")),
        })
        .collect();
    let mut program = Program::new(PathBuf::from("/bin/sleep"));
    program.args = vec!["30".into()];
    let child = spawn_activated(&program, &listeners, &[]).expect("spawn");
    let pid = child.pid();
    // spawn returns after execve succeeded, but the program's dynamic loader
    // then briefly opens files of its own (the next free fd, 303): poll until
    // only what we passed is left, within a deadline.
    let fds_above_stderr = || -> Vec<usize> {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .expect("child fds")
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .filter(|&fd: &usize| fd >= 3)
            .collect()
    };
    let mut passed = vec![];
    common::poll_until(Duration::from_secs(10), || {
        passed = fds_above_stderr();
        passed.len() == N
    });
    let mut mismatched = vec![];
    for (i, l) in listeners.iter().enumerate() {
        let want = link(format!("/proc/self/fd/{}", l.fd.as_raw_fd()));
        let got = link(format!("/proc/{pid}/fd/{}", 3 + i));
        if got != want {
            mismatched.push((i, want, got));
        }
    }
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
    let has_count = environ
        .split(|b| *b == 0)
        .any(|v| v == format!("LISTEN_FDS={N}").as_bytes());
    let _ = child.kill_and_reap(Duration::from_secs(10));
    assert!(mismatched.is_empty(), "wrong socket at: {mismatched:?}");
    assert_eq!(passed.len(), N, "exactly the listeners above stderr");
    assert!(has_count, "LISTEN_FDS={N} in the child's environment");
}
