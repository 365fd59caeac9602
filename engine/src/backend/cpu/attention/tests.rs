//! Decode attention over a cache laid out as the engine lays it out at batch 16: a timing harness (ignored) for the
//! part of a batched decode step that does not batch, since every sequence reads its own keys and values.

use super::super::kvbuf::KvBuf;
use super::super::{CpuBackend, CpuKvStore, CpuPlan, CpuTensor};
use crate::backend::{Backend, BatchLayout, SeqSlice};
use crate::kv::codec::KeyRotation;
use crate::kv::{KvFormat, KvLayout};
use crate::model::config::{RopeConfig, RopeLayout};

const LAYERS: usize = 30;
const KV_HEADS: usize = 3;
const HEADS: usize = 9;
const HD: usize = 64;
const BS: usize = 16;
/// The formats decode rows read in place.
const IN_PLACE: [KvFormat; 5] = [
    KvFormat::F32,
    KvFormat::F16,
    KvFormat::Int8,
    KvFormat::Fp8,
    KvFormat::Int4,
];

/// A store of `seqs` sequences of `ctx` tokens each, their blocks scattered over a pool twice as large (as a
/// cache that has served for a while holds them), filled with pseudo-random keys and values.
fn store(format: KvFormat, seqs: usize, ctx: usize) -> (CpuKvStore, Vec<Vec<u32>>) {
    let per_seq = ctx.div_ceil(BS);
    let num_blocks = 2 * seqs * per_seq;
    let layout = KvLayout {
        layers: LAYERS,
        kv_heads: KV_HEADS,
        head_dim: HD,
        block_size: BS,
        num_blocks,
        format,
    };
    let rope = RopeConfig {
        theta: 100_000.0,
        layout: RopeLayout::Halves,
        freq_factors: None,
    };
    let mut kv = CpuBackend::new(1)
        .alloc_kv(&layout, &KeyRotation::new(&rope, HD, BS))
        .expect("store");
    let _ = &mut kv;
    // Every other block of a scrambled order: a multiplicative walk mod a prime above the pool size.
    let order: Vec<u32> = (0..num_blocks)
        .map(|i| ((i * 7919 + 13) % num_blocks) as u32)
        .collect();
    let tables: Vec<Vec<u32>> = (0..seqs)
        .map(|s| (0..per_seq).map(|b| order[2 * (s * per_seq + b)]).collect())
        .collect();
    let vectors = num_blocks * KV_HEADS * BS;
    let fill = |buf: &mut KvBuf, salt: usize| {
        let src: Vec<f32> = (0..vectors * HD)
            .map(|i| (((i + salt) * 2654435761) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        buf.write(0, HD, &src);
    };
    for l in 0..LAYERS {
        fill(&mut kv.k[l], l);
        fill(&mut kv.v[l], l + 1000);
    }
    (kv, tables)
}

fn plan(tables: Vec<Vec<u32>>, rows: usize, ctx: usize) -> CpuPlan {
    let layout = BatchLayout {
        seqs: tables
            .into_iter()
            .enumerate()
            .map(|(i, block_table)| SeqSlice {
                first_row: i * rows,
                n_rows: rows,
                start_pos: ctx - rows,
                block_table,
            })
            .collect(),
        ..Default::default()
    };
    CpuPlan {
        layout,
        cos: Vec::new(),
        sin: Vec::new(),
        half_dim: HD / 2,
        rope_layout: RopeLayout::Halves,
    }
}

fn queries(rows: usize) -> CpuTensor {
    CpuTensor {
        rows,
        cols: HEADS * HD,
        data: (0..rows * HEADS * HD)
            .map(|i| ((i * 31) % 17) as f32 / 8.0 - 1.0)
            .collect(),
    }
}

/// A decode row reads its keys and values in place (f32, f16, int8) or through a copy (int4), block by block;
/// a tile of prefill rows copies them and multiplies matrices. The last row of a tile and the same row alone
/// see the same context, so they must agree, over block tables that scatter the context.
#[test]
fn decode_rows_read_in_place_agree_with_the_prefill_path() {
    let backend = CpuBackend::new(2);
    let (seqs, ctx, tile) = (3, 45, 4);
    for format in IN_PLACE {
        let (kv, tables) = store(format, seqs, ctx);
        let q = queries(seqs * tile);
        let mut tiled = CpuTensor::default();
        super::attention(
            &backend.pool,
            &q,
            &kv,
            1,
            &plan(tables.clone(), tile, ctx),
            &mut tiled,
            &mut [],
        );
        // Each sequence's last query alone.
        let last = CpuTensor {
            rows: seqs,
            cols: q.cols,
            data: (0..seqs)
                .flat_map(|s| q.row(s * tile + tile - 1).to_vec())
                .collect(),
        };
        let mut alone = CpuTensor::default();
        super::attention(
            &backend.pool,
            &last,
            &kv,
            1,
            &plan(tables, 1, ctx),
            &mut alone,
            &mut [],
        );
        for s in 0..seqs {
            for (d, (a, b)) in alone
                .row(s)
                .iter()
                .zip(tiled.row(s * tile + tile - 1))
                .enumerate()
            {
                assert!(
                    (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                    "{format:?} seq {s} dim {d}: {a} vs {b}"
                );
            }
        }
    }
}

/// `cargo test --release -p tandem-engine --lib attention_timing -- --ignored --nocapture`: milliseconds per
/// decode step (every layer's attention) at batch 16 for several contexts and cache formats, and the rate the
/// step reads the cache at.
#[test]
#[ignore = "a measurement, not a check"]
fn attention_timing() {
    let threads = std::env::var("ATT_THREADS").ok().map_or_else(
        || std::thread::available_parallelism().map_or(1, |n| n.get()),
        |v| v.parse().unwrap(),
    );
    let backend = CpuBackend::new(threads);
    let seqs = 16;
    let ctxs: Vec<usize> = std::env::var("ATT_CTX").ok().map_or(vec![128, 512], |v| {
        v.split(',').map(|x| x.parse().unwrap()).collect()
    });
    for ctx in ctxs {
        for format in IN_PLACE {
            let (kv, tables) = store(format, seqs, ctx);
            let plan = plan(tables, 1, ctx);
            let q = queries(seqs);
            let mut out = CpuTensor::default();
            let mut best = f64::MAX;
            for _ in 0..20 {
                let t = std::time::Instant::now();
                for l in 0..LAYERS {
                    super::attention(&backend.pool, &q, &kv, l, &plan, &mut out, &mut []);
                }
                best = best.min(t.elapsed().as_secs_f64());
            }
            // Keys and values of every token, layer and KV head.
            let bytes =
                (seqs * ctx * LAYERS * KV_HEADS * format.block_head_bytes(HD, BS) / BS) as f64;
            eprintln!(
                "ctx {ctx:4} {format:?}: {:.2} ms per step, cache read at {:.1} GB/s",
                best * 1e3,
                bytes / best / 1e9
            );
        }
    }
}
