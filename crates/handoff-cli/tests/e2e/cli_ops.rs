//! The operator's commands through the real binaries: `handoff status`
//! between and during upgrades, `handoff stop` and SIGTERM with requests in
//! flight, SIGHUP upgrades, `handoff upgrade --wait` from two processes, and
//! SIGKILL of the incumbent under a continuous stream of new connections.
//! (Crash restart and the crash-loop limit are in `cli_basics.rs`.)

use crate::support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use support::*;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn status_text(rt: &Path) -> String {
    let out = run_handoff(&["status"], rt, Duration::from_secs(20));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    text(&out.stdout)
}

/// Polls `handoff status --json` until `pred` holds; returns that status.
fn wait_status(rt: &Path, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let mut last = Value::Null;
    if !poll_until(Duration::from_secs(30), || {
        last = status_json(rt);
        pred(&last)
    }) {
        panic!("status never showed {what}; last: {last:#}");
    }
    last
}

fn json_lines(out: &Output) -> Vec<Value> {
    text(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn event<'a>(events: &'a [Value], kind: &str) -> &'a Value {
    events
        .iter()
        .find(|e| e["event"] == kind)
        .unwrap_or_else(|| panic!("no {kind:?} event in {events:?}"))
}

fn phase_names(v: &Value) -> Vec<&str> {
    v.as_array()
        .expect("phases array")
        .iter()
        .map(|p| p["phase"].as_str().expect("phase name"))
        .collect()
}

fn signal(pid: u32, sig: Signal) {
    kill(Pid::from_raw(pid as i32), sig).expect("kill");
}

const COMMITTED_PHASES: [&str; 5] = [
    "negotiating",
    "draining",
    "sealing",
    "awaiting-ready",
    "committed",
];

#[test]
fn status_between_and_during_upgrades() {
    let _guard = begin_test("status_during", Duration::from_secs(120));
    let dirs = TestDirs::new();
    let sup = Supervisor::start(&dirs.runtime, &dirs.state, &demo_bin(), &[]);
    let rt = &dirs.runtime;

    let s = status_json(rt);
    assert_eq!(s["handoffs"]["committed"], 0);
    assert!(
        s["last_handoff"].is_null() && s["in_flight"].is_null(),
        "{s:#}"
    );
    assert_eq!(s["listeners"][0], format!("http=tcp://{}", sup.addr));
    assert!(s["supervisor_uptime_ms"].as_u64().is_some(), "{s:#}");
    assert!(s["incumbent_uptime_ms"].as_u64().is_some(), "{s:#}");

    // Between upgrades: the last one's id, outcome and phases.
    let c = sup.upgrade(&[]).expect_committed();
    let s = status_json(rt);
    assert_eq!(s["handoffs"]["committed"], 1, "{s:#}");
    assert_eq!(s["incumbent_pid"], c.new_pid);
    let last = &s["last_handoff"];
    assert_eq!(last["outcome"], "committed");
    assert_eq!(last["trigger"], "admin");
    assert_eq!(last["new_pid"], c.new_pid);
    assert_eq!(phase_names(&last["phases"]), COMMITTED_PHASES, "{s:#}");
    assert!(last["handoff_id"]
        .as_str()
        .is_some_and(|id| id.starts_with("0x")));
    // The incumbent is younger than the supervisor.
    assert!(
        s["incumbent_uptime_ms"].as_u64() <= s["supervisor_uptime_ms"].as_u64(),
        "{s:#}"
    );
    let human = status_text(rt);
    assert!(
        human.contains("handoffs           1 committed, 0 aborted"),
        "{human}"
    );
    assert!(
        human.contains(&format!(
            "last handoff       {} committed by handoff upgrade",
            last["handoff_id"].as_str().unwrap_or_default()
        )),
        "{human}"
    );
    assert!(
        human
            .lines()
            .any(|l| l.trim_start().starts_with("awaiting-ready")),
        "{human}"
    );

    // During one: a successor that never becomes ready holds the handoff
    // in awaiting-ready (the deadline is far away).
    let hang = dirs.fault_wrapper("hang-before-ready");
    let mut cmd = Command::new(handoff_bin());
    cmd.args(["upgrade", "--json", "--deadline", "60s", "--binary"])
        .arg(&hang)
        .arg("--runtime-dir")
        .arg(rt);
    let held = spawn_piped(cmd);
    let s = wait_status(rt, "the handoff in awaiting-ready", |s| {
        s["in_flight"]["phase"] == "awaiting-ready" && s["journal"]["phase"] == "awaiting-ready"
    });
    let f = &s["in_flight"];
    assert_eq!(f["handoff_id"], s["journal"]["handoff_id"], "{s:#}");
    assert_eq!(f["trigger"], "admin");
    assert_eq!(
        phase_names(&f["phases"]),
        ["negotiating", "draining", "sealing"]
    );
    assert_eq!(s["journal"]["incumbent_pid"], c.new_pid);
    let successor = s["journal"]["successor_pid"]
        .as_u64()
        .expect("successor pid") as u32;
    let human = status_text(rt);
    assert!(
        human
            .lines()
            .any(|l| l.starts_with("in flight")
                && l.contains("by handoff upgrade: awaiting-ready for")),
        "{human}"
    );
    assert!(
        human.contains("journal            0x") && human.contains("phase awaiting-ready"),
        "{human}"
    );
    // A second upgrade without --wait is refused at once, touching nothing.
    let out = run_handoff(&["upgrade"], rt, Duration::from_secs(20));
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("in progress"),
        "{}",
        text(&out.stderr)
    );

    // End it: the successor dies, the handoff aborts, the old one resumes.
    signal(successor, Signal::SIGKILL);
    let out = finish_within(held, Duration::from_secs(60), "the held upgrade");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    let s = status_json(rt);
    assert_eq!(s["handoffs"]["committed"], 1, "{s:#}");
    assert_eq!(s["handoffs"]["aborted"], 1, "{s:#}");
    assert_eq!(s["last_handoff"]["outcome"], "aborted");
    assert!(s["last_handoff"]["reason"]
        .as_str()
        .is_some_and(|r| !r.is_empty()));
    assert!(s["in_flight"].is_null() && s["journal"].is_null(), "{s:#}");
    assert_eq!(s["incumbent_pid"], c.new_pid);
    sup.wait_settled(c.new_pid, Duration::from_secs(20));
}

