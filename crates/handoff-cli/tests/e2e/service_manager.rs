//! `handoff service` through the real binary against fake `systemctl` and
//! `launchctl` programs put first on PATH.
//!
//! The fakes are bash scripts that append every call to a log and keep the
//! manager's state in files, and they reproduce launchd's known race: a
//! `bootout` that returns while `launchctl print` still finds the job for a
//! while, and a `bootstrap` that fails with "5: Input/output error" in that
//! window. The fakes and their knobs are in `service_manager/fakes.rs`.

#[path = "service_manager/fakes.rs"]
mod fakes;
use crate::support;

use std::fs;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use fakes::*;
use support::*;

#[test]
fn launchd_install_then_restart_unchanged_is_one_kickstart() {
    let _guard = begin_test("launchd_unchanged", Duration::from_secs(60));
    let f = Fake::new();
    ok(&launchd_install(&f, "8080", &[], &[]));
    let t = format!("gui/{}/{LABEL}", uid());
    let plist = plist_path(&f);
    assert_eq!(
        f.take_calls(),
        [
            format!("launchctl print {t}"),
            format!("launchctl bootstrap gui/{} {}", uid(), plist.display()),
        ]
    );
    check_plist(&plist);

    // Same arguments again: nothing changes, nothing is reloaded.
    let out = ok(&launchd_install(&f, "8080", &[], &[]));
    assert!(out.contains("unchanged"), "{out}");
    assert_eq!(f.take_calls(), [format!("launchctl print {t}")]);

    let out = ok(&f.service(&launchd_args("restart", &f, &[]), &[]));
    assert!(out.contains("kickstart -k"), "{out}");
    assert_eq!(f.take_calls(), [format!("launchctl kickstart -k {t}")]);
    assert_eq!(
        fs::read_to_string(f.state.join("kicks")).unwrap(),
        "kicked\n"
    );
}

#[test]
fn launchd_restart_changed_plist_waits_out_the_bootout_race() {
    let _guard = begin_test("launchd_race_counted", Duration::from_secs(60));
    let f = Fake::new();
    ok(&launchd_install(&f, "8080", &[], &[]));
    f.take_calls();
    // An operator edits the plist: restart must reload it, not kickstart.
    let plist = plist_path(&f);
    let edited = fs::read_to_string(&plist).unwrap().replace("8080", "8081");
    fs::write(&plist, edited).unwrap();

    let start = Instant::now();
    let out = ok(&f.service(
        &launchd_args("restart", &f, &[]),
        &[("FAKE_PRINT_LINGER", "3"), ("FAKE_BOOTSTRAP_EIO", "2")],
    ));
    let took = start.elapsed();
    assert!(out.contains("changed since it was loaded"), "{out}");
    let t = format!("gui/{}/{LABEL}", uid());
    let bootstrap = format!("launchctl bootstrap gui/{} {}", uid(), plist.display());
    let print = format!("launchctl print {t}");
    assert_eq!(
        f.take_calls(),
        [
            print.clone(), // loaded? yes
            format!("launchctl bootout {t}"),
            print.clone(), // still there (lingering) ×3
            print.clone(),
            print.clone(),
            print.clone(),     // gone
            bootstrap.clone(), // 5: Input/output error
            bootstrap.clone(), // 5 again
            bootstrap,         // loaded
        ]
    );
    // 3 polls of 100 ms, then backoffs of 100 + 200 ms: well under the bounds.
    assert!(took < Duration::from_secs(10), "took {took:?}");
    // What was loaded is recorded: the next restart is a kickstart.
    ok(&f.service(&launchd_args("restart", &f, &[]), &[]));
    assert_eq!(f.take_calls(), [format!("launchctl kickstart -k {t}")]);
}

