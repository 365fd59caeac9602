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

// Paged attention, one block of 4 warps per (query row, head). Each warp takes every fourth key: a warp-wide dot
// product (lanes split the head dimension), an online softmax, and a running weighted sum of V kept in registers;
// the four partial results are merged at the end. Grouped-query: head h reads KV head h / (heads / kv_heads).
// row_ctx[r]: keys visible to row r (its cached context including itself); row_table[r]: offset of its sequence's
// block table in `tables`. Head dims up to 256.
template <typename T>
__device__ void attention_impl(const float* q, const T* kc, const T* vc, float* out, const u32* row_ctx,
                               const u32* row_table, const u32* tables, int heads, int kv_heads, int head_dim,
                               int block_size, size_t layer_off, float scale) {
    const int r = blockIdx.x, h = blockIdx.y, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int kvh = h / (heads / kv_heads);
    const int per_lane = (head_dim + 31) / 32;  // <= 8
    const float* qr = q + ((size_t)r * heads + h) * head_dim;
    float qv[8], acc[8];
    for (int j = 0; j < 8; j++) {
        const int d = lane + 32 * j;
        qv[j] = (j < per_lane && d < head_dim) ? qr[d] * scale : 0.f;
        acc[j] = 0.f;
    }
    float m = NEG_INF, l = 0.f;
    const u32 ctx = row_ctx[r];
    const u32* table = tables + row_table[r];
    for (u32 t = warp; t < ctx; t += 4) {
        const u32 block = table[t / block_size], off = t % block_size;
        const size_t base = layer_off + (((size_t)block * kv_heads + kvh) * block_size + off) * head_dim;
        float s = 0.f;
        for (int j = 0; j < per_lane; j++) {
            const int d = lane + 32 * j;
            if (d < head_dim) s += qv[j] * load(kc + base + d);
        }
        for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffff, s, o);
        const float m_new = fmaxf(m, s);
        const float corr = __expf(m - m_new), p = __expf(s - m_new);
        l = l * corr + p;
        for (int j = 0; j < per_lane; j++) {
            const int d = lane + 32 * j;
            acc[j] = acc[j] * corr + (d < head_dim ? p * load(vc + base + d) : 0.f);
        }
        m = m_new;
    }
    __shared__ float sm[4], sl[4], sacc[4][256];
    if (lane == 0) { sm[warp] = m; sl[warp] = l; }
    for (int j = 0; j < per_lane; j++) {
        const int d = lane + 32 * j;
        if (d < head_dim) sacc[warp][d] = acc[j];
    }
    __syncthreads();
    if (warp == 0) {
        float mm = NEG_INF;
        for (int w = 0; w < 4; w++) mm = fmaxf(mm, sm[w]);
        float ll = 0.f, f[4];
        for (int w = 0; w < 4; w++) {
            f[w] = sm[w] == NEG_INF ? 0.f : __expf(sm[w] - mm);
            ll += sl[w] * f[w];
        }
        float* o = out + ((size_t)r * heads + h) * head_dim;
        for (int j = 0; j < per_lane; j++) {
            const int d = lane + 32 * j;
            if (d >= head_dim) continue;
            float v = 0.f;
            for (int w = 0; w < 4; w++) v += sacc[w][d] * f[w];
            o[d] = ll > 0.f ? v / ll : 0.f;
        }
    }
}

#define ATTENTION(NAME, T)                                                                                    \
    extern "C" __global__ void NAME(const float* q, const T* kc, const T* vc, float* out, const u32* row_ctx, \
                                    const u32* row_table, const u32* tables, int heads, int kv_heads,         \
                                    int head_dim, int block_size, size_t layer_off, float scale) {            \
        attention_impl<T>(q, kc, vc, out, row_ctx, row_table, tables, heads, kv_heads, head_dim, block_size,   \
                          layer_off, scale);                                                                 \
    }
ATTENTION(attention_f32, float)
ATTENTION(attention_f16, __half)

// One block per output row: out[i] = x[rows[i]].
extern "C" __global__ void gather_rows(const float* x, float* out, const u32* rows, int cols) {
    const float* src = x + (size_t)rows[blockIdx.x] * cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) out[(size_t)blockIdx.x * cols + c] = src[c];
}
