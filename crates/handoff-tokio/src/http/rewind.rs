//! A stream read from a few bytes already taken off it first: the bytes
//! read to tell HTTP/2's preface from HTTP/1.1, and the unread bytes a
//! connection moved from the previous build arrives with.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pub(crate) struct Rewind<I> {
    prefix: Vec<u8>,
    /// How much of `prefix` has been read.
    pos: usize,
    io: I,
}

impl<I> Rewind<I> {
    pub(crate) fn new(prefix: Vec<u8>, io: I) -> Rewind<I> {
        Rewind { prefix, pos: 0, io }
    }

    /// Puts `bytes` back in front of whatever is still to be read.
    pub(crate) fn put_back(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let mut front = bytes.to_vec();
        front.extend_from_slice(&self.prefix[self.pos..]);
        self.prefix = front;
        self.pos = 0;
    }

    /// The stream and the bytes not read yet, which come before it.
    pub(crate) fn into_parts(mut self) -> (I, Vec<u8>) {
        let rest = self.prefix.split_off(self.pos);
        (self.io, rest)
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Rewind<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.pos < self.prefix.len() {
            let n = (self.prefix.len() - self.pos).min(buf.remaining());
            let from = self.pos;
            buf.put_slice(&self.prefix[from..from + n]);
            self.pos += n;
            if self.pos == self.prefix.len() {
                self.prefix = Vec::new();
                self.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Rewind<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn the_prefix_then_the_stream_and_what_is_left_comes_back() {
        let (mut a, b) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut a, b"world")
            .await
            .unwrap();
        let mut r = Rewind::new(b"lo ".to_vec(), b);
        r.put_back(b"hel");
        let mut got = [0u8; 4];
        r.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hell");
        let (_, rest) = r.into_parts();
        assert_eq!(rest, b"o ");
    }
}