/// A connection the incumbent has accepted, holding half a PUT.
struct Pending {
    stream: TcpStream,
    key: String,
}

const FIRST_HALF: &[u8] = b"half-";
const SECOND_HALF: &[u8] = b"done!";

/// A connection the incumbent has surely accepted: one whole request was
/// answered on it.
fn accepted_connection(addr: SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        .expect("write");
    let (code, _, _) = read_response(&mut stream);
    assert_eq!(code, 200);
    stream
}

fn open_pending(addr: SocketAddr, i: usize) -> Pending {
    let mut stream = accepted_connection(addr);
    let key = format!("stop-{i}");
    let head = format!(
        "PUT /kv/{key} HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n",
        FIRST_HALF.len() + SECOND_HALF.len()
    );
    stream.write_all(head.as_bytes()).expect("write");
    stream.write_all(FIRST_HALF).expect("write");
    Pending { stream, key }
}

/// Reads one response: (status, lower-cased head, body).
fn read_response(s: &mut TcpStream) -> (u16, String, Vec<u8>) {
    let mut buf = vec![];
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut chunk).expect("read response");
        assert!(n > 0, "EOF before the response: {:?}", text(&buf));
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = text(&buf[..head_end]).to_ascii_lowercase();
    let code = head[9..12].parse().expect("status code");
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map(|v| v.trim().parse().expect("length"))
        .unwrap_or(0);
    while buf.len() < head_end + len {
        let n = s.read(&mut chunk).expect("read body");
        assert!(n > 0, "EOF in the body");
        buf.extend_from_slice(&chunk[..n]);
    }
    (code, head, buf[head_end..head_end + len].to_vec())
}

enum StopBy {
    Command,
    Sigterm,
}

