//! The tiny handler under Cloudflare's `shellflip`, following its `restarter` example:
//! a `RestartConfig` with a restart coordination socket, `try_into_restart_task()` raced
//! against the accept loop, a `ShutdownCoordinator` to wait for connections after the
//! restart, and a `restart` subcommand that calls `request_restart()` (it returns once the
//! new process said it started).
//!
//! shellflip does not pass listening sockets (its docs assume systemd); the listener comes
//! from systemd socket activation (`LISTEN_FDS`, here started by `systemd-socket-activate`)
//! and stays inheritable, and shellflip's re-exec sets `LISTEN_PID=auto`, which
//! `shellflip::fixup_systemd_env` turns into the new pid: the systemd-activated setup its
//! docs describe.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use handoff_bench::tiny::{self, Tiny};
use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use shellflip::{RestartConfig, ShutdownCoordinator};

const HELP: &str = "bench-svc-shellflip --socket PATH [restart]: serve the tiny handler under \
shellflip on the socket-activated listener (LISTEN_FDS=1); `restart` asks the running \
instance to restart through the coordination socket PATH; SIGTERM stops";

fn main() -> Result<()> {
    let mut socket: Option<PathBuf> = None;
    let mut restart = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "-h" | "--help" => {
                println!("{HELP}");
                return Ok(());
            }
            "--socket" => socket = Some(args.next().context("--socket needs PATH")?.into()),
            "restart" => restart = true,
            other => bail!("unexpected argument {other:?}\n{HELP}"),
        }
    }
    let Some(socket) = socket else {
        bail!("--socket is required\n{HELP}");
    };
    let conf = RestartConfig {
        enabled: true,
        coordination_socket_path: socket,
        ..Default::default()
    };
    if restart {
        let pid = conf
            .request_restart_sync()
            .context("restart through the coordination socket failed")?;
        println!("{pid}");
        return Ok(());
    }
    // Before reading LISTEN_PID: a restarted process finds "auto" there.
    shellflip::fixup_systemd_env();
    let mut listeners = handoff::listeners::take_from_env().context("taking LISTEN_FDS")?;
    if listeners.len() != 1 {
        bail!(
            "expected exactly one socket-activated listener, got {}",
            listeners.len()
        );
    }
    let listener = listeners.remove(0);
    // Systemd's sockets are inheritable; keep ours so for the next generation.
    fcntl(&listener.fd, FcntlArg::F_SETFD(FdFlag::empty())).context("clearing FD_CLOEXEC")?;
    let listener = listener.into_tcp();
    listener.set_nonblocking(true)?;
    let rt = handoff_bench::service_runtime()?;
    rt.block_on(serve(conf, listener))
}

async fn serve(conf: RestartConfig, listener: std::net::TcpListener) -> Result<()> {
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let restart_task = conf.try_into_restart_task()?;
    tokio::pin!(restart_task);
    let coordinator = ShutdownCoordinator::new();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let t = Tiny::new();
    loop {
        tokio::select! {
            res = listener.accept() => {
                if let Ok((sock, _)) = res {
                    let handle = coordinator.handle();
                    let open = tiny::Open::new(t.clone());
                    tokio::spawn(async move {
                        tiny::connection(sock, open).await;
                        drop(handle);
                    });
                }
            }
            _ = &mut restart_task => break,
            _ = term.recv() => return Ok(()),
        }
    }
    // Restarted: stop accepting, finish connections answer-then-close, wait for them.
    drop(listener);
    t.set_draining(true);
    let _ = tokio::time::timeout(Duration::from_secs(10), coordinator.shutdown()).await;
    Ok(())
}
