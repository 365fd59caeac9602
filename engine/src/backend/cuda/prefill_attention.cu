// Prefill attention in the flash-attention style on tensor cores, with every intermediate in registers (appended
// after attention_common.cu, decode_attention.cu and the kivi2 files, whose mma and copy helpers, cache formats and
// kivi2 tile staging it uses).
//
// Grid (tile, head): a tile is up to 64 consecutive query rows of one sequence (rows tile_row0[t] .. + tile_rows[t]);
// each of the four warps owns 16 of them and holds their Q (scaled, f16) as mma A fragments for the whole kernel. Keys
// and values come in 64-key tiles, staged in shared memory as f16, double-buffered: an f16 cache is copied as it lies
// by cp.async, the next tile's copies in flight while this tile's products run; other formats go through registers and
// are converted after the products (holding them across would not fit in the registers); a kivi2 cache's block heads
// are copied into shared memory as they lie while the products run, and dequantized into the tiles after them
// (`k2_fetch_raw`, `k2_convert` in kivi2_attention.cu). Per tile a warp computes its 16 x 64 scores (mma m16n8k16, K
// fragments by ldmatrix), applies the causal mask (row r sees row_ctx[r] keys) and an online softmax on the
// accumulators (a row's values live in the four lanes of a quad), reuses the score accumulators directly as the A
// fragments of P (the m16n8 accumulator layout of two adjacent key blocks is the m16k16 operand layout), and adds P V
// (V fragments by ldmatrix.trans). Shared-memory rows are padded by 16 bytes so that the eight rows of every ldmatrix
// fall on different banks.
#define PF_BQ 64
#define PF_BK 64

