//! `handoff run --config FILE` and `--metrics ADDR` through the real
//! binaries: a config file alone runs the service, flags override it, bad
//! files fail before anything starts, and the Prometheus endpoint counts
//! what really happened.

use crate::support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use support::*;

fn write_config(dir: &Path, body: &str) -> std::path::PathBuf {
    let p = dir.join("handoff.toml");
    std::fs::write(&p, body).unwrap();
    p
}

fn scrape(addr: SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
    out
}

/// The value of one sample line, e.g. `handoff_upgrades_total{outcome="committed"}`.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no sample {series} in:\n{text}"))
}

#[test]
fn config_file_alone_runs_the_service_and_metrics_count_what_happened() {
    let _guard = begin_light_test("config_metrics", Duration::from_secs(120));
    let dirs = TestDirs::new();
    // Relative paths resolve against the file's directory (the test root).
    let cfg = write_config(
        dirs.root.path(),
        &format!(
            "runtime-dir = \"run\"\nstate-dir = \"state\"\n\
             listen = [\"http=tcp://127.0.0.1:0\"]\ndrain-grace = \"20s\"\n\
             metrics = \"127.0.0.1:0\"\nprogram = [{:?}]\n",
            demo_bin().to_str().unwrap()
        ),
    );
    let sup = Supervisor::start_with(
        &dirs.runtime,
        &dirs.state,
        &demo_bin(),
        &["--config", cfg.to_str().unwrap()],
        &StartOpts {
            only_extra_args: true,
            ..Default::default()
        },
    );
    let metrics = sup.metrics_addr();
    assert!(get_version(sup.addr).is_ok(), "the service answers");

    let before = scrape(metrics);
    assert_eq!(
        sample(&before, "handoff_incumbent_pid"),
        f64::from(sup.first_pid)
    );
    assert_eq!(
        sample(&before, "handoff_upgrades_total{outcome=\"committed\"}"),
        0.0
    );

    let c1 = sup.upgrade(&[]).expect_committed();
    let c2 = sup.upgrade(&[]).expect_committed();
    let bad = dirs.fault_wrapper("fail-health");
    sup.upgrade(&["--binary", bad.to_str().unwrap()])
        .expect_aborted(&["health"]);

    // A refusal counts once: an upgrade asked for while another is held
    // in flight (a successor that never gets ready, 3 s deadline).
    let hang = dirs.fault_wrapper("hang-before-ready");
    let handoff = |args: &[&str]| {
        let mut c = Command::new(handoff_bin());
        c.args(args).arg("--runtime-dir").arg(&dirs.runtime);
        c
    };
    let mut held = handoff(&[
        "upgrade",
        "--deadline",
        "3s",
        "--binary",
        hang.to_str().unwrap(),
    ])
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null())
    .spawn()
    .unwrap();
    wait_until(Duration::from_secs(20), "an upgrade in flight", || {
        let out = handoff(&["status", "--json"]).output().unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        !v["in_flight"].is_null()
    });
    let refused = handoff(&["upgrade"]).output().unwrap();
    assert_eq!(
        refused.status.code(),
        Some(2),
        "refused while one is in flight"
    );
    let mut held_status = None;
    wait_until(Duration::from_secs(30), "the held upgrade to abort", || {
        held_status = held.try_wait().unwrap();
        held_status.is_some()
    });
    assert_eq!(
        held_status.and_then(|s| s.code()),
        Some(1),
        "deadline abort"
    );

    let m = scrape(metrics);
    assert_eq!(
        sample(&m, "handoff_upgrades_total{outcome=\"committed\"}"),
        2.0
    );
    assert_eq!(
        sample(&m, "handoff_upgrades_total{outcome=\"aborted\"}"),
        2.0
    );
    assert_eq!(
        sample(&m, "handoff_upgrades_total{outcome=\"refused\"}"),
        1.0
    );
    assert_eq!(
        sample(
            &m,
            "handoff_upgrade_duration_seconds_count{outcome=\"committed\"}"
        ),
        2.0
    );
    // Both commits went through draining and sealing (the abort may have
    // stopped before): the per-phase histograms saw at least those.
    for phase in ["negotiating", "draining", "sealing", "awaiting-ready"] {
        let n = sample(
            &m,
            &format!("handoff_phase_duration_seconds_count{{phase=\"{phase}\"}}"),
        );
        assert!(n >= 2.0, "phase {phase}: count {n}\n{m}");
        let inf = sample(
            &m,
            &format!("handoff_phase_duration_seconds_bucket{{phase=\"{phase}\",le=\"+Inf\"}}"),
        );
        assert_eq!(inf, n, "+Inf bucket equals the count for {phase}");
    }
    assert_eq!(sample(&m, "handoff_incumbent_pid"), f64::from(c2.new_pid));
    assert_ne!(c1.new_pid, c2.new_pid);
    // The file's drain grace reached the supervisor: status reports the
    // service, and the upgrade used no flag for it.
    assert!(get_version(sup.addr).is_ok());
}

