//! `handoff-demo`: a durable key-value HTTP/1.1 service that upgrades itself
//! with zero downtime under the `handoff` supervisor, on axum and
//! `handoff-tokio` (the adapter does the protocol and the HTTP drain).
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

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use server::Shared;
use store::Store;

const HELP: &str = "\
handoff-demo: a durable key-value HTTP service that upgrades with zero downtime

USAGE:
    handoff run --runtime-dir DIR --state-dir DIR --listen http=tcp://127.0.0.1:8080 -- handoff-demo
    handoff-demo --listen 127.0.0.1:8080 --state-dir DIR [--control-sock PATH]   (standalone)
    handoff-demo seed --state-dir DIR --keys N
        write a store of N keys (seed-I = 32 bytes) into an empty state dir, for tests
        and benchmarks of large stores

ENDPOINTS:
    GET /healthz, GET /version, GET /kv/KEY, PUT /kv/KEY (200 once durable)

ENVIRONMENT:
    HANDOFF_DEMO_BUILD_ID     build id reported by /version and to the supervisor
    HANDOFF_DEMO_DRAIN_IDLE_MS  idle time after which a draining connection is closed (100)
    HANDOFF_DEMO_WARMUP_MS    extra warm-up before taking over (simulates loading caches; 0)
    HANDOFF_DEMO_FAULT        test fault: exit-before-ready | fail-health | hang-before-ready | fail-seal
                              | panic-in-drain | no-sigterm-handler
    HANDOFF_DEMO_CHECKPOINT_RECORDS  write the store's index after this many keys changed (262144)
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

/// `handoff-demo seed --state-dir DIR --keys N`.
fn seed(args: &[String]) -> Result<(), String> {
    let (mut dir, mut keys) = (None, None);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || it.next().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--state-dir" => dir = Some(PathBuf::from(val()?)),
            "--keys" => {
                let v = val()?;
                keys = Some(
                    v.parse::<u64>()
                        .map_err(|_| format!("--keys {v:?}: expected a number of keys"))?,
                )
            }
            other => return Err(format!("seed: unexpected argument {other:?} (see --help)")),
        }
    }
    let dir = dir.ok_or("seed needs --state-dir DIR")?;
    let keys = keys.ok_or("seed needs --keys N")?;
    let started = std::time::Instant::now();
    let bytes = store::seed(&dir, keys, |done| {
        eprintln!("handoff-demo seed: {done} of {keys} keys written");
    })
    .map_err(|e| format!("seeding {}: {e}", dir.display()))?;
    eprintln!(
        "handoff-demo seed: {keys} keys, {bytes} bytes in {} in {:.2} s",
        dir.join(store::LOG_FILE).display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if argv.first().map(String::as_str) == Some("seed") {
        return match seed(&argv[1..]) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("handoff-demo: {e}");
                ExitCode::from(2)
            }
        };
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        // Colours for a person at a terminal, plain text in a log file.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let pid = std::process::id();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("handoff-demo[{pid}]: starting the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let code = match rt.block_on(run()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("handoff-demo[{pid}]: {e}");
            ExitCode::from(1)
        }
    };
    rt.shutdown_timeout(Duration::from_millis(100));
    code
}

/// The store's state across hooks: read ahead before Begin, opened at
/// Begin, closed at the seal, reopened on a resume.
struct Lifecycle {
    preloaded: Option<store::Preloaded>,
    /// Where the store lives, from Begin on (a resume reopens it there).
    dir: Option<PathBuf>,
    sealed: bool,
}

