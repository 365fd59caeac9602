// Attention over a kivi2 cache on tensor cores, in the flash-decoding style (appended after attention_common.cu and
// kivi2.cu when compiled; decision 0018 and its addendum). Serves decode rows (and the rows of steps too small for
// prefill tiles): grid (row, KV head, split), four warps, each row reading its own context, as `attention_impl` in
// decode_attention.cu does, with the same softmax step, warp merge and split merge (attention_common.cu). A tile is one
// cache block (16 keys), so each warp streams whole block heads into its ring with cp.async: key codes, value codes,
// the keys' (min, scale) per channel and the values' per token and group, all contiguous.
//
// Keys are quantized in the frame of their block's first token (each turned back by RoPE for its offset t in the
// block), so a score turns each key forward again. For RoPE pair p with dims (a, b) and angle t * theta_p, the key
// k' = min + scale * code as read and the query q:
//
//   q . R(t) k' = cos (k'_a q_a + k'_b q_b) + sin (k'_a q_b - k'_b q_a)
//
// which is one row of E . Q'^T over twice the head dimension: per pair E[t] = (cos k'_a, cos k'_b, sin k'_a,
// sin k'_b) (built from the codes: a mask and a subtraction make the codes exact f16 integers, one f16 FMA applies
// the channels' (min, scale), two multiplies the angle's cos and sin), and Q' = (q_a, q_b, q_b, -q_a), fixed for
// the whole kernel. The block frame costs the product twice the depth, which tensor cores have to spare. The row's
// open block is read from its pool entry instead (exact keys already in the cache's frame: E[t] = (k_a, k_b, 0, 0)).
//
// The key product's depth is dealt out by pairs: at step i (16 columns of E) lane (g, c) supplies the pair
// `c * CH + (i ^ x)` (CH = HD / 8 steps, x a multiple of 4 that differs by c), as (cos k'_a, cos k'_b) at columns
// 2c, 2c + 1 and (sin k'_a, sin k'_b) at 2c + 8, 2c + 9 of rows g and g + 8, and the B lanes of the same c hold
// that pair's Q'. Only the pair's place in the depth changes with x: it spreads the lanes' loads of the channels'
// (min, scale) over all banks. The (cos, sin) table and Q' are staged once per block in the order lanes read them.
//
// Values are 2-bit per token in 32-dim groups, int4's layout at half the bits: the value product is int4's (V^T as
// operand A, P^T as B, the same dimension mapping), its operands unpacked from two bits a dimension.
#define K2_STAGES 4
static_assert(K2_BS == DA_TILE, "a kivi2 attention tile is one cache block");

// The bytes of one block head in a stage, in the order staged: key codes (16 tokens x HD / 4), value codes (alike),
// the keys' (min, scale) per channel, the values' per token and 32-dim group.
template <int HD> struct K2Tile {
    static constexpr int CODES = K2_BS * HD / 4, KPARAMS = HD * 4, VPARAMS = K2_BS * HD / 32 * 4;
    static constexpr int BYTES = 2 * CODES + KPARAMS + VPARAMS;
    static constexpr int CH = HD / 8;  // 16-column steps of the key product (its depth is 2 HD)
};
// Per step of the key product and lane: (cos, sin) f16 of its pair's angle for rows g and g + 8, then its B
// fragment of Q'^T (held here rather than in registers, which then suffice for four blocks per SM).
template <int HD> struct K2Smem {
    uint4 step[K2Tile<HD>::CH][32];
    __align__(16) unsigned char ring[DA_WARPS][K2_STAGES][K2Tile<HD>::BYTES];
};

