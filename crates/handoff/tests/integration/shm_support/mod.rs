//! Shared by the shared-region and restart-lock tests: real peer processes
//! (`examples/shm_peer.rs`), bounded waits, and planting words in a region
//! file the way corruption or a foreign process would.
#![allow(dead_code)]

use crate::common;

/// The `shm_peer` example the multi-process tests run.
pub fn peer_path() -> PathBuf {
    common::example_bin("shm_peer")
}

use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use handoff::shm::{Region, RegionSpec};

/// Must match `examples/shm_peer.rs`.
pub const SPEC: RegionSpec = RegionSpec {
    payload_len: 64,
    schema: 0x5045_4552,
};
pub const NAME: &str = "state";

#[allow(unused_imports)] // not every test binary that includes this polls
pub use common::poll;

/// A running `shm_peer`, killed and reaped on drop.
pub struct Peer {
    child: Child,
    lines: Receiver<String>,
    pub pid: u32,
    reaped: Option<ExitStatus>,
}

impl Peer {
    pub fn spawn(args: &[&str]) -> Peer {
        Self::spawn_env(args, &[])
    }

    pub fn spawn_env(args: &[&str], env: &[(&str, &str)]) -> Peer {
        let mut cmd = Command::new(peer_path());
        cmd.args(args)
            .env_remove("HANDOFF_SHM_HOOK")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let pid = child.id();
        Peer {
            child,
            lines,
            pid,
            reaped: None,
        }
    }

    /// The next line of output; fails the test if none within `within`.
    pub fn line(&self, within: Duration) -> String {
        self.lines
            .recv_timeout(within)
            .unwrap_or_else(|e| panic!("peer {} printed nothing within {within:?}: {e}", self.pid))
    }

    /// Waits for a line starting with `prefix` (other lines are skipped).
    pub fn expect(&self, prefix: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let l = self.line(left);
            if l.starts_with(prefix) {
                return l;
            }
        }
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) -> ExitStatus {
        if let Some(s) = self.reaped {
            return s;
        }
        let _ = self.child.kill();
        self.wait(Duration::from_secs(10))
    }

    /// SIGKILL without reaping: the peer stays a zombie until `wait`.
    pub fn kill_leave_zombie(&mut self) {
        let _ = self.child.kill();
    }

    /// Waits (bounded) for the peer to exit, and reaps it.
    pub fn wait(&mut self, within: Duration) -> ExitStatus {
        if let Some(s) = self.reaped {
            return s;
        }
        let deadline = Instant::now() + within;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                self.reaped = Some(s);
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "peer {} did not exit within {within:?}",
                self.pid
            );
            // Poll interval of a deadline-bounded wait.
            std::thread::park_timeout(Duration::from_millis(2));
        }
    }

    /// Every remaining line up to end of output (the peer has exited or
    /// is about to); fails the test if the output does not end in time.
    pub fn rest_of_output(&self, within: Duration) -> Vec<String> {
        let deadline = Instant::now() + within;
        let mut out = vec![];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => out.push(l),
                Err(mpsc::RecvTimeoutError::Disconnected) => return out,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    panic!("output of peer {} did not end within {within:?}", self.pid)
                }
            }
        }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        if self.reaped.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub fn killed_by_sigkill(s: ExitStatus) -> bool {
    s.signal() == Some(9)
}

/// Writes a native-endian word into the region file at `offset`, through
/// the file rather than the mapping (as a foreign process or corruption
/// would); the page cache makes it visible to every mapping at once.
pub fn plant(path: &Path, offset: usize, word: u64) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&word.to_ne_bytes(), offset as u64).unwrap();
}

/// `/proc/<pid>/stat` state letter.
pub fn proc_state(pid: u32) -> Option<char> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    s[s.rfind(')')? + 2..].chars().next()
}

pub fn region(dir: &Path) -> Region {
    Region::open_or_create(dir, NAME, SPEC).unwrap()
}
