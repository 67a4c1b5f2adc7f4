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

use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

/// How often [`poll_until`] re-checks its condition.
pub const POLL_INTERVAL: Duration = Duration::from_millis(10);
/// Connect, read and write timeout of the HTTP client. Generous on purpose: during a handoff a
/// request may legitimately wait in the accept backlog for the whole accept gap, and on a
/// loaded 2-core CI machine that can be long; a timeout is only meant to catch a real hang.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);
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
// HTTP/1.1 client
// ---------------------------------------------------------------------------------------

/// Why a request did not produce a response. Anything but [`Failure::EofBeforeResponse`] on
/// a reused keep-alive connection is a broken promise of the product.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// `connect` got ECONNREFUSED: no listening socket at that moment.
    Refused,
    /// ECONNRESET / ECONNABORTED / EPIPE at any point.
    Reset,
    /// Orderly EOF before the first byte of the response. Benign only on a reused keep-alive
    /// connection (the server closed it while idle); on a fresh connection it is a failure.
    EofBeforeResponse,
    /// EOF after part of the response: the response was cut.
    EofMidResponse,
    /// No progress within [`IO_TIMEOUT`].
    Timeout,
    /// Anything else (malformed response, unexpected error).
    Other(String),
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Refused => f.write_str("connection refused"),
            Failure::Reset => f.write_str("connection reset"),
            Failure::EofBeforeResponse => f.write_str("EOF before any response byte"),
            Failure::EofMidResponse => f.write_str("EOF in the middle of the response"),
            Failure::Timeout => f.write_str("timed out"),
            Failure::Other(s) => write!(f, "{s}"),
        }
    }
}

/// Maps an I/O error to a [`Failure`]; `got_any` says whether any response byte had
/// arrived, which decides which kind of EOF an `UnexpectedEof` is.
fn classify(e: &io::Error, got_any: bool) -> Failure {
    use io::ErrorKind::*;
    match e.kind() {
        ConnectionRefused => Failure::Refused,
        ConnectionReset | ConnectionAborted | BrokenPipe => Failure::Reset,
        WouldBlock | TimedOut => Failure::Timeout,
        UnexpectedEof if got_any => Failure::EofMidResponse,
        UnexpectedEof => Failure::EofBeforeResponse,
        _ => Failure::Other(format!("I/O error: {e} ({:?})", e.kind())),
    }
}

