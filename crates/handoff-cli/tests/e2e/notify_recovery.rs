//! Notify mode after a supervisor crash, through the real binaries: the
//! supervisor is SIGKILLed, the service it ran (tests/fixtures/notify_service.py,
//! which knows nothing of handoff) keeps serving, and a new `handoff run
//! --mode notify` with the same arguments takes that very process back — its
//! listening socket copied out of it with pidfd_getfd — instead of failing to
//! bind the port the orphan holds.
//!
//! - SIGKILL under continuous load, re-attach, upgrade: the same pid is
//!   adopted (status says so), the upgrade commits and stops it, and no
//!   request fails at any point.
//! - A stale record (its pid dead, or alive but another process: wrong
//!   start time) is ignored and the service starts normally.
//!
//! Runs the supervisors under examples/subreaper, so the orphan is reaped
//! when it finally exits (pid 1 here does not reap). Needs `python3` and the
//! built binaries (`cargo build --workspace --all-features --bins --examples`).
#![cfg(target_os = "linux")]

use crate::support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use support::{
    begin_test, children_of, handoff_bin, poll_until, wait_until, Client, StartOpts, Supervisor,
    TestDirs,
};

const SETTLE: Duration = Duration::from_secs(20);
const RECORD: &str = "notify-incumbent.json";

fn service() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/notify_service.py")
}

/// `subreaper handoff run --mode notify --listen http=tcp://127.0.0.1:0 … --
/// notify_service.py`: the same arguments every time.
fn start(dirs: &TestDirs) -> Supervisor {
    Supervisor::start_with(
        &dirs.runtime,
        &dirs.state,
        &service(),
        &["--mode", "notify", "--drain-grace", "10s"],
        &StartOpts {
            subreaper: true,
            ..StartOpts::default()
        },
    )
}

/// The `handoff` process under a subreaper root.
fn handoff_under(root: u32) -> u32 {
    children_of(root)
        .into_iter()
        .find(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "handoff")
        })
        .unwrap_or_else(|| panic!("no handoff process under {root}"))
}

/// SIGTERM to `handoff run` (under its subreaper) and wait for the whole tree
/// to exit: the supervisor stops the service, the subreaper reaps the rest.
fn shut_down(mut sup: Supervisor) {
    let _ = kill(
        Pid::from_raw(handoff_under(sup.pid) as i32),
        Signal::SIGTERM,
    );
    let exited = poll_until(SETTLE, || sup.try_exit().is_some());
    assert!(
        exited,
        "supervisor did not exit on SIGTERM\n{}",
        sup.stderr_log()
    );
}

fn gone(pid: u32) -> bool {
    !Path::new(&format!("/proc/{pid}")).exists()
}

fn status_json(runtime: &Path) -> serde_json::Value {
    let st = Command::new(handoff_bin())
        .args(["status", "--json", "--runtime-dir"])
        .arg(runtime)
        .stderr(Stdio::inherit())
        .output()
        .expect("handoff status");
    assert!(st.status.success(), "handoff status failed");
    serde_json::from_slice(&st.stdout).expect("status JSON")
}

/// Clients connecting continuously (a fresh connection per request, and
/// keep-alive ones), counting every outcome: a refused connection is a
/// failure like any other.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    threads: Vec<JoinHandle<()>>,
}

impl Load {
    fn start(addr: std::net::SocketAddr) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(Mutex::new(vec![]));
        let threads = [false, false, true]
            .into_iter()
            .map(|keepalive| {
                let (stop, ok, failures) = (stop.clone(), ok.clone(), failures.clone());
                thread::spawn(move || {
                    let mut c = Client::new(addr, keepalive);
                    while !stop.load(Ordering::Relaxed) {
                        match c.get("/") {
                            Ok(r) if r.status == 200 && r.body_str().starts_with("pid=") => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(r) => failures.lock().unwrap().push(format!(
                                "status {} {:?}",
                                r.status,
                                r.body_str()
                            )),
                            Err(e) => failures.lock().unwrap().push(e.to_string()),
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            ok,
            failures,
            threads,
        }
    }

    fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    /// Waits until `n` more requests have succeeded than now.
    fn wait_more(&self, n: u64, what: &str) {
        let base = self.ok();
        wait_until(SETTLE, what, || self.ok() >= base + n);
    }

    fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().expect("load thread");
        }
        let f = self.failures.lock().unwrap().clone();
        (self.ok.load(Ordering::Relaxed), f)
    }
}

#[test]
fn a_restarted_supervisor_takes_back_the_orphaned_service_without_a_refused_connection() {
    let _g = begin_test("notify_reattach", Duration::from_secs(120));
    let dirs = TestDirs::new();
    let s1 = start(&dirs);
    let first = s1.first_pid;
    let rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dirs.state.join(RECORD)).expect("record written"))
            .expect("record is JSON");
    assert_eq!(rec["incumbent"]["pid"], first, "{rec}");
    assert_eq!(
        rec["listeners"][0]["addr"],
        format!("tcp://{}", s1.addr),
        "{rec}"
    );

