//! Block ids and their lifecycle: free -> owned (refcount >= 1) -> cached (refcount 0, hash kept) -> evicted.
//!
//! Invariants, checked by the property test below:
//! - a block is in exactly one of: the free list, the LRU of cached blocks, or owned (refcount > 0);
//! - the hash index maps a hash to a block that carries that hash;
//! - allocation is all-or-nothing: when it fails no block changes state.
//!
//! Every change a router cares about (a hash becoming available, a hash evicted) is appended to an event log with
//! a sequence number, drained by the node that owns the pool. Cost: O(1) per block for allocate/release and
//! O(log n) for LRU moves.

use super::hash::BlockHash;
use crate::error::{EngineError, Result};
use std::collections::{BTreeMap, HashMap};

/// A physical block of the KV store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockId(pub u32);

/// A change in which prefixes this pool can serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvEvent {
    Stored { seq: u64, hashes: Vec<BlockHash> },
    Removed { seq: u64, hashes: Vec<BlockHash> },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStats {
    pub total: usize,
    /// Never used or invalidated.
    pub free: usize,
    /// Unreferenced but holding a reusable prefix.
    pub cached: usize,
    /// Referenced by at least one sequence.
    pub used: usize,
}

#[derive(Debug, Clone, Default)]
struct Meta {
    refcount: u32,
    hash: Option<BlockHash>,
    /// Key in the LRU map while cached.
    lru_tick: Option<u64>,
}

#[derive(Debug)]
pub struct BlockPool {
    meta: Vec<Meta>,
    free: Vec<BlockId>,
    lru: BTreeMap<u64, BlockId>,
    by_hash: HashMap<BlockHash, BlockId>,
    tick: u64,
    events: Vec<KvEvent>,
    event_seq: u64,
}

impl BlockPool {
    pub fn new(num_blocks: usize) -> Self {
        Self {
            meta: vec![Meta::default(); num_blocks],
            // Pop from the end: hand out low ids first.
            free: (0..num_blocks as u32).rev().map(BlockId).collect(),
            lru: BTreeMap::new(),
            by_hash: HashMap::new(),
            tick: 0,
            events: Vec::new(),
            event_seq: 0,
        }
    }

    pub fn stats(&self) -> PoolStats {
        let cached = self.lru.len();
        let free = self.free.len();
        PoolStats {
            total: self.meta.len(),
            free,
            cached,
            used: self.meta.len() - free - cached,
        }
    }

    /// Blocks an allocation can obtain right now (free plus evictable).
    pub fn available(&self) -> usize {
        self.free.len() + self.lru.len()
    }

    /// Takes `n` blocks, evicting least-recently-used cached blocks when the free list runs out.
    pub fn allocate(&mut self, n: usize) -> Result<Vec<BlockId>> {
        if n > self.available() {
            return Err(EngineError::OutOfBlocks {
                needed: n,
                available: self.available(),
            });
        }
        let mut out = Vec::with_capacity(n);
        let mut evicted = Vec::new();
        for _ in 0..n {
            let id = match self.free.pop() {
                Some(id) => id,
                None => {
                    let (_, id) = self
                        .lru
                        .pop_first()
                        .expect("available() counted this block");
                    evicted.extend(self.uncache(id));
                    id
                }
            };
            self.meta[id.0 as usize].refcount = 1;
            out.push(id);
        }
        if !evicted.is_empty() {
            self.push_event(|seq| KvEvent::Removed {
                seq,
                hashes: evicted,
            });
        }
        Ok(out)
    }

    /// Finds the longest run of `hashes` held by this pool and takes a reference on each block of it.
    pub fn acquire_prefix(&mut self, hashes: &[BlockHash]) -> Vec<BlockId> {
        let mut out = Vec::new();
        for h in hashes {
            let Some(&id) = self.by_hash.get(h) else {
                break;
            };
            let m = &mut self.meta[id.0 as usize];
            if let Some(t) = m.lru_tick.take() {
                self.lru.remove(&t);
            }
            m.refcount += 1;
            out.push(id);
        }
        out
    }

    /// How many leading `hashes` this pool holds, without taking references.
    pub fn cached_prefix_len(&self, hashes: &[BlockHash]) -> usize {
        hashes
            .iter()
            .take_while(|h| self.by_hash.contains_key(h))
            .count()
    }

    /// Marks an owned, completely filled block as holding `hash`, making it findable by later sequences.
    pub fn commit(&mut self, id: BlockId, hash: BlockHash) {
        let m = &mut self.meta[id.0 as usize];
        debug_assert!(m.refcount > 0, "commit of an unowned block");
        if m.hash.is_some() {
            return;
        }
        m.hash = Some(hash);
        // If another block already holds this prefix, keep the first: both are valid, one is enough to index.
        if let std::collections::hash_map::Entry::Vacant(e) = self.by_hash.entry(hash) {
            e.insert(id);
            self.push_event(|seq| KvEvent::Stored {
                seq,
                hashes: vec![hash],
            });
        }
    }