/// A parsed HTTP response.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The server will close the connection after this response (`Connection: close`,
    /// HTTP/1.0 without keep-alive, or a body delimited by EOF).
    pub close: bool,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn body_str(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One blocking HTTP/1.1 connection, usable for several requests (keep-alive).
pub struct Conn {
    reader: BufReader<TcpStream>,
    host: String,
    /// Responses received on this connection; > 0 means the connection is "reused".
    responses: u64,
    /// The server announced (or performed) a close; the connection must not be used again.
    closed: bool,
}

impl Conn {
    /// Connects with [`IO_TIMEOUT`] as connect, read and write timeout.
    pub fn connect(addr: SocketAddr) -> Result<Conn, Failure> {
        let stream =
            TcpStream::connect_timeout(&addr, IO_TIMEOUT).map_err(|e| classify(&e, false))?;
        let setup = |s: &TcpStream| -> io::Result<()> {
            s.set_read_timeout(Some(IO_TIMEOUT))?;
            s.set_write_timeout(Some(IO_TIMEOUT))?;
            s.set_nodelay(true)
        };
        setup(&stream).map_err(|e| classify(&e, false))?;
        Ok(Conn {
            reader: BufReader::with_capacity(16 * 1024, stream),
            host: addr.to_string(),
            responses: 0,
            closed: false,
        })
    }

    /// Whether a response has already been received on this connection, i.e. whether an
    /// EOF before the next response may be the server closing an idle connection.
    pub fn is_reused(&self) -> bool {
        self.responses > 0
    }

    /// Whether the connection may carry another request.
    pub fn is_open(&self) -> bool {
        !self.closed
    }

    pub fn get(&mut self, path: &str) -> Result<Response, Failure> {
        self.request("GET", path, None, false)
    }

    pub fn put(&mut self, path: &str, body: &[u8]) -> Result<Response, Failure> {
        self.request("PUT", path, Some(body), false)
    }

    /// Sends one request and reads its response. `close` adds `Connection: close` (a client
    /// that wants one request per connection says so, as real clients do).
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        close: bool,
    ) -> Result<Response, Failure> {
        if self.closed {
            return Err(Failure::Other("request on a closed connection".into()));
        }
        let result = self.exchange(method, path, body, close);
        match &result {
            Ok(resp) => {
                self.responses += 1;
                if resp.close || close {
                    self.closed = true;
                }
            }
            Err(_) => self.closed = true,
        }
        result
    }

    fn exchange(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        close: bool,
    ) -> Result<Response, Failure> {
        // One buffer, one write_all: the request leaves in as few segments as possible.
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {}\r\n", self.host);
        if let Some(body) = body {
            req.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        if close {
            req.push_str("Connection: close\r\n");
        }
        req.push_str("\r\n");
        let mut bytes = req.into_bytes();
        if let Some(body) = body {
            bytes.extend_from_slice(body);
        }

        let reused = self.is_reused();
        let stream = self.reader.get_mut();
        if let Err(e) = stream.write_all(&bytes).and_then(|()| stream.flush()) {
            let failure = classify(&e, false);
            // A large request written in several segments to a reused connection the server
            // had already closed while idle can fail with EPIPE/ECONNRESET on a later
            // segment. If the server's side is an orderly close with nothing sent, it is the
            // same benign idle close as an EOF before the response.
            if failure == Failure::Reset && reused {
                let mut probe = [0u8; 1];
                if let Ok(0) = stream.read(&mut probe) {
                    return Err(Failure::EofBeforeResponse);
                }
            }
            return Err(failure);
        }
        self.read_response(method == "HEAD")
    }

    fn read_response(&mut self, head_request: bool) -> Result<Response, Failure> {
        let mut got_any = false;
        loop {
            let status_line = self.read_line(&mut got_any)?;
            let mut parts = status_line.splitn(3, ' ');
            let version = parts.next().unwrap_or_default().to_owned();
            let status: u16 = parts
                .next()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| Failure::Other(format!("bad status line {status_line:?}")))?;
            if !version.starts_with("HTTP/1.") {
                return Err(Failure::Other(format!("bad status line {status_line:?}")));
            }

            let mut headers = Vec::new();
            loop {
                let line = self.read_line(&mut got_any)?;
                if line.is_empty() {
                    break;
                }
                let (name, value) = line
                    .split_once(':')
                    .ok_or_else(|| Failure::Other(format!("bad header line {line:?}")))?;
                headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
            }
            if (100..200).contains(&status) {
                continue; // Interim response (e.g. 100 Continue): the real one follows.
            }

            let header = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v);
            let connection_has = |token: &str| {
                header("connection")
                    .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
            };
            let mut close =
                connection_has("close") || (version == "HTTP/1.0" && !connection_has("keep-alive"));
            let chunked = header("transfer-encoding")
                .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
            let content_length = match header("content-length") {
                Some(v) => Some(
                    v.parse::<usize>()
                        .map_err(|_| Failure::Other(format!("bad Content-Length {v:?}")))?,
                ),
                None => None,
            };

            let body = if head_request || status == 204 || status == 304 {
                Vec::new()
            } else if chunked {
                self.read_chunked()?
            } else if let Some(len) = content_length {
                let mut body = vec![0u8; len];
                self.reader
                    .read_exact(&mut body)
                    .map_err(|e| classify(&e, true))?;
                body
            } else {
                // No framing: the body runs to EOF and the connection is done.
                close = true;
                let mut body = Vec::new();
                self.reader
                    .read_to_end(&mut body)
                    .map_err(|e| classify(&e, true))?;
                body
            };
            return Ok(Response {
                status,
                headers,
                body,
                close,
            });
        }
    }

    /// Reads one CRLF-terminated line (without the terminator).
    fn read_line(&mut self, got_any: &mut bool) -> Result<String, Failure> {
        let mut buf = Vec::new();
        let result = self.reader.read_until(b'\n', &mut buf);
        if !buf.is_empty() {
            *got_any = true;
        }
        match result {
            Ok(0) if !*got_any => Err(Failure::EofBeforeResponse),
            Ok(0) => Err(Failure::EofMidResponse),
            Ok(_) if !buf.ends_with(b"\n") => Err(Failure::EofMidResponse),
            Ok(_) => {
                buf.pop();
                if buf.last() == Some(&b'\r') {
                    buf.pop();
                }
                String::from_utf8(buf).map_err(|_| Failure::Other("non-UTF-8 response head".into()))
            }
            Err(e) => Err(classify(&e, *got_any)),
        }
    }

    fn read_chunked(&mut self) -> Result<Vec<u8>, Failure> {
        let mut got_any = true;
        let mut body = Vec::new();
        loop {
            let line = self.read_line(&mut got_any)?;
            let size_hex = line.split(';').next().unwrap_or_default().trim();
            let size = usize::from_str_radix(size_hex, 16)
                .map_err(|_| Failure::Other(format!("bad chunk size {line:?}")))?;
            if size == 0 {
                // Trailers, then the empty line.
                while !self.read_line(&mut got_any)?.is_empty() {}
                return Ok(body);
            }
            let start = body.len();
            body.resize(start + size, 0);
            self.reader
                .read_exact(&mut body[start..])
                .map_err(|e| classify(&e, true))?;
            if !self.read_line(&mut got_any)?.is_empty() {
                return Err(Failure::Other("chunk not followed by CRLF".into()));
            }
        }
    }
}

