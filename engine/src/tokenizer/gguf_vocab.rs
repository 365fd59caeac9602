//! Builds a `tokenizers::Tokenizer` from the vocabulary stored in GGUF metadata.
//!
//! `tokenizer.ggml.model = "gpt2"`: byte-level BPE; the merges come from the file and the pre-tokenizer from
//! `tokenizer.ggml.pre` (llama.cpp's names: `smollm` splits every digit first, `llama-bpe` and `qwen2` use their
//! regex splits; anything else gets the GPT-2 split). `"llama"`: SentencePiece pieces with scores; merges are
//! derived by ranking every split of each piece into two known pieces by the piece's score (what HF's
//! `SentencePieceExtractor` does), with byte fallback to `<0xNN>` tokens.

use crate::error::{EngineError, Result};
use crate::gguf::GgufFile;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior};

pub(super) struct Built {
    pub tokenizer: tokenizers::Tokenizer,
    pub special: Vec<u32>,
    pub vocab_size: usize,
    pub default_add_bos: bool,
}

/// GGUF token types (llama.cpp `llama_token_type`).
const TYPE_CONTROL: i64 = 3;
const TYPE_USER_DEFINED: i64 = 4;

const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn err(e: impl std::fmt::Display) -> EngineError {
    EngineError::Tokenizer(e.to_string())
}

pub(super) fn build(f: &GgufFile) -> Result<Built> {
    let model = f
        .get_str("tokenizer.ggml.model")
        .ok_or_else(|| err("GGUF has no tokenizer.ggml.model"))?;
    let tokens = f.get_str_array("tokenizer.ggml.tokens")?;
    let types: Vec<i64> = match f
        .get("tokenizer.ggml.token_type")
        .and_then(|v| v.as_array())
    {
        Some(a) => a
            .iter()
            .map(|v| v.as_u64().map_or(1, |x| x as i64))
            .collect(),
        None => vec![1; tokens.len()],
    };
    let vocab: tokenizers::models::bpe::Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.to_string(), i as u32))
        .collect();
    let (mut tokenizer, default_add_bos) = match model {
        "gpt2" => {
            let merges: Vec<(String, String)> = f
                .get_str_array("tokenizer.ggml.merges")?
                .into_iter()
                .map(|m| {
                    m.split_once(' ')
                        .map(|(a, b)| (a.to_string(), b.to_string()))
                        .ok_or_else(|| err(format!("merge {m:?} is not two pieces")))
                })
                .collect::<Result<_>>()?;
            let bpe = BPE::builder()
                .vocab_and_merges(vocab, merges)
                .build()
                .map_err(err)?;
            let mut t = tokenizers::Tokenizer::new(bpe);
            let pre = f.get_str("tokenizer.ggml.pre").unwrap_or("default");
            t.with_pre_tokenizer(Some(byte_level_pre_tokenizer(pre)?));
            t.with_decoder(Some(ByteLevel::default()));
            (t, false)
        }
        "llama" => (super::gguf_vocab::spm(f, &tokens, vocab)?, true),
        other => {
            return Err(EngineError::UnsupportedModel(format!(
                "tokenizer model {other:?}; supported: gpt2 (byte-level BPE), llama (SentencePiece)"
            )));
        }
    };
    let mut special = Vec::new();
    let added: Vec<AddedToken> = tokens
        .iter()
        .zip(types.iter().chain(std::iter::repeat(&1)))
        .enumerate()
        .filter(|(_, (_, ty))| **ty == TYPE_CONTROL || **ty == TYPE_USER_DEFINED)
        .map(|(i, (t, _))| {
            special.push(i as u32);
            AddedToken::from(t.to_string(), true)
        })
        .collect();
    tokenizer.add_special_tokens(added).map_err(err)?;
    Ok(Built {
        tokenizer,
        special,
        vocab_size: tokens.len(),
        default_add_bos,
    })
}

