//! The region file: every malformed file is a typed error (and is left
//! untouched), and separate processes creating and using one region at the
//! same moment all end up sharing a single file.

use crate::shm_support;

use std::time::Duration;

use handoff::shm::layout::{HEADER_LEN, LAYOUT_VERSION, MAGIC};
use handoff::shm::{Region, RegionSpec, ShmError};
use shm_support::*;

fn valid_bytes() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    drop(region(dir.path()));
    std::fs::read(dir.path().join(NAME)).unwrap()
}

/// Puts `bytes` at the region's name and opens it.
fn open_bytes(bytes: &[u8]) -> (Result<Region, ShmError>, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(NAME);
    std::fs::write(&path, bytes).unwrap();
    let r = Region::open_or_create(dir.path(), NAME, SPEC);
    let after = std::fs::read(&path).unwrap();
    (r, after)
}

#[test]
fn malformed_files_are_typed_errors_and_left_alone() {
    let good = valid_bytes();
    assert_eq!(good.len(), HEADER_LEN + 64);
    assert_eq!(&good[..8], &MAGIC);
    assert!(open_bytes(&good).0.is_ok());

    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", vec![]),
        ("foreign", b"#!/bin/sh\necho not a region\n".to_vec()),
        ("truncated header", good[..40].to_vec()),
        ("truncated payload", good[..HEADER_LEN + 10].to_vec()),
        ("too long", [good.clone(), vec![0; 8]].concat()),
    ];
    let mut v = good.clone();
    v[8..12].copy_from_slice(&(LAYOUT_VERSION + 1).to_le_bytes());
    cases.push(("version", v));
    let mut v = good.clone();
    v[24] ^= 0xff; // schema byte: header crc no longer matches
    cases.push(("header crc", v));

    for (what, bytes) in cases {
        let (r, after) = open_bytes(&bytes);
        let e = match r {
            Err(e) => e,
            Ok(_) => panic!("{what}: opened"),
        };
        let ok = match what {
            "empty" | "truncated header" | "truncated payload" => {
                matches!(e, ShmError::Truncated { .. })
            }
            "foreign" => matches!(e, ShmError::Foreign { .. }),
            "version" => {
                matches!(e, ShmError::Version { found, .. } if found == LAYOUT_VERSION + 1)
            }
            _ => matches!(e, ShmError::HeaderCorrupt { .. }),
        };
        assert!(ok, "{what}: {e}");
        assert!(e.to_string().contains(NAME), "{what}: {e}");
        assert_eq!(after, bytes, "{what}: the file was modified");
    }

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(NAME), &good).unwrap();
    assert!(matches!(
        Region::open_or_create(dir.path(), NAME, RegionSpec::new(32, SPEC.schema)),
        Err(ShmError::SizeMismatch {
            found: 64,
            requested: 32,
            ..
        })
    ));
}

#[test]
fn processes_racing_to_create_share_one_region() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let mut peers: Vec<Peer> = (0..4).map(|_| Peer::spawn(&["lock", d])).collect();
    for p in &mut peers {
        p.expect("locked", Duration::from_secs(10));
        assert!(p.wait(Duration::from_secs(10)).success());
    }
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, vec![NAME.to_string()], "one file, no leftovers");
    let r = Region::open(dir.path(), NAME, Some(SPEC)).unwrap();
    let st = r.lock_state();
    assert_eq!(st.seq, 8, "four complete writes, all to the same file");
    assert_eq!(st.recoveries, 0);
    // The last writer's record, whole.
    let mut buf = [0u8; 64];
    r.read(&mut buf).unwrap();
    let v = u64::from_ne_bytes(buf[..8].try_into().unwrap());
    assert!(peers.iter().any(|p| u64::from(p.pid) == v), "{v}");
}
