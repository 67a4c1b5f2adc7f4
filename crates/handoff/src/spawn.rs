//! Spawning a service process with the listeners and a control channel
//! (docs/design.md §3), on top of `sys::exec`.

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use crate::child::Child;
use crate::error::SpawnError;
use crate::listeners::{Listener, LISTEN_FDS_START};
use crate::sys::exec::ExecPlan;

/// What to run: a program, its arguments and extra environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Program {
    /// The executable: a path with a slash (relative to the supervisor's
    /// working directory), or a bare name looked up in `PATH` at each
    /// spawn ([`resolve`]).
    pub path: PathBuf,
    /// Arguments after `argv[0]` (which is the resolved path).
    pub args: Vec<OsString>,
    /// Added to (and overriding) the supervisor's own environment.
    pub env: Vec<(OsString, OsString)>,
}

impl Program {
    /// `path` with no arguments and no extra environment.
    pub fn new(path: impl Into<PathBuf>) -> Program {
        Program {
            path: path.into(),
            args: vec![],
            env: vec![],
        }
    }

    /// Appends one argument.
    pub fn arg(mut self, a: impl Into<OsString>) -> Program {
        self.args.push(a.into());
        self
    }

    /// Sets variable `k` to `v` in the child's environment, over the
    /// supervisor's own value.
    pub fn env(mut self, k: impl Into<OsString>, v: impl Into<OsString>) -> Program {
        self.env.push((k.into(), v.into()));
        self
    }
}

/// Variables the supervisor owns: never inherited from its own environment.
///
/// The service-manager ones belong to the supervisor process alone: a
/// service inheriting `NOTIFY_SOCKET` could send `READY=1`/`STOPPING=1`
/// that systemd attributes to the supervisor (with `NotifyAccess=all`), and
/// one inheriting `WATCHDOG_USEC` would pet, or fail to pet, a watchdog that
/// is not its own (`sd_notify(unset_environment=1)` exists for this). A
/// program that should talk to a notify socket gets it through
/// [`Program::env`] or `extra_env`, which are not filtered.
const OWNED_VARS: &[&str] = &[
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
    "LISTEN_PID",
    "HANDOFF_ROLE",
    "HANDOFF_SOCK_FD",
    "HANDOFF_CONTROL_SOCK",
    "HANDOFF_STATE_DIR",
    crate::sd_notify::NOTIFY_SOCKET,
    crate::sd_notify::WATCHDOG_USEC,
    crate::sd_notify::WATCHDOG_PID,
];

/// Resolves a bare program name through `PATH` like a shell would; a path
/// with a slash is taken as is (relative to the current directory).
pub fn resolve(path: &Path) -> Result<PathBuf, SpawnError> {
    if path.as_os_str().as_bytes().contains(&b'/') {
        if path.exists() {
            return Ok(path.to_path_buf());
        }
        return Err(SpawnError::NotFound {
            path: path.to_path_buf(),
            searched_path: false,
        });
    }
    let search = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&search) {
        let cand = dir.join(path);
        if let Ok(m) = cand.metadata() {
            if m.is_file() && m.permissions().mode() & 0o111 != 0 {
                return Ok(cand);
            }
        }
    }
    Err(SpawnError::NotFound {
        path: path.to_path_buf(),
        searched_path: true,
    })
}

/// Spawns `program` with `listeners` at fds 3… and `control` right after
/// them, `HANDOFF_ROLE=successor`, and `LISTEN_PID` set to the child's own
/// pid. All other descriptors are closed in the child.
pub fn spawn_service(
    program: &Program,
    listeners: &[Listener],
    control: &UnixStream,
    extra_env: &[(&str, &OsStr)],
) -> Result<Child, SpawnError> {
    spawn(program, listeners, Some(control), extra_env)
}

/// systemd's socket-activation layout (`listeners` at fds 3…, `LISTEN_FDS`,
/// `LISTEN_FDNAMES`, `LISTEN_PID` = the child's own pid), plus, for a
/// library successor, its control channel at the next fd with
/// `HANDOFF_ROLE`/`HANDOFF_SOCK_FD`.
fn spawn(
    program: &Program,
    listeners: &[Listener],
    control: Option<&UnixStream>,
    extra_env: &[(&str, &OsStr)],
) -> Result<Child, SpawnError> {
    let path = resolve(&program.path)?;
    let n = listeners.len();
    let names = listeners
        .iter()
        .map(|l| l.name.as_str())
        .collect::<Vec<_>>()
        .join(":");
    let mut ours: Vec<(&str, Vec<u8>)> = vec![
        ("LISTEN_FDS", n.to_string().into_bytes()),
        ("LISTEN_FDNAMES", names.into_bytes()),
    ];
    let mut fds: Vec<(RawFd, RawFd)> = listeners
        .iter()
        .enumerate()
        .map(|(i, l)| (l.fd.as_raw_fd(), LISTEN_FDS_START + i as RawFd))
        .collect();
    if let Some(control) = control {
        let sock_fd = LISTEN_FDS_START + n as RawFd;
        ours.push(("HANDOFF_ROLE", b"successor".to_vec()));
        ours.push(("HANDOFF_SOCK_FD", sock_fd.to_string().into_bytes()));
        fds.push((control.as_raw_fd(), sock_fd));
    }
    let env = child_env(program, ours, extra_env);

    let args: Vec<&OsStr> = program.args.iter().map(|a| a.as_os_str()).collect();
    let prep = |source| SpawnError::Prepare {
        path: path.clone(),
        source,
    };
    let mut plan = ExecPlan::new(&path, &args, &env, true, fds).map_err(prep)?;
    let pid = plan.spawn().map_err(|source| SpawnError::Exec {
        path: path.clone(),
        source,
    })?;
    Child::adopt(pid).map_err(prep)
}

/// The child's environment: ours, minus the variables the supervisor owns
/// and those `program.env`/`extra_env` set (so each name appears once —
/// `getenv` would return the first of two), plus `ours` and `extra_env`.
fn child_env(
    program: &Program,
    ours: Vec<(&str, Vec<u8>)>,
    extra_env: &[(&str, &OsStr)],
) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut env: Vec<(Vec<u8>, Vec<u8>)> = std::env::vars_os()
        .filter(|(k, _)| {
            let k = k.to_string_lossy();
            !OWNED_VARS.contains(&k.as_ref())
                && !extra_env.iter().any(|(ek, _)| *ek == k.as_ref())
                && !program
                    .env
                    .iter()
                    .any(|(pk, _)| pk.as_os_str() == k.as_ref())
        })
        .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
        .collect();
    for (k, v) in &program.env {
        env.push((k.as_bytes().to_vec(), v.as_bytes().to_vec()));
    }
    for (k, v) in ours {
        env.push((k.as_bytes().to_vec(), v));
    }
    for (k, v) in extra_env {
        env.push((k.as_bytes().to_vec(), v.as_bytes().to_vec()));
    }
    env
}

/// Spawns `program` the way systemd socket-activates a service, for
/// programs that do not link this library (notify mode): `listeners` at fds
/// 3…, `LISTEN_FDS`, `LISTEN_FDNAMES`, `LISTEN_PID` = the child's own pid,
/// plus `extra_env` (e.g. `NOTIFY_SOCKET`). No control channel and no
/// `HANDOFF_*` variables; every other descriptor is closed in the child.
pub fn spawn_activated(
    program: &Program,
    listeners: &[Listener],
    extra_env: &[(&str, &OsStr)],
) -> Result<Child, SpawnError> {
    spawn(program, listeners, None, extra_env)
}
