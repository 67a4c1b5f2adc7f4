//! Socket activation intake: `handoff run` started by a systemd `.socket`
//! unit takes its listeners from `LISTEN_FDS` instead of binding them.
//!
//! The passed sockets count as ours only when `LISTEN_PID` is our own pid
//! (systemd sets it to the pid it execs; a variable inherited from further
//! up belongs to someone else, and then fds 3… are not what it says). In
//! that case every `LISTEN_*` variable is removed from our environment and
//! the fds are made close-on-exec, so neither leaks into anything we start:
//! services get the sockets again through our own, fresh `LISTEN_*`.
//!
//! How passed sockets meet `--listen` (names are `LISTEN_FDNAMES`, set with
//! `FileDescriptorName=` in the `.socket` unit):
//! - **No `--listen`**: every passed socket is a listener, in the order
//!   systemd passed them, under its name. The `.socket` unit is the one
//!   place addresses are written down.
//! - **With `--listen`**: a `--listen NAME=ADDR` whose NAME was passed uses
//!   that socket instead of binding ADDR (which must then agree with the
//!   socket: same family, and the same address when ADDR names one
//!   exactly); the others are bound as usual. A passed socket that no
//!   `--listen` names is an error — systemd would queue connections on it
//!   that nobody ever accepts.
//!
//! Only listening stream sockets (`ListenStream=`, `Accept=no`) can be
//! handed to a service this way; anything else is refused by name.

use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd};

use anyhow::{bail, Context, Result};
use handoff::listeners::{self, ListenFdsError};
use handoff::Listener;
use nix::sys::socket::{getsockopt, sockopt};

use crate::listen::ListenSpec;
use crate::supervise;

const VARS: [&str; 3] = ["LISTEN_FDS", "LISTEN_FDNAMES", "LISTEN_PID"];

/// Listening sockets systemd passed to this process.
#[derive(Debug)]
pub struct Activation {
    listeners: Vec<Listener>,
}

/// Whether systemd passed this process sockets (`LISTEN_FDS` set, non-zero,
/// and `LISTEN_PID` is ours), without taking them: lets the settings check
/// accept a missing `--listen`.
pub fn is_activated() -> bool {
    let ours = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.trim().parse::<u32>().ok())
        == Some(std::process::id());
    let some = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.trim().parse::<usize>().ok())
        .is_some_and(|n| n > 0);
    ours && some
}

/// Takes the sockets systemd passed us, if any, and removes `LISTEN_*` from
/// the environment either way. Must run before any thread exists.
pub fn take() -> Result<Option<Activation>> {
    let taken = match std::env::var("LISTEN_FDS") {
        Err(_) => Ok(None),
        Ok(n) if is_activated() => take_ours(&n),
        Ok(n) => not_ours(&n),
    };
    for v in VARS {
        std::env::remove_var(v);
    }
    taken
}

/// `LISTEN_FDS` is set but [`is_activated`] says no: either the variables
/// are someone else's (ignored, with a line saying so) or they are ours and
/// malformed (an error: systemd would never send that).
fn not_ours(count: &str) -> Result<Option<Activation>> {
    let pid = std::env::var("LISTEN_PID").ok();
    let ours =
        pid.as_deref().and_then(|p| p.trim().parse::<u32>().ok()) == Some(std::process::id());
    if !ours {
        eprintln!(
            "handoff run: ignoring LISTEN_FDS={count}: LISTEN_PID={} is not this process \
             (pid {}), so the sockets were meant for another one; binding the --listen \
             addresses instead",
            pid.as_deref().unwrap_or("(unset)"),
            std::process::id()
        );
        return Ok(None);
    }
    match count.trim().parse::<usize>() {
        Ok(0) => Ok(None),
        _ => bail!("socket activation: LISTEN_FDS={count:?} is not a number of sockets"),
    }
}

fn take_ours(count: &str) -> Result<Option<Activation>> {
    let what = || {
        format!(
            "socket activation (LISTEN_FDS={count}, LISTEN_FDNAMES={})",
            std::env::var("LISTEN_FDNAMES").unwrap_or_else(|_| "(unset)".into())
        )
    };
    let listeners = listeners::take_from_env()
        .map_err(|e: ListenFdsError| anyhow::Error::new(e))
        .with_context(what)?;
    if listeners.is_empty() {
        return Ok(None);
    }
    for l in &listeners {
        check_listening(l).with_context(what)?;
    }
    Ok(Some(Activation { listeners }))
}

