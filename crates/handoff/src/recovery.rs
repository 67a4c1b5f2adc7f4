//! What a supervisor restarted after a crash does (docs/design.md §6.5): settle the
//! journal its predecessor left, find the incumbent, and get the listening
//! sockets back from it.
//!
//! The listeners survive a supervisor crash because every service process
//! holds its own copies (the fds it was spawned with). The incumbent keeps
//! them open for exactly this reason and hands them over on FetchListeners,
//! as `SCM_RIGHTS`; no connection is refused meanwhile, since some process
//! always has the listening sockets open and the kernel keeps queueing.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::channel::Channel;
use crate::error::{HandoffError, ProtocolError};
use crate::journal::{Journal, JournalRecord};
use crate::listeners::Listener;
use crate::phase::{self, Peer};
use crate::protocol::{negotiate, Message, Role, VersionRange};
use crate::supervisor::SupervisorConfig;
use crate::sys;

/// What `resume_from_journal` found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// The handoff the crashed supervisor left in flight, as journaled
    /// (the journal has been cleared since).
    pub record: JournalRecord,
    /// The process now owning the control socket, if any.
    pub incumbent_pid: Option<u32>,
    /// An orphaned successor that never became the incumbent and was killed.
    pub killed_successor: Option<u32>,
}

/// For a supervisor restarted after a crash: reads the journal once, finds
/// which process serves the control socket as the incumbent now (see
/// [`probe_incumbent`]), kills an orphaned successor that never became the
/// incumbent, and clears the journal.
///
/// `settle` bounds how long to wait for some process to own the control
/// socket (a successor that sent Ready, or an incumbent re-binding after
/// losing its supervisor, may be about to bind it).
///
/// `orphan_grace` bounds how long the orphaned successor gets to exit by
/// itself before it is killed: it saw its supervisor hang up and is exiting,
/// perhaps finishing connections it accepted early (a stateless service may
/// accept before Begin); killing it at once would reset those.
///
/// Returns `Ok(None)` when no handoff was in flight.
pub fn resume_from_journal(
    state_dir: &Path,
    control_path: &Path,
    settle: Duration,
    orphan_grace: Duration,
) -> Result<Option<Recovery>, HandoffError> {
    let journal = Journal::new(state_dir);
    let Some(record) = journal.read()? else {
        return Ok(None);
    };
    let deadline = Instant::now() + settle;
    let incumbent_pid = loop {
        let owner = probe_incumbent(control_path);
        if owner.is_some() || Instant::now() >= deadline {
            break owner;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut killed_successor = None;
    if let Some(n) = record.successor_pid {
        if Some(n) != incumbent_pid {
            killed_successor = stop_orphan(n, record.started_at, orphan_grace);
        }
    }
    journal.clear()?;
    tracing::info!(target: "handoff::recovery", handoff_id = %crate::protocol::IdHex(record.handoff_id), phase = record.phase.name(), ?incumbent_pid, ?killed_successor);
    Ok(Some(Recovery {
        record,
        incumbent_pid,
        killed_successor,
    }))
}

/// The pid of a process serving the control socket *as an incumbent*: it
/// must answer with an incumbent's Hello (within a second), and the kernel
/// must agree on its pid. A successor that bound the path but never became
/// the incumbent does not answer, and so does not count.
pub fn probe_incumbent(control_path: &Path) -> Option<u32> {
    let stream = UnixStream::connect(control_path).ok()?;
    let kernel = sys::peer_credentials(&stream).ok()?.pid;
    let mut chan = Channel::new(stream);
    match chan.recv(Some(Duration::from_secs(1))) {
        Ok(Message::Hello(h)) if h.role == Role::Incumbent && kernel.is_none_or(|k| k == h.pid) => {
            Some(h.pid)
        }
        _ => None,
    }
}

/// Gives the orphaned successor `pid` up to `grace` to exit by itself, then
/// kills it; returns its pid if it had to be killed.
///
/// Through a pidfd where there is one: opened, then the start time checked
/// again, it pins exactly the process the journal names, so neither the
/// wait nor the SIGKILL can reach a process that recycled the pid. Without
/// one (not Linux, or a kernel before 5.3) it polls `/proc`, as the orphan
/// is not our child to wait for.
fn stop_orphan(pid: u32, started_at_ms: u64, grace: Duration) -> Option<u32> {
    use nix::sys::signal::Signal::SIGKILL;
    use std::os::fd::AsFd;
    if !process_started_after(pid, started_at_ms) {
        return None;
    }
    if let Ok(fd) = sys::pidfd::open(pid) {
        if !process_started_after(pid, started_at_ms) {
            return None;
        }
        if let Ok(exited) = sys::pidfd::wait_exit(fd.as_fd(), grace) {
            if exited {
                return None;
            }
            return sys::pidfd::send_signal(fd.as_fd(), SIGKILL)
                .is_ok()
                .then_some(pid);
        }
    }
    let until = Instant::now() + grace;
    while process_started_after(pid, started_at_ms) && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(10));
    }
    (process_started_after(pid, started_at_ms) && sys::wait::signal(pid, SIGKILL).is_ok())
        .then_some(pid)
}

