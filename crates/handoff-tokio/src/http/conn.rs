//! One HTTP connection's life, and how it ends when the process drains.
//!
//! hyper's own graceful shutdown closes an idle HTTP/1.1 keep-alive
//! connection at once. The client cannot know: its next request, already
//! on the wire or about to be, meets a closed socket, and a client that does
//! not retry reports a failure. So a draining connection here is closed
//! only when its client is done with it:
//!
//! * a request in flight, or one that arrives while draining, is answered
//!   with `Connection: close` (hyper then closes after that response);
//! * an HTTP/1.1 connection idle for the idle grace — measured from its last
//!   response or the drain's start, whichever is later — is closed (a
//!   connection that has not sent its first request gets the first-request
//!   grace: its client just connected and is about to);
//! * one whose client has sent part of a request head gets the head grace
//!   to finish it, then a `408 Request Timeout` and a close: a client that
//!   stops mid-request (slowloris) cannot hold the drain; one whose client
//!   stops sending the request *body* is bounded the same way, by its body
//!   (`body.rs`), and closes after its response;
//! * HTTP/2 gets GOAWAY at once: clients retry the streams it did not
//!   process, by the spec;
//! * an upgraded connection (WebSocket) leaves hyper; it stays counted, and
//!   the process waits for it within the drain grace.
//!
//! While serving, an HTTP/1 connection that sends no request head within
//! the header-read timeout after its last response (or its accept) is
//! closed the same way — a half-sent head answered `408` — so an idle or
//! slowloris client holds a descriptor for a bounded time only.
//!
//! All of this is reversible while the handoff may still abort: a
//! connection not yet told to close keeps serving when the phase goes back
//! to serving. Past the wind-down's hard deadline whatever is left is
//! dropped.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Context;
use std::time::Instant;

use http::header::{HeaderValue, CONNECTION};
use http::{Request, Response, StatusCode, Version};

use super::body::Incoming;

use crate::error::BoxError;
use crate::phase::Shared;

/// What the drain needs to know about one connection.
#[derive(Debug)]
pub(crate) struct ConnState {
    accepted: Instant,
    inflight: AtomicUsize,
    requests: AtomicU64,
    h2: AtomicBool,
    last_done: Mutex<Option<Instant>>,
    /// When the client began sending bytes that no request has been
    /// dispatched for yet: a request head in progress (set by the stream
    /// wrapper, cleared when hyper hands the request to the service).
    partial_since: Mutex<Option<Instant>>,
    /// Everything hyper wrote has been flushed, so bytes written now
    /// cannot land inside one of its responses.
    write_idle: AtomicBool,
    /// The drive loop gave up on a partial head: the stream wrapper answers
    /// 408 as it closes.
    timed_out: AtomicBool,
    /// Being taken out of hyper to move to the next build: the stream
    /// wrapper must not shut the socket down.
    holding: AtomicBool,
    /// Not to be moved (an offer was refused): wind down as before.
    no_move: AtomicBool,
    /// Signalled when a request ends or hyper has flushed: the drive loop
    /// looks again at whether the connection is idle, to move it at once.
    changed: tokio::sync::Notify,
}

impl ConnState {
    pub(crate) fn new() -> Arc<ConnState> {
        Arc::new(ConnState {
            accepted: Instant::now(),
            inflight: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            h2: AtomicBool::new(false),
            last_done: Mutex::new(None),
            partial_since: Mutex::new(None),
            write_idle: AtomicBool::new(true),
            timed_out: AtomicBool::new(false),
            holding: AtomicBool::new(false),
            no_move: AtomicBool::new(false),
            changed: tokio::sync::Notify::new(),
        })
    }

    pub(crate) fn holding(&self) -> bool {
        self.holding.load(Ordering::SeqCst)
    }

    pub(crate) fn set_holding(&self, on: bool) {
        self.holding.store(on, Ordering::SeqCst);
    }

    pub(crate) fn set_no_move(&self) {
        self.no_move.store(true, Ordering::SeqCst);
    }

