//! The checkpoint: an index file (`kv.idx`) beside the log that maps every
//! key to the offset of its latest record in the log's first `covered`
//! bytes.
//!
//! Why it exists (issue 18): without it, opening the store means replaying
//! the whole history of writes into memory — seconds per few million keys,
//! and a second full copy of the data in the new process's memory during
//! every upgrade. With it, a process opens the index, replays only the
//! records after `covered` into a small in-memory map, and reads older keys
//! from the files with `pread`: warm-up is bounded by what was written
//! since the last checkpoint, and both processes of a handoff share one
//! copy of the data, the kernel's page cache.
//!
//! Layout: a 64-byte header — magic, version, table size (2^bits), the log's
//! (device, inode), `covered`, keys, live bytes, the crc32c of the table
//! and of the header itself — then an open-addressing table of 2^bits u64
//! entries, linear probing. An entry is `tag << 36 | (offset + 1)`: 0 is
//! empty; the tag is the top 28 bits of the key's hash and the slot its
//! top `bits` bits, so a table can double without reading a single key.
//! Offsets are 36 bits: a log past 64 GiB is simply not checkpointed.
//!
//! An index is only ever an accelerator. One that does not check out — torn,
//! corrupt, written for another log (a compaction replaced it) or covering
//! more than the log holds — is ignored with a warning and the log is read
//! whole, as before it existed. It is written to a temp file, fsync'ed and
//! renamed into place, so a crash leaves the old one or the new one.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use super::log::{self, open_private, read_at, read_record, sync_dir};

pub const INDEX_FILE: &str = "kv.idx";
const MAGIC: &[u8; 8] = b"HOKVIDX1";
const VERSION: u32 = 1;
const HEADER_LEN: usize = 64;
const OFF_BITS: u32 = 36;
const TAG_BITS: u32 = 28;
const OFF_MASK: u64 = (1 << OFF_BITS) - 1;
/// The largest offset an entry can hold.
const MAX_OFF: u64 = OFF_MASK - 1;
const MIN_BITS: u32 = 10;
/// Bytes of table read or written at a time.
const CHUNK: usize = 4 << 20;
/// Past this load the table doubles.
const MAX_LOAD: (u64, u64) = (7, 10);

/// A stable hash: FNV-1a, then a finalizer that spreads it into the top
/// bits the slot and tag use. Stable across builds and Rust versions (the
/// std hasher is not), since two different builds share the file.
fn hash(key: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // murmur3's fmix64.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

fn tag_of(key: &str) -> u64 {
    hash(key) >> OFF_BITS
}

fn slot(tag: u64, bits: u32) -> usize {
    (tag >> (TAG_BITS - bits)) as usize
}

fn entry(tag: u64, off: u64) -> u64 {
    (tag << OFF_BITS) | (off + 1)
}

fn entry_tag(e: u64) -> u64 {
    e >> OFF_BITS
}

fn entry_off(e: u64) -> u64 {
    (e & OFF_MASK) - 1
}

/// The table size (in bits) for `keys` keys at most `MAX_LOAD` full.
fn bits_for(keys: u64) -> u32 {
    let want = keys.saturating_mul(MAX_LOAD.1) / MAX_LOAD.0 + 1;
    (64 - (want - 1).leading_zeros()).clamp(MIN_BITS, TAG_BITS)
}

/// A checkpoint, open: the index file and the log it covers, both read
/// with `pread` (no mapping: a log cut short under us is an error, never a
/// SIGBUS).
#[derive(Debug)]
pub(super) struct Index {
    file: File,
    log: File,
    log_id: (u64, u64),
    bits: u32,
    covered: u64,
    keys: u64,
    live: u64,
}

/// What the header says.
struct Header {
    bits: u32,
    log_id: (u64, u64),
    covered: u64,
    keys: u64,
    live: u64,
    table_crc: u32,
}

impl Header {
    fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..8].copy_from_slice(MAGIC);
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&self.bits.to_le_bytes());
        h[16..24].copy_from_slice(&self.log_id.0.to_le_bytes());
        h[24..32].copy_from_slice(&self.log_id.1.to_le_bytes());
        h[32..40].copy_from_slice(&self.covered.to_le_bytes());
        h[40..48].copy_from_slice(&self.keys.to_le_bytes());
        h[48..56].copy_from_slice(&self.live.to_le_bytes());
        h[56..60].copy_from_slice(&self.table_crc.to_le_bytes());
        let crc = crc32c::crc32c(&h[..60]);
        h[60..64].copy_from_slice(&crc.to_le_bytes());
        h
    }

    /// `Err` says why the header does not check out.
    fn decode(h: &[u8; HEADER_LEN]) -> Result<Header, String> {
        let u32_at = |i: usize| u32::from_le_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
        let u64_at = |i: usize| {
            let mut b = [0; 8];
            b.copy_from_slice(&h[i..i + 8]);
            u64::from_le_bytes(b)
        };
        if &h[0..8] != MAGIC {
            return Err("not an index file (bad magic)".into());
        }
        if crc32c::crc32c(&h[..60]) != u32_at(60) {
            return Err("its header fails its checksum".into());
        }
        if u32_at(8) != VERSION {
            return Err(format!(
                "version {} (this build reads {VERSION})",
                u32_at(8)
            ));
        }
        let bits = u32_at(12);
        if !(MIN_BITS..=TAG_BITS).contains(&bits) {
            return Err(format!("a table of 2^{bits} entries is out of bounds"));
        }
        Ok(Header {
            bits,
            log_id: (u64_at(16), u64_at(24)),
            covered: u64_at(32),
            keys: u64_at(40),
            live: u64_at(48),
            table_crc: u32_at(56),
        })
    }
}

