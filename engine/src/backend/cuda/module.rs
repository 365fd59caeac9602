//! The kernels (`kernels.cu`, CUDA C) compiled with NVRTC for the GPU's architecture at start-up, and cached on
//! disk under `~/.cache/tandem/cuda/` keyed by a hash of the source and the architecture, so only the first start on
//! a machine pays the compile.

use crate::error::{EngineError, Result};
use crate::kv::KvFormat;
use cudarc::driver::{CudaContext, CudaFunction};
use cudarc::nvrtc::{CompileOptions, Ptx};
use std::collections::HashMap;
use std::sync::Arc;

/// Every cache format the kernels read and write, with the suffix of its kernels' names.
const FORMATS: [(KvFormat, &str); 5] = [
    (KvFormat::F32, "f32"),
    (KvFormat::F16, "f16"),
    (KvFormat::Int8, "i8"),
    (KvFormat::Fp8, "f8"),
    (KvFormat::Int4, "i4"),
];

/// `kernels.cu`, then the other files in name order (`scripts/check-kernels.sh` compiles them alike): each uses only
/// what comes before it.
const SOURCE: &str = concat!(
    include_str!("kernels.cu"),
    include_str!("attention_common.cu"),
    include_str!("decode_attention.cu"),
    include_str!("kivi2.cu"),
    include_str!("kivi2_attention.cu"),
    include_str!("prefill_attention.cu"),
    include_str!("sample.cu"),
    include_str!("transfer.cu")
);

/// Every kernel of [`SOURCE`], loaded.
pub struct Kernels {
    pub embed_bf16: CudaFunction,
    pub rms_norm: CudaFunction,
    pub add_rms_norm: CudaFunction,
    pub to_bf16: CudaFunction,
    pub add_bias: CudaFunction,
    pub add: CudaFunction,
    pub silu_mul: CudaFunction,
    pub rope: CudaFunction,
    /// The cache write, by cache format.
    pub store_kv: HashMap<KvFormat, CudaFunction>,
    /// RoPE on Q and K plus the cache write, by cache format.
    pub rope_store: HashMap<KvFormat, CudaFunction>,
    /// Decode attention kernels by (cache format, head_dim).
    pub attention: HashMap<(KvFormat, usize), CudaFunction>,
    /// How many blocks of each decode attention kernel one SM holds at once (the occupancy calculator's answer for
    /// its registers and shared memory), by the same key.
    pub attention_per_sm: HashMap<(KvFormat, usize), usize>,
    /// Prefill (tiled, tensor-core) attention kernels by (cache format, head_dim).
    pub prefill_attention: HashMap<(KvFormat, usize), CudaFunction>,
    pub gather_rows: CudaFunction,
    /// `gemv_bf16_r{R}` for R = 1..=8 input rows, at index R - 1.
    pub gemv: Vec<CudaFunction>,
    /// The one-row GEMV's two builds, `gemv_bf16_r1` and `gemv_bf16_r1_bounded` (64 registers), each with how many
    /// of its 256-thread blocks one SM holds at once; [`fuller_last_wave`] picks one per product.
    pub gemv_one_row: [(CudaFunction, usize); 2],
    /// `gemv_swiglu_r{R}`, likewise.
    pub gemv_swiglu: Vec<CudaFunction>,
    pub argmax_rows: CudaFunction,
    pub sample_rows: CudaFunction,
    /// The kivi2 cache's write (without and with RoPE), seal and attention (by head_dim) kernels, and how many
    /// attention blocks one SM holds.
    pub store_kv_k2: CudaFunction,
    pub rope_store_k2: CudaFunction,
    pub seal_k2: CudaFunction,
    pub attention_k2: HashMap<usize, CudaFunction>,
    /// The tiled prefill kernel over a kivi2 cache (by head_dim), for steps with prefill rows.
    pub prefill_attention_k2: HashMap<usize, CudaFunction>,
    pub attention_k2_per_sm: HashMap<usize, usize>,
    /// Whole blocks of one store plane to or from a staging buffer (GPU-to-GPU transfer).
    pub kv_blocks_copy: CudaFunction,
}

/// Head dimensions the attention kernels are compiled for.
pub const HEAD_DIMS: [usize; 2] = [64, 128];

