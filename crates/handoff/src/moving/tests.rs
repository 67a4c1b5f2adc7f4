//! The mover's queue, its limits and the sender thread, on socket pairs.

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use super::queue::Mover;
use super::sender::Flusher;
use super::{MoveRefused, MAX_CONNECTION_BYTES};
use crate::channel::Channel;
use crate::protocol::Message;

const MAX_BATCH_FDS: usize = crate::sys::fdpass::MAX_FDS;

/// The incumbent's end of a control connection and the supervisor's, both
/// speaking the version that moves connections.
fn channel_pair() -> (Channel, Channel) {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let mut ours = Channel::new(ours);
    ours.set_version(crate::protocol::MOVE_SINCE);
    let mut theirs = Channel::new(theirs);
    theirs.set_version(crate::protocol::MOVE_SINCE);
    (ours, theirs)
}

/// Starts a sender thread on `chan` for handoff `id`, with a deadline
/// far enough and an abort nobody watches.
fn start_flusher(chan: &Channel, id: u64, m: &Mover) -> Flusher {
    let deadline = Instant::now() + Duration::from_secs(10);
    Flusher::start(
        chan.sender().unwrap(),
        id,
        m.clone(),
        deadline,
        crate::AbortSignal::new(),
    )
    .unwrap()
}

#[test]
fn batches_are_what_the_supervisor_can_take() {
    let m = Mover::moving_at_most(10);
    assert_eq!(m.0.batch, 10);
    assert_eq!(Mover::moving_at_most(0).0.batch, 1);
    assert!(Mover::moving_at_most(100_000).0.batch <= MAX_BATCH_FDS);
    let (a, _b) = UnixStream::pair().unwrap();
    for _ in 0..25 {
        m.offer(a.as_fd(), b"", b"").unwrap();
    }
    assert_eq!(m.next_batch().unwrap().len(), 10);
}

#[test]
fn a_disabled_mover_refuses_and_keeps_nothing() {
    let m = Mover::disabled();
    let (a, _b) = UnixStream::pair().unwrap();
    assert!(!m.is_moving());
    assert!(matches!(
        m.offer(a.as_fd(), b"", b""),
        Err(MoveRefused::NotMoving)
    ));
}

/// The sender thread sends what is offered, in batches of at most 253
/// descriptors, each frame's descriptors the offered sockets, in order.
#[test]
fn the_flusher_sends_every_offer_with_its_descriptor() {
    let (ours, mut theirs) = channel_pair();
    let m = Mover::new(true);
    let f = start_flusher(&ours, 7, &m);
    // Sockets whose peers we keep, to tell them apart after the move.
    let pairs: Vec<_> = (0..260).map(|_| UnixStream::pair().unwrap()).collect();
    for (i, (a, _)) in pairs.iter().enumerate() {
        m.offer(a.as_fd(), format!("u{i}").as_bytes(), b"s")
            .unwrap();
    }
    m.closed(2);
    let reader = std::thread::spawn(move || {
        let mut got = vec![];
        while got.len() < 260 {
            let (msg, fds) = theirs.recv_with_fds(Duration::from_secs(10)).unwrap();
            let Message::Connections { handoff_id, conns } = msg else {
                panic!("{msg:?}")
            };
            assert_eq!(handoff_id, 7);
            assert_eq!(conns.len(), fds.len());
            assert!(fds.len() <= MAX_BATCH_FDS);
            got.extend(conns.into_iter().zip(fds));
        }
        got
    });
    let sent = f.finish().unwrap();
    assert_eq!((sent.moved, sent.closed), (260, 2));
    let got = reader.join().unwrap();
    for (i, (meta, fd)) in got.into_iter().enumerate() {
        assert_eq!(meta.unread, format!("u{i}").as_bytes());
        // The very socket: what is written to it comes out of its peer.
        let mut s = UnixStream::from(fd);
        std::io::Write::write_all(&mut s, &[i as u8]).unwrap();
        let mut b = [0u8; 1];
        std::io::Read::read_exact(&mut &pairs[i].1, &mut b).unwrap();
        assert_eq!(b[0], i as u8);
    }
    assert!(matches!(
        m.offer(pairs[0].0.as_fd(), b"", b""),
        Err(MoveRefused::Closed)
    ));
}

