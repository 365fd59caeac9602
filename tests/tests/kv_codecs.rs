//! Compressed KV on the wire, end to end: router -> decode -> prefill -> transfer with each codec, over real
//! sockets with the real model. Greedy output under `fp8` and `int8` equals uncompressed on every engine fixture
//! prompt for its first 16 tokens, up to the first near-tie (a step where the reference's top two logits are within
//! `NEAR_TIE` of each other, where any perturbation may pick the other token; bench/RESULTS.md lists where each
//! codec diverged); `int4` moves at least 3.5x fewer bytes; a codec the decode worker cannot read is refused before
//! anything is allocated.

use serde_json::{Value, json};
use std::time::Duration;
use tandem_decode_node::DecodeConfig;
use tandem_engine::kv::KvFormat;
use tandem_engine::kv::codec::{BlockShape, Codec, Fill, encoded_len};
use tandem_prefill_node::PrefillConfig;
use tandem_proto::v1;
use tandem_tests::cluster::{Cluster, ClusterSpec, MODEL_ID, always_disaggregate, used_blocks};
use tandem_tests::{http, serial};

/// Top-2 logit margin (of the independent reference) below which a step counts as a near-tie.
const NEAR_TIE: f64 = 0.15;

struct Fixture {
    prompt: Vec<u32>,
    greedy: Vec<u32>,
    /// The reference's top-2 logit margin at each greedy step.
    margins: Vec<f64>,
}

fn fixtures() -> Vec<Fixture> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/reference/fixtures/fixtures.json"
    );
    let v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let ids = |v: &Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_u64().unwrap() as u32)
            .collect()
    };
    v["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| Fixture {
            prompt: ids(&p["token_ids"]),
            greedy: ids(&p["greedy"]),
            margins: p["greedy_top2_margin"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m.as_f64().unwrap())
                .collect(),
        })
        .collect()
}

/// A cluster whose decode worker always asks the prefill worker (no local prefill), with `codec` as its default;
/// `lossless`: the prefill worker applies the lossless stage to its chunks.
fn cluster(codec: Codec, lossless: bool, link: bool) -> Cluster {
    Cluster::start(ClusterSpec {
        routing: always_disaggregate(),
        decode_config: DecodeConfig {
            local_prefill_threshold_tokens: 0,
            kv_codec: codec,
            kv_link: link,
            ..Default::default()
        },
        prefill_config: PrefillConfig {
            kv_lossless: lossless,
            kv_link: link,
            ..Default::default()
        },
        ..Default::default()
    })
}

/// Greedy token ids and KV bytes moved, per prompt, on a fresh cluster (no prefix is cached on either side).
fn run(codec: Codec, prompts: &[Vec<u32>], n: u32) -> Vec<(Vec<u32>, u64)> {
    run_with(codec, false, prompts, n)
}

fn run_with(codec: Codec, lossless: bool, prompts: &[Vec<u32>], n: u32) -> Vec<(Vec<u32>, u64)> {
    run_linked(codec, lossless, true, prompts, n)
        .into_iter()
        .map(|(ids, bytes, _)| (ids, bytes))
        .collect()
}

