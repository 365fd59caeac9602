//! A local cluster for tests: router, prefill and decode workers started in process, each on its own loopback
//! listener bound here (port 0, kept open and handed to the node, never rebound), on a runtime the cluster owns.
//! Dropping the cluster signals shutdown and waits for every node to stop.

use crate::{EngineOptions, engine, open_model};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tandem_decode_node::DecodeConfig;
use tandem_prefill_node::PrefillConfig;
use tandem_proto::v1;
use tandem_router::{ModelInfo, RouterConfig, WorkerEndpoint};
use tokio::net::TcpListener;
use tokio::runtime::Runtime;
use tokio::sync::watch;

/// What to start.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    pub prefill: usize,
    pub decode: usize,
    pub prefill_engine: EngineOptions,
    pub decode_engine: EngineOptions,
    pub decode_config: DecodeConfig,
    pub prefill_config: PrefillConfig,
    /// Extra prefill endpoints the router is told about (a fake or dead worker).
    pub extra_prefill_urls: Vec<String>,
    pub routing: tandem_router::Routing,
}

impl Default for ClusterSpec {
    fn default() -> Self {
        Self {
            prefill: 1,
            decode: 1,
            prefill_engine: EngineOptions::default(),
            decode_engine: EngineOptions::default(),
            decode_config: DecodeConfig::default(),
            prefill_config: PrefillConfig::default(),
            extra_prefill_urls: Vec::new(),
            routing: Default::default(),
        }
    }
}

pub const MODEL_ID: &str = "smollm2";

/// Routing that sends every prompt through a prefill worker when there is one (the cost policy with no local
/// prefill), for tests of the transfer path.
pub fn always_disaggregate() -> tandem_router::Routing {
    tandem_router::Routing {
        cost: tandem_router::CostModel {
            local_prefill_max_tokens: 0,
            ..Default::default()
        },
        ..Default::default()
    }
}

pub struct Cluster {
    /// `host:port` of the router's HTTP API.
    pub http: String,
    /// URL of the router's gRPC API.
    pub grpc: String,
    pub prefill_urls: Vec<String>,
    pub decode_urls: Vec<String>,
    pub rt: Runtime,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

pub async fn loopback() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").await.unwrap()
}

impl Cluster {
    pub fn start(spec: ClusterSpec) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (stop, stop_rx) = watch::channel(false);
        let (_, tok) = open_model();
        let tok = Arc::new(tok);
        let context_len = open_model().0.config().unwrap().context_len;
        let mut tasks = Vec::new();
        let (http, grpc, prefill_urls, decode_urls) = rt.block_on(async {
            let mut prefill_urls = Vec::new();
            for _ in 0..spec.prefill {
                let l = loopback().await;
                prefill_urls.push(format!("http://{}", l.local_addr().unwrap()));
                let e = engine(spec.prefill_engine);
                let s = stopped(stop_rx.clone());
                let config = spec.prefill_config.clone();
                tasks.push(tokio::spawn(async move {
                    tandem_prefill_node::run(l, config, e, s).await.unwrap();
                }));
            }
            let mut decode_urls = Vec::new();
            for _ in 0..spec.decode {
                let l = loopback().await;
                decode_urls.push(format!("http://{}", l.local_addr().unwrap()));
                let e = engine(spec.decode_engine);
                let (s, t, c) = (
                    stopped(stop_rx.clone()),
                    tok.clone(),
                    spec.decode_config.clone(),
                );
                tasks.push(tokio::spawn(async move {
                    tandem_decode_node::run(l, c, e, t, s).await.unwrap();
                }));
            }
            let (h, g) = (loopback().await, loopback().await);
            let (http, grpc) = (
                h.local_addr().unwrap().to_string(),
                format!("http://{}", g.local_addr().unwrap()),
            );
            let ends = |v: &[String]| {
                v.iter()
                    .map(|u| WorkerEndpoint(u.clone()))
                    .collect::<Vec<_>>()
            };
            let mut all_prefill = prefill_urls.clone();
            all_prefill.extend(spec.extra_prefill_urls.iter().cloned());
            let config = RouterConfig {
                discovery: tandem_router::Discovery::Static {
                    prefill: ends(&all_prefill),
                    decode: ends(&decode_urls),
                },
                model: ModelInfo {
                    id: MODEL_ID.into(),
                    context_len,
                    kv_dims: None,
                },
                poll_interval: Duration::from_millis(200),
                kv: Default::default(),
                routing: spec.routing,
                admission: Default::default(),
            };
            let (s, t) = (stopped(stop_rx.clone()), tok.clone());
            tasks.push(tokio::spawn(async move {
                tandem_router::run(h, g, config, t, s).await.unwrap();
            }));
            (http, grpc, prefill_urls, decode_urls)
        });
        Self {
            http,
            grpc,
            prefill_urls,
            decode_urls,
            rt,
            stop,
            tasks,
        }
    }

    pub async fn channel(url: &str) -> tonic::transport::Channel {
        tonic::transport::Endpoint::from_shared(url.to_string())
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    /// A decode worker's load report.
    pub fn decode_load(&self, i: usize) -> v1::LoadReport {
        self.rt.block_on(async {
            let mut c = v1::decode_worker_client::DecodeWorkerClient::new(
                Self::channel(&self.decode_urls[i]).await,
            );
            c.load(v1::LoadRequest {}).await.unwrap().into_inner()
        })
    }

    pub fn prefill_load(&self, i: usize) -> v1::LoadReport {
        self.rt.block_on(async {
            let mut c = v1::prefill_worker_client::PrefillWorkerClient::new(
                Self::channel(&self.prefill_urls[i]).await,
            );
            c.load(v1::LoadRequest {}).await.unwrap().into_inner()
        })
    }

    /// Waits until the router has heard from every worker (its `/ready` answers 200: each has answered a load
    /// poll, healthy or refused); returns `/ready`'s worker list.
    pub fn wait_ready(&self) -> serde_json::Value {
        let started = Instant::now();
        loop {
            let r = crate::http::request(&self.http, "GET", "/ready", b"");
            if r.status == 200 {
                return r.json()["workers"].clone();
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "the router is not ready after 20 s: {}",
                r.body
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits (up to `timeout`) until every worker holds no referenced block and runs nothing; returns the last
    /// reports of decode and prefill workers either way, for the caller to assert on.
    pub fn wait_idle(&self, timeout: Duration) -> (Vec<v1::LoadReport>, Vec<v1::LoadReport>) {
        let until = Instant::now() + timeout;
        loop {
            let d: Vec<_> = (0..self.decode_urls.len())
                .map(|i| self.decode_load(i))
                .collect();
            let p: Vec<_> = (0..self.prefill_urls.len())
                .map(|i| self.prefill_load(i))
                .collect();
            if d.iter()
                .chain(&p)
                .all(|r| used_blocks(r) == 0 && r.running_requests == 0 && r.waiting_requests == 0)
                || Instant::now() > until
            {
                return (d, p);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Blocks referenced by some request.
pub fn used_blocks(r: &v1::LoadReport) -> u32 {
    r.kv_blocks_total - r.kv_blocks_free - r.kv_blocks_cached
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        let tasks = std::mem::take(&mut self.tasks);
        self.rt.block_on(async {
            for t in tasks {
                let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
            }
        });
    }
}
