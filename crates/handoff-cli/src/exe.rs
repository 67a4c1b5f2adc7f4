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
//! Hashing a large binary takes a while (a 64 MB build: about half a
//! second on a small VM, as long as `sha256sum` takes), and a status query
//! must never wait for it: the systemd watchdog probe is a status query with
//! a deadline of a quarter of `WatchdogSec=`. So a query answers from a cache
//! kept per file — device, inode, size and modification time of the open
//! executable — and a build not hashed yet is hashed on a thread of its own
//! while the query answers without the digest (`incumbent_exe_sha256`
//! absent, the path present); a query a moment later has it. Each build is
//! hashed once.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::Read;
use std::sync::{Mutex, MutexGuard, PoisonError};

use sha2::{Digest, Sha256};

/// The executable a process runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exe {
    /// As the kernel names it (`readlink /proc/PID/exe`).
    pub path: String,
    /// SHA-256 of its bytes, lowercase hex; `None` while it is being hashed.
    pub sha256: Option<String>,
}

/// Identifies the file behind an open executable: two opens of the same
/// unchanged file give the same key. (A running executable cannot be
/// written to — ETXTBSY — so its content changes only with a new inode or
/// a new modification time.)
type FileKey = (u64, u64, u64, i64, i64);

/// Digests already computed. Few builds ever run under one supervisor
/// at once; the map is emptied when it grows past this.
const CACHED: usize = 8;

#[derive(Default)]
struct Digests {
    done: HashMap<FileKey, String>,
    /// Being hashed on a thread now.
    pending: HashSet<FileKey>,
}

static DIGESTS: Mutex<Option<Digests>> = Mutex::new(None);

fn digests() -> MutexGuard<'static, Option<Digests>> {
    DIGESTS.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The executable of `pid` and, once known, its digest; `None` if the
/// process is gone, not ours to inspect, or the platform has no
/// `/proc/PID/exe`. Never waits for a hash.
pub fn of_pid(pid: u32) -> Option<Exe> {
    let link = format!("/proc/{pid}/exe");
    let path = std::fs::read_link(&link).ok()?;
    let file = File::open(&link).ok()?;
    Some(Exe {
        path: path.to_string_lossy().into_owned(),
        sha256: digest_or_start(file),
    })
}

fn key_of(file: &File) -> std::io::Result<FileKey> {
    use std::os::unix::fs::MetadataExt;
    let m = file.metadata()?;
    Ok((m.dev(), m.ino(), m.size(), m.mtime(), m.mtime_nsec()))
}

/// The cached digest of `file`, or `None` after making sure a thread is
/// hashing it (the open file keeps the bytes reachable even if the process
/// exits or the file is replaced meanwhile).
fn digest_or_start(file: File) -> Option<String> {
    let key = key_of(&file).ok()?;
    let mut g = digests();
    let d = g.get_or_insert_with(Digests::default);
    if let Some(hex) = d.done.get(&key) {
        return Some(hex.clone());
    }
    if d.pending.insert(key) {
        let spawned = std::thread::Builder::new()
            .name("exe-digest".into())
            .spawn(move || {
                let hex = hash(file);
                let mut g = digests();
                let d = g.get_or_insert_with(Digests::default);
                d.pending.remove(&key);
                match hex {
                    Ok(hex) => {
                        if d.done.len() >= CACHED {
                            d.done.clear();
                        }
                        d.done.insert(key, hex);
                    }
                    Err(e) => tracing::warn!(error = %e, "hashing the service's executable failed"),
                }
            });
        if spawned.is_err() {
            d.pending.remove(&key); // tried again at the next query
        }
    }
    None
}

/// SHA-256 of an open file, lowercase hex.
fn hash(mut file: File) -> std::io::Result<String> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The digest is SHA-256 as `sha256sum` computes it.
    #[test]
    fn hash_is_sha256() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"abc").unwrap();
        assert_eq!(
            hash(File::open(&p).unwrap()).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let q = dir.path().join("g");
        std::fs::write(&q, b"").unwrap();
        assert_eq!(
            hash(File::open(&q).unwrap()).unwrap(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    /// Our own process: the test binary's path at once, its digest once the
    /// background hash is done (the first query does not wait for it).
    #[cfg(target_os = "linux")]
    #[test]
    fn of_pid_names_the_running_file_then_its_digest() {
        let me = std::env::current_exe().unwrap();
        let exe = of_pid(std::process::id()).expect("our own /proc/self/exe");
        assert_eq!(std::path::Path::new(&exe.path), me.canonicalize().unwrap());
        let mut h = Sha256::new();
        h.update(std::fs::read(&me).unwrap());
        let want: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let got = loop {
            if let Some(d) = of_pid(std::process::id()).and_then(|e| e.sha256) {
                break d;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no digest within 30 s"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        assert_eq!(got, want);
        assert_eq!(of_pid(u32::MAX), None, "no such process");
    }
}
