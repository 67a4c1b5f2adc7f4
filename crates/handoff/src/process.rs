//! What the incumbent and successor sides share: their configuration, the
//! service trait, heartbeats and the control socket binding.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::channel::Sender;
use crate::protocol::{HandoffId, Message, VersionRange};
use crate::timeouts::Timeouts;

/// An error reported by the service's own code.
pub type ServiceError = Box<dyn std::error::Error + Send + Sync>;

/// How far a drain got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainReport {
    /// Connections still open when the drain returned (0 for a full drain).
    pub open_conns_remaining: u64,
    /// Whether the service has stopped accepting new connections.
    pub accept_closed: bool,
}

/// What a service implements so the library can hand it off.
///
/// The library calls these from its control thread, one at a time, in the
/// order the protocol allows: `drain` → `seal` → (`retire` | `resume`), or
/// `drain` → `resume`; and for `handoff stop`, `drain` → `retire` (no seal:
/// nobody takes over, and the state lock is released when the process
/// exits). The stop needs no signal handler: the supervisor asks over the
/// control socket, so a service that implements this trait is drained the
/// same way for an upgrade and for a stop.
pub trait Drainable {
    /// Stop accepting and wind connections down at request boundaries,
    /// returning within `grace`. The listeners stay open (the supervisor
    /// owns them): connections that arrive now wait in the kernel backlog for
    /// the successor (after a stop there is none: the supervisor closes
    /// them with the listeners when it exits).
    fn drain(&mut self, grace: Duration) -> Result<DrainReport, ServiceError>;

    /// [`drain`](Self::drain) for a handoff that may be aborted meanwhile:
    /// when `abort` fires (the supervisor said `ResumeAfterAbort`, or went
    /// away), stop waiting for connections and return at once — the
    /// library then calls [`resume`](Self::resume), and the service accepts
    /// again without sitting out the rest of the grace. The library calls
    /// this one; the default ignores `abort` and calls `drain`, which is
    /// right for a drain that is quick anyway. A drain that waits (for its
    /// connections to finish, say) overrides it and waits on
    /// [`AbortSignal::wait`](crate::AbortSignal::wait) or registers
    /// [`AbortSignal::on_abort`](crate::AbortSignal::on_abort).
    fn drain_or_abort(
        &mut self,
        grace: Duration,
        abort: &crate::AbortSignal,
    ) -> Result<DrainReport, ServiceError> {
        let _ = abort;
        self.drain(grace)
    }

    /// [`drain_or_abort`](Self::drain_or_abort) for a handoff that may
    /// move connections (protocol version 3, docs/connection-transfer.md):
    /// a connection between requests can be handed to the successor with
    /// [`Mover::offer`](crate::Mover::offer) instead of being closed — its
    /// client then never reconnects. A connection in the middle of a
    /// request finishes it first, then moves. Return once every connection
    /// is moved or closed (or the grace is up). The library calls this one
    /// for every handoff (with a [`Mover`](crate::Mover) that refuses
    /// everything when a peer cannot move); the default moves nothing and
    /// calls `drain_or_abort`.
    fn drain_moving(
        &mut self,
        grace: Duration,
        abort: &crate::AbortSignal,
        mover: &crate::Mover,
    ) -> Result<DrainReport, ServiceError> {
        let _ = mover;
        self.drain_or_abort(grace, abort)
    }

    /// Make all state durable and stop writing it. After `Ok` the library
    /// releases the state lock and the successor may take it. The returned
    /// bytes (optional, at most ~1 MiB) are passed to the successor's
    /// `Begin`. `progress(done, total)` sends SealProgress frames.
    fn seal(&mut self, progress: &mut dyn FnMut(u64, u64))
        -> Result<Option<Vec<u8>>, ServiceError>;

    /// The handoff was aborted (or the supervisor vanished): the state lock
    /// is ours again. Reload state if it could have changed, and accept again.
    fn resume(&mut self) -> Result<(), ServiceError>;

