//! Subcommands, one module each, plus the model loading they share.

pub mod bench;
pub mod bench_gpu;
pub mod bench_kv_capacity;
pub mod bench_serve;
pub mod bench_transfer;
pub mod bench_transfer_nccl;
pub mod eval;
pub mod eval_kv;
pub mod generate;
pub mod membership;
pub mod serve;
pub mod simulate;
pub mod up;

use anyhow::{Context, Result};
use std::path::PathBuf;
use tandem_engine::backend::Backend;
use tandem_engine::backend::cpu::CpuBackend;
use tandem_engine::kv::KvFormat;
use tandem_engine::model::ModelSource;
use tandem_engine::tokenizer::Tokenizer;
use tandem_engine::{Engine, EngineConfig};
use tandem_router::policy::{CostModel, Spread};

/// Options every command that loads a model shares.
#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// Model: a .gguf file or an HF directory (config.json + *.safetensors + tokenizer.json).
    #[arg(long, env = "TANDEM_MODEL", default_value_os_t = default_model_path())]
    pub model: PathBuf,
    /// KV cache budget in MiB (sets the number of KV blocks; 1 to 16777216).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=1 << 24))]
    pub kv_cache_mib: u64,
    /// Tokens per KV block.
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
    /// Element format of the KV cache: f32, f16 (half the memory; CPU decode attention reads it in place, about
    /// twice as fast as f32 at long contexts), int8 or fp8 (a byte per dim, integer or E4M3, and one f16 scale per
    /// token and head; 3.9x the tokens of f32), int4 (4-bit codes with an f16 min and scale per 32 dims; 6.4x
    /// the tokens of f32) or kivi2 (2-bit: keys per channel over each block, values per 32 dims of a token; 9.1x
    /// the tokens of f32, at a large perplexity cost on small models).
    #[arg(long, default_value = "f32", value_parser = parse_kv_format)]
    pub kv_format: KvFormat,
    /// Most tokens computed in one forward pass (prefill chunk size).
    #[arg(long, default_value_t = 512)]
    pub max_batch_tokens: usize,
}

fn parse_kv_format(s: &str) -> std::result::Result<KvFormat, String> {
    KvFormat::parse(s).map_err(|e| e.to_string())
}

fn parse_codec(s: &str) -> std::result::Result<tandem_engine::kv::codec::Codec, String> {
    tandem_engine::kv::codec::Codec::parse(s).map_err(|e| e.to_string())
}

fn parse_eviction(s: &str) -> std::result::Result<tandem_engine::kv::evict::Eviction, String> {
    tandem_engine::kv::evict::Eviction::parse(s).map_err(|e| e.to_string())
}

pub use tandem_engine::model::default_model_path;

/// The cost policy's knobs, shared by `tandem router`, `tandem up` and `tandem simulate`; unset ones keep the
/// model's figures.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct CostArgs {
    /// How the cost policy spreads requests among near-equal workers: softmax (default), power-of-two or argmin.
    #[arg(long, value_parser = parse_spread)]
    pub spread: Option<SpreadKind>,
    /// Softmax temperature in seconds of estimated cost (default: one block's prefill time).
    #[arg(long)]
    pub route_temperature_s: Option<f64>,
    /// Weight of prompt tokens still to compute.
    #[arg(long)]
    pub w_prefill: Option<f64>,
    /// Weight of work queued ahead of the request.
    #[arg(long)]
    pub w_queue: Option<f64>,
    /// Weight of KV bytes to move from prefill to decode worker.
    #[arg(long)]
    pub w_transfer: Option<f64>,
    /// Uncached prompt tokens up to which a decode worker may prefill for itself when that is cheaper (default 256).
    #[arg(long)]
    pub local_prefill_max_tokens: Option<usize>,
}

/// How the router places requests: `--policy` and the cost policy's knobs.
#[derive(clap::Args, Debug, Clone)]
pub struct RoutingArgs {
    /// Routing policy: cost (tokens to prefill, queues, KV bytes to move), prefix (longest cached prefix),
    /// least-loaded or round-robin.
    #[arg(long, default_value = "cost")]
    pub policy: tandem_router::PolicyKind,
    #[command(flatten)]
    pub cost: CostArgs,
}

impl RoutingArgs {
    pub fn routing(&self, block_size: usize) -> Result<tandem_router::Routing> {
        if block_size == 0 {
            anyhow::bail!("--block-size must be at least 1");
        }
        Ok(tandem_router::Routing {
            policy: self.policy,
            cost: self.cost.apply(CostModel::default())?,
            naming: tandem_router::BlockNaming {
                block_size,
                ..Default::default()
            },
            ..Default::default()
        })
    }
}

