//! A framed, versioned message channel over a Unix stream socket.
//!
//! Reads are always bounded: every receive arms `SO_RCVTIMEO` through
//! `timeouts::arm` (with the BSD EINVAL tolerance, docs/design.md §5.3) or
//! is explicitly documented as unbounded. A bound is on the *whole
//! frame*, not on each read ([`read_frame_within`]): a peer that trickles a
//! byte just before each read's timeout would otherwise hold the reader for
//! as long as it likes (a status request trickled 1 byte / 4 s used to be
//! taken after 132 s). Writes are serialised by a mutex so a heartbeat
//! thread can share the socket with the protocol thread without
//! interleaving frames.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::frame::{self, FrameError};
use crate::protocol::{Message, ProtoVersion, HELLO_FRAME_VERSION};
use crate::sys::{self, PeerCred};
use crate::timeouts::{self, TimeoutSocket};

impl TimeoutSocket for UnixStream {
    fn set_read_timeout(&self, d: Option<Duration>) -> io::Result<()> {
        UnixStream::set_read_timeout(self, d)
    }

    fn peek_nonblocking(&self) -> io::Result<usize> {
        use nix::sys::socket::{recv, MsgFlags};
        let mut b = [0u8; 1];
        loop {
            match recv(
                self.as_raw_fd(),
                &mut b,
                MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
            ) {
                Ok(n) => return Ok(n),
                Err(nix::Error::EINTR) => continue,
                Err(e) => return Err(io::Error::from_raw_os_error(e as i32)),
            }
        }
    }
}

/// One end of a control channel.
#[derive(Debug)]
pub struct Channel {
    stream: UnixStream,
    write_lock: Arc<Mutex<()>>,
    version: ProtoVersion,
}

impl Channel {
    /// A channel on a connected stream, at the Hello frame version until
    /// [`set_version`](Self::set_version).
    pub fn new(stream: UnixStream) -> Channel {
        Channel {
            stream,
            write_lock: Arc::new(Mutex::new(())),
            version: HELLO_FRAME_VERSION,
        }
    }

    /// Whether the peer has sent anything or hung up, without blocking or
    /// consuming it: for a peer that must be silent (a prepared successor
    /// waiting for Begin), either means something is wrong.
    pub fn has_input(&self) -> bool {
        match self.stream.peek_nonblocking() {
            Ok(_) => true, // bytes, or 0 = EOF
            Err(e) => e.kind() != io::ErrorKind::WouldBlock,
        }
    }

    /// The underlying socket, for socket options and flow control; reading
    /// or writing it directly would break the framing.
    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Switches to the negotiated version for every frame after HelloAck.
    pub fn set_version(&mut self, v: ProtoVersion) {
        self.version = v;
    }

    /// The protocol version in use: 1 until HelloAck, then the negotiated
    /// one.
    pub fn version(&self) -> ProtoVersion {
        self.version
    }

    fn frame_version(&self, msg: &Message) -> ProtoVersion {
        match msg {
            Message::Hello(_) | Message::HelloAck { .. } => HELLO_FRAME_VERSION,
            _ => self.version,
        }
    }

    fn encode(&self, msg: &Message) -> Result<Vec<u8>, FrameError> {
        in_version(msg, self.version)?;
        frame::encode(self.frame_version(msg), &msg.encode())
    }

    /// Sends one message.
    pub fn send(&self, msg: &Message) -> Result<(), FrameError> {
        let bytes = self.encode(msg)?;
        let _g = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        (&self.stream).write_all(&bytes)?;
        Ok(())
    }

    /// Sends one message with the kernel attaching our credentials
    /// (`SCM_CREDENTIALS` on Linux).
    pub fn send_with_credentials(&self, msg: &Message) -> Result<(), FrameError> {
        let bytes = self.encode(msg)?;
        let _g = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        sys::send_with_credentials(&self.stream, &bytes)?;
        Ok(())
    }

