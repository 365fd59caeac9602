// Decode attention over the paged cache on tensor cores, in the flash-decoding style (appended to kernels.cu and
// attention_common.cu when compiled, whose definitions it uses).
//
// Grid (query row, KV head, split); four warps per block. A split is a run of the row's visible keys in 16-key
// tiles, dealt to the warps in turn. Each warp streams its tiles through its own ring of shared-memory stages with
// cp.async (the raw cache bytes of any format, several tiles in flight, so the memory system never waits on the
// arithmetic), and keeps an online softmax for all G query heads of the KV head at once:
//
//   S^T (16 keys x 8 heads) = K (16 keys x HD) . Q^T (HD x 8 heads)        mma m16n8k16, K as operand A
//   O^T (HD x 8 heads)     += V^T (HD x 16 keys) . P^T (16 keys x 8 heads)  mma m16n8k16, V^T as operand A
//
// Putting the keys (not the up to 8 query heads) on the 16-row side wastes no tensor-core rows for G <= 8, and the
// probabilities go from the first product's accumulators to the second's B operand with one register transpose
// (movmatrix) per 8 keys. The order of the head dimensions inside a product does not change it, so each lane reads
// whole 8-dimension groups of a key: the dimension mapping below (`K_GROUP`, `V_GROUP`) is chosen for 16-byte
// shared-memory loads without bank conflicts (with the XOR swizzle applied when the tile is copied in), and the
// output is written back through the same mapping. int8 keys enter the products as exact small integers: a key's
// scale multiplies its score, a value's scale its probability, both in f32.
//
// After its tiles, a warp leaves (running max, sum, output) per head in shared memory and the block merges its warps.
// With one split the block writes the output; otherwise each split leaves (unnormalized output, max, sum) in `part`,
// and the last split block of a (row, KV head) to finish (counted in `arrived`, which it resets for the next launch)
// merges every split, all threads at once (`finish_warps`, `merge_splits`).

// Four signed bytes as two half2 holding the exact integers: bytes biased to unsigned, placed under the exponent of
// 1024, and 1152 (1024 + the bias) taken off again.
__device__ __forceinline__ void i8x4_to_half2x2(u32 w, u32& lo, u32& hi) {
    const u32 t = w ^ 0x80808080u;
    const __half2 bias = __halves2half2(__ushort_as_half(0x6480), __ushort_as_half(0x6480));
    const u32 a = __byte_perm(t, 0x64646464u, 0x4140), b = __byte_perm(t, 0x64646464u, 0x4342);
    const __half2 x = __hsub2(*reinterpret_cast<const __half2*>(&a), bias);
    const __half2 y = __hsub2(*reinterpret_cast<const __half2*>(&b), bias);
    lo = *reinterpret_cast<const u32*>(&x);
    hi = *reinterpret_cast<const u32*>(&y);
}

