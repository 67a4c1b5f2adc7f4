//! `handoff stop` and services without a SIGTERM handler (issue 13).
//!
//! In library mode the stop goes through the control protocol (Shutdown,
//! version 2), so such a service drains like for a handoff — its request in
//! flight is answered — and exits 0 by itself: the stop exits 0 and says how
//! it asked. Where the protocol cannot be used (an incumbent of an older
//! build, speaking version 1 only) the stop falls back to SIGTERM, says so,
//! and never says "drained" for a process that died of the signal: such a
//! service dies of SIGTERM's default action at once, cutting its requests
//! in flight, so the stop names it, says so, and exits 1. Notify mode has no
//! control socket: the signal, with the same honest verdict. (A service that
//! drains on SIGTERM and exits 0 makes the stop exit 0: `cli_ops.rs`,
//! `notify_mode.rs`.)
#![cfg(target_os = "linux")]

use crate::support;

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

/// Sends the rest of the PUT begun by [`in_flight`] and reads its response:
/// the status line and headers (lowercased), once the body has arrived.
fn finish(s: &mut TcpStream) -> String {
    s.write_all(b"body!").expect("write the rest of the body");
    let mut got = vec![];
    let mut chunk = [0u8; 1024];
    let head_end = loop {
        if let Some(i) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut chunk).expect("read the response");
        assert!(n > 0, "EOF before the response: {got:?}");
        got.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&got[..head_end]).to_ascii_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map(|v| v.trim().parse().expect("content-length"))
        .unwrap_or(0);
    while got.len() < head_end + len {
        let n = s.read(&mut chunk).expect("read the body");
        assert!(n > 0, "EOF in the body");
        got.extend_from_slice(&chunk[..n]);
    }
    head
}

fn stopped_event(stdout: &str) -> Value {
    stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|e| e["event"] == "stopped")
        .unwrap_or_else(|| panic!("no stopped event: {stdout}"))
}

/// Asserts the request on `s` got no response: the connection ended.
fn assert_cut(mut s: TcpStream) {
    let mut rest = vec![];
    match s.read_to_end(&mut rest) {
        Ok(_) => assert!(rest.is_empty(), "a response after all: {rest:?}"),
        Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}"),
    }
}

/// Library mode: the demo without a SIGTERM handler, a PUT half sent when
/// the stop asks it through the control protocol. The drain waits for it,
/// answers it, then the process exits 0 by itself: the stop exits 0 and
/// says the incumbent was stopped through the control protocol.
#[test]
fn stop_drains_a_service_without_a_sigterm_handler_through_the_control_protocol() {
    let _guard = begin_test("stop_protocol_no_handler", Duration::from_secs(120));
    let dirs = TestDirs::new();
    let bare = dirs.fault_wrapper("no-sigterm-handler");
    let mut sup = Supervisor::start(&dirs.runtime, &dirs.state, &bare, &[]);
    let pid = sup.first_pid;
    let mut pending = in_flight(sup.addr);

    let mut cmd = Command::new(handoff_bin());
    cmd.args(["stop", "--json", "--grace", "30s", "--runtime-dir"])
        .arg(&dirs.runtime);
    let stop = spawn_piped(cmd);
    // Shutdown is on its way to the incumbent: our request is in flight.
    let asked = format!("stopping the incumbent (pid {pid}) through the control protocol");
    wait_until(
        SETTLE,
        "the supervisor to ask the incumbent to stop",
        || sup.stderr_log().contains(&asked),
    );
    // It drains: still there, waiting for the rest of our request.
    assert!(
        proc_stat(pid).is_some(),
        "pid {pid} gone before our request was answered"
    );
    let head = finish(&mut pending);
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    let mut rest = vec![];
    let n = pending.read_to_end(&mut rest).expect("then EOF");
    assert_eq!(n, 0, "nothing after the last response");
    // Closed as a client would (the demo lingers until it sees our close).
    drop(pending);

    let out = finish_within(stop, SETTLE, "handoff stop");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    let stopped = stopped_event(&stdout);
    let p = &stopped["processes"][0];
    assert_eq!(p["pid"], pid, "{stopped}");
    assert_eq!(p["role"], "incumbent", "{stopped}");
    assert_eq!(p["how"], "exited", "{stopped}");
    assert_eq!(p["exit"], "exit status 0", "{stopped}");
    assert_eq!(p["asked"], "control-protocol", "{stopped}");
    assert!(p.get("fallback").is_none(), "{stopped}");
    assert!(p.get("why").is_none(), "{stopped}");

    let log = supervisor_exits_0_saying(&mut sup, pid, "exited");
    // The service says so too (handoff-tokio, through the demo's log).
    assert!(
        log.contains("stopped through the control protocol (handoff stop): finishing"),
        "{log}"
    );
    assert!(!log.contains("SIGTERM: draining"), "{log}");
    assert!(proc_stat(pid).is_none(), "pid {pid} still there");
}

