//! Slow senders (issue 14, item 7), the way they were found: clients that
//! trickle their request a byte at a time, each byte well within a read's
//! timeout, or connect and say nothing. Every socket must bound the whole
//! request, not each read, and none may let one such client keep the
//! others waiting: a status request trickled 1 byte / 4 s used to be taken
//! after 132 s; a trickler on `control.sock` held the incumbent's single
//! control thread, so an upgrade aborted ("the incumbent did not answer
//! within 5066 ms"); the metrics endpoint answered one client at a time.
//!
//! The pauses between a trickler's bytes are the behaviour under test;
//! everything else waits on a condition with a deadline.

use crate::support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use handoff::channel::Channel;
use handoff::frame;
use handoff::protocol::{Message, HELLO_FRAME_VERSION, PROTO_MAX};
use support::*;

/// Writes `bytes` one at a time, `gap` apart, until they are all sent, a
/// write fails (the server closed) or it is dropped.
struct Trickler {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Trickler {
    fn start<W: Write + Send + 'static>(mut to: W, bytes: Vec<u8>, gap: Duration) -> Trickler {
        let stop = Arc::new(AtomicBool::new(false));
        let halt = stop.clone();
        let thread = std::thread::spawn(move || {
            for b in bytes {
                if halt.load(Ordering::SeqCst) || to.write_all(&[b]).is_err() {
                    return;
                }
                std::thread::sleep(gap);
            }
        });
        Trickler {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Trickler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Reads everything until the server closes, from a thread; the result
/// comes with the time it took, or never if the server keeps it open.
fn read_until_closed<R: Read + Send + 'static>(mut from: R) -> mpsc::Receiver<(Vec<u8>, Instant)> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut v = vec![];
        let _ = from.read_to_end(&mut v);
        let _ = tx.send((v, Instant::now()));
    });
    rx
}

