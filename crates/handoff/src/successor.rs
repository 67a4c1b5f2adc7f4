//! Process start-up: reading what the supervisor passed, and — for a
//! successor — the Hello → Begin → Ready → Commit side of the protocol.
//!
//! The same code path serves every build: a process starts as a successor
//! (spawned by the supervisor with `HANDOFF_ROLE=successor`) or standalone
//! (`HANDOFF_ROLE` unset or `initial`), and either way ends up an
//! [`Incumbent`].
//!
//! ```no_run
//! use handoff::{Boot, BootOptions};
//! # struct Svc;
//! # impl handoff::Drainable for Svc {
//! #   fn drain(&mut self, _: std::time::Duration) -> Result<handoff::DrainReport, handoff::ServiceError> { todo!() }
//! #   fn seal(&mut self, _: &mut dyn FnMut(u64, u64)) -> Result<Option<Vec<u8>>, handoff::ServiceError> { todo!() }
//! #   fn resume(&mut self) -> Result<(), handoff::ServiceError> { todo!() }
//! # }
//! let mut boot = Boot::from_env(BootOptions::new("my-service 1.2.3"))?;
//! let listeners = boot.take_listeners();
//! // ... warm up: load config, build caches. Not serving yet.
//! let begun = boot.begin()?;            // Hello; waits for Begin; takes the state lock
//! // ... open state (we hold the lock now).
//! let incumbent = begun.ready(|| Ok(()))?; // health check; Ready; waits for Commit
//! // ... committed: start accepting on `listeners` now, not earlier — a
//! // successor aborted before Commit is killed, resetting what it accepted.
//! let retired = incumbent.serve(&mut Svc)?; // answers future handoffs
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use crate::catch_up::{self, CatchUp, CatchUpPolicy, CatchUpReport};

/// How long a successor that caught up waits for the supervisor before it
/// runs another catch-up round ([`Boot::begin_keeping_up`]): rare enough
/// to cost nothing in a handoff that goes straight on (Begin arrives
/// sooner), often enough that a held successor's tail stays small.
pub(crate) const KEEP_UP_EVERY: Duration = Duration::from_millis(100);
/// How long a successor reading two sockets (control and moved
/// connections) waits in one poll before it polls again; nothing runs
/// between polls, so it only bounds one system call.
const IDLE_POLL: Duration = Duration::from_secs(3600);
use crate::channel::Channel;
use crate::crash;
use crate::error::{ProcessError, ProtocolError};
use crate::incumbent::Incumbent;
use crate::listeners::{self, Listener};
use crate::lock::StateLock;
use crate::moving::inbound::{adopt, Inbound};
use crate::moving::MovedConnection;
use crate::phase::{Peer, SuccessorPhase};
use crate::process::{bind_control, Heartbeat, ProcessConfig};
use crate::protocol::{negotiate, HandoffId, Hello, Message, Role, VersionRange};
use crate::timeouts::Timeouts;

/// How this process was started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartRole {
    /// No supervisor handshake: take the lock, bind the control socket, serve.
    Initial,
    /// Spawned by a supervisor to take over from an incumbent (or as the
    /// first process of a supervised service).
    Successor,
}

/// Options for [`Boot::from_env`]. Paths given here are used when the
/// supervisor did not pass `HANDOFF_STATE_DIR` / `HANDOFF_CONTROL_SOCK`.
#[derive(Debug, Clone)]
pub struct BootOptions {
    /// See [`ProcessConfig::build_id`].
    pub build_id: String,
    /// The state dir when `HANDOFF_STATE_DIR` is not set; with neither,
    /// [`Boot::from_env`] fails.
    pub state_dir: Option<PathBuf>,
    /// The control socket path when `HANDOFF_CONTROL_SOCK` is not set; with
    /// neither, [`Boot::from_env`] fails.
    pub control_path: Option<PathBuf>,
    /// See [`ProcessConfig::versions`].
    pub versions: VersionRange,
    /// See [`ProcessConfig::timeouts`].
    pub timeouts: Timeouts,
    /// See [`ProcessConfig::lock_wait`].
    pub lock_wait: Duration,
    /// See [`ProcessConfig::recovery_wait`].
    pub recovery_wait: Duration,
}