// Eight consecutive cache values kept as loaded (16 bytes of halves, 32 of floats, 8 of int8 or fp8 and the scale, or
// 4 of int4 and the group's min and scale) from the prefetch until they are stored, so that the loads in flight cost
// few registers; `eight_halves` converts.
template <typename T> struct Raw8;
template <> struct Raw8<__half> { uint4 v; };
template <> struct Raw8<float> { float4 a, b; };
template <> struct Raw8<i8> { uint2 v; float s; };
template <> struct Raw8<f8> { uint2 v; float s; };
template <> struct Raw8<u4x2> { u32 v; __half2 ms; };
template <> struct Raw8<k2tag> {};  // (kivi2 tiles are staged by k2_fetch_raw and k2_convert)
// Element `at` (a multiple of 8) of the store onward; `sc`: int8's scales or int4's (min, scale) pairs.
__device__ __forceinline__ void fetch_raw(const __half* c, size_t at, const __half*, int, Raw8<__half>& r) {
    r.v = *reinterpret_cast<const uint4*>(c + at);
}
__device__ __forceinline__ void fetch_raw(const float* c, size_t at, const __half*, int, Raw8<float>& r) {
    r.a = reinterpret_cast<const float4*>(c + at)[0];
    r.b = reinterpret_cast<const float4*>(c + at)[1];
}
__device__ __forceinline__ void fetch_raw(const i8* c, size_t at, const __half* sc, int hd, Raw8<i8>& r) {
    r.v = *reinterpret_cast<const uint2*>(c + at);
    r.s = __half2float(sc[at / hd]);
}
__device__ __forceinline__ void fetch_raw(const f8* c, size_t at, const __half* sc, int hd, Raw8<f8>& r) {
    r.v = *reinterpret_cast<const uint2*>(reinterpret_cast<const unsigned char*>(c) + at);
    r.s = __half2float(sc[at / hd]) * Group<f8>::UNIT;
}
__device__ __forceinline__ void fetch_raw(const u4x2* c, size_t at, const __half* sc, int hd, Raw8<u4x2>& r) {
    r.v = *reinterpret_cast<const u32*>(reinterpret_cast<const unsigned char*>(c) + at / 2);
    r.ms = *reinterpret_cast<const __half2*>(sc + at / hd * (hd / 16) + (at % hd) / 32 * 2);
}
__device__ __forceinline__ void zero_raw(Raw8<__half>& r) { r.v = make_uint4(0, 0, 0, 0); }
__device__ __forceinline__ void zero_raw(Raw8<float>& r) { r.a = r.b = make_float4(0.f, 0.f, 0.f, 0.f); }
__device__ __forceinline__ void zero_raw(Raw8<i8>& r) {
    r.v = make_uint2(0, 0);
    r.s = 0.f;
}
__device__ __forceinline__ void zero_raw(Raw8<f8>& r) {
    r.v = make_uint2(0, 0);
    r.s = 0.f;
}
__device__ __forceinline__ void zero_raw(Raw8<u4x2>& r) {
    r.v = 0;
    r.ms = __float2half2_rn(0.f);
}
__device__ __forceinline__ uint4 eight_halves(const Raw8<__half>& r) { return r.v; }
__device__ __forceinline__ uint4 eight_halves(const Raw8<float>& r) {
    return make_uint4(pack_half2(r.a.x, r.a.y), pack_half2(r.a.z, r.a.w), pack_half2(r.b.x, r.b.y),
                      pack_half2(r.b.z, r.b.w));
}
__device__ __forceinline__ uint4 eight_halves(const Raw8<u4x2>& r) {
    const float m = __low2float(r.ms), sc = __high2float(r.ms);
    float f[8];
#pragma unroll
    for (int j = 0; j < 8; j++) f[j] = m + sc * (float)((r.v >> (4 * j)) & 15u);
    return make_uint4(pack_half2(f[0], f[1]), pack_half2(f[2], f[3]), pack_half2(f[4], f[5]), pack_half2(f[6], f[7]));
}
__device__ __forceinline__ uint4 eight_halves(const Raw8<f8>& r) {
    u32 w[4];
    Group<f8>::load(reinterpret_cast<const unsigned char*>(&r.v), w);
    u32 out[4];
#pragma unroll
    for (int j = 0; j < 4; j++) {
        const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&w[j]));
        out[j] = pack_half2(f.x * r.s, f.y * r.s);
    }
    return make_uint4(out[0], out[1], out[2], out[3]);
}
__device__ __forceinline__ uint4 eight_halves(const Raw8<i8>& r) {
    const i8* b = reinterpret_cast<const i8*>(&r.v);
    return make_uint4(pack_half2(b[0] * r.s, b[1] * r.s), pack_half2(b[2] * r.s, b[3] * r.s),
                      pack_half2(b[4] * r.s, b[5] * r.s), pack_half2(b[6] * r.s, b[7] * r.s));
}

// Four 8 x 8 f16 matrices from shared memory, one row address per lane (lanes 8i .. 8i + 7: matrix i), as the
// fragments of mma operands; `trans` transposes each.
__device__ __forceinline__ void ldmatrix_x4(const __half* row, u32& r0, u32& r1, u32& r2, u32& r3) {
    const u32 s = (u32)__cvta_generic_to_shared(row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(s));
}
__device__ __forceinline__ void ldmatrix_x4_trans(const __half* row, u32& r0, u32& r1, u32& r2, u32& r3) {
    const u32 s = (u32)__cvta_generic_to_shared(row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(s));
}

