//! The paged KV store in GPU memory: K and V of every layer, laid out `[layer][block][kv_head][slot][dim]`, in f32,
//! f16 (IEEE half, kept as raw bits), int8 or fp8 with one f16 scale per vector (the host's rules,
//! [`crate::kv::ByteCode`]), or int4 with two dims per byte and an f16 (min, scale) per 32 dims
//! ([`crate::kv::quant::quantize_int4`]); scales and pairs laid out like the vectors. Whole blocks cross to and from
//! the host here (for transfer and tests); the kernels read and write the store in place. kivi2 has a store of its
//! own ([`super::kivi2`]).

use super::CudaBackend;
use super::kivi2::Kivi2Store;
use crate::error::{EngineError, Result};
use crate::kv::{ByteCode, KvFormat, KvLayout};
use cudarc::driver::{CudaSlice, CudaStream};

pub(super) enum KvBufs {
    F32 {
        k: CudaSlice<f32>,
        v: CudaSlice<f32>,
    },
    /// IEEE half, as raw bits.
    F16 {
        k: CudaSlice<u16>,
        v: CudaSlice<u16>,
    },
    /// int8 or fp8 codes and one f16 scale (raw bits) per vector.
    Bytes {
        code: ByteCode,
        k: CudaSlice<u8>,
        v: CudaSlice<u8>,
        ks: CudaSlice<u16>,
        vs: CudaSlice<u16>,
    },
    /// Asymmetric int4 codes (two per byte) and an f16 (min, scale) per 32 dims (raw bits), per vector.
    Int4 {
        k: CudaSlice<u8>,
        v: CudaSlice<u8>,
        kp: CudaSlice<u16>,
        vp: CudaSlice<u16>,
    },
    /// 2-bit keys per channel over each block, 2-bit values per token, and the open blocks' keys.
    Kivi2(Box<Kivi2Store>),
}

impl KvBufs {
    /// Passes the K and V buffers and their scales or (min, scale) pairs (null for f32 and f16) to a kernel launch.
    pub(super) fn push_args<'a>(&'a self, b: &mut cudarc::driver::LaunchArgs<'a>) {
        use cudarc::driver::PushKernelArg;
        static NULL: u64 = 0;
        match self {
            KvBufs::F32 { k, v } => b.arg(k).arg(v).arg(&NULL).arg(&NULL),
            KvBufs::F16 { k, v } => b.arg(k).arg(v).arg(&NULL).arg(&NULL),
            KvBufs::Bytes { k, v, ks, vs, .. } => b.arg(k).arg(v).arg(ks).arg(vs),
            KvBufs::Int4 { k, v, kp, vp } => b.arg(k).arg(v).arg(kp).arg(vp),
            KvBufs::Kivi2(s) => b.arg(&s.k).arg(&s.v).arg(&s.kp).arg(&s.vp),
        };
    }
}

pub struct CudaKvStore {
    pub(super) layout: KvLayout,
    pub(super) bufs: KvBufs,
}

impl CudaKvStore {
    pub(super) fn alloc(
        stream: &std::sync::Arc<CudaStream>,
        layout: &KvLayout,
        keys: &crate::kv::codec::KeyRotation,
    ) -> Result<Self> {
        let n = layout.layers * layout.num_blocks * layout.block_elems();
        let dev = |e: cudarc::driver::DriverError| {
            EngineError::Device(format!("allocating the KV cache ({n} elements x2): {e}"))
        };
        let bufs = match layout.format {
            KvFormat::F32 => KvBufs::F32 {
                k: stream.alloc_zeros(n).map_err(dev)?,
                v: stream.alloc_zeros(n).map_err(dev)?,
            },
            KvFormat::F16 => KvBufs::F16 {
                k: stream.alloc_zeros(n).map_err(dev)?,
                v: stream.alloc_zeros(n).map_err(dev)?,
            },
            KvFormat::Int8 | KvFormat::Fp8 => KvBufs::Bytes {
                code: layout.format.byte_code().expect("a byte format"),
                k: stream.alloc_zeros(n).map_err(dev)?,
                v: stream.alloc_zeros(n).map_err(dev)?,
                ks: stream.alloc_zeros(n / layout.head_dim).map_err(dev)?,
                vs: stream.alloc_zeros(n / layout.head_dim).map_err(dev)?,
            },
            KvFormat::Int4 => {
                let pairs = n / layout.head_dim * Self::int4_params(layout.head_dim);
                KvBufs::Int4 {
                    k: stream.alloc_zeros(n / 2).map_err(dev)?,
                    v: stream.alloc_zeros(n / 2).map_err(dev)?,
                    kp: stream.alloc_zeros(pairs).map_err(dev)?,
                    vp: stream.alloc_zeros(pairs).map_err(dev)?,
                }
            }
            KvFormat::Kivi2 => KvBufs::Kivi2(Box::new(Kivi2Store::alloc(stream, layout, keys)?)),
        };
        Ok(Self {
            layout: *layout,
            bufs,
        })
    }

