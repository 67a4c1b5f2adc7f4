//! `handoff status`: what the supervisor runs, and the service's live
//! counters.
//!
//! The supervisor answers from its own state plus the counters the service
//! publishes in its state dir ([`COUNTERS_FILE`]), which it reads itself: a
//! status query never waits on the service, so it answers even while the
//! service is busy, draining, or in the middle of a handoff. The counters
//! are opaque JSON to the supervisor, passed on as the service wrote them;
//! only their text form ([`render`]) knows the demo's field names, and
//! shows any other field as it is.
//!
//! Exit status: 0 answered, 2 usage or connection error.
//!
//! The `--json` object is the supervisor's `status` event; its fields are
//! listed in [`JSON_FIELDS`] (shown by `handoff status --help`) and only
//! ever gain new ones.

use std::fs::OpenOptions;
use std::io::Read;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use handoff_admin::schema::status::{Activity, PhaseTiming, Trigger};
use handoff_admin::schema::{admin_path, Event, Request};
use handoff_admin::{client, wire};
use serde_json::Value;

use crate::args::RuntimeDir;

/// File name, in the state dir, of the counters a service publishes for
/// `handoff status`: one JSON value (an object), replaced whole by a rename
/// so it is never read half-written. The demo writes it
/// (`handoff_demo::counters::PUBLISHED_NAME`); any service may.
pub const COUNTERS_FILE: &str = "service-counters.json";
/// The most of it read: a status reply is one frame, and a service's
/// counters are a few hundred bytes.
const COUNTERS_MAX: u64 = 64 * 1024;
/// How long the client waits for the supervisor's answer.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// `handoff status --help`: what the JSON carries. Times are milliseconds;
/// `*_at_ms` are since the Unix epoch.
pub const JSON_FIELDS: &str = "\
JSON (--json), one object; fields are only ever added:
  event                 \"status\"
  supervisor_pid, supervisor_build, supervisor_uptime_ms
  incumbent_pid, incumbent_uptime_ms, build_id      (null while none runs)
  incumbent_exe         the executable the incumbent runs (/proc/PID/exe; absent
                        while none runs); \" (deleted)\" once replaced on disk
  incumbent_exe_sha256  SHA-256 of the bytes it runs, hex: equals `sha256sum`
                        of the build it was started from (absent with the above,
                        and for a moment after a new build starts: it is hashed
                        in the background, never while a status waits)
  listeners             [\"NAME=tcp://ADDR\" | \"NAME=unix:PATH\"], bound addresses
  retiring_pids         old incumbents still finishing their connections
  stopping              true once `handoff stop`/SIGTERM was received
  handoffs              {committed, aborted} since the supervisor started
  last_handoff          null | {handoff_id, trigger (admin|sighup), outcome
                        (committed|aborted), old_pid, new_pid, phases [{phase,
                        took_ms}], total_ms, ended_at_ms, reason (aborted only)}
  in_flight             null | {handoff_id, trigger, phase, in_phase_ms,
                        elapsed_ms, phases [{phase, took_ms}] ended so far}
  journal               null | {handoff_id, phase, incumbent_pid, successor_pid,
                        started_at_ms}: the durable record of a handoff in flight
  journal_error         present if the journal could not be read
  service_counters      present if the service publishes counters: the JSON
                        object it keeps in <state-dir>/service-counters.json
  service_counters_error  present if that file could not be read

EXIT STATUS:
  0  answered
  2  usage error, or the supervisor could not be reached

EXAMPLES:
  handoff status --runtime-dir /run/kv
  handoff status --runtime-dir /run/kv --json | jq .last_handoff.phases";

#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    pub rt: RuntimeDir,
    /// One JSON object (the supervisor's `status` event) instead of text.
    #[arg(long)]
    pub json: bool,
}

/// The counters for a `Status` reply: `(counters, error)`, both `None` when
/// the service publishes none in `state_dir`.
pub fn service_counters(state_dir: &Path) -> (Option<Value>, Option<String>) {
    match read_counters(&state_dir.join(COUNTERS_FILE)) {
        Ok(c) => (c, None),
        Err(e) => (None, Some(e)),
    }
}

