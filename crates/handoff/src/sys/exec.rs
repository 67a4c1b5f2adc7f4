//! Spawning with systemd's fd convention, done the async-signal-safe way.
//!
//! On Linux the child is started with `clone(CLONE_VM | CLONE_VFORK)`, the
//! way glibc's `posix_spawn` does it, elsewhere with `fork`. `fork` copies
//! the supervisor's page tables only for `execve` to throw the copy away, a
//! cost that grows with the supervisor's RSS (`cargo bench -p handoff
//! --bench spawn`, spawn until exec done: fork 0.3 ms at 2 MB, 3 ms at
//! 68 MB; the vfork-style start 0.07 ms at either). `posix_spawn` itself
//! cannot be used because `LISTEN_PID` must be the child's own pid, written
//! by the child before `execve` (docs/design.md §3).
//!
//! Between the start and `execve` the child may only make async-signal-safe
//! calls: no allocation, no locks, no formatting (the supervisor is
//! multi-threaded, and with `CLONE_VM` the child even runs on the parent's
//! memory). Everything — argv, envp, the fd plan — is therefore built in the
//! parent, and the child only resets signal handlers, shuffles fds, fills in
//! the one thing that cannot be known before the start (its own pid, for
//! `LISTEN_PID`) into a slot reserved in the environment block, and calls
//! `execve`.
//!
//! An exec failure is reported through a close-on-exec pipe: EOF means the
//! exec happened, four bytes are the child's `errno`. (With the vfork-style
//! start a slot in the plan would do, as the parent resumes only after
//! `execve` or `_exit`; the pipe serves both starts with one mechanism.)

use std::ffi::{c_void, CString, OsStr};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Name of the variable whose value is written by the child before exec.
const PID_VAR: &[u8] = b"LISTEN_PID=";
/// Room for a pid in decimal (u32::MAX has 10 digits) plus the NUL.
const PID_SLOT: usize = 11;

/// Most descriptor slots a successor reserves (`fdpass::reserve_table`): 64 Ki
/// slots are half a megabyte of kernel memory (one pointer each); past it
/// the table grows as it always does.
pub const RESERVE_CAP: u64 = 1 << 16;

/// The highest slot `fdpass::reserve_table` would touch for `want` slots under
/// the current soft limit; `-1` when the table is small enough as it is.
/// Computed ahead, for a child that may only make async-signal-safe calls
/// (here, and `fdpass::reserve_table`).
pub fn reserve_top(want: u64) -> std::os::fd::RawFd {
    let Ok((soft, _)) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
    else {
        return -1;
    };
    let slots = soft.min(want);
    if slots <= 64 {
        // Every table starts with 64 slots.
        return -1;
    }
    i32::try_from(slots - 1).unwrap_or(i32::MAX)
}

/// Everything the child needs, prepared before the child is started.
pub struct ExecPlan {
    path: CString,
    _argv_storage: Vec<CString>,
    argv: Vec<*const libc::c_char>,
    env_storage: Vec<Vec<u8>>,
    envp: Vec<*const libc::c_char>,
    /// Index into `env_storage` of the `LISTEN_PID=` entry, if any. With
    /// the vfork-style start the child's write lands in this very buffer,
    /// so after a spawn it holds the last child's pid (NUL-terminated);
    /// the next spawn simply overwrites it.
    pid_slot: Option<usize>,
    /// `(source, target)`: after the shuffle, `source` is visible at `target`.
    fds: Vec<(RawFd, RawFd)>,
    /// Scratch space for the child's lifted copies, one per entry of
    /// `fds`: sized here because the child may not allocate. (A fixed-size
    /// array once silently passed only the first 64 listeners.)
    lifted: Vec<RawFd>,
    /// Every fd at or above this is closed in the child.
    close_from: RawFd,
    /// The highest descriptor slot the child's table is grown to before
    /// exec (`-1`: left as it is); see `fdpass::reserve_table`.
    reserve_top: RawFd,
    #[cfg(not(target_os = "linux"))]
    max_fd: RawFd,
}

