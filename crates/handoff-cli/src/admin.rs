//! The supervisor's admin socket: how `handoff upgrade`, `handoff status`
//! and `handoff stop` talk to `handoff run`.
//!
//! One request frame from the client, then a stream of event frames from the
//! supervisor ending with a final one. Frames are the library's (magic,
//! length cap checked before allocation, crc32c) carrying JSON, so a hostile
//! client can cost us at most a 16-byte read before being refused.

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use handoff::accept::{AcceptBackoff, Verdict};
use handoff::{frame, HandoffError, Report};
use handoff_demo::counters::Counters;
use serde::{Deserialize, Serialize};

use crate::progress::{ms, Activity, InFlight};
use crate::stop_report::StopReport;

/// File name of the admin socket inside the runtime dir.
pub const ADMIN_SOCK: &str = "admin.sock";
/// File name of the incumbent's control socket inside the runtime dir.
pub const CONTROL_SOCK: &str = "control.sock";

pub fn admin_path(runtime_dir: &Path) -> PathBuf {
    runtime_dir.join(ADMIN_SOCK)
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    Upgrade {
        binary: Option<PathBuf>,
        deadline_ms: Option<u64>,
        drain_grace_ms: Option<u64>,
        /// Wait this long for a handoff in flight to end instead of
        /// refusing with "in progress".
        #[serde(default)]
        wait_ms: Option<u64>,
    },
    /// Start the successor for the next upgrade now and hold it
    /// (`handoff upgrade --prepare`); the next upgrade of the same binary
    /// uses it.
    Prepare {
        binary: Option<PathBuf>,
    },
    /// Stop the successor held for the next upgrade
    /// (`handoff upgrade --discard-prepared`).
    Discard,
    Status,
    /// Stop the service and the supervisor; `grace_ms` defaults to the
    /// supervisor's drain grace.
    Stop {
        #[serde(default)]
        grace_ms: Option<u64>,
    },
}

// One event per frame, built and sent at once: its size in memory is of
// no consequence, boxing the status would only add noise.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum Event {
    Phase {
        phase: String,
        took_ms: f64,
    },
    Committed {
        handoff_id: String,
        old_pid: Option<u32>,
        new_pid: u32,
        build_id: String,
        total_ms: f64,
        warnings: Vec<String>,
        /// The handoff used a successor prepared ahead, held this long.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        prepared_for_ms: Option<f64>,
        /// Live connections handed to the new process (their clients did
        /// not reconnect); absent when a process speaks protocol version 2
        /// or older, or in notify mode: the drain closed them all.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        connections_moved: Option<u64>,
        /// Connections the drain closed instead of moving (HTTP/2, ...).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        connections_closed: Option<u64>,
    },
    /// `handoff upgrade --prepare`: the successor started, said Hello and
    /// is held for the next upgrade.
    Prepared {
        handoff_id: String,
        pid: u32,
        build_id: String,
        took_ms: f64,
    },
    /// `handoff upgrade --discard-prepared`: the held successor (if any)
    /// was told to stop.
    Discarded {
        pid: Option<u32>,
    },
    Aborted {
        handoff_id: Option<String>,
        phase: Option<String>,
        reason: String,
    },
    Status {
        supervisor_pid: u32,
        incumbent_pid: Option<u32>,
        build_id: String,
        listeners: Vec<String>,
        retiring_pids: Vec<u32>,
        /// The service's live counters, read by the supervisor straight
        /// from the shared region in the state dir (see
        /// `handoff_demo::counters`); absent when the service keeps none.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        service_counters: Option<Counters>,
        /// Why the region exists but could not be read.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        service_counters_error: Option<String>,
        /// Uptimes, handoff counts, the last handoff, the one in flight.
        #[serde(flatten)]
        activity: Activity,
    },
    /// `upgrade --wait`: another handoff holds the slot; ours runs after it.
    Waiting {
        /// What runs (absent when it is a crash restart).
        in_flight: Option<InFlight>,
        wait_ms: u64,
    },
    /// A stop was accepted: no new upgrades from now on.
    Stopping {
        supervisor_pid: u32,
        incumbent_pid: Option<u32>,
        grace_ms: f64,
        /// The handoff the stop waits for first, if any.
        in_flight: Option<InFlight>,
    },
    /// The service is stopped; the supervisor exits right after this.
    Stopped(StopReport),
    /// The request itself failed (bad request, handoff already running…).
    Error {
        message: String,
    },
}

