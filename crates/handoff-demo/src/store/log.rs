//! The log's records: how one is laid out, written, checked and replayed,
//! and the private files the store keeps.
//!
//! A record is `[u32 body length][u32 crc32c of the body][u16 key length]
//! [key][value]`, little-endian. The crc and the length let replay stop at
//! (and the owner truncate) a record torn by a crash mid-append: such a
//! record was never acknowledged.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::Path;

pub const LOG_FILE: &str = "kv.log";
pub const MAX_KEY: usize = 512;
pub const MAX_VALUE: usize = 1 << 20;
/// Record header: total length of what follows (u32), crc32c of it (u32).
pub(super) const HEADER: usize = 8;

/// The bytes of one record for `key` = `value`.
#[cfg(test)]
pub(super) fn encode(key: &str, value: &[u8]) -> Vec<u8> {
    let mut rec = Vec::with_capacity(record_len(key, value.len()) as usize);
    encode_into(&mut rec, key, value);
    rec
}

/// Appends the record for `key` = `value` to `buf`.
pub(super) fn encode_into(buf: &mut Vec<u8>, key: &str, value: &[u8]) {
    let start = buf.len();
    let body_len = 2 + key.len() + value.len();
    buf.extend_from_slice(&(body_len as u32).to_le_bytes());
    buf.extend_from_slice(&[0; 4]);
    buf.extend_from_slice(&(key.len() as u16).to_le_bytes());
    buf.extend_from_slice(key.as_bytes());
    buf.extend_from_slice(value);
    let crc = crc32c::crc32c(&buf[start + HEADER..]);
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// Bytes a record of this key and value takes in the log.
pub(super) fn record_len(key: &str, value_len: usize) -> u64 {
    (HEADER + 2 + key.len() + value_len) as u64
}

/// One record, checked.
#[derive(Debug)]
pub(super) struct Record<'a> {
    pub(super) key: &'a str,
    pub(super) value: &'a [u8],
    /// Its whole length in the log, header included.
    pub(super) len: usize,
}

/// What the header at the start of `buf` says the record's whole length
/// is; `None` if `buf` is shorter than a header or the length is out of
/// bounds (a torn or corrupt record).
pub(super) fn header_len(buf: &[u8]) -> Option<usize> {
    let len = u32::from_le_bytes(buf.get(0..4)?.try_into().ok()?) as usize;
    (2..=2 + MAX_KEY + MAX_VALUE)
        .contains(&len)
        .then_some(HEADER + len)
}

/// The record at the start of `buf`, if it is whole and checks out.
pub(super) fn parse(buf: &[u8]) -> Option<Record<'_>> {
    let len = header_len(buf)?;
    let crc = u32::from_le_bytes(buf.get(4..8)?.try_into().ok()?);
    let body = buf.get(HEADER..len)?;
    if crc32c::crc32c(body) != crc {
        return None;
    }
    let klen = u16::from_le_bytes([body[0], body[1]]) as usize;
    if klen > MAX_KEY || 2 + klen > body.len() {
        return None;
    }
    let key = std::str::from_utf8(&body[2..2 + klen]).ok()?;
    Some(Record {
        key,
        value: &body[2 + klen..],
        len,
    })
}

