//! One handoff in flight: the supervisor's side of the protocol, phase by
//! phase, with the journal, the two clocks, and the abort path.

use std::ffi::OsStr;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use super::peer::{check_hello, connect_incumbent_socket};
use super::types::{ConnectionsMoved, HandoffOptions, PhaseDone, Report, Successor, Supervisor};
use crate::channel::Channel;
use crate::child::Child;
use crate::crash;
use crate::error::{HandoffError, ProtocolError};
use crate::frame::FrameError;
use crate::journal::{now_ms, JournalRecord};
use crate::phase::{Peer, SupervisorPhase};
use crate::protocol::{negotiate, HandoffId, Message, MovedMeta, Role, MOVE_SINCE};
use crate::spawn::{spawn_service, Program};
use crate::sys;
use crate::timeouts::{PhaseClock, Timeouts};

/// Fresh handoff id: random enough to never repeat across restarts. (A
/// stop's id too: it scopes that exchange the same way.)
pub(super) fn new_handoff_id() -> HandoffId {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(now_ms());
    h.write_u32(std::process::id());
    h.finish()
}

mod ending;
mod held;
pub(super) use ending::kill_successor;

/// One handoff in flight.
pub(super) struct Run<'a, 'o> {
    sup: &'a Supervisor,
    t: Timeouts,
    observer: &'o mut dyn FnMut(PhaseDone),
    id: HandoffId,
    started: Instant,
    phase_started: Instant,
    phases: Vec<PhaseDone>,
    record: JournalRecord,
    with_incumbent: bool,
    old: Option<Child>,
    o: Option<Channel>,
    n: Option<Successor>,
    /// PrepareHandoff was sent: the incumbent must be told to resume.
    prepared: bool,
    /// Journal write that recorded the successor's pid; must be durable
    /// before Begin.
    successor_recorded: u64,
    /// The successor said Hello and got HelloAck (at once, when it was
    /// prepared ahead).
    greeted: bool,
    /// How long the successor had been held, when it was prepared ahead.
    held_for: Option<Duration>,
    /// Reported with the outcome (e.g. a prepared successor that was found
    /// dead and replaced).
    warnings: Vec<String>,
    /// The build id the successor announced in its Hello.
    hello_build: String,
    /// This handoff moves connections (both peers negotiated version 3).
    moving: bool,
    /// Connections relayed to the successor so far.
    relayed: u64,
    /// The descriptors on their way to the successor (its window: see
    /// `drain_and_seal`).
    to_successor: sys::fdpass::InFlight,
    /// The incumbent's count (ConnectionsDone), when it moved any.
    moved: Option<ConnectionsMoved>,
}

impl<'a, 'o> Run<'a, 'o> {
    pub(super) fn new(
        sup: &'a Supervisor,
        opts: HandoffOptions,
        observer: &'o mut dyn FnMut(PhaseDone),
        with_incumbent: bool,
    ) -> Self {
        let mut t = sup.cfg.timeouts;
        if let Some(d) = opts.deadline {
            t.deadline = d;
        }
        if let Some(g) = opts.drain_grace {
            t.drain_grace = g;
        }
        let id = new_handoff_id();
        let old = if with_incumbent {
            sup.procs().incumbent.clone()
        } else {
            None
        };
        let now = Instant::now();
        Run {
            sup,
            t,
            observer,
            id,
            started: now,
            phase_started: now,
            phases: vec![],
            record: JournalRecord {
                handoff_id: id,
                phase: SupervisorPhase::Negotiating,
                incumbent_pid: old.as_ref().map(Child::pid),
                successor_pid: None,
                started_at: now_ms(),
            },
            with_incumbent,
            old,
            o: None,
            n: None,
            prepared: false,
            successor_recorded: 0,
            greeted: false,
            held_for: None,
            warnings: vec![],
            hello_build: String::new(),
            moving: false,
            relayed: 0,
            to_successor: sys::fdpass::InFlight::new(1),
            moved: None,
        }
    }

    fn phase(&self) -> SupervisorPhase {
        self.record.phase
    }

