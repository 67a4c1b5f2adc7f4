//! Fake `systemctl` and `launchctl` for the service-manager tests: bash
//! scripts written into a tempdir that is put first on PATH. They append
//! every call to `calls.log` and keep the manager's state in files.
//!
//! Knobs (environment, read by the fakes):
//! - `FAKE_PRINT_LINGER=N`: after a bootout, the next N `print` calls still
//!   find the job (and a bootstrap meanwhile fails with 5).
//! - `FAKE_LINGER_MS=M`: the same, for M milliseconds of wall time.
//! - `FAKE_BOOTSTRAP_EIO=K|always`: the first K bootstraps (or all) fail
//!   with 5 even once `print` no longer finds the job.
//! - `FAKE_BOOTSTRAP_STATUS=N`: every bootstrap fails with status N.
//! - `FAKE_SYSTEMCTL_FAIL=VERB`: that systemctl verb fails with status 1.
//!
//! Also the tests' shared helpers: the launchd label and run arguments
//! they install with, and a plist check through python3's plistlib.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::support::handoff_bin;

const LAUNCHCTL: &str = r#"#!/usr/bin/env bash
# Fake launchctl: log the call, act on the state in $FAKE_STATE.
S="$FAKE_STATE"
echo "launchctl $*" >> "$S/calls.log"
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
# Is a booted-out job still lingering? (print keeps finding it)
lingering() {
  if [ -f "$S/linger_calls" ] && [ "$(cat "$S/linger_calls")" -gt 0 ]; then return 0; fi
  if [ -f "$S/linger_until" ] && [ "$(now_ms)" -lt "$(cat "$S/linger_until")" ]; then return 0; fi
  return 1
}
not_found() { echo "Could not find service \"${1##*/}\" in domain for port" >&2; exit 113; }
case "$1" in
  print)
    if [ -f "$S/loaded" ]; then
      echo "$2 = {"; echo "	state = running"; echo "	path = $(cat "$S/loaded")"; echo "}"; exit 0
    fi
    if lingering; then
      [ -f "$S/linger_calls" ] && echo $(( $(cat "$S/linger_calls") - 1 )) > "$S/linger_calls"
      echo "$2 = {"; echo "	state = stopping"; echo "}"; exit 0
    fi
    not_found "$2" ;;
  kickstart)
    [ "$2" = "-k" ] || { echo "fake: expected -k" >&2; exit 64; }
    [ -f "$S/loaded" ] || not_found "$3"
    echo kicked >> "$S/kicks"; exit 0 ;;
  bootout)
    if [ ! -f "$S/loaded" ]; then echo "Boot-out failed: 3: No such process" >&2; exit 3; fi
    rm -f "$S/loaded"
    [ -n "$FAKE_PRINT_LINGER" ] && echo "$FAKE_PRINT_LINGER" > "$S/linger_calls"
    [ -n "$FAKE_LINGER_MS" ] && echo $(( $(now_ms) + FAKE_LINGER_MS )) > "$S/linger_until"
    exit 0 ;;
  bootstrap)
    [ -f "$3" ] || { echo "Bootstrap failed: 2: No such file or directory" >&2; exit 2; }
    eio() { echo "Bootstrap failed: 5: Input/output error" >&2; echo "Try re-running the command as root for richer errors." >&2; exit 5; }
    if [ -n "$FAKE_BOOTSTRAP_STATUS" ]; then echo "Bootstrap failed: $FAKE_BOOTSTRAP_STATUS: Path had bad ownership/permissions" >&2; exit "$FAKE_BOOTSTRAP_STATUS"; fi
    lingering && eio
    [ -f "$S/loaded" ] && eio
    if [ "$FAKE_BOOTSTRAP_EIO" = always ]; then eio; fi
    if [ -n "$FAKE_BOOTSTRAP_EIO" ]; then
      n=$(cat "$S/eio_done" 2>/dev/null || echo 0)
      if [ "$n" -lt "$FAKE_BOOTSTRAP_EIO" ]; then echo $((n + 1)) > "$S/eio_done"; eio; fi
    fi
    echo "$3" > "$S/loaded"; exit 0 ;;
  *) echo "fake launchctl: unexpected $*" >&2; exit 64 ;;
esac
"#;

const SYSTEMCTL: &str = r#"#!/usr/bin/env bash
# Fake systemctl: log the call, keep "active" in $FAKE_STATE.
S="$FAKE_STATE"
echo "systemctl $*" >> "$S/calls.log"
[ "$1" = "--user" ] && shift
if [ -n "$FAKE_SYSTEMCTL_FAIL" ] && [ "$1" = "$FAKE_SYSTEMCTL_FAIL" ]; then
  echo "Job for ${!#} failed because the control process exited with error code." >&2
  echo "See \"systemctl status ${!#}\" and \"journalctl -xeu ${!#}\" for details." >&2
  exit 1