/// The router's admission control: a bound on requests in flight and per-API-key rate limits.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct AdmissionArgs {
    /// Requests the router keeps open at once; past it, new ones get HTTP 429 / gRPC RESOURCE_EXHAUSTED with a
    /// retry hint (default: no bound).
    #[arg(long)]
    pub max_inflight: Option<usize>,
    /// Requests per second allowed to each API key (the `Authorization: Bearer` value; no key = one shared key).
    #[arg(long)]
    pub rate_limit_rps: Option<f64>,
    /// Burst each API key may send above --rate-limit-rps.
    #[arg(long, default_value_t = 10)]
    pub rate_limit_burst: u32,
    /// On SIGTERM / Ctrl-C, seconds open streams may run on after new requests are refused (503).
    #[arg(long, default_value_t = 30.0)]
    pub drain_timeout_s: f64,
}

impl AdmissionArgs {
    pub fn config(&self) -> Result<tandem_router::admission::AdmissionConfig> {
        if self.max_inflight == Some(0) {
            anyhow::bail!("--max-inflight must be at least 1");
        }
        let rate_limit = match self.rate_limit_rps {
            None => None,
            Some(r) if r.is_finite() && r > 0.0 && self.rate_limit_burst > 0 => {
                Some(tandem_router::admission::RateLimit {
                    per_s: r,
                    burst: self.rate_limit_burst,
                })
            }
            Some(r) => anyhow::bail!(
                "--rate-limit-rps must be positive (got {r}) and --rate-limit-burst at least 1"
            ),
        };
        if !(self.drain_timeout_s.is_finite() && (0.0..=3600.0).contains(&self.drain_timeout_s)) {
            anyhow::bail!(
                "--drain-timeout-s must be between 0 and 3600, got {}",
                self.drain_timeout_s
            );
        }
        Ok(tandem_router::admission::AdmissionConfig {
            max_inflight: self.max_inflight,
            rate_limit,
            drain_timeout: std::time::Duration::from_secs_f64(self.drain_timeout_s),
        })
    }
}

/// `--spread` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpreadKind {
    Softmax,
    PowerOfTwo,
    Argmin,
}

fn parse_spread(s: &str) -> std::result::Result<SpreadKind, String> {
    match s {
        "softmax" => Ok(SpreadKind::Softmax),
        "power-of-two" => Ok(SpreadKind::PowerOfTwo),
        "argmin" => Ok(SpreadKind::Argmin),
        _ => Err(format!("{s:?}: expected softmax, power-of-two or argmin")),
    }
}

impl CostArgs {
    /// `base` with the knobs given on the command line; fails on a negative or non-finite weight.
    pub fn apply(&self, base: CostModel) -> Result<CostModel> {
        let mut m = base;
        for (name, v) in [
            ("--w-prefill", self.w_prefill),
            ("--w-queue", self.w_queue),
            ("--w-transfer", self.w_transfer),
            ("--route-temperature-s", self.route_temperature_s),
        ] {
            if let Some(x) = v
                && !(x.is_finite() && x >= 0.0)
            {
                anyhow::bail!("{name} must be a finite number >= 0, not {x}");
            }
        }
        m.w_prefill = self.w_prefill.unwrap_or(m.w_prefill);
        m.w_queue = self.w_queue.unwrap_or(m.w_queue);
        m.w_transfer = self.w_transfer.unwrap_or(m.w_transfer);
        m.local_prefill_max_tokens = self
            .local_prefill_max_tokens
            .unwrap_or(m.local_prefill_max_tokens);
        let temperature = match m.spread {
            Spread::Softmax { temperature_s } => temperature_s,
            _ => CostModel::default_temperature(m.prefill_s_per_token, 16),
        };
        m.spread = match (self.spread, m.spread) {
            (Some(SpreadKind::PowerOfTwo), _) => Spread::PowerOfTwo,
            (Some(SpreadKind::Argmin), _) => Spread::Argmin,
            (Some(SpreadKind::Softmax), _) | (None, Spread::Softmax { .. }) => Spread::Softmax {
                temperature_s: self.route_temperature_s.unwrap_or(temperature),
            },
            (None, s) => s,
        };
        Ok(m)
    }
}

pub struct Loaded<B: Backend = CpuBackend> {
    pub engine: Engine<B>,
    pub tokenizer: Tokenizer,
    pub weight_bytes: u64,
    /// Weight bytes one batch-1 decode step must read: every matrix, the embeddings only when they double as the
    /// output head (otherwise a token reads just its own embedding row).
    pub decode_floor_bytes: u64,
}

