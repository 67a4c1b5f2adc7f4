//! The key-value workload, against the demo service's API: each client PUTs
//! unique values and GETs values it wrote earlier, checking every byte, so
//! a server that refuses, cuts, loses or garbles anything is caught. Every
//! acknowledged write is kept (in [`Shared::acked`]) for the read-back at
//! the end.

use super::model::{Op, Req, Shared, Verdict};
use crate::conn::Resp;
use crate::failure::snippet;

/// The value written for request `n` of client `label`: unique (it starts with the key),
/// of varying length, and containing arbitrary bytes (NUL, CR, LF, 0xFF…) so that a server
/// that does not store and return exactly the bytes of the body is caught. Every 97th value
/// is 40 KiB, so some requests and responses span several TCP segments.
pub fn value_for(label: &str, n: u64) -> Vec<u8> {
    let mut v = format!("{label}-{n}:").into_bytes();
    let extra = if n.is_multiple_of(97) {
        40 * 1024
    } else {
        (n * 37 % 512) as usize
    };
    v.extend((0..extra as u64).map(|i| ((i * 131 + n * 7) % 256) as u8));
    v
}

/// One client's side of the workload.
#[derive(Debug)]
pub(super) struct KvClient {
    label: String,
    /// Requests made so far.
    n: u64,
    /// This client's acknowledged writes, to pick GET targets without
    /// locking the shared map.
    mine: Vec<(String, Vec<u8>)>,
    /// Small xorshift PRNG, seeded per client: which earlier key to read back.
    rng: u64,
}

impl KvClient {
    pub(super) fn new(label: &str) -> KvClient {
        KvClient {
            label: label.to_owned(),
            n: 0,
            mine: Vec::new(),
            rng: 0x9E37_79B9_7F4A_7C15
                ^ label
                    .bytes()
                    .fold(7u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64)),
        }
    }

    /// The next request: a PUT every other time (and until something was
    /// acknowledged), else a GET of an earlier acknowledged key.
    pub(super) fn next(&mut self) -> Req {
        self.n += 1;
        let n = self.n;
        if self.mine.is_empty() || n.is_multiple_of(2) {
            let key = format!("{}-{n}", self.label);
            Req {
                method: "PUT",
                path: format!("/kv/{key}"),
                body: Some(value_for(&self.label, n)),
                op: Op::Put { key },
            }
        } else {
            self.rng ^= self.rng << 13;
            self.rng ^= self.rng >> 7;
            self.rng ^= self.rng << 17;
            let index = (self.rng % self.mine.len() as u64) as usize;
            Req {
                method: "GET",
                path: format!("/kv/{}", self.mine[index].0),
                body: None,
                op: Op::Get { index },
            }
        }
    }

    /// Judges the answer to `req` (made by [`next`](Self::next)); an
    /// acknowledged PUT is remembered, here and in `shared`.
    pub(super) fn judge(&mut self, req: Req, resp: &Resp, shared: &Shared) -> Verdict {
        match req.op {
            Op::Put { key } if matches!(resp.status, 200 | 201 | 204) => {
                let value = req.body.unwrap_or_default();
                shared
                    .acked
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(key.clone(), value.clone());
                self.mine.push((key, value));
                Verdict::Answered
            }
            Op::Get { index } => {
                let Some((_, want)) = self.mine.get(index) else {
                    return Verdict::Mismatch("read back a key this client never wrote".into());
                };
                match resp.status {
                    200 if resp.body == *want => Verdict::Answered,
                    200 => Verdict::Mismatch(format!(
                        "body mismatch: {} bytes {:?}, expected {} bytes {:?}",
                        resp.body.len(),
                        snippet(&resp.body),
                        want.len(),
                        snippet(want)
                    )),
                    404 => Verdict::Mismatch("404 for an acknowledged write (lost)".into()),
                    _ => bad_status(resp),
                }
            }
            Op::Put { .. } | Op::Root => bad_status(resp),
        }
    }
}

fn bad_status(resp: &Resp) -> Verdict {
    Verdict::BadStatus(format!(
        "status {} body {:?}",
        resp.status,
        snippet(&resp.body)
    ))
}
