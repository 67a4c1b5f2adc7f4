//! The store's only appender: group commit, recovery from storage faults,
//! checkpoints and compaction.
//!
//! Storage faults. A failed append (ENOSPC, EIO) may have left part of the
//! batch in the file; replay stops at the first bad record, so anything
//! appended after those bytes would be lost at the next open, however
//! acknowledged. So the log is cut back to `log_len`, the end of the last
//! good record, before the next batch. The store turns read-only instead —
//! every later PUT refused, reads still answered, the reason logged once —
//! when it can no longer vouch for the log:
//!
//! * the cut back failed (torn bytes may remain: replay on the next open
//!   drops them, and nothing was acknowledged after them);
//! * an fsync failed: Linux may have dropped the dirty pages and cleared
//!   the error ("fsyncgate"), so the next fsync could succeed with earlier
//!   data missing, and an acknowledgement after it would be a lie;
//! * a compaction failed after its rename (the directory fsync or the
//!   reopen): appends to the old, unlinked file would be lost.
//!
//! A restart or an upgrade reopens the store from what is on disk, which
//! is where a read-only store is meant to end.
//!
//! Checkpoints are written by a thread of their own from a snapshot of the
//! delta's (key, offset) pairs, so a PUT never waits for one; the writer
//! installs the result between batches. Compaction — rare: when the log is
//! mostly overwritten records — runs here, between batches, and waits for
//! a checkpoint in flight first (both write `kv.idx`).

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use super::index::{self, Index};
use tokio::sync::oneshot;

use super::compact;
use super::log;
use super::view::{Delta, View};

/// A checkpoint is written once this many keys were written since the
/// last one: what a new build replays at most on top of the index (about
/// 0.2 s), and what the process holds in memory besides.
pub(super) const CHECKPOINT_RECORDS: usize = 1 << 18;

/// How a store's writer behaves.
#[derive(Debug, Clone, Copy)]
pub(super) struct Options {
    /// Consider compacting at once (a full open) rather than only once the
    /// log has doubled (a handoff's open: its health check waits for the
    /// writer, inside the accept gap).
    pub(super) compact_now: bool,
    /// Checkpoint once the delta holds this many keys.
    pub(super) checkpoint_every: usize,
}

impl Options {
    pub(super) fn new(compact_now: bool) -> Options {
        Options {
            compact_now,
            // A test and benchmark knob: checkpoints after fewer writes.
            checkpoint_every: std::env::var("HANDOFF_DEMO_CHECKPOINT_RECORDS")
                .ok()
                .and_then(|v| v.parse().ok())
                .filter(|&n: &usize| n > 0)
                .unwrap_or(CHECKPOINT_RECORDS),
        }
    }
}

/// What the store asks of its writer.
pub(super) enum Cmd {
    Put {
        key: String,
        value: Arc<[u8]>,
        done: oneshot::Sender<io::Result<()>>,
    },
    /// Acknowledged once everything queued before it is durable.
    Flush(oneshot::Sender<io::Result<()>>),
}

/// What the writer does to the log file. A seam, not an abstraction: the
/// one implementation outside the tests is [`File`]. It exists because a
/// full disk or a failing one cannot be summoned on demand, and the
/// recovery from them is exactly the code that must not be wrong: the unit
/// tests wrap the file to make a write stop short or an fsync fail at a
/// chosen point.
pub(super) trait LogFile: Write + Send + 'static {
    /// `fdatasync`: the appended records are durable once this succeeds.
    fn sync_data(&mut self) -> io::Result<()>;
    /// Cuts the log back to `len` bytes (the end of its last good record),
    /// puts the write position there and makes the new length durable.
    fn cut_back(&mut self, len: u64) -> io::Result<()>;
    /// Opens the log at `path` anew and appends there from now on:
    /// compaction replaced it.
    fn reopen(&mut self, path: &Path) -> io::Result<()>;
    /// The file itself, to read records and index them.
    fn file(&self) -> &File;
}

