//! The thread that sends the queued connections to the supervisor, batch
//! after batch, within the window of descriptors in flight.

use std::os::fd::BorrowedFd;
use std::time::{Duration, Instant};

use super::queue::{Mover, Offered};
use crate::channel::Sender;
use crate::frame::FrameError;
use crate::protocol::{HandoffId, Message, MovedMeta};

/// What the sender thread did.
#[derive(Debug)]
pub(crate) struct Sent {
    pub(crate) moved: u64,
    pub(crate) closed: u64,
}

/// The thread that sends offered connections to the supervisor as they
/// come, so what it holds of them (duplicates, lent connections) is held
/// for the time of one batch, not the drain.
pub(crate) struct Flusher {
    mover: Mover,
    thread: Option<std::thread::JoinHandle<Result<u64, FrameError>>>,
    /// A send failed: nothing more moves in this handoff.
    failed: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Flusher {
    /// Starts sending `mover`'s offers on `sender` for handoff `id`; every
    /// write must finish by `deadline` (the handoff's). A send that fails
    /// fires `on_failure` (the drain's abort): nothing more can move, and a
    /// drain that went on would close every connection it had left — each
    /// a client reconnecting — where stopping lets the service serve them
    /// on (the successor that was to take them is gone, or stuck).
    pub(crate) fn start(
        sender: Sender,
        id: HandoffId,
        mover: Mover,
        deadline: Instant,
        on_failure: crate::AbortSignal,
    ) -> std::io::Result<Flusher> {
        let m = mover.clone();
        let failed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let fail = failed.clone();
        let thread = std::thread::Builder::new()
            .name("handoff-move".into())
            .spawn(move || {
                let mut moved = 0u64;
                let mut flight = crate::sys::fdpass::InFlight::new(m.0.window);
                let mut metas = Vec::new();
                let sent = loop {
                    let Some(batch) = m.next_batch() else {
                        break Ok(moved);
                    };
                    let n = batch.len() as u64;
                    let r = send_batch(&sender, &mut flight, id, batch, deadline, &m, &mut metas);
                    // The batch is gone: duplicates closed (the supervisor's
                    // copies, in flight or received, keep the sockets open),
                    // lent connections free to go back.
                    m.released();
                    if let Err(e) = r {
                        tracing::warn!(target: "handoff::incumbent", error = %e, "sending moved connections failed; the drain stops");
                        fail.store(true, std::sync::atomic::Ordering::SeqCst);
                        on_failure.fire();
                        break Err(e);
                    }
                    crate::crash::point("o-in-transfer");
                    moved += n;
                };
                // Whatever is still queued was never sent: refuse further
                // offers and drop it (the service holds the connections and
                // keeps them on the outcome it learns).
                m.close();
                m.drop_queued();
                let _ = sender.set_write_timeout(None);
                sent
            })?;
        Ok(Flusher {
            mover,
            thread: Some(thread),
            failed,
        })
    }

    /// Whether a send failed (the drain's abort fired for it).
    pub(crate) fn failed(&self) -> bool {
        self.failed.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Closes the offers and waits until everything offered is sent.
    pub(crate) fn finish(mut self) -> Result<Sent, FrameError> {
        self.mover.close();
        let joined = self.thread.take().map(|t| t.join());
        // Nothing is sent past this point, even if the thread panicked.
        self.mover.drop_queued();
        let moved = match joined {
            Some(Ok(r)) => r?,
            Some(Err(_)) => {
                return Err(FrameError::Io(std::io::Error::other(
                    "the thread sending moved connections panicked",
                )))
            }
            None => 0,
        };
        Ok(Sent {
            moved,
            closed: self.mover.queue().closed,
        })
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        // Not finished (an abort): stop offering and sending, and wait for
        // the batch being sent, if any (the handoff's deadline bounds each
        // write). When this returns nothing is sent any more: the service
        // may serve its connections again, and a lent one is its own.
        self.mover.abandon();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.mover.drop_queued();
    }
}

/// Sends one batch: its descriptors and, in the same frame, what goes with
/// each.
fn send_batch(
    sender: &Sender,
    flight: &mut crate::sys::fdpass::InFlight,
    id: HandoffId,
    batch: Vec<Offered>,
    deadline: Instant,
    mover: &Mover,
    metas: &mut Vec<MovedMeta>,
) -> Result<(), FrameError> {
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1));
    sender.set_write_timeout(Some(left))?;
    // Within the window (`sys::fdpass::InFlight`): the kernel refuses
    // descriptors past the user's limit. An abort stops the wait.
    let abandoned = || mover.queue().abandoned;
    sender.wait_room(flight, batch.len(), deadline, &abandoned)?;
    let fds: Vec<BorrowedFd<'_>> = batch.iter().map(|c| c.fd.as_fd()).collect();
    // The same buffers batch after batch: a few hundred small allocations
    // freed per batch would leave glibc's fast bins full, and the frame's
    // own allocation (past the small sizes) consolidates them all first —
    // it was half of this thread's time in a 10,000-connection drain.
    let mut conns = std::mem::take(metas);
    conns.truncate(batch.len());
    conns.resize_with(batch.len(), || MovedMeta {
        unread: Vec::new(),
        state: Vec::new(),
    });
    for (meta, c) in conns.iter_mut().zip(&batch) {
        meta.unread.clear();
        meta.unread.extend_from_slice(&c.unread);
        meta.state.clear();
        meta.state.extend_from_slice(c.state.as_slice());
    }
    let msg = Message::Connections {
        handoff_id: id,
        conns,
    };
    let sent = sender.send_with_fds(&msg, &fds);
    if let Message::Connections { conns, .. } = msg {
        *metas = conns;
    }
    sent?;
    sender.note_sent(flight, fds.len());
    Ok(())
}
