//! Llama-family models: their configuration (`config`), where their tensors come from (`source`), and the
//! forward pass written once against the backend trait (`llama`).

pub mod config;
pub mod llama;
pub mod source;

pub use config::{Architecture, ModelConfig, RopeConfig, RopeLayout};
pub use llama::{LlamaModel, Scratch};
pub use source::{ModelSource, WeightView};