    /// Between requests on HTTP/1 with everything written: it can move (a
    /// partial head moves too: hyper gives its bytes back).
    fn idle_for_move(&self) -> bool {
        !self.no_move.load(Ordering::SeqCst)
            && !self.h2.load(Ordering::SeqCst)
            && self.inflight.load(Ordering::SeqCst) == 0
            && self.write_idle.load(Ordering::SeqCst)
    }

    /// Whether this connection's responses must say `Connection: close`:
    /// winding down, and not about to move (a moved connection stays open).
    fn close_after_response(&self, shared: &Shared) -> bool {
        shared.phase().winding_down()
            && (self.no_move.load(Ordering::SeqCst) || !shared.is_moving())
    }

    /// The client sent bytes (`first` says whether they are the
    /// connection's first). With no request in flight they begin a request
    /// head.
    pub(crate) fn read(&self, first: &[u8]) {
        if !first.is_empty() && first.starts_with(b"PRI * HTTP/2") {
            // The h2 preface: HTTP/2 drains with GOAWAY, never a 408.
            self.h2.store(true, Ordering::SeqCst);
        }
        if self.inflight.load(Ordering::SeqCst) == 0 {
            lock(&self.partial_since).get_or_insert_with(Instant::now);
        }
    }

    /// hyper wrote (`false`) or flushed everything it wrote (`true`).
    pub(crate) fn wrote(&self, flushed: bool) {
        let was = self.write_idle.swap(flushed, Ordering::SeqCst);
        // Only a change is news: hyper flushes at every poll, and a wake-up
        // per flush would have the drive loop poll hyper, which flushes…
        if flushed && !was {
            self.changed.notify_one();
        }
    }

    /// A request head is in progress on an HTTP/1 connection with nothing
    /// in flight, and has been since this instant.
    fn partial_head(&self) -> Option<Instant> {
        if self.inflight.load(Ordering::SeqCst) > 0 || self.h2.load(Ordering::SeqCst) {
            return None;
        }
        *lock(&self.partial_since)
    }

    /// While serving, when this connection has waited too long for a
    /// request head (the header-read timeout, counted from its last
    /// response or its accept); `None` while a request is in flight, and
    /// on HTTP/2 (hyper's h2 has its own keep-alive).
    fn head_due(&self, timeout: std::time::Duration) -> Option<Instant> {
        if self.inflight.load(Ordering::SeqCst) > 0 || self.h2.load(Ordering::SeqCst) {
            return None;
        }
        Some(lock(&self.last_done).unwrap_or(self.accepted) + timeout)
    }

    /// A request head is in progress and hyper has flushed all it wrote:
    /// marks the connection for the stream wrapper to answer `408` as it
    /// closes (nothing of hyper's can interleave) and says so. Otherwise
    /// nothing is marked.
    fn time_out_head(&self) -> bool {
        let due = self.partial_head().is_some() && self.write_idle.load(Ordering::SeqCst);
        if due {
            self.timed_out.store(true, Ordering::SeqCst);
        }
        due
    }

    /// Whether the stream wrapper should answer 408 as it closes.
    pub(crate) fn timed_out(&self) -> bool {
        self.timed_out.load(Ordering::SeqCst)
    }