// f16 bits of the power of two whose mantissa step puts a 2-bit code at bits 2e, 2e + 1 of a half on integers:
// 1024, 256, 64, 16.
__device__ __forceinline__ u32 k2_power(int e) { return e == 0 ? 0x6400u : e == 1 ? 0x5c00u : e == 2 ? 0x5400u : 0x4c00u; }
// The code at position `lo` (bits 2 lo, 2 lo + 1) of x's low half and at `hi` of its high half, as a half2 of the
// exact integers: one mask-and-or, one subtraction (positions are constants once unrolled).
__device__ __forceinline__ __half2 k2_codes(u32 x, int lo, int hi) {
    const u32 pw = k2_power(lo) | k2_power(hi) << 16;
    const u32 h = (x & ((3u << (2 * lo)) | (3u << (16 + 2 * hi)))) | pw;
    return __hsub2(*reinterpret_cast<const __half2*>(&h), *reinterpret_cast<const __half2*>(&pw));
}
// Dims 0..7 of a 32-dim value group for two tokens: `a` and `b` hold each token's 16 bits of codes (low bits), `fa`
// and `fb` their (min, scale) words; w[d] = (dim d of a, dim d of b), the value product's operand order.
__device__ __forceinline__ void k2_value_rows(u32 a, u32 b, u32 fa, u32 fb, u32 (&w)[8]) {
    const u32 mw = __byte_perm(fa, fb, 0x5410), sw = __byte_perm(fa, fb, 0x7632);
    const __half2 m2 = *reinterpret_cast<const __half2*>(&mw), s2 = *reinterpret_cast<const __half2*>(&sw);
    const u32 x = __byte_perm(a, b, 0x5410), y = x >> 8;
#pragma unroll
    for (int e = 0; e < 4; e++) {
        w[e] = half2_bits(__hfma2(k2_codes(x, e, e), s2, m2));
        w[4 + e] = half2_bits(__hfma2(k2_codes(y, e, e), s2, m2));
    }
}

