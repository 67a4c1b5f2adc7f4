//! Where this process is in its life, shared by the protocol thread, the
//! accept loops and every connection.
//!
//! The protocol thread (see `control.rs`) moves the phase; accept loops and
//! connections only read it. Two counts — loops inside `accept` and open
//! connections — let the drain tell the supervisor the truth
//! (`DrainReport`), and are waited on from both worlds: a `Condvar` for the
//! blocking protocol thread, a `Notify` for async code.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{watch, Notify};

/// Why this process stopped serving for good.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Retirement {
    /// The supervisor committed a handoff to the next build.
    Committed,
    /// The supervisor vanished after the seal and the successor holds the
    /// state lock: it won.
    SuccessorWon,
    /// This process was a successor whose handoff was aborted (or whose
    /// supervisor hung up) before Commit: the old build serves on.
    Aborted,
    /// SIGTERM (`handoff stop`, a service manager's stop).
    Stopped,
    /// The protocol failed in a way this process cannot serve through
    /// (its control socket broke, a hook panicked).
    Failed,
}

/// The phase every accept loop and connection watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Started, not committed yet. A stateless process accepts already
    /// (early accept); one with state waits for Commit.
    Starting,
    /// The incumbent: accept and serve.
    Serving,
    /// A handoff is draining us: accept nothing, close each connection at a
    /// request boundary. Reversible (the handoff may abort).
    Draining,
    /// Done: accept nothing ever again, finish connections, end.
    Retired(Retirement),
}

impl Phase {
    /// Connections should be wound down (answer-then-close).
    pub(crate) fn winding_down(self) -> bool {
        matches!(self, Phase::Draining | Phase::Retired(_))
    }
}

#[derive(Debug, Default)]
struct Counts {
    /// Accept loops that may be inside `accept` right now.
    accepting: usize,
    /// Connections accepted and still serving (or able to serve) requests.
    conns: usize,
    /// Connections that are over but whose sockets are still closing
    /// politely (our FIN sent, waiting for the client's EOF so the close
    /// resets nothing). No request runs on them, so a drain does not wait
    /// for them; they still hold a descriptor (the cap counts them) and the
    /// process waits for them before it exits.
    closing: usize,
}

/// Budgets for winding connections down (see `http/conn.rs`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Graces {
    /// A keep-alive connection idle this long after its last response (or
    /// after the drain began, if later) is closed; one that sends a request
    /// first gets it answered with `Connection: close`.
    pub(crate) idle: Duration,
    /// How long a connection accepted but without a request yet may take to
    /// send its first one: its client is about to.
    pub(crate) first_request: Duration,
    /// Once winding down, how long a connection that has sent part of a
    /// request head may take to finish it (from the drain's start or the
    /// head's first byte, whichever is later); then it is answered `408
    /// Request Timeout` and closed. Without it one client that stops
    /// mid-head (slowloris) would hold a stateful drain — and so the accept
    /// gap — until the drain grace ran out. A request body still arriving
    /// gets the same grace, extended by what it sends (`http/body.rs`).
    pub(crate) head: Duration,
    /// Bytes a second a request body must keep arriving at, once winding
    /// down, not to be cut after the head grace.
    pub(crate) min_body_rate: u64,
    /// While serving, how long an HTTP/1 connection may go without a
    /// complete request head after its last response (or its accept):
    /// then it is closed, a half-sent head answered `408`. Not hyper's
    /// header-read timeout: its timer is freed inside the drain, when the
    /// connection is taken out of hyper (`http/conn.rs`, `drive`).
    pub(crate) header_read: Duration,
}

#[derive(Debug)]
pub(crate) struct Shared {
    phase: watch::Sender<Phase>,
    counts: Mutex<Counts>,
    cv: Condvar,
    changed: Notify,
    /// Accept before Commit, and drain without waiting for connections.
    pub(crate) stateless: bool,
    pub(crate) graces: Graces,
    /// The whole wind-down's budget, from when it began: the supervisor's
    /// drain grace once a handoff told us, else the builder's.
    wind_down: Mutex<(Option<Instant>, Duration)>,
    /// Set before a stateful seal: every connection still open (past the
    /// drain grace) is dropped at once, so no request can write state the
    /// seal has handed on.
    cut: watch::Sender<bool>,
    /// Most connections open at once; at the cap the accept loops wait
    /// (new connections queue in the kernel backlog) instead of running
    /// the process out of descriptors.
    max_conns: std::sync::atomic::AtomicUsize,
    /// The drain in progress moves connections to the successor: idle
    /// HTTP/1.1 connections are offered here instead of being closed
    /// (docs/connection-transfer.md). `None` outside such a drain.
    /// Read by every connection as it goes idle: a read lock, so 10,000 of
    /// them at once do not queue behind each other.
    mover: std::sync::RwLock<Option<handoff::Mover>>,
    /// What became of the connections this process moved out: parked ones
    /// wait on it (see [`Moved`]).
    moved: watch::Sender<Moved>,
    /// Connections the previous build moved to this one, until the `serve`
    /// for their listener takes them.
    adopted: Mutex<Vec<handoff::MovedConnection>>,
}

