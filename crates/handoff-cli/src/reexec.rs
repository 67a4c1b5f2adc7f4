//! `handoff upgrade --supervisor`: the running supervisor replaced by a new
//! `handoff` binary in place — the same pid, so the service's processes stay
//! its children and a service manager sees no restart (systemd's main pid
//! does not change).
//!
//! The old program, holding off every handoff ([`handoff::Supervisor::quiesce`]):
//!
//! 1. checks the new binary starts and speaks this handover
//!    (`handoff reexec-check`, bounded): one that cannot is refused with
//!    the reason and nothing changes;
//! 2. keeps across `exec` what must not be let go even for a moment — the
//!    supervisor lock (another `handoff run` on the same runtime dir would
//!    take it), the restart lock, the admin socket (clients keep
//!    connecting to the same listening socket; none is refused), and a
//!    descriptor of its own executable to fall back to — and names them,
//!    with the processes it runs, in `HANDOFF_REEXEC`;
//! 3. `exec`s the new binary with its own arguments.
//!
//! The new program finds `HANDOFF_REEXEC`, takes those descriptors back,
//! re-attaches to the incumbent the way a supervisor restarted after a
//! crash does (the listeners come back from the incumbent, which never
//! stopped serving; the journal is clear: no handoff was in flight) and
//! adopts the incumbent and the retiring processes as the children they
//! are. If any of that fails before it is ready, it `exec`s the previous
//! binary (from the descriptor) with the same handover, which then carries
//! on as before: the service never noticed. docs/design.md §9.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};

/// The environment variable that carries the handover.
pub const ENV: &str = "HANDOFF_REEXEC";

/// What `handoff reexec-check` prints first: the handover version a binary
/// speaks.
const CHECK_TAG: &str = "handoff-reexec 1";

/// How long the new binary gets to answer the check.
const CHECK_BUDGET: Duration = Duration::from_secs(5);

/// What the old program hands the new one across `exec`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Handover {
    /// The supervisor lock (`supervisor.lock` in the runtime dir), held.
    pub supervisor_lock_fd: RawFd,
    /// The restart lock in the state dir, held.
    pub restart_lock_fd: RawFd,
    /// The admin socket, listening; `None` when the runtime dir was
    /// re-created since (the new program binds a fresh one).
    pub admin_fd: Option<RawFd>,
    /// The previous program's executable, to fall back to; `None` once
    /// fallen back (no loop).
    pub fallback_fd: Option<RawFd>,
    /// The previous program's build, for the log and status.
    pub from_build: String,
    /// The `--listen` names, in order, as the service got them.
    pub names: Vec<String>,
    /// Old incumbents still finishing their connections (our children).
    pub retiring: Vec<u32>,
    /// Why the previous attempt fell back, when this is the fallback.
    #[serde(default)]
    pub fell_back: Option<String>,
    /// The `--metrics` listener, listening, so a scrape during the exec is
    /// queued rather than refused; absent without `--metrics` (and from a
    /// program that predates it: the new one binds afresh).
    #[serde(default)]
    pub metrics_fd: Option<RawFd>,
    /// The handoffs counted so far and the last one, so `handoff status`
    /// goes on where the previous program was (absent from one that
    /// predates it: the count starts afresh).
    #[serde(default)]
    pub counts: Option<handoff_admin::schema::status::Counts>,
    #[serde(default)]
    pub last_handoff: Option<handoff_admin::schema::status::LastHandoff>,
}

/// This binary's build: its version and a digest of the executable, so two
/// builds of the same version tell apart in `handoff status`.
pub fn build_id() -> String {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| {
        let digest = std::fs::File::open("/proc/self/exe")
            .or_else(|_| std::env::current_exe().and_then(File::open))
            .and_then(|mut f| {
                use std::hash::Hasher;
                let mut h = std::collections::hash_map::DefaultHasher::new();
                let mut buf = vec![0u8; 1 << 16];
                loop {
                    let n = f.read(&mut buf)?;
                    if n == 0 {
                        break;
                    }
                    h.write(&buf[..n]);
                }
                Ok(h.finish())
            });
        match digest {
            Ok(d) => format!("handoff {} ({:012x})", env!("CARGO_PKG_VERSION"), d >> 16),
            Err(_) => format!("handoff {}", env!("CARGO_PKG_VERSION")),
        }
    })
    .clone()
}

/// `handoff reexec-check`: says which handover this binary speaks and its
/// build, for a running supervisor about to `exec` it.
pub fn check_main() -> std::process::ExitCode {
    println!("{CHECK_TAG}");
    println!("{}", build_id());
    std::process::ExitCode::SUCCESS
}

/// Runs `binary reexec-check` within [`CHECK_BUDGET`]: its build id, or why
/// it cannot replace us.
pub fn preflight(binary: &Path) -> Result<String> {
    let mut child = Command::new(binary)
        .arg("reexec-check")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let deadline = Instant::now() + CHECK_BUDGET;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "{} did not answer `reexec-check` within {CHECK_BUDGET:?}",
                binary.display()
            );
        }
        // A bounded wait for another process, which has no wait-with-timeout
        // in std: poll its exit.
        std::thread::sleep(Duration::from_millis(5));
    };
    let mut out = String::new();
    let mut err = String::new();
    if let Some(mut o) = child.stdout.take() {
        let _ = o.read_to_string(&mut out);
    }
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    let mut lines = out.lines();
    if !status.success() || lines.next() != Some(CHECK_TAG) {
        bail!(
            "{} cannot replace this supervisor in place ({status}; it must be a handoff binary that knows `reexec-check`): {}",
            binary.display(),
            err.trim().lines().last().unwrap_or("no error output")
        );
    }
    Ok(lines.next().unwrap_or("unknown build").to_string())
}

