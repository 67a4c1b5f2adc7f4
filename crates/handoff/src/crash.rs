//! Fault injection: named points at exact protocol steps where a test can
//! make this process die as abruptly as `kill -9` would (docs/design.md §7).
//!
//! Compiled in only with the `crash-points` cargo feature; without it
//! [`point`] is an empty inline function. With it, the process dies at the
//! point named by `HANDOFF_CRASH_AT` (read once): SIGKILL to itself — no
//! destructors, no flushing, no unwinding, exactly like an OOM kill.
//!
//! Names are prefixed by role (`s-`, `o-`, `n-`), so one variable inherited
//! by every process of a service only ever fires in the role it names.

/// Every crash point, with the survivor the crash matrix expects and what
/// brings the service back to exactly one healthy incumbent.
pub const POINTS: &[CrashPoint] = &[
    CrashPoint::new("s-after-spawn", Survivor::Old, "the successor finds the supervisor gone when it says Hello and exits; the incumbent was never asked to drain"),
    CrashPoint::new("s-after-incumbent-hello", Survivor::Old, "nothing was asked of the incumbent yet: it keeps serving; the successor (spawned just before) finds the supervisor gone and exits"),
    CrashPoint::new("s-after-incumbent-helloack", Survivor::Old, "incumbent sees EOF before PrepareHandoff and keeps serving; the successor finds the supervisor gone and exits"),
    CrashPoint::new("s-after-successor-hello", Survivor::Old, "successor sees EOF and exits; incumbent untouched"),
    CrashPoint::new("s-after-successor-helloack", Survivor::Old, "successor sees EOF waiting for Begin and exits"),
    CrashPoint::new("s-holding-prepared", Survivor::Old, "the supervisor died holding a successor prepared ahead: it sees EOF waiting for Begin and exits (the restarted supervisor's recovery stops it otherwise); the incumbent was never told anything"),
    CrashPoint::new("s-after-prepare", Survivor::Old, "incumbent finishes draining, finds the supervisor gone, resumes; successor exits on EOF"),
    CrashPoint::new("s-after-drained", Survivor::Old, "incumbent (drained; from version 5 already sealing) sees EOF, takes its lock back if it sealed, and resumes; successor exits on EOF"),
    CrashPoint::new("s-after-seal-request", Survivor::Old, "an incumbent at version 4 (from 5 it seals unasked) seals, then finds the supervisor gone and re-takes the free state lock"),
    CrashPoint::new("s-after-sealed", Survivor::Old, "incumbent (sealed) re-takes the state lock; successor never got Begin and exits"),
    CrashPoint::new("s-after-begin", Survivor::Old, "the supervisor never read Ready: the successor sees EPIPE or a reset (not EOF) and exits, releasing the lock, which the incumbent re-takes"),
    CrashPoint::new("s-after-ready", Survivor::New, "successor said Ready: it is the incumbent; the old one cannot re-take the lock and retires"),
    CrashPoint::new("s-after-commit", Survivor::New, "committed: the old process retires, the new one serves"),
    CrashPoint::new("o-in-drain", Survivor::New, "incumbent died: the supervisor continues with the successor (the kernel released the lock)"),
    CrashPoint::new("o-after-drained", Survivor::New, "incumbent died: the supervisor continues with the successor"),
    CrashPoint::new("o-in-seal", Survivor::New, "incumbent died mid-seal: the supervisor continues with the successor"),
    CrashPoint::new("o-after-seal-complete", Survivor::New, "incumbent died after sealing: the handoff goes on to Ready and Commit"),
    CrashPoint::new("o-after-commit", Survivor::New, "the old process died while retiring: nothing to do"),
    CrashPoint::new("n-after-hello", Survivor::Old, "supervisor aborts: successor reaped, incumbent never drained"),
    CrashPoint::new("n-after-begin", Survivor::Old, "supervisor aborts: incumbent told to resume, re-takes the lock"),
    CrashPoint::new("n-after-lock", Survivor::Old, "supervisor aborts: the kernel released the dead successor's lock; incumbent re-takes it"),
    CrashPoint::new("n-before-ready", Survivor::Old, "supervisor aborts; incumbent resumes and re-binds the control socket"),
    CrashPoint::new("n-after-ready", Survivor::Restarted, "committed to a process that then died: the supervisor restarts the service"),
    // Moving connections (protocol version 3, docs/connection-transfer.md).
    CrashPoint::new("o-in-transfer", Survivor::New, "incumbent died after sending a batch of connections: the supervisor continues with the successor, which serves the moved ones after Ready; the rest closed with the incumbent"),
    CrashPoint::new("s-after-moved", Survivor::Old, "version 4: the supervisor died once every connection had gone straight to the successor (ConnectionsDone): the incumbent still holds its copies and resumes them; the successor exits on EOF, its copies close without a FIN"),
    CrashPoint::new("s-relaying", Survivor::Old, "the supervisor died holding a batch (its copies close with it): the incumbent still holds every connection and resumes them; the successor exits on EOF, its copies close without a FIN"),
    // Replacing the supervisor in place (`handoff upgrade --supervisor`,
    // in the handoff binary: docs/design.md §9).
    CrashPoint::new("s-before-reexec", Survivor::Old, "the supervisor died about to exec its new binary (no handoff in flight): the incumbent serves on; a restarted supervisor re-attaches"),
    CrashPoint::new("s-reexec-taking-over", Survivor::Old, "the new supervisor binary died after the exec, holding the carried locks, before it re-attached: the same as a supervisor crash; a restarted one re-attaches"),
    CrashPoint::new("n-after-adopt", Survivor::Old, "successor died holding moved connections before Ready: the supervisor aborts and the incumbent resumes its own copies"),
];

