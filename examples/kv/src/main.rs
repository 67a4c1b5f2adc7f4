//! A key-value service whose state lives on disk, upgradeable with no
//! failed request and no lost acknowledged write.
//!
//! `PUT /kv/KEY` appends a record to `<state-dir>/kv.log` and answers 200
//! only once it is on disk (`fdatasync`); `GET /kv/KEY` answers the value
//! or 404. Two builds must never write the log at once, so the service says
//! it is [`stateful`](handoff_tokio::Builder::stateful): a new build opens
//! the log in `on_begin` (it holds the state lock then) and accepts only
//! once the handoff commits; the old one stops accepting, finishes every
//! connection, and closes the log in `seal`. If the upgrade aborts after
//! the seal, `resume` opens the log again.
//!
//! ```sh
//! handoff run --runtime-dir /tmp/kv --state-dir /tmp/kv-state \
//!     --listen http=tcp://127.0.0.1:8080 -- target/release/example-kv &
//! curl -X PUT --data-binary hello localhost:8080/kv/greeting
//! handoff upgrade --runtime-dir /tmp/kv
//! curl localhost:8080/kv/greeting        # hello, from the new build
//! ```

mod log;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;

use log::Log;

/// The log's path (known from Begin on) and the open log — `None` before
/// Begin and between the seal and a resume.
#[derive(Default)]
struct Store {
    path: Option<PathBuf>,
    log: Option<Log>,
}

type Shared = Arc<Mutex<Store>>;

#[tokio::main]
async fn main() -> Result<(), handoff_tokio::Error> {
    let store: Shared = Arc::default();
    let app = Router::new()
        .route("/kv/{key}", get(read).put(write))
        .with_state(store.clone());

    let (open, health, seal, resume) = (store.clone(), store.clone(), store.clone(), store.clone());
    let handoff = handoff_tokio::Handoff::builder("example-kv 0.1.0")
        .stateful()
        .on_begin(move |begin| async move {
            let path = begin.state_dir.join("kv.log");
            let log = Log::open(&path)?;
            *lock(&open) = Store {
                path: Some(path),
                log: Some(log),
            };
            Ok(())
        })
        .health(move || {
            let ok = lock(&health).log.is_some();
            async move {
                if ok {
                    Ok(())
                } else {
                    Err("the log is not open".into())
                }
            }
        })
        .seal(move || {
            // Every write was synced before it was acknowledged; closing
            // the file is all the seal has to do.
            lock(&seal).log.take();
            async { Ok(None) }
        })
        .resume(move || {
            // The new build had the lock meanwhile: read the log afresh.
            let mut s = lock(&resume);
            let reopened = match &s.path {
                Some(p) => Log::open(p).map(|l| s.log = Some(l)).map_err(Into::into),
                None => Err("resumed before the log was ever opened".into()),
            };
            async move { reopened }
        })
        .start()?;
    let listener = handoff.tcp_listener("http")?;
    handoff.serve(listener, app).await
}

fn lock(s: &Shared) -> std::sync::MutexGuard<'_, Store> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

async fn read(State(store): State<Shared>, Path(key): Path<String>) -> (StatusCode, Vec<u8>) {
    match lock(&store)
        .log
        .as_ref()
        .map(|l| l.get(&key).map(<[u8]>::to_vec))
    {
        Some(Some(v)) => (StatusCode::OK, v),
        Some(None) => (StatusCode::NOT_FOUND, b"no such key\n".to_vec()),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            b"the log is closed\n".to_vec(),
        ),
    }
}

async fn write(
    State(store): State<Shared>,
    Path(key): Path<String>,
    value: Bytes,
) -> (StatusCode, String) {
    // The append and its fdatasync block: off the runtime's workers.
    let done = tokio::task::spawn_blocking(move || match lock(&store).log.as_mut() {
        Some(log) => log
            .put(&key, &value)
            .map_err(|e| format!("writing the log: {e}")),
        None => Err("the log is closed".to_string()),
    })
    .await;
    match done {
        Ok(Ok(())) => (StatusCode::OK, "stored\n".into()),
        Ok(Err(e)) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
    }
}
