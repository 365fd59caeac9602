//! The worker runtime prefill and decode nodes share: the gRPC server around a node's services (health and
//! reflection included, one place where TLS will plug in), the KV event hub routers subscribe to, and the mapping
//! of engine errors to gRPC statuses.
//!
//! It lives here because the decode node depends on this crate anyway (it is a prefill client); see
//! docs/decisions/0003-worker-runtime.md.

use std::future::Future;
use tandem_engine::EngineError;
use tandem_engine::kv::KvEvent;
use tandem_proto::{FILE_DESCRIPTOR_SET, convert, v1};
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tokio_stream::{Stream, StreamExt};
use tonic::Status;
use tonic::service::RoutesBuilder;
use tonic::transport::server::TcpIncoming;

/// Serves `routes` plus the standard health service (reporting SERVING for `health_names`) and server reflection
/// (v1 and v1alpha) on `listener` until `shutdown` resolves; in-flight calls finish first.
pub async fn serve_grpc(
    listener: TcpListener,
    mut routes: RoutesBuilder,
    health_names: &[&str],
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    let (reporter, health) = tonic_health::server::health_reporter();
    for name in health_names {
        reporter
            .set_service_status(*name, tonic_health::ServingStatus::Serving)
            .await;
    }
    reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("the descriptor sets compiled into this binary are valid");
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .expect("the descriptor sets compiled into this binary are valid");
    routes
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);
    // The builder's own `tcp_nodelay` only covers listeners it binds itself; on ours it must be set per accepted
    // socket, or Nagle's algorithm holds each small streamed message until the peer's delayed ACK (up to 40 ms).
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .add_routes(routes.routes())
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}

/// The response stream of `SubscribeKvEvents`, the same type on every worker.
pub type KvEventStream =
    std::pin::Pin<Box<dyn Stream<Item = Result<v1::KvEventBatch, Status>> + Send>>;

/// Fans a worker's KV events out to subscribed routers. Events carry their pool's sequence numbers, so a
/// subscriber that falls behind (and misses events) sees the gap and can resynchronise.
#[derive(Clone)]
pub struct EventHub {
    tx: broadcast::Sender<Vec<KvEvent>>,
}

impl Default for EventHub {
    fn default() -> Self {
        Self::new()
    }
}

impl EventHub {
    pub fn new() -> Self {
        Self {
            tx: broadcast::channel(1024).0,
        }
    }

    /// Publishes a batch (no-op without subscribers).
    pub fn publish(&self, events: Vec<KvEvent>) {
        if !events.is_empty() {
            let _ = self.tx.send(events);
        }
    }

    /// A stream of event batches from now on; ends if the subscriber lags so far that events were dropped.
    pub fn subscribe(&self) -> KvEventStream {
        Box::pin(
            tokio_stream::wrappers::BroadcastStream::new(self.tx.subscribe())
                .map_while(|r| r.ok())
                .map(|events| {
                    Ok(v1::KvEventBatch {
                        events: events.iter().map(convert::kv_event_to_wire).collect(),
                    })
                }),
        )
    }
}

/// An engine error as a gRPC status: the caller's fault or not, in one place.
pub fn engine_status(e: &EngineError) -> Status {
    match e {
        EngineError::InvalidRequest(m) => Status::invalid_argument(m.clone()),
        EngineError::OutOfBlocks { .. } => Status::resource_exhausted(e.to_string()),
        EngineError::UnknownSequence(_) => Status::not_found(e.to_string()),
        _ => Status::internal(e.to_string()),
    }
}

/// Why a node's server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("engine thread: {0}")]
    Thread(#[from] std::io::Error),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}