async fn run() -> Result<ExitCode, String> {
    let args = parse_args()?;
    let build_id = std::env::var("HANDOFF_DEMO_BUILD_ID")
        .unwrap_or_else(|_| format!("handoff-demo/{}", env!("CARGO_PKG_VERSION")));
    let drain_idle = std::env::var("HANDOFF_DEMO_DRAIN_IDLE_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_millis)
        .unwrap_or(Duration::from_millis(100));
    let proto_max = proto_max()?;
    let shared = Arc::new(Shared {
        store: RwLock::new(None),
        build_id: build_id.clone(),
        served: AtomicU64::new(0),
    });
    let life = Arc::new(Mutex::new(Lifecycle {
        preloaded: None,
        dir: None,
        sealed: false,
    }));
    let counters: Arc<Mutex<Option<Arc<live::Live>>>> = Arc::default();
    let via_handoff = Arc::new(std::sync::atomic::AtomicBool::new(false));

    let (state_arg, control_arg) = (args.state_dir.clone(), args.control.clone());
    let mut builder = handoff_tokio::Handoff::builder(build_id)
        .stateful()
        .idle_grace(drain_idle)
        .handle_sigterm(fault() != "no-sigterm-handler")
        .boot_options(move |o| {
            o.state_dir = state_arg.clone();
            o.control_path = control_arg
                .clone()
                .or_else(|| state_arg.as_ref().map(|d| d.join("control.sock")));
            if let Some(max) = proto_max {
                o.versions.max = max;
            }
        })
        .on_drain(|| async {
            // A bug in a service's drain takes the process down mid-handoff
            // (exit status 101): the supervisor must carry on with the
            // successor, not also count it as a crash outside an upgrade.
            if fault() == "panic-in-drain" {
                eprintln!(
                    "handoff-demo[{}]: injected fault: panic-in-drain",
                    std::process::id()
                );
                std::process::exit(101);
            }
            Ok(())
        });
    {
        // Pre-copy: before Hello, read what the old build appended during
        // our warm-up, round after round, until a round finds little; only
        // that little is left for after Begin, inside the accept gap.
        let life = life.clone();
        builder = builder.catch_up(handoff_tokio::CatchUpPolicy::default(), move || {
            let mut l = lock(&life);
            let Some(p) = l.preloaded.as_mut() else {
                return Ok(handoff_tokio::CatchUpRound::default());
            };
            let (records, bytes) = p
                .catch_up()
                .map_err(|e| format!("catching up with the store: {e}"))?;
            Ok(handoff_tokio::CatchUpRound { records, bytes })
        });
    }
    {
        let (shared, life, via_handoff) = (shared.clone(), life.clone(), via_handoff.clone());
        builder = builder.on_begin(move |begin| {
            // A sealed predecessor handed over: this start is a handoff survived.
            via_handoff.store(begin.sealed.is_some(), std::sync::atomic::Ordering::SeqCst);
            if fault() == "exit-before-ready" {
                eprintln!(
                    "handoff-demo[{}]: injected fault: exit-before-ready",
                    std::process::id()
                );
                std::process::exit(3);
            }
            // We hold the state lock: finish opening the store (only the
            // tail appended since the preload is read now).
            let mut l = lock(&life);
            l.dir = Some(begin.state_dir.clone());
            let opened = match l.preloaded.take() {
                Some(p) => p.finish(),
                None => Store::open(&begin.state_dir),
            }
            .map(|s| shared.set_store(Some(Arc::new(s))))
            .map_err(|e| format!("opening the store in {}: {e}", begin.state_dir.display()).into());
            async move { opened }
        });
    }
    {
        let shared = shared.clone();
        builder = builder.health(move || {
            let checked: Result<(), handoff_tokio::BoxError> = match fault().as_str() {
                "fail-health" => Err("injected fault: fail-health".into()),
                "hang-before-ready" => loop {
                    std::thread::park();
                },
                _ => match shared.store() {
                    Some(store) => store
                        .writer_running()
                        .map_err(|e| format!("store writer: {e}").into()),
                    None => Err("the store is not open".into()),
                },
            };
            async move { checked }
        });
    }
    {
        let (shared, life, counters) = (shared.clone(), life.clone(), counters.clone());
        builder = builder.seal(move || {
            let sealed = (|| -> Result<Option<Vec<u8>>, handoff_tokio::BoxError> {
                if fault() == "fail-seal" {
                    return Err("injected fault: fail-seal".into());
                }
                let store = shared.store().ok_or("the store is not open")?;
                store
                    .seal()
                    .map_err(|e| format!("flushing {}: {e}", store.path().display()))?;
                shared.set_store(None);
                // Freed on a thread of its own, after the accept gap rather
                // than in it: at 10 M keys dropping the store (its index
                // unmapped, the writes since the checkpoint freed) was half
                // of the seal, 0.8 ms (BENCHMARKS.md). Nothing can use it
                // any more: its writer has stopped. (Should the thread not
                // start, the closure and the store are dropped here.)
                let _ = std::thread::Builder::new()
                    .name("kv-sealed-drop".into())
                    .spawn(move || drop(store));
                lock(&life).sealed = true;
                // Requests answered so far are in the shared region before
                // the successor starts adding to it; the note tells it that
                // it takes over in a handoff (it counts one survived).
                if let Some(l) = lock(&counters).as_ref() {
                    l.flush(&shared.served);
                }
                Ok(Some(live::SEAL_NOTE.to_vec()))
            })();
            async move { sealed }
        });
    }
    {
        let (shared, life) = (shared.clone(), life.clone());
        builder = builder.resume(move || {
            // The successor may have written while it held the lock.
            let reopened = (|| -> Result<(), handoff_tokio::BoxError> {
                let mut l = lock(&life);
                if l.sealed {
                    let dir = l
                        .dir
                        .clone()
                        .ok_or("resumed before the store was ever opened")?;
                    let store =
                        Store::open(&dir).map_err(|e| format!("reopening the store: {e}"))?;
                    shared.set_store(Some(Arc::new(store)));
                    l.sealed = false;
                }
                Ok(())
            })();
            async move { reopened }
        });
    }
    let flusher: Arc<Mutex<Option<live::Flusher>>> = Arc::default();
    {
        let (shared, counters, flusher, via_handoff) = (
            shared.clone(),
            counters.clone(),
            flusher.clone(),
            via_handoff.clone(),
        );
        // Committed: only now count this process as a generation.
        builder = builder.on_serving(move || {
            if let Some(l) = lock(&counters).as_ref() {
                l.begin_generation(via_handoff.load(std::sync::atomic::Ordering::SeqCst));
                *lock(&flusher) = Some(l.spawn_flusher(shared.clone()));
            }
        });
    }
    let handoff = builder.start().map_err(|e| format!("starting: {e}"))?;
    let state_dir = handoff
        .state_dir()
        .map(PathBuf::from)
        .ok_or("started by socket activation alone: the demo needs `handoff run` (library mode) or --state-dir")?;

    // Warm-up happens here, before Hello (sent when serving starts).
    if let Some(ms) = std::env::var("HANDOFF_DEMO_WARMUP_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        // Stands in for a real service's warm-up (loading caches, JIT…);
        // the tests use it to make a handoff last long enough to overlap.
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    // The counters region is shared, with its own lock: no need to wait for
    // the state lock to map it.
    *lock(&counters) = live::Live::open(&state_dir);
    // Read the store ahead of Begin (without the lock): its index and what
    // was written since; catch-up rounds follow before Hello, and after
    // Begin only the last round's tail is read, keeping the accept gap short.
    let started = std::time::Instant::now();
    let preloaded = Store::preload(&state_dir)
        .map_err(|e| format!("preloading the store in {}: {e}", state_dir.display()))?;
    let (indexed, held) = preloaded.held();
    tracing::info!(target: "demo::store", indexed, held, took_us = started.elapsed().as_micros() as u64, "preloaded");
    lock(&life).preloaded = Some(preloaded);

    let mut listeners = handoff
        .tcp_listeners()
        .map_err(|e| format!("listeners: {e}"))?;
    if listeners.is_empty() {
        let addr = args
            .listen
            .ok_or("no listeners were passed (LISTEN_FDS) and no --listen was given")?;
        let l = tokio::net::TcpListener::bind(&addr)
            .await
            .map_err(|e| format!("binding {addr}: {e}"))?;
        listeners.push(("http".into(), l));
    }
    let app = server::router(shared.clone());
    let serving = listeners
        .into_iter()
        .map(|(_, l)| {
            let (h, app) = (handoff.clone(), app.clone());
            tokio::spawn(async move { h.serve(l, app).await })
        })
        .collect::<Vec<_>>();
    let mut outcome = Ok(());
    for s in serving {
        match s.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => outcome = Err(e.to_string()),
            Err(e) => outcome = Err(format!("serving: {e}")),
        }
    }
    // The last requests this process answered; the flusher stops first so
    // the process never exits in the middle of a write to the region.
    if let Some(f) = lock(&flusher).take() {
        f.stop();
    }
    if let Some(l) = lock(&counters).as_ref() {
        l.flush(&shared.served);
    }
    outcome?;
    tracing::info!(target: "demo", pid = std::process::id(), "exiting");
    Ok(ExitCode::SUCCESS)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
