//! `handoff upgrade --supervisor`: the supervisor replaced by a new `handoff`
//! binary in place, under load, interleaved with service upgrades — the same
//! pid throughout, its status naming the new build, nothing failed or lost;
//! a binary that cannot start is refused, and one that cannot take over
//! falls back to the old one with the service untouched.

use crate::support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use support::{
    begin_test, demo_bin, run_handoff, status_json, verify_acked, Load, LoadExt, Supervisor,
    TestDirs,
};

const SETTLE: Duration = Duration::from_secs(10);
const PROGRESS: Duration = Duration::from_secs(10);

/// A copy of the `handoff` binary under test at `dir/name`, made a different
/// build by `extra` bytes appended (an ELF file ignores trailing bytes).
fn handoff_copy(dir: &Path, name: &str, extra: &[u8]) -> PathBuf {
    let path = dir.join(name);
    let mut bytes = std::fs::read(support::handoff_bin()).expect("read the handoff binary");
    bytes.extend_from_slice(extra);
    support::write_executable(&path, &bytes);
    path
}

/// A wrapper that runs `binary` (a real handoff: it passes the check) made to
/// fail its takeover, so the re-exec falls back to the previous program.
fn takeover_failing(dir: &Path, binary: &Path) -> PathBuf {
    let path = dir.join("handoff-failing.sh");
    let script = format!(
        "#!/bin/sh\nexport HANDOFF_TEST_TAKEOVER_FAIL=1\nexec '{}' \"$@\"\n",
        binary.display()
    );
    support::write_executable(&path, script.as_bytes());
    path
}

/// What `binary reexec-check` says its build is.
fn build_of(binary: &Path) -> String {
    let out = std::process::Command::new(binary)
        .arg("reexec-check")
        .output()
        .expect("run reexec-check");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .expect("a build line")
        .to_string()
}

fn reexec(sup: &Supervisor, binary: &Path) -> std::process::Output {
    let b = binary.to_str().expect("UTF-8 path");
    run_handoff(
        &["upgrade", "--supervisor", "--binary", b],
        &sup.runtime_dir,
        Duration::from_secs(60),
    )
}

/// The acceptance test of issue 17: 10 supervisor re-execs and 10 service
/// upgrades interleaved under load (keep-alive and fresh connections, writes
/// to the demo): 0 failed requests, 0 lost writes, the supervisor's pid
/// unchanged, each new build reported by `handoff status`.
#[test]
fn ten_reexecs_and_ten_upgrades_under_load_lose_nothing() {
    let _guard = begin_test(
        "ten_reexecs_and_ten_upgrades_under_load_lose_nothing",
        Duration::from_secs(240),
    );
    let dirs = TestDirs::new();
    let builds = [
        handoff_copy(dirs.root.path(), "handoff-a", b"build a"),
        handoff_copy(dirs.root.path(), "handoff-b", b"build b"),
    ];
    let names = [build_of(&builds[0]), build_of(&builds[1])];
    assert_ne!(names[0], names[1], "two builds must tell apart");
    let sup = Supervisor::start(&dirs.runtime, &dirs.state, &demo_bin(), &[]);
    sup.wait_settled(sup.first_pid, SETTLE);
    let load = Load::start(sup.addr, 2, 2).expect("start the load");
    load.wait_progress(50, PROGRESS, "before the first re-exec");

    let mut incumbent = sup.first_pid;
    let mut last_id = serde_json::Value::Null;
    for i in 0..10 {
        let which = i % 2;
        let out = reexec(&sup, &builds[which]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "re-exec {i}: {}\n{}\nsupervisor log:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            sup.stderr_log()
        );
        let status = status_json(&sup.runtime_dir);
        assert_eq!(status["supervisor_pid"], sup.pid, "re-exec {i}: {status}");
        assert_eq!(
            status["supervisor_build"], names[which],
            "re-exec {i}: {status}"
        );
        assert_eq!(
            status["incumbent_pid"], incumbent,
            "re-exec {i}: the service was touched: {status}"
        );
        // The new program goes on counting where the old one was.
        assert_eq!(
            (
                &status["handoffs"]["committed"],
                &status["last_handoff"]["handoff_id"]
            ),
            (&serde_json::json!(i), &last_id),
            "re-exec {i}: the handoff history was lost: {status}"
        );
        load.wait_progress(20, PROGRESS, &format!("after re-exec {i}"));

        let c = sup.upgrade(&[]).expect_committed();
        assert_eq!(c.old_pid, incumbent, "upgrade {i}");
        incumbent = c.new_pid;
        last_id = status_json(&sup.runtime_dir)["last_handoff"]["handoff_id"].clone();
        sup.wait_settled(incumbent, SETTLE);
        load.wait_progress(20, PROGRESS, &format!("after upgrade {i}"));
    }
    assert!(
        Path::new(&format!("/proc/{}", sup.pid)).exists(),
        "the supervisor's pid is gone"
    );
    let report = load.stop();
    eprintln!("{report}");
    let lost = verify_acked(sup.addr, &report.acked);
    assert!(
        report.failure_count() == 0 && report.ok > 0 && lost.is_empty(),
        "{report}\n{} of {} acknowledged writes missing: {:?}",
        lost.len(),
        report.acked.len(),
        lost.iter().take(10).collect::<Vec<_>>()
    );
}

