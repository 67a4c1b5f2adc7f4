//! The fleet tests' harness: the builds, a per-host HTTP load, ansible-core installed
//! once and run bounded, and a "host" (a `handoff run` with its own dirs and release link).

use crate::support;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs;
use std::io::Read;
use std::net::SocketAddr;
use std::os::unix::fs::{symlink, DirBuilderExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use sha2::{Digest, Sha256};
use support::*;

/// What the test installs. 2.19 is the newest line that runs on Python 3.11 (the
/// machine's); the venv's name carries the pin, so changing it installs afresh.
pub(super) const ANSIBLE_CORE: &str = "ansible-core==2.19.*";
pub(super) const VENV_NAME: &str = "ansible-core-2.19";
/// Budgets for the install (a cold PyPI download and unpack: ~15 s seen) and for one
/// `ansible`/`ansible-playbook` run (seen: under 30 s for the longest).
pub(super) const INSTALL_TIMEOUT: Duration = Duration::from_secs(300);
pub(super) const ANSIBLE_TIMEOUT: Duration = Duration::from_secs(240);
/// The load's pace: each host's client sends a keep-alive and a fresh-connection
/// request, then waits this long — about 150 requests a second per host, 900 for the
/// six, which leaves Ansible the share of two cores it needs (at a 5 ms pace the good
/// rollout took 28 to 45 s here rather than 24).
pub(super) const LOAD_PACE: Duration = Duration::from_millis(10);
/// Requests each host's load must complete before and after a rollout: proof it
/// was running throughout, not merely started.
pub(super) const LOAD_PROGRESS: u64 = 50;
pub(super) const PROGRESS_WITHIN: Duration = Duration::from_secs(30);
pub(super) const APP: &str = "handoff-demo";

pub(super) fn sha256_of(path: &Path) -> String {
    let bytes = fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

pub(super) fn canonical(p: &Path) -> PathBuf {
    p.canonicalize()
        .unwrap_or_else(|e| panic!("canonicalize {}: {e}", p.display()))
}

pub(super) fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("the workspace root")
}

pub(super) fn write_exec(path: &Path, content: &[u8]) {
    fs::create_dir_all(path.parent().expect("a parent dir")).expect("create the build dir");
    crate::support::write_executable(path, content);
}

// ---------------------------------------------------------------------------------------
// Builds
// ---------------------------------------------------------------------------------------

/// The builds of the demo, as a release pipeline would hand them over: v1 the demo as
/// built; v2 the same program with other bytes (a trailer after the ELF image, which the
/// loader ignores), so its digest differs; v3 a bad build, a start script that runs the
/// demo with its health check made to fail; v3 for the fleet, a build that is bad only on
/// some hosts (as one that breaks on one host's configuration): it fails its health check
/// on a host whose app dir holds a file `broken-here`, and works elsewhere.
pub(super) struct Builds {
    pub(super) v1: PathBuf,
    pub(super) v2: PathBuf,
    pub(super) v3: PathBuf,
    pub(super) v3_fleet: PathBuf,
}

impl Builds {
    pub(super) fn make(root: &Path) -> Builds {
        let demo = fs::read(demo_bin()).expect("read the demo binary");
        let v1 = root.join("builds/v1").join(APP);
        let v2 = root.join("builds/v2").join(APP);
        let v3 = root.join("builds/v3").join(APP);
        let v3_fleet = root.join("builds/v3-fleet").join(APP);
        write_exec(&v1, &demo);
        let mut bytes = demo;
        bytes.extend_from_slice(b"\nhandoff fleet test: build v2\n");
        write_exec(&v2, &bytes);
        let script = format!(
            "#!/bin/sh\n# a bad release: its health check fails\n\
             HANDOFF_DEMO_FAULT=fail-health exec '{}' \"$@\"\n",
            v1.display()
        );
        write_exec(&v3, script.as_bytes());
        // Installed as APP_DIR/releases/v3/APP: the marker is two levels up.
        let script = format!(
            "#!/bin/sh\n# a bad release where APP_DIR/broken-here exists\n\
             if [ -e \"$(dirname \"$0\")/../../broken-here\" ]; then\n\
             \x20   export HANDOFF_DEMO_FAULT=fail-health\n\
             fi\n\
             exec '{}' \"$@\"\n",
            v1.display()
        );
        write_exec(&v3_fleet, script.as_bytes());
        Builds {
            v1,
            v2,
            v3,
            v3_fleet,
        }
    }
}

// ---------------------------------------------------------------------------------------
// The load
// ---------------------------------------------------------------------------------------

/// What one host's load saw.
#[derive(Debug, Default)]
pub(super) struct Seen {
    pub(super) ok: u64,
    pub(super) failed: u64,
    /// The first few failures, with when they happened.
    pub(super) failures: Vec<String>,
    /// Which pids answered.
    pub(super) pids: BTreeSet<u32>,
    pub(super) stale_retries: u64,
}

/// A thread sending `GET /version` to one host, alternately on a keep-alive connection
/// and on a fresh one, until stopped. It never retries a failed request (the client
/// retries only a keep-alive connection the server closed while idle, which RFC 9112
/// allows and which is counted apart).
pub(super) struct HostLoad {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    seen: Arc<Mutex<Seen>>,
    thread: Option<JoinHandle<()>>,
}

impl HostLoad {
    pub(super) fn start(addr: SocketAddr) -> HostLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let seen = Arc::new(Mutex::new(Seen::default()));
        let (s, o, sn) = (stop.clone(), ok.clone(), seen.clone());
        let thread = thread::Builder::new()
            .name(format!("load-{}", addr.port()))
            .spawn(move || {
                let started = Instant::now();
                let mut clients = [Client::new(addr, true), Client::new(addr, false)];
                while !s.load(Ordering::Relaxed) {
                    for c in clients.iter_mut() {
                        let r = c.get("/version");
                        let mut seen = sn.lock().unwrap_or_else(|p| p.into_inner());
                        let pid = r.as_ref().ok().filter(|r| r.status == 200).and_then(|r| {
                            r.body_str()
                                .split_whitespace()
                                .find_map(|f| f.strip_prefix("pid=")?.parse::<u32>().ok())
                        });
                        match (pid, r) {
                            (Some(pid), _) => {
                                seen.ok += 1;
                                seen.pids.insert(pid);
                                o.fetch_add(1, Ordering::Relaxed);
                            }
                            (None, r) => {
                                seen.failed += 1;
                                if seen.failures.len() < 10 {
                                    let what = match r {
                                        Ok(resp) => format!(
                                            "status {} body {:?}",
                                            resp.status,
                                            resp.body_str()
                                        ),
                                        Err(e) => e.to_string(),
                                    };
                                    seen.failures.push(format!(
                                        "at {:.3}s: {what}",
                                        started.elapsed().as_secs_f64()
                                    ));
                                }
                            }
                        }
                    }
                    // Pacing, not waiting for anything: see LOAD_PACE.
                    thread::sleep(LOAD_PACE);
                }
                let mut seen = sn.lock().unwrap_or_else(|p| p.into_inner());
                seen.stale_retries = clients.iter().map(|c| c.stale_retries).sum();
            })
            .expect("spawn a load thread");
        HostLoad {
            stop,
            ok,
            seen,
            thread: Some(thread),
        }
    }

    pub(super) fn failed(&self) -> u64 {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).failed
    }

    pub(super) fn pids(&self) -> BTreeSet<u32> {
        self.seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pids
            .clone()
    }

    /// Stops the thread (its request in flight finishes, bounded by the client's
    /// timeout) and returns what it saw.
    pub(super) fn finish(mut self) -> Seen {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().expect("the load thread panicked");
        }
        std::mem::take(&mut *self.seen.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl Drop for HostLoad {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Waits until every load has completed `n` more requests.
pub(super) fn wait_loads_progress(loads: &[&HostLoad], n: u64, what: &str) {
    let targets: Vec<u64> = loads
        .iter()
        .map(|l| l.ok.load(Ordering::Relaxed) + n)
        .collect();
    wait_until(PROGRESS_WITHIN, what, || {
        loads
            .iter()
            .zip(&targets)
            .all(|(l, t)| l.ok.load(Ordering::Relaxed) >= *t)
    });
}

// ---------------------------------------------------------------------------------------
// Ansible: installed once per target dir, run bounded, in its own process group
// ---------------------------------------------------------------------------------------

/// The venv's `bin` dir, with `ansible-core` installed from PyPI the first time (under a
/// lock, so concurrent test processes sharing the target dir install it once). A venv is
/// used only once its marker file says the install finished.
pub(super) fn ansible_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
        fs::create_dir_all(tmp).expect("create CARGO_TARGET_TMPDIR");
        let venv = tmp.join(VENV_NAME);
        let marker = venv.join("installed-by-handoff-tests");
        let lock = fs::File::create(tmp.join(format!("{VENV_NAME}.lock"))).expect("lock file");
        let _lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
            .unwrap_or_else(|(_, e)| panic!("locking the ansible venv: {e}"));
        let bin = venv.join("bin");
        if marker.is_file() && bin.join("ansible-playbook").is_file() {
            return bin;
        }
        let _ = fs::remove_dir_all(&venv);
        let python = std::env::var("HANDOFF_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
        let step = |cmd: &mut Command, what: &str| {
            cmd.stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            let child = cmd
                .spawn()
                .unwrap_or_else(|e| panic!("{what}: cannot start it: {e}"));
            let out = finish_within(child, INSTALL_TIMEOUT, what);
            assert!(
                out.status.success(),
                "{what} failed ({}): the fleet tests install ansible-core from PyPI and need \
                 `{python} -m venv` and pip to reach it\nstdout:\n{}\nstderr:\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            out
        };
        let started = Instant::now();
        step(
            Command::new(&python).args(["-m", "venv"]).arg(&venv),
            &format!("`{python} -m venv {}`", venv.display()),
        );
        step(
            Command::new(bin.join("pip")).args([
                "install",
                "--disable-pip-version-check",
                "--no-input",
                "--quiet",
                ANSIBLE_CORE,
            ]),
            &format!("`pip install {ANSIBLE_CORE}`"),
        );
        let out = step(
            Command::new(bin.join("ansible-playbook")).arg("--version"),
            "`ansible-playbook --version`",
        );
        let version = String::from_utf8_lossy(&out.stdout).into_owned();
        eprintln!(
            "installed {ANSIBLE_CORE} in {} in {:.1}s: {}",
            venv.display(),
            started.elapsed().as_secs_f64(),
            version.lines().next().unwrap_or("?")
        );
        fs::write(&marker, version).expect("write the venv marker");
        bin
    })
}

/// One finished `ansible` or `ansible-playbook` run.
pub(super) struct AnsibleRun {
    what: String,
    pub(super) code: Option<i32>,
    pub(super) stdout: String,
    pub(super) stderr: String,
    pub(super) elapsed: Duration,
}

impl std::fmt::Display for AnsibleRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "`{}` exit {:?} after {:.1}s\nstdout:\n{}\nstderr:\n{}",
            self.what,
            self.code,
            self.elapsed.as_secs_f64(),
            self.stdout,
            self.stderr
        )
    }
}