template <int HD, bool INTERLEAVED>
__device__ void k2_attention_impl(K2Smem<HD>& sh, const float* q, const unsigned char* kc, const unsigned char* vc,
                                  const __half* kp, const __half* vp, const float* pool, const u32* k2rows,
                                  const float2* turn, float* out, float* part, u32* arrived, const u32* row_ctx,
                                  const u32* row_table, const u32* tables, int kv_heads, int group, size_t layer_vec,
                                  int layer, int layers, float scale, int splits) {
    using TL = K2Tile<HD>;
    constexpr int CH = TL::CH, MT = HD / 16, RW = HD / 16;  // RW: words of one token's codes
    allow_next();  // the output projection behind may start loading its weights
    const int r = blockIdx.x, kvh = blockIdx.y, split = blockIdx.z;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, c = lane & 3;
    const int heads = kv_heads * group;
    unsigned char* ring = &sh.ring[warp][0][0];
    // The pair lane c supplies at step i of the key product: x / 4 flips the groups of four pairs (HD 128: by c;
    // HD 64: by c / 2).
    auto flip = [](int cc) { return HD == 128 ? cc : cc >> 1; };
    auto pair_at = [&](int i, int cc) { return cc * CH + 4 * ((i >> 2) ^ flip(cc)) + (i & 3); };

    // Q'^T scaled (by log2(e) too: the softmax works in powers of two); zeros past the group.
    const float qscale = scale * 1.44269504088896341f;
    for (int i = threadIdx.x; i < CH * 32; i += blockDim.x) {
        const int k = i / 32, l = i % 32, gg = l >> 2, cc = l & 3;
        const int p = pair_at(k, cc);
        const auto [a, b] = pair_dims(p, HD / 2, INTERLEAVED);
        const float2 ta = turn[gg * (HD / 2) + p], tb = turn[(gg + 8) * (HD / 2) + p];
        float qa = 0.f, qbv = 0.f;
        if (gg < group) {
            const float* qh = q + ((size_t)r * heads + kvh * group + gg) * HD;
            qa = qh[a] * qscale;
            qbv = qh[b] * qscale;
        }
        sh.step[k][l] = make_uint4(pack_half2(ta.x, ta.y), pack_half2(tb.x, tb.y), pack_half2(qa, qbv),
                                   pack_half2(qbv, -qa));
    }
    __syncthreads();

    float acc[MT][4];
#pragma unroll
    for (int m = 0; m < MT; m++) acc[m][0] = acc[m][1] = acc[m][2] = acc[m][3] = 0.f;
    float mx[2] = {NEG_INF, NEG_INF}, sum[2] = {0.f, 0.f};

    const u32 ctx = row_ctx[r];
    const SplitKeys keys = split_keys(ctx, split, splits, warp);  // tiles of 16 keys: whole blocks
    const u32 begin = keys.begin, end = keys.end;
    const int mine = keys.mine;
    const u32* table = tables + row_table[r];
    const u32 open_kb = k2rows[3 * r + 1], open_entry = k2rows[3 * r + 2];
    // The warp's tile j is the block at index kb0 + j * DA_WARPS of the row's block table.
    const u32 kb0 = begin / K2_BS + warp;
    auto block_at = [&](int j) -> u32 { return j < mine ? table[kb0 + j * DA_WARPS] : 0u; };
    // Starts the copy of block head `blk` (table index kb) into stage `slot`; the values' (min, scale) of tokens past
    // the split read as zeros (never written, they could hold anything, and a zero probability times a NaN is NaN).
    auto issue = [&](int slot, u32 blk, u32 kb) {
        unsigned char* st = ring + slot * TL::BYTES;
        const size_t bh = k2_block_head(layer_vec, blk, kv_heads, kvh);
        constexpr int C16 = TL::CODES / 16, U16 = 2 * C16 + TL::KPARAMS / 16;
#pragma unroll
        for (int i = 0; i < (U16 + 31) / 32; i++) {
            const int u = lane + 32 * i;
            if (U16 % 32 == 0 || u < U16) {
                const unsigned char* src =
                    u < C16       ? kc + bh * TL::CODES + u * 16
                    : u < 2 * C16 ? vc + bh * TL::CODES + (u - C16) * 16
                                  : reinterpret_cast<const unsigned char*>(kp) + bh * TL::KPARAMS + (u - 2 * C16) * 16;
                copy16(st + u * 16, src, true);
            }
        }
        constexpr int U8 = TL::VPARAMS / 8, PER = U8 / K2_BS;  // 8-byte units, per token
        if (lane < U8)
            copy8(st + 2 * TL::CODES + TL::KPARAMS + lane * 8,
                  reinterpret_cast<const unsigned char*>(vp) + bh * TL::VPARAMS + lane * 8,
                  kb * K2_BS + lane / PER < end);
    };

    // Scores of the tile in stage `st` (block table index kb): rows g and g + 8, heads 2c and 2c + 1.
    auto score = [&](const unsigned char* st, u32 kb, float (&s)[4]) {
        s[0] = s[1] = s[2] = s[3] = 0.f;
        // Odd steps accumulate apart (added in at the end), halving the chain of dependent products.
        float so[4] = {0.f, 0.f, 0.f, 0.f};
        if (kb == open_kb) {
            const float* k0 = pool + k2_pool_key(open_entry, layer, layers, kv_heads, kvh, g, HD);
            const float* k1 = k0 + 8 * HD;
#pragma unroll
            for (int i = 0; i < CH; i++) {
                const auto [a, b] = pair_dims(pair_at(i, c), HD / 2, INTERLEAVED);
                const uint4 st = sh.step[i][lane];
                mma_16816(s, pack_half2(k0[a], k0[b]), pack_half2(k1[a], k1[b]), 0u, 0u, st.z, st.w);
            }
        } else {
            // The lane's code bytes of rows g and g + 8 in two words each. Halves: the first channels of its pairs
            // (pairs c * CH ..: CH / 4 bytes at byte `boff` of w[.][0]) and their second channels (the same bytes of
            // w[.][1], HD / 8 bytes further on). Interleaved: CH / 2 bytes, both channels of a pair in one byte.
            const u32* kw = reinterpret_cast<const u32*>(st);
            const u32* kpar = reinterpret_cast<const u32*>(st + 2 * TL::CODES);
            u32 w[2][2];
            int boff = 0;
#pragma unroll
            for (int R = 0; R < 2; R++) {
                const u32* row = kw + (g + 8 * R) * RW;
                if (INTERLEAVED) {
                    w[R][0] = row[HD == 128 ? 2 * c : c];
                    w[R][1] = HD == 128 ? row[2 * c + 1] : 0u;
                } else {
                    w[R][0] = row[HD == 128 ? c : c >> 1];
                    w[R][1] = row[HD == 128 ? 4 + c : 2 + (c >> 1)];
                    boff = HD == 128 ? 0 : 2 * (c & 1);
                }
            }
#pragma unroll
            for (int gi = 0; gi < CH / 4; gi++) {
                // The group's first pair, and its place among the lane's own pairs (whose code bytes w holds).
                const int p0 = pair_at(4 * gi, c), kbase = p0 - c * CH;
                u32 xr[2][2];  // per row: the code byte(s) of this group's four pairs, placed for k2_codes
#pragma unroll
                for (int R = 0; R < 2; R++) {
                    if (INTERLEAVED) {
                        const u32 jb = (u32)kbase / 2;  // two pairs a byte
                        xr[R][0] = __byte_perm(w[R][0], w[R][1], jb | jb << 8);
                        xr[R][1] = __byte_perm(w[R][0], w[R][1], (jb + 1) | (jb + 1) << 8);
                    } else {
                        const u32 jb = (u32)(kbase / 4 + boff);
                        xr[R][0] = xr[R][1] = __byte_perm(w[R][0], w[R][1], jb | (jb + 4) << 8);
                    }
                }
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int i = 4 * gi + e, p = p0 + e;
                    u32 wa, wb;
                    if (INTERLEAVED) {
                        const uint2 ab = reinterpret_cast<const uint2*>(kpar)[p];
                        wa = ab.x;
                        wb = ab.y;
                    } else {
                        wa = kpar[p];
                        wb = kpar[p + HD / 2];
                    }
                    const u32 mw = __byte_perm(wa, wb, 0x5410), sw = __byte_perm(wa, wb, 0x7632);
                    const __half2 m2 = *reinterpret_cast<const __half2*>(&mw);
                    const __half2 s2 = *reinterpret_cast<const __half2*>(&sw);
                    const uint4 cs = sh.step[i][lane];
                    u32 ec[2], es[2];
#pragma unroll
                    for (int R = 0; R < 2; R++) {
                        const __half2 c2 = INTERLEAVED ? k2_codes(xr[R][e >> 1], 2 * (e & 1), 2 * (e & 1) + 1)
                                                       : k2_codes(xr[R][0], e, e);
                        const __half2 k2 = __hfma2(c2, s2, m2);
                        const u32 t2 = R ? cs.y : cs.x;
                        const __half2 a2 = *reinterpret_cast<const __half2*>(&t2);
                        ec[R] = half2_bits(__hmul2(k2, __low2half2(a2)));
                        es[R] = half2_bits(__hmul2(k2, __high2half2(a2)));
                    }
                    mma_16816(e & 1 ? so : s, ec[0], ec[1], es[0], es[1], cs.z, cs.w);
                }
            }
        }
#pragma unroll
        for (int i = 0; i < 4; i++) s[i] += so[i];
        const u32 first = kb * K2_BS;
        if (first + g >= end) s[0] = s[1] = NEG_INF;
        if (first + g + 8 >= end) s[2] = s[3] = NEG_INF;
    };

    for (int j = 0; j < K2_STAGES - 1; j++) {
        if (j < mine) issue(j, block_at(j), kb0 + j * DA_WARPS);
        copy_commit();
    }
    u32 next_blk = block_at(K2_STAGES - 1);  // read one tile ahead of its copy
    int read_slot = 0, write_slot = K2_STAGES - 1;
    // Each tile's keys are scored one tile ahead, so that the next tile's key products overlap this tile's softmax
    // and value products.
    float s[4];
    copy_wait(K2_STAGES - 2);
    __syncwarp();
    score(ring, kb0, s);
    for (int j = 0; j < mine; j++) {
        const u32 kb = kb0 + j * DA_WARPS;
        if (j + K2_STAGES - 1 < mine) issue(write_slot, next_blk, kb + (K2_STAGES - 1) * DA_WARPS);
        copy_commit();
        next_blk = block_at(j + K2_STAGES);
        copy_wait(K2_STAGES - 2);
        __syncwarp();
        const unsigned char* st = ring + read_slot * TL::BYTES;
        write_slot = read_slot;
        read_slot = read_slot == K2_STAGES - 1 ? 0 : read_slot + 1;
        // The next tile's scores (past the warp's last tile, of whatever its stage holds, and never used).
        float sn[4];
        score(ring + read_slot * TL::BYTES, kb + DA_WARPS, sn);

        u32 pb0, pb1;
        softmax_tile<MT>(s, mx, sum, acc, 1.f, 1.f, pb0, pb1);
        // Values: lane (g, c) takes group 8q + g of tokens 2c, 2c + 1, 2c + 8, 2c + 9 (16 bits of codes each); the
        // m-tile 4q + w covers dimensions 2w, 2w + 1 of the group.
        const unsigned char* vs = st + TL::CODES;
        const u32* vpar = reinterpret_cast<const u32*>(st + 2 * TL::CODES + TL::KPARAMS);
#pragma unroll
        for (int qg = 0; qg < HD / 64; qg++) {
            const int grp = 8 * qg + g, pg = grp / 4;
            auto codes = [&](int t) -> u32 {
                return *reinterpret_cast<const unsigned short*>(vs + t * (HD / 4) + 2 * grp);
            };
            auto params = [&](int t) { return vpar[t * (HD / 32) + pg]; };
            const int r0 = 2 * c, r1 = 2 * c + 1, r2 = 2 * c + 8, r3 = 2 * c + 9;
            u32 a[8], d[8];
            k2_value_rows(codes(r0), codes(r1), params(r0), params(r1), a);
            k2_value_rows(codes(r2), codes(r3), params(r2), params(r3), d);
#pragma unroll
            for (int w = 0; w < 4; w++)
                mma_16816(acc[4 * qg + w], a[2 * w], a[2 * w + 1], d[2 * w], d[2 * w + 1], pb0, pb1);
        }
#pragma unroll
        for (int i = 0; i < 4; i++) s[i] = sn[i];
        __syncwarp();
    }
    asm volatile("cp.async.wait_all;\n" ::);

    finish_warps<HD, MT>(acc, mx, sum, ring, &sh.ring[0][0][0], (size_t)K2_STAGES * TL::BYTES / 4, out, part,
                         arrived, r, kvh, kv_heads, group, split, splits);
}

