//! Encoding round trips, version gates and negotiation of `protocol.rs`.

use super::*;

fn all() -> Vec<Message> {
    vec![
        Message::Hello(Hello {
            role: Role::Successor,
            pid: 42,
            proto_min: 1,
            proto_max: 3,
            build_id: "b".into(),
        }),
        Message::HelloAck { version: 1 },
        Message::PrepareHandoff {
            handoff_id: 7,
            successor_pid: 9,
            deadline_ms: 1000,
            drain_grace_ms: 500,
        },
        Message::Drained {
            handoff_id: 7,
            open_conns_remaining: 2,
            accept_closed: true,
        },
        Message::SealRequest { handoff_id: 7 },
        Message::SealProgress {
            handoff_id: 7,
            done: 1,
            total: 2,
        },
        Message::SealComplete {
            handoff_id: 7,
            state: Some(vec![1, 2, 3]),
        },
        Message::SealFailed {
            handoff_id: 7,
            error: "disk".into(),
        },
        Message::Begin {
            handoff_id: 7,
            state: None,
        },
        Message::Ready {
            handoff_id: 7,
            listening_on: vec!["http".into()],
            healthz_ok: true,
            metadata: vec![("k".into(), "v".into())],
        },
        Message::Commit { handoff_id: 7 },
        Message::Abort {
            handoff_id: 7,
            reason: "r".into(),
        },
        Message::ResumeAfterAbort { handoff_id: 7 },
        Message::Heartbeat { handoff_id: 7 },
        Message::FetchListeners {},
        Message::Listeners {
            names: vec!["http".into(), "admin".into()],
        },
        Message::Shutdown {
            stop_id: 11,
            drain_grace_ms: 30_000,
        },
        Message::ShutdownDrained {
            stop_id: 11,
            open_conns_remaining: 1,
            accept_closed: true,
        },
        Message::PrepareHandoffV3 {
            handoff_id: 7,
            successor_pid: 9,
            deadline_ms: 1000,
            drain_grace_ms: 500,
            move_connections: true,
            max_in_flight: 253,
        },
        Message::Connections {
            handoff_id: 7,
            conns: vec![
                MovedMeta {
                    unread: b"GET / HT".to_vec(),
                    state: b"http".to_vec(),
                },
                MovedMeta {
                    unread: vec![],
                    state: vec![],
                },
            ],
        },
        Message::ConnectionsDone {
            handoff_id: 7,
            moved: 2,
            closed: 1,
        },
        Message::PrepareHandoffV4 {
            handoff_id: 7,
            successor_pid: 9,
            deadline_ms: 1000,
            drain_grace_ms: 500,
            max_in_flight: 253,
        },
        Message::MoveChannel { handoff_id: 7 },
    ]
}

#[test]
fn every_message_round_trips() {
    for m in all() {
        let bytes = m.encode();
        assert_eq!(Message::decode(&bytes).unwrap(), m, "{}", m.name());
    }
}

/// The tags are the wire format: a message keeps its tag forever, so a
/// build that renumbered one would misread every older peer.
#[test]
fn shutdown_messages_have_their_tags_and_version() {
    let s = Message::Shutdown {
        stop_id: 0x0102,
        drain_grace_ms: 5,
    };
    assert_eq!(s.encode(), vec![16, 0x82, 0x02, 5]);
    let d = Message::ShutdownDrained {
        stop_id: 3,
        open_conns_remaining: 0,
        accept_closed: true,
    };
    assert_eq!(d.encode(), vec![17, 3, 0, 1]);
    assert_eq!(s.since(), SHUTDOWN_SINCE);
    assert_eq!(d.since(), SHUTDOWN_SINCE);
    assert_eq!(s.handoff_id(), Some(0x0102));
    assert_eq!(d.handoff_id(), Some(3));
    assert!(!s.is_keepalive() && !d.is_keepalive());
    // Everything else is version 1, 3 or 4.
    for m in all() {
        if !matches!(
            m,
            Message::Shutdown { .. } | Message::ShutdownDrained { .. }
        ) {
            assert!(
                [1, MOVE_SINCE, MOVE_DIRECT_SINCE].contains(&m.since()),
                "{}",
                m.name()
            );
        }
    }
    const { assert!(SHUTDOWN_SINCE <= PROTO_MAX && SHUTDOWN_SINCE > PROTO_MIN) };
}

