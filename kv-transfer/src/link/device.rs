//! The device kind of link (NCCL between two GPUs of one host, decision 0015): the receiving end, joined on a
//! thread of its own when a prefill worker's `OpenDeviceLink` names it, then read like any link. Its payloads are the
//! sender's cache blocks as stored ([`Payload::Device`]); a device link cannot skip a payload whose header never
//! came (the receiver cannot know its size), so it closes instead, and the transfers using it fail.

use super::recv::{Links, Source};
use super::{LinkId, Payload};
use tandem_engine::backend::link::DeviceReceiver;
use tandem_proto::v1;

impl Links {
    /// Checks an `OpenDeviceLink` request and starts joining its link on a new thread (the sender joins once this returns).
    pub fn accept_device(&self, r: &v1::KvDeviceLinkRequest) -> Result<(), String> {
        let Some((devices, cache)) = self.devices().cloned() else {
            return Err("this worker accepts no device links".into());
        };
        if r.device_cache != *cache {
            return Err(format!(
                "device_cache {:?} differs from this worker's {cache:?}",
                r.device_cache
            ));
        }
        let (id, nccl_id, links) = (LinkId(r.link_id), r.nccl_id.clone(), self.clone());
        std::thread::Builder::new()
            .name("kv-link-device".into())
            .spawn(move || {
                let result = devices
                    .join_receiver(&nccl_id)
                    .map_err(|e| e.to_string())
                    .and_then(|receiver| links.serve(id, Box::new(DeviceSource { id, receiver })));
                if let Err(e) = result {
                    tracing::warn!(link = %id, "kv device link ended: {e}");
                }
            })
            .map(drop)
            .map_err(|e| format!("no thread for the link: {e}"))
    }
}

struct DeviceSource {
    id: LinkId,
    receiver: Box<dyn DeviceReceiver>,
}

impl Source for DeviceSource {
    fn read(&mut self, seq: u64, bytes: u64) -> Result<Payload, String> {
        self.receiver
            .recv(bytes as usize)
            .map(Payload::Device)
            .map_err(|e| format!("link {}: receiving payload {seq}: {e}", self.id))
    }

    fn skip(&mut self, from: u64, _to: u64) -> Result<(), String> {
        Err(format!(
            "link {}: payload {from}'s header did not arrive, and a device link cannot skip a payload",
            self.id
        ))
    }

    fn gone(&mut self) -> bool {
        false
    }
}
