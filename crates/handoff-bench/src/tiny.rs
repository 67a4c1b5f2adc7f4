//! The one tiny HTTP/1.1 handler every contestant serves, with one drain discipline.
//!
//! Every contestant (handoff, ecdysis, shellflip, the no-upgrade control and the in-process
//! floor server) runs exactly this code, so the benchmark compares restart mechanisms, not
//! handlers. `GET` anything → `200`, body `ok\n`, and an `X-Pid` header naming the process
//! that answered (the harness learns from it when the new generation starts serving).
//!
//! Drain ("answer-then-close", the discipline docs/design.md §1 measures the peers with): once
//! [`Tiny::set_draining`] is on, the accept loops stop accepting (listeners stay open, so new
//! connections wait in the kernel backlog for the successor), every connection's next
//! response carries `Connection: close`, and a connection idle for [`DRAIN_IDLE`] after a
//! response (or [`FIRST_REQUEST_GRACE`] before its first request) is closed with a FIN. A connection is never closed mid-request, and every close is lingering (shut
//! our write side, then read until the client's EOF) so that a request crossing our FIN on
//! the wire does not turn the close into a reset.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};

/// How long a draining connection may sit idle before we close it. A client that sent a
/// request just before the drain began gets it answered; one that went quiet is let go.
pub const DRAIN_IDLE: Duration = Duration::from_millis(50);

/// How long a draining connection that has not sent its first request yet may take to send
/// it. A client that just connected is about to send one (under load, or while thousands
/// reconnect at once, that can take longer than [`DRAIN_IDLE`]); closing it would be a
/// certain failure, not a benign idle close.
pub const FIRST_REQUEST_GRACE: Duration = Duration::from_secs(2);

/// Longest request head we accept; the load generator's are ~60 bytes.
const MAX_HEAD: usize = 16 * 1024;

/// State shared by a process's accept loops and connection tasks.
#[derive(Debug)]
pub struct Tiny {
    draining: watch::Sender<bool>,
    conns: AtomicUsize,
    accepting: AtomicUsize,
    changed: Notify,
    pid: u32,
    /// BENCH_TRACE: print the wall-clock µs of this process's first accepted connection
    /// (once), to line up with the start-up steps the services print.
    trace_first_accept: AtomicBool,
    /// BENCH_TRACE: likewise for its first response written.
    trace_first_response: AtomicBool,
}

/// Wall-clock µs (BENCH_TRACE lines), comparable across processes.
fn wall_us() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros())
        .unwrap_or(0)
}

impl Tiny {
    /// A fresh, serving (not draining) handler.
    pub fn new() -> Arc<Tiny> {
        let (draining, _) = watch::channel(false);
        Arc::new(Tiny {
            draining,
            conns: AtomicUsize::new(0),
            accepting: AtomicUsize::new(0),
            changed: Notify::new(),
            pid: std::process::id(),
            trace_first_accept: AtomicBool::new(std::env::var_os("BENCH_TRACE").is_some()),
            trace_first_response: AtomicBool::new(std::env::var_os("BENCH_TRACE").is_some()),
        })
    }

    /// Turns draining on (stop accepting, close connections at request boundaries) or off
    /// (a handoff was aborted: serve again).
    pub fn set_draining(&self, on: bool) {
        self.draining.send_replace(on);
    }

    /// Connections currently open.
    pub fn open_conns(&self) -> usize {
        self.conns.load(Ordering::SeqCst)
    }

    /// Waits (at most `budget`) until no accept loop is inside `accept`: after
    /// [`Tiny::set_draining`] this is the moment accept is really closed. Returns whether it
    /// got there.
    pub async fn wait_accept_closed(&self, budget: Duration) -> bool {
        self.wait_zero(&self.accepting, budget).await == 0
    }

    /// Waits (at most `budget`) for every connection to close; returns how many are left.
    pub async fn wait_conns_zero(&self, budget: Duration) -> usize {
        self.wait_zero(&self.conns, budget).await
    }

    async fn wait_zero(&self, counter: &AtomicUsize, budget: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + budget;
        loop {
            // Register before checking, so a decrement in between is not missed.
            let notified = self.changed.notified();
            let n = counter.load(Ordering::SeqCst);
            if n == 0 || tokio::time::timeout_at(deadline, notified).await.is_err() {
                return counter.load(Ordering::SeqCst);
            }
        }
    }
}

/// Decrements a counter and wakes waiters when dropped.
struct Counted<'a> {
    tiny: &'a Tiny,
    counter: &'a AtomicUsize,
}

impl<'a> Counted<'a> {
    fn new(tiny: &'a Tiny, counter: &'a AtomicUsize) -> Self {
        counter.fetch_add(1, Ordering::SeqCst);
        Counted { tiny, counter }
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.counter.fetch_sub(1, Ordering::SeqCst);
        self.tiny.changed.notify_waiters();
    }
}

