//! systemd's notify datagram: `KEY=VALUE` lines (`sd_notify(3)`).

/// Largest datagram accepted. systemd reads notify messages into a buffer of
/// this size too (`NOTIFY_BUFFER_MAX`); anything longer is dropped whole
/// rather than half-parsed.
pub const MAX_DATAGRAM: usize = 4096;

/// The keys of one datagram that the supervisor acts on. Unknown keys are
/// ignored (systemd grows new ones: `FDSTORE=`, `EXTEND_TIMEOUT_USEC=`…), as
/// are lines without `=` and values that do not parse.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NotifyMessage {
    /// `READY=1`: startup finished, the process serves.
    pub ready: bool,
    /// `RELOADING=1`: the process reloads its configuration.
    pub reloading: bool,
    /// `STOPPING=1`: the process is shutting down.
    pub stopping: bool,
    /// `WATCHDOG=1`: a keep-alive ping.
    pub watchdog: bool,
    /// `STATUS=…`: free-form status text for humans.
    pub status: Option<String>,
    /// `MAINPID=…`: the process claims another pid is the main process.
    pub main_pid: Option<u32>,
    /// `ERRNO=…`: the process failed with this errno.
    pub errno: Option<i32>,
}

impl NotifyMessage {
    /// Parses one datagram. Never fails: a datagram with nothing we know is
    /// simply an empty message.
    ///
    /// ```
    /// use handoff::notify::NotifyMessage;
    /// let m = NotifyMessage::parse(b"READY=1\nSTATUS=serving 3 listeners\nX_CUSTOM=7\n");
    /// assert!(m.ready);
    /// assert_eq!(m.status.as_deref(), Some("serving 3 listeners"));
    /// ```
    pub fn parse(datagram: &[u8]) -> NotifyMessage {
        let mut m = NotifyMessage::default();
        for line in datagram.split(|b| *b == b'\n') {
            let Some(eq) = line.iter().position(|b| *b == b'=') else {
                continue;
            };
            let (key, value) = (&line[..eq], &line[eq + 1..]);
            let text = || String::from_utf8_lossy(value).into_owned();
            match key {
                b"READY" => m.ready = value == b"1",
                b"RELOADING" => m.reloading = value == b"1",
                b"STOPPING" => m.stopping = value == b"1",
                b"WATCHDOG" => m.watchdog = value == b"1",
                b"STATUS" => m.status = Some(text()),
                b"MAINPID" => m.main_pid = text().parse().ok().filter(|p| *p != 0),
                b"ERRNO" => m.errno = text().parse().ok(),
                _ => {}
            }
        }
        m
    }

    /// True when nothing we act on was in the datagram.
    pub fn is_empty(&self) -> bool {
        *self == NotifyMessage::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_known_keys() {
        let m = NotifyMessage::parse(
            b"READY=1\nRELOADING=1\nSTOPPING=1\nWATCHDOG=1\nSTATUS=a=b\nMAINPID=42\nERRNO=5",
        );
        assert_eq!(
            m,
            NotifyMessage {
                ready: true,
                reloading: true,
                stopping: true,
                watchdog: true,
                status: Some("a=b".into()),
                main_pid: Some(42),
                errno: Some(5),
            }
        );
    }

    #[test]
    fn unknown_malformed_and_false_values_are_ignored() {
        let m =
            NotifyMessage::parse(b"READY=0\nFDSTORE=1\nnonsense\n=x\nMAINPID=abc\nMAINPID=0\n\n");
        assert!(m.is_empty(), "{m:?}");
        assert!(NotifyMessage::parse(b"").is_empty());
        let m = NotifyMessage::parse(b"STATUS=\xff\xfe\nREADY=1");
        assert!(m.ready);
        assert_eq!(m.status.as_deref(), Some("\u{fffd}\u{fffd}"));
    }
}