/// The fate of the connections a drain offered to the successor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Moved {
    /// The handoff is undecided: keep them, read nothing.
    Pending,
    /// It committed (or the successor won): the successor owns them; close
    /// our copies without a FIN.
    Gone,
    /// It aborted: serve them again, from their unread bytes.
    Back,
}

impl Shared {
    pub(crate) fn new(stateless: bool, graces: Graces, drain_grace: Duration) -> Shared {
        let (phase, _) = watch::channel(Phase::Starting);
        Shared {
            phase,
            counts: Mutex::new(Counts::default()),
            cv: Condvar::new(),
            changed: Notify::new(),
            stateless,
            graces,
            wind_down: Mutex::new((None, drain_grace)),
            cut: watch::channel(false).0,
            max_conns: std::sync::atomic::AtomicUsize::new(usize::MAX),
            mover: std::sync::RwLock::new(None),
            moved: watch::channel(Moved::Pending).0,
            adopted: Mutex::new(vec![]),
        }
    }

    /// A drain that may move connections begins (`mover` refuses
    /// everything when the handoff does not move).
    pub(crate) fn start_moving(&self, mover: handoff::Mover) {
        self.moved.send_replace(Moved::Pending);
        *self.mover.write().unwrap_or_else(|p| p.into_inner()) = mover.is_moving().then_some(mover);
        self.wake_waiters();
    }

