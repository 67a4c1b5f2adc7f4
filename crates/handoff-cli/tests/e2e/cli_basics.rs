//! The supervisor binary's contract at its edges: sockets restricted to
//! their owner, clear errors and exit status 2 for usage and connection
//! problems.

use crate::support;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use support::*;

fn mode(p: &std::path::Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn admin_and_control_sockets_are_owner_only() {
    let _guard = begin_test("owner_only", Duration::from_secs(60));
    let dirs = TestDirs::new();
    let sup = Supervisor::start(&dirs.runtime, &dirs.state, &demo_bin(), &[]);
    assert_eq!(mode(&dirs.runtime), 0o700, "runtime dir");
    assert_eq!(
        mode(&dirs.runtime.join("admin.sock")),
        0o600,
        "admin socket"
    );
    assert_eq!(
        mode(&dirs.runtime.join("control.sock")),
        0o600,
        "control socket"
    );
    // And after an upgrade (the successor re-binds the control socket).
    sup.upgrade(&[]).expect_committed();
    assert_eq!(
        mode(&dirs.runtime.join("control.sock")),
        0o600,
        "control socket after upgrade"
    );
}

#[test]
fn upgrade_without_a_supervisor_exits_2_and_says_what_to_do() {
    let dirs = TestDirs::new();
    let out = Command::new(handoff_bin())
        .args(["upgrade", "--runtime-dir"])
        .arg(&dirs.runtime)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot reach the supervisor") && err.contains("handoff run --runtime-dir"),
        "{err}"
    );
}

