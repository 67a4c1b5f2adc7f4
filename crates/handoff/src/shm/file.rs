//! Creating and opening region files, safely against a concurrent creator.
//!
//! Two processes may call `open_or_create` for the same name at the same
//! moment (O and N during a handoff, or two supervisors). If either could
//! see a half-initialised file it might map a header of zeros, or — worse —
//! one could truncate the file under the other's mapping (SIGBUS). So a file
//! only ever gets its final name fully formed: it is built under a unique
//! temporary name, written, fsynced, and then *hard-linked* to the final
//! name. `link(2)` fails with `EEXIST` instead of replacing, so exactly one
//! creator wins and every loser opens the winner's file (a `rename` would
//! silently replace a file others may already have mapped). Nothing in this
//! crate ever truncates or rewrites an existing region file.

use std::fs::{File, OpenOptions};
use std::io::{self, ErrorKind, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::layout::{self, Static};
use super::ShmError;

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ShmError + 'a {
    move |source| ShmError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// What a region holds: its payload size and the application's format tag.
///
/// Both are recorded in the header when the file is created and must match
/// on every later open, so a build whose record format changed (bump
/// `schema`) gets [`ShmError::SchemaMismatch`] instead of misreading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionSpec {
    /// The payload size in bytes, 1 to 16 MiB.
    pub payload_len: usize,
    /// The application's own tag for its record format.
    pub schema: u64,
}

impl RegionSpec {
    /// A spec for a `payload_len`-byte payload in format `schema`.
    pub fn new(payload_len: usize, schema: u64) -> RegionSpec {
        RegionSpec {
            payload_len,
            schema,
        }
    }
}

/// The final path of region `name` in `dir`, if `name` is a plain name.
pub(crate) fn region_path(dir: &Path, name: &str) -> Result<PathBuf, ShmError> {
    let plain =
        !name.is_empty() && !name.starts_with('.') && !name.contains('/') && !name.contains('\0');
    if !plain {
        return Err(ShmError::InvalidName { name: name.into() });
    }
    Ok(dir.join(name))
}

/// Opens an existing region file read-write and validates its header.
/// `Ok(None)` if there is no file by that name.
pub(crate) fn open_existing(
    path: &Path,
    spec: Option<RegionSpec>,
) -> Result<Option<(File, Static)>, ShmError> {
    // Never through a symlink: the region lives in the private state dir,
    // and a link there could only be a plant (`O_NOFOLLOW`, see
    // `crate::private_fs`).
    let mut opts = OpenOptions::new();
    crate::sys::fs::no_follow(opts.read(true).write(true));
    let file = match opts.open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err("open", path)(e)),
    };
    let meta = file.metadata().map_err(io_err("stat", path))?;
    if !meta.is_file() {
        return Err(ShmError::Foreign {
            path: path.to_path_buf(),
        });
    }
    let len = meta.len();
    let mut head = [0u8; layout::STATIC_LEN];
    let want = (len.min(layout::STATIC_LEN as u64)) as usize;
    file.read_exact_at(&mut head[..want], 0)
        .map_err(io_err("read header", path))?;
    let st = layout::validate(path, &head[..want], len)?;
    if let Some(spec) = spec {
        if st.payload_len != spec.payload_len as u64 {
            return Err(ShmError::SizeMismatch {
                path: path.to_path_buf(),
                found: st.payload_len,
                requested: spec.payload_len,
            });
        }
        if st.schema != spec.schema {
            return Err(ShmError::SchemaMismatch {
                path: path.to_path_buf(),
                found: st.schema,
                requested: spec.schema,
            });
        }
    }
    Ok(Some((file, st)))
}

/// Creates the region file unless it exists, then opens whichever file
/// holds the name (ours or a concurrent creator's).
pub(crate) fn open_or_create(path: &Path, spec: RegionSpec) -> Result<(File, Static), ShmError> {
    if let Some(found) = open_existing(path, Some(spec))? {
        return Ok(found);
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // Unique per process (pid) and per call within it (counter): threads of
    // one process racing to create never collide on the temporary name.
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let tmp = dir.join(format!(
        ".{name}.init.{}.{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let built = build(&tmp, spec);
    let linked = built.and_then(|()| match std::fs::hard_link(&tmp, path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(io_err("link into place", path)(e)),
    });
    // The temporary name is never needed again, won or lost.
    let _ = std::fs::remove_file(&tmp);
    if linked? {
        // Make the new name durable; best effort (some filesystems refuse
        // fsync on a directory, and the region is hot state, not a journal).
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    match open_existing(path, Some(spec))? {
        Some(found) => Ok(found),
        // Removed between our link and our open: report it, don't loop.
        None => Err(ShmError::NotFound {
            path: path.to_path_buf(),
        }),
    }
}

/// Writes a complete, zeroed region file at `tmp` and fsyncs it.
fn build(tmp: &Path, spec: RegionSpec) -> Result<(), ShmError> {
    let create = || {
        crate::sys::fs::no_follow(
            OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600),
        )
        .open(tmp)
    };
    let mut f = match create() {
        // Left by a crashed creator that had our pid: no live process can
        // be using a name with our pid and our counter value, so remove it.
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {
            let _ = std::fs::remove_file(tmp);
            create()
        }
        other => other,
    }
    .map_err(io_err("create", tmp))?;
    let header = layout::encode_initial(Static {
        payload_len: spec.payload_len as u64,
        schema: spec.schema,
    });
    f.write_all(&header).map_err(io_err("write header", tmp))?;
    f.set_len(layout::file_len(spec.payload_len) as u64)
        .map_err(io_err("size", tmp))?;
    f.sync_all().map_err(io_err("fsync", tmp))?;
    Ok(())
}