// What differs between cache formats: the bytes of an 8-dimension group, one group as four half2 words (dimension
// pairs 0-1, 2-3, 4-5, 6-7; int8 as exact integers and fp8 as exact values (/ `UNIT`), the scale (times `UNIT`)
// applied by the caller; int4 pairs differently, see
// below), how many resident blocks per SM the kernel's registers are bounded for, and how many tiles each warp's
// ring holds (`decode_stages` in module.rs sizes the rings alike).
template <typename T> struct Group;
template <> struct Group<__half> {
    static constexpr int BYTES = 16, MIN_BLOCKS = 2, STAGES = 3;
    static constexpr bool PIPELINED = false;
    static constexpr bool SCALED = false, AFFINE = false;
    static constexpr float UNIT = 1.f;
    static __device__ __forceinline__ void load(const unsigned char* p, u32 (&w)[4], u32 = 0) {
        const uint4 v = *reinterpret_cast<const uint4*>(p);
        w[0] = v.x; w[1] = v.y; w[2] = v.z; w[3] = v.w;
    }
};
template <> struct Group<float> {
    static constexpr int BYTES = 32, MIN_BLOCKS = 2, STAGES = 3;
    static constexpr bool PIPELINED = false;
    static constexpr bool SCALED = false, AFFINE = false;
    static constexpr float UNIT = 1.f;
    static __device__ __forceinline__ void load(const unsigned char* p, u32 (&w)[4], u32 = 0) {
        const float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
        w[0] = pack_half2(a.x, a.y); w[1] = pack_half2(a.z, a.w);
        w[2] = pack_half2(b.x, b.y); w[3] = pack_half2(b.z, b.w);
    }
};
template <> struct Group<i8> {
    static constexpr int BYTES = 8, MIN_BLOCKS = 2, STAGES = 3;
    static constexpr bool PIPELINED = true;
    static constexpr bool SCALED = true, AFFINE = false;
    static constexpr float UNIT = 1.f;
    static __device__ __forceinline__ void load(const unsigned char* p, u32 (&w)[4], u32 = 0) {
        const uint2 v = *reinterpret_cast<const uint2*>(p);
        i8x4_to_half2x2(v.x, w[0], w[1]);
        i8x4_to_half2x2(v.y, w[2], w[3]);
    }
};
// fp8: four codes to two half2. From sm_89 on, the hardware converts two E4M3 codes to an f16x2 of their exact
// values in one instruction. Before it, a code's sign and low seven bits moved under f16's sign and exponent make an
// f16 of the code's value / 256 (E4M3's exponent bias is 7, f16's 15; subnormals land on subnormals, exactly): three
// instructions per two codes, the 256 (`UNIT`) joining the row's scale.
#if __CUDA_ARCH__ >= 890
#define E4M3_UNIT 1.f
__device__ __forceinline__ void e4m3x4_to_half2x2(u32 w, u32& lo, u32& hi) {
    asm("{\n .reg .b16 a, b;\n mov.b32 {a, b}, %2;\n cvt.rn.f16x2.e4m3x2 %0, a;\n cvt.rn.f16x2.e4m3x2 %1, b;\n}\n"
        : "=r"(lo), "=r"(hi)
        : "r"(w));
}
#else
#define E4M3_UNIT 256.f
__device__ __forceinline__ u32 e4m3x2_to_half2(u32 w, u32 sel) {
    const u32 r = __byte_perm(w, 0u, sel);  // the two codes in the high bytes of the halves
    return (r & 0x80008000u) | ((r >> 1) & 0x3f803f80u);
}
__device__ __forceinline__ void e4m3x4_to_half2x2(u32 w, u32& lo, u32& hi) {
    lo = e4m3x2_to_half2(w, 0x1404u);  // bytes 0, 1
    hi = e4m3x2_to_half2(w, 0x3424u);  // bytes 2, 3
}
#endif
template <> struct Group<f8> {
    static constexpr int BYTES = 8, MIN_BLOCKS = 2, STAGES = 3;
    static constexpr bool PIPELINED = true;
    static constexpr bool SCALED = true, AFFINE = false;
    static constexpr float UNIT = E4M3_UNIT;
    static __device__ __forceinline__ void load(const unsigned char* p, u32 (&w)[4], u32 = 0) {
        const uint2 v = *reinterpret_cast<const uint2*>(p);
        e4m3x4_to_half2x2(v.x, w[0], w[1]);
        e4m3x4_to_half2x2(v.y, w[2], w[3]);
    }
};
// int4: eight 4-bit codes, dequantized with their group's (min, scale) (`affine`: two halves, min low). A mask puts
// two nibbles under the exponent of a power of two in one instruction (nibbles at bits 0-3 and 16-19 under 1024's,
// at bits 4-7 and 20-23 under 64's, whose mantissa step is 1/16: exact either way), the power comes off, then code *
// scale + min in one f16 FMA: two dimensions per three instructions. The pairs this yields are dimensions (0, 4),
// (1, 5), (2, 6), (3, 7) of the group, so for keys the query's B fragments are packed in that order too
// (`attention_impl`).
template <u32 MASK, unsigned short POWER>
__device__ __forceinline__ __half2 nibbles(u32 v, __half2 s2, __half2 m2) {
    const u32 h = (v & MASK) | ((u32)POWER << 16 | POWER);
    const __half2 k = __halves2half2(__ushort_as_half(POWER), __ushort_as_half(POWER));
    return __hfma2(__hsub2(*reinterpret_cast<const __half2*>(&h), k), s2, m2);
}
// Nibbles at bits 0-3 and 16-19 (under 1024), at bits 4-7 and 20-23 (under 64).
__device__ __forceinline__ __half2 nibbles_lo(u32 v, __half2 s2, __half2 m2) {
    return nibbles<0x000f000fu, 0x6400>(v, s2, m2);
}
__device__ __forceinline__ __half2 nibbles_hi(u32 v, __half2 s2, __half2 m2) {
    return nibbles<0x00f000f0u, 0x5400>(v, s2, m2);
}
template <> struct Group<u4x2> {
    static constexpr int BYTES = 4, STAGES = 4;
    static constexpr bool PIPELINED = true;
    static constexpr bool SCALED = false, AFFINE = true;
    static constexpr float UNIT = 1.f;
    // Its warps spend more instructions per byte than the others, so latency, not bandwidth, bounds them: registers
    // for four resident blocks per SM rather than two.
    static constexpr int MIN_BLOCKS = 4;
    static __device__ __forceinline__ void load(const unsigned char* p, u32 (&w)[4], u32 affine) {
        const u32 v = *reinterpret_cast<const u32*>(p);
        const __half2 ms = *reinterpret_cast<const __half2*>(&affine);
        const __half2 m2 = __low2half2(ms), s2 = __high2half2(ms);
        w[0] = half2_bits(nibbles_lo(v, s2, m2));       // dims 0, 4
        w[1] = half2_bits(nibbles_hi(v, s2, m2));       // dims 1, 5
        w[2] = half2_bits(nibbles_lo(v >> 8, s2, m2));  // dims 2, 6
        w[3] = half2_bits(nibbles_hi(v >> 8, s2, m2));  // dims 3, 7
    }
    // Two rows' groups `a` and `b` (with their affine words) as eight half2 of (row a, row b) for dims 0..7: the
    // operand layout of the value product directly (each row's bytes interleaved first, so that each mask takes the
    // same dimension of both rows).
    static __device__ __forceinline__ void load_rows(const unsigned char* pa, const unsigned char* pb, u32 fa, u32 fb,
                                                     u32 (&w)[8]) {
        const u32 a = *reinterpret_cast<const u32*>(pa), b = *reinterpret_cast<const u32*>(pb);
        // (min a, min b) and (scale a, scale b): one byte permute each.
        const u32 mw = __byte_perm(fa, fb, 0x5410), sw = __byte_perm(fa, fb, 0x7632);
        const __half2 m2 = *reinterpret_cast<const __half2*>(&mw), s2 = *reinterpret_cast<const __half2*>(&sw);
        const u32 lo = __byte_perm(a, b, 0x5410), hi = __byte_perm(a, b, 0x7632);  // dims 0-3, 4-7 of each row
        w[0] = half2_bits(nibbles_lo(lo, s2, m2));
        w[1] = half2_bits(nibbles_hi(lo, s2, m2));
        w[2] = half2_bits(nibbles_lo(lo >> 8, s2, m2));
        w[3] = half2_bits(nibbles_hi(lo >> 8, s2, m2));
        w[4] = half2_bits(nibbles_lo(hi, s2, m2));
        w[5] = half2_bits(nibbles_hi(hi, s2, m2));
        w[6] = half2_bits(nibbles_lo(hi >> 8, s2, m2));
        w[7] = half2_bits(nibbles_hi(hi >> 8, s2, m2));
    }
};

