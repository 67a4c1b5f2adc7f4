//! `handoff stop` never says "drained" for a process that died of a signal
//! (issue 13): a service with no SIGTERM handler dies of SIGTERM's default
//! action at once, cutting its requests in flight, so the stop names it,
//! says so, and exits 1. (A service that drains on SIGTERM and exits 0
//! makes the stop exit 0: `cli_ops.rs`, `notify_mode.rs`.)
#![cfg(target_os = "linux")]

mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use support::*;

const SETTLE: Duration = Duration::from_secs(30);

/// A connection the service has accepted and answered once, now holding
/// half a PUT: a request in flight.
fn in_flight(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        .expect("write");
    let mut got = vec![];
    let mut chunk = [0u8; 1024];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut chunk).expect("read the first response");
        assert!(n > 0, "EOF before the first response");
        got.extend_from_slice(&chunk[..n]);
    }
    assert!(got.starts_with(b"HTTP/1.1 200"), "{got:?}");
    s.write_all(b"PUT /kv/cut HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nhalf-")
        .expect("write");
    s
}

/// Asserts the request on `s` got no response: the connection ended.
fn assert_cut(mut s: TcpStream) {
    let mut rest = vec![];
    match s.read_to_end(&mut rest) {
        Ok(_) => assert!(rest.is_empty(), "a response after all: {rest:?}"),
        Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}"),
    }
}

#[test]
fn stop_of_a_service_without_a_sigterm_handler_says_it_cut_requests() {
    let _guard = begin_test("stop_no_handler", Duration::from_secs(120));
    let dirs = TestDirs::new();
    let bare = dirs.fault_wrapper("no-sigterm-handler");
    let mut sup = Supervisor::start(&dirs.runtime, &dirs.state, &bare, &[]);
    let pid = sup.first_pid;
    let pending = in_flight(sup.addr);

    let out = run_handoff(&["stop", "--grace", "30s"], &dirs.runtime, SETTLE);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(
        stdout.lines().any(|l| l.contains(&format!("pid {pid} "))
            && l.contains("signalled")
            && l.contains("killed by signal 15 (SIGTERM)")),
        "{stdout}"
    );
    assert!(
        stderr.contains(&format!(
            "handoff stop: incumbent pid {pid} did not drain: killed by SIGTERM: it has no SIGTERM handler"
        )) && stderr.contains("requests it had in flight were cut"),
        "{stderr}"
    );
    assert!(!stdout.contains("exited "), "{stdout}");
    assert_cut(pending);

    // The supervisor itself stopped cleanly, and logged the same verdict.
    let mut status = None;
    wait_until(SETTLE, "the supervisor to exit", || {
        status = sup.try_exit();
        status.is_some()
    });
    assert_eq!(status.and_then(|s| s.code()), Some(0));
    let verdict = format!("incumbent pid {pid} signalled after");
    wait_until(Duration::from_secs(10), "the stop summary", || {
        sup.stderr_log().contains(&verdict)
    });
    assert!(
        sup.stderr_log()
            .contains("did not drain: killed by SIGTERM"),
        "{}",
        sup.stderr_log()
    );
}

fn notify_service() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/notify_service.py")
}

/// Notify mode: the same verdict for a program that leaves the stop signal
/// at its default action, in the `--json` report.
#[test]
fn notify_mode_stop_of_a_program_without_a_handler_exits_1() {
    let _guard = begin_test("notify_stop_no_handler", Duration::from_secs(120));
    let dirs = TestDirs::new();
    let behaviour = dirs.root.path().join("behaviour");
    std::fs::write(&behaviour, "default-term").expect("write the behaviour");
    let mut sup = Supervisor::start_with(
        &dirs.runtime,
        &dirs.state,
        &notify_service(),
        &["--mode", "notify"],
        &StartOpts {
            env: vec![(
                "NOTIFY_TEST_BEHAVIOUR_FILE".into(),
                behaviour.display().to_string(),
            )],
            ..StartOpts::default()
        },
    );
    let pid = sup.first_pid;
    let mut cmd = Command::new(handoff_bin());
    cmd.args(["stop", "--json", "--runtime-dir"])
        .arg(&dirs.runtime);
    let out = finish_within(spawn_piped(cmd), SETTLE, "handoff stop");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    let stopped: Value = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|e| e["event"] == "stopped")
        .unwrap_or_else(|| panic!("no stopped event: {stdout}"));
    let p = &stopped["processes"][0];
    assert_eq!(p["pid"], pid, "{stopped}");
    assert_eq!(p["how"], "signalled", "{stopped}");
    assert_eq!(p["exit"], "killed by signal 15 (SIGTERM)", "{stopped}");
    assert!(
        p["why"]
            .as_str()
            .is_some_and(|w| w.contains("no SIGTERM handler")),
        "{stopped}"
    );
    wait_until(SETTLE, "the supervisor to exit", || {
        sup.try_exit().is_some()
    });
}
