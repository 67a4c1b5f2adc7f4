//! The protocol thread: drives the blocking `handoff` protocol (Boot →
//! Begun → Incumbent) for an async service and turns each step into a
//! [`Phase`] the accept loops and connections follow.
//!
//! The core library's protocol side is synchronous on purpose (it must work
//! from any runtime, or none). Running it on a thread of its own keeps every
//! blocking read off the runtime's workers; the service's async hooks run on
//! the runtime through [`Handle::block_on`], which is legal here because this
//! thread is not a runtime thread.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use handoff::{AbortSignal, Boot, DrainReport, Drainable, ServiceError};
use tokio::runtime::Handle;

use crate::error::BoxError;
use crate::phase::{Moved, Phase, Retirement, Shared};

pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;
pub(crate) type Hook<T> = Box<dyn FnMut() -> BoxFuture<Result<T, BoxError>> + Send>;
pub(crate) type BeginHook = Box<dyn FnOnce(Begin) -> BoxFuture<Result<(), BoxError>> + Send>;
pub(crate) type CatchUpHook = Box<dyn FnMut() -> Result<handoff::CatchUpRound, BoxError> + Send>;

/// What a new build learns when its handoff begins: it holds the state
/// lock now.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Begin {
    /// The state directory (`handoff run --state-dir`), whose lock this
    /// process now holds.
    pub state_dir: std::path::PathBuf,
    /// What the old build's seal returned, if anything (`None` on a first
    /// start).
    pub sealed: Option<Vec<u8>>,
}

/// The service's own async code, each optional.
#[derive(Default)]
pub(crate) struct Hooks {
    pub(crate) catch_up: Option<(handoff::CatchUpPolicy, CatchUpHook)>,
    pub(crate) on_begin: Option<BeginHook>,
    pub(crate) on_drain: Option<Hook<()>>,
    pub(crate) on_serving: Option<Box<dyn FnOnce() + Send>>,
    pub(crate) health: Option<Hook<()>>,
    pub(crate) seal: Option<Hook<Option<Vec<u8>>>>,
    pub(crate) resume: Option<Hook<()>>,
}

impl std::fmt::Debug for Hooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hooks")
            .field("catch_up", &self.catch_up.as_ref().map(|(p, _)| p))
            .field("on_begin", &self.on_begin.is_some())
            .field("on_drain", &self.on_drain.is_some())
            .field("on_serving", &self.on_serving.is_some())
            .field("health", &self.health.is_some())
            .field("seal", &self.seal.is_some())
            .field("resume", &self.resume.is_some())
            .finish()
    }
}

/// How the protocol ended this process's turn, for `serve` to return.
pub(crate) type Outcome = Result<Retirement, (&'static str, String)>;

/// Moves the phase to `Retired(Failed)` if the protocol thread unwinds (a
/// hook panicked), so the accept loops and `serve` end instead of waiting
/// for a phase that will never come.
struct PanicGuard(Arc<Shared>);

impl Drop for PanicGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.set_phase(Phase::Retired(Retirement::Failed));
        }
    }
}

