//! An ordinary axum service, upgradeable with no failed request.
//!
//! Against a plain axum `main`, three lines change: the listener comes from
//! handoff by its `--listen` name instead of `TcpListener::bind`, and
//! `handoff.serve` replaces `axum::serve`.
//!
//! ```sh
//! cargo build --release -p example-axum -p handoff-cli
//! target/release/handoff run --runtime-dir /tmp/ax --state-dir /tmp/ax \
//!     --listen http=tcp://127.0.0.1:8080 -- target/release/example-axum &
//! curl localhost:8080/           # hello from pid …
//! target/release/handoff upgrade --runtime-dir /tmp/ax   # a new pid answers; nothing fails
//! target/release/handoff stop --runtime-dir /tmp/ax      # finishes every request, exits 0
//! ```

use std::time::Duration;

use axum::{routing::get, Router};

#[tokio::main]
async fn main() -> Result<(), handoff_tokio::Error> {
    let app = Router::new()
        .route("/", get(hello))
        .route("/slow", get(slow));

    let handoff = handoff_tokio::Handoff::builder("example-axum 0.1.0").start()?;
    let listener = handoff.tcp_listener("http")?;
    handoff.serve(listener, app).await
}

/// Says which build answered: the body for people, `X-Pid` for tools
/// (the side-by-side benchmark tells generations apart by it).
async fn hello() -> ([(&'static str, String); 1], String) {
    let pid = std::process::id();
    (
        [("x-pid", pid.to_string())],
        format!("hello from pid {pid}\n"),
    )
}

/// A request that takes a while: an upgrade in the middle of it still
/// answers it, from the build that accepted it.
async fn slow() -> String {
    tokio::time::sleep(Duration::from_millis(300)).await;
    format!("slow from pid {}\n", std::process::id())
}
