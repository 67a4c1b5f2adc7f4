//! A framed, versioned message channel over a Unix stream socket.
//!
//! Reads are always bounded: every receive arms `SO_RCVTIMEO` through
//! [`timeouts::arm`](crate::timeouts::arm) (with the BSD EINVAL tolerance)
//! or is explicitly documented as unbounded. Writes are serialised by a
//! mutex so a heartbeat thread can share the socket with the protocol thread
//! without interleaving frames.

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

    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Switches to the negotiated version for every frame after HelloAck.
    pub fn set_version(&mut self, v: ProtoVersion) {
        self.version = v;
    }

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

    /// A handle that can send from another thread (heartbeats).
    pub fn sender(&self) -> io::Result<Sender> {
        Ok(Sender {
            stream: self.stream.try_clone()?,
            write_lock: self.write_lock.clone(),
            version: self.version,
        })
    }

    fn arm(&self, timeout: Option<Duration>) -> Result<(), FrameError> {
        match timeout {
            Some(d) => {
                timeouts::arm(&self.stream, d, timeouts::TOLERATE_EINVAL)?;
            }
            None => self.stream.set_read_timeout(None)?,
        }
        Ok(())
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

    fn timed(
        start: Instant,
        r: Result<frame::Frame, FrameError>,
    ) -> Result<frame::Frame, FrameError> {
        r.map_err(|e| match e {
            FrameError::TimedOut { .. } => FrameError::TimedOut {
                waited_ms: start.elapsed().as_millis() as u64,
            },
            e => e,
        })
    }

    /// Receives one message, waiting at most `timeout` for each read
    /// (`None`: wait indefinitely — only for peers whose death we learn of
    /// by EOF, never for a peer that could merely hang).
    pub fn recv(&mut self, timeout: Option<Duration>) -> Result<Message, FrameError> {
        self.arm(timeout)?;
        let start = Instant::now();
        let f = Self::timed(start, frame::read_frame(&mut &self.stream))?;
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

    /// Reads one frame whose first chunk comes from `first` — a `recvmsg`
    /// that also collects the control message the sender attached (it
    /// arrives with the first byte of the frame, so the header read is
    /// where it must be taken).
    fn recv_with_ancillary<T>(
        &mut self,
        timeout: Duration,
        first: impl FnOnce(&UnixStream, &mut [u8]) -> io::Result<(usize, T)>,
    ) -> Result<(Message, T), FrameError> {
        self.arm(Some(timeout))?;
        let start = Instant::now();
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
        let mut reader = (&head[..n]).chain(&self.stream);
        let f = Self::timed(start, frame::read_frame(&mut reader))?;
        Ok((self.check(f)?, extra))
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
    pub fn send(&self, msg: &Message) -> Result<(), FrameError> {
        in_version(msg, self.version)?;
        let bytes = frame::encode(self.version, &msg.encode())?;
        let _g = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        (&self.stream).write_all(&bytes)?;
        Ok(())
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