/// The binary to `exec` by default: the one we run, by the path it was
/// started from (replace the file there, then `upgrade --supervisor`).
pub fn default_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("finding this supervisor's executable")?;
    // A file replaced on disk shows as "path (deleted)" through /proc.
    let s = exe.to_string_lossy();
    Ok(match s.strip_suffix(" (deleted)") {
        Some(p) => PathBuf::from(p),
        None => exe,
    })
}

/// Keeps `fd` open across `exec` (clears close-on-exec).
fn keep_open(fd: BorrowedFd<'_>) -> Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::empty())).context("keeping a descriptor across exec")?;
    Ok(())
}

/// Closes `fd` on `exec` again (the `exec` failed: nothing must leak into
/// the service's next process).
fn close_on_exec(fd: BorrowedFd<'_>) {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    let _ = fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC));
}

/// `exec`s `binary` with our own arguments and `handover` in the
/// environment. Returns only if the `exec` failed: then nothing changed
/// (the descriptors are close-on-exec again, the variable unset).
pub fn exec(binary: &Path, handover: &Handover, keep: &[BorrowedFd<'_>]) -> anyhow::Error {
    let run = || -> Result<std::convert::Infallible> {
        for fd in keep {
            keep_open(*fd)?;
        }
        let json = serde_json::to_string(handover)?;
        let path = std::ffi::CString::new(binary.as_os_str().as_encoded_bytes())
            .map_err(|_| anyhow!("{} contains a NUL byte", binary.display()))?;
        let args = cstrings(std::env::args_os().skip(1))?;
        let mut argv = vec![path.clone()];
        argv.extend(args);
        let env = environment(&json)?;
        nix::unistd::execve(&path, &argv, &env)
            .with_context(|| format!("exec {}", binary.display()))
    };
    let e = match run() {
        Err(e) => e,
        Ok(never) => match never {},
    };
    for fd in keep {
        close_on_exec(*fd);
    }
    e
}

/// Falls back to the previous binary, from its descriptor, with the same
/// handover (minus the fallback: it does not come back here). Returns only
/// if that `exec` failed too.
pub fn fall_back(mut handover: Handover, why: &str) -> anyhow::Error {
    let Some(fd) = handover.fallback_fd.take() else {
        return anyhow!("no previous binary to fall back to");
    };
    handover.fell_back = Some(why.to_string());
    let run = || -> Result<std::convert::Infallible> {
        let exe = take_fd(fd)?;
        let json = serde_json::to_string(&handover)?;
        let mut argv = vec![std::ffi::CString::new("handoff")?];
        argv.extend(cstrings(std::env::args_os().skip(1))?);
        let env = environment(&json)?;
        nix::unistd::fexecve(exe.as_fd(), &argv, &env).context("exec of the previous binary")
    };
    match run() {
        Err(e) => e,
        Ok(never) => match never {},
    }
}

fn cstrings(args: impl Iterator<Item = std::ffi::OsString>) -> Result<Vec<std::ffi::CString>> {
    args.map(|a| {
        std::ffi::CString::new(a.as_encoded_bytes())
            .map_err(|_| anyhow!("an argument contains a NUL byte"))
    })
    .collect()
}

/// Our environment with `HANDOFF_REEXEC` set to `json`, and systemd's
/// variables put back (`systemd::init` took them out at start; the next
/// program is still the unit's main process, and must keep notifying it).
fn environment(json: &str) -> Result<Vec<std::ffi::CString>> {
    let systemd = crate::systemd::inherited_env();
    let mut env: Vec<std::ffi::CString> = std::env::vars_os()
        .filter(|(k, _)| k != ENV && !systemd.iter().any(|(s, _)| k == s.as_str()))
        .map(|(k, v)| {
            let mut kv = k.into_encoded_bytes();
            kv.push(b'=');
            kv.extend_from_slice(v.as_encoded_bytes());
            std::ffi::CString::new(kv)
                .map_err(|_| anyhow!("an environment variable contains a NUL byte"))
        })
        .collect::<Result<_>>()?;
    for (k, v) in systemd {
        env.push(std::ffi::CString::new(format!("{k}={v}"))?);
    }
    env.push(std::ffi::CString::new(format!("{ENV}={json}"))?);
    Ok(env)
}

/// The handover from the environment, if this process was `exec`ed by a
/// supervisor in place (the variable is removed: the service must not see
/// it).
pub fn take_handover() -> Result<Option<Handover>> {
    let Some(v) = std::env::var_os(ENV) else {
        return Ok(None);
    };
    // Before any thread starts (as `systemd::init` does for its own).
    std::env::remove_var(ENV);
    let s = v.to_str().ok_or_else(|| anyhow!("{ENV} is not UTF-8"))?;
    let h: Handover = serde_json::from_str(s)
        .with_context(|| format!("reading {ENV} (a supervisor handover)"))?;
    Ok(Some(h))
}

/// Takes ownership of a descriptor named in the handover, after checking it
/// is open (close-on-exec again from here on).
pub fn take_fd(fd: RawFd) -> Result<OwnedFd> {
    if fd < 3 {
        bail!("descriptor {fd} in {ENV} is one of the standard streams");
    }
    handoff::listeners::take_inherited(fd)
        .with_context(|| format!("descriptor {fd} named in {ENV}"))
}

/// The raw number of a descriptor to hand over.
pub fn raw(fd: BorrowedFd<'_>) -> RawFd {
    fd.as_raw_fd()
}
