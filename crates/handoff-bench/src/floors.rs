//! Floors measured in the same run as the contestants: what a restart cannot go below on
//! this machine (spawning a process, a round trip between two processes), and what the
//! load generator measures against a server with no restart machinery at all.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::report::Dist;
use crate::tiny::{self, Tiny};
use handoff_load::generator::{self, LoadConfig, LoadRun};

/// Spawning `bin --help` to completion (fork, exec, run, exit, wait), `n` times; ms.
pub fn spawn(bin: &Path, n: usize) -> Result<Dist> {
    let mut ms = Vec::with_capacity(n);
    for _ in 0..n {
        ms.push(spawn_once(bin)?);
    }
    Ok(Dist::of(ms))
}

fn spawn_once(bin: &Path) -> Result<f64> {
    let t = Instant::now();
    let status = Command::new(bin)
        .arg("--help")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .with_context(|| format!("spawning {}", bin.display()))?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    if !status.success() {
        bail!("{} --help exited with {status}", bin.display());
    }
    Ok(ms)
}

/// The spawn and round-trip floors under the same load the contestants run under.
pub struct LoadedFloors {
    pub spawn: Dist,
    pub rtt: Dist,
    /// The load generator's run against the static server meanwhile.
    pub run: LoadRun,
    pub duration: Duration,
}

/// The spawn and socketpair floors sampled *while* the load generator saturates the
/// machine (against the static in-process server, as in [`static_server`]).
///
/// Every contestant's handoff time is measured under that load, where each process
/// wakeup waits for a core; a floor measured on an idle machine is then not a like-for-like
/// bound. One spawn and 6 round trips are sampled every `pace` (paced, so the probe adds
/// little load of its own) until the load ends.
pub fn under_load(
    bin: &Path,
    load_rt: &tokio::runtime::Runtime,
    cfg: LoadConfig,
    pace: Duration,
) -> Result<LoadedFloors> {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        let bin = bin.to_path_buf();
        std::thread::spawn(move || -> Result<(Vec<f64>, Vec<f64>)> {
            let (mut a, mut b) = UnixStream::pair().context("socketpair")?;
            // Echoes until the other end closes.
            let echo = std::thread::spawn(move || {
                let mut buf = [0u8; 64];
                while b.read_exact(&mut buf).is_ok() && b.write_all(&buf).is_ok() {}
            });
            let (mut spawns, mut rtts) = (vec![], vec![]);
            let mut buf = [7u8; 64];
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                spawns.push(spawn_once(&bin)?);
                for _ in 0..6 {
                    let t = Instant::now();
                    a.write_all(&buf)?;
                    a.read_exact(&mut buf)?;
                    rtts.push(t.elapsed().as_secs_f64() * 1e3);
                }
                // Pacing between samples, not a wait for a condition.
                std::thread::sleep(pace);
            }
            drop(a);
            let _ = echo.join();
            Ok((spawns, rtts))
        })
    };
    let served = static_server(load_rt, cfg);
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let sampled = match sampler.join() {
        Ok(r) => r.context("sampling the floors under load")?,
        Err(_) => bail!("the floor sampler panicked"),
    };
    let (run, duration) = served?;
    Ok(LoadedFloors {
        spawn: Dist::of(sampled.0),
        rtt: Dist::of(sampled.1),
        run,
        duration,
    })
}

/// A 64-byte round trip over a Unix socketpair between two threads, `n` times; ms.
pub fn socketpair_round_trip(n: usize) -> Result<Dist> {
    let (mut a, mut b) = UnixStream::pair().context("socketpair")?;
    let echo = std::thread::spawn(move || -> std::io::Result<()> {
        let mut buf = [0u8; 64];
        for _ in 0..n {
            b.read_exact(&mut buf)?;
            b.write_all(&buf)?;
        }
        Ok(())
    });
    let mut ms = Vec::with_capacity(n);
    let mut buf = [7u8; 64];
    for _ in 0..n {
        let t = Instant::now();
        a.write_all(&buf)?;
        a.read_exact(&mut buf)?;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    match echo.join() {
        Ok(r) => r.context("echo thread")?,
        Err(_) => bail!("the echo thread panicked"),
    }
    Ok(Dist::of(ms))
}

/// The load generator against the tiny handler served in this process (its own 2-thread
/// runtime, like every service): the best the load can see on this machine.
pub fn static_server(
    load_rt: &tokio::runtime::Runtime,
    mut cfg: LoadConfig,
) -> Result<(LoadRun, Duration)> {
    let server_rt = crate::service_runtime()?;
    let listener = crate::bind_tcp("127.0.0.1:0".parse()?)?;
    cfg.addrs = vec![listener.local_addr()?];
    let t: Arc<Tiny> = Tiny::new();
    {
        let _guard = server_rt.enter();
        let l = tokio::net::TcpListener::from_std(listener)?;
        server_rt.spawn(tiny::accept_loop(l, t));
    }
    let duration = cfg.duration;
    let run = load_rt.block_on(generator::run(cfg, Instant::now(), Default::default()));
    server_rt.shutdown_timeout(Duration::from_millis(200));
    Ok((run, duration))
}

/// What one durable journal record costs here: write a small file, fsync it, rename it over
/// the previous one, fsync the directory; `n` times, ms. (handoff journals its phases this
/// way; ecdysis and shellflip keep no journal.)
pub fn fsync_rename(dir: &Path, n: usize) -> Result<Dist> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join("fsync-floor.tmp");
    let dst = dir.join("fsync-floor");
    let mut ms = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(format!("record {i}\n").as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &dst)?;
        std::fs::File::open(dir)?.sync_all()?;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let _ = std::fs::remove_file(&dst);
    Ok(Dist::of(ms))
}
