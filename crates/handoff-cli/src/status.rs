//! `handoff status`: what the supervisor runs, and the service's live
//! counters.
//!
//! The supervisor answers from its own state plus the service's shared
//! counters region in the state dir, which it maps and reads itself: a
//! status query never waits on the service, so it answers even while the
//! service is busy, draining, or in the middle of a handoff.
//!
//! Exit status: 0 answered, 2 usage or connection error.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use handoff_demo::counters::{self, Counters};

use crate::admin::{self, Event, Request};
use crate::RuntimeDir;

/// How long the supervisor waits for a service process that is mid-write
/// to the counters region (a write takes microseconds).
const READ_BUDGET: Duration = Duration::from_millis(200);
/// How long the client waits for the supervisor's answer.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    pub rt: RuntimeDir,
    /// One JSON object (the supervisor's `status` event) instead of text.
    #[arg(long)]
    pub json: bool,
}

/// The counters for a `Status` reply: `(counters, error)`, both `None` when
/// the service keeps no counters region in `state_dir`.
pub fn service_counters(state_dir: &Path) -> (Option<Counters>, Option<String>) {
    match counters::read(state_dir, READ_BUDGET) {
        Ok(c) => (c, None),
        Err(e) => (None, Some(e.to_string())),
    }
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
    let path = admin::admin_path(&a.rt.runtime_dir);
    let stream = match UnixStream::connect(&path) {
        Ok(s) => s,
        Err(e) => {
            return fail(format!(
            "cannot reach the supervisor at {}: {e}\n  is `handoff run --runtime-dir {}` running?",
            path.display(),
            a.rt.runtime_dir.display()
        ))
        }
    };
    if let Err(e) = admin::send(&stream, &Request::Status) {
        return fail(format!("sending the request to {}: {e}", path.display()));
    }
    let ev: Event = match admin::recv(&stream, Some(REPLY_TIMEOUT)) {
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

/// The human form of a `Status` event (`now_ms` for ages).
pub fn render(ev: &Event, now_ms: u64) -> String {
    use std::fmt::Write;
    let Event::Status {
        supervisor_pid,
        incumbent_pid,
        build_id,
        listeners,
        retiring_pids,
        service_counters,
        service_counters_error,
    } = ev
    else {
        return String::new();
    };
    let mut o = String::new();
    let pid = |p: Option<u32>| p.map(|p| p.to_string()).unwrap_or_else(|| "-".into());
    let _ = writeln!(o, "supervisor         pid {supervisor_pid}");
    let _ = writeln!(
        o,
        "incumbent          pid {} ({build_id})",
        pid(*incumbent_pid)
    );
    for l in listeners {
        let _ = writeln!(o, "listening          {l}");
    }
    if !retiring_pids.is_empty() {
        let r: Vec<String> = retiring_pids.iter().map(u32::to_string).collect();
        let _ = writeln!(o, "retiring           pid {}", r.join(", "));
    }
    if let Some(e) = service_counters_error {
        let _ = writeln!(o, "service counters   unreadable: {e}");
    }
    let Some(c) = service_counters else {
        return o;
    };
    let _ = writeln!(o, "requests served    {}", c.requests_served);
    let _ = writeln!(o, "handoffs survived  {}", c.handoffs_survived);
    let _ = writeln!(
        o,
        "updated            {} ago",
        age(now_ms.saturating_sub(c.updated_at_ms))
    );
    let _ = writeln!(
        o,
        "generations        {} started, last {}:",
        c.generations_started,
        c.generations.len()
    );
    let _ = writeln!(
        o,
        "  {:>5}  {:>8}  {:>10}  {:>12}  how",
        "gen", "pid", "started", "requests"
    );
    for g in &c.generations {
        let _ = writeln!(
            o,
            "  {:>5}  {:>8}  {:>10}  {:>12}  {}",
            g.number,
            g.pid,
            format!("{} ago", age(now_ms.saturating_sub(g.started_at_ms))),
            g.requests,
            if g.via_handoff { "handoff" } else { "start" }
        );
    }
    o
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
        let mut c = Counters::default();
        let g = c.begin_generation(41, false, 1_000);
        c.add_requests(g, 41, 5, 1_500);
        let g = c.begin_generation(42, true, 2_000);
        c.add_requests(g, 42, 7, 2_500);
        let mut ev = Event::Status {
            supervisor_pid: 1,
            incumbent_pid: Some(42),
            build_id: "b".into(),
            listeners: vec!["http=tcp://127.0.0.1:1".into()],
            retiring_pids: vec![],
            service_counters: Some(c),
            service_counters_error: None,
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
    fn no_region_means_no_counters() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(service_counters(dir.path()), (None, None));
    }
}
