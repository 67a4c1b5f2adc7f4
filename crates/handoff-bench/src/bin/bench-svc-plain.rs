//! The no-upgrade control: the tiny handler on `--listen` addresses and nothing else (no
//! restart machinery linked in). Also the "trivial binary" of the spawn floor
//! (`bench-svc-plain --help` starts, prints and exits).

use std::net::SocketAddr;

use anyhow::{bail, Context, Result};
use handoff_bench::tiny::{self, Tiny};

const HELP: &str = "bench-svc-plain --listen ADDR [--listen ADDR]...: serve the benchmark's tiny \
HTTP handler until SIGTERM (the no-upgrade control of handoff-bench-peers)";

fn main() -> Result<()> {
    let mut addrs: Vec<SocketAddr> = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "-h" | "--help" => {
                println!("{HELP}");
                return Ok(());
            }
            "--listen" => {
                let v = args.next().context("--listen needs HOST:PORT")?;
                addrs.push(v.parse().with_context(|| format!("--listen {v:?}"))?);
            }
            other => bail!("unexpected argument {other:?}\n{HELP}"),
        }
    }
    if addrs.is_empty() {
        bail!("no --listen given\n{HELP}");
    }
    let rt = handoff_bench::service_runtime()?;
    rt.block_on(async {
        let t = Tiny::new();
        for addr in addrs {
            let l = handoff_bench::bind_tcp(addr)?;
            tokio::spawn(tiny::accept_loop(
                tokio::net::TcpListener::from_std(l)?,
                t.clone(),
            ));
        }
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        term.recv().await;
        Ok(())
    })
}