/// Reads the published counters: never through a link nor a file of
/// another user (the state dir is the service's and ours alone), at most
/// [`COUNTERS_MAX`] bytes, and only valid JSON.
fn read_counters(path: &Path) -> Result<Option<Value>, String> {
    let f = match handoff::private_fs::open_file(OpenOptions::new().read(true), path) {
        Ok(f) => f,
        Err(handoff::PrivateError::Io { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            return Ok(None)
        }
        Err(e) => return Err(e.to_string()),
    };
    let mut bytes = Vec::new();
    f.take(COUNTERS_MAX + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("reading {}: {e}", path.display()))?;
    if bytes.len() as u64 > COUNTERS_MAX {
        return Err(format!(
            "{} is larger than {} KiB",
            path.display(),
            COUNTERS_MAX / 1024
        ));
    }
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| format!("{} is not JSON: {e}", path.display()))
}

pub fn main(a: StatusArgs) -> ExitCode {
    let fail = |msg: String| {
        if a.json {
            println!("{}", serde_json::json!({"event": "error", "message": msg}));
        } else {
            eprintln!("handoff status: {msg}");
        }
        ExitCode::from(2)
    };
    let path = admin_path(&a.rt.runtime_dir);
    let stream = match client::connect(&a.rt.runtime_dir) {
        Ok(s) => s,
        Err(e) => return fail(e.to_string()),
    };
    if let Err(e) = wire::send(&stream, &Request::Status) {
        return fail(format!("sending the request to {}: {e}", path.display()));
    }
    let ev: Event = match wire::recv(&stream, Some(REPLY_TIMEOUT)) {
        Ok(ev) => ev,
        Err(e) => return fail(format!("reading from the supervisor: {e}")),
    };
    if let Event::Error { message } = &ev {
        return fail(message.clone());
    }
    if !matches!(ev, Event::Status { .. }) {
        return fail(format!("unexpected reply: {ev:?}"));
    }
    if a.json {
        match serde_json::to_string(&ev) {
            Ok(s) => println!("{s}"),
            Err(e) => return fail(format!("encoding the reply: {e}")),
        }
    } else {
        print!("{}", render(&ev, handoff::journal::now_ms()));
    }
    ExitCode::SUCCESS
}

/// One `Status` event from the supervisor at `runtime_dir` (for callers that
/// poll it: `upgrade --supervisor`).
pub fn fetch(runtime_dir: &std::path::Path) -> Result<Event, String> {
    let stream = client::connect(runtime_dir).map_err(|e| e.to_string())?;
    wire::send(&stream, &Request::Status).map_err(|e| format!("sending the request: {e}"))?;
    match wire::recv(&stream, Some(REPLY_TIMEOUT)) {
        Ok(Event::Error { message }) => Err(message),
        Ok(ev) => Ok(ev),
        Err(e) => Err(format!("reading from the supervisor: {e}")),
    }
}

/// The human form of a `Status` event (`now_ms` for ages).
pub fn render(ev: &Event, now_ms: u64) -> String {
    use std::fmt::Write;
    let Event::Status {
        supervisor_pid,
        supervisor_build,
        incumbent_pid,
        build_id,
        incumbent_exe,
        incumbent_exe_sha256,
        listeners,
        retiring_pids,
        service_counters,
        service_counters_error,
        activity: act,
    } = ev
    else {
        return String::new();
    };
    let mut o = String::new();
    let pid = |p: Option<u32>| p.map(|p| p.to_string()).unwrap_or_else(|| "-".into());
    let up = |ms: Option<u64>| ms.map(|m| format!(", up {}", age(m))).unwrap_or_default();
    let _ = writeln!(
        o,
        "supervisor         pid {supervisor_pid}{}{}{}",
        if supervisor_build.is_empty() {
            String::new()
        } else {
            format!(" ({supervisor_build})")
        },
        up(Some(act.supervisor_uptime_ms)),
        if act.stopping {
            ", STOPPING (no new upgrades)"
        } else {
            ""
        }
    );
    let _ = writeln!(
        o,
        "incumbent          pid {} ({build_id}){}",
        pid(*incumbent_pid),
        up(act.incumbent_uptime_ms)
    );
    if let Some(path) = incumbent_exe {
        let _ = writeln!(
            o,
            "executable         {path}{}",
            incumbent_exe_sha256
                .as_ref()
                .map(|d| format!(" (sha256 {d})"))
                .unwrap_or_else(|| " (sha256 being computed: ask again in a moment)".into())
        );
    }
    for l in listeners {
        let _ = writeln!(o, "listening          {l}");
    }
    if !retiring_pids.is_empty() {
        let r: Vec<String> = retiring_pids.iter().map(u32::to_string).collect();
        let _ = writeln!(o, "retiring           pid {}", r.join(", "));
    }
    if let Some(p) = &act.prepared {
        let _ = writeln!(
            o,
            "prepared           pid {} ({}, {}), held {}: the next upgrade of this binary uses it",
            p.pid,
            p.build_id,
            p.binary,
            age(p.held_ms)
        );
    }
    render_activity(&mut o, act, now_ms);
    if let Some(e) = service_counters_error {
        let _ = writeln!(o, "service counters   unreadable: {e}");
    }
    if let Some(c) = service_counters {
        render_counters(&mut o, c, now_ms);
    }
    o
}

