//! Choosing the next token from logits: penalties, temperature, top-k, top-p, min-p, a seeded RNG, logprobs.
//!
//! Order (the one vLLM and llama.cpp use): repetition penalty (prompt and output tokens, divides positive logits and
//! multiplies negative ones), presence and frequency penalties (output tokens), then greedy if temperature is 0,
//! else temperature, top-k, softmax, min-p, top-p, and a draw ([`draw`], the one rule every backend follows: the
//! sampler hands it the penalties as a [`Draw`], so a GPU applies them too). Logprobs are of the model's raw
//! distribution, before any of this, as OpenAI reports them. With a seed, the same logits give the same tokens on
//! every run.

mod draw;

pub use draw::{Draw, Penalty, draw};

use crate::error::{EngineError, Result};
use crate::rng::Rng;
use std::collections::HashMap;

/// How to sample; defaults are greedy decoding with no penalties.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 disables.
    pub top_k: usize,
    /// 1 disables.
    pub top_p: f32,
    /// 0 disables.
    pub min_p: f32,
    /// 1 disables.
    pub repetition_penalty: f32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub seed: Option<u64>,
    /// Number of most likely alternatives to report with each token (`None`: no logprobs at all).
    pub logprobs: Option<usize>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
            logprobs: None,
        }
    }
}

/// The smallest non-zero temperature and the smallest repetition penalty (a logit is divided by each).
pub const MIN_TEMPERATURE: f32 = 1e-3;
pub const MIN_REPETITION_PENALTY: f32 = 1e-3;

/// Most alternatives a caller may ask for per token (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

impl SamplingParams {
    /// Checks every field against its range; the error names the field and the limit.
    pub fn validate(&self) -> Result<()> {
        self.check()
            .map_err(|(_, message)| EngineError::invalid(message))
    }

    /// [`SamplingParams::validate`] with the offending field's name apart (an API reports it as the parameter).
    pub fn check(&self) -> std::result::Result<(), (&'static str, String)> {
        let bad = |field: &'static str, m: String| Err((field, m));
        // Below these, scaling a logit by 1 / temperature or 1 / penalty overflows f32, and the draw would see NaN
        // weights instead of a sharper distribution.
        if !(self.temperature == 0.0
            || (self.temperature.is_finite()
                && (MIN_TEMPERATURE..=100.0).contains(&self.temperature)))
        {
            return bad(
                "temperature",
                format!(
                    "temperature {:?} must be 0 (greedy) or between {MIN_TEMPERATURE} and 100",
                    self.temperature
                ),
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", format!("top_p {} must be in (0, 1]", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min_p", format!("min_p {} must be in [0, 1]", self.min_p));
        }
        if !(MIN_REPETITION_PENALTY..=10.0).contains(&self.repetition_penalty) {
            return bad(
                "repetition_penalty",
                format!(
                    "repetition_penalty {:?} must be between {MIN_REPETITION_PENALTY} and 10",
                    self.repetition_penalty
                ),
            );
        }
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                return bad(name, format!("{name} {v} must be between -2 and 2"));
            }
        }
        if let Some(n) = self.logprobs
            && n > MAX_TOP_LOGPROBS
        {
            return bad(
                "top_logprobs",
                format!("top_logprobs {n} must be at most {MAX_TOP_LOGPROBS}"),
            );
        }
        Ok(())
    }
}

/// A chosen token with its log-probability and the top alternatives (when asked for).
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub token: u32,
    pub logprob: Option<f32>,
    pub top_logprobs: Vec<(u32, f32)>,
}

/// Per-sequence sampling state: the RNG and the penalties of the tokens seen so far.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
    seen: Seen,
}

/// One [`Penalty`] per distinct token seen (prompt tokens under a repetition penalty, output tokens under any
/// penalty), kept up to date as tokens come out: building them at every step cost a hash insert per distinct prompt
/// token per step.
#[derive(Debug, Clone, Default)]
struct Seen {
    entries: Vec<Penalty>,
    /// Index into `entries`, and how often the token came out.
    at: HashMap<u32, (usize, u32)>,
}

impl Seen {
    /// The entry of `token`, added with no effect if it is new.
    fn entry(&mut self, token: u32) -> (&mut Penalty, &mut u32) {
        let n = self.entries.len();
        let (i, count) = self.at.entry(token).or_insert((n, 0));
        if *i == n {
            self.entries.push(Penalty {
                token,
                repetition: 1.0,
                subtract: 0.0,
            });
        }
        (&mut self.entries[*i], count)
    }
}

