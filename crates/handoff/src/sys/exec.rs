//! fork + exec with systemd's fd convention, done the async-signal-safe way.
//!
//! The supervisor is multi-threaded, so between `fork` and `execve` the child
//! may only make async-signal-safe calls: no allocation, no locks, no
//! formatting. Everything — argv, envp, the fd plan — is therefore built in
//! the parent, and the child only shuffles fds, fills in the one thing that
//! cannot be known before fork (its own pid, for `LISTEN_PID`) into a slot
//! reserved in the environment block, and calls `execve`.
//!
//! An exec failure is reported through a close-on-exec pipe: EOF means the
//! exec happened, four bytes are the child's `errno`.

use std::ffi::{CString, OsStr};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Name of the variable whose value is written by the child after fork.
const PID_VAR: &[u8] = b"LISTEN_PID=";
/// Room for a pid in decimal (u32::MAX has 10 digits) plus the NUL.
const PID_SLOT: usize = 11;

/// Everything the child needs, prepared before fork.
pub struct ExecPlan {
    path: CString,
    _argv_storage: Vec<CString>,
    argv: Vec<*const libc::c_char>,
    env_storage: Vec<Vec<u8>>,
    envp: Vec<*const libc::c_char>,
    /// Index into `env_storage` of the `LISTEN_PID=` entry, if any.
    pid_slot: Option<usize>,
    /// `(source, target)`: after the shuffle, `source` is visible at `target`.
    fds: Vec<(RawFd, RawFd)>,
    /// Scratch space for the child's lifted copies, one per entry of
    /// `fds`: sized here because the child may not allocate. (A fixed-size
    /// array once silently passed only the first 64 listeners.)
    lifted: Vec<RawFd>,
    /// Every fd at or above this is closed in the child.
    close_from: RawFd,
    #[cfg(not(target_os = "linux"))]
    max_fd: RawFd,
}

// SAFETY (for the raw pointers above): `argv`/`envp` point into the
// `CString`/`Vec<u8>` buffers owned by the same struct, whose heap storage
// never moves while the plan is alive; the plan is only read, never shared
// across threads while a fork is in progress.

fn cstring(what: &str, bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{what} contains a NUL byte"),
        )
    })
}

