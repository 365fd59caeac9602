//! `tandem bench kv-capacity`: how large a decode batch one KV memory budget holds in each cache format, and the
//! decode throughput at that batch. For every format the engine gets the same byte budget; as many sequences of
//! `--context` tokens as its blocks hold are prefilled (distinct prompts, so no block is shared) and then decoded
//! together for `--decode-steps` steps. The first format listed is the baseline of the ratios.

use super::{ModelArgs, load};
use anyhow::Result;
use std::time::Instant;
use tandem_engine::kv::KvFormat;
use tandem_engine::sampling::argmax;

#[derive(clap::Args, Debug)]
pub struct KvCapacityArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Cache formats to compare (comma list of f32, f16, int8, fp8, int4, kivi2); the first is the baseline.
    #[arg(long, value_delimiter = ',', value_parser = super::parse_kv_format,
          default_values_t = KvFormat::ALL)]
    pub formats: Vec<KvFormat>,
    /// Tokens each sequence reaches (prompt plus decoded tokens).
    #[arg(long, default_value_t = 512)]
    pub context: usize,
    /// Decode steps timed over the full batch.
    #[arg(long, default_value_t = 16)]
    pub decode_steps: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, serde::Serialize)]
struct Row {
    format: String,
    bytes_per_token: usize,
    tokens_held: usize,
    sequences: usize,
    decode_tokens_per_s: f64,
    sequences_vs_baseline: f64,
    throughput_vs_baseline: f64,
}

pub fn run(a: KvCapacityArgs, threads: usize) -> Result<()> {
    if a.formats.is_empty() || a.decode_steps == 0 || a.context <= a.decode_steps + 1 {
        anyhow::bail!(
            "--formats must name one format, --decode-steps be at least 1 and below --context - 1"
        );
    }
    let mut rows: Vec<Row> = Vec::new();
    let pb = crate::progress::bar(a.formats.len() as u64, "formats");
    for f in &a.formats {
        let mut args = a.model.clone();
        args.kv_format = *f;
        let mut loaded = load(&args, threads)?;
        let eng = &mut loaded.engine;
        let layout = *eng.kv_layout();
        let ctx_max = eng.model.config.context_len;
        if a.context >= ctx_max {
            anyhow::bail!(
                "--context {} must be below the model's context {ctx_max}",
                a.context
            );
        }
        let per_seq = a.context.div_ceil(layout.block_size);
        let n = layout.num_blocks / per_seq;
        if n == 0 {
            anyhow::bail!(
                "{f}: --kv-cache-mib {} holds {} tokens, less than one sequence of --context {}",
                args.kv_cache_mib,
                layout.num_blocks * layout.block_size,
                a.context
            );
        }
        let vocab = eng.model.config.vocab;
        let prompt_len = a.context - a.decode_steps;
        let mut seqs = Vec::with_capacity(n);
        for s in 0..n {
            // Distinct from the first token on, so no two sequences share a block.
            let prompt: Vec<u32> = (0..prompt_len)
                .map(|i| (100 + (i * 7919 + s * 104_729 + 1) % (vocab - 100)) as u32)
                .collect();
            let id = eng.add_sequence(&prompt)?;
            let logits = eng.prefill(id)?;
            eng.append_token(id, argmax(&logits))?;
            seqs.push(id);
        }
        let t = Instant::now();
        for _ in 1..a.decode_steps {
            eng.step_greedy(&seqs)?;
        }
        let rate = (n * (a.decode_steps - 1)) as f64 / t.elapsed().as_secs_f64();
        let base = rows.first();
        rows.push(Row {
            format: f.to_string(),
            bytes_per_token: layout.bytes_per_token(),
            tokens_held: layout.num_blocks * layout.block_size,
            sequences: n,
            decode_tokens_per_s: rate,
            sequences_vs_baseline: base.map_or(1.0, |b| n as f64 / b.sequences as f64),
            throughput_vs_baseline: base.map_or(1.0, |b| rate / b.decode_tokens_per_s),
        });
        pb.inc(1);
    }
    pb.finish_and_clear();
    if a.json {
        println!(
            "{}",
            serde_json::json!({"kv_cache_mib": a.model.kv_cache_mib, "context": a.context, "rows": rows})
        );
        return Ok(());
    }
    println!(
        "{:<6} {:>9} {:>11} {:>6} {:>11} {:>9} {:>9}",
        "format", "B/token", "tokens held", "seqs", "decode t/s", "x seqs", "x t/s"
    );
    for r in &rows {
        println!(
            "{:<6} {:>9} {:>11} {:>6} {:>11.1} {:>9.2} {:>9.2}",
            r.format,
            r.bytes_per_token,
            r.tokens_held,
            r.sequences,
            r.decode_tokens_per_s,
            r.sequences_vs_baseline,
            r.throughput_vs_baseline
        );
    }
    eprintln!(
        "[{} MiB of KV cache, sequences of {} tokens, {} decode steps; baseline {}]",
        a.model.kv_cache_mib, a.context, a.decode_steps, rows[0].format
    );
    Ok(())
}
