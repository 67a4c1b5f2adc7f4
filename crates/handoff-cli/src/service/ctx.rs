//! What the manager backends (`systemd`, `launchd`) share with the
//! `handoff service` command that drives them: the service acted on, what
//! `install` writes, and where per-user files go. Below both, so a backend
//! does not depend on the command's module.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::ValueEnum;

use super::runner::Runner;

/// System-wide or per-user service.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// systemd `--user` / launchd `gui/<uid>` (a LaunchAgent).
    User,
    /// The system manager / launchd `system` domain (a LaunchDaemon).
    System,
}

/// Bounds on launchd's asynchronous unload (ignored for systemd).
#[derive(clap::Args, Debug, Clone, Copy)]
pub(super) struct LaunchdBounds {
    /// launchd: how long to wait after `bootout` until `launchctl print` no
    /// longer finds the job.
    #[arg(long, value_parser = crate::duration::parse, value_name = "DURATION", default_value = "10s")]
    pub(super) wait_timeout: Duration,
    /// launchd: how many times to try `bootstrap` while it fails with the
    /// transient "5: Input/output error" (backoff 100 ms, doubling, at most 1 s).
    #[arg(long, value_name = "N", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub(super) bootstrap_attempts: u32,
}

/// Everything a manager backend needs about the service it acts on.
pub struct Ctx<'a> {
    pub name: String,
    pub scope: Scope,
    /// The directory holding the unit/plist.
    pub dir: PathBuf,
    pub runner: &'a dyn Runner,
}

/// What `install` writes into the unit/plist.
pub struct Spec {
    /// Absolute path of the `handoff` binary.
    pub handoff: PathBuf,
    /// The arguments after `handoff run`.
    pub run_args: Vec<String>,
    /// The runtime dir they resolve to (for `handoff upgrade`).
    pub runtime_dir: PathBuf,
    /// The drain grace they resolve to (bounds a stop).
    pub drain_grace: Duration,
    /// The upgrade deadline they resolve to (bounds a reload).
    pub deadline: Duration,
}

/// `$HOME`, for the per-user default directories.
pub fn home() -> Result<PathBuf> {
    match std::env::var_os("HOME") {
        Some(h) if !h.is_empty() => Ok(PathBuf::from(h)),
        _ => bail!("HOME is not set: pass the directory explicitly with --dir"),
    }
}
