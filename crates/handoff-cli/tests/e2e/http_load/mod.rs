//! Load for the tokio service tests: HTTP/1.1 keep-alive, fresh-connection,
//! slow-request and h2c clients that **never retry a request**.
//!
//! Each client holds one connection of its own (hyper's low-level client, no
//! pool). Every request that does not come back `200` with a body naming
//! the pid that answered is a failure, whatever the cause: refused, reset,
//! closed without a response, timed out. A client does open a new
//! connection when the server said `Connection: close` (or sent GOAWAY), or
//! when it sees the connection closed *before* sending — as every HTTP
//! client does; a request already sent is never sent again.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::{Request, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

/// No single request may take longer (the slow one takes 300 ms).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// What the clients saw.
#[derive(Default)]
pub struct Stats {
    pub ok: AtomicU64,
    pub slow_ok: AtomicU64,
    pub h2_ok: AtomicU64,
    /// h2 requests never processed: the connection closed before hyper sent
    /// them (it hands them back), or the server's GOAWAY refused the stream
    /// (h2 reports `GoAway(NO_ERROR, Remote)` for streams above its
    /// last-stream-id and for streams opened after it). RFC 9113 §8.7 makes
    /// these safe to send again, and every h2 client does; they are sent
    /// again on a new connection and reported, not counted as failures.
    pub h2_unsent: AtomicU64,
    /// One line per failed request.
    pub failures: Mutex<Vec<String>>,
    /// Answers per pid.
    pub by_pid: Mutex<BTreeMap<u32, u64>>,
    /// Slow answers per pid.
    pub slow_by_pid: Mutex<BTreeMap<u32, u64>>,
    /// Writes acknowledged: key -> last value answered 200.
    pub acked: Mutex<BTreeMap<String, u64>>,
    /// Sticky clients: every connection opened after a client's first,
    /// with why (the server closed it, said `Connection: close`).
    pub reconnects: Mutex<Vec<String>>,
    /// Sticky clients: client → (local port of its first connection, of
    /// its current one, pid of its last answer).
    pub sticky: Mutex<BTreeMap<usize, (u16, u16, u32)>>,
}

impl Stats {
    /// Fails the test if any request failed, with the first 20 failures
    /// and `context` (the supervisor's log, say).
    pub fn assert_no_failures(&self, context: &str) {
        let failures = self.failures();
        assert!(
            failures.is_empty(),
            "{} failed requests (of {} answered); first: {:#?}\n{context}",
            failures.len(),
            self.ok.load(Ordering::SeqCst),
            &failures[..failures.len().min(20)],
        );
    }

    pub fn failures(&self) -> Vec<String> {
        self.failures.lock().unwrap().clone()
    }

    pub fn answered_by(&self, pid: u32) -> u64 {
        self.by_pid.lock().unwrap().get(&pid).copied().unwrap_or(0)
    }

    pub fn slow_answered_by(&self, pid: u32) -> u64 {
        self.slow_by_pid
            .lock()
            .unwrap()
            .get(&pid)
            .copied()
            .unwrap_or(0)
    }

    fn fail(&self, what: String) {
        self.failures.lock().unwrap().push(what);
    }
}

/// Which kind of client.
#[derive(Debug, Clone, Copy)]
pub enum Kind {
    /// GET / on one keep-alive connection, back to back.
    KeepAlive,
    /// GET / with `Connection: close`, a new connection each.
    Fresh,
    /// GET /slow (300 ms) on one keep-alive connection, back to back.
    Slow,
    /// GET / as HTTP/2 streams over one h2c connection (prior knowledge).
    H2,
    /// PUT /kv/w{N} with 1, 2, 3 … on one keep-alive connection (the
    /// key-value example); [`Stats::acked`] keeps the last value answered
    /// 200 per key.
    Writer,
}

