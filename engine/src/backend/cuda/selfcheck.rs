//! Every kernel alone against a float64 reference on the host, on seeded random inputs of awkward sizes (odd
//! widths, contexts that end mid-block, shuffled block tables, rows past one prefill tile, grouped-query ratios
//! 1 to 8). Inputs the device holds in reduced precision (bf16 weights, f16 or f32 cache) are rounded the same way
//! before the reference sees them, so what remains is the kernel's own error. `tandem bench gpu` runs these first.
//! The attention checks are in [`super::attention_check`], the kivi2 store's in [`super::kivi2_check`], the
//! transfer staging's and NCCL's in [`super::transfer_check`]; [`check_kernels`] runs them all in one order, so a
//! seed always gives the same inputs.

use super::module::{GEMV_THREADS, fuller_last_wave};
use super::{CudaBackend, CudaMatrix, CudaTensor};
use crate::backend::{Backend, BatchLayout};
use crate::kv::{KvFormat, KvLayout};
use crate::model::config::{RopeConfig, RopeLayout};
use crate::rng::Rng;

/// One kernel check's outcome: relative error `||got - want|| / ||want||` against its tolerance.
#[derive(Debug, Clone)]
pub struct KernelCheck {
    pub name: String,
    pub rel_err: f64,
    pub tolerance: f64,
}

impl KernelCheck {
    pub fn passed(&self) -> bool {
        self.rel_err <= self.tolerance
    }
}

fn rel_err(got: &[f32], want: &[f64]) -> f64 {
    if got.len() != want.len() {
        return f64::INFINITY;
    }
    let (mut num, mut den) = (0f64, 0f64);
    for (g, w) in got.iter().zip(want) {
        num += (*g as f64 - w).powi(2);
        den += w * w;
    }
    let e = (num / den.max(1e-300)).sqrt();
    if e.is_nan() { f64::INFINITY } else { e }
}

pub(super) fn random(rng: &mut Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| (rng.next_f32() * 2.0 - 1.0) * scale)
        .collect()
}

fn bf16(x: f32) -> f32 {
    half::bf16::from_f32(x).to_f32()
}

fn silu(a: f64) -> f64 {
    a / (1.0 + (-a).exp())
}

/// `x / rms(x) * w` per row of `w.len()` columns.
fn rms_reference(x: &[f32], w: &[f32], eps: f32) -> Vec<f64> {
    x.chunks(w.len())
        .flat_map(|r| {
            let ms = r.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / w.len() as f64;
            let s = 1.0 / (ms + eps as f64).sqrt();
            r.iter()
                .zip(w)
                .map(move |(&v, &wi)| v as f64 * s * wi as f64)
        })
        .collect()
}

/// `x @ w^T` with rows of `k` columns, `w` rounded to bf16 as the device holds it.
fn matmul_reference(x: &[f64], k: usize, w: &[f32]) -> Vec<f64> {
    let n = w.len() / k;
    (0..x.len() / k * n)
        .map(|i| {
            let (r, j) = (i / n, i % n);
            (0..k)
                .map(|c| x[r * k + c] * bf16(w[j * k + c]) as f64)
                .sum()
        })
        .collect()
}

/// The input as a GEMM of it sees it: f32 through the GEMV, rounded to bf16 on the cuBLAS path.
fn gemm_input(b: &CudaBackend, x: &[f32], rows: usize, k: usize) -> Vec<f64> {
    let gemv = b.gemv_takes(rows, k);
    x.iter()
        .map(|&v| if gemv { v as f64 } else { bf16(v) as f64 })
        .collect()
}

