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
//! S -> O  SealRequest (v ≤ 4) O -> S  SealProgress* SealComplete | SealFailed
//! S -> N  Begin{state?}      N -> S  Ready{listening_on, healthz_ok, metadata}
//! S -> N, then O: Commit      (O exits after its connections finish)
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
//! ## What a service author uses
//!
//! A tokio / hyper / axum / tonic service uses the `handoff-tokio` crate,
//! which drives this one (three lines of glue, an HTTP drain that fails no
//! request, async seal and resume). A synchronous service uses this crate's
//! root directly:
//!
//! * [`Boot`] → [`Begun`] → [`Incumbent`]: the process's three states, each
//!   consumed into the next, and the [`Drainable`] trait it implements so
//!   its incumbent can be drained, sealed and resumed.
//! * [`StateLock`]: the kernel-released lock that fences the state between
//!   two builds; [`shm::Region`]: shared state that survives a writer
//!   killed mid-write.
//! * [`listeners::take_from_env`] (socket activation) and
//!   [`sd_notify::Notifier`] (systemd's `NOTIFY_SOCKET`), for a service
//!   that also runs under a service manager.
//!
//! ```no_run
//! use std::time::Duration;
//!
//! use handoff::{Boot, BootOptions, DrainReport, Drainable, ServiceError};
//!
//! /// Whatever the service's accept loop needs to hear at drain.
//! struct Service;
//!
//! impl Drainable for Service {
//!     fn drain(&mut self, _grace: Duration) -> Result<DrainReport, ServiceError> {
//!         // Stop accepting; let in-flight requests finish within the grace.
//!         Ok(DrainReport { open_conns_remaining: 0, accept_closed: true })
//!     }
//!     fn seal(
//!         &mut self,
//!         _progress: &mut dyn FnMut(u64, u64),
//!     ) -> Result<Option<Vec<u8>>, ServiceError> {
//!         Ok(None) // make the state durable: the successor takes it next
//!     }
//!     fn resume(&mut self) -> Result<(), ServiceError> {
//!         Ok(()) // the handoff aborted: accept again
//!     }
//! }
//!
//! fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     // The listeners the supervisor passed, and the control channel.
//!     let mut boot = Boot::from_env(BootOptions::new("my-service 1.2.0"))?;
//!     let listeners = boot.take_listeners();
//!     // ... warm up, then Hello; Begin: the old build has sealed, the
//!     // state lock is ours.
//!     let begun = boot.begin()?;
//!     // ... open the state, start accepting on `listeners` ...
//!     let incumbent = begun.ready(|| Ok(()))?;
//!     // Serve the protocol until a successor commits or `handoff stop`.
//!     let retired = incumbent.serve(&mut Service)?;
//!     println!("{retired:?}; {} listeners", listeners.len());
//!     Ok(())
//! }
//! ```
//!
//! ## Features
//!
//! * `supervisor`: the supervisor side — `Supervisor`,
//!   the journal, crash recovery, spawning, the notify-mode supervisor —
//!   and the wire protocol's types, for building a supervisor binary (the
//!   `handoff` CLI enables it) and for protocol-level tests. Without it
//!   they are compiled for the service side's use but not public.
//! * `crash-points`: named fault-injection points for the crash matrix,
//!   armed at run time by `HANDOFF_CRASH_AT`; inert otherwise.
//! * `shm-test-hooks`: a fault-injection point in the shared region's
//!   recovery (a recoverer killed mid-recovery), armed by
//!   `HANDOFF_SHM_HOOK`; inert otherwise.
#![deny(unsafe_code)]
#![warn(missing_debug_implementations)]
// Every public item is documented, with or without the `supervisor`
// feature (which makes the supervisor side and the wire types public).
#![warn(missing_docs)]
// A service author's build (no `supervisor` feature) sees only the service
// side: supervisor code the service side does not call is compiled but
// unused there.
#![cfg_attr(not(feature = "supervisor"), allow(dead_code, unused_imports))]

/// Declares modules public with the `supervisor` feature and private
/// without it: the supervisor side and the wire protocol are the
/// supervisor binary's business, not a service author's.
macro_rules! supervisor_side {
    ($($(#[$meta:meta])* $name:ident;)*) => {$(
        #[cfg(feature = "supervisor")]
        $(#[$meta])*
        pub mod $name;
        #[cfg(not(feature = "supervisor"))]
        $(#[$meta])*
        mod $name;
    )*};
}

mod abort;
pub mod accept;
mod busy;
mod catch_up;
mod clock;
mod incumbent;
pub mod listeners;
mod lock;
mod moving;
pub mod private_fs;
mod process;
mod protocol_error;
pub mod sd_notify;
pub mod shm;
mod successor;
#[allow(unsafe_code)]
mod sys;
mod timeouts;
mod version;

/// Hooks for other crates' tests (handoff-tokio's): not part of the API.
#[doc(hidden)]
pub mod test_hooks {
    use crate::Mover;

    /// A mover for a drain that moves connections, with no sender behind
    /// it: offers stay queued, for a test to count.
    pub fn queueing_mover() -> Mover {
        Mover::moving_at_most(crate::sys::fdpass::MAX_FDS)
    }

    /// How many offers `mover` holds, not yet sent.
    pub fn queued(mover: &Mover) -> usize {
        mover.queued()
    }
}

supervisor_side! {
    channel;
    child;
    crash;
    error;
    frame;
    journal;
    notify;
    phase;
    procinfo;
    protocol;
    recovery;
    restart_lock;
    spawn;
    supervisor;
}

pub use abort::AbortSignal;
pub use catch_up::{CatchUp, CatchUpPolicy, CatchUpReport, CatchUpRound};
pub use error::ProcessError;
pub use frame::FrameError;
pub use incumbent::{Incumbent, Retired};
pub use listeners::Listener;
pub use lock::{LockError, StateLock};
pub use moving::{Lent, MoveRefused, MovedConnection, Mover, MAX_CONNECTION_BYTES};
pub use private_fs::PrivateError;
pub use process::{bind_control, DrainReport, Drainable, ProcessConfig, ServiceError};
pub use protocol::Peer;
pub use protocol::{HandoffId, NoCommonVersion, Role, VersionRange};
pub use protocol_error::ProtocolError;
pub use successor::{Begun, Boot, BootOptions, StartRole};
pub use timeouts::Timeouts;

#[cfg(feature = "supervisor")]
pub use {
    child::{Child, Exit},
    error::{HandoffError, SpawnError, StopError},
    journal::{Journal, JournalRecord},
    phase::SupervisorPhase,
    protocol::{IdHex, Message},
    recovery::{probe_incumbent, reattach, resume_from_journal, Reattached, Recovery},
    restart_lock::{RestartLock, RestartLockError},
    spawn::Program,
    successor::take_control_from_env,
    supervisor::{
        ConnectionsMoved, HandoffOptions, PhaseDone, Prepared, Quiesced, Report, StopRequest,
        Supervisor, SupervisorConfig,
    },
    sys::{peer_credentials, PeerCred},
};