/// A request that failed, with the context needed to diagnose it.
#[derive(Debug, Clone)]
pub struct RequestError {
    pub failure: Failure,
    /// The failed attempt was on a reused keep-alive connection.
    pub reused: bool,
    /// It was already the retry after a stale keep-alive connection.
    pub after_retry: bool,
}

impl fmt::Display for RequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (on a {} connection{})",
            self.failure,
            if self.reused { "reused" } else { "fresh" },
            if self.after_retry {
                ", after a stale-connection retry"
            } else {
                ""
            }
        )
    }
}

/// A well-behaved HTTP client on top of [`Conn`]: keep-alive or one connection per request,
/// reconnecting after `Connection: close`, and retrying a request once on a fresh
/// connection when a reused connection hits EOF before any response byte (the server closed
/// it while idle — RFC 9112 §9.3.1). Those retries are counted, not treated as failures.
pub struct Client {
    addr: SocketAddr,
    keepalive: bool,
    conn: Option<Conn>,
    pub stale_retries: u64,
}

impl Client {
    pub fn new(addr: SocketAddr, keepalive: bool) -> Client {
        Client {
            addr,
            keepalive,
            conn: None,
            stale_retries: 0,
        }
    }

    pub fn get(&mut self, path: &str) -> Result<Response, RequestError> {
        self.request("GET", path, None)
    }

    pub fn put(&mut self, path: &str, body: &[u8]) -> Result<Response, RequestError> {
        self.request("PUT", path, Some(body))
    }

    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<Response, RequestError> {
        let mut retried = false;
        loop {
            let conn = match self.conn.as_mut().filter(|c| c.is_open()) {
                Some(conn) => conn,
                None => {
                    let conn = Conn::connect(self.addr).map_err(|failure| RequestError {
                        failure,
                        reused: false,
                        after_retry: retried,
                    })?;
                    self.conn.insert(conn)
                }
            };
            let reused = conn.is_reused();
            let result = conn.request(method, path, body, !self.keepalive);
            if !conn.is_open() {
                self.conn = None;
            }
            match result {
                Ok(resp) => return Ok(resp),
                Err(Failure::EofBeforeResponse) if reused && !retried => {
                    self.stale_retries += 1;
                    retried = true;
                }
                Err(failure) => {
                    return Err(RequestError {
                        failure,
                        reused,
                        after_retry: retried,
                    })
                }
            }
        }
    }
}

