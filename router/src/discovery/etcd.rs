//! etcd membership. A worker writes its [`Registration`] as JSON under `<prefix>/workers/<role>/<endpoint>`,
//! attached to a lease it keeps alive ([`register`]); when the process dies the lease lapses and etcd deletes the
//! key, and a draining worker revokes the lease itself. A router lists the prefix, then watches it from the next
//! revision ([`watch`]), so no change between the two is missed.
//!
//! etcd going away changes nothing that is running: the router keeps its last membership (workers keep serving,
//! requests keep flowing) and relists when etcd is back; a worker whose lease could not be renewed registers again
//! under a new lease. Every retry backs off up to [`MAX_BACKOFF`].

use super::{Membership, Registration};
use crate::workers::{BlockNaming, WorkerEndpoint};
use etcd_client::{Client, ConnectOptions, GetOptions, PutOptions, WatchOptions};
use std::collections::HashMap;
use std::time::Duration;
use tokio::sync::watch;

/// Longest pause between attempts to reach etcd.
pub const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Where etcd is and which part of its key space is this cluster's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdConfig {
    /// `host:port` or `http://host:port`, one or more members.
    pub endpoints: Vec<String>,
    /// Key prefix, e.g. `/tandem`; clusters sharing an etcd use different prefixes.
    pub prefix: String,
}

impl EtcdConfig {
    fn workers_prefix(&self) -> String {
        format!("{}/workers/", self.prefix.trim_end_matches('/'))
    }

    /// The key a worker registers under.
    pub fn key(&self, r: &Registration) -> String {
        format!(
            "{}{}/{}",
            self.workers_prefix(),
            r.role.as_str(),
            r.endpoint
        )
    }

    async fn connect(&self) -> Result<Client, etcd_client::Error> {
        let options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(5))
            // etcd answers pings more often than every 5 s (its default --grpc-keepalive-min-time) with GOAWAY.
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5));
        Client::connect(&self.endpoints, Some(options)).await
    }
}

/// Doubles a pause up to [`MAX_BACKOFF`].
fn backoff(d: Duration) -> Duration {
    (d * 2).min(MAX_BACKOFF)
}

/// Keeps `registration` in etcd under a lease of `ttl` until `stop` turns true, then revokes the lease so routers
/// drop the worker at once. Never fails: etcd being unreachable is logged and retried.
pub async fn register(
    config: EtcdConfig,
    registration: Registration,
    ttl: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let key = config.key(&registration);
    let value = serde_json::to_string(&registration).expect("a registration serializes");
    let ttl_s = ttl.as_secs().max(2) as i64;
    let mut pause = Duration::from_millis(100);
    loop {
        let mut lease = None;
        let session = keep_registered(&config, &key, &value, ttl_s, &mut lease);
        let ended = tokio::select! {
            e = session => Some(e),
            _ = stop.wait_for(|s| *s) => None,
        };
        match ended {
            None => {
                if let Some((mut client, id)) = lease {
                    match tokio::time::timeout(Duration::from_secs(2), client.lease_revoke(id))
                        .await
                    {
                        Ok(Ok(_)) => tracing::info!(%key, "deregistered from etcd"),
                        _ => {
                            tracing::warn!(%key, "could not revoke the etcd lease; it lapses in {ttl_s} s")
                        }
                    }
                }
                return;
            }
            Some(e) => {
                tracing::warn!(%key, "etcd registration lost ({e}); registering again");
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
                pause = backoff(pause);
            }
        }
    }
}

/// One lease's life: grant, put, renew every third of the TTL. Returns why it ended; `lease` holds the client and
/// lease id once granted, for the revoke on stop.
async fn keep_registered(
    config: &EtcdConfig,
    key: &str,
    value: &str,
    ttl_s: i64,
    lease: &mut Option<(Client, i64)>,
) -> String {
    let mut client = match config.connect().await {
        Ok(c) => c,
        Err(e) => return format!("connect: {e}"),
    };
    let id = match client.lease_grant(ttl_s, None).await {
        Ok(r) => r.id(),
        Err(e) => return format!("lease grant: {e}"),
    };
    *lease = Some((client.clone(), id));
    if let Err(e) = client
        .put(key, value, Some(PutOptions::new().with_lease(id)))
        .await
    {
        return format!("put: {e}");
    }
    tracing::info!(%key, lease = id, ttl_s, "registered in etcd");
    let (mut keeper, mut responses) = match client.lease_keep_alive(id).await {
        Ok(k) => k,
        Err(e) => return format!("keep-alive: {e}"),
    };
    let every = Duration::from_millis((ttl_s as u64 * 1000 / 3).max(500));
    loop {
        tokio::time::sleep(every).await;
        if let Err(e) = keeper.keep_alive().await {
            return format!("keep-alive: {e}");
        }
        match tokio::time::timeout(Duration::from_secs(ttl_s as u64), responses.message()).await {
            Ok(Ok(Some(r))) if r.ttl() > 0 => {}
            Ok(Ok(Some(_))) => return "the lease expired".into(),
            Ok(Ok(None)) => return "keep-alive stream ended".into(),
            Ok(Err(e)) => return format!("keep-alive: {e}"),
            Err(_) => return "keep-alive timed out".into(),
        }
    }
}

