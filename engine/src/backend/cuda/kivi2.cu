// kivi2 as a cache format on the GPU (appended to kernels.cu and the attention files when compiled; decision 0018).
//
// The store holds, per block and KV head ("block head"), 2-bit key codes token after token (`HD / 4` bytes a token,
// four channels a byte from the low bits up) under an f16 (min, scale) per channel, quantized in the frame of the
// block's first token (each key turned back by RoPE for its offset in the block), and 2-bit value codes per token
// in 32-dim groups, an f16 (min, scale) each: the host's `quantize_channels` and `quantize_groups::<2>` rules,
// computed with the same roundings (no fused multiply-adds), so both reach the same codes. A block's key codes need
// all its tokens, so keys are first written to an open entry of a pool (f32, `[entry][layer][kv_head][slot][dim]`),
// which the host assigns per step (`kivi2.rs`): the store kernels write there, `seal_k2` quantizes a block head once
// its last slot is written, and attention (`kivi2_attention.cu`) reads a row's newest block from its entry while
// it is open.
//
// Each row carries three plan words: the entry its key goes to, then the index in its block table of the block
// still open after the step (or ~0) and that block's entry.
#define K2_BS 16

__device__ __forceinline__ __half k2_f16_sat(float x) { return __float2half_rn(fminf(fmaxf(x, -65504.f), 65504.f)); }

// The host's `affine_params` for `levels` (3): min rounded to f16, scale = f16((hi - min) / levels); and the
// reciprocal the codes are computed with.
__device__ __forceinline__ void k2_affine(float lo, float hi, __half& mh, __half& sh, float& mf, float& inv) {
    mh = k2_f16_sat(lo);
    mf = __half2float(mh);
    sh = k2_f16_sat(fmaxf(__fdiv_rn(__fsub_rn(hi, mf), 3.f), 0.f));
    const float sf = __half2float(sh);
    inv = sf > 0.f ? __fdiv_rn(1.f, sf) : 0.f;
}
// The host's `affine_code`: round((v - min) / scale), halves up, clamped to 0..=3.
__device__ __forceinline__ u32 k2_code(float v, float mf, float inv) {
    return (u32)fminf(fmaxf(__fadd_rn(__fmul_rn(__fsub_rn(v, mf), inv), 0.5f), 0.f), 3.f);
}

// One value vector at 2 bits in 32-dim groups. Every thread of the block holds dims a and b of it (the block is the
// vector, `blockDim.x` = HD / 2); `vec` is the vector's index in the whole store.
__device__ void k2_store_values(unsigned char* vc, __half* vp, size_t vec, int hd, int a, int b, float ya, float yb) {
    __shared__ float vals[128];
    __shared__ unsigned char codes[128];
    const int i = threadIdx.x, n = blockDim.x;
    vals[a] = ya;
    vals[b] = yb;
    __syncthreads();
    for (int d = i; d < hd; d += n) {
        const int g0 = d / 32 * 32, g1 = min(g0 + 32, hd);
        float lo = vals[g0], hi = vals[g0];
        for (int e = g0 + 1; e < g1; e++) {
            lo = fminf(lo, vals[e]);
            hi = fmaxf(hi, vals[e]);
        }
        __half mh, sh;
        float mf, inv;
        k2_affine(lo, hi, mh, sh, mf, inv);
        codes[d] = (unsigned char)k2_code(vals[d], mf, inv);
        if (d == g0) {
            __half* p = vp + vec * (hd / 32) * 2 + 2 * (d / 32);
            p[0] = mh;
            p[1] = sh;
        }
    }
    __syncthreads();
    for (int j = i; j < hd / 4; j += n)
        vc[vec * (hd / 4) + j] =
            (unsigned char)(codes[4 * j] | codes[4 * j + 1] << 2 | codes[4 * j + 2] << 4 | codes[4 * j + 3] << 6);
}

// Where slot `off` of KV head h's keys of `layer` lies in pool entry `entry` (in floats from the pool's start).
__device__ __forceinline__ size_t k2_pool_key(u32 entry, int layer, int layers, int kv_heads, int h, u32 off, int hd) {
    return ((((size_t)entry * layers + layer) * kv_heads + h) * K2_BS + off) * hd;
}
// A block head's index in the store (its K2_BS vectors start at index * K2_BS; `layer_vec`: the layer's first vector).
__device__ __forceinline__ size_t k2_block_head(size_t layer_vec, u32 block, int kv_heads, int h) {
    return layer_vec / K2_BS + (size_t)block * kv_heads + h;
}
// Where row r's key of KV head h goes: its slot in its block's open entry, for `layer`.
__device__ __forceinline__ float* k2_open_key(float* pool, const u32* k2rows, int r, u32 off, int layer, int layers,
                                              int kv_heads, int h, int hd) {
    return pool + k2_pool_key(k2rows[3 * r], layer, layers, kv_heads, h, off, hd);
}

