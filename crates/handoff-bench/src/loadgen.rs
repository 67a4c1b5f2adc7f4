//! The async HTTP load generator: fixed concurrency, bounded duration, every request
//! timestamped so the report can split steady state from the windows around upgrades.
//!
//! Three kinds of client task:
//! * **keep-alive**: one connection, requests back to back, reconnecting only when the
//!   server says `Connection: close` (as a drain does);
//! * **fresh**: a new connection per request (`Connection: close`), the case where a
//!   closed listener shows up as *refused*;
//! * **idle holders**: open a keep-alive connection, make one request, then sit idle until
//!   the server closes it (a drain) and reconnect: the "open connections" of the scale series.
//!
//! Every connection a keep-alive client or idle holder opens beyond its first is counted as
//! a **reconnect** ([`LoadRun::reconnects`]): a server that closes keep-alive connections
//! at each upgrade makes every such client reconnect once per upgrade, one that hands its
//! connections to the new build makes none.
//!
//! Failures use the taxonomy of `handoff demo`'s blocking client ([`Failure`], [`classify`]):
//! refused, reset, timeout, cut (EOF before/mid response), non-2xx, other. One case is benign
//! and retried once, counted apart: EOF before any response byte on a *reused* keep-alive
//! connection, i.e. the server closed it while idle (RFC 9112 §9.3.1).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use handoff_cli::load::{classify, Failure};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How many failure descriptions a run keeps (the counts are always complete).
const KEEP_DETAILS: usize = 20;

/// What to run.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// Targets; client `i` uses `addrs[i % len]`.
    pub addrs: Vec<SocketAddr>,
    pub keepalive: usize,
    pub fresh: usize,
    pub idle_holders: usize,
    pub duration: Duration,
    /// Budget of one attempt (connect + request + response).
    pub timeout: Duration,
}

/// Kinds of failed request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Kind {
    Refused,
    Reset,
    Timeout,
    /// EOF before (on a fresh connection or the retry) or in the middle of the response.
    Cut,
    Non2xx,
    Other,
}

impl Kind {
    pub const ALL: [Kind; 6] = [
        Kind::Refused,
        Kind::Reset,
        Kind::Timeout,
        Kind::Cut,
        Kind::Non2xx,
        Kind::Other,
    ];

    fn of(f: &Failure) -> Kind {
        match f {
            Failure::Refused => Kind::Refused,
            Failure::Reset => Kind::Reset,
            Failure::Timeout => Kind::Timeout,
            Failure::EofBeforeResponse | Failure::EofMidResponse => Kind::Cut,
            Failure::Other(_) => Kind::Other,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Refused => "refused",
            Kind::Reset => "reset",
            Kind::Timeout => "timeout",
            Kind::Cut => "cut",
            Kind::Non2xx => "non-2xx",
            Kind::Other => "other",
        }
    }
}

/// One answered request: when it started (µs after the run's epoch), how long it took
/// (including a stale-connection retry), and which process answered.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub start_us: u64,
    pub latency_us: u64,
    pub pid: u32,
}

/// One failed request.
#[derive(Debug, Clone)]
pub struct Failed {
    pub at_us: u64,
    pub kind: Kind,
}

/// Everything a run saw.
#[derive(Debug, Default)]
pub struct LoadRun {
    pub samples: Vec<Sample>,
    pub failures: Vec<Failed>,
    /// The first few failures, described.
    pub details: Vec<String>,
    /// Benign: idle keep-alive connections the server closed, retried once.
    pub stale_retries: u64,
    /// Keep-alive clients and idle holders: connections opened beyond each one's first
    /// (fresh-connection clients open one per request by design and are not counted).
    pub reconnects: u64,
    /// How many keep-alive clients and idle holders ran.
    pub sticky_clients: u64,
}

/// Counts idle holders that have their connection open (the scale series waits for all).
#[derive(Debug, Default)]
pub struct Progress {
    pub holders_connected: AtomicUsize,
}