/// Each head of each row of `x` (`heads` heads of `hd`) rotated by its row's position, in f64.
fn rope_reference(
    x: &[f32],
    heads: usize,
    hd: usize,
    positions: &[u32],
    rope: &RopeConfig,
) -> Vec<f64> {
    let inv = rope.inv_freq(hd);
    let mut out: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    for (r, &pos) in positions.iter().enumerate() {
        for h in 0..heads {
            let v = &mut out[(r * heads + h) * hd..][..hd];
            for (i, f) in inv.iter().enumerate() {
                let (s, c) = (pos as f64 * *f as f64).sin_cos();
                let (a, bb) = match rope.layout {
                    RopeLayout::Interleaved => (2 * i, 2 * i + 1),
                    RopeLayout::Halves => (i, i + hd / 2),
                };
                let (x0, x1) = (v[a], v[bb]);
                v[a] = x0 * c - x1 * s;
                v[bb] = x0 * s + x1 * c;
            }
        }
    }
    out
}

impl CudaBackend {
    pub(super) fn tensor(&self, rows: usize, cols: usize, host: &[f32]) -> CudaTensor {
        let buf = self.upload_f32(host);
        CudaTensor {
            rows,
            cols,
            buf,
            bf16: None,
            bf16_fresh: false,
        }
    }

    fn upload_f32(&self, host: &[f32]) -> Option<cudarc::driver::CudaSlice<f32>> {
        self.ok("uploading a check input", self.stream.clone_htod(host))
    }

    pub(super) fn matrix(&self, rows: usize, cols: usize, host: &[f32]) -> Option<CudaMatrix> {
        let bits: Vec<u16> = host
            .iter()
            .map(|&v| half::bf16::from_f32(v).to_bits())
            .collect();
        let data = self.ok("uploading a check matrix", self.stream.clone_htod(&bits))?;
        Some(CudaMatrix { rows, cols, data })
    }
}

/// Runs every check; an error of the device itself is reported as a failed check.
pub fn check_kernels(b: &CudaBackend, seed: u64) -> Vec<KernelCheck> {
    let mut rng = Rng::new(seed);
    let mut out = Vec::new();
    let mut push = |name: String, got: Vec<f32>, want: Vec<f64>, tolerance: f64| {
        let rel_err = match b.check() {
            Ok(()) => rel_err(&got, &want),
            Err(_) => f64::INFINITY,
        };
        out.push(KernelCheck {
            name,
            rel_err,
            tolerance,
        });
    };
    norms(b, &mut rng, &mut push);
    rope(b, &mut rng, &mut push);
    matmuls(b, &mut rng, &mut push);
    super::attention_check::checks(b, &mut rng, &mut push);
    swiglu(b, &mut rng, &mut push);
    rope_store(b, &mut rng, &mut push, KvFormat::F16);
    rope_store(b, &mut rng, &mut push, KvFormat::Int8);
    rope_store(b, &mut rng, &mut push, KvFormat::Int4);
    rope_store(b, &mut rng, &mut push, KvFormat::Fp8);
    rope_store(b, &mut rng, &mut push, KvFormat::Kivi2);
    super::kivi2_check::checks(b, &mut rng, &mut push);
    super::transfer_check::checks(b, &mut rng, &mut push);
    argmax(b, &mut rng, &mut push);
    sample(b, &mut rng, &mut push);
    out
}

