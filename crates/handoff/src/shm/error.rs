//! Errors of the shared region: each names the file and what was wrong.

use std::io;
use std::path::PathBuf;

use super::OwnerState;

/// Errors opening, reading or writing a [`super::Region`].
#[derive(Debug, thiserror::Error)]
pub enum ShmError {
    #[error(
        "shared region name {name:?} must be a plain file name (no '/', not starting with '.')"
    )]
    InvalidName { name: String },
    #[error("shared region payload of {requested} bytes is out of range 1..={max}")]
    PayloadSize { requested: usize, max: usize },
    #[error("shared region {path}: {op}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("shared region {path} does not exist")]
    NotFound { path: PathBuf },
    #[error("{path} is not a handoff shared region (bad magic)")]
    Foreign { path: PathBuf },
    #[error("shared region {path} has layout version {found}; this build supports {supported}")]
    Version {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error("shared region {path} is truncated: {len} bytes, needs {need}")]
    Truncated { path: PathBuf, len: u64, need: u64 },
    #[error("shared region {path} has a corrupt header: {detail}")]
    HeaderCorrupt { path: PathBuf, detail: String },
    #[error("shared region {path} holds a {found}-byte payload, {requested} requested")]
    SizeMismatch {
        path: PathBuf,
        found: u64,
        requested: usize,
    },
    #[error("shared region {path} has schema {found:#x}, {requested:#x} requested")]
    SchemaMismatch {
        path: PathBuf,
        found: u64,
        requested: u64,
    },
    #[error("buffer of {got} bytes for the {expected}-byte payload of {path}")]
    BufferSize {
        path: PathBuf,
        expected: usize,
        got: usize,
    },
    #[error("range {offset}..{offset}+{len} outside the {payload_len}-byte payload of {path}")]
    OutOfBounds {
        path: PathBuf,
        offset: usize,
        len: usize,
        payload_len: usize,
    },
    /// The record failed its checksum: a writer died (or panicked) part-way
    /// through updating it. The lock has been recovered; the record stays
    /// torn until the next complete write.
    #[error("shared region {path}: record at sequence {seq} is torn (checksum mismatch: a writer died mid-write)")]
    TornRecord { path: PathBuf, seq: u64 },
    /// A live process kept the lock (or a write in progress) for the whole
    /// wait budget. A live holder is never broken.
    #[error("shared region {path}: {what} not available within {waited_ms} ms: lock {owner}")]
    Busy {
        path: PathBuf,
        what: &'static str,
        owner: OwnerState,
        waited_ms: u64,
    },
}
