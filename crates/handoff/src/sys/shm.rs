//! The shared mapping behind [`crate::shm::Region`], seen only as atomic
//! words.
//!
//! Several processes map the same file `MAP_SHARED` and read and write it
//! concurrently. Under Rust's memory model the only sound way to touch such
//! memory is through atomics: a plain `&[u8]` over it would be a data race
//! (undefined behaviour) the moment another process writes. So this module
//! never hands out byte slices: it hands out `&AtomicU64`s, and every read or
//! write the rest of the crate does is an atomic load or store. Atomics are
//! lock-free and address-based on every platform we support, so they work
//! across processes exactly as across threads.

use std::fs::File;
use std::io;
use std::sync::atomic::AtomicU64;

use memmap2::{MmapOptions, MmapRaw};

/// A read-write `MAP_SHARED` mapping of a whole file, exposed as words.
#[derive(Debug)]
pub struct SharedMap {
    map: MmapRaw,
}

impl SharedMap {
    /// Maps the first `len` bytes of `file` read-write and shared.
    ///
    /// The caller must have checked that the file is at least `len` bytes
    /// long: touching a page past end-of-file raises `SIGBUS`.
    pub fn map(file: &File, len: usize) -> io::Result<SharedMap> {
        if len == 0 || !len.is_multiple_of(8) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "shared mapping length must be a non-zero multiple of 8",
            ));
        }
        let map = MmapOptions::new().len(len).map_raw(file)?;
        let aligned = (map.as_ptr() as usize).is_multiple_of(std::mem::align_of::<AtomicU64>());
        if !aligned || map.len() != len {
            // mmap returns page-aligned addresses; anything else is a broken
            // platform, not something to build atomics on.
            return Err(io::Error::other("mmap returned a misaligned mapping"));
        }
        Ok(SharedMap { map })
    }

    /// The whole mapping as words.
    pub fn words(&self) -> &[AtomicU64] {
        // SAFETY:
        // * the slice covers exactly the mapping (`len` is a multiple of 8,
        //   checked in `map`), which stays mapped for as long as `self` is
        //   borrowed — the slice cannot outlive it;
        // * the base is page-aligned (checked in `map`), so every element is
        //   aligned for `AtomicU64`, which has the size and layout of `u64`;
        // * the bytes are initialised (file-backed memory always is) and any
        //   bit pattern is a valid `u64`;
        // * `AtomicU64` is interior-mutable, so other holders of the same
        //   words — threads or other processes — may change them while this
        //   shared borrow exists; this crate only ever accesses the mapping
        //   through such atomics, never through plain references, so there
        //   is no non-atomic access to race with.
        // What no type can rule out is another process truncating the file
        // under us (SIGBUS on the next touch); `shm` documents that a region
        // file must never be truncated while mapped.
        unsafe {
            std::slice::from_raw_parts(
                self.map.as_mut_ptr() as *const AtomicU64,
                self.map.len() / 8,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::atomic::Ordering;

    #[test]
    fn words_cover_the_mapping_and_are_shared_with_the_file() {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&[0u8; 64]).unwrap();
        let m = SharedMap::map(&f, 64).unwrap();
        assert_eq!(m.words().len(), 8);
        m.words()[2].store(0x0102_0304_0506_0708, Ordering::Relaxed);
        // A second, independent mapping of the same file sees the store.
        let m2 = SharedMap::map(&f, 64).unwrap();
        assert_eq!(m2.words()[2].load(Ordering::Relaxed), 0x0102_0304_0506_0708);
        assert!(SharedMap::map(&f, 0).is_err());
        assert!(SharedMap::map(&f, 12).is_err());
    }
}
