//! A writer killed while holding the shared region's lock must never wedge
//! anyone (docs/design.md §8.3). Every case wedges the lock with a *real* process's
//! identity — an `examples/shm_peer.rs` child that took the lock and was
//! SIGKILLed and reaped — and then checks that recovery completes within a
//! watchdog budget, on the write path and on the read path, for both
//! sequence parities.

use crate::shm_support;

use std::time::{Duration, Instant};

use handoff::shm::layout::{OWNER_OFFSET, SEQ_OFFSET};
use handoff::shm::{OwnerId, OwnerState, Region, ShmError};
use shm_support::*;

/// Recovery must finish well within this; a wedge fails the test here
/// instead of hanging it.
const WATCHDOG: Duration = Duration::from_secs(5);
const STARTUP: Duration = Duration::from_secs(10);

/// Has a peer take the lock (and, for `odd`, write half a record), then
/// SIGKILLs and reaps it. Returns the region and the dead owner's identity,
/// having checked the lock word names it.
fn wedge(dir: &std::path::Path, parity: &str) -> (Region, OwnerId) {
    let r = region(dir);
    {
        let mut g = r.lock();
        g.replace(&[0x11; 64]).unwrap();
    }
    let mut p = Peer::spawn(&["hold", dir.to_str().unwrap(), parity]);
    p.expect("locked", STARTUP);
    let id = match r.lock_state().owner {
        OwnerState::Held(id) => id,
        other => panic!("lock not held by the peer: {other}"),
    };
    assert_eq!(id.pid(), p.pid);
    assert_eq!(OwnerId::of_process(p.pid), Some(id));
    assert!(killed_by_sigkill(p.kill()));
    let st = r.lock_state();
    assert_eq!(
        st.owner,
        OwnerState::Held(id),
        "the dead owner still holds it"
    );
    assert_eq!(st.seq % 2, u64::from(parity == "odd"), "{st:?}");
    (r, id)
}

fn assert_recovered(r: &Region, dead: OwnerId, recoveries: u64) {
    let st = r.lock_state();
    assert_eq!(st.owner, OwnerState::Free);
    assert_eq!(st.seq % 2, 0);
    assert_eq!(st.recoveries, recoveries);
    assert_eq!(st.last_recovered, OwnerState::Held(dead));
}

#[test]
fn dead_writer_even_parity_write_path() {
    let dir = tempfile::tempdir().unwrap();
    let (r, dead) = wedge(dir.path(), "even");
    let t = Instant::now();
    let g = r.lock_within(WATCHDOG).expect("recovery on the write path");
    eprintln!("recovered in {:?}", t.elapsed());
    // Nothing was written under the dead owner: the record is intact.
    assert!(g.is_consistent());
    drop(g);
    assert_recovered(&r, dead, 1);
    let mut buf = [0u8; 64];
    r.read(&mut buf).unwrap();
    assert_eq!(buf, [0x11; 64]);
}

#[test]
fn dead_writer_odd_parity_write_path() {
    let dir = tempfile::tempdir().unwrap();
    let (r, dead) = wedge(dir.path(), "odd");
    let mut g = r.lock_within(WATCHDOG).expect("recovery on the write path");
    // The half-written record is detectably torn; rewrite it whole.
    assert!(!g.is_consistent());
    g.replace(&[0x22; 64]).unwrap();
    drop(g);
    assert_recovered(&r, dead, 1);
    let mut buf = [0u8; 64];
    r.read(&mut buf).unwrap();
    assert_eq!(buf, [0x22; 64]);
}

#[test]
fn dead_writer_odd_parity_read_path() {
    let dir = tempfile::tempdir().unwrap();
    let (r, dead) = wedge(dir.path(), "odd");
    let mut buf = [0u8; 64];
    // The reader recovers the lock, then rejects the torn record.
    match r.read_within(&mut buf, WATCHDOG) {
        Err(ShmError::TornRecord { seq, .. }) => assert_eq!(seq % 2, 0),
        other => panic!("expected a rejected torn record, got {other:?}"),
    }
    assert_recovered(&r, dead, 1);
    // Still torn (readers never repair data), until a writer rewrites it.
    assert!(matches!(r.read(&mut buf), Err(ShmError::TornRecord { .. })));
    r.lock().replace(&[0x33; 64]).unwrap();
    r.read(&mut buf).unwrap();
    assert_eq!(buf, [0x33; 64]);
}

