//! `CLOCK_MONOTONIC` as a plain number, for `MONOTONIC_USEC=` in
//! notifications to systemd.
//!
//! `std::time::Instant` reads the same clock on Linux but keeps its value
//! opaque; systemd compares the number we send with its own reading of
//! `CLOCK_MONOTONIC` (the moment it sent the reload signal), so the raw
//! value is what must go on the wire.

use std::io;

/// Microseconds on `CLOCK_MONOTONIC` (time since boot, not counting suspend
/// on Linux — the same clock systemd's `now(CLOCK_MONOTONIC)` reads).
pub fn monotonic_usec() -> io::Result<u64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one `timespec` through a pointer to a
    // live, properly aligned local; it has no other effect.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // The monotonic clock is never negative; the conversions cannot fail
    // for any real uptime, but a hostile libc must not make us panic.
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(ts.tv_nsec).unwrap_or(0);
    Ok(secs.saturating_mul(1_000_000).saturating_add(nanos / 1_000))
}

#[cfg(test)]
mod tests {
    #[test]
    fn monotonic_never_goes_back() {
        let a = super::monotonic_usec().unwrap();
        let b = super::monotonic_usec().unwrap();
        assert!(a > 0 && b >= a, "{a} then {b}");
    }
}
