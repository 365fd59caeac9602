//! The workers this router sends requests to: a static list of prefill and decode endpoints, each with a lazily
//! connected channel, a count of requests this router has in flight there, and a health flag kept by a poller
//! that asks each worker for its load report.
//!
//! The choice itself is [`least_loaded`], a pure function of a snapshot; the prefix-aware policy replaces it later.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;
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

pub struct Worker {
    pub endpoint: WorkerEndpoint,
    pub role: WorkerRole,
    pub channel: Channel,
    inflight: AtomicUsize,
    healthy: AtomicBool,
    /// Set once the worker has answered at least once.
    seen: AtomicBool,
}

/// What the policy sees of one worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerSnapshot {
    pub healthy: bool,
    pub inflight: usize,
}

/// Index of the healthy worker with the fewest requests in flight (the first among equals).
pub fn least_loaded(workers: &[WorkerSnapshot]) -> Option<usize> {
    workers
        .iter()
        .enumerate()
        .filter(|(_, w)| w.healthy)
        .min_by_key(|(i, w)| (w.inflight, *i))
        .map(|(i, _)| i)
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
}

impl Workers {
    /// Builds the pool; fails on an endpoint that is not a valid URI.
    pub fn new(prefill: &[WorkerEndpoint], decode: &[WorkerEndpoint]) -> Result<Self, String> {
        let make = |e: &WorkerEndpoint, role| -> Result<Arc<Worker>, String> {
            let channel = Endpoint::from_shared(e.0.clone())
                .map_err(|err| format!("worker endpoint {e}: {err}"))?
                .tcp_nodelay(true)
                .connect_timeout(Duration::from_secs(2))
                .connect_lazy();
            Ok(Arc::new(Worker {
                endpoint: e.clone(),
                role,
                channel,
                inflight: AtomicUsize::new(0),
                // Assume healthy until a poll says otherwise, so the first request need not wait for a poll.
                healthy: AtomicBool::new(true),
                seen: AtomicBool::new(false),
            }))
        };
        Ok(Self {
            prefill: prefill
                .iter()
                .map(|e| make(e, WorkerRole::Prefill))
                .collect::<Result<_, _>>()?,
            decode: decode
                .iter()
                .map(|e| make(e, WorkerRole::Decode))
                .collect::<Result<_, _>>()?,
        })
    }

    fn pick(list: &[Arc<Worker>]) -> Option<Lease> {
        let snap: Vec<WorkerSnapshot> = list
            .iter()
            .map(|w| WorkerSnapshot {
                healthy: w.healthy.load(Ordering::Relaxed),
                inflight: w.inflight.load(Ordering::Relaxed),
            })
            .collect();
        let i = least_loaded(&snap)?;
        list[i].inflight.fetch_add(1, Ordering::Relaxed);
        Some(Lease {
            worker: list[i].clone(),
        })
    }

    pub fn pick_decode(&self) -> Option<Lease> {
        Self::pick(&self.decode)
    }
    pub fn pick_prefill(&self) -> Option<Lease> {
        Self::pick(&self.prefill)
    }

    /// Every worker has answered a load request at least once.
    pub fn all_seen(&self) -> bool {
        self.prefill
            .iter()
            .chain(&self.decode)
            .all(|w| w.seen.load(Ordering::Relaxed))
    }

    /// Asks every worker for its load once; a worker that does not answer within `timeout` is marked unhealthy.
    pub async fn poll_once(&self, timeout: Duration) {
        for w in self.prefill.iter().chain(&self.decode) {
            let ok = match w.role {
                WorkerRole::Prefill => {
                    let mut c =
                        v1::prefill_worker_client::PrefillWorkerClient::new(w.channel.clone());
                    tokio::time::timeout(timeout, c.load(v1::LoadRequest {}))
                        .await
                        .is_ok_and(|r| r.is_ok())
                }
                WorkerRole::Decode => {
                    let mut c =
                        v1::decode_worker_client::DecodeWorkerClient::new(w.channel.clone());
                    tokio::time::timeout(timeout, c.load(v1::LoadRequest {}))
                        .await
                        .is_ok_and(|r| r.is_ok())
                }
            };
            if w.healthy.swap(ok, Ordering::Relaxed) != ok {
                tracing::warn!(endpoint = %w.endpoint, healthy = ok, "worker health changed");
            }
            if ok {
                w.seen.store(true, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn least_loaded_skips_unhealthy_and_breaks_ties_by_order() {
        let w = |healthy, inflight| WorkerSnapshot { healthy, inflight };
        assert_eq!(least_loaded(&[]), None);
        assert_eq!(least_loaded(&[w(false, 0)]), None);
        assert_eq!(least_loaded(&[w(true, 3), w(true, 1), w(true, 1)]), Some(1));
        assert_eq!(least_loaded(&[w(false, 0), w(true, 5)]), Some(1));
    }
}
