//! Live connections moved to the new build (protocol versions 3 and 4,
//! docs/connection-transfer.md), through the real `handoff` binary: 500
//! keep-alive clients that never retry keep the very same TCP connection
//! across 20 upgrades of the axum example and of the demo (with state, and
//! writers whose every acknowledged write must read back) — no failed
//! request, no reconnect, the last answer from the final build. An old
//! build on either side of an upgrade (protocol version 2) falls back to
//! closing connections, with no failed request.

use crate::http_load;
use crate::support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use http_load::{Kind, Load, Stats};
use support::*;

const UPGRADES: usize = 20;
const CLIENTS: usize = 500;
/// Between one sticky client's requests: 500 clients then send ~2,500
/// requests a second, which two cores serve in a debug build.
const PAUSE: Duration = Duration::from_millis(200);

fn assert_no_failures(stats: &Stats, sup: &Supervisor) {
    stats.assert_no_failures(&format!("supervisor stderr:\n{}", sup.stderr_log()));
}

/// Every sticky client kept its first connection (same local port, no
/// reconnect) and was last answered by `last_pid`.
fn assert_sticky(stats: &Stats, n: usize, last_pid: u32) {
    let reconnects = stats.reconnects.lock().unwrap().clone();
    assert!(
        reconnects.is_empty(),
        "{} reconnects; first: {:#?}",
        reconnects.len(),
        &reconnects[..reconnects.len().min(20)]
    );
    let sticky = stats.sticky.lock().unwrap().clone();
    assert_eq!(sticky.len(), n, "every client was answered");
    for (id, (first, now, pid)) in &sticky {
        assert_eq!(first, now, "client {id} changed connection");
        assert_eq!(*pid, last_pid, "client {id}'s last answer");
    }
}

/// Upgrades `UPGRADES` times; after each, waits until every sticky client
/// has been answered by the new build. Returns the final pid and the
/// connections each upgrade moved.
fn upgrade_keeping_connections(sup: &Supervisor, sticky: &Load, n: usize) -> (u32, Vec<u64>) {
    let mut last = sup.first_pid;
    let mut moved = vec![];
    for i in 0..UPGRADES {
        let c = sup.upgrade(&[]).expect_committed();
        assert_eq!(c.old_pid, last, "upgrade {i}");
        let m = c
            .connections_moved
            .unwrap_or_else(|| panic!("upgrade {i}: the report says nothing was moved: {c:?}"));
        assert_eq!(c.connections_closed, Some(0), "upgrade {i}: {c:?}");
        moved.push(m);
        last = c.new_pid;
        wait_until(
            Duration::from_secs(30),
            &format!("upgrade {i}: every client answered by pid {last}"),
            || {
                let s = sticky.stats.sticky.lock().unwrap();
                s.len() == n && s.values().all(|&(_, _, pid)| pid == last)
            },
        );
    }
    (last, moved)
}

#[test]
fn axum_example_keeps_500_keep_alive_connections_through_20_upgrades() {
    let _guard = begin_test("moved_axum", Duration::from_secs(300));
    let dirs = TestDirs::new();
    let sup = Supervisor::start(&dirs.runtime, &dirs.state, &example("example-axum"), &[]);
    let sticky = Load::sticky(sup.addr, CLIENTS, "/", PAUSE);
    let (last, moved) = upgrade_keeping_connections(&sup, &sticky, CLIENTS);
    let stats = sticky.finish();
    assert_no_failures(&stats, &sup);
    assert_sticky(&stats, CLIENTS, last);
    assert_eq!(
        moved.iter().sum::<u64>(),
        (CLIENTS * UPGRADES) as u64,
        "every connection moved at every upgrade: {moved:?}"
    );
}

#[test]
fn demo_with_state_keeps_500_keep_alive_connections_and_every_acknowledged_write() {
    let _guard = begin_test("moved_demo", Duration::from_secs(300));
    let dirs = TestDirs::new();
    let sup = Supervisor::start(&dirs.runtime, &dirs.state, &demo_bin(), &[]);
    let sticky = Load::sticky(sup.addr, CLIENTS, "/version", PAUSE);
    let writers = Load::start(sup.addr, &[(Kind::Writer, 4)]);
    wait_until(Duration::from_secs(20), "writes are acknowledged", || {
        writers.stats.ok.load(Ordering::SeqCst) >= 20
    });
    let (last, _) = upgrade_keeping_connections(&sup, &sticky, CLIENTS);
    let stats = sticky.finish();
    let written = writers.finish();
    assert_no_failures(&stats, &sup);
    assert_no_failures(&written, &sup);
    assert_sticky(&stats, CLIENTS, last);
    http_load::assert_acked_read_back(sup.addr, &written, 4);
}