    /// Journals the next phase and reports the one that just ended.
    fn enter(&mut self, next: SupervisorPhase) -> Result<(), HandoffError> {
        let now = Instant::now();
        let done = PhaseDone {
            phase: self.record.phase,
            took: now - self.phase_started,
        };
        self.phases.push(done);
        (self.observer)(done);
        tracing::info!(
            target: "handoff::phase",
            handoff_id = %crate::protocol::IdHex(self.id),
            phase = done.phase.name(),
            took_us = done.took.as_micros() as u64,
            next = next.name(),
        );
        self.phase_started = now;
        self.record.phase = next;
        self.sup.journal.write(&self.record);
        Ok(())
    }

    /// What remains of the overall deadline.
    fn remaining(&self) -> Duration {
        self.t.deadline.saturating_sub(self.started.elapsed())
    }

    pub(super) fn execute(mut self, program: &Program) -> Result<Report, HandoffError> {
        self.sup.journal.reset_error();
        // With a prepared successor this rewrite only refreshes the incumbent's
        // pid: the record naming the successor (which is all recovery needs)
        // was made durable by the prepare, so Begin does not wait for it.
        self.sup.journal.write(&self.record);
        match self.drive(program) {
            Ok(()) => self.commit(),
            Err(e) => Err(self.abort(e)),
        }
    }

    /// Everything up to and including Ready.
    fn drive(&mut self, program: &Program) -> Result<(), HandoffError> {
        // Spawn first, greet the incumbent second: the successor's exec,
        // dynamic loading and warm-up (most of a handoff's time) then run on
        // the other core while we greet the incumbent, instead of after it.
        // Nothing is asked of the incumbent before the successor's Hello, so
        // a failed greeting costs only the successor, which `abort` reaps.
        if self.n.is_none() {
            self.spawn_successor(program)?;
        }
        if self.with_incumbent {
            self.connect_incumbent()?;
            // Where negotiating's time goes (HANDOFF_LOG=handoff::phase=debug).
            tracing::debug!(target: "handoff::phase", handoff_id = %crate::protocol::IdHex(self.id), "incumbent greeted");
        }
        if !self.greeted {
            self.greet_successor()?;
        }

        let mut state = None;
        if self.o.is_some() {
            self.enter(SupervisorPhase::Draining)?;
            match self.drain_and_seal() {
                Ok(s) => state = s,
                Err(e) if self.incumbent_died() => {
                    // The incumbent crashed mid-handoff: nothing to resume,
                    // so carry on with the successor rather than leave the
                    // listeners unserved.
                    tracing::warn!(target: "handoff::phase", handoff_id = %crate::protocol::IdHex(self.id), error = %e,
                        "incumbent died during the handoff; continuing with the successor");
                    self.o = None;
                    self.prepared = false;
                    if self.phase() != SupervisorPhase::Sealing {
                        self.enter(SupervisorPhase::Sealing)?;
                    }
                }
                Err(e) => return Err(e),
            }
            self.enter(SupervisorPhase::AwaitingReady)?;
        } else {
            self.enter(SupervisorPhase::AwaitingReady)?;
        }

        // From Begin on the successor holds the state lock: a restarted
        // supervisor must be able to find it. (The write was queued at spawn
        // time and has had the whole drain and seal to land.)
        self.sup.journal.wait(self.successor_recorded)?;
        let id = self.id;
        self.n_chan()
            .send(&Message::Begin {
                handoff_id: id,
                state,
            })
            .map_err(|e| ProtocolError::frame(Peer::Successor, "begin", e))?;
        crash::point_if(self.with_incumbent, "s-after-begin");
        let ready = self.recv_phase(Peer::Successor, self.remaining())?;
        crash::point_if(self.with_incumbent, "s-after-ready");
        let Message::Ready {
            healthz_ok,
            metadata,
            ..
        } = ready
        else {
            unreachable!("phase table admits only Ready here")
        };
        if !healthz_ok {
            let detail = metadata
                .iter()
                .find(|(k, _)| k == "health")
                .map(|(_, v)| v.clone())
                .unwrap_or_else(|| "no detail given".into());
            return Err(HandoffError::Unhealthy { detail });
        }
        self.record.successor_pid = self.n.as_ref().map(|n| n.child.pid());
        if let Some(b) = metadata.iter().find(|(k, _)| k == "build_id") {
            let mut p = self.sup.procs();
            p.incumbent_build = b.1.clone();
        }
        Ok(())
    }

