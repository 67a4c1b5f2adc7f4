//! The crash matrix (docs/design.md §7, issue 3): one scenario per crash point, run
//! against the real binaries with clients connecting continuously.
//!
//! Each scenario kills one role — supervisor (`s-…`), incumbent (`o-…`) or
//! successor (`n-…`) — at an exact protocol step (the `crash-points`
//! feature; `HANDOFF_CRASH_AT=<point>`), lets the system recover on its own
//! (a killed supervisor is started again with the same dirs, as an operator
//! or systemd would), and asserts:
//! 1. no connection attempt is ever refused; requests fail only where a
//!    killed *serving* process takes its own connections with it;
//! 2. once settled, exactly one service process runs, answers on the
//!    listener, and holds the state lock — the one `handoff::crash::POINTS`
//!    names as the survivor;
//! 3. every acknowledged write is readable;
//! 4. no zombie, the survivor's fd count back to an idle incumbent's, the
//!    supervisor's fd count flat across the next upgrade, journal cleared;
//! 5. the next upgrade commits.
//!
//! Run with `cargo test --workspace --all-features` (the README's command);
//! `scripts/crash-matrix-loop N` repeats the whole matrix N times.
#![cfg(feature = "crash-points")]

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use handoff::crash::{Survivor, POINTS};
use support::*;

/// Short recovery wait for a sealed incumbent that lost its supervisor, so
/// scenarios settle in seconds (the default is 10 s).
const RECOVERY_WAIT_MS: &str = "1500";
const SETTLE: Duration = Duration::from_secs(30);

fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// Live (non-zombie) service processes under any of `roots`.
fn services(roots: &[u32]) -> Vec<u32> {
    let mut v: Vec<u32> = roots
        .iter()
        .flat_map(|r| descendants_of(*r))
        .filter(|p| comm(*p) == "handoff-demo" && !is_zombie(*p))
        .collect();
    v.sort();
    v.dedup();
    v
}

fn zombies(roots: &[u32]) -> Vec<u32> {
    roots
        .iter()
        .flat_map(|r| descendants_of(*r))
        .filter(|p| is_zombie(*p))
        .collect()
}

/// The `handoff` process under a subreaper root.
fn supervisor_pid(root: u32) -> u32 {
    children_of(root)
        .into_iter()
        .find(|p| comm(*p) == "handoff")
        .unwrap_or_else(|| panic!("no handoff process under {root}"))
}

/// Waits until exactly one service process runs, serves `addr` and holds
/// the state lock; returns its pid.
fn settle(roots: &[u32], addr: SocketAddr, lock: &Path, what: &str) -> u32 {
    let mut last = String::new();
    let ok = poll_until(SETTLE, || {
        let svc = services(roots);
        let serving = serving_pid(addr).ok();
        let holders = lock_holders(lock);
        last = format!("services {svc:?}, serving {serving:?}, lock holders {holders:?}");
        svc.len() == 1 && serving == Some(svc[0]) && holders == svc
    });
    assert!(
        ok,
        "{what}: did not settle to exactly one serving lock holder within {SETTLE:?}: {last}"
    );
    services(roots)[0]
}

/// The fd count of an idle incumbent. Measured once it has answered a
/// request — it accepts only after its control channel to the supervisor is
/// closed — and as the lowest of samples, since the connection of that
/// request closes asynchronously.
fn idle_fd_baseline(pid: u32, addr: SocketAddr) -> usize {
    assert_eq!(
        serving_pid(addr).ok(),
        Some(pid),
        "baseline: {pid} is not serving"
    );
    lowest_steady_fds(pid).unwrap_or(usize::MAX)
}

