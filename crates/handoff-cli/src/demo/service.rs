//! Starting and stopping the demo's supervisor (`handoff run … -- handoff-demo`) and the
//! scratch directory it runs in.

use std::collections::VecDeque;
use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::sys;

/// Name of the demo service's binary.
pub const SERVICE_BIN: &str = "handoff-demo";
/// How long the supervisor may take to report its listener and its first process.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Lines of the supervisor's stderr kept for error messages.
const LOG_LINES: usize = 200;

/// Finds the service binary: `explicit` if given, else `handoff-demo` next to this
/// executable (as `cargo build` lays them out), else on `PATH`.
pub fn find_service(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        let p = std::path::absolute(p).with_context(|| format!("--service {}", p.display()))?;
        if !is_executable(&p) {
            bail!("--service {}: no executable file there", p.display());
        }
        return Ok(p);
    }
    let exe = std::env::current_exe().context("finding this executable's path")?;
    let sibling = exe.with_file_name(SERVICE_BIN);
    if is_executable(&sibling) {
        return Ok(sibling);
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path).filter(|d| d.is_absolute()) {
            let candidate = dir.join(SERVICE_BIN);
            if is_executable(&candidate) {
                return Ok(candidate);
            }
        }
    }
    bail!(
        "cannot find the demo service `{SERVICE_BIN}`: it is neither next to {} nor on PATH.\n  \
         Build both binaries with `cargo build --release --workspace`, then run \
         `target/release/handoff demo` (or pass --service PATH).",
        exe.display()
    )
}

fn is_executable(p: &Path) -> bool {
    fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// A private temporary directory with `run/` (sockets) and `state/` (state lock, journal,
/// the demo's store). Removed on drop.
pub struct Scratch {
    pub root: PathBuf,
    pub runtime: PathBuf,
    pub state: PathBuf,
    removed: bool,
}

impl Scratch {
    pub fn create() -> Result<Scratch> {
        let mut base = std::env::temp_dir();
        // Unix socket paths are limited to ~104 bytes: prefer /tmp to a long TMPDIR.
        if base.as_os_str().len() > 60 {
            base = PathBuf::from("/tmp");
        }
        sweep_stale(&base);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let mut last_err = None;
        for attempt in 0..100u32 {
            let root = base.join(format!(
                "handoff-demo.{}.{:x}",
                std::process::id(),
                nanos.wrapping_add(attempt.wrapping_mul(0x9E37_79B9))
            ));
            match fs::DirBuilder::new().mode(0o700).create(&root) {
                Ok(()) => {
                    let scratch = Scratch {
                        runtime: root.join("run"),
                        state: root.join("state"),
                        root,
                        removed: false,
                    };
                    for dir in [&scratch.runtime, &scratch.state] {
                        fs::DirBuilder::new()
                            .mode(0o700)
                            .create(dir)
                            .with_context(|| format!("creating {}", dir.display()))?;
                    }
                    return Ok(scratch);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last_err = Some(e),
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("creating a directory in {}", base.display()))
                }
            }
        }
        Err(anyhow!("{last_err:?}")).with_context(|| format!("no free name in {}", base.display()))
    }

    /// Removes the directory now, reporting failure.
    pub fn remove(mut self) -> Result<()> {
        self.removed = true;
        fs::remove_dir_all(&self.root).with_context(|| format!("removing {}", self.root.display()))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !self.removed {
            let _ = fs::remove_dir_all(&self.root);
        }
    }
}

/// Removes scratch directories of earlier demos whose process is gone (killed with
/// SIGKILL, say, it could not clean up). Only ours: `handoff-demo.<pid>.<suffix>`, owned
/// by our uid, with no process `<pid>`.
fn sweep_stale(base: &Path) {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = fs::read_dir(base) else {
        return;
    };
    let uid = nix::unistd::geteuid().as_raw();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("handoff-demo."))
            .and_then(|rest| rest.split_once('.'))
            .and_then(|(pid, _)| pid.parse::<i32>().ok())
            .filter(|p| *p > 0)
        else {
            continue;
        };
        let ours = fs::symlink_metadata(entry.path()).is_ok_and(|m| m.is_dir() && m.uid() == uid);
        let gone = matches!(kill(Pid::from_raw(pid), None), Err(nix::Error::ESRCH));
        if ours && gone {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// The last lines a child printed on stderr.
#[derive(Clone, Default)]
struct LogTail {
    lines: Arc<Mutex<VecDeque<String>>>,
    done: Arc<AtomicBool>,
}

impl LogTail {
    fn follow(pipe: impl Read + Send + 'static) -> LogTail {
        let tail = LogTail::default();
        let t = tail.clone();
        // Best effort: without the thread we only lose the log, and the pipe's buffer
        // could fill, so say so.
        let spawned = thread::Builder::new()
            .name("supervisor-stderr".into())
            .spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    let mut lines = t.lines.lock().unwrap_or_else(|p| p.into_inner());
                    if lines.len() == LOG_LINES {
                        lines.pop_front();
                    }
                    lines.push_back(line);
                }
                t.done.store(true, Ordering::Relaxed);
            });
        if let Err(e) = spawned {
            eprintln!("handoff demo: cannot follow the supervisor's stderr: {e}");
        }
        tail
    }

    fn last(&self, n: usize) -> Vec<String> {
        let lines = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        lines
            .iter()
            .skip(lines.len().saturating_sub(n))
            .cloned()
            .collect()
    }

    /// Waits (briefly) until the writer closed the pipe, so an error message carries the
    /// supervisor's last words.
    fn settle(&self, within: Duration) {
        let end = Instant::now() + within;
        while !self.done.load(Ordering::Relaxed) && Instant::now() < end {
            thread::sleep(Duration::from_millis(10));
        }
    }
}

