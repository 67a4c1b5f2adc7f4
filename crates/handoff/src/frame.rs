//! Framing: the fixed header around every protocol message.
//!
//! ```text
//!  0      4        6        8            12           16
//!  +------+--------+--------+------------+------------+---------------+
//!  | HOFF | version| flags  | payload len| crc32c     | payload ...   |
//!  +------+--------+--------+------------+------------+---------------+
//! ```
//!
//! All integers are little-endian. The checksum covers the first 12 header
//! bytes *and* the payload, so a flipped length or version is caught as well
//! as a flipped payload byte. The length is checked against [`MAX_PAYLOAD`]
//! before anything is allocated: a hostile or corrupt peer can make us read
//! at most 16 bytes before we refuse it.

use std::io::{self, Read};

use crate::version::{ProtoVersion, PROTO_MAX, PROTO_MIN};

/// Frame magic: every frame starts with these four bytes.
pub const MAGIC: [u8; 4] = *b"HOFF";
/// Size of the fixed header.
pub const HEADER_LEN: usize = 16;
/// Hard cap on a payload. State blobs larger than this belong in the state
/// dir or a shared region, not on the control channel.
pub const MAX_PAYLOAD: usize = 1 << 20;

/// Why a frame could not be read or decoded. Never a panic: every malformed
/// input maps to one of these.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The frame does not start with `HOFF`: whatever is on the other end
    /// of the socket does not speak the handoff protocol.
    #[error(
        "bad magic {found:02x?} (expected {MAGIC:02x?}): peer is not speaking the handoff protocol"
    )]
    BadMagic {
        /// The first four bytes received.
        found: [u8; 4],
    },
    /// The frame header carries a protocol version this build does not
    /// speak at all.
    #[error(
        "unsupported protocol version {found} in frame header (this build speaks {min}..={max})"
    )]
    UnsupportedVersion {
        /// The version in the frame header.
        found: u16,
        /// The lowest version this build speaks.
        min: u16,
        /// The highest version this build speaks.
        max: u16,
    },
    /// The frame header's version is not the one this channel uses: the
    /// negotiated version, or 1 for Hello and HelloAck.
    #[error("frame header says version {found} but {expected} was negotiated")]
    VersionMismatch {
        /// The version in the frame header.
        found: u16,
        /// The version frames of this message must carry on this channel.
        expected: u16,
    },
    /// The header sets flag bits that no protocol version defines: a
    /// corrupt frame, or a peer that is not this protocol.
    #[error("reserved header flags {found:#06x} are set")]
    ReservedFlags {
        /// The flags field as received.
        found: u16,
    },
    /// The payload is longer than the cap (1 MiB). A received one is
    /// refused before anything is allocated; one being sent is refused
    /// before it is written. Large state belongs in the state dir or a
    /// shared region, not on the control channel.
    #[error("payload length {len} exceeds the {max}-byte cap")]
    Oversized {
        /// The payload length in bytes, as the header states it (or as it
        /// would have been sent).
        len: u64,
        /// The cap in bytes.
        max: usize,
    },
    /// The crc32c over the header and payload does not match: bytes were
    /// corrupted, or the stream lost its place.
    #[error("checksum mismatch: header says {expected:#010x}, frame hashes to {actual:#010x}")]
    BadChecksum {
        /// The checksum the header carries.
        expected: u32,
        /// The checksum of the bytes received.
        actual: u32,
    },
    /// The frame ended early: EOF inside a frame, or a buffer shorter than
    /// the frame it starts.
    #[error("truncated frame: needed {needed} bytes, got {got}")]
    Truncated {
        /// Bytes the whole frame needs, header included.
        needed: usize,
        /// Bytes there were.
        got: usize,
    },
    /// The payload's tag byte names no message this build knows.
    #[error("unknown message tag {tag}")]
    UnknownMessage {
        /// The tag byte received.
        tag: u8,
    },
    /// A message newer than the channel's negotiated version, sent or
    /// received: the peer's build may not know it (see
    /// `Message::since`).
    #[error("{message} needs protocol version {since}, but this channel negotiated {version}")]
    NotInVersion {
        /// The name of the message, such as `Shutdown`.
        message: &'static str,
        /// The first protocol version that has the message.
        since: u16,
        /// The version this channel negotiated.
        version: u16,
    },
    /// A known message whose body did not decode, or left bytes over.
    #[error("malformed {message} payload: {reason}")]
    Malformed {
        /// The name of the message the tag announced.
        message: &'static str,
        /// What the decoder found wrong.
        reason: String,
    },
    /// The frame's payload is empty, so it has no message tag.
    #[error("empty payload (no message tag)")]
    Empty,
    /// The peer closed the connection at a frame boundary: EOF before the
    /// first byte of a frame.
    #[error("peer closed the connection")]
    Closed,
    /// No whole frame arrived within the read's timeout.
    #[error("timed out after {waited_ms} ms waiting for a frame")]
    TimedOut {
        /// Milliseconds waited before giving up (0 where the reader did
        /// not measure it).
        waited_ms: u64,
    },
    /// Any other I/O error on the socket, such as a reset connection or a
    /// broken pipe.
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
}

