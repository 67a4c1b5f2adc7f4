//! One connection's HTTP, chosen by its first bytes: HTTP/2 (prior
//! knowledge, h2c) when they are the HTTP/2 preface, HTTP/1.1 otherwise.
//!
//! hyper-util's `auto` connection does the same, but keeps the HTTP/1
//! connection to itself; an HTTP/1 connection that moves to the next build
//! must be taken apart — its socket and the bytes hyper read and did not
//! parse — which only hyper's own `http1` connection allows.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, ReadBuf};

use super::bounds::{ResBody, Svc};
use super::conn::Tracked;
use super::linger::{Lingering, Stream};
use super::rewind::Rewind;

/// What a connection is read through: the bytes given back first, and a
/// close that never resets.
pub(crate) type Io<I> = Lingering<Rewind<I>>;

/// hyper's HTTP/1 connection, able to upgrade (WebSocket).
type H1Conn<I, S> = http1::UpgradeableConnection<TokioIo<Io<I>>, Tracked<S>>;
/// hyper's HTTP/2 connection.
type H2Conn<I, S> = http2::Connection<TokioIo<Io<I>>, Tracked<S>, TokioExecutor>;

/// The client preface of HTTP/2 over cleartext with prior knowledge.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// hyper's read buffer, the service and the (emptied) box of a connection
/// taken apart to move, kept until the handoff's outcome instead of freed
/// on the spot.
///
/// Freeing is most of what taking a connection out of hyper costs, and it
/// would be paid 10,000 times inside the drain, while nobody accepts: the
/// read buffer is the size class whose free makes glibc consolidate its
/// heap, and with glibc a block freed by another thread than the one that
/// allocated it waits for that thread's arena lock — with the tokio
/// workers taking connections apart side by side, a third of their
/// switches-out in a drain were on that lock. Dropped once the outcome is
/// known: then the next build serves, or the drain is over.
pub(crate) struct Husk<S>(
    #[allow(dead_code)] Option<(hyper::body::Bytes, Tracked<S>)>,
    #[allow(dead_code)] Option<Box<dyn std::any::Any + Send>>,
);

pub(crate) enum Http<I: Stream, S: Svc<B>, B: ResBody> {
    /// Reading the first bytes, to tell HTTP/2 from HTTP/1.
    Sniff {
        io: Option<Io<I>>,
        buf: Vec<u8>,
        svc: Option<Tracked<S>>,
    },
    /// Boxed: each variant is as small as the others. The box is emptied,
    /// not freed, when the connection is taken apart ([`Husk`]).
    H1 {
        conn: Box<Option<H1Conn<I, S>>>,
        done: bool,
    },
    H2(Pin<Box<H2Conn<I, S>>>),
    Done(std::marker::PhantomData<fn() -> B>),
}

impl<I: Stream, S: Svc<B>, B: ResBody> Http<I, S, B> {
    pub(crate) fn new(io: Io<I>, svc: Tracked<S>) -> Self {
        Http::Sniff {
            io: Some(io),
            buf: Vec::with_capacity(PREFACE.len()),
            svc: Some(svc),
        }
    }

    /// hyper's graceful shutdown (HTTP/1: close once idle; HTTP/2:
    /// GOAWAY); a connection still silent is simply closed.
    pub(crate) fn graceful(&mut self) {
        match self {
            Http::Sniff { .. } => *self = Http::Done(std::marker::PhantomData),
            Http::H1 { conn, .. } => {
                if let Some(c) = conn.as_mut() {
                    Pin::new(c).graceful_shutdown();
                }
            }
            Http::H2(c) => c.as_mut().graceful_shutdown(),
            Http::Done(_) => {}
        }
    }

    /// Whether the connection could move: HTTP/1 (or not known yet), not
    /// upgraded.
    pub(crate) fn movable(&self) -> bool {
        matches!(self, Http::Sniff { .. } | Http::H1 { done: false, .. })
    }

    /// Takes a finished HTTP/1 connection (or one still silent) apart: its
    /// stream wrapper, with the bytes read from it and not consumed put
    /// back in front, and what is left of hyper's side ([`Husk`]). `None`
    /// once upgraded or for HTTP/2.
    pub(crate) fn take(self) -> Option<(Io<I>, Husk<S>)> {
        match self {
            Http::Sniff { io, buf, svc } => {
                let mut io = io?;
                io.get_mut()?.put_back(&buf);
                Some((io, Husk(svc.map(|s| (hyper::body::Bytes::new(), s)), None)))
            }
            Http::H1 { mut conn, .. } => {
                let parts = conn.take()?.into_parts()?;
                let mut io = parts.io.into_inner();
                io.get_mut()?.put_back(&parts.read_buf);
                Some((io, Husk(Some((parts.read_buf, parts.service)), Some(conn))))
            }
            Http::H2(_) | Http::Done(_) => None,
        }
    }
}

impl<I: Stream, S: Svc<B>, B: ResBody> Future for Http<I, S, B>
where
    Self: Unpin,
{
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        loop {
            match this {
                Http::Sniff { io, buf, svc } => {
                    let Some(stream) = io.as_mut() else {
                        *this = Http::Done(std::marker::PhantomData);
                        return Poll::Ready(());
                    };
                    let mut tmp = [0u8; PREFACE.len()];
                    let want = PREFACE.len() - buf.len();
                    let mut rb = ReadBuf::new(&mut tmp[..want]);
                    match Pin::new(stream).poll_read(cx, &mut rb) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(Err(_)) => {
                            *this = Http::Done(std::marker::PhantomData);
                            return Poll::Ready(());
                        }
                        Poll::Ready(Ok(())) if rb.filled().is_empty() => {
                            *this = Http::Done(std::marker::PhantomData); // closed before a byte
                            return Poll::Ready(());
                        }
                        Poll::Ready(Ok(())) => buf.extend_from_slice(rb.filled()),
                    }
                    let h2 = if !PREFACE.starts_with(buf) {
                        false
                    } else if buf.len() == PREFACE.len() {
                        true
                    } else {
                        continue; // a prefix of the preface: read on
                    };
                    let (Some(mut io), Some(svc)) = (io.take(), svc.take()) else {
                        *this = Http::Done(std::marker::PhantomData);
                        return Poll::Ready(());
                    };
                    if let Some(r) = io.get_mut() {
                        r.put_back(buf);
                    }
                    let io = TokioIo::new(io);
                    *this = if h2 {
                        let mut b = http2::Builder::new(TokioExecutor::new());
                        b.timer(TokioTimer::new());
                        Http::H2(Box::pin(b.serve_connection(io, svc)))
                    } else {
                        // No timer: the header-read timeout is
                        // `conn::drive`'s (hyper's would be freed inside
                        // the drain when the connection moves).
                        let b = http1::Builder::new();
                        Http::H1 {
                            conn: Box::new(Some(b.serve_connection(io, svc).with_upgrades())),
                            done: false,
                        }
                    };
                }
                Http::H1 { conn, done } => {
                    let Some(c) = conn.as_mut().as_mut().filter(|_| !*done) else {
                        return Poll::Ready(());
                    };
                    return match Pin::new(c).poll(cx) {
                        Poll::Ready(_) => {
                            *done = true;
                            Poll::Ready(())
                        }
                        Poll::Pending => Poll::Pending,
                    };
                }
                Http::H2(c) => return c.as_mut().poll(cx).map(|_| ()),
                Http::Done(_) => return Poll::Ready(()),
            }
        }
    }
}