impl Index {
    /// Opens `dir/kv.idx` if it is a checkpoint of `log` (whose identity and
    /// length are given) and checks out whole; `None` when there is none or
    /// it is not usable (the reason is logged: the caller reads the log
    /// whole instead). Reading the table for its checksum costs one pass
    /// over the file — tens of milliseconds for ten million keys, from the
    /// page cache — and is what makes a bad index harmless.
    pub(super) fn open(
        dir: &Path,
        log: &File,
        log_id: (u64, u64),
        log_len: u64,
    ) -> io::Result<Option<Index>> {
        let path = dir.join(INDEX_FILE);
        let file = match open_private(OpenOptions::new().read(true), &path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let unusable = |why: String| {
            tracing::warn!(target: "demo::store", path = %path.display(), "ignoring the index: {why}; reading the log whole");
            Ok(None)
        };
        let mut raw = [0u8; HEADER_LEN];
        if read_at(&file, &mut raw, 0)? < HEADER_LEN {
            return unusable("it is shorter than its header".into());
        }
        let h = match Header::decode(&raw) {
            Ok(h) => h,
            Err(why) => return unusable(why),
        };
        if h.log_id != log_id {
            return unusable("it was written for another log (replaced since)".into());
        }
        if h.covered > log_len {
            return unusable(format!(
                "it covers {} bytes of a log of {log_len}",
                h.covered
            ));
        }
        let table_len = 8u64 << h.bits;
        if file.metadata()?.len() != HEADER_LEN as u64 + table_len {
            return unusable("its table is not the size its header says".into());
        }
        let mut crc = 0;
        let mut buf = vec![0u8; CHUNK];
        let mut at = HEADER_LEN as u64;
        while at < HEADER_LEN as u64 + table_len {
            let want = buf.len().min((HEADER_LEN as u64 + table_len - at) as usize);
            let n = read_at(&file, &mut buf[..want], at)?;
            if n == 0 {
                return unusable("its table ends early".into());
            }
            crc = crc32c::crc32c_append(crc, &buf[..n]);
            at += n as u64;
        }
        if crc != h.table_crc {
            return unusable("its table fails its checksum".into());
        }
        Ok(Some(Index {
            file,
            log: log.try_clone()?,
            log_id,
            bits: h.bits,
            covered: h.covered,
            keys: h.keys,
            live: h.live,
        }))
    }

    /// The log bytes this index covers: records from here on are not in it.
    pub(super) fn covered(&self) -> u64 {
        self.covered
    }

    /// Keys in the index.
    pub(super) fn keys(&self) -> u64 {
        self.keys
    }

    /// Bytes the indexed keys' latest records take in the log.
    pub(super) fn live(&self) -> u64 {
        self.live
    }

    /// The (device, inode) of the log it covers.
    pub(super) fn log_id(&self) -> (u64, u64) {
        self.log_id
    }

    /// The value of `key` as of `covered`: two `pread`s as a rule (a group
    /// of table entries, the record).
    pub(super) fn get(&self, key: &str) -> io::Result<Option<Vec<u8>>> {
        let tag = tag_of(key);
        let size = 1usize << self.bits;
        let mut i = slot(tag, self.bits);
        let mut group = [0u8; 64];
        let mut seen = 0;
        while seen < size {
            let n = (size - i).min(8);
            read_exact_at(&self.file, &mut group[..n * 8], entry_pos(i))?;
            for k in 0..n {
                let e = u64::from_le_bytes(group[k * 8..k * 8 + 8].try_into().unwrap_or([0; 8]));
                if e == 0 {
                    return Ok(None);
                }
                if entry_tag(e) == tag {
                    let rec = read_record(&self.log, entry_off(e), self.covered)?;
                    if let Some(r) = log::parse(&rec) {
                        if r.key == key {
                            return Ok(Some(r.value.to_vec()));
                        }
                    }
                }
            }
            seen += n;
            i = (i + n) % size;
        }
        Ok(None)
    }

    /// The whole table in memory: what a new checkpoint starts from, and
    /// what a compaction asks [`Table::points_at`] of every record it reads.
    pub(super) fn table(&self) -> io::Result<Table> {
        // Read in chunks straight into the entries: the table alone is in
        // memory (8 bytes × 2^bits: 134 MB at 10 M keys), not a second
        // copy of its bytes besides.
        let size = 1usize << self.bits;
        let mut entries = Vec::with_capacity(size);
        let mut raw = vec![0u8; CHUNK.min(size * 8)];
        while entries.len() < size {
            let n = raw.len().min((size - entries.len()) * 8);
            read_exact_at(&self.file, &mut raw[..n], entry_pos(entries.len()))?;
            entries.extend(
                raw[..n]
                    .chunks_exact(8)
                    .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8]))),
            );
        }
        Ok(Table {
            entries,
            bits: self.bits,
            keys: self.keys,
            live: self.live,
        })
    }

    /// Calls `f(key, value)` for every key in the index (the tests' view
    /// of the whole store).
    #[cfg(test)]
    pub(super) fn for_each(&self, mut f: impl FnMut(&str, &[u8])) -> io::Result<()> {
        for e in self.table()?.entries.into_iter().filter(|&e| e != 0) {
            let rec = read_record(&self.log, entry_off(e), self.covered)?;
            if let Some(r) = log::parse(&rec) {
                f(r.key, r.value);
            }
        }
        Ok(())
    }
}

