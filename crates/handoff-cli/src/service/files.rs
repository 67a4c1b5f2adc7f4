//! Writing unit files and plists: atomically, and only when they change.
//!
//! A service manager may read the file at any moment (systemd on a
//! `daemon-reload` someone else triggers, launchd at login), so it must
//! never see a half-written one: the new content goes to a temporary file in
//! the same directory, is synced, and is renamed over the old one (rename is
//! atomic within a filesystem). Comparing with what is already there first
//! lets `install` tell "nothing changed" from "changed, restart to apply".

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use anyhow::{Context, Result};

/// What [`write_if_changed`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    Created,
    Updated,
    Unchanged,
}

/// The file's content, or `None` if it does not exist.
pub fn read_opt(path: &Path) -> Result<Option<Vec<u8>>> {
    match fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Writes `content` to `path` (mode 0644) unless it already holds exactly
/// that; creates the parent directory if needed.
pub fn write_if_changed(path: &Path, content: &[u8]) -> Result<Written> {
    let old = read_opt(path)?;
    if old.as_deref() == Some(content) {
        return Ok(Written::Unchanged);
    }
    write_atomic(path, content)?;
    Ok(if old.is_some() {
        Written::Updated
    } else {
        Written::Created
    })
}

/// Temp file + fsync + rename + fsync of the directory.
pub fn write_atomic(path: &Path, content: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let res = (|| -> std::io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .open(&tmp)?;
        f.write_all(content)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        // Make the rename itself durable.
        File::open(dir)?.sync_all()
    })();
    if res.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    res.with_context(|| format!("writing {}", path.display()))
}

/// Removes `path`; `Ok(false)` if it was not there.
pub fn remove_opt(path: &Path) -> Result<bool> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_updated_unchanged() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("sub/x.service");
        assert_eq!(write_if_changed(&p, b"a").unwrap(), Written::Created);
        assert_eq!(write_if_changed(&p, b"a").unwrap(), Written::Unchanged);
        assert_eq!(write_if_changed(&p, b"b").unwrap(), Written::Updated);
        assert_eq!(fs::read(&p).unwrap(), b"b");
        // No temp file left behind.
        assert_eq!(fs::read_dir(p.parent().unwrap()).unwrap().count(), 1);
        assert!(remove_opt(&p).unwrap());
        assert!(!remove_opt(&p).unwrap());
    }
}
