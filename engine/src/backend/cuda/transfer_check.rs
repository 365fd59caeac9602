//! Checks of what a GPU-to-GPU KV transfer runs on one GPU (part of `tandem bench gpu --check-only`): blocks
//! gathered from one store into a staging buffer and scattered into other blocks of a second store read back
//! exactly as the first store's blocks (every cache format that stages), layers and blocks outside the copied range
//! stay untouched, blocks read to the host and written from it at once through the staging (what a prefill
//! worker ships and a decode worker takes over gRPC) equal the same blocks read or written one by one, a payload
//! handed over from another stream (as a device link's receiver hands it) is written exactly, and NCCL carries a
//! buffer from a one-rank communicator to itself unchanged; the device links' own identity and ids are checked
//! too. The two-process link
//! itself needs two GPUs (`tandem bench transfer --transport nccl`).

use super::CudaBackend;
use super::module::dev;
use super::nccl::loopback_check;
use super::selfcheck::{Push, random};
use crate::backend::Backend;
use crate::kv::codec::KeyRotation;
use crate::kv::{KvFormat, KvLayout};
use crate::model::config::{RopeConfig, RopeLayout};
use crate::rng::Rng;

pub(super) fn checks(b: &CudaBackend, rng: &mut Rng, push: &mut Push<'_>) {
    for (format, hd) in [
        (KvFormat::F32, 64),
        (KvFormat::F16, 128),
        (KvFormat::Int8, 64),
        (KvFormat::Fp8, 128),
        (KvFormat::Int4, 128),
    ] {
        stage_round_trip(b, rng, push, format, hd);
    }
    for (format, hd) in [(KvFormat::F16, 128), (KvFormat::Int4, 64)] {
        device_payload_write(b, rng, push, format, hd);
    }
    let name = "nccl loopback (1 MiB + 3 bytes)".to_string();
    if !super::nccl::nccl_present() {
        // Said, not failed: a host without libnccl.so can still serve; only the GPU-to-GPU transport needs it.
        eprintln!("{name}: skipped, no NCCL library (libnccl.so) on this host");
        return;
    }
    // What a worker offers and makes for its device links.
    let links = b.device_links();
    let id = links.as_ref().map(|l| l.new_id());
    let ok = matches!(&id, Some(Ok(id)) if id.len() == 256)
        && links.as_ref().is_some_and(|l| l.device().len() == 10);
    if !ok {
        let device = links.as_ref().map(|l| l.device());
        eprintln!(
            "device links: {device:?}, a fresh id {:?}",
            id.map(|r| r.map(|s| s.len()))
        );
    }
    push(
        "device links: a PCI address and a 256-digit NCCL id".into(),
        vec![f32::from(u8::from(!ok))],
        vec![0.0],
        0.0,
    );
    match loopback_check(b, (1 << 20) + 3) {
        Ok(wrong) => push(name, vec![wrong as f32], vec![0.0], 0.0),
        Err(e) => {
            eprintln!("{name}: {e}");
            push(name, vec![], vec![0.0], 0.0)
        }
    }
}

