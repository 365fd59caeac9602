//! The router's relay in front of a model-free decode worker (`tandem_router::mock`) that streams on a fixed
//! clock, over real loopback sockets: every token arrives, in order, over gRPC and SSE; and a token leaves the
//! router as soon as the worker sends it (no socket holds small writes back: a first token that took 40 ms
//! extra was Nagle's algorithm meeting a delayed ACK). The real-model path is tested in `cluster.rs`.

use std::sync::Arc;
use std::time::{Duration, Instant};
use tandem_prefill_node::runtime::serve_grpc;
use tandem_proto::v1;
use tandem_router::admission::{AdmissionConfig, RateLimit};
use tandem_router::mock::{MockDecodeWorker, MockTiming};
use tandem_router::{ModelInfo, RouterConfig, WorkerEndpoint};
use tandem_tests::http;
use tokio::net::TcpListener;

struct Setup {
    rt: tokio::runtime::Runtime,
    http: String,
    grpc: String,
    _stop: tokio::sync::watch::Sender<bool>,
    /// Stops the router alone (the mock worker keeps serving).
    stop_router: tokio::sync::watch::Sender<bool>,
    router: tokio::task::JoinHandle<Result<(), tandem_router::RouterServeError>>,
    /// These tests time token gaps, admission windows and breaker cooldowns in milliseconds: one at a time, so
    /// that another test's traffic on the same two cores does not move them.
    _serial: std::sync::MutexGuard<'static, ()>,
}

fn start(timing: MockTiming) -> Setup {
    start_with(timing, AdmissionConfig::default())
}

fn start_with(timing: MockTiming, admission: AdmissionConfig) -> Setup {
    start_full(timing, admission, Vec::new(), Default::default())
}

/// The router in front of `extra_decode` endpoints followed by the mock, placing requests by `routing`.
fn start_full(
    timing: MockTiming,
    admission: AdmissionConfig,
    extra_decode: Vec<String>,
    routing: tandem_router::Routing,
) -> Setup {
    let serial = tandem_tests::serial();
    let (_, tok) = tandem_tests::open_model();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (stop, rx) = tokio::sync::watch::channel(false);
    let (stop_router, router_rx) = tokio::sync::watch::channel(false);
    let (http, grpc, router) = rt.block_on(async {
        let bind = || TcpListener::bind("127.0.0.1:0");
        let (mock, h, g) = (
            bind().await.unwrap(),
            bind().await.unwrap(),
            bind().await.unwrap(),
        );
        let mock_url = format!("http://{}", mock.local_addr().unwrap());
        let (h_addr, g_addr) = (h.local_addr().unwrap(), g.local_addr().unwrap());
        let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let mut routes = tonic::service::RoutesBuilder::default();
        routes.add_service(MockDecodeWorker::new(timing).server());
        tokio::spawn(serve_grpc(mock, routes, &[], stopped(rx.clone())));
        let config = RouterConfig {
            discovery: tandem_router::Discovery::Static {
                prefill: Vec::new(),
                decode: extra_decode
                    .into_iter()
                    .chain([mock_url])
                    .map(WorkerEndpoint)
                    .collect(),
            },
            model: ModelInfo {
                id: "mock".into(),
                context_len: 2048,
                kv_dims: None,
            },
            poll_interval: Duration::from_millis(200),
            kv: Default::default(),
            routing,
            admission,
        };
        let router = tokio::spawn(tandem_router::run(
            h,
            g,
            config,
            Arc::new(tok),
            stopped(router_rx),
        ));
        (h_addr.to_string(), format!("http://{g_addr}"), router)
    });
    Setup {
        rt,
        http,
        grpc,
        _stop: stop,
        stop_router,
        router,
        _serial: serial,
    }
}

