//! Rolling upgrades across a fleet with Ansible (issue 17), tested with the real engine.
//!
//! `ansible-core` is installed from PyPI by the test itself, once, into a venv kept in
//! cargo's target dir (`CARGO_TARGET_TMPDIR`); `ansible-playbook` then runs the collection
//! shipped in `deploy/ansible` (module `handoff.fleet.handoff_upgrade`, playbook
//! `playbooks/rolling_upgrade.yml`, config `ansible.cfg`) against "hosts" on this machine
//! (`ansible_connection=local`), each its own `handoff run` of the demo with its own dirs,
//! port, release directory and `current` link, each under HTTP load (keep-alive and fresh
//! connections) that counts every failed request.
//!
//! - A good build rolls out two hosts at a time with no failed request, and a second run
//!   of the same playbook changes nothing.
//! - A bad build fails the first batch (its health check fails on one host of it; on the
//!   other it starts); the play stops there, the whole batch is rolled back and serves its
//!   previous build (the host that had taken it by a real upgrade back), and the later
//!   hosts never even received the build.
//! - The module on its own: idempotence, check mode, rollback and its edge cases.
//!
//! Which build a host runs is what `handoff status --json` says its service executes
//! (`incumbent_exe`, `incumbent_exe_sha256`), which the first test checks on its own.

mod harness;

use crate::support;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::*;

use harness::*;

/// What the module relies on: `handoff status --json` names the executable the service
/// runs and the SHA-256 of its bytes — the bytes it runs, even once the file on disk was
/// replaced.
#[test]
fn status_names_the_running_executable_and_its_digest() {
    let _guard = begin_test("status_exe", Duration::from_secs(120));
    let dirs = TestDirs::new();
    let builds = Builds::make(dirs.root.path());
    let sup = Supervisor::start(&dirs.runtime, &dirs.state, &builds.v1, &[]);
    // The path at once; the digest once the supervisor has hashed the build in the
    // background (a status never waits for it).
    let first = status_json(&dirs.runtime);
    assert_eq!(
        first["incumbent_exe"].as_str().map(PathBuf::from),
        Some(canonical(&builds.v1)),
        "{first:#}"
    );
    let st = status_with_digest(&dirs.runtime);
    assert_eq!(
        st["incumbent_exe"].as_str().map(PathBuf::from),
        Some(canonical(&builds.v1)),
        "{st:#}"
    );
    assert_eq!(
        st["incumbent_exe_sha256"].as_str(),
        Some(sha256_of(&builds.v1).as_str())
    );

    let v2 = builds.v2.to_str().expect("UTF-8 path");
    let c = sup.upgrade(&["--binary", v2]).expect_committed();
    let st = status_with_digest(&dirs.runtime);
    assert_eq!(pid(&st), c.new_pid);
    assert_eq!(
        st["incumbent_exe"].as_str().map(PathBuf::from),
        Some(canonical(&builds.v2))
    );
    let v2_sha = sha256_of(&builds.v2);
    assert_ne!(v2_sha, sha256_of(&builds.v1), "the builds must differ");
    assert_eq!(st["incumbent_exe_sha256"].as_str(), Some(v2_sha.as_str()));
    let text = run_handoff(&["status"], &dirs.runtime, Duration::from_secs(20));
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains(&format!("(sha256 {v2_sha})")),
        "the text status shows the digest:\n{text}"
    );

    // Replace the file under the running process: the status says so, and still gives
    // the digest of what runs.
    let replacement = builds.v2.with_extension("new");
    crate::support::write_executable(&replacement, &fs::read(&builds.v1).expect("read v1"));
    fs::rename(&replacement, &builds.v2).expect("replace v2 on disk");
    let st = status_json(&dirs.runtime);
    assert_eq!(
        st["incumbent_exe"].as_str(),
        Some(format!("{} (deleted)", canonical(&builds.v2).display()).as_str()),
        "the replaced file is flagged"
    );
    assert_eq!(st["incumbent_exe_sha256"].as_str(), Some(v2_sha.as_str()));
}

