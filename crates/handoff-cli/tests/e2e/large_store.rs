//! Issue 18, in a form short enough for CI: a stateful service with a store
//! far larger than what it writes during an upgrade is upgraded again and
//! again under writes, and
//!
//! - every acknowledged write, and every key the store started with, reads
//!   back exactly afterwards;
//! - no new build replays the store's history to warm up: each one opens
//!   the checkpoint (the index beside the log) and reads only what was
//!   written after it — its "preloaded" line says how many keys it found
//!   indexed and how many it read after;
//! - each one caught up with the old build's writes before its Hello, and
//!   the upgrade report says how (`catch_up` in the committed event).
//!
//! The 10-million-key case, with the accept gap's timings, is the
//! benchmark's (`handoff-bench-state`, BENCHMARKS.md).

use crate::support;

use std::process::Command;
use std::time::Duration;

use support::{
    begin_test, demo_bin, verify_acked, wait_until, Conn, Load, LoadExt, StartOpts, Supervisor,
    TestDirs,
};

/// Keys the store holds before the service first starts.
const SEEDED: u64 = 200_000;
/// Checkpoint after this many keys written: several checkpoints per test.
const CHECKPOINT_EVERY: u64 = 100;
const UPGRADES: usize = 6;
const SETTLE: Duration = Duration::from_secs(20);
const PROGRESS: Duration = Duration::from_secs(10);

