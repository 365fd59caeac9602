//! Membership flags: how a router finds its workers (`--discovery static|etcd`) and how a worker registers itself
//! in etcd, and the glue from those flags to [`tandem_router::discovery`].

use anyhow::Result;
use std::time::Duration;
use tandem_engine::Engine;
use tandem_router::discovery::Registration;
use tandem_router::discovery::etcd::{self, EtcdConfig};
use tandem_router::workers::WorkerRole;
use tandem_router::{Discovery, WorkerEndpoint};
use tokio::sync::watch;

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiscoveryKind {
    /// The --prefill-worker and --decode-worker lists.
    Static,
    /// Workers registered in etcd under --etcd-prefix (they run with --etcd-endpoint).
    Etcd,
}

/// Where etcd is; shared by routers and workers.
#[derive(clap::Args, Debug, Clone)]
pub struct EtcdArgs {
    /// An etcd member (host:port; repeat for several).
    #[arg(long = "etcd-endpoint")]
    pub etcd_endpoints: Vec<String>,
    /// This cluster's key prefix in etcd (clusters sharing an etcd use different prefixes).
    #[arg(long, default_value = "/tandem")]
    pub etcd_prefix: String,
}

impl EtcdArgs {
    fn config(&self) -> EtcdConfig {
        EtcdConfig {
            endpoints: self.etcd_endpoints.clone(),
            prefix: self.etcd_prefix.clone(),
        }
    }
}

/// The router's side.
#[derive(clap::Args, Debug, Clone)]
pub struct DiscoveryArgs {
    /// Where the worker list comes from.
    #[arg(long, value_enum, default_value_t = DiscoveryKind::Static)]
    pub discovery: DiscoveryKind,
    /// A prefill worker's URL (repeat for several; static discovery); none = decode workers prefill locally.
    #[arg(long = "prefill-worker")]
    pub prefill: Vec<String>,
    /// A decode worker's URL (repeat for several; static discovery needs at least one).
    #[arg(long = "decode-worker")]
    pub decode: Vec<String>,
    #[command(flatten)]
    pub etcd: EtcdArgs,
}

impl DiscoveryArgs {
    pub fn discovery(&self) -> Result<Discovery> {
        let urls = |v: &[String]| v.iter().cloned().map(WorkerEndpoint).collect::<Vec<_>>();
        match self.discovery {
            DiscoveryKind::Static => {
                if self.decode.is_empty() {
                    anyhow::bail!(
                        "--discovery static needs at least one --decode-worker URL (or use --discovery etcd)"
                    );
                }
                Ok(Discovery::Static {
                    prefill: urls(&self.prefill),
                    decode: urls(&self.decode),
                })
            }
            DiscoveryKind::Etcd => {
                if self.etcd.etcd_endpoints.is_empty() {
                    anyhow::bail!("--discovery etcd needs at least one --etcd-endpoint");
                }
                if !self.prefill.is_empty() || !self.decode.is_empty() {
                    anyhow::bail!(
                        "--prefill-worker/--decode-worker are for --discovery static; with etcd, workers register themselves"
                    );
                }
                Ok(Discovery::Etcd(self.etcd.config()))
            }
        }
    }
}

/// A worker's side of membership: register in etcd when an endpoint is given, and leave gracefully.
#[derive(clap::Args, Debug, Clone)]
pub struct RegisterArgs {
    /// On SIGTERM: deregister, refuse new calls, let open ones finish for up to this many seconds, then cut them
    /// (a router resumes a cut decode stream on another worker).
    #[arg(long, default_value_t = 30)]
    pub drain_timeout_s: u64,
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// Seconds the etcd lease lives without renewal: how long routers keep listing a worker that died.
    #[arg(long, default_value_t = 5)]
    pub lease_ttl_s: u64,
    /// The model id to announce (routers refuse workers serving another; default: the model file's name without
    /// extension, as the router's --model-id).
    #[arg(long)]
    pub model_id: Option<String>,
}

impl RegisterArgs {
    /// Starts keeping this worker registered until `stop` (no-op without --etcd-endpoint); the task revokes the
    /// lease on stop, so routers drop the worker before it goes.
    pub fn spawn(
        &self,
        role: WorkerRole,
        endpoint: String,
        kv_endpoint: Option<String>,
        model_path: &std::path::Path,
        engine: &Engine<impl tandem_engine::backend::Backend>,
        stop: watch::Receiver<bool>,
    ) -> Result<Option<tokio::task::JoinHandle<()>>> {
        if self.etcd.etcd_endpoints.is_empty() {
            return Ok(None);
        }
        if self.lease_ttl_s < 2 {
            anyhow::bail!("--lease-ttl-s must be at least 2");
        }
        let registration = Registration {
            role,
            endpoint,
            kv_endpoint,
            model: self
                .model_id
                .clone()
                .unwrap_or_else(|| super::serve::model_id_of(model_path)),
            block_size: engine.config().block_size,
            hash_seed: engine.config().hash_seed.0,
            kv_blocks: engine.pool_stats().total,
        };
        Ok(Some(tokio::spawn(etcd::register(
            self.etcd.config(),
            registration,
            Duration::from_secs(self.lease_ttl_s),
            stop,
        ))))
    }
}