/// Clients running on their own runtime until [`Load::finish`].
pub struct Load {
    rt: tokio::runtime::Runtime,
    stop: Arc<AtomicBool>,
    pub stats: Arc<Stats>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// The clients' own runtime (2 workers), their stop flag and their stats.
fn client_parts() -> (tokio::runtime::Runtime, Arc<AtomicBool>, Arc<Stats>) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("client runtime");
    (
        rt,
        Arc::new(AtomicBool::new(false)),
        Arc::new(Stats::default()),
    )
}

impl Load {
    /// `n` sticky clients: each keeps one keep-alive connection and sends
    /// `GET path` on it every `pause`, never retrying; any connection after
    /// its first is a reconnect ([`Stats::reconnects`]). The clients start
    /// one by one, so all `n` have had a first answer (their connections
    /// were accepted by the serving build) when this returns.
    pub fn sticky(addr: SocketAddr, n: usize, path: &'static str, pause: Duration) -> Load {
        let (rt, stop, stats) = client_parts();
        let mut tasks = vec![];
        for i in 0..n {
            let (stop, stats) = (stop.clone(), stats.clone());
            let (tx, rx) = tokio::sync::oneshot::channel();
            tasks.push(rt.spawn(sticky_client(addr, i, path, pause, stop, stats, tx)));
            let _ = rt.block_on(rx);
        }
        Load {
            rt,
            stop,
            stats,
            tasks,
        }
    }

    pub fn start(addr: SocketAddr, clients: &[(Kind, usize)]) -> Load {
        let (rt, stop, stats) = client_parts();
        let mut tasks = vec![];
        for &(kind, n) in clients {
            for i in 0..n {
                let (stop, stats) = (stop.clone(), stats.clone());
                tasks.push(rt.spawn(async move {
                    match kind {
                        Kind::H2 => h2_client(addr, i, stop, stats).await,
                        Kind::Writer => writer(addr, i, stop, stats).await,
                        _ => h1_client(addr, kind, stop, stats).await,
                    }
                }));
            }
        }
        Load {
            rt,
            stop,
            stats,
            tasks,
        }
    }

    /// Stops the clients after their current request and waits for them.
    pub fn finish(self) -> Arc<Stats> {
        self.stop.store(true, Ordering::SeqCst);
        let tasks = self.tasks;
        self.rt.block_on(async {
            for t in tasks {
                let _ = tokio::time::timeout(REQUEST_TIMEOUT * 2, t).await;
            }
        });
        self.rt.shutdown_timeout(Duration::from_secs(1));
        self.stats
    }
}

/// The pid in a body like `hello from pid 1234 …` (or `pid=1234 …`).
fn pid_of(body: &[u8]) -> Option<u32> {
    let s = std::str::from_utf8(body).ok()?;
    let at = s.find("pid ").or_else(|| s.find("pid="))?;
    let rest = &s[at + 4..];
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// A request's body (empty for GETs).
type Body = http_body_util::Full<Bytes>;

/// What came back: status, whether it said `Connection: close`, the body.
type Answer = (hyper::StatusCode, bool, Bytes);

/// A new HTTP/1.1 connection, or `None` after recording why there is none.
async fn connect_h1(
    addr: SocketAddr,
    what: &str,
    stats: &Stats,
) -> Option<hyper::client::conn::http1::SendRequest<Body>> {
    let stream = match TcpStream::connect(addr).await {
        Ok(s) => s,
        Err(e) => {
            stats.fail(format!("{what} connect: {e}"));
            return None;
        }
    };
    let _ = stream.set_nodelay(true);
    match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await {
        Ok((sender, conn)) => {
            tokio::spawn(conn);
            Some(sender)
        }
        Err(e) => {
            stats.fail(format!("{what} handshake: {e}"));
            None
        }
    }
}

/// Sends `req` once and reads the whole answer, within [`REQUEST_TIMEOUT`].
async fn exchange(
    sender: &mut hyper::client::conn::http1::SendRequest<Body>,
    req: Request<Body>,
) -> Result<Answer, String> {
    let answer = async {
        let res = sender
            .send_request(req)
            .await
            .map_err(|e| format!("{e:?}"))?;
        let status = res.status();
        let close = res
            .headers()
            .get("connection")
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
        let body = res
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("body: {e:?}"))?
            .to_bytes();
        Ok((status, close, body))
    };
    tokio::time::timeout(REQUEST_TIMEOUT, answer)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {REQUEST_TIMEOUT:?}")))
}

