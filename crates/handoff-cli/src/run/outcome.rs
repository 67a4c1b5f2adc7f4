//! The end of a handoff attempt, told twice: as the admin protocol's final
//! event for the client that asked, and as a line in the supervisor's log.

use handoff::{HandoffError, Report};
use handoff_admin::schema::{CatchUp, Event};

use crate::progress::ms;

/// The final event for a handoff attempt, logged on the supervisor's
/// stderr too (a committed or aborted one; "in progress" and "no
/// incumbent" are refusals, answered as errors).
pub(super) fn outcome_event(r: &Result<Report, HandoffError>) -> Event {
    match r {
        Ok(r) => {
            eprintln!(
                "handoff run: upgrade {:#018x} committed: pid {} -> {} in {:.2} ms",
                r.handoff_id,
                r.old_pid.unwrap_or(0),
                r.new_pid,
                ms(r.total)
            );
            Event::Committed {
                handoff_id: format!("{:#018x}", r.handoff_id),
                old_pid: r.old_pid,
                new_pid: r.new_pid,
                build_id: r.new_build_id.clone(),
                total_ms: ms(r.total),
                warnings: r.warnings.clone(),
                prepared_for_ms: r.prepared_for.map(ms),
                connections_moved: r.connections.map(|c| c.moved),
                connections_closed: r.connections.map(|c| c.closed),
                connections_direct: r.connections.map(|c| c.direct),
                catch_up: r.catch_up.map(|c| CatchUp {
                    rounds: c.rounds,
                    records: c.records,
                    bytes: c.bytes,
                    last_records: c.last.records,
                    converged: c.converged,
                    took_ms: ms(c.took),
                }),
            }
        }
        Err(e @ (HandoffError::InProgress | HandoffError::NoIncumbent)) => Event::Error {
            message: e.to_string(),
        },
        Err(e) => {
            eprintln!("handoff run: upgrade failed: {e}");
            let (id, phase) = match e {
                HandoffError::Aborted {
                    handoff_id, phase, ..
                } => (
                    Some(format!("{handoff_id:#018x}")),
                    Some(phase.name().to_string()),
                ),
                _ => (None, None),
            };
            Event::Aborted {
                handoff_id: id,
                phase,
                reason: e.to_string(),
            }
        }
    }
}
