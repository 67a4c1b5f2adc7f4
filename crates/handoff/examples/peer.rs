//! A service process for the library's integration tests: well-behaved by
//! default, or misbehaving in one precise way so the supervisor's typed
//! errors can be checked against a real spawned process.
//!
//! `peer MODE [TAG]` — TAG is ignored; tests use it to find their processes.
//! Modes: good, wrong-role, wrong-pid, garbage, silent, no-common-version,
//! ready-wrong-id, ready-no-build-id, unhealthy.
//!
//! In `good` mode: `PEER_RECOVERY_MS` (see `BootOptions::recovery_wait`),
//! `PEER_PROTO_MAX` (speak only up to this protocol version, as an older
//! build does), `PEER_DRAIN_MS` (a drain that takes this long),
//! `PEER_DRAIN_FAILS=1` (a drain that fails), `PEER_FILL_FDS=PATH` (once
//! serving, use up every descriptor until the file PATH exists; warnings
//! and errors of the library are then written to stderr).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use handoff::channel::Channel;
use handoff::protocol::{Hello, Message, Role, PROTO_MAX, PROTO_MIN};
use handoff::{Boot, BootOptions, DrainReport, Drainable, ServiceError};

struct Idle {
    drain_for: Duration,
    drain_fails: bool,
}

impl Drainable for Idle {
    fn drain(&mut self, _: Duration) -> Result<DrainReport, ServiceError> {
        std::thread::sleep(self.drain_for);
        if self.drain_fails {
            return Err("peer's drain fails".into());
        }
        Ok(DrainReport {
            open_conns_remaining: 0,
            accept_closed: true,
        })
    }
    fn seal(&mut self, _: &mut dyn FnMut(u64, u64)) -> Result<Option<Vec<u8>>, ServiceError> {
        Ok(None)
    }
    fn resume(&mut self) -> Result<(), ServiceError> {
        Ok(())
    }
}

fn hello(role: Role, pid: u32, min: u16, max: u16) -> Message {
    Message::Hello(Hello {
        role,
        pid,
        proto_min: min,
        proto_max: max,
        build_id: "peer".into(),
    })
}

/// A successor's greeting by hand, up to Begin: returns the handoff id
/// (exits 1 on anything else).
fn greet_until_begin(chan: &mut Channel, pid: u32) -> u64 {
    chan.send_with_credentials(&hello(Role::Successor, pid, PROTO_MIN, PROTO_MAX))
        .unwrap();
    let Ok(Message::HelloAck { version }) = chan.recv(None) else {
        std::process::exit(1)
    };
    chan.set_version(version);
    let Ok(Message::Begin { handoff_id, .. }) = chan.recv(None) else {
        std::process::exit(1)
    };
    handoff_id
}

fn park() -> ! {
    loop {
        std::thread::park();
    }
}

/// Lowers `RLIMIT_NOFILE` to 64 and opens `/dev/null` until none is left,
/// so the control socket's accept fails with EMFILE, until the file
/// `release` exists. Says `filled N` on stdout once full.
fn fill_fds(release: PathBuf) {
    use nix::sys::resource::{setrlimit, Resource};
    let _ = tracing::subscriber::set_global_default(Stderr);
    if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, 64, 64) {
        eprintln!("peer: setrlimit: {e}");
        std::process::exit(1);
    }
    let mut held = vec![];
    while let Ok(f) = std::fs::File::open("/dev/null") {
        held.push(f);
    }
    println!("filled {}", held.len());
    let _ = std::io::stdout().flush();
    std::thread::spawn(move || {
        // stat(2) needs no descriptor: poll for the release, bounded so a
        // test that died never leaves the descriptors held for good.
        let end = std::time::Instant::now() + Duration::from_secs(120);
        while !release.exists() && std::time::Instant::now() < end {
            std::thread::sleep(Duration::from_millis(10));
        }
        drop(held);
    });
}

/// Writes warnings and errors to stderr, one line each (no subscriber
/// crate here: the library depends only on `tracing`).
struct Stderr;

struct Line(String);

