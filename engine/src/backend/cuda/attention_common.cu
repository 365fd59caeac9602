// What every attention kernel on tensor cores shares (appended to kernels.cu when compiled, whose typedefs it uses;
// the decode, prefill and kivi2 attention files follow): the mma and register-transpose instructions, cp.async
// copies, the f16 packing, which keys a split holds, one tile's online softmax step, the merge of a block's warps,
// and the merge of a row's splits.
//
// Fragment layouts are those of PTX `mma.m16n8k16` (g = lane / 4, c = lane % 4): A holds rows g and g + 8 at
// columns 2c, 2c + 1 (a0, a1) and 2c + 8, 2c + 9 (a2, a3); B holds column g at rows 2c, 2c + 1 (b0) and 2c + 8,
// 2c + 9 (b1); the accumulator holds rows g and g + 8 at columns 2c, 2c + 1.
#define DA_WARPS 4
#define DA_TILE 16

__device__ __forceinline__ void mma_16816(float (&d)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
// The 8 x 8 f16 matrix held one row-fragment per lane, transposed across the warp.
__device__ __forceinline__ u32 transpose_8x8(u32 x) {
    u32 y;
    asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
    return y;
}
// Asynchronous global -> shared copies; an invalid source copies zeros (and reads nothing).
__device__ __forceinline__ void copy16(void* dst, const void* src, bool valid) {
    const u32 s = (u32)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void copy8(void* dst, const void* src, bool valid) {
    const u32 s = (u32)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(s), "l"(src), "r"(valid ? 8 : 0));
}
__device__ __forceinline__ void copy4(void* dst, const void* src, bool valid) {
    const u32 s = (u32)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(s), "l"(src), "r"(valid ? 4 : 0));
}
__device__ __forceinline__ void copy_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Waits until at most `pending` of this thread's copy groups are still in flight (an immediate in PTX).
__device__ __forceinline__ void copy_wait(int pending) {
    if (pending <= 1) asm volatile("cp.async.wait_group 1;\n" ::);
    else if (pending == 2) asm volatile("cp.async.wait_group 2;\n" ::);
    else asm volatile("cp.async.wait_group 3;\n" ::);
}
// 2^x by the special-function unit alone (subnormal results flush to zero, which a softmax weight can afford);
// `__expf` adds a range check and a rescale around it for subnormals.
__device__ __forceinline__ float ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}
__device__ __forceinline__ u32 pack_half2(float a, float b) {
    const __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<const u32*>(&h);
}
__device__ __forceinline__ u32 half2_bits(__half2 x) { return *reinterpret_cast<const u32*>(&x); }

// The keys of split `split` of a row with `ctx` visible keys, in whole 16-key tiles (a split of a short context may
// have none): [begin, end), and how many of its tiles warp `warp` takes when the block's warps take them in turn.
struct SplitKeys {
    u32 begin, end;
    int mine;
};
__device__ __forceinline__ SplitKeys split_keys(u32 ctx, int split, int splits, int warp) {
    const u32 chunk = (max(64u, (ctx + splits - 1) / splits) + DA_TILE - 1) / DA_TILE * DA_TILE;
    const u32 begin = min(ctx, split * chunk), end = min(ctx, begin + chunk);
    const int tiles = (int)((end - begin + DA_TILE - 1) / DA_TILE);
    return {begin, end, tiles > warp ? (tiles - warp + DA_WARPS - 1) / DA_WARPS : 0};
}

