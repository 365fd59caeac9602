//! How long the engine's recent forward passes took: an exponentially weighted mean of the wall time and of the
//! tokens per step (weight 1/8, about the last eight steps), which the serving nodes report to routers as load.

use std::time::Duration;

/// Weight of the newest step in the means.
const ALPHA: f64 = 1.0 / 8.0;

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepTimes {
    /// Steps recorded so far.
    pub steps: u64,
    /// Mean wall time of a recent step, in seconds.
    pub mean_s: f64,
    /// Mean tokens computed by a recent step.
    pub mean_tokens: f64,
}

impl StepTimes {
    pub fn record(&mut self, took: Duration, tokens: usize) {
        let (s, t) = (took.as_secs_f64(), tokens as f64);
        if self.steps == 0 {
            (self.mean_s, self.mean_tokens) = (s, t);
        } else {
            self.mean_s += ALPHA * (s - self.mean_s);
            self.mean_tokens += ALPHA * (t - self.mean_tokens);
        }
        self.steps += 1;
    }

    /// Mean wall time of a recent step, in whole microseconds (0 before the first).
    pub fn mean_us(&self) -> u64 {
        (self.mean_s * 1e6).round() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_step_sets_the_means_and_later_ones_move_them_by_an_eighth() {
        let mut t = StepTimes::default();
        assert_eq!(t.mean_us(), 0);
        t.record(Duration::from_millis(8), 16);
        assert_eq!((t.mean_us(), t.mean_tokens), (8000, 16.0));
        t.record(Duration::from_millis(16), 0);
        assert_eq!((t.mean_us(), t.mean_tokens, t.steps), (9000, 14.0, 2));
        for _ in 0..200 {
            t.record(Duration::from_millis(2), 4);
        }
        assert_eq!((t.mean_us(), t.mean_tokens.round()), (2000, 4.0));
    }
}