impl AnsibleRun {
    /// `PLAY RECAP` counts per host: `{"h1": {"ok": 5, "changed": 4, ...}}`.
    pub(super) fn recap(&self) -> BTreeMap<String, BTreeMap<String, u64>> {
        let mut out = BTreeMap::new();
        let Some(at) = self.stdout.find("PLAY RECAP") else {
            panic!("no PLAY RECAP\n{self}");
        };
        for line in self.stdout[at..].lines().skip(1) {
            let Some((host, counts)) = line.split_once(" : ") else {
                continue;
            };
            let counts = counts
                .split_whitespace()
                .filter_map(|kv| {
                    let (k, v) = kv.split_once('=')?;
                    Some((k.to_owned(), v.parse().ok()?))
                })
                .collect();
            out.insert(host.trim().to_owned(), counts);
        }
        out
    }

    /// The result an ad-hoc `ansible HOST -m MODULE` printed (`HOST | CHANGED => {…}`):
    /// its status word and its JSON.
    pub(super) fn adhoc_result(&self, host: &str) -> (String, Value) {
        let prefix = format!("{host} | ");
        let at = self
            .stdout
            .find(&prefix)
            .unwrap_or_else(|| panic!("no result for {host}\n{self}"));
        let rest = &self.stdout[at + prefix.len()..];
        let (word, json) = rest
            .split_once(" => ")
            .unwrap_or_else(|| panic!("unexpected result line\n{self}"));
        let value = serde_json::Deserializer::from_str(json)
            .into_iter::<Value>()
            .next()
            .and_then(Result::ok)
            .unwrap_or_else(|| panic!("the result of {host} is not JSON\n{self}"));
        (word.trim().to_owned(), value)
    }

