//! Pre-copy catch-up: a successor with state brings itself up to date with
//! what the incumbent writes *while* it warms up, round after round, and says
//! Hello only once a round finds little left (docs/design.md §2.7).
//!
//! Why: warming up a store of any size takes time (reading a snapshot,
//! replaying a log), and the incumbent keeps writing meanwhile. Whatever
//! the successor has not read when the incumbent seals it must read after
//! Begin, inside the accept gap, while no process accepts. Without catch-up
//! that tail is the write rate × the whole warm-up: tens of milliseconds of
//! refused-looking latency at a few seconds of warm-up under load. With
//! it, the tail is what was written during one short round plus the drain:
//! the accept gap stops growing with the data.
//!
//! The same shape as VM live migration's pre-copy: each round copies what
//! was dirtied during the previous one; rounds shrink as long as reading is
//! faster than writing; a cap on rounds and time ends a race that does not
//! converge (the tail is then simply read after Begin, as without
//! catch-up — slower, never wrong).
//!
//! The service provides the rounds ([`CatchUp`]); [`Boot::catch_up`]
//! (or `handoff-tokio`'s `Builder::catch_up`) drives them between warm-up
//! and Hello, and the report reaches the supervisor in Ready (its upgrade
//! report shows the rounds).
//!
//! [`Boot::catch_up`]: crate::Boot::catch_up

use std::time::{Duration, Instant};

use crate::process::ServiceError;

/// What one catch-up round read and applied: the incumbent's writes since
/// the previous round.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CatchUpRound {
    /// Records (writes, log entries) applied.
    pub records: u64,
    /// Bytes read for them.
    pub bytes: u64,
}

/// A service's state that can be brought up to date with the incumbent's
/// writes, a round at a time, *without* the state lock.
///
/// A round reads what was written since the previous one (for a log: from
/// the offset reached so far to the current end, keeping a record caught
/// half-written for the next round) and applies it. It must be safe to run
/// while the incumbent writes, and must leave whatever it could not
/// finish for the next round or for the final read after Begin.
pub trait CatchUp {
    /// Reads and applies what was written since the previous round.
    fn round(&mut self) -> Result<CatchUpRound, ServiceError>;
}

impl<F> CatchUp for F
where
    F: FnMut() -> Result<CatchUpRound, ServiceError>,
{
    fn round(&mut self) -> Result<CatchUpRound, ServiceError> {
        self()
    }
}

/// When catch-up stops: a round small enough (converged), or a cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct CatchUpPolicy {
    /// Converged once a round applied at most this many records…
    pub max_tail_records: u64,
    /// …and at most this many bytes.
    pub max_tail_bytes: u64,
    /// Rounds at most: writes faster than the successor reads never
    /// converge; stop and leave the tail for after Begin.
    pub max_rounds: u32,
    /// Time at most, all rounds together. The supervisor's Hello budget
    /// ([`Timeouts::hello`](crate::Timeouts::hello)) bounds warm-up and
    /// catch-up together: keep this well under it.
    pub max_time: Duration,
}

impl Default for CatchUpPolicy {
    /// A round of at most 1,024 records and 1 MiB (about a millisecond of
    /// replay), 32 rounds, 2 seconds.
    fn default() -> Self {
        CatchUpPolicy {
            max_tail_records: 1024,
            max_tail_bytes: 1 << 20,
            max_rounds: 32,
            max_time: Duration::from_secs(2),
        }
    }
}

impl CatchUpPolicy {
    /// The default policy, converged once a round applied at most
    /// `records` records and `bytes` bytes.
    pub fn until_tail(records: u64, bytes: u64) -> CatchUpPolicy {
        CatchUpPolicy {
            max_tail_records: records,
            max_tail_bytes: bytes,
            ..CatchUpPolicy::default()
        }
    }

    /// This policy with at most `rounds` rounds and `time` in all.
    pub fn capped(self, rounds: u32, time: Duration) -> CatchUpPolicy {
        CatchUpPolicy {
            max_rounds: rounds.max(1),
            max_time: time,
            ..self
        }
    }
}

/// What catch-up did, for the logs and the supervisor's upgrade report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CatchUpReport {
    /// Rounds run.
    pub rounds: u32,
    /// Records applied over all rounds.
    pub records: u64,
    /// Bytes read over all rounds.
    pub bytes: u64,
    /// The last round: what was left when catch-up stopped.
    pub last: CatchUpRound,
    /// Whether the last round was within the policy's bound (otherwise a
    /// cap stopped it).
    pub converged: bool,
    /// All rounds together.
    pub took: Duration,
}

/// The key of the report in Ready's metadata.
pub(crate) const METADATA_KEY: &str = "catch_up";

impl CatchUpReport {
    /// Runs rounds of `src` until one is within `policy`'s bound or a cap
    /// is reached. A round's error ends catch-up with that error: the
    /// successor cannot know its state is whole, and must not say Hello.
    pub fn run(
        src: &mut dyn CatchUp,
        policy: &CatchUpPolicy,
    ) -> Result<CatchUpReport, ServiceError> {
        let started = Instant::now();
        let mut report = CatchUpReport::default();
        loop {
            let r = src.round()?;
            report.add_round(r);
            if r.records <= policy.max_tail_records && r.bytes <= policy.max_tail_bytes {
                report.converged = true;
                break;
            }
            if report.rounds >= policy.max_rounds.max(1) || started.elapsed() >= policy.max_time {
                break;
            }
        }
        report.took = started.elapsed();
        Ok(report)
    }

