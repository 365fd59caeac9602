//! `tandem up`: the embedded default. A router, N prefill and M decode workers in one process, each on its own
//! loopback port, talking gRPC over real sockets exactly as separate processes would. Prints the router's HTTP
//! address on stdout once every node is listening and every engine is loaded; Ctrl-C stops them all cleanly.

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

#[derive(clap::Args, Debug)]
pub struct UpArgs {
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
    /// Address for the router's OpenAI-compatible HTTP API.
    #[arg(long, default_value = "127.0.0.1:8000")]
    pub http: SocketAddr,
    /// Address for the router's gRPC client API (port 0 = any free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub grpc: SocketAddr,
    /// The id clients use in `model` (default: the model file's name without extension).
    #[arg(long)]
    pub model_id: Option<String>,
}

pub fn run(a: UpArgs, threads: usize) -> Result<()> {
    let n_prefill = if a.colocated { 0 } else { a.prefill };
    if a.decode == 0 {
        anyhow::bail!("--decode must be at least 1");
    }
    let (tok, model) = router_model(&a.model.model, a.model_id.clone())?;
    let mut prefill_engines = Vec::new();
    for i in 0..n_prefill {
        eprintln!("loading prefill worker {}/{n_prefill}", i + 1);
        prefill_engines.push(load(&a.model, threads)?.engine);
    }
    let mut decode_engines = Vec::new();
    for i in 0..a.decode {
        eprintln!("loading decode worker {}/{}", i + 1, a.decode);
        let l = load(&a.model, threads)?;
        decode_engines.push((l.engine, Arc::new(l.tokenizer)));
    }
    runtime()?.block_on(async move {
        let http = bind(a.http, "the router's HTTP API").await?;
        let grpc = bind(a.grpc, "the router's gRPC API").await?;
        let http_addr = http.local_addr()?;
        let loopback: SocketAddr = "127.0.0.1:0".parse().expect("valid address");
        let stop = shutdown_signal();
        let mut nodes = tokio::task::JoinSet::new();
        let mut prefill_urls = Vec::new();
        for engine in prefill_engines {
            let l = bind(loopback, "a prefill worker").await?;
            prefill_urls.push(format!("http://{}", l.local_addr()?));
            let s = stopped(stop.clone());
            nodes.spawn(async move {
                tandem_prefill_node::run(l, PrefillConfig::default(), engine, s)
                    .await
                    .map_err(anyhow::Error::from)
            });
        }
        let mut decode_urls = Vec::new();
        for (engine, tok) in decode_engines {
            let l = bind(loopback, "a decode worker").await?;
            decode_urls.push(format!("http://{}", l.local_addr()?));
            let s = stopped(stop.clone());
            let config = a.decode_options.config(None);
            nodes.spawn(async move {
                tandem_decode_node::run(l, config, engine, tok, s)
                    .await
                    .map_err(anyhow::Error::from)
            });
        }
        let config = RouterConfig {
            prefill: endpoints(&prefill_urls),
            decode: endpoints(&decode_urls),
            model,
            poll_interval: Duration::from_secs(1),
        };
        eprintln!(
            "prefill workers: {}; decode workers: {}; router gRPC: http://{}",
            if prefill_urls.is_empty() {
                "none (colocated)".to_string()
            } else {
                prefill_urls.join(" ")
            },
            decode_urls.join(" "),
            grpc.local_addr()?
        );
        let s = stopped(stop.clone());
        nodes.spawn(async move {
            tandem_router::run(http, grpc, config, tok, s)
                .await
                .map_err(anyhow::Error::from)
        });
        println!("http://{http_addr}");
        // The first node to fail stops the rest; on Ctrl-C all end by themselves.
        while let Some(r) = nodes.join_next().await {
            match r {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    nodes.abort_all();
                    return Err(e);
                }
                Err(e) if e.is_cancelled() => {}
                Err(e) => return Err(anyhow::anyhow!("a node task failed: {e}")),
            }
        }
        Ok(())
    })
}
