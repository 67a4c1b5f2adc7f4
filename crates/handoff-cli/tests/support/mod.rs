//! Shared helpers for the end-to-end tests of the `handoff` binary.
//!
//! The tests drive the real binaries (`handoff run`, `handoff upgrade`, `handoff-demo`) as
//! black boxes, exactly as an operator would, and judge them only by what a client and the
//! kernel can observe: HTTP responses, connection errors, and `/proc`.
//!
//! Ground rules this module exists to enforce:
//! - **No bare sleeps.** Every wait is a bounded poll of an observable condition
//!   ([`wait_until`] / [`poll_until`]); this module is the only place that sleeps, and only
//!   between polls. A slow machine makes tests slower, never wrong.
//! - **Every failure is classified.** The HTTP client ([`Conn`], [`Client`]) distinguishes
//!   refused / reset / EOF-before-response / EOF-mid-response / timeout, because the product
//!   promise is precisely "no refused, no reset, no lost request", and the one benign case
//!   (a server closing an idle keep-alive connection, RFC 9112 §9.3.1) must be told apart from
//!   the rest.
//! - **Nothing leaks past a test.** [`Supervisor`]'s `Drop` kills the whole process tree, and
//!   [`begin_test`] arms a watchdog that kills it too (then aborts) if a test hangs.
#![allow(dead_code)] // Each test binary uses a different subset of the helpers.

use std::fmt;
use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

/// How often [`poll_until`] re-checks its condition.
pub const POLL_INTERVAL: Duration = Duration::from_millis(10);
/// How long `handoff run` may take to print `listening …` and `ready pid=…`.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Upper bound for one `handoff upgrade` invocation (its own default deadline is minutes;
/// the tests never need more than a few seconds).
pub const UPGRADE_TIMEOUT: Duration = Duration::from_secs(90);

// ---------------------------------------------------------------------------------------
// Waiting
// ---------------------------------------------------------------------------------------

/// Polls `f` every [`POLL_INTERVAL`] until it returns true (→ `true`) or `deadline` has
/// elapsed (→ `false`). `f` is always evaluated at least once, and once more after the
/// deadline, so a condition that became true during the last sleep is not missed.
pub fn poll_until(deadline: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + deadline;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= end {
            return f();
        }
        thread::sleep(POLL_INTERVAL);
    }
}

/// Waits until `f` returns true, panicking with `what` (and the deadline) on timeout.
///
/// This is the only sanctioned way for a test to wait for something: it states the
/// condition it waits for, and fails loudly instead of hanging or racing.
pub fn wait_until(deadline: Duration, what: &str, f: impl FnMut() -> bool) {
    if !poll_until(deadline, f) {
        panic!("timed out after {deadline:?} waiting until {what}");
    }
}

// ---------------------------------------------------------------------------------------
// Test guard: serialization + watchdog
// ---------------------------------------------------------------------------------------

/// Serializes the end-to-end tests within one test binary. They are timing-sensitive
/// (deadlines of 2 s, load generators saturating a 2-core machine), so `cargo test` running
/// them on parallel threads would only add flakiness; with the lock, a plain
/// `cargo test --workspace` behaves like `--test-threads=1` for these tests.
///
/// It also removes a classic source of flakiness: a test writing a wrapper script while
/// another test thread forks could leave the script's write fd open in that child for an
/// instant, and exec'ing it would fail with ETXTBSY.
static SERIAL: Mutex<()> = Mutex::new(());

/// Pids of supervisors currently running, so the watchdog can kill their process trees
/// before aborting the test process (an abort runs no destructors).
static LIVE_SUPERVISORS: Mutex<Vec<u32>> = Mutex::new(Vec::new());

/// Held for the whole duration of an end-to-end test: see [`begin_test`].
pub struct TestGuard {
    // Field order matters: the watchdog is disarmed before the lock is released.
    _watchdog: Watchdog,
    _serial: MutexGuard<'static, ()>,
}

