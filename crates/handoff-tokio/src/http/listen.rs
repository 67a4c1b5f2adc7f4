//! What `serve` accepts on: TCP or Unix listening sockets (a service behind
//! a reverse proxy often listens on a Unix path), through one sealed trait.

use std::future::Future;
use std::io;
use std::os::fd::{AsFd, OwnedFd};

use tokio::io::{AsyncRead, AsyncWrite};

mod sealed {
    pub trait Sealed {}
    impl Sealed for tokio::net::TcpListener {}
    impl Sealed for tokio::net::UnixListener {}
}

/// A listening socket [`Handoff::serve`](crate::Handoff::serve) can accept
/// on: `tokio::net::TcpListener` or `tokio::net::UnixListener`, as
/// [`Handoff::tcp_listener`](crate::Handoff::tcp_listener) and
/// [`Handoff::unix_listener`](crate::Handoff::unix_listener) return them.
/// Sealed: nothing else implements it.
pub trait Listen: sealed::Sealed + Send + Sync + 'static {
    /// One accepted connection.
    #[doc(hidden)]
    type Io: AsyncRead + AsyncWrite + AsFd + Unpin + Send + Sync + 'static;

    /// Accepts one connection, ready for HTTP.
    #[doc(hidden)]
    fn accept_io(&self) -> impl Future<Output = io::Result<Self::Io>> + Send;

    /// The address, for messages.
    #[doc(hidden)]
    fn describe(&self) -> String;

    /// A connection the previous build moved to this one, ready for HTTP.
    #[doc(hidden)]
    fn adopt(fd: OwnedFd) -> io::Result<Self::Io>;
}

impl Listen for tokio::net::TcpListener {
    type Io = tokio::net::TcpStream;

    async fn accept_io(&self) -> io::Result<Self::Io> {
        let (s, _) = self.accept().await?;
        // Small responses go out at once, not after a delayed ACK.
        let _ = s.set_nodelay(true);
        Ok(s)
    }

    fn describe(&self) -> String {
        self.local_addr()
            .map(|a| format!("tcp://{a}"))
            .unwrap_or_else(|_| "a TCP listener".into())
    }

    fn adopt(fd: OwnedFd) -> io::Result<Self::Io> {
        let s = std::net::TcpStream::from(fd);
        s.set_nonblocking(true)?;
        let s = tokio::net::TcpStream::from_std(s)?;
        let _ = s.set_nodelay(true);
        Ok(s)
    }
}

impl Listen for tokio::net::UnixListener {
    type Io = tokio::net::UnixStream;

    async fn accept_io(&self) -> io::Result<Self::Io> {
        Ok(self.accept().await?.0)
    }

    fn describe(&self) -> String {
        self.local_addr()
            .ok()
            .and_then(|a| a.as_pathname().map(|p| format!("unix:{}", p.display())))
            .unwrap_or_else(|| "a Unix listener".into())
    }

    fn adopt(fd: OwnedFd) -> io::Result<Self::Io> {
        let s = std::os::unix::net::UnixStream::from(fd);
        s.set_nonblocking(true)?;
        tokio::net::UnixStream::from_std(s)
    }
}
