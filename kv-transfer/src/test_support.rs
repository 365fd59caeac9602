//! What this crate's tests share: a tiny block layout (one KV head of two dims, two-token blocks) and chunks of it.

use crate::chunk::{BlockData, ChunkHeader, ChunkLayout, encode};
use crate::session::SessionId;
use std::sync::Arc;
use tandem_engine::kv::{BlockId, KvFormat};
use tandem_proto::v1;

pub fn layout() -> ChunkLayout {
    let rope = tandem_engine::model::RopeConfig {
        theta: 10_000.0,
        layout: tandem_engine::model::RopeLayout::Halves,
        freq_factors: None,
    };
    ChunkLayout {
        kv_heads: 1,
        head_dim: 2,
        block_size: 2,
        dtype: KvFormat::F32,
        keys: Arc::new(tandem_engine::kv::codec::KeyRotation::new(&rope, 2, 2)),
    }
}

/// Chunk 0 of `session`: `blocks` of `layer`, K all 1.0 and V all 2.0.
pub fn chunk(session: SessionId, blocks: &[u32], layer: usize) -> v1::KvChunk {
    chunk_at(session, 0, blocks, layer)
}

/// Chunk `index` of `session`, as [`chunk`].
pub fn chunk_at(session: SessionId, index: u32, blocks: &[u32], layer: usize) -> v1::KvChunk {
    let h = ChunkHeader {
        session,
        index,
        layers: layer..layer + 1,
        blocks: blocks.iter().copied().map(BlockId).collect(),
        fills: vec![tandem_engine::kv::codec::Fill::middle(2); blocks.len()],
    };
    let data = vec![
        BlockData {
            k: vec![1.0; 4],
            v: vec![2.0; 4]
        };
        blocks.len()
    ];
    encode(&h, &layout(), Default::default(), &data)
}
