// Tandem's CUDA kernels, compiled at start-up with NVRTC (see cuda/module.rs). Activations are f32 row-major;
// weights bf16; the paged KV store is f32 or f16, laid out [layer][block][kv_head][slot][dim] for K and for V.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

typedef unsigned int u32;
#define NEG_INF __int_as_float(0xff800000)

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

// One block per row: out = x / rms(x) * w.
extern "C" __global__ void rms_norm(const float* x, const float* w, float* out, int cols, float eps) {
    __shared__ float shared[32];
    const float* xr = x + (size_t)blockIdx.x * cols;
    float ss = 0.f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) ss += xr[c] * xr[c];
    const float scale = rsqrtf(block_sum(ss, shared) / cols + eps);
    float* o = out + (size_t)blockIdx.x * cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) o[c] = xr[c] * scale * w[c];
}

// One block per row: x += y, then y = x / rms(x) * w (y is read before it is overwritten).
extern "C" __global__ void add_rms_norm(float* x, float* y, const float* w, int cols, float eps) {
    __shared__ float shared[32];
    float* xr = x + (size_t)blockIdx.x * cols;
    float* yr = y + (size_t)blockIdx.x * cols;
    float ss = 0.f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float v = xr[c] + yr[c];
        xr[c] = v;
        ss += v * v;
    }
    const float scale = rsqrtf(block_sum(ss, shared) / cols + eps);
    for (int c = threadIdx.x; c < cols; c += blockDim.x) yr[c] = xr[c] * scale * w[c];
}

extern "C" __global__ void to_bf16(const float* x, __nv_bfloat16* y, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        y[i] = __float2bfloat16(x[i]);
}

extern "C" __global__ void add_bias(float* x, const float* b, size_t n, int cols) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        x[i] += b[i % cols];
}

extern "C" __global__ void add(float* x, const float* y, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        x[i] += y[i];
}

extern "C" __global__ void silu_mul(float* g, const float* u, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const float v = g[i];
        g[i] = v / (1.f + __expf(-v)) * u[i];
    }
}

// Grid (rows, heads), half_dim threads: rotates each pair of a head by its row's angles.
extern "C" __global__ void rope(float* x, const float* cos_t, const float* sin_t, int heads, int head_dim,
                                int interleaved) {
    const int r = blockIdx.x, h = blockIdx.y, i = threadIdx.x, half = head_dim / 2;
    if (i >= half) return;
    float* v = x + ((size_t)r * heads + h) * head_dim;
    const int a = interleaved ? 2 * i : i, b = interleaved ? 2 * i + 1 : i + half;
    const float c = cos_t[(size_t)r * half + i], s = sin_t[(size_t)r * half + i];
    const float x0 = v[a], x1 = v[b];
    v[a] = x0 * c - x1 * s;
    v[b] = x0 * s + x1 * c;
}

// Grid (rows, kv_heads), head_dim threads: writes each row's K and V into its slot of one layer.
#define STORE_KV(NAME, T, CONV)                                                                              \
    extern "C" __global__ void NAME(const float* k, const float* v, T* kc, T* vc, const u32* slots,           \
                                    int kv_heads, int head_dim, int block_size, size_t layer_off) {           \
        const int r = blockIdx.x, h = blockIdx.y, d = threadIdx.x;                                           \
        if (d >= head_dim) return;                                                                           \
        const u32 slot = slots[r], block = slot / block_size, off = slot % block_size;                       \
        const size_t dst = layer_off + (((size_t)block * kv_heads + h) * block_size + off) * head_dim + d;    \
        const size_t src = ((size_t)r * kv_heads + h) * head_dim + d;                                        \
        kc[dst] = CONV(k[src]);                                                                              \
        vc[dst] = CONV(v[src]);                                                                              \
    }
__device__ __forceinline__ float ident(float x) { return x; }
STORE_KV(store_kv_f32, float, ident)
STORE_KV(store_kv_f16, __half, __float2half)

__device__ __forceinline__ float load(const float* p) { return *p; }
__device__ __forceinline__ float load(const __half* p) { return __half2float(*p); }

