//! [`Handoff::serve`]: an HTTP/1.1 and HTTP/2 (h2c) server for any tower
//! service — an axum `Router`, a tonic server, `tower::service_fn` — whose
//! drain loses no request (see `conn.rs` for how each connection ends).

mod conn;
mod linger;
mod listen;
#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;

use crate::error::{BoxError, Error};
use crate::handoff::Handoff;
use crate::phase::{Phase, Shared};
use conn::{ConnState, Tracked};
use linger::Lingering;
pub use listen::Listen;

/// The bounds [`Handoff::serve`] puts on a service, named once for the
/// private helpers (implemented for every type that meets them).
trait Svc<B>:
    tower_service::Service<
        Request<Incoming>,
        Response = Response<B>,
        Future: Send + 'static,
        Error: Into<BoxError>,
    > + Clone
    + Send
    + 'static
{
}

impl<S, B> Svc<B> for S
where
    S: tower_service::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
{
}

/// The bounds on a response body, likewise.
trait ResBody: http_body::Body<Data: Send, Error: Into<BoxError>> + Send + 'static {}

impl<B> ResBody for B where B: http_body::Body<Data: Send, Error: Into<BoxError>> + Send + 'static {}

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
    loop {
        // Counted before the phase is read: see `Shared::accepting`.
        let counted = shared.accepting();
        let phase = *rx.borrow_and_update();
        if matches!(phase, Phase::Retired(_)) {
            return;
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
                    tokio::spawn(serve_connection(stream, conn, service.clone(), shared.clone()));
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

async fn serve_connection<I, S: Svc<B>, B: ResBody>(
    stream: I,
    counted: crate::phase::Counted,
    service: S,
    shared: Arc<Shared>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let state = ConnState::new();
    let io = TokioIo::new(Lingering::new(stream, counted, state.clone()));
    let svc = Tracked {
        inner: service,
        conn: state.clone(),
        shared: shared.clone(),
    };
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new());
    builder.http2().timer(TokioTimer::new());
    let conn = builder.serve_connection_with_upgrades(io, svc);
    tokio::pin!(conn);
    conn::drive(conn, |c| c.graceful_shutdown(), state, shared).await;
}