// SAFETY (for the raw pointers above): `argv`/`envp` point into the
// `CString`/`Vec<u8>` buffers owned by the same struct, whose heap storage
// never moves while the plan is alive; `spawn` takes `&mut self`, so no
// other thread can look at the plan while a child is using it.

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
    /// with the child's own pid before exec.
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
            reserve_top: reserve_top(RESERVE_CAP),
            #[cfg(not(target_os = "linux"))]
            max_fd: max_fd(),
        })
    }

    /// Starts the child and execs. Returns the child's pid once `execve` has
    /// succeeded; an exec failure is returned as the child's errno (the
    /// child has then been reaped).
    pub fn spawn(&mut self) -> io::Result<u32> {
        self.spawn_with(Start::PLATFORM)
    }

    /// [`spawn`](Self::spawn) with an explicit way of starting the child, so
    /// tests and the spawn benchmark can run the `fork` path on Linux too.
    pub fn spawn_with(&mut self, start: Start) -> io::Result<u32> {
        let (rd, wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| io::Error::from_raw_os_error(e as i32))?;
        let slot = match self.pid_slot {
            Some(i) => self.env_storage[i][PID_VAR.len()..].as_mut_ptr(),
            None => std::ptr::null_mut(),
        };
        // Raw pointers, not `&self`: the child writes `slot` and `lifted`
        // (with CLONE_VM, into this very plan) while it reads the rest.
        let args = ChildArgs {
            path: self.path.as_ptr(),
            argv: self.argv.as_ptr(),
            envp: self.envp.as_ptr(),
            fds: self.fds.as_ptr(),
            nfds: self.fds.len(),
            lifted: self.lifted.as_mut_ptr(),
            slot,
            close_from: self.close_from,
            reserve_top: self.reserve_top,
            #[cfg(not(target_os = "linux"))]
            max_fd: self.max_fd,
            err_fd: wr.as_raw_fd(),
        };
        let pid = {
            // Until the child has reset its signal handlers, no signal may
            // be delivered to it: a handler inherited from the parent
            // (tokio's, signal-hook's) would run in the child and, with
            // CLONE_VM, write the parent's memory and wake the parent's
            // signal pipe (the supervisor would believe it got the
            // signal). Blocking them in this thread is enough: the child
            // inherits this thread's mask. Restored when `_blocked` drops.
            let _blocked = SignalsBlocked::all()?;
            match start {
                Start::Fork => start_fork(&args)?,
                #[cfg(target_os = "linux")]
                Start::Vfork => start_vfork(&args)?,
            }
        };
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

/// How [`ExecPlan::spawn_with`] starts the child.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// `fork`: the child gets a copy of the parent's address space (page
    /// tables copied, pages copy-on-write), torn down again by `execve`.
    /// On Linux only tests and the spawn benchmark use it.
    #[cfg_attr(target_os = "linux", allow(dead_code))]
    Fork,
    /// `clone(CLONE_VM | CLONE_VFORK | SIGCHLD)` on a stack of its own: the
    /// child shares the parent's memory and the calling thread sleeps until
    /// the child has exec'd or exited, so nothing is copied.
    #[cfg(target_os = "linux")]
    Vfork,
}

impl Start {
    /// What [`ExecPlan::spawn`] uses on this platform.
    #[cfg(target_os = "linux")]
    pub const PLATFORM: Start = Start::Vfork;
    /// What [`ExecPlan::spawn`] uses on this platform.
    #[cfg(not(target_os = "linux"))]
    pub const PLATFORM: Start = Start::Fork;
}

/// What the child reads, as raw pointers into an [`ExecPlan`] the parent
/// holds `&mut` for the whole start; lives on the parent's stack.
struct ChildArgs {
    path: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    fds: *const (RawFd, RawFd),
    nfds: usize,
    /// `nfds` writable slots: scratch for the lifted copies.
    lifted: *mut RawFd,
    /// Null, or `PID_SLOT` writable bytes inside the environment block.
    slot: *mut u8,
    close_from: RawFd,
    reserve_top: RawFd,
    #[cfg(not(target_os = "linux"))]
    max_fd: RawFd,
    err_fd: RawFd,
}

/// Every signal blocked in the calling thread; the previous mask comes back
/// on drop.
///
/// glibc (and musl) silently keep their internal signals (SIGCANCEL,
/// SIGSETXID) out of any mask set through the libc wrapper. They are only
/// ever sent to a known thread id (`pthread_cancel`, `setuid` broadcast,
/// `SIGEV_THREAD` timers), never to a freshly started child, so they cannot
/// reach it before its `execve`.
struct SignalsBlocked {
    old: libc::sigset_t,
}

impl SignalsBlocked {
    fn all() -> io::Result<SignalsBlocked> {
        // SAFETY: sigfillset/pthread_sigmask only read and write the two
        // local sets; pthread_sigmask changes this thread's mask alone.
        unsafe {
            let mut all: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut old);
            if rc != 0 {
                return Err(io::Error::from_raw_os_error(rc));
            }
            Ok(SignalsBlocked { old })
        }
    }
}

impl Drop for SignalsBlocked {
    fn drop(&mut self) {
        // SAFETY: restores the mask saved by `all`, which a successful
        // pthread_sigmask filled in; it cannot fail with a valid `how`.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.old, std::ptr::null_mut()) };
    }
}

