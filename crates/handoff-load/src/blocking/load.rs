//! The generator behind a blocking handle: [`Load`] runs the key-value
//! workload ([`crate::generator`]) on a tokio runtime of its own, for code
//! that is not async — `handoff demo` and the end-to-end tests — and counts
//! what happens while it runs.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use tokio::runtime::Runtime;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::client::IO_TIMEOUT;
use crate::failure::Failure;
use crate::generator::model::{Plan, Problem, Shared, Workload};
use crate::generator::{drive, LoadConfig, LoadRun, Progress};

/// Threads of a [`Load`]'s runtime: its clients spend their time waiting on
/// the service, so two carry dozens of them.
const WORKER_THREADS: usize = 2;
/// How often [`Load::wait_for_ok`] looks at the count.
const POLL: Duration = Duration::from_millis(10);

/// Background HTTP load against the demo service: PUTs of unique values and GETs that
/// verify earlier acknowledged values byte for byte, from keep-alive clients and from
/// one-connection-per-request clients, unthrottled, until [`Load::stop`]. Each request
/// has [`IO_TIMEOUT`] from connect to the last byte of its response.
#[derive(Debug)]
pub struct Load {
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    /// Taken by [`Load::stop`]; dropped with the handle otherwise, which
    /// ends the clients.
    rt: Option<Runtime>,
    task: Option<JoinHandle<LoadRun>>,
}

impl Load {
    /// Starts `keepalive` clients that reuse connections and `fresh` clients that open a
    /// new connection per request.
    ///
    /// Fails only if the OS refuses the runtime's threads.
    pub fn start(addr: SocketAddr, keepalive: usize, fresh: usize) -> io::Result<Load> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(WORKER_THREADS)
            .thread_name("load")
            .enable_all()
            .build()?;
        let shared = Arc::new(Shared::new(Instant::now()));
        let (stop, stopped) = watch::channel(false);
        let plan = Plan {
            cfg: LoadConfig {
                addrs: vec![addr],
                keepalive,
                fresh,
                idle_holders: 0,
                duration: Duration::MAX,
                timeout: IO_TIMEOUT,
            },
            deadline: None,
            workload: Workload::KeyValue,
            record: false,
        };
        let task = rt.spawn(drive(
            plan,
            shared.clone(),
            stopped,
            Arc::new(Progress::default()),
        ));
        Ok(Load {
            shared,
            stop,
            rt: Some(rt),
            task: Some(task),
        })
    }

    /// Successful requests so far (to wait for progress).
    pub fn ok_count(&self) -> u64 {
        self.shared.tally.ok.load(Ordering::Relaxed)
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
            thread::sleep(POLL);
        }
    }

    /// The counts so far (without the acknowledged writes, which [`Load::stop`] returns).
    pub fn snapshot(&self) -> LoadReport {
        let c = &self.shared.tally;
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
                .details
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            acked: HashMap::new(),
            elapsed: self.shared.epoch.elapsed(),
        }
    }

    /// Stops the clients (each finishes its current request, bounded by
    /// [`IO_TIMEOUT`]) and returns the final counts and every acknowledged write. A client
    /// that panicked (a bug) is counted as an `other` failure.
    pub fn stop(mut self) -> LoadReport {
        let _ = self.stop.send(true);
        if let (Some(rt), Some(task)) = (self.rt.take(), self.task.take()) {
            if let Err(e) = rt.block_on(task) {
                let what = format!("the load failed: {e}");
                let failure = Failure::Other(what.clone());
                self.shared
                    .fail(Instant::now(), Problem::Failed(&failure), what);
            }
        }
        let mut report = self.snapshot();
        report.acked =
            std::mem::take(&mut *self.shared.acked.lock().unwrap_or_else(|p| p.into_inner()));
        report
    }
}

impl Drop for Load {
    /// A test that panics before `stop` must not leave clients hammering the next test.
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// The numbers of a [`Load`]: so far ([`Load::snapshot`]) or final ([`Load::stop`]).
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    /// Requests answered right.
    pub ok: u64,
    /// Connections refused.
    pub refused: u64,
    /// Connections reset.
    pub reset: u64,
    /// EOF before any response byte on a fresh connection (or on the retry): a failure.
    pub eof_before_response: u64,
    /// Responses cut short.
    pub eof_mid: u64,
    /// Requests with no answer within [`IO_TIMEOUT`].
    pub timeouts: u64,
    /// Answers with a status the request did not expect.
    pub bad_status: u64,
    /// Wrong body, or 404 for an acknowledged write.
    pub mismatches: u64,
    /// Anything else (a malformed response, an unexpected error).
    pub other: u64,
    /// Benign: idle keep-alive connections closed by the server, retried once.
    pub stale_retries: u64,
    /// The first few failures, in order, with a timestamp relative to the load's start.
    pub failures: Vec<String>,
    /// Every acknowledged PUT (filled by [`Load::stop`]).
    pub acked: HashMap<String, Vec<u8>>,
    /// Since the load started.
    pub elapsed: Duration,
}

impl LoadReport {
    /// Failed requests, all kinds (stale retries are not failures).
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
