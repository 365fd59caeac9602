//! Budgets parse and round to what both sides of a transfer agree on; every policy keeps exactly `kept` sorted,
//! distinct positions per head, the ones its rule names.

use super::*;
use crate::kv::codec::BlockShape;
use proptest::prelude::*;

fn ev(s: &str) -> Eviction {
    Eviction::parse(s).unwrap()
}

#[test]
fn parses_budgets_and_refuses_bad_ones() {
    assert_eq!(ev("snapkv:0.5").budget, Budget::Fraction(0.5));
    assert_eq!(ev("h2o:25%").budget, Budget::Fraction(0.25));
    assert_eq!(ev("streaming:256").budget, Budget::Tokens(256));
    assert_eq!(ev("block:1.0").policy, EvictionPolicy::Block);
    assert_eq!(ev(&ev("snapkv:0.5").to_string()), ev("snapkv:0.5"));
    for bad in [
        "snapkv",
        "lru:0.5",
        "snapkv:0",
        "snapkv:1.5",
        "snapkv:-0.1",
        "snapkv:x",
        "h2o:0%",
    ] {
        let e = Eviction::parse(bad).unwrap_err().to_string();
        assert!(e.contains(bad), "{bad}: {e}");
    }
}

#[test]
fn kept_tokens_follow_the_budget() {
    assert_eq!(ev("snapkv:0.5").kept_tokens(100, 16), 50);
    assert_eq!(ev("snapkv:0.5").kept_tokens(101, 16), 51);
    assert_eq!(ev("streaming:256").kept_tokens(100, 16), 100);
    assert_eq!(ev("streaming:10").kept_tokens(100, 16), 10);
    assert_eq!(ev("h2o:0.001").kept_tokens(100, 16), 1);
    // 100 tokens in blocks of 16: the last block holds 4; 50 -> 4 + 2 whole blocks.
    assert_eq!(ev("block:0.5").kept_tokens(100, 16), 36);
    assert_eq!(ev("block:1").kept_tokens(100, 16), 4);
    assert_eq!(ev("block:0.9").kept_tokens(96, 16), 80);
    assert_eq!(ev("h2o:0.1").kept_tokens(200, 16), 20);
}

fn scores_with(
    n: usize,
    layers: usize,
    heads: usize,
    hot: &[(usize, usize, usize)],
) -> AttentionScores {
    let mut s = AttentionScores::zeros(layers, heads, n);
    for p in 0..n {
        for c in s.sums.chunks_exact_mut(n) {
            c[p] = 0.001 * (p % 7) as f32;
        }
    }
    for &(l, h, p) in hot {
        s.sums[(l * heads + h) * n + p] = 10.0;
    }
    s
}

#[test]
fn streaming_keeps_sinks_and_the_recent_window() {
    let p = plan(&ev("streaming:10"), 100, 16, 2, 3, None).unwrap();
    let want: Vec<u32> = (0..4).chain(94..100).collect();
    for l in 0..2 {
        for h in 0..3 {
            assert_eq!(p.head(l, h), want.as_slice());
        }
    }
}

#[test]
fn snapkv_and_h2o_keep_heavy_hitters_per_head() {
    let s = scores_with(200, 2, 2, &[(0, 0, 10), (0, 1, 20), (1, 0, 30), (1, 1, 40)]);
    let p = plan(&ev("snapkv:40"), 200, 16, 2, 2, Some(&s)).unwrap();
    for (l, h, hot) in [(0, 0, 10u32), (0, 1, 20), (1, 0, 30), (1, 1, 40)] {
        let kept = p.head(l, h);
        assert_eq!(kept.len(), 40);
        // The window, then 8 more: the hot token and its pooled neighbours.
        assert!(kept.ends_with(&(168..200).collect::<Vec<u32>>()));
        assert!(kept.contains(&hot), "layer {l} head {h}: {kept:?}");
        assert!(
            (hot - 3..=hot + 3).all(|p| kept.contains(&p)),
            "pooled neighbours: {kept:?}"
        );
    }
    let p = plan(&ev("h2o:0.1"), 200, 16, 2, 2, Some(&s)).unwrap();
    for (l, h, hot) in [(0, 0, 10u32), (0, 1, 20), (1, 0, 30), (1, 1, 40)] {
        let kept = p.head(l, h);
        assert_eq!(kept.len(), 20);
        assert!(kept.contains(&hot) && kept.ends_with(&(190..200).collect::<Vec<u32>>()));
    }
}

