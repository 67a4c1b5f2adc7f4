//! Helpers of tests/e2e/systemd.rs and tests/e2e/systemd_tools.rs: a manager-side
//! notify socket, the datagram checks, and `handoff run` started the way a
//! systemd `.socket` unit starts a service.
#![allow(dead_code)] // Each test binary uses a different subset.

use std::io::{self, BufRead, BufReader, Read};
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::support::*;

pub const BUILD: &str = "sd-test-1";

/// `CLOCK_MONOTONIC` in µs, read independently of the code under test.
pub fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a pointer to a live local.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime");
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}

/// The manager's end of a notify socket.
pub struct NotifySocket {
    pub sock: UnixDatagram,
    /// The `NOTIFY_SOCKET` value that reaches it.
    pub address: String,
    _dir: Option<tempfile::TempDir>,
}

impl NotifySocket {
    pub fn path() -> NotifySocket {
        let dir = tempfile::Builder::new().prefix("hosd").tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        NotifySocket {
            sock,
            address: path.to_str().unwrap().to_string(),
            _dir: Some(dir),
        }
    }

    pub fn abstract_name() -> NotifySocket {
        use std::os::linux::net::SocketAddrExt;
        let name = format!(
            "handoff-test-notify-{}-{}",
            std::process::id(),
            monotonic_usec()
        );
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let sock = UnixDatagram::bind_addr(&addr).unwrap();
        NotifySocket {
            sock,
            address: format!("@{name}"),
            _dir: None,
        }
    }

    /// The next datagram, waiting at most `within`.
    pub fn next(&self, within: Duration, what: &str) -> String {
        self.sock.set_read_timeout(Some(within)).unwrap();
        let mut buf = [0u8; 8192];
        match self.sock.recv(&mut buf) {
            Ok(n) => String::from_utf8(buf[..n].to_vec()).expect("UTF-8 datagram"),
            Err(e) => panic!("no notification within {within:?} while waiting for {what}: {e}"),
        }
    }

    /// The next datagram that is not a watchdog ping.
    pub fn next_state(&self, within: Duration, what: &str) -> String {
        let end = Instant::now() + within;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            let m = self.next(left.max(Duration::from_millis(1)), what);
            if m != "WATCHDOG=1" {
                return m;
            }
        }
    }

    /// Everything already queued, without waiting.
    pub fn drain(&self) -> Vec<String> {
        self.sock.set_nonblocking(true).unwrap();
        let mut out = vec![];
        let mut buf = [0u8; 8192];
        while let Ok(n) = self.sock.recv(&mut buf) {
            out.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        self.sock.set_nonblocking(false).unwrap();
        out
    }
}

pub fn env(notify: &NotifySocket, extra: &[(&str, &str)]) -> StartOpts {
    let mut env = vec![
        ("NOTIFY_SOCKET".to_string(), notify.address.clone()),
        ("HANDOFF_DEMO_BUILD_ID".to_string(), BUILD.to_string()),
    ];
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    StartOpts {
        env,
        ..StartOpts::default()
    }
}

/// Splits `RELOADING=1\nMONOTONIC_USEC=T\nSTATUS=…` and checks T is inside
/// the window the test measured around the request.
pub fn expect_reloading(m: &str, before: u64, after: u64) -> String {
    let lines: Vec<&str> = m.split('\n').collect();
    assert_eq!(lines.len(), 3, "{m:?}");
    assert_eq!(lines[0], "RELOADING=1", "{m:?}");
    let t: u64 = lines[1]
        .strip_prefix("MONOTONIC_USEC=")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no MONOTONIC_USEC in {m:?}"));
    assert!(
        before <= t && t <= after,
        "MONOTONIC_USEC={t} outside the request's window [{before}, {after}]"
    );
    lines[2]
        .strip_prefix("STATUS=")
        .unwrap_or_else(|| panic!("no STATUS in {m:?}"))
        .to_string()
}

/// `READY=1\nSTATUS=serving pid {pid} ({BUILD}){rest}`: returns `rest`.
pub fn expect_ready_serving(m: &str, pid: u32) -> String {
    let prefix = format!("READY=1\nSTATUS=serving pid {pid} ({BUILD})");
    m.strip_prefix(&prefix)
        .unwrap_or_else(|| panic!("expected {prefix:?}…, got {m:?}"))
        .to_string()
}

pub const NOTE: Duration = Duration::from_secs(20);