#[test]
fn launchd_reinstall_with_new_args_under_a_timed_race() {
    let _guard = begin_test("launchd_race_timed", Duration::from_secs(60));
    let f = Fake::new();
    ok(&launchd_install(&f, "8080", &[], &[]));
    f.take_calls();
    // The job lingers for 400 ms of wall time after bootout.
    let start = Instant::now();
    let out = ok(&launchd_install(
        &f,
        "9090",
        &[],
        &[("FAKE_LINGER_MS", "400")],
    ));
    let took = start.elapsed();
    assert!(out.contains("wrote"), "{out}");
    let calls = f.take_calls();
    let t = format!("gui/{}/{LABEL}", uid());
    let print = format!("launchctl print {t}");
    assert_eq!(calls[0], print);
    assert_eq!(calls[1], format!("launchctl bootout {t}"));
    // Polled until gone, then a single bootstrap (never one inside the window).
    let polls = &calls[2..calls.len() - 1];
    assert!(
        polls.len() >= 2 && polls.iter().all(|c| *c == print),
        "{calls:#?}"
    );
    assert_eq!(
        calls[calls.len() - 1],
        format!(
            "launchctl bootstrap gui/{} {}",
            uid(),
            plist_path(&f).display()
        )
    );
    assert!(took >= Duration::from_millis(400), "took {took:?}");
    assert!(took < Duration::from_secs(10), "took {took:?}");
    let plist = fs::read_to_string(plist_path(&f)).unwrap();
    assert!(plist.contains("127.0.0.1:9090"), "{plist}");
}

#[test]
fn launchd_bootstrap_failing_for_good_is_a_clear_error_after_bounded_retries() {
    let _guard = begin_test("launchd_eio_forever", Duration::from_secs(60));
    let f = Fake::new();
    let start = Instant::now();
    let o = launchd_install(
        &f,
        "8080",
        &["--bootstrap-attempts", "4"],
        &[("FAKE_BOOTSTRAP_EIO", "always")],
    );
    let took = start.elapsed();
    let err = failed(&o);
    let bootstrap = format!(
        "launchctl bootstrap gui/{} {}",
        uid(),
        plist_path(&f).display()
    );
    assert!(
        err.contains(&format!("`{bootstrap}` failed (exit status 5)"))
            && err.contains("Bootstrap failed: 5: Input/output error")
            && err.contains("gave up after 4 attempts"),
        "{err}"
    );
    let calls = f.take_calls();
    assert_eq!(calls.len(), 5, "{calls:#?}");
    assert!(calls[1..].iter().all(|c| *c == bootstrap), "{calls:#?}");
    // Backoffs 100 + 200 + 400 ms between the four attempts.
    assert!(took >= Duration::from_millis(700), "took {took:?}");
    assert!(took < Duration::from_secs(10), "took {took:?}");
}

#[test]
fn launchd_bootstrap_failing_otherwise_is_reported_at_once() {
    let _guard = begin_test("launchd_bootstrap_122", Duration::from_secs(60));
    let f = Fake::new();
    let err = failed(&launchd_install(
        &f,
        "8080",
        &[],
        &[("FAKE_BOOTSTRAP_STATUS", "122")],
    ));
    let bootstrap = format!(
        "launchctl bootstrap gui/{} {}",
        uid(),
        plist_path(&f).display()
    );
    assert!(
        err.contains(&format!("`{bootstrap}` failed (exit status 122)"))
            && err.contains("Bootstrap failed: 122: Path had bad ownership/permissions")
            && !err.contains("gave up"),
        "{err}"
    );
    // Only status 5 is transient: no retry.
    assert_eq!(
        f.take_calls(),
        [format!("launchctl print gui/{}/{LABEL}", uid()), bootstrap]
    );
}

