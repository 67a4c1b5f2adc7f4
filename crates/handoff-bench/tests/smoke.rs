//! CI smoke test of the side-by-side benchmark: the whole harness in a tiny form (2 s per
//! contestant, 3 upgrades each, no scale series). It checks that it runs and that the
//! handoff contestant lost nothing; it asserts no timing figure (that is the full run's job).
//!
//! Needs the `handoff` binary next to the bench binaries: `cargo build --workspace --bins`
//! first (a missing one fails with that instruction).

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

mod common;

/// Runs `cmd` in a process group of its own, bounded by `limit` (on time
/// out the whole group is killed: contestants and services too), and
/// returns its output once it exited successfully.
fn run_bounded(cmd: &mut Command, what: &str, limit: Duration) -> std::process::Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {what}: {e}"));
    // Output is read after exit; the drivers print a few KiB, well under a
    // pipe's buffer.
    let mut status = None;
    if !common::poll_until(limit, || {
        status = child.try_wait().expect("try_wait");
        status.is_some()
    }) {
        let pgid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        let _ = child.kill();
        let _ = child.wait();
        panic!("{what} did not finish within {limit:?}");
    }
    let status = status.expect("exited");
    let out = child.wait_with_output().expect("output");
    assert!(
        status.success(),
        "{what} failed: {status}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn harness_runs_and_handoff_loses_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let json = dir.path().join("out.json");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_handoff-bench-peers"));
    cmd.args([
        "--secs",
        "2",
        "--interval-ms",
        "500",
        "--keepalive",
        "4",
        "--fresh",
        "2",
        "--no-scale",
        "--floor-secs",
        "1",
    ])
    .arg("--json")
    .arg(&json)
    .arg("--workdir")
    .arg(dir.path().join("work"));
    let out = run_bounded(&mut cmd, "handoff-bench-peers", Duration::from_secs(90));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("| handoff |"),
        "no handoff row in:\n{stdout}"
    );

    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).expect("reading the JSON")).expect("JSON");
    let rows = v["contestants"].as_array().expect("contestants");
    let names: Vec<&str> = rows.iter().filter_map(|r| r["name"].as_str()).collect();
    assert_eq!(
        names,
        [
            "control (no upgrades)",
            "handoff",
            "handoff (SIGHUP)",
            "handoff (SIGHUP, accept after Commit)",
            "handoff (prepared, SIGHUP, accept after Commit)",
            "handoff (examples/axum, handoff-tokio)",
            "ecdysis",
            "shellflip"
        ],
        "{stderr}"
    );
    for r in rows {
        assert!(
            r["requests"].as_u64().unwrap_or(0) > 100,
            "{} barely ran: {r}",
            r["name"]
        );
    }
    // Both triggers (`handoff upgrade`, SIGHUP to `handoff run`): nothing lost, every
    // upgrade committed and seen end to end (a new process answered after each trigger),
    // and the tool-done time known for each (the command returned / the commit line).
    for name in [
        "handoff",
        "handoff (SIGHUP)",
        "handoff (SIGHUP, accept after Commit)",
        "handoff (prepared, SIGHUP, accept after Commit)",
        "handoff (examples/axum, handoff-tokio)",
    ] {
        let h = rows
            .iter()
            .find(|r| r["name"] == name)
            .unwrap_or_else(|| panic!("no {name} row"));
        assert_eq!(h["failed_total"], 0, "{name} lost requests: {h}\n{stderr}");
        assert!(h["upgrades"].as_u64().unwrap_or(0) >= 2, "{h}");
        assert_eq!(h["upgrades_failed"], 0, "{h}\n{stderr}");
        assert_eq!(h["serve_ms"]["n"], h["upgrades"], "{h}");
        assert_eq!(h["done_ms"]["n"], h["upgrades"], "{h}");
        // Its phase log was read (the copied stderr is complete).
        assert!(
            h["phases_ms"]["total"]["n"].as_u64().unwrap_or(0) >= 2,
            "{h}"
        );
    }
    // Keep-alive clients reconnect per upgrade where connections are closed (the tiny
    // handler's answer-then-close drain), never where they are moved (examples/axum on
    // handoff-tokio, protocol version 3) or where nothing restarts (the control).
    let reconnects = |name: &str| {
        rows.iter()
            .find(|r| r["name"] == name)
            .and_then(|r| r["reconnects"].as_u64())
            .unwrap_or_else(|| panic!("no reconnect count for {name}"))
    };
    assert_eq!(reconnects("control (no upgrades)"), 0, "{stdout}");
    assert_eq!(
        reconnects("handoff (examples/axum, handoff-tokio)"),
        0,
        "its keep-alive connections were not all moved:\n{stdout}\n{stderr}"
    );
    assert!(reconnects("handoff") > 0, "nothing counted:\n{stdout}");
    // The prepared row ran its prepare before every trigger.
    let p = rows
        .iter()
        .find(|r| r["name"] == "handoff (prepared, SIGHUP, accept after Commit)")
        .expect("prepared row");
    assert_eq!(p["prepare_ms"]["n"], p["upgrades"], "{p}");
    assert!(v["floors"]["spawn_ms"]["n"].as_u64().unwrap_or(0) > 0);
    // The floors sampled under load too (the like-for-like bound for handoff times).
    assert!(v["floors"]["loaded_spawn_ms"]["n"].as_u64().unwrap_or(0) > 0);
    assert!(
        v["floors"]["loaded_socketpair_rtt_ms"]["n"]
            .as_u64()
            .unwrap_or(0)
            > 0
    );
}

