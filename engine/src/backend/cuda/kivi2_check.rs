//! Checks of the kivi2 store's own kernels against the host's rules (part of `tandem bench gpu --check-only`): a
//! block sealed on the device holds the codes the host's `quantize_channels` makes in the block's frame, and a
//! block written from the host and then decoded into is refilled from its codes before the new key joins it. The
//! attention checks of every format (kivi2 included) are in [`super::attention_check`].

use super::CudaBackend;
use super::attention_check::layout_of;
use super::selfcheck::{Push, random};
use crate::backend::{Backend, BatchLayout, SeqSlice};
use crate::kv::codec::KeyRotation;
use crate::kv::quant::{
    dequantize_channels, dequantize_groups, quantize_channels, quantize_groups,
};
use crate::kv::{KvFormat, KvLayout};
use crate::model::config::{RopeConfig, RopeLayout};
use crate::rng::Rng;
use half::f16;

pub(super) fn checks(b: &CudaBackend, rng: &mut Rng, push: &mut Push<'_>) {
    for (hd, pairs) in [(128, RopeLayout::Halves), (64, RopeLayout::Interleaved)] {
        seal_and_reopen(b, rng, push, hd, pairs);
    }
}

/// Keys `[kv_head][slot][dim]` of whole blocks as the store holds them once sealed: turned into each block's frame,
/// quantized per channel, dequantized and turned back.
fn sealed_keys(keys: &[f32], hd: usize, bs: usize, frame: &KeyRotation) -> Vec<f64> {
    let mut x = keys.to_vec();
    frame.to_block_frame(&mut x);
    let mut out = vec![0f32; x.len()];
    for (xb, ob) in x.chunks(bs * hd).zip(out.chunks_mut(bs * hd)) {
        let (mut codes, mut params) = (vec![0u8; bs * hd / 4], vec![f16::ZERO; 2 * hd]);
        quantize_channels(xb, hd, &mut codes, &mut params);
        dequantize_channels(&codes, &params, hd, ob);
    }
    frame.from_block_frame(&mut out);
    out.into_iter().map(f64::from).collect()
}

/// Values as the store holds them: 2 bits per 32-dim group.
pub(super) fn stored_values(values: &[f32], hd: usize) -> Vec<f64> {
    let mut out = vec![0f32; values.len()];
    for (x, o) in values.chunks(hd).zip(out.chunks_mut(hd)) {
        let (mut codes, mut params) = (vec![0u8; hd / 4], vec![f16::ZERO; 2 * (hd / 32)]);
        quantize_groups::<2>(x, &mut codes, &mut params);
        dequantize_groups::<2>(&codes, &params, o);
    }
    out.into_iter().map(f64::from).collect()
}

/// The store's order (`[kv_head][slot][dim]`) of one block's rows `[slot][kv_head][dim]`.
fn by_head(rows: &[f32], kvh: usize, hd: usize) -> Vec<f32> {
    let bs = rows.len() / (kvh * hd);
    let mut out = vec![0f32; rows.len()];
    for t in 0..bs {
        for h in 0..kvh {
            out[(h * bs + t) * hd..][..hd].copy_from_slice(&rows[(t * kvh + h) * hd..][..hd]);
        }
    }
    out
}

fn seal_and_reopen(
    b: &CudaBackend,
    rng: &mut Rng,
    push: &mut Push<'_>,
    hd: usize,
    pairs: RopeLayout,
) {
    let (kvh, bs, layer) = (2, 16, 1);
    let layout = KvLayout {
        layers: 2,
        kv_heads: kvh,
        head_dim: hd,
        block_size: bs,
        num_blocks: 4,
        format: KvFormat::Kivi2,
    };
    let rope = RopeConfig {
        theta: 10_000.0,
        layout: pairs,
        freq_factors: None,
    };
    let frame = KeyRotation::new(&rope, hd, bs);
    let name = format!("kivi2 hd{hd} {pairs:?}");
    let Ok(mut kv) = b.alloc_kv(&layout, &frame) else {
        return push(format!("{name} alloc"), vec![], vec![0.0], 0.0);
    };
    // 21 tokens in blocks 3 then 1: block 3 fills (sealed on the device), block 1 stays open.
    let table = vec![3u32, 1];
    let store = layout_of(&[21], std::slice::from_ref(&table), bs, usize::MAX);
    let width = kvh * hd;
    let (k, v) = (random(rng, 21 * width, 1.5), random(rng, 21 * width, 1.0));
    let plan = b.plan(&store, &rope, hd, Some(&mut kv));
    let (kt, vt) = (b.tensor(21, width, &k), b.tensor(21, width, &v));
    b.store_kv(&mut kv, layer, &kt, &vt, &plan);
    let (kc, vc) = b.read_kv_block(&kv, layer, 3);
    let first = |x: &[f32]| by_head(&x[..bs * width], kvh, hd);
    push(
        format!("{name}: keys sealed on the device"),
        kc,
        sealed_keys(&first(&k), hd, bs, &frame),
        1e-2,
    );
    push(
        format!("{name}: values"),
        vc,
        stored_values(&first(&v), hd),
        1e-2,
    );
    let (kc, _) = b.read_kv_block(&kv, layer, 1);
    let open: Vec<f32> = by_head(&k[bs * width..], kvh, hd);
    let got: Vec<f32> = (0..kvh)
        .flat_map(|h| kc[h * bs * hd..][..5 * hd].to_vec())
        .collect();
    push(
        format!("{name}: keys of the open block, exact"),
        got,
        open.iter().map(|&x| f64::from(x)).collect(),
        1e-6,
    );

    // Block 0 written from the host (as a transfer does), then a decode step writes its slot 5.
    let (hk, hv) = (random(rng, bs * width, 1.5), random(rng, bs * width, 1.0));
    for l in 0..layout.layers {
        b.write_kv_block(&mut kv, l, 0, &hk, &hv);
    }
    let step = BatchLayout {
        tokens: vec![0],
        positions: vec![5],
        slots: vec![5],
        seqs: vec![SeqSlice {
            first_row: 0,
            n_rows: 1,
            start_pos: 5,
            block_table: vec![0],
        }],
        ..Default::default()
    };
    let (nk, nv) = (random(rng, width, 1.5), random(rng, width, 1.0));
    let plan = b.plan(&step, &rope, hd, Some(&mut kv));
    b.store_kv(
        &mut kv,
        layer,
        &b.tensor(1, width, &nk),
        &b.tensor(1, width, &nv),
        &plan,
    );
    let (kc, _) = b.read_kv_block(&kv, layer, 0);
    let mut want = sealed_keys(&hk, hd, bs, &frame);
    for h in 0..kvh {
        for d in 0..hd {
            want[(h * bs + 5) * hd + d] = f64::from(nk[h * hd + d]);
        }
    }
    push(
        format!("{name}: a host-written block reopened from its codes, one key added"),
        kc,
        want,
        1e-5,
    );
}