    /// Sends one message with `fds` attached (`SCM_RIGHTS`).
    pub fn send_with_fds(
        &self,
        msg: &Message,
        fds: &[std::os::fd::BorrowedFd<'_>],
    ) -> Result<(), FrameError> {
        let bytes = self.encode(msg)?;
        let _g = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        sys::fdpass::send_with_fds(&self.stream, &bytes, fds)?;
        Ok(())
    }

    /// Receives one message and the descriptors attached to it.
    pub fn recv_with_fds(
        &mut self,
        timeout: Duration,
    ) -> Result<(Message, Vec<std::os::fd::OwnedFd>), FrameError> {
        self.recv_with_ancillary(timeout, sys::fdpass::recv_with_fds)
    }

    /// Waits up to `within` until `self` or `other` has something to read
    /// (a frame, or the peer's hang-up): `Some(true)` for `other`, `Some(false)`
    /// for `self`, `None` when neither. Lets one thread wait on a peer while
    /// noticing at once that another one went away.
    pub fn first_readable(&self, other: &Channel, within: Duration) -> io::Result<Option<bool>> {
        use std::os::fd::AsFd;
        let fds = [self.stream.as_fd(), other.stream.as_fd()];
        Ok(sys::poll::first_readable(&fds, within)?.map(|i| i == 1))
    }

    /// Waits up to `within` until the peer has sent something or hung up.
    pub fn readable_within(&self, within: Duration) -> io::Result<bool> {
        use std::os::fd::AsFd;
        Ok(sys::poll::first_readable(&[self.stream.as_fd()], within)?.is_some())
    }

    /// A handle that can send from another thread (heartbeats).
    pub fn sender(&self) -> io::Result<Sender> {
        Ok(Sender {
            stream: self.stream.try_clone()?,
            write_lock: self.write_lock.clone(),
            version: self.version,
        })
    }

    fn check(&self, f: frame::Frame) -> Result<Message, FrameError> {
        let msg = Message::decode(&f.payload)?;
        let expected = self.frame_version(&msg);
        if f.version != expected {
            return Err(FrameError::VersionMismatch {
                found: f.version,
                expected,
            });
        }
        in_version(&msg, self.version)?;
        Ok(msg)
    }

    /// Receives one message, which must arrive whole within `timeout`
    /// (`None`: wait indefinitely — only for peers whose death we learn of
    /// by EOF, never for a peer that could merely hang).
    pub fn recv(&mut self, timeout: Option<Duration>) -> Result<Message, FrameError> {
        let f = match timeout {
            Some(d) => read_frame_within(&self.stream, d)?,
            None => {
                self.stream.set_read_timeout(None)?;
                frame::read_frame(&mut &self.stream)?
            }
        };
        self.check(f)
    }

    /// Like [`recv`](Self::recv), also returning the credentials the kernel
    /// attached to the first chunk (requires `SO_PASSCRED` on this end).
    pub fn recv_with_credentials(
        &mut self,
        timeout: Duration,
    ) -> Result<(Message, Option<PeerCred>), FrameError> {
        self.recv_with_ancillary(timeout, sys::recv_with_credentials)
    }

    /// Receives one message and the descriptors attached to it, waiting as
    /// long as it takes (for a peer whose death we learn of by EOF, like
    /// [`recv`](Self::recv) with `None`): a successor waiting for Begin.
    pub fn recv_with_fds_blocking(
        &mut self,
    ) -> Result<(Message, Vec<std::os::fd::OwnedFd>), FrameError> {
        self.stream.set_read_timeout(None)?;
        let mut head = [0u8; frame::HEADER_LEN];
        let (n, fds) = sys::fdpass::recv_with_fds(&self.stream, &mut head)?;
        if n == 0 {
            return Err(FrameError::Closed);
        }
        let f = frame::read_frame(&mut (&head[..n]).chain(&self.stream))?;
        Ok((self.check(f)?, fds))
    }

    /// Reads one frame whose first chunk comes from `first` — a `recvmsg`
    /// that also collects the control message the sender attached (it
    /// arrives with the first byte of the frame, so the header read is
    /// where it must be taken).
    fn recv_with_ancillary<T>(
        &mut self,
        timeout: Duration,
        first: impl FnOnce(&UnixStream, &mut [u8]) -> io::Result<(usize, T)>,
    ) -> Result<(Message, T), FrameError> {
        let start = Instant::now();
        let deadline = start + timeout;
        timeouts::arm(&self.stream, timeout, timeouts::TOLERATE_EINVAL)?;
        let mut head = [0u8; frame::HEADER_LEN];
        let (n, extra) = match first(&self.stream, &mut head) {
            Ok(v) => v,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(FrameError::TimedOut {
                    waited_ms: start.elapsed().as_millis() as u64,
                })
            }
            Err(e) => return Err(e.into()),
        };
        if n == 0 {
            return Err(FrameError::Closed);
        }
        let mut reader = (&head[..n]).chain(ByDeadline {
            stream: &self.stream,
            deadline,
        });
        let f = timed(start, frame::read_frame(&mut reader))?;
        Ok((self.check(f)?, extra))
    }
}

