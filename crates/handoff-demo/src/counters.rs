//! The demo's live counters: one fixed-size record in a shared region
//! ([`handoff::shm::Region`]) in the state dir.
//!
//! Every process of the service maps the same file, so the numbers carry
//! across every upgrade without being serialised and handed over: the new
//! process maps the region and keeps adding to it, and the old one adds its
//! last requests while it retires. The supervisor (`handoff status`) reads
//! the same counters without asking the service anything: each write of
//! the record also publishes it as JSON ([`publish`], in
//! [`PUBLISHED_NAME`]), the form any service can give `handoff status`, so
//! the supervisor needs neither this layout nor this crate.
//!
//! This module is the one definition of the record; this crate's library
//! target depends on `handoff`, `serde` and `serde_json` only (the server's
//! tokio stack is behind the binary's `server` feature).
//!
//! # Record layout (little-endian, explicit offsets — no `#[repr]`)
//!
//! ```text
//! off  len  field
//!   0    8  magic "HODEMOCT"
//!   8    4  layout version (u32)          = VERSION
//!  12    4  generation slots (u32)        = GENERATIONS
//!  16    8  requests served, all processes (u64)
//!  24    8  handoffs survived (u64)
//!  32    8  generations started (u64)
//!  40    8  last update, ms since the epoch (u64)
//!  48  32×N generation slots, ring indexed by (number - 1) % N:
//!           +0 number (u64, 1-based; 0 = empty)  +8 pid (u32)
//!           +12 flags (u32, bit 0 = took over in a handoff)
//!           +16 started, ms since the epoch (u64)  +24 requests (u64)
//! ```
//!
//! A region that was created but never written is all zeros and reads as
//! empty counters. Writers always replace the whole record under the
//! region's write lock, so a record is never half one layout and half
//! another; a layout change must bump [`VERSION`] (and so [`SCHEMA`], which
//! the region header checks before a byte of payload is read).

use std::fmt;
use std::fs::OpenOptions;
use std::io::{self, Write};
use std::path::Path;
use std::time::Duration;

use handoff::shm::{Region, RegionSpec, ShmError};
use serde::{Deserialize, Serialize};

/// File name of the region inside the state dir.
pub const REGION_NAME: &str = "handoff-demo-counters.shm";
/// File name, inside the state dir, of the counters as a service publishes
/// them for `handoff status`: one JSON object, replaced whole. The
/// supervisor reads this name (`crates/handoff-cli/src/status.rs`) without
/// knowing what is in it.
pub const PUBLISHED_NAME: &str = "service-counters.json";
/// Where [`publish`] writes before renaming over [`PUBLISHED_NAME`]; one
/// name, reused, since writers take turns under the region's lock.
const PUBLISHING_NAME: &str = ".service-counters.json.tmp";
pub const MAGIC: [u8; 8] = *b"HODEMOCT";
pub const VERSION: u32 = 1;
/// How many of the most recent generations (processes) are kept.
pub const GENERATIONS: usize = 16;

const HEADER_LEN: usize = 48;
const SLOT_LEN: usize = 32;
/// Size of the encoded record, and of the region's payload.
pub const RECORD_LEN: usize = HEADER_LEN + GENERATIONS * SLOT_LEN;
/// The region's format tag: "HDCTR" and the layout version.
pub const SCHEMA: u64 = u64::from_le_bytes(*b"HDCTR\0\0\0") | ((VERSION as u64) << 56);
pub const SPEC: RegionSpec = RegionSpec {
    payload_len: RECORD_LEN,
    schema: SCHEMA,
};

const FLAG_VIA_HANDOFF: u32 = 1;

/// The service's counters, decoded.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Requests answered by every process of the service, ever (as far as
    /// they have been flushed: each process flushes every ~100 ms and when
    /// it seals or exits).
    pub requests_served: u64,
    /// Processes that took over from a sealed predecessor in a handoff.
    pub handoffs_survived: u64,
    /// Processes that started serving: the first, each upgrade's, and each
    /// restart after a crash.
    pub generations_started: u64,
    /// When a process last wrote the record, ms since the epoch.
    pub updated_at_ms: u64,
    /// The last [`GENERATIONS`] processes, oldest first.
    pub generations: Vec<Generation>,
}