/// Query rows per prefill attention tile (`PF_BQ` in the kernels).
pub const PREFILL_TILE_ROWS: usize = 64;

/// Dynamic shared memory of one prefill attention block: two buffers of a 64-key K tile and V tile in f16, rows
/// padded by 8 halves (`prefill_attention_impl`).
pub fn prefill_shared_bytes(head_dim: usize) -> usize {
    2 * 2 * 64 * (head_dim + 8) * 2
}

/// The kivi2 build of the prefill kernel also stages the next tile's four block heads as they lie (`k2_raw_bytes`:
/// key and value codes, 4 x head_dim bytes each, the keys' (min, scale) per channel, 4 x head_dim, and the values'
/// per token and group, 2 x head_dim).
pub fn prefill_shared_bytes_k2(head_dim: usize) -> usize {
    prefill_shared_bytes(head_dim) + 64 / 16 * 14 * head_dim
}

/// Warps per decode attention block (`DA_WARPS` in the kernels).
pub const DECODE_WARPS: usize = 4;

/// How one decode attention warp stages its 16-key tiles: (stages in its ring, bytes per stage). A stage holds the
/// tile's K and V rows in the cache's own format, plus for int8 the words holding each row's scale and a mask word
/// (`Stage` in decode_attention.cu), for int4 each row's (min, scale) pairs. The ring is three stages deep: enough
/// bytes in flight per warp to keep HBM busy with two blocks per SM (f16), and for int8 small enough that four
/// blocks fit (its warps have more arithmetic per byte, and more of them hide its latency); int4's tiles are small
/// enough for four stages with four blocks per SM (its kernel is register-bounded for four; a fifth stage measured
/// no faster on an H200). The kernel holds the same depths as compile-time constants (`Group<T>::STAGES`), so that
/// its ring slots turn without dividing: the two must change together.
pub fn decode_stages(format: KvFormat, head_dim: usize) -> (usize, usize) {
    let tile = 16;
    match format {
        KvFormat::F32 => (3, 2 * tile * 4 * head_dim),
        KvFormat::F16 => (3, 2 * tile * 2 * head_dim),
        KvFormat::Int8 | KvFormat::Fp8 => (3, 2 * tile * head_dim + 2 * tile * 4 + 16),
        KvFormat::Int4 => (4, 2 * tile * head_dim / 2 + 2 * tile * head_dim / 32 * 4),
        // kivi2 has a kernel of its own (`kivi2_attention.cu`), whose rings are static shared memory.
        KvFormat::Kivi2 => (0, 0),
    }
}

/// Dynamic shared memory of one decode attention block: every warp's ring (reused for the merge at the end).
pub fn decode_shared_bytes(format: KvFormat, head_dim: usize) -> usize {
    let (stages, bytes) = decode_stages(format, head_dim);
    DECODE_WARPS * stages * bytes
}

/// A driver error as a device error saying what was being done.
pub(super) fn dev(what: &str) -> impl Fn(cudarc::driver::DriverError) -> EngineError + '_ {
    move |e| EngineError::Device(format!("{what}: {e}"))
}

