//! A TCP stream that closes without a reset.
//!
//! Closing a socket whose receive queue holds unread bytes makes the kernel
//! send RST, and a client that gets RST may lose the response it had not
//! read yet. So when hyper drops a connection, the stream is handed to a
//! short task that shuts down our write side (FIN, after everything hyper
//! wrote), reads and discards until the client's EOF — bounded by
//! [`LINGER`] — and only then closes. The connection stays counted until
//! then, so the process does not exit under a lingering close.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::phase::Counted;

/// Longest we wait for the client's EOF after our FIN.
pub(crate) const LINGER: Duration = Duration::from_secs(1);

/// What a lingering stream must be.
pub(crate) trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<I: AsyncRead + AsyncWrite + Unpin + Send + 'static> Stream for I {}

pub(crate) struct Lingering<I: Stream> {
    /// `None` only inside `drop`.
    stream: Option<I>,
    counted: Option<Counted>,
}

impl<I: Stream> Lingering<I> {
    pub(crate) fn new(stream: I, counted: Counted) -> Lingering<I> {
        Lingering {
            stream: Some(stream),
            counted: Some(counted),
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
        let (Some(stream), counted) = (self.stream.take(), self.counted.take()) else {
            return;
        };
        if counted.as_ref().is_some_and(|c| c.shared().cutting()) {
            return; // cut before a seal: closed now, not in a second
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                linger(stream).await;
                drop(counted);
            });
        }
    }
}

async fn linger<I: Stream>(mut stream: I) {
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
        match self.stream() {
            Ok(s) => s.poll_read(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

impl<I: Stream> AsyncWrite for Lingering<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
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
        match self.stream() {
            Ok(s) => s.poll_write_vectored(cx, bufs),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.as_ref().is_some_and(|s| s.is_write_vectored())
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.stream() {
            Ok(s) => s.poll_flush(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.stream() {
            Ok(s) => s.poll_shutdown(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}
