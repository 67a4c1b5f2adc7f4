//! A stateless successor that accepts before Begin (`bench-svc-handoff`'s default) is not
//! killed when its handoff aborts: the supervisor sends Abort, resumes the incumbent at once,
//! and gives the successor `abort_grace` to finish the requests it accepted early. Killing
//! it at once (what the supervisor did before) resets them.
//!
//! Real binaries: `handoff run` with `bench-svc-handoff`; the abort is made to happen at a
//! moment the test chooses by the service's `BENCH_SEAL_GATE` hook (the incumbent's seal
//! waits for a file, then fails). Needs the workspace's binaries built (`cargo test
//! --workspace` builds them).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;

mod common;
use common::poll_until;

fn handoff_bin() -> PathBuf {
    let p = Path::new(env!("CARGO_BIN_EXE_bench-svc-handoff"))
        .parent()
        .expect("bin dir")
        .join("handoff");
    assert!(
        p.exists(),
        "{} is missing: build the workspace first (`cargo build --workspace --bins`)",
        p.display()
    );
    p
}

/// Reads one response; returns (status, X-Pid, Connection: close).
fn read_response(r: &mut BufReader<TcpStream>) -> std::io::Result<(u32, u32, bool)> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let (mut pid, mut len, mut close) = (0, 0, false);
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let (k, v) = l.split_once(':').unwrap_or((l, ""));
        match k.to_ascii_lowercase().as_str() {
            "x-pid" => pid = v.trim().parse().unwrap_or(0),
            "content-length" => len = v.trim().parse().unwrap_or(0),
            "connection" => close = v.trim().eq_ignore_ascii_case("close"),
            _ => {}
        }
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok((status, pid, close))
}

/// One request on a fresh connection: the pid that answered it.
fn get_pid(addr: SocketAddr) -> Option<u32> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    (&s).write_all(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .ok()?;
    let (status, pid, _) = read_response(&mut BufReader::new(s)).ok()?;
    (status == 200).then_some(pid)
}

struct Run {
    child: Child,
}

impl Run {
    /// SIGTERM to `handoff run`: it stops its service processes and reaps them before it
    /// exits (they are in process groups of their own, so a group kill would orphan them).
    /// Returns whether it exited within the bound.
    fn stop(&mut self) -> bool {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        poll_until(Duration::from_secs(20), || {
            matches!(self.child.try_wait(), Ok(Some(_)))
        })
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        if !self.stop() {
            let _ = killpg(Pid::from_raw(self.child.id() as i32), Signal::SIGKILL);
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[test]
fn aborted_successor_finishes_what_it_accepted_early() {
    let dir = tempfile::tempdir().expect("tempdir");
    let gate = dir.path().join("gate");
    let log = dir.path().join("stderr.log");
    let out = dir.path().join("stdout.log");
    let addr = handoff_bench::contest::free_addrs(1).expect("a free port")[0];
    let child = Command::new(handoff_bin())
        .arg("run")
        .arg("--runtime-dir")
        .arg(dir.path().join("run"))
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--listen")
        .arg(format!("l0=tcp://{addr}"))
        .arg("--")
        .arg(env!("CARGO_BIN_EXE_bench-svc-handoff"))
        .env("BENCH_SEAL_GATE", &gate)
        .env("HANDOFF_LOG", "handoff=info")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).expect("stdout log"))
        .stderr(std::fs::File::create(&log).expect("log"))
        .process_group(0)
        .spawn()
        .expect("starting handoff run");
    let run = Run { child };
    // `ready pid=…` comes once the admin socket is bound (the service may serve earlier).
    assert!(
        poll_until(Duration::from_secs(20), || std::fs::read_to_string(&out)
            .unwrap_or_default()
            .contains("ready pid=")),
        "handoff run never said ready"
    );
    let mut old = None;
    assert!(
        poll_until(Duration::from_secs(20), || {
            old = get_pid(addr);
            old.is_some()
        }),
        "handoff run never served"
    );
    let old = old.expect("serving");

    // The upgrade: the incumbent drains, then its seal waits for the gate.
    let upgrade = {
        let bin = handoff_bin();
        let rt = dir.path().join("run");
        std::thread::spawn(move || {
            Command::new(bin)
                .arg("upgrade")
                .arg("--runtime-dir")
                .arg(rt)
                .output()
                .expect("handoff upgrade")
        })
    };
    // The supervisor logs Draining → Sealing once the incumbent said Drained: from then on
    // only the successor accepts.
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        poll_until(Duration::from_secs(20), || log_text()
            .contains("next=\"sealing\"")),
        "the incumbent never drained:\n{}",
        log_text()
    );
    let mut new = None;
    assert!(
        poll_until(Duration::from_secs(10), || {
            new = get_pid(addr).filter(|p| *p != old);
            new.is_some()
        }),
        "the successor never answered"
    );
    let new = new.expect("successor serving");

    // A keep-alive connection of the successor's (its first request answered by it), with a
    // second request half sent when the handoff aborts.
    let c = TcpStream::connect(addr).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut r = BufReader::new(c.try_clone().unwrap());
    (&c).write_all(b"GET /1 HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let (status, pid, _) = read_response(&mut r).expect("first response");
    assert_eq!(
        (status, pid),
        (200, new),
        "the successor answers while sealing waits"
    );
    (&c).write_all(b"GET /2 HTTP/1.1\r\nHost: t\r\n").unwrap();

    // Abort: the incumbent's seal fails. It resumes and serves again.
    std::fs::write(&gate, b"go").unwrap();
    assert!(
        poll_until(Duration::from_secs(20), || get_pid(addr) == Some(old)),
        "the incumbent did not resume after the abort:\n{}",
        log_text()
    );
    // The successor was not killed: it answers the rest of the request it had accepted.
    (&c).write_all(b"\r\n").unwrap();
    let (status, pid, _) = read_response(&mut r).unwrap_or_else(|e| {
        panic!(
            "the aborted successor's connection failed ({e}): it was killed mid-request\n{}",
            log_text()
        )
    });
    assert_eq!((status, pid), (200, new));
    drop(r);
    drop(c);

    // It then exits by itself, well within the grace, and the upgrade reports the abort.
    let up = upgrade.join().expect("upgrade thread");
    let said =
        String::from_utf8_lossy(&up.stderr).to_string() + &String::from_utf8_lossy(&up.stdout);
    assert!(!up.status.success(), "the upgrade must fail: {said}");
    assert!(
        said.contains("BENCH_SEAL_GATE"),
        "the abort names its cause: {said}"
    );
    assert!(
        poll_until(Duration::from_secs(10), || kill(
            Pid::from_raw(new as i32),
            None
        )
        .is_err()),
        "the aborted successor {new} is still running"
    );
    let text = log_text();
    assert!(
        !text.contains("still running after the abort grace"),
        "the successor had to be killed:\n{text}"
    );
    assert_eq!(get_pid(addr), Some(old), "the incumbent serves on");
    let mut run = run;
    assert!(run.stop(), "handoff run did not stop on SIGTERM");
    assert!(
        poll_until(Duration::from_secs(10), || kill(
            Pid::from_raw(old as i32),
            None
        )
        .is_err()),
        "handoff run left its incumbent {old} behind"
    );
}