async fn h1_client(addr: SocketAddr, kind: Kind, stop: Arc<AtomicBool>, stats: Arc<Stats>) {
    let path = if matches!(kind, Kind::Slow) {
        "/slow"
    } else {
        "/"
    };
    let what = format!("{kind:?}");
    'conn: while !stop.load(Ordering::SeqCst) {
        let Some(mut sender) = connect_h1(addr, &what, &stats).await else {
            continue;
        };
        loop {
            if stop.load(Ordering::SeqCst) {
                break 'conn;
            }
            // Closed before we send (the server closed an idle connection,
            // or after `Connection: close`): a new connection, nothing lost.
            if sender.ready().await.is_err() {
                continue 'conn;
            }
            let mut req = Request::get(path).header("host", "test");
            if matches!(kind, Kind::Fresh) {
                req = req.header("connection", "close");
            }
            let req = req.body(Body::default()).expect("request");
            let res = exchange(&mut sender, req).await;
            match res {
                Ok((status, close, body)) if status == 200 => {
                    let Some(pid) = pid_of(&body) else {
                        stats.fail(format!("{kind:?}: body names no pid: {body:?}"));
                        continue 'conn;
                    };
                    stats.ok.fetch_add(1, Ordering::SeqCst);
                    *stats.by_pid.lock().unwrap().entry(pid).or_default() += 1;
                    if matches!(kind, Kind::Slow) {
                        stats.slow_ok.fetch_add(1, Ordering::SeqCst);
                        *stats.slow_by_pid.lock().unwrap().entry(pid).or_default() += 1;
                    }
                    if close || matches!(kind, Kind::Fresh) {
                        continue 'conn;
                    }
                }
                Ok((status, _, body)) => {
                    stats.fail(format!("{kind:?}: status {status}: {body:?}"));
                    continue 'conn;
                }
                Err(e) => {
                    stats.fail(format!("{kind:?}: {e}"));
                    continue 'conn;
                }
            }
        }
    }
}

/// Writes `w{id}` = 1, 2, 3 … and records each acknowledged value. A write
/// that fails is a failure, and the next one goes on with the next value:
/// nothing is ever sent twice.
async fn writer(addr: SocketAddr, id: usize, stop: Arc<AtomicBool>, stats: Arc<Stats>) {
    let key = format!("w{id}");
    let mut seq = 0u64;
    'conn: while !stop.load(Ordering::SeqCst) {
        let Some(mut sender) = connect_h1(addr, "writer", &stats).await else {
            continue;
        };
        while !stop.load(Ordering::SeqCst) {
            if sender.ready().await.is_err() {
                continue 'conn;
            }
            seq += 1;
            let req = Request::put(format!("/kv/{key}"))
                .header("host", "test")
                .body(Body::new(Bytes::from(seq.to_string())))
                .expect("request");
            match exchange(&mut sender, req).await {
                Ok((status, close, _)) if status == 200 => {
                    stats.ok.fetch_add(1, Ordering::SeqCst);
                    stats.acked.lock().unwrap().insert(key.clone(), seq);
                    if close {
                        continue 'conn;
                    }
                }
                Ok((status, _, body)) => {
                    stats.fail(format!("PUT {key}={seq}: status {status}: {body:?}"));
                    continue 'conn;
                }
                Err(e) => {
                    stats.fail(format!("PUT {key}={seq}: {e}"));
                    continue 'conn;
                }
            }
        }
    }
}