/// `GET /version` on a fresh connection: the pid of the process that served it and its
/// build id (body `pid=<pid> build=<build id>`).
pub fn get_version(addr: SocketAddr) -> Result<(u32, String), Failure> {
    let resp = Conn::connect(addr)?.request("GET", "/version", None, true)?;
    if resp.status != 200 {
        return Err(Failure::Other(format!(
            "GET /version: status {} body {:?}",
            resp.status,
            resp.body_str()
        )));
    }
    let body = resp.body_str();
    let mut pid = None;
    let mut build = String::new();
    for field in body.split_whitespace() {
        if let Some(v) = field.strip_prefix("pid=") {
            pid = v.parse::<u32>().ok();
        } else if let Some(v) = field.strip_prefix("build=") {
            build = v.to_owned();
        }
    }
    pid.map(|p| (p, build))
        .ok_or_else(|| Failure::Other(format!("GET /version: unexpected body {body:?}")))
}

/// The pid serving `GET /version` right now.
pub fn serving_pid(addr: SocketAddr) -> Result<u32, Failure> {
    get_version(addr).map(|(pid, _)| pid)
}

// ---------------------------------------------------------------------------------------
// Load generator
// ---------------------------------------------------------------------------------------

/// How many failure descriptions a [`Load`] keeps (the counters count all of them).
const MAX_FAILURE_DESCRIPTIONS: usize = 20;

#[derive(Default)]
struct Counters {
    ok: AtomicU64,
    refused: AtomicU64,
    reset: AtomicU64,
    eof_before: AtomicU64,
    eof_mid: AtomicU64,
    timeouts: AtomicU64,
    bad_status: AtomicU64,
    mismatches: AtomicU64,
    other: AtomicU64,
    stale_retries: AtomicU64,
}

struct LoadShared {
    stop: AtomicBool,
    counters: Counters,
    failures: Mutex<Vec<String>>,
    /// Every acknowledged PUT: key → exact value. Keys are unique, written once.
    acked: Mutex<HashMap<String, Vec<u8>>>,
    started: Instant,
}

impl LoadShared {
    fn fail(&self, counter: &AtomicU64, what: String) {
        counter.fetch_add(1, Ordering::Relaxed);
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        if failures.len() < MAX_FAILURE_DESCRIPTIONS {
            let at = self.started.elapsed().as_secs_f64() * 1000.0;
            failures.push(format!("[+{at:.1} ms] {what}"));
        }
    }

    fn fail_request(&self, what: &str, err: &RequestError) {
        let c = &self.counters;
        let counter = match err.failure {
            Failure::Refused => &c.refused,
            Failure::Reset => &c.reset,
            Failure::EofBeforeResponse => &c.eof_before,
            Failure::EofMidResponse => &c.eof_mid,
            Failure::Timeout => &c.timeouts,
            Failure::Other(_) => &c.other,
        };
        self.fail(counter, format!("{what}: {err}"));
    }
}

/// Background HTTP load against the demo service: PUTs of unique values and GETs that
/// verify earlier acknowledged values byte for byte, from keep-alive clients and from
/// one-connection-per-request clients, unthrottled, until [`Load::stop`].
pub struct Load {
    shared: Arc<LoadShared>,
    threads: Vec<JoinHandle<()>>,
}

impl Load {
    /// Starts `keepalive` threads that reuse connections and `fresh` threads that open a
    /// new connection per request.
    pub fn start(addr: SocketAddr, keepalive: usize, fresh: usize) -> Load {
        let shared = Arc::new(LoadShared {
            stop: AtomicBool::new(false),
            counters: Counters::default(),
            failures: Mutex::new(Vec::new()),
            acked: Mutex::new(HashMap::new()),
            started: Instant::now(),
        });
        let mut threads = Vec::new();
        let kinds = (0..keepalive)
            .map(|i| (format!("ka{i}"), true))
            .chain((0..fresh).map(|i| (format!("fr{i}"), false)));
        for (label, keepalive) in kinds {
            let shared = Arc::clone(&shared);
            threads.push(
                thread::Builder::new()
                    .name(format!("load-{label}"))
                    .spawn(move || client_loop(&shared, addr, &label, keepalive))
                    .expect("spawn load thread"),
            );
        }
        Load { shared, threads }
    }

