//! Where a request goes: pure functions from the request's shape and a snapshot of the candidate workers to a
//! decode worker and (or not) a prefill worker. No sockets, no clocks: the live router and `tandem simulate` feed
//! the same code, and the tests below drive it with hand-built snapshots.
//!
//! The `cost` policy estimates, in seconds, what each choice costs the request before its first token: the prompt
//! tokens the prefill worker must still compute after its cached prefix, the work queued ahead of it there, the KV
//! bytes that must cross from prefill to decode worker (what the decode worker lacks, times the bytes per token of
//! the codec and eviction in use), and the decode worker's own queue and batch. The three groups are weighted by
//! knobs. Because the prefill term depends only on the prefill worker and the transfer term only on the decode
//! worker (bytes are what the decode side lacks), the two picks separate and a decision costs O(workers).
//! Conditional disaggregation: when what the decode worker lacks is short and computing it there costs less than the
//! way through a prefill worker, or every prefill worker's queue is past its saturation mark, the decode worker
//! prefills itself and no bytes move.
//!
//! Equal candidates must share load rather than herd onto the first one: `softmax` draws a candidate with
//! probability proportional to `exp(-(cost - best) / temperature)`; `power-of-two` compares two random
//! candidates; `argmin` takes the best (ties to the least loaded, then the lowest index).

use crate::index::WorkerId;
use tandem_engine::rng::Rng;

/// The policies `--policy` selects between (`cost` is the default; the others are for comparison).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PolicyKind {
    RoundRobin,
    LeastLoaded,
    /// The longest cached prefix, ties to the least loaded; load is otherwise ignored.
    Prefix,
    Cost,
}

impl PolicyKind {
    pub const ALL: [PolicyKind; 4] = [
        PolicyKind::RoundRobin,
        PolicyKind::LeastLoaded,
        PolicyKind::Prefix,
        PolicyKind::Cost,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::RoundRobin => "round-robin",
            Self::LeastLoaded => "least-loaded",
            Self::Prefix => "prefix",
            Self::Cost => "cost",
        }
    }
}

impl std::fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for PolicyKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| {
                format!("unknown routing policy {s:?}; expected round-robin, least-loaded, prefix or cost")
            })
    }
}

/// How a policy picks among candidates whose costs are close.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Spread {
    Argmin,
    /// Probability proportional to `exp(-(cost - best) / temperature_s)`.
    Softmax {
        temperature_s: f64,
    },
    PowerOfTwo,
}

/// A worker's load as its reports (and this router's own bookkeeping) describe it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Load {
    /// Requests generating now.
    pub running: u32,
    /// Requests admitted but not yet generating (waiting for KV, prefill or room).
    pub waiting: u32,
    /// Prompt tokens admitted but not yet computed.
    pub queued_prefill_tokens: u64,
    /// Blocks an allocation could obtain now (free plus evictable cached).
    pub kv_blocks_free: u32,
}

/// What the policy sees of one worker.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    pub id: WorkerId,
    pub healthy: bool,
    /// Leading blocks of this request's prompt the worker holds (from the prefix index).
    pub cached_blocks: usize,
    pub load: Load,
}

/// What the policy knows of the request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RequestShape {
    pub prompt_tokens: usize,
    pub max_tokens: usize,
    pub block_size: usize,
    /// KV bytes per prompt token on the wire, after the request's codec and eviction.
    pub kv_bytes_per_token: f64,
}

/// The cost policy's model and knobs; seconds throughout.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CostModel {
    /// Seconds per prompt token on a prefill worker.
    pub prefill_s_per_token: f64,
    /// Seconds per prompt token when a decode worker prefills for itself (it shares the device with decoding).
    pub local_prefill_s_per_token: f64,
    /// Seconds per KV byte moved (one over the link's bandwidth).
    pub transfer_s_per_byte: f64,
    /// Seconds one more running or waiting request adds to each decode step (the cost counts it for every token
    /// the request may generate).
    pub decode_s_per_request: f64,
    /// Decode steps over which a busier decode worker's slowdown is counted (at most the request's max_tokens).
    pub decode_horizon_tokens: usize,
    /// Weight of the prompt tokens to compute.
    pub w_prefill: f64,
    /// Weight of work queued ahead of the request.
    pub w_queue: f64,
    /// Weight of the KV bytes to move.
    pub w_transfer: f64,
    /// Uncached prompt tokens up to which a decode worker may prefill for itself, when that costs less than a
    /// prefill worker and the transfer (a follow-up turn whose history the decode worker already holds).
    pub local_prefill_max_tokens: usize,
    /// Queued prefill tokens past which a prefill worker counts as saturated; when all are, decode workers prefill.
    pub prefill_saturated_tokens: u64,
    pub spread: Spread,
}

