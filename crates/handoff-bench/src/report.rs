//! Turning a load run and its upgrade timeline into the numbers of the table.
//!
//! A request belongs to an *upgrade window* when it started within `window` after an
//! upgrade's trigger; every other request is *steady state*. The window is the same fixed
//! length for every contestant (and for the control, which has windows but no upgrades), so
//! nobody's numbers depend on their own idea of when an upgrade ended.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use handoff_load::failure::Kind;
use handoff_load::generator::LoadRun;

/// One upgrade as the harness saw it (µs after the run's epoch).
#[derive(Debug, Clone, Default)]
pub struct Upgrade {
    pub trigger_us: u64,
    /// Prepared upgrades: when `handoff upgrade --prepare` started (before the trigger);
    /// the upgrade window opens here instead of at the trigger.
    pub prepare_us: Option<u64>,
    /// How long that prepare took.
    pub prepare_ms: Option<f64>,
    /// The tool said it was done (handoff/shellflip: the command returned; ecdysis: the
    /// pid file names the new process).
    pub done_us: Option<u64>,
    pub old_pid: u32,
    pub new_pid: Option<u32>,
    /// The old process was gone (exited) by then.
    pub old_gone_us: Option<u64>,
    pub error: Option<String>,
}

/// Raw results of one or more load segments of a contestant. Segments run at different
/// times (contestants are interleaved in rounds so that they share the machine's background
/// noise alike); [`Segments::push`] shifts each onto one timeline, far enough apart that no
/// upgrade window spans two segments.
#[derive(Debug, Default)]
pub struct Segments {
    pub run: LoadRun,
    pub upgrades: Vec<Upgrade>,
    pub duration: Duration,
    /// handoff's own per-phase durations (ms), from `handoff run`'s log.
    pub phases: BTreeMap<String, Vec<f64>>,
    next_us: u64,
}

impl Segments {
    pub fn push(&mut self, mut run: LoadRun, mut upgrades: Vec<Upgrade>, duration: Duration) {
        let off = self.next_us;
        let shift = |t: &mut u64| *t += off;
        run.samples.iter_mut().for_each(|s| shift(&mut s.start_us));
        run.failures.iter_mut().for_each(|f| shift(&mut f.at_us));
        for u in &mut upgrades {
            shift(&mut u.trigger_us);
            u.prepare_us.iter_mut().for_each(shift);
            u.done_us.iter_mut().for_each(shift);
            u.old_gone_us.iter_mut().for_each(shift);
        }
        let last = run
            .samples
            .iter()
            .map(|s| s.start_us + s.latency_us)
            .chain(run.failures.iter().map(|f| f.at_us))
            .chain(upgrades.iter().filter_map(|u| u.old_gone_us.or(u.done_us)))
            .max()
            .unwrap_or(off);
        // A gap of an hour of virtual time between segments.
        self.next_us = last.max(off + duration.as_micros() as u64) + 3_600_000_000;
        self.run.samples.extend(run.samples);
        self.run.failures.extend(run.failures);
        self.run.stale_retries += run.stale_retries;
        self.run.reconnects += run.reconnects;
        self.run.sticky_clients += run.sticky_clients;
        for d in run.details {
            if self.run.details.len() < 20 {
                self.run.details.push(d);
            }
        }
        self.upgrades.extend(upgrades);
        self.duration += duration;
    }

    /// Adds per-phase durations of one segment.
    pub fn add_phases(&mut self, phases: BTreeMap<String, Vec<f64>>) {
        for (p, v) in phases {
            self.phases.entry(p).or_default().extend(v);
        }
    }

    /// The row of the table.
    pub fn summarize(&self, name: &str, window: Duration) -> Summary {
        let mut s = summarize(name, &self.run, &self.upgrades, window, self.duration);
        s.phases_ms = self
            .phases
            .iter()
            .map(|(p, v)| (p.clone(), Dist::of(v.clone())))
            .collect();
        s
    }
}

/// p50 / p99 / p99.9 in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Pcts {
    pub n: u64,
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
}

/// Median and p99 of a set of durations, in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Dist {
    pub n: usize,
    pub median: f64,
    pub p99: f64,
    pub max: f64,
}

impl Dist {
    pub fn of(mut ms: Vec<f64>) -> Dist {
        if ms.is_empty() {
            return Dist::default();
        }
        ms.sort_by(f64::total_cmp);
        let at = |q: f64| ms[((ms.len() - 1) as f64 * q).round() as usize];
        Dist {
            n: ms.len(),
            median: at(0.5),
            p99: at(0.99),
            max: ms[ms.len() - 1],
        }
    }
}

