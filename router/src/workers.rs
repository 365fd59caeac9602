//! The workers this router sends requests to: prefill and decode endpoints that join and leave as discovery says
//! ([`crate::discovery`]), each with a lazily connected channel, a count of requests this router has in flight
//! there, the last load report, and a health flag kept by a poller that asks each worker for that report. A worker
//! that names blocks differently from this router (block size or hash seed) is refused: its cache could never
//! match a prompt.
//!
//! The pool is copy-on-write: a request reads one snapshot of the membership (an `Arc` of each list), so a worker
//! joining or leaving never moves an index the policy handed back. [`Workers::choose`] turns a snapshot, with the
//! prefix index, into the policy's candidates; the choice itself is the pure policy code in [`crate::policy`].

use crate::breaker::{Breaker, BreakerConfig};
use crate::index::{PrefixIndex, WorkerId};
use crate::policy::{Candidate, Decision, Load, Policy, RequestShape};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tandem_engine::kv::{BlockHash, HashSeed};
use tandem_proto::v1;
use tonic::transport::Channel;

/// A worker's gRPC endpoint, `http://host:port`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WorkerEndpoint(pub String);

impl std::fmt::Display for WorkerEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkerRole {
    Prefill,
    Decode,
}

impl WorkerRole {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Prefill => "prefill",
            Self::Decode => "decode",
        }
    }
}

/// How blocks are named: tokens per block and the hash chain's seed. Router and workers must agree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockNaming {
    pub block_size: usize,
    pub seed: HashSeed,
}

impl BlockNaming {
    /// Why a worker announcing `block_size` and `seed` cannot work with this naming, if it cannot.
    pub fn mismatch(&self, block_size: usize, seed: u64) -> Option<String> {
        (block_size != self.block_size || seed != self.seed.0).then(|| {
            format!(
                "it names KV blocks with block size {block_size} and hash seed {seed:#x}; this router uses block size {} and seed {:#x}",
                self.block_size, self.seed.0
            )
        })
    }
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
    /// Set when the worker leaves the pool; its prefix-index follower stops and drops its entries.
    retired: tokio::sync::watch::Sender<bool>,
    breaker: Mutex<Breaker>,
}

impl Worker {
    fn new(id: WorkerId, endpoint: &WorkerEndpoint, role: WorkerRole) -> Result<Self, String> {
        // HTTP/2 pings notice a worker host that vanished within about 20 s, so its streams fail over.
        let channel = tandem_prefill_node::channels::peer_endpoint(&endpoint.0)
            .map_err(|err| format!("worker endpoint {endpoint}: {err}"))?
            .connect_lazy();
        Ok(Self {
            id,
            endpoint: endpoint.clone(),
            role,
            channel,
            inflight: AtomicUsize::new(0),
            // Assume healthy until a poll says otherwise, so the first request need not wait for a poll.
            healthy: AtomicBool::new(true),
            seen: AtomicBool::new(false),
            report: Mutex::new(None),
            retired: tokio::sync::watch::channel(false).0,
            breaker: Mutex::new(Breaker::new(BreakerConfig::default())),
        })
    }

    fn breaker(&self) -> std::sync::MutexGuard<'_, Breaker> {
        self.breaker.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A request on this worker completed.
    pub fn succeeded(&self) {
        self.breaker().succeeded();
    }

    /// A request failed on this worker (not a refusal of bad input); enough in a row open its breaker.
    pub fn failed(&self) {
        if self.breaker().failed(Instant::now()) {
            tracing::warn!(endpoint = %self.endpoint, "circuit breaker open: no requests until a probe succeeds");
        }
    }

    /// Mean wall time of the worker's recent forward passes as it last reported, in microseconds.
    pub fn recent_step_us(&self) -> Option<u64> {
        self.report().map(|r| r.recent_step_us)
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Resolves once the worker has left the pool.
    pub async fn retired(&self) {
        let mut rx = self.retired.subscribe();
        let _ = rx.wait_for(|r| *r).await;
    }

    pub fn is_retired(&self) -> bool {
        *self.retired.borrow()
    }

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
            healthy: self.healthy.load(Ordering::Relaxed) && self.breaker().admits(Instant::now()),
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
    /// This request is the worker's half-open breaker probe.
    probe: bool,
}

impl Lease {
    fn take(worker: &Arc<Worker>) -> Self {
        worker.inflight.fetch_add(1, Ordering::Relaxed);
        Lease {
            worker: worker.clone(),
            probe: worker.breaker().dispatched(),
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.worker.inflight.fetch_sub(1, Ordering::Relaxed);
        if self.probe {
            self.worker.breaker().probe_abandoned();
        }
    }
}

/// One view of the membership.
#[derive(Clone, Default)]
pub struct Members {
    pub prefill: Arc<Vec<Arc<Worker>>>,
    pub decode: Arc<Vec<Arc<Worker>>>,
}

impl Members {
    /// Every worker, decode first.
    pub fn all(&self) -> impl Iterator<Item = &Arc<Worker>> {
        self.decode.iter().chain(self.prefill.iter())
    }
}

pub struct Workers {
    members: RwLock<Members>,
    /// Ids are never reused, so a worker that leaves and comes back starts a fresh prefix-index entry.
    next_id: AtomicU32,
    pub naming: BlockNaming,
}

impl Workers {
    /// An empty pool; workers join through [`Workers::add`].
    pub fn new(naming: BlockNaming) -> Self {
        Self {
            members: RwLock::new(Members::default()),
            next_id: AtomicU32::new(0),
            naming,
        }
    }

