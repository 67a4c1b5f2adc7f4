//! A small blocking HTTP/1.1 client that classifies every failure, for
//! one-off requests and probes (`GET /version`, which pid answers) and the
//! read-back of acknowledged writes; the load itself is the generator's.
//!
//! [`Client`] retries a request once on a fresh connection when the server
//! closed an idle keep-alive connection (RFC 9112 §9.3.1), and counts it as
//! a stale retry, as the generator does.

use std::fmt;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::failure::{classify, Failure};

/// Connect, read and write timeout of the HTTP client, and the budget of one
/// request of [`Load`](super::Load). Generous on purpose: during a handoff a
/// request may legitimately wait in the accept backlog for the whole accept
/// gap, and on a loaded 2-core CI machine that can be long; a timeout is
/// only meant to catch a real hang.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// A parsed HTTP response.
#[derive(Debug, Clone)]
pub struct Response {
    /// Its status code.
    pub status: u16,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
    /// Its body, unframed.
    pub body: Vec<u8>,
    /// The server will close the connection after this response (`Connection: close`,
    /// HTTP/1.0 without keep-alive, or a body delimited by EOF).
    pub close: bool,
}

impl Response {
    /// The value of header `name` (any case), if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as text (invalid UTF-8 replaced).
    pub fn body_str(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One blocking HTTP/1.1 connection, usable for several requests (keep-alive).
#[derive(Debug)]
pub struct Conn {
    reader: BufReader<TcpStream>,
    host: String,
    /// Responses received on this connection; > 0 means the connection is "reused".
    responses: u64,
    /// The server announced (or performed) a close; the connection must not be used again.
    closed: bool,
}

impl Conn {
    /// Connects with [`IO_TIMEOUT`] as connect, read and write timeout.
    pub fn connect(addr: SocketAddr) -> Result<Conn, Failure> {
        let stream =
            TcpStream::connect_timeout(&addr, IO_TIMEOUT).map_err(|e| classify(&e, false))?;
        let setup = |s: &TcpStream| -> io::Result<()> {
            s.set_read_timeout(Some(IO_TIMEOUT))?;
            s.set_write_timeout(Some(IO_TIMEOUT))?;
            s.set_nodelay(true)
        };
        setup(&stream).map_err(|e| classify(&e, false))?;
        Ok(Conn {
            reader: BufReader::with_capacity(16 * 1024, stream),
            host: addr.to_string(),
            responses: 0,
            closed: false,
        })
    }

    /// Whether a response has already been received on this connection, i.e. whether an
    /// EOF before the next response may be the server closing an idle connection.
    pub fn is_reused(&self) -> bool {
        self.responses > 0
    }

    /// Whether the connection may carry another request.
    pub fn is_open(&self) -> bool {
        !self.closed
    }

    /// `GET path`, keeping the connection open.
    pub fn get(&mut self, path: &str) -> Result<Response, Failure> {
        self.request("GET", path, None, false)
    }

    /// `PUT path` with `body`, keeping the connection open.
    pub fn put(&mut self, path: &str, body: &[u8]) -> Result<Response, Failure> {
        self.request("PUT", path, Some(body), false)
    }

    /// Sends one request and reads its response. `close` adds `Connection: close` (a client
    /// that wants one request per connection says so, as real clients do).
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        close: bool,
    ) -> Result<Response, Failure> {
        if self.closed {
            return Err(Failure::Other("request on a closed connection".into()));
        }
        let result = self.exchange(method, path, body, close);
        match &result {
            Ok(resp) => {
                self.responses += 1;
                if resp.close || close {
                    self.closed = true;
                }
            }
            Err(_) => self.closed = true,
        }
        result
    }

    fn exchange(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        close: bool,
    ) -> Result<Response, Failure> {
        // One buffer, one write_all: the request leaves in as few segments as possible.
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {}\r\n", self.host);
        if let Some(body) = body {
            req.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        if close {
            req.push_str("Connection: close\r\n");
        }
        req.push_str("\r\n");
        let mut bytes = req.into_bytes();
        if let Some(body) = body {
            bytes.extend_from_slice(body);
        }

        let reused = self.is_reused();
        let stream = self.reader.get_mut();
        if let Err(e) = stream.write_all(&bytes).and_then(|()| stream.flush()) {
            let failure = classify(&e, false);
            // A large request written in several segments to a reused connection the server
            // had already closed while idle can fail with EPIPE/ECONNRESET on a later
            // segment. If the server's side is an orderly close with nothing sent, it is the
            // same benign idle close as an EOF before the response.
            if failure == Failure::Reset && reused {
                let mut probe = [0u8; 1];
                if let Ok(0) = stream.read(&mut probe) {
                    return Err(Failure::EofBeforeResponse);
                }
            }
            return Err(failure);
        }
        self.read_response(method == "HEAD")
    }

    fn read_response(&mut self, head_request: bool) -> Result<Response, Failure> {
        let mut got_any = false;
        loop {
            let status_line = self.read_line(&mut got_any)?;
            let mut parts = status_line.splitn(3, ' ');
            let version = parts.next().unwrap_or_default().to_owned();
            let status: u16 = parts
                .next()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| Failure::Other(format!("bad status line {status_line:?}")))?;
            if !version.starts_with("HTTP/1.") {
                return Err(Failure::Other(format!("bad status line {status_line:?}")));
            }

            let mut headers = Vec::new();
            loop {
                let line = self.read_line(&mut got_any)?;
                if line.is_empty() {
                    break;
                }
                let (name, value) = line
                    .split_once(':')
                    .ok_or_else(|| Failure::Other(format!("bad header line {line:?}")))?;
                headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
            }
            if (100..200).contains(&status) {
                continue; // Interim response (e.g. 100 Continue): the real one follows.
            }

            let header = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v);
            let connection_has = |token: &str| {
                header("connection")
                    .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
            };
            let mut close =
                connection_has("close") || (version == "HTTP/1.0" && !connection_has("keep-alive"));
            let chunked = header("transfer-encoding")
                .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
            let content_length = match header("content-length") {
                Some(v) => Some(
                    v.parse::<usize>()
                        .map_err(|_| Failure::Other(format!("bad Content-Length {v:?}")))?,
                ),
                None => None,
            };

            let body = if head_request || status == 204 || status == 304 {
                Vec::new()
            } else if chunked {
                self.read_chunked()?
            } else if let Some(len) = content_length {
                let mut body = vec![0u8; len];
                self.reader
                    .read_exact(&mut body)
                    .map_err(|e| classify(&e, true))?;
                body
            } else {
                // No framing: the body runs to EOF and the connection is done.
                close = true;
                let mut body = Vec::new();
                self.reader
                    .read_to_end(&mut body)
                    .map_err(|e| classify(&e, true))?;
                body
            };
            return Ok(Response {
                status,
                headers,
                body,
                close,
            });
        }
    }

