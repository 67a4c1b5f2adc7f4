//! Accepting and serving HTTP/1.1 connections, and the drain discipline.
//!
//! Modes (one `watch` channel, read by every task):
//! * `Serving` — accept, keep connections alive.
//! * `Draining` — stop accepting (the listeners stay open: new connections
//!   wait in the kernel backlog for the successor). Every connection closes
//!   at a request boundary: its next response carries `Connection: close`,
//!   and one that stays idle for `drain_idle` is closed with a FIN. A
//!   connection is never closed mid-request.
//! * `Sealed` — the state belongs to the successor now; the rare request on
//!   a connection that outlived the drain grace gets 503 and a close.
//! * `Retiring` — committed: like Draining, then the process exits.
//!
//! Closing is always "lingering": shut down our write side, then read and
//! discard until the client closes (bounded), so a request that crossed our
//! FIN on the wire does not turn the close into a reset.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};

use crate::store::{Store, MAX_KEY, MAX_VALUE};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Serving,
    Draining,
    Sealed,
    Retiring,
}

/// Everything the connection tasks share.
pub struct Shared {
    pub mode: watch::Sender<Mode>,
    pub store: RwLock<Arc<Store>>,
    pub build_id: String,
    /// Open connections; drain completes when it reaches zero.
    pub conns: AtomicUsize,
    /// Accept loops that may be inside `accept()` right now.
    pub accepting: AtomicUsize,
    /// Signalled when `conns` or `accepting` drops.
    pub conns_changed: Notify,
    /// Requests currently touching the store; seal waits for zero.
    pub active: AtomicUsize,
    /// Responses written by this process. Counted here (one relaxed add per
    /// response) and added to the shared counters region in batches by
    /// `live::Live::flush`, so no request takes the region's lock.
    pub served: AtomicU64,
    pub drain_idle: Duration,
}

impl Shared {
    pub fn mode(&self) -> Mode {
        *self.mode.borrow()
    }

    pub fn set_mode(&self, m: Mode) {
        self.mode.send_replace(m);
    }

