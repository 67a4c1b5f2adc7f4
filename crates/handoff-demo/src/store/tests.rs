//! The store's tests: storage faults, preload and catch-up, checkpoints
//! and compaction, each against real files in a temp dir.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};

use super::log::{encode, open_private};
use super::view::View;
use super::writer::{LogFile, Options};
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
    fn file(&self) -> &File {
        &self.file
    }

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
    let store = Store::start_with(
        file,
        View::default(),
        0,
        path,
        Options::new(false),
        move |file| Faulty {
            file,
            faults: f,
            owed: None,
        },
    )
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
    assert_eq!(s.get("big").unwrap(), None);
    // Space again: acknowledged, so it must be there after reopening.
    rt.block_on(s.put("after".into(), b"2".to_vec())).unwrap();
    assert_eq!(&*s.get("after").unwrap().unwrap(), b"2");
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
    assert_eq!(&*again.get("before").unwrap().unwrap(), b"1");
    assert_eq!(&*again.get("after").unwrap().unwrap(), b"2");
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
    assert_eq!(&*s.get("a").unwrap().unwrap(), b"1");
    assert_eq!(s.get("b").unwrap(), None);
    assert_eq!(s.get("c").unwrap(), None);
    // The seal still succeeds, so that an upgrade can take over.
    s.flush_blocking().unwrap();
    s.seal().unwrap();
    // The refused record was cut off: it does not come back either.
    let again = Store::open(dir.path()).unwrap();
    assert_eq!(&*again.get("a").unwrap().unwrap(), b"1");
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
    assert_eq!(&*s.get("a").unwrap().unwrap(), b"1");
    s.seal().unwrap();
    let again = Store::open(dir.path()).unwrap();
    assert_eq!(&*again.get("a").unwrap().unwrap(), b"1");
    assert_eq!(again.len(), 1);
}

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
        &*again.get("k").unwrap().unwrap(),
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
    compact::compact_map(dir.path(), &map).unwrap();
    assert_eq!(&*pre.finish().unwrap().get("k").unwrap().unwrap(), b"2");
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
    assert_eq!(
        &*again.get("k").unwrap().unwrap(),
        &[(7999 % 251) as u8; 1000][..]
    );
    assert_eq!(&*again.get("after").unwrap().unwrap(), b"y");
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
    assert_eq!(
        &*s.get("k").unwrap().unwrap(),
        &[(2999 % 256) as u8; 1000][..]
    );
    assert_eq!(&*s.get("other").unwrap().unwrap(), b"x");
    assert_eq!(s.len(), 2);
}

impl Store {
    /// [`Store::open`], checkpointing after `every` keys written.
    fn open_checkpointing(dir: &Path, every: usize) -> Store {
        let path = dir.join(LOG_FILE);
        let file = open_private(
            OpenOptions::new().read(true).append(true).create(true),
            &path,
        )
        .unwrap();
        let loaded = load(dir, &file).unwrap();
        let opts = Options {
            compact_now: true,
            checkpoint_every: every,
        };
        Store::start(file, loaded, path, opts).unwrap()
    }

    /// Keys held in memory (written since the checkpoint), and keys in the
    /// checkpoint.
    fn held(&self) -> (usize, u64) {
        let v = self.view.read().unwrap();
        (v.delta.len(), v.base.as_ref().map_or(0, |b| b.keys()))
    }

    /// Every key and value, as a reader sees them.
    fn snapshot(&self) -> HashMap<String, Arc<[u8]>> {
        let v = self.view.read().unwrap();
        let mut all = HashMap::new();
        if let Some(b) = &v.base {
            b.for_each(|k, val| {
                all.insert(k.to_owned(), Arc::from(val));
            })
            .unwrap();
        }
        for (k, d) in &v.delta {
            all.insert(k.clone(), d.value.clone());
        }
        all
    }

    fn len(&self) -> usize {
        self.snapshot().len()
    }
}

/// Polls `f` until it holds, for at most 10 s.
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !f() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Issue 18: past the threshold the writer checkpoints in the background;
/// a reopen then reads the index and only the records after it, and every
/// value — checkpointed, overwritten since, or new — reads back.
#[test]
fn a_checkpoint_bounds_what_a_reopen_reads_and_holds() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let s = Store::open_checkpointing(dir.path(), 100);
    let mut want = HashMap::new();
    rt.block_on(async {
        for i in 0..1000u32 {
            let (k, v) = (format!("k{i}"), format!("v{i}").into_bytes());
            s.put(k.clone(), v.clone()).await.unwrap();
            want.insert(k, v);
        }
    });
    eventually("a checkpoint holds most keys", || s.held().1 >= 800);
    // Overwrites of checkpointed keys, and new keys, after it.
    rt.block_on(async {
        for i in (0..1000u32).step_by(97) {
            let (k, v) = (format!("k{i}"), format!("again{i}").into_bytes());
            s.put(k.clone(), v.clone()).await.unwrap();
            want.insert(k, v);
        }
        s.put("new".into(), b"n".to_vec()).await.unwrap();
        want.insert("new".into(), b"n".to_vec());
    });
    let check = |s: &Store| {
        for (k, v) in &want {
            assert_eq!(s.get(k).unwrap().as_deref(), Some(&v[..]), "{k}");
        }
        assert_eq!(s.get("absent").unwrap(), None);
        assert_eq!(s.len(), want.len());
    };
    check(&s);
    let (held, _) = s.held();
    assert!(held < 200, "{held} keys held in memory");
    s.seal().unwrap();
    assert!(dir.path().join(index::INDEX_FILE).exists());
    // A reopen reads the index and a short tail.
    let again = Store::open(dir.path()).unwrap();
    let (held, indexed) = again.held();
    assert!(
        held < 200 && indexed >= 800,
        "held {held}, indexed {indexed}"
    );
    check(&again);
    // So does a preload.
    again.seal().unwrap();
    let pre = Store::preload(dir.path()).unwrap();
    assert!(pre.view.delta.len() < 200);
    check(&pre.finish().unwrap());
}

