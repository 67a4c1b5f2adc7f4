//! `handoff-bench-state`: how a stateful service's upgrade scales with its data and its
//! write rate (issue 18) — warm-up, catch-up rounds, the accept gap, the memory of the
//! pair, and whether every acknowledged write survives.
//!
//! What it does: for each store size K, `handoff-demo seed` writes K keys (and the
//! store's checkpoint) into a fresh state dir, then `handoff-demo` runs under `handoff
//! run`. For each write mode — `none`, or `saturating`: the workspace's key-value load
//! generator (`handoff-load`, PUTs of unique values and GETs that check them byte for
//! byte) with `--clients` keep-alive clients, enough to keep the demo's group-committed,
//! fsync-bound writer busy — it runs `handoff upgrade --json` `--upgrades` times and takes
//! from the command's own events:
//!
//! * warm-up: the `negotiating` phase (spawn → the new build's Hello: reading the store,
//!   then catching up with the old build's writes);
//! * catch-up: the rounds the new build ran before its Hello (`catch_up` in the
//!   `committed` event);
//! * the accept gap: `draining` + `sealing` + `awaiting-ready` + `committed` — from the
//!   moment the old build stops accepting to the moment the new one accepts;
//! * the memory of the pair: a thread samples every ~2 ms, during each upgrade, the sum
//!   over the supervisor's children of `Rss`, `Pss` and `Anonymous` from
//!   `/proc/PID/smaps_rollup`, and keeps the peak of each sum. Pss splits pages the two
//!   processes share (the store's files in the page cache) between them: it is the figure
//!   that says whether an upgrade doubles the service's memory.
//!
//! After each mode the load stops and every acknowledged write is read back through the
//! service; one missing or wrong is a failure (the bench exits non-zero).
//!
//! ```sh
//! cargo build --release -p handoff-cli -p handoff-demo -p handoff-bench --bins
//! target/release/handoff-bench-state --keys 0,1000000,10000000 --upgrades 20
//! ```

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use handoff_bench::contest::{self, Bins};
use handoff_bench::private_dir;
use handoff_bench::report::Dist;
use handoff_bench::upgrade_cmd::upgrade_json;
use handoff_load::blocking::{verify_acked, Client, Load};
use serde::Serialize;

/// Upgrade the demo key-value service with K keys, idle and under saturating writes, and
/// measure warm-up, catch-up, the accept gap, the pair's memory and lost writes.
#[derive(Parser, Debug)]
#[command(name = "handoff-bench-state")]
struct Args {
    /// Store sizes (keys), one service each.
    #[arg(long, value_delimiter = ',', default_value = "0,1000000,10000000")]
    keys: Vec<u64>,
    /// Write modes, each a series of upgrades: `none` or `saturating`.
    #[arg(long, value_delimiter = ',', default_value = "none,saturating")]
    writes: Vec<String>,
    /// Upgrades per store size and write mode.
    #[arg(long, default_value_t = 20)]
    upgrades: usize,
    /// Keep-alive clients of the saturating load.
    #[arg(long, default_value_t = 32)]
    clients: usize,
    /// Run the load generator's threads at this nice value (`renice`): on a machine
    /// where it shares the cores with the service, so that it takes what the service
    /// leaves instead of delaying the handoff's own threads (clients are remote in
    /// production). 0 leaves them as they are.
    #[arg(long, default_value_t = 0)]
    load_nice: i32,
    /// Write the results as JSON here too.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Scratch directory (default: a fresh one, mode 0700, under the temp dir; removed at
    /// the end).
    #[arg(long, value_name = "DIR")]
    workdir: Option<PathBuf>,
    /// Run this build of the demo instead of the one beside the bench (e.g. an older
    /// build, for a before/after in the same run; the store is still seeded by the
    /// current one: the log's format is the same, an older build ignores the index).
    #[arg(long, value_name = "PATH")]
    demo: Option<PathBuf>,
}

/// What one catch-up said (the `committed` event's `catch_up`).
#[derive(Debug, Clone, Default, Serialize)]
struct CatchUp {
    rounds: u64,
    records: u64,
    last_records: u64,
    converged: bool,
    took_ms: f64,
}

/// One upgrade.
#[derive(Debug, Clone, Default, Serialize)]
struct Round {
    old_pid: Option<u32>,
    new_pid: Option<u32>,
    phases: Vec<(String, f64)>,
    /// `negotiating`, ms.
    warmup_ms: Option<f64>,
    /// draining + sealing + awaiting-ready + committed, ms.
    gap_ms: Option<f64>,
    total_ms: Option<f64>,
    catch_up: Option<CatchUp>,
    /// Peak over the upgrade of the sum over the service's processes, MiB.
    peak_rss_mib: f64,
    peak_pss_mib: f64,
    peak_anon_mib: f64,
    error: Option<String>,
}

