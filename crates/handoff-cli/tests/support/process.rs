//! A running `handoff run` under test, and the results of `handoff upgrade`.
#![allow(dead_code)]
#![allow(unused_imports)]

use super::*;
use std::process::Output;

use serde_json::Value;
// ---------------------------------------------------------------------------------------
// The supervisor process
// ---------------------------------------------------------------------------------------

/// A running `handoff run` with the demo (or a wrapper) as its service, listening on one
/// TCP listener named `http` on an ephemeral loopback port.
///
/// Dropping it kills the supervisor and every descendant (see [`kill_tree`]) and reaps the
/// supervisor, so a failing test leaves no processes behind.
pub struct Supervisor {
    child: Child,
    /// Pid of `handoff run`.
    pub pid: u32,
    /// The real address of the `http` listener.
    pub addr: SocketAddr,
    /// Pid of the first incumbent, from `ready pid=N`.
    pub first_pid: u32,
    pub runtime_dir: PathBuf,
    /// Lines printed on stdout before `ready` other than `listening http=…`
    /// (e.g. `metrics http://…`).
    pub startup_lines: Vec<String>,
    /// Lines printed on stdout after `ready` (the reader keeps draining the pipe).
    stdout_lines: Receiver<String>,
    /// Everything printed on stderr so far, for failure messages.
    stderr_log: Arc<Mutex<String>>,
}

impl Supervisor {
    /// Spawns `handoff run --runtime-dir R --state-dir S --listen http=tcp://127.0.0.1:0
    /// EXTRA… -- PROGRAM` and waits (at most [`START_TIMEOUT`]) for it to report its listener
    /// and its first incumbent.
    pub fn start(
        runtime_dir: &Path,
        state_dir: &Path,
        program: &Path,
        extra_args: &[&str],
    ) -> Supervisor {
        Self::start_with(
            runtime_dir,
            state_dir,
            program,
            extra_args,
            &StartOpts::default(),
        )
    }

