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

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use crate::accept::{AcceptBackoff, Verdict};
use crate::channel::Channel;
use crate::crash;
use crate::error::{ProcessError, ProtocolError};
use crate::lock::StateLock;
use crate::moving::Flusher;
use crate::phase::{IncumbentPhase, Peer};
use crate::process::{bind_control, Drainable, Heartbeat, ProcessConfig};
use crate::protocol::{
    negotiate, HandoffId, Hello, Message, Role, VersionRange, SEAL_AT_ONCE_SINCE,
};
use crate::sys;

/// Most control connections greeted at once (each on a short-lived thread
/// of its own, until it has said what it wants or its time is up). The
/// supervisor uses one or two at a time; past the cap a connection is
/// closed at once, so a flood of them costs neither threads nor memory.
pub(crate) const MAX_GREETING: usize = 16;

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
    lock: Option<StateLock>,
    listener: UnixListener,
    /// Copies of the passed listeners, for a supervisor that lost them.
    kept: Vec<crate::listeners::Listener>,
    /// Connections the previous incumbent moved to us, until taken.
    moved: Vec<crate::MovedConnection>,
    /// Connections taken over from a replaced control socket, served before
    /// the next accept.
    queued: VecDeque<UnixStream>,
    /// Requests read by greeters, waiting for the control thread.
    greeted: mpsc::Receiver<Greeted>,
    to_serve: mpsc::Sender<Greeted>,
    /// Connections being greeted or waiting in `greeted`.
    greeting: Arc<AtomicUsize>,
    /// A greeter that has queued a request writes a byte here to wake the
    /// control thread from its `poll` (read end, write end). `None` when it
    /// could not be made (no descriptor left): the idle loop then polls
    /// every [`NO_WAKE_TICK`] while greeters are out. (Not made later:
    /// greeters started without it could not wake a loop that waits on it.)
    wake: Option<(UnixStream, Arc<UnixStream>)>,
    /// When the last "too many control connections" was said.
    said_full: Option<Instant>,
    /// When the control socket's path was last checked, and whether its
    /// directory was found gone (said once, until it is back).
    path_checked: Instant,
    said_dir_gone: bool,
}

/// How often an idle incumbent checks that its control socket's path still
/// exists. Someone who deletes the runtime dir (a tmpfiles cleaner, an
/// operator's `rm -rf`) unlinks the socket but not the listening socket
/// itself: the incumbent keeps serving and nobody can reach it, so every
/// upgrade and `handoff stop` failed until the service was restarted.
const CONTROL_PATH_CHECK: Duration = Duration::from_secs(1);

/// How often the idle loop looks for greeted requests when it has no wake
/// socket (see [`Incumbent::wake`]).
const NO_WAKE_TICK: Duration = Duration::from_millis(10);