/// Requests in flight when the stop begins complete with 2xx; the
/// supervisor exits 0 and leaves no process behind; the writes are durable.
fn stop_with_requests_in_flight(by: StopBy) {
    let dirs = TestDirs::new();
    let mut sup = Supervisor::start(&dirs.runtime, &dirs.state, &demo_bin(), &[]);
    let incumbent = sup.first_pid;
    let pending: Vec<Pending> = (0..3).map(|i| open_pending(sup.addr, i)).collect();

    let stop = match by {
        StopBy::Command => {
            let mut cmd = Command::new(handoff_bin());
            cmd.args(["stop", "--json", "--grace", "30s", "--runtime-dir"])
                .arg(&dirs.runtime);
            Some(spawn_piped(cmd))
        }
        StopBy::Sigterm => {
            signal(sup.pid, Signal::SIGTERM);
            None
        }
    };
    // The incumbent was asked through the control protocol and drains: it
    // waits for our requests.
    wait_until(Duration::from_secs(20), "the incumbent to drain", || {
        sup.stderr_log().contains(&format!(
            "stopping the incumbent (pid {incumbent}) through the control protocol"
        ))
    });
    assert!(
        sup.try_exit().is_none(),
        "the supervisor waits for the drain"
    );
    for mut p in pending {
        p.stream.write_all(SECOND_HALF).expect("finish the body");
        let (code, head, _) = read_response(&mut p.stream);
        assert_eq!(code, 200, "{} in flight during the stop", p.key);
        assert!(head.contains("connection: close"), "{head}");
        let mut rest = vec![];
        let n = p.stream.read_to_end(&mut rest).expect("then EOF");
        assert_eq!(n, 0, "nothing after the last response");
    }

    if let Some(stop) = stop {
        let out = finish_within(stop, Duration::from_secs(60), "handoff stop");
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        let events = json_lines(&out);
        assert_eq!(event(&events, "stopping")["incumbent_pid"], incumbent);
        let p = &event(&events, "stopped")["processes"][0];
        assert_eq!(p["pid"], incumbent, "{events:?}");
        assert_eq!(p["role"], "incumbent");
        assert_eq!(p["how"], "exited");
        assert_eq!(p["exit"], "exit status 0");
        assert_eq!(p["asked"], "control-protocol");
    }
    let mut status = None;
    wait_until(Duration::from_secs(30), "the supervisor to exit", || {
        status = sup.try_exit();
        status.is_some()
    });
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "{}",
        sup.stderr_log()
    );
    // (The stderr reader may still be catching up with the last lines.)
    let summary = format!("incumbent pid {incumbent} exited after");
    wait_until(Duration::from_secs(10), "the stop summary", || {
        sup.stderr_log().contains(&summary)
    });
    // The incumbent was reaped by the supervisor (no zombie, no orphan).
    assert!(
        proc_stat(incumbent).is_none(),
        "pid {incumbent} still there"
    );
    drop(sup);

    // The writes finished during the stop are durable.
    let sup = Supervisor::start(&dirs.runtime, &dirs.state, &demo_bin(), &[]);
    for i in 0..3 {
        let r = Client::new(sup.addr, false)
            .get(&format!("/kv/stop-{i}"))
            .expect("GET");
        assert_eq!(r.status, 200);
        assert_eq!(r.body, [FIRST_HALF, SECOND_HALF].concat());
    }
}

#[test]
fn stop_command_drains_requests_in_flight() {
    let _guard = begin_test("stop_command", Duration::from_secs(120));
    stop_with_requests_in_flight(StopBy::Command);
}

#[test]
fn sigterm_drains_requests_in_flight() {
    let _guard = begin_test("stop_sigterm", Duration::from_secs(120));
    stop_with_requests_in_flight(StopBy::Sigterm);
}

#[test]
fn sighup_upgrades() {
    let _guard = begin_test("sighup", Duration::from_secs(120));
    let dirs = TestDirs::new();
    let sup = Supervisor::start(&dirs.runtime, &dirs.state, &demo_bin(), &[]);
    signal(sup.pid, Signal::SIGHUP);
    let s = wait_status(&dirs.runtime, "a committed SIGHUP upgrade", |s| {
        s["handoffs"]["committed"] == 1
    });
    let last = &s["last_handoff"];
    assert_eq!(last["trigger"], "sighup", "{s:#}");
    assert_eq!(last["old_pid"], sup.first_pid);
    assert_eq!(phase_names(&last["phases"]), COMMITTED_PHASES);
    let new_pid = last["new_pid"].as_u64().expect("new pid") as u32;
    assert_ne!(new_pid, sup.first_pid);
    sup.wait_settled(new_pid, Duration::from_secs(20));
    assert!(status_text(&dirs.runtime).contains("committed by SIGHUP"));
}

