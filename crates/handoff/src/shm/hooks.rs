//! Fault injection for the recovery path, so tests can kill a process at the
//! one instant the protocol must survive: a recoverer that has stamped its
//! identity on a dead owner's lock but not yet released it.
//!
//! Compiled in only with the `shm-test-hooks` cargo feature; without it
//! [`point`] is an empty inline function. Armed at run time by
//! `HANDOFF_SHM_HOOK=<point>`; the only point is `mid-recovery`.

/// Dies here (SIGKILL) if `HANDOFF_SHM_HOOK` names this point.
#[cfg(feature = "shm-test-hooks")]
pub(crate) fn point(name: &'static str) {
    use std::sync::OnceLock;
    static ARMED: OnceLock<Option<String>> = OnceLock::new();
    let armed = ARMED.get_or_init(|| std::env::var("HANDOFF_SHM_HOOK").ok());
    if armed.as_deref() == Some(name) {
        eprintln!("handoff[{}]: shm hook {name}: SIGKILL", std::process::id());
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
        std::process::abort();
    }
}

#[cfg(not(feature = "shm-test-hooks"))]
#[inline(always)]
pub(crate) fn point(_name: &'static str) {}