impl LogFile for File {
    fn sync_data(&mut self) -> io::Result<()> {
        File::sync_data(self)
    }

    fn cut_back(&mut self, len: u64) -> io::Result<()> {
        use std::io::Seek;
        self.set_len(len)?;
        // The log is opened O_APPEND, so writes go to the (new) end anyway;
        // the seek keeps the position honest should that ever change.
        self.seek(io::SeekFrom::Start(len))?;
        // sync_all, not sync_data: the length is the point of it.
        self.sync_all()
    }

    fn reopen(&mut self, path: &Path) -> io::Result<()> {
        *self = log::open_log(path)?;
        Ok(())
    }

    fn file(&self) -> &File {
        self
    }
}

/// A checkpoint being written by its own thread.
struct InFlight {
    started: Instant,
    covered: u64,
    done: mpsc::Receiver<io::Result<Index>>,
    thread: std::thread::JoinHandle<()>,
}

pub(super) struct Writer<F> {
    file: F,
    /// The end of the last good record.
    log_len: u64,
    /// (device, inode) of the log appended to.
    log_id: (u64, u64),
    path: PathBuf,
    view: Arc<RwLock<View>>,
    sealed: Arc<Mutex<bool>>,
    /// Checkpoint once the delta holds this many keys.
    checkpoint_every: usize,
    /// …and no sooner than this (raised after a failed checkpoint, so a
    /// full disk does not make it retry after every batch).
    next_checkpoint: usize,
    in_flight: Option<InFlight>,
    /// Compaction is considered when the log reaches this length.
    next_check: u64,
    /// Why writes are refused, once they are.
    read_only: Option<String>,
    /// A recovered append failure is logged once per run of failures, not
    /// once per request: a full disk must not also fill the service's log.
    failing: bool,
}

impl<F: LogFile> Writer<F> {
    pub(super) fn new(
        file: F,
        log_len: u64,
        path: PathBuf,
        view: Arc<RwLock<View>>,
        sealed: Arc<Mutex<bool>>,
        opts: Options,
    ) -> Writer<F> {
        let log_id = file
            .file()
            .metadata()
            .map(|m| log::identity(&m))
            .unwrap_or_default();
        let checkpoint_every = opts.checkpoint_every;
        Writer {
            file,
            log_len,
            log_id,
            path,
            view,
            sealed,
            checkpoint_every,
            next_checkpoint: checkpoint_every,
            in_flight: None,
            // A full open considers compaction at once (a log left by a
            // writer that never compacted); a handoff's open does not: its
            // health check waits for the writer, inside the accept gap.
            next_check: if opts.compact_now {
                0
            } else {
                (log_len * 2).max(1 << 20)
            },
            read_only: None,
            failing: false,
        }
    }

    fn dir(&self) -> PathBuf {
        self.path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."))
    }