/// Token ids and arrival times (from the call) of one gRPC generation of `n` tokens.
async fn generate(grpc: &str, n: u32) -> (Vec<u32>, Vec<Duration>, i32) {
    let mut c = v1::generation_client::GenerationClient::connect(grpc.to_string())
        .await
        .unwrap();
    let start = Instant::now();
    let mut s = c
        .generate(v1::GenerateRequest {
            model: "mock".into(),
            input: Some(v1::generate_request::Input::TokenIds(v1::TokenIds {
                ids: vec![1000, 1001, 1002],
            })),
            stop: Some(v1::StopConditions {
                max_tokens: n,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let (mut ids, mut at, mut finish) = (Vec::new(), Vec::new(), 0);
    while let Some(m) = s.message().await.unwrap() {
        ids.extend(&m.token_ids);
        at.push(start.elapsed());
        finish = m.finish_reason;
    }
    (ids, at, finish)
}

#[test]
fn router_relays_every_token_in_order_over_grpc_and_sse() {
    let s = start(MockTiming {
        ttft: Duration::from_millis(1),
        itl: Duration::from_millis(1),
    });
    let (ids, _, finish) = s.rt.block_on(generate(&s.grpc, 20));
    // The mock answers a 3-token prompt with 3, 4, 5, ...
    assert_eq!(ids, (3..23).collect::<Vec<u32>>());
    assert_eq!(finish, v1::FinishReason::Length as i32);

    let body = serde_json::json!({"model": "mock", "prompt": [1000, 1001, 1002], "max_tokens": 20, "stream": true,
        "stream_options": {"include_usage": true}});
    let events = http::stream(&s.http, "/v1/completions", &body).collect();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<serde_json::Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let usage = chunks.last().unwrap()["usage"].clone();
    assert_eq!(usage["completion_tokens"], 20, "{usage}");
    assert_eq!(usage["prompt_tokens"], 3, "{usage}");
    let finishes: Vec<_> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["finish_reason"].as_str())
        .collect();
    assert_eq!(finishes, ["length"]);
}

#[test]
fn router_forwards_each_token_without_waiting_for_acks() {
    // With Nagle's algorithm on any socket of the path, a token written while an earlier one is unacknowledged
    // waits for the delayed ACK (40 ms on Linux); with TCP_NODELAY everywhere it leaves at once. Tokens 10 ms apart
    // then arrive about 10 ms apart; the median gap and first-token time stay far below the 40 ms stall.
    let s = start(MockTiming {
        ttft: Duration::from_millis(5),
        itl: Duration::from_millis(10),
    });
    let (ttfts, mut gaps) = s.rt.block_on(async {
        let (mut ttfts, mut gaps) = (Vec::new(), Vec::new());
        for _ in 0..5 {
            let (ids, at, _) = generate(&s.grpc, 12).await;
            assert_eq!(ids.len(), 12);
            ttfts.push(at[0]);
            gaps.extend(at.windows(2).map(|w| w[1] - w[0]));
        }
        (ttfts, gaps)
    });
    gaps.sort();
    let median_gap = gaps[gaps.len() / 2];
    let mut sorted = ttfts.clone();
    sorted.sort();
    let median_ttft = sorted[sorted.len() / 2];
    assert!(
        median_gap >= Duration::from_millis(7) && median_gap <= Duration::from_millis(25),
        "median gap between tokens {median_gap:?} (mock sends every 10 ms); all: {gaps:?}"
    );
    assert!(
        median_ttft <= Duration::from_millis(30),
        "median time to first token {median_ttft:?} (mock answers after 5 ms); all: {ttfts:?}"
    );
}

/// Admission control: past the router's in-flight bound a request is refused at once with a retry hint (HTTP 429
/// with Retry-After, gRPC RESOURCE_EXHAUSTED with `retry-after`), and per-key rate limits keep keys apart.
#[test]
fn admission_refuses_past_its_bounds_with_a_retry_hint() {
    let s = start_with(
        MockTiming {
            ttft: Duration::from_millis(20),
            itl: Duration::from_millis(40),
        },
        AdmissionConfig {
            max_inflight: Some(1),
            ..Default::default()
        },
    );
    let grpc = s.grpc.clone();
    // One long stream holds the only place.
    let long = s.rt.spawn(async move { generate(&grpc, 25).await });
    std::thread::sleep(Duration::from_millis(300));
    let body = serde_json::json!({"model": "mock", "prompt": "hi", "max_tokens": 2});
    let r = http::post(&s.http, "/v1/completions", &body);
    assert_eq!(r.status, 429, "{}", r.body);
    let e = &r.json()["error"];
    assert_eq!(e["code"], "rate_limit_exceeded", "{}", r.body);
    assert!(
        e["message"].as_str().unwrap().contains("limit of 1"),
        "{}",
        r.body
    );
    assert_eq!(r.header("retry-after"), Some("1"));
    let status = s.rt.block_on(async {
        let mut c = v1::generation_client::GenerationClient::connect(s.grpc.clone())
            .await
            .unwrap();
        c.generate(v1::GenerateRequest {
            model: "mock".into(),
            input: Some(v1::generate_request::Input::Prompt("hi".into())),
            ..Default::default()
        })
        .await
        .expect_err("refused")
    });
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert_eq!(status.metadata().get("retry-after").unwrap(), "1");
    let (ids, _, _) = s.rt.block_on(long).unwrap();
    assert_eq!(ids.len(), 25, "the admitted stream finished");
    assert_eq!(http::post(&s.http, "/v1/completions", &body).status, 200);
}

#[test]
fn rate_limits_apply_per_api_key() {
    let s = start_with(
        MockTiming {
            ttft: Duration::from_millis(1),
            itl: Duration::from_millis(1),
        },
        AdmissionConfig {
            max_inflight: None,
            rate_limit: Some(RateLimit {
                per_s: 0.01,
                burst: 2,
            }),
            ..Default::default()
        },
    );
    let body = serde_json::json!({"model": "mock", "prompt": "hi", "max_tokens": 2});
    let post = |key: &str| {
        http::request_with_headers(
            &s.http,
            "POST",
            "/v1/completions",
            &[("Authorization", &format!("Bearer {key}"))],
            body.to_string().as_bytes(),
        )
    };
    assert_eq!(post("alice").status, 200);
    assert_eq!(post("alice").status, 200);
    let r = post("alice");
    assert_eq!(r.status, 429, "{}", r.body);
    assert!(r.body.contains("rate limit"), "{}", r.body);
    assert_eq!(post("bob").status, 200, "another key has its own bucket");
}

/// Graceful drain: once told to stop, the router refuses new requests (503) but lets an open stream finish, then
/// exits; a stream still open at the drain deadline is cut and the router exits anyway.
#[test]
fn shutdown_drains_open_streams_then_stops() {
    let timing = MockTiming {
        ttft: Duration::from_millis(20),
        itl: Duration::from_millis(40),
    };
    // Each scenario's setup (and its hold on the serial lock) ends with its block.
    {
        let s = start_with(
            timing,
            AdmissionConfig {
                drain_timeout: Duration::from_secs(10),
                ..Default::default()
            },
        );
        let grpc = s.grpc.clone();
        let long = s.rt.spawn(async move { generate(&grpc, 25).await });
        std::thread::sleep(Duration::from_millis(300));
        let stopped_at = Instant::now();
        s.stop_router.send(true).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let body = serde_json::json!({"model": "mock", "prompt": "hi", "max_tokens": 2});
        let r = http::post(&s.http, "/v1/completions", &body);
        assert_eq!(r.status, 503, "{}", r.body);
        assert!(r.body.contains("shutting down"), "{}", r.body);
        let (ids, _, _) = s.rt.block_on(long).unwrap();
        assert_eq!(ids.len(), 25, "the open stream finished during the drain");
        s.rt.block_on(s.router).unwrap().unwrap();
        assert!(
            stopped_at.elapsed() < Duration::from_secs(5),
            "{:?}",
            stopped_at.elapsed()
        );
    }

    // A drain shorter than the stream cuts it, and the router still stops.
    let s = start_with(
        timing,
        AdmissionConfig {
            drain_timeout: Duration::from_millis(300),
            ..Default::default()
        },
    );
    let grpc = s.grpc.clone();
    let long = s.rt.spawn(async move {
        let mut c = v1::generation_client::GenerationClient::connect(grpc)
            .await
            .unwrap();
        let mut stream = c
            .generate(v1::GenerateRequest {
                model: "mock".into(),
                input: Some(v1::generate_request::Input::Prompt("hi".into())),
                stop: Some(v1::StopConditions {
                    max_tokens: 100,
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let mut n = 0;
        while let Ok(Some(m)) = stream.message().await {
            n += m.token_ids.len();
        }
        n
    });
    std::thread::sleep(Duration::from_millis(300));
    let stopped_at = Instant::now();
    s.stop_router.send(true).unwrap();
    s.rt.block_on(s.router).unwrap().unwrap();
    assert!(
        stopped_at.elapsed() < Duration::from_secs(3),
        "{:?}",
        stopped_at.elapsed()
    );
    let n = s.rt.block_on(long).unwrap();
    assert!(n < 100, "the stream was cut at the deadline ({n} tokens)");
}

/// A decode worker that answers load polls but refuses requests (on its way down): the router marks it unhealthy
/// and opens the stream on another worker, so every request succeeds even under round-robin.
/// A decode worker that answers load polls but refuses every generation, on a runtime of its own.
fn refusing_worker(timing: MockTiming) -> (String, MockDecodeWorker, tokio::runtime::Runtime) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let mock = MockDecodeWorker::refusing(timing);
    let server = mock.clone().server();
    let url = rt.block_on(async {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        let mut routes = tonic::service::RoutesBuilder::default();
        routes.add_service(server);
        tokio::spawn(serve_grpc(l, routes, &[], std::future::pending()));
        url
    });
    (url, mock, rt)
}

#[test]
fn a_failing_decode_worker_trips_its_breaker_and_gets_one_probe_per_cooldown() {
    let timing = MockTiming {
        ttft: Duration::from_millis(1),
        itl: Duration::from_millis(1),
    };
    let (refusing, mock, _rt) = refusing_worker(timing);
    let s = start_full(
        timing,
        AdmissionConfig::default(),
        vec![refusing],
        tandem_router::Routing {
            policy: tandem_router::PolicyKind::RoundRobin,
            ..Default::default()
        },
    );
    let body = serde_json::json!({"model": "mock", "prompt": "hi", "max_tokens": 2});
    let send = || {
        let r = http::post(&s.http, "/v1/completions", &body);
        assert_eq!(r.status, 200, "{}", r.body);
        std::thread::sleep(Duration::from_millis(10));
    };
    // Load polls (every 200 ms) keep calling the worker healthy, so only the breaker keeps requests away: the third
    // failure in a row opens it for the first cooldown (1 s), during which it gets nothing.
    let started = Instant::now();
    while mock.refused() < 3 {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the worker was not tried"
        );
        send();
    }
    // `opened` is taken after the third refusal's round trip, a little after the cooldown started: the window
    // checked closed ends well before the cooldown does, however slow that round trip was.
    let opened = Instant::now();
    while opened.elapsed() < Duration::from_millis(600) {
        send();
    }
    assert_eq!(
        mock.refused(),
        3,
        "requests reached a worker whose breaker is open"
    );
    // After the cooldown exactly one probe goes through; it fails, and the breaker opens for twice as long.
    std::thread::sleep(Duration::from_millis(1100).saturating_sub(opened.elapsed()));
    while opened.elapsed() < Duration::from_millis(2400) {
        send();
    }
    assert_eq!(mock.refused(), 4);
}

#[test]
fn an_unavailable_decode_worker_is_skipped_and_the_request_served_elsewhere() {
    let timing = MockTiming {
        ttft: Duration::from_millis(1),
        itl: Duration::from_millis(1),
    };
    let (refusing, _mock, _rt) = refusing_worker(timing);
    let s = start_full(
        MockTiming {
            ttft: Duration::from_millis(1),
            itl: Duration::from_millis(1),
        },
        AdmissionConfig::default(),
        vec![refusing],
        tandem_router::Routing {
            policy: tandem_router::PolicyKind::RoundRobin,
            ..Default::default()
        },
    );
    let body = serde_json::json!({"model": "mock", "prompt": "hi", "max_tokens": 3});
    for i in 0..4 {
        let r = http::post(&s.http, "/v1/completions", &body);
        assert_eq!(r.status, 200, "request {i}: {}", r.body);
    }
}