#define K2_ATTENTION(HD)                                                                                        \
    extern "C" __global__ void __launch_bounds__(DA_WARPS * 32, 4) attention_k2_h##HD(                          \
        const float* q, const unsigned char* kc, const unsigned char* vc, const __half* kp, const __half* vp,   \
        const float* pool, const u32* k2rows, const float2* turn, int interleaved, float* out, float* part,     \
        u32* arrived, const u32* row_ctx, const u32* row_table, const u32* tables, int kv_heads, int group,     \
        size_t layer_vec, int layer, int layers, float scale, int splits) {                                     \
        __shared__ K2Smem<HD> sh;                                                                               \
        if (interleaved)                                                                                        \
            k2_attention_impl<HD, true>(sh, q, kc, vc, kp, vp, pool, k2rows, turn, out, part, arrived, row_ctx, \
                                        row_table, tables, kv_heads, group, layer_vec, layer, layers, scale,    \
                                        splits);                                                                \
        else                                                                                                    \
            k2_attention_impl<HD, false>(sh, q, kc, vc, kp, vp, pool, k2rows, turn, out, part, arrived,         \
                                         row_ctx, row_table, tables, kv_heads, group, layer_vec, layer, layers, \
                                         scale, splits);                                                        \
    }
K2_ATTENTION(64)
K2_ATTENTION(128)

