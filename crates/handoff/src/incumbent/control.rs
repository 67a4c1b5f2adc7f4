//! The incumbent's control socket: accepting supervisors' connections,
//! greeting each on a short-lived thread of its own, and handing the
//! control thread one whole request at a time.
//!
//! Reading a request is not done on the control thread: each accepted
//! connection is greeted (Hello here, so only an idle incumbent says Hello)
//! and then waited on by a greeter thread (at most [`MAX_GREETING`] at
//! once), which must get the HelloAck whole within the hello budget and the
//! first request whole within the idle timeout, and only then queues it. A
//! connection that trickles its bytes, or says nothing, so no longer keeps
//! the supervisor's own connection waiting: it used to hold the single
//! control thread for as long as it kept each read within its timeout, and
//! an upgrade meanwhile aborted ("the incumbent did not answer").
//!
//! The socket's path is watched too: someone who deletes the runtime dir
//! unlinks the socket but not the listening socket, and nobody could reach
//! the incumbent until it was restarted ([`CONTROL_PATH_CHECK`]).

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use crate::accept::{AcceptBackoff, Verdict};
use crate::channel::Channel;
use crate::error::{ProcessError, ProtocolError};
use crate::phase::{IncumbentPhase, Peer};
use crate::process::{bind_control, ProcessConfig};
use crate::protocol::{negotiate, Hello, Message, Role, VersionRange};
use crate::sys;

/// Most control connections greeted at once (each on a short-lived thread
/// of its own, until it has said what it wants or its time is up). The
/// supervisor uses one or two at a time; past the cap a connection is
/// closed at once, so a flood of them costs neither threads nor memory.
pub(crate) const MAX_GREETING: usize = 16;

/// How often an idle incumbent checks that its control socket's path still
/// exists. Someone who deletes the runtime dir (a tmpfiles cleaner, an
/// operator's `rm -rf`) unlinks the socket but not the listening socket
/// itself: the incumbent keeps serving and nobody can reach it, so every
/// upgrade and `handoff stop` failed until the service was restarted.
const CONTROL_PATH_CHECK: Duration = Duration::from_secs(1);

/// How often the idle loop looks for greeted requests when it has no wake
/// socket (see [`ControlSocket::wake`]).
const NO_WAKE_TICK: Duration = Duration::from_millis(10);

/// A control connection that has been greeted (Hello, HelloAck) and has
/// sent its first request: what the control thread serves, in turn.
#[derive(Debug)]
pub(super) struct Greeted {
    pub(super) chan: Channel,
    pub(super) first: Message,
    /// Descriptors attached to `first`: the socket to the successor of a
    /// PrepareHandoffV4; dropped (closed) with any other message.
    pub(super) fds: Vec<OwnedFd>,
    /// Held until the control thread is done with the request: requests
    /// being served count against [`MAX_GREETING`] as well.
    pub(super) slot: Slot,
}

/// What a greeter needs to know, copied out of the config.
#[derive(Debug, Clone, Copy)]
struct Greeting {
    versions: VersionRange,
    hello: Duration,
    idle: Duration,
}

/// One of the [`MAX_GREETING`] greeting slots, given back on drop.
#[derive(Debug)]
pub(super) struct Slot(Arc<AtomicUsize>);

