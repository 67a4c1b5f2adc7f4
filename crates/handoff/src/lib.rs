//! # handoff
//!
//! Zero-downtime binary upgrades for Unix network daemons.
//!
//! A **supervisor** owns the listening sockets for the service's whole life
//! and spawns each new build (the **successor**) with them; the old build
//! (the **incumbent**) drains, seals its state and hands over, over a small
//! versioned protocol on Unix sockets. Because the supervisor never closes
//! the listeners, the kernel keeps queueing connections in the accept
//! backlog even while no process accepts: nothing is ever refused.
//!
//! ```text
//! S       socketpair(); spawn N with listeners + control fd
//! S -> O  connect(control socket); O: Hello; S: HelloAck (version chosen) (N starts meanwhile)
//! N -> S  Hello (its warm-up done); S: HelloAck
//! S -> O  PrepareHandoff{id, successor_pid, deadline_ms, drain_grace_ms}
//! O -> S  Heartbeat* Drained{open_conns_remaining, accept_closed}
//! S -> O  SealRequest        O -> S  SealProgress* SealComplete | SealFailed
//! S -> N  Begin{state?}      N -> S  Ready{listening_on, healthz_ok, metadata}
//! S -> O  Commit             (O exits after its connections finish)
//! ```
//!
//! `handoff stop` (protocol version 2; older incumbents get a signal):
//!
//! ```text
//! S -> O  connect; O: Hello; S: HelloAck
//! S -> O  Shutdown{stop_id, drain_grace_ms}
//! O -> S  Heartbeat* ShutdownDrained{open_conns_remaining, accept_closed}
//!         (O retires: finishes its connections and exits by itself)
//! ```
//!
//! Any failure before Ready: S kills and reaps N and sends O
//! `ResumeAfterAbort`. After Ready, N is the incumbent whatever happens.
//!
//! * Supervisor side: [`Supervisor`], [`resume_from_journal`].
//! * Service side: [`Boot`] → [`Begun`] → [`Incumbent`], and the
//!   [`Drainable`] trait the service implements. This is the synchronous,
//!   runtime-free layer; a tokio / hyper / axum / tonic service uses the
//!   `handoff-tokio` crate instead, which drives it (three lines of glue, an
//!   HTTP drain that fails no request, async seal and resume).
//! * Primitives: [`StateLock`], [`Journal`], [`RestartLock`], and the
//!   shared state [`Region`] (seqlock with a robust writer lock).
//! * Service managers: [`sd_notify::Notifier`] (systemd's `NOTIFY_SOCKET`)
//!   and [`listeners::take_from_env`] (socket activation).
#![deny(unsafe_code)]
#![warn(missing_debug_implementations)]

pub mod accept;
mod busy;
pub mod channel;
pub mod child;
pub mod crash;
pub mod error;
pub mod frame;
pub mod incumbent;
pub mod journal;
pub mod listeners;
pub mod lock;
pub mod notify;
pub mod phase;
pub mod private_fs;
pub mod process;
mod procinfo;
pub mod protocol;
pub mod recovery;
pub mod restart_lock;
pub mod sd_notify;
pub mod shm;
pub mod spawn;
pub mod successor;
pub mod supervisor;
#[allow(unsafe_code)]
mod sys;
pub mod timeouts;

pub use child::{Child, Exit};
pub use error::{HandoffError, ProcessError, ProtocolError, SpawnError, StopError};
pub use incumbent::{Incumbent, Retired};
pub use journal::{Journal, JournalRecord};
pub use listeners::Listener;
pub use lock::StateLock;
pub use phase::SupervisorPhase;
pub use private_fs::PrivateError;
pub use process::{bind_control, DrainReport, Drainable, ProcessConfig, ServiceError};
pub use protocol::{HandoffId, IdHex, Message, Role, VersionRange};
pub use recovery::{probe_incumbent, reattach, resume_from_journal, Reattached, Recovery};
pub use restart_lock::{RestartLock, RestartLockError};
pub use shm::{Region, RegionSpec, ShmError, WriteGuard};
pub use spawn::Program;
pub use successor::{Begun, Boot, BootOptions, StartRole};
pub use supervisor::{
    HandoffOptions, PhaseDone, Prepared, Report, StopRequest, Supervisor, SupervisorConfig,
};
pub use timeouts::Timeouts;

/// Peer credentials (for the admin socket of a supervisor binary).
pub use sys::{peer_credentials, PeerCred};
