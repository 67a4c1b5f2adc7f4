//! What `handoff run` logged about its handoffs, phase by phase.

use std::collections::BTreeMap;
use std::path::Path;

/// Per-phase durations (ms) of the handoffs `handoff run` logged in `dir/stderr.log`
/// (`phase="…" took_us=…` and `total_us=…`), upgrades only: the first start (no drain) is
/// left out.
pub fn handoff_phases(dir: &Path) -> BTreeMap<String, Vec<f64>> {
    let text = std::fs::read_to_string(dir.join("stderr.log")).unwrap_or_default();
    let mut by_id: BTreeMap<&str, Vec<(String, f64)>> = BTreeMap::new();
    for line in text.lines() {
        let Some(id) = field(line, "handoff_id=") else {
            continue;
        };
        if let (Some(phase), Some(us)) = (field(line, "phase="), field(line, "took_us=")) {
            if let Ok(us) = us.parse::<f64>() {
                by_id
                    .entry(id)
                    .or_default()
                    .push((phase.trim_matches('"').to_owned(), us / 1e3));
            }
        } else if let Some(us) = field(line, "total_us=").and_then(|v| v.parse::<f64>().ok()) {
            by_id
                .entry(id)
                .or_default()
                .push(("total".into(), us / 1e3));
        }
    }
    let mut out: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for phases in by_id.into_values() {
        if phases.iter().any(|(p, _)| p == "draining") {
            for (p, ms) in phases {
                out.entry(p).or_default().push(ms);
            }
        }
    }
    out
}

/// The value of `key` in a `key=value` log line (up to the next space).
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let start = line.find(key)? + key.len();
    line[start..].split_whitespace().next()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_of_upgrades_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("stderr.log"),
            "\
T INFO handoff::phase: handoff_id=0x1 phase=\"negotiating\" took_us=4000 next=\"awaiting-ready\"
T INFO handoff::commit: handoff_id=0x1 new_pid=5 old_pid=None total_us=5000
T INFO handoff::phase: handoff_id=0x2 phase=\"negotiating\" took_us=1500 next=\"draining\"
T INFO handoff::phase: handoff_id=0x2 phase=\"draining\" took_us=250 next=\"sealing\"
T INFO handoff::commit: handoff_id=0x2 new_pid=6 old_pid=Some(5) total_us=3000
",
        )
        .expect("write");
        let p = handoff_phases(dir.path());
        assert_eq!(p["negotiating"], vec![1.5]);
        assert_eq!(p["draining"], vec![0.25]);
        assert_eq!(p["total"], vec![3.0]);
        assert_eq!(p.len(), 3);
    }
}
