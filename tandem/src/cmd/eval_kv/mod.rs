//! `tandem eval kv`: what each KV codec costs in quality and buys in bytes, measured the way disaggregated serving
//! uses it. For each window of the text, the context is prefilled once at full precision; then, per codec, its
//! blocks are encoded and decoded exactly as the transfer does (the same `kv::codec` functions), written into a
//! fresh sequence through the engine's transfer path, and the continuation is computed teacher-forced on top. The
//! continuation's next-token predictions give perplexity, and against the uncompressed run (`none`, byte-exact)
//! top-1 agreement and mean KL divergence. A passkey test hides a number in filler text and asks for it back after
//! the same round trip. Evicting variants first cut the context to their budget (`kv::evict`, ranking tokens by
//! the attention of the full-precision prefill where the policy asks) and move only the kept tokens' K/V, compacted,
//! as a prefill worker sends them; the continuation then runs at the true positions. The prefix cache is reset
//! between runs so no run reuses another's blocks.

mod passkey;
mod report;

use super::eval::compute_pending;
use super::{ModelArgs, load};
use anyhow::{Context, Result};
use std::time::{Duration, Instant};
use tandem_engine::backend::Backend;
use tandem_engine::kv::codec::{self, BlockRef, BlockShape, Codec};
use tandem_engine::kv::evict::{self, AttentionScores, Eviction};
use tandem_engine::sampling::{argmax, log_sum_exp};
use tandem_engine::{Engine, LogitsWanted, SeqId};
use tandem_kv_transfer::entropy;

#[derive(clap::Args, Debug)]
pub struct KvEvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// UTF-8 text to score.
    #[arg(long)]
    pub file: std::path::PathBuf,
    /// Codecs to compare (comma list); `none` is always measured first as the reference.
    #[arg(long, value_delimiter = ',', value_parser = super::parse_codec,
          default_values_t = Codec::ALL.to_vec())]
    pub codecs: Vec<Codec>,
    /// Eviction budgets to measure (comma list of policy:budget, e.g. snapkv:0.5 or streaming:256; `none` or an
    /// empty value: no eviction rows), each combined with every codec of --evict-codecs.
    #[arg(long, value_delimiter = ',', value_parser = parse_eviction_or_none,
          default_values = ["streaming:0.5", "snapkv:0.5", "h2o:0.5", "block:0.5"])]
    pub evictions: Vec<Option<Eviction>>,
    /// Codecs combined with each eviction budget (comma list).
    #[arg(long, value_delimiter = ',', value_parser = super::parse_codec,
          default_values_t = [Codec::None, Codec::Int4])]
    pub evict_codecs: Vec<Codec>,
    /// Tokens of context per window (prefilled, compressed, moved).
    #[arg(long, default_value_t = 512)]
    pub context: usize,
    /// Tokens of continuation per window (computed on the moved context and scored).
    #[arg(long, default_value_t = 128)]
    pub continuation: usize,
    /// Windows to score (0: as many as the text holds).
    #[arg(long, default_value_t = 4)]
    pub max_windows: usize,
    /// Passkey prompt lengths in tokens (comma list).
    #[arg(long, value_delimiter = ',', default_values_t = [1024usize, 2048, 4096])]
    pub passkey_lengths: Vec<usize>,
    /// Skip the passkey test.
    #[arg(long)]
    pub no_passkey: bool,
    /// Depths (0..1) at which the passkey is hidden, per length.
    #[arg(long, value_delimiter = ',', default_values_t = [0.1f64, 0.5, 0.9])]
    pub passkey_depths: Vec<f64>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Write an SVG of quality (perplexity change) against bytes per token here.
    #[arg(long)]
    pub svg: Option<std::path::PathBuf>,
}

/// One way of moving the cache: a codec, after an optional eviction.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Variant {
    pub codec: Codec,
    pub eviction: Option<Eviction>,
}

impl Variant {
    fn label(&self) -> String {
        match &self.eviction {
            None => self.codec.name().to_string(),
            Some(e) => format!("{}+{e}", self.codec),
        }
    }
    /// First query position whose attention the eviction ranks by (see `EvictionPolicy::scored_from`).
    fn scored_from(&self, prompt_len: usize) -> Option<usize> {
        self.eviction.and_then(|e| e.policy.scored_from(prompt_len))
    }
}

