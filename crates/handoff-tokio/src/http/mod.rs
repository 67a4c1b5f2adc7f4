//! [`Handoff::serve`]: an HTTP/1.1 and HTTP/2 (h2c) server for any tower
//! service — an axum `Router`, a tonic server, `tower::service_fn` — whose
//! drain loses no request (see `conn.rs` for how each connection ends).

mod body;
mod bounds;
mod conn;
mod linger;
mod listen;
mod proto;
mod rewind;
#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Duration;

use std::os::fd::AsFd;

use http::{Request, Response};

use crate::error::{BoxError, Error};
use crate::handoff::Handoff;
use crate::phase::{Counted, Moved, Phase, Shared};
pub use body::Incoming;
use bounds::{ResBody, Svc};
use conn::{ConnState, Ended, Tracked};
use linger::Lingering;
pub use listen::Listen;
use proto::Http;
use rewind::Rewind;

/// A failed `accept` (out of fds, out of memory) is retried after this
/// pause rather than in a hot loop; the connection waits in the backlog.
const ACCEPT_RETRY: Duration = Duration::from_millis(50);

impl Handoff {
    /// Serves HTTP/1.1 and h2c on `listener` with `service` until this
    /// process retires, then finishes every connection and returns.
    ///
    /// It accepts while this process may (a stateless build from its start,
    /// one with state from Commit), stops accepting when a handoff drains
    /// it, accepts again if that handoff aborts, and winds connections down
    /// without failing a request: in-flight requests are answered, each
    /// keep-alive connection's next response says `Connection: close`, idle
    /// ones are closed after a grace, HTTP/2 gets GOAWAY, and no close
    /// resets what the client had not read.
    ///
    /// In an upgrade (both builds on protocol version 3 or later) an
    /// HTTP/1.1 connection between requests is not closed at all: it is
    /// handed to the new build, which answers its next request on the same
    /// socket (the upgrade report counts connections moved and closed). An
    /// idle keep-alive connection is otherwise closed once it has sent no
    /// request head for 30 s
    /// ([`Builder::header_read_timeout`](crate::Builder::header_read_timeout)),
    /// and a moved one starts that clock again in the new build.
    ///
    /// Taking a connection out of hyper frees hyper's state for it on
    /// whichever worker thread does it; with glibc's `malloc` the workers
    /// then wait on each other's arena locks. A service that holds
    /// thousands of connections drains faster with jemalloc or mimalloc as
    /// its allocator: 10,000 idle connections moved in a median 26 ms
    /// instead of 42 ms on a 2-core machine (BENCHMARKS.md); staying on
    /// glibc, `GLIBC_TUNABLES=glibc.malloc.tcache_count=65535` in the
    /// service's environment took a sixth off (small frees then stay in the
    /// freeing thread's cache).
    ///
    /// The service gets each request's body as [`Incoming`]: hyper's,
    /// watched so that once draining a client that stops sending its body
    /// is cut after [`Builder::head_grace`](crate::Builder::head_grace)
    /// (axum, tonic and tower services take any body; a plain hyper service
    /// names `Request<handoff_tokio::Incoming>`).
    ///
    /// Returns `Err` only when this process's handoff failed (a new build
    /// whose upgrade was aborted): exit with it, the old build serves on.
    ///
    /// ```no_run
    /// # async fn f(app: axum::Router) -> Result<(), handoff_tokio::Error> {
    /// let handoff = handoff_tokio::Handoff::builder("my-app 1.0").start()?;
    /// let listener = handoff.tcp_listener("http")?;
    /// handoff.serve(listener, app).await
    /// # }
    /// ```
    pub async fn serve<L, S, B>(&self, listener: L, service: S) -> Result<(), Error>
    where
        L: Listen,
        S: tower_service::Service<Request<Incoming>, Response = Response<B>>
            + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: http_body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        let shared = self.inner.shared.clone();
        self.start_protocol();
        accept_loop(&listener, &service, &shared).await;
        drop(listener);
        shared.connections_closed(shared.hard_deadline()).await;
        self.outcome().await
    }
}