#[test]
fn concurrent_upgrades_with_wait_both_commit_in_turn() {
    let _guard = begin_light_test("upgrade_wait", Duration::from_secs(120));
    let dirs = TestDirs::new();
    let sup = Supervisor::start(&dirs.runtime, &dirs.state, &demo_bin(), &[]);
    // Each successor warms up for a while, so the handoffs overlap.
    let slow = dirs.env_wrapper("slow", &[("HANDOFF_DEMO_WARMUP_MS", "1500")]);
    let upgrade = |json: bool| {
        let mut cmd = Command::new(handoff_bin());
        cmd.args(["upgrade", "--wait", "30s", "--binary"])
            .arg(&slow)
            .arg("--runtime-dir")
            .arg(&dirs.runtime);
        if json {
            cmd.arg("--json");
        }
        spawn_piped(cmd)
    };
    let first = upgrade(true);
    wait_status(&dirs.runtime, "the first upgrade in flight", |s| {
        !s["in_flight"].is_null()
    });
    let second = upgrade(false);
    let first = finish_within(first, Duration::from_secs(60), "first upgrade");
    let second = finish_within(second, Duration::from_secs(60), "second upgrade");
    assert_eq!(first.status.code(), Some(0), "{}", text(&first.stderr));
    assert_eq!(second.status.code(), Some(0), "{}", text(&second.stderr));
    // The second waited, said so, and then handed off from the first's process.
    let err = text(&second.stderr);
    assert!(
        err.lines().any(|l| l.starts_with("waiting for ")
            && l.contains("(handoff upgrade, ")
            && l.ends_with("to finish (up to 30.0s)")),
        "{err}"
    );
    let a = event(&json_lines(&first), "committed").clone();
    let out = text(&second.stdout);
    let expect = format!("committed: pid {} -> ", a["new_pid"]);
    assert!(out.contains(&expect), "{out}\nfirst: {a}");
    let s = status_json(&dirs.runtime);
    assert_eq!(s["handoffs"]["committed"], 2, "{s:#}");
    let last = s["last_handoff"]["new_pid"].as_u64().expect("pid") as u32;
    sup.wait_settled(last, Duration::from_secs(20));
}

#[test]
fn sigkill_of_the_incumbent_refuses_no_connection() {
    let _guard = begin_test("sigkill_backlog", Duration::from_secs(120));
    let dirs = TestDirs::new();
    let sup = Supervisor::start(&dirs.runtime, &dirs.state, &demo_bin(), &[]);
    // A new connection per request, continuously.
    let load = Load::start(sup.addr, 0, 2).expect("load");
    load.wait_progress(50, Duration::from_secs(20), "before the kill");
    signal(sup.first_pid, Signal::SIGKILL);
    wait_until(
        Duration::from_secs(20),
        "a restarted incumbent serving",
        || matches!(sup.serving_pid(), Ok(p) if p != sup.first_pid),
    );
    load.wait_progress(50, Duration::from_secs(20), "after the restart");
    let report = load.stop();
    // Connections the dying process had accepted may be reset; none that
    // arrived meanwhile is refused: they waited in the supervisor's backlog.
    assert_eq!(report.refused, 0, "{report}");
    assert!(report.ok >= 100, "{report}");
    let s = status_json(&dirs.runtime);
    assert_eq!(
        s["handoffs"]["committed"], 0,
        "a restart is no handoff: {s:#}"
    );
    assert!(
        s["incumbent_uptime_ms"].as_u64() < s["supervisor_uptime_ms"].as_u64(),
        "{s:#}"
    );
}

/// A PUT whose 1 MiB body arrives at ~160 KiB/s, in 8 KiB pieces (pacing
/// the upload, not waiting for anything): a request that is slow for good
/// reasons, above the rate a draining server cuts slower bodies at
/// (handoff-tokio's 64 KiB/s), that takes at least 6.4 s in all. The thread ends when
/// the body is sent or the server is gone.
fn slow_upload(addr: SocketAddr) -> std::thread::JoinHandle<()> {
    let mut stream = accepted_connection(addr);
    let total = 1usize << 20;
    let head = format!("PUT /kv/upload HTTP/1.1\r\nHost: t\r\nContent-Length: {total}\r\n\r\n");
    stream.write_all(head.as_bytes()).expect("write");
    std::thread::spawn(move || {
        let piece = [b'u'; 8 * 1024];
        for _ in 0..total / piece.len() {
            if stream.write_all(&piece).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    })
}

/// A request that does not complete within the grace — here an upload
/// still arriving, at a rate no drain cuts (a client that stops sending is
/// cut after 1 s, see `tokio_services.rs`) — holds the drain past it: the
/// supervisor refuses upgrades meanwhile, then kills the service, reports
/// it, and `handoff stop` exits 1.
#[test]
fn stop_escalates_to_sigkill_after_the_grace() {
    let _guard = begin_test("stop_grace", Duration::from_secs(120));
    let dirs = TestDirs::new();
    let mut sup = Supervisor::start(&dirs.runtime, &dirs.state, &demo_bin(), &[]);
    let incumbent = sup.first_pid;
    let upload = slow_upload(sup.addr);
    let mut cmd = Command::new(handoff_bin());
    cmd.args(["stop", "--grace", "3s", "--runtime-dir"])
        .arg(&dirs.runtime);
    let stop = spawn_piped(cmd);
    let s = wait_status(&dirs.runtime, "stopping", |s| s["stopping"] == true);
    assert_eq!(s["incumbent_pid"], incumbent);
    assert!(status_text(&dirs.runtime).contains("STOPPING (no new upgrades)"));
    let out = run_handoff(&["upgrade"], &dirs.runtime, Duration::from_secs(20));
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("the supervisor is stopping"),
        "{}",
        text(&out.stderr)
    );
    let out = finish_within(stop, Duration::from_secs(60), "handoff stop");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let o = text(&out.stdout);
    assert!(
        o.lines().any(|l| l.contains(&format!("pid {incumbent}"))
            && l.contains("killed")
            && l.contains("killed by signal 9")),
        "{o}"
    );
    let mut status = None;
    wait_until(Duration::from_secs(30), "the supervisor to exit", || {
        status = sup.try_exit();
        status.is_some()
    });
    assert_eq!(status.and_then(|s| s.code()), Some(0));
    assert!(
        proc_stat(incumbent).is_none(),
        "pid {incumbent} still there"
    );
    upload.join().expect("the upload thread");
}

