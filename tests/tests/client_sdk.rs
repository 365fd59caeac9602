//! The SDKs against a local cluster: the Rust client (builder, streaming, cancellation on drop, deadlines,
//! connection retries) and the Python SDK generated from proto/ with grpcio.

use serde_json::Value;
use std::process::Command;
use std::time::{Duration, Instant};
use tandem_client::{Client, ClientConfig, ClientError, FinishReason, GenerateRequest};
use tandem_tests::cluster::{Cluster, ClusterSpec, used_blocks};
use tandem_tests::{chat_prompt, open_model, reference_greedy, serial};

#[test]
fn the_rust_client_streams_cancels_and_keeps_deadlines() {
    let _s = serial();
    let (_, tok) = open_model();
    let user = "List three animals that live in the ocean.";
    let want = reference_greedy(&[chat_prompt(&tok, user)], 16).remove(0);
    let c = Cluster::start(ClusterSpec::default());
    c.rt.block_on(async {
        let client = Client::connect(&c.grpc).await.unwrap();
        let models = client.list_models().await.unwrap();
        assert_eq!(models.len(), 1);
        assert_eq!(
            client.tokenize("Hello world").await.unwrap(),
            tok.encode("Hello world").unwrap()
        );

        let (text, finish, usage) = client
            .generate(GenerateRequest::chat().user(user).max_tokens(16))
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        assert_eq!(text, want);
        let usage = usage.unwrap();
        assert_eq!(
            finish,
            Some(if usage.completion_tokens == 16 {
                FinishReason::Length
            } else {
                FinishReason::Stop
            })
        );

        // Bad input is a typed error naming the field.
        let e = client
            .generate(GenerateRequest::prompt("x").model("no-such-model"))
            .await
            .err()
            .unwrap();
        assert!(
            matches!(&e, ClientError::Invalid(m) if m.contains("no-such-model")),
            "{e:?}"
        );

        // A deadline far shorter than the work ends the call with a deadline error.
        let slow = GenerateRequest::prompt("Once upon a time")
            .max_tokens(1000)
            .ignore_eos()
            .deadline(Duration::from_millis(300));
        let started = Instant::now();
        let r = match client.generate(slow).await {
            Ok(s) => s.collect().await.map(|_| ()),
            Err(e) => Err(e),
        };
        assert!(matches!(r, Err(ClientError::DeadlineExceeded(_))), "{r:?}");
        assert!(started.elapsed() < Duration::from_secs(3));

        // Dropping a stream mid-generation cancels it.
        let mut s = client
            .generate(GenerateRequest::prompt("Once upon a time").max_tokens(1000))
            .await
            .unwrap();
        assert!(s.next().await.unwrap().is_some());
        drop(s);
    });
    let (d, _) = c.wait_idle(Duration::from_secs(10));
    assert_eq!((d[0].running_requests, used_blocks(&d[0])), (0, 0), "{d:?}");
    // Connection failures are retried, then reported.
    c.rt.block_on(async {
        // Port 1 is privileged and nothing listens on it.
        let dead = "http://127.0.0.1:1";
        let config = ClientConfig {
            connect_retries: 2,
            retry_backoff: Duration::from_millis(10),
            ..Default::default()
        };
        let e = Client::connect_with(dead, config).await.unwrap_err();
        assert!(
            matches!(&e, ClientError::Connect { message, .. } if message.contains("3 attempts")),
            "{e:?}"
        );
    });
}

#[test]
fn the_generated_python_sdk_gets_the_engines_greedy_text() {
    let _s = serial();
    let (_, tok) = open_model();
    let user = "What color is the sky on a clear day?";
    let want = reference_greedy(&[chat_prompt(&tok, user)], 12).remove(0);
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let sdk = std::env::temp_dir().join(format!("tandem-python-sdk-{}", std::process::id()));
    let gen_out = Command::new(root.join("client/python/generate.sh"))
        .arg(&sdk)
        .output()
        .unwrap();
    assert!(
        gen_out.status.success(),
        "generate.sh: {}",
        String::from_utf8_lossy(&gen_out.stderr)
    );
    let c = Cluster::start(ClusterSpec::default());
    let addr = c.grpc.trim_start_matches("http://").to_string();
    let out = Command::new("python3")
        .arg(root.join("client/python/check_sdk.py"))
        .args([sdk.to_str().unwrap(), &addr, user, "12"])
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&sdk);
    assert!(
        out.status.success(),
        "check_sdk.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(got["text"], want.as_str());
    assert!(
        got["finish_reason"] == "FINISH_REASON_STOP"
            || got["finish_reason"] == "FINISH_REASON_LENGTH",
        "{got}"
    );
}
