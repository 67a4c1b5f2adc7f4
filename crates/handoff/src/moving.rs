//! Moving live connections to the successor instead of closing them
//! (protocol versions 3 and 4; docs/connection-transfer.md).
//!
//! A connection is three things, whatever the protocol above it: its
//! descriptor, the bytes already read from it and not consumed, and an
//! opaque state blob from the service. During a handoff's drain the service
//! [offers](Mover::offer) each connection that is between requests; a
//! thread of the library sends them in batches (each batch one frame, its
//! descriptors attached) straight to the successor, on a socket pair the
//! supervisor made for the handoff (protocol version 4, [`socket`]; the
//! successor reads it with [`inbound`]), or — a peer at version 3 — to
//! the supervisor, which relays them. The successor gets them back as [`MovedConnection`]s from
//! [`Incumbent::take_moved`](crate::Incumbent::take_moved) once it is the
//! incumbent.
//!
//! **Ownership.** At every instant one process reads each connection. An
//! offer sends a *duplicate*: the incumbent keeps its own descriptor and
//! its copy of the unread bytes, and stops reading. If the handoff commits
//! it closes them (no FIN goes out: the successor holds the socket); if it
//! aborts, it serves them again from where it stopped. The successor reads
//! them only once it has said Ready. So a request is read by exactly one
//! process, and a connection whose last holder dies is closed by the
//! kernel, never left open and unserved.
//!
//! **Lending instead of duplicating.** [`Mover::offer`] duplicates the
//! descriptor, so the caller keeps nothing but a promise. A duplicate is a
//! system call on the drain's critical path, and its close another: at
//! 10,000 connections a tenth of the drain. [`Mover::lend`] takes the
//! connection object itself instead and gives it back ([`Lent::take_back`])
//! once the sender thread has sent it: no descriptor is made or closed, and
//! the object cannot be closed while it is being sent, because the sender
//! holds it.

mod connection;
pub(crate) mod inbound;
mod queue;
mod sender;
pub(crate) mod socket;
#[cfg(test)]
mod tests;

pub use connection::{MoveRefused, MovedConnection, MAX_CONNECTION_BYTES};
pub use queue::{Lent, Mover};
pub(crate) use sender::Flusher;
