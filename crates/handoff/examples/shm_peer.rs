//! A process for the shared-region and restart-lock tests and benchmark:
//! each mode does one thing to a region (or the restart lock) in `DIR` so
//! tests can kill a real process at a precise point.
//!
//! ```text
//! shm_peer hold DIR even|odd     lock; odd: also write half a record; "locked"; park
//! shm_peer lock DIR              lock (10 s budget), write a full record; "locked"; exit
//! shm_peer read DIR              read (10 s budget); "read ok|torn"; exit
//! shm_peer idle                  "ready"; park
//! shm_peer stress-writer DIR MS  write slow records for MS ms
//! shm_peer stress-reader DIR MS  read and check records for MS ms
//! shm_peer restart-hold DIR      take the restart lock; "held TOKEN"; park
//! shm_peer restart-contend DIR LOG N   N times: lock, log "+pid", work, log "-pid", unlock
//! ```
//!
//! Records in stress modes are 8 words `v ^ (i * K)`, so a reader can tell
//! a torn record without the checksum. Exit codes: 0 ok, 2 a torn record
//! was accepted, 3 wedged (a bounded wait ran out), 4 other error.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use handoff::restart_lock::RestartLock;
use handoff::shm::{Region, RegionSpec, ShmError};

/// The region every mode uses: 64-byte payload.
const SPEC: RegionSpec = RegionSpec {
    payload_len: 64,
    schema: 0x5045_4552,
};
const NAME: &str = "state";
const K: u64 = 0x9E37_79B9_7F4A_7C15;

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn park() -> ! {
    loop {
        std::thread::park();
    }
}

fn fail(code: i32, msg: &str) -> ! {
    eprintln!("shm_peer[{}]: {msg}", std::process::id());
    std::process::exit(code)
}

fn region(dir: &str) -> Region {
    Region::open_or_create(Path::new(dir), NAME, SPEC)
        .unwrap_or_else(|e| fail(4, &format!("open: {e}")))
}

fn record(v: u64) -> [u8; 64] {
    let mut b = [0u8; 64];
    for (i, c) in b.chunks_mut(8).enumerate() {
        c.copy_from_slice(&(v ^ (i as u64).wrapping_mul(K)).to_ne_bytes());
    }
    b
}

fn well_formed(b: &[u8; 64]) -> bool {
    let v = u64::from_ne_bytes(b[..8].try_into().unwrap_or([0; 8]));
    *b == record(v) || *b == [0u8; 64]
}

fn ms_arg(s: Option<&String>) -> Duration {
    Duration::from_millis(s.and_then(|s| s.parse().ok()).unwrap_or(1000))
}

