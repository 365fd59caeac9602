// Drawing tokens on the device, by the rule of engine/src/sampling/draw.rs (the host's reference): penalties, then
// temperature, top-k and top-p as thresholds (radix selection over the values' bits, ties at a cut kept), min-p,
// then the kept weights walked in token order against u * total. One block of SAMPLE_THREADS threads per row; each
// thread owns a contiguous run of the row, so a block-wide prefix sum of the threads' masses finds the drawn token in
// index order.

#define SAMPLE_THREADS 1024

// The words of a draw as the host packs them (`draw_words` in plan.rs).
struct Draw {
    float temperature;
    u32 top_k;
    float top_p;
    float min_p;
    float u;
    // The row's penalties: `pen_count` (token, repetition, subtract) word triples starting `pen_off` words after
    // the first draw (they come with the step's plan).
    u32 pen_off;
    u32 pen_count;
};

// Order-preserving map of a float's bits to an unsigned key (larger float, larger key).
__device__ __forceinline__ u32 sample_key(float v) {
    const u32 b = __float_as_uint(v);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ float sample_unkey(u32 k) {
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// Block-wide sums and maxima (every thread gets the result).
__device__ double sample_sum(double v, double* red) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    double t = 0;
    for (int w = 0; w < SAMPLE_THREADS / 32; w++) t += red[w];
    return t;
}

__device__ float sample_max(float v, float* red) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    float t = NEG_INF;
    for (int w = 0; w < SAMPLE_THREADS / 32; w++) t = fmaxf(t, red[w]);
    return t;
}

// The largest key K such that the weight (count with MASS false, the value itself with MASS true) of the row's
// values with key >= K reaches `target`: 8 bits at a time from the top. Values with key < `floor` do not count.
template <bool MASS>
__device__ u32 sample_select(const float* v, int lo, int hi, u32 floor, double target, double* hist) {
    u32 prefix = 0;
    double above = 0;  // weight of values whose key is above the current prefix range
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int i = threadIdx.x; i < 256; i += SAMPLE_THREADS) hist[i] = 0;
        __syncthreads();
        const u32 mask = shift == 24 ? 0u : (0xffffffffu << (shift + 8));
        for (int c = lo; c < hi; c++) {
            const u32 k = sample_key(v[c]);
            if (k >= floor && (k & mask) == prefix) atomicAdd(&hist[(k >> shift) & 255], MASS ? (double)v[c] : 1.0);
        }
        __syncthreads();
        // Every thread scans the 256 bins from the top (cheap, and no broadcast needed).
        int digit = 0;
        double acc = above;
        for (int d = 255; d >= 0; d--) {
            if (acc + hist[d] >= target) { digit = d; break; }
            acc += hist[d];
        }
        above = acc;
        prefix |= (u32)digit << shift;
        __syncthreads();
    }
    return prefix;
}