/// One process of the service, and what it served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Generation {
    /// 1 for the first process, then one more per process.
    pub number: u64,
    pub pid: u32,
    /// Whether it took over from a predecessor in a handoff (rather than
    /// being the first process, or a restart after a crash).
    pub via_handoff: bool,
    pub started_at_ms: u64,
    pub requests: u64,
}

impl Counters {
    /// Records a new process that starts serving now; returns its
    /// generation number (what [`add_requests`](Self::add_requests) takes).
    pub fn begin_generation(&mut self, pid: u32, via_handoff: bool, now_ms: u64) -> u64 {
        self.generations_started += 1;
        if via_handoff {
            self.handoffs_survived += 1;
        }
        self.generations.push(Generation {
            number: self.generations_started,
            pid,
            via_handoff,
            started_at_ms: now_ms,
            requests: 0,
        });
        let excess = self.generations.len().saturating_sub(GENERATIONS);
        self.generations.drain(..excess);
        self.updated_at_ms = now_ms;
        self.generations_started
    }

    /// Adds `delta` requests served by generation `number` (process `pid`)
    /// to the total and to its slot. If the slot has been reused since (16
    /// newer generations while this one was still retiring), only the total
    /// grows. Deltas rather than absolute values, so an old and a new
    /// process can both add without either overwriting the other.
    pub fn add_requests(&mut self, number: u64, pid: u32, delta: u64, now_ms: u64) {
        self.requests_served = self.requests_served.wrapping_add(delta);
        if let Some(g) = self
            .generations
            .iter_mut()
            .find(|g| g.number == number && g.pid == pid)
        {
            g.requests = g.requests.wrapping_add(delta);
        }
        self.updated_at_ms = now_ms;
    }

    /// The fixed-size record (exactly [`RECORD_LEN`] bytes).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; RECORD_LEN];
        b[0..8].copy_from_slice(&MAGIC);
        put_u32(&mut b, 8, VERSION);
        put_u32(&mut b, 12, GENERATIONS as u32);
        put_u64(&mut b, 16, self.requests_served);
        put_u64(&mut b, 24, self.handoffs_survived);
        put_u64(&mut b, 32, self.generations_started);
        put_u64(&mut b, 40, self.updated_at_ms);
        // Only the newest GENERATIONS fit; numbers pick their slots.
        let skip = self.generations.len().saturating_sub(GENERATIONS);
        for g in self.generations.iter().skip(skip).filter(|g| g.number > 0) {
            let off = slot_offset(g.number);
            put_u64(&mut b, off, g.number);
            put_u32(&mut b, off + 8, g.pid);
            put_u32(
                &mut b,
                off + 12,
                if g.via_handoff { FLAG_VIA_HANDOFF } else { 0 },
            );
            put_u64(&mut b, off + 16, g.started_at_ms);
            put_u64(&mut b, off + 24, g.requests);
        }
        b
    }

    /// Decodes a record. All zeros (a region created but never written)
    /// decodes as empty counters; anything else must carry the magic, this
    /// version and slot count, and slots consistent with the generation
    /// count.
    pub fn decode(b: &[u8]) -> Result<Counters, DecodeError> {
        if b.len() != RECORD_LEN {
            return Err(DecodeError::Length { got: b.len() });
        }
        if b.iter().all(|&x| x == 0) {
            return Ok(Counters::default());
        }
        if b[0..8] != MAGIC {
            return Err(DecodeError::Magic);
        }
        let version = get_u32(b, 8);
        if version != VERSION {
            return Err(DecodeError::Version { found: version });
        }
        let slots = get_u32(b, 12);
        if slots as usize != GENERATIONS {
            return Err(DecodeError::Slots { found: slots });
        }
        let mut c = Counters {
            requests_served: get_u64(b, 16),
            handoffs_survived: get_u64(b, 24),
            generations_started: get_u64(b, 32),
            updated_at_ms: get_u64(b, 40),
            generations: Vec::new(),
        };
        let oldest_kept = c
            .generations_started
            .saturating_sub(GENERATIONS as u64 - 1)
            .max(1);
        for i in 0..GENERATIONS {
            let off = HEADER_LEN + i * SLOT_LEN;
            let number = get_u64(b, off);
            if number == 0 {
                continue;
            }
            if number > c.generations_started || number < oldest_kept || slot_offset(number) != off
            {
                return Err(DecodeError::Corrupt(format!(
                    "slot {i} holds generation {number}, but {} generations started",
                    c.generations_started
                )));
            }
            c.generations.push(Generation {
                number,
                pid: get_u32(b, off + 8),
                via_handoff: get_u32(b, off + 12) & FLAG_VIA_HANDOFF != 0,
                started_at_ms: get_u64(b, off + 16),
                requests: get_u64(b, off + 24),
            });
        }
        c.generations.sort_by_key(|g| g.number);
        Ok(c)
    }
}

