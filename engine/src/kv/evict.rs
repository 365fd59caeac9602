//! Token eviction: which of a prompt's tokens keep their K/V when the cache is cut to a budget before transfer.
//!
//! A policy turns a prompt length, a [`Budget`] and (for the attention-ranked policies) the attention the prompt's
//! own queries paid to each position into a [`KeepPlan`]: for every layer and KV head, the same number of kept
//! positions in ascending order. Kept K/V is compacted into consecutive slots; since RoPE is applied before K is
//! stored, a kept key carries its true position with it, and decoding continues at the prompt's true length (the
//! engine keeps slot and position apart, see `Engine::add_sequence_evicted`).
//!
//! | policy | keeps | reference |
//! |---|---|---|
//! | `streaming` | the first [`STREAMING_SINKS`] tokens (attention sinks) and the most recent ones | StreamingLLM, Xiao et al. 2023 |
//! | `snapkv` | the last [`SNAPKV_WINDOW`] tokens, then per layer and head the positions the window's queries attend to most (scores max-pooled over [`SNAPKV_POOL`] neighbours) | SnapKV, Li et al. 2024 |
//! | `h2o` | half the budget most recent, half the heaviest accumulated attention over all prompt queries, per layer and head | H2O, Zhang et al. 2023 |
//! | `block` | whole blocks: the first and the last always, then the blocks the last [`SNAPKV_WINDOW`] prompt queries attend to most, summed over all layers, heads and the block's tokens | block-granular eviction as in PagedEviction (Chitty-Venkata et al. 2025) |
//!
//! `kept_tokens` depends only on the policy, the budget, the prompt length and the block size, so a decode worker
//! allocates exactly the blocks a prefill worker will send before either has computed anything.

use crate::error::{EngineError, Result};

/// Leading tokens `streaming` always keeps (StreamingLLM uses 4).
pub const STREAMING_SINKS: usize = 4;
/// Prompt tokens at the end whose queries rank positions for `snapkv` (and which are always kept).
pub const SNAPKV_WINDOW: usize = 32;
/// Width of the max-pool that smooths `snapkv` scores so neighbours of a chosen token come along.
pub const SNAPKV_POOL: usize = 7;

/// Which tokens a budget keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EvictionPolicy {
    Streaming,
    SnapKv,
    H2o,
    Block,
}

impl EvictionPolicy {
    pub const ALL: [EvictionPolicy; 4] = [Self::Streaming, Self::SnapKv, Self::H2o, Self::Block];

    pub fn name(self) -> &'static str {
        match self {
            Self::Streaming => "streaming",
            Self::SnapKv => "snapkv",
            Self::H2o => "h2o",
            Self::Block => "block",
        }
    }

    /// Query positions (from this one on) whose attention ranks tokens; `None` when the policy needs no scores.
    pub fn scored_from(self, prompt_len: usize) -> Option<usize> {
        match self {
            Self::Streaming => None,
            Self::SnapKv | Self::Block => Some(prompt_len.saturating_sub(SNAPKV_WINDOW)),
            Self::H2o => Some(0),
        }
    }
}

/// How much of a prompt's K/V survives eviction.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Budget {
    /// At most this many tokens.
    Tokens(u32),
    /// This fraction of the prompt, in (0, 1].
    Fraction(f32),
}

/// A policy and its budget: what a request asks for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Eviction {
    pub policy: EvictionPolicy,
    pub budget: Budget,
}

impl Eviction {
    /// Checks the budget: at least one token, a fraction in (0, 1].
    pub fn new(policy: EvictionPolicy, budget: Budget) -> Result<Self> {
        match budget {
            Budget::Tokens(0) => Err(EngineError::invalid(
                "eviction budget must keep at least 1 token",
            )),
            Budget::Fraction(f) if !(f > 0.0 && f <= 1.0) => Err(EngineError::invalid(format!(
                "eviction budget fraction {f} must be in (0, 1]"
            ))),
            _ => Ok(Self { policy, budget }),
        }
    }

    /// Parses `policy:budget`, the budget a token count (`256`) or a fraction (`0.5` or `50%`).
    pub fn parse(s: &str) -> Result<Self> {
        let bad = |why: String| EngineError::invalid(format!("eviction {s:?}: {why}"));
        let (p, b) = s.split_once(':').ok_or_else(|| {
            bad("expected policy:budget, e.g. snapkv:0.5 or streaming:256".into())
        })?;
        let policy = EvictionPolicy::ALL
            .into_iter()
            .find(|x| x.name() == p)
            .ok_or_else(|| {
                bad(format!(
                    "unknown policy {p:?} (streaming, snapkv, h2o, block)"
                ))
            })?;
        let budget = if let Some(pct) = b.strip_suffix('%') {
            let v: f32 = pct
                .parse()
                .map_err(|_| bad(format!("budget {b:?} is not a percentage")))?;
            Budget::Fraction(v / 100.0)
        } else if b.contains('.') {
            Budget::Fraction(
                b.parse()
                    .map_err(|_| bad(format!("budget {b:?} is not a fraction")))?,
            )
        } else {
            Budget::Tokens(
                b.parse()
                    .map_err(|_| bad(format!("budget {b:?} is not a token count")))?,
            )
        };
        Self::new(policy, budget).map_err(|e| bad(e.to_string()))
    }

