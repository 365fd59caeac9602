//! One transfer chunk: K and V of some destination blocks for a range of layers.
//!
//! Payload (format version 1, codec NONE): for each layer of the range, for each destination block in order, K then
//! V, each `[kv_heads][block_size][head_dim]` little-endian elements of the layout's dtype (f32 or f16). The
//! checksum is CRC32C (hardware-accelerated where the CPU has it) over every header field, little-endian, then the
//! payload, so a flipped bit anywhere is caught, not only in the data. A chunk is decoded only after its version,
//! codec, layout, sizes and checksum all check out; nothing is written from a chunk that fails any of them.

use crate::error::TransferError;
use crate::session::SessionId;
use std::ops::Range;
use tandem_engine::kv::{BlockId, KvFormat, KvLayout};
use tandem_proto::convert::{kv_format_from_wire, kv_format_to_wire};
use tandem_proto::v1;

/// The payload format this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// Most blocks and layers one chunk may name (bounds every size computation).
pub const MAX_BLOCKS_PER_CHUNK: usize = 4096;
pub const MAX_LAYERS_PER_CHUNK: usize = 1024;

/// Shape and element type of the blocks in a chunk; sender and receiver must agree on all but the dtype.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkLayout {
    pub kv_heads: u32,
    pub head_dim: u32,
    pub block_size: u32,
    pub dtype: KvFormat,
}

impl ChunkLayout {
    pub fn of(l: &KvLayout) -> Self {
        Self {
            kv_heads: l.kv_heads as u32,
            head_dim: l.head_dim as u32,
            block_size: l.block_size as u32,
            dtype: l.format,
        }
    }
    /// Elements of one block's K (or V).
    pub fn block_elems(&self) -> usize {
        self.kv_heads as usize * self.block_size as usize * self.head_dim as usize
    }
    fn to_wire(self) -> v1::KvChunkLayout {
        v1::KvChunkLayout {
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            block_size: self.block_size,
            dtype: kv_format_to_wire(self.dtype) as i32,
        }
    }
}

/// K and V of one block of one layer, as f32.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockData {
    pub k: Vec<f32>,
    pub v: Vec<f32>,
}

/// A verified chunk, ready to write.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodedChunk {
    pub session: SessionId,
    pub index: u32,
    pub layers: Range<usize>,
    pub blocks: Vec<BlockId>,
    /// `data[(layer - layers.start) * blocks.len() + i]` is block `blocks[i]` of `layer`.
    pub data: Vec<BlockData>,
}

/// What a sender says about a chunk besides its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkHeader {
    pub session: SessionId,
    pub index: u32,
    pub layers: Range<usize>,
    pub blocks: Vec<BlockId>,
}

/// Builds a chunk from `data` (ordered as [`DecodedChunk::data`]) in `layout`'s dtype.
pub fn encode(header: &ChunkHeader, layout: ChunkLayout, data: &[BlockData]) -> v1::KvChunk {
    debug_assert_eq!(data.len(), header.layers.len() * header.blocks.len());
    let elem = layout.dtype.bytes_per_elem();
    let mut payload = Vec::with_capacity(data.len() * 2 * layout.block_elems() * elem);
    for b in data {
        for half in [&b.k, &b.v] {
            match layout.dtype {
                KvFormat::F32 => half
                    .iter()
                    .for_each(|x| payload.extend_from_slice(&x.to_le_bytes())),
                KvFormat::F16 => half.iter().for_each(|&x| {
                    payload.extend_from_slice(&half::f16::from_f32(x).to_le_bytes())
                }),
            }
        }
    }
    let mut c = v1::KvChunk {
        format_version: FORMAT_VERSION,
        session_id: header.session.0,
        chunk_index: header.index,
        layer_start: header.layers.start as u32,
        layer_end: header.layers.end as u32,
        dest_block_ids: header.blocks.iter().map(|b| b.0).collect(),
        codec: v1::KvCodec::None as i32,
        layout: Some(layout.to_wire()),
        payload,
        checksum: 0,
    };
    c.checksum = checksum(&c);
    c
}