    /// Reads one CRLF-terminated line (without the terminator).
    fn read_line(&mut self, got_any: &mut bool) -> Result<String, Failure> {
        let mut buf = Vec::new();
        let result = self.reader.read_until(b'\n', &mut buf);
        if !buf.is_empty() {
            *got_any = true;
        }
        match result {
            Ok(0) if !*got_any => Err(Failure::EofBeforeResponse),
            Ok(0) => Err(Failure::EofMidResponse),
            Ok(_) if !buf.ends_with(b"\n") => Err(Failure::EofMidResponse),
            Ok(_) => {
                buf.pop();
                if buf.last() == Some(&b'\r') {
                    buf.pop();
                }
                String::from_utf8(buf).map_err(|_| Failure::Other("non-UTF-8 response head".into()))
            }
            Err(e) => Err(classify(&e, *got_any)),
        }
    }

    fn read_chunked(&mut self) -> Result<Vec<u8>, Failure> {
        let mut got_any = true;
        let mut body = Vec::new();
        loop {
            let line = self.read_line(&mut got_any)?;
            let size_hex = line.split(';').next().unwrap_or_default().trim();
            let size = usize::from_str_radix(size_hex, 16)
                .map_err(|_| Failure::Other(format!("bad chunk size {line:?}")))?;
            if size == 0 {
                // Trailers, then the empty line.
                while !self.read_line(&mut got_any)?.is_empty() {}
                return Ok(body);
            }
            let start = body.len();
            body.resize(start + size, 0);
            self.reader
                .read_exact(&mut body[start..])
                .map_err(|e| classify(&e, true))?;
            if !self.read_line(&mut got_any)?.is_empty() {
                return Err(Failure::Other("chunk not followed by CRLF".into()));
            }
        }
    }
}

