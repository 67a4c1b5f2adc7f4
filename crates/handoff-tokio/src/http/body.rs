//! The request body [`Handoff::serve`](crate::Handoff::serve) hands a
//! service: hyper's, watched so a drain can bound a client that trickles it.
//!
//! A client that stops halfway through a request *head* is cut by the head
//! grace (`conn.rs`). One that sends a whole head and then its body a byte at
//! a time (a "slow POST") is past that rule: hyper has dispatched the
//! request, the service is waiting for the body, and only the body knows
//! whether it is still arriving. Without a bound such a client holds a
//! stateful drain — during which nobody accepts — until the drain grace
//! runs out.
//!
//! So once the process winds down, a body still arriving must keep coming:
//! it is cut at `max(drain start, request start) + head grace + bytes
//! received since the drain began / minimum rate` — Apache's
//! `mod_reqtimeout` rule (a grace, extended by what arrives). A client
//! that sends at least the minimum rate is never cut; one that stalls or
//! trickles is, a grace after the drain began. The service then reads an
//! error of kind [`std::io::ErrorKind::TimedOut`]; its response gets
//! `Connection: close` and, if it reports a failure (4xx/5xx, as axum's
//! extractors do for a body that failed), the status `408 Request
//! Timeout`, which tells the client it may send the request again.
//!
//! Only a service that is waiting for the body can be cut: the clock is
//! looked at when a read of the body would block. A body hyper already
//! holds whole (every `GET`) costs nothing: no clock, no allocation.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http_body::{Body, Frame, SizeHint};
use hyper::body::Bytes;

use crate::error::BoxError;
use crate::phase::{Graces, Shared};

/// A request body as [`Handoff::serve`](crate::Handoff::serve) hands it to
/// the service: hyper's [`Incoming`](hyper::body::Incoming), watched so
/// that, while this process drains, a client that stops sending its body
/// (or trickles it) cannot hold the drain: it is cut after
/// [`Builder::head_grace`](crate::Builder::head_grace) unless it keeps up
/// [`Builder::min_body_rate`](crate::Builder::min_body_rate).
///
/// axum, tonic and tower services accept any body and never name it; a
/// plain hyper service takes `Request<handoff_tokio::Incoming>` where it
/// took `Request<hyper::body::Incoming>` and reads it the same way
/// (`http_body_util::BodyExt::collect`, `frame`).
pub struct Incoming {
    inner: hyper::body::Incoming,
    /// `None` when the body was over before the service saw it.
    watching: Option<Box<Watching>>,
}

struct Watching {
    shared: Arc<Shared>,
    started: Instant,
    watch: Arc<BodyWatch>,
    /// Created the first time a read of the body would block: resolves
    /// when the body is due and has not come.
    timer: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
}

/// What the request's future needs to know about its body.
#[derive(Debug, Default)]
pub(crate) struct BodyWatch {
    /// Body bytes read while this process winds down.
    draining_received: AtomicU64,
    /// The drain cut the body: the service read an error for it.
    cut: AtomicBool,
}

impl BodyWatch {
    pub(crate) fn cut(&self) -> bool {
        self.cut.load(Ordering::SeqCst)
    }
}

impl Incoming {
    /// Wraps the body of a request hyper just dispatched; the watch is
    /// `None` when there is nothing left to arrive.
    pub(crate) fn new(
        inner: hyper::body::Incoming,
        shared: &Arc<Shared>,
    ) -> (Incoming, Option<Arc<BodyWatch>>) {
        if inner.is_end_stream() {
            return (
                Incoming {
                    inner,
                    watching: None,
                },
                None,
            );
        }
        let watch = Arc::new(BodyWatch::default());
        let watching = Box::new(Watching {
            shared: shared.clone(),
            started: Instant::now(),
            watch: watch.clone(),
            timer: None,
        });
        (
            Incoming {
                inner,
                watching: Some(watching),
            },
            Some(watch),
        )
    }
}

impl std::fmt::Debug for Incoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Incoming")
            .field("inner", &self.inner)
            .field("watched", &self.watching.is_some())
            .finish()
    }
}

