//! `handoff demo`: watch zero-downtime upgrades happen under load, on this machine.
//!
//! Starts `handoff run` with the demo key-value service on a free loopback port, drives
//! HTTP load at it (`handoff_load::blocking::Load`), upgrades it every `--interval` through the
//! admin socket, then reads back every acknowledged write, stops everything it started,
//! checks by pid that nothing is left running, and prints a summary.
//!
//! Exit status: 0 when no request failed, every acknowledged write is intact and every
//! upgrade committed; 1 otherwise (with the reason); 2 on a usage error (clap).

mod procs;
mod report;
mod service;
mod status;
mod sys;
mod upgrades;

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use handoff_load::blocking::{verify_acked_with, Load};
use nix::sys::signal::{SigSet, Signal};

use procs::Proc;
use service::{Scratch, SupervisorProc};
use status::{Snapshot, StatusLine};
use upgrades::{Outcome, UpgradeNote, Upgrader};

pub const ABOUT: &str =
    "Watch it work: run the demo service under HTTP load and upgrade it every few seconds";

pub const LONG_ABOUT: &str = "\
Watch zero-downtime upgrades happen, on this machine, in about 20 seconds.

`handoff demo` starts the supervisor (`handoff run`) with the demo key-value service \
(`handoff-demo`) on a free loopback port, runs HTTP load against it, and upgrades the \
service every --interval through the supervisor's admin socket, exactly as `handoff \
upgrade` does: a new process is started, the old one drains and seals its state, and the \
new one takes over. At the end it reads back every write the service acknowledged, stops \
the supervisor, checks that no process it started is still running, removes its \
temporary directory and prints a summary.

The load: half of the --clients reuse keep-alive connections, half open a fresh \
connection per request, all as fast as they can. Each one PUTs unique values (of varied \
sizes, with arbitrary bytes, some of 40 KiB) and GETs values it wrote earlier, checking \
every byte.";

pub const AFTER_HELP: &str = "\
WHAT THE NUMBERS MEAN:
  requests        successful requests (and how many per second, recently)
  errors          failed requests, by kind:
                    refused              connect() refused: nothing was listening
                    reset                the connection was reset
                    eof before response  closed before any response byte, on a fresh connection
                    eof mid-response     the response was cut short
                    timeout              no answer within 10 s
                    bad status           an unexpected HTTP status
                    mismatch             wrong bytes, or 404 for an acknowledged write
                    lost at read-back    acknowledged writes missing or wrong at the end
  stale retries   a keep-alive connection the server closed while idle (it does so to
                  retire the old process) is retried once on a new connection, as HTTP
                  clients do (RFC 9112 §9.3.1): counted, but not an error
  upgrades        committed / attempted
  last handoff    from the upgrade request to Commit, and the supervisor's phases (ms):
                    negotiating     reach the old process, start the new one, greet both
                    draining        the old process stops accepting, finishes what it has
                    sealing         the old process makes its state durable, lets go of it
                    awaiting-ready  the new process takes the state and passes its health check
                    committed       both are told; the new process serves, the old one retires
  handoff time    min / median / p99 / max over the committed upgrades

While the old process stops accepting and the new one starts, new connections wait in \
the kernel's accept queue: they see a little latency, never an error.

EXIT STATUS:
  0 no request failed, every acknowledged write read back intact, every upgrade committed
  1 otherwise (the reason is printed)
  2 a usage error
Ctrl-C stops early, cleans up and prints the summary.

EXAMPLES:
  cargo build --release --workspace && target/release/handoff demo
  handoff demo --duration 1m --interval 500ms --clients 8
  handoff demo --upgrades 3";

#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Clients generating load: half keep-alive, half a fresh connection per request.
    #[arg(long, value_name = "N", default_value_t = 4,
          value_parser = clap::value_parser!(u32).range(1..=256))]
    pub clients: u32,
    /// Time between upgrades (e.g. 500ms, 2s).
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = parse_positive)]
    pub interval: Duration,
    /// Stop after this long.
    #[arg(long, value_name = "DURATION", default_value = "20s", value_parser = parse_positive)]
    pub duration: Duration,
    /// Stop after this many upgrades, if that comes before --duration.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub upgrades: Option<u64>,
    /// The service to run and upgrade [default: `handoff-demo` next to this binary, else
    /// on PATH]. It must speak the demo's HTTP API.
    #[arg(long, value_name = "PATH")]
    pub service: Option<PathBuf>,
}