fn byte_level_pre_tokenizer(pre: &str) -> Result<PreTokenizerWrapper> {
    let byte_level =
        |use_regex| PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, use_regex));
    let split = |pattern: &str| -> Result<PreTokenizerWrapper> {
        Ok(PreTokenizerWrapper::Split(
            Split::new(
                SplitPattern::Regex(pattern.into()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(err)?,
        ))
    };
    Ok(match pre {
        "smollm" => PreTokenizerWrapper::Sequence(Sequence::new(vec![
            PreTokenizerWrapper::Digits(Digits::new(true)),
            byte_level(true),
        ])),
        "llama-bpe" | "llama3" => PreTokenizerWrapper::Sequence(Sequence::new(vec![
            split(LLAMA3_SPLIT)?,
            byte_level(false),
        ])),
        "qwen2" => PreTokenizerWrapper::Sequence(Sequence::new(vec![
            split(QWEN2_SPLIT)?,
            byte_level(false),
        ])),
        "default" | "gpt2" | "gpt-2" => byte_level(true),
        other => {
            tracing::warn!(
                pre = other,
                "unknown GGUF pre-tokenizer; using the GPT-2 split"
            );
            byte_level(true)
        }
    })
}

/// A SentencePiece (llama) vocabulary as a byte-fallback BPE.
fn spm(
    f: &GgufFile,
    tokens: &[&str],
    vocab: tokenizers::models::bpe::Vocab,
) -> Result<tokenizers::Tokenizer> {
    use tokenizers::decoders::DecoderWrapper;
    use tokenizers::normalizers::{NormalizerWrapper, Prepend, Replace};
    let scores: Vec<f64> = match f.get("tokenizer.ggml.scores").and_then(|v| v.as_array()) {
        Some(a) => a.iter().map(|v| v.as_f64().unwrap_or(0.0)).collect(),
        None => vec![0.0; tokens.len()],
    };
    let mut merges: Vec<(f64, u32, String, String)> = Vec::new();
    for (i, piece) in tokens.iter().enumerate() {
        let chars: Vec<(usize, char)> = piece.char_indices().collect();
        for &(at, _) in chars.iter().skip(1) {
            let (a, b) = piece.split_at(at);
            if let (Some(&ia), Some(&ib)) = (vocab.get(a), vocab.get(b)) {
                merges.push((
                    scores.get(i).copied().unwrap_or(0.0),
                    ia.max(ib),
                    a.to_string(),
                    b.to_string(),
                ));
            }
        }
    }
    // Higher piece score merges first; ties by the later component id, as HF's extractor orders them.
    merges.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)));
    let merges = merges.into_iter().map(|(_, _, a, b)| (a, b)).collect();
    let unk = f
        .get_u64("tokenizer.ggml.unknown_token_id")
        .and_then(|u| tokens.get(u as usize))
        .map(|s| s.to_string());
    let mut builder = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .byte_fallback(true)
        .fuse_unk(true);
    if let Some(u) = unk {
        builder = builder.unk_token(u);
    }
    let mut t = tokenizers::Tokenizer::new(builder.build().map_err(err)?);
    let add_space = f
        .get("tokenizer.ggml.add_space_prefix")
        .and_then(|v| v.as_bool())
        .unwrap_or(true);
    let mut norms = Vec::new();
    if add_space {
        norms.push(NormalizerWrapper::Prepend(Prepend::new("\u{2581}".into())));
    }
    norms.push(NormalizerWrapper::Replace(
        Replace::new(" ", "\u{2581}").map_err(err)?,
    ));
    t.with_normalizer(Some(tokenizers::normalizers::Sequence::new(norms)))
        .map_err(err)?;
    let mut decoders = vec![
        DecoderWrapper::Replace(Replace::new("\u{2581}", " ").map_err(err)?),
        DecoderWrapper::ByteFallback(tokenizers::decoders::byte_fallback::ByteFallback::new()),
        DecoderWrapper::Fuse(tokenizers::decoders::fuse::Fuse::new()),
    ];
    if add_space {
        decoders.push(DecoderWrapper::Strip(
            tokenizers::decoders::strip::Strip::new(' ', 1, 0),
        ));
    }
    t.with_decoder(Some(tokenizers::decoders::sequence::Sequence::new(
        decoders,
    )));
    Ok(t)
}

