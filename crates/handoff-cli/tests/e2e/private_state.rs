//! The state lock cannot be stolen, and the state and runtime dirs are the
//! service's uid's alone (issue 14, items 2 and 3): what another local user
//! tried, done the same way — as uid `nobody` in a child when the tests run
//! as root (skipped with a visible reason otherwise) — against the real
//! binaries.

use crate::support;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use support::*;

fn mode(p: &Path) -> u32 {
    fs::symlink_metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .mode()
        & 0o7777
}

fn chmod(p: &Path, m: u32) {
    fs::set_permissions(p, fs::Permissions::from_mode(m)).unwrap();
}

/// uid and gid of `nobody`, if this test may act as it (it runs as root).
fn nobody() -> Option<(u32, u32)> {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED: acting as another uid needs root (run the tests as root to cover it)");
        return None;
    }
    match nix::unistd::User::from_name("nobody") {
        Ok(Some(u)) => Some((u.uid.as_raw(), u.gid.as_raw())),
        _ => {
            eprintln!("SKIPPED: no user `nobody` to act as another uid");
            None
        }
    }
}

/// `sh -c SCRIPT sh ARGS…` as `uid`/`gid` (std drops the supplementary
/// groups when root sets a uid).
fn sh_as(ids: (u32, u32), script: &str, args: &[&Path]) -> Command {
    let mut c = Command::new("/bin/sh");
    c.arg("-c").arg(script).arg("sh").args(args);
    c.uid(ids.0).gid(ids.1);
    c
}

/// Whether `pid` is blocked in `flock(2)` waiting for a lock (a `->` line
/// of /proc/locks).
fn waiting_in_flock(pid: u32) -> bool {
    fs::read_to_string("/proc/locks")
        .unwrap_or_default()
        .lines()
        .any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.get(1) == Some(&"->") && f.get(5) == Some(&pid.to_string().as_str())
        })
}

#[test]
fn another_uid_can_neither_open_the_state_files_nor_hold_the_state_lock() {
    let _guard = begin_test("private_files", Duration::from_secs(120));
    let Some(other) = nobody() else { return };
    let dirs = TestDirs::new();
    // Operator-chosen paths under a directory everyone may traverse: only
    // the dirs handoff creates keep the others out.
    chmod(dirs.root.path(), 0o755);
    let runtime = dirs.root.path().join("rt");
    let state = dirs.root.path().join("st");
    let sup = Supervisor::start(&runtime, &state, &demo_bin(), &[]);
    assert_eq!(mode(&state), 0o700, "state dir");
    assert_eq!(mode(&runtime), 0o700, "runtime dir");
    let files: Vec<PathBuf> = [
        "handoff.lock",
        "handoff-restart.lock",
        "kv.log",
        "handoff-demo-counters.shm",
    ]
    .iter()
    .map(|f| state.join(f))
    .chain([runtime.join("supervisor.lock")])
    .collect();
    for f in &files {
        wait_until(
            Duration::from_secs(10),
            &format!("{} exists", f.display()),
            || f.exists(),
        );
        assert_eq!(mode(f), 0o600, "{}", f.display());
        let out = sh_as(other, "exec 3<\"$1\"", &[f.as_path()])
            .output()
            .unwrap();
        assert!(
            !out.status.success(),
            "uid {} opened {}",
            other.0,
            f.display()
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("Permission denied"), "{}: {err}", f.display());
    }

    // The attack itself: wait in flock(2) on the state lock, to get it the
    // instant the incumbent releases it at seal.
    let lock = state.join("handoff.lock");
    let mut attacker = sh_as(other, "exec flock \"$1\" cat", &[lock.as_path()])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let apid = attacker.id();
    let mut exited = None;
    let refused = poll_until(Duration::from_secs(5), || {
        exited = attacker.try_wait().unwrap();
        exited.is_some()
    });
    if !refused {
        // It is waiting for the lock: the upgrade would show the theft.
        let waiting = waiting_in_flock(apid);
        let _ = attacker.kill();
        let _ = attacker.wait();
        panic!(
            "uid {} could wait for the state lock (blocked in flock: {waiting})",
            other.0
        );
    }
    assert!(!exited.unwrap().success());
    let c = sup.upgrade(&[]).expect_committed();
    assert_eq!(c.old_pid, sup.first_pid);
    sup.wait_settled(c.new_pid, Duration::from_secs(20));
}

/// Runs `handoff run` on `rt`/`st` and expects it to refuse at once, exit
/// 1, with every one of `wants` on stderr.
fn refused(rt: &Path, st: &Path, wants: &[String]) {
    let mut cmd = Command::new(handoff_bin());
    cmd.args(["run", "--runtime-dir"])
        .arg(rt)
        .arg("--state-dir")
        .arg(st)
        .args(["--listen", "http=tcp://127.0.0.1:0", "--"])
        .arg(demo_bin());
    let out = finish_within(spawn_piped(cmd), Duration::from_secs(20), "handoff run");
    let err = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(1),
        "stderr: {err}\nstdout: {stdout}"
    );
    assert!(!stdout.contains("ready"), "{stdout}");
    for w in wants {
        assert!(err.contains(w.as_str()), "{w:?} not in: {err}");
    }
}

