//! A decode worker that fails mid-stream: the worker side of a resume (prompt plus the tokens already streamed,
//! continuing exactly after them), and the router moving live streams off a decode process killed under load so
//! that every request completes with every token once.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tandem_client::{Client, FinishReason, GenerateRequest};
use tandem_engine::generate::StopConditions;
use tandem_engine::sampling::SamplingParams;
use tandem_proto::{convert, v1};
use tandem_tests::cluster::{Cluster, ClusterSpec};
use tandem_tests::procs::{Node, free_port};
use tandem_tests::{chat_prompt, open_model, serial};

fn request(prompt: &[u32], resume: &[u32]) -> v1::DecodeRequest {
    v1::DecodeRequest {
        request_id: "resume-test".into(),
        prompt_token_ids: prompt.to_vec(),
        sampling: Some(convert::sampling_to_wire(&SamplingParams {
            temperature: 0.8,
            repetition_penalty: 1.1,
            seed: Some(7),
            ..Default::default()
        })),
        stop: Some(convert::stop_to_wire(&StopConditions {
            max_tokens: 24,
            ignore_eos: true,
            ..Default::default()
        })),
        resume_token_ids: resume.to_vec(),
        ..Default::default()
    }
}

async fn collect(
    d: &mut v1::decode_worker_client::DecodeWorkerClient<tonic::transport::Channel>,
    r: v1::DecodeRequest,
) -> Result<Vec<v1::GenerateResponse>, tonic::Status> {
    let mut s = d.generate(r).await?.into_inner();
    let mut out = Vec::new();
    while let Some(m) = s.message().await? {
        out.push(m);
    }
    Ok(out)
}

#[test]
fn a_resumed_request_continues_exactly_after_the_tokens_already_streamed() {
    let _s = serial();
    let (_, tok) = open_model();
    let prompt = chat_prompt(&tok, "Write a short poem about rivers and stones.");
    let c = Cluster::start(ClusterSpec {
        prefill: 0,
        ..Default::default()
    });
    c.rt.block_on(async {
        let ch = Cluster::channel(&c.decode_urls[0]).await;
        let mut d = v1::decode_worker_client::DecodeWorkerClient::new(ch);
        let whole = collect(&mut d, request(&prompt, &[])).await.unwrap();
        let tokens: Vec<u32> = whole.iter().flat_map(|m| m.token_ids.clone()).collect();
        assert_eq!(tokens.len(), 24);
        // The first messages up to 10 tokens, as a client would have seen them before the worker died.
        let mut seen = 0;
        let mut text_before = String::new();
        for m in &whole {
            if seen == 10 {
                break;
            }
            seen += m.token_ids.len();
            text_before.push_str(&m.text);
        }
        assert_eq!(seen, 10, "one token per message expected");

        let rest = collect(&mut d, request(&prompt, &tokens[..10]))
            .await
            .unwrap();
        let rest_tokens: Vec<u32> = rest.iter().flat_map(|m| m.token_ids.clone()).collect();
        assert_eq!(
            rest_tokens,
            tokens[10..],
            "same seed, same draw after the resume point"
        );
        let text_after: String = rest.iter().map(|m| m.text.as_str()).collect();
        let text_whole: String = whole.iter().map(|m| m.text.as_str()).collect();
        assert_eq!(text_before + &text_after, text_whole);
        let usage = rest.last().unwrap().usage.unwrap();
        assert_eq!(
            (usage.prompt_tokens as usize, usage.completion_tokens),
            (prompt.len(), 24)
        );

        // Tokens that already finish the request, or a resume that names a prefill worker, are refused by field.
        let e = collect(&mut d, request(&prompt, &tokens))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        let mut r = request(&prompt, &tokens[..3]);
        r.prefill_endpoint = "http://127.0.0.1:1".into();
        let e = collect(&mut d, r).await.unwrap_err();
        assert!(e.message().contains("resume_token_ids"), "{e:?}");
    });
}

