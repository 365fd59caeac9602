//! The workers this router sends requests to: a static list of prefill and decode endpoints, each with a lazily
//! connected channel, a count of requests this router has in flight there, the last load report, and a health flag
//! kept by a poller that asks each worker for that report. A worker that names blocks differently from this router
//! (block size or hash seed) is refused: its cache could never match a prompt.
//!
//! [`Workers::choose`] turns all of it, with the prefix index, into the policy's candidates; the choice itself is
//! the pure policy code in [`crate::policy`].

use crate::index::{PrefixIndex, WorkerId};
use crate::policy::{Candidate, Decision, Load, Policy, RequestShape};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tandem_engine::kv::{BlockHash, HashSeed};
use tandem_proto::v1;
use tonic::transport::{Channel, Endpoint};

/// A worker's gRPC endpoint, `http://host:port`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WorkerEndpoint(pub String);

impl std::fmt::Display for WorkerEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerRole {
    Prefill,
    Decode,
}

/// How blocks are named: tokens per block and the hash chain's seed. Router and workers must agree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockNaming {
    pub block_size: usize,
    pub seed: HashSeed,
}

impl Default for BlockNaming {
    fn default() -> Self {
        Self {
            block_size: 16,
            seed: HashSeed::default(),
        }
    }
}

pub struct Worker {
    pub id: WorkerId,
    pub endpoint: WorkerEndpoint,
    pub role: WorkerRole,
    pub channel: Channel,
    inflight: AtomicUsize,
    healthy: AtomicBool,
    /// Set once the worker has answered at least once.
    seen: AtomicBool,
    report: Mutex<Option<v1::LoadReport>>,
}

impl Worker {
    /// Takes the worker out of routing until its next successful load poll.
    pub fn mark_unhealthy(&self) {
        self.healthy.store(false, Ordering::Relaxed);
    }

    /// KV blocks the worker announced, once it has reported.
    pub fn capacity_blocks(&self) -> Option<usize> {
        self.report().map(|r| r.kv_blocks_total as usize)
    }

    fn report(&self) -> Option<v1::LoadReport> {
        *self.report.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The policy's view: the last report, with this router's own requests counted until the next report sees them.
    fn candidate(&self, cached: &HashMap<WorkerId, usize>) -> Candidate {
        let reported = self.report();
        let known = reported.is_some();
        let r = reported.unwrap_or_default();
        let inflight = self.inflight.load(Ordering::Relaxed) as u32;
        let total = r.running_requests + r.waiting_requests;
        Candidate {
            id: self.id,
            healthy: self.healthy.load(Ordering::Relaxed),
            cached_blocks: cached.get(&self.id).copied().unwrap_or(0),
            load: Load {
                running: r.running_requests,
                waiting: total.max(inflight) - r.running_requests,
                queued_prefill_tokens: r.queued_prefill_tokens,
                kv_blocks_free: if known {
                    r.kv_blocks_free + r.kv_blocks_cached
                } else {
                    u32::MAX
                },
            },
        }
    }
}

/// The workers a request goes to, holding their leases.
pub struct Choice {
    pub decode: Lease,
    pub prefill: Option<Lease>,
    pub decision: Decision,
}

/// Counts a request against a worker until dropped.
pub struct Lease {
    pub worker: Arc<Worker>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.worker.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

pub struct Workers {
    pub prefill: Vec<Arc<Worker>>,
    pub decode: Vec<Arc<Worker>>,
    pub naming: BlockNaming,
}

impl Workers {
    /// Builds the pool (decode workers get ids `0..`, prefill workers the ids after them); fails on an endpoint
    /// that is not a valid URI.
    pub fn new(
        prefill: &[WorkerEndpoint],
        decode: &[WorkerEndpoint],
        naming: BlockNaming,
    ) -> Result<Self, String> {
        let next_id = std::cell::Cell::new(0u32);
        let make = |e: &WorkerEndpoint, role| -> Result<Arc<Worker>, String> {
            let channel = Endpoint::from_shared(e.0.clone())
                .map_err(|err| format!("worker endpoint {e}: {err}"))?
                .tcp_nodelay(true)
                .connect_timeout(Duration::from_secs(2))
                .connect_lazy();
            let id = WorkerId(next_id.get());
            next_id.set(id.0 + 1);
            Ok(Arc::new(Worker {
                id,
                report: Mutex::new(None),
                endpoint: e.clone(),
                role,
                channel,
                inflight: AtomicUsize::new(0),
                // Assume healthy until a poll says otherwise, so the first request need not wait for a poll.
                healthy: AtomicBool::new(true),
                seen: AtomicBool::new(false),
            }))
        };
        let decode = decode
            .iter()
            .map(|e| make(e, WorkerRole::Decode))
            .collect::<Result<_, _>>()?;
        let prefill = prefill
            .iter()
            .map(|e| make(e, WorkerRole::Prefill))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            prefill,
            decode,
            naming,
        })
    }