fn start_fork(args: &ChildArgs) -> io::Result<libc::pid_t> {
    // SAFETY: fork() itself is safe to call; what matters is that the child
    // branch below performs only async-signal-safe operations on memory
    // prepared before the fork (see `child`). It allocates nothing, takes
    // no lock and never returns.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: we are the child of a fork, all signals blocked (the
        // caller holds `SignalsBlocked`); `args` points into our private
        // copy of the plan (fork gives the child its own address space).
        unsafe { child(args) }
    }
    Ok(pid)
}

/// Size of the vfork child's stack. The child runs `child` and a handful of
/// thin libc syscall wrappers: a few hundred bytes of frames in a release
/// build, a few KiB in a debug one. glibc's `posix_spawn` gives its child
/// 32 KiB plus the argv size (for its shell-script fallback, which copies
/// argv on the stack; we have none); 64 KiB is that with room to spare, and
/// costs nothing until touched. No lazy symbol binding can run on it:
/// rustc links Linux binaries with `-z now`.
#[cfg(target_os = "linux")]
const VFORK_STACK: usize = 64 * 1024;

/// An mmap'd stack for the vfork child, with a PROT_NONE guard page at its
/// low end (stacks grow down), so an overflow faults the child instead of
/// scribbling over whatever mapping lies below. Unmapped on drop.
#[cfg(target_os = "linux")]
struct ChildStack {
    base: *mut c_void,
    len: usize,
}

#[cfg(target_os = "linux")]
impl ChildStack {
    fn new() -> io::Result<ChildStack> {
        // SAFETY: sysconf only reads a system constant.
        let page = match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
            n if n > 0 => n as usize,
            _ => 4096,
        };
        let len = VFORK_STACK + page;
        // SAFETY: a fresh anonymous private mapping chosen by the kernel;
        // it overlaps nothing of ours.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let stack = ChildStack { base, len };
        // SAFETY: the lowest page of the mapping made just above.
        if unsafe { libc::mprotect(base, page, libc::PROT_NONE) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(stack)
    }

    /// The initial stack pointer: the mapping's (page-aligned, so 16-byte
    /// aligned) end.
    fn top(&self) -> *mut c_void {
        self.base.wrapping_byte_add(self.len)
    }
}

