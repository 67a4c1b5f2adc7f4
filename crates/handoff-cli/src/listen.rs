//! `--listen NAME=tcp://HOST:PORT|unix:PATH`: parsing the flag and binding
//! the socket the supervisor keeps for the service's whole life.

use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;

use anyhow::{Context, Result};
use handoff::Listener;

/// A parsed `--listen` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenSpec {
    Tcp { name: String, addr: String },
    Unix { name: String, path: PathBuf },
}

impl ListenSpec {
    pub fn name(&self) -> &str {
        match self {
            ListenSpec::Tcp { name, .. } | ListenSpec::Unix { name, .. } => name,
        }
    }
}

pub fn parse_listen(s: &str) -> Result<ListenSpec, String> {
    let (name, addr) = s.split_once('=').ok_or_else(|| {
        format!("--listen {s:?}: expected NAME=tcp://HOST:PORT or NAME=unix:PATH")
    })?;
    if name.is_empty() || name.contains(':') || !name.chars().all(|c| c.is_ascii_graphic()) {
        return Err(format!(
            "--listen {s:?}: the name must be non-empty printable ASCII without ':'"
        ));
    }
    if let Some(a) = addr.strip_prefix("tcp://") {
        Ok(ListenSpec::Tcp {
            name: name.into(),
            addr: a.into(),
        })
    } else if let Some(p) = addr.strip_prefix("unix:") {
        Ok(ListenSpec::Unix {
            name: name.into(),
            path: PathBuf::from(p),
        })
    } else {
        Err(format!(
            "--listen {s:?}: address must start with tcp:// or unix:"
        ))
    }
}

/// Binds one listener with a generous backlog: during the accept gap of a
/// handoff, connections wait there.
pub fn bind(spec: &ListenSpec) -> Result<(Listener, String)> {
    let (name, fd, shown) = match spec {
        ListenSpec::Tcp { name, addr } => {
            let l =
                TcpListener::bind(addr).with_context(|| format!("binding {name}=tcp://{addr}"))?;
            let local = l.local_addr()?;
            (
                name.clone(),
                std::os::fd::OwnedFd::from(l),
                format!("tcp://{local}"),
            )
        }
        ListenSpec::Unix { name, path } => {
            let l = UnixListener::bind(path)
                .with_context(|| format!("binding {name}=unix:{}", path.display()))?;
            (
                name.clone(),
                std::os::fd::OwnedFd::from(l),
                format!("unix:{}", path.display()),
            )
        }
    };
    nix::sys::socket::listen(
        &fd,
        nix::sys::socket::Backlog::new(4096).unwrap_or(nix::sys::socket::Backlog::MAXCONN),
    )
    .context("raising the listen backlog")?;
    Ok((Listener { name, fd }, shown))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_specs() {
        assert_eq!(
            parse_listen("http=tcp://127.0.0.1:0").unwrap(),
            ListenSpec::Tcp {
                name: "http".into(),
                addr: "127.0.0.1:0".into()
            }
        );
        assert_eq!(
            parse_listen("a=unix:/tmp/x.sock").unwrap(),
            ListenSpec::Unix {
                name: "a".into(),
                path: "/tmp/x.sock".into()
            }
        );
        assert!(parse_listen("nohost").is_err());
        assert!(parse_listen("=tcp://x:1").is_err());
        assert!(parse_listen("a:b=tcp://x:1").is_err());
        assert!(parse_listen("a=udp://x:1").is_err());
    }
}
