//! Llama-family models: their configuration (`config`), where their tensors come from (`source`; seeded dummy
//! weights at named shapes in `dummy`), and the forward pass written once against the backend trait (`llama`).

pub mod config;
pub mod dummy;
pub mod llama;
pub mod source;

pub use config::{Architecture, ModelConfig, RopeConfig, RopeLayout};
pub use llama::{Head, HeadOut, LlamaModel, Scratch};
pub use source::{ModelSource, WeightView};

/// Where `scripts/fetch-model.sh` puts the default model (SmolLM2-135M-Instruct, Q4_1): `$TANDEM_CACHE/models/...`,
/// by default under `~/.cache/tandem`. The binary's `--model` default and every test use this one path.
pub fn default_model_path() -> std::path::PathBuf {
    use std::path::{Path, PathBuf};
    let base = std::env::var_os("TANDEM_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/tandem")))
        .unwrap_or_else(|| PathBuf::from(".cache/tandem"));
    base.join("models/SmolLM2-135M-Instruct.Q4_1.gguf")
}
