//! Negotiating: the successor spawned and greeted, the incumbent connected
//! and greeted, each with its protocol version.

use std::ffi::OsStr;
use std::os::unix::net::UnixStream;

use super::run::{successor_failure, unexpected, Run};
use crate::channel::Channel;
use crate::child::Child;
use crate::crash;
use crate::error::{HandoffError, ProtocolError, SpawnError};
use crate::phase::Peer;
use crate::protocol::{negotiate, Message, Role};
use crate::spawn::{spawn_service, Program};
use crate::supervisor::peer::{check_hello, connect_incumbent_socket};
use crate::supervisor::types::Successor;
use crate::sys;

/// A successor spawned, its Hello not read yet.
pub(super) struct Spawned(Successor);

/// A successor that said Hello and got HelloAck: warm, waiting for Begin.
pub(super) struct Greeted(Successor);

impl Spawned {
    /// Spawns the service with the listeners and a fresh control
    /// socketpair, and queues the journal write that names it.
    pub(super) fn spawn(run: &mut Run<'_, '_>, program: &Program) -> Result<Spawned, HandoffError> {
        let prepare = |source| SpawnError::Prepare {
            path: program.path.clone(),
            source,
        };
        let (ours, theirs) = UnixStream::pair().map_err(prepare)?;
        sys::creds::enable_passcred(&ours).map_err(prepare)?;
        let control: &OsStr = run.sup.cfg.control_path.as_os_str();
        let state: &OsStr = run.sup.cfg.state_dir.as_os_str();
        let child = spawn_service(
            program,
            &run.sup.listeners,
            &theirs,
            &[
                ("HANDOFF_CONTROL_SOCK", control),
                ("HANDOFF_STATE_DIR", state),
            ],
        )?;
        drop(theirs);
        crash::point_if(run.with_incumbent, "s-after-spawn");
        run.record.successor_pid = Some(child.pid());
        let pid = child.pid();
        run.successor_recorded = run.sup.journal.write(&run.record);
        tracing::info!(target: "handoff::spawn", handoff_id = %crate::protocol::IdHex(run.id), pid, program = %program.path.display());
        Ok(Spawned(Successor {
            child,
            chan: Channel::new(ours),
        }))
    }

    /// Reads the successor's Hello (sent once its warm-up is done) and
    /// answers it.
    pub(super) fn greet(self, run: &mut Run<'_, '_>) -> Result<Greeted, (HandoffError, Successor)> {
        let mut n = self.0;
        match greet(run, &mut n) {
            Ok(()) => Ok(Greeted(n)),
            Err(e) => Err((e, n)),
        }
    }

    pub(super) fn into_successor(self) -> Successor {
        self.0
    }
}

fn greet(run: &mut Run<'_, '_>, n: &mut Successor) -> Result<(), HandoffError> {
    let pid = n.child.pid();
    let (msg, cred) = match n.chan.recv_with_credentials(run.t.hello) {
        Ok(v) => v,
        Err(e) => {
            return Err(successor_failure(
                n,
                ProtocolError::frame(Peer::Successor, "hello", e),
            ))
        }
    };
    crash::point_if(run.with_incumbent, "s-after-successor-hello");
    let Message::Hello(hello) = msg else {
        return Err(unexpected(Peer::Successor, "hello", msg.name()));
    };
    // Linux attaches SCM_CREDENTIALS (we set SO_PASSCRED before the
    // spawn); elsewhere identity rests on construction.
    let kernel_pid = match cred {
        Some(c) => c.pid,
        None if cfg!(any(target_os = "linux", target_os = "android")) => {
            return Err(ProtocolError::NoCredentials {
                peer: Peer::Successor,
                phase: "hello",
            }
            .into())
        }
        None => None,
    };
    check_hello(&hello, Role::Successor, kernel_pid, Some(pid), "hello")?;
    let v = negotiate(run.sup.cfg.versions, hello.range(), Role::Successor)
        .map_err(|e| ProtocolError::NoCommonVersion(e, "hello"))?;
    n.chan
        .send(&Message::HelloAck { version: v })
        .map_err(|e| ProtocolError::frame(Peer::Successor, "hello", e))?;
    n.chan.set_version(v);
    crash::point_if(run.with_incumbent, "s-after-successor-helloack");
    run.hello_build = hello.build_id;
    Ok(())
}

impl Greeted {
    /// A successor prepared ahead: greeted when it was prepared.
    pub(super) fn held(n: Successor) -> Greeted {
        Greeted(n)
    }

    pub(super) fn into_successor(self) -> Successor {
        self.0
    }
}

/// Connects to the incumbent's control socket, checks its Hello against the
/// kernel's word and the recorded pid, and answers it.
pub(super) fn connect_incumbent(run: &Run<'_, '_>) -> Result<Channel, HandoffError> {
    let path = &run.sup.cfg.control_path;
    let phase = "connecting to the incumbent";
    let (stream, kernel) = connect_incumbent_socket(path, phase)?;
    let mut chan = Channel::new(stream);
    let hello = match chan.recv(Some(run.t.hello)) {
        Ok(Message::Hello(h)) => h,
        Ok(m) => return Err(unexpected(Peer::Incumbent, "hello", m.name())),
        Err(e) => return Err(ProtocolError::frame(Peer::Incumbent, "hello", e).into()),
    };
    crash::point_if(run.with_incumbent, "s-after-incumbent-hello");
    let expected_pid = run.old.as_ref().map(Child::pid);
    check_hello(&hello, Role::Incumbent, kernel.pid, expected_pid, "hello")?;
    let v = negotiate(run.sup.cfg.versions, hello.range(), Role::Incumbent)
        .map_err(|e| ProtocolError::NoCommonVersion(e, "hello"))?;
    chan.send(&Message::HelloAck { version: v })
        .map_err(|e| ProtocolError::frame(Peer::Incumbent, "hello", e))?;
    crash::point_if(run.with_incumbent, "s-after-incumbent-helloack");
    chan.set_version(v);
    Ok(chan)
}