impl Slot {
    fn take(open: &Arc<AtomicUsize>) -> Option<Slot> {
        open.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
            (n < MAX_GREETING).then_some(n + 1)
        })
        .ok()
        .map(|_| Slot(open.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A non-blocking socket pair for waking the idle loop.
fn wake_pair() -> io::Result<(UnixStream, Arc<UnixStream>)> {
    let (r, w) = UnixStream::pair()?;
    r.set_nonblocking(true)?;
    w.set_nonblocking(true)?;
    Ok((r, Arc::new(w)))
}

/// The bound control socket and the requests read from it.
#[derive(Debug)]
pub(super) struct ControlSocket {
    path: PathBuf,
    listener: UnixListener,
    /// Said in every Hello.
    build_id: String,
    greeting_cfg: Greeting,
    /// Connections taken over from a replaced control socket, served before
    /// the next accept.
    queued: VecDeque<UnixStream>,
    /// Requests read by greeters, waiting for the control thread.
    greeted: mpsc::Receiver<Greeted>,
    to_serve: mpsc::Sender<Greeted>,
    /// Connections being greeted, waiting in `greeted`, or being served.
    greeting: Arc<AtomicUsize>,
    /// A greeter that has queued a request writes a byte here to wake the
    /// control thread from its `poll` (read end, write end). `None` when it
    /// could not be made (no descriptor left): the idle loop then polls
    /// every [`NO_WAKE_TICK`] while greeters are out. (Not made later:
    /// greeters started without it could not wake a loop that waits on it.)
    wake: Option<(UnixStream, Arc<UnixStream>)>,
    backoff: AcceptBackoff,
    /// When the last "too many control connections" was said.
    said_full: Option<Instant>,
    /// When the control socket's path was last checked, and whether its
    /// directory was found gone (said once, until it is back).
    path_checked: Instant,
    said_dir_gone: bool,
}

impl ControlSocket {
    pub(super) fn new(listener: UnixListener, cfg: &ProcessConfig) -> ControlSocket {
        let (to_serve, greeted) = mpsc::channel();
        // Made now, while the process surely has descriptors to spare.
        let wake = match wake_pair() {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(target: "handoff::incumbent", error = %e, "cannot make the control loop's wake socket; polling instead while connections are greeted");
                None
            }
        };
        ControlSocket {
            path: cfg.control_path.clone(),
            listener,
            build_id: cfg.build_id.clone(),
            greeting_cfg: Greeting {
                versions: cfg.versions,
                hello: cfg.timeouts.hello,
                idle: cfg.idle_timeout,
            },
            queued: VecDeque::new(),
            greeted,
            to_serve,
            greeting: Arc::new(AtomicUsize::new(0)),
            wake,
            backoff: AcceptBackoff::new(),
            said_full: None,
            path_checked: Instant::now(),
            said_dir_gone: false,
        }
    }

    /// Blocks until a greeter has queued a request, accepting and greeting
    /// connections meanwhile.
    ///
    /// A failed accept for want of descriptors or memory is waited out
    /// ([`AcceptBackoff`]): returning would make the service exit because
    /// its clients had used up its descriptors for a moment. Only a control
    /// socket that is itself gone is an error.
    pub(super) fn next_request(&mut self) -> Result<Greeted, ProcessError> {
        loop {
            if let Ok(g) = self.greeted.try_recv() {
                // A request that waited its turn behind another: if its
                // sender has hung up meanwhile (a supervisor says nothing
                // more until answered), draining for it would be for no one.
                if g.chan.has_input() {
                    tracing::debug!(target: "handoff::incumbent", message = g.first.name(), "control peer hung up while its request waited");
                    continue;
                }
                return Ok(g);
            }
            if let Some(s) = self.queued.pop_front() {
                self.admit(s);
                continue;
            }
            self.wait_for_work();
            if self.path_checked.elapsed() >= CONTROL_PATH_CHECK {
                self.path_checked = Instant::now();
                self.keep_control_path();
            }
            let stream = match self.listener.accept() {
                Ok((s, _)) => {
                    if let Some(unsaid) = self.backoff.succeeded() {
                        tracing::info!(target: "handoff::incumbent", unsaid, "accepting on the control socket again");
                    }
                    s
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
                    ) =>
                {
                    continue
                }
                Err(source) => match self.backoff.failed(&source) {
                    Verdict::Retry { say, suppressed } => {
                        if say {
                            tracing::warn!(target: "handoff::incumbent", error = %source, suppressed,
                                "accepting on the control socket failed; retrying with backoff (the service keeps serving)");
                        }
                        continue;
                    }
                    Verdict::Fatal => {
                        return Err(ProcessError::ControlSocket {
                            path: self.path.clone(),
                            source,
                        })
                    }
                },
            };
            self.admit(stream);
        }
    }

    /// Waits until the control socket has a connection to accept or a
    /// greeter has queued a request (a spurious return is harmless: the
    /// accept is non-blocking). Leaves the listener non-blocking.
    fn wait_for_work(&mut self) {
        if let Err(e) = self.listener.set_nonblocking(true) {
            // The accept then blocks: connections are still served, only
            // a queued request waits for the next one.
            tracing::debug!(target: "handoff::incumbent", error = %e, "cannot make the control socket non-blocking");
        }
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let out = self.greeting.load(Ordering::SeqCst) > 0;
        let mut fds = vec![PollFd::new(self.listener.as_fd(), PollFlags::POLLIN)];
        let timeout = match &self.wake {
            Some((r, _)) => {
                fds.push(PollFd::new(r.as_fd(), PollFlags::POLLIN));
                PollTimeout::try_from(CONTROL_PATH_CHECK).unwrap_or(PollTimeout::MAX)
            }
            None if out => PollTimeout::try_from(NO_WAKE_TICK).unwrap_or(PollTimeout::MAX),
            None => PollTimeout::try_from(CONTROL_PATH_CHECK).unwrap_or(PollTimeout::MAX),
        };
        match poll(&mut fds, timeout) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => {
                // Nothing a retry cannot pass (ENOMEM): pause, so as not
                // to spin, and look again.
                tracing::warn!(target: "handoff::incumbent", error = %e, "waiting on the control socket failed; retrying");
                std::thread::sleep(NO_WAKE_TICK);
            }
        }
        if let Some((r, _)) = &self.wake {
            let mut buf = [0u8; 64];
            let mut r = r;
            while matches!(r.read(&mut buf), Ok(n) if n > 0) {}
        }
    }

    /// Takes a new control connection: checks the caller, says Hello, and
    /// hands it to a greeter thread that waits for its first request. A
    /// refused or failed one only drops that connection: the service goes
    /// on.
    fn admit(&mut self, stream: UnixStream) {
        let ours = nix::unistd::geteuid().as_raw();
        match sys::peer_credentials(&stream) {
            Ok(c) if c.uid == ours || c.uid == 0 => {}
            Ok(c) => {
                tracing::warn!(target: "handoff::incumbent", uid = c.uid, pid = ?c.pid, "refusing control connection from another user");
                return;
            }
            Err(e) => {
                tracing::warn!(target: "handoff::incumbent", error = %e, "cannot identify control peer");
                return;
            }
        }
        let Some(slot) = Slot::take(&self.greeting) else {
            // At most one line per 5 s: a flood must not flood the log too.
            if self
                .said_full
                .is_none_or(|t| t.elapsed() >= crate::accept::SAY_EVERY)
            {
                self.said_full = Some(Instant::now());
                tracing::warn!(target: "handoff::incumbent", max = MAX_GREETING,
                    "too many control connections waiting to be served; closing the newest");
            }
            return;
        };
        // BSD sockets inherit the listener's O_NONBLOCK; ours must block
        // (reads are bounded by SO_RCVTIMEO).
        if let Err(e) = stream.set_nonblocking(false) {
            tracing::warn!(target: "handoff::incumbent", error = %e, "control connection unusable");
            return;
        }
        let chan = Channel::new(stream);
        let g = self.greeting_cfg;
        let hello = Message::Hello(Hello {
            role: Role::Incumbent,
            pid: std::process::id(),
            proto_min: g.versions.min,
            proto_max: g.versions.max,
            build_id: self.build_id.clone(),
        });
        // A small frame into a fresh connection's empty buffer: it cannot
        // block, and the timeout says so should that ever be wrong.
        let _ = chan.stream().set_write_timeout(Some(g.hello));
        let said = chan.send(&hello);
        let _ = chan.stream().set_write_timeout(None);
        if let Err(e) = said {
            tracing::warn!(target: "handoff::incumbent", error = %e, "sending Hello");
            return;
        }
        let to_serve = self.to_serve.clone();
        let wake = self.wake.as_ref().map(|(_, w)| w.clone());
        let spawned = std::thread::Builder::new()
            .name("handoff-greet".into())
            .spawn(move || {
                let Some((chan, first, fds)) = await_request(chan, g) else {
                    return;
                };
                let queued = to_serve.send(Greeted {
                    chan,
                    first,
                    fds,
                    slot,
                });
                // Sent: wake the control thread (a full wake socket
                // already holds a wake-up). Not sent: it has retired.
                if queued.is_ok() {
                    if let Some(w) = wake {
                        let _ = (&*w).write(&[1]);
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(target: "handoff::incumbent", error = %e, "control connection dropped: cannot start a thread to greet it");
        }
    }

    /// Re-binds the control socket if its path is gone (see
    /// [`CONTROL_PATH_CHECK`]) and its directory exists; the supervisor
    /// re-creates the runtime dir (mode 0700) when it finds it gone, and
    /// only it does: a directory made here would not be checked the way
    /// `handoff run` checks its own.
    fn keep_control_path(&mut self) {
        let path = &self.path;
        match std::fs::symlink_metadata(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            // There (ours, or a successor's after an aborted handoff, which
            // `rebind` replaces), or not checkable: leave it.
            _ => return,
        }
        let dir_there = path
            .parent()
            .is_none_or(|d| d.as_os_str().is_empty() || d.is_dir());
        if !dir_there {
            if !std::mem::replace(&mut self.said_dir_gone, true) {
                tracing::error!(target: "handoff::incumbent", path = %path.display(), "the control socket's directory is gone: no upgrade or `handoff stop` can reach this process until the supervisor re-creates it (it does so within seconds); still serving");
            }
            return;
        }
        self.said_dir_gone = false;
        match bind_control(path) {
            Ok(fresh) => {
                let old = std::mem::replace(&mut self.listener, fresh);
                drop(old); // unreachable: its name is gone
                tracing::warn!(target: "handoff::incumbent", path = %path.display(), "the control socket was removed (runtime dir deleted?); bound it again");
            }
            Err(e) => {
                tracing::warn!(target: "handoff::incumbent", path = %path.display(), error = %e, "the control socket was removed and binding it again failed; retrying");
            }
        }
    }

    /// Binds the control path again, after the state lock was re-taken
    /// following a seal: the successor may have bound the path meanwhile.
    pub(super) fn rebind(&mut self) -> Result<(), ProcessError> {
        let fresh = bind_control(&self.path).map_err(|source| ProcessError::ControlSocket {
            path: self.path.clone(),
            source,
        })?;
        let old = std::mem::replace(&mut self.listener, fresh);
        // A supervisor may have connected to the old socket just before the
        // rename: dropping it would reset that connection. The rename is
        // done, so nothing new can reach the old socket; take what is
        // queued there and serve it first.
        if old.set_nonblocking(true).is_ok() {
            while let Ok((s, _)) = old.accept() {
                self.queued.push_back(s);
            }
        }
        Ok(())
    }
}

/// A greeter's work, on its own thread: the HelloAck, then the first
/// request, each of which must arrive whole within its budget (the hello
/// budget, then the idle timeout). `None`: the connection ended, timed
/// out or broke the protocol, and is dropped (said at debug level, as a
/// probe that reads Hello and hangs up is routine).
fn await_request(mut chan: Channel, g: Greeting) -> Option<(Channel, Message, Vec<OwnedFd>)> {
    match chan.recv(Some(g.hello)) {
        Ok(Message::HelloAck { version }) => {
            // The supervisor picks; we only check it is one we speak.
            let ok = negotiate(
                g.versions,
                VersionRange {
                    min: version,
                    max: version,
                },
                Role::Supervisor,
            );
            match ok {
                Ok(v) => chan.set_version(v),
                Err(e) => {
                    tracing::warn!(target: "handoff::incumbent", error = %e, "supervisor chose a version we do not speak");
                    return None;
                }
            }
        }
        Ok(m) => {
            tracing::warn!(target: "handoff::incumbent", message = m.name(), "expected HelloAck");
            return None;
        }
        Err(e) => {
            tracing::debug!(target: "handoff::incumbent", error = %e, "control connection closed during greeting");
            return None;
        }
    }
    let phase = IncumbentPhase::Idle;
    let got = chan
        .recv_with_fds(g.idle)
        .map_err(|e| ProtocolError::frame(Peer::Supervisor, phase.name(), e))
        .and_then(|(msg, fds)| {
            let legal = phase.allows(&msg);
            crate::phase::admit(Peer::Supervisor, phase.name(), legal, None, msg).map(|m| (m, fds))
        });
    match got {
        Ok((m, fds)) => Some((chan, m, fds)),
        Err(e) => {
            // Nothing was changed yet: the connection simply ends.
            tracing::debug!(target: "handoff::incumbent", error = %e, "control connection ended before PrepareHandoff");
            None
        }
    }
}