fn entry_pos(i: usize) -> u64 {
    HEADER_LEN as u64 + 8 * i as u64
}

fn read_exact_at(f: &File, buf: &mut [u8], off: u64) -> io::Result<()> {
    if read_at(f, buf, off)? < buf.len() {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("{INDEX_FILE} ends before offset {}", off + buf.len() as u64),
        ));
    }
    Ok(())
}

/// A table in memory, being built.
#[derive(Debug)]
pub(super) struct Table {
    entries: Vec<u64>,
    bits: u32,
    keys: u64,
    live: u64,
}

impl Table {
    /// An empty table for about `keys` keys.
    pub(super) fn with_capacity(keys: u64) -> Table {
        let bits = bits_for(keys);
        Table {
            entries: vec![0; 1 << bits],
            bits,
            keys: 0,
            live: 0,
        }
    }

    /// Doubles the table until `more` keys fit: entries move by their tag
    /// alone, no key is read.
    fn reserve(&mut self, more: u64) {
        let bits = bits_for(self.keys + more).max(self.bits);
        if bits == self.bits {
            return;
        }
        let old = std::mem::replace(&mut self.entries, vec![0; 1 << bits]);
        self.bits = bits;
        for e in old.into_iter().filter(|&e| e != 0) {
            let mut i = slot(entry_tag(e), bits);
            while self.entries[i] != 0 {
                i = (i + 1) & ((1 << bits) - 1);
            }
            self.entries[i] = e;
        }
    }