pub fn assert_clean_env(pid: u32, environ: &[u8]) {
    let vars: Vec<String> = environ
        .split(|b| *b == 0)
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .collect();
    for leaked in ["NOTIFY_SOCKET=", "WATCHDOG_USEC=", "WATCHDOG_PID="] {
        assert!(
            !vars.iter().any(|v| v.starts_with(leaked)),
            "the service (pid {pid}) inherited {leaked}…: {vars:?}"
        );
    }
    assert!(
        vars.contains(&format!("LISTEN_PID={pid}")),
        "LISTEN_PID is not the service's own pid {pid}: {vars:?}"
    );
}

/// `handoff run` started the way systemd starts a socket-activated
/// service: the listener at fd 3, `LISTEN_FDS=1`, `LISTEN_FDNAMES`, and
/// `LISTEN_PID` = its own pid (set by the shell that then execs it).
pub struct Activated {
    pub child: Child,
    pub lines: Receiver<String>,
    pub stderr: Arc<Mutex<String>>,
    /// The stderr reader: finished once every writer has closed the pipe.
    stderr_reader: std::thread::JoinHandle<()>,
}

impl Activated {
    pub fn start(
        listener: &TcpListener,
        fdname: &str,
        args: &[&str],
        notify: &NotifySocket,
    ) -> Activated {
        let src = listener.as_raw_fd();
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", "export LISTEN_PID=$$; exec \"$@\"", "sh"])
            .arg(handoff_bin())
            .arg("run")
            .args(args)
            .env("LISTEN_FDS", "1")
            .env("LISTEN_FDNAMES", fdname)
            .env("NOTIFY_SOCKET", &notify.address)
            .env("HANDOFF_DEMO_BUILD_ID", BUILD)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: between fork and exec only dup2/fcntl/prctl, all
        // async-signal-safe; nothing is allocated or locked.
        unsafe {
            cmd.pre_exec(move || {
                if src == 3 {
                    // dup2 onto itself would leave FD_CLOEXEC set.
                    if libc::fcntl(3, libc::F_SETFD, 0) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                } else if libc::dup2(src, 3) < 0 {
                    return Err(io::Error::last_os_error());
                }
                nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(io::Error::from)
            });
        }
        let mut child = cmd.spawn().expect("spawn sh → handoff run");
        let (tx, lines) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                eprintln!("[handoff run stdout] {l}");
                let _ = tx.send(l);
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let (log, mut err) = (stderr.clone(), child.stderr.take().unwrap());
        let stderr_reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let s = String::from_utf8_lossy(&buf[..n]);
                eprint!("[handoff run] {s}");
                log.lock().unwrap().push_str(&s);
            }
        });
        Activated {
            child,
            lines,
            stderr,
            stderr_reader,
        }
    }

    /// Stdout up to `ready pid=N`: (the `listening …` lines, N).
    pub fn wait_ready(&mut self) -> (Vec<String>, u32) {
        let mut listening = vec![];
        loop {
            let line = self.lines.recv_timeout(START_TIMEOUT).unwrap_or_else(|e| {
                panic!("no `ready` from handoff run ({e}); stderr:\n{}", self.log())
            });
            if let Some(pid) = line.strip_prefix("ready pid=") {
                return (listening, pid.trim().parse().unwrap());
            }
            if line.starts_with("listening ") {
                listening.push(line);
            }
        }
    }

    /// Waits for it to exit (it must, within 20 s) and for its stderr to
    /// be read to the end, and returns the exit code.
    pub fn wait_exit(&mut self) -> Option<i32> {
        let mut status = None;
        wait_until(Duration::from_secs(20), "handoff run exits", || {
            status = self.child.try_wait().unwrap();
            status.is_some()
        });
        wait_until(Duration::from_secs(20), "its stderr is closed", || {
            self.stderr_reader.is_finished()
        });
        status.and_then(|s| s.code())
    }

    pub fn log(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }
}

impl Drop for Activated {
    fn drop(&mut self) {
        kill_tree(self.child.id());
        let _ = self.child.wait();
    }
}

/// The socket a process has at `fd`, as `socket:[INODE]`.
pub fn socket_at(pid: u32, fd: i32) -> String {
    std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
        .map(|p| p.display().to_string())
        .unwrap_or_else(|e| format!("unreadable: {e}"))
}

pub fn upgrade(runtime: &Path) -> (Option<i32>, String) {
    let mut child = Command::new(handoff_bin())
        .arg("upgrade")
        .arg("--runtime-dir")
        .arg(runtime)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut status = None;
    wait_until(UPGRADE_TIMEOUT, "handoff upgrade finishes", || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    (status.and_then(|s| s.code()), out)
}
