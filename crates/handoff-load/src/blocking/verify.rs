//! The read-back at the end of a run: every acknowledged write, read again
//! with fresh GETs after the load has stopped, must be there, byte for byte.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::thread;

use super::client::Client;
use crate::failure::snippet;

/// What reading every acknowledged write back found.
#[derive(Debug, Clone, Default)]
pub struct VerifyReport {
    /// Acknowledged writes read back.
    pub checked: u64,
    /// 404: the write was acknowledged and then lost.
    pub missing: u64,
    /// Another status, or different bytes.
    pub wrong: u64,
    /// The GET itself failed (refused, reset, timeout…).
    pub failed: u64,
    /// Benign stale keep-alive retries during the read-back.
    pub stale_retries: u64,
    /// One description per problem, in key order.
    pub problems: Vec<String>,
}

impl VerifyReport {
    /// Acknowledged writes that are not intact (or could not be checked).
    pub fn problem_count(&self) -> u64 {
        self.missing + self.wrong + self.failed
    }

    fn merge(&mut self, other: VerifyReport) {
        self.checked += other.checked;
        self.missing += other.missing;
        self.wrong += other.wrong;
        self.failed += other.failed;
        self.stale_retries += other.stale_retries;
        self.problems.extend(other.problems);
    }
}

/// Reads every acknowledged write back (new GETs over a keep-alive client, after the load
/// has stopped) and returns a description of each one that is missing or differs.
pub fn verify_acked(addr: SocketAddr, acked: &HashMap<String, Vec<u8>>) -> Vec<String> {
    verify_acked_with(addr, acked, 1, u32::MAX).problems
}

/// [`verify_acked`] with `threads` keep-alive clients reading disjoint sets of keys in
/// parallel, and the problems counted by kind. A client gives up after `give_up_after`
/// consecutive failed requests (a dead or wedged server would otherwise cost a timeout per
/// key) and counts the keys it did not check as failed, with one description for them.
pub fn verify_acked_with(
    addr: SocketAddr,
    acked: &HashMap<String, Vec<u8>>,
    threads: usize,
    give_up_after: u32,
) -> VerifyReport {
    let mut keys: Vec<&String> = acked.keys().collect();
    keys.sort();
    let threads = threads.clamp(1, keys.len().max(1));
    let chunk = keys.len().div_ceil(threads).max(1);
    let mut total = VerifyReport::default();
    thread::scope(|s| {
        let mut handles = Vec::new();
        for part in keys.chunks(chunk) {
            let spawned = thread::Builder::new()
                .name("verify".into())
                .spawn_scoped(s, move || verify_keys(addr, acked, part, give_up_after));
            match spawned {
                Ok(h) => handles.push(h),
                // No thread to be had: check this part here instead.
                Err(_) => total.merge(verify_keys(addr, acked, part, give_up_after)),
            }
        }
        for h in handles {
            match h.join() {
                Ok(part) => total.merge(part),
                Err(_) => {
                    total.failed += 1;
                    total.problems.push("a verification thread panicked".into());
                }
            }
        }
    });
    total.problems.sort();
    total
}

/// One reader's part of [`verify_acked_with`].
fn verify_keys(
    addr: SocketAddr,
    acked: &HashMap<String, Vec<u8>>,
    keys: &[&String],
    give_up_after: u32,
) -> VerifyReport {
    let mut client = Client::new(addr, true);
    let mut report = VerifyReport::default();
    let mut consecutive_failures = 0;
    for (i, &key) in keys.iter().enumerate() {
        if consecutive_failures >= give_up_after {
            let left = (keys.len() - i) as u64;
            report.checked += left;
            report.failed += left;
            report.problems.push(format!(
                "{left} more acknowledged writes not checked after {consecutive_failures} \
                 consecutive failed requests"
            ));
            break;
        }
        let Some(want) = acked.get(key) else { continue };
        let path = format!("/kv/{key}");
        report.checked += 1;
        match client.get(&path) {
            Ok(resp) if resp.status == 200 && resp.body == *want => consecutive_failures = 0,
            Ok(resp) => {
                consecutive_failures = 0;
                if resp.status == 404 {
                    report.missing += 1;
                } else {
                    report.wrong += 1;
                }
                report.problems.push(format!(
                    "GET {path}: status {}, {} bytes {:?}; expected 200 with {} bytes {:?}",
                    resp.status,
                    resp.body.len(),
                    snippet(&resp.body),
                    want.len(),
                    snippet(want)
                ));
            }
            Err(e) => {
                consecutive_failures += 1;
                report.failed += 1;
                report.problems.push(format!("GET {path}: {e}"));
            }
        }
    }
    report.stale_retries = client.stale_retries;
    report
}
