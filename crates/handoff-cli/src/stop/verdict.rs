//! The verdict on how a process that was told to stop ended
//! ([`judge`]), and how it was asked ([`Asked`]).
//!
//! The report it fills in ([`ProcessEnd`], carried by the admin protocol's
//! `stopped` event) is plain data in `handoff_admin::schema::stop`: the
//! wire schema depends on nothing of the stop machinery, which builds it.

use std::time::Duration;

use handoff::Exit;
use handoff_admin::schema::stop::ProcessEnd;
use nix::sys::signal::Signal;

use crate::progress::ms;

/// How long a process gets to disappear after SIGKILL.
pub(crate) const REAP: Duration = Duration::from_secs(5);

/// How a process was asked to stop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Asked {
    /// Library mode: Shutdown over its control socket (protocol version 2).
    /// It drains as for a handoff and exits by itself: no signal handler
    /// needed.
    ControlProtocol,
    /// A signal: notify mode's `--stop-signal` (its only way), or SIGTERM
    /// in library mode when the control protocol could not be used —
    /// `fallback` says why.
    Signal {
        signal: Signal,
        fallback: Option<String>,
    },
    /// Nothing: an old incumbent already retiring since its handoff
    /// committed, finishing its connections by itself.
    Commit,
    /// A successor held for an upgrade, told to abort.
    Abort,
}

impl Asked {
    /// The value of [`ProcessEnd::asked`].
    fn name(&self) -> String {
        match self {
            Asked::ControlProtocol => "control-protocol".into(),
            Asked::Signal { signal, .. } => signal.as_str().into(),
            Asked::Commit => "commit".into(),
            Asked::Abort => "abort".into(),
        }
    }
}

/// Judges how a process that was told to stop ended. `exit`: its status
/// (`None`: still there after SIGKILL); `killed`: it outlived the grace
/// and got SIGKILL; `asked`: how it was told to stop.
pub fn judge(
    pid: u32,
    role: &str,
    exit: Option<Exit>,
    killed: bool,
    asked: &Asked,
    took: Duration,
) -> ProcessEnd {
    let sent = match asked {
        Asked::Signal { signal, .. } => Some(*signal as i32),
        _ => None,
    };
    let (how, why) = match exit {
            None => (
                "stuck",
                Some(format!(
                    "still there {REAP:?} after SIGKILL (uninterruptible sleep?)"
                )),
            ),
            Some(_) if killed => (
                "killed",
                Some(
                    "still running after the grace: killed with SIGKILL, cutting the requests it still had in flight"
                        .to_string(),
                ),
            ),
            Some(Exit::Signal(s)) if Some(s) == sent => (
                "signalled",
                Some(format!(
                    "killed by {sig}: it has no {sig} handler (the default action ends it at once), so the requests it had in flight were cut",
                    sig = Signal::try_from(s).map(|s| s.as_str()).unwrap_or("the stop signal")
                )),
            ),
            Some(e @ Exit::Signal(_)) => (
                "signalled",
                Some(format!(
                    "{e} while stopping: the requests it had in flight were lost"
                )),
            ),
            // Told to abort, it exits as it sees fit: it never served
            // through the handoff it was held for.
            Some(Exit::Code(_)) if role == "prepared" => ("exited", None),
            Some(Exit::Code(0)) => ("exited", None),
            Some(Exit::Code(c)) => (
                "failed",
                Some(format!(
                    "exited with status {c} while stopping: not a clean drain"
                )),
            ),
            // Adopted from a previous supervisor: it is gone by itself within
            // the grace; its status cannot be known (not our child).
            Some(Exit::Unknown) => ("exited", None),
        };
    ProcessEnd {
        pid,
        role: role.into(),
        asked: asked.name(),
        fallback: match asked {
            Asked::Signal { fallback, .. } => fallback.clone(),
            _ => None,
        },
        how: how.into(),
        exit: exit.map(|e| e.to_string()),
        why,
        took_ms: ms(took),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn term(fallback: Option<&str>) -> Asked {
        Asked::Signal {
            signal: Signal::SIGTERM,
            fallback: fallback.map(String::from),
        }
    }

    #[test]
    fn drained_only_when_it_exited_0_by_itself() {
        let t = Duration::from_millis(5);
        for asked in [Asked::ControlProtocol, term(None), Asked::Commit] {
            let ok = judge(1, "incumbent", Some(Exit::Code(0)), false, &asked, t);
            assert!(ok.drained(), "{ok:?}");
            assert_eq!(ok.why, None);
            let killed = judge(1, "incumbent", Some(Exit::Signal(9)), true, &asked, t);
            assert_eq!(killed.how, "killed");
            let failed = judge(1, "incumbent", Some(Exit::Code(101)), false, &asked, t);
            assert_eq!(failed.how, "failed");
            let stuck = judge(1, "incumbent", None, true, &asked, t);
            assert_eq!(stuck.how, "stuck");
        }
    }

    /// "No handler" is said only of the signal we sent: a process asked
    /// through the control protocol that dies of SIGTERM (someone else's)
    /// is not blamed for lacking a handler, but still did not drain.
    #[test]
    fn a_signal_death_names_the_handler_only_when_we_sent_that_signal() {
        let t = Duration::from_millis(5);
        let sent = judge(
            1,
            "incumbent",
            Some(Exit::Signal(15)),
            false,
            &term(None),
            t,
        );
        assert_eq!(sent.how, "signalled");
        assert!(sent
            .why
            .as_deref()
            .is_some_and(|w| w.contains("no SIGTERM handler")));
        let asked = judge(
            1,
            "incumbent",
            Some(Exit::Signal(15)),
            false,
            &Asked::ControlProtocol,
            t,
        );
        assert_eq!(asked.how, "signalled");
        assert!(!asked.drained());
        let why = asked.why.unwrap_or_default();
        assert!(!why.contains("handler") && why.contains("lost"), "{why}");
    }

    #[test]
    fn the_report_says_how_it_asked_and_why_it_fell_back() {
        let t = Duration::from_millis(5);
        let p = judge(
            1,
            "incumbent",
            Some(Exit::Code(0)),
            false,
            &Asked::ControlProtocol,
            t,
        );
        assert_eq!(p.asked, "control-protocol");
        assert_eq!(p.fallback, None);
        assert!(
            p.line().ends_with("(stopped through the control protocol)"),
            "{}",
            p.line()
        );
        let v = serde_json::to_value(&p).expect("json");
        assert_eq!(v["asked"], "control-protocol");
        assert!(v.get("fallback").is_none(), "{v}");

        let p = judge(
            2,
            "incumbent",
            Some(Exit::Code(0)),
            false,
            &term(Some("old build")),
            t,
        );
        assert_eq!(p.asked, "SIGTERM");
        assert_eq!(p.fallback.as_deref(), Some("old build"));
        assert!(p.line().ends_with("(sent SIGTERM)"), "{}", p.line());
        let r = judge(3, "retiring", Some(Exit::Code(0)), false, &Asked::Commit, t);
        assert_eq!(r.asked, "commit");

        // A report from a supervisor that predates the field still reads.
        let old =
            r#"{"pid":4,"role":"incumbent","how":"exited","exit":"exit status 0","took_ms":1.0}"#;
        let p: ProcessEnd = serde_json::from_str(old).expect("old report");
        assert_eq!(p.asked, "");
        assert!(!p.line().contains('('), "{}", p.line());
    }
}
