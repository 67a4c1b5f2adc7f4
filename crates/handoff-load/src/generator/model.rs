//! What a run of the generator is and what it keeps: its configuration, the
//! counts its clients share while it runs, and what it returns.
//!
//! A leaf below the generator's loop (`mod.rs`), its clients (`worker.rs`)
//! and the workloads (`kv.rs`), which all use it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::failure::{Failure, Kind};

/// How many failure descriptions a run keeps (the counts are always complete).
const KEEP_DETAILS: usize = 20;

/// What [`run`](super::run) runs.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// Targets; client `i` uses `addrs[i % len]`.
    pub addrs: Vec<SocketAddr>,
    /// Keep-alive clients.
    pub keepalive: usize,
    /// Clients opening a fresh connection per request.
    pub fresh: usize,
    /// Clients that make one request, then hold their connection idle.
    pub idle_holders: usize,
    /// How long the load runs.
    pub duration: Duration,
    /// Budget of one attempt (connect + request + response).
    pub timeout: Duration,
}

/// One answered request: when it started (µs after the run's epoch), how long it took
/// (including a stale-connection retry), and which process answered.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// When it started, µs after the run's epoch.
    pub start_us: u64,
    /// How long it took.
    pub latency_us: u64,
    /// Which process answered (its `X-Pid`).
    pub pid: u32,
}

/// One failed request.
#[derive(Debug, Clone)]
pub struct Failed {
    /// When it started, µs after the run's epoch.
    pub at_us: u64,
    /// How it failed.
    pub kind: Kind,
}

/// Everything a [`run`](super::run) saw.
#[derive(Debug, Default)]
pub struct LoadRun {
    /// Every answered request, by start time.
    pub samples: Vec<Sample>,
    /// Every failed request, by start time.
    pub failures: Vec<Failed>,
    /// The first few failures, described.
    pub details: Vec<String>,
    /// Benign: idle keep-alive connections the server closed, retried once.
    pub stale_retries: u64,
    /// Keep-alive clients and idle holders: connections opened beyond each one's first
    /// (fresh-connection clients open one per request by design and are not counted).
    pub reconnects: u64,
    /// How many keep-alive clients and idle holders ran.
    pub sticky_clients: u64,
}

/// Counts idle holders that have their connection open (the scale series waits for all).
#[derive(Debug, Default)]
pub struct Progress {
    /// Idle holders with an open, answered connection right now.
    pub holders_connected: AtomicUsize,
}

/// What requests the clients make.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Workload {
    /// `GET /`; any 2xx is an answer.
    Root,
    /// PUTs of unique values and GETs that check them (see [`value_for`](super::value_for)).
    KeyValue,
}

/// A run: its clients, its end, what it keeps.
pub(crate) struct Plan {
    pub(crate) cfg: LoadConfig,
    /// When the clients stop by themselves (`None`: only when told).
    pub(crate) deadline: Option<Instant>,
    pub(crate) workload: Workload,
    /// Keep every [`Sample`] and [`Failed`] (the benchmark's windows need
    /// them; a long demo would only grow).
    pub(crate) record: bool,
}

/// Running counts of a run, readable while it runs.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    pub(crate) ok: AtomicU64,
    pub(crate) refused: AtomicU64,
    pub(crate) reset: AtomicU64,
    pub(crate) eof_before: AtomicU64,
    pub(crate) eof_mid: AtomicU64,
    pub(crate) timeouts: AtomicU64,
    pub(crate) bad_status: AtomicU64,
    pub(crate) mismatches: AtomicU64,
    pub(crate) other: AtomicU64,
    pub(crate) stale_retries: AtomicU64,
}

/// What went wrong with one request: the taxonomy, plus the two ways an
/// answer can be wrong.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Problem<'a> {
    /// No answer.
    Failed(&'a Failure),
    /// An answer with a status the request did not expect.
    BadStatus,
    /// A 200 with other bytes than were written, or a 404 for an
    /// acknowledged write.
    Mismatch,
}

impl Problem<'_> {
    fn kind(self) -> Kind {
        match self {
            Problem::Failed(f) => Kind::of(f),
            Problem::BadStatus => Kind::Non2xx,
            Problem::Mismatch => Kind::Other,
        }
    }
}

/// State every client of a run shares.
#[derive(Debug)]
pub(crate) struct Shared {
    /// Time zero of the run's offsets.
    pub(crate) epoch: Instant,
    pub(crate) tally: Tally,
    /// The first [`KEEP_DETAILS`] failures, described, in order.
    pub(crate) details: Mutex<Vec<String>>,
    /// Every acknowledged PUT: key → exact value. Keys are unique, written once.
    pub(crate) acked: Mutex<HashMap<String, Vec<u8>>>,
}

impl Shared {
    pub(crate) fn new(epoch: Instant) -> Shared {
        Shared {
            epoch,
            tally: Tally::default(),
            details: Mutex::default(),
            acked: Mutex::default(),
        }
    }

    /// Microseconds from the epoch to `t`.
    pub(crate) fn offset(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_micros() as u64
    }

    /// Counts a failed request (started at `at`) and keeps its description
    /// while there is room; returns its kind.
    pub(crate) fn fail(&self, at: Instant, problem: Problem, what: String) -> Kind {
        let t = &self.tally;
        let counter = match problem {
            Problem::Failed(Failure::Refused) => &t.refused,
            Problem::Failed(Failure::Reset) => &t.reset,
            Problem::Failed(Failure::EofBeforeResponse) => &t.eof_before,
            Problem::Failed(Failure::EofMidResponse) => &t.eof_mid,
            Problem::Failed(Failure::Timeout) => &t.timeouts,
            Problem::Failed(Failure::Other(_)) => &t.other,
            Problem::BadStatus => &t.bad_status,
            Problem::Mismatch => &t.mismatches,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let mut details = self.details.lock().unwrap_or_else(|p| p.into_inner());
        if details.len() < KEEP_DETAILS {
            let ms = self.offset(at) as f64 / 1000.0;
            details.push(format!("[+{ms:.1} ms] {what}"));
        }
        problem.kind()
    }
}

/// A request a client is to make, and what it is for.
#[derive(Debug)]
pub(crate) struct Req {
    pub(crate) method: &'static str,
    pub(crate) path: String,
    pub(crate) body: Option<Vec<u8>>,
    pub(crate) op: Op,
}

/// What a request is for, which decides what a right answer is.
#[derive(Debug)]
pub(crate) enum Op {
    /// `GET /`: any 2xx.
    Root,
    /// Writes a new key; acknowledged by 200, 201 or 204.
    Put { key: String },
    /// Reads back the `index`th of this client's acknowledged writes:
    /// 200 with exactly its bytes.
    Get { index: usize },
}

impl Req {
    /// `GET /`.
    pub(crate) fn root() -> Req {
        Req {
            method: "GET",
            path: "/".into(),
            body: None,
            op: Op::Root,
        }
    }
}

/// What a client makes of an answer.
#[derive(Debug)]
pub(crate) enum Verdict {
    /// Right.
    Answered,
    /// A status the request did not expect; what it was.
    BadStatus(String),
    /// The wrong bytes, or an acknowledged write gone; how.
    Mismatch(String),
}