/// Protocol version 2 on either side: nothing moves (the report says so by
/// saying nothing), connections close politely as before, and no request
/// fails. Version 3 on either side: they move through the supervisor.
/// Both sides at 4 or later: they move straight from one to the other,
/// also between a build at 4 and one at 5 (the move socket's frames are of
/// version 4 whatever each side negotiated; a build at 5 is not asked to
/// seal).
#[test]
fn an_old_build_on_either_side_falls_back_to_closing_with_no_failed_request() {
    let _guard = begin_test("moved_fallback", Duration::from_secs(180));
    let dirs = TestDirs::new();
    let v2 = dirs.env_wrapper("v2", &[("HANDOFF_DEMO_PROTO_MAX", "2")]);
    let v2 = v2.to_str().unwrap();
    let v3 = dirs.env_wrapper("v3", &[("HANDOFF_DEMO_PROTO_MAX", "3")]);
    let v3 = v3.to_str().unwrap();
    let v4 = dirs.env_wrapper("v4", &[("HANDOFF_DEMO_PROTO_MAX", "4")]);
    let v4 = v4.to_str().unwrap();
    let demo = demo_bin();
    let demo = demo.to_str().unwrap();
    let sup = Supervisor::start(&dirs.runtime, &dirs.state, &demo_bin(), &[]);
    // Requests closer together than the demo's idle grace (100 ms): a
    // drain that cannot move closes a connection at a request boundary
    // (`Connection: close`), never while its client is about to send —
    // the race moving exists to remove, which no test of the old way
    // should depend on winning.
    let sticky = Load::sticky(sup.addr, 50, "/version", Duration::from_millis(20));
    let mut last = sup.first_pid;
    // new → v2, v2 → new, new → v3, v3 → new, new → v4, v4 → new, then
    // new → new. `None`: nothing moves; `Some(direct)`: they move, straight
    // or relayed.
    let steps = [
        (v2, None),
        (demo, None),
        (v3, Some(false)),
        (demo, Some(false)),
        (v4, Some(true)),
        (demo, Some(true)),
        (demo, Some(true)),
    ];
    for (i, (binary, how)) in steps.into_iter().enumerate() {
        let moves = how.is_some();
        let before = sticky.stats.reconnects.lock().unwrap().len();
        let c = sup.upgrade(&["--binary", binary]).expect_committed();
        assert_eq!(c.old_pid, last, "upgrade {i}");
        last = c.new_pid;
        assert_eq!(c.connections_moved.is_some(), moves, "upgrade {i}: {c:?}");
        assert_eq!(c.connections_direct, how, "upgrade {i}: {c:?}");
        wait_until(
            Duration::from_secs(30),
            &format!("upgrade {i}: every client answered by pid {last}"),
            || {
                let s = sticky.stats.sticky.lock().unwrap();
                s.len() == 50 && s.values().all(|&(_, _, pid)| pid == last)
            },
        );
        let after = sticky.stats.reconnects.lock().unwrap().len();
        if moves {
            assert_eq!(before, after, "upgrade {i} moved every connection");
        } else {
            assert!(
                after > before,
                "upgrade {i} closed connections: it cannot move them"
            );
        }
    }
    let stats = sticky.finish();
    assert_no_failures(&stats, &sup);
}

