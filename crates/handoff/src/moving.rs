//! Moving live connections to the successor instead of closing them
//! (protocol version 3; docs/connection-transfer.md).
//!
//! A connection is three things, whatever the protocol above it: its
//! descriptor, the bytes already read from it and not consumed, and an
//! opaque state blob from the service. During a handoff's drain the service
//! [offers](Mover::offer) each connection that is between requests; a
//! thread of the library sends them to the supervisor in batches (each
//! batch one frame, its descriptors attached), which relays them to the
//! successor. The successor gets them back as [`MovedConnection`]s from
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

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::channel::Sender;
use crate::frame::FrameError;
use crate::protocol::{HandoffId, Message, MovedMeta};

/// Most unread bytes plus state one connection may carry. hyper's default
/// read buffer tops out near 400 KiB; a connection between requests holds at
/// most the start of the next one. Well inside one frame, so every batch
/// has room for at least one connection.
pub const MAX_CONNECTION_BYTES: usize = 256 * 1024;

/// How long the sender waits for a batch to fill once it has one offer: a
/// bound on what batching adds to a connection's move.
const GATHER: Duration = Duration::from_millis(1);

/// Room left in a frame for the batch's framing (lengths, ids).
const FRAME_SLACK: usize = 4096;

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

/// Why [`Mover::offer`] did not take a connection: close it as a drain
/// would have without moving (the connection is still entirely yours).
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

/// One offer, as the queue holds it until the sender thread takes it.
struct Offered {
    fd: OwnedFd,
    unread: Vec<u8>,
    state: Blob,
}

/// Most state bytes an offer keeps without a heap allocation.
const INLINE_STATE: usize = 62;

/// A state blob, kept inline when small (the usual: which listener).
///
/// An offer is made on a service thread and its bytes are freed on the
/// sender thread: with glibc every such free takes the allocating thread's
/// arena lock, and 10,000 of them in a drain contended with the service's
/// own allocations. The unread bytes are usually none (no allocation).
enum Blob {
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

    fn as_slice(&self) -> &[u8] {
        match self {
            Blob::Inline { len, bytes } => &bytes[..usize::from(*len)],
            Blob::Heap(v) => v,
        }
    }
}

#[derive(Default)]
struct Queue {
    open: bool,
    /// Offered and not yet taken by the sender thread.
    conns: Vec<Offered>,
    /// Connections the drain closed instead ([`Mover::closed`]).
    closed: u64,
    /// The sender thread is waiting on `more`: only then is an offer worth
    /// a wake-up (each one a `futex` call, and in a VM an interrupt to an
    /// idle CPU).
    waiting: bool,
}

struct Inner {
    moving: bool,
    /// Most descriptors per batch: the kernel's `SCM_MAX_FD` (253), or
    /// less under a low descriptor limit (`sys::fdpass::batch_for_limit`).
    batch: usize,
    /// Most descriptors in flight to the supervisor at once: a quarter of
    /// our limit and of the supervisor's (what it said in PrepareHandoffV3).
    window: usize,
    queue: Mutex<Queue>,
    /// Signalled on every offer and on close.
    more: Condvar,
}

