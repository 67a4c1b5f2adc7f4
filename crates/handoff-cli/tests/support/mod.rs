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
#![allow(unused_imports)]

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
/// `cargo test --workspace` behaves like `--test-threads=1` for these tests (the light
/// ones, [`LIGHT`], have a lock of their own).
///
/// Scripts and copies of binaries that tests execute are written through a child process
/// ([`write_executable`]): a test writing one while another test's thread forks would
/// otherwise leave the write descriptor open in that child for an instant, and an exec of
/// the file then fails with ETXTBSY.
static SERIAL: Mutex<()> = Mutex::new(());

/// Serializes the *light* end-to-end tests ([`begin_light_test`]) among themselves; each
/// runs beside whichever [`SERIAL`] test is running.
static LIGHT: Mutex<()> = Mutex::new(());

/// Pids of supervisors currently running, so the watchdog can kill their process trees
/// before aborting the test process (an abort runs no destructors).
static LIVE_SUPERVISORS: Mutex<Vec<u32>> = Mutex::new(Vec::new());

/// Held for the whole duration of an end-to-end test: see [`begin_test`].
pub struct TestGuard {
    // Field order matters: the timing is taken and the watchdog disarmed before the lock
    // is released.
    _timing: Timing,
    _watchdog: Watchdog,
    _serial: MutexGuard<'static, ()>,
}

/// With `HANDOFF_TEST_TIMINGS=FILE`, each end-to-end test appends `SECONDS NAME CPU` to FILE
/// when it ends (pass or fail): how the suite's wall time is found and kept down
/// (`sort -rn FILE | head`). CPU is the seconds of CPU the test process and the processes
/// it reaped used meanwhile: a long test that uses little of it waits on timers. The
/// figure is process-wide, so a light test ([`begin_light_test`]) and the serialized test
/// beside it each count the other's too; measure one alone (a name filter) to classify it.
struct Timing {
    name: String,
    started: Instant,
    cpu: Duration,
}

/// CPU used so far by this process and the children it has reaped.
fn cpu_used() -> Duration {
    use nix::sys::resource::{getrusage, UsageWho};
    [UsageWho::RUSAGE_SELF, UsageWho::RUSAGE_CHILDREN]
        .into_iter()
        .filter_map(|who| getrusage(who).ok())
        .map(|u| {
            let t = |tv: nix::sys::time::TimeVal| {
                Duration::new(tv.tv_sec().max(0) as u64, tv.tv_usec().max(0) as u32 * 1000)
            };
            t(u.user_time()) + t(u.system_time())
        })
        .sum()
}

impl Drop for Timing {
    fn drop(&mut self) {
        let Some(path) = std::env::var_os("HANDOFF_TEST_TIMINGS") else {
            return;
        };
        let line = format!(
            "{:.2} {} {:.2}\n",
            self.started.elapsed().as_secs_f64(),
            self.name,
            cpu_used().saturating_sub(self.cpu).as_secs_f64()
        );
        // Best effort: a timing file that cannot be written must not fail the test.
        if let Ok(mut f) = fs::OpenOptions::new().create(true).append(true).open(path) {
            let _ = f.write_all(line.as_bytes());
        }
    }
}

/// Starts an end-to-end test: takes the serialization lock (a previous test's panic does not
/// poison it for the others) and arms a watchdog that, if the test runs longer than
/// `limit`, kills every supervisor's process tree and aborts the test process with a
/// message. Bind it first (`let _guard = begin_test(..)`) so it is dropped last.
pub fn begin_test(name: &str, limit: Duration) -> TestGuard {
    guard(&SERIAL, name, limit)
}