/// A status request trickled 1 byte a second is cut at the admin socket's
/// 5 s request budget, told why, while `handoff status` is served
/// meanwhile. (Its 33 bytes would take 33 s; each read was within 5 s.)
#[test]
fn a_trickled_admin_request_is_cut_at_its_budget() {
    let _guard = begin_light_test("admin_trickle", Duration::from_secs(60));
    let dirs = TestDirs::new();
    let _sup = Supervisor::start(&dirs.runtime, &dirs.state, &demo_bin(), &[]);
    let s = UnixStream::connect(dirs.runtime.join("admin.sock")).unwrap();
    let connected = Instant::now();
    let request = frame::encode(1, br#"{"cmd":"status"}"#).unwrap();
    assert!(request.len() > 20, "{} bytes", request.len());
    let _trickle = Trickler::start(s.try_clone().unwrap(), request, Duration::from_secs(1));
    let closed = read_until_closed(s);
    // The admin socket serves others meanwhile.
    let st = status_json(&dirs.runtime);
    assert!(st["incumbent_pid"].as_u64().is_some(), "{st}");
    let (reply, at) = closed
        .recv_timeout(Duration::from_secs(20))
        .expect("the trickling admin client was not cut within 20 s");
    let took = at - connected;
    let reply = String::from_utf8_lossy(&reply);
    assert!(
        took >= Duration::from_millis(4500) && took < Duration::from_secs(9),
        "cut after {took:?} (budget 5 s): {reply:?}"
    );
    assert!(
        reply.contains("bad request") && reply.contains("within 5 s"),
        "{reply:?}"
    );
}

/// Connects to an incumbent's control socket and takes its Hello.
fn control_client(path: &std::path::Path) -> (UnixStream, u16) {
    let s = UnixStream::connect(path).unwrap();
    let mut chan = Channel::new(s.try_clone().unwrap());
    match chan.recv(Some(Duration::from_secs(10))) {
        Ok(Message::Hello(h)) => (s, h.proto_max.min(PROTO_MAX)),
        other => panic!("expected the incumbent's Hello, got {other:?}"),
    }
}

/// The raw bytes of a HelloAck choosing `version`.
fn hello_ack(version: u16) -> Vec<u8> {
    frame::encode(HELLO_FRAME_VERSION, &Message::HelloAck { version }.encode()).unwrap()
}

/// Strangers of our own uid on `control.sock` — one trickling its HelloAck
/// at a byte per 500 ms, one that completed the greeting and says nothing
/// — do not keep the supervisor from the incumbent: the upgrade commits.
/// Then a trickler on the new incumbent's socket is cut at the 5 s hello
/// budget, the incumbent serving on (it used to be held for as long as the
/// bytes kept coming, then 60 s waiting for a request).
#[test]
fn strangers_on_the_control_socket_do_not_stall_an_upgrade() {
    let _guard = begin_light_test("control_strangers", Duration::from_secs(90));
    let dirs = TestDirs::new();
    let sup = Supervisor::start(&dirs.runtime, &dirs.state, &demo_bin(), &[]);
    let control = dirs.runtime.join("control.sock");

    let (trickling, version) = control_client(&control);
    let _trickle = Trickler::start(
        trickling.try_clone().unwrap(),
        hello_ack(version),
        Duration::from_millis(500),
    );
    // Greeted from a thread: with a single control thread busy with the
    // trickler it would get no Hello, and the upgrade is what is judged.
    let path = control.clone();
    let idle = std::thread::spawn(move || {
        let (mut s, version) = control_client(&path);
        s.write_all(&hello_ack(version)).unwrap();
        s
    });

    let c = sup.upgrade(&[]).expect_committed();
    assert_eq!(c.old_pid, sup.first_pid);
    sup.wait_settled(c.new_pid, Duration::from_secs(20));
    drop(trickling);
    drop(idle.join().expect("the silent stranger was greeted"));

    let (s, version) = control_client(&control);
    let connected = Instant::now();
    let _trickle = Trickler::start(
        s.try_clone().unwrap(),
        hello_ack(version),
        Duration::from_millis(500),
    );
    let (_, at) = read_until_closed(s)
        .recv_timeout(Duration::from_secs(20))
        .expect("the trickler on control.sock was not cut within 20 s");
    let took = at - connected;
    assert!(
        took < Duration::from_secs(9),
        "cut after {took:?} (hello budget 5 s)"
    );
    assert_eq!(sup.serving_pid(), Ok(c.new_pid));
    assert_eq!(sup.children(), [c.new_pid]);
}

/// A scrape, bounded by `within`; the whole answer.
fn scrape(addr: SocketAddr, within: Duration) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, within)?;
    s.set_read_timeout(Some(within))?;
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// A metrics client that connects and says nothing, and one that trickles
/// its request line a byte per 300 ms, do not hold up a scrape; the
/// trickler is answered 408 at the 2 s head budget.
#[test]
fn slow_metrics_clients_do_not_block_scrapes() {
    let _guard = begin_test("metrics_slow", Duration::from_secs(60));
    let dirs = TestDirs::new();
    let sup = Supervisor::start(
        &dirs.runtime,
        &dirs.state,
        &demo_bin(),
        &["--metrics", "127.0.0.1:0"],
    );
    let addr = sup.metrics_addr();
    let _silent = TcpStream::connect(addr).unwrap();
    let t = TcpStream::connect(addr).unwrap();
    let connected = Instant::now();
    let _trickle = Trickler::start(
        t.try_clone().unwrap(),
        b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        Duration::from_millis(300),
    );
    let cut = read_until_closed(t);
    let started = Instant::now();
    let out = scrape(addr, Duration::from_secs(1)).unwrap_or_else(|e| {
        panic!(
            "a scrape behind slow clients: {e} after {:?}",
            started.elapsed()
        )
    });
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.contains("handoff_incumbent_pid"), "{out}");
    let (reply, at) = cut
        .recv_timeout(Duration::from_secs(20))
        .expect("the trickling metrics client was not cut within 20 s");
    let took = at - connected;
    let reply = String::from_utf8_lossy(&reply);
    assert!(
        took >= Duration::from_millis(1800) && took < Duration::from_secs(6),
        "cut after {took:?} (budget 2 s): {reply:?}"
    );
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply:?}");
}