#[cfg(target_os = "linux")]
impl Drop for ChildStack {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`. Only dropped
        // after clone returned, i.e. after the child has exec'd or exited,
        // so nothing runs on it any more.
        unsafe { libc::munmap(self.base, self.len) };
    }
}

#[cfg(target_os = "linux")]
fn start_vfork(args: &ChildArgs) -> io::Result<libc::pid_t> {
    let stack = ChildStack::new()?;
    // SAFETY: the vfork invariants, which make it sound for the child to
    // run on our memory:
    // - CLONE_VFORK suspends this thread until the child has called execve
    //   or _exit (or died), so `args`, the plan it points into and this
    //   stack frame stay alive and untouched by us meanwhile; other threads
    //   never see the plan (`spawn` holds it `&mut`).
    // - The child runs on `stack`, not on ours, so it clobbers none of our
    //   frames; it is unmapped only after clone returns.
    // - The child allocates nothing and takes no lock (another thread of
    //   ours may hold the allocator's); it writes only `slot`, `lifted` and
    //   errno (this thread's TLS: the child shares our thread pointer;
    //   harmless, we read errno only when clone itself failed, in which
    //   case no child ran). glibc's cancellation-point wrappers (`write` on
    //   the failure path, `close` in the pre-5.9 fallback) also set and
    //   restore this thread's cancel-type flag; they would act only on a
    //   pending `pthread_cancel` of this thread, which Rust never issues.
    // - Every signal is blocked (the caller holds `SignalsBlocked`) and the
    //   child resets every handler to SIG_DFL before it unblocks them, so
    //   none of our handlers ever runs in the child.
    // - Without CLONE_SIGHAND/CLONE_FILES the child has its own handler
    //   table and fd table: its resets and its fd shuffle do not touch ours.
    let pid = unsafe {
        libc::clone(
            vfork_entry,
            stack.top(),
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            args as *const ChildArgs as *mut c_void,
        )
    };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    drop(stack);
    Ok(pid)
}

/// Entry point of the vfork child, on its own stack.
#[cfg(target_os = "linux")]
extern "C" fn vfork_entry(args: *mut c_void) -> libc::c_int {
    // SAFETY: `args` is the `&ChildArgs` that `start_vfork` passed to
    // clone, alive on the suspended parent thread's stack; see the
    // invariants there.
    unsafe { child(&*(args as *const ChildArgs)) }
}

/// Highest signal number probed when resetting handlers: Linux's SIGRTMAX.
/// Systems with fewer signals fail `sigaction` on the rest with EINVAL,
/// which is skipped, as are glibc's two internal signals (32, 33), which
/// its wrapper refuses.
const LAST_SIGNAL: libc::c_int = 64;

/// The child side of [`ExecPlan::spawn_with`]. Never returns.
///
/// # Safety
/// Must only be called in a freshly started child (fork or vfork-style)
/// with every signal blocked, `args` valid as documented on [`ChildArgs`].
unsafe fn child(args: &ChildArgs) -> ! {
    // SAFETY (whole body): every call is async-signal-safe per POSIX
    // (or a raw syscall), operates on fds owned by this process and on
    // memory prepared before the start, writing only `lifted` and `slot`;
    // no Rust allocation, lock or panic path is touched.
    unsafe {
        // Handlers first, while everything is still blocked (see
        // `spawn_with`). Every disposition goes back to its default,
        // ignored ones too, as systemd does for a service: an exec keeps
        // SIG_IGN, so a supervisor started by `nohup` (SIGHUP ignored) or as
        // a background job of a script (SIGINT and SIGQUIT ignored) would
        // otherwise pass that on, and a `--stop-signal SIGINT` would do
        // nothing until the grace ran out. SIGPIPE too: the Rust runtime
        // ignores it and exec'd programs expect its default.
        let mut dfl: libc::sigaction = std::mem::zeroed();
        dfl.sa_sigaction = libc::SIG_DFL;
        libc::sigemptyset(&mut dfl.sa_mask);
        for sig in 1..=LAST_SIGNAL {
            if sig == libc::SIGKILL || sig == libc::SIGSTOP {
                continue;
            }
            let mut cur: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(sig, std::ptr::null(), &mut cur) != 0 {
                continue;
            }
            if cur.sa_sigaction != libc::SIG_DFL {
                libc::sigaction(sig, &dfl, std::ptr::null_mut());
            }
        }
        // The parent's threads may have signals blocked (and we blocked
        // all); exec'd programs expect none.
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
        // Own process group: a Ctrl-C at the supervisor's terminal is the
        // supervisor's to handle (graceful stop), not an instant kill of the
        // service.
        libc::setpgid(0, 0);

        // Move the error pipe above every target so the shuffle cannot
        // clobber it.
        let err = libc::fcntl(args.err_fd, libc::F_DUPFD_CLOEXEC, args.close_from);
        if err < 0 {
            libc::_exit(126);
        }
        // Two-step shuffle: first lift every source above all targets, then
        // dup2 into place. A source whose number equals another entry's
        // target can then never be overwritten before it is copied.
        // `lifted` has one slot per entry (sized before the start), so
        // every fd of the plan is passed, however many.
        let fds = std::slice::from_raw_parts(args.fds, args.nfds);
        for (i, &(src, _)) in fds.iter().enumerate() {
            let fd = libc::fcntl(src, libc::F_DUPFD_CLOEXEC, args.close_from);
            if fd < 0 {
                fail(err);
            }
            *args.lifted.add(i) = fd;
        }
        for (i, &(_, target)) in fds.iter().enumerate() {
            // dup2 clears FD_CLOEXEC on the target: it survives exec.
            if libc::dup2(*args.lifted.add(i), target) < 0 {
                fail(err);
            }
        }
        close_above(args, err);
        // Size the descriptor table for the connections a predecessor may
        // move to this process, now: the child is one thread with a table
        // of its own, so growing it waits for no RCU grace period, and exec
        // keeps it. The program, once it has threads, would sleep 10-20 ms
        // per doubling (`fdpass::reserve_table`). Best effort: a
        // failure leaves the table to grow as usual.
        if args.reserve_top > args.close_from {
            let probe = libc::fcntl(err, libc::F_DUPFD_CLOEXEC, args.reserve_top);
            if probe >= 0 {
                libc::close(probe);
            }
        }

        if !args.slot.is_null() {
            write_decimal(args.slot, libc::getpid() as u32);
        }
        libc::execve(args.path, args.argv, args.envp);
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
unsafe fn close_above(args: &ChildArgs, err: RawFd) {
    #[cfg(target_os = "linux")]
    // SAFETY: close_range on a range of our own descriptors; on kernels
    // without it (< 5.9) we fall back to closing one by one up to the
    // lifted copies' range, which is bounded by `err` + number of fds.
    unsafe {
        let lo = args.close_from as libc::c_uint;
        let e = err as libc::c_uint;
        let ok1 = e == lo || libc::syscall(libc::SYS_close_range, lo, e - 1, 0) == 0;
        let ok2 = libc::syscall(libc::SYS_close_range, e + 1, libc::c_uint::MAX, 0) == 0;
        if !(ok1 && ok2) {
            let hi = err
                .saturating_add(1 + args.nfds.min(1 << 20) as RawFd)
                .saturating_add(1024);
            for fd in args.close_from..hi {
                if fd != err {
                    libc::close(fd);
                }
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    // SAFETY: close(2) on descriptors of our own; EBADF is harmless.
    unsafe {
        for fd in args.close_from..args.max_fd {
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
#[path = "exec_tests.rs"]
mod tests;