    fn incumbent_died(&self) -> bool {
        match &self.old {
            Some(c) => c.wait_timeout(Duration::from_millis(500)).is_some(),
            None => false,
        }
    }

    fn n_chan(&mut self) -> &mut Channel {
        &mut self.n.as_mut().expect("successor spawned before use").chan
    }

    fn connect_incumbent(&mut self) -> Result<(), HandoffError> {
        let path = &self.sup.cfg.control_path;
        let phase = "connecting to the incumbent";
        let (stream, kernel) = connect_incumbent_socket(path, phase)?;
        let mut chan = Channel::new(stream);
        let hello = match chan.recv(Some(self.t.hello)) {
            Ok(Message::Hello(h)) => h,
            Ok(m) => {
                return Err(ProtocolError::Unexpected {
                    peer: Peer::Incumbent,
                    phase: "hello",
                    message: m.name(),
                }
                .into())
            }
            Err(e) => return Err(ProtocolError::frame(Peer::Incumbent, "hello", e).into()),
        };
        crash::point_if(self.with_incumbent, "s-after-incumbent-hello");
        let expected_pid = self.old.as_ref().map(Child::pid);
        check_hello(&hello, Role::Incumbent, kernel.pid, expected_pid, "hello")?;
        let v = negotiate(self.sup.cfg.versions, hello.range(), Role::Incumbent)
            .map_err(|e| ProtocolError::NoCommonVersion(e, "hello"))?;
        chan.send(&Message::HelloAck { version: v })
            .map_err(|e| ProtocolError::frame(Peer::Incumbent, "hello", e))?;
        crash::point_if(self.with_incumbent, "s-after-incumbent-helloack");
        chan.set_version(v);
        self.o = Some(chan);
        Ok(())
    }

    fn spawn_successor(&mut self, program: &Program) -> Result<(), HandoffError> {
        let (ours, theirs) = UnixStream::pair().map_err(|e| crate::error::SpawnError::Prepare {
            path: program.path.clone(),
            source: e,
        })?;
        sys::creds::enable_passcred(&ours).map_err(|e| crate::error::SpawnError::Prepare {
            path: program.path.clone(),
            source: e,
        })?;
        let control: &OsStr = self.sup.cfg.control_path.as_os_str();
        let state: &OsStr = self.sup.cfg.state_dir.as_os_str();
        let child = spawn_service(
            program,
            &self.sup.listeners,
            &theirs,
            &[
                ("HANDOFF_CONTROL_SOCK", control),
                ("HANDOFF_STATE_DIR", state),
            ],
        )?;
        drop(theirs);
        crash::point_if(self.with_incumbent, "s-after-spawn");
        self.record.successor_pid = Some(child.pid());
        let pid = child.pid();
        self.n = Some(Successor {
            child,
            chan: Channel::new(ours),
        });
        self.successor_recorded = self.sup.journal.write(&self.record);
        tracing::info!(target: "handoff::spawn", handoff_id = %crate::protocol::IdHex(self.id), pid, program = %program.path.display());
        Ok(())
    }

