//! `handoff service`: install, restart, inspect and remove `handoff run` as
//! a systemd unit or a launchd job.
//!
//! The generated unit/plist lets the service manager supervise the
//! *supervisor*: it starts `handoff run` at boot, restarts it if it crashes,
//! and (systemd) maps `systemctl reload` to a zero-downtime `handoff
//! upgrade`. Both are written so that a supervisor crash does not take the
//! service down with it: the manager must not kill the supervisor's children
//! when the supervisor exits, because the restarted supervisor re-attaches to
//! the incumbent that is still serving (see `supervise::recover`).
//!
//! launchd's restart is racy if done naively (`bootout` returns before the
//! job is gone, and a `bootstrap` in that window fails with "5: Input/output
//! error"); `launchd.rs` explains how it is sequenced.
//!
//! Every manager call goes through [`runner::Runner`], the seam the tests use
//! to substitute fake `systemctl`/`launchctl` programs.

mod ctx;
mod files;
mod launchd;
mod runner;
mod systemd;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};

pub use ctx::Scope;
use ctx::{Ctx, LaunchdBounds, Spec};
use runner::{PathRunner, Runner};

pub const ABOUT: &str = "Install and manage `handoff run` as a systemd unit or launchd job";

const AFTER_HELP: &str = "EXAMPLES:\n  \
handoff service install kv -- --runtime-dir /run/kv --state-dir /var/lib/kv \\\n      \
--listen http=tcp://0.0.0.0:8080 -- /usr/local/bin/handoff-demo\n  \
handoff service restart kv --reload     # zero-downtime upgrade of the service (systemd)\n  \
handoff service restart kv --supervisor # a new handoff binary for the supervisor, in place\n  \
handoff service restart kv              # restart the supervisor too (applies a changed unit)\n  \
handoff service status kv\n  \
handoff service uninstall kv\n\n\
The manager defaults to launchd on macOS and systemd elsewhere (--manager); the scope to \
`system` when run as root and `user` otherwise (--scope).";

#[derive(clap::Args, Debug)]
#[command(after_help = AFTER_HELP)]
pub struct ServiceArgs {
    #[command(subcommand)]
    command: ServiceCommand,
}

#[derive(Subcommand, Debug)]
enum ServiceCommand {
    /// Write the unit/plist for `handoff run ARGS…`, then enable and start it.
    #[command(after_help = INSTALL_HELP)]
    Install(InstallArgs),
    /// Stop the service, disable it and remove its unit/plist.
    Uninstall(UninstallArgs),
    /// Restart the supervisor (and its service), or with --reload only upgrade the service.
    #[command(after_help = RESTART_HELP)]
    Restart(RestartArgs),
    /// Show the service manager's view of the service (exit 3: installed but not running).
    Status(StatusArgs),
}

const INSTALL_HELP: &str = "Everything after `--` is passed to `handoff run` as is, and is checked \
as `handoff run` would check it before anything is written. --runtime-dir and --state-dir must be \
absolute (a service starts in /). systemd gets Type=notify, ExecReload=`handoff upgrade`, \
Restart=on-failure and KillMode=process; launchd gets KeepAlive, RunAtLoad and \
AbandonProcessGroup. Re-running install with the same arguments changes nothing; with different \
ones it rewrites the file (atomically) and tells you to restart.\n\n\
EXAMPLES:\n  \
handoff service install kv -- --runtime-dir /run/kv --state-dir /var/lib/kv \\\n      \
--listen http=tcp://0.0.0.0:8080 -- /usr/local/bin/handoff-demo\n  \
handoff service install --manager launchd --scope user com.example.kv -- \\\n      \
--runtime-dir /tmp/kv --state-dir /Users/me/kv --listen http=tcp://127.0.0.1:8080 -- /usr/local/bin/kv";

const RESTART_HELP: &str = "Which one do you want?\n  \
--reload   systemd: `systemctl reload NAME`, which runs the unit's ExecReload, `handoff upgrade`: \
the supervisor stays, the service is replaced by a fresh process with zero downtime, and the \
command fails if the upgrade aborts. Use it to deploy a new build of the service.\n  \
(default)  the supervisor itself is restarted. systemd: `systemctl restart NAME`, a SIGTERM to \
the supervisor, which drains and stops the service, then a fresh start (not zero-downtime). \
launchd: `launchctl kickstart -k`, which kills the running job and starts it again. Use it after \
changing the unit/plist.\n  \
--supervisor  a new handoff binary for the supervisor, with zero downtime: the running \
supervisor execs the binary the unit/job names (replace that file first), keeping its pid, \
listeners and service process; `handoff upgrade --supervisor` on the unit's runtime dir. It \
falls back to the old binary if the new one cannot take over.\n\n\
launchd: when the plist on disk is what was last loaded, `kickstart -k` restarts the job; \
otherwise the job is booted out, waited for until `launchctl print` no longer finds it \
(--wait-timeout), and bootstrapped again, retrying launchd's transient \
\"5: Input/output error\" (--bootstrap-attempts).";