/// Follows the registrations under `config.prefix` into `members` until `members.stop` turns true. Workers that
/// serve another model or name blocks otherwise are refused with the reason logged.
pub async fn watch(config: EtcdConfig, members: Membership, model: String, naming: BlockNaming) {
    let mut stop = members.stop.clone();
    let mut pause = Duration::from_millis(100);
    let mut follower = Follower {
        members,
        model,
        naming,
        keys: HashMap::new(),
    };
    loop {
        let e = tokio::select! {
            e = follower.session(&config) => e,
            _ = stop.wait_for(|s| *s) => return,
        };
        tracing::warn!(
            "etcd watch lost ({e}); keeping the {} known workers and retrying",
            follower.keys.len()
        );
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        pause = backoff(pause);
    }
}

struct Follower {
    members: Membership,
    model: String,
    naming: BlockNaming,
    /// Key to endpoint of every registration in the pool (a delete event carries only the key).
    keys: HashMap<Vec<u8>, Registration>,
}

impl Follower {
    /// List, reconcile, then watch from the list's revision on; returns why it ended.
    async fn session(&mut self, config: &EtcdConfig) -> String {
        let mut client = match config.connect().await {
            Ok(c) => c,
            Err(e) => return format!("connect: {e}"),
        };
        let prefix = config.workers_prefix();
        let listed = match client
            .get(prefix.as_str(), Some(GetOptions::new().with_prefix()))
            .await
        {
            Ok(r) => r,
            Err(e) => return format!("list: {e}"),
        };
        let revision = listed.header().map_or(0, |h| h.revision());
        self.keys.clear();
        for kv in listed.kvs() {
            if let Some(r) = self.accept(kv.key(), kv.value()) {
                self.keys.insert(kv.key().to_vec(), r);
            }
        }
        let want: Vec<_> = self
            .keys
            .values()
            .map(|r| (WorkerEndpoint(r.endpoint.clone()), r.role))
            .collect();
        self.members.reconcile(&want);
        tracing::info!(workers = want.len(), revision, "etcd membership listed");
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(revision + 1);
        let mut stream = match client.watch(prefix.as_str(), Some(options)).await {
            Ok(s) => s,
            Err(e) => return format!("watch: {e}"),
        };
        loop {
            let response = match stream.message().await {
                Ok(Some(r)) => r,
                Ok(None) => return "watch stream ended".into(),
                Err(e) => return format!("watch: {e}"),
            };
            if response.canceled() {
                return format!("watch canceled: {}", response.cancel_reason());
            }
            for event in response.events() {
                let Some(kv) = event.kv() else { continue };
                match event.event_type() {
                    etcd_client::EventType::Put => self.put(kv.key(), kv.value()),
                    etcd_client::EventType::Delete => self.delete(kv.key()),
                }
            }
        }
    }

    /// The registration under `key`, if it parses and this router can use it.
    fn accept(&self, key: &[u8], value: &[u8]) -> Option<Registration> {
        let key = String::from_utf8_lossy(key);
        let r: Registration = match serde_json::from_slice(value) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(%key, "ignoring a malformed worker registration: {e}");
                return None;
            }
        };
        if let Some(why) = r.refusal(&self.model, &self.naming) {
            tracing::error!(%key, "refusing worker {}: {why}", r.endpoint);
            return None;
        }
        Some(r)
    }

    fn put(&mut self, key: &[u8], value: &[u8]) {
        // A re-registration may change anything, the role included: drop the old entry first.
        if let Some(old) = self.keys.get(key) {
            let new: Option<Registration> = serde_json::from_slice(value).ok();
            if new.as_ref() == Some(old) {
                return;
            }
            self.delete(key);
        }
        if let Some(r) = self.accept(key, value) {
            self.members
                .add(&WorkerEndpoint(r.endpoint.clone()), r.role);
            self.keys.insert(key.to_vec(), r);
        }
    }

    fn delete(&mut self, key: &[u8]) {
        if let Some(r) = self.keys.remove(key) {
            self.members.remove(&WorkerEndpoint(r.endpoint));
        }
    }
}
