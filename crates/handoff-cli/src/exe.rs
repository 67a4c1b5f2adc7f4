//! Which build a service process runs, for `handoff status`: the path of its
//! executable and a SHA-256 of its bytes.
//!
//! The build id a service announces is what its author wrote ("kv 2.0"): two
//! builds of the same version say the same. A deploy tool that must know
//! whether a host already runs the build it was asked for (to report "no
//! change" rather than upgrade again) needs the bytes' identity instead. The
//! digest is read through `/proc/PID/exe`, so it is that of the file the
//! process was started from even after the file was replaced on disk, and it
//! is what `sha256sum` prints for that file.
//!
//! Hashing a large binary takes a while (a 64 MB debug build: about half a
//! second on a small VM, as long as `sha256sum` takes), so digests are kept
//! per file — device, inode, size and modification time of the open
//! executable — and a status query hashes a build once, not at every call.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::sync::Mutex;

use sha2::{Digest, Sha256};

/// The executable a process runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exe {
    /// As the kernel names it (`readlink /proc/PID/exe`).
    pub path: String,
    /// SHA-256 of its bytes, lowercase hex.
    pub sha256: String,
}

/// Identifies the file behind an open executable: two opens of the same
/// unchanged file give the same key. (A running executable cannot be
/// written to — ETXTBSY — so its content changes only with a new inode or
/// a new modification time.)
type FileKey = (u64, u64, u64, i64, i64);

/// Digests already computed. Few builds ever run under one supervisor
/// at once; the map is emptied when it grows past this.
const CACHED: usize = 8;
static DIGESTS: Mutex<Option<HashMap<FileKey, String>>> = Mutex::new(None);

/// The executable of `pid` and its digest; `None` if the process is gone,
/// not ours to inspect, or the platform has no `/proc/PID/exe`.
pub fn of_pid(pid: u32) -> Option<Exe> {
    let link = format!("/proc/{pid}/exe");
    let path = std::fs::read_link(&link).ok()?;
    let file = File::open(&link).ok()?;
    let sha256 = digest(file).ok()?;
    Some(Exe {
        path: path.to_string_lossy().into_owned(),
        sha256,
    })
}

/// The SHA-256 of an open file, from the cache when the same file was
/// hashed before. The lock is held while hashing, so concurrent status
/// queries hash a new build once between them.
fn digest(mut file: File) -> std::io::Result<String> {
    use std::os::unix::fs::MetadataExt;
    let m = file.metadata()?;
    let key: FileKey = (m.dev(), m.ino(), m.size(), m.mtime(), m.mtime_nsec());
    let mut cache = DIGESTS.lock().unwrap_or_else(|p| p.into_inner());
    let cache = cache.get_or_insert_with(HashMap::new);
    if let Some(d) = cache.get(&key) {
        return Ok(d.clone());
    }
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    let hex: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    if cache.len() >= CACHED {
        cache.clear();
    }
    cache.insert(key, hex.clone());
    Ok(hex)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The digest is SHA-256 as `sha256sum` computes it.
    #[test]
    fn digest_is_sha256() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"abc").unwrap();
        assert_eq!(
            digest(File::open(&p).unwrap()).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        // Another file, another digest: the cache is per file, not per call site.
        let q = dir.path().join("g");
        std::fs::write(&q, b"").unwrap();
        assert_eq!(
            digest(File::open(&q).unwrap()).unwrap(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    /// Our own process: the test binary's path and the digest of its bytes.
    #[cfg(target_os = "linux")]
    #[test]
    fn of_pid_names_the_running_file() {
        let exe = of_pid(std::process::id()).expect("our own /proc/self/exe");
        let me = std::env::current_exe().unwrap();
        assert_eq!(std::path::Path::new(&exe.path), me.canonicalize().unwrap());
        let mut h = Sha256::new();
        h.update(std::fs::read(&me).unwrap());
        let want: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(exe.sha256, want);
        assert_eq!(of_pid(u32::MAX), None, "no such process");
    }
}
