//! Streaming detokenization: turns a growing list of token ids into text deltas that never split a UTF-8
//! character.
//!
//! Byte-level BPE tokens can end in the middle of a multi-byte character, and decoding a token alone can differ
//! from decoding it in context (SentencePiece's leading space). So each step decodes a short window of recent
//! tokens twice, with and without the new ones, and emits only the difference, holding it back while the text ends
//! in a replacement character (an incomplete UTF-8 sequence). The approach is the one TGI and vLLM use.

use super::{TokenId, Tokenizer};
use crate::error::Result;

#[derive(Debug, Default, Clone)]
pub struct StreamDecoder {
    ids: Vec<TokenId>,
    /// Start of the context window that is decoded for comparison.
    prefix_offset: usize,
    /// Tokens before this index have been emitted as text.
    read_offset: usize,
}

impl StreamDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a token; returns the text that is now final, if any.
    pub fn push(&mut self, tok: &Tokenizer, id: TokenId) -> Result<Option<String>> {
        self.ids.push(id);
        let prefix = tok.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = tok.decode(&self.ids[self.prefix_offset..])?;
        if full.len() > prefix.len()
            && !full.ends_with('\u{FFFD}')
            && full.is_char_boundary(prefix.len())
        {
            let delta = full[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(Some(delta))
        } else {
            Ok(None)
        }
    }

    /// Text of tokens not yet emitted (called once at the end; may contain a replacement character).
    pub fn flush(&mut self, tok: &Tokenizer) -> Result<Option<String>> {
        if self.read_offset == self.ids.len() {
            return Ok(None);
        }
        let prefix = tok.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = tok.decode(&self.ids[self.prefix_offset..])?;
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok(full
            .get(prefix.len()..)
            .filter(|s| !s.is_empty())
            .map(str::to_owned))
    }
}