/// The fd count of a process whose count moves for an instant now and
/// then (a supervisor watching an adopted incumbent reads /proc every 20
/// ms; an idle incumbent closes its last client's socket a moment after
/// the client did): the lowest sample, once no lower one has come for
/// [`STEADY`] (at most [`STEADY_CAP`] of sampling; it was always the whole
/// 300 ms, 0.6 s of each scenario).
fn lowest_steady_fds(pid: u32) -> Option<usize> {
    let mut low: Option<(usize, Instant)> = None;
    poll_until(STEADY_CAP, || {
        let Some(n) = count_open_fds(pid) else {
            return false;
        };
        let now = Instant::now();
        match low {
            Some((l, _)) if n > l => {}
            Some((l, since)) if n == l => return now - since >= STEADY,
            _ => low = Some((n, now)),
        }
        false
    });
    low.map(|(l, _)| l)
}

/// How long a count must hold to be taken for a process's steady count.
const STEADY: Duration = Duration::from_millis(100);
/// How long at most a steady count is looked for (the lowest seen wins).
const STEADY_CAP: Duration = Duration::from_millis(300);

fn idle_fds_settle(pid: u32, expected: usize, what: &str) {
    let mut now = None;
    let ok = poll_until(Duration::from_secs(10), || {
        now = count_open_fds(pid);
        now == Some(expected)
    });
    assert!(
        ok,
        "{what}: pid {pid} has {now:?} fds idle, an idle incumbent has {expected}"
    );
}

/// The highest protocol version at which supervisor point `point` still
/// fires, when it is not the newest: the supervisor relays moved
/// connections only for a peer at version 3 (from 4 they go straight to
/// the successor), and sends SealRequest only to an incumbent at 4 or less
/// (from 5 it seals on its own).
fn older_incumbent(point: &str) -> Option<&'static str> {
    match point {
        "s-relaying" => Some("3"),
        "s-after-seal-request" => Some("4"),
        _ => None,
    }
}

fn scenario(point: &str) {
    run_scenario(point, false)
}

/// The same, with the successor prepared ahead (`handoff upgrade
/// --prepare`) and the upgrade then handing over to it: the crash lands in
/// a handoff that started from a held successor.
fn prepared_scenario(point: &str) {
    run_scenario(point, true)
}