async fn accept_loop<L: Listen, S: Svc<B>, B: ResBody>(
    listener: &L,
    service: &S,
    shared: &Arc<Shared>,
) {
    let mut rx = shared.subscribe();
    let mut failures = crate::say::Throttle::new(Duration::from_secs(1));
    let mut at_cap = crate::say::Throttle::new(Duration::from_secs(10));
    // Which listener a connection came from, as the next build's `serve`
    // finds it again: the socket's address, the same in both builds.
    let key: Arc<str> = listener.describe().into();
    loop {
        // Counted before the phase is read: see `Shared::accepting`.
        let counted = shared.accepting();
        let phase = *rx.borrow_and_update();
        if matches!(phase, Phase::Retired(_)) {
            return;
        }
        if phase == Phase::Serving {
            // Connections the previous build moved to us: ours now.
            for c in shared.take_adopted(&key) {
                match L::adopt(c.fd) {
                    Ok(stream) => {
                        let conn = shared.connection();
                        tokio::spawn(serve_connection(
                            stream,
                            conn,
                            c.unread,
                            service.clone(),
                            shared.clone(),
                            key.clone(),
                        ));
                    }
                    Err(e) => crate::say::warn(format_args!(
                        "a connection moved from the previous build on {key} cannot be served: {e}"
                    )),
                }
            }
        }
        if !shared.may_accept(phase) {
            drop(counted);
            if rx.changed().await.is_err() {
                return;
            }
            continue;
        }
        if shared.open_sockets() >= shared.max_connections() {
            // At the cap: not accepting until one closes (or the phase
            // moves); new connections wait in the backlog meanwhile.
            drop(counted);
            if let Some(held) = at_cap.pass() {
                crate::say::warn(format_args!(
                    "{} connections open on {}: the cap (Builder::max_connections); new ones wait in the backlog{}",
                    shared.max_connections(),
                    listener.describe(),
                    if held > 0 { format!("; reached {held} more times since the last line") } else { String::new() }
                ));
            }
            tokio::select! {
                _ = shared.below_cap() => {}
                r = rx.changed() => if r.is_err() { return },
            }
            continue;
        }
        tokio::select! {
            biased;
            r = rx.changed() => if r.is_err() { return },
            a = listener.accept_io() => match a {
                Ok(stream) => {
                    let conn = shared.connection();
                    drop(counted);
                    tokio::spawn(serve_connection(
                        stream,
                        conn,
                        vec![],
                        service.clone(),
                        shared.clone(),
                        key.clone(),
                    ));
                }
                Err(e) => {
                    if let Some(held) = failures.pass() {
                        let addr = listener.describe();
                        crate::say::warn(format_args!(
                            "accept on {addr} failed: {e}{}; retrying every {ACCEPT_RETRY:?} (connections wait in the backlog){}",
                            if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) { " (out of file descriptors: raise `ulimit -n` / LimitNOFILE=)" } else { "" },
                            if held > 0 { format!("; {held} more since the last line") } else { String::new() }
                        ));
                    }
                    drop(counted);
                    tokio::time::sleep(ACCEPT_RETRY).await;
                }
            },
        }
    }
}

/// Serves one connection until it ends — or, while a drain moves
/// connections, until it is idle: then it is offered to the next build and
/// parked until the handoff's outcome, and either closed without a FIN (it
/// committed: the next build holds the socket) or served again from where
/// it stopped (it aborted). `unread` is read before the socket.
async fn serve_connection<I, S: Svc<B>, B: ResBody>(
    mut stream: I,
    mut counted: Counted,
    mut unread: Vec<u8>,
    service: S,
    shared: Arc<Shared>,
    key: Arc<str>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + AsFd + Unpin + Send + Sync + 'static,
{
    let mut no_move = false;
    // The header-read timeout's timer (`conn::drive`): one per socket, kept
    // until the socket leaves this process, so that moving the connection
    // does not take it out of the timer wheel inside the drain.
    let timer = tokio::time::sleep(shared.graces.header_read);
    tokio::pin!(timer);
    loop {
        // A refusal to move holds for the drain it happened in: one that
        // comes back while serving (that drain aborted) may move next time.
        if no_move && !shared.phase().winding_down() {
            no_move = false;
        }
        let state = ConnState::new();
        if no_move {
            state.set_no_move();
        }
        let io = Lingering::new(Rewind::new(unread, stream), counted, state.clone());
        let svc = Tracked {
            inner: Box::new(service.clone()),
            conn: state.clone(),
            shared: shared.clone(),
        };
        let mut http = Http::new(io, svc);
        let ended = conn::drive(
            &mut http,
            Http::graceful,
            Http::movable,
            state.clone(),
            shared.clone(),
            timer.as_mut(),
        )
        .await;
        if let Ended::Done = ended {
            return;
        }
        // Idle: take it out of hyper as it stands. Its last response is
        // written and flushed (the request counts until hyper has taken the
        // end of its body: `conn::Answering`), so hyper holds nothing of
        // ours but the bytes it read and did not parse — a pipelined
        // request, a head in progress — and gives those back. (One that
        // has not shown its protocol yet is not in hyper at all.) The
        // wrapper keeps the socket from being shut down meanwhile.
        state.set_holding(true);
        let Some((io, husk)) = http.take() else {
            return; // upgraded or gone meanwhile
        };
        let Some((rewind, c)) = io.release() else {
            return;
        };
        let (s, rest) = rewind.into_parts();
        (counted, unread) = (c, rest);
        // Lent, not duplicated: the mover holds the stream until it is sent.
        let lent = match shared.lend(s, &unread, key.as_bytes()) {
            Ok(lent) => lent,
            Err((s, e)) => {
                // Serve it again, winding down as a connection that does
                // not move: answered with `Connection: close`, or closed
                // when idle.
                tracing::debug!(target: "handoff_tokio", error = %e, "connection not moved; closing it instead");
                if let Some(m) = shared.mover() {
                    m.closed(1);
                }
                stream = s;
                no_move = true;
                continue;
            }
        };
        // Parked: not read by anyone until the outcome.
        counted.parked();
        let mut moved = shared.subscribe_moved();
        let fate = moved
            .wait_for(|m| *m != Moved::Pending)
            .await
            .map(|m| *m)
            .unwrap_or(Moved::Gone);
        drop(husk);
        // The outcome is known, so the mover has let go of it: at once.
        stream = lent.take_back();
        match fate {
            Moved::Back => {
                counted.unparked();
                continue;
            }
            Moved::Gone | Moved::Pending => {
                // close(2) only: the next build holds the socket, so no FIN
                // goes out and its client keeps the connection.
                drop(stream);
                drop(counted);
                return;
            }
        }
    }
}