    /// Successful requests so far (to wait for progress).
    pub fn ok_count(&self) -> u64 {
        self.shared.counters.ok.load(Ordering::Relaxed)
    }

    /// Failed requests so far (all kinds).
    pub fn failure_count(&self) -> u64 {
        self.snapshot().failure_count()
    }

    /// Waits until at least `n` more requests succeed: proof the service is serving the
    /// load, not merely answering a probe.
    pub fn wait_progress(&self, n: u64, within: Duration, what: &str) {
        let target = self.ok_count() + n;
        wait_until(
            within,
            &format!("{n} more load requests succeed ({what})"),
            || self.ok_count() >= target,
        );
    }

    fn snapshot(&self) -> LoadReport {
        let c = &self.shared.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        LoadReport {
            ok: get(&c.ok),
            refused: get(&c.refused),
            reset: get(&c.reset),
            eof_before_response: get(&c.eof_before),
            eof_mid: get(&c.eof_mid),
            timeouts: get(&c.timeouts),
            bad_status: get(&c.bad_status),
            mismatches: get(&c.mismatches),
            other: get(&c.other),
            stale_retries: get(&c.stale_retries),
            failures: self
                .shared
                .failures
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            acked: HashMap::new(),
            elapsed: self.shared.started.elapsed(),
        }
    }

    /// Stops and joins the threads (each finishes its current request, bounded by
    /// [`IO_TIMEOUT`]) and returns the final counts and every acknowledged write.
    pub fn stop(mut self) -> LoadReport {
        self.shared.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                panic!("a load thread panicked");
            }
        }
        let mut report = self.snapshot();
        report.acked =
            std::mem::take(&mut *self.shared.acked.lock().unwrap_or_else(|p| p.into_inner()));
        report
    }
}

impl Drop for Load {
    /// A test that panics before `stop` must not leave threads hammering the next test.
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
    }
}

/// The value written for request `n` of thread `label`: unique (it starts with the key),
/// of varying length, and containing arbitrary bytes (NUL, CR, LF, 0xFF…) so that a server
/// that does not store and return exactly the bytes of the body is caught. Every 97th value
/// is 40 KiB, so some requests and responses span several TCP segments.
pub fn value_for(label: &str, n: u64) -> Vec<u8> {
    let mut v = format!("{label}-{n}:").into_bytes();
    let extra = if n.is_multiple_of(97) {
        40 * 1024
    } else {
        (n * 37 % 512) as usize
    };
    v.extend((0..extra as u64).map(|i| ((i * 131 + n * 7) % 256) as u8));
    v
}

