// ---- KV blocks to and from a contiguous staging buffer (staging.rs) ----
// A GPU-to-GPU transfer moves whole blocks as the cache stores them. One plane of the store (K codes, V codes, or
// their scales or (min, scale) pairs) is [layer][block][bytes_per_block]; the staging buffer holds, for each layer
// of the range, each plane's listed blocks one after another. Copies go in 16-byte words (every plane's block is a
// multiple of 16 bytes: staging.rs checks it); thread blocks are laid out (block, layer, part of the block), and
// each thread moves every (gridDim.z * blockDim.x)-th word of its part, four loads in flight before their stores.
extern "C" __global__ void kv_blocks_copy(uint4* __restrict__ plane, const unsigned* __restrict__ blocks,
                                          unsigned layer0, unsigned block_words, unsigned long long layer_words,
                                          uint4* __restrict__ staging, unsigned long long plane_offset_words,
                                          unsigned long long staged_layer_words, int to_cache) {
    const unsigned b = blockIdx.x, l = blockIdx.y;
    uint4* cache = plane + (layer0 + l) * layer_words + (unsigned long long)blocks[b] * block_words;
    uint4* staged = staging + l * staged_layer_words + plane_offset_words + (unsigned long long)b * block_words;
    const uint4* from = to_cache ? staged : cache;
    uint4* to = to_cache ? cache : staged;
    const unsigned stride = gridDim.z * blockDim.x;
    unsigned w = blockIdx.z * blockDim.x + threadIdx.x;
    for (; w + 3 * stride < block_words; w += 4 * stride) {
        uint4 x0 = from[w], x1 = from[w + stride], x2 = from[w + 2 * stride], x3 = from[w + 3 * stride];
        to[w] = x0;
        to[w + stride] = x1;
        to[w + 2 * stride] = x2;
        to[w + 3 * stride] = x3;
    }
    for (; w < block_words; w += stride) to[w] = from[w];
}