    /// Drops one reference to each block; unreferenced blocks become cached (if hashed) or free.
    ///
    /// A sequence's blocks are given back tail first, so a block always enters the LRU before its parent and is
    /// evicted first: a cached child never outlives its prefix (it would be unreachable), and a router may take a
    /// worker holding block `i` of a prompt to hold blocks `0..i` too.
    pub fn release(&mut self, ids: &[BlockId]) {
        for &id in ids.iter().rev() {
            let m = &mut self.meta[id.0 as usize];
            assert!(m.refcount > 0, "double release of block {}", id.0);
            m.refcount -= 1;
            if m.refcount > 0 {
                continue;
            }
            let indexed = m.hash.is_some_and(|h| self.by_hash.get(&h) == Some(&id));
            if indexed {
                self.tick += 1;
                m.lru_tick = Some(self.tick);
                self.lru.insert(self.tick, id);
            } else {
                m.hash = None;
                self.free.push(id);
            }
        }
    }

    /// Forgets every cached prefix that no sequence references (its blocks become free; one `Removed` event lists
    /// the hashes). Blocks in use keep their hashes. Returns how many blocks were dropped from the cache.
    pub fn reset_prefix_cache(&mut self) -> usize {
        let mut removed = Vec::new();
        let dropped = self.lru.len();
        for (_, id) in std::mem::take(&mut self.lru) {
            removed.extend(self.uncache(id));
            self.free.push(id);
        }
        if !removed.is_empty() {
            self.push_event(|seq| KvEvent::Removed {
                seq,
                hashes: removed,
            });
        }
        dropped
    }

    /// Clears a block taken out of the LRU of its hash; returns the hash if the index named this block for it.
    fn uncache(&mut self, id: BlockId) -> Option<BlockHash> {
        let m = &mut self.meta[id.0 as usize];
        m.lru_tick = None;
        let h = m.hash.take()?;
        (self.by_hash.get(&h) == Some(&id)).then(|| {
            self.by_hash.remove(&h);
            h
        })
    }

    pub fn refcount(&self, id: BlockId) -> u32 {
        self.meta[id.0 as usize].refcount
    }

    /// Every hash this pool can serve a prefix from (cached or in use), for a router's resynchronisation, with the
    /// sequence number of the last event recorded: events after it change the set.
    pub fn snapshot(&self) -> (u64, Vec<BlockHash>) {
        (self.event_seq, self.by_hash.keys().copied().collect())
    }

    /// Takes the events recorded since the last call.
    pub fn drain_events(&mut self) -> Vec<KvEvent> {
        std::mem::take(&mut self.events)
    }

    fn push_event(&mut self, make: impl FnOnce(u64) -> KvEvent) {
        self.event_seq += 1;
        let e = make(self.event_seq);
        self.events.push(e);
    }