#[test]
fn offers_are_checked_and_batched_within_the_limits() {
    let m = Mover::new(true);
    let (a, _b) = UnixStream::pair().unwrap();
    let big = vec![0u8; MAX_CONNECTION_BYTES + 1];
    assert!(matches!(
        m.offer(a.as_fd(), &big, b""),
        Err(MoveRefused::TooLarge { .. })
    ));
    let batch = m.0.batch;
    assert!((1..=MAX_BATCH_FDS).contains(&batch));
    for _ in 0..batch + 7 {
        m.offer(a.as_fd(), b"GET", b"s").unwrap();
    }
    assert_eq!(m.next_batch().unwrap().len(), batch);
    assert_eq!(m.next_batch().unwrap().len(), 7);
    // Big offers split by bytes: four of 256 KiB do not fit one frame.
    let quarter = vec![1u8; MAX_CONNECTION_BYTES];
    for _ in 0..4 {
        m.offer(a.as_fd(), &quarter, b"").unwrap();
    }
    assert_eq!(m.next_batch().unwrap().len(), 3);
    assert_eq!(m.next_batch().unwrap().len(), 1);
    m.close();
    assert!(m.next_batch().is_none());
    assert!(matches!(
        m.offer(a.as_fd(), b"", b""),
        Err(MoveRefused::Closed)
    ));
}

/// A lent connection goes out as an offered one does — the very socket,
/// no duplicate made — and comes back to its owner once sent.
#[test]
fn a_lent_connection_is_sent_and_given_back() {
    let (ours, mut theirs) = channel_pair();
    let m = Mover::new(true);
    let f = start_flusher(&ours, 9, &m);
    let (conn, peer) = UnixStream::pair().unwrap();
    let raw = std::os::fd::AsRawFd::as_raw_fd(&conn);
    let lent = m.lend(conn, b"GET /", b"tcp").unwrap();
    let sent = f.finish().unwrap();
    assert_eq!(sent.moved, 1);
    let (msg, fds) = theirs.recv_with_fds(Duration::from_secs(10)).unwrap();
    let Message::Connections { handoff_id, conns } = msg else {
        panic!("{msg:?}")
    };
    assert_eq!((handoff_id, conns.len(), fds.len()), (9, 1, 1));
    assert_eq!(conns[0].unread, b"GET /");
    assert_eq!(conns[0].state, b"tcp");
    // The same socket: the receiver's copy reaches our peer.
    let mut moved = UnixStream::from(fds.into_iter().next().unwrap());
    std::io::Write::write_all(&mut moved, b"x").unwrap();
    let mut b = [0u8; 1];
    std::io::Read::read_exact(&mut &peer, &mut b).unwrap();
    assert_eq!(&b, b"x");
    // Ours again, the same descriptor it was (nothing was duplicated).
    let back = lent.take_back();
    assert_eq!(std::os::fd::AsRawFd::as_raw_fd(&back), raw);
}

/// Refused lends hand the connection straight back, with the reason.
#[test]
fn a_refused_lend_gives_the_connection_back() {
    let (a, _b) = UnixStream::pair().unwrap();
    let raw = std::os::fd::AsRawFd::as_raw_fd(&a);
    let (a, e) = Mover::disabled().lend(a, b"", b"").unwrap_err();
    assert!(matches!(e, MoveRefused::NotMoving), "{e}");
    let m = Mover::new(true);
    let big = vec![0u8; MAX_CONNECTION_BYTES + 1];
    let (a, e) = m.lend(a, &big, b"").unwrap_err();
    assert!(matches!(e, MoveRefused::TooLarge { .. }), "{e}");
    m.close();
    let (a, e) = m.lend(a, b"", b"").unwrap_err();
    assert!(matches!(e, MoveRefused::Closed), "{e}");
    assert_eq!(std::os::fd::AsRawFd::as_raw_fd(&a), raw);
    assert_eq!(m.queued(), 0);
}

/// `take_back` waits while the sender holds the connection (a batch being
/// sent), and returns once the sender lets go.
#[test]
fn take_back_waits_for_the_batch_in_flight() {
    let m = Mover::new(true);
    let (a, _b) = UnixStream::pair().unwrap();
    let lent = m.lend(a, b"", b"").unwrap();
    // What the sender thread does: take the batch, send it (here: hold it).
    let batch = m.next_batch().unwrap();
    assert_eq!(batch.len(), 1);
    let taker = std::thread::spawn(move || lent.take_back());
    let deadline = Instant::now() + Duration::from_secs(10);
    while m.queue().takers == 0 {
        assert!(Instant::now() < deadline, "take_back never waited");
        std::thread::yield_now();
    }
    assert!(!taker.is_finished());
    drop(batch);
    m.released();
    let back = taker.join().unwrap();
    let mut probe = &back;
    std::io::Write::write_all(&mut probe, b"still open").unwrap();
}