    /// Halves of one int4 vector's (min, scale) pairs. The kernels take head_dim 64 or 128, so whole groups.
    pub(super) fn int4_params(head_dim: usize) -> usize {
        2 * head_dim.div_ceil(crate::kv::INT4_GROUP)
    }

    /// Elements of one layer (K or V).
    pub(super) fn layer_elems(&self) -> usize {
        self.layout.num_blocks * self.layout.block_elems()
    }

    /// Where `block` of `layer` starts, in elements, and its length.
    fn block_range(&self, layer: usize, block: u32) -> std::ops::Range<usize> {
        let n = self.layout.block_elems();
        let at = layer * self.layer_elems() + block as usize * n;
        at..at + n
    }

    pub(super) fn read_block(
        &self,
        b: &CudaBackend,
        layer: usize,
        block: u32,
    ) -> (Vec<f32>, Vec<f32>) {
        let range = self.block_range(layer, block);
        let what = "reading a KV block";
        match &self.bufs {
            KvBufs::Kivi2(s) => s.read_block(b, layer, block),
            KvBufs::F32 { k, v } => {
                let read = |c: &CudaSlice<f32>| {
                    let mut out = vec![0f32; range.len()];
                    b.ok(
                        what,
                        b.stream.memcpy_dtoh(&c.slice(range.clone()), &mut out),
                    );
                    out
                };
                (read(k), read(v))
            }
            KvBufs::F16 { k, v } => {
                let read = |c: &CudaSlice<u16>| {
                    let mut bits = vec![0u16; range.len()];
                    b.ok(
                        what,
                        b.stream.memcpy_dtoh(&c.slice(range.clone()), &mut bits),
                    );
                    decode_f16(&bits)
                };
                (read(k), read(v))
            }
            KvBufs::Bytes { code, k, v, ks, vs } => {
                let hd = self.layout.head_dim;
                let vecs = range.start / hd..range.end / hd;
                let read = |c: &CudaSlice<u8>, sc: &CudaSlice<u16>| {
                    let mut q = vec![0u8; range.len()];
                    let mut bits = vec![0u16; vecs.len()];
                    b.ok(what, b.stream.memcpy_dtoh(&c.slice(range.clone()), &mut q));
                    b.ok(
                        what,
                        b.stream.memcpy_dtoh(&sc.slice(vecs.clone()), &mut bits),
                    );
                    decode_bytes(*code, &q, &bits, hd)
                };
                (read(k, ks), read(v, vs))
            }
            KvBufs::Int4 { k, v, kp, vp } => {
                let hd = self.layout.head_dim;
                let pp = Self::int4_params(hd);
                let vecs = range.start / hd * pp..range.end / hd * pp;
                let read = |c: &CudaSlice<u8>, pc: &CudaSlice<u16>, keys: bool| {
                    let (q, params) =
                        codes_to_host(b, what, c, range.start / 2..range.end / 2, pc, vecs.clone());
                    decode_int4(&q, &params, hd, keys)
                };
                (read(k, kp, true), read(v, vp, false))
            }
        }
    }

    pub(super) fn write_block(
        &mut self,
        b: &CudaBackend,
        layer: usize,
        block: u32,
        k: &[f32],
        v: &[f32],
    ) {
        let range = self.block_range(layer, block);
        let what = "writing a KV block";
        match &mut self.bufs {
            KvBufs::Kivi2(s) => s.write_block(b, layer, block, k, v),
            KvBufs::F32 { k: kc, v: vc } => {
                for (c, x) in [(kc, k), (vc, v)] {
                    b.ok(
                        what,
                        b.stream.memcpy_htod(x, &mut c.slice_mut(range.clone())),
                    );
                }
            }
            KvBufs::F16 { k: kc, v: vc } => {
                for (c, x) in [(kc, k), (vc, v)] {
                    b.ok(
                        what,
                        b.stream
                            .memcpy_htod(&encode_f16(x), &mut c.slice_mut(range.clone())),
                    );
                }
            }
            KvBufs::Bytes {
                code,
                k: kc,
                v: vc,
                ks,
                vs,
            } => {
                let hd = self.layout.head_dim;
                let vecs = range.start / hd..range.end / hd;
                for ((c, sc), x) in [(kc, ks), (vc, vs)].into_iter().zip([k, v]) {
                    let (q, bits) = encode_bytes(*code, x, hd);
                    b.ok(
                        what,
                        b.stream.memcpy_htod(&q, &mut c.slice_mut(range.clone())),
                    );
                    b.ok(
                        what,
                        b.stream.memcpy_htod(&bits, &mut sc.slice_mut(vecs.clone())),
                    );
                }
            }
            KvBufs::Int4 {
                k: kc,
                v: vc,
                kp,
                vp,
            } => {
                let hd = self.layout.head_dim;
                let pp = Self::int4_params(hd);
                let vecs = range.start / hd * pp..range.end / hd * pp;
                for ((c, pc), (x, keys)) in [(kc, kp), (vc, vp)]
                    .into_iter()
                    .zip([(k, true), (v, false)])
                {
                    let (q, params) = encode_int4(x, hd, keys);
                    codes_to_device(b, what, &q, c, range.start / 2, &params, pc, vecs.start);
                }
            }
        }
    }
}