impl Sampler {
    pub fn new(params: SamplingParams, prompt: &[u32]) -> Self {
        let seed = params.seed.unwrap_or_else(fresh_seed);
        let mut seen = Seen::default();
        if params.repetition_penalty != 1.0 {
            for &t in prompt {
                seen.entry(t).0.repetition = params.repetition_penalty;
            }
        }
        Self {
            params,
            rng: Rng::new(seed),
            seen,
        }
    }

    /// Whether any penalty is set.
    fn penalized(&self) -> bool {
        let p = &self.params;
        p.repetition_penalty != 1.0 || p.presence_penalty != 0.0 || p.frequency_penalty != 0.0
    }

    /// Records an output token for later penalties.
    fn record(&mut self, token: u32) {
        if !self.penalized() {
            return;
        }
        let p = &self.params;
        let (rep, presence, frequency) = (
            p.repetition_penalty,
            p.presence_penalty,
            p.frequency_penalty,
        );
        let (e, count) = self.seen.entry(token);
        *count += 1;
        e.repetition = rep;
        if presence != 0.0 || frequency != 0.0 {
            e.subtract = presence + frequency * *count as f32;
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Whether choosing the next token needs the logits on the host: only to report logprobs. Everything else
    /// (penalties included) travels in a [`Draw`] that is carried out where the logits are, so only the id crosses
    /// from a GPU.
    pub fn needs_logits(&self) -> bool {
        self.params.logprobs.is_some()
    }

    /// Records a token that the same parameters and seed sampled elsewhere (a prefill worker samples the first
    /// token), advancing the RNG exactly as [`Sampler::sample`] would have, so the rest of the stream is the one a
    /// single node would produce.
    pub fn record_external(&mut self, token: u32) {
        if self.params.temperature != 0.0 {
            self.rng.next_u64();
        }
        self.record(token);
    }

    /// Picks the next token from `logits` (by [`draw`], with this sequence's penalties) and records it for later
    /// penalties.
    pub fn sample(&mut self, logits: &[f32]) -> Sampled {
        let (logprob_of, top_logprobs) = match self.params.logprobs {
            Some(n) => {
                let lse = log_sum_exp(logits);
                let top = top_n(logits, n)
                    .into_iter()
                    .map(|(t, l)| (t, l - lse))
                    .collect();
                (Some(lse), top)
            }
            None => (None, Vec::new()),
        };
        let token = draw(logits, &self.next_draw());
        self.record(token);
        Sampled {
            token,
            // Of the raw logits: `draw` penalizes a copy.
            logprob: logprob_of.map(|lse| logits[token as usize] - lse),
            top_logprobs,
        }
    }

    /// What the penalties do to each token they touch: the repetition penalty to every prompt and output token,
    /// presence and frequency to output tokens by their counts; one entry per token, in the order first seen.
    /// Empty without penalties.
    fn penalties(&self) -> Vec<Penalty> {
        self.seen.entries.clone()
    }

    /// This token's [`Draw`]: the parameters, the penalties of the tokens seen so far and, unless greedy, the next
    /// uniform number of the sequence's generator (advancing it exactly as [`Sampler::sample`] does).
    pub fn next_draw(&mut self) -> Draw {
        let p = &self.params;
        let u = if p.temperature != 0.0 {
            self.rng.next_f32()
        } else {
            0.0
        };
        Draw {
            temperature: p.temperature,
            top_k: p.top_k.min(u32::MAX as usize) as u32,
            top_p: p.top_p,
            min_p: p.min_p,
            u,
            penalties: self.penalties(),
        }
    }

    /// Records a token drawn elsewhere with the [`Draw`] this sampler gave out ([`Sampler::next_draw`]), for later
    /// penalties.
    pub fn record_drawn(&mut self, token: u32) {
        self.record(token);
    }
}

/// A seed that differs between calls, for requests that gave none.
pub fn fresh_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

/// Index of the largest logit (the lowest index among equals).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

pub fn log_sum_exp(logits: &[f32]) -> f32 {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    let s: f64 = logits.iter().map(|&x| ((x - max) as f64).exp()).sum();
    max + s.ln() as f32
}

/// The `n` largest logits with their ids, largest first.
pub fn top_n(logits: &[f32], n: usize) -> Vec<(u32, f32)> {
    let mut v: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, l))
        .collect();
    if n == 0 {
        return Vec::new();
    }
    if n < v.len() {
        v.select_nth_unstable_by(n - 1, |a, b| b.1.total_cmp(&a.1));
        v.truncate(n);
    }
    v.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        vec![1.0, 3.0, 2.0, 0.5, 2.9]
    }

    #[test]
    fn greedy_picks_argmax_and_reports_logprobs() {
        let mut s = Sampler::new(
            SamplingParams {
                logprobs: Some(2),
                ..Default::default()
            },
            &[],
        );
        let out = s.sample(&logits());
        assert_eq!(out.token, 1);
        let lse = log_sum_exp(&logits());
        assert!((out.logprob.unwrap() - (3.0 - lse)).abs() < 1e-6);
        assert_eq!(
            out.top_logprobs.iter().map(|x| x.0).collect::<Vec<_>>(),
            vec![1, 4]
        );
    }

    #[test]
    fn record_external_continues_the_same_stream() {
        let params = SamplingParams {
            temperature: 1.0,
            frequency_penalty: 0.5,
            seed: Some(11),
            ..Default::default()
        };
        let mut one = Sampler::new(params.clone(), &[]);
        let first = one.sample(&logits()).token;
        let rest: Vec<u32> = (0..20).map(|_| one.sample(&logits()).token).collect();
        let mut split = Sampler::new(params, &[]);
        split.record_external(first);
        let rest2: Vec<u32> = (0..20).map(|_| split.sample(&logits()).token).collect();
        assert_eq!(rest, rest2);
    }

    #[test]
    fn seed_makes_sampling_reproducible_and_top_k_restricts() {
        let p = SamplingParams {
            temperature: 1.0,
            top_k: 2,
            seed: Some(42),
            ..Default::default()
        };
        let run = || {
            let mut s = Sampler::new(p.clone(), &[]);
            (0..200)
                .map(|_| s.sample(&logits()).token)
                .collect::<Vec<_>>()
        };
        let a = run();
        assert_eq!(a, run());
        assert!(
            a.iter().all(|&t| t == 1 || t == 4),
            "top_k=2 allows only tokens 1 and 4"
        );
        assert!(
            a.contains(&1) && a.contains(&4),
            "both candidates are drawn"
        );
    }

    #[test]
    fn top_p_and_min_p_cut_the_tail() {
        let p = SamplingParams {
            temperature: 1.0,
            top_p: 0.5,
            seed: Some(1),
            ..Default::default()
        };
        let mut s = Sampler::new(p, &[]);
        // p(1) ~ 0.37, p(4) ~ 0.33: top_p 0.5 keeps exactly those two.
        assert!((0..100).all(|_| matches!(s.sample(&logits()).token, 1 | 4)));
        let p = SamplingParams {
            temperature: 1.0,
            min_p: 0.95,
            seed: Some(1),
            ..Default::default()
        };
        let mut s = Sampler::new(p, &[]);
        // Only tokens within 95% of the best probability survive: 4 has exp(-0.1) = 0.905 < 0.95.
        assert!((0..100).all(|_| s.sample(&logits()).token == 1));
    }

    #[test]
    fn penalties_discourage_repeats() {
        let p = SamplingParams {
            frequency_penalty: 2.0,
            ..Default::default()
        };
        let mut s = Sampler::new(p, &[]);
        assert_eq!(s.sample(&logits()).token, 1);
        // Token 1 is penalized by 2.0 -> 1.0 < 2.9.
        assert_eq!(s.sample(&logits()).token, 4);
        let p = SamplingParams {
            repetition_penalty: 2.0,
            ..Default::default()
        };
        let mut s = Sampler::new(p, &[1]);
        // 3.0 / 2 = 1.5 < 2.9: the prompt token is penalized too.
        assert_eq!(s.sample(&logits()).token, 4);
    }

    #[test]
    fn penalty_entries_follow_the_tokens_as_they_come_out() {
        let p = SamplingParams {
            repetition_penalty: 1.3,
            presence_penalty: 0.5,
            frequency_penalty: 0.25,
            ..Default::default()
        };
        let mut s = Sampler::new(p, &[1, 1, 5]);
        for t in [5, 7, 7] {
            s.record_drawn(t);
        }
        let got: Vec<(u32, f32, f32)> = s
            .penalties()
            .iter()
            .map(|e| (e.token, e.repetition, e.subtract))
            .collect();
        // One entry per distinct token, in the order first seen; prompt-only tokens subtract nothing.
        assert_eq!(got, [(1, 1.3, 0.0), (5, 1.3, 0.75), (7, 1.3, 1.0)]);
        // Presence and frequency only: the prompt adds no entries.
        let p = SamplingParams {
            frequency_penalty: 1.0,
            ..Default::default()
        };
        let mut s = Sampler::new(p, &[1, 2, 3]);
        assert!(s.penalties().is_empty());
        s.record_drawn(9);
        let e = s.penalties();
        assert_eq!(
            (e.len(), e[0].token, e[0].repetition, e[0].subtract),
            (1, 9, 1.0, 1.0)
        );
        // No penalty at all: nothing is kept.
        let mut s = Sampler::new(SamplingParams::default(), &[1, 2, 3]);
        s.record_drawn(4);
        assert!(s.penalties().is_empty());
    }

    #[test]
    fn a_token_of_both_prompt_and_output_is_penalized_once() {
        // As vLLM and transformers do: the repetition penalty divides a seen token's logit once, however it was
        // seen. Token 1 (3.0, in the prompt) -> 1.5; after 4 (2.9 -> 1.45) and 2 (2.0 -> 1.0) come out, token 1
        // wins twice at 1.5 (penalized twice it would fall to 0.75, below token 4's 1.45).
        let p = SamplingParams {
            repetition_penalty: 2.0,
            ..Default::default()
        };
        let mut s = Sampler::new(p, &[1]);
        let got: Vec<u32> = (0..4).map(|_| s.sample(&logits()).token).collect();
        assert_eq!(got, [4, 2, 1, 1]);
    }

    #[test]
    fn draws_carry_the_penalties_the_host_applies() {
        // A sampler choosing from host logits and its clone handing out draws (as for a GPU) pick the same stream
        // with every penalty on, greedy and sampled.
        for temperature in [0.0, 0.9] {
            let p = SamplingParams {
                temperature,
                repetition_penalty: 1.3,
                presence_penalty: 0.4,
                frequency_penalty: 0.7,
                seed: Some(11),
                ..Default::default()
            };
            let mut host = Sampler::new(p, &[2, 4]);
            let mut device = host.clone();
            let mut distinct = std::collections::HashSet::new();
            for step in 0..30 {
                let l: Vec<f32> = logits()
                    .iter()
                    .map(|v| v + (step % 3) as f32 * 0.1)
                    .collect();
                let want = host.sample(&l).token;
                let d = device.next_draw();
                assert!(!d.penalties.is_empty());
                let got = draw(&l, &d);
                device.record_drawn(got);
                assert_eq!(got, want, "step {step} at temperature {temperature}");
                distinct.insert(got);
            }
            // The penalties did something: a greedy stream without them repeats one token.
            assert!(distinct.len() > 1);
        }
    }

    #[test]
    fn validation_names_the_field() {
        for (p, field) in [
            (
                SamplingParams {
                    temperature: -1.0,
                    ..Default::default()
                },
                "temperature",
            ),
            (
                SamplingParams {
                    temperature: f32::NAN,
                    ..Default::default()
                },
                "temperature",
            ),
            (
                SamplingParams {
                    top_p: 0.0,
                    ..Default::default()
                },
                "top_p",
            ),
            (
                SamplingParams {
                    min_p: 2.0,
                    ..Default::default()
                },
                "min_p",
            ),
            (
                SamplingParams {
                    repetition_penalty: 0.0,
                    ..Default::default()
                },
                "repetition_penalty",
            ),
            // Positive but so small that 1 / x overflows: refused, not drawn from NaN weights.
            (
                SamplingParams {
                    temperature: 1e-40,
                    ..Default::default()
                },
                "temperature",
            ),
            (
                SamplingParams {
                    repetition_penalty: 1e-39,
                    temperature: 1.0,
                    ..Default::default()
                },
                "repetition_penalty",
            ),
            (
                SamplingParams {
                    presence_penalty: 5.0,
                    ..Default::default()
                },
                "presence_penalty",
            ),
            (
                SamplingParams {
                    logprobs: Some(99),
                    ..Default::default()
                },
                "top_logprobs",
            ),
        ] {
            let e = p.validate().unwrap_err().to_string();
            assert!(e.contains(field), "{e}");
            assert_eq!(p.check().unwrap_err().0, field);
        }
        assert!(SamplingParams::default().validate().is_ok());
        // At the limits, the draw still picks the clear winner.
        let sharp = SamplingParams {
            temperature: MIN_TEMPERATURE,
            repetition_penalty: MIN_REPETITION_PENALTY,
            seed: Some(1),
            ..Default::default()
        };
        assert!(sharp.validate().is_ok());
        // Token 1 is in the prompt, so the penalty divides its logit by 1000 (it stays the winner: 3000 > 2.9).
        let mut s = Sampler::new(sharp, &[1]);
        let logits = [0.5f32, 3.0, -1.0, 2.9];
        assert_eq!(s.sample(&logits).token, 1);
    }
}