/// Each prompt's tokens, KV bytes moved and, of those, bytes on the same-host link (`link` off: gRPC only).
fn run_linked(
    codec: Codec,
    lossless: bool,
    link: bool,
    prompts: &[Vec<u32>],
    n: u32,
) -> Vec<(Vec<u32>, u64, u64)> {
    let c = cluster(codec, lossless, link);
    let out = c.rt.block_on(async {
        let mut client =
            v1::generation_client::GenerationClient::new(Cluster::channel(&c.grpc).await);
        let mut out = Vec::new();
        for p in prompts {
            let mut s = client
                .generate(v1::GenerateRequest {
                    model: MODEL_ID.into(),
                    input: Some(v1::generate_request::Input::TokenIds(v1::TokenIds {
                        ids: p.clone(),
                    })),
                    stop: Some(v1::StopConditions {
                        max_tokens: n,
                        ignore_eos: true,
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            let (mut ids, mut timings) = (Vec::new(), None);
            while let Some(m) = s.message().await.unwrap() {
                ids.extend(m.token_ids);
                timings = m.timings.or(timings);
            }
            let t = timings.unwrap();
            assert!(!t.prefilled_locally, "{codec}: {t:?}");
            out.push((ids, t.kv_bytes_transferred, t.kv_bytes_on_link));
        }
        out
    });
    let (d, p) = c.wait_idle(Duration::from_secs(5));
    assert_eq!(used_blocks(&d[0]), 0, "{codec}: {d:?}");
    assert_eq!(used_blocks(&p[0]), 0, "{codec}: {p:?}");
    // Exact K/V joins the decode worker's prefix cache; a lossy codec's approximation never does, so no later
    // request (perhaps asking for `none`) inherits it.
    if codec == Codec::None {
        assert!(d[0].kv_blocks_cached > 0, "{d:?}");
    } else {
        assert_eq!(d[0].kv_blocks_cached, 0, "{codec}: {d:?}");
    }
    out
}

#[test]
fn fp8_and_int8_keep_greedy_output_and_int4_moves_a_quarter_of_the_bytes() {
    let _s = serial();
    let fx = fixtures();
    assert_eq!(fx.len(), 7);
    let prompts: Vec<Vec<u32>> = fx.iter().map(|f| f.prompt.clone()).collect();
    let none = run(Codec::None, &prompts, 16);
    for (i, (f, (ids, _))) in fx.iter().zip(&none).enumerate() {
        assert_eq!(ids[..], f.greedy[..16], "uncompressed, fixture prompt {i}");
    }
    let mut failures = Vec::new();
    for codec in [Codec::Int8, Codec::Fp8] {
        let got = run(codec, &prompts, 16);
        for (i, (f, (ids, _))) in fx.iter().zip(&got).enumerate() {
            let same = ids
                .iter()
                .zip(&f.greedy)
                .take_while(|(a, b)| a == b)
                .count();
            let confident = f.margins[..16]
                .iter()
                .take_while(|&&m| m >= NEAR_TIE)
                .count();
            // (Shown with --nocapture: where each codec leaves the fixture, for bench/RESULTS.md.)
            eprintln!(
                "{codec}: prompt {i} equal for {same} of 16 tokens (first near-tie at {confident})"
            );
            if same < confident.min(16) {
                failures.push(format!(
                    "{codec}: prompt {i} diverged at token {same} (margin {:.3}), before its first near-tie at {confident}",
                    f.margins[same]
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{failures:?}");
    let int4 = run(Codec::Int4, &prompts, 2);
    let (plain, packed): (u64, u64) = (
        none.iter().map(|r| r.1).sum(),
        int4.iter().map(|r| r.1).sum(),
    );
    assert!(plain > 0 && packed > 0);
    let ratio = plain as f64 / packed as f64;
    assert!(
        ratio >= 3.5,
        "int4 moved {packed} bytes, none {plain}: {ratio:.2}x"
    );
    // kivi2 sends each prompt's first and newest full block (and a partial last one) in f16 and the rest in 2 bits,
    // keys turned into their block's frame: exactly the bytes its rule gives for the prompt, and the decode worker
    // reads them back (the requests complete).
    let kivi2 = run(Codec::Kivi2, &prompts, 2);
    let shape = BlockShape {
        kv_heads: 3,
        block_size: 16,
        head_dim: 64,
    };
    for (p, (ids, bytes)) in prompts.iter().zip(&kivi2) {
        assert_eq!(ids.len(), 2);
        let want: usize = (0..p.len().div_ceil(16))
            .map(|i| {
                encoded_len(
                    Codec::Kivi2,
                    KvFormat::F32,
                    shape,
                    Fill::of_block(i, p.len(), 16),
                )
            })
            .sum::<usize>()
            * 30;
        assert_eq!(*bytes, want as u64, "kivi2, a prompt of {} tokens", p.len());
    }
}

#[test]
fn a_same_host_link_carries_every_payload_and_changes_no_token() {
    let _s = serial();
    let prompts: Vec<Vec<u32>> = fixtures().into_iter().take(3).map(|f| f.prompt).collect();
    for codec in [Codec::None, Codec::Int4] {
        let linked = run_linked(codec, false, true, &prompts, 8);
        let plain = run_linked(codec, false, false, &prompts, 8);
        for (i, (l, p)) in linked.iter().zip(&plain).enumerate() {
            assert_eq!(l.0, p.0, "{codec}: prompt {i}'s tokens");
            assert_eq!(l.1, p.1, "{codec}: prompt {i}'s KV bytes");
            assert!(l.1 > 0, "{codec}: prompt {i}");
            assert_eq!(
                l.2, l.1,
                "{codec}: prompt {i}: every payload byte on the link"
            );
            assert_eq!(p.2, 0, "{codec}: prompt {i}: no link when it is off");
        }
    }
}

#[test]
fn the_lossless_stage_moves_fewer_bytes_and_changes_no_token() {
    let _s = serial();
    let prompts: Vec<Vec<u32>> = fixtures().into_iter().map(|f| f.prompt).collect();
    for codec in [Codec::Int4, Codec::Int8] {
        let plain = run_with(codec, false, &prompts, 8);
        let packed = run_with(codec, true, &prompts, 8);
        for (i, (a, b)) in plain.iter().zip(&packed).enumerate() {
            assert_eq!(
                a.0, b.0,
                "{codec}, prompt {i}: the lossless stage changed the output"
            );
        }
        let (p, q): (u64, u64) = (
            plain.iter().map(|r| r.1).sum(),
            packed.iter().map(|r| r.1).sum(),
        );
        // These prompts are short (a few blocks per layer chunk), so the tables weigh more than at 512 tokens.
        assert!(
            q < p,
            "{codec}: {q} bytes with the lossless stage, {p} without"
        );
        eprintln!("{codec}: {p} -> {q} bytes ({:.3}x)", p as f64 / q as f64);
    }
}

#[test]
fn a_codec_the_decode_worker_cannot_read_is_refused_before_any_transfer() {
    let _s = serial();
    let c = cluster(Codec::None, false, true);
    // The status a decode worker answers `req` with (a prompt for the first prefill worker added), which must be
    // a refusal.
    let refused = |req: v1::DecodeRequest| {
        c.rt.block_on(async {
            let mut client = v1::decode_worker_client::DecodeWorkerClient::new(
                Cluster::channel(&c.decode_urls[0]).await,
            );
            client
                .generate(v1::DecodeRequest {
                    prompt_token_ids: vec![1000; 40],
                    prefill_endpoint: c.prefill_urls[0].clone(),
                    ..req
                })
                .await
                .map(|_| ())
                .unwrap_err()
        })
    };
    let status = refused(v1::DecodeRequest {
        codec: 99,
        ..Default::default()
    });
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("kv_codec"), "{status:?}");
    // So is a request naming more alternate prefill workers than a decode worker will try.
    let status = refused(v1::DecodeRequest {
        prefill_alternates: vec!["http://127.0.0.1:1".into(); 30],
        ..Default::default()
    });
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().contains("prefill_alternates"),
        "{status:?}"
    );
    let (d, p) = c.wait_idle(Duration::from_secs(2));
    assert_eq!(used_blocks(&d[0]), 0);
    assert_eq!(p[0].running_requests, 0);
    assert_eq!(
        d[0].kv_blocks_cached + p[0].kv_blocks_cached,
        0,
        "nothing was computed"
    );

    // Through the router: an unknown name is a 400 naming the field; a known one serves.
    let r = http::post(
        &c.http,
        "/v1/completions",
        &json!({"model": MODEL_ID, "prompt": "Hello", "max_tokens": 4, "kv_codec": "int3"}),
    );
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.json()["error"]["param"], "kv_codec");
    let r = http::post(
        &c.http,
        "/v1/completions",
        &json!({"model": MODEL_ID, "prompt": "Hello", "max_tokens": 4, "kv_codec": "kivi2"}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["usage"]["completion_tokens"], 4);
}
