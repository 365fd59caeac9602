use super::*;
use tandem_engine::rng::Rng;

fn h(x: u64) -> BlockHash {
    BlockHash(x)
}
fn stored(seq: u64, hs: &[u64]) -> KvEvent {
    KvEvent::Stored {
        seq,
        hashes: hs.iter().map(|&x| h(x)).collect(),
    }
}
fn removed(seq: u64, hs: &[u64]) -> KvEvent {
    KvEvent::Removed {
        seq,
        hashes: hs.iter().map(|&x| h(x)).collect(),
    }
}
fn sorted(mut v: Vec<(WorkerId, usize)>) -> Vec<(WorkerId, usize)> {
    v.sort();
    v
}

#[test]
fn events_after_a_snapshot_keep_the_index_exact() {
    let (a, b) = (WorkerId(0), WorkerId(1));
    let mut ix = PrefixIndex::new();
    ix.add_worker(a, 100);
    ix.add_worker(b, 100);
    assert_eq!(
        ix.apply(a, &stored(1, &[1])),
        Err(IndexError::AwaitingSnapshot(a))
    );
    ix.load_snapshot(a, 5, [h(1), h(2)]).unwrap();
    ix.load_snapshot(b, 0, []).unwrap();
    // An event the snapshot already contains is skipped.
    ix.apply(a, &stored(5, &[9])).unwrap();
    ix.apply(a, &stored(6, &[3])).unwrap();
    ix.apply(b, &stored(1, &[1])).unwrap();
    let mut out = Vec::new();
    ix.matches(&[h(1), h(2), h(3), h(4)], &mut out);
    assert_eq!(sorted(out.clone()), vec![(a, 3), (b, 1)]);
    ix.apply(a, &removed(7, &[3])).unwrap();
    ix.matches(&[h(1), h(2), h(3)], &mut out);
    assert_eq!(sorted(out.clone()), vec![(a, 2), (b, 1)]);
    // A prompt whose first block nobody holds matches nothing.
    ix.matches(&[h(7), h(2)], &mut out);
    assert!(out.is_empty());
    let s = ix.stats();
    assert_eq!((s.workers, s.blocks, s.entries), (2, 2, 3));
    assert!(s.memory_bytes > 0);
}

#[test]
fn a_gap_drops_the_workers_entries_until_the_next_snapshot() {
    let w = WorkerId(3);
    let mut ix = PrefixIndex::new();
    ix.add_worker(w, 100);
    ix.load_snapshot(w, 0, []).unwrap();
    ix.apply(w, &stored(1, &[1])).unwrap();
    assert_eq!(
        ix.apply(w, &stored(3, &[2])),
        Err(IndexError::Gap {
            worker: w,
            expected: 2,
            got: 3
        })
    );
    assert!(!ix.is_synced(w));
    assert_eq!(ix.held(w), 0);
    let mut out = Vec::new();
    ix.matches(&[h(1)], &mut out);
    assert!(out.is_empty(), "no guesses while out of sync");
    assert_eq!(
        ix.apply(w, &stored(4, &[5])),
        Err(IndexError::AwaitingSnapshot(w))
    );
    ix.load_snapshot(w, 4, [h(1), h(2)]).unwrap();
    ix.apply(w, &stored(5, &[3])).unwrap();
    assert_eq!(ix.held(w), 3);
    assert_eq!(ix.stats().entries, 3);
}

#[test]
fn a_worker_cannot_hold_more_than_it_announced() {
    let w = WorkerId(0);
    let mut ix = PrefixIndex::new();
    ix.add_worker(w, 2);
    assert_eq!(
        ix.load_snapshot(w, 0, [h(1), h(2), h(3)]),
        Err(IndexError::OverCapacity {
            worker: w,
            capacity: 2
        })
    );
    ix.load_snapshot(w, 0, [h(1), h(2)]).unwrap();
    assert!(matches!(
        ix.apply(w, &stored(1, &[3])),
        Err(IndexError::OverCapacity { .. })
    ));
    assert_eq!(ix.stats().entries, 0);
    assert_eq!(
        ix.apply(WorkerId(9), &stored(1, &[1])),
        Err(IndexError::UnknownWorker(WorkerId(9)))
    );
}

#[test]
fn removing_a_worker_removes_all_it_held() {
    let mut ix = PrefixIndex::new();
    for i in 0..3 {
        ix.add_worker(WorkerId(i), 10);
        ix.load_snapshot(WorkerId(i), 0, [h(1), h(2)]).unwrap();
    }
    ix.remove_worker(WorkerId(1));
    let mut out = Vec::new();
    ix.matches(&[h(1), h(2)], &mut out);
    assert_eq!(sorted(out), vec![(WorkerId(0), 2), (WorkerId(2), 2)]);
    let s = ix.stats();
    assert_eq!((s.workers, s.blocks, s.entries), (2, 2, 4));
}

/// Random prefixes held by random workers, against the obvious forward walk.
#[test]
fn lookups_agree_with_a_forward_walk_on_random_clusters() {
    let mut rng = Rng::new(42);
    for _ in 0..200 {
        let workers = 1 + rng.below(12);
        let chains: Vec<Vec<BlockHash>> = (0..4)
            .map(|c| (0..12).map(|i| h(c * 100 + i)).collect())
            .collect();
        let mut ix = PrefixIndex::new();
        let mut truth: Vec<HashSet<BlockHash>> = vec![HashSet::new(); workers];
        for (w, held) in truth.iter_mut().enumerate() {
            // Each worker holds a leading run of some chains (the invariant workers keep).
            for chain in &chains {
                let n = rng.below(chain.len() + 1);
                held.extend(&chain[..n]);
            }
            ix.add_worker(WorkerId(w as u32), 1000);
            ix.load_snapshot(WorkerId(w as u32), 0, held.iter().copied())
                .unwrap();
        }
        let mut out = Vec::new();
        for chain in &chains {
            let len = 1 + rng.below(chain.len());
            ix.matches(&chain[..len], &mut out);
            let want: Vec<(WorkerId, usize)> = truth
                .iter()
                .enumerate()
                .map(|(w, held)| {
                    let d = chain[..len].iter().take_while(|x| held.contains(x)).count();
                    (WorkerId(w as u32), d)
                })
                .filter(|&(_, d)| d > 0)
                .collect();
            assert_eq!(sorted(out.clone()), want);
        }
    }
}