impl tracing::field::Visit for Line {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        use std::fmt::Write as _;
        let _ = write!(self.0, "{}={:?} ", field.name(), value);
    }
}

impl tracing::Subscriber for Stderr {
    fn enabled(&self, m: &tracing::Metadata<'_>) -> bool {
        *m.level() <= tracing::Level::WARN
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, e: &tracing::Event<'_>) {
        let mut line = Line(String::new());
        e.record(&mut line);
        eprintln!("peer: {} {}", e.metadata().level(), line.0);
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

fn main() {
    let mode = std::env::args().nth(1).unwrap_or_else(|| "good".into());
    let pid = std::process::id();
    match mode.as_str() {
        "good" | "unhealthy" => {
            let unhealthy = mode == "unhealthy";
            let mut opts = BootOptions::new("peer");
            if let Some(ms) = std::env::var("PEER_RECOVERY_MS")
                .ok()
                .and_then(|v| v.parse().ok())
            {
                opts.recovery_wait = Duration::from_millis(ms);
            }
            if let Some(max) = std::env::var("PEER_PROTO_MAX")
                .ok()
                .and_then(|v| v.parse().ok())
            {
                opts.versions.max = max;
            }
            let mut idle = Idle {
                drain_for: Duration::from_millis(
                    std::env::var("PEER_DRAIN_MS")
                        .ok()
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0),
                ),
                drain_fails: std::env::var("PEER_DRAIN_FAILS").is_ok_and(|v| v == "1"),
            };
            let r = Boot::from_env(opts)
                .and_then(|b| b.begin())
                .and_then(|b| {
                    b.ready(move || {
                        if unhealthy {
                            Err("peer says no".into())
                        } else {
                            Ok(())
                        }
                    })
                })
                .and_then(|inc| {
                    if let Ok(release) = std::env::var("PEER_FILL_FDS") {
                        fill_fds(PathBuf::from(release));
                    }
                    inc.serve(&mut idle)
                });
            match r {
                Ok(retired) => {
                    // Whether a new process could take over the state
                    // while this one finishes what is open.
                    let held = std::env::var_os("HANDOFF_STATE_DIR")
                        .and_then(|d| handoff::StateLock::is_held(Path::new(&d)).ok());
                    println!("retired: {retired:?}; state lock held: {held:?}")
                }
                Err(e) => {
                    eprintln!("peer[{pid}]: {e}");
                    std::process::exit(1);
                }
            }
        }
        other => {
            let stream = handoff::take_control_from_env().expect("control fd");
            let mut chan = Channel::new(stream);
            match other {
                "wrong-role" => chan
                    .send_with_credentials(&hello(Role::Incumbent, pid, PROTO_MIN, PROTO_MAX))
                    .unwrap(),
                "wrong-pid" => chan
                    .send_with_credentials(&hello(Role::Successor, pid + 1, PROTO_MIN, PROTO_MAX))
                    .unwrap(),
                "no-common-version" => chan
                    .send_with_credentials(&hello(Role::Successor, pid, 40, 41))
                    .unwrap(),
                "garbage" => {
                    let _ = chan.stream().write_all(b"GET / HTTP/1.1\r\n\r\n");
                }
                "silent" => {}
                "ready-no-build-id" => {
                    // A non-library successor whose Ready carries no
                    // metadata: its build id is the one its Hello gave.
                    let handoff_id = greet_until_begin(&mut chan, pid);
                    chan.send(&Message::Ready {
                        handoff_id,
                        listening_on: vec![],
                        healthz_ok: true,
                        metadata: vec![],
                    })
                    .unwrap();
                    // Until the supervisor hangs up (the test's end).
                    while chan.recv(None).is_ok() {}
                }
                "ready-wrong-id" => {
                    let handoff_id = greet_until_begin(&mut chan, pid);
                    chan.send(&Message::Ready {
                        handoff_id: handoff_id.wrapping_add(1),
                        listening_on: vec![],
                        healthz_ok: true,
                        metadata: vec![],
                    })
                    .unwrap();
                }
                m => {
                    eprintln!("peer: unknown mode {m}");
                    std::process::exit(2);
                }
            }
            park();
        }
    }
}