// Grid (rows, kv_heads), head_dim / 2 threads: each row's K into its open entry, its V quantized into the store.
extern "C" __global__ void store_kv_k2(const float* k, const float* v, unsigned char* kc, unsigned char* vc,
                                       __half* kp, __half* vp, float* pool, const u32* k2rows, const u32* slots,
                                       int kv_heads, int head_dim, size_t layer_vec, int layer, int layers) {
    const int r = blockIdx.x, h = blockIdx.y, i = threadIdx.x, half = head_dim / 2;
    const u32 slot = slots[r], block = slot / K2_BS, off = slot % K2_BS;
    const float* kr = k + ((size_t)r * kv_heads + h) * head_dim;
    const float* vr = v + ((size_t)r * kv_heads + h) * head_dim;
    float* dst = k2_open_key(pool, k2rows, r, off, layer, layers, kv_heads, h, head_dim);
    dst[i] = kr[i];
    dst[i + half] = kr[i + half];
    const size_t vec = k2_block_head(layer_vec, block, kv_heads, h) * K2_BS + off;
    k2_store_values(vc, vp, vec, head_dim, i, i + half, vr[i], vr[i + half]);
}

// RoPE and the cache write in one pass, as `rope_store_impl`: grid (rows, heads + kv_heads), half_dim threads.
extern "C" __global__ void rope_store_k2(float* q, float* k, const float* v, unsigned char* kc, unsigned char* vc,
                                         __half* kp, __half* vp, float* pool, const u32* k2rows, const u32* slots,
                                         const u32* positions, const float* inv_freq, int heads, int kv_heads,
                                         int head_dim, int interleaved, size_t layer_vec, int layer, int layers) {
    const int r = blockIdx.x, h = blockIdx.y, i = threadIdx.x, half = head_dim / 2;
    const bool is_q = h < heads;
    const int hh = is_q ? h : h - heads;
    float* x = is_q ? q + ((size_t)r * heads + hh) * head_dim : k + ((size_t)r * kv_heads + hh) * head_dim;
    const auto [a, b, y0, y1] = rope_pair(x, positions[r], inv_freq, i, half, interleaved);
    if (is_q) return;
    const u32 slot = slots[r], block = slot / K2_BS, off = slot % K2_BS;
    float* dst = k2_open_key(pool, k2rows, r, off, layer, layers, kv_heads, hh, head_dim);
    dst[a] = y0;
    dst[b] = y1;
    const float* vr = v + ((size_t)r * kv_heads + hh) * head_dim;
    const size_t vec = k2_block_head(layer_vec, block, kv_heads, hh) * K2_BS + off;
    k2_store_values(vc, vp, vec, head_dim, a, b, vr[a], vr[b]);
}

// Grid (rows, kv_heads), head_dim threads (one per channel): a row that wrote its block's last slot quantizes the
// block head from its open entry, in the block's frame (the host's `KeyRotation::to_block_frame`, by the host's own
// angles: `turn` holds (cos, sin) of t * inv_freq[p] per token t and pair p), one (min, scale) per channel over the
// block's tokens.
extern "C" __global__ void seal_k2(unsigned char* kc, __half* kp, const float* pool, const u32* k2rows,
                                   const u32* slots, const float2* turn, int kv_heads, int head_dim,
                                   int interleaved, size_t layer_vec, int layer, int layers) {
    __shared__ float keys[K2_BS * 128];
    __shared__ unsigned char codes[K2_BS * 128];
    const int r = blockIdx.x, h = blockIdx.y, d = threadIdx.x, hd = head_dim, half = hd / 2;
    const u32 slot = slots[r], block = slot / K2_BS, off = slot % K2_BS;
    if (off != K2_BS - 1) return;
    const float* src = pool + k2_pool_key(k2rows[3 * r], layer, layers, kv_heads, h, 0, hd);
    for (int t = 0; t < K2_BS; t++) keys[t * hd + d] = src[t * hd + d];
    __syncthreads();
    if (d < half) {
        const auto [a, b] = pair_dims(d, half, interleaved);
        for (int t = 1; t < K2_BS; t++) {
            const float2 cs = turn[t * half + d];
            const float c = cs.x, s = -cs.y;
            const float x0 = keys[t * hd + a], x1 = keys[t * hd + b];
            keys[t * hd + a] = __fsub_rn(__fmul_rn(x0, c), __fmul_rn(x1, s));
            keys[t * hd + b] = __fadd_rn(__fmul_rn(x0, s), __fmul_rn(x1, c));
        }
    }
    __syncthreads();
    float lo = keys[d], hi = keys[d];
    for (int t = 1; t < K2_BS; t++) {
        lo = fminf(lo, keys[t * hd + d]);
        hi = fmaxf(hi, keys[t * hd + d]);
    }
    __half mh, sh;
    float mf, inv;
    k2_affine(lo, hi, mh, sh, mf, inv);
    for (int t = 0; t < K2_BS; t++) codes[t * hd + d] = (unsigned char)k2_code(keys[t * hd + d], mf, inv);
    const size_t bh = k2_block_head(layer_vec, block, kv_heads, h);
    kp[bh * 2 * hd + 2 * d] = mh;
    kp[bh * 2 * hd + 2 * d + 1] = sh;
    __syncthreads();
    for (int j = d; j < K2_BS * hd / 4; j += hd) {
        const unsigned char* cs = codes + (j / (hd / 4)) * hd + 4 * (j % (hd / 4));
        kc[bh * K2_BS * (hd / 4) + j] = (unsigned char)(cs[0] | cs[1] << 2 | cs[2] << 4 | cs[3] << 6);
    }
}