    /// The JSON results `-v` printed for each host at the task named `task`.
    pub(super) fn task_results(&self, task: &str) -> BTreeMap<String, Value> {
        let mut out = BTreeMap::new();
        let mut in_task = false;
        for line in self.stdout.lines() {
            if let Some(name) = line.strip_prefix("TASK [") {
                in_task = name.starts_with(&format!("{task}]"));
                continue;
            }
            if !in_task {
                continue;
            }
            // `changed: [h1] => {…}`, `ok: [h1] => {…}`, `fatal: [h1]: FAILED! => {…}`
            for word in ["changed: [", "ok: [", "fatal: ["] {
                let Some((host, rest)) = line.strip_prefix(word).and_then(|r| r.split_once(']'))
                else {
                    continue;
                };
                let rest = rest.strip_prefix(": FAILED!").unwrap_or(rest);
                if let Some(Ok(v)) = rest.strip_prefix(" => ").map(serde_json::from_str::<Value>) {
                    out.insert(host.to_owned(), v);
                }
            }
        }
        out
    }
}

/// Kills a process group when dropped, unless it was reaped (see [`run_ansible`]).
struct GroupGuard {
    pgid: Option<i32>,
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(pgid) = self.pgid {
            let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
        }
    }
}

/// Runs `program args…` from the venv with the repository's `deploy/ansible/ansible.cfg`,
/// its scratch dirs under `scratch`, in a process group of its own (the forks and the
/// `handoff` commands the module runs are in it too): the whole group is killed if the
/// run outlives [`ANSIBLE_TIMEOUT`] or the test fails, and after it ends, so nothing it
/// started outlives it.
pub(super) fn run_ansible(scratch: &Path, program: &str, args: &[&str]) -> AnsibleRun {
    let bin = ansible_bin();
    let deploy = repo_root().join("deploy/ansible");
    let mut cmd = Command::new(bin.join(program));
    cmd.args(args)
        .current_dir(scratch)
        .env("ANSIBLE_CONFIG", deploy.join("ansible.cfg"))
        .env("ANSIBLE_HOME", scratch.join("ansible-home"))
        .env("ANSIBLE_LOCAL_TEMP", scratch.join("ansible-tmp"))
        .env("ANSIBLE_REMOTE_TMP", scratch.join("ansible-remote-tmp"))
        .env("ANSIBLE_NOCOLOR", "1")
        .env("ANSIBLE_FORCE_COLOR", "0")
        .env("ANSIBLE_COLLECTIONS_SCAN_SYS_PATH", "0")
        .env("ANSIBLE_DEPRECATION_WARNINGS", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    // SAFETY: prctl(2) only, async-signal-safe, between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)?;
            Ok(())
        });
    }
    let what = format!("{program} {}", args.join(" "));
    let started = Instant::now();
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("start {what}: {e}"));
    let _group = GroupGuard {
        pgid: Some(child.id() as i32),
    };
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let out = thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err = thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let mut status = None;
    let finished = poll_until(ANSIBLE_TIMEOUT, || {
        status = child.try_wait().expect("wait for ansible");
        status.is_some()
    });
    if !finished {
        let _ = killpg(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
        let _ = child.wait();
        panic!(
            "`{what}` did not finish within {ANSIBLE_TIMEOUT:?}\nstdout so far:\n{}",
            out.join().unwrap_or_default()
        );
    }
    // `_group` kills whatever of the group is left (nothing, normally) on return.
    AnsibleRun {
        what,
        code: status.and_then(|s| s.code()),
        stdout: out.join().expect("stdout reader"),
        stderr: err.join().expect("stderr reader"),
        elapsed: started.elapsed(),
    }
}

