//! Command-line arguments more than one command reads: `handoff run`'s
//! (which the config file merges with and `handoff service` writes out) and
//! the runtime directory the admin clients share. Below every command, so
//! none of them depends on another's module for its arguments.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

/// Options both commands share.
#[derive(clap::Args, Debug, Clone)]
pub struct RuntimeDir {
    /// Directory for the admin and control sockets (created mode 0700).
    #[arg(long, value_name = "DIR")]
    pub runtime_dir: PathBuf,
}

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Read settings from a TOML file (keys spelt like these flags:
    /// `runtime-dir`, `state-dir`, `listen`, `deadline`, `drain-grace`,
    /// `abort-grace`, `metrics`, `mode`, `stop-signal`, `ready-probe`, `probe-only`,
    /// `program`); a flag given here overrides the file.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Directory for the admin and control sockets (created mode 0700; an
    /// existing one must be ours and not writable by others).
    #[arg(long, value_name = "DIR")]
    pub runtime_dir: Option<PathBuf>,
    /// Directory for the service's state: the state lock and the journal
    /// (created mode 0700; an existing one must be ours and not writable
    /// by others).
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// A listener to bind and pass to the service, as NAME=tcp://HOST:PORT
    /// (port 0 picks a free port; the bound address is printed) or
    /// NAME=unix:PATH. Repeat for several; they are passed in this order.
    /// Started by a systemd .socket unit (LISTEN_FDS, LISTEN_PID = ours), a
    /// NAME the unit passed (FileDescriptorName=) takes that socket instead
    /// of binding, and with no --listen every passed socket is taken under
    /// its name (docs/systemd/README.md).
    #[arg(long = "listen", value_name = "NAME=ADDR")]
    pub listen: Vec<String>,
    /// Default overall budget of each upgrade, start to Ready [default: 5m].
    #[arg(long, value_parser = crate::duration::parse, value_name = "DURATION")]
    pub deadline: Option<Duration>,
    /// Default budget for the old process to drain [default: 60s].
    #[arg(long, value_parser = crate::duration::parse, value_name = "DURATION")]
    pub drain_grace: Option<Duration>,
    /// How long a new process whose upgrade failed gets to finish what it
    /// accepted and exit before SIGKILL (a stateless service may accept
    /// before the handoff commits). Library mode: after Abort, unless it
    /// hung (then at once). Notify mode: after --stop-signal [default: 5s].
    #[arg(long, value_parser = crate::duration::parse, value_name = "DURATION")]
    pub abort_grace: Option<Duration>,
    /// Serve Prometheus metrics (handoffs by outcome, per-phase duration
    /// histograms, crash restarts) at http://ADDR/metrics.
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics: Option<String>,
    /// Check the settings (file and flags merged), print them and exit.
    #[arg(long)]
    pub check_config: bool,
    #[command(flatten)]
    pub notify: crate::notify_mode::NotifyArgs,
    /// The service and its arguments.
    #[arg(last = true, value_name = "PROGRAM [ARGS]...")]
    pub program: Vec<OsString>,
}
