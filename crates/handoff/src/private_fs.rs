//! The state and runtime dirs, and every file in them, belong to the
//! service's uid alone.
//!
//! Why it matters: `flock(2)` works on a read-only descriptor, so anyone who
//! can *open* `handoff.lock` can take the state lock the instant the
//! incumbent releases it at seal — the successor then times out and the
//! service is down for as long as they hold it. And a symlink planted by
//! another user in a world-writable directory made root write where the
//! link pointed. So, as OpenSSH (`StrictModes`) and systemd
//! (`StateDirectory=`) do it:
//!
//! * a directory is created 0700; an existing one must be a real directory
//!   (not a symlink), owned by this uid or root, and not writable by group
//!   or others — else it is refused with an error naming the path, what was
//!   found and the fix. One we own with read bits for others is tightened
//!   to 0700 (a state dir created 0755 by an older version).
//! * a file is created 0600 and opened with `O_NOFOLLOW` (the caller adds
//!   `O_EXCL`, `create_new`, where a new file is meant); an existing one
//!   must be a regular file owned by this uid or root, and one we own is
//!   tightened to 0600.
//!
//! Only the last path component is checked: the operator chooses the path
//! above it.

use std::fs::{DirBuilder, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::sys;

/// Mode of the directories handoff creates.
pub const DIR_MODE: u32 = 0o700;
/// Mode of the files handoff creates in them.
pub const FILE_MODE: u32 = 0o600;

/// A directory or file that another user could have planted or could
/// change, or that could not be checked.
#[derive(Debug, thiserror::Error)]
pub enum PrivateError {
    /// The path is a symbolic link, which is never followed: another user
    /// may have planted it to redirect what handoff writes.
    #[error("{} is a symbolic link; refusing to follow it (another user may have planted it). Fix: remove the link and give the real path, or let handoff create a fresh {kind} there", path.display())]
    Symlink {
        /// The link's path.
        path: PathBuf,
        /// What was expected there: `directory` or `file`.
        kind: &'static str,
    },
    /// The path exists but is not what it should be: a file where a
    /// directory is expected, or something other than a regular file.
    #[error("{} is not a {kind}", path.display())]
    WrongType {
        /// The path found.
        path: PathBuf,
        /// What was expected there: `directory` or `file`.
        kind: &'static str,
    },
    /// The directory or file belongs to another user than this process's
    /// and not to root, so its owner could replace what handoff keeps in
    /// it.
    #[error("{} is owned by uid {owner}, not by uid {ours} (this process) or root, so its owner could replace what handoff keeps in it. Fix: `chown {ours} {}`, or choose a {kind} of your own", path.display(), path.display())]
    Owner {
        /// The directory or file.
        path: PathBuf,
        /// What it is: `directory` or `file`.
        kind: &'static str,
        /// The uid that owns it.
        owner: u32,
        /// This process's effective uid.
        ours: u32,
    },
    /// A directory that group or others may write (files are tightened
    /// instead): they could replace what handoff keeps in it. It is left
    /// as found.
    #[error("{} has mode {mode:04o}: writable by group or others, who could replace what handoff keeps in it. Fix: `chmod {fix:o} {}`, or choose a {kind} only its owner can write", path.display(), path.display())]
    Writable {
        /// The directory.
        path: PathBuf,
        /// What it is: `directory`.
        kind: &'static str,
        /// Its permission bits as found.
        mode: u32,
        /// The mode the message suggests instead ([`DIR_MODE`]).
        fix: u32,
    },
    /// Creating, opening, inspecting or restricting the path failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done, such as `creating` or `opening`.
        op: &'static str,
        /// The directory or file.
        path: PathBuf,
        /// The error from the system call.
        source: io::Error,
    },
}

impl From<PrivateError> for io::Error {
    fn from(e: PrivateError) -> io::Error {
        let kind = match &e {
            PrivateError::Io { source, .. } => source.kind(),
            _ => io::ErrorKind::PermissionDenied,
        };
        io::Error::new(kind, e)
    }
}

/// Creates `path` (and missing parents) mode 0700 unless it exists, then
/// [`check_dir`]s it.
pub fn ensure_dir(path: &Path) -> Result<(), PrivateError> {
    DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(path)
        .map_err(|source| PrivateError::Io {
            op: "creating",
            path: path.to_path_buf(),
            source,
        })?;
    check_dir(path)
}

