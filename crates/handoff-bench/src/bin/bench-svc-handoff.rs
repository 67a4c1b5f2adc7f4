//! The tiny handler under `handoff`, the way a library user writes it (the same shape as
//! `handoff-demo`): run by the `handoff run` supervisor, which owns the listeners, and
//! upgraded with `handoff upgrade`.
//!
//! The service is stateless, so its drain is the quick kind docs/design.md §2.3 allows: stop
//! accepting, report the open connections, and keep finishing them answer-then-close while
//! the successor already serves (nothing to seal). After Commit it waits for its last
//! connections (bounded) and exits.
//!
//! Being stateless, a new process also accepts as soon as its listeners are registered,
//! before Begin (see `handoff::Begun::ready`): the old one is still accepting from the same
//! kernel queue, so no connection waits for the handoff's exchanges. If the handoff is
//! aborted or the supervisor hangs up before Commit, it stops accepting, finishes what it
//! accepted and exits. `--accept-after-commit` keeps the order a service with state must
//! use (accept only once committed), for comparison.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use handoff::{Boot, BootOptions, DrainReport, Drainable, ServiceError};
use handoff_bench::tiny::{self, Tiny};

struct Svc {
    tiny: Arc<Tiny>,
    rt: tokio::runtime::Handle,
}

impl Drainable for Svc {
    fn drain(&mut self, grace: Duration) -> Result<DrainReport, ServiceError> {
        self.tiny.set_draining(true);
        // Accept is closed once no accept loop is inside `accept` any more.
        let closed = self.rt.block_on(
            self.tiny
                .wait_accept_closed(grace.min(Duration::from_secs(1))),
        );
        Ok(DrainReport {
            open_conns_remaining: self.tiny.open_conns() as u64,
            accept_closed: closed,
        })
    }

    fn seal(&mut self, _: &mut dyn FnMut(u64, u64)) -> Result<Option<Vec<u8>>, ServiceError> {
        // Test hook (tests/early_accept.rs): BENCH_SEAL_GATE=PATH holds the seal until PATH
        // exists, then refuses it, so a test can abort a handoff at a moment of its choosing
        // while the successor already serves.
        if let Some(gate) = std::env::var_os("BENCH_SEAL_GATE") {
            let gate = std::path::PathBuf::from(gate);
            let end = std::time::Instant::now() + Duration::from_secs(30);
            while !gate.exists() && std::time::Instant::now() < end {
                std::thread::sleep(Duration::from_millis(5));
            }
            return Err(format!("seal refused by BENCH_SEAL_GATE ({})", gate.display()).into());
        }
        Ok(None)
    }

    fn resume(&mut self) -> Result<(), ServiceError> {
        self.tiny.set_draining(false);
        Ok(())
    }

    fn retire(&mut self) {
        self.tiny.set_draining(true);
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-svc-handoff[{}]: {e}", std::process::id());
            ExitCode::FAILURE
        }
    }
}

/// Wall-clock µs, comparable with the supervisor's log timestamps.
fn now_us() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros())
        .unwrap_or(0)
}

fn run() -> Result<(), String> {
    // BENCH_TRACE=1: one line per start with the wall-clock µs of each start-up step, to
    // see where an upgrade's time goes (the harness reads it beside the phase log).
    let trace = std::env::var_os("BENCH_TRACE").is_some();
    let mut after_commit = false;
    for a in std::env::args().skip(1) {
        match a.as_str() {
            "--accept-after-commit" => after_commit = true,
            other => {
                return Err(format!(
                    "unknown argument {other:?} (usage: bench-svc-handoff [--accept-after-commit], run under `handoff run`)"
                ))
            }
        }
    }
    let t_main = now_us();
    let mut boot = Boot::from_env(BootOptions::new("bench-svc-handoff"))
        .map_err(|e| format!("starting (run me under `handoff run`): {e}"))?;
    let listeners: Vec<std::net::TcpListener> = boot
        .take_listeners()
        .into_iter()
        .map(|l| l.into_tcp())
        .collect();
    if listeners.is_empty() {
        return Err("no listeners were passed (run me under `handoff run --listen ...`)".into());
    }
    let t_booted = now_us();
    // Warm-up before Begin: the runtime and the listeners' registration with it.
    let rt = handoff_bench::service_runtime().map_err(|e| format!("runtime: {e}"))?;
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
    let t_warm = now_us();
    let t = Tiny::new();
    let mut listeners = Some(listeners);
    let accept = |listeners: &mut Option<Vec<tokio::net::TcpListener>>| {
        for l in listeners.take().into_iter().flatten() {
            rt.spawn(tiny::accept_loop(l, t.clone()));
        }
    };
    if !after_commit {
        accept(&mut listeners);
    }
    // Aborted, or the supervisor hung up, before Commit: the incumbent serves on. Stop
    // accepting and finish what was accepted early (the supervisor allows `abort_grace`).
    let give_up = |e: String| {
        t.set_draining(true);
        rt.block_on(t.wait_conns_zero(Duration::from_secs(4)));
        e
    };
    let begun = boot
        .begin()
        .map_err(|e| give_up(format!("waiting for Begin: {e}")))?;
    let t_begun = now_us();
    let incumbent = begun
        .ready(|| Ok(()))
        .map_err(|e| give_up(format!("becoming ready: {e}")))?;
    let t_committed = now_us();
    accept(&mut listeners);
    if trace {
        eprintln!(
            "bench-trace pid={} main={t_main} booted={t_booted} warm={t_warm} begun={t_begun} \
             committed={t_committed} accepting={}",
            std::process::id(),
            now_us()
        );
    }
    let mut svc = Svc {
        tiny: t.clone(),
        rt: rt.handle().clone(),
    };
    incumbent
        .serve(&mut svc)
        .map_err(|e| format!("control socket: {e}"))?;
    t.set_draining(true);
    rt.block_on(t.wait_conns_zero(Duration::from_secs(10)));
    rt.shutdown_timeout(Duration::from_millis(100));
    Ok(())
}