// Paged attention in the flash-decoding style. Grid (query row, KV head, split): a block of WARPS warps takes the
// split's share of the row's visible keys, reads each key's K and V once for all G query heads that share that KV
// head (grouped-query), and keeps an online softmax per head: running max, running sum and a weighted sum of V in
// registers, each lane owning D = head_dim / 32 dimensions. G and D are compile-time (one kernel per shape) so
// everything stays in registers. The warps merge in shared memory; with one split the block writes the output,
// otherwise (unnormalized output, max, sum) per split go to `part` for attention_combine. row_ctx[r]: keys visible
// to row r; row_table[r]: its block table's offset in `tables`.
#define WARPS 8
template <typename T, int G, int D>
__device__ void attention_impl(const float* q, const T* kc, const T* vc, float* out, float* part, const u32* row_ctx,
                               const u32* row_table, const u32* tables, int kv_heads, int block_size,
                               size_t layer_off, float scale, int splits) {
    constexpr int HD = 32 * D;
    const int heads = kv_heads * G;
    const int r = blockIdx.x, kvh = blockIdx.y, split = blockIdx.z;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    float qv[G][D], acc[G][D], m[G], l[G];
#pragma unroll
    for (int g = 0; g < G; g++) {
        m[g] = NEG_INF;
        l[g] = 0.f;
        const float* qr = q + ((size_t)r * heads + kvh * G + g) * HD + lane * D;
#pragma unroll
        for (int j = 0; j < D; j++) {
            qv[g][j] = qr[j] * scale;
            acc[g][j] = 0.f;
        }
    }
    const u32 ctx = row_ctx[r];
    const u32 chunk = (ctx + splits - 1) / splits;
    const u32 begin = split * chunk, end = min(ctx, begin + chunk);
    const u32* table = tables + row_table[r];
    for (u32 t = begin + warp; t < end; t += WARPS) {
        const u32 block = table[t / block_size], off = t % block_size;
        const size_t base = layer_off + (((size_t)block * kv_heads + kvh) * block_size + off) * HD + lane * D;
        float kx[D], vx[D];
#pragma unroll
        for (int j = 0; j < D; j++) {
            kx[j] = load(kc + base + j);
            vx[j] = load(vc + base + j);
        }
#pragma unroll
        for (int g = 0; g < G; g++) {
            float s = 0.f;
#pragma unroll
            for (int j = 0; j < D; j++) s += qv[g][j] * kx[j];
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffff, s, o);
            const float m_new = fmaxf(m[g], s);
            const float corr = __expf(m[g] - m_new), p = __expf(s - m_new);
            l[g] = l[g] * corr + p;
#pragma unroll
            for (int j = 0; j < D; j++) acc[g][j] = acc[g][j] * corr + p * vx[j];
            m[g] = m_new;
        }
    }
    // Merge the warps, one head at a time.
    __shared__ float sm[WARPS], sl[WARPS], sacc[WARPS][HD];
#pragma unroll
    for (int g = 0; g < G; g++) {
        if (lane == 0) { sm[warp] = m[g]; sl[warp] = l[g]; }
#pragma unroll
        for (int j = 0; j < D; j++) sacc[warp][lane * D + j] = acc[g][j];
        __syncthreads();
        const int h = kvh * G + g;
        float mm = NEG_INF;
        for (int w = 0; w < WARPS; w++) mm = fmaxf(mm, sm[w]);
        float ll = 0.f;
        for (int w = 0; w < WARPS; w++) ll += sm[w] == NEG_INF ? 0.f : sl[w] * __expf(sm[w] - mm);
        for (int d = threadIdx.x; d < HD; d += blockDim.x) {
            float v = 0.f;
            for (int w = 0; w < WARPS; w++) v += sm[w] == NEG_INF ? 0.f : sacc[w][d] * __expf(sm[w] - mm);
            if (splits == 1) {
                out[((size_t)r * heads + h) * HD + d] = ll > 0.f ? v / ll : 0.f;
            } else {
                part[(((size_t)r * heads + h) * splits + split) * (HD + 2) + d] = v;
            }
        }
        if (splits > 1 && threadIdx.x == 0) {
            float* p = part + (((size_t)r * heads + h) * splits + split) * (HD + 2);
            p[HD] = mm;
            p[HD + 1] = ll;
        }
        __syncthreads();
    }
}