#[test]
fn dead_writer_even_parity_read_path() {
    let dir = tempfile::tempdir().unwrap();
    let (r, dead) = wedge(dir.path(), "even");
    // An even sequence means no write was in progress: readers are not
    // wedged at all, and get the intact record at once.
    let mut buf = [0u8; 64];
    r.read_within(&mut buf, WATCHDOG)
        .expect("read past a dead even-parity owner");
    assert_eq!(buf, [0x11; 64]);
    assert_eq!(r.lock_state().owner, OwnerState::Held(dead));
    // The lock itself is recovered by the next writer, in another process.
    let mut w = Peer::spawn(&["lock", dir.path().to_str().unwrap()]);
    w.expect("locked", STARTUP);
    assert!(w.wait(WATCHDOG).success());
    assert_recovered(&r, dead, 1);
}

/// The recoverer is killed (by the `mid-recovery` test hook) right after
/// stamping its own identity over the dead owner's: the lock now names a
/// second dead process, and the next waiter must recover it in turn.
fn recoverer_killed_mid_recovery(path_mode: &str) {
    let dir = tempfile::tempdir().unwrap();
    let (r, first) = wedge(dir.path(), "odd");
    let mut rec = Peer::spawn_env(
        &[path_mode, dir.path().to_str().unwrap()],
        &[("HANDOFF_SHM_HOOK", "mid-recovery")],
    );
    assert!(killed_by_sigkill(rec.wait(WATCHDOG)));
    let st = r.lock_state();
    let second = match st.owner {
        OwnerState::Held(id) => id,
        other => panic!("expected the recoverer's stamp, got {other}"),
    };
    assert_eq!(second.pid(), rec.pid, "{st:?}");
    assert_ne!(second, first);
    assert_eq!(st.seq % 2, 1, "killed before forcing parity: {st:?}");
    assert_eq!(st.recoveries, 0);

    // Recovered in turn: on the write path ...
    let g = r.lock_within(WATCHDOG).expect("recovering the recoverer");
    assert!(!g.is_consistent());
    drop(g);
    assert_recovered(&r, second, 1);
}

#[test]
fn recoverer_killed_mid_recovery_on_the_write_path_is_recovered() {
    recoverer_killed_mid_recovery("lock");
}

#[test]
fn recoverer_killed_mid_recovery_on_the_read_path_is_recovered() {
    recoverer_killed_mid_recovery("read");
}

#[test]
fn a_recoverer_killed_mid_recovery_is_recovered_by_a_reader() {
    let dir = tempfile::tempdir().unwrap();
    let (r, _) = wedge(dir.path(), "odd");
    let mut rec = Peer::spawn_env(
        &["lock", dir.path().to_str().unwrap()],
        &[("HANDOFF_SHM_HOOK", "mid-recovery")],
    );
    assert!(killed_by_sigkill(rec.wait(WATCHDOG)));
    let second = match r.lock_state().owner {
        OwnerState::Held(id) => id,
        other => panic!("{other}"),
    };
    assert!(matches!(
        r.read_within(&mut [0u8; 64], WATCHDOG),
        Err(ShmError::TornRecord { .. })
    ));
    assert_recovered(&r, second, 1);
}

