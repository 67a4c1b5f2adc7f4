//! The demo's live output on stderr: on a terminal, one status line redrawn in place about
//! four times a second; otherwise (a log, a pipe) one line per upgrade.

use std::collections::VecDeque;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use super::report::{phases_inline, thousands};
use super::sys;
use super::upgrades::{Outcome, UpgradeRecord};

/// How often the terminal status line is redrawn.
pub const REDRAW: Duration = Duration::from_millis(250);
/// The request rate shown is over about this much recent time.
const RATE_WINDOW: Duration = Duration::from_secs(1);

/// Erase the whole line and go back to its start.
const CLEAR: &str = "\r\x1b[2K";

pub struct StatusLine {
    tty: bool,
    /// `(when, ok requests)`, oldest first, spanning a little over [`RATE_WINDOW`].
    samples: VecDeque<(Instant, u64)>,
    /// A status line is on screen (and must be erased before other output).
    drawn: bool,
}

/// What the status shows at one instant.
pub struct Snapshot<'a> {
    pub elapsed: Duration,
    pub ok: u64,
    pub errors: u64,
    pub upgrades: &'a [UpgradeRecord],
}

impl StatusLine {
    pub fn new() -> StatusLine {
        StatusLine {
            tty: std::io::stderr().is_terminal(),
            samples: VecDeque::new(),
            drawn: false,
        }
    }

    /// Records a sample of the request count and returns the recent rate per second.
    fn rate(&mut self, ok: u64) -> f64 {
        let now = Instant::now();
        self.samples.push_back((now, ok));
        while self.samples.len() > 2
            && self
                .samples
                .get(1)
                .is_some_and(|(t, _)| now.duration_since(*t) >= RATE_WINDOW)
        {
            self.samples.pop_front();
        }
        match self.samples.front() {
            Some(&(t, n)) if now.duration_since(t) >= Duration::from_millis(100) => {
                ok.saturating_sub(n) as f64 / now.duration_since(t).as_secs_f64()
            }
            _ => 0.0,
        }
    }

    /// Called on every tick: redraws the terminal status line.
    pub fn tick(&mut self, s: &Snapshot<'_>) {
        let rate = self.rate(s.ok);
        if !self.tty {
            return;
        }
        let committed = s.upgrades.iter().filter(|u| u.committed()).count();
        let mut head = format!(
            "{:>5.1}s  requests {} ({}/s)  errors {}  upgrades {committed}/{}",
            s.elapsed.as_secs_f64(),
            thousands(s.ok),
            thousands(rate.round() as u64),
            thousands(s.errors),
            s.upgrades.len()
        );
        let mut detail = String::new();
        if let Some(last) = s.upgrades.last() {
            match &last.outcome {
                Outcome::Committed { total_ms, .. } => {
                    head.push_str(&format!("  last handoff {total_ms:.2} ms"));
                    detail = format!(" [{}]", phases_inline(&last.phases));
                }
                Outcome::Aborted { reason, .. } => {
                    head.push_str("  last upgrade ABORTED");
                    detail = format!(": {reason}");
                }
            }
        }
        let width = sys::stderr_columns()
            .unwrap_or(usize::MAX)
            .saturating_sub(1);
        let mut line = format!("  {head}{detail}");
        if line.chars().count() > width {
            // Too wide: a wrapped line could not be redrawn in place.
            line = format!("  {head}");
            if line.chars().count() > width {
                line = line.chars().take(width).collect();
            }
        }
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "{CLEAR}{line}");
        let _ = err.flush();
        self.drawn = true;
    }

    /// Called once per finished upgrade: off a terminal, prints one line for it.
    pub fn upgrade_done(&mut self, s: &Snapshot<'_>, rec: &UpgradeRecord) {
        if self.tty {
            if let Outcome::Aborted { .. } = rec.outcome {
                // Keep aborts visible above the status line.
                self.print(&describe_upgrade(rec));
            }
            return;
        }
        let rate = self.rate(s.ok);
        self.print(&format!(
            "{}  requests {} ({}/s)  errors {}",
            describe_upgrade(rec),
            thousands(s.ok),
            thousands(rate.round() as u64),
            thousands(s.errors)
        ));
    }

    /// Prints a line of its own on stderr (above the status line, which the next tick
    /// redraws).
    pub fn print(&mut self, msg: &str) {
        let mut err = std::io::stderr().lock();
        if self.drawn {
            let _ = write!(err, "{CLEAR}");
            self.drawn = false;
        }
        let _ = writeln!(err, "{msg}");
        let _ = err.flush();
    }

    /// Erases the status line, for the output that follows.
    pub fn clear(&mut self) {
        if self.drawn {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "{CLEAR}");
            let _ = err.flush();
            self.drawn = false;
        }
    }
}

/// `  6.0s  upgrade 3 committed in 2.41 ms [negotiating 1.31 · …]  pid 10 -> 11`
pub fn describe_upgrade(rec: &UpgradeRecord) -> String {
    let at = rec.at.as_secs_f64();
    match &rec.outcome {
        Outcome::Committed {
            total_ms,
            old_pid,
            new_pid,
            ..
        } => format!(
            "{at:>5.1}s  upgrade {} committed in {total_ms:.2} ms [{}]  pid {} -> {new_pid}",
            rec.number,
            phases_inline(&rec.phases),
            old_pid.map_or_else(|| "-".to_owned(), |p| p.to_string()),
        ),
        Outcome::Aborted { phase, reason } => format!(
            "{at:>5.1}s  upgrade {} ABORTED{}: {reason}",
            rec.number,
            phase
                .as_deref()
                .map(|p| format!(" in {p}"))
                .unwrap_or_default()
        ),
    }
}