/// What a decode worker does with a payload its device link received: layer 1 of blocks [4, 0, 2] of a filled store,
/// staged into a buffer on another stream (as a link's receiver allocates it), written with
/// `write_staged_blocks` into blocks [1, 5, 3] of an empty store; they must read back as the source blocks, bit for
/// bit, every other block and layer zero, and a payload of the wrong size must be refused.
fn device_payload_write(
    b: &CudaBackend,
    rng: &mut Rng,
    push: &mut Push<'_>,
    format: KvFormat,
    hd: usize,
) {
    use crate::backend::link::DevicePayload;
    let (layout, keys) = small_store(2, format, hd);
    let name = format!("kv blocks written from a device payload ({format:?}, head_dim {hd})");
    let fail = |push: &mut Push<'_>, e: &dyn std::fmt::Display| {
        eprintln!("{name}: {e}");
        push(name.clone(), vec![], vec![0.0], 0.0)
    };
    let (Ok(mut src), Ok(mut dst)) = (b.alloc_kv(&layout, &keys), b.alloc_kv(&layout, &keys))
    else {
        return fail(push, &"no memory for the stores");
    };
    let n = layout.block_elems();
    for blk in 0..layout.num_blocks as u32 {
        let (k, v) = (random(rng, n, 3.0), random(rng, n, 1.0));
        b.write_kv_block(&mut src, 1, blk, &k, &v);
    }
    let (from, to) = ([4u32, 0, 2], [1u32, 5, 3]);
    const STAGING: &str = "staging a device payload";
    let payload = (|| {
        let bytes = src.staging_shape(b, 1, from.len())?.bytes();
        let mut buf = b.stream.alloc_zeros::<u8>(bytes).map_err(dev(STAGING))?;
        b.gather_kv(&src, 1..2, &from, &mut buf)?;
        b.stream.synchronize().map_err(dev(STAGING))?;
        // Handed over as a receiver hands it: moved into a payload, on a stream other than the backend's.
        let other = b.ctx.new_stream().map_err(dev(STAGING))?;
        let mut moved = other.alloc_zeros::<u8>(bytes).map_err(dev(STAGING))?;
        other.memcpy_dtod(&buf, &mut moved).map_err(dev(STAGING))?;
        other.synchronize().map_err(dev(STAGING))?;
        Ok::<_, crate::error::EngineError>(super::device_link::received(moved, bytes))
    })();
    let payload = match payload {
        Ok(p) => p,
        Err(e) => return fail(push, &e),
    };
    let short = DevicePayload {
        buf: Box::new(()),
        bytes: payload.bytes - 16,
    };
    if b.write_staged_blocks(&mut dst, 1, &to, short).is_ok() {
        return fail(push, &"a payload of the wrong size was written");
    }
    if let Err(e) = b.write_staged_blocks(&mut dst, 1, &to, payload) {
        return fail(push, &e);
    }
    let (got, want) = copied(b, &src, &dst, &layout, 1..2, &from, &to);
    push(name, got, want, 0.0);
}

