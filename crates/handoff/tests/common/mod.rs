//! Helpers shared by the library's integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

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