/// Body of one load thread.
fn client_loop(shared: &LoadShared, addr: SocketAddr, label: &str, keepalive: bool) {
    let c = &shared.counters;
    let mut client = Client::new(addr, keepalive);
    // This thread's acknowledged writes, to pick GET targets without locking the shared map.
    let mut mine: Vec<(String, Vec<u8>)> = Vec::new();
    // Small xorshift PRNG, seeded per thread: which earlier key to read back.
    let mut rng: u64 = 0x9E37_79B9_7F4A_7C15 ^ label.bytes().fold(7, |h, b| h * 31 + b as u64);
    let mut n: u64 = 0;
    while !shared.stop.load(Ordering::Relaxed) {
        n += 1;
        let retries_before = client.stale_retries;
        if mine.is_empty() || n.is_multiple_of(2) {
            let key = format!("{label}-{n}");
            let path = format!("/kv/{key}");
            let value = value_for(label, n);
            match client.put(&path, &value) {
                Ok(resp) if matches!(resp.status, 200 | 201 | 204) => {
                    c.ok.fetch_add(1, Ordering::Relaxed);
                    shared
                        .acked
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(key.clone(), value.clone());
                    mine.push((key, value));
                }
                Ok(resp) => shared.fail(
                    &c.bad_status,
                    format!(
                        "{label}: PUT {path}: status {} body {:?}",
                        resp.status,
                        snippet(&resp.body)
                    ),
                ),
                Err(e) => shared.fail_request(&format!("{label}: PUT {path}"), &e),
            }
        } else {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let (key, want) = &mine[(rng % mine.len() as u64) as usize];
            let path = format!("/kv/{key}");
            match client.get(&path) {
                Ok(resp) if resp.status == 200 && resp.body == *want => {
                    c.ok.fetch_add(1, Ordering::Relaxed);
                }
                Ok(resp) if resp.status == 200 => shared.fail(
                    &c.mismatches,
                    format!(
                        "{label}: GET {path}: body mismatch: {} bytes {:?}, expected {} bytes {:?}",
                        resp.body.len(),
                        snippet(&resp.body),
                        want.len(),
                        snippet(want)
                    ),
                ),
                Ok(resp) if resp.status == 404 => shared.fail(
                    &c.mismatches,
                    format!("{label}: GET {path}: 404 for an acknowledged write (lost)"),
                ),
                Ok(resp) => shared.fail(
                    &c.bad_status,
                    format!(
                        "{label}: GET {path}: status {} body {:?}",
                        resp.status,
                        snippet(&resp.body)
                    ),
                ),
                Err(e) => shared.fail_request(&format!("{label}: GET {path}"), &e),
            }
        }
        c.stale_retries
            .fetch_add(client.stale_retries - retries_before, Ordering::Relaxed);
    }
}

/// The first bytes of a body, for failure messages.
fn snippet(body: &[u8]) -> String {
    let end = body.len().min(48);
    let mut s = String::from_utf8_lossy(&body[..end]).into_owned();
    if body.len() > end {
        s.push('…');
    }
    s
}

/// Final numbers of a [`Load`] run.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    pub ok: u64,
    pub refused: u64,
    pub reset: u64,
    /// EOF before any response byte on a fresh connection (or on the retry): a failure.
    pub eof_before_response: u64,
    pub eof_mid: u64,
    pub timeouts: u64,
    pub bad_status: u64,
    /// Wrong body, or 404 for an acknowledged write.
    pub mismatches: u64,
    pub other: u64,
    /// Benign: idle keep-alive connections closed by the server, retried once.
    pub stale_retries: u64,
    /// The first few failures, in order, with a timestamp relative to the load's start.
    pub failures: Vec<String>,
    /// Every acknowledged PUT (filled by [`Load::stop`]).
    pub acked: HashMap<String, Vec<u8>>,
    pub elapsed: Duration,
}

impl LoadReport {
    pub fn failure_count(&self) -> u64 {
        self.refused
            + self.reset
            + self.eof_before_response
            + self.eof_mid
            + self.timeouts
            + self.bad_status
            + self.mismatches
            + self.other
    }

    /// Panics (with the full report) unless every request succeeded and some did.
    pub fn assert_clean(&self) {
        assert!(
            self.failure_count() == 0 && self.ok > 0,
            "load saw failures (or made no progress):\n{self}"
        );
    }
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.elapsed.as_secs_f64();
        writeln!(
            f,
            "load: {} ok in {secs:.1} s ({:.0} req/s), {} acknowledged writes, {} stale keep-alive retries",
            self.ok,
            self.ok as f64 / secs.max(1e-9),
            self.acked.len(),
            self.stale_retries
        )?;
        write!(
            f,
            "failed requests: refused={} reset={} eof_before_response={} eof_mid={} timeouts={} \
             bad_status={} mismatches={} other={}",
            self.refused,
            self.reset,
            self.eof_before_response,
            self.eof_mid,
            self.timeouts,
            self.bad_status,
            self.mismatches,
            self.other
        )?;
        for failure in &self.failures {
            write!(f, "\n  - {failure}")?;
        }
        Ok(())
    }
}