/// One block's K or V as f16 bits.
pub(super) fn encode_f16(x: &[f32]) -> Vec<u16> {
    x.iter()
        .map(|&f| half::f16::from_f32(f).to_bits())
        .collect()
}

/// One block's K or V as int8 or fp8 codes and one f16 scale (bits) per vector of `hd` (the host's rule).
pub(super) fn encode_bytes(code: ByteCode, x: &[f32], hd: usize) -> (Vec<u8>, Vec<u16>) {
    let mut q = vec![0u8; x.len()];
    let bits = x
        .chunks(hd)
        .zip(q.chunks_mut(hd))
        .map(|(xv, qv)| code.quantize(xv, qv).to_bits())
        .collect();
    (q, bits)
}

/// One block's K or V as int4 codes and (min, scale) pairs per vector of `hd`; keys are stored turned, as the store
/// kernel writes them.
pub(super) fn encode_int4(x: &[f32], hd: usize, keys: bool) -> (Vec<u8>, Vec<half::f16>) {
    let pp = CudaKvStore::int4_params(hd);
    let mut turned;
    let x = if keys {
        turned = x.to_vec();
        crate::kv::codec::spread::turn_all(&mut turned, hd);
        &turned[..]
    } else {
        x
    };
    let mut q = vec![0u8; x.len() / 2];
    let mut params = vec![half::f16::ZERO; x.len() / hd * pp];
    for ((xv, qv), pv) in x
        .chunks(hd)
        .zip(q.chunks_mut(hd / 2))
        .zip(params.chunks_mut(pp))
    {
        crate::kv::quant::quantize_int4(xv, qv, pv);
    }
    (q, params)
}

/// One block's K or V in f16 bits, as f32.
pub(super) fn decode_f16(bits: &[u16]) -> Vec<f32> {
    bits.iter()
        .map(|&x| half::f16::from_bits(x).to_f32())
        .collect()
}

/// One block's K or V as int8 or fp8 codes with one f16 scale (bits) per vector of `hd`, as f32.
pub(super) fn decode_bytes(code: ByteCode, q: &[u8], scales: &[u16], hd: usize) -> Vec<f32> {
    let mut out = vec![0f32; q.len()];
    for ((o, qv), &s) in out.chunks_mut(hd).zip(q.chunks(hd)).zip(scales) {
        code.dequantize(qv, half::f16::from_bits(s), o);
    }
    out
}

/// One block's K or V as int4 codes (two per byte) with an f16 (min, scale) per 32 dims of each vector of `hd`, as
/// f32; keys are stored turned (`KvFormat::turns_keys`) and are turned back for whoever reads them.
pub(super) fn decode_int4(q: &[u8], params: &[half::f16], hd: usize, keys: bool) -> Vec<f32> {
    let pp = CudaKvStore::int4_params(hd);
    let mut out = vec![0f32; q.len() * 2];
    for ((o, qv), pv) in out
        .chunks_mut(hd)
        .zip(q.chunks(hd / 2))
        .zip(params.chunks(pp))
    {
        crate::kv::quant::dequantize_int4(qv, pv, o);
    }
    if keys {
        crate::kv::codec::spread::turn_all(&mut out, hd);
    }
    out
}

/// Codes `codes[cr]` and their f16 parameters `params[pr]` (kept as raw bits), copied to the host.
pub(super) fn codes_to_host(
    b: &CudaBackend,
    what: &str,
    codes: &CudaSlice<u8>,
    cr: std::ops::Range<usize>,
    params: &CudaSlice<u16>,
    pr: std::ops::Range<usize>,
) -> (Vec<u8>, Vec<half::f16>) {
    let mut q = vec![0u8; cr.len()];
    let mut bits = vec![0u16; pr.len()];
    b.ok(what, b.stream.memcpy_dtoh(&codes.slice(cr), &mut q));
    b.ok(what, b.stream.memcpy_dtoh(&params.slice(pr), &mut bits));
    (q, bits.into_iter().map(half::f16::from_bits).collect())
}

/// Host codes and their f16 parameters into the device buffers, from element `at` and `params_at` on.
#[allow(clippy::too_many_arguments)]
pub(super) fn codes_to_device(
    b: &CudaBackend,
    what: &str,
    q: &[u8],
    codes: &mut CudaSlice<u8>,
    at: usize,
    p: &[half::f16],
    params: &mut CudaSlice<u16>,
    params_at: usize,
) {
    let bits: Vec<u16> = p.iter().map(|x| x.to_bits()).collect();
    b.ok(
        what,
        b.stream
            .memcpy_htod(q, &mut codes.slice_mut(at..at + q.len())),
    );
    b.ok(
        what,
        b.stream.memcpy_htod(
            &bits,
            &mut params.slice_mut(params_at..params_at + bits.len()),
        ),
    );
}