impl ExecPlan {
    /// Builds a plan for `path argv…` with exactly `env` as the environment.
    /// When `with_listen_pid` is set, a `LISTEN_PID` entry is added and filled
    /// with the child's own pid after fork.
    pub fn new(
        path: &Path,
        args: &[&OsStr],
        env: &[(Vec<u8>, Vec<u8>)],
        with_listen_pid: bool,
        fds: Vec<(RawFd, RawFd)>,
    ) -> io::Result<ExecPlan> {
        let path = cstring("program path", path.as_os_str().as_bytes())?;
        let mut argv_storage = Vec::with_capacity(args.len() + 1);
        argv_storage.push(path.clone());
        for a in args {
            argv_storage.push(cstring("argument", a.as_bytes())?);
        }
        let mut argv: Vec<*const libc::c_char> = argv_storage.iter().map(|c| c.as_ptr()).collect();
        argv.push(std::ptr::null());

        let mut env_storage: Vec<Vec<u8>> = Vec::with_capacity(env.len() + 1);
        for (k, v) in env {
            if k.contains(&b'=') || k.contains(&0) || v.contains(&0) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "environment entry {:?} cannot be passed to a child",
                        String::from_utf8_lossy(k)
                    ),
                ));
            }
            let mut e = Vec::with_capacity(k.len() + v.len() + 2);
            e.extend_from_slice(k);
            e.push(b'=');
            e.extend_from_slice(v);
            e.push(0);
            env_storage.push(e);
        }
        let pid_slot = if with_listen_pid {
            let mut e = PID_VAR.to_vec();
            e.extend_from_slice(&[0u8; PID_SLOT]);
            env_storage.push(e);
            Some(env_storage.len() - 1)
        } else {
            None
        };
        let mut envp: Vec<*const libc::c_char> = env_storage
            .iter()
            .map(|e| e.as_ptr() as *const libc::c_char)
            .collect();
        envp.push(std::ptr::null());

        let top = fds.iter().map(|&(_, t)| t).max().unwrap_or(2);
        let lifted = vec![-1; fds.len()];
        Ok(ExecPlan {
            path,
            _argv_storage: argv_storage,
            argv,
            env_storage,
            envp,
            pid_slot,
            fds,
            lifted,
            close_from: top.max(2) + 1,
            #[cfg(not(target_os = "linux"))]
            max_fd: max_fd(),
        })
    }

    /// Forks and execs. Returns the child's pid once `execve` has succeeded;
    /// an exec failure is returned as the child's errno (the child has then
    /// been reaped).
    pub fn spawn(&mut self) -> io::Result<u32> {
        let (rd, wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| io::Error::from_raw_os_error(e as i32))?;
        let slot_ptr: *mut u8 = match self.pid_slot {
            Some(i) => self.env_storage[i][PID_VAR.len()..].as_mut_ptr(),
            None => std::ptr::null_mut(),
        };
        let err_fd = wr.as_raw_fd();
        // The child writes its lifted fds here, in its own copy of memory.
        let lifted_ptr: *mut RawFd = self.lifted.as_mut_ptr();
        // SAFETY: fork() itself is safe to call; what matters is that the
        // child branch below performs only async-signal-safe operations
        // (fcntl, dup2, close, close_range, sigprocmask, signal, setpgid,
        // getpid, write, execve, _exit) on memory prepared before the fork.
        // It allocates nothing, takes no lock and never returns.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(io::Error::last_os_error());
        }
        if pid == 0 {
            // SAFETY: we are the child of a fork; see `child` for the
            // argument. `slot_ptr` points into our private copy of the
            // environment block (fork gives the child its own address space).
            unsafe { child(self, slot_ptr, lifted_ptr, err_fd) }
        }
        drop(wr);
        let mut pipe = std::fs::File::from(rd);
        let mut buf = [0u8; 4];
        let mut got = 0;
        while got < 4 {
            match pipe.read(&mut buf[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        if got == 0 {
            return Ok(pid as u32);
        }
        // Exec failed: reap the child (it has already called _exit or is
        // about to) so it cannot linger as a zombie, then report its errno.
        let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
        let code = if got == 4 {
            i32::from_ne_bytes(buf)
        } else {
            libc::EIO
        };
        Err(io::Error::from_raw_os_error(code))
    }
}

/// The child side of [`ExecPlan::spawn`]. Never returns.
///
/// # Safety
/// Must only be called in the child right after `fork`, with `slot` either
/// null or pointing at `PID_SLOT` writable bytes inside `plan.env_storage`,
/// and `lifted` pointing at `plan.fds.len()` writable `RawFd`s.
unsafe fn child(plan: &ExecPlan, slot: *mut u8, lifted: *mut RawFd, err_fd: RawFd) -> ! {
    // SAFETY (whole body): every call is async-signal-safe per POSIX
    // (or a raw syscall), operates on fds/memory owned by this process, and
    // no Rust allocation or lock is touched.
    unsafe {
        // The parent's threads may have signals blocked and SIGPIPE is
        // ignored by the Rust runtime; exec'd programs expect neither.
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        // Own process group: a Ctrl-C at the supervisor's terminal is the
        // supervisor's to handle (graceful stop), not an instant kill of the
        // service.
        libc::setpgid(0, 0);

        // Move the error pipe above every target so the shuffle cannot
        // clobber it.
        let err = libc::fcntl(err_fd, libc::F_DUPFD_CLOEXEC, plan.close_from);
        if err < 0 {
            libc::_exit(126);
        }
        // Two-step shuffle: first lift every source above all targets, then
        // dup2 into place. A source whose number equals another entry's
        // target can then never be overwritten before it is copied.
        // `lifted` has one slot per entry (sized before fork), so every fd
        // of the plan is passed, however many.
        for (i, &(src, _)) in plan.fds.iter().enumerate() {
            let fd = libc::fcntl(src, libc::F_DUPFD_CLOEXEC, plan.close_from);
            if fd < 0 {
                fail(err);
            }
            *lifted.add(i) = fd;
        }
        for (i, &(_, target)) in plan.fds.iter().enumerate() {
            // dup2 clears FD_CLOEXEC on the target: it survives exec.
            if libc::dup2(*lifted.add(i), target) < 0 {
                fail(err);
            }
        }
        close_above(plan, err);

        if !slot.is_null() {
            write_decimal(slot, libc::getpid() as u32);
        }
        libc::execve(plan.path.as_ptr(), plan.argv.as_ptr(), plan.envp.as_ptr());
        fail(err)
    }
}

/// Reports errno on the error pipe and exits without running any Rust code.
unsafe fn fail(err: RawFd) -> ! {
    // SAFETY: errno location and write/_exit are async-signal-safe.
    unsafe {
        let code = *errno_location();
        let bytes = code.to_ne_bytes();
        libc::write(err, bytes.as_ptr() as *const libc::c_void, 4);
        libc::_exit(127)
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
unsafe fn errno_location() -> *mut libc::c_int {
    // SAFETY: returns the calling thread's errno slot.
    unsafe { libc::__errno_location() }
}

#[cfg(any(target_os = "macos", target_os = "ios", target_os = "freebsd"))]
unsafe fn errno_location() -> *mut libc::c_int {
    // SAFETY: returns the calling thread's errno slot.
    unsafe { libc::__error() }
}

#[cfg(not(any(
    target_os = "linux",
    target_os = "android",
    target_os = "macos",
    target_os = "ios",
    target_os = "freebsd"
)))]
unsafe fn errno_location() -> *mut libc::c_int {
    // SAFETY: returns the calling thread's errno slot.
    unsafe { libc::__errno() }
}

