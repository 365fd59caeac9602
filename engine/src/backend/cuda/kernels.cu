// Tandem's CUDA kernels, compiled at start-up with NVRTC (see cuda/module.rs). Activations are f32 row-major;
// weights bf16; the paged KV store is f32, f16 or int8 (plus a scale per vector), laid out
// [layer][block][kv_head][slot][dim] for K and for V.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

typedef unsigned int u32;
#define NEG_INF __int_as_float(0xff800000)

// Programmatic dependent launch (sm_90 and later; no-ops before): `wait_prior` blocks until the kernels ahead in the
// stream have finished and their writes are visible (a kernel launched early must call it before reading their
// output); `allow_next` lets a kernel launched early behind this one start now (it still waits for this one).
__device__ __forceinline__ void wait_prior() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void allow_next() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;\n" :::);
#endif
}

extern "C" __global__ void embed_bf16(const __nv_bfloat16* table, const u32* tokens, float* out, int cols) {
    const int r = blockIdx.x;
    const __nv_bfloat16* src = table + (size_t)tokens[r] * cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) out[(size_t)r * cols + c] = __bfloat162float(src[c]);
}

__device__ float block_sum(float v, float* shared) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    const int warps = (blockDim.x + 31) >> 5;
    v = lane < warps ? shared[lane] : 0.f;
    if (warp == 0)
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    if (threadIdx.x == 0) shared[0] = v;
    __syncthreads();
    const float total = shared[0];
    __syncthreads();
    return total;
}

// Four f32 values and, where a GEMM will read them (`ob` not null), their bf16 copy.
__device__ __forceinline__ void put4(float4* o, __nv_bfloat16* ob, int c, float4 v) {
    o[c] = v;
    if (ob) {
        __nv_bfloat162* b = reinterpret_cast<__nv_bfloat162*>(ob) + 2 * c;
        b[0] = __floats2bfloat162_rn(v.x, v.y);
        b[1] = __floats2bfloat162_rn(v.z, v.w);
    }
}

// Kernels whose output feeds a cuBLAS GEMM take an optional `ob` (null when not wanted): a bf16 copy of the output,
// written in the same pass so that the GEMM needs no separate conversion.

// One block per row: out = x / rms(x) * w. Rows whose width is a multiple of 4 move in 16-byte loads.
extern "C" __global__ void rms_norm(const float* x, const float* w, float* out, int cols, float eps,
                                    __nv_bfloat16* ob) {
    allow_next();
    __shared__ float shared[32];
    const float* xr = x + (size_t)blockIdx.x * cols;
    float* o = out + (size_t)blockIdx.x * cols;
    if (ob) ob += (size_t)blockIdx.x * cols;
    float ss = 0.f;
    if ((cols & 3) == 0) {
        const float4* x4 = reinterpret_cast<const float4*>(xr);
        for (int c = threadIdx.x; c < cols / 4; c += blockDim.x) {
            const float4 v = x4[c];
            ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
        }
        const float scale = rsqrtf(block_sum(ss, shared) / cols + eps);
        const float4* w4 = reinterpret_cast<const float4*>(w);
        float4* o4 = reinterpret_cast<float4*>(o);
        for (int c = threadIdx.x; c < cols / 4; c += blockDim.x) {
            const float4 v = x4[c], g = w4[c];
            put4(o4, ob, c, make_float4(v.x * scale * g.x, v.y * scale * g.y, v.z * scale * g.z, v.w * scale * g.w));
        }
        return;
    }
    for (int c = threadIdx.x; c < cols; c += blockDim.x) ss += xr[c] * xr[c];
    const float scale = rsqrtf(block_sum(ss, shared) / cols + eps);
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        o[c] = xr[c] * scale * w[c];
        if (ob) ob[c] = __float2bfloat16(o[c]);
    }
}

