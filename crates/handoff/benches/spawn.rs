//! Spawn benchmark: time from "start a child" until its `execve` has
//! succeeded, for a trivial binary, at the bench's own RSS and again after
//! touching 64 MiB more (fork's cost grows with the parent's page tables,
//! the vfork-style start's does not).
//!
//! ```sh
//! cargo bench -p handoff --bench spawn            # 500 spawns per row, ~10 s
//! cargo bench -p handoff --bench spawn -- --quick # 50 per row
//! ```
//!
//! Rows:
//! - `ExecPlan vfork`: what `spawn` uses on Linux, clone(CLONE_VM|CLONE_VFORK).
//! - `ExecPlan fork`: the same child body started with plain fork (raw
//!   fork + exec, with the same fd/env handling and error pipe).
//! - `std Command`: std::process::Command::spawn (glibc posix_spawn).
//! - `spawn_activated`: the library's public spawn, which adds PATH/env
//!   preparation and the reaper thread of `Child::adopt` (paced 2 ms apart,
//!   see there).
//!
//! Each row spawns `/usr/bin/true` (or `/bin/true`) and reaps it outside
//! the timed region. The supervisor is multi-threaded; four idle threads
//! stand in for its runtime.

use std::ffi::OsStr;
use std::hint::black_box;
use std::path::Path;
use std::time::{Duration, Instant};

use handoff::spawn::{spawn_activated, Program};

// The spawn path itself, compiled into the bench: `sys` is private to the
// library and `Start::Fork` is not what `spawn` picks on Linux. (In test
// mode, e.g. clippy --all-targets, its test module comes along without its
// #[test] functions, leaving helpers and imports unused.)
#[allow(dead_code, unused_imports, unsafe_code)]
#[path = "../src/sys/exec.rs"]
mod exec;

use exec::{ExecPlan, Start};

fn reap(pid: u32) {
    let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid as i32), None);
}

/// Median and p90 in microseconds of `n` timed runs of `f` (after a short
/// warm-up); `f` returns the time it wants counted.
fn measure(n: usize, mut f: impl FnMut() -> Duration) -> (f64, f64) {
    for _ in 0..n / 10 + 1 {
        f();
    }
    let mut t: Vec<Duration> = (0..n).map(|_| f()).collect();
    t.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    (us(t[n / 2]), us(t[n * 9 / 10]))
}

fn rows(n: usize, bin: &Path, rss: &str) {
    let env = [(b"PATH".to_vec(), b"/usr/bin:/bin".to_vec())];
    let mut plan = ExecPlan::new(bin, &[], &env, true, vec![]).expect("plan");
    let report = |name: &str, (p50, p90): (f64, f64)| {
        println!("| {name} | {rss} | {p50:.1} | {p90:.1} |");
    };
    for (name, start) in [
        ("ExecPlan vfork", Start::Vfork),
        ("ExecPlan fork", Start::Fork),
    ] {
        report(
            name,
            measure(n, || {
                let t = Instant::now();
                let pid = plan.spawn_with(start).expect("spawn");
                let d = t.elapsed();
                reap(pid);
                d
            }),
        );
    }
    report(
        "std Command",
        measure(n, || {
            let t = Instant::now();
            let mut c = std::process::Command::new(bin).spawn().expect("spawn");
            let d = t.elapsed();
            let _ = c.wait();
            d
        }),
    );
    let program = Program::new(bin);
    report(
        "spawn_activated",
        measure(n, || {
            // Pacing, untimed: back to back, the new reaper thread is
            // created while the previous one is still exiting, which costs
            // ~0.6 ms more here; a supervisor spawns once per handoff.
            std::thread::sleep(Duration::from_millis(2));
            let t = Instant::now();
            let c = spawn_activated(&program, &[], &[]).expect("spawn");
            let d = t.elapsed();
            let _ = c.wait_timeout(Duration::from_secs(10));
            d
        }),
    );
}

fn rss_kib() -> String {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:").map(|v| v.trim().to_string()))
        })
        .unwrap_or_else(|| "?".into())
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let n = if quick { 50 } else { 500 };
    let bin = [Path::new("/usr/bin/true"), Path::new("/bin/true")]
        .into_iter()
        .find(|p| p.exists())
        .expect("no true(1) in /usr/bin or /bin");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let idle: Vec<_> = (0..4)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    std::thread::park_timeout(Duration::from_millis(50));
                }
            })
        })
        .collect();
    println!(
        "spawn until exec done, {n} spawns per row, {}",
        bin.display()
    );
    println!("| method | RSS | median µs | p90 µs |");
    println!("|---|---|---|---|");
    rows(n, bin, &rss_kib());
    let ballast = vec![1u8; 64 << 20];
    black_box(&ballast);
    rows(n, bin, &rss_kib());
    drop(ballast);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in idle {
        let _ = t.join();
    }
    black_box(OsStr::new(""));
}
