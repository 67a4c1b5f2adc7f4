//! `handoff-bench-move`: how long an upgrade takes to hand N idle HTTP/1.1 keep-alive
//! connections to the new build, and whether every one of them survives it (issue 15).
//!
//! What it measures: `examples/axum` (an ordinary axum service on `handoff-tokio`) runs
//! under `handoff run`; the bench opens N keep-alive connections, sends one `GET /` on each
//! (so the incumbent has accepted and served it) and leaves them idle. Then, `--upgrades`
//! times in a row, it runs `handoff upgrade --json` and records, from that command's own
//! events, the `draining` phase (PrepareHandoff → Drained: where the incumbent takes each
//! idle connection out of hyper and the batches travel, descriptors attached, through the
//! supervisor to the successor), the handoff's `total_ms`, and `connections_moved` /
//! `connections_closed`. After each upgrade it sends one `GET /` on every connection and
//! checks that each is answered `200` by the new pid, without `Connection: close`, on the
//! very same TCP connection (the bench holds the socket: a reconnect is impossible, so any
//! close or reset shows up as a failure). The connections thus move from build to build.
//! N = 0 is the same service with no connection: the fixed cost the per-connection cost is
//! measured against.
//!
//! How to run it (release build; 10,000 connections need RLIMIT_NOFILE ≥ ~10,500, the hard
//! limit is taken):
//!
//! ```sh
//! cargo build --release -p handoff-cli -p handoff-bench -p example-axum --bins
//! target/release/handoff-bench-move --conns 0,1000,10000 --upgrades 10
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use futures_util::stream::{self, StreamExt};
use handoff_bench::contest::{self, Bins, Peer, Running};
use handoff_bench::private_dir;
use handoff_bench::raise_nofile;
use handoff_bench::report::Dist;
use handoff_bench::upgrade_cmd::upgrade_json;
use handoff_load::conn::Conn;
use serde::Serialize;

/// Hand N idle keep-alive connections of examples/axum to the new build, upgrade after
/// upgrade, and check every one is still served, by the new pid, on the same connection.
#[derive(Parser, Debug)]
#[command(name = "handoff-bench-move")]
struct Args {
    /// Numbers of idle connections, one service (and one series of upgrades) each.
    #[arg(long, value_delimiter = ',', default_value = "0,1000,10000")]
    conns: Vec<usize>,
    /// Upgrades per number of connections.
    #[arg(long, default_value_t = 10)]
    upgrades: usize,
    /// Connections opened (or requests sent) at once.
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// Budget of one request on one connection (connect included), milliseconds.
    #[arg(long, default_value_t = 10_000)]
    timeout_ms: u64,
    /// Write the results as JSON here too.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Scratch directory (default: a fresh one, mode 0700, under the temp dir; removed at
    /// the end).
    #[arg(long, value_name = "DIR")]
    workdir: Option<PathBuf>,
}

/// One upgrade, as `handoff upgrade --json` reported it and the clients saw it.
#[derive(Debug, Clone, Default, Serialize)]
struct Round {
    old_pid: Option<u32>,
    new_pid: Option<u32>,
    /// `draining` phase, ms (from the command's `phase` event).
    draining_ms: Option<f64>,
    /// The handoff's `total_ms`.
    total_ms: Option<f64>,
    /// Wall time of the `handoff upgrade` command (process start to exit).
    command_ms: f64,
    moved: Option<u64>,
    closed: Option<u64>,
    /// Every phase, in order.
    phases: Vec<(String, f64)>,
    /// Time for one `GET /` on every connection after the upgrade (informative).
    verify_ms: f64,
    /// The command returned → the old process had exited.
    old_gone_ms: Option<f64>,
    /// Connections not answered 200 by the new pid on the same connection, keep-alive.
    failures: usize,
    error: Option<String>,
}

