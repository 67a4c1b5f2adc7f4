//! Starting, upgrading and stopping each contestant, each the way its own docs say.
//!
//! | contestant | started as | upgrade trigger | "done" when |
//! |---|---|---|---|
//! | control | `bench-svc-plain --listen …` | none | – |
//! | handoff | `handoff run --listen … -- bench-svc-handoff` | `handoff upgrade` | the command returns (Commit) |
//! | handoff (SIGHUP) | the same | SIGHUP to the `handoff run` pid (systemd's `ExecReload=kill -HUP $MAINPID`) | `handoff run` prints `SIGHUP upgrade committed` |
//! | handoff (examples/axum) | `handoff run --listen http=… -- example-axum` | `handoff upgrade` | the command returns (Commit) |
//! | handoff (prepared, …) | the same, successor accepting after Commit | `handoff upgrade --prepare` (run to completion, *before* the trigger), then SIGHUP | as SIGHUP |
//! | ecdysis | `bench-svc-ecdysis --listen … --pid-file …` | SIGHUP to the pid in the pid file | the pid file names the new process |
//! | shellflip | `systemd-socket-activate -l … -- bench-svc-shellflip --socket …` | `bench-svc-shellflip --socket … restart` | the command returns (the child said it started) |
//!
//! The harness makes itself a child subreaper, so the old generations that ecdysis and
//! shellflip leave behind (their parent exits) are reparented to it and reaped at the end,
//! even though PID 1 here does not reap orphans.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::report::Upgrade;

mod phases;
mod procs;
pub use phases::handoff_phases;
pub use procs::{alive, output_within, probe_pid};
use procs::{last_errors, read_pid, reap_any, trace_trigger};

/// The contestants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Peer {
    Control,
    Handoff,
    /// The same service and supervisor as `Handoff`, upgraded by SIGHUP to `handoff run`
    /// (the path `ExecReload=kill -HUP $MAINPID` takes): triggered the way ecdysis is, with
    /// no CLI process on the trigger path.
    HandoffSighup,
    /// `HandoffSighup` with the successor accepting only after Commit (`bench-svc-handoff
    /// --accept-after-commit`): the order a service with state must keep.
    HandoffSighupAfterCommit,
    /// `HandoffSighupAfterCommit` with the successor prepared ahead: `handoff upgrade
    /// --prepare` runs to completion just before each trigger, so the new build's start-up
    /// is off the trigger → serving path. Its cost stays in the figures: the upgrade window
    /// opens when the prepare starts, and the prepare's own time is reported beside.
    HandoffPrepared,
    /// `examples/axum` — an ordinary axum service on `handoff-tokio`, the way a user
    /// writes it — under `handoff run`, upgraded by `handoff upgrade`: hyper's HTTP stack
    /// and the adapter's drain instead of the tiny handler's.
    HandoffAxum,
    Ecdysis,
    Shellflip,
}

impl Peer {
    pub fn name(self) -> &'static str {
        match self {
            Peer::Control => "control (no upgrades)",
            Peer::Handoff => "handoff",
            Peer::HandoffSighup => "handoff (SIGHUP)",
            Peer::HandoffSighupAfterCommit => "handoff (SIGHUP, accept after Commit)",
            Peer::HandoffPrepared => "handoff (prepared, SIGHUP, accept after Commit)",
            Peer::HandoffAxum => "handoff (examples/axum, handoff-tokio)",
            Peer::Ecdysis => "ecdysis",
            Peer::Shellflip => "shellflip",
        }
    }
}

/// Where the binaries are: `handoff` and the `bench-svc-*` services, built together.
#[derive(Debug, Clone)]
pub struct Bins {
    pub dir: PathBuf,
}

impl Bins {
    /// The directory of the running executable (the driver is built with the services).
    pub fn beside_current_exe() -> Result<Bins> {
        let exe = std::env::current_exe().context("locating the driver executable")?;
        let dir = exe
            .parent()
            .ok_or_else(|| anyhow!("{} has no parent directory", exe.display()))?;
        Ok(Bins {
            dir: dir.to_path_buf(),
        })
    }