// One block per row: x += y, then y = x / rms(x) * w (y is read before it is overwritten).
extern "C" __global__ void add_rms_norm(float* x, float* y, const float* w, int cols, float eps, __nv_bfloat16* ob) {
    allow_next();
    __shared__ float shared[32];
    float* xr = x + (size_t)blockIdx.x * cols;
    float* yr = y + (size_t)blockIdx.x * cols;
    if (ob) ob += (size_t)blockIdx.x * cols;
    float ss = 0.f;
    if ((cols & 3) == 0) {
        float4* x4 = reinterpret_cast<float4*>(xr);
        float4* y4 = reinterpret_cast<float4*>(yr);
        for (int c = threadIdx.x; c < cols / 4; c += blockDim.x) {
            const float4 a = x4[c], b = y4[c];
            const float4 v = make_float4(a.x + b.x, a.y + b.y, a.z + b.z, a.w + b.w);
            x4[c] = v;
            ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
        }
        const float scale = rsqrtf(block_sum(ss, shared) / cols + eps);
        const float4* w4 = reinterpret_cast<const float4*>(w);
        for (int c = threadIdx.x; c < cols / 4; c += blockDim.x) {
            const float4 v = x4[c], g = w4[c];
            put4(y4, ob, c, make_float4(v.x * scale * g.x, v.y * scale * g.y, v.z * scale * g.z, v.w * scale * g.w));
        }
        return;
    }
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float v = xr[c] + yr[c];
        xr[c] = v;
        ss += v * v;
    }
    const float scale = rsqrtf(block_sum(ss, shared) / cols + eps);
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        yr[c] = xr[c] * scale * w[c];
        if (ob) ob[c] = __float2bfloat16(yr[c]);
    }
}

// Elementwise kernels move 16 bytes per step (grid-stride over n / 4); the first threads take the n % 4 tail.
extern "C" __global__ void to_bf16(const float* x, __nv_bfloat16* y, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n / 4; i += (size_t)gridDim.x * blockDim.x) {
        const float4 v = reinterpret_cast<const float4*>(x)[i];
        __nv_bfloat162* o = reinterpret_cast<__nv_bfloat162*>(y + 4 * i);
        o[0] = __floats2bfloat162_rn(v.x, v.y);
        o[1] = __floats2bfloat162_rn(v.z, v.w);
    }
    // The tail (n % 4) by the first threads.
    const size_t t = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (t < n % 4) y[n / 4 * 4 + t] = __float2bfloat16(x[n / 4 * 4 + t]);
}

extern "C" __global__ void add_bias(float* x, const float* b, size_t n, int cols) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        x[i] += b[i % cols];
}

extern "C" __global__ void add(float* x, const float* y, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        x[i] += y[i];
}

__device__ __forceinline__ float silu(float v) { return v / (1.f + __expf(-v)); }

extern "C" __global__ void silu_mul(float* g, const float* u, size_t n, __nv_bfloat16* ob) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n / 4; i += (size_t)gridDim.x * blockDim.x) {
        float4 a = reinterpret_cast<float4*>(g)[i];
        const float4 b = reinterpret_cast<const float4*>(u)[i];
        a = make_float4(silu(a.x) * b.x, silu(a.y) * b.y, silu(a.z) * b.z, silu(a.w) * b.w);
        put4(reinterpret_cast<float4*>(g), ob, i, a);
    }
    const size_t t = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (t < n % 4) {
        const size_t i = n / 4 * 4 + t;
        g[i] = silu(g[i]) * u[i];
        if (ob) ob[i] = __float2bfloat16(g[i]);
    }
}

// The dims of RoPE pair i of a head vector: (2i, 2i + 1) when interleaved, else (i, i + half).
struct PairDims {
    int a, b;
};
__device__ __forceinline__ PairDims pair_dims(int i, int half, bool interleaved) {
    return interleaved ? PairDims{2 * i, 2 * i + 1} : PairDims{i, i + half};
}

// Turns pair i of the head vector x in place by the angle position x inv_freq[i] (sincosf at full precision, as the
// host computes it). The pair's dims (`pair_dims`) and new values come back.
struct RopePair {
    int a, b;
    float y0, y1;
};
__device__ __forceinline__ RopePair rope_pair(float* x, u32 position, const float* inv_freq, int i, int half,
                                              int interleaved) {
    const auto [a, b] = pair_dims(i, half, interleaved);
    float s, c;
    sincosf((float)position * inv_freq[i], &s, &c);
    const float x0 = x[a], x1 = x[b];
    const float y0 = x0 * c - x1 * s, y1 = x0 * s + x1 * c;
    x[a] = y0;
    x[b] = y1;
    return {a, b, y0, y1};
}