    let load = Load::start(s1.addr);
    load.wait_more(50, "requests before the crash");

    // SIGKILL the supervisor itself: the service goes on, unsupervised.
    let h1 = handoff_under(s1.pid);
    kill(Pid::from_raw(h1 as i32), Signal::SIGKILL).unwrap();
    wait_until(SETTLE, "the supervisor is gone", || {
        !children_of(s1.pid).contains(&h1)
    });
    load.wait_more(50, "requests while unsupervised");
    assert_eq!(s1.serving_pid(), Ok(first), "the orphan serves");

    // Same arguments: re-attaches to the same process on the same socket.
    let s2 = start(&dirs);
    assert_eq!(s2.first_pid, first, "re-attached, not restarted");
    assert_eq!(s2.addr, s1.addr);
    // Said before `ready`, but stderr is read by another thread: poll.
    let said = format!("re-attached to the running service (pid {first})");
    wait_until(SETTLE, "the re-attach is logged", || {
        s2.stderr_log().contains(&said)
    });
    let st = status_json(&dirs.runtime);
    assert_eq!(st["incumbent_pid"], first, "{st}");
    load.wait_more(50, "requests after the re-attach");

    // An upgrade replaces the adopted process and stops it.
    let c = s2.upgrade(&[]).expect_committed();
    assert_eq!(c.old_pid, first);
    assert_ne!(c.new_pid, first);
    wait_until(
        SETTLE,
        "the adopted process has exited and been reaped",
        || gone(first),
    );
    load.wait_more(50, "requests after the upgrade");
    assert_eq!(s2.serving_pid(), Ok(c.new_pid));
    let st = status_json(&dirs.runtime);
    assert_eq!(st["incumbent_pid"], c.new_pid, "{st}");

    let (ok, failures) = load.finish();
    assert!(
        failures.is_empty(),
        "{} of {} requests failed: {:?}\nfirst supervisor:\n{}\nsecond:\n{}",
        failures.len(),
        ok + failures.len() as u64,
        &failures[..failures.len().min(5)],
        s1.stderr_log(),
        s2.stderr_log()
    );
    let new = c.new_pid;
    shut_down(s2);
    assert!(gone(new), "the service outlived a clean stop");
    assert!(
        !dirs.state.join(RECORD).exists(),
        "a clean stop clears the record"
    );
    drop(s1); // its subreaper reaped the orphan; nothing of it is left
    eprintln!("crash, re-attach, upgrade: {ok} requests, 0 failed");
}

/// The crash monitor watches an adopted process too: when it dies, a fresh
/// one is started on the same socket.
#[test]
fn an_adopted_process_that_dies_is_restarted() {
    let _g = begin_test("notify_adopted_dies", Duration::from_secs(90));
    let dirs = TestDirs::new();
    let s1 = start(&dirs);
    let first = s1.first_pid;
    let h1 = handoff_under(s1.pid);
    kill(Pid::from_raw(h1 as i32), Signal::SIGKILL).unwrap();
    wait_until(SETTLE, "the supervisor is gone", || {
        !children_of(s1.pid).contains(&h1)
    });
    let s2 = start(&dirs);
    assert_eq!(s2.first_pid, first, "re-attached");
    kill(Pid::from_raw(first as i32), Signal::SIGKILL).unwrap();
    let mut st = serde_json::Value::Null;
    wait_until(SETTLE, "a new process replaces the adopted one", || {
        st = status_json(&dirs.runtime);
        st["incumbent_pid"]
            .as_u64()
            .is_some_and(|p| p != first as u64)
    });
    let new = st["incumbent_pid"].as_u64().unwrap() as u32;
    assert_eq!(s2.serving_pid(), Ok(new), "{st}");
    shut_down(s2);
    assert!(gone(new));
    drop(s1);
}

