//! Text <-> token ids, built from the model's own vocabulary.
//!
//! Sources: a GGUF's `tokenizer.ggml.*` metadata (`gpt2`: byte-level BPE with the pre-tokenizer the file names;
//! `llama`: a SentencePiece vocabulary, turned into a BPE whose merges are ranked by piece score with byte
//! fallback, as HF's converter does) or an HF `tokenizer.json`. Tokens whose GGUF type is "control" or
//! "user defined" become special tokens that are matched whole in text. Encoding never adds BOS unless the model
//! asks for it (`add_bos_token`). Streaming output goes through [`stream::StreamDecoder`], chat messages through
//! [`chat::ChatTemplate`].

pub mod chat;
mod gguf_vocab;
pub mod stream;

use crate::error::{EngineError, Result};
use crate::gguf::GgufFile;
use std::path::Path;

/// A token id.
pub type TokenId = u32;

/// The model's tokenizer plus the ids the engine needs to know about.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    pub bos: Option<TokenId>,
    pub eos: Option<TokenId>,
    /// Prepend BOS when encoding a prompt.
    pub add_bos: bool,
    /// Tokens that end generation by default (EOS plus chat end-of-turn tokens).
    pub stop_tokens: Vec<TokenId>,
    /// The chat template shipped with the model, if any.
    pub chat_template: Option<String>,
    vocab_size: usize,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab", &self.vocab_size)
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .finish()
    }
}

fn tok_err(e: impl std::fmt::Display) -> EngineError {
    EngineError::Tokenizer(e.to_string())
}

impl Tokenizer {
    /// Builds the tokenizer from GGUF metadata.
    pub fn from_gguf(f: &GgufFile) -> Result<Self> {
        let built = gguf_vocab::build(f)?;
        let id = |k: &str| f.get_u64(k).map(|v| v as TokenId);
        let eos = id("tokenizer.ggml.eos_token_id");
        let eot = id("tokenizer.ggml.eot_token_id");
        let mut stop_tokens: Vec<TokenId> = eos.into_iter().chain(eot).collect();
        for name in [
            "<|im_end|>",
            "<|eot_id|>",
            "<|end|>",
            "<end_of_turn>",
            "<|endoftext|>",
        ] {
            if let Some(t) = built.tokenizer.token_to_id(name)
                && !stop_tokens.contains(&t)
                && built.special.contains(&t)
            {
                stop_tokens.push(t);
            }
        }
        Ok(Self {
            vocab_size: built.vocab_size,
            inner: built.tokenizer,
            bos: id("tokenizer.ggml.bos_token_id"),
            eos,
            add_bos: f
                .get("tokenizer.ggml.add_bos_token")
                .and_then(|v| v.as_bool())
                .unwrap_or(built.default_add_bos),
            stop_tokens,
            chat_template: f.get_str("tokenizer.chat_template").map(str::to_owned),
        })
    }

    /// Loads `tokenizer.json` (and `tokenizer_config.json` for BOS/EOS and the chat template) from an HF directory.
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let inner =
            tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).map_err(tok_err)?;
        let cfg: serde_json::Value = std::fs::read_to_string(dir.join("tokenizer_config.json"))
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or(serde_json::Value::Null);
        let token_of = |k: &str| -> Option<TokenId> {
            let v = cfg.get(k)?;
            let s = v
                .as_str()
                .or_else(|| v.get("content").and_then(|c| c.as_str()))?;
            inner.token_to_id(s)
        };
        let (bos, eos) = (token_of("bos_token"), token_of("eos_token"));
        let mut stop_tokens: Vec<TokenId> = eos.into_iter().collect();
        for name in ["<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"] {
            if let Some(t) = inner.token_to_id(name)
                && !stop_tokens.contains(&t)
            {
                stop_tokens.push(t);
            }
        }
        let chat_template = cfg
            .get("chat_template")
            .and_then(|c| c.as_str())
            .map(str::to_owned);
        Ok(Self {
            vocab_size: inner.get_vocab_size(true),
            add_bos: cfg
                .get("add_bos_token")
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
            inner,
            bos,
            eos,
            stop_tokens,
            chat_template,
        })
    }

    /// Encodes text; special-token text (e.g. `<|im_start|>`) becomes its single id. Adds BOS if the model wants it.
    pub fn encode(&self, text: &str) -> Result<Vec<TokenId>> {
        let enc = self.inner.encode_fast(text, false).map_err(tok_err)?;
        let mut ids = Vec::with_capacity(enc.get_ids().len() + 1);
        if self.add_bos
            && let Some(b) = self.bos
        {
            ids.push(b);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Decodes ids to text, special tokens included (so a round trip is exact).
    pub fn decode(&self, ids: &[TokenId]) -> Result<String> {
        if let Some(&bad) = ids.iter().find(|&&t| t as usize >= self.vocab_size) {
            return Err(EngineError::Tokenizer(format!(
                "token id {bad} is outside the vocabulary of {}",
                self.vocab_size
            )));
        }
        self.inner.decode(ids, false).map_err(tok_err)
    }

    pub fn token_to_id(&self, s: &str) -> Option<TokenId> {
        self.inner.token_to_id(s)
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    pub fn is_stop(&self, t: TokenId) -> bool {
        self.stop_tokens.contains(&t)
    }
}

impl Tokenizer {
    /// The tokenizer that belongs to a model: from the GGUF metadata or the HF directory's `tokenizer.json`.
    pub fn for_model(src: &crate::model::ModelSource) -> Result<Self> {
        match (src.gguf(), src.hf_dir()) {
            (Some(g), _) => Self::from_gguf(g),
            (None, Some(dir)) => Self::from_hf_dir(dir),
            (None, None) => Err(EngineError::Tokenizer(
                "model has neither GGUF metadata nor a tokenizer.json".into(),
            )),
        }
    }

    /// The model's chat template, or ChatML when it ships none.
    pub fn chat_template(&self) -> Result<chat::ChatTemplate> {
        let name = |t: Option<TokenId>| {
            t.and_then(|t| self.inner.id_to_token(t))
                .unwrap_or_default()
        };
        let src = self
            .chat_template
            .as_deref()
            .unwrap_or(chat::CHATML_TEMPLATE);
        chat::ChatTemplate::new(src, &name(self.bos), &name(self.eos))
    }
}

impl Tokenizer {
    /// Writes the tokenizer in HF `tokenizer.json` form (used to export a GGUF vocabulary to an HF directory).
    pub fn save_json(&self, path: &Path) -> Result<()> {
        self.inner.save(path, false).map_err(tok_err)
    }
}