/// An upgrade that aborts after the connections were offered (the new
/// build fails its health check, so after Begin): the old build serves its
/// own copies again, from where they stopped. No client reconnects, none
/// fails, and every one is answered by the old build afterwards.
#[test]
fn an_aborted_upgrade_gives_the_moved_connections_back_to_the_old_build() {
    let _guard = begin_test("moved_abort", Duration::from_secs(120));
    let dirs = TestDirs::new();
    let failing = dirs.env_wrapper("fail-health", &[("HANDOFF_DEMO_FAULT", "fail-health")]);
    let sup = Supervisor::start(&dirs.runtime, &dirs.state, &demo_bin(), &[]);
    let sticky = Load::sticky(sup.addr, 100, "/version", PAUSE);
    for i in 0..3 {
        let a = sup
            .upgrade(&["--binary", failing.to_str().unwrap()])
            .expect_aborted(&["health"]);
        // After the drain (which moved them all) and the seal.
        assert_eq!(a.phase, "awaiting-ready", "abort {i}");
        let answered = sticky.stats.ok.load(Ordering::SeqCst);
        wait_until(
            Duration::from_secs(30),
            &format!("abort {i}: the clients are answered again"),
            || sticky.stats.ok.load(Ordering::SeqCst) >= answered + 200,
        );
    }
    let stats = sticky.finish();
    assert_no_failures(&stats, &sup);
    assert_sticky(&stats, 100, sup.first_pid);
}

/// Connections in every idle state move, upgrade after upgrade, with their
/// bytes: one that has sent nothing yet, one that has sent half of its
/// first request, one that has sent half of a request after an exchange.
/// None holds a drain (a build that cannot move them waits out graces for
/// them); each is answered, once its client sends the rest, by the final
/// build on the very same connection.
#[test]
fn silent_and_half_sent_connections_move_through_several_upgrades() {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    let _guard = begin_test("moved_half_sent", Duration::from_secs(120));
    let dirs = TestDirs::new();
    let sup = Supervisor::start(&dirs.runtime, &dirs.state, &demo_bin(), &[]);
    let head = |s: &mut TcpStream| -> String {
        let mut got = Vec::new();
        let mut b = [0u8; 1];
        while !got.ends_with(b"\r\n\r\n") {
            match s.read(&mut b) {
                Ok(1) => got.push(b[0]),
                other => panic!("reading a response head: {other:?} after {got:?}"),
            }
        }
        String::from_utf8_lossy(&got).into_owned()
    };
    let body = |s: &mut TcpStream, head: &str| -> String {
        let len: usize = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length: ")
                    .map(|v| v.trim().parse().unwrap())
            })
            .unwrap_or_else(|| panic!("no content-length in {head}"));
        let mut b = vec![0u8; len];
        s.read_exact(&mut b).unwrap();
        String::from_utf8(b).unwrap()
    };
    let connect = || {
        let s = TcpStream::connect(sup.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s
    };
    // Each accepted by the first build for sure (the listener's backlog is
    // served only by the incumbent until the first upgrade's drain).
    let mut silent = connect();
    let mut first_half = connect();
    first_half
        .write_all(b"GET /version HTTP/1.1\r\nHo")
        .unwrap();
    let mut later_half = connect();
    later_half
        .write_all(b"GET /version HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let h = head(&mut later_half);
    assert!(h.starts_with("HTTP/1.1 200"), "{h}");
    let b = body(&mut later_half, &h);
    assert!(b.contains(&format!("pid={}", sup.first_pid)), "{b}");
    later_half
        .write_all(b"GET /version HTTP/1.1\r\nHo")
        .unwrap();
    wait_until(
        Duration::from_secs(10),
        "the first build holds all three",
        || count_established(sup.first_pid) >= 3,
    );

    let mut last = sup.first_pid;
    for i in 0..3 {
        let out = sup.upgrade(&["--drain-grace", "30s"]);
        let c = out.expect_committed();
        assert_eq!(c.old_pid, last, "upgrade {i}");
        last = c.new_pid;
        assert_eq!(c.connections_moved, Some(3), "upgrade {i}\n{out}");
        let draining = out.phase_ms("draining");
        assert!(
            draining < 1_000.0,
            "upgrade {i}: drain held {draining} ms\n{out}"
        );
    }
    for (what, s, rest) in [
        (
            "silent",
            &mut silent,
            &b"GET /version HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        ),
        (
            "half of its first request",
            &mut first_half,
            &b"st: x\r\n\r\n"[..],
        ),
        (
            "half of a later request",
            &mut later_half,
            &b"st: x\r\n\r\n"[..],
        ),
    ] {
        s.write_all(rest).unwrap();
        let h = head(s);
        assert!(h.starts_with("HTTP/1.1 200"), "{what}: {h}");
        let b = body(s, &h);
        assert!(
            b.contains(&format!("pid={last}")),
            "{what}: answered by {b}, not pid {last}"
        );
    }
}

/// Established TCP connections of `pid` (its sockets in /proc/PID/fd that
/// are TCP sockets in state ESTABLISHED, by inode).
fn count_established(pid: u32) -> usize {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .filter_map(|l| {
                    let l = l.to_string_lossy().into_owned();
                    l.strip_prefix("socket:[")?
                        .strip_suffix(']')
                        .map(str::to_owned)
                })
                .collect()
        })
        .unwrap_or_default();
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default()
        + &std::fs::read_to_string("/proc/net/tcp6").unwrap_or_default();
    table
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 9 && f[3] == "01" && inodes.iter().any(|i| i == f[9])
        })
        .count()
}

