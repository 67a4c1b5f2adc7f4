//! `handoff-bench-peers`: the side-by-side benchmark driver (issue 5). See `--help`.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use handoff_bench::contest::{self, Bins, Peer, Running};
use handoff_bench::report::{self, Dist, Segments, Summary, Upgrade};
use handoff_bench::{floors, raise_nofile};
use handoff_load::generator::{self, LoadConfig, LoadRun, Progress};
use serde::Serialize;

const AFTER_HELP: &str = "\
Examples:
  # The full run behind BENCHMARKS.md (builds everything in release first):
  scripts/bench-peers

  # A quick look at two contestants, 5 s each, an upgrade every 500 ms:
  handoff-bench-peers --peers handoff,ecdysis --secs 5 --interval-ms 500 --no-scale

  # handoff under both triggers against ecdysis, keeping the logs, with timing probes:
  # the services print their start-up steps (BENCH_TRACE) and the supervisor when it
  # greeted the incumbent (HANDOFF_LOG), to line up with DIR/*/stderr.log's phase log:
  BENCH_TRACE=1 HANDOFF_LOG=handoff=info,handoff::phase=debug,warn \\
      handoff-bench-peers --peers handoff,handoff-sighup,ecdysis --secs 24 --rounds 2 \\
      --no-scale --workdir DIR

  # What the CI smoke test runs:
  handoff-bench-peers --secs 2 --interval-ms 600 --keepalive 4 --fresh 2 --no-scale \\
      --floor-secs 1 --json out.json

Every contestant serves the same tiny handler (GET -> 200 'ok', X-Pid header) with the
same answer-then-close drain; only the restart mechanism differs. Requests that start
within --window-ms after an upgrade's trigger count as 'upgrade window', the rest as
'steady'. The binaries (handoff, bench-svc-*) are looked up next to this executable.";

/// Benchmark zero-downtime upgrades under load: handoff vs ecdysis vs shellflip vs a
/// no-upgrade control, with floors measured in the same run.
#[derive(Parser, Debug)]
#[command(name = "handoff-bench-peers", after_help = AFTER_HELP)]
struct Args {
    /// Contestants, in order.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "control,handoff,handoff-sighup,handoff-sighup-after-commit,handoff-prepared,handoff-axum,ecdysis,shellflip"
    )]
    peers: Vec<Peer>,
    /// Load duration per contestant, seconds (split evenly over the rounds).
    #[arg(long, default_value_t = 60)]
    secs: u64,
    /// Contestants run in this many interleaved rounds (control, handoff, ecdysis,
    /// shellflip, control, …) so that background noise on a shared machine falls on all of
    /// them alike.
    #[arg(long, default_value_t = 1)]
    rounds: u64,
    /// Time between upgrade triggers, milliseconds.
    #[arg(long, default_value_t = 600)]
    interval_ms: u64,
    /// Length of the window after each trigger whose requests count as "upgrade window".
    #[arg(long, default_value_t = 250)]
    window_ms: u64,
    /// Keep-alive client connections.
    #[arg(long, default_value_t = 32)]
    keepalive: usize,
    /// Clients opening a fresh connection per request.
    #[arg(long, default_value_t = 8)]
    fresh: usize,
    /// Per-attempt timeout of the load generator, milliseconds.
    #[arg(long, default_value_t = 5000)]
    timeout_ms: u64,
    /// Duration of the static in-process server floor, seconds.
    #[arg(long, default_value_t = 10)]
    floor_secs: u64,
    /// Skip the scale series (open connections 10/1000/10000, listeners 1/16/256).
    #[arg(long)]
    no_scale: bool,
    /// Upgrades per point of the scale series.
    #[arg(long, default_value_t = 10)]
    scale_upgrades: usize,
    /// Time between upgrades in the scale series, milliseconds (longer: 10000 connections
    /// reconnecting after each drain take a while on 2 cores).
    #[arg(long, default_value_t = 2000)]
    scale_interval_ms: u64,
    /// Write the results as JSON here too.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Scratch directory (default: a fresh one under the temp dir).
    #[arg(long, value_name = "DIR")]
    workdir: Option<PathBuf>,
}

