//! The demo's HTTP parsing, now hyper's (issue 14, item 9): the shapes that
//! smuggled a request or slipped past a limit in the hand-written parser
//! are refused, against the real binary under `handoff run`.

use crate::support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use support::*;

/// Sends `raw` on a fresh connection and reads until the server closes
/// (bounded): everything it answered.
fn send(addr: std::net::SocketAddr, raw: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(raw).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn smuggling_shapes_and_oversized_heads_are_refused() {
    let _guard = begin_test("demo_http_refusals", Duration::from_secs(60));
    let dirs = TestDirs::new();
    let sup = Supervisor::start(&dirs.runtime, &dirs.state, &demo_bin(), &[]);

    // Two Content-Lengths: the last-one-wins parser stored the pipelined
    // request behind the first as a PUT body.
    let r = send(
        sup.addr,
        b"PUT /kv/smuggled HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\nContent-Length: 27\r\n\r\n\
          GET /kv/other HTTP/1.1\r\nHost: t\r\n\r\n",
    );
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    // A signed length.
    let r = send(
        sup.addr,
        b"PUT /kv/signed HTTP/1.1\r\nHost: t\r\nContent-Length: +3\r\n\r\nabc",
    );
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    // A head far past any sane size.
    let mut big = b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Big: ".to_vec();
    big.extend(std::iter::repeat_n(b'a', 500_000));
    big.extend_from_slice(b"\r\n\r\n");
    let r = send(sup.addr, &big);
    assert!(r.starts_with("HTTP/1.1 431"), "{r}");

    // Nothing was stored by any of them.
    for key in ["smuggled", "signed"] {
        let r = send(
            sup.addr,
            format!("GET /kv/{key} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes(),
        );
        assert!(r.starts_with("HTTP/1.1 404"), "{key}: {r}");
    }
}