/// A control connection that has been greeted (Hello, HelloAck) and has
/// sent its first request: what the control thread serves, in turn.
#[derive(Debug)]
struct Greeted {
    chan: Channel,
    first: Message,
    /// Descriptors attached to `first`: the socket to the successor of a
    /// PrepareHandoffV4; dropped (closed) with any other message.
    fds: Vec<OwnedFd>,
    /// Held until the control thread is done with it: queued requests
    /// count against [`MAX_GREETING`] as well.
    _slot: Slot,
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
struct Slot(Arc<AtomicUsize>);

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

/// Watches the control connection while the service drains: the
/// supervisor sends nothing then unless it aborts, so the connection
/// becoming readable (a `ResumeAfterAbort`, or EOF when the supervisor is
/// gone) fires the drain's [`AbortSignal`](crate::AbortSignal). It only
/// polls; the message itself is read afterwards on the control thread, as
/// always. Dropping the watch stops it.
struct AbortWatch {
    /// Written to (or dropped) to end the watch.
    stop: Option<UnixStream>,
}

impl AbortWatch {
    fn start(chan: &Channel, abort: &crate::AbortSignal) -> AbortWatch {
        let pair = chan
            .stream()
            .try_clone()
            .and_then(|c| Ok((c, UnixStream::pair()?)));
        let (conn, (stop, stopped)) = match pair {
            Ok(p) => p,
            Err(e) => {
                // Without a watch the drain runs its course, as before:
                // the abort is read once it returns.
                tracing::warn!(target: "handoff::incumbent", error = %e, "cannot watch the control connection during the drain; an abort will wait for the drain to end");
                return AbortWatch { stop: None };
            }
        };
        let abort = abort.clone();
        let spawned = std::thread::Builder::new()
            .name("handoff-abort-watch".into())
            .spawn(move || {
                use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
                loop {
                    let mut fds = [
                        PollFd::new(conn.as_fd(), PollFlags::POLLIN),
                        PollFd::new(stopped.as_fd(), PollFlags::POLLIN),
                    ];
                    match poll(&mut fds, PollTimeout::NONE) {
                        Err(nix::errno::Errno::EINTR) => continue,
                        Err(_) => return, // the drain runs its course
                        Ok(_) => {}
                    }
                    let ready = |f: &PollFd| f.revents().is_some_and(|r| !r.is_empty());
                    if ready(&fds[1]) {
                        return; // the drain is over
                    }
                    if ready(&fds[0]) {
                        abort.fire();
                        return;
                    }
                }
            });
        match spawned {
            Ok(_) => AbortWatch { stop: Some(stop) },
            Err(e) => {
                tracing::warn!(target: "handoff::incumbent", error = %e, "cannot start the drain's abort watch; an abort will wait for the drain to end");
                AbortWatch { stop: None }
            }
        }
    }
}

impl Drop for AbortWatch {
    fn drop(&mut self) {
        if let Some(mut s) = self.stop.take() {
            // The byte or, failing that, the close (POLLHUP) ends the poll.
            let _ = s.write_all(&[1]);
        }
    }
}

enum Next {
    Continue,
    Retire(Retired),
}

impl Incumbent {
    pub(crate) fn new(
        cfg: ProcessConfig,
        lock: StateLock,
        listener: UnixListener,
        kept: Vec<crate::listeners::Listener>,
        moved: Vec<crate::MovedConnection>,
    ) -> Incumbent {
        let (to_serve, greeted) = mpsc::channel();
        // Made now, while the process surely has descriptors to spare.
        let wake = match wake_pair() {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(target: "handoff::incumbent", error = %e, "cannot make the control loop's wake socket; polling instead while connections are greeted");
                None
            }
        };
        Incumbent {
            cfg,
            lock: Some(lock),
            listener,
            kept,
            moved,
            queued: VecDeque::new(),
            greeted,
            to_serve,
            greeting: Arc::new(AtomicUsize::new(0)),
            wake,
            said_full: None,
            path_checked: Instant::now(),
            said_dir_gone: false,
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
    /// thread only). Reading a request is not: each accepted connection is
    /// greeted (Hello here, so only an idle incumbent says Hello, as
    /// before) and then waited on by a short-lived thread of its own (at
    /// most 16 at once), which must get the HelloAck whole within
    /// the hello budget and the first request whole within the idle
    /// timeout, and only then queues it for this thread. A connection that
    /// trickles its bytes, or says nothing, so no longer keeps the
    /// supervisor's own connection waiting: it used to hold this single
    /// thread for as long as it kept each read within its timeout, and an
    /// upgrade meanwhile aborted ("the incumbent did not answer").
    ///
    /// A failed accept for want of descriptors or memory is waited out
    /// ([`AcceptBackoff`]): returning would make the service exit because
    /// its clients had used up its descriptors for a moment. Only a control
    /// socket that is itself gone ends the loop with an error.
    pub fn serve<D: Drainable>(mut self, service: &mut D) -> Result<Retired, ProcessError> {
        if !self.moved.is_empty() {
            // Moved to us and never taken: nobody here will read them, and
            // a client waiting on one would wait for ever. Closing them is
            // the honest end (we are the last holder: the client sees a
            // FIN and reconnects).
            tracing::warn!(target: "handoff::incumbent", count = self.moved.len(),
                "connections moved from the previous build were not taken (Incumbent::take_moved) before serve; closing them");
            self.moved.clear();
        }
        let mut backoff = AcceptBackoff::new();
        loop {
            if let Ok(g) = self.greeted.try_recv() {
                // A request that waited its turn behind another: if its
                // sender has hung up meanwhile (a supervisor says nothing
                // more until answered), draining for it would be for no one.
                if g.chan.has_input() {
                    tracing::debug!(target: "handoff::incumbent", message = g.first.name(), "control peer hung up while its request waited");
                    continue;
                }
                match self.handoff(g.chan, g.first, g.fds, service)? {
                    Next::Continue => continue,
                    Next::Retire(r) => {
                        tracing::info!(target: "handoff::incumbent", ?r, "retiring");
                        return Ok(r);
                    }
                }
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
                    if let Some(unsaid) = backoff.succeeded() {
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
                Err(source) => match backoff.failed(&source) {
                    Verdict::Retry { say, suppressed } => {
                        if say {
                            tracing::warn!(target: "handoff::incumbent", error = %source, suppressed,
                                "accepting on the control socket failed; retrying with backoff (the service keeps serving)");
                        }
                        continue;
                    }
                    Verdict::Fatal => {
                        return Err(ProcessError::ControlSocket {
                            path: self.cfg.control_path.clone(),
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
        let hello = Message::Hello(Hello {
            role: Role::Incumbent,
            pid: std::process::id(),
            proto_min: self.cfg.versions.min,
            proto_max: self.cfg.versions.max,
            build_id: self.cfg.build_id.clone(),
        });
        // A small frame into a fresh connection's empty buffer: it cannot
        // block, and the timeout says so should that ever be wrong.
        let _ = chan
            .stream()
            .set_write_timeout(Some(self.cfg.timeouts.hello));
        let said = chan.send(&hello);
        let _ = chan.stream().set_write_timeout(None);
        if let Err(e) = said {
            tracing::warn!(target: "handoff::incumbent", error = %e, "sending Hello");
            return;
        }
        let greeting = Greeting {
            versions: self.cfg.versions,
            hello: self.cfg.timeouts.hello,
            idle: self.cfg.idle_timeout,
        };
        let to_serve = self.to_serve.clone();
        let wake = self.wake.as_ref().map(|(_, w)| w.clone());
        let spawned = std::thread::Builder::new()
            .name("handoff-greet".into())
            .spawn(move || {
                let Some((chan, first, fds)) = await_request(chan, greeting) else {
                    return;
                };
                let queued = to_serve.send(Greeted {
                    chan,
                    first,
                    fds,
                    _slot: slot,
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

    /// Receives the next message legal in `phase`, or explains why not.
    fn recv(
        chan: &mut Channel,
        phase: IncumbentPhase,
        id: Option<HandoffId>,
        timeout: Duration,
    ) -> Result<Message, ProtocolError> {
        let msg = chan
            .recv(Some(timeout))
            .map_err(|e| ProtocolError::frame(Peer::Supervisor, phase.name(), e))?;
        let legal = phase.allows(&msg);
        crate::phase::admit(Peer::Supervisor, phase.name(), legal, id, msg)
    }

    /// What a receive in `phase` that did not bring one of the messages
    /// handled there amounts to: its own error, or the message — legal by
    /// the phase table but of no use here — as an unexpected one.
    fn off_table(phase: IncumbentPhase, got: Result<Message, ProtocolError>) -> ProtocolError {
        match got {
            Err(e) => e,
            Ok(m) => ProtocolError::Unexpected {
                peer: Peer::Supervisor,
                phase: phase.name(),
                message: m.name(),
            },
        }
    }

    /// Serves one request, `first`, read from `chan` by a greeter.
    fn handoff<D: Drainable>(
        &mut self,
        chan: Channel,
        first: Message,
        mut fds: Vec<OwnedFd>,
        service: &mut D,
    ) -> Result<Next, ProcessError> {
        let t = self.cfg.timeouts;
        // Version 4: the socket to the successor the connections go on.
        let mut direct = None;
        let (id, deadline, grace, moving) = match first {
            Message::PrepareHandoff {
                handoff_id,
                deadline_ms,
                drain_grace_ms,
                successor_pid,
            } => Self::prepared(handoff_id, successor_pid, deadline_ms, drain_grace_ms, None),
            Message::PrepareHandoffV3 {
                handoff_id,
                deadline_ms,
                drain_grace_ms,
                successor_pid,
                move_connections,
                max_in_flight,
            } => Self::prepared(
                handoff_id,
                successor_pid,
                deadline_ms,
                drain_grace_ms,
                move_connections.then_some(max_in_flight as usize),
            ),
            Message::PrepareHandoffV4 {
                handoff_id,
                deadline_ms,
                drain_grace_ms,
                successor_pid,
                max_in_flight,
            } => {
                let (id, deadline, grace, moving) = Self::prepared(
                    handoff_id,
                    successor_pid,
                    deadline_ms,
                    drain_grace_ms,
                    Some(max_in_flight as usize),
                );
                match crate::moving::socket::open(std::mem::take(&mut fds)) {
                    Ok(c) => {
                        direct = Some(c);
                        (id, deadline, grace, moving)
                    }
                    // Without it nothing can move: close them, as a drain
                    // without moving would.
                    Err(e) => {
                        tracing::warn!(target: "handoff::incumbent", error = %e, "PrepareHandoff came without a usable socket to the successor; closing connections instead of moving them");
                        (id, deadline, grace, None)
                    }
                }
            }
            Message::Shutdown {
                stop_id,
                drain_grace_ms,
            } => {
                return self.shut_down(
                    chan,
                    stop_id,
                    Duration::from_millis(drain_grace_ms),
                    service,
                );
            }
            Message::FetchListeners {} => {
                // A supervisor restarted after a crash wants the listeners
                // back: hand over our copies (the kernel dups them into it).
                let names = self.kept.iter().map(|l| l.name.clone()).collect();
                let fds: Vec<_> = self
                    .kept
                    .iter()
                    .map(|l| std::os::fd::AsFd::as_fd(&l.fd))
                    .collect();
                match chan.send_with_fds(&Message::Listeners { names }, &fds) {
                    Ok(()) => {
                        tracing::info!(target: "handoff::incumbent", count = fds.len(), "handed the listeners to a re-attaching supervisor")
                    }
                    Err(e) => {
                        tracing::warn!(target: "handoff::incumbent", error = %e, "sending listeners")
                    }
                }
                return Ok(Next::Continue);
            }
            m => {
                return Err(ProtocolError::Unexpected {
                    peer: Peer::Supervisor,
                    phase: IncumbentPhase::Idle.name(),
                    message: m.name(),
                }
                .into())
            }
        };

        // Stops the drain: the supervisor's abort, or a failed send of moved
        // connections.
        let abort = crate::AbortSignal::new();
        // Connections the drain moves go out as they are offered, on a
        // thread of their own (docs/connection-transfer.md). Without that
        // thread nothing is moved: the drain closes them, as before.
        let hex = crate::protocol::IdHex(id);
        let (mover, flusher) = if let Some(max_in_flight) = moving {
            let mover = crate::Mover::moving_at_most(max_in_flight);
            // Straight to the successor (version 4), or to the supervisor.
            let started = direct
                .as_ref()
                .unwrap_or(&chan)
                .sender()
                .and_then(|s| Flusher::start(s, id, mover.clone(), deadline, abort.clone()));
            match started {
                Ok(f) => (mover, Some(f)),
                Err(e) => {
                    tracing::warn!(target: "handoff::incumbent", handoff_id = %hex, error = %e, "cannot start sending connections; closing them instead");
                    (crate::Mover::disabled(), None)
                }
            }
        } else {
            (crate::Mover::disabled(), None)
        };

        // Drain, heartbeating meanwhile, and watching the connection: the
        // supervisor says nothing while we drain unless it aborts (or it
        // went away), and then the drain stops at once.
        let hb = Heartbeat::start(chan.sender(), id, t.heartbeat);
        let watch = AbortWatch::start(&chan, &abort);
        crash::point("o-in-drain");
        let drained = service.drain_moving(grace, &abort, &mover);
        drop(watch);
        if abort.is_aborted() {
            hb.stop();
            // Its ResumeAfterAbort (or EOF) is waiting on the connection:
            // read it below, as after a completed drain, without saying
            // Drained to a supervisor that has moved on. (The offered
            // connections are the service's still: `resume` serves them.)
            let failed = flusher.as_ref().is_some_and(Flusher::failed);
            drop(flusher);
            drop(direct); // the successor sees our end close
            if failed {
                // Our own sending failed (the successor is gone or stuck):
                // serve on now rather than when the supervisor has noticed
                // — connections refused meanwhile would be closed, each a
                // client reconnecting. Safe: we said no Drained, hold the
                // lock, and the successor gets no Begin. Dropping the
                // channel aborts the handoff.
                tracing::warn!(target: "handoff::incumbent", handoff_id = %hex, "moving connections failed during the drain; serving them again and abandoning the handoff");
                self.resume(service)?;
                return Ok(Next::Continue);
            }
            // The supervisor aborted: its ResumeAfterAbort (or EOF) is
            // waiting on the connection.
            tracing::info!(target: "handoff::incumbent", handoff_id = %hex, "the handoff was aborted during the drain; the drain stops now");
            return self.after_drain(chan, id, deadline, service, false);
        }
        // Everything offered must be on its way before Drained.
        let sent = flusher.map(Flusher::finish);
        hb.stop();
        let report = match drained {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(target: "handoff::incumbent", handoff_id = %hex, error = %e, "drain failed; resuming");
                self.resume(service)?;
                return Ok(Next::Continue); // dropping the channel aborts the handoff
            }
        };
        if let Some(sent) = sent {
            let done = sent.and_then(|s| {
                tracing::info!(target: "handoff::incumbent", handoff_id = %hex, moved = s.moved, closed = s.closed, "connections moved");
                let count = Message::ConnectionsDone {
                    handoff_id: id,
                    moved: s.moved,
                    closed: s.closed,
                };
                // Moving directly, the successor gets the count too, and
                // then our end's close: it has everything before we say
                // Drained, so before it can get Begin.
                if let Some(d) = direct.take() {
                    d.send(&count)?;
                }
                chan.send(&count)
            });
            if let Err(e) = done {
                // The successor may hold some of them; it gets no Begin
                // (the supervisor aborts on the broken channel), so it
                // never reads them. Ours serve on.
                tracing::warn!(target: "handoff::incumbent", handoff_id = %hex, error = %e, "sending the moved connections failed; resuming");
                self.resume(service)?;
                return Ok(Next::Continue);
            }
        }
        let sent = chan.send(&Message::Drained {
            handoff_id: id,
            open_conns_remaining: report.open_conns_remaining,
            accept_closed: report.accept_closed,
        });
        if let Err(e) = sent {
            tracing::warn!(target: "handoff::incumbent", handoff_id = %hex, error = %e, "supervisor gone after drain; resuming");
            self.resume(service)?;
            return Ok(Next::Continue);
        }
        crash::point("o-after-drained");
        // From version 5 the seal follows at once: the supervisor would
        // only have asked for it (protocol.rs, "Versions").
        let seal_now = chan.version() >= SEAL_AT_ONCE_SINCE;
        self.after_drain(chan, id, deadline, service, seal_now)
    }

    /// A PrepareHandoff of either version, read: what the drain needs
    /// (`moving`: connections move, at most this many per batch).
    fn prepared(
        handoff_id: HandoffId,
        successor_pid: u32,
        deadline_ms: u64,
        drain_grace_ms: u64,
        moving: Option<usize>,
    ) -> (HandoffId, Instant, Duration, Option<usize>) {
        tracing::info!(target: "handoff::incumbent", handoff_id = %crate::protocol::IdHex(handoff_id), successor_pid, deadline_ms, drain_grace_ms, ?moving, "draining");
        (
            handoff_id,
            Instant::now() + Duration::from_millis(deadline_ms),
            Duration::from_millis(drain_grace_ms),
            moving,
        )
    }

    /// Drained (or the drain was cut short by an abort): seal at once
    /// (`seal_now`: version 5), or wait for the seal request — or resume.
    fn after_drain<D: Drainable>(
        &mut self,
        mut chan: Channel,
        id: HandoffId,
        deadline: Instant,
        service: &mut D,
        seal_now: bool,
    ) -> Result<Next, ProcessError> {
        let t = self.cfg.timeouts;
        let left = |slack: Duration| deadline.saturating_duration_since(Instant::now()) + slack;
        if !seal_now {
            match Self::recv(
                &mut chan,
                IncumbentPhase::Drained,
                Some(id),
                left(t.wire_slack),
            ) {
                Ok(Message::SealRequest { .. }) => {}
                Ok(Message::ResumeAfterAbort { .. }) => {
                    tracing::info!(target: "handoff::incumbent", handoff_id = %crate::protocol::IdHex(id), "handoff aborted while draining or drained; resuming");
                    self.resume(service)?;
                    return Ok(Next::Continue);
                }
                got => {
                    let e = Self::off_table(IncumbentPhase::Drained, got);
                    tracing::warn!(target: "handoff::incumbent", handoff_id = %crate::protocol::IdHex(id), error = %e, "lost the supervisor while drained; resuming");
                    self.resume(service)?;
                    return Ok(Next::Continue);
                }
            }
        }

        // Seal, heartbeating meanwhile; SealProgress frames from the service.
        let hb = Heartbeat::start(chan.sender(), id, t.heartbeat);
        let progress_sender = chan.sender().ok();
        let mut progress = |done: u64, total: u64| {
            if let Some(s) = &progress_sender {
                let _ = s.send(&Message::SealProgress {
                    handoff_id: id,
                    done,
                    total,
                });
            }
        };
        crash::point("o-in-seal");
        let sealed = service.seal(&mut progress);
        hb.stop();
        match sealed {
            Ok(state) => {
                // Release the lock *before* telling the supervisor: the
                // successor takes it as soon as it gets Begin.
                self.lock = None;
                if let Err(e) = chan.send(&Message::SealComplete {
                    handoff_id: id,
                    state,
                }) {
                    tracing::warn!(target: "handoff::incumbent", handoff_id = %crate::protocol::IdHex(id), error = %e, "supervisor gone after seal");
                    return self.recover_after_seal(id, service);
                }
                crash::point("o-after-seal-complete");
            }
            Err(e) => {
                tracing::error!(target: "handoff::incumbent", handoff_id = %crate::protocol::IdHex(id), error = %e, "seal failed");
                let _ = chan.send(&Message::SealFailed {
                    handoff_id: id,
                    error: e.to_string(),
                });
                // Whatever the supervisor says next (ResumeAfterAbort) or
                // does (hang up), we resume; the lock is still ours.
                let _ = Self::recv(
                    &mut chan,
                    IncumbentPhase::SealFailed,
                    Some(id),
                    left(t.wire_slack),
                );
                self.resume(service)?;
                return Ok(Next::Continue);
            }
        }

        // Sealed: Commit or ResumeAfterAbort.
        match Self::recv(
            &mut chan,
            IncumbentPhase::Sealed,
            Some(id),
            left(t.wire_slack) + self.cfg.lock_wait,
        ) {
            Ok(Message::Commit { .. }) => {
                crash::point("o-after-commit");
                service.retire();
                Ok(Next::Retire(Retired::Committed { handoff_id: id }))
            }
            Ok(Message::ResumeAfterAbort { .. }) => {
                tracing::info!(target: "handoff::incumbent", handoff_id = %crate::protocol::IdHex(id), "handoff aborted after seal; re-taking the state lock");
                let lock = self.retake_lock(id);
                self.relocked(lock, service)?;
                Ok(Next::Continue)
            }
            got => {
                let e = Self::off_table(IncumbentPhase::Sealed, got);
                tracing::warn!(target: "handoff::incumbent", handoff_id = %crate::protocol::IdHex(id), error = %e, "lost the supervisor while sealed");
                self.recover_after_seal(id, service)
            }
        }
    }

    /// Stops serving for good, as the supervisor asked: drain within
    /// `grace` (heartbeating, as in a handoff, so a long drain is not taken
    /// for a dead process), report it, retire.
    ///
    /// A failed drain changes nothing: the service resumes, and the
    /// connection closes without ShutdownDrained — the supervisor then
    /// falls back to a signal, and says so. Once the drain succeeded, the
    /// stop is final even if the reply cannot be delivered: the supervisor
    /// asked for it, and a process left half-drained and unsupervised would
    /// serve nobody well.
    fn shut_down<D: Drainable>(
        &mut self,
        chan: Channel,
        id: HandoffId,
        grace: Duration,
        service: &mut D,
    ) -> Result<Next, ProcessError> {
        let hex = crate::protocol::IdHex(id);
        tracing::info!(target: "handoff::incumbent", stop_id = %hex, drain_grace_ms = grace.as_millis() as u64, "stopping: draining");
        let hb = Heartbeat::start(chan.sender(), id, self.cfg.timeouts.heartbeat);
        let drained = service.drain(grace);
        hb.stop();
        let report = match drained {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(target: "handoff::incumbent", stop_id = %hex, error = %e, "drain failed while stopping; resuming (the supervisor falls back to a signal)");
                self.resume(service)?;
                return Ok(Next::Continue);
            }
        };
        let sent = chan.send(&Message::ShutdownDrained {
            stop_id: id,
            open_conns_remaining: report.open_conns_remaining,
            accept_closed: report.accept_closed,
        });
        if let Err(e) = sent {
            let e = ProtocolError::frame(Peer::Supervisor, IncumbentPhase::Idle.name(), e);
            tracing::warn!(target: "handoff::incumbent", stop_id = %hex, error = %e, "supervisor gone after the stop's drain; retiring anyway");
        }
        service.retire();
        Ok(Next::Retire(Retired::Stopped { stop_id: id }))
    }

    /// The supervisor vanished after we released the lock. Whoever holds the
    /// lock is the incumbent: if we can take it back, the successor never
    /// made it (or gave up); if not within `recovery_wait`, it did.
    fn recover_after_seal<D: Drainable>(
        &mut self,
        id: HandoffId,
        service: &mut D,
    ) -> Result<Next, ProcessError> {
        match StateLock::acquire_within(&self.cfg.state_dir, self.cfg.recovery_wait) {
            Ok(lock) => {
                tracing::info!(target: "handoff::incumbent", handoff_id = %crate::protocol::IdHex(id), "re-took the state lock; resuming");
                self.relocked(lock, service)?;
                Ok(Next::Continue)
            }
            Err(crate::lock::LockError::Busy { .. }) => {
                tracing::info!(target: "handoff::incumbent", handoff_id = %crate::protocol::IdHex(id), "the successor holds the state lock; retiring");
                service.retire();
                Ok(Next::Retire(Retired::SuccessorWon { handoff_id: id }))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Re-takes the state lock after an aborted handoff, however long that
    /// takes.
    ///
    /// We released it at seal, so until we hold it again someone else may
    /// change the state: serving (resuming) without it could lose writes.
    /// Exiting would be worse than waiting: the supervisor's crash restarts
    /// would each fail on the same held lock, so the service would stay
    /// down for as long as the holder keeps it, and then stay down. Waiting
    /// sealed keeps every connection queued in the listeners' backlog (the
    /// supervisor holds the listeners) and resumes the moment the lock is
    /// free. It is said at error level at once and every 30 s while it
    /// lasts, naming the lock and its recorded holder: someone must act.
    fn retake_lock(&self, id: HandoffId) -> StateLock {
        const SAY_EVERY: Duration = Duration::from_secs(30);
        let hex = crate::protocol::IdHex(id);
        let started = Instant::now();
        let mut said: Option<Instant> = None;
        let mut pause = Duration::from_millis(10);
        loop {
            match StateLock::acquire_within(&self.cfg.state_dir, self.cfg.lock_wait) {
                Ok(lock) => {
                    if said.is_some() {
                        tracing::warn!(target: "handoff::incumbent", handoff_id = %hex, waited_ms = started.elapsed().as_millis() as u64, "re-took the state lock at last; resuming");
                    }
                    return lock;
                }
                Err(e) => {
                    if said.is_none_or(|t| t.elapsed() >= SAY_EVERY) {
                        said = Some(Instant::now());
                        tracing::error!(target: "handoff::incumbent", handoff_id = %hex, error = %e, waited_ms = started.elapsed().as_millis() as u64,
                            "cannot re-take the state lock after an aborted handoff: NOT serving until it is free (serving without it could lose writes); still retrying. Find the holder with `fuser {}`",
                            self.cfg.state_dir.join(crate::lock::LOCK_FILE).display());
                    }
                    // A busy lock was already waited for; any other
                    // failure returns at once, so pause before the next.
                    if !matches!(e, crate::lock::LockError::Busy { .. }) {
                        std::thread::sleep(pause);
                        pause = (pause * 2).min(Duration::from_secs(1));
                    }
                }
            }
        }
    }

    /// Re-binds the control socket if its path is gone (see
    /// [`CONTROL_PATH_CHECK`]) and its directory exists; the supervisor
    /// re-creates the runtime dir (mode 0700) when it finds it gone, and
    /// only it does: a directory made here would not be checked the way
    /// `handoff run` checks its own.
    fn keep_control_path(&mut self) {
        let path = &self.cfg.control_path;
        match std::fs::symlink_metadata(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            // There (ours, or a successor's after an aborted handoff, which
            // `relocked` replaces), or not checkable: leave it.
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

    /// Lock re-taken after a seal: the successor may have bound the control
    /// path meanwhile, so bind it again before serving.
    fn relocked<D: Drainable>(
        &mut self,
        lock: StateLock,
        service: &mut D,
    ) -> Result<(), ProcessError> {
        self.lock = Some(lock);
        let fresh =
            bind_control(&self.cfg.control_path).map_err(|source| ProcessError::ControlSocket {
                path: self.cfg.control_path.clone(),
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
        self.resume(service)
    }

    fn resume<D: Drainable>(&mut self, service: &mut D) -> Result<(), ProcessError> {
        service
            .resume()
            .map_err(|e| ProcessError::Service(format!("resume failed: {e}")))
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
