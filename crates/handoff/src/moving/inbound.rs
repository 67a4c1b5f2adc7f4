//! The successor's side of a move: taking in batches, and — protocol
//! version 4 — the socket the incumbent sends them on directly, read
//! alongside the control channel until Begin, then to its end.

use std::os::fd::OwnedFd;
use std::time::Duration;

use super::connection::MovedConnection;
use crate::channel::Channel;
use crate::crash;
use crate::frame::FrameError;
use crate::phase::Peer;
use crate::protocol::{HandoffId, Message, MovedMeta};
use crate::protocol_error::ProtocolError;

/// The phase the successor names in errors about moved connections.
const PHASE: &str = "await-begin";

/// Takes in one batch from `peer`: as many descriptors as entries.
/// Anything else is a broken peer: refuse the handoff (the old incumbent
/// keeps its copies and serves on).
pub(crate) fn adopt(
    peer: Peer,
    conns: Vec<MovedMeta>,
    fds: Vec<OwnedFd>,
    into: &mut Vec<MovedConnection>,
) -> Result<(), ProtocolError> {
    MovedMeta::check_batch(conns.len(), fds.len())
        .map_err(|e| ProtocolError::frame(peer, PHASE, e))?;
    // Whether each is a socket is checked once this process owns them
    // (`Incumbent::take_moved`), not here: an `fstat` per descriptor here
    // would slow every batch of the drain, while nobody may be accepting.
    for (meta, fd) in conns.into_iter().zip(fds) {
        into.push(MovedConnection {
            fd,
            unread: meta.unread,
            state: meta.state,
        });
    }
    crash::point("n-after-adopt");
    Ok(())
}

/// The successor's end of the socket the incumbent moves its connections
/// on (MoveChannel).
#[derive(Debug)]
pub(crate) struct Inbound {
    chan: Channel,
    id: HandoffId,
    /// How long one frame may take to arrive once it has begun, and the
    /// rest after Begin (everything was sent before Drained, so it is
    /// already in the socket).
    timeout: Duration,
}

impl Inbound {
    /// Takes the descriptor attached to MoveChannel `id`
    /// ([`super::socket::open`] says what it must be).
    pub(crate) fn open(
        id: HandoffId,
        fds: Vec<OwnedFd>,
        timeout: Duration,
    ) -> Result<Inbound, ProtocolError> {
        let chan = super::socket::open(fds).map_err(|reason| {
            ProtocolError::frame(
                Peer::Supervisor,
                PHASE,
                FrameError::Malformed {
                    message: "MoveChannel",
                    reason,
                },
            )
        })?;
        Ok(Inbound { chan, id, timeout })
    }

    /// The channel, to wait on beside the control channel.
    pub(crate) fn channel(&self) -> &Channel {
        &self.chan
    }

    /// Reads one message (the socket is readable): a batch, adopted into
    /// `into`, or the count. `Ok(false)`: nothing more will come — the
    /// count arrived, or the incumbent hung up or died part-way, which is
    /// the supervisor's to act on (what arrived stays ours until it says).
    pub(crate) fn read_one(
        &mut self,
        into: &mut Vec<MovedConnection>,
    ) -> Result<bool, ProtocolError> {
        let got = self
            .chan
            .recv_with_fds(self.timeout)
            .map_err(|e| ProtocolError::frame(Peer::Incumbent, PHASE, e));
        let (msg, fds) = match got {
            Ok(m) => m,
            Err(e) if e.is_disconnect() => {
                tracing::debug!(target: "handoff::successor", error = %e, "the incumbent's end of the move socket closed");
                return Ok(false);
            }
            Err(e) => return Err(e),
        };
        let legal = crate::phase::direct_move_allows(&msg);
        match crate::phase::admit(Peer::Incumbent, PHASE, legal, Some(self.id), msg)? {
            Message::Connections { conns, .. } => {
                adopt(Peer::Incumbent, conns, fds, into)?;
                Ok(true)
            }
            Message::ConnectionsDone { moved, closed, .. } => {
                tracing::debug!(target: "handoff::successor", moved, closed, got = into.len(), "the incumbent sent every connection it moves");
                Ok(false)
            }
            m => Err(ProtocolError::Unexpected {
                peer: Peer::Incumbent,
                phase: PHASE,
                message: m.name(),
            }),
        }
    }

    /// After Begin: reads what is left. The incumbent sent it all before
    /// it said Drained, so it is waiting in the socket; `timeout` bounds
    /// each read all the same.
    pub(crate) fn finish(mut self, into: &mut Vec<MovedConnection>) -> Result<(), ProtocolError> {
        while self.read_one(into)? {}
        Ok(())
    }
}