/// The final event for a handoff attempt, logged on the supervisor's
/// stderr too (a committed or aborted one; "in progress" and "no
/// incumbent" are refusals, answered as errors).
pub fn outcome_event(r: &Result<Report, HandoffError>) -> Event {
    match r {
        Ok(r) => {
            eprintln!(
                "handoff run: upgrade {:#018x} committed: pid {} -> {} in {:.2} ms",
                r.handoff_id,
                r.old_pid.unwrap_or(0),
                r.new_pid,
                ms(r.total)
            );
            Event::Committed {
                handoff_id: format!("{:#018x}", r.handoff_id),
                old_pid: r.old_pid,
                new_pid: r.new_pid,
                build_id: r.new_build_id.clone(),
                total_ms: ms(r.total),
                warnings: r.warnings.clone(),
                prepared_for_ms: r.prepared_for.map(ms),
                connections_moved: r.connections.map(|c| c.moved),
                connections_closed: r.connections.map(|c| c.closed),
            }
        }
        Err(e @ (HandoffError::InProgress | HandoffError::NoIncumbent)) => Event::Error {
            message: e.to_string(),
        },
        Err(e) => {
            eprintln!("handoff run: upgrade failed: {e}");
            let (id, phase) = match e {
                HandoffError::Aborted {
                    handoff_id, phase, ..
                } => (
                    Some(format!("{handoff_id:#018x}")),
                    Some(phase.name().to_string()),
                ),
                _ => (None, None),
            };
            Event::Aborted {
                handoff_id: id,
                phase,
                reason: e.to_string(),
            }
        }
    }
}

/// How long an admin client has to send its whole request, however it
/// splits it: a bound on each read instead let a client trickling a byte
/// every 4 s hold its connection (and its slot under [`MAX_CONNS`]) for
/// 132 s. Real clients send the request in one write as soon as they
/// are connected.
pub const REQUEST_BUDGET: Duration = Duration::from_secs(5);

/// Most admin connections served at once. Each has a thread; a client
/// past the cap is told so and closed instead of getting one (3,000 silent
/// connections used to make 3,006 threads). Real clients hold one each
/// (`upgrade --wait` for as long as it waits), so this is far above need.
pub const MAX_CONNS: usize = 32;

/// Serves the admin socket until it fails: every connection is checked
/// with `SO_PEERCRED` (our own uid or root only; the socket's 0600 mode is
/// the first fence, this the second), gets its own thread (at most
/// [`MAX_CONNS`] at once), and must send its whole request within
/// [`REQUEST_BUDGET`] — a client that connects and says nothing, trickles
/// its request or sends garbage, costs one short-lived thread and is told
/// why. `handle` then owns the conversation.
///
/// A failed accept (out of descriptors, say) is retried after a growing
/// pause and logged at most every few seconds, with a count of the
/// failures not logged: retrying at once spins, the pending connection
/// staying in the backlog. Only a socket that is itself unusable ends it —
/// quietly when `replaced` is set: the runtime dir was deleted, a new admin
/// socket serves in its place and this one was shut down (see `keeper.rs`).
pub fn serve_until<H>(listener: UnixListener, replaced: &AtomicBool, handle: Arc<H>)
where
    H: Fn(UnixStream, Request) + Send + Sync + 'static,
{
    let ours = nix::unistd::geteuid().as_raw();
    let open = Arc::new(AtomicUsize::new(0));
    let mut backoff = AcceptBackoff::new();
    for conn in listener.incoming() {
        let stream = match conn {
            Ok(s) => {
                if let Some(unsaid) = backoff.succeeded() {
                    eprintln!(
                        "handoff run: admin accept: accepting again ({unsaid} failures not shown)"
                    );
                }
                s
            }
            Err(e) => match backoff.failed(&e) {
                Verdict::Retry { say, suppressed } => {
                    if say {
                        let more = if suppressed > 0 {
                            format!(" ({suppressed} more since the last report)")
                        } else {
                            String::new()
                        };
                        eprintln!("handoff run: admin accept: {e}{more}; retrying with backoff");
                    }
                    continue;
                }
                Verdict::Fatal => {
                    if !replaced.load(Ordering::SeqCst) {
                        eprintln!(
                            "handoff run: admin accept: {e}: the admin socket is unusable; \
                             no more admin requests (SIGHUP still upgrades, SIGTERM stops)"
                        );
                    }
                    return;
                }
            },
        };
        // A refusal is one small frame into an empty socket buffer; the
        // timeout only guards against the impossible.
        let refuse = |message: String| {
            let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
            let _ = send(&stream, &Event::Error { message });
        };
        match handoff::peer_credentials(&stream) {
            Ok(c) if c.uid == ours || c.uid == 0 => {}
            Ok(c) => {
                refuse(format!(
                    "uid {} may not control this supervisor (owner uid {ours})",
                    c.uid
                ));
                continue;
            }
            Err(_) => continue,
        }
        let Some(slot) = Slot::take(&open) else {
            refuse(format!(
                "too many admin connections ({MAX_CONNS} open); try again when one ends"
            ));
            continue;
        };
        let handle = handle.clone();
        let spawned = std::thread::Builder::new()
            .name("admin-conn".into())
            .spawn(move || {
                let _slot = slot;
                let req = match read_request(&stream) {
                    Ok(r) => r,
                    Err(message) => {
                        // Said to a client that may not be reading: one
                        // small frame, and a bound should it never drain.
                        let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
                        let _ = send(&stream, &Event::Error { message });
                        return;
                    }
                };
                handle(stream, req)
            });
        if let Err(e) = spawned {
            eprintln!("handoff run: admin connection dropped: cannot start a thread for it: {e}");
        }
    }
}

