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
use crate::sampling::{Draw, Sampled, Sampler, SamplingParams};
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
/// Most stop token ids a caller may give (each generated token is checked against all of them).
pub const MAX_STOP_TOKEN_IDS: usize = 64;

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
        if self.stop_token_ids.len() > MAX_STOP_TOKEN_IDS {
            return Err(EngineError::invalid(format!(
                "stop_token_ids: {} given, at most {MAX_STOP_TOKEN_IDS}",
                self.stop_token_ids.len()
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

/// What one accepted token produced.
#[derive(Debug, Clone)]
pub struct Emitted {
    /// Text that became final (may be empty while text is held back for a possible stop string).
    pub text: String,
    pub token: Sampled,
    /// Set when this token ended the generation; the token must then not be appended to the sequence.
    pub finished: Option<FinishReason>,
}

/// One request's generation state: its sampler, streaming detokenizer and stop conditions. The serving nodes and
/// [`run_batch`] drive it the same way: sample (or take a token sampled elsewhere), [`Generation::accept`] it, and
/// append the token to the engine's sequence unless it finished.
#[derive(Debug)]
pub struct Generation {
    sampler: Sampler,
    decoder: StreamDecoder,
    stop: StopConditions,
    generated: usize,
    /// Decoded text held back because it may begin a stop string.
    held: String,
    done: Option<FinishReason>,
}

impl Generation {
    /// `stop` as the caller gave it; the tokenizer's stop tokens are added unless `ignore_eos`.
    pub fn new(
        sampling: SamplingParams,
        stop: StopConditions,
        prompt: &[u32],
        tok: &Tokenizer,
    ) -> Self {
        let mut stop = stop;
        if !stop.ignore_eos {
            stop.stop_token_ids.extend(tok.stop_tokens.iter().copied());
        }
        Self {
            sampler: Sampler::new(sampling, prompt),
            decoder: StreamDecoder::new(),
            stop,
            generated: 0,
            held: String::new(),
            done: None,
        }
    }

    /// Takes `tokens` as already generated and streamed elsewhere (a decode worker that failed mid-stream): the
    /// sampler's RNG and penalty counts, the detokenizer, the held-back text and the token count end exactly where
    /// that worker's were, so what follows is neither repeated nor missing. `seq_len` is the sequence's length
    /// before the first of them. Fails if they already end the generation.
    pub fn replay(
        &mut self,
        tok: &Tokenizer,
        tokens: &[u32],
        seq_len: usize,
        context_len: usize,
    ) -> Result<()> {
        for (i, &token) in tokens.iter().enumerate() {
            self.sampler.record_external(token);
            let s = Sampled {
                token,
                logprob: None,
                top_logprobs: Vec::new(),
            };
            if self
                .accept(tok, s, seq_len + i, context_len)?
                .finished
                .is_some()
            {
                return Err(EngineError::invalid(format!(
                    "the {} tokens already generated end the request at token {}; nothing is left to resume",
                    tokens.len(),
                    i + 1
                )));
            }
        }
        Ok(())
    }

    /// Whether the next token needs this step's logits on the host ([`Sampler::needs_logits`]).
    pub fn needs_logits(&self) -> bool {
        self.sampler.needs_logits()
    }
    pub fn sampler_mut(&mut self) -> &mut Sampler {
        &mut self.sampler
    }
    pub fn finished(&self) -> Option<FinishReason> {
        self.done
    }
    pub fn generated(&self) -> usize {
        self.generated
    }

    /// Samples the next token from `logits` and accepts it.
    pub fn sample(
        &mut self,
        tok: &Tokenizer,
        logits: &[f32],
        seq_len: usize,
        context_len: usize,
    ) -> Result<Emitted> {
        let s = self.sampler.sample(logits);
        self.accept(tok, s, seq_len, context_len)
    }

    /// The [`Draw`] for this generation's next token, for a step that draws where the logits are (only when it does
    /// not [need the logits](Generation::needs_logits)).
    pub fn next_draw(&mut self) -> Draw {
        debug_assert!(
            !self.sampler.needs_logits(),
            "next_draw on a sampler that needs logits"
        );
        self.sampler.next_draw()
    }

    /// Accepts `token`, drawn where the logits are with this generation's [`Generation::next_draw`]: the same as
    /// [`Generation::sample`] on those logits.
    pub fn take_drawn(
        &mut self,
        tok: &Tokenizer,
        token: u32,
        seq_len: usize,
        context_len: usize,
    ) -> Result<Emitted> {
        self.sampler.record_drawn(token);
        let s = Sampled {
            token,
            logprob: None,
            top_logprobs: Vec::new(),
        };
        self.accept(tok, s, seq_len, context_len)
    }

    /// Applies stop conditions to a sampled token and releases the text that became final. `seq_len` is the
    /// sequence's length before this token; the generation ends when the next token would not fit `context_len`.
    pub fn accept(
        &mut self,
        tok: &Tokenizer,
        s: Sampled,
        seq_len: usize,
        context_len: usize,
    ) -> Result<Emitted> {
        let id = s.token;
        self.generated += 1;
        if self.stop.stop_token_ids.contains(&id) {
            self.done = Some(FinishReason::Stop);
            if let Some(rest) = self.decoder.flush(tok)? {
                self.held.push_str(&rest);
            }
            return Ok(Emitted {
                text: std::mem::take(&mut self.held),
                token: s,
                finished: self.done,
            });
        }
        if let Some(delta) = self.decoder.push(tok, id)? {
            self.held.push_str(&delta);
        }
        let mut text = String::new();
        if let Some(cut) = find_stop(&self.held, &self.stop.stop_strings) {
            text.push_str(&self.held[..cut]);
            self.held.clear();
            self.done = Some(FinishReason::Stop);
        } else {
            let keep = held_back_len(&self.held, &self.stop.stop_strings);
            let release = self.held.len() - keep;
            text.push_str(&self.held[..release]);
            self.held.drain(..release);
        }
        if self.done.is_none()
            && (self.generated >= self.stop.max_tokens || seq_len + 1 >= context_len)
        {
            self.done = Some(FinishReason::Length);
            if let Some(rest) = self.decoder.flush(tok)? {
                self.held.push_str(&rest);
            }
            text.push_str(&self.held);
            self.held.clear();
        }
        Ok(Emitted {
            text,
            token: s,
            finished: self.done,
        })
    }
}

struct Active {
    seq: SeqId,
    generation: Generation,
    tokens: Vec<Sampled>,
    text: String,
    prompt_tokens: usize,
    cached: usize,
    ttft: Duration,
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
            active.push(Active {
                seq,
                generation: Generation::new(r.sampling.clone(), r.stop.clone(), &r.prompt, tok),
                tokens: Vec::new(),
                text: String::new(),
                prompt_tokens: r.prompt.len(),
                cached,
                ttft: Duration::ZERO,
            });
        }
        // Prefill each request, then sample its first token.
        for (i, a) in active.iter_mut().enumerate() {
            let logits = engine.prefill(a.seq)?;
            a.ttft = start.elapsed();
            accept(engine, tok, a, i, Next::Logits(&logits), &mut on_delta)?;
        }
        // Decode all unfinished requests together.
        loop {
            let items: Vec<StepItem> = active
                .iter()
                .filter(|a| a.generation.finished().is_none())
                .map(|a| StepItem {
                    seq: a.seq,
                    n_tokens: 1,
                    logits: LogitsWanted::Last,
                })
                .collect();
            if items.is_empty() {
                return Ok(());
            }
            let running = |a: &&mut Active| a.generation.finished().is_none();
            // No logprobs anywhere: tokens are drawn (penalties included) where the logits are.
            if active
                .iter_mut()
                .filter(running)
                .all(|a| !a.generation.needs_logits())
            {
                let draws: Vec<Draw> = active
                    .iter_mut()
                    .filter(running)
                    .map(|a| a.generation.next_draw())
                    .collect();
                let tokens = engine.step_draw(&items, &draws)?;
                let mut ti = tokens.into_iter();
                for (i, a) in active.iter_mut().enumerate().filter(|(_, a)| running(a)) {
                    let t = ti.next().expect("one token per item");
                    accept(engine, tok, a, i, Next::Drawn(t), &mut on_delta)?;
                }
                continue;
            }
            let logits = engine.step(&items)?;
            let mut li = logits.into_iter();
            for (i, a) in active.iter_mut().enumerate().filter(|(_, a)| running(a)) {
                let l = li.next().expect("one logits row per item");
                accept(engine, tok, a, i, Next::Logits(&l), &mut on_delta)?;
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
            finish_reason: a.generation.finished().unwrap_or(FinishReason::Length),
            tokens: a.tokens,
            text: a.text,
            prompt_tokens: a.prompt_tokens,
            cached_prompt_tokens: a.cached,
            time_to_first_token: a.ttft,
            total_time,
        })
        .collect())
}

/// Samples from `logits`, streams the text that became final, and appends the token for the next step.
/// What a step gave one request to choose its next token from.
enum Next<'a> {
    Logits(&'a [f32]),
    /// The token drawn where the logits are, for a request that does not need them.
    Drawn(u32),
}

fn accept<B: Backend>(
    engine: &mut Engine<B>,
    tok: &Tokenizer,
    a: &mut Active,
    index: usize,
    next: Next<'_>,
    on_delta: &mut impl FnMut(Delta<'_>),
) -> Result<()> {
    let (kv_len, len) = engine.seq_progress(a.seq)?;
    debug_assert_eq!(kv_len, len);
    let ctx = engine.model.config.context_len;
    let e = match next {
        Next::Logits(l) => a.generation.sample(tok, l, len, ctx)?,
        Next::Drawn(t) => a.generation.take_drawn(tok, t, len, ctx)?,
    };
    a.text.push_str(&e.text);
    on_delta(Delta {
        index,
        text: &e.text,
        token: &e.token,
    });
    if e.finished.is_none() {
        engine.append_token(a.seq, e.token.token)?;
    }
    a.tokens.push(e.token);
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
            max_tokens: 10,
            stop_token_ids: vec![7; MAX_STOP_TOKEN_IDS + 1],
            ..Default::default()
        }
        .validate(100)
        .unwrap_err()
        .to_string();
        assert!(e.contains("stop_token_ids"), "{e}");
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