fn slot_offset(number: u64) -> usize {
    HEADER_LEN + ((number - 1) % GENERATIONS as u64) as usize * SLOT_LEN
}

fn put_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

fn get_u32(b: &[u8], off: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(w)
}

fn get_u64(b: &[u8], off: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(w)
}

/// Why a record could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    Length { got: usize },
    Magic,
    Version { found: u32 },
    Slots { found: u32 },
    Corrupt(String),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Length { got } => {
                write!(f, "counters record is {got} bytes, expected {RECORD_LEN}")
            }
            DecodeError::Magic => write!(f, "not a handoff-demo counters record (bad magic)"),
            DecodeError::Version { found } => write!(
                f,
                "counters record has layout version {found}; this build reads {VERSION}"
            ),
            DecodeError::Slots { found } => write!(
                f,
                "counters record has {found} generation slots; this build has {GENERATIONS}"
            ),
            DecodeError::Corrupt(d) => write!(f, "corrupt counters record: {d}"),
        }
    }
}

impl std::error::Error for DecodeError {}

/// Errors reading or updating the counters region.
#[derive(Debug)]
pub enum Error {
    Region(ShmError),
    Record(DecodeError),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Region(e) => e.fmt(f),
            Error::Record(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for Error {}

impl From<ShmError> for Error {
    fn from(e: ShmError) -> Error {
        Error::Region(e)
    }
}

/// Opens (creating if needed) the counters region in `state_dir`.
pub fn open_or_create(state_dir: &Path) -> Result<Region, Error> {
    Ok(Region::open_or_create(state_dir, REGION_NAME, SPEC)?)
}

/// Reads the counters in `state_dir` without creating anything: `None` if
/// the service keeps no counters region there. Waits at most `budget` for a
/// live writer mid-write (a write takes microseconds; a wait that long means
/// something is wrong, and a status query must not hang on it).
pub fn read(state_dir: &Path, budget: Duration) -> Result<Option<Counters>, Error> {
    let region = match Region::open(state_dir, REGION_NAME, Some(SPEC)) {
        Ok(r) => r,
        Err(ShmError::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let mut buf = vec![0u8; RECORD_LEN];
    region.read_within(&mut buf, budget)?;
    Counters::decode(&buf).map(Some).map_err(Error::Record)
}

/// What [`update`] found before applying the change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    Intact,
    /// The record was the remains of a write that never finished (its
    /// writer died mid-write): the fields decoded anyway — each is one
    /// word, written whole — and the record was rewritten with a fresh
    /// checksum, so a few requests may be counted twice or not at all.
    Torn,
    /// The record did not decode; counting restarted from zero.
    Reset(DecodeError),
}

/// Read-modify-write of the whole record under the region's write lock,
/// waiting at most `budget` for another live writer (then
/// [`ShmError::Busy`]: the caller keeps its pending deltas and retries).
pub fn update(
    region: &Region,
    budget: Duration,
    change: impl FnOnce(&mut Counters),
) -> Result<Found, Error> {
    update_then(region, budget, change, |_| {})
}

/// [`update`], then `then` with the record as written, still under the
/// lock: so what `then` publishes of successive updates lands in the order
/// they were made, and a reader never sees a count go back because a slower
/// process published an older record after a newer one.
pub fn update_then(
    region: &Region,
    budget: Duration,
    change: impl FnOnce(&mut Counters),
    then: impl FnOnce(&Counters),
) -> Result<Found, Error> {
    let mut guard = region.lock_within(budget)?;
    let mut buf = vec![0u8; RECORD_LEN];
    guard.read(0, &mut buf)?;
    let (mut c, found) = match Counters::decode(&buf) {
        Ok(c) if guard.is_consistent() => (c, Found::Intact),
        Ok(c) => (c, Found::Torn),
        Err(e) => (Counters::default(), Found::Reset(e)),
    };
    change(&mut c);
    guard.replace(&c.encode())?;
    then(&c);
    Ok(found)
}

/// Publishes `c` as JSON in `state_dir` ([`PUBLISHED_NAME`]) for `handoff
/// status`: written to a temporary file (mode 0600, never through a link)
/// and renamed over the last one, so a reader sees one whole record or the
/// previous one. Call it under the region's lock ([`update_then`]).
pub fn publish(state_dir: &Path, c: &Counters) -> io::Result<()> {
    let json = serde_json::to_vec(c).map_err(io::Error::other)?;
    let tmp = state_dir.join(PUBLISHING_NAME);
    let mut f = handoff::private_fs::open_file(
        OpenOptions::new().write(true).create(true).truncate(true),
        &tmp,
    )?;
    f.write_all(&json)?;
    drop(f);
    std::fs::rename(&tmp, state_dir.join(PUBLISHED_NAME))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Counters {
        let mut c = Counters::default();
        let g1 = c.begin_generation(100, false, 1_000);
        c.add_requests(g1, 100, 7, 1_100);
        let g2 = c.begin_generation(200, true, 2_000);
        // The old process finishes its last requests after the new one began.
        c.add_requests(g1, 100, 3, 2_050);
        c.add_requests(g2, 200, 5, 2_100);
        c
    }

    #[test]
    fn round_trip() {
        let c = sample();
        assert_eq!(c.requests_served, 15);
        assert_eq!(c.handoffs_survived, 1);
        assert_eq!(c.generations_started, 2);
        assert_eq!(
            c.generations.iter().map(|g| g.requests).collect::<Vec<_>>(),
            [10, 5]
        );
        let b = c.encode();
        assert_eq!(b.len(), RECORD_LEN);
        assert_eq!(Counters::decode(&b), Ok(c));
    }

    #[test]
    fn ring_keeps_the_newest_generations_in_order() {
        let mut c = Counters::default();
        for i in 1..=(GENERATIONS as u64 + 5) {
            let n = c.begin_generation(i as u32, i > 1, i);
            assert_eq!(n, i);
            c.add_requests(n, i as u32, i, i);
        }
        // Generation 1 fell off the ring: its late requests count in the
        // total only.
        c.add_requests(1, 1, 1000, 99);
        let d = Counters::decode(&c.encode()).unwrap();
        assert_eq!(d, c);
        assert_eq!(d.generations.len(), GENERATIONS);
        assert_eq!(d.generations[0].number, 6);
        assert_eq!(
            d.generations[GENERATIONS - 1].number,
            GENERATIONS as u64 + 5
        );
        assert_eq!(d.handoffs_survived, GENERATIONS as u64 + 4);
        let sum: u64 = (1..=(GENERATIONS as u64 + 5)).sum();
        assert_eq!(d.requests_served, sum + 1000);
    }

    #[test]
    fn zeros_are_empty_and_bad_records_are_errors() {
        assert_eq!(
            Counters::decode(&[0u8; RECORD_LEN]),
            Ok(Counters::default())
        );
        let good = sample().encode();
        let mut b = good.clone();
        b[0] = b'X';
        assert_eq!(Counters::decode(&b), Err(DecodeError::Magic));
        let mut b = good.clone();
        put_u32(&mut b, 8, VERSION + 1);
        assert_eq!(
            Counters::decode(&b),
            Err(DecodeError::Version { found: VERSION + 1 })
        );
        let mut b = good.clone();
        put_u32(&mut b, 12, 3);
        assert_eq!(Counters::decode(&b), Err(DecodeError::Slots { found: 3 }));
        assert_eq!(
            Counters::decode(&good[1..]),
            Err(DecodeError::Length {
                got: RECORD_LEN - 1
            })
        );
        // A slot claiming a generation that never started.
        let mut b = good.clone();
        put_u64(&mut b, HEADER_LEN, 9);
        assert!(matches!(Counters::decode(&b), Err(DecodeError::Corrupt(_))));
        // Wrong magic is reported as such.
        let mut b = good;
        b[..8].copy_from_slice(b"NOTOURS!");
        assert!(Counters::decode(&b)
            .unwrap_err()
            .to_string()
            .contains("bad magic"));
    }

    #[test]
    fn region_update_and_read() {
        let dir = tempfile::tempdir().unwrap();
        assert!(read(dir.path(), Duration::from_secs(1)).unwrap().is_none());
        let region = open_or_create(dir.path()).unwrap();
        // Created, never written: empty.
        assert_eq!(
            read(dir.path(), Duration::from_secs(1)).unwrap(),
            Some(Counters::default())
        );
        let mut n = 0;
        let found = update(&region, Duration::from_secs(1), |c| {
            n = c.begin_generation(42, false, 5);
            c.add_requests(n, 42, 9, 6);
        })
        .unwrap();
        assert_eq!(found, Found::Intact);
        // A second mapping (as another process would have) sees it.
        let again = open_or_create(dir.path()).unwrap();
        update(&again, Duration::from_secs(1), |c| {
            c.add_requests(n, 42, 1, 7)
        })
        .unwrap();
        let c = read(dir.path(), Duration::from_secs(1)).unwrap().unwrap();
        assert_eq!(c.requests_served, 10);
        assert_eq!(c.generations[0].requests, 10);
        assert_eq!(c.updated_at_ms, 7);
    }

    /// What the supervisor reads: the record as written, as one JSON
    /// object with the same fields, replaced whole by the next update.
    #[test]
    fn each_update_publishes_the_record_as_json() {
        let dir = tempfile::tempdir().unwrap();
        let region = open_or_create(dir.path()).unwrap();
        let published = || -> serde_json::Value {
            let text = std::fs::read(dir.path().join(PUBLISHED_NAME)).unwrap();
            serde_json::from_slice(&text).unwrap()
        };
        let publish_to = |c: &Counters| publish(dir.path(), c).unwrap();
        update_then(
            &region,
            Duration::from_secs(1),
            |c| {
                let n = c.begin_generation(42, false, 5);
                c.add_requests(n, 42, 9, 6);
            },
            publish_to,
        )
        .unwrap();
        assert_eq!(published()["requests_served"], 9);
        update_then(
            &region,
            Duration::from_secs(1),
            |c| c.add_requests(1, 42, 1, 7),
            publish_to,
        )
        .unwrap();
        let v = published();
        assert_eq!(v["requests_served"], 10);
        assert_eq!(v["updated_at_ms"], 7);
        assert_eq!(v["generations"][0]["pid"], 42);
        let back: Counters = serde_json::from_value(v).unwrap();
        assert_eq!(
            Some(back),
            read(dir.path(), Duration::from_secs(1)).unwrap()
        );
        assert!(!dir.path().join(PUBLISHING_NAME).exists());
    }

    #[test]
    fn a_foreign_record_is_reset_by_the_next_writer() {
        let dir = tempfile::tempdir().unwrap();
        let region = open_or_create(dir.path()).unwrap();
        region
            .lock()
            .write(0, b"garbage!")
            .expect("write within the payload");
        assert!(matches!(
            read(dir.path(), Duration::from_secs(1)),
            Err(Error::Record(DecodeError::Magic))
        ));
        let found = update(&region, Duration::from_secs(1), |c| {
            c.begin_generation(1, false, 1);
        })
        .unwrap();
        assert_eq!(found, Found::Reset(DecodeError::Magic));
        let c = read(dir.path(), Duration::from_secs(1)).unwrap().unwrap();
        assert_eq!(c.generations_started, 1);
    }
}
