//! The HTTP drain in isolation: a real hyper server on 127.0.0.1 behind
//! [`Handoff::serve`], its phase moved by hand, and raw TCP clients that see
//! exactly what the wire carries (`Connection: close`, FIN vs RST).

use std::sync::Arc;
use std::time::Duration;

use axum::routing::{get, put};
use axum::Router;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::handoff::Handoff;
use crate::phase::{Graces, Phase, Retirement, Shared};

const BOUND: Duration = Duration::from_secs(10);

/// The drain's graces, in milliseconds: idle, first request, request head.
fn graces_ms(idle: u64, first_request: u64, head: u64) -> Graces {
    Graces {
        idle: Duration::from_millis(idle),
        first_request: Duration::from_millis(first_request),
        head: Duration::from_millis(head),
        min_body_rate: 65536,
        header_read: Duration::from_secs(30),
    }
}

/// Waits (bounded) for `serve` to return, and checks it returned `Ok`.
async fn serve_returned_ok(serving: tokio::task::JoinHandle<Result<(), crate::Error>>) {
    let r = tokio::time::timeout(BOUND, serving)
        .await
        .expect("serve returned");
    assert!(r.unwrap().is_ok());
}

struct Server {
    handoff: Handoff,
    addr: std::net::SocketAddr,
    serving: tokio::task::JoinHandle<Result<(), crate::Error>>,
}

impl Server {
    async fn start(idle: Duration) -> Server {
        Server::start_with(
            true,
            Graces {
                idle,
                first_request: Duration::from_secs(2),
                head: Duration::from_secs(1),
                min_body_rate: 65536,
                header_read: Duration::from_secs(30),
            },
        )
        .await
    }

    async fn start_with(stateless: bool, graces: Graces) -> Server {
        let handoff = Handoff::for_tests(stateless, graces);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new()
            .route("/", get(|| async { "ok" }))
            .route(
                "/slow",
                get(|| async {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    "slow"
                }),
            )
            .route("/echo", put(|body: axum::body::Bytes| async move { body }))
            .route(
                "/stream",
                get(|| async {
                    axum::body::Body::new(Ticking {
                        left: 3,
                        next: Box::pin(tokio::time::sleep(TICK)),
                    })
                }),
            );
        let h = handoff.clone();
        let serving = tokio::spawn(async move { h.serve(listener, app).await });
        Server {
            handoff,
            addr,
            serving,
        }
    }

    fn shared(&self) -> &Arc<Shared> {
        &self.handoff.inner.shared
    }
}

/// Writes `GET path` and reads one response: (head, body).
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    path: &str,
) -> std::io::Result<(String, String)> {
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())
        .await?;
    read_response(s).await
}

async fn read_response<S: AsyncRead + Unpin>(s: &mut S) -> std::io::Result<(String, String)> {
    let mut buf = Vec::new();
    let mut b = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if tokio::time::timeout(BOUND, s.read(&mut b)).await?? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.push(b[0]);
    }
    let head = String::from_utf8_lossy(&buf).to_ascii_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await?;
    Ok((head, String::from_utf8_lossy(&body).into_owned()))
}