/// A service whose drain panics while it stops dies with status 101: asked
/// through the control protocol and judged as it ended — "failed", exit 1,
/// and no SIGTERM sent after the fact (it was gone).
#[test]
fn a_service_dying_in_its_stop_drain_is_reported_failed() {
    let _guard = begin_test("stop_protocol_panic", Duration::from_secs(120));
    let dirs = TestDirs::new();
    let panicky = dirs.fault_wrapper("panic-in-drain");
    let mut sup = Supervisor::start(&dirs.runtime, &dirs.state, &panicky, &[]);
    let pid = sup.first_pid;
    let mut cmd = Command::new(handoff_bin());
    cmd.args(["stop", "--json", "--grace", "30s", "--runtime-dir"])
        .arg(&dirs.runtime);
    let out = finish_within(spawn_piped(cmd), SETTLE, "handoff stop");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    let stopped = stopped_event(&stdout);
    let p = &stopped["processes"][0];
    assert_eq!(p["pid"], pid, "{stopped}");
    assert_eq!(p["how"], "failed", "{stopped}");
    assert_eq!(p["exit"], "exit status 101", "{stopped}");
    assert_eq!(p["asked"], "control-protocol", "{stopped}");
    assert!(p.get("fallback").is_none(), "{stopped}");
    wait_until(SETTLE, "the supervisor to exit", || {
        sup.try_exit().is_some()
    });
    assert!(
        !sup.stderr_log().contains("sending SIGTERM"),
        "{}",
        sup.stderr_log()
    );
}

/// The fallback, honest as ever: an incumbent of an older build (protocol
/// version 1 only) cannot be asked through the control protocol, so it gets
/// SIGTERM — and with no handler for it, dies at once with its request in
/// flight. The stop says it fell back and why, names the signal death, and
/// exits 1.
#[test]
fn stop_of_an_older_build_falls_back_to_sigterm_and_says_it_cut_requests() {
    let _guard = begin_test("stop_fallback_no_handler", Duration::from_secs(120));
    let dirs = TestDirs::new();
    let bare = dirs.env_wrapper(
        "v1-no-handler",
        &[
            ("HANDOFF_DEMO_FAULT", "no-sigterm-handler"),
            ("HANDOFF_DEMO_PROTO_MAX", "1"),
        ],
    );
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
            && l.contains("killed by signal 15 (SIGTERM)")
            && l.contains("sent SIGTERM")),
        "{stdout}"
    );
    assert!(
        stderr.contains(&format!(
            "handoff stop: incumbent pid {pid}: not stopped through the control protocol: the incumbent (pid {pid}) speaks protocol versions 1..=1"
        )) && stderr.contains("sent SIGTERM instead"),
        "{stderr}"
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
    let log = supervisor_exits_0_saying(&mut sup, pid, "signalled");
    assert!(log.contains("did not drain: killed by SIGTERM"), "{log}");
    assert!(
        log.contains(&format!(
            "cannot stop the incumbent (pid {pid}) through the control protocol"
        )) && log.contains("sending SIGTERM"),
        "{log}"
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
    let stopped = stopped_event(&stdout);
    let p = &stopped["processes"][0];
    // No control socket in notify mode: the signal is the way, not a
    // fallback.
    assert_eq!(p["asked"], "SIGTERM", "{stopped}");
    assert!(p.get("fallback").is_none(), "{stopped}");
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

/// Waits for the supervisor to exit after a stop, asserts it exited 0 and
/// logged `incumbent pid PID HOW after …` in its stop summary; its log.
fn supervisor_exits_0_saying(sup: &mut Supervisor, pid: u32, how: &str) -> String {
    let mut status = None;
    wait_until(SETTLE, "the supervisor to exit", || {
        status = sup.try_exit();
        status.is_some()
    });
    assert_eq!(status.and_then(|s| s.code()), Some(0));
    let verdict = format!("incumbent pid {pid} {how} after");
    wait_until(Duration::from_secs(10), "the stop summary", || {
        sup.stderr_log().contains(&verdict)
    });
    sup.stderr_log()
}