#[test]
fn launchd_restart_of_an_unloaded_job_bootstraps_it() {
    let _guard = begin_test("launchd_kick_unloaded", Duration::from_secs(60));
    let f = Fake::new();
    ok(&launchd_install(&f, "8080", &[], &[]));
    // Unloaded behind our back (by hand, or a new login session).
    fs::remove_file(f.state.join("loaded")).unwrap();
    f.take_calls();
    let out = ok(&f.service(&launchd_args("restart", &f, &[]), &[]));
    assert!(out.contains("was not loaded"), "{out}");
    let t = format!("gui/{}/{LABEL}", uid());
    assert_eq!(
        f.take_calls(),
        [
            format!("launchctl kickstart -k {t}"),
            format!("launchctl print {t}"),
            format!(
                "launchctl bootstrap gui/{} {}",
                uid(),
                plist_path(&f).display()
            ),
        ]
    );
    // status notices a plist edited since it was loaded.
    let plist = plist_path(&f);
    let edited = fs::read_to_string(&plist).unwrap().replace("8080", "8082");
    fs::write(&plist, edited).unwrap();
    let out = ok(&f.service(&launchd_args("status", &f, &[]), &[]));
    assert!(out.contains("changed since loaded"), "{out}");
}

#[test]
fn launchd_job_that_never_goes_away_is_a_bounded_error() {
    let _guard = begin_test("launchd_never_gone", Duration::from_secs(60));
    let f = Fake::new();
    ok(&launchd_install(&f, "8080", &[], &[]));
    f.take_calls();
    let start = Instant::now();
    let o = f.service(
        &launchd_args("uninstall", &f, &["--wait-timeout", "500ms"]),
        &[("FAKE_PRINT_LINGER", "1000000")],
    );
    let took = start.elapsed();
    let err = failed(&o);
    assert!(
        err.contains("still finds the job after 500ms") && err.contains("--wait-timeout"),
        "{err}"
    );
    assert!(took >= Duration::from_millis(500), "took {took:?}");
    assert!(took < Duration::from_secs(10), "took {took:?}");
    // Nothing was removed while the job may still be around.
    assert!(plist_path(&f).exists());
}

#[test]
fn launchd_uninstall_and_status() {
    let _guard = begin_test("launchd_uninstall", Duration::from_secs(60));
    let f = Fake::new();
    ok(&launchd_install(&f, "8080", &[], &[]));
    let out = ok(&f.service(&launchd_args("status", &f, &[]), &[]));
    assert!(
        out.contains("as loaded") && out.contains("state = running"),
        "{out}"
    );
    f.take_calls();
    ok(&f.service(
        &launchd_args("uninstall", &f, &[]),
        &[("FAKE_PRINT_LINGER", "2")],
    ));
    let t = format!("gui/{}/{LABEL}", uid());
    let print = format!("launchctl print {t}");
    assert_eq!(
        f.take_calls(),
        [
            print.clone(),
            format!("launchctl bootout {t}"),
            print.clone(),
            print.clone(),
            print,
        ]
    );
    assert!(!plist_path(&f).exists());
    let o = f.service(&launchd_args("status", &f, &[]), &[]);
    assert_eq!(o.status.code(), Some(3), "not loaded → exit 3");
    assert!(String::from_utf8_lossy(&o.stdout).contains("not loaded"));
}

fn systemd_install(f: &Fake, scope: &str) -> Output {
    let mut args = vec![
        "install",
        "--manager",
        "systemd",
        "--scope",
        scope,
        "--dir",
        f.units_arg(),
        "kv",
        "--",
    ];
    let ra = run_args("8080");
    args.extend(ra.iter().map(String::as_str));
    f.service(&args, &[])
}

