//! The block hash chain: the one definition of "same prefix" shared by workers and routers.
//!
//! `h_i = xxh3_64(seed, h_{i-1} || tokens of block i)` over complete blocks only, so a block's hash names its
//! whole prefix, not just its own tokens. Routers compute the same chain from a tokenized prompt to look up which
//! worker holds which prefix; a worker announces its block size and seed so a mismatch is caught at registration.

use xxhash_rust::xxh3::xxh3_64_with_seed;

/// A block's identity: a hash of its tokens and of every block before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockHash(pub u64);

/// Seed of the chain; routers and workers must agree on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HashSeed(pub u64);

impl Default for HashSeed {
    fn default() -> Self {
        Self(0x7a6e_6465_6d00_0001)
    }
}

/// Hash of one block given its parent's hash (`None` for the first block).
pub fn hash_block(seed: HashSeed, parent: Option<BlockHash>, tokens: &[u32]) -> BlockHash {
    hash_block_with(&mut Vec::new(), seed, parent, tokens)
}

/// [`hash_block`] serialising into the caller's buffer (a chain reuses one buffer for all its blocks).
fn hash_block_with(
    buf: &mut Vec<u8>,
    seed: HashSeed,
    parent: Option<BlockHash>,
    tokens: &[u32],
) -> BlockHash {
    buf.clear();
    match parent {
        Some(p) => {
            buf.push(1);
            buf.extend_from_slice(&p.0.to_le_bytes());
        }
        None => buf.push(0),
    }
    for t in tokens {
        buf.extend_from_slice(&t.to_le_bytes());
    }
    BlockHash(xxh3_64_with_seed(buf, seed.0))
}

/// Hashes of every complete block of `tokens`.
pub fn block_hashes(seed: HashSeed, tokens: &[u32], block_size: usize) -> Vec<BlockHash> {
    let mut out = Vec::with_capacity(tokens.len() / block_size.max(1));
    let mut buf = Vec::with_capacity(9 + block_size * 4);
    let mut parent = None;
    for chunk in tokens.chunks_exact(block_size) {
        let h = hash_block_with(&mut buf, seed, parent, chunk);
        out.push(h);
        parent = Some(h);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn partial_blocks_are_not_hashed() {
        assert_eq!(block_hashes(HashSeed::default(), &[1, 2, 3], 4).len(), 0);
        assert_eq!(
            block_hashes(HashSeed::default(), &[1, 2, 3, 4, 5], 4).len(),
            1
        );
    }

    #[test]
    fn seed_changes_every_hash() {
        let t: Vec<u32> = (0..32).collect();
        let a = block_hashes(HashSeed(1), &t, 16);
        let b = block_hashes(HashSeed(2), &t, 16);
        assert!(a.iter().zip(&b).all(|(x, y)| x != y));
    }

    proptest! {
        #[test]
        fn hash_names_the_whole_prefix(a in proptest::collection::vec(0u32..50_000, 32..64), flip in 0usize..16) {
            let h = block_hashes(HashSeed::default(), &a, 16);
            // Same tokens, same chain; a prefix of the tokens gives a prefix of the chain.
            prop_assert_eq!(&h, &block_hashes(HashSeed::default(), &a, 16));
            prop_assert_eq!(&h[..1], &block_hashes(HashSeed::default(), &a[..16], 16)[..]);
            // Changing a token of block 0 changes block 1's hash even though block 1's tokens are equal.
            let mut b = a.clone();
            b[flip] ^= 1;
            let hb = block_hashes(HashSeed::default(), &b, 16);
            prop_assert_ne!(h[0], hb[0]);
            prop_assert_ne!(h[1], hb[1]);
        }
    }
}