/// Closes every fd >= `close_from` except the error pipe (which is
/// close-on-exec anyway and must stay open until exec succeeds).
unsafe fn close_above(plan: &ExecPlan, err: RawFd) {
    #[cfg(target_os = "linux")]
    // SAFETY: close_range on a range of our own descriptors; on kernels
    // without it (< 5.9) we fall back to closing one by one up to the
    // lifted copies' range, which is bounded by `err` + number of fds.
    unsafe {
        let lo = plan.close_from as libc::c_uint;
        let e = err as libc::c_uint;
        let ok1 = e == lo || libc::syscall(libc::SYS_close_range, lo, e - 1, 0) == 0;
        let ok2 = libc::syscall(libc::SYS_close_range, e + 1, libc::c_uint::MAX, 0) == 0;
        if !(ok1 && ok2) {
            let hi = err + 1 + plan.fds.len() as RawFd + 1024;
            for fd in plan.close_from..hi {
                if fd != err {
                    libc::close(fd);
                }
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    // SAFETY: close(2) on descriptors of our own; EBADF is harmless.
    unsafe {
        for fd in plan.close_from..plan.max_fd {
            if fd != err {
                libc::close(fd);
            }
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn max_fd() -> RawFd {
    match nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE) {
        Ok((soft, _)) => soft.min(1 << 16) as RawFd,
        Err(_) => 1024,
    }
}

/// Writes `v` in decimal followed by NUL into `out` (at least 11 bytes).
unsafe fn write_decimal(out: *mut u8, mut v: u32) {
    let mut digits = [0u8; 10];
    let mut n = 0;
    loop {
        digits[n] = b'0' + (v % 10) as u8;
        n += 1;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    for i in 0..n {
        // SAFETY: n <= 10 and the slot has PID_SLOT = 11 bytes, so indices
        // 0..=n are in bounds.
        unsafe { *out.add(i) = digits[n - 1 - i] };
    }
    // SAFETY: as above, index n <= 10 < 11.
    unsafe { *out.add(n) = 0 };
}

/// Takes ownership of a raw fd returned by the kernel. Kept here so the rest
/// of the crate never needs `from_raw_fd`.
pub fn own(fd: RawFd) -> OwnedFd {
    // SAFETY: callers pass a descriptor they just received from a syscall
    // and own exclusively.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_slot() {
        let mut buf = [0xffu8; PID_SLOT];
        for (v, s) in [
            (0u32, "0"),
            (7, "7"),
            (12345, "12345"),
            (u32::MAX, "4294967295"),
        ] {
            // SAFETY: buf has PID_SLOT bytes.
            unsafe { write_decimal(buf.as_mut_ptr(), v) };
            let end = buf.iter().position(|b| *b == 0).unwrap();
            assert_eq!(&buf[..end], s.as_bytes());
        }
    }
}