/// Runs the load until `cfg.duration` has passed; time offsets are relative to `epoch`.
pub async fn run(cfg: LoadConfig, epoch: Instant, progress: Arc<Progress>) -> LoadRun {
    let deadline = Instant::now() + cfg.duration;
    let mut tasks = Vec::new();
    let n = cfg.keepalive + cfg.fresh + cfg.idle_holders;
    for i in 0..n {
        let addr = cfg.addrs[i % cfg.addrs.len()];
        let role = if i < cfg.keepalive {
            Role::KeepAlive
        } else if i < cfg.keepalive + cfg.fresh {
            Role::Fresh
        } else {
            Role::Holder
        };
        let w = Worker {
            addr,
            epoch,
            deadline,
            timeout: cfg.timeout,
            run: LoadRun::default(),
        };
        let progress = progress.clone();
        tasks.push(tokio::spawn(w.go(role, progress)));
    }
    let mut total = LoadRun::default();
    for t in tasks {
        match t.await {
            Ok(part) => {
                total.samples.extend(part.samples);
                total.failures.extend(part.failures);
                total.stale_retries += part.stale_retries;
                total.reconnects += part.reconnects;
                total.sticky_clients += part.sticky_clients;
                for d in part.details {
                    if total.details.len() < KEEP_DETAILS {
                        total.details.push(d);
                    }
                }
            }
            Err(e) => {
                total.failures.push(Failed {
                    at_us: epoch.elapsed().as_micros() as u64,
                    kind: Kind::Other,
                });
                total.details.push(format!("a load task panicked: {e}"));
            }
        }
    }
    total.samples.sort_by_key(|s| s.start_us);
    total.failures.sort_by_key(|f| f.at_us);
    total
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    KeepAlive,
    Fresh,
    Holder,
}

struct Worker {
    addr: SocketAddr,
    epoch: Instant,
    deadline: Instant,
    timeout: Duration,
    run: LoadRun,
}

/// A parsed response: just what the benchmark needs.
#[derive(Debug, Clone, Copy)]
pub struct Resp {
    pub status: u16,
    /// Its `X-Pid` header (0 if absent).
    pub pid: u32,
    /// It said `Connection: close`.
    pub close: bool,
}

impl Worker {
    async fn go(mut self, role: Role, progress: Arc<Progress>) -> LoadRun {
        let mut conn: Option<Conn> = None;
        let mut counted = false;
        // Connections this client opened; every one after the first is a reconnect.
        let mut opened = 0u64;
        if role != Role::Fresh {
            self.run.sticky_clients = 1;
        }
        while Instant::now() < self.deadline {
            if role == Role::Holder && conn.as_ref().is_some_and(|c| c.used) {
                // Sit idle until the server closes the connection or the run ends.
                if let Some(c) = conn.as_mut() {
                    let mut probe = [0u8; 64];
                    let left = self.deadline.saturating_duration_since(Instant::now());
                    match tokio::time::timeout(left, c.stream.read(&mut probe)).await {
                        Err(_) => break,
                        Ok(_) => conn = None,
                    }
                }
                if counted {
                    progress.holders_connected.fetch_sub(1, Ordering::SeqCst);
                    counted = false;
                }
                continue;
            }
            let close = role == Role::Fresh;
            let start = Instant::now();
            let mut retried = false;
            loop {
                let reused = conn.as_ref().is_some_and(|c| c.used);
                let attempt = tokio::time::timeout(self.timeout, async {
                    if conn.is_none() {
                        conn = Some(Conn::connect(self.addr).await?);
                        opened += 1;
                    }
                    match conn.as_mut() {
                        Some(c) => c.request(close).await,
                        None => Err(Failure::Other("no connection".into())),
                    }
                })
                .await
                .unwrap_or(Err(Failure::Timeout));
                match attempt {
                    Ok(resp) => {
                        if resp.close || close {
                            conn = None;
                        }
                        if (200..300).contains(&resp.status) {
                            self.run.samples.push(Sample {
                                start_us: self.offset(start),
                                latency_us: start.elapsed().as_micros() as u64,
                                pid: resp.pid,
                            });
                        } else {
                            self.fail(start, Kind::Non2xx, format!("status {}", resp.status));
                        }
                    }
                    Err(Failure::EofBeforeResponse) if reused && !retried => {
                        self.run.stale_retries += 1;
                        retried = true;
                        conn = None;
                        continue;
                    }
                    Err(f) => {
                        conn = None;
                        let what = format!(
                            "{f} on a {} connection{}",
                            if reused { "reused" } else { "fresh" },
                            if retried {
                                " (after a stale retry)"
                            } else {
                                ""
                            }
                        );
                        self.fail(start, Kind::of(&f), what);
                    }
                }
                break;
            }
            if role == Role::Holder && conn.is_some() && !counted {
                progress.holders_connected.fetch_add(1, Ordering::SeqCst);
                counted = true;
            }
        }
        if counted {
            progress.holders_connected.fetch_sub(1, Ordering::SeqCst);
        }
        if role != Role::Fresh {
            self.run.reconnects = opened.saturating_sub(1);
        }
        self.run
    }

