//! The decode worker: admits tokenized requests, gets their KV (own prefix cache, a prefill worker, or local
//! prefill), and generates in continuous batches, streaming tokens as they are made.
//!
//! [`run`] serves `DecodeWorker` and the `KvTransfer` receiver on one listener (plus health and reflection) until
//! `shutdown` resolves. The engine belongs to the [`scheduler`] thread; the gRPC side ([`service`]) only talks to
//! it through commands. See DESIGN.md, steps 4-7 of the request flow.

pub mod error;
pub mod scheduler;
pub mod service;

pub use error::DecodeError;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tandem_engine::Engine;
use tandem_engine::backend::Backend;
use tandem_engine::kv::KvFormat;
use tandem_engine::kv::codec::Codec;
use tandem_engine::tokenizer::Tokenizer;
use tandem_kv_transfer::link::{LinkListener, Links};
use tandem_kv_transfer::{ChunkLayout, KvTransferService, Sessions};
use tandem_prefill_node::runtime::{self, EventHub, ServeError};
use tandem_proto::v1;
use tokio::net::TcpListener;

/// Decode worker options.
#[derive(Debug, Clone)]
pub struct DecodeConfig {
    /// Uncached prompt tokens below this are prefilled here even when a prefill worker is named.
    pub local_prefill_threshold_tokens: usize,
    /// Prefill locally when the named prefill worker cannot be reached (otherwise the request fails).
    pub fallback_to_local_prefill: bool,
    /// Deadline for a remote prefill and its KV transfer.
    pub transfer_timeout: Duration,
    /// The address prefill workers push KV to (default: `http://` + the listener's address).
    pub advertise_endpoint: Option<String>,
    /// KV codec for transfers of requests that name none.
    pub kv_codec: Codec,
    /// Accept KV payloads from prefill workers on this host over a Unix socket link beside gRPC
    /// (docs/kv-links.md).
    pub kv_link: bool,
}

impl Default for DecodeConfig {
    fn default() -> Self {
        Self {
            local_prefill_threshold_tokens: 32,
            fallback_to_local_prefill: true,
            transfer_timeout: Duration::from_secs(30),
            advertise_endpoint: None,
            kv_codec: Codec::None,
            kv_link: true,
        }
    }
}

/// Serves a decode worker on `listener` with `engine` until `shutdown` resolves.
pub async fn run<B: Backend>(
    listener: TcpListener,
    config: DecodeConfig,
    engine: Engine<B>,
    tokenizer: Arc<Tokenizer>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError>
where
    Engine<B>: Send,
{
    let endpoint = match &config.advertise_endpoint {
        Some(e) => e.clone(),
        None => format!("http://{}", listener.local_addr()?),
    };
    let sessions = Sessions::new(
        ChunkLayout::of(engine.kv_layout(), engine.key_rotation()),
        engine.kv_layout().layers,
    );
    // Owned here, so the socket file goes when the worker stops.
    let mut links = Links::default();
    // Device links move the cache's own blocks; a kivi2 cache's cannot be staged.
    if let Some(d) = engine
        .device_links()
        .filter(|_| config.kv_link && engine.kv_layout().format != KvFormat::Kivi2)
    {
        links = links.with_devices(d, engine.kv_layout().staging_id());
    }
    let link = if config.kv_link {
        LinkListener::bind_temp(links.clone())
            .map_err(|e| tracing::warn!("no kv link socket, KV over gRPC only: {e}"))
            .ok()
    } else {
        None
    };
    let offer = link.as_ref().and_then(LinkListener::offer);
    let hub = EventHub::new();
    let (sched, thread) = scheduler::spawn(
        engine,
        tokenizer.clone(),
        hub.clone(),
        scheduler::SchedulerConfig {
            local_prefill_threshold_tokens: config.local_prefill_threshold_tokens,
        },
    )?;
    let service = service::DecodeService::new(
        sched,
        tokenizer,
        sessions.clone(),
        hub,
        config,
        endpoint,
        offer,
    );
    let mut routes = tonic::service::RoutesBuilder::default();
    routes
        .add_service(v1::decode_worker_server::DecodeWorkerServer::new(service))
        .add_service(KvTransferService::new(sessions, links).into_server());
    let served = runtime::serve_grpc(
        listener,
        routes,
        &["tandem.v1.DecodeWorker", "tandem.v1.KvTransfer"],
        shutdown,
    )
    .await;
    // Stop the scheduler (it finishes its current step) without blocking the async runtime.
    let _ = tokio::task::spawn_blocking(move || drop(thread)).await;
    drop(link);
    served?;
    Ok(())
}