// ---------------------------------------------------------------------------------------
// Hosts
// ---------------------------------------------------------------------------------------

/// One "host": a supervisor running the demo through `APP_DIR/current`, a link to the
/// release it runs, with its own runtime and state dirs, port, and the module's record
/// dir.
pub(super) struct Host {
    pub(super) name: String,
    // Field order: the supervisor (and its processes) goes before its dirs.
    pub(super) sup: Supervisor,
    pub(super) app_dir: PathBuf,
    record_dir: PathBuf,
    dirs: TestDirs,
}

impl Host {
    pub(super) fn start(name: &str, v1: &Path) -> Host {
        let dirs = TestDirs::new();
        let app_dir = dirs.root.path().join("app");
        let release = app_dir.join("releases/v1").join(APP);
        fs::create_dir_all(release.parent().expect("parent")).expect("create releases/v1");
        // A release as a deploy puts it on a host: a file of its own. (A hard link when
        // the filesystem allows: the same bytes without another copy of a debug build per host.)
        if fs::hard_link(v1, &release).is_err() {
            crate::support::write_executable(&release, &fs::read(v1).expect("read v1"));
        }
        symlink(&release, app_dir.join("current")).expect("link current");
        let record_dir = dirs.root.path().join("records");
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&record_dir)
            .expect("create the record dir");
        let sup = Supervisor::start(&dirs.runtime, &dirs.state, &app_dir.join("current"), &[]);
        Host {
            name: name.to_owned(),
            sup,
            app_dir,
            record_dir,
            dirs,
        }
    }

    pub(super) fn runtime(&self) -> &Path {
        &self.dirs.runtime
    }

    pub(super) fn status(&self) -> Value {
        status_with_digest(self.runtime())
    }

    pub(super) fn release(&self, version: &str) -> PathBuf {
        self.app_dir.join("releases").join(version).join(APP)
    }

    pub(super) fn current_target(&self) -> PathBuf {
        fs::read_link(self.app_dir.join("current")).expect("read the current link")
    }

    /// The inventory line of this host.
    pub(super) fn inventory_line(&self) -> String {
        format!(
            "{} handoff_runtime_dir={} app_dir={} health_url=http://{}/healthz \
             handoff_record_dir={}\n",
            self.name,
            self.runtime().display(),
            self.app_dir.display(),
            self.sup.addr,
            self.record_dir.display()
        )
    }

    /// The module's arguments common to every ad-hoc call on this host.
    pub(super) fn module_args(&self) -> String {
        format!(
            "runtime_dir={} handoff={} record_dir={} link={}",
            self.runtime().display(),
            handoff_bin().display(),
            self.record_dir.display(),
            self.app_dir.join("current").display()
        )
    }

    /// The record file the module keeps for this host (there is at most one).
    pub(super) fn record(&self) -> Option<Value> {
        let entries: Vec<PathBuf> = fs::read_dir(&self.record_dir)
            .expect("read the record dir")
            .map(|e| e.expect("dir entry").path())
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            .collect();
        assert!(entries.len() <= 1, "more than one record: {entries:?}");
        let path = entries.first()?;
        let mode = fs::metadata(path)
            .expect("stat the record")
            .permissions()
            .mode();
        assert_eq!(
            mode & 0o777,
            0o600,
            "the record {} is not 0600",
            path.display()
        );
        Some(serde_json::from_slice(&fs::read(path).expect("read the record")).expect("JSON"))
    }

    /// Asserts the service runs `build` (its bytes, as status reports them), `current`
    /// points at it, and GET /version is answered by the incumbent.
    pub(super) fn assert_runs(&self, build: &Path, what: &str) -> Value {
        let st = self.status();
        let want = sha256_of(build);
        assert_eq!(
            st["incumbent_exe_sha256"].as_str(),
            Some(want.as_str()),
            "{}: {what}: runs {} rather than {}\n{st:#}",
            self.name,
            st["incumbent_exe"],
            build.display()
        );
        assert_eq!(
            canonical(&self.current_target()),
            canonical(build),
            "{}: {what}: the current link",
            self.name
        );
        let pid = st["incumbent_pid"].as_u64().expect("an incumbent") as u32;
        assert_eq!(
            self.sup.serving_pid(),
            Ok(pid),
            "{}: {what}: GET /version",
            self.name
        );
        st
    }
}