// Grid (rows, heads), half_dim threads: rotates each pair of a head by its row's angles.
extern "C" __global__ void rope(float* x, const u32* positions, const float* inv_freq, int heads, int head_dim,
                                int interleaved) {
    const int r = blockIdx.x, h = blockIdx.y, i = threadIdx.x, half = head_dim / 2;
    if (i >= half) return;
    rope_pair(x + ((size_t)r * heads + h) * head_dim, positions[r], inv_freq, i, half, interleaved);
}

// Cache element formats: f32, f16, and int8 with one f16 scale per vector (one token's K or V of one KV head:
// scale = f16(max |x| / 127), x ~ round(x / scale), the host's rule); fp8 and int4 below. Scale arrays are indexed
// by vector, i.e. by a vector's first element offset / head_dim; they are null for f32 and f16.
typedef signed char i8;

__device__ float block_max(float v, float* shared) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    const int warps = (blockDim.x + 31) >> 5;
    float m = 0.f;
    for (int w = 0; w < warps; w++) m = fmaxf(m, shared[w]);
    __syncthreads();
    return m;
}

// Writes one vector's elements a and b (each of the block's threads holds one pair; the whole block is the
// vector). `vec`: the vector's index for its scale.
template <typename T> __device__ __forceinline__ void store_pair(T* c, __half* sc, size_t base, size_t vec, int a, int b,
                                                                 float y0, float y1, float* red, bool turn);
template <> __device__ __forceinline__ void store_pair<float>(float* c, __half*, size_t base, size_t, int a, int b,
                                                              float y0, float y1, float*, bool) {
    c[base + a] = y0;
    c[base + b] = y1;
}
template <> __device__ __forceinline__ void store_pair<__half>(__half* c, __half*, size_t base, size_t, int a, int b,
                                                               float y0, float y1, float*, bool) {
    c[base + a] = __float2half(y0);
    c[base + b] = __float2half(y1);
}
template <> __device__ __forceinline__ void store_pair<i8>(i8* c, __half* sc, size_t base, size_t vec, int a, int b,
                                                           float y0, float y1, float* red, bool) {
    const float amax = block_max(fmaxf(fabsf(y0), fabsf(y1)), red);
    const __half s = __float2half(fminf(amax / 127.f, 65504.f));  // saturated, as the host's `f16_sat`
    const float sf = __half2float(s), inv = sf > 0.f ? 1.f / sf : 0.f;
    c[base + a] = (i8)fminf(fmaxf(roundf(y0 * inv), -127.f), 127.f);
    c[base + b] = (i8)fminf(fmaxf(roundf(y1 * inv), -127.f), 127.f);
    if (threadIdx.x == 0) sc[vec] = s;
}

// fp8: E4M3 codes under one f16 scale per vector (scale = f16(max |x| / 448), the host's `ByteCode::Fp8` rule),
// rounded as the host's `fp8::from_f32` rounds (to nearest even, saturating at 448), so both write the same bytes.
// `f8` only tags the format; addresses are computed in bytes.
struct f8 { unsigned char v; };
__device__ __forceinline__ unsigned char f32_to_e4m3(float x) {
    const u32 sign = (__float_as_uint(x) >> 24) & 0x80u;
    const float a = fabsf(x);
    if (!(a < 448.f)) return (unsigned char)(sign | (a != a ? 0x7fu : 0x7eu));
    if (a < 0.015625f) return (unsigned char)(sign | (u32)__float2int_rn(a * 512.f));  // subnormals, steps of 2^-9
    // Three mantissa bits kept, the 20 dropped rounded to nearest even; a carry into the exponent is the next code.
    const u32 bits = __float_as_uint(a), keep = (bits >> 20) & 7u, rest = bits & 0xfffffu;
    const u32 up = rest > 0x80000u || (rest == 0x80000u && (keep & 1u));
    return (unsigned char)(sign | ((((bits >> 23) - 120u) << 3) + keep + up));
}
template <> __device__ __forceinline__ void store_pair<f8>(f8* c, __half* sc, size_t base, size_t vec, int a, int b,
                                                           float y0, float y1, float* red, bool) {
    const float amax = block_max(fmaxf(fabsf(y0), fabsf(y1)), red);
    const __half s = __float2half(fminf(amax / 448.f, 65504.f));
    const float sf = __half2float(s), inv = sf > 0.f ? 1.f / sf : 0.f;
    unsigned char* p = reinterpret_cast<unsigned char*>(c);
    p[base + a] = f32_to_e4m3(y0 * inv);
    p[base + b] = f32_to_e4m3(y1 * inv);
    if (threadIdx.x == 0) sc[vec] = s;
}

