//! Driving requests to completion: prefill, sample, decode in a batch, detokenize, and stop.
//!
//! A [`Request`] is prompt tokens plus sampling parameters and [`StopConditions`]. [`run_batch`] admits all of
//! them, prefills each (reusing cached prefixes), then advances every unfinished one by one token per step in a
//! single batched forward pass, emitting text deltas through a callback as soon as they are final. Stop strings are
//! matched on the decoded text; text that could still become a stop string is held back until it cannot, so a
//! stop string is never partly emitted. Every sequence is removed from the engine when it finishes or fails.

use crate::backend::Backend;
use crate::engine::{Engine, LogitsWanted, SeqId, StepItem};
use crate::error::{EngineError, Result};
use crate::sampling::{Sampled, Sampler, SamplingParams};
use crate::tokenizer::Tokenizer;
use crate::tokenizer::stream::StreamDecoder;
use std::time::{Duration, Instant};

/// When generation ends.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StopConditions {
    pub max_tokens: usize,
    /// Token ids that end generation (not emitted), in addition to the model's stop tokens unless `ignore_eos`.
    pub stop_token_ids: Vec<u32>,
    /// Strings that end generation; the text before the first match is kept, the match is not.
    pub stop_strings: Vec<String>,
    pub ignore_eos: bool,
}

/// Longest stop string accepted, in bytes; most stop strings a request may carry.
pub const MAX_STOP_STRING_BYTES: usize = 256;
pub const MAX_STOP_STRINGS: usize = 16;

impl StopConditions {
    pub fn validate(&self, context_len: usize) -> Result<()> {
        if self.max_tokens == 0 || self.max_tokens > context_len {
            return Err(EngineError::invalid(format!(
                "max_tokens {} must be between 1 and the context length {context_len}",
                self.max_tokens
            )));
        }
        if self.stop_strings.len() > MAX_STOP_STRINGS {
            return Err(EngineError::invalid(format!(
                "stop: {} strings given, at most {MAX_STOP_STRINGS}",
                self.stop_strings.len()
            )));
        }
        for s in &self.stop_strings {
            if s.is_empty() || s.len() > MAX_STOP_STRING_BYTES {
                return Err(EngineError::invalid(format!(
                    "stop: each string must be 1 to {MAX_STOP_STRING_BYTES} bytes"
                )));
            }
        }
        Ok(())
    }
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token or stop string.
    Stop,
    /// `max_tokens` or the model's context ran out.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Request {
    pub prompt: Vec<u32>,
    pub sampling: SamplingParams,
    pub stop: StopConditions,
}

/// What came out of one request.
#[derive(Debug, Clone)]
pub struct Completion {
    pub tokens: Vec<Sampled>,
    pub text: String,
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    /// Prompt tokens that came from the prefix cache.
    pub cached_prompt_tokens: usize,
    pub time_to_first_token: Duration,
    pub total_time: Duration,
}

/// A streaming event: request `index` produced `text` (may be empty when text is held back) and `token`.
#[derive(Debug)]
pub struct Delta<'a> {
    pub index: usize,
    pub text: &'a str,
    pub token: &'a Sampled,
}

struct Active {
    seq: SeqId,
    sampler: Sampler,
    decoder: StreamDecoder,
    stop: StopConditions,
    tokens: Vec<Sampled>,
    /// Text released to the caller.
    text: String,
    /// Decoded text held back because it may begin a stop string.
    held: String,
    prompt_tokens: usize,
    cached: usize,
    ttft: Duration,
    done: Option<FinishReason>,
}

