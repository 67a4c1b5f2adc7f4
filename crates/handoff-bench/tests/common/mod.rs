//! Helpers shared by the benchmark crate's tests.
#![allow(dead_code)]

use std::time::{Duration, Instant};

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
        std::thread::park_timeout(Duration::from_millis(5));
    }
}
