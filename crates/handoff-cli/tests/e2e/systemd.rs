//! `handoff run` under systemd, through the real binaries: the exact
//! `sd_notify` datagrams on a real notify socket (path and abstract), the
//! watchdog, what the service inherits, and socket activation intake with a
//! listener the test binds and passes at fd 3 like a `.socket` unit would.

use crate::sd;
use crate::support;

use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use sd::*;
use support::*;

#[test]
fn notify_datagrams_around_upgrades_and_stop() {
    let _guard = begin_test("sd_notify_sequence", Duration::from_secs(120));
    let dirs = TestDirs::new();
    let notify = NotifySocket::path();
    let mut sup = Supervisor::start_with(
        &dirs.runtime,
        &dirs.state,
        &demo_bin(),
        &[],
        &env(&notify, &[]),
    );
    // Start: READY=1 only once the incumbent serves and the admin socket is bound.
    let m = notify.next_state(NOTE, "READY=1 at start");
    assert_eq!(expect_ready_serving(&m, sup.first_pid), "", "{m:?}");

    // An upgrade through the admin socket.
    let before = monotonic_usec();
    let c = sup.upgrade(&[]).expect_committed();
    let after = monotonic_usec();
    let m = notify.next_state(NOTE, "RELOADING=1 for the admin upgrade");
    let status = expect_reloading(&m, before, after);
    assert_eq!(status, format!("upgrading pid {} ({BUILD})", sup.first_pid));
    let m = notify.next_state(NOTE, "READY=1 after the commit");
    let rest = expect_ready_serving(&m, c.new_pid);
    let committed = format!("; upgrade from pid {} committed in ", sup.first_pid);
    assert!(
        rest.starts_with(&committed) && rest.ends_with(" ms"),
        "{rest:?}"
    );

    // An upgrade by SIGHUP.
    let before = monotonic_usec();
    kill(Pid::from_raw(sup.pid as i32), Signal::SIGHUP).unwrap();
    let m = notify.next_state(NOTE, "RELOADING=1 for SIGHUP");
    let after = monotonic_usec();
    let status = expect_reloading(&m, before, after);
    assert_eq!(status, format!("upgrading pid {} ({BUILD})", c.new_pid));
    let m = notify.next_state(NOTE, "READY=1 after the SIGHUP upgrade");
    let third = sup.serving_pid().expect("serving after SIGHUP");
    assert_ne!(third, c.new_pid);
    let rest = expect_ready_serving(&m, third);
    assert!(
        rest.starts_with(&format!("; upgrade from pid {} committed in ", c.new_pid)),
        "{rest:?}"
    );

    // An aborted upgrade: reloading, then ready again with the old process.
    let bad = dirs.fault_wrapper("fail-health");
    let before = monotonic_usec();
    sup.upgrade(&["--binary", bad.to_str().unwrap()])
        .expect_aborted(&["health"]);
    let after = monotonic_usec();
    let m = notify.next_state(NOTE, "RELOADING=1 for the failing upgrade");
    expect_reloading(&m, before, after);
    let m = notify.next_state(NOTE, "READY=1 after the abort");
    let rest = expect_ready_serving(&m, third);
    assert!(rest.starts_with("; upgrade aborted: "), "{rest:?}");
    assert!(rest.contains("health"), "{rest:?}");

    // SIGTERM: STOPPING=1, then nothing more.
    kill(Pid::from_raw(sup.pid as i32), Signal::SIGTERM).unwrap();
    let m = notify.next_state(NOTE, "STOPPING=1");
    assert_eq!(m, "STOPPING=1\nSTATUS=stopping (SIGTERM)");
    wait_until(
        Duration::from_secs(30),
        "handoff run exits after SIGTERM",
        || sup.try_exit().is_some(),
    );
    let rest: Vec<String> = notify
        .drain()
        .into_iter()
        .filter(|m| m != "WATCHDOG=1")
        .collect();
    assert!(rest.is_empty(), "unexpected notifications: {rest:?}");
}

