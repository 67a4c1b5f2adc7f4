//! A plain hyper service: HTTP/1.1 and HTTP/2 without TLS (h2c) on the same
//! listener, upgradeable with no failed request or stream.
//!
//! It also shows a health check. The new build runs it before it says
//! Ready; an error aborts the upgrade, `handoff upgrade` prints the reason
//! and exits 1, and the old build serves on as if nothing happened. Here the
//! check fails when `HELLO_UNHEALTHY` names a file that exists — a stand-in
//! for "the config does not load" or "the database is unreachable".
//!
//! ```sh
//! handoff run --runtime-dir /tmp/hy --state-dir /tmp/hy \
//!     --listen http=tcp://127.0.0.1:8080 -- target/release/example-hyper &
//! curl --http2-prior-knowledge localhost:8080/   # h2c
//! curl localhost:8080/slow                       # HTTP/1.1, 300 ms
//! ```

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use handoff_tokio::Incoming;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};

#[tokio::main]
async fn main() -> Result<(), handoff_tokio::Error> {
    let handoff = handoff_tokio::Handoff::builder("example-hyper 0.1.0")
        .health(|| async {
            match std::env::var_os("HELLO_UNHEALTHY") {
                Some(p) if std::path::Path::new(&p).exists() => {
                    Err(format!("unhealthy: {} exists", p.to_string_lossy()).into())
                }
                _ => Ok(()),
            }
        })
        .start()?;
    let listener = handoff.tcp_listener("http")?;
    handoff.serve(listener, tower::service_fn(handle)).await
}

/// `handoff_tokio::Incoming` is hyper's request body, watched so that a
/// client that stops sending its body cannot hold a drain.
async fn handle(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let pid = std::process::id();
    let (status, body) = match req.uri().path() {
        "/" => (
            StatusCode::OK,
            format!("hello from pid {pid} over {:?}\n", req.version()),
        ),
        "/slow" => {
            tokio::time::sleep(Duration::from_millis(300)).await;
            (StatusCode::OK, format!("slow from pid {pid}\n"))
        }
        _ => (StatusCode::NOT_FOUND, "not found\n".to_string()),
    };
    let mut res = Response::new(Full::new(Bytes::from(body)));
    *res.status_mut() = status;
    Ok(res)
}
