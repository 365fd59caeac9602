//! What the engine's integration tests share: where the real model is, and opening it.

use std::path::PathBuf;
use tandem_engine::model::ModelSource;
use tandem_engine::tokenizer::Tokenizer;

/// The default model (`scripts/fetch-model.sh`), or `TANDEM_MODEL`.
pub fn model_path() -> PathBuf {
    if let Some(p) = std::env::var_os("TANDEM_MODEL") {
        return p.into();
    }
    tandem_engine::model::default_model_path()
}

/// The model's tensors and tokenizer; fails with the fix when the model is missing.
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