/// Starts an end-to-end test: takes the serialization lock (a previous test's panic does not
/// poison it for the others) and arms a watchdog that, if the test runs longer than
/// `limit`, kills every supervisor's process tree and aborts the test process with a
/// message. Bind it first (`let _guard = begin_test(..)`) so it is dropped last.
pub fn begin_test(name: &str, limit: Duration) -> TestGuard {
    let serial = SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    TestGuard {
        _watchdog: Watchdog::arm(name, limit),
        _serial: serial,
    }
}

/// A thread that aborts the process if it is not disarmed (dropped) within its limit.
struct Watchdog {
    // Dropping the sender disconnects the channel, which wakes and ends the thread.
    _disarm: mpsc::Sender<()>,
}

impl Watchdog {
    fn arm(name: &str, limit: Duration) -> Watchdog {
        let (tx, rx) = mpsc::channel::<()>();
        let name = name.to_owned();
        thread::Builder::new()
            .name(format!("watchdog-{name}"))
            .spawn(move || {
                if let Err(RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
                    let pids: Vec<u32> = LIVE_SUPERVISORS
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .clone();
                    eprintln!(
                        "WATCHDOG: test `{name}` exceeded {limit:?}; killing supervisors \
                         {pids:?} and their descendants, then aborting"
                    );
                    for pid in pids {
                        kill_tree(pid);
                    }
                    std::process::abort();
                }
            })
            .expect("spawn watchdog thread");
        Watchdog { _disarm: tx }
    }
}

// ---------------------------------------------------------------------------------------
// Binaries and scratch directories
// ---------------------------------------------------------------------------------------

/// Path of the `handoff` binary under test (built by cargo for this test crate).
pub fn handoff_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_handoff"))
}

/// Path of the `handoff-demo` binary: a sibling of `handoff` in the target directory.
///
/// Cargo only builds the binaries of the crate under test, so `cargo test -p handoff-cli`
/// alone does not build it; `cargo test --workspace` (the documented command) does.
pub fn demo_bin() -> PathBuf {
    let path = handoff_bin().with_file_name("handoff-demo");
    if !path.is_file() {
        panic!(
            "{} does not exist: the end-to-end tests need the demo service. Run \
             `cargo build --workspace` first (or test with `cargo test --workspace`, which \
             builds it).",
            path.display()
        );
    }
    path
}

/// Options for [`Supervisor::start_with`].
#[derive(Debug, Default, Clone)]
pub struct StartOpts {
    pub env: Vec<(String, String)>,
    pub subreaper: bool,
}

