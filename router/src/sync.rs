//! Keeps the prefix index in step with one worker: subscribe to its KV events, load a snapshot, apply the events
//! after it; on a gap, an over-capacity report or a broken stream, drop the worker's entries and start again after
//! a pause. One task per worker, for as long as the worker is in the pool: when it leaves, the task drops the
//! worker from the index and ends (it is the only writer of that worker's entries).
//!
//! Subscribing before the snapshot is what makes this exact: every event after the snapshot's sequence number is
//! already in the stream, and the ones before it (which the snapshot reflects) are skipped by number.

use crate::index::{IndexError, PrefixIndex};
use crate::workers::{Worker, WorkerRole};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tandem_proto::{convert, v1};
use tonic::transport::Channel;

/// How long to wait before resynchronising after a failure.
const RETRY: Duration = Duration::from_millis(500);

/// Runs until `stop` resolves or the worker leaves the pool.
pub async fn follow(
    worker: Arc<Worker>,
    index: Arc<Mutex<PrefixIndex>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let follow = async {
        loop {
            let reason = sync_once(&worker, &index).await;
            lock(&index).add_worker(worker.id, 0);
            tracing::debug!(endpoint = %worker.endpoint, "prefix index out of sync ({reason}); retrying");
            tokio::time::sleep(RETRY).await;
        }
    };
    tokio::select! {
        () = follow => {}
        _ = stop.wait_for(|s| *s) => {}
        () = worker.retired() => {}
    }
    lock(&index).remove_worker(worker.id);
}

fn lock(index: &Mutex<PrefixIndex>) -> std::sync::MutexGuard<'_, PrefixIndex> {
    index.lock().unwrap_or_else(|p| p.into_inner())
}

/// One subscription's life; returns why it ended.
async fn sync_once(worker: &Worker, index: &Mutex<PrefixIndex>) -> String {
    let Some(capacity) = worker.capacity_blocks() else {
        return "no load report yet".into();
    };
    let ch = worker.channel.clone();
    let subscribed = match worker.role {
        WorkerRole::Decode => {
            client_d(ch.clone())
                .subscribe_kv_events(v1::SubscribeKvEventsRequest {})
                .await
        }
        WorkerRole::Prefill => {
            client_p(ch.clone())
                .subscribe_kv_events(v1::SubscribeKvEventsRequest {})
                .await
        }
    };
    let mut stream = match subscribed {
        Ok(s) => s.into_inner(),
        Err(e) => return format!("subscribe: {}", e.message()),
    };
    let snapshot = match worker.role {
        WorkerRole::Decode => client_d(ch).kv_snapshot(v1::KvSnapshotRequest {}).await,
        WorkerRole::Prefill => client_p(ch).kv_snapshot(v1::KvSnapshotRequest {}).await,
    };
    let snapshot = match snapshot {
        Ok(s) => s.into_inner(),
        Err(e) => return format!("snapshot: {}", e.message()),
    };
    {
        let mut ix = lock(index);
        ix.add_worker(worker.id, capacity);
        let hashes = snapshot
            .hashes
            .into_iter()
            .map(tandem_engine::kv::BlockHash);
        if let Err(e) = ix.load_snapshot(worker.id, snapshot.sequence_number, hashes) {
            return e.to_string();
        }
    }
    tracing::debug!(endpoint = %worker.endpoint, seq = snapshot.sequence_number, "prefix index synced");
    loop {
        let batch = match stream.message().await {
            Ok(Some(b)) => b,
            Ok(None) => return "event stream ended".into(),
            Err(e) => return format!("event stream: {}", e.message()),
        };
        let mut ix = lock(index);
        for e in &batch.events {
            let event = match convert::kv_event_from_wire(e) {
                Ok(ev) => ev,
                Err(e) => return format!("malformed event: {e}"),
            };
            match ix.apply(worker.id, &event) {
                Ok(()) => {}
                Err(e @ (IndexError::Gap { .. } | IndexError::OverCapacity { .. })) => {
                    tracing::warn!(endpoint = %worker.endpoint, "{e}; resynchronising");
                    return e.to_string();
                }
                Err(e) => return e.to_string(),
            }
        }
    }
}

fn client_d(ch: Channel) -> v1::decode_worker_client::DecodeWorkerClient<Channel> {
    v1::decode_worker_client::DecodeWorkerClient::new(ch)
}

fn client_p(ch: Channel) -> v1::prefill_worker_client::PrefillWorkerClient<Channel> {
    v1::prefill_worker_client::PrefillWorkerClient::new(ch)
}