impl Default for CostModel {
    /// Figures of the CPU engine on the development machine (bench/RESULTS.md): about 300 prompt tokens/s,
    /// loopback gRPC near 1 GB/s, a decode step growing ~4 ms per sequence at small batches.
    fn default() -> Self {
        let prefill = 1.0 / 300.0;
        Self {
            prefill_s_per_token: prefill,
            local_prefill_s_per_token: prefill * 1.5,
            transfer_s_per_byte: 1e-9,
            decode_s_per_request: 0.004,
            decode_horizon_tokens: 32,
            w_prefill: 1.0,
            w_queue: 1.0,
            w_transfer: 1.0,
            local_prefill_max_tokens: 256,
            prefill_saturated_tokens: 8192,
            spread: Spread::Softmax {
                temperature_s: Self::default_temperature(prefill, 16),
            },
        }
    }
}

impl CostModel {
    /// One block's prefill time: candidates within about that of the best are nearly interchangeable.
    pub fn default_temperature(prefill_s_per_token: f64, block_size: usize) -> f64 {
        prefill_s_per_token * block_size as f64
    }
}

/// The choice: indexes into the candidate slices, and what the policy expected.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decision {
    pub decode: usize,
    /// `None`: the decode worker prefills the prompt itself.
    pub prefill: Option<usize>,
    /// Prompt tokens the chosen workers are expected to find cached (the prefill worker's when one is used).
    pub cached_tokens: usize,
    /// The cost policy's estimate; 0 for the others.
    pub cost_s: f64,
}

/// A policy with its state (round-robin cursors, the random source of its spread).
#[derive(Debug, Clone)]
pub struct Policy {
    pub kind: PolicyKind,
    pub model: CostModel,
    next_decode: usize,
    next_prefill: usize,
    rng: Rng,
    scratch: Vec<f64>,
}

impl Policy {
    pub fn new(kind: PolicyKind, model: CostModel, seed: u64) -> Self {
        Self {
            kind,
            model,
            next_decode: 0,
            next_prefill: 0,
            rng: Rng::new(seed),
            scratch: Vec::new(),
        }
    }

    /// Picks the workers for one request; `None` when no decode worker is healthy. An empty or all-unhealthy
    /// prefill list means local prefill.
    pub fn decide(
        &mut self,
        req: &RequestShape,
        decode: &[Candidate],
        prefill: &[Candidate],
    ) -> Option<Decision> {
        let decision = match self.kind {
            PolicyKind::RoundRobin => {
                let d = round_robin(decode, &mut self.next_decode)?;
                let p = round_robin(prefill, &mut self.next_prefill);
                Decision {
                    decode: d,
                    prefill: p,
                    cached_tokens: 0,
                    cost_s: 0.0,
                }
            }
            PolicyKind::LeastLoaded => Decision {
                decode: argmin_by(decode, |c| (0, queue_of(c)))?,
                prefill: argmin_by(prefill, |c| (0, queue_of(c))),
                cached_tokens: 0,
                cost_s: 0.0,
            },
            PolicyKind::Prefix => {
                let by_cache = |c: &Candidate| (usize::MAX - c.cached_blocks, queue_of(c));
                let d = argmin_by(decode, by_cache)?;
                let p = argmin_by(prefill, by_cache);
                Decision {
                    decode: d,
                    prefill: p,
                    cached_tokens: 0,
                    cost_s: 0.0,
                }
            }
            PolicyKind::Cost => return self.cost(req, decode, prefill),
        };
        let cached_blocks = match decision.prefill {
            Some(p) => prefill[p].cached_blocks,
            None => decode[decision.decode].cached_blocks,
        };
        Some(Decision {
            cached_tokens: cached_tokens(req, cached_blocks),
            ..decision
        })
    }

    fn cost(
        &mut self,
        req: &RequestShape,
        decode: &[Candidate],
        prefill: &[Candidate],
    ) -> Option<Decision> {
        let m = self.model;
        // The prefill worker: its own uncached tokens plus its queue.
        let prefill_cost = |c: &Candidate| {
            let todo = uncached(req, c.cached_blocks) as f64;
            m.prefill_s_per_token
                * (m.w_prefill * todo + m.w_queue * c.load.queued_prefill_tokens as f64)
        };
        let saturated = prefill
            .iter()
            .filter(|c| c.healthy)
            .all(|c| c.load.queued_prefill_tokens >= m.prefill_saturated_tokens);
        let p = if saturated {
            None
        } else {
            self.pick(prefill, prefill_cost)
        };
        let remote = p.map(|p| prefill_cost(&prefill[p]));
        // Blocks the decode worker must find room for: the whole prompt's tail past its cache, and the output.
        let blocks_needed = |c: &Candidate| {
            (req.prompt_tokens + req.max_tokens).div_ceil(req.block_size) - c.cached_blocks
        };
        let roomy = decode
            .iter()
            .any(|c| c.healthy && c.load.kv_blocks_free as usize >= blocks_needed(c));
        let decode_cost = |c: &Candidate| -> (f64, bool) {
            let lacks = uncached(req, c.cached_blocks);
            // Each request already there slows every one of this request's decode steps.
            let batch = (c.load.running + c.load.waiting) as f64;
            let queue = m.w_queue
                * (m.decode_s_per_request
                    * batch
                    * req.max_tokens.min(m.decode_horizon_tokens) as f64
                    + m.local_prefill_s_per_token * c.load.queued_prefill_tokens as f64);
            // A worker without room for the request would have to preempt or queue it: last resort only.
            let full = if roomy && (c.load.kv_blocks_free as usize) < blocks_needed(c) {
                1e3
            } else {
                0.0
            };
            let local = queue + full + m.w_prefill * m.local_prefill_s_per_token * lacks as f64;
            let Some(r) = remote else {
                return (local, false);
            };
            let bytes = lacks as f64 * req.kv_bytes_per_token;
            let disaggregated = queue + full + r + m.w_transfer * m.transfer_s_per_byte * bytes;
            if lacks <= m.local_prefill_max_tokens && local <= disaggregated {
                (local, false)
            } else {
                (disaggregated, true)
            }
        };
        let d = self.pick(decode, |c| decode_cost(c).0)?;
        let (cost_s, uses_prefill) = decode_cost(&decode[d]);
        let chosen = p.filter(|_| uses_prefill);
        let cached_blocks = match chosen {
            Some(p) => prefill[p].cached_blocks,
            None => decode[d].cached_blocks,
        };
        Some(Decision {
            decode: d,
            prefill: chosen,
            cached_tokens: cached_tokens(req, cached_blocks),
            cost_s,
        })
    }