#[test]
fn abstract_socket_and_nothing_leaks_into_the_service() {
    let _guard = begin_test("sd_notify_abstract", Duration::from_secs(90));
    let dirs = TestDirs::new();
    let notify = NotifySocket::abstract_name();
    // A watchdog meant for another process (pid 1): ours must not ping it,
    // and the service must not inherit it.
    let sup = Supervisor::start_with(
        &dirs.runtime,
        &dirs.state,
        &demo_bin(),
        &[],
        &env(
            &notify,
            &[("WATCHDOG_USEC", "100000"), ("WATCHDOG_PID", "1")],
        ),
    );
    let m = notify.next(NOTE, "READY=1 on the abstract socket");
    assert_eq!(expect_ready_serving(&m, sup.first_pid), "");
    let e = std::fs::read(format!("/proc/{}/environ", sup.first_pid)).unwrap();
    assert_clean_env(sup.first_pid, &e);
    // A successor too (spawned from a running supervisor, not at start).
    let c = sup.upgrade(&[]).expect_committed();
    let e = std::fs::read(format!("/proc/{}/environ", c.new_pid)).unwrap();
    assert_clean_env(c.new_pid, &e);
    let m = notify.next(NOTE, "RELOADING=1");
    assert!(m.starts_with("RELOADING=1\nMONOTONIC_USEC="), "{m:?}");
    let m = notify.next(NOTE, "READY=1");
    expect_ready_serving(&m, c.new_pid);
    // Were the watchdog (wrongly) ours, a ping would come every 50 ms: none
    // may arrive over twenty intervals.
    let mut pings = vec![];
    poll_until(Duration::from_secs(1), || {
        pings.extend(
            notify
                .drain()
                .into_iter()
                .filter(|m| m.contains("WATCHDOG")),
        );
        !pings.is_empty()
    });
    assert!(
        pings.is_empty(),
        "pinged a watchdog that is not ours: {pings:?}"
    );
}

#[test]
fn crash_restart_is_reported_in_status() {
    let _guard = begin_test("sd_crash_and_stop", Duration::from_secs(90));
    let dirs = TestDirs::new();
    let notify = NotifySocket::path();
    let mut sup = Supervisor::start_with(
        &dirs.runtime,
        &dirs.state,
        &demo_bin(),
        &[],
        &env(&notify, &[]),
    );
    let m = notify.next(NOTE, "READY=1");
    assert_eq!(expect_ready_serving(&m, sup.first_pid), "");

    // The incumbent dies outside a handoff: STATUS only (no READY/RELOADING:
    // the supervisor is as ready as before, and restarts it).
    kill(Pid::from_raw(sup.first_pid as i32), Signal::SIGKILL).unwrap();
    let m = notify.next(NOTE, "STATUS=restarting");
    let prefix = format!(
        "STATUS=restarting: pid {} died outside a handoff (",
        sup.first_pid
    );
    assert!(
        m.starts_with(&prefix) && m.contains("); next start in "),
        "{m:?}"
    );
    let m = notify.next(NOTE, "STATUS=serving after the restart");
    let restarted = m
        .strip_prefix("STATUS=serving pid ")
        .and_then(|r| r.strip_suffix(&format!(" ({BUILD}), restarted after a crash")))
        .and_then(|p| p.parse::<u32>().ok())
        .unwrap_or_else(|| panic!("{m:?}"));
    wait_until(Duration::from_secs(20), "the restarted pid serves", || {
        sup.serving_pid() == Ok(restarted)
    });

    // And the crash did not end the reporting: SIGTERM still says STOPPING=1.
    kill(Pid::from_raw(sup.pid as i32), Signal::SIGTERM).unwrap();
    let m = notify.next(NOTE, "STOPPING=1");
    assert_eq!(m, "STOPPING=1\nSTATUS=stopping (SIGTERM)");
    wait_until(Duration::from_secs(30), "handoff run exits", || {
        sup.try_exit().is_some()
    });
}