/// A request that failed, with the context needed to diagnose it.
#[derive(Debug, Clone)]
pub struct RequestError {
    /// How it failed.
    pub failure: Failure,
    /// The failed attempt was on a reused keep-alive connection.
    pub reused: bool,
    /// It was already the retry after a stale keep-alive connection.
    pub after_retry: bool,
}

impl fmt::Display for RequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (on a {} connection{})",
            self.failure,
            if self.reused { "reused" } else { "fresh" },
            if self.after_retry {
                ", after a stale-connection retry"
            } else {
                ""
            }
        )
    }
}

/// A well-behaved HTTP client on top of [`Conn`]: keep-alive or one connection per request,
/// reconnecting after `Connection: close`, and retrying a request once on a fresh
/// connection when a reused connection hits EOF before any response byte (the server closed
/// it while idle — RFC 9112 §9.3.1). Those retries are counted, not treated as failures.
#[derive(Debug)]
pub struct Client {
    addr: SocketAddr,
    keepalive: bool,
    conn: Option<Conn>,
    /// Requests retried after a stale keep-alive connection (benign).
    pub stale_retries: u64,
}

impl Client {
    /// A client of `addr`: one keep-alive connection if `keepalive`, else
    /// a fresh connection (`Connection: close`) per request.
    pub fn new(addr: SocketAddr, keepalive: bool) -> Client {
        Client {
            addr,
            keepalive,
            conn: None,
            stale_retries: 0,
        }
    }

    /// `GET path`.
    pub fn get(&mut self, path: &str) -> Result<Response, RequestError> {
        self.request("GET", path, None)
    }

    /// `PUT path` with `body`.
    pub fn put(&mut self, path: &str, body: &[u8]) -> Result<Response, RequestError> {
        self.request("PUT", path, Some(body))
    }

    /// One request, on the open connection or a new one, retried once on
    /// a fresh connection if a reused one had been closed while idle.
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<Response, RequestError> {
        let mut retried = false;
        loop {
            let conn = match self.conn.as_mut().filter(|c| c.is_open()) {
                Some(conn) => conn,
                None => {
                    let conn = Conn::connect(self.addr).map_err(|failure| RequestError {
                        failure,
                        reused: false,
                        after_retry: retried,
                    })?;
                    self.conn.insert(conn)
                }
            };
            let reused = conn.is_reused();
            let result = conn.request(method, path, body, !self.keepalive);
            if !conn.is_open() {
                self.conn = None;
            }
            match result {
                Ok(resp) => return Ok(resp),
                Err(Failure::EofBeforeResponse) if reused && !retried => {
                    self.stale_retries += 1;
                    retried = true;
                }
                Err(failure) => {
                    return Err(RequestError {
                        failure,
                        reused,
                        after_retry: retried,
                    })
                }
            }
        }
    }
}