/// An aborted handoff's sender stops: what is queued is not sent, the
/// thread is gone when the flusher is dropped, and every lent connection
/// comes back at once.
#[test]
fn an_abandoned_flusher_sends_nothing_more_and_lets_go() {
    let (ours, mut theirs) = channel_pair();
    // A window of one descriptor: the second batch waits for the reader,
    // which never reads until the flusher is dropped.
    let m = Mover::moving_at_most(1);
    let deadline = Instant::now() + Duration::from_secs(30);
    let pairs: Vec<_> = (0..5).map(|_| UnixStream::pair().unwrap()).collect();
    let mut lent = vec![];
    for (a, _) in &pairs {
        lent.push(m.lend(a.try_clone().unwrap(), b"", b"").unwrap());
    }
    let f = Flusher::start(
        ours.sender().unwrap(),
        3,
        m.clone(),
        deadline,
        crate::AbortSignal::new(),
    )
    .unwrap();
    let started = Instant::now();
    drop(f);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "dropping the flusher waited for the deadline"
    );
    assert_eq!(m.queued(), 0);
    for l in lent {
        drop(l.take_back());
    }
    // At most the one batch the window let out before the drop; the rest
    // never will be.
    let mut got = 0;
    while let Ok((_, fds)) = theirs.recv_with_fds(Duration::from_millis(1)) {
        got += fds.len();
    }
    assert!(
        got <= 1,
        "{got} of 5 sent, with a window of 1 and no reader"
    );
    assert!(matches!(
        m.lend(pairs[0].0.try_clone().unwrap(), b"", b""),
        Err((_, MoveRefused::Closed))
    ));
}

// The successor's end of a direct move (protocol version 4).

use super::inbound::Inbound;
use crate::error::ProtocolError;
use crate::protocol::{MovedMeta, MOVE_DIRECT_SINCE};
use std::os::fd::OwnedFd;

const FRAME: Duration = Duration::from_secs(5);

/// The supervisor's socket pair: the incumbent's end as a channel, the
/// successor's as what MoveChannel carries.
fn direct_pair(id: u64) -> (Channel, Inbound) {
    let (inc, succ) = UnixStream::pair().unwrap();
    let mut inc = Channel::new(inc);
    inc.set_version(MOVE_DIRECT_SINCE);
    let inbound = Inbound::open(id, vec![OwnedFd::from(succ)], FRAME).unwrap();
    (inc, inbound)
}

/// MoveChannel must carry exactly one descriptor, and it must be a Unix
/// socket whose maker can be told: anything else is refused, named.
#[test]
fn the_move_socket_is_checked_before_use() {
    let none = Inbound::open(1, vec![], FRAME).unwrap_err();
    assert!(
        none.to_string()
            .contains("expected one descriptor attached, got 0"),
        "{none}"
    );
    let (a, b) = UnixStream::pair().unwrap();
    let two = Inbound::open(1, vec![a.into(), b.into()], FRAME).unwrap_err();
    assert!(two.to_string().contains("got 2"), "{two}");
    let (r, _w) = nix::unistd::pipe().unwrap();
    let pipe = Inbound::open(1, vec![r], FRAME).unwrap_err();
    assert!(pipe.to_string().contains("not a Unix socket"), "{pipe}");
    assert!(matches!(pipe, ProtocolError::Frame { .. }), "{pipe:?}");
}

