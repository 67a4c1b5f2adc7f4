//! Accept loops that outlive running out of descriptors.
//!
//! A failed `accept(2)` for want of a descriptor (`EMFILE`, `ENFILE`)
//! leaves the pending connection in the backlog, so retrying at once fails
//! again at once: a loop that logs and retries spins a core and fills the
//! disk (4.1 million "Too many open files" lines in 5 s under `ulimit -n
//! 64`). A loop that returns on the first failure instead turns a moment
//! of descriptor pressure into the service exiting. [`AcceptBackoff`] is
//! the middle way: retry what can pass after a growing pause, stop only on
//! errors that mean the socket itself is gone, and say so at most every
//! few seconds with a count of what was not said.

use std::io;
use std::time::{Duration, Instant};

/// Shortest pause after a failed accept.
pub const MIN_PAUSE: Duration = Duration::from_millis(5);
/// Longest pause: how late a connection may be accepted once descriptors
/// are free again.
pub const MAX_PAUSE: Duration = Duration::from_millis(500);
/// At most one log line per this long while failures go on.
pub const SAY_EVERY: Duration = Duration::from_secs(5);

/// What to do after a failed accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The listening socket is gone or unusable: retrying would spin.
    Fatal,
    /// Transient; [`AcceptBackoff::failed`] has paused already. `say`:
    /// log this one now, adding that `suppressed` failures since the last
    /// line went unlogged.
    Retry {
        /// Whether to log this failure now (at most one line per
        /// [`SAY_EVERY`]).
        say: bool,
        /// Failures that went unlogged since the last line; 0 when `say`
        /// is false.
        suppressed: u64,
    },
}

/// Pause and log-rate state of one accept loop.
///
/// At most one line per [`SAY_EVERY`], failure or recovery alike: a loop
/// that flaps (one descriptor freed, one connection accepted, out again)
/// would otherwise log twice per connection.
#[derive(Debug)]
pub struct AcceptBackoff {
    pause: Duration,
    say_every: Duration,
    said_at: Option<Instant>,
    /// Failures not logged since the last line.
    unsaid: u64,
    /// Failures since the last success.
    failing: bool,
}

impl Default for AcceptBackoff {
    fn default() -> Self {
        AcceptBackoff {
            pause: MIN_PAUSE,
            say_every: SAY_EVERY,
            said_at: None,
            unsaid: 0,
            failing: false,
        }
    }
}

impl AcceptBackoff {
    /// A loop that has not failed yet: the first pause is [`MIN_PAUSE`].
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether a line may be logged now; if so, counts it as logged and
    /// returns the failures that went unlogged before it.
    fn say(&mut self) -> Option<u64> {
        if self.said_at.is_some_and(|t| t.elapsed() < self.say_every) {
            return None;
        }
        self.said_at = Some(Instant::now());
        Some(std::mem::take(&mut self.unsaid))
    }

    /// After a failed accept: decides, and for a transient failure sleeps
    /// the current pause (doubling it up to [`MAX_PAUSE`]) before
    /// returning, so the caller simply retries.
    pub fn failed(&mut self, e: &io::Error) -> Verdict {
        if !crate::sys::accept::is_transient(e) {
            return Verdict::Fatal;
        }
        self.failing = true;
        let verdict = match self.say() {
            Some(suppressed) => Verdict::Retry {
                say: true,
                suppressed,
            },
            None => {
                self.unsaid += 1;
                Verdict::Retry {
                    say: false,
                    suppressed: 0,
                }
            }
        };
        // EINTR and a connection that died in the backlog are over at
        // once; only running out of something needs the pause.
        if !matches!(
            e.kind(),
            io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
        ) {
            std::thread::sleep(self.pause);
            self.pause = (self.pause * 2).min(MAX_PAUSE);
        }
        verdict
    }

    /// After a successful accept: resets the pause. `Some(n)` when the
    /// caller should say the loop accepts again, `n` failures since the
    /// last line having gone unlogged (`None` after no failure, or when a
    /// line was logged too recently: the count then goes in the next one).
    pub fn succeeded(&mut self) -> Option<u64> {
        self.pause = MIN_PAUSE;
        if !std::mem::take(&mut self.failing) {
            return None;
        }
        self.say()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_failures_pause_and_are_said_rarely() {
        let mut b = AcceptBackoff::new();
        let emfile = io::Error::from_raw_os_error(libc::EMFILE);
        let started = Instant::now();
        let said = Verdict::Retry {
            say: true,
            suppressed: 0,
        };
        assert_eq!(b.failed(&emfile), said);
        for _ in 0..5 {
            assert!(matches!(
                b.failed(&emfile),
                Verdict::Retry { say: false, .. }
            ));
        }
        // 5 + 10 + 20 + 40 + 80 + 160 ms of pauses.
        assert!(started.elapsed() >= Duration::from_millis(300));
        // Said too recently: the recovery waits for the next line.
        assert_eq!(b.succeeded(), None);
        assert!(matches!(
            b.failed(&emfile),
            Verdict::Retry { say: false, .. }
        ));
        b.say_every = Duration::ZERO;
        assert_eq!(
            b.failed(&emfile),
            Verdict::Retry {
                say: true,
                suppressed: 6
            }
        );
        assert_eq!(b.succeeded(), Some(0));
        assert_eq!(b.succeeded(), None, "no failure since");
        assert_eq!(
            b.failed(&io::Error::from_raw_os_error(libc::EBADF)),
            Verdict::Fatal
        );
    }
}
