//! `handoff`: run a network service and upgrade it without dropping a
//! connection.
//!
//! A thin CLI over the `handoff` library: `run` is the supervisor, `upgrade`
//! asks a running supervisor for one handoff over its admin socket, `status`
//! asks it what runs (and the service's live counters), `demo` shows them at
//! work under load.

/// Every `eprintln!` in this binary, as one `write(2)` per line.
///
/// std's `eprintln!` writes the formatted pieces one by one to unbuffered
/// stderr, and the supervisor's stderr is usually the very pipe or file its
/// service processes write to as well (they inherit it): their lines then
/// land *inside* ours ("…committed: pid <a service's line> 1234"), which
/// breaks anyone parsing the log. A single write of a line shorter than
/// `PIPE_BUF` (4096 bytes) is never interleaved with another process's.
/// Defined before the modules so that it shadows std's in all of them.
macro_rules! eprintln {
    ($($arg:tt)*) => {{
        let mut line = format!($($arg)*);
        line.push('\n');
        let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes());
    }};
}

mod args;
mod config;
mod demo;
mod duration;
mod exe;
mod keeper;
mod listen;
mod metrics;
mod notify_mode;
mod progress;
mod reexec;
mod restart;
mod run;
mod service;
mod status;
mod stop;
mod supervise;
mod systemd;
mod upgrade;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "handoff",
    version,
    about = "Run a network service and upgrade it with zero downtime",
    long_about = "Run a network service and upgrade it with zero downtime.\n\n\
The supervisor (`handoff run`) binds the listening sockets once and keeps them for the \
service's whole life; each upgrade spawns the new build with those sockets (systemd's \
LISTEN_FDS convention), lets the old process drain and seal its state, and commits only \
when the new one reports Ready. Connections that arrive meanwhile wait in the kernel's \
accept queue: none is refused.",
    after_help = "EXAMPLES:\n  \
handoff demo                                           # watch it: upgrades under load, then a summary\n\n  \
handoff run --runtime-dir /run/kv --state-dir /var/lib/kv \\\n      --listen http=tcp://127.0.0.1:8080 -- handoff-demo &\n  \
cp new-build/handoff-demo /usr/local/bin/handoff-demo   # replace the file on disk\n  \
handoff upgrade --runtime-dir /run/kv                  # prints each phase; exit 0 = committed"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Bind the listeners, start PROGRAM and serve upgrade requests (foreground).
    #[command(after_help = run::AFTER_HELP)]
    Run(args::RunArgs),
    /// Ask a running supervisor to replace the service with a fresh process.
    #[command(after_help = upgrade::AFTER_HELP)]
    Upgrade(upgrade::UpgradeArgs),
    /// Show what a running supervisor runs, its handoffs, and the service's live counters.
    #[command(after_help = status::JSON_FIELDS)]
    Status(status::StatusArgs),
    /// Drain and stop the service, then the supervisor (exit 0 = drained in time).
    #[command(after_help = stop::AFTER_HELP)]
    Stop(stop::StopArgs),
    #[command(about = demo::ABOUT, long_about = demo::LONG_ABOUT, after_long_help = demo::AFTER_HELP)]
    Demo(demo::DemoArgs),
    #[command(about = service::ABOUT)]
    Service(service::ServiceArgs),
    /// For a running supervisor about to `exec` this binary in place
    /// (`handoff upgrade --supervisor`): prints the handover it speaks and
    /// its build.
    #[command(name = "reexec-check", hide = true)]
    ReexecCheck,
}

/// The supervisor's structured log on stderr (the service manager's
/// journal). `HANDOFF_LOG` takes an EnvFilter directive (`debug`,
/// `handoff::phase=info,warn`, …); the default shows every handoff phase
/// with its id and duration. Targets are listed in docs/observability.md.
fn init_tracing() {
    let default = || tracing_subscriber::EnvFilter::new("handoff=info,warn");
    let filter = match std::env::var("HANDOFF_LOG") {
        Ok(v) => tracing_subscriber::EnvFilter::try_new(&v).unwrap_or_else(|e| {
            eprintln!("handoff: ignoring HANDOFF_LOG={v:?} ({e}); using the default filter");
            default()
        }),
        Err(_) => default(),
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(a) => {
            init_tracing();
            run::main(a)
        }
        Command::Upgrade(a) => upgrade::main(a),
        Command::Status(a) => status::main(a),
        Command::Stop(a) => stop::main(a),
        Command::Demo(a) => demo::main(a),
        Command::Service(a) => service::main(a),
        Command::ReexecCheck => reexec::check_main(),
    }
}