    pub fn path(&self, name: &str) -> Result<PathBuf> {
        let p = self.dir.join(name);
        if !p.exists() {
            bail!(
                "{} not found: build everything first (`cargo build --release -p handoff-bench \
                 -p handoff-cli --bins`, or run scripts/bench-peers)",
                p.display()
            );
        }
        Ok(p)
    }
}

/// A started contestant.
pub struct Running {
    pub peer: Peer,
    child: Child,
    pub addrs: Vec<SocketAddr>,
    dir: PathBuf,
    bins: Bins,
    /// Every service pid seen, for the final cleanup.
    pub pids: Vec<u32>,
    /// handoff variants: the outcome of each SIGHUP upgrade as `handoff run` reports it
    /// on stderr (new pid, or the failure line), from the thread that copies its stderr.
    commits: Option<Receiver<Result<u32, String>>>,
    /// That thread: it ends when the last holder of the stderr pipe exits.
    tee: Option<JoinHandle<()>>,
}

impl Peer {
    /// Whether this contestant is `handoff run` (either trigger).
    pub fn is_handoff(self) -> bool {
        matches!(
            self,
            Peer::Handoff
                | Peer::HandoffSighup
                | Peer::HandoffSighupAfterCommit
                | Peer::HandoffPrepared
                | Peer::HandoffAxum
        )
    }
}

/// What `handoff run` prints once a SIGHUP upgrade has committed (and its journal record
/// is written): `handoff run: SIGHUP upgrade committed: pid N in …`.
const SIGHUP_COMMITTED: &str = "SIGHUP upgrade committed: pid ";
const SIGHUP_FAILED: &str = "SIGHUP upgrade failed: ";

/// Copies `handoff run`'s stderr into `log` line by line (the phase log read after the
/// run) and reports each SIGHUP upgrade's outcome on `tx` the moment its line arrives.
/// A blocking read on a pipe wakes as soon as the line is written, so "tool done" carries
/// no polling delay, and the supervisor does the same work as when writing to a file:
/// one `write` per line. Both handoff variants use it, so they differ only in the trigger.
fn tee_stderr(
    from: std::process::ChildStderr,
    mut log: std::fs::File,
    tx: Sender<Result<u32, String>>,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut lines = BufReader::new(from);
        let mut line = String::new();
        loop {
            line.clear();
            match lines.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let _ = log.write_all(line.as_bytes());
            if let Some(rest) = line.split_once(SIGHUP_COMMITTED).map(|(_, r)| r) {
                let pid = rest.split_whitespace().next().and_then(|p| p.parse().ok());
                let _ = tx.send(pid.ok_or_else(|| format!("unparsable: {}", line.trim())));
            } else if let Some((_, why)) = line.split_once(SIGHUP_FAILED) {
                let _ = tx.send(Err(why.trim().to_owned()));
            }
        }
    })
}

/// Picks `n` free loopback ports (bound, then released: a small race with other programs,
/// acceptable for a benchmark).
pub fn free_addrs(n: usize) -> Result<Vec<SocketAddr>> {
    let held = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()
        .context("picking free ports")?;
    held.iter()
        .map(|l| l.local_addr().context("local_addr"))
        .collect()
}

