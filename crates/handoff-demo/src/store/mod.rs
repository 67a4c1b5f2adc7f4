//! A small durable key-value store: an append-only log in the state dir,
//! replayed into memory on open, with group commit.
//!
//! A PUT is acknowledged only after its record is written *and* the log is
//! `fdatasync`ed; the writer thread batches whatever is queued behind one
//! fsync, so throughput scales with concurrency instead of being one fsync
//! per request. A crash can leave a torn record at the tail: every record
//! carries a crc32c and its length, and replay stops at (and truncates) the
//! first record that does not check out — such a record was never
//! acknowledged.
//!
//! A write that fails (a full disk, an I/O error) must not leave torn bytes
//! in the middle of the log: replay stops at the first bad record, so
//! every record appended after it — acknowledged or not — would be dropped
//! at the next open. So after a failed append the writer cuts the log back
//! to its last good record before it acknowledges anything else; if it
//! cannot, or if an fsync failed (Linux may then have dropped the dirty
//! pages and cleared the error, so a later fsync's success proves nothing:
//! "fsyncgate"), the store turns read-only until it is reopened by a
//! restart or an upgrade. See [`write_loop`].
//!
//! Only the state-lock holder opens the store for writing; that is what
//! makes it safe for the old and new process to share the file.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex, RwLock};

use tokio::sync::oneshot;

pub const LOG_FILE: &str = "kv.log";
pub const MAX_KEY: usize = 512;
pub const MAX_VALUE: usize = 1 << 20;
/// Record header: total length of what follows (u32), crc32c of it (u32).
const HEADER: usize = 8;

enum Cmd {
    Put {
        key: String,
        value: Arc<[u8]>,
        done: oneshot::Sender<io::Result<()>>,
    },
    /// Acknowledged once everything queued before it is durable.
    Flush(oneshot::Sender<io::Result<()>>),
}

pub struct Store {
    map: Arc<RwLock<HashMap<String, Arc<[u8]>>>>,
    tx: Mutex<Option<mpsc::Sender<Cmd>>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    path: PathBuf,
}

fn encode(key: &str, value: &[u8]) -> Vec<u8> {
    let body_len = 2 + key.len() + value.len();
    let mut rec = Vec::with_capacity(HEADER + body_len);
    rec.extend_from_slice(&(body_len as u32).to_le_bytes());
    rec.extend_from_slice(&[0; 4]);
    rec.extend_from_slice(&(key.len() as u16).to_le_bytes());
    rec.extend_from_slice(key.as_bytes());
    rec.extend_from_slice(value);
    let crc = crc32c::crc32c(&rec[HEADER..]);
    rec[4..8].copy_from_slice(&crc.to_le_bytes());
    rec
}

/// Replays `buf`, returning the map and the length of the valid prefix.
fn replay(buf: &[u8]) -> (HashMap<String, Arc<[u8]>>, usize) {
    let mut map = HashMap::new();
    let valid = replay_into(&mut map, buf);
    (map, valid)
}

/// Applies the records of `buf` to `map`; returns the valid prefix length.
fn replay_into(map: &mut HashMap<String, Arc<[u8]>>, buf: &[u8]) -> usize {
    let mut off = 0;
    while buf.len() - off >= HEADER {
        let len = u32::from_le_bytes(buf[off..off + 4].try_into().unwrap_or([0; 4])) as usize;
        let crc = u32::from_le_bytes(buf[off + 4..off + 8].try_into().unwrap_or([0; 4]));
        let start = off + HEADER;
        if !(2..=2 + MAX_KEY + MAX_VALUE).contains(&len) || buf.len() - start < len {
            break;
        }
        let body = &buf[start..start + len];
        if crc32c::crc32c(body) != crc {
            break;
        }
        let klen = u16::from_le_bytes([body[0], body[1]]) as usize;
        if 2 + klen > len {
            break;
        }
        let Ok(key) = std::str::from_utf8(&body[2..2 + klen]) else {
            break;
        };
        map.insert(key.to_string(), Arc::from(&body[2 + klen..]));
        off = start + len;
    }
    off
}