    /// Every worker, decode first.
    pub fn all(&self) -> impl Iterator<Item = &Arc<Worker>> {
        self.decode.iter().chain(&self.prefill)
    }

    /// Asks the policy where a prompt with these block hashes goes and takes leases on the chosen workers;
    /// `None` when no decode worker is healthy.
    pub fn choose(
        &self,
        policy: &Mutex<Policy>,
        index: &Mutex<PrefixIndex>,
        shape: &RequestShape,
        hashes: &[BlockHash],
    ) -> Option<Choice> {
        let mut matches = Vec::new();
        index
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .matches(hashes, &mut matches);
        let cached: HashMap<WorkerId, usize> = matches.into_iter().collect();
        let decode: Vec<Candidate> = self.decode.iter().map(|w| w.candidate(&cached)).collect();
        let prefill: Vec<Candidate> = self.prefill.iter().map(|w| w.candidate(&cached)).collect();
        let decision = policy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .decide(shape, &decode, &prefill)?;
        let lease = |w: &Arc<Worker>| {
            w.inflight.fetch_add(1, Ordering::Relaxed);
            Lease { worker: w.clone() }
        };
        Some(Choice {
            decode: lease(&self.decode[decision.decode]),
            prefill: decision.prefill.map(|p| lease(&self.prefill[p])),
            decision,
        })
    }

    /// Every worker has answered a load request at least once.
    pub fn all_seen(&self) -> bool {
        self.prefill
            .iter()
            .chain(&self.decode)
            .all(|w| w.seen.load(Ordering::Relaxed))
    }

    /// Asks every worker for its load once; a worker that does not answer within `timeout`, or names blocks
    /// differently from this router, is marked unhealthy.
    pub async fn poll_once(&self, timeout: Duration) {
        for w in self.all() {
            let report = match w.role {
                WorkerRole::Prefill => {
                    let mut c =
                        v1::prefill_worker_client::PrefillWorkerClient::new(w.channel.clone());
                    tokio::time::timeout(timeout, c.load(v1::LoadRequest {})).await
                }
                WorkerRole::Decode => {
                    let mut c =
                        v1::decode_worker_client::DecodeWorkerClient::new(w.channel.clone());
                    tokio::time::timeout(timeout, c.load(v1::LoadRequest {})).await
                }
            };
            let report = report.ok().and_then(|r| r.ok()).map(|r| r.into_inner());
            let ok = match &report {
                Some(r) => match self.naming_mismatch(r) {
                    Some(why) => {
                        if w.healthy.load(Ordering::Relaxed) || !w.seen.load(Ordering::Relaxed) {
                            tracing::error!(endpoint = %w.endpoint, "refusing worker: {why}");
                        }
                        false
                    }
                    None => true,
                },
                None => false,
            };
            if w.healthy.swap(ok, Ordering::Relaxed) != ok {
                tracing::warn!(endpoint = %w.endpoint, healthy = ok, "worker health changed");
            }
            if let Some(r) = report {
                w.seen.store(true, Ordering::Relaxed);
                *w.report.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
            }
        }
    }

    /// Why a worker's way of naming blocks cannot work with this router's, if it cannot.
    fn naming_mismatch(&self, r: &v1::LoadReport) -> Option<String> {
        let n = self.naming;
        (r.block_size as usize != n.block_size || r.hash_seed != n.seed.0).then(|| {
            format!(
                "it names KV blocks with block size {} and hash seed {:#x}; this router uses block size {} and seed {:#x}",
                r.block_size, r.hash_seed, n.block_size, n.seed.0
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_naming_blocks_differently_is_refused_with_both_namings() {
        let w = Workers::new(&[], &[], BlockNaming::default()).unwrap();
        let mut r = v1::LoadReport {
            block_size: 16,
            hash_seed: HashSeed::default().0,
            ..Default::default()
        };
        assert_eq!(w.naming_mismatch(&r), None);
        r.block_size = 32;
        let why = w.naming_mismatch(&r).unwrap();
        assert!(
            why.contains("block size 32") && why.contains("block size 16"),
            "{why}"
        );
    }
}