// Where group `grp` of tile row `r` lies in a staged tile (in groups). Keys are read by lanes (row g, c) taking
// group 4 * pair + c of rows g and g + 8; values by lanes taking group 8 * q + g of rows 2c, 2c + 1, 2c + 8, 2c + 9.
// The XOR spreads each phase of those loads over all banks: 8 lanes of 16-byte loads for f16 and f32 (whose 32-byte
// groups are read as two 16-byte halves), 16 lanes of 8-byte loads for int8 (whose XOR is even, so that the two
// groups of one 16-byte copy stay together).
// int4's 4-byte groups (32 lanes of 4-byte loads per phase) take the same even-multiple-of-4 XOR on both sides.
template <typename T, int HD> __device__ __forceinline__ int k_slot(int r, int grp) {
    if constexpr (Group<T>::BYTES == 4) return grp ^ (HD == 128 ? ((r >> 1) & 3) << 2 : ((r >> 1) & 1) << 2);
    else if constexpr (Group<T>::BYTES == 8) return grp ^ (HD == 128 ? (r & 3) << 2 : ((r >> 1) & 1) << 2);
    else return grp ^ ((r & 1) << 2);
}
template <typename T, int HD> __device__ __forceinline__ int v_slot(int r, int grp) {
    if constexpr (Group<T>::BYTES <= 8) return grp ^ (HD == 128 ? ((r >> 1) & 3) << 2 : ((r >> 1) & 1) << 2);
    else return grp ^ (((r >> 1) & 3) << 1);
}

