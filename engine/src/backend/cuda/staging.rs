//! Whole KV blocks gathered from the paged store into one contiguous device buffer, and scattered from one into
//! other blocks: what a GPU-to-GPU transfer moves (decision 0015). Blocks cross in the cache's own format, codes and
//! their scales or (min, scale) pairs as stored, so a receiver whose cache has the same format and shape writes them
//! back bit for bit, and the bytes moved are the bytes the cache holds (an int4 cache moves 0.28 of f16's).
//!
//! A store is a few planes (K and V, then for int8/fp8 their per-vector scales, for int4 their (min, scale) pairs),
//! each laid out `[layer][block][bytes of one block]`. The staging buffer holds, for each layer of the range in
//! order, each plane's listed blocks one after another ([`StagingShape`] says where each plane starts). One kernel
//! launch per plane copies every (block, layer) in 16-byte words, a few thread blocks per block. kivi2 stores are
//! not staged: its open blocks' keys live in a pool of their own, and no transfer moves it yet.

use super::CudaBackend;
use super::kv::{
    CudaKvStore, KvBufs, decode_bytes, decode_f16, decode_int4, encode_bytes, encode_f16,
    encode_int4,
};
use crate::error::{EngineError, Result};
use cudarc::driver::{CudaSlice, DevicePtr, PushKernelArg};
use std::ops::Range;

/// One plane of a store: its device address and the bytes of one block in it.
struct Plane {
    addr: u64,
    block_bytes: usize,
}

/// Where a range of layers of some blocks sits in a staging buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StagingShape {
    pub layers: usize,
    pub blocks: usize,
    /// Bytes of one block in each plane, in plane order.
    plane_block_bytes: [usize; 4],
    planes: usize,
}

impl StagingShape {
    fn of(planes: &[Plane], layers: usize, blocks: usize) -> Self {
        let mut plane_block_bytes = [0; 4];
        for (s, p) in plane_block_bytes.iter_mut().zip(planes) {
            *s = p.block_bytes;
        }
        Self {
            layers,
            blocks,
            plane_block_bytes,
            planes: planes.len(),
        }
    }

    /// Bytes of one layer's worth of every plane.
    pub fn layer_bytes(&self) -> usize {
        self.blocks * self.plane_block_bytes[..self.planes].iter().sum::<usize>()
    }

    /// Bytes of the whole staging buffer.
    pub fn bytes(&self) -> usize {
        self.layers * self.layer_bytes()
    }

    /// Where plane `p` starts within a layer's part of the buffer, in bytes.
    fn plane_offset(&self, p: usize) -> usize {
        self.blocks * self.plane_block_bytes[..p].iter().sum::<usize>()
    }
}

/// The copy kernel moves 16-byte words.
const WORD: usize = 16;

impl CudaKvStore {
    fn planes(&self, b: &CudaBackend) -> Result<Vec<Plane>> {
        let n = self.layout.block_elems();
        let vecs = n / self.layout.head_dim;
        let planes = match &self.bufs {
            KvBufs::F32 { k, v } => vec![(raw(b, k), 4 * n), (raw(b, v), 4 * n)],
            KvBufs::F16 { k, v } => vec![(raw(b, k), 2 * n), (raw(b, v), 2 * n)],
            KvBufs::Bytes { k, v, ks, vs, .. } => vec![
                (raw(b, k), n),
                (raw(b, v), n),
                (raw(b, ks), 2 * vecs),
                (raw(b, vs), 2 * vecs),
            ],
            KvBufs::Int4 { k, v, kp, vp } => {
                let pp = Self::int4_params(self.layout.head_dim);
                vec![
                    (raw(b, k), n / 2),
                    (raw(b, v), n / 2),
                    (raw(b, kp), 2 * vecs * pp),
                    (raw(b, vp), 2 * vecs * pp),
                ]
            }
            KvBufs::Kivi2(_) => {
                return Err(EngineError::invalid(
                    "a kivi2 cache's blocks cannot be staged for a GPU-to-GPU transfer (its open blocks' keys \
                     live in a pool of their own)",
                ));
            }
        };
        let planes: Vec<Plane> = planes
            .into_iter()
            .map(|(addr, block_bytes)| Plane { addr, block_bytes })
            .collect();
        if let Some(p) = planes.iter().find(|p| p.block_bytes % WORD != 0) {
            return Err(EngineError::invalid(format!(
                "staging KV blocks whose planes are not whole 16-byte words ({} bytes per block)",
                p.block_bytes
            )));
        }
        Ok(planes)
    }

    /// The staging buffer's shape for `layers` layers of `blocks` blocks of this store.
    pub fn staging_shape(
        &self,
        b: &CudaBackend,
        layers: usize,
        blocks: usize,
    ) -> Result<StagingShape> {
        Ok(StagingShape::of(&self.planes(b)?, layers, blocks))
    }
}

/// Threads per copy block, and words each thread moves per pass of its loop.
const COPY_THREADS: u32 = 256;
const WORDS_PER_THREAD: u32 = 4;

