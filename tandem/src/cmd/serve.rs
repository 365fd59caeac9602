//! The server subcommands: `tandem prefill`, `tandem decode`, `tandem router` (one node per process) and what they
//! share: the async runtime, binding listeners with a clear error, and the shutdown signal (Ctrl-C or SIGTERM).

use super::{DeviceArgs, Loaded, ModelArgs};
use anyhow::{Context, Result};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tandem_decode_node::DecodeConfig;
use tandem_engine::Engine;
use tandem_engine::backend::Backend;
use tandem_engine::kv::codec::Codec;
use tandem_engine::kv::evict::Eviction;
use tandem_engine::model::ModelSource;
use tandem_engine::tokenizer::Tokenizer;
use tandem_prefill_node::PrefillConfig;
use tandem_router::workers::WorkerRole;
use tandem_router::{KvTransfer, ModelInfo, RouterConfig, WorkerEndpoint};
use tokio::net::TcpListener;
use tokio::sync::watch;

#[derive(clap::Args, Debug)]
pub struct PrefillArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Address to serve gRPC on.
    #[arg(long, default_value = "127.0.0.1:7100")]
    pub listen: SocketAddr,
    /// Deadline for prefill + KV transfer when a request gives none, in milliseconds.
    #[arg(long, default_value_t = 60_000)]
    pub default_deadline_ms: u64,
    /// Compress each KV chunk after its codec with the lossless stage (rANS over byte classes and key channels, or
    /// LZ4, whichever is smaller), where that makes it smaller; costs CPU on both ends (see bench/RESULTS.md).
    #[arg(long)]
    pub kv_lossless: bool,
    /// Send KV over gRPC only, never over the Unix socket link a decode worker on this host offers
    /// (docs/kv-links.md).
    #[arg(long)]
    pub no_kv_link: bool,
    #[command(flatten)]
    pub worker: WorkerArgs,
}

/// What every worker takes: where it is reached, how it joins and leaves the cluster, where it computes.
#[derive(clap::Args, Debug)]
pub struct WorkerArgs {
    /// The URL routers (and prefill workers, for a decode worker) reach this worker at (default: http:// + the
    /// listen address).
    #[arg(long)]
    pub advertise: Option<String>,
    #[command(flatten)]
    pub register: super::membership::RegisterArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
}

impl WorkerArgs {
    /// The URL this worker announces, given the listener it serves on.
    fn endpoint(&self, listener: &TcpListener) -> Result<String> {
        Ok(match &self.advertise {
            Some(url) => url.clone(),
            None => format!("http://{}", listener.local_addr()?),
        })
    }

    /// Runs `server` until the stop signal and its drain deadline, then waits for the etcd lease's revocation.
    async fn lifetime<E>(
        &self,
        server: impl std::future::Future<Output = Result<(), E>>,
        stop: watch::Receiver<bool>,
        registration: Option<tokio::task::JoinHandle<()>>,
    ) -> Result<(), E> {
        drained(
            server,
            stop,
            Duration::from_secs(self.register.drain_timeout_s),
        )
        .await?;
        deregistered(registration).await;
        Ok(())
    }
}

#[derive(clap::Args, Debug, Clone)]
pub struct DecodeOptions {
    /// Uncached prompt tokens below this are prefilled on the decode worker itself.
    #[arg(long, default_value_t = 32)]
    pub local_prefill_threshold_tokens: usize,
    /// Fail requests whose prefill worker is unreachable instead of prefilling them locally.
    #[arg(long)]
    pub no_local_fallback: bool,
    /// Deadline for a remote prefill and its KV transfer, in milliseconds (1 to 4294967295: it travels to the
    /// prefill worker as a 32-bit field).
    #[arg(long, default_value_t = 30_000, value_parser = clap::value_parser!(u64).range(1..=u64::from(u32::MAX)))]
    pub transfer_timeout_ms: u64,
    /// KV codec between prefill and decode worker for requests that name none: none, fp8, int8, int4 or kivi2.
    #[arg(long, default_value = "none", value_parser = super::parse_codec)]
    pub kv_codec: Codec,
    /// Take KV over gRPC only: offer prefill workers on this host no Unix socket link to send payloads on
    /// (docs/kv-links.md). In `tandem up`, prefill workers then send none either.
    #[arg(long)]
    pub no_kv_link: bool,
}

