//! One client of the generator: its loop of requests, its connection, the
//! one retry of a connection the server closed while idle, and what it
//! counts.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::kv::KvClient;
use super::model::{
    Failed, LoadRun, Plan, Problem, Progress, Req, Sample, Shared, Verdict, Workload,
};
use crate::conn::{Conn, Resp};
use crate::failure::Failure;

/// Which kind of client (see the module doc of `generator`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Role {
    KeepAlive,
    Fresh,
    Holder,
}

/// When a client stops: at the run's deadline, or once told.
#[derive(Debug)]
pub(super) struct Until {
    deadline: Option<Instant>,
    stop: watch::Receiver<bool>,
}

impl Until {
    pub(super) fn new(deadline: Option<Instant>, stop: watch::Receiver<bool>) -> Until {
        Until { deadline, stop }
    }

    fn done(&self) -> bool {
        *self.stop.borrow() || self.deadline.is_some_and(|d| Instant::now() >= d)
    }

    /// Returns once [`done`](Self::done) (or once nobody can tell it to stop).
    async fn reached(&mut self) {
        let stopped = self.stop.wait_for(|stop| *stop);
        match self.deadline {
            Some(d) => tokio::select! {
                () = tokio::time::sleep_until(d.into()) => {}
                _ = stopped => {}
            },
            None => {
                let _ = stopped.await;
            }
        }
    }
}

pub(super) struct Worker {
    addr: SocketAddr,
    label: String,
    role: Role,
    timeout: Duration,
    record: bool,
    shared: Arc<Shared>,
    until: Until,
    /// The key-value workload's state; `None`: `GET /`.
    kv: Option<KvClient>,
    run: LoadRun,
}

impl Worker {
    pub(super) fn new(
        addr: SocketAddr,
        label: String,
        role: Role,
        plan: &Plan,
        shared: Arc<Shared>,
        until: Until,
    ) -> Worker {
        Worker {
            addr,
            kv: (plan.workload == Workload::KeyValue).then(|| KvClient::new(&label)),
            label,
            role,
            timeout: plan.cfg.timeout,
            record: plan.record,
            shared,
            until,
            run: LoadRun::default(),
        }
    }

    /// Makes requests until the run ends; returns what only this client saw
    /// (the counts went to the shared tally as they happened).
    pub(super) async fn go(mut self, progress: Arc<Progress>) -> LoadRun {
        let mut conn: Option<Conn> = None;
        let mut counted = false;
        // Connections this client opened; every one after the first is a reconnect.
        let mut opened = 0u64;
        if self.role != Role::Fresh {
            self.run.sticky_clients = 1;
        }
        while !self.until.done() {
            if self.role == Role::Holder && conn.as_ref().is_some_and(Conn::is_reused) {
                // Sit idle until the server closes the connection or the run ends.
                let closed = match conn.as_mut() {
                    Some(c) => tokio::select! {
                        () = self.until.reached() => false,
                        () = c.idle() => true,
                    },
                    None => true,
                };
                if !closed {
                    break;
                }
                conn = None;
                if counted {
                    progress.holders_connected.fetch_sub(1, Ordering::SeqCst);
                    counted = false;
                }
                continue;
            }
            self.one_request(&mut conn, &mut opened).await;
            if self.role == Role::Holder && conn.is_some() && !counted {
                progress.holders_connected.fetch_add(1, Ordering::SeqCst);
                counted = true;
            }
        }
        if counted {
            progress.holders_connected.fetch_sub(1, Ordering::SeqCst);
        }
        if self.role != Role::Fresh {
            self.run.reconnects = opened.saturating_sub(1);
        }
        self.run
    }

    /// One request, retried once on a fresh connection if a reused one
    /// turns out to have been closed while idle; counted and judged.
    async fn one_request(&mut self, conn: &mut Option<Conn>, opened: &mut u64) {
        let close = self.role == Role::Fresh;
        let req = match self.kv.as_mut() {
            Some(kv) => kv.next(),
            None => Req::root(),
        };
        let what = format!("{}: {} {}", self.label, req.method, req.path);
        let start = Instant::now();
        let mut retried = false;
        let outcome = loop {
            let reused = conn.as_ref().is_some_and(Conn::is_reused);
            let attempt =
                tokio::time::timeout(self.timeout, exchange(conn, opened, self.addr, &req, close))
                    .await
                    .unwrap_or(Err(Failure::Timeout));
            match attempt {
                Ok(resp) => {
                    if resp.close || close {
                        *conn = None;
                    }
                    break Ok(resp);
                }
                Err(Failure::EofBeforeResponse) if reused && !retried => {
                    self.shared
                        .tally
                        .stale_retries
                        .fetch_add(1, Ordering::Relaxed);
                    retried = true;
                    *conn = None;
                }
                Err(f) => {
                    *conn = None;
                    break Err((f, reused));
                }
            }
        };
        let latency_us = start.elapsed().as_micros() as u64;
        match outcome {
            Ok(resp) => {
                let verdict = match self.kv.as_mut() {
                    Some(kv) => kv.judge(req, &resp, &self.shared),
                    None => judge_root(&resp),
                };
                match verdict {
                    Verdict::Answered => {
                        self.shared.tally.ok.fetch_add(1, Ordering::Relaxed);
                        if self.record {
                            self.run.samples.push(Sample {
                                start_us: self.shared.offset(start),
                                latency_us,
                                pid: resp.pid,
                            });
                        }
                    }
                    Verdict::BadStatus(why) => {
                        self.fail(start, Problem::BadStatus, format!("{what}: {why}"))
                    }
                    Verdict::Mismatch(why) => {
                        self.fail(start, Problem::Mismatch, format!("{what}: {why}"))
                    }
                }
            }
            Err((f, reused)) => {
                let why = format!(
                    "{what}: {f} (on a {} connection{})",
                    if reused { "reused" } else { "fresh" },
                    if retried {
                        ", after a stale-connection retry"
                    } else {
                        ""
                    }
                );
                self.fail(start, Problem::Failed(&f), why);
            }
        }
    }

    fn fail(&mut self, start: Instant, problem: Problem, what: String) {
        let kind = self.shared.fail(start, problem, what);
        if self.record {
            self.run.failures.push(Failed {
                at_us: self.shared.offset(start),
                kind,
            });
        }
    }
}

/// One attempt: connect if there is no connection, then the request and its response.
async fn exchange(
    conn: &mut Option<Conn>,
    opened: &mut u64,
    addr: SocketAddr,
    req: &Req,
    close: bool,
) -> Result<Resp, Failure> {
    let c = match conn {
        Some(c) => c,
        None => {
            let c = Conn::connect(addr).await?;
            *opened += 1;
            conn.insert(c)
        }
    };
    c.send(req.method, &req.path, req.body.as_deref(), close)
        .await
}

/// `GET /` is answered by any 2xx.
fn judge_root(resp: &Resp) -> Verdict {
    if (200..300).contains(&resp.status) {
        Verdict::Answered
    } else {
        Verdict::BadStatus(format!("status {}", resp.status))
    }
}