#[derive(Debug, Serialize)]
struct Series {
    conns: usize,
    rounds: Vec<Round>,
    draining_ms: Dist,
    total_ms: Dist,
    command_ms: Dist,
    verify_ms: Dist,
    old_gone_ms: Dist,
    /// The first failures, described.
    details: Vec<String>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let nofile = raise_nofile();
    let most = args.conns.iter().copied().max().unwrap_or(0) as u64;
    // The bench holds one descriptor per connection, and so does each build.
    if most + 500 > nofile {
        bail!("RLIMIT_NOFILE is {nofile}: too low for {most} connections (need ≥ {most} + 500)");
    }
    // `Running::stop` reaps the service's old generations, reparented to us.
    nix::sys::prctl::set_child_subreaper(true).context("becoming a child subreaper")?;
    let bins = Bins::beside_current_exe()?;
    let scratch = match &args.workdir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("handoff-bench-move-{}", std::process::id())),
    };
    private_dir(&scratch)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut all = Vec::new();
    for &n in &args.conns {
        eprintln!("{n} idle connections, {} upgrades…", args.upgrades);
        let dir = scratch.join(format!("conns-{n}"));
        let s = series(&rt, &bins, &dir, n, &args)
            .with_context(|| format!("the series with {n} connections"))?;
        for d in s.details.iter().take(5) {
            eprintln!("  - {d}");
        }
        all.push(s);
    }
    print!("{}", render(&all, &args));
    if let Some(p) = &args.json {
        std::fs::write(p, serde_json::to_vec_pretty(&all)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    if args.workdir.is_none() {
        let _ = std::fs::remove_dir_all(&scratch);
    }
    let failed: usize = all
        .iter()
        .flat_map(|s| &s.rounds)
        .map(|r| r.failures + usize::from(r.error.is_some()))
        .sum();
    if failed > 0 {
        bail!("{failed} failed connections or upgrades (see above)");
    }
    Ok(())
}

/// One service with `n` idle connections, upgraded `args.upgrades` times.
fn series(
    rt: &tokio::runtime::Runtime,
    bins: &Bins,
    dir: &Path,
    n: usize,
    args: &Args,
) -> Result<Series> {
    private_dir(&dir.join("run"))?;
    private_dir(&dir.join("state"))?;
    let running = Guard(Some(Running::start(Peer::HandoffAxum, bins, dir, 1)?));
    let addr = running
        .0
        .as_ref()
        .and_then(|r| r.addrs.first().copied())
        .context("no listener address")?;
    let timeout = Duration::from_millis(args.timeout_ms);
    let first_pid = contest::probe_pid(addr).map_err(|e| anyhow::anyhow!("probe: {e}"))?;

    let t = Instant::now();
    let opened = rt.block_on(open(addr, n, args.concurrency, timeout));
    let mut clients = Vec::with_capacity(n);
    for (i, c) in opened.into_iter().enumerate() {
        let c = c.with_context(|| format!("opening connection {i}"))?;
        if c.pid != first_pid {
            bail!(
                "connection {i} was answered by pid {}, not {first_pid}",
                c.pid
            );
        }
        clients.push(c);
    }
    eprintln!(
        "  {n} connections open, each answered once by pid {first_pid} ({:.0} ms)",
        t.elapsed().as_secs_f64() * 1e3
    );

    let mut rounds = Vec::new();
    let mut details = Vec::new();
    let mut pid = first_pid;
    for i in 0..args.upgrades {
        let mut r = upgrade(bins, &dir.join("run"))?;
        let new = match (r.error.clone(), r.new_pid) {
            (None, Some(new)) => new,
            (e, _) => {
                let e = e.unwrap_or_else(|| "no committed event".into());
                eprintln!("  upgrade {i}: {e}");
                details.push(format!("upgrade {i}: {e}"));
                rounds.push(r);
                continue;
            }
        };
        if r.old_pid != Some(pid) {
            details.push(format!(
                "upgrade {i}: old pid {:?}, expected {pid}",
                r.old_pid
            ));
        }
        let t = Instant::now();
        let (kept, failed) = rt.block_on(verify(
            std::mem::take(&mut clients),
            new,
            args.concurrency,
            timeout,
        ));
        r.verify_ms = t.elapsed().as_secs_f64() * 1e3;
        r.failures = failed.len();
        for f in failed {
            if details.len() < 20 {
                details.push(format!("upgrade {i}: {f}"));
            }
        }
        clients = kept;
        r.old_gone_ms = wait_gone(pid, Duration::from_secs(15));
        eprintln!(
            "  upgrade {i}: pid {pid} → {new}: draining {:.2} ms, total {:.2} ms, moved {:?}, closed {:?}; {} of {n} connections answered by {new} ({:.0} ms)",
            r.draining_ms.unwrap_or(f64::NAN),
            r.total_ms.unwrap_or(f64::NAN),
            r.moved,
            r.closed,
            clients.len(),
            r.verify_ms,
        );
        pid = new;
        rounds.push(r);
    }
    drop(clients);
    drop(running);
    let dist = |f: &dyn Fn(&Round) -> Option<f64>| Dist::of(rounds.iter().filter_map(f).collect());
    Ok(Series {
        conns: n,
        draining_ms: dist(&|r| r.draining_ms),
        total_ms: dist(&|r| r.total_ms),
        command_ms: dist(&|r| r.error.is_none().then_some(r.command_ms)),
        verify_ms: dist(&|r| r.error.is_none().then_some(r.verify_ms)),
        old_gone_ms: dist(&|r| r.old_gone_ms),
        rounds,
        details,
    })
}

/// Stops the service even when a series bails out early.
struct Guard(Option<Running>);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(r) = self.0.take() {
            r.stop();
        }
    }
}