/// What one variant did over the whole run.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct CodecResult {
    /// The codec, then `+policy:budget` when evicting.
    pub codec: String,
    pub bytes_per_token: f64,
    /// Against the cache dtype (`none`) and against an f16 cache.
    pub ratio_vs_none: f64,
    pub ratio_vs_f16: f64,
    pub perplexity: f64,
    pub perplexity_change_pct: f64,
    pub top1_agreement: f64,
    pub mean_kl: f64,
    /// Uncompressed (f32) megabytes per second through encode and decode.
    pub encode_mb_s: f64,
    pub decode_mb_s: f64,
    /// With the transfer's lossless stage (entropy coding of each layer's blocks as one chunk, kept where it pays):
    /// bytes per token, the ratio against f16, and the stage's own compress and decompress rates in uncompressed
    /// (f32) megabytes per second.
    pub lossless_bytes_per_token: f64,
    pub lossless_ratio_vs_f16: f64,
    pub lossless_compress_mb_s: f64,
    pub lossless_decompress_mb_s: f64,
    /// Passkeys found, of those asked.
    pub passkey_found: usize,
    pub passkey_total: usize,
    #[serde(skip)]
    nll: f64,
    #[serde(skip)]
    scored: usize,
    #[serde(skip)]
    agree: usize,
    #[serde(skip)]
    kl: f64,
    #[serde(skip)]
    bytes: usize,
    #[serde(skip)]
    tokens_moved: usize,
    #[serde(skip)]
    encode: Duration,
    #[serde(skip)]
    decode: Duration,
    #[serde(skip)]
    raw_bytes: usize,
    #[serde(skip)]
    lossless_bytes: usize,
    #[serde(skip)]
    compress: Duration,
    #[serde(skip)]
    decompress: Duration,
}

/// Computes every pending token of `seq`; returns the logits of each computed row (`wants` All) or of the last.
pub(super) fn compute<B: Backend>(
    engine: &mut Engine<B>,
    seq: SeqId,
    wants: LogitsWanted,
) -> Result<Vec<f32>> {
    let mut out = Vec::new();
    let per_step = |_: usize, _: usize, last: bool| match wants {
        LogitsWanted::All => LogitsWanted::All,
        LogitsWanted::Last if last => LogitsWanted::Last,
        _ => LogitsWanted::None,
    };
    compute_pending(engine, seq, per_step, |_, rows| out.extend(rows))?;
    Ok(out)
}

/// K and V of every block of a prefilled prompt, `[layer][block]`, the prompt length, and the attention sums an
/// eviction policy ranks by (when the prefill was scored).
pub(super) struct Snapshot {
    blocks: Vec<Vec<(Vec<f32>, Vec<f32>)>>,
    tokens: usize,
    scores: Option<AttentionScores>,
}

/// Prefills `prompt` at full precision (summing attention from query position `scored_from` on, when given);
/// returns its blocks and the logits of its last token.
pub(super) fn prefill<B: Backend>(
    engine: &mut Engine<B>,
    prompt: &[u32],
    scored_from: Option<usize>,
) -> Result<(Snapshot, Vec<f32>)> {
    engine.reset_prefix_cache();
    let seq = match scored_from {
        Some(from) => engine.add_sequence_scored(prompt, from)?,
        None => engine.add_sequence(prompt)?,
    };
    let last = compute(engine, seq, LogitsWanted::Last);
    let ids = engine.seq_blocks(seq)?.to_vec();
    let layers = engine.kv_layout().layers;
    let blocks = (0..layers)
        .map(|l| ids.iter().map(|&b| engine.read_kv_block(l, b)).collect())
        .collect();
    let scores = engine.attention_scores(seq)?.cloned();
    engine.remove_sequence(seq)?;
    engine.reset_prefix_cache();
    Ok((
        Snapshot {
            blocks,
            tokens: prompt.len(),
            scores,
        },
        last?,
    ))
}

/// The full-precision prefills a set of variants needs, one per distinct scoring (the K/V are the same in each;
/// only the attention sums differ).
pub(super) struct Snapshots(Vec<(Option<usize>, Snapshot)>);

impl Snapshots {
    /// Prefills `prompt` once per distinct [`Variant::scored_from`]; returns them and the unscored last logits.
    pub(super) fn take<B: Backend>(
        engine: &mut Engine<B>,
        prompt: &[u32],
        variants: &[Variant],
    ) -> Result<(Self, Vec<f32>)> {
        let (plain, last) = prefill(engine, prompt, None)?;
        let mut all = vec![(None, plain)];
        for v in variants {
            let from = v.scored_from(prompt.len());
            if all.iter().all(|(f, _)| *f != from) {
                all.push((from, prefill(engine, prompt, from)?.0));
            }
        }
        Ok((Self(all), last))
    }

    fn for_variant(&self, v: &Variant) -> &Snapshot {
        let from = v.scored_from(self.0[0].1.tokens);
        &self
            .0
            .iter()
            .find(|(f, _)| *f == from)
            .expect("taken for every variant")
            .1
    }
}