/// Every acknowledged write reads back: exactly `writers` keys were
/// acknowledged, and `GET /kv/KEY` answers each one's last acknowledged
/// value.
pub fn assert_acked_read_back(addr: SocketAddr, stats: &Stats, writers: usize) {
    let acked = stats.acked.lock().unwrap().clone();
    assert_eq!(
        acked.len(),
        writers,
        "every writer had writes acknowledged: {acked:?}"
    );
    for (key, value) in &acked {
        let got =
            get_once(addr, &format!("/kv/{key}")).unwrap_or_else(|e| panic!("GET /kv/{key}: {e}"));
        assert_eq!(
            got,
            (200, value.to_string().into_bytes()),
            "{key}: the last acknowledged write ({value}) reads back"
        );
    }
}

/// `GET path` on a fresh connection: status and body.
pub fn get_once(addr: SocketAddr, path: &str) -> Result<(u16, Vec<u8>), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let stats = Stats::default();
        let Some(mut sender) = connect_h1(addr, "GET", &stats).await else {
            return Err(stats.failures().join("; "));
        };
        let req = Request::get(path)
            .header("host", "test")
            .body(Body::default())
            .map_err(|e| e.to_string())?;
        let (status, _, body) = exchange(&mut sender, req).await?;
        Ok((status.as_u16(), body.to_vec()))
    })
}

/// Whether `e` is h2's report of a stream the server's graceful GOAWAY did
/// not process (see [`Stats::h2_unsent`]). A stream the server processed
/// completes before a graceful GOAWAY closes the connection.
fn unprocessed_by_goaway(e: &hyper::Error) -> bool {
    std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<h2::Error>())
        .is_some_and(|h| {
            h.is_go_away() && h.is_remote() && h.reason() == Some(h2::Reason::NO_ERROR)
        })
}

/// Streams over one h2c connection, 4 at a time; a new connection when the
/// server sent GOAWAY (the sender stops being ready).
async fn h2_client(addr: SocketAddr, id: usize, stop: Arc<AtomicBool>, stats: Arc<Stats>) {
    while !stop.load(Ordering::SeqCst) {
        let stream = match TcpStream::connect(addr).await {
            Ok(s) => s,
            Err(e) => {
                stats.fail(format!("h2[{id}] connect: {e}"));
                continue;
            }
        };
        let (sender, conn) =
            match hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
            {
                Ok(x) => x,
                Err(e) => {
                    stats.fail(format!("h2[{id}] handshake: {e}"));
                    continue;
                }
            };
        tokio::spawn(conn);
        let mut streams = vec![];
        for _ in 0..4 {
            let (mut sender, stop, stats) = (sender.clone(), stop.clone(), stats.clone());
            streams.push(tokio::spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    if sender.ready().await.is_err() {
                        return; // GOAWAY or closed: the connection is done
                    }
                    let req = Request::get("/")
                        .version(Version::HTTP_2)
                        .uri(format!("http://{addr}/"))
                        .body(Empty::<Bytes>::new())
                        .expect("request");
                    let res = tokio::time::timeout(REQUEST_TIMEOUT, async {
                        let res = match sender.try_send_request(req).await {
                            Ok(r) => r,
                            Err(mut e) => {
                                if e.take_message().is_some() {
                                    // Never sent: retried on the next connection.
                                    return Ok(None);
                                }
                                let e = e.into_error();
                                if unprocessed_by_goaway(&e) {
                                    return Ok(None);
                                }
                                return Err(format!("{e:?}"));
                            }
                        };
                        let status = res.status();
                        let body = res
                            .into_body()
                            .collect()
                            .await
                            .map_err(|e| format!("body: {e:?}"))?
                            .to_bytes();
                        Ok::<_, String>(Some((status, body)))
                    })
                    .await;
                    let res = match res {
                        Ok(Ok(None)) => {
                            stats.h2_unsent.fetch_add(1, Ordering::SeqCst);
                            return;
                        }
                        Ok(Ok(Some(x))) => Ok(Ok(x)),
                        Ok(Err(e)) => Ok(Err(e)),
                        Err(e) => Err(e),
                    };
                    match res {
                        Ok(Ok((status, body))) if status == 200 => match pid_of(&body) {
                            Some(pid) => {
                                stats.ok.fetch_add(1, Ordering::SeqCst);
                                stats.h2_ok.fetch_add(1, Ordering::SeqCst);
                                *stats.by_pid.lock().unwrap().entry(pid).or_default() += 1;
                            }
                            None => stats.fail(format!("h2: body names no pid: {body:?}")),
                        },
                        Ok(Ok((status, body))) => {
                            stats.fail(format!("h2: status {status}: {body:?}"))
                        }
                        Ok(Err(e)) => {
                            stats.fail(format!("h2 stream: {e}"));
                            return;
                        }
                        Err(_) => {
                            stats.fail(format!("h2: no answer within {REQUEST_TIMEOUT:?}"));
                            return;
                        }
                    }
                }
            }));
        }
        for s in streams {
            let _ = s.await;
        }
    }
}

