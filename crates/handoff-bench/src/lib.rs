//! Side-by-side benchmark of zero-downtime upgrades: the same tiny HTTP handler
//! ([`tiny`]) served under `handoff`, Cloudflare's `ecdysis` and `shellflip`, and a
//! no-upgrade control, each driven by the same load (`handoff_load::generator`, the
//! generator `handoff demo` uses too) while upgrades are
//! triggered at a fixed interval ([`contest`]), against floors measured in the same run
//! ([`floors`]); [`report`] turns it into the table of BENCHMARKS.md.
//!
//! Run it with `scripts/bench-peers` (release build, full size) or
//! `handoff-bench-peers --help`. `handoff-bench-move` measures apart how long an upgrade
//! takes to hand N idle keep-alive connections to the new build (issue 15).
//!
//! ```no_run
//! use std::time::Duration;
//! use handoff_load::generator::{self, LoadConfig, Progress};
//! # async fn f() {
//! let cfg = LoadConfig {
//!     addrs: vec!["127.0.0.1:8080".parse().unwrap()],
//!     keepalive: 8, fresh: 2, idle_holders: 0,
//!     duration: Duration::from_secs(1), timeout: Duration::from_secs(5),
//! };
//! let run = generator::run(cfg, std::time::Instant::now(), Default::default()).await;
//! println!("{} answered, {} failed", run.samples.len(), run.failures.len());
//! # }
//! ```

pub mod contest;
pub mod floors;
pub mod report;
pub mod tiny;
pub mod upgrade_cmd;

use std::net::{SocketAddr, TcpListener};

/// The runtime every benchmark service uses: 2 worker threads, like the demo.
pub fn service_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
}

/// Binds a non-blocking TCP listener with the backlog `handoff run` uses (4096), so the
/// control and the floor queue connections exactly like the contestants.
pub fn bind_tcp(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let l = TcpListener::bind(addr)?;
    nix::sys::socket::listen(
        &l,
        nix::sys::socket::Backlog::new(4096).unwrap_or(nix::sys::socket::Backlog::MAXCONN),
    )?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// Raises the soft RLIMIT_NOFILE to the hard limit (the services inherit it); returns the
/// soft limit in force afterwards.
pub fn raise_nofile() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) => {
            if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
                hard
            } else {
                soft
            }
        }
        Err(_) => 1024,
    }
}

/// Creates `dir` (and its parents) with mode 0700: the benches' scratch dirs, where the
/// runtime and state dirs of `handoff run` live (it refuses dirs others can enter).
pub fn private_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    use anyhow::Context;
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))
}
