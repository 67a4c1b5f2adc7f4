//! End-to-end tests of what crosses process boundaries besides the listeners (issue 6,
//! items 3 and 4), through the real binaries:
//! - the demo's live counters live in a shared region in the state dir, keep counting
//!   across upgrades under load, and `handoff status` reads them from the supervisor;
//! - one supervisor per service: a second `handoff run` on the same state dir (another
//!   runtime dir) is refused, naming the holder of the restart lock, until the first dies;
//! - two `handoff upgrade` started at once: exactly one commits, the other is refused
//!   with exit 2 and "another handoff is in progress".
//!
//! Needs the demo binary: run with `cargo test --workspace`.

use crate::support;

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{
    begin_light_test, begin_test, demo_bin, handoff_bin, lock_holders, poll_until, process_state,
    wait_until, Load, LoadExt, LoadReportExt, Supervisor, TestDirs, UpgradeOutcome,
    UPGRADE_TIMEOUT,
};

const SETTLE: Duration = Duration::from_secs(10);
const PROGRESS: Duration = Duration::from_secs(10);
/// Counts reach the region within ~100 ms (the demo's flush period); this is slack.
const FLUSHED: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------
// Running the CLI
// ---------------------------------------------------------------------------------------

fn read_in_background(mut pipe: impl Read + Send + 'static) -> JoinHandle<String> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = pipe.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// A `handoff` command running in the background, its output collected.
struct Running {
    child: Child,
    args: Vec<String>,
    started: Instant,
    /// Exit status and run time, from the first [`poll`](Running::poll) that saw it exit.
    exited: Option<(ExitStatus, Duration)>,
    stdout: JoinHandle<String>,
    stderr: JoinHandle<String>,
}

/// The result of a finished `handoff` command.
struct Finished {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    elapsed: Duration,
}

fn spawn_handoff(args: &[&str]) -> Running {
    let mut child = Command::new(handoff_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn handoff {args:?}: {e}"));
    Running {
        stdout: read_in_background(child.stdout.take().expect("piped stdout")),
        stderr: read_in_background(child.stderr.take().expect("piped stderr")),
        child,
        args: args.iter().map(|s| s.to_string()).collect(),
        started: Instant::now(),
        exited: None,
    }
}

impl Running {
    /// Whether the command has exited (recording when, the first time it is seen).
    fn poll(&mut self) -> bool {
        if self.exited.is_none() {
            if let Some(st) = self.child.try_wait().expect("wait for handoff") {
                self.exited = Some((st, self.started.elapsed()));
            }
        }
        self.exited.is_some()
    }

    /// Waits (at most `within`) for the command to exit; kills it and panics otherwise.
    fn finish(mut self, within: Duration) -> Finished {
        let done = poll_until(within, || self.poll());
        if !done {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let (status, elapsed) = match self.exited {
            Some((st, t)) => (Some(st), t),
            None => (None, self.started.elapsed()),
        };
        let stdout = self.stdout.join().unwrap_or_default();
        let stderr = self.stderr.join().unwrap_or_default();
        assert!(
            done,
            "`handoff {:?}` did not exit within {within:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
            self.args
        );
        Finished {
            code: status.and_then(|s| s.code()),
            stdout,
            stderr,
            elapsed,
        }
    }

    /// As an `UpgradeOutcome`, for a `handoff upgrade --json` command.
    fn finish_upgrade(self, sup: &Supervisor) -> UpgradeOutcome {
        let args = self.args.clone();
        let f = self.finish(UPGRADE_TIMEOUT);
        let mut events = Vec::new();
        let mut bad_lines = Vec::new();
        for line in f.stdout.lines().filter(|l| !l.trim().is_empty()) {
            match serde_json::from_str::<Value>(line) {
                Ok(v) if v.is_object() => events.push(v),
                _ => bad_lines.push(line.to_owned()),
            }
        }
        UpgradeOutcome {
            args,
            code: f.code,
            stdout: f.stdout,
            stderr: f.stderr,
            events,
            bad_lines,
            elapsed: f.elapsed,
            supervisor_stderr: sup.stderr_log(),
        }
    }
}

/// `handoff status --runtime-dir R --json`, parsed; panics unless it exits 0 with one
/// `status` object.
fn status_json(runtime: &Path) -> Value {
    let dir = runtime.to_str().expect("UTF-8 path");
    let f = spawn_handoff(&["status", "--runtime-dir", dir, "--json"]).finish(SETTLE);
    assert_eq!(f.code, Some(0), "handoff status failed: {}", f.stderr);
    let v: Value = serde_json::from_str(f.stdout.trim())
        .unwrap_or_else(|e| panic!("status output is not one JSON object ({e}): {}", f.stdout));
    assert_eq!(v["event"], "status", "{v}");
    v
}

/// The `service_counters` of the status, or `Null`.
fn counters(runtime: &Path) -> Value {
    let v = status_json(runtime);
    assert!(
        v.get("service_counters_error").is_none(),
        "the supervisor could not read the counters: {v}"
    );
    v["service_counters"].clone()
}

fn num(v: &Value, field: &str) -> u64 {
    v[field]
        .as_u64()
        .unwrap_or_else(|| panic!("`{field}` is not a number in {v}"))
}

// ---------------------------------------------------------------------------------------
// Counters
// ---------------------------------------------------------------------------------------

/// The demo's counters carry across 5 upgrades under load: they only ever grow, every
/// request the load saw answered is counted, the handoffs are counted, and each of the 6
/// processes has its own generation with its pid. The supervisor reads all of it from
/// the shared region (the service is never asked), and prints it as text and JSON.
#[test]
fn counters_carry_across_upgrades_under_load() {
    let _guard = begin_test(
        "counters_carry_across_upgrades_under_load",
        Duration::from_secs(120),
    );
    let dirs = TestDirs::new();
    let sup = Supervisor::start(&dirs.runtime, &dirs.state, &demo_bin(), &[]);
    sup.wait_settled(sup.first_pid, SETTLE);

    let load = Load::start(sup.addr, 2, 2).expect("start the load");
    load.wait_progress(50, PROGRESS, "before the first upgrade");
    let mut served = 0;
    wait_until(
        FLUSHED,
        "the first process's requests are in the region",
        || {
            let c = counters(&dirs.runtime);
            served = c["requests_served"].as_u64().unwrap_or(0);
            served > 0
        },
    );

    let mut pids = vec![sup.first_pid];
    for i in 1..=5u64 {
        let c = sup.upgrade(&[]).expect_committed();
        assert_eq!(c.old_pid, *pids.last().expect("a pid"));
        pids.push(c.new_pid);
        sup.wait_settled(c.new_pid, SETTLE);
        load.wait_progress(20, PROGRESS, &format!("after upgrade {i}"));
        // The new process continues the count: it grows past what the old ones served.
        let before = served;
        wait_until(
            FLUSHED,
            &format!("the count grows after upgrade {i}"),
            || {
                let c = counters(&dirs.runtime);
                served = num(&c, "requests_served");
                assert!(
                    served >= before,
                    "the count went back: {before} -> {served}"
                );
                served > before && num(&c, "handoffs_survived") == i
            },
        );
    }

    let report = load.stop();
    eprintln!("{report}");
    report.assert_clean();
    let last = *pids.last().expect("a pid");
    sup.wait_settled(last, SETTLE);
    // Every request the load saw answered was counted by the process that answered it
    // (retired processes flushed before exiting; the incumbent flushes every ~100 ms).
    let mut c = Value::Null;
    let counted = poll_until(FLUSHED, || {
        c = counters(&dirs.runtime);
        num(&c, "requests_served") >= report.ok
    });
    let total = num(&c, "requests_served");
    assert!(
        counted,
        "the region counts {total} requests, the load saw {} answered\n{c:#}",
        report.ok
    );
    // The server also answered the harness's probes (GET /version while settling), so
    // it may count a little more, never much more.
    let extra = total - report.ok;
    eprintln!(
        "requests: load saw {} answered, the region counts {total} (+{extra} probes)",
        report.ok
    );
    assert!(
        extra <= 2_000 + report.ok / 20,
        "the region counts {total} requests, far more than the {} the load saw\n{c:#}",
        report.ok
    );

    assert_eq!(num(&c, "handoffs_survived"), 5, "{c:#}");
    assert_eq!(num(&c, "generations_started"), 6, "{c:#}");
    let gens = c["generations"].as_array().expect("generations array");
    let got: Vec<u32> = gens.iter().map(|g| num(g, "pid") as u32).collect();
    assert_eq!(got, pids, "one generation per process, in order\n{c:#}");
    let mut distinct = got.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(distinct.len(), 6, "pids repeat: {got:?}");
    for (i, g) in gens.iter().enumerate() {
        assert_eq!(num(g, "number"), i as u64 + 1, "{g}");
        assert_eq!(g["via_handoff"], Value::Bool(i > 0), "{g}");
        assert!(
            num(g, "requests") > 0,
            "generation {} served nothing: {g}",
            i + 1
        );
    }
    let sum: u64 = gens.iter().map(|g| num(g, "requests")).sum();
    assert_eq!(sum, total, "per-generation counts do not add up\n{c:#}");

    // The human form shows the same numbers.
    let dir = dirs.runtime.to_str().expect("UTF-8 path");
    let f = spawn_handoff(&["status", "--runtime-dir", dir]).finish(SETTLE);
    assert_eq!(f.code, Some(0), "{}", f.stderr);
    assert!(f.stdout.contains("handoffs survived  5"), "{}", f.stdout);
    assert!(
        f.stdout.contains("generations        6 started"),
        "{}",
        f.stdout
    );
    assert!(
        f.stdout.contains(&format!("incumbent          pid {last}")),
        "{}",
        f.stdout
    );
}

// ---------------------------------------------------------------------------------------
// One supervisor per service
// ---------------------------------------------------------------------------------------

/// A second supervisor for the same state dir — with its own runtime dir, so the runtime
/// dir's lock cannot see the conflict — is refused at start, naming the first (pid, since
/// when, its runtime dir), and touches nothing: the first keeps serving and upgrading.
/// Once the first dies, the kernel has released the lock and a new supervisor starts.
#[test]
fn second_supervisor_for_the_same_state_dir_is_refused() {
    let _guard = begin_light_test(
        "second_supervisor_for_the_same_state_dir_is_refused",
        Duration::from_secs(90),
    );
    let dirs = TestDirs::new();
    let demo = demo_bin();
    let first = Supervisor::start(&dirs.runtime, &dirs.state, &demo, &[]);
    first.wait_settled(first.first_pid, SETTLE);

    let other_runtime = dirs.root.path().join("run2");
    let (rt2, state) = (
        other_runtime.to_str().expect("UTF-8 path"),
        dirs.state.to_str().expect("UTF-8 path"),
    );
    let second = spawn_handoff(&[
        "run",
        "--runtime-dir",
        rt2,
        "--state-dir",
        state,
        "--listen",
        "http=tcp://127.0.0.1:0",
        "--",
        demo.to_str().expect("UTF-8 path"),
    ])
    .finish(Duration::from_secs(30));
    eprintln!(
        "second supervisor: exit {:?} after {:?}\n{}",
        second.code, second.elapsed, second.stderr
    );
    assert_eq!(
        second.code,
        Some(1),
        "the second supervisor was not refused\n{}",
        second.stderr
    );
    for needle in [
        "restart lock".to_string(),
        format!("pid {}", first.pid),
        "since".to_string(),
        format!("--runtime-dir {}", dirs.runtime.display()),
    ] {
        assert!(
            second.stderr.contains(&needle),
            "the refusal does not mention {needle:?}:\n{}",
            second.stderr
        );
    }
    assert!(
        !second.stdout.contains("listening") && !second.stdout.contains("ready"),
        "the refused supervisor bound or started something:\n{}",
        second.stdout
    );
    // Its wait is bounded (a few seconds), far short of the 20 s it would spend trying to
    // re-attach to a service it cannot reach.
    assert!(
        second.elapsed < Duration::from_secs(15),
        "{:?}",
        second.elapsed
    );

    // The first is untouched: same single process serving, and it still upgrades.
    first.wait_settled(first.first_pid, SETTLE);
    let c = first.upgrade(&[]).expect_committed();
    first.wait_settled(c.new_pid, SETTLE);

    // The holder dies (SIGKILL, no cleanup): the kernel released its lock, so a new
    // supervisor for the service starts at once. (Its service is killed too; wait until
    // that has let go of the state lock, or the newcomer would rightly spend its settle
    // time trying to re-attach to it.)
    drop(first);
    let state_lock = dirs.state.join(handoff::StateLock::FILE_NAME);
    wait_until(SETTLE, "the killed service released the state lock", || {
        matches!(process_state(c.new_pid), None | Some('Z')) && lock_holders(&state_lock).is_empty()
    });
    let again = Supervisor::start(&other_runtime, &dirs.state, &demo, &[]);
    again.wait_settled(again.first_pid, SETTLE);
}

// ---------------------------------------------------------------------------------------
// Concurrent upgrades
// ---------------------------------------------------------------------------------------

/// Two `handoff upgrade` processes started at the same instant against one supervisor:
/// exactly one commits; the other is refused at once — exit 2, "another handoff is in
/// progress", no phase run — while the first is still under way. The successor warms up
/// for 2 s (before it says Hello) so the two always overlap. Three rounds, under load,
/// with no failed request; afterwards a plain upgrade commits (the slot was freed).
#[test]
fn concurrent_upgrades_exactly_one_commits() {
    let _guard = begin_test(
        "concurrent_upgrades_exactly_one_commits",
        Duration::from_secs(120),
    );
    let dirs = TestDirs::new();
    let slow = dirs.env_wrapper("slow-warmup", &[("HANDOFF_DEMO_WARMUP_MS", "2000")]);
    let slow = slow.to_str().expect("UTF-8 path").to_owned();
    let sup = Supervisor::start(&dirs.runtime, &dirs.state, &demo_bin(), &[]);
    sup.wait_settled(sup.first_pid, SETTLE);
    let load = Load::start(sup.addr, 1, 1).expect("start the load");
    load.wait_progress(20, PROGRESS, "before the first round");

    let rt = dirs.runtime.to_str().expect("UTF-8 path");
    let mut incumbent = sup.first_pid;
    for round in 1..=3 {
        let args = ["upgrade", "--runtime-dir", rt, "--json", "--binary", &slow];
        let mut a = spawn_handoff(&args);
        let mut b = spawn_handoff(&args);
        // Poll both, so each one's run time is taken when it exits.
        poll_until(UPGRADE_TIMEOUT, || {
            let done_a = a.poll();
            b.poll() && done_a
        });
        let (a, b) = (a.finish_upgrade(&sup), b.finish_upgrade(&sup));
        let (winner, loser) = match (a.code, b.code) {
            (Some(0), _) => (a, b),
            (_, Some(0)) => (b, a),
            _ => panic!("round {round}: neither upgrade committed\n{a}\n\n{b}"),
        };
        let c = winner.expect_committed();
        assert_eq!(c.old_pid, incumbent, "round {round}\n{winner}");
        assert_eq!(
            loser.code,
            Some(2),
            "round {round}: the other did not exit 2\n{loser}"
        );
        assert_eq!(
            loser.events.len(),
            1,
            "round {round}: the refused upgrade ran phases\n{loser}"
        );
        let e = &loser.events[0];
        assert_eq!(e["event"], "error", "round {round}\n{loser}");
        assert!(
            e["message"]
                .as_str()
                .is_some_and(|m| m.contains("another handoff is in progress")),
            "round {round}: unexpected refusal\n{loser}"
        );
        assert!(
            loser.elapsed < winner.elapsed,
            "round {round}: the refusal ({:?}) was not immediate (the commit took {:?})",
            loser.elapsed,
            winner.elapsed
        );
        eprintln!(
            "round {round}: committed {} -> {} in {:.0} ms; the other refused after {:?}",
            c.old_pid, c.new_pid, c.total_ms, loser.elapsed
        );
        sup.wait_settled(c.new_pid, SETTLE);
        load.wait_progress(20, PROGRESS, &format!("after round {round}"));
        incumbent = c.new_pid;
    }
    let c = sup.upgrade(&[]).expect_committed();
    assert_eq!(c.old_pid, incumbent);
    sup.wait_settled(c.new_pid, SETTLE);
    let report = load.stop();
    eprintln!("{report}");
    report.assert_clean();
}

/// The demo's log compacts itself while serving (not only on a full
/// open): overwrites across upgrades keep the file small, and every
/// acknowledged value survives the compactions and the handoffs.
#[test]
fn demo_log_compacts_across_upgrades_and_keeps_every_acknowledged_value() {
    let _guard = begin_test("log_compaction", Duration::from_secs(120));
    let dirs = TestDirs::new();
    let sup = Supervisor::start(&dirs.runtime, &dirs.state, &demo_bin(), &[]);
    let mut client = support::Client::new(sup.addr, true);
    let log = dirs.state.join("kv.log");
    let mut last = Vec::new();
    // 4 rounds × 12 overwrites of a 200 KB value = 9.6 MB written; an
    // upgrade between rounds, so compactions happen in several processes.
    for round in 0..4u8 {
        for i in 0..12u8 {
            last = vec![round * 16 + i; 200_000];
            let r = client.put("/kv/big", &last).expect("PUT");
            assert_eq!(r.status, 200, "PUT round {round} #{i}");
        }
        let r = client
            .put(&format!("/kv/round-{round}"), b"done")
            .expect("PUT");
        assert_eq!(r.status, 200);
        sup.upgrade(&[]).expect_committed();
    }
    let len = std::fs::metadata(&log).expect("log").len();
    assert!(
        len < 3_000_000,
        "kv.log is {len} bytes after 9.6 MB of overwrites"
    );
    let mut fresh = support::Client::new(sup.addr, false);
    let got = fresh.get("/kv/big").expect("GET");
    assert_eq!(got.status, 200);
    assert!(got.body == last, "the last acknowledged value survived");
    for round in 0..4u8 {
        let r = fresh.get(&format!("/kv/round-{round}")).expect("GET");
        assert_eq!((r.status, r.body.as_slice()), (200, &b"done"[..]));
    }
}