impl Store {
    /// Opens (creating if needed) and replays the log. Call only while
    /// holding the state lock.
    pub fn open(dir: &Path) -> io::Result<Store> {
        let path = dir.join(LOG_FILE);
        let mut file = open_private(
            OpenOptions::new().read(true).append(true).create(true),
            &path,
        )?;
        let mut buf = Vec::new();
        file.read_to_end(&mut buf)?;
        let (map, valid) = replay(&buf);
        if valid < buf.len() {
            // A torn tail from a crash mid-append: never acknowledged.
            tracing::warn!(target: "demo::store", dropped = buf.len() - valid, "truncating torn log tail");
            file.set_len(valid as u64)?;
            file.sync_all()?;
        }
        if worth_compacting(valid as u64, live_bytes(&map)) {
            compact(dir, &path, &map)?;
            file = open_log(&path)?;
        }
        Self::start(file, map, path)
    }

    /// Reads the log *without* the state lock, while the incumbent may still
    /// be appending to it: warm-up, done before Begin so that the successor
    /// only has to read what was appended since (usually nothing: the
    /// incumbent flushed at seal) once it holds the lock. Records are
    /// immutable once written, so a prefix read now stays valid; a record
    /// caught half-written is simply left for [`Preloaded::finish`].
    pub fn preload(dir: &Path) -> io::Result<Preloaded> {
        let path = dir.join(LOG_FILE);
        let (map, offset, identity) = match open_private(OpenOptions::new().read(true), &path) {
            Ok(mut f) => {
                let mut buf = Vec::new();
                f.read_to_end(&mut buf)?;
                let (map, valid) = replay(&buf);
                (map, valid as u64, Some(identity(&f.metadata()?)))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => (HashMap::new(), 0, None),
            Err(e) => return Err(e),
        };
        Ok(Preloaded {
            dir: dir.to_path_buf(),
            map,
            offset,
            identity,
        })
    }

    fn start(file: File, map: HashMap<String, Arc<[u8]>>, path: PathBuf) -> io::Result<Store> {
        Self::start_with(file, map, path, |f| f)
    }

    /// [`Store::start`] with the log file wrapped by `wrap`: the tests'
    /// way to make a write or an fsync fail (see [`LogFile`]).
    fn start_with<F: LogFile>(
        mut file: File,
        map: HashMap<String, Arc<[u8]>>,
        path: PathBuf,
        wrap: impl FnOnce(File) -> F,
    ) -> io::Result<Store> {
        let len = file.seek(SeekFrom::End(0))?;
        let file = wrap(file);
        let map = Arc::new(RwLock::new(map));
        let (tx, rx) = mpsc::channel();
        let m = map.clone();
        let p = path.clone();
        let writer = std::thread::Builder::new()
            .name("kv-writer".into())
            .spawn(move || write_loop(file, len, &p, rx, m))?;
        Ok(Store {
            map,
            tx: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(writer)),
            path,
        })
    }

