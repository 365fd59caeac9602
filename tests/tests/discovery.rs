//! etcd discovery with every part a separate process over real sockets: a real etcd server, workers that register
//! under a lease, and two router replicas watching side by side. Workers join, a worker serving another model is
//! refused, etcd restarts under load without a request lost, a killed worker vanishes when its lease lapses, and a
//! drained worker deregisters at once.

use serde_json::{Value, json};
use std::time::{Duration, Instant};
use tandem_tests::http;
use tandem_tests::procs::{Etcd, Node};

const MODEL: &str = "SmolLM2-135M-Instruct.Q4_1";
const TTL_S: &str = "4";
/// Tokens per stream while etcd restarts: at least a few seconds of decoding, longer than the 1.5 s etcd stays away.
const STREAM_TOKENS: usize = 384;

fn worker(role: &str, etcd: &Etcd, extra: &[&str]) -> Node {
    let e = etcd.endpoint();
    let mut args = vec![
        "--threads",
        "1",
        role,
        "--listen",
        "127.0.0.1:0",
        // Room for all four restart streams (384 tokens each) on one decode worker, wherever the routers put them.
        "--kv-cache-mib",
        "128",
        "--etcd-endpoint",
        &e,
        "--lease-ttl-s",
        TTL_S,
    ];
    args.extend_from_slice(extra);
    Node::start(&args)
}

fn router(etcd: &Etcd) -> Node {
    let e = etcd.endpoint();
    Node::start(&[
        "router",
        "--discovery",
        "etcd",
        "--etcd-endpoint",
        &e,
        "--http",
        "127.0.0.1:0",
        "--grpc",
        "127.0.0.1:0",
        "--poll-interval-ms",
        "200",
    ])
}

/// The router's pool as `/ready` lists it: sorted worker endpoints, and whether it says ready.
fn pool(router: &Node) -> (Vec<String>, bool) {
    let r = http::request(router.addr(), "GET", "/ready", b"");
    let v = r.json();
    let mut eps: Vec<String> = v["workers"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|w| w["endpoint"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default();
    eps.sort();
    (eps, r.status == 200)
}

/// Waits until every router lists exactly `want` and is ready; returns how long that took.
fn wait_pool(routers: &[&Node], want: &[&str], within: Duration) -> Duration {
    let mut want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
    want.sort();
    let started = Instant::now();
    loop {
        let pools: Vec<_> = routers.iter().map(|r| pool(r)).collect();
        if pools.iter().all(|(eps, ready)| *eps == want && *ready) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "routers list {pools:?}, expected {want:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn complete(router: &Node, max_tokens: usize) -> Value {
    let r = http::post(
        router.addr(),
        "/v1/completions",
        &json!({"model": MODEL, "prompt": "The history of the bicycle begins", "max_tokens": max_tokens,
                "temperature": 0, "ignore_eos": true}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
}

#[test]
fn routers_follow_etcd_registrations_through_an_etcd_restart_a_crash_and_a_drain() {
    let _s = tandem_tests::serial();
    let mut etcd = Etcd::start();
    let d1 = worker("decode", &etcd, &[]);
    let mut d2 = worker("decode", &etcd, &[]);
    let mut p1 = worker("prefill", &etcd, &[]);
    let r1 = router(&etcd);
    let r2 = router(&etcd);
    let all = [d1.url.as_str(), d2.url.as_str(), p1.url.as_str()];
    wait_pool(&[&r1, &r2], &all, Duration::from_secs(20));
    for r in [&r1, &r2] {
        assert_eq!(complete(r, 4)["usage"]["completion_tokens"], 4);
    }

    // A worker announcing another model registers, but no router takes it.
    let other = worker("decode", &etcd, &["--model-id", "another-model"]);
    std::thread::sleep(Duration::from_millis(1500));
    for r in [&r1, &r2] {
        let (eps, _) = pool(r);
        assert!(!eps.contains(&other.url), "{eps:?} took {}", other.url);
    }

    // etcd dies and comes back while streams run through both routers: every request completes in full. etcd is
    // killed only once every stream has its first chunk, and the streams are long enough to outlast the kill on a
    // fast machine (checked below: a stream that ended first would prove nothing).
    let (started_tx, started) = std::sync::mpsc::channel();
    let streams: Vec<_> = (0..4)
        .map(|i| {
            let addr = if i % 2 == 0 { r1.addr() } else { r2.addr() }.to_string();
            let started_tx = started_tx.clone();
            std::thread::spawn(move || {
                let mut events = http::stream(
                    &addr,
                    "/v1/completions",
                    &json!({"model": MODEL, "prompt": format!("Story number {i}: once upon a time"),
                            "max_tokens": STREAM_TOKENS, "temperature": 0, "ignore_eos": true, "stream": true}),
                );
                assert_eq!(events.status, 200);
                let first = events.next_data();
                started_tx.send(()).unwrap();
                let events: Vec<String> = first.into_iter().chain(events.collect()).collect();
                (events, Instant::now())
            })
        })
        .collect();
    for _ in 0..streams.len() {
        started
            .recv_timeout(Duration::from_secs(30))
            .expect("a stream sent no first chunk within 30 s");
    }
    let killed = Instant::now();
    etcd.kill();
    std::thread::sleep(Duration::from_millis(1500));
    // Routers keep serving from their last membership while etcd is away.
    assert_eq!(complete(&r2, 2)["usage"]["completion_tokens"], 2);
    etcd.resume();
    for s in streams {
        let (events, ended) = s.join().unwrap();
        assert!(
            ended > killed,
            "a stream ended before etcd went away: the test proves nothing"
        );
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
        let chunks: Vec<Value> = events[..events.len() - 1]
            .iter()
            .map(|e| serde_json::from_str(e).unwrap())
            .collect();
        let finish = chunks
            .iter()
            .rev()
            .find_map(|c| c["choices"][0]["finish_reason"].as_str());
        assert_eq!(finish, Some("length"), "{events:?}");
    }
    // After the restart and a full lease period the pool is whole again (re-registered where leases were lost).
    std::thread::sleep(Duration::from_secs(TTL_S.parse().unwrap()));
    wait_pool(&[&r1, &r2], &all, Duration::from_secs(15));

    // A crashed worker is gone once its lease lapses.
    d2.kill();
    let took = wait_pool(&[&r1, &r2], &[&d1.url, &p1.url], Duration::from_secs(15));
    assert!(
        took > Duration::from_millis(500),
        "dropped after {took:?}, before the lease could lapse"
    );
    assert_eq!(complete(&r1, 4)["usage"]["completion_tokens"], 4);

    // A drained worker revokes its lease: routers drop it well before the TTL.
    let exit = p1.terminate(Duration::from_secs(10));
    assert!(exit.success(), "{exit:?}");
    let took = wait_pool(&[&r1, &r2], &[&d1.url], Duration::from_secs(10));
    assert!(
        took < Duration::from_secs(TTL_S.parse::<u64>().unwrap() - 1),
        "the drained worker lingered {took:?}"
    );
    assert_eq!(complete(&r2, 4)["usage"]["completion_tokens"], 4);
}
