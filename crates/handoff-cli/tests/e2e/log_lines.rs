//! The supervisor's stderr is shared with the service processes it runs (they
//! inherit it), so each of its lines must reach the pipe in one `write(2)`:
//! a line written in pieces gets a service's output spliced into it, and a
//! log reader (the benchmark harness, a deploy script) misreads it.

use crate::support;

use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use support::*;

/// Each new process starts a burst of stderr noise, so noise is being written
/// while the supervisor logs the upgrade that spawned it; every supervisor
/// line must still arrive whole.
#[test]
fn supervisor_lines_stay_whole_while_the_service_writes_stderr() {
    let _guard = begin_test("log_lines", Duration::from_secs(120));
    let dirs = TestDirs::new();
    let demo = demo_bin();
    let noisy = dirs.runtime.with_file_name("noisy-demo.sh");
    write_executable(
        &noisy,
        format!(
            "#!/bin/sh\n\
             ( n=0; while [ $n -lt 3000 ]; do echo \"svc-noise-$n\" >&2; n=$((n+1)); done ) &\n\
             exec '{}' \"$@\"\n",
            demo.display()
        )
        .as_bytes(),
    );
    let sup = Supervisor::start_with(
        &dirs.runtime,
        &dirs.state,
        &noisy,
        &[],
        &StartOpts {
            // The noise loops outlive the process that started them; the
            // subreaper reaps them.
            subreaper: true,
            ..Default::default()
        },
    );
    // Under the subreaper, `sup.pid` is the subreaper: signal `handoff run`.
    let handoff_pid = children_of(sup.pid)
        .into_iter()
        .find(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "handoff")
        })
        .expect("the handoff process under the subreaper");
    let mut incumbent = sup.first_pid;
    for i in 0..12 {
        if i % 2 == 0 {
            incumbent = sup.upgrade(&[]).expect_committed().new_pid;
        } else {
            let before = sup.stderr_log().matches("SIGHUP upgrade committed").count();
            kill(Pid::from_raw(handoff_pid as i32), Signal::SIGHUP).expect("SIGHUP");
            assert!(
                poll_until(Duration::from_secs(20), || sup
                    .stderr_log()
                    .matches("SIGHUP upgrade committed")
                    .count()
                    > before),
                "SIGHUP upgrade {i} did not commit"
            );
        }
    }
    let _ = incumbent;
    let log = sup.stderr_log();
    assert!(
        log.contains("svc-noise-"),
        "the noise never reached the log"
    );
    let mut whole = 0;
    for line in log.lines() {
        let Some(at) = line.find("handoff run: ") else {
            continue;
        };
        let ours = &line[at..];
        // Anything after our text on the same line was spliced in.
        if let Some(rest) = ours.split_once("committed: pid ").map(|(_, r)| r) {
            let ok = if ours.starts_with("handoff run: SIGHUP upgrade") {
                // "… committed: pid N in 1.234ms"
                let mut w = rest.split(' ');
                w.next().is_some_and(|p| p.parse::<u32>().is_ok())
                    && w.next() == Some("in")
                    && w.next().is_some_and(|t| t.ends_with('s'))
                    && w.next().is_none()
            } else {
                // "… committed: pid A -> B in 1.23 ms"
                let w: Vec<&str> = rest.split(' ').collect();
                w.len() == 6
                    && w[0].parse::<u32>().is_ok()
                    && w[1] == "->"
                    && w[2].parse::<u32>().is_ok()
                    && w[3] == "in"
                    && w[4].parse::<f64>().is_ok()
                    && w[5] == "ms"
            };
            assert!(ok, "a supervisor line was split: {line:?}\nlog:\n{log}");
            whole += 1;
        }
        assert!(
            !ours.contains("svc-noise-"),
            "service output inside a supervisor line: {line:?}"
        );
    }
    assert!(whole >= 12, "only {whole} commit lines in:\n{log}");
}