    /// [`start`](Self::start) with extra environment for `handoff run` (and so for the
    /// services it spawns), optionally under `examples/subreaper` so that processes
    /// orphaned by a supervisor crash are reaped (pid 1 here does not reap).
    pub fn start_with(
        runtime_dir: &Path,
        state_dir: &Path,
        program: &Path,
        extra_args: &[&str],
        opts: &StartOpts,
    ) -> Supervisor {
        let mut cmd = if opts.subreaper {
            let mut c = Command::new(example_bin("subreaper"));
            c.arg(handoff_bin());
            c
        } else {
            Command::new(handoff_bin())
        };
        cmd.envs(opts.env.iter().map(|(k, v)| (k, v)));
        cmd.arg("run");
        if opts.only_extra_args {
            cmd.args(extra_args);
        } else {
            cmd.arg("--runtime-dir")
                .arg(runtime_dir)
                .arg("--state-dir")
                .arg(state_dir)
                .args(["--listen", "http=tcp://127.0.0.1:0"])
                .args(extra_args)
                .arg("--")
                .arg(program);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let nofile = opts.nofile;
        let ignored = opts.ignored_signals.clone();
        // SAFETY: the closure runs between fork and exec and only calls prctl(2),
        // setrlimit(2) and sigaction(2) (through `signal`), which are async-signal-safe;
        // it allocates nothing and takes no lock (`ignored` was allocated before).
        unsafe {
            cmd.pre_exec(move || {
                for &sig in &ignored {
                    nix::sys::signal::signal(sig, nix::sys::signal::SigHandler::SigIgn)
                        .map_err(io::Error::from)?;
                }
                // If the test process dies without running destructors (killed by the CI
                // runner, say), take the supervisor down with it.
                nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(io::Error::from)?;
                if let Some(n) = nofile {
                    use nix::sys::resource::{setrlimit, Resource};
                    setrlimit(Resource::RLIMIT_NOFILE, n, n).map_err(io::Error::from)?;
                }
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", handoff_bin().display()));
        let pid = child.id();
        LIVE_SUPERVISORS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(pid);

        let stderr_log = Arc::new(Mutex::new(String::new()));
        spawn_stderr_reader(child.stderr.take().expect("piped stderr"), &stderr_log);
        let stdout_lines = spawn_stdout_reader(child.stdout.take().expect("piped stdout"));

        let mut sup = Supervisor {
            child,
            pid,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            first_pid: 0,
            runtime_dir: runtime_dir.to_owned(),
            startup_lines: vec![],
            stdout_lines,
            stderr_log,
        };
        // From here on a panic drops `sup`, which kills the process tree.
        let end = Instant::now() + START_TIMEOUT;
        let mut addr = None;
        let mut seen = Vec::new();
        loop {
            let left = end.saturating_duration_since(Instant::now());
            let line = match sup.stdout_lines.recv_timeout(left) {
                Ok(line) => line,
                Err(RecvTimeoutError::Timeout) => panic!(
                    "`handoff run` did not report `listening http=…` and `ready pid=…` within \
                     {START_TIMEOUT:?}; stdout so far: {seen:?}\nstderr:\n{}",
                    sup.stderr_log()
                ),
                Err(RecvTimeoutError::Disconnected) => {
                    // Stdout closed: it exited (or closed stdout, which the contract rules out).
                    let status = poll_until(Duration::from_secs(5), || {
                        matches!(sup.child.try_wait(), Ok(Some(_)))
                    });
                    panic!(
                        "`handoff run` closed stdout before `ready` (exited: {status}, {:?}); \
                         stdout: {seen:?}\nstderr:\n{}",
                        sup.child.try_wait(),
                        sup.stderr_log()
                    )
                }
            };
            if let Some(rest) = line.strip_prefix("listening http=tcp://") {
                addr = Some(
                    rest.trim()
                        .parse::<SocketAddr>()
                        .unwrap_or_else(|e| panic!("bad listener address in {line:?}: {e}")),
                );
            } else if let Some(rest) = line.strip_prefix("ready pid=") {
                sup.first_pid = rest
                    .trim()
                    .parse()
                    .unwrap_or_else(|e| panic!("bad pid in {line:?}: {e}"));
                sup.addr = addr.unwrap_or_else(|| {
                    panic!("`ready` before `listening http=…`; stdout: {seen:?}")
                });
                sup.startup_lines = seen;
                return sup;
            }
            seen.push(line);
        }
    }

    /// Everything the supervisor printed on stderr so far.
    pub fn stderr_log(&self) -> String {
        self.stderr_log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Stdout lines printed since `ready` that nobody has consumed yet.
    pub fn take_stdout_lines(&self) -> Vec<String> {
        self.stdout_lines.try_iter().collect()
    }

    /// The supervisor's exit status, once it has exited (reaped).
    pub fn try_exit(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// The metrics endpoint `handoff run --metrics` announced on stdout
    /// before `ready` (`metrics http://ADDR/metrics`).
    pub fn metrics_addr(&self) -> SocketAddr {
        self.startup_lines
            .iter()
            .find_map(|l| {
                l.strip_prefix("metrics http://")?
                    .strip_suffix("/metrics")?
                    .parse()
                    .ok()
            })
            .unwrap_or_else(|| panic!("no `metrics http://…` line in {:?}", self.startup_lines))
    }

    /// Direct children of the supervisor (zombies included).
    pub fn children(&self) -> Vec<u32> {
        children_of(self.pid)
    }

    /// The pid serving `GET /version` on the `http` listener.
    pub fn serving_pid(&self) -> Result<u32, Failure> {
        serving_pid(self.addr)
    }

    /// Waits until the system has settled on `pid` as the one service process: it is the
    /// supervisor's only child (so any retiring or failed process has exited *and* been
    /// reaped — no zombie) and it answers `GET /version`.
    pub fn wait_settled(&self, pid: u32, within: Duration) {
        let settled = poll_until(within, || {
            self.children() == [pid] && self.serving_pid() == Ok(pid)
        });
        if !settled {
            panic!(
                "not settled on pid {pid} within {within:?}: supervisor {} children (pid, \
                 state) = {:?}, GET /version -> {:?}\nsupervisor stderr:\n{}",
                self.pid,
                children_with_state(self.pid),
                get_version(self.addr),
                self.stderr_log()
            );
        }
    }

    /// Runs `handoff upgrade --runtime-dir R --json EXTRA…` to completion (bounded by
    /// [`UPGRADE_TIMEOUT`]) and returns its exit code, output and parsed JSON events.
    pub fn upgrade(&self, extra: &[&str]) -> UpgradeOutcome {
        let started = Instant::now();
        let mut child = Command::new(handoff_bin())
            .arg("upgrade")
            .arg("--runtime-dir")
            .arg(&self.runtime_dir)
            .arg("--json")
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn handoff upgrade: {e}"));
        let stdout = read_all_in_background(child.stdout.take().expect("piped stdout"));
        let stderr = read_all_in_background(child.stderr.take().expect("piped stderr"));
        let mut status = None;
        let finished = poll_until(UPGRADE_TIMEOUT, || {
            status = child.try_wait().expect("wait for handoff upgrade");
            status.is_some()
        });
        if !finished {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "`handoff upgrade {extra:?}` did not finish within {UPGRADE_TIMEOUT:?}; \
                 stdout:\n{}\nstderr:\n{}\nsupervisor stderr:\n{}",
                stdout.join().unwrap_or_default(),
                stderr.join().unwrap_or_default(),
                self.stderr_log()
            );
        }
        let elapsed = started.elapsed();
        let stdout = stdout.join().expect("stdout reader");
        let stderr = stderr.join().expect("stderr reader");
        let mut events = Vec::new();
        let mut bad_lines = Vec::new();
        for line in stdout.lines().filter(|l| !l.trim().is_empty()) {
            match serde_json::from_str::<Value>(line) {
                Ok(v) if v.is_object() => events.push(v),
                _ => bad_lines.push(line.to_owned()),
            }
        }
        UpgradeOutcome {
            args: extra.iter().map(|s| s.to_string()).collect(),
            code: status.and_then(|s| s.code()),
            stdout,
            stderr,
            events,
            bad_lines,
            elapsed,
            supervisor_stderr: self.stderr_log(),
        }
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        kill_tree(self.pid);
        let _ = self.child.wait();
        LIVE_SUPERVISORS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|&p| p != self.pid);
    }
}

/// Forwards the supervisor's stdout lines to a channel, and keeps draining the pipe after
/// nobody listens any more (a full pipe would block the supervisor's next print).
fn spawn_stdout_reader(stdout: impl Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::Builder::new()
        .name("handoff-run-stdout".into())
        .spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                eprintln!("[handoff run stdout] {line}");
                let _ = tx.send(line);
            }
        })
        .expect("spawn stdout reader");
    rx
}

/// Copies the supervisor's stderr into `log` (bounded) and echoes it to the test's stderr,
/// which the test harness shows only for failing tests.
fn spawn_stderr_reader(stderr: impl Read + Send + 'static, log: &Arc<Mutex<String>>) {
    const MAX_LOG: usize = 4 * 1024 * 1024;
    let log = Arc::clone(log);
    thread::Builder::new()
        .name("handoff-run-stderr".into())
        .spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("[handoff run] {line}");
                let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
                if log.len() < MAX_LOG {
                    log.push_str(&line);
                    log.push('\n');
                }
            }
        })
        .expect("spawn stderr reader");
}

