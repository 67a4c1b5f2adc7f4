//! The generator against small servers of known behaviour: what it counts
//! as answered, how it classifies what is not, and the key-value load with
//! its read-back end to end.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use handoff_load::blocking::{verify_acked, Load};
use handoff_load::conn::Conn;
use handoff_load::failure::{Failure, Kind};
use handoff_load::generator::{self, LoadConfig};

/// Reads one request (head, and a body by Content-Length); `None` at EOF.
fn read_request(r: &mut BufReader<TcpStream>) -> Option<(String, String, Vec<u8>)> {
    let mut line = String::new();
    if r.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_owned();
    let path = parts.next()?.to_owned();
    let mut len = 0;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).ok()? == 0 {
            return None;
        }
        if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().ok()?;
        }
        if h == "\r\n" {
            break;
        }
    }
    let mut body = vec![0; len];
    r.read_exact(&mut body).ok()?;
    Some((method, path, body))
}

/// Serves `handle` on every connection, each on a thread of its own.
fn serve(handle: impl Fn(BufReader<TcpStream>) + Send + Sync + 'static) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let handle = Arc::new(handle);
    thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(s) = s else { return };
            let handle = handle.clone();
            thread::spawn(move || handle(BufReader::new(s)));
        }
    });
    addr
}

/// A port nothing listens on (bound, then released).
fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

#[tokio::test]
async fn conn_reads_every_framing_and_classifies_cuts() {
    let script: Arc<Mutex<Vec<Vec<&'static str>>>> = Arc::new(Mutex::new(vec![
        // Conn 3: 204, then a cut response.
        vec![
            "HTTP/1.1 204 No Content\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc",
        ],
        // Conn 2: an interim 100, then a chunked response saying close.
        vec!["HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\nX-Pid: 9\r\n\r\n3\r\nabc\r\n0\r\n\r\n"],
        // Conn 1: one keep-alive response, then an idle close.
        vec!["HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"],
    ]));
    let addr = serve(move |mut r| {
        let responses = script.lock().unwrap().pop().unwrap_or_default();
        for resp in responses {
            if read_request(&mut r).is_none() {
                return;
            }
            r.get_mut().write_all(resp.as_bytes()).unwrap();
        }
        // An orderly close, reading what the client still sends.
        let s = r.into_inner();
        let _ = s.shutdown(std::net::Shutdown::Write);
        let _ = (&s).read_to_end(&mut Vec::new());
    });

    let mut c = Conn::connect(addr).await.unwrap();
    let r = c.request(false).await.unwrap();
    assert_eq!(
        (r.status, r.body.as_slice(), r.close),
        (200, &b"ok"[..], false)
    );
    assert!(c.is_reused());
    // Closed while idle: the benign EOF, on a reused connection.
    assert_eq!(
        c.send("GET", "/b", None, false).await.unwrap_err(),
        Failure::EofBeforeResponse
    );

    let mut c = Conn::connect(addr).await.unwrap();
    let r = c.send("PUT", "/c", Some(b"value"), false).await.unwrap();
    assert_eq!(
        (r.status, r.body.as_slice(), r.close, r.pid),
        (200, &b"abc"[..], true, 9)
    );

    let mut c = Conn::connect(addr).await.unwrap();
    assert_eq!(c.request(false).await.unwrap().status, 204);
    assert_eq!(c.request(false).await.unwrap_err(), Failure::EofMidResponse);

    assert_eq!(
        Conn::connect(free_port()).await.unwrap_err(),
        Failure::Refused
    );
}

/// `GET /` load: every answer a sample with the pid that gave it; a server
/// that closes every third response makes keep-alive clients reconnect,
/// counted as such, and nothing fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_are_sampled_and_reconnects_counted() {
    let addr = serve(|mut r| {
        for i in 1.. {
            if read_request(&mut r).is_none() {
                return;
            }
            let close = if i % 3 == 0 {
                "Connection: close\r\n"
            } else {
                ""
            };
            let resp = format!("HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Pid: 7\r\n{close}\r\nok");
            if r.get_mut().write_all(resp.as_bytes()).is_err() || !close.is_empty() {
                return;
            }
        }
    });
    let cfg = LoadConfig {
        addrs: vec![addr],
        keepalive: 2,
        fresh: 1,
        idle_holders: 0,
        duration: Duration::from_millis(300),
        timeout: Duration::from_secs(5),
    };
    let run = generator::run(cfg, Instant::now(), Default::default()).await;
    assert!(run.failures.is_empty(), "{:?}", run.details);
    assert!(run.samples.len() > 10, "{} answers", run.samples.len());
    assert!(run.samples.iter().all(|s| s.pid == 7));
    assert!(run
        .samples
        .windows(2)
        .all(|w| w[0].start_us <= w[1].start_us));
    assert_eq!(run.sticky_clients, 2);
    assert!(
        run.reconnects > 0,
        "the keep-alive clients never reconnected"
    );
    assert_eq!(run.stale_retries, 0);
}

/// Nothing listening: every request is refused, and says so.
#[tokio::test]
async fn a_closed_port_is_refused() {
    let cfg = LoadConfig {
        addrs: vec![free_port()],
        keepalive: 1,
        fresh: 1,
        idle_holders: 0,
        duration: Duration::from_millis(100),
        timeout: Duration::from_secs(5),
    };
    let run = generator::run(cfg, Instant::now(), Default::default()).await;
    assert!(run.samples.is_empty());
    assert!(!run.failures.is_empty());
    assert!(run.failures.iter().all(|f| f.kind == Kind::Refused));
    assert!(
        run.details[0].contains("connection refused (on a fresh connection)"),
        "{:?}",
        run.details
    );
}

/// The key-value load against a small store: writes acknowledged, read back
/// byte for byte while it runs and once it has stopped; none lost.
#[test]
fn key_value_load_and_read_back() {
    let store: Arc<Mutex<HashMap<String, Vec<u8>>>> = Arc::default();
    let addr = serve(move |mut r| {
        while let Some((method, path, body)) = read_request(&mut r) {
            let (status, body) = match method.as_str() {
                "PUT" => {
                    store.lock().unwrap().insert(path, body);
                    ("201 Created", Vec::new())
                }
                _ => match store.lock().unwrap().get(&path) {
                    Some(v) => ("200 OK", v.clone()),
                    None => ("404 Not Found", Vec::new()),
                },
            };
            let mut resp = format!(
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )
            .into_bytes();
            resp.extend_from_slice(&body);
            if r.get_mut().write_all(&resp).is_err() {
                return;
            }
        }
    });
    let load = Load::start(addr, 2, 2).unwrap();
    assert!(
        load.wait_for_ok(300, Duration::from_secs(20)),
        "{}",
        load.snapshot()
    );
    let report = load.stop();
    assert_eq!(report.failure_count(), 0, "{report}");
    assert!(report.ok >= 300, "{report}");
    assert!(!report.acked.is_empty(), "{report}");
    assert_eq!(verify_acked(addr, &report.acked), Vec::<String>::new());
}