    /// Reads the successor's Hello (sent once its warm-up is done) and
    /// answers it.
    fn greet_successor(&mut self) -> Result<(), HandoffError> {
        let pid = self.n.as_ref().map(|n| n.child.pid());
        let hello_budget = self.t.hello;
        let (msg, cred) = match self.n_chan().recv_with_credentials(hello_budget) {
            Ok(v) => v,
            Err(e) => {
                return Err(self.successor_failure(ProtocolError::frame(
                    Peer::Successor,
                    "hello",
                    e,
                )))
            }
        };
        crash::point_if(self.with_incumbent, "s-after-successor-hello");
        let Message::Hello(hello) = msg else {
            return Err(ProtocolError::Unexpected {
                peer: Peer::Successor,
                phase: "hello",
                message: msg.name(),
            }
            .into());
        };
        // Linux attaches SCM_CREDENTIALS (we set SO_PASSCRED before the
        // spawn); elsewhere identity rests on construction.
        let kernel_pid = match cred {
            Some(c) => c.pid,
            None if cfg!(any(target_os = "linux", target_os = "android")) => {
                return Err(ProtocolError::NoCredentials {
                    peer: Peer::Successor,
                    phase: "hello",
                }
                .into())
            }
            None => None,
        };
        check_hello(&hello, Role::Successor, kernel_pid, pid, "hello")?;
        let v = negotiate(self.sup.cfg.versions, hello.range(), Role::Successor)
            .map_err(|e| ProtocolError::NoCommonVersion(e, "hello"))?;
        let chan = self.n_chan();
        chan.send(&Message::HelloAck { version: v })
            .map_err(|e| ProtocolError::frame(Peer::Successor, "hello", e))?;
        chan.set_version(v);
        crash::point_if(self.with_incumbent, "s-after-successor-helloack");
        self.greeted = true;
        self.hello_build = hello.build_id.clone();
        Ok(())
    }

    /// A successor channel failure: if the child exited, say so (that is the
    /// useful diagnosis), otherwise keep the protocol error.
    fn successor_failure(&self, e: ProtocolError) -> HandoffError {
        if let Some(n) = &self.n {
            if let Some(exit) = n.child.wait_timeout(Duration::from_millis(200)) {
                return HandoffError::SuccessorExited {
                    pid: n.child.pid(),
                    exit,
                };
            }
        }
        e.into()
    }

    fn drain_and_seal(&mut self) -> Result<Option<Vec<u8>>, HandoffError> {
        let remaining = self.remaining();
        let grace = self.t.drain_grace.min(remaining);
        let id = self.id;
        let successor_pid = self.n.as_ref().map(|n| n.child.pid()).unwrap_or(0);
        let o = self.o.as_ref().expect("connected");
        // Version 3 on the incumbent's channel says whether to move its
        // connections: only when the successor can take them too.
        // How many descriptors may be on their way on each hop: a quarter
        // of the supervisor's limit and of the incumbent's, so that the two
        // hops together stay within half of either (the kernel counts them
        // against the user, `sys::fdpass::unread_by_peer`). The incumbent
        // is told ours and applies its own; we apply both to ours. An
        // incumbent whose limit cannot be read gets one batch at a time.
        let own_window = sys::fdpass::window_for_limit(None);
        let incumbent_window = self
            .record
            .incumbent_pid
            .and_then(|pid| sys::fdpass::nofile_limit_of(pid).ok())
            .map(|l| sys::fdpass::window_for_limit(Some(l)))
            .unwrap_or(sys::fdpass::MAX_FDS);
        self.to_successor = sys::fdpass::InFlight::new(own_window.min(incumbent_window));
        let prepare = if o.version() >= MOVE_SINCE {
            self.moving = self
                .n
                .as_ref()
                .is_some_and(|n| n.chan.version() >= MOVE_SINCE);
            Message::PrepareHandoffV3 {
                handoff_id: id,
                successor_pid,
                deadline_ms: remaining.as_millis() as u64,
                drain_grace_ms: grace.as_millis() as u64,
                move_connections: self.moving,
                // What we can take in at once: a batch lands in our own
                // descriptor table before it goes on.
                max_in_flight: u32::try_from(own_window).unwrap_or(u32::MAX),
            }
        } else {
            Message::PrepareHandoff {
                handoff_id: id,
                successor_pid,
                deadline_ms: remaining.as_millis() as u64,
                drain_grace_ms: grace.as_millis() as u64,
            }
        };
        o.send(&prepare)
            .map_err(|e| ProtocolError::frame(Peer::Incumbent, "draining", e))?;
        self.prepared = true;
        crash::point_if(self.with_incumbent, "s-after-prepare");
        self.recv_phase(Peer::Incumbent, grace)?;
        crash::point_if(self.with_incumbent, "s-after-drained");

        self.enter(SupervisorPhase::Sealing)?;
        self.o
            .as_ref()
            .expect("connected")
            .send(&Message::SealRequest { handoff_id: id })
            .map_err(|e| ProtocolError::frame(Peer::Incumbent, "sealing", e))?;
        crash::point_if(self.with_incumbent, "s-after-seal-request");
        let sealed = self.recv_phase(Peer::Incumbent, self.remaining())?;
        crash::point_if(self.with_incumbent, "s-after-sealed");
        match sealed {
            Message::SealComplete { state, .. } => Ok(state),
            Message::SealFailed { error, .. } => Err(HandoffError::SealFailed { reason: error }),
            _ => unreachable!("phase table admits only seal outcomes here"),
        }
    }

