//! The supervisor against misbehaving peers: a fake incumbent served from a
//! thread of this test (the supervisor adopts this process as the
//! incumbent), and real successor processes (`examples/peer.rs`) that break
//! the protocol in one precise way each. Every case must end in a typed
//! error naming what was wrong, with the successor killed and reaped.

use crate::common;

use std::io::Write;
use std::net::TcpListener;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use handoff::channel::Channel;
use handoff::error::ProtocolError;
use handoff::frame::{self, FrameError};
use handoff::protocol::{Hello, Message, Role, SEAL_AT_ONCE_SINCE};
use handoff::{
    HandoffError, HandoffOptions, Listener, Program, Supervisor, SupervisorConfig, Timeouts,
};

struct Setup {
    _dir: tempfile::TempDir,
    control: PathBuf,
    sup: Supervisor,
    tag: String,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let control = dir.path().join("control.sock");
    let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut cfg = SupervisorConfig::new(&state, &control);
    cfg.timeouts = Timeouts {
        hello: Duration::from_secs(2),
        liveness: Duration::from_secs(3),
        deadline: Duration::from_secs(10),
        drain_grace: Duration::from_secs(5),
        ..Timeouts::default()
    };
    let sup = Supervisor::new(
        cfg,
        vec![Listener {
            name: "http".into(),
            fd: tcp.into(),
        }],
    )
    .unwrap();
    sup.adopt_incumbent(std::process::id(), "test").unwrap();
    let tag = format!("tag-{}-{:?}", std::process::id(), Instant::now());
    Setup {
        _dir: dir,
        control,
        sup,
        tag,
    }
}

impl Setup {
    fn program(&self, mode: &str) -> Program {
        Program::new(common::example_bin("peer"))
            .arg(mode)
            .arg(&self.tag)
    }

    fn handoff(&self, mode: &str) -> Result<handoff::Report, HandoffError> {
        self.sup
            .perform_handoff(&self.program(mode), HandoffOptions::default(), &mut |_| {})
    }

    /// Pids of live processes started for this test.
    fn peers(&self) -> Vec<u32> {
        let mut out = vec![];
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
                continue;
            };
            if String::from_utf8_lossy(&cmd).contains(&self.tag) {
                out.push(pid);
            }
        }
        out
    }

    fn assert_no_peer_left(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = self.peers();
            if left.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "successor processes left behind: {left:?}"
            );
            // Poll interval of a deadline-bounded wait, not a sleep-to-wait.
            std::thread::park_timeout(Duration::from_millis(10));
        }
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        for pid in self.peers() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Serves one supervisor connection on `path` with `script`.
fn fake_incumbent<T: Send + 'static>(
    path: &Path,
    script: impl FnOnce(UnixStream) -> T + Send + 'static,
) -> JoinHandle<T> {
    let l = UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        script(s)
    })
}

fn hello(role: Role, pid: u32, min: u16, max: u16) -> Message {
    Message::Hello(Hello {
        role,
        pid,
        proto_min: min,
        proto_max: max,
        build_id: "fake".into(),
    })
}

/// A fake incumbent that greets correctly and returns its channel.
fn greet(s: UnixStream) -> Channel {
    let mut c = Channel::new(s);
    c.send(&hello(Role::Incumbent, std::process::id(), 1, 1))
        .unwrap();
    match c.recv(Some(Duration::from_secs(5))).unwrap() {
        Message::HelloAck { version } => c.set_version(version),
        m => panic!("expected HelloAck, got {m:?}"),
    }
    c
}

fn root_protocol(e: &HandoffError) -> &ProtocolError {
    match e.cause() {
        HandoffError::Protocol(p) => p,
        other => panic!("expected a protocol error, got: {other}"),
    }
}

fn frame_error(e: &HandoffError) -> &FrameError {
    match root_protocol(e) {
        ProtocolError::Frame { source, .. } => source,
        other => panic!("expected a frame error, got: {other}"),
    }
}

// ---- incumbent side -------------------------------------------------------

#[test]
fn incumbent_wrong_role() {
    let s = setup();
    let t = fake_incumbent(&s.control, |st| {
        Channel::new(st)
            .send(&hello(Role::Successor, std::process::id(), 1, 1))
            .unwrap();
    });
    let e = s.handoff("good").unwrap_err();
    t.join().unwrap();
    assert!(
        matches!(
            root_protocol(&e),
            ProtocolError::WrongRole {
                expected: Role::Incumbent,
                found: Role::Successor,
                ..
            }
        ),
        "{e}"
    );
    assert!(
        e.to_string().contains("expected a Hello from a incumbent"),
        "{e}"
    );
    s.assert_no_peer_left();
}