impl BootOptions {
    /// Options for build `build_id`, with no default paths, the versions
    /// this build speaks, timeouts from [`Timeouts::from_env`], a 5 s lock
    /// wait (or `HANDOFF_LOCK_WAIT_MS`) and a 10 s recovery wait (or
    /// `HANDOFF_RECOVERY_WAIT_MS`).
    pub fn new(build_id: impl Into<String>) -> BootOptions {
        BootOptions {
            build_id: build_id.into(),
            state_dir: None,
            control_path: None,
            versions: VersionRange::OURS,
            timeouts: Timeouts::from_env(),
            // Test knobs like HANDOFF_HEARTBEAT_MS: tests shorten how long
            // a successor waits for the sealed incumbent's lock, and an
            // incumbent whose handoff aborted after its seal waits to take
            // it back; crash tests, how long a sealed incumbent that lost
            // its supervisor keeps trying.
            lock_wait: env_ms("HANDOFF_LOCK_WAIT_MS").unwrap_or(Duration::from_secs(5)),
            recovery_wait: env_ms("HANDOFF_RECOVERY_WAIT_MS").unwrap_or(Duration::from_secs(10)),
        }
    }
}

/// A duration in milliseconds from the environment variable `name`.
fn env_ms(name: &str) -> Option<Duration> {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_millis)
}

/// A process that has read its environment but is not serving yet.
#[derive(Debug)]
pub struct Boot {
    cfg: ProcessConfig,
    role: StartRole,
    listeners: Vec<Listener>,
    /// Our own copies of the passed listeners, kept for the life of the
    /// process so a restarted supervisor can fetch them (FetchListeners).
    kept: Vec<Listener>,
    /// A successor's control channel before Hello.
    pending: Option<UnixStream>,
    chan: Option<Channel>,
    /// What [`Boot::catch_up`] did, for Ready's metadata.
    caught_up: Option<CatchUpReport>,
}

fn env_path(var: &str, fallback: Option<PathBuf>) -> Result<PathBuf, ProcessError> {
    std::env::var_os(var)
        .map(PathBuf::from)
        .or(fallback)
        .ok_or_else(|| ProcessError::Env(format!("{var} is not set and no default was configured")))
}

impl Boot {
    /// Reads `HANDOFF_ROLE`, the listeners (`LISTEN_FDS`…), and for a
    /// successor its control channel (`HANDOFF_SOCK_FD`). Nothing is said to
    /// the supervisor yet: warm up, then call [`begin`](Self::begin).
    pub fn from_env(opts: BootOptions) -> Result<Boot, ProcessError> {
        let state_dir = env_path("HANDOFF_STATE_DIR", opts.state_dir)?;
        let control_path = env_path("HANDOFF_CONTROL_SOCK", opts.control_path)?;
        let mut cfg = ProcessConfig::new(opts.build_id, state_dir, control_path);
        cfg.versions = opts.versions;
        cfg.timeouts = opts.timeouts;
        cfg.lock_wait = opts.lock_wait;
        cfg.recovery_wait = opts.recovery_wait;
        let role = match std::env::var("HANDOFF_ROLE").ok().as_deref() {
            None | Some("") | Some("initial") => StartRole::Initial,
            Some("successor") => StartRole::Successor,
            Some(other) => {
                return Err(ProcessError::Env(format!(
                    "HANDOFF_ROLE={other:?} is not one of initial, successor"
                )))
            }
        };
        let listeners = listeners::take_from_env()?;
        let kept = listeners
            .iter()
            .map(|l| {
                Ok(Listener {
                    name: l.name.clone(),
                    fd: l.fd.try_clone().map_err(|e| {
                        ProcessError::Env(format!("duplicating listener {}: {e}", l.name))
                    })?,
                })
            })
            .collect::<Result<Vec<_>, ProcessError>>()?;
        let mut boot = Boot {
            cfg,
            role,
            listeners,
            kept,
            pending: None,
            chan: None,
            caught_up: None,
        };
        if role == StartRole::Successor {
            // Taken now (and made close-on-exec); Hello waits for begin().
            boot.pending = Some(take_control_from_env()?);
        }
        Ok(boot)
    }