    /// When, winding down since `since`, this connection may be closed;
    /// `None` while a request is in flight (its response closes it).
    pub(crate) fn close_due(&self, since: Instant, shared: &Shared) -> Option<Instant> {
        if self.inflight.load(Ordering::SeqCst) > 0 {
            return None;
        }
        if self.h2.load(Ordering::SeqCst) {
            return Some(since);
        }
        let g = shared.graces;
        if let Some(head) = self.partial_head() {
            return Some(head.max(since) + g.head);
        }
        if self.requests.load(Ordering::SeqCst) == 0 {
            return Some((self.accepted + g.first_request).max(since + g.idle));
        }
        let last = lock(&self.last_done).unwrap_or(self.accepted);
        Some(last.max(since) + g.idle)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Ends a request's accounting however it ends (answered, failed, or
/// dropped because the client went away). On HTTP/1 it rides in the
/// response body ([`Answering`]), so a request counts until hyper has
/// taken the last of its response.
struct InFlight(Arc<ConnState>);

pin_project_lite::pin_project! {
    /// An HTTP/1 response body, holding its request's [`InFlight`] until
    /// hyper has taken the end of it (or dropped it).
    ///
    /// hyper writes the body's end and flushes within the same poll, so once
    /// the guard is gone and everything written is flushed
    /// (`ConnState::write_idle`), hyper has nothing left of this exchange:
    /// the connection can be taken apart to move at once, without shutting
    /// hyper down and polling it to the end — which for 10,000 idle
    /// connections was a fifth of the drain's CPU. A streaming body keeps
    /// its connection in flight until it ends, as a request does.
    pub(crate) struct Answering<B> {
        #[pin]
        inner: B,
        guard: Option<InFlight>,
    }
}

impl<B: http_body::Body> http_body::Body for Answering<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        let this = self.project();
        let r = this.inner.poll_frame(cx);
        if matches!(r, std::task::Poll::Ready(None | Some(Err(_)))) {
            this.guard.take();
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        *lock(&self.0.last_done) = Some(Instant::now());
        self.0.inflight.fetch_sub(1, Ordering::SeqCst);
        self.0.changed.notify_one();
    }
}

/// The user's tower service, counted per connection, with `Connection:
/// close` on HTTP/1.x responses once winding down.
///
/// The service is boxed so this wrapper, and with it the hyper
/// connection, is `Unpin`: a connection that moves is taken apart by value.
pub(crate) struct Tracked<S> {
    pub(crate) inner: Box<S>,
    pub(crate) conn: Arc<ConnState>,
    pub(crate) shared: Arc<Shared>,
}

impl<S, B> hyper::service::Service<Request<hyper::body::Incoming>> for Tracked<S>
where
    S: tower_service::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Send + 'static,
{
    type Response = Response<Answering<B>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Answering<B>>, S::Error>> + Send>>;

    fn call(&self, req: Request<hyper::body::Incoming>) -> Self::Future {
        let (parts, body) = req.into_parts();
        let (body, watch) = Incoming::new(body, &self.shared);
        let req = Request::from_parts(parts, body);
        let h1 = req.version() < Version::HTTP_2;
        if !h1 {
            self.conn.h2.store(true, Ordering::SeqCst);
        }
        self.conn.inflight.fetch_add(1, Ordering::SeqCst);
        self.conn.requests.fetch_add(1, Ordering::SeqCst);
        // The head is complete: this is a request now, not a partial one.
        *lock(&self.conn.partial_since) = None;
        let guard = InFlight(self.conn.clone());
        let shared = self.shared.clone();
        let conn = self.conn.clone();
        let mut svc = S::clone(&self.inner);
        Box::pin(async move {
            let mut guard = Some(guard);
            std::future::poll_fn(|cx: &mut Context<'_>| svc.poll_ready(cx)).await?;
            let mut res = svc.call(req).await?;
            let cut = watch.is_some_and(|w| w.cut());
            if cut {
                // The rest of the body is still on the socket: this
                // connection cannot move, and closes after the response.
                conn.set_no_move();
                let s = res.status();
                if s.is_client_error() || s.is_server_error() {
                    *res.status_mut() = StatusCode::REQUEST_TIMEOUT;
                }
            }
            if h1 && (cut || conn.close_after_response(&shared)) {
                res.headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("close"));
            }
            // HTTP/2 counts a stream answered once its head is out: its
            // GOAWAY need not wait for long bodies (new streams would).
            let guard = if h1 { guard.take() } else { None };
            Ok(res.map(|inner| Answering { inner, guard }))
        })
    }
}

/// How [`drive`] left a connection.
pub(crate) enum Ended {
    /// Over: closed by either side, or dropped at the hard deadline.
    Done,
    /// Idle between requests while the drain moves connections: take it
    /// out of hyper and offer it to the next build.
    Movable,
}

/// Drives `conn` to its end, closing it the way the module doc says when
/// the process winds down — or, while the drain moves connections, stopping
/// as soon as it is idle so it can move ([`Ended::Movable`]). `graceful` is
/// hyper's `graceful_shutdown` on it (HTTP/1: close once idle; HTTP/2:
/// GOAWAY); `movable` says whether it is one that can move (HTTP/1, not
/// upgraded).
///
/// While serving it also closes an HTTP/1 connection that sends no request
/// head within the header-read timeout (`Graces::header_read`) — the job
/// of hyper's own header-read timer, which is not used: that timer sits in
/// hyper's state, so taking a connection out of hyper to move it would
/// remove it from the runtime's timer wheel (a lock shared by the workers)
/// inside the drain, 10,000 times for 10,000 connections — a tenth of the
/// drain (BENCHMARKS.md). `timer` belongs to the caller instead, who keeps
/// it, registered, until the handoff's outcome. It is re-armed lazily:
/// when it fires early (a request came meanwhile) it is set again, so a
/// request costs the timer nothing.
pub(crate) async fn drive<C: Future + Unpin>(
    conn: &mut C,
    graceful: impl Fn(&mut C),
    movable: impl Fn(&C) -> bool,
    state: Arc<ConnState>,
    shared: Arc<Shared>,
    mut timer: Pin<&mut tokio::time::Sleep>,
) -> Ended {
    let mut rx = shared.subscribe();
    let mut cut = shared.subscribe_cut();
    let cut = async move {
        let _ = cut.wait_for(|c| *c).await;
    };
    tokio::pin!(cut);
    loop {
        // Serving: wait for the connection to end, a wind-down to begin or
        // the header-read timeout.
        loop {
            if rx.borrow_and_update().winding_down() {
                break;
            }
            let now = Instant::now();
            let due = state.head_due(shared.graces.header_read);
            if due.is_some_and(|d| d <= now) {
                // No request head in time: closed, and a half-sent one is
                // answered 408 as the stream closes — when nothing of
                // hyper's is unflushed (it could interleave), else just
                // closed: a client that reads nothing is not waited for.
                state.time_out_head();
                return Ended::Done;
            }
            // In flight: look again a timeout later (the request's end
            // moves the deadline; nothing wakes us for it).
            let wake = due.unwrap_or(now + shared.graces.header_read);
            if timer.deadline() != wake.into() {
                timer.as_mut().reset(wake.into());
            }
            // The phase first: a drain wakes every connection at once, and
            // one that is about to move need not be polled by hyper (10,000
            // idle connections polled for nothing is a tenth of a drain).
            tokio::select! {
                biased;
                r = rx.changed() => if r.is_err() { break },
                _ = &mut *conn => return Ended::Done,
                _ = timer.as_mut() => {}
            }
        }
        let since = Instant::now();
        let hard = shared.hard_deadline();
        // Winding down: move it once idle, or close when the client is done
        // with it.
        let closing = loop {
            if !rx.borrow_and_update().winding_down() {
                // The handoff aborted: serve on, and a refusal to move in
                // that drain does not hold for the next one.
                state.no_move.store(false, Ordering::SeqCst);
                break false;
            }
            let now = Instant::now();
            if now >= hard {
                return Ended::Done; // out of time: drop it
            }
            let moving = shared.is_moving();
            if moving && movable(conn) && state.idle_for_move() {
                return Ended::Movable;
            }
            let due = state.close_due(since, &shared);
            if due.is_some_and(|t| t <= now)
                && !(moving && movable(conn) && !state.no_move.load(Ordering::SeqCst))
            {
                if state.time_out_head() {
                    // A head that did not finish in its grace: hyper would
                    // only drop it unanswered, so it goes with a 408.
                    return Ended::Done;
                }
                if moving && !state.no_move.load(Ordering::SeqCst) {
                    // Closed instead of moved (HTTP/2, upgraded): the
                    // upgrade report counts it (a refused one was counted
                    // when the offer was refused).
                    if let Some(m) = shared.mover() {
                        m.closed(1);
                    }
                }
                graceful(conn);
                break true;
            }
            let wake = due.unwrap_or(now + shared.graces.idle).min(hard);
            timer.as_mut().reset(wake.into());
            tokio::select! {
                _ = &mut *conn => return Ended::Done,
                _ = timer.as_mut() => {}
                _ = rx.changed() => {}
                _ = state.changed.notified() => {}
                _ = &mut cut => return Ended::Done,
            }
        };
        if closing {
            // hyper finishes the exchange in progress, if any, then closes.
            tokio::select! {
                _ = tokio::time::timeout_at(hard.into(), &mut *conn) => {}
                _ = &mut cut => {}
            }
            return Ended::Done;
        }
    }
}
