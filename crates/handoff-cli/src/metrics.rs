//! `handoff run --metrics ADDR`: a Prometheus endpoint.
//!
//! Counters and histograms live in one mutex-guarded struct: they change a
//! handful of times per upgrade, so contention is nil and a scrape sees a
//! consistent snapshot (a histogram's `_count` always equals its `+Inf`
//! bucket). The endpoint is a deliberately small HTTP/1.0-style responder
//! on a std `TcpListener` — one request per connection, read and write
//! timeouts so a client that connects and says nothing cannot pin it, and
//! no dependency on an HTTP stack the supervisor otherwise does not need.
//!
//! Exposed (text format 0.0.4):
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `handoff_upgrades_total` | counter | `outcome` = committed, aborted, refused |
//! | `handoff_upgrade_duration_seconds` | histogram | `outcome` |
//! | `handoff_phase_duration_seconds` | histogram | `phase` (negotiating, draining, sealing, awaiting-ready, …) |
//! | `handoff_incumbent_restarts_total` | counter | — (crash restarts outside a handoff) |
//! | `handoff_incumbent_pid` | gauge | — |
//! | `handoff_supervisor_start_time_seconds` | gauge | — (Unix time) |

use handoff::accept::{AcceptBackoff, Verdict};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Upper bounds of the duration buckets, in seconds: sub-millisecond
/// phases (drain, seal on a warm service) up to the 5-minute default
/// deadline.
const BUCKETS: [f64; 17] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 300.0,
];

#[derive(Debug, Clone, Default)]
struct Histogram {
    /// Non-cumulative counts per bucket; the last slot is +Inf.
    counts: [u64; BUCKETS.len() + 1],
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, secs: f64) {
        let i = BUCKETS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(BUCKETS.len());
        self.counts[i] += 1;
        self.sum += secs;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, label: &str) {
        let mut cum = 0;
        for (i, c) in self.counts.iter().enumerate() {
            cum += c;
            let le = BUCKETS
                .get(i)
                .map(|b| b.to_string())
                .unwrap_or_else(|| "+Inf".into());
            let _ = writeln!(out, "{name}_bucket{{{label},le=\"{le}\"}} {cum}");
        }
        let _ = writeln!(out, "{name}_sum{{{label}}} {}", self.sum);
        let _ = writeln!(out, "{name}_count{{{label}}} {}", self.count);
    }
}

/// Outcome of one upgrade request, as counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    Committed,
    Aborted,
    /// Not attempted: another was in flight, no incumbent, stopping.
    Refused,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Committed => "committed",
            Outcome::Aborted => "aborted",
            Outcome::Refused => "refused",
        }
    }
}

#[derive(Debug, Default)]
struct State {
    upgrades: BTreeMap<Outcome, u64>,
    upgrade_secs: BTreeMap<Outcome, Histogram>,
    phase_secs: BTreeMap<&'static str, Histogram>,
    restarts: u64,
    incumbent_pid: Option<u32>,
}

/// The supervisor's metrics; cheap to clone (shared).
#[derive(Debug, Clone)]
pub struct Metrics {
    state: Arc<Mutex<State>>,
    started: f64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let started = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        Metrics {
            state: Arc::new(Mutex::new(State::default())),
            started,
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        // A panic while holding the lock leaves plain counters behind:
        // still the best numbers we have, so keep serving them.
        f(&mut self.state.lock().unwrap_or_else(PoisonError::into_inner))
    }

    pub fn phase(&self, phase: &'static str, took: Duration) {
        self.with(|s| {
            s.phase_secs
                .entry(phase)
                .or_default()
                .observe(took.as_secs_f64())
        });
    }

    pub fn upgrade(&self, outcome: Outcome, took: Duration) {
        self.with(|s| {
            *s.upgrades.entry(outcome).or_default() += 1;
            if outcome != Outcome::Refused {
                s.upgrade_secs
                    .entry(outcome)
                    .or_default()
                    .observe(took.as_secs_f64());
            }
        });
    }

