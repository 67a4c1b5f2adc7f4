//! `handoff run --config FILE`: everything the flags can say, in TOML.
//!
//! The file uses the flags' own spelling (`state-dir`, `drain-grace`, …) so
//! an operator never has to translate between the two, and a flag given on
//! the command line always wins over the file: a unit file can carry the
//! config while a one-off run overrides a single value. Unknown keys are an
//! error, not a warning — a misspelt `drain_grace` silently falling back to
//! the default is exactly the surprise a config file must not spring.
//!
//! Relative paths in the file are taken relative to the file's own
//! directory (the file is often read by a service manager whose working
//! directory is `/`), and a `program` without a `/` is looked up on `PATH`
//! like any command.
//!
//! ```toml
//! runtime-dir = "/run/kv"
//! state-dir   = "/var/lib/kv"
//! listen      = ["http=tcp://0.0.0.0:8080", "admin=unix:/run/kv/admin-http.sock"]
//! deadline    = "2m"
//! drain-grace = "30s"
//! abort-grace = "5s"
//! metrics     = "127.0.0.1:9464"
//! program     = ["/usr/local/bin/kv", "--data", "/var/lib/kv"]
//! # For a program that does not link the library (see `--mode notify`):
//! # mode = "notify"; stop-signal = "SIGQUIT"; ready-probe = "http://127.0.0.1:8081/healthz"
//! ```

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::args::RunArgs;
use crate::notify_mode::{parse_signal, Mode, NotifyArgs};

/// What the file may say. Every key is optional: the file and the flags
/// together must name the required ones.
#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileConfig {
    pub runtime_dir: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub listen: Option<Vec<String>>,
    pub deadline: Option<DurationValue>,
    pub drain_grace: Option<DurationValue>,
    pub abort_grace: Option<DurationValue>,
    pub metrics: Option<String>,
    /// `library` or `notify` (see `--mode`).
    pub mode: Option<String>,
    pub stop_signal: Option<String>,
    pub ready_probe: Option<String>,
    pub probe_only: Option<bool>,
    pub program: Option<Vec<String>>,
}

/// `"90s"`/`"2m"` like the flags, or a bare number of seconds.
#[derive(Debug, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum DurationValue {
    Text(String),
    Seconds(u64),
}

impl DurationValue {
    fn resolve(&self, key: &str) -> Result<Duration, String> {
        match self {
            DurationValue::Text(s) => crate::duration::parse(s).map_err(|e| format!("{key}: {e}")),
            DurationValue::Seconds(n) => Ok(Duration::from_secs(*n)),
        }
    }
}

/// The settings `handoff run` works from, after the file and the flags
/// were merged and checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub runtime_dir: PathBuf,
    pub state_dir: PathBuf,
    pub listen: Vec<String>,
    pub deadline: Duration,
    pub drain_grace: Duration,
    pub abort_grace: Duration,
    pub metrics: Option<SocketAddr>,
    /// Notify mode and its options, resolved (`mode` always set).
    pub notify: NotifyArgs,
    pub program: Vec<OsString>,
}

pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(300);
pub const DEFAULT_DRAIN_GRACE: Duration = Duration::from_secs(60);
pub const DEFAULT_ABORT_GRACE: Duration = Duration::from_secs(5);

/// Reads and parses a config file; the error names the file and, for
/// syntax or type errors, the line and column (toml's own message).
pub fn load(path: &Path) -> Result<FileConfig, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("reading config file {}: {e}", path.display()))?;
    parse(&text).map_err(|e| format!("config file {}: {e}", path.display()))
}

pub fn parse(text: &str) -> Result<FileConfig, String> {
    toml::from_str(text).map_err(|e| e.to_string())
}

/// Merges the flags over the file (when there is one) and checks that the
/// required settings are all there, saying where each could come from.
pub fn resolve(a: &RunArgs) -> Result<Settings, String> {
    let (file, base) = match &a.config {
        Some(p) => {
            let base = p
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| PathBuf::from("."));
            (load(p)?, base)
        }
        None => (FileConfig::default(), PathBuf::from(".")),
    };
    merge(a, file, &base)
}

fn missing(flag: &str, key: &str) -> String {
    format!("{flag} is required (on the command line, or as `{key} = …` in the --config file)")
}