    /// Counts one more round (run while waiting for Begin).
    pub(crate) fn add_round(&mut self, r: CatchUpRound) {
        self.rounds += 1;
        self.records += r.records;
        self.bytes += r.bytes;
        self.last = r;
    }

    /// As carried in Ready's metadata: `rounds=3 records=1200 bytes=48000
    /// last_records=12 last_bytes=480 took_us=5300 converged=1`.
    pub(crate) fn to_metadata(self) -> String {
        format!(
            "rounds={} records={} bytes={} last_records={} last_bytes={} took_us={} converged={}",
            self.rounds,
            self.records,
            self.bytes,
            self.last.records,
            self.last.bytes,
            self.took.as_micros(),
            u8::from(self.converged)
        )
    }

    /// Parses the form the successor's Ready metadata carries. Unknown keys are
    /// skipped (a newer successor may say more); a malformed value or no
    /// `rounds` gives `None` — it is a report, never a reason to fail.
    pub fn from_metadata(s: &str) -> Option<CatchUpReport> {
        let mut r = CatchUpReport::default();
        let mut rounds = None;
        for kv in s.split_ascii_whitespace() {
            let (k, v) = kv.split_once('=')?;
            let n: u64 = v.parse().ok()?;
            match k {
                "rounds" => rounds = Some(u32::try_from(n).ok()?),
                "records" => r.records = n,
                "bytes" => r.bytes = n,
                "last_records" => r.last.records = n,
                "last_bytes" => r.last.bytes = n,
                "took_us" => r.took = Duration::from_micros(n),
                "converged" => r.converged = n != 0,
                _ => {}
            }
        }
        r.rounds = rounds?;
        Some(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each round finds what the writer added during the previous one,
    /// less and less: the reader converges at the first round within the
    /// bound, and later rounds are not run.
    #[test]
    fn rounds_run_until_a_round_is_within_the_bound() {
        let mut pending = [5000u64, 900, 40, 3, 0].into_iter();
        let mut src = || -> Result<CatchUpRound, ServiceError> {
            let n = pending.next().unwrap_or(0);
            Ok(CatchUpRound {
                records: n,
                bytes: n * 40,
            })
        };
        let r = CatchUpReport::run(&mut src, &CatchUpPolicy::until_tail(50, 1 << 20)).unwrap();
        assert_eq!(r.rounds, 3);
        assert_eq!(r.records, 5940);
        assert_eq!(r.last.records, 40);
        assert!(r.converged);
    }

    #[test]
    fn a_race_that_does_not_converge_stops_at_the_round_cap() {
        let mut src = || -> Result<CatchUpRound, ServiceError> {
            Ok(CatchUpRound {
                records: 10_000,
                bytes: 1,
            })
        };
        let policy = CatchUpPolicy::until_tail(100, 1 << 20).capped(4, Duration::from_secs(60));
        let r = CatchUpReport::run(&mut src, &policy).unwrap();
        assert_eq!(r.rounds, 4);
        assert!(!r.converged);
        assert_eq!(r.records, 40_000);
    }

    #[test]
    fn a_bytes_bound_alone_keeps_rounds_going() {
        let mut sizes = [1u64 << 22, 1 << 21, 10].into_iter();
        let mut src = || -> Result<CatchUpRound, ServiceError> {
            Ok(CatchUpRound {
                records: 1,
                bytes: sizes.next().unwrap_or(0),
            })
        };
        let r = CatchUpReport::run(&mut src, &CatchUpPolicy::until_tail(1024, 1 << 20)).unwrap();
        assert_eq!(r.rounds, 3);
        assert!(r.converged);
    }

    #[test]
    fn a_failed_round_is_the_error() {
        let mut n = 0;
        let mut src = || -> Result<CatchUpRound, ServiceError> {
            n += 1;
            if n == 2 {
                return Err("reading the log: Input/output error".into());
            }
            Ok(CatchUpRound {
                records: 1 << 20,
                bytes: 1 << 30,
            })
        };
        let e = CatchUpReport::run(&mut src, &CatchUpPolicy::default()).unwrap_err();
        assert!(e.to_string().contains("Input/output error"), "{e}");
    }

    #[test]
    fn the_metadata_form_round_trips_and_tolerates_more() {
        let r = CatchUpReport {
            rounds: 3,
            records: 1200,
            bytes: 48_000,
            last: CatchUpRound {
                records: 12,
                bytes: 480,
            },
            converged: true,
            took: Duration::from_micros(5300),
        };
        assert_eq!(CatchUpReport::from_metadata(&r.to_metadata()), Some(r));
        let newer = format!("{} shiny=7", r.to_metadata());
        assert_eq!(CatchUpReport::from_metadata(&newer), Some(r));
        assert_eq!(CatchUpReport::from_metadata("records=3"), None);
        assert_eq!(CatchUpReport::from_metadata("rounds=x"), None);
        assert_eq!(CatchUpReport::from_metadata("garbage"), None);
    }
}