/// A little CPU work, standing in for computing a record field.
fn work(iters: u32) {
    for _ in 0..iters {
        std::hint::spin_loop();
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mode = args.first().map(String::as_str).unwrap_or("");
    let dir = args.get(1).cloned().unwrap_or_default();
    let pid = std::process::id();
    match mode {
        "hold" => {
            let r = region(&dir);
            let mut g = r.lock();
            if args.get(2).map(String::as_str) == Some("odd") {
                let half = [0xABu8; 32];
                g.write(0, &half)
                    .unwrap_or_else(|e| fail(4, &format!("write: {e}")));
            }
            say(&format!("locked {pid}"));
            park();
        }
        "lock" => {
            let r = region(&dir);
            let mut g = r
                .lock_within(Duration::from_secs(10))
                .unwrap_or_else(|e| fail(3, &format!("{e}")));
            g.replace(&record(u64::from(pid)))
                .unwrap_or_else(|e| fail(4, &format!("write: {e}")));
            drop(g);
            say("locked");
        }
        "read" => {
            let r = region(&dir);
            match r.read_within(&mut [0u8; 64], Duration::from_secs(10)) {
                Ok(_) => say("read ok"),
                Err(ShmError::TornRecord { .. }) => say("read torn"),
                Err(e) => fail(3, &format!("{e}")),
            }
        }
        "idle" => {
            say(&format!("ready {pid}"));
            park();
        }
        "stress-writer" => stress_writer(&region(&dir), ms_arg(args.get(2))),
        "stress-reader" => stress_reader(&region(&dir), ms_arg(args.get(2))),
        "restart-hold" => {
            let l = RestartLock::acquire_with_note(
                Path::new(&dir),
                Duration::from_secs(10),
                "shm_peer restart-hold",
            )
            .unwrap_or_else(|e| fail(3, &format!("{e}")));
            say(&format!("held {}", l.token()));
            park();
        }
        "restart-contend" => {
            let log = args.get(2).cloned().unwrap_or_default();
            let n: u32 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(10);
            restart_contend(Path::new(&dir), Path::new(&log), n);
        }
        _ => fail(4, &format!("unknown mode {mode:?}")),
    }
}

fn stress_writer(r: &Region, run_for: Duration) {
    let pid = u64::from(std::process::id());
    let end = Instant::now() + run_for;
    let (mut writes, mut found_torn) = (0u64, 0u64);
    while Instant::now() < end {
        let v = (pid << 32) | writes;
        let mut g = match r.lock_within(Duration::from_secs(5)) {
            Ok(g) => g,
            Err(e) => fail(3, &format!("writer wedged: {e}")),
        };
        if !g.is_consistent() {
            found_torn += 1;
        }
        // Word by word with work in between, so a SIGKILL from the test
        // usually lands mid-record.
        let rec = record(v);
        for i in 0..8 {
            let w = u64::from_ne_bytes(rec[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]));
            if let Err(e) = g.store_u64(i, w) {
                fail(4, &format!("store: {e}"));
            }
            work(2_000);
        }
        drop(g);
        writes += 1;
        // Outside the lock: leave readers a window.
        work(20_000);
    }
    say(&format!("writer writes={writes} found_torn={found_torn}"));
}

fn stress_reader(r: &Region, run_for: Duration) {
    let end = Instant::now() + run_for;
    let (mut ok, mut torn, mut max) = (0u64, 0u64, Duration::ZERO);
    let mut last_torn_seq = None;
    let mut buf = [0u8; 64];
    while Instant::now() < end {
        let t = Instant::now();
        match r.read_within(&mut buf, Duration::from_secs(5)) {
            Ok(seq) => {
                if !well_formed(&buf) {
                    say(&format!("ACCEPTED-TORN seq={seq} {buf:02x?}"));
                    std::process::exit(2);
                }
                ok += 1;
            }
            Err(ShmError::TornRecord { seq, .. }) => {
                if last_torn_seq != Some(seq) {
                    last_torn_seq = Some(seq);
                    torn += 1;
                }
            }
            Err(e) => fail(3, &format!("reader wedged: {e}")),
        }
        max = max.max(t.elapsed());
        work(200);
    }
    say(&format!(
        "reader ok={ok} torn_rejected={torn} max_read_us={}",
        max.as_micros()
    ));
}

fn restart_contend(dir: &Path, log: &Path, n: u32) {
    let pid = std::process::id();
    let append = |line: String| {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(log)
            .unwrap_or_else(|e| fail(4, &format!("log: {e}")));
        // One write(2) per line with O_APPEND: lines never interleave.
        if let Err(e) = f.write_all(line.as_bytes()) {
            fail(4, &format!("log: {e}"));
        }
    };
    for _ in 0..n {
        let l = RestartLock::acquire(dir, Duration::from_secs(20))
            .unwrap_or_else(|e| fail(3, &format!("{e}")));
        append(format!("+{pid} {}\n", l.token()));
        work(200_000);
        append(format!("-{pid} {}\n", l.token()));
        drop(l);
        // Give the other contender a chance at the lock.
        std::thread::yield_now();
    }
    say("done");
}