/// One row of the table.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    pub name: String,
    pub requests: u64,
    pub failures: BTreeMap<Kind, u64>,
    pub failed_total: u64,
    pub stale_retries: u64,
    /// Connections keep-alive clients opened beyond each client's first ([`LoadRun::reconnects`]).
    pub reconnects: u64,
    /// Keep-alive clients (and idle holders) that ran, summed over segments.
    pub sticky_clients: u64,
    pub rps: f64,
    pub steady: Pcts,
    pub window: Pcts,
    pub upgrades: usize,
    pub upgrades_failed: usize,
    /// Trigger → first response from the new process.
    pub serve_ms: Dist,
    /// Trigger → the tool says done.
    pub done_ms: Dist,
    /// Trigger → the old process has exited.
    pub gone_ms: Dist,
    /// Prepared upgrades: the prepare's own time, before the trigger.
    pub prepare_ms: Dist,
    /// handoff only: its own phase durations, as `handoff run` logs them.
    pub phases_ms: BTreeMap<String, Dist>,
    pub details: Vec<String>,
}

/// Summarizes a run. A request is in an upgrade window when it started between an
/// upgrade's prepare (or its trigger, when it had none) and `window` after its trigger.
pub fn summarize(
    name: &str,
    run: &LoadRun,
    upgrades: &[Upgrade],
    window: Duration,
    duration: Duration,
) -> Summary {
    let window_us = window.as_micros() as u64;
    let mut windows: Vec<(u64, u64)> = upgrades
        .iter()
        .map(|u| {
            (
                u.prepare_us.unwrap_or(u.trigger_us),
                u.trigger_us + window_us,
            )
        })
        .collect();
    windows.sort_unstable();
    let in_window = |t: u64| {
        let i = windows.partition_point(|&(start, _)| start <= t);
        // Windows never nest (upgrades are far apart), but an earlier one may be longer.
        windows[..i].iter().rev().take(2).any(|&(_, end)| t <= end)
    };
    let mut steady = hist();
    let mut win = hist();
    let mut first_end: HashMap<u32, u64> = HashMap::new();
    for s in &run.samples {
        let h = if in_window(s.start_us) {
            &mut win
        } else {
            &mut steady
        };
        let _ = h.record(s.latency_us.max(1));
        let end = s.start_us + s.latency_us;
        first_end
            .entry(s.pid)
            .and_modify(|e| *e = (*e).min(end))
            .or_insert(end);
    }
    let mut failures: BTreeMap<Kind, u64> = Kind::ALL.iter().map(|&k| (k, 0)).collect();
    for f in &run.failures {
        *failures.entry(f.kind).or_default() += 1;
    }
    let ms = |us: u64| us as f64 / 1000.0;
    let serve = upgrades
        .iter()
        .filter_map(|u| {
            let end = *first_end.get(&u.new_pid?)?;
            Some(ms(end.saturating_sub(u.trigger_us)))
        })
        .collect();
    let done = upgrades
        .iter()
        .filter_map(|u| Some(ms(u.done_us?.saturating_sub(u.trigger_us))))
        .collect();
    let gone = upgrades
        .iter()
        .filter_map(|u| Some(ms(u.old_gone_us?.saturating_sub(u.trigger_us))))
        .collect();
    let mut details = run.details.clone();
    details.extend(upgrades.iter().filter_map(|u| u.error.clone()));
    Summary {
        name: name.to_owned(),
        requests: run.samples.len() as u64 + run.failures.len() as u64,
        failed_total: run.failures.len() as u64,
        failures,
        stale_retries: run.stale_retries,
        reconnects: run.reconnects,
        sticky_clients: run.sticky_clients,
        rps: run.samples.len() as f64 / duration.as_secs_f64().max(1e-9),
        steady: pcts(&steady),
        window: pcts(&win),
        upgrades: upgrades.len(),
        upgrades_failed: upgrades.iter().filter(|u| u.error.is_some()).count(),
        serve_ms: Dist::of(serve),
        done_ms: Dist::of(done),
        gone_ms: Dist::of(gone),
        prepare_ms: Dist::of(upgrades.iter().filter_map(|u| u.prepare_ms).collect()),
        phases_ms: BTreeMap::new(),
        details,
    }
}

fn hist() -> Histogram<u64> {
    // 1 µs … 100 s, 3 significant digits; `record` saturates at the top.
    Histogram::new_with_bounds(1, 100_000_000, 3).expect("constant, valid histogram bounds")
}

