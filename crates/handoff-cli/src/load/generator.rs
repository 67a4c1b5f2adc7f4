//! The load generator: PUTs of unique values and GETs that verify earlier acknowledged
//! values byte for byte, from keep-alive and from one-connection-per-request clients.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::client::{Client, Failure, RequestError};

/// How many failure descriptions a [`Load`] keeps (the counters count all of them).
const MAX_FAILURE_DESCRIPTIONS: usize = 20;

#[derive(Default)]
struct Counters {
    ok: AtomicU64,
    refused: AtomicU64,
    reset: AtomicU64,
    eof_before: AtomicU64,
    eof_mid: AtomicU64,
    timeouts: AtomicU64,
    bad_status: AtomicU64,
    mismatches: AtomicU64,
    other: AtomicU64,
    stale_retries: AtomicU64,
}

struct LoadShared {
    stop: AtomicBool,
    counters: Counters,
    failures: Mutex<Vec<String>>,
    /// Every acknowledged PUT: key → exact value. Keys are unique, written once.
    acked: Mutex<HashMap<String, Vec<u8>>>,
    started: Instant,
}

impl LoadShared {
    fn fail(&self, counter: &AtomicU64, what: String) {
        counter.fetch_add(1, Ordering::Relaxed);
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        if failures.len() < MAX_FAILURE_DESCRIPTIONS {
            let at = self.started.elapsed().as_secs_f64() * 1000.0;
            failures.push(format!("[+{at:.1} ms] {what}"));
        }
    }

    fn fail_request(&self, what: &str, err: &RequestError) {
        let c = &self.counters;
        let counter = match err.failure {
            Failure::Refused => &c.refused,
            Failure::Reset => &c.reset,
            Failure::EofBeforeResponse => &c.eof_before,
            Failure::EofMidResponse => &c.eof_mid,
            Failure::Timeout => &c.timeouts,
            Failure::Other(_) => &c.other,
        };
        self.fail(counter, format!("{what}: {err}"));
    }
}

/// Background HTTP load against the demo service: PUTs of unique values and GETs that
/// verify earlier acknowledged values byte for byte, from keep-alive clients and from
/// one-connection-per-request clients, unthrottled, until [`Load::stop`].
pub struct Load {
    shared: Arc<LoadShared>,
    threads: Vec<JoinHandle<()>>,
}

impl Load {
    /// Starts `keepalive` threads that reuse connections and `fresh` threads that open a
    /// new connection per request.
    ///
    /// Fails only if the OS refuses a thread; the threads already started are then stopped.
    pub fn start(addr: SocketAddr, keepalive: usize, fresh: usize) -> io::Result<Load> {
        let shared = Arc::new(LoadShared {
            stop: AtomicBool::new(false),
            counters: Counters::default(),
            failures: Mutex::new(Vec::new()),
            acked: Mutex::new(HashMap::new()),
            started: Instant::now(),
        });
        let mut load = Load {
            shared: Arc::clone(&shared),
            threads: Vec::new(),
        };
        let kinds = (0..keepalive)
            .map(|i| (format!("ka{i}"), true))
            .chain((0..fresh).map(|i| (format!("fr{i}"), false)));
        for (label, keepalive) in kinds {
            let shared = Arc::clone(&shared);
            // On error `load` is dropped, which tells the started threads to stop.
            load.threads.push(
                thread::Builder::new()
                    .name(format!("load-{label}"))
                    .spawn(move || client_loop(&shared, addr, &label, keepalive))?,
            );
        }
        Ok(load)
    }

    /// Successful requests so far (to wait for progress).
    pub fn ok_count(&self) -> u64 {
        self.shared.counters.ok.load(Ordering::Relaxed)
    }

    /// Failed requests so far (all kinds).
    pub fn failure_count(&self) -> u64 {
        self.snapshot().failure_count()
    }

