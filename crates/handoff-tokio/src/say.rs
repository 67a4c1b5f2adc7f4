//! Saying what happened, to whoever is listening.
//!
//! Events go to `tracing`. But most services that adopt this crate in
//! three lines install no subscriber, and then an accept loop starved of
//! file descriptors, or a handoff that failed, would be silent. So when no
//! subscriber is set, the few events an operator must see (warnings and
//! errors, never per-request noise) are also written to stderr as one line
//! each — which `handoff run` collects beside its own log.

use std::io::Write;

/// A warning or an error the operator must see.
pub(crate) fn warn(line: std::fmt::Arguments<'_>) {
    tracing::warn!(target: "handoff_tokio", "{line}");
    if !tracing::dispatcher::has_been_set() {
        // One write(2) per line: other processes share the stream.
        let text = format!("handoff-tokio[{}]: {line}\n", std::process::id());
        let _ = std::io::stderr().lock().write_all(text.as_bytes());
    }
}

/// Rate-limits a repeated warning: at most one line per `every`, saying
/// how many were held back since.
#[derive(Debug)]
pub(crate) struct Throttle {
    every: std::time::Duration,
    last: Option<std::time::Instant>,
    held: u64,
}

impl Throttle {
    pub(crate) fn new(every: std::time::Duration) -> Throttle {
        Throttle {
            every,
            last: None,
            held: 0,
        }
    }

    /// Whether to say it now; `Some(n)` with the number held back before.
    pub(crate) fn pass(&mut self) -> Option<u64> {
        let now = std::time::Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < self.every)
        {
            self.held += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.held))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_throttle_passes_the_first_and_counts_what_it_holds() {
        let mut t = Throttle::new(Duration::from_secs(3600));
        assert_eq!(t.pass(), Some(0));
        assert_eq!(t.pass(), None);
        assert_eq!(t.pass(), None);
        let mut t0 = Throttle::new(Duration::ZERO);
        assert_eq!(t0.pass(), Some(0));
        assert_eq!(t0.pass(), Some(0));
        t.last = Some(std::time::Instant::now() - Duration::from_secs(7200));
        assert_eq!(t.pass(), Some(2), "two were held back");
    }
}