    fn store(&self) -> Arc<Store> {
        self.store.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Accepts on `listener` whenever the mode is `Serving`.
pub async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut mode = shared.mode.subscribe();
    loop {
        // Announce that this loop may accept *before* looking at the mode.
        // A drain flips the mode and then waits for `accepting` to reach
        // zero: either it sees us here, or we see its mode (both sides
        // SeqCst / lock-ordered), so no connection can be accepted behind
        // the drain's back once it has counted the open ones.
        shared.accepting.fetch_add(1, Ordering::SeqCst);
        let serving = *mode.borrow_and_update() == Mode::Serving;
        if serving {
            tokio::select! {
                r = listener.accept() => match r {
                    Ok((stream, _)) => {
                        let _ = stream.set_nodelay(true);
                        // Counted before `accepting` drops below.
                        shared.conns.fetch_add(1, Ordering::SeqCst);
                        let s = shared.clone();
                        tokio::spawn(async move {
                            connection(stream, &s).await;
                            s.conns.fetch_sub(1, Ordering::SeqCst);
                            s.conns_changed.notify_waiters();
                        });
                    }
                    Err(e) => {
                        // EMFILE and friends: back off rather than spin.
                        tracing::warn!(target: "demo::accept", error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                },
                _ = mode.changed() => {}
            }
        }
        shared.accepting.fetch_sub(1, Ordering::SeqCst);
        shared.conns_changed.notify_waiters();
        if !serving && mode.changed().await.is_err() {
            return;
        }
    }
}

/// Waits until no accept loop can still accept and no connection is open,
/// or `budget` passes; returns the connections still open.
pub async fn wait_conns_zero(shared: &Shared, budget: Duration) -> usize {
    let deadline = tokio::time::Instant::now() + budget;
    loop {
        // Created before the check: notify_waiters reaches a Notified from
        // the moment it exists, so no wake-up falls between check and wait.
        let notified = shared.conns_changed.notified();
        let accepting = shared.accepting.load(Ordering::SeqCst);
        let n = shared.conns.load(Ordering::SeqCst);
        if n == 0 && accepting == 0 {
            return 0;
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            return shared.conns.load(Ordering::SeqCst);
        }
    }
}

struct Request {
    method: String,
    path: String,
    body: Vec<u8>,
    close: bool,
}

enum ReadOutcome {
    Request(Request),
    /// Client closed, or we closed an idle connection.
    Done,
    /// Malformed: answer with this status and close.
    Bad(u16, &'static str),
}

const MAX_HEAD: usize = 16 * 1024;
const IDLE_SERVING: Duration = Duration::from_secs(60);
const MID_REQUEST: Duration = Duration::from_secs(30);

async fn connection(mut stream: TcpStream, shared: &Shared) {
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut mode = shared.mode.subscribe();
    loop {
        let req = match read_request(&mut stream, &mut buf, &mut mode, shared).await {
            ReadOutcome::Request(r) => r,
            ReadOutcome::Done => break,
            ReadOutcome::Bad(code, msg) => {
                let _ = respond(&mut stream, code, msg.as_bytes(), true).await;
                break;
            }
        };
        let (code, body) = handle(&req, shared).await;
        // Decide on close *after* handling: a drain that began meanwhile
        // still gets this response, marked as the last one.
        let close = req.close || shared.mode() != Mode::Serving || code == 503;
        if respond(&mut stream, code, &body, close).await.is_err() {
            return;
        }
        shared.served.fetch_add(1, Ordering::Relaxed);
        if close {
            break;
        }
    }
    linger_close(stream).await;
}

/// Shut our side, then drain the client's until it closes (bounded).
async fn linger_close(mut stream: TcpStream) {
    let _ = stream.shutdown().await;
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
}

async fn read_request(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    mode: &mut watch::Receiver<Mode>,
    shared: &Shared,
) -> ReadOutcome {
    // Phase 1: wait for the first byte of a request. This is the only point
    // at which the server may close a connection on its own.
    while buf.is_empty() {
        let m = *mode.borrow_and_update();
        let idle = if m == Mode::Serving {
            IDLE_SERVING
        } else {
            shared.drain_idle
        };
        let mut chunk = [0u8; 4096];
        tokio::select! {
            r = stream.read(&mut chunk) => match r {
                Ok(0) | Err(_) => return ReadOutcome::Done,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            },
            _ = tokio::time::sleep(idle) => return ReadOutcome::Done,
            r = mode.changed(), if m == Mode::Serving => {
                if r.is_err() { return ReadOutcome::Done; }
            }
        }
    }
    // Phase 2: the rest of the head, then the body. Bytes have arrived, so
    // this request will be answered whatever the mode does meanwhile.
    let deadline = tokio::time::Instant::now() + MID_REQUEST;
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(buf) {
            Ok(httparse::Status::Complete(head_len)) => {
                let method = req.method.unwrap_or("").to_string();
                let path = req.path.unwrap_or("").to_string();
                let mut len = 0usize;
                let mut close = req.version == Some(0);
                for h in req.headers.iter() {
                    let v = std::str::from_utf8(h.value).unwrap_or("").trim();
                    if h.name.eq_ignore_ascii_case("content-length") {
                        match v.parse::<usize>() {
                            Ok(n) if n <= MAX_VALUE => len = n,
                            _ => return ReadOutcome::Bad(413, "body too large or bad length\n"),
                        }
                    } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                        return ReadOutcome::Bad(
                            501,
                            "chunked bodies are not supported; send Content-Length\n",
                        );
                    } else if h.name.eq_ignore_ascii_case("connection") {
                        if v.eq_ignore_ascii_case("close") {
                            close = true;
                        } else if v.eq_ignore_ascii_case("keep-alive") {
                            close = false;
                        }
                    }
                }
                while buf.len() < head_len + len {
                    if !read_more(stream, buf, deadline).await {
                        return ReadOutcome::Done;
                    }
                }
                let body = buf[head_len..head_len + len].to_vec();
                buf.drain(..head_len + len);
                return ReadOutcome::Request(Request {
                    method,
                    path,
                    body,
                    close,
                });
            }
            Ok(httparse::Status::Partial) => {
                if buf.len() > MAX_HEAD {
                    return ReadOutcome::Bad(431, "request head too large\n");
                }
                if !read_more(stream, buf, deadline).await {
                    return ReadOutcome::Done;
                }
            }
            Err(_) => return ReadOutcome::Bad(400, "malformed request\n"),
        }
    }
}

async fn read_more(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    deadline: tokio::time::Instant,
) -> bool {
    let mut chunk = [0u8; 16 * 1024];
    match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
        Ok(Ok(n)) if n > 0 => {
            buf.extend_from_slice(&chunk[..n]);
            true
        }
        _ => false,
    }
}

async fn handle(req: &Request, shared: &Shared) -> (u16, Vec<u8>) {
    match (req.method.as_str(), req.path.as_str()) {
        ("GET", "/healthz") => (200, b"ok\n".to_vec()),
        ("GET", "/version") => (
            200,
            format!("pid={} build={}\n", std::process::id(), shared.build_id).into_bytes(),
        ),
        (m, p) if p.starts_with("/kv/") => {
            let key = &p[4..];
            if key.is_empty() || key.len() > MAX_KEY {
                return (400, b"key must be 1..512 bytes\n".to_vec());
            }
            // Count ourselves in before looking at the mode: seal flips the
            // mode and then waits for `active` to reach zero, so either it
            // sees us, or we see Sealed (SeqCst on both sides).
            shared.active.fetch_add(1, Ordering::SeqCst);
            let r = if matches!(shared.mode(), Mode::Sealed | Mode::Retiring) {
                (503, b"handing off; retry\n".to_vec())
            } else {
                kv(m, key, &req.body, &shared.store()).await
            };
            shared.active.fetch_sub(1, Ordering::SeqCst);
            r
        }
        _ => (404, b"not found\n".to_vec()),
    }
}

async fn kv(method: &str, key: &str, body: &[u8], store: &Store) -> (u16, Vec<u8>) {
    match method {
        "GET" => match store.get(key) {
            Some(v) => (200, v.to_vec()),
            None => (404, b"no such key\n".to_vec()),
        },
        "PUT" => match store.put(key.to_string(), body.to_vec()).await {
            Ok(()) => (200, b"stored\n".to_vec()),
            Err(e) => (503, format!("not stored: {e}\n").into_bytes()),
        },
        _ => (405, b"use GET or PUT\n".to_vec()),
    }
}

fn reason(code: u16) -> &'static str {
    match code {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

async fn respond(
    stream: &mut TcpStream,
    code: u16,
    body: &[u8],
    close: bool,
) -> std::io::Result<()> {
    let mut out = Vec::with_capacity(128 + body.len());
    out.extend_from_slice(format!("HTTP/1.1 {code} {}\r\n", reason(code)).as_bytes());
    if code != 204 {
        out.extend_from_slice(format!("Content-Length: {}\r\n", body.len()).as_bytes());
    }
    if close {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if code != 204 {
        out.extend_from_slice(body);
    }
    stream.write_all(&out).await
}
