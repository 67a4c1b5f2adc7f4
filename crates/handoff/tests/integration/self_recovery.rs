//! The incumbent on its own when the supervisor disappears mid-handoff
//! (docs/design.md §6.3): drained → resume; sealed → re-take the state lock and
//! resume; sealed and the successor holds the lock → retire and exit.
//!
//! The incumbent is a real process (`examples/peer.rs`, started standalone);
//! this test plays the supervisor by hand and then "crashes" by hanging up.

use crate::common;

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use handoff::channel::Channel;
use handoff::protocol::{Message, Role};
use handoff::StateLock;

struct Incumbent {
    child: Child,
    control: PathBuf,
    state: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Incumbent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

use common::poll;

fn start(recovery_ms: u64) -> Incumbent {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let control = dir.path().join("control.sock");
    let child = Command::new(common::example_bin("peer"))
        .arg("good")
        .env_remove("HANDOFF_ROLE")
        .env_remove("LISTEN_FDS")
        .env("HANDOFF_STATE_DIR", &state)
        .env("HANDOFF_CONTROL_SOCK", &control)
        .env("PEER_RECOVERY_MS", recovery_ms.to_string())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let inc = Incumbent {
        child,
        control,
        state,
        _dir: dir,
    };
    poll(
        Duration::from_secs(10),
        "the incumbent's control socket",
        || UnixStream::connect(&inc.control).is_ok(),
    );
    inc
}

/// Connects as the supervisor: Hello from the incumbent, HelloAck back.
fn connect(control: &Path, expect_pid: u32) -> Channel {
    let mut c = Channel::new(UnixStream::connect(control).unwrap());
    match c.recv(Some(Duration::from_secs(5))).unwrap() {
        Message::Hello(h) => {
            assert_eq!(h.role, Role::Incumbent);
            assert_eq!(h.pid, expect_pid);
        }
        m => panic!("expected Hello, got {m:?}"),
    }
    c.send(&Message::HelloAck { version: 1 }).unwrap();
    c.set_version(1);
    c
}

fn drain(c: &mut Channel, id: u64) {
    c.send(&Message::PrepareHandoff {
        handoff_id: id,
        successor_pid: 1,
        deadline_ms: 10_000,
        drain_grace_ms: 5_000,
    })
    .unwrap();
    loop {
        match c.recv(Some(Duration::from_secs(5))).unwrap() {
            Message::Heartbeat { .. } => continue,
            Message::Drained {
                handoff_id,
                accept_closed,
                ..
            } => {
                assert_eq!(handoff_id, id);
                assert!(accept_closed);
                return;
            }
            m => panic!("expected Drained, got {m:?}"),
        }
    }
}

fn seal(c: &mut Channel, id: u64) {
    c.send(&Message::SealRequest { handoff_id: id }).unwrap();
    loop {
        match c.recv(Some(Duration::from_secs(5))).unwrap() {
            Message::Heartbeat { .. } | Message::SealProgress { .. } => continue,
            Message::SealComplete { handoff_id, .. } => {
                assert_eq!(handoff_id, id);
                return;
            }
            m => panic!("expected SealComplete, got {m:?}"),
        }
    }
}

#[test]
fn supervisor_lost_while_drained_resumes() {
    let inc = start(10_000);
    let pid = inc.child.id();
    let mut c = connect(&inc.control, pid);
    drain(&mut c, 7);
    drop(c); // the supervisor crashes
             // It serves the control socket again, and still holds the lock.
    let c = connect(&inc.control, pid);
    drop(c);
    assert!(StateLock::is_held(&inc.state).unwrap());
}

#[test]
fn supervisor_lost_while_sealed_retakes_the_lock_and_resumes() {
    let inc = start(10_000);
    let pid = inc.child.id();
    let mut c = connect(&inc.control, pid);
    drain(&mut c, 8);
    seal(&mut c, 8);
    // Sealed: the lock is free now.
    assert!(!StateLock::is_held(&inc.state).unwrap());
    drop(c);
    poll(
        Duration::from_secs(10),
        "the incumbent to re-take the state lock",
        || StateLock::is_held(&inc.state).unwrap(),
    );
    let c = connect(&inc.control, pid);
    drop(c);
}

#[test]
fn supervisor_lost_after_successor_took_the_lock_retires() {
    let mut inc = start(300);
    let pid = inc.child.id();
    let mut c = connect(&inc.control, pid);
    drain(&mut c, 9);
    seal(&mut c, 9);
    // This test is the successor now: it holds the lock.
    let _successor_lock = StateLock::try_acquire(&inc.state)
        .unwrap()
        .expect("lock free after seal");
    drop(c);
    // The incumbent gives up after its recovery wait and exits cleanly.
    let mut status = None;
    poll(Duration::from_secs(10), "the incumbent to exit", || {
        status = inc.child.try_wait().unwrap();
        status.is_some()
    });
    assert!(status.unwrap().success(), "{status:?}");
    let mut out = String::new();
    BufReader::new(inc.child.stdout.take().unwrap())
        .read_line(&mut out)
        .unwrap();
    assert!(out.contains("SuccessorWon { handoff_id: 9 }"), "{out}");
}
