//! Several writer and reader processes share one region while writers are
//! SIGKILLed at random — mostly mid-record, since they write slowly. For a
//! bounded time (4 s; `HANDOFF_SHM_STRESS_SECS` for longer): no reader ever
//! accepts a torn record, and the system never wedges (writes keep
//! completing after every kill; every reader finishes on time).

use crate::shm_support;

use std::time::{Duration, Instant};

use shm_support::*;

const WRITERS: usize = 2;
const READERS: usize = 2;

/// xorshift64*: reproducible from the printed seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

#[test]
fn writers_killed_at_random_never_tear_a_read_or_wedge() {
    let secs: u64 = std::env::var("HANDOFF_SHM_STRESS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4);
    let run = Duration::from_secs(secs);
    let seed = std::env::var("HANDOFF_SHM_STRESS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
                | 1
        });
    eprintln!("stress: {secs} s, seed {seed} (HANDOFF_SHM_STRESS_SEED)");
    let mut rng = Rng(seed);

    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap().to_string();
    let r = region(dir.path());
    let start = Instant::now();
    let ms = |left: Duration| left.as_millis().max(1).to_string();

    let mut readers: Vec<Peer> = (0..READERS)
        .map(|_| Peer::spawn(&["stress-reader", &d, &ms(run)]))
        .collect();
    let mut writers: Vec<Peer> = (0..WRITERS)
        .map(|_| Peer::spawn(&["stress-writer", &d, &ms(run)]))
        .collect();

    let mut kills = 0u32;
    loop {
        let left = run.saturating_sub(start.elapsed());
        if left < Duration::from_millis(100) {
            break;
        }
        // Let a few writes complete — this is also the no-wedge check: after
        // every kill, some writer must recover the lock and write again.
        let want = 2 + rng.next() % 10;
        let from = r.lock_state().seq / 2;
        poll(Duration::from_secs(5), "writes to continue", || {
            r.lock_state().seq / 2 >= from + want
        });
        let i = (rng.next() % WRITERS as u64) as usize;
        let status = writers[i].kill();
        if killed_by_sigkill(status) {
            kills += 1;
        }
        let left = run.saturating_sub(start.elapsed());
        writers[i] = Peer::spawn(&["stress-writer", &d, &ms(left)]);
    }

    let mut total_ok = 0u64;
    let mut total_torn = 0u64;
    for p in &mut readers {
        let status = p.wait(Duration::from_secs(20));
        let lines = p.rest_of_output(Duration::from_secs(10));
        assert!(
            !lines.iter().any(|l| l.starts_with("ACCEPTED-TORN")),
            "a reader accepted a torn record: {lines:?}"
        );
        assert!(
            status.success(),
            "reader {} failed: {status:?} {lines:?}",
            p.pid
        );
        let stats = lines
            .iter()
            .find(|l| l.starts_with("reader "))
            .unwrap_or_else(|| panic!("no stats from reader {}: {lines:?}", p.pid));
        eprintln!("{stats}");
        let field = |name: &str| -> u64 {
            stats
                .split_whitespace()
                .find_map(|f| f.strip_prefix(name))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        total_ok += field("ok=");
        total_torn += field("torn_rejected=");
    }
    for p in &mut writers {
        let status = p.wait(Duration::from_secs(20));
        assert!(status.success(), "writer {} failed: {status:?}", p.pid);
    }
    let st = r.lock_state();
    eprintln!(
        "stress: {kills} writers killed, {} recoveries, {} writes, reads ok {total_ok}, torn records rejected {total_torn}",
        st.recoveries,
        st.seq / 2
    );
    assert!(total_ok > 0, "readers made no progress");
    assert!(kills > 0);
    // The writers hold the lock most of the time, so kills land inside the
    // critical section; over a whole run at least one must have.
    assert!(st.recoveries > 0, "no kill hit a lock holder: {st:?}");
}