#[test]
fn systemd_install_writes_a_valid_unit_then_reloads_and_enables() {
    let _guard = begin_test("systemd_install", Duration::from_secs(60));
    let f = Fake::new();
    let out = ok(&systemd_install(&f, "system"));
    assert!(out.contains("wrote"), "{out}");
    assert_eq!(
        f.take_calls(),
        [
            "systemctl daemon-reload",
            "systemctl enable --now kv.service"
        ]
    );
    let unit_path = f.units.join("kv.service");
    let unit = fs::read_to_string(&unit_path).unwrap();
    let h = handoff_bin();
    for line in [
        "Type=notify".to_string(),
        "NotifyAccess=main".into(),
        format!(
            "ExecStart={} run --runtime-dir /run/kv --state-dir /var/lib/kv \
             --listen http=tcp://127.0.0.1:8080 -- /usr/local/bin/handoff-demo \"--flag with space\"",
            h.display()
        ),
        format!("ExecReload={} upgrade --runtime-dir /run/kv", h.display()),
        "Restart=on-failure".into(),
        "KillMode=process".into(),
        // The default drain grace (60 s) plus 30 s.
        "TimeoutStopSec=90".into(),
        // The default upgrade deadline (5 min) plus 30 s: bounds `systemctl reload`.
        "TimeoutStartSec=330".into(),
        "WantedBy=multi-user.target".into(),
    ] {
        assert!(unit.lines().any(|l| l == line), "missing {line:?} in:\n{unit}");
    }

    match Command::new("systemd-analyze").arg("--version").output() {
        Err(_) => println!("skipped: systemd-analyze not found (the unit's content was checked)"),
        Ok(_) => {
            let o = Command::new("systemd-analyze")
                .arg("verify")
                .arg(&unit_path)
                .output()
                .unwrap();
            let all = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            // verify exits 0 even for lines it ignores: any complaint about
            // our unit counts as a failure.
            let ours: Vec<&str> = all.lines().filter(|l| l.contains("kv.service")).collect();
            assert!(
                o.status.success() && ours.is_empty(),
                "systemd-analyze verify ({}):\n{all}",
                o.status
            );
            println!("systemd-analyze verify accepted {}", unit_path.display());
        }
    }

    // Unchanged on a second install: no daemon-reload.
    let out = ok(&systemd_install(&f, "system"));
    assert!(out.contains("unchanged"), "{out}");
    assert_eq!(f.take_calls(), ["systemctl enable --now kv.service"]);
}

#[test]
fn systemd_user_scope_restart_reload_status_uninstall() {
    let _guard = begin_test("systemd_user", Duration::from_secs(60));
    let f = Fake::new();
    ok(&systemd_install(&f, "user"));
    let unit = fs::read_to_string(f.units.join("kv.service")).unwrap();
    assert!(
        unit.lines().any(|l| l == "WantedBy=default.target"),
        "{unit}"
    );
    assert_eq!(
        f.take_calls(),
        [
            "systemctl --user daemon-reload",
            "systemctl --user enable --now kv.service"
        ]
    );
    let common = [
        "--manager",
        "systemd",
        "--scope",
        "user",
        "--dir",
        f.units_arg(),
    ];
    let with = |verb: &str, extra: &[&str]| -> Vec<String> {
        let mut v = vec![verb.to_string()];
        v.extend(common.iter().map(|s| s.to_string()));
        v.extend(extra.iter().map(|s| s.to_string()));
        v.push("kv".into());
        v
    };
    let run = |args: Vec<String>, env: &[(&str, &str)]| {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        f.service(&a, env)
    };

    ok(&run(with("restart", &["--reload"]), &[]));
    assert_eq!(
        f.take_calls(),
        [
            "systemctl --user show --property=NeedDaemonReload --value kv.service",
            "systemctl --user reload kv.service"
        ]
    );
    // A failing manager call: exit 1, the command line and its output.
    let err = failed(&run(
        with("restart", &[]),
        &[("FAKE_SYSTEMCTL_FAIL", "restart")],
    ));
    assert!(
        err.contains("`systemctl --user restart kv.service` failed (exit status 1)")
            && err.contains("Job for kv.service failed"),
        "{err}"
    );
    f.take_calls();

    let out = ok(&run(with("status", &[]), &[]));
    assert!(
        out.contains("is-active: active") && out.contains("(present)"),
        "{out}"
    );
    ok(&run(with("uninstall", &[]), &[]));
    assert!(!f.units.join("kv.service").exists());
    let calls = f.take_calls();
    assert_eq!(
        calls[calls.len() - 2..],
        [
            "systemctl --user disable --now kv.service",
            "systemctl --user daemon-reload"
        ]
    );
    let o = run(with("status", &[]), &[]);
    assert_eq!(o.status.code(), Some(3), "inactive → exit 3");
}