    #[cfg(test)]
    fn snapshot(&self) -> HashMap<String, Arc<[u8]>> {
        self.map.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn get(&self, key: &str) -> Option<Arc<[u8]>> {
        self.map
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .cloned()
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.map.read().unwrap_or_else(|p| p.into_inner()).len()
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

    /// Flushes, then stops the writer: no write is possible afterwards.
    pub fn seal(&self) -> io::Result<()> {
        let flushed = self.flush_blocking();
        self.tx.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(h) = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = h.join();
        }
        flushed
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// (device, inode): tells whether the log file was replaced (compacted)
/// between preload and finish.
fn identity(m: &std::fs::Metadata) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    (m.dev(), m.ino())
}

/// A log read ahead of taking the state lock.
pub struct Preloaded {
    dir: PathBuf,
    map: HashMap<String, Arc<[u8]>>,
    offset: u64,
    identity: Option<(u64, u64)>,
}

impl Preloaded {
    /// With the state lock held: applies what was appended since the
    /// preload and opens the store for writing. Falls back to a full
    /// [`Store::open`] if the file was replaced or shrank meanwhile.
    pub fn finish(self) -> io::Result<Store> {
        let path = self.dir.join(LOG_FILE);
        let mut file = open_private(
            OpenOptions::new().read(true).append(true).create(true),
            &path,
        )?;
        let meta = file.metadata()?;
        let same = match self.identity {
            Some(id) => id == identity(&meta) && meta.len() >= self.offset,
            None => self.offset == 0,
        };
        if !same {
            tracing::info!(target: "demo::store", "log replaced since preload; reading it whole");
            drop(file);
            return Store::open(&self.dir);
        }
        let mut map = self.map;
        let mut tail = Vec::new();
        file.seek(SeekFrom::Start(self.offset))?;
        file.read_to_end(&mut tail)?;
        let valid = replay_into(&mut map, &tail);
        if valid < tail.len() {
            tracing::warn!(target: "demo::store", dropped = tail.len() - valid, "truncating torn log tail");
            file.set_len(self.offset + valid as u64)?;
            file.sync_all()?;
        }
        Store::start(file, map, path)
    }
}

/// Bytes the live records take when the log is rewritten with only them.
fn live_bytes(map: &HashMap<String, Arc<[u8]>>) -> u64 {
    map.iter()
        .map(|(k, v)| (HEADER + 2 + k.len() + v.len()) as u64)
        .sum()
}

/// A log over 1 MiB that is mostly overwritten records.
fn worth_compacting(log_len: u64, live: u64) -> bool {
    log_len > 1 << 20 && log_len > 4 * live
}

/// What the writer does to the log file. A seam, not an abstraction: the
/// one implementation outside the tests is [`File`]. It exists because a
/// full disk or a failing one cannot be summoned on demand, and the
/// recovery from them is exactly the code that must not be wrong: the unit
/// tests wrap the file to make a write stop short or an fsync fail at a
/// chosen point.
trait LogFile: Write + Send + 'static {
    /// `fdatasync`: the appended records are durable once this succeeds.
    fn sync_data(&mut self) -> io::Result<()>;
    /// Cuts the log back to `len` bytes (the end of its last good record),
    /// puts the write position there and makes the new length durable.
    fn cut_back(&mut self, len: u64) -> io::Result<()>;
    /// Opens the log at `path` anew and appends there from now on:
    /// compaction replaced it.
    fn reopen(&mut self, path: &Path) -> io::Result<()>;
}

impl LogFile for File {
    fn sync_data(&mut self) -> io::Result<()> {
        File::sync_data(self)
    }

    fn cut_back(&mut self, len: u64) -> io::Result<()> {
        self.set_len(len)?;
        // The log is opened O_APPEND, so writes go to the (new) end anyway;
        // the seek keeps the position honest should that ever change.
        self.seek(SeekFrom::Start(len))?;
        // sync_all, not sync_data: the length is the point of it.
        self.sync_all()
    }