/// An example binary of this package (built by `cargo test --workspace`).
pub fn example_bin(name: &str) -> PathBuf {
    let p = handoff_bin()
        .parent()
        .expect("bin dir")
        .join("examples")
        .join(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo test --workspace` (it builds examples)",
        p.display()
    );
    p
}

/// Pids holding an `flock` on `path`, from `/proc/locks` (matched by inode).
pub fn lock_holders(path: &Path) -> Vec<u32> {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = fs::metadata(path) else {
        return vec![];
    };
    let ino = meta.ino().to_string();
    fs::read_to_string("/proc/locks")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // "1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF"
            let (kind, pid, dev_ino) = (*f.get(1)?, *f.get(4)?, *f.get(5)?);
            (kind == "FLOCK" && dev_ino.rsplit(':').next() == Some(ino.as_str()))
                .then(|| pid.parse().ok())
                .flatten()
        })
        .collect()
}

/// A scratch directory per test, holding the supervisor's runtime and state dirs and any
/// wrapper scripts. Removed on drop.
pub struct TestDirs {
    pub root: tempfile::TempDir,
    /// Runtime dir (control and admin sockets). Created 0700, as the design requires.
    pub runtime: PathBuf,
    /// State dir (state lock, journal, the demo's store).
    pub state: PathBuf,
}

impl TestDirs {
    pub fn new() -> TestDirs {
        // Short prefix under /tmp: Unix socket paths are limited to ~108 bytes.
        let root = tempfile::Builder::new()
            .prefix("hoe2e")
            .tempdir()
            .expect("create temp dir");
        let runtime = root.path().join("run");
        let state = root.path().join("state");
        for dir in [&runtime, &state] {
            fs::DirBuilder::new()
                .mode(0o700)
                .create(dir)
                .unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        }
        TestDirs {
            root,
            runtime,
            state,
        }
    }

    /// Writes an executable wrapper script that runs the real demo with
    /// `HANDOFF_DEMO_FAULT=<fault>` and returns its path. Usable as `--binary` for
    /// `handoff upgrade` or as PROGRAM for `handoff run`; `exec` keeps the pid, so the
    /// supervisor sees the demo itself as its child.
    pub fn fault_wrapper(&self, fault: &str) -> PathBuf {
        let path = self.root.path().join(format!("demo-{fault}.sh"));
        write_file(&path, wrapper_script(fault).as_bytes(), 0o755);
        path
    }

    /// Writes an executable wrapper that runs the real demo with extra
    /// environment variables (e.g. `HANDOFF_CRASH_AT`), keeping its pid.
    pub fn env_wrapper(&self, name: &str, vars: &[(&str, &str)]) -> PathBuf {
        let demo = demo_bin();
        let demo = demo.to_str().expect("demo path is UTF-8");
        let mut script = String::from("#!/bin/sh\n");
        for (k, v) in vars {
            assert!(
                !v.contains('\''),
                "value must not contain a single quote: {v}"
            );
            script.push_str(&format!("export {k}='{v}'\n"));
        }
        script.push_str(&format!("exec '{demo}' \"$@\"\n"));
        let path = self.root.path().join(format!("demo-{name}.sh"));
        write_file(&path, script.as_bytes(), 0o755);
        path
    }

    /// Writes a file with the same content as a wrapper but mode 0644: a "binary" that
    /// exists and is not executable.
    pub fn non_executable(&self) -> PathBuf {
        let path = self.root.path().join("not-executable.sh");
        write_file(&path, wrapper_script("none").as_bytes(), 0o644);
        path
    }
}

impl Default for TestDirs {
    fn default() -> Self {
        TestDirs::new()
    }
}

fn wrapper_script(fault: &str) -> String {
    let demo = demo_bin();
    let demo = demo.to_str().expect("demo path is UTF-8");
    assert!(
        !demo.contains('\''),
        "demo path must not contain a single quote: {demo}"
    );
    format!("#!/bin/sh\nexport HANDOFF_DEMO_FAULT={fault}\nexec '{demo}' \"$@\"\n")
}

/// Creates `path` with `mode`, writes `content`, syncs and closes it before returning, so
/// nothing holds it open for writing when it is later exec'ed.
fn write_file(path: &Path, content: &[u8], mode: u32) {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.write_all(content).expect("write file");
    f.sync_all().expect("sync file");
}

// ---------------------------------------------------------------------------------------
// /proc helpers
// ---------------------------------------------------------------------------------------

/// The fields of `/proc/PID/stat` the tests care about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    pub pid: u32,
    /// `R`, `S`, `D`, `T`, `Z` (zombie), …
    pub state: char,
    pub ppid: u32,
}

/// Parses a `/proc/PID/stat` line. The second field is the command name in parentheses and
/// may itself contain spaces and parentheses, so the fixed fields are taken after the
/// *last* `)`.
pub fn parse_stat(line: &str) -> Option<ProcStat> {
    let open = line.find('(')?;
    let pid = line[..open].trim().parse().ok()?;
    let close = line.rfind(')')?;
    let mut rest = line.get(close + 1..)?.split_ascii_whitespace();
    let state = rest.next()?.chars().next()?;
    let ppid = rest.next()?.parse().ok()?;
    Some(ProcStat { pid, state, ppid })
}

/// `/proc/PID/stat` of one process, or `None` if it does not exist (any more).
pub fn proc_stat(pid: u32) -> Option<ProcStat> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

/// One snapshot of every process on the system (processes may vanish mid-scan; those are
/// skipped).
pub fn all_processes() -> Vec<ProcStat> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(proc_stat)
        .collect()
}

/// Direct children of `pid` (zombies included), sorted.
pub fn children_of(pid: u32) -> Vec<u32> {
    let mut kids: Vec<u32> = all_processes()
        .into_iter()
        .filter(|p| p.ppid == pid)
        .map(|p| p.pid)
        .collect();
    kids.sort_unstable();
    kids
}

/// Children of `pid` with their state, for diagnostics.
pub fn children_with_state(pid: u32) -> Vec<(u32, char)> {
    let mut kids: Vec<(u32, char)> = all_processes()
        .into_iter()
        .filter(|p| p.ppid == pid)
        .map(|p| (p.pid, p.state))
        .collect();
    kids.sort_unstable();
    kids
}

/// Every descendant of `pid` (children, grandchildren, …), from one /proc snapshot.
pub fn descendants_of(pid: u32) -> Vec<u32> {
    let procs = all_processes();
    let mut found = Vec::new();
    let mut frontier = vec![pid];
    while let Some(parent) = frontier.pop() {
        for p in procs.iter().filter(|p| p.ppid == parent) {
            if !found.contains(&p.pid) {
                found.push(p.pid);
                frontier.push(p.pid);
            }
        }
    }
    found
}

/// The process state character (`Z` = zombie), or `None` if the process is gone.
pub fn process_state(pid: u32) -> Option<char> {
    proc_stat(pid).map(|s| s.state)
}

pub fn is_zombie(pid: u32) -> bool {
    process_state(pid) == Some('Z')
}

/// Number of open file descriptors of `pid` (entries of `/proc/PID/fd`), or `None` if the
/// process is gone or not ours.
pub fn count_open_fds(pid: u32) -> Option<usize> {
    Some(fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

/// SIGKILLs `pid` and every descendant. The supervisor is stopped (SIGSTOP) first so it
/// cannot spawn anything new, and the descendants are collected *before* it is killed:
/// once it dies its children are re-parented and could no longer be found through it.
/// Service processes run in their own process groups, so each is killed by pid.
pub fn kill_tree(pid: u32) {
    if kill(Pid::from_raw(pid as i32), Signal::SIGSTOP).is_ok() {
        // A stopped process shows `T`; a bounded wait, since delivery is asynchronous.
        poll_until(Duration::from_secs(1), || {
            !matches!(process_state(pid), Some('R' | 'S' | 'D'))
        });
    }
    let descendants = descendants_of(pid);
    let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
    for d in descendants {
        let _ = kill(Pid::from_raw(d as i32), Signal::SIGKILL);
    }
}

// ---------------------------------------------------------------------------------------
// HTTP client and load generator (shared with `handoff demo`)
// ---------------------------------------------------------------------------------------

// Each test binary uses a different subset.
#[allow(unused_imports)]
pub use handoff_cli::load::{
    get_version, serving_pid, value_for, verify_acked, Client, Conn, Failure, Load, LoadReport,
    RequestError, Response, IO_TIMEOUT,
};

/// Test-side conveniences over the library's [`Load`]: waits that fail the test loudly.
pub trait LoadExt {
    /// Waits until at least `n` more requests succeed: proof the service is serving the
    /// load, not merely answering a probe. Panics with `what` on timeout.
    fn wait_progress(&self, n: u64, within: Duration, what: &str);
}

impl LoadExt for Load {
    fn wait_progress(&self, n: u64, within: Duration, what: &str) {
        if !self.wait_for_ok(n, within) {
            panic!(
                "timed out after {within:?} waiting until {n} more load requests succeed \
                 ({what})\n{}",
                self.snapshot()
            );
        }
    }
}

/// Test-side assertion over the library's [`LoadReport`].
pub trait LoadReportExt {
    /// Panics (with the full report) unless every request succeeded and some did.
    fn assert_clean(&self);
}

impl LoadReportExt for LoadReport {
    fn assert_clean(&self) {
        assert!(
            self.failure_count() == 0 && self.ok > 0,
            "load saw failures (or made no progress):\n{self}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// The supervisor process
// ---------------------------------------------------------------------------------------

/// A running `handoff run` with the demo (or a wrapper) as its service, listening on one
/// TCP listener named `http` on an ephemeral loopback port.
///
/// Dropping it kills the supervisor and every descendant (see [`kill_tree`]) and reaps the
/// supervisor, so a failing test leaves no processes behind.
pub struct Supervisor {
    child: Child,
    /// Pid of `handoff run`.
    pub pid: u32,
    /// The real address of the `http` listener.
    pub addr: SocketAddr,
    /// Pid of the first incumbent, from `ready pid=N`.
    pub first_pid: u32,
    pub runtime_dir: PathBuf,
    /// Lines printed on stdout after `ready` (the reader keeps draining the pipe).
    stdout_lines: Receiver<String>,
    /// Everything printed on stderr so far, for failure messages.
    stderr_log: Arc<Mutex<String>>,
}

impl Supervisor {
    /// Spawns `handoff run --runtime-dir R --state-dir S --listen http=tcp://127.0.0.1:0
    /// EXTRA… -- PROGRAM` and waits (at most [`START_TIMEOUT`]) for it to report its listener
    /// and its first incumbent.
    pub fn start(
        runtime_dir: &Path,
        state_dir: &Path,
        program: &Path,
        extra_args: &[&str],
    ) -> Supervisor {
        Self::start_with(
            runtime_dir,
            state_dir,
            program,
            extra_args,
            &StartOpts::default(),
        )
    }

    /// [`start`](Self::start) with extra environment for `handoff run` (and so for the
    /// services it spawns), optionally under `examples/subreaper` so that processes
    /// orphaned by a supervisor crash are reaped (pid 1 here does not reap).
    pub fn start_with(
        runtime_dir: &Path,
        state_dir: &Path,
        program: &Path,
        extra_args: &[&str],
        opts: &StartOpts,
    ) -> Supervisor {
        let mut cmd = if opts.subreaper {
            let mut c = Command::new(example_bin("subreaper"));
            c.arg(handoff_bin());
            c
        } else {
            Command::new(handoff_bin())
        };
        cmd.envs(opts.env.iter().map(|(k, v)| (k, v)));
        cmd.arg("run")
            .arg("--runtime-dir")
            .arg(runtime_dir)
            .arg("--state-dir")
            .arg(state_dir)
            .args(["--listen", "http=tcp://127.0.0.1:0"])
            .args(extra_args)
            .arg("--")
            .arg(program)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: the closure runs between fork and exec and only calls prctl(2), which is
        // async-signal-safe; it allocates nothing and takes no lock.
        unsafe {
            cmd.pre_exec(|| {
                // If the test process dies without running destructors (killed by the CI
                // runner, say), take the supervisor down with it.
                nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(io::Error::from)
            });
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", handoff_bin().display()));
        let pid = child.id();
        LIVE_SUPERVISORS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(pid);

        let stderr_log = Arc::new(Mutex::new(String::new()));
        spawn_stderr_reader(child.stderr.take().expect("piped stderr"), &stderr_log);
        let stdout_lines = spawn_stdout_reader(child.stdout.take().expect("piped stdout"));

        let mut sup = Supervisor {
            child,
            pid,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            first_pid: 0,
            runtime_dir: runtime_dir.to_owned(),
            stdout_lines,
            stderr_log,
        };
        // From here on a panic drops `sup`, which kills the process tree.
        let end = Instant::now() + START_TIMEOUT;
        let mut addr = None;
        let mut seen = Vec::new();
        loop {
            let left = end.saturating_duration_since(Instant::now());
            let line = match sup.stdout_lines.recv_timeout(left) {
                Ok(line) => line,
                Err(RecvTimeoutError::Timeout) => panic!(
                    "`handoff run` did not report `listening http=…` and `ready pid=…` within \
                     {START_TIMEOUT:?}; stdout so far: {seen:?}\nstderr:\n{}",
                    sup.stderr_log()
                ),
                Err(RecvTimeoutError::Disconnected) => {
                    // Stdout closed: it exited (or closed stdout, which the contract rules out).
                    let status = poll_until(Duration::from_secs(5), || {
                        matches!(sup.child.try_wait(), Ok(Some(_)))
                    });
                    panic!(
                        "`handoff run` closed stdout before `ready` (exited: {status}, {:?}); \
                         stdout: {seen:?}\nstderr:\n{}",
                        sup.child.try_wait(),
                        sup.stderr_log()
                    )
                }
            };
            if let Some(rest) = line.strip_prefix("listening http=tcp://") {
                addr = Some(
                    rest.trim()
                        .parse::<SocketAddr>()
                        .unwrap_or_else(|e| panic!("bad listener address in {line:?}: {e}")),
                );
            } else if let Some(rest) = line.strip_prefix("ready pid=") {
                sup.first_pid = rest
                    .trim()
                    .parse()
                    .unwrap_or_else(|e| panic!("bad pid in {line:?}: {e}"));
                sup.addr = addr.unwrap_or_else(|| {
                    panic!("`ready` before `listening http=…`; stdout: {seen:?}")
                });
                return sup;
            }
            seen.push(line);
        }
    }

    /// Everything the supervisor printed on stderr so far.
    pub fn stderr_log(&self) -> String {
        self.stderr_log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Stdout lines printed since `ready` that nobody has consumed yet.
    pub fn take_stdout_lines(&self) -> Vec<String> {
        self.stdout_lines.try_iter().collect()
    }

    /// Direct children of the supervisor (zombies included).
    pub fn children(&self) -> Vec<u32> {
        children_of(self.pid)
    }

    /// The pid serving `GET /version` on the `http` listener.
    pub fn serving_pid(&self) -> Result<u32, Failure> {
        serving_pid(self.addr)
    }

    /// Waits until the system has settled on `pid` as the one service process: it is the
    /// supervisor's only child (so any retiring or failed process has exited *and* been
    /// reaped — no zombie) and it answers `GET /version`.
    pub fn wait_settled(&self, pid: u32, within: Duration) {
        let settled = poll_until(within, || {
            self.children() == [pid] && self.serving_pid() == Ok(pid)
        });
        if !settled {
            panic!(
                "not settled on pid {pid} within {within:?}: supervisor {} children (pid, \
                 state) = {:?}, GET /version -> {:?}\nsupervisor stderr:\n{}",
                self.pid,
                children_with_state(self.pid),
                get_version(self.addr),
                self.stderr_log()
            );
        }
    }

    /// Runs `handoff upgrade --runtime-dir R --json EXTRA…` to completion (bounded by
    /// [`UPGRADE_TIMEOUT`]) and returns its exit code, output and parsed JSON events.
    pub fn upgrade(&self, extra: &[&str]) -> UpgradeOutcome {
        let started = Instant::now();
        let mut child = Command::new(handoff_bin())
            .arg("upgrade")
            .arg("--runtime-dir")
            .arg(&self.runtime_dir)
            .arg("--json")
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn handoff upgrade: {e}"));
        let stdout = read_all_in_background(child.stdout.take().expect("piped stdout"));
        let stderr = read_all_in_background(child.stderr.take().expect("piped stderr"));
        let mut status = None;
        let finished = poll_until(UPGRADE_TIMEOUT, || {
            status = child.try_wait().expect("wait for handoff upgrade");
            status.is_some()
        });
        if !finished {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "`handoff upgrade {extra:?}` did not finish within {UPGRADE_TIMEOUT:?}; \
                 stdout:\n{}\nstderr:\n{}\nsupervisor stderr:\n{}",
                stdout.join().unwrap_or_default(),
                stderr.join().unwrap_or_default(),
                self.stderr_log()
            );
        }
        let elapsed = started.elapsed();
        let stdout = stdout.join().expect("stdout reader");
        let stderr = stderr.join().expect("stderr reader");
        let mut events = Vec::new();
        let mut bad_lines = Vec::new();
        for line in stdout.lines().filter(|l| !l.trim().is_empty()) {
            match serde_json::from_str::<Value>(line) {
                Ok(v) if v.is_object() => events.push(v),
                _ => bad_lines.push(line.to_owned()),
            }
        }
        UpgradeOutcome {
            args: extra.iter().map(|s| s.to_string()).collect(),
            code: status.and_then(|s| s.code()),
            stdout,
            stderr,
            events,
            bad_lines,
            elapsed,
            supervisor_stderr: self.stderr_log(),
        }
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        kill_tree(self.pid);
        let _ = self.child.wait();
        LIVE_SUPERVISORS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|&p| p != self.pid);
    }
}

