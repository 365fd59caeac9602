//! `tandem bench engine`: prefill and decode throughput of the engine on this machine, with the floors they are
//! bound by (FLOPs for prefill, bytes read per token for decode) measured in the same run.
//!
//! Prefill is timed on fresh prompts (a different first token per run, so the prefix cache never hits); decode on
//! B sequences stepped together, greedy, after a short prompt, every batch size once per round so that a round's
//! batch sizes see the machine in the same state; each batch size's ratio to the first is the median of the rounds'
//! ratios. Each figure is the median of `--runs`. The memory
//! bandwidth is measured by streaming a buffer larger than the last-level cache, so "fraction of floor" says how
//! close decode is to reading the weights at the machine's speed.

use super::{ModelArgs, load};
use anyhow::Result;
use std::time::Instant;
use tandem_engine::sampling::argmax;

#[derive(clap::Subcommand, Debug)]
pub enum BenchCommand {
    /// Engine throughput: prefill at 128/512 tokens, decode at batch 1/4/16.
    Engine(EngineBenchArgs),
    /// Serving latency and throughput through the router, against a baseline in the same run.
    Serve(Box<super::bench_serve::ServeBenchArgs>),
    /// KV transfer over loopback gRPC per codec, against the codecs' encode speed; or, with `--transport nccl`,
    /// between two GPUs over NCCL against a peer copy.
    Transfer(super::bench_transfer::TransferBenchArgs),
    /// Decode batch one KV memory budget holds per cache format (f32, f16, int8), and its throughput.
    KvCapacity(super::bench_kv_capacity::KvCapacityArgs),
    /// The CUDA backend on seeded dummy weights at a real model's shape: a CUDA-vs-CPU check, the measured
    /// ceilings, prefill and decode against their floors.
    Gpu(super::bench_gpu::GpuBenchArgs),
}