/// A decoded frame: the header version and the raw payload (tag + body).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The protocol version in the header: 1 for Hello and HelloAck, the
    /// negotiated one for everything else (the channel checks which).
    pub version: ProtoVersion,
    /// The payload, checksum verified: a message tag, then its body
    /// ([`Message::decode`](crate::protocol::Message::decode)).
    pub payload: Vec<u8>,
}

/// Encodes one frame into a fresh buffer.
///
/// Panics never; an over-cap payload is refused so that a bug on our side
/// cannot produce a frame the peer is obliged to reject.
pub fn encode(version: ProtoVersion, payload: &[u8]) -> Result<Vec<u8>, FrameError> {
    if payload.len() > MAX_PAYLOAD {
        return Err(FrameError::Oversized {
            len: payload.len() as u64,
            max: MAX_PAYLOAD,
        });
    }
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&out[..12]), payload);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(payload);
    Ok(out)
}

/// A validated header: what we know before reading the payload.
#[derive(Debug, Clone, Copy)]
struct Header {
    version: u16,
    len: usize,
    crc: u32,
    raw: [u8; 12],
}

fn parse_header(h: &[u8; HEADER_LEN]) -> Result<Header, FrameError> {
    let magic: [u8; 4] = [h[0], h[1], h[2], h[3]];
    if magic != MAGIC {
        return Err(FrameError::BadMagic { found: magic });
    }
    let version = u16::from_le_bytes([h[4], h[5]]);
    if !(PROTO_MIN..=PROTO_MAX).contains(&version) {
        return Err(FrameError::UnsupportedVersion {
            found: version,
            min: PROTO_MIN,
            max: PROTO_MAX,
        });
    }
    let flags = u16::from_le_bytes([h[6], h[7]]);
    if flags != 0 {
        return Err(FrameError::ReservedFlags { found: flags });
    }
    let len = u32::from_le_bytes([h[8], h[9], h[10], h[11]]) as usize;
    if len > MAX_PAYLOAD {
        return Err(FrameError::Oversized {
            len: len as u64,
            max: MAX_PAYLOAD,
        });
    }
    let crc = u32::from_le_bytes([h[12], h[13], h[14], h[15]]);
    let mut raw = [0u8; 12];
    raw.copy_from_slice(&h[..12]);
    Ok(Header {
        version,
        len,
        crc,
        raw,
    })
}

fn check(header: &Header, payload: &[u8]) -> Result<(), FrameError> {
    let actual = crc32c::crc32c_append(crc32c::crc32c(&header.raw), payload);
    if actual != header.crc {
        return Err(FrameError::BadChecksum {
            expected: header.crc,
            actual,
        });
    }
    Ok(())
}

/// Decodes one frame from the front of `buf`, returning it and the number of
/// bytes consumed. An incomplete buffer is [`FrameError::Truncated`].
pub fn decode(buf: &[u8]) -> Result<(Frame, usize), FrameError> {
    if buf.len() < HEADER_LEN {
        return Err(FrameError::Truncated {
            needed: HEADER_LEN,
            got: buf.len(),
        });
    }
    let mut h = [0u8; HEADER_LEN];
    h.copy_from_slice(&buf[..HEADER_LEN]);
    let header = parse_header(&h)?;
    let total = HEADER_LEN + header.len;
    if buf.len() < total {
        return Err(FrameError::Truncated {
            needed: total,
            got: buf.len(),
        });
    }
    let payload = &buf[HEADER_LEN..total];
    check(&header, payload)?;
    Ok((
        Frame {
            version: header.version,
            payload: payload.to_vec(),
        },
        total,
    ))
}