/// Two decode processes behind a router; `N` greedy streams of `max` tokens start (round-robin: half on each
/// worker), and once every stream has tokens `disrupt` acts on the first worker. Every stream must then complete
/// with exactly `max` tokens whose text matches its token ids.
fn streams_survive(first_worker_args: &[&str], max: u32, disrupt: impl FnOnce(&mut Node)) {
    let (_, tok) = open_model();
    let worker = |extra: &[&str]| {
        let mut args = vec![
            "--threads",
            "1",
            "decode",
            "--listen",
            "127.0.0.1:0",
            "--kv-cache-mib",
            "64",
        ];
        args.extend_from_slice(extra);
        Node::start(&args)
    };
    let mut d1 = worker(first_worker_args);
    let d2 = worker(&[]);
    let grpc = format!("127.0.0.1:{}", free_port());
    let _router = Node::start(&[
        "router",
        "--http",
        "127.0.0.1:0",
        "--grpc",
        &grpc,
        "--decode-worker",
        &d1.url,
        "--decode-worker",
        &d2.url,
        "--poll-interval-ms",
        "200",
        "--policy",
        "round-robin",
    ]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    const N: usize = 6;
    rt.block_on(async {
        let client = Client::connect(&format!("http://{grpc}")).await.unwrap();
        let started = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..N)
            .map(|i| {
                let client = client.clone();
                let started = started.clone();
                tokio::spawn(async move {
                    let mut s = client
                        .generate(
                            GenerateRequest::chat()
                                .user(format!("Tell me fact number {i} about the moon."))
                                .max_tokens(max)
                                .ignore_eos()
                                .temperature(0.0),
                        )
                        .await
                        .unwrap();
                    let (mut ids, mut text, mut last) = (Vec::new(), String::new(), None);
                    while let Some(c) = s.next().await.unwrap() {
                        if ids.len() < 3 && ids.len() + c.token_ids.len() >= 3 {
                            started.fetch_add(1, Ordering::SeqCst);
                        }
                        ids.extend(c.token_ids);
                        text.push_str(&c.text);
                        if c.finish_reason.is_some() {
                            last = Some((c.finish_reason, c.usage));
                        }
                    }
                    (ids, text, last)
                })
            })
            .collect();
        while started.load(Ordering::SeqCst) < N {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Half the streams are running on the first worker now.
        let mut load =
            v1::decode_worker_client::DecodeWorkerClient::new(Cluster::channel(&d1.url).await);
        let running = load
            .load(v1::LoadRequest {})
            .await
            .unwrap()
            .into_inner()
            .running_requests;
        assert!(running >= 1, "no stream on the first worker");
        tokio::task::block_in_place(|| disrupt(&mut d1));
        for t in tasks {
            let (ids, text, last) = t.await.unwrap();
            let (finish, usage) = last.expect("the stream ended without its last message");
            assert_eq!(finish, Some(FinishReason::Length), "{text:?}");
            assert_eq!(
                ids.len(),
                max as usize,
                "a token missing or sent twice: {text:?}"
            );
            assert_eq!(usage.unwrap().completion_tokens, max);
            assert_eq!(text, tok.decode(&ids).unwrap(), "text and tokens disagree");
        }
    });
}

#[test]
fn streams_on_a_killed_decode_process_complete_on_another_with_every_token_once() {
    let _s = serial();
    // Long enough that the first worker's streams are still running when the last stream elsewhere has started.
    streams_survive(&[], 96, |d1| d1.kill());
}

#[test]
fn a_draining_decode_worker_stops_by_its_deadline_and_its_cut_streams_complete_elsewhere() {
    let _s = serial();
    streams_survive(&["--drain-timeout-s", "1"], 160, |d1| {
        let started = std::time::Instant::now();
        let exit = d1.terminate(Duration::from_secs(10));
        assert!(exit.success(), "{exit:?}");
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_secs(4),
            "stopped after {took:?}, not at its 1 s drain deadline"
        );
    });
}
