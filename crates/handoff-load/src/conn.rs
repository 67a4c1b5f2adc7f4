//! One async HTTP/1.1 client connection that classifies every failure
//! ([`crate::failure`]): the generator's, and `handoff-bench-move`'s on its
//! own.
//!
//! It reads whole responses — `Content-Length`, chunked, or up to EOF;
//! interim `1xx` skipped — with httparse (hyper's parser) for the head, and
//! keeps only what a load generator looks at: the status, the `X-Pid` of
//! the process that answered, whether the server will close, the body.

use std::fmt::Write as _;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::failure::{classify, Failure};

/// How long a failed write waits to see whether the server had closed the
/// connection in order (see [`Conn::send`]); the FIN is already there when
/// it did, so this only bounds the impossible.
const CLOSE_PROBE: Duration = Duration::from_secs(1);

/// Most header lines a response may have.
const MAX_HEADERS: usize = 32;

/// A response, as far as a load generator looks at it.
#[derive(Debug, Clone)]
pub struct Resp {
    /// Its status code.
    pub status: u16,
    /// Its `X-Pid` header: which process answered (0 if absent).
    pub pid: u32,
    /// The server will close the connection after it (`Connection: close`,
    /// HTTP/1.0 without keep-alive, or a body delimited by EOF).
    pub close: bool,
    /// Its body.
    pub body: Vec<u8>,
}

/// One client connection, usable for several requests (keep-alive).
#[derive(Debug)]
pub struct Conn {
    stream: TcpStream,
    host: String,
    /// Received and not yet consumed.
    buf: Vec<u8>,
    /// Whether a byte of the response being read has arrived: decides which
    /// kind of EOF an EOF is.
    got_any: bool,
    /// A response has been received on it, so an EOF before the next one
    /// may be the server closing it while idle.
    used: bool,
}

/// The head of a response, parsed.
struct Head {
    len: usize,
    status: u16,
    http10: bool,
    content_length: Option<usize>,
    chunked: bool,
    close: bool,
    keep_alive: bool,
    pid: u32,
}