/// The module on one host under load: check mode changes nothing; an upgrade changes
/// the build and records the previous one; the same task again is `ok`, not `changed`.
#[test]
fn module_is_idempotent_and_honours_check_mode() {
    let _guard = begin_test("module_idempotent", Duration::from_secs(600));
    // Bound in this order so they drop in the reverse: load, host, then dirs.
    let OneHost {
        scratch,
        inventory,
        builds,
        host,
        load,
    } = OneHost::start();
    let module = |extra: &str, check: bool| {
        let flags: &[&str] = if check { &["--check", "--diff"] } else { &[] };
        run_module(scratch.root.path(), &inventory, &host, extra, flags)
    };
    let v2 = format!("build={}", builds.v2.display());
    let before = host.assert_runs(&host.release("v1"), "at the start");

    let run = module(&v2, true);
    let (word, r) = run.adhoc_result("h1");
    assert_eq!(
        (word.as_str(), &r["changed"]),
        ("CHANGED", &Value::Bool(true)),
        "{run}"
    );
    assert!(
        r["msg"].as_str().unwrap_or("").starts_with("would upgrade"),
        "{run}"
    );
    let st = host.assert_runs(&host.release("v1"), "after check mode");
    assert_eq!(
        (pid(&st), counts(&st)),
        (pid(&before), (0, 0)),
        "check mode upgraded"
    );
    assert_eq!(host.record(), None, "check mode wrote a record");

    let run = module(&v2, false);
    let (word, r) = run.adhoc_result("h1");
    assert_eq!(word, "CHANGED", "{run}");
    let st = host.assert_runs(&builds.v2, "after the upgrade");
    assert_eq!(counts(&st), (1, 0));
    assert_eq!(r["old_pid"].as_u64(), Some(pid(&before) as u64), "{run}");
    assert_eq!(r["new_pid"].as_u64(), Some(pid(&st) as u64), "{run}");
    assert_eq!(r["exit_code"], 0);
    let phases: Vec<&str> = r["phases"]
        .as_array()
        .expect("phases")
        .iter()
        .filter_map(|p| p["phase"].as_str())
        .collect();
    assert!(
        phases.contains(&"draining") && phases.contains(&"awaiting-ready"),
        "{run}"
    );
    assert!(r["total_ms"].as_f64().is_some_and(|t| t > 0.0), "{run}");
    assert_eq!(
        r["running"]["sha256"].as_str(),
        Some(sha256_of(&builds.v2).as_str())
    );
    let rec = host.record().expect("a record");
    assert_eq!(rec["outcome"], "committed");
    assert_eq!(
        rec["previous"]["sha256"].as_str(),
        Some(sha256_of(&builds.v1).as_str()),
        "{rec:#}"
    );
    eprintln!(
        "upgrade by the module: {} in {:.2} ms, phases {}",
        r["msg"], r["total_ms"], r["phases"]
    );

    for check in [false, true] {
        let run = module(&v2, check);
        let (word, r) = run.adhoc_result("h1");
        assert_eq!(
            (word.as_str(), &r["changed"]),
            ("SUCCESS", &Value::Bool(false)),
            "{run}"
        );
        assert!(
            r["msg"].as_str().unwrap_or("").starts_with("already runs"),
            "{run}"
        );
    }
    // Nothing to prepare either: the build runs.
    let run = module(&format!("{v2} state=prepared"), false);
    assert_eq!(run.adhoc_result("h1").1["changed"], false, "{run}");
    let after = host.assert_runs(&builds.v2, "after the repeated tasks");
    assert_eq!(
        (pid(&after), counts(&after)),
        (pid(&st), (1, 0)),
        "a no-op upgraded"
    );

    wait_loads_progress(&[&load], LOAD_PROGRESS, "the load runs after the upgrade");
    let seen = load.finish();
    eprintln!(
        "{}: {} requests ok, {} failed, pids {:?}",
        host.name, seen.ok, seen.failed, seen.pids
    );
    assert_eq!(seen.failed, 0, "failed requests: {:?}", seen.failures);
    assert!(
        seen.pids.contains(&pid(&before)) && seen.pids.contains(&pid(&st)),
        "{seen:?}"
    );
}

