//! `handoff run --metrics ADDR`: a Prometheus endpoint — the metrics here,
//! the HTTP responder in [`endpoint`].
//!
//! The metrics are kept and encoded by the `prometheus` crate (text format
//! 0.0.4): its histograms give a scrape a consistent snapshot (`_count`
//! always equals the `+Inf` bucket) and its encoder does the escaping.
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

mod endpoint;

use prometheus::{
    Gauge, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Upper bounds of the duration buckets, in seconds: sub-millisecond
/// phases (drain, seal on a warm service) up to the 5-minute default
/// deadline.
const BUCKETS: [f64; 17] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 300.0,
];

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

/// The supervisor's metrics, kept and encoded by the `prometheus` crate;
/// cheap to clone (every handle is shared).
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    upgrades: IntCounterVec,
    upgrade_secs: HistogramVec,
    phase_secs: HistogramVec,
    restarts: IntCounter,
    incumbent_pid: IntGauge,
    /// The endpoint's accept loop, paused across a re-exec.
    gate: Arc<endpoint::Gate>,
}

impl Metrics {
    /// The metrics, registered and at zero. Fails only on a bad definition
    /// here (a name or label the crate refuses), which the unit tests
    /// exercise: nothing at run time can cause it.
    pub fn new() -> prometheus::Result<Metrics> {
        let registry = Registry::new();
        let upgrades = IntCounterVec::new(
            Opts::new("handoff_upgrades_total", "Upgrade requests by outcome."),
            &["outcome"],
        )?;
        let upgrade_secs = HistogramVec::new(
            HistogramOpts::new(
                "handoff_upgrade_duration_seconds",
                "Upgrade time, request to commit or abort.",
            )
            .buckets(BUCKETS.to_vec()),
            &["outcome"],
        )?;
        let phase_secs = HistogramVec::new(
            HistogramOpts::new(
                "handoff_phase_duration_seconds",
                "Time spent in each handoff phase.",
            )
            .buckets(BUCKETS.to_vec()),
            &["phase"],
        )?;
        let restarts = IntCounter::new(
            "handoff_incumbent_restarts_total",
            "Incumbents restarted after dying outside a handoff.",
        )?;
        let incumbent_pid = IntGauge::new(
            "handoff_incumbent_pid",
            "Pid of the serving process (0: none).",
        )?;
        let started = Gauge::new(
            "handoff_supervisor_start_time_seconds",
            "Start time of the supervisor, Unix seconds.",
        )?;
        started.set(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0),
        );
        // Every outcome is exposed from the start, at zero: a rate() over a
        // series that appears only at its first increment misses it.
        for o in [Outcome::Committed, Outcome::Aborted, Outcome::Refused] {
            upgrades.with_label_values(&[o.label()]);
        }
        registry.register(Box::new(upgrades.clone()))?;
        registry.register(Box::new(upgrade_secs.clone()))?;
        registry.register(Box::new(phase_secs.clone()))?;
        registry.register(Box::new(restarts.clone()))?;
        registry.register(Box::new(incumbent_pid.clone()))?;
        registry.register(Box::new(started))?;
        Ok(Metrics {
            registry,
            upgrades,
            upgrade_secs,
            phase_secs,
            restarts,
            incumbent_pid,
            gate: Arc::default(),
        })
    }

    pub fn phase(&self, phase: &'static str, took: Duration) {
        self.phase_secs
            .with_label_values(&[phase])
            .observe(took.as_secs_f64());
    }

    pub fn upgrade(&self, outcome: Outcome, took: Duration) {
        self.upgrades.with_label_values(&[outcome.label()]).inc();
        // A refusal took no time worth a histogram: nothing was attempted.
        if outcome != Outcome::Refused {
            self.upgrade_secs
                .with_label_values(&[outcome.label()])
                .observe(took.as_secs_f64());
        }
    }

    pub fn restart(&self) {
        self.restarts.inc();
    }

    pub fn set_incumbent(&self, pid: Option<u32>) {
        self.incumbent_pid.set(pid.map_or(0, i64::from));
    }

    /// Binds ADDR and serves `/metrics` from a background thread; returns
    /// the bound address (port 0 picks one). See [`endpoint`].
    pub fn serve(&self, addr: SocketAddr) -> std::io::Result<SocketAddr> {
        self.serve_listener(TcpListener::bind(addr)?)
    }

    /// [`serve`](Metrics::serve) on a listener already bound — the one a
    /// replaced supervisor carried across its `exec`.
    pub fn serve_listener(&self, listener: TcpListener) -> std::io::Result<SocketAddr> {
        let me = self.clone();
        endpoint::serve(listener, self.gate.clone(), Arc::new(move || me.render()))
    }

    /// Stops the endpoint accepting and waits, at most `within`, for the
    /// scrapes being answered (before a re-exec); accepting again when the
    /// result is dropped. At once when the endpoint is not served.
    pub fn quiesce(&self, within: Duration) -> endpoint::Quiet {
        self.gate.quiesce(within)
    }

    /// The exposition text (format 0.0.4, `prometheus::TEXT_FORMAT`).
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) = TextEncoder::new().encode_utf8(&self.registry.gather(), &mut out) {
            // Writing into a String cannot fail; the encoder's error type
            // is for other sinks. Say so rather than serve half a page.
            tracing::error!(target: "handoff::metrics", error = %e, "encoding the metrics failed");
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative_and_consistent() {
        let m = Metrics::new().unwrap();
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
        let m = Metrics::new().unwrap();
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

    use endpoint::{HEAD_BUDGET, MAX_HEAD, MAX_SCRAPES};
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::time::Instant;

    #[test]
    fn endpoint_answers_get_and_refuses_the_rest() {
        let m = Metrics::new().unwrap();
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

    /// [`MAX_HEAD`] bytes without the end of the head: 431.
    #[test]
    fn an_oversize_head_is_431() {
        let m = Metrics::new().unwrap();
        let addr = m.serve("127.0.0.1:0".parse().unwrap()).unwrap();
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut req = b"GET /metrics HTTP/1.1\r\nX-Pad: ".to_vec();
        // Exactly the cap: more would be left unread, and the server's
        // close would then reset the connection under the answer.
        req.resize(MAX_HEAD, b'a');
        s.write_all(&req).unwrap();
        let mut out = vec![];
        let _ = s.read_to_end(&mut out);
        let out = String::from_utf8_lossy(&out);
        assert!(out.starts_with("HTTP/1.1 431"), "{out}");
    }

    /// Connections past [`MAX_SCRAPES`] are answered 503 at once, not
    /// queued behind the silent ones; a slot freed serves again.
    #[test]
    fn connections_past_the_cap_are_503_at_once() {
        let m = Metrics::new().unwrap();
        let addr = m.serve("127.0.0.1:0".parse().unwrap()).unwrap();
        let silent: Vec<TcpStream> = (0..MAX_SCRAPES)
            .map(|_| TcpStream::connect(addr).unwrap())
            .collect();
        // The accept loop takes them in order: once one more is answered
        // 503, all the silent ones hold a slot.
        let t = Instant::now();
        // It sends nothing: the answer cannot depend on a request, and
        // unread bytes would make the server's close a reset.
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        assert!(out.starts_with("HTTP/1.1 503"), "{out}");
        assert!(t.elapsed() < HEAD_BUDGET, "{:?}", t.elapsed());
        drop(silent);
    }
}
