//! The region file's format: a fixed header of three cache lines, then the
//! payload.
//!
//! ```text
//! line 0 (static, written once before the file gets its name)
//!    0  magic          8 bytes  "HNDOFSHM"
//!    8  layout version u32 LE
//!   12  header length  u32 LE   (= payload offset, 192)
//!   16  payload length u64 LE   (bytes the caller asked for)
//!   24  schema         u64 LE   (the application's own format tag)
//!   32  header crc     u32 LE   crc32c of bytes 0..32
//! line 1 (lock)
//!   64  owner word     u64      0 = free, else pid | guard << 32
//!   72  recoveries     u64      dead owners recovered so far
//!   80  last recovered u64      owner word of the last one
//! line 2 (seqlock)
//!  128  sequence       u64      odd while a write is in progress
//!  136  record crc     u64      crc32c of the payload (low 32 bits)
//!  192  payload, padded to a multiple of 8 bytes
//! ```
//!
//! The static fields are little-endian so a file from a foreign-endian
//! machine fails the magic/version check instead of being misread; the live
//! words are native (they are only ever shared within one machine). The
//! lock and the sequence sit on separate cache lines so that writers
//! contending for the lock do not slow readers polling the sequence.
//!
//! These offsets are part of the on-disk format and are public so that
//! diagnostic tools — and tests that simulate corruption — can address the
//! words directly.

use std::path::Path;

use super::ShmError;

/// First 8 bytes of every region file.
pub const MAGIC: [u8; 8] = *b"HNDOFSHM";
/// Bumped whenever the meaning of any offset below changes.
pub const LAYOUT_VERSION: u32 = 1;
/// Bytes before the payload.
pub const HEADER_LEN: usize = 192;
/// Largest payload accepted (a region is for hot state, not bulk data).
pub const MAX_PAYLOAD: usize = 16 << 20;

/// Byte offset of the owner word (the writer lock).
pub const OWNER_OFFSET: usize = 64;
/// Byte offset of the recovery counter.
pub const RECOVERIES_OFFSET: usize = 72;
/// Byte offset of the last recovered owner word.
pub const LAST_RECOVERED_OFFSET: usize = 80;
/// Byte offset of the seqlock sequence.
pub const SEQ_OFFSET: usize = 128;
/// Byte offset of the record checksum.
pub const RECORD_CRC_OFFSET: usize = 136;

/// Length of the static part of the header that is checked on open.
pub(crate) const STATIC_LEN: usize = 64;
const CRC_COVERED: usize = 32;

/// The static header fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Static {
    pub payload_len: u64,
    pub schema: u64,
}

/// Payload bytes rounded up to whole words.
pub(crate) fn padded(payload_len: usize) -> usize {
    payload_len.div_ceil(8) * 8
}

/// Total file length for a payload of `payload_len` bytes.
pub(crate) fn file_len(payload_len: usize) -> usize {
    HEADER_LEN + padded(payload_len)
}

/// The crc of an all-zero payload: what a fresh region's record crc holds,
/// so a region nobody has written yet reads as a valid all-zero record.
pub(crate) fn zero_payload_crc(payload_len: usize) -> u32 {
    let zeros = [0u8; 4096];
    let mut crc = 0;
    let mut left = payload_len;
    while left > 0 {
        let n = left.min(zeros.len());
        crc = crc32c::crc32c_append(crc, &zeros[..n]);
        left -= n;
    }
    crc
}