/// Reads one frame from `stream`, all of which must arrive within
/// `timeout` — however the peer splits it. Before each read the time left
/// is armed as the socket's `SO_RCVTIMEO`, so a peer that sends a byte
/// just before every read's timeout gains nothing: the frame still has to
/// be complete by the deadline or it is [`FrameError::TimedOut`] (with the
/// time actually waited). The length is checked before anything is
/// allocated, as in [`frame::read_frame`], which does the parsing.
///
/// What a deadline cannot bound is a socket that ignores `SO_RCVTIMEO`:
/// none does on the platforms we build for, bar the BSD quirk
/// `timeouts::arm` copes with (a peer that has shut down completely, so
/// the read cannot block).
pub fn read_frame_within(
    stream: &UnixStream,
    timeout: Duration,
) -> Result<frame::Frame, FrameError> {
    let start = Instant::now();
    let mut reader = ByDeadline {
        stream,
        deadline: start + timeout,
    };
    timed(start, frame::read_frame(&mut reader))
}

/// Fills in how long a timed-out read waited in all (the frame reader
/// does not know when the wait began).
fn timed(start: Instant, r: Result<frame::Frame, FrameError>) -> Result<frame::Frame, FrameError> {
    r.map_err(|e| match e {
        FrameError::TimedOut { .. } => FrameError::TimedOut {
            waited_ms: start.elapsed().as_millis() as u64,
        },
        e => e,
    })
}

/// A reader whose every read may only wait until `deadline`: the time left
/// is armed before each read, and none is left is a timeout.
struct ByDeadline<'a> {
    stream: &'a UnixStream,
    deadline: Instant,
}

impl Read for ByDeadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        timeouts::arm(self.stream, left, timeouts::TOLERATE_EINVAL)?;
        let mut s = self.stream;
        s.read(buf)
    }
}

/// Whether `msg` exists in protocol `version` (the channel's negotiated
/// one). Checked on both ends of every channel, so a message a newer build
/// added never reaches, nor is taken from, a peer that negotiated less: the
/// version gate is enforced here once, not at each place that sends one.
fn in_version(msg: &Message, version: ProtoVersion) -> Result<(), FrameError> {
    let since = msg.since();
    if since > version {
        return Err(FrameError::NotInVersion {
            message: msg.name(),
            since,
            version,
        });
    }
    Ok(())
}

/// Sending half of a [`Channel`], for a heartbeat thread.
#[derive(Debug)]
pub struct Sender {
    stream: UnixStream,
    write_lock: Arc<Mutex<()>>,
    version: ProtoVersion,
}

