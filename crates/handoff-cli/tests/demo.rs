//! End-to-end test of `handoff demo`: the real binary, run as a user would, must finish by
//! itself with exit 0, report zero errors and several committed upgrades, and leave no
//! process behind.
//!
//! To see what the demo leaves behind even after it has exited, this test process becomes a
//! "child subreaper" (Linux): any descendant of the demo that outlives it is re-parented to
//! us instead of to init, so it shows up as our child.

mod support;

use std::io::Read;
use std::process::{Command, Stdio};
use std::thread;
use std::time::Duration;

use support::{begin_test, children_with_state, demo_bin, handoff_bin, kill_tree, poll_until};

/// The demo runs for 6 s, then reads back its writes and stops everything: this bounds it.
const DEMO_LIMIT: Duration = Duration::from_secs(90);

/// The value of the summary row `name` (`  errors                    0` → `"0"`).
fn row<'a>(summary: &'a str, name: &str) -> Option<&'a str> {
    summary.lines().find_map(|line| {
        let rest = line.strip_prefix("  ")?.strip_prefix(name)?;
        // The name is followed by padding, not by more of a longer name.
        rest.starts_with("  ").then(|| rest.trim())
    })
}

/// Leading integer of `s` (`"5 committed, 0 aborted"` → 5), ignoring thousands separators.
fn leading_number(s: &str) -> Option<u64> {
    let digits: String = s
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == ',')
        .filter(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

#[test]
fn demo_runs_clean_and_leaves_nothing_behind() {
    let _guard = begin_test(
        "demo_runs_clean_and_leaves_nothing_behind",
        Duration::from_secs(150),
    );
    // Fails with a clear message if `handoff-demo` was not built (cargo test --workspace).
    demo_bin();
    #[cfg(target_os = "linux")]
    nix::sys::prctl::set_child_subreaper(true).expect("become a child subreaper");
    let me = std::process::id();
    let before: Vec<u32> = children_with_state(me).iter().map(|c| c.0).collect();

    let mut child = Command::new(handoff_bin())
        .args(["demo", "--duration", "6s", "--interval", "1s"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn handoff demo");
    let demo_pid = child.id();
    let read = |mut pipe: Box<dyn Read + Send>| {
        thread::spawn(move || {
            let mut s = String::new();
            let _ = pipe.read_to_string(&mut s);
            s
        })
    };
    let stdout = read(Box::new(child.stdout.take().expect("piped stdout")));
    let stderr = read(Box::new(child.stderr.take().expect("piped stderr")));

    let mut status = None;
    let finished = poll_until(DEMO_LIMIT, || {
        status = child.try_wait().expect("wait for handoff demo");
        status.is_some()
    });
    if !finished {
        kill_tree(demo_pid);
        let _ = child.wait();
        panic!(
            "`handoff demo` did not finish within {DEMO_LIMIT:?}; stderr:\n{}",
            stderr.join().unwrap_or_default()
        );
    }
    let stdout = stdout.join().expect("stdout reader");
    let stderr = stderr.join().expect("stderr reader");
    let context = format!("stdout:\n{stdout}\nstderr:\n{stderr}");

    // Nothing the demo started may survive it: with us as subreaper, a survivor (or one
    // that exited after the demo did) would be our child now. Collect them, then clean up
    // before asserting, so a failure leaves nothing behind either.
    let leftovers: Vec<(u32, char)> = children_with_state(me)
        .into_iter()
        .filter(|(pid, _)| *pid != demo_pid && !before.contains(pid))
        .collect();
    for (pid, _) in &leftovers {
        kill_tree(*pid);
    }
    for (pid, _) in &leftovers {
        let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(*pid as i32), None);
    }

    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "`handoff demo` did not exit 0\n{context}"
    );
    assert!(
        leftovers.is_empty(),
        "processes outlived `handoff demo` (pid, state): {leftovers:?}\n{context}"
    );
    assert_eq!(row(&stdout, "errors"), Some("0"), "errors\n{context}");
    let upgrades = row(&stdout, "upgrades").unwrap_or_default();
    let committed = leading_number(upgrades).unwrap_or(0);
    assert!(
        committed >= 3 && upgrades.ends_with(" 0 aborted"),
        "expected at least 3 committed upgrades and none aborted, got {upgrades:?}\n{context}"
    );
    let requests = row(&stdout, "requests").and_then(leading_number);
    assert!(
        requests.is_some_and(|n| n > 0),
        "no successful request\n{context}"
    );
    assert!(
        stdout.contains("none left running") && stdout.contains("PASS"),
        "summary does not report a clean run\n{context}"
    );

    // Every service process the summary names is gone (belt and braces for platforms
    // without a subreaper, and a check that the summary tells the truth).
    // `supervisor 1200 and 6 service processes (1204 1210 …): none left running`
    let pids_line = row(&stdout, "processes").unwrap_or_default();
    let supervisor = pids_line
        .strip_prefix("supervisor ")
        .and_then(|r| r.split(' ').next())
        .and_then(|p| p.parse::<u32>().ok());
    let listed = pids_line
        .split_once('(')
        .and_then(|(_, r)| r.split_once(')'))
        .map(|(inside, _)| inside)
        .unwrap_or_default();
    let pids: Vec<u32> = supervisor
        .into_iter()
        .chain(listed.split_whitespace().filter_map(|p| p.parse().ok()))
        .collect();
    assert!(
        pids.len() >= 2,
        "no pids in the summary's processes row\n{context}"
    );
    let gone = poll_until(Duration::from_secs(5), || {
        pids.iter()
            .all(|&p| support::process_state(p).is_none_or(|s| s == 'Z'))
    });
    assert!(
        gone,
        "a process named in the summary still runs: {pids:?}\n{context}"
    );
}
