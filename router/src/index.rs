//! The exact prefix index: which block hashes every worker holds, built only from the workers' own KV events
//! (stored / removed, numbered) and snapshots, never from text. It answers one question for the policy: how many
//! leading blocks of this prompt does each worker already hold?
//!
//! Exactness rules. A worker's events must arrive numbered `last + 1`; anything else (a lost message, a reconnect)
//! is a gap, and the worker's entries are dropped until a snapshot (`seq`, every hash held) replaces them, so the
//! index never keeps a guess. A worker may not hold more blocks than it announced at registration: an event that
//! would exceed it is treated like a gap. Memory is thus bounded by the sum of the workers' KV capacities, and
//! [`PrefixIndex::stats`] reports it.
//!
//! Lookups rely on the chain invariant workers keep: a worker holding block `i` of a prompt holds blocks `0..i`
//! (workers evict a sequence's tail first; see `BlockPool::release`), so only the blocks where the number of
//! holders drops need visiting ([`PrefixIndex::matches`]).

use std::collections::{HashMap, HashSet};
use tandem_engine::kv::{BlockHash, KvEvent};

/// A worker's dense index in this router (assigned at registration, never reused while it is registered).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkerId(pub u32);

/// Why a worker's event was not applied. Its entries are gone until [`PrefixIndex::load_snapshot`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IndexError {
    #[error("worker {0:?} is not registered")]
    UnknownWorker(WorkerId),
    #[error("worker {worker:?} skipped KV events: expected sequence number {expected}, got {got}")]
    Gap {
        worker: WorkerId,
        expected: u64,
        got: u64,
    },
    #[error("worker {worker:?} announced {capacity} blocks but reports more")]
    OverCapacity { worker: WorkerId, capacity: usize },
    #[error("worker {0:?} awaits a snapshot")]
    AwaitingSnapshot(WorkerId),
}

#[derive(Debug)]
struct WorkerBlocks {
    capacity: usize,
    /// Sequence number of the last event applied; `None` until the first snapshot.
    last_seq: Option<u64>,
    hashes: HashSet<BlockHash>,
}

/// Size of the index, for metrics and the memory bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct IndexStats {
    pub workers: usize,
    /// Distinct block hashes held anywhere.
    pub blocks: usize,
    /// (worker, block) pairs.
    pub entries: usize,
    /// Estimated heap bytes of both maps (capacity-based, so it counts what is reserved).
    pub memory_bytes: usize,
}

#[derive(Debug, Default)]
pub struct PrefixIndex {
    /// Who holds each hash; a handful of workers in the common case.
    holders: HashMap<BlockHash, Vec<WorkerId>>,
    /// Indexed by `WorkerId.0`.
    workers: Vec<Option<WorkerBlocks>>,
    entries: usize,
    /// Per-lookup scratch: depth found per worker (0 = not placed), reset after each lookup.
    depth: Vec<u32>,
}

impl PrefixIndex {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `worker` with room for `capacity` blocks; it counts as holding nothing until its first snapshot.
    /// Registering an id again resets it.
    pub fn add_worker(&mut self, worker: WorkerId, capacity: usize) {
        let i = worker.0 as usize;
        if i >= self.workers.len() {
            self.workers.resize_with(i + 1, || None);
            self.depth.resize(i + 1, 0);
        }
        self.clear(worker);
        self.workers[i] = Some(WorkerBlocks {
            capacity,
            last_seq: None,
            hashes: HashSet::new(),
        });
    }

    /// Forgets a worker and every entry it had.
    pub fn remove_worker(&mut self, worker: WorkerId) {
        self.clear(worker);
        if let Some(w) = self.workers.get_mut(worker.0 as usize) {
            *w = None;
        }
    }

    /// Whether the worker is registered and in sync (has loaded a snapshot and seen no gap since).
    pub fn is_synced(&self, worker: WorkerId) -> bool {
        self.worker(worker).is_some_and(|w| w.last_seq.is_some())
    }

    /// Replaces the worker's entries with `hashes`, current as of its event `seq`.
    pub fn load_snapshot(
        &mut self,
        worker: WorkerId,
        seq: u64,
        hashes: impl IntoIterator<Item = BlockHash>,
    ) -> Result<(), IndexError> {
        self.clear(worker);
        let capacity = self
            .worker(worker)
            .ok_or(IndexError::UnknownWorker(worker))?
            .capacity;
        for h in hashes {
            self.insert(worker, h);
            if self.held(worker) > capacity {
                self.clear(worker);
                return Err(IndexError::OverCapacity { worker, capacity });
            }
        }
        self.worker_mut(worker).expect("checked above").last_seq = Some(seq);
        Ok(())
    }