#[derive(Debug, Serialize)]
struct Series {
    keys: u64,
    writes: String,
    rounds: Vec<Round>,
    warmup_ms: Dist,
    gap_ms: Dist,
    catch_up_rounds: Dist,
    /// Acknowledged PUTs per second while the upgrades ran.
    puts_per_s: f64,
    /// The incumbent alone, before the first upgrade (Rss, Pss, Anonymous; MiB).
    idle_mib: (f64, f64, f64),
    peak_rss_mib: f64,
    peak_pss_mib: f64,
    peak_anon_mib: f64,
    acked: usize,
    lost: usize,
    failed_requests: u64,
    details: Vec<String>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    for w in &args.writes {
        if w != "none" && w != "saturating" {
            bail!("--writes {w:?}: expected none or saturating");
        }
    }
    let bins = Bins::beside_current_exe()?;
    let scratch = match &args.workdir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("handoff-bench-state-{}", std::process::id())),
    };
    private_dir(&scratch)?;
    let mut all = Vec::new();
    for &k in &args.keys {
        let dir = scratch.join(format!("keys-{k}"));
        let series = store_series(&bins, &dir, k, &args)
            .with_context(|| format!("the store of {k} keys"))?;
        all.extend(series);
        // Stores are large: each goes once measured, unless the user asked
        // to keep the scratch dir (its service.log has the service's story).
        if args.workdir.is_none() {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    print!("{}", render(&all));
    if let Some(p) = &args.json {
        std::fs::write(p, serde_json::to_vec_pretty(&all)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    if args.workdir.is_none() {
        let _ = std::fs::remove_dir_all(&scratch);
    }
    let bad: usize = all
        .iter()
        .map(|s| {
            s.lost
                + s.failed_requests as usize
                + s.rounds.iter().filter(|r| r.error.is_some()).count()
        })
        .sum();
    if bad > 0 {
        bail!("{bad} lost writes, failed requests or failed upgrades (see above)");
    }
    Ok(())
}

/// `handoff run` of the demo, stopped (its whole process group) when dropped.
struct Service {
    child: Child,
    addr: SocketAddr,
    run: PathBuf,
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = Command::new(handoff_path(&self.run))
            .arg("stop")
            .arg("--runtime-dir")
            .arg(&self.run)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        // Whatever is left of the group (the supervisor and every generation).
        let pgid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

/// The `handoff` binary beside the runtime dir's owner (recorded at start).
fn handoff_path(run: &Path) -> PathBuf {
    std::fs::read_to_string(run.join(".bench-handoff"))
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from("handoff"))
}

/// Seeds a store of `keys` keys in `dir/state`, starts the demo on it and runs one series
/// of upgrades per write mode.
fn store_series(bins: &Bins, dir: &Path, keys: u64, args: &Args) -> Result<Vec<Series>> {
    let (run, state) = (dir.join("run"), dir.join("state"));
    private_dir(&run)?;
    private_dir(&state)?;
    if keys > 0 {
        let t = Instant::now();
        eprintln!("seeding {keys} keys…");
        let status = Command::new(bins.path("handoff-demo")?)
            .args(["seed", "--keys", &keys.to_string(), "--state-dir"])
            .arg(&state)
            .stdout(Stdio::null())
            .status()
            .context("running handoff-demo seed")?;
        if !status.success() {
            bail!("handoff-demo seed exited with {status}");
        }
        eprintln!("  seeded in {:.1} s", t.elapsed().as_secs_f64());
    }
    let handoff = bins.path("handoff")?;
    std::fs::write(
        run.join(".bench-handoff"),
        handoff.as_os_str().as_encoded_bytes(),
    )?;
    let addr = contest::free_addrs(1)?[0];
    let log = std::fs::File::create(dir.join("service.log"))?;
    let t = Instant::now();
    let child = Command::new(&handoff)
        .arg("run")
        .arg("--runtime-dir")
        .arg(&run)
        .arg("--state-dir")
        .arg(&state)
        .arg("--listen")
        .arg(format!("http=tcp://{addr}"))
        .arg("--")
        .arg(match &args.demo {
            Some(p) => p.clone(),
            None => bins.path("handoff-demo")?,
        })
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .context("starting handoff run")?;
    let mut service = Service { child, addr, run };
    wait_healthy(&mut service, Duration::from_secs(120)).with_context(|| {
        format!(
            "starting the demo on {keys} keys (see {})",
            dir.join("service.log").display()
        )
    })?;
    eprintln!("  serving in {:.2} s", t.elapsed().as_secs_f64());
    let mut out = vec![];
    for w in &args.writes {
        eprintln!("{keys} keys, writes {w}, {} upgrades…", args.upgrades);
        out.push(series(&service, keys, w, args)?);
    }
    Ok(out)
}

/// Polls until `GET /healthz` answers 200 and the supervisor's admin socket is there
/// (the service may serve a moment before `handoff run` listens for `handoff upgrade`);
/// fails at once if `handoff run` exits.
fn wait_healthy(svc: &mut Service, within: Duration) -> Result<()> {
    let (addr, end) = (svc.addr, Instant::now() + within);
    let admin = svc.run.join("admin.sock");
    loop {
        if let Ok(r) = Client::new(addr, false).get("/healthz") {
            if r.status == 200 && admin.exists() {
                return Ok(());
            }
        }
        if let Some(status) = svc.child.try_wait()? {
            bail!("handoff run exited ({status}) before the demo served");
        }
        if Instant::now() > end {
            bail!("the demo at {addr} did not answer /healthz within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One series: `args.upgrades` upgrades with or without the saturating load.
fn series(svc: &Service, keys: u64, writes: &str, args: &Args) -> Result<Series> {
    let load = if writes == "saturating" {
        let l = Load::start(svc.addr, args.clients, 0).context("starting the load")?;
        if args.load_nice != 0 {
            renice_load_threads(args.load_nice)?;
        }
        if !l.wait_for_ok(1000, Duration::from_secs(30)) {
            bail!("the load made no progress: {}", l.snapshot());
        }
        Some(l)
    } else {
        None
    };
    let idle = sample(svc.child.id());
    let mut rounds = vec![];
    let mut details = vec![];
    for i in 0..args.upgrades {
        let stop = Arc::new(AtomicBool::new(false));
        let sup = svc.child.id();
        let sampler = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut peak = (0f64, 0f64, 0f64);
                while !stop.load(Ordering::Relaxed) {
                    let s = sample(sup);
                    peak = (peak.0.max(s.0), peak.1.max(s.1), peak.2.max(s.2));
                    std::thread::sleep(Duration::from_millis(2));
                }
                peak
            })
        };
        let mut r = upgrade(&svc.run)?;
        stop.store(true, Ordering::Relaxed);
        let peak = sampler.join().unwrap_or_default();
        (r.peak_rss_mib, r.peak_pss_mib, r.peak_anon_mib) = peak;
        if let Some(e) = &r.error {
            eprintln!("  upgrade {i}: {e}");
            details.push(format!("upgrade {i}: {e}"));
        } else {
            eprintln!(
                "  upgrade {i}: warm-up {:.1} ms, catch-up {} rounds / {} records, accept gap {:.2} ms, pair peak Pss {:.0} MiB",
                r.warmup_ms.unwrap_or(f64::NAN),
                r.catch_up.as_ref().map_or(0, |c| c.rounds),
                r.catch_up.as_ref().map_or(0, |c| c.records),
                r.gap_ms.unwrap_or(f64::NAN),
                r.peak_pss_mib,
            );
        }
        // The next upgrade starts from one settled process.
        if let Some(old) = r.old_pid {
            let end = Instant::now() + Duration::from_secs(30);
            while contest::alive(old) && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        rounds.push(r);
    }
    let (acked, lost, failed, puts_per_s) = match load {
        Some(l) => {
            let report = l.stop();
            let lost = verify_acked(svc.addr, &report.acked);
            for l in lost.iter().take(5) {
                details.push(format!("lost: {l}"));
            }
            if report.failure_count() > 0 {
                details.push(format!("load: {report}"));
            }
            let rate = report.acked.len() as f64 / report.elapsed.as_secs_f64();
            (report.acked.len(), lost.len(), report.failure_count(), rate)
        }
        None => (0, 0, 0, 0.0),
    };
    let dist = |f: &dyn Fn(&Round) -> Option<f64>| Dist::of(rounds.iter().filter_map(f).collect());
    let peak = |f: &dyn Fn(&Round) -> f64| rounds.iter().map(f).fold(0f64, f64::max);
    Ok(Series {
        keys,
        writes: writes.to_owned(),
        warmup_ms: dist(&|r| r.warmup_ms),
        gap_ms: dist(&|r| r.gap_ms),
        catch_up_rounds: dist(&|r| r.catch_up.as_ref().map(|c| c.rounds as f64)),
        puts_per_s,
        idle_mib: idle,
        peak_rss_mib: peak(&|r| r.peak_rss_mib),
        peak_pss_mib: peak(&|r| r.peak_pss_mib),
        peak_anon_mib: peak(&|r| r.peak_anon_mib),
        acked,
        lost,
        failed_requests: failed,
        details,
        rounds,
    })
}

/// Sets the nice value of this process's load-generator threads (named `load`).
fn renice_load_threads(nice: i32) -> Result<()> {
    let mut tids = vec![];
    for e in std::fs::read_dir("/proc/self/task")?.flatten() {
        let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        if comm.trim_end().starts_with("load") {
            tids.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    if tids.is_empty() {
        bail!("found no load-generator thread to renice");
    }
    let status = Command::new("renice")
        .args(["-n", &nice.to_string(), "-p"])
        .args(&tids)
        .stdout(Stdio::null())
        .status()
        .context("running renice")?;
    if !status.success() {
        bail!("renice -n {nice} of the load threads {tids:?}: {status}");
    }
    Ok(())
}

/// (Rss, Pss, Anonymous) in MiB, summed over the supervisor's children (the service's
/// processes).
fn sample(supervisor: u32) -> (f64, f64, f64) {
    let mut sum = (0f64, 0f64, 0f64);
    for pid in children(supervisor) {
        let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")) else {
            continue;
        };
        let field = |name: &str| -> f64 {
            s.lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
                / 1024.0
        };
        sum.0 += field("Rss:");
        sum.1 += field("Pss:");
        sum.2 += field("Anonymous:");
    }
    sum
}

/// The supervisor's child processes, from `/proc/*/stat`.
fn children(parent: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    // Fields after the command (which may hold spaces): state, ppid, …
                    let rest = &s[s.rfind(')')? + 2..];
                    rest.split(' ').nth(1)?.parse::<u32>().ok()
                })
                == Some(parent)
        })
        .collect()
}

/// Longest `handoff upgrade` may take before it is killed and the upgrade counted failed.
const UPGRADE_BUDGET: Duration = Duration::from_secs(120);

/// Runs `handoff upgrade --runtime-dir RUN --json` and reads its events.
fn upgrade(run: &Path) -> Result<Round> {
    let u = upgrade_json(&handoff_path(run), run, UPGRADE_BUDGET)?;
    let mut r = Round {
        warmup_ms: u.phase_ms("negotiating"),
        gap_ms: ["draining", "sealing", "awaiting-ready", "committed"]
            .iter()
            .map(|p| u.phase_ms(p))
            .sum(),
        error: u.error.clone(),
        ..Round::default()
    };
    if let Some(ev) = &u.committed {
        r.old_pid = ev["old_pid"].as_u64().map(|p| p as u32);
        r.new_pid = ev["new_pid"].as_u64().map(|p| p as u32);
        r.total_ms = ev["total_ms"].as_f64();
        let c = &ev["catch_up"];
        if c.is_object() {
            r.catch_up = Some(CatchUp {
                rounds: c["rounds"].as_u64().unwrap_or(0),
                records: c["records"].as_u64().unwrap_or(0),
                last_records: c["last_records"].as_u64().unwrap_or(0),
                converged: c["converged"].as_bool().unwrap_or(false),
                took_ms: c["took_ms"].as_f64().unwrap_or(f64::NAN),
            });
        }
    }
    r.phases = u.phases;
    Ok(r)
}

/// The results as a Markdown table (what BENCHMARKS.md carries) and the failures.
fn render(all: &[Series]) -> String {
    let mut s = String::new();
    s.push_str("| keys | writes | upgrades (failed) | PUT/s | warm-up median / p99 ms | catch-up rounds median / max | accept gap median / p99 / max ms | pair peak Rss / Pss / anon MiB | idle Rss / anon MiB | acked writes read back (lost) |\n");
    s.push_str("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for x in all {
        let failed = x.rounds.iter().filter(|r| r.error.is_some()).count();
        s.push_str(&format!(
            "| {} | {} | {} ({failed}) | {:.0} | {:.1} / {:.1} | {:.0} / {:.0} | {:.2} / {:.2} / {:.2} | {:.0} / {:.0} / {:.0} | {:.0} / {:.0} | {} ({}) |\n",
            x.keys,
            x.writes,
            x.rounds.len(),
            x.puts_per_s,
            x.warmup_ms.median,
            x.warmup_ms.p99,
            x.catch_up_rounds.median,
            x.catch_up_rounds.max,
            x.gap_ms.median,
            x.gap_ms.p99,
            x.gap_ms.max,
            x.peak_rss_mib,
            x.peak_pss_mib,
            x.peak_anon_mib,
            x.idle_mib.0,
            x.idle_mib.2,
            x.acked,
            x.lost,
        ));
    }
    for x in all {
        for d in &x.details {
            s.push_str(&format!("- {} keys, {}: {d}\n", x.keys, x.writes));
        }
    }
    s
}
