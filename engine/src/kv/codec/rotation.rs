//! The key frame kivi2 quantizes in: each key of a block turned back by its offset within the block.
//!
//! RoPE turns each pair of a key's dimensions by an angle that grows with the token's position (`p * inv_freq[i]`
//! for pair `i`), so across the tokens of a block a channel traces a sinusoid, and the per-channel range kivi2's
//! 2-bit keys are scaled to widens with it (KVQuant, Hooper et al. 2024, quantizes keys before RoPE for this
//! reason). Rotations compose: turning the key of the block's token `t` back by `t * inv_freq[i]` leaves every key
//! of the block in the frame of the block's first token, without knowing any absolute position (for a block of
//! consecutive tokens; the kept tokens of an evicted prompt are not, and gain less, but still decode exactly).
//! Turning it forward again after decoding restores the cache's keys up to float rounding. Both ends build this from
//! their own model's RoPE; the transfer layer checks that the two agree ([`KeyRotation::fingerprint_words`]).

use crate::model::{RopeConfig, RopeLayout};

/// Cosines and sines of `t * inv_freq[i]` for the tokens of a block, and which dimensions RoPE pairs.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyRotation {
    layout: RopeLayout,
    inv_freq: Vec<f32>,
    head_dim: usize,
    block_size: usize,
    /// `[t][i]`: cos and sin of `t * inv_freq[i]`.
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl KeyRotation {
    /// The rotation of a model whose keys have `head_dim` dims, for blocks of `block_size` tokens.
    pub fn new(rope: &RopeConfig, head_dim: usize, block_size: usize) -> Self {
        let inv_freq = rope.inv_freq(head_dim);
        let pairs = inv_freq.len();
        let (mut cos, mut sin) = (
            Vec::with_capacity(block_size * pairs),
            Vec::with_capacity(block_size * pairs),
        );
        for t in 0..block_size {
            for &f in &inv_freq {
                let a = t as f64 * f as f64;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        Self {
            layout: rope.layout,
            inv_freq,
            head_dim,
            block_size,
            cos,
            sin,
        }
    }

    /// Words that name this rotation for a check between two ends: the pairing, then each frequency's bits.
    pub fn fingerprint_words(&self) -> impl Iterator<Item = u32> + '_ {
        let layout = match self.layout {
            RopeLayout::Interleaved => 1,
            RopeLayout::Halves => 2,
        };
        std::iter::once(layout).chain(self.inv_freq.iter().map(|f| f.to_bits()))
    }

    /// The (head_dim, block_size) of the blocks this turns.
    pub fn block_shape(&self) -> (usize, usize) {
        (self.head_dim, self.block_size)
    }

    /// (cos, sin) of `t * inv_freq[p]` for each token `t` of a block and RoPE pair `p`, as consecutive values
    /// (`[t][p][2]`): the angles a device turns keys by, taken from here so that both sides turn alike.
    pub fn angles(&self) -> Vec<f32> {
        self.cos
            .iter()
            .zip(&self.sin)
            .flat_map(|(&c, &s)| [c, s])
            .collect()
    }

    /// Turns each key of a block (`[head][token][dim]`, the `block_size` and `head_dim` this was built for) back by
    /// its offset within the block.
    pub fn to_block_frame(&self, keys: &mut [f32]) {
        self.turn(keys, -1.0);
    }

    /// The inverse of [`KeyRotation::to_block_frame`].
    pub fn from_block_frame(&self, keys: &mut [f32]) {
        self.turn(keys, 1.0);
    }

    fn turn(&self, keys: &mut [f32], sign: f32) {
        let pairs = self.inv_freq.len();
        if self.head_dim != 2 * pairs {
            // An odd head_dim has no RoPE pairs to turn (the codec's tests use odd sizes).
            return;
        }
        for (i, key) in keys.chunks_exact_mut(self.head_dim).enumerate() {
            let t = i % self.block_size;
            if t == 0 {
                continue;
            }
            let at = t * pairs;
            for p in 0..pairs {
                let (c, s) = (self.cos[at + p], sign * self.sin[at + p]);
                let (a, b) = match self.layout {
                    RopeLayout::Interleaved => (2 * p, 2 * p + 1),
                    RopeLayout::Halves => (p, p + pairs),
                };
                let (x0, x1) = (key[a], key[b]);
                key[a] = x0 * c - x1 * s;
                key[b] = x0 * s + x1 * c;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rope(layout: RopeLayout) -> RopeConfig {
        RopeConfig {
            theta: 10_000.0,
            layout,
            freq_factors: None,
        }
    }

    /// RoPE of one key at position `p`, as the model applies it.
    fn rotate_at(key: &mut [f32], p: usize, r: &RopeConfig) {
        let hd = key.len();
        for (i, f) in r.inv_freq(hd).into_iter().enumerate() {
            let (s, c) = (p as f64 * f as f64).sin_cos();
            let (a, b) = match r.layout {
                RopeLayout::Interleaved => (2 * i, 2 * i + 1),
                RopeLayout::Halves => (i, i + hd / 2),
            };
            let (x0, x1) = (key[a] as f64, key[b] as f64);
            key[a] = (x0 * c - x1 * s) as f32;
            key[b] = (x0 * s + x1 * c) as f32;
        }
    }

    #[test]
    fn keys_of_one_raw_vector_meet_in_the_frame_of_the_block_start() {
        for layout in [RopeLayout::Interleaved, RopeLayout::Halves] {
            let (hd, bs, start) = (8, 4, 100);
            let cfg = rope(layout);
            let rot = KeyRotation::new(&cfg, hd, bs);
            let raw: Vec<f32> = (0..hd).map(|d| (d as f32 * 0.7).sin() + 0.2).collect();
            // The same raw key at the block's four positions, as the cache holds them.
            let mut block = Vec::new();
            for t in 0..bs {
                let mut k = raw.clone();
                rotate_at(&mut k, start + t, &cfg);
                block.extend(k);
            }
            let cached = block.clone();
            rot.to_block_frame(&mut block);
            let first = block[..hd].to_vec();
            for (t, k) in block.chunks(hd).enumerate() {
                for (a, b) in k.iter().zip(&first) {
                    assert!((a - b).abs() < 1e-5, "{layout:?} token {t}: {a} vs {b}");
                }
            }
            rot.from_block_frame(&mut block);
            for (a, b) in block.iter().zip(&cached) {
                assert!((a - b).abs() < 1e-5, "{layout:?}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn different_frequencies_have_different_fingerprints() {
        let a = KeyRotation::new(&rope(RopeLayout::Halves), 64, 16);
        let mut other = rope(RopeLayout::Halves);
        other.theta = 100_000.0;
        let b = KeyRotation::new(&other, 64, 16);
        let c = KeyRotation::new(&rope(RopeLayout::Interleaved), 64, 16);
        let words = |r: &KeyRotation| r.fingerprint_words().collect::<Vec<_>>();
        assert_ne!(words(&a), words(&b));
        assert_ne!(words(&a), words(&c));
        assert_eq!(
            words(&a),
            words(&KeyRotation::new(&rope(RopeLayout::Halves), 64, 8))
        );
    }
}