/// One thread block per (block, layer), and as many per block as its words fill at four words a thread, so that a
/// layer of a long prompt (128 blocks of 2,048 words for Llama-3.1-8B in f16) keeps every SM busy.
fn copy_grid(blocks: usize, layers: usize, block_words: u32) -> cudarc::driver::LaunchConfig {
    let parts = block_words.div_ceil(COPY_THREADS * WORDS_PER_THREAD).max(1);
    cudarc::driver::LaunchConfig {
        grid_dim: (blocks as u32, layers as u32, parts),
        block_dim: (COPY_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// A slice's device address (the backend runs on one stream, without event tracking: nothing to record).
fn raw<T>(b: &CudaBackend, s: &CudaSlice<T>) -> u64 {
    s.device_ptr(&b.stream).0
}

/// Which way a staging copy goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    Gather,
    Scatter,
}

impl CudaBackend {
    /// Copies `layers` of `blocks` from the store into `out`, laid out as [`CudaKvStore::staging_shape`] says.
    /// Enqueued on the backend's stream.
    pub fn gather_kv(
        &self,
        kv: &CudaKvStore,
        layers: Range<usize>,
        blocks: &[u32],
        out: &mut CudaSlice<u8>,
    ) -> Result<()> {
        self.stage(kv, layers, blocks, out, Direction::Gather)
    }

    /// Copies a staging buffer laid out like [`Self::gather_kv`]'s into the blocks listed in `blocks`.
    pub fn scatter_kv(
        &self,
        kv: &mut CudaKvStore,
        layers: Range<usize>,
        blocks: &[u32],
        staged: &CudaSlice<u8>,
    ) -> Result<()> {
        self.stage(kv, layers, blocks, staged, Direction::Scatter)
    }

    fn stage(
        &self,
        kv: &CudaKvStore,
        layers: Range<usize>,
        blocks: &[u32],
        staging: &CudaSlice<u8>,
        dir: Direction,
    ) -> Result<()> {
        let planes = kv.planes(self)?;
        let shape = StagingShape::of(&planes, layers.len(), blocks.len());
        if layers.end > kv.layout.layers || layers.is_empty() || blocks.is_empty() {
            return Err(EngineError::invalid(format!(
                "staging layers {layers:?} of {} blocks; the cache has {} layers",
                blocks.len(),
                kv.layout.layers
            )));
        }
        if let Some(&id) = blocks
            .iter()
            .find(|&&id| id as usize >= kv.layout.num_blocks)
        {
            return Err(EngineError::invalid(format!(
                "staging block {id}; the cache has {} blocks",
                kv.layout.num_blocks
            )));
        }
        if staging.len() < shape.bytes() {
            return Err(EngineError::invalid(format!(
                "a staging buffer of {} bytes for {} bytes of blocks",
                staging.len(),
                shape.bytes()
            )));
        }
        let ids = self
            .stream
            .clone_htod(blocks)
            .map_err(|e| EngineError::Device(format!("staging KV blocks: {e}")))?;
        let staged = raw(self, staging);
        let layer0 = layers.start as u32;
        let staged_layer_words = (shape.layer_bytes() / WORD) as u64;
        let to_cache = i32::from(dir == Direction::Scatter);
        for (p, plane) in planes.iter().enumerate() {
            let block_words = (plane.block_bytes / WORD) as u32;
            let layer_words = (kv.layout.num_blocks * plane.block_bytes / WORD) as u64;
            let offset_words = (shape.plane_offset(p) / WORD) as u64;
            let mut l = self.stream.launch_builder(&self.k.kv_blocks_copy);
            l.arg(&plane.addr)
                .arg(&ids)
                .arg(&layer0)
                .arg(&block_words)
                .arg(&layer_words)
                .arg(&staged)
                .arg(&offset_words)
                .arg(&staged_layer_words)
                .arg(&to_cache);
            // SAFETY: the arguments match the kernel's signature in transfer.cu; every block id is below the
            // store's block count, every layer below its layer count, and the staging buffer holds the whole shape
            // (all checked above), so every word the kernel touches lies inside its buffer.
            unsafe { l.launch(copy_grid(blocks.len(), layers.len(), block_words)) }
                .map_err(|e| EngineError::Device(format!("staging KV blocks: {e}")))?;
        }
        Ok(())
    }
}

impl CudaKvStore {
    /// K and V of `blocks` of `layer` on the host, as f32, in `blocks` order: gathered on the device into one
    /// buffer and copied over at once (one copy per layer instead of two to four per block, which is what a
    /// prefill worker shipping a long prompt over gRPC pays per layer), then decoded by the same rules as
    /// [`CudaKvStore::read_block`]. Not for kivi2 (refused by the staging).
    pub(super) fn read_blocks(
        &self,
        b: &CudaBackend,
        layer: usize,
        blocks: &[u32],
    ) -> Result<Vec<(Vec<f32>, Vec<f32>)>> {
        let shape = self.staging_shape(b, 1, blocks.len())?;
        let dev = |e: cudarc::driver::DriverError| {
            EngineError::Device(format!("reading {} KV blocks: {e}", blocks.len()))
        };
        let mut staged = b.stream.alloc_zeros::<u8>(shape.bytes()).map_err(dev)?;
        b.gather_kv(self, layer..layer + 1, blocks, &mut staged)?;
        let host = b.stream.clone_dtoh(&staged).map_err(dev)?;
        // Block i of plane p.
        let part = |p: usize, i: usize| {
            let n = shape.plane_block_bytes[p];
            &host[shape.plane_offset(p) + i * n..][..n]
        };
        let hd = self.layout.head_dim;
        Ok((0..blocks.len())
            .map(|i| {
                let plane = |p: usize| part(p, i);
                match &self.bufs {
                    KvBufs::F32 { .. } => (le_f32(plane(0)), le_f32(plane(1))),
                    KvBufs::F16 { .. } => {
                        (decode_f16(&le_u16(plane(0))), decode_f16(&le_u16(plane(1))))
                    }
                    KvBufs::Bytes { code, .. } => (
                        decode_bytes(*code, plane(0), &le_u16(plane(2)), hd),
                        decode_bytes(*code, plane(1), &le_u16(plane(3)), hd),
                    ),
                    KvBufs::Int4 { .. } => {
                        let params = |p| -> Vec<half::f16> {
                            le_u16(plane(p))
                                .into_iter()
                                .map(half::f16::from_bits)
                                .collect()
                        };
                        (
                            decode_int4(plane(0), &params(2), hd, true),
                            decode_int4(plane(1), &params(3), hd, false),
                        )
                    }
                    // `staging_shape` refused it above.
                    KvBufs::Kivi2(_) => unreachable!("kivi2 stores are not staged"),
                }
            })
            .collect())
    }
}

impl CudaKvStore {
    /// Writes K and V of `blocks` of `layer` from the host, `data` in `blocks` order: encoded on the host by the
    /// same rules as [`CudaKvStore::write_block`] into one staging buffer, copied over at once and scattered on the
    /// device (what a decode worker receiving a chunk over gRPC pays once per layer instead of per block). Not for
    /// kivi2 (refused by the staging).
    pub(super) fn write_blocks(
        &mut self,
        b: &CudaBackend,
        layer: usize,
        blocks: &[u32],
        data: &[(&[f32], &[f32])],
    ) -> Result<()> {
        let shape = self.staging_shape(b, 1, blocks.len())?;
        let n = self.layout.block_elems();
        if data.len() != blocks.len() || data.iter().any(|(k, v)| k.len() != n || v.len() != n) {
            return Err(EngineError::invalid(format!(
                "writing {} KV blocks of {n} elements from {} blocks of data of other sizes",
                blocks.len(),
                data.len()
            )));
        }
        let hd = self.layout.head_dim;
        let mut host = vec![0u8; shape.bytes()];
        for (i, (k, v)) in data.iter().enumerate() {
            // The encoded planes of block i, in plane order.
            let planes: Vec<Vec<u8>> = match &self.bufs {
                KvBufs::F32 { .. } => vec![bytes_of_f32(k), bytes_of_f32(v)],
                KvBufs::F16 { .. } => {
                    vec![bytes_of_u16(&encode_f16(k)), bytes_of_u16(&encode_f16(v))]
                }
                KvBufs::Bytes { code, .. } => {
                    let ((kq, ks), (vq, vs)) =
                        (encode_bytes(*code, k, hd), encode_bytes(*code, v, hd));
                    vec![kq, vq, bytes_of_u16(&ks), bytes_of_u16(&vs)]
                }
                KvBufs::Int4 { .. } => {
                    let ((kq, kp), (vq, vp)) =
                        (encode_int4(k, hd, true), encode_int4(v, hd, false));
                    let bits = |p: &[half::f16]| -> Vec<u8> {
                        bytes_of_u16(&p.iter().map(|x| x.to_bits()).collect::<Vec<_>>())
                    };
                    vec![kq, vq, bits(&kp), bits(&vp)]
                }
                // `staging_shape` refused it above.
                KvBufs::Kivi2(_) => unreachable!("kivi2 stores are not staged"),
            };
            for (p, plane) in planes.iter().enumerate() {
                let len = shape.plane_block_bytes[p];
                host[shape.plane_offset(p) + i * len..][..len].copy_from_slice(plane);
            }
        }
        let staged = b
            .stream
            .clone_htod(&host)
            .map_err(|e| EngineError::Device(format!("writing {} KV blocks: {e}", blocks.len())))?;
        b.scatter_kv(self, layer..layer + 1, blocks, &staged)
    }
}

fn bytes_of_u16(x: &[u16]) -> Vec<u8> {
    x.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn bytes_of_f32(x: &[f32]) -> Vec<u8> {
    x.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn le_u16(bytes: &[u8]) -> Vec<u16> {
    bytes
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect()
}

fn le_f32(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}