#[test]
fn install_rejects_bad_run_arguments_before_writing_anything() {
    let _guard = begin_test("install_bad_args", Duration::from_secs(60));
    let f = Fake::new();
    let base = [
        "install",
        "--manager",
        "systemd",
        "--dir",
        f.units_arg(),
        "kv",
        "--",
    ];
    for (extra, want) in [
        (
            &[
                "--runtime-dir",
                "/run/kv",
                "--state-dir",
                "/s",
                "--",
                "/bin/kv",
            ][..],
            "--listen is required",
        ),
        (
            &[
                "--runtime-dir",
                "/run/kv",
                "--state-dir",
                "/s",
                "--listen",
                "nonsense",
                "--",
                "/bin/kv",
            ][..],
            "expected NAME=tcp://HOST:PORT",
        ),
        (
            &["--runtime-dir", "/run/kv", "--bogus", "--", "/bin/kv"][..],
            "unexpected argument '--bogus'",
        ),
        (
            &[
                "--runtime-dir",
                "rel",
                "--state-dir",
                "/s",
                "--listen",
                "a=tcp://127.0.0.1:1",
                "--",
                "/bin/kv",
            ][..],
            "must be an absolute path",
        ),
    ] {
        let args: Vec<&str> = base.iter().chain(extra).copied().collect();
        let err = failed(&f.service(&args, &[]));
        assert!(err.contains(want), "{extra:?}: {err}");
    }
    assert!(!f.units.exists(), "nothing written");
    assert!(f.take_calls().is_empty());
}

#[test]
fn systemd_install_takes_the_runtime_dir_from_a_config_file() {
    let _guard = begin_test("systemd_config", Duration::from_secs(60));
    let f = Fake::new();
    let cfg = f.state.join("kv.toml");
    fs::write(
        &cfg,
        "runtime-dir = \"/run/kv-from-file\"\nstate-dir = \"/var/lib/kv\"\n\
         listen = [\"http=tcp://127.0.0.1:8080\"]\nprogram = [\"/usr/local/bin/handoff-demo\"]\n",
    )
    .unwrap();
    let cfg_s = cfg.to_str().unwrap();
    let args = [
        "install",
        "--manager",
        "systemd",
        "--scope",
        "system",
        "--dir",
        f.units_arg(),
        "kv",
        "--",
        "--config",
        cfg_s,
    ];
    ok(&f.service(&args, &[]));
    let unit = fs::read_to_string(f.units.join("kv.service")).unwrap();
    let h = handoff_bin();
    // The unit runs with the file (read at each start), and reloads through
    // the runtime dir the file names.
    for line in [
        format!("ExecStart={} run --config {cfg_s}", h.display()),
        format!(
            "ExecReload={} upgrade --runtime-dir /run/kv-from-file",
            h.display()
        ),
    ] {
        assert!(
            unit.lines().any(|l| l == line),
            "missing {line:?} in:\n{unit}"
        );
    }
    // A relative --config would not be found by a service started in /.
    let args = [
        "install",
        "--manager",
        "systemd",
        "--dir",
        f.units_arg(),
        "kv2",
        "--",
        "--config",
        "kv.toml",
    ];
    let err = failed(&f.service(&args, &[]));
    assert!(
        err.contains("--config kv.toml must be an absolute path"),
        "{err}"
    );
}

