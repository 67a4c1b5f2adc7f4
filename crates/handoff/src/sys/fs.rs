//! Opening files and directories without following a planted symlink.
//!
//! `O_NOFOLLOW` makes `open(2)` fail with `ELOOP` when the last component
//! of the path is a symbolic link, instead of opening (or creating) the
//! link's target: another user who could plant `handoff.lock -> /etc/…`
//! would otherwise have root write where they chose. Modes are then
//! checked and changed through the descriptor (`fstat`, `fchmod`), never
//! through the path, which could be swapped between the check and the use.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Adds `O_NOFOLLOW` to `opts` (std adds `O_CLOEXEC` itself).
pub fn no_follow(opts: &mut OpenOptions) -> &mut OpenOptions {
    opts.custom_flags(libc::O_NOFOLLOW)
}

/// Opens the directory at `path` itself, read-only: a symlink, even to a
/// directory, fails (`ENOTDIR` on Linux, `ELOOP` elsewhere), as does
/// anything else that is not a directory (`ENOTDIR`).
pub fn open_dir(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_DIRECTORY)
        .open(path)
}

/// Whether `e` is what `O_NOFOLLOW` answers for a symbolic link.
pub fn is_symlink_error(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::ELOOP)
}

/// Whether `e` says a path component is not a directory.
pub fn is_not_dir_error(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::ENOTDIR)
}

/// The effective uid: whose files these are.
pub fn euid() -> u32 {
    nix::unistd::geteuid().as_raw()
}