/// Accepts on `listener` while not draining, pausing (not closing) while draining so an
/// aborted handoff can resume. Runs until the runtime shuts down.
///
/// Two orderings make "accept is closed" true when [`Tiny::wait_accept_closed`] says so.
/// The loop counts itself as accepting *before* it reads the draining flag, and the drain
/// sets the flag before it waits for that count, so a loop either sees the drain or is
/// waited for (reading the flag first left a window: a thread descheduled between the read
/// and the count could accept after the drain had reported accept closed — and, in the
/// accept-after-Commit order, where the backlog is never empty during a handoff, after the
/// old process had counted its connections to zero and begun to exit, dropping that
/// connection unanswered). And a connection is counted open when accepted, not when its
/// task first runs, so no wait for the count to reach zero can miss one.
pub async fn accept_loop(listener: TcpListener, tiny: Arc<Tiny>) {
    let mut rx = tiny.draining.subscribe();
    loop {
        let accepting = Counted::new(&tiny, &tiny.accepting);
        if *rx.borrow_and_update() {
            drop(accepting);
            if rx.changed().await.is_err() {
                return;
            }
            continue;
        }
        let accepted = tokio::select! {
            biased;
            _ = rx.changed() => None,
            r = listener.accept() => Some(r),
        };
        match accepted {
            Some(Ok((stream, _))) => {
                let open = Open::new(tiny.clone());
                drop(accepting);
                if tiny.trace_first_accept.swap(false, Ordering::Relaxed) {
                    eprintln!("bench-trace pid={} first_accept={}", tiny.pid, wall_us());
                }
                tokio::spawn(connection(stream, open));
            }
            // EMFILE and friends: back off briefly instead of spinning.
            Some(Err(_)) => {
                drop(accepting);
                tokio::time::sleep(Duration::from_millis(5)).await
            }
            None => {}
        }
    }
}

/// One open connection, counted from its accept until dropped.
pub struct Open(Arc<Tiny>);

impl Open {
    /// Counts a connection of `tiny` as open.
    pub fn new(tiny: Arc<Tiny>) -> Open {
        tiny.conns.fetch_add(1, Ordering::SeqCst);
        Open(tiny)
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.conns.fetch_sub(1, Ordering::SeqCst);
        self.0.changed.notify_waiters();
    }
}

/// Serves one connection: keep-alive until the client closes, it asks for `Connection:
/// close`, or a drain ends it at a request boundary.
pub async fn connection(mut stream: TcpStream, open: Open) {
    let tiny = open.0.clone();
    let _open = open;
    let _ = stream.set_nodelay(true);
    let mut rx = tiny.draining.subscribe();
    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    let mut answered = false;
    loop {
        let head_end = loop {
            if let Some(i) = find_head_end(&buf) {
                break i;
            }
            if buf.len() > MAX_HEAD {
                return;
            }
            let draining = *rx.borrow_and_update();
            let read = if draining && buf.is_empty() {
                let idle = if answered {
                    DRAIN_IDLE
                } else {
                    FIRST_REQUEST_GRACE
                };
                match tokio::time::timeout(idle, stream.read_buf(&mut buf)).await {
                    Ok(r) => r,
                    Err(_) => return linger_close(stream).await,
                }
            } else {
                tokio::select! {
                    r = stream.read_buf(&mut buf) => r,
                    _ = rx.changed(), if !draining => continue,
                }
            };
            match read {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        };
        let close = wants_close(&buf[..head_end]) || *rx.borrow();
        buf.drain(..head_end);
        let resp = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nX-Pid: {}\r\n{}\r\nok\n",
            tiny.pid,
            if close { "Connection: close\r\n" } else { "" }
        );
        if stream.write_all(resp.as_bytes()).await.is_err() {
            return;
        }
        if tiny.trace_first_response.swap(false, Ordering::Relaxed) {
            eprintln!("bench-trace pid={} first_response={}", tiny.pid, wall_us());
        }
        answered = true;
        if close {
            return linger_close(stream).await;
        }
    }
}

/// Shuts our write side and reads until the client's EOF (bounded), so bytes the client
/// sent after our last response are read rather than answered with a reset.
async fn linger_close(mut stream: TcpStream) {
    let _ = stream.shutdown().await;
    let mut sink = [0u8; 1024];
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Ok(n) = stream.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

/// Index just past the `\r\n\r\n` ending a request head, if `buf` holds one.
fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// Whether a request head says `Connection: close`.
fn wants_close(head: &[u8]) -> bool {
    let head = String::from_utf8_lossy(head).to_ascii_lowercase();
    head.lines().any(|l| {
        l.strip_prefix("connection:")
            .is_some_and(|v| v.split(',').any(|t| t.trim() == "close"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_end_and_close() {
        assert_eq!(find_head_end(b"GET / HTTP/1.1\r\n\r\nrest"), Some(18));
        assert_eq!(find_head_end(b"GET / HTTP/1.1\r\n"), None);
        assert!(wants_close(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n"));
        assert!(!wants_close(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"));
    }

    /// Once the drain is told accept is closed, nothing more is accepted — the
    /// connection waits in the backlog — and a resume accepts and answers it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nothing_is_accepted_after_accept_closed_is_reported() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let t = Tiny::new();
        tokio::spawn(accept_loop(listener, t.clone()));
        for _ in 0..200 {
            t.set_draining(true);
            assert!(t.wait_accept_closed(Duration::from_secs(5)).await);
            let mut c = TcpStream::connect(addr).await.unwrap();
            c.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
                .await
                .unwrap();
            let mut b = [0u8; 1];
            let early = tokio::time::timeout(Duration::from_millis(5), c.read(&mut b)).await;
            assert!(
                early.is_err(),
                "answered while accept was closed: {early:?}"
            );
            assert_eq!(t.open_conns(), 0, "accepted while accept was closed");
            t.set_draining(false);
            let mut head = Vec::new();
            while !head.ends_with(b"ok\n") {
                let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut b))
                    .await
                    .expect("answered after the resume")
                    .unwrap();
                assert_eq!(
                    n,
                    1,
                    "closed before the answer: {:?}",
                    String::from_utf8_lossy(&head)
                );
                head.push(b[0]);
            }
        }
    }
}