// The orthonormal Walsh-Hadamard turn of one query row held as prefill attention's A fragments hold it: dimension
// kk * 16 + 8j + 2c + e in x[kk][2j + e] (c = lane % 4). Span 1 lies within a pair, 2 and 4 across the lanes
// (xor 1, 2), 8 across j, 16 and up across kk.
template <int HD> __device__ __forceinline__ void turn_query_rows(float (&x)[HD / 16][4], int c) {
#pragma unroll
    for (int kk = 0; kk < HD / 16; kk++) {
#pragma unroll
        for (int j = 0; j < 4; j += 2) {
            const float u = x[kk][j], w = x[kk][j + 1];
            x[kk][j] = u + w;
            x[kk][j + 1] = u - w;
        }
    }
#pragma unroll
    for (int bit = 1; bit <= 2; bit <<= 1) {
#pragma unroll
        for (int kk = 0; kk < HD / 16; kk++) {
#pragma unroll
            for (int j = 0; j < 4; j++) x[kk][j] = butterfly_across(x[kk][j], c, bit);
        }
    }
#pragma unroll
    for (int kk = 0; kk < HD / 16; kk++) {
#pragma unroll
        for (int j = 0; j < 2; j++) {
            const float u = x[kk][j], w = x[kk][j + 2];
            x[kk][j] = u + w;
            x[kk][j + 2] = u - w;
        }
    }
#pragma unroll
    for (int span = 1; span < HD / 16; span <<= 1) {
#pragma unroll
        for (int kk = 0; kk < HD / 16; kk++) {
            if (kk & span) continue;
#pragma unroll
            for (int j = 0; j < 4; j++) {
                const float u = x[kk][j], w = x[kk + span][j];
                x[kk][j] = u + w;
                x[kk + span][j] = u - w;
            }
        }
    }
    const float norm = rsqrtf((float)HD);
#pragma unroll
    for (int kk = 0; kk < HD / 16; kk++) {
#pragma unroll
        for (int j = 0; j < 4; j++) x[kk][j] *= norm;
    }
}

