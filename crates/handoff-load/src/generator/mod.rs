//! The load generator: fixed concurrency, every request timed and judged,
//! every failure classified ([`crate::failure`]).
//!
//! Three kinds of client task:
//! * **keep-alive**: one connection, requests back to back, reconnecting only when the
//!   server says `Connection: close` (as a drain does);
//! * **fresh**: a new connection per request (`Connection: close`), the case where a
//!   closed listener shows up as *refused*;
//! * **idle holders**: open a keep-alive connection, make one request, then sit idle until
//!   the server closes it (a drain) and reconnect: the "open connections" of the
//!   benchmark's scale series.
//!
//! Every connection a keep-alive client or idle holder opens beyond its first is counted as
//! a **reconnect** ([`LoadRun::reconnects`]): a server that closes keep-alive connections
//! at each upgrade makes every such client reconnect once per upgrade, one that hands its
//! connections to the new build makes none.
//!
//! One case is benign and retried once, counted apart: EOF before any response byte on a
//! *reused* keep-alive connection, i.e. the server closed it while idle (RFC 9112 §9.3.1).
//!
//! Two workloads: `GET /` as fast as possible, each answer a [`Sample`] (the benchmark,
//! [`run`]); and the key-value one — PUTs of unique values, GETs checking earlier
//! acknowledged values byte for byte, every acknowledged write kept for the read-back
//! (`handoff demo` and the tests, through [`crate::blocking::Load`]).

mod kv;
pub(crate) mod model;
mod worker;

pub use kv::value_for;
pub use model::{Failed, LoadConfig, LoadRun, Progress, Sample};

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::watch;

use crate::failure::Failure;
use model::{Plan, Problem, Shared, Workload};
use worker::{Role, Until, Worker};

/// Runs `GET /` load until `cfg.duration` has passed; time offsets are relative to `epoch`.
pub async fn run(cfg: LoadConfig, epoch: Instant, progress: Arc<Progress>) -> LoadRun {
    // Kept until the end: the run ends by its deadline, not by this.
    let (_stop, stop) = watch::channel(false);
    let plan = Plan {
        deadline: Instant::now().checked_add(cfg.duration),
        cfg,
        workload: Workload::Root,
        record: true,
    };
    drive(plan, Arc::new(Shared::new(epoch)), stop, progress).await
}

/// Runs `plan`'s clients until its deadline or until `stop` says so, and
/// gathers what they saw. A client task that panicked (a bug) counts as
/// one `other` failure.
pub(crate) async fn drive(
    plan: Plan,
    shared: Arc<Shared>,
    stop: watch::Receiver<bool>,
    progress: Arc<Progress>,
) -> LoadRun {
    let cfg = &plan.cfg;
    let mut tasks = Vec::new();
    let n = cfg.keepalive + cfg.fresh + cfg.idle_holders;
    for i in 0..n {
        let (role, label) = if i < cfg.keepalive {
            (Role::KeepAlive, format!("ka{i}"))
        } else if i < cfg.keepalive + cfg.fresh {
            (Role::Fresh, format!("fr{}", i - cfg.keepalive))
        } else {
            (
                Role::Holder,
                format!("idle{}", i - cfg.keepalive - cfg.fresh),
            )
        };
        let Some(&addr) = cfg.addrs.get(i % cfg.addrs.len().max(1)) else {
            break;
        };
        let w = Worker::new(
            addr,
            label,
            role,
            &plan,
            shared.clone(),
            Until::new(plan.deadline, stop.clone()),
        );
        tasks.push(tokio::spawn(w.go(progress.clone())));
    }
    let mut total = LoadRun::default();
    for t in tasks {
        match t.await {
            Ok(part) => {
                total.samples.extend(part.samples);
                total.failures.extend(part.failures);
                total.reconnects += part.reconnects;
                total.sticky_clients += part.sticky_clients;
            }
            Err(e) => {
                let now = Instant::now();
                let what = format!("a load client task failed: {e}");
                let kind = shared.fail(now, Problem::Failed(&Failure::Other(what.clone())), what);
                total.failures.push(Failed {
                    at_us: shared.offset(now),
                    kind,
                });
            }
        }
    }
    total.stale_retries = shared.tally.stale_retries.load(Ordering::Relaxed);
    total.details = shared
        .details
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    total.samples.sort_by_key(|s| s.start_us);
    total.failures.sort_by_key(|f| f.at_us);
    total
}