/// A record naming `pid` with `start_ticks`, on a port nobody listens on.
fn fake_record(state: &Path, pid: u32, start_ticks: u64) {
    let rec = serde_json::json!({
        "incumbent": { "pid": pid, "start_ticks": start_ticks },
        "notify_socket": null,
        "pending": null,
        "listeners": [{ "name": "http", "addr": "tcp://127.0.0.1:1" }],
    });
    std::fs::create_dir_all(state).unwrap();
    std::fs::write(state.join(RECORD), rec.to_string()).unwrap();
}

/// Start ticks of a running process (`/proc/<pid>/stat` field 22).
fn start_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    rest.split_whitespace().nth(19).unwrap().parse().unwrap()
}

/// Starts with a stale record and checks a fresh service was started.
fn starts_afresh_despite(dirs: &TestDirs, stale_pid: u32) {
    let s = start(dirs);
    assert_ne!(s.first_pid, stale_pid);
    assert_eq!(s.serving_pid(), Ok(s.first_pid));
    assert!(
        !s.stderr_log().contains("re-attached"),
        "{}",
        s.stderr_log()
    );
    let rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dirs.state.join(RECORD)).unwrap()).unwrap();
    assert_eq!(rec["incumbent"]["pid"], s.first_pid, "{rec}");
    let pid = s.first_pid;
    shut_down(s);
    assert!(gone(pid));
}

#[test]
fn a_record_whose_process_is_dead_is_ignored() {
    let _g = begin_test("notify_stale_dead", Duration::from_secs(60));
    let dirs = TestDirs::new();
    let mut dead = Command::new("true").spawn().unwrap();
    let pid = dead.id();
    let ticks = start_ticks(pid);
    dead.wait().unwrap();
    fake_record(&dirs.state, pid, ticks);
    starts_afresh_despite(&dirs, pid);
}

#[test]
fn a_record_whose_pid_now_belongs_to_another_process_is_ignored() {
    let _g = begin_test("notify_stale_reused", Duration::from_secs(60));
    let dirs = TestDirs::new();
    // This test process is alive, but not the one recorded: its start time
    // differs. A pid-only check would try to take its fds.
    let me = std::process::id();
    fake_record(&dirs.state, me, start_ticks(me) + 1);
    starts_afresh_despite(&dirs, me);
}

/// A recorded process that is alive and the same one, but whose listener
/// cannot be taken (here: it has no fd 3 at all): `handoff run` refuses
/// with the pid, the reason and what to do, binds nothing, starts nothing.
#[test]
fn a_live_process_whose_sockets_cannot_be_taken_is_named_with_what_to_do() {
    let _g = begin_test("notify_unfetchable", Duration::from_secs(60));
    let dirs = TestDirs::new();
    // `3>&-`: no fd 3 whatever this test process was started with (a wrapper
    // such as `time -o FILE` leaves its file there, and it would be inherited).
    let mut sleeper = Command::new("sh")
        .args(["-c", "exec sleep 60 3>&-"])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let pid = sleeper.id();
    fake_record(&dirs.state, pid, start_ticks(pid));
    let out = Command::new(handoff_bin())
        .arg("run")
        .arg("--runtime-dir")
        .arg(&dirs.runtime)
        .arg("--state-dir")
        .arg(&dirs.state)
        .args([
            "--mode",
            "notify",
            "--listen",
            "http=tcp://127.0.0.1:0",
            "--",
        ])
        .arg(service())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .expect("handoff run");
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    for want in [
        format!("pid {pid} (left by a supervisor that exited) still serves"),
        "listener \"http\" (fd 3)".to_string(),
        "it has closed that descriptor".to_string(),
        format!("Stop pid {pid} (kill {pid})"),
        "FileDescriptorStoreMax=".to_string(),
    ] {
        assert!(err.contains(&want), "missing {want:?} in:\n{err}");
    }
    assert!(!dirs.runtime.join("admin.sock").exists());
}

