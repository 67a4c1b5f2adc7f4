//! In-process tests of the region: format, byte access, threads. The
//! cross-process cases (dead owners, pid reuse, stress) are in
//! `tests/shm_*.rs` with real processes.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Barrier};
use std::time::Duration;

use super::*;

const SPEC: RegionSpec = RegionSpec {
    payload_len: 64,
    schema: 0x5445_5354,
};

fn fresh() -> (tempfile::TempDir, Region) {
    let dir = tempfile::tempdir().unwrap();
    let r = Region::open_or_create(dir.path(), "state", SPEC).unwrap();
    (dir, r)
}

#[test]
fn fresh_region_reads_zero_and_writes_round_trip() {
    let (dir, r) = fresh();
    let mut buf = [1u8; 64];
    assert_eq!(r.read(&mut buf).unwrap(), 0);
    assert_eq!(buf, [0u8; 64]);
    {
        let mut g = r.lock();
        assert!(g.is_consistent());
        g.replace(&[7u8; 64]).unwrap();
        assert_eq!(g.add_u64(1, 5).unwrap(), 0x0707_0707_0707_070c);
    }
    let seq = r.read(&mut buf).unwrap();
    assert_eq!(seq, 2);
    assert_eq!(&buf[..8], &[7u8; 8]);
    assert_eq!(
        u64::from_ne_bytes(buf[8..16].try_into().unwrap()),
        0x0707_0707_0707_070c
    );
    // A second mapping (another open) sees the same record.
    let r2 = Region::open(dir.path(), "state", Some(SPEC)).unwrap();
    let mut b2 = [0u8; 64];
    assert_eq!(r2.read(&mut b2).unwrap(), 2);
    assert_eq!(b2, buf);
    let st = r2.lock_state();
    assert_eq!(st.owner, OwnerState::Free);
    assert_eq!(st.recoveries, 0);
}

#[test]
fn a_guard_that_writes_nothing_leaves_the_sequence_alone() {
    let (_d, r) = fresh();
    drop(r.lock());
    assert_eq!(r.lock_state().seq, 0);
    let g = r.lock();
    assert_eq!(g.load_u64(7).unwrap(), 0);
    assert!(g.load_u64(8).is_err());
    drop(g);
    assert_eq!(r.lock_state().seq, 0);
}

#[test]
fn unaligned_byte_access_and_bounds() {
    let dir = tempfile::tempdir().unwrap();
    let r = Region::open_or_create(dir.path(), "odd", RegionSpec::new(14, 1)).unwrap();
    let mut g = r.lock();
    g.write(3, b"hello world").unwrap();
    assert!(matches!(
        g.write(3, b"hello world!"),
        Err(ShmError::OutOfBounds { .. })
    ));
    assert!(g.write(usize::MAX, b"x").is_err());
    let mut part = [0u8; 5];
    g.read(9, &mut part).unwrap();
    assert_eq!(&part, b"world");
    drop(g);
    let mut buf = [0u8; 14];
    r.read(&mut buf).unwrap();
    assert_eq!(&buf, b"\0\0\0hello world");
    assert!(matches!(
        r.read(&mut [0u8; 12]),
        Err(ShmError::BufferSize { .. })
    ));
}

#[test]
fn open_checks_spec_name_and_existence() {
    let (dir, _r) = fresh();
    let d = dir.path();
    assert!(matches!(
        Region::open_or_create(d, "state", RegionSpec::new(65, SPEC.schema)),
        Err(ShmError::SizeMismatch {
            found: 64,
            requested: 65,
            ..
        })
    ));
    assert!(matches!(
        Region::open(d, "state", Some(RegionSpec::new(64, 1))),
        Err(ShmError::SchemaMismatch { .. })
    ));
    assert_eq!(
        Region::open(d, "state", None).unwrap().schema(),
        SPEC.schema
    );
    assert!(matches!(
        Region::open(d, "nope", None),
        Err(ShmError::NotFound { .. })
    ));
    for bad in ["", ".hidden", "a/b", ".."] {
        assert!(matches!(
            Region::open_or_create(d, bad, SPEC),
            Err(ShmError::InvalidName { .. })
        ));
    }
    assert!(matches!(
        Region::open_or_create(d, "big", RegionSpec::new(0, 0)),
        Err(ShmError::PayloadSize { .. })
    ));
    // No temporary files are left behind.
    let names: Vec<_> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, vec!["state".to_string()]);
}