#[test]
fn handoff_stop_sends_stopping_once() {
    let _guard = begin_test("sd_handoff_stop", Duration::from_secs(90));
    let dirs = TestDirs::new();
    let notify = NotifySocket::path();
    let mut sup = Supervisor::start_with(
        &dirs.runtime,
        &dirs.state,
        &demo_bin(),
        &[],
        &env(&notify, &[]),
    );
    let m = notify.next(NOTE, "READY=1");
    assert_eq!(expect_ready_serving(&m, sup.first_pid), "");
    // `handoff stop`: one STOPPING=1, although the supervisor then also
    // signals itself to exit.
    let out = Command::new(handoff_bin())
        .args(["stop", "--runtime-dir"])
        .arg(&dirs.runtime)
        .output()
        .unwrap();
    assert!(out.status.success(), "handoff stop: {out:?}");
    let m = notify.next(NOTE, "STOPPING=1");
    assert_eq!(m, "STOPPING=1\nSTATUS=stopping (handoff stop)");
    wait_until(Duration::from_secs(30), "handoff run exits", || {
        sup.try_exit().is_some()
    });
    let rest = notify.drain();
    assert!(rest.is_empty(), "after STOPPING=1: {rest:?}");
}

#[test]
fn watchdog_pings_at_half_the_interval() {
    let _guard = begin_test("sd_watchdog", Duration::from_secs(60));
    let dirs = TestDirs::new();
    let notify = NotifySocket::path();
    let started = Instant::now();
    let _sup = Supervisor::start_with(
        &dirs.runtime,
        &dirs.state,
        &demo_bin(),
        &[],
        // 300 ms interval, no WATCHDOG_PID: it is ours. Pings every 150 ms.
        &env(&notify, &[("WATCHDOG_USEC", "300000")]),
    );
    let m = notify.next(NOTE, "READY=1");
    assert!(m.starts_with("READY=1\n"), "{m:?}");
    let mut pings = 0;
    while pings < 5 {
        let m = notify.next(Duration::from_secs(10), "WATCHDOG=1");
        assert_eq!(m, "WATCHDOG=1", "only pings after READY");
        pings += 1;
    }
    // Not faster than every 150 ms: since before the supervisor started,
    // at most elapsed/150ms + 1 pings can have been sent.
    pings += notify.drain().iter().filter(|m| *m == "WATCHDOG=1").count();
    let bound = started.elapsed().as_millis() / 150 + 1;
    assert!(
        pings as u128 <= bound,
        "{pings} pings in {:?}: faster than half of 300 ms",
        started.elapsed()
    );
}

#[test]
fn a_foreign_listen_pid_is_ignored_and_the_listeners_are_bound() {
    let _guard = begin_test("sd_foreign_listen_pid", Duration::from_secs(60));
    let dirs = TestDirs::new();
    let opts = StartOpts {
        env: vec![
            ("LISTEN_FDS".into(), "1".into()),
            ("LISTEN_FDNAMES".into(), "http".into()),
            ("LISTEN_PID".into(), "1".into()),
        ],
        ..StartOpts::default()
    };
    let sup = Supervisor::start_with(&dirs.runtime, &dirs.state, &demo_bin(), &[], &opts);
    assert_eq!(sup.serving_pid(), Ok(sup.first_pid));
    // Said before `ready`, on stderr, which is read by another thread.
    let said = poll_until(Duration::from_secs(10), || {
        sup.stderr_log()
            .contains("ignoring LISTEN_FDS=1: LISTEN_PID=1 is not this process")
    });
    assert!(said, "{}", sup.stderr_log());
}

#[test]
fn socket_activation_serves_on_the_passed_listener_across_an_upgrade() {
    let _guard = begin_test("sd_socket_activation", Duration::from_secs(120));
    let dirs = TestDirs::new();
    let notify = NotifySocket::path();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let mine = socket_at(std::process::id(), listener.as_raw_fd());
    let (rt, st, demo) = (
        dirs.runtime.to_str().unwrap().to_string(),
        dirs.state.to_str().unwrap().to_string(),
        demo_bin().to_str().unwrap().to_string(),
    );
    // No --listen: the passed socket is the listener, under its fd name.
    let mut run = Activated::start(
        &listener,
        "http",
        &["--runtime-dir", &rt, "--state-dir", &st, "--", &demo],
        &notify,
    );
    let (listening, first) = run.wait_ready();
    assert_eq!(listening, [format!("listening http=tcp://{addr}")]);
    let said = format!("http=tcp://{addr} comes from systemd (fd 3)");
    let logged = poll_until(Duration::from_secs(10), || run.log().contains(&said));
    assert!(logged, "{}", run.log());
    let m = notify.next(NOTE, "READY=1");
    assert_eq!(expect_ready_serving(&m, first), "");
    assert_eq!(
        serving_pid(addr),
        Ok(first),
        "the demo serves on our socket"
    );
    // The very socket the test bound, not a new one on the same port.
    assert_eq!(socket_at(first, 3), mine);

    let (code, out) = upgrade(&dirs.runtime);
    assert_eq!(code, Some(0), "upgrade: {out}\n{}", run.log());
    let second = serving_pid(addr).expect("serving after the upgrade");
    assert_ne!(second, first);
    assert_eq!(socket_at(second, 3), mine);
    let env = std::fs::read(format!("/proc/{second}/environ")).unwrap();
    assert_clean_env(second, &env);
    assert!(notify
        .next(NOTE, "RELOADING=1")
        .starts_with("RELOADING=1\n"));
    expect_ready_serving(&notify.next(NOTE, "READY=1"), second);

    kill(Pid::from_raw(run.child.id() as i32), Signal::SIGTERM).unwrap();
    assert_eq!(run.wait_exit(), Some(0), "{}", run.log());
}