    /// Tokens kept of a `prompt_len`-token prompt in blocks of `block_size` (at least 1, at most the prompt).
    pub fn kept_tokens(&self, prompt_len: usize, block_size: usize) -> usize {
        let target = match self.budget {
            Budget::Tokens(t) => t as usize,
            Budget::Fraction(f) => {
                // Round up, but not past an integer that only f32's rounding of the fraction missed (0.1 x 200).
                let x = f64::from(f) * prompt_len as f64;
                let near = x.round();
                (if (x - near).abs() <= x * 1e-6 {
                    near
                } else {
                    x.ceil()
                }) as usize
            }
        }
        .clamp(1, prompt_len.max(1));
        if self.policy != EvictionPolicy::Block || target >= prompt_len {
            return target;
        }
        // Whole blocks: the last (partial) block always, then as many full blocks as fit.
        let tail = prompt_len - (prompt_len - 1) / block_size * block_size;
        tail + target.saturating_sub(tail) / block_size * block_size
    }
}

impl std::fmt::Display for Eviction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.budget {
            Budget::Tokens(t) => write!(f, "{}:{t}", self.policy.name()),
            Budget::Fraction(x) => write!(f, "{}:{x}", self.policy.name()),
        }
    }
}

/// Attention probabilities summed per key position, `[layer][kv_head][position]`, over the query rows (and the
/// query heads of each KV head's group) a policy observes.
#[derive(Debug, Clone)]
pub struct AttentionScores {
    pub layers: usize,
    pub kv_heads: usize,
    pub positions: usize,
    pub sums: Vec<f32>,
}

impl AttentionScores {
    pub fn zeros(layers: usize, kv_heads: usize, positions: usize) -> Self {
        Self {
            layers,
            kv_heads,
            positions,
            sums: vec![0.0; layers * kv_heads * positions],
        }
    }
    pub fn head(&self, layer: usize, kv_head: usize) -> &[f32] {
        let at = (layer * self.kv_heads + kv_head) * self.positions;
        &self.sums[at..at + self.positions]
    }
}

/// One compacted block of one layer: K and V (`[kv_heads][block_size][head_dim]`) and the kept tokens it holds.
#[derive(Debug, Clone)]
pub struct CompactBlock {
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    pub fill: usize,
}

/// The positions each layer and KV head keeps, all of one length, ascending.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeepPlan {
    pub prompt_len: usize,
    pub kept: usize,
    pub layers: usize,
    pub kv_heads: usize,
    /// `[layer][kv_head][kept]`.
    positions: Vec<u32>,
}

impl KeepPlan {
    pub fn head(&self, layer: usize, kv_head: usize) -> &[u32] {
        let at = (layer * self.kv_heads + kv_head) * self.kept;
        &self.positions[at..at + self.kept]
    }

    /// Builds the compacted block `index` of `layer` (`[kv_heads][block_size][head_dim]` K and V, zero past the
    /// kept tokens) from the prompt's full blocks, read through `block(i) -> (K, V)`; returns its fill.
    pub fn compact_block<'a>(
        &self,
        layer: usize,
        index: usize,
        shape: super::codec::BlockShape,
        mut block: impl FnMut(usize) -> &'a (Vec<f32>, Vec<f32>),
        k: &mut [f32],
        v: &mut [f32],
    ) -> usize {
        let (bs, hd) = (shape.block_size, shape.head_dim);
        let fill = self.kept.saturating_sub(index * bs).min(bs);
        k.fill(0.0);
        v.fill(0.0);
        for h in 0..self.kv_heads {
            let keep = &self.head(layer, h)[index * bs..index * bs + fill];
            for (slot, &p) in keep.iter().enumerate() {
                let (p, dst) = (p as usize, (h * bs + slot) * hd);
                let (sk, sv) = block(p / bs);
                let src = (h * bs + p % bs) * hd;
                k[dst..dst + hd].copy_from_slice(&sk[src..src + hd]);
                v[dst..dst + hd].copy_from_slice(&sv[src..src + hd]);
            }
        }
        fill
    }
}