#[test]
fn unsafe_dirs_and_planted_links_are_refused_with_the_fix() {
    let _guard = begin_test("unsafe_dirs", Duration::from_secs(120));
    let d = |dirs: &TestDirs, name: &str| dirs.root.path().join(name);

    // A state dir others may write (a tmpfs root is 1777).
    let dirs = TestDirs::new();
    chmod(&dirs.state, 0o777);
    let s = dirs.state.display().to_string();
    refused(
        &dirs.runtime,
        &dirs.state,
        &[
            format!("--state-dir {s}"),
            "mode 0777".into(),
            format!("chmod 700 {s}"),
        ],
    );
    assert_eq!(mode(&dirs.state), 0o777, "a refused dir is left as found");

    let dirs = TestDirs::new();
    chmod(&dirs.runtime, 0o1777);
    let r = dirs.runtime.display().to_string();
    refused(
        &dirs.runtime,
        &dirs.state,
        &["mode 1777".into(), format!("chmod 700 {r}")],
    );

    // A runtime dir that is a symlink: refused, and its target untouched.
    let dirs = TestDirs::new();
    let target = d(&dirs, "elsewhere");
    fs::create_dir(&target).unwrap();
    chmod(&target, 0o755);
    let link = d(&dirs, "rt-link");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    refused(
        &link,
        &dirs.state,
        &[format!("{} is a symbolic link", link.display())],
    );
    assert_eq!(mode(&target), 0o755, "the link's target was chmod'ed");

    // Lock files planted as links to a victim file: never written through.
    for (dir_is_state, name) in [(true, "handoff.lock"), (false, "supervisor.lock")] {
        let dirs = TestDirs::new();
        let victim = d(&dirs, "victim");
        fs::write(&victim, "precious\n").unwrap();
        let planted = (if dir_is_state {
            &dirs.state
        } else {
            &dirs.runtime
        })
        .join(name);
        std::os::unix::fs::symlink(&victim, &planted).unwrap();
        refused(
            &dirs.runtime,
            &dirs.state,
            &[format!("{} is a symbolic link", planted.display())],
        );
        assert_eq!(fs::read_to_string(&victim).unwrap(), "precious\n", "{name}");
        let missing = d(&dirs, "missing");
        fs::remove_file(&planted).unwrap();
        std::os::unix::fs::symlink(&missing, &planted).unwrap();
        refused(&dirs.runtime, &dirs.state, &["symbolic link".into()]);
        assert!(!missing.exists(), "{name}: the link's target was created");
    }

    // A state dir owned by another user.
    if let Some(other) = nobody() {
        let dirs = TestDirs::new();
        std::os::unix::fs::chown(&dirs.state, Some(other.0), Some(other.1)).unwrap();
        let s = dirs.state.display().to_string();
        refused(
            &dirs.runtime,
            &dirs.state,
            &[
                format!("owned by uid {}", other.0),
                format!("chown {} {s}", nix::unistd::geteuid()),
            ],
        );
    }
}

/// The incumbent released the state lock at seal; the handoff aborted, and
/// someone else holds the lock. It must neither serve without the lock nor
/// exit (every crash restart would fail on the same lock): it waits sealed,
/// says so, and serves again the moment the lock is free.
#[test]
fn an_incumbent_that_cannot_retake_the_lock_after_an_abort_waits_for_it() {
    let _guard = begin_light_test("retake_lock", Duration::from_secs(120));
    let dirs = TestDirs::new();
    // The successor's wait for the lock, then the incumbent's before it
    // says it cannot take it back: 1 s each instead of 5.
    let opts = StartOpts {
        env: vec![("HANDOFF_LOCK_WAIT_MS".into(), "1000".into())],
        ..StartOpts::default()
    };
    let sup = Supervisor::start_with(&dirs.runtime, &dirs.state, &demo_bin(), &[], &opts);
    let first = sup.first_pid;
    let lock = dirs.state.join("handoff.lock");
    // Someone of the service's own uid (the files are its alone now) holds
    // the lock the successor and then the resuming incumbent will open.
    // Made deterministic: the incumbent keeps its lock on the old inode,
    // renamed away, and the holder locks a fresh file at the lock's name
    // (a holder that waited in flock(2) for the seal would race the
    // successor's first try).
    fs::rename(&lock, dirs.state.join("handoff.lock.old")).unwrap();
    fs::write(&lock, "").unwrap();
    let mut holder = Command::new("flock")
        .arg(&lock)
        .arg("cat")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until(Duration::from_secs(10), "the holder has the lock", || {
        !lock_holders(&lock).is_empty()
    });
    let up = sup.upgrade(&[]);
    up.expect_aborted(&["lock", "exited", "successor"]);
    wait_until(
        Duration::from_secs(30),
        "the incumbent says it cannot re-take the state lock",
        || sup.stderr_log().contains("cannot re-take the state lock"),
    );
    assert!(
        process_state(first).is_some_and(|s| s != 'Z'),
        "the incumbent exited\n{}",
        sup.stderr_log()
    );
    // Free the lock: the incumbent takes it and serves again, same pid.
    drop(holder.stdin.take());
    wait_until(Duration::from_secs(10), "the holder exits", || {
        holder.try_wait().unwrap().is_some()
    });
    wait_until(
        Duration::from_secs(30),
        "the incumbent serves again",
        || sup.serving_pid() == Ok(first),
    );
    let log = sup.stderr_log();
    assert!(
        !log.contains(&format!("(pid {first}) died")),
        "a crash restart happened\n{log}"
    );
    let c = sup.upgrade(&[]).expect_committed();
    assert_eq!(c.old_pid, first);
    sup.wait_settled(c.new_pid, Duration::from_secs(20));
}
