//! Tandem's model runtime.
//!
//! Loads a Llama-family model (GGUF or HF safetensors), tokenizes and templates its input, runs the transformer
//! on a [`backend::Backend`] (CPU today; the trait is shaped for GPUs) over a paged KV cache with prefix sharing
//! ([`kv`]), and samples tokens ([`sampling`]). [`engine::Engine`] is the batched step API the serving nodes call;
//! [`generate`] drives one request end to end with stop conditions and streaming text.

pub mod backend;
pub mod engine;
pub mod error;
pub mod generate;
pub mod gguf;
pub mod kv;
pub mod model;
pub mod quant;
pub mod rng;
pub mod sampling;
pub mod tokenizer;

pub use engine::{Engine, EngineConfig, LogitsWanted, SeqId, StepItem};
pub use error::{EngineError, Result};