/// One host "h1" running v1 under load, with an inventory naming it: the module
/// tests' start. (Field order: the load stops before the host, the host before
/// its scratch dir goes.)
pub(super) struct OneHost {
    pub(super) load: HostLoad,
    pub(super) host: Host,
    pub(super) builds: Builds,
    /// The inventory file's path.
    pub(super) inventory: String,
    pub(super) scratch: TestDirs,
}

impl OneHost {
    pub(super) fn start() -> OneHost {
        ansible_bin();
        let scratch = TestDirs::new();
        let builds = Builds::make(scratch.root.path());
        let host = Host::start("h1", &builds.v1);
        let inventory = scratch.root.path().join("inventory.ini");
        write_inventory(&inventory, &[&host]);
        let load = HostLoad::start(host.sup.addr);
        wait_loads_progress(&[&load], LOAD_PROGRESS, "the load runs");
        OneHost {
            load,
            host,
            builds,
            inventory: inventory.to_str().expect("UTF-8").to_owned(),
            scratch,
        }
    }
}

/// `ansible HOST -m handoff.fleet.handoff_upgrade -a "COMMON EXTRA" FLAGS…`
/// from `scratch`, with the arguments every call on `host` shares.
pub(super) fn run_module(
    scratch: &Path,
    inventory: &str,
    host: &Host,
    extra: &str,
    flags: &[&str],
) -> AnsibleRun {
    let args = format!("{} {extra}", host.module_args());
    let mut argv = vec![
        host.name.as_str(),
        "-i",
        inventory,
        "-m",
        "handoff.fleet.handoff_upgrade",
        "-a",
        &args,
    ];
    argv.extend_from_slice(flags);
    run_ansible(scratch, "ansible", &argv)
}