/// A process spawned for an upgrade that never became ready before the
/// crash is killed on recovery (it would otherwise run next to the new
/// service); the record's dead incumbent is ignored.
#[test]
fn a_pending_process_from_an_interrupted_upgrade_is_killed() {
    let _g = begin_test("notify_pending_killed", Duration::from_secs(60));
    let dirs = TestDirs::new();
    let mut pending = Command::new("sleep")
        .arg("60")
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let ppid = pending.id();
    let rec = serde_json::json!({
        "incumbent": null,
        "notify_socket": null,
        "pending": { "pid": ppid, "start_ticks": start_ticks(ppid) },
        "listeners": [{ "name": "http", "addr": "tcp://127.0.0.1:1" }],
    });
    std::fs::create_dir_all(&dirs.state).unwrap();
    std::fs::write(dirs.state.join(RECORD), rec.to_string()).unwrap();
    let s = start(&dirs);
    let mut status = None;
    let reaped = poll_until(SETTLE, || {
        status = pending.try_wait().unwrap();
        status.is_some()
    });
    if !reaped {
        let _ = pending.kill();
        let _ = pending.wait();
    }
    assert!(reaped, "the pending process was not killed");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status.unwrap()),
        Some(Signal::SIGKILL as i32)
    );
    assert_eq!(s.serving_pid(), Ok(s.first_pid));
    shut_down(s);
}

/// A test-owned `NOTIFY_SOCKET`, standing in for systemd: keeps what the
/// supervisor sends, descriptors included.
struct Manager {
    sock: std::os::unix::net::UnixDatagram,
    path: PathBuf,
}

impl Manager {
    fn bind(dir: &Path) -> Manager {
        let path = dir.join("sd-notify.sock");
        let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        Manager { sock, path }
    }

    /// The next datagram starting with `prefix` (others are skipped), with
    /// its descriptors, within [`SETTLE`].
    fn next(&self, prefix: &str) -> (String, Vec<std::os::fd::OwnedFd>) {
        use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
        let end = std::time::Instant::now() + SETTLE;
        let mut seen = vec![];
        while std::time::Instant::now() < end {
            let mut buf = [0u8; 4096];
            let mut space = nix::cmsg_space!([RawFd; 8]);
            let mut iov = [std::io::IoSliceMut::new(&mut buf)];
            let (len, fds) = match recvmsg::<()>(
                self.sock.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Ok(m) => {
                    let mut fds = vec![];
                    for c in m.cmsgs().unwrap() {
                        if let ControlMessageOwned::ScmRights(raw) = c {
                            // SAFETY: the kernel installed these descriptors
                            // in our table for this message; nothing else
                            // owns them.
                            fds.extend(raw.into_iter().map(|f| unsafe { OwnedFd::from_raw_fd(f) }));
                        }
                    }
                    (m.bytes, fds)
                }
                Err(nix::Error::EAGAIN | nix::Error::EINTR) => continue,
                Err(e) => panic!("receiving on the notify socket: {e}"),
            };
            let text = String::from_utf8_lossy(&buf[..len]).into_owned();
            if text.starts_with(prefix) {
                return (text, fds);
            }
            seen.push(text);
        }
        panic!("no {prefix:?} datagram within {SETTLE:?}; got {seen:?}");
    }
}