/// [`begin_test`] for a test that mostly waits on timers of the code under test (an abort
/// grace, a request budget, a restart back-off): measured at a few percent of a core
/// (`HANDOFF_TEST_TIMINGS`' CPU column), with bounds of seconds in its assertions. Light
/// tests run one at a time among themselves, but each beside the [`begin_test`] test in
/// progress, which barely notices it: about a minute less of the suite's wall time on 2
/// cores. A test that drives load, counts on a quiet machine, or changes anything
/// process-wide (limits, signal dispositions) is not light.
pub fn begin_light_test(name: &str, limit: Duration) -> TestGuard {
    guard(&LIGHT, name, limit)
}

fn guard(lock: &'static Mutex<()>, name: &str, limit: Duration) -> TestGuard {
    let serial = lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    TestGuard {
        _timing: Timing {
            name: name.to_owned(),
            started: Instant::now(),
            cpu: cpu_used(),
        },
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
/// An example service binary (`examples/*`), a sibling of `handoff` in the
/// target dir.
pub fn example(name: &str) -> PathBuf {
    let p = handoff_bin().with_file_name(name);
    assert!(
        p.is_file(),
        "{} is missing: build it with `cargo test --workspace` (or `cargo build -p {name}`)",
        p.display()
    );
    p
}

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
    /// Pass exactly the extra arguments after `run` (no --runtime-dir,
    /// --state-dir, --listen or program): for a `--config` file that says
    /// them all. The runtime dir given to `start_with` must still match.
    pub only_extra_args: bool,
    /// Lower `RLIMIT_NOFILE` (soft and hard) of `handoff run`, and so of the
    /// services it spawns, to this many descriptors.
    pub nofile: Option<u64>,
    /// Signals `handoff run` starts with ignored (SIG_IGN survives exec), as
    /// when it is started by `nohup` or as a background job of a script.
    pub ignored_signals: Vec<Signal>,
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

/// Pids holding an `flock` on `path`, from `/proc/locks` (matched by device
/// and inode: an inode number alone can be another filesystem's file, e.g.
/// a concurrent test's tmpfs).
pub fn lock_holders(path: &Path) -> Vec<u32> {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = fs::metadata(path) else {
        return vec![];
    };
    let dev = meta.dev();
    // /proc/locks prints "MAJOR:MINOR:INODE", the device numbers in hex.
    let want = format!(
        "{:02x}:{:02x}:{}",
        nix::sys::stat::major(dev),
        nix::sys::stat::minor(dev),
        meta.ino()
    );
    fs::read_to_string("/proc/locks")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // "1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF"
            let (kind, pid, dev_ino) = (*f.get(1)?, *f.get(4)?, *f.get(5)?);
            (kind == "FLOCK" && dev_ino == want)
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
        write_executable(&path, wrapper_script(fault).as_bytes());
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
        write_executable(&path, script.as_bytes());
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
/// Writes an executable file (a script, a copy of a binary) at `path`, which must not
/// exist, through a child process (`install -m 0755`): see [`SERIAL`] for why not with a
/// write of this process.
pub fn write_executable(path: &Path, content: &[u8]) {
    let src = PathBuf::from(format!("{}.src", path.display()));
    write_file(&src, content, 0o600);
    let out = Command::new("install")
        .arg("-m")
        .arg("0755")
        .arg(&src)
        .arg(path)
        .output()
        .unwrap_or_else(|e| panic!("run install(1) for {}: {e}", path.display()));
    assert!(
        out.status.success(),
        "install(1) {} -> {}: {}\n{}",
        src.display(),
        path.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = fs::remove_file(&src);
}

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

mod process;
mod procfs;
pub use process::*;
pub use procfs::*;

// ---------------------------------------------------------------------------------------
// HTTP client and load generator (handoff-load: shared with `handoff demo` and the bench)
// ---------------------------------------------------------------------------------------

// Each test binary uses a different subset.
#[allow(unused_imports)]
pub use handoff_load::blocking::{
    get_version, serving_pid, verify_acked, Client, Conn, Load, LoadReport, RequestError, Response,
    IO_TIMEOUT,
};
#[allow(unused_imports)]
pub use handoff_load::failure::Failure;
#[allow(unused_imports)]
pub use handoff_load::generator::value_for;

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
