//! The tiny handler under Cloudflare's `ecdysis`, following its `tokio_echo` example:
//! `TokioEcdysisBuilder` with SIGHUP as the upgrade signal, a pid file, the listener built
//! with `build_listen_tcp(StopOnShutdown::Yes, …)`, `ready()`, then await the upgrade.
//! ecdysis passes the listener to the re-executed child itself; once the child is ready the
//! accept stream ends here, and this process finishes its connections answer-then-close
//! (the same drain as every contestant) and exits.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use ecdysis::tokio_ecdysis::{SignalKind, StopOnShutdown, TokioEcdysisBuilder};
use futures_util::StreamExt;
use handoff_bench::tiny::{self, Tiny};

const HELP: &str = "bench-svc-ecdysis --listen HOST:PORT --pid-file PATH: serve the tiny \
handler under ecdysis; SIGHUP upgrades (re-executes this binary), SIGTERM stops";

/// Wall-clock µs, comparable with the harness's trigger times (BENCH_TRACE).
fn now_us() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros())
        .unwrap_or(0)
}

fn main() -> Result<()> {
    // BENCH_TRACE=1: when this process reached main and accepted its first connection, to
    // line up with the harness's trigger times (the same probes as bench-svc-handoff's).
    if std::env::var_os("BENCH_TRACE").is_some() {
        eprintln!("bench-trace pid={} main={}", std::process::id(), now_us());
    }
    let mut addr: Option<SocketAddr> = None;
    let mut pid_file: Option<PathBuf> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "-h" | "--help" => {
                println!("{HELP}");
                return Ok(());
            }
            "--listen" => {
                let v = args.next().context("--listen needs HOST:PORT")?;
                addr = Some(v.parse().with_context(|| format!("--listen {v:?}"))?);
            }
            "--pid-file" => pid_file = Some(args.next().context("--pid-file needs PATH")?.into()),
            other => bail!("unexpected argument {other:?}\n{HELP}"),
        }
    }
    let (Some(addr), Some(pid_file)) = (addr, pid_file) else {
        bail!("--listen and --pid-file are required\n{HELP}");
    };
    let rt = handoff_bench::service_runtime()?;
    rt.block_on(serve(addr, pid_file))
}

async fn serve(addr: SocketAddr, pid_file: PathBuf) -> Result<()> {
    let mut builder = TokioEcdysisBuilder::new(SignalKind::hangup()).context("ecdysis builder")?;
    builder
        .stop_on_signal(SignalKind::terminate())
        .context("ecdysis stop signal")?;
    builder.set_pid_file(&pid_file);
    let mut stream = builder
        .build_listen_tcp(StopOnShutdown::Yes, addr, |b, addr| {
            b.set_reuse_address(true)?;
            b.bind(&addr.into())?;
            // The backlog `handoff run` uses.
            b.listen(4096)?;
            Ok(b.into())
        })
        .with_context(|| format!("ecdysis listening on {addr}"))?;
    let t = Tiny::new();
    let t2 = t.clone();
    let mut trace = std::env::var_os("BENCH_TRACE").is_some();
    let server = tokio::spawn(async move {
        while let Some(conn) = stream.next().await {
            if let Ok(conn) = conn {
                if std::mem::take(&mut trace) {
                    eprintln!(
                        "bench-trace pid={} first_accept={}",
                        std::process::id(),
                        now_us()
                    );
                }
                tokio::spawn(tiny::connection(conn, tiny::Open::new(t2.clone())));
            }
        }
    });
    let (_ecdysis, upgraded) = builder.ready().context("ecdysis ready")?;
    let _reason = upgraded.await;
    // Upgraded (or stopped): the accept stream ends; finish connections answer-then-close.
    t.set_draining(true);
    let _ = server.await;
    t.wait_conns_zero(Duration::from_secs(10)).await;
    Ok(())
}