#define ATTENTION(T, TN, G, D)                                                                                  \
    extern "C" __global__ void attention_##TN##_g##G##_d##D(                                                    \
        const float* q, const T* kc, const T* vc, float* out, float* part, const u32* row_ctx,                  \
        const u32* row_table, const u32* tables, int kv_heads, int block_size, size_t layer_off, float scale,   \
        int splits) {                                                                                           \
        attention_impl<T, G, D>(q, kc, vc, out, part, row_ctx, row_table, tables, kv_heads, block_size,         \
                                layer_off, scale, splits);                                                      \
    }
#define ATTENTION_G(T, TN, D) \
    ATTENTION(T, TN, 1, D) ATTENTION(T, TN, 2, D) ATTENTION(T, TN, 3, D) ATTENTION(T, TN, 4, D) \
    ATTENTION(T, TN, 5, D) ATTENTION(T, TN, 6, D) ATTENTION(T, TN, 7, D) ATTENTION(T, TN, 8, D)
ATTENTION_G(float, f32, 2)
ATTENTION_G(float, f32, 4)
ATTENTION_G(__half, f16, 2)
ATTENTION_G(__half, f16, 4)

// Grid (rows, heads), head_dim threads: merges the splits' partial results of attention_*.
extern "C" __global__ void attention_combine(const float* part, float* out, int heads, int head_dim, int splits) {
    const int r = blockIdx.x, h = blockIdx.y, d = threadIdx.x;
    if (d >= head_dim) return;
    const float* p = part + ((size_t)r * heads + h) * splits * (head_dim + 2);
    float mm = NEG_INF;
    for (int s = 0; s < splits; s++) mm = fmaxf(mm, p[s * (head_dim + 2) + head_dim]);
    float v = 0.f, ll = 0.f;
    for (int s = 0; s < splits; s++) {
        const float* ps = p + s * (head_dim + 2);
        const float ms = ps[head_dim];
        if (ms == NEG_INF) continue;
        const float f = __expf(ms - mm);
        v += ps[d] * f;
        ll += ps[head_dim + 1] * f;
    }
    out[((size_t)r * heads + h) * head_dim + d] = ll > 0.f ? v / ll : 0.f;
}

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
template <int R>
__device__ void gemv_impl(const __nv_bfloat16* w0, float* out0, int n0, const __nv_bfloat16* w1, float* out1, int n1,
                          const __nv_bfloat16* w2, float* out2, int n2, const float* x, int k) {
    const int lane = threadIdx.x & 31;
    int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const __nv_bfloat16* w = w0;
    float* out = out0;
    int n = n0;
    if (row >= n0) {
        row -= n0;
        w = w1; out = out1; n = n1;
        if (row >= n1) {
            row -= n1;
            w = w2; out = out2; n = n2;
        }
    }
    if (row >= n) return;
    const uint4* wr = reinterpret_cast<const uint4*>(w + (size_t)row * k);
    float acc[R];
#pragma unroll
    for (int r = 0; r < R; r++) acc[r] = 0.f;
    for (int c = lane; c < k / 8; c += 32) {
        const uint4 packed = wr[c];
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
            acc[r] += wf[0] * a.x + wf[1] * a.y + wf[2] * a.z + wf[3] * a.w + wf[4] * b.x + wf[5] * b.y +
                      wf[6] * b.z + wf[7] * b.w;
        }
    }
#pragma unroll
    for (int r = 0; r < R; r++) {
        float v = acc[r];
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
        if (lane == 0) out[(size_t)r * n + row] = v;
    }
}

#define GEMV(R)                                                                                              \
    extern "C" __global__ void gemv_bf16_r##R(const __nv_bfloat16* w0, float* out0, int n0,                     \
                                              const __nv_bfloat16* w1, float* out1, int n1,                     \
                                              const __nv_bfloat16* w2, float* out2, int n2, const float* x,      \
                                              int k) {                                                           \
        gemv_impl<R>(w0, out0, n0, w1, out1, n1, w2, out2, n2, x, k);                                            \
    }
GEMV(1) GEMV(2) GEMV(3) GEMV(4) GEMV(5) GEMV(6) GEMV(7) GEMV(8)

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
