//! Started by hand rather than by `handoff run`, the example says what is
//! missing and how to run it, and exits non-zero. (Also what makes
//! `cargo test --workspace` build this binary, which the upgrade tests in
//! crates/handoff-cli/tests/e2e/tokio_services.rs drive.)

use std::process::Command;

#[test]
fn started_by_hand_it_says_how_to_run_it() {
    let out = Command::new(env!("CARGO_BIN_EXE_example-kv"))
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID")
        .env_remove("HANDOFF_ROLE")
        .env_remove("HANDOFF_STATE_DIR")
        .env_remove("HANDOFF_CONTROL_SOCK")
        .env_remove("NOTIFY_SOCKET")
        .output()
        .expect("run the example");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("run me under `handoff run --listen"),
        "the error says how to run it: {stderr}"
    );
}
