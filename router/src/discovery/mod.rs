//! Membership: which workers exist. `static` (a fixed list, the embedded default) adds every worker once;
//! `etcd` ([`etcd`]) follows the registrations workers keep alive under a lease, adding a worker when its key
//! appears and removing it when the key is deleted or its lease lapses.
//!
//! A worker describes itself with a [`Registration`] (role, endpoints, model, block naming, capacity); the router
//! refuses one that serves another model or names KV blocks differently, before it can take a request, and says
//! why. Adding and removing go through [`Membership`], which owns the per-worker prefix-index followers.

pub mod etcd;

use crate::index::PrefixIndex;
use crate::workers::{BlockNaming, WorkerEndpoint, WorkerRole, Workers};
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

/// Where the worker list comes from.
#[derive(Debug, Clone)]
pub enum Discovery {
    Static {
        prefill: Vec<WorkerEndpoint>,
        decode: Vec<WorkerEndpoint>,
    },
    Etcd(etcd::EtcdConfig),
}

/// What a worker publishes about itself.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Registration {
    pub role: WorkerRole,
    /// The worker's gRPC endpoint (`http://host:port`), its identity in the pool.
    pub endpoint: String,
    /// Where prefill workers push KV to (decode workers; the same server as `endpoint` unless advertised apart).
    #[serde(default)]
    pub kv_endpoint: Option<String>,
    /// The model id clients name; the router serves one.
    pub model: String,
    pub block_size: usize,
    pub hash_seed: u64,
    /// KV blocks of the worker's cache.
    pub kv_blocks: usize,
}

impl Registration {
    /// Why this router cannot use the worker, if it cannot.
    pub fn refusal(&self, model: &str, naming: &BlockNaming) -> Option<String> {
        if self.model != model {
            return Some(format!(
                "it serves model {:?}; this router serves {model:?}",
                self.model
            ));
        }
        naming.mismatch(self.block_size, self.hash_seed)
    }
}

/// Adds and removes workers, starting and ending the task that keeps each one's prefix-index entries.
#[derive(Clone)]
pub struct Membership {
    pub workers: Arc<Workers>,
    pub index: Arc<Mutex<PrefixIndex>>,
    pub stop: watch::Receiver<bool>,
}

impl Membership {
    /// Adds a worker (no-op when its endpoint is already in); an invalid endpoint is logged and skipped.
    pub fn add(&self, endpoint: &WorkerEndpoint, role: WorkerRole) {
        match self.workers.add(endpoint, role) {
            Ok(Some(w)) => {
                tokio::spawn(crate::sync::follow(
                    w,
                    self.index.clone(),
                    self.stop.clone(),
                ));
            }
            Ok(None) => {}
            Err(e) => tracing::error!("refusing worker: {e}"),
        }
    }

    pub fn remove(&self, endpoint: &WorkerEndpoint) {
        self.workers.remove(endpoint);
    }

    /// Makes the pool exactly `want`: adds the missing workers, removes the others.
    pub fn reconcile(&self, want: &[(WorkerEndpoint, WorkerRole)]) {
        for w in self.workers.all() {
            if !want.iter().any(|(e, r)| *e == w.endpoint && *r == w.role) {
                self.remove(&w.endpoint);
            }
        }
        for (e, r) in want {
            self.add(e, *r);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registration() -> Registration {
        Registration {
            role: WorkerRole::Decode,
            endpoint: "http://127.0.0.1:7200".into(),
            kv_endpoint: None,
            model: "smollm2".into(),
            block_size: 16,
            hash_seed: tandem_engine::kv::HashSeed::default().0,
            kv_blocks: 1024,
        }
    }

    #[test]
    fn a_registration_for_another_model_or_naming_is_refused_with_both_sides() {
        let naming = BlockNaming::default();
        let r = registration();
        assert_eq!(r.refusal("smollm2", &naming), None);
        let why = r.refusal("llama", &naming).unwrap();
        assert!(
            why.contains("\"smollm2\"") && why.contains("\"llama\""),
            "{why}"
        );
        let r = Registration {
            block_size: 8,
            ..registration()
        };
        let why = r.refusal("smollm2", &naming).unwrap();
        assert!(
            why.contains("block size 8") && why.contains("block size 16"),
            "{why}"
        );
    }

    #[test]
    fn registrations_round_trip_as_json_with_lowercase_roles() {
        let r = registration();
        let text = serde_json::to_string(&r).unwrap();
        assert!(text.contains("\"role\":\"decode\""), "{text}");
        assert_eq!(serde_json::from_str::<Registration>(&text).unwrap(), r);
    }
}
