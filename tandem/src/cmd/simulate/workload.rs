//! The simulated traffic: four seeded request mixes whose prompts share (or do not share) prefixes the way real
//! traffic does. Token ids are synthetic but real block hashes are computed from them, so the prefix index and the
//! workers' caches behave exactly as with text.
//!
//! - `shared-prefix`: a pool of long system prompts (more than one worker's cache holds, less than the cluster's),
//!   chosen uniformly, each followed by a short unique user message.
//! - `multi-turn`: chat sessions; each turn's prompt is the previous turn's prompt, its answer and a new message,
//!   sent a think time after the previous answer ends.
//! - `rag`: a short system prompt, then one of many documents (Zipf-popular), then a question.
//! - `uniform`: unrelated prompts of random length.

use serde::Serialize;
use tandem_engine::rng::Rng;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum WorkloadKind {
    SharedPrefix,
    MultiTurn,
    Rag,
    Uniform,
}

impl WorkloadKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::SharedPrefix => "shared-prefix",
            Self::MultiTurn => "multi-turn",
            Self::Rag => "rag",
            Self::Uniform => "uniform",
        }
    }
}

/// One request: its prompt and the answer the simulated model will give (so a later turn can extend it).
#[derive(Debug, Clone)]
pub struct SimRequest {
    pub prompt: Vec<u32>,
    pub output: Vec<u32>,
    /// Seconds after the start, for requests that open a session or stand alone.
    pub arrival_s: f64,
    /// The request sent `think_s` after this one finishes (the session's next turn).
    pub next_turn: Option<usize>,
    pub think_s: f64,
}

/// A workload: requests in id order; those reached through `next_turn` have no arrival of their own.
pub struct Workload {
    pub requests: Vec<SimRequest>,
    /// Requests that arrive on their own (the others follow a previous turn).
    pub openers: Vec<usize>,
}

/// Random special-token-free ids, `min..min + spread` of them.
fn segment(rng: &mut Rng, min: usize, spread: usize) -> Vec<u32> {
    let len = min + rng.below(spread.max(1));
    (0..len).map(|_| 100 + rng.below(40_000) as u32).collect()
}

/// `n` requests (turns, for multi-turn) at `rate` requests (sessions' first turns) per second.
pub fn generate(kind: WorkloadKind, n: usize, rate: f64, seed: u64) -> Workload {
    let mut rng = Rng::new(seed ^ (kind as u64 + 1).wrapping_mul(0x9e37_79b9));
    let mut t = 0.0;
    let mut requests = Vec::with_capacity(n);
    let mut openers = Vec::new();
    let mut next_arrival = |rng: &mut Rng| {
        t += rng.exp(1.0 / rate);
        t
    };
    match kind {
        WorkloadKind::SharedPrefix => {
            let prompts: Vec<Vec<u32>> = (0..48).map(|_| segment(&mut rng, 768, 768)).collect();
            for i in 0..n {
                let mut prompt = prompts[rng.below(prompts.len())].clone();
                prompt.extend(segment(&mut rng, 16, 64));
                let output = segment(&mut rng, 16, 112);
                requests.push(standalone(prompt, output, next_arrival(&mut rng)));
                openers.push(i);
            }
        }
        WorkloadKind::MultiTurn => {
            let system = segment(&mut rng, 96, 0);
            while requests.len() < n {
                let turns = (2 + rng.below(7)).min(n - requests.len());
                let mut context = system.clone();
                let arrival = next_arrival(&mut rng);
                openers.push(requests.len());
                for k in 0..turns {
                    context.extend(segment(&mut rng, 24, 96));
                    let output = segment(&mut rng, 32, 160);
                    let id = requests.len();
                    requests.push(SimRequest {
                        prompt: context.clone(),
                        output: output.clone(),
                        arrival_s: if k == 0 { arrival } else { f64::NAN },
                        next_turn: (k + 1 < turns).then_some(id + 1),
                        think_s: rng.exp(2.0),
                    });
                    context.extend(output);
                }
            }
        }
        WorkloadKind::Rag => {
            let system = segment(&mut rng, 64, 0);
            let docs: Vec<Vec<u32>> = (0..400).map(|_| segment(&mut rng, 384, 640)).collect();
            let zipf = Zipf::new(docs.len(), 1.0);
            for i in 0..n {
                let mut prompt = system.clone();
                prompt.extend(&docs[zipf.draw(&mut rng)]);
                prompt.extend(segment(&mut rng, 16, 48));
                let output = segment(&mut rng, 16, 112);
                requests.push(standalone(prompt, output, next_arrival(&mut rng)));
                openers.push(i);
            }
        }
        WorkloadKind::Uniform => {
            for i in 0..n {
                let prompt = segment(&mut rng, 64, 960);
                let output = segment(&mut rng, 16, 112);
                requests.push(standalone(prompt, output, next_arrival(&mut rng)));
                openers.push(i);
            }
        }
    }
    Workload { requests, openers }
}

