//! A TCP stream that closes without a reset.
//!
//! Closing a socket whose receive queue holds unread bytes makes the kernel
//! send RST, and a client that gets RST may lose the response it had not
//! read yet. So when hyper drops a connection, the stream is handed to a
//! short task that shuts down our write side (FIN, after everything hyper
//! wrote), reads and discards until the client's EOF — bounded by
//! [`LINGER`] — and only then closes. From the drop on the connection is
//! counted as closing, not open: no request can run on it any more, so a
//! drain (and a stateful seal) does not wait for the client's EOF, but the
//! process does before it exits, so no lingering close becomes a reset.
//!
//! The wrapper also tells the connection's [`ConnState`] what crosses it —
//! bytes from the client with no request in flight (a head in progress),
//! and whether everything hyper wrote has been flushed — and, for a head
//! that timed out while draining, writes the `408 Request Timeout` hyper
//! would not send.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use super::conn::ConnState;
use crate::phase::Counted;

/// Longest we wait for the client's EOF after our FIN.
pub(crate) const LINGER: Duration = Duration::from_secs(1);

/// The answer to a request head that did not finish within the head grace
/// while draining (RFC 9110 §15.5.9: the server closes the connection).
const REQUEST_TIMEOUT: &[u8] =
    b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\n\r\n";

#[cfg(test)]
thread_local! {
    /// Flushes asked of streams on this thread: how often hyper was polled
    /// (it flushes at every poll). Per thread, so a current-thread test
    /// counts its own connections only.
    pub(crate) static FLUSHES: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// What a lingering stream must be.
pub(crate) trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<I: AsyncRead + AsyncWrite + Unpin + Send + 'static> Stream for I {}

pub(crate) struct Lingering<I: Stream> {
    /// `None` only inside `drop`.
    stream: Option<I>,
    counted: Option<Counted>,
    state: Arc<ConnState>,
    /// Nothing has been read yet (the first bytes tell HTTP/2's preface).
    first_read: bool,
}

impl<I: Stream> Lingering<I> {
    pub(crate) fn new(stream: I, counted: Counted, state: Arc<ConnState>) -> Lingering<I> {
        Lingering {
            stream: Some(stream),
            counted: Some(counted),
            state,
            first_read: true,
        }
    }

    pub(crate) fn get_mut(&mut self) -> Option<&mut I> {
        self.stream.as_mut()
    }

    /// Takes the stream and its count back out, unclosed: it is moving to
    /// the next build, and no FIN may go out (the drop then does nothing).
    pub(crate) fn release(mut self) -> Option<(I, Counted)> {
        match (self.stream.take(), self.counted.take()) {
            (Some(s), Some(c)) => Some((s, c)),
            _ => None,
        }
    }

    fn stream(&mut self) -> io::Result<Pin<&mut I>> {
        match self.stream.as_mut() {
            Some(s) => Ok(Pin::new(s)),
            None => Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "connection closed",
            )),
        }
    }
}

impl<I: Stream> Drop for Lingering<I> {
    fn drop(&mut self) {
        let (Some(stream), mut counted) = (self.stream.take(), self.counted.take()) else {
            return;
        };
        if counted.as_ref().is_some_and(|c| c.shared().cutting()) {
            return; // cut before a seal: closed now, not in a second
        }
        if let Some(c) = counted.as_mut() {
            c.closing();
        }
        let timed_out = self.state.timed_out();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                linger(stream, timed_out).await;
                drop(counted);
            });
        }
    }
}

async fn linger<I: Stream>(mut stream: I, timed_out: bool) {
    if timed_out {
        // Bounded like the rest: a client that does not read gets the FIN.
        let answer = async {
            stream.write_all(REQUEST_TIMEOUT).await?;
            stream.flush().await
        };
        if !matches!(tokio::time::timeout(LINGER, answer).await, Ok(Ok(()))) {
            return;
        }
    }
    if stream.shutdown().await.is_err() {
        return;
    }
    let mut sink = [0u8; 4096];
    let end = tokio::time::Instant::now() + LINGER;
    while let Ok(Ok(n)) = tokio::time::timeout_at(end, stream.read(&mut sink)).await {
        if n == 0 {
            break;
        }
    }
}

impl<I: Stream> AsyncRead for Lingering<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = match self.stream() {
            Ok(s) => s.poll_read(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        };
        if let Poll::Ready(Ok(())) = r {
            let new = &buf.filled()[before..];
            if !new.is_empty() {
                let first = std::mem::replace(&mut self.first_read, false);
                self.state.read(if first { new } else { &[] });
            }
        }
        r
    }
}

impl<I: Stream> AsyncWrite for Lingering<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if !buf.is_empty() {
            self.state.wrote(false);
        }
        match self.stream() {
            Ok(s) => s.poll_write(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if bufs.iter().any(|b| !b.is_empty()) {
            self.state.wrote(false);
        }
        match self.stream() {
            Ok(s) => s.poll_write_vectored(cx, bufs),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.as_ref().is_some_and(|s| s.is_write_vectored())
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        #[cfg(test)]
        FLUSHES.with(|f| f.set(f.get() + 1));
        let r = match self.stream() {
            Ok(s) => s.poll_flush(cx),
            Err(e) => Poll::Ready(Err(e)),
        };
        if let Poll::Ready(Ok(())) = r {
            self.state.wrote(true);
        }
        r
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.state.holding() {
            // Being taken out of hyper to move: hyper ends the connection
            // with a shutdown, which would send the client a FIN.
            return Poll::Ready(Ok(()));
        }
        match self.stream() {
            Ok(s) => s.poll_shutdown(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}