/// The value of ` NAME=` (digits) in `line`.
fn field(line: &str, name: &str) -> Option<u64> {
    let at = line.find(&format!(" {name}="))? + name.len() + 2;
    line[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// `records=` of every log line saying `what`.
fn records_of(log: &str, what: &str) -> Vec<u64> {
    log.lines()
        .filter(|l| l.contains(what))
        .filter_map(|l| field(l, "records"))
        .collect()
}

/// The `preloaded` lines of every process so far: (keys indexed, keys read
/// after the index).
fn preloads(log: &str) -> Vec<(u64, u64)> {
    log.lines()
        .filter(|l| l.contains("demo::store") && l.contains("preloaded"))
        .filter_map(|l| Some((field(l, "indexed")?, field(l, "held")?)))
        .collect()
}

#[test]
fn a_large_store_upgrades_under_writes_reading_only_what_is_new() {
    let _guard = begin_test(
        "a_large_store_upgrades_under_writes_reading_only_what_is_new",
        Duration::from_secs(240),
    );
    let dirs = TestDirs::new();
    let seeded = Command::new(demo_bin())
        .args(["seed", "--keys", &SEEDED.to_string(), "--state-dir"])
        .arg(&dirs.state)
        .output()
        .expect("run handoff-demo seed");
    assert!(
        seeded.status.success(),
        "handoff-demo seed failed: {}",
        String::from_utf8_lossy(&seeded.stderr)
    );
    let opts = StartOpts {
        env: vec![
            (
                "HANDOFF_DEMO_CHECKPOINT_RECORDS".into(),
                CHECKPOINT_EVERY.to_string(),
            ),
            (
                "RUST_LOG".into(),
                "warn,demo::store=info,handoff::successor=info".into(),
            ),
        ],
        ..StartOpts::default()
    };
    let sup = Supervisor::start_with(&dirs.runtime, &dirs.state, &demo_bin(), &[], &opts);
    sup.wait_settled(sup.first_pid, SETTLE);
    // `seed` wrote the log and its checkpoint, as a service that had taken
    // those writes would have left them.
    assert!(dirs.state.join("kv.idx").exists(), "seed wrote no index");

    let load = Load::start(sup.addr, 2, 2).expect("start the load");
    load.wait_progress(200, PROGRESS, "before the first upgrade");
    let mut caught_up = vec![];
    for i in 1..=UPGRADES {
        let out = sup.upgrade(&[]);
        let c = out.expect_committed();
        let committed = out.events_of("committed")[0].clone();
        let cu = &committed["catch_up"];
        assert!(
            cu["rounds"].as_u64().is_some_and(|r| r >= 1) && cu["converged"] == true,
            "upgrade {i}: no converged catch-up in the report: {committed}\n{out}"
        );
        caught_up.push((
            cu["rounds"].as_u64().unwrap_or(0),
            cu["records"].as_u64().unwrap_or(0),
        ));
        sup.wait_settled(c.new_pid, SETTLE);
        load.wait_progress(300, PROGRESS, &format!("after upgrade {i}"));
    }
    let report = load.stop();
    let lost = verify_acked(sup.addr, &report.acked);
    assert!(
        report.failure_count() == 0 && lost.is_empty(),
        "{report}\n{} of {} acknowledged writes are missing or wrong; first ones:\n{}",
        lost.len(),
        report.acked.len(),
        lost.iter().take(20).cloned().collect::<Vec<_>>().join("\n")
    );
    // The seeded keys, through the index: a sample across the whole log.
    let mut conn = Conn::connect(sup.addr).expect("connect");
    for i in (0..SEEDED).step_by(997).chain([SEEDED - 1]) {
        let r = conn
            .get(&format!("/kv/seed-{i}"))
            .unwrap_or_else(|e| panic!("GET seed-{i}: {e:?}"));
        assert_eq!(
            (r.status, r.body_str()),
            (200, format!("v{i:031}")),
            "seeded key {i}"
        );
    }

    let log = sup.stderr_log();
    let preloads = preloads(&log);
    eprintln!(
        "preloads (indexed, read after the index): {preloads:?}; catch-up (rounds, records): {caught_up:?}; {} acknowledged writes",
        report.acked.len()
    );
    assert_eq!(
        preloads.len(),
        UPGRADES + 1,
        "one `preloaded` line per process expected\n{log}"
    );
    // Every process found the store indexed and read only what was written
    // since a recent checkpoint: a few hundred records — the last
    // checkpoint's threshold, the writes while one is being written (a
    // debug build takes ~100 ms), or an older index when a newer one lands
    // during the preload — never the 200,000 of history.
    assert_eq!(preloads[0], (SEEDED, 0), "the first start\n{log}");
    for (i, &(indexed, held)) in preloads.iter().enumerate().skip(1) {
        assert!(
            indexed >= SEEDED && held < SEEDED / 20,
            "upgrade {i}: the new build found {indexed} keys indexed and read {held} after the \
             index: it replayed history instead of the checkpoint's tail\n{log}"
        );
    }
    assert!(
        !log.contains("ignoring the index"),
        "an index was found unusable\n{log}"
    );
    // And checkpoints went on under the writes, in the old builds and the
    // new ones.
    let checkpoints = log.matches("checkpoint written").count();
    assert!(
        checkpoints > UPGRADES,
        "{checkpoints} checkpoints written over {} acknowledged writes\n{log}",
        report.acked.len()
    );
}

/// A successor prepared ahead (`handoff upgrade --prepare`) caught up when
/// it said Hello; the old build then writes on for as long as it is held.
/// It keeps catching up meanwhile, so that after Begin it reads about one
/// round's writes instead of everything written while it was held, and
/// every acknowledged write is there after the upgrade.
#[test]
fn a_prepared_successor_keeps_up_with_the_writes_while_held() {
    let _guard = begin_test(
        "a_prepared_successor_keeps_up_with_the_writes_while_held",
        Duration::from_secs(120),
    );
    let dirs = TestDirs::new();
    let opts = StartOpts {
        env: vec![(
            "RUST_LOG".into(),
            "warn,demo::store=info,handoff::successor=debug".into(),
        )],
        ..StartOpts::default()
    };
    let sup = Supervisor::start_with(&dirs.runtime, &dirs.state, &demo_bin(), &[], &opts);
    sup.wait_settled(sup.first_pid, SETTLE);
    let out = sup.upgrade(&["--prepare"]);
    assert_eq!(out.code, Some(0), "prepare failed\n{out}");

    // Writes while it is held, until it has read some of them.
    let load = Load::start(sup.addr, 2, 0).expect("start the load");
    load.wait_progress(400, PROGRESS, "while a successor is held");
    // Long enough for several rounds (one per 100 ms of quiet) to have read
    // many writes: one round's worth, left for after Begin, is then small
    // against it.
    wait_until(
        PROGRESS,
        "the held successor has read 500 of the writes",
        || {
            records_of(&sup.stderr_log(), "kept up while waiting for Begin")
                .iter()
                .sum::<u64>()
                >= 500
        },
    );
    let out = sup.upgrade(&[]);
    let c = out.expect_committed();
    sup.wait_settled(c.new_pid, SETTLE);
    load.wait_progress(100, PROGRESS, "after the upgrade");
    let report = load.stop();
    let lost = verify_acked(sup.addr, &report.acked);
    assert!(
        report.failure_count() == 0 && lost.is_empty(),
        "{report}\n{} of {} acknowledged writes are missing or wrong: {:?}",
        lost.len(),
        report.acked.len(),
        lost.iter().take(10).collect::<Vec<_>>()
    );

    let log = sup.stderr_log();
    let kept: u64 = records_of(&log, "kept up while waiting for Begin")
        .iter()
        .sum();
    let tail = *records_of(&log, "read the tail after Begin")
        .last()
        .expect("a `read the tail after Begin` line");
    let committed = out.events_of("committed")[0].clone();
    let cu = &committed["catch_up"];
    eprintln!("kept up with {kept} records while held; {tail} read after Begin; report {cu}");
    assert!(
        cu["rounds"].as_u64().is_some_and(|r| r >= 2)
            && cu["records"].as_u64().is_some_and(|r| r >= kept),
        "the report does not count the rounds run while held: {committed}\n{out}"
    );
    assert!(
        tail < kept / 2,
        "after Begin the new build read {tail} records, not much fewer than the {kept} it had \
         kept up with while held: it did not keep up\n{log}"
    );
}
