//! The shape of a Llama-family model, read from GGUF metadata or an HF `config.json`.
//!
//! One struct describes every supported architecture; the differences the forward pass needs (RoPE layout, QKV
//! bias, tied output) are fields, never architecture-name checks in model code.

use crate::error::{EngineError, Result};
use crate::gguf::GgufFile;

/// The model families this engine runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Qwen2,
}

impl Architecture {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "llama" | "mistral" | "LlamaForCausalLM" | "MistralForCausalLM" => Ok(Self::Llama),
            "qwen2" | "Qwen2ForCausalLM" => Ok(Self::Qwen2),
            other => Err(EngineError::UnsupportedModel(format!(
                "architecture {other:?}; supported: llama (and mistral), qwen2"
            ))),
        }
    }
}

/// Which dimensions RoPE rotates together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeLayout {
    /// Adjacent pairs (2i, 2i+1): llama.cpp's GGUF conversion permutes Q/K rows into this layout for Llama.
    Interleaved,
    /// Halves (i, i + d/2): the HF layout, and Qwen2's in every format.
    Halves,
}

/// Rotary position embedding parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    pub theta: f32,
    pub layout: RopeLayout,
    /// Per-frequency divisors (llama3-style long-context scaling); `None` means all ones.
    pub freq_factors: Option<Vec<f32>>,
}

impl RopeConfig {
    /// Inverse frequencies, one per rotated pair: `1 / (theta^(2i/d) * factor_i)`.
    pub fn inv_freq(&self, head_dim: usize) -> Vec<f32> {
        (0..head_dim / 2)
            .map(|i| {
                let base = 1.0 / (self.theta as f64).powf(2.0 * i as f64 / head_dim as f64);
                let f = self.freq_factors.as_ref().map_or(1.0, |f| f[i] as f64);
                (base / f) as f32
            })
            .collect()
    }
}

/// Llama 3.1's frequency-dependent RoPE scaling (HF `rope_scaling` with `rope_type: "llama3"`).
pub fn llama3_freq_factors(
    theta: f32,
    head_dim: usize,
    factor: f32,
    low_freq_factor: f32,
    high_freq_factor: f32,
    original_context: f32,
) -> Vec<f32> {
    let low_wavelen = original_context / low_freq_factor;
    let high_wavelen = original_context / high_freq_factor;
    (0..head_dim / 2)
        .map(|i| {
            let freq = 1.0 / theta.powf(2.0 * i as f32 / head_dim as f32);
            let wavelen = 2.0 * std::f32::consts::PI / freq;
            if wavelen < high_wavelen {
                1.0
            } else if wavelen > low_wavelen {
                factor
            } else {
                let smooth = (original_context / wavelen - low_freq_factor)
                    / (high_freq_factor - low_freq_factor);
                // The scaled frequency is (1 - s) * f / factor + s * f; express it as a divisor of f.
                1.0 / ((1.0 - smooth) / factor + smooth)
            }
        })
        .collect()
}

/// Everything the forward pass needs to know about the model's shape.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub ffn: usize,
    pub vocab: usize,
    pub context_len: usize,
    pub rms_eps: f32,
    pub rope: RopeConfig,
    pub qkv_bias: bool,
}