/// A passed fd must be a listening stream socket with a usable name.
fn check_listening(l: &Listener) -> Result<()> {
    let fd = l.fd.as_raw_fd();
    let is_stream = getsockopt(&l.fd.as_fd(), sockopt::SockType).ok()
        == Some(nix::sys::socket::SockType::Stream);
    let listening = getsockopt(&l.fd.as_fd(), sockopt::AcceptConn).unwrap_or(false);
    if !(is_stream && listening) {
        bail!(
            "fd {fd} (named {:?}) is not a listening stream socket; handoff hands services \
             only ListenStream= sockets with Accept=no: fix the .socket unit",
            l.name
        );
    }
    if !valid_name(&l.name) {
        bail!(
            "fd {fd} is named {:?}, which cannot be a listener name (non-empty printable \
             ASCII without ':'); set FileDescriptorName= in the .socket unit",
            l.name
        );
    }
    Ok(())
}

fn valid_name(n: &str) -> bool {
    !n.is_empty() && !n.contains(':') && n.chars().all(|c| c.is_ascii_graphic())
}

/// Where one listener comes from.
#[derive(Debug)]
pub enum Source {
    /// Passed by systemd.
    Passed(Listener),
    /// To be bound from `--listen`.
    Bind(ListenSpec),
}

impl Source {
    pub fn name(&self) -> &str {
        match self {
            Source::Passed(l) => &l.name,
            Source::Bind(s) => s.name(),
        }
    }

    /// The listener and its address as shown (`tcp://…`, `unix:…`);
    /// `bind` binds a `--listen` spec.
    pub fn open(
        self,
        bind: impl FnOnce(&ListenSpec) -> Result<(Listener, String)>,
    ) -> Result<(Listener, String)> {
        match self {
            Source::Passed(l) => {
                let shown = supervise::describe(&l);
                eprintln!(
                    "handoff run: {}={shown} comes from systemd (fd {})",
                    l.name,
                    l.fd.as_raw_fd()
                );
                Ok((l, shown))
            }
            Source::Bind(spec) => bind(&spec),
        }
    }
}

/// Matches `--listen` specs with passed sockets (see the module docs).
pub fn plan(specs: Vec<ListenSpec>, act: Option<Activation>) -> Result<Vec<Source>> {
    let Some(act) = act else {
        if specs.is_empty() {
            bail!("no listeners: give --listen NAME=ADDR (or start under a systemd .socket unit)");
        }
        return Ok(specs.into_iter().map(Source::Bind).collect());
    };
    if specs.is_empty() {
        return Ok(act.listeners.into_iter().map(Source::Passed).collect());
    }
    let mut passed: Vec<Option<Listener>> = act.listeners.into_iter().map(Some).collect();
    let mut out = Vec::with_capacity(specs.len());
    for spec in specs {
        let matching: Vec<usize> = passed
            .iter()
            .enumerate()
            .filter(|(_, l)| l.as_ref().is_some_and(|l| l.name == spec.name()))
            .map(|(i, _)| i)
            .collect();
        match matching[..] {
            [] => out.push(Source::Bind(spec)),
            [i] => {
                let Some(l) = passed[i].take() else {
                    unreachable!("filtered on Some above")
                };
                agree(&spec, &l)?;
                out.push(Source::Passed(l));
            }
            _ => bail!(
                "systemd passed {} sockets named {:?}, so --listen {0}=… is ambiguous; give \
                 each ListenStream= its own FileDescriptorName= (one .socket unit per name)",
                matching.len(),
                spec.name()
            ),
        }
    }
    if let Some(l) = passed.into_iter().flatten().next() {
        bail!(
            "systemd passed a socket named {:?} ({}) that no --listen names: its connections \
             would never be accepted. Add --listen {0}=… , drop every --listen to take all \
             passed sockets, or remove it from the .socket unit",
            l.name,
            supervise::describe(&l)
        );
    }
    Ok(out)
}

