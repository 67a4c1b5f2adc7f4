//! The queue between the service's threads, which offer or lend
//! connections, and the sender thread, which takes them in batches.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::connection::{MoveRefused, MAX_CONNECTION_BYTES};

/// How long the sender waits for a batch to fill once it has one offer: a
/// bound on what batching adds to a connection's move.
const GATHER: Duration = Duration::from_millis(1);

/// Room left in a frame for the batch's framing (lengths, ids).
const FRAME_SLACK: usize = 4096;

/// One offer, as the queue holds it until the sender thread takes it.
pub(super) struct Offered {
    pub(super) fd: Held,
    pub(super) unread: Vec<u8>,
    pub(super) state: Blob,
}

/// An offered connection's descriptor, alive until its batch is sent.
pub(super) enum Held {
    /// A duplicate ([`Mover::offer`]): closed once sent.
    Dup(OwnedFd),
    /// The service's connection itself ([`Mover::lend`]): this reference
    /// keeps it open until sent, then [`Lent::take_back`] has it alone.
    Lent(Arc<dyn AsFd + Send + Sync>),
}

impl Held {
    pub(super) fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Held::Dup(fd) => fd.as_fd(),
            Held::Lent(conn) => conn.as_fd(),
        }
    }
}

/// Most state bytes an offer keeps without a heap allocation.
const INLINE_STATE: usize = 62;

/// A state blob, kept inline when small (the usual: which listener).
///
/// An offer is made on a service thread and its bytes are freed on the
/// sender thread: with glibc every such free takes the allocating thread's
/// arena lock, and 10,000 of them in a drain contended with the service's
/// own allocations. The unread bytes are usually none (no allocation).
pub(super) enum Blob {
    Inline { len: u8, bytes: [u8; INLINE_STATE] },
    Heap(Vec<u8>),
}

impl Blob {
    fn new(state: &[u8]) -> Blob {
        match u8::try_from(state.len()) {
            Ok(len) if state.len() <= INLINE_STATE => {
                let mut bytes = [0u8; INLINE_STATE];
                bytes[..state.len()].copy_from_slice(state);
                Blob::Inline { len, bytes }
            }
            _ => Blob::Heap(state.to_vec()),
        }
    }

    pub(super) fn as_slice(&self) -> &[u8] {
        match self {
            Blob::Inline { len, bytes } => &bytes[..usize::from(*len)],
            Blob::Heap(v) => v,
        }
    }
}

#[derive(Default)]
pub(super) struct Queue {
    pub(super) open: bool,
    /// Offered and not yet taken by the sender thread (a batch leaves from
    /// the front while offers come in at the back).
    conns: std::collections::VecDeque<Offered>,
    /// Connections the drain closed instead ([`Mover::closed`]).
    pub(super) closed: u64,
    /// The sender thread is waiting on `more`: only then is an offer worth
    /// a wake-up (each one a `futex` call, and in a VM an interrupt to an
    /// idle CPU).
    waiting: bool,
    /// The handoff aborted: what is queued is dropped, not sent.
    pub(super) abandoned: bool,
    /// [`Lent::take_back`] calls waiting on `released`.
    pub(super) takers: usize,
}

pub(super) struct Inner {
    moving: bool,
    /// Most descriptors per batch: the kernel's `SCM_MAX_FD` (253), or
    /// less under a low descriptor limit (`sys::fdpass::batch_for_limit`).
    pub(super) batch: usize,
    /// Most descriptors in flight to the supervisor at once: a quarter of
    /// our limit and of the supervisor's (what it said in PrepareHandoffV3).
    pub(super) window: usize,
    queue: Mutex<Queue>,
    /// Signalled on every offer and on close.
    more: Condvar,
    /// Signalled when the sender let go of lent connections (a batch sent
    /// or dropped), for [`Lent::take_back`].
    released: Condvar,
}

/// Where a drain puts the connections it hands to the successor; what
/// [`Drainable::drain_moving`](crate::Drainable::drain_moving) gets.
///
/// Cheap to clone and `Send + Sync`: offer from whichever thread or task
/// holds the connection.
#[derive(Clone)]
pub struct Mover(pub(super) Arc<Inner>);

impl std::fmt::Debug for Mover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mover")
            .field("moving", &self.0.moving)
            .finish_non_exhaustive()
    }
}

impl Mover {
    /// A mover for a handoff that moves connections (`moving`) or not.
    pub(crate) fn new(moving: bool) -> Mover {
        Mover(Arc::new(Inner {
            moving,
            batch: crate::sys::fdpass::batch_for_limit(None),
            window: crate::sys::fdpass::window_for_limit(None),
            queue: Mutex::new(Queue {
                open: moving,
                ..Queue::default()
            }),
            more: Condvar::new(),
            released: Condvar::new(),
        }))
    }

