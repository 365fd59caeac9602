//! The router: the cluster's front door.
//!
//! [`run`] serves the OpenAI-compatible HTTP API ([`openai`]) and the client gRPC API ([`grpc`]) over one core
//! ([`frontend::Frontend`]): template and tokenize, check against the model, pick workers ([`workers`]), relay the
//! decode worker's stream. Workers join and leave through [`discovery`] (a static list or etcd). A poller asks
//! every worker for its load report, marking unreachable ones unhealthy; `/ready` turns true once there is a
//! decode worker and every worker answered. One task per worker keeps the prefix index ([`index`]) in step with
//! its KV events ([`sync`]); the policy ([`policy`]) reads index and loads.

pub mod admission;
pub mod breaker;
pub mod discovery;
pub mod error;
pub mod frontend;
pub mod grpc;
pub mod index;
pub mod mock;
pub mod openai;
pub mod policy;
pub mod sync;
pub mod workers;

pub use discovery::Discovery;
pub use error::RouterError;
pub use frontend::{Frontend, KvDims, KvTransfer, ModelInfo};
pub use workers::{BlockNaming, WorkerEndpoint, Workers};

use axum::serve::ListenerExt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tandem_engine::tokenizer::Tokenizer;
use tandem_prefill_node::runtime;
use tandem_proto::v1;
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use policy::{CostModel, Policy, PolicyKind};

/// Router options.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    /// Where the workers come from.
    pub discovery: Discovery,
    pub model: ModelInfo,
    /// How often workers are asked for their load (and health).
    pub poll_interval: Duration,
    /// KV codec and eviction between prefill and decode workers for requests that name none; an unset codec leaves
    /// the choice to each decode worker's own default, an unset eviction keeps every token.
    pub kv: KvTransfer,
    pub routing: Routing,
    pub admission: admission::AdmissionConfig,
}

/// How requests are placed.
#[derive(Debug, Clone, Copy)]
pub struct Routing {
    pub policy: PolicyKind,
    pub cost: CostModel,
    /// Block size and hash seed; workers announcing others are refused.
    pub naming: BlockNaming,
    /// Seed of the policy's random spread.
    pub seed: u64,
}

impl Default for Routing {
    fn default() -> Self {
        Self {
            policy: PolicyKind::Cost,
            cost: CostModel::default(),
            naming: BlockNaming::default(),
            seed: 0x5eed,
        }
    }
}

/// Why the router could not serve.
#[derive(Debug, thiserror::Error)]
pub enum RouterServeError {
    #[error("router config: {0}")]
    Config(String),
    #[error("HTTP server: {0}")]
    Http(#[from] std::io::Error),
    #[error("gRPC server: {0}")]
    Grpc(#[from] tonic::transport::Error),
}

/// Serves HTTP on `http` and the gRPC client API on `grpc` until `shutdown` resolves; in-flight requests finish.
pub async fn run(
    http: TcpListener,
    grpc: TcpListener,
    config: RouterConfig,
    tokenizer: Arc<Tokenizer>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RouterServeError> {
    if let Discovery::Static { prefill, decode } = &config.discovery {
        if decode.is_empty() {
            return Err(RouterServeError::Config(
                "at least one decode worker is needed".into(),
            ));
        }
        if let Some(bad) = prefill
            .iter()
            .chain(decode)
            .find(|e| tonic::transport::Endpoint::from_shared(e.0.clone()).is_err())
        {
            return Err(RouterServeError::Config(format!(
                "worker endpoint {bad} is not a valid URL"
            )));
        }
    }
    let r = config.routing;
    let workers = Arc::new(Workers::new(r.naming));
    let frontend = Arc::new(Frontend::new(
        tokenizer,
        config.model.clone(),
        workers,
        Policy::new(r.policy, r.cost, r.seed),
        admission::Admission::new(config.admission),
        config.kv,
    ));
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    // TCP_NODELAY on every accepted connection: an SSE event is one small write that must leave at once.
    let http = http.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::warn!("cannot set TCP_NODELAY on an HTTP connection: {e}");
        }
    });
    let http_server = axum::serve(http, openai::routes(frontend.clone()))
        .with_graceful_shutdown(stopped(stop_rx.clone()));
    let mut routes = tonic::service::RoutesBuilder::default();
    routes.add_service(v1::generation_server::GenerationServer::new(
        grpc::GenerationService::new(frontend.clone()),
    ));
    let grpc_server = runtime::serve_grpc(
        grpc,
        routes,
        &["tandem.v1.Generation"],
        stopped(stop_rx.clone()),
    );
    let poller = {
        let f = frontend.clone();
        let mut rx = stop_rx.clone();
        async move {
            loop {
                f.workers.poll_once(Duration::from_secs(2)).await;
                tokio::select! {
                    _ = rx.wait_for(|s| *s) => return,
                    _ = tokio::time::sleep(config.poll_interval) => {}
                }
            }
        }
    };
    // Membership: each worker that joins gets a task keeping its prefix-index entries (only the policies that read
    // the index need it, but it is cheap).
    let members = discovery::Membership {
        workers: frontend.workers.clone(),
        index: frontend.index.clone(),
        stop: stop_rx.clone(),
    };
    // A static pool is complete before the first request or readiness probe can see it.
    if let Discovery::Static { prefill, decode } = &config.discovery {
        for e in decode {
            members.add(e, workers::WorkerRole::Decode);
        }
        for e in prefill {
            members.add(e, workers::WorkerRole::Prefill);
        }
    }
    let (discovery, model_id) = (config.discovery.clone(), config.model.id.clone());
    let membership = async move {
        if let Discovery::Etcd(etcd) = discovery {
            discovery::etcd::watch(etcd, members, model_id, r.naming).await
        }
    };
    // Drain: refuse new requests at once, let open streams finish up to the deadline, then stop the servers (a
    // stream still open then is cut, which cancels its work on the workers).
    let drain = config.admission.drain_timeout;
    let draining = frontend.clone();
    let signal = async move {
        shutdown.await;
        draining.admission.close();
        let until = tokio::time::Instant::now() + drain;
        while draining.admission.inflight() > 0 && tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if draining.admission.inflight() > 0 {
            tracing::warn!(
                open = draining.admission.inflight(),
                "drain deadline passed; cutting the streams still open"
            );
            draining.admission.cut_open_streams();
        }
        let _ = stop_tx.send(true);
    };
    // Both servers' graceful shutdown waits for open responses; past the drain they are dropped.
    let cut = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let (cut_http, cut_grpc) = (cut(stop_rx.clone()), cut(stop_rx.clone()));
    let http_server = async move {
        tokio::select! {
            r = http_server => r,
            _ = cut_http => Ok(()),
        }
    };
    let grpc_server = async move {
        tokio::select! {
            r = grpc_server => r,
            _ = cut_grpc => Ok(()),
        }
    };
    let (h, g, (), (), ()) = tokio::join!(http_server, grpc_server, poller, signal, membership);
    h?;
    g?;
    Ok(())
}
