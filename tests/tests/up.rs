//! `tandem up` as a user runs it: prints the router's address once ready, serves the OpenAI API, publishes KV
//! events a router can subscribe to, and stops cleanly on SIGTERM.

use serde_json::json;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tandem_engine::kv::{HashSeed, block_hashes};
use tandem_proto::{convert, v1};
use tandem_tests::cluster::{Cluster, ClusterSpec};
use tandem_tests::{chat_prompt, http, open_model, serial};

#[test]
fn tandem_up_serves_once_it_prints_its_address_and_stops_on_sigterm() {
    let _s = serial();
    let bin = tandem_tests::tandem_bin();
    let mut child = Command::new(bin)
        .args(["up", "--http", "127.0.0.1:0", "--threads", "2"])
        .env_remove("TANDEM_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line.trim().to_string();
    assert!(url.starts_with("http://127.0.0.1:"), "{line:?}");
    let addr = url.trim_start_matches("http://");
    // Ready as soon as the address is printed: the first request is served, no waiting.
    let r = http::post(
        addr,
        "/v1/chat/completions",
        &json!({"model": "SmolLM2-135M-Instruct.Q4_1", "messages": [{"role": "user", "content": "Hi!"}],
                "max_tokens": 4, "temperature": 0}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["usage"]["completion_tokens"], 4);
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let started = Instant::now();
    let exit = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "tandem up did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(exit.success(), "{exit:?}");
}

#[test]
fn workers_publish_the_block_hashes_a_router_computes() {
    let _s = serial();
    let (_, tok) = open_model();
    let user = "Describe a sunrise over the mountains in three sentences, with colors and sounds.";
    let prompt = chat_prompt(&tok, user);
    let c = Cluster::start(ClusterSpec::default());
    let events = c.rt.block_on(async {
        let mut d = v1::decode_worker_client::DecodeWorkerClient::new(
            Cluster::channel(&c.decode_urls[0]).await,
        );
        let mut sub = d
            .subscribe_kv_events(v1::SubscribeKvEventsRequest {})
            .await
            .unwrap()
            .into_inner();
        let mut stream = d
            .generate(v1::DecodeRequest {
                prompt_token_ids: prompt.clone(),
                stop: Some(v1::StopConditions {
                    max_tokens: 2,
                    ..Default::default()
                }),
                prefill_endpoint: c.prefill_urls[0].clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        while stream.message().await.unwrap().is_some() {}
        let mut events = Vec::new();
        // Events of the finished request are published by the scheduler's next pass; wait a bounded time.
        while let Ok(Ok(Some(batch))) =
            tokio::time::timeout(Duration::from_secs(2), sub.message()).await
        {
            events.extend(
                batch
                    .events
                    .iter()
                    .map(|e| convert::kv_event_from_wire(e).unwrap()),
            );
            if events
                .iter()
                .any(|e| matches!(e, tandem_engine::kv::KvEvent::Stored { .. }))
            {
                break;
            }
        }
        events
    });
    let stored: Vec<_> = events
        .iter()
        .flat_map(|e| match e {
            tandem_engine::kv::KvEvent::Stored { hashes, .. } => hashes.clone(),
            _ => vec![],
        })
        .collect();
    // The prompt's full blocks, hashed the way a router hashes them.
    let want = block_hashes(HashSeed::default(), &prompt[..prompt.len() / 16 * 16], 16);
    assert!(!want.is_empty());
    for h in &want {
        assert!(
            stored.contains(h),
            "hash {h:?} not published; got {stored:?}"
        );
    }
    let seqs: Vec<u64> = events
        .iter()
        .map(|e| match e {
            tandem_engine::kv::KvEvent::Stored { seq, .. }
            | tandem_engine::kv::KvEvent::Removed { seq, .. } => *seq,
        })
        .collect();
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "sequence numbers must increase by one: {seqs:?}"
    );
}