#[test]
fn concurrent_creators_share_one_file() {
    let dir = tempfile::tempdir().unwrap();
    let n = 8;
    let barrier = Arc::new(Barrier::new(n));
    let path = Arc::new(dir.path().to_path_buf());
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let (b, p) = (barrier.clone(), path.clone());
            std::thread::spawn(move || {
                b.wait();
                let r = Region::open_or_create(&p, "race", SPEC).unwrap();
                r.lock().add_u64(i % 8, 1).unwrap();
                r
            })
        })
        .collect();
    let regions: Vec<Region> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let mut buf = [0u8; 64];
    regions[0].read(&mut buf).unwrap();
    for i in 0..8 {
        assert_eq!(
            u64::from_ne_bytes(buf[i * 8..i * 8 + 8].try_into().unwrap()),
            1
        );
    }
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn panic_in_the_critical_section_releases_and_marks_the_record_torn() {
    let (_d, r) = fresh();
    let r = Arc::new(r);
    // Panic before writing anything: the record stays valid.
    let r1 = r.clone();
    let res = std::thread::spawn(move || {
        let _g = r1.lock();
        panic!("before any write");
    })
    .join();
    assert!(res.is_err());
    assert_eq!(r.lock_state().owner, OwnerState::Free);
    r.read(&mut [0u8; 64]).unwrap();

    // Panic half-way through an update: lock free, parity even, record torn.
    let r2 = r.clone();
    let res = std::thread::spawn(move || {
        let mut g = r2.lock();
        g.write(0, &[9u8; 32]).unwrap();
        panic!("mid-write");
    })
    .join();
    assert!(res.is_err());
    let st = r.lock_state();
    assert_eq!(st.owner, OwnerState::Free);
    assert_eq!(st.seq % 2, 0);
    assert_eq!(st.recoveries, 0, "a panic is released, not recovered");
    assert!(matches!(
        r.read_within(&mut [0u8; 64], Duration::from_secs(5)),
        Err(ShmError::TornRecord { .. })
    ));
    // The next writer sees it and rewrites the record.
    let mut g = r.lock_within(Duration::from_secs(5)).unwrap();
    assert!(!g.is_consistent());
    g.replace(&[1u8; 64]).unwrap();
    drop(g);
    let mut buf = [0u8; 64];
    r.read(&mut buf).unwrap();
    assert_eq!(buf, [1u8; 64]);
}

#[test]
fn a_live_holder_is_never_broken() {
    let (_d, r) = fresh();
    let g = r.lock();
    let e = match r.lock_within(Duration::from_millis(30)) {
        Err(e) => e,
        Ok(_) => panic!("acquired a lock held by this live process"),
    };
    let msg = e.to_string();
    assert!(
        msg.contains(&format!("pid {}", std::process::id())),
        "{msg}"
    );
    assert!(matches!(e, ShmError::Busy { waited_ms, .. } if waited_ms >= 30));
    drop(g);
    drop(r.lock_within(Duration::ZERO).unwrap());
}

#[test]
fn corrupt_owner_words_are_recovered_without_probing() {
    let (_d, r) = fresh();
    let c = r.cells();
    for word in [
        // pid 0: kill(0) would signal our own process group
        0x8000_0001_0000_0000u64,
        // pid -1: kill(-1) would signal every process we may signal
        0x0000_0000_ffff_ffff,
        // other negative pid
        0x8000_0001_8000_0000,
        // guard without its marker bit
        0x0000_0005_0000_1234,
    ] {
        c.owner.store(word, Ordering::SeqCst);
        let seq = c.seq.load(Ordering::SeqCst);
        c.seq.store(seq | 1, Ordering::SeqCst);
        assert_eq!(r.lock_state().owner, OwnerState::Corrupt(word));
        let before = r.lock_state().recoveries;
        // Read path first (it recovers too), then the write path.
        assert!(matches!(
            r.read_within(&mut [0u8; 64], Duration::from_secs(5)),
            Ok(_) | Err(ShmError::TornRecord { .. })
        ));
        assert_eq!(r.lock_state().recoveries, before + 1);
        assert_eq!(r.lock_state().last_recovered, OwnerState::Corrupt(word));
        c.owner.store(word, Ordering::SeqCst);
        drop(r.lock_within(Duration::from_secs(5)).unwrap());
        assert_eq!(r.lock_state().recoveries, before + 2);
        assert_eq!(r.lock_state().owner, OwnerState::Free);
        assert_eq!(r.lock_state().seq % 2, 0);
    }
}