impl Kernels {
    pub fn load(ctx: &Arc<CudaContext>) -> Result<Self> {
        use cudarc::driver::sys::CUdevice_attribute as A;
        let major = ctx
            .attribute(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
            .map_err(dev("compute capability"))?;
        let minor = ctx
            .attribute(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)
            .map_err(dev("compute capability"))?;
        let arch = format!("sm_{major}{minor}");
        let ptx = cached_ptx(&arch)?;
        let module = ctx.load_module(ptx).map_err(dev("loading the kernels"))?;
        let f = |name: &str| {
            module
                .load_function(name)
                .map_err(|e| EngineError::Device(format!("kernel {name}: {e}")))
        };
        let attention = per_format(&f, "attention", decode_shared_bytes)?;
        let attention_k2: HashMap<usize, CudaFunction> = HEAD_DIMS
            .iter()
            .map(|&hd| Ok((hd, f(&format!("attention_k2_h{hd}"))?)))
            .collect::<Result<_>>()?;
        let attention_per_sm = attention
            .iter()
            .map(|(&(fmt, hd), func)| {
                let n = func
                    .occupancy_max_active_blocks_per_multiprocessor(
                        32 * DECODE_WARPS as u32,
                        decode_shared_bytes(fmt, hd),
                        None,
                    )
                    .map_err(dev("decode attention occupancy"))?;
                Ok(((fmt, hd), (n as usize).max(1)))
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            embed_bf16: f("embed_bf16")?,
            rms_norm: f("rms_norm")?,
            add_rms_norm: f("add_rms_norm")?,
            to_bf16: f("to_bf16")?,
            add_bias: f("add_bias")?,
            add: f("add")?,
            silu_mul: f("silu_mul")?,
            rope: f("rope")?,
            store_kv: FORMATS
                .iter()
                .map(|&(fmt, ty)| Ok((fmt, f(&format!("store_kv_{ty}"))?)))
                .collect::<Result<_>>()?,
            rope_store: FORMATS
                .iter()
                .map(|&(fmt, ty)| Ok((fmt, f(&format!("rope_store_{ty}"))?)))
                .collect::<Result<_>>()?,
            attention,
            attention_per_sm,
            prefill_attention: per_format(&f, "prefill_attention", |_, hd| {
                prefill_shared_bytes(hd)
            })?,
            gather_rows: f("gather_rows")?,
            gemv: (1..=8)
                .map(|r| f(&format!("gemv_bf16_r{r}")))
                .collect::<Result<_>>()?,
            gemv_one_row: [
                one_row(f("gemv_bf16_r1")?)?,
                one_row(f("gemv_bf16_r1_bounded")?)?,
            ],
            gemv_swiglu: (1..=8)
                .map(|r| f(&format!("gemv_swiglu_r{r}")))
                .collect::<Result<_>>()?,
            argmax_rows: f("argmax_rows")?,
            sample_rows: f("sample_rows")?,
            store_kv_k2: f("store_kv_k2")?,
            rope_store_k2: f("rope_store_k2")?,
            seal_k2: f("seal_k2")?,
            kv_blocks_copy: f("kv_blocks_copy")?,
            attention_k2_per_sm: attention_k2
                .iter()
                .map(|(&hd, func)| {
                    let n = func
                        .occupancy_max_active_blocks_per_multiprocessor(
                            32 * DECODE_WARPS as u32,
                            0,
                            None,
                        )
                        .map_err(dev("kivi2 attention occupancy"))?;
                    Ok((hd, (n as usize).max(1)))
                })
                .collect::<Result<_>>()?,
            attention_k2,
            prefill_attention_k2: HEAD_DIMS
                .iter()
                .map(|&hd| {
                    let func = f(&format!("prefill_attention_k2_h{hd}"))?;
                    Ok((hd, with_shared(func, prefill_shared_bytes_k2(hd))?))
                })
                .collect::<Result<_>>()?,
        })
    }
}

/// Threads per GEMV block (`gemv` in gemm.rs launches them so): eight warps, one weight row each.
pub const GEMV_THREADS: usize = 256;

/// A one-row GEMV build with how many of its blocks one SM holds (the occupancy calculator's answer).
fn one_row(func: CudaFunction) -> Result<(CudaFunction, usize)> {
    let n = func
        .occupancy_max_active_blocks_per_multiprocessor(GEMV_THREADS as u32, 0, None)
        .map_err(dev("GEMV occupancy"))?;
    Ok((func, (n as usize).max(1)))
}

/// Which of several builds of a kernel to launch for `blocks` equal blocks on `sms` SMs, given how many blocks of
/// each build one SM holds (`per_sm`): blocks run as whole waves of resident blocks, so the build whose last wave
/// is fullest wastes the least of the GPU (on a tie, the first).
pub fn fuller_last_wave(blocks: usize, sms: usize, per_sm: &[usize]) -> usize {
    let fill = |p: usize| {
        let resident = (p * sms).max(1);
        blocks as f64 / (blocks.div_ceil(resident).max(1) * resident) as f64
    };
    (0..per_sm.len()).fold(0, |best, i| {
        if fill(per_sm[i]) > fill(per_sm[best]) + 1e-9 {
            i
        } else {
            best
        }
    })
}

/// An attention kernel allowed `bytes` of dynamic shared memory.
fn with_shared(func: CudaFunction, bytes: usize) -> Result<CudaFunction> {
    func.set_attribute(
        cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        bytes as i32,
    )
    .map_err(dev("allowing an attention kernel its shared memory"))?;
    Ok(func)
}

/// `{name}_{format}_h{head_dim}` for every cache format and head dim, each allowed the dynamic shared memory
/// `shared` says it takes.
fn per_format(
    f: &impl Fn(&str) -> Result<CudaFunction>,
    name: &str,
    shared: impl Fn(KvFormat, usize) -> usize,
) -> Result<HashMap<(KvFormat, usize), CudaFunction>> {
    let mut m = HashMap::new();
    for (fmt, ty) in FORMATS {
        for hd in HEAD_DIMS {
            let func = f(&format!("{name}_{ty}_h{hd}"))?;
            m.insert((fmt, hd), with_shared(func, shared(fmt, hd))?);
        }
    }
    Ok(m)
}

/// The PTX for `arch`, from the disk cache or freshly compiled (and then cached; a cache that cannot be written is
/// only a slower next start).
fn cached_ptx(arch: &str) -> Result<Ptx> {
    let key = xxhash_rust::xxh3::xxh3_64(format!("{arch}\n{SOURCE}").as_bytes());
    let dir = std::env::var_os("HOME")
        .map(|h| std::path::PathBuf::from(h).join(".cache/tandem/cuda"))
        .unwrap_or_else(|| std::env::temp_dir().join("tandem-cuda"));
    let path = dir.join(format!("kernels-{arch}-{key:016x}.ptx"));
    if let Ok(src) = std::fs::read_to_string(&path) {
        return Ok(Ptx::from_src(src));
    }
    let started = std::time::Instant::now();
    let include = ["/usr/local/cuda/include", "/usr/include"]
        .into_iter()
        .filter(|p| std::path::Path::new(p).join("cuda_bf16.h").exists())
        .map(String::from)
        .collect();
    let opts = CompileOptions {
        arch: Some(Box::leak(arch.to_string().into_boxed_str())),
        include_paths: include,
        options: vec!["--std=c++17".into(), "-default-device".into()],
        ..Default::default()
    };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(SOURCE, opts).map_err(|e| {
        EngineError::Device(format!("compiling the CUDA kernels for {arch}: {e:?}"))
    })?;
    tracing::info!(
        arch,
        ms = started.elapsed().as_millis() as u64,
        "compiled the CUDA kernels"
    );
    if std::fs::create_dir_all(&dir).is_ok() {
        let _ = std::fs::write(&path, ptx.to_src());
    }
    Ok(ptx)
}

#[cfg(test)]
mod tests {
    use super::fuller_last_wave;