    fn offset(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_micros() as u64
    }

    fn fail(&mut self, start: Instant, kind: Kind, what: String) {
        let at_us = self.offset(start);
        if self.run.details.len() < KEEP_DETAILS {
            self.run.details.push(format!(
                "{:.3} s: {} → {what}",
                at_us as f64 / 1e6,
                self.addr
            ));
        }
        self.run.failures.push(Failed { at_us, kind });
    }
}

/// One client connection (`GET /`, HTTP/1.1), also used on its own by
/// `handoff-bench-move`.
pub struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    used: bool,
    request: Vec<u8>,
    request_close: Vec<u8>,
}

impl Conn {
    pub async fn connect(addr: SocketAddr) -> Result<Conn, Failure> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| classify(&e, false))?;
        let _ = stream.set_nodelay(true);
        Ok(Conn {
            stream,
            buf: Vec::with_capacity(512),
            used: false,
            request: format!("GET / HTTP/1.1\r\nHost: {addr}\r\n\r\n").into_bytes(),
            request_close: format!("GET / HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
                .into_bytes(),
        })
    }

    /// The client's end: its local port tells one TCP connection from another.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.stream.local_addr()
    }

    /// Sends `GET /` (with `Connection: close` if `close`) and reads the whole response.
    pub async fn request(&mut self, close: bool) -> Result<Resp, Failure> {
        let req = if close {
            &self.request_close
        } else {
            &self.request
        };
        self.stream
            .write_all(req)
            .await
            .map_err(|e| classify(&e, false))?;
        self.buf.clear();
        // httparse (hyper's parser) reads the head; only what the benchmark needs is kept.
        let (head_end, status, len, pid, close) = loop {
            let mut headers = [httparse::EMPTY_HEADER; 16];
            let mut resp = httparse::Response::new(&mut headers);
            match resp.parse(&self.buf) {
                Ok(httparse::Status::Complete(n)) => {
                    let status = resp.code.unwrap_or(0);
                    let (mut len, mut pid, mut close) = (0usize, 0u32, false);
                    for h in resp.headers.iter() {
                        let v = String::from_utf8_lossy(h.value);
                        let v = v.trim();
                        if h.name.eq_ignore_ascii_case("content-length") {
                            len = v
                                .parse()
                                .map_err(|_| Failure::Other(format!("bad Content-Length {v:?}")))?;
                        } else if h.name.eq_ignore_ascii_case("x-pid") {
                            pid = v.parse().unwrap_or(0);
                        } else if h.name.eq_ignore_ascii_case("connection") {
                            close = v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close"));
                        }
                    }
                    break (n, status, len, pid, close);
                }
                Ok(httparse::Status::Partial) => {}
                Err(e) => return Err(Failure::Other(format!("malformed response head: {e}"))),
            }
            self.read_more().await?;
        };
        while self.buf.len() < head_end + len {
            self.read_more().await?;
        }
        self.used = true;
        Ok(Resp { status, pid, close })
    }

    async fn read_more(&mut self) -> Result<(), Failure> {
        let got_any = !self.buf.is_empty();
        match self.stream.read_buf(&mut self.buf).await {
            Ok(0) if got_any => Err(Failure::EofMidResponse),
            Ok(0) => Err(Failure::EofBeforeResponse),
            Ok(_) => Ok(()),
            Err(e) => Err(classify(&e, got_any)),
        }
    }
}