/// A `--listen` spec and the socket passed under its name must describe
/// the same thing.
fn agree(spec: &ListenSpec, l: &Listener) -> Result<()> {
    let actual = supervise::describe(l);
    let ok = match spec {
        ListenSpec::Tcp { addr, .. } => match addr.parse::<SocketAddr>() {
            Ok(want) if want.port() != 0 => actual == format!("tcp://{want}"),
            // A host name or port 0: only the family can be compared.
            _ => actual.starts_with("tcp://"),
        },
        ListenSpec::Unix { path, .. } => actual == format!("unix:{}", path.display()),
    };
    if !ok {
        let wanted = match spec {
            ListenSpec::Tcp { addr, .. } => format!("tcp://{addr}"),
            ListenSpec::Unix { path, .. } => format!("unix:{}", path.display()),
        };
        bail!(
            "--listen {}={wanted} but the socket systemd passed under that name is {actual}; \
             make the .socket unit and --listen agree (or drop --listen to use the unit's \
             addresses)",
            spec.name()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::os::unix::net::UnixListener;

    fn tcp(name: &str) -> (Listener, SocketAddr) {
        let t = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = t.local_addr().unwrap();
        (
            Listener {
                name: name.into(),
                fd: t.into(),
            },
            a,
        )
    }

    fn spec(s: &str) -> ListenSpec {
        crate::listen::parse_listen(s).unwrap()
    }

    fn act(ls: Vec<Listener>) -> Option<Activation> {
        Some(Activation { listeners: ls })
    }

    fn names(p: &[Source]) -> Vec<(String, bool)> {
        p.iter()
            .map(|s| (s.name().to_string(), matches!(s, Source::Passed(_))))
            .collect()
    }

    #[test]
    fn without_listen_every_passed_socket_is_taken_in_order() {
        let (a, _) = tcp("http");
        let (b, _) = tcp("admin");
        let p = plan(vec![], act(vec![a, b])).unwrap();
        assert_eq!(names(&p), [("http".into(), true), ("admin".into(), true)]);
    }

    #[test]
    fn listen_names_pick_passed_sockets_and_the_rest_are_bound() {
        let (a, addr) = tcp("http");
        let p = plan(
            vec![
                spec(&format!("http={}", format_args!("tcp://{addr}"))),
                spec("extra=tcp://127.0.0.1:0"),
            ],
            act(vec![a]),
        )
        .unwrap();
        assert_eq!(names(&p), [("http".into(), true), ("extra".into(), false)]);
        // Port 0 / a host name: only the family is checked.
        let (a, _) = tcp("http");
        assert!(plan(vec![spec("http=tcp://localhost:0")], act(vec![a])).is_ok());
    }

    #[test]
    fn mismatches_are_errors_that_say_what_to_fix() {
        let (a, addr) = tcp("http");
        let other = SocketAddr::new(addr.ip(), addr.port().wrapping_add(1).max(1));
        let e = plan(vec![spec(&format!("http=tcp://{other}"))], act(vec![a])).unwrap_err();
        assert!(
            e.to_string()
                .contains("make the .socket unit and --listen agree"),
            "{e}"
        );

        let dir = tempfile::tempdir().unwrap();
        let (a, _) = tcp("http");
        let e = plan(
            vec![spec(&format!(
                "http=unix:{}",
                dir.path().join("s").display()
            ))],
            act(vec![a]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("tcp://"), "{e}");

        let (a, _) = tcp("http");
        let (b, _) = tcp("metrics");
        let e = plan(vec![spec("http=tcp://127.0.0.1:0")], act(vec![a, b])).unwrap_err();
        assert!(e.to_string().contains("\"metrics\""), "{e}");

        let (a, _) = tcp("http");
        let (b, _) = tcp("http");
        let e = plan(vec![spec("http=tcp://127.0.0.1:0")], act(vec![a, b])).unwrap_err();
        assert!(e.to_string().contains("ambiguous"), "{e}");

        assert!(plan(vec![], None).is_err());
    }

    #[test]
    fn unix_sockets_are_matched_by_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let u = UnixListener::bind(&path).unwrap();
        let l = Listener {
            name: "u".into(),
            fd: u.into(),
        };
        let p = plan(
            vec![spec(&format!("u=unix:{}", path.display()))],
            act(vec![l]),
        )
        .unwrap();
        assert_eq!(names(&p), [("u".into(), true)]);
    }

    #[test]
    fn only_listening_stream_sockets_are_accepted() {
        let (l, _) = tcp("http");
        check_listening(&l).unwrap();
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let e = check_listening(&Listener {
            name: "dns".into(),
            fd: udp.into(),
        })
        .unwrap_err();
        assert!(
            e.to_string().contains("not a listening stream socket"),
            "{e}"
        );
        let (l, addr) = tcp("x");
        let conn = std::net::TcpStream::connect(addr).unwrap();
        drop(l);
        let e = check_listening(&Listener {
            name: "conn".into(),
            fd: conn.into(),
        })
        .unwrap_err();
        assert!(e.to_string().contains("Accept=no"), "{e}");
        let (mut l, _) = tcp("x");
        l.name = "a:b".into();
        assert!(check_listening(&l).is_err());
    }
}
