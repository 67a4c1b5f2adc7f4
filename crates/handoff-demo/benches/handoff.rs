//! Handoff time for `handoff-demo`, phase by phase, next to its floor.
//!
//! `cargo bench -p handoff-demo --bench handoff [-- --handoffs N]`
//!
//! Drives the library's supervisor in-process against the real (release)
//! `handoff-demo` binary with no drain work, and measures in the same run:
//! * the floor: spawning a trivial Rust binary to completion
//!   (`handoff-demo --help`), plus one Unix socketpair round trip per
//!   protocol exchange of a handoff;
//! * each phase and the total of N consecutive handoffs (median, p99).
//!
//! Prints a Markdown table for BENCHMARKS.md.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use handoff::{HandoffOptions, Listener, Program, Supervisor, SupervisorConfig, SupervisorPhase};

/// Request/reply exchanges in one handoff: Hello/HelloAck with each peer,
/// Prepare/Drained, Seal/SealComplete, Begin/Ready, Commit (counted once).
const EXCHANGES: u32 = 6;

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i]
}

fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1000.0)
}

fn spawn_floor(bin: &PathBuf, n: usize) -> Vec<Duration> {
    (0..n)
        .map(|_| {
            let t = Instant::now();
            let out = Command::new(bin).arg("--help").output().expect("spawn");
            assert!(out.status.success());
            t.elapsed()
        })
        .collect()
}

fn socketpair_rtt(n: usize) -> Vec<Duration> {
    let (mut a, mut b) = UnixStream::pair().unwrap();
    let echo = std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while let Ok(()) = b.read_exact(&mut buf) {
            if b.write_all(&buf).is_err() {
                break;
            }
        }
    });
    let mut buf = [0u8; 64];
    let out = (0..n)
        .map(|_| {
            let t = Instant::now();
            a.write_all(&buf).unwrap();
            a.read_exact(&mut buf).unwrap();
            t.elapsed()
        })
        .collect();
    drop(a);
    let _ = echo.join();
    out
}

fn main() {
    let mut handoffs = 60usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--handoffs" {
            handoffs = args.next().and_then(|v| v.parse().ok()).unwrap_or(handoffs);
        }
    }
    let demo = PathBuf::from(env!("CARGO_BIN_EXE_handoff-demo"));
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
    let cfg = SupervisorConfig::new(&state, dir.path().join("control.sock"));
    let sup = Supervisor::new(
        cfg,
        vec![Listener {
            name: "http".into(),
            fd: tcp.into(),
        }],
    )
    .expect("supervisor");
    let program = Program::new(&demo);
    sup.start(&program, &mut |_| {}).expect("first incumbent");

    // Warm the page cache and the binary once.
    let _ = spawn_floor(&demo, 5);

    let phases = [
        SupervisorPhase::Negotiating,
        SupervisorPhase::Draining,
        SupervisorPhase::Sealing,
        SupervisorPhase::AwaitingReady,
        SupervisorPhase::Committed,
    ];
    let mut per_phase: Vec<Vec<Duration>> = vec![vec![]; phases.len()];
    let mut totals = vec![];
    let mut spawn = vec![];
    eprint!("handoffs: ");
    for i in 0..handoffs {
        let r = sup
            .perform_handoff(&program, HandoffOptions::default(), &mut |_| {})
            .expect("handoff");
        for p in &r.phases {
            if let Some(k) = phases.iter().position(|q| *q == p.phase) {
                per_phase[k].push(p.took);
            }
        }
        totals.push(r.total);
        // Interleaved, so floor and handoff see the same machine state.
        spawn.extend(spawn_floor(&demo, 1));
        if i % 10 == 9 {
            eprint!("{} ", i + 1);
        }
    }
    eprintln!();
    let mut rtt = socketpair_rtt(10_000);
    let spawn_med = pct(&mut spawn, 0.5);
    let rtt_med = pct(&mut rtt, 0.5);
    let floor = spawn_med + rtt_med * EXCHANGES;

    println!("| measurement | median ms | p99 ms |");
    println!("|---|---:|---:|");
    println!(
        "| floor: spawn `handoff-demo --help` to exit | {} | {} |",
        ms(spawn_med),
        ms(pct(&mut spawn, 0.99))
    );
    println!(
        "| floor: socketpair round trip | {} | {} |",
        ms(rtt_med),
        ms(pct(&mut rtt, 0.99))
    );
    println!(
        "| **floor: spawn + {EXCHANGES} round trips** | **{}** | |",
        ms(floor)
    );
    for (k, p) in phases.iter().enumerate() {
        let v = &mut per_phase[k];
        println!(
            "| phase {} | {} | {} |",
            p.name(),
            ms(pct(v, 0.5)),
            ms(pct(v, 0.99))
        );
    }
    let med = pct(&mut totals, 0.5);
    println!(
        "| **handoff total ({handoffs} handoffs)** | **{}** | **{}** |",
        ms(med),
        ms(pct(&mut totals, 0.99))
    );
    println!();
    println!(
        "median total / floor = {:.2}x (target < 3x)",
        med.as_secs_f64() / floor.as_secs_f64()
    );
    if let Some(c) = sup.incumbent() {
        let _ = c.kill_and_reap(Duration::from_secs(5));
    }
}