/// Moves the prefill of `prompt` into a new sequence as `variant` says (evicting, then through its codec), as a
/// decode worker receives it; counts bytes and codec time into `r`. The caller removes the returned sequence.
pub(super) fn transfer<B: Backend>(
    engine: &mut Engine<B>,
    prompt: &[u32],
    snaps: &Snapshots,
    variant: Variant,
    r: &mut CodecResult,
) -> Result<SeqId> {
    let snap = snaps.for_variant(&variant);
    let codec = variant.codec;
    let layout = *engine.kv_layout();
    let shape = BlockShape {
        kv_heads: layout.kv_heads,
        block_size: layout.block_size,
        head_dim: layout.head_dim,
    };
    let plan = match &variant.eviction {
        Some(e) => Some(evict::plan(
            e,
            snap.tokens,
            layout.block_size,
            layout.layers,
            layout.kv_heads,
            snap.scores.as_ref(),
        )?),
        None => None,
    };
    let target = match &plan {
        Some(p) => engine.add_sequence_evicted(prompt, p.kept)?,
        None => engine.add_sequence_for_transfer(prompt)?,
    };
    anyhow::ensure!(target.cached_blocks == 0, "the prefix cache was not reset");
    let keys = engine.key_rotation();
    let coding = codec::BlockCoding {
        codec,
        raw: layout.format,
        shape,
        keys: &keys,
    };
    // Tokens moved: the kept ones under eviction (compacted into the first blocks), else the whole context.
    let moved = plan.as_ref().map_or(snap.tokens, |p| p.kept);
    let mut buf = Vec::new();
    let (mut k, mut v) = (vec![0f32; shape.elems()], vec![0f32; shape.elems()]);
    let (mut ck, mut cv) = (vec![0f32; shape.elems()], vec![0f32; shape.elems()]);
    let mut chunk = Vec::new();
    for (layer, blocks) in snap.blocks.iter().enumerate() {
        chunk.clear();
        let mut model = codec::PayloadModel::default();
        for (i, &dest) in target.blocks.iter().enumerate() {
            let (bk, bv) = match &plan {
                Some(p) => {
                    p.compact_block(layer, i, shape, |b| &blocks[b], &mut ck, &mut cv);
                    (ck.as_slice(), cv.as_slice())
                }
                None => (blocks[i].0.as_slice(), blocks[i].1.as_slice()),
            };
            let fill = codec::Fill::of_block(i, moved, shape.block_size);
            buf.clear();
            let t0 = Instant::now();
            let block = BlockRef { k: bk, v: bv, fill };
            codec::encode_block(&coding, block, &mut buf);
            let t1 = Instant::now();
            codec::decode_block(&coding, fill, &buf, &mut k, &mut v)?;
            r.decode += t1.elapsed();
            r.encode += t1 - t0;
            r.bytes += buf.len();
            r.raw_bytes += 2 * shape.elems() * 4;
            chunk.extend_from_slice(&buf);
            model.push_block(codec, layout.format, shape, fill);
            engine.write_transferred_block(target.seq, layer, dest, &k, &v)?;
        }
        // The layer's blocks as one chunk through the entropy stage, as a sender with `--kv-lossless` sends them
        // (the stage only where it makes the chunk smaller).
        let t0 = Instant::now();
        let packed = entropy::compress(&chunk, &model);
        let t1 = Instant::now();
        let back = entropy::decompress(&packed, &model)?;
        r.decompress += t1.elapsed();
        r.compress += t1 - t0;
        anyhow::ensure!(
            back == chunk,
            "the entropy stage did not give the payload back"
        );
        r.lossless_bytes += packed.len().min(chunk.len());
    }
    r.tokens_moved += snap.tokens;
    engine.complete_transfer(target.seq, codec == Codec::None && plan.is_none())?;
    Ok(target.seq)
}

/// One item of `--evictions`: `none` (or nothing) for no eviction, else a policy and budget.
fn parse_eviction_or_none(s: &str) -> std::result::Result<Option<Eviction>, String> {
    match s.trim() {
        "" | "none" => Ok(None),
        e => super::parse_eviction(e).map(Some),
    }
}

fn log_softmax(row: &[f32]) -> Vec<f32> {
    let lse = log_sum_exp(row);
    row.iter().map(|&x| x - lse).collect()
}