/// Runs the whole protocol for this process; returns when it retires.
pub(crate) fn run(mut boot: Boot, shared: Arc<Shared>, mut hooks: Hooks, rt: Handle) -> Outcome {
    let _guard = PanicGuard(shared.clone());
    let fail = |phase: &'static str, e: &dyn std::fmt::Display| {
        let message = e.to_string();
        crate::say::warn(format_args!("handoff failed while {phase}: {message}"));
        (phase, message)
    };
    let state_dir = boot.config().state_dir.clone();
    let begun = match hooks.catch_up.take() {
        Some((policy, mut round)) => {
            let mut src = || round();
            if let Err(e) = boot.catch_up(&mut src, &policy) {
                // Not up to date, so not fit to take over: no Hello. The
                // supervisor sees this process end and the old one serves on.
                shared.set_phase(Phase::Retired(Retirement::Aborted));
                return Err(fail("catching up", &e));
            }
            boot.begin_keeping_up(&mut src)
        }
        None => boot.begin(),
    };
    let begun = match begun {
        Ok(b) => b,
        Err(e) => {
            // Aborted or the supervisor hung up before Begin: the incumbent
            // serves on; finish what we accepted early and go.
            shared.set_phase(Phase::Retired(Retirement::Aborted));
            return Err(fail("waiting for Begin", &e));
        }
    };
    // We hold the state lock: the service may open its state now. A failure
    // fails the health check, so the supervisor aborts cleanly.
    let begin = Begin {
        state_dir,
        sealed: begun.state().map(<[u8]>::to_vec),
    };
    let opened = match hooks.on_begin.take() {
        Some(f) => rt.block_on(f(begin)).map_err(|e| format!("on_begin: {e}")),
        None => Ok(()),
    };
    let health = hooks.health.as_mut();
    let incumbent = begun.ready(|| {
        opened?;
        match health {
            Some(h) => rt.block_on(h()).map_err(|e| e.to_string()),
            None => Ok(()),
        }
    });
    let mut incumbent = match incumbent {
        Ok(i) => i,
        Err(e) => {
            shared.set_phase(Phase::Retired(Retirement::Aborted));
            return Err(fail("becoming ready", &e));
        }
    };
    // Committed (or started alone): this process is the incumbent now, and
    // the connections the old build moved to us are ours to serve: each
    // `serve` takes those of its listener as it starts serving.
    let moved = incumbent.take_moved();
    if !moved.is_empty() {
        shared.adopt(moved);
        let shared = shared.clone();
        rt.spawn(async move {
            tokio::time::sleep(UNCLAIMED_WAIT).await;
            let left = shared.take_all_adopted();
            if !left.is_empty() {
                // Closing is all that is left: the client sees a FIN (its
                // last holder closes), never a connection nobody reads.
                crate::say::warn(format_args!(
                    "{} connections moved from the previous build came from a listener no `serve` here serves; closed them",
                    left.len()
                ));
            }
        });
    }
    if let Some(f) = hooks.on_serving.take() {
        f();
    }
    shared.set_phase(Phase::Serving);
    let mut bridge = Bridge {
        shared: shared.clone(),
        hooks,
        rt,
    };
    match incumbent.serve(&mut bridge) {
        Ok(handoff::Retired::Committed { .. }) => {
            shared.set_phase(Phase::Retired(Retirement::Committed));
            Ok(Retirement::Committed)
        }
        Ok(handoff::Retired::SuccessorWon { .. }) => {
            shared.set_phase(Phase::Retired(Retirement::SuccessorWon));
            Ok(Retirement::SuccessorWon)
        }
        // `handoff stop` through the control protocol: drained like for a
        // handoff, and no successor. Same end as SIGTERM.
        Ok(handoff::Retired::Stopped { .. }) => {
            crate::say::warn(format_args!(
                "stopped through the control protocol (handoff stop): finishing the requests in flight, then exiting"
            ));
            shared.set_phase(Phase::Retired(Retirement::Stopped));
            Ok(Retirement::Stopped)
        }
        Err(e) => {
            shared.set_phase(Phase::Retired(Retirement::Failed));
            Err(fail("serving as the incumbent", &e))
        }
    }
}

/// The [`Drainable`] the core library calls on the incumbent's control
/// thread.
struct Bridge {
    shared: Arc<Shared>,
    hooks: Hooks,
    rt: Handle,
}

/// How long the drain waits for accept loops to leave `accept`: they leave
/// on the next wake-up of the runtime, so this only bounds a stuck one.
const ACCEPT_CLOSE_WAIT: Duration = Duration::from_secs(1);

/// How long a seal waits for cut connections to be dropped (they are
/// dropped on the runtime's next turn).
const CUT_WAIT: Duration = Duration::from_secs(1);

/// How long a service with no state waits, while its drain moves
/// connections, for those in the middle of a request to finish and move
/// too. Until the drain returns, the connections already moved wait for
/// the next build (it reads them only once it is ready); past this, a
/// connection still busy closes after its response instead.
const MOVE_WAIT: Duration = Duration::from_secs(1);

/// How long moved connections wait for the `serve` of their listener
/// before they are closed.
const UNCLAIMED_WAIT: Duration = Duration::from_secs(5);

