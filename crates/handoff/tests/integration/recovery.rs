//! `resume_from_journal`: what a supervisor restarted after a crash does
//! with the journal its predecessor left.

use crate::common;

use std::os::unix::net::UnixListener;
use std::process::Command;
use std::time::Duration;

use handoff::journal::now_ms;
use handoff::{resume_from_journal, Child, Journal, JournalRecord, SupervisorPhase};

fn record(successor: Option<u32>, started_at: u64) -> JournalRecord {
    JournalRecord {
        handoff_id: 42,
        phase: SupervisorPhase::AwaitingReady,
        incumbent_pid: Some(1),
        successor_pid: successor,
        started_at,
    }
}

fn sleeper() -> Child {
    let c = Command::new("sleep").arg("60").spawn().unwrap();
    let pid = c.id();
    // Hand reaping to the library's single owner: std's handle is dropped
    // without waiting.
    std::mem::forget(c);
    Child::adopt(pid).unwrap()
}

#[test]
fn nothing_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let r = resume_from_journal(
        dir.path(),
        &dir.path().join("c.sock"),
        Duration::ZERO,
        Duration::ZERO,
    )
    .unwrap();
    assert_eq!(r, None);
}

#[test]
fn orphaned_successor_is_killed_and_journal_cleared() {
    let dir = tempfile::tempdir().unwrap();
    let orphan = sleeper();
    Journal::new(dir.path())
        .write(&record(Some(orphan.pid()), now_ms() - 500))
        .unwrap();
    let r = resume_from_journal(
        dir.path(),
        &dir.path().join("c.sock"),
        Duration::from_millis(50),
        Duration::ZERO,
    )
    .unwrap()
    .unwrap();
    assert_eq!(r.killed_successor, Some(orphan.pid()));
    assert_eq!(r.incumbent_pid, None);
    assert_eq!(r.record.handoff_id, 42);
    assert!(
        orphan.wait_timeout(Duration::from_secs(10)).is_some(),
        "orphan not killed"
    );
    assert_eq!(Journal::new(dir.path()).read().unwrap(), None);
}

#[test]
fn successor_that_became_incumbent_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("c.sock");
    // This process serves the control socket as an incumbent: it is "the
    // successor that made it". The journal names it as the successor; it
    // must not be touched.
    let l = UnixListener::bind(&control).unwrap();
    std::thread::spawn(move || {
        use handoff::channel::Channel;
        use handoff::protocol::{Hello, Message, Role};
        for s in l.incoming().flatten() {
            let _ = Channel::new(s).send(&Message::Hello(Hello {
                role: Role::Incumbent,
                pid: std::process::id(),
                proto_min: 1,
                proto_max: 1,
                build_id: "test".into(),
            }));
        }
    });
    Journal::new(dir.path())
        .write(&record(Some(std::process::id()), now_ms()))
        .unwrap();
    let r = resume_from_journal(dir.path(), &control, Duration::from_secs(5), Duration::ZERO)
        .unwrap()
        .unwrap();
    assert_eq!(r.incumbent_pid, Some(std::process::id()));
    assert_eq!(r.killed_successor, None);
}

/// A successor that bound the control socket but never became the incumbent
/// (it does not answer) does not count as the incumbent: it is killed.
#[test]
fn bound_but_silent_successor_is_killed() {
    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("c.sock");
    let _silent = UnixListener::bind(&control).unwrap();
    let orphan = sleeper();
    Journal::new(dir.path())
        .write(&record(Some(orphan.pid()), now_ms() - 500))
        .unwrap();
    let r = resume_from_journal(
        dir.path(),
        &control,
        Duration::from_millis(100),
        // Still running after the grace: killed.
        Duration::from_millis(100),
    )
    .unwrap()
    .unwrap();
    assert_eq!(r.incumbent_pid, None);
    assert_eq!(r.killed_successor, Some(orphan.pid()));
    assert!(orphan.wait_timeout(Duration::from_secs(10)).is_some());
}

