//! A mapped region file as the lock and the write guard see it: its live
//! words, its path and payload size. Below `Region` (mod.rs), which owns
//! one and calls the seqlock with it, so neither the seqlock nor the guard
//! depends on `Region`.

use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use super::layout;
use super::owner::OwnerState;
use super::ShmError;
use crate::sys::shm::SharedMap;

/// The mapping of one region file.
#[derive(Debug)]
pub(crate) struct Mapped {
    pub(super) map: SharedMap,
    pub(super) path: PathBuf,
    pub(super) payload_len: usize,
}

impl Mapped {
    pub(crate) fn cells(&self) -> Cells<'_> {
        Cells::new(self.map.words())
    }

    pub(crate) fn busy(&self, what: &'static str, b: TimedOut) -> ShmError {
        ShmError::Busy {
            path: self.path.clone(),
            what,
            owner: b.owner,
            waited_ms: b.waited.as_millis() as u64,
        }
    }
}

/// The live words of a region.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Cells<'a> {
    pub owner: &'a AtomicU64,
    pub recoveries: &'a AtomicU64,
    pub last_recovered: &'a AtomicU64,
    pub seq: &'a AtomicU64,
    pub crc: &'a AtomicU64,
    pub payload: &'a [AtomicU64],
}

impl<'a> Cells<'a> {
    /// `words` is a whole mapping, at least `HEADER_LEN` bytes long (the
    /// file length was validated against the header before mapping).
    pub fn new(words: &'a [AtomicU64]) -> Cells<'a> {
        let (head, payload) = words.split_at(layout::HEADER_LEN / 8);
        Cells {
            owner: &head[layout::OWNER_OFFSET / 8],
            recoveries: &head[layout::RECOVERIES_OFFSET / 8],
            last_recovered: &head[layout::LAST_RECOVERED_OFFSET / 8],
            seq: &head[layout::SEQ_OFFSET / 8],
            crc: &head[layout::RECORD_CRC_OFFSET / 8],
            payload,
        }
    }
}

/// A wait budget ran out; carries who held the lock at the end.
#[derive(Debug)]
pub(crate) struct TimedOut {
    pub owner: OwnerState,
    pub waited: Duration,
}
