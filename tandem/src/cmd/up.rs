//! `tandem up`: the embedded default. A router, N prefill and M decode workers in one process, each on its own
//! loopback port, talking gRPC over real sockets exactly as separate processes would. Prints the router's HTTP
//! address on stdout once every node is listening and every engine is loaded; Ctrl-C stops them all cleanly.
//! [`LocalCluster`] is the same thing as a value, for `tandem bench serve`.

use super::serve::{
    DecodeOptions, bind, endpoints, router_model, runtime, shutdown_signal, stopped,
};
use super::{ModelArgs, load};
use anyhow::Result;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tandem_prefill_node::PrefillConfig;
use tandem_router::RouterConfig;
use tokio::sync::watch;
use tokio::task::JoinSet;

#[derive(clap::Args, Debug, Clone)]
pub struct ClusterArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub decode_options: DecodeOptions,
    /// Prefill workers to start.
    #[arg(long, default_value_t = 1)]
    pub prefill: usize,
    /// Decode workers to start.
    #[arg(long, default_value_t = 1)]
    pub decode: usize,
    /// No prefill workers: decode workers prefill locally (the baseline disaggregation is measured against).
    #[arg(long)]
    pub colocated: bool,
    /// The id clients use in `model` (default: the model file's name without extension).
    #[arg(long)]
    pub model_id: Option<String>,
    /// Compress each KV chunk after its codec with the lossless stage (rANS over byte classes and key channels, or
    /// LZ4, whichever is smaller), where that makes it smaller; costs CPU on both ends (see bench/RESULTS.md).
    #[arg(long)]
    pub kv_lossless: bool,
    /// Token eviction before each KV transfer, as policy:budget (streaming, snapkv, h2o or block; a token count or
    /// a fraction, e.g. snapkv:0.5), for requests that name none. Default: keep every token.
    #[arg(long, value_parser = super::parse_eviction)]
    pub kv_eviction: Option<tandem_engine::kv::evict::Eviction>,
    #[command(flatten)]
    pub routing: super::RoutingArgs,
    #[command(flatten)]
    pub admission: super::AdmissionArgs,
}

#[derive(clap::Args, Debug)]
pub struct UpArgs {
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Address for the router's OpenAI-compatible HTTP API.
    #[arg(long, default_value = "127.0.0.1:8000")]
    pub http: SocketAddr,
    /// Address for the router's gRPC client API (port 0 = any free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub grpc: SocketAddr,
}

/// A running local cluster.
pub struct LocalCluster {
    pub http: SocketAddr,
    pub grpc: SocketAddr,
    pub prefill_urls: Vec<String>,
    pub decode_urls: Vec<String>,
    nodes: JoinSet<Result<()>>,
}

impl LocalCluster {
    /// Loads every engine, binds every listener and starts every node; `stop` ends them.
    pub async fn start(
        a: &ClusterArgs,
        http: SocketAddr,
        grpc: SocketAddr,
        threads: usize,
        stop: watch::Receiver<bool>,
    ) -> Result<Self> {
        let n_prefill = if a.colocated { 0 } else { a.prefill };
        if a.decode == 0 {
            anyhow::bail!("--decode must be at least 1");
        }
        let (tok, model) = router_model(&a.model.model, a.model_id.clone())?;
        let http = bind(http, "the router's HTTP API").await?;
        let grpc = bind(grpc, "the router's gRPC API").await?;
        let (http_addr, grpc_addr) = (http.local_addr()?, grpc.local_addr()?);
        let loopback: SocketAddr = "127.0.0.1:0".parse().expect("valid address");
        let mut nodes = JoinSet::new();
        let mut prefill_urls = Vec::new();
        for i in 0..n_prefill {
            eprintln!("loading prefill worker {}/{n_prefill}", i + 1);
            let engine = load(&a.model, threads)?.engine;
            let prefill_config = PrefillConfig {
                kv_lossless: a.kv_lossless,
                kv_link: !a.decode_options.no_kv_link,
                ..PrefillConfig::default()
            };
            let l = bind(loopback, "a prefill worker").await?;
            prefill_urls.push(format!("http://{}", l.local_addr()?));
            let s = stopped(stop.clone());
            nodes.spawn(async move {
                tandem_prefill_node::run(l, prefill_config, engine, s)
                    .await
                    .map_err(anyhow::Error::from)
            });
        }
        let mut decode_urls = Vec::new();
        for i in 0..a.decode {
            eprintln!("loading decode worker {}/{}", i + 1, a.decode);
            let loaded = load(&a.model, threads)?;
            let l = bind(loopback, "a decode worker").await?;
            decode_urls.push(format!("http://{}", l.local_addr()?));
            let s = stopped(stop.clone());
            let config = a.decode_options.config(None);
            let tok = Arc::new(loaded.tokenizer);
            nodes.spawn(async move {
                tandem_decode_node::run(l, config, loaded.engine, tok, s)
                    .await
                    .map_err(anyhow::Error::from)
            });
        }
        let config = RouterConfig {
            discovery: tandem_router::Discovery::Static {
                prefill: endpoints(&prefill_urls),
                decode: endpoints(&decode_urls),
            },
            model,
            poll_interval: Duration::from_secs(1),
            kv: tandem_router::KvTransfer {
                codec: None,
                eviction: a.kv_eviction,
            },
            routing: a.routing.routing(a.model.block_size)?,
            admission: a.admission.config()?,
        };
        let s = stopped(stop.clone());
        nodes.spawn(async move {
            tandem_router::run(http, grpc, config, tok, s)
                .await
                .map_err(anyhow::Error::from)
        });
        Ok(Self {
            http: http_addr,
            grpc: grpc_addr,
            prefill_urls,
            decode_urls,
            nodes,
        })
    }

    /// Waits for every node to end; the first failure stops the rest and is returned.
    pub async fn join(mut self) -> Result<()> {
        while let Some(r) = self.nodes.join_next().await {
            match r {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    self.nodes.abort_all();
                    return Err(e);
                }
                Err(e) if e.is_cancelled() => {}
                Err(e) => return Err(anyhow::anyhow!("a node task failed: {e}")),
            }
        }
        Ok(())
    }
}

pub fn run(a: UpArgs, threads: usize) -> Result<()> {
    runtime()?.block_on(async move {
        let stop = shutdown_signal();
        let c = LocalCluster::start(&a.cluster, a.http, a.grpc, threads, stop).await?;
        eprintln!(
            "prefill workers: {}; decode workers: {}; router gRPC: http://{}",
            if c.prefill_urls.is_empty() {
                "none (colocated)".to_string()
            } else {
                c.prefill_urls.join(" ")
            },
            c.decode_urls.join(" "),
            c.grpc
        );
        println!("http://{}", c.http);
        c.join().await
    })
}
