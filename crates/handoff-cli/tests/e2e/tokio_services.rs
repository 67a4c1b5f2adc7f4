//! Real tokio services — `examples/axum` and `examples/hyper`, built on
//! `handoff-tokio` — upgraded under load by the real `handoff` binary:
//! keep-alive, fresh-connection, slow-request and h2c clients that never
//! retry see no failed request across 20 upgrades, an aborted upgrade, and a
//! `handoff stop` with slow requests in flight.

use crate::http_load;
use crate::support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use http_load::{Kind, Load, Stats};
use support::*;

const UPGRADES: usize = 20;

fn assert_no_failures(stats: &Stats, sup: &Supervisor) {
    stats.assert_no_failures(&format!("supervisor stderr:\n{}", sup.stderr_log()));
}

/// Upgrades `UPGRADES` times; after each, waits until the new build has
/// answered the load — a slow request too, when there are slow clients — so
/// every upgrade happens under traffic, with slow requests in flight.
fn upgrade_under_load(sup: &Supervisor, load: &Load, slow: bool) -> Vec<u32> {
    let mut pids = vec![sup.first_pid];
    for i in 0..UPGRADES {
        let c = sup.upgrade(&[]).expect_committed();
        assert_eq!(c.old_pid, *pids.last().unwrap(), "upgrade {i}");
        pids.push(c.new_pid);
        wait_until(
            Duration::from_secs(20),
            &format!(
                "upgrade {i}: the new build (pid {}) answers the load",
                c.new_pid
            ),
            || {
                load.stats.answered_by(c.new_pid) >= 20
                    && (!slow || load.stats.slow_answered_by(c.new_pid) >= 1)
            },
        );
    }
    pids
}

/// The axum example under `handoff run EXTRA…`: keep-alive, fresh and slow
/// clients through [`UPGRADES`] upgrades; no failed request, and every
/// retired build answered the slow requests it had in flight (a slow
/// request is answered by the build that accepted it).
fn axum_example_under_load(name: &str, extra: &[&str]) {
    let _guard = begin_test(name, Duration::from_secs(240));
    let dirs = TestDirs::new();
    let sup = Supervisor::start(&dirs.runtime, &dirs.state, &example("example-axum"), extra);
    let load = Load::start(
        sup.addr,
        &[(Kind::KeepAlive, 16), (Kind::Fresh, 4), (Kind::Slow, 4)],
    );
    wait_until(Duration::from_secs(20), "the first build answers", || {
        load.stats.answered_by(sup.first_pid) >= 50
    });
    let pids = upgrade_under_load(&sup, &load, true);
    let stats = load.finish();
    assert_no_failures(&stats, &sup);
    let slow = stats.slow_by_pid.lock().unwrap().clone();
    let retired_slow = pids[..UPGRADES]
        .iter()
        .filter(|p| slow.contains_key(p))
        .count();
    assert_eq!(
        retired_slow, UPGRADES,
        "every retired build answered the slow requests it had: {slow:?}"
    );
    eprintln!(
        "axum {extra:?}: {} requests ({} slow) across {UPGRADES} upgrades, 0 failed",
        stats.ok.load(std::sync::atomic::Ordering::SeqCst),
        stats.slow_ok.load(std::sync::atomic::Ordering::SeqCst)
    );
}

#[test]
fn axum_example_upgrades_20_times_under_keep_alive_load_with_no_failed_request() {
    axum_example_under_load("axum_example_upgrades", &[]);
}

