//! `tandem generate`: one prompt, streamed to stdout, no servers.

use super::{DeviceArgs, Loaded, ModelArgs};
use anyhow::{Context, Result};
use std::io::Write;
use tandem_engine::generate::{Request, StopConditions, run_batch};
use tandem_engine::sampling::SamplingParams;
use tandem_engine::tokenizer::chat::{ChatMessage, Role};

#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// The prompt (a user message, wrapped in the model's chat template unless --raw).
    #[arg(long)]
    pub prompt: std::ffi::OsString,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 128, allow_negative_numbers = true)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub temperature: f32,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches this.
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub top_p: f32,
    /// Keep only the K most likely tokens (0: all).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub top_k: usize,
    /// Drop tokens less likely than this fraction of the most likely one.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub min_p: f32,
    /// Penalize tokens already in the prompt or output (1: off).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub repetition_penalty: f32,
    /// Seed for reproducible sampling.
    #[arg(long, allow_negative_numbers = true)]
    pub seed: Option<u64>,
    /// Stop when this string appears (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Feed the prompt as-is (no chat template) and print only the generated text on stdout.
    #[arg(long)]
    pub raw: bool,
}

pub fn run(a: GenerateArgs, threads: usize) -> Result<()> {
    let Some(user_text) = a.prompt.to_str().map(str::to_owned) else {
        anyhow::bail!("--prompt is not valid UTF-8");
    };
    if user_text.is_empty() {
        anyhow::bail!("--prompt is empty");
    }
    crate::on_device!(a.device, threads, &a.model, |loaded| generate_on(
        &a, loaded, user_text
    ))
}

fn generate_on<B: tandem_engine::backend::Backend>(
    a: &GenerateArgs,
    mut loaded: Loaded<B>,
    user_text: String,
) -> Result<()> {
    let tok = &loaded.tokenizer;
    let text = if a.raw {
        user_text.clone()
    } else {
        tok.chat_template()?
            .render(&[ChatMessage::new(Role::User, user_text.clone())], true)?
    };
    let prompt = tok.encode(&text).context("tokenizing the prompt")?;
    let ctx = loaded.engine.model.config.context_len;
    if prompt.len() >= ctx {
        anyhow::bail!(
            "prompt is {} tokens; the model's context is {ctx} tokens",
            prompt.len()
        );
    }
    // The whole output must fit the KV cache, or generation would stop part-way with the text so far lost (a
    // --max-tokens past the context is the engine's to refuse, by name).
    let (kv, total) = (loaded.engine.kv_layout(), prompt.len() + a.max_tokens);
    let need = total.div_ceil(kv.block_size);
    if total <= ctx && need > kv.num_blocks {
        anyhow::bail!(
            "the prompt ({} tokens) plus --max-tokens {} need {need} KV blocks of {} tokens; the KV cache (--kv-cache-mib) holds {}",
            prompt.len(),
            a.max_tokens,
            kv.block_size,
            kv.num_blocks
        );
    }
    let sampling = SamplingParams {
        temperature: a.temperature,
        top_p: a.top_p,
        top_k: a.top_k,
        min_p: a.min_p,
        repetition_penalty: a.repetition_penalty,
        seed: a.seed,
        ..Default::default()
    };
    let stop = StopConditions {
        max_tokens: a.max_tokens,
        stop_strings: a.stop.clone(),
        ..Default::default()
    };
    let req = Request {
        prompt,
        sampling,
        stop,
    };
    let mut out = std::io::stdout().lock();
    let mut write_err = None;
    let done = run_batch(&mut loaded.engine, tok, std::slice::from_ref(&req), |d| {
        if write_err.is_none()
            && !d.text.is_empty()
            && let Err(e) = out.write_all(d.text.as_bytes()).and_then(|_| out.flush())
        {
            write_err = Some(e);
        }
    })?;
    if let Some(e) = write_err
        && e.kind() != std::io::ErrorKind::BrokenPipe
    {
        return Err(e.into());
    }
    writeln!(out)?;
    let c = &done[0];
    let decode_s = (c.total_time - c.time_to_first_token).as_secs_f64();
    let generated = c.tokens.len();
    // The first token comes from prefill; the rest are decode steps.
    let decode_tok_s = if decode_s > 0.0 {
        generated.saturating_sub(1) as f64 / decode_s
    } else {
        0.0
    };
    tracing::info!(
        prompt_tokens = c.prompt_tokens,
        generated,
        finish = c.finish_reason.as_str(),
        ttft_ms = c.time_to_first_token.as_millis() as u64,
        decode_tok_s,
        "done"
    );
    if !a.raw {
        eprintln!(
            "[{} prompt tokens, {generated} generated, finish: {}, {:.0} ms to first token, {decode_tok_s:.1} tok/s]",
            c.prompt_tokens,
            c.finish_reason.as_str(),
            c.time_to_first_token.as_secs_f64() * 1e3,
        );
    }
    Ok(())
}