// int4 (a byte holds two dims, the even one in the low nibble; per 32 dims an f16 min and scale, the host's
// `quant::quantize_int4` rule): the vector goes through shared memory, then each thread packs one byte from its
// group's min and max. `u4x2` only tags the format; addresses are computed in bytes. Keys (`turn`) are first turned
// by the orthonormal Walsh-Hadamard transform, as the host's `spread::turn` does (the same butterflies in the same
// order of spans, then the same scaling, so both reach the same values and codes): one butterfly per thread per span.
struct u4x2 { unsigned char v; };
template <> __device__ __forceinline__ void store_pair<u4x2>(u4x2* c, __half* sc, size_t base, size_t vec, int a, int b,
                                                             float y0, float y1, float*, bool turn) {
    __shared__ float vals[256];
    const int i = threadIdx.x, hd = 2 * blockDim.x;
    vals[a] = y0;
    vals[b] = y1;
    __syncthreads();
    if (turn) {
        for (int span = 1; span < hd; span <<= 1) {
            const int j = (i / span) * 2 * span + i % span;
            const float u = vals[j], w = vals[j + span];
            vals[j] = u + w;
            vals[j + span] = u - w;
            __syncthreads();
        }
        const float norm = __fdiv_rn(1.f, __fsqrt_rn((float)hd));
        vals[2 * i] *= norm;
        vals[2 * i + 1] *= norm;
        __syncthreads();
    }
    const int g = (2 * i) / 32, g0 = g * 32, g1 = min(g0 + 32, hd);
    float lo = vals[g0], hi = vals[g0];
    for (int d = g0 + 1; d < g1; d++) {
        lo = fminf(lo, vals[d]);
        hi = fmaxf(hi, vals[d]);
    }
    const __half mh = __float2half_rn(fminf(fmaxf(lo, -65504.f), 65504.f));
    const float mf = __half2float(mh);
    const __half sh = __float2half_rn(fminf(fmaxf((hi - mf) / 15.f, 0.f), 65504.f));
    const float sf = __half2float(sh), inv = sf > 0.f ? 1.f / sf : 0.f;
    const u32 q0 = (u32)fminf(fmaxf((vals[2 * i] - mf) * inv + 0.5f, 0.f), 15.f);
    const u32 q1 = (u32)fminf(fmaxf((vals[2 * i + 1] - mf) * inv + 0.5f, 0.f), 15.f);
    reinterpret_cast<unsigned char*>(c)[base / 2 + i] = (unsigned char)(q0 | (q1 << 4));
    if (2 * i == g0) {
        __half* p = sc + vec * (hd / 32) * 2 + 2 * g;
        p[0] = mh;
        p[1] = sh;
    }
    __syncthreads();
}

// Every cache format (element type, kernel-name suffix) and head dim the attention kernels are compiled for, as
// FORMATS and HEAD_DIMS in module.rs name them.
#define FOR_EACH_FORMAT_AND_HEAD_DIM(M) \
    M(float, f32, 64) M(float, f32, 128) M(__half, f16, 64) M(__half, f16, 128) M(i8, i8, 64) M(i8, i8, 128) \
    M(f8, f8, 64) M(f8, f8, 128) M(u4x2, i4, 64) M(u4x2, i4, 128)

// Grid (rows, kv_heads), head_dim / 2 threads: writes each row's K and V into its slot of one layer.
template <typename T>
__device__ void store_kv_impl(const float* k, const float* v, T* kc, T* vc, __half* ksc, __half* vsc, const u32* slots,
                              int kv_heads, int head_dim, int block_size, size_t layer_off) {
    __shared__ float red[32];
    const int r = blockIdx.x, h = blockIdx.y, i = threadIdx.x, half = head_dim / 2;
    const u32 slot = slots[r], block = slot / block_size, off = slot % block_size;
    const size_t dst = layer_off + (((size_t)block * kv_heads + h) * block_size + off) * head_dim;
    const float* kr = k + ((size_t)r * kv_heads + h) * head_dim;
    const float* vr = v + ((size_t)r * kv_heads + h) * head_dim;
    store_pair<T>(kc, ksc, dst, dst / head_dim, i, i + half, kr[i], kr[i + half], red, true);
    store_pair<T>(vc, vsc, dst, dst / head_dim, i, i + half, vr[i], vr[i + half], red, false);
}