/// Runs `requests` to completion as one batch; `on_delta` sees text as it becomes final.
pub fn run_batch<B: Backend>(
    engine: &mut Engine<B>,
    tok: &Tokenizer,
    requests: &[Request],
    mut on_delta: impl FnMut(Delta<'_>),
) -> Result<Vec<Completion>> {
    let start = Instant::now();
    let ctx = engine.model.config.context_len;
    for r in requests {
        r.sampling.validate()?;
        r.stop.validate(ctx)?;
    }
    let mut active: Vec<Active> = Vec::with_capacity(requests.len());
    let result = (|| -> Result<()> {
        for r in requests {
            let seq = engine.add_sequence(&r.prompt)?;
            let cached = engine.seq_progress(seq)?.0;
            let mut stop = r.stop.clone();
            if !stop.ignore_eos {
                stop.stop_token_ids.extend(tok.stop_tokens.iter().copied());
            }
            active.push(Active {
                seq,
                sampler: Sampler::new(r.sampling.clone(), &r.prompt),
                decoder: StreamDecoder::new(),
                stop,
                tokens: Vec::new(),
                text: String::new(),
                held: String::new(),
                prompt_tokens: r.prompt.len(),
                cached,
                ttft: Duration::ZERO,
                done: None,
            });
        }
        // Prefill each request, then sample its first token.
        for (i, a) in active.iter_mut().enumerate() {
            let mut logits = engine.prefill(a.seq)?;
            a.ttft = start.elapsed();
            accept(engine, tok, a, i, &mut logits, &mut on_delta)?;
        }
        // Decode all unfinished requests together.
        loop {
            let items: Vec<StepItem> = active
                .iter()
                .filter(|a| a.done.is_none())
                .map(|a| StepItem {
                    seq: a.seq,
                    n_tokens: 1,
                    logits: LogitsWanted::Last,
                })
                .collect();
            if items.is_empty() {
                return Ok(());
            }
            let logits = engine.step(&items)?;
            let mut li = logits.into_iter();
            for (i, a) in active
                .iter_mut()
                .enumerate()
                .filter(|(_, a)| a.done.is_none())
            {
                let mut l = li.next().expect("one logits row per item");
                accept(engine, tok, a, i, &mut l, &mut on_delta)?;
            }
        }
    })();
    for a in &active {
        let _ = engine.remove_sequence(a.seq);
    }
    result?;
    let total_time = start.elapsed();
    Ok(active
        .into_iter()
        .map(|a| Completion {
            tokens: a.tokens,
            text: a.text,
            finish_reason: a.done.unwrap_or(FinishReason::Length),
            prompt_tokens: a.prompt_tokens,
            cached_prompt_tokens: a.cached,
            time_to_first_token: a.ttft,
            total_time,
        })
        .collect())
}

/// Samples from `logits`, applies stop conditions, streams text, and appends the token for the next step.
fn accept<B: Backend>(
    engine: &mut Engine<B>,
    tok: &Tokenizer,
    a: &mut Active,
    index: usize,
    logits: &mut [f32],
    on_delta: &mut impl FnMut(Delta<'_>),
) -> Result<()> {
    let s = a.sampler.sample(logits);
    let id = s.token;
    if a.stop.stop_token_ids.contains(&id) {
        a.done = Some(FinishReason::Stop);
        release_held(a, index, &s, on_delta, tok)?;
        a.tokens.push(s);
        return Ok(());
    }
    if let Some(delta) = a.decoder.push(tok, id)? {
        a.held.push_str(&delta);
    }
    let mut emitted = String::new();
    if let Some(cut) = find_stop(&a.held, &a.stop.stop_strings) {
        emitted.push_str(&a.held[..cut]);
        a.held.clear();
        a.done = Some(FinishReason::Stop);
    } else {
        let keep = held_back_len(&a.held, &a.stop.stop_strings);
        let release = a.held.len() - keep;
        emitted.push_str(&a.held[..release]);
        a.held.drain(..release);
    }
    a.tokens.push(s);
    if a.done.is_none() && a.tokens.len() >= a.stop.max_tokens {
        a.done = Some(FinishReason::Length);
    }
    let (kv_len, len) = engine.seq_progress(a.seq)?;
    debug_assert_eq!(kv_len, len);
    if a.done.is_none() && len + 1 >= engine.model.config.context_len {
        a.done = Some(FinishReason::Length);
    }
    if a.done == Some(FinishReason::Length) {
        if let Some(rest) = a.decoder.flush(tok)? {
            a.held.push_str(&rest);
        }
        emitted.push_str(&a.held);
        a.held.clear();
    }
    a.text.push_str(&emitted);
    on_delta(Delta {
        index,
        text: &emitted,
        token: a.tokens.last().expect("pushed above"),
    });
    if a.done.is_none() {
        engine.append_token(a.seq, id)?;
    }
    Ok(())
}

/// On a stop token: what was held back for a possible stop string is plain text after all.
fn release_held(
    a: &mut Active,
    index: usize,
    s: &Sampled,
    on_delta: &mut impl FnMut(Delta<'_>),
    tok: &Tokenizer,
) -> Result<()> {
    if let Some(rest) = a.decoder.flush(tok)? {
        a.held.push_str(&rest);
    }
    let text = std::mem::take(&mut a.held);
    a.text.push_str(&text);
    on_delta(Delta {
        index,
        text: &text,
        token: s,
    });
    Ok(())
}

/// Byte offset of the earliest stop string in `text`.
fn find_stop(text: &str, stops: &[String]) -> Option<usize> {
    stops.iter().filter_map(|s| text.find(s.as_str())).min()
}

/// Length of the longest suffix of `text` that is a proper prefix of some stop string (kept back for now).
fn held_back_len(text: &str, stops: &[String]) -> usize {
    let mut best = 0;
    for s in stops {
        for (i, _) in s.char_indices().skip(1) {
            if text.ends_with(&s[..i]) {
                best = best.max(i);
            }
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_matching_and_hold_back() {
        let stops = vec!["END".to_string(), "\n\n".to_string()];
        assert_eq!(find_stop("abc END x", &stops), Some(4));
        assert_eq!(find_stop("abc\n\nEND", &stops), Some(3));
        assert_eq!(held_back_len("abc E", &stops), 1);
        assert_eq!(held_back_len("abc EN", &stops), 2);
        assert_eq!(held_back_len("abc\n", &stops), 1);
        assert_eq!(held_back_len("abc", &stops), 0);
    }

    #[test]
    fn stop_conditions_are_validated() {
        let ok = StopConditions {
            max_tokens: 10,
            ..Default::default()
        };
        assert!(ok.validate(100).is_ok());
        let e = StopConditions {
            max_tokens: 0,
            ..Default::default()
        }
        .validate(100)
        .unwrap_err()
        .to_string();
        assert!(e.contains("max_tokens"), "{e}");
        let e = StopConditions {
            max_tokens: 1000,
            ..Default::default()
        }
        .validate(100)
        .unwrap_err()
        .to_string();
        assert!(e.contains("max_tokens"), "{e}");
        let e = StopConditions {
            max_tokens: 1,
            stop_strings: vec![String::new()],
            ..Default::default()
        }
        .validate(100)
        .unwrap_err()
        .to_string();
        assert!(e.contains("stop"), "{e}");
    }
}