    fn reopen(&mut self, path: &Path) -> io::Result<()> {
        *self = open_log(path)?;
        Ok(())
    }
}

/// The store's only appender. It also compacts the log once it is mostly
/// dead records: a service that is only ever upgraded (never restarted)
/// would otherwise grow its log without bound, since compaction on open
/// runs only on a full open. Compacting here, between batches, needs no
/// extra locking — nothing else appends — and keeps the guarantees of
/// [`compact`]: the old log stays intact until the atomic rename. A
/// successor preloading meanwhile notices the replaced file in
/// [`Preloaded::finish`] and reads the new one whole.
///
/// Storage faults. A failed append (ENOSPC, EIO) may have left part of the
/// batch in the file; replay stops at the first bad record, so anything
/// appended after those bytes would be lost at the next open, however
/// acknowledged. So the log is cut back to `log_len`, the end of the last
/// good record, before the next batch. The store turns read-only instead —
/// every later PUT refused, reads still answered, the reason logged once —
/// when it can no longer vouch for the log:
///
/// * the cut back failed (torn bytes may remain: replay on the next open
///   drops them, and nothing was acknowledged after them);
/// * an fsync failed: Linux may have dropped the dirty pages and cleared
///   the error ("fsyncgate"), so the next fsync could succeed with earlier
///   data missing, and an acknowledgement after it would be a lie;
/// * a compaction failed after its rename (the directory fsync or the
///   reopen): appends to the old, unlinked file would be lost.
///
/// A restart or an upgrade reopens the store from what is on disk, which
/// is where a read-only store is meant to end.
fn write_loop<F: LogFile>(
    mut file: F,
    mut log_len: u64,
    path: &Path,
    rx: mpsc::Receiver<Cmd>,
    map: Arc<RwLock<HashMap<String, Arc<[u8]>>>>,
) {
    // Checking costs a pass over the map: only when the log has doubled.
    let mut next_check = (log_len * 2).max(1 << 20);
    // Why writes are refused, once they are.
    let mut read_only: Option<String> = None;
    // A recovered append failure is logged once per run of failures, not
    // once per request: a full disk must not also fill the service's log.
    let mut failing = false;
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while let Ok(more) = rx.try_recv() {
            batch.push(more);
        }
        if let Some(why) = &read_only {
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
            continue;
        }
        let mut buf = Vec::new();
        for c in &batch {
            if let Cmd::Put { key, value, .. } = c {
                buf.extend_from_slice(&encode(key, value));
            }
        }
        let res = if buf.is_empty() {
            file.sync_data().inspect_err(|e| {
                read_only = Some(format!("fsync of {} failed: {e}", path.display()));
            })
        } else {
            match file.write_all(&buf) {
                Ok(()) => file.sync_data().inspect_err(|e| {
                    read_only = Some(format!("fsync of {} failed: {e}", path.display()));
                    // Best effort: the batch was refused, so it should not
                    // reappear at the next open either.
                    let _ = file.cut_back(log_len);
                }),
                Err(e) => {
                    match file.cut_back(log_len) {
                        Ok(()) if !failing => {
                            tracing::warn!(target: "demo::store", path = %path.display(), error = %e,
                                good_len = log_len, "appending failed; cut the log back to its last good record");
                        }
                        Ok(()) => {}
                        Err(cut) => {
                            read_only = Some(format!(
                                "appending to {} failed ({e}), then cutting it back to its last \
                                 good record ({log_len} bytes) failed too: {cut}",
                                path.display()
                            ));
                        }
                    }
                    failing = true;
                    Err(e)
                }
            }
        };
        if let Some(why) = &read_only {
            tracing::error!(target: "demo::store", "{}", refused(why));
        }
        if res.is_ok() {
            failing = false;
            let mut m = map.write().unwrap_or_else(|p| p.into_inner());
            for c in &batch {
                if let Cmd::Put { key, value, .. } = c {
                    m.insert(key.clone(), value.clone());
                }
            }
            log_len += buf.len() as u64;
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
        // After the acknowledgements: compaction never delays a reply.
        if read_only.is_none() && log_len >= next_check {
            let m = map.read().unwrap_or_else(|p| p.into_inner());
            let live = live_bytes(&m);
            if worth_compacting(log_len, live) {
                let dir = path.parent().unwrap_or(Path::new("."));
                let compacted = compact(dir, path, &m).and_then(|()| {
                    file.reopen(path).map_err(|source| CompactError {
                        renamed: true,
                        source,
                    })
                });
                match compacted {
                    Ok(()) => {
                        tracing::info!(target: "demo::store", before = log_len, after = live, "compacted the log");
                        log_len = live;
                    }
                    // The old log is intact and still ours: keep appending.
                    Err(e) if !e.renamed => {
                        tracing::warn!(target: "demo::store", error = %e.source, "compacting the log failed")
                    }
                    Err(e) => {
                        let why = format!(
                            "compacting {} failed after the new log took its name: {}",
                            path.display(),
                            e.source
                        );
                        tracing::error!(target: "demo::store", "{}", refused(&why));
                        read_only = Some(why);
                    }
                }
            }
            next_check = (log_len * 2).max(1 << 20);
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

/// A failed [`compact`], and whether the new log had already replaced the
/// old one (then appends to the old descriptor would be lost).
#[derive(Debug)]
struct CompactError {
    renamed: bool,
    source: io::Error,
}

impl From<CompactError> for io::Error {
    fn from(e: CompactError) -> io::Error {
        e.source
    }
}

/// Rewrites the log with only live records (temp file, fsync, rename,
/// fsync dir), so a crash mid-compaction leaves the old log intact. A
/// failure before the rename removes the temp file: on a full disk it
/// would only make things worse. The caller opens the new log.
fn compact(dir: &Path, path: &Path, map: &HashMap<String, Arc<[u8]>>) -> Result<(), CompactError> {
    let tmp = dir.join(format!(".{LOG_FILE}.compact"));
    let before = |source| CompactError {
        renamed: false,
        source,
    };
    let after = |source| CompactError {
        renamed: true,
        source,
    };
    // Only the lock holder compacts, so an existing temp file is one a
    // crash left: remove it (a planted link goes, not its target) and
    // create a new one.
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(before(e)),
        _ => {}
    }
    let mut f =
        open_private(OpenOptions::new().write(true).create_new(true), &tmp).map_err(before)?;
    let written = (|| {
        let mut w = io::BufWriter::new(&mut f);
        for (k, v) in map {
            w.write_all(&encode(k, v))?;
        }
        w.flush()?;
        drop(w);
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(before(e));
    }
    File::open(dir).and_then(|d| d.sync_all()).map_err(after)
}

/// Opens the log for appending after a compaction replaced it.
fn open_log(path: &Path) -> io::Result<File> {
    open_private(OpenOptions::new().read(true).append(true), path)
}

/// Opens the log (or the compaction's temp file) as `opts` says, created
/// 0600 and never through a symlink, refusing another user's file: anyone
/// who can read `kv.log` reads every value (see `handoff::private_fs`).
fn open_private(opts: &mut OpenOptions, path: &Path) -> io::Result<File> {
    handoff::private_fs::open_file(opts, path).map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Linux's numbers (the demo does not depend on libc for two constants).
    const EIO: i32 = 5;
    const ENOSPC: i32 = 28;

    /// Faults to inject into the next operations of a [`Faulty`] log, each
    /// used once.
    #[derive(Default)]
    struct Faults {
        /// The next append stops after this many bytes, then fails with
        /// this errno — what a filling disk does (a short write, then
        /// ENOSPC).
        short_write: Option<(usize, i32)>,
        /// The next fsync fails with this errno.
        sync: Option<i32>,
        /// The next cut back fails with this errno.
        cut_back: Option<i32>,
        /// The next reopen (after a compaction) fails with this errno.
        reopen: Option<i32>,
    }

    /// The real log file, failing where [`Faults`] says.
    struct Faulty {
        file: File,
        faults: Arc<Mutex<Faults>>,
        /// The error owed after a short write.
        owed: Option<i32>,
    }

    impl Faulty {
        fn faults(&self) -> std::sync::MutexGuard<'_, Faults> {
            self.faults.lock().unwrap()
        }
    }

    impl Write for Faulty {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if let Some(errno) = self.owed.take() {
                return Err(io::Error::from_raw_os_error(errno));
            }
            let short = self.faults().short_write.take();
            match short {
                Some((n, errno)) => {
                    let n = n.min(buf.len());
                    self.file.write_all(&buf[..n])?;
                    self.owed = Some(errno);
                    if n == 0 {
                        return Err(io::Error::from_raw_os_error(errno));
                    }
                    Ok(n)
                }
                None => self.file.write(buf),
            }
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl LogFile for Faulty {
        fn sync_data(&mut self) -> io::Result<()> {
            let fault = self.faults().sync.take();
            match fault {
                Some(errno) => Err(io::Error::from_raw_os_error(errno)),
                None => self.file.sync_data(),
            }
        }

        fn cut_back(&mut self, len: u64) -> io::Result<()> {
            let fault = self.faults().cut_back.take();
            match fault {
                Some(errno) => Err(io::Error::from_raw_os_error(errno)),
                None => self.file.cut_back(len),
            }
        }

        fn reopen(&mut self, path: &Path) -> io::Result<()> {
            let fault = self.faults().reopen.take();
            match fault {
                Some(errno) => Err(io::Error::from_raw_os_error(errno)),
                None => self.file.reopen(path),
            }
        }
    }

    /// A new store in `dir` whose log fails as `faults` says.
    fn faulty_store(dir: &Path) -> (Store, Arc<Mutex<Faults>>) {
        let faults = Arc::new(Mutex::new(Faults::default()));
        let path = dir.join(LOG_FILE);
        let file = open_private(
            OpenOptions::new().read(true).append(true).create(true),
            &path,
        )
        .unwrap();
        let f = faults.clone();
        let store = Store::start_with(file, HashMap::new(), path, move |file| Faulty {
            file,
            faults: f,
            owed: None,
        })
        .unwrap();
        (store, faults)
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
    }

    /// Issue 14, item 1: a disk-full append leaves torn bytes; the next
    /// PUT is acknowledged; it must survive the next open (an upgrade or a
    /// restart replays the log).
    #[test]
    fn an_acknowledged_put_after_a_disk_full_append_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let rt = rt();
        let (s, faults) = faulty_store(dir.path());
        rt.block_on(s.put("before".into(), b"1".to_vec())).unwrap();
        faults.lock().unwrap().short_write = Some((100, ENOSPC));
        let e = rt
            .block_on(s.put("big".into(), vec![7; 500_000]))
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::StorageFull, "{e}");
        assert_eq!(s.get("big"), None);
        // Space again: acknowledged, so it must be there after reopening.
        rt.block_on(s.put("after".into(), b"2".to_vec())).unwrap();
        assert_eq!(&*s.get("after").unwrap(), b"2");
        s.seal().unwrap();
        let log = std::fs::read(dir.path().join(LOG_FILE)).unwrap();
        let mut want = encode("before", b"1");
        want.extend(encode("after", b"2"));
        assert!(
            log == want,
            "the log is {} bytes, {} expected: torn bytes were left in it",
            log.len(),
            want.len()
        );
        let again = Store::open(dir.path()).unwrap();
        assert_eq!(&*again.get("before").unwrap(), b"1");
        assert_eq!(&*again.get("after").unwrap(), b"2");
        assert_eq!(again.len(), 2);
    }

    /// After a failed fsync nothing later can be vouched for: the store
    /// refuses writes, saying why and how to get out, and keeps reading.
    #[test]
    fn a_failed_fsync_makes_the_store_read_only_until_reopened() {
        let dir = tempfile::tempdir().unwrap();
        let rt = rt();
        let (s, faults) = faulty_store(dir.path());
        rt.block_on(s.put("a".into(), b"1".to_vec())).unwrap();
        faults.lock().unwrap().sync = Some(EIO);
        let e = rt.block_on(s.put("b".into(), b"2".to_vec())).unwrap_err();
        assert!(e.to_string().contains("Input/output error"), "{e}");
        // The fault is gone, but the store no longer trusts the log.
        for key in ["c", "b"] {
            let e = rt.block_on(s.put(key.into(), b"3".to_vec())).unwrap_err();
            let msg = e.to_string();
            assert!(
                msg.contains("read-only after a failed write")
                    && msg.contains("Input/output error")
                    && msg.contains("restart or upgrade"),
                "{msg}"
            );
        }
        assert_eq!(&*s.get("a").unwrap(), b"1");
        assert_eq!(s.get("b"), None);
        assert_eq!(s.get("c"), None);
        // The seal still succeeds, so that an upgrade can take over.
        s.flush_blocking().unwrap();
        s.seal().unwrap();
        // The refused record was cut off: it does not come back either.
        let again = Store::open(dir.path()).unwrap();
        assert_eq!(&*again.get("a").unwrap(), b"1");
        assert_eq!(again.len(), 1);
        rt.block_on(again.put("d".into(), b"4".to_vec())).unwrap();
    }

    /// A failed append that cannot be cut back leaves torn bytes: nothing
    /// may be appended after them, so the store turns read-only.
    #[test]
    fn a_failed_cut_back_makes_the_store_read_only() {
        let dir = tempfile::tempdir().unwrap();
        let rt = rt();
        let (s, faults) = faulty_store(dir.path());
        rt.block_on(s.put("a".into(), b"1".to_vec())).unwrap();
        {
            let mut f = faults.lock().unwrap();
            f.short_write = Some((5, ENOSPC));
            f.cut_back = Some(EIO);
        }
        let e = rt
            .block_on(s.put("torn".into(), vec![1; 1000]))
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::StorageFull, "{e}");
        let e = rt.block_on(s.put("b".into(), b"2".to_vec())).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("read-only after a failed write")
                && msg.contains("No space left on device")
                && msg.contains("Input/output error"),
            "{msg}"
        );
        assert_eq!(&*s.get("a").unwrap(), b"1");
        s.seal().unwrap();
        let again = Store::open(dir.path()).unwrap();
        assert_eq!(&*again.get("a").unwrap(), b"1");
        assert_eq!(again.len(), 1);
    }

