//! An optional readiness probe for programs that cannot (or do not) send
//! `READY=1`: an HTTP GET expecting a 2xx status, or a bare TCP connect.
//!
//! **Caveat.** Old and new process share the listening sockets, so a probe
//! against the service's own public address may be answered by the *old*
//! process and prove nothing about the new one. Point the probe at an
//! address only the new process serves (a per-instance health port), or use
//! it in addition to `READY=1`, which is per-process by construction. A
//! `tcp://` probe of a listener the supervisor holds always succeeds: the
//! kernel completes the handshake into the accept queue whoever accepts.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// What to check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadyProbe {
    /// `http://HOST:PORT/PATH`: GET must answer 2xx.
    Http {
        /// `HOST:PORT` to connect to (also sent as `Host:`); resolved at
        /// each attempt, its first address used.
        authority: String,
        /// The request target, from its leading `/` (`/` when the URL has
        /// none).
        path: String,
    },
    /// `tcp://HOST:PORT`: a connect must succeed.
    Tcp {
        /// `HOST:PORT` to connect to; resolved at each attempt, its first
        /// address used.
        authority: String,
    },
}

impl std::str::FromStr for ReadyProbe {
    type Err = String;

    /// ```
    /// use handoff::notify::ReadyProbe;
    /// let p: ReadyProbe = "http://127.0.0.1:8080/healthz".parse().unwrap();
    /// assert_eq!(p, ReadyProbe::Http { authority: "127.0.0.1:8080".into(), path: "/healthz".into() });
    /// assert!("ftp://x:1".parse::<ReadyProbe>().is_err());
    /// ```
    fn from_str(s: &str) -> Result<ReadyProbe, String> {
        let bad = |why: &str| {
            format!(
                "readiness probe {s:?}: {why}; expected http://HOST:PORT/PATH or tcp://HOST:PORT"
            )
        };
        if let Some(rest) = s.strip_prefix("http://") {
            let (authority, path) = match rest.find('/') {
                Some(i) => (&rest[..i], &rest[i..]),
                None => (rest, "/"),
            };
            if !authority.contains(':') {
                return Err(bad("missing :PORT"));
            }
            if path
                .chars()
                .any(|c| c.is_ascii_whitespace() || c.is_ascii_control())
            {
                return Err(bad("the path contains whitespace"));
            }
            Ok(ReadyProbe::Http {
                authority: authority.into(),
                path: path.into(),
            })
        } else if let Some(rest) = s.strip_prefix("tcp://") {
            if !rest.contains(':') || rest.contains('/') {
                return Err(bad("expected HOST:PORT after tcp://"));
            }
            Ok(ReadyProbe::Tcp {
                authority: rest.into(),
            })
        } else {
            Err(bad("unknown scheme"))
        }
    }
}

impl std::fmt::Display for ReadyProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadyProbe::Http { authority, path } => write!(f, "http://{authority}{path}"),
            ReadyProbe::Tcp { authority } => write!(f, "tcp://{authority}"),
        }
    }
}

impl ReadyProbe {
    /// One attempt, bounded by `timeout` per step. `Err` says why it failed.
    pub fn check(&self, timeout: Duration) -> Result<(), String> {
        let authority = match self {
            ReadyProbe::Http { authority, .. } | ReadyProbe::Tcp { authority } => authority,
        };
        let addr = authority
            .to_socket_addrs()
            .map_err(|e| format!("resolving {authority}: {e}"))?
            .next()
            .ok_or_else(|| format!("{authority} resolves to no address"))?;
        let mut s = TcpStream::connect_timeout(&addr, timeout)
            .map_err(|e| format!("connecting to {addr}: {e}"))?;
        let ReadyProbe::Http { path, .. } = self else {
            return Ok(());
        };
        s.set_read_timeout(Some(timeout))
            .map_err(|e| e.to_string())?;
        s.set_write_timeout(Some(timeout))
            .map_err(|e| e.to_string())?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: handoff-probe\r\nConnection: close\r\n\r\n"
        )
        .map_err(|e| format!("sending GET {path}: {e}"))?;
        // The status line is all we need; read at most a small prefix.
        let mut head = [0u8; 64];
        let mut n = 0;
        while n < 12 {
            match s.read(&mut head[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) => return Err(format!("reading the answer to GET {path}: {e}")),
            }
        }
        let line = String::from_utf8_lossy(&head[..n]);
        let code = line
            .strip_prefix("HTTP/1.")
            .and_then(|r| r.get(2..5))
            .ok_or_else(|| format!("GET {path}: not an HTTP answer: {line:?}"))?;
        if code.starts_with('2') {
            Ok(())
        } else {
            Err(format!("GET {path} answered {code}"))
        }
    }

    /// Retries [`check`](Self::check) every 50 ms until it passes, `give_up`
    /// returns true, or `limit` runs out; the last failure is returned.
    pub fn wait(&self, limit: Duration, give_up: impl Fn() -> bool) -> Result<(), String> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let err = match self.check(left.clamp(Duration::from_millis(1), Duration::from_secs(2)))
            {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            if Instant::now() >= deadline || give_up() {
                return Err(err);
            }
            std::thread::sleep(Duration::from_millis(50).min(left));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn parse_forms() {
        assert_eq!(
            "http://h:1".parse::<ReadyProbe>().unwrap(),
            ReadyProbe::Http {
                authority: "h:1".into(),
                path: "/".into()
            }
        );
        assert_eq!(
            "tcp://[::1]:9".parse::<ReadyProbe>().unwrap().to_string(),
            "tcp://[::1]:9"
        );
        for bad in [
            "http://nohost/",
            "tcp://x",
            "tcp://x:1/p",
            "udp://x:1",
            "http://h:1/a b",
        ] {
            assert!(bad.parse::<ReadyProbe>().is_err(), "{bad}");
        }
    }

    fn serve_once(answer: &'static [u8]) -> String {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = l.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            if let Ok((mut c, _)) = l.accept() {
                // The whole request head first: answering and closing after
                // a partial read would reset the rest of the client's
                // request (seen as "Connection reset by peer" under load).
                let mut head = Vec::new();
                let mut b = [0u8; 512];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match c.read(&mut b) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&b[..n]),
                    }
                }
                let _ = c.write_all(answer);
            }
        });
        a
    }

    #[test]
    fn http_status_decides() {
        let ok = serve_once(b"HTTP/1.1 204 No Content\r\n\r\n");
        let p: ReadyProbe = format!("http://{ok}/healthz").parse().unwrap();
        p.check(Duration::from_secs(5)).unwrap();
        let bad = serve_once(b"HTTP/1.1 503 Service Unavailable\r\n\r\n");
        let p: ReadyProbe = format!("http://{bad}/").parse().unwrap();
        let e = p.check(Duration::from_secs(5)).unwrap_err();
        assert!(e.contains("503"), "{e}");
    }

    #[test]
    fn tcp_connect_refused_times_out() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = l.local_addr().unwrap();
        drop(l);
        let p: ReadyProbe = format!("tcp://{a}").parse().unwrap();
        let e = p.wait(Duration::from_millis(200), || false).unwrap_err();
        assert!(e.contains("connecting"), "{e}");
    }
}
