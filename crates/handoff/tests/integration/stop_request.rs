//! `handoff stop` through the control protocol (version 2): a real
//! incumbent process (`examples/peer.rs`, started standalone) answers
//! Shutdown by draining, heartbeating, saying ShutdownDrained and exiting by
//! itself; the supervisor's side ([`Supervisor::request_stop`]) asks only an
//! incumbent whose negotiated version has the message and reports every
//! other case as a typed error its caller falls back from.

use crate::common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{poll, poll_until};
use handoff::channel::Channel;
use handoff::error::ProtocolError;
use handoff::frame::{self, FrameError};
use handoff::protocol::{Message, Role, VersionRange};
use handoff::{Listener, StateLock, StopError, Supervisor, SupervisorConfig, Timeouts};

struct Peer {
    child: Child,
    control: PathBuf,
    state: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Peer {
    fn start(env: &[(&str, &str)]) -> Peer {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        std::fs::create_dir(&state).unwrap();
        let control = dir.path().join("control.sock");
        let mut cmd = Command::new(common::example_bin("peer"));
        cmd.arg("good")
            .env_remove("HANDOFF_ROLE")
            .env_remove("LISTEN_FDS")
            .env("HANDOFF_STATE_DIR", &state)
            .env("HANDOFF_CONTROL_SOCK", &control)
            .stdout(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let peer = Peer {
            child: cmd.spawn().unwrap(),
            control,
            state,
            _dir: dir,
        };
        poll(
            Duration::from_secs(10),
            "the incumbent's control socket",
            || UnixStream::connect(&peer.control).is_ok(),
        );
        peer
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Still the incumbent: it answers a new control connection with Hello,
    /// and holds the state lock.
    fn serves_on(&self) {
        let mut c = Channel::new(UnixStream::connect(&self.control).unwrap());
        match c.recv(Some(Duration::from_secs(5))).unwrap() {
            Message::Hello(h) => assert_eq!(h.pid, self.pid()),
            m => panic!("expected Hello, got {m:?}"),
        }
        assert!(StateLock::is_held(&self.state).unwrap());
    }

    /// Waits for it to exit; its status and what it printed.
    fn exit(&mut self) -> (std::process::ExitStatus, String) {
        let mut status = None;
        poll(Duration::from_secs(10), "the incumbent to exit", || {
            status = self.child.try_wait().unwrap();
            status.is_some()
        });
        let mut out = String::new();
        BufReader::new(self.child.stdout.take().unwrap())
            .read_line(&mut out)
            .unwrap();
        (status.unwrap(), out)
    }

    /// A supervisor that adopted this process as its incumbent.
    fn supervisor(&self) -> Supervisor {
        let mut cfg = SupervisorConfig::new(&self.state, &self.control);
        cfg.timeouts = Timeouts {
            hello: Duration::from_secs(2),
            liveness: Duration::from_secs(3),
            ..Timeouts::default()
        };
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let sup = Supervisor::new(
            cfg,
            vec![Listener {
                name: "http".into(),
                fd: tcp.into(),
            }],
        )
        .unwrap();
        sup.adopt_incumbent(self.pid(), "peer").unwrap();
        sup
    }
}

/// Plays the supervisor by hand up to the negotiated `version`.
fn greet(control: &Path, version: u16) -> Channel {
    let mut c = Channel::new(UnixStream::connect(control).unwrap());
    match c.recv(Some(Duration::from_secs(5))).unwrap() {
        Message::Hello(h) => assert_eq!(h.role, Role::Incumbent),
        m => panic!("expected Hello, got {m:?}"),
    }
    c.send(&Message::HelloAck { version }).unwrap();
    c.set_version(version);
    c
}

#[test]
fn shutdown_drains_heartbeats_reports_and_retires() {
    let mut peer = Peer::start(&[("PEER_DRAIN_MS", "400"), ("HANDOFF_HEARTBEAT_MS", "50")]);
    let mut c = greet(&peer.control, 2);
    c.send(&Message::Shutdown {
        stop_id: 5,
        drain_grace_ms: 10_000,
    })
    .unwrap();
    let mut heartbeats = 0;
    let report = loop {
        match c.recv(Some(Duration::from_secs(5))).unwrap() {
            Message::Heartbeat { handoff_id: 5 } => heartbeats += 1,
            m @ Message::ShutdownDrained { .. } => break m,
            m => panic!("expected Heartbeat or ShutdownDrained, got {m:?}"),
        }
    };
    assert!(heartbeats >= 1, "no heartbeat during a 400 ms drain");
    assert_eq!(
        report,
        Message::ShutdownDrained {
            stop_id: 5,
            open_conns_remaining: 0,
            accept_closed: true,
        }
    );
    // Nothing follows: the incumbent retired and exits by itself.
    assert!(matches!(
        c.recv(Some(Duration::from_secs(5))),
        Err(FrameError::Closed)
    ));
    let (status, out) = peer.exit();
    assert!(status.success(), "{status:?}");
    assert!(out.contains("Stopped { stop_id: 5 }"), "{out}");
    // Held until the process exits (`Retired::Stopped`): nothing may take
    // over the state while it finishes what is open.
    assert!(out.contains("state lock held: Some(true)"), "{out}");
}

/// An incumbent that negotiated version 1 refuses Shutdown like the older
/// build it is talking to would (the message does not exist there): the
/// connection ends and it serves on.
#[test]
fn shutdown_on_a_version_1_channel_is_refused_and_changes_nothing() {
    let peer = Peer::start(&[]);
    let mut c = greet(&peer.control, 1);
    let raw = frame::encode(
        1,
        &Message::Shutdown {
            stop_id: 6,
            drain_grace_ms: 1000,
        }
        .encode(),
    )
    .unwrap();
    c.stream().write_all(&raw).unwrap();
    assert!(matches!(
        c.recv(Some(Duration::from_secs(5))),
        Err(FrameError::Closed)
    ));
    peer.serves_on();
}

#[test]
fn request_stop_asks_and_returns_the_drain() {
    let mut peer = Peer::start(&[("PEER_DRAIN_MS", "200")]);
    let sup = peer.supervisor();
    let req = sup
        .request_stop(peer.pid(), Duration::from_secs(10))
        .unwrap();
    assert_eq!(req.pid(), peer.pid());
    assert_eq!(req.version(), handoff::protocol::PROTO_MAX);
    let id = req.id();
    let report = req
        .wait_drained(Instant::now() + Duration::from_secs(10))
        .unwrap();
    assert_eq!(report.open_conns_remaining, 0);
    assert!(report.accept_closed);
    let (status, out) = peer.exit();
    assert!(status.success(), "{status:?}");
    assert!(
        out.contains(&format!("Stopped {{ stop_id: {id} }}")),
        "{out}"
    );
}

/// The version gate: an incumbent of an older build (versions 1..=1) is not
/// sent Shutdown — the caller is told why and falls back — and serves on.
#[test]
fn request_stop_of_an_older_incumbent_is_unsupported() {
    let peer = Peer::start(&[("PEER_PROTO_MAX", "1")]);
    let sup = peer.supervisor();
    match sup.request_stop(peer.pid(), Duration::from_secs(10)) {
        Err(StopError::Unsupported {
            pid,
            theirs,
            needed,
        }) => {
            assert_eq!(pid, peer.pid());
            assert_eq!(theirs, VersionRange { min: 1, max: 1 });
            assert_eq!(needed, 2);
        }
        other => panic!("expected Unsupported, got {other:?}"),
    }
    peer.serves_on();
}

/// A drain that fails: the incumbent resumes and hangs up without
/// ShutdownDrained, and the caller learns it (to fall back to a signal).
#[test]
fn a_failed_drain_ends_the_stop_and_the_incumbent_serves_on() {
    let peer = Peer::start(&[("PEER_DRAIN_FAILS", "1")]);
    let sup = peer.supervisor();
    let req = sup
        .request_stop(peer.pid(), Duration::from_secs(10))
        .unwrap();
    match req.wait_drained(Instant::now() + Duration::from_secs(10)) {
        Err(StopError::Protocol(e @ ProtocolError::Frame { .. })) => {
            assert!(e.is_disconnect(), "{e}");
            assert!(e.to_string().starts_with("stopping (draining): "), "{e}");
        }
        other => panic!("expected a disconnect, got {other:?}"),
    }
    peer.serves_on();
}

/// The wait never outlasts the caller's grace, however long the drain.
#[test]
fn wait_drained_stops_at_the_deadline() {
    let peer = Peer::start(&[("PEER_DRAIN_MS", "5000"), ("HANDOFF_HEARTBEAT_MS", "50")]);
    let sup = peer.supervisor();
    let req = sup
        .request_stop(peer.pid(), Duration::from_secs(10))
        .unwrap();
    let t = Instant::now();
    match req.wait_drained(t + Duration::from_millis(300)) {
        Err(StopError::Protocol(ProtocolError::Timeout { clock, .. })) => {
            assert_eq!(clock, "phase deadline")
        }
        other => panic!("expected the deadline, got {other:?}"),
    }
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
}

#[test]
fn request_stop_names_what_it_could_not_reach() {
    let peer = Peer::start(&[]);
    let sup = peer.supervisor();
    assert!(matches!(
        sup.request_stop(peer.pid() + 100_000, Duration::from_secs(1)),
        Err(StopError::NotIncumbent { .. })
    ));
    std::fs::remove_file(&peer.control).unwrap();
    match sup.request_stop(peer.pid(), Duration::from_secs(1)) {
        Err(e @ StopError::Connect { .. }) => {
            assert!(e.to_string().contains("control.sock"), "{e}")
        }
        other => panic!("expected Connect, got {other:?}"),
    }
    // Unlinking the socket is no stop: the process is still there.
    assert!(!poll_until(Duration::from_millis(100), || {
        std::fs::metadata(format!("/proc/{}", peer.pid())).is_err()
    }));
}