// RoPE and the cache write in one pass. Grid (rows, heads + kv_heads), half_dim threads: blocks h < heads rotate
// query head h in place; the others rotate K head h - heads and write it, and the matching V head, into the row's
// slot of one layer (K stays rotated in `k` as well).
template <typename T>
__device__ void rope_store_impl(float* q, float* k, const float* v, T* kc, T* vc, __half* ksc, __half* vsc,
                                const u32* slots, const u32* positions, const float* inv_freq, int heads, int kv_heads,
                                int head_dim, int interleaved, int block_size, size_t layer_off) {
    __shared__ float red[32];
    const int r = blockIdx.x, h = blockIdx.y, i = threadIdx.x, half = head_dim / 2;
    const bool is_q = h < heads;
    const int hh = is_q ? h : h - heads;
    float* x = is_q ? q + ((size_t)r * heads + hh) * head_dim : k + ((size_t)r * kv_heads + hh) * head_dim;
    const auto [a, b, y0, y1] = rope_pair(x, positions[r], inv_freq, i, half, interleaved);
    if (is_q) return;
    const u32 slot = slots[r], block = slot / block_size, off = slot % block_size;
    const size_t dst = layer_off + (((size_t)block * kv_heads + hh) * block_size + off) * head_dim;
    const float* vr = v + ((size_t)r * kv_heads + hh) * head_dim;
    store_pair<T>(kc, ksc, dst, dst / head_dim, a, b, y0, y1, red, true);
    store_pair<T>(vc, vsc, dst, dst / head_dim, a, b, vr[a], vr[b], red, false);
}

#define STORE_KERNELS(TN, T)                                                                                    \
    extern "C" __global__ void store_kv_##TN(const float* k, const float* v, T* kc, T* vc, __half* ksc,          \
                                             __half* vsc, const u32* slots, int kv_heads, int head_dim,         \
                                             int block_size, size_t layer_off) {                                \
        store_kv_impl<T>(k, v, kc, vc, ksc, vsc, slots, kv_heads, head_dim, block_size, layer_off);             \
    }                                                                                                           \
    extern "C" __global__ void rope_store_##TN(float* q, float* k, const float* v, T* kc, T* vc, __half* ksc,    \
                                               __half* vsc, const u32* slots, const u32* positions,             \
                                               const float* inv_freq, int heads, int kv_heads, int head_dim,    \
                                               int interleaved, int block_size, size_t layer_off) {             \
        rope_store_impl<T>(q, k, v, kc, vc, ksc, vsc, slots, positions, inv_freq, heads, kv_heads, head_dim,    \
                           interleaved, block_size, layer_off);                                                 \
    }
STORE_KERNELS(f32, float)
STORE_KERNELS(f16, __half)
STORE_KERNELS(i8, i8)
STORE_KERNELS(f8, f8)
STORE_KERNELS(i4, u4x2)

// One block per output row: out[i] = x[rows[i]].
extern "C" __global__ void gather_rows(const float* x, float* out, const u32* rows, int cols) {
    const float* src = x + (size_t)rows[blockIdx.x] * cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) out[(size_t)blockIdx.x * cols + c] = src[c];
}

// Small-batch GEMM as R dot products per weight row: out[r][n] = sum_k x[r][k] * w[n][k], w bf16 (n x k), x and out
// f32. One warp per weight row reads it once in 16-byte loads (8 bf16) for all R input rows; k % 8 == 0. Decode at
// small batch is bound by reading the weights, and this reads each byte once at full width.
// Up to three weights sharing one input (Q/K/V, gate/up) run as one launch: warp `row` of the grid takes weight 0's
// rows first, then weight 1's, then weight 2's.
// acc[r] += the 8 weights packed in `packed` (columns 8c..8c+8) times row r of x.
template <int R>
__device__ __forceinline__ void gemv_step(const uint4 packed, const float* x, int k, int c, float* acc) {
    const __nv_bfloat162* p = reinterpret_cast<const __nv_bfloat162*>(&packed);
    float wf[8];
#pragma unroll
    for (int j = 0; j < 4; j++) {
        const float2 f = __bfloat1622float2(p[j]);
        wf[2 * j] = f.x;
        wf[2 * j + 1] = f.y;
    }
#pragma unroll
    for (int r = 0; r < R; r++) {
        const float4* xr = reinterpret_cast<const float4*>(x + (size_t)r * k) + 2 * c;
        const float4 a = xr[0], b = xr[1];
        acc[r] += wf[0] * a.x + wf[1] * a.y + wf[2] * a.z + wf[3] * a.w + wf[4] * b.x + wf[5] * b.y + wf[6] * b.z +
                  wf[7] * b.w;
    }
}