#[test]
fn flags_override_the_file_and_check_config_prints_the_result() {
    let dirs = TestDirs::new();
    let cfg = write_config(
        dirs.root.path(),
        "runtime-dir = \"/nonexistent/run\"\nstate-dir = \"state\"\n\
         listen = [\"http=tcp://127.0.0.1:1\"]\ndeadline = 90\nprogram = [\"svc\", \"-v\"]\n",
    );
    let out = Command::new(handoff_bin())
        .args(["run", "--config", cfg.to_str().unwrap(), "--check-config"])
        .args(["--runtime-dir", "/tmp/override", "--drain-grace", "5s"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let root = dirs.root.path().to_str().unwrap();
    for want in [
        "runtime-dir = \"/tmp/override\"".to_string(),
        format!("state-dir = \"{root}/state\""),
        "listen = [\"http=tcp://127.0.0.1:1\"]".to_string(),
        "deadline = \"90000ms\"".to_string(),
        "drain-grace = \"5000ms\"".to_string(),
        "program = [\"svc\", \"-v\"]".to_string(),
    ] {
        assert!(stdout.contains(&want), "missing {want:?} in:\n{stdout}");
    }
}

#[test]
fn a_bad_config_fails_before_anything_starts_and_says_where() {
    let dirs = TestDirs::new();
    let run = |cfg: &Path| {
        Command::new(handoff_bin())
            .args(["run", "--config", cfg.to_str().unwrap()])
            .output()
            .unwrap()
    };
    // A misspelt key (underscore instead of dash) is an error, not a default.
    let cfg = write_config(
        dirs.root.path(),
        "runtime-dir = \"run\"\nstate-dir = \"state\"\ndrain_grace = \"5s\"\n",
    );
    let out = run(&cfg);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(cfg.to_str().unwrap())
            && err.contains("drain_grace")
            && err.contains("line 3"),
        "{err}"
    );
    // Nothing was created: the runtime dir named in the file does not exist.
    assert!(!dirs.root.path().join("run").join("admin.sock").exists());

    let out = run(&dirs.root.path().join("missing.toml"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("reading config file") && err.contains("missing.toml"),
        "{err}"
    );

    let cfg = write_config(
        dirs.root.path(),
        "runtime-dir = \"run\"\nstate-dir = \"s\"\n",
    );
    let out = run(&cfg);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--listen is required") && err.contains("listen = …"),
        "{err}"
    );
}

/// Notify mode from the config file alone (mode, stop signal), with the
/// metrics endpoint counting its upgrades and phases too.
#[test]
fn notify_mode_from_the_config_file_with_metrics() {
    let _guard = begin_test("config_notify_metrics", Duration::from_secs(120));
    let dirs = TestDirs::new();
    let service = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/notify_service.py");
    let cfg = write_config(
        dirs.root.path(),
        &format!(
            "runtime-dir = \"run\"\nstate-dir = \"state\"\n\
             listen = [\"http=tcp://127.0.0.1:0\"]\nmode = \"notify\"\n\
             stop-signal = \"SIGTERM\"\ndrain-grace = \"10s\"\n\
             metrics = \"127.0.0.1:0\"\nprogram = [{:?}]\n",
            service.to_str().unwrap()
        ),
    );
    let sup = Supervisor::start_with(
        &dirs.runtime,
        &dirs.state,
        &service,
        &["--config", cfg.to_str().unwrap()],
        &StartOpts {
            only_extra_args: true,
            ..Default::default()
        },
    );
    let metrics = sup.metrics_addr();
    let out = sup.upgrade(&[]);
    let c = out.expect_committed();
    let phases: Vec<String> = out.phases().into_iter().map(|(p, _)| p).collect();
    let m = scrape(metrics);
    assert_eq!(
        sample(&m, "handoff_upgrades_total{outcome=\"committed\"}"),
        1.0
    );
    for phase in ["spawned", "ready", "old-signalled"] {
        let n = sample(
            &m,
            &format!("handoff_phase_duration_seconds_count{{phase=\"{phase}\"}}"),
        );
        assert_eq!(n, 1.0, "phase {phase}\n{m}");
    }
    assert_eq!(sample(&m, "handoff_incumbent_pid"), f64::from(c.new_pid));
    // The old process was stopped by the configured signal, not killed.
    assert!(phases.iter().any(|p| p == "old-stopped"), "{phases:?}");
}