/// A live process owns the recorded pid, but with a different start time:
/// the pid was reused, and the recorded owner is gone. `kill(pid, 0)` alone
/// would say "alive" and wedge everyone.
#[cfg(target_os = "linux")] // start times come from /proc
#[test]
fn pid_reuse_cannot_fool_the_liveness_check() {
    let dir = tempfile::tempdir().unwrap();
    let r = region(dir.path());
    let file = dir.path().join(NAME);
    let mut stranger = Peer::spawn(&["idle"]);
    stranger.expect("ready", STARTUP);
    let real = OwnerId::of_process(stranger.pid).unwrap();
    assert_ne!(
        real.guard(),
        0,
        "start times are available on this platform"
    );
    let reused = OwnerId::from_parts(stranger.pid, real.guard() ^ 0x10).unwrap();

    // Write path.
    plant(&file, OWNER_OFFSET, reused.word());
    drop(r.lock_within(WATCHDOG).expect("recovering a reused pid"));
    assert_recovered(&r, reused, 1);
    // Read path, with a write "in progress".
    plant(&file, OWNER_OFFSET, reused.word());
    plant(&file, SEQ_OFFSET, r.lock_state().seq + 1);
    r.read_within(&mut [0u8; 64], WATCHDOG)
        .expect("recovering a reused pid on the read path");
    assert_recovered(&r, reused, 2);
    assert_eq!(
        proc_state(stranger.pid).map(|c| c != 'Z'),
        Some(true),
        "never signalled"
    );

    // The converse: the genuine identity of a live process is never broken.
    plant(&file, OWNER_OFFSET, real.word());
    match r.lock_within(Duration::from_millis(200)) {
        Err(ShmError::Busy { owner, .. }) => assert_eq!(owner, OwnerState::Held(real)),
        other => panic!("broke a live holder's lock: {:?}", other.map(|_| ())),
    }
    plant(&file, SEQ_OFFSET, r.lock_state().seq + 1);
    assert!(matches!(
        r.read_within(&mut [0u8; 64], Duration::from_millis(200)),
        Err(ShmError::Busy { .. })
    ));
    assert_eq!(r.lock_state().recoveries, 2);
    stranger.kill();
    // Once it is really gone, it is recovered.
    r.read_within(&mut [0u8; 64], WATCHDOG).unwrap();
    assert_recovered(&r, real, 3);
}

/// A killed owner nobody has reaped yet still answers `kill(pid, 0)`; its
/// zombie state gives it away.
#[cfg(target_os = "linux")] // zombie state comes from /proc
#[test]
fn zombie_owner_is_recovered() {
    let dir = tempfile::tempdir().unwrap();
    let r = region(dir.path());
    let mut p = Peer::spawn(&["hold", dir.path().to_str().unwrap(), "odd"]);
    p.expect("locked", STARTUP);
    let id = OwnerId::of_process(p.pid).unwrap();
    p.kill_leave_zombie();
    poll(WATCHDOG, "the peer to become a zombie", || {
        proc_state(p.pid) == Some('Z')
    });
    assert!(matches!(
        r.read_within(&mut [0u8; 64], WATCHDOG),
        Err(ShmError::TornRecord { .. })
    ));
    assert_recovered(&r, id, 1);
    assert!(killed_by_sigkill(p.wait(WATCHDOG)));
}

/// Owner words no process can have written, planted through the file:
/// never probed (pid 0 is our process group, -1 every process), and
/// recovered like dead owners on both paths.
#[test]
fn corrupt_owner_words_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let r = region(dir.path());
    let file = dir.path().join(NAME);
    let words = [
        0x8000_0001_0000_0000u64, // pid 0
        0x0000_0000_ffff_ffff,    // pid -1
        0x8000_0001_ffff_fffe,    // pid -2
        0x0000_0000_8000_0000,    // pid i32::MIN
    ];
    let mut n = 0;
    for w in words {
        plant(&file, OWNER_OFFSET, w);
        assert_eq!(r.lock_state().owner, OwnerState::Corrupt(w));
        drop(r.lock_within(WATCHDOG).unwrap());
        n += 1;
        plant(&file, OWNER_OFFSET, w);
        plant(&file, SEQ_OFFSET, r.lock_state().seq + 1);
        r.read_within(&mut [0u8; 64], WATCHDOG).unwrap();
        n += 1;
        let st = r.lock_state();
        assert_eq!(st.recoveries, n);
        assert_eq!(st.last_recovered, OwnerState::Corrupt(w));
        assert_eq!(st.owner, OwnerState::Free);
    }
}
