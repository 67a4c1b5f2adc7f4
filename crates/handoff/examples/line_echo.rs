//! A line protocol service on the synchronous API that moves its live
//! connections to the next build (docs/connection-transfer.md): what a
//! service that is not on tokio/hyper writes to keep every client's TCP
//! connection across upgrades.
//!
//! Each line a client sends is answered `<line> from pid <pid>\n`. One
//! thread serves every connection with `poll(2)`, so each connection is
//! always between requests when the loop looks at it; a partial line is
//! the connection's unread bytes. The drain (called on the protocol
//! thread) asks the loop to offer every connection to the successor and
//! park it; `resume` serves the parked ones again, `retire` closes them
//! (close(2) only: the successor holds the sockets). The successor takes
//! them with `Incumbent::take_moved` once it is the incumbent.
//!
//! Run under the library's own supervisor (`tests/integration/move_sync.rs`) or
//! `handoff run --listen echo=tcp://127.0.0.1:7000 -- line_echo`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::sync::mpsc;
use std::time::Duration;

use handoff::{AbortSignal, Boot, BootOptions, DrainReport, Drainable, Mover, ServiceError};

/// What the protocol thread asks of the serving loop.
enum Ask {
    /// Stop accepting; offer every connection to `Mover` (or close it),
    /// then answer.
    Drain(Mover, mpsc::Sender<DrainReport>),
    /// The handoff aborted: serve the parked connections and accept again.
    Resume,
    /// The successor owns them: close the parked copies and end.
    Retire,
}

struct Conn {
    stream: TcpStream,
    /// Read and not answered: the start of the next line.
    buf: Vec<u8>,
}

/// The serving loop's handle for the protocol thread.
struct Service {
    asks: mpsc::Sender<Ask>,
    /// Wakes the loop from its poll.
    wake: std::os::unix::net::UnixStream,
}

impl Service {
    fn ask(&mut self, a: Ask) -> Result<(), ServiceError> {
        self.asks.send(a).map_err(|_| "the serving loop is gone")?;
        self.wake.write_all(&[1])?;
        Ok(())
    }
}

impl Drainable for Service {
    fn drain(&mut self, grace: Duration) -> Result<DrainReport, ServiceError> {
        self.drain_moving(grace, &AbortSignal::new(), &Mover::disabled())
    }

    fn drain_moving(
        &mut self,
        grace: Duration,
        _abort: &AbortSignal,
        mover: &Mover,
    ) -> Result<DrainReport, ServiceError> {
        let (tx, rx) = mpsc::channel();
        self.ask(Ask::Drain(mover.clone(), tx))?;
        Ok(rx.recv_timeout(grace)?)
    }

    fn seal(&mut self, _: &mut dyn FnMut(u64, u64)) -> Result<Option<Vec<u8>>, ServiceError> {
        Ok(None)
    }

    fn resume(&mut self) -> Result<(), ServiceError> {
        self.ask(Ask::Resume)
    }

    fn retire(&mut self) {
        let _ = self.ask(Ask::Retire);
    }
}

/// Answers every complete line in `c.buf`; false when the peer is gone.
fn answer(c: &mut Conn) -> bool {
    while let Some(end) = c.buf.iter().position(|&b| b == b'\n') {
        let line: Vec<u8> = c.buf.drain(..=end).collect();
        let reply = format!(
            "{} from pid {}\n",
            String::from_utf8_lossy(&line[..line.len() - 1]),
            std::process::id()
        );
        if c.stream.write_all(reply.as_bytes()).is_err() {
            return false;
        }
    }
    true
}

/// Reads what is there; false when the peer closed or failed.
fn read_some(c: &mut Conn) -> bool {
    let mut b = [0u8; 4096];
    match c.stream.read(&mut b) {
        Ok(0) => false,
        Ok(n) => {
            c.buf.extend_from_slice(&b[..n]);
            true
        }
        Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
    }
}

fn serve(
    listener: TcpListener,
    mut conns: Vec<Conn>,
    asks: mpsc::Receiver<Ask>,
    wake: std::os::unix::net::UnixStream,
) {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut accepting = true;
    let mut parked: Vec<Conn> = vec![];
    conns.retain_mut(answer);
    loop {
        let mut fds = vec![
            PollFd::new(wake.as_fd(), PollFlags::POLLIN),
            PollFd::new(
                listener.as_fd(),
                if accepting {
                    PollFlags::POLLIN
                } else {
                    PollFlags::empty()
                },
            ),
        ];
        fds.extend(
            conns
                .iter()
                .map(|c| PollFd::new(c.stream.as_fd(), PollFlags::POLLIN)),
        );
        if poll(&mut fds, PollTimeout::NONE).is_err() {
            continue;
        }
        let ready: Vec<bool> = fds
            .iter()
            .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
            .collect();
        drop(fds);
        // Connections first: each is between requests once answered.
        let mut i = 0;
        conns.retain_mut(|c| {
            i += 1;
            !ready[i + 1] || (read_some(c) && answer(c))
        });
        if accepting && ready[1] {
            while let Ok((s, _)) = listener.accept() {
                if s.set_nonblocking(true).is_ok() {
                    conns.push(Conn {
                        stream: s,
                        buf: vec![],
                    });
                }
            }
        }
        if ready[0] {
            let mut b = [0u8; 64];
            let _ = (&wake).read(&mut b);
            while let Ok(a) = asks.try_recv() {
                match a {
                    Ask::Drain(mover, done) => {
                        accepting = false;
                        let mut closed = 0;
                        for c in conns.drain(..) {
                            match mover.offer(c.stream.as_fd(), &c.buf, b"echo") {
                                Ok(()) => parked.push(c), // keep our copy, unread
                                Err(_) => {
                                    closed += 1;
                                    let _ = c.stream.shutdown(std::net::Shutdown::Write);
                                }
                            }
                        }
                        mover.closed(closed);
                        let _ = done.send(DrainReport {
                            open_conns_remaining: 0,
                            accept_closed: true,
                        });
                    }
                    Ask::Resume => {
                        accepting = true;
                        conns.append(&mut parked);
                        conns.retain_mut(answer);
                    }
                    // Dropping closes our copies only: no FIN, the
                    // successor holds the sockets.
                    Ask::Retire => return,
                }
            }
        }
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut boot = Boot::from_env(BootOptions::new("line_echo"))?;
    let listener = TcpListener::from(
        boot.take_listeners()
            .into_iter()
            .next()
            .ok_or("no listener passed (LISTEN_FDS)")?
            .fd,
    );
    listener.set_nonblocking(true)?;
    let mut incumbent = boot.begin()?.ready(|| Ok(()))?;
    // Ours now: the connections the previous build moved, unread bytes first.
    let mut moved = vec![];
    for m in incumbent.take_moved() {
        let stream = TcpStream::from(m.fd);
        stream.set_nonblocking(true)?;
        moved.push(Conn {
            stream,
            buf: m.unread,
        });
    }
    let (tx, rx) = mpsc::channel();
    let (wake_r, wake_w) = std::os::unix::net::UnixStream::pair()?;
    wake_r.set_nonblocking(true)?;
    let mut svc = Service {
        asks: tx,
        wake: wake_w,
    };
    let protocol = std::thread::spawn(move || incumbent.serve(&mut svc));
    serve(listener, moved, rx, wake_r);
    match protocol.join() {
        Ok(Ok(retired)) => println!("retired: {retired:?}"),
        Ok(Err(e)) => return Err(e.into()),
        Err(_) => return Err("the protocol thread panicked".into()),
    }
    Ok(())
}