    /// The membership as it is now.
    pub fn members(&self) -> Members {
        self.members
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Every worker, decode first (a snapshot).
    pub fn all(&self) -> Vec<Arc<Worker>> {
        self.members().all().cloned().collect()
    }

    /// Adds a worker; `Ok(None)` when one with this endpoint is already in the pool (in either role), an error
    /// when the endpoint is not a valid URI.
    pub fn add(
        &self,
        endpoint: &WorkerEndpoint,
        role: WorkerRole,
    ) -> Result<Option<Arc<Worker>>, String> {
        let mut m = self.members.write().unwrap_or_else(|p| p.into_inner());
        if m.all().any(|w| &w.endpoint == endpoint) {
            return Ok(None);
        }
        let id = WorkerId(self.next_id.fetch_add(1, Ordering::Relaxed));
        let w = Arc::new(Worker::new(id, endpoint, role)?);
        let list = match role {
            WorkerRole::Prefill => &mut m.prefill,
            WorkerRole::Decode => &mut m.decode,
        };
        let mut next = Vec::clone(list);
        next.push(w.clone());
        *list = Arc::new(next);
        tracing::info!(%endpoint, role = role.as_str(), "worker joined");
        Ok(Some(w))
    }

    /// Removes the worker with this endpoint and retires it (requests already on it finish); `None` if absent.
    pub fn remove(&self, endpoint: &WorkerEndpoint) -> Option<Arc<Worker>> {
        let mut guard = self.members.write().unwrap_or_else(|p| p.into_inner());
        let m = &mut *guard;
        let mut gone = None;
        for list in [&mut m.prefill, &mut m.decode] {
            if let Some(i) = list.iter().position(|w| &w.endpoint == endpoint) {
                let mut next = Vec::clone(list);
                gone = Some(next.remove(i));
                *list = Arc::new(next);
            }
        }
        let w = gone?;
        w.retired.send_replace(true);
        tracing::info!(%endpoint, role = w.role.as_str(), "worker left");
        Some(w)
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
        let m = self.members();
        let decode: Vec<Candidate> = m.decode.iter().map(|w| w.candidate(&cached)).collect();
        let prefill: Vec<Candidate> = m.prefill.iter().map(|w| w.candidate(&cached)).collect();
        let decision = policy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .decide(shape, &decode, &prefill)?;
        Some(Choice {
            decode: Lease::take(&m.decode[decision.decode]),
            prefill: decision.prefill.map(|p| Lease::take(&m.prefill[p])),
            decision,
        })
    }

    /// Up to `n` other healthy prefill workers than `chosen`, least queued prefill first: where a decode worker
    /// turns when the chosen one is unavailable.
    pub fn prefill_alternates(&self, chosen: &Worker, n: usize) -> Vec<WorkerEndpoint> {
        let m = self.members();
        let mut others: Vec<(u64, &Arc<Worker>)> = m
            .prefill
            .iter()
            .filter(|w| w.id != chosen.id && w.is_healthy())
            .map(|w| (w.report().map_or(0, |r| r.queued_prefill_tokens), w))
            .collect();
        others.sort_by_key(|(queued, _)| *queued);
        others
            .into_iter()
            .take(n)
            .map(|(_, w)| w.endpoint.clone())
            .collect()
    }

    /// There is a decode worker and every worker has answered a load request at least once.
    pub fn all_seen(&self) -> bool {
        let m = self.members();
        !m.decode.is_empty() && m.all().all(|w| w.seen.load(Ordering::Relaxed))
    }

    /// Asks every worker for its load once; a worker that does not answer within `timeout`, or names blocks
    /// differently from this router, is marked unhealthy.
    pub async fn poll_once(&self, timeout: Duration) {
        for w in self.all() {
            if w.is_retired() {
                continue;
            }
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
        self.naming.mismatch(r.block_size as usize, r.hash_seed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_naming_blocks_differently_is_refused_with_both_namings() {
        let w = Workers::new(BlockNaming::default());
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

#[cfg(test)]
mod membership_tests {
    use super::*;

    fn ep(s: &str) -> WorkerEndpoint {
        WorkerEndpoint(s.to_string())
    }

    #[tokio::test]
    async fn workers_join_once_leave_retired_and_never_reuse_an_id() {
        let w = Workers::new(BlockNaming::default());
        let a = w
            .add(&ep("http://127.0.0.1:1"), WorkerRole::Decode)
            .unwrap()
            .unwrap();
        assert!(
            w.add(&ep("http://127.0.0.1:1"), WorkerRole::Prefill)
                .unwrap()
                .is_none()
        );
        let b = w
            .add(&ep("http://127.0.0.1:2"), WorkerRole::Prefill)
            .unwrap()
            .unwrap();
        let before = w.members();
        assert_eq!((before.decode.len(), before.prefill.len()), (1, 1));
        let gone = w.remove(&ep("http://127.0.0.1:1")).unwrap();
        assert!(gone.is_retired() && !b.is_retired());
        assert!(w.members().decode.is_empty());
        // A snapshot taken before the change still holds the worker a policy index may point at.
        assert_eq!(before.decode[0].id, a.id);
        let again = w
            .add(&ep("http://127.0.0.1:1"), WorkerRole::Decode)
            .unwrap()
            .unwrap();
        assert!(again.id != a.id && again.id != b.id);
        assert!(w.remove(&ep("http://127.0.0.1:9")).is_none());
        assert!(w.add(&ep("not a uri"), WorkerRole::Decode).is_err());
    }
}