#[derive(Serialize)]
struct FloorsOut {
    spawn_ms: Dist,
    socketpair_rtt_ms: Dist,
    /// Write + fsync a small file, rename it, fsync the directory (a journal record).
    fsync_rename_ms: Dist,
    /// spawn median + 6 round trips (the exchanges of one handoff).
    spawn_plus_rtt_ms: f64,
    static_server: Summary,
    /// The same two floors sampled while the load runs (against the static server): the
    /// like-for-like bound for handoff times measured under that load.
    loaded_spawn_ms: Dist,
    loaded_socketpair_rtt_ms: Dist,
    loaded_spawn_plus_rtt_ms: f64,
    loaded_server: Summary,
}

#[derive(Serialize)]
struct ScalePoint {
    what: String,
    value: usize,
    summary: Summary,
    /// The point could not run (e.g. the service would not start): why.
    error: Option<String>,
}

impl ScalePoint {
    fn new(what: &str, value: usize, r: Result<Summary>) -> ScalePoint {
        let (summary, error) = match r {
            Ok(s) => (s, None),
            Err(e) => {
                eprintln!("  failed: {e:#}");
                (Summary::default(), Some(format!("{e:#}")))
            }
        };
        ScalePoint {
            what: what.to_owned(),
            value,
            summary,
            error,
        }
    }
}