impl Running {
    /// Starts `peer` with `listeners` TCP listeners (only handoff and the control take more
    /// than one) in the scratch directory `dir`, and waits until it serves.
    pub fn start(peer: Peer, bins: &Bins, dir: &Path, listeners: usize) -> Result<Running> {
        std::fs::create_dir_all(dir)?;
        if listeners > 1 && matches!(peer, Peer::Ecdysis | Peer::Shellflip | Peer::HandoffAxum) {
            bail!("{} is benchmarked with one listener only", peer.name());
        }
        let addrs = free_addrs(listeners)?;
        let mut cmd = match peer {
            Peer::Control => {
                let mut c = Command::new(bins.path("bench-svc-plain")?);
                for a in &addrs {
                    c.arg("--listen").arg(a.to_string());
                }
                c
            }
            Peer::Handoff
            | Peer::HandoffSighup
            | Peer::HandoffSighupAfterCommit
            | Peer::HandoffPrepared
            | Peer::HandoffAxum => {
                let mut c = Command::new(bins.path("handoff")?);
                c.arg("run")
                    .arg("--runtime-dir")
                    .arg(dir.join("run"))
                    .arg("--state-dir")
                    .arg(dir.join("state"));
                for (i, a) in addrs.iter().enumerate() {
                    // The axum example takes its one listener by the name users give it.
                    let name = match peer {
                        Peer::HandoffAxum => "http".to_string(),
                        _ => format!("l{i}"),
                    };
                    c.arg("--listen").arg(format!("{name}=tcp://{a}"));
                }
                c.arg("--").arg(bins.path(if peer == Peer::HandoffAxum {
                    "example-axum"
                } else {
                    "bench-svc-handoff"
                })?);
                if matches!(peer, Peer::HandoffSighupAfterCommit | Peer::HandoffPrepared) {
                    c.arg("--accept-after-commit");
                }
                c
            }
            Peer::Ecdysis => {
                let mut c = Command::new(bins.path("bench-svc-ecdysis")?);
                c.arg("--listen")
                    .arg(addrs[0].to_string())
                    .arg("--pid-file")
                    .arg(dir.join("ecdysis.pid"));
                c
            }
            Peer::Shellflip => {
                let mut c = Command::new("systemd-socket-activate");
                c.arg("-l")
                    .arg(addrs[0].to_string())
                    .arg("--")
                    .arg(bins.path("bench-svc-shellflip")?)
                    .arg("--socket")
                    .arg(dir.join("shellflip.sock"));
                c
            }
        };
        let log = std::fs::File::create(dir.join("stderr.log")).context("stderr.log")?;
        let stderr = if peer.is_handoff() {
            Stdio::piped()
        } else {
            Stdio::from(log.try_clone().context("stderr.log")?)
        };
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("starting {}: {cmd:?}", peer.name()))?;
        let (mut commits, mut tee) = (None, None);
        if let Some(from) = child.stderr.take() {
            let (tx, rx) = std::sync::mpsc::channel();
            tee = Some(tee_stderr(from, log, tx));
            commits = Some(rx);
        }
        let mut r = Running {
            peer,
            child,
            addrs,
            dir: dir.to_path_buf(),
            bins: bins.clone(),
            pids: Vec::new(),
            commits,
            tee,
        };
        // systemd-socket-activate starts the service on the first connection: this probe.
        let pid = r.wait_serving(Duration::from_secs(15))?;
        r.pids.push(pid);
        if peer.is_handoff() {
            r.wait_admin_socket(Duration::from_secs(15))?;
        }
        Ok(r)
    }

    /// Polls (every 5 ms, at most `within`) until `handoff run`'s admin socket exists. A
    /// stateless service answers before its supervisor has finished starting (it accepts
    /// before its first Begin), so answering is not "ready for `handoff upgrade`": on a
    /// loaded machine the first upgrade found no admin socket yet.
    fn wait_admin_socket(&self, within: Duration) -> Result<()> {
        let sock = self.dir.join("run").join("admin.sock");
        let end = Instant::now() + within;
        while !sock.exists() {
            if Instant::now() > end {
                bail!(
                    "{}: {} did not appear within {within:?} (see {})",
                    self.peer.name(),
                    sock.display(),
                    self.dir.join("stderr.log").display()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    /// Polls (every 5 ms, at most `within`) until every listener answers; returns the pid
    /// that answered.
    fn wait_serving(&mut self, within: Duration) -> Result<u32> {
        let end = Instant::now() + within;
        let mut pid = 0;
        for addr in self.addrs.clone() {
            loop {
                match probe_pid(addr) {
                    Ok(p) => {
                        pid = p;
                        break;
                    }
                    Err(e) if Instant::now() > end => {
                        bail!(
                            "{} did not serve on {addr} within {within:?}: {e} (see {})",
                            self.peer.name(),
                            self.dir.join("stderr.log").display()
                        )
                    }
                    Err(_) => {
                        if let Ok(Some(status)) = self.child.try_wait() {
                            let log = self.dir.join("stderr.log");
                            bail!(
                                "{} exited with {status} before serving: {} (log: {})",
                                self.peer.name(),
                                last_errors(&log),
                                log.display()
                            );
                        }
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
            }
        }
        Ok(pid)
    }

    /// Triggers one upgrade and waits until the tool says it is done. Times are µs after
    /// `epoch`. The returned thread watches the old process and yields when it was gone.
    pub fn upgrade(&mut self, epoch: Instant) -> (Upgrade, Option<JoinHandle<Option<u64>>>) {
        let us = move |t: Instant| t.saturating_duration_since(epoch).as_micros() as u64;
        let old = match self.peer {
            Peer::Ecdysis => read_pid(&self.dir.join("ecdysis.pid")).ok(),
            _ => probe_pid(self.addrs[0]).ok(),
        }
        .unwrap_or(0);
        let mut prepared = None;
        if self.peer == Peer::HandoffPrepared {
            let t = Instant::now();
            if let Err(e) = self.prepare() {
                let up = Upgrade {
                    trigger_us: us(t),
                    prepare_us: Some(us(t)),
                    old_pid: old,
                    error: Some(format!("{} prepare: {e:#}", self.peer.name())),
                    ..Upgrade::default()
                };
                return (up, None);
            }
            prepared = Some((us(t), t.elapsed().as_secs_f64() * 1000.0));
        }
        if std::env::var_os("BENCH_TRACE").is_some() {
            trace_trigger(&self.dir, old);
        }
        let trigger = Instant::now();
        let mut up = Upgrade {
            trigger_us: us(trigger),
            prepare_us: prepared.map(|p| p.0),
            prepare_ms: prepared.map(|p| p.1),
            old_pid: old,
            ..Upgrade::default()
        };
        if self.peer == Peer::Control {
            return (up, None);
        }
        let watcher = (old != 0).then(|| {
            std::thread::spawn(move || {
                let end = Instant::now() + Duration::from_secs(15);
                while Instant::now() < end {
                    if !alive(old) {
                        return Some(us(Instant::now()));
                    }
                    std::thread::sleep(Duration::from_micros(500));
                }
                None
            })
        });
        match self.trigger_and_wait(old) {
            Ok(new) => {
                up.done_us = Some(us(Instant::now()));
                up.new_pid = Some(new);
                self.pids.push(new);
            }
            Err(e) => up.error = Some(format!("{} upgrade: {e:#}", self.peer.name())),
        }
        (up, watcher)
    }

    /// Returns the new process's pid.
    fn trigger_and_wait(&mut self, old: u32) -> Result<u32> {
        match self.peer {
            Peer::Control => Ok(old),
            Peer::Handoff | Peer::HandoffAxum => {
                self.handoff_upgrade(&[])?;
                // Committed: the old process no longer accepts, so this is the new one.
                probe_pid(self.addrs[0]).map_err(|e| anyhow!("probing after upgrade: {e}"))
            }
            Peer::HandoffSighup | Peer::HandoffSighupAfterCommit | Peer::HandoffPrepared => {
                let commits = self
                    .commits
                    .as_ref()
                    .context("no stderr reader for handoff run")?;
                // Outcomes of earlier upgrades that arrived late were already counted.
                while commits.try_recv().is_ok() {}
                kill(Pid::from_raw(self.child.id() as i32), Signal::SIGHUP)
                    .context("SIGHUP to handoff run")?;
                match commits.recv_timeout(TOOL_BUDGET) {
                    Ok(Ok(pid)) => Ok(pid),
                    Ok(Err(why)) => bail!("handoff run: SIGHUP upgrade failed: {why}"),
                    Err(_) => bail!("handoff run reported no outcome {TOOL_BUDGET:?} after SIGHUP"),
                }
            }
            Peer::Ecdysis => {
                let pid_file = self.dir.join("ecdysis.pid");
                kill(Pid::from_raw(old as i32), Signal::SIGHUP).context("SIGHUP")?;
                let end = Instant::now() + Duration::from_secs(10);
                loop {
                    if let Ok(p) = read_pid(&pid_file) {
                        if p != old {
                            return Ok(p);
                        }
                    }
                    if Instant::now() > end {
                        bail!("the pid file still names {old} 10 s after SIGHUP");
                    }
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
            Peer::Shellflip => {
                let out = Command::new(self.bins.path("bench-svc-shellflip")?)
                    .arg("--socket")
                    .arg(self.dir.join("shellflip.sock"))
                    .arg("restart")
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .and_then(|c| output_within(c, TOOL_BUDGET))
                    .context("running bench-svc-shellflip restart")?;
                if !out.status.success() {
                    bail!(
                        "restart: {}: {}",
                        out.status,
                        String::from_utf8_lossy(&out.stderr).trim()
                    );
                }
                String::from_utf8_lossy(&out.stdout)
                    .trim()
                    .parse()
                    .context("restart printed no pid")
            }
        }
    }

    /// `handoff upgrade --prepare`, to completion: the successor is started and held.
    fn prepare(&self) -> Result<()> {
        self.handoff_upgrade(&["--prepare"])
    }

    /// Runs `handoff upgrade EXTRA… --runtime-dir …` to completion (bounded by
    /// [`TOOL_BUDGET`]); an error carries its exit status and stderr.
    fn handoff_upgrade(&self, extra: &[&str]) -> Result<()> {
        let what = format!("handoff upgrade {}", extra.join(" "));
        let out = Command::new(self.bins.path("handoff")?)
            .arg("upgrade")
            .args(extra)
            .arg("--runtime-dir")
            .arg(self.dir.join("run"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .and_then(|c| output_within(c, TOOL_BUDGET))
            .with_context(|| format!("running {what}"))?;
        if !out.status.success() {
            bail!(
                "{}: {}: {}",
                what.trim_end(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// Stops every process of this contestant (SIGTERM, then SIGKILL after 5 s) and reaps
    /// them all, including orphaned old generations reparented to us.
    pub fn stop(mut self) {
        let current: Vec<u32> = match self.peer {
            Peer::Handoff
            | Peer::HandoffSighup
            | Peer::HandoffSighupAfterCommit
            | Peer::HandoffPrepared
            | Peer::HandoffAxum
            | Peer::Control => vec![self.child.id()],
            Peer::Ecdysis => read_pid(&self.dir.join("ecdysis.pid"))
                .map(|p| vec![p])
                .unwrap_or_default(),
            Peer::Shellflip => probe_pid(self.addrs[0])
                .map(|p| vec![p])
                .unwrap_or_default(),
        };
        for p in &current {
            let _ = kill(Pid::from_raw(*p as i32), Signal::SIGTERM);
        }
        let end = Instant::now() + Duration::from_secs(5);
        let mut all = self.pids.clone();
        all.push(self.child.id());
        loop {
            reap_any();
            if all.iter().all(|&p| !alive(p)) {
                break;
            }
            if Instant::now() > end {
                for &p in &all {
                    let _ = kill(Pid::from_raw(p as i32), Signal::SIGKILL);
                }
            }
            if Instant::now() > end + Duration::from_secs(5) {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let _ = self.child.try_wait();
        reap_any();
        // Every writer of the stderr pipe is gone, so the copier reaches EOF and the log is
        // complete when the phases are read; bounded all the same.
        if let Some(tee) = self.tee.take() {
            let end = Instant::now() + Duration::from_secs(2);
            while !tee.is_finished() && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(1));
            }
            if tee.is_finished() {
                let _ = tee.join();
            }
        }
    }
}

/// Longest a trigger command (`handoff upgrade`, `… restart`) may take before the harness
/// kills it and counts the upgrade as failed: the benchmark never hangs on a tool.
const TOOL_BUDGET: Duration = Duration::from_secs(30);
