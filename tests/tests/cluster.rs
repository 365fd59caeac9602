//! The disaggregated request path end to end on the real model: router -> decode -> prefill -> KV transfer, each
//! node on its own loopback socket, checked against a single engine's greedy output, under concurrency, client
//! disconnects, a stalled transfer, a prefill worker that is down, and bad requests.

use serde_json::{Value, json};
use std::time::Duration;
use tandem_decode_node::DecodeConfig;
use tandem_proto::v1;
use tandem_tests::cluster::{Cluster, ClusterSpec, MODEL_ID, loopback, used_blocks};
use tandem_tests::{EngineOptions, chat_prompt, http, open_model, reference_greedy, serial};

/// Long enough for several prefill chunks of 64 tokens and many blocks.
fn long_question() -> String {
    let facts =
        "The river flows north past the old mill, where the miller keeps three cats and a goat. ";
    format!(
        "{}Where does the river flow, and what does the miller keep?",
        facts.repeat(12)
    )
}

fn chat_body(user: &str, max_tokens: usize, stream: bool) -> Value {
    json!({"model": MODEL_ID, "messages": [{"role": "user", "content": user}], "max_tokens": max_tokens,
           "temperature": 0, "stream": stream})
}

/// The text of a whole chat or completion response.
fn content(v: &Value) -> String {
    let c = &v["choices"][0];
    c["message"]["content"]
        .as_str()
        .or(c["text"].as_str())
        .unwrap()
        .to_string()
}

/// The concatenated text of an SSE stream, and its last data chunk before `[DONE]`.
fn streamed(events: Vec<String>) -> (String, Value) {
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    let mut text = String::new();
    let mut last = Value::Null;
    for e in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(e).unwrap();
        let c = &v["choices"][0];
        text.push_str(
            c["delta"]["content"]
                .as_str()
                .or(c["text"].as_str())
                .unwrap_or(""),
        );
        last = v;
    }
    (text, last)
}

/// Prompts with fewer uncached tokens than this are prefilled on the decode worker in these tests.
const LOCAL_PREFILL_BELOW: usize = 48;

fn decode_config() -> DecodeConfig {
    DecodeConfig {
        local_prefill_threshold_tokens: LOCAL_PREFILL_BELOW,
        ..Default::default()
    }
}

fn small_chunks() -> ClusterSpec {
    ClusterSpec {
        decode_config: decode_config(),
        // Small prefill chunks: a long prompt is pushed over many steps, layer by layer.
        prefill_engine: EngineOptions {
            max_batch_tokens: 64,
            ..Default::default()
        },
        ..Default::default()
    }
}

