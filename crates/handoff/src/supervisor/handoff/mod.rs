//! One handoff in flight: the supervisor's side of the protocol, phase by
//! phase, with the journal, the two clocks, and the abort path.
//!
//! One type per state, each consumed into the next (docs/design.md §4.4):
//!
//! ```text
//! Spawned ──greet──▶ Greeted ──(incumbent connected)──▶ Draining ──Drained──▶ Sealing
//!                       │                                                       │ SealComplete
//!                       └──(no incumbent)──────────────▶ AwaitingReady ◀────────┘
//!                                                             │ Begin … Ready
//!                                                             ▼
//!                                                           Ready ──commit──▶ Report
//! ```
//!
//! A step that fails hands back what it held ([`Left`](run::Left): the incumbent's
//! channel and whether it was asked to drain, the successor) for the abort
//! path, which tells each what to do. Receiving yields the payload the
//! phase table allows there, or the handoff's failure — never a panic.
//! [`Run`] is the context every state shares: the supervisor, the clocks,
//! the journal record and the phases done so far.

mod draining;
mod drive;
mod ending;
mod greeting;
mod held;
mod run;

pub(super) use ending::kill_successor;
pub(super) use run::{new_handoff_id, Run};