    /// Waits (polling, at most `within`) until at least `n` more requests have succeeded:
    /// proof the service is serving the load, not merely answering a probe. Returns whether
    /// they did.
    pub fn wait_for_ok(&self, n: u64, within: Duration) -> bool {
        let target = self.ok_count() + n;
        let end = Instant::now() + within;
        loop {
            if self.ok_count() >= target {
                return true;
            }
            if Instant::now() >= end {
                return self.ok_count() >= target;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// The counts so far (without the acknowledged writes, which [`Load::stop`] returns).
    pub fn snapshot(&self) -> LoadReport {
        let c = &self.shared.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        LoadReport {
            ok: get(&c.ok),
            refused: get(&c.refused),
            reset: get(&c.reset),
            eof_before_response: get(&c.eof_before),
            eof_mid: get(&c.eof_mid),
            timeouts: get(&c.timeouts),
            bad_status: get(&c.bad_status),
            mismatches: get(&c.mismatches),
            other: get(&c.other),
            stale_retries: get(&c.stale_retries),
            failures: self
                .shared
                .failures
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            acked: HashMap::new(),
            elapsed: self.shared.started.elapsed(),
        }
    }

    /// Stops and joins the threads (each finishes its current request, bounded by
    /// [`IO_TIMEOUT`](super::IO_TIMEOUT)) and returns the final counts and every acknowledged write. A load
    /// thread that panicked (a bug) is counted as an `other` failure.
    pub fn stop(mut self) -> LoadReport {
        self.shared.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let name = t.thread().name().unwrap_or("load").to_owned();
            if t.join().is_err() {
                self.shared.fail(
                    &self.shared.counters.other,
                    format!("{name}: thread panicked"),
                );
            }
        }
        let mut report = self.snapshot();
        report.acked =
            std::mem::take(&mut *self.shared.acked.lock().unwrap_or_else(|p| p.into_inner()));
        report
    }
}

impl Drop for Load {
    /// A test that panics before `stop` must not leave threads hammering the next test.
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
    }
}

/// The value written for request `n` of thread `label`: unique (it starts with the key),
/// of varying length, and containing arbitrary bytes (NUL, CR, LF, 0xFF…) so that a server
/// that does not store and return exactly the bytes of the body is caught. Every 97th value
/// is 40 KiB, so some requests and responses span several TCP segments.
pub fn value_for(label: &str, n: u64) -> Vec<u8> {
    let mut v = format!("{label}-{n}:").into_bytes();
    let extra = if n.is_multiple_of(97) {
        40 * 1024
    } else {
        (n * 37 % 512) as usize
    };
    v.extend((0..extra as u64).map(|i| ((i * 131 + n * 7) % 256) as u8));
    v
}

/// Body of one load thread.
fn client_loop(shared: &LoadShared, addr: SocketAddr, label: &str, keepalive: bool) {
    let c = &shared.counters;
    let mut client = Client::new(addr, keepalive);
    // This thread's acknowledged writes, to pick GET targets without locking the shared map.
    let mut mine: Vec<(String, Vec<u8>)> = Vec::new();
    // Small xorshift PRNG, seeded per thread: which earlier key to read back.
    let mut rng: u64 = 0x9E37_79B9_7F4A_7C15
        ^ label
            .bytes()
            .fold(7u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64));
    let mut n: u64 = 0;
    while !shared.stop.load(Ordering::Relaxed) {
        n += 1;
        let retries_before = client.stale_retries;
        if mine.is_empty() || n.is_multiple_of(2) {
            let key = format!("{label}-{n}");
            let path = format!("/kv/{key}");
            let value = value_for(label, n);
            match client.put(&path, &value) {
                Ok(resp) if matches!(resp.status, 200 | 201 | 204) => {
                    c.ok.fetch_add(1, Ordering::Relaxed);
                    shared
                        .acked
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(key.clone(), value.clone());
                    mine.push((key, value));
                }
                Ok(resp) => shared.fail(
                    &c.bad_status,
                    format!(
                        "{label}: PUT {path}: status {} body {:?}",
                        resp.status,
                        snippet(&resp.body)
                    ),
                ),
                Err(e) => shared.fail_request(&format!("{label}: PUT {path}"), &e),
            }
        } else {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let (key, want) = &mine[(rng % mine.len() as u64) as usize];
            let path = format!("/kv/{key}");
            match client.get(&path) {
                Ok(resp) if resp.status == 200 && resp.body == *want => {
                    c.ok.fetch_add(1, Ordering::Relaxed);
                }
                Ok(resp) if resp.status == 200 => shared.fail(
                    &c.mismatches,
                    format!(
                        "{label}: GET {path}: body mismatch: {} bytes {:?}, expected {} bytes {:?}",
                        resp.body.len(),
                        snippet(&resp.body),
                        want.len(),
                        snippet(want)
                    ),
                ),
                Ok(resp) if resp.status == 404 => shared.fail(
                    &c.mismatches,
                    format!("{label}: GET {path}: 404 for an acknowledged write (lost)"),
                ),
                Ok(resp) => shared.fail(
                    &c.bad_status,
                    format!(
                        "{label}: GET {path}: status {} body {:?}",
                        resp.status,
                        snippet(&resp.body)
                    ),
                ),
                Err(e) => shared.fail_request(&format!("{label}: GET {path}"), &e),
            }
        }
        c.stale_retries
            .fetch_add(client.stale_retries - retries_before, Ordering::Relaxed);
    }
}

