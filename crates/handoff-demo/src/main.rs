//! `handoff-demo`: a durable key-value HTTP/1.1 service that upgrades itself
//! with zero downtime under the `handoff` supervisor.
//!
//! ```text
//! GET /healthz      200 ok
//! GET /version      200 pid=<pid> build=<build id>
//! GET /kv/KEY       200 with exactly the stored bytes, or 404
//! PUT /kv/KEY       200 once the value is durable (fsync'd) in the state dir
//! ```
//!
//! Run it under the supervisor (`handoff run --listen http=tcp://127.0.0.1:8080
//! -- handoff-demo`), or standalone with `--listen ADDR --state-dir DIR`.
//!
//! Its live counters (requests served, handoffs survived, per-process
//! totals) are kept in a shared region in the state dir (see `live` and
//! `handoff_demo::counters`), so they carry across every upgrade and
//! `handoff status` can show them.

mod live;
mod server;
mod store;

use std::net::TcpListener as StdTcpListener;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use handoff::{
    Boot, BootOptions, DrainReport, Drainable, ProcessError, Retired, ServiceError, StartRole,
};
use server::{Mode, Shared};
use store::Store;
use tokio::sync::{watch, Notify};

const HELP: &str = "\
handoff-demo: a durable key-value HTTP service that upgrades with zero downtime

USAGE:
    handoff run --runtime-dir DIR --state-dir DIR --listen http=tcp://127.0.0.1:8080 -- handoff-demo
    handoff-demo --listen 127.0.0.1:8080 --state-dir DIR [--control-sock PATH]   (standalone)

ENDPOINTS:
    GET /healthz, GET /version, GET /kv/KEY, PUT /kv/KEY (200 once durable)

ENVIRONMENT:
    HANDOFF_DEMO_BUILD_ID     build id reported by /version and to the supervisor
    HANDOFF_DEMO_DRAIN_IDLE_MS  idle time after which a draining connection is closed (100)
    HANDOFF_DEMO_WARMUP_MS    extra warm-up before taking over (simulates loading caches; 0)
    HANDOFF_DEMO_FAULT        test fault: exit-before-ready | fail-health | hang-before-ready | fail-seal
                              | panic-in-drain | no-sigterm-handler
    HANDOFF_DEMO_PROTO_MAX    test knob: speak the control protocol only up to this version
                              (1: a build from before `handoff stop` drained through it)
    RUST_LOG                  log filter (default: warn)
";

struct Args {
    listen: Option<String>,
    state_dir: Option<PathBuf>,
    control: Option<PathBuf>,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        listen: None,
        state_dir: None,
        control: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        match arg.as_str() {
            "-h" | "--help" => {
                print!("{HELP}");
                std::process::exit(0);
            }
            "--listen" => a.listen = Some(val("--listen")?),
            "--state-dir" => a.state_dir = Some(PathBuf::from(val("--state-dir")?)),
            "--control-sock" => a.control = Some(PathBuf::from(val("--control-sock")?)),
            other => return Err(format!("unexpected argument {other:?} (see --help)")),
        }
    }
    Ok(a)
}

fn fault() -> String {
    std::env::var("HANDOFF_DEMO_FAULT").unwrap_or_default()
}

/// `HANDOFF_DEMO_PROTO_MAX`: lets the tests run the demo as a build that
/// speaks an older protocol (version 1 has no Shutdown, so `handoff stop`
/// must fall back to SIGTERM). Only lowers the top of our range.
fn proto_max() -> Result<Option<u16>, String> {
    let Ok(v) = std::env::var("HANDOFF_DEMO_PROTO_MAX") else {
        return Ok(None);
    };
    let ours = handoff::VersionRange::OURS;
    match v.parse::<u16>() {
        Ok(max) if (ours.min..=ours.max).contains(&max) => Ok(Some(max)),
        _ => Err(format!(
            "HANDOFF_DEMO_PROTO_MAX={v:?}: expected a version in {ours}"
        )),
    }
}

/// The library's view of the service.
struct Service {
    shared: Arc<Shared>,
    rt: tokio::runtime::Handle,
    state_dir: PathBuf,
    sealed: bool,
    live: Option<Arc<live::Live>>,
}

impl Service {
    fn flush_counters(&self) {
        if let Some(l) = &self.live {
            l.flush(&self.shared.served);
        }
    }
}

impl Drainable for Service {
    fn drain(&mut self, grace: Duration) -> Result<DrainReport, ServiceError> {
        // A bug in a service's drain takes the process down mid-handoff
        // (exit status 101): the supervisor must carry on with the
        // successor, not also count it as a crash outside an upgrade.
        if fault() == "panic-in-drain" {
            panic!("injected fault: panic-in-drain");
        }
        self.shared.set_mode(Mode::Draining);
        let left = self
            .rt
            .block_on(server::wait_conns_zero(&self.shared, grace));
        Ok(DrainReport {
            open_conns_remaining: left as u64,
            accept_closed: true,
        })
    }