/// `handoff status --json` once it gives the digest of what runs (hashed in the
/// background after a new build starts).
pub(super) fn status_with_digest(runtime: &Path) -> Value {
    let mut st = Value::Null;
    wait_until(
        Duration::from_secs(30),
        "the status gives the running build's digest",
        || {
            st = status_json(runtime);
            st["incumbent_exe_sha256"].is_string()
        },
    );
    st
}

pub(super) fn write_inventory(path: &Path, hosts: &[&Host]) {
    let mut inv = String::from("[app]\n");
    for h in hosts {
        inv.push_str(&h.inventory_line());
    }
    let python = ansible_bin().join("python");
    let _ = write!(
        inv,
        "\n[app:vars]\nansible_connection=local\nansible_python_interpreter={}\n\
         handoff_bin={}\napp_name={APP}\n",
        python.display(),
        handoff_bin().display()
    );
    fs::write(path, inv).expect("write the inventory");
}

pub(super) fn counts(st: &Value) -> (u64, u64) {
    (
        st["handoffs"]["committed"].as_u64().expect("committed"),
        st["handoffs"]["aborted"].as_u64().expect("aborted"),
    )
}

pub(super) fn pid(st: &Value) -> u32 {
    st["incumbent_pid"].as_u64().expect("an incumbent pid") as u32
}