fn read_all_in_background(mut pipe: impl Read + Send + 'static) -> JoinHandle<String> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = pipe.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

// ---------------------------------------------------------------------------------------
// `handoff upgrade` results
// ---------------------------------------------------------------------------------------

/// The result of one `handoff upgrade --json` run.
#[derive(Debug, Clone)]
pub struct UpgradeOutcome {
    pub args: Vec<String>,
    /// Exit code (`None` if killed by a signal): 0 committed, 1 aborted, 2 usage/connection.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    /// Every stdout line that parsed as a JSON object, in order.
    pub events: Vec<Value>,
    /// Stdout lines that were not JSON objects (the contract allows none).
    pub bad_lines: Vec<String>,
    /// Wall time of the command.
    pub elapsed: Duration,
    /// The supervisor's stderr as of the end of the command, for failure messages.
    pub supervisor_stderr: String,
}

/// Fields of the final `committed` event.
#[derive(Debug, Clone, PartialEq)]
pub struct Committed {
    pub handoff_id: String,
    pub old_pid: u32,
    pub new_pid: u32,
    pub total_ms: f64,
    /// Live connections moved to the new process (protocol version 3).
    pub connections_moved: Option<u64>,
    pub connections_closed: Option<u64>,
    /// Whether they went straight to the new process (protocol 4).
    pub connections_direct: Option<bool>,
}

/// Fields of the final `aborted` event.
#[derive(Debug, Clone, PartialEq)]
pub struct Aborted {
    pub phase: String,
    pub reason: String,
}

impl UpgradeOutcome {
    /// Events with `"event": kind`.
    pub fn events_of(&self, kind: &str) -> Vec<&Value> {
        self.events.iter().filter(|e| e["event"] == kind).collect()
    }

    /// `(phase, took_ms)` of each `phase` event, in order.
    pub fn phases(&self) -> Vec<(String, f64)> {
        self.events_of("phase")
            .into_iter()
            .map(|e| {
                (
                    e["phase"].as_str().unwrap_or("?").to_owned(),
                    e["took_ms"].as_f64().unwrap_or(f64::NAN),
                )
            })
            .collect()
    }

    /// How long the phase `name` took (ms), failing the test when the
    /// upgrade reported no such phase.
    pub fn phase_ms(&self, name: &str) -> f64 {
        self.phases()
            .into_iter()
            .find(|(p, _)| p == name)
            .map(|(_, ms)| ms)
            .unwrap_or_else(|| panic!("no {name} phase reported\n{self}"))
    }

    /// The final event: exactly one `committed` or `aborted`, last on stdout.
    fn final_event(&self, kind: &str) -> &Value {
        let last = self
            .events
            .last()
            .unwrap_or_else(|| panic!("no JSON events\n{self}"));
        assert_eq!(last["event"], kind, "last event is not `{kind}`\n{self}");
        let finals = self
            .events
            .iter()
            .filter(|e| e["event"] == "committed" || e["event"] == "aborted")
            .count();
        assert_eq!(finals, 1, "expected exactly one final event\n{self}");
        assert!(
            self.bad_lines.is_empty(),
            "non-JSON lines on stdout\n{self}"
        );
        last
    }

    /// Asserts the upgrade committed (exit 0, a well-formed `committed` event last) and
    /// returns the event's fields.
    pub fn expect_committed(&self) -> Committed {
        assert_eq!(self.code, Some(0), "upgrade did not commit\n{self}");
        let e = self.final_event("committed");
        let pid = |field: &str| -> u32 {
            e[field]
                .as_u64()
                .and_then(|p| u32::try_from(p).ok())
                .unwrap_or_else(|| panic!("`{field}` is not a pid in {e}\n{self}"))
        };
        Committed {
            handoff_id: e["handoff_id"]
                .as_str()
                .unwrap_or_else(|| panic!("no handoff_id in {e}\n{self}"))
                .to_owned(),
            old_pid: pid("old_pid"),
            new_pid: pid("new_pid"),
            total_ms: e["total_ms"]
                .as_f64()
                .unwrap_or_else(|| panic!("no total_ms in {e}\n{self}")),
            connections_moved: e["connections_moved"].as_u64(),
            connections_closed: e["connections_closed"].as_u64(),
            connections_direct: e["connections_direct"].as_bool(),
        }
    }

    /// Asserts the upgrade aborted (exit 1, an `aborted` event last) with a reason that
    /// mentions at least one of `reason_any_of` (case-insensitive), and returns the event.
    /// (With `--json` the reason is only required in the event, not on stderr.)
    pub fn expect_aborted(&self, reason_any_of: &[&str]) -> Aborted {
        assert_eq!(
            self.code,
            Some(1),
            "upgrade did not exit 1 (aborted)\n{self}"
        );
        let e = self.final_event("aborted");
        let aborted = Aborted {
            phase: e["phase"].as_str().unwrap_or_default().to_owned(),
            reason: e["reason"]
                .as_str()
                .unwrap_or_else(|| panic!("no reason in {e}\n{self}"))
                .to_owned(),
        };
        let reason = aborted.reason.to_lowercase();
        assert!(
            reason_any_of
                .iter()
                .any(|k| reason.contains(&k.to_lowercase())),
            "abort reason {:?} mentions none of {reason_any_of:?}\n{self}",
            aborted.reason
        );
        aborted
    }
}

impl fmt::Display for UpgradeOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "`handoff upgrade --json {}` exit {:?} after {:?}",
            self.args.join(" "),
            self.code,
            self.elapsed
        )?;
        writeln!(f, "stdout:\n{}", self.stdout.trim_end())?;
        writeln!(f, "stderr:\n{}", self.stderr.trim_end())?;
        write!(
            f,
            "supervisor stderr:\n{}",
            self.supervisor_stderr.trim_end()
        )
    }
}