// Steps with prefill rows over a kivi2 cache take the tiled prefill kernel (prefill_attention.cu) instead, whose K
// and V tiles are staged in shared memory as f16: `k2_fetch_raw` and `k2_convert` (below) fill them from the codes.
// Each key is dequantized in its block's frame and turned forward by its offset (or read from the rows' open block
// entry, already in the cache's frame), so the kernel's products are the f16 cache's, and the codes are read once
// per tile of up to 64 rows and query head, where the kernel above reads them once per row.
struct k2tag {};  // the element type that names the kivi2 build of the prefill kernel
template <typename T> constexpr bool IS_K2 = false;
template <> constexpr bool IS_K2<k2tag> = true;
template <> struct Group<k2tag> {
    static constexpr bool AFFINE = false;  // keys are not Walsh-Hadamard turned
};
// Where a kivi2 layer lies and how its keys turn, for the prefill kernel (which otherwise takes one cache array).
struct K2Src {
    const unsigned char *kc, *vc;  // key and value codes
    const __half *kp, *vp;         // their (min, scale) pairs
    const float* pool;             // open blocks' exact keys
    const float2* turn;            // (cos, sin) of t * inv_freq[p], per offset t and pair p
    u32 open_kb, open_entry;       // the rows' open block (table index, or ~0) and its entry
    int interleaved, layer, layers;
    size_t layer_vec;
};