    pub fn restart(&self) {
        self.with(|s| s.restarts += 1);
    }

    pub fn set_incumbent(&self, pid: Option<u32>) {
        self.with(|s| s.incumbent_pid = pid);
    }

    /// The exposition text.
    pub fn render(&self) -> String {
        let mut o = String::new();
        self.with(|s| {
            o += "# HELP handoff_upgrades_total Upgrade requests by outcome.\n";
            o += "# TYPE handoff_upgrades_total counter\n";
            for k in [Outcome::Committed, Outcome::Aborted, Outcome::Refused] {
                let n = s.upgrades.get(&k).copied().unwrap_or(0);
                let _ = writeln!(o, "handoff_upgrades_total{{outcome=\"{}\"}} {n}", k.label());
            }
            o += "# HELP handoff_upgrade_duration_seconds Upgrade time, request to commit or abort.\n";
            o += "# TYPE handoff_upgrade_duration_seconds histogram\n";
            for (k, h) in &s.upgrade_secs {
                let label = format!("outcome=\"{}\"", k.label());
                h.render(&mut o, "handoff_upgrade_duration_seconds", &label);
            }
            o += "# HELP handoff_phase_duration_seconds Time spent in each handoff phase.\n";
            o += "# TYPE handoff_phase_duration_seconds histogram\n";
            for (p, h) in &s.phase_secs {
                h.render(
                    &mut o,
                    "handoff_phase_duration_seconds",
                    &format!("phase=\"{p}\""),
                );
            }
            o += "# HELP handoff_incumbent_restarts_total Incumbents restarted after dying outside a handoff.\n";
            o += "# TYPE handoff_incumbent_restarts_total counter\n";
            let _ = writeln!(o, "handoff_incumbent_restarts_total {}", s.restarts);
            o += "# HELP handoff_incumbent_pid Pid of the serving process (0: none).\n";
            o += "# TYPE handoff_incumbent_pid gauge\n";
            let _ = writeln!(o, "handoff_incumbent_pid {}", s.incumbent_pid.unwrap_or(0));
        });
        o += "# HELP handoff_supervisor_start_time_seconds Start time of the supervisor, Unix seconds.\n";
        o += "# TYPE handoff_supervisor_start_time_seconds gauge\n";
        let _ = writeln!(o, "handoff_supervisor_start_time_seconds {}", self.started);
        o
    }