fi
case "$1" in
  daemon-reload) exit 0 ;;
  enable) [ "$2" = "--now" ] && touch "$S/active"; exit 0 ;;
  disable) rm -f "$S/active"; exit 0 ;;
  restart|reload) touch "$S/active"; exit 0 ;;
  is-active) if [ -f "$S/active" ]; then echo active; exit 0; else echo inactive; exit 3; fi ;;
  show)
    case "$2" in
      --property=NeedDaemonReload) echo no ;;
      *) echo "LoadState=loaded"; [ -f "$S/active" ] && echo "ActiveState=active" || echo "ActiveState=inactive" ;;
    esac
    exit 0 ;;
  *) echo "fake systemctl: unexpected $*" >&2; exit 64 ;;
esac
"#;

/// A scratch directory with the fakes on PATH.
pub struct Fake {
    _tmp: tempfile::TempDir,
    bin: PathBuf,
    pub state: PathBuf,
    pub units: PathBuf,
}

impl Fake {
    pub fn new() -> Fake {
        let tmp = tempfile::tempdir().unwrap();
        let (bin, state, units) = (
            tmp.path().join("bin"),
            tmp.path().join("state"),
            tmp.path().join("units"),
        );
        for d in [&bin, &state] {
            fs::create_dir_all(d).unwrap();
        }
        for (name, text) in [("launchctl", LAUNCHCTL), ("systemctl", SYSTEMCTL)] {
            crate::support::write_executable(&bin.join(name), text.as_bytes());
        }
        Fake {
            _tmp: tmp,
            bin,
            state,
            units,
        }
    }

    /// `handoff service ARGS…` with the fakes first on PATH and `env` set.
    pub fn service(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let path = format!(
            "{}:{}",
            self.bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut c = Command::new(handoff_bin());
        c.arg("service")
            .args(args)
            .env("PATH", path)
            .env("FAKE_STATE", &self.state)
            .env_remove("FAKE_PRINT_LINGER")
            .env_remove("FAKE_LINGER_MS")
            .env_remove("FAKE_BOOTSTRAP_EIO")
            .env_remove("FAKE_BOOTSTRAP_STATUS")
            .env_remove("FAKE_SYSTEMCTL_FAIL");
        for (k, v) in env {
            c.env(k, v);
        }
        c.output().unwrap()
    }

    /// The calls logged since the last call of this method.
    pub fn take_calls(&self) -> Vec<String> {
        let p = self.state.join("calls.log");
        let s = fs::read_to_string(&p).unwrap_or_default();
        let _ = fs::remove_file(&p);
        s.lines().map(str::to_owned).collect()
    }

    pub fn units_arg(&self) -> &str {
        self.units.to_str().unwrap()
    }
}

pub fn ok(o: &Output) -> String {
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(
        o.status.success(),
        "handoff service failed ({}):\nstdout:\n{out}\nstderr:\n{err}",
        o.status
    );
    out.into_owned()
}

pub fn failed(o: &Output) -> String {
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(1), "expected exit 1; stderr:\n{err}");
    err
}

pub const LABEL: &str = "com.example.kv";

pub fn uid() -> u32 {
    nix::unistd::getuid().as_raw()
}

pub fn run_args(port: &str) -> Vec<String> {
    [
        "--runtime-dir",
        "/run/kv",
        "--state-dir",
        "/var/lib/kv",
        "--listen",
        &format!("http=tcp://127.0.0.1:{port}"),
        "--",
        "/usr/local/bin/handoff-demo",
        "--flag with space",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// `install --manager launchd --scope user` of LABEL with the given port.
pub fn launchd_install(f: &Fake, port: &str, extra: &[&str], env: &[(&str, &str)]) -> Output {
    let mut args = vec![
        "install",
        "--manager",
        "launchd",
        "--scope",
        "user",
        "--dir",
        f.units_arg(),
        "--log-dir",
        "/tmp/kv-logs",
    ];
    args.extend_from_slice(extra);
    args.extend([LABEL, "--"]);
    let ra = run_args(port);
    args.extend(ra.iter().map(String::as_str));
    f.service(&args, env)
}

pub fn launchd_args<'a>(verb: &'a str, f: &'a Fake, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        verb,
        "--manager",
        "launchd",
        "--scope",
        "user",
        "--dir",
        f.units_arg(),
    ];
    v.extend_from_slice(extra);
    v.push(LABEL);
    v
}

pub fn plist_path(f: &Fake) -> PathBuf {
    f.units.join(format!("{LABEL}.plist"))
}

/// Parses the plist with python3's plistlib: it must be a valid property
/// list with the keys and arguments we promise.
pub fn check_plist(p: &Path) {
    let script = r#"
import plistlib, sys
d = plistlib.load(open(sys.argv[1], 'rb'))
assert d['Label'] == 'com.example.kv', d
assert d['ProgramArguments'][1:] == ['run', '--runtime-dir', '/run/kv', '--state-dir', '/var/lib/kv', '--listen', 'http=tcp://127.0.0.1:8080', '--', '/usr/local/bin/handoff-demo', '--flag with space'], d
assert d['ProgramArguments'][0].startswith('/'), d
assert d['RunAtLoad'] is True and d['AbandonProcessGroup'] is True, d
assert d['KeepAlive'] == {'SuccessfulExit': False}, d
assert d['StandardErrorPath'] == '/tmp/kv-logs/com.example.kv.err.log', d
print('plist ok')
"#;
    let o = Command::new("python3")
        .args(["-c", script])
        .arg(p)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "plist check failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}
