//! The handle a service holds: built once in `main`, it hands out the
//! listeners by name, starts the protocol, and says when to stop.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use handoff::{Boot, BootOptions, Listener};
use tokio::runtime::Handle;
use tokio::sync::watch;

use crate::control::{self, Begin, Hooks, Outcome};
use crate::error::{BoxError, Error};
use crate::phase::{Graces, Phase, Retirement, Shared};

/// The longest any of the builder's durations is taken to be: a deadline is
/// an `Instant` plus one, and `Duration::MAX` (a natural way to say
/// "never") would overflow it and panic mid-drain.
pub(crate) const LONGEST: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Sets up a [`Handoff`]: what the service is called, and — only if it has
/// state — how it seals and resumes.
///
/// Every hook is `async` and optional. A service without hooks is
/// *stateless*: it accepts as soon as it starts (alongside the old build,
/// from the same kernel queue), so an upgrade never makes a new connection
/// wait.
#[must_use = "call .start() to get the handle"]
pub struct Builder {
    boot: BootOptions,
    handle_sigterm: bool,
    stateful: bool,
    hooks: Hooks,
    idle_grace: Duration,
    first_request_grace: Duration,
    header_read_timeout: Duration,
    head_grace: Duration,
    min_body_rate: u64,
    drain_grace: Duration,
    max_connections: Option<usize>,
}

impl std::fmt::Debug for Builder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Builder")
            .field("build_id", &self.boot.build_id)
            .field("stateful", &self.stateful)
            .field("hooks", &self.hooks)
            .finish_non_exhaustive()
    }
}

impl Builder {
    /// Marks the service as having state that requests write: it accepts
    /// only after the handoff commits (until then the old build may resume
    /// and own the state again), and its drain waits for every connection
    /// to close before the seal.
    ///
    /// ```no_run
    /// # async fn f() -> Result<(), handoff_tokio::Error> {
    /// let handoff = handoff_tokio::Handoff::builder("kv 2.0")
    ///     .stateful()
    ///     .on_begin(|begin: handoff_tokio::Begin| async move {
    ///         // The state lock is ours: open the store in begin.state_dir
    ///         // (begin.sealed is what the old build's seal returned).
    ///         Ok(())
    ///     })
    ///     .health(|| async { Ok(()) }) // Err aborts the upgrade
    ///     .seal(|| async { Ok(None) }) // flush; Some(bytes) reach on_begin
    ///     .resume(|| async { Ok(()) }) // aborted after the seal: reopen
    ///     .start()?;
    /// # Ok(()) }
    /// ```
    pub fn stateful(mut self) -> Self {
        self.stateful = true;
        self
    }