pub fn merge(a: &RunArgs, file: FileConfig, base: &Path) -> Result<Settings, String> {
    let rel = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
    let runtime_dir = a
        .runtime_dir
        .clone()
        .or(file.runtime_dir.map(rel))
        .ok_or_else(|| missing("--runtime-dir", "runtime-dir"))?;
    let state_dir = a
        .state_dir
        .clone()
        .or(file.state_dir.map(rel))
        .ok_or_else(|| missing("--state-dir", "state-dir"))?;
    let listen = if !a.listen.is_empty() {
        a.listen.clone()
    } else {
        file.listen.unwrap_or_default()
    };
    // Under systemd socket activation the .socket unit may name them all.
    if listen.is_empty() && !crate::systemd::activation::is_activated() {
        return Err(missing("--listen", "listen"));
    }
    for l in &listen {
        crate::listen::parse_listen(l)?;
    }
    let deadline = match (a.deadline, &file.deadline) {
        (Some(d), _) => d,
        (None, Some(v)) => v.resolve("deadline")?,
        (None, None) => DEFAULT_DEADLINE,
    };
    let drain_grace = match (a.drain_grace, &file.drain_grace) {
        (Some(d), _) => d,
        (None, Some(v)) => v.resolve("drain-grace")?,
        (None, None) => DEFAULT_DRAIN_GRACE,
    };
    let abort_grace = match (a.abort_grace, &file.abort_grace) {
        (Some(d), _) => d,
        (None, Some(v)) => v.resolve("abort-grace")?,
        (None, None) => DEFAULT_ABORT_GRACE,
    };
    let metrics = match a.metrics.clone().or(file.metrics) {
        Some(s) => Some(s.parse::<SocketAddr>().map_err(|e| {
            format!("metrics address {s:?}: {e} (expected HOST:PORT, e.g. 127.0.0.1:9464)")
        })?),
        None => None,
    };
    let mode = match (a.notify.mode, file.mode.as_deref()) {
        (Some(m), _) => m,
        (None, Some("library")) => Mode::Library,
        (None, Some("notify")) => Mode::Notify,
        (None, Some(other)) => {
            return Err(format!(
                "mode = {other:?}: expected \"library\" or \"notify\""
            ))
        }
        (None, None) => Mode::Library,
    };
    let notify = NotifyArgs {
        mode: Some(mode),
        stop_signal: match (a.notify.stop_signal, file.stop_signal.as_deref()) {
            (Some(s), _) => Some(s),
            (None, Some(s)) => Some(parse_signal(s).map_err(|e| format!("stop-signal: {e}"))?),
            (None, None) => None,
        },
        ready_probe: match (&a.notify.ready_probe, file.ready_probe.as_deref()) {
            (Some(p), _) => Some(p.clone()),
            (None, Some(p)) => Some(p.parse().map_err(|e| format!("ready-probe: {e}"))?),
            (None, None) => None,
        },
        probe_only: a.notify.probe_only || file.probe_only.unwrap_or(false),
    };
    notify.check()?;
    let program = if !a.program.is_empty() {
        a.program.clone()
    } else {
        let mut p: Vec<OsString> = file
            .program
            .unwrap_or_default()
            .into_iter()
            .map(OsString::from)
            .collect();
        // A path with a slash is a file relative to the config; a bare
        // name is a command looked up on PATH, as on the command line.
        if let Some(first) = p.first_mut() {
            let path = PathBuf::from(&*first);
            if path.components().count() > 1 && !path.is_absolute() {
                *first = base.join(path).into_os_string();
            }
        }
        p
    };
    if program.is_empty() {
        return Err(missing("PROGRAM (after --)", "program"));
    }
    Ok(Settings {
        runtime_dir,
        state_dir,
        listen,
        deadline,
        drain_grace,
        abort_grace,
        metrics,
        notify,
        program,
    })
}

/// The effective settings as TOML, for `--check-config`: what runs is
/// what this prints, and it can be pasted back into a config file.
pub fn describe(s: &Settings) -> String {
    let q = |v: &str| toml_string(v);
    let mut out = String::new();
    out += &format!("runtime-dir = {}\n", q(&s.runtime_dir.to_string_lossy()));
    out += &format!("state-dir = {}\n", q(&s.state_dir.to_string_lossy()));
    let listen: Vec<String> = s.listen.iter().map(|l| q(l)).collect();
    out += &format!("listen = [{}]\n", listen.join(", "));
    out += &format!(
        "deadline = {}\n",
        q(&format!("{}ms", s.deadline.as_millis()))
    );
    out += &format!(
        "drain-grace = {}\n",
        q(&format!("{}ms", s.drain_grace.as_millis()))
    );
    out += &format!(
        "abort-grace = {}\n",
        q(&format!("{}ms", s.abort_grace.as_millis()))
    );
    if let Some(m) = s.metrics {
        out += &format!("metrics = {}\n", q(&m.to_string()));
    }
    if s.notify.mode() == Mode::Notify {
        out += "mode = \"notify\"\n";
    }
    if let Some(sig) = s.notify.stop_signal {
        out += &format!("stop-signal = {}\n", q(sig.as_str()));
    }
    if let Some(p) = &s.notify.ready_probe {
        out += &format!("ready-probe = {}\n", q(&p.to_string()));
    }
    if s.notify.probe_only {
        out += "probe-only = true\n";
    }
    let program: Vec<String> = s.program.iter().map(|p| q(&p.to_string_lossy())).collect();
    out += &format!("program = [{}]", program.join(", "));
    out
}

