//! The HF path (config.json + safetensors + tokenizer.json) computes the same model as the GGUF path.
//!
//! The test exports the default GGUF model to an HF directory: every tensor dequantized to f32 under its HF name,
//! Q/K rows permuted back to HF's half-split RoPE layout, the tokenizer saved as tokenizer.json. Loading that
//! directory must give the same tokens and, within f32 rounding, the same logits and greedy continuation.

mod common;

use std::path::Path;
use tandem_engine::backend::cpu::CpuBackend;
use tandem_engine::model::ModelSource;
use tandem_engine::quant::dequant::dequantize_row;
use tandem_engine::sampling::argmax;
use tandem_engine::tokenizer::Tokenizer;
use tandem_engine::{Engine, EngineConfig, LogitsWanted, StepItem};

fn gguf_to_hf_name(name: &str) -> String {
    let fixed = [
        ("token_embd.weight", "model.embed_tokens.weight"),
        ("output_norm.weight", "model.norm.weight"),
        ("output.weight", "lm_head.weight"),
    ];
    if let Some((_, h)) = fixed.iter().find(|(g, _)| *g == name) {
        return h.to_string();
    }
    let rest = name.strip_prefix("blk.").unwrap();
    let (layer, field) = rest.split_once('.').unwrap();
    let hf = match field {
        "attn_norm.weight" => "input_layernorm.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        other => panic!("unexpected tensor {other}"),
    };
    format!("model.layers.{layer}.{hf}")
}

/// GGUF rows of one head are (pair i, element j) -> i * 2 + j; HF's are j * half + i.
fn unpermute(rows: &[f32], heads: usize, cols: usize) -> Vec<f32> {
    let hd = rows.len() / cols / heads;
    let half = hd / 2;
    let mut out = vec![0f32; rows.len()];
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let src = (h * hd + i * 2 + j) * cols;
                let dst = (h * hd + j * half + i) * cols;
                out[dst..dst + cols].copy_from_slice(&rows[src..src + cols]);
            }
        }
    }
    out
}

fn export(src: &ModelSource, tok: &Tokenizer, dir: &Path) {
    let g = src.gguf().unwrap();
    let cfg = src.config().unwrap();
    let mut tensors: Vec<(String, Vec<u8>, Vec<usize>)> = Vec::new();
    for t in &g.tensors {
        let view = src.tensor(&t.name).unwrap().unwrap();
        let mut f = vec![0f32; view.rows * view.cols];
        dequantize_row(view.ty, view.bytes, &mut f);
        if t.name.ends_with("attn_q.weight") {
            f = unpermute(&f, cfg.heads, view.cols);
        } else if t.name.ends_with("attn_k.weight") {
            f = unpermute(&f, cfg.kv_heads, view.cols);
        }
        let shape = if view.rows == 1 {
            vec![view.cols]
        } else {
            vec![view.rows, view.cols]
        };
        tensors.push((
            gguf_to_hf_name(&t.name),
            f.iter().flat_map(|v| v.to_le_bytes()).collect(),
            shape,
        ));
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, b, s)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .unwrap(),
            )
        })
        .collect();
    safetensors::tensor::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": cfg.hidden,
        "intermediate_size": cfg.ffn,
        "num_hidden_layers": cfg.layers,
        "num_attention_heads": cfg.heads,
        "num_key_value_heads": cfg.kv_heads,
        "vocab_size": cfg.vocab,
        "max_position_embeddings": cfg.context_len,
        "rms_norm_eps": cfg.rms_eps,
        "rope_theta": cfg.rope.theta,
        "tie_word_embeddings": true,
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    tok.save_json(&dir.join("tokenizer.json")).unwrap();
    let tc = serde_json::json!({"eos_token": "<|im_end|>", "bos_token": "<|im_start|>", "chat_template": tok.chat_template, "add_bos_token": false});
    std::fs::write(dir.join("tokenizer_config.json"), tc.to_string()).unwrap();
}

#[test]
fn hf_directory_matches_gguf() {
    let (gsrc, gtok) = common::open_model();
    let dir = std::env::temp_dir().join(format!("tandem-hf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    export(&gsrc, &gtok, &dir);

    let hsrc = ModelSource::open(&dir).unwrap();
    let htok = Tokenizer::for_model(&hsrc).unwrap();
    let text =
        "<|im_start|>user\nWhat is 12 + 30? Answer briefly.<|im_end|>\n<|im_start|>assistant\n";
    let ids = gtok.encode(text).unwrap();
    assert_eq!(htok.encode(text).unwrap(), ids);
    assert_eq!(htok.eos, gtok.eos);
    assert!(htok.chat_template().is_ok());

    let config = EngineConfig {
        num_blocks: 64,
        ..Default::default()
    };
    let mut ge = Engine::new(
        CpuBackend::with_all_cores(),
        &gsrc,
        config.clone(),
        |_, _| {},
    )
    .unwrap();
    let mut he = Engine::new(CpuBackend::with_all_cores(), &hsrc, config, |_, _| {}).unwrap();
    assert_eq!(
        ge.model.config.rope.layout,
        tandem_engine::model::RopeLayout::Interleaved
    );
    assert_eq!(
        he.model.config.rope.layout,
        tandem_engine::model::RopeLayout::Halves
    );
    let run = |e: &mut Engine<CpuBackend>| {
        let s = e.add_sequence(&ids).unwrap();
        let first = e
            .step(&[StepItem {
                seq: s,
                n_tokens: ids.len(),
                logits: LogitsWanted::Last,
            }])
            .unwrap()
            .pop()
            .unwrap();
        let mut toks = vec![argmax(&first)];
        for _ in 0..12 {
            e.append_token(s, *toks.last().unwrap()).unwrap();
            let l = e
                .step(&[StepItem {
                    seq: s,
                    n_tokens: 1,
                    logits: LogitsWanted::Last,
                }])
                .unwrap()
                .pop()
                .unwrap();
            toks.push(argmax(&l));
        }
        (first, toks)
    };
    let (gl, gt) = run(&mut ge);
    let (hl, ht) = run(&mut he);
    let diff = gl
        .iter()
        .zip(&hl)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(diff < 0.02, "first-token logits differ by {diff}");
    assert_eq!(gt, ht);
    let _ = std::fs::remove_dir_all(&dir);
}