// One stage of a warp's ring: K rows, V rows (16 x HD values each), then for int8 the words holding each row's K
// and V scale (16 + 16 u32) and a mask of which rows' scales sit in the upper half of their word, for int4 each
// row's (min, scale) pairs (K rows, then V rows; HD / 32 pairs each). The host sizes stages to this layout
// (`decode_stages` in module.rs) and passes the stride.
template <typename T, int HD> struct Stage {
    static constexpr int ROW = HD / 8 * Group<T>::BYTES;
    static constexpr int PARAMS = HD / 32 * 4;  // bytes of one int4 row's (min, scale) pairs
};

// The orthonormal Walsh-Hadamard turn of a query head held as decode attention's B fragments hold it: dimension
// (4p + c) * 8 + e in x[p][e] of the four lanes sharing g (c = lane % 4). Spans 1-4 lie within a lane's eight, 8
// and 16 across the lanes (xor 1, 2), 32 and up across its p. All lanes take part (the shuffles need the warp).
__device__ __forceinline__ float butterfly_across(float x, int c, int bit) {
    const float other = __shfl_xor_sync(0xffffffffu, x, bit);
    return (c & bit) ? other - x : x + other;
}
template <int HD> __device__ __forceinline__ void turn_query(float (&x)[HD / 32][8], int c) {
#pragma unroll
    for (int p = 0; p < HD / 32; p++) {
#pragma unroll
        for (int span = 1; span < 8; span <<= 1) {
#pragma unroll
            for (int e = 0; e < 8; e++) {
                if (e & span) continue;
                const float u = x[p][e], w = x[p][e + span];
                x[p][e] = u + w;
                x[p][e + span] = u - w;
            }
        }
    }
#pragma unroll
    for (int bit = 1; bit <= 2; bit <<= 1) {
#pragma unroll
        for (int p = 0; p < HD / 32; p++) {
#pragma unroll
            for (int e = 0; e < 8; e++) x[p][e] = butterfly_across(x[p][e], c, bit);
        }
    }
#pragma unroll
    for (int span = 1; span < HD / 32; span <<= 1) {
#pragma unroll
        for (int p = 0; p < HD / 32; p++) {
            if (p & span) continue;
#pragma unroll
            for (int e = 0; e < 8; e++) {
                const float u = x[p][e], w = x[p + span][e];
                x[p][e] = u + w;
                x[p + span][e] = u - w;
            }
        }
    }
    const float norm = rsqrtf((float)HD);
#pragma unroll
    for (int p = 0; p < HD / 32; p++) {
#pragma unroll
        for (int e = 0; e < 8; e++) x[p][e] *= norm;
    }
}