/// `--mode notify` takes passed sockets the same way: the program that does
/// not link the library gets systemd's socket at fd 3.
#[test]
fn socket_activation_in_notify_mode() {
    let _guard = begin_test("sd_socket_activation_notify", Duration::from_secs(90));
    let dirs = TestDirs::new();
    let notify = NotifySocket::path();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let mine = socket_at(std::process::id(), listener.as_raw_fd());
    let service = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/notify_service.py");
    let (rt, st, svc) = (
        dirs.runtime.to_str().unwrap().to_string(),
        dirs.state.to_str().unwrap().to_string(),
        service.to_str().unwrap().to_string(),
    );
    let mut run = Activated::start(
        &listener,
        "http",
        &[
            "--mode",
            "notify",
            "--runtime-dir",
            &rt,
            "--state-dir",
            &st,
            "--",
            &svc,
        ],
        &notify,
    );
    let (listening, first) = run.wait_ready();
    assert_eq!(listening, [format!("listening http=tcp://{addr}")]);
    // Notify mode keeps its listeners in the fd store (tests/e2e/notify_recovery.rs).
    assert_eq!(notify.next(NOTE, "FDSTORE=1"), "FDSTORE=1\nFDNAME=http");
    assert_eq!(
        notify.next(NOTE, "READY=1"),
        format!("READY=1\nSTATUS=serving pid {first}")
    );
    assert_eq!(serving_pid(addr), Ok(first));
    assert_eq!(socket_at(first, 3), mine);
    let (code, out) = upgrade(&dirs.runtime);
    assert_eq!(code, Some(0), "upgrade: {out}\n{}", run.log());
    let second = serving_pid(addr).expect("serving after the upgrade");
    assert_ne!(second, first);
    assert_eq!(socket_at(second, 3), mine);
    kill(Pid::from_raw(run.child.id() as i32), Signal::SIGTERM).unwrap();
    assert_eq!(run.wait_exit(), Some(0), "{}", run.log());
}

#[test]
fn socket_activation_with_listen_names_and_clear_mismatch_errors() {
    let _guard = begin_test("sd_socket_activation_names", Duration::from_secs(120));
    let dirs = TestDirs::new();
    let notify = NotifySocket::path();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (rt, st, demo) = (
        dirs.runtime.to_str().unwrap().to_string(),
        dirs.state.to_str().unwrap().to_string(),
        demo_bin().to_str().unwrap().to_string(),
    );
    let run_with = |fdname: &str, listen: &[String]| {
        let mut args: Vec<&str> = vec!["--runtime-dir", &rt, "--state-dir", &st];
        for l in listen {
            args.extend(["--listen", l.as_str()]);
        }
        args.extend(["--", &demo]);
        Activated::start(&listener, fdname, &args, &notify)
    };

    // --listen names the passed socket (same address): used, not bound;
    // another --listen is bound as usual, after it in order.
    let mut run = run_with(
        "http",
        &[
            format!("http=tcp://{addr}"),
            "extra=tcp://127.0.0.1:0".into(),
        ],
    );
    let (listening, first) = run.wait_ready();
    assert_eq!(listening.len(), 2, "{listening:?}");
    assert_eq!(listening[0], format!("listening http=tcp://{addr}"));
    assert!(
        listening[1].starts_with("listening extra=tcp://127.0.0.1:"),
        "{listening:?}"
    );
    assert_eq!(serving_pid(addr), Ok(first));
    kill(Pid::from_raw(run.child.id() as i32), Signal::SIGTERM).unwrap();
    assert_eq!(run.wait_exit(), Some(0), "{}", run.log());
    drop(run);
    notify.drain();

    // A --listen that disagrees with the passed socket's address.
    let other = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut run = run_with("http", &[format!("http=tcp://{other}")]);
    assert_eq!(run.wait_exit(), Some(1));
    let log = run.log();
    assert!(
        log.contains(&format!("--listen http=tcp://{other} but the socket systemd passed under that name is tcp://{addr}")),
        "{log}"
    );
    drop(run);

    // A passed socket nobody names.
    let mut run = run_with("metrics", &["http=tcp://127.0.0.1:0".into()]);
    assert_eq!(run.wait_exit(), Some(1));
    let log = run.log();
    assert!(
        log.contains("systemd passed a socket named \"metrics\"")
            && log.contains("no --listen names"),
        "{log}"
    );
    // Neither failed start told the manager it was ready.
    let states: Vec<String> = notify.drain();
    assert!(states.is_empty(), "{states:?}");
}

