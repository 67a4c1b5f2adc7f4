//! The restart lock across real processes (`examples/shm_peer.rs`):
//! exactly one holder at a time, a dead holder's lock released by the
//! kernel, and a waiter's timeout naming the live holder.

use crate::shm_support;

use std::time::{Duration, Instant};

use handoff::restart_lock::{RestartLock, RestartLockError};
use shm_support::*;

#[test]
fn two_contending_processes_never_hold_it_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let log = dir.path().join("holders.log");
    let l = log.to_str().unwrap();
    let n = 25;
    let mut a = Peer::spawn(&["restart-contend", d, l, &n.to_string()]);
    let mut b = Peer::spawn(&["restart-contend", d, l, &n.to_string()]);
    for p in [&mut a, &mut b] {
        p.expect("done", Duration::from_secs(60));
        assert!(p.wait(Duration::from_secs(10)).success());
    }
    // The log is the shared counter: +1 on entry, -1 on exit. It must
    // never exceed 1, and every exit must match the entry before it.
    let text = std::fs::read_to_string(&log).unwrap();
    let mut inside: Option<&str> = None;
    let mut entries = 0;
    let mut tokens = std::collections::HashSet::new();
    for line in text.lines() {
        let (sign, rest) = line.split_at(1);
        match (sign, inside) {
            ("+", None) => {
                inside = Some(rest);
                entries += 1;
                assert!(tokens.insert(rest.to_string()), "token reused: {line}");
            }
            ("-", Some(who)) if who == rest => inside = None,
            _ => panic!("two holders at once at {line:?} (inside: {inside:?})\n{text}"),
        }
    }
    assert_eq!(inside, None);
    assert_eq!(entries, 2 * n);
    for p in [a.pid, b.pid] {
        assert!(text.contains(&format!("+{p} ")), "{p} never held it");
    }
}

#[test]
fn holder_death_releases_and_the_timeout_names_the_live_holder() {
    let dir = tempfile::tempdir().unwrap();
    let mut holder = Peer::spawn(&["restart-hold", dir.path().to_str().unwrap()]);
    let line = holder.expect("held ", Duration::from_secs(10));
    let token = line.trim_start_matches("held ").to_string();

    let t = Instant::now();
    let e = RestartLock::acquire(dir.path(), Duration::from_millis(150)).unwrap_err();
    assert!(t.elapsed() >= Duration::from_millis(150));
    let msg = e.to_string();
    eprintln!("{msg}");
    match &e {
        RestartLockError::Busy {
            holder: Some(h), ..
        } => {
            assert_eq!(h.pid, holder.pid);
            assert_eq!(h.token, token);
            assert_eq!(h.note, "shm_peer restart-hold");
            assert!(h.start_time_ms.is_some());
        }
        other => panic!("expected Busy naming the holder, got {other}"),
    }
    for needle in [
        format!("pid {}", holder.pid),
        token.clone(),
        "since ".into(),
    ] {
        assert!(msg.contains(&needle), "{needle:?} missing from: {msg}");
    }
    // Still held: a timeout never breaks a live holder.
    assert!(RestartLock::is_held(dir.path()).unwrap());

    assert!(killed_by_sigkill(holder.kill()));
    let t = Instant::now();
    let mine = RestartLock::acquire(dir.path(), Duration::from_secs(5))
        .expect("released by the kernel when the holder died");
    eprintln!("acquired {:?} after the holder's death", t.elapsed());
    assert_ne!(mine.token(), token);
    assert_eq!(mine.holder().pid, std::process::id());
    // The stale record of the dead holder was replaced.
    assert_eq!(
        RestartLock::recorded_holder(dir.path()).map(|h| h.token),
        Some(mine.token().to_string())
    );
}