/// Reads exactly one frame from a blocking reader.
///
/// EOF before the first byte is [`FrameError::Closed`] (an orderly close at a
/// frame boundary); EOF anywhere later is [`FrameError::Truncated`]. A read
/// timeout (`WouldBlock`/`TimedOut` from `SO_RCVTIMEO`) is reported as
/// [`FrameError::TimedOut`] with `waited_ms` left at 0 for the caller to fill.
pub fn read_frame<R: Read>(r: &mut R) -> Result<Frame, FrameError> {
    let mut h = [0u8; HEADER_LEN];
    let got = read_full(r, &mut h)?;
    if got == 0 {
        return Err(FrameError::Closed);
    }
    if got < HEADER_LEN {
        return Err(FrameError::Truncated {
            needed: HEADER_LEN,
            got,
        });
    }
    let header = parse_header(&h)?;
    let mut payload = vec![0u8; header.len];
    let got = read_full(r, &mut payload)?;
    if got < header.len {
        return Err(FrameError::Truncated {
            needed: HEADER_LEN + header.len,
            got: HEADER_LEN + got,
        });
    }
    check(&header, &payload)?;
    Ok(Frame {
        version: header.version,
        payload,
    })
}

/// Fills `buf` unless EOF comes first; returns how many bytes were read.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> Result<usize, FrameError> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(FrameError::TimedOut { waited_ms: 0 })
            }
            Err(e) => return Err(FrameError::Io(e)),
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> Vec<u8> {
        encode(1, b"\x01hello").unwrap()
    }

    #[test]
    fn round_trip() {
        let buf = good();
        let (f, used) = decode(&buf).unwrap();
        assert_eq!(used, buf.len());
        assert_eq!(f.payload, b"\x01hello");
        let f2 = read_frame(&mut &buf[..]).unwrap();
        assert_eq!(f, f2);
    }

    #[test]
    fn bad_magic() {
        let mut buf = good();
        buf[0] = b'X';
        assert!(matches!(decode(&buf), Err(FrameError::BadMagic { .. })));
        assert!(matches!(
            read_frame(&mut &buf[..]),
            Err(FrameError::BadMagic { .. })
        ));
    }

    #[test]
    fn bad_checksum_payload_and_header() {
        let mut buf = good();
        let last = buf.len() - 1;
        buf[last] ^= 0x40;
        assert!(matches!(decode(&buf), Err(FrameError::BadChecksum { .. })));
        let mut buf = good();
        buf[12] ^= 1; // the crc itself
        assert!(matches!(
            read_frame(&mut &buf[..]),
            Err(FrameError::BadChecksum { .. })
        ));
    }

    #[test]
    fn truncated_header_and_payload() {
        let buf = good();
        assert!(matches!(
            read_frame(&mut &buf[..7]),
            Err(FrameError::Truncated { needed: 16, got: 7 })
        ));
        assert!(matches!(
            read_frame(&mut &buf[..buf.len() - 2]),
            Err(FrameError::Truncated { .. })
        ));
        assert!(matches!(
            decode(&buf[..buf.len() - 1]),
            Err(FrameError::Truncated { .. })
        ));
        assert!(matches!(
            read_frame(&mut &buf[..0]),
            Err(FrameError::Closed)
        ));
    }

    #[test]
    fn oversized_length_is_refused_before_allocating() {
        let mut buf = good();
        buf[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        // Only the header is present: an implementation that allocated first
        // would try to reserve 4 GiB here.
        assert!(matches!(
            read_frame(&mut &buf[..HEADER_LEN]),
            Err(FrameError::Oversized { .. })
        ));
        assert!(encode(1, &vec![0u8; MAX_PAYLOAD + 1]).is_err());
    }

    #[test]
    fn unsupported_version_and_flags() {
        let mut buf = good();
        buf[4..6].copy_from_slice(&999u16.to_le_bytes());
        assert!(matches!(
            decode(&buf),
            Err(FrameError::UnsupportedVersion { found: 999, .. })
        ));
        let mut buf = good();
        buf[6] = 1;
        assert!(matches!(
            decode(&buf),
            Err(FrameError::ReservedFlags { .. })
        ));
    }
}
