//! `subreaper CMD ARGS…`: runs CMD as a child subreaper (Linux
//! `PR_SET_CHILD_SUBREAPER`) and reaps every orphan that lands on it.
//!
//! Test tooling for the crash matrix. When a supervisor is SIGKILLed, the
//! service processes it spawned are orphaned; the kernel reparents them to
//! the nearest subreaper ancestor, else to pid 1 — and pid 1 in some
//! sandboxes (containers without an init) never reaps, so every orphan that
//! later exits would stay a zombie and fail the "no zombie" check for reasons
//! that have nothing to do with handoff. In production the service manager
//! (systemd, launchd) is that reaper.
//!
//! SIGTERM/SIGINT are forwarded to CMD. The subreaper exits with CMD's
//! status once CMD *and every orphan it adopted* have exited.

#[cfg(target_os = "linux")]
fn main() {
    use nix::sys::signal::{kill, SigSet, Signal};
    use nix::sys::wait::{waitpid, WaitStatus};
    use nix::unistd::Pid;

    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.is_empty() {
        eprintln!("usage: subreaper CMD [ARGS...]");
        std::process::exit(2);
    }
    if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
        eprintln!("subreaper: prctl: {e}");
        std::process::exit(2);
    }
    let mut sigs = SigSet::empty();
    sigs.add(Signal::SIGTERM);
    sigs.add(Signal::SIGINT);
    if let Err(e) = sigs.thread_block() {
        eprintln!("subreaper: blocking signals: {e}");
        std::process::exit(2);
    }
    // std resets the signal mask in the child.
    let child = match std::process::Command::new(&args[0])
        .args(&args[1..])
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("subreaper: spawning {}: {e}", args[0]);
            std::process::exit(127);
        }
    };
    let pid = Pid::from_raw(child.id() as i32);
    // Reaping goes through waitpid(-1) below, not through `child`.
    std::mem::forget(child);
    std::thread::spawn(move || loop {
        if let Ok(sig) = sigs.wait() {
            let _ = kill(pid, sig);
        }
    });
    let mut code = 0;
    loop {
        match waitpid(None, None) {
            Ok(WaitStatus::Exited(p, c)) if p == pid => code = c,
            Ok(WaitStatus::Signaled(p, s, _)) if p == pid => code = 128 + s as i32,
            Ok(_) => {}
            Err(nix::Error::EINTR) => {}
            Err(_) => break, // ECHILD: nobody left
        }
    }
    std::process::exit(code);
}

#[cfg(not(target_os = "linux"))]
fn main() {
    // No subreaper elsewhere: just run the command.
    let args: Vec<String> = std::env::args().skip(1).collect();
    let status = std::process::Command::new(&args[0])
        .args(&args[1..])
        .status();
    std::process::exit(status.ok().and_then(|s| s.code()).unwrap_or(127));
}