    /// Adds a key known not to be in the table yet (a compaction's output).
    pub(super) fn insert_new(&mut self, key: &str, off: u64, len: u64) {
        self.reserve(1);
        let tag = tag_of(key);
        let mask = (1 << self.bits) - 1;
        let mut i = slot(tag, self.bits);
        while self.entries[i] != 0 {
            i = (i + 1) & mask;
        }
        self.entries[i] = entry(tag, off);
        self.keys += 1;
        self.live += len;
    }

    /// Walks `tag`'s probe sequence: the first entry of the same tag that
    /// `is_it` accepts (`true`), or the empty slot that ends the sequence
    /// (`false`); with its position.
    fn find(
        &self,
        tag: u64,
        mut is_it: impl FnMut(u64) -> io::Result<bool>,
    ) -> io::Result<(usize, bool)> {
        let mask = (1 << self.bits) - 1;
        let mut i = slot(tag, self.bits);
        loop {
            let e = self.entries[i];
            if e == 0 {
                return Ok((i, false));
            }
            if entry_tag(e) == tag && is_it(e)? {
                return Ok((i, true));
            }
            i = (i + 1) & mask;
        }
    }

    /// Points `key` at its record at `off` (`len` bytes), replacing the
    /// entry of an older record of the same key: the key at an entry with
    /// the same tag is read from `log` to tell.
    pub(super) fn upsert(
        &mut self,
        log: &File,
        end: u64,
        key: &str,
        off: u64,
        len: u64,
    ) -> io::Result<()> {
        self.reserve(1);
        let tag = tag_of(key);
        let mut old_len = 0;
        let (i, found) = self.find(tag, |e| {
            let rec = read_record(log, entry_off(e), end)?;
            Ok(match log::parse(&rec) {
                Some(r) if r.key == key => {
                    old_len = r.len as u64;
                    true
                }
                _ => false,
            })
        })?;
        self.entries[i] = entry(tag, off);
        if found {
            self.live = self.live - old_len + len;
        } else {
            self.keys += 1;
            self.live += len;
        }
        Ok(())
    }

    /// Whether `key`'s entry points at `off`: the record there is its
    /// latest (a compaction keeps exactly those).
    pub(super) fn points_at(&self, key: &str, off: u64) -> bool {
        self.find(tag_of(key), |e| Ok(entry_off(e) == off))
            .is_ok_and(|(_, found)| found)
    }