    /// Applies one event. Events at or below the last applied number are old news (an event stream that overlaps
    /// the snapshot) and are skipped; any other error drops the worker's entries until the next snapshot.
    pub fn apply(&mut self, worker: WorkerId, event: &KvEvent) -> Result<(), IndexError> {
        let w = self
            .worker(worker)
            .ok_or(IndexError::UnknownWorker(worker))?;
        let Some(last) = w.last_seq else {
            return Err(IndexError::AwaitingSnapshot(worker));
        };
        let capacity = w.capacity;
        let (seq, hashes, stored) = match event {
            KvEvent::Stored { seq, hashes } => (*seq, hashes, true),
            KvEvent::Removed { seq, hashes } => (*seq, hashes, false),
        };
        if seq <= last {
            return Ok(());
        }
        if seq != last + 1 {
            self.clear(worker);
            return Err(IndexError::Gap {
                worker,
                expected: last + 1,
                got: seq,
            });
        }
        for &h in hashes {
            if stored {
                self.insert(worker, h);
            } else {
                self.remove(worker, h);
            }
        }
        if self.held(worker) > capacity {
            self.clear(worker);
            return Err(IndexError::OverCapacity { worker, capacity });
        }
        self.worker_mut(worker).expect("checked above").last_seq = Some(seq);
        Ok(())
    }

    /// For every worker holding at least the first block of `hashes` (a prompt's chain), how many leading blocks it
    /// holds, written to `out` (cleared first) in no particular order.
    ///
    /// Since a worker holding block `i` holds every block before it, the holders of block `i` are a subset of
    /// those of block `i - 1`, and equal counts mean equal sets. So only the blocks where the holder count drops
    /// matter: they are found by bisection (O(levels x log blocks) lookups) and each worker is placed at the
    /// deepest such block it holds. A prompt shared by every worker costs one visit per worker, not one per block.
    pub fn matches(&mut self, hashes: &[BlockHash], out: &mut Vec<(WorkerId, usize)>) {
        out.clear();
        let count = |i: usize| self.holders.get(&hashes[i]).map_or(0, Vec::len);
        if hashes.is_empty() || count(0) == 0 {
            return;
        }
        // The deepest block anyone holds.
        let (mut lo, mut hi) = (0, hashes.len());
        while hi - lo > 1 {
            let mid = (lo + hi) / 2;
            if count(mid) > 0 { lo = mid } else { hi = mid }
        }
        let mut drops = vec![lo];
        let mut stack = vec![(0, lo)];
        while let Some((a, b)) = stack.pop() {
            if b <= a || count(a) == count(b) {
                continue;
            }
            if b == a + 1 {
                drops.push(a);
                continue;
            }
            let mid = (a + b) / 2;
            stack.push((a, mid));
            stack.push((mid, b));
        }
        drops.sort_unstable_by(|x, y| y.cmp(x));
        for i in drops {
            for w in &self.holders[&hashes[i]] {
                let d = &mut self.depth[w.0 as usize];
                if *d == 0 {
                    *d = i as u32 + 1;
                    out.push((*w, i + 1));
                }
            }
        }
        for (w, _) in out.iter() {
            self.depth[w.0 as usize] = 0;
        }
    }

    /// Blocks the worker holds according to the index.
    pub fn held(&self, worker: WorkerId) -> usize {
        self.worker(worker).map_or(0, |w| w.hashes.len())
    }

    pub fn stats(&self) -> IndexStats {
        // A hashbrown slot is the entry plus one control byte; a holder list is a Vec header plus its buffer.
        let holders = self.holders.capacity()
            * (size_of::<BlockHash>() + size_of::<Vec<WorkerId>>() + 1)
            + self
                .holders
                .values()
                .map(|v| v.capacity() * size_of::<WorkerId>())
                .sum::<usize>();
        let sets = self
            .workers
            .iter()
            .flatten()
            .map(|w| w.hashes.capacity() * (size_of::<BlockHash>() + 1))
            .sum::<usize>();
        IndexStats {
            workers: self.workers.iter().flatten().count(),
            blocks: self.holders.len(),
            entries: self.entries,
            memory_bytes: holders
                + sets
                + self.workers.capacity() * size_of::<Option<WorkerBlocks>>(),
        }
    }

    fn worker(&self, w: WorkerId) -> Option<&WorkerBlocks> {
        self.workers.get(w.0 as usize).and_then(Option::as_ref)
    }

    fn worker_mut(&mut self, w: WorkerId) -> Option<&mut WorkerBlocks> {
        self.workers.get_mut(w.0 as usize).and_then(Option::as_mut)
    }

    fn insert(&mut self, worker: WorkerId, h: BlockHash) {
        let Some(w) = self.worker_mut(worker) else {
            return;
        };
        if w.hashes.insert(h) {
            self.holders.entry(h).or_default().push(worker);
            self.entries += 1;
        }
    }

    fn remove(&mut self, worker: WorkerId, h: BlockHash) {
        let Some(w) = self.worker_mut(worker) else {
            return;
        };
        if w.hashes.remove(&h) {
            self.unlink(worker, h);
        }
    }

    /// Takes `worker` out of `h`'s holder list (the caller already took `h` out of the worker's set).
    fn unlink(&mut self, worker: WorkerId, h: BlockHash) {
        if let Some(ws) = self.holders.get_mut(&h) {
            if let Some(i) = ws.iter().position(|&x| x == worker) {
                ws.swap_remove(i);
                self.entries -= 1;
            }
            if ws.is_empty() {
                self.holders.remove(&h);
            }
        }
    }

    /// Drops every entry of `worker` and marks it out of sync.
    fn clear(&mut self, worker: WorkerId) {
        let Some(w) = self.worker_mut(worker) else {
            return;
        };
        w.last_seq = None;
        let hashes = std::mem::take(&mut w.hashes);
        for h in hashes {
            self.unlink(worker, h);
        }
    }
}

#[cfg(test)]
mod tests;