impl DecodeOptions {
    pub fn config(&self, advertise: Option<String>) -> DecodeConfig {
        DecodeConfig {
            local_prefill_threshold_tokens: self.local_prefill_threshold_tokens,
            fallback_to_local_prefill: !self.no_local_fallback,
            transfer_timeout: Duration::from_millis(self.transfer_timeout_ms),
            advertise_endpoint: advertise,
            kv_codec: self.kv_codec,
            kv_link: !self.no_kv_link,
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct DecodeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub options: DecodeOptions,
    /// Address to serve gRPC (DecodeWorker and KvTransfer) on.
    #[arg(long, default_value = "127.0.0.1:7200")]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub worker: WorkerArgs,
}

#[derive(clap::Args, Debug)]
pub struct RouterArgs {
    /// Model file or directory (the router needs its tokenizer, chat template and context length).
    #[arg(long, env = "TANDEM_MODEL", default_value_os_t = super::default_model_path())]
    pub model: std::path::PathBuf,
    /// The id clients use in `model` (default: the model file's name without extension).
    #[arg(long)]
    pub model_id: Option<String>,
    /// Address for the OpenAI-compatible HTTP API.
    #[arg(long, default_value = "127.0.0.1:8000")]
    pub http: SocketAddr,
    /// Address for the gRPC client API.
    #[arg(long, default_value = "127.0.0.1:8001")]
    pub grpc: SocketAddr,
    #[command(flatten)]
    pub discovery: super::membership::DiscoveryArgs,
    /// How often workers are asked for their load, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub poll_interval_ms: u64,
    /// KV codec between prefill and decode worker for requests that name none: none, fp8, int8, int4 or kivi2
    /// (default: each decode worker's --kv-codec).
    #[arg(long, value_parser = super::parse_codec)]
    pub kv_codec: Option<Codec>,
    /// Token eviction before the transfer for requests that name none, as policy:budget (streaming, snapkv, h2o or
    /// block; a token count or a fraction, e.g. snapkv:0.5). Default: keep every token.
    #[arg(long, value_parser = super::parse_eviction)]
    pub kv_eviction: Option<Eviction>,
    /// Tokens per KV block, as every worker must use (workers announcing another size are refused).
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
    #[command(flatten)]
    pub routing: super::RoutingArgs,
    #[command(flatten)]
    pub admission: super::AdmissionArgs,
}

/// A multi-threaded runtime for the async side (the engines run on their own threads).
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("tandem-io")
        .enable_all()
        .build()
        .context("starting the async runtime")
}

pub async fn bind(addr: SocketAddr, what: &str) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} for {what}"))
}

/// Resolves on Ctrl-C or SIGTERM; every clone of the receiver sees it.
pub fn shutdown_signal() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("installing a SIGTERM handler");
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("shutting down");
        let _ = tx.send(true);
    });
    rx
}

pub async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// Tokenizer and model facts the router needs, without loading weights.
pub fn router_model(
    path: &std::path::Path,
    id: Option<String>,
) -> Result<(Arc<Tokenizer>, ModelInfo)> {
    if !path.exists() {
        anyhow::bail!(
            "model {} not found (run scripts/fetch-model.sh, or pass --model PATH)",
            path.display()
        );
    }
    let src = ModelSource::open(path).with_context(|| format!("loading {}", path.display()))?;
    let tok =
        Tokenizer::for_model(&src).with_context(|| format!("tokenizer of {}", path.display()))?;
    let cfg = src.config()?;
    let id = id.unwrap_or_else(|| model_id_of(path));
    Ok((
        Arc::new(tok),
        ModelInfo {
            id,
            context_len: cfg.context_len,
            kv_dims: Some(tandem_router::KvDims {
                layers: cfg.layers,
                kv_heads: cfg.kv_heads,
                head_dim: cfg.head_dim,
            }),
        },
    ))
}

/// The model id a model file is served under by default: its name without extension.
pub fn model_id_of(path: &std::path::Path) -> String {
    path.file_stem()
        .map_or_else(|| "model".to_string(), |s| s.to_string_lossy().into_owned())
}