    /// Binds ADDR and serves `/metrics` from a background thread; returns
    /// the bound address (port 0 picks one).
    pub fn serve(&self, addr: SocketAddr) -> std::io::Result<SocketAddr> {
        let listener = TcpListener::bind(addr)?;
        let local = listener.local_addr()?;
        let me = self.clone();
        std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || {
                // EMFILE and the like: keep going after a growing pause
                // (retrying at once spins), logging at most every few
                // seconds; stop only if the socket itself is unusable.
                let mut backoff = AcceptBackoff::new();
                for conn in listener.incoming() {
                    match conn {
                        Ok(s) => {
                            if let Some(unsaid) = backoff.succeeded() {
                                tracing::info!(target: "handoff::metrics", unsaid, "accepting again");
                            }
                            me.answer(s)
                        }
                        Err(e) => match backoff.failed(&e) {
                            Verdict::Retry { say, suppressed } => {
                                if say {
                                    tracing::warn!(target: "handoff::metrics", error = %e, suppressed, "accept failed; retrying with backoff");
                                }
                            }
                            Verdict::Fatal => {
                                tracing::error!(target: "handoff::metrics", error = %e, "accept failed; the metrics endpoint stops");
                                return;
                            }
                        },
                    }
                }
            })?;
        Ok(local)
    }

    fn answer(&self, mut s: TcpStream) {
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
        // Only the request line matters; read up to the end of the
        // headers or 8 KiB, whichever comes first.
        let mut buf = [0u8; 8192];
        let mut n = 0;
        while n < buf.len() {
            match s.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => {
                    n += k;
                    if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
                Err(_) => return,
            }
        }
        let line = buf[..n].split(|&b| b == b'\n').next().unwrap_or(&[]);
        let line = String::from_utf8_lossy(line);
        let mut parts = line.split_whitespace();
        let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let (status, ctype, body) = match (method, path.split('?').next().unwrap_or("")) {
            ("GET", "/metrics") => ("200 OK", "text/plain; version=0.0.4", self.render()),
            ("GET", _) => ("404 Not Found", "text/plain", "try /metrics\n".to_string()),
            _ => (
                "405 Method Not Allowed",
                "text/plain",
                "only GET\n".to_string(),
            ),
        };
        let head = format!(
            "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        let _ = s.write_all(head.as_bytes());
        let _ = s.write_all(body.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative_and_consistent() {
        let m = Metrics::new();
        m.phase("draining", Duration::from_micros(300));
        m.phase("draining", Duration::from_millis(3));
        m.phase("draining", Duration::from_secs(400));
        let t = m.render();
        assert!(
            t.contains("handoff_phase_duration_seconds_bucket{phase=\"draining\",le=\"0.0005\"} 1"),
            "{t}"
        );
        assert!(
            t.contains("handoff_phase_duration_seconds_bucket{phase=\"draining\",le=\"0.005\"} 2"),
            "{t}"
        );
        assert!(
            t.contains("handoff_phase_duration_seconds_bucket{phase=\"draining\",le=\"300\"} 2"),
            "{t}"
        );
        assert!(
            t.contains("handoff_phase_duration_seconds_bucket{phase=\"draining\",le=\"+Inf\"} 3"),
            "{t}"
        );
        assert!(
            t.contains("handoff_phase_duration_seconds_count{phase=\"draining\"} 3"),
            "{t}"
        );
    }

    #[test]
    fn outcomes_counted_and_exposed_even_at_zero() {
        let m = Metrics::new();
        let t = m.render();
        assert!(
            t.contains("handoff_upgrades_total{outcome=\"committed\"} 0"),
            "{t}"
        );
        m.upgrade(Outcome::Committed, Duration::from_millis(2));
        m.upgrade(Outcome::Refused, Duration::ZERO);
        m.restart();
        m.set_incumbent(Some(42));
        let t = m.render();
        assert!(
            t.contains("handoff_upgrades_total{outcome=\"committed\"} 1"),
            "{t}"
        );
        assert!(
            t.contains("handoff_upgrades_total{outcome=\"refused\"} 1"),
            "{t}"
        );
        assert!(
            t.contains("handoff_upgrade_duration_seconds_count{outcome=\"committed\"} 1"),
            "{t}"
        );
        assert!(
            !t.contains("handoff_upgrade_duration_seconds_count{outcome=\"refused\"}"),
            "{t}"
        );
        assert!(t.contains("handoff_incumbent_restarts_total 1"), "{t}");
        assert!(t.contains("handoff_incumbent_pid 42"), "{t}");
    }

    #[test]
    fn endpoint_answers_get_and_refuses_the_rest() {
        let m = Metrics::new();
        m.upgrade(Outcome::Aborted, Duration::from_millis(7));
        let addr = m.serve("127.0.0.1:0".parse().unwrap()).unwrap();
        let ask = |req: &str| {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(req.as_bytes()).unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).unwrap();
            out
        };
        let r = ask("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 200 OK"), "{r}");
        assert!(
            r.contains("handoff_upgrades_total{outcome=\"aborted\"} 1"),
            "{r}"
        );
        assert!(ask("GET / HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404"));
        assert!(ask("POST /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 405"));
        // A client that sends a partial request and hangs up: the next
        // scrape is still answered.
        drop(TcpStream::connect(addr).unwrap());
        assert!(ask("GET /metrics HTTP/1.0\r\n\r\n").contains("handoff_incumbent_pid"));
    }
}
