//! `handoff upgrade --json`, run and read: what the benches take their figures from (the
//! command's own events, so they measure what a user is shown).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::Value;

use crate::contest;

/// What one `handoff upgrade --json` said.
#[derive(Debug, Default)]
pub struct UpgradeRun {
    /// `(phase, took_ms)` of each `phase` event, in order.
    pub phases: Vec<(String, f64)>,
    /// The `committed` event, if it committed.
    pub committed: Option<Value>,
    /// Why it did not: the `aborted` or `error` event, or the exit status and output.
    pub error: Option<String>,
}

impl UpgradeRun {
    /// How long `phase` took, if it was reported.
    pub fn phase_ms(&self, phase: &str) -> Option<f64> {
        self.phases
            .iter()
            .find(|(p, _)| p == phase)
            .map(|(_, ms)| *ms)
    }
}

/// Runs `HANDOFF upgrade --runtime-dir RUN --json`, killed past `budget`.
pub fn upgrade_json(handoff: &Path, run: &Path, budget: Duration) -> Result<UpgradeRun> {
    let child = Command::new(handoff)
        .arg("upgrade")
        .arg("--runtime-dir")
        .arg(run)
        .arg("--json")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting handoff upgrade")?;
    let out = contest::output_within(child, budget).context("handoff upgrade")?;
    let mut r = UpgradeRun::default();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(ev) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        match ev["event"].as_str() {
            Some("phase") => r.phases.push((
                ev["phase"].as_str().unwrap_or("?").to_owned(),
                ev["took_ms"].as_f64().unwrap_or(f64::NAN),
            )),
            Some("committed") => r.committed = Some(ev),
            Some("aborted") => r.error = Some(format!("aborted: {}", ev["reason"])),
            Some("error") => r.error = Some(format!("error: {}", ev["message"])),
            _ => {}
        }
    }
    if r.error.is_none() && (!out.status.success() || r.committed.is_none()) {
        r.error = Some(format!(
            "handoff upgrade: {}: {} {}",
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(r)
}
