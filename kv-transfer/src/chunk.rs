//! One transfer chunk: K and V of some destination blocks for a range of layers, encoded by a codec.
//!
//! Payload (format version 6, documented in docs/kv-wire-format.md): for each layer of the range, for each
//! destination block in order, the codec's encoding of that block's K and V ([`tandem_engine::kv::codec`]); then,
//! if the sender chose a lossless stage, all of that compressed as one LZ4 block or by the entropy stage
//! ([`crate::entropy`]: static rANS over byte classes). Each block's fill (tokens
//! holding data) and place in its sequence travel in the header, so every size is known before a byte is read. The
//! checksum is CRC32C (hardware-accelerated where the CPU has it) over every header field, little-endian, then the
//! payload, so a flipped bit anywhere is caught, not only in the data. The layout names the key rotation kivi2
//! undoes (a CRC32C of the model's RoPE pairing and frequencies), and a receiver whose model rotates keys
//! differently refuses. A chunk is decoded only after its version, codec, layout, sizes and checksum all check out;
//! nothing is written from a chunk that fails any of them.

use crate::entropy;
use crate::error::TransferError;
use crate::session::SessionId;
use std::ops::Range;
use std::sync::Arc;
use tandem_engine::kv::codec::{
    self, BlockCoding, BlockRef, BlockShape, Codec, Fill, KeyRotation, PayloadModel, Place,
};
use tandem_engine::kv::{BlockId, KvFormat, KvLayout};
use tandem_proto::convert::{
    kv_codec_from_wire, kv_codec_to_wire, kv_format_from_wire, kv_format_to_wire,
};
use tandem_proto::v1;

/// The payload format this build writes and reads.
pub const FORMAT_VERSION: u32 = 6;

/// Most blocks and layers one chunk may name (bounds every size computation).
pub const MAX_BLOCKS_PER_CHUNK: usize = 4096;
pub const MAX_LAYERS_PER_CHUNK: usize = 1024;
/// Largest encoded payload (before the lossless stage) a receiver accepts in one chunk.
pub const MAX_CHUNK_BYTES: usize = 256 << 20;

/// Shape and element type of the blocks in a chunk, and the model's key rotation; sender and receiver must agree
/// on all but the dtype.
#[derive(Debug, Clone, PartialEq)]
pub struct ChunkLayout {
    pub kv_heads: u32,
    pub head_dim: u32,
    pub block_size: u32,
    pub dtype: KvFormat,
    pub keys: Arc<KeyRotation>,
}

impl ChunkLayout {
    /// The layout of a cache, whose model rotates keys by `keys` ([`tandem_engine::Engine::key_rotation`]).
    pub fn of(l: &KvLayout, keys: KeyRotation) -> Self {
        Self {
            kv_heads: l.kv_heads as u32,
            head_dim: l.head_dim as u32,
            block_size: l.block_size as u32,
            dtype: l.format.raw_wire(),
            keys: Arc::new(keys),
        }
    }
    /// The CRC32C of the key rotation's words, little-endian: what the wire carries of it.
    pub fn key_rotation_id(&self) -> u32 {
        let bytes: Vec<u8> = self
            .keys
            .fingerprint_words()
            .flat_map(u32::to_le_bytes)
            .collect();
        crc32c::crc32c(&bytes)
    }
    /// Elements of one block's K (or V).
    pub fn block_elems(&self) -> usize {
        self.shape().elems()
    }
    pub fn shape(&self) -> BlockShape {
        BlockShape {
            kv_heads: self.kv_heads as usize,
            block_size: self.block_size as usize,
            head_dim: self.head_dim as usize,
        }
    }
    /// How this layout's blocks are encoded under `codec`.
    pub fn coding(&self, codec: Codec) -> BlockCoding<'_> {
        BlockCoding {
            codec,
            raw: self.dtype,
            shape: self.shape(),
            keys: &self.keys,
        }
    }
    fn to_wire(&self) -> v1::KvChunkLayout {
        v1::KvChunkLayout {
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            block_size: self.block_size,
            dtype: kv_format_to_wire(self.dtype) as i32,
            key_rotation: self.key_rotation_id(),
        }
    }
}