#[test]
fn hyper_example_serves_h1_and_h2c_through_20_upgrades_and_an_abort() {
    let _guard = begin_test("hyper_example_upgrades", Duration::from_secs(240));
    let dirs = TestDirs::new();
    let unhealthy = dirs.root.path().join("unhealthy");
    let sup = Supervisor::start_with(
        &dirs.runtime,
        &dirs.state,
        &example("example-hyper"),
        &[],
        &StartOpts {
            env: vec![(
                "HELLO_UNHEALTHY".into(),
                unhealthy.to_string_lossy().into_owned(),
            )],
            ..StartOpts::default()
        },
    );
    let load = Load::start(
        sup.addr,
        &[
            (Kind::H2, 2),
            (Kind::KeepAlive, 8),
            (Kind::Fresh, 2),
            (Kind::Slow, 2),
        ],
    );
    wait_until(Duration::from_secs(20), "the first build answers", || {
        load.stats.answered_by(sup.first_pid) >= 50
    });
    let pids = upgrade_under_load(&sup, &load, false);
    let last = *pids.last().unwrap();

    // A build whose health check fails: the upgrade aborts, the old build
    // serves on, and the new one (which accepted early, being stateless)
    // finishes what it took.
    std::fs::write(&unhealthy, b"").unwrap();
    let out = sup.upgrade(&[]);
    out.expect_aborted(&["unhealthy"]);
    let before = load.stats.answered_by(last);
    wait_until(
        Duration::from_secs(20),
        "the old build serves on after the abort",
        || load.stats.answered_by(last) >= before + 50,
    );
    std::fs::remove_file(&unhealthy).unwrap();
    let c = sup.upgrade(&[]).expect_committed();
    assert_eq!(
        c.old_pid, last,
        "the aborted upgrade left the old build in place"
    );
    wait_until(
        Duration::from_secs(20),
        "the build after the abort answers",
        || load.stats.answered_by(c.new_pid) >= 20,
    );

    let stats = load.finish();
    assert_no_failures(&stats, &sup);
    assert!(
        stats.h2_ok.load(std::sync::atomic::Ordering::SeqCst) > 100,
        "too few h2c streams answered to prove anything"
    );
    eprintln!(
        "hyper: {} requests ({} h2c streams; {} h2c requests never sent, retried) across {} upgrades and an abort, 0 failed",
        stats.ok.load(std::sync::atomic::Ordering::SeqCst),
        stats.h2_ok.load(std::sync::atomic::Ordering::SeqCst),
        stats.h2_unsent.load(std::sync::atomic::Ordering::SeqCst),
        UPGRADES + 1
    );
}

/// Sends `GET path` on `s` and reads one response (Content-Length bodies).
fn get(s: &mut TcpStream, path: &str) -> std::io::Result<(String, String)> {
    write!(s, "GET {path} HTTP/1.1\r\nHost: test\r\n\r\n")?;
    read_response(s)
}

fn read_response(s: &mut TcpStream) -> std::io::Result<(String, String)> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("closed after {:?}", String::from_utf8_lossy(&buf)),
            ));
        }
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let len = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())
                .flatten()
        })
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body)?;
    Ok((head, String::from_utf8_lossy(&body).into_owned()))
}

#[test]
fn handoff_stop_finishes_slow_requests_in_flight_then_exits_0() {
    let _guard = begin_test("stop_with_slow_requests", Duration::from_secs(120));
    let dirs = TestDirs::new();
    let mut sup = Supervisor::start(&dirs.runtime, &dirs.state, &example("example-axum"), &[]);
    let addr: SocketAddr = sup.addr;
    // Connections the service has certainly accepted (each answered once),
    // then a slow request written on each: in flight when the stop begins.
    let mut conns: Vec<TcpStream> = (0..8)
        .map(|_| {
            let mut s = TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let (head, _) = get(&mut s, "/").unwrap();
            assert!(head.starts_with("HTTP/1.1 200"), "{head}");
            s
        })
        .collect();
    for s in &mut conns {
        write!(s, "GET /slow HTTP/1.1\r\nHost: test\r\n\r\n").unwrap();
    }
    let readers: Vec<_> = conns
        .into_iter()
        .map(|mut s| {
            std::thread::spawn(move || {
                let r = read_response(&mut s);
                (r, Instant::now())
            })
        })
        .collect();
    let out = run_handoff(&["stop"], &dirs.runtime, Duration::from_secs(60));
    let stopped = Instant::now();
    let stop_log = format!(
        "stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for r in readers {
        let (res, at) = r.join().unwrap();
        let (head, body) = res.unwrap_or_else(|e| {
            panic!(
                "a slow request in flight at the stop failed: {e}\n{stop_log}\nsupervisor:\n{}",
                sup.stderr_log()
            )
        });
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(
            head.to_ascii_lowercase().contains("connection: close"),
            "the drain closes the connection after the answer: {head}"
        );
        assert!(body.starts_with("slow from pid"), "{body}");
        assert!(
            at <= stopped,
            "handoff stop returned before a slow request was answered"
        );
    }
    assert_eq!(out.status.code(), Some(0), "handoff stop: {stop_log}");
    wait_until(Duration::from_secs(20), "the supervisor exits", || {
        sup.try_exit().is_some()
    });
}