/// The listeners go to systemd's fd store once, one `FDSTORE=1` datagram
/// per name with the socket attached; a supervisor restarted after a crash
/// and handed them back through `LISTEN_FDS` (as systemd does) re-attaches
/// with systemd's copy, and nothing is refused throughout.
#[test]
fn listeners_go_to_the_fd_store_and_come_back_through_listen_fds() {
    use std::io::{BufRead, BufReader, Read};
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let _g = begin_test("notify_fdstore", Duration::from_secs(120));
    let dirs = TestDirs::new();
    let manager = Manager::bind(dirs.root.path());
    let s1 = Supervisor::start_with(
        &dirs.runtime,
        &dirs.state,
        &service(),
        &["--mode", "notify"],
        &StartOpts {
            subreaper: true,
            env: vec![("NOTIFY_SOCKET".into(), manager.path.display().to_string())],
            ..StartOpts::default()
        },
    );
    let first = s1.first_pid;
    let (msg, fds) = manager.next("FDSTORE=1");
    assert_eq!(msg, "FDSTORE=1\nFDNAME=http");
    assert_eq!(fds.len(), 1, "one socket per FDNAME");
    let stored = std::net::TcpListener::from(fds.into_iter().next().unwrap());
    assert_eq!(stored.local_addr().unwrap(), s1.addr);

    let load = Load::start(s1.addr);
    load.wait_more(50, "requests before the crash");
    let h1 = handoff_under(s1.pid);
    kill(Pid::from_raw(h1 as i32), Signal::SIGKILL).unwrap();
    wait_until(SETTLE, "the supervisor is gone", || {
        !children_of(s1.pid).contains(&h1)
    });

    // What systemd does for a restarted unit with FileDescriptorStoreMax=:
    // the stored socket at fd 3, LISTEN_FDS=1, LISTEN_FDNAMES=http, and
    // LISTEN_PID = the pid that execs (the shell execs handoff in place).
    let stored = std::os::fd::OwnedFd::from(stored);
    let raw = stored.as_raw_fd();
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("LISTEN_PID=$$ exec \"$0\" \"$@\"")
        .arg(handoff_bin())
        .args(["run", "--mode", "notify", "--runtime-dir"])
        .arg(&dirs.runtime)
        .arg("--state-dir")
        .arg(&dirs.state)
        .args(["--listen", "http=tcp://127.0.0.1:0", "--"])
        .arg(service())
        .env("LISTEN_FDS", "1")
        .env("LISTEN_FDNAMES", "http")
        .env("NOTIFY_SOCKET", &manager.path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: between fork and exec only dup2(2) and prctl(2), both
    // async-signal-safe; nothing is allocated and no lock is taken.
    unsafe {
        cmd.pre_exec(move || {
            if raw != 3 && nix::libc::dup2(raw, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // dup2 leaves fd 3 without FD_CLOEXEC; raw == 3 would keep it.
            if nix::libc::fcntl(3, nix::libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
        });
    }
    let child = cmd.spawn().expect("spawn handoff run");
    drop(stored); // the child has its own copy at fd 3
    struct Reap(Option<std::process::Child>);
    impl Drop for Reap {
        fn drop(&mut self) {
            if let Some(mut c) = self.0.take() {
                support::kill_tree(c.id());
                let _ = c.wait();
            }
        }
    }
    let mut s2 = Reap(Some(child));
    let c2 = s2.0.as_mut().unwrap();
    let s2_pid = c2.id();
    let stdout = c2.stdout.take().unwrap();
    let mut stderr = c2.stderr.take().unwrap();
    let err_log = Arc::new(Mutex::new(String::new()));
    {
        let log = err_log.clone();
        thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stderr.read(&mut buf) {
                if n == 0 {
                    break;
                }
                log.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
    }
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let ready = loop {
        match rx.recv_timeout(SETTLE) {
            Ok(l) if l.starts_with("ready pid=") => break l,
            Ok(_) => continue,
            Err(e) => panic!(
                "no `ready` from the restarted supervisor ({e}):\n{}",
                err_log.lock().unwrap()
            ),
        }
    };
    assert_eq!(
        ready,
        format!("ready pid={first}"),
        "re-attached, not restarted"
    );
    let said = format!(
        "http=tcp://{} taken from systemd (pid {first} serves it)",
        s1.addr
    );
    wait_until(
        SETTLE,
        "the restarted supervisor says where the socket came from",
        || err_log.lock().unwrap().contains(&said),
    );
    load.wait_more(50, "requests after the re-attach");

    let up = Command::new(handoff_bin())
        .args(["upgrade", "--runtime-dir"])
        .arg(&dirs.runtime)
        .output()
        .expect("handoff upgrade");
    assert!(
        up.status.success(),
        "{}",
        String::from_utf8_lossy(&up.stderr)
    );
    wait_until(SETTLE, "the adopted process is stopped", || gone(first));
    load.wait_more(50, "requests after the upgrade");
    let (ok, failures) = load.finish();
    assert!(
        failures.is_empty(),
        "{} failed of {}: {:?}",
        failures.len(),
        ok,
        &failures[..failures.len().min(5)]
    );

    kill(Pid::from_raw(s2_pid as i32), Signal::SIGTERM).unwrap();
    let c2 = s2.0.as_mut().unwrap();
    let exited = poll_until(SETTLE, || matches!(c2.try_wait(), Ok(Some(_))));
    assert!(exited, "the restarted supervisor did not exit on SIGTERM");
    s2.0 = None;
    drop(s1);
    eprintln!("fd store round trip: {ok} requests, 0 failed");
}
