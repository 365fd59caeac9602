//! The official `openai` Python package (installed by name; see .ci/run) against a running router: chat and
//! completions, streaming and not, must give the engine's own greedy text.

use serde_json::Value;
use std::process::Command;
use tandem_tests::cluster::{Cluster, ClusterSpec, MODEL_ID};
use tandem_tests::{chat_prompt, open_model, reference_greedy, serial};

#[test]
fn the_openai_python_client_gets_the_engines_greedy_text() {
    let _s = serial();
    let (_, tok) = open_model();
    let user = "Give me two tips for staying focused while studying.";
    let raw = "Once upon a time, in a small village by the sea,";
    let want = reference_greedy(&[chat_prompt(&tok, user), tok.encode(raw).unwrap()], 20);
    let c = Cluster::start(ClusterSpec::default());
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("openai/check_openai.py");
    let out = Command::new("python3")
        .arg(script)
        .args([&format!("http://{}/v1", c.http), MODEL_ID, user, raw, "20"])
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "check_openai.py failed (is the `openai` package installed? .ci/run installs it):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(got["chat"], want[0].as_str());
    assert_eq!(got["chat_streamed"], want[0].as_str());
    assert_eq!(got["completion"], want[1].as_str());
    assert_eq!(got["completion_streamed"], want[1].as_str());
}
