//! The `/metrics` endpoint: a deliberately small HTTP/1.0-style responder
//! on a std `TcpListener` — one request per connection, only its request
//! line read, no HTTP server stack the supervisor otherwise does not need —
//! open to whoever can reach the address, so no client may hold it: each
//! connection gets a thread of its own (at most [`MAX_SCRAPES`] at once, the
//! rest answered 503), its request head must arrive whole within
//! [`HEAD_BUDGET`] (408 otherwise) and fit in [`MAX_HEAD`] bytes (431
//! otherwise).
//!
//! Across `handoff upgrade --supervisor` the listening socket is carried
//! through the `exec`; [`Gate::quiesce`] first stops accepting and lets
//! the answers in progress finish, so no scrape is cut by the `exec` — those
//! arriving meanwhile wait in the backlog for the new program.

use handoff::accept::{AcceptBackoff, Verdict};
use prometheus::TEXT_FORMAT;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// What a scrape is answered with: the exposition text, rendered afresh.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// Most connections served at once. A scraper uses one at a time; more
/// than a few at once is a misbehaving or hostile client, answered 503 at
/// once rather than given a thread each.
pub const MAX_SCRAPES: usize = 8;
/// How long a client has to send its whole request head, however it
/// splits it. A scraper sends it in one write on connecting.
pub const HEAD_BUDGET: Duration = Duration::from_secs(2);
/// Largest request head read; a longer one is answered 431.
pub const MAX_HEAD: usize = 8192;
/// Bound on writing an answer to a client that does not read it.
const WRITE_BUDGET: Duration = Duration::from_secs(2);

/// The endpoint: `render` served on `listener` from a background thread,
/// its accept loop behind `gate`.
#[derive(Clone)]
struct Endpoint {
    gate: Arc<Gate>,
    render: Render,
}

/// Serves `render` as `/metrics` on `listener` from a background thread;
/// returns the bound address. Each connection is answered on a thread of
/// its own, at most [`MAX_SCRAPES`] at once.
pub fn serve(
    listener: TcpListener,
    gate: Arc<Gate>,
    render: Render,
) -> std::io::Result<SocketAddr> {
    let local = listener.local_addr()?;
    gate.lock().serving = true;
    let me = Endpoint { gate, render };
    std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || {
                // EMFILE and the like: keep going after a growing pause
                // (retrying at once spins), logging at most every few
                // seconds; stop only if the socket itself is unusable.
                let mut backoff = AcceptBackoff::new();
                loop {
                    me.gate.hold_while_paused();
                    // Accept only what is there, so a pause is noticed
                    // within POLL_EVERY even with no client at all.
                    if !readable(&listener, POLL_EVERY) {
                        continue;
                    }
                    match listener.accept().map(|(s, _)| s) {
                        Ok(s) => {
                            if let Some(unsaid) = backoff.succeeded() {
                                tracing::info!(target: "handoff::metrics", unsaid, "accepting again");
                            }
                            me.dispatch(s)
                        }
                        Err(e) => match backoff.failed(&e) {
                            Verdict::Retry { say, suppressed } => {
                                if say {
                                    tracing::warn!(target: "handoff::metrics", error = %e, suppressed, "accept failed; retrying with backoff");
                                }
                            }
                            Verdict::Fatal => {
                                tracing::error!(target: "handoff::metrics", error = %e, "accept failed; the metrics endpoint stops");
                                return;
                            }
                        },
                    }
                }
            })?;
    Ok(local)
}

impl Endpoint {
    /// Gives `s` a thread and one of the [`MAX_SCRAPES`] slots, or answers
    /// 503 at once when they are all taken (a short answer into a fresh
    /// connection's empty buffer: it does not block this accept loop).
    fn dispatch(&self, s: TcpStream) {
        let taken = self
            .gate
            .open
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < MAX_SCRAPES).then_some(n + 1)
            });
        if taken.is_err() {
            let _ = s.set_write_timeout(Some(Duration::from_millis(100)));
            reply(
                &s,
                "503 Service Unavailable",
                format!("{MAX_SCRAPES} scrapes in progress; try again\n"),
            );
            return;
        }
        let slot = Slot(self.gate.clone());
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name("metrics-conn".into())
            .spawn(move || {
                let _slot = slot;
                me.answer(s)
            });
        if let Err(e) = spawned {
            tracing::warn!(target: "handoff::metrics", error = %e, "connection dropped: cannot start a thread for it");
        }
    }

    fn answer(&self, s: TcpStream) {
        let _ = s.set_write_timeout(Some(WRITE_BUDGET));
        let head = match read_head(&s, Instant::now() + HEAD_BUDGET) {
            Head::Complete(h) | Head::Ended(h) => h,
            Head::TimedOut => {
                return reply(
                    &s,
                    "408 Request Timeout",
                    format!(
                        "the request head must arrive within {} s\n",
                        HEAD_BUDGET.as_secs()
                    ),
                )
            }
            Head::TooLarge => {
                return reply(
                    &s,
                    "431 Request Header Fields Too Large",
                    format!("the request head may be at most {MAX_HEAD} bytes\n"),
                )
            }
            Head::Failed => return,
        };
        let line = head.split(|&b| b == b'\n').next().unwrap_or(&[]);
        let line = String::from_utf8_lossy(line);
        let mut parts = line.split_whitespace();
        let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        match (method, path.split('?').next().unwrap_or("")) {
            ("GET", "/metrics") => reply_typed(&s, "200 OK", TEXT_FORMAT, (self.render)()),
            ("GET", _) => reply(&s, "404 Not Found", "try /metrics\n".to_string()),
            _ => reply(&s, "405 Method Not Allowed", "only GET\n".to_string()),
        }
    }
}