    fn view(&self) -> std::sync::RwLockWriteGuard<'_, View> {
        self.view.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Serves commands until the store is sealed (every sender dropped).
    pub(super) fn run(mut self, rx: mpsc::Receiver<Cmd>) {
        // A store opened on a long log with no usable index checkpoints at
        // once; one that is mostly overwritten records compacts.
        self.housekeeping();
        loop {
            let first = match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(c) => c,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    self.housekeeping();
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            };
            let mut batch = vec![first];
            while let Ok(more) = rx.try_recv() {
                batch.push(more);
            }
            self.commit(batch);
            // After the acknowledgements: housekeeping never delays a reply.
            self.housekeeping();
        }
    }

    /// Appends a batch, makes it durable, applies it to the view and
    /// acknowledges it.
    fn commit(&mut self, batch: Vec<Cmd>) {
        if let Some(why) = &self.read_only {
            for c in batch {
                match c {
                    Cmd::Put { done, .. } => {
                        let _ = done.send(Err(refused(why)));
                    }
                    // Every acknowledged write is durable; nothing is pending.
                    Cmd::Flush(done) => {
                        let _ = done.send(Ok(()));
                    }
                }
            }
            return;
        }
        let mut buf = Vec::new();
        for c in &batch {
            if let Cmd::Put { key, value, .. } = c {
                log::encode_into(&mut buf, key, value);
            }
        }
        let res = self.append(&buf);
        if let Some(why) = &self.read_only {
            tracing::error!(target: "demo::store", "{}", refused(why));
        }
        if res.is_ok() {
            self.failing = false;
            let mut off = self.log_len;
            let view = self.view.clone();
            let mut v = view.write().unwrap_or_else(|p| p.into_inner());
            for c in &batch {
                if let Cmd::Put { key, value, .. } = c {
                    v.delta.insert(
                        key.clone(),
                        Delta {
                            off,
                            value: value.clone(),
                        },
                    );
                    off += log::record_len(key, value.len());
                }
            }
            drop(v);
            self.log_len += buf.len() as u64;
        }
        for c in batch {
            let r = match &res {
                Ok(()) => Ok(()),
                Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
            };
            match c {
                Cmd::Put { done, .. } | Cmd::Flush(done) => {
                    let _ = done.send(r);
                }
            }
        }
    }

    /// Writes `buf` and fsyncs; on failure cuts the log back or turns the
    /// store read-only (see the module's doc).
    fn append(&mut self, buf: &[u8]) -> io::Result<()> {
        let path = self.path.display().to_string();
        if buf.is_empty() {
            // A batch of flushes only: every earlier batch was fsync'ed before
            // it was acknowledged (or the store went read-only), so nothing is
            // pending and an fsync would only cost time — the seal's and the
            // health check's, both inside the accept gap.
            return Ok(());
        }
        match self.file.write_all(buf) {
            Ok(()) => {
                let synced = self.file.sync_data();
                if let Err(e) = &synced {
                    self.read_only = Some(format!("fsync of {path} failed: {e}"));
                    // Best effort: the batch was refused, so it should not
                    // reappear at the next open either.
                    let _ = self.file.cut_back(self.log_len);
                }
                synced
            }
            Err(e) => {
                let good = self.log_len;
                match self.file.cut_back(good) {
                    Ok(()) if !self.failing => {
                        tracing::warn!(target: "demo::store", path, error = %e,
                            good_len = good, "appending failed; cut the log back to its last good record");
                    }
                    Ok(()) => {}
                    Err(cut) => {
                        self.read_only = Some(format!(
                            "appending to {path} failed ({e}), then cutting it back to its last \
                             good record ({good} bytes) failed too: {cut}"
                        ));
                    }
                }
                self.failing = true;
                Err(e)
            }
        }
    }

    /// Installs a finished checkpoint, starts the next one when the delta
    /// has grown enough, compacts when the log is mostly dead records.
    fn housekeeping(&mut self) {
        self.install_checkpoint(false);
        if self.read_only.is_some() {
            return;
        }
        let delta = self
            .view
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .delta
            .len();
        if self.in_flight.is_none() && delta >= self.next_checkpoint {
            self.start_checkpoint();
        }
        if self.log_len >= self.next_check {
            self.maybe_compact();
            self.next_check = (self.log_len * 2).max(1 << 20);
        }
    }

    fn start_checkpoint(&mut self) {
        let (base, delta) = {
            let v = self.view.read().unwrap_or_else(|p| p.into_inner());
            let delta: Vec<(String, u64, u64)> = v
                .delta
                .iter()
                .map(|(k, d)| (k.clone(), d.off, d.record_len(k)))
                .collect();
            (v.base.clone(), delta)
        };
        let log = match self.file.file().try_clone() {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(target: "demo::store", error = %e, "cannot start a checkpoint");
                return;
            }
        };
        let covered = self.log_len;
        let dir = self.dir();
        let gate = self.sealed.clone();
        let (tx, done) = mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("kv-checkpoint".into())
            .spawn(move || {
                let r = index::checkpoint(&dir, &log, covered, base.as_deref(), &delta, &gate);
                let _ = tx.send(r);
            });
        match spawned {
            Ok(thread) => {
                self.in_flight = Some(InFlight {
                    started: Instant::now(),
                    covered,
                    done,
                    thread,
                })
            }
            Err(e) => {
                tracing::warn!(target: "demo::store", error = %e, "cannot start a checkpoint thread")
            }
        }
    }

    /// Takes the checkpoint in flight if it is done (or waits for it, with
    /// `wait`) and makes it the view's base.
    fn install_checkpoint(&mut self, wait: bool) {
        let Some(f) = self.in_flight.take() else {
            return;
        };
        let got = if wait {
            f.done.recv().map_err(|_| ())
        } else {
            match f.done.try_recv() {
                Ok(r) => Ok(r),
                Err(mpsc::TryRecvError::Empty) => {
                    self.in_flight = Some(f);
                    return;
                }
                Err(mpsc::TryRecvError::Disconnected) => Err(()),
            }
        };
        let _ = f.thread.join();
        let delta_now = self
            .view
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .delta
            .len();
        match got {
            Ok(Ok(idx)) if idx.log_id() == self.log_id => {
                let mut v = self.view();
                v.base = Some(Arc::new(idx));
                v.delta.retain(|_, d| d.off >= f.covered);
                let left = v.delta.len();
                drop(v);
                tracing::info!(target: "demo::store", covered = f.covered, took_ms = f.started.elapsed().as_millis() as u64, delta_left = left, "checkpoint written");
                self.next_checkpoint = self.checkpoint_every;
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!(target: "demo::store", error = %e, "writing a checkpoint failed; the store works on without it and tries again later");
                self.next_checkpoint = delta_now + self.checkpoint_every;
            }
            Err(()) => {
                tracing::warn!(target: "demo::store", "the checkpoint thread ended without a result");
                self.next_checkpoint = delta_now + self.checkpoint_every;
            }
        }
    }

    fn maybe_compact(&mut self) {
        let live = {
            let v = self.view.read().unwrap_or_else(|p| p.into_inner());
            v.base.as_ref().map_or(0, |b| b.live())
                + v.delta.iter().map(|(k, d)| d.record_len(k)).sum::<u64>()
        };
        if !compact::worth_it(self.log_len, live) {
            return;
        }
        // Both write kv.idx: the checkpoint first.
        self.install_checkpoint(true);
        let dir = self.dir();
        let before = self.log_len;
        let compacted = {
            let v = self.view.read().unwrap_or_else(|p| p.into_inner());
            compact::compact(
                &dir,
                &self.path,
                self.file.file(),
                self.log_len,
                &v,
                &self.sealed,
            )
        };
        let done = compacted.and_then(|c| {
            self.file
                .reopen(&self.path)
                .map_err(|source| compact::Error {
                    renamed: true,
                    source,
                })?;
            Ok(c)
        });
        match done {
            Ok(c) => {
                self.log_len = c.len;
                self.log_id = c.log_id;
                let mut v = self.view();
                v.base = c.index.map(Arc::new);
                v.delta = c.delta;
                drop(v);
                tracing::info!(target: "demo::store", before, after = self.log_len, "compacted the log");
            }
            // The old log is intact and still ours: keep appending.
            Err(e) if !e.renamed => {
                tracing::warn!(target: "demo::store", error = %e.source, "compacting the log failed")
            }
            Err(e) => {
                let why = format!(
                    "compacting {} failed after the new log took its name: {}",
                    self.path.display(),
                    e.source
                );
                tracing::error!(target: "demo::store", "{}", refused(&why));
                self.read_only = Some(why);
            }
        }
    }
}

/// The answer to a PUT on a read-only store: what happened, and the way out.
fn refused(why: &str) -> io::Error {
    io::Error::other(format!(
        "the store is read-only after a failed write ({why}); reads still work; \
         restart or upgrade the service to reopen it"
    ))
}
