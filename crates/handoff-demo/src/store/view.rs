//! What readers see: the checkpoint, and the keys written since.

use std::collections::HashMap;
use std::sync::Arc;

use super::index::Index;
use super::log;

/// A key written since the checkpoint: where its record is, and its value.
#[derive(Debug, Clone)]
pub(super) struct Delta {
    pub(super) off: u64,
    pub(super) value: Arc<[u8]>,
}

impl Delta {
    pub(super) fn record_len(&self, key: &str) -> u64 {
        log::record_len(key, self.value.len())
    }
}

/// What readers see: the checkpoint, and what was written since.
#[derive(Debug, Default)]
pub(super) struct View {
    pub(super) base: Option<Arc<Index>>,
    pub(super) delta: HashMap<String, Delta>,
}

impl View {
    /// Applies the records `scan` finds (the log's tail) to the delta.
    pub(super) fn apply(&mut self, off: u64, r: log::Record<'_>) {
        self.delta.insert(
            r.key.to_owned(),
            Delta {
                off,
                value: Arc::from(r.value),
            },
        );
    }
}