/// The service's counters, opaque JSON to the supervisor, in words. The
/// fields the demo publishes (and any service may: see `docs/design.md`
/// §9) read as they always did — totals, the last update's age, one line
/// per generation; any other field is shown as `name  value`, a
/// `*_at_ms` one as an age.
fn render_counters(o: &mut String, c: &Value, now_ms: u64) {
    use std::fmt::Write;
    /// Shown above; not again as plain fields.
    const KNOWN: [&str; 5] = [
        "requests_served",
        "handoffs_survived",
        "updated_at_ms",
        "generations_started",
        "generations",
    ];
    let Some(map) = c.as_object() else {
        let _ = writeln!(o, "service counters   {c}");
        return;
    };
    let num = |v: &Value, k: &str| v.get(k).and_then(Value::as_u64);
    let ago = |at_ms: u64| format!("{} ago", age(now_ms.saturating_sub(at_ms)));
    if let Some(n) = num(c, "requests_served") {
        let _ = writeln!(o, "requests served    {n}");
    }
    if let Some(n) = num(c, "handoffs_survived") {
        let _ = writeln!(o, "handoffs survived  {n}");
    }
    if let Some(t) = num(c, "updated_at_ms") {
        let _ = writeln!(o, "updated            {}", ago(t));
    }
    if let Some(gens) = c.get("generations").and_then(Value::as_array) {
        let started = num(c, "generations_started").unwrap_or(gens.len() as u64);
        let _ = writeln!(
            o,
            "generations        {started} started, last {}:",
            gens.len()
        );
        let _ = writeln!(
            o,
            "  {:>5}  {:>8}  {:>10}  {:>12}  how",
            "gen", "pid", "started", "requests"
        );
        let field = |g: &Value, k: &str| num(g, k).map_or_else(|| "-".into(), |n| n.to_string());
        for g in gens {
            let how = match g.get("via_handoff").and_then(Value::as_bool) {
                Some(true) => "handoff",
                Some(false) => "start",
                None => "-",
            };
            let _ = writeln!(
                o,
                "  {:>5}  {:>8}  {:>10}  {:>12}  {how}",
                field(g, "number"),
                field(g, "pid"),
                num(g, "started_at_ms").map_or_else(|| "-".into(), ago),
                field(g, "requests"),
            );
        }
    } else if let Some(n) = num(c, "generations_started") {
        let _ = writeln!(o, "generations        {n} started");
    }
    for (k, v) in map.iter().filter(|(k, _)| !KNOWN.contains(&k.as_str())) {
        let (label, value) = match (k.strip_suffix("_at_ms"), v.as_u64()) {
            (Some(what), Some(at)) => (what.replace('_', " "), ago(at)),
            _ => (k.replace('_', " "), v.to_string()),
        };
        let _ = writeln!(o, "{label:<18} {value}");
    }
}

