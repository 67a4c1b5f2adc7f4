//! Notify mode after a supervisor crash: the program it ran is still
//! serving (nothing stops it), holding the ports, so a restarted supervisor
//! must take it back rather than bind and start a second one. The library's
//! [`RecordStore`] says which process that is; this module gets each
//! listener from systemd when it passed one under that name, and otherwise
//! copies it out of the orphan (`pidfd_getfd`).

use anyhow::{Context, Result};
use handoff::notify::{describe_fd, Orphan, RecordStore};
use handoff::Listener;
use std::os::fd::AsFd;
use std::path::Path;

use crate::listen::bind;
use crate::systemd::activation::Source;

/// The listeners to supervise, and the process to adopt if one survived.
pub(super) struct Opened {
    pub listeners: Vec<(Listener, String)>,
    pub orphan: Option<Orphan>,
}

/// Takes the listeners back from a surviving process, or binds them.
pub(super) fn open(state_dir: &Path, sources: Vec<Source>) -> Result<Opened> {
    let store = RecordStore::new(state_dir);
    let orphan = store
        .find_orphan()
        .context("looking for a service left by a previous supervisor")?;
    let Some(orphan) = orphan else {
        let listeners = sources
            .into_iter()
            .map(|s| s.open(bind))
            .collect::<Result<Vec<_>>>()?;
        return Ok(Opened {
            listeners,
            orphan: None,
        });
    };
    let names: Vec<String> = sources.iter().map(|s| s.name().to_string()).collect();
    orphan.check_names(&names)?;
    let mut listeners = Vec::with_capacity(sources.len());
    for (i, source) in sources.into_iter().enumerate() {
        let (l, from) = match source {
            // systemd's copy (its fd store or socket unit) is the same socket.
            Source::Passed(l) => (l, "systemd"),
            Source::Bind(_) => (orphan.fetch_listener(i)?, "the running service"),
        };
        let shown = describe_fd(l.fd.as_fd()).unwrap_or_else(|| "?".into());
        eprintln!(
            "handoff run: {}={shown} taken from {from} (pid {} serves it)",
            l.name,
            orphan.pid()
        );
        listeners.push((l, shown));
    }
    Ok(Opened {
        listeners,
        orphan: Some(orphan),
    })
}