#[test]
fn incumbent_pid_mismatch() {
    let s = setup();
    let t = fake_incumbent(&s.control, |st| {
        Channel::new(st)
            .send(&hello(Role::Incumbent, std::process::id() + 1, 1, 1))
            .unwrap();
    });
    let e = s.handoff("good").unwrap_err();
    t.join().unwrap();
    match root_protocol(&e) {
        ProtocolError::PidMismatch {
            announced, kernel, ..
        } => {
            assert_eq!(*announced, std::process::id() + 1);
            assert_eq!(*kernel, std::process::id());
        }
        other => panic!("{other}"),
    }
}

#[test]
fn incumbent_bad_magic() {
    let s = setup();
    let t = fake_incumbent(&s.control, |mut st| {
        st.write_all(b"SSH-2.0-OpenSSH_9.0\r\n").unwrap();
    });
    let e = s.handoff("good").unwrap_err();
    t.join().unwrap();
    assert!(
        matches!(frame_error(&e), FrameError::BadMagic { .. }),
        "{e}"
    );
}

#[test]
fn incumbent_bad_checksum() {
    let s = setup();
    let t = fake_incumbent(&s.control, |mut st| {
        let mut f = frame::encode(
            1,
            &hello(Role::Incumbent, std::process::id(), 1, 1).encode(),
        )
        .unwrap();
        let last = f.len() - 1;
        f[last] ^= 0xff;
        st.write_all(&f).unwrap();
    });
    let e = s.handoff("good").unwrap_err();
    t.join().unwrap();
    assert!(
        matches!(frame_error(&e), FrameError::BadChecksum { .. }),
        "{e}"
    );
}

#[test]
fn incumbent_truncated_frame() {
    let s = setup();
    let t = fake_incumbent(&s.control, |mut st| {
        let f = frame::encode(
            1,
            &hello(Role::Incumbent, std::process::id(), 1, 1).encode(),
        )
        .unwrap();
        st.write_all(&f[..f.len() / 2]).unwrap();
        // Dropping the stream closes it mid-frame.
    });
    let e = s.handoff("good").unwrap_err();
    t.join().unwrap();
    assert!(
        matches!(frame_error(&e), FrameError::Truncated { .. }),
        "{e}"
    );
}

#[test]
fn incumbent_unknown_message() {
    let s = setup();
    let t = fake_incumbent(&s.control, |mut st| {
        st.write_all(&frame::encode(1, &[99, 1, 2, 3]).unwrap())
            .unwrap();
    });
    let e = s.handoff("good").unwrap_err();
    t.join().unwrap();
    assert!(
        matches!(frame_error(&e), FrameError::UnknownMessage { tag: 99 }),
        "{e}"
    );
}

#[test]
fn incumbent_oversized_length() {
    let s = setup();
    let t = fake_incumbent(&s.control, |mut st| {
        let mut f = frame::encode(1, b"\x00").unwrap();
        f[8..12].copy_from_slice(&(u32::MAX - 1).to_le_bytes());
        st.write_all(&f[..frame::HEADER_LEN]).unwrap();
        // Keep the connection open until the supervisor hangs up: it must
        // refuse from the header alone rather than wait for (or allocate)
        // 4 GiB.
        let _ = std::io::Read::read(&mut st, &mut [0u8; 1]);
    });
    let e = s.handoff("good").unwrap_err();
    t.join().unwrap();
    assert!(
        matches!(frame_error(&e), FrameError::Oversized { .. }),
        "{e}"
    );
}

#[test]
fn incumbent_wrong_handoff_id_aborts_and_resumes() {
    let s = setup();
    let t = fake_incumbent(&s.control, |st| {
        let mut c = greet(st);
        let Message::PrepareHandoff {
            handoff_id,
            successor_pid,
            ..
        } = c.recv(Some(Duration::from_secs(10))).unwrap()
        else {
            panic!("expected PrepareHandoff")
        };
        c.send(&Message::Drained {
            handoff_id: handoff_id ^ 1,
            open_conns_remaining: 0,
            accept_closed: true,
        })
        .unwrap();
        // What the supervisor says next must be ResumeAfterAbort for the
        // right handoff.
        let next = c.recv(Some(Duration::from_secs(10))).unwrap();
        (handoff_id, successor_pid, next)
    });
    let e = s.handoff("good").unwrap_err();
    let (id, successor_pid, next) = t.join().unwrap();
    match root_protocol(&e) {
        ProtocolError::WrongHandoffId {
            expected,
            found,
            message,
            ..
        } => {
            assert_eq!(*expected, id);
            assert_eq!(*found, id ^ 1);
            assert_eq!(*message, "Drained");
        }
        other => panic!("{other}"),
    }
    assert_eq!(next, Message::ResumeAfterAbort { handoff_id: id });
    assert!(matches!(
        e,
        HandoffError::Aborted {
            incumbent_resumed: true,
            ..
        }
    ));
    assert!(
        !Path::new(&format!("/proc/{successor_pid}")).exists(),
        "successor {successor_pid} not reaped"
    );
    s.assert_no_peer_left();
}

