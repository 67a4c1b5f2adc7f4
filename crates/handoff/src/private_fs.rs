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
//! * every directory above it, and every symbolic link on the way to it,
//!   must belong to this uid or root, and a directory above it that others
//!   may write must have the sticky bit (as `/tmp` does): otherwise its
//!   owner, or anyone who may write it, could rename the whole directory
//!   away and put their own in its place, sockets and locks included.

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
    /// A directory above the runtime or state dir, or a symbolic link on
    /// the way to it, that another user could use to put a directory of
    /// their own in its place.
    #[error("{} (on the way to {}) {why}: whoever may write to it could move {} away and put their own in its place. Fix: {fix}", path.display(), below.display(), below.display())]
    Ancestor {
        /// The directory or symbolic link above.
        path: PathBuf,
        /// The directory being checked.
        below: PathBuf,
        /// What is wrong with it, for the message.
        why: String,
        /// What to do, for the message.
        fix: String,
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
    // What exists above it is checked before anything is created, so a
    // refused path leaves nothing behind in someone else's directory.
    let mut existing = path;
    while std::fs::symlink_metadata(existing).is_err() {
        match existing.parent() {
            Some(p) if !p.as_os_str().is_empty() => existing = p,
            _ => break,
        }
    }
    if existing != path {
        check_from(existing, path)?;
    }
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
/// excepted) or writable by group or others, or one with an unsafe
/// directory or link above it (see the module doc); tightens one of ours
/// to 0700.
pub fn check_dir(path: &Path) -> Result<(), PrivateError> {
    const KIND: &str = "directory";
    check_ancestors(path)?;
    let dir = sys::fs::open_dir(path).map_err(|source| {
        // Linux answers ENOTDIR, not ELOOP, for a symlink opened with
        // O_DIRECTORY | O_NOFOLLOW: ask lstat which it was.
        let link = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink());
        if !link && sys::fs::is_not_dir_error(&source) {
            PrivateError::WrongType {
                path: path.to_path_buf(),
                kind: KIND,
            }
        } else {
            opening_failed(path, KIND, source, link)
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
    let file = sys::fs::no_follow(opts)
        .open(path)
        .map_err(|source| opening_failed(path, KIND, source, false))?;
    judge(&file, path, KIND, FILE_MODE, false)?;
    Ok(file)
}

/// A failed `O_NOFOLLOW` open: a symlink (`link`, or the kernel's ELOOP)
/// is refused as one, anything else is reported as it is.
fn opening_failed(path: &Path, kind: &'static str, source: io::Error, link: bool) -> PrivateError {
    if link || sys::fs::is_symlink_error(&source) {
        PrivateError::Symlink {
            path: path.to_path_buf(),
            kind,
        }
    } else {
        PrivateError::Io {
            op: "opening",
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Symbolic links followed on the way to a directory before giving up
/// (the kernel's own limit is 40).
const MAX_LINKS: u32 = 40;

/// Checks every directory above `path`, and every symbolic link on the way
/// to it, following the links as the kernel would.
fn check_ancestors(path: &Path) -> Result<(), PrivateError> {
    let abs = absolute(path)?;
    let Some(parent) = abs.parent() else {
        return Ok(()); // `/` itself
    };
    let mut links = 0;
    resolve_checked(parent, path, &mut links).map(|_| ())
}

/// Checks `dir` itself and everything above it, on the way to `below`.
fn check_from(dir: &Path, below: &Path) -> Result<(), PrivateError> {
    let mut links = 0;
    resolve_checked(&absolute(dir)?, below, &mut links).map(|_| ())
}

fn absolute(path: &Path) -> Result<PathBuf, PrivateError> {
    if path.is_absolute() {
        return Ok(path.to_path_buf());
    }
    std::env::current_dir()
        .map(|cwd| cwd.join(path))
        .map_err(|source| PrivateError::Io {
            op: "resolving the current directory of",
            path: path.to_path_buf(),
            source,
        })
}

/// Resolves the absolute `p` one component at a time, checking each
/// directory and link on the way; the resolved path.
fn resolve_checked(p: &Path, below: &Path, links: &mut u32) -> Result<PathBuf, PrivateError> {
    use std::path::Component;
    let mut cur = PathBuf::from("/");
    check_ancestor(&cur, below)?;
    for comp in p.components() {
        let name = match comp {
            Component::Normal(n) => n,
            // `cur` is resolved, so `..` is its parent.
            Component::ParentDir => {
                cur.pop();
                continue;
            }
            _ => continue,
        };
        let next = cur.join(name);
        let meta = std::fs::symlink_metadata(&next).map_err(|source| PrivateError::Io {
            op: "inspecting",
            path: next.clone(),
            source,
        })?;
        if meta.file_type().is_symlink() {
            let (owner, ours) = (meta.uid(), sys::fs::euid());
            if owner != ours && owner != 0 {
                return Err(PrivateError::Ancestor {
                    path: next,
                    below: below.to_path_buf(),
                    why: format!("is a symbolic link owned by uid {owner}"),
                    fix: format!(
                        "give the path without the link, or have uid {ours} or root own it"
                    ),
                });
            }
            *links += 1;
            if *links > MAX_LINKS {
                return Err(PrivateError::Io {
                    op: "resolving",
                    path: below.to_path_buf(),
                    source: io::Error::from_raw_os_error(libc::ELOOP),
                });
            }
            let target = std::fs::read_link(&next).map_err(|source| PrivateError::Io {
                op: "reading the link",
                path: next.clone(),
                source,
            })?;
            cur = resolve_checked(&cur.join(target), below, links)?;
        } else if meta.is_dir() {
            check_ancestor(&next, below)?;
            cur = next;
        } else {
            return Err(PrivateError::WrongType {
                path: next,
                kind: "directory",
            });
        }
    }
    Ok(cur)
}

/// One directory above: ours or root's, and writable by others only with
/// the sticky bit (others may then add entries but not rename ours).
fn check_ancestor(dir: &Path, below: &Path) -> Result<(), PrivateError> {
    let meta = std::fs::metadata(dir).map_err(|source| PrivateError::Io {
        op: "inspecting",
        path: dir.to_path_buf(),
        source,
    })?;
    let (owner, ours, mode) = (meta.uid(), sys::fs::euid(), meta.mode() & 0o7777);
    if owner != ours && owner != 0 {
        return Err(PrivateError::Ancestor {
            path: dir.to_path_buf(),
            below: below.to_path_buf(),
            why: format!("is owned by uid {owner}"),
            fix: format!(
                "choose a path whose every directory belongs to uid {ours} or root, e.g. under /run, /var/lib or your home"
            ),
        });
    }
    if mode & 0o022 != 0 && mode & 0o1000 == 0 {
        return Err(PrivateError::Ancestor {
            path: dir.to_path_buf(),
            below: below.to_path_buf(),
            why: format!(
                "has mode {mode:04o}: writable by group or others, without the sticky bit"
            ),
            fix: format!(
                "`chmod go-w {}` (or `chmod +t` for a shared directory like /tmp)",
                dir.display()
            ),
        });
    }
    Ok(())
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

    /// A directory above that others may write without the sticky bit is
    /// refused, naming it; with the sticky bit (like /tmp) it is fine; a
    /// link of ours on the way is followed and its target's directories
    /// are checked.
    #[test]
    fn checks_every_directory_and_link_above() {
        let root = tempfile::tempdir().unwrap();
        let shared = root.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        let state = shared.join("svc/state");
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = ensure_dir(&state).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, PrivateError::Ancestor { .. }), "{msg}");
        assert!(
            msg.contains(&shared.display().to_string()) && msg.contains("0777"),
            "{msg}"
        );
        assert!(
            !shared.join("svc").exists(),
            "nothing created under a refused directory"
        );
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
        ensure_dir(&state).unwrap();

        // Through a link of ours into a directory others may write.
        let open = root.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::create_dir(open.join("state")).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let via = root.path().join("via");
        std::os::unix::fs::symlink(&open, &via).unwrap();
        let e = check_dir(&via.join("state")).unwrap_err();
        assert!(
            e.to_string().contains(&open.display().to_string()),
            "the link's target was checked: {e}"
        );
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
        check_dir(&via.join("state")).unwrap();
    }

    /// Another user's directory above, or another user's link on the way,
    /// is refused. Needs root (to give them away); says so otherwise.
    #[test]
    fn refuses_another_users_directory_or_link_above() {
        if sys::fs::euid() != 0 {
            eprintln!("skipped: needs root to chown a directory to another uid");
            return;
        }
        let root = tempfile::tempdir().unwrap();
        let theirs = root.path().join("theirs");
        std::fs::create_dir(&theirs).unwrap();
        std::os::unix::fs::chown(&theirs, Some(65534), None).unwrap();
        let e = ensure_dir(&theirs.join("state")).unwrap_err();
        let msg = e.to_string();
        assert!(
            matches!(e, PrivateError::Ancestor { .. }) && msg.contains("owned by uid 65534"),
            "{msg}"
        );

        let ok = root.path().join("ok");
        std::fs::create_dir_all(ok.join("state")).unwrap();
        let link = root.path().join("link");
        std::os::unix::fs::symlink(&ok, &link).unwrap();
        std::os::unix::fs::lchown(&link, Some(65534), None).unwrap();
        let e = check_dir(&link.join("state")).unwrap_err();
        assert!(
            e.to_string().contains("symbolic link owned by uid 65534"),
            "{e}"
        );
    }
}