// ---------------------------------------------------------------------------------------
// Other `handoff` subcommands
// ---------------------------------------------------------------------------------------

/// Runs a `handoff` subcommand to completion, bounded.
pub fn run_handoff(args: &[&str], rt: &Path, within: Duration) -> Output {
    let mut cmd = Command::new(handoff_bin());
    cmd.args(&args[..1])
        .arg("--runtime-dir")
        .arg(rt)
        .args(&args[1..]);
    finish_within(spawn_piped(cmd), within, &format!("handoff {args:?}"))
}

/// Starts `cmd` with stdin closed and stdout/stderr piped, for [`finish_within`].
pub fn spawn_piped(mut cmd: Command) -> std::process::Child {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn handoff")
}

/// Waits (bounded) for a child started by [`spawn_piped`] and collects its output.
pub fn finish_within(mut child: std::process::Child, within: Duration, what: &str) -> Output {
    let mut out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let o = std::thread::spawn(move || {
        let mut v = vec![];
        let _ = out.read_to_end(&mut v);
        v
    });
    let e = std::thread::spawn(move || {
        let mut v = vec![];
        let _ = err.read_to_end(&mut v);
        v
    });
    let mut status = None;
    if !poll_until(within, || {
        status = child.try_wait().expect("try_wait");
        status.is_some()
    }) {
        let _ = child.kill();
        let _ = child.wait();
        panic!("{what} did not finish within {within:?}");
    }
    Output {
        status: status.expect("exited"),
        stdout: o.join().expect("stdout reader"),
        stderr: e.join().expect("stderr reader"),
    }
}

/// `handoff status --json`, bounded; asserts it exits 0.
pub fn status_json(rt: &Path) -> Value {
    let out = run_handoff(&["status", "--json"], rt, Duration::from_secs(20));
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("status --json is one JSON object")
}