/// Tokens drawn on the device against the host's rule ([`crate::sampling::draw`]) on the same logits and uniform
/// numbers, over greedy rows and every filter, half the rows with penalties. Device and host compute `exp` and their
/// f64 sums differently, so a draw within rounding of a boundary may differ: at least 99% must agree (in practice
/// all do).
fn sample(b: &CudaBackend, rng: &mut Rng, push: &mut Push<'_>) {
    use crate::sampling::{Draw, draw};
    let kinds = [
        (0.0, 0, 1.0, 0.0),
        (0.8, 0, 1.0, 0.0),
        (1.0, 50, 1.0, 0.0),
        (0.7, 0, 0.9, 0.0),
        (1.0, 0, 1.0, 0.05),
        (1.3, 40, 0.8, 0.02),
    ];
    for cols in [1000, 49_152] {
        let mut draws = Vec::new();
        for &(temperature, top_k, top_p, min_p) in &kinds {
            for _ in 0..8 {
                draws.push(Draw {
                    temperature,
                    top_k,
                    top_p,
                    min_p,
                    u: rng.unit() as f32,
                    penalties: Vec::new(),
                });
            }
        }
        let rows = draws.len();
        let x = random(rng, rows * cols, 4.0);
        // Every other row penalizes its best token and a few others (both signs of logit), as a sequence that
        // has already produced them would.
        for (i, d) in draws.iter_mut().enumerate().filter(|(i, _)| i % 2 == 1) {
            let row = &x[i * cols..(i + 1) * cols];
            let mut tokens = vec![crate::sampling::argmax(row)];
            tokens.extend((0..6).map(|_| (rng.unit() * cols as f64) as u32 % cols as u32));
            tokens.sort_unstable();
            tokens.dedup();
            d.penalties = tokens
                .iter()
                .map(|&token| crate::sampling::Penalty {
                    token,
                    repetition: 1.3,
                    subtract: 0.4 + 0.1 * (token % 3) as f32,
                })
                .collect();
        }
        let want: Vec<u32> = x
            .chunks(cols)
            .zip(&draws)
            .map(|(r, d)| draw(r, d))
            .collect();
        let xt = b.tensor(rows, cols, &x);
        // The draws reach the device with a step's plan.
        let layout = BatchLayout {
            logit_rows: (0..rows).collect(),
            head: crate::model::Head::Sample,
            draws: draws.clone(),
            ..Default::default()
        };
        let rope = RopeConfig {
            theta: 10_000.0,
            layout: RopeLayout::Halves,
            freq_factors: None,
        };
        let plan = b.plan(&layout, &rope, 64, None);
        let got = b.sample_rows(&xt, cols, &plan, &draws);
        let agree = got.iter().zip(&want).filter(|(g, w)| g == w).count();
        push(
            format!("sample {rows}x{cols} ({agree} of {rows} draws equal to the host's)"),
            vec![agree as f32],
            vec![rows as f64],
            0.01,
        );
    }
}

pub(super) type Push<'a> = dyn FnMut(String, Vec<f32>, Vec<f64>, f64) + 'a;

fn norms(b: &CudaBackend, rng: &mut Rng, push: &mut Push<'_>) {
    let (rows, cols, eps) = (3, 1001, 1e-5f32);
    let x = random(rng, rows * cols, 2.0);
    let y = random(rng, rows * cols, 1.0);
    let w = random(rng, cols, 1.5);
    let (Some(wv), xt) = (b.upload_f32(&w), b.tensor(rows, cols, &x)) else {
        return;
    };
    let mut o = b.activations(0, 0);
    b.rms_norm(&xt, &wv, eps, &mut o);
    push(
        format!("rms_norm {rows}x{cols}"),
        b.to_host(&o),
        rms_reference(&x, &w, eps),
        1e-5,
    );

    let (mut xt, mut yt) = (b.tensor(rows, cols, &x), b.tensor(rows, cols, &y));
    b.add_rms_norm(&mut xt, &mut yt, &wv, eps);
    let sum: Vec<f32> = x.iter().zip(&y).map(|(a, c)| a + c).collect();
    push(
        format!("add_rms_norm {rows}x{cols}"),
        b.to_host(&yt),
        rms_reference(&sum, &w, eps),
        1e-5,
    );

    let (mut g, u) = (b.tensor(rows, cols, &x), b.tensor(rows, cols, &y));
    b.silu_mul(&mut g, &u);
    let want = x
        .iter()
        .zip(&y)
        .map(|(&a, &c)| silu(a as f64) * c as f64)
        .collect();
    push(format!("silu_mul {rows}x{cols}"), b.to_host(&g), want, 1e-5);
}

