//! Prefix-aware routing on a real cluster (2 prefill + 2 decode workers, the real model, real sockets): the
//! router's index, fed only by the workers' KV events and snapshots, sends prompts that share a prefix back to the
//! prefill worker that holds it, where round-robin spreads them; a router naming blocks differently from its
//! workers refuses them instead of routing blind.

use serde_json::json;
use std::time::Duration;
use tandem_router::{BlockNaming, PolicyKind, Routing};
use tandem_tests::cluster::{Cluster, ClusterSpec, MODEL_ID};
use tandem_tests::{http, serial};

const TEXT: &str = "The ferry left the harbour at seven, loaded with crates of apples, two bicycles and a piano \
                    that nobody would admit to owning. The captain counted the passengers twice and wrote the \
                    number on the back of his hand. ";

/// Sends four prompts sharing a ~290-token prefix, one after another; returns each prefill worker's cached blocks.
fn cached_blocks_after_shared_prompts(policy: PolicyKind) -> Vec<u32> {
    let c = Cluster::start(ClusterSpec {
        prefill: 2,
        decode: 2,
        routing: Routing {
            policy,
            ..Default::default()
        },
        ..Default::default()
    });
    c.wait_ready();
    // Let the router's KV event subscriptions and index snapshots (taken after its first load poll) settle.
    std::thread::sleep(Duration::from_millis(1000));
    let shared = TEXT.repeat(6);
    for i in 0..4 {
        let r = http::post(
            &c.http,
            "/v1/completions",
            &json!({"model": MODEL_ID, "prompt": format!("{shared}Question {i}: who owns the piano?"), "max_tokens": 2}),
        );
        assert_eq!(r.status, 200, "{}", r.body);
        // The next decision should see this request's blocks in the index.
        std::thread::sleep(Duration::from_millis(300));
    }
    (0..2).map(|i| c.prefill_load(i).kv_blocks_cached).collect()
}

#[test]
fn the_cost_policy_keeps_a_shared_prefix_on_the_worker_that_holds_it() {
    let _g = serial();
    let cost = cached_blocks_after_shared_prompts(PolicyKind::Cost);
    assert_eq!(
        cost.iter().filter(|&&n| n > 0).count(),
        1,
        "one prefill worker computed every prompt: {cost:?}"
    );
    assert!(cost.iter().any(|&n| n >= 16), "{cost:?}");
    let rr = cached_blocks_after_shared_prompts(PolicyKind::RoundRobin);
    assert!(
        rr.iter().all(|&n| n > 0),
        "round-robin spreads the same prompts over both: {rr:?}"
    );
}

#[test]
fn workers_naming_blocks_differently_are_refused() {
    let _g = serial();
    let c = Cluster::start(ClusterSpec {
        routing: Routing {
            naming: BlockNaming {
                block_size: 32,
                ..Default::default()
            },
            ..Default::default()
        },
        ..Default::default()
    });
    let workers = c.wait_ready();
    assert!(
        workers
            .as_array()
            .unwrap()
            .iter()
            .all(|w| w["healthy"] == false),
        "workers naming blocks differently were taken: {workers}"
    );
    let r = http::post(
        &c.http,
        "/v1/completions",
        &json!({"model": MODEL_ID, "prompt": "Hello", "max_tokens": 2}),
    );
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(r.body.contains("no decode worker"), "{}", r.body);
}