/// Calls `f(offset in buf, record)` for each whole, checked record from the
/// start of `buf`; returns the length of that valid prefix.
#[cfg(test)]
pub(super) fn replay(buf: &[u8], mut f: impl FnMut(usize, Record<'_>)) -> usize {
    let mut off = 0;
    while let Some(r) = parse(&buf[off..]) {
        let len = r.len;
        f(off, r);
        off += len;
    }
    off
}

/// Streams the records of `file` from offset `from` (the start of a
/// record) to `to` or its end if sooner, calling `f(offset, record)` for each whole,
/// checked one; returns the offset where the good records end (a torn or
/// corrupt record, or the end of the file). Reads in chunks of a few MiB,
/// so a log of any size is scanned in bounded memory.
///
/// A bound matters while another process appends: a catch-up round reads
/// up to the length the file had when the round began, or it would chase
/// a busy writer for as long as the writer keeps ahead.
pub(super) fn scan(
    file: &File,
    from: u64,
    to: u64,
    mut f: impl FnMut(u64, Record<'_>),
) -> io::Result<u64> {
    // Reads start small and double up to a few MiB: a catch-up round or
    // the tail read after Begin — inside the accept gap — is usually a few
    // KiB, and zeroing a buffer of megabytes for it cost milliseconds.
    const FIRST: usize = 64 << 10;
    const MAX: usize = 8 << 20;
    let mut chunk = FIRST;
    // `buf` holds the file's bytes from `at`.
    let mut buf: Vec<u8> = Vec::new();
    let mut at = from;
    loop {
        let have = buf.len();
        let pos = at + have as u64;
        let want = (chunk as u64).min(to.saturating_sub(pos)) as usize;
        buf.resize(have + want, 0);
        let n = read_at(file, &mut buf[have..], pos)?;
        buf.truncate(have + n);
        let mut used = 0;
        while let Some(r) = parse(&buf[used..]) {
            let len = r.len;
            f(at + used as u64, r);
            used += len;
        }
        if n == 0 {
            return Ok(at + used as u64);
        }
        // A record that cannot be whole even with more bytes: corrupt.
        match header_len(&buf[used..]) {
            Some(len) if buf.len() - used >= len => return Ok(at + used as u64),
            None if buf.len() - used >= HEADER => return Ok(at + used as u64),
            _ => {}
        }
        buf.drain(..used);
        at += used as u64;
        chunk = (chunk * 2).min(MAX);
    }
}

/// Reads exactly `buf.len()` bytes at `off`, or fewer at the end of the
/// file (returns how many).
pub(super) fn read_at(file: &File, buf: &mut [u8], off: u64) -> io::Result<usize> {
    use std::os::unix::fs::FileExt;
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], off + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Reads the whole record at `off` of `file` (which holds whole records up
/// to at least `end`): one read of a few hundred bytes for the usual
/// small record, a second one for a large value.
pub(super) fn read_record(file: &File, off: u64, end: u64) -> io::Result<Vec<u8>> {
    const FIRST: u64 = 512;
    let corrupt = || {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("the index points at offset {off} of the log, where no good record is"),
        )
    };
    let mut buf = vec![0; FIRST.min(end.saturating_sub(off)) as usize];
    let n = read_at(file, &mut buf, off)?;
    buf.truncate(n);
    let len = header_len(&buf).ok_or_else(corrupt)?;
    if len > buf.len() {
        buf.resize(len, 0);
        let got = read_at(file, &mut buf[n..], off + n as u64)?;
        if n + got < len {
            return Err(corrupt());
        }
    }
    buf.truncate(len);
    if parse(&buf).is_none() {
        return Err(corrupt());
    }
    Ok(buf)
}

/// (device, inode): tells whether a file was replaced (the log by a
/// compaction) between two looks.
pub(super) fn identity(m: &std::fs::Metadata) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    (m.dev(), m.ino())
}

/// Opens the log for appending (and reading).
pub(super) fn open_log(path: &Path) -> io::Result<File> {
    open_private(OpenOptions::new().read(true).append(true), path)
}

/// Opens one of the store's files as `opts` says, created 0600 and never
/// through a symlink, refusing another user's file: anyone who can read
/// `kv.log` reads every value (see `handoff::private_fs`).
pub(super) fn open_private(opts: &mut OpenOptions, path: &Path) -> io::Result<File> {
    handoff::private_fs::open_file(opts, path).map_err(io::Error::from)
}

/// Makes a rename in `dir` durable.
pub(super) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir).and_then(|d| d.sync_all())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_stops_at_torn_or_corrupt_tail() {
        let mut log = encode("a", b"1");
        log.extend(encode("b", b"22"));
        let good = log.len();
        log.extend(&encode("c", b"333")[..5]);
        let mut seen = vec![];
        let valid = replay(&log, |off, r| seen.push((off, r.key.to_owned())));
        assert_eq!(valid, good);
        assert_eq!(seen, [(0, "a".to_owned()), (12, "b".to_owned())]);
        let mut bad = encode("a", b"1");
        let n = bad.len();
        bad[n - 1] ^= 1;
        assert_eq!(replay(&bad, |_, _| {}), 0);
    }

    #[test]
    fn a_scan_crosses_chunk_boundaries_and_stops_at_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let mut log = Vec::new();
        let mut want = Vec::new();
        // ~12 MiB: more than one chunk, with records straddling the edge.
        for i in 0..3000 {
            want.push((log.len() as u64, format!("k{i}")));
            encode_into(&mut log, &format!("k{i}"), &vec![i as u8; 4000 + i]);
        }
        let good = log.len() as u64;
        log.extend(&encode("torn", b"xyz")[..9]);
        std::fs::write(&path, &log).unwrap();
        let f = File::open(&path).unwrap();
        let mut seen = vec![];
        let end = scan(&f, 0, u64::MAX, |off, r| seen.push((off, r.key.to_owned()))).unwrap();
        assert_eq!(end, good);
        assert_eq!(seen, want);
        // From the middle: only what follows.
        let mut n = 0;
        assert_eq!(
            scan(&f, want[2999].0, u64::MAX, |_, _| n += 1).unwrap(),
            good
        );
        assert_eq!(n, 1);
        // Up to a bound: a record cut by it is left for later.
        let mut n = 0;
        let to = want[10].0 + 5;
        assert_eq!(scan(&f, 0, to, |_, _| n += 1).unwrap(), want[10].0);
        assert_eq!(n, 10);
    }

    #[test]
    fn a_record_is_read_back_whole_however_large() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let mut log = encode("small", b"v");
        let big_at = log.len() as u64;
        log.extend(encode("big", &vec![9; 100_000]));
        std::fs::write(&path, &log).unwrap();
        let f = File::open(&path).unwrap();
        let end = log.len() as u64;
        let r = read_record(&f, 0, end).unwrap();
        assert_eq!(parse(&r).unwrap().key, "small");
        let r = read_record(&f, big_at, end).unwrap();
        let rec = parse(&r).unwrap();
        assert_eq!((rec.key, rec.value.len()), ("big", 100_000));
        let e = read_record(&f, 3, end).unwrap_err();
        assert!(e.to_string().contains("offset 3"), "{e}");
    }
}