fn place_to_wire(p: Place) -> i32 {
    (match p {
        Place::Middle => v1::KvBlockPlace::Middle,
        Place::First => v1::KvBlockPlace::First,
        Place::Newest => v1::KvBlockPlace::Newest,
    }) as i32
}

fn place_from_wire(p: i32) -> Option<Place> {
    Some(match v1::KvBlockPlace::try_from(p).ok()? {
        v1::KvBlockPlace::Middle => Place::Middle,
        v1::KvBlockPlace::First => Place::First,
        v1::KvBlockPlace::Newest => Place::Newest,
    })
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
    pub codec: Codec,
}

/// What a sender says about a chunk besides its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkHeader {
    pub session: SessionId,
    pub index: u32,
    pub layers: Range<usize>,
    pub blocks: Vec<BlockId>,
    /// Tokens holding data in each of `blocks`, and the block's place in its sequence (the same for every layer).
    pub fills: Vec<Fill>,
}

/// How a sender encodes its chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Encoding {
    pub codec: Codec,
    /// Try the lossless stages (rANS over byte classes, LZ4) over each chunk and keep the smaller where the chunk
    /// gets smaller.
    pub lossless: bool,
}

/// The header of a staged chunk, whose payload (one layer's blocks as the sender's cache stores them) was sent on
/// a device link as `link` names it: no payload here and no checksum (docs/kv-links.md). `header.fills` are not
/// sent (whole blocks move).
pub fn staged(header: &ChunkHeader, layout: &ChunkLayout, link: v1::KvLinkRef) -> v1::KvChunk {
    v1::KvChunk {
        link: Some(link),
        staged: true,
        ..wire_header(header, layout)
    }
}

/// The fields every chunk takes from its header and layout.
fn wire_header(header: &ChunkHeader, layout: &ChunkLayout) -> v1::KvChunk {
    v1::KvChunk {
        format_version: FORMAT_VERSION,
        session_id: header.session.0,
        chunk_index: header.index,
        layer_start: header.layers.start as u32,
        layer_end: header.layers.end as u32,
        dest_block_ids: header.blocks.iter().map(|b| b.0).collect(),
        layout: Some(layout.to_wire()),
        ..Default::default()
    }
}

/// Builds a chunk from `data` (ordered as [`DecodedChunk::data`]); `layout.dtype` is the element type `none` sends.
pub fn encode(
    header: &ChunkHeader,
    layout: &ChunkLayout,
    enc: Encoding,
    data: &[BlockData],
) -> v1::KvChunk {
    debug_assert_eq!(data.len(), header.layers.len() * header.blocks.len());
    debug_assert_eq!(header.fills.len(), header.blocks.len());
    let coding = layout.coding(enc.codec);
    let mut payload = Vec::with_capacity(raw_len(
        enc.codec,
        layout,
        header.layers.len(),
        &header.fills,
    ));
    for (i, b) in data.iter().enumerate() {
        let fill = header.fills[i % header.blocks.len()];
        let block = BlockRef {
            k: &b.k,
            v: &b.v,
            fill,
        };
        codec::encode_block(&coding, block, &mut payload);
    }
    let mut lossless = v1::KvLossless::None;
    if enc.lossless {
        // Both stages, keeping the smaller, and neither where it does not pay: rANS wins on quantized codes, LZ4
        // on runs of zeros (partial blocks of an uncompressed chunk).
        let model = payload_model(enc.codec, layout, header.layers.len(), &header.fills);
        let candidates = [
            (v1::KvLossless::Rans, entropy::compress(&payload, &model)),
            (v1::KvLossless::Lz4, lz4_flex::block::compress(&payload)),
        ];
        if let Some((stage, packed)) = candidates.into_iter().min_by_key(|(_, p)| p.len())
            && packed.len() < payload.len()
        {
            payload = packed;
            lossless = stage;
        }
    }
    let full = header
        .fills
        .iter()
        .all(|f| f.tokens == layout.block_size as usize);
    let middle = header.fills.iter().all(|f| f.place == Place::Middle);
    let mut c = v1::KvChunk {
        codec: kv_codec_to_wire(enc.codec) as i32,
        payload,
        block_fill: if full {
            Vec::new()
        } else {
            header.fills.iter().map(|f| f.tokens as u32).collect()
        },
        lossless: lossless as i32,
        block_place: if middle {
            Vec::new()
        } else {
            header
                .fills
                .iter()
                .map(|f| place_to_wire(f.place))
                .collect()
        },
        ..wire_header(header, layout)
    };
    c.checksum = checksum(&c);
    c
}