    fn greet(&mut self, stream: UnixStream) -> Result<(), ProcessError> {
        let mut chan = Channel::new(stream);
        let phase = SuccessorPhase::Greeting;
        let hello = Message::Hello(Hello {
            role: Role::Successor,
            pid: std::process::id(),
            proto_min: self.cfg.versions.min,
            proto_max: self.cfg.versions.max,
            build_id: self.cfg.build_id.clone(),
        });
        chan.send_with_credentials(&hello)
            .map_err(|e| ProtocolError::frame(Peer::Supervisor, phase.name(), e))?;
        crash::point("n-after-hello");
        let msg = recv(&mut chan, phase, None, Some(self.cfg.timeouts.hello))?;
        let Message::HelloAck { version } = msg else {
            return Err(ProtocolError::Unexpected {
                peer: Peer::Supervisor,
                phase: phase.name(),
                message: msg.name(),
            }
            .into());
        };
        let v = negotiate(
            self.cfg.versions,
            VersionRange {
                min: version,
                max: version,
            },
            Role::Supervisor,
        )
        .map_err(|e| ProtocolError::NoCommonVersion(e, phase.name()))?;
        chan.set_version(v);
        self.chan = Some(chan);
        Ok(())
    }

    /// How this process was started, from `HANDOFF_ROLE`.
    pub fn role(&self) -> StartRole {
        self.role
    }

    /// The configuration read from the environment and the options.
    pub fn config(&self) -> &ProcessConfig {
        &self.cfg
    }

    /// The listening sockets passed by the supervisor (empty when started
    /// standalone: bind your own then).
    pub fn take_listeners(&mut self) -> Vec<Listener> {
        std::mem::take(&mut self.listeners)
    }

    /// Brings the service's state up to date with what the incumbent wrote
    /// during warm-up, round after round, until a round finds at most what
    /// `policy` allows (docs/design.md §2.7); then call
    /// [`begin`](Self::begin) at once. What is left after the seal is then
    /// one short round's writes, read after Begin inside the accept gap,
    /// instead of everything written while this process warmed up.
    ///
    /// The rounds run without the state lock, while the incumbent writes:
    /// each must read only what is complete and leave the rest for the
    /// next. The report goes to the supervisor in Ready (the upgrade
    /// report shows it). A round's error is returned: exit without saying
    /// Hello, and the incumbent serves on.
    pub fn catch_up(
        &mut self,
        src: &mut dyn CatchUp,
        policy: &CatchUpPolicy,
    ) -> Result<CatchUpReport, ProcessError> {
        let r = CatchUpReport::run(src, policy).map_err(|e| {
            ProcessError::Service(format!("catching up with the incumbent's writes: {e}"))
        })?;
        tracing::info!(target: "handoff::successor", rounds = r.rounds, records = r.records, bytes = r.bytes, last_records = r.last.records, converged = r.converged, took_us = r.took.as_micros() as u64, "caught up");
        self.caught_up = Some(r);
        Ok(r)
    }

    /// Says Hello (a successor), waits for Begin and takes the state lock.
    ///
    /// Do all warm-up before calling this. Hello tells the supervisor this
    /// process is warm, and the supervisor starts draining the incumbent
    /// only then: everything after that — drain, seal, Begin to Ready — is
    /// the accept gap users wait through. The supervisor's Hello budget
    /// (5 s by default, [`Timeouts::hello`]) therefore bounds warm-up.
    ///
    /// A successor whose supervisor hangs up or aborts gets an error and
    /// should exit: the incumbent keeps serving.
    pub fn begin(self) -> Result<Begun, ProcessError> {
        self.begin_inner(None)
    }

    /// [`begin`](Self::begin) for a service that caught up
    /// ([`catch_up`](Self::catch_up)): while it waits for Begin — held as a
    /// successor prepared ahead (`handoff upgrade --prepare`), or while a
    /// slow drain runs — it runs a round of `src` whenever 100 ms pass with
    /// nothing from the supervisor, so that
    /// what it reads after Begin stays about one round's writes however
    /// long it was held (docs/design.md §2.7). The rounds are added to the
    /// catch-up report; a round's error ends this start (exit: the
    /// incumbent serves on, a held successor is replaced at the upgrade).
    pub fn begin_keeping_up(self, src: &mut dyn CatchUp) -> Result<Begun, ProcessError> {
        self.begin_inner(Some(src))
    }