#[test]
fn recycled_pid_is_not_killed() {
    let dir = tempfile::tempdir().unwrap();
    let bystander = sleeper();
    // The journal says the handoff started a minute from now: a process
    // that already exists cannot be the successor it spawned (its pid was
    // recycled), so it must survive.
    Journal::new(dir.path())
        .write(&record(Some(bystander.pid()), now_ms() + 60_000))
        .unwrap();
    let r = resume_from_journal(
        dir.path(),
        &dir.path().join("c.sock"),
        Duration::from_millis(50),
        Duration::ZERO,
    )
    .unwrap()
    .unwrap();
    assert_eq!(r.killed_successor, None);
    assert!(bystander.try_exit().is_none());
    assert!(bystander.kill_and_reap(Duration::from_secs(10)).is_some());
}

/// A supervisor that lost everything (its process died) gets the listeners
/// back from the incumbent, adopts it, and can hand off again.
#[test]
fn reattach_fetches_listeners_and_hands_off_again() {
    use handoff::{reattach, HandoffOptions, Listener, Program, Supervisor, SupervisorConfig};
    use std::net::TcpListener;
    let peer = common::example_bin("peer");
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let cfg = SupervisorConfig::new(&state, dir.path().join("control.sock"));
    let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = tcp.local_addr().unwrap();
    let tag = format!("reattach-{}", std::process::id());
    let program = Program::new(&peer).arg("good").arg(&tag);

    let first = Supervisor::new(
        cfg.clone(),
        vec![Listener {
            name: "http".into(),
            fd: tcp.into(),
        }],
    )
    .unwrap();
    let r = first.start(&program, &mut |_| {}).unwrap();
    let incumbent = first.incumbent().unwrap();
    // The supervisor "crashes": its listener copies are gone with it.
    drop(first);

    let back = reattach(&cfg, Duration::from_secs(5))
        .unwrap()
        .expect("an incumbent to re-attach to");
    assert_eq!(back.pid, r.new_pid);
    assert_eq!(back.build_id, "peer");
    assert_eq!(back.listeners.len(), 1);
    assert_eq!(back.listeners[0].name, "http");
    let l = TcpListener::from(back.listeners[0].fd.try_clone().unwrap());
    assert_eq!(l.local_addr().unwrap(), addr, "not the same socket");

    let second = Supervisor::new(cfg, back.listeners).unwrap();
    second.adopt_incumbent(back.pid, &back.build_id).unwrap();
    let r2 = second
        .perform_handoff(&program, HandoffOptions::default(), &mut |_| {})
        .unwrap();
    assert_eq!(r2.old_pid, Some(r.new_pid));
    // The old incumbent retires (it is still the first supervisor's child:
    // our reaper thread for it collects it).
    assert!(incumbent.wait_timeout(Duration::from_secs(10)).is_some());
    let newest = second.incumbent().unwrap();
    assert!(newest.kill_and_reap(Duration::from_secs(10)).is_some());
}

/// An orphaned successor that exits by itself within the grace (it saw its
/// supervisor hang up and is finishing what it accepted) is left to finish,
/// not killed mid-request.
#[test]
fn orphan_exiting_within_the_grace_is_not_killed() {
    let dir = tempfile::tempdir().unwrap();
    // Stands for a successor finishing its last requests: it exits on its
    // own, cleanly, a little after the restarted supervisor looks.
    let c = Command::new("sleep").arg("0.3").spawn().unwrap();
    let pid = c.id();
    std::mem::forget(c);
    let orphan = Child::adopt(pid).unwrap();
    Journal::new(dir.path())
        .write(&record(Some(orphan.pid()), now_ms() - 500))
        .unwrap();
    let r = resume_from_journal(
        dir.path(),
        &dir.path().join("c.sock"),
        Duration::from_millis(50),
        Duration::from_secs(30),
    )
    .unwrap()
    .unwrap();
    assert_eq!(r.killed_successor, None);
    let exit = orphan.wait_timeout(Duration::from_secs(10));
    assert!(exit.is_some(), "it has exited");
    assert_ne!(
        exit,
        Some(handoff::Exit::Signal(libc::SIGKILL)),
        "it finished by itself"
    );
    assert_eq!(Journal::new(dir.path()).read().unwrap(), None);
}
