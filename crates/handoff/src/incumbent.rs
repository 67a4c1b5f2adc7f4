//! The incumbent role: the serving process. Holds the state lock, listens on
//! the control socket, and answers the supervisor's handoff requests by
//! calling into the service's [`Drainable`] implementation.
//!
//! Outside a handoff it also answers a stop (`handoff stop`, protocol
//! version 2): drain, say so, retire — so a service needs no SIGTERM handler
//! to finish its requests when it is stopped.
//!
//! It also recovers by itself when the supervisor disappears (DESIGN §6):
//! EOF while drained → resume; EOF while sealed → try to re-take the state
//! lock (resume if it gets it; if the successor holds it, the successor has
//! won and this process retires).

use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use crate::accept::{AcceptBackoff, Verdict};
use crate::channel::Channel;
use crate::crash;
use crate::error::{ProcessError, ProtocolError};
use crate::lock::StateLock;
use crate::phase::{IncumbentPhase, Peer};
use crate::process::{bind_control, Drainable, Heartbeat, ProcessConfig};
use crate::protocol::{negotiate, HandoffId, Hello, Message, Role};
use crate::sys;

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
    /// Connections taken over from a replaced control socket, served before
    /// the next accept.
    queued: Vec<UnixStream>,
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
    ) -> Incumbent {
        Incumbent {
            cfg,
            lock: Some(lock),
            listener,
            kept,
            queued: vec![],
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

    /// Serves the control socket until this process is retired. Blocks the
    /// calling thread: run it on a thread of its own.
    ///
    /// A failed accept for want of descriptors or memory is waited out
    /// ([`AcceptBackoff`]): returning would make the service exit because
    /// its clients had used up its descriptors for a moment. Only a control
    /// socket that is itself gone ends the loop with an error.
    pub fn serve<D: Drainable>(mut self, service: &mut D) -> Result<Retired, ProcessError> {
        let mut backoff = AcceptBackoff::new();
        loop {
            let next = if self.queued.is_empty() {
                self.listener.accept().map(|(s, _)| s)
            } else {
                Ok(self.queued.remove(0))
            };
            let stream = match next {
                Ok(s) => {
                    if let Some(unsaid) = backoff.succeeded() {
                        tracing::info!(target: "handoff::incumbent", unsaid, "accepting on the control socket again");
                    }
                    s
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
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
            let Some(chan) = self.greet(stream) else {
                continue;
            };
            match self.handoff(chan, service)? {
                Next::Continue => continue,
                Next::Retire(r) => {
                    tracing::info!(target: "handoff::incumbent", ?r, "retiring");
                    return Ok(r);
                }
            }
        }
    }

    /// Checks the caller and exchanges Hello/HelloAck. A failed greeting
    /// only drops that connection: the service goes on.
    fn greet(&self, stream: UnixStream) -> Option<Channel> {
        let ours = nix::unistd::geteuid().as_raw();
        match sys::peer_credentials(&stream) {
            Ok(c) if c.uid == ours || c.uid == 0 => {}
            Ok(c) => {
                tracing::warn!(target: "handoff::incumbent", uid = c.uid, pid = ?c.pid, "refusing control connection from another user");
                return None;
            }
            Err(e) => {
                tracing::warn!(target: "handoff::incumbent", error = %e, "cannot identify control peer");
                return None;
            }
        }
        let mut chan = Channel::new(stream);
        let hello = Message::Hello(Hello {
            role: Role::Incumbent,
            pid: std::process::id(),
            proto_min: self.cfg.versions.min,
            proto_max: self.cfg.versions.max,
            build_id: self.cfg.build_id.clone(),
        });
        if let Err(e) = chan.send(&hello) {
            tracing::warn!(target: "handoff::incumbent", error = %e, "sending Hello");
            return None;
        }
        match chan.recv(Some(self.cfg.timeouts.hello)) {
            Ok(Message::HelloAck { version }) => {
                // The supervisor picks; we only check it is one we speak.
                let ok = negotiate(
                    self.cfg.versions,
                    crate::protocol::VersionRange {
                        min: version,
                        max: version,
                    },
                    Role::Supervisor,
                );
                match ok {
                    Ok(v) => {
                        chan.set_version(v);
                        Some(chan)
                    }
                    Err(e) => {
                        tracing::warn!(target: "handoff::incumbent", error = %e, "supervisor chose a version we do not speak");
                        None
                    }
                }
            }
            Ok(m) => {
                tracing::warn!(target: "handoff::incumbent", message = m.name(), "expected HelloAck");
                None
            }
            Err(e) => {
                tracing::debug!(target: "handoff::incumbent", error = %e, "control connection closed during greeting");
                None
            }
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

    fn handoff<D: Drainable>(
        &mut self,
        mut chan: Channel,
        service: &mut D,
    ) -> Result<Next, ProcessError> {
        let t = self.cfg.timeouts;
        let (id, deadline, grace) = match Self::recv(
            &mut chan,
            IncumbentPhase::Idle,
            None,
            self.cfg.idle_timeout,
        ) {
            Ok(Message::PrepareHandoff {
                handoff_id,
                deadline_ms,
                drain_grace_ms,
                successor_pid,
            }) => {
                tracing::info!(target: "handoff::incumbent", handoff_id = %crate::protocol::IdHex(handoff_id), successor_pid, deadline_ms, drain_grace_ms, "draining");
                (
                    handoff_id,
                    Instant::now() + Duration::from_millis(deadline_ms),
                    Duration::from_millis(drain_grace_ms),
                )
            }
            Ok(Message::Shutdown {
                stop_id,
                drain_grace_ms,
            }) => {
                return self.shut_down(
                    chan,
                    stop_id,
                    Duration::from_millis(drain_grace_ms),
                    service,
                );
            }
            Ok(Message::FetchListeners {}) => {
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
            Ok(_) => unreachable!("phase table"),
            Err(e) => {
                // Nothing was changed yet: the connection simply ends.
                tracing::debug!(target: "handoff::incumbent", error = %e, "control connection ended before PrepareHandoff");
                return Ok(Next::Continue);
            }
        };
        let left = |slack: Duration| deadline.saturating_duration_since(Instant::now()) + slack;

        // Drain, heartbeating meanwhile.
        let hb = Heartbeat::start(chan.sender(), id, t.heartbeat);
        crash::point("o-in-drain");
        let drained = service.drain(grace);
        hb.stop();
        let report = match drained {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(target: "handoff::incumbent", handoff_id = %crate::protocol::IdHex(id), error = %e, "drain failed; resuming");
                self.resume(service)?;
                return Ok(Next::Continue); // dropping the channel aborts the handoff
            }
        };
        let sent = chan.send(&Message::Drained {
            handoff_id: id,
            open_conns_remaining: report.open_conns_remaining,
            accept_closed: report.accept_closed,
        });
        if let Err(e) = sent {
            tracing::warn!(target: "handoff::incumbent", handoff_id = %crate::protocol::IdHex(id), error = %e, "supervisor gone after drain; resuming");
            self.resume(service)?;
            return Ok(Next::Continue);
        }
        crash::point("o-after-drained");

        // Drained: wait for the seal request.
        match Self::recv(
            &mut chan,
            IncumbentPhase::Drained,
            Some(id),
            left(t.wire_slack),
        ) {
            Ok(Message::SealRequest { .. }) => {}
            Ok(Message::ResumeAfterAbort { .. }) => {
                tracing::info!(target: "handoff::incumbent", handoff_id = %crate::protocol::IdHex(id), "handoff aborted while drained; resuming");
                self.resume(service)?;
                return Ok(Next::Continue);
            }
            Ok(_) => unreachable!("phase table"),
            Err(e) => {
                tracing::warn!(target: "handoff::incumbent", handoff_id = %crate::protocol::IdHex(id), error = %e, "lost the supervisor while drained; resuming");
                self.resume(service)?;
                return Ok(Next::Continue);
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
            Ok(_) => unreachable!("phase table"),
            Err(e) => {
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
                if s.set_nonblocking(false).is_ok() {
                    self.queued.push(s);
                }
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
