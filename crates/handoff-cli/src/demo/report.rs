//! The demo's final summary (stdout) and its verdict.

use std::fmt::Write as _;
use std::time::Duration;

use handoff_load::blocking::{LoadReport, VerifyReport};

use super::upgrades::{Outcome, UpgradeRecord};

/// `31204` → `31,204`.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `negotiating 1.31 · draining 0.15 · …` (milliseconds).
pub fn phases_inline(phases: &[(String, f64)]) -> String {
    phases
        .iter()
        .map(|(name, ms)| format!("{name} {ms:.2}"))
        .collect::<Vec<_>>()
        .join(" · ")
}

/// Nearest-rank percentile of sorted values (`p` in 0..=100).
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len()) - 1).copied()
}

/// The median (mean of the two middle values for an even count).
pub fn median(sorted: &[f64]) -> Option<f64> {
    let n = sorted.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(sorted[n / 2]),
        _ => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2.0),
    }
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

/// Per-phase medians over the committed upgrades, phases in the order they happen.
pub fn phase_medians(upgrades: &[UpgradeRecord]) -> Vec<(String, f64)> {
    let mut names: Vec<&str> = Vec::new();
    for u in upgrades.iter().filter(|u| u.committed()) {
        for (name, _) in &u.phases {
            if !names.contains(&name.as_str()) {
                names.push(name);
            }
        }
    }
    names
        .into_iter()
        .filter_map(|name| {
            let times = upgrades
                .iter()
                .filter(|u| u.committed())
                .flat_map(|u| {
                    u.phases
                        .iter()
                        .filter(|(n, _)| n == name)
                        .map(|(_, ms)| *ms)
                })
                .collect();
            median(&sorted(times)).map(|m| (name.to_owned(), m))
        })
        .collect()
}

/// Everything the summary reports.
pub struct Facts<'a> {
    /// How long the load ran.
    pub elapsed: Duration,
    /// Why the run ended.
    pub ended_by: String,
    pub keepalive_clients: usize,
    pub fresh_clients: usize,
    pub load: &'a LoadReport,
    pub verify: &'a VerifyReport,
    pub upgrades: &'a [UpgradeRecord],
    pub supervisor_pid: u32,
    /// Service processes the demo knew of (each checked gone at the end).
    pub service_pids: Vec<u32>,
    /// Processes still running after the supervisor stopped, which the demo then killed.
    pub left_running: Vec<u32>,
    /// Anything else that went wrong (supervisor died, cleanup failed…).
    pub problems: Vec<String>,
    /// The supervisor's last stderr lines, shown when something failed.
    pub supervisor_log: Vec<String>,
}