/// Opens the model, builds its tokenizer and a CPU engine, with a progress bar over the layers.
pub fn load(args: &ModelArgs, threads: usize) -> Result<Loaded> {
    load_on(args, CpuBackend::new(threads))
}

/// Where a serving command computes: `--device cpu|cuda|auto`.
#[derive(clap::Args, Debug, Clone)]
pub struct DeviceArgs {
    /// cpu, cuda (fails clearly without a usable GPU) or auto (the GPU when there is one, else the CPU, said in a
    /// log line).
    #[arg(long, value_enum, default_value_t = DeviceKind::Auto)]
    pub device: DeviceKind,
    /// Which GPU, with --device cuda or auto.
    #[arg(long, default_value_t = 0)]
    pub gpu: usize,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    Cpu,
    Cuda,
    Auto,
}

/// The backend a command runs on.
pub enum Chosen {
    Cpu(CpuBackend),
    Cuda(Box<tandem_engine::backend::cuda::CudaBackend>),
}

impl DeviceArgs {
    pub fn backend(&self, threads: usize) -> Result<Chosen> {
        use tandem_engine::backend::cuda::{CudaBackend, driver_present};
        match self.device {
            DeviceKind::Cpu => Ok(Chosen::Cpu(CpuBackend::new(threads))),
            DeviceKind::Cuda => Ok(Chosen::Cuda(Box::new(
                CudaBackend::new(self.gpu).context("--device cuda")?,
            ))),
            DeviceKind::Auto if driver_present() => match CudaBackend::new(self.gpu) {
                Ok(b) => {
                    tracing::info!(gpu = %b.device_name(), "--device auto: using the GPU");
                    Ok(Chosen::Cuda(Box::new(b)))
                }
                Err(e) => {
                    tracing::warn!("--device auto: no usable GPU ({e}); using the CPU");
                    Ok(Chosen::Cpu(CpuBackend::new(threads)))
                }
            },
            DeviceKind::Auto => {
                tracing::info!("--device auto: no CUDA driver on this machine; using the CPU");
                Ok(Chosen::Cpu(CpuBackend::new(threads)))
            }
        }
    }
}

/// Runs `$body` with `$loaded` bound to the model loaded on the chosen backend (one copy per backend type).
#[macro_export]
macro_rules! on_device {
    ($device:expr, $threads:expr, $model:expr, |$loaded:ident| $body:expr) => {
        match $device.backend($threads)? {
            $crate::cmd::Chosen::Cpu(b) => {
                let $loaded = $crate::cmd::load_on($model, b)?;
                $body
            }
            $crate::cmd::Chosen::Cuda(b) => {
                let $loaded = $crate::cmd::load_on($model, *b)?;
                $body
            }
        }
    };
}

/// Opens the model, builds its tokenizer and an engine on `backend`, with a progress bar over the layers.
pub fn load_on<B: Backend>(args: &ModelArgs, backend: B) -> Result<Loaded<B>> {
    let path = &args.model;
    if !path.exists() {
        anyhow::bail!(
            "model {} not found (run scripts/fetch-model.sh to download the default model, or pass --model PATH)",
            path.display()
        );
    }
    let src = ModelSource::open(path).with_context(|| format!("loading {}", path.display()))?;
    let tokenizer =
        Tokenizer::for_model(&src).with_context(|| format!("tokenizer of {}", path.display()))?;
    let cfg = src.config()?;
    let config = EngineConfig {
        block_size: args.block_size,
        kv_format: args.kv_format,
        max_batch_tokens: args.max_batch_tokens,
        ..Default::default()
    }
    .with_kv_budget_bytes(&cfg, (args.kv_cache_mib as usize) << 20);
    let pb = crate::progress::bar(cfg.layers as u64, "loading");
    let engine = Engine::new(backend, &src, config, |done, _| {
        pb.set_position(done as u64)
    })?;
    pb.finish_and_clear();
    tracing::info!(
        layers = cfg.layers,
        hidden = cfg.hidden,
        vocab = cfg.vocab,
        "model loaded"
    );
    let weight_bytes = src.weight_bytes();
    let separate_head = src.tensor("output.weight")?.is_some();
    let embed_bytes = src
        .tensor("token_embd.weight")?
        .map_or(0, |t| t.bytes.len() as u64);
    let decode_floor_bytes = if separate_head {
        weight_bytes - embed_bytes
    } else {
        weight_bytes
    };
    Ok(Loaded {
        engine,
        tokenizer,
        weight_bytes,
        decode_floor_bytes,
    })
}