/// Forwards the supervisor's stdout lines to a channel, and keeps draining the pipe after
/// nobody listens any more (a full pipe would block the supervisor's next print).
fn spawn_stdout_reader(stdout: impl Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::Builder::new()
        .name("handoff-run-stdout".into())
        .spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                eprintln!("[handoff run stdout] {line}");
                let _ = tx.send(line);
            }
        })
        .expect("spawn stdout reader");
    rx
}

/// Copies the supervisor's stderr into `log` (bounded) and echoes it to the test's stderr,
/// which the test harness shows only for failing tests.
fn spawn_stderr_reader(stderr: impl Read + Send + 'static, log: &Arc<Mutex<String>>) {
    const MAX_LOG: usize = 256 * 1024;
    let log = Arc::clone(log);
    thread::Builder::new()
        .name("handoff-run-stderr".into())
        .spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("[handoff run] {line}");
                let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
                if log.len() < MAX_LOG {
                    log.push_str(&line);
                    log.push('\n');
                }
            }
        })
        .expect("spawn stderr reader");
}

fn read_all_in_background(mut pipe: impl Read + Send + 'static) -> JoinHandle<String> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = pipe.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

// ---------------------------------------------------------------------------------------
// `handoff upgrade` results
// ---------------------------------------------------------------------------------------

/// The result of one `handoff upgrade --json` run.
#[derive(Debug, Clone)]
pub struct UpgradeOutcome {
    pub args: Vec<String>,
    /// Exit code (`None` if killed by a signal): 0 committed, 1 aborted, 2 usage/connection.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    /// Every stdout line that parsed as a JSON object, in order.
    pub events: Vec<Value>,
    /// Stdout lines that were not JSON objects (the contract allows none).
    pub bad_lines: Vec<String>,
    /// Wall time of the command.
    pub elapsed: Duration,
    /// The supervisor's stderr as of the end of the command, for failure messages.
    pub supervisor_stderr: String,
}

/// Fields of the final `committed` event.
#[derive(Debug, Clone, PartialEq)]
pub struct Committed {
    pub handoff_id: String,
    pub old_pid: u32,
    pub new_pid: u32,
    pub total_ms: f64,
}

/// Fields of the final `aborted` event.
#[derive(Debug, Clone, PartialEq)]
pub struct Aborted {
    pub phase: String,
    pub reason: String,
}

impl UpgradeOutcome {
    /// Events with `"event": kind`.
    pub fn events_of(&self, kind: &str) -> Vec<&Value> {
        self.events.iter().filter(|e| e["event"] == kind).collect()
    }

    /// `(phase, took_ms)` of each `phase` event, in order.
    pub fn phases(&self) -> Vec<(String, f64)> {
        self.events_of("phase")
            .into_iter()
            .map(|e| {
                (
                    e["phase"].as_str().unwrap_or("?").to_owned(),
                    e["took_ms"].as_f64().unwrap_or(f64::NAN),
                )
            })
            .collect()
    }

    /// The final event: exactly one `committed` or `aborted`, last on stdout.
    fn final_event(&self, kind: &str) -> &Value {
        let last = self
            .events
            .last()
            .unwrap_or_else(|| panic!("no JSON events\n{self}"));
        assert_eq!(last["event"], kind, "last event is not `{kind}`\n{self}");
        let finals = self
            .events
            .iter()
            .filter(|e| e["event"] == "committed" || e["event"] == "aborted")
            .count();
        assert_eq!(finals, 1, "expected exactly one final event\n{self}");
        assert!(
            self.bad_lines.is_empty(),
            "non-JSON lines on stdout\n{self}"
        );
        last
    }

    /// Asserts the upgrade committed (exit 0, a well-formed `committed` event last) and
    /// returns the event's fields.
    pub fn expect_committed(&self) -> Committed {
        assert_eq!(self.code, Some(0), "upgrade did not commit\n{self}");
        let e = self.final_event("committed");
        let pid = |field: &str| -> u32 {
            e[field]
                .as_u64()
                .and_then(|p| u32::try_from(p).ok())
                .unwrap_or_else(|| panic!("`{field}` is not a pid in {e}\n{self}"))
        };
        Committed {
            handoff_id: e["handoff_id"]
                .as_str()
                .unwrap_or_else(|| panic!("no handoff_id in {e}\n{self}"))
                .to_owned(),
            old_pid: pid("old_pid"),
            new_pid: pid("new_pid"),
            total_ms: e["total_ms"]
                .as_f64()
                .unwrap_or_else(|| panic!("no total_ms in {e}\n{self}")),
        }
    }

    /// Asserts the upgrade aborted (exit 1, an `aborted` event last) with a reason that
    /// mentions at least one of `reason_any_of` (case-insensitive), and returns the event.
    /// (With `--json` the reason is only required in the event, not on stderr.)
    pub fn expect_aborted(&self, reason_any_of: &[&str]) -> Aborted {
        assert_eq!(
            self.code,
            Some(1),
            "upgrade did not exit 1 (aborted)\n{self}"
        );
        let e = self.final_event("aborted");
        let aborted = Aborted {
            phase: e["phase"].as_str().unwrap_or_default().to_owned(),
            reason: e["reason"]
                .as_str()
                .unwrap_or_else(|| panic!("no reason in {e}\n{self}"))
                .to_owned(),
        };
        let reason = aborted.reason.to_lowercase();
        assert!(
            reason_any_of
                .iter()
                .any(|k| reason.contains(&k.to_lowercase())),
            "abort reason {:?} mentions none of {reason_any_of:?}\n{self}",
            aborted.reason
        );
        aborted
    }
}

impl fmt::Display for UpgradeOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "`handoff upgrade --json {}` exit {:?} after {:?}",
            self.args.join(" "),
            self.code,
            self.elapsed
        )?;
        writeln!(f, "stdout:\n{}", self.stdout.trim_end())?;
        writeln!(f, "stderr:\n{}", self.stderr.trim_end())?;
        write!(
            f,
            "supervisor stderr:\n{}",
            self.supervisor_stderr.trim_end()
        )
    }
}

// ---------------------------------------------------------------------------------------
// Self-tests of the harness (no binaries needed)
// ---------------------------------------------------------------------------------------

#[cfg(test)]
mod harness_selftest {
    use super::*;

    #[test]
    fn parse_stat_handles_hostile_comm() {
        let s = parse_stat("4242 (we ird) (x) Z 17 4242 4242 0 -1 4194560 0").unwrap();
        assert_eq!(
            s,
            ProcStat {
                pid: 4242,
                state: 'Z',
                ppid: 17
            }
        );
        assert_eq!(parse_stat("garbage"), None);
        let me = proc_stat(std::process::id()).expect("own stat");
        assert_eq!(me.pid, std::process::id());
    }
}