#[test]
fn usage_errors_exit_2() {
    for args in [
        &["upgrade"][..],
        &["upgrade", "--runtime-dir", "/tmp", "--deadline", "soon"],
        &["frobnicate"],
    ] {
        let out = Command::new(handoff_bin()).args(args).output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn run_refuses_a_bad_listen_spec_before_starting_anything() {
    let dirs = TestDirs::new();
    let out = Command::new(handoff_bin())
        .args(["run", "--runtime-dir"])
        .arg(&dirs.runtime)
        .arg("--state-dir")
        .arg(&dirs.state)
        .args(["--listen", "http=udp://127.0.0.1:0", "--"])
        .arg(demo_bin())
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("must start with tcp:// or unix:"), "{err}");
}

/// An incumbent that dies outside a handoff is restarted; one that cannot
/// start again makes the supervisor give up after its crash-loop limit with
/// a clear error, instead of spinning forever.
#[test]
fn crash_restart_then_crash_loop_limit() {
    let _guard = begin_light_test("crash_loop", Duration::from_secs(90));
    let dirs = TestDirs::new();
    // Serves the first two times it starts, then fails at once.
    let marker = dirs.root.path().join("starts");
    let script = dirs.root.path().join("flaky.sh");
    write_executable(
        &script,
        format!(
            "#!/bin/sh\necho x >> '{m}'\n[ \"$(wc -l < '{m}')\" -le 2 ] || exit 7\nexec '{demo}' \"$@\"\n",
            m = marker.display(),
            demo = demo_bin().display()
        )
        .as_bytes(),
    );
    let mut sup = Supervisor::start(&dirs.runtime, &dirs.state, &script, &[]);
    let kill9 = |pid: u32| {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    };

    // First crash: restarted, and the new process serves.
    let first = sup.first_pid;
    kill9(first);
    wait_until(
        Duration::from_secs(20),
        "a restarted incumbent serving",
        || matches!(sup.serving_pid(), Ok(p) if p != first),
    );
    // Second crash: every restart now fails; the supervisor gives up.
    kill9(sup.serving_pid().unwrap());
    let mut status = None;
    wait_until(Duration::from_secs(60), "the supervisor to give up", || {
        status = sup.try_exit();
        status.is_some()
    });
    assert_eq!(status.unwrap().code(), Some(1));
    let log = sup.stderr_log();
    assert!(log.contains("keeps failing to start"), "{log}");
    assert!(log.contains("restart 5/5 failed"), "{log}");
}

/// A service that served for longer than the crash-loop window and then
/// can never start again: the supervisor gives up after its limit. (It used
/// to judge the long-dead first process healthy again before every attempt,
/// resetting the count: "restart 1/5 failed" every 100 ms, forever.)
#[test]
fn crash_loop_limit_fires_after_a_long_healthy_run() {
    let _guard = begin_light_test("crash_loop_after_healthy", Duration::from_secs(90));
    let dirs = TestDirs::new();
    // Serves the first time it starts, then fails at once.
    let marker = dirs.root.path().join("starts");
    let script = dirs.root.path().join("once.sh");
    write_executable(
        &script,
        format!(
            "#!/bin/sh\necho x >> '{m}'\n[ \"$(wc -l < '{m}')\" -le 1 ] || exit 7\nexec '{demo}' \"$@\"\n",
            m = marker.display(),
            demo = demo_bin().display()
        )
        .as_bytes(),
    );
    let opts = StartOpts {
        env: vec![("HANDOFF_HEALTHY_AFTER_MS".into(), "500".into())],
        ..StartOpts::default()
    };
    let mut sup = Supervisor::start_with(&dirs.runtime, &dirs.state, &script, &[], &opts);
    wait_until(
        Duration::from_secs(20),
        "the incumbent has lived past the healthy window",
        || {
            status_json(&dirs.runtime)["incumbent_uptime_ms"]
                .as_u64()
                .is_some_and(|ms| ms > 1000)
        },
    );
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(sup.first_pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
    let mut status = None;
    wait_until(Duration::from_secs(30), "the supervisor to give up", || {
        status = sup.try_exit();
        status.is_some()
    });
    assert_eq!(status.unwrap().code(), Some(1));
    let log = sup.stderr_log();
    assert!(log.contains("keeps failing to start"), "{log}");
    assert!(log.contains("restart 5/5 failed"), "{log}");
    assert_eq!(log.matches("restart 1/5 failed").count(), 1, "{log}");
}

/// Hostile admin-socket clients — garbage, an absurd length, a half-open
/// connection that never speaks, one that hangs up mid-frame — neither
/// crash nor wedge the supervisor: a real upgrade right after commits.
#[test]
fn hostile_admin_clients_do_not_wedge_the_supervisor() {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    let _guard = begin_test("hostile_admin", Duration::from_secs(60));
    let dirs = TestDirs::new();
    let sup = Supervisor::start(&dirs.runtime, &dirs.state, &demo_bin(), &[]);
    let admin = dirs.runtime.join("admin.sock");

    let mut garbage = UnixStream::connect(&admin).unwrap();
    garbage
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut huge = UnixStream::connect(&admin).unwrap();
    let mut header = Vec::from(*b"HOFF");
    header.extend_from_slice(&1u16.to_le_bytes());
    header.extend_from_slice(&0u16.to_le_bytes());
    header.extend_from_slice(&u32::MAX.to_le_bytes());
    header.extend_from_slice(&0u32.to_le_bytes());
    huge.write_all(&header).unwrap();
    let _silent = UnixStream::connect(&admin).unwrap(); // half-open: never speaks
    let mut cut = UnixStream::connect(&admin).unwrap();
    cut.write_all(&header[..7]).unwrap();
    drop(cut);

    // The malformed ones get an answer (an error) and are closed.
    for (name, mut s) in [("garbage", garbage), ("huge", huge)] {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut reply = Vec::new();
        let _ = s.read_to_end(&mut reply);
        let text = String::from_utf8_lossy(&reply);
        assert!(text.contains("bad request"), "{name}: {text:?}");
    }
    // Meanwhile the supervisor still does its job.
    let c = sup.upgrade(&[]).expect_committed();
    sup.wait_settled(c.new_pid, Duration::from_secs(20));
}
