use super::*;

fn cand(id: u32, cached_blocks: usize, running: u32, queued: u64) -> Candidate {
    Candidate {
        id: WorkerId(id),
        healthy: true,
        cached_blocks,
        load: Load {
            running,
            waiting: 0,
            queued_prefill_tokens: queued,
            kv_blocks_free: 1000,
        },
    }
}

fn req(prompt_tokens: usize) -> RequestShape {
    RequestShape {
        prompt_tokens,
        max_tokens: 64,
        block_size: 16,
        kv_bytes_per_token: 18432.0,
    }
}

fn argmin_model() -> CostModel {
    CostModel {
        spread: Spread::Argmin,
        ..CostModel::default()
    }
}

#[test]
fn policy_names_round_trip_and_unknown_names_list_the_choices() {
    for p in PolicyKind::ALL {
        assert_eq!(p.name().parse::<PolicyKind>(), Ok(p));
    }
    let e = "fastest".parse::<PolicyKind>().unwrap_err();
    assert!(
        e.contains("\"fastest\"") && e.contains("round-robin"),
        "{e}"
    );
}

#[test]
fn round_robin_cycles_over_healthy_workers() {
    let mut p = Policy::new(PolicyKind::RoundRobin, argmin_model(), 1);
    let mut d = vec![cand(0, 0, 0, 0), cand(1, 0, 0, 0), cand(2, 0, 0, 0)];
    d[1].healthy = false;
    let picks: Vec<usize> = (0..4)
        .map(|_| p.decide(&req(100), &d, &[]).unwrap().decode)
        .collect();
    assert_eq!(picks, vec![0, 2, 0, 2]);
    for c in &mut d {
        c.healthy = false;
    }
    assert_eq!(p.decide(&req(100), &d, &[]), None);
}

#[test]
fn least_loaded_and_prefix_pick_what_their_names_say() {
    let d = [cand(0, 4, 3, 0), cand(1, 0, 1, 0), cand(2, 4, 2, 0)];
    let pre = [cand(3, 0, 0, 500), cand(4, 2, 0, 100)];
    let mut ll = Policy::new(PolicyKind::LeastLoaded, argmin_model(), 1);
    let x = ll.decide(&req(100), &d, &pre).unwrap();
    assert_eq!((x.decode, x.prefill), (1, Some(1)));
    let mut px = Policy::new(PolicyKind::Prefix, argmin_model(), 1);
    let x = px.decide(&req(100), &d, &pre).unwrap();
    // The longest cache wins, ties to the less loaded.
    assert_eq!((x.decode, x.prefill), (2, Some(1)));
    assert_eq!(x.cached_tokens, 32);
}

#[test]
fn cost_follows_the_cache_until_the_queue_outweighs_it() {
    let mut p = Policy::new(PolicyKind::Cost, argmin_model(), 1);
    let pre = [cand(10, 0, 0, 0), cand(11, 30, 0, 0)];
    let d = [cand(0, 0, 0, 0), cand(1, 0, 0, 0)];
    let x = p.decide(&req(512), &d, &pre).unwrap();
    assert_eq!(
        x.prefill,
        Some(1),
        "the prefill worker holding 480 of 512 tokens"
    );
    assert_eq!(x.cached_tokens, 480);
    // The same worker with 10k tokens queued costs more than computing the prompt elsewhere.
    let pre = [cand(10, 0, 0, 0), cand(11, 30, 0, 7000)];
    assert_eq!(p.decide(&req(512), &d, &pre).unwrap().prefill, Some(0));
}

#[test]
fn short_uncached_tails_and_saturated_prefill_pools_prefill_locally() {
    let mut p = Policy::new(PolicyKind::Cost, argmin_model(), 1);
    let pre = [cand(10, 0, 0, 0)];
    // The decode worker holds all but 12 of 300 tokens: no transfer.
    let d = [cand(0, 18, 0, 0)];
    let x = p.decide(&req(300), &d, &pre).unwrap();
    assert_eq!(x.prefill, None);
    assert_eq!(x.cached_tokens, 288);
    // It lacks 300: the prefill worker computes them.
    let d = [cand(0, 0, 0, 0)];
    assert_eq!(p.decide(&req(300), &d, &pre).unwrap().prefill, Some(0));
    // Unless every prefill worker is past its saturation mark, or there is none.
    let busy = [cand(10, 0, 0, 9000)];
    assert_eq!(p.decide(&req(300), &d, &busy).unwrap().prefill, None);
    assert_eq!(p.decide(&req(300), &d, &[]).unwrap().prefill, None);
}

