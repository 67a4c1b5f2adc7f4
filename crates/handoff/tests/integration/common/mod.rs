//! Helpers shared by the library's integration tests.
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

/// An example binary of this crate (`target/<profile>/examples/NAME`), which
/// `cargo test` builds alongside the tests.
pub fn example_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let p = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps")
        .join("examples")
        .join(name);
    assert!(
        p.exists(),
        "{} missing: run `cargo test` or `cargo build --examples` (they build examples)",
        p.display()
    );
    p
}

/// Evaluates `f` until it holds or `within` has passed (then once more);
/// returns whether it held. The one place these tests sleep: the poll
/// interval of a deadline-bounded wait.
pub fn poll_until(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return f();
        }
        std::thread::park_timeout(Duration::from_millis(2));
    }
}

/// [`poll_until`], failing the test with `what` when `within` passes.
pub fn poll(within: Duration, what: &str, f: impl FnMut() -> bool) {
    assert!(poll_until(within, f), "timed out waiting for {what}");
}
