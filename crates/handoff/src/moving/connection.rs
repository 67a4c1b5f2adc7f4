//! What moves: a connection as the successor gets it, the bound on what
//! one may carry, and why an offer can be refused.

use std::os::fd::OwnedFd;

/// Most unread bytes plus state one connection may carry. hyper's default
/// read buffer tops out near 400 KiB; a connection between requests holds at
/// most the start of the next one. Well inside one frame, so every batch
/// has room for at least one connection.
pub const MAX_CONNECTION_BYTES: usize = 256 * 1024;

/// A connection taken over from the previous incumbent: serve it from
/// `unread` first, then the socket.
#[derive(Debug)]
pub struct MovedConnection {
    /// The socket (a TCP or Unix stream), close-on-exec, blocking as the
    /// old owner left it: set it non-blocking before handing it to an event
    /// loop.
    pub fd: OwnedFd,
    /// What the old owner had read and not consumed: the start of the next
    /// request, usually nothing.
    pub unread: Vec<u8>,
    /// What the old owner's service attached (e.g. which listener the
    /// connection came from).
    pub state: Vec<u8>,
}

/// Why [`Mover::offer`](crate::Mover::offer) or
/// [`Mover::lend`](crate::Mover::lend) did not take a connection: close it
/// as a drain would have without moving (the connection is still entirely
/// yours).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MoveRefused {
    /// This handoff moves nothing: the successor (or the supervisor) speaks
    /// protocol version 2 or older, or this is `handoff stop`.
    #[error("this handoff does not move connections (a peer speaks protocol version 2 or older, or nothing takes over)")]
    NotMoving,
    /// The drain has returned, or sending to the supervisor failed: nothing
    /// more is moved in this handoff.
    #[error("the drain is over or the supervisor stopped taking connections: nothing more moves in this handoff")]
    Closed,
    /// The unread bytes and state exceed [`MAX_CONNECTION_BYTES`].
    #[error(
        "{bytes} bytes of unread data and state exceed the {max} a moved connection may carry"
    )]
    TooLarge {
        /// What the offer carried.
        bytes: usize,
        /// [`MAX_CONNECTION_BYTES`].
        max: usize,
    },
    /// Duplicating the descriptor failed (no descriptor left: `EMFILE`).
    #[error("duplicating the connection's descriptor to send it: {0}")]
    Dup(#[source] std::io::Error),
}