/// The first bytes of a body, for failure messages.
fn snippet(body: &[u8]) -> String {
    let end = body.len().min(48);
    let mut s = String::from_utf8_lossy(&body[..end]).into_owned();
    if body.len() > end {
        s.push('…');
    }
    s
}

/// Final numbers of a [`Load`] run.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    pub ok: u64,
    pub refused: u64,
    pub reset: u64,
    /// EOF before any response byte on a fresh connection (or on the retry): a failure.
    pub eof_before_response: u64,
    pub eof_mid: u64,
    pub timeouts: u64,
    pub bad_status: u64,
    /// Wrong body, or 404 for an acknowledged write.
    pub mismatches: u64,
    pub other: u64,
    /// Benign: idle keep-alive connections closed by the server, retried once.
    pub stale_retries: u64,
    /// The first few failures, in order, with a timestamp relative to the load's start.
    pub failures: Vec<String>,
    /// Every acknowledged PUT (filled by [`Load::stop`]).
    pub acked: HashMap<String, Vec<u8>>,
    pub elapsed: Duration,
}

impl LoadReport {
    pub fn failure_count(&self) -> u64 {
        self.refused
            + self.reset
            + self.eof_before_response
            + self.eof_mid
            + self.timeouts
            + self.bad_status
            + self.mismatches
            + self.other
    }
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.elapsed.as_secs_f64();
        writeln!(
            f,
            "load: {} ok in {secs:.1} s ({:.0} req/s), {} acknowledged writes, {} stale keep-alive retries",
            self.ok,
            self.ok as f64 / secs.max(1e-9),
            self.acked.len(),
            self.stale_retries
        )?;
        write!(
            f,
            "failed requests: refused={} reset={} eof_before_response={} eof_mid={} timeouts={} \
             bad_status={} mismatches={} other={}",
            self.refused,
            self.reset,
            self.eof_before_response,
            self.eof_mid,
            self.timeouts,
            self.bad_status,
            self.mismatches,
            self.other
        )?;
        for failure in &self.failures {
            write!(f, "\n  - {failure}")?;
        }
        Ok(())
    }
}

/// What reading every acknowledged write back found.
#[derive(Debug, Clone, Default)]
pub struct VerifyReport {
    /// Acknowledged writes read back.
    pub checked: u64,
    /// 404: the write was acknowledged and then lost.
    pub missing: u64,
    /// Another status, or different bytes.
    pub wrong: u64,
    /// The GET itself failed (refused, reset, timeout…).
    pub failed: u64,
    /// Benign stale keep-alive retries during the read-back.
    pub stale_retries: u64,
    /// One description per problem, in key order.
    pub problems: Vec<String>,
}

