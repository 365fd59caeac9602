//! Attention kernels alone against a float64 reference (part of [`super::selfcheck`]'s `check_kernels`): decode
//! over every cache format at head dims 64 and 128, grouped-query ratios 1 to 8, contexts ending mid-block and
//! past 4k, and prefill rows past one 64-row tile after a cached prefix. K/V are stored through the cache-write
//! kernel into shuffled blocks and read back for the reference, so the reference sees exactly what the cache holds
//! and what remains is the attention kernel's own error.

use super::CudaBackend;
use super::selfcheck::{Push, random, test_rotation};
use crate::backend::{Backend, BatchLayout, SeqSlice};
use crate::kv::{KvFormat, KvLayout};
use crate::model::config::{RopeConfig, RopeLayout};
use crate::rng::Rng;

pub(super) fn checks(b: &CudaBackend, rng: &mut Rng, push: &mut Push<'_>) {
    use RopeLayout::{Halves, Interleaved};
    for (group, hd, format, contexts, pairs) in [
        (1, 64, KvFormat::F32, vec![1, 17, 300], Halves),
        (3, 64, KvFormat::F16, vec![5, 64, 1000, 33], Halves),
        (4, 128, KvFormat::F16, vec![1024, 7, 129], Halves),
        (5, 128, KvFormat::F32, vec![250], Halves),
        (8, 128, KvFormat::F16, vec![77, 4097], Halves),
        (4, 128, KvFormat::Int8, vec![1024, 7, 129], Halves),
        (3, 64, KvFormat::Int8, vec![300], Halves),
        // Every context within one 64-key bucket: a single split, written by the block itself.
        (7, 128, KvFormat::F16, vec![64, 3, 50], Halves),
        (2, 64, KvFormat::Int8, vec![40, 64], Halves),
        (4, 128, KvFormat::Int4, vec![1024, 7, 129], Halves),
        (3, 64, KvFormat::Int4, vec![300, 64], Halves),
        (4, 128, KvFormat::Fp8, vec![1024, 7, 129], Halves),
        (3, 64, KvFormat::Fp8, vec![300, 64], Halves),
        (4, 128, KvFormat::Kivi2, vec![1024, 7, 129], Halves),
        (3, 64, KvFormat::Kivi2, vec![300, 64, 33], Interleaved),
        (8, 128, KvFormat::Kivi2, vec![4097, 16], Interleaved),
    ] {
        attention(b, rng, push, group, hd, format, &contexts, 1, pairs);
    }
    // Prefill: rows per sequence past the decode threshold, after a cached prefix, ending mid-tile.
    for (group, hd, format, contexts, first, pairs) in [
        (4, 128, KvFormat::F16, &[130, 200, 9][..], 130, Halves),
        (3, 64, KvFormat::F32, &[65, 100][..], 65, Halves),
        (4, 128, KvFormat::Int8, &[130, 200, 9][..], 130, Halves),
        (2, 64, KvFormat::Int4, &[70, 150][..], 70, Halves),
        (4, 128, KvFormat::Fp8, &[130, 200, 9][..], 130, Halves),
        (2, 64, KvFormat::Kivi2, &[70, 150][..], 70, Halves),
        (4, 128, KvFormat::Kivi2, &[70, 150][..], 70, Halves),
        (2, 64, KvFormat::Kivi2, &[130, 200, 9][..], 130, Interleaved),
        (
            4,
            128,
            KvFormat::Kivi2,
            &[130, 200, 9][..],
            130,
            Interleaved,
        ),
    ] {
        attention(b, rng, push, group, hd, format, contexts, first, pairs);
    }
}

/// A step over the last `rows` (at most all) positions of each sequence of `contexts` keys, in `tables`' blocks.
pub(super) fn layout_of(
    contexts: &[usize],
    tables: &[Vec<u32>],
    bs: usize,
    rows: usize,
) -> BatchLayout {
    let mut l = BatchLayout::default();
    for (table, &c) in tables.iter().zip(contexts) {
        let r = rows.min(c);
        l.seqs.push(SeqSlice {
            first_row: l.tokens.len(),
            n_rows: r,
            start_pos: c - r,
            block_table: table.clone(),
        });
        for p in c - r..c {
            l.tokens.push(0);
            l.positions.push(p as u32);
            l.slots.push(table[p / bs] * bs as u32 + (p % bs) as u32);
        }
    }
    l
}