fn rope(b: &CudaBackend, rng: &mut Rng, push: &mut Push<'_>) {
    for (hd, layout) in [(64, RopeLayout::Interleaved), (128, RopeLayout::Halves)] {
        let (rows, heads) = (7, 3);
        let cfg = RopeConfig {
            theta: 500_000.0,
            layout,
            freq_factors: None,
        };
        let positions: Vec<u32> = (0..rows).map(|_| rng.below(8000) as u32).collect();
        let batch = BatchLayout {
            tokens: vec![0; rows],
            positions: positions.clone(),
            slots: (0..rows as u32).collect(),
            ..Default::default()
        };
        let x = random(rng, rows * heads * hd, 1.0);
        let plan = b.plan(&batch, &cfg, hd, None);
        let mut xt = b.tensor(rows, heads * hd, &x);
        b.rope(&mut xt, heads, &plan);
        let want = rope_reference(&x, heads, hd, &positions, &cfg);
        // The device takes sin/cos of an f32 angle (as the CPU backend does); at positions near 8000 that alone is
        // about 1e-4 away from the exact rotation.
        push(
            format!("rope {layout:?} hd{hd}"),
            b.to_host(&xt),
            want,
            1e-3,
        );
    }
}

fn matmuls(b: &CudaBackend, rng: &mut Rng, push: &mut Push<'_>) {
    // (rows, k, n): the GEMV path takes 1..=8 rows with k % 8 == 0, cuBLAS the rest.
    for (rows, k, n) in [
        (1, 4096, 1000),
        (3, 1000, 37),
        (8, 2048, 515),
        (9, 1000, 333),
        (33, 999, 64),
    ] {
        let x = random(rng, rows * k, 1.0);
        let w = random(rng, n * k, 0.05);
        let (Some(wm), xt) = (b.matrix(n, k, &w), b.tensor(rows, k, &x)) else {
            return;
        };
        let mut o = b.activations(0, 0);
        b.matmul(&xt, &mut [(&wm, &mut o)]);
        let want = matmul_reference(&gemm_input(b, &x, rows, k), k, &w);
        let path = if b.gemv_takes(rows, k) {
            "gemv"
        } else {
            "gemm"
        };
        push(
            format!("{path} {rows}x{k} @ {n}x{k}^T"),
            b.to_host(&o),
            want,
            1e-5,
        );
    }
    // The one-row GEMV's other build: a weight whose rows fill exactly one wave of the bounded build's blocks,
    // which `fuller_last_wave` then picks wherever the two builds differ in residency (the cases above take the
    // first build).
    let (rows, k) = (1, 264);
    let per_sm = [b.k.gemv_one_row[0].1, b.k.gemv_one_row[1].1];
    let n = per_sm[1] * b.sms * GEMV_THREADS / 32;
    let build = ["", " (bounded build)"][fuller_last_wave(n / (GEMV_THREADS / 32), b.sms, &per_sm)];
    let x = random(rng, rows * k, 1.0);
    let w = random(rng, n * k, 0.05);
    if let (Some(wm), xt) = (b.matrix(n, k, &w), b.tensor(rows, k, &x)) {
        let mut o = b.activations(0, 0);
        b.matmul(&xt, &mut [(&wm, &mut o)]);
        let want = matmul_reference(&gemm_input(b, &x, rows, k), k, &w);
        push(
            format!("gemv {rows}x{k} @ {n}x{k}^T{build}"),
            b.to_host(&o),
            want,
            1e-5,
        );
    }
    // A GEMM reading the bf16 copy its input's producer (here the norm) wrote alongside the f32 output.
    let (rows, k, n) = (12, 1024, 100);
    let x = random(rng, rows * k, 1.0);
    let w = random(rng, n * k, 0.05);
    let ones = vec![1f32; k];
    let (Some(wm), Some(g), xt) = (
        b.matrix(n, k, &w),
        b.upload_f32(&ones),
        b.tensor(rows, k, &x),
    ) else {
        return;
    };
    let (mut h, mut o) = (b.activations(0, 0), b.activations(0, 0));
    b.rms_norm(&xt, &g, 1e-5, &mut h);
    b.matmul(&h, &mut [(&wm, &mut o)]);
    let normed: Vec<f64> = rms_reference(&x, &ones, 1e-5)
        .iter()
        .map(|&v| bf16(v as f32) as f64)
        .collect();
    let want = matmul_reference(&normed, k, &w);
    push(
        format!("rms_norm -> gemm {rows}x{k} @ {n}x{k}^T (bf16 copy)"),
        b.to_host(&o),
        want,
        // A value near a bf16 rounding boundary may round the other way from f32 than from f64.
        1e-3,
    );
}