impl Facts<'_> {
    /// Failed requests during the load plus acknowledged writes not intact at read-back.
    pub fn errors(&self) -> u64 {
        self.load.failure_count() + self.verify.problem_count()
    }

    /// Why the demo failed, or `None` if it proved its point.
    pub fn failure(&self) -> Option<String> {
        let mut why = Vec::new();
        let failed = self.load.failure_count();
        if failed > 0 {
            why.push(format!("{} failed requests", thousands(failed)));
        }
        let lost = self.verify.problem_count();
        if lost > 0 {
            why.push(format!(
                "{} acknowledged writes missing or wrong at read-back",
                thousands(lost)
            ));
        }
        let aborted = self.upgrades.iter().filter(|u| !u.committed()).count();
        if aborted > 0 {
            why.push(format!(
                "{aborted} of {} upgrades aborted",
                self.upgrades.len()
            ));
        }
        if !self.left_running.is_empty() {
            why.push(format!(
                "processes left running after the supervisor stopped: {:?}",
                self.left_running
            ));
        }
        why.extend(self.problems.iter().cloned());
        (!why.is_empty()).then(|| why.join("; "))
    }

    /// The summary table.
    pub fn render(&self) -> String {
        let mut o = String::new();
        let l = self.load;
        let secs = self.elapsed.as_secs_f64();
        let row = |o: &mut String, name: &str, value: String| {
            let _ = writeln!(o, "  {name:<26}{value}");
        };
        let _ = writeln!(o, "\nhandoff demo summary");
        row(
            &mut o,
            "duration",
            format!("{secs:.1} s ({})", self.ended_by),
        );
        row(
            &mut o,
            "clients",
            format!(
                "{} keep-alive + {} fresh connection per request",
                self.keepalive_clients, self.fresh_clients
            ),
        );
        row(
            &mut o,
            "requests",
            format!(
                "{} ok ({}/s)",
                thousands(l.ok),
                thousands((l.ok as f64 / secs.max(1e-9)).round() as u64)
            ),
        );
        row(&mut o, "errors", thousands(self.errors()));
        let kinds = [
            ("refused", l.refused),
            ("reset", l.reset),
            ("eof before response", l.eof_before_response),
            ("eof mid-response", l.eof_mid),
            ("timeout", l.timeouts),
            ("bad status", l.bad_status),
            ("mismatch", l.mismatches),
            ("other", l.other),
            ("lost at read-back", self.verify.problem_count()),
        ];
        for (kind, n) in kinds {
            row(&mut o, &format!("  {kind}"), thousands(n));
        }
        row(
            &mut o,
            "stale keep-alive retries",
            format!(
                "{} (idle connections the server closed; retried, not errors)",
                thousands(l.stale_retries + self.verify.stale_retries)
            ),
        );
        let v = self.verify;
        row(
            &mut o,
            "acknowledged writes",
            format!(
                "{} read back: {} intact, {} missing, {} wrong, {} unreadable",
                thousands(v.checked),
                thousands(v.checked.saturating_sub(v.problem_count())),
                thousands(v.missing),
                thousands(v.wrong),
                thousands(v.failed)
            ),
        );
        let committed = self.upgrades.iter().filter(|u| u.committed()).count();
        let aborted = self.upgrades.len() - committed;
        row(
            &mut o,
            "upgrades",
            format!("{committed} committed, {aborted} aborted"),
        );
        for u in self.upgrades.iter().filter(|u| !u.committed()) {
            if let Outcome::Aborted { phase, reason } = &u.outcome {
                let _ = writeln!(
                    o,
                    "    #{} at {:.1} s{}: {reason}",
                    u.number,
                    u.at.as_secs_f64(),
                    phase
                        .as_deref()
                        .map(|p| format!(" in {p}"))
                        .unwrap_or_default()
                );
            }
        }
        let totals = sorted(self.upgrades.iter().filter_map(|u| u.total_ms()).collect());
        if let (Some(min), Some(med), Some(p99), Some(max)) = (
            totals.first(),
            median(&totals),
            percentile(&totals, 99.0),
            totals.last(),
        ) {
            row(
                &mut o,
                "handoff time (ms)",
                format!("min {min:.2}  median {med:.2}  p99 {p99:.2}  max {max:.2}"),
            );
            row(
                &mut o,
                "phase medians (ms)",
                phases_inline(&phase_medians(self.upgrades)),
            );
        } else if self.upgrades.is_empty() {
            row(
                &mut o,
                "handoff time",
                "no upgrade ran (use a --duration longer than --interval)".into(),
            );
        }
        row(
            &mut o,
            "processes",
            format!(
                "supervisor {} and {} service processes {}: {}",
                self.supervisor_pid,
                self.service_pids.len(),
                pid_list(&self.service_pids),
                if self.left_running.is_empty() {
                    "none left running".to_owned()
                } else {
                    format!("{:?} were left running (killed)", self.left_running)
                }
            ),
        );
        let _ = writeln!(o);
        match self.failure() {
            None => {
                let _ = writeln!(
                    o,
                    "PASS: 0 errors, every acknowledged write intact, {committed}/{} upgrades committed",
                    self.upgrades.len()
                );
            }
            Some(why) => {
                let _ = writeln!(o, "FAIL: {why}");
                let first: Vec<&String> = l.failures.iter().chain(&v.problems).take(10).collect();
                if !first.is_empty() {
                    let _ = writeln!(o, "first failures:");
                    for f in first {
                        let _ = writeln!(o, "  - {f}");
                    }
                }
                if !self.supervisor_log.is_empty() {
                    let _ = writeln!(o, "supervisor log (last lines):");
                    for line in &self.supervisor_log {
                        let _ = writeln!(o, "  | {line}");
                    }
                }
            }
        }
        o
    }
}

/// `(1201 1202 1203)`, or the first and last few of a long list.
fn pid_list(pids: &[u32]) -> String {
    let show = |p: &[u32]| p.iter().map(u32::to_string).collect::<Vec<_>>().join(" ");
    if pids.len() <= 12 {
        format!("({})", show(pids))
    } else {
        format!("({} … {})", show(&pids[..6]), show(&pids[pids.len() - 3..]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(31204), "31,204");
        assert_eq!(thousands(1234567), "1,234,567");
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(median(&v), Some(2.5));
        assert_eq!(median(&v[..3]), Some(2.0));
        assert_eq!(percentile(&v, 99.0), Some(4.0));
        assert_eq!(percentile(&v, 50.0), Some(2.0));
        assert_eq!(percentile(&[], 99.0), None);
    }

    #[test]
    fn phase_order_and_medians() {
        let rec = |n, phases: &[(&str, f64)]| UpgradeRecord {
            number: n,
            at: Duration::ZERO,
            phases: phases.iter().map(|(p, t)| (p.to_string(), *t)).collect(),
            outcome: Outcome::Committed {
                total_ms: 1.0,
                old_pid: None,
                new_pid: 1,
                warnings: vec![],
            },
        };
        let ups = [
            rec(1, &[("negotiating", 1.0), ("draining", 3.0)]),
            rec(2, &[("negotiating", 3.0), ("draining", 1.0)]),
            rec(3, &[("negotiating", 2.0), ("draining", 2.0)]),
        ];
        assert_eq!(
            phase_medians(&ups),
            vec![("negotiating".into(), 2.0), ("draining".into(), 2.0)]
        );
        assert_eq!(
            phases_inline(&ups[0].phases),
            "negotiating 1.00 · draining 3.00"
        );
    }
}