    fn begin_inner(mut self, mut keep_up: Option<&mut dyn CatchUp>) -> Result<Begun, ProcessError> {
        if let Some(stream) = self.pending.take() {
            self.greet(stream)?;
        }
        let mut moved = vec![];
        let caught_up = &mut self.caught_up;
        // Version 4: the socket the incumbent moves its connections on,
        // read beside the control channel (docs/connection-transfer.md).
        let mut inbound: Option<Inbound> = None;
        let frame_budget = self.cfg.timeouts.hello;
        let (handoff_id, state) = match self.chan.as_mut() {
            None => (0, None),
            Some(chan) => loop {
                // Wait for the control channel, the move socket (read a
                // batch as it comes: the incumbent's window waits for us)
                // or, keeping up, the next round's time.
                let wait = if keep_up.is_some() {
                    KEEP_UP_EVERY
                } else {
                    IDLE_POLL
                };
                let readable = match &inbound {
                    Some(i) => chan.first_readable(i.channel(), wait),
                    None if keep_up.is_some() => {
                        chan.readable_within(wait).map(|r| r.then_some(false))
                    }
                    None => Ok(Some(false)),
                };
                match readable {
                    Ok(Some(true)) => {
                        if let Some(i) = inbound.as_mut() {
                            if !i.read_one(&mut moved)? {
                                inbound = None; // all there (or the incumbent is gone)
                            }
                        }
                        continue;
                    }
                    Ok(None) => {
                        if let Some(src) = keep_up.as_deref_mut() {
                            let r = src.round().map_err(|e| {
                                ProcessError::Service(format!(
                                    "keeping up with the incumbent's writes while waiting for Begin: {e}"
                                ))
                            })?;
                            tracing::debug!(target: "handoff::successor", records = r.records, bytes = r.bytes, "kept up while waiting for Begin");
                            let report = caught_up.get_or_insert_with(CatchUpReport::default);
                            report.add_round(r);
                        }
                        continue;
                    }
                    // The control channel (or a failed poll, which the read
                    // below reports).
                    Ok(Some(false)) | Err(_) => {}
                }
                match recv_moving(chan) {
                    Ok((Message::Begin { handoff_id, state }, _)) => {
                        // Whatever is still on its way was sent before
                        // Drained, so before Begin: take it in now.
                        if let Some(i) = inbound.take() {
                            i.finish(&mut moved)?;
                        }
                        break (handoff_id, state);
                    }
                    Ok((Message::Connections { conns, .. }, fds)) => {
                        // Held, unread, until we are the incumbent.
                        adopt(Peer::Supervisor, conns, fds, &mut moved)?;
                    }
                    Ok((Message::MoveChannel { handoff_id }, fds)) => {
                        inbound = Some(Inbound::open(handoff_id, fds, frame_budget)?);
                    }
                    Ok((Message::Abort { reason, .. }, _)) => {
                        return Err(ProcessError::Aborted { reason })
                    }
                    Ok((m, _)) => {
                        return Err(ProtocolError::Unexpected {
                            peer: Peer::Supervisor,
                            phase: SuccessorPhase::AwaitBegin.name(),
                            message: m.name(),
                        }
                        .into())
                    }
                    Err(e) if e.is_disconnect() => return Err(ProcessError::SupervisorGone),
                    Err(e) => return Err(e.into()),
                }
            },
        };
        if !moved.is_empty() {
            tracing::info!(target: "handoff::successor", handoff_id = %crate::protocol::IdHex(handoff_id), count = moved.len(), "connections moved to us; served once we are the incumbent");
        }
        crash::point("n-after-begin");
        let lock = StateLock::acquire_within(&self.cfg.state_dir, self.cfg.lock_wait)?;
        crash::point("n-after-lock");
        tracing::info!(target: "handoff::successor", handoff_id = %crate::protocol::IdHex(handoff_id), "began: state lock taken");
        Ok(Begun {
            cfg: self.cfg,
            lock,
            chan: self.chan,
            handoff_id,
            state,
            kept: self.kept,
            moved,
            caught_up: self.caught_up,
        })
    }
}