// After a split attention launch's blocks have left their parts (per head: unnormalized output over HD dims, then
// max and sum, in powers of two) in `part`, the last split block of a (row, KV head) to finish merges every split's
// part into `out` and resets the arrival count for the next launch. Every thread of the block calls it; `scratch`
// is shared memory free by then, group * (splits + 1) floats.
template <int HD>
__device__ void merge_splits(float* out, const float* part, u32* arrived, float* scratch, int r, int kvh, int kv_heads,
                             int group, int splits) {
    const int heads = kv_heads * group, lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    __shared__ u32 ticket;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) ticket = atomicAdd(&arrived[r * kv_heads + kvh], 1);
    __syncthreads();
    if (ticket != (u32)splits - 1) return;
    __threadfence();
    // Each split's weight per head, exp(max_split - max) (its sum folded into the total), into shared memory.
    float* wt = scratch;  // [group][splits], then the total per head
    float* total = wt + group * splits;
    for (int i = threadIdx.x; i < group * splits; i += blockDim.x) {
        const int h = i / splits, sp = i % splits;
        wt[i] = __ldcg(part + (((size_t)r * heads + kvh * group + h) * splits + sp) * (HD + 2) + HD);
    }
    __syncthreads();
    for (int h = warp; h < group; h += warps) {
        float mm = NEG_INF;
        for (int sp = lane; sp < splits; sp += 32) mm = fmaxf(mm, wt[h * splits + sp]);
        for (int o = 16; o > 0; o >>= 1) mm = fmaxf(mm, __shfl_xor_sync(0xffffffffu, mm, o));
        float ll = 0.f;
        for (int sp = lane; sp < splits; sp += 32) {
            const float ms = wt[h * splits + sp];
            const float f = ms == NEG_INF ? 0.f : ex2(ms - mm);
            ll += f * __ldcg(part + (((size_t)r * heads + kvh * group + h) * splits + sp) * (HD + 2) + HD + 1);
            wt[h * splits + sp] = f;
        }
        for (int o = 16; o > 0; o >>= 1) ll += __shfl_xor_sync(0xffffffffu, ll, o);
        if (lane == 0) total[h] = ll;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < group * HD; i += blockDim.x) {
        const int h = i / HD, d = i % HD, head = kvh * group + h;
        const float* pp = part + ((size_t)r * heads + head) * splits * (HD + 2) + d;
        const float* f = wt + h * splits;
        // Eight splits' loads in flight at a time: this loop runs once per (row, KV head) at the end of the launch,
        // and its L2 latency is the tail of the whole kernel.
        float v[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
        int sp = 0;
        for (; sp + 7 < splits; sp += 8) {
#pragma unroll
            for (int u = 0; u < 8; u++) v[u] += f[sp + u] * __ldcg(pp + (size_t)(sp + u) * (HD + 2));
        }
        for (; sp < splits; sp++) v[0] += f[sp] * __ldcg(pp + (size_t)sp * (HD + 2));
        const float sum8 = ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
        out[((size_t)r * heads + head) * HD + d] = total[h] > 0.f ? sum8 / total[h] : 0.f;
    }
    if (threadIdx.x == 0) arrived[r * kv_heads + kvh] = 0;
}

// One tile's online softmax for heads 2c and 2c + 1 (the 8 lanes sharing c hold one head pair's 16 keys), in
// powers of two: updates the running max and sum, rescales the output when a maximum rose, and leaves P^T as the
// value product's B fragments, each key's probabilities times `v0` (rows g) or `v1` (rows g + 8).
template <int MT>
__device__ __forceinline__ void softmax_tile(const float (&s)[4], float (&mx)[2], float (&sum)[2], float (&acc)[MT][4],
                                             float v0, float v1, u32& pb0, u32& pb1) {
    float p[4], corr[2];
    bool rose = false;
#pragma unroll
    for (int e = 0; e < 2; e++) {
        float m = fmaxf(s[e], s[e + 2]);
        m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 4));
        m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 8));
        m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 16));
        const float nm = fmaxf(mx[e], m);
        rose |= nm > mx[e];
        corr[e] = nm == NEG_INF ? 1.f : ex2(mx[e] - nm);
        p[e] = nm == NEG_INF ? 0.f : ex2(s[e] - nm);
        p[e + 2] = nm == NEG_INF ? 0.f : ex2(s[e + 2] - nm);
        sum[e] = sum[e] * corr[e] + p[e] + p[e + 2];
        mx[e] = nm;
    }
    // The output is rescaled only when a maximum of the warp rose (past the first tiles, seldom): otherwise every
    // factor is exactly 1.
    if (__any_sync(0xffffffffu, rose)) {
#pragma unroll
        for (int m2 = 0; m2 < MT; m2++) {
            acc[m2][0] *= corr[0];
            acc[m2][2] *= corr[0];
            acc[m2][1] *= corr[1];
            acc[m2][3] *= corr[1];
        }
    }
    pb0 = transpose_8x8(pack_half2(p[0] * v0, p[1] * v0));
    pb1 = transpose_8x8(pack_half2(p[2] * v1, p[3] * v1));
}