/// Layers 1..3 of blocks [4, 0, 2] of a filled store, gathered and scattered into blocks [1, 5, 3] of an empty one:
/// each destination block must read back as its source block, bit for bit, and layer 0 and the other blocks must
/// stay zero.
fn stage_round_trip(
    b: &CudaBackend,
    rng: &mut Rng,
    push: &mut Push<'_>,
    format: KvFormat,
    hd: usize,
) {
    let (layout, keys) = small_store(3, format, hd);
    let name = format!("kv staging round trip ({format:?}, head_dim {hd})");
    let (Ok(mut src), Ok(mut dst)) = (b.alloc_kv(&layout, &keys), b.alloc_kv(&layout, &keys))
    else {
        return push(name, vec![], vec![0.0], 0.0);
    };
    let n = layout.block_elems();
    for l in 0..layout.layers {
        for blk in 0..layout.num_blocks as u32 {
            let (k, v) = (random(rng, n, 3.0), random(rng, n, 1.0));
            b.write_kv_block(&mut src, l, blk, &k, &v);
        }
    }
    let (from, to) = ([4u32, 0, 2], [1u32, 5, 3]);
    // Several blocks read over at once (through the staging) must read as each block alone.
    let (mut got, mut want) = (Vec::new(), Vec::new());
    for (k, v) in b.read_kv_blocks(&src, 1, &from) {
        got.extend(k.into_iter().chain(v));
    }
    for &blk in &from {
        let (k, v) = b.read_kv_block(&src, 1, blk);
        want.extend(k.into_iter().chain(v).map(f64::from));
    }
    push(
        format!("kv blocks read at once ({format:?}, head_dim {hd})"),
        got,
        want,
        0.0,
    );
    // Several blocks written at once (through the staging) must hold what each block written alone holds.
    if let (Ok(mut at_once), Ok(mut alone)) =
        (b.alloc_kv(&layout, &keys), b.alloc_kv(&layout, &keys))
    {
        let data: Vec<(Vec<f32>, Vec<f32>)> = (0..3)
            .map(|_| (random(rng, n, 3.0), random(rng, n, 1.0)))
            .collect();
        let refs: Vec<(&[f32], &[f32])> = data.iter().map(|(k, v)| (&k[..], &v[..])).collect();
        b.write_kv_blocks(&mut at_once, 2, &to, &refs);
        for (&blk, (k, v)) in to.iter().zip(&refs) {
            b.write_kv_block(&mut alone, 2, blk, k, v);
        }
        // Every block of every layer: a write that spilled past its blocks would show.
        let read = |kv| -> Vec<f32> {
            (0..layout.layers)
                .flat_map(|l| (0..layout.num_blocks as u32).map(move |blk| (l, blk)))
                .flat_map(|(l, blk)| {
                    let (k, v) = b.read_kv_block(kv, l, blk);
                    k.into_iter().chain(v)
                })
                .collect()
        };
        push(
            format!("kv blocks written at once ({format:?}, head_dim {hd})"),
            read(&at_once),
            read(&alone).into_iter().map(f64::from).collect(),
            0.0,
        );
    }
    let staged = (|| {
        let shape = src.staging_shape(b, 2, from.len())?;
        let mut buf = b
            .stream
            .alloc_zeros::<u8>(shape.bytes())
            .map_err(|e| crate::error::EngineError::Device(e.to_string()))?;
        b.gather_kv(&src, 1..3, &from, &mut buf)?;
        b.scatter_kv(&mut dst, 1..3, &to, &buf)
    })();
    if let Err(e) = staged {
        eprintln!("{name}: {e}");
        return push(name, vec![], vec![0.0], 0.0);
    }
    let (got, want) = copied(b, &src, &dst, &layout, 1..3, &from, &to);
    push(name, got, want, 0.0);
}

/// A small store's layout (two KV heads, 16-token blocks, six blocks) and its key rotation.
fn small_store(layers: usize, format: KvFormat, hd: usize) -> (KvLayout, KeyRotation) {
    let layout = KvLayout {
        layers,
        kv_heads: 2,
        head_dim: hd,
        block_size: 16,
        num_blocks: 6,
        format,
    };
    let rope = RopeConfig {
        theta: 10_000.0,
        layout: RopeLayout::Halves,
        freq_factors: None,
    };
    (layout, KeyRotation::new(&rope, hd, layout.block_size))
}

/// Every block of every layer of `dst`, and what it must hold after `layers` of blocks `from` of `src` were copied
/// into blocks `to` of a zeroed `dst`: the source blocks there, zeros everywhere else.
fn copied(
    b: &CudaBackend,
    src: &super::CudaKvStore,
    dst: &super::CudaKvStore,
    layout: &KvLayout,
    layers: std::ops::Range<usize>,
    from: &[u32],
    to: &[u32],
) -> (Vec<f32>, Vec<f64>) {
    let n = layout.block_elems();
    let (mut got, mut want) = (Vec::new(), Vec::new());
    for l in 0..layout.layers {
        for blk in 0..layout.num_blocks as u32 {
            let (k, v) = b.read_kv_block(dst, l, blk);
            got.extend(k.into_iter().chain(v));
            let source = layers
                .contains(&l)
                .then(|| to.iter().position(|&t| t == blk))
                .flatten()
                .map(|i| from[i]);
            match source {
                Some(s) => {
                    let (k, v) = b.read_kv_block(src, l, s);
                    want.extend(k.into_iter().chain(v).map(f64::from));
                }
                None => want.extend(std::iter::repeat_n(0.0, 2 * n)),
            }
        }
    }
    (got, want)
}