    #[test]
    fn the_build_with_the_fuller_last_wave_is_chosen() {
        // Llama-3.1-8B on 132 SMs, 8 rows a block: 4096 rows = 512 blocks fill one wave of four per SM (97%) but
        // 1.29 waves of three (65%); 6144 rows = 768 blocks fill 1.94 waves of three (97%), 1.45 of four (73%).
        assert_eq!(fuller_last_wave(512, 132, &[3, 4]), 1);
        assert_eq!(fuller_last_wave(768, 132, &[3, 4]), 0);
        // Many waves either way: the tail matters little, and the fuller one still wins (14336 rows: 1792 blocks
        // are 4.53 waves of three, 91%; 3.39 of four, 85%).
        assert_eq!(fuller_last_wave(1792, 132, &[3, 4]), 0);
        // Less than one wave of either: the same time both ways, and the build with fewer places counts fuller.
        assert_eq!(fuller_last_wave(10, 132, &[3, 4]), 0);
        assert_eq!(fuller_last_wave(10, 132, &[4, 3]), 1);
    }

    /// Every `.cu` file next to this one is part of the source NVRTC compiles (a file left out of `SOURCE` would
    /// only show as a missing kernel on a GPU host).
    #[test]
    fn every_kernel_file_is_compiled() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/backend/cuda");
        let mut files = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "cu") {
                let text = std::fs::read_to_string(&path).unwrap();
                assert!(
                    super::SOURCE.contains(&text),
                    "{} is not part of the compiled kernels",
                    path.display()
                );
                files += 1;
            }
        }
        assert!(
            files >= 3,
            "found only {files} kernel files in {}",
            dir.display()
        );
    }
}