/// Chooses the kept positions of a `prompt_len`-token prompt. `scores` must be present (and cover the prompt) for
/// the policies whose [`EvictionPolicy::scored_from`] is `Some`.
pub fn plan(
    eviction: &Eviction,
    prompt_len: usize,
    block_size: usize,
    layers: usize,
    kv_heads: usize,
    scores: Option<&AttentionScores>,
) -> Result<KeepPlan> {
    let kept = eviction.kept_tokens(prompt_len, block_size);
    let scores = match (eviction.policy.scored_from(prompt_len), scores) {
        (None, _) => None,
        (Some(_), Some(s))
            if s.positions == prompt_len && s.layers == layers && s.kv_heads == kv_heads =>
        {
            Some(s)
        }
        (Some(_), _) => {
            return Err(EngineError::invalid(format!(
                "eviction {} needs attention scores over the {prompt_len}-token prompt",
                eviction.policy.name()
            )));
        }
    };
    let mut positions = Vec::with_capacity(layers * kv_heads * kept);
    let shared = match (eviction.policy, scores) {
        (EvictionPolicy::Streaming, _) => Some(streaming(prompt_len, kept)),
        (EvictionPolicy::Block, Some(s)) => Some(blocks(s, prompt_len, kept, block_size)),
        _ => None,
    };
    for layer in 0..layers {
        for h in 0..kv_heads {
            match (&shared, scores) {
                (Some(same), _) => positions.extend_from_slice(same),
                (None, Some(s)) => {
                    let recent = match eviction.policy {
                        EvictionPolicy::SnapKv => SNAPKV_WINDOW.min(kept),
                        _ => (kept / 2).max(1),
                    };
                    let mut ranked = s.head(layer, h).to_vec();
                    if eviction.policy == EvictionPolicy::SnapKv {
                        ranked = max_pool(&ranked, SNAPKV_POOL);
                    }
                    positions.extend(top_with_recent(&ranked, kept, recent));
                }
                (None, None) => unreachable!("scores checked above"),
            }
        }
    }
    Ok(KeepPlan {
        prompt_len,
        kept,
        layers,
        kv_heads,
        positions,
    })
}

/// Sinks then the most recent tokens.
fn streaming(n: usize, kept: usize) -> Vec<u32> {
    let sinks = STREAMING_SINKS.min(kept - 1);
    (0..sinks)
        .chain(n - (kept - sinks)..n)
        .map(|p| p as u32)
        .collect()
}

/// The last `recent` positions, then the `kept - recent` best of the rest by `score`; ascending.
fn top_with_recent(score: &[f32], kept: usize, recent: usize) -> Vec<u32> {
    let n = score.len();
    let older = n - recent;
    let mut order: Vec<usize> = (0..older).collect();
    let take = kept - recent;
    if take < older {
        order.select_nth_unstable_by(take, |&a, &b| score[b].total_cmp(&score[a]));
        order.truncate(take);
    }
    order.sort_unstable();
    order
        .into_iter()
        .chain(older..n)
        .map(|p| p as u32)
        .collect()
}

/// Each value replaced by the largest within `width / 2` positions of it.
fn max_pool(x: &[f32], width: usize) -> Vec<f32> {
    let r = width / 2;
    (0..x.len())
        .map(|i| {
            x[i.saturating_sub(r)..(i + r + 1).min(x.len())]
                .iter()
                .fold(f32::NEG_INFINITY, |m, &v| m.max(v))
        })
        .collect()
}

/// Whole blocks ranked by their mean score over every layer and head; the first and last block always stay.
fn blocks(s: &AttentionScores, n: usize, kept: usize, bs: usize) -> Vec<u32> {
    if kept >= n {
        return (0..n as u32).collect();
    }
    let nblocks = n.div_ceil(bs);
    let mut mass = vec![0f32; nblocks];
    for chunk in s.sums.chunks_exact(n) {
        for (p, &x) in chunk.iter().enumerate() {
            mass[p / bs] += x;
        }
    }
    let full_wanted = (kept - (n - (nblocks - 1) * bs)) / bs;
    let mut keep = vec![false; nblocks];
    keep[nblocks - 1] = true;
    let mut middle: Vec<usize> = (0..nblocks - 1).collect();
    middle.sort_by(|&a, &b| {
        // The first block holds the attention sinks: always first in line.
        (b == 0).cmp(&(a == 0)).then(mass[b].total_cmp(&mass[a]))
    });
    for &b in middle.iter().take(full_wanted) {
        keep[b] = true;
    }
    (0..n).filter(|&p| keep[p / bs]).map(|p| p as u32).collect()
}

#[cfg(test)]
mod tests;