/// One of the [`MAX_SCRAPES`] connection slots, given back on drop.
struct Slot(Arc<Gate>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// How often the accept loop looks at the pause flag when nobody connects.
const POLL_EVERY: Duration = Duration::from_millis(50);

/// Whether `listener` has a connection to accept within `within` (false on
/// a timeout or an interrupted wait: the caller loops).
fn readable(listener: &TcpListener, within: Duration) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let timeout = PollTimeout::try_from(within).unwrap_or(PollTimeout::MAX);
    let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
    // An error here (EINTR, ENOMEM) is retried by the loop; accept itself
    // reports what is wrong with the socket.
    poll(&mut fds, timeout).is_ok_and(|n| n > 0)
}

/// The endpoint's accept loop and answers in progress, as a `--supervisor`
/// re-exec must see them: it asks the loop to stop accepting and waits for
/// the answers to finish (see [`Metrics::quiesce`](super::Metrics::quiesce)).
#[derive(Debug, Default)]
pub struct Gate {
    state: Mutex<GateState>,
    changed: Condvar,
    /// Connections being answered (each holds a [`Slot`]).
    open: AtomicUsize,
}

#[derive(Debug, Default)]
struct GateState {
    /// The accept loop runs.
    serving: bool,
    /// A re-exec asked it to stop accepting.
    pause: bool,
    /// It has stopped, and waits for `pause` to go.
    paused: bool,
}

impl Gate {
    fn lock(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// In the accept loop: while a pause is asked for, accept nothing.
    fn hold_while_paused(&self) {
        let mut st = self.lock();
        if !st.pause {
            return;
        }
        st.paused = true;
        self.changed.notify_all();
        while st.pause {
            st = self
                .changed
                .wait(st)
                .unwrap_or_else(PoisonError::into_inner);
        }
        st.paused = false;
    }
}

/// The endpoint accepting nothing while held, and every answer that was in
/// progress finished; accepting again when dropped (a re-exec that failed
/// and carries on). An `exec` while held loses no scrape: connections made
/// meanwhile wait in the listening socket's backlog for the new program.
#[derive(Debug)]
#[must_use = "the endpoint accepts again when this is dropped"]
pub struct Quiet {
    gate: Arc<Gate>,
}

impl Drop for Quiet {
    fn drop(&mut self) {
        self.gate.lock().pause = false;
        self.gate.changed.notify_all();
    }
}

impl Gate {
    /// Stops accepting scrapes and waits, at most `within`, until none is
    /// being answered; see [`Quiet`]. Returns at once when the endpoint is
    /// not served.
    pub fn quiesce(self: &Arc<Self>, within: Duration) -> Quiet {
        let deadline = Instant::now() + within;
        let gate = self;
        let mut st = gate.lock();
        st.pause = true;
        while st.serving && !(st.paused && gate.open.load(Ordering::SeqCst) == 0) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                tracing::warn!(target: "handoff::metrics", open = gate.open.load(Ordering::SeqCst),
                    "scrapes still being answered after {within:?}; going on");
                break;
            }
            // Answers ending are not signalled: look again every few ms.
            st = gate
                .changed
                .wait_timeout(st, left.min(Duration::from_millis(5)))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        drop(st);
        Quiet { gate: gate.clone() }
    }
}

/// What reading a request head came to.
#[derive(Debug, PartialEq, Eq)]
enum Head {
    /// Up to and including the blank line.
    Complete(Vec<u8>),
    /// The client stopped sending (EOF) before a blank line: answered on
    /// what came, as before (a bare `GET /metrics` line is a request).
    Ended(Vec<u8>),
    /// Not whole by the deadline.
    TimedOut,
    /// [`MAX_HEAD`] bytes and no blank line.
    TooLarge,
    /// The connection failed (reset…): nobody to answer.
    Failed,
}

/// Reads a request head that must be complete by `deadline`: before each
/// read the time left is armed as the read timeout, so the bound is on
/// the whole head, not on each read.
fn read_head(mut s: &TcpStream, deadline: Instant) -> Head {
    let mut buf = vec![0u8; MAX_HEAD];
    let mut n = 0;
    while n < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || s.set_read_timeout(Some(left)).is_err() {
            return Head::TimedOut;
        }
        match s.read(&mut buf[n..]) {
            Ok(0) if n == 0 => return Head::Failed,
            Ok(0) => {
                buf.truncate(n);
                return Head::Ended(buf);
            }
            Ok(k) => {
                // Only the new bytes and the 3 before them can complete
                // the terminator.
                let from = n.saturating_sub(3);
                n += k;
                if let Some(end) = buf[from..n].windows(4).position(|w| w == b"\r\n\r\n") {
                    buf.truncate(from + end + 4);
                    return Head::Complete(buf);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Head::TimedOut
            }
            Err(_) => return Head::Failed,
        }
    }
    Head::TooLarge
}

fn reply(s: &TcpStream, status: &str, body: String) {
    reply_typed(s, status, "text/plain", body)
}

fn reply_typed(mut s: &TcpStream, status: &str, ctype: &str, body: String) {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = s.write_all(head.as_bytes());
    let _ = s.write_all(body.as_bytes());
}
