//! Stopping the incumbent through its control socket (`handoff stop`,
//! protocol version 2):
//!
//! ```text
//! S -> O  connect; O: Hello; S: HelloAck
//! S -> O  Shutdown{stop_id, drain_grace_ms}
//! O -> S  Heartbeat* ShutdownDrained      (O retires and exits by itself)
//! ```
//!
//! A signal would do only for a service that installed a handler for it;
//! one that did not dies at once with its requests in flight. Asking over
//! the control protocol reaches every service that links the library, with
//! the same drain it runs for a handoff. What the caller does when this
//! fails (an older build, no control socket) — signal it — and how it
//! judges the way the process ended are its business: this module only
//! asks, and reports the drain.

use std::time::{Duration, Instant};

use super::handoff::new_handoff_id;
use super::peer::{check_hello, connect_incumbent_socket};
use super::Supervisor;
use crate::busy::BusyGuard;
use crate::channel::Channel;
use crate::error::{ProtocolError, StopError};
use crate::frame::FrameError;
use crate::phase::{self, Peer};
use crate::process::DrainReport;
use crate::protocol::{negotiate, HandoffId, Message, ProtoVersion, Role, SHUTDOWN_SINCE};
use crate::timeouts::Timeouts;

/// Phase names in a stop's errors ("stopping (hello): the incumbent …").
const HELLO: &str = "stopping (hello)";
const DRAINING: &str = "stopping (draining)";

/// A stop the incumbent has been asked for (Shutdown sent): it is draining.
/// Holds the supervisor's handoff slot until [`StopRequest::wait_drained`]
/// returns, so no handoff starts against a process that is leaving.
#[derive(Debug)]
pub struct StopRequest<'a> {
    _busy: BusyGuard<'a>,
    chan: Channel,
    id: HandoffId,
    pid: u32,
    t: Timeouts,
}

impl Supervisor {
    /// Asks the incumbent `pid` to stop serving for good: greets it on its
    /// control socket and, when the version negotiated with it has
    /// [`Message::Shutdown`], sends it with `grace` as the drain budget. The
    /// incumbent drains as for a handoff, answers ShutdownDrained, retires
    /// and exits by itself once its connections are done; the caller waits
    /// for that ([`StopRequest::wait_drained`], then for the process).
    ///
    /// Waits for a handoff in flight first (its outcome decides which
    /// process is the incumbent). Fails, having asked nothing, when `pid`
    /// is not the running incumbent, its socket cannot be reached or does
    /// not answer as the incumbent, or it speaks only versions before
    /// [`SHUTDOWN_SINCE`] ([`StopError::Unsupported`]; it then sees the
    /// connection close while idle and serves on). The caller then falls
    /// back to a signal.
    pub fn request_stop(&self, pid: u32, grace: Duration) -> Result<StopRequest<'_>, StopError> {
        let busy = self.busy.enter();
        if self.incumbent_pid() != Some(pid) {
            return Err(StopError::NotIncumbent { pid });
        }
        let t = self.cfg.timeouts;
        let (stream, kernel) = connect_incumbent_socket(&self.cfg.control_path, HELLO)?;
        let mut chan = Channel::new(stream);
        let hello = match chan.recv(Some(t.hello)) {
            Ok(Message::Hello(h)) => h,
            Ok(m) => {
                return Err(ProtocolError::Unexpected {
                    peer: Peer::Incumbent,
                    phase: HELLO,
                    message: m.name(),
                }
                .into())
            }
            Err(e) => return Err(ProtocolError::frame(Peer::Incumbent, HELLO, e).into()),
        };
        check_hello(&hello, Role::Incumbent, kernel.pid, Some(pid), HELLO)?;
        let v = negotiate(self.cfg.versions, hello.range(), Role::Incumbent)
            .map_err(|e| ProtocolError::NoCommonVersion(e, HELLO))?;
        if v < SHUTDOWN_SINCE {
            // Hang up before HelloAck: an idle incumbent goes on serving.
            return Err(StopError::Unsupported {
                pid,
                theirs: hello.range(),
                needed: SHUTDOWN_SINCE,
            });
        }
        chan.send(&Message::HelloAck { version: v })
            .map_err(|e| ProtocolError::frame(Peer::Incumbent, HELLO, e))?;
        chan.set_version(v);
        let id = new_handoff_id();
        chan.send(&Message::Shutdown {
            stop_id: id,
            drain_grace_ms: grace.as_millis().try_into().unwrap_or(u64::MAX),
        })
        .map_err(|e| ProtocolError::frame(Peer::Incumbent, DRAINING, e))?;
        tracing::info!(target: "handoff::stop", stop_id = %crate::protocol::IdHex(id), pid, version = v, grace_ms = grace.as_millis() as u64, "asked the incumbent to stop");
        Ok(StopRequest {
            _busy: busy,
            chan,
            id,
            pid,
            t,
        })
    }
}

impl StopRequest<'_> {
    /// The incumbent asked.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The protocol version negotiated with it.
    pub fn version(&self) -> ProtoVersion {
        self.chan.version()
    }

    /// This stop's id (in both sides' logs).
    pub fn id(&self) -> HandoffId {
        self.id
    }

    /// Reads the incumbent's heartbeats until its ShutdownDrained, and
    /// returns the drain it reports. Never reads past `until` (the end of
    /// the caller's grace: a reply still on the wire then does not matter,
    /// the process is out of time either way).
    ///
    /// Fails when the incumbent hangs up first (its drain failed and it
    /// serves on, or it died), breaks the protocol, stays silent past the
    /// liveness timeout, or `until` passes: a
    /// [`ProtocolError::Timeout`] with the "phase deadline" clock.
    pub fn wait_drained(mut self, until: Instant) -> Result<DrainReport, StopError> {
        let deadline = |waited: Duration| ProtocolError::Timeout {
            peer: Peer::Incumbent,
            phase: DRAINING,
            waited_ms: waited.as_millis() as u64,
            clock: "phase deadline",
        };
        let started = Instant::now();
        loop {
            let now = Instant::now();
            let Some(left) = until.checked_duration_since(now).filter(|d| !d.is_zero()) else {
                return Err(deadline(started.elapsed()).into());
            };
            let timeout = self.t.liveness.min(left).max(self.t.read_floor);
            let msg = match self.chan.recv(Some(timeout)) {
                Ok(m) => m,
                Err(FrameError::TimedOut { .. }) if Instant::now() >= until => {
                    return Err(deadline(started.elapsed()).into())
                }
                Err(e) => return Err(ProtocolError::frame(Peer::Incumbent, DRAINING, e).into()),
            };
            let legal = phase::stop_allows(&msg);
            match phase::admit(Peer::Incumbent, DRAINING, legal, Some(self.id), msg)? {
                Message::ShutdownDrained {
                    open_conns_remaining,
                    accept_closed,
                    ..
                } => {
                    return Ok(DrainReport {
                        open_conns_remaining,
                        accept_closed,
                    })
                }
                m if m.is_keepalive() => continue,
                m => {
                    return Err(ProtocolError::Unexpected {
                        peer: Peer::Incumbent,
                        phase: DRAINING,
                        message: m.name(),
                    }
                    .into())
                }
            }
        }
    }
}