#[test]
fn cost_counts_the_bytes_the_decode_worker_lacks() {
    // No local prefill here, to isolate the transfer term.
    let model = CostModel {
        transfer_s_per_byte: 1e-6, // a slow link
        local_prefill_max_tokens: 0,
        ..argmin_model()
    };
    let mut p = Policy::new(PolicyKind::Cost, model, 1);
    let pre = [cand(10, 0, 0, 0)];
    // Equal queues; worker 1 holds 10 blocks, so fewer bytes cross to it even though it has one more request.
    let d = [cand(0, 0, 0, 0), cand(1, 10, 1, 0)];
    let x = p.decide(&req(400), &d, &pre).unwrap();
    assert_eq!(x.decode, 1);
    // A cheap link leaves only the queue to tell them apart.
    let model = CostModel {
        local_prefill_max_tokens: 0,
        ..argmin_model()
    };
    let mut p = Policy::new(PolicyKind::Cost, model, 1);
    let x = p.decide(&req(400), &d, &pre).unwrap();
    assert_eq!(x.decode, 0);
}

#[test]
fn a_decode_worker_without_room_is_a_last_resort() {
    let mut p = Policy::new(PolicyKind::Cost, argmin_model(), 1);
    let mut d = [cand(0, 20, 0, 0), cand(1, 0, 5, 0)];
    d[0].load.kv_blocks_free = 3;
    assert_eq!(p.decide(&req(400), &d, &[]).unwrap().decode, 1);
    d[1].load.kv_blocks_free = 3;
    assert_eq!(
        p.decide(&req(400), &d, &[]).unwrap().decode,
        0,
        "nobody has room: the best by cost"
    );
}

#[test]
fn softmax_shares_equal_workers_and_still_prefers_a_clearly_better_one() {
    let mut p = Policy::new(PolicyKind::Cost, CostModel::default(), 7);
    let d = [
        cand(0, 0, 0, 0),
        cand(1, 0, 0, 0),
        cand(2, 0, 0, 0),
        cand(3, 0, 0, 0),
    ];
    let mut counts = [0usize; 4];
    for _ in 0..4000 {
        counts[p.decide(&req(20), &d, &[]).unwrap().decode] += 1;
    }
    assert!(
        counts.iter().all(|&c| (800..1200).contains(&c)),
        "{counts:?}"
    );
    // Worker 2 holds 500 of 512 tokens: far more than a temperature's worth cheaper.
    let d = [
        cand(0, 0, 0, 0),
        cand(1, 0, 0, 0),
        cand(2, 31, 0, 0),
        cand(3, 0, 0, 0),
    ];
    assert!((0..200).all(|_| p.decide(&req(512), &d, &[]).unwrap().decode == 2));
}

#[test]
fn power_of_two_takes_the_better_of_two_draws() {
    let model = CostModel {
        spread: Spread::PowerOfTwo,
        ..CostModel::default()
    };
    let mut p = Policy::new(PolicyKind::Cost, model, 3);
    let d = [cand(0, 0, 9, 0), cand(1, 0, 0, 0)];
    let picked_worse = (0..4000)
        .filter(|_| p.decide(&req(20), &d, &[]).unwrap().decode == 0)
        .count();
    // Only when both draws land on worker 0: a quarter of the time.
    assert!((800..1200).contains(&picked_worse), "{picked_worse}");
}

#[test]
fn a_cold_prompt_goes_through_the_prefill_worker() {
    let mut p = Policy::new(PolicyKind::Cost, CostModel::default(), 1);
    let mut d = cand(0, 0, 0, 0);
    d.load.kv_blocks_free = u32::MAX;
    let shape = RequestShape {
        prompt_tokens: 30,
        max_tokens: 8000,
        block_size: 16,
        kv_bytes_per_token: 0.0,
    };
    let x = p.decide(&shape, &[d], &[cand(1, 0, 0, 0)]).unwrap();
    assert_eq!(x.prefill, Some(0), "{x:?}");
}