template <typename T, int HD>
__device__ void prefill_attention_impl(const float* q, const T* kc, const T* vc, const __half* ksc, const __half* vsc,
                                       float* out, __nv_bfloat16* ob, const u32* tile_row0, const u32* tile_rows,
                                       const u32* row_ctx, const u32* row_table, const u32* tables, int kv_heads,
                                       int group, int block_size, size_t layer_off, float scale, const K2Src& k2) {
    constexpr int LD = HD + 8;             // staged row length, halves
    constexpr int CH = PF_BK * HD / 8 / 128;  // 16-byte pieces of K (and of V) per thread per tile
    constexpr bool ASYNC = sizeof(T) == 2;  // an f16 cache is copied as it lies
    extern __shared__ __align__(128) unsigned char smem[];
    __half* stage = reinterpret_cast<__half*>(smem);  // [2 buffers][K, V][PF_BK][LD]
    unsigned char* raw = smem + 2 * 2 * PF_BK * LD * sizeof(__half);  // kivi2: the next tile's block heads
    // Later tiles of a sequence see more keys: they start first, and the short ones fill in behind them.
    const int tile = gridDim.x - 1 - blockIdx.x, h = blockIdx.y, kvh = h / group, heads = kv_heads * group;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
    const u32 r0 = tile_row0[tile], nr = tile_rows[tile];
    const u32* table = tables + row_table[r0];
    const u32 ctx_last = row_ctx[r0 + nr - 1];

    // This warp's rows g and g + 8 (of its 16): Q as A fragments, and how many keys each sees.
    const int ra = warp * 16 + g, rb = ra + 8;
    const u32 ctx_a = ra < (int)nr ? row_ctx[r0 + ra] : 0, ctx_b = rb < (int)nr ? row_ctx[r0 + rb] : 0;
    u32 qa[HD / 16][4];
    {
        const float* qra = q + ((size_t)(r0 + min(ra, (int)nr - 1)) * heads + h) * HD;
        const float* qrb = q + ((size_t)(r0 + min(rb, (int)nr - 1)) * heads + h) * HD;
        // [kk][0..1]: dims kk * 16 + 2c, + 1 of row a; [kk][2..3]: the same + 8; xb likewise for row b.
        float xa[HD / 16][4], xb[HD / 16][4];
#pragma unroll
        for (int kk = 0; kk < HD / 16; kk++) {
            const float2 x0 = *reinterpret_cast<const float2*>(qra + kk * 16 + 2 * c);
            const float2 x1 = *reinterpret_cast<const float2*>(qrb + kk * 16 + 2 * c);
            const float2 x2 = *reinterpret_cast<const float2*>(qra + kk * 16 + 8 + 2 * c);
            const float2 x3 = *reinterpret_cast<const float2*>(qrb + kk * 16 + 8 + 2 * c);
            xa[kk][0] = x0.x; xa[kk][1] = x0.y; xa[kk][2] = x2.x; xa[kk][3] = x2.y;
            xb[kk][0] = x1.x; xb[kk][1] = x1.y; xb[kk][2] = x3.x; xb[kk][3] = x3.y;
        }
        // Over int4 keys (stored turned) each query row is turned the same way.
        if constexpr (Group<T>::AFFINE) {
            turn_query_rows<HD>(xa, c);
            turn_query_rows<HD>(xb, c);
        }
#pragma unroll
        for (int kk = 0; kk < HD / 16; kk++) {
            qa[kk][0] = pack_half2(xa[kk][0] * scale, xa[kk][1] * scale);
            qa[kk][1] = pack_half2(xb[kk][0] * scale, xb[kk][1] * scale);
            qa[kk][2] = pack_half2(xa[kk][2] * scale, xa[kk][3] * scale);
            qa[kk][3] = pack_half2(xb[kk][2] * scale, xb[kk][3] * scale);
        }
    }
    float o[HD / 8][4];
#pragma unroll
    for (int n = 0; n < HD / 8; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    float mx[2] = {NEG_INF, NEG_INF}, sum[2] = {0.f, 0.f};  // rows g and g + 8

    // Staging: piece i of a tile is key i / (HD / 8), dimensions 8 * (i % (HD / 8)) ...; thread t takes pieces
    // t, t + 128, ... Through registers (not f16), BATCH pieces of K and of V at a time: f32's would not all fit.
    constexpr int BATCH = ASYNC ? 1 : sizeof(T) == 4 ? 2 : CH;
    Raw8<T> pk[BATCH], pv[BATCH];
    auto piece = [&](int i, u32 k0, size_t& base) {
        const u32 t = k0 + i / (HD / 8);
        if (t >= ctx_last) return false;
        const u32 blk = table[t / block_size];
        base = layer_off + (((size_t)blk * kv_heads + kvh) * block_size + t % block_size) * HD + (i % (HD / 8)) * 8;
        return true;
    };
    // Loads the tile at k0 into buffer `buf`: an f16 cache starts its copies (finished by `land`); other formats
    // are loaded, converted and stored here.
    auto fetch = [&](u32 k0, int buf) {
        __half* ks = stage + (size_t)buf * 2 * PF_BK * LD;
        if constexpr (IS_K2<T>) {
            // The tile's block heads were copied in by k2_fetch_raw (every thread's copies, hence the barrier).
            asm volatile("cp.async.wait_all;\n" ::);
            __syncthreads();
            k2_convert<HD, LD, PF_BK>(k2, raw, k0, ctx_last, kv_heads, kvh, ks, ks + PF_BK * LD);
        } else if constexpr (ASYNC) {
#pragma unroll
            for (int j = 0; j < CH; j++) {
                const int i = threadIdx.x + j * 128, at = (i / (HD / 8)) * LD + (i % (HD / 8)) * 8;
                size_t base = 0;
                const bool ok = piece(i, k0, base);
                copy16(ks + at, kc + base, ok);
                copy16(ks + PF_BK * LD + at, vc + base, ok);
            }
            copy_commit();
        } else {
#pragma unroll
            for (int j0 = 0; j0 < CH; j0 += BATCH) {
#pragma unroll
                for (int j = 0; j < BATCH; j++) {
                    size_t base = 0;
                    if (piece(threadIdx.x + (j0 + j) * 128, k0, base)) {
                        fetch_raw(kc, base, ksc, HD, pk[j]);
                        fetch_raw(vc, base, vsc, HD, pv[j]);
                    } else {
                        zero_raw(pk[j]);
                        zero_raw(pv[j]);
                    }
                }
#pragma unroll
                for (int j = 0; j < BATCH; j++) {
                    const int i = threadIdx.x + (j0 + j) * 128, at = (i / (HD / 8)) * LD + (i % (HD / 8)) * 8;
                    *reinterpret_cast<uint4*>(ks + at) = eight_halves(pk[j]);
                    *reinterpret_cast<uint4*>(ks + PF_BK * LD + at) = eight_halves(pv[j]);
                }
            }
        }
    };
    // Waits for an f16 tile's copies.
    auto land = [&]() {
        if constexpr (ASYNC) asm volatile("cp.async.wait_all;\n" ::);
    };

    if constexpr (IS_K2<T>) k2_fetch_raw<HD, PF_BK>(k2, table, 0, ctx_last, kv_heads, kvh, raw);
    fetch(0, 0);
    land();
    __syncthreads();
    int buf = 0;
    for (u32 k0 = 0; k0 < ctx_last; k0 += PF_BK, buf ^= 1) {
        const bool more = k0 + PF_BK < ctx_last;
        if (ASYNC && more) fetch(k0 + PF_BK, buf ^ 1);
        if (IS_K2<T> && more) k2_fetch_raw<HD, PF_BK>(k2, table, k0 + PF_BK, ctx_last, kv_heads, kvh, raw);
        const __half* ks = stage + (size_t)buf * 2 * PF_BK * LD;
        const __half* vs = ks + PF_BK * LD;

        // Scores: s[j] holds keys 8j + 2c, + 1 of rows g (0, 1) and g + 8 (2, 3).
        float s[PF_BK / 8][4];
#pragma unroll
        for (int j = 0; j < PF_BK / 8; j++) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
        for (int j = 0; j < PF_BK / 8; j++) {
#pragma unroll
            for (int kk = 0; kk < HD / 16; kk += 2) {
                // Matrices: keys 8j .. 8j + 7 at dimensions 16kk + 0/8, 16(kk + 1) + 0/8.
                u32 b0, b1, b2, b3;
                ldmatrix_x4(ks + (8 * j + (lane & 7)) * LD + kk * 16 + (lane >> 3) * 8, b0, b1, b2, b3);
                mma_16816(s[j], qa[kk][0], qa[kk][1], qa[kk][2], qa[kk][3], b0, b1);
                mma_16816(s[j], qa[kk + 1][0], qa[kk + 1][1], qa[kk + 1][2], qa[kk + 1][3], b2, b3);
            }
        }
        // Causal mask and online softmax; a row's 64 scores lie in the 4 lanes of its quad.
#pragma unroll
        for (int e = 0; e < 2; e++) {
            const u32 ctx = e ? ctx_b : ctx_a;
            float m = NEG_INF;
#pragma unroll
            for (int j = 0; j < PF_BK / 8; j++) {
#pragma unroll
                for (int x = 0; x < 2; x++) {
                    if (k0 + 8 * j + 2 * c + x >= ctx) s[j][2 * e + x] = NEG_INF;
                    m = fmaxf(m, s[j][2 * e + x]);
                }
            }
            m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
            m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
            const float nm = fmaxf(mx[e], m);
            const float corr = nm == NEG_INF ? 1.f : __expf(mx[e] - nm);
            float add = 0.f;
#pragma unroll
            for (int j = 0; j < PF_BK / 8; j++) {
#pragma unroll
                for (int x = 0; x < 2; x++) {
                    const float p = nm == NEG_INF ? 0.f : __expf(s[j][2 * e + x] - nm);
                    s[j][2 * e + x] = p;
                    add += p;
                }
            }
            sum[e] = sum[e] * corr + add;
            mx[e] = nm;
#pragma unroll
            for (int n = 0; n < HD / 8; n++) {
                o[n][2 * e] *= corr;
                o[n][2 * e + 1] *= corr;
            }
        }
        // O += P V: keys 16kk .. 16kk + 15 are score blocks 2kk and 2kk + 1.
#pragma unroll
        for (int kk = 0; kk < PF_BK / 16; kk++) {
            const u32 a0 = pack_half2(s[2 * kk][0], s[2 * kk][1]), a1 = pack_half2(s[2 * kk][2], s[2 * kk][3]);
            const u32 a2 = pack_half2(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            const u32 a3 = pack_half2(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
            for (int n = 0; n < HD / 8; n += 2) {
                // Matrices (transposed): keys 16kk + 0/8 .. + 7 at dimensions 8n .. 8n + 7, then 8(n + 1) ...
                u32 b0, b1, b2, b3;
                const int m = lane >> 3;
                ldmatrix_x4_trans(vs + (16 * kk + (m & 1) * 8 + (lane & 7)) * LD + (n + (m >> 1)) * 8, b0, b1, b2,
                                  b3);
                mma_16816(o[n], a0, a1, a2, a3, b0, b1);
                mma_16816(o[n + 1], a0, a1, a2, a3, b2, b3);
            }
        }
        if (more) {
            if (!ASYNC) fetch(k0 + PF_BK, buf ^ 1);
            land();
        }
        __syncthreads();
    }

    // Each row's sum over its quad, then out = O / sum (and the bf16 copy a GEMM reads).
#pragma unroll
    for (int e = 0; e < 2; e++) {
        sum[e] += __shfl_xor_sync(0xffffffffu, sum[e], 1);
        sum[e] += __shfl_xor_sync(0xffffffffu, sum[e], 2);
    }
#pragma unroll
    for (int e = 0; e < 2; e++) {
        const int r = e ? rb : ra;
        if (r >= (int)nr) continue;
        const float inv = sum[e] > 0.f ? 1.f / sum[e] : 0.f;
        const size_t at = ((size_t)(r0 + r) * heads + h) * HD + 2 * c;
#pragma unroll
        for (int n = 0; n < HD / 8; n++) {
            const float2 v = make_float2(o[n][2 * e] * inv, o[n][2 * e + 1] * inv);
            *reinterpret_cast<float2*>(out + at + 8 * n) = v;
            if (ob) *reinterpret_cast<__nv_bfloat162*>(ob + at + 8 * n) = __floats2bfloat162_rn(v.x, v.y);
        }
    }
}

#define PREFILL_ATTENTION(T, TN, HD)                                                                            \
    extern "C" __global__ void __launch_bounds__(128) prefill_attention_##TN##_h##HD(                            \
        const float* q, const T* kc, const T* vc, const __half* ksc, const __half* vsc, float* out,             \
        __nv_bfloat16* ob, const u32* tile_row0, const u32* tile_rows, const u32* row_ctx, const u32* row_table, \
        const u32* tables, int kv_heads, int group, int block_size, size_t layer_off, float scale) {            \
        prefill_attention_impl<T, HD>(q, kc, vc, ksc, vsc, out, ob, tile_row0, tile_rows, row_ctx, row_table,   \
                                      tables, kv_heads, group, block_size, layer_off, scale, K2Src{});          \
    }
FOR_EACH_FORMAT_AND_HEAD_DIM(PREFILL_ATTENTION)

// The kivi2 build: the layer's codes, parameters, open blocks and turn table in place of one cache array; the open
// block is the rows' own (a tile's rows are one sequence's).
#define PREFILL_ATTENTION_K2(HD)                                                                                \
    extern "C" __global__ void __launch_bounds__(128) prefill_attention_k2_h##HD(                                \
        const float* q, const unsigned char* kc, const unsigned char* vc, const __half* kp, const __half* vp,   \
        const float* pool, const u32* k2rows, const float2* turn, int interleaved, float* out,                  \
        __nv_bfloat16* ob, const u32* tile_row0, const u32* tile_rows, const u32* row_ctx, const u32* row_table, \
        const u32* tables, int kv_heads, int group, size_t layer_vec, int layer, int layers, float scale) {     \
        const u32 r0 = tile_row0[gridDim.x - 1 - blockIdx.x];                                                   \
        const K2Src k2{kc, vc, kp, vp, pool, turn, k2rows[3 * r0 + 1], k2rows[3 * r0 + 2], interleaved, layer,  \
                       layers, layer_vec};                                                                      \
        prefill_attention_impl<k2tag, HD>(q, nullptr, nullptr, nullptr, nullptr, out, ob, tile_row0, tile_rows, \
                                          row_ctx, row_table, tables, kv_heads, group, K2_BS, 0, scale, k2);    \
    }
PREFILL_ATTENTION_K2(64)
PREFILL_ATTENTION_K2(128)
