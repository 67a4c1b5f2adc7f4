//! Property tests: the frame and message decoders take arbitrary bytes
//! without panicking, never allocate past the cap, and round-trip what they
//! encode.

use handoff::frame::{self, FrameError, HEADER_LEN, MAX_PAYLOAD};
use handoff::Message;
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4096))]

    /// Arbitrary bytes: decode returns a typed result, never panics.
    #[test]
    fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = frame::decode(&bytes);
        let _ = frame::read_frame(&mut &bytes[..]);
        let _ = Message::decode(&bytes);
    }

    /// A valid header followed by arbitrary payload bytes: the message
    /// decoder sees every tag and body shape and must answer with a value or
    /// a typed error.
    #[test]
    fn arbitrary_payloads_are_typed(payload in proptest::collection::vec(any::<u8>(), 0..256)) {
        let f = frame::encode(1, &payload).unwrap();
        let (decoded, used) = frame::decode(&f).unwrap();
        prop_assert_eq!(used, f.len());
        match Message::decode(&decoded.payload) {
            Ok(m) => {
                // Whatever decodes must re-encode to a payload that decodes
                // to the same message.
                prop_assert_eq!(Message::decode(&m.encode()).unwrap(), m);
            }
            Err(FrameError::UnknownMessage { .. } | FrameError::Malformed { .. } | FrameError::Empty) => {}
            Err(e) => prop_assert!(false, "unexpected error kind: {e}"),
        }
    }

    /// The stop's messages (version 2) round-trip through a version-2
    /// frame for any field values.
    #[test]
    fn shutdown_messages_round_trip(
        stop_id in any::<u64>(),
        grace in any::<u64>(),
        open in any::<u64>(),
        closed in any::<bool>(),
    ) {
        for m in [
            Message::Shutdown { stop_id, drain_grace_ms: grace },
            Message::ShutdownDrained { stop_id, open_conns_remaining: open, accept_closed: closed },
        ] {
            prop_assert_eq!(m.since(), 2);
            let f = frame::encode(m.since(), &m.encode()).unwrap();
            let (decoded, used) = frame::decode(&f).unwrap();
            prop_assert_eq!(used, f.len());
            prop_assert_eq!(decoded.version, 2);
            prop_assert_eq!(Message::decode(&decoded.payload).unwrap(), m);
        }
    }

    /// Flipping any single bit of a valid frame is detected.
    #[test]
    fn single_bit_flips_are_detected(
        payload in proptest::collection::vec(any::<u8>(), 1..64),
        bit in 0usize..(8 * (HEADER_LEN + 64)),
    ) {
        let mut f = frame::encode(1, &payload).unwrap();
        let bit = bit % (8 * f.len());
        f[bit / 8] ^= 1 << (bit % 8);
        prop_assert!(frame::decode(&f).is_err());
    }

    /// Any length field above the cap is refused from the header alone.
    #[test]
    fn oversized_lengths_are_refused_before_reading(len in (MAX_PAYLOAD as u32 + 1)..=u32::MAX) {
        let mut f = frame::encode(1, b"\x01\x01").unwrap();
        f[8..12].copy_from_slice(&len.to_le_bytes());
        let is_oversized = matches!(
            frame::read_frame(&mut &f[..HEADER_LEN]),
            Err(FrameError::Oversized { .. })
        );
        prop_assert!(is_oversized);
    }
}
