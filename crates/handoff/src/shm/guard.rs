//! The write guard, and byte-level access to a payload made of atomic
//! words.

use std::sync::atomic::{fence, AtomicU64, Ordering};

use super::mapped::Mapped;
use super::owner::OwnerId;
use super::ShmError;

/// Exclusive write access to a region's payload, held until dropped.
///
/// The sequence is made odd lazily, at the first mutation, so a guard used
/// only to read-modify-decide (or dropped unused) never makes readers
/// retry. Dropping the guard finishes the write — recomputes the record
/// checksum, makes the sequence even — and releases the lock.
///
/// If the guard is dropped while its thread panics, parity is restored and
/// the lock released as usual, but the checksum is left as it was: an
/// update that did not run to completion is reported to readers as
/// [`ShmError::TornRecord`], exactly like one whose writer was killed,
/// unless it had not changed any byte yet.
#[derive(Debug)]
pub struct WriteGuard<'a> {
    region: &'a Mapped,
    me: OwnerId,
    /// The even sequence this write ends with, once it has begun.
    end_seq: Option<u64>,
}

impl<'a> WriteGuard<'a> {
    pub(crate) fn new(region: &'a Mapped, me: OwnerId) -> WriteGuard<'a> {
        WriteGuard {
            region,
            me,
            end_seq: None,
        }
    }

    /// Payload length in bytes.
    pub fn len(&self) -> usize {
        self.region.payload_len
    }

    /// Whether the payload is empty: never, as a region's payload is at
    /// least one byte.
    pub fn is_empty(&self) -> bool {
        self.region.payload_len == 0
    }

    /// Copies payload bytes `offset..offset + out.len()` into `out`.
    pub fn read(&self, offset: usize, out: &mut [u8]) -> Result<(), ShmError> {
        self.check(offset, out.len())?;
        copy_out(self.region.cells().payload, offset, out);
        Ok(())
    }

    /// Overwrites payload bytes `offset..offset + data.len()`.
    pub fn write(&mut self, offset: usize, data: &[u8]) -> Result<(), ShmError> {
        self.check(offset, data.len())?;
        self.begin();
        copy_in(self.region.cells().payload, offset, data);
        Ok(())
    }

    /// Overwrites the whole payload (`data` must be exactly its length).
    pub fn replace(&mut self, data: &[u8]) -> Result<(), ShmError> {
        if data.len() != self.len() {
            return Err(ShmError::BufferSize {
                path: self.region.path.clone(),
                expected: self.len(),
                got: data.len(),
            });
        }
        self.write(0, data)
    }

    /// The `index`-th native-endian `u64` of the payload (bytes
    /// `8 * index..8 * index + 8`).
    pub fn load_u64(&self, index: usize) -> Result<u64, ShmError> {
        self.check_word(index)?;
        Ok(self.region.cells().payload[index].load(Ordering::Relaxed))
    }

    /// Sets the `index`-th `u64` of the payload.
    pub fn store_u64(&mut self, index: usize, value: u64) -> Result<(), ShmError> {
        self.check_word(index)?;
        self.begin();
        self.region.cells().payload[index].store(value, Ordering::Relaxed);
        Ok(())
    }

    /// Adds `delta` (wrapping) to the `index`-th `u64`; returns the new
    /// value. For counters.
    pub fn add_u64(&mut self, index: usize, delta: u64) -> Result<u64, ShmError> {
        let v = self.load_u64(index)?.wrapping_add(delta);
        self.store_u64(index, v)?;
        Ok(v)
    }

    /// Whether the record as it stands matches its checksum. `false` after
    /// the lock was recovered from a writer that died mid-write (or after
    /// this guard's own partial writes): the holder should then rewrite the
    /// whole record rather than update it in place.
    pub fn is_consistent(&self) -> bool {
        let c = self.region.cells();
        crc_of(c.payload, self.len()) == c.crc.load(Ordering::Relaxed) as u32
    }

    /// The identity stamped in the lock word.
    pub fn owner(&self) -> OwnerId {
        self.me
    }

    fn check(&self, offset: usize, len: usize) -> Result<(), ShmError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len() => Ok(()),
            _ => Err(ShmError::OutOfBounds {
                path: self.region.path.clone(),
                offset,
                len,
                payload_len: self.len(),
            }),
        }
    }

    fn check_word(&self, index: usize) -> Result<(), ShmError> {
        self.check(index.saturating_mul(8), 8)
    }

    /// Makes the sequence odd (once per guard): readers from here on retry.
    fn begin(&mut self) {
        if self.end_seq.is_some() {
            return;
        }
        let seq = self.region.cells().seq;
        let s = seq.load(Ordering::Relaxed);
        // Odd here means a previous holder's parity was never restored (a
        // corrupt file): step past it to the next odd value.
        let odd = if s & 1 == 1 { s.wrapping_add(2) } else { s + 1 };
        seq.store(odd, Ordering::Relaxed);
        // Orders the odd store before every payload store that follows; see
        // the seqlock module docs.
        fence(Ordering::Release);
        self.end_seq = Some(odd.wrapping_add(1));
    }
}

