//! `handoff` against systemd's own tools, when they are installed:
//! `systemd-analyze verify` on the example units in docs/systemd/, and
//! socket activation by `systemd-socket-activate`.

use crate::sd;
use crate::support;

use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use sd::*;
use support::*;

/// The example units in docs/systemd/ parse cleanly for systemd itself:
/// `systemd-analyze verify` with the binaries pointed at the ones just
/// built (it checks that ExecStart= and ExecReload= are executable).
#[test]
fn example_units_pass_systemd_analyze_verify() {
    let Some(analyze) = ["/usr/bin/systemd-analyze", "/bin/systemd-analyze"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.exists())
    else {
        eprintln!("systemd-analyze is not installed: the example units were not verified");
        return;
    };
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/systemd");
    let dir = tempfile::tempdir().unwrap();
    let (handoff, demo) = (handoff_bin(), demo_bin());
    let mut units = vec![];
    for name in ["handoff-demo.service", "handoff-demo.socket"] {
        let text = std::fs::read_to_string(docs.join(name)).unwrap();
        if name.ends_with(".service") {
            assert!(text.contains("/usr/local/bin/handoff run"), "{name}");
        }
        let text = text
            .replace("/usr/local/bin/handoff-demo", demo.to_str().unwrap())
            .replace(
                "/usr/local/bin/handoff ",
                &format!("{} ", handoff.display()),
            );
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        units.push(path);
    }
    let out = Command::new(analyze)
        .args(["verify", "--man=no"])
        .args(&units)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // verify exits 0 even for a directive it ignores; it only says so.
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {:?}\n{stderr}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Socket activation by systemd's own activator (`systemd-socket-activate`,
/// which sets LISTEN_FDS/LISTEN_FDNAMES/LISTEN_PID exactly as PID 1 does and
/// execs on the first connection), when it is installed.
#[test]
fn systemd_socket_activate_starts_handoff_run() {
    let _guard = begin_test("sd_socket_activate_tool", Duration::from_secs(90));
    let Some(tool) = [
        "/usr/bin/systemd-socket-activate",
        "/bin/systemd-socket-activate",
    ]
    .into_iter()
    .map(Path::new)
    .find(|p| p.exists()) else {
        eprintln!("systemd-socket-activate is not installed: not run");
        return;
    };
    let dirs = TestDirs::new();
    let notify = NotifySocket::path();
    // A free port for the tool to bind (it takes no port 0).
    let addr = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut cmd = Command::new(tool);
    // SAFETY: between fork and exec only prctl(2), async-signal-safe.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
        });
    }
    let child = cmd
        .arg(format!("--listen={addr}"))
        .arg("--fdname=http")
        .arg(format!("--setenv=NOTIFY_SOCKET={}", notify.address))
        .arg(format!("--setenv=HANDOFF_DEMO_BUILD_ID={BUILD}"))
        .arg(handoff_bin())
        .args(["run", "--runtime-dir"])
        .arg(&dirs.runtime)
        .arg("--state-dir")
        .arg(&dirs.state)
        .arg("--")
        .arg(demo_bin())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    /// Kills and reaps the tree unless it was seen to exit (then its pid
    /// may belong to someone else already).
    struct Reap(Option<std::process::Child>);
    impl Drop for Reap {
        fn drop(&mut self) {
            if let Some(mut c) = self.0.take() {
                kill_tree(c.id());
                let _ = c.wait();
            }
        }
    }
    let pid = child.id();
    let mut guard = Reap(Some(child));
    // The tool binds first, then execs handoff run (same pid) on the first
    // connection, which waits in the backlog until the demo serves it.
    let mut first = None;
    wait_until(
        Duration::from_secs(20),
        "the activated demo answers",
        || {
            first = serving_pid(addr).ok();
            first.is_some()
        },
    );
    let first = first.unwrap();
    let m = notify.next(NOTE, "READY=1");
    assert_eq!(expect_ready_serving(&m, first), "");
    let (code, out) = upgrade(&dirs.runtime);
    assert_eq!(code, Some(0), "{out}");
    let second = serving_pid(addr).expect("serving after the upgrade");
    assert_ne!(second, first);
    kill(Pid::from_raw(pid as i32), Signal::SIGTERM).unwrap();
    let mut status = None;
    wait_until(Duration::from_secs(30), "handoff run exits", || {
        status = guard.0.as_mut().and_then(|c| c.try_wait().unwrap());
        status.is_some()
    });
    guard.0 = None; // reaped
    assert_eq!(status.and_then(|s| s.code()), Some(0));
}