/// CRC32C over the header fields and the payload.
pub fn checksum(c: &v1::KvChunk) -> u32 {
    let mut head = Vec::with_capacity(64 + 4 * c.dest_block_ids.len());
    head.extend_from_slice(&c.format_version.to_le_bytes());
    head.extend_from_slice(&c.session_id.to_le_bytes());
    head.extend_from_slice(&c.chunk_index.to_le_bytes());
    head.extend_from_slice(&c.layer_start.to_le_bytes());
    head.extend_from_slice(&c.layer_end.to_le_bytes());
    head.extend_from_slice(&(c.dest_block_ids.len() as u32).to_le_bytes());
    for b in &c.dest_block_ids {
        head.extend_from_slice(&b.to_le_bytes());
    }
    head.extend_from_slice(&c.codec.to_le_bytes());
    let l = c.layout.unwrap_or_default();
    for x in [l.kv_heads, l.head_dim, l.block_size, l.dtype as u32] {
        head.extend_from_slice(&x.to_le_bytes());
    }
    crc32c::crc32c_append(crc32c::crc32c(&head), &c.payload)
}

/// Verifies a chunk against the receiver's layout and decodes it to f32 blocks.
pub fn decode(c: &v1::KvChunk, expect: &ChunkLayout) -> Result<DecodedChunk, TransferError> {
    let session = SessionId(c.session_id);
    if checksum(c) != c.checksum {
        return Err(TransferError::Corrupt {
            session,
            index: c.chunk_index,
        });
    }
    let refuse = |m: String| Err(TransferError::Refused(m));
    if c.format_version != FORMAT_VERSION {
        return refuse(format!(
            "format_version {} (this receiver reads {FORMAT_VERSION})",
            c.format_version
        ));
    }
    if c.codec != v1::KvCodec::None as i32 {
        let name = v1::KvCodec::try_from(c.codec).map_or("unknown", |k| k.as_str_name());
        return refuse(format!(
            "codec {name} is not supported by this receiver (NONE is)"
        ));
    }
    let Some(wl) = c.layout else {
        return refuse("layout is missing".into());
    };
    let dtype = kv_format_from_wire(wl.dtype).map_err(|e| TransferError::Refused(e.to_string()))?;
    let got = ChunkLayout {
        kv_heads: wl.kv_heads,
        head_dim: wl.head_dim,
        block_size: wl.block_size,
        dtype,
    };
    if (got.kv_heads, got.head_dim, got.block_size)
        != (expect.kv_heads, expect.head_dim, expect.block_size)
    {
        return refuse(format!(
            "layout kv_heads={} head_dim={} block_size={} differs from the receiver's {}/{}/{}",
            got.kv_heads,
            got.head_dim,
            got.block_size,
            expect.kv_heads,
            expect.head_dim,
            expect.block_size
        ));
    }
    let (ls, le) = (c.layer_start as usize, c.layer_end as usize);
    if ls >= le || le - ls > MAX_LAYERS_PER_CHUNK {
        return refuse(format!("layer range {ls}..{le} is empty or too long"));
    }
    let nb = c.dest_block_ids.len();
    if nb == 0 || nb > MAX_BLOCKS_PER_CHUNK {
        return refuse(format!(
            "{nb} destination blocks (1..={MAX_BLOCKS_PER_CHUNK} allowed)"
        ));
    }
    let n = got.block_elems();
    let elem = dtype.bytes_per_elem();
    let want = (le - ls) * nb * 2 * n * elem;
    if c.payload.len() != want {
        return refuse(format!(
            "payload has {} bytes; the header implies {want}",
            c.payload.len()
        ));
    }
    let read = |bytes: &[u8]| -> Vec<f32> {
        match dtype {
            KvFormat::F32 => bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            KvFormat::F16 => bytes
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
        }
    };
    let data = c
        .payload
        .chunks_exact(2 * n * elem)
        .map(|b| BlockData {
            k: read(&b[..n * elem]),
            v: read(&b[n * elem..]),
        })
        .collect();
    Ok(DecodedChunk {
        session,
        index: c.chunk_index,
        layers: ls..le,
        blocks: c.dest_block_ids.iter().copied().map(BlockId).collect(),
        data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn layout(dtype: KvFormat) -> ChunkLayout {
        ChunkLayout {
            kv_heads: 2,
            head_dim: 4,
            block_size: 3,
            dtype,
        }
    }

    fn sample(layers: usize, blocks: usize, l: &ChunkLayout) -> (ChunkHeader, Vec<BlockData>) {
        let n = l.block_elems();
        let data = (0..layers * blocks)
            .map(|i| BlockData {
                k: (0..n).map(|j| (i * 100 + j) as f32 * 0.5).collect(),
                v: (0..n).map(|j| -((i * 100 + j) as f32) * 0.25).collect(),
            })
            .collect();
        let header = ChunkHeader {
            session: SessionId(7),
            index: 3,
            layers: 2..2 + layers,
            blocks: (0..blocks as u32).map(|b| BlockId(b * 5 + 1)).collect(),
        };
        (header, data)
    }

    #[test]
    fn round_trips_in_both_dtypes() {
        for dtype in [KvFormat::F32, KvFormat::F16] {
            let l = layout(dtype);
            let (h, data) = sample(2, 3, &l);
            let d = decode(&encode(&h, l, &data), &l).unwrap();
            assert_eq!(d.session, h.session);
            assert_eq!(d.index, 3);
            assert_eq!(d.layers, 2..4);
            assert_eq!(d.blocks, h.blocks);
            // The sample values are exact in f16 too (small multiples of 0.25).
            assert_eq!(d.data, data);
        }
    }

    #[test]
    fn refuses_wrong_version_codec_layout_and_size() {
        let l = layout(KvFormat::F32);
        let (h, data) = sample(1, 2, &l);
        let good = encode(&h, l, &data);
        let resealed = |f: &dyn Fn(&mut v1::KvChunk)| {
            let mut c = good.clone();
            f(&mut c);
            c.checksum = checksum(&c);
            decode(&c, &l).unwrap_err().to_string()
        };
        assert!(resealed(&|c| c.format_version = 2).contains("format_version"));
        assert!(resealed(&|c| c.codec = v1::KvCodec::Int8 as i32).contains("KV_CODEC_INT8"));
        assert!(resealed(&|c| c.layout.as_mut().unwrap().head_dim = 8).contains("layout"));
        assert!(
            resealed(&|c| {
                c.payload.pop();
            })
            .contains("payload")
        );
        assert!(resealed(&|c| c.layer_end = c.layer_start).contains("layer range"));
        assert!(resealed(&|c| c.dest_block_ids.clear()).contains("destination blocks"));
        // A receiver with f16 cache still reads an f32 chunk (the dtype may differ, the shape may not).
        let f16 = layout(KvFormat::F16);
        assert!(decode(&good, &f16).is_ok());
    }

    proptest! {
        /// Any single flipped bit in the payload or a header field is caught by the checksum.
        #[test]
        fn any_flipped_bit_is_caught(pos in 0usize..10_000, bit in 0u8..8, field in 0usize..4) {
            let l = layout(KvFormat::F16);
            let (h, data) = sample(2, 2, &l);
            let mut c = encode(&h, l, &data);
            match field {
                0 => { let i = pos % c.payload.len(); c.payload[i] ^= 1 << bit; }
                1 => c.session_id ^= 1 << (pos % 64),
                2 => c.dest_block_ids[pos % 2] ^= 1 << (pos % 32),
                _ => c.layer_start ^= 1 << (pos % 32),
            }
            let is_corrupt = matches!(decode(&c, &l), Err(TransferError::Corrupt { .. }));
            prop_assert!(is_corrupt);
        }
    }
}
