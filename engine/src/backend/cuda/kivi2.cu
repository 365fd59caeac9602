// kivi2 as a cache format on the GPU (appended to kernels.cu and the attention files when compiled; decision 0018).
//
// The store holds, per block and KV head ("block head"), 2-bit key codes token after token (`HD / 4` bytes a token,
// four channels a byte from the low bits up) under an f16 (min, scale) per channel, quantized in the frame of the
// block's first token (each key turned back by RoPE for its offset in the block), and 2-bit value codes per token
// in 32-dim groups, an f16 (min, scale) each: the host's `quantize_channels` and `quantize_groups::<2>` rules,
// computed with the same roundings (no fused multiply-adds), so both reach the same codes. A block's key codes need
// all its tokens, so keys are first written to an open entry of a pool (f32, `[entry][layer][kv_head][slot][dim]`),
// which the host assigns per step (`kivi2.rs`): the store kernels write there, `seal_k2` quantizes a block head once
// its last slot is written, and attention reads a row's newest block from its entry while it is open.
//
// Each row carries three plan words: the entry its key goes to, then the index in its block table of the block
// still open after the step (or ~0) and that block's entry.
#define K2_BS 16
#define K2_WARPS 4

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

// Where row r's key of KV head h goes: its slot in its block's open entry, for `layer`.
__device__ __forceinline__ float* k2_open_key(float* pool, const u32* k2rows, int r, u32 off, int layer, int layers,
                                              int kv_heads, int h, int hd) {
    const size_t entry = k2rows[3 * r];
    return pool + (((entry * layers + layer) * kv_heads + h) * K2_BS + off) * hd;
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
    const size_t vec = layer_vec + ((size_t)block * kv_heads + h) * K2_BS + off;
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
    const size_t vec = layer_vec + ((size_t)block * kv_heads + hh) * K2_BS + off;
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
    const float* src = pool + (((size_t)k2rows[3 * r] * layers + layer) * kv_heads + h) * K2_BS * hd;
    for (int t = 0; t < K2_BS; t++) keys[t * hd + d] = src[t * hd + d];
    __syncthreads();
    if (d < half) {
        const int a = interleaved ? 2 * d : d, b = interleaved ? 2 * d + 1 : d + half;
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
    const size_t bh = layer_vec / K2_BS + (size_t)block * kv_heads + h;
    kp[bh * 2 * hd + 2 * d] = mh;
    kp[bh * 2 * hd + 2 * d + 1] = sh;
    __syncthreads();
    for (int j = d; j < K2_BS * hd / 4; j += hd) {
        const unsigned char* cs = codes + (j / (hd / 4)) * hd + 4 * (j % (hd / 4));
        kc[bh * K2_BS * (hd / 4) + j] = (unsigned char)(cs[0] | cs[1] << 2 | cs[2] << 4 | cs[3] << 6);
    }
}

// Attention over a kivi2 cache, in the flash-decoding style: grid (row, KV head, split), four warps; a split is a
// run of the row's keys in whole blocks, dealt to the warps in turn. Serves decode and prefill rows alike (each row
// reads its own context). Within a warp, lane l takes key l % 16 of the block and half l / 16 of its RoPE pairs: it
// dequantizes its key's channels (the block's (min, scale) per channel staged in shared memory), turns each pair
// forward out of the block's frame, and scores it against every query head of the KV head; the two halves add up
// by one shuffle. The row's open block is read from its entry instead (exact keys, already in the cache's frame).
// Values: lane l takes dims l, l + 32, ... of every key, weighted by the keys' probabilities through shared memory.
// Rows indexed by dimension are skewed by one word per 32 (`k2_skew`): the two halves of a warp read dims 32 or 64
// apart, which would otherwise share a bank.
__device__ __forceinline__ int k2_skew(int d) { return d + (d >> 5); }
template <int HD> struct K2Shared {
    float q[8][HD + HD / 32];   // the query heads of this KV head, scaled (zeros past the group), skewed
    float2 turn[HD / 2][K2_BS]; // (cos, sin) of t * inv_freq[p], pair-major so the 16 keys' lanes read apart
    float kmin[K2_WARPS][HD + HD / 32], kscale[K2_WARPS][HD + HD / 32];  // skewed
    u32 vcodes[K2_WARPS][K2_BS * HD / 16];
    float2 vparams[K2_WARPS][K2_BS][HD / 32];
    float p[K2_WARPS][8][K2_BS];
    float merge[K2_WARPS][8 * HD + 16];  // per warp: output [head][dim], then max[8], sum[8]
};

template <int HD, bool INTERLEAVED>
__device__ void k2_attention_impl(K2Shared<HD>& sh, const float* q, const unsigned char* kc, const unsigned char* vc,
                                  const __half* kp, const __half* vp, const float* pool, const u32* k2rows,
                                  const float2* turn, float* out, float* part, u32* arrived, const u32* row_ctx,
                                  const u32* row_table, const u32* tables, int kv_heads, int group, size_t layer_vec,
                                  int layer, int layers, float scale, int splits) {
    constexpr int HALF = HD / 2, QUARTER = HD / 4, CB = HD / 4, NG = HD / 32;
    const int r = blockIdx.x, kvh = blockIdx.y, split = blockIdx.z;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, t = lane & 15, hh = lane >> 4;
    const int heads = kv_heads * group;
    const float qscale = scale * 1.44269504088896341f;  // softmax in powers of two
    for (int i = threadIdx.x; i < 8 * HD; i += blockDim.x) {
        const int g = i / HD, d = i % HD;
        sh.q[g][k2_skew(d)] = g < group ? q[((size_t)r * heads + kvh * group + g) * HD + d] * qscale : 0.f;
    }
    for (int i = threadIdx.x; i < K2_BS * HALF; i += blockDim.x) sh.turn[i % HALF][i / HALF] = turn[i];
    __syncthreads();

    const u32 ctx = row_ctx[r];
    const u32 chunk = (max(64u, (ctx + splits - 1) / splits) + K2_BS - 1) / K2_BS * K2_BS;
    const u32 begin = min(ctx, split * chunk), end = min(ctx, begin + chunk);
    const u32* table = tables + row_table[r];
    const u32 open_kb = k2rows[3 * r + 1], open_entry = k2rows[3 * r + 2];
    float mx[8], sum[8], acc[8][NG];
#pragma unroll
    for (int g = 0; g < 8; g++) {
        mx[g] = NEG_INF;
        sum[g] = 0.f;
#pragma unroll
        for (int j = 0; j < NG; j++) acc[g][j] = 0.f;
    }
    // (A split past the context has no keys: begin == end, and the loop must not start at the context's last block.)
    for (u32 kb = begin / K2_BS + warp; begin < end && kb * K2_BS < end; kb += K2_WARPS) {
        const u32 blk = table[kb];
        const size_t bh = layer_vec / K2_BS + (size_t)blk * kv_heads + kvh, vec0 = bh * K2_BS;
        for (int i = lane; i < HD; i += 32) {
            sh.kmin[warp][k2_skew(i)] = __half2float(kp[bh * 2 * HD + 2 * i]);
            sh.kscale[warp][k2_skew(i)] = __half2float(kp[bh * 2 * HD + 2 * i + 1]);
        }
        const u32* vsrc = reinterpret_cast<const u32*>(vc + vec0 * CB);
        for (int i = lane; i < K2_BS * HD / 16; i += 32) sh.vcodes[warp][i] = vsrc[i];
        for (int i = lane; i < K2_BS * NG; i += 32) {
            const __half* pv = vp + (vec0 + i / NG) * NG * 2 + 2 * (i % NG);
            sh.vparams[warp][i / NG][i % NG] = make_float2(__half2float(pv[0]), __half2float(pv[1]));
        }
        __syncwarp();

        // Scores of key t against every head: this lane's half of the pairs, then the other half's.
        float s[8];
#pragma unroll
        for (int g = 0; g < 8; g++) s[g] = 0.f;
        // Pair p (of this lane's QUARTER) has dims (a, b); turned forward by (c, sn) when read from codes.
        auto add_pair = [&](int a, int b, float ka, float kb2) {
            const int sa = k2_skew(a), sb = k2_skew(b);
#pragma unroll
            for (int g = 0; g < 8; g++) {
                if (g < group) s[g] += sh.q[g][sa] * ka + sh.q[g][sb] * kb2;
            }
        };
        if (kb == open_kb) {
            const float* kx = pool + ((((size_t)open_entry * layers + layer) * kv_heads + kvh) * K2_BS + t) * HD;
#pragma unroll 4
            for (int i = 0; i < QUARTER; i++) {
                const int p = hh * QUARTER + i;
                const int a = INTERLEAVED ? 2 * p : p, b = INTERLEAVED ? 2 * p + 1 : p + HALF;
                add_pair(a, b, kx[a], kx[b]);
            }
        } else {
            // This lane's codes: (halves layout) dims [hh * QUARTER, + QUARTER) and the same + HALF; (interleaved)
            // dims [hh * HALF, + HALF). 16 codes a word.
            const u32* src = reinterpret_cast<const u32*>(kc + (vec0 + t) * CB);
            constexpr int W = HD / 64;  // words of QUARTER codes
            u32 wa[2 * W], wb[W];
            if (INTERLEAVED) {
#pragma unroll
                for (int i = 0; i < 2 * W; i++) wa[i] = src[hh * 2 * W + i];
            } else {
#pragma unroll
                for (int i = 0; i < W; i++) {
                    wa[i] = src[hh * W + i];
                    wb[i] = src[HALF / 16 + hh * W + i];
                }
            }
#pragma unroll
            for (int i = 0; i < QUARTER; i++) {
                const int p = hh * QUARTER + i;
                int a, b;
                u32 ca, cb;
                if (INTERLEAVED) {
                    a = 2 * p;
                    b = a + 1;
                    ca = (wa[(2 * i) / 16] >> (2 * ((2 * i) % 16))) & 3u;
                    cb = (wa[(2 * i + 1) / 16] >> (2 * ((2 * i + 1) % 16))) & 3u;
                } else {
                    a = p;
                    b = p + HALF;
                    ca = (wa[i / 16] >> (2 * (i % 16))) & 3u;
                    cb = (wb[i / 16] >> (2 * (i % 16))) & 3u;
                }
                const int sa = k2_skew(a), sb = k2_skew(b);
                const float x0 = __fadd_rn(sh.kmin[warp][sa], __fmul_rn(sh.kscale[warp][sa], (float)ca));
                const float x1 = __fadd_rn(sh.kmin[warp][sb], __fmul_rn(sh.kscale[warp][sb], (float)cb));
                const float2 cs = sh.turn[p][t];
                add_pair(a, b, x0 * cs.x - x1 * cs.y, x0 * cs.y + x1 * cs.x);
            }
        }
        const bool valid = kb * K2_BS + t < end;
#pragma unroll
        for (int g = 0; g < 8; g++) {
            s[g] += __shfl_xor_sync(0xffffffffu, s[g], 16);
            if (!valid) s[g] = NEG_INF;
        }

        // Online softmax per head (lanes t and t + 16 hold the same scores).
#pragma unroll
        for (int g = 0; g < 8; g++) {
            if (g >= group) break;
            float m = s[g];
#pragma unroll
            for (int o = 1; o < 16; o <<= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
            const float nm = fmaxf(mx[g], m);
            const float corr = nm == NEG_INF ? 1.f : ex2(mx[g] - nm);
            const float pr = nm == NEG_INF ? 0.f : ex2(s[g] - nm);
            float ps = pr;
#pragma unroll
            for (int o = 1; o < 16; o <<= 1) ps += __shfl_xor_sync(0xffffffffu, ps, o);
            sum[g] = sum[g] * corr + ps;
            mx[g] = nm;
#pragma unroll
            for (int j = 0; j < NG; j++) acc[g][j] *= corr;
            if (hh == 0) sh.p[warp][g][t] = pr;
        }
        __syncwarp();
        // Values: dims lane + 32 j of every valid key of the block.
        const int keys = (int)min((u32)K2_BS, end - kb * K2_BS);
        for (int k = 0; k < keys; k++) {
#pragma unroll
            for (int j = 0; j < NG; j++) {
                const int d = lane + 32 * j;
                const u32 w = sh.vcodes[warp][(k * CB + d / 4) / 4];
                const float2 mp = sh.vparams[warp][k][j];
                const float x = __fadd_rn(mp.x, __fmul_rn(mp.y, (float)((w >> (2 * (d % 16))) & 3u)));
#pragma unroll
                for (int g = 0; g < 8; g++) {
                    if (g < group) acc[g][j] += sh.p[warp][g][k] * x;
                }
            }
        }
        __syncwarp();
    }

    // The warp's state, then the block's merge: thread per (head, dim).
#pragma unroll
    for (int g = 0; g < 8; g++) {
#pragma unroll
        for (int j = 0; j < NG; j++) sh.merge[warp][g * HD + lane + 32 * j] = acc[g][j];
        if (lane == 0) {
            sh.merge[warp][8 * HD + g] = mx[g];
            sh.merge[warp][8 * HD + 8 + g] = sum[g];
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < group * HD; i += blockDim.x) {
        const int g = i / HD, d = i % HD, head = kvh * group + g;
        float mm = NEG_INF;
#pragma unroll
        for (int w = 0; w < K2_WARPS; w++) mm = fmaxf(mm, sh.merge[w][8 * HD + g]);
        float v = 0.f, l = 0.f;
#pragma unroll
        for (int w = 0; w < K2_WARPS; w++) {
            const float mw = sh.merge[w][8 * HD + g];
            if (mw == NEG_INF) continue;
            const float f = ex2(mw - mm);
            v += sh.merge[w][g * HD + d] * f;
            l += sh.merge[w][8 * HD + 8 + g] * f;
        }
        if (splits == 1) {
            out[((size_t)r * heads + head) * HD + d] = l > 0.f ? v / l : 0.f;
        } else {
            float* pp = part + (((size_t)r * heads + head) * splits + split) * (HD + 2);
            pp[d] = v;
            if (d == 0) {
                pp[HD] = mm;
                pp[HD + 1] = l;
            }
        }
    }
    if (splits == 1) return;

    merge_splits<HD>(out, part, arrived, &sh.merge[0][0], r, kvh, kv_heads, group, splits);
}

#define K2_ATTENTION(HD)                                                                                        \
    extern "C" __global__ void __launch_bounds__(K2_WARPS * 32) attention_k2_h##HD(                             \
        const float* q, const unsigned char* kc, const unsigned char* vc, const __half* kp, const __half* vp,   \
        const float* pool, const u32* k2rows, const float2* turn, int interleaved, float* out, float* part,     \
        u32* arrived, const u32* row_ctx, const u32* row_table, const u32* tables, int kv_heads, int group,     \
        size_t layer_vec, int layer, int layers, float scale, int splits) {                                     \
        __shared__ K2Shared<HD> sh;                                                                             \
        if (interleaved)                                                                                        \
            k2_attention_impl<HD, true>(sh, q, kc, vc, kp, vp, pool, k2rows, turn, out, part, arrived,      \
                                        row_ctx, row_table, tables, kv_heads, group, layer_vec, layer, layers,  \
                                        scale, splits);                                                         \
        else                                                                                                    \
            k2_attention_impl<HD, false>(sh, q, kc, vc, kp, vp, pool, k2rows, turn, out, part, arrived,     \
                                         row_ctx, row_table, tables, kv_heads, group, layer_vec, layer, layers, \
                                         scale, splits);                                                        \
    }
K2_ATTENTION(64)
K2_ATTENTION(128)