    fn seal(
        &mut self,
        _progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Option<Vec<u8>>, ServiceError> {
        if fault() == "fail-seal" {
            return Err("injected fault: fail-seal".into());
        }
        self.shared.set_mode(Mode::Sealed);
        // Requests that saw the old mode finish their store work first.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while self.shared.active.load(std::sync::atomic::Ordering::SeqCst) > 0 {
            if std::time::Instant::now() > deadline {
                self.shared.set_mode(Mode::Draining);
                return Err("requests still writing after 10 s".into());
            }
            std::thread::yield_now();
        }
        let store = self
            .shared
            .store
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Err(e) = store.seal() {
            self.shared.set_mode(Mode::Draining);
            return Err(format!("flushing {}: {e}", store.path().display()).into());
        }
        self.sealed = true;
        // Requests answered so far are in the shared region before the
        // successor starts adding to it; the note tells it that it takes
        // over in a handoff (it counts one survived).
        self.flush_counters();
        Ok(Some(live::SEAL_NOTE.to_vec()))
    }

    fn resume(&mut self) -> Result<(), ServiceError> {
        if self.sealed {
            // The successor may have written while it held the lock.
            let store =
                Store::open(&self.state_dir).map_err(|e| format!("reopening the store: {e}"))?;
            *self.shared.store.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(store);
            self.sealed = false;
        }
        self.shared.set_mode(Mode::Serving);
        Ok(())
    }

    fn retire(&mut self) {
        self.shared.set_mode(Mode::Retiring);
        self.flush_counters();
    }
}

/// How long a SIGTERM'd process waits for its open connections (the
/// supervisor's grace, after which it sends SIGKILL, is usually shorter).
const SIGTERM_DRAIN: Duration = Duration::from_secs(60);

/// SIGTERM (`handoff stop`, `systemctl stop`) outside a handoff: stop
/// accepting, let every open connection finish the request it is on (each
/// closes at a request boundary, idle ones after `drain_idle`), record the
/// counts, exit 0. Connections still in the backlog are the supervisor's to
/// close: it owns the listeners.
async fn exit_on_sigterm(
    mut term: tokio::signal::unix::Signal,
    shared: Arc<Shared>,
    live: Option<Arc<live::Live>>,
) {
    if term.recv().await.is_none() {
        return;
    }
    let pid = std::process::id();
    let open = shared.conns.load(std::sync::atomic::Ordering::SeqCst);
    eprintln!("handoff-demo[{pid}]: SIGTERM: draining ({open} connections open)");
    // Draining, not Retiring: the state is still ours, so requests that
    // arrived are served in full (writes included), not refused with 503.
    // Only from Serving: a process already draining, sealed or retiring
    // for a handoff keeps that mode (a sealed one must not write again).
    shared.mode.send_if_modified(|m| {
        let serving = *m == Mode::Serving;
        if serving {
            *m = Mode::Draining;
        }
        serving
    });
    let left = server::wait_conns_zero(&shared, SIGTERM_DRAIN).await;
    eprintln!("handoff-demo[{pid}]: SIGTERM: exiting ({left} connections still open)");
    match live {
        Some(l) => l.flush_and_exit(&shared.served, 0),
        None => std::process::exit(0),
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("handoff-demo[{}]: {e}", std::process::id());
            ExitCode::from(1)
        }
    }
}

