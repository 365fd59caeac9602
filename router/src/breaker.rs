//! A circuit breaker per worker, fed by the outcomes of real requests (the load poller only says whether a worker
//! is reachable; a worker can answer polls and still fail every request). Closed, it counts consecutive failures;
//! at [`BreakerConfig::failures`] it opens and the worker takes no requests for a cooldown; then it is half-open
//! and lets one request through as a probe: success closes it, failure opens it again for twice the cooldown (up to
//! [`BreakerConfig::max_cooldown`]). Pure state over a caller-given clock, so it is tested without sleeping.

use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BreakerConfig {
    /// Consecutive failures that open the breaker.
    pub failures: u32,
    /// First cooldown; doubled after each failed probe.
    pub cooldown: Duration,
    pub max_cooldown: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failures: 3,
            cooldown: Duration::from_secs(1),
            max_cooldown: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// One probe may be out at a time.
    HalfOpen {
        probing: bool,
    },
}

#[derive(Debug, Clone)]
pub struct Breaker {
    config: BreakerConfig,
    state: BreakerState,
    cooldown: Duration,
}

impl Breaker {
    pub fn new(config: BreakerConfig) -> Self {
        Self {
            config,
            state: BreakerState::Closed { failures: 0 },
            cooldown: config.cooldown,
        }
    }

    pub fn state(&self) -> BreakerState {
        self.state
    }

    /// Whether a request may go to the worker now (an open breaker whose cooldown is over turns half-open).
    pub fn admits(&mut self, now: Instant) -> bool {
        match self.state {
            BreakerState::Closed { .. } => true,
            BreakerState::Open { until } if now >= until => {
                self.state = BreakerState::HalfOpen { probing: false };
                true
            }
            BreakerState::Open { .. } => false,
            BreakerState::HalfOpen { probing } => !probing,
        }
    }

    /// A request was sent; returns whether it is the half-open probe.
    pub fn dispatched(&mut self) -> bool {
        match self.state {
            BreakerState::HalfOpen { probing: false } => {
                self.state = BreakerState::HalfOpen { probing: true };
                true
            }
            _ => false,
        }
    }

    /// The probe ended without an outcome (the client went away): let another probe through.
    pub fn probe_abandoned(&mut self) {
        if self.state == (BreakerState::HalfOpen { probing: true }) {
            self.state = BreakerState::HalfOpen { probing: false };
        }
    }

    pub fn succeeded(&mut self) {
        self.state = BreakerState::Closed { failures: 0 };
        self.cooldown = self.config.cooldown;
    }

    /// A request failed on the worker; returns true when this opened the breaker.
    pub fn failed(&mut self, now: Instant) -> bool {
        match self.state {
            BreakerState::Closed { failures } if failures + 1 < self.config.failures => {
                self.state = BreakerState::Closed {
                    failures: failures + 1,
                };
                false
            }
            BreakerState::Closed { .. } => {
                self.state = BreakerState::Open {
                    until: now + self.cooldown,
                };
                true
            }
            BreakerState::HalfOpen { .. } => {
                self.cooldown = (self.cooldown * 2).min(self.config.max_cooldown);
                self.state = BreakerState::Open {
                    until: now + self.cooldown,
                };
                true
            }
            // Requests sent before it opened may still fail; the cooldown stands.
            BreakerState::Open { .. } => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> BreakerConfig {
        BreakerConfig {
            failures: 3,
            cooldown: Duration::from_secs(1),
            max_cooldown: Duration::from_secs(3),
        }
    }

    #[test]
    fn opens_after_consecutive_failures_and_a_success_resets_the_count() {
        let t = Instant::now();
        let mut b = Breaker::new(config());
        assert!(!b.failed(t) && !b.failed(t));
        b.succeeded();
        assert!(!b.failed(t) && !b.failed(t));
        assert!(b.admits(t));
        assert!(b.failed(t), "the third failure in a row opens it");
        assert!(!b.admits(t + Duration::from_millis(999)));
    }

    #[test]
    fn half_open_lets_one_probe_through_and_its_outcome_decides() {
        let t = Instant::now();
        let mut b = Breaker::new(config());
        for _ in 0..3 {
            b.failed(t);
        }
        let t1 = t + Duration::from_secs(1);
        assert!(b.admits(t1));
        assert!(
            b.dispatched(),
            "the first request after the cooldown is the probe"
        );
        assert!(!b.admits(t1), "no second request while the probe is out");
        b.probe_abandoned();
        assert!(b.admits(t1) && b.dispatched());
        // A failed probe doubles the cooldown, capped.
        assert!(b.failed(t1));
        assert!(!b.admits(t1 + Duration::from_millis(1999)));
        assert!(b.admits(t1 + Duration::from_secs(2)) && b.dispatched());
        let t2 = t1 + Duration::from_secs(2);
        b.failed(t2);
        assert_eq!(
            b.state(),
            BreakerState::Open {
                until: t2 + Duration::from_secs(3)
            }
        );
        assert!(b.admits(t2 + Duration::from_secs(3)) && b.dispatched());
        b.succeeded();
        assert_eq!(b.state(), BreakerState::Closed { failures: 0 });
        // Closed again, the next opening starts from the first cooldown.
        for _ in 0..3 {
            b.failed(t2);
        }
        assert!(b.admits(t2 + Duration::from_secs(1)));
    }

    #[test]
    fn late_failures_while_open_do_not_extend_the_cooldown() {
        let t = Instant::now();
        let mut b = Breaker::new(config());
        for _ in 0..3 {
            b.failed(t);
        }
        assert!(!b.failed(t + Duration::from_millis(900)));
        assert!(b.admits(t + Duration::from_secs(1)));
    }
}