/// Rollback on its own: refused with nothing recorded; after an upgrade it goes back to
/// the recorded previous build (check mode first, which changes nothing), and again is
/// `ok`; undoing a build never attempted here is `ok`; a bad build aborts, the host keeps
/// serving its build, and the link is put back.
#[test]
fn module_rolls_back_to_the_previous_build() {
    let _guard = begin_test("module_rollback", Duration::from_secs(600));
    // Bound in this order so they drop in the reverse: load, host, then dirs.
    let OneHost {
        scratch,
        inventory,
        builds,
        host,
        load,
    } = OneHost::start();
    let module = |extra: &str, check: bool| {
        let flags: &[&str] = if check { &["--check"] } else { &[] };
        run_module(scratch.root.path(), &inventory, &host, extra, flags)
    };

    let run = module("state=rolled_back", false);
    let (word, r) = run.adhoc_result("h1");
    assert_eq!(word, "FAILED!", "{run}");
    assert!(
        r["msg"]
            .as_str()
            .unwrap_or("")
            .contains("no previous build is recorded"),
        "{run}"
    );
    let v1_pid = pid(&host.assert_runs(&host.release("v1"), "after a refused rollback"));

    let run = module(&format!("build={}", builds.v2.display()), false);
    assert_eq!(run.adhoc_result("h1").0, "CHANGED", "{run}");
    let v2_st = host.assert_runs(&builds.v2, "after the upgrade");

    let run = module("state=rolled_back", true);
    let (word, r) = run.adhoc_result("h1");
    assert_eq!(word, "CHANGED", "{run}");
    assert!(
        r["msg"].as_str().unwrap_or("").starts_with("would roll"),
        "{run}"
    );
    let st = host.assert_runs(&builds.v2, "after a rollback in check mode");
    assert_eq!((pid(&st), counts(&st)), (pid(&v2_st), (1, 0)));

    let run = module("state=rolled_back", false);
    let (word, r) = run.adhoc_result("h1");
    assert_eq!(word, "CHANGED", "{run}");
    let back = host.assert_runs(&host.release("v1"), "after the rollback");
    assert_eq!(counts(&back), (2, 0));
    assert_eq!(r["old_pid"].as_u64(), Some(pid(&v2_st) as u64), "{run}");
    assert_eq!(r["new_pid"].as_u64(), Some(pid(&back) as u64), "{run}");
    assert_ne!(
        pid(&back),
        v1_pid,
        "a rollback is an upgrade to the old build: a new process"
    );
    assert_eq!(host.record().expect("a record")["outcome"], "rolled-back");
    eprintln!("rollback by the module: {}", r["msg"]);

    let run = module("state=rolled_back", false);
    let (word, r) = run.adhoc_result("h1");
    assert_eq!(
        (word.as_str(), &r["changed"]),
        ("SUCCESS", &Value::Bool(false)),
        "{run}"
    );
    let run = module(
        &format!("state=rolled_back build={}", builds.v3.display()),
        false,
    );
    let (word, r) = run.adhoc_result("h1");
    assert_eq!(word, "SUCCESS", "{run}");
    assert!(
        r["msg"]
            .as_str()
            .unwrap_or("")
            .contains("was attempted here"),
        "{run}"
    );
    let st = host.assert_runs(&host.release("v1"), "after the no-op rollbacks");
    assert_eq!((pid(&st), counts(&st)), (pid(&back), (2, 0)));

    // A bad build: the upgrade aborts, the reason comes back, nothing changes.
    let run = module(&format!("build={}", builds.v3.display()), false);
    let (word, r) = run.adhoc_result("h1");
    assert_eq!(
        (word.as_str(), &r["changed"]),
        ("FAILED!", &Value::Bool(false)),
        "{run}"
    );
    assert_eq!(r["exit_code"], 1, "{run}");
    assert_eq!(r["aborted_phase"], "awaiting-ready", "{run}");
    assert!(
        r["reason"].as_str().unwrap_or("").contains("health check"),
        "{run}"
    );
    let st = host.assert_runs(&host.release("v1"), "after the aborted upgrade");
    assert_eq!((pid(&st), counts(&st)), (pid(&back), (2, 1)));
    // Undoing it is a no-op: the host never left its build.
    let run = module(
        &format!("state=rolled_back build={}", builds.v3.display()),
        false,
    );
    let (word, r) = run.adhoc_result("h1");
    assert_eq!(
        (word.as_str(), &r["changed"]),
        ("SUCCESS", &Value::Bool(false)),
        "{run}"
    );
    assert_eq!(
        pid(&host.assert_runs(&host.release("v1"), "at the end")),
        pid(&back)
    );

    wait_loads_progress(&[&load], LOAD_PROGRESS, "the load runs after the rollbacks");
    let seen = load.finish();
    eprintln!(
        "{}: {} requests ok, {} failed, pids {:?}",
        host.name, seen.ok, seen.failed, seen.pids
    );
    assert_eq!(seen.failed, 0, "failed requests: {:?}", seen.failures);
}