    #[cfg(test)]
    fn check_invariants(&self) {
        let mut seen = vec![0u8; self.meta.len()];
        for id in &self.free {
            seen[id.0 as usize] += 1;
            assert_eq!(self.meta[id.0 as usize].refcount, 0);
        }
        for (t, id) in &self.lru {
            seen[id.0 as usize] += 1;
            let m = &self.meta[id.0 as usize];
            assert_eq!((m.refcount, m.lru_tick), (0, Some(*t)));
        }
        for (i, m) in self.meta.iter().enumerate() {
            if m.refcount > 0 {
                seen[i] += 1;
            }
        }
        assert!(
            seen.iter().all(|&s| s == 1),
            "a block is in more or fewer than one state: {seen:?}"
        );
        for (h, id) in &self.by_hash {
            assert_eq!(self.meta[id.0 as usize].hash, Some(*h));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn freed_prefix_is_reused_until_evicted() {
        let mut p = BlockPool::new(4);
        let a = p.allocate(2).unwrap();
        p.commit(a[0], BlockHash(10));
        p.commit(a[1], BlockHash(11));
        p.release(&a);
        assert_eq!(
            p.stats(),
            PoolStats {
                total: 4,
                free: 2,
                cached: 2,
                used: 0
            }
        );
        let hit = p.acquire_prefix(&[BlockHash(10), BlockHash(11), BlockHash(12)]);
        assert_eq!(hit, a);
        p.release(&hit);
        // Needing all four blocks evicts the cached two, oldest first, and reports them removed.
        let all = p.allocate(4).unwrap();
        assert_eq!(all.len(), 4);
        assert!(p.acquire_prefix(&[BlockHash(10)]).is_empty());
        let ev = p.drain_events();
        assert!(matches!(ev.last(), Some(KvEvent::Removed { hashes, .. }) if hashes.len() == 2));
    }

    #[test]
    fn a_released_sequence_loses_its_tail_first_and_snapshots_list_what_is_held() {
        let mut p = BlockPool::new(3);
        let a = p.allocate(3).unwrap();
        for (i, &id) in a.iter().enumerate() {
            p.commit(id, BlockHash(20 + i as u64));
        }
        p.release(&a);
        p.drain_events();
        // One new block evicts the last block of the prefix, not its first.
        let b = p.allocate(1).unwrap();
        assert_eq!(
            p.drain_events(),
            vec![KvEvent::Removed {
                seq: 4,
                hashes: vec![BlockHash(22)]
            }]
        );
        assert_eq!(
            p.cached_prefix_len(&[BlockHash(20), BlockHash(21), BlockHash(22)]),
            2
        );
        let (seq, mut held) = p.snapshot();
        held.sort();
        assert_eq!((seq, held), (4, vec![BlockHash(20), BlockHash(21)]));
        p.release(&b);
    }

    #[test]
    fn failed_allocation_changes_nothing() {
        let mut p = BlockPool::new(3);
        let a = p.allocate(2).unwrap();
        let before = p.stats();
        let e = p.allocate(2).unwrap_err();
        assert!(matches!(
            e,
            EngineError::OutOfBlocks {
                needed: 2,
                available: 1
            }
        ));
        assert_eq!(p.stats(), before);
        p.release(&a);
    }

    #[test]
    fn shared_block_survives_until_last_release() {
        let mut p = BlockPool::new(2);
        let a = p.allocate(1).unwrap();
        p.commit(a[0], BlockHash(1));
        let b = p.acquire_prefix(&[BlockHash(1)]);
        assert_eq!(p.refcount(a[0]), 2);
        p.release(&a);
        assert_eq!(p.stats().used, 1);
        p.release(&b);
        assert_eq!(p.stats().cached, 1);
    }

    #[test]
    fn reset_forgets_unreferenced_prefixes_only() {
        let mut p = BlockPool::new(3);
        let a = p.allocate(2).unwrap();
        p.commit(a[0], BlockHash(1));
        p.commit(a[1], BlockHash(2));
        p.release(&a[..1]);
        p.drain_events();
        assert_eq!(p.reset_prefix_cache(), 1);
        assert_eq!(p.stats().free, 2);
        assert!(p.acquire_prefix(&[BlockHash(1)]).is_empty());
        assert_eq!(
            p.cached_prefix_len(&[BlockHash(2)]),
            1,
            "a block in use keeps its hash"
        );
        assert_eq!(
            p.drain_events(),
            vec![KvEvent::Removed {
                seq: 3,
                hashes: vec![BlockHash(1)]
            }]
        );
        p.release(&a[1..]);
        assert_eq!(p.stats().cached, 1);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Alloc(usize),
        Commit(usize, u64),
        Release(usize),
        Acquire(Vec<u64>),
        Reset,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (1usize..4).prop_map(Op::Alloc),
            (0usize..8, 0u64..6).prop_map(|(i, h)| Op::Commit(i, h)),
            (0usize..8).prop_map(Op::Release),
            proptest::collection::vec(0u64..6, 1..4).prop_map(Op::Acquire),
            Just(Op::Reset),
        ]
    }

    proptest! {
        #[test]
        fn invariants_hold_under_any_sequence(ops in proptest::collection::vec(op(), 1..200)) {
            let mut p = BlockPool::new(8);
            let mut held: Vec<BlockId> = Vec::new();
            for o in ops {
                match o {
                    Op::Alloc(n) => if let Ok(ids) = p.allocate(n) { held.extend(ids) },
                    Op::Commit(i, h) => if let Some(&id) = held.get(i) { p.commit(id, BlockHash(h)) },
                    Op::Release(i) => if i < held.len() { let id = held.swap_remove(i); p.release(&[id]) },
                    Op::Acquire(hs) => {
                        let hs: Vec<_> = hs.into_iter().map(BlockHash).collect();
                        held.extend(p.acquire_prefix(&hs));
                    }
                    Op::Reset => {
                        p.reset_prefix_cache();
                        prop_assert_eq!(p.stats().cached, 0);
                    }
                }
                p.check_invariants();
                prop_assert_eq!(p.stats().used, {
                    let mut u: Vec<_> = held.clone(); u.sort(); u.dedup(); u.len()
                });
            }
            p.release(&held);
            p.check_invariants();
            prop_assert_eq!(p.stats().used, 0);
        }
    }
}