    /// Writes the table as the checkpoint of `log` up to `covered`: a temp
    /// file in `dir`, fsync'ed, then — unless `cancelled()` says the store
    /// was sealed meanwhile; it is asked while `gate` is held, and the seal
    /// takes the same gate, so no rename happens after a seal returns —
    /// renamed to `kv.idx` and the directory fsync'ed.
    pub(super) fn persist(
        &self,
        dir: &Path,
        log: &File,
        covered: u64,
        gate: &std::sync::Mutex<bool>,
    ) -> io::Result<Index> {
        if covered > MAX_OFF {
            return Err(io::Error::other(format!(
                "a log of {covered} bytes is past what an index can point into"
            )));
        }
        let log_id = log::identity(&log.metadata()?);
        let tmp = temp_path(dir);
        match std::fs::remove_file(&tmp) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let file = open_private(
            OpenOptions::new().read(true).write(true).create_new(true),
            &tmp,
        )?;
        let written = (|| {
            // The table streams out in chunks, its crc taken on the way;
            // the header, which carries the crc, is written last in front.
            use std::os::unix::fs::FileExt;
            let mut w = BufWriter::with_capacity(CHUNK, &file);
            w.write_all(&[0u8; HEADER_LEN])?;
            let mut crc = 0;
            let mut buf = Vec::with_capacity(CHUNK);
            for chunk in self.entries.chunks(CHUNK / 8) {
                buf.clear();
                for e in chunk {
                    buf.extend_from_slice(&e.to_le_bytes());
                }
                crc = crc32c::crc32c_append(crc, &buf);
                w.write_all(&buf)?;
            }
            w.flush()?;
            drop(w);
            let header = Header {
                bits: self.bits,
                log_id,
                covered,
                keys: self.keys,
                live: self.live,
                table_crc: crc,
            };
            file.write_all_at(&header.encode(), 0)?;
            file.sync_all()?;
            let sealed = gate.lock().unwrap_or_else(|p| p.into_inner());
            if *sealed {
                return Err(io::Error::new(
                    io::ErrorKind::Interrupted,
                    "the store was sealed: the next process writes its own",
                ));
            }
            std::fs::rename(&tmp, dir.join(INDEX_FILE))?;
            drop(sealed);
            sync_dir(dir)
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        Ok(Index {
            file,
            log: log.try_clone()?,
            log_id,
            bits: self.bits,
            covered,
            keys: self.keys,
            live: self.live,
        })
    }
}

/// This process's temp file for a new index: per process, so an old
/// build's checkpoint still being written never shares a file with the
/// new build's.
fn temp_path(dir: &Path) -> PathBuf {
    dir.join(format!(".{INDEX_FILE}.{}.tmp", std::process::id()))
}

/// Removes temp files a crashed or sealed process left (call holding the
/// state lock: any other writer has sealed).
pub(super) fn remove_stale_temps(dir: &Path) {
    let prefix = format!(".{INDEX_FILE}.");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(&prefix) && name.ends_with(".tmp") {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// A new checkpoint: the previous one's table (if any) with `delta` — the
/// latest records, at or after the previous checkpoint's `covered` and
/// before `covered`, of the keys written since: (key, offset, length) —
/// applied.
pub(super) fn checkpoint(
    dir: &Path,
    log: &File,
    covered: u64,
    old: Option<&Index>,
    delta: &[(String, u64, u64)],
    gate: &std::sync::Mutex<bool>,
) -> io::Result<Index> {
    let mut table = match old {
        Some(i) => i.table()?,
        None => Table::with_capacity(delta.len() as u64),
    };
    table.reserve(delta.len() as u64);
    for (key, off, len) in delta {
        table.upsert(log, covered, key, *off, *len)?;
    }
    table.persist(dir, log, covered, gate)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::log::encode;
    use std::sync::Mutex;

    fn log_with(dir: &Path, recs: &[(&str, &[u8])]) -> (File, Vec<(String, u64, u64)>) {
        let mut buf = Vec::new();
        let mut at = vec![];
        for (k, v) in recs {
            at.push((k.to_string(), buf.len() as u64, log::record_len(k, v.len())));
            buf.extend(encode(k, v));
        }
        let path = dir.join(log::LOG_FILE);
        std::fs::write(&path, &buf).unwrap();
        (File::open(&path).unwrap(), at)
    }

    /// The latest record of each key, as the store passes it.
    fn latest(at: &[(String, u64, u64)]) -> Vec<(String, u64, u64)> {
        let mut m = std::collections::BTreeMap::new();
        for (k, o, l) in at {
            m.insert(k.clone(), (*o, *l));
        }
        m.into_iter().map(|(k, (o, l))| (k, o, l)).collect()
    }

    #[test]
    fn a_checkpoint_finds_every_key_and_only_its_latest_value() {
        let dir = tempfile::tempdir().unwrap();
        let (log, at) = log_with(dir.path(), &[("a", b"1"), ("b", b"2"), ("a", b"3")]);
        let end = log.metadata().unwrap().len();
        let gate = Mutex::new(false);
        let idx = checkpoint(dir.path(), &log, end, None, &latest(&at), &gate).unwrap();
        assert_eq!(idx.get("a").unwrap().as_deref(), Some(&b"3"[..]));
        assert_eq!(idx.get("b").unwrap().as_deref(), Some(&b"2"[..]));
        assert_eq!(idx.get("c").unwrap(), None);
        assert_eq!(idx.keys(), 2);
        assert_eq!(idx.live(), at[1].2 + at[2].2);
        // Reopened from the file, it says the same.
        let id = log::identity(&log.metadata().unwrap());
        let again = Index::open(dir.path(), &log, id, end).unwrap().unwrap();
        assert_eq!(again.get("a").unwrap().as_deref(), Some(&b"3"[..]));
        assert_eq!(again.covered(), end);
    }

    #[test]
    fn a_second_checkpoint_builds_on_the_first_and_grows_the_table() {
        let dir = tempfile::tempdir().unwrap();
        let recs: Vec<(String, Vec<u8>)> = (0..5000)
            .map(|i| (format!("key-{i}"), format!("v{i}").into_bytes()))
            .collect();
        let refs: Vec<(&str, &[u8])> = recs.iter().map(|(k, v)| (k.as_str(), &v[..])).collect();
        let (log, at) = log_with(dir.path(), &refs);
        let gate = Mutex::new(false);
        let first = checkpoint(
            dir.path(),
            &log,
            at[100].1,
            None,
            &latest(&at[..100]),
            &gate,
        )
        .unwrap();
        assert_eq!(first.bits, MIN_BITS);
        let end = log.metadata().unwrap().len();
        let second = checkpoint(
            dir.path(),
            &log,
            end,
            Some(&first),
            &latest(&at[100..]),
            &gate,
        )
        .unwrap();
        assert!(second.bits > MIN_BITS, "grew to 2^{}", second.bits);
        assert_eq!(second.keys(), 5000);
        for (k, v) in &recs {
            assert_eq!(second.get(k).unwrap().as_deref(), Some(&v[..]), "{k}");
        }
        assert_eq!(second.get("key-5000").unwrap(), None);
    }

    #[test]
    fn an_index_that_does_not_check_out_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let (log, at) = log_with(dir.path(), &[("a", b"1")]);
        let end = log.metadata().unwrap().len();
        let id = log::identity(&log.metadata().unwrap());
        let gate = Mutex::new(false);
        checkpoint(dir.path(), &log, end, None, &latest(&at), &gate).unwrap();
        // Another log (as after a compaction), or a shorter one.
        assert!(Index::open(dir.path(), &log, (id.0, id.1 + 1), end)
            .unwrap()
            .is_none());
        assert!(Index::open(dir.path(), &log, id, end - 1)
            .unwrap()
            .is_none());
        assert!(Index::open(dir.path(), &log, id, end).unwrap().is_some());
        // A flipped bit in the table.
        let path = dir.path().join(INDEX_FILE);
        let mut raw = std::fs::read(&path).unwrap();
        raw[HEADER_LEN + 3] ^= 0x10;
        std::fs::write(&path, &raw).unwrap();
        assert!(Index::open(dir.path(), &log, id, end).unwrap().is_none());
        // Cut short.
        std::fs::write(&path, &raw[..HEADER_LEN + 8]).unwrap();
        assert!(Index::open(dir.path(), &log, id, end).unwrap().is_none());
        std::fs::write(&path, b"HOKV").unwrap();
        assert!(Index::open(dir.path(), &log, id, end).unwrap().is_none());
    }

    #[test]
    fn no_checkpoint_is_renamed_into_place_after_the_seal() {
        let dir = tempfile::tempdir().unwrap();
        let (log, at) = log_with(dir.path(), &[("a", b"1")]);
        let end = log.metadata().unwrap().len();
        let gate = Mutex::new(true);
        let e = checkpoint(dir.path(), &log, end, None, &latest(&at), &gate).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::Interrupted);
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(left, [log::LOG_FILE], "no index, no temp file left");
    }

    #[test]
    fn the_hash_is_stable() {
        // Two builds share the file: a change here must bump VERSION.
        assert_eq!(hash(""), 0xefd0_1f60_ba99_2926);
        assert_eq!(hash("key-1"), 0xa002_e14b_20bb_64ec);
    }
}
