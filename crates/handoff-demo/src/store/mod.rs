//! A small durable key-value store: an append-only log in the state dir,
//! a checkpointed index beside it, and group commit.
//!
//! A PUT is acknowledged only after its record is written *and* the log is
//! `fdatasync`ed; the writer thread batches whatever is queued behind one
//! fsync, so throughput scales with concurrency instead of being one fsync
//! per request. A crash can leave a torn record at the tail: every record
//! carries a crc32c and its length, and replay stops at (and truncates) the
//! first record that does not check out — such a record was never
//! acknowledged ([`log`]).
//!
//! What a process holds in memory is only what was written since the last
//! checkpoint (the *delta*); older keys are read from the files through the
//! index ([`index`], issue 18). So opening the store — a new build's warm-up
//! — costs the delta, not the history, and the old and new process of a
//! handoff share one copy of the data: the page cache. A background thread
//! writes a new checkpoint whenever the delta has grown past
//! [`writer::CHECKPOINT_RECORDS`] keys; the writer installs it between
//! batches.
//!
//! A new build reads the store ahead of Begin ([`Store::preload`]), catches
//! up with the incumbent's appends round after round before its Hello
//! ([`Preloaded::catch_up`], driven by `handoff-tokio`'s catch-up), and
//! after Begin reads only the last round's tail ([`Preloaded::finish`]).
//!
//! A write that fails (a full disk, an I/O error) must not leave torn bytes
//! in the middle of the log: replay stops at the first bad record, so
//! every record appended after it — acknowledged or not — would be dropped
//! at the next open. So after a failed append the writer cuts the log back
//! to its last good record before it acknowledges anything else; if it
//! cannot, or if an fsync failed (Linux may then have dropped the dirty
//! pages and cleared the error, so a later fsync's success proves nothing:
//! "fsyncgate"), the store turns read-only until it is reopened by a
//! restart or an upgrade. See [`writer`].
//!
//! Only the state-lock holder opens the store for writing; that is what
//! makes it safe for the old and new process to share the files.

mod compact;
mod index;
mod log;
#[cfg(test)]
mod tests;
mod view;
mod writer;

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex, RwLock};

use tokio::sync::oneshot;

use self::index::Index;
use self::log::{identity, open_private, scan};
pub use self::log::{LOG_FILE, MAX_KEY, MAX_VALUE};
use self::view::View;
use self::writer::{Cmd, Options};

pub struct Store {
    view: Arc<RwLock<View>>,
    tx: Mutex<Option<mpsc::Sender<Cmd>>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    path: PathBuf,
    /// Set by the seal, under its lock: no checkpoint of this process is
    /// renamed into place after the seal returns (the next process owns the
    /// files then).
    sealed: Arc<Mutex<bool>>,
}

/// The log and index read into a [`View`], up to `end`: where the good
/// records end (a torn record may follow, up to the file's length).
struct Loaded {
    view: View,
    end: u64,
    len: u64,
}

/// Reads the store in `dir` from `file` (its log): the index if one checks
/// out, then the records after it.
fn load(dir: &Path, file: &File) -> io::Result<Loaded> {
    let meta = file.metadata()?;
    let len = meta.len();
    let base = Index::open(dir, file, identity(&meta), len)?;
    let from = base.as_ref().map_or(0, Index::covered);
    let mut view = View {
        base: base.map(Arc::new),
        delta: HashMap::new(),
    };
    // Up to the length now: a preload must not chase a busy incumbent.
    let end = scan(file, from, len, |off, r| view.apply(off, r))?;
    Ok(Loaded { view, end, len })
}

impl Store {
    /// Opens (creating if needed) the store. Call only while holding the
    /// state lock.
    pub fn open(dir: &Path) -> io::Result<Store> {
        let path = dir.join(LOG_FILE);
        index::remove_stale_temps(dir);
        let file = open_private(
            OpenOptions::new().read(true).append(true).create(true),
            &path,
        )?;
        let loaded = load(dir, &file)?;
        Self::start(file, loaded, path, Options::new(true))
    }

    /// Reads the store *without* the state lock, while the incumbent may
    /// still be appending to it: warm-up, done before Hello. Records are
    /// immutable once written, so a prefix read now stays valid; a record
    /// caught half-written is simply left for the next round.
    pub fn preload(dir: &Path) -> io::Result<Preloaded> {
        let path = dir.join(LOG_FILE);
        match open_private(OpenOptions::new().read(true), &path) {
            Ok(file) => {
                let id = identity(&file.metadata()?);
                let loaded = load(dir, &file)?;
                Ok(Preloaded {
                    dir: dir.to_path_buf(),
                    log: Some((file, id)),
                    view: loaded.view,
                    offset: loaded.end,
                })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Preloaded {
                dir: dir.to_path_buf(),
                log: None,
                view: View::default(),
                offset: 0,
            }),
            Err(e) => Err(e),
        }
    }