/// `handoff-bench-move` in a tiny form: 20 idle connections through 2 upgrades of the axum
/// example, each moved and answered by the new build on the same connection.
#[test]
fn move_bench_runs_and_every_connection_moves() {
    let dir = tempfile::tempdir().expect("tempdir");
    let json = dir.path().join("move.json");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_handoff-bench-move"));
    cmd.args(["--conns", "0,20", "--upgrades", "2"])
        .arg("--json")
        .arg(&json)
        .arg("--workdir")
        .arg(dir.path().join("work"));
    let out = run_bounded(&mut cmd, "handoff-bench-move", Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).expect("reading the JSON")).expect("JSON");
    let series = v.as_array().expect("series");
    assert_eq!(series.len(), 2, "{v}");
    for s in series {
        let n = s["conns"].as_u64().expect("conns");
        let rounds = s["rounds"].as_array().expect("rounds");
        assert_eq!(rounds.len(), 2, "{s}");
        for r in rounds {
            assert_eq!(r["error"], serde_json::Value::Null, "{r}\n{stderr}");
            assert_eq!(r["moved"].as_u64(), Some(n), "{r}\n{stderr}");
            assert_eq!(r["closed"].as_u64(), Some(0), "{r}");
            assert_eq!(r["failures"].as_u64(), Some(0), "{r}\n{stderr}");
            assert!(r["draining_ms"].as_f64().is_some(), "{r}");
        }
    }
}

/// `handoff-bench-state` in a tiny form: a seeded store of 5,000 keys upgraded twice idle
/// and twice under writes; every upgrade commits with a catch-up report and an accept gap,
/// the pair's memory is sampled, and no acknowledged write is lost.
#[test]
fn state_bench_runs_and_loses_no_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    let json = dir.path().join("state.json");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_handoff-bench-state"));
    cmd.args(["--keys", "5000", "--upgrades", "2", "--clients", "4"])
        .arg("--json")
        .arg(&json)
        .arg("--workdir")
        .arg(dir.path().join("work"));
    let out = run_bounded(&mut cmd, "handoff-bench-state", Duration::from_secs(90));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).expect("reading the JSON")).expect("JSON");
    let series = v.as_array().expect("series");
    assert_eq!(series.len(), 2, "{v}");
    for s in series {
        assert_eq!(s["keys"].as_u64(), Some(5000), "{s}");
        assert_eq!(s["lost"].as_u64(), Some(0), "{s}\n{stderr}");
        assert_eq!(s["failed_requests"].as_u64(), Some(0), "{s}\n{stderr}");
        let rounds = s["rounds"].as_array().expect("rounds");
        assert_eq!(rounds.len(), 2, "{s}");
        for r in rounds {
            assert_eq!(r["error"], serde_json::Value::Null, "{r}\n{stderr}");
            assert!(r["gap_ms"].as_f64().is_some_and(|g| g > 0.0), "{r}");
            assert!(
                r["catch_up"]["rounds"].as_u64().is_some_and(|n| n >= 1),
                "{r}"
            );
            assert!(r["peak_pss_mib"].as_f64().is_some_and(|m| m > 0.0), "{r}");
        }
    }
    assert_eq!(series[0]["writes"], "none", "{v}");
    assert!(series[1]["acked"].as_u64().is_some_and(|n| n > 0), "{v}");
}
