//! Moving live connections with the synchronous API alone
//! (`examples/line_echo.rs`, no tokio): the library's own supervisor hands
//! 20 connections — one with half a line sent — from build to build, and
//! each is answered by the new build on the very same connection, its half
//! line completed from the bytes that moved with it.

use crate::common;

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use handoff::{ConnectionsMoved, HandoffOptions, Listener, Program, Supervisor, SupervisorConfig};

/// Kills the service processes at the end, however the test ends.
struct Pids(Vec<u32>);

impl Drop for Pids {
    fn drop(&mut self) {
        for &p in &self.0 {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(p as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

fn ask(c: &mut BufReader<TcpStream>, send: &str) -> String {
    c.get_mut().write_all(send.as_bytes()).unwrap();
    let mut line = String::new();
    c.read_line(&mut line).unwrap();
    line
}

#[test]
fn a_synchronous_service_moves_its_connections_with_their_unread_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let control = dir.path().join("control.sock");
    let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = tcp.local_addr().unwrap();
    let sup = Supervisor::new(
        SupervisorConfig::new(&state, &control),
        vec![Listener {
            name: "echo".into(),
            fd: tcp.into(),
        }],
    )
    .unwrap();
    let program = Program::new(common::example_bin("line_echo"));
    let mut pids = Pids(vec![]);
    let first = sup.start(&program, &mut |_| {}).unwrap();
    pids.0.push(first.new_pid);

    let mut clients: Vec<BufReader<TcpStream>> = (0..20)
        .map(|i| {
            let s = TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut c = BufReader::new(s);
            let got = ask(&mut c, &format!("hello {i}\n"));
            assert_eq!(got, format!("hello {i} from pid {}\n", first.new_pid));
            c
        })
        .collect();
    // Half a line, which the old build reads and cannot answer yet.
    clients[0].get_mut().write_all(b"half").unwrap();
    let ports: Vec<u16> = clients
        .iter()
        .map(|c| c.get_ref().local_addr().unwrap().port())
        .collect();

    let mut last = first.new_pid;
    for round in 0..2 {
        let r = sup
            .perform_handoff(&program, HandoffOptions::default(), &mut |_| {})
            .unwrap();
        pids.0.push(r.new_pid);
        assert_eq!(r.old_pid, Some(last), "round {round}");
        assert_eq!(
            r.connections,
            Some(ConnectionsMoved {
                moved: 20,
                closed: 0,
                // Both speak protocol 4: straight from one to the other.
                direct: true,
            }),
            "round {round}"
        );
        last = r.new_pid;
        if round == 0 {
            assert_eq!(
                ask(&mut clients[0], " and the rest\n"),
                format!("half and the rest from pid {last}\n"),
                "the half line moved with its connection"
            );
        }
        for (i, c) in clients.iter_mut().enumerate() {
            assert_eq!(
                ask(c, &format!("again {i}\n")),
                format!("again {i} from pid {last}\n"),
                "round {round}, client {i}"
            );
        }
    }
    for (c, port) in clients.iter().zip(ports) {
        assert_eq!(c.get_ref().local_addr().unwrap().port(), port);
    }
}