impl Conn {
    /// Connects to `addr` (no timeout of its own: the caller bounds the
    /// whole attempt).
    pub async fn connect(addr: SocketAddr) -> Result<Conn, Failure> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| classify(&e, false))?;
        let _ = stream.set_nodelay(true);
        Ok(Conn {
            stream,
            host: addr.to_string(),
            buf: Vec::with_capacity(512),
            got_any: false,
            used: false,
        })
    }

    /// The client's end: its local port tells one TCP connection from another.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.stream.local_addr()
    }

    /// Whether a response has already been received on this connection, so
    /// that an EOF before the next one may be the server closing it while
    /// idle.
    pub fn is_reused(&self) -> bool {
        self.used
    }

    /// Sends `GET /` (with `Connection: close` if `close`) and reads the whole response.
    pub async fn request(&mut self, close: bool) -> Result<Resp, Failure> {
        self.send("GET", "/", None, close).await
    }

    /// Sends one request and reads its response. `close` adds `Connection:
    /// close` (a client that wants one request per connection says so, as
    /// real clients do).
    pub async fn send(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        close: bool,
    ) -> Result<Resp, Failure> {
        // One buffer, one write: the request leaves in as few segments as possible.
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {}\r\n", self.host);
        if let Some(body) = body {
            let _ = write!(head, "Content-Length: {}\r\n", body.len());
        }
        if close {
            head.push_str("Connection: close\r\n");
        }
        head.push_str("\r\n");
        let mut bytes = head.into_bytes();
        if let Some(body) = body {
            bytes.extend_from_slice(body);
        }
        if let Err(e) = self.stream.write_all(&bytes).await {
            let failure = classify(&e, false);
            // A large request written in several segments to a reused connection the server
            // had already closed while idle can fail with EPIPE/ECONNRESET on a later
            // segment. If the server's side is an orderly close with nothing sent, it is the
            // same benign idle close as an EOF before the response.
            if failure == Failure::Reset && self.used {
                let mut probe = [0u8; 1];
                if let Ok(Ok(0)) =
                    tokio::time::timeout(CLOSE_PROBE, self.stream.read(&mut probe)).await
                {
                    return Err(Failure::EofBeforeResponse);
                }
            }
            return Err(failure);
        }
        self.read_response(method == "HEAD").await
    }

    /// Waits until the server sends something or closes the connection: an
    /// idle client's wait for the drain to close it.
    pub(crate) async fn idle(&mut self) {
        let mut probe = [0u8; 64];
        let _ = self.stream.read(&mut probe).await;
    }

    async fn read_response(&mut self, head_request: bool) -> Result<Resp, Failure> {
        self.got_any = !self.buf.is_empty();
        loop {
            let head = self.read_head().await?;
            self.buf.drain(..head.len);
            if (100..200).contains(&head.status) {
                continue; // Interim response (e.g. 100 Continue): the real one follows.
            }
            let mut close = head.close || (head.http10 && !head.keep_alive);
            let body = if head_request || head.status == 204 || head.status == 304 {
                Vec::new()
            } else if head.chunked {
                self.read_chunked().await?
            } else if let Some(len) = head.content_length {
                while self.buf.len() < len {
                    self.read_more().await?;
                }
                self.buf.drain(..len).collect()
            } else {
                // No framing: the body runs to EOF and the connection is done.
                close = true;
                loop {
                    match self.stream.read_buf(&mut self.buf).await {
                        Ok(0) => break,
                        Ok(_) => {}
                        Err(e) => return Err(classify(&e, true)),
                    }
                }
                std::mem::take(&mut self.buf)
            };
            self.used = true;
            return Ok(Resp {
                status: head.status,
                pid: head.pid,
                close,
                body,
            });
        }
    }

    async fn read_head(&mut self) -> Result<Head, Failure> {
        loop {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut resp = httparse::Response::new(&mut headers);
            match resp.parse(&self.buf) {
                Ok(httparse::Status::Complete(len)) => {
                    let mut head = Head {
                        len,
                        status: resp.code.unwrap_or(0),
                        http10: resp.version == Some(0),
                        content_length: None,
                        chunked: false,
                        close: false,
                        keep_alive: false,
                        pid: 0,
                    };
                    for h in resp.headers.iter() {
                        let v = String::from_utf8_lossy(h.value);
                        let v = v.trim();
                        let has = |token: &str| {
                            v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token))
                        };
                        if h.name.eq_ignore_ascii_case("content-length") {
                            head.content_length = Some(v.parse().map_err(|_| {
                                Failure::Other(format!("bad Content-Length {v:?}"))
                            })?);
                        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                            head.chunked = v.to_ascii_lowercase().contains("chunked");
                        } else if h.name.eq_ignore_ascii_case("connection") {
                            head.close |= has("close");
                            head.keep_alive |= has("keep-alive");
                        } else if h.name.eq_ignore_ascii_case("x-pid") {
                            head.pid = v.parse().unwrap_or(0);
                        }
                    }
                    return Ok(head);
                }
                Ok(httparse::Status::Partial) => {}
                Err(e) => return Err(Failure::Other(format!("malformed response head: {e}"))),
            }
            self.read_more().await?;
        }
    }

    /// A chunked body: size lines, chunks, the last chunk and trailers.
    async fn read_chunked(&mut self) -> Result<Vec<u8>, Failure> {
        let mut body = Vec::new();
        loop {
            let line = self.read_line().await?;
            let size_hex = line.split(';').next().unwrap_or_default().trim();
            let size = usize::from_str_radix(size_hex, 16)
                .map_err(|_| Failure::Other(format!("bad chunk size {line:?}")))?;
            if size == 0 {
                // Trailers, then the empty line.
                while !self.read_line().await?.is_empty() {}
                return Ok(body);
            }
            while self.buf.len() < size {
                self.read_more().await?;
            }
            body.extend(self.buf.drain(..size));
            if !self.read_line().await?.is_empty() {
                return Err(Failure::Other("chunk not followed by CRLF".into()));
            }
        }
    }

    /// One CRLF-terminated line of the body's framing, without the terminator.
    async fn read_line(&mut self) -> Result<String, Failure> {
        loop {
            if let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = self.buf.drain(..=end).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return String::from_utf8(line)
                    .map_err(|_| Failure::Other("non-UTF-8 chunk framing".into()));
            }
            self.read_more().await?;
        }
    }

    /// Reads what has arrived; an EOF here is a response cut short (or never begun).
    async fn read_more(&mut self) -> Result<(), Failure> {
        let got_any = self.got_any || !self.buf.is_empty();
        match self.stream.read_buf(&mut self.buf).await {
            Ok(0) if got_any => Err(Failure::EofMidResponse),
            Ok(0) => Err(Failure::EofBeforeResponse),
            Ok(_) => {
                self.got_any = true;
                Ok(())
            }
            Err(e) => Err(classify(&e, got_any)),
        }
    }
}
