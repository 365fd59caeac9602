//! Seeded dummy weights at the shapes of named real models, for benchmarks and device checks that must not
//! download gigabytes (as vLLM's `dummy` load format does). Every value is a pure function of the seed, the tensor
//! and the element index, so two loads (on any backend, on any machine) see identical weights.
//!
//! Matrices are bf16, uniform in `±sqrt(3 / cols)` so each projection keeps its input's scale; norm weights are f32
//! near 1; embeddings uniform in ±1. The tensors live in one buffer laid out like a GGUF file's data section and are
//! handed out as ordinary [`WeightView`](super::source::WeightView)s.

use crate::error::{EngineError, Result};
use crate::gguf::SharedBytes;
use crate::model::config::{
    Architecture, ModelConfig, RopeConfig, RopeLayout, llama3_freq_factors,
};
use crate::quant::GgmlType;
use std::collections::HashMap;

/// Real models whose shapes dummy weights can take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NamedShape {
    Llama31_8B,
    Qwen25_7B,
    SmolLM2_135M,
}

impl NamedShape {
    pub const ALL: [NamedShape; 3] = [Self::Llama31_8B, Self::Qwen25_7B, Self::SmolLM2_135M];

    pub fn name(self) -> &'static str {
        match self {
            Self::Llama31_8B => "llama-3.1-8b",
            Self::Qwen25_7B => "qwen2.5-7b",
            Self::SmolLM2_135M => "smollm2-135m",
        }
    }

    /// The model's shape (from its published config.json).
    pub fn config(self) -> ModelConfig {
        match self {
            Self::Llama31_8B => ModelConfig {
                architecture: Architecture::Llama,
                hidden: 4096,
                layers: 32,
                heads: 32,
                kv_heads: 8,
                head_dim: 128,
                ffn: 14336,
                vocab: 128_256,
                context_len: 131_072,
                rms_eps: 1e-5,
                rope: RopeConfig {
                    theta: 500_000.0,
                    layout: RopeLayout::Halves,
                    freq_factors: Some(llama3_freq_factors(500_000.0, 128, 8.0, 1.0, 4.0, 8192.0)),
                },
                qkv_bias: false,
            },
            Self::Qwen25_7B => ModelConfig {
                architecture: Architecture::Qwen2,
                hidden: 3584,
                layers: 28,
                heads: 28,
                kv_heads: 4,
                head_dim: 128,
                ffn: 18944,
                vocab: 152_064,
                context_len: 32_768,
                rms_eps: 1e-6,
                rope: RopeConfig {
                    theta: 1_000_000.0,
                    layout: RopeLayout::Halves,
                    freq_factors: None,
                },
                qkv_bias: true,
            },
            Self::SmolLM2_135M => ModelConfig {
                architecture: Architecture::Llama,
                hidden: 576,
                layers: 30,
                heads: 9,
                kv_heads: 3,
                head_dim: 64,
                ffn: 1536,
                vocab: 49_152,
                context_len: 8192,
                rms_eps: 1e-5,
                rope: RopeConfig {
                    theta: 100_000.0,
                    layout: RopeLayout::Halves,
                    freq_factors: None,
                },
                qkv_bias: false,
            },
        }
    }

    /// Whether the output head is its own matrix (not tied to the embeddings).
    fn untied_output(self) -> bool {
        !matches!(self, Self::SmolLM2_135M)
    }
}

impl std::str::FromStr for NamedShape {
    type Err = EngineError;
    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|n| n.name() == s.to_ascii_lowercase())
            .ok_or_else(|| {
                let names: Vec<_> = Self::ALL.iter().map(|n| n.name()).collect();
                EngineError::UnsupportedModel(format!(
                    "dummy shape {s:?}; known: {}",
                    names.join(", ")
                ))
            })
    }
}

/// Where one tensor lives in the buffer.
#[derive(Debug, Clone, Copy)]
pub struct DummyTensor {
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    pub start: usize,
}