/// Refuses a directory that is a symlink, owned by another user (root
/// excepted) or writable by group or others; tightens one of ours to 0700.
pub fn check_dir(path: &Path) -> Result<(), PrivateError> {
    const KIND: &str = "directory";
    let dir = sys::fs::open_dir(path).map_err(|source| {
        // Linux answers ENOTDIR, not ELOOP, for a symlink opened with
        // O_DIRECTORY | O_NOFOLLOW: ask lstat which it was.
        let link = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink());
        if link || sys::fs::is_symlink_error(&source) {
            PrivateError::Symlink {
                path: path.to_path_buf(),
                kind: KIND,
            }
        } else if sys::fs::is_not_dir_error(&source) {
            PrivateError::WrongType {
                path: path.to_path_buf(),
                kind: KIND,
            }
        } else {
            PrivateError::Io {
                op: "opening",
                path: path.to_path_buf(),
                source,
            }
        }
    })?;
    judge(&dir, path, KIND, DIR_MODE, true)
}

/// Opens `path` as `opts` says, creating it mode 0600 if `opts` creates,
/// never through a symlink; refuses a file that is not a regular file or is
/// owned by another user (root excepted), and tightens one of ours to 0600.
pub fn open_file(opts: &mut OpenOptions, path: &Path) -> Result<File, PrivateError> {
    const KIND: &str = "file";
    opts.mode(FILE_MODE);
    let file = sys::fs::no_follow(opts).open(path).map_err(|source| {
        if sys::fs::is_symlink_error(&source) {
            PrivateError::Symlink {
                path: path.to_path_buf(),
                kind: KIND,
            }
        } else {
            PrivateError::Io {
                op: "opening",
                path: path.to_path_buf(),
                source,
            }
        }
    })?;
    judge(&file, path, KIND, FILE_MODE, false)?;
    Ok(file)
}

/// The checks common to directories and files, through the open
/// descriptor. A file of ours that others may write is only tightened, not
/// refused: its directory is the fence that keeps others out, and was
/// checked (or created) first.
fn judge(
    f: &File,
    path: &Path,
    kind: &'static str,
    want: u32,
    refuse_writable: bool,
) -> Result<(), PrivateError> {
    let meta = f.metadata().map_err(|source| PrivateError::Io {
        op: "inspecting",
        path: path.to_path_buf(),
        source,
    })?;
    let is_kind = if refuse_writable {
        meta.is_dir()
    } else {
        meta.is_file()
    };
    if !is_kind {
        return Err(PrivateError::WrongType {
            path: path.to_path_buf(),
            kind,
        });
    }
    let ours = sys::fs::euid();
    let owner = meta.uid();
    if owner != ours && owner != 0 {
        return Err(PrivateError::Owner {
            path: path.to_path_buf(),
            kind,
            owner,
            ours,
        });
    }
    let mode = meta.mode() & 0o7777;
    if refuse_writable && mode & 0o022 != 0 {
        return Err(PrivateError::Writable {
            path: path.to_path_buf(),
            kind,
            mode,
            fix: want,
        });
    }
    if owner == ours && mode & 0o077 != 0 {
        // fchmod: the descriptor, not the path, so a swapped path cannot
        // redirect it.
        f.set_permissions(std::fs::Permissions::from_mode(want))
            .map_err(|source| PrivateError::Io {
                op: "restricting the mode of",
                path: path.to_path_buf(),
                source,
            })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().mode() & 0o7777
    }

    #[test]
    fn creates_private_and_tightens_ours() {
        let root = tempfile::tempdir().unwrap();
        let d = root.path().join("a/b");
        ensure_dir(&d).unwrap();
        assert_eq!(mode(&d), 0o700);
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        ensure_dir(&d).unwrap();
        assert_eq!(mode(&d), 0o700);
        let f = d.join("f");
        open_file(OpenOptions::new().write(true).create(true), &f).unwrap();
        assert_eq!(mode(&f), 0o600);
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        open_file(OpenOptions::new().read(true), &f).unwrap();
        assert_eq!(mode(&f), 0o600);
    }

    #[test]
    fn refuses_symlinks_and_writable_dirs() {
        let root = tempfile::tempdir().unwrap();
        let real = root.path().join("real");
        ensure_dir(&real).unwrap();
        let link = root.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let e = ensure_dir(&link).unwrap_err();
        assert!(matches!(e, PrivateError::Symlink { .. }), "{e}");
        assert!(e.to_string().contains(&link.display().to_string()), "{e}");
        let target = root.path().join("target");
        let flink = real.join("lock");
        std::os::unix::fs::symlink(&target, &flink).unwrap();
        let e = open_file(OpenOptions::new().write(true).create(true), &flink).unwrap_err();
        assert!(matches!(e, PrivateError::Symlink { .. }), "{e}");
        assert!(!target.exists(), "the link's target was created");
        std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = check_dir(&real).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("mode 0777") && msg.contains(&format!("chmod 700 {}", real.display())),
            "{msg}"
        );
        assert_eq!(mode(&real), 0o777, "a refused dir is left as found");
    }
}
