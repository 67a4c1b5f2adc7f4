//! The two clocks that bound every read (docs/design.md §5), and the macOS/BSD
//! `SO_RCVTIMEO` quirk.
//!
//! * **Liveness**, per frame: no whole frame for [`Timeouts::liveness`]
//!   means the peer is dead or wedged. Heartbeats reset it, so a long drain
//!   that keeps heartbeating is never mistaken for death. The bound is on
//!   the whole frame, not on each read (`channel::read_frame_within`): a
//!   peer sending a byte at a time must not stretch it.
//! * **Wall clock**, per phase: a [`PhaseClock`] caps the whole phase; a read
//!   waiting on a reply gets [`Timeouts::wire_slack`] past the cap so a reply
//!   already on the wire when the cap passes is still taken.

use std::io;
use std::time::{Duration, Instant};

/// Every timeout of the protocol. Defaults are docs/design.md §5.2's; all are
/// configurable so tests can shorten them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Longest a frame may take to arrive whole, silence included.
    pub liveness: Duration,
    /// Budget for receiving a peer's Hello. For a successor this includes
    /// its warm-up: it says Hello once warm.
    pub hello: Duration,
    /// Wall-clock budget for the incumbent to report Drained.
    pub drain_grace: Duration,
    /// Wall-clock budget for everything from the start through Ready.
    pub deadline: Duration,
    /// Extra time a read gets past its phase cap.
    pub wire_slack: Duration,
    /// No read is armed with less than this.
    pub read_floor: Duration,
    /// How often an incumbent (or a successor in its health check)
    /// heartbeats while busy.
    pub heartbeat: Duration,
    /// How long an aborted successor that is still answering gets to exit
    /// by itself before it is killed. A successor that accepts connections
    /// before Begin (a stateless service, see [`crate::Begun::ready`])
    /// finishes them in this time instead of having them reset; one that
    /// accepted nothing exits at once on Abort. A successor that stopped
    /// answering (timed out, hung up) is killed without waiting.
    pub abort_grace: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            liveness: Duration::from_secs(10),
            hello: Duration::from_secs(5),
            drain_grace: Duration::from_secs(60),
            deadline: Duration::from_secs(300),
            wire_slack: Duration::from_secs(1),
            read_floor: Duration::from_millis(100),
            heartbeat: Duration::from_secs(2),
            abort_grace: Duration::from_secs(5),
        }
    }
}

impl Timeouts {
    /// Defaults, with the heartbeat interval taken from `HANDOFF_HEARTBEAT_MS`
    /// when set (a test knob: the heartbeat is the process side's to choose,
    /// and tests shorten the supervisor's liveness to match).
    pub fn from_env() -> Timeouts {
        let mut t = Timeouts::default();
        if let Some(ms) = std::env::var("HANDOFF_HEARTBEAT_MS")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|v| *v > 0)
        {
            t.heartbeat = Duration::from_millis(ms);
        }
        t
    }

    /// Timeout for receiving one frame: liveness, but never past the phase
    /// cap plus wire slack, and never below the floor.
    pub(crate) fn read_timeout(&self, clock: &PhaseClock, now: Instant) -> Duration {
        let phase_left = clock.remaining(now) + self.wire_slack;
        self.liveness.min(phase_left).max(self.read_floor)
    }
}

/// Wall clock of one phase.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PhaseClock {
    pub(crate) started: Instant,
    pub(crate) cap: Duration,
}

impl PhaseClock {
    pub fn start(cap: Duration) -> PhaseClock {
        PhaseClock {
            started: Instant::now(),
            cap,
        }
    }

    pub fn remaining(&self, now: Instant) -> Duration {
        self.cap
            .saturating_sub(now.saturating_duration_since(self.started))
    }

    /// True once the cap *and* the wire slack have passed.
    pub fn expired(&self, now: Instant, slack: Duration) -> bool {
        now.saturating_duration_since(self.started) > self.cap + slack
    }
}

/// What a socket must offer for its read timeout to be armed. A seam: the
/// BSD-only EINVAL path is unit-tested on Linux through a fake.
pub trait TimeoutSocket {
    fn set_read_timeout(&self, d: Option<Duration>) -> io::Result<()>;
    /// Non-blocking `MSG_PEEK` of one byte: `Ok(0)` is EOF, `Ok(n)` means
    /// data is buffered, `Err(WouldBlock)` means open and empty.
    fn peek_nonblocking(&self) -> io::Result<usize>;
}

/// How the next read was armed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Armed {
    /// The timeout is set; a blocked read will return `WouldBlock`.
    WithTimeout,
    /// The kernel refused the timeout because the peer has fully shut the
    /// socket down, and a peek confirmed that a read cannot block (data is
    /// buffered, or EOF). Read without a timeout.
    CannotBlock,
}