/// The same axum binary, unchanged, under `handoff run --mode notify`
/// (socket activation + `READY=1`, as under systemd): handoff-tokio sees no
/// control channel, serves at once, says READY=1 and drains on SIGTERM.
#[test]
fn axum_example_in_notify_mode_upgrades_under_load_with_no_failed_request() {
    axum_example_under_load("axum_example_notify_mode", &["--mode", "notify"]);
}

/// A service with state (`examples/kv`: an fsync'd log, stateful hooks):
/// writers and readers through 20 upgrades and an abort after the seal;
/// 0 failed requests, and every acknowledged write reads back.
#[test]
fn kv_example_with_state_loses_no_acknowledged_write_across_upgrades() {
    let _guard = begin_test("kv_example_upgrades", Duration::from_secs(240));
    let dirs = TestDirs::new();
    let sup = Supervisor::start(&dirs.runtime, &dirs.state, &example("example-kv"), &[]);
    let load = Load::start(sup.addr, &[(Kind::Writer, 8)]);
    wait_until(Duration::from_secs(20), "writes are acknowledged", || {
        load.stats.ok.load(std::sync::atomic::Ordering::SeqCst) >= 50
    });
    let mut last = sup.first_pid;
    for i in 0..UPGRADES {
        let c = sup.upgrade(&[]).expect_committed();
        assert_eq!(c.old_pid, last, "upgrade {i}");
        last = c.new_pid;
        let before = load.stats.ok.load(std::sync::atomic::Ordering::SeqCst);
        wait_until(
            Duration::from_secs(20),
            &format!("upgrade {i}: writes go on"),
            || load.stats.ok.load(std::sync::atomic::Ordering::SeqCst) >= before + 20,
        );
    }
    // A new build that dies right after taking the state lock (a crash
    // point, compiled in by `--all-features`): the upgrade aborts after the
    // old build sealed, and the old build re-takes the lock, reopens its log
    // (`resume`) and accepts again.
    let crashing = dirs.root.path().join("kv-crash-after-lock.sh");
    write_executable(
        &crashing,
        format!(
            "#!/bin/sh\nHANDOFF_CRASH_AT=n-after-lock exec {} \"$@\"\n",
            example("example-kv").display()
        )
        .as_bytes(),
    );
    let out = sup.upgrade(&["--binary", crashing.to_str().unwrap()]);
    assert_ne!(
        out.code,
        Some(0),
        "the crash point did not fire: target/debug/example-kv was built without its \
         `crash-points` feature; build it with `cargo build -p example-kv --all-features` \
         (`cargo test --workspace --all-features` does)\n{out}"
    );
    out.expect_aborted(&["exit", "died", "signal", "killed"]);
    let before = load.stats.ok.load(std::sync::atomic::Ordering::SeqCst);
    wait_until(
        Duration::from_secs(20),
        "the old build writes again after the abort",
        || load.stats.ok.load(std::sync::atomic::Ordering::SeqCst) >= before + 20,
    );
    assert_eq!(
        sup.upgrade(&[]).expect_committed().old_pid,
        last,
        "the aborted upgrade left the old build in place"
    );

    let stats = load.finish();
    assert_no_failures(&stats, &sup);
    http_load::assert_acked_read_back(sup.addr, &stats, 8);
}

/// A connection to the kv example that stored `first` = `1` (so the
/// incumbent surely accepted it) and then sent `PUT /kv/late` with half its
/// 4-byte body (`ab`): its handler runs, waiting for the rest, and a
/// stateful drain waits for it. Reads time out after `read_timeout`.
fn stalled_put(addr: SocketAddr, read_timeout: Duration) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(read_timeout)).unwrap();
    write!(
        s,
        "PUT /kv/first HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\n\r\n1"
    )
    .unwrap();
    let (head, _) = read_response(&mut s).unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    write!(
        s,
        "PUT /kv/late HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\n\r\nab"
    )
    .unwrap();
    s
}