    /// This process serves no more: the successor is the incumbent now, or
    /// the supervisor stopped the service (see [`crate::Retired`], which
    /// [`crate::Incumbent::serve`] returns right after, for which). Finish
    /// what is in flight; the process should exit once its connections are
    /// done — after a stop, the supervisor kills it at the end of the grace.
    fn retire(&mut self) {}
}

/// Configuration of the process side (incumbent or successor).
#[derive(Debug, Clone)]
pub struct ProcessConfig {
    /// This build's name, sent in every Hello and in Ready's metadata: what
    /// the supervisor's status and logs show for the process.
    pub build_id: String,
    /// The protocol versions this process offers in its Hello.
    pub versions: VersionRange,
    /// The directory holding the state lock (`handoff.lock`).
    pub state_dir: PathBuf,
    /// Where the incumbent binds its control socket, which the supervisor
    /// connects to.
    pub control_path: PathBuf,
    /// The protocol's timeouts, as this side applies them to its reads and
    /// heartbeats.
    pub timeouts: Timeouts,
    /// How long a successor waits, after Begin, for the sealed incumbent's
    /// lock to become free (it was released just before SealComplete).
    pub lock_wait: Duration,
    /// How long an incumbent that lost its supervisor after sealing tries to
    /// re-take the state lock before concluding the successor won.
    pub recovery_wait: Duration,
    /// How long an incumbent waits for PrepareHandoff after Hello.
    pub idle_timeout: Duration,
}