#[test]
fn version_negotiation_overlapping_picks_highest_common() {
    let s = setup();
    let t = fake_incumbent(&s.control, |st| {
        let mut c = Channel::new(st);
        c.send(&hello(Role::Incumbent, std::process::id(), 1, 9))
            .unwrap();
        c.recv(Some(Duration::from_secs(5))).unwrap()
        // then hang up: the handoff aborts, which is fine here
    });
    let _ = s.handoff("good");
    assert_eq!(
        t.join().unwrap(),
        Message::HelloAck {
            version: handoff::protocol::PROTO_MAX
        }
    );
    s.assert_no_peer_left();
}

/// An incumbent of an older build (version 1 only) is still handed off, at
/// version 1: bumping the version for Shutdown costs old peers nothing.
#[test]
fn version_negotiation_with_an_older_incumbent_picks_its_version() {
    let s = setup();
    let t = fake_incumbent(&s.control, |st| {
        let mut c = Channel::new(st);
        c.send(&hello(Role::Incumbent, std::process::id(), 1, 1))
            .unwrap();
        c.recv(Some(Duration::from_secs(5))).unwrap()
    });
    let _ = s.handoff("good");
    assert_eq!(t.join().unwrap(), Message::HelloAck { version: 1 });
    s.assert_no_peer_left();
}

#[test]
fn version_negotiation_disjoint_fails_clearly() {
    // A range wholly above ours: a build from the future.
    const ABOVE: u16 = handoff::VersionRange::OURS.max + 1;
    let s = setup();
    let t = fake_incumbent(&s.control, |st| {
        Channel::new(st)
            .send(&hello(
                Role::Incumbent,
                std::process::id(),
                ABOVE,
                ABOVE + 1,
            ))
            .unwrap();
    });
    let e = s.handoff("good").unwrap_err();
    t.join().unwrap();
    assert!(
        matches!(root_protocol(&e), ProtocolError::NoCommonVersion(..)),
        "{e}"
    );
    let msg = e.to_string();
    assert!(
        msg.contains("no common protocol version")
            && msg.contains(&format!("{ABOVE}..={}", ABOVE + 1))
            && msg.contains(&handoff::VersionRange::OURS.to_string()),
        "{msg}"
    );
}

// ---- successor side --------------------------------------------------------

/// A fake incumbent that goes along with whatever the supervisor does.
fn compliant_incumbent(path: &Path) -> JoinHandle<Vec<&'static str>> {
    fake_incumbent(path, |st| {
        let mut c = greet(st);
        let mut seen = vec![];
        while let Ok(m) = c.recv(Some(Duration::from_secs(15))) {
            seen.push(m.name());
            match m {
                Message::PrepareHandoff { handoff_id, .. } => c
                    .send(&Message::Drained {
                        handoff_id,
                        open_conns_remaining: 0,
                        accept_closed: true,
                    })
                    .unwrap(),
                Message::SealRequest { handoff_id } => c
                    .send(&Message::SealComplete {
                        handoff_id,
                        state: None,
                    })
                    .unwrap(),
                _ => break,
            }
        }
        seen
    })
}

fn successor_case(mode: &str) -> (HandoffError, Vec<&'static str>) {
    let s = setup();
    let t = compliant_incumbent(&s.control);
    let e = s.handoff(mode).unwrap_err();
    let seen = t.join().unwrap();
    s.assert_no_peer_left();
    (e, seen)
}