/// Every tensor of a dummy model, in one buffer.
pub struct DummyWeights {
    pub shape: NamedShape,
    pub config: ModelConfig,
    pub backing: SharedBytes,
    pub tensors: HashMap<String, DummyTensor>,
}

/// What a tensor holds.
#[derive(Clone, Copy)]
enum Fill {
    /// bf16, uniform in ±scale.
    Matrix(f32),
    /// f32, uniform in 1 ± spread.
    Norm(f32),
    /// f32, uniform in ±scale.
    Bias(f32),
}

impl DummyWeights {
    pub fn new(shape: NamedShape, seed: u64) -> Self {
        let c = shape.config();
        let (d, qd, kvd) = (c.hidden, c.q_dim(), c.kv_dim());
        let m = |cols: usize| Fill::Matrix((3.0 / cols as f32).sqrt());
        let mut plan: Vec<(String, usize, usize, Fill)> = vec![
            ("token_embd.weight".into(), c.vocab, d, Fill::Matrix(1.0)),
            ("output_norm.weight".into(), 1, d, Fill::Norm(0.1)),
        ];
        if shape.untied_output() {
            plan.push(("output.weight".into(), c.vocab, d, m(d)));
        }
        for i in 0..c.layers {
            let p = |s: &str| format!("blk.{i}.{s}");
            plan.extend([
                (p("attn_norm.weight"), 1, d, Fill::Norm(0.1)),
                (p("attn_q.weight"), qd, d, m(d)),
                (p("attn_k.weight"), kvd, d, m(d)),
                (p("attn_v.weight"), kvd, d, m(d)),
                (p("attn_output.weight"), d, qd, m(qd)),
                (p("ffn_norm.weight"), 1, d, Fill::Norm(0.1)),
                (p("ffn_gate.weight"), c.ffn, d, m(d)),
                (p("ffn_up.weight"), c.ffn, d, m(d)),
                (p("ffn_down.weight"), d, c.ffn, m(c.ffn)),
            ]);
            if c.qkv_bias {
                plan.extend([
                    (p("attn_q.bias"), 1, qd, Fill::Bias(0.1)),
                    (p("attn_k.bias"), 1, kvd, Fill::Bias(0.1)),
                    (p("attn_v.bias"), 1, kvd, Fill::Bias(0.1)),
                ]);
            }
        }
        let mut tensors = HashMap::new();
        let mut total = 0usize;
        for (name, rows, cols, fill) in &plan {
            let ty = match fill {
                Fill::Matrix(_) => GgmlType::BF16,
                _ => GgmlType::F32,
            };
            let start = total.next_multiple_of(64);
            total = start + rows * cols * ty.block_bytes();
            tensors.insert(
                name.clone(),
                DummyTensor {
                    ty,
                    rows: *rows,
                    cols: *cols,
                    start,
                },
            );
        }
        let mut bytes = vec![0u8; total];
        let jobs: Vec<(usize, &str, Fill)> = plan
            .iter()
            .enumerate()
            .map(|(i, (name, _, _, fill))| (i, name.as_str(), *fill))
            .collect();
        fill_all(&mut bytes, &jobs, &tensors, seed);
        Self {
            shape,
            config: c,
            backing: std::sync::Arc::new(bytes),
            tensors,
        }
    }

    /// Bytes of all tensors.
    pub fn bytes(&self) -> usize {
        (*self.backing).as_ref().len()
    }
}

