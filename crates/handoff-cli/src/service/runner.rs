//! The one seam through which `handoff service` talks to a service manager.
//!
//! Every `systemctl` and `launchctl` call goes through [`Runner::run`]: the
//! program is looked up on `PATH` (so the tests put fake managers first on
//! `PATH` and drive the real binary), run with stdin closed, and its exit
//! status and output captured whole. Callers never see a half-checked call:
//! they either inspect [`CmdOutput::code`] for the statuses they expect (a
//! launchd "not found", the transient bootstrap error 5) or turn any failure
//! into an error with [`CmdOutput::check`], which names the command line and
//! quotes what the manager printed.

use std::env;
use std::ffi::OsStr;
use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

/// What one manager call did.
#[derive(Debug, Clone)]
pub struct CmdOutput {
    /// The command line as run, for messages (`launchctl bootstrap gui/501 …`).
    pub line: String,
    /// The exit status; `None` when the process was killed by a signal.
    pub code: Option<i32>,
    /// The signal that killed it, if one did.
    pub signal: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl CmdOutput {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// stdout and stderr together, trimmed, for error messages.
    pub fn output(&self) -> String {
        let (o, e) = (self.stdout.trim(), self.stderr.trim());
        match (o.is_empty(), e.is_empty()) {
            (true, true) => "(no output)".into(),
            (false, true) => o.into(),
            (true, false) => e.into(),
            (false, false) => format!("{o}\n{e}"),
        }
    }

    /// `Ok(self)` if the command exited 0, otherwise an error naming the
    /// command line, its exit status and its output.
    pub fn check(self) -> Result<CmdOutput> {
        if self.success() {
            Ok(self)
        } else {
            bail!("{}", self.failure())
        }
    }

    /// A one-paragraph description of a failed call.
    pub fn failure(&self) -> String {
        format!(
            "`{}` failed ({self}):\n{}",
            self.line,
            indent(&self.output())
        )
    }
}

impl fmt::Display for CmdOutput {
    /// The outcome: `exit status 5`, `killed by signal 9`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.code, self.signal) {
            (Some(c), _) => write!(f, "exit status {c}"),
            (None, Some(s)) => write!(f, "killed by signal {s}"),
            (None, None) => write!(f, "unknown exit status"),
        }
    }
}

fn indent(s: &str) -> String {
    s.lines()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Runs manager commands. A trait so the call-sequence logic can also be
/// unit-tested against a scripted runner; the binary uses [`PathRunner`].
pub trait Runner {
    fn run(&self, program: &str, args: &[String]) -> Result<CmdOutput>;
}

/// The real runner: resolves the program on `PATH`, runs it, captures all.
pub struct PathRunner;

impl Runner for PathRunner {
    fn run(&self, program: &str, args: &[String]) -> Result<CmdOutput> {
        let path = find_on_path(program, env::var_os("PATH").as_deref())?;
        let line = std::iter::once(program.to_string())
            .chain(args.iter().cloned())
            .collect::<Vec<_>>()
            .join(" ");
        tracing::debug!(target: "handoff::service", command = %line, "running");
        let out = Command::new(&path)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("starting `{line}` ({})", path.display()))?;
        let r = CmdOutput {
            line,
            code: out.status.code(),
            signal: out.status.signal(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        };
        tracing::debug!(target: "handoff::service", command = %r.line, status = %r, "ran");
        Ok(r)
    }
}

/// The first executable file named `program` in the `PATH` list.
fn find_on_path(program: &str, path: Option<&OsStr>) -> Result<PathBuf> {
    let path = path.unwrap_or_default();
    for dir in env::split_paths(path) {
        // An empty entry means the current directory, as in the shell.
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".").to_path_buf()
        } else {
            dir
        };
        let cand = dir.join(program);
        if let Ok(m) = cand.metadata() {
            if m.is_file() && m.permissions().mode() & 0o111 != 0 {
                return Ok(cand);
            }
        }
    }
    bail!(
        "`{program}` was not found on PATH ({}); is this the right service manager? \
         choose another with --manager",
        path.to_string_lossy()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_first_executable_on_path() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        // Not executable in a: skipped.
        std::fs::write(a.join("tool"), "").unwrap();
        std::fs::write(b.join("tool"), "").unwrap();
        std::fs::set_permissions(b.join("tool"), std::fs::Permissions::from_mode(0o755)).unwrap();
        let p = env::join_paths([&a, &b]).unwrap();
        assert_eq!(find_on_path("tool", Some(&p)).unwrap(), b.join("tool"));
        let e = find_on_path("nope", Some(&p)).unwrap_err().to_string();
        assert!(e.contains("`nope` was not found on PATH"), "{e}");
    }

    #[test]
    fn failure_names_the_command_and_its_output() {
        let o = CmdOutput {
            line: "launchctl bootstrap system /x.plist".into(),
            code: Some(5),
            signal: None,
            stdout: String::new(),
            stderr: "Bootstrap failed: 5: Input/output error\n".into(),
        };
        let e = o.check().unwrap_err().to_string();
        assert!(
            e.contains("`launchctl bootstrap system /x.plist` failed (exit status 5)")
                && e.contains("Bootstrap failed: 5: Input/output error"),
            "{e}"
        );
    }
}
