//! An append-only log of `key = value` records, each
//! `[key len u32][value len u32][crc32c u32][key][value]` (little endian).
//! Opening replays it into memory and cuts a torn or corrupt tail — what a
//! crash in the middle of an append leaves — so the log always ends on a
//! whole record.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Largest key or value accepted (and believed when reading a length).
const MAX_LEN: usize = 1 << 20;

pub struct Log {
    file: File,
    map: HashMap<String, Vec<u8>>,
}

impl Log {
    pub fn open(path: &Path) -> io::Result<Log> {
        let mut file = OpenOptions::new()
            .mode(0o600) // the service's data: its owner's only
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        let mut map = HashMap::new();
        let mut at = 0;
        while let Some((key, value, next)) = record(&bytes, at) {
            map.insert(key, value);
            at = next;
        }
        if at < bytes.len() {
            // A torn tail: never acknowledged (the ack follows the sync).
            file.set_len(at as u64)?;
            file.sync_all()?;
        }
        file.seek(SeekFrom::End(0))?;
        Ok(Log { file, map })
    }

    pub fn get(&self, key: &str) -> Option<&[u8]> {
        self.map.get(key).map(Vec::as_slice)
    }

    /// Appends and syncs; only then is the write visible and acknowledged.
    pub fn put(&mut self, key: &str, value: &[u8]) -> io::Result<()> {
        if key.len() > MAX_LEN || value.len() > MAX_LEN {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "key or value over 1 MiB",
            ));
        }
        let mut rec = Vec::with_capacity(12 + key.len() + value.len());
        rec.extend_from_slice(&(key.len() as u32).to_le_bytes());
        rec.extend_from_slice(&(value.len() as u32).to_le_bytes());
        let crc = crc32c::crc32c_append(crc32c::crc32c(key.as_bytes()), value);
        rec.extend_from_slice(&crc.to_le_bytes());
        rec.extend_from_slice(key.as_bytes());
        rec.extend_from_slice(value);
        self.file.write_all(&rec)?;
        self.file.sync_data()?;
        self.map.insert(key.to_owned(), value.to_vec());
        Ok(())
    }
}

/// The whole record at `at`, if there is one.
fn record(b: &[u8], at: usize) -> Option<(String, Vec<u8>, usize)> {
    let word = |i: usize| -> Option<usize> {
        let w: [u8; 4] = b.get(at + i..at + i + 4)?.try_into().ok()?;
        Some(u32::from_le_bytes(w) as usize)
    };
    let (klen, vlen, crc) = (word(0)?, word(4)?, word(8)?);
    if klen > MAX_LEN || vlen > MAX_LEN {
        return None;
    }
    let key = b.get(at + 12..at + 12 + klen)?;
    let value = b.get(at + 12 + klen..at + 12 + klen + vlen)?;
    if crc32c::crc32c_append(crc32c::crc32c(key), value) as usize != crc {
        return None;
    }
    Some((
        String::from_utf8(key.to_vec()).ok()?,
        value.to_vec(),
        at + 12 + klen + vlen,
    ))
}
