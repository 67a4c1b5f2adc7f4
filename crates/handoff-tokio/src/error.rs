//! What can go wrong, named by where: starting, taking a listener, serving,
//! or the handoff itself.

/// An error from a hook the service supplies (seal, resume, health …).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Errors of this crate. Each says what failed and, where the fix is on the
/// caller's side, what to do.
#[derive(thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// [`Builder::start`](crate::Builder::start) was called outside a tokio
    /// runtime.
    #[error("handoff-tokio needs a tokio runtime: call Builder::start from inside #[tokio::main] (or after Runtime::enter)")]
    NoRuntime,
    /// The environment the supervisor passes is missing or malformed.
    #[error("reading what the supervisor passed (run me under `handoff run --listen NAME=tcp://HOST:PORT -- <this program>`): {0}")]
    Boot(#[source] handoff::ProcessError),
    /// No listener of that name was passed, or it was taken already.
    #[error("no listener named {name:?} (passed and not yet taken: {left}); give it with `handoff run --listen {name}=tcp://127.0.0.1:8080 -- <this program>`")]
    NoListener {
        /// The name asked for.
        name: String,
        /// The names still available, comma-separated.
        left: String,
    },
    /// A passed listener could not be registered with tokio.
    #[error("listener {name:?}: {source}")]
    Listener {
        /// Its `--listen` name.
        name: String,
        /// What the kernel said.
        #[source]
        source: std::io::Error,
    },
    /// The SIGTERM handler could not be installed.
    #[error("installing the SIGTERM handler: {0}")]
    Signal(#[source] std::io::Error),
    /// The handoff protocol ended this process's turn with an error: a
    /// successor that was aborted, or a control socket that broke. The
    /// connections it had were finished first.
    #[error("handoff {phase}: {message}")]
    Handoff {
        /// Where in this process's life it happened.
        phase: &'static str,
        /// What the protocol said.
        message: String,
    },
}

/// Debug prints the message (each variant's message already includes its
/// cause), so `main() -> Result<(), Error>` tells an operator what failed
/// rather than printing a struct.
impl std::fmt::Debug for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self}")
    }
}