/// `--mode notify` (a service that does not link the library) tells systemd
/// the same things: the supervisor's own notifications go to the manager's
/// socket, the service's go to the supervisor's.
#[test]
fn notify_mode_notifies_systemd_too() {
    let _guard = begin_test("sd_notify_mode", Duration::from_secs(90));
    let dirs = TestDirs::new();
    let notify = NotifySocket::path();
    let service = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/notify_service.py");
    let mut opts = env(&notify, &[]);
    opts.env.push((
        "NOTIFY_TEST_BEHAVIOUR_FILE".into(),
        dirs.root.path().join("behaviour").display().to_string(),
    ));
    let mut sup = Supervisor::start_with(
        &dirs.runtime,
        &dirs.state,
        &service,
        &["--mode", "notify"],
        &opts,
    );
    assert_eq!(notify.next(NOTE, "FDSTORE=1"), "FDSTORE=1\nFDNAME=http");
    let m = notify.next(NOTE, "READY=1");
    assert_eq!(m, format!("READY=1\nSTATUS=serving pid {}", sup.first_pid));
    let e = std::fs::read(format!("/proc/{}/environ", sup.first_pid)).unwrap();
    let e = String::from_utf8_lossy(&e);
    assert!(
        !e.contains(&format!("NOTIFY_SOCKET={}", notify.address)),
        "the service got the manager's socket: {e}"
    );

    let before = monotonic_usec();
    let c = sup.upgrade(&[]).expect_committed();
    let after = monotonic_usec();
    let m = notify.next(NOTE, "RELOADING=1");
    let status = expect_reloading(&m, before, after);
    assert_eq!(status, format!("upgrading pid {}", sup.first_pid));
    let m = notify.next(NOTE, "READY=1 after the upgrade");
    let prefix = format!(
        "READY=1\nSTATUS=serving pid {}; upgrade from pid {} committed in ",
        c.new_pid, sup.first_pid
    );
    assert!(m.starts_with(&prefix), "{m:?}");

    kill(Pid::from_raw(sup.pid as i32), Signal::SIGTERM).unwrap();
    let m = notify.next(NOTE, "STOPPING=1");
    assert_eq!(m, "STOPPING=1\nSTATUS=stopping (SIGTERM)");
    wait_until(Duration::from_secs(30), "handoff run exits", || {
        sup.try_exit().is_some()
    });
    assert!(notify.drain().is_empty());
}