/// The error a service reads from a body the drain cut.
fn cut_error() -> BoxError {
    Box::new(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "the client stopped sending the request body while the server drains for an upgrade \
         (Builder::head_grace, Builder::min_body_rate)",
    ))
}

impl Body for Incoming {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let Some(w) = this.watching.as_deref_mut() else {
            return Pin::new(&mut this.inner).poll_frame(cx).map_err(Into::into);
        };
        if w.watch.cut() {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    if w.shared.phase().winding_down() {
                        w.watch
                            .draining_received
                            .fetch_add(data.len() as u64, Ordering::SeqCst);
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                let timer = w.timer.get_or_insert_with(|| {
                    Box::pin(due(w.shared.clone(), w.started, w.watch.clone()))
                });
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        w.watch.cut.store(true, Ordering::SeqCst);
                        Poll::Ready(Some(Err(cut_error())))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream() || self.watching.as_ref().is_some_and(|w| w.watch.cut())
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// When a body still arriving is cut: a head grace after the drain began
/// (or the request, if later), plus the time its client bought by sending
/// `received` bytes since the drain began at `rate` bytes a second.
fn body_due(since: Instant, started: Instant, received: u64, graces: &Graces) -> Instant {
    let rate = graces.min_body_rate.max(1);
    let bought = Duration::from_secs_f64(received as f64 / rate as f64);
    since.max(started) + graces.head + bought
}

/// Resolves once the body is due ([`body_due`]) while winding down; never
/// while serving (an aborted drain lifts the deadline).
async fn due(shared: Arc<Shared>, started: Instant, watch: Arc<BodyWatch>) {
    let mut rx = shared.subscribe();
    loop {
        if rx.wait_for(|p| p.winding_down()).await.is_err() {
            return std::future::pending().await;
        }
        // Until serving again (an aborted drain):
        while let Some(since) = shared.winding_since() {
            let received = watch.draining_received.load(Ordering::SeqCst);
            let due = body_due(since, started, received, &shared.graces);
            if Instant::now() >= due {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(due.into()) => {}
                r = rx.changed() => {
                    if r.is_err() {
                        return std::future::pending().await;
                    }
                    if !rx.borrow_and_update().winding_down() {
                        break;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn graces(head_ms: u64, rate: u64) -> Graces {
        Graces {
            idle: Duration::from_millis(10),
            first_request: Duration::from_millis(10),
            head: Duration::from_millis(head_ms),
            min_body_rate: rate,
            header_read: Duration::from_secs(30),
        }
    }

    #[test]
    fn a_stalled_body_is_due_a_head_grace_after_the_drain_began() {
        let t0 = Instant::now();
        let drain = t0 + Duration::from_secs(5);
        assert_eq!(
            body_due(drain, t0, 0, &graces(1000, 65536)),
            drain + Duration::from_secs(1)
        );
    }

    #[test]
    fn a_request_begun_during_the_drain_gets_its_grace_from_its_start() {
        let drain = Instant::now();
        let started = drain + Duration::from_secs(3);
        assert_eq!(
            body_due(drain, started, 0, &graces(1000, 65536)),
            started + Duration::from_secs(1)
        );
    }

    #[test]
    fn each_byte_received_while_draining_buys_time_at_the_minimum_rate() {
        let drain = Instant::now();
        // 32 KiB at 64 KiB/s: half a second more.
        assert_eq!(
            body_due(drain, drain, 32 * 1024, &graces(1000, 65536)),
            drain + Duration::from_millis(1500)
        );
        // A client keeping up the rate is never due: after t seconds it
        // sent rate × t bytes, and is due a grace later than now.
        for t in [1u64, 10, 100] {
            let now = drain + Duration::from_secs(t);
            assert!(body_due(drain, drain, 65536 * t, &graces(1000, 65536)) > now);
        }
    }

    #[test]
    fn a_zero_rate_is_taken_as_one_byte_a_second() {
        let drain = Instant::now();
        assert_eq!(
            body_due(drain, drain, 2, &graces(0, 0)),
            drain + Duration::from_secs(2)
        );
    }
}