/// Reads a client's request, which must arrive whole within
/// [`REQUEST_BUDGET`]; the error is what the client is told.
fn read_request(s: &UnixStream) -> Result<Request, String> {
    let f = handoff::channel::read_frame_within(s, REQUEST_BUDGET).map_err(|e| match e {
        frame::FrameError::TimedOut { waited_ms } => format!(
            "bad request: not received whole within {} s (waited {waited_ms} ms)",
            REQUEST_BUDGET.as_secs()
        ),
        e => format!("bad request: {e}"),
    })?;
    serde_json::from_slice(&f.payload).map_err(|e| format!("bad request: bad admin message: {e}"))
}

/// One of the [`MAX_CONNS`] admin connection slots, given back on drop.
struct Slot(Arc<AtomicUsize>);

impl Slot {
    fn take(open: &Arc<AtomicUsize>) -> Option<Slot> {
        open.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
            (n < MAX_CONNS).then_some(n + 1)
        })
        .ok()
        .map(|_| Slot(open.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Connects to the supervisor's admin socket in `runtime_dir`; the error
/// says where we looked and what is probably wrong.
///
/// The socket is believed only if the kernel says (`SO_PEERCRED`) that the
/// process listening on it runs as our uid or root: whoever could write the
/// runtime dir could have put their own `admin.sock` there and answered
/// `committed: pid 1 -> 31337` to an upgrade that never happened.
pub fn connect(runtime_dir: &Path) -> Result<UnixStream, String> {
    connect_within(runtime_dir, None)
}

/// [`connect`], waiting up to `wait` for a supervisor that is still
/// starting: its admin socket is bound only after its first process is up,
/// and a stateless service answers on its port before that, so a script
/// that starts `handoff run` and waits for the port can be early.
pub fn connect_within(runtime_dir: &Path, wait: Option<Duration>) -> Result<UnixStream, String> {
    let path = admin_path(runtime_dir);
    let end = wait.map(|w| std::time::Instant::now() + w);
    let connected = loop {
        match UnixStream::connect(&path) {
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) && end.is_some_and(|end| std::time::Instant::now() < end) =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            r => break r,
        }
    };
    let stream = connected.map_err(|e| {
        format!(
            "cannot reach the supervisor at {}: {e}\n  is `handoff run --runtime-dir {}` running?",
            path.display(),
            runtime_dir.display()
        )
    })?;
    let ours = nix::unistd::geteuid().as_raw();
    match handoff::peer_credentials(&stream) {
        Ok(c) if c.uid == ours || c.uid == 0 => Ok(stream),
        Ok(c) => Err(format!(
            "refusing to talk to {}: it is served by uid {}{}, not by uid {ours} (ours) or root, \
             so it is not our supervisor (another user may have planted it)\n  \
             fix: make {} a directory only its owner can write (`handoff run` creates it mode 0700), \
             remove what is in it and restart `handoff run`",
            path.display(),
            c.uid,
            c.pid.map(|p| format!(" (pid {p})")).unwrap_or_default(),
            runtime_dir.display()
        )),
        Err(e) => Err(format!(
            "cannot tell who serves {}: {e}; refusing to trust it",
            path.display()
        )),
    }
}

pub fn send<T: Serialize>(mut s: &UnixStream, msg: &T) -> std::io::Result<()> {
    let json = serde_json::to_vec(msg).map_err(std::io::Error::other)?;
    let bytes = frame::encode(1, &json).map_err(std::io::Error::other)?;
    s.write_all(&bytes)
}

/// Reads one admin message, which must arrive whole within `timeout`
/// (`None`: however long it takes) — not within `timeout` per read, which
/// a peer sending a byte at a time could stretch without end.
pub fn recv<T: for<'de> Deserialize<'de>>(
    mut s: &UnixStream,
    timeout: Option<Duration>,
) -> Result<T, String> {
    let f = match timeout {
        Some(d) => handoff::channel::read_frame_within(s, d),
        None => s
            .set_read_timeout(None)
            .map_err(frame::FrameError::Io)
            .and_then(|()| frame::read_frame(&mut s)),
    }
    .map_err(|e| e.to_string())?;
    serde_json::from_slice(&f.payload).map_err(|e| format!("bad admin message: {e}"))
}