    #[test]
    fn replay_stops_at_torn_or_corrupt_tail() {
        let mut log = encode("a", b"1");
        log.extend(encode("b", b"22"));
        let good = log.len();
        log.extend(&encode("c", b"333")[..5]);
        let (m, valid) = replay(&log);
        assert_eq!(valid, good);
        assert_eq!(m.len(), 2);
        let mut bad = encode("a", b"1");
        let n = bad.len();
        bad[n - 1] ^= 1;
        assert_eq!(replay(&bad).1, 0);
    }

    /// A compaction that fails after the new log took the name (here its
    /// reopen, as under EMFILE) must not leave the writer appending to the
    /// old, unlinked file: those acknowledged writes would be gone at the
    /// next open. The store turns read-only instead.
    #[test]
    fn a_compaction_that_fails_after_its_rename_makes_the_store_read_only() {
        const EMFILE: i32 = 24;
        let dir = tempfile::tempdir().unwrap();
        let rt = rt();
        let (s, faults) = faulty_store(dir.path());
        faults.lock().unwrap().reopen = Some(EMFILE);
        // Overwrites of one key: past 1 MiB the log is worth compacting.
        let mut acked = None;
        let mut refused = None;
        rt.block_on(async {
            for i in 0..3000u32 {
                match s.put("k".into(), vec![(i % 251) as u8; 1000]).await {
                    Ok(()) => acked = Some(i),
                    Err(e) => {
                        refused = Some(e.to_string());
                        break;
                    }
                }
            }
        });
        let refused = refused.expect("every PUT was acknowledged");
        assert!(
            refused.contains("read-only after a failed write")
                && refused.contains("after the new log took its name")
                && refused.contains("Too many open files"),
            "{refused}"
        );
        let acked = acked.expect("no PUT was acknowledged");
        s.seal().unwrap();
        let again = Store::open(dir.path()).unwrap();
        assert_eq!(
            &*again.get("k").unwrap(),
            &[(acked % 251) as u8; 1000][..],
            "the last acknowledged value"
        );
    }