fn standalone(prompt: Vec<u32>, output: Vec<u32>, arrival_s: f64) -> SimRequest {
    SimRequest {
        prompt,
        output,
        arrival_s,
        next_turn: None,
        think_s: 0.0,
    }
}

/// Mean prompt tokens a request brings, for sizing the arrival rate.
pub fn mean_prompt_tokens(kind: WorkloadKind) -> f64 {
    match kind {
        WorkloadKind::SharedPrefix => 1152.0 + 48.0,
        WorkloadKind::MultiTurn => 96.0 + 4.0 * (84.0 + 112.0),
        WorkloadKind::Rag => 64.0 + 704.0 + 40.0,
        WorkloadKind::Uniform => 544.0,
    }
}

/// Zipf over `0..n` with exponent `s`, drawn by inverting the cumulative table.
struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    fn new(n: usize, s: f64) -> Self {
        let mut acc = 0.0;
        let mut cdf: Vec<f64> = (1..=n)
            .map(|k| {
                acc += 1.0 / (k as f64).powf(s);
                acc
            })
            .collect();
        for c in &mut cdf {
            *c /= acc;
        }
        Self { cdf }
    }
    fn draw(&self, rng: &mut Rng) -> usize {
        let u = rng.unit();
        self.cdf.partition_point(|&c| c < u).min(self.cdf.len() - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workloads_are_seeded_and_shaped_as_described() {
        for kind in [
            WorkloadKind::SharedPrefix,
            WorkloadKind::MultiTurn,
            WorkloadKind::Rag,
            WorkloadKind::Uniform,
        ] {
            let a = generate(kind, 300, 2.0, 9);
            let b = generate(kind, 300, 2.0, 9);
            assert_eq!(a.requests.len(), 300);
            assert!(
                a.requests
                    .iter()
                    .zip(&b.requests)
                    .all(|(x, y)| x.prompt == y.prompt)
            );
            assert!(
                a.openers
                    .iter()
                    .all(|&i| a.requests[i].arrival_s.is_finite())
            );
        }
        // Each multi-turn follow-up extends its previous turn's prompt and answer.
        let w = generate(WorkloadKind::MultiTurn, 200, 1.0, 3);
        let mut follow_ups = 0;
        for r in &w.requests {
            if let Some(n) = r.next_turn {
                let next = &w.requests[n].prompt;
                assert!(
                    next.starts_with(&r.prompt) && next[r.prompt.len()..].starts_with(&r.output)
                );
                follow_ups += 1;
            }
        }
        assert!(follow_ups > 100);
        // Shared-prefix prompts fall into few prefixes.
        let w = generate(WorkloadKind::SharedPrefix, 500, 1.0, 3);
        let firsts: std::collections::HashSet<u32> =
            w.requests.iter().map(|r| r.prompt[0]).collect();
        assert!(firsts.len() <= 48);
    }

    #[test]
    fn zipf_favours_low_ranks() {
        let z = Zipf::new(100, 1.0);
        let mut rng = Rng::new(1);
        let hits0 = (0..10_000).filter(|_| z.draw(&mut rng) == 0).count();
        // P(0) = 1/H_100 ≈ 0.193.
        assert!((1700..2150).contains(&hits0), "{hits0}");
    }
}