/// Handoff counts, the last handoff, the one in flight, the journal.
fn render_activity(o: &mut String, act: &Activity, now_ms: u64) {
    use std::fmt::Write;
    let trigger = |t: Trigger| match t {
        Trigger::Admin => "handoff upgrade",
        Trigger::Sighup => "SIGHUP",
    };
    let _ = writeln!(
        o,
        "handoffs           {} committed, {} aborted",
        act.handoffs.committed, act.handoffs.aborted
    );
    let phases = |o: &mut String, phases: &[PhaseTiming]| {
        for p in phases {
            let _ = writeln!(o, "  {:<22} {:>10.2} ms", p.phase, p.took_ms);
        }
    };
    if let Some(l) = &act.last_handoff {
        let _ = writeln!(
            o,
            "last handoff       {} {} by {}, {:.2} ms, {} ago",
            l.handoff_id.as_deref().unwrap_or("-"),
            l.outcome,
            trigger(l.trigger),
            l.total_ms,
            age(now_ms.saturating_sub(l.ended_at_ms))
        );
        if let Some(r) = &l.reason {
            let _ = writeln!(o, "  reason: {r}");
        }
        phases(o, &l.phases);
    }
    if let Some(f) = &act.in_flight {
        let _ = writeln!(
            o,
            "in flight          {} by {}: {} for {} ({} in all)",
            f.handoff_id.as_deref().unwrap_or("-"),
            trigger(f.trigger),
            f.phase,
            age(f.in_phase_ms),
            age(f.elapsed_ms)
        );
        phases(o, &f.phases);
    }
    if let Some(j) = &act.journal {
        let _ =
            writeln!(
            o,
            "journal            {} phase {} (incumbent pid {}, successor pid {}), started {} ago",
            j.handoff_id,
            j.phase,
            j.incumbent_pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
            j.successor_pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
            age(now_ms.saturating_sub(j.started_at_ms))
        );
    }
    if let Some(e) = &act.journal_error {
        let _ = writeln!(o, "journal            unreadable: {e}");
    }
}