    #[test]
    fn preload_then_finish_sees_everything_written_in_between() {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let a = Store::open(dir.path()).unwrap();
        rt.block_on(a.put("before".into(), b"1".to_vec())).unwrap();
        let pre = Store::preload(dir.path()).unwrap();
        rt.block_on(a.put("after".into(), b"2".to_vec())).unwrap();
        rt.block_on(a.put("before".into(), b"3".to_vec())).unwrap();
        a.seal().unwrap();
        // A torn record at the tail, as after a crash mid-append.
        {
            let mut f = OpenOptions::new()
                .append(true)
                .open(dir.path().join(LOG_FILE))
                .unwrap();
            f.write_all(&encode("torn", b"xxxx")[..6]).unwrap();
        }
        let b = pre.finish().unwrap();
        let m = b.snapshot();
        assert_eq!(m.len(), 2);
        assert_eq!(&*m["before"], b"3");
        assert_eq!(&*m["after"], b"2");
        // And the torn tail is gone, so new appends are replayable.
        rt.block_on(b.put("new".into(), b"4".to_vec())).unwrap();
        b.seal().unwrap();
        assert_eq!(Store::open(dir.path()).unwrap().snapshot().len(), 3);
    }

    #[test]
    fn finish_falls_back_when_the_log_was_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let a = Store::open(dir.path()).unwrap();
        rt.block_on(a.put("k".into(), b"1".to_vec())).unwrap();
        a.seal().unwrap();
        let pre = Store::preload(dir.path()).unwrap();
        // Replaced under us (as compaction does).
        let map: HashMap<String, Arc<[u8]>> = [("k".to_string(), Arc::from(&b"2"[..]))].into();
        compact(dir.path(), &dir.path().join(LOG_FILE), &map).unwrap();
        assert_eq!(&*pre.finish().unwrap().get("k").unwrap(), b"2");
    }

    #[test]
    fn a_long_running_writer_compacts_its_own_log() {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let s = Store::open(dir.path()).unwrap();
        let log = dir.path().join(LOG_FILE);
        let inode = |p: &Path| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).unwrap());
        // Held open, the original log keeps its inode number allocated: a
        // compacted log created later cannot be given the same number (it
        // was, once in CI, after two compactions freed and reused it).
        let original = std::fs::File::open(&log).unwrap();
        let first = std::os::unix::fs::MetadataExt::ino(&original.metadata().unwrap());
        // 8 MB of overwrites of one 1 KB key: without compaction the log
        // would hold all of it.
        rt.block_on(async {
            for i in 0..8000u32 {
                s.put("k".into(), vec![(i % 251) as u8; 1000])
                    .await
                    .unwrap();
            }
        });
        s.flush_blocking().unwrap();
        let len = std::fs::metadata(&log).unwrap().len();
        assert!(len < 3 << 20, "log is {len} bytes after 8 MB of overwrites");
        assert_ne!(inode(&log), first, "the log was rewritten");
        drop(original);
        // Appends after a compaction land in the new file, durably.
        rt.block_on(s.put("after".into(), b"y".to_vec())).unwrap();
        s.seal().unwrap();
        let again = Store::open(dir.path()).unwrap();
        assert_eq!(&*again.get("k").unwrap(), &[(7999 % 251) as u8; 1000][..]);
        assert_eq!(&*again.get("after").unwrap(), b"y");
        assert_eq!(again.len(), 2);
    }

    #[test]
    fn durable_across_reopen_and_compaction() {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        // A log left by a writer that never compacted (an older build, or
        // one that crashed first): 3 MB, one live 1 KB value.
        {
            let mut raw = Vec::new();
            for i in 0..3000 {
                raw.extend_from_slice(&encode("k", &[i as u8; 1000]));
            }
            std::fs::write(dir.path().join(LOG_FILE), raw).unwrap();
        }
        {
            let s = Store::open(dir.path()).unwrap();
            rt.block_on(s.put("other".into(), b"x".to_vec())).unwrap();
            s.seal().unwrap();
            assert!(rt.block_on(s.put("z".into(), vec![])).is_err());
        }
        let after = std::fs::metadata(dir.path().join(LOG_FILE)).unwrap().len();
        assert!(after < 3_000_000 / 100, "3 MB -> {after}");
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(&*s.get("k").unwrap(), &[(2999 % 256) as u8; 1000][..]);
        assert_eq!(&*s.get("other").unwrap(), b"x");
        assert_eq!(s.len(), 2);
    }
}