/// Where a drain puts the connections it hands to the successor; what
/// [`Drainable::drain_moving`](crate::Drainable::drain_moving) gets.
///
/// Cheap to clone and `Send + Sync`: offer from whichever thread or task
/// holds the connection.
#[derive(Clone)]
pub struct Mover(Arc<Inner>);

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
        }))
    }

    /// A mover that takes nothing: a drain for `handoff stop`, or one whose
    /// peers do not speak version 3.
    pub fn disabled() -> Mover {
        Mover::new(false)
    }

    fn queue(&self) -> MutexGuard<'_, Queue> {
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
        if !self.queue().open {
            return Err(MoveRefused::Closed);
        }
        // A duplicate: the service keeps its own until the outcome. Made
        // outside the lock: a dup that grows the descriptor table sleeps
        // in the kernel (see `sys::fdpass::reserve_table`), and every other
        // offer would wait behind it.
        let fd = fd.try_clone_to_owned().map_err(MoveRefused::Dup)?;
        let mut q = self.queue();
        if !q.open {
            return Err(MoveRefused::Closed);
        }
        q.conns.push(Offered {
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
        Ok(())
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
    fn close(&self) {
        self.queue().open = false;
        self.0.more.notify_all();
    }

    /// Waits for the next batch: up to `batch` connections
    /// within one frame. `None` once closed and empty.
    ///
    /// Once the first offer is in, it waits up to [`GATHER`] for the batch
    /// to fill (or the offers to end): connections are offered one by one
    /// as each goes idle, and a frame per connection would cost the
    /// supervisor and the successor a relay per connection.
    fn next_batch(&self) -> Option<Vec<Offered>> {
        let mut q = self.queue();
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

/// What the sender thread did.
#[derive(Debug)]
pub(crate) struct Sent {
    pub(crate) moved: u64,
    pub(crate) closed: u64,
}

/// The thread that sends offered connections to the supervisor as they
/// come, so the duplicates live for the time of one batch, not the drain.
pub(crate) struct Flusher {
    mover: Mover,
    thread: Option<std::thread::JoinHandle<Result<u64, FrameError>>>,
}

impl Flusher {
    /// Starts sending `mover`'s offers on `sender` for handoff `id`; every
    /// write must finish by `deadline` (the handoff's).
    pub(crate) fn start(
        sender: Sender,
        id: HandoffId,
        mover: Mover,
        deadline: Instant,
    ) -> std::io::Result<Flusher> {
        let m = mover.clone();
        let thread = std::thread::Builder::new()
            .name("handoff-move".into())
            .spawn(move || {
                let mut moved = 0u64;
                let mut flight = crate::sys::fdpass::InFlight::new(m.0.window);
                let sent = loop {
                    let Some(batch) = m.next_batch() else {
                        break Ok(moved);
                    };
                    let left = deadline
                        .saturating_duration_since(Instant::now())
                        .max(Duration::from_millis(1));
                    if let Err(e) = sender.set_write_timeout(Some(left)) {
                        break Err(FrameError::Io(e));
                    }
                    // Within the window (`sys::fdpass::InFlight`): the
                    // kernel refuses descriptors past the user's limit.
                    if let Err(e) = sender.wait_room(&mut flight, batch.len(), deadline) {
                        break Err(FrameError::Io(e));
                    }
                    let fds: Vec<BorrowedFd<'_>> = batch.iter().map(|c| c.fd.as_fd()).collect();
                    let msg = Message::Connections {
                        handoff_id: id,
                        conns: batch
                            .iter()
                            .map(|c| MovedMeta {
                                unread: c.unread.clone(),
                                state: c.state.as_slice().to_vec(),
                            })
                            .collect(),
                    };
                    if let Err(e) = sender.send_with_fds(&msg, &fds) {
                        break Err(e);
                    }
                    sender.note_sent(&mut flight, fds.len());
                    crate::crash::point("o-in-transfer");
                    moved += batch.len() as u64;
                    // The duplicates close here: the supervisor's copies
                    // (in flight or received) keep the sockets open.
                };
                // Whatever is still queued was never sent: refuse further
                // offers and drop the duplicates (the service holds the
                // connections and keeps them on the outcome it learns).
                m.close();
                drop(std::mem::take(&mut m.queue().conns));
                let _ = sender.set_write_timeout(None);
                sent
            })?;
        Ok(Flusher {
            mover,
            thread: Some(thread),
        })
    }

    /// Closes the offers and waits until everything offered is sent.
    pub(crate) fn finish(mut self) -> Result<Sent, FrameError> {
        self.mover.close();
        let moved = match self.thread.take().map(|t| t.join()) {
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
        // Not finished (an abort): stop offers; the thread sends what is
        // queued within the deadline and ends.
        self.mover.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    const MAX_BATCH_FDS: usize = crate::sys::fdpass::MAX_FDS;

    #[test]
    fn batches_are_what_the_supervisor_can_take() {
        let m = Mover::moving_at_most(10);
        assert_eq!(m.0.batch, 10);
        assert_eq!(Mover::moving_at_most(0).0.batch, 1);
        assert!(Mover::moving_at_most(100_000).0.batch <= MAX_BATCH_FDS);
        let (a, _b) = UnixStream::pair().unwrap();
        for _ in 0..25 {
            m.offer(a.as_fd(), b"", b"").unwrap();
        }
        assert_eq!(m.next_batch().unwrap().len(), 10);
    }

    #[test]
    fn a_disabled_mover_refuses_and_keeps_nothing() {
        let m = Mover::disabled();
        let (a, _b) = UnixStream::pair().unwrap();
        assert!(!m.is_moving());
        assert!(matches!(
            m.offer(a.as_fd(), b"", b""),
            Err(MoveRefused::NotMoving)
        ));
    }

    /// The sender thread sends what is offered, in batches of at most 253
    /// descriptors, each frame's descriptors the offered sockets, in order.
    #[test]
    fn the_flusher_sends_every_offer_with_its_descriptor() {
        use crate::channel::Channel;
        let (ours, theirs) = UnixStream::pair().unwrap();
        let mut ours = Channel::new(ours);
        ours.set_version(crate::protocol::MOVE_SINCE);
        let mut theirs = Channel::new(theirs);
        theirs.set_version(crate::protocol::MOVE_SINCE);
        let m = Mover::new(true);
        let deadline = Instant::now() + Duration::from_secs(10);
        let f = Flusher::start(ours.sender().unwrap(), 7, m.clone(), deadline).unwrap();
        // Sockets whose peers we keep, to tell them apart after the move.
        let pairs: Vec<_> = (0..260).map(|_| UnixStream::pair().unwrap()).collect();
        for (i, (a, _)) in pairs.iter().enumerate() {
            m.offer(a.as_fd(), format!("u{i}").as_bytes(), b"s")
                .unwrap();
        }
        m.closed(2);
        let reader = std::thread::spawn(move || {
            let mut got = vec![];
            while got.len() < 260 {
                let (msg, fds) = theirs.recv_with_fds(Duration::from_secs(10)).unwrap();
                let Message::Connections { handoff_id, conns } = msg else {
                    panic!("{msg:?}")
                };
                assert_eq!(handoff_id, 7);
                assert_eq!(conns.len(), fds.len());
                assert!(fds.len() <= MAX_BATCH_FDS);
                got.extend(conns.into_iter().zip(fds));
            }
            got
        });
        let sent = f.finish().unwrap();
        assert_eq!((sent.moved, sent.closed), (260, 2));
        let got = reader.join().unwrap();
        for (i, (meta, fd)) in got.into_iter().enumerate() {
            assert_eq!(meta.unread, format!("u{i}").as_bytes());
            // The very socket: what is written to it comes out of its peer.
            let mut s = UnixStream::from(fd);
            std::io::Write::write_all(&mut s, &[i as u8]).unwrap();
            let mut b = [0u8; 1];
            std::io::Read::read_exact(&mut &pairs[i].1, &mut b).unwrap();
            assert_eq!(b[0], i as u8);
        }
        assert!(matches!(
            m.offer(pairs[0].0.as_fd(), b"", b""),
            Err(MoveRefused::Closed)
        ));
    }

    #[test]
    fn offers_are_checked_and_batched_within_the_limits() {
        let m = Mover::new(true);
        let (a, _b) = UnixStream::pair().unwrap();
        let big = vec![0u8; MAX_CONNECTION_BYTES + 1];
        assert!(matches!(
            m.offer(a.as_fd(), &big, b""),
            Err(MoveRefused::TooLarge { .. })
        ));
        let batch = m.0.batch;
        assert!((1..=MAX_BATCH_FDS).contains(&batch));
        for _ in 0..batch + 7 {
            m.offer(a.as_fd(), b"GET", b"s").unwrap();
        }
        assert_eq!(m.next_batch().unwrap().len(), batch);
        assert_eq!(m.next_batch().unwrap().len(), 7);
        // Big offers split by bytes: four of 256 KiB do not fit one frame.
        let quarter = vec![1u8; MAX_CONNECTION_BYTES];
        for _ in 0..4 {
            m.offer(a.as_fd(), &quarter, b"").unwrap();
        }
        assert_eq!(m.next_batch().unwrap().len(), 3);
        assert_eq!(m.next_batch().unwrap().len(), 1);
        m.close();
        assert!(m.next_batch().is_none());
        assert!(matches!(
            m.offer(a.as_fd(), b"", b""),
            Err(MoveRefused::Closed)
        ));
    }
}
