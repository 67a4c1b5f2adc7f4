//! Compaction: the log rewritten with only each key's latest record, and a
//! fresh checkpoint of it.
//!
//! A service that is only ever upgraded (never restarted) would otherwise
//! grow its log without bound. The old log is read front to back once; a
//! record is kept if it is its key's latest — the delta's entry for the key
//! points at it, or (a key not written since the checkpoint) the index's
//! does. Temp file, fsync, rename, fsync of the directory: a crash
//! mid-compaction leaves the old log intact. A failure before the rename
//! removes the temp file: on a full disk it would only make things worse.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::Path;
use std::sync::Mutex;

use super::index::{Index, Table};
use super::log::{self, open_private, scan, sync_dir, LOG_FILE};
use super::view::{Delta, View};

/// A log over 1 MiB that is mostly overwritten records.
pub(super) fn worth_it(log_len: u64, live: u64) -> bool {
    log_len > 1 << 20 && log_len > 4 * live
}

/// A failed compaction, and whether the new log had already replaced the
/// old one (then appends to the old descriptor would be lost).
#[derive(Debug)]
pub(super) struct Error {
    pub(super) renamed: bool,
    pub(super) source: io::Error,
}

/// The compacted log, as the writer goes on with it.
pub(super) struct Compacted {
    /// Its length: where the next append goes.
    pub(super) len: u64,
    pub(super) log_id: (u64, u64),
    /// Its checkpoint; `None` if writing it failed (the delta then holds
    /// every key, read back from the new log).
    pub(super) index: Option<Index>,
    pub(super) delta: HashMap<String, Delta>,
}

/// Rewrites the log at `path` (open as `log`, good up to `log_len`) with the
/// records `view` says are live. The caller reopens the log.
pub(super) fn compact(
    dir: &Path,
    path: &Path,
    log: &File,
    log_len: u64,
    view: &View,
    gate: &Mutex<bool>,
) -> Result<Compacted, Error> {
    let before = |source| Error {
        renamed: false,
        source,
    };
    let after = |source| Error {
        renamed: true,
        source,
    };
    let table = match &view.base {
        Some(b) => Some(b.table().map_err(before)?),
        None => None,
    };
    let covered = view.base.as_ref().map_or(0, |b| b.covered());
    let keys = view.base.as_ref().map_or(0, |b| b.keys()) + view.delta.len() as u64;
    let tmp = dir.join(format!(".{LOG_FILE}.compact"));
    // Only the lock holder compacts, so an existing temp file is one a
    // crash left: remove it (a planted link goes, not its target) and
    // create a new one.
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(before(e)),
        _ => {}
    }
    let out = open_private(
        OpenOptions::new().read(true).write(true).create_new(true),
        &tmp,
    )
    .map_err(before)?;
    let mut fresh = Table::with_capacity(keys);
    let written = (|| {
        let mut w = BufWriter::with_capacity(1 << 20, &out);
        let mut len = 0u64;
        let mut failed = None;
        let mut rec = Vec::new();
        scan(log, 0, log_len, |off, r| {
            if failed.is_some() || off >= log_len {
                return;
            }
            let live = match view.delta.get(r.key) {
                Some(d) => d.off == off,
                None => off < covered && table.as_ref().is_some_and(|t| t.points_at(r.key, off)),
            };
            if !live {
                return;
            }
            rec.clear();
            log::encode_into(&mut rec, r.key, r.value);
            if let Err(e) = w.write_all(&rec) {
                failed = Some(e);
                return;
            }
            fresh.insert_new(r.key, len, rec.len() as u64);
            len += rec.len() as u64;
        })?;
        if let Some(e) = failed {
            return Err(e);
        }
        w.flush()?;
        drop(w);
        out.sync_all()?;
        std::fs::rename(&tmp, path)?;
        Ok(len)
    })();
    let len = match written {
        Ok(len) => len,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(before(e));
        }
    };
    sync_dir(dir).map_err(after)?;
    let log_id = log::identity(&out.metadata().map_err(after)?);
    let (index, delta) = match fresh.persist(dir, &out, len, gate) {
        Ok(i) => (Some(i), HashMap::new()),
        Err(e) => {
            tracing::warn!(target: "demo::store", error = %e, "writing the compacted log's checkpoint failed; holding its keys in memory");
            let mut v = View::default();
            scan(&out, 0, u64::MAX, |off, r| v.apply(off, r)).map_err(after)?;
            (None, v.delta)
        }
    };
    Ok(Compacted {
        len,
        log_id,
        index,
        delta,
    })
}

/// A compaction of a store held only in memory (the tests' way to replace
/// the log under a preloading process, as the writer does).
#[cfg(test)]
pub(super) fn compact_map(
    dir: &Path,
    map: &HashMap<String, std::sync::Arc<[u8]>>,
) -> Result<(), Error> {
    let path = dir.join(LOG_FILE);
    let mut raw = Vec::new();
    let mut view = View::default();
    for (k, v) in map {
        view.delta.insert(
            k.clone(),
            Delta {
                off: raw.len() as u64,
                value: v.clone(),
            },
        );
        log::encode_into(&mut raw, k, v);
    }
    let src = dir.join(".kv.log.src");
    std::fs::write(&src, &raw).map_err(|source| Error {
        renamed: false,
        source,
    })?;
    let f = File::open(&src).map_err(|source| Error {
        renamed: false,
        source,
    })?;
    let r = compact(dir, &path, &f, raw.len() as u64, &view, &Mutex::new(false)).map(|_| ());
    let _ = std::fs::remove_file(src);
    r
}