/// Arms `d` as the socket's read timeout.
///
/// macOS and the BSDs fail `setsockopt(SO_RCVTIMEO)` with EINVAL once the
/// peer has shut the socket down completely. That is not an error for us —
/// the frame may already be buffered, or the read will see EOF — so with
/// `tolerate_einval` we confirm with a non-blocking peek that the read cannot
/// block and go on without a timeout. A genuine EINVAL (open, empty socket)
/// is still an error: reading then could block forever.
pub fn arm<S: TimeoutSocket>(sock: &S, d: Duration, tolerate_einval: bool) -> io::Result<Armed> {
    match sock.set_read_timeout(Some(d.max(Duration::from_millis(1)))) {
        Ok(()) => Ok(Armed::WithTimeout),
        Err(e) if tolerate_einval && e.raw_os_error() == Some(libc::EINVAL) => {
            match sock.peek_nonblocking() {
                Ok(_) => Ok(Armed::CannotBlock),
                Err(p) if p.kind() == io::ErrorKind::WouldBlock => Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("setting the read timeout failed ({e}) on an open socket with nothing to read"),
                )),
                Err(p) => Err(p),
            }
        }
        Err(e) => Err(e),
    }
}

/// Whether this platform needs the EINVAL tolerance. Linux never takes it.
pub const TOLERATE_EINVAL: bool = cfg!(any(
    target_os = "macos",
    target_os = "ios",
    target_os = "freebsd",
    target_os = "openbsd",
    target_os = "netbsd",
    target_os = "dragonfly"
));

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    struct Fake {
        set: io::Result<()>,
        peek: Cell<Option<io::Result<usize>>>,
        peeked: Cell<bool>,
    }

    impl Fake {
        fn new(set: io::Result<()>, peek: io::Result<usize>) -> Fake {
            Fake {
                set,
                peek: Cell::new(Some(peek)),
                peeked: Cell::new(false),
            }
        }
    }

    impl TimeoutSocket for Fake {
        fn set_read_timeout(&self, _: Option<Duration>) -> io::Result<()> {
            match &self.set {
                Ok(()) => Ok(()),
                Err(e) => Err(io::Error::from_raw_os_error(e.raw_os_error().unwrap())),
            }
        }
        fn peek_nonblocking(&self) -> io::Result<usize> {
            self.peeked.set(true);
            self.peek.take().unwrap()
        }
    }

    fn einval() -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::EINVAL))
    }

    #[test]
    fn normal_arm_does_not_peek() {
        let f = Fake::new(Ok(()), Ok(1));
        assert_eq!(
            arm(&f, Duration::from_secs(1), true).unwrap(),
            Armed::WithTimeout
        );
        assert!(!f.peeked.get());
    }

    #[test]
    fn einval_with_buffered_frame_reads_without_timeout() {
        let f = Fake::new(einval(), Ok(1));
        assert_eq!(
            arm(&f, Duration::from_secs(1), true).unwrap(),
            Armed::CannotBlock
        );
    }

    #[test]
    fn einval_at_eof_reads_without_timeout() {
        let f = Fake::new(einval(), Ok(0));
        assert_eq!(
            arm(&f, Duration::from_secs(1), true).unwrap(),
            Armed::CannotBlock
        );
    }

    #[test]
    fn einval_on_open_empty_socket_is_an_error() {
        let f = Fake::new(einval(), Err(io::ErrorKind::WouldBlock.into()));
        assert!(arm(&f, Duration::from_secs(1), true).is_err());
    }

    #[test]
    fn einval_is_an_error_where_not_tolerated() {
        let f = Fake::new(einval(), Ok(1));
        assert!(arm(&f, Duration::from_secs(1), false).is_err());
        assert!(!f.peeked.get());
    }

    #[test]
    fn other_errors_pass_through() {
        let f = Fake::new(Err(io::Error::from_raw_os_error(libc::EBADF)), Ok(1));
        assert_eq!(
            arm(&f, Duration::from_secs(1), true)
                .unwrap_err()
                .raw_os_error(),
            Some(libc::EBADF)
        );
    }

    #[test]
    fn read_timeout_respects_liveness_cap_slack_and_floor() {
        let t = Timeouts::default();
        let now = Instant::now();
        // Long phase: liveness bounds the read.
        let c = PhaseClock {
            started: now,
            cap: Duration::from_secs(60),
        };
        assert_eq!(t.read_timeout(&c, now), Duration::from_secs(10));
        // Short phase: cap + slack bounds it.
        let c = PhaseClock {
            started: now,
            cap: Duration::from_secs(2),
        };
        assert_eq!(t.read_timeout(&c, now), Duration::from_secs(3));
        // Cap passed: only the slack is left.
        let c = PhaseClock {
            started: now - Duration::from_secs(5),
            cap: Duration::from_secs(2),
        };
        assert_eq!(t.read_timeout(&c, now), Duration::from_secs(1));
        assert!(!c.expired(now - Duration::from_millis(2500), t.wire_slack));
        assert!(c.expired(now, t.wire_slack));
        // Floor.
        let t2 = Timeouts {
            wire_slack: Duration::ZERO,
            ..t
        };
        assert_eq!(t2.read_timeout(&c, now), Duration::from_millis(100));
    }
}