/// Which service manager.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Manager {
    Systemd,
    Launchd,
}

impl Manager {
    fn platform_default() -> Manager {
        if cfg!(target_os = "macos") {
            Manager::Launchd
        } else {
            Manager::Systemd
        }
    }
}

/// Which service, under which manager.
#[derive(clap::Args, Debug, Clone)]
struct Target {
    /// The systemd unit name (without `.service`) or the launchd label.
    #[arg(value_name = "NAME")]
    name: String,
    /// The service manager [default: launchd on macOS, systemd elsewhere].
    #[arg(long, value_enum)]
    manager: Option<Manager>,
    /// `user` or `system` [default: system when run as root, user otherwise].
    #[arg(long, value_enum)]
    scope: Option<Scope>,
    /// Where the unit/plist lives, instead of the manager's standard
    /// directory for the scope (/etc/systemd/system, ~/.config/systemd/user,
    /// /Library/LaunchDaemons, ~/Library/LaunchAgents).
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
struct InstallArgs {
    #[command(flatten)]
    target: Target,
    #[command(flatten)]
    bounds: LaunchdBounds,
    /// The `handoff` binary the unit runs [default: this one].
    #[arg(long, value_name = "PATH")]
    handoff_path: Option<PathBuf>,
    /// launchd: directory for the job's stdout/stderr logs
    /// [default: /var/log (system), ~/Library/Logs (user)].
    #[arg(long, value_name = "DIR")]
    log_dir: Option<PathBuf>,
    /// The `handoff run` options, then `--` and the service's program and arguments.
    #[arg(last = true, required = true, value_name = "RUN ARGS")]
    run: Vec<OsString>,
}

#[derive(clap::Args, Debug)]
struct UninstallArgs {
    #[command(flatten)]
    target: Target,
    #[command(flatten)]
    bounds: LaunchdBounds,
}

#[derive(clap::Args, Debug)]
struct RestartArgs {
    #[command(flatten)]
    target: Target,
    #[command(flatten)]
    bounds: LaunchdBounds,
    /// systemd: `systemctl reload`, i.e. a zero-downtime `handoff upgrade`
    /// of the service, instead of restarting the supervisor.
    #[arg(long)]
    reload: bool,
    /// Upgrade the supervisor in place instead of restarting it —
    /// `handoff upgrade --supervisor` on the runtime dir of the unit
    /// (systemd: its ExecReload= line) or job (launchd: its
    /// ProgramArguments): the running supervisor execs the `handoff` binary
    /// the unit or job runs (replace that file first); same pid, so no
    /// service-manager restart, and the service untouched.
    #[arg(long, conflicts_with = "reload")]
    supervisor: bool,
}

#[derive(clap::Args, Debug)]
struct StatusArgs {
    #[command(flatten)]
    target: Target,
}

pub fn main(a: ServiceArgs) -> ExitCode {
    let runner = PathRunner;
    match dispatch(a, &runner) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("handoff service: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn dispatch(a: ServiceArgs, runner: &dyn Runner) -> Result<ExitCode> {
    match a.command {
        ServiceCommand::Install(i) => {
            let (mgr, ctx) = context(&i.target, runner)?;
            let spec = spec(&i)?;
            match mgr {
                Manager::Systemd => systemd::install(&ctx, &spec)?,
                Manager::Launchd => {
                    let logs = match &i.log_dir {
                        Some(d) => absolute(d, "--log-dir")?,
                        None => launchd::default_log_dir(ctx.scope)?,
                    };
                    launchd::install(&ctx, &spec, &logs, i.bounds)?
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        ServiceCommand::Uninstall(u) => {
            let (mgr, ctx) = context(&u.target, runner)?;
            match mgr {
                Manager::Systemd => systemd::uninstall(&ctx)?,
                Manager::Launchd => launchd::uninstall(&ctx, u.bounds)?,
            }
            Ok(ExitCode::SUCCESS)
        }
        ServiceCommand::Restart(r) => {
            let (mgr, ctx) = context(&r.target, runner)?;
            if r.supervisor {
                let runtime_dir = match mgr {
                    Manager::Systemd => systemd::runtime_dir_of(&ctx)?,
                    Manager::Launchd => runtime_dir_of_run_args(launchd::run_args_of(&ctx)?)?,
                };
                return Ok(crate::upgrade::main(crate::upgrade::UpgradeArgs {
                    rt: crate::args::RuntimeDir { runtime_dir },
                    binary: None,
                    deadline: None,
                    drain_grace: None,
                    wait: None,
                    prepare: false,
                    discard_prepared: false,
                    supervisor: true,
                    json: false,
                }));
            }
            match mgr {
                Manager::Systemd => systemd::restart(&ctx, r.reload)?,
                Manager::Launchd if r.reload => bail!(
                    "--reload: launchd has no reload action; upgrade the service directly with \
                     `handoff upgrade --runtime-dir DIR` (the supervisor keeps running)"
                ),
                Manager::Launchd => launchd::restart(&ctx, r.bounds)?,
            }
            Ok(ExitCode::SUCCESS)
        }
        ServiceCommand::Status(s) => {
            let (mgr, ctx) = context(&s.target, runner)?;
            let running = match mgr {
                Manager::Systemd => systemd::status(&ctx)?,
                Manager::Launchd => launchd::status(&ctx)?,
            };
            Ok(if running {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(3)
            })
        }
    }
}

/// The runtime dir a `handoff run` with these arguments uses, resolved as
/// `handoff run` resolves it (`--runtime-dir`, else `--config`'s, else the
/// default).
fn runtime_dir_of_run_args(run_args: Vec<String>) -> Result<PathBuf> {
    let argv = std::iter::once("handoff run".to_string()).chain(run_args);
    let parsed = RunOnly::try_parse_from(argv)
        .map_err(|e| anyhow::anyhow!("the job's `handoff run` arguments:\n{}", e.render()))?
        .run;
    Ok(crate::config::resolve(&parsed)
        .map_err(|e| anyhow::anyhow!("the job's `handoff run` arguments: {e}"))?
        .runtime_dir)
}

fn context<'a>(t: &Target, runner: &'a dyn Runner) -> Result<(Manager, Ctx<'a>)> {
    let mgr = t.manager.unwrap_or_else(Manager::platform_default);
    let name = t.name.strip_suffix(".service").unwrap_or(&t.name);
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
    {
        bail!(
            "service name {:?}: use letters, digits, '.', '_' and '-' only \
             (e.g. `kv` for systemd, `com.example.kv` for launchd)",
            t.name
        );
    }
    let scope = t.scope.unwrap_or(if nix::unistd::geteuid().is_root() {
        Scope::System
    } else {
        Scope::User
    });
    let dir = match &t.dir {
        Some(d) => absolute(d, "--dir")?,
        None => match mgr {
            Manager::Systemd => systemd::default_dir(scope)?,
            Manager::Launchd => launchd::default_dir(scope)?,
        },
    };
    Ok((
        mgr,
        Ctx {
            name: name.to_string(),
            scope,
            dir,
            runner,
        },
    ))
}

fn absolute(p: &Path, what: &str) -> Result<PathBuf> {
    std::path::absolute(p).with_context(|| format!("{what} {}", p.display()))
}

/// For reading the `handoff run` arguments exactly as `handoff run` will.
#[derive(Parser, Debug)]
#[command(name = "handoff run")]
struct RunOnly {
    #[command(flatten)]
    run: crate::args::RunArgs,
}

/// Checks the embedded `handoff run` arguments (and the config file they
/// name) as `handoff run` will, and works out what the unit needs from them.
/// The unit embeds the arguments as given, not the resolved settings, so a
/// config file is still read at each start.
fn spec(i: &InstallArgs) -> Result<Spec> {
    let mut run_args = Vec::with_capacity(i.run.len());
    for a in &i.run {
        match a.to_str() {
            Some(s) if !s.chars().any(|c| c.is_control()) => run_args.push(s.to_string()),
            _ => bail!(
                "run argument {a:?}: unit files and plists hold text; \
                 use arguments that are valid UTF-8 without control characters"
            ),
        }
    }
    let argv = std::iter::once("handoff run".to_string()).chain(run_args.iter().cloned());
    let parsed = match RunOnly::try_parse_from(argv) {
        Ok(p) => p.run,
        Err(e) => bail!(
            "the `handoff run` arguments after `--` are not valid:\n{}",
            e.render()
        ),
    };
    if let Some(c) = &parsed.config {
        if !c.is_absolute() {
            bail!(
                "--config {} must be an absolute path: a service starts in /, not here",
                c.display()
            );
        }
    }
    let settings = crate::config::resolve(&parsed)
        .map_err(|e| anyhow::anyhow!("the `handoff run` arguments after `--`: {e}"))?;
    for (opt, dir) in [
        ("--runtime-dir", &settings.runtime_dir),
        ("--state-dir", &settings.state_dir),
    ] {
        if !dir.is_absolute() {
            bail!(
                "{opt} {} must be an absolute path: a service starts in /, not here",
                dir.display()
            );
        }
    }
    if let Some(prog) = settings.program.first() {
        if !Path::new(prog).is_absolute() {
            eprintln!(
                "note: PROGRAM {prog:?} is not an absolute path: it will be looked up on the \
                 service manager's PATH (systemd: /usr/local/bin:/usr/bin:…; launchd: \
                 /usr/bin:/bin:/usr/sbin:/sbin), not on yours"
            );
        }
    }
    let handoff = match &i.handoff_path {
        Some(p) if p.is_absolute() => p.clone(),
        Some(p) => bail!("--handoff-path {} must be absolute", p.display()),
        None => std::env::current_exe().context("finding the path of this handoff binary")?,
    };
    if handoff.to_str().is_none() {
        bail!("the handoff binary's path {:?} is not valid UTF-8", handoff);
    }
    Ok(Spec {
        handoff,
        run_args,
        runtime_dir: settings.runtime_dir,
        drain_grace: settings.drain_grace,
        deadline: settings.deadline,
    })
}
