//! The prefill worker's device links to decode workers (NCCL between two GPUs of one host, decision 0015;
//! docs/kv-links.md): which decode workers have one, opening one on the first transfer that can use it, and
//! forgetting one that failed.
//!
//! A link is tried only toward a decode worker on this host, on another GPU, whose cache has this worker's format
//! and shape (the payload is the cache's own blocks). Opening one: this process makes the NCCL id, the decode
//! worker is asked to join (`OpenDeviceLink`), then this side joins on a blocking thread (both block until both have
//! joined) and hands the link to the engine thread. A decode worker whose link could not be opened, or broke, is
//! left alone for [`RETRY_AFTER`]; its transfers use the Unix socket link or gRPC meanwhile.

use crate::error::PrefillError;
use crate::worker::EngineThread;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tandem_engine::backend::link::DeviceLinks;
use tandem_kv_transfer::link::{LinkId, host_id};
use tandem_proto::v1;
use tonic::transport::Channel;

/// How long a decode worker whose device link failed is left alone.
pub const RETRY_AFTER: Duration = Duration::from_secs(30);
/// How long opening a link may take (both sides joining included).
const OPEN_WAIT: Duration = Duration::from_secs(30);

enum State {
    Ready(LinkId),
    Failed(Instant),
}

pub struct DeviceLinkTable {
    /// This worker's device links and its cache's staging id; `None` when it has none (or links are off).
    devices: Option<(Arc<dyn DeviceLinks>, String)>,
    host: Option<String>,
    /// By decode worker (its offer's socket and device). Held across an opening, so one opens at a time.
    links: tokio::sync::Mutex<HashMap<String, State>>,
}

impl DeviceLinkTable {
    pub fn new(devices: Option<(Arc<dyn DeviceLinks>, String)>) -> Self {
        Self {
            devices,
            host: host_id(),
            links: Default::default(),
        }
    }

    /// The device link for a transfer to the decode worker that made `offer` (reached over `channel`), opened now
    /// if this is the first; `None` where none can be used.
    pub async fn for_offer(
        &self,
        offer: Option<&v1::KvLinkOffer>,
        channel: Channel,
        engine: &EngineThread,
    ) -> Option<LinkId> {
        let (devices, cache) = self.devices.as_ref()?;
        let offer = offer.filter(|o| {
            Some(&o.host_id) == self.host.as_ref()
                && !o.device.is_empty()
                && o.device != devices.device()
                && o.device_cache == *cache
        })?;
        let key = format!("{} {}", offer.unix_socket, offer.device);
        let mut links = self.links.lock().await;
        match links.get(&key) {
            Some(State::Ready(id)) => return Some(*id),
            Some(State::Failed(t)) if t.elapsed() < RETRY_AFTER => return None,
            _ => {}
        }
        match open(devices.clone(), cache, channel, engine).await {
            Ok(id) => {
                tracing::info!(link = %id, device = %offer.device, "kv device link opened");
                links.insert(key, State::Ready(id));
                Some(id)
            }
            Err(e) => {
                tracing::warn!(device = %offer.device, "kv device link not opened, sending without it: {e}");
                links.insert(key, State::Failed(Instant::now()));
                None
            }
        }
    }

    /// A transfer on `id` failed: the link is dropped, and its decode worker left alone for a while.
    pub async fn broken(&self, id: LinkId, engine: &EngineThread) {
        engine.drop_link(id);
        let mut links = self.links.lock().await;
        for state in links.values_mut() {
            if matches!(state, State::Ready(l) if *l == id) {
                *state = State::Failed(Instant::now());
            }
        }
    }
}

async fn open(
    devices: Arc<dyn DeviceLinks>,
    cache: &str,
    channel: Channel,
    engine: &EngineThread,
) -> Result<LinkId, PrefillError> {
    let failed = |e: String| PrefillError::Unavailable(format!("opening a device link: {e}"));
    let nccl_id = devices.new_id().map_err(|e| failed(e.to_string()))?;
    let id = LinkId(tandem_engine::sampling::fresh_seed());
    let mut client = v1::kv_transfer_client::KvTransferClient::new(channel);
    let asked = client.open_device_link(v1::KvDeviceLinkRequest {
        link_id: id.0,
        nccl_id: nccl_id.clone(),
        device_cache: cache.to_string(),
    });
    tokio::time::timeout(OPEN_WAIT, asked)
        .await
        .map_err(|_| failed("the decode worker did not answer".into()))?
        .map_err(|s| failed(s.message().to_string()))?;
    // Joining blocks until the decode worker has joined too; on a thread of its own, so a peer that never joins
    // costs that thread, not the runtime or the engine.
    let joining = tokio::task::spawn_blocking(move || devices.join_sender(&nccl_id));
    let link = tokio::time::timeout(OPEN_WAIT, joining)
        .await
        .map_err(|_| failed("the decode worker did not join".into()))?
        .map_err(|e| failed(e.to_string()))?
        .map_err(|e| failed(e.to_string()))?;
    engine.add_link(id, link)?;
    Ok(id)
}