/// Runs a worker's server until the stop signal, then gives its open calls up to `drain` to finish before cutting
/// them.
async fn drained<E>(
    server: impl std::future::Future<Output = Result<(), E>>,
    stop: watch::Receiver<bool>,
    drain: Duration,
) -> Result<(), E> {
    let deadline = async move {
        stopped(stop).await;
        tokio::time::sleep(drain).await;
    };
    tokio::select! {
        r = server => r,
        () = deadline => {
            tracing::warn!("drain deadline ({} s) passed; cutting the calls still open", drain.as_secs());
            Ok(())
        }
    }
}

/// Waits (briefly) for a worker's etcd registration task to revoke its lease after the stop signal.
async fn deregistered(task: Option<tokio::task::JoinHandle<()>>) {
    if let Some(t) = task {
        let _ = tokio::time::timeout(Duration::from_secs(3), t).await;
    }
}

pub fn endpoints(urls: &[String]) -> Vec<WorkerEndpoint> {
    urls.iter().map(|u| WorkerEndpoint(u.clone())).collect()
}

pub fn run_prefill(a: PrefillArgs, threads: usize) -> Result<()> {
    crate::on_device!(a.worker.device, threads, &a.model, |loaded| prefill_on(
        &a, loaded
    ))
}

fn prefill_on<B: Backend>(a: &PrefillArgs, loaded: Loaded<B>) -> Result<()>
where
    Engine<B>: Send,
{
    runtime()?.block_on(async {
        let listener = bind(a.listen, "the prefill worker").await?;
        let endpoint = a.worker.endpoint(&listener)?;
        eprintln!("prefill worker serving on {endpoint}");
        let config = PrefillConfig {
            default_deadline: Duration::from_millis(a.default_deadline_ms),
            kv_lossless: a.kv_lossless,
            kv_link: !a.no_kv_link,
        };
        let stop = shutdown_signal();
        let registration = a.worker.register.spawn(
            WorkerRole::Prefill,
            endpoint,
            None,
            &a.model.model,
            &loaded.engine,
            stop.clone(),
        )?;
        let server =
            tandem_prefill_node::run(listener, config, loaded.engine, stopped(stop.clone()));
        a.worker.lifetime(server, stop, registration).await?;
        Ok(())
    })
}

pub fn run_decode(a: DecodeArgs, threads: usize) -> Result<()> {
    crate::on_device!(a.worker.device, threads, &a.model, |loaded| decode_on(
        &a, loaded
    ))
}

fn decode_on<B: Backend>(a: &DecodeArgs, loaded: Loaded<B>) -> Result<()>
where
    Engine<B>: Send,
{
    runtime()?.block_on(async {
        let listener = bind(a.listen, "the decode worker").await?;
        let endpoint = a.worker.endpoint(&listener)?;
        eprintln!("decode worker serving on {endpoint}");
        let stop = shutdown_signal();
        let registration = a.worker.register.spawn(
            WorkerRole::Decode,
            endpoint.clone(),
            Some(endpoint),
            &a.model.model,
            &loaded.engine,
            stop.clone(),
        )?;
        let server = tandem_decode_node::run(
            listener,
            a.options.config(a.worker.advertise.clone()),
            loaded.engine,
            Arc::new(loaded.tokenizer),
            stopped(stop.clone()),
        );
        a.worker.lifetime(server, stop, registration).await?;
        Ok(())
    })
}

pub fn run_router(a: RouterArgs) -> Result<()> {
    let discovery = a.discovery.discovery()?;
    let (tok, model) = router_model(&a.model, a.model_id.clone())?;
    runtime()?.block_on(async {
        let http = bind(a.http, "the router's HTTP API").await?;
        let grpc = bind(a.grpc, "the router's gRPC API").await?;
        eprintln!("router gRPC API on http://{}", grpc.local_addr()?);
        println!("http://{}", http.local_addr()?);
        let config = RouterConfig {
            discovery,
            model,
            poll_interval: Duration::from_millis(a.poll_interval_ms.max(10)),
            kv: KvTransfer {
                codec: a.kv_codec,
                eviction: a.kv_eviction,
            },
            routing: a.routing.routing(a.block_size)?,
            admission: a.admission.config()?,
        };
        tandem_router::run(http, grpc, config, tok, stopped(shutdown_signal())).await?;
        Ok(())
    })
}