#[derive(Serialize)]
struct Output {
    floors: FloorsOut,
    contestants: Vec<Summary>,
    scale: Vec<ScalePoint>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let nofile = raise_nofile();
    nix::sys::prctl::set_child_subreaper(true).context("becoming a child subreaper")?;
    let bins = Bins::beside_current_exe()?;
    let scratch = match &args.workdir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => std::env::temp_dir().join(format!("handoff-bench-{}", std::process::id())),
    };
    let load_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let timeout = Duration::from_millis(args.timeout_ms);
    let base = LoadConfig {
        addrs: vec![],
        keepalive: args.keepalive,
        fresh: args.fresh,
        idle_holders: 0,
        duration: Duration::from_secs(args.secs),
        timeout,
    };

    eprintln!("floors…");
    let spawn = floors::spawn(&bins.path("bench-svc-plain")?, 50)?;
    let rtt = floors::socketpair_round_trip(2000)?;
    let fsync = floors::fsync_rename(&scratch, 50)?;
    let (static_run, d) = floors::static_server(
        &load_rt,
        LoadConfig {
            duration: Duration::from_secs(args.floor_secs),
            ..base.clone()
        },
    )?;
    let static_server = report::summarize(
        "floor: static in-process server",
        &static_run,
        &[],
        Duration::ZERO,
        d,
    );
    eprintln!("floors under load…");
    let loaded = floors::under_load(
        &bins.path("bench-svc-plain")?,
        &load_rt,
        LoadConfig {
            duration: Duration::from_secs(args.floor_secs),
            ..base.clone()
        },
        Duration::from_millis(20),
    )?;
    let loaded_server = report::summarize(
        "floor: static in-process server, floors sampled meanwhile",
        &loaded.run,
        &[],
        Duration::ZERO,
        loaded.duration,
    );
    let floors_out = FloorsOut {
        spawn_plus_rtt_ms: spawn.median + 6.0 * rtt.median,
        spawn_ms: spawn,
        socketpair_rtt_ms: rtt,
        fsync_rename_ms: fsync,
        static_server,
        loaded_spawn_plus_rtt_ms: loaded.spawn.median + 6.0 * loaded.rtt.median,
        loaded_spawn_ms: loaded.spawn,
        loaded_socketpair_rtt_ms: loaded.rtt,
        loaded_server,
    };

    let rounds = args.rounds.max(1);
    let seg_secs = (args.secs / rounds).max(1);
    let mut segs: Vec<Segments> = args.peers.iter().map(|_| Segments::default()).collect();
    for round in 0..rounds {
        for (i, &peer) in args.peers.iter().enumerate() {
            eprintln!("round {}/{rounds}: {}…", round + 1, peer.name());
            let dir = scratch.join(format!("{peer:?}-{round}").to_lowercase());
            let cfg = LoadConfig {
                duration: Duration::from_secs(seg_secs),
                ..base.clone()
            };
            let interval = Duration::from_millis(args.interval_ms);
            let (run, ups) = contest(&load_rt, &bins, peer, &dir, cfg, interval, 1, seg_secs)?;
            segs[i].push(run, ups, Duration::from_secs(seg_secs));
            if peer.is_handoff() {
                segs[i].add_phases(contest::handoff_phases(&dir));
            }
        }
    }
    let window = Duration::from_millis(args.window_ms);
    let rows: Vec<Summary> = args
        .peers
        .iter()
        .zip(&segs)
        .map(|(p, seg)| seg.summarize(p.name(), window))
        .collect();

    let mut scale = Vec::new();
    if !args.no_scale {
        let secs = ((args.scale_upgrades as u64 + 1) * args.scale_interval_ms).div_ceil(1000) + 1;
        let mut conns = vec![10, 1000];
        if nofile >= 10_000 + 2_000 {
            conns.push(10_000);
        } else {
            eprintln!("RLIMIT_NOFILE is {nofile}: skipping 10000 open connections");
        }
        for n in conns {
            eprintln!("scale: {n} open keep-alive connections…");
            let cfg = LoadConfig {
                keepalive: 4,
                fresh: 2,
                idle_holders: n,
                duration: Duration::from_secs(secs),
                ..base.clone()
            };
            let dir = scratch.join(format!("scale-conns-{n}"));
            let s = scale_point(&load_rt, &bins, &dir, cfg, &args, 1, secs);
            scale.push(ScalePoint::new("open keep-alive connections", n, s));
        }
        // 63 listeners + the control socket is the most the spawn path passes today
        // (crates/handoff/src/sys/exec.rs lifts at most 64 fds); 256 shows what happens above.
        for n in [1usize, 16, 63, 256] {
            eprintln!("scale: {n} listeners…");
            let cfg = LoadConfig {
                keepalive: 8,
                fresh: 4,
                duration: Duration::from_secs(secs),
                ..base.clone()
            };
            let dir = scratch.join(format!("scale-listeners-{n}"));
            let s = scale_point(&load_rt, &bins, &dir, cfg, &args, n, secs);
            scale.push(ScalePoint::new("listeners", n, s));
        }
    }

    let out = Output {
        floors: floors_out,
        contestants: rows,
        scale,
    };
    print!("{}", render(&out, &args));
    if let Some(p) = &args.json {
        std::fs::write(p, serde_json::to_vec_pretty(&out)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    if args.workdir.is_none() {
        let _ = std::fs::remove_dir_all(&scratch);
    }
    Ok(())
}

/// One point of the scale series: handoff alone, one segment.
fn scale_point(
    load_rt: &tokio::runtime::Runtime,
    bins: &Bins,
    dir: &std::path::Path,
    cfg: LoadConfig,
    args: &Args,
    listeners: usize,
    secs: u64,
) -> Result<Summary> {
    let interval = Duration::from_millis(args.scale_interval_ms);
    let (run, ups) = contest(
        load_rt,
        bins,
        Peer::Handoff,
        dir,
        cfg,
        interval,
        listeners,
        secs,
    )?;
    let mut seg = Segments::default();
    seg.push(run, ups, Duration::from_secs(secs));
    seg.add_phases(contest::handoff_phases(dir));
    Ok(seg.summarize("handoff", Duration::from_millis(args.window_ms)))
}

/// Runs one contestant under load with upgrades every `interval_ms`; returns what the load
/// saw and the upgrades (times relative to the segment's start).
#[allow(clippy::too_many_arguments)]
fn contest(
    load_rt: &tokio::runtime::Runtime,
    bins: &Bins,
    peer: Peer,
    dir: &std::path::Path,
    mut cfg: LoadConfig,
    interval: Duration,
    listeners: usize,
    secs: u64,
) -> Result<(LoadRun, Vec<Upgrade>)> {
    let running = Running::start(peer, bins, dir, listeners)
        .with_context(|| format!("starting {}", peer.name()))?;
    let mut running = Guard(Some(running));
    cfg.addrs = running
        .0
        .as_ref()
        .map(|r| r.addrs.clone())
        .unwrap_or_default();
    let holders = cfg.idle_holders;
    let epoch = Instant::now();
    let progress = Arc::new(Progress::default());
    let load = load_rt.spawn(generator::run(cfg, epoch, progress.clone()));
    // The scale series first waits for every idle connection to be open.
    let end_wait = Instant::now() + Duration::from_secs(30);
    while progress.holders_connected.load(Ordering::SeqCst) < holders && Instant::now() < end_wait {
        std::thread::sleep(Duration::from_millis(10));
    }
    let connected = progress.holders_connected.load(Ordering::SeqCst);
    if connected < holders {
        eprintln!("  only {connected} of {holders} idle connections open after 30 s");
    }
    let deadline = epoch + Duration::from_secs(secs);
    let mut upgrades: Vec<Upgrade> = Vec::new();
    let mut watchers = Vec::new();
    let mut next = Instant::now() + interval / 2;
    while next + interval / 2 < deadline {
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        }
        let r = running.0.as_mut().context("contestant gone")?;
        let (u, w) = r.upgrade(epoch);
        if let Some(e) = &u.error {
            eprintln!("  {e}");
        }
        upgrades.push(u);
        watchers.push(w);
        next += interval;
    }
    let run = load_rt.block_on(load).context("the load task panicked")?;
    for (u, w) in upgrades.iter_mut().zip(watchers) {
        if let Some(w) = w {
            u.old_gone_us = w.join().ok().flatten();
        }
    }
    if let Some(r) = running.0.take() {
        r.stop();
    }
    eprintln!(
        "  {} answered, {} failed, {} upgrades ({} failed)",
        run.samples.len(),
        run.failures.len(),
        upgrades.len(),
        upgrades.iter().filter(|u| u.error.is_some()).count()
    );
    for d in run.details.iter().take(5) {
        eprintln!("  - {d}");
    }
    for e in upgrades.iter().filter_map(|u| u.error.as_ref()).take(5) {
        eprintln!("  - upgrade: {e}");
    }
    Ok((run, upgrades))
}

