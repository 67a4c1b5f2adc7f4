//! One admin message per frame, in both directions: JSON inside the
//! `handoff` library's frame.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use handoff::frame::{self, FrameError};
use serde::{Deserialize, Serialize};

/// The frame version admin messages are sent with.
const FRAME_VERSION: u16 = 1;

/// Why a message could not be received.
#[derive(Debug, thiserror::Error)]
pub enum RecvError {
    /// The frame itself: EOF, a timeout, a bad magic or checksum, too long…
    #[error("{0}")]
    Frame(#[from] FrameError),
    /// A whole frame whose JSON is not a message of the expected kind.
    #[error("bad admin message: {0}")]
    Decode(#[from] serde_json::Error),
}

/// Sends one message as one frame.
pub fn send<T: Serialize>(mut s: &UnixStream, msg: &T) -> std::io::Result<()> {
    let json = serde_json::to_vec(msg).map_err(std::io::Error::other)?;
    let bytes = frame::encode(FRAME_VERSION, &json).map_err(std::io::Error::other)?;
    s.write_all(&bytes)
}

/// Reads one message, which must arrive whole within `timeout` (`None`:
/// however long it takes) — not within `timeout` per read, which a peer
/// sending a byte at a time could stretch without end.
pub fn recv<T: for<'de> Deserialize<'de>>(
    mut s: &UnixStream,
    timeout: Option<Duration>,
) -> Result<T, RecvError> {
    let f = match timeout {
        Some(d) => handoff::channel::read_frame_within(s, d),
        None => s
            .set_read_timeout(None)
            .map_err(FrameError::Io)
            .and_then(|()| frame::read_frame(&mut s)),
    }?;
    Ok(serde_json::from_slice(&f.payload)?)
}