/// Holding the state lock, about to become the incumbent.
#[derive(Debug)]
pub struct Begun {
    cfg: ProcessConfig,
    lock: StateLock,
    chan: Option<Channel>,
    handoff_id: HandoffId,
    state: Option<Vec<u8>>,
    kept: Vec<Listener>,
    /// Connections the old incumbent moved to us: not to be read before
    /// Ready (until then the handoff may abort and the old one serve them).
    moved: Vec<MovedConnection>,
    /// What [`Boot::catch_up`] did, for Ready's metadata.
    caught_up: Option<CatchUpReport>,
}

impl Begun {
    /// Opaque state the previous incumbent handed over at seal, if any.
    pub fn state(&self) -> Option<&[u8]> {
        self.state.as_deref()
    }

    /// The handoff this process is taking over in, from Begin; 0 for a
    /// process started standalone ([`StartRole::Initial`]).
    pub fn handoff_id(&self) -> HandoffId {
        self.handoff_id
    }

    /// Takes over the control socket path, runs `health` (heartbeating
    /// meanwhile), says Ready, and waits for Commit.
    ///
    /// A service with state starts accepting connections only after this
    /// returns: until Commit the supervisor may still abort, and the old
    /// incumbent then resumes and owns the state again. Connections arriving
    /// in the meantime wait in the listen backlog, which the supervisor
    /// sizes generously.
    ///
    /// A *stateless* service (its requests need nothing the incumbent seals)
    /// may instead accept as soon as it has its listeners, before
    /// [`Boot::begin`]: the incumbent is still accepting from the same
    /// kernel queue, so new connections never wait for the handoff's
    /// exchanges, as with ecdysis or tableflip. Such a service must treat an
    /// error from `begin` or `ready` (an abort, or the supervisor hanging
    /// up) as "stop accepting, finish the connections you have, exit": an
    /// answering successor gets [`crate::Timeouts::abort_grace`] to do so
    /// before it is killed (`crates/handoff-bench/src/bin/bench-svc-handoff.rs`
    /// is such a service).
    ///
    /// A failed health check is reported to the supervisor (which aborts
    /// and kills this process) and returned as an error.
    pub fn ready<H>(self, health: H) -> Result<Incumbent, ProcessError>
    where
        H: FnOnce() -> Result<(), String>,
    {
        let listener =
            bind_control(&self.cfg.control_path).map_err(|source| ProcessError::ControlSocket {
                path: self.cfg.control_path.clone(),
                source,
            })?;
        let Some(mut chan) = self.chan else {
            health().map_err(|e| ProcessError::Service(format!("health check failed: {e}")))?;
            return Ok(Incumbent::new(
                self.cfg, self.lock, listener, self.kept, self.moved,
            ));
        };
        let id = self.handoff_id;
        let hb = Heartbeat::start(chan.sender(), id, self.cfg.timeouts.heartbeat);
        let healthy = health();
        hb.stop();
        let mut metadata = vec![("build_id".to_string(), self.cfg.build_id.clone())];
        if let Err(e) = &healthy {
            metadata.push(("health".into(), e.clone()));
        }
        if let Some(r) = self.caught_up {
            metadata.push((catch_up::METADATA_KEY.into(), r.to_metadata()));
        }
        let ready = Message::Ready {
            handoff_id: id,
            listening_on: self.kept.iter().map(|l| l.name.clone()).collect(),
            healthz_ok: healthy.is_ok(),
            metadata,
        };
        let phase = SuccessorPhase::AwaitCommit;
        crash::point("n-before-ready");
        if let Err(e) = chan.send(&ready) {
            // Ready never left: the supervisor is gone and we are not the
            // incumbent. Exiting releases the lock for the old one.
            let e = ProtocolError::frame(Peer::Supervisor, phase.name(), e);
            return Err(if e.is_disconnect() {
                ProcessError::SupervisorGone
            } else {
                e.into()
            });
        }
        crash::point("n-after-ready");
        if let Err(e) = healthy {
            return Err(ProcessError::Service(format!("health check failed: {e}")));
        }
        // Once the supervisor has *read* Ready we are the incumbent whatever
        // happens: Commit, or the supervisor vanishing, both end here.
        loop {
            match recv(&mut chan, phase, Some(id), None) {
                Ok(_) => break, // Commit
                Err(ProtocolError::Unexpected { message, .. }) => {
                    tracing::warn!(target: "handoff::successor", handoff_id = %crate::protocol::IdHex(id), message, "ignoring message after Ready");
                    continue;
                }
                Err(e) if ready_was_unread(&e) => {
                    // The supervisor died with our Ready still in its
                    // receive queue: it never learned we were ready, and
                    // the old incumbent is waiting to take the lock back.
                    // Step aside (exiting releases the lock).
                    tracing::warn!(target: "handoff::successor", handoff_id = %crate::protocol::IdHex(id), "supervisor died before reading Ready; giving way to the incumbent");
                    return Err(ProcessError::SupervisorGone);
                }
                Err(e) => {
                    tracing::warn!(target: "handoff::successor", handoff_id = %crate::protocol::IdHex(id), error = %e, "supervisor gone after Ready; serving as the incumbent");
                    break;
                }
            }
        }
        tracing::info!(target: "handoff::successor", handoff_id = %crate::protocol::IdHex(id), "committed: now the incumbent");
        Ok(Incumbent::new(
            self.cfg, self.lock, listener, self.kept, self.moved,
        ))
    }
}