template <typename T> __device__ __forceinline__ T pick3(int i, T a, T b, T c) { return i == 0 ? a : i == 1 ? b : c; }
template <int R>
__device__ void gemv_impl(const __nv_bfloat16* w0, float* out0, int n0, const __nv_bfloat16* w1, float* out1, int n1,
                          const __nv_bfloat16* w2, float* out2, int n2, const float* x, int k) {
    const int lane = threadIdx.x & 31;
    // Which weight this warp's row is in; the output pointer is picked at the end from the parameters (in constant
    // memory), so that it holds no registers across the loop.
    int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), which = 0;
    if (row >= n0) {
        row -= n0;
        which = 1;
        if (row >= n1) {
            row -= n1;
            which = 2;
        }
    }
    const int n = pick3(which, n0, n1, n2);
    if (row >= n) return;
    const __nv_bfloat16* w = pick3(which, w0, w1, w2);
    const uint4* wr = reinterpret_cast<const uint4*>(w + (size_t)row * k);
    float acc[R];
#pragma unroll
    for (int r = 0; r < R; r++) acc[r] = 0.f;
    // Eight 16-byte loads in flight per lane, then four, then the remainder one at a time. The first eight read
    // only weights, so they go out before waiting for the kernel that writes x (when launched early).
    const int n8 = k / 8;
    int c = lane;
    uint4 packed[8];
    if (c + 224 < n8) {
#pragma unroll
        for (int u = 0; u < 8; u++) packed[u] = wr[c + 32 * u];
    }
    wait_prior();
    allow_next();
    for (; c + 224 < n8; c += 256) {
        if (c != lane) {
#pragma unroll
            for (int u = 0; u < 8; u++) packed[u] = wr[c + 32 * u];
        }
#pragma unroll
        for (int u = 0; u < 8; u++) gemv_step<R>(packed[u], x, k, c + 32 * u, acc);
    }
    for (; c + 96 < n8; c += 128) {
        uint4 packed[4];
#pragma unroll
        for (int u = 0; u < 4; u++) packed[u] = wr[c + 32 * u];
#pragma unroll
        for (int u = 0; u < 4; u++) gemv_step<R>(packed[u], x, k, c + 32 * u, acc);
    }
    for (; c < n8; c += 32) gemv_step<R>(wr[c], x, k, c, acc);
#pragma unroll
    for (int r = 0; r < R; r++) {
        float v = acc[r];
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
        if (lane == 0) pick3(which, out0, out1, out2)[(size_t)r * n + row] = v;
    }
}

// One input row comes in two builds: as the others (about 74 registers, three resident 256-thread blocks per SM)
// and `_bounded` to 64 registers (four blocks). Rows run as whole waves of resident warps, so the host picks per
// product the build whose last wave is fuller (`Kernels::gemv_one_row`): a 4096-row weight of an 8B model takes
// one wave of the bounded build on a 132-SM GPU (1.3 of the other), a 6144-row one 1.94 of the other (1.45).
#define GEMV(R, BOUNDS, SUFFIX)                                                                              \
    extern "C" __global__ void BOUNDS gemv_bf16_r##R##SUFFIX(const __nv_bfloat16* w0, float* out0, int n0,                     \
                                              const __nv_bfloat16* w1, float* out1, int n1,                     \
                                              const __nv_bfloat16* w2, float* out2, int n2, const float* x,      \
                                              int k) {                                                           \
        gemv_impl<R>(w0, out0, n0, w1, out1, n1, w2, out2, n2, x, k);                                            \
    }
GEMV(1, , ) GEMV(1, __launch_bounds__(256, 4), _bounded) GEMV(2, , ) GEMV(3, , ) GEMV(4, , ) GEMV(5, , ) GEMV(6, , )
GEMV(7, , ) GEMV(8, , )