/// What the incumbent's sender thread writes on its end is what the
/// successor takes in: every connection, in order, with its bytes, then
/// the count ends it.
#[test]
fn a_direct_move_delivers_every_connection_then_ends() {
    let (inc, mut inbound) = direct_pair(9);
    let m = Mover::moving_at_most(100);
    let f = start_flusher(&inc, 9, &m);
    let pairs: Vec<_> = (0..300).map(|_| UnixStream::pair().unwrap()).collect();
    for (i, (a, _)) in pairs.iter().enumerate() {
        m.offer(a.as_fd(), format!("u{i}").as_bytes(), b"http")
            .unwrap();
    }
    // Read as it comes, as the successor does while waiting for Begin:
    // the window (100) is smaller than what is offered.
    let mut got = vec![];
    while got.len() < pairs.len() {
        assert!(
            inbound.read_one(&mut got).unwrap(),
            "ended early at {}",
            got.len()
        );
    }
    let sent = f.finish().unwrap();
    assert_eq!(sent.moved, 300);
    inc.send(&Message::ConnectionsDone {
        handoff_id: 9,
        moved: 300,
        closed: 0,
    })
    .unwrap();
    drop(inc);
    inbound.finish(&mut got).unwrap();
    assert_eq!(got.len(), 300);
    for (i, (c, (_, peer))) in got.iter().zip(&pairs).enumerate() {
        assert_eq!(c.unread, format!("u{i}").as_bytes());
        assert_eq!(c.state, b"http");
        // The descriptor is the offered socket: a byte written on it
        // reaches the peer we kept.
        let s = UnixStream::from(c.fd.try_clone().unwrap());
        std::io::Write::write_all(&mut &s, b"x").unwrap();
        let mut b = [0u8; 1];
        peer.set_read_timeout(Some(FRAME)).unwrap();
        std::io::Read::read_exact(&mut &*peer, &mut b).unwrap();
    }
}

/// An incumbent that dies part-way (its end closes, perhaps mid-frame)
/// ends the move without failing the successor: what arrived stays, the
/// supervisor decides.
#[test]
fn an_incumbent_gone_mid_move_keeps_what_arrived() {
    let (inc, mut inbound) = direct_pair(3);
    let (a, _b) = UnixStream::pair().unwrap();
    inc.send_with_fds(
        &Message::Connections {
            handoff_id: 3,
            conns: vec![MovedMeta {
                unread: vec![],
                state: vec![],
            }],
        },
        &[a.as_fd()],
    )
    .unwrap();
    // Half a frame header, then gone.
    std::io::Write::write_all(&mut inc.stream(), &[0, 0]).unwrap();
    drop(inc);
    let mut got = vec![];
    assert!(inbound.read_one(&mut got).unwrap());
    assert!(!inbound.read_one(&mut got).unwrap());
    assert_eq!(got.len(), 1);
}

/// Only batches and their count travel on the move socket, for this
/// handoff, each batch with as many descriptors as entries.
#[test]
fn the_move_socket_refuses_anything_else() {
    let conns = |n: usize| {
        (0..n)
            .map(|_| MovedMeta {
                unread: vec![],
                state: vec![],
            })
            .collect::<Vec<_>>()
    };
    let (a, _b) = UnixStream::pair().unwrap();
    let cases: Vec<(Message, usize, &str)> = vec![
        (
            Message::Begin {
                handoff_id: 5,
                state: None,
            },
            0,
            "Begin, which is not legal",
        ),
        (
            Message::Connections {
                handoff_id: 6,
                conns: conns(1),
            },
            1,
            "for handoff",
        ),
        (
            Message::Connections {
                handoff_id: 5,
                conns: conns(2),
            },
            1,
            "2 connections but 1 descriptors attached",
        ),
    ];
    for (msg, fds, says) in cases {
        let (inc, mut inbound) = direct_pair(5);
        let attached = vec![a.as_fd(); fds];
        inc.send_with_fds(&msg, &attached).unwrap();
        let e = inbound.read_one(&mut vec![]).unwrap_err();
        assert!(e.to_string().contains(says), "{}: {e}", msg.name());
        assert_eq!(e.peer(), Some(crate::phase::Peer::Incumbent), "{e}");
    }
}

/// A send that fails (the peer is gone) stops the drain: the sender fires
/// the drain's abort and says it failed, so the service serves its
/// connections on instead of closing the rest one by one.
#[test]
fn a_failed_send_aborts_the_drain() {
    let (ours, theirs) = channel_pair();
    drop(theirs);
    let m = Mover::moving_at_most(10);
    let abort = crate::AbortSignal::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    let f = Flusher::start(
        ours.sender().unwrap(),
        4,
        m.clone(),
        deadline,
        abort.clone(),
    )
    .unwrap();
    let (a, _b) = UnixStream::pair().unwrap();
    m.offer(a.as_fd(), b"", b"").unwrap();
    assert!(abort.wait(Duration::from_secs(10)), "the abort never fired");
    assert!(f.failed());
    // Nothing more is taken once it failed.
    let until = Instant::now() + Duration::from_secs(10);
    while m.offer(a.as_fd(), b"", b"").is_ok() {
        assert!(
            Instant::now() < until,
            "offers still taken after the sender failed"
        );
        std::thread::yield_now();
    }
    assert!(f.finish().is_err());
}