#[test]
fn odd_sequence_with_a_free_lock_is_repaired_by_a_reader() {
    let (_d, r) = fresh();
    let c = r.cells();
    c.seq.store(5, Ordering::SeqCst);
    assert_eq!(
        r.read_within(&mut [0u8; 64], Duration::from_secs(5))
            .unwrap(),
        6
    );
    assert_eq!(r.lock_state().owner, OwnerState::Free);
    // And a writer stepping past an odd sequence keeps parity right.
    c.seq.store(7, Ordering::SeqCst);
    r.lock().store_u64(0, 1).unwrap();
    assert_eq!(r.lock_state().seq, 10);
}

#[test]
fn threads_never_see_a_torn_record() {
    let (_d, r) = fresh();
    let r = Arc::new(r);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (0..2u64)
        .map(|t| {
            let (r, stop) = (r.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut v = t << 48;
                while !stop.load(Ordering::Relaxed) {
                    v += 1;
                    let mut g = r.lock();
                    for i in 0..8 {
                        g.store_u64(i, v ^ i as u64).unwrap();
                    }
                }
            })
        })
        .collect();
    let mut buf = [0u8; 64];
    let mut seen = 0u64;
    let deadline = std::time::Instant::now() + Duration::from_millis(300);
    while std::time::Instant::now() < deadline {
        if r.read_within(&mut buf, Duration::from_secs(5)).unwrap() == 0 {
            continue; // the initial all-zero record
        }
        let w: Vec<u64> = buf
            .chunks(8)
            .map(|c| u64::from_ne_bytes(c.try_into().unwrap()))
            .collect();
        for (i, x) in w.iter().enumerate() {
            assert_eq!(*x, w[0] ^ i as u64, "torn: {w:x?}");
        }
        seen += 1;
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
    assert!(seen > 0);
}

/// Issue 14, item 10: a region file cut short (`truncate -s 0`, or
/// short of its payload) before a process opens it is refused, with
/// the fix in the message, never mapped short (a touch past its end
/// would be SIGBUS) and never rewritten.
#[test]
fn a_truncated_file_is_refused_before_mapping_and_says_what_to_do() {
    // (Here rather than in file.rs, which sits below Region.)
    const SPEC: RegionSpec = RegionSpec {
        payload_len: 560,
        schema: 7,
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.shm");
    drop(Region::open_or_create(dir.path(), "r.shm", SPEC).unwrap());
    let full = std::fs::read(&path).unwrap();
    for len in [0, layout::HEADER_LEN as u64 + 8] {
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(len).unwrap();
        drop(f);
        let e = match Region::open_or_create(dir.path(), "r.shm", SPEC) {
            Err(e) => e,
            Ok(_) => panic!("a {len}-byte region file was mapped"),
        };
        assert!(matches!(e, ShmError::Truncated { .. }), "{len}: {e}");
        let msg = e.to_string();
        assert!(
            msg.contains(&path.display().to_string())
                && msg.contains(&format!("{len} bytes"))
                && msg.contains("remove it"),
            "{msg}"
        );
        assert_eq!(std::fs::metadata(&path).unwrap().len(), len, "rewritten");
        // Removed, as the message says: the next open creates it anew.
        std::fs::remove_file(&path).unwrap();
        drop(Region::open_or_create(dir.path(), "r.shm", SPEC).unwrap());
        assert_eq!(std::fs::read(&path).unwrap(), full);
    }
}