    /// A mover for a handoff that moves connections, with at most
    /// `max_in_flight` descriptors on their way to the supervisor (what it
    /// can take in) and at most what our own descriptor limit allows; a
    /// batch is at most 253 of them.
    pub(crate) fn moving_at_most(max_in_flight: usize) -> Mover {
        let m = Mover::new(true);
        Mover(Arc::new(Inner {
            moving: true,
            batch: m.0.batch.min(max_in_flight).max(1),
            window: m.0.window.min(max_in_flight).max(1),
            queue: Mutex::new(Queue {
                open: true,
                ..Queue::default()
            }),
            more: Condvar::new(),
            released: Condvar::new(),
        }))
    }

    /// A mover that takes nothing: a drain for `handoff stop`, or one whose
    /// peers do not speak version 3.
    pub fn disabled() -> Mover {
        Mover::new(false)
    }

    pub(super) fn queue(&self) -> MutexGuard<'_, Queue> {
        self.0.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether this drain moves connections at all. When it does not,
    /// every offer is refused: close connections as before.
    pub fn is_moving(&self) -> bool {
        self.0.moving
    }

    /// Hands a connection that is between requests to the successor.
    ///
    /// Call it only once you have stopped reading `fd`, with the bytes you
    /// read from it and did not consume (`unread`) and anything the next
    /// owner needs (`state`). On `Ok` the connection is the successor's if
    /// the handoff commits: keep `fd` open and unread until
    /// [`Drainable::retire`](crate::Drainable::retire) (then close it: no
    /// FIN goes out, the successor holds the socket) or
    /// [`Drainable::resume`](crate::Drainable::resume) (the handoff
    /// aborted: serve it again, from `unread`). On `Err` nothing was sent:
    /// the connection is yours to close as a drain would.
    pub fn offer(
        &self,
        fd: BorrowedFd<'_>,
        unread: &[u8],
        state: &[u8],
    ) -> Result<(), MoveRefused> {
        self.admit(unread, state)?;
        if !self.queue().open {
            return Err(MoveRefused::Closed);
        }
        // A duplicate: the service keeps its own until the outcome. Made
        // outside the lock: a dup that grows the descriptor table sleeps
        // in the kernel (see `sys::fdpass::reserve_table`), and every other
        // offer would wait behind it.
        let fd = fd.try_clone_to_owned().map_err(MoveRefused::Dup)?;
        let q = self.queue();
        if !q.open {
            return Err(MoveRefused::Closed);
        }
        self.push(q, Held::Dup(fd), unread, state);
        Ok(())
    }

    /// Hands a connection that is between requests to the successor, as
    /// [`offer`](Mover::offer) does, without duplicating its descriptor:
    /// the mover holds `conn` itself until it is sent.
    ///
    /// Get it back with [`Lent::take_back`] once the outcome is known
    /// ([`Drainable::retire`](crate::Drainable::retire): close it, no FIN
    /// goes out; [`Drainable::resume`](crate::Drainable::resume): serve it
    /// again, from `unread`). Dropping the [`Lent`] instead closes it once
    /// sent. On `Err` nothing was sent and `conn` comes back with the
    /// reason.
    pub fn lend<C>(&self, conn: C, unread: &[u8], state: &[u8]) -> Result<Lent<C>, (C, MoveRefused)>
    where
        C: AsFd + Send + Sync + 'static,
    {
        if let Err(e) = self.admit(unread, state) {
            return Err((conn, e));
        }
        if !self.queue().open {
            return Err((conn, MoveRefused::Closed));
        }
        // Allocated outside the lock: every other offer would wait behind
        // a `malloc` that waits for an allocator lock.
        let lent = Lent {
            conn: Arc::new(conn),
            mover: self.clone(),
        };
        let q = self.queue();
        if !q.open {
            drop(q);
            // Closed meanwhile. Never shared, so back at once.
            return Err((lent.take_back(), MoveRefused::Closed));
        }
        self.push(q, Held::Lent(lent.conn.clone()), unread, state);
        Ok(lent)
    }

    /// Whether an offer of `unread` and `state` may move at all.
    fn admit(&self, unread: &[u8], state: &[u8]) -> Result<(), MoveRefused> {
        if !self.0.moving {
            return Err(MoveRefused::NotMoving);
        }
        let bytes = unread.len() + state.len();
        if bytes > MAX_CONNECTION_BYTES {
            return Err(MoveRefused::TooLarge {
                bytes,
                max: MAX_CONNECTION_BYTES,
            });
        }
        Ok(())
    }