/// How stopping the supervisor went.
#[derive(Debug, Clone)]
pub struct Stopped {
    pub status: Option<ExitStatus>,
    /// It did not exit within the grace after SIGTERM and was SIGKILLed.
    pub killed: bool,
}

/// A running `handoff run`, started by the demo. Dropping it stops it.
pub struct SupervisorProc {
    child: Child,
    pub pid: u32,
    /// The address of its `http` listener.
    pub addr: SocketAddr,
    /// The first service process, from `ready pid=N`.
    pub first_pid: u32,
    log: LogTail,
    stopped: Option<Stopped>,
}

impl SupervisorProc {
    /// Starts `<handoff> run --runtime-dir … --state-dir … --listen http=tcp://127.0.0.1:0
    /// -- <service>` and waits (bounded) for `listening http=…` and `ready pid=…`.
    pub fn start(handoff: &Path, service: &Path, scratch: &Scratch) -> Result<SupervisorProc> {
        let mut cmd = Command::new(handoff);
        cmd.arg("run")
            .arg("--runtime-dir")
            .arg(&scratch.runtime)
            .arg("--state-dir")
            .arg(&scratch.state)
            .args(["--listen", "http=tcp://127.0.0.1:0", "--"])
            .arg(service)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group: Ctrl-C at the terminal is ours to handle (stop the
            // load first, then the supervisor), not an instant stop under load.
            .process_group(0);
        sys::stop_child_with_parent(&mut cmd);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {} run", handoff.display()))?;
        let pid = child.id();
        let log = child.stderr.take().map(LogTail::follow).unwrap_or_default();
        let lines = match child.stdout.take() {
            Some(out) => follow_stdout(out),
            None => mpsc::channel().1,
        };
        let mut sup = SupervisorProc {
            child,
            pid,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            first_pid: 0,
            log,
            stopped: None,
        };
        // From here on an error drops `sup`, which stops the supervisor.
        match sup.await_ready(&lines) {
            Ok(()) => Ok(sup),
            Err(e) => {
                let exited = sup.child.try_wait().ok().flatten();
                sup.log.settle(Duration::from_millis(500));
                let log = sup.log_tail(30);
                let mut msg = format!("{e:#}");
                if let Some(status) = exited {
                    msg.push_str(&format!(" (it exited: {status})"));
                }
                if log.is_empty() {
                    msg.push_str("; it printed nothing on stderr");
                } else {
                    msg.push_str("; its stderr:\n    ");
                    msg.push_str(&log.join("\n    "));
                }
                Err(anyhow!(msg))
            }
        }
    }

    fn await_ready(&mut self, lines: &Receiver<String>) -> Result<()> {
        let end = Instant::now() + START_TIMEOUT;
        let mut addr = None;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            let line = match lines.recv_timeout(left) {
                Ok(line) => line,
                Err(RecvTimeoutError::Timeout) => bail!(
                    "the supervisor did not report `listening http=…` and `ready pid=…` \
                     within {START_TIMEOUT:?}"
                ),
                Err(RecvTimeoutError::Disconnected) => {
                    bail!("the supervisor stopped before reporting `ready pid=…`")
                }
            };
            if let Some(rest) = line.strip_prefix("listening http=tcp://") {
                let a = rest.trim();
                addr =
                    Some(a.parse::<SocketAddr>().with_context(|| {
                        format!("bad listener address {a:?} from the supervisor")
                    })?);
            } else if let Some(rest) = line.strip_prefix("ready pid=") {
                self.first_pid = rest
                    .trim()
                    .parse()
                    .with_context(|| format!("bad pid in {line:?} from the supervisor"))?;
                self.addr = addr
                    .ok_or_else(|| anyhow!("the supervisor reported `ready` before `listening`"))?;
                return Ok(());
            }
        }
    }

    /// The supervisor's last `n` lines on stderr (its own and its service's).
    pub fn log_tail(&self, n: usize) -> Vec<String> {
        self.log.last(n)
    }

    /// Its exit status, if it has exited (unexpectedly, while the demo runs).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if let Some(s) = &self.stopped {
            return s.status;
        }
        self.child.try_wait().ok().flatten()
    }

    /// SIGTERM (the supervisor's graceful stop: it stops its service), then waits up to
    /// `grace`, then SIGKILL. Idempotent.
    pub fn stop(&mut self, grace: Duration) -> Stopped {
        if let Some(s) = &self.stopped {
            return s.clone();
        }
        let mut status = self.child.try_wait().ok().flatten();
        let mut killed = false;
        if status.is_none() {
            if let Ok(p) = i32::try_from(self.pid) {
                // Not yet reaped, so the pid is still this process.
                let _ = kill(Pid::from_raw(p), Signal::SIGTERM);
            }
            let end = Instant::now() + grace;
            while status.is_none() && Instant::now() < end {
                thread::sleep(Duration::from_millis(10));
                status = self.child.try_wait().ok().flatten();
            }
            if status.is_none() {
                killed = true;
                let _ = self.child.kill();
                status = self.child.wait().ok();
            }
        }
        let stopped = Stopped { status, killed };
        self.stopped = Some(stopped.clone());
        stopped
    }
}

impl Drop for SupervisorProc {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(10));
    }
}

/// Forwards the supervisor's stdout lines to a channel and keeps draining the pipe after
/// nobody listens any more (a full pipe would block its next print).
fn follow_stdout(pipe: impl Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    let spawned = thread::Builder::new()
        .name("supervisor-stdout".into())
        .spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
    if let Err(e) = spawned {
        // The sender went with the closure: the receiver reports Disconnected at once.
        eprintln!("handoff demo: cannot follow the supervisor's stdout: {e}");
    }
    rx
}