fn run_scenario(point: &str, prepared: bool) {
    let _guard = begin_test(point, Duration::from_secs(150));
    let spec = POINTS
        .iter()
        .find(|p| p.name == point)
        .unwrap_or_else(|| panic!("unknown crash point {point}"));
    let role = &point[..2];
    let dirs = TestDirs::new();
    let lock = dirs.state.join(handoff::StateLock::FILE_NAME);
    let journal = dirs.state.join(handoff::journal::JOURNAL_FILE);
    let base_env = vec![(
        "HANDOFF_RECOVERY_WAIT_MS".to_string(),
        RECOVERY_WAIT_MS.to_string(),
    )];

    let mut s1_env = base_env.clone();
    if role == "s-" {
        s1_env.push(("HANDOFF_CRASH_AT".into(), point.into()));
    }
    let crashing = dirs.env_wrapper(point, &[("HANDOFF_CRASH_AT", point)]);
    // Points of older protocol versions need an incumbent that speaks at
    // most that version (`older_incumbent`).
    let program = if role == "o-" {
        crashing.clone()
    } else if let Some(v) = older_incumbent(point) {
        dirs.env_wrapper(&format!("v{v}"), &[("HANDOFF_DEMO_PROTO_MAX", v)])
    } else {
        demo_bin()
    };
    let s1 = Supervisor::start_with(
        &dirs.runtime,
        &dirs.state,
        &program,
        &[],
        &StartOpts {
            env: s1_env,
            subreaper: true,
            ..Default::default()
        },
    );
    let addr = s1.addr;
    let old = s1.first_pid;
    let idle_fds = idle_fd_baseline(old, addr);

    let load = Load::start(addr, 2, 2).expect("start load");
    load.wait_progress(100, Duration::from_secs(20), "before the upgrade");

    let binary = if role == "n-" {
        crashing.clone()
    } else {
        demo_bin()
    };
    // The one point that fires outside an upgrade: while a successor
    // prepared ahead is held.
    let mut args = vec!["--binary", binary.to_str().unwrap()];
    if point == "s-holding-prepared" {
        args.insert(0, "--prepare");
    }
    // The points of `handoff upgrade --supervisor`: the supervisor re-execs
    // itself (the same binary will do) instead of upgrading the service.
    let reexec = point.contains("reexec");
    if reexec {
        args = vec!["--supervisor", "--wait", "3s"];
    }
    let held = prepared.then(|| {
        let mut prep = vec!["--prepare"];
        prep.extend_from_slice(&args);
        let out = s1.upgrade(&prep);
        assert_eq!(out.code, Some(0), "{point}: prepare failed\n{out}");
        out.events_of("prepared")[0]["pid"]
            .as_u64()
            .expect("prepared pid") as u32
    });
    let out = s1.upgrade(&args);
    let committed_new = match (role, spec.survivor) {
        // The supervisor died mid-upgrade: its client loses the connection.
        ("s-", _) => {
            // A re-exec's client learns it only from the supervisor not
            // answering again within its --wait: exit 1.
            let expected = if reexec { Some(1) } else { Some(2) };
            assert_eq!(
                out.code, expected,
                "{point}: the upgrade client should see the supervisor vanish\n{out}"
            );
            None
        }
        (_, Survivor::Old) => {
            out.expect_aborted(&["aborted"]);
            None
        }
        _ => Some(out.expect_committed().new_pid),
    };
    if let (Some(held), Some(new)) = (held, committed_new) {
        assert_eq!(
            new, held,
            "{point}: the upgrade did not use the prepared successor"
        );
    }

    // The point really fired (its process announces it on the way down).
    let fired = format!("crash point {point}: SIGKILL");
    assert!(
        poll_until(Duration::from_secs(10), || s1.stderr_log().contains(&fired)),
        "{point}: the crash point never fired\n{out}"
    );

    // A killed supervisor is started again on the same dirs.
    let s2 = (role == "s-").then(|| {
        Supervisor::start_with(
            &dirs.runtime,
            &dirs.state,
            &demo_bin(),
            &[],
            &StartOpts {
                env: base_env.clone(),
                subreaper: true,
                ..Default::default()
            },
        )
    });
    let current = s2.as_ref().unwrap_or(&s1);
    assert_eq!(
        current.addr, addr,
        "{point}: the restarted supervisor must keep the same listener"
    );
    let roots: Vec<u32> = [Some(s1.pid), s2.as_ref().map(|s| s.pid)]
        .into_iter()
        .flatten()
        .collect();

    let survivor = settle(&roots, addr, &lock, point);
    match spec.survivor {
        Survivor::Old => assert_eq!(
            survivor, old,
            "{point}: expected the old incumbent to survive"
        ),
        Survivor::New => {
            assert_ne!(survivor, old, "{point}: expected the successor to survive");
            if let Some(n) = committed_new {
                assert_eq!(survivor, n, "{point}: expected the committed successor");
            }
        }
        Survivor::Restarted => {
            assert_ne!(survivor, old, "{point}: expected a restarted process");
            assert_ne!(
                Some(survivor),
                committed_new,
                "{point}: the committed successor died"
            );
        }
    }
    if let Some(s2) = &s2 {
        assert_eq!(
            s2.first_pid, survivor,
            "{point}: the restarted supervisor adopted another process"
        );
    }
    load.wait_progress(100, Duration::from_secs(20), "after recovery");

    assert!(
        poll_until(Duration::from_secs(10), || !journal.exists()),
        "{point}: journal not cleared"
    );
    let mut z = vec![];
    let reaped = poll_until(Duration::from_secs(10), || {
        z = zombies(&roots);
        z.is_empty()
    });
    assert!(reaped, "{point}: zombies left: {z:?}");

    let report = load.stop();
    eprintln!(
        "{point}: survivor {survivor} ({:?}); {report}",
        spec.survivor
    );
    assert_eq!(report.refused, 0, "{point}: connections refused\n{report}");
    if role == "o-" || spec.survivor == Survivor::Restarted {
        // A killed serving process takes the connections it held with it
        // (for a successor killed after Ready, the keep-alive connections
        // moved to it); nothing else may fail.
        assert_eq!(
            report.timeouts + report.bad_status + report.mismatches,
            0,
            "{point}\n{report}"
        );
    } else {
        report.assert_clean();
    }
    let problems = verify_acked(addr, &report.acked);
    assert!(
        problems.is_empty(),
        "{point}: acknowledged writes lost: {problems:?}"
    );

    idle_fds_settle(survivor, idle_fds, point);
    let sup = supervisor_pid(current.pid);
    let sup_fds = lowest_steady_fds(sup).expect("supervisor fds");

    // The next upgrade commits, and leaves one process again.
    let next = current
        .upgrade(&["--binary", demo_bin().to_str().unwrap()])
        .expect_committed();
    let after = settle(&roots, addr, &lock, &format!("{point}, next upgrade"));
    assert_eq!(after, next.new_pid);
    assert!(
        poll_until(Duration::from_secs(10), || count_open_fds(sup)
            == Some(sup_fds)),
        "{point}: supervisor fds {:?} after the next upgrade, {sup_fds} before",
        count_open_fds(sup)
    );
    idle_fds_settle(after, idle_fds, point);
}