/// A TOML basic string: quotes, backslashes and control characters escaped.
fn toml_string(v: &str) -> String {
    let mut o = String::with_capacity(v.len() + 2);
    o.push('"');
    for c in v.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if c.is_control() => o.push_str(&format!("\\u{:04X}", c as u32)),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        run: RunArgs,
    }

    fn args(argv: &[&str]) -> RunArgs {
        let mut v = vec!["handoff-run"];
        v.extend_from_slice(argv);
        T::try_parse_from(v).map(|t| t.run).unwrap()
    }

    const FULL: &str = r#"
        runtime-dir = "run"
        state-dir = "/var/lib/kv"
        listen = ["http=tcp://127.0.0.1:0"]
        deadline = "2m"
        drain-grace = 30
        abort-grace = "2s"
        metrics = "127.0.0.1:9464"
        program = ["bin/kv", "--fast"]
    "#;

    #[test]
    fn file_alone_is_enough_and_paths_are_relative_to_it() {
        let s = merge(&args(&[]), parse(FULL).unwrap(), Path::new("/etc/kv")).unwrap();
        assert_eq!(s.runtime_dir, PathBuf::from("/etc/kv/run"));
        assert_eq!(s.state_dir, PathBuf::from("/var/lib/kv"));
        assert_eq!(s.deadline, Duration::from_secs(120));
        assert_eq!(s.drain_grace, Duration::from_secs(30));
        assert_eq!(s.abort_grace, Duration::from_secs(2));
        assert_eq!(s.metrics, Some("127.0.0.1:9464".parse().unwrap()));
        assert_eq!(
            s.program,
            vec![OsString::from("/etc/kv/bin/kv"), OsString::from("--fast")]
        );
    }

    #[test]
    fn flags_override_the_file() {
        let a = args(&[
            "--state-dir",
            "/tmp/s",
            "--deadline",
            "5s",
            "--listen",
            "x=unix:/tmp/x.sock",
            "--",
            "other",
        ]);
        let s = merge(&a, parse(FULL).unwrap(), Path::new("/etc/kv")).unwrap();
        assert_eq!(s.state_dir, PathBuf::from("/tmp/s"));
        assert_eq!(s.deadline, Duration::from_secs(5));
        assert_eq!(s.drain_grace, Duration::from_secs(30), "from the file");
        assert_eq!(s.listen, vec!["x=unix:/tmp/x.sock".to_string()]);
        assert_eq!(s.program, vec![OsString::from("other")], "bare name: PATH");
    }

    #[test]
    fn describe_round_trips_through_the_parser() {
        let mut s = merge(&args(&[]), parse(FULL).unwrap(), Path::new("/etc/kv")).unwrap();
        s.program.push(OsString::from("we\"ird\\arg\n"));
        let again = merge(&args(&[]), parse(&describe(&s)).unwrap(), Path::new("/x")).unwrap();
        assert_eq!(again, s);
    }

    #[test]
    fn notify_mode_keys_resolve_and_are_checked() {
        let base = "runtime-dir = \"/r\"\nstate-dir = \"/s\"\nlisten = [\"h=tcp://x:1\"]\nprogram = [\"p\"]\n";
        let f = |extra: &str| parse(&format!("{base}{extra}")).unwrap();
        let s = merge(
            &args(&[]),
            f("mode = \"notify\"\nstop-signal = \"quit\"\nready-probe = \"tcp://127.0.0.1:9\"\nprobe-only = true\n"),
            Path::new("."),
        )
        .unwrap();
        assert_eq!(s.notify.mode(), Mode::Notify);
        assert_eq!(
            s.notify.stop_signal,
            Some(nix::sys::signal::Signal::SIGQUIT)
        );
        assert_eq!(
            s.notify.ready_probe.as_ref().map(|p| p.to_string()),
            Some("tcp://127.0.0.1:9".into())
        );
        assert!(s.notify.probe_only);
        // Round trip through --check-config's output.
        let again = merge(&args(&[]), parse(&describe(&s)).unwrap(), Path::new(".")).unwrap();
        assert_eq!(again.notify, s.notify);
        // The flag wins over the file.
        let s = merge(
            &args(&["--mode", "library"]),
            f("mode = \"notify\"\n"),
            Path::new("."),
        )
        .unwrap();
        assert_eq!(s.notify.mode(), Mode::Library);
        let e = merge(&args(&[]), f("mode = \"systemd\"\n"), Path::new(".")).unwrap_err();
        assert!(e.contains("library") && e.contains("notify"), "{e}");
        let e = merge(&args(&[]), f("stop-signal = \"SIGTERM\"\n"), Path::new(".")).unwrap_err();
        assert!(e.contains("notify only"), "{e}");
        let e = merge(
            &args(&[]),
            f("mode = \"notify\"\nstop-signal = \"KILL\"\n"),
            Path::new("."),
        )
        .unwrap_err();
        assert!(e.starts_with("stop-signal:"), "{e}");
        let e = merge(
            &args(&[]),
            f("mode = \"notify\"\nprobe-only = true\n"),
            Path::new("."),
        )
        .unwrap_err();
        assert!(e.contains("needs --ready-probe"), "{e}");
        let e = merge(
            &args(&[]),
            f("mode = \"notify\"\nready-probe = \"ftp://x:1\"\n"),
            Path::new("."),
        )
        .unwrap_err();
        assert!(e.starts_with("ready-probe:"), "{e}");
    }

    #[test]
    fn defaults_apply_when_neither_says() {
        let a = args(&[
            "--runtime-dir",
            "/r",
            "--state-dir",
            "/s",
            "--listen",
            "h=tcp://127.0.0.1:0",
            "--",
            "p",
        ]);
        let s = merge(&a, FileConfig::default(), Path::new(".")).unwrap();
        assert_eq!(s.deadline, DEFAULT_DEADLINE);
        assert_eq!(s.drain_grace, DEFAULT_DRAIN_GRACE);
        assert_eq!(s.abort_grace, DEFAULT_ABORT_GRACE);
        assert_eq!(s.metrics, None);
    }

    #[test]
    fn missing_settings_name_flag_and_key() {
        let e = merge(&args(&[]), FileConfig::default(), Path::new(".")).unwrap_err();
        assert!(
            e.contains("--runtime-dir") && e.contains("runtime-dir ="),
            "{e}"
        );
        let e = merge(
            &args(&[
                "--runtime-dir",
                "/r",
                "--state-dir",
                "/s",
                "--listen",
                "h=tcp://x:1",
            ]),
            FileConfig::default(),
            Path::new("."),
        )
        .unwrap_err();
        assert!(e.contains("PROGRAM"), "{e}");
    }

    #[test]
    fn typos_and_bad_values_are_errors_with_a_location() {
        let e = parse("drain_grace = \"30s\"\n").unwrap_err();
        assert!(e.contains("drain_grace") && e.contains("line 1"), "{e}");
        let e = parse("listen = \"http=tcp://x:1\"\n").unwrap_err();
        assert!(e.contains("listen"), "{e}");
        let bad = parse("deadline = \"soon\"").unwrap();
        let e = merge(
            &args(&[
                "--runtime-dir",
                "/r",
                "--state-dir",
                "/s",
                "--listen",
                "h=tcp://x:1",
                "--",
                "p",
            ]),
            bad,
            Path::new("."),
        )
        .unwrap_err();
        assert!(e.starts_with("deadline:"), "{e}");
        let bad = parse("metrics = \"localhost\"").unwrap();
        let e = merge(
            &args(&[
                "--runtime-dir",
                "/r",
                "--state-dir",
                "/s",
                "--listen",
                "h=tcp://x:1",
                "--",
                "p",
            ]),
            bad,
            Path::new("."),
        )
        .unwrap_err();
        assert!(e.contains("metrics address"), "{e}");
        let bad = parse("listen = [\"nohost\"]").unwrap();
        let e = merge(
            &args(&["--runtime-dir", "/r", "--state-dir", "/s", "--", "p"]),
            bad,
            Path::new("."),
        )
        .unwrap_err();
        assert!(e.contains("NAME="), "{e}");
    }
}