/// Version 3's messages keep their tags and version, and the rest stay
/// version 1: a version-2 peer never sees a move.
#[test]
fn move_messages_have_their_tags_and_version() {
    let p = Message::PrepareHandoffV3 {
        handoff_id: 1,
        successor_pid: 2,
        deadline_ms: 3,
        drain_grace_ms: 4,
        move_connections: true,
        max_in_flight: 5,
    };
    assert_eq!(p.encode(), vec![18, 1, 2, 3, 4, 1, 5]);
    let c = Message::Connections {
        handoff_id: 5,
        conns: vec![MovedMeta {
            unread: vec![0xaa],
            state: vec![],
        }],
    };
    assert_eq!(c.encode(), vec![19, 5, 1, 1, 0xaa, 0]);
    let d = Message::ConnectionsDone {
        handoff_id: 6,
        moved: 7,
        closed: 8,
    };
    assert_eq!(d.encode(), vec![20, 6, 7, 8]);
    for m in [&p, &c, &d] {
        assert_eq!(m.since(), MOVE_SINCE, "{}", m.name());
        assert!(!m.is_keepalive());
    }
    assert_eq!(c.handoff_id(), Some(5));
    for m in all() {
        if !matches!(
            m,
            Message::Shutdown { .. }
                | Message::ShutdownDrained { .. }
                | Message::PrepareHandoffV3 { .. }
                | Message::Connections { .. }
                | Message::ConnectionsDone { .. }
                | Message::PrepareHandoffV4 { .. }
                | Message::MoveChannel { .. }
        ) {
            assert_eq!(m.since(), 1, "{}", m.name());
        }
    }
    const { assert!(MOVE_SINCE < PROTO_MAX && MOVE_SINCE > SHUTDOWN_SINCE) };
}

/// Version 4's messages keep their tags and version.
#[test]
fn direct_move_messages_have_their_tags_and_version() {
    let p = Message::PrepareHandoffV4 {
        handoff_id: 1,
        successor_pid: 2,
        deadline_ms: 3,
        drain_grace_ms: 4,
        max_in_flight: 5,
    };
    assert_eq!(p.encode(), vec![21, 1, 2, 3, 4, 5]);
    let c = Message::MoveChannel { handoff_id: 6 };
    assert_eq!(c.encode(), vec![22, 6]);
    for m in [&p, &c] {
        assert_eq!(m.since(), MOVE_DIRECT_SINCE, "{}", m.name());
        assert!(!m.is_keepalive());
    }
    assert_eq!(p.handoff_id(), Some(1));
    assert_eq!(c.handoff_id(), Some(6));
    const {
        assert!(
            MOVE_DIRECT_SINCE < SEAL_AT_ONCE_SINCE
                && SEAL_AT_ONCE_SINCE == PROTO_MAX
                && MOVE_DIRECT_SINCE > MOVE_SINCE
        )
    };
}

#[test]
fn shutdown_bodies_are_checked() {
    let mut b = Message::Shutdown {
        stop_id: 1,
        drain_grace_ms: 1,
    }
    .encode();
    b.push(0);
    assert!(matches!(
        Message::decode(&b),
        Err(FrameError::Malformed {
            message: "Shutdown",
            ..
        })
    ));
    assert!(matches!(
        Message::decode(&[17, 1, 0]),
        Err(FrameError::Malformed {
            message: "ShutdownDrained",
            ..
        })
    ));
}

#[test]
fn unknown_tag_is_typed() {
    assert!(matches!(
        Message::decode(&[200, 0]),
        Err(FrameError::UnknownMessage { tag: 200 })
    ));
    assert!(matches!(Message::decode(&[]), Err(FrameError::Empty)));
}

#[test]
fn short_and_trailing_bodies_are_malformed() {
    let mut b = Message::Commit { handoff_id: 300 }.encode();
    b.push(0);
    assert!(matches!(
        Message::decode(&b),
        Err(FrameError::Malformed {
            message: "Commit",
            ..
        })
    ));
    let b = Message::Commit { handoff_id: 300 }.encode();
    assert!(matches!(
        Message::decode(&b[..b.len() - 1]),
        Err(FrameError::Malformed { .. })
    ));
}

#[test]
fn negotiation_picks_highest_common() {
    let r = |min, max| VersionRange { min, max };
    assert_eq!(negotiate(r(1, 3), r(2, 5), Role::Successor), Ok(3));
    assert_eq!(negotiate(r(2, 5), r(1, 3), Role::Successor), Ok(3));
    assert_eq!(negotiate(r(1, 1), r(1, 1), Role::Incumbent), Ok(1));
    assert_eq!(negotiate(r(1, 9), r(4, 4), Role::Incumbent), Ok(4));
    let e = negotiate(r(1, 2), r(3, 4), Role::Incumbent).unwrap_err();
    assert!(e.to_string().contains("no common protocol version"));
    assert!(e.to_string().contains("3..=4"));
    assert!(negotiate(r(3, 1), r(1, 3), Role::Incumbent).is_err());
}