// The SwiGLU's first half at small batch: warp `n` reads row n of the gate and of the up weight once each for all R
// input rows and writes out[r][n] = silu(x_r . gate_n) * (x_r . up_n), so neither product is stored.
template <int R>
__device__ void gemv_swiglu_impl(const __nv_bfloat16* wg, const __nv_bfloat16* wu, float* out, int n, const float* x,
                                 int k) {
    const int lane = threadIdx.x & 31, row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= n) return;
    const uint4* gr = reinterpret_cast<const uint4*>(wg + (size_t)row * k);
    const uint4* ur = reinterpret_cast<const uint4*>(wu + (size_t)row * k);
    float ag[R], au[R];
#pragma unroll
    for (int r = 0; r < R; r++) ag[r] = au[r] = 0.f;
    // The first loads read only weights: they go out before waiting for the kernel that writes x.
    const int n8 = k / 8;
    int c = lane;
    uint4 g0, g1, u0, u1;
    if (c + 32 < n8) {
        g0 = gr[c]; g1 = gr[c + 32]; u0 = ur[c]; u1 = ur[c + 32];
    }
    wait_prior();
    allow_next();
    for (; c + 32 < n8; c += 64) {
        if (c != lane) {
            g0 = gr[c]; g1 = gr[c + 32]; u0 = ur[c]; u1 = ur[c + 32];
        }
        gemv_step<R>(g0, x, k, c, ag);
        gemv_step<R>(u0, x, k, c, au);
        gemv_step<R>(g1, x, k, c + 32, ag);
        gemv_step<R>(u1, x, k, c + 32, au);
    }
    for (; c < n8; c += 32) {
        gemv_step<R>(gr[c], x, k, c, ag);
        gemv_step<R>(ur[c], x, k, c, au);
    }
#pragma unroll
    for (int r = 0; r < R; r++) {
        float g = ag[r], u = au[r];
        for (int o = 16; o > 0; o >>= 1) {
            g += __shfl_xor_sync(0xffffffff, g, o);
            u += __shfl_xor_sync(0xffffffff, u, o);
        }
        if (lane == 0) out[(size_t)r * n + row] = silu(g) * u;
    }
}

#define GEMV_SWIGLU(R)                                                                                         \
    extern "C" __global__ void gemv_swiglu_r##R(const __nv_bfloat16* wg, const __nv_bfloat16* wu, float* out,  \
                                                int n, const float* x, int k) {                                \
        gemv_swiglu_impl<R>(wg, wu, out, n, x, k);                                                             \
    }
GEMV_SWIGLU(1) GEMV_SWIGLU(2) GEMV_SWIGLU(3) GEMV_SWIGLU(4) GEMV_SWIGLU(5) GEMV_SWIGLU(6) GEMV_SWIGLU(7)
GEMV_SWIGLU(8)

// Greedy sampling on the device: one block per row writes the index of the row's largest value (lowest index on
// ties, as the host's argmax), so only token ids cross to the host.
extern "C" __global__ void argmax_rows(const float* x, u32* out, int cols) {
    __shared__ float sv[32];
    __shared__ int si[32];
    const float* xr = x + (size_t)blockIdx.x * cols;
    float best = NEG_INF;
    int idx = 0x7fffffff;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float v = xr[c];
        if (v > best) { best = v; idx = c; }
    }
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffff, best, o);
        const int oi = __shfl_xor_sync(0xffffffff, idx, o);
        if (ov > best || (ov == best && oi < idx)) { best = ov; idx = oi; }
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) { sv[warp] = best; si[warp] = idx; }
    __syncthreads();
    if (warp == 0) {
        const int warps = blockDim.x >> 5;
        best = lane < warps ? sv[lane] : NEG_INF;
        idx = lane < warps ? si[lane] : 0x7fffffff;
        for (int o = 16; o > 0; o >>= 1) {
            const float ov = __shfl_xor_sync(0xffffffff, best, o);
            const int oi = __shfl_xor_sync(0xffffffff, idx, o);
            if (ov > best || (ov == best && oi < idx)) { best = ov; idx = oi; }
        }
        if (lane == 0) out[blockIdx.x] = idx == 0x7fffffff ? 0 : idx;
    }
}