    /// Reads until a message that ends the current phase arrives, enforcing
    /// liveness per read and `cap` (plus wire slack) on the whole phase.
    fn recv_phase(&mut self, peer: Peer, cap: Duration) -> Result<Message, HandoffError> {
        let phase = self.phase();
        let clock = PhaseClock::start(cap);
        let id = self.id;
        let t = self.t;
        loop {
            let now = Instant::now();
            if clock.expired(now, t.wire_slack) {
                let e = ProtocolError::Timeout {
                    peer,
                    phase: phase.name(),
                    waited_ms: now.duration_since(clock.started).as_millis() as u64,
                    clock: "phase deadline",
                };
                return Err(if peer == Peer::Successor {
                    self.successor_failure(e)
                } else {
                    e.into()
                });
            }
            let timeout = t.read_timeout(&clock, now);
            // While the incumbent drains, its frames may carry moved
            // connections' descriptors: read them with recvmsg, or the
            // kernel would discard them.
            let with_fds = peer == Peer::Incumbent && phase == SupervisorPhase::Draining;
            let mut quiet = false;
            if peer == Peer::Incumbent {
                // While the incumbent drains and seals, the successor has
                // nothing to say: anything readable on its channel is its
                // hang-up (it died) or a protocol breach. Either aborts now,
                // not after a drain that may last the whole drain grace
                // while nobody accepts.
                if let (Some(o), Some(n)) = (self.o.as_ref(), self.n.as_ref()) {
                    match o.first_readable(&n.chan, timeout) {
                        Ok(Some(true)) => return Err(self.successor_spoke(phase.name())),
                        Ok(Some(false)) => {}
                        Ok(None) => quiet = true,
                        Err(e) => {
                            return Err(ProtocolError::frame(peer, phase.name(), e.into()).into())
                        }
                    }
                }
            }
            let chan = match peer {
                Peer::Incumbent => self.o.as_mut().expect("connected"),
                _ => &mut self.n.as_mut().expect("spawned").chan,
            };
            let got = if quiet {
                // Nothing from the incumbent within the read timeout: the
                // same failure a read that timed out reports.
                Err(FrameError::TimedOut {
                    waited_ms: timeout.as_millis() as u64,
                })
            } else if with_fds {
                chan.recv_with_fds(timeout)
            } else {
                chan.recv(Some(timeout)).map(|m| (m, vec![]))
            };
            let (msg, fds) = match got {
                Ok(m) => m,
                Err(FrameError::TimedOut { waited_ms })
                    if clock.expired(Instant::now(), t.wire_slack) =>
                {
                    let e = ProtocolError::Timeout {
                        peer,
                        phase: phase.name(),
                        waited_ms: clock.started.elapsed().as_millis() as u64,
                        clock: "phase deadline",
                    };
                    let _ = waited_ms;
                    return Err(if peer == Peer::Successor {
                        self.successor_failure(e)
                    } else {
                        e.into()
                    });
                }
                Err(e) => {
                    let e = ProtocolError::frame(peer, phase.name(), e);
                    return Err(if peer == Peer::Successor {
                        self.successor_failure(e)
                    } else {
                        e.into()
                    });
                }
            };
            let legal = phase.allows(peer, &msg);
            let msg = crate::phase::admit(peer, phase.name(), legal, Some(id), msg)?;
            if msg.is_keepalive() {
                continue;
            }
            match msg {
                Message::Connections { conns, .. } => self.relay(conns, fds)?,
                Message::ConnectionsDone { moved, closed, .. } => {
                    if !self.moving {
                        return Err(self.unasked("ConnectionsDone"));
                    }
                    if moved != self.relayed {
                        self.warnings.push(format!("the old incumbent counted {moved} connections moved, the supervisor relayed {}", self.relayed));
                    }
                    self.moved = Some(ConnectionsMoved { moved, closed });
                }
                msg => return Ok(msg),
            }
        }
    }

