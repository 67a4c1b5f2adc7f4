//! Tests of `sys::exec`: both ways of starting the child (on Linux the
//! `fork` path is kept compiled and tested next to the vfork-style one),
//! checked by what the exec'd child itself reports through procfs.

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

#[cfg(target_os = "linux")]
mod linux {
    use super::*;
    use std::os::fd::{AsFd, OwnedFd};
    use std::sync::mpsc;
    use std::time::Duration;

    const STARTS: [Start; 2] = [Start::Fork, Start::Vfork];

    fn pipe() -> (OwnedFd, OwnedFd) {
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe2")
    }

    fn plan(path: &str, args: &[&str], fds: Vec<(RawFd, RawFd)>, pid: bool) -> ExecPlan {
        let args: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
        ExecPlan::new(Path::new(path), &args, &[], pid, fds).expect("plan")
    }

    /// Spawns `plan` (whose fd 1 is the write end `out_wr`), reads the
    /// child's stdout to EOF within a deadline and reaps it. A child that
    /// hangs is killed, so the test fails instead of hanging.
    fn run(plan: &mut ExecPlan, start: Start, out_rd: OwnedFd, out_wr: OwnedFd) -> (u32, Vec<u8>) {
        let pid = plan.spawn_with(start).expect("spawn");
        drop(out_wr);
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut out = vec![];
            let r = std::fs::File::from(out_rd).read_to_end(&mut out);
            let _ = tx.send(r.map(|_| out));
        });
        let got = rx.recv_timeout(Duration::from_secs(20));
        let child = nix::unistd::Pid::from_raw(pid as i32);
        if got.is_err() {
            let _ = nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL);
        }
        let status = nix::sys::wait::waitpid(child, None).expect("reap child");
        let out = got
            .expect("child output within 20 s")
            .expect("read child output");
        assert!(
            matches!(status, nix::sys::wait::WaitStatus::Exited(_, 0)),
            "{start:?}: child {status:?}"
        );
        (pid, out)
    }

    /// The child's descriptor table is grown before exec, to the soft
    /// limit (at most `RESERVE_CAP` slots), so connections moved to it
    /// later never make it grow (each growth of a threaded process's table
    /// sleeps an RCU grace period: `fdpass::reserve_table`).
    #[test]
    fn the_childs_descriptor_table_is_sized_before_exec() {
        let top = reserve_top(RESERVE_CAP);
        let want = u64::try_from(top + 1).unwrap_or(0).max(64);
        for start in STARTS {
            let (rd, wr) = pipe();
            let mut p = plan(
                "/bin/cat",
                &["/proc/self/status"],
                vec![(wr.as_raw_fd(), 1)],
                false,
            );
            let (_, out) = run(&mut p, start, rd, wr);
            let status = String::from_utf8_lossy(&out);
            let size: u64 = status
                .lines()
                .find_map(|l| l.strip_prefix("FDSize:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or_else(|| panic!("no FDSize in {status}"));
            assert!(
                size >= want,
                "{start:?}: FDSize {size}, want at least {want}"
            );
        }
    }

    #[test]
    fn exec_failure_returns_the_childs_errno() {
        let dir = tempfile::tempdir().expect("tempdir");
        let plain = dir.path().join("not-executable");
        std::fs::write(&plain, b"#!/bin/sh\n").expect("write");
        let plain = plain.to_str().expect("utf-8 temp path");
        for start in STARTS {
            for (path, errno) in [
                ("/nonexistent/handoff-test", libc::ENOENT),
                (plain, libc::EACCES),
                ("/", libc::EACCES),
            ] {
                let err = plan(path, &[], vec![], true).spawn_with(start).unwrap_err();
                assert_eq!(err.raw_os_error(), Some(errno), "{start:?} {path}: {err}");
            }
        }
    }

    /// A `sigset_t` as the 64 bits procfs prints, for comparison.
    fn mask_bits(set: &libc::sigset_t) -> u64 {
        // SAFETY: sigismember only reads the set; numbers it does not know
        // return -1, counted as not a member.
        (1..=64).fold(0, |acc, s| {
            if unsafe { libc::sigismember(set, s) } == 1 {
                acc | 1 << (s - 1)
            } else {
                acc
            }
        })
    }

    fn thread_mask() -> u64 {
        // SAFETY: queries this thread's mask into a local set.
        unsafe {
            let mut cur: libc::sigset_t = std::mem::zeroed();
            assert_eq!(
                libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut cur),
                0
            );
            mask_bits(&cur)
        }
    }

    fn handler_of(sig: libc::c_int) -> libc::sighandler_t {
        // SAFETY: a query-only sigaction into a local struct.
        unsafe {
            let mut cur: libc::sigaction = std::mem::zeroed();
            assert_eq!(libc::sigaction(sig, std::ptr::null(), &mut cur), 0);
            cur.sa_sigaction
        }
    }

    extern "C" fn on_usr1(_: libc::c_int) {}

    fn status_hex(status: &str, field: &str) -> u64 {
        let line = status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .unwrap_or_else(|| panic!("{field} in child status:\n{status}"));
        u64::from_str_radix(line.trim(), 16).expect("hex mask")
    }

    /// The child starts with nothing blocked and every signal at its
    /// default — SIGPIPE (which the Rust runtime ignores) and a signal the
    /// parent ignores included, as systemd starts a service; the parent's
    /// mask and handlers are as before. (Blocking SIGUSR1 here, with a handler installed, is the
    /// supervisor's situation: tokio handles and blocks signals.)
    #[test]
    fn child_signal_state_is_clean_and_parent_state_restored() {
        let bit = |s: libc::c_int| 1u64 << (s - 1);
        // SAFETY: installs a no-op handler for SIGUSR1 and ignores SIGUSR2
        // process-wide; nothing else in this test binary uses either, and
        // both are restored below.
        let (old_usr1, old_usr2) = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_usr1 as *const () as libc::sighandler_t;
            libc::sigemptyset(&mut sa.sa_mask);
            let mut old1: libc::sigaction = std::mem::zeroed();
            assert_eq!(libc::sigaction(libc::SIGUSR1, &sa, &mut old1), 0);
            sa.sa_sigaction = libc::SIG_IGN;
            let mut old2: libc::sigaction = std::mem::zeroed();
            assert_eq!(libc::sigaction(libc::SIGUSR2, &sa, &mut old2), 0);
            (old1, old2)
        };
        // SAFETY: blocks SIGUSR1 in this thread only, via a local set.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGUSR1);
            assert_eq!(
                libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()),
                0
            );
        }
        let mask_before = thread_mask();
        let pipe_before = handler_of(libc::SIGPIPE);
        let mut results = vec![];
        for start in STARTS {
            let (rd, wr) = pipe();
            let fds = vec![(wr.as_raw_fd(), 1)];
            let mut p = plan("/usr/bin/cat", &["/proc/self/status"], fds, false);
            let (_, out) = run(&mut p, start, rd, wr);
            let status = String::from_utf8_lossy(&out).into_owned();
            results.push((
                start,
                status_hex(&status, "SigBlk:"),
                status_hex(&status, "SigIgn:"),
                thread_mask(),
                handler_of(libc::SIGUSR1),
                handler_of(libc::SIGPIPE),
            ));
        }
        // SAFETY: puts back the dispositions saved above and unblocks
        // SIGUSR1 in this thread (it was not blocked before: the harness
        // runs tests with an empty mask, asserted below).
        unsafe {
            libc::sigaction(libc::SIGUSR1, &old_usr1, std::ptr::null_mut());
            libc::sigaction(libc::SIGUSR2, &old_usr2, std::ptr::null_mut());
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGUSR1);
            libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        }
        assert_eq!(mask_before, bit(libc::SIGUSR1), "test precondition");
        assert_eq!(pipe_before, libc::SIG_IGN, "Rust runtime ignores SIGPIPE");
        for (start, blk, ign, mask_after, usr1, sigpipe) in results {
            assert_eq!(blk, 0, "{start:?}: child's blocked mask");
            assert_eq!(
                ign & bit(libc::SIGPIPE),
                0,
                "{start:?}: SIGPIPE ignored in child"
            );
            // glibc's two internal signals (32, 33) cannot be set through its
            // sigaction wrapper (EINVAL); they are glibc's business, not the
            // service's.
            let ign = ign & !(bit(32) | bit(33));
            assert_eq!(ign, 0, "{start:?}: ignored in the child: {ign:#x}");
            assert_eq!(mask_after, mask_before, "{start:?}: parent mask restored");
            assert_eq!(
                usr1, on_usr1 as *const () as libc::sighandler_t,
                "{start:?}"
            );
            assert_eq!(
                sigpipe,
                libc::SIG_IGN,
                "{start:?}: parent SIGPIPE untouched"
            );
        }
    }

    fn listen_pid(environ: &[u8]) -> Option<u32> {
        environ
            .split(|b| *b == 0)
            .find_map(|v| v.strip_prefix(PID_VAR))
            .and_then(|v| std::str::from_utf8(v).ok()?.parse().ok())
    }

    /// `LISTEN_PID` is each child's own pid, also when one plan is spawned
    /// twice: with CLONE_VM the first child's write lands in the parent's
    /// buffer, and the second must overwrite it, not append to it.
    #[test]
    fn listen_pid_is_each_childs_own_pid() {
        for start in STARTS {
            let mut p = plan("/usr/bin/cat", &["/proc/self/environ"], vec![(-1, 1)], true);
            let envp_before = p.envp.clone();
            let mut seen = vec![];
            for _ in 0..2 {
                // A fresh stdout per spawn; same length, so `lifted` fits.
                let (rd, wr) = pipe();
                p.fds = vec![(wr.as_raw_fd(), 1)];
                let (pid, out) = run(&mut p, start, rd, wr);
                seen.push((pid, listen_pid(&out)));
            }
            let (pid1, pid2) = (seen[0].0, seen[1].0);
            assert_ne!(pid1, pid2);
            assert_eq!(seen[0].1, Some(pid1), "{start:?}: first spawn");
            assert_eq!(seen[1].1, Some(pid2), "{start:?}: second spawn");
            assert_eq!(
                p.envp, envp_before,
                "{start:?}: envp still points at the block"
            );
            let slot = &p.env_storage[p.pid_slot.expect("slot")];
            assert_eq!(slot.len(), PID_VAR.len() + PID_SLOT, "{start:?}: slot size");
            let parent_view = listen_pid(slot);
            match start {
                // The child wrote its own copy of memory.
                Start::Fork => assert_eq!(parent_view, None, "untouched slot"),
                Start::Vfork => assert_eq!(parent_view, Some(pid2), "shared slot"),
            }
        }
    }

    fn link(pid: u32, fd: RawFd) -> String {
        std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
            .map(|p| p.display().to_string())
            .unwrap_or_else(|e| format!("readlink {pid}/{fd}: {e}"))
    }

    /// Sources that sit on each other's target numbers (a swap) still
    /// arrive where they should: the shuffle lifts before it places.
    #[test]
    fn colliding_fd_numbers_are_swapped_correctly() {
        for start in STARTS {
            let (a_rd, a_wr) = pipe();
            let (b_rd, b_wr) = pipe();
            // High numbers of our own, so the swap's targets are ours too.
            let dup_high = |fd: &OwnedFd| {
                // SAFETY: duplicates a descriptor we own into a new one we
                // then own; close-on-exec, so other tests' children do not
                // keep it.
                let n = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 600) };
                assert!(n >= 600, "F_DUPFD: {}", io::Error::last_os_error());
                own(n)
            };
            let (x, y) = (dup_high(&a_wr), dup_high(&b_wr));
            let (xn, yn) = (x.as_raw_fd(), y.as_raw_fd());
            let (out_rd, out_wr) = pipe();
            let fds = vec![(xn, yn), (yn, xn), (out_wr.as_raw_fd(), 1)];
            let ask = [format!("/proc/self/fd/{xn}"), format!("/proc/self/fd/{yn}")];
            let args: Vec<&str> = ask.iter().map(String::as_str).collect();
            let mut p = plan("/usr/bin/readlink", &args, fds, false);
            let me = std::process::id();
            let want = format!(
                "{}\n{}\n",
                link(me, b_wr.as_raw_fd()),
                link(me, a_wr.as_raw_fd())
            );
            let (_, out) = run(&mut p, start, out_rd, out_wr);
            drop((a_rd, b_rd, x, y));
            assert_eq!(String::from_utf8_lossy(&out), want, "{start:?}: x<->y swap");
        }
    }

    static TEST_PID: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    static RAN_IN_CHILD: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

    /// Counts runs in any process but this one: with CLONE_VM, a run in
    /// the vfork child increments the counter we read.
    extern "C" fn on_winch(_: libc::c_int) {
        use std::sync::atomic::Ordering::SeqCst;
        // SAFETY: getpid is async-signal-safe.
        if unsafe { libc::getpid() } as u32 != TEST_PID.load(SeqCst) {
            RAN_IN_CHILD.fetch_add(1, SeqCst);
        }
    }

    /// `(comm, ppid)` of `pid`, from `/proc/pid/stat`.
    fn comm_ppid(pid: u32) -> Option<(String, u32)> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let (open, close) = (stat.find('(')?, stat.rfind(')')?);
        let ppid = stat[close + 1..].split_whitespace().nth(1)?.parse().ok()?;
        Some((stat[open + 1..close].to_string(), ppid))
    }

    /// A signal that reaches the vfork child before its exec never runs
    /// one of our handlers there. The child is made to linger before exec
    /// (a 3000-entry fd shuffle, some ms) while a helper thread, watching
    /// the kernel's last-pid counter, signals it (through a pidfd, checked
    /// to be our child, still not exec'd, before and after the signal).
    /// A child that kept our handler would run it on our memory and bump
    /// the counter; SIGWINCH's default is to ignore, so the child goes on.
    #[test]
    fn no_parent_handler_runs_in_the_vfork_child() {
        use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
        use std::sync::Arc;
        let me = std::process::id();
        TEST_PID.store(me, SeqCst);
        // SAFETY: installs a counting handler for SIGWINCH process-wide;
        // nothing else in this test binary uses it; restored below.
        let old = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_winch as *const () as libc::sighandler_t;
            libc::sigemptyset(&mut sa.sa_mask);
            let mut old: libc::sigaction = std::mem::zeroed();
            assert_eq!(libc::sigaction(libc::SIGWINCH, &sa, &mut old), 0);
            old
        };
        let null = std::fs::File::open("/dev/null").expect("/dev/null");
        let fds = (0..3000).map(|i| (null.as_raw_fd(), 3 + i)).collect();
        let mut p = plan("/usr/bin/true", &[], fds, true);

        let stop = Arc::new(AtomicBool::new(false));
        let helper = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut caught = vec![];
                let mut last = 0;
                while !stop.load(SeqCst) {
                    let Some(pid) = std::fs::read_to_string("/proc/sys/kernel/ns_last_pid")
                        .ok()
                        .and_then(|s| s.trim().parse::<u32>().ok())
                    else {
                        break;
                    };
                    if pid == last {
                        continue;
                    }
                    let pre_exec =
                        |pid| matches!(comm_ppid(pid), Some((c, pp)) if pp == me && c != "true");
                    let Ok(pidfd) = crate::sys::pidfd::open(pid) else {
                        continue;
                    };
                    last = pid;
                    if pre_exec(pid) {
                        let sent = crate::sys::pidfd::send_signal(
                            pidfd.as_fd(),
                            nix::sys::signal::Signal::SIGWINCH,
                        );
                        if sent.is_ok() && pre_exec(pid) {
                            caught.push(pid);
                        }
                    }
                }
                caught
            })
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let mut ours = vec![];
        while ours.len() < 20 && std::time::Instant::now() < deadline {
            let pid = p.spawn_with(Start::Vfork).expect("spawn");
            let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid as i32), None);
            ours.push(pid);
        }
        stop.store(true, SeqCst);
        let caught = helper.join().expect("helper thread");
        // SAFETY: puts back the disposition saved above.
        unsafe { libc::sigaction(libc::SIGWINCH, &old, std::ptr::null_mut()) };
        let hits = caught.iter().filter(|c| ours.contains(c)).count();
        assert_eq!(
            RAN_IN_CHILD.load(SeqCst),
            0,
            "our handler ran in a vfork child"
        );
        assert!(
            hits > 0,
            "never signalled a child before its exec ({} spawns)",
            ours.len()
        );
    }
}