/// Stops the contestant even when the run bails out early.
struct Guard(Option<Running>);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(r) = self.0.take() {
            r.stop();
        }
    }
}

fn render(out: &Output, args: &Args) -> String {
    let f = &out.floors;
    let mut s = String::new();
    s.push_str(&format!(
        "\nload: {} keep-alive + {} fresh-connection clients, {} s per contestant in {} interleaved round(s), an upgrade every {} ms, window {} ms after each trigger\n\n",
        args.keepalive, args.fresh, args.secs, args.rounds, args.interval_ms, args.window_ms
    ));
    let mut rows = vec![f.static_server.clone()];
    rows.extend(out.contestants.iter().cloned());
    s.push_str(&report::table(&rows));
    s.push_str(&format!(
        "\nfloors: spawn a trivial binary median {:.3} ms (p99 {:.3}); socketpair round trip median {:.4} ms (p99 {:.4}); spawn + 6 round trips = {:.3} ms; small-file fsync + rename + dir fsync median {:.3} ms (p99 {:.3})\n",
        f.spawn_ms.median, f.spawn_ms.p99, f.socketpair_rtt_ms.median, f.socketpair_rtt_ms.p99, f.spawn_plus_rtt_ms,
        f.fsync_rename_ms.median, f.fsync_rename_ms.p99
    ));
    s.push_str(&format!(
        "floors under the same load (sampled every 20 ms while the load generator drove the static server, {} requests): spawn a trivial binary median {:.3} ms (p99 {:.3}, n={}); socketpair round trip median {:.4} ms (p99 {:.4}); spawn + 6 round trips = {:.3} ms\n",
        f.loaded_server.requests, f.loaded_spawn_ms.median, f.loaded_spawn_ms.p99, f.loaded_spawn_ms.n,
        f.loaded_socketpair_rtt_ms.median, f.loaded_socketpair_rtt_ms.p99, f.loaded_spawn_plus_rtt_ms
    ));
    let per: Vec<String> = out
        .contestants
        .iter()
        .filter_map(|r| Some(format!("{} {:.1}", r.name, r.reconnects_per_upgrade()?)))
        .collect();
    if !per.is_empty() {
        s.push_str(&format!(
            "keep-alive reconnects per upgrade (new connections beyond each of the {} keep-alive clients' first): {}\n",
            args.keepalive,
            per.join(", ")
        ));
    }
    let handoffs: Vec<&Summary> = [
        Peer::Handoff,
        Peer::HandoffSighup,
        Peer::HandoffSighupAfterCommit,
        Peer::HandoffPrepared,
    ]
    .iter()
    .filter_map(|p| out.contestants.iter().find(|r| r.name == p.name()))
    .filter(|h| h.serve_ms.n > 0)
    .collect();
    for r in &out.contestants {
        if r.serve_ms.n == 0 {
            continue;
        }
        s.push_str(&format!(
            "{}: trigger → new serving median {:.2} ms = {:.2}× the idle spawn+rtt floor, {:.2}× the floor under load; steady p99 {:.2}× the static-server p99; window p99 ÷ steady p99 = {:.2}",
            r.name,
            r.serve_ms.median,
            r.serve_ms.median / f.spawn_plus_rtt_ms.max(1e-9),
            r.serve_ms.median / f.loaded_spawn_plus_rtt_ms.max(1e-9),
            r.steady.p99 / f.static_server.steady.p99.max(1e-9),
            r.window.p99 / r.steady.p99.max(1e-9),
        ));
        if r.prepare_ms.n > 0 {
            s.push_str(&format!(
                " (the `handoff upgrade --prepare` before each trigger took median {:.2} ms, p99 {:.2}: off this path, inside the window)",
                r.prepare_ms.median, r.prepare_ms.p99
            ));
        }
        if !r.phases_ms.is_empty() {
            let phases: Vec<String> = r
                .phases_ms
                .iter()
                .map(|(p, d)| format!("{p} {:.2}", d.median))
                .collect();
            s.push_str(&format!(
                " (its own phase log, medians ms: {})",
                phases.join(", ")
            ));
        }
        for h in handoffs.iter().filter(|h| h.name != r.name) {
            s.push_str(&format!(
                "; {}'s median is {:.2}× this one's",
                h.name,
                h.serve_ms.median / r.serve_ms.median.max(1e-9)
            ));
        }
        s.push('\n');
    }
    if !out.scale.is_empty() {
        s.push_str("\nscale series (handoff):\n\n");
        s.push_str("| point | requests | failed | reconnects | steady p99 ms | window p99 ms | upgrades (failed) | trigger → new serving, median / p99 ms | handoff upgrade command, median / p99 ms | old gone, median / p99 ms |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
        for p in &out.scale {
            if let Some(e) = &p.error {
                s.push_str(&format!(
                    "| {} {} | did not run: {} |\n",
                    p.value,
                    p.what,
                    e.replace('\n', " ")
                ));
                continue;
            }
            let r = &p.summary;
            s.push_str(&format!(
                "| {} {} | {} | {} | {} | {:.2} | {:.2} | {} ({}) | {:.2} / {:.2} | {:.2} / {:.2} | {:.2} / {:.2} |\n",
                p.value, p.what, r.requests, r.failed_total, r.reconnects, r.steady.p99, r.window.p99, r.upgrades, r.upgrades_failed,
                r.serve_ms.median, r.serve_ms.p99, r.done_ms.median, r.done_ms.p99, r.gone_ms.median, r.gone_ms.p99
            ));
        }
    }
    s
}