/// `GET /version` on a fresh connection: the pid of the process that served it and its
/// build id (body `pid=<pid> build=<build id>`).
pub fn get_version(addr: SocketAddr) -> Result<(u32, String), Failure> {
    let resp = Conn::connect(addr)?.request("GET", "/version", None, true)?;
    if resp.status != 200 {
        return Err(Failure::Other(format!(
            "GET /version: status {} body {:?}",
            resp.status,
            resp.body_str()
        )));
    }
    let body = resp.body_str();
    let mut pid = None;
    let mut build = String::new();
    for field in body.split_whitespace() {
        if let Some(v) = field.strip_prefix("pid=") {
            pid = v.parse::<u32>().ok();
        } else if let Some(v) = field.strip_prefix("build=") {
            build = v.to_owned();
        }
    }
    pid.map(|p| (p, build))
        .ok_or_else(|| Failure::Other(format!("GET /version: unexpected body {body:?}")))
}

/// The pid serving `GET /version` right now.
pub fn serving_pid(addr: SocketAddr) -> Result<u32, Failure> {
    get_version(addr).map(|(pid, _)| pid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::thread;

    /// A scripted one-connection-at-a-time server: for each accepted connection, the list
    /// of raw responses to send, one per request read; after the list, it closes.
    fn scripted_server(script: Vec<Vec<&'static str>>) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        thread::spawn(move || {
            for responses in script {
                let (stream, _) = listener.accept().unwrap();
                let mut reader = BufReader::new(stream);
                for resp in responses {
                    // Read one request head (+ body by Content-Length).
                    let mut len = 0;
                    loop {
                        let mut line = String::new();
                        if reader.read_line(&mut line).unwrap() == 0 {
                            return;
                        }
                        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap();
                        }
                        if line == "\r\n" {
                            break;
                        }
                    }
                    let mut body = vec![0; len];
                    reader.read_exact(&mut body).unwrap();
                    reader.get_mut().write_all(resp.as_bytes()).unwrap();
                }
                // Orderly "lingering" close, as a correct server closes an idle keep-alive
                // connection: FIN first, then drain until the client closes. Closing with
                // unread request bytes instead would make the kernel send RST, which the
                // client rightly reports as a reset.
                let stream = reader.into_inner();
                let _ = stream.shutdown(std::net::Shutdown::Write);
                let _ = (&stream).read_to_end(&mut Vec::new());
            }
        });
        addr
    }

    #[test]
    fn client_keepalive_close_and_stale_retry() {
        let addr = scripted_server(vec![
            // Conn 1: one keep-alive response, then an idle close.
            vec!["HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"],
            // Conn 2 (the retry): a chunked response with Connection: close.
            vec!["HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\n"],
            // Conn 3: 204 then a cut response.
            vec!["HTTP/1.1 204 No Content\r\n\r\n", "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"],
        ]);
        let mut client = Client::new(addr, true);
        let r = client.get("/a").unwrap();
        assert_eq!(
            (r.status, r.body.as_slice(), r.close),
            (200, &b"ok"[..], false)
        );
        // The server closed conn 1 while idle: EOF before response → one retry on conn 2.
        let r = client.get("/b").unwrap();
        assert_eq!(
            (r.status, r.body.as_slice(), r.close),
            (200, &b"abc"[..], true)
        );
        assert_eq!(client.stale_retries, 1);
        // Conn 2 said close → conn 3 is opened without any retry.
        let r = client.put("/c", b"value").unwrap();
        assert_eq!(r.status, 204);
        assert_eq!(client.stale_retries, 1);
        let err = client.get("/d").unwrap_err();
        assert_eq!(err.failure, Failure::EofMidResponse);
        assert!(err.reused);
    }

    #[test]
    fn eof_on_fresh_connection_is_a_failure_and_refused_is_classified() {
        let addr = scripted_server(vec![vec![]]);
        let err = Client::new(addr, true).get("/").unwrap_err();
        assert_eq!(err.failure, Failure::EofBeforeResponse);
        assert!(!err.reused);

        // A port that was just bound and released: nothing listens there.
        let free = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        assert_eq!(Conn::connect(free).err(), Some(Failure::Refused));
    }
}