impl ModelConfig {
    /// Reads `{arch}.*` keys from GGUF metadata.
    pub fn from_gguf(f: &GgufFile) -> Result<Self> {
        let arch_name = f
            .get_str("general.architecture")
            .ok_or_else(|| EngineError::malformed("metadata general.architecture is missing"))?;
        let architecture = Architecture::parse(arch_name)?;
        let key = |k: &str| format!("{arch_name}.{k}");
        let req = |k: &str| -> Result<usize> {
            let v = f
                .get_u64(&key(k))
                .ok_or_else(|| EngineError::malformed(format!("metadata {} is missing", key(k))))?;
            usize::try_from(v).map_err(|_| {
                EngineError::malformed(format!("metadata {} = {v} is too large", key(k)))
            })
        };
        let hidden = req("embedding_length")?;
        let heads = req("attention.head_count")?;
        let kv_heads = f
            .get_u64(&key("attention.head_count_kv"))
            .map_or(heads, |v| v as usize);
        let head_dim = match f.get_u64(&key("attention.key_length")) {
            Some(v) => v as usize,
            None => hidden.checked_div(heads).unwrap_or(0),
        };
        let vocab = match f.get_u64(&key("vocab_size")) {
            Some(v) => v as usize,
            None => f.get_str_array("tokenizer.ggml.tokens")?.len(),
        };
        let theta = f.get_f64(&key("rope.freq_base")).unwrap_or(10000.0) as f32;
        let layout = match architecture {
            Architecture::Llama => RopeLayout::Interleaved,
            Architecture::Qwen2 => RopeLayout::Halves,
        };
        let cfg = Self {
            architecture,
            hidden,
            layers: req("block_count")?,
            heads,
            kv_heads,
            head_dim,
            ffn: req("feed_forward_length")?,
            vocab,
            context_len: req("context_length")?,
            rms_eps: f
                .get_f64(&key("attention.layer_norm_rms_epsilon"))
                .unwrap_or(1e-5) as f32,
            rope: RopeConfig {
                theta,
                layout,
                freq_factors: None,
            },
            qkv_bias: architecture == Architecture::Qwen2,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads an HF `config.json`.
    pub fn from_hf_config(json: &serde_json::Value) -> Result<Self> {
        let get = |k: &str| json.get(k).and_then(|v| v.as_u64()).map(|v| v as usize);
        let req = |k: &str| {
            get(k).ok_or_else(|| EngineError::malformed(format!("config.json: {k} is missing")))
        };
        let arch_name = json
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(|a| a.as_str())
            .or_else(|| json.get("model_type").and_then(|m| m.as_str()))
            .ok_or_else(|| {
                EngineError::malformed("config.json: architectures and model_type are missing")
            })?;
        let architecture = Architecture::parse(arch_name)?;
        let hidden = req("hidden_size")?;
        let heads = req("num_attention_heads")?;
        let head_dim = get("head_dim").unwrap_or(hidden.checked_div(heads).unwrap_or(0));
        // transformers 5 writes one `rope_parameters` object (rope_theta, rope_type and the scaling's numbers);
        // earlier versions put `rope_theta` and `rope_scaling` at the top level.
        let rope_params = json.get("rope_parameters").filter(|v| v.is_object());
        let theta = json
            .get("rope_theta")
            .or_else(|| rope_params.and_then(|p| p.get("rope_theta")))
            .and_then(|v| v.as_f64())
            .unwrap_or(10000.0) as f32;
        let scaling = json
            .get("rope_scaling")
            .filter(|v| !v.is_null())
            .or(rope_params);
        let freq_factors = match scaling {
            None => None,
            Some(s) => {
                let kind = s
                    .get("rope_type")
                    .or_else(|| s.get("type"))
                    .and_then(|v| v.as_str())
                    .unwrap_or("");
                let num = |k: &str, d: f64| s.get(k).and_then(|v| v.as_f64()).unwrap_or(d) as f32;
                match kind {
                    "llama3" => Some(llama3_freq_factors(
                        theta,
                        head_dim,
                        num("factor", 8.0),
                        num("low_freq_factor", 1.0),
                        num("high_freq_factor", 4.0),
                        num("original_max_position_embeddings", 8192.0),
                    )),
                    "default" | "" => None,
                    other => {
                        return Err(EngineError::UnsupportedModel(format!(
                            "config.json: rope_scaling type {other:?}"
                        )));
                    }
                }
            }
        };
        let cfg = Self {
            architecture,
            hidden,
            layers: req("num_hidden_layers")?,
            heads,
            kv_heads: get("num_key_value_heads").unwrap_or(heads),
            head_dim,
            ffn: req("intermediate_size")?,
            vocab: req("vocab_size")?,
            context_len: get("max_position_embeddings").unwrap_or(4096),
            rms_eps: json
                .get("rms_norm_eps")
                .and_then(|v| v.as_f64())
                .unwrap_or(1e-5) as f32,
            rope: RopeConfig {
                theta,
                layout: RopeLayout::Halves,
                freq_factors,
            },
            qkv_bias: architecture == Architecture::Qwen2,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(EngineError::malformed(m));
        if self.hidden == 0
            || self.heads == 0
            || self.kv_heads == 0
            || self.layers == 0
            || self.vocab == 0
        {
            return bad(format!("model has a zero dimension: {self:?}"));
        }
        if !self.heads.is_multiple_of(self.kv_heads) {
            return bad(format!(
                "{} attention heads are not a multiple of {} KV heads",
                self.heads, self.kv_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) || self.head_dim > 512 {
            return bad(format!(
                "head_dim {} must be even and at most 512",
                self.head_dim
            ));
        }
        if !self.hidden.is_multiple_of(32) || !self.ffn.is_multiple_of(32) {
            return bad(format!(
                "hidden {} and ffn {} must be multiples of 32",
                self.hidden, self.ffn
            ));
        }
        if self.rope.theta <= 0.0 || !self.rope.theta.is_finite() {
            return bad(format!("rope theta {} must be positive", self.rope.theta));
        }
        Ok(())
    }

    pub fn q_dim(&self) -> usize {
        self.heads * self.head_dim
    }
    pub fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }
    /// Parameters in the matrices a token passes through (embeddings excluded, output head included).
    pub fn matmul_params(&self) -> u64 {
        let per_layer = self.hidden * (self.q_dim() + 2 * self.kv_dim())
            + self.q_dim() * self.hidden
            + 3 * self.hidden * self.ffn;
        (per_layer * self.layers + self.vocab * self.hidden) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_scaling_keeps_high_frequencies_and_divides_low_ones() {
        // Llama 3.1's published parameters: theta 500000, factor 8, low 1, high 4, original context 8192.
        let f = llama3_freq_factors(500_000.0, 128, 8.0, 1.0, 4.0, 8192.0);
        assert_eq!(f.len(), 64);
        assert_eq!(f[0], 1.0, "the fastest-rotating pair is untouched");
        assert_eq!(f[63], 8.0, "the slowest pair is divided by the full factor");
        assert!(
            f.windows(2).all(|w| w[0] <= w[1] + 1e-6),
            "factors grow monotonically"
        );
        let rope = RopeConfig {
            theta: 500_000.0,
            layout: RopeLayout::Halves,
            freq_factors: Some(f),
        };
        let inv = rope.inv_freq(128);
        assert!((inv[0] - 1.0).abs() < 1e-6);
        assert!((inv[63] * 8.0 - 1.0 / 500_000f32.powf(126.0 / 128.0)).abs() < 1e-9);
    }

    #[test]
    fn hf_config_reads_rope_from_either_place() {
        let base = serde_json::json!({"architectures": ["LlamaForCausalLM"], "hidden_size": 256,
            "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2, "vocab_size": 100});
        let with = |extra: serde_json::Value| {
            let mut j = base.clone();
            j.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            ModelConfig::from_hf_config(&j).unwrap().rope
        };
        // transformers < 5: top-level keys.
        let old = with(
            serde_json::json!({"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3",
            "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}),
        );
        // transformers 5: one rope_parameters object.
        let new = with(
            serde_json::json!({"rope_parameters": {"rope_theta": 500000.0, "rope_type": "llama3",
            "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}),
        );
        assert_eq!(old.theta, 500_000.0);
        assert_eq!(new.theta, 500_000.0);
        assert_eq!(old.freq_factors, new.freq_factors);
        assert!(new.freq_factors.is_some());
        let plain = with(
            serde_json::json!({"rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}}),
        );
        assert_eq!((plain.theta, plain.freq_factors), (100_000.0, None));
        assert_eq!(with(serde_json::json!({})).theta, 10_000.0);
    }

    #[test]
    fn hf_config_reads_shape_and_rejects_bad_values() {
        let j = serde_json::json!({"architectures": ["Qwen2ForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100});
        let c = ModelConfig::from_hf_config(&j).unwrap();
        assert_eq!(
            (c.architecture, c.head_dim, c.kv_heads, c.qkv_bias),
            (Architecture::Qwen2, 16, 2, true)
        );
        let bad = serde_json::json!({"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 3, "vocab_size": 100});
        assert!(
            ModelConfig::from_hf_config(&bad)
                .unwrap_err()
                .to_string()
                .contains("KV heads")
        );
        let unknown = serde_json::json!({"architectures": ["GPT2LMHeadModel"]});
        assert!(
            ModelConfig::from_hf_config(&unknown)
                .unwrap_err()
                .to_string()
                .contains("architecture")
        );
    }
}