    /// Index of the candidate the spread picks by `cost`, among the healthy ones.
    fn pick(&mut self, cands: &[Candidate], cost: impl Fn(&Candidate) -> f64) -> Option<usize> {
        match self.model.spread {
            Spread::Argmin => argmin_by(cands, |c| (ordered(cost(c)), queue_of(c))),
            Spread::PowerOfTwo => {
                let healthy = cands.iter().filter(|c| c.healthy).count();
                if healthy == 0 {
                    return None;
                }
                let nth = |k: usize| {
                    cands
                        .iter()
                        .enumerate()
                        .filter(|(_, c)| c.healthy)
                        .nth(k)
                        .map(|(i, _)| i)
                };
                let a = nth(self.rng.below(healthy))?;
                let b = nth(self.rng.below(healthy))?;
                Some(if cost(&cands[b]) < cost(&cands[a]) {
                    b
                } else {
                    a
                })
            }
            Spread::Softmax { temperature_s } => {
                let costs = &mut self.scratch;
                costs.clear();
                costs.extend(
                    cands
                        .iter()
                        .map(|c| if c.healthy { cost(c) } else { f64::INFINITY }),
                );
                let best = costs.iter().copied().fold(f64::INFINITY, f64::min);
                if !best.is_finite() {
                    return None;
                }
                let t = temperature_s.max(1e-12);
                let mut total = 0.0;
                for c in costs.iter_mut() {
                    let z = (*c - best) / t;
                    // exp(-40) < 5e-18: such a candidate is never drawn, so skip the exp.
                    *c = if z < 40.0 { (-z).exp() } else { 0.0 };
                    total += *c;
                }
                let mut x = self.rng.unit() * total;
                for (i, w) in costs.iter().enumerate() {
                    if x < *w {
                        return Some(i);
                    }
                    x -= w;
                }
                costs.iter().rposition(|&w| w > 0.0)
            }
        }
    }
}

/// Prompt tokens a worker holding `blocks` leading blocks must still compute (at least the last one, whose logits
/// give the first token).
fn uncached(req: &RequestShape, blocks: usize) -> usize {
    req.prompt_tokens
        .saturating_sub(blocks * req.block_size)
        .max(1)
}

fn cached_tokens(req: &RequestShape, blocks: usize) -> usize {
    (blocks * req.block_size).min(req.prompt_tokens.saturating_sub(1))
}

/// Requests and prompt tokens ahead of a new one, for tie-breaking.
fn queue_of(c: &Candidate) -> (u32, u64) {
    (
        c.load.running + c.load.waiting,
        c.load.queued_prefill_tokens,
    )
}

/// A total order on finite costs (NaN sorts last).
fn ordered(x: f64) -> u64 {
    if x.is_nan() {
        u64::MAX
    } else {
        (x.max(0.0) * 1e9) as u64
    }
}

/// The healthy candidate with the smallest key, the first among equals.
fn argmin_by<K: Ord>(cands: &[Candidate], key: impl Fn(&Candidate) -> K) -> Option<usize> {
    cands
        .iter()
        .enumerate()
        .filter(|(_, c)| c.healthy)
        .min_by_key(|(i, c)| (key(c), *i))
        .map(|(i, _)| i)
}

/// The next healthy candidate after the cursor.
fn round_robin(cands: &[Candidate], cursor: &mut usize) -> Option<usize> {
    let n = cands.len();
    (0..n)
        .map(|k| (*cursor + k) % n)
        .find(|&i| cands[i].healthy)
        .inspect(|&i| {
            *cursor = i + 1;
        })
}

#[cfg(test)]
mod tests;