fn pcts(h: &Histogram<u64>) -> Pcts {
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    Pcts {
        n: h.len(),
        p50: ms(0.5),
        p99: ms(0.99),
        p999: ms(0.999),
    }
}

impl Summary {
    /// Keep-alive reconnects per upgrade (`None` without upgrades).
    pub fn reconnects_per_upgrade(&self) -> Option<f64> {
        (self.upgrades > 0).then(|| self.reconnects as f64 / self.upgrades as f64)
    }
}

/// The side-by-side table (Markdown).
pub fn table(rows: &[Summary]) -> String {
    let mut out = String::new();
    out.push_str(
        "| contestant | requests | req/s | failed (refused/reset/timeout/cut/non-2xx/other) | stale retries | keep-alive reconnects: total (per upgrade) | steady p50 / p99 / p99.9 ms | upgrade-window p50 / p99 / p99.9 ms | window p99 ÷ steady p99 | upgrades (failed) | trigger → new serving, median / p99 ms | trigger → tool done, median / p99 ms | trigger → old gone, median / p99 ms |\n",
    );
    out.push_str("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for r in rows {
        let f = |k: Kind| r.failures.get(&k).copied().unwrap_or(0);
        let d = |d: &Dist| {
            if d.n == 0 {
                "–".to_owned()
            } else {
                format!("{:.2} / {:.2}", d.median, d.p99)
            }
        };
        let reconnects = match r.reconnects_per_upgrade() {
            Some(per) => format!("**{}** ({per:.1})", r.reconnects),
            None => format!("**{}** (–)", r.reconnects),
        };
        let ratio = if r.steady.p99 > 0.0 && r.window.n > 0 {
            format!("{:.2}×", r.window.p99 / r.steady.p99)
        } else {
            "–".to_owned()
        };
        out.push_str(&format!(
            "| {} | {} | {:.0} | **{}** ({}/{}/{}/{}/{}/{}) | {} | {} | {:.2} / {:.2} / {:.2} | {:.2} / {:.2} / {:.2} | {} | {} ({}) | {} | {} | {} |\n",
            r.name,
            r.requests,
            r.rps,
            r.failed_total,
            f(Kind::Refused),
            f(Kind::Reset),
            f(Kind::Timeout),
            f(Kind::Cut),
            f(Kind::Non2xx),
            f(Kind::Other),
            r.stale_retries,
            reconnects,
            r.steady.p50,
            r.steady.p99,
            r.steady.p999,
            r.window.p50,
            r.window.p99,
            r.window.p999,
            ratio,
            r.upgrades,
            r.upgrades_failed,
            d(&r.serve_ms),
            d(&r.done_ms),
            d(&r.gone_ms),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use handoff_load::generator::Sample;

    #[test]
    fn windows_and_first_response() {
        let run = LoadRun {
            samples: vec![
                Sample {
                    start_us: 100,
                    latency_us: 50,
                    pid: 1,
                },
                Sample {
                    start_us: 1_000,
                    latency_us: 900,
                    pid: 1,
                },
                Sample {
                    start_us: 1_200,
                    latency_us: 300,
                    pid: 2,
                },
                Sample {
                    start_us: 9_000,
                    latency_us: 40,
                    pid: 2,
                },
            ],
            ..LoadRun::default()
        };
        let up = Upgrade {
            trigger_us: 1_000,
            new_pid: Some(2),
            done_us: Some(1_400),
            ..Upgrade::default()
        };
        let s = summarize(
            "t",
            &run,
            std::slice::from_ref(&up),
            Duration::from_millis(1),
            Duration::from_secs(1),
        );
        assert_eq!(s.window.n, 2);
        assert_eq!(s.steady.n, 2);
        assert_eq!(s.serve_ms.n, 1);
        assert!((s.serve_ms.median - 0.5).abs() < 1e-9);
        assert!((s.done_ms.median - 0.4).abs() < 1e-9);
        assert_eq!(s.prepare_ms.n, 0);

        // Prepared ahead: the window opens at the prepare, so the request at 100 µs,
        // during the prepare, is a window request; trigger → serving is unchanged.
        let prepared = Upgrade {
            prepare_us: Some(50),
            prepare_ms: Some(0.9),
            ..up
        };
        let s = summarize(
            "t",
            &run,
            &[prepared],
            Duration::from_millis(1),
            Duration::from_secs(1),
        );
        assert_eq!(s.window.n, 3);
        assert_eq!(s.steady.n, 1);
        assert!((s.serve_ms.median - 0.5).abs() < 1e-9);
        assert_eq!(s.prepare_ms.n, 1);
        assert!((s.prepare_ms.median - 0.9).abs() < 1e-9);
    }
}
