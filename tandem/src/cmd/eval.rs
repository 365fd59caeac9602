//! `tandem eval perplexity`: the standard windowed perplexity (llama.cpp's `perplexity` tool method).
//!
//! The text is tokenized once and cut into non-overlapping windows of `--context` tokens; each window is computed
//! from scratch and only the second half of it is scored (each token predicted with at least `context/2` tokens of
//! context), so the number is comparable with llama.cpp's for the same file, model and context.

use super::{Loaded, ModelArgs};
use anyhow::{Context, Result};
use tandem_engine::backend::Backend;
use tandem_engine::{Engine, LogitsWanted, SeqId, StepItem};

#[derive(clap::Subcommand, Debug)]
pub enum EvalCommand {
    /// Perplexity of a text file.
    Perplexity(PerplexityArgs),
    /// What each KV codec costs in quality (perplexity, top-1, KL, passkey) and saves in bytes.
    Kv(super::eval_kv::KvEvalArgs),
}

#[derive(clap::Args, Debug)]
pub struct PerplexityArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// UTF-8 text to score.
    #[arg(long)]
    pub file: std::path::PathBuf,
    /// Window length in tokens.
    #[arg(long, default_value_t = 512)]
    pub context: usize,
    /// Score at most this many windows (0: all).
    #[arg(long, default_value_t = 0)]
    pub max_windows: usize,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub device: super::DeviceArgs,
}

pub fn run(c: EvalCommand, threads: usize) -> Result<()> {
    match c {
        EvalCommand::Perplexity(a) => perplexity(a, threads),
        EvalCommand::Kv(a) => super::eval_kv::run(a, threads),
    }
}

/// Rows of logits computed per step: bounds memory at rows x vocab floats.
const EVAL_ROWS_PER_STEP: usize = 128;

/// Computes every pending token of `seq`, at most `EVAL_ROWS_PER_STEP` per step, asking each step for the logits
/// `wants(first_pos, n_tokens, is_last_step)` names and handing them to `on_logits(first_pos, logits)`.
pub(super) fn compute_pending<B: Backend>(
    engine: &mut Engine<B>,
    seq: SeqId,
    wants: impl Fn(usize, usize, bool) -> LogitsWanted,
    mut on_logits: impl FnMut(usize, Vec<f32>),
) -> Result<()> {
    let step_rows = EVAL_ROWS_PER_STEP.min(engine.config().max_batch_tokens);
    loop {
        let (done, len) = engine.seq_progress(seq)?;
        if done == len {
            return Ok(());
        }
        let n = (len - done).min(step_rows);
        let logits = engine
            .step(&[StepItem {
                seq,
                n_tokens: n,
                logits: wants(done, n, done + n == len),
            }])?
            .pop()
            .unwrap_or_default();
        on_logits(done, logits);
    }
}

fn perplexity(a: PerplexityArgs, threads: usize) -> Result<()> {
    let bytes = std::fs::read(&a.file).with_context(|| format!("reading {}", a.file.display()))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "{} is not valid UTF-8 (byte {})",
            a.file.display(),
            e.utf8_error().valid_up_to()
        )
    })?;
    crate::on_device!(a.device, threads, &a.model, |loaded| perplexity_on(
        &a, loaded, &text
    ))
}

fn perplexity_on<B: Backend>(a: &PerplexityArgs, mut loaded: Loaded<B>, text: &str) -> Result<()> {
    let ctx = loaded.engine.model.config.context_len;
    if a.context < 4 || a.context > ctx {
        anyhow::bail!(
            "--context {} must be between 4 and the model's context {ctx}",
            a.context
        );
    }
    let tokens = loaded.tokenizer.encode(text)?;
    let mut windows = tokens.len() / a.context;
    if windows == 0 {
        anyhow::bail!(
            "{} has {} tokens, fewer than one window of --context {}",
            a.file.display(),
            tokens.len(),
            a.context
        );
    }
    if a.max_windows > 0 {
        windows = windows.min(a.max_windows);
    }
    let vocab = loaded.engine.model.config.vocab;
    let first_scored = a.context / 2;
    let pb = crate::progress::bar(windows as u64, "perplexity");
    let started = std::time::Instant::now();
    let (mut nll, mut count) = (0f64, 0usize);
    for w in 0..windows {
        let win = &tokens[w * a.context..(w + 1) * a.context];
        let engine = &mut loaded.engine;
        let seq = engine.add_sequence(win)?;
        let wants = |done: usize, n: usize, _last: bool| {
            if done + n > first_scored {
                LogitsWanted::All
            } else {
                LogitsWanted::None
            }
        };
        let scored = compute_pending(engine, seq, wants, |done, logits| {
            for (r, row) in logits.chunks_exact(vocab).enumerate() {
                let pos = done + r;
                if pos >= first_scored && pos + 1 < win.len() {
                    let lse = tandem_engine::sampling::log_sum_exp(row) as f64;
                    nll += lse - row[win[pos + 1] as usize] as f64;
                    count += 1;
                }
            }
        });
        engine.remove_sequence(seq)?;
        scored?;
        pb.inc(1);
    }
    pb.finish_and_clear();
    let ppl = (nll / count as f64).exp();
    let secs = started.elapsed().as_secs_f64();
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "perplexity": ppl,
                "windows": windows,
                "context": a.context,
                "tokens_scored": count,
                "file_tokens": tokens.len(),
                "seconds": secs,
            })
        );
    } else {
        println!("perplexity: {ppl:.4}");
        eprintln!(
            "[{windows} windows of {} tokens, {count} tokens scored, {secs:.1} s]",
            a.context
        );
    }
    Ok(())
}
