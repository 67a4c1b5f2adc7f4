//! The notify-mode supervisor against a real socket-activated program (the
//! Python test service of the CLI crate, standard library only): start,
//! upgrade, a new process that never sends READY=1, an old one that ignores
//! SIGTERM, one that dies before it is ready. Linux only (SO_PASSCRED).
#![cfg(target_os = "linux")]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::Duration;

use handoff::notify::{
    NotifyConfig, NotifyError, NotifyOptions, NotifyPhase, NotifySupervisor, Readiness,
};
use handoff::{Exit, Listener, Program};

fn service() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../handoff-cli/tests/fixtures/notify_service.py")
}

struct Setup {
    _dir: tempfile::TempDir,
    behaviour: PathBuf,
    addr: SocketAddr,
    sup: NotifySupervisor,
    program: Program,
}

fn setup(grace: Duration) -> Setup {
    setup_with(grace, |_, _| {})
}

fn setup_with(grace: Duration, tweak: impl FnOnce(&mut NotifyConfig, SocketAddr)) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let behaviour = dir.path().join("behaviour");
    let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = tcp.local_addr().unwrap();
    let mut cfg = NotifyConfig::new(dir.path());
    cfg.deadline = Duration::from_secs(20);
    cfg.drain_grace = grace;
    tweak(&mut cfg, addr);
    let sup = NotifySupervisor::new(
        cfg,
        vec![Listener {
            name: "http".into(),
            fd: tcp.into(),
        }],
    );
    let program = Program::new("python3")
        .arg(service())
        .env("NOTIFY_TEST_BEHAVIOUR_FILE", &behaviour);
    Setup {
        _dir: dir,
        behaviour,
        addr,
        sup,
        program,
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        self.sup.stop(Duration::from_secs(5));
    }
}

/// The pid that answers `GET /` on a fresh connection.
fn serving_pid(addr: SocketAddr) -> u32 {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out.split_whitespace()
        .find_map(|w| w.strip_prefix("pid=")?.parse().ok())
        .unwrap_or_else(|| panic!("bad body: {out}"))
}

fn gone(pid: u32) -> bool {
    !PathBuf::from(format!("/proc/{pid}")).exists()
}

#[test]
fn upgrade_replaces_the_process_and_stops_the_old_one() {
    let s = setup(Duration::from_secs(10));
    let first = s.sup.start(&s.program, &mut |_| {}).unwrap();
    assert_eq!(serving_pid(s.addr), first.new_pid);
    assert_eq!(
        s.sup.incumbent_announced().unwrap().status.as_deref(),
        Some("serving")
    );

    let mut seen = vec![];
    let r = s
        .sup
        .perform_handoff(&s.program, NotifyOptions::default(), &mut |p| {
            seen.push(p.phase)
        })
        .unwrap();
    assert_eq!(
        seen,
        [
            NotifyPhase::Spawned,
            NotifyPhase::Ready,
            NotifyPhase::OldSignalled,
            NotifyPhase::OldStopped
        ]
    );
    assert_eq!(r.old_pid, Some(first.new_pid));
    assert_eq!(r.old_exit, Some(Exit::Code(0)));
    assert!(!r.escalated);
    assert!(gone(first.new_pid), "the old process was reaped");
    assert_eq!(serving_pid(s.addr), r.new_pid);
}

#[test]
fn never_ready_is_killed_and_the_old_one_keeps_serving() {
    let s = setup(Duration::from_secs(10));
    let first = s.sup.start(&s.program, &mut |_| {}).unwrap();
    std::fs::write(&s.behaviour, "no-ready").unwrap();
    let mut spawned = None;
    let opts = NotifyOptions {
        deadline: Some(Duration::from_secs(5)),
        drain_grace: None,
    };
    let e = s
        .sup
        .perform_handoff(&s.program, opts, &mut |p| spawned = Some(p.phase))
        .unwrap_err();
    let NotifyError::NotReady { pid, status, .. } = &e else {
        panic!("expected NotReady, got {e}");
    };
    assert_eq!(spawned, Some(NotifyPhase::Spawned));
    assert_eq!(status.as_deref(), Some("configured never to be ready"));
    assert!(e.to_string().contains("did not become ready within"), "{e}");
    assert!(gone(*pid), "the new process was killed and reaped");
    assert_eq!(s.sup.incumbent_pid(), Some(first.new_pid));
    assert_eq!(serving_pid(s.addr), first.new_pid);
}

#[test]
fn an_old_process_ignoring_sigterm_is_killed_after_the_grace() {
    let s = setup(Duration::from_millis(300));
    std::fs::write(&s.behaviour, "ignore-term").unwrap();
    let first = s.sup.start(&s.program, &mut |_| {}).unwrap();
    std::fs::remove_file(&s.behaviour).unwrap();
    let r = s
        .sup
        .perform_handoff(&s.program, NotifyOptions::default(), &mut |_| {})
        .unwrap();
    assert!(r.escalated);
    assert_eq!(r.old_exit, Some(Exit::Signal(libc::SIGKILL)));
    assert_eq!(
        r.phases.last().map(|p| p.phase),
        Some(NotifyPhase::OldKilled)
    );
    assert!(r.warnings[0].contains("SIGKILL"), "{:?}", r.warnings);
    assert!(gone(first.new_pid));
    assert_eq!(serving_pid(s.addr), r.new_pid);
}

#[test]
fn a_process_that_exits_before_ready_is_reported() {
    let s = setup(Duration::from_secs(1));
    let e = s
        .sup
        .start(&Program::new("false"), &mut |_| {})
        .unwrap_err();
    assert!(
        matches!(
            e,
            NotifyError::Exited {
                exit: Exit::Code(1),
                ..
            }
        ),
        "{e}"
    );
    assert!(s.sup.incumbent().is_none());
}

fn probe_only(probe: String) -> impl FnOnce(&mut NotifyConfig, SocketAddr) {
    move |c, addr| {
        c.deadline = Duration::from_secs(2);
        c.readiness = Readiness {
            notify: false,
            probe: Some(
                probe
                    .replace("LISTENER", &addr.to_string())
                    .parse()
                    .unwrap(),
            ),
        }
    }
}

#[test]
fn a_probe_alone_can_decide_readiness() {
    // The service never sends READY=1 but answers GET / on the listener; with
    // no other process running, only the new one can have answered.
    let s = setup_with(
        Duration::from_secs(5),
        probe_only("http://LISTENER/".into()),
    );
    std::fs::write(&s.behaviour, "no-ready").unwrap();
    let first = s.sup.start(&s.program, &mut |_| {}).unwrap();
    assert_eq!(serving_pid(s.addr), first.new_pid);
}

#[test]
fn a_probe_that_never_passes_aborts_with_its_last_failure() {
    let dead = TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let s = setup_with(
        Duration::from_secs(5),
        probe_only(format!("tcp://{dead_addr}")),
    );
    let e = s.sup.start(&s.program, &mut |_| {}).unwrap_err();
    let NotifyError::NotReady { pid, .. } = &e else {
        panic!("expected NotReady, got {e}");
    };
    assert!(e.to_string().contains("last probe failure"), "{e}");
    assert!(gone(*pid));
}