    /// Runs once the state lock is held (a new build, before it says Ready;
    /// a first start too), with the state dir and the bytes the old build's
    /// seal returned: open the state here. An error aborts the handoff; the
    /// old build serves on.
    pub fn on_begin<F, Fut>(mut self, f: F) -> Self
    where
        F: FnOnce(Begin) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), BoxError>> + Send + 'static,
    {
        self.hooks.on_begin = Some(Box::new(move |s| Box::pin(f(s))));
        self
    }

    /// Brings the state read during warm-up up to date before this build
    /// says it is ready to take over: `round` is called again and again —
    /// each call reads and applies what the old build wrote since the
    /// previous one (for a log: from the offset reached to the end) — until
    /// a round finds at most what `policy` allows or a cap ends it. Only
    /// then does the handoff start, so what is left to read after
    /// [`on_begin`](Self::on_begin), while nobody accepts, is one short
    /// round's writes rather than everything written during warm-up.
    ///
    /// `round` runs on handoff's own thread, without the state lock and
    /// while the old build writes: blocking file I/O is fine, and it must
    /// leave a record caught half-written for the next round. An error
    /// ends this process's start (the old build serves on). The rounds are
    /// in `handoff upgrade`'s report. `crates/handoff-demo` (a log with a
    /// checkpointed index) uses it; docs/design.md §2.7 says why. Keep
    /// `round` cheap when there is nothing new: after Hello it also runs
    /// every 100 ms while the build waits to take over (held by `handoff
    /// upgrade --prepare`, say), so that what is left after Begin stays one
    /// round's writes however long it waited.
    ///
    /// ```no_run
    /// use std::io::{Read, Seek, SeekFrom};
    /// use std::sync::{Arc, Mutex};
    ///
    /// use handoff_tokio::{CatchUpPolicy, CatchUpRound};
    ///
    /// /// A log read during warm-up, and how far.
    /// struct Replica {
    ///     log: std::fs::File,
    ///     offset: u64,
    /// }
    ///
    /// impl Replica {
    ///     /// Applies what was appended since the last call; a record
    ///     /// caught half-written stays for the next one.
    ///     fn apply_new(&mut self) -> std::io::Result<(u64, u64)> {
    ///         let end = self.log.metadata()?.len(); // no further: a busy writer never stops
    ///         let mut new = vec![0; (end - self.offset) as usize];
    ///         self.log.seek(SeekFrom::Start(self.offset))?;
    ///         self.log.read_exact(&mut new)?;
    ///         let whole = new.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    ///         let records = new[..whole].iter().filter(|&&b| b == b'\n').count();
    ///         // … apply new[..whole] to the in-memory state …
    ///         self.offset += whole as u64;
    ///         Ok((records as u64, whole as u64))
    ///     }
    /// }
    ///
    /// # async fn f() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    /// let replica = Arc::new(Mutex::new(Replica {
    ///     log: std::fs::File::open("/var/lib/app/log")?,
    ///     offset: 0,
    /// }));
    /// replica.lock().unwrap().apply_new()?; // warm-up: the bulk
    /// let r = replica.clone();
    /// let handoff = handoff_tokio::Handoff::builder("app 2.0")
    ///     .stateful()
    ///     .catch_up(CatchUpPolicy::default(), move || {
    ///         let (records, bytes) = r.lock().unwrap().apply_new()?;
    ///         Ok(CatchUpRound { records, bytes })
    ///     })
    ///     // on_begin (the lock is ours): apply_new() once more, then write.
    ///     .start()?;
    /// # Ok(()) }
    /// ```
    pub fn catch_up<F>(mut self, policy: crate::CatchUpPolicy, f: F) -> Self
    where
        F: FnMut() -> Result<crate::CatchUpRound, BoxError> + Send + 'static,
    {
        self.hooks.catch_up = Some((policy, Box::new(f)));
        self
    }

    /// Runs when a handoff (or `handoff stop`) starts draining this
    /// process, before accepting stops: pause background work that writes
    /// state, say goodbye to peers. An error makes the drain fail: the
    /// handoff aborts and this process serves on.
    pub fn on_drain<F, Fut>(mut self, mut f: F) -> Self
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), BoxError>> + Send + 'static,
    {
        self.hooks.on_drain = Some(Box::new(move || Box::pin(f())));
        self
    }

    /// Runs once, when this process becomes the incumbent — its handoff
    /// committed, or it started with no predecessor — just before it
    /// accepts (a service with state) or goes on accepting (a stateless
    /// one). Never for a new build whose handoff aborted.
    pub fn on_serving(mut self, f: impl FnOnce() + Send + 'static) -> Self {
        self.hooks.on_serving = Some(Box::new(f));
        self
    }

    /// The new build's health check, run before it says Ready. An error
    /// aborts the handoff and is shown by `handoff upgrade`.
    pub fn health<F, Fut>(mut self, mut f: F) -> Self
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), BoxError>> + Send + 'static,
    {
        self.hooks.health = Some(Box::new(move || Box::pin(f())));
        self
    }

    /// Makes the state durable once the drain is done; the bytes returned
    /// (at most ~1 MiB) reach the next build's [`on_begin`](Self::on_begin).
    /// After it returns the state lock is released.
    pub fn seal<F, Fut>(mut self, mut f: F) -> Self
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = Result<Option<Vec<u8>>, BoxError>> + Send + 'static,
    {
        self.hooks.seal = Some(Box::new(move || Box::pin(f())));
        self
    }

    /// Runs when a handoff was aborted after the seal and the state lock is
    /// ours again: reload what the seal closed. Serving resumes after it.
    pub fn resume<F, Fut>(mut self, mut f: F) -> Self
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), BoxError>> + Send + 'static,
    {
        self.hooks.resume = Some(Box::new(move || Box::pin(f())));
        self
    }

    /// How long a keep-alive HTTP/1.1 connection may stay idle, once the
    /// drain began, before it is closed (default 250 ms). A client that
    /// sends its next request within it gets an answer with `Connection:
    /// close` instead of a closed socket.
    pub fn idle_grace(mut self, d: Duration) -> Self {
        self.idle_grace = d.min(LONGEST);
        self
    }

    /// While serving, how long an HTTP/1.1 connection may go without
    /// sending a complete request head — counted from its last response,
    /// or from its accept (default 30 s, hyper's own default): then it is
    /// closed, and a client that sent part of a head gets `408 Request
    /// Timeout` first. This bounds what an idle or a slowloris client holds
    /// (a descriptor, a slot under
    /// [`max_connections`](Self::max_connections)); a request in flight is
    /// never timed out by it. A connection moved to the next build starts
    /// the clock again there.
    ///
    /// Like every duration the builder takes, it is capped at ten years:
    /// `Duration::MAX` means "never" without overflowing a deadline.
    pub fn header_read_timeout(mut self, d: Duration) -> Self {
        self.header_read_timeout = d.min(LONGEST);
        self
    }

    /// Once the drain began, how long a client that has sent part of a
    /// request head may take to send the rest (default 1 s, counted from
    /// the drain's start or the head's first byte, whichever is later); it
    /// is then answered `408 Request Timeout` and closed. This is what keeps
    /// a client that stops mid-request (slowloris) from holding a stateful
    /// drain, and so the accept gap, until the drain grace runs out.
    ///
    /// A request *body* still arriving gets the same grace, extended by what
    /// its client sends (see [`min_body_rate`](Self::min_body_rate)); past
    /// it the service reads an error from the body, and the response says
    /// `Connection: close` (and `408`, if the service answered a failure).
    pub fn head_grace(mut self, d: Duration) -> Self {
        self.head_grace = d.min(LONGEST);
        self
    }

    /// Once the drain began, the rate in bytes a second at which a request
    /// body still arriving must keep coming (default 64 KiB/s): each byte
    /// it sends buys `1 / rate` seconds beyond the
    /// [`head_grace`](Self::head_grace). An upload keeping up the rate is
    /// never cut; a client that stalls mid-body or trickles it (a "slow
    /// POST") is, a head grace after the drain began — the same bound as
    /// Apache's `mod_reqtimeout` `MinRate`. A service that must let slow
    /// uploads finish during a drain lowers it (1 is the floor).
    pub fn min_body_rate(mut self, bytes_per_second: u64) -> Self {
        self.min_body_rate = bytes_per_second.max(1);
        self
    }

    /// How long everything may take to finish after this process stops
    /// accepting for good, when no handoff said otherwise (default 30 s;
    /// during a handoff the supervisor's `--drain-grace` applies).
    pub fn drain_grace(mut self, d: Duration) -> Self {
        self.drain_grace = d.min(LONGEST);
        self
    }

    /// Whether to turn SIGTERM into a drain and a clean exit (default
    /// yes). Turn it off only when something else in the process handles
    /// SIGTERM; `handoff stop` drains through the control protocol anyway.
    pub fn handle_sigterm(mut self, on: bool) -> Self {
        self.handle_sigterm = on;
        self
    }

    /// Adjusts how the protocol side starts, for what the environment does
    /// not say: where the state dir and control socket are when started
    /// without `handoff run` (`state_dir`, `control_path`), the protocol
    /// versions spoken, the lock waits. See `handoff::BootOptions`.
    pub fn boot_options(mut self, f: impl FnOnce(&mut handoff::BootOptions)) -> Self {
        f(&mut self.boot);
        self
    }

    /// Most connections open at once (across every `serve` of this
    /// process). At the cap the accept loops wait and new connections queue
    /// in the kernel backlog, instead of `accept` failing with EMFILE and
    /// the process having no descriptor left for its state or its control
    /// socket. Default: the soft `RLIMIT_NOFILE` less 64 kept for the
    /// process itself (at least 16).
    pub fn max_connections(mut self, n: usize) -> Self {
        self.max_connections = Some(n);
        self
    }

    /// Reads what the supervisor passed (`LISTEN_FDS`, the control channel,
    /// the state dir) and installs the SIGTERM handler (`handoff stop`:
    /// finish every request, then [`Handoff::serve`] returns).
    ///
    /// Call it from inside the tokio runtime, once warm-up (config, caches)
    /// is done: the supervisor learns this build is ready to take over when
    /// the first `serve` (or [`Handoff::shutdown_signal`]) starts.
    pub fn start(self) -> Result<Handoff, Error> {
        let rt = Handle::try_current().map_err(|_| Error::NoRuntime)?;
        let (mode, listeners) = if socket_activated() {
            // `handoff run --mode notify`, or systemd itself: listeners by
            // LISTEN_FDS, readiness by NOTIFY_SOCKET, stop by SIGTERM.
            let listeners = handoff::listeners::take_from_env()
                .map_err(|e| Error::Boot(handoff::ProcessError::ListenFds(e)))?;
            let notifier = handoff::sd_notify::Notifier::from_env()
                .map_err(|e| Error::Boot(handoff::ProcessError::Env(e.to_string())))?;
            if self.stateful {
                crate::say::warn(format_args!("started by socket activation (notify mode) but marked stateful: there is no state handoff here, and the old and new builds serve side by side until the old one is stopped"));
            }
            (Mode::Activated(notifier), listeners)
        } else {
            let mut boot = Boot::from_env(self.boot).map_err(Error::Boot)?;
            let listeners = boot.take_listeners();
            (Mode::Protocol(Box::new(boot), self.hooks), listeners)
        };
        let state_dir = match &mode {
            Mode::Protocol(boot, _) => Some(boot.config().state_dir.clone()),
            Mode::Activated(_) => None,
        };
        let shared = Arc::new(Shared::new(
            !self.stateful,
            Graces {
                idle: self.idle_grace,
                first_request: self.first_request_grace,
                head: self.head_grace,
                min_body_rate: self.min_body_rate,
                header_read: self.header_read_timeout,
            },
            self.drain_grace,
        ));
        shared.set_max_connections(self.max_connections.unwrap_or_else(default_max_connections));
        let (outcome_tx, outcome) = watch::channel(None);
        let notifier = match &mode {
            // A second handle for STOPPING=1 (each is one unbound socket).
            Mode::Activated(_) => handoff::sd_notify::Notifier::from_env().ok(),
            Mode::Protocol(..) => None,
        };
        let inner = Arc::new(Inner {
            shared: shared.clone(),
            listeners: Mutex::new(listeners),
            state_dir,
            pending: Mutex::new(Some((mode, outcome_tx))),
            started: Once::new(),
            outcome,
            rt: rt.clone(),
        });
        if self.handle_sigterm {
            install_sigterm(&rt, shared, notifier)?;
        }
        Ok(Handoff { inner })
    }
}

