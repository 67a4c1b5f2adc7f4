//! An incumbent whose process has run out of descriptors keeps its control
//! socket (issue 14, item 6): the accept fails with EMFILE, is retried
//! after a pause and logged, and the connection is served as soon as a
//! descriptor is free. (It used to return from `Incumbent::serve`, and the
//! service exited.) A real process: `examples/peer.rs` with
//! `PEER_FILL_FDS`, started standalone as the incumbent.

use crate::common;

use std::io::{BufRead, BufReader, Read};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::poll;
use handoff::channel::Channel;
use handoff::protocol::Message;

struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn control_accept_survives_running_out_of_descriptors() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let control = dir.path().join("control.sock");
    let release = dir.path().join("release");
    let mut peer = Killed(
        Command::new(common::example_bin("peer"))
            .arg("good")
            .env_remove("HANDOFF_ROLE")
            .env_remove("LISTEN_FDS")
            .env("HANDOFF_STATE_DIR", &state)
            .env("HANDOFF_CONTROL_SOCK", &control)
            .env("PEER_FILL_FDS", &release)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let pid = peer.0.id();
    let stderr = Arc::new(Mutex::new(String::new()));
    {
        let mut from = peer.0.stderr.take().unwrap();
        let to = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = from.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                to.lock().unwrap().push_str(&text);
            }
        });
    }
    let mut out = BufReader::new(peer.0.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert!(line.starts_with("filled "), "{line:?}");
    let log = || stderr.lock().unwrap().clone();

    // A connection now can only wait in the backlog: accept has no fd.
    let conn = UnixStream::connect(&control).unwrap();
    poll(
        Duration::from_secs(10),
        "the incumbent reports the failed accept",
        || log().contains("accepting on the control socket failed"),
    );
    assert!(
        peer.0.try_wait().unwrap().is_none(),
        "the incumbent exited:\n{}",
        log()
    );
    // Descriptors free again: the waiting connection is served.
    std::fs::write(&release, "").unwrap();
    let mut chan = Channel::new(conn);
    match chan.recv(Some(Duration::from_secs(10))) {
        Ok(Message::Hello(h)) => assert_eq!(h.pid, pid),
        other => panic!("expected Hello, got {other:?}\n{}", log()),
    }
    let said = log()
        .matches("accepting on the control socket failed")
        .count();
    assert!(said <= 2, "said {said} times:\n{}", log());
}
