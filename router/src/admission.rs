//! Admission control at the front door: a bound on the requests this router has open across the cluster, and an
//! optional token bucket per API key. A request over either limit is refused at once with a retry hint (HTTP 429 with
//! `Retry-After`, gRPC RESOURCE_EXHAUSTED) instead of queueing without bound; the bound's ticket is held by the
//! request's token stream and given back when it ends.
//!
//! The bucket arithmetic is pure (time is an argument), so the tests drive it without sleeping.

use crate::error::RouterError;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Requests per second and burst allowed to each API key.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    pub per_s: f64,
    pub burst: u32,
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct AdmissionConfig {
    /// Requests open at once through this router; `None` = no bound.
    pub max_inflight: Option<usize>,
    /// Per API key (the `Authorization: Bearer` value); requests without a key share one bucket.
    pub rate_limit: Option<RateLimit>,
    /// On shutdown, how long open streams may run on after new requests are refused.
    pub drain_timeout: std::time::Duration,
}

/// The API key in an `Authorization` header value (`Bearer KEY`, or the bare value), as HTTP and gRPC both carry it.
pub fn api_key(authorization: &str) -> String {
    authorization
        .strip_prefix("Bearer ")
        .unwrap_or(authorization)
        .trim()
        .to_string()
}

/// Keys remembered at most; past it, buckets that have refilled completely are forgotten (they would start full
/// anyway).
const MAX_KEYS: usize = 100_000;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

pub struct Admission {
    config: AdmissionConfig,
    closed: std::sync::atomic::AtomicBool,
    cut: Arc<std::sync::atomic::AtomicBool>,
    inflight: Arc<AtomicUsize>,
    buckets: Mutex<HashMap<String, Bucket>>,
}

/// One admitted request; dropping it frees its place under the bound.
pub struct Ticket {
    inflight: Arc<AtomicUsize>,
    cut: Arc<std::sync::atomic::AtomicBool>,
}

impl Ticket {
    /// The drain deadline passed: the request's stream must end now.
    pub fn is_cut(&self) -> bool {
        self.cut.load(Ordering::Relaxed)
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Admission {
    pub fn new(config: AdmissionConfig) -> Self {
        Self {
            config,
            closed: std::sync::atomic::AtomicBool::new(false),
            cut: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            inflight: Arc::new(AtomicUsize::new(0)),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Admits a request from `api_key` at `now`, or says when to retry.
    pub fn admit(&self, api_key: Option<&str>, now: Instant) -> Result<Ticket, RouterError> {
        if self.closed.load(Ordering::Relaxed) {
            return Err(RouterError::ShuttingDown);
        }
        if let Some(limit) = self.config.rate_limit {
            self.take_token(api_key.unwrap_or(""), limit, now)?;
        }
        let n = self.inflight.fetch_add(1, Ordering::Relaxed);
        let ticket = Ticket {
            inflight: self.inflight.clone(),
            cut: self.cut.clone(),
        };
        if let Some(max) = self.config.max_inflight
            && n >= max
        {
            return Err(RouterError::Overloaded {
                message: format!(
                    "the cluster is at this router's limit of {max} requests in flight"
                ),
                retry_after_s: 1,
            });
        }
        Ok(ticket)
    }

    /// Refuses every request from now on (the router is draining).
    pub fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
    }

    /// Ends every open stream at its next message (the drain deadline passed).
    pub fn cut_open_streams(&self) {
        self.cut.store(true, Ordering::Relaxed);
    }

    /// Requests open now.
    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Relaxed)
    }

    fn take_token(&self, key: &str, limit: RateLimit, now: Instant) -> Result<(), RouterError> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let burst = f64::from(limit.burst.max(1));
        let refill = |b: &Bucket| {
            (b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * limit.per_s).min(burst)
        };
        if buckets.len() >= MAX_KEYS && !buckets.contains_key(key) {
            buckets.retain(|_, b| refill(b) < burst);
        }
        let b = buckets.entry(key.to_string()).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        b.tokens = refill(b);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            return Ok(());
        }
        let wait = (1.0 - b.tokens) / limit.per_s.max(1e-9);
        Err(RouterError::Overloaded {
            message: format!(
                "rate limit of {} requests/s (burst {}) for this API key exceeded",
                limit.per_s, limit.burst
            ),
            retry_after_s: wait.ceil().max(1.0) as u32,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_bound_refuses_the_request_past_it_until_one_ends() {
        let a = Admission::new(AdmissionConfig {
            max_inflight: Some(2),
            rate_limit: None,
            ..Default::default()
        });
        let now = Instant::now();
        let t1 = a.admit(None, now).unwrap();
        let _t2 = a.admit(None, now).unwrap();
        let e = a.admit(None, now).err().unwrap();
        assert_eq!(e.http_status(), 429);
        assert!(e.to_string().contains("limit of 2"), "{e}");
        assert_eq!(a.inflight(), 2, "a refused request holds no place");
        drop(t1);
        assert!(a.admit(None, now).is_ok());
    }

    #[test]
    fn each_key_has_its_own_bucket_that_refills_over_time() {
        let a = Admission::new(AdmissionConfig {
            max_inflight: None,
            rate_limit: Some(RateLimit {
                per_s: 2.0,
                burst: 3,
            }),
            ..Default::default()
        });
        let t0 = Instant::now();
        for _ in 0..3 {
            a.admit(Some("alice"), t0).unwrap();
        }
        let e = a.admit(Some("alice"), t0).err().unwrap();
        assert!(
            matches!(
                e,
                RouterError::Overloaded {
                    retry_after_s: 1,
                    ..
                }
            ),
            "{e:?}"
        );
        // Another key is not affected.
        a.admit(Some("bob"), t0).unwrap();
        // Half a second buys alice one more request, not two.
        let t1 = t0 + Duration::from_millis(500);
        a.admit(Some("alice"), t1).unwrap();
        assert!(a.admit(Some("alice"), t1).is_err());
        // A long pause refills to the burst, no further.
        let t2 = t1 + Duration::from_secs(60);
        for _ in 0..3 {
            a.admit(Some("alice"), t2).unwrap();
        }
        assert!(a.admit(Some("alice"), t2).is_err());
    }
}