#[cfg(test)]
mod tests {
    use crate::gguf::GgufFile;
    use crate::tokenizer::Tokenizer;

    /// A tiny SentencePiece-style ("llama") vocabulary in a synthesized GGUF: pieces with scores, byte tokens,
    /// control tokens.
    fn spm_gguf() -> Vec<u8> {
        let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
        tokens.extend((0..=255u8).map(|b| format!("<0x{b:02X}>")));
        for p in [
            "\u{2581}",
            "h",
            "e",
            "l",
            "o",
            "w",
            "r",
            "d",
            "he",
            "ll",
            "llo",
            "hello",
            "\u{2581}hello",
            "\u{2581}w",
            "or",
            "\u{2581}wor",
            "\u{2581}world",
            "ld",
        ] {
            tokens.push(p.into());
        }
        let n = tokens.len();
        let mut types = vec![2i32, 3, 3];
        types.extend(std::iter::repeat_n(6, 256));
        types.extend(std::iter::repeat_n(1, n - 259));
        // Longer pieces score higher, so they merge first.
        let scores: Vec<f32> = tokens.iter().map(|t| t.chars().count() as f32).collect();
        let mut out = b"GGUF".to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend(0u64.to_le_bytes());
        out.extend(6u64.to_le_bytes());
        let s = |out: &mut Vec<u8>, v: &str| {
            out.extend((v.len() as u64).to_le_bytes());
            out.extend(v.as_bytes());
        };
        s(&mut out, "tokenizer.ggml.model");
        out.extend(8u32.to_le_bytes());
        s(&mut out, "llama");
        s(&mut out, "tokenizer.ggml.tokens");
        out.extend(9u32.to_le_bytes());
        out.extend(8u32.to_le_bytes());
        out.extend((n as u64).to_le_bytes());
        for t in &tokens {
            s(&mut out, t);
        }
        s(&mut out, "tokenizer.ggml.scores");
        out.extend(9u32.to_le_bytes());
        out.extend(6u32.to_le_bytes());
        out.extend((n as u64).to_le_bytes());
        for v in &scores {
            out.extend(v.to_le_bytes());
        }
        s(&mut out, "tokenizer.ggml.token_type");
        out.extend(9u32.to_le_bytes());
        out.extend(5u32.to_le_bytes());
        out.extend((n as u64).to_le_bytes());
        for v in &types {
            out.extend(v.to_le_bytes());
        }
        s(&mut out, "tokenizer.ggml.bos_token_id");
        out.extend(4u32.to_le_bytes());
        out.extend(1u32.to_le_bytes());
        s(&mut out, "tokenizer.ggml.eos_token_id");
        out.extend(4u32.to_le_bytes());
        out.extend(2u32.to_le_bytes());
        out
    }

    #[test]
    fn sentencepiece_vocabulary_encodes_with_merges_and_byte_fallback() {
        let f = GgufFile::from_bytes(spm_gguf()).unwrap();
        let tok = Tokenizer::from_gguf(&f).unwrap();
        let id = |p: &str| tok.token_to_id(p).unwrap();
        // BOS is added by default for llama vocabularies; words merge to their longest pieces.
        assert_eq!(
            tok.encode("hello world").unwrap(),
            vec![1, id("\u{2581}hello"), id("\u{2581}world")]
        );
        // An unknown character falls back to its UTF-8 bytes and decodes back exactly.
        let ids = tok.encode("hello é").unwrap();
        assert!(
            ids.contains(&id("<0xC3>")) && ids.contains(&id("<0xA9>")),
            "{ids:?}"
        );
        assert_eq!(tok.decode(&ids[1..]).unwrap(), "hello é");
        assert_eq!(tok.eos, Some(2));
    }
}