/// An open connection and what its first answer said.
struct Client {
    conn: Conn,
    /// Its local port: the same TCP connection throughout.
    port: u16,
    pid: u32,
}

/// Opens `n` connections, `concurrency` at a time, each answered once (`GET /`).
async fn open(
    addr: SocketAddr,
    n: usize,
    concurrency: usize,
    timeout: Duration,
) -> Vec<Result<Client>> {
    stream::iter(0..n)
        .map(|_| async move {
            let attempt = async {
                let mut conn = Conn::connect(addr).await?;
                let resp = conn.request(false).await?;
                Ok::<_, handoff_load::failure::Failure>((conn, resp))
            };
            let (conn, resp) = tokio::time::timeout(timeout, attempt)
                .await
                .map_err(|_| anyhow::anyhow!("no answer within {timeout:?}"))?
                .map_err(|f| anyhow::anyhow!("{f}"))?;
            if resp.status != 200 || resp.close {
                bail!("answered {} (close: {})", resp.status, resp.close);
            }
            let port = conn.local_addr().context("local_addr")?.port();
            Ok(Client {
                conn,
                port,
                pid: resp.pid,
            })
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await
}

/// Sends one `GET /` on every connection; returns those answered `200` by `pid` on the
/// same connection and still open, and a description of each that was not.
async fn verify(
    clients: Vec<Client>,
    pid: u32,
    concurrency: usize,
    timeout: Duration,
) -> (Vec<Client>, Vec<String>) {
    let results: Vec<Result<Client, String>> = stream::iter(clients)
        .map(|mut c| async move {
            let port = c.port;
            let resp = match tokio::time::timeout(timeout, c.conn.request(false)).await {
                Err(_) => return Err(format!("port {port}: no answer within {timeout:?}")),
                Ok(Err(f)) => return Err(format!("port {port}: {f}")),
                Ok(Ok(r)) => r,
            };
            let now = c.conn.local_addr().map(|a| a.port()).unwrap_or(0);
            if resp.status != 200 || resp.pid != pid || resp.close || now != port {
                return Err(format!(
                    "port {port}: status {}, pid {} (expected {pid}), close {}, local port now {now}",
                    resp.status, resp.pid, resp.close
                ));
            }
            c.pid = resp.pid;
            Ok(c)
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    let mut kept = Vec::with_capacity(results.len());
    let mut failed = Vec::new();
    for r in results {
        match r {
            Ok(c) => kept.push(c),
            Err(e) => failed.push(e),
        }
    }
    (kept, failed)
}

/// Longest `handoff upgrade` may take before it is killed and the upgrade counted failed.
const UPGRADE_BUDGET: Duration = Duration::from_secs(60);

/// Runs `handoff upgrade --runtime-dir RUN --json` and reads its events.
fn upgrade(bins: &Bins, run: &Path) -> Result<Round> {
    let t = Instant::now();
    let u = upgrade_json(&bins.path("handoff")?, run, UPGRADE_BUDGET)?;
    let mut r = Round {
        command_ms: t.elapsed().as_secs_f64() * 1e3,
        draining_ms: u.phase_ms("draining"),
        error: u.error,
        ..Round::default()
    };
    if let Some(ev) = &u.committed {
        r.old_pid = ev["old_pid"].as_u64().map(|p| p as u32);
        r.new_pid = ev["new_pid"].as_u64().map(|p| p as u32);
        r.total_ms = ev["total_ms"].as_f64();
        r.moved = ev["connections_moved"].as_u64();
        r.closed = ev["connections_closed"].as_u64();
    }
    r.phases = u.phases;
    Ok(r)
}

/// Polls (every 1 ms, at most `within`) until `pid` has exited; ms it took.
fn wait_gone(pid: u32, within: Duration) -> Option<f64> {
    let t = Instant::now();
    while contest::alive(pid) {
        if t.elapsed() > within {
            return None;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Some(t.elapsed().as_secs_f64() * 1e3)
}

fn render(all: &[Series], args: &Args) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "\nexamples/axum under handoff run, {} upgrades per row; every connection idle \
         (one GET before the first upgrade, one after each)\n\n",
        args.upgrades
    ));
    s.push_str(
        "| idle connections | upgrades (failed) | moved per upgrade | closed | draining median / p99 / max ms | handoff total median / p99 / max ms | `handoff upgrade` command median ms | failed GETs after | GET on every connection, median ms | old process gone after, median ms |\n",
    );
    s.push_str("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|\n");
    for x in all {
        let failed = x.rounds.iter().filter(|r| r.error.is_some()).count();
        let moved: Vec<u64> = x.rounds.iter().filter_map(|r| r.moved).collect();
        let moved = match (moved.iter().min(), moved.iter().max()) {
            (Some(a), Some(b)) if a == b => format!("{a}"),
            (Some(a), Some(b)) => format!("{a}–{b}"),
            _ => "– (not reported)".into(),
        };
        let closed: u64 = x.rounds.iter().filter_map(|r| r.closed).sum();
        let failures: usize = x.rounds.iter().map(|r| r.failures).sum();
        let d = |d: &Dist| format!("{:.2} / {:.2} / {:.2}", d.median, d.p99, d.max);
        s.push_str(&format!(
            "| {} | {} ({}) | {} | {} | {} | {} | {:.2} | **{}** | {:.1} | {:.1} |\n",
            x.conns,
            x.rounds.len(),
            failed,
            moved,
            closed,
            d(&x.draining_ms),
            d(&x.total_ms),
            x.command_ms.median,
            failures,
            x.verify_ms.median,
            x.old_gone_ms.median,
        ));
    }
    let base = all.iter().find(|x| x.conns == 0);
    for x in all.iter().filter(|x| x.draining_ms.n > 0) {
        let mut parts = Vec::new();
        if let Some(b) = base.filter(|b| b.draining_ms.n > 0 && x.conns > 0) {
            let per = |a: f64, b: f64| (a - b) * 1e3 / x.conns as f64;
            parts.push(format!(
                "{:.2} µs per connection in draining, {:.2} µs in total (medians, less the 0-connection row)",
                per(x.draining_ms.median, b.draining_ms.median),
                per(x.total_ms.median, b.total_ms.median),
            ));
        }
        for y in all.iter().filter(|y| y.conns > 0 && y.conns < x.conns) {
            parts.push(format!(
                "×{:.2} the draining and ×{:.2} the total of {} connections ({:.0}× as many)",
                x.draining_ms.median / y.draining_ms.median.max(1e-9),
                x.total_ms.median / y.total_ms.median.max(1e-9),
                y.conns,
                x.conns as f64 / y.conns as f64,
            ));
        }
        parts.push(format!("phase medians ms: {}", phase_medians(&x.rounds)));
        s.push_str(&format!(
            "\n{} connections: {}\n",
            x.conns,
            parts.join("; ")
        ));
    }
    s
}

/// Each phase's median over the rounds, in the order the phases ran.
fn phase_medians(rounds: &[Round]) -> String {
    let mut names: Vec<&str> = Vec::new();
    for r in rounds {
        for (p, _) in &r.phases {
            if !names.contains(&p.as_str()) {
                names.push(p);
            }
        }
    }
    names
        .iter()
        .map(|n| {
            let v = rounds
                .iter()
                .flat_map(|r| &r.phases)
                .filter(|(p, _)| p == n)
                .map(|(_, ms)| *ms)
                .collect();
            format!("{n} {:.2}", Dist::of(v).median)
        })
        .collect::<Vec<_>>()
        .join(", ")
}