/// Scores one window: the continuation `cont` after a moved context, per variant (the first is plain `none`).
fn score_window<B: Backend>(
    engine: &mut Engine<B>,
    ctx: &[u32],
    cont: &[u32],
    results: &mut [CodecResult],
    variants: &[Variant],
) -> Result<()> {
    let vocab = engine.model.config.vocab;
    let (snaps, _) = Snapshots::take(engine, ctx, variants)?;
    let mut reference: Vec<Vec<f32>> = Vec::new();
    for (variant, r) in variants.iter().zip(results.iter_mut()) {
        let seq = transfer(engine, ctx, &snaps, *variant, r)?;
        let run = (|| -> Result<Vec<f32>> {
            for &t in cont {
                engine.append_token(seq, t)?;
            }
            compute(engine, seq, LogitsWanted::All)
        })();
        engine.remove_sequence(seq)?;
        engine.reset_prefix_cache();
        let logits = run?;
        let rows: Vec<Vec<f32>> = logits.chunks_exact(vocab).map(log_softmax).collect();
        if reference.is_empty() {
            // `none` moves the cache byte for byte: its rows are the reference (agreement 1, KL 0 by definition).
            reference = rows.clone();
        }
        for (i, row) in rows.iter().enumerate().take(cont.len() - 1) {
            r.nll -= f64::from(row[cont[i + 1] as usize]);
            r.scored += 1;
            if let Some(refr) = reference.get(i) {
                r.agree += usize::from(argmax(row) == argmax(refr));
                r.kl += refr
                    .iter()
                    .zip(row)
                    .map(|(&p, &q)| f64::from(p).exp() * f64::from(p - q))
                    .sum::<f64>();
            }
        }
    }
    Ok(())
}

pub fn run(a: KvEvalArgs, threads: usize) -> Result<()> {
    let text = std::fs::read_to_string(&a.file)
        .with_context(|| format!("reading {} (UTF-8 text)", a.file.display()))?;
    let plain = |codec| Variant {
        codec,
        eviction: None,
    };
    let mut variants = vec![plain(Codec::None)];
    variants.extend(
        a.codecs
            .iter()
            .filter(|&&c| c != Codec::None)
            .map(|&c| plain(c)),
    );
    for &e in a.evictions.iter().flatten() {
        for &codec in &a.evict_codecs {
            variants.push(Variant {
                codec,
                eviction: Some(e),
            });
        }
    }
    if a.continuation < 2 || a.context == 0 {
        anyhow::bail!("--context must be at least 1 and --continuation at least 2");
    }
    if let Some(d) = a.passkey_depths.iter().find(|d| !(0.0..=1.0).contains(*d)) {
        anyhow::bail!("--passkey-depths must lie in 0..1, got {d}");
    }
    let mut loaded = load(&a.model, threads)?;
    let ctx_len = loaded.engine.model.config.context_len;
    let window = a.context + a.continuation;
    if window > ctx_len {
        anyhow::bail!(
            "--context + --continuation = {window} exceeds the model's context {ctx_len}"
        );
    }
    if let Some(l) = a
        .passkey_lengths
        .iter()
        .find(|&&l| l + 16 > ctx_len || l < 64)
    {
        anyhow::bail!(
            "--passkey-lengths: {l} must be between 64 and the model's context {ctx_len} minus 16"
        );
    }
    let tokens = loaded.tokenizer.encode(&text)?;
    let mut windows = tokens.len() / window;
    if windows == 0 {
        anyhow::bail!(
            "{} has {} tokens, fewer than one window of {window} (--context + --continuation)",
            a.file.display(),
            tokens.len()
        );
    }
    if a.max_windows > 0 {
        windows = windows.min(a.max_windows);
    }
    let mut results: Vec<CodecResult> = variants
        .iter()
        .map(|v| CodecResult {
            codec: v.label(),
            ..Default::default()
        })
        .collect();
    let started = Instant::now();
    let pb = crate::progress::bar(windows as u64, "kv windows");
    for w in 0..windows {
        let win = &tokens[w * window..(w + 1) * window];
        let (ctx, cont) = win.split_at(a.context);
        score_window(&mut loaded.engine, ctx, cont, &mut results, &variants)?;
        pb.inc(1);
    }
    pb.finish_and_clear();
    let lengths: &[usize] = if a.no_passkey {
        &[]
    } else {
        &a.passkey_lengths
    };
    let keys = passkey::run(
        &mut loaded.engine,
        &loaded.tokenizer,
        &variants,
        lengths,
        &a.passkey_depths,
        &mut results,
    )?;
    let layout = *loaded.engine.kv_layout();
    let f16_per_token = (2 * layout.layers * layout.kv_heads * layout.head_dim * 2) as f64;
    report::finish(&mut results, f16_per_token);
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "model": a.model.model.display().to_string(),
                "file": a.file.display().to_string(),
                "kv_format": format!("{:?}", layout.format),
                "windows": windows, "context": a.context, "continuation": a.continuation,
                "passkeys": keys,
                "codecs": results,
                "seconds": started.elapsed().as_secs_f64(),
            })
        );
    } else {
        print!("{}", report::table(&results));
        eprintln!(
            "[{windows} windows of {} + {} tokens, {} passkey prompts, {:.1} s]",
            a.context,
            a.continuation,
            keys.len(),
            started.elapsed().as_secs_f64()
        );
    }
    if let Some(path) = &a.svg {
        std::fs::write(path, report::svg(&results))
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}
