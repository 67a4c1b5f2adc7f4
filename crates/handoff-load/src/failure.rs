//! The failure taxonomy: how a request that did not produce a response is
//! classified. Anything but [`Failure::EofBeforeResponse`] on a reused
//! keep-alive connection is a broken promise of the product.

use std::fmt;
use std::io;

use serde::Serialize;

/// Why a request did not produce a response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// `connect` got ECONNREFUSED: no listening socket at that moment.
    Refused,
    /// ECONNRESET / ECONNABORTED / EPIPE at any point.
    Reset,
    /// Orderly EOF before the first byte of the response. Benign only on a reused keep-alive
    /// connection (the server closed it while idle); on a fresh connection it is a failure.
    EofBeforeResponse,
    /// EOF after part of the response: the response was cut.
    EofMidResponse,
    /// No progress within the client's timeout.
    Timeout,
    /// Anything else (malformed response, unexpected error).
    Other(String),
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Refused => f.write_str("connection refused"),
            Failure::Reset => f.write_str("connection reset"),
            Failure::EofBeforeResponse => f.write_str("EOF before any response byte"),
            Failure::EofMidResponse => f.write_str("EOF in the middle of the response"),
            Failure::Timeout => f.write_str("timed out"),
            Failure::Other(s) => write!(f, "{s}"),
        }
    }
}

/// Maps an I/O error to a [`Failure`]; `got_any` says whether any response byte had
/// arrived, which decides which kind of EOF an `UnexpectedEof` is.
pub fn classify(e: &io::Error, got_any: bool) -> Failure {
    use io::ErrorKind::*;
    match e.kind() {
        ConnectionRefused => Failure::Refused,
        ConnectionReset | ConnectionAborted | BrokenPipe => Failure::Reset,
        WouldBlock | TimedOut => Failure::Timeout,
        UnexpectedEof if got_any => Failure::EofMidResponse,
        UnexpectedEof => Failure::EofBeforeResponse,
        _ => Failure::Other(format!("I/O error: {e} ({:?})", e.kind())),
    }
}

/// The kinds of failed request the benchmark reports, one column each:
/// the taxonomy with both EOFs as one `Cut`, an unexpected status as
/// `Non2xx`, and a wrong answer (the key-value load's mismatch) under
/// `Other`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Kind {
    /// See [`Failure::Refused`].
    Refused,
    /// See [`Failure::Reset`].
    Reset,
    /// See [`Failure::Timeout`].
    Timeout,
    /// EOF before (on a fresh connection or the retry) or in the middle of the response.
    Cut,
    /// A response with a status the request did not expect.
    Non2xx,
    /// Anything else.
    Other,
}

impl Kind {
    /// Every kind, in the report's column order.
    pub const ALL: [Kind; 6] = [
        Kind::Refused,
        Kind::Reset,
        Kind::Timeout,
        Kind::Cut,
        Kind::Non2xx,
        Kind::Other,
    ];

    /// The kind a transport failure counts as.
    pub fn of(f: &Failure) -> Kind {
        match f {
            Failure::Refused => Kind::Refused,
            Failure::Reset => Kind::Reset,
            Failure::Timeout => Kind::Timeout,
            Failure::EofBeforeResponse | Failure::EofMidResponse => Kind::Cut,
            Failure::Other(_) => Kind::Other,
        }
    }

    /// Its column name.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Refused => "refused",
            Kind::Reset => "reset",
            Kind::Timeout => "timeout",
            Kind::Cut => "cut",
            Kind::Non2xx => "non-2xx",
            Kind::Other => "other",
        }
    }
}

/// The first bytes of a body, for failure messages.
pub(crate) fn snippet(body: &[u8]) -> String {
    let end = body.len().min(48);
    let mut s = String::from_utf8_lossy(&body[..end]).into_owned();
    if body.len() > end {
        s.push('…');
    }
    s
}