/// A uniform value in [-1, 1) from (seed, tensor, index): SplitMix64's finalizer over the mixed counter.
fn unit(seed: u64, tensor: usize, i: usize) -> f32 {
    let mut z = seed ^ ((tensor as u64) << 40) ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    ((z >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
}

/// Fills every tensor, splitting the work over the machine's cores (an 8B model is 16 GB of bf16).
fn fill_all(
    bytes: &mut [u8],
    jobs: &[(usize, &str, Fill)],
    tensors: &HashMap<String, DummyTensor>,
    seed: u64,
) {
    // Carve the buffer into per-tensor slices, then each tensor into chunks of whole elements.
    const CHUNK: usize = 1 << 22;
    let mut work: Vec<(usize, Fill, usize, &mut [u8], usize)> = Vec::new();
    let mut sorted: Vec<_> = jobs
        .iter()
        .map(|&(ti, name, fill)| (ti, fill, tensors[name]))
        .collect();
    sorted.sort_by_key(|(_, _, t)| t.start);
    let mut rest = bytes;
    let mut at = 0;
    for (ti, fill, t) in sorted {
        let (_, tail) = rest.split_at_mut(t.start - at);
        let len = t.rows * t.cols * t.ty.block_bytes();
        let (mine, tail) = tail.split_at_mut(len);
        rest = tail;
        at = t.start + len;
        let elem = t.ty.block_bytes();
        for (ci, chunk) in mine.chunks_mut(CHUNK * elem).enumerate() {
            work.push((ti, fill, elem, chunk, ci * CHUNK));
        }
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per = work.len().div_ceil(threads).max(1);
    std::thread::scope(|s| {
        while !work.is_empty() {
            let batch: Vec<_> = work.drain(..per.min(work.len())).collect();
            s.spawn(move || {
                for (ti, fill, elem, chunk, first) in batch {
                    for (j, out) in chunk.chunks_exact_mut(elem).enumerate() {
                        let u = unit(seed, ti, first + j);
                        match fill {
                            Fill::Matrix(scale) => {
                                out.copy_from_slice(&half::bf16::from_f32(u * scale).to_le_bytes())
                            }
                            Fill::Norm(spread) => {
                                out.copy_from_slice(&(1.0 + u * spread).to_le_bytes())
                            }
                            Fill::Bias(scale) => out.copy_from_slice(&(u * scale).to_le_bytes()),
                        }
                    }
                }
            });
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_unknown_ones_list_the_known() {
        assert_eq!(
            "Llama-3.1-8B".parse::<NamedShape>().unwrap(),
            NamedShape::Llama31_8B
        );
        let e = "gpt-5".parse::<NamedShape>().unwrap_err().to_string();
        assert!(e.contains("smollm2-135m"), "{e}");
    }

    #[test]
    fn the_same_seed_gives_the_same_bytes_and_another_seed_others() {
        let a = DummyWeights::new(NamedShape::SmolLM2_135M, 1);
        let b = DummyWeights::new(NamedShape::SmolLM2_135M, 1);
        let c = DummyWeights::new(NamedShape::SmolLM2_135M, 2);
        let (a, b, c) = (
            (*a.backing).as_ref(),
            (*b.backing).as_ref(),
            (*c.backing).as_ref(),
        );
        assert!(a == b);
        assert!(a != c);
    }

    #[test]
    fn values_have_the_stated_ranges() {
        let w = DummyWeights::new(NamedShape::SmolLM2_135M, 3);
        let bytes = (*w.backing).as_ref();
        let t = w.tensors["blk.0.attn_q.weight"];
        let scale = (3.0f32 / 576.0).sqrt();
        let vals: Vec<f32> = bytes[t.start..t.start + t.rows * t.cols * 2]
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect();
        assert!(vals.iter().all(|v| v.abs() <= scale * 1.01));
        let mean_sq = vals.iter().map(|v| v * v).sum::<f32>() / vals.len() as f32;
        assert!(
            (mean_sq - scale * scale / 3.0).abs() < 0.05 * scale * scale,
            "{mean_sq}"
        );
        let n = w.tensors["blk.0.attn_norm.weight"];
        let norm: Vec<f32> = bytes[n.start..n.start + 576 * 4]
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        assert!(norm.iter().all(|v| (0.9..=1.1).contains(v)));
    }
}
