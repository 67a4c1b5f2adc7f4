//! Keeps the runtime dir usable when someone deletes it under a running
//! supervisor (a tmpfiles cleaner, an operator's `rm -rf`).
//!
//! Deleting the directory unlinks `admin.sock`, `control.sock` and
//! `supervisor.lock` but closes nothing: the supervisor and the service
//! keep serving, yet no `handoff upgrade`, `status` or `stop` can reach
//! them, SIGHUP upgrades fail on the missing control socket, and a second
//! supervisor started on the same dirs would find no supervisor lock to
//! stop it. The only way out was a restart of the service.
//!
//! So every [`CHECK_EVERY`] this thread looks for `admin.sock`. When it is
//! gone it re-creates the directory (0700, checked like at start), takes
//! `supervisor.lock` again (if another supervisor got there first, it says
//! so and stands aside), binds a new admin socket served by a new thread,
//! and retires the old one. In library mode the incumbent binds
//! `control.sock` again by itself once the directory is back (it checks its
//! path every second); in notify mode the next upgrade's process gets its
//! notify socket in the re-created directory (the running one's is gone
//! with the old directory: its status messages go nowhere until then).

use std::fs::File;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use handoff_admin::schema::{self, Request};
use handoff_admin::server;

/// Set once the runtime dir was re-created and the admin socket bound again:
/// the supervisor then holds locks and sockets `handoff upgrade --supervisor`
/// does not know how to carry (it refuses).
pub static REPLACED: AtomicBool = AtomicBool::new(false);

/// How often the admin socket's path is checked.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// One admin socket being served: the listener's twin (to shut it down)
/// and the flag that tells its serve loop the end is a replacement.
struct Serving {
    listener: UnixListener,
    replaced: Arc<AtomicBool>,
}

/// Serves `listener` with `handle` on a thread of its own, and keeps
/// `runtime` in place on another, for the rest of the process.
pub fn start<H>(runtime: PathBuf, listener: UnixListener, handle: Arc<H>) -> std::io::Result<()>
where
    H: Fn(UnixStream, Request) + Send + Sync + 'static,
{
    let first = serve(listener, handle.clone())?;
    std::thread::Builder::new()
        .name("runtime-dir".into())
        .spawn(move || keep(&runtime, first, &handle))?;
    Ok(())
}

fn serve<H>(listener: UnixListener, handle: Arc<H>) -> std::io::Result<Serving>
where
    H: Fn(UnixStream, Request) + Send + Sync + 'static,
{
    let twin = listener.try_clone()?;
    let replaced = Arc::new(AtomicBool::new(false));
    let flag = replaced.clone();
    std::thread::Builder::new()
        .name("admin".into())
        .spawn(move || server::serve_until(listener, &flag, handle))?;
    Ok(Serving {
        listener: twin,
        replaced,
    })
}

fn keep<H>(runtime: &Path, mut serving: Serving, handle: &Arc<H>)
where
    H: Fn(UnixStream, Request) + Send + Sync + 'static,
{
    let admin_path = schema::admin_path(runtime);
    // The supervisor lock taken on a re-created dir; the first one is held
    // by `run` for the life of the process.
    let mut _lock: Option<File> = None;
    let mut said: Option<String> = None;
    loop {
        std::thread::sleep(CHECK_EVERY);
        if std::fs::symlink_metadata(&admin_path).is_ok() {
            continue;
        }
        match recreate(runtime, &admin_path) {
            Ok((lock, listener)) => match serve(listener, handle.clone()) {
                Ok(fresh) => {
                    let old = std::mem::replace(&mut serving, fresh);
                    old.replaced.store(true, Ordering::SeqCst);
                    REPLACED.store(true, Ordering::SeqCst);
                    // Wakes its accept with an error: that loop ends.
                    let _ = nix::sys::socket::shutdown(
                        std::os::fd::AsRawFd::as_raw_fd(&old.listener),
                        nix::sys::socket::Shutdown::Both,
                    );
                    _lock = Some(lock);
                    said = None;
                    eprintln!(
                        "handoff run: {} was removed (the runtime dir deleted?); re-created it \
                         (mode 0700) and bound {} again",
                        admin_path.display(),
                        admin_path.display()
                    );
                }
                Err(e) => say_once(&mut said, format!("serving the new admin socket: {e}")),
            },
            Err(Stand::Aside(why)) => {
                eprintln!("handoff run: {why}; this supervisor keeps running its service but no longer answers on {}", admin_path.display());
                return;
            }
            Err(Stand::Retry(e)) => say_once(&mut said, format!("{e:#}")),
        }
    }
}

/// Why the runtime dir could not be restored.
enum Stand {
    /// Another supervisor has taken the re-created dir: it is theirs now.
    Aside(String),
    /// Something a later attempt may get past (the parent dir is missing
    /// for now, out of descriptors…).
    Retry(anyhow::Error),
}

fn recreate(runtime: &Path, admin_path: &Path) -> Result<(File, UnixListener), Stand> {
    let lock = (|| -> Result<File> {
        handoff::private_fs::ensure_dir(runtime)
            .with_context(|| format!("re-creating --runtime-dir {}", runtime.display()))?;
        let lock_path = runtime.join("supervisor.lock");
        let lock = handoff::private_fs::open_file(
            File::options().create(true).truncate(false).write(true),
            &lock_path,
        )
        .with_context(|| format!("opening {}", lock_path.display()))?;
        Ok(lock)
    })()
    .map_err(Stand::Retry)?;
    if lock.try_lock().is_err() {
        return Err(Stand::Aside(format!(
            "the runtime dir {} was deleted and another supervisor has since taken it",
            runtime.display()
        )));
    }
    let listener = (|| -> Result<UnixListener> {
        if std::fs::symlink_metadata(admin_path).is_ok() {
            bail!("{} appeared meanwhile", admin_path.display());
        }
        let l = UnixListener::bind(admin_path)
            .with_context(|| format!("binding {}", admin_path.display()))?;
        std::fs::set_permissions(admin_path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("chmod 600 {}", admin_path.display()))?;
        Ok(l)
    })()
    .map_err(Stand::Retry)?;
    Ok((lock, listener))
}

/// Says `what` unless it was the last thing said: a condition that lasts
/// (the parent directory gone too) is reported once, not every second.
fn say_once(said: &mut Option<String>, what: String) {
    if said.as_deref() != Some(what.as_str()) {
        eprintln!("handoff run: the runtime dir is gone and could not be restored yet: {what}; retrying every second");
        *said = Some(what);
    }
}