    /// Truncates a torn tail (never acknowledged) and starts the writer.
    fn start(file: File, loaded: Loaded, path: PathBuf, opts: Options) -> io::Result<Store> {
        if loaded.end < loaded.len {
            tracing::warn!(target: "demo::store", dropped = loaded.len - loaded.end, "truncating torn log tail");
            file.set_len(loaded.end)?;
            file.sync_all()?;
        }
        Self::start_with(file, loaded.view, loaded.end, path, opts, |f| f)
    }

    /// [`Store::start`] with the log file wrapped by `wrap`: the tests'
    /// way to make a write or an fsync fail (see [`writer::LogFile`]).
    fn start_with<F: writer::LogFile>(
        file: File,
        view: View,
        len: u64,
        path: PathBuf,
        opts: Options,
        wrap: impl FnOnce(File) -> F,
    ) -> io::Result<Store> {
        let file = wrap(file);
        let view = Arc::new(RwLock::new(view));
        let sealed = Arc::new(Mutex::new(false));
        let (tx, rx) = mpsc::channel();
        let w = writer::Writer::new(file, len, path.clone(), view.clone(), sealed.clone(), opts);
        let writer = std::thread::Builder::new()
            .name("kv-writer".into())
            .spawn(move || w.run(rx))?;
        Ok(Store {
            view,
            tx: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(writer)),
            path,
            sealed,
        })
    }

    /// The value of `key`: from memory if it was written since the
    /// checkpoint, else read through the index (an error is an I/O error,
    /// or an index pointing at a record that is not there).
    pub fn get(&self, key: &str) -> io::Result<Option<Arc<[u8]>>> {
        let base = {
            let v = self.view.read().unwrap_or_else(|p| p.into_inner());
            if let Some(d) = v.delta.get(key) {
                return Ok(Some(d.value.clone()));
            }
            // Taken under the same lock as the miss above: a checkpoint
            // installed meanwhile moved the key from the delta into a
            // newer base, never out of both.
            v.base.clone()
        };
        match base {
            Some(b) => Ok(b.get(key)?.map(Arc::from)),
            None => Ok(None),
        }
    }

    fn send(&self, cmd: Cmd) -> io::Result<()> {
        let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        match tx.as_ref() {
            Some(tx) => tx
                .send(cmd)
                .map_err(|_| io::Error::other("store writer stopped")),
            None => Err(io::Error::other("store is sealed")),
        }
    }

    /// Durably stores `value`; returns once it is on disk.
    pub async fn put(&self, key: String, value: Vec<u8>) -> io::Result<()> {
        let (done, rx) = oneshot::channel();
        self.send(Cmd::Put {
            key,
            value: Arc::from(value),
            done,
        })?;
        rx.await
            .map_err(|_| io::Error::other("store writer stopped"))?
    }

    /// Waits until everything queued so far is durable (also a liveness
    /// check of the writer). On a store gone read-only it succeeds: every
    /// acknowledged write is durable and nothing else is pending, and the
    /// seal must succeed so that an upgrade can reopen the store.
    pub fn flush_blocking(&self) -> io::Result<()> {
        let (done, rx) = oneshot::channel();
        self.send(Cmd::Flush(done))?;
        rx.blocking_recv()
            .map_err(|_| io::Error::other("store writer stopped"))?
    }

    /// Whether the writer is running: the health check's question (a
    /// writer that died would fail every PUT). Asked of the thread's handle,
    /// not the thread: [`flush_blocking`](Self::flush_blocking) would answer
    /// too, but a round trip to the writer is one more wake-up inside the
    /// accept gap, where the new build's health check runs.
    pub fn writer_running(&self) -> io::Result<()> {
        let w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        match w.as_ref() {
            Some(h) if !h.is_finished() => Ok(()),
            Some(_) => Err(io::Error::other("store writer stopped")),
            None => Err(io::Error::other("store is sealed")),
        }
    }

    /// Flushes, then stops the writer: no write is possible afterwards, and
    /// no checkpoint of this process lands after it returns.
    pub fn seal(&self) -> io::Result<()> {
        let flushed = self.flush_blocking();
        self.tx.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(h) = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = h.join();
        }
        *self.sealed.lock().unwrap_or_else(|p| p.into_inner()) = true;
        flushed
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// A store read ahead of taking the state lock, brought up to date round
/// after round.
pub struct Preloaded {
    dir: PathBuf,
    /// The log as opened at preload (read-only), and its identity: a
    /// compaction by the incumbent replaces the file, and the next round
    /// must then read the new one whole.
    log: Option<(File, (u64, u64))>,
    view: View,
    /// Where the good records read so far end.
    offset: u64,
}

