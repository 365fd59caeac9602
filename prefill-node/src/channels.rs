//! The gRPC channels a worker opens to the peers its requests name (prefill -> decode for transfers, decode ->
//! prefill for remote prefills): one lazily connected channel per endpoint, reused across calls.
//!
//! The endpoints come from requests, so the cache is bounded: past [`ChannelCache::CAPACITY`] endpoints the one
//! used longest ago is dropped (its connection closes once no call holds it). [`peer_endpoint`] is how every node
//! (the router too) dials a peer.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};

/// Channels by endpoint URL, the least recently used dropped first when full.
#[derive(Default)]
pub struct ChannelCache {
    inner: Mutex<Lru>,
}

#[derive(Default)]
struct Lru {
    /// Each endpoint's channel and the tick of its last use.
    channels: HashMap<String, (Channel, u64)>,
    tick: u64,
}

impl ChannelCache {
    /// Endpoints kept at once: far more peers than a deployment has, few enough that requests naming new
    /// endpoints cannot grow the cache without end.
    pub const CAPACITY: usize = 256;

    /// The channel to `endpoint`; `Err` carries the reason an endpoint is not a valid URL.
    pub fn get(&self, endpoint: &str) -> Result<Channel, String> {
        let mut lru = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        lru.tick += 1;
        let tick = lru.tick;
        if let Some((c, used)) = lru.channels.get_mut(endpoint) {
            *used = tick;
            return Ok(c.clone());
        }
        let c = peer_endpoint(endpoint)
            .map_err(|e| format!("{endpoint:?}: {e}"))?
            .connect_lazy();
        if lru.channels.len() >= Self::CAPACITY {
            let oldest = lru
                .channels
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                lru.channels.remove(&k);
            }
        }
        lru.channels.insert(endpoint.to_string(), (c.clone(), tick));
        Ok(c)
    }

    /// How many endpoints have a channel now.
    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .channels
            .len()
    }

    /// Whether no endpoint has a channel.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether `endpoint` has a channel now (without counting as a use).
    pub fn holds(&self, endpoint: &str) -> bool {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .channels
            .contains_key(endpoint)
    }
}

/// How every node reaches a peer (router -> workers, worker -> worker): no Nagle delay, a 2 s connect timeout, and
/// HTTP/2 pings every 10 s, so a peer host that vanishes without closing its connections (power loss, a partition)
/// fails the calls on it within about 20 s instead of TCP's retransmission timeout (a quarter of an hour).
pub fn peer_endpoint(url: &str) -> Result<Endpoint, String> {
    Ok(Endpoint::from_shared(url.to_string())
        .map_err(|e| e.to_string())?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(2))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(i: usize) -> String {
        format!("http://10.0.{}.{}:50051", i / 250, i % 250 + 1)
    }

    #[tokio::test]
    async fn bounded_and_drops_the_least_recently_used() {
        let cache = ChannelCache::default();
        for i in 0..ChannelCache::CAPACITY {
            cache.get(&url(i)).unwrap();
        }
        assert_eq!(cache.len(), ChannelCache::CAPACITY);
        // Endpoint 0 is used again, so endpoint 1 is now the oldest.
        cache.get(&url(0)).unwrap();
        cache.get(&url(ChannelCache::CAPACITY)).unwrap();
        assert_eq!(cache.len(), ChannelCache::CAPACITY);
        assert!(cache.holds(&url(0)));
        assert!(!cache.holds(&url(1)));
        assert!(cache.holds(&url(2)));
        assert!(cache.holds(&url(ChannelCache::CAPACITY)));
        // Many more distinct endpoints never grow it past the bound.
        for i in 0..3 * ChannelCache::CAPACITY {
            cache.get(&url(1000 + i)).unwrap();
        }
        assert_eq!(cache.len(), ChannelCache::CAPACITY);
    }

    #[tokio::test]
    async fn a_bad_endpoint_is_refused_and_not_kept() {
        let cache = ChannelCache::default();
        let e = cache.get("not a url").unwrap_err();
        assert!(e.contains("not a url"), "{e}");
        assert!(cache.is_empty());
    }
}