/// A request still in flight when the drain grace of a service with state
/// runs out (its client sent half the body and stalled) is cut before the
/// seal: it can never write state that was handed on, and it does not hold
/// the upgrade beyond `--drain-grace`.
#[test]
fn kv_example_cuts_a_stalled_connection_before_the_seal() {
    let _guard = begin_test("kv_example_stalled_client", Duration::from_secs(120));
    let dirs = TestDirs::new();
    let sup = Supervisor::start(&dirs.runtime, &dirs.state, &example("example-kv"), &[]);
    let mut stalled = stalled_put(sup.addr, Duration::from_secs(20));

    let out = sup.upgrade(&["--drain-grace", "500ms"]);
    out.expect_committed();
    // Finishing the request now must not store anything through the old
    // build: its connection was cut before the seal.
    let _ = write!(stalled, "cd");
    match read_response(&mut stalled) {
        Err(_) => {}
        Ok((head, body)) => panic!("the stalled request was answered after the seal: {head}{body}"),
    }
    assert_eq!(
        http_load::get_once(sup.addr, "/kv/late").unwrap().0,
        404,
        "nothing was written by the cut connection"
    );
    assert_eq!(
        http_load::get_once(sup.addr, "/kv/first").unwrap(),
        (200, b"1".to_vec()),
        "what was acknowledged before survived"
    );
}

