//! End-to-end test support: the real model, a local cluster of in-process nodes over real loopback sockets
//! ([`cluster`]), nodes and etcd as separate processes ([`procs`]), and a small HTTP/1.1 client that can read
//! server-sent events and hang up mid-stream ([`http`]). The tests themselves live in `tests/tests/`.

pub mod cluster;
pub mod http;
pub mod procs;

use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};
use tandem_engine::backend::cpu::CpuBackend;
use tandem_engine::generate::{Request, StopConditions, run_batch};
use tandem_engine::kv::KvFormat;
use tandem_engine::model::ModelSource;
use tandem_engine::sampling::SamplingParams;
use tandem_engine::tokenizer::Tokenizer;
use tandem_engine::{Engine, EngineConfig};

/// The default model (`scripts/fetch-model.sh`), or `TANDEM_MODEL`.
pub fn model_path() -> PathBuf {
    if let Some(p) = std::env::var_os("TANDEM_MODEL") {
        return p.into();
    }
    tandem_engine::model::default_model_path()
}

pub fn open_model() -> (ModelSource, Tokenizer) {
    let path = model_path();
    assert!(
        path.exists(),
        "model {} missing: run scripts/fetch-model.sh",
        path.display()
    );
    let src = ModelSource::open(&path).unwrap();
    let tok = Tokenizer::for_model(&src).unwrap();
    (src, tok)
}

/// The release `tandem` binary beside the test executables (`scripts/test.sh` builds it first).
pub fn tandem_bin() -> PathBuf {
    // target/release/deps/<test>-<hash> -> target/release/tandem
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().unwrap().parent().unwrap().join("tandem");
    assert!(
        bin.exists(),
        "{} missing: build it with `cargo build --release -p tandem`",
        bin.display()
    );
    bin
}

/// Engine options for tests: a KV budget in MiB and a prefill chunk size.
#[derive(Debug, Clone, Copy)]
pub struct EngineOptions {
    pub kv_mib: usize,
    pub max_batch_tokens: usize,
    pub format: KvFormat,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            kv_mib: 64,
            max_batch_tokens: 512,
            format: KvFormat::F32,
        }
    }
}

pub fn engine(opts: EngineOptions) -> Engine<CpuBackend> {
    let (src, _) = open_model();
    let cfg = src.config().unwrap();
    let config = EngineConfig {
        kv_format: opts.format,
        max_batch_tokens: opts.max_batch_tokens,
        ..Default::default()
    }
    .with_kv_budget_bytes(&cfg, opts.kv_mib << 20);
    Engine::new(CpuBackend::new(2), &src, config, |_, _| {}).unwrap()
}

/// Prompt ids of one user message under the model's chat template (what `tandem generate` sends).
pub fn chat_prompt(tok: &Tokenizer, user: &str) -> Vec<u32> {
    use tandem_engine::tokenizer::chat::{ChatMessage, Role};
    let text = tok
        .chat_template()
        .unwrap()
        .render(&[ChatMessage::new(Role::User, user)], true)
        .unwrap();
    tok.encode(&text).unwrap()
}

/// Greedy text for `prompt` from a single engine, no servers: the reference every cluster answer must equal.
pub fn reference_greedy(prompts: &[Vec<u32>], max_tokens: usize) -> Vec<String> {
    let (_, tok) = open_model();
    let mut e = engine(EngineOptions::default());
    let reqs: Vec<Request> = prompts
        .iter()
        .map(|p| Request {
            prompt: p.clone(),
            sampling: SamplingParams::default(),
            stop: StopConditions {
                max_tokens,
                ..Default::default()
            },
        })
        .collect();
    run_batch(&mut e, &tok, &reqs, |_| {})
        .unwrap()
        .into_iter()
        .map(|c| c.text)
        .collect()
}

/// Tests that start clusters take this lock: two clusters computing at once on a small machine only make each
/// other slow, and timing-sensitive checks (deadlines) would be at the mercy of the other test.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}