/// Reads every acknowledged write back (new GETs over a keep-alive client, after the load
/// has stopped) and returns a description of each one that is missing or differs.
pub fn verify_acked(addr: SocketAddr, acked: &HashMap<String, Vec<u8>>) -> Vec<String> {
    let mut client = Client::new(addr, true);
    let mut problems = Vec::new();
    let mut keys: Vec<&String> = acked.keys().collect();
    keys.sort();
    for key in keys {
        let want = &acked[key];
        let path = format!("/kv/{key}");
        match client.get(&path) {
            Ok(resp) if resp.status == 200 && resp.body == *want => {}
            Ok(resp) => problems.push(format!(
                "GET {path}: status {}, {} bytes {:?}; expected 200 with {} bytes {:?}",
                resp.status,
                resp.body.len(),
                snippet(&resp.body),
                want.len(),
                snippet(want)
            )),
            Err(e) => problems.push(format!("GET {path}: {e}")),
        }
    }
    problems
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
        let mut cmd = Command::new(handoff_bin());
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
    use std::net::TcpListener;

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

    /// A scripted one-connection-at-a-time server: for each accepted connection, the list
    /// of raw responses to send, one per request read; after the list, it closes.
    fn scripted_server(script: Vec<Vec<&'static str>>) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        thread::spawn(move || {
            for responses in script {
                let (stream, _) = listener.accept().unwrap();
                let mut reader = BufReader::new(stream);
                for resp in responses {
                    // Read one request head (+ body by Content-Length).
                    let mut len = 0;
                    loop {
                        let mut line = String::new();
                        if reader.read_line(&mut line).unwrap() == 0 {
                            return;
                        }
                        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap();
                        }
                        if line == "\r\n" {
                            break;
                        }
                    }
                    let mut body = vec![0; len];
                    reader.read_exact(&mut body).unwrap();
                    reader.get_mut().write_all(resp.as_bytes()).unwrap();
                }
                // Orderly "lingering" close, as a correct server closes an idle keep-alive
                // connection: FIN first, then drain until the client closes. Closing with
                // unread request bytes instead would make the kernel send RST, which the
                // client rightly reports as a reset.
                let stream = reader.into_inner();
                let _ = stream.shutdown(std::net::Shutdown::Write);
                let _ = (&stream).read_to_end(&mut Vec::new());
            }
        });
        addr
    }

    #[test]
    fn client_keepalive_close_and_stale_retry() {
        let addr = scripted_server(vec![
            // Conn 1: one keep-alive response, then an idle close.
            vec!["HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"],
            // Conn 2 (the retry): a chunked response with Connection: close.
            vec!["HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\n"],
            // Conn 3: 204 then a cut response.
            vec!["HTTP/1.1 204 No Content\r\n\r\n", "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"],
        ]);
        let mut client = Client::new(addr, true);
        let r = client.get("/a").unwrap();
        assert_eq!(
            (r.status, r.body.as_slice(), r.close),
            (200, &b"ok"[..], false)
        );
        // The server closed conn 1 while idle: EOF before response → one retry on conn 2.
        let r = client.get("/b").unwrap();
        assert_eq!(
            (r.status, r.body.as_slice(), r.close),
            (200, &b"abc"[..], true)
        );
        assert_eq!(client.stale_retries, 1);
        // Conn 2 said close → conn 3 is opened without any retry.
        let r = client.put("/c", b"value").unwrap();
        assert_eq!(r.status, 204);
        assert_eq!(client.stale_retries, 1);
        let err = client.get("/d").unwrap_err();
        assert_eq!(err.failure, Failure::EofMidResponse);
        assert!(err.reused);
    }

    #[test]
    fn eof_on_fresh_connection_is_a_failure_and_refused_is_classified() {
        let addr = scripted_server(vec![vec![]]);
        let err = Client::new(addr, true).get("/").unwrap_err();
        assert_eq!(err.failure, Failure::EofBeforeResponse);
        assert!(!err.reused);

        // A port that was just bound and released: nothing listens there.
        let free = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        assert_eq!(Conn::connect(free).err(), Some(Failure::Refused));
    }
}