    /// Queues an offer (the queue is open: checked under the same lock).
    fn push(&self, mut q: MutexGuard<'_, Queue>, fd: Held, unread: &[u8], state: &[u8]) {
        q.conns.push_back(Offered {
            fd,
            unread: unread.to_vec(),
            state: Blob::new(state),
        });
        // Wake the sender, if it waits, for a first offer or a full batch
        // only: it gathers the ones in between itself (see `next_batch`).
        let wake = q.waiting && (q.conns.len() == 1 || q.conns.len() >= self.0.batch);
        drop(q);
        if wake {
            self.0.more.notify_all();
        }
    }

    /// The sender let go of what it held of lent connections: wake the
    /// [`Lent::take_back`] calls waiting for theirs.
    pub(super) fn released(&self) {
        if self.queue().takers > 0 {
            self.0.released.notify_all();
        }
    }

    /// Drops what is queued and not sent (the handoff aborted, or the
    /// sender stopped): lent connections go back to their owners.
    pub(super) fn drop_queued(&self) {
        let dropped = std::mem::take(&mut self.queue().conns);
        drop(dropped);
        self.released();
    }

    /// Offers queued and not yet taken by the sender thread.
    pub(crate) fn queued(&self) -> usize {
        self.queue().conns.len()
    }

    /// Counts `n` connections this drain closed rather than moved (HTTP/2,
    /// an upgraded connection, one refused): the upgrade report shows them
    /// beside the moved ones.
    pub fn closed(&self, n: u64) {
        self.queue().closed += n;
    }

    /// Ends the offers: later ones are refused with [`MoveRefused::Closed`].
    pub(super) fn close(&self) {
        self.queue().open = false;
        self.0.more.notify_all();
    }

    /// Ends the offers and the sending: what is queued stays unsent.
    pub(super) fn abandon(&self) {
        let mut q = self.queue();
        q.open = false;
        q.abandoned = true;
        drop(q);
        self.0.more.notify_all();
    }

    /// Waits for the next batch: up to `batch` connections
    /// within one frame. `None` once closed and empty.
    ///
    /// Once the first offer is in, it waits up to [`GATHER`] for the batch
    /// to fill (or the offers to end): connections are offered one by one
    /// as each goes idle, and a frame per connection would cost the
    /// supervisor and the successor a relay per connection.
    pub(super) fn next_batch(&self) -> Option<Vec<Offered>> {
        let mut q = self.queue();
        if q.abandoned {
            return None;
        }
        while q.conns.is_empty() {
            if !q.open {
                return None;
            }
            q.waiting = true;
            q = self.0.more.wait(q).unwrap_or_else(|p| p.into_inner());
            q.waiting = false;
        }
        let until = Instant::now() + GATHER;
        while q.open && q.conns.len() < self.0.batch {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            q.waiting = true;
            q = self
                .0
                .more
                .wait_timeout(q, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
            q.waiting = false;
        }
        if q.abandoned {
            return None;
        }
        let budget = crate::frame::MAX_PAYLOAD - FRAME_SLACK;
        let mut used = 0;
        let mut n = 0;
        for c in q.conns.iter().take(self.0.batch) {
            let size = c.unread.len() + c.state.as_slice().len() + 16;
            if n > 0 && used + size > budget {
                break;
            }
            used += size;
            n += 1;
        }
        Some(q.conns.drain(..n).collect())
    }
}

/// A connection [lent](Mover::lend) to the mover: get it back with
/// [`take_back`](Lent::take_back) once the handoff's outcome is known.
#[must_use = "dropping a Lent closes the connection once it is sent"]
pub struct Lent<C> {
    conn: Arc<C>,
    mover: Mover,
}

impl<C> std::fmt::Debug for Lent<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lent").finish_non_exhaustive()
    }
}

impl<C> Lent<C> {
    /// The connection, back from the mover.
    ///
    /// Call it once [`Drainable::retire`](crate::Drainable::retire) or
    /// [`Drainable::resume`](crate::Drainable::resume) has been called:
    /// by then the sender thread has sent the connection or dropped it, so
    /// this returns at once. Called earlier, it waits until the batch that
    /// carries the connection has been sent (the handoff's deadline bounds
    /// that).
    pub fn take_back(self) -> C {
        let Lent { mut conn, mover } = self;
        let mut q = mover.queue();
        loop {
            // The sender drops its reference before it takes the lock to
            // wake us: a check under the lock cannot miss that wake-up.
            match Arc::try_unwrap(conn) {
                Ok(c) => return c,
                Err(shared) => conn = shared,
            }
            q.takers += 1;
            q = mover.0.released.wait(q).unwrap_or_else(|p| p.into_inner());
            q.takers -= 1;
        }
    }
}
