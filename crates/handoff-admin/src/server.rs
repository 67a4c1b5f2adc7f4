//! The supervisor's end of the admin socket: who may talk, how many at
//! once, and how long they have to say what they want. What to do with a
//! request is the caller's (`handle`).

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use handoff::accept::{AcceptBackoff, Verdict};
use handoff::frame::FrameError;

use crate::schema::{Event, Request};
use crate::wire::send;

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

/// One line on stderr in a single `write(2)`: the supervisor's stderr is
/// usually the very pipe its service processes write to, and a line
/// shorter than `PIPE_BUF` written at once is never interleaved with
/// theirs (std's `eprintln!` writes the pieces one by one).
fn say(line: String) {
    let mut line = line;
    line.push('\n');
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

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
/// socket serves in its place and this one was shut down.
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
                    say(format!(
                        "handoff run: admin accept: accepting again ({unsaid} failures not shown)"
                    ));
                }
                s
            }
            Err(e) => match backoff.failed(&e) {
                Verdict::Retry {
                    say: tell,
                    suppressed,
                } => {
                    if tell {
                        let more = if suppressed > 0 {
                            format!(" ({suppressed} more since the last report)")
                        } else {
                            String::new()
                        };
                        say(format!(
                            "handoff run: admin accept: {e}{more}; retrying with backoff"
                        ));
                    }
                    continue;
                }
                Verdict::Fatal => {
                    if !replaced.load(Ordering::SeqCst) {
                        say(format!(
                            "handoff run: admin accept: {e}: the admin socket is unusable; \
                             no more admin requests (SIGHUP still upgrades, SIGTERM stops)"
                        ));
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
            say(format!(
                "handoff run: admin connection dropped: cannot start a thread for it: {e}"
            ));
        }
    }
}

/// Reads a client's request, which must arrive whole within
/// [`REQUEST_BUDGET`]; the error is what the client is told.
fn read_request(s: &UnixStream) -> Result<Request, String> {
    let f = handoff::channel::read_frame_within(s, REQUEST_BUDGET).map_err(|e| match e {
        FrameError::TimedOut { waited_ms } => format!(
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