// `x` (rows x cols logits) is overwritten with the weights.
extern "C" __global__ void sample_rows(float* x, const Draw* draws, u32* out, int cols) {
    __shared__ double hist[256];
    __shared__ double red[SAMPLE_THREADS / 32];
    __shared__ float redf[SAMPLE_THREADS / 32];
    __shared__ double prefix[SAMPLE_THREADS];
    __shared__ int found, lastk;
    const Draw d = draws[blockIdx.x];
    float* p = x + (size_t)blockIdx.x * cols;
    const int run = (cols + SAMPLE_THREADS - 1) / SAMPLE_THREADS;
    const int lo = min(cols, (int)threadIdx.x * run), hi = min(cols, lo + run);
    if (threadIdx.x == 0) { found = 0x7fffffff; lastk = -1; }
    // Penalties, at most one per token: rounded as on the host (no contraction into an FMA).
    const u32* pen = reinterpret_cast<const u32*>(draws) + d.pen_off;
    for (u32 i = threadIdx.x; i < d.pen_count; i += SAMPLE_THREADS) {
        const u32 t = pen[3 * i];
        if (t >= (u32)cols) continue;
        const float rep = __uint_as_float(pen[3 * i + 1]), sub = __uint_as_float(pen[3 * i + 2]);
        const float l = p[t];
        p[t] = __fsub_rn(l > 0.0f ? __fdiv_rn(l, rep) : __fmul_rn(l, rep), sub);
    }
    __syncthreads();

    if (d.temperature == 0.0f) {
        // Greedy: the lowest index holding the largest logit.
        float m = NEG_INF;
        for (int c = lo; c < hi; c++) m = fmaxf(m, p[c]);
        m = sample_max(m, redf);
        for (int c = lo; c < hi; c++)
            if (p[c] == m) { atomicMin(&found, c); break; }
        __syncthreads();
        if (threadIdx.x == 0) out[blockIdx.x] = found == 0x7fffffff ? 0u : (u32)found;
        return;
    }
    // z = logit * (1 / T), and its maximum.
    const float inv = 1.0f / d.temperature;
    float zmax = NEG_INF;
    for (int c = lo; c < hi; c++) {
        p[c] = p[c] * inv;
        zmax = fmaxf(zmax, p[c]);
    }
    zmax = sample_max(zmax, redf);
    // Top-k: keep z >= the k-th largest z.
    u32 zfloor = 0;
    if (d.top_k > 0 && d.top_k < (u32)cols) zfloor = sample_select<false>(p, lo, hi, 0, (double)d.top_k, hist);
    // Weights exp(z - max) of the kept, 0 elsewhere; min-p.
    for (int c = lo; c < hi; c++) {
        float w = sample_key(p[c]) >= zfloor ? expf(p[c] - zmax) : 0.0f;
        if (d.min_p > 0.0f && w < d.min_p) w = 0.0f;
        p[c] = w;
    }
    __syncthreads();
    // Top-p: keep weights >= the largest value whose mass reaches top_p of the total.
    if (d.top_p < 1.0f) {
        double own = 0;
        for (int c = lo; c < hi; c++) own += p[c];
        const double total = sample_sum(own, red);
        const u32 cut = sample_select<true>(p, lo, hi, sample_key(0.0f) + 1, (double)d.top_p * total, hist);
        const float cutv = sample_unkey(cut);
        for (int c = lo; c < hi; c++)
            if (p[c] < cutv) p[c] = 0.0f;
        __syncthreads();
    }
    // The draw: the first kept weight, in token order, whose running sum exceeds u * total.
    double own = 0;
    int last = -1;
    for (int c = lo; c < hi; c++) {
        own += p[c];
        if (p[c] > 0.0f) last = c;
    }
    prefix[threadIdx.x] = own;
    __syncthreads();
    // Inclusive scan of the threads' masses (Hillis-Steele; 10 rounds).
    for (int o = 1; o < SAMPLE_THREADS; o <<= 1) {
        const double add = threadIdx.x >= o ? prefix[threadIdx.x - o] : 0.0;
        __syncthreads();
        prefix[threadIdx.x] += add;
        __syncthreads();
    }
    const double total = prefix[SAMPLE_THREADS - 1];
    const double r = (double)d.u * total;
    const double before = threadIdx.x > 0 ? prefix[threadIdx.x - 1] : 0.0;
    if (last >= 0 && before <= r && r < prefix[threadIdx.x]) {
        // This thread's run holds the draw; rounding between the scan and this walk can leave it one short, in
        // which case the run's last kept token is the one.
        double acc = before;
        int hit = last;
        for (int c = lo; c < hi; c++) {
            acc += p[c];
            if (p[c] > 0.0f && acc > r) { hit = c; break; }
        }
        atomicMin(&found, hit);
    }
    if (last >= 0) atomicMax(&lastk, last);
    __syncthreads();
    // r at or past the total (rounding): the last kept token, as on the host.
    if (threadIdx.x == 0) out[blockIdx.x] = found != 0x7fffffff ? (u32)found : (lastk >= 0 ? (u32)lastk : 0u);
}