/// Why the example unit says `KillMode=process`: a supervisor that dies
/// leaves the service serving, and the next one re-attaches to it — and
/// tells systemd READY=1 for that very process.
#[test]
fn a_restarted_supervisor_reports_the_service_it_re_attached_to() {
    let _guard = begin_test("sd_reattach", Duration::from_secs(120));
    let dirs = TestDirs::new();
    let notify = NotifySocket::path();
    let mut opts = env(&notify, &[]);
    opts.subreaper = true; // the orphaned service is reaped when it exits
    let s1 = Supervisor::start_with(&dirs.runtime, &dirs.state, &demo_bin(), &[], &opts);
    let first = s1.first_pid;
    expect_ready_serving(&notify.next(NOTE, "READY=1"), first);

    // SIGKILL the supervisor itself (under the subreaper root).
    let handoff = children_of(s1.pid)
        .into_iter()
        .find(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "handoff")
        })
        .expect("handoff run under the subreaper");
    kill(Pid::from_raw(handoff as i32), Signal::SIGKILL).unwrap();
    wait_until(Duration::from_secs(10), "the supervisor is gone", || {
        !children_of(s1.pid).contains(&handoff)
    });
    assert_eq!(
        s1.serving_pid(),
        Ok(first),
        "the service outlives its supervisor"
    );

    let s2 = Supervisor::start_with(&dirs.runtime, &dirs.state, &demo_bin(), &[], &opts);
    assert_eq!(s2.first_pid, first, "re-attached, not restarted");
    assert_eq!(s2.addr, s1.addr);
    let m = notify.next_state(NOTE, "READY=1 from the new supervisor");
    assert_eq!(expect_ready_serving(&m, first), "");
    let c = s2.upgrade(&[]).expect_committed();
    assert_eq!(c.old_pid, first);
    let m = notify.next_state(NOTE, "RELOADING=1");
    assert!(m.starts_with("RELOADING=1\nMONOTONIC_USEC="), "{m:?}");
    expect_ready_serving(&notify.next_state(NOTE, "READY=1"), c.new_pid);
}

/// A NOTIFY_SOCKET that cannot be a notify address stops `handoff run` at
/// once with the reason, rather than a unit that systemd kills later for
/// never having said READY=1.
#[test]
fn a_malformed_notify_socket_is_refused_at_start() {
    let _guard = begin_test("sd_bad_notify_socket", Duration::from_secs(60));
    let dirs = TestDirs::new();
    let mut child = Command::new(handoff_bin())
        .arg("run")
        .arg("--runtime-dir")
        .arg(&dirs.runtime)
        .arg("--state-dir")
        .arg(&dirs.state)
        .args(["--listen", "http=tcp://127.0.0.1:0", "--"])
        .arg(demo_bin())
        .env("NOTIFY_SOCKET", "relative/notify.sock")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut status = None;
    let exited = poll_until(Duration::from_secs(20), || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    if !exited {
        kill_tree(child.id());
        let _ = child.wait();
        panic!("handoff run did not exit");
    }
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{err}");
    assert!(
        err.contains("NOTIFY_SOCKET=\"relative/notify.sock\" is neither an absolute path nor an abstract socket name"),
        "{err}"
    );
    // Refused before anything was started or bound.
    assert!(!dirs.runtime.join("admin.sock").exists());
    assert!(!dirs.runtime.join("control.sock").exists());
}

/// `handoff upgrade --supervisor` under systemd: the new program is still the
/// unit's main process (same pid), so it must keep notifying it — READY=1
/// again once it has taken over, and the watchdog pings go on — though the
/// first program took NOTIFY_SOCKET and WATCHDOG_* out of its environment.
#[test]
fn a_reexeced_supervisor_keeps_notifying_systemd() {
    let _guard = begin_test("sd_reexec", Duration::from_secs(60));
    let dirs = TestDirs::new();
    let notify = NotifySocket::path();
    let sup = Supervisor::start_with(
        &dirs.runtime,
        &dirs.state,
        &demo_bin(),
        &[],
        &env(&notify, &[("WATCHDOG_USEC", "2000000")]),
    );
    let m = notify.next(NOTE, "READY=1");
    assert!(m.starts_with("READY=1\n"), "{m:?}");
    let out = run_handoff(
        &["upgrade", "--supervisor"],
        &dirs.runtime,
        Duration::from_secs(30),
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        sup.stderr_log()
    );
    // The new program's own READY=1, then its watchdog pings.
    let mut ready = false;
    let mut pings = 0;
    while !(ready && pings >= 2) {
        let m = notify.next(
            Duration::from_secs(10),
            "READY=1 and pings after the re-exec",
        );
        if m.starts_with("READY=1\n") {
            ready = true;
        } else if m == "WATCHDOG=1" && ready {
            pings += 1;
        }
    }
    assert!(
        sup.stderr_log().contains("re-executed in place"),
        "{}",
        sup.stderr_log()
    );
}