/// The full initial header of a new region file (live words included).
pub(crate) fn encode_initial(st: Static) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..8].copy_from_slice(&MAGIC);
    h[8..12].copy_from_slice(&LAYOUT_VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&(HEADER_LEN as u32).to_le_bytes());
    h[16..24].copy_from_slice(&st.payload_len.to_le_bytes());
    h[24..32].copy_from_slice(&st.schema.to_le_bytes());
    let crc = crc32c::crc32c(&h[..CRC_COVERED]);
    h[32..36].copy_from_slice(&crc.to_le_bytes());
    let rec = u64::from(zero_payload_crc(st.payload_len as usize));
    h[RECORD_CRC_OFFSET..RECORD_CRC_OFFSET + 8].copy_from_slice(&rec.to_ne_bytes());
    h
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Checks the static header (`head`, the first [`STATIC_LEN`] bytes or as
/// many as the file has) and the file length. Every way a file can be
/// wrong is a typed error; nothing here trusts a field before the ones it
/// depends on are checked, so no length read from the file is used to
/// address memory until it has matched the actual file length.
pub(crate) fn validate(path: &Path, head: &[u8], file_len_actual: u64) -> Result<Static, ShmError> {
    let path = path.to_path_buf();
    if head.len() < 8 || head[0..8] != MAGIC {
        if head.len() < 8 && MAGIC.starts_with(head) {
            return Err(ShmError::Truncated {
                path,
                len: file_len_actual,
                need: HEADER_LEN as u64,
            });
        }
        return Err(ShmError::Foreign { path });
    }
    if head.len() < STATIC_LEN {
        return Err(ShmError::Truncated {
            path,
            len: file_len_actual,
            need: HEADER_LEN as u64,
        });
    }
    let version = le_u32(head, 8);
    if version != LAYOUT_VERSION {
        return Err(ShmError::Version {
            path,
            found: version,
            supported: LAYOUT_VERSION,
        });
    }
    let stored = le_u32(head, 32);
    let actual = crc32c::crc32c(&head[..CRC_COVERED]);
    if stored != actual {
        return Err(ShmError::HeaderCorrupt {
            path,
            detail: format!("header crc {stored:#010x}, computed {actual:#010x}"),
        });
    }
    let header_len = le_u32(head, 12);
    if header_len as usize != HEADER_LEN {
        return Err(ShmError::HeaderCorrupt {
            path,
            detail: format!("header length {header_len}, expected {HEADER_LEN}"),
        });
    }
    let payload_len = le_u64(head, 16);
    if payload_len == 0 || payload_len > MAX_PAYLOAD as u64 {
        return Err(ShmError::HeaderCorrupt {
            path,
            detail: format!("payload length {payload_len} out of range 1..={MAX_PAYLOAD}"),
        });
    }
    let need = file_len(payload_len as usize) as u64;
    if file_len_actual < need {
        return Err(ShmError::Truncated {
            path,
            len: file_len_actual,
            need,
        });
    }
    if file_len_actual > need {
        return Err(ShmError::HeaderCorrupt {
            path,
            detail: format!("file is {file_len_actual} bytes, header says {need}"),
        });
    }
    Ok(Static {
        payload_len,
        schema: le_u64(head, 24),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(st: Static) -> Vec<u8> {
        encode_initial(st)[..STATIC_LEN].to_vec()
    }

    #[test]
    fn round_trip_and_every_rejection() {
        let p = Path::new("/x");
        let st = Static {
            payload_len: 64,
            schema: 7,
        };
        let len = file_len(64) as u64;
        assert_eq!(validate(p, &head(st), len).unwrap(), st);

        assert!(matches!(
            validate(p, b"", 0),
            Err(ShmError::Truncated { len: 0, .. })
        ));
        assert!(matches!(
            validate(p, b"HNDO", 4),
            Err(ShmError::Truncated { .. })
        ));
        assert!(matches!(
            validate(p, b"#!/bin/sh\n", 10),
            Err(ShmError::Foreign { .. })
        ));
        assert!(matches!(
            validate(p, &head(st)[..40], 40),
            Err(ShmError::Truncated { .. })
        ));
        assert!(matches!(
            validate(p, &head(st), len - 8),
            Err(ShmError::Truncated { .. })
        ));
        assert!(matches!(
            validate(p, &head(st), len + 8),
            Err(ShmError::HeaderCorrupt { .. })
        ));

        let mut h = head(st);
        h[8] = 2;
        assert!(matches!(
            validate(p, &h, len),
            Err(ShmError::Version { found: 2, .. })
        ));
        let mut h = head(st);
        h[17] ^= 1; // payload length, crc now wrong
        assert!(matches!(
            validate(p, &h, len),
            Err(ShmError::HeaderCorrupt { .. })
        ));
    }

    #[test]
    fn padding_and_zero_crc() {
        assert_eq!(padded(1), 8);
        assert_eq!(padded(64), 64);
        assert_eq!(file_len(65), HEADER_LEN + 72);
        assert_eq!(zero_payload_crc(10_000), crc32c::crc32c(&[0u8; 10_000]));
    }
}