#[test]
fn greedy_output_through_the_cluster_matches_a_single_engine() {
    let _s = serial();
    let (_, tok) = open_model();
    let mid = "What is the capital of France? Answer in one sentence, then name one famous landmark of that city, \
               one river that runs through it, and one dish people like to eat there.";
    let users = ["Hi!", mid, &long_question()];
    let prompts: Vec<Vec<u32>> = users.iter().map(|u| chat_prompt(&tok, u)).collect();
    assert!(
        prompts[0].len() < LOCAL_PREFILL_BELOW
            && prompts[1].len() > LOCAL_PREFILL_BELOW + 16
            && prompts[2].len() > 200,
        "{:?}",
        prompts.iter().map(Vec::len).collect::<Vec<_>>()
    );
    let want = reference_greedy(&prompts, 24);
    let c = Cluster::start(small_chunks());
    // First, on a cold decode worker, the long prompt goes through the prefill worker: timings say so, and every
    // block of every layer crossed (K and V, f32). Later requests for it hit the decode worker's own cache.
    let (timings, text) = c.rt.block_on(async {
        let mut client =
            v1::generation_client::GenerationClient::new(Cluster::channel(&c.grpc).await);
        let mut s = client
            .generate(v1::GenerateRequest {
                model: MODEL_ID.into(),
                input: Some(v1::generate_request::Input::TokenIds(v1::TokenIds {
                    ids: prompts[2].clone(),
                })),
                stop: Some(v1::StopConditions {
                    max_tokens: 24,
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let mut text = String::new();
        let mut timings = None;
        while let Some(m) = s.message().await.unwrap() {
            text.push_str(&m.text);
            timings = m.timings.or(timings);
        }
        (timings.unwrap(), text)
    });
    assert!(!timings.prefilled_locally, "{timings:?}");
    let bytes_per_block = 2 * 30 * 3 * 64 * 16 * 4;
    assert_eq!(
        timings.kv_bytes_transferred,
        prompts[2].len().div_ceil(16) as u64 * bytes_per_block,
        "{timings:?}"
    );

    assert_eq!(text, want[2]);
    for (user, want) in users.iter().zip(&want) {
        let r = http::post(&c.http, "/v1/chat/completions", &chat_body(user, 24, false));
        assert_eq!(r.status, 200, "{}", r.body);
        let v = r.json();
        assert_eq!(&content(&v), want, "prompt {user:?}");
        let tokens = v["usage"]["completion_tokens"].as_u64().unwrap();
        let finish = &v["choices"][0]["finish_reason"];
        assert_eq!(finish, if tokens == 24 { "length" } else { "stop" }, "{v}");
        let ev = http::stream(&c.http, "/v1/chat/completions", &chat_body(user, 24, true));
        assert_eq!(ev.status, 200);
        let (text, last) = streamed(ev.collect());
        assert_eq!(&text, want, "streamed, prompt {user:?}");
        assert_eq!(&last["choices"][0]["finish_reason"], finish);
    }
    // Completions on raw text agree with the engine on the same raw prompt.
    let raw = "The three primary colors are";
    let want = reference_greedy(&[tok.encode(raw).unwrap()], 16);
    let r = http::post(
        &c.http,
        "/v1/completions",
        &json!({"model": MODEL_ID, "prompt": raw, "max_tokens": 16, "temperature": 0}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(content(&r.json()), want[0]);
    let ev = http::stream(
        &c.http,
        "/v1/completions",
        &json!({"model": MODEL_ID, "prompt": raw, "max_tokens": 16, "temperature": 0, "stream": true}),
    );
    assert_eq!(streamed(ev.collect()).0, want[0]);

    let (d, p) = c.wait_idle(Duration::from_secs(5));
    assert_eq!(used_blocks(&d[0]), 0, "{d:?}");
    assert_eq!(used_blocks(&p[0]), 0, "{p:?}");
    assert!(
        d[0].kv_blocks_cached > 0,
        "finished prompts stay in the prefix cache: {d:?}"
    );
    // Both report their recent forward passes: decode steps of a token or so, prefill chunks of many.
    assert!(
        d[0].recent_step_us > 0 && p[0].recent_step_us > 0,
        "{d:?} {p:?}"
    );
    assert!(
        d[0].recent_step_tokens >= 1.0 && p[0].recent_step_tokens > d[0].recent_step_tokens,
        "{d:?} {p:?}"
    );
}

#[test]
fn the_tandem_generate_binary_and_the_cluster_agree() {
    let _s = serial();
    let bin = tandem_tests::tandem_bin();
    let q = long_question();
    let out = std::process::Command::new(bin)
        .args([
            "generate",
            "--prompt",
            &q,
            "--max-tokens",
            "20",
            "--threads",
            "2",
        ])
        .env_remove("TANDEM_LOG")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cli = String::from_utf8(out.stdout).unwrap();
    let c = Cluster::start(small_chunks());
    let r = http::post(&c.http, "/v1/chat/completions", &chat_body(&q, 20, false));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(format!("{}\n", content(&r.json())), cli);
}

#[test]
fn concurrent_requests_of_mixed_lengths_all_complete_correctly() {
    let _s = serial();
    let (_, tok) = open_model();
    let long = long_question();
    let cases: Vec<(String, usize)> = (0..32)
        .map(|i| {
            let user = match i % 4 {
                0 => format!("Count from {i} to {}.", i + 5),
                1 => format!(
                    "Name a color that starts with the letter {}.",
                    (b'a' + i as u8 % 26) as char
                ),
                2 => format!("{long} Also, what is {i} plus {i}?"),
                _ => format!("Write one sentence about the number {i}."),
            };
            (user, 4 + (i * 7) % 29)
        })
        .collect();
    let prompts: Vec<Vec<u32>> = cases.iter().map(|(u, _)| chat_prompt(&tok, u)).collect();
    let want: Vec<String> = cases
        .iter()
        .zip(&prompts)
        .map(|((_, n), p)| reference_greedy(std::slice::from_ref(p), *n).remove(0))
        .collect();
    let c = Cluster::start(ClusterSpec::default());
    let got: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = cases
            .iter()
            .enumerate()
            .map(|(i, (user, n))| {
                let http = c.http.clone();
                s.spawn(move || {
                    if i % 2 == 0 {
                        let r =
                            http::post(&http, "/v1/chat/completions", &chat_body(user, *n, false));
                        assert_eq!(r.status, 200, "{}", r.body);
                        content(&r.json())
                    } else {
                        streamed(
                            http::stream(&http, "/v1/chat/completions", &chat_body(user, *n, true))
                                .collect(),
                        )
                        .0
                    }
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g, w, "request {i}: {:?}", cases[i].0);
    }
    let (d, p) = c.wait_idle(Duration::from_secs(5));
    assert_eq!(
        (used_blocks(&d[0]), used_blocks(&p[0])),
        (0, 0),
        "{d:?} {p:?}"
    );
}

#[test]
fn a_client_that_disconnects_frees_every_block_on_both_nodes() {
    let _s = serial();
    let c = Cluster::start(ClusterSpec {
        decode_engine: EngineOptions {
            kv_mib: 256,
            ..Default::default()
        },
        ..Default::default()
    });
    let body = json!({"model": MODEL_ID, "messages": [{"role": "user", "content": long_question()}],
                      "max_tokens": 2000, "ignore_eos": true, "temperature": 0, "stream": true});
    let mut ev = http::stream(&c.http, "/v1/chat/completions", &body);
    assert_eq!(ev.status, 200);
    for _ in 0..3 {
        assert!(ev.next_data().is_some());
    }
    let load = c.decode_load(0);
    assert_eq!(load.running_requests, 1, "{load:?}");
    assert!(used_blocks(&load) > 0);
    drop(ev);
    let (d, p) = c.wait_idle(Duration::from_secs(10));
    assert_eq!(d[0].running_requests, 0, "{d:?}");
    assert_eq!(
        (used_blocks(&d[0]), used_blocks(&p[0])),
        (0, 0),
        "{d:?} {p:?}"
    );
}

/// A prefill worker that accepts requests and never answers: a transfer that stalls.
struct StalledPrefill;

#[tonic::async_trait]
impl v1::prefill_worker_server::PrefillWorker for StalledPrefill {
    async fn prefill(
        &self,
        _: tonic::Request<v1::PrefillRequest>,
    ) -> Result<tonic::Response<v1::PrefillResponse>, tonic::Status> {
        std::future::pending().await
    }
    async fn load(
        &self,
        _: tonic::Request<v1::LoadRequest>,
    ) -> Result<tonic::Response<v1::LoadReport>, tonic::Status> {
        let naming = tandem_router::BlockNaming::default();
        Ok(tonic::Response::new(v1::LoadReport {
            block_size: naming.block_size as u32,
            hash_seed: naming.seed.0,
            ..Default::default()
        }))
    }
    type SubscribeKvEventsStream = tokio_stream_empty::Empty;
    async fn subscribe_kv_events(
        &self,
        _: tonic::Request<v1::SubscribeKvEventsRequest>,
    ) -> Result<tonic::Response<Self::SubscribeKvEventsStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("no events"))
    }
    async fn kv_snapshot(
        &self,
        _: tonic::Request<v1::KvSnapshotRequest>,
    ) -> Result<tonic::Response<v1::KvSnapshotResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("no cache"))
    }
}

mod tokio_stream_empty {
    /// A stream type for the unimplemented subscription.
    pub type Empty = std::pin::Pin<
        Box<
            dyn tonic::codegen::tokio_stream::Stream<
                    Item = Result<tandem_proto::v1::KvEventBatch, tonic::Status>,
                > + Send,
        >,
    >;
}

#[test]
fn a_transfer_stalled_past_its_deadline_fails_cleanly_and_frees_its_blocks() {
    let _s = serial();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (stalled_url, _server) = rt.block_on(async {
        let l = loopback().await;
        let url = format!("http://{}", l.local_addr().unwrap());
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(v1::prefill_worker_server::PrefillWorkerServer::new(
                    StalledPrefill,
                ))
                .serve_with_incoming(
                    tonic::codegen::tokio_stream::wrappers::TcpListenerStream::new(l),
                ),
        );
        (url, server)
    });
    let c = Cluster::start(ClusterSpec {
        prefill: 0,
        extra_prefill_urls: vec![stalled_url],
        decode_config: DecodeConfig {
            transfer_timeout: Duration::from_millis(500),
            ..decode_config()
        },
        ..Default::default()
    });
    let started = std::time::Instant::now();
    let r = http::post(
        &c.http,
        "/v1/chat/completions",
        &chat_body(&long_question(), 8, false),
    );
    assert_eq!(r.status, 504, "{}", r.body);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    let msg = r.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(msg.contains("deadline"), "{msg}");
    let (d, _) = c.wait_idle(Duration::from_secs(5));
    assert_eq!(used_blocks(&d[0]), 0, "{d:?}");
    // A prompt short enough to prefill locally still works on the same worker.
    let r = http::post(&c.http, "/v1/chat/completions", &chat_body("Hi!", 4, false));
    assert_eq!(r.status, 200, "{}", r.body);
}

#[test]
fn a_prefill_worker_that_is_down_means_another_one_local_prefill_or_a_clear_error() {
    let _s = serial();
    let (_, tok) = open_model();
    let prompt = chat_prompt(&tok, &long_question());
    let want = reference_greedy(std::slice::from_ref(&prompt), 12).remove(0);
    // An address nothing listens on: port 1 is privileged and unused (a port bound and closed here could be handed
    // to the cluster's next listener).
    let dead = "http://127.0.0.1:1".to_string();
    let generate =
        |c: &Cluster, alternates: Vec<String>| -> Result<(String, v1::Timings), tonic::Status> {
            c.rt.block_on(async {
                let mut client = v1::decode_worker_client::DecodeWorkerClient::new(
                    Cluster::channel(&c.decode_urls[0]).await,
                );
                let mut s = client
                    .generate(v1::DecodeRequest {
                        prompt_token_ids: prompt.clone(),
                        stop: Some(v1::StopConditions {
                            max_tokens: 12,
                            ..Default::default()
                        }),
                        prefill_endpoint: dead.clone(),
                        prefill_alternates: alternates,
                        ..Default::default()
                    })
                    .await?
                    .into_inner();
                let (mut text, mut timings) = (String::new(), None);
                while let Some(m) = s.message().await? {
                    text.push_str(&m.text);
                    timings = m.timings.or(timings);
                }
                Ok((text, timings.unwrap()))
            })
        };
    let c = Cluster::start(ClusterSpec {
        prefill: 0,
        ..Default::default()
    });
    let (text, timings) = generate(&c, Vec::new()).unwrap();
    assert_eq!(text, want);
    assert!(timings.prefilled_locally);
    drop(c);
    let c = Cluster::start(ClusterSpec {
        prefill: 1,
        decode_config: DecodeConfig {
            fallback_to_local_prefill: false,
            ..Default::default()
        },
        ..Default::default()
    });
    let e = generate(&c, Vec::new()).unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    assert!(e.message().contains("prefill worker"), "{e:?}");
    let (d, _) = c.wait_idle(Duration::from_secs(5));
    assert_eq!(used_blocks(&d[0]), 0, "{d:?}");
    // The next prefill worker in line takes over from the dead one.
    let (text, timings) = generate(&c, vec![c.prefill_urls[0].clone()]).unwrap();
    assert_eq!(text, want);
    assert!(
        !timings.prefilled_locally && timings.kv_bytes_transferred > 0,
        "{timings:?}"
    );
}

#[test]
fn bad_requests_get_openai_errors_and_the_next_good_request_works() {
    let _s = serial();
    let c = Cluster::start(ClusterSpec::default());
    let too_long = "word ".repeat(9000);
    let m = |extra: Value| {
        let mut b = json!({"model": MODEL_ID, "messages": [{"role": "user", "content": "Hi"}]});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b.to_string()
    };
    let cases: Vec<(&str, String, Option<&str>)> = vec![
        ("malformed JSON", "{\"model\": ".to_string(), None),
        ("not an object", "[1, 2]".to_string(), None),
        ("unknown model", m(json!({"model": "gpt-9"})), Some("model")),
        (
            "negative max_tokens",
            m(json!({"max_tokens": -1})),
            Some("max_tokens"),
        ),
        (
            "huge max_tokens",
            m(json!({"max_tokens": 10_000_000})),
            Some("max_tokens"),
        ),
        (
            "prompt over the context",
            m(json!({"messages": [{"role": "user", "content": too_long}]})),
            Some("messages"),
        ),
        (
            "temperature as a string",
            m(json!({"temperature": "hot"})),
            Some("temperature"),
        ),
        (
            "temperature out of range",
            m(json!({"temperature": 500})),
            None,
        ),
        (
            "messages as a string",
            m(json!({"messages": "hello"})),
            Some("messages"),
        ),
        ("stop as a number", m(json!({"stop": 3})), Some("stop")),
        (
            "missing model",
            json!({"messages": []}).to_string(),
            Some("model"),
        ),
    ];
    for (what, body, param) in &cases {
        let r = http::request(&c.http, "POST", "/v1/chat/completions", body.as_bytes());
        assert_eq!(r.status, 400, "{what}: {}", r.body);
        let e = &r.json()["error"];
        assert_eq!(e["type"], "invalid_request_error", "{what}: {e}");
        assert!(!e["message"].as_str().unwrap().is_empty(), "{what}");
        if let Some(p) = param {
            assert_eq!(e["param"], *p, "{what}: {e}");
        }
    }
    let r = http::post(
        &c.http,
        "/v1/completions",
        &json!({"model": MODEL_ID, "prompt": {"a": 1}}),
    );
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(
        http::request(&c.http, "GET", "/v1/nothing", b"").status,
        404
    );
    let r = http::post(&c.http, "/v1/chat/completions", &chat_body("Hi!", 4, false));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["usage"]["completion_tokens"], 4);
    let models = http::request(&c.http, "GET", "/v1/models", b"").json();
    assert_eq!(models["data"][0]["id"], MODEL_ID);
    assert_eq!(http::request(&c.http, "GET", "/health", b"").status, 200);
}