/// The soft descriptor limit less what the process needs besides its
/// connections (state files, control socket, the runtime's own), at least
/// 16; no cap where the limit cannot be read or is unlimited.
fn default_max_connections() -> usize {
    const KEPT: u64 = 64;
    match nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE) {
        Ok((soft, _)) if soft != nix::sys::resource::RLIM_INFINITY => {
            usize::try_from(soft.saturating_sub(KEPT).max(16)).unwrap_or(usize::MAX)
        }
        _ => usize::MAX,
    }
}

/// Whether this process was started by socket activation alone: listeners
/// passed, but no handoff control channel (`handoff run --mode notify`, or
/// systemd with a `.socket` unit).
fn socket_activated() -> bool {
    std::env::var_os("HANDOFF_ROLE").is_none()
        && std::env::var_os("HANDOFF_CONTROL_SOCK").is_none()
        && std::env::var_os("LISTEN_FDS").is_some()
}

/// How this process was started.
enum Mode {
    /// By a `handoff run` supervisor in library mode: the full protocol.
    Protocol(Box<Boot>, Hooks),
    /// By socket activation: serve at once, say READY=1, stop on SIGTERM.
    Activated(handoff::sd_notify::Notifier),
}

/// Turns SIGTERM into retirement: stop accepting, finish every request.
/// Installed by `start` so no service has to write its own handler, and so
/// `handoff stop` never cuts a request in flight.
fn install_sigterm(
    rt: &Handle,
    shared: Arc<Shared>,
    notifier: Option<handoff::sd_notify::Notifier>,
) -> Result<(), Error> {
    let _enter = rt.enter();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(Error::Signal)?;
    rt.spawn(async move {
        if term.recv().await.is_some() {
            crate::say::warn(format_args!(
                "SIGTERM: finishing the requests in flight, then exiting"
            ));
            if let Some(n) = notifier {
                let _ = n.stopping();
            }
            shared.set_phase(Phase::Retired(Retirement::Stopped));
        }
    });
    Ok(())
}

