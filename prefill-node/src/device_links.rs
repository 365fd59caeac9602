//! The prefill worker's device links to decode workers (NCCL between two GPUs of one host, decision 0015;
//! docs/kv-links.md): which decode workers have one, opening one on the first transfer that can use it, and
//! forgetting one that failed.
//!
//! A link is tried only toward a decode worker on this host, on another GPU, whose cache has this worker's format
//! and shape (the payload is the cache's own blocks). Opening one: this process makes the NCCL id and opens the
//! decode worker's `DeviceLink` call with it; once the decode worker answers that it is joining, this side joins on
//! a blocking thread (both block until both have joined) and hands the link to the engine thread, with the call's
//! sending half, on which the engine thread announces every payload it sends. The call stays open as long as the
//! link: the engine thread dropping the link ends it, and the decode worker then closes its end. While one request
//! opens a link, others to the same decode worker go without it; a decode worker whose link could not be opened, or
//! broke, is left alone for [`RETRY_AFTER`]; its transfers use the Unix socket link or gRPC meanwhile.

use crate::error::PrefillError;
use crate::worker::{EngineThread, SharedLink};
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
    Opening,
    Ready(LinkId, SharedLink),
    Failed(Instant),
}

pub struct DeviceLinkTable {
    /// This worker's device links and its cache's staging id; `None` when it has none (or links are off).
    devices: Option<(Arc<dyn DeviceLinks>, String)>,
    host: Option<String>,
    /// By decode worker (its offer's socket and device).
    links: std::sync::Mutex<HashMap<String, State>>,
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
        {
            let mut links = self.lock();
            match links.get(&key) {
                Some(State::Ready(id, _)) => return Some(*id),
                Some(State::Opening) => return None,
                Some(State::Failed(t)) if t.elapsed() < RETRY_AFTER => return None,
                _ => {}
            }
            links.insert(key.clone(), State::Opening);
        }
        let opened = open(devices.clone(), cache, channel, engine).await;
        let mut links = self.lock();
        match opened {
            Ok((id, shared)) => {
                tracing::info!(link = %id, device = %offer.device, "kv device link opened");
                links.insert(key, State::Ready(id, shared));
                Some(id)
            }
            Err(e) => {
                tracing::warn!(device = %offer.device, "kv device link not opened, sending without it: {e}");
                links.insert(key, State::Failed(Instant::now()));
                None
            }
        }
    }

    /// A transfer on `id` failed: the link is dropped at once (its communicator aborted, which also ends a send
    /// the engine's stream is stuck in), and its decode worker left alone for a while.
    pub fn broken(&self, id: LinkId, engine: &EngineThread) {
        let mut links = self.lock();
        for state in links.values_mut() {
            if let State::Ready(l, shared) = state
                && *l == id
            {
                let link = shared.lock().unwrap_or_else(|p| p.into_inner()).take();
                drop(link);
                *state = State::Failed(Instant::now());
            }
        }
        engine.drop_link(id);
    }
}

impl DeviceLinkTable {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, State>> {
        self.links.lock().unwrap_or_else(|p| p.into_inner())
    }
}

async fn open(
    devices: Arc<dyn DeviceLinks>,
    cache: &str,
    channel: Channel,
    engine: &EngineThread,
) -> Result<(LinkId, SharedLink), PrefillError> {
    let failed = |e: String| PrefillError::Unavailable(format!("opening a device link: {e}"));
    let nccl_id = devices.new_id().map_err(|e| failed(e.to_string()))?;
    let id = LinkId(tandem_engine::sampling::fresh_seed());
    let mut client = v1::kv_transfer_client::KvTransferClient::new(channel);
    let (announce, calls) = tokio::sync::mpsc::unbounded_channel();
    let _ = announce.send(v1::KvDeviceLinkMessage {
        kind: Some(v1::kv_device_link_message::Kind::Open(
            v1::KvDeviceLinkRequest {
                link_id: id.0,
                nccl_id: nccl_id.clone(),
                device_cache: cache.to_string(),
            },
        )),
    });
    let answered = async {
        let mut replies = client
            .device_link(tokio_stream::wrappers::UnboundedReceiverStream::new(calls))
            .await?
            .into_inner();
        replies.message().await.map(|first| (first, replies))
    };
    let (first, mut replies) = tokio::time::timeout(OPEN_WAIT, answered)
        .await
        .map_err(|_| failed("the decode worker did not answer".into()))?
        .map_err(|s| failed(s.message().to_string()))?;
    if first.is_none() {
        return Err(failed("the decode worker ended the call".into()));
    }
    // Joining blocks until the decode worker has joined too; on a thread of its own, so a peer that never joins
    // costs that thread, not the runtime or the engine.
    let joining = tokio::task::spawn_blocking(move || devices.join_sender(&nccl_id));
    let link = tokio::time::timeout(OPEN_WAIT, joining)
        .await
        .map_err(|_| failed("the decode worker did not join".into()))?
        .map_err(|e| failed(e.to_string()))?
        .map_err(|e| failed(e.to_string()))?;
    let shared: SharedLink = Arc::new(std::sync::Mutex::new(Some(link)));
    engine.add_link(id, shared.clone(), announce)?;
    // The call lives as long as the link: its answers are read (there are no more) until it ends.
    tokio::spawn(async move { while let Ok(Some(_)) = replies.message().await {} });
    Ok((id, shared))
}