/// Polls (bounded) until no connection could run a request any more: what
/// a stateful drain waits for. (`Shared::wait_blocking` would block this
/// single-threaded test runtime, and with it the connections.)
async fn no_open_connections(shared: &Shared) -> bool {
    let end = tokio::time::Instant::now() + BOUND;
    while shared.open_connections() > 0 {
        if tokio::time::Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    true
}

/// Reads until EOF (bounded): `Ok` for a clean FIN, `Err` for a reset.
async fn expect_eof<S: AsyncRead + Unpin>(s: &mut S) -> std::io::Result<()> {
    let mut b = [0u8; 64];
    loop {
        match tokio::time::timeout(BOUND, s.read(&mut b)).await? {
            Ok(0) => return Ok(()),
            Ok(_) => continue,
            Err(e) => return Err(e),
        }
    }
}

#[tokio::test]
async fn an_idle_keep_alive_client_gets_its_next_request_answered_then_closed() {
    let srv = Server::start(Duration::from_secs(5)).await;
    let mut c = TcpStream::connect(srv.addr).await.unwrap();
    let (head, _) = exchange(&mut c, "/").await.unwrap();
    assert!(!head.contains("connection: close"), "{head}");
    srv.shared().set_phase(Phase::Draining);
    // Within the idle grace: answered, not met by a closed socket.
    let (head, body) = exchange(&mut c, "/").await.unwrap();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    assert_eq!(body, "ok");
    expect_eof(&mut c)
        .await
        .expect("a FIN after the answer, not a reset");
}

#[tokio::test]
async fn a_request_in_flight_when_the_drain_starts_is_answered_with_connection_close() {
    let srv = Server::start(Duration::from_secs(5)).await;
    let mut c = TcpStream::connect(srv.addr).await.unwrap();
    exchange(&mut c, "/").await.unwrap();
    c.write_all(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    // Written before the drain begins: whether the server is already
    // running it or reads it during the grace, it is answered, with
    // `Connection: close`, and only then is the connection closed.
    srv.shared().set_phase(Phase::Draining);
    let (head, body) = read_response(&mut c).await.unwrap();
    assert!(head.contains("connection: close"), "{head}");
    assert_eq!(body, "slow");
    expect_eof(&mut c).await.unwrap();
}

#[tokio::test]
async fn an_idle_connection_is_closed_with_a_fin_once_the_grace_is_over() {
    let srv = Server::start(Duration::from_millis(50)).await;
    let mut c = TcpStream::connect(srv.addr).await.unwrap();
    exchange(&mut c, "/").await.unwrap();
    srv.shared().set_phase(Phase::Draining);
    expect_eof(&mut c).await.expect("closed cleanly");
    // It stayed counted until closed; now nothing is open.
    let closed = srv
        .shared()
        .connections_closed(std::time::Instant::now() + BOUND)
        .await;
    assert!(
        closed,
        "{} connections still open",
        srv.shared().open_connections()
    );
}

#[tokio::test]
async fn an_aborted_drain_leaves_connections_serving_and_accepting_resumes() {
    let srv = Server::start(Duration::from_secs(5)).await;
    let mut c = TcpStream::connect(srv.addr).await.unwrap();
    exchange(&mut c, "/").await.unwrap();
    srv.shared().set_phase(Phase::Draining);
    // Not accepting while draining: a new connection waits in the backlog
    // and its request is answered once the handoff aborts.
    let mut late = TcpStream::connect(srv.addr).await.unwrap();
    late.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let too_early =
        tokio::time::timeout(Duration::from_millis(200), late.read(&mut [0u8; 1])).await;
    assert!(
        too_early.is_err(),
        "a draining process accepted: {too_early:?}"
    );
    srv.shared().set_phase(Phase::Serving);
    let (head, _) = read_response(&mut late).await.unwrap();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    for _ in 0..2 {
        let (head, _) = exchange(&mut c, "/").await.unwrap();
        assert!(
            !head.contains("connection: close"),
            "kept alive after the abort: {head}"
        );
    }
}

#[tokio::test]
async fn serve_returns_once_retired_and_every_connection_is_done() {
    let srv = Server::start(Duration::from_millis(50)).await;
    let mut idle = TcpStream::connect(srv.addr).await.unwrap();
    exchange(&mut idle, "/").await.unwrap();
    let mut busy = TcpStream::connect(srv.addr).await.unwrap();
    exchange(&mut busy, "/").await.unwrap();
    busy.write_all(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    srv.shared()
        .set_phase(Phase::Retired(Retirement::Committed));
    let (head, body) = read_response(&mut busy).await.unwrap();
    assert!(
        head.contains("connection: close") && body == "slow",
        "{head}{body}"
    );
    expect_eof(&mut idle).await.unwrap();
    serve_returned_ok(srv.serving).await;
}

/// An upgraded connection (what WebSocket rides on) leaves hyper, but not
/// the drain: it stays counted, `serve` waits for it within the grace, and
/// it keeps working meanwhile.
#[tokio::test]
async fn an_upgraded_connection_gets_the_drain_grace() {
    use axum::body::Body;
    use axum::http::{Request, Response, StatusCode};
    use hyper_util::rt::TokioIo;

    let handoff = Handoff::for_tests(true, graces_ms(50, 2000, 1000));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // `/echo` switches to a line echo protocol (a stand-in for WebSocket).
    let app = Router::new().route(
        "/echo",
        get(|mut req: Request<Body>| async move {
            let on = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                let Ok(up) = on.await else { return };
                let mut io = TokioIo::new(up);
                let mut b = [0u8; 64];
                while let Ok(n) = io.read(&mut b).await {
                    if n == 0 || io.write_all(&b[..n]).await.is_err() {
                        break;
                    }
                }
            });
            Response::builder()
                .status(StatusCode::SWITCHING_PROTOCOLS)
                .header("connection", "upgrade")
                .header("upgrade", "echo")
                .body(Body::empty())
                .unwrap()
        }),
    );
    let h = handoff.clone();
    let mut serving = tokio::spawn(async move { h.serve(listener, app).await });

    let mut c = TcpStream::connect(addr).await.unwrap();
    c.write_all(b"GET /echo HTTP/1.1\r\nHost: t\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n")
        .await
        .unwrap();
    let (head, _) = read_response(&mut c).await.unwrap();
    assert!(head.starts_with("http/1.1 101"), "{head}");

    handoff
        .inner
        .shared
        .set_phase(Phase::Retired(Retirement::Committed));
    // Well past the idle grace: still up, still echoing, serve still waiting.
    for word in [&b"one"[..], b"two", b"three"] {
        c.write_all(word).await.unwrap();
        let mut got = vec![0u8; word.len()];
        tokio::time::timeout(BOUND, c.read_exact(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, word);
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(100), &mut serving)
            .await
            .is_err(),
        "serve returned with an upgraded connection open"
    );
    drop(c); // the client ends it; serve then returns
    serve_returned_ok(serving).await;
}

/// What a stateful seal does to connections that outlived the drain
/// grace: they are dropped at once, so none runs a request after the
/// state was handed on.
#[tokio::test]
async fn a_cut_drops_every_connection_at_once() {
    let srv = Server::start(Duration::from_secs(30)).await;
    let mut idle = TcpStream::connect(srv.addr).await.unwrap();
    exchange(&mut idle, "/").await.unwrap();
    srv.shared().set_phase(Phase::Draining);
    srv.shared().cut();
    let mut b = [0u8; 16];
    let r = tokio::time::timeout(BOUND, idle.read(&mut b))
        .await
        .expect("closed within the bound");
    assert!(matches!(r, Ok(0) | Err(_)), "still open: {r:?}");
    let gone = srv
        .shared()
        .connections_closed(std::time::Instant::now() + BOUND)
        .await;
    assert!(gone, "{} still counted", srv.shared().open_connections());
    // An aborted handoff serves again, and new connections are not cut.
    srv.shared().set_phase(Phase::Serving);
    let mut c = TcpStream::connect(srv.addr).await.unwrap();
    for _ in 0..2 {
        let (head, _) = exchange(&mut c, "/").await.unwrap();
        assert!(head.starts_with("http/1.1 200"), "{head}");
    }
}

/// `shutdown_signal` (for servers `serve` does not cover) fires only when
/// this process is done for good, not while a handoff that may still abort
/// drains it.
#[tokio::test]
async fn the_shutdown_signal_fires_on_retirement_only() {
    let handoff = Handoff::for_tests(true, graces_ms(50, 2000, 1000));
    let mut signal = tokio::spawn(handoff.shutdown_signal());
    let shared = handoff.inner.shared.clone();
    shared.set_phase(Phase::Serving);
    shared.set_phase(Phase::Draining);
    shared.set_phase(Phase::Serving); // the handoff aborted
    assert!(
        tokio::time::timeout(Duration::from_millis(100), &mut signal)
            .await
            .is_err(),
        "fired before retirement"
    );
    shared.set_phase(Phase::Retired(Retirement::Committed));
    tokio::time::timeout(BOUND, signal)
        .await
        .expect("fired on retirement")
        .unwrap();
}

/// The same drain over a Unix listening socket (a service behind a reverse
/// proxy): answered with `Connection: close`, then a clean EOF.
#[tokio::test]
async fn a_unix_listener_drains_the_same_way() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("http.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let handoff = Handoff::for_tests(true, graces_ms(5000, 2000, 1000));
    let h = handoff.clone();
    let app = Router::new().route("/", get(|| async { "ok" }));
    let serving = tokio::spawn(async move { h.serve(listener, app).await });
    let mut c = tokio::net::UnixStream::connect(&path).await.unwrap();
    let (head, body) = exchange(&mut c, "/").await.unwrap();
    assert!(
        head.starts_with("http/1.1 200") && body == "ok",
        "{head}{body}"
    );
    handoff
        .inner
        .shared
        .set_phase(Phase::Retired(Retirement::Committed));
    let (head, _) = exchange(&mut c, "/").await.unwrap();
    assert!(head.contains("connection: close"), "{head}");
    expect_eof(&mut c).await.unwrap();
    serve_returned_ok(serving).await;
}

/// At the connection cap nothing more is accepted — the connection waits
/// in the backlog rather than the process running out of descriptors — and
/// it is served as soon as one closes.
#[tokio::test]
async fn at_the_connection_cap_new_connections_wait_in_the_backlog() {
    let srv = Server::start(Duration::from_secs(5)).await;
    srv.shared().set_max_connections(2);
    let mut a = TcpStream::connect(srv.addr).await.unwrap();
    exchange(&mut a, "/").await.unwrap();
    let mut b = TcpStream::connect(srv.addr).await.unwrap();
    exchange(&mut b, "/").await.unwrap();
    let mut c = TcpStream::connect(srv.addr).await.unwrap();
    c.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let early = tokio::time::timeout(Duration::from_millis(200), c.read(&mut [0u8; 1])).await;
    assert!(early.is_err(), "accepted past the cap: {early:?}");
    drop(a);
    let (head, body) = read_response(&mut c).await.unwrap();
    assert!(
        head.starts_with("http/1.1 200") && body == "ok",
        "{head}{body}"
    );
}

/// A client that stopped halfway through a request head (slowloris), on a
/// fresh connection and on one that already had a request answered: once
/// draining, each is answered 408 after the head grace and closed with a
/// FIN, and a stateful drain is not held for them. (Before, hyper kept the
/// fresh one reading until the drain's hard deadline and dropped the other
/// unanswered.)
#[tokio::test]
async fn a_half_sent_head_is_answered_408_once_the_head_grace_is_over() {
    let srv = Server::start_with(false, graces_ms(50, 50, 200)).await;
    srv.shared().set_phase(Phase::Serving);
    let mut fresh = TcpStream::connect(srv.addr).await.unwrap();
    fresh
        .write_all(b"GET / HTTP/1.1\r\nHost: t\r\n")
        .await
        .unwrap();
    let mut used = TcpStream::connect(srv.addr).await.unwrap();
    exchange(&mut used, "/").await.unwrap();
    used.write_all(b"GET / HTTP/1.1\r\nHo").await.unwrap();
    // Both heads are in hyper's hands before the drain starts.
    tokio::task::yield_now().await;
    srv.shared().set_phase(Phase::Draining);
    for (name, c) in [("fresh", &mut fresh), ("used", &mut used)] {
        let (head, body) = read_response(c)
            .await
            .unwrap_or_else(|e| panic!("{name}: no answer to its half head: {e}"));
        assert!(head.starts_with("http/1.1 408"), "{name}: {head}");
        assert!(head.contains("connection: close"), "{name}: {head}");
        assert_eq!(body, "", "{name}");
        expect_eof(c)
            .await
            .unwrap_or_else(|e| panic!("{name}: a reset instead of a FIN: {e}"));
    }
    // The stateful drain's condition: no connection that could still run
    // a request.
    assert!(
        no_open_connections(srv.shared()).await,
        "{} connections still open",
        srv.shared().open_connections()
    );
}

/// While serving, the header-read timeout (`Graces::header_read`, kept by
/// `conn::drive` rather than hyper): a connection that sends no request
/// head for that long after its last response — or after its accept — is
/// closed with a FIN, a half-sent head first answered 408; a request that
/// takes longer than the timeout is not cut by it, and its connection stays
/// open for the next one.
#[tokio::test]
async fn while_serving_the_header_read_timeout_closes_idle_and_half_sent_connections() {
    let timeout = Duration::from_millis(150);
    let srv = Server::start_with(
        true,
        Graces {
            header_read: timeout,
            ..graces_ms(5000, 5000, 5000)
        },
    )
    .await;
    let mut idle = TcpStream::connect(srv.addr).await.unwrap();
    // Before the request: its answer, which starts the clock, comes later.
    let idle_since = std::time::Instant::now();
    exchange(&mut idle, "/").await.unwrap();
    // Before the connect: the accept, which starts the clock, comes later.
    let silent_since = std::time::Instant::now();
    let mut silent = TcpStream::connect(srv.addr).await.unwrap();
    let mut half = TcpStream::connect(srv.addr).await.unwrap();
    exchange(&mut half, "/").await.unwrap();
    half.write_all(b"GET / HTTP/1.1\r\nHo").await.unwrap();
    // `/slow` answers after 300 ms: twice the timeout, in flight.
    let mut slow = TcpStream::connect(srv.addr).await.unwrap();
    let (head, body) = exchange(&mut slow, "/slow").await.unwrap();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(!head.contains("connection: close"), "{head}");
    assert_eq!(body, "slow");

    for (name, c, since) in [
        ("idle", &mut idle, idle_since),
        ("silent", &mut silent, silent_since),
    ] {
        expect_eof(c)
            .await
            .unwrap_or_else(|e| panic!("{name}: a reset instead of a FIN: {e}"));
        assert!(
            since.elapsed() >= timeout,
            "{name}: closed {:?} after its last response or accept, before the timeout",
            since.elapsed()
        );
    }
    let (head, body) = read_response(&mut half)
        .await
        .unwrap_or_else(|e| panic!("no answer to the half-sent head: {e}"));
    assert!(head.starts_with("http/1.1 408"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    assert_eq!(body, "");
    expect_eof(&mut half)
        .await
        .unwrap_or_else(|e| panic!("a reset instead of a FIN after the 408: {e}"));
    // The slow request's connection was answered and kept; it is served
    // again (its own idle clock started at that answer).
    let (head, body) = exchange(&mut slow, "/").await.unwrap();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert_eq!(body, "ok");
}

/// A connection waiting out its idle grace in a drain that does not move
/// connections (`handoff stop`, notify mode, an old peer) waits: hyper is
/// not polled in a loop meanwhile. (It was: hyper flushes at every poll,
/// each flush woke the drive loop, which polled hyper again — every such
/// connection spun a core's worth of wake-ups until its grace ran out.)
#[tokio::test]
async fn a_connection_waiting_out_its_grace_is_not_polled_in_a_loop() {
    let srv = Server::start(Duration::from_millis(300)).await;
    let mut c = TcpStream::connect(srv.addr).await.unwrap();
    exchange(&mut c, "/").await.unwrap();
    let before = super::linger::FLUSHES.with(|f| f.get());
    let started = std::time::Instant::now();
    srv.shared().set_phase(Phase::Draining);
    expect_eof(&mut c).await.unwrap();
    let polls = super::linger::FLUSHES.with(|f| f.get()) - before;
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "closed before its idle grace"
    );
    assert!(
        polls < 20,
        "hyper was polled {polls} times while the connection waited out {:?}",
        started.elapsed()
    );
}

/// Graces as long as the builder takes them (`Duration::MAX` is capped at
/// `LONGEST`): every deadline built from them is computed without
/// overflowing — the connection is served, and closed by the drain's short
/// idle grace.
#[tokio::test]
async fn the_longest_graces_serve_and_drain_without_overflow() {
    let srv = Server::start_with(
        true,
        Graces {
            head: crate::handoff::LONGEST,
            header_read: crate::handoff::LONGEST,
            ..graces_ms(20, 20, 20)
        },
    )
    .await;
    let mut c = TcpStream::connect(srv.addr).await.unwrap();
    let (head, body) = exchange(&mut c, "/").await.unwrap();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert_eq!(body, "ok");
    srv.shared().set_phase(Phase::Draining);
    expect_eof(&mut c)
        .await
        .unwrap_or_else(|e| panic!("a reset instead of a FIN: {e}"));
}

/// A head completed within the head grace is a request like any other:
/// answered (with `Connection: close`), not 408.
#[tokio::test]
async fn a_head_finished_within_the_head_grace_is_answered() {
    let srv = Server::start_with(true, graces_ms(50, 50, 5000)).await;
    let mut c = TcpStream::connect(srv.addr).await.unwrap();
    c.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
    tokio::task::yield_now().await;
    srv.shared().set_phase(Phase::Draining);
    // Past the idle and first-request graces, within the head grace.
    let closed_early =
        tokio::time::timeout(Duration::from_millis(300), c.read(&mut [0u8; 1])).await;
    assert!(
        closed_early.is_err(),
        "closed before the head grace: {closed_early:?}"
    );
    c.write_all(b"Host: t\r\n\r\n").await.unwrap();
    let (head, body) = read_response(&mut c).await.unwrap();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    assert_eq!(body, "ok");
}

/// A PUT whose client sent the head and 2 of its 10 body bytes, then
/// stopped (a "slow POST"): what `/echo` has read so far.
async fn stalled_body(addr: std::net::SocketAddr) -> TcpStream {
    let mut c = TcpStream::connect(addr).await.unwrap();
    c.write_all(b"PUT /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nab")
        .await
        .unwrap();
    c
}

/// Issue 14, item 4, the body's turn: a client that stops halfway through
/// a request *body* no longer holds a stateful drain until the drain grace.
/// Once draining, the service's read of the body fails after the head
/// grace; axum answers its body error, which goes out as `408` with
/// `Connection: close`, and the connection closes with a FIN.
#[tokio::test]
async fn a_stalled_request_body_is_cut_408_once_the_head_grace_is_over() {
    let srv = Server::start_with(false, graces_ms(50, 50, 200)).await;
    srv.shared().set_phase(Phase::Serving);
    let mut c = stalled_body(srv.addr).await;
    tokio::task::yield_now().await;
    srv.shared().set_phase(Phase::Draining);
    let (head, _) = read_response(&mut c)
        .await
        .expect("the stalled body is answered");
    assert!(head.starts_with("http/1.1 408"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    expect_eof(&mut c)
        .await
        .expect("a FIN after the 408, not a reset");
    assert!(
        no_open_connections(srv.shared()).await,
        "{} connections still open: the stalled body holds the drain",
        srv.shared().open_connections()
    );
}

/// The body rule bounds a drain, not a client: while serving, a body may
/// take its time, and one that finishes within the grace once draining is
/// answered like any other request.
#[tokio::test]
async fn a_body_that_finishes_in_time_is_answered() {
    let srv = Server::start_with(true, graces_ms(50, 50, 100)).await;
    srv.shared().set_phase(Phase::Serving);
    let mut c = stalled_body(srv.addr).await;
    // Serving: well past the head grace, not cut.
    let early = tokio::time::timeout(Duration::from_millis(300), c.read(&mut [0u8; 1])).await;
    assert!(early.is_err(), "answered while serving: {early:?}");
    c.write_all(b"cdef").await.unwrap();
    // Draining, with a long grace: the rest arrives in time.
    srv.shared().set_phase(Phase::Draining);
    c.write_all(b"ghij").await.unwrap();
    let (head, body) = read_response(&mut c).await.unwrap();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    assert_eq!(body, "abcdefghij");
}

/// An aborted drain lifts the body's deadline: the stalled client, still
/// connected, finishes its request later and is answered.
#[tokio::test]
async fn an_aborted_drain_lifts_the_body_deadline() {
    let srv = Server::start_with(true, graces_ms(50, 50, 150)).await;
    srv.shared().set_phase(Phase::Serving);
    let mut c = stalled_body(srv.addr).await;
    tokio::task::yield_now().await;
    srv.shared().set_phase(Phase::Draining);
    srv.shared().set_phase(Phase::Serving);
    // Past the head grace of that drain: not cut, since it was aborted.
    let early = tokio::time::timeout(Duration::from_millis(400), c.read(&mut [0u8; 1])).await;
    assert!(early.is_err(), "cut after the drain aborted: {early:?}");
    c.write_all(b"cdefghij").await.unwrap();
    let (head, body) = read_response(&mut c).await.unwrap();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(!head.contains("connection: close"), "{head}");
    assert_eq!(body, "abcdefghij");
}

/// Once a connection is closed (FIN sent), waiting for the client's EOF is
/// the socket's business, not the drain's: a client that never closes its
/// side does not hold a stateful drain, though the socket stays counted
/// (a descriptor in use) until it closes or the linger runs out.
#[tokio::test]
async fn a_client_slow_to_close_does_not_hold_the_drain() {
    let srv = Server::start_with(false, graces_ms(20, 20, 20)).await;
    srv.shared().set_phase(Phase::Serving);
    let mut c = TcpStream::connect(srv.addr).await.unwrap();
    exchange(&mut c, "/").await.unwrap();
    srv.shared().set_phase(Phase::Draining);
    // The client neither reads nor closes: only the drain moves.
    assert!(
        no_open_connections(srv.shared()).await,
        "the drain still counts the connection"
    );
    assert_eq!(
        srv.shared().open_sockets(),
        1,
        "the socket is still closing (the client has not closed yet)"
    );
    expect_eof(&mut c).await.expect("closed with a FIN");
    drop(c);
    let closed = srv
        .shared()
        .connections_closed(std::time::Instant::now() + BOUND)
        .await;
    assert!(closed, "{} sockets still open", srv.shared().open_sockets());
}

/// An IO that yields `prefix` before the stream's own bytes: what a
/// connection's new owner puts in front of it so the bytes the old owner
/// had read and not parsed are read again.
struct Prefixed<I> {
    prefix: bytes::Bytes,
    io: I,
}

impl<I: AsyncRead + Unpin> AsyncRead for Prefixed<I> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            let head = self.prefix.split_to(n);
            buf.put_slice(&head);
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Prefixed<I> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The hyper behaviour issue 15 (moving live keep-alive connections to the
/// new build) is designed on, pinned so an upgrade of hyper that changes it
/// fails here first: an HTTP/1.1 connection idle between requests — its
/// response written and flushed — can be taken out of hyper as it stands,
/// with `into_parts` and no shutdown, with its socket open and the bytes
/// hyper had read but not parsed (half of the client's next request,
/// pipelined behind the first); a second hyper connection on that socket,
/// those bytes put back in front, answers the rest as if nothing had
/// happened: same TCP connection, no error. (Bytes hyper had not read yet
/// simply stay in the socket, which moves with its descriptor.)
#[tokio::test]
async fn hyper_gives_back_an_idle_http1_connection_with_its_unread_bytes() {
    use hyper::server::conn::http1;
    use hyper_util::rt::TokioIo;
    use std::future::Future;

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (half_sent, half_sent_rx) = tokio::sync::oneshot::channel::<()>();
    let (rest, rest_rx) = tokio::sync::oneshot::channel::<()>();
    let client = tokio::spawn(async move {
        let mut c = TcpStream::connect(addr).await.unwrap();
        let port = c.local_addr().unwrap().port();
        // Pipelined: hyper reads both in one go, answers the first and
        // holds half of the second in its buffer.
        c.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\nGET /next HTTP/1.1\r\nHo")
            .await
            .unwrap();
        let (_, first) = read_response(&mut c).await.unwrap();
        half_sent.send(()).unwrap();
        rest_rx.await.unwrap();
        c.write_all(b"st: t\r\n\r\n").await.unwrap();
        let (head, second) = read_response(&mut c).await.unwrap();
        (port, first, head, second, c.local_addr().unwrap().port())
    });

    let (s, peer) = listener.accept().await.unwrap();
    // Boxed futures: `poll_without_shutdown` wants the service's future
    // `Unpin` (handoff-tokio's own service wrapper boxes its futures too).
    type Answer = std::pin::Pin<
        Box<dyn Future<Output = Result<http::Response<String>, std::convert::Infallible>> + Send>,
    >;
    let answer = |who: &'static str| {
        hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| -> Answer {
            Box::pin(async move { Ok(http::Response::new(format!("{who} {}", req.uri()))) })
        })
    };
    let mut old = http1::Builder::new().serve_connection(TokioIo::new(s), answer("old"));
    // Serve the first request; once the client has its answer (and has
    // sent half of its next request, which hyper read with the first),
    // the connection is idle: stop polling it and take it apart.
    let mut half_sent_rx = half_sent_rx;
    let served = std::future::poll_fn(|cx| {
        if let std::task::Poll::Ready(r) = std::pin::Pin::new(&mut half_sent_rx).poll(cx) {
            r.unwrap();
            return std::task::Poll::Ready(());
        }
        match std::pin::Pin::new(&mut old).poll(cx) {
            std::task::Poll::Ready(r) => panic!("the connection ended: {r:?}"),
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    });
    tokio::time::timeout(BOUND, served).await.unwrap();
    let parts = old.into_parts();
    let unread = parts.read_buf.clone();
    assert_eq!(
        &unread[..],
        b"GET /next HTTP/1.1\r\nHo",
        "hyper gives back what it read and did not parse"
    );
    let io = parts.io.into_inner();
    assert_eq!(io.peer_addr().unwrap(), peer, "the same socket, still open");

    // The new owner: another hyper connection, the unread bytes first.
    let new = http1::Builder::new()
        .serve_connection(TokioIo::new(Prefixed { prefix: unread, io }), answer("new"));
    let serving = tokio::spawn(new);
    rest.send(()).unwrap();
    let (port, first, head, second, port_after) =
        tokio::time::timeout(BOUND, client).await.unwrap().unwrap();
    assert_eq!(first, "old /");
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert_eq!(second, "new /next", "answered by the new owner");
    assert_eq!(port, port_after, "one TCP connection throughout");
    serving.abort();
}

/// How far apart `/stream` sends its three chunks.
const TICK: Duration = Duration::from_millis(150);

/// A response body that streams: a chunk every [`TICK`], `left` more.
struct Ticking {
    left: u8,
    next: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl http_body::Body for Ticking {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        if self.left == 0 {
            return std::task::Poll::Ready(None);
        }
        std::task::ready!(std::future::Future::poll(self.next.as_mut(), cx));
        self.left -= 1;
        let at = tokio::time::Instant::now() + TICK;
        self.next.as_mut().reset(at);
        std::task::Poll::Ready(Some(Ok(http_body::Frame::data(bytes::Bytes::from(
            format!("tick {}\n", self.left),
        )))))
    }
}

/// Reads a chunked body up to its last chunk (bounded).
async fn read_chunked_to_end<S: AsyncRead + Unpin>(s: &mut S, buf: &mut Vec<u8>) {
    let mut b = [0u8; 256];
    while !buf.ends_with(b"0\r\n\r\n") {
        let n = tokio::time::timeout(BOUND, s.read(&mut b))
            .await
            .expect("the body kept coming")
            .unwrap();
        assert!(n > 0, "closed mid-body: {}", String::from_utf8_lossy(buf));
        buf.extend_from_slice(&b[..n]);
    }
}

/// A connection is taken out of hyper to move only once hyper has written
/// the whole of its last response: a drain that moves connections starts
/// while a response body is still streaming, and the connection is offered
/// only after the body's last chunk — which the client gets, whole, on a
/// connection that stays open. (Taken apart mid-body, the rest of the body
/// would be lost with hyper's buffers.)
#[tokio::test]
async fn a_streaming_response_is_finished_before_its_connection_moves() {
    let srv = Server::start(Duration::from_secs(5)).await;
    let mut c = TcpStream::connect(srv.addr).await.unwrap();
    exchange(&mut c, "/").await.unwrap();
    c.write_all(b"GET /stream HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    // The head and the first chunk are out: the body is streaming.
    let mut got = Vec::new();
    let mut b = [0u8; 256];
    while !String::from_utf8_lossy(&got).contains("tick 2") {
        let n = tokio::time::timeout(BOUND, c.read(&mut b))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0);
        got.extend_from_slice(&b[..n]);
    }
    let mover = handoff::test_hooks::queueing_mover();
    srv.shared().start_moving(mover.clone());
    srv.shared().set_phase(Phase::Draining);
    // Mid-body (two chunks to come, a tick apart), nothing is offered: the
    // drain has seen the phase (the control side would have) by the time a
    // tick has passed.
    let mid = tokio::time::Instant::now() + TICK / 2;
    while tokio::time::Instant::now() < mid {
        assert_eq!(handoff::test_hooks::queued(&mover), 0, "offered mid-body");
        tokio::task::yield_now().await;
    }
    read_chunked_to_end(&mut c, &mut got).await;
    let text = String::from_utf8_lossy(&got).into_owned();
    assert!(text.contains("tick 1") && text.contains("tick 0"), "{text}");
    assert!(
        !text.to_ascii_lowercase().contains("connection: close"),
        "{text}"
    );
    // Then, idle, it moves: offered, and open (nothing closes a moving one).
    let end = tokio::time::Instant::now() + BOUND;
    while handoff::test_hooks::queued(&mover) == 0 {
        assert!(tokio::time::Instant::now() < end, "never offered");
        tokio::task::yield_now().await;
    }
    assert_eq!(handoff::test_hooks::queued(&mover), 1);
    let still_open = tokio::time::timeout(Duration::from_millis(50), c.read(&mut b)).await;
    assert!(
        still_open.is_err(),
        "the connection was closed: {still_open:?}"
    );
}