template <typename T, int HD>
__device__ void attention_impl(const float* q, const T* kc, const T* vc, const __half* ksc, const __half* vsc,
                               float* out, float* part, u32* arrived, const u32* row_ctx, const u32* row_table,
                               const u32* tables, int kv_heads, int group, int block_size, size_t layer_off,
                               float scale, int splits, int stage_bytes) {
    using G8 = Group<T>;
    constexpr int STAGES = G8::STAGES;
    constexpr int ROW = Stage<T, HD>::ROW, PARAMS = Stage<T, HD>::PARAMS, GROUPS = HD / 8, UNITS = ROW / 16;
    constexpr int MT = HD / 16;
    extern __shared__ __align__(128) unsigned char smem[];
    allow_next();  // the output projection behind may start loading its weights
    const int heads = kv_heads * group;
    const int r = blockIdx.x, kvh = blockIdx.y, split = blockIdx.z;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, c = lane & 3;
    unsigned char* ring = smem + (size_t)warp * STAGES * stage_bytes;

    // Q^T as B fragments, scaled (by log2(e) too, so that the softmax works in powers of two): lane (g, c) holds head
    // g's group 4 * pair + c; zeros for heads past the group. Over int4 keys (stored turned) the query is turned the
    // same way first (`turn_query`).
    scale *= 1.44269504088896341f;
    float qv[HD / 32][8];
#pragma unroll
    for (int p = 0; p < HD / 32; p++) {
        float4 a = make_float4(0.f, 0.f, 0.f, 0.f), b = a;
        if (g < group) {
            const float4* src = reinterpret_cast<const float4*>(q + ((size_t)r * heads + kvh * group + g) * HD +
                                                               (4 * p + c) * 8);
            a = src[0];
            b = src[1];
        }
        qv[p][0] = a.x; qv[p][1] = a.y; qv[p][2] = a.z; qv[p][3] = a.w;
        qv[p][4] = b.x; qv[p][5] = b.y; qv[p][6] = b.z; qv[p][7] = b.w;
    }
    if constexpr (G8::AFFINE) turn_query<HD>(qv, c);
    u32 qb[HD / 32][4];
#pragma unroll
    for (int p = 0; p < HD / 32; p++) {
        const float* x = qv[p];
        if constexpr (G8::AFFINE) {
            // The int4 keys' dimension pairs: (0, 4), (1, 5), (2, 6), (3, 7).
            qb[p][0] = pack_half2(x[0] * scale, x[4] * scale);
            qb[p][1] = pack_half2(x[1] * scale, x[5] * scale);
            qb[p][2] = pack_half2(x[2] * scale, x[6] * scale);
            qb[p][3] = pack_half2(x[3] * scale, x[7] * scale);
        } else {
            qb[p][0] = pack_half2(x[0] * scale, x[1] * scale);
            qb[p][1] = pack_half2(x[2] * scale, x[3] * scale);
            qb[p][2] = pack_half2(x[4] * scale, x[5] * scale);
            qb[p][3] = pack_half2(x[6] * scale, x[7] * scale);
        }
    }
    float acc[MT][4];
#pragma unroll
    for (int m = 0; m < MT; m++) acc[m][0] = acc[m][1] = acc[m][2] = acc[m][3] = 0.f;
    // Running max and (this lane's share of the) sum for heads 2c and 2c + 1.
    float mx[2] = {NEG_INF, NEG_INF}, sum[2] = {0.f, 0.f};

    // This split's keys, in whole tiles (a split of a short context may have none).
    const u32 ctx = row_ctx[r];
    const SplitKeys keys = split_keys(ctx, split, splits, warp);
    const u32 begin = keys.begin, end = keys.end;
    const int mine = keys.mine;
    const u32* table = tables + row_table[r];

    // Lane l's key in this warp's tiles (its row l % 16) as (key, index in the block table, offset in its block).
    // A warp's tiles lie `stride` keys apart, so the cursor steps from one to the next without dividing.
    const u32 stride = DA_WARPS * DA_TILE, stride_blocks = stride / block_size, stride_off = stride % block_size;
    u32 cur_t = begin + (u32)warp * DA_TILE + (lane & (DA_TILE - 1));
    u32 cur_idx = cur_t / block_size, cur_off = cur_t % block_size;
    auto advance = [&]() {
        cur_t += stride;
        cur_idx += stride_blocks;
        cur_off += stride_off;
        if (cur_off >= (u32)block_size) {
            cur_off -= block_size;
            cur_idx++;
        }
    };
    // The cache block of the cursor's key, which lies in this warp's tile `j` (0 past the split's keys). Read one
    // tile ahead of its copy, so that the warp never waits on the block table.
    auto block_at = [&](int j) -> u32 { return j < mine && cur_t < end ? table[cur_idx] : 0u; };
    // Starts the copy of a tile into stage `slot`: this lane's key `t` lies at offset `off` of cache block `blk`.
    // Each lane finds its row's place in the cache, and the 16-byte units are dealt out with the rows' offsets by
    // shuffle.
    auto issue = [&](int slot, u32 t, u32 blk, u32 off) {
        unsigned char* st = ring + slot * stage_bytes;
        const bool valid = t < end;
        // The row's vector index within the layer (its offset / HD), passed around in 32 bits.
        const u32 vec = valid ? ((u32)blk * kv_heads + kvh) * block_size + off : 0u;
        const u32 live = __ballot_sync(0xffffffffu, valid);
        // K and V units of a row lie alike (only the swizzle differs): one shuffle serves both copies.
#pragma unroll
        for (int i = 0; i < UNITS / 2; i++) {
            const int u = lane + 32 * i, row = u / UNITS, unit = u % UNITS;
            // The row's first byte (the store is addressed in bytes: int4 holds two dims per byte).
            const size_t o = (layer_off / HD + __shfl_sync(0xffffffffu, vec, row)) * ROW;
            const bool ok = (live >> row) & 1u;
#pragma unroll
            for (int which = 0; which < 2; which++) {
                const unsigned char* src = reinterpret_cast<const unsigned char*>(which ? vc : kc) + o + unit * 16;
                int slot;
                if constexpr (G8::BYTES >= 16) {
                    constexpr int PER = G8::BYTES / 16;  // 16-byte units per group
                    const int grp = unit / PER;
                    slot = (which ? v_slot<T, HD>(row, grp) : k_slot<T, HD>(row, grp)) * PER + unit % PER;
                } else {
                    constexpr int PER = 16 / G8::BYTES;  // groups per 16-byte unit (the XOR keeps them together)
                    slot = (which ? v_slot<T, HD>(row, PER * unit) : k_slot<T, HD>(row, PER * unit)) / PER;
                }
                copy16(st + which * DA_TILE * ROW + row * ROW + slot * 16, src, ok);
            }
        }
        if (G8::SCALED) {
            const size_t sv = layer_off / HD + vec;  // the scale's index in the whole store
            copy4(st + 2 * DA_TILE * ROW + lane * 4, (lane < DA_TILE ? ksc : vsc) + (sv & ~(size_t)1), valid);
            const u32 upper = __ballot_sync(0xffffffffu, valid && (sv & 1));
            if (lane == 0) *reinterpret_cast<u32*>(st + 2 * DA_TILE * ROW + 2 * DA_TILE * 4) = upper;
        }
        if constexpr (G8::AFFINE) {
            // Lane l < 16: row l's K (min, scale) pairs; lane 16 + l: its V pairs.
            const __half* src = (lane < DA_TILE ? ksc : vsc) + (layer_off / HD + vec) * (PARAMS / 2);
            unsigned char* dst = st + 2 * DA_TILE * ROW + lane * PARAMS;
            if constexpr (PARAMS == 16) copy16(dst, src, valid);
            else copy8(dst, src, valid);
        }
    };
    // A staged int4 row's (min, scale) for param group `pg` (K rows 0-15, V rows 16-31).
    auto affine = [&](const unsigned char* st, int row, int pg) -> u32 {
        return reinterpret_cast<const u32*>(st + 2 * DA_TILE * ROW + row * PARAMS)[pg];
    };
    // A staged row's scale (int8, fp8; times the format's unit): K rows are words 0-15, V rows 16-31; `upper`: the
    // tile's mask word.
    auto row_scale = [&](const unsigned char* st, u32 upper, int word, int row) -> float {
        const u32 w = reinterpret_cast<const u32*>(st + 2 * DA_TILE * ROW)[word];
        const unsigned short bits = (unsigned short)(((upper >> row) & 1u) ? w >> 16 : w & 0xffffu);
        return __half2float(__ushort_as_half(bits)) * G8::UNIT;
    };

    // Scores of the tile in stage `st` whose first key is `first`: rows g and g + 8 of the tile, heads 2c and 2c + 1.
    auto score = [&](const unsigned char* st, u32 first, float (&s)[4]) {
        s[0] = s[1] = s[2] = s[3] = 0.f;
        const unsigned char* ks = st;
#pragma unroll
        for (int p = 0; p < HD / 32; p++) {
            const int grp = 4 * p + c;
            u32 x[4], y[4];
            const int sx = k_slot<T, HD>(g, grp), sy = k_slot<T, HD>(g + 8, grp);
            // (int4: every group a lane reads for pair p lies in 32-dim param group p.)
            G8::load(ks + g * ROW + sx * G8::BYTES, x, G8::AFFINE ? affine(st, g, p) : 0u);
            G8::load(ks + (g + 8) * ROW + sy * G8::BYTES, y, G8::AFFINE ? affine(st, g + 8, p) : 0u);
            mma_16816(s, x[0], y[0], x[1], y[1], qb[p][0], qb[p][1]);
            mma_16816(s, x[2], y[2], x[3], y[3], qb[p][2], qb[p][3]);
        }
        if (G8::SCALED) {
            const u32 upper = *reinterpret_cast<const u32*>(st + 2 * DA_TILE * ROW + 2 * DA_TILE * 4);
            const float s0 = row_scale(st, upper, g, g), s1 = row_scale(st, upper, g + 8, g + 8);
            s[0] *= s0; s[1] *= s0; s[2] *= s1; s[3] *= s1;
        }
        if (first + g >= end) s[0] = s[1] = NEG_INF;
        if (first + g + 8 >= end) s[2] = s[3] = NEG_INF;
    };

    for (int j = 0; j < STAGES - 1; j++) {
        if (j < mine) issue(j, cur_t, block_at(j), cur_off);
        copy_commit();
        advance();
    }
    // The tile issued next (STAGES - 1 ahead of the one read): this lane's key, its block and offset.
    u32 next_t = cur_t, next_blk = block_at(STAGES - 1), next_off = cur_off;
    advance();
    int read_slot = 0, write_slot = STAGES - 1;
    u32 t0 = begin + (u32)warp * DA_TILE;  // the first key of the tile read
    // Pipelined formats score each tile's keys one tile ahead, so that the next tile's key products overlap this
    // tile's softmax and value products (their warps are bound by dependent arithmetic, not by bytes): the ring then
    // holds one tile fewer in flight.
    constexpr bool PIPE = G8::PIPELINED;
    float s[4];
    if constexpr (PIPE) {
        copy_wait(STAGES - 2);
        __syncwarp();
        score(ring, t0, s);
    }
    for (int j = 0; j < mine; j++, t0 += stride) {
        if (j + STAGES - 1 < mine) issue(write_slot, next_t, next_blk, next_off);
        copy_commit();
        next_t = cur_t;
        next_blk = block_at(j + STAGES);
        next_off = cur_off;
        advance();
        copy_wait(PIPE ? STAGES - 2 : STAGES - 1);
        __syncwarp();
        const unsigned char* st = ring + read_slot * stage_bytes;
        const unsigned char* vs = st + DA_TILE * ROW;
        // The stage read now takes the copy issued next (after the __syncwarp that ends this tile).
        write_slot = read_slot;
        read_slot = read_slot == STAGES - 1 ? 0 : read_slot + 1;
        // The next tile's scores (past the split's last tile, of whatever its stage holds, and never used).
        float sn[4];
        if constexpr (PIPE) score(ring + read_slot * stage_bytes, t0 + stride, sn);
        else score(st, t0, s);

        // P^T as B fragments (int8: each key's value scale folded into its probabilities).
        float v0 = 1.f, v1 = 1.f;
        if (G8::SCALED) {
            const u32 upper = *reinterpret_cast<const u32*>(st + 2 * DA_TILE * ROW + 2 * DA_TILE * 4);
            v0 = row_scale(st, upper, DA_TILE + g, g);
            v1 = row_scale(st, upper, DA_TILE + g + 8, g + 8);
        }
        u32 pb0, pb1;
        softmax_tile<MT>(s, mx, sum, acc, v0, v1, pb0, pb1);
        // Values: lane (g, c) takes groups 8q + g of rows 2c, 2c + 1, 2c + 8, 2c + 9; the m-tile 4q + w covers
        // dimension pair w of those groups (rows g and g + 8 of the m-tile are its two dimensions).
#pragma unroll
        for (int qg = 0; qg < GROUPS / 8; qg++) {
            const int grp = 8 * qg + g;
            const int r0 = 2 * c, r1 = 2 * c + 1, r2 = 2 * c + 8, r3 = 2 * c + 9;
            if constexpr (G8::AFFINE) {
                // int4: (key 2c, key 2c + 1) and (key 2c + 8, key 2c + 9) pairs per dimension, straight from the codes.
                const int pg = grp / 4;  // the group's 32-dim param group
                u32 a[8], d[8];
                G8::load_rows(vs + r0 * ROW + v_slot<T, HD>(r0, grp) * G8::BYTES,
                              vs + r1 * ROW + v_slot<T, HD>(r1, grp) * G8::BYTES, affine(st, 16 + r0, pg),
                              affine(st, 16 + r1, pg), a);
                G8::load_rows(vs + r2 * ROW + v_slot<T, HD>(r2, grp) * G8::BYTES,
                              vs + r3 * ROW + v_slot<T, HD>(r3, grp) * G8::BYTES, affine(st, 16 + r2, pg),
                              affine(st, 16 + r3, pg), d);
#pragma unroll
                for (int w = 0; w < 4; w++)
                    mma_16816(acc[4 * qg + w], a[2 * w], a[2 * w + 1], d[2 * w], d[2 * w + 1], pb0, pb1);
            } else {
                u32 a[4], b[4], d[4], e[4];
                G8::load(vs + r0 * ROW + v_slot<T, HD>(r0, grp) * G8::BYTES, a);
                G8::load(vs + r1 * ROW + v_slot<T, HD>(r1, grp) * G8::BYTES, b);
                G8::load(vs + r2 * ROW + v_slot<T, HD>(r2, grp) * G8::BYTES, d);
                G8::load(vs + r3 * ROW + v_slot<T, HD>(r3, grp) * G8::BYTES, e);
#pragma unroll
                for (int w = 0; w < 4; w++) {
                    mma_16816(acc[4 * qg + w], __byte_perm(a[w], b[w], 0x5410), __byte_perm(a[w], b[w], 0x7632),
                              __byte_perm(d[w], e[w], 0x5410), __byte_perm(d[w], e[w], 0x7632), pb0, pb1);
                }
            }
        }
        if constexpr (PIPE) {
#pragma unroll
            for (int i = 0; i < 4; i++) s[i] = sn[i];
        }
        __syncwarp();
    }
    asm volatile("cp.async.wait_all;\n" ::);

    finish_warps<HD, MT>(acc, mx, sum, ring, smem, (size_t)STAGES * stage_bytes / 4, out, part, arrived, r, kvh,
                         kv_heads, group, split, splits);
}

#define ATTENTION(T, TN, HD)                                                                                    \
    extern "C" __global__ void __launch_bounds__(DA_WARPS * 32, Group<T>::MIN_BLOCKS)                           \
        attention_##TN##_h##HD(                                                                                 \
        const float* q, const T* kc, const T* vc, const __half* ksc, const __half* vsc, float* out, float* part, \
        u32* arrived, const u32* row_ctx, const u32* row_table, const u32* tables, int kv_heads, int group,      \
        int block_size, size_t layer_off, float scale, int splits, int stage_bytes) {                           \
        attention_impl<T, HD>(q, kc, vc, ksc, vsc, out, part, arrived, row_ctx, row_table, tables, kv_heads,    \
                              group, block_size, layer_off, scale, splits, stage_bytes);                        \
    }
FOR_EACH_FORMAT_AND_HEAD_DIM(ATTENTION)