#[test]
fn block_policy_drops_whole_blocks_by_their_mass() {
    // 70 tokens in blocks of 16: blocks 0..4, the last holding 6; block 2 is hot.
    let s = scores_with(70, 1, 2, &[(0, 1, 40)]);
    let p = plan(&ev("block:0.6"), 70, 16, 1, 2, Some(&s)).unwrap();
    let want: Vec<u32> = (0..16).chain(32..48).chain(64..70).collect();
    assert_eq!(p.kept, 38);
    assert_eq!(p.head(0, 0), want.as_slice());
    assert_eq!(p.head(0, 1), want.as_slice());
}

#[test]
fn attention_policies_refuse_missing_or_mismatched_scores() {
    for e in ["snapkv:0.5", "h2o:0.5", "block:0.5"] {
        assert!(plan(&ev(e), 100, 16, 2, 2, None).is_err());
        let wrong = AttentionScores::zeros(2, 2, 99);
        assert!(plan(&ev(e), 100, 16, 2, 2, Some(&wrong)).is_err());
    }
}

#[test]
fn compacting_gathers_kept_tokens_per_head() {
    let shape = BlockShape {
        kv_heads: 2,
        block_size: 4,
        head_dim: 3,
    };
    // 10 tokens; element value encodes (head, position, dim, K or V).
    let full: Vec<(Vec<f32>, Vec<f32>)> = (0..3)
        .map(|b| {
            let mut k = vec![0f32; shape.elems()];
            let mut v = vec![0f32; shape.elems()];
            for h in 0..2 {
                for s in 0..4 {
                    for d in 0..3 {
                        let at = (h * 4 + s) * 3 + d;
                        let pos = b * 4 + s;
                        k[at] = (h * 1000 + pos * 10 + d) as f32;
                        v[at] = -k[at];
                    }
                }
            }
            (k, v)
        })
        .collect();
    let p = plan(&ev("streaming:6"), 10, 4, 1, 2, None).unwrap();
    // Kept: 0 1 2 3 8 9 -> compacted block 1 holds positions 8 and 9, fill 2.
    let (mut k, mut v) = (vec![0f32; shape.elems()], vec![0f32; shape.elems()]);
    let fill = p.compact_block(0, 1, shape, |i| &full[i], &mut k, &mut v);
    assert_eq!(fill, 2);
    for h in 0..2 {
        for (slot, pos) in [(0, 8), (1, 9)] {
            for d in 0..3 {
                let at = (h * 4 + slot) * 3 + d;
                assert_eq!(k[at], (h * 1000 + pos * 10 + d) as f32);
                assert_eq!(v[at], -k[at]);
            }
        }
        assert!(
            k[(h * 4 + 2) * 3..(h * 4 + 4) * 3]
                .iter()
                .all(|&x| x == 0.0)
        );
    }
}

proptest! {
    #[test]
    fn every_plan_keeps_kept_distinct_sorted_positions(
        n in 1usize..300, bs in 1usize..20, frac in 0.01f32..1.0, seed in any::<u64>(), pi in 0usize..4,
    ) {
        let e = Eviction::new(EvictionPolicy::ALL[pi], Budget::Fraction(frac)).unwrap();
        let mut s = AttentionScores::zeros(2, 2, n);
        let mut x = seed | 1;
        for v in &mut s.sums {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17;
            *v = (x % 1000) as f32 / 1000.0;
        }
        let p = plan(&e, n, bs, 2, 2, Some(&s)).unwrap();
        prop_assert_eq!(p.kept, e.kept_tokens(n, bs));
        prop_assert!(p.kept >= 1 && p.kept <= n);
        for l in 0..2 {
            for h in 0..2 {
                let k = p.head(l, h);
                prop_assert_eq!(k.len(), p.kept);
                prop_assert!(k.windows(2).all(|w| w[0] < w[1]));
                prop_assert!(*k.last().unwrap() as usize == n - 1, "the last prompt token is always kept");
            }
        }
    }
}