/// `handoff service restart --supervisor` (systemd): finds the unit's runtime
/// dir in its `ExecReload=` line and upgrades the running supervisor in place
/// — no systemctl call, the same supervisor pid, the service untouched.
#[test]
fn systemd_restart_supervisor_reexecs_it_in_place() {
    let _guard = begin_test("systemd_restart_supervisor", Duration::from_secs(90));
    let f = Fake::new();
    let dirs = TestDirs::new();
    let sup = Supervisor::start(&dirs.runtime, &dirs.state, &demo_bin(), &[]);
    sup.wait_settled(sup.first_pid, Duration::from_secs(10));
    let demo = demo_bin();
    ok(&f.service(
        &[
            "install",
            "--manager",
            "systemd",
            "--scope",
            "user",
            "--dir",
            f.units_arg(),
            "kv",
            "--",
            "--runtime-dir",
            dirs.runtime.to_str().unwrap(),
            "--state-dir",
            dirs.state.to_str().unwrap(),
            "--listen",
            "http=tcp://127.0.0.1:0",
            "--",
            demo.to_str().unwrap(),
        ],
        &[],
    ));
    f.take_calls();
    let out = ok(&f.service(
        &[
            "restart",
            "--manager",
            "systemd",
            "--scope",
            "user",
            "--dir",
            f.units_arg(),
            "--supervisor",
            "kv",
        ],
        &[],
    ));
    assert!(out.contains("runs handoff"), "{out}");
    assert!(f.take_calls().is_empty(), "systemctl was called");
    let status = status_json(&dirs.runtime);
    assert_eq!(status["supervisor_pid"], sup.pid, "{status}");
    assert_eq!(status["incumbent_pid"], sup.first_pid, "{status}");
    assert!(sup.stderr_log().contains("re-executed in place"));
}

/// `handoff service restart --supervisor` (launchd): the runtime dir comes from
/// the job's `ProgramArguments` (here through a `--config` file, resolved as
/// `handoff run` would), and the running supervisor is upgraded in place — no
/// launchctl call, the same pid, the service untouched.
#[test]
fn launchd_restart_supervisor_reexecs_it_in_place() {
    let _guard = begin_test("launchd_restart_supervisor", Duration::from_secs(90));
    let f = Fake::new();
    let dirs = TestDirs::new();
    let sup = Supervisor::start(&dirs.runtime, &dirs.state, &demo_bin(), &[]);
    sup.wait_settled(sup.first_pid, Duration::from_secs(10));
    let config = dirs.root.path().join("kv.toml");
    fs::write(
        &config,
        format!(
            "runtime-dir = {:?}\nstate-dir = {:?}\n",
            dirs.runtime.to_str().unwrap(),
            dirs.state.to_str().unwrap()
        ),
    )
    .unwrap();
    let demo = demo_bin();
    ok(&f.service(
        &[
            "install",
            "--manager",
            "launchd",
            "--scope",
            "user",
            "--dir",
            f.units_arg(),
            "--log-dir",
            "/tmp/kv-logs",
            LABEL,
            "--",
            "--config",
            config.to_str().unwrap(),
            "--listen",
            "http=tcp://127.0.0.1:0",
            "--",
            demo.to_str().unwrap(),
        ],
        &[],
    ));
    f.take_calls();
    let out = ok(&f.service(&launchd_args("restart", &f, &["--supervisor"]), &[]));
    assert!(out.contains("runs handoff"), "{out}");
    assert!(f.take_calls().is_empty(), "launchctl was called");
    let status = status_json(&dirs.runtime);
    assert_eq!(status["supervisor_pid"], sup.pid, "{status}");
    assert_eq!(status["incumbent_pid"], sup.first_pid, "{status}");
    assert!(sup.stderr_log().contains("re-executed in place"));

    // A job whose plist is gone says so, and what to do.
    fs::remove_file(plist_path(&f)).unwrap();
    let o = f.service(&launchd_args("restart", &f, &["--supervisor"]), &[]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("does not exist") && err.contains("handoff service install"),
        "{err}"
    );
}