/// Pre-copy catch-up: each round reads exactly what the incumbent appended
/// since the previous one; a round with nothing new reads nothing; finish
/// sees everything, including the last writes before the seal.
#[test]
fn catch_up_rounds_read_what_the_incumbent_appends_meanwhile() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let a = Store::open(dir.path()).unwrap();
    rt.block_on(a.put("first".into(), b"1".to_vec())).unwrap();
    let mut pre = Store::preload(dir.path()).unwrap();
    assert_eq!(pre.catch_up().unwrap(), (0, 0));
    rt.block_on(async {
        for i in 0..50u32 {
            a.put(format!("k{i}"), vec![i as u8; 10]).await.unwrap();
        }
    });
    let (records, bytes) = pre.catch_up().unwrap();
    assert_eq!(records, 50);
    assert_eq!(bytes, 50 * log::record_len("k10", 10) - 10);
    assert_eq!(pre.catch_up().unwrap(), (0, 0));
    rt.block_on(a.put("last".into(), b"L".to_vec())).unwrap();
    a.seal().unwrap();
    let b = pre.finish().unwrap();
    assert_eq!(b.len(), 52);
    assert_eq!(b.get("last").unwrap().as_deref(), Some(&b"L"[..]));
    assert_eq!(b.get("k49").unwrap().as_deref(), Some(&[49u8; 10][..]));
}

/// A round that finds the log replaced (the incumbent compacted it) reads
/// the new one whole, and says so in its count.
#[test]
fn a_catch_up_round_after_a_compaction_reads_the_new_log_whole() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let a = Store::open(dir.path()).unwrap();
    rt.block_on(a.put("k".into(), b"1".to_vec())).unwrap();
    a.seal().unwrap();
    let mut pre = Store::preload(dir.path()).unwrap();
    let map: HashMap<String, Arc<[u8]>> = [
        ("k".to_string(), Arc::from(&b"2"[..])),
        ("j".to_string(), Arc::from(&b"3"[..])),
    ]
    .into();
    compact::compact_map(dir.path(), &map).unwrap();
    let (records, _) = pre.catch_up().unwrap();
    assert_eq!(records, 2);
    let b = pre.finish().unwrap();
    assert_eq!(b.get("k").unwrap().as_deref(), Some(&b"2"[..]));
    assert_eq!(b.get("j").unwrap().as_deref(), Some(&b"3"[..]));
}

/// Compaction with a checkpoint in place: it keeps each key's latest
/// record whether the index or the delta points at it, and writes the new
/// log's own index.
#[test]
fn compaction_keeps_the_latest_of_checkpointed_and_recent_keys() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let s = Store::open_checkpointing(dir.path(), 50);
    let mut want = HashMap::new();
    rt.block_on(async {
        // 20 keys overwritten 300 times with 1 KB: past 1 MiB, mostly dead.
        for round in 0..300u32 {
            for k in 0..20u32 {
                let v = vec![(round % 251) as u8; 1000];
                s.put(format!("k{k}"), v.clone()).await.unwrap();
                want.insert(format!("k{k}"), v);
            }
        }
    });
    eventually("the log is compacted", || {
        std::fs::metadata(dir.path().join(LOG_FILE)).unwrap().len() < 1 << 20
    });
    rt.block_on(s.put("after".into(), b"a".to_vec())).unwrap();
    want.insert("after".into(), b"a".to_vec());
    for (k, v) in &want {
        assert_eq!(s.get(k).unwrap().as_deref(), Some(&v[..]), "{k}");
    }
    s.seal().unwrap();
    let again = Store::open(dir.path()).unwrap();
    assert!(again.held().1 > 0, "the compacted log has an index");
    for (k, v) in &want {
        assert_eq!(again.get(k).unwrap().as_deref(), Some(&v[..]), "{k}");
    }
    assert_eq!(again.len(), want.len());
}

#[test]
fn the_writer_is_running_until_the_seal() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path()).unwrap();
    s.writer_running().unwrap();
    rt().block_on(s.put("k".into(), b"v".to_vec())).unwrap();
    s.writer_running().unwrap();
    s.seal().unwrap();
    let e = s.writer_running().unwrap_err();
    assert!(e.to_string().contains("sealed"), "{e}");
}
