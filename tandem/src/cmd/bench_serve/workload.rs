//! The requests a serving benchmark sends: prompt and output lengths drawn from distributions, prompts of random
//! ordinary token ids (optionally all starting with one shared prefix), arrival times from a Poisson process or
//! none (fixed concurrency). Everything is drawn from one seeded generator, so two runs (disaggregated and
//! colocated, router and direct) send exactly the same requests.

use anyhow::{Context, Result, bail};
use tandem_engine::rng::Rng;

/// A length distribution: `128` (fixed) or `64..256` (uniform, inclusive).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dist {
    Fixed(usize),
    Uniform(usize, usize),
}

impl Dist {
    /// One length, drawn from the workload's seeded generator.
    pub fn draw(self, rng: &mut Rng) -> usize {
        match self {
            Self::Fixed(n) => n,
            Self::Uniform(a, b) => rng.range(a, b),
        }
    }
}

impl std::str::FromStr for Dist {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        if let Some((a, b)) = s.split_once("..") {
            let (a, b): (usize, usize) = (
                a.trim().parse().context("range start")?,
                b.trim().parse().context("range end")?,
            );
            if a == 0 || b < a {
                bail!("length range {s:?} must be 1..=N with start <= end");
            }
            return Ok(Self::Uniform(a, b));
        }
        let n: usize = s
            .trim()
            .parse()
            .with_context(|| format!("length {s:?} is not a number or a range a..b"))?;
        if n == 0 {
            bail!("length must be at least 1");
        }
        Ok(Self::Fixed(n))
    }
}

impl std::fmt::Display for Dist {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Fixed(n) => write!(f, "{n}"),
            Self::Uniform(a, b) => write!(f, "{a}..{b}"),
        }
    }
}

/// One request of the workload.
#[derive(Debug, Clone)]
pub struct BenchRequest {
    pub prompt: Vec<u32>,
    pub output_tokens: usize,
    /// Seconds after the start at which it is sent (`None`: as soon as a slot is free).
    pub send_at: Option<f64>,
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct WorkloadSpec {
    pub requests: usize,
    pub prompt_tokens: Dist,
    pub output_tokens: Dist,
    pub shared_prefix_tokens: usize,
    /// Distinct shared prefixes; each request starts with one, drawn uniformly.
    pub shared_prefixes: usize,
    /// Poisson arrivals at this many requests per second; `None` = closed loop.
    pub rate: Option<f64>,
    pub seed: u64,
    /// Ordinary (non-special) token ids are drawn from this range.
    pub token_range: (u32, u32),
}

pub fn build(spec: &WorkloadSpec) -> Vec<BenchRequest> {
    let mut rng = Rng::new(spec.seed);
    let (lo, hi) = spec.token_range;
    let token = |rng: &mut Rng| lo + (rng.next_u64() % (hi - lo) as u64) as u32;
    let prefixes: Vec<Vec<u32>> = (0..spec.shared_prefixes.max(1))
        .map(|_| {
            (0..spec.shared_prefix_tokens)
                .map(|_| token(&mut rng))
                .collect()
        })
        .collect();
    let mut t = 0.0;
    (0..spec.requests)
        .map(|_| {
            let n = spec.prompt_tokens.draw(&mut rng).max(1);
            let shared = &prefixes[if prefixes.len() > 1 {
                rng.below(prefixes.len())
            } else {
                0
            }];
            let mut prompt = shared.clone();
            while prompt.len() < shared.len() + n {
                prompt.push(token(&mut rng));
            }
            let send_at = spec.rate.map(|r| {
                // Exponential gaps: a Poisson process of rate r.
                let at = t;
                t += -(1.0 - rng.unit()).ln() / r;
                at
            });
            BenchRequest {
                prompt,
                output_tokens: spec.output_tokens.draw(&mut rng),
                send_at,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distributions_parse_and_workloads_repeat() {
        assert_eq!("128".parse::<Dist>().unwrap(), Dist::Fixed(128));
        assert_eq!("64..256".parse::<Dist>().unwrap(), Dist::Uniform(64, 256));
        assert!(
            "0".parse::<Dist>().is_err()
                && "9..3".parse::<Dist>().is_err()
                && "x".parse::<Dist>().is_err()
        );
        let spec = WorkloadSpec {
            requests: 200,
            prompt_tokens: Dist::Uniform(10, 20),
            output_tokens: Dist::Fixed(5),
            shared_prefix_tokens: 8,
            shared_prefixes: 1,
            rate: Some(4.0),
            seed: 3,
            token_range: (100, 200),
        };
        let a = build(&spec);
        let b = build(&spec);
        assert_eq!(
            a.iter().map(|r| r.prompt.clone()).collect::<Vec<_>>(),
            b.iter().map(|r| r.prompt.clone()).collect::<Vec<_>>()
        );
        assert!(
            a.iter()
                .all(|r| (18..=28).contains(&r.prompt.len()) && r.prompt[..8] == a[0].prompt[..8])
        );
        // 200 arrivals at 4/s span about 50 s.
        let last = a.last().unwrap().send_at.unwrap();
        assert!((35.0..65.0).contains(&last), "{last}");
    }
}
