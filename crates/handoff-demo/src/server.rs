//! The demo's HTTP API, on axum. Accepting, keep-alive and the drain
//! (answer-then-close, idle connections closed after a grace, lingering
//! closes, connections past the drain grace cut before the seal) are
//! `handoff-tokio`'s `serve`; this is only what the service answers.
//!
//! ```text
//! GET /healthz      200 ok
//! GET /version      200 pid=<pid> build=<build id>
//! GET /kv/KEY       200 with exactly the stored bytes, or 404
//! PUT /kv/KEY       200 once the value is durable (fsync'd) in the state dir
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;

use crate::store::{Store, MAX_KEY, MAX_VALUE};

/// What the handlers, the hooks and the counters flusher share.
pub struct Shared {
    /// The open store: `None` before Begin (nothing is accepted then) and
    /// after the seal (no connection is left then).
    pub store: RwLock<Option<Arc<Store>>>,
    pub build_id: String,
    /// Responses written by this process. Counted here (one relaxed add per
    /// response) and added to the shared counters region in batches by
    /// `live::Live::flush`, so no request takes the region's lock.
    pub served: AtomicU64,
}

impl Shared {
    pub fn store(&self) -> Option<Arc<Store>> {
        self.store.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn set_store(&self, s: Option<Arc<Store>>) {
        *self.store.write().unwrap_or_else(|p| p.into_inner()) = s;
    }
}

/// The routes. Unknown paths get 404, other methods 405, a value over
/// `MAX_VALUE` 413 (axum's own answers).
pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/version", get(version))
        .route("/kv/{*key}", get(read).put(write))
        .layer(DefaultBodyLimit::max(MAX_VALUE))
        .layer(axum::middleware::map_response_with_state(
            shared.clone(),
            count,
        ))
        .with_state(shared)
}

async fn count(
    State(s): State<Arc<Shared>>,
    res: axum::response::Response,
) -> axum::response::Response {
    s.served.fetch_add(1, Ordering::Relaxed);
    res
}

async fn version(State(s): State<Arc<Shared>>) -> String {
    format!("pid={} build={}\n", std::process::id(), s.build_id)
}

fn bad_key(key: &str) -> Option<(StatusCode, Vec<u8>)> {
    (key.is_empty() || key.len() > MAX_KEY).then(|| {
        (
            StatusCode::BAD_REQUEST,
            b"key must be 1..512 bytes\n".to_vec(),
        )
    })
}

fn closed() -> (StatusCode, Vec<u8>) {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        b"handing off; retry\n".to_vec(),
    )
}

async fn read(State(s): State<Arc<Shared>>, Path(key): Path<String>) -> (StatusCode, Vec<u8>) {
    if let Some(bad) = bad_key(&key) {
        return bad;
    }
    match s.store() {
        None => closed(),
        Some(store) => match store.get(&key) {
            Ok(Some(v)) => (StatusCode::OK, v.to_vec()),
            Ok(None) => (StatusCode::NOT_FOUND, b"no such key\n".to_vec()),
            Err(e) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("reading {key}: {e}\n").into_bytes(),
            ),
        },
    }
}

async fn write(
    State(s): State<Arc<Shared>>,
    Path(key): Path<String>,
    value: Bytes,
) -> (StatusCode, Vec<u8>) {
    if let Some(bad) = bad_key(&key) {
        return bad;
    }
    match s.store() {
        None => closed(),
        Some(store) => match store.put(key, value.to_vec()).await {
            Ok(()) => (StatusCode::OK, b"stored\n".to_vec()),
            Err(e) => (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not stored: {e}\n").into_bytes(),
            ),
        },
    }
}