impl Preloaded {
    /// Keys found in the index, and keys read from the log after it (held
    /// in memory): what warm-up cost.
    pub fn held(&self) -> (u64, usize) {
        (
            self.view.base.as_ref().map_or(0, |b| b.keys()),
            self.view.delta.len(),
        )
    }

    /// One catch-up round, without the state lock: applies what the
    /// incumbent appended since the previous round and returns how many
    /// records and bytes that was. If the log was replaced (compacted) or
    /// created since, the new one is read whole.
    pub fn catch_up(&mut self) -> io::Result<(u64, u64)> {
        let path = self.dir.join(LOG_FILE);
        let now = match std::fs::metadata(&path) {
            Ok(m) => Some(identity(&m)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        let same = match (&self.log, now) {
            (Some((_, id)), Some(now)) => *id == now,
            (None, None) => return Ok((0, 0)),
            _ => false,
        };
        if !same {
            tracing::info!(target: "demo::store", "log replaced since the last round; reading it whole");
            *self = Store::preload(&self.dir)?;
            let n = self.view.delta.len() as u64 + self.view.base.as_ref().map_or(0, |b| b.keys());
            return Ok((n, self.offset));
        }
        let Some((file, _)) = &self.log else {
            return Ok((0, 0));
        };
        let before = self.offset;
        // Up to the length now: what the incumbent appends during the
        // round is the next round's.
        let to = file.metadata()?.len();
        let mut records = 0;
        let view = &mut self.view;
        self.offset = scan(file, before, to, |off, r| {
            records += 1;
            view.apply(off, r);
        })?;
        Ok((records, self.offset - before))
    }

    /// With the state lock held: applies what was appended since the last
    /// round and opens the store for writing. Falls back to a full
    /// [`Store::open`] if the file was replaced or shrank meanwhile.
    pub fn finish(mut self) -> io::Result<Store> {
        let path = self.dir.join(LOG_FILE);
        index::remove_stale_temps(&self.dir);
        let file = open_private(
            OpenOptions::new().read(true).append(true).create(true),
            &path,
        )?;
        let meta = file.metadata()?;
        let same = match &self.log {
            Some((_, id)) => *id == identity(&meta) && meta.len() >= self.offset,
            None => self.offset == 0,
        };
        if !same {
            tracing::info!(target: "demo::store", "log replaced since preload; reading it whole");
            drop(file);
            return Store::open(&self.dir);
        }
        let view = &mut self.view;
        let mut records = 0u64;
        let end = scan(&file, self.offset, u64::MAX, |off, r| {
            records += 1;
            view.apply(off, r);
        })?;
        tracing::info!(target: "demo::store", records, bytes = end - self.offset, "read the tail after Begin");
        let loaded = Loaded {
            view: self.view,
            end,
            len: meta.len(),
        };
        Store::start(file, loaded, path, Options::new(false))
    }
}

/// The key of seeded record `i` (see [`seed`]).
pub fn seed_key(i: u64) -> String {
    format!("seed-{i}")
}

/// The value of seeded record `i`: 32 bytes a reader can check.
pub fn seed_value(i: u64) -> Vec<u8> {
    format!("v{i:031}").into_bytes()
}

/// Writes a log of `keys` records ([`seed_key`] = [`seed_value`]) and its
/// checkpoint into an empty state dir, as if that many PUTs had been
/// acknowledged and checkpointed: how the tests and the benchmark get a
/// store of millions of keys in seconds. Refuses a dir that already holds
/// a log (nothing is ever overwritten). `progress(done)` is called every
/// million records.
pub fn seed(dir: &Path, keys: u64, mut progress: impl FnMut(u64)) -> io::Result<u64> {
    use std::io::Write;
    let path = dir.join(LOG_FILE);
    let file = open_private(
        OpenOptions::new().read(true).write(true).create_new(true),
        &path,
    )
    .map_err(|e| match e.kind() {
        io::ErrorKind::AlreadyExists => io::Error::new(
            e.kind(),
            format!("{} exists: seed only an empty state dir", path.display()),
        ),
        _ => e,
    })?;
    let mut w = io::BufWriter::with_capacity(1 << 20, &file);
    let mut rec = Vec::new();
    let mut len = 0;
    let mut table = index::Table::with_capacity(keys);
    for i in 0..keys {
        rec.clear();
        let key = seed_key(i);
        log::encode_into(&mut rec, &key, &seed_value(i));
        w.write_all(&rec)?;
        table.insert_new(&key, len, rec.len() as u64);
        len += rec.len() as u64;
        if (i + 1) % 1_000_000 == 0 {
            progress(i + 1);
        }
    }
    w.flush()?;
    drop(w);
    file.sync_all()?;
    log::sync_dir(dir)?;
    table.persist(dir, &file, len, &Mutex::new(false))?;
    Ok(len)
}
