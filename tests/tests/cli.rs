//! The `tandem` binary end to end on the real model: generation matches the reference, evaluation and benchmark
//! print what they promise, and bad input gets a one-line error and a non-zero exit.
//!
//! Run through `scripts/test.sh`, which fetches the model and builds the release binary first.

use serde_json::Value;
use std::path::PathBuf;
use std::process::{Command, Output};
use tandem_tests::{serial, tandem_bin};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn run(args: &[&str]) -> Output {
    Command::new(tandem_bin())
        .args(args)
        .env_remove("TANDEM_LOG")
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8(o.stderr.clone()).unwrap()
}

fn fixture(name: &str) -> Value {
    let text =
        std::fs::read_to_string(repo().join("tests/reference/fixtures/fixtures.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    v["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .unwrap()
        .clone()
}

#[test]
fn raw_greedy_generation_matches_the_reference() {
    let f = fixture("capital_raw");
    let o = run(&[
        "generate",
        "--raw",
        "--prompt",
        f["prompt"].as_str().unwrap(),
        "--max-tokens",
        "32",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    // The reference decodes 32 tokens without stopping; we stop at the end-of-turn token, which is not printed.
    let want = f["greedy_text"].as_str().unwrap();
    let want = want.split("<|im_end|>").next().unwrap();
    assert_eq!(stdout(&o), format!("{want}\n"));
}

#[test]
fn chat_generation_answers_and_stops() {
    let o = run(&[
        "generate",
        "--prompt",
        "What is the capital of France?",
        "--max-tokens",
        "24",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("Paris"), "{}", stdout(&o));
    assert!(stderr(&o).contains("finish: stop"), "{}", stderr(&o));
}

#[test]
fn seeded_sampling_is_reproducible_and_stop_strings_cut() {
    let args = [
        "generate",
        "--raw",
        "--prompt",
        "My favourite animal is",
        "--max-tokens",
        "20",
        "--temperature",
        "0.9",
        "--seed",
        "7",
    ];
    let a = run(&args);
    let b = run(&args);
    assert!(a.status.success(), "{}", stderr(&a));
    assert_eq!(stdout(&a), stdout(&b));
    let o = run(&[
        "generate",
        "--raw",
        "--prompt",
        "1, 2, 3, 4,",
        "--max-tokens",
        "30",
        "--stop",
        "8",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(!out.contains('8') && out.contains('7'), "{out:?}");
}

#[test]
fn perplexity_is_sane_and_json_parses() {
    let dir = std::env::temp_dir().join(format!("tandem-ppl-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("text.txt");
    let text = std::fs::read_to_string(repo().join("tests/data/wiki_excerpt.txt")).unwrap();
    std::fs::write(&file, &text).unwrap();
    let ppl_args = [
        "eval",
        "perplexity",
        "--file",
        file.to_str().unwrap(),
        "--context",
        "128",
    ];
    let o = run(&[&ppl_args[..], &["--json"]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    let ppl = v["perplexity"].as_f64().unwrap();
    assert!(
        ppl > 2.0 && ppl < 60.0,
        "perplexity {ppl} of English prose is out of the plausible range"
    );
    assert!(v["tokens_scored"].as_u64().unwrap() >= 63);
    let o = run(&ppl_args);
    assert!(stdout(&o).starts_with("perplexity: "), "{}", stdout(&o));
}

#[test]
fn eval_kv_measures_every_codec_against_the_uncompressed_cache() {
    let text = repo().join("tests/data/wiki_excerpt.txt");
    let svg = std::env::temp_dir().join(format!("tandem-evalkv-{}.svg", std::process::id()));
    let o = run(&[
        "eval",
        "kv",
        "--file",
        text.to_str().unwrap(),
        "--context",
        "128",
        "--continuation",
        "32",
        "--max-windows",
        "2",
        "--passkey-lengths",
        "256",
        "--passkey-depths",
        "0.5",
        "--evictions",
        "snapkv:0.5,streaming:32",
        "--evict-codecs",
        "int4",
        "--json",
        "--svg",
        svg.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    let codecs = v["codecs"].as_array().unwrap();
    assert_eq!(
        codec_names(&v),
        [
            "none",
            "fp8",
            "int8",
            "int4",
            "kivi2",
            "int4+snapkv:0.5",
            "int4+streaming:32"
        ]
    );
    let get = |i: usize, k: &str| codecs[i][k].as_f64().unwrap();
    // none moves the f32 cache byte for byte: 2 x 30 layers x 3 heads x 64 dims x 4 bytes per token.
    assert_eq!(get(0, "bytes_per_token"), 46080.0);
    assert_eq!(get(0, "top1_agreement"), 1.0);
    assert_eq!(get(0, "mean_kl"), 0.0);
    assert_eq!(get(0, "perplexity_change_pct"), 0.0);
    // Sizes follow from the layouts (docs/kv-wire-format.md): 8.25 bits for int8, 5 for int4, 3.5 for kivi2, whose
    // first and newest full block travel in f16 (2 of the context's 8 blocks here).
    assert!(
        (get(2, "ratio_vs_none") - 32.0 / 8.25).abs() < 0.01,
        "{}",
        codecs[2]
    );
    assert!(
        (get(3, "ratio_vs_none") - 32.0 / 5.0).abs() < 0.01,
        "{}",
        codecs[3]
    );
    assert!(
        (get(4, "ratio_vs_none") - 32.0 / ((6.0 * 3.5 + 2.0 * 16.0) / 8.0)).abs() < 0.01,
        "{}",
        codecs[4]
    );
    for (i, c) in codecs.iter().enumerate().skip(1) {
        let (ppl, agree) = (get(i, "perplexity"), get(i, "top1_agreement"));
        assert!(ppl.is_finite() && ppl > 1.0, "{c}");
        assert!(agree > 0.5 && agree <= 1.0, "{c}");
        assert!(
            get(i, "mean_kl") > 0.0,
            "a lossy codec changes something: {c}"
        );
        assert_eq!(c["passkey_total"], 1);
    }
    // Eviction moves only the kept tokens: half of the 128-token context, then 32 of it.
    assert_eq!(get(5, "bytes_per_token"), get(3, "bytes_per_token") / 2.0);
    assert_eq!(get(6, "bytes_per_token"), get(3, "bytes_per_token") / 4.0);
    // int8 is close to lossless here: within 1% perplexity and 95% top-1 agreement.
    assert!(get(2, "perplexity_change_pct").abs() < 1.0, "{}", codecs[2]);
    assert!(get(2, "top1_agreement") > 0.95, "{}", codecs[2]);
    let plot = std::fs::read_to_string(&svg).unwrap();
    assert!(plot.starts_with("<svg") && plot.contains("kivi2"));
    let _ = std::fs::remove_file(&svg);
    let o = run(&[
        "eval",
        "kv",
        "--file",
        text.to_str().unwrap(),
        "--codecs",
        "int3",
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("int3"), "{}", stderr(&o));
    let o = run(&[
        "eval",
        "kv",
        "--file",
        text.to_str().unwrap(),
        "--evictions",
        "lru:0.5",
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("lru"), "{}", stderr(&o));
    // `--evictions none` measures the codecs alone.
    let o = run(&[
        "eval",
        "kv",
        "--file",
        text.to_str().unwrap(),
        "--codecs",
        "int8",
        "--evictions",
        "none",
        "--no-passkey",
        "--context",
        "64",
        "--continuation",
        "16",
        "--max-windows",
        "1",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(codec_names(&v), ["none", "int8"]);
}

/// The row names of an `eval kv --json` report, in order.
fn codec_names(v: &Value) -> Vec<&str> {
    v["codecs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["codec"].as_str().unwrap())
        .collect()
}

#[test]
fn bench_reports_every_figure() {
    // Timed figures: not beside another test's process on the same cores.
    let _s = serial();
    let o = run(&[
        "bench",
        "engine",
        "--json",
        "--runs",
        "1",
        "--decode-steps",
        "4",
        "--prefill-tokens",
        "32",
        "--decode-batch",
        "1,2",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert!(v["prefill"][0]["tokens_per_s"].as_f64().unwrap() > 0.0);
    assert_eq!(v["decode"].as_array().unwrap().len(), 2);
    // Each batch size against the first, round by round: the first against itself is exactly 1.
    assert_eq!(v["decode"][0]["vs_first_batch"].as_f64(), Some(1.0));
    let ratio = v["decode"][1]["vs_first_batch"].as_f64().unwrap();
    assert!(ratio > 0.2 && ratio < 10.0, "batch 2 at {ratio}x batch 1");
    assert!(v["decode_bytes_per_token_floor"].as_u64().unwrap() > 50_000_000);
    assert!(v["peak_rss_bytes"].as_u64().unwrap() > 0);
}

/// Each bad input exits non-zero with one line on stderr naming the problem.
#[test]
fn bad_input_gets_a_one_line_error() {
    let dir = std::env::temp_dir().join(format!("tandem-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let corrupt = dir.join("corrupt.gguf");
    std::fs::write(&corrupt, b"GGUF\x03\x00\x00\x00garbage").unwrap();
    let not_gguf = dir.join("notes.gguf");
    std::fs::write(&not_gguf, b"hello world, not a model").unwrap();
    let model = std::env::var("TANDEM_MODEL").unwrap_or_default();
    let _ = model;
    let long_prompt = "word ".repeat(9000);
    let bad_utf8 = dir.join("latin1.txt");
    std::fs::write(&bad_utf8, b"caf\xe9 au lait").unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![
                "generate",
                "--model",
                "/nonexistent/model.gguf",
                "--prompt",
                "hi",
            ],
            "not found",
        ),
        (
            vec![
                "generate",
                "--model",
                corrupt.to_str().unwrap(),
                "--prompt",
                "hi",
            ],
            "truncated",
        ),
        (
            vec![
                "generate",
                "--model",
                not_gguf.to_str().unwrap(),
                "--prompt",
                "hi",
            ],
            "not a GGUF file",
        ),
        (vec!["generate", "--prompt", ""], "empty"),
        (vec!["generate", "--prompt", &long_prompt], "context"),
        (
            vec!["generate", "--prompt", "hi", "--temperature", "-1"],
            "temperature",
        ),
        (
            vec!["generate", "--prompt", "hi", "--top-p", "1.5"],
            "top_p",
        ),
        (
            vec!["generate", "--prompt", "hi", "--max-tokens", "0"],
            "max_tokens",
        ),
        (
            vec!["generate", "--prompt", "hi", "--max-tokens", "100000"],
            "max_tokens",
        ),
        // An output the KV cache cannot hold is refused before the first token, not cut off part-way.
        (
            vec![
                "generate",
                "--prompt",
                "hi",
                "--kv-cache-mib",
                "1",
                "--max-tokens",
                "40",
            ],
            "--kv-cache-mib",
        ),
        // Positive but so small that dividing a logit by it overflows.
        (
            vec!["generate", "--prompt", "hi", "--temperature", "1e-40"],
            "temperature",
        ),
        (
            vec![
                "eval",
                "perplexity",
                "--file",
                bad_utf8.to_str().unwrap(),
                "--context",
                "64",
            ],
            "UTF-8",
        ),
        (
            vec![
                "eval",
                "perplexity",
                "--file",
                "/nonexistent.txt",
                "--context",
                "64",
            ],
            "nonexistent",
        ),
    ];
    for (args, needle) in cases {
        let o = run(&args);
        let err = stderr(&o);
        assert!(!o.status.success(), "{args:?} succeeded");
        assert_eq!(
            err.trim().lines().count(),
            1,
            "{args:?}: more than one line: {err}"
        );
        assert!(
            err.contains(needle),
            "{args:?}: {err:?} does not mention {needle:?}"
        );
        assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    }
}

#[test]
fn the_device_flag_falls_back_or_fails_clearly_without_a_gpu() {
    if tandem_engine::backend::cuda::driver_present() {
        return; // A GPU host: the CUDA paths are covered by `tandem bench gpu`.
    }
    let o = run(&[
        "generate",
        "--device",
        "cuda",
        "--prompt",
        "hi",
        "--max-tokens",
        "2",
    ]);
    let err = stderr(&o);
    assert!(!o.status.success());
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("--device cuda") && err.contains("CUDA driver"),
        "{err}"
    );
    // auto runs on the CPU and says so.
    let o = Command::new(tandem_bin())
        .args([
            "generate",
            "--device",
            "auto",
            "--raw",
            "--prompt",
            "The sky is",
            "--max-tokens",
            "3",
        ])
        .env("TANDEM_LOG", "info")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("using the CPU"), "{}", stderr(&o));
    assert!(!stdout(&o).trim().is_empty());
}

#[test]
fn the_nccl_transfer_bench_says_what_it_needs() {
    // Bad flags are refused before any GPU is looked for.
    let o = run(&["bench", "transfer", "--transport", "nccl", "--gpus", "1,1"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("two different GPUs"), "{}", stderr(&o));
    let o = run(&[
        "bench",
        "transfer",
        "--transport",
        "nccl",
        "--prompt-tokens",
        "100",
    ]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("--prompt-tokens must be a positive multiple of 16"),
        "{}",
        stderr(&o)
    );
    let o = run(&[
        "bench",
        "transfer",
        "--transport",
        "nccl",
        "--kv-format",
        "kivi2",
    ]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("kivi2 cannot cross over NCCL"),
        "{}",
        stderr(&o)
    );
    if tandem_engine::backend::cuda::device_count() >= 2 {
        return; // A two-GPU host runs the bench for real (bench/RESULTS.md).
    }
    let o = run(&["bench", "transfer", "--transport", "nccl"]);
    let err = stderr(&o);
    assert!(!o.status.success());
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("needs two GPUs"), "{err}");
}

#[test]
fn invalid_utf8_prompt_is_rejected() {
    use std::os::unix::ffi::OsStrExt;
    let bad = std::ffi::OsStr::from_bytes(b"caf\xe9");
    let o = Command::new(tandem_bin())
        .args(["generate", "--prompt"])
        .arg(bad)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("not valid UTF-8"), "{}", stderr(&o));
}

#[test]
fn quantized_caches_hold_a_larger_decode_batch_in_the_same_memory() {
    let o = run(&[
        "bench",
        "kv-capacity",
        "--kv-cache-mib",
        "8",
        "--context",
        "64",
        "--decode-steps",
        "3",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    let rows = v["rows"].as_array().unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r["format"].as_str().unwrap()).collect();
    assert_eq!(names, ["f32", "f16", "int8", "fp8", "int4", "kivi2"]);
    let get = |i: usize, k: &str| rows[i][k].as_f64().unwrap();
    // 2 x 30 layers x 3 heads x (64 dims x 4 bytes | 64 x 2 | 64 + a 2-byte scale (int8, fp8) | 32 + two 4-byte
    // (min, scale) pairs) per token.
    assert_eq!(get(0, "bytes_per_token"), 46080.0);
    assert_eq!(get(1, "bytes_per_token"), 23040.0);
    assert_eq!(get(2, "bytes_per_token"), 11880.0);
    assert_eq!(get(3, "bytes_per_token"), 11880.0);
    assert_eq!(get(4, "bytes_per_token"), 7200.0);
    // kivi2: keys 16 bytes of 2-bit codes plus a 16-token block's 64 (min, scale) pairs shared out (16 bytes);
    // values 16 bytes of codes plus two pairs.
    assert_eq!(get(5, "bytes_per_token"), 5040.0);
    for (i, (lo, hi)) in [
        (2, (3.5, 4.1)),
        (3, (3.5, 4.1)),
        (4, (5.8, 6.6)),
        (5, (8.2, 9.6)),
    ] {
        let held = get(i, "tokens_held") / get(0, "tokens_held");
        assert!(
            held > lo && held < hi,
            "{} holds {held:.2}x the tokens of f32",
            names[i]
        );
    }
    assert!(get(2, "sequences") >= 3.0 * get(0, "sequences"), "{}", v);
    assert!(get(3, "sequences") >= 3.0 * get(0, "sequences"), "{}", v);
    assert!(get(4, "sequences") >= 5.0 * get(0, "sequences"), "{}", v);
    assert!(get(5, "sequences") >= 7.0 * get(0, "sequences"), "{}", v);
    for r in rows {
        assert!(r["decode_tokens_per_s"].as_f64().unwrap() > 0.0, "{r}");
    }
}

/// `tandem simulate` on the default 4 + 4 cluster: the cost policy finds the cache the oracle finds, keeps the
/// workers evenly busy, and beats round-robin on time to first token where prompts share prefixes.
#[test]
fn simulate_compares_policies_on_every_workload() {
    // Its decision latency is timed: not beside another test's process on the same cores.
    let _s = serial();
    let o = run(&[
        "simulate",
        "--requests",
        "1500",
        "--policies",
        "round-robin,cost",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert!(v["latency_model"].as_str().unwrap().contains("prefill_s ="));
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 8);
    let row = |w: &str, p: &str| {
        rows.iter()
            .find(|r| r["workload"] == w && r["policy"] == p)
            .unwrap_or_else(|| panic!("no row {w} {p}"))
    };
    let f = |r: &Value, k: &str| r[k].as_f64().unwrap();
    for w in ["shared-prefix", "multi-turn", "rag", "uniform"] {
        let cost = row(w, "cost");
        assert_eq!(cost["requests"], 1500, "{w}: every request completed");
        assert!(f(cost, "hit_vs_oracle") >= 0.95, "{w}: {cost}");
        assert!(f(cost, "imbalance_decode") < 1.25, "{w}: {cost}");
        assert!(f(cost, "decision_p99_us") < 1000.0, "{w}: {cost}");
    }
    for w in ["shared-prefix", "rag"] {
        let speedup = f(row(w, "round-robin"), "ttft_p50_s") / f(row(w, "cost"), "ttft_p50_s");
        assert!(speedup > 2.0, "{w}: cost only {speedup:.2}x round-robin");
    }
    // Bad input names the flag.
    let o = run(&["simulate", "--decode-workers", "0"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--decode-workers"), "{}", stderr(&o));
    let o = run(&["simulate", "--policies", "fastest"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("fastest"), "{}", stderr(&o));
    let o = run(&["simulate", "--w-queue=-1"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--w-queue"), "{}", stderr(&o));
    // A KV pool smaller than the largest request is refused, not reported as a run of zero requests.
    let o = run(&["simulate", "--decode-kv-blocks", "0", "--json"]);
    assert!(!o.status.success(), "{}", stdout(&o));
    assert!(stderr(&o).contains("--decode-kv-blocks"), "{}", stderr(&o));
}