/// Slowloris against a service with state (issue 14, item 4): clients that
/// stopped halfway through a request head, and idle keep-alive clients that
/// never close their side, are connected when an upgrade drains. The drain
/// — during which nobody accepts, the new build waiting for Commit — ends
/// once the head grace (1 s by default) is over, each half head answered
/// `408 Request Timeout`, instead of lasting the whole `--drain-grace` (the
/// 30 s given here; it used to, for one such client); and a request sent
/// during the upgrade is answered by the new build.
#[test]
fn kv_example_drain_is_not_held_by_half_sent_heads() {
    let _guard = begin_test("kv_example_slowloris", Duration::from_secs(120));
    let dirs = TestDirs::new();
    let sup = Supervisor::start(&dirs.runtime, &dirs.state, &example("example-kv"), &[]);
    let connect = || {
        let mut s = TcpStream::connect(sup.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        // Accepted by the incumbent for sure: one exchange first.
        let (head, _) = get(&mut s, "/kv/none").unwrap();
        assert!(head.starts_with("HTTP/1.1 404"), "{head}");
        s
    };
    let mut slow: Vec<TcpStream> = (0..4).map(|_| connect()).collect();
    for s in &mut slow {
        write!(s, "GET /kv/a HTTP/1.1\r\nHost: x\r\n").unwrap();
    }
    let idle: Vec<TcpStream> = (0..16).map(|_| connect()).collect();

    // A client that connects as the upgrade starts: answered by whichever
    // build accepts it, without waiting for the drain grace.
    let addr = sup.addr;
    let (go, started) = std::sync::mpsc::channel::<()>();
    let during = std::thread::spawn(move || {
        started.recv().unwrap();
        let mut s = TcpStream::connect(addr)?;
        s.set_read_timeout(Some(Duration::from_secs(40)))?;
        get(&mut s, "/kv/none")
    });
    go.send(()).unwrap();
    let out = sup.upgrade(&["--drain-grace", "30s"]);
    let answered = during.join().unwrap();
    let c = out.expect_committed();
    let (head, _) = answered.expect("the request sent during the upgrade was answered");
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    let draining = out.phase_ms("draining");
    // The half-sent heads moved to the new build with their bytes, like
    // every idle connection (docs/connection-transfer.md): the drain waits
    // for none of them — not even the 1 s head grace after which a build
    // that cannot move them answers 408 (handoff-tokio's unit tests).
    assert!(
        draining < 1_000.0,
        "the drain took {draining} ms: held by the half-sent heads\n{out}"
    );
    // 4 half heads and 16 idle (and the client of the upgrade's start,
    // if the old build accepted it first).
    assert!(c.connections_moved >= Some(20), "{out}");
    for (i, s) in slow.iter_mut().enumerate() {
        // The rest of the head, on the same connection: the new build
        // answers the whole request.
        write!(s, "\r\n").unwrap();
        let (head, body) =
            read_response(s).unwrap_or_else(|e| panic!("half head {i}: no answer: {e}"));
        assert!(head.starts_with("HTTP/1.1 404"), "half head {i}: {head}");
        let _ = body;
    }
    // The old build is gone once its sockets finished closing (the idle
    // clients' included, whether or not they close their side).
    drop(idle);
    wait_until(
        Duration::from_secs(20),
        "the old build exits, the new one is the only service process",
        || sup.children() == [c.new_pid],
    );
}

/// Slow POST against a service with state (issue 14, item 4, the body's
/// turn): a client that sent a request head and half its body, then
/// stopped, is connected when an upgrade drains. Its request cannot move
/// (it is mid-request) and used to hold the drain — nobody accepting — for
/// the whole `--drain-grace` (30 s here). Now its body is cut once the head
/// grace (1 s by default) is over: the handler's read fails, the client
/// gets `408` and a close, nothing is stored, and the upgrade commits.
#[test]
fn kv_example_drain_is_not_held_by_a_stalled_body() {
    let _guard = begin_test("kv_example_slow_body", Duration::from_secs(120));
    let dirs = TestDirs::new();
    let sup = Supervisor::start(&dirs.runtime, &dirs.state, &example("example-kv"), &[]);
    let mut stalled = stalled_put(sup.addr, Duration::from_secs(40));

    let out = sup.upgrade(&["--drain-grace", "30s"]);
    out.expect_committed();
    let draining = out.phase_ms("draining");
    assert!(
        draining < 10_000.0,
        "the drain took {draining} ms: held by the stalled body\n{out}"
    );
    let (head, _) = read_response(&mut stalled).expect("the stalled PUT is answered");
    assert!(head.starts_with("HTTP/1.1 408"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("connection: close"),
        "{head}"
    );
    assert_eq!(
        http_load::get_once(sup.addr, "/kv/late").unwrap().0,
        404,
        "nothing was written by the cut request"
    );
    assert_eq!(
        http_load::get_once(sup.addr, "/kv/first").unwrap(),
        (200, b"1".to_vec()),
        "what was acknowledged before survived"
    );
}

/// An upgrade aborted while the old build drains (issue 14, item 4): the
/// old build stops draining and accepts again at once, instead of sitting
/// out the rest of its drain grace. It was found with a service with state
/// whose drain was held by a request stalled mid-body, the incumbent
/// SIGSTOPped mid-drain so the supervisor aborted on liveness, then
/// SIGCONTed — it used to answer again only when its 30 s drain grace ran
/// out. A stalled body now holds a drain only for the head grace (1 s), less
/// than any liveness timeout, so the abort comes from the other side: the
/// new build is killed while the old one drains, within that second. That
/// also proves the supervisor notices the new build's death *during* the
/// drain (it used to learn of it only when it sent Begin, after the whole
/// drain — the stalled body would then have been cut, `408`, not `200`).
#[test]
fn kv_example_accepts_again_at_once_when_an_upgrade_aborts_mid_drain() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let _guard = begin_test("kv_example_abort_mid_drain", Duration::from_secs(120));
    let dirs = TestDirs::new();
    let sup = Supervisor::start(&dirs.runtime, &dirs.state, &example("example-kv"), &[]);
    let mut stalled = stalled_put(sup.addr, Duration::from_secs(40));

    let mut upgrade = std::process::Command::new(handoff_bin())
        .args(["upgrade", "--json", "--drain-grace", "30s", "--runtime-dir"])
        .arg(&sup.runtime_dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_until(Duration::from_secs(20), "the old build is draining", || {
        sup.stderr_log().contains("next=\"draining\"")
    });
    let next: Vec<u32> = sup
        .children()
        .into_iter()
        .filter(|&p| p != sup.first_pid)
        .collect();
    assert_eq!(next.len(), 1, "one new build: {next:?}");
    kill(Pid::from_raw(next[0] as i32), Signal::SIGKILL).unwrap();
    let mut status = None;
    let done = poll_until(Duration::from_secs(30), || {
        status = upgrade.try_wait().unwrap();
        status.is_some()
    });
    if !done {
        let _ = upgrade.kill();
        panic!("the upgrade did not end with its new build killed");
    }
    let mut out = String::new();
    upgrade
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert!(
        !status.unwrap().success() && out.contains("\"aborted\""),
        "{out}"
    );

    // Resumed: a new connection is accepted and answered by the old build
    // now, not when its drain grace would have run out.
    let resumed = Instant::now();
    let got = http_load::get_once(sup.addr, "/kv/first").unwrap();
    assert_eq!(got, (200, b"1".to_vec()));
    assert!(
        resumed.elapsed() < Duration::from_secs(15),
        "answered {:?} after the abort: the drain ran on (grace 30 s)",
        resumed.elapsed()
    );
    // And the stalled request, its connection still open, completes: had
    // the drain gone on, its body would have been cut (408) a second in.
    write!(stalled, "cd").unwrap();
    let (head, _) = read_response(&mut stalled).unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(
        http_load::get_once(sup.addr, "/kv/late").unwrap(),
        (200, b"abcd".to_vec())
    );
    assert_eq!(sup.children(), [sup.first_pid], "the old build serves on");
}