impl Sender {
    /// Sends one message, as [`Channel::send`] does, from another thread;
    /// frames never interleave with the channel's own.
    pub fn send(&self, msg: &Message) -> Result<(), FrameError> {
        in_version(msg, self.version)?;
        let bytes = frame::encode(self.version, &msg.encode())?;
        let _g = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        (&self.stream).write_all(&bytes)?;
        Ok(())
    }

    /// Sends one message with `fds` attached (`SCM_RIGHTS`), as
    /// [`Channel::send_with_fds`] does, from another thread.
    pub fn send_with_fds(
        &self,
        msg: &Message,
        fds: &[std::os::fd::BorrowedFd<'_>],
    ) -> Result<(), FrameError> {
        in_version(msg, self.version)?;
        let bytes = frame::encode(self.version, &msg.encode())?;
        let _g = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        sys::fdpass::send_with_fds(&self.stream, &bytes, fds)?;
        Ok(())
    }

    /// Waits until `n` more descriptors fit in `flight`'s window, or
    /// `deadline` (see `sys::fdpass::InFlight`: the flow control that keeps
    /// descriptors in flight under the user's limit).
    pub fn wait_room(
        &self,
        flight: &mut sys::fdpass::InFlight,
        n: usize,
        deadline: Instant,
        stop: &dyn Fn() -> bool,
    ) -> io::Result<()> {
        flight.wait_room(&self.stream, n, deadline, stop)
    }

    /// Records in `flight` a batch of `fds` descriptors just sent.
    pub fn note_sent(&self, flight: &mut sys::fdpass::InFlight, fds: usize) {
        flight.sent(&self.stream, fds);
    }

    /// Bounds every write on this connection (all its senders share the
    /// socket): `None` lifts the bound.
    pub fn set_write_timeout(&self, d: Option<Duration>) -> io::Result<()> {
        self.stream.set_write_timeout(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recv_times_out_and_reports_wait() {
        let (a, _b) = UnixStream::pair().unwrap();
        let mut c = Channel::new(a);
        match c.recv(Some(Duration::from_millis(50))) {
            Err(FrameError::TimedOut { waited_ms }) => assert!(waited_ms >= 40, "{waited_ms}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn negotiated_version_is_enforced_after_hello() {
        let (a, b) = UnixStream::pair().unwrap();
        let tx = Channel::new(a);
        let mut rx = Channel::new(b);
        rx.set_version(2);
        // A non-hello frame in version 1 when 2 was negotiated.
        tx.send(&Message::Commit { handoff_id: 1 }).unwrap();
        assert!(matches!(
            rx.recv(Some(Duration::from_secs(1))),
            Err(FrameError::VersionMismatch {
                found: 1,
                expected: 2
            })
        ));
    }

    /// A channel negotiated at version 1 (an older peer) neither sends nor
    /// accepts a message that version 2 added; at version 2 it carries it.
    #[test]
    fn messages_newer_than_the_channel_are_refused_both_ways() {
        let shutdown = Message::Shutdown {
            stop_id: 4,
            drain_grace_ms: 1000,
        };
        let (a, b) = UnixStream::pair().unwrap();
        let mut tx = Channel::new(a);
        let mut rx = Channel::new(b);
        tx.set_version(1);
        rx.set_version(1);
        assert!(matches!(
            tx.send(&shutdown),
            Err(FrameError::NotInVersion {
                message: "Shutdown",
                since: 2,
                version: 1
            })
        ));
        assert!(matches!(
            tx.sender().unwrap().send(&shutdown),
            Err(FrameError::NotInVersion { .. })
        ));
        // Nothing was written: the next frame is the next message.
        tx.send(&Message::Commit { handoff_id: 1 }).unwrap();
        assert_eq!(
            rx.recv(Some(Duration::from_secs(1))).unwrap(),
            Message::Commit { handoff_id: 1 }
        );
        // A version-2 peer writing it on a channel this end negotiated at 1
        // (a broken or hostile peer): refused on receipt as well.
        let (a, b) = UnixStream::pair().unwrap();
        let mut tx = Channel::new(a);
        let mut rx = Channel::new(b);
        tx.set_version(2);
        rx.set_version(1);
        let raw = frame::encode(1, &shutdown.encode()).unwrap();
        tx.stream().write_all(&raw).unwrap();
        assert!(matches!(
            rx.recv(Some(Duration::from_secs(1))),
            Err(FrameError::NotInVersion {
                message: "Shutdown",
                ..
            })
        ));
        // At version 2 both ways work.
        let (a, b) = UnixStream::pair().unwrap();
        let mut tx = Channel::new(a);
        let mut rx = Channel::new(b);
        tx.set_version(2);
        rx.set_version(2);
        tx.send(&shutdown).unwrap();
        assert_eq!(rx.recv(Some(Duration::from_secs(1))).unwrap(), shutdown);
    }

    /// Writes `bytes` one at a time, `gap` apart, until done or the reader
    /// hangs up: a peer that keeps every single read within its timeout.
    fn trickle(to: UnixStream, bytes: Vec<u8>, gap: Duration) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            for b in bytes {
                if (&to).write_all(&[b]).is_err() {
                    return;
                }
                std::thread::sleep(gap);
            }
        })
    }

    /// The bound is on the frame, not on each read: 60 bytes 20 ms apart
    /// (each read well within 300 ms; the whole, 1.2 s, not) time out at
    /// about 300 ms, and say how long they waited. A frame in pieces that
    /// all come in time is read whole.
    #[test]
    fn a_trickled_frame_times_out_at_the_frame_deadline() {
        let (a, b) = UnixStream::pair().unwrap();
        let raw = frame::encode(1, &Message::Commit { handoff_id: 5 }.encode()).unwrap();
        let writer = trickle(b, raw, Duration::from_millis(1));
        let mut c = Channel::new(a);
        assert_eq!(
            c.recv(Some(Duration::from_secs(10))).unwrap(),
            Message::Commit { handoff_id: 5 }
        );
        writer.join().unwrap();

        let (a, b) = UnixStream::pair().unwrap();
        let raw = frame::encode(1, &Message::Commit { handoff_id: 1 }.encode()).unwrap();
        let mut raw = raw;
        raw.resize(60, 0); // more than the frame: whatever follows is never read
        let writer = trickle(b, raw, Duration::from_millis(20));
        let mut c = Channel::new(a);
        let t = Instant::now();
        match c.recv(Some(Duration::from_millis(300))) {
            Err(FrameError::TimedOut { waited_ms }) => {
                assert!((250..1000).contains(&waited_ms), "{waited_ms}")
            }
            other => panic!("{other:?} after {:?}", t.elapsed()),
        }
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
        drop(c);
        writer.join().unwrap();
    }

    /// The same for a frame read with its ancillary data (the successor's
    /// Hello with `SCM_CREDENTIALS`), whose first read is a `recvmsg`.
    #[test]
    fn a_trickled_frame_with_credentials_times_out_at_the_frame_deadline() {
        let (a, b) = UnixStream::pair().unwrap();
        sys::creds::enable_passcred(&a).unwrap();
        let raw = frame::encode(1, &Message::Commit { handoff_id: 1 }.encode()).unwrap();
        let writer = trickle(b, raw, Duration::from_millis(40));
        let mut c = Channel::new(a);
        let t = Instant::now();
        match c.recv_with_credentials(Duration::from_millis(300)) {
            Err(FrameError::TimedOut { waited_ms }) => {
                assert!((250..1000).contains(&waited_ms), "{waited_ms}")
            }
            other => panic!("{other:?} after {:?}", t.elapsed()),
        }
        drop(c);
        writer.join().unwrap();
    }

    #[test]
    fn closed_peer_is_closed_not_truncated() {
        let (a, b) = UnixStream::pair().unwrap();
        drop(b);
        let mut c = Channel::new(a);
        assert!(matches!(
            c.recv(Some(Duration::from_secs(1))),
            Err(FrameError::Closed)
        ));
    }
}
