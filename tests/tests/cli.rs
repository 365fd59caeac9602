//! The `tandem` binary end to end on the real model: generation matches the reference, evaluation and benchmark
//! print what they promise, and bad input gets a one-line error and a non-zero exit.
//!
//! Run through `scripts/test.sh`, which fetches the model and builds the release binary first.

use serde_json::Value;
use std::path::PathBuf;
use std::process::{Command, Output};
use tandem_tests::tandem_bin;

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
fn bench_reports_every_figure() {
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