#[test]
fn successor_wrong_role() {
    let (e, _) = successor_case("wrong-role");
    assert!(
        matches!(
            root_protocol(&e),
            ProtocolError::WrongRole {
                expected: Role::Successor,
                found: Role::Incumbent,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn successor_pid_mismatch_is_caught_by_kernel_credentials() {
    let (e, _) = successor_case("wrong-pid");
    match root_protocol(&e) {
        ProtocolError::PidMismatch {
            announced, kernel, ..
        } => assert_eq!(*announced, *kernel + 1),
        other => panic!("{other}"),
    }
}

#[test]
fn successor_garbage() {
    let (e, _) = successor_case("garbage");
    assert!(
        matches!(frame_error(&e), FrameError::BadMagic { .. }),
        "{e}"
    );
}

#[test]
fn successor_silent_times_out() {
    let started = Instant::now();
    let (e, _) = successor_case("silent");
    assert!(
        matches!(root_protocol(&e), ProtocolError::Timeout { .. }),
        "{e}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "hello budget not enforced: {:?}",
        started.elapsed()
    );
}

#[test]
fn successor_no_common_version() {
    let (e, _) = successor_case("no-common-version");
    assert!(
        matches!(root_protocol(&e), ProtocolError::NoCommonVersion(..)),
        "{e}"
    );
}

#[test]
fn successor_ready_with_wrong_handoff_id() {
    let (e, seen) = successor_case("ready-wrong-id");
    assert!(
        matches!(
            root_protocol(&e),
            ProtocolError::WrongHandoffId {
                message: "Ready",
                ..
            }
        ),
        "{e}"
    );
    // The incumbent had sealed: it must have been told to resume.
    assert_eq!(
        seen,
        vec!["PrepareHandoff", "SealRequest", "ResumeAfterAbort"]
    );
}

#[test]
fn successor_failing_health_check() {
    let (e, seen) = successor_case("unhealthy");
    match e.cause() {
        HandoffError::Unhealthy { detail } => assert!(detail.contains("peer says no"), "{detail}"),
        other => panic!("{other}"),
    }
    assert_eq!(seen.last(), Some(&"ResumeAfterAbort"));
}

#[test]
fn missing_binary_is_a_spawn_error_and_incumbent_is_untouched() {
    let s = setup();
    // The successor is spawned before the incumbent is greeted: a spawn that
    // fails never reaches the incumbent at all (no connection is queued).
    let l = UnixListener::bind(&s.control).unwrap();
    l.set_nonblocking(true).unwrap();
    let e = s
        .sup
        .perform_handoff(
            &Program::new("/nonexistent/peer"),
            HandoffOptions::default(),
            &mut |_| {},
        )
        .unwrap_err();
    assert_eq!(
        l.accept().map(|_| ()).map_err(|e| e.kind()),
        Err(std::io::ErrorKind::WouldBlock),
        "the incumbent must not be contacted"
    );
    assert!(
        matches!(
            e.cause(),
            HandoffError::Spawn(handoff::SpawnError::NotFound { .. })
        ),
        "{e}"
    );
}

// ---- version 5: the incumbent seals unasked ---------------------------------

/// A fake incumbent speaking versions up to `max`, draining and sealing as
/// an incumbent of that version does: on SealRequest below version 5, at
/// once after Drained from 5. Returns the messages it got.
fn incumbent_at(path: &Path, max: u16) -> JoinHandle<Vec<&'static str>> {
    fake_incumbent(path, move |st| {
        let mut c = Channel::new(st);
        c.send(&hello(Role::Incumbent, std::process::id(), 1, max))
            .unwrap();
        let version = match c.recv(Some(Duration::from_secs(5))).unwrap() {
            Message::HelloAck { version } => version,
            m => panic!("expected HelloAck, got {m:?}"),
        };
        c.set_version(version);
        let seal = |c: &mut Channel, handoff_id| {
            c.send(&Message::SealComplete {
                handoff_id,
                state: None,
            })
            .unwrap()
        };
        let mut seen = vec![];
        // The descriptor a PrepareHandoffV4 brings (the move socket) is
        // dropped: nothing moves, and its close ends the successor's reading.
        while let Ok((m, _fds)) = c.recv_with_fds(Duration::from_secs(15)) {
            seen.push(m.name());
            match m {
                Message::PrepareHandoff { handoff_id, .. }
                | Message::PrepareHandoffV3 { handoff_id, .. }
                | Message::PrepareHandoffV4 { handoff_id, .. } => {
                    c.send(&Message::Drained {
                        handoff_id,
                        open_conns_remaining: 0,
                        accept_closed: true,
                    })
                    .unwrap();
                    if version >= SEAL_AT_ONCE_SINCE {
                        seal(&mut c, handoff_id);
                    }
                }
                Message::SealRequest { handoff_id } => seal(&mut c, handoff_id),
                _ => break,
            }
        }
        seen
    })
}

/// The supervisor's phases of a handoff that commits, in order.
const EVERY_PHASE: [&str; 5] = [
    "negotiating",
    "draining",
    "sealing",
    "awaiting-ready",
    "committed",
];

/// Hands off from a fake incumbent of version `max` to a real successor;
/// what the incumbent was sent, and the phases the supervisor went through.
fn handoff_from_version(max: u16) -> (Vec<&'static str>, Vec<&'static str>) {
    let s = setup();
    let t = incumbent_at(&s.control, max);
    let mut phases = vec![];
    s.sup
        .perform_handoff(&s.program("good"), HandoffOptions::default(), &mut |p| {
            phases.push(p.phase.name())
        })
        .unwrap();
    (t.join().unwrap(), phases)
}

#[test]
fn an_incumbent_at_version_5_seals_without_being_asked() {
    let (seen, phases) = handoff_from_version(SEAL_AT_ONCE_SINCE);
    assert_eq!(seen, vec!["PrepareHandoffV4", "Commit"]);
    // Its seal is still a phase of its own in the report and the journal.
    assert_eq!(phases, EVERY_PHASE);
}

#[test]
fn an_incumbent_at_version_4_is_asked_to_seal() {
    let (seen, phases) = handoff_from_version(SEAL_AT_ONCE_SINCE - 1);
    assert_eq!(seen, vec!["PrepareHandoffV4", "SealRequest", "Commit"]);
    assert_eq!(phases, EVERY_PHASE);
}

// ---- the happy path, twice: fake incumbent → peer → peer ------------------

#[test]
fn full_handoff_then_peer_to_peer() {
    let s = setup();
    let t = compliant_incumbent(&s.control);
    let mut phases = vec![];
    let r = s
        .sup
        .perform_handoff(&s.program("good"), HandoffOptions::default(), &mut |p| {
            phases.push(p.phase.name())
        })
        .unwrap();
    assert_eq!(
        t.join().unwrap(),
        vec!["PrepareHandoff", "SealRequest", "Commit"]
    );
    assert_eq!(phases, EVERY_PHASE);
    assert_eq!(r.old_pid, Some(std::process::id()));
    assert_eq!(s.sup.incumbent_pid(), Some(r.new_pid));
    assert!(
        s.sup.journal().read().unwrap().is_none(),
        "journal must be cleared"
    );

    // Now the real library incumbent (in the peer) hands off to another peer.
    let r2 = s.handoff("good").unwrap();
    assert_eq!(r2.old_pid, Some(r.new_pid));
    let old = handoff::Child::adopt_foreign(r.new_pid);
    // The old peer retires on Commit and exits.
    if let Ok(old) = old {
        assert!(
            old.wait_timeout(Duration::from_secs(10)).is_some(),
            "old incumbent {} did not exit",
            r.new_pid
        );
    }
    assert_eq!(s.peers(), vec![r2.new_pid]);
}

#[test]
fn one_handoff_at_a_time() {
    let s = std::sync::Arc::new(setup());
    let (entered_tx, entered_rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let t = fake_incumbent(&s.control, move |st| {
        // Hold the first handoff in its greeting until told to go on.
        entered_tx.send(()).unwrap();
        let _ = release_rx.recv();
        drop(st);
    });
    let s2 = s.clone();
    let first = std::thread::spawn(move || s2.handoff("good"));
    entered_rx.recv().unwrap();
    let second = s.handoff("good").unwrap_err();
    assert!(matches!(second, HandoffError::InProgress), "{second}");
    release_tx.send(()).unwrap();
    // The first one fails (its incumbent hung up) but runs to its end.
    assert!(first.join().unwrap().is_err());
    t.join().unwrap();
    s.assert_no_peer_left();
}

/// A successor whose Ready carries no `build_id` metadata (the library's
/// always does; another implementation need not): the new incumbent's build
/// is then the one its Hello gave, never the previous incumbent's.
#[test]
fn successor_without_build_id_in_ready_is_known_by_its_hello() {
    let s = setup();
    let t = compliant_incumbent(&s.control);
    assert_eq!(s.sup.incumbent_build(), "test");
    let r = s.handoff("ready-no-build-id").unwrap();
    assert_eq!(r.new_build_id, "peer", "{r:?}");
    assert_eq!(s.sup.incumbent_build(), "peer");
    t.join().unwrap();
}
