//! `tandem bench serve --mock-workers`: the router measured alone. A model-free decode worker
//! ([`tandem_router::mock::MockDecodeWorker`]) streams tokens on a fixed clock; the same workload runs through the
//! router and straight to the mock, so the difference in TTFT and ITL is the router's own cost (parsing,
//! validation, routing, two extra socket hops and the relay), free of the engines' noise and CPU use.

use super::super::serve::{bind, router_model, stopped};
use super::{ServeBenchArgs, channel};
use anyhow::Result;
use std::net::SocketAddr;
use std::time::Duration;
use tandem_prefill_node::runtime::serve_grpc;
use tandem_router::mock::{MockDecodeWorker, MockTiming};
use tandem_router::{RouterConfig, WorkerEndpoint};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tonic::transport::Channel;

/// A router in front of one mock decode worker, both on loopback ports of this process.
pub struct MockSetup {
    pub router: Channel,
    pub decode: Channel,
    stop: watch::Sender<bool>,
    tasks: JoinSet<Result<()>>,
}

impl MockSetup {
    pub async fn start(a: &ServeBenchArgs) -> Result<Self> {
        let timing = MockTiming {
            ttft: Duration::from_secs_f64(a.mock_ttft_ms / 1e3),
            itl: Duration::from_secs_f64(a.mock_itl_ms / 1e3),
        };
        let (tok, model) = router_model(&a.cluster.model.model, a.cluster.model_id.clone())?;
        let loopback: SocketAddr = "127.0.0.1:0".parse().expect("valid address");
        let (stop, rx) = watch::channel(false);
        let mut tasks = JoinSet::new();
        let mock = bind(loopback, "the mock decode worker").await?;
        let decode_url = format!("http://{}", mock.local_addr()?);
        let s = stopped(rx.clone());
        tasks.spawn(async move {
            let mut routes = tonic::service::RoutesBuilder::default();
            routes.add_service(MockDecodeWorker::new(timing).server());
            serve_grpc(mock, routes, &["tandem.v1.DecodeWorker"], s).await?;
            Ok(())
        });
        let http = bind(loopback, "the router's HTTP API").await?;
        let grpc = bind(loopback, "the router's gRPC API").await?;
        let router_url = format!("http://{}", grpc.local_addr()?);
        let config = RouterConfig {
            discovery: tandem_router::Discovery::Static {
                prefill: Vec::new(),
                decode: vec![WorkerEndpoint(decode_url.clone())],
            },
            model,
            poll_interval: Duration::from_secs(1),
            kv: Default::default(),
            routing: Default::default(),
            admission: Default::default(),
        };
        let s = stopped(rx);
        tasks.spawn(async move {
            tandem_router::run(http, grpc, config, tok, s).await?;
            Ok(())
        });
        Ok(Self {
            router: channel(&router_url)?,
            decode: channel(&decode_url)?,
            stop,
            tasks,
        })
    }

    pub async fn stop(mut self) -> Result<()> {
        let _ = self.stop.send(true);
        while let Some(r) = self.tasks.join_next().await {
            r??;
        }
        Ok(())
    }
}