/// The fleet: six hosts under load, the repository's playbook. A good build rolls out
/// two hosts at a time (batches strictly one after another) with no failed request; the
/// same run again changes nothing; a bad build fails the first batch, which is rolled
/// back whole, and the four other hosts never receive it. No request fails throughout.
#[test]
fn fleet_rolls_out_in_batches_and_stops_at_a_bad_batch() {
    let _guard = begin_test("fleet", Duration::from_secs(900));
    let started = Instant::now();
    ansible_bin();
    let scratch = TestDirs::new();
    let builds = Builds::make(scratch.root.path());
    let hosts: Vec<Host> = (1..=6)
        .map(|i| Host::start(&format!("h{i}"), &builds.v1))
        .collect();
    let inventory = scratch.root.path().join("inventory.ini");
    write_inventory(&inventory, &hosts.iter().collect::<Vec<_>>());
    let loads: Vec<HostLoad> = hosts.iter().map(|h| HostLoad::start(h.sup.addr)).collect();
    let all_loads: Vec<&HostLoad> = loads.iter().collect();
    wait_loads_progress(&all_loads, LOAD_PROGRESS, "every host's load runs");
    let playbook = repo_root().join("deploy/ansible/playbooks/rolling_upgrade.yml");
    let (inv, pb) = (
        inventory.to_str().expect("UTF-8"),
        playbook.to_str().expect("UTF-8"),
    );
    let rollout = |release: &str, build: &Path, extra: &[&str]| {
        let mut argv = vec![
            "-v".to_string(),
            "-i".into(),
            inv.into(),
            pb.into(),
            "-e".into(),
            format!("release={release}"),
            "-e".into(),
            format!("build_src={}", build.display()),
        ];
        argv.extend(extra.iter().map(|s| s.to_string()));
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        run_ansible(scratch.root.path(), "ansible-playbook", &argv)
    };
    let before: Vec<Value> = hosts.iter().map(Host::status).collect();

    // 1. The good build, prepared ahead on each host of a batch, then handed over.
    let run = rollout("v2", &builds.v2, &["-e", "prepare_ahead=true"]);
    assert_eq!(run.code, Some(0), "{run}");
    let recap = run.recap();
    let upgrades = run.task_results("Hand over to the build");
    let v2_sha = sha256_of(&builds.v2);
    let mut windows = Vec::new();
    for (h, b) in hosts.iter().zip(&before) {
        let r = &recap[&h.name];
        assert_eq!(
            (r["failed"], r["rescued"]),
            (0, 0),
            "{}: {r:?}\n{run}",
            h.name
        );
        assert_eq!(
            r["changed"], 4,
            "{}: dir, copy, prepare, upgrade\n{run}",
            h.name
        );
        let st = h.assert_runs(&h.release("v2"), "after the good rollout");
        assert_eq!(st["incumbent_exe_sha256"].as_str(), Some(v2_sha.as_str()));
        assert_eq!(counts(&st), (1, 0), "{}", h.name);
        assert_ne!(pid(&st), pid(b), "{}", h.name);
        let u = &upgrades[&h.name];
        assert_eq!(
            u["new_pid"].as_u64(),
            Some(pid(&st) as u64),
            "{}: {u:#}",
            h.name
        );
        assert!(
            u["prepared_for_ms"].as_f64().is_some(),
            "{}: the cut-over did not use the prepared process: {u:#}",
            h.name
        );
        let last = &st["last_handoff"];
        let end = last["ended_at_ms"].as_f64().expect("ended_at_ms");
        windows.push((end - last["total_ms"].as_f64().expect("total_ms"), end));
        eprintln!(
            "{}: {} (prepared {:.0} ms before), phases {}",
            h.name, u["msg"], u["prepared_for_ms"], u["phases"]
        );
    }
    // serial 2: each batch's handoffs all end before the next batch's begin.
    for k in 0..2 {
        let end_of_batch = windows[2 * k].1.max(windows[2 * k + 1].1);
        let next_start = windows[2 * k + 2].0.min(windows[2 * k + 3].0);
        assert!(
            end_of_batch < next_start,
            "batch {} ended at {end_of_batch} ms, batch {} began at {next_start} ms: {windows:?}",
            k + 1,
            k + 2
        );
    }
    wait_loads_progress(
        &all_loads,
        LOAD_PROGRESS,
        "every host's load runs after the rollout",
    );
    for ((h, l), b) in hosts.iter().zip(&loads).zip(&before) {
        assert_eq!(
            l.failed(),
            0,
            "{}: failed requests during the good rollout",
            h.name
        );
        let pids = l.pids();
        let now = pid(&h.status());
        assert!(
            pids.contains(&pid(b)) && pids.contains(&now),
            "{}: the load saw {pids:?}, not both the old pid {} and the new {now}",
            h.name,
            pid(b)
        );
    }
    eprintln!("good rollout: {:.1}s", run.elapsed.as_secs_f64());

    // 2. The same again: nothing to do anywhere.
    let v2_state: Vec<Value> = hosts.iter().map(Host::status).collect();
    let run = rollout("v2", &builds.v2, &["-e", "prepare_ahead=true"]);
    assert_eq!(run.code, Some(0), "{run}");
    let recap = run.recap();
    for (h, s) in hosts.iter().zip(&v2_state) {
        assert_eq!(
            recap[&h.name]["changed"], 0,
            "{}: a second run changed something\n{run}",
            h.name
        );
        let st = h.assert_runs(&h.release("v2"), "after the second run");
        assert_eq!((pid(&st), counts(&st)), (pid(s), (1, 0)), "{}", h.name);
    }
    eprintln!("second run (no change): {:.1}s", run.elapsed.as_secs_f64());

    // 3. The bad build: it fails its health check on h2 and starts on h1, so the first
    // batch fails as a whole: h1, upgraded, is rolled back for real, h2 never left its
    // build, and the play stops before the other four hosts.
    fs::write(hosts[1].app_dir.join("broken-here"), b"").expect("mark h2");
    let records: Vec<Option<Value>> = hosts.iter().map(Host::record).collect();
    let run = rollout("v3", &builds.v3_fleet, &[]);
    assert_ne!(
        run.code,
        Some(0),
        "a failed rollout must fail the play\n{run}"
    );
    let recap = run.recap();
    let upgrades = run.task_results("Hand over to the build");
    let rollbacks = run.task_results("Roll the whole batch back if any host of it failed");
    for (i, (h, s)) in hosts.iter().zip(&v2_state).enumerate() {
        let st = h.assert_runs(&h.release("v2"), "after the bad rollout");
        let r = recap.get(&h.name);
        match i {
            0 => {
                // Upgraded to v3, then rolled back to v2 with the rest of its batch.
                let r = r.expect("h1 in the recap");
                assert_eq!((r["failed"], r["rescued"]), (1, 0), "h1: {r:?}\n{run}");
                let v3_pid = upgrades["h1"]["new_pid"].as_u64().expect("h1 upgraded") as u32;
                let rb = &rollbacks["h1"];
                assert_eq!(rb["changed"], true, "h1 was not rolled back: {rb:#}");
                assert_eq!(rb["old_pid"].as_u64(), Some(v3_pid as u64), "{rb:#}");
                assert_eq!(rb["new_pid"].as_u64(), Some(pid(&st) as u64), "{rb:#}");
                assert_eq!(counts(&st), (3, 0), "h1: v2, v3 and the rollback");
                assert!(loads[0].pids().contains(&v3_pid), "h1 never served v3");
            }
            1 => {
                // Its upgrade aborted: the old process served on; the rollback is a no-op.
                let r = r.expect("h2 in the recap");
                assert_eq!((r["failed"], r["rescued"]), (1, 1), "h2: {r:?}\n{run}");
                assert_eq!(pid(&st), pid(s), "h2: the serving process changed");
                assert_eq!(counts(&st), (1, 1), "h2: one aborted upgrade");
                let reason = st["last_handoff"]["reason"].as_str().unwrap_or("");
                assert!(reason.contains("health check"), "h2: {st:#}");
                let u = &upgrades["h2"];
                assert_eq!(u["exit_code"], 1, "h2: the module's result: {u:#}");
                assert_eq!(u["aborted_phase"], "awaiting-ready", "h2: {u:#}");
                let rb = &rollbacks["h2"];
                assert_eq!(rb["changed"], false, "h2: already on its build: {rb:#}");
            }
            _ => {
                assert!(
                    r.is_none(),
                    "{}: a host of a later batch ran tasks: {r:?}\n{run}",
                    h.name
                );
                assert_eq!(pid(&st), pid(s), "{}: the serving process changed", h.name);
                assert_eq!(counts(&st), (1, 0), "{}: an upgrade was attempted", h.name);
                assert_eq!(
                    st["last_handoff"]["handoff_id"], s["last_handoff"]["handoff_id"],
                    "{}",
                    h.name
                );
                assert!(
                    !h.app_dir.join("releases/v3").exists(),
                    "{}: received v3",
                    h.name
                );
                assert_eq!(h.record(), records[i], "{}: its record changed", h.name);
                continue;
            }
        }
        assert!(
            h.release("v3").is_file(),
            "{}: the build was copied",
            h.name
        );
        assert_eq!(h.record().expect("a record")["outcome"], "rolled-back");
    }
    assert!(
        run.stdout.contains("the batch was rolled back"),
        "the play says why it stopped\n{run}"
    );
    eprintln!(
        "bad rollout (stopped at batch 1): {:.1}s",
        run.elapsed.as_secs_f64()
    );

    wait_loads_progress(
        &all_loads,
        LOAD_PROGRESS,
        "every host's load runs at the end",
    );
    let mut total = (0, 0);
    for (h, l) in hosts.iter().zip(loads) {
        let seen = l.finish();
        eprintln!(
            "{}: {} requests ok, {} failed, {} stale keep-alive retries, pids {:?}",
            h.name, seen.ok, seen.failed, seen.stale_retries, seen.pids
        );
        assert_eq!(
            seen.failed, 0,
            "{}: failed requests: {:?}",
            h.name, seen.failures
        );
        total.0 += seen.ok;
        total.1 += seen.failed;
    }
    eprintln!(
        "fleet: {} requests ok, {} failed, in {:.1}s",
        total.0,
        total.1,
        started.elapsed().as_secs_f64()
    );
}