#[derive(clap::Args, Debug)]
pub struct EngineBenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Timed repetitions per figure (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Decode steps timed per batch size.
    #[arg(long, default_value_t = 64)]
    pub decode_steps: usize,
    /// Prompt lengths for prefill.
    #[arg(long, value_delimiter = ',', default_values_t = [128usize, 512])]
    pub prefill_tokens: Vec<usize>,
    /// Batch sizes for decode.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 4, 16])]
    pub decode_batch: Vec<usize>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(c: BenchCommand, threads: usize) -> Result<()> {
    match c {
        BenchCommand::Engine(a) => engine(a, threads),
        BenchCommand::Serve(a) => super::bench_serve::run(*a, threads),
        BenchCommand::Transfer(a) => super::bench_transfer::run(a),
        BenchCommand::KvCapacity(a) => super::bench_kv_capacity::run(a, threads),
        BenchCommand::Gpu(a) => super::bench_gpu::run(a, threads),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Streams a 256 MiB buffer (well past any cache) a few times; returns the best read rate in bytes/s.
fn memory_read_bandwidth(backend: &tandem_engine::backend::cpu::CpuBackend) -> f64 {
    use std::sync::atomic::{AtomicU32, Ordering};
    let n = 64 << 20;
    let buf: Vec<f32> = (0..n).map(|i| i as f32).collect();
    let chunks: Vec<&[f32]> = buf.chunks(1 << 16).collect();
    let mut best = 0f64;
    for _ in 0..5 {
        let t = Instant::now();
        let sink = AtomicU32::new(0);
        backend.parallel_for(chunks.len(), &|i| {
            let s = tandem_engine::backend::cpu::simd::dot(chunks[i], chunks[i]);
            sink.fetch_add(s.to_bits() & 1, Ordering::Relaxed);
        });
        let dt = t.elapsed().as_secs_f64();
        std::hint::black_box(sink.load(Ordering::Relaxed));
        best = best.max((n * 4) as f64 / dt);
    }
    best
}

fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn engine(a: EngineBenchArgs, threads: usize) -> Result<()> {
    if a.runs == 0 || a.decode_steps == 0 {
        anyhow::bail!("--runs and --decode-steps must be at least 1");
    }
    let mut loaded = load(&a.model, threads)?;
    let cfg = loaded.engine.model.config.clone();
    let eng = &mut loaded.engine;
    let max_prompt = a.prefill_tokens.iter().copied().max().unwrap_or(0);
    if max_prompt >= cfg.context_len || a.prefill_tokens.contains(&0) {
        anyhow::bail!(
            "--prefill-tokens must be between 1 and {}",
            cfg.context_len - 1
        );
    }
    // A deterministic token stream that avoids special tokens (ids below 100 are control/byte tokens in most vocabularies).
    let token_at =
        |i: usize, salt: usize| (100 + (i * 7919 + salt * 104_729) % (cfg.vocab - 100)) as u32;
    let total_runs = a.prefill_tokens.len() * (a.runs + 1) + a.decode_batch.len() * (a.runs + 1);
    let pb = crate::progress::bar(total_runs as u64, "benchmark");
    let mut salt = 1;
    let mut prefill = Vec::new();
    for &n in &a.prefill_tokens {
        let mut times = Vec::new();
        for r in 0..=a.runs {
            salt += 1;
            let prompt: Vec<u32> = (0..n).map(|i| token_at(i, salt)).collect();
            let seq = eng.add_sequence(&prompt)?;
            let t = Instant::now();
            eng.prefill(seq)?;
            let dt = t.elapsed().as_secs_f64();
            eng.remove_sequence(seq)?;
            if r > 0 {
                times.push(dt);
            }
            pb.inc(1);
        }
        let dt = median(times);
        let flops = 2.0 * cfg.matmul_params() as f64 * n as f64;
        prefill.push(serde_json::json!({"tokens": n, "seconds": dt, "tokens_per_s": n as f64 / dt, "gflops": flops / dt / 1e9}));
    }
    // Decode rounds: every batch size once per round, so that each round's figures share the machine's state of the
    // moment (a shared VM's speed drifts by tens of percent over a minute) and a round's ratio to the first batch
    // size compares like with like. Round 0 warms up and is not counted.
    if a.decode_batch.contains(&0) {
        anyhow::bail!("--decode-batch sizes must be at least 1");
    }
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); a.decode_batch.len()];
    for r in 0..=a.runs {
        for (bi, &b) in a.decode_batch.iter().enumerate() {
            salt += 1;
            let mut seqs = Vec::new();
            for s in 0..b {
                let prompt: Vec<u32> = (0..32).map(|i| token_at(i, salt * 64 + s)).collect();
                let id = eng.add_sequence(&prompt)?;
                let logits = eng.prefill(id)?;
                eng.append_token(id, argmax(&logits))?;
                seqs.push(id);
            }
            let t = Instant::now();
            let steps = a.decode_steps.min(cfg.context_len - 40);
            for _ in 0..steps {
                eng.step_greedy(&seqs)?;
            }
            let dt = t.elapsed().as_secs_f64();
            for s in seqs {
                eng.remove_sequence(s)?;
            }
            if r > 0 {
                rates[bi].push((b * steps) as f64 / dt);
            }
            pb.inc(1);
        }
    }
    let decode: Vec<serde_json::Value> = a
        .decode_batch
        .iter()
        .zip(&rates)
        .map(|(&b, rs)| {
            let vs_first: Vec<f64> = rs.iter().zip(&rates[0]).map(|(x, f)| x / f).collect();
            serde_json::json!({
                "batch": b,
                "tokens_per_s": median(rs.clone()),
                "vs_first_batch": median(vs_first),
            })
        })
        .collect();
    pb.finish_and_clear();
    // Read the peak before the bandwidth probe allocates its own buffer.
    let rss = peak_rss_bytes();
    let bandwidth = memory_read_bandwidth(&loaded.engine.backend);
    // Bytes a batch-1 decode step must read: every matrix once (embeddings are a lookup, unless tied to the head).
    let bytes_per_token = loaded.decode_floor_bytes;
    let floor_tok_s = bandwidth / bytes_per_token as f64;
    let kv_bytes = loaded.engine.kv_layout().total_bytes() as u64;
    let report = serde_json::json!({
        "threads": threads,
        "simd": loaded.engine.backend.simd_name(),
        "model_weight_bytes": loaded.weight_bytes,
        "kv_cache_bytes": kv_bytes,
        "prefill": prefill,
        "decode": decode,
        "decode_bytes_per_token_floor": bytes_per_token,
        "memory_read_bandwidth_gb_s": bandwidth / 1e9,
        "decode_batch1_ceiling_tok_s": floor_tok_s,
        "peak_rss_bytes": rss,
    });
    if a.json {
        println!("{report}");
        return Ok(());
    }
    println!(
        "engine benchmark ({threads} threads, {} kernels)",
        loaded.engine.backend.simd_name()
    );
    for p in &prefill {
        println!(
            "prefill {:>5} tokens: {:>8.1} tok/s  ({:.1} GFLOP/s)",
            p["tokens"],
            p["tokens_per_s"].as_f64().unwrap_or(0.0),
            p["gflops"].as_f64().unwrap_or(0.0)
        );
    }
    let b1 = decode
        .first()
        .and_then(|d| d["tokens_per_s"].as_f64())
        .unwrap_or(0.0);
    for d in &decode {
        println!(
            "decode batch {:>3}:     {:>8.1} tok/s  ({:.2}x batch {}, median of the rounds' ratios)",
            d["batch"],
            d["tokens_per_s"].as_f64().unwrap_or(0.0),
            d["vs_first_batch"].as_f64().unwrap_or(0.0),
            decode[0]["batch"]
        );
    }
    println!(
        "decode floor: {:.1} MB read per token at batch 1; memory reads at {:.1} GB/s -> ceiling {:.0} tok/s; batch-1 achieves {:.0}% of it",
        bytes_per_token as f64 / 1e6,
        bandwidth / 1e9,
        floor_tok_s,
        100.0 * b1 / floor_tok_s
    );
    if let Some(r) = rss {
        println!(
            "peak resident memory: {:.1} MiB (model {:.1} MiB + KV budget {:.1} MiB + {:.1} MiB other)",
            r as f64 / 1048576.0,
            loaded.weight_bytes as f64 / 1048576.0,
            kv_bytes as f64 / 1048576.0,
            (r as f64 - loaded.weight_bytes as f64 - kv_bytes as f64) / 1048576.0
        );
    }
    Ok(())
}