/// A stop that arrives during an upgrade lets it commit, then stops the
/// process it committed to.
#[test]
fn stop_waits_for_the_handoff_in_flight() {
    let _guard = begin_test("stop_in_flight", Duration::from_secs(120));
    let dirs = TestDirs::new();
    let mut sup = Supervisor::start(&dirs.runtime, &dirs.state, &demo_bin(), &[]);
    let slow = dirs.env_wrapper("slow", &[("HANDOFF_DEMO_WARMUP_MS", "1500")]);
    let mut cmd = Command::new(handoff_bin());
    cmd.args(["upgrade", "--json", "--binary"])
        .arg(&slow)
        .arg("--runtime-dir")
        .arg(&dirs.runtime);
    let upgrade = spawn_piped(cmd);
    wait_status(&dirs.runtime, "the upgrade in flight", |s| {
        !s["in_flight"].is_null()
    });
    let mut cmd = Command::new(handoff_bin());
    cmd.args(["stop", "--json", "--runtime-dir"])
        .arg(&dirs.runtime);
    let stop = spawn_piped(cmd);

    let up = finish_within(upgrade, Duration::from_secs(60), "the upgrade");
    assert_eq!(up.status.code(), Some(0), "{}", text(&up.stderr));
    let new_pid = event(&json_lines(&up), "committed")["new_pid"].clone();
    let out = finish_within(stop, Duration::from_secs(60), "handoff stop");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let events = json_lines(&out);
    assert!(
        !event(&events, "stopping")["in_flight"].is_null(),
        "{events:?}"
    );
    let stopped = event(&events, "stopped");
    assert!(
        stopped["waited_for_handoff_ms"].as_f64() > Some(0.0),
        "{stopped}"
    );
    let p = &stopped["processes"][0];
    assert_eq!(p["pid"], new_pid, "{stopped}");
    assert_eq!(p["role"], "incumbent");
    assert_eq!(p["how"], "exited");
    let mut status = None;
    wait_until(Duration::from_secs(30), "the supervisor to exit", || {
        status = sup.try_exit();
        status.is_some()
    });
    assert_eq!(status.and_then(|s| s.code()), Some(0));
}

/// A script that starts `handoff run` and upgrades at once: `--wait` also
/// covers a supervisor that is not up yet (no admin socket), instead of
/// "cannot reach the supervisor". Without it, the error comes at once.
#[test]
fn upgrade_with_wait_waits_for_a_supervisor_still_starting() {
    let _guard = begin_test("upgrade_waits_for_startup", Duration::from_secs(90));
    let dirs = TestDirs::new();
    let early = run_handoff(&["upgrade"], &dirs.runtime, Duration::from_secs(20));
    assert_eq!(
        early.status.code(),
        Some(2),
        "no supervisor, no --wait: exit 2"
    );
    assert!(
        String::from_utf8_lossy(&early.stderr).contains("cannot reach the supervisor"),
        "{}",
        String::from_utf8_lossy(&early.stderr)
    );
    let mut cmd = Command::new(handoff_bin());
    cmd.args(["upgrade", "--runtime-dir"])
        .arg(&dirs.runtime)
        .args(["--wait", "60s"]);
    let waiting = spawn_piped(cmd);
    let sup = Supervisor::start(&dirs.runtime, &dirs.state, &demo_bin(), &[]);
    let out = finish_within(waiting, Duration::from_secs(60), "handoff upgrade --wait");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!("committed: pid {} ->", sup.first_pid)),
        "{stdout}"
    );
}