fn age(ms: u64) -> String {
    match ms {
        0..=999 => format!("{ms}ms"),
        1_000..=59_999 => format!("{:.1}s", ms as f64 / 1000.0),
        60_000..=3_599_999 => format!("{}m", ms / 60_000),
        _ => format!("{}h", ms / 3_600_000),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_omits_them_when_absent() {
        // What the demo publishes after process 41 served 5 requests and
        // process 42, which took over in a handoff, 7.
        let c = serde_json::json!({
            "requests_served": 12,
            "handoffs_survived": 1,
            "generations_started": 2,
            "updated_at_ms": 2_500,
            "generations": [
                {"number": 1, "pid": 41, "via_handoff": false, "started_at_ms": 1_000, "requests": 5},
                {"number": 2, "pid": 42, "via_handoff": true, "started_at_ms": 2_000, "requests": 7},
            ],
        });
        let mut ev = Event::Status {
            supervisor_pid: 1,
            supervisor_build: "handoff 0.1.0 (abc)".into(),
            incumbent_pid: Some(42),
            build_id: "b".into(),
            incumbent_exe: None,
            incumbent_exe_sha256: None,
            listeners: vec!["http=tcp://127.0.0.1:1".into()],
            retiring_pids: vec![],
            service_counters: Some(c),
            service_counters_error: None,
            activity: Activity::default(),
        };
        let text = render(&ev, 3_000);
        assert!(text.contains("requests served    12"), "{text}");
        assert!(text.contains("handoffs survived  1"), "{text}");
        assert!(text.contains("updated            500ms ago"), "{text}");
        assert!(
            text.lines()
                .any(|l| l.contains(" 42 ") && l.ends_with("handoff")),
            "{text}"
        );
        if let Event::Status {
            service_counters, ..
        } = &mut ev
        {
            *service_counters = None;
        }
        let text = render(&ev, 3_000);
        assert!(!text.contains("requests served"), "{text}");
        // Absent counters are absent from the JSON too.
        let json = serde_json::to_string(&ev).unwrap();
        assert!(!json.contains("service_counters"), "{json}");
    }

    #[test]
    fn renders_handoffs_and_round_trips_the_json() {
        use handoff_admin::schema::status::{
            Counts, InFlight, JournalView, LastHandoff, PreparedView,
        };
        let timing = |phase: &str, took_ms| PhaseTiming {
            phase: phase.into(),
            took_ms,
        };
        let ev = Event::Status {
            supervisor_pid: 1,
            supervisor_build: String::new(),
            incumbent_pid: Some(42),
            build_id: "b".into(),
            incumbent_exe: Some("/opt/kv/v2/kv".into()),
            incumbent_exe_sha256: Some("ab12".into()),
            listeners: vec![],
            retiring_pids: vec![],
            service_counters: None,
            service_counters_error: None,
            activity: Activity {
                supervisor_uptime_ms: 61_000,
                incumbent_uptime_ms: Some(1_500),
                stopping: false,
                handoffs: Counts {
                    committed: 3,
                    aborted: 1,
                },
                last_handoff: Some(LastHandoff {
                    handoff_id: Some("0x01".into()),
                    trigger: Trigger::Sighup,
                    outcome: "committed".into(),
                    old_pid: Some(41),
                    new_pid: Some(42),
                    phases: vec![timing("negotiating", 1.5), timing("draining", 2.25)],
                    total_ms: 3.75,
                    ended_at_ms: 2_000,
                    reason: None,
                }),
                in_flight: Some(InFlight {
                    handoff_id: Some("0x02".into()),
                    trigger: Trigger::Admin,
                    phase: "awaiting-ready".into(),
                    in_phase_ms: 1_200,
                    elapsed_ms: 1_300,
                    phases: vec![timing("negotiating", 1.0)],
                }),
                journal: Some(JournalView {
                    handoff_id: "0x02".into(),
                    phase: "awaiting-ready".into(),
                    incumbent_pid: Some(42),
                    successor_pid: Some(43),
                    started_at_ms: 1_700,
                }),
                journal_error: None,
                prepared: Some(PreparedView {
                    pid: 44,
                    build_id: "b2".into(),
                    binary: "/opt/kv/v2/kv".into(),
                    held_ms: 2_500,
                }),
            },
        };
        let text = render(&ev, 3_000);
        for want in [
            "supervisor         pid 1, up 1m",
            "incumbent          pid 42 (b), up 1.5s",
            "executable         /opt/kv/v2/kv (sha256 ab12)",
            "handoffs           3 committed, 1 aborted",
            "last handoff       0x01 committed by SIGHUP, 3.75 ms, 1.0s ago",
            "  draining                     2.25 ms",
            "in flight          0x02 by handoff upgrade: awaiting-ready for 1.2s (1.3s in all)",
            "journal            0x02 phase awaiting-ready (incumbent pid 42, successor pid 43)",
            "prepared           pid 44 (b2, /opt/kv/v2/kv), held 2.5s: the next upgrade of this binary uses it",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
        // The JSON is flat (activity fields beside the others) and reads back.
        let json = serde_json::to_value(&ev).unwrap();
        assert_eq!(json["handoffs"]["committed"], 3);
        assert_eq!(json["in_flight"]["phase"], "awaiting-ready");
        assert_eq!(json["last_handoff"]["trigger"], "sighup");
        assert_eq!(json["incumbent_exe_sha256"], "ab12");
        let back: Event = serde_json::from_value(json).unwrap();
        assert_eq!(back, ev);
    }

    /// Another service's counters: whatever fields it publishes, each on a
    /// line of its own, a `*_at_ms` one as an age.
    #[test]
    fn renders_counters_it_does_not_know() {
        let ev = Event::Status {
            supervisor_pid: 1,
            supervisor_build: String::new(),
            incumbent_pid: Some(42),
            build_id: "b".into(),
            incumbent_exe: None,
            incumbent_exe_sha256: None,
            listeners: vec![],
            retiring_pids: vec![],
            service_counters: Some(serde_json::json!({
                "cache_hits": 7,
                "last_flush_at_ms": 2_000,
                "mode": "warm",
            })),
            service_counters_error: None,
            activity: Activity::default(),
        };
        let text = render(&ev, 3_000);
        for want in [
            "cache hits         7",
            "last flush         1.0s ago",
            "mode               \"warm\"",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
        assert!(!text.contains("requests served"), "{text}");
    }

    #[test]
    fn no_region_means_no_counters() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(service_counters(dir.path()), (None, None));
    }

    /// What a service published is passed on as it is; a file that is not
    /// JSON, or a link, is an error and no counters.
    #[test]
    fn published_counters_are_read_as_they_are() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(COUNTERS_FILE);
        std::fs::write(&path, br#"{"requests_served": 3, "mine": [1, 2]}"#).unwrap();
        assert_eq!(
            service_counters(dir.path()),
            (
                Some(serde_json::json!({"requests_served": 3, "mine": [1, 2]})),
                None
            )
        );
        std::fs::write(&path, b"{half").unwrap();
        let (c, e) = service_counters(dir.path());
        assert_eq!(c, None);
        assert!(e.is_some_and(|e| e.contains("not JSON")));
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", &path).unwrap();
        let (c, e) = service_counters(dir.path());
        assert_eq!(c, None);
        assert!(e.is_some(), "a link was followed");
    }
}