type Pending = (Mode, watch::Sender<Option<Outcome>>);

pub(crate) struct Inner {
    pub(crate) shared: Arc<Shared>,
    listeners: Mutex<Vec<Listener>>,
    state_dir: Option<PathBuf>,
    /// Taken by the first `serve` / `shutdown_signal`, which starts the
    /// protocol thread.
    pending: Mutex<Option<Pending>>,
    started: Once,
    outcome: watch::Receiver<Option<Outcome>>,
    rt: Handle,
}

/// A service's side of handoff: its listeners, its phase, its drain.
///
/// Cheap to clone; every clone is the same process's handle.
#[derive(Clone)]
pub struct Handoff {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Handoff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handoff")
            .field("phase", &self.inner.shared.phase())
            .finish_non_exhaustive()
    }
}

impl Handoff {
    /// Starts describing the service; `build_id` names this build in
    /// `handoff status` and the upgrade report (e.g. `"my-app 1.4.2"`).
    pub fn builder(build_id: impl Into<String>) -> Builder {
        Builder {
            boot: BootOptions::new(build_id),
            handle_sigterm: true,
            stateful: false,
            hooks: Hooks::default(),
            idle_grace: Duration::from_millis(250),
            first_request_grace: Duration::from_secs(2),
            header_read_timeout: Duration::from_secs(30),
            head_grace: Duration::from_secs(1),
            min_body_rate: 64 * 1024,
            drain_grace: Duration::from_secs(30),
            max_connections: None,
        }
    }