/// A binary that is not a `handoff` that knows the handover is refused
/// before anything changes; one that is, but cannot take over, falls back
/// to the old binary: the same pid answers with the old build, the service
/// never noticed, and upgrades go on.
#[test]
fn a_binary_that_cannot_take_over_is_refused_or_falls_back() {
    let _guard = begin_test(
        "a_binary_that_cannot_take_over_is_refused_or_falls_back",
        Duration::from_secs(120),
    );
    let dirs = TestDirs::new();
    let sup = Supervisor::start(&dirs.runtime, &dirs.state, &demo_bin(), &[]);
    sup.wait_settled(sup.first_pid, SETTLE);
    let before = status_json(&sup.runtime_dir);

    let out = reexec(&sup, Path::new("/bin/true"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("cannot replace this supervisor"), "{err}");

    // Passes the check (it is a real handoff), fails to take over.
    let new = handoff_copy(dirs.root.path(), "handoff-new", b"new");
    let failing = takeover_failing(dirs.root.path(), &new);
    let out = reexec(&sup, &failing);
    let text = format!(
        "{}\n{}\nsupervisor log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        sup.stderr_log()
    );
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("fell back"), "{text}");
    let after = status_json(&sup.runtime_dir);
    assert_eq!(after["supervisor_pid"], sup.pid, "{after}");
    assert_eq!(
        after["supervisor_build"], before["supervisor_build"],
        "{after}"
    );
    assert_eq!(after["incumbent_pid"], sup.first_pid, "{after}");
    let c = sup.upgrade(&[]).expect_committed();
    assert_eq!(c.old_pid, sup.first_pid);
    sup.wait_settled(c.new_pid, SETTLE);
}

/// The `--metrics` listener is carried across the `exec` like the admin
/// socket: a scraper opening a fresh connection for every scrape through 5
/// re-execs (one of them falling back) is never refused or failed, and the
/// endpoint keeps its address.
#[test]
fn the_metrics_endpoint_answers_throughout_reexecs() {
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};
    let _guard = begin_test("reexec_metrics", Duration::from_secs(120));
    let dirs = TestDirs::new();
    let sup = Supervisor::start(
        &dirs.runtime,
        &dirs.state,
        &demo_bin(),
        &["--metrics", "127.0.0.1:0"],
    );
    sup.wait_settled(sup.first_pid, SETTLE);
    let addr = sup.metrics_addr();
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let scraper = {
        let (stop, ok, failures) = (stop.clone(), ok.clone(), failures.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let r = (|| -> std::io::Result<String> {
                    let mut s = std::net::TcpStream::connect(addr)?;
                    s.set_read_timeout(Some(Duration::from_secs(10)))?;
                    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n")?;
                    let mut out = String::new();
                    s.read_to_string(&mut out)?;
                    Ok(out)
                })();
                match r {
                    Ok(out) if out.starts_with("HTTP/1.1 200 OK") => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(out) => failures.lock().unwrap().push(format!("answered {out:.60}")),
                    Err(e) => failures.lock().unwrap().push(e.to_string()),
                }
            }
        })
    };
    let progressed = |what: &str| {
        let target = ok.load(Ordering::Relaxed) + 20;
        support::wait_until(PROGRESS, what, || ok.load(Ordering::Relaxed) >= target);
    };
    progressed("scrapes before the re-execs");
    let a = handoff_copy(dirs.root.path(), "handoff-a", b"a");
    let b = handoff_copy(dirs.root.path(), "handoff-b", b"b");
    // A real handoff that fails its takeover and falls back, metrics fd and all.
    let failing = takeover_failing(dirs.root.path(), &a);
    for (i, bin) in [&a, &b, &failing, &a, &b].into_iter().enumerate() {
        let out = reexec(&sup, bin);
        let want = if bin == &failing { Some(1) } else { Some(0) };
        assert_eq!(
            out.status.code(),
            want,
            "re-exec {i} ({}): {}\n{}",
            bin.display(),
            String::from_utf8_lossy(&out.stderr),
            sup.stderr_log()
        );
        progressed(&format!("scrapes after re-exec {i}"));
    }
    stop.store(true, Ordering::Relaxed);
    scraper.join().expect("the scraper");
    let failures = failures.lock().unwrap();
    assert!(
        failures.is_empty(),
        "{} of {} scrapes failed: {:?}",
        failures.len(),
        ok.load(Ordering::Relaxed) + failures.len() as u64,
        &failures[..failures.len().min(5)]
    );
    let st = status_json(&sup.runtime_dir);
    assert_eq!(st["supervisor_pid"], sup.pid, "{st}");
    assert_eq!(st["incumbent_pid"], sup.first_pid, "{st}");
    eprintln!(
        "{} scrapes through 5 re-execs (one fallen back), 0 failed",
        ok.load(Ordering::Relaxed)
    );
}