macro_rules! matrix {
    ($($test:ident => $point:literal,)*) => {
        $( #[test] fn $test() { scenario($point); } )*

        /// The list above covers every crash point the library defines.
        #[test]
        fn every_point_has_a_scenario() {
            let here = [$($point),*];
            for p in POINTS {
                assert!(here.contains(&p.name), "no scenario for {}", p.name);
            }
        }
    };
}

matrix! {
    s_after_incumbent_hello => "s-after-incumbent-hello",
    s_after_incumbent_helloack => "s-after-incumbent-helloack",
    s_after_spawn => "s-after-spawn",
    s_after_successor_hello => "s-after-successor-hello",
    s_after_successor_helloack => "s-after-successor-helloack",
    s_holding_prepared => "s-holding-prepared",
    s_after_prepare => "s-after-prepare",
    s_after_drained => "s-after-drained",
    s_after_seal_request => "s-after-seal-request",
    s_after_sealed => "s-after-sealed",
    s_after_begin => "s-after-begin",
    s_after_ready => "s-after-ready",
    s_after_commit => "s-after-commit",
    o_in_drain => "o-in-drain",
    o_after_drained => "o-after-drained",
    o_in_seal => "o-in-seal",
    o_after_seal_complete => "o-after-seal-complete",
    o_after_commit => "o-after-commit",
    n_after_hello => "n-after-hello",
    n_after_begin => "n-after-begin",
    n_after_lock => "n-after-lock",
    n_before_ready => "n-before-ready",
    n_after_ready => "n-after-ready",
    // Moving connections (the load's keep-alive clients are moved).
    o_in_transfer => "o-in-transfer",
    s_after_moved => "s-after-moved",
    s_relaying => "s-relaying",
    n_after_adopt => "n-after-adopt",
    // Replacing the supervisor in place.
    s_before_reexec => "s-before-reexec",
    s_reexec_taking_over => "s-reexec-taking-over",
}

macro_rules! prepared_matrix {
    ($($test:ident => $point:literal,)*) => {
        $( #[test] fn $test() { prepared_scenario($point); } )*
    };
}

// Every point the upgrade itself passes once the successor is held (the
// spawn and greeting points fire in the prepare, covered above).
prepared_matrix! {
    prepared_s_after_incumbent_hello => "s-after-incumbent-hello",
    prepared_s_after_incumbent_helloack => "s-after-incumbent-helloack",
    prepared_s_after_prepare => "s-after-prepare",
    prepared_s_after_drained => "s-after-drained",
    prepared_s_after_seal_request => "s-after-seal-request",
    prepared_s_after_sealed => "s-after-sealed",
    prepared_s_after_begin => "s-after-begin",
    prepared_s_after_ready => "s-after-ready",
    prepared_s_after_commit => "s-after-commit",
    prepared_o_in_drain => "o-in-drain",
    prepared_o_in_seal => "o-in-seal",
    prepared_n_after_begin => "n-after-begin",
    prepared_n_after_lock => "n-after-lock",
    prepared_n_before_ready => "n-before-ready",
    prepared_n_after_ready => "n-after-ready",
    prepared_o_in_transfer => "o-in-transfer",
    prepared_s_after_moved => "s-after-moved",
    prepared_s_relaying => "s-relaying",
    prepared_n_after_adopt => "n-after-adopt",
}

/// Many consecutive upgrades, each with a random crash point armed, on one
/// long-lived service under continuous load: after every one, exactly one
/// process serves and holds the lock, no zombie, journal cleared; at the end
/// no refused connection, every acknowledged write readable, and the
/// survivor's idle fd count equal to the first incumbent's.
///
/// `HANDOFF_STRESS_ITERS` (default 8) and `HANDOFF_STRESS_SEED` (default:
/// the clock; printed) control it.
#[test]
fn stress_random_crash_points() {
    let iters: usize = std::env::var("HANDOFF_STRESS_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let _guard = begin_test("stress", Duration::from_secs(60 + 20 * iters as u64));
    let mut seed: u64 = std::env::var("HANDOFF_STRESS_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
                | 1
        });
    eprintln!("stress: {iters} iterations, HANDOFF_STRESS_SEED={seed}");
    let mut next = move || {
        // xorshift64
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };

    let dirs = TestDirs::new();
    let lock = dirs.state.join(handoff::StateLock::FILE_NAME);
    let journal = dirs.state.join(handoff::journal::JOURNAL_FILE);
    let env = vec![(
        "HANDOFF_RECOVERY_WAIT_MS".to_string(),
        RECOVERY_WAIT_MS.to_string(),
    )];
    let start = |extra: Option<&str>| {
        let mut env = env.clone();
        if let Some(p) = extra {
            env.push(("HANDOFF_CRASH_AT".into(), p.into()));
        }
        Supervisor::start_with(
            &dirs.runtime,
            &dirs.state,
            &demo_bin(),
            &[],
            &StartOpts {
                env,
                subreaper: true,
                ..Default::default()
            },
        )
    };
    let mut sups = vec![start(None)];
    let addr = sups[0].addr;
    let idle_fds = idle_fd_baseline(sups[0].first_pid, addr);
    let load = Load::start(addr, 2, 2).expect("start load");
    load.wait_progress(100, Duration::from_secs(20), "before the first upgrade");
    let demo = demo_bin();
    let demo = demo.to_str().unwrap();

    for it in 0..iters {
        let p = POINTS[(next() % POINTS.len() as u64) as usize];
        let wrapper =
            dirs.env_wrapper(&format!("{}-{it}", p.name), &[("HANDOFF_CRASH_AT", p.name)]);
        let wrapper = wrapper.to_str().unwrap();
        eprintln!("stress {it}: {} (expect {:?})", p.name, p.survivor);
        let sup_before = supervisor_pid(sups.last().unwrap().pid);
        let fds_before = lowest_steady_fds(sup_before);
        match &p.name[..2] {
            "n-" => {
                let out = sups.last().unwrap().upgrade(&["--binary", wrapper]);
                if p.survivor == Survivor::Old {
                    out.expect_aborted(&["aborted"]);
                } else {
                    out.expect_committed();
                }
            }
            "o-" => {
                // Arm the incumbent: it must have been spawned with the point.
                sups.last()
                    .unwrap()
                    .upgrade(&["--binary", wrapper])
                    .expect_committed();
                let roots: Vec<u32> = sups.iter().map(|s| s.pid).collect();
                settle(&roots, addr, &lock, p.name);
                sups.last()
                    .unwrap()
                    .upgrade(&["--binary", demo])
                    .expect_committed();
            }
            _ => {
                if p.name == "s-after-seal-request" {
                    // Its point fires only with an incumbent at version 4.
                    let v4 =
                        dirs.env_wrapper(&format!("v4-{it}"), &[("HANDOFF_DEMO_PROTO_MAX", "4")]);
                    sups.last()
                        .unwrap()
                        .upgrade(&["--binary", v4.to_str().unwrap()])
                        .expect_committed();
                    let roots: Vec<u32> = sups.iter().map(|s| s.pid).collect();
                    settle(&roots, addr, &lock, p.name);
                }
                // Replace the supervisor by one armed with the point (a
                // kill -9 and a re-attach in itself), crash it mid-upgrade,
                // then start a clean one.
                let victim = supervisor_pid(sups.last().unwrap().pid);
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(victim as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
                sups.push(start(Some(p.name)));
                let sup = sups.last().unwrap();
                // Half the time through a prepared successor: the point then
                // fires in the prepare (spawn, greeting, holding) or in the
                // upgrade that hands over to the held process.
                let reexec = p.name.contains("reexec");
                // The supervisor relays moved connections only to or from
                // a process at protocol version 3: hand over to one.
                let v3 = dirs.env_wrapper(&format!("v3-{it}"), &[("HANDOFF_DEMO_PROTO_MAX", "3")]);
                let demo = if p.name == "s-relaying" {
                    v3.to_str().unwrap()
                } else {
                    demo
                };
                let out = if reexec {
                    // Its points fire replacing the supervisor in place.
                    sup.upgrade(&["--supervisor", "--wait", "3s"])
                } else if p.name == "s-holding-prepared" || next() % 2 == 0 {
                    let prep = sup.upgrade(&["--prepare", "--binary", demo]);
                    match prep.code {
                        Some(2) => prep,
                        Some(0) => sup.upgrade(&["--binary", demo]),
                        _ => panic!("stress {it} {}: prepare failed\n{prep}", p.name),
                    }
                } else {
                    sup.upgrade(&["--binary", demo])
                };
                let expected = if reexec { Some(1) } else { Some(2) };
                assert_eq!(out.code, expected, "stress {it} {}: {out}", p.name);
                let fired = format!("crash point {}: SIGKILL", p.name);
                assert!(
                    poll_until(Duration::from_secs(10), || sups
                        .last()
                        .unwrap()
                        .stderr_log()
                        .contains(&fired)),
                    "stress {it}: {} never fired\n{out}",
                    p.name
                );
                sups.push(start(None));
                assert_eq!(sups.last().unwrap().addr, addr);
            }
        }
        let roots: Vec<u32> = sups.iter().map(|s| s.pid).collect();
        settle(&roots, addr, &lock, &format!("stress {it}: {}", p.name));
        assert!(
            poll_until(Duration::from_secs(10), || !journal.exists()),
            "stress {it}: journal not cleared"
        );
        assert!(
            poll_until(Duration::from_secs(10), || zombies(&roots).is_empty()),
            "stress {it}: zombies {:?}",
            zombies(&roots)
        );
        load.wait_progress(50, Duration::from_secs(20), "after a crash");
        // The same supervisor lived through it: its fd count is flat.
        if supervisor_pid(sups.last().unwrap().pid) == sup_before {
            assert!(
                poll_until(Duration::from_secs(10), || count_open_fds(sup_before)
                    == fds_before),
                "stress {it}: supervisor fds {:?}, {fds_before:?} before",
                count_open_fds(sup_before)
            );
        }
    }

    let report = load.stop();
    eprintln!("stress: {report}");
    assert_eq!(report.refused, 0, "{report}");
    assert_eq!(
        report.timeouts + report.bad_status + report.mismatches,
        0,
        "{report}"
    );
    let problems = verify_acked(addr, &report.acked);
    assert!(
        problems.is_empty(),
        "acknowledged writes lost: {problems:?}"
    );
    let roots: Vec<u32> = sups.iter().map(|s| s.pid).collect();
    let survivor = settle(&roots, addr, &lock, "stress end");
    idle_fds_settle(survivor, idle_fds, "stress end");
}