    /// The drain is over: nothing more is offered.
    pub(crate) fn stop_moving(&self) {
        *self.mover.write().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Whether the drain in progress moves connections (no clone of the
    /// mover: every connection asks, all at once).
    pub(crate) fn is_moving(&self) -> bool {
        self.mover
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// Lends a connection to the drain in progress (refused, and given
    /// back, when it does not move connections), under the read lock
    /// rather than a clone of the mover.
    pub(crate) fn lend<C>(
        &self,
        conn: C,
        unread: &[u8],
        state: &[u8],
    ) -> Result<handoff::Lent<C>, (C, handoff::MoveRefused)>
    where
        C: std::os::fd::AsFd + Send + Sync + 'static,
    {
        match &*self.mover.read().unwrap_or_else(|p| p.into_inner()) {
            Some(m) => m.lend(conn, unread, state),
            None => Err((conn, handoff::MoveRefused::Closed)),
        }
    }

    /// The mover of the drain in progress, if it moves connections.
    pub(crate) fn mover(&self) -> Option<handoff::Mover> {
        self.mover.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Tells parked connections what became of them.
    pub(crate) fn set_moved(&self, m: Moved) {
        self.moved.send_replace(m);
    }

    pub(crate) fn subscribe_moved(&self) -> watch::Receiver<Moved> {
        self.moved.subscribe()
    }

    /// Keeps the connections the previous build moved to us for the
    /// `serve` loops to take.
    pub(crate) fn adopt(&self, conns: Vec<handoff::MovedConnection>) {
        lock(&self.adopted).extend(conns);
        self.wake_waiters();
    }

    /// Takes the adopted connections that came from the listener `key`
    /// (what the old build's `serve` recorded as their state).
    pub(crate) fn take_adopted(&self, key: &str) -> Vec<handoff::MovedConnection> {
        let mut all = lock(&self.adopted);
        let (mine, rest): (Vec<_>, Vec<_>) = all.drain(..).partition(|c| c.state == key.as_bytes());
        *all = rest;
        mine
    }

    /// Takes every adopted connection no `serve` has taken.
    pub(crate) fn take_all_adopted(&self) -> Vec<handoff::MovedConnection> {
        std::mem::take(&mut *lock(&self.adopted))
    }

    pub(crate) fn phase(&self) -> Phase {
        *self.phase.borrow()
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<Phase> {
        self.phase.subscribe()
    }

    /// Moves to `next`, unless already retired: retirement is final (a
    /// handoff that starts after a SIGTERM must not bring accepting back).
    /// Returns whether the phase changed.
    pub(crate) fn set_phase(&self, next: Phase) -> bool {
        let changed = self.phase.send_if_modified(|p| {
            if matches!(p, Phase::Retired(_)) || *p == next {
                return false;
            }
            *p = next;
            true
        });
        if changed {
            let mut w = lock(&self.wind_down);
            if next.winding_down() {
                w.0.get_or_insert_with(Instant::now);
            } else {
                w.0 = None;
                self.cut.send_replace(false);
            }
            drop(w);
            tracing::debug!(target: "handoff_tokio", phase = ?next, "phase");
        }
        changed
    }

    pub(crate) fn set_max_connections(&self, n: usize) {
        self.max_conns
            .store(n.max(1), std::sync::atomic::Ordering::SeqCst);
    }

    pub(crate) fn max_connections(&self) -> usize {
        self.max_conns.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Waits (async) until fewer than the cap are open.
    pub(crate) async fn below_cap(&self) {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.open_sockets() < self.max_connections() {
                return;
            }
            notified.await;
        }
    }

    /// Drops every connection still open now (see the field's doc).
    pub(crate) fn cut(&self) {
        self.cut.send_replace(true);
    }

    /// Whether connections are being cut; lingering is skipped then.
    pub(crate) fn cutting(&self) -> bool {
        *self.cut.borrow()
    }

    pub(crate) fn subscribe_cut(&self) -> watch::Receiver<bool> {
        self.cut.subscribe()
    }

    /// Sets the wind-down budget the supervisor asked for (PrepareHandoff's
    /// drain grace).
    pub(crate) fn set_drain_grace(&self, grace: Duration) {
        lock(&self.wind_down).1 = grace;
    }

    /// When connections still open must be dropped: the wind-down's start
    /// plus its budget (far in the future while not winding down).
    /// When the wind-down began; `None` while serving.
    pub(crate) fn winding_since(&self) -> Option<Instant> {
        lock(&self.wind_down).0
    }

    pub(crate) fn hard_deadline(&self) -> Instant {
        let (since, grace) = *lock(&self.wind_down);
        since.unwrap_or_else(Instant::now) + grace
    }

    pub(crate) fn may_accept(&self, p: Phase) -> bool {
        match p {
            Phase::Serving => true,
            Phase::Starting => self.stateless,
            Phase::Draining | Phase::Retired(_) => false,
        }
    }

    /// Wakes every `wait_blocking` to look at its condition again (it may
    /// hold on something besides the counts: an abort).
    pub(crate) fn wake_waiters(&self) {
        self.update_and_wake(|_| {}, true);
    }

    /// Changes the counts and wakes whoever waits on them. Blocking
    /// waiters (`wait_blocking`) only ever wait for a count to reach zero
    /// (or for something `wake_waiters` announces), so they are woken only
    /// then: a drain moving 10,000 connections would otherwise be woken
    /// 10,000 times, each a context switch on a busy machine.
    fn update(&self, f: impl FnOnce(&mut Counts)) {
        self.update_and_wake(f, false);
    }

    fn update_and_wake(&self, f: impl FnOnce(&mut Counts), always: bool) {
        let mut c = lock(&self.counts);
        let before = (c.accepting, c.conns, c.conns + c.closing);
        f(&mut c);
        // A count that just reached zero (a waiter may be waiting for it).
        let zero = (c.accepting == 0 && before.0 != 0) || (c.conns == 0 && before.1 != 0);
        // Async waiters wait for sockets to go (`below_cap`,
        // `connections_closed`); a connection parked or moved from open to
        // closing changes nothing for them, and `notify_waiters` takes a
        // lock that 10,000 connections moving at once would queue on.
        let fewer = c.conns + c.closing < before.2;
        drop(c);
        if zero || always {
            self.cv.notify_all();
        }
        if fewer || always {
            self.changed.notify_waiters();
        }
    }

    /// Marks an accept loop as possibly inside `accept` until the guard
    /// drops. Take it *before* reading the phase: the drain sets the phase
    /// first and then waits for this count, so a loop either sees the drain
    /// or is counted by it.
    pub(crate) fn accepting(self: &std::sync::Arc<Self>) -> Counted {
        self.update(|c| c.accepting += 1);
        Counted {
            shared: self.clone(),
            which: Which::Accepting,
        }
    }

    /// Counts a connection until the guard drops.
    pub(crate) fn connection(self: &std::sync::Arc<Self>) -> Counted {
        self.update(|c| c.conns += 1);
        Counted {
            shared: self.clone(),
            which: Which::Conn,
        }
    }

    /// Connections that may still run a request: what a drain waits for.
    pub(crate) fn open_connections(&self) -> usize {
        lock(&self.counts).conns
    }

    /// Connections plus sockets still closing: descriptors in use, and what
    /// the process waits for before it exits.
    pub(crate) fn open_sockets(&self) -> usize {
        let c = lock(&self.counts);
        c.conns + c.closing
    }

    /// Blocks the (non-async) caller until `done` holds or `within` passes;
    /// whether it held. `done` must hold only when a count is zero or after
    /// [`wake_waiters`](Self::wake_waiters) (see `update`).
    pub(crate) fn wait_blocking(
        &self,
        within: Duration,
        done: impl Fn(usize, usize) -> bool,
    ) -> bool {
        let end = Instant::now() + within;
        let mut c = lock(&self.counts);
        loop {
            if done(c.accepting, c.conns) {
                return true;
            }
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            c = self
                .cv
                .wait_timeout(c, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Waits (async) until no connection is open and no socket is still
    /// closing, or `deadline`.
    pub(crate) async fn connections_closed(&self, deadline: Instant) -> bool {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.open_sockets() == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline.into(), notified)
                .await
                .is_err()
            {
                return self.open_sockets() == 0;
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Which {
    Accepting,
    Conn,
    Closing,
}

/// Decrements its count when dropped.
#[derive(Debug)]
pub(crate) struct Counted {
    shared: std::sync::Arc<Shared>,
    which: Which,
}

impl Counted {
    pub(crate) fn shared(&self) -> &Shared {
        &self.shared
    }

    /// The connection was offered to the successor: no request runs on it
    /// here any more, so a drain does not wait for it, but it still holds a
    /// descriptor until the handoff's outcome. Counted like a closing one.
    pub(crate) fn parked(&mut self) {
        self.closing();
    }

    /// Serving again after a parked spell (the handoff aborted).
    pub(crate) fn unparked(&mut self) {
        if let Which::Closing = self.which {
            self.shared.update(|c| {
                c.closing = c.closing.saturating_sub(1);
                c.conns += 1;
            });
            self.which = Which::Conn;
        }
    }

    /// The connection is over; only its socket is still closing: count it
    /// as closing from now on (see `Counts::closing`).
    pub(crate) fn closing(&mut self) {
        if let Which::Conn = self.which {
            self.shared.update(|c| {
                c.conns = c.conns.saturating_sub(1);
                c.closing += 1;
            });
            self.which = Which::Closing;
        }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        let which = self.which;
        self.shared.update(|c| match which {
            Which::Accepting => c.accepting = c.accepting.saturating_sub(1),
            Which::Conn => c.conns = c.conns.saturating_sub(1),
            Which::Closing => c.closing = c.closing.saturating_sub(1),
        });
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn shared(stateless: bool) -> Arc<Shared> {
        Arc::new(Shared::new(
            stateless,
            Graces {
                idle: Duration::from_millis(10),
                first_request: Duration::from_millis(10),
                head: Duration::from_millis(10),
                min_body_rate: 1,
                header_read: Duration::from_secs(30),
            },
            Duration::from_secs(1),
        ))
    }

    #[test]
    fn retirement_is_final() {
        let s = shared(true);
        assert!(s.set_phase(Phase::Serving));
        assert!(s.set_phase(Phase::Retired(Retirement::Stopped)));
        assert!(!s.set_phase(Phase::Draining));
        assert!(!s.set_phase(Phase::Serving));
        assert_eq!(s.phase(), Phase::Retired(Retirement::Stopped));
    }

    #[test]
    fn only_a_stateless_process_accepts_before_commit() {
        assert!(shared(true).may_accept(Phase::Starting));
        assert!(!shared(false).may_accept(Phase::Starting));
        for s in [shared(true), shared(false)] {
            assert!(s.may_accept(Phase::Serving));
            assert!(!s.may_accept(Phase::Draining));
            assert!(!s.may_accept(Phase::Retired(Retirement::Committed)));
        }
    }

    #[test]
    fn counts_follow_guards_and_wake_a_blocked_waiter() {
        let s = shared(true);
        let a = s.accepting();
        let c = s.connection();
        assert_eq!(s.open_connections(), 1);
        assert!(!s.wait_blocking(Duration::from_millis(1), |acc, _| acc == 0));
        let t = std::thread::spawn({
            let s = s.clone();
            move || s.wait_blocking(Duration::from_secs(10), |acc, conns| acc == 0 && conns == 0)
        });
        drop(a);
        drop(c);
        assert!(t.join().unwrap());
    }

    #[test]
    fn the_wind_down_clock_starts_at_the_first_winding_phase() {
        let s = shared(true);
        s.set_drain_grace(Duration::from_secs(3600));
        s.set_phase(Phase::Serving);
        s.set_phase(Phase::Draining);
        let d = s.hard_deadline();
        s.set_phase(Phase::Retired(Retirement::Committed));
        assert_eq!(
            s.hard_deadline(),
            d,
            "retiring after a drain keeps its clock"
        );
        assert!(d > Instant::now() + Duration::from_secs(3500));
    }
}