/// One sticky client (see [`Load::sticky`]); says on `connected` once its
/// first request is answered.
async fn sticky_client(
    addr: SocketAddr,
    id: usize,
    path: &'static str,
    pause: Duration,
    stop: Arc<AtomicBool>,
    stats: Arc<Stats>,
    connected: tokio::sync::oneshot::Sender<()>,
) {
    let mut connected = Some(connected);
    let mut first_port = None;
    let mut why_new: Option<String> = None;
    'conn: while !stop.load(Ordering::SeqCst) {
        let stream = match TcpStream::connect(addr).await {
            Ok(s) => s,
            Err(e) => {
                stats.fail(format!("sticky[{id}] connect: {e}"));
                // Pacing, not waiting for a condition: the failure is
                // recorded; the next attempt comes at the client's pace.
                tokio::time::sleep(pause).await;
                continue;
            }
        };
        let port = stream.local_addr().map(|a| a.port()).unwrap_or(0);
        let first = *first_port.get_or_insert(port);
        if let Some(why) = why_new.take() {
            stats
                .reconnects
                .lock()
                .unwrap()
                .push(format!("sticky[{id}] port {port}: {why}"));
        }
        let _ = stream.set_nodelay(true);
        let mut sender = match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await {
            Ok((sender, conn)) => {
                tokio::spawn(conn);
                sender
            }
            Err(e) => {
                stats.fail(format!("sticky[{id}] handshake: {e}"));
                continue;
            }
        };
        loop {
            if stop.load(Ordering::SeqCst) {
                break 'conn;
            }
            if sender.ready().await.is_err() {
                why_new = Some("the server closed the idle connection".into());
                continue 'conn;
            }
            let req = Request::get(path)
                .header("host", "test")
                .body(Body::default())
                .expect("request");
            match exchange(&mut sender, req).await {
                Ok((status, close, body)) if status == 200 => {
                    let Some(pid) = pid_of(&body) else {
                        stats.fail(format!("sticky[{id}]: body names no pid: {body:?}"));
                        why_new = Some("a body with no pid".into());
                        continue 'conn;
                    };
                    stats.ok.fetch_add(1, Ordering::SeqCst);
                    *stats.by_pid.lock().unwrap().entry(pid).or_default() += 1;
                    stats.sticky.lock().unwrap().insert(id, (first, port, pid));
                    // Connected means answered: a connection that is only
                    // established may still wait in the listen backlog, and
                    // an upgrade starting then has it accepted by the new
                    // build, never moved (the moved count of a test that
                    // started upgrading at once came out one short).
                    if let Some(tx) = connected.take() {
                        let _ = tx.send(());
                    }
                    if close {
                        why_new = Some(format!("pid {pid} answered with `Connection: close`"));
                        continue 'conn;
                    }
                }
                Ok((status, _, body)) => {
                    stats.fail(format!("sticky[{id}]: status {status}: {body:?}"));
                    why_new = Some("after a failed request".into());
                    continue 'conn;
                }
                Err(e) => {
                    stats.fail(format!("sticky[{id}]: {e}"));
                    why_new = Some("after a failed request".into());
                    continue 'conn;
                }
            }
            // The behaviour under test: a keep-alive connection that sits
            // idle between requests, as real clients' do.
            tokio::time::sleep(pause).await;
        }
    }
}