impl Bridge {
    fn drain_inner(
        &mut self,
        grace: Duration,
        abort: &AbortSignal,
        moving: bool,
    ) -> Result<DrainReport, ServiceError> {
        let shared = self.shared.clone();
        abort.on_abort(move || shared.wake_waiters());
        if let Some(f) = self.hooks.on_drain.as_mut() {
            // An error resumes at once: nothing was wound down yet.
            self.rt.block_on(f())?;
        }
        self.shared.set_drain_grace(grace);
        self.shared.set_phase(Phase::Draining);
        let accept_closed = self
            .shared
            .wait_blocking(grace.min(ACCEPT_CLOSE_WAIT), |accepting, _| {
                accepting == 0 || abort.is_aborted()
            });
        if !self.shared.stateless {
            // Requests may write state: every connection must be closed
            // or moved (each at a request boundary) before we seal.
            self.shared
                .wait_blocking(grace, |_, conns| conns == 0 || abort.is_aborted());
        } else if moving {
            // Every connection moves once between requests: wait for them
            // (briefly: those already moved wait for the next build too).
            self.shared.wait_blocking(grace.min(MOVE_WAIT), |_, conns| {
                conns == 0 || abort.is_aborted()
            });
        }
        // A stateless process that moves nothing reports at once: the
        // successor serves already, and our connections finish meanwhile.
        Ok(DrainReport {
            open_conns_remaining: self.shared.open_connections() as u64,
            accept_closed,
        })
    }
}

impl Drainable for Bridge {
    fn drain(&mut self, grace: Duration) -> Result<DrainReport, ServiceError> {
        self.drain_or_abort(grace, &AbortSignal::new())
    }

    fn drain_or_abort(
        &mut self,
        grace: Duration,
        abort: &AbortSignal,
    ) -> Result<DrainReport, ServiceError> {
        self.drain_moving(grace, abort, &handoff::Mover::disabled())
    }

    /// The drain's waits end early when the handoff is aborted: the core
    /// then calls `resume`, and accepting starts again at once instead of
    /// after the rest of the grace. While the handoff moves connections,
    /// each HTTP/1.1 connection is offered to the next build as soon as it
    /// is between requests (`http/mod.rs`), and the drain returns once all
    /// have moved or closed.
    fn drain_moving(
        &mut self,
        grace: Duration,
        abort: &AbortSignal,
        mover: &handoff::Mover,
    ) -> Result<DrainReport, ServiceError> {
        self.shared.start_moving(mover.clone());
        let r = self.drain_inner(grace, abort, mover.is_moving());
        self.shared.stop_moving();
        r
    }

    /// One hook, so no SealProgress: the core's heartbeats keep a long
    /// seal alive, and a "1 of 1" just before SealComplete only cost the
    /// supervisor one more wake-up inside the accept gap.
    fn seal(
        &mut self,
        _progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Option<Vec<u8>>, ServiceError> {
        if !self.shared.stateless && self.shared.open_connections() > 0 {
            // Connections that outlived the drain grace: once sealed, the
            // state is the next build's, so none of them may run another
            // request here. Cut them, and wait until they are gone.
            let open = self.shared.open_connections();
            self.shared.cut();
            let gone = self.shared.wait_blocking(CUT_WAIT, |_, conns| conns == 0);
            crate::say::warn(format_args!(
                "{open} connections still open after the drain grace were closed before the seal{}",
                if gone {
                    ""
                } else {
                    " (some are still closing: sealing anyway)"
                }
            ));
        }
        let sealed = match self.hooks.seal.as_mut() {
            Some(f) => self.rt.block_on(f())?,
            None => None,
        };
        Ok(sealed)
    }

    fn resume(&mut self) -> Result<(), ServiceError> {
        if let Some(f) = self.hooks.resume.as_mut() {
            self.rt.block_on(f())?;
        }
        self.shared.set_phase(Phase::Serving);
        // Connections offered to the successor are ours again: serve them
        // from where they stopped.
        self.shared.set_moved(Moved::Back);
        Ok(())
    }

    /// The core calls this for a commit, a stop and a successor that won
    /// alike, just before `serve` returns which it was; retirement is final
    /// (`Shared::set_phase`), so the match on that result in `run` sets it,
    /// not this. Meanwhile the phase stays `Draining`: nothing accepts, and
    /// connections wind down as they would once retired. Connections moved
    /// to the successor are its now: ours close without a FIN.
    fn retire(&mut self) {
        self.shared.set_moved(Moved::Gone);
    }
}