    /// The successor's channel turned readable while the incumbent drains
    /// or seals: read what it is — its hang-up, or a message the phase
    /// table does not allow there — and make it the handoff's failure.
    fn successor_spoke(&mut self, phase: &'static str) -> HandoffError {
        let Some(n) = self.n.as_mut() else {
            return ProtocolError::Unexpected {
                peer: Peer::Successor,
                phase,
                message: "a successor that was never spawned",
            }
            .into();
        };
        let e = match n.chan.recv(Some(self.t.wire_slack)) {
            Err(e) => ProtocolError::frame(Peer::Successor, phase, e),
            Ok(msg) => ProtocolError::Unexpected {
                peer: Peer::Successor,
                phase,
                message: msg.name(),
            },
        };
        self.successor_failure(e)
    }

    /// A move message from an incumbent that was not asked to move.
    fn unasked(&self, message: &'static str) -> HandoffError {
        ProtocolError::Unexpected {
            peer: Peer::Incumbent,
            phase: "draining (no connections were to move)",
            message,
        }
        .into()
    }

    /// Passes one batch of moved connections on to the successor as it
    /// came; our copies close when this returns, so the supervisor holds at
    /// most one batch (docs/connection-transfer.md).
    fn relay(
        &mut self,
        conns: Vec<MovedMeta>,
        fds: Vec<std::os::fd::OwnedFd>,
    ) -> Result<(), HandoffError> {
        if !self.moving {
            return Err(self.unasked("Connections"));
        }
        if conns.len() != fds.len() {
            return Err(ProtocolError::frame(
                Peer::Incumbent,
                "draining",
                FrameError::Malformed {
                    message: "Connections",
                    reason: format!(
                        "{} connections but {} descriptors attached",
                        conns.len(),
                        fds.len()
                    ),
                },
            )
            .into());
        }
        crash::point_if(self.with_incumbent, "s-relaying");
        let count = conns.len() as u64;
        let id = self.id;
        let left = self.remaining().max(Duration::from_millis(1));
        let Some(n) = self.n.as_ref() else {
            // Moving is asked only with a successor: a batch without one
            // is the incumbent's mistake.
            return Err(self.unasked("Connections"));
        };
        let borrowed: Vec<_> = fds.iter().map(std::os::fd::AsFd::as_fd).collect();
        // A successor that stops reading must not hold us past the deadline;
        // and one batch in flight at a time (`sys::fdpass::unread_by_peer`:
        // the kernel refuses descriptors past the user's limit).
        let flight = &mut self.to_successor;
        let sent = n
            .chan
            .stream()
            .set_write_timeout(Some(left))
            .and_then(|()| flight.wait_room(n.chan.stream(), borrowed.len(), Instant::now() + left))
            .map_err(FrameError::from)
            .and_then(|()| {
                n.chan.send_with_fds(
                    &Message::Connections {
                        handoff_id: id,
                        conns,
                    },
                    &borrowed,
                )
            });
        let _ = n.chan.stream().set_write_timeout(None);
        match sent {
            Ok(()) => flight.sent(n.chan.stream(), borrowed.len()),
            Err(e) => {
                let e = ProtocolError::frame(Peer::Successor, "draining", e);
                return Err(self.successor_failure(e));
            }
        }
        self.relayed += count;
        Ok(())
    }
}
