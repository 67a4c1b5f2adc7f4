//! The incumbent role: the serving process. Holds the state lock, listens on
//! the control socket, and answers the supervisor's handoff requests by
//! calling into the service's [`Drainable`] implementation.
//!
//! Outside a handoff it also answers a stop (`handoff stop`, protocol
//! version 2): drain, say so, retire — so a service needs no SIGTERM handler
//! to finish its requests when it is stopped.
//!
//! It also recovers by itself when the supervisor disappears (docs/design.md §6.3):
//! EOF while drained → resume; EOF while sealed → try to re-take the state
//! lock (resume if it gets it; if the successor holds it, the successor has
//! won and this process retires).
//!
//! Its parts: [`control`] accepts and greets the supervisor's connections
//! and yields one whole request at a time; [`conversation`] serves a
//! request to its end, the handoff as one type per state; [`relock`] gets
//! the state lock back after a seal; [`abort_watch`] lets an abort stop a
//! drain at once.

mod abort_watch;
mod control;
mod conversation;
mod relock;

use crate::error::ProcessError;
use crate::listeners::Listener;
use crate::lock::StateLock;
use crate::process::{Drainable, ProcessConfig};
use crate::protocol::HandoffId;
use crate::MovedConnection;

use control::ControlSocket;
use conversation::{Ctx, Outcome};

/// Why [`Incumbent::serve`] returned: this process is no longer the
/// incumbent and should exit once its remaining connections are done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retired {
    /// The supervisor committed the handoff to the successor.
    Committed {
        /// The handoff that was committed.
        handoff_id: HandoffId,
    },
    /// The supervisor vanished after we sealed, and the successor holds the
    /// state lock: it became the incumbent.
    SuccessorWon {
        /// The handoff during which the supervisor vanished.
        handoff_id: HandoffId,
    },
    /// The supervisor stopped the service (`handoff stop`, or SIGTERM to
    /// `handoff run`) with no successor: the drain is done and reported;
    /// finish what is still open and exit. The state lock is still held —
    /// the kernel releases it when the process exits.
    Stopped {
        /// The id of the stop request, as the supervisor logs it.
        stop_id: HandoffId,
    },
}

/// The serving side: state lock held, control socket bound.
#[derive(Debug)]
pub struct Incumbent {
    cfg: ProcessConfig,
    lock: StateLock,
    control: ControlSocket,
    /// Copies of the passed listeners, for a supervisor that lost them.
    kept: Vec<Listener>,
    /// Connections the previous incumbent moved to us, until taken.
    moved: Vec<MovedConnection>,
}

impl Incumbent {
    pub(crate) fn new(
        cfg: ProcessConfig,
        lock: StateLock,
        listener: std::os::unix::net::UnixListener,
        kept: Vec<Listener>,
        moved: Vec<MovedConnection>,
    ) -> Incumbent {
        Incumbent {
            control: ControlSocket::new(listener, &cfg),
            cfg,
            lock,
            kept,
            moved,
        }
    }

    /// The configuration this process started with (from [`Boot`]'s
    /// [`BootOptions`] and the environment).
    ///
    /// [`Boot`]: crate::Boot
    /// [`BootOptions`]: crate::BootOptions
    pub fn config(&self) -> &ProcessConfig {
        &self.cfg
    }

    /// The live connections the previous incumbent moved to this process
    /// during the handoff (protocol version 3; empty otherwise, and on a
    /// second call): serve each from its `unread` bytes, then its socket.
    /// They are this process's now — it is the incumbent — and their
    /// clients have not reconnected: take them before
    /// [`serve`](Self::serve), which blocks.
    ///
    /// Every one is a socket: a descriptor that is not (a broken peer) is
    /// closed here with a warning. The check is made here rather than as
    /// each batch arrived, where it would slow the drain.
    pub fn take_moved(&mut self) -> Vec<crate::MovedConnection> {
        let (sockets, others): (Vec<_>, Vec<_>) = std::mem::take(&mut self.moved)
            .into_iter()
            .partition(|c| crate::sys::is_socket(&c.fd));
        if !others.is_empty() {
            tracing::warn!(
                count = others.len(),
                "descriptors moved to this process that are not sockets were closed"
            );
        }
        sockets
    }

    /// Serves the control socket until this process is retired. Blocks the
    /// calling thread: run it on a thread of its own.
    ///
    /// Requests are served one at a time, on this thread (the protocol's
    /// one handoff at a time, and the service's hooks are called from one
    /// thread only). Reading a request is not: each connection is greeted
    /// and waited on by a short-lived thread of its own (at most 16 at
    /// once, each bounded by the hello budget and the idle timeout), so a
    /// connection that trickles its bytes or says nothing cannot keep the
    /// supervisor's own waiting.
    ///
    /// A failed accept for want of descriptors or memory is waited out:
    /// returning would make the service exit because its clients had used
    /// up its descriptors for a moment. Only a control socket that is
    /// itself gone ends the loop with an error.
    pub fn serve<D: Drainable>(self, service: &mut D) -> Result<Retired, ProcessError> {
        let Incumbent {
            cfg,
            mut lock,
            mut control,
            kept,
            moved,
        } = self;
        if !moved.is_empty() {
            // Moved to us and never taken: nobody here will read them, and
            // a client waiting on one would wait for ever. Closing them is
            // the honest end (we are the last holder: the client sees a
            // FIN and reconnects).
            tracing::warn!(target: "handoff::incumbent", count = moved.len(),
                "connections moved from the previous build were not taken (Incumbent::take_moved) before serve; closing them");
            drop(moved);
        }
        loop {
            let request = control.next_request()?;
            let mut cx = Ctx {
                cfg: &cfg,
                kept: &kept,
                control: &mut control,
                service: &mut *service,
            };
            let retired = match conversation::serve(request, lock, &mut cx)? {
                Outcome::Serving(held) => {
                    lock = held;
                    continue;
                }
                Outcome::Committed(handoff_id) => Retired::Committed { handoff_id },
                Outcome::SuccessorWon(handoff_id) => Retired::SuccessorWon { handoff_id },
                Outcome::Stopped { stop_id, lock } => {
                    // Held until the process exits, as `Retired::Stopped`
                    // promises: the process still finishes what is open,
                    // and nothing may take over the state meanwhile (a
                    // `handoff run` started again waits for it). Dropping
                    // it here would release it as `serve` returns.
                    std::mem::forget(lock);
                    Retired::Stopped { stop_id }
                }
            };
            tracing::info!(target: "handoff::incumbent", r = ?retired, "retiring");
            return Ok(retired);
        }
    }
}