impl Drop for WriteGuard<'_> {
    fn drop(&mut self) {
        // A guard copied into a forked child by `fork()` is not the child's
        // to finish or release: the parent still holds the lock.
        if std::process::id() != self.me.pid() {
            return;
        }
        let c = self.region.cells();
        if let Some(end) = self.end_seq {
            if !std::thread::panicking() {
                let crc = crc_of(c.payload, self.len());
                c.crc.store(u64::from(crc), Ordering::Relaxed);
            }
            c.seq.store(end, Ordering::Release);
        }
        let _ = c
            .owner
            .compare_exchange(self.me.word(), 0, Ordering::Release, Ordering::Relaxed);
    }
}

/// Copies payload bytes `offset..offset + out.len()` out of `words`, one
/// atomic load per word (relaxed: ordering comes from the seqlock).
pub(crate) fn copy_out(words: &[AtomicU64], offset: usize, out: &mut [u8]) {
    if offset == 0 {
        // The reader's path: whole words straight into the buffer.
        let mut chunks = out.chunks_exact_mut(8);
        for (chunk, w) in (&mut chunks).zip(words) {
            chunk.copy_from_slice(&w.load(Ordering::Relaxed).to_ne_bytes());
        }
        let n = out.len() / 8;
        let tail = &mut out[n * 8..];
        if !tail.is_empty() {
            let b = words[n].load(Ordering::Relaxed).to_ne_bytes();
            tail.copy_from_slice(&b[..tail.len()]);
        }
        return;
    }
    for (i, o) in out.iter_mut().enumerate() {
        let at = offset + i;
        *o = words[at / 8].load(Ordering::Relaxed).to_ne_bytes()[at % 8];
    }
}

/// Writes `data` at payload byte `offset`, word by word; partial words are
/// merged with their current contents (only the lock holder writes, so the
/// read-modify-write cannot lose a concurrent store).
pub(crate) fn copy_in(words: &[AtomicU64], offset: usize, data: &[u8]) {
    let mut at = offset;
    let mut rest = data;
    while !rest.is_empty() {
        let w = &words[at / 8];
        let skip = at % 8;
        let n = (8 - skip).min(rest.len());
        let mut b = if n == 8 {
            [0u8; 8]
        } else {
            w.load(Ordering::Relaxed).to_ne_bytes()
        };
        b[skip..skip + n].copy_from_slice(&rest[..n]);
        w.store(u64::from_ne_bytes(b), Ordering::Relaxed);
        at += n;
        rest = &rest[n..];
    }
}

/// crc32c of the first `len` payload bytes.
pub(crate) fn crc_of(words: &[AtomicU64], len: usize) -> u32 {
    let mut buf = [0u8; 256];
    let mut crc = 0;
    let mut at = 0;
    while at < len {
        let n = (len - at).min(buf.len());
        copy_out(&words[at / 8..], 0, &mut buf[..n]);
        crc = crc32c::crc32c_append(crc, &buf[..n]);
        at += n;
    }
    crc
}
