//! Passkey retrieval (Mohtashami and Jaggi, 2023): a five-digit number hidden at a given depth of repetitive
//! filler, then asked for. The prompt is prefilled once at full precision; the first answer token comes from that
//! prefill (as a prefill worker returns it), the rest are decoded greedily on the moved, codec-round-tripped cache.
//! A key counts as found when the answer's digits start with it.

use super::{CodecResult, Snapshots, Variant, compute, transfer};
use anyhow::Result;
use tandem_engine::backend::Backend;
use tandem_engine::sampling::argmax;
use tandem_engine::tokenizer::Tokenizer;
use tandem_engine::{Engine, LogitsWanted};

const INTRO: &str = "There is an important piece of information hidden inside a lot of irrelevant text. \
                     Find it and memorize it. I will quiz you about it.\n";
const FILLER: &str =
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ";
const QUESTION: &str = "\nWhat is the pass key? The pass key is";
/// Tokens generated for an answer (a space and five digits, which the tokenizer splits one per token).
const ANSWER_TOKENS: usize = 7;

/// One passkey prompt's outcome per variant.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PasskeyCase {
    pub tokens: usize,
    pub depth: f64,
    pub key: u32,
    /// The answer per variant (codec and eviction), in the order measured.
    pub answers: Vec<(String, String)>,
}

/// A prompt of about `len` tokens with `key` at `depth` of the filler.
fn prompt(tok: &Tokenizer, len: usize, depth: f64, key: u32) -> Result<Vec<u32>> {
    let needle = format!("The pass key is {key}. Remember it. {key} is the pass key. ");
    let fixed = tok.encode(&format!("{INTRO}{needle}{QUESTION}"))?.len();
    let per_filler = tok.encode(FILLER)?.len().max(1);
    let fillers = len.saturating_sub(fixed) / per_filler;
    let before = (fillers as f64 * depth).round() as usize;
    let text = format!(
        "{INTRO}{}{needle}{}{QUESTION}",
        FILLER.repeat(before),
        FILLER.repeat(fillers - before)
    );
    Ok(tok.encode(&text)?)
}

/// Runs every length x depth for every variant; adds found/total to `results` (same order as `variants`).
pub fn run<B: Backend>(
    engine: &mut Engine<B>,
    tok: &Tokenizer,
    variants: &[Variant],
    lengths: &[usize],
    depths: &[f64],
    results: &mut [CodecResult],
) -> Result<Vec<PasskeyCase>> {
    let mut cases = Vec::new();
    let pb = crate::progress::bar((lengths.len() * depths.len()) as u64, "passkey");
    for (li, &len) in lengths.iter().enumerate() {
        for (di, &depth) in depths.iter().enumerate() {
            // Fixed, distinct five-digit keys: the same run asks the same questions.
            let key = 10_000 + ((li * 7919 + di * 104_729 + 31_337) % 90_000) as u32;
            let p = prompt(tok, len, depth, key)?;
            let (snaps, last) = Snapshots::take(engine, &p, variants)?;
            let first = argmax(&last);
            let mut case = PasskeyCase {
                tokens: p.len(),
                depth,
                key,
                answers: Vec::new(),
            };
            for (variant, r) in variants.iter().zip(results.iter_mut()) {
                // Codec time and bytes of passkey prompts are not part of the window statistics.
                let mut scratch = CodecResult::default();
                let seq = transfer(engine, &p, &snaps, *variant, &mut scratch)?;
                let answer = (|| -> Result<Vec<u32>> {
                    let mut out = vec![first];
                    engine.append_token(seq, first)?;
                    while out.len() < ANSWER_TOKENS {
                        let logits = compute(engine, seq, LogitsWanted::Last)?;
                        let t = argmax(&logits);
                        out.push(t);
                        engine.append_token(seq, t)?;
                    }
                    Ok(out)
                })();
                engine.remove_sequence(seq)?;
                engine.reset_prefix_cache();
                let text = tok.decode(&answer?)?;
                let digits: String = text
                    .chars()
                    .skip_while(|c| !c.is_ascii_digit())
                    .take_while(char::is_ascii_digit)
                    .collect();
                r.passkey_total += 1;
                r.passkey_found += usize::from(digits.starts_with(&key.to_string()));
                case.answers.push((variant.label(), text));
            }
            cases.push(case);
            pb.inc(1);
        }
    }
    pb.finish_and_clear();
    Ok(cases)
}