/// Which process serves once the dust settles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Survivor {
    /// The incumbent of before the handoff.
    Old,
    /// The successor.
    New,
    /// Neither: a fresh process started by the supervisor's crash restart.
    Restarted,
}

/// One named point.
#[derive(Debug, Clone, Copy)]
pub struct CrashPoint {
    /// What `HANDOFF_CRASH_AT` names to arm it, prefixed by the role it
    /// fires in (`s-`, `o-`, `n-`).
    pub name: &'static str,
    /// Which process the crash matrix expects to serve once things settle.
    pub survivor: Survivor,
    /// How the service gets back to one healthy incumbent after a crash
    /// there, in words (docs/crash-matrix.md has the reasoning).
    pub recovery: &'static str,
}

impl CrashPoint {
    const fn new(name: &'static str, survivor: Survivor, recovery: &'static str) -> CrashPoint {
        CrashPoint {
            name,
            survivor,
            recovery,
        }
    }
}

/// Dies here if `HANDOFF_CRASH_AT` names this point.
#[cfg(feature = "crash-points")]
pub fn point(name: &'static str) {
    use std::sync::OnceLock;
    static ARMED: OnceLock<Option<String>> = OnceLock::new();
    let armed = ARMED.get_or_init(|| std::env::var("HANDOFF_CRASH_AT").ok());
    if armed.as_deref() == Some(name) {
        debug_assert!(
            POINTS.iter().any(|p| p.name == name),
            "unlisted crash point {name}"
        );
        // Straight to stderr (unbuffered) so test logs say why we died, in
        // one write: other processes share the stream, and `eprintln!` may
        // split a line into several writes that theirs can land between.
        let line = format!(
            "handoff[{}]: crash point {name}: SIGKILL\n",
            std::process::id()
        );
        let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes());
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
        // SIGKILL cannot be caught; if raise somehow failed, still never
        // run another line of protocol.
        std::process::abort();
    }
}

/// [`point`] when `armed` — the supervisor's points fire only during an
/// upgrade, not while it starts the first incumbent (a handoff from nobody
/// that walks through the same steps).
#[inline(always)]
pub fn point_if(armed: bool, name: &'static str) {
    if armed {
        point(name)
    }
}

/// Without the `crash-points` feature: nothing at all.
#[cfg(not(feature = "crash-points"))]
#[inline(always)]
pub fn point(_name: &'static str) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_role_prefixed() {
        let mut seen = std::collections::HashSet::new();
        for p in POINTS {
            assert!(seen.insert(p.name), "duplicate {}", p.name);
            assert!(
                ["s-", "o-", "n-"].iter().any(|r| p.name.starts_with(r)),
                "{}",
                p.name
            );
        }
        assert!(POINTS.len() >= 22);
    }

    /// docs/crash-matrix.md lists every point with the survivor above.
    #[test]
    fn the_documented_table_matches() {
        let doc = include_str!("../../../docs/crash-matrix.md");
        for p in POINTS {
            let survivor = match p.survivor {
                Survivor::Old => "old incumbent",
                Survivor::New => "successor",
                Survivor::Restarted => "a restarted incumbent",
            };
            let row = doc
                .lines()
                .find(|l| l.starts_with(&format!("| `{}` |", p.name)))
                .unwrap_or_else(|| panic!("{} missing from docs/crash-matrix.md", p.name));
            assert!(row.contains(&format!("| {survivor} |")), "{row}");
        }
    }

    /// Every listed point is placed in the code exactly once.
    #[test]
    fn every_point_is_placed() {
        let src = [
            include_str!("supervisor/handoff/mod.rs"),
            include_str!("supervisor/handoff/drive.rs"),
            include_str!("supervisor/handoff/run.rs"),
            include_str!("supervisor/handoff/greeting.rs"),
            include_str!("supervisor/handoff/draining.rs"),
            include_str!("supervisor/handoff/held.rs"),
            include_str!("supervisor/handoff/ending.rs"),
            include_str!("supervisor/prepared.rs"),
            include_str!("incumbent/conversation.rs"),
            include_str!("successor.rs"),
            include_str!("moving/sender.rs"),
            include_str!("moving/inbound.rs"),
            // The handoff binary's re-exec (its points fire in the supervisor).
            include_str!("../../handoff-cli/src/run/requests.rs"),
            include_str!("../../handoff-cli/src/run/mod.rs"),
        ]
        .concat();
        for p in POINTS {
            let needle = format!("\"{}\");", p.name);
            assert_eq!(
                src.matches(&needle).count(),
                1,
                "{} placed {} times",
                p.name,
                src.matches(&needle).count()
            );
        }
    }
}