fn swiglu(b: &CudaBackend, rng: &mut Rng, push: &mut Push<'_>) {
    // Three rows take the fused GEMV; twelve take cuBLAS and the elementwise kernel.
    for (rows, k, n) in [(3, 1000, 300), (12, 512, 200)] {
        let x = random(rng, rows * k, 1.0);
        let (wg, wu) = (random(rng, n * k, 0.05), random(rng, n * k, 0.05));
        let (Some(gm), Some(um), xt) = (
            b.matrix(n, k, &wg),
            b.matrix(n, k, &wu),
            b.tensor(rows, k, &x),
        ) else {
            return;
        };
        let (mut gate, mut up) = (b.activations(0, 0), b.activations(0, 0));
        b.swiglu(&xt, &gm, &um, &mut gate, &mut up);
        let xr = gemm_input(b, &x, rows, k);
        let (g, u) = (matmul_reference(&xr, k, &wg), matmul_reference(&xr, k, &wu));
        let want = g.iter().zip(&u).map(|(&g, &u)| silu(g) * u).collect();
        push(
            format!("swiglu {rows}x{k} -> {n}"),
            b.to_host(&gate),
            want,
            1e-5,
        );
    }
}

/// RoPE on Q and K and the cache write in one kernel: the rotated Q, and K and V as the cache holds them.
fn rope_store(b: &CudaBackend, rng: &mut Rng, push: &mut Push<'_>, format: KvFormat) {
    let (rows, heads, kvh, hd, bs) = (5, 4, 2, 128, 16);
    let layout = KvLayout {
        layers: 2,
        kv_heads: kvh,
        head_dim: hd,
        block_size: bs,
        num_blocks: 3,
        format,
    };
    let cfg = RopeConfig {
        theta: 10_000.0,
        layout: RopeLayout::Halves,
        freq_factors: None,
    };
    let Ok(mut kv) = b.alloc_kv(&layout, &test_rotation(&layout, &cfg)) else {
        return push("rope_store alloc".into(), vec![], vec![0.0], 0.0);
    };
    let positions: Vec<u32> = (0..rows).map(|_| rng.below(3000) as u32).collect();
    // Rows land in block 2, slots 3..8.
    let slots: Vec<u32> = (0..rows as u32).map(|i| 2 * bs as u32 + 3 + i).collect();
    let batch = BatchLayout {
        tokens: vec![0; rows],
        positions: positions.clone(),
        slots: slots.clone(),
        ..Default::default()
    };
    let (q, k, v) = (
        random(rng, rows * heads * hd, 1.0),
        random(rng, rows * kvh * hd, 1.0),
        random(rng, rows * kvh * hd, 1.0),
    );
    let plan = b.plan(&batch, &cfg, hd, Some(&mut kv));
    let (mut qt, mut kt, vt) = (
        b.tensor(rows, heads * hd, &q),
        b.tensor(rows, kvh * hd, &k),
        b.tensor(rows, kvh * hd, &v),
    );
    b.rope_store_kv(&mut qt, &mut kt, &vt, heads, kvh, &mut kv, 1, &plan);
    let rotate = |x: &[f32], nh: usize| rope_reference(x, nh, hd, &positions, &cfg);
    push(
        format!("rope_store q hd{hd} ({format:?} cache)"),
        b.to_host(&qt),
        rotate(&q, heads),
        1e-3,
    );
    let (kc, vc) = b.read_kv_block(&kv, 1, 2);
    let (mut got_k, mut got_v) = (Vec::new(), Vec::new());
    for r in 0..rows {
        for h in 0..kvh {
            let at = (h * bs + 3 + r) * hd;
            got_k.extend_from_slice(&kc[at..at + hd]);
            got_v.extend_from_slice(&vc[at..at + hd]);
        }
    }
    // f16 rounds each value by about 3e-4 relative; int8 by up to half a step of max|x| / 127 per vector. int4's
    // steps are coarse (a 32-dim group's range / 15) and fp8's relative (1/16), so their reference is the host's own
    // quantization of the exact values: the kernel must reach the same codes (a value on a rounding boundary may
    // land one code off).
    let tol = if format == KvFormat::Int8 { 1e-2 } else { 2e-3 };
    // (int4 keys are stored turned: the reference turns them, quantizes, and turns the decoded values back, as
    // the read-back does.)
    let stored = |exact: Vec<f64>, keys: bool| -> (Vec<f64>, f64) {
        let mut x: Vec<f32> = exact.iter().map(|&e| e as f32).collect();
        let mut out = vec![0f32; x.len()];
        let turn = keys && format.turns_keys();
        match format {
            KvFormat::Int4 => {
                let pp = 2 * hd.div_ceil(crate::kv::INT4_GROUP);
                if turn {
                    crate::kv::codec::spread::turn_all(&mut x, hd);
                }
                for (xv, ov) in x.chunks(hd).zip(out.chunks_mut(hd)) {
                    let (mut q, mut p) = (vec![0u8; hd / 2], vec![half::f16::ZERO; pp]);
                    crate::kv::quant::quantize_int4(xv, &mut q, &mut p);
                    crate::kv::quant::dequantize_int4(&q, &p, ov);
                }
                if turn {
                    crate::kv::codec::spread::turn_all(&mut out, hd);
                }
            }
            // kivi2 keys wait exact in their open block (rows land mid-block).
            KvFormat::Kivi2 if keys => return (exact, tol),
            KvFormat::Kivi2 => return (super::kivi2_check::stored_values(&x, hd), 1e-2),
            KvFormat::Fp8 => {
                let code = crate::kv::ByteCode::Fp8;
                for (xv, ov) in x.chunks(hd).zip(out.chunks_mut(hd)) {
                    let mut q = vec![0u8; hd];
                    let s = code.quantize(xv, &mut q);
                    code.dequantize(&q, s, ov);
                }
            }
            _ => return (exact, tol),
        }
        (out.into_iter().map(f64::from).collect(), 1e-2)
    };
    let (want_k, tol_k) = stored(rotate(&k, kvh), true);
    push(
        format!("rope_store cached K hd{hd} {format:?}"),
        got_k,
        want_k,
        tol_k,
    );
    let (want_v, tol_v) = stored(v.iter().map(|&x| x as f64).collect(), false);
    push(
        format!("rope_store cached V hd{hd} {format:?}"),
        got_v,
        want_v,
        tol_v,
    );
}

fn argmax(b: &CudaBackend, rng: &mut Rng, push: &mut Push<'_>) {
    let (rows, cols) = (3, 128_256);
    let mut x = random(rng, rows * cols, 1.0);
    // A clear winner in row 0, a tie in row 1 (the lower index wins), the last column in row 2.
    let winners = [rng.below(cols), 77, cols - 1];
    x[winners[0]] = 5.0;
    x[cols + 77] = 5.0;
    x[cols + 90_000] = 5.0;
    x[2 * cols + cols - 1] = 5.0;
    let xt = b.tensor(rows, cols, &x);
    let got: Vec<f32> = b.argmax_rows(&xt, cols).iter().map(|&i| i as f32).collect();
    let want = winners.iter().map(|&w| w as f64).collect();
    push(format!("argmax {rows}x{cols}"), got, want, 0.0);
}

/// The key rotation within a block of a store whose keys are turned by `rope` (the frame kivi2 quantizes them in).
pub(super) fn test_rotation(layout: &KvLayout, rope: &RopeConfig) -> crate::kv::codec::KeyRotation {
    crate::kv::codec::KeyRotation::new(rope, layout.head_dim, layout.block_size)
}
