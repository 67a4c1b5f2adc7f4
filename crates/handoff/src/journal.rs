//! The supervisor's journal: one small JSON record in the state dir saying
//! which handoff is in flight and how far it got.
//!
//! Written atomically at every phase (write a temp file, fsync it, rename it
//! over the journal, fsync the directory) so that after a crash — of the
//! supervisor or the whole machine — the file is either the previous record
//! or the new one, never a torn mix. JSON so an operator can `cat` it.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::phase::SupervisorPhase;
use crate::protocol::HandoffId;

/// File name of the journal inside the state dir.
pub const JOURNAL_FILE: &str = "handoff.journal";

/// What the journal records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalRecord {
    pub handoff_id: HandoffId,
    pub phase: SupervisorPhase,
    pub incumbent_pid: Option<u32>,
    pub successor_pid: Option<u32>,
    /// Milliseconds since the Unix epoch when the handoff started.
    pub started_at: u64,
}

/// Errors reading or writing the journal.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("writing journal {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("reading journal {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("journal {path} is corrupt ({source}); inspect it, then delete it to continue")]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// Handle on the journal file.
#[derive(Debug, Clone)]
pub struct Journal {
    path: PathBuf,
    dir: PathBuf,
}

impl Journal {
    pub fn new(state_dir: &Path) -> Journal {
        Journal {
            path: state_dir.join(JOURNAL_FILE),
            dir: state_dir.to_path_buf(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Atomically replaces the journal with `record`.
    pub fn write(&self, record: &JournalRecord) -> Result<(), JournalError> {
        let err = |source| JournalError::Write {
            path: self.path.clone(),
            source,
        };
        let tmp = self
            .dir
            .join(format!(".{JOURNAL_FILE}.{}.tmp", std::process::id()));
        let mut bytes = serde_json::to_vec_pretty(record).map_err(|e| err(io::Error::other(e)))?;
        bytes.push(b'\n');
        {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&tmp)
                .map_err(err)?;
            f.write_all(&bytes).map_err(err)?;
            f.sync_all().map_err(err)?;
        }
        fs::rename(&tmp, &self.path).map_err(err)?;
        sync_dir(&self.dir).map_err(err)
    }

    /// Reads the journal; `None` when no handoff is in flight.
    pub fn read(&self) -> Result<Option<JournalRecord>, JournalError> {
        match fs::read(&self.path) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|source| JournalError::Corrupt {
                    path: self.path.clone(),
                    source,
                }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(JournalError::Read {
                path: self.path.clone(),
                source,
            }),
        }
    }

    /// Removes the journal (durably): no handoff in flight.
    pub fn clear(&self) -> Result<(), JournalError> {
        match fs::remove_file(&self.path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(source) => {
                return Err(JournalError::Write {
                    path: self.path.clone(),
                    source,
                })
            }
        }
        sync_dir(&self.dir).map_err(|source| JournalError::Write {
            path: self.path.clone(),
            source,
        })
    }
}

/// fsync on a directory makes a rename or unlink inside it durable.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_read_clear() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::new(dir.path());
        assert_eq!(j.read().unwrap(), None);
        let mut r = JournalRecord {
            handoff_id: 9,
            phase: SupervisorPhase::Negotiating,
            incumbent_pid: Some(1),
            successor_pid: None,
            started_at: now_ms(),
        };
        j.write(&r).unwrap();
        assert_eq!(j.read().unwrap(), Some(r.clone()));
        r.phase = SupervisorPhase::Sealing;
        r.successor_pid = Some(2);
        j.write(&r).unwrap();
        assert_eq!(j.read().unwrap(), Some(r));
        j.clear().unwrap();
        assert_eq!(j.read().unwrap(), None);
        j.clear().unwrap();
        // No temp files are left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn corrupt_journal_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::new(dir.path());
        fs::write(j.path(), b"{not json").unwrap();
        let e = j.read().unwrap_err();
        assert!(e.to_string().contains("corrupt"), "{e}");
    }
}