/// The layout of the encoded payload (as [`raw_len`] counts it) as the entropy stage models it.
fn payload_model(
    codec: Codec,
    layout: &ChunkLayout,
    layers: usize,
    fills: &[Fill],
) -> PayloadModel {
    let mut model = PayloadModel::default();
    for _ in 0..layers {
        for &f in fills {
            model.push_block(codec, layout.dtype, layout.shape(), f);
        }
    }
    model
}

/// Encoded bytes of `layers` layers of blocks with these fills, before the lossless stage.
fn raw_len(codec: Codec, layout: &ChunkLayout, layers: usize, fills: &[Fill]) -> usize {
    let per_layer: usize = fills
        .iter()
        .map(|&f| codec::encoded_len(codec, layout.dtype, layout.shape(), f))
        .sum();
    layers.saturating_mul(per_layer)
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
    for x in [
        l.kv_heads,
        l.head_dim,
        l.block_size,
        l.dtype as u32,
        l.key_rotation,
    ] {
        head.extend_from_slice(&x.to_le_bytes());
    }
    head.extend_from_slice(&(c.block_fill.len() as u32).to_le_bytes());
    for f in &c.block_fill {
        head.extend_from_slice(&f.to_le_bytes());
    }
    head.extend_from_slice(&c.lossless.to_le_bytes());
    head.extend_from_slice(&(c.block_place.len() as u32).to_le_bytes());
    for p in &c.block_place {
        head.extend_from_slice(&p.to_le_bytes());
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
    let codec = kv_codec_from_wire(c.codec)
        .map_err(|e| TransferError::Refused(e.to_string()))?
        .unwrap_or(Codec::None);
    let Some(wl) = c.layout else {
        return refuse("layout is missing".into());
    };
    let dtype = kv_format_from_wire(wl.dtype).map_err(|e| TransferError::Refused(e.to_string()))?;
    let got = ChunkLayout {
        kv_heads: wl.kv_heads,
        head_dim: wl.head_dim,
        block_size: wl.block_size,
        dtype,
        keys: expect.keys.clone(),
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
    if wl.key_rotation != expect.key_rotation_id() {
        return refuse(format!(
            "key rotation {:#010x} differs from the receiver's {:#010x}: the two workers serve models with \
             different RoPE",
            wl.key_rotation,
            expect.key_rotation_id()
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
    let bs = got.block_size as usize;
    let tokens: Vec<usize> = match c.block_fill.len() {
        0 => vec![bs; nb],
        n if n == nb => c.block_fill.iter().map(|&f| f as usize).collect(),
        n => return refuse(format!("{n} block fills for {nb} destination blocks")),
    };
    if let Some(f) = tokens.iter().find(|&&f| f > bs) {
        return refuse(format!("block fill {f} exceeds the block size {bs}"));
    }
    let places: Vec<Place> = match c.block_place.len() {
        0 => vec![Place::Middle; nb],
        n if n == nb => match c.block_place.iter().map(|&p| place_from_wire(p)).collect() {
            Some(p) => p,
            None => return refuse("a block place is unknown".into()),
        },
        n => return refuse(format!("{n} block places for {nb} destination blocks")),
    };
    let fills: Vec<Fill> = tokens
        .into_iter()
        .zip(places)
        .map(|(tokens, place)| Fill { tokens, place })
        .collect();
    let want = raw_len(codec, &got, le - ls, &fills);
    if want > MAX_CHUNK_BYTES {
        return refuse(format!(
            "the header implies {want} payload bytes (at most {MAX_CHUNK_BYTES} per chunk)"
        ));
    }
    let unpacked;
    let payload: &[u8] = match v1::KvLossless::try_from(c.lossless) {
        Ok(v1::KvLossless::None) => &c.payload,
        Ok(v1::KvLossless::Lz4) => {
            unpacked = lz4_flex::block::decompress(&c.payload, want)
                .map_err(|e| TransferError::Refused(format!("LZ4 stage: {e}")))?;
            &unpacked
        }
        Ok(v1::KvLossless::Rans) => {
            let model = payload_model(codec, &got, le - ls, &fills);
            unpacked = entropy::decompress(&c.payload, &model)
                .map_err(|e| TransferError::Refused(e.to_string()))?;
            &unpacked
        }
        Err(_) => return refuse(format!("lossless stage {} is unknown", c.lossless)),
    };
    if payload.len() != want {
        return refuse(format!(
            "payload has {} bytes; the header implies {want}",
            payload.len()
        ));
    }
    let n = got.block_elems();
    let coding = got.coding(codec);
    let mut data = Vec::with_capacity((le - ls) * nb);
    let mut pos = 0;
    for i in 0..(le - ls) * nb {
        let fill = fills[i % nb];
        let len = codec::encoded_len(codec, dtype, got.shape(), fill);
        let mut b = BlockData {
            k: vec![0.0; n],
            v: vec![0.0; n],
        };
        codec::decode_block(&coding, fill, &payload[pos..pos + len], &mut b.k, &mut b.v)
            .map_err(|e| TransferError::Refused(e.to_string()))?;
        pos += len;
        data.push(b);
    }
    Ok(DecodedChunk {
        session,
        index: c.chunk_index,
        layers: ls..le,
        blocks: c.dest_block_ids.iter().copied().map(BlockId).collect(),
        data,
        codec,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rope(theta: f32) -> tandem_engine::model::RopeConfig {
        tandem_engine::model::RopeConfig {
            theta,
            layout: tandem_engine::model::RopeLayout::Halves,
            freq_factors: None,
        }
    }

    fn layout(dtype: KvFormat) -> ChunkLayout {
        ChunkLayout {
            kv_heads: 2,
            head_dim: 4,
            block_size: 3,
            dtype,
            keys: Arc::new(KeyRotation::new(&rope(10_000.0), 4, 3)),
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
            fills: vec![Fill::middle(l.block_size as usize); blocks],
        };
        (header, data)
    }

    #[test]
    fn round_trips_in_both_dtypes() {
        for dtype in [KvFormat::F32, KvFormat::F16] {
            let l = layout(dtype);
            let (h, data) = sample(2, 3, &l);
            let d = decode(&encode(&h, &l, Encoding::default(), &data), &l).unwrap();
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
        let good = encode(&h, &l, Encoding::default(), &data);
        let resealed = |f: &dyn Fn(&mut v1::KvChunk)| {
            let mut c = good.clone();
            f(&mut c);
            c.checksum = checksum(&c);
            decode(&c, &l).unwrap_err().to_string()
        };
        assert!(resealed(&|c| c.format_version = 1).contains("format_version"));
        assert!(resealed(&|c| c.codec = 42).contains("kv_codec"));
        assert!(resealed(&|c| c.lossless = 9).contains("lossless"));
        assert!(resealed(&|c| c.block_fill = vec![1]).contains("block fills"));
        assert!(resealed(&|c| c.block_fill = vec![1, 4]).contains("exceeds the block size"));
        assert!(resealed(&|c| c.block_place = vec![1]).contains("block places"));
        assert!(resealed(&|c| c.block_place = vec![1, 7]).contains("place is unknown"));
        assert!(resealed(&|c| c.layout.as_mut().unwrap().head_dim = 8).contains("layout"));
        // A receiver whose model turns keys by another RoPE refuses every codec's chunks, before decoding any.
        let other = ChunkLayout {
            keys: Arc::new(KeyRotation::new(&rope(500_000.0), 4, 3)),
            ..l.clone()
        };
        assert!(
            decode(&good, &other)
                .unwrap_err()
                .to_string()
                .contains("key rotation")
        );
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

    #[test]
    fn every_codec_with_and_without_the_lossless_stages_round_trips_partial_blocks() {
        let l = layout(KvFormat::F32);
        let (mut h, data) = sample(2, 3, &l);
        h.fills = vec![
            Fill::of_block(0, 7, 3),
            Fill::of_block(1, 7, 3),
            Fill::of_block(2, 7, 3),
        ];
        for codec in Codec::ALL {
            for lossless in [false, true] {
                let c = encode(&h, &l, Encoding { codec, lossless }, &data);
                let d = decode(&c, &l).unwrap();
                assert_eq!(d.codec, codec);
                for (got, want) in d.data.iter().zip(&data) {
                    for (x, y) in got.k.iter().chain(&got.v).zip(want.k.iter().chain(&want.v)) {
                        // Sample values reach |75|; the coarsest codec's step there is under 30.
                        assert!((x - y).abs() <= 30.0 || *x == 0.0, "{codec}: {y} -> {x}");
                    }
                }
                // The last block holds one token: its later tokens come back as zeros, whatever the codec.
                let last = &d.data[2];
                assert!(
                    last.k[l.head_dim as usize..]
                        .iter()
                        .take(4)
                        .all(|&x| x == 0.0)
                );
            }
        }
        // Zeros past the fill make the lossless stage pay on an uncompressed chunk.
        let plain = encode(&h, &l, Encoding::default(), &data);
        let packed = encode(
            &h,
            &l,
            Encoding {
                codec: Codec::None,
                lossless: true,
            },
            &data,
        );
        assert_ne!(packed.lossless, v1::KvLossless::None as i32);
        assert!(packed.payload.len() < plain.payload.len());
        // Bell-shaped values (as real K and V are), quantized: the entropy stage pays, and decodes to the same
        // values.
        let l = ChunkLayout {
            kv_heads: 3,
            head_dim: 64,
            block_size: 16,
            dtype: KvFormat::F32,
            keys: Arc::new(KeyRotation::new(&rope(10_000.0), 64, 16)),
        };
        let (h, mut data) = sample(2, 8, &l);
        let mut s = 0x9e37_79b9_7f4a_7c15u64;
        let mut bell = || {
            (0..4)
                .map(|_| {
                    s ^= s << 13;
                    s ^= s >> 7;
                    s ^= s << 17;
                    (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
                })
                .sum::<f32>()
        };
        for b in &mut data {
            b.k.iter_mut()
                .chain(b.v.iter_mut())
                .for_each(|x| *x = bell());
        }
        for codec in [Codec::Int8, Codec::Int4, Codec::Kivi2] {
            let plain = encode(
                &h,
                &l,
                Encoding {
                    codec,
                    lossless: false,
                },
                &data,
            );
            let packed = encode(
                &h,
                &l,
                Encoding {
                    codec,
                    lossless: true,
                },
                &data,
            );
            assert_eq!(packed.lossless, v1::KvLossless::Rans as i32, "{codec}");
            assert!(packed.payload.len() < plain.payload.len(), "{codec}");
            let (a, b) = (decode(&plain, &l).unwrap(), decode(&packed, &l).unwrap());
            assert!(
                a.data
                    .iter()
                    .zip(&b.data)
                    .all(|(x, y)| x.k == y.k && x.v == y.v),
                "{codec}"
            );
        }
    }

    proptest! {
        /// A chunk whose payload is random (but correctly sealed) or cut short is refused or decoded, never a panic.
        #[test]
        fn random_or_truncated_payloads_never_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..3000),
            codec in 0i32..7, lossless in 0i32..4, cut in 0usize..3000,
        ) {
            let l = layout(KvFormat::F16);
            let (h, data) = sample(2, 2, &l);
            let mut c = encode(&h, &l, Encoding::default(), &data);
            c.codec = codec;
            c.lossless = lossless;
            c.payload = bytes;
            c.checksum = checksum(&c);
            let _ = decode(&c, &l);
            let mut t = encode(&h, &l, Encoding { codec: Codec::Int4, lossless: true }, &data);
            t.payload.truncate(cut.min(t.payload.len().saturating_sub(1)));
            t.checksum = checksum(&t);
            prop_assert!(decode(&t, &l).is_err());
        }

        /// Any single flipped bit in the payload or a header field is caught by the checksum.
        #[test]
        fn any_flipped_bit_is_caught(pos in 0usize..10_000, bit in 0u8..8, field in 0usize..4) {
            let l = layout(KvFormat::F16);
            let (h, data) = sample(2, 2, &l);
            let mut c = encode(&h, &l, Encoding::default(), &data);
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