/// Pid-reuse guard: is `pid` alive and did it start no earlier than the
/// handoff (within a second)? Only then can it be the successor we spawned.
fn process_started_after(pid: u32, started_at_ms: u64) -> bool {
    if !crate::procinfo::exists(pid) || crate::procinfo::is_zombie(pid) {
        return false;
    }
    match crate::procinfo::start_time_ms(pid) {
        Some(t) => t + 1000 >= started_at_ms,
        // Cannot tell (non-Linux): trust the journal.
        None => true,
    }
}

/// An incumbent found alive by a restarted supervisor, with its listeners.
#[derive(Debug)]
pub struct Reattached {
    /// The incumbent's pid, as its Hello said and the kernel confirmed.
    pub pid: u32,
    /// The build its Hello announced.
    pub build_id: String,
    /// Copies of the listening sockets it holds (the same kernel sockets,
    /// ports and backlog), with their names, in its order.
    pub listeners: Vec<Listener>,
}

/// Finds the process serving the control socket and takes copies of its
/// listeners. Retries until `settle` passes: right after a crash the
/// incumbent may be re-taking the state lock, or a successor that bound the
/// socket may be about to exit. Only a process that answers with an
/// incumbent's Hello counts.
///
/// Returns `Ok(None)` when nobody answers within `settle`.
pub fn reattach(
    cfg: &SupervisorConfig,
    settle: Duration,
) -> Result<Option<Reattached>, HandoffError> {
    let deadline = Instant::now() + settle;
    loop {
        let err = match try_reattach(cfg, &cfg.control_path, cfg.versions) {
            Ok(r) => return Ok(Some(r)),
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            tracing::info!(target: "handoff::recovery", error = %err, "no incumbent to re-attach to");
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn try_reattach(
    cfg: &SupervisorConfig,
    path: &Path,
    versions: VersionRange,
) -> Result<Reattached, HandoffError> {
    let phase = "re-attaching";
    let (stream, kernel) = crate::supervisor::connect_incumbent_socket(path, phase)?;
    let mut chan = Channel::new(stream);
    // Short: a bound-but-not-yet-serving successor never answers.
    let hello_wait = cfg.timeouts.hello.min(Duration::from_secs(1));
    let hello = match chan.recv(Some(hello_wait)) {
        Ok(Message::Hello(h)) => h,
        Ok(m) => {
            return Err(ProtocolError::Unexpected {
                peer: Peer::Incumbent,
                phase,
                message: m.name(),
            }
            .into())
        }
        Err(e) => return Err(ProtocolError::frame(Peer::Incumbent, phase, e).into()),
    };
    crate::supervisor::check_hello(&hello, Role::Incumbent, kernel.pid, None, phase)?;
    let v = negotiate(versions, hello.range(), Role::Incumbent)
        .map_err(|e| ProtocolError::NoCommonVersion(e, phase))?;
    chan.send(&Message::HelloAck { version: v })
        .map_err(|e| ProtocolError::frame(Peer::Incumbent, phase, e))?;
    chan.set_version(v);
    chan.send(&Message::FetchListeners {})
        .map_err(|e| ProtocolError::frame(Peer::Incumbent, phase, e))?;
    let (msg, fds) = chan
        .recv_with_fds(cfg.timeouts.hello)
        .map_err(|e| ProtocolError::frame(Peer::Incumbent, phase, e))?;
    let legal = phase::reattach_allows(&msg);
    let msg = phase::admit(Peer::Incumbent, phase, legal, None, msg)?;
    let Message::Listeners { names } = msg else {
        return Err(ProtocolError::Unexpected {
            peer: Peer::Incumbent,
            phase,
            message: msg.name(),
        }
        .into());
    };
    if names.len() != fds.len() {
        return Err(ProtocolError::frame(
            Peer::Incumbent,
            phase,
            crate::frame::FrameError::Malformed {
                message: "Listeners",
                reason: format!("{} names but {} descriptors", names.len(), fds.len()),
            },
        )
        .into());
    }
    let listeners = names
        .into_iter()
        .zip(fds)
        .map(|(name, fd)| Listener { name, fd })
        .collect();
    Ok(Reattached {
        pid: hello.pid,
        build_id: hello.build_id,
        listeners,
    })
}