fn parse_positive(s: &str) -> Result<Duration, String> {
    let d = crate::duration::parse(s)?;
    if d < Duration::from_millis(10) {
        return Err(format!("{s:?} is too short (at least 10ms)"));
    }
    Ok(d)
}

pub fn main(a: DemoArgs) -> ExitCode {
    match run(a) {
        Ok(None) => ExitCode::SUCCESS,
        Ok(Some(why)) => {
            eprintln!("handoff demo: FAIL: {why}");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("handoff demo: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// The signal that asked us to stop (0: none yet).
#[derive(Clone)]
struct Interrupt(Arc<AtomicI32>);

impl Interrupt {
    /// Blocks SIGINT, SIGTERM and SIGHUP in this thread, so that every thread started
    /// later inherits the mask, and receives them on a thread of their own. Must run before
    /// any other thread is started. (Children get a clean mask: std resets it at exec.)
    fn install() -> Result<Interrupt> {
        let mut set = SigSet::empty();
        for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
            set.add(s);
        }
        set.thread_block().context("blocking signals")?;
        let got = Interrupt(Arc::new(AtomicI32::new(0)));
        let g = got.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                let clear = if std::io::stderr().is_terminal() {
                    "\r\x1b[2K"
                } else {
                    ""
                };
                while let Ok(sig) = set.wait() {
                    if g.0.swap(sig as i32, Ordering::Relaxed) != 0 {
                        eprintln!(
                            "{clear}handoff demo: {sig}: still cleaning up (every step is bounded)"
                        );
                    }
                }
            })
            .context("starting the signal thread")?;
        Ok(got)
    }

    fn signal(&self) -> Option<Signal> {
        Signal::try_from(self.0.load(Ordering::Relaxed)).ok()
    }
}

/// Runs the demo; `Ok(Some(reason))` when it ran to the end but something failed.
fn run(a: DemoArgs) -> Result<Option<String>> {
    let interrupt = Interrupt::install()?;
    procs::become_subreaper();
    let service = service::find_service(a.service.as_deref())?;
    let handoff = std::env::current_exe().context("finding this executable's path")?;
    let scratch = Scratch::create().context("creating a temporary directory")?;
    let mut sup = SupervisorProc::start(&handoff, &service, &scratch)
        .context("starting the supervisor (`handoff run`)")?;
    let mut service_procs = vec![Proc::identify(sup.first_pid)];

    let clients = a.clients as usize;
    let (keepalive, fresh) = (clients.div_ceil(2), clients / 2);
    eprintln!(
        "handoff demo: supervisor pid {} serving http://{} with {} pid {}",
        sup.pid,
        sup.addr,
        service.display(),
        sup.first_pid
    );
    eprintln!(
        "  load: {keepalive} keep-alive + {fresh} fresh-connection clients; an upgrade every {:?}, \
         for {:?}{} (Ctrl-C stops early)",
        a.interval,
        a.duration,
        a.upgrades
            .map(|n| format!(" or {n} upgrades"))
            .unwrap_or_default()
    );

    let load = Load::start(sup.addr, keepalive, fresh).context("starting the load")?;
    let t0 = Instant::now();
    let end = t0 + a.duration;
    // The last upgrade leaves the load some time to show the new process serving.
    let tail = (a.interval / 2).min(Duration::from_secs(1));
    let (notes_tx, notes) = mpsc::channel();
    let upgrader = Upgrader::spawn(
        scratch.runtime.clone(),
        t0,
        a.interval,
        a.upgrades,
        end.checked_sub(tail).unwrap_or(t0),
        notes_tx,
    )
    .context("starting the upgrade thread")?;

    let mut status = StatusLine::new();
    let mut records = Vec::new();
    let mut problems = Vec::new();
    let mut next_draw = Instant::now();
    let on_record = |rec: upgrades::UpgradeRecord,
                     status: &mut StatusLine,
                     records: &mut Vec<upgrades::UpgradeRecord>,
                     service_procs: &mut Vec<Proc>,
                     load: &Load| {
        if let Outcome::Committed {
            new_pid, warnings, ..
        } = &rec.outcome
        {
            service_procs.push(Proc::identify(*new_pid));
            for w in warnings {
                status.print(&format!("  upgrade {}: warning: {w}", rec.number));
            }
        }
        let snap = load.snapshot();
        records.push(rec);
        if let Some(rec) = records.last() {
            let s = Snapshot {
                elapsed: t0.elapsed(),
                ok: snap.ok,
                errors: snap.failure_count(),
                upgrades: records,
            };
            status.upgrade_done(&s, rec);
        }
    };
    let ended_by = loop {
        let now = Instant::now();
        let wake = next_draw.min(end).saturating_duration_since(now);
        match notes.recv_timeout(wake) {
            Ok(UpgradeNote::Done(rec)) => {
                on_record(rec, &mut status, &mut records, &mut service_procs, &load)
            }
            Ok(UpgradeNote::LimitReached) => {
                // Let the load see the last new process serve for a moment.
                load.wait_for_ok(200, tail);
                break format!("{} upgrades done", records.len());
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                problems.push("the upgrade thread stopped unexpectedly".to_owned());
                break "the upgrade thread stopped".to_owned();
            }
        }
        if let Some(sig) = interrupt.signal() {
            break format!("interrupted by {sig}");
        }
        if Instant::now() >= end {
            break format!("--duration {:?} reached", a.duration);
        }
        if let Some(st) = sup.exited() {
            problems.push(format!("the supervisor exited while the demo ran ({st})"));
            break "the supervisor exited".to_owned();
        }
        if Instant::now() >= next_draw {
            let snap = load.snapshot();
            status.tick(&Snapshot {
                elapsed: t0.elapsed(),
                ok: snap.ok,
                errors: snap.failure_count(),
                upgrades: &records,
            });
            next_draw = Instant::now() + status::REDRAW;
        }
    };

    // Stop in order: upgrades (the one in flight finishes under load), then the load.
    status.clear();
    if interrupt.signal().is_some() {
        eprintln!("handoff demo: {ended_by}: stopping the load and cleaning up");
    }
    if !upgrader.stop() {
        problems.push("the upgrade thread panicked".to_owned());
    }
    while let Ok(note) = notes.try_recv() {
        if let UpgradeNote::Done(rec) = note {
            on_record(rec, &mut status, &mut records, &mut service_procs, &load);
        }
    }
    let elapsed = t0.elapsed();
    let mut report = load.stop();
    let acked = std::mem::take(&mut report.acked);
    eprintln!(
        "handoff demo: reading back {} acknowledged writes",
        report::thousands(acked.len() as u64)
    );
    let verify = verify_acked_with(sup.addr, &acked, clients.clamp(2, 8), 3);
    drop(acked);

    // Stop the supervisor (it stops its service), then prove by pid that nothing remains.
    let supervisor_pid = sup.pid;
    for pid in procs::descendants(sup.pid) {
        if !service_procs.iter().any(|p| p.pid == pid) {
            service_procs.push(Proc::identify(pid));
        }
    }
    let was_running = sup.exited().is_none();
    let stopped = sup.stop(Duration::from_secs(10));
    let supervisor_log = sup.log_tail(20);
    if stopped.killed {
        problems.push("the supervisor did not stop within 10 s of SIGTERM (killed)".into());
    } else if let Some(st) = stopped.status.filter(|s| was_running && !s.success()) {
        problems.push(format!("the supervisor exited with {st} on SIGTERM"));
    }
    drop(sup);
    // With `become_subreaper`, processes the supervisor left behind are now our children.
    for pid in procs::orphans(None) {
        if !service_procs.iter().any(|p| p.pid == pid) {
            service_procs.push(Proc::identify(pid));
        }
    }
    let left = procs::wait_gone(&service_procs, Duration::from_secs(5));
    for p in &left {
        p.kill();
    }
    let still = procs::wait_gone(&left, Duration::from_secs(2));
    if !still.is_empty() {
        let pids: Vec<u32> = still.iter().map(|p| p.pid).collect();
        problems.push(format!("could not kill processes {pids:?}"));
    }
    let root = scratch.root.clone();
    if let Err(e) = scratch.remove() {
        problems.push(format!(
            "removing the temporary directory {}: {e:#}",
            root.display()
        ));
    }

    let mut service_pids: Vec<u32> = service_procs.iter().map(|p| p.pid).collect();
    service_pids.sort_unstable();
    service_pids.dedup();
    let facts = report::Facts {
        elapsed,
        ended_by,
        keepalive_clients: keepalive,
        fresh_clients: fresh,
        load: &report,
        verify: &verify,
        upgrades: &records,
        supervisor_pid,
        service_pids,
        left_running: left.iter().map(|p| p.pid).collect(),
        problems,
        supervisor_log,
    };
    let mut out = std::io::stdout().lock();
    // A closed stdout (`| head`) must not turn a clean run into a panic.
    let _ = out.write_all(facts.render().as_bytes());
    let _ = out.flush();
    Ok(facts.failure())
}