/// Whether the supervisor closed its end without reading what we sent last.
///
/// Linux reports ECONNRESET to the peer of a Unix stream socket that is
/// closed with data still in its receive queue, and plain EOF otherwise. So
/// after our Ready, a reset means the supervisor died before reading it,
/// EOF that it read it (and then died or hung up). Elsewhere both look like
/// EOF, and the successor keeps the role it announced: still exactly one
/// incumbent, decided by the state lock.
fn ready_was_unread(e: &ProtocolError) -> bool {
    matches!(
        e,
        ProtocolError::Frame {
            source: crate::frame::FrameError::Io(io),
            ..
        } if io.kind() == std::io::ErrorKind::ConnectionReset
    )
}

/// Takes the control channel the supervisor passed in `HANDOFF_SOCK_FD`.
/// [`Boot::from_env`] does this; it is public for test peers that speak the
/// protocol by hand.
#[doc(hidden)]
pub fn take_control_from_env() -> Result<UnixStream, ProcessError> {
    static TAKEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let raw = std::env::var("HANDOFF_SOCK_FD")
        .ok()
        .and_then(|v| v.parse::<i32>().ok())
        .ok_or_else(|| {
            ProcessError::Env(
                "HANDOFF_ROLE=successor but HANDOFF_SOCK_FD is missing or not a number".into(),
            )
        })?;
    if TAKEN.swap(true, std::sync::atomic::Ordering::SeqCst) {
        return Err(ProcessError::Env(
            "HANDOFF_SOCK_FD was already taken".into(),
        ));
    }
    Ok(UnixStream::from(listeners::take_fd(raw)?))
}

/// [`recv`] in [`SuccessorPhase::AwaitBegin`], with the descriptors a
/// `Connections` batch carries; waits as long as it takes (the supervisor's
/// death is an EOF).
fn recv_moving(chan: &mut Channel) -> Result<(Message, Vec<std::os::fd::OwnedFd>), ProtocolError> {
    let phase = SuccessorPhase::AwaitBegin;
    let (msg, fds) = chan
        .recv_with_fds_blocking()
        .map_err(|e| ProtocolError::frame(Peer::Supervisor, phase.name(), e))?;
    let legal = phase.allows(&msg);
    let msg = crate::phase::admit(Peer::Supervisor, phase.name(), legal, None, msg)?;
    Ok((msg, fds))
}

fn recv(
    chan: &mut Channel,
    phase: SuccessorPhase,
    id: Option<HandoffId>,
    timeout: Option<Duration>,
) -> Result<Message, ProtocolError> {
    let msg = chan
        .recv(timeout)
        .map_err(|e| ProtocolError::frame(Peer::Supervisor, phase.name(), e))?;
    let legal = phase.allows(&msg);
    crate::phase::admit(Peer::Supervisor, phase.name(), legal, id, msg)
}
