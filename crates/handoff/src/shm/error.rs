//! Errors of the shared region: each names the file and what was wrong.

use std::io;
use std::path::PathBuf;

use super::OwnerState;

/// Errors opening, reading or writing a [`super::Region`].
#[derive(Debug, thiserror::Error)]
pub enum ShmError {
    /// The region name is not a plain file name in the state dir: empty,
    /// with a `/` or NUL in it, or starting with `.` (the prefix of the
    /// temporary names regions are built under).
    #[error(
        "shared region name {name:?} must be a plain file name (no '/', not starting with '.')"
    )]
    InvalidName {
        /// The name given.
        name: String,
    },
    /// The requested payload size is 0 or above the cap (16 MiB): a region
    /// is for hot state, not bulk data.
    #[error("shared region payload of {requested} bytes is out of range 1..={max}")]
    PayloadSize {
        /// The payload size asked for, in bytes.
        requested: usize,
        /// The largest payload accepted, in bytes.
        max: usize,
    },
    /// A system call on the region file failed.
    #[error("shared region {path}: {op}: {source}")]
    Io {
        /// What was being done, such as `open` or `mmap`.
        op: &'static str,
        /// The region file (or the temporary file it is built under).
        path: PathBuf,
        /// The error from the system call.
        source: io::Error,
    },
    /// [`Region::open`](super::Region::open) found no file by that name
    /// (or the file was removed while being created).
    #[error("shared region {path} does not exist")]
    NotFound {
        /// The region file looked for.
        path: PathBuf,
    },
    /// The file does not start with a region's magic bytes, or is not a
    /// regular file: not a handoff region.
    #[error("{path} is not a handoff shared region (bad magic)")]
    Foreign {
        /// The file found.
        path: PathBuf,
    },
    /// The file has a layout version this build does not read: it was
    /// made by another release of handoff.
    #[error("shared region {path} has layout version {found}; this build supports {supported}")]
    Version {
        /// The region file.
        path: PathBuf,
        /// The layout version in its header.
        found: u32,
        /// The one layout version this build reads.
        supported: u32,
    },
    /// Shorter than its header says (or than a header): handoff never
    /// truncates a region file, so something else cut it short. Refused
    /// rather than mapped: touching a page past the end of the file would
    /// kill the process with SIGBUS.
    #[error(
        "shared region {path} is truncated: {len} bytes, needs at least {need}; handoff never \
         truncates a region file, so something else cut it short: remove it and the next \
         process to start creates it anew"
    )]
    Truncated {
        /// The region file.
        path: PathBuf,
        /// The file's length in bytes.
        len: u64,
        /// The length in bytes it needs at least: a whole header, or the
        /// header and the payload its header states.
        need: u64,
    },
    /// The header fails its checksum or holds impossible values, or the
    /// file is longer than its header says: the file was damaged or
    /// written by something else. It is not mapped.
    #[error("shared region {path} has a corrupt header: {detail}")]
    HeaderCorrupt {
        /// The region file.
        path: PathBuf,
        /// Which check failed, with the values found.
        detail: String,
    },
    /// The region exists with another payload size than the one asked
    /// for: the file was created for records of another size.
    #[error("shared region {path} holds a {found}-byte payload, {requested} requested")]
    SizeMismatch {
        /// The region file.
        path: PathBuf,
        /// The payload size in its header, in bytes.
        found: u64,
        /// The payload size asked for, in bytes.
        requested: usize,
    },
    /// The region exists with another schema tag than the one asked for:
    /// it holds records of another format, which this build would misread.
    #[error("shared region {path} has schema {found:#x}, {requested:#x} requested")]
    SchemaMismatch {
        /// The region file.
        path: PathBuf,
        /// The schema tag in its header.
        found: u64,
        /// The schema tag asked for.
        requested: u64,
    },
    /// A buffer for the whole payload is not exactly the payload's length.
    #[error("buffer of {got} bytes for the {expected}-byte payload of {path}")]
    BufferSize {
        /// The region file.
        path: PathBuf,
        /// The payload length in bytes, which the buffer must match.
        expected: usize,
        /// The buffer's length in bytes.
        got: usize,
    },
    /// A read or write reaches past the end of the payload.
    #[error("range {offset}..{offset}+{len} outside the {payload_len}-byte payload of {path}")]
    OutOfBounds {
        /// The region file.
        path: PathBuf,
        /// Where the range starts, in bytes from the payload's start.
        offset: usize,
        /// The range's length in bytes.
        len: usize,
        /// The payload's length in bytes.
        payload_len: usize,
    },
    /// The record failed its checksum: a writer died (or panicked) part-way
    /// through updating it. The lock has been recovered; the record stays
    /// torn until the next complete write.
    #[error("shared region {path}: record at sequence {seq} is torn (checksum mismatch: a writer died mid-write)")]
    TornRecord {
        /// The region file.
        path: PathBuf,
        /// The (even) sequence number of the torn record.
        seq: u64,
    },
    /// A live process kept the lock (or a write in progress) for the whole
    /// wait budget. A live holder is never broken.
    #[error("shared region {path}: {what} not available within {waited_ms} ms: lock {owner}")]
    Busy {
        /// The region file.
        path: PathBuf,
        /// What was waited for: `the write lock` or `a consistent read`.
        what: &'static str,
        /// The lock word when the wait ended: who held it.
        owner: OwnerState,
        /// Milliseconds waited before giving up.
        waited_ms: u64,
    },
}