fn run() -> Result<ExitCode, String> {
    let args = parse_args()?;
    let build_id = std::env::var("HANDOFF_DEMO_BUILD_ID")
        .unwrap_or_else(|_| format!("handoff-demo/{}", env!("CARGO_PKG_VERSION")));
    let mut opts = BootOptions::new(build_id.clone());
    if let Some(max) = proto_max()? {
        opts.versions.max = max;
    }
    opts.state_dir = args.state_dir.clone();
    opts.control_path = args
        .control
        .clone()
        .or_else(|| args.state_dir.as_ref().map(|d| d.join("control.sock")));
    let mut boot = Boot::from_env(opts).map_err(|e| format!("starting: {e}"))?;
    let state_dir = boot.config().state_dir.clone();
    let role: StartRole = boot.role();
    let mut listeners: Vec<StdTcpListener> = boot
        .take_listeners()
        .into_iter()
        .map(|l| l.into_tcp())
        .collect();
    if listeners.is_empty() {
        let addr = args
            .listen
            .ok_or("no listeners were passed (LISTEN_FDS) and no --listen was given")?;
        listeners.push(StdTcpListener::bind(&addr).map_err(|e| format!("binding {addr}: {e}"))?);
    }

    // Warm-up happens here, before Begin: nothing below depends on state.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("starting the runtime: {e}"))?;
    let drain_idle = std::env::var("HANDOFF_DEMO_DRAIN_IDLE_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_millis)
        .unwrap_or(Duration::from_millis(100));

    // Registering the listeners with the runtime is warm-up too; accepting
    // on them waits for Commit.
    let listeners = {
        let _guard = rt.enter();
        listeners
            .into_iter()
            .map(|l| {
                l.set_nonblocking(true)?;
                tokio::net::TcpListener::from_std(l)
            })
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(|e| format!("registering listeners: {e}"))?
    };

    if let Some(ms) = std::env::var("HANDOFF_DEMO_WARMUP_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        // Stands in for a real service's warm-up (loading caches, JIT…);
        // the tests use it to make a handoff last long enough to overlap.
        std::thread::sleep(Duration::from_millis(ms));
    }
    // The counters region is shared, with its own lock: no need to wait for
    // the state lock to map it.
    let counters = live::Live::open(&state_dir);

    // Read the store ahead of Begin (without the lock): after Begin only
    // the tail appended since needs reading, keeping the accept gap short.
    let preloaded = Store::preload(&state_dir)
        .map_err(|e| format!("preloading the store in {}: {e}", state_dir.display()))?;

    let begun = match boot.begin() {
        Ok(b) => b,
        Err(ProcessError::Aborted { reason }) => {
            eprintln!(
                "handoff-demo[{}]: aborted before Begin: {reason}",
                std::process::id()
            );
            return Ok(ExitCode::from(1));
        }
        Err(e) => return Err(format!("waiting for Begin: {e}")),
    };
    // A sealed predecessor handed over: this start is a handoff survived.
    let via_handoff = begun.state().is_some();
    if fault() == "exit-before-ready" {
        eprintln!(
            "handoff-demo[{}]: injected fault: exit-before-ready",
            std::process::id()
        );
        return Ok(ExitCode::from(3));
    }

    // We hold the state lock: open the store.
    let store = preloaded
        .finish()
        .map_err(|e| format!("opening the store in {}: {e}", state_dir.display()))?;
    let (mode, _) = watch::channel(Mode::Serving);
    let shared = Arc::new(Shared {
        mode,
        store: RwLock::new(Arc::new(store)),
        build_id,
        conns: AtomicUsize::new(0),
        accepting: AtomicUsize::new(0),
        conns_changed: Notify::new(),
        active: AtomicUsize::new(0),
        served: AtomicU64::new(0),
        drain_idle,
    });
    let health_shared = shared.clone();
    let incumbent = begun
        .ready(move || {
            match fault().as_str() {
                "fail-health" => return Err("injected fault: fail-health".into()),
                "hang-before-ready" => loop {
                    std::thread::park();
                },
                _ => {}
            }
            let store = health_shared
                .store
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            store
                .flush_blocking()
                .map_err(|e| format!("store writer: {e}"))
        })
        .map_err(|e| format!("becoming ready: {e}"))?;
    // Committed: only now count this process as a generation, and accept. A
    // successor that accepted earlier and was then aborted (killed) would
    // reset the connections it had taken.
    let flusher = counters.as_ref().map(|l| {
        l.begin_generation(via_handoff);
        l.spawn_flusher(shared.clone())
    });
    // Registered synchronously and before the first accept: once this
    // process has answered anyone, a SIGTERM drains it instead of killing it.
    // The fault leaves SIGTERM's default action (a service that never set
    // up a handler): `handoff stop` must then say it cut requests.
    if fault() != "no-sigterm-handler" {
        let term = {
            let _guard = rt.enter();
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        };
        match term {
            Ok(term) => {
                rt.spawn(exit_on_sigterm(term, shared.clone(), counters.clone()));
            }
            Err(e) => tracing::warn!(target: "demo", error = %e, "SIGTERM will not drain"),
        }
    }
    for l in listeners {
        rt.spawn(server::accept_loop(l, shared.clone()));
    }

    tracing::info!(target: "demo", ?role, pid = std::process::id(), "serving");

    let mut service = Service {
        shared: shared.clone(),
        rt: rt.handle().clone(),
        state_dir,
        sealed: false,
        live: counters.clone(),
    };
    let retired = incumbent
        .serve(&mut service)
        .map_err(|e| format!("control socket: {e}"))?;
    // Retired: finish connections (bounded), then exit.
    shared.set_mode(Mode::Retiring);
    let left = rt.block_on(server::wait_conns_zero(&shared, Duration::from_secs(30)));
    // The last requests this process answered; the flusher stops first so
    // the process never exits in the middle of a write to the region.
    if let Some(f) = flusher {
        f.stop();
    }
    service.flush_counters();
    match retired {
        Retired::Committed { .. } | Retired::SuccessorWon { .. } => {
            tracing::info!(target: "demo", ?retired, open = left, "exiting");
        }
        // `handoff stop` through the control protocol: the drain ran (no
        // SIGTERM handler needed), the supervisor waits for this exit.
        Retired::Stopped { .. } => {
            eprintln!(
                "handoff-demo[{}]: stopped through the control protocol: exiting ({left} connections still open)",
                std::process::id()
            );
        }
    }
    rt.shutdown_timeout(Duration::from_millis(100));
    Ok(ExitCode::SUCCESS)
}
