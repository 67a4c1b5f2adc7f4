//! The demo run standalone (no supervisor) keeps its counters in the shared region too,
//! and the library's reader sees its generation.
//!
//! Being an integration test of this package, it also makes `cargo test` build the
//! `handoff-demo` binary itself (with the features of the run — e.g. `crash-points` under
//! `--all-features`), which the `handoff` CLI's end-to-end tests then run.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use handoff_demo::counters;

#[test]
fn standalone_process_registers_its_generation() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut child = Command::new(env!("CARGO_BIN_EXE_handoff-demo"))
        .args(["--listen", "127.0.0.1:0", "--state-dir"])
        .arg(dir.path())
        // Standalone: nothing a supervisor would pass.
        .env_remove("LISTEN_FDS")
        .env_remove("HANDOFF_ROLE")
        .env_remove("HANDOFF_SOCK_FD")
        .env_remove("HANDOFF_STATE_DIR")
        .env_remove("HANDOFF_CONTROL_SOCK")
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn handoff-demo");
    let pid = child.id();
    // Bounded poll: the region appears and records this process once it serves.
    let end = Instant::now() + Duration::from_secs(20);
    let found = loop {
        match counters::read(dir.path(), Duration::from_secs(1)) {
            Ok(Some(c)) if c.generations_started >= 1 => break Some(c),
            Ok(_) => {}
            Err(e) => {
                let _ = child.kill();
                panic!("reading the counters: {e}");
            }
        }
        if Instant::now() >= end || matches!(child.try_wait(), Ok(Some(_))) {
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let _ = child.kill();
    let _ = child.wait();
    let c = found.expect("the demo never registered in its counters region");
    assert_eq!(c.generations_started, 1, "{c:?}");
    assert_eq!(c.handoffs_survived, 0, "{c:?}");
    assert_eq!(c.generations.len(), 1, "{c:?}");
    assert_eq!(c.generations[0].pid, pid, "{c:?}");
    assert!(!c.generations[0].via_handoff, "{c:?}");
}