/// Attention of `q_rows` new rows per sequence (1: decode) over contexts `contexts` (including the new rows), with
/// `group` query heads per KV head; K/V are stored through `store_kv` in shuffled blocks and read back for the
/// reference, so the reference sees exactly what the cache holds.
#[allow(clippy::too_many_arguments)]
fn attention(
    b: &CudaBackend,
    rng: &mut Rng,
    push: &mut Push<'_>,
    group: usize,
    hd: usize,
    format: KvFormat,
    contexts: &[usize],
    q_rows: usize,
    pairs: RopeLayout,
) {
    let (kvh, bs) = (2, 16);
    let heads = kvh * group;
    let blocks: usize = contexts.iter().map(|c| c.div_ceil(bs)).sum();
    let layout = KvLayout {
        layers: 2,
        kv_heads: kvh,
        head_dim: hd,
        block_size: bs,
        num_blocks: blocks + 3,
        format,
    };
    let rope = RopeConfig {
        theta: 10_000.0,
        layout: pairs,
        freq_factors: None,
    };
    let Ok(mut kv) = b.alloc_kv(&layout, &test_rotation(&layout, &rope)) else {
        return push(
            format!("attention alloc {format:?}"),
            vec![],
            vec![0.0],
            0.0,
        );
    };
    // Shuffled physical blocks.
    let mut ids: Vec<u32> = (0..layout.num_blocks as u32).collect();
    for i in (1..ids.len()).rev() {
        ids.swap(i, rng.below(i + 1));
    }
    let mut next = ids.into_iter();
    let tables: Vec<Vec<u32>> = contexts
        .iter()
        .map(|c| (0..c.div_ceil(bs)).map(|_| next.next().unwrap()).collect())
        .collect();
    let layer = 1;
    // Store every context token's K/V (one sequence slice per context).
    let store = layout_of(contexts, &tables, bs, usize::MAX);
    let n = store.tokens.len();
    let k = b.tensor(n, kvh * hd, &random(rng, n * kvh * hd, 1.5));
    let v = b.tensor(n, kvh * hd, &random(rng, n * kvh * hd, 1.0));
    let plan = b.plan(&store, &rope, hd, Some(&mut kv));
    b.store_kv(&mut kv, layer, &k, &v, &plan);
    // The query rows: the last `q_rows` (at most the context) of each sequence.
    let query = layout_of(contexts, &tables, bs, q_rows);
    let rows = query.tokens.len();
    let q = random(rng, rows * heads * hd, 1.0);
    let plan = b.plan(&query, &rope, hd, Some(&mut kv));
    let qt = b.tensor(rows, heads * hd, &q);
    let mut o = b.activations(0, 0);
    b.attention(&qt, &kv, layer, &plan, &mut o, &mut []);
    let got = b.to_host(&o);
    // The reference, from the cache as stored.
    let mut cache: std::collections::HashMap<u32, (Vec<f32>, Vec<f32>)> = Default::default();
    for t in &tables {
        for &blk in t {
            cache.insert(blk, b.read_kv_block(&kv, layer, blk));
        }
    }
    let kv_at = |table: &[u32], p: usize, h: usize, which: usize| -> &[f32] {
        let (kb, vb) = &cache[&table[p / bs]];
        let src = if which == 0 { kb } else { vb };
        &src[(h * bs + p % bs) * hd..][..hd]
    };
    let mut want = vec![0f64; rows * heads * hd];
    let scale = 1.0 / (hd as f64).sqrt();
    for seq in &query.seqs {
        let table = &seq.block_table;
        for i in 0..seq.n_rows {
            let row = seq.first_row + i;
            let ctx = seq.start_pos + i + 1;
            for h in 0..heads {
                let qh = &q[(row * heads + h) * hd..][..hd];
                let scores: Vec<f64> = (0..ctx)
                    .map(|p| {
                        let kp = kv_at(table, p, h / group, 0);
                        qh.iter()
                            .zip(kp)
                            .map(|(&a, &c)| a as f64 * c as f64)
                            .sum::<f64>()
                            * scale
                    })
                    .collect();
                let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                let sum: f64 = e.iter().sum();
                let o = &mut want[(row * heads + h) * hd..][..hd];
                for (p, w) in e.iter().enumerate() {
                    for (od, &vd) in o.iter_mut().zip(kv_at(table, p, h / group, 1)) {
                        *od += w / sum * vd as f64;
                    }
                }
            }
        }
    }
    // Both kernels multiply on tensor cores in f16 (Q, an f32 cache and the probabilities rounded to f16).
    let kind = if q_rows > 1 { "prefill" } else { "decode" };
    let tol = 2e-3;
    push(
        format!("{kind} attention g{group} hd{hd} {format:?} contexts {contexts:?}"),
        got,
        want,
        tol,
    );
}