// After its tiles, each warp leaves its per-head state in its (now idle) ring: sums reduced over the lanes of each
// head pair, output at [head][dim] through the value mapping (m-tile 4q + w, row g: dimension 8 * (8q + g) + 2w;
// row g + 8: + 1), then max[8] and sum[8]; rings lie `region` floats apart from `smem` on. The block then merges its
// warps, thread per (head, dim), into `out` (one split) or this split's part, and with several splits the last
// split block to finish merges them all (`merge_splits`).
template <int HD, int MT>
__device__ __forceinline__ void finish_warps(const float (&acc)[MT][4], const float (&mx)[2], float (&sum)[2],
                                             unsigned char* ring, unsigned char* smem, size_t region, float* out,
                                             float* part, u32* arrived, int r, int kvh, int kv_heads, int group,
                                             int split, int splits) {
    const int lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3, heads = kv_heads * group;
#pragma unroll
    for (int e = 0; e < 2; e++) {
        sum[e] += __shfl_xor_sync(0xffffffffu, sum[e], 4);
        sum[e] += __shfl_xor_sync(0xffffffffu, sum[e], 8);
        sum[e] += __shfl_xor_sync(0xffffffffu, sum[e], 16);
    }
    __syncwarp();
    float* wo = reinterpret_cast<float*>(ring);  // [8 heads][HD], then max[8], sum[8]
#pragma unroll
    for (int m = 0; m < MT; m++) {
        const int d = 8 * (8 * (m / 4) + g) + 2 * (m % 4);
        wo[(2 * c) * HD + d] = acc[m][0];
        wo[(2 * c + 1) * HD + d] = acc[m][1];
        wo[(2 * c) * HD + d + 1] = acc[m][2];
        wo[(2 * c + 1) * HD + d + 1] = acc[m][3];
    }
    if (g == 0) {
        wo[8 * HD + 2 * c] = mx[0];
        wo[8 * HD + 2 * c + 1] = mx[1];
        wo[8 * HD + 8 + 2 * c] = sum[0];
        wo[8 * HD + 8 + 2 * c + 1] = sum[1];
    }
    __syncthreads();

    const float* all = reinterpret_cast<const float*>(smem);
    for (int i = threadIdx.x; i < group * HD; i += blockDim.x) {
        const int h = i / HD, d = i % HD;
        float mm = NEG_INF;
#pragma unroll
        for (int w = 0; w < DA_WARPS; w++) mm = fmaxf(mm, all[w * region + 8 * HD + h]);
        float v = 0.f, ll = 0.f;
#pragma unroll
        for (int w = 0; w < DA_WARPS; w++) {
            const float* ws = all + w * region;
            const float mw = ws[8 * HD + h];
            if (mw == NEG_INF) continue;
            const float f = ex2(mw - mm);
            v += ws[h * HD + d] * f;
            ll += ws[8 * HD + 8 + h] * f;
        }
        const int head = kvh * group + h;
        if (splits == 1) {
            out[((size_t)r * heads + head) * HD + d] = ll > 0.f ? v / ll : 0.f;
        } else {
            float* pp = part + (((size_t)r * heads + head) * splits + split) * (HD + 2);
            pp[d] = v;
            if (d == 0) {
                pp[HD] = mm;
                pp[HD + 1] = ll;
            }
        }
    }
    if (splits == 1) return;

    merge_splits<HD>(out, part, arrived, reinterpret_cast<float*>(smem), r, kvh, kv_heads, group, splits);
}
