//! The prefill worker: turns prompts into KV caches and pushes them to decode workers layer by layer.
//!
//! [`run`] serves the `PrefillWorker` gRPC service (plus health and reflection) on a listener the caller bound,
//! until `shutdown` resolves. The engine runs on its own thread ([`worker`]); the async side only validates,
//! opens the transfer stream and waits. See DESIGN.md, steps 4-5 of the request flow.

pub mod channels;
pub mod device_links;
pub mod error;
pub mod runtime;
pub mod service;
pub mod worker;

pub use error::PrefillError;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tandem_engine::Engine;
use tandem_engine::backend::Backend;
use tandem_engine::kv::KvFormat;
use tandem_proto::v1;
use tokio::net::TcpListener;

/// Prefill worker options.
#[derive(Debug, Clone)]
pub struct PrefillConfig {
    /// Deadline for prefill + transfer when a request gives none.
    pub default_deadline: Duration,
    /// Apply a lossless stage over each KV chunk (rANS over byte classes or LZ4, the smaller) where it makes the
    /// chunk smaller.
    pub kv_lossless: bool,
    /// Send KV payloads to decode workers on this host over the links they offer, beside gRPC: a device link (NCCL)
    /// to one on another GPU, else the Unix socket link (docs/kv-links.md).
    pub kv_link: bool,
}

impl Default for PrefillConfig {
    fn default() -> Self {
        Self {
            default_deadline: Duration::from_secs(60),
            kv_lossless: false,
            kv_link: true,
        }
    }
}

/// Serves a prefill worker on `listener` with `engine` until `shutdown` resolves.
pub async fn run<B: Backend>(
    listener: TcpListener,
    config: PrefillConfig,
    engine: Engine<B>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), runtime::ServeError>
where
    Engine<B>: Send,
{
    let hub = runtime::EventHub::new();
    // Device links move the cache's own blocks; a kivi2 cache's cannot be staged.
    let devices = engine
        .device_links()
        .filter(|_| config.kv_link && engine.kv_layout().format != KvFormat::Kivi2)
        .map(|d| (d, engine.kv_layout().staging_id()));
    let thread = Arc::new(worker::EngineThread::spawn(engine, hub.clone())?);
    let service = service::PrefillService::new(thread, hub, config, devices);
    let mut routes = tonic::service::RoutesBuilder::default();
    routes.add_service(v1::prefill_worker_server::PrefillWorkerServer::new(service));
    runtime::serve_grpc(listener, routes, &["tandem.v1.PrefillWorker"], shutdown).await?;
    Ok(())
}