    /// The TCP listener passed as `--listen NAME=tcp://…`, registered with
    /// tokio. Each name can be taken once.
    pub fn tcp_listener(&self, name: &str) -> Result<tokio::net::TcpListener, Error> {
        let l = self.take(name)?;
        let std = l.into_tcp();
        // A Unix socket passed as `--listen NAME=unix:…` has no TCP
        // address: say so now rather than fail on every accept.
        if let Err(e) = std.local_addr() {
            return Err(Error::Listener {
                name: name.into(),
                source: std::io::Error::new(
                    e.kind(),
                    format!("not a TCP listening socket ({e}); give it as `--listen {name}=tcp://HOST:PORT`"),
                ),
            });
        }
        std.set_nonblocking(true)
            .and_then(|()| {
                let _enter = self.inner.rt.enter();
                tokio::net::TcpListener::from_std(std)
            })
            .map_err(|source| Error::Listener {
                name: name.into(),
                source,
            })
    }

    /// Every TCP listener passed (with its `--listen` name) that has not
    /// been taken by name, registered with tokio: for a service that serves
    /// the same thing on all of them.
    pub fn tcp_listeners(&self) -> Result<Vec<(String, tokio::net::TcpListener)>, Error> {
        let names: Vec<String> = self
            .inner
            .listeners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|l| l.name.clone())
            .collect();
        names
            .into_iter()
            .map(|n| self.tcp_listener(&n).map(|l| (n, l)))
            .collect()
    }

    /// The Unix listening socket passed as `--listen NAME=unix:PATH`,
    /// registered with tokio. Each name can be taken once.
    pub fn unix_listener(&self, name: &str) -> Result<tokio::net::UnixListener, Error> {
        let l = self.take(name)?;
        let std = l.into_unix();
        if let Err(e) = std.local_addr() {
            return Err(Error::Listener {
                name: name.into(),
                source: std::io::Error::new(
                    e.kind(),
                    format!(
                        "not a Unix listening socket ({e}); give it as `--listen {name}=unix:PATH`"
                    ),
                ),
            });
        }
        std.set_nonblocking(true)
            .and_then(|()| {
                let _enter = self.inner.rt.enter();
                tokio::net::UnixListener::from_std(std)
            })
            .map_err(|source| Error::Listener {
                name: name.into(),
                source,
            })
    }

    /// A handle with no supervisor behind it, whose phase the unit tests move
    /// by hand (`shared.set_phase`): the HTTP drain tested in isolation.
    #[cfg(test)]
    pub(crate) fn for_tests(stateless: bool, graces: Graces) -> Handoff {
        let shared = Arc::new(Shared::new(stateless, graces, Duration::from_secs(10)));
        let (tx, outcome) = watch::channel(None);
        tx.send_replace(Some(Ok(Retirement::Committed)));
        Handoff {
            inner: Arc::new(Inner {
                shared,
                listeners: Mutex::new(vec![]),
                state_dir: None,
                pending: Mutex::new(None),
                started: Once::new(),
                outcome,
                rt: Handle::current(),
            }),
        }
    }

    /// The state directory the supervisor gave (`handoff run --state-dir`):
    /// where a service with state keeps it. The state lock in it is held
    /// from [`Builder::on_begin`] until the seal. `None` when started by
    /// socket activation alone, which has no state handoff.
    pub fn state_dir(&self) -> Option<&Path> {
        self.inner.state_dir.as_deref()
    }

    fn take(&self, name: &str) -> Result<Listener, Error> {
        let mut ls = self
            .inner
            .listeners
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        match ls.iter().position(|l| l.name == name) {
            Some(i) => Ok(ls.remove(i)),
            None => Err(Error::NoListener {
                name: name.into(),
                left: if ls.is_empty() {
                    "none".into()
                } else {
                    ls.iter()
                        .map(|l| l.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                },
            }),
        }
    }

    /// Starts the protocol thread once: from here on the supervisor may
    /// hand over to this process.
    pub(crate) fn start_protocol(&self) {
        let inner = &self.inner;
        inner.started.call_once(|| {
            let pending = inner
                .pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take();
            let Some((mode, tx)) = pending else {
                return;
            };
            let (boot, hooks) = match mode {
                Mode::Protocol(boot, hooks) => (boot, hooks),
                Mode::Activated(notifier) => {
                    inner.shared.set_phase(Phase::Serving);
                    if let Err(e) = notifier.ready() {
                        crate::say::warn(format_args!("cannot say READY=1: {e}"));
                    }
                    // Nothing more will come: SIGTERM is the only way out.
                    tx.send_replace(Some(Ok(Retirement::Stopped)));
                    return;
                }
            };
            let shared = inner.shared.clone();
            let rt = inner.rt.clone();
            let spawned = std::thread::Builder::new()
                .name("handoff-control".into())
                .spawn(move || {
                    let outcome = control::run(*boot, shared.clone(), hooks, rt);
                    tx.send_replace(Some(outcome));
                });
            if let Err(e) = spawned {
                crate::say::warn(format_args!(
                    "cannot start the handoff control thread: {e}; not serving"
                ));
                inner.shared.set_phase(Phase::Retired(Retirement::Failed));
            }
        });
    }

    /// Resolves when this process must stop accepting for good: the handoff
    /// committed to the next build, SIGTERM arrived, or (a new build) its
    /// handoff was aborted. Plug it into servers [`serve`](Self::serve)
    /// does not cover, e.g. tonic's `serve_with_incoming_shutdown` (HTTP/2:
    /// GOAWAY lets clients retry safely). `axum::serve(..)
    /// .with_graceful_shutdown(..)` works too, but hyper then closes idle
    /// HTTP/1.1 keep-alive connections at once, racing each client's next
    /// request; `serve` does not.
    pub fn shutdown_signal(&self) -> impl Future<Output = ()> + Send + 'static {
        self.start_protocol();
        let mut rx = self.inner.shared.subscribe();
        async move {
            let _ = rx.wait_for(|p| matches!(p, Phase::Retired(_))).await;
        }
    }

    /// Why this process retired, once it has: `Ok` for a clean end
    /// (committed, stopped), `Err` for an aborted or failed handoff.
    pub(crate) async fn outcome(&self) -> Result<(), Error> {
        let retired = match self.inner.shared.phase() {
            Phase::Retired(r) => r,
            _ => return Ok(()),
        };
        if retired == Retirement::Stopped {
            return Ok(());
        }
        let mut rx = self.inner.outcome.clone();
        let got = rx.wait_for(Option::is_some).await.map(|o| o.clone());
        match got {
            Ok(Some(Err((phase, message)))) => Err(Error::Handoff { phase, message }),
            Ok(_) => Ok(()),
            // The control thread ended without an outcome: a hook panicked.
            Err(_) => Err(Error::Handoff {
                phase: "control thread",
                message: "a seal, resume, begin or health hook panicked".into(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `Duration::MAX` ("never") is taken as ten years, so no deadline
    /// built from it (`Instant` + grace) overflows and panics (a server
    /// whose graces are that long: `http::tests`).
    #[test]
    fn a_duration_of_max_is_capped() {
        let b = Handoff::builder("t")
            .idle_grace(Duration::MAX)
            .head_grace(Duration::MAX)
            .header_read_timeout(Duration::MAX)
            .drain_grace(Duration::MAX);
        for d in [
            b.idle_grace,
            b.head_grace,
            b.header_read_timeout,
            b.drain_grace,
        ] {
            assert_eq!(d, LONGEST);
        }
        let _ = std::time::Instant::now() + LONGEST + LONGEST;
    }
}