// A tile of BK keys (whole blocks) staged in two steps: `k2_fetch_raw` starts copying its block heads as they lie
// (K2Tile's layout, one after another) into shared memory, so that the copies overlap the previous tile's products;
// `k2_convert` then writes f16 rows from them. Blocks past `ctx` read as zeros.
template <int HD> constexpr int k2_raw_bytes(int bk) { return bk / K2_BS * K2Tile<HD>::BYTES; }
template <int HD, int BK>
__device__ void k2_fetch_raw(const K2Src& k2, const u32* table, u32 k0, u32 ctx, int kv_heads, int kvh,
                             unsigned char* raw) {
    using TL = K2Tile<HD>;
    constexpr int C16 = TL::CODES / 16, P16 = TL::KPARAMS / 16, UNITS = TL::BYTES / 16, TOTAL = BK / K2_BS * UNITS;
#pragma unroll
    for (int n = 0; n < (TOTAL + 127) / 128; n++) {
        const int i = (int)threadIdx.x + 128 * n;
        if (TOTAL % 128 != 0 && i >= TOTAL) break;
        const int j = i / UNITS, u = i % UNITS;
        const u32 kb = k0 / K2_BS + j;
        const bool ok = kb * K2_BS < ctx;
        const size_t bh = ok ? k2_block_head(k2.layer_vec, table[kb], kv_heads, kvh) : 0;
        const unsigned char* src =
            u < C16           ? k2.kc + bh * TL::CODES + u * 16
            : u < 2 * C16     ? k2.vc + bh * TL::CODES + (u - C16) * 16
            : u < 2 * C16 + P16 ? reinterpret_cast<const unsigned char*>(k2.kp) + bh * TL::KPARAMS + (u - 2 * C16) * 16
                              : reinterpret_cast<const unsigned char*>(k2.vp) + bh * TL::VPARAMS +
                                    (u - 2 * C16 - P16) * 16;
        copy16(raw + j * TL::BYTES + u * 16, src, ok);
    }
    copy_commit();
}
// Keys k0 .. k0 + BK - 1 from the staged block heads into `ks` and their values into `vs`, f16 rows of LD halves:
// each key dequantized in its block's frame and turned forward (or read from the open block's entry); keys at or
// past `ctx` as zeros (a zero probability times anything unwritten must stay 0). Threads take (key, RoPE pair)
// items for keys, (key, 8 dims) pieces for values.
template <int HD, int LD, int BK>
__device__ void k2_convert(const K2Src& k2, const unsigned char* raw, u32 k0, u32 ctx, int kv_heads, int kvh,
                           __half* ks, __half* vs) {
    using TL = K2Tile<HD>;
    constexpr int HALF = HD / 2;
#pragma unroll 4
    for (int n = 0; n < BK * HALF / 128; n++) {
        const int i = (int)threadIdx.x + 128 * n, kt = i / HALF, p = i % HALF;
        const auto [a, b] = pair_dims(p, HALF, k2.interleaved);
        const u32 t = k0 + kt, off = t % K2_BS;
        const unsigned char* blk = raw + (kt / K2_BS) * TL::BYTES;
        float ka = 0.f, kb = 0.f;
        if (t < ctx && t / K2_BS == k2.open_kb) {
            const float* x = k2.pool + k2_pool_key(k2.open_entry, k2.layer, k2.layers, kv_heads, kvh, off, HD);
            ka = x[a];
            kb = x[b];
        } else if (t < ctx) {
            const unsigned char* codes = blk + off * (HD / 4);
            const __half2* par = reinterpret_cast<const __half2*>(blk + 2 * TL::CODES);
            const float2 pa = __half22float2(par[a]), pb = __half22float2(par[b]);
            const float xa = pa.x + pa.y * (float)((codes[a / 4] >> (2 * (a % 4))) & 3u);
            const float xb = pb.x + pb.y * (float)((codes[b / 4] >> (2 * (b % 4))) & 3u);
            const float2 cs = k2.turn[off * HALF + p];
            ka = xa * cs.x - xb * cs.y;
            kb = xa * cs.y + xb * cs.x;
        }
        ks[kt * LD + a] = __float2half_rn(ka);
        ks[kt * LD + b] = __float2half_rn(kb);
    }
#pragma unroll 2
    for (int n = 0; n < BK * HD / 8 / 128; n++) {
        const int i = (int)threadIdx.x + 128 * n, kt = i / (HD / 8), j = i % (HD / 8);
        const u32 t = k0 + kt, off = t % K2_BS;
        const unsigned char* blk = raw + (kt / K2_BS) * TL::BYTES;
        uint4 w = make_uint4(0u, 0u, 0u, 0u);
        if (t < ctx) {
            const u32 c8 = *reinterpret_cast<const unsigned short*>(blk + TL::CODES + off * (HD / 4) + 2 * j);
            const float2 ms = __half22float2(
                reinterpret_cast<const __half2*>(blk + 2 * TL::CODES + TL::KPARAMS)[off * (HD / 32) + j / 4]);
            float f[8];
#pragma unroll
            for (int e = 0; e < 8; e++) f[e] = ms.x + ms.y * (float)((c8 >> (2 * e)) & 3u);
            w = make_uint4(pack_half2(f[0], f[1]), pack_half2(f[2], f[3]), pack_half2(f[4], f[5]),
                           pack_half2(f[6], f[7]));
        }
        *reinterpret_cast<uint4*>(vs + kt * LD + 8 * j) = w;
    }
}