impl ProcessConfig {
    /// A configuration with every other field at its default: the
    /// versions this build speaks, timeouts from [`Timeouts::from_env`],
    /// 5 s lock wait, 10 s recovery wait, 60 s idle timeout.
    pub fn new(
        build_id: impl Into<String>,
        state_dir: impl Into<PathBuf>,
        control_path: impl Into<PathBuf>,
    ) -> Self {
        ProcessConfig {
            build_id: build_id.into(),
            versions: VersionRange::OURS,
            state_dir: state_dir.into(),
            control_path: control_path.into(),
            timeouts: Timeouts::from_env(),
            lock_wait: Duration::from_secs(5),
            recovery_wait: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// Binds the control socket at `path` atomically: bind a temporary name,
/// restrict it to its owner, then rename it over `path`. A supervisor
/// connecting at any instant reaches either the old owner or the new one,
/// never "no such file".
pub fn bind_control(path: &Path) -> io::Result<UnixListener> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "control.sock".into());
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let l = UnixListener::bind(&tmp)?;
    let done = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = done {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(l)
}

/// A thread that sends Heartbeat every `interval` until stopped.
///
/// `stop` does not join the thread. It sits on every handoff's critical path
/// (drain, seal, the successor's health check), and on saturated cores a
/// join waits for the woken thread to be scheduled just to exit — a wakeup
/// the handoff does not need. What callers need is only that no Heartbeat is
/// written after `stop` returns, so their next message (Drained,
/// SealComplete, Ready) is the next frame on the wire: `stop` marks the
/// heartbeat stopped under the mutex and waits only while a send is in
/// progress (`sending`); the thread checks `stopped` under the same mutex
/// before every send, then exits on its own.
pub(crate) struct Heartbeat {
    stop: Arc<(Mutex<HeartbeatState>, Condvar)>,
}

#[derive(Default)]
struct HeartbeatState {
    stopped: bool,
    /// A Heartbeat is being written right now (outside the lock).
    sending: bool,
}

impl Heartbeat {
    pub(crate) fn start(
        sender: io::Result<Sender>,
        id: HandoffId,
        interval: Duration,
    ) -> Heartbeat {
        let stop = Arc::new((Mutex::new(HeartbeatState::default()), Condvar::new()));
        match sender {
            Ok(sender) => {
                let s = stop.clone();
                let spawned = std::thread::Builder::new()
                    .name("handoff-heartbeat".into())
                    .spawn(move || {
                        let (m, cv) = &*s;
                        let mut st = m.lock().unwrap_or_else(|p| p.into_inner());
                        loop {
                            // Checked before waiting: `stop` may have run
                            // before this thread first took the lock.
                            if st.stopped {
                                return;
                            }
                            st = cv
                                .wait_timeout(st, interval)
                                .unwrap_or_else(|p| p.into_inner())
                                .0;
                            if st.stopped {
                                return;
                            }
                            // Send without holding the lock, so `stop` never
                            // waits behind a slow write unless one is under
                            // way; `sending` makes it wait for that one.
                            st.sending = true;
                            drop(st);
                            let sent = sender.send(&Message::Heartbeat { handoff_id: id });
                            st = m.lock().unwrap_or_else(|p| p.into_inner());
                            st.sending = false;
                            cv.notify_all();
                            if sent.is_err() {
                                return;
                            }
                        }
                    });
                if let Err(e) = spawned {
                    tracing::warn!(target: "handoff::heartbeat", error = %e, "cannot start the heartbeat thread");
                }
            }
            Err(e) => {
                tracing::warn!(target: "handoff::heartbeat", error = %e, "cannot heartbeat");
            }
        }
        Heartbeat { stop }
    }

    pub(crate) fn stop(mut self) {
        self.halt();
    }

    /// Returns once no Heartbeat can be written any more (see the type's
    /// doc); the thread exits by itself when next scheduled.
    fn halt(&mut self) {
        let (m, cv) = &*self.stop;
        let mut st = m.lock().unwrap_or_else(|p| p.into_inner());
        st.stopped = true;
        cv.notify_all();
        while st.sending {
            st = cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.halt();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel::Channel;
    use std::os::unix::net::UnixStream;
    use std::time::Instant;

    #[test]
    fn heartbeat_stop_does_not_wait_an_interval() {
        let (a, _b) = UnixStream::pair().unwrap();
        let chan = Channel::new(a);
        for _ in 0..50 {
            let t = Instant::now();
            Heartbeat::start(chan.sender(), 1, Duration::from_secs(30)).stop();
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "stop took {:?}",
                t.elapsed()
            );
        }
    }

    /// The guarantee `stop` keeps without joining: once it returns, the
    /// caller's next frame is the next on the wire. The thread heartbeats as
    /// fast as it can, so stop often lands mid-send; after the marker, only
    /// EOF may follow (which comes once the detached thread has exited and
    /// dropped its copy of the socket).
    #[test]
    fn no_heartbeat_after_stop_returns() {
        for round in 0..500 {
            let (a, b) = UnixStream::pair().unwrap();
            let chan = Channel::new(a);
            let hb = Heartbeat::start(chan.sender(), 3, Duration::ZERO);
            let mut rx = Channel::new(b);
            assert_eq!(
                rx.recv(Some(Duration::from_secs(5))).unwrap(),
                Message::Heartbeat { handoff_id: 3 }
            );
            hb.stop();
            chan.sender()
                .unwrap()
                .send(&Message::Commit { handoff_id: 9 })
                .unwrap();
            drop(chan);
            loop {
                match rx.recv(Some(Duration::from_secs(5))) {
                    Ok(Message::Heartbeat { .. }) => continue,
                    Ok(Message::Commit { handoff_id: 9 }) => break,
                    other => panic!("round {round}: {other:?}"),
                }
            }
            match rx.recv(Some(Duration::from_secs(5))) {
                Err(crate::frame::FrameError::Closed) => {}
                other => panic!("round {round}: a frame after the marker: {other:?}"),
            }
        }
    }

    #[test]
    fn heartbeats_arrive_at_the_interval() {
        let (a, b) = UnixStream::pair().unwrap();
        let chan = Channel::new(a);
        let hb = Heartbeat::start(chan.sender(), 7, Duration::from_millis(20));
        let mut rx = Channel::new(b);
        for _ in 0..3 {
            assert_eq!(
                rx.recv(Some(Duration::from_secs(5))).unwrap(),
                Message::Heartbeat { handoff_id: 7 }
            );
        }
        hb.stop();
    }
}