/// The kernel counts every descriptor queued in a Unix socket against the
/// sending *user*, and refuses a send (`ETOOMANYREFS`) once that user has
/// more in flight than the sender's `RLIMIT_NOFILE` — unless the sender has
/// CAP_SYS_RESOURCE, which is why tests run as root never saw it. Moving
/// 3,000 connections through a supervisor whose soft limit was 1,024
/// aborted the upgrade as an ordinary user ("Too many references"). Here,
/// as an ordinary user (uid 65534 when the tests run as root), the
/// supervisor's soft limit is 256 and the service raises its own to 4,000:
/// 1,200 idle connections move, twice, because each hop keeps one batch in
/// flight at a time.
#[test]
fn moving_stays_under_the_users_descriptor_limit_in_flight() {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpStream;
    use std::os::unix::process::CommandExt;
    use std::process::{Command, Stdio};

    const CONNS: usize = 1200;
    let _guard = begin_test("moved_user_limit", Duration::from_secs(180));
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    assert!(
        hard >= 4000,
        "this test needs a hard RLIMIT_NOFILE of at least 4000 (found {hard}): raise it (ulimit -Hn)"
    );
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    // The limit is the whole test process's, shared with the tests that run after this one
    // in the same binary: put it back however this test ends.
    struct RestoreSoft(u64, u64);
    impl Drop for RestoreSoft {
        fn drop(&mut self) {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, self.0, self.1);
        }
    }
    let _restore = RestoreSoft(soft, hard);
    let root = nix::unistd::geteuid().is_root();
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    let svc = dir.path().join("svc.sh");
    write_executable(
        &svc,
        format!(
            "#!/bin/sh\nulimit -Sn 4000 || exit 1\nexec '{}' \"$@\"\n",
            handoff_bin().with_file_name("example-axum").display()
        )
        .as_bytes(),
    );
    if root {
        for p in [dir.path(), svc.as_path()] {
            nix::unistd::chown(p, Some(65534.into()), Some(65534.into())).unwrap();
        }
    }
    // `handoff ARGS` as the test's ordinary user.
    let as_user = |args: &[&str]| -> Command {
        let mut c = if root {
            let mut c = Command::new("setpriv");
            c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
                .arg(handoff_bin());
            c
        } else {
            Command::new(handoff_bin())
        };
        c.args(args);
        c
    };
    let run_dir = dir.path().join("run");
    let run_dir = run_dir.to_str().unwrap();
    let state_dir = dir.path().join("state");
    let mut run = as_user(&[
        "run",
        "--runtime-dir",
        run_dir,
        "--state-dir",
        state_dir.to_str().unwrap(),
        "--listen",
        "http=tcp://127.0.0.1:0",
        "--",
        svc.to_str().unwrap(),
    ]);
    run.stdout(Stdio::piped()).stderr(Stdio::inherit());
    // SAFETY: only setrlimit(2), async-signal-safe, between fork and exec.
    unsafe {
        run.pre_exec(move || {
            nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, 256, hard)
                .map_err(std::io::Error::from)
        });
    }
    /// Kills the supervisor and its services (by pid), however the test
    /// ends: a service outlives a killed supervisor by design.
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let pid = self.0.id();
            let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
                .unwrap_or_default();
            let _ = self.0.kill();
            let _ = self.0.wait();
            for c in children
                .split_whitespace()
                .filter_map(|c| c.parse::<i32>().ok())
            {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(c),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
    let mut sup = Kill(run.spawn().expect("setpriv and handoff run"));
    // `listening …` first, then `ready pid=…` once the service answers.
    let mut out = BufReader::new(sup.0.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let mut ready = String::new();
    out.read_line(&mut ready).unwrap();
    assert!(ready.starts_with("ready pid="), "{ready:?}");
    let addr: std::net::SocketAddr = line
        .trim()
        .strip_prefix("listening http=tcp://")
        .unwrap_or_else(|| panic!("expected `listening http=…`, got {line:?}"))
        .parse()
        .unwrap();

    let get = |s: &mut TcpStream| -> String {
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut got = Vec::new();
        let mut b = [0u8; 512];
        while !(got.windows(4).any(|w| w == b"\r\n\r\n")
            && got.ends_with(b"\n")
            && got.iter().filter(|&&c| c == b'\n').count() >= 5)
        {
            let n = s.read(&mut b).unwrap();
            assert!(n > 0, "connection closed after {got:?}");
            got.extend_from_slice(&b[..n]);
        }
        String::from_utf8_lossy(&got).into_owned()
    };
    let mut conns: Vec<TcpStream> = (0..CONNS)
        .map(|_| {
            let mut s = TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let answer = get(&mut s);
            assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
            s
        })
        .collect();
    for i in 0..2 {
        let out = as_user(&["upgrade", "--runtime-dir", run_dir, "--json"])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "upgrade {i}: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let committed = stdout
            .lines()
            .find(|l| l.contains("\"event\":\"committed\""))
            .unwrap_or_else(|| panic!("upgrade {i}: no committed event: {stdout}"));
        assert!(
            committed.contains(&format!("\"connections_moved\":{CONNS}")),
            "upgrade {i}: {committed}"
        );
        let new_pid = committed
            .split("\"new_pid\":")
            .nth(1)
            .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
            .unwrap()
            .to_string();
        for (k, s) in conns.iter_mut().enumerate() {
            let answer = get(s);
            assert!(
                answer.contains(&format!("pid {new_pid}")),
                "upgrade {i}, connection {k}: {answer}"
            );
        }
    }
    let _ = as_user(&["stop", "--runtime-dir", run_dir]).output();
}

/// A new build that cannot hold the connections it is handed (its soft
/// descriptor limit is 64, 200 connections move straight to it): its
/// receive comes back truncated, it gives up, the upgrade aborts, and the
/// old build serves every connection on — no failed request, no
/// reconnect. Then a build with room takes them all.
#[test]
fn a_new_build_without_room_for_the_connections_aborts_and_the_old_one_keeps_them() {
    let _guard = begin_test("moved_no_room", Duration::from_secs(120));
    let dirs = TestDirs::new();
    let cramped = dirs.root.path().join("demo-cramped.sh");
    write_executable(
        &cramped,
        format!(
            "#!/bin/sh\nulimit -Sn 64 || exit 1\nexec '{}' \"$@\"\n",
            demo_bin().display()
        )
        .as_bytes(),
    );
    let sup = Supervisor::start(&dirs.runtime, &dirs.state, &demo_bin(), &[]);
    let sticky = Load::sticky(sup.addr, 200, "/version", PAUSE);
    wait_until(
        Duration::from_secs(30),
        "every client answered once",
        || sticky.stats.sticky.lock().unwrap().len() == 200,
    );
    let out = sup.upgrade(&["--binary", cramped.to_str().unwrap()]);
    let a = out.expect_aborted(&["successor", "descriptor", "truncated"]);
    assert_eq!(a.phase, "draining", "{out}");
    let answered = sticky.stats.ok.load(Ordering::SeqCst);
    wait_until(
        Duration::from_secs(30),
        "the old build answers the clients again",
        || sticky.stats.ok.load(Ordering::SeqCst) >= answered + 400,
    );
    let c = sup.upgrade(&[]).expect_committed();
    assert_eq!(c.old_pid, sup.first_pid);
    assert_eq!(c.connections_moved, Some(200), "{c:?}");
    assert_eq!(c.connections_direct, Some(true), "{c:?}");
    wait_until(
        Duration::from_secs(30),
        "every client answered by the new build",
        || {
            let s = sticky.stats.sticky.lock().unwrap();
            s.len() == 200 && s.values().all(|&(_, _, pid)| pid == c.new_pid)
        },
    );
    let stats = sticky.finish();
    assert_no_failures(&stats, &sup);
    assert_sticky(&stats, 200, c.new_pid);
}