impl VerifyReport {
    /// Acknowledged writes that are not intact (or could not be checked).
    pub fn problem_count(&self) -> u64 {
        self.missing + self.wrong + self.failed
    }

    fn merge(&mut self, other: VerifyReport) {
        self.checked += other.checked;
        self.missing += other.missing;
        self.wrong += other.wrong;
        self.failed += other.failed;
        self.stale_retries += other.stale_retries;
        self.problems.extend(other.problems);
    }
}

/// Reads every acknowledged write back (new GETs over a keep-alive client, after the load
/// has stopped) and returns a description of each one that is missing or differs.
pub fn verify_acked(addr: SocketAddr, acked: &HashMap<String, Vec<u8>>) -> Vec<String> {
    verify_acked_with(addr, acked, 1, u32::MAX).problems
}

/// [`verify_acked`] with `threads` keep-alive clients reading disjoint sets of keys in
/// parallel, and the problems counted by kind. A client gives up after `give_up_after`
/// consecutive failed requests (a dead or wedged server would otherwise cost a timeout per
/// key) and counts the keys it did not check as failed, with one description for them.
pub fn verify_acked_with(
    addr: SocketAddr,
    acked: &HashMap<String, Vec<u8>>,
    threads: usize,
    give_up_after: u32,
) -> VerifyReport {
    let mut keys: Vec<&String> = acked.keys().collect();
    keys.sort();
    let threads = threads.clamp(1, keys.len().max(1));
    let chunk = keys.len().div_ceil(threads).max(1);
    let mut total = VerifyReport::default();
    thread::scope(|s| {
        let mut handles = Vec::new();
        for part in keys.chunks(chunk) {
            let spawned = thread::Builder::new()
                .name("verify".into())
                .spawn_scoped(s, move || verify_keys(addr, acked, part, give_up_after));
            match spawned {
                Ok(h) => handles.push(h),
                // No thread to be had: check this part here instead.
                Err(_) => total.merge(verify_keys(addr, acked, part, give_up_after)),
            }
        }
        for h in handles {
            match h.join() {
                Ok(part) => total.merge(part),
                Err(_) => {
                    total.failed += 1;
                    total.problems.push("a verification thread panicked".into());
                }
            }
        }
    });
    total.problems.sort();
    total
}

fn verify_keys(
    addr: SocketAddr,
    acked: &HashMap<String, Vec<u8>>,
    keys: &[&String],
    give_up_after: u32,
) -> VerifyReport {
    let mut client = Client::new(addr, true);
    let mut report = VerifyReport::default();
    let mut consecutive_failures = 0;
    for (i, &key) in keys.iter().enumerate() {
        if consecutive_failures >= give_up_after {
            let left = (keys.len() - i) as u64;
            report.checked += left;
            report.failed += left;
            report.problems.push(format!(
                "{left} more acknowledged writes not checked after {consecutive_failures} \
                 consecutive failed requests"
            ));
            break;
        }
        let Some(want) = acked.get(key) else { continue };
        let path = format!("/kv/{key}");
        report.checked += 1;
        match client.get(&path) {
            Ok(resp) if resp.status == 200 && resp.body == *want => consecutive_failures = 0,
            Ok(resp) => {
                consecutive_failures = 0;
                if resp.status == 404 {
                    report.missing += 1;
                } else {
                    report.wrong += 1;
                }
                report.problems.push(format!(
                    "GET {path}: status {}, {} bytes {:?}; expected 200 with {} bytes {:?}",
                    resp.status,
                    resp.body.len(),
                    snippet(&resp.body),
                    want.len(),
                    snippet(want)
                ));
            }
            Err(e) => {
                consecutive_failures += 1;
                report.failed += 1;
                report.problems.push(format!("GET {path}: {e}"));
            }
        }
    }
    report.stale_retries = client.stale_retries;
    report
}
