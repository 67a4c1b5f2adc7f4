//! `fake_admin SOCKET`: what another local user could put at
//! `<runtime-dir>/admin.sock` when they can write the runtime dir — a
//! server that answers every request with a made-up `committed` event
//! (`pid 1 -> 31337`, build `attacker-build`).
//!
//! Test tooling: the clients (`handoff upgrade`, `status`, `stop`) must
//! check who serves the socket (`SO_PEERCRED`) and refuse this one before
//! believing a word (tests/e2e/admin_peer.rs runs it as uid `nobody`).

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;

fn main() {
    let Some(path) = std::env::args_os().nth(1) else {
        eprintln!("usage: fake_admin SOCKET");
        std::process::exit(2);
    };
    let listener = match UnixListener::bind(&path) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("fake_admin: binding {}: {e}", path.to_string_lossy());
            std::process::exit(1);
        }
    };
    println!("ready");
    let _ = std::io::stdout().flush();
    let lie = serde_json::json!({
        "event": "committed",
        "handoff_id": "0x0000000000000001",
        "old_pid": 1,
        "new_pid": 31337,
        "build_id": "attacker-build",
        "total_ms": 1.0,
        "warnings": [],
    });
    let Ok(json) = serde_json::to_vec(&lie) else {
        std::process::exit(1);
    };
    let Ok(frame) = handoff::frame::encode(1, &json) else {
        std::process::exit(1);
    };
    for mut conn in listener.incoming().flatten() {
        // Whatever was asked: read a little of it, answer the lie, close.
        let mut buf = [0u8; 512];
        let _ = conn.read(&mut buf);
        let _ = conn.write_all(&frame);
    }
}
