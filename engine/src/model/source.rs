//! Where a model's bytes come from: a GGUF file or an HF directory (`config.json` + `*.safetensors`).
//!
//! Both are memory-mapped; tensors are handed out as [`WeightView`]s that borrow the mapped bytes under the GGUF
//! naming scheme (`blk.N.attn_q.weight`), so the loader and the backends see one vocabulary of names.

use crate::error::{EngineError, Result};
use crate::gguf::{GgufFile, SharedBytes};
use crate::model::config::ModelConfig;
use crate::quant::GgmlType;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// A borrowed tensor: `rows` x `cols` elements of `ty`, row-major (a vector has `rows == 1`).
#[derive(Clone, Copy)]
pub struct WeightView<'a> {
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    pub bytes: &'a [u8],
    /// What `bytes` borrows from, and where in it they start: lets a backend keep a zero-copy view.
    pub shared: &'a SharedBytes,
    pub offset: usize,
}

impl std::fmt::Debug for WeightView<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WeightView({} {}x{})", self.ty, self.rows, self.cols)
    }
}

/// One mapped safetensors file.
pub struct SafetensorsShard {
    map: SharedBytes,
    data_start: usize,
}

/// Where one safetensors tensor lives.
pub struct StEntry {
    shard: usize,
    ty: GgmlType,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// An opened model: its config and its tensors.
pub enum ModelSource {
    Gguf(GgufFile),
    Safetensors {
        dir: PathBuf,
        shards: Vec<SafetensorsShard>,
        tensors: HashMap<String, StEntry>,
        config: serde_json::Value,
    },
    /// Seeded random weights at a named model's shape (benchmarks, device checks).
    Dummy(super::dummy::DummyWeights),
}

impl std::fmt::Debug for ModelSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Gguf(g) => write!(f, "ModelSource::Gguf({g:?})"),
            Self::Safetensors { dir, tensors, .. } => write!(
                f,
                "ModelSource::Safetensors({}, {} tensors)",
                dir.display(),
                tensors.len()
            ),
            Self::Dummy(d) => write!(f, "ModelSource::Dummy({})", d.shape.name()),
        }
    }
}

impl ModelSource {
    /// Opens a `.gguf` file or a directory holding `config.json` and safetensors shards.
    pub fn open(path: &Path) -> Result<Self> {
        let meta = std::fs::metadata(path).map_err(|source| EngineError::ModelIo {
            path: path.to_path_buf(),
            source,
        })?;
        if meta.is_dir() {
            Self::open_safetensors(path)
        } else {
            Ok(Self::Gguf(GgufFile::open(path)?))
        }
    }

    fn open_safetensors(dir: &Path) -> Result<Self> {
        let io = |p: &Path| {
            let p = p.to_path_buf();
            move |source| EngineError::ModelIo { path: p, source }
        };
        let cfg_path = dir.join("config.json");
        let cfg_text = std::fs::read_to_string(&cfg_path).map_err(io(&cfg_path))?;
        let config: serde_json::Value = serde_json::from_str(&cfg_text)
            .map_err(|e| EngineError::malformed(format!("{}: {e}", cfg_path.display())))?;
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(io(dir))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(EngineError::malformed(format!(
                "{} has config.json but no .safetensors files",
                dir.display()
            )));
        }
        let mut shards = Vec::new();
        let mut tensors = HashMap::new();
        for (si, file) in files.iter().enumerate() {
            let fh = std::fs::File::open(file).map_err(io(file))?;
            // SAFETY: see GgufFile::open; the map is read-only and every access is bounds-checked.
            let map = unsafe { memmap2::Mmap::map(&fh) }.map_err(io(file))?;
            let (header_len, st_meta) = safetensors::SafeTensors::read_metadata(&map[..])
                .map_err(|e| EngineError::malformed(format!("{}: {e}", file.display())))?;
            let data_start = 8 + header_len;
            for (name, info) in st_meta.tensors() {
                let ty = match info.dtype {
                    safetensors::Dtype::F32 => GgmlType::F32,
                    safetensors::Dtype::F16 => GgmlType::F16,
                    safetensors::Dtype::BF16 => GgmlType::BF16,
                    other => {
                        return Err(EngineError::UnsupportedModel(format!(
                            "tensor {name}: safetensors dtype {other:?}"
                        )));
                    }
                };
                let (start, end) = info.data_offsets;
                if data_start + end > map.len() || start > end {
                    return Err(EngineError::malformed(format!(
                        "tensor {name} runs past the end of {}",
                        file.display()
                    )));
                }
                let gguf_name = hf_to_gguf_name(&name);
                tensors.insert(
                    gguf_name,
                    StEntry {
                        shard: si,
                        ty,
                        shape: info.shape.clone(),
                        start,
                        end,
                    },
                );
            }
            shards.push(SafetensorsShard {
                map: std::sync::Arc::new(map),
                data_start,
            });
        }
        Ok(Self::Safetensors {
            dir: dir.to_path_buf(),
            shards,
            tensors,
            config,
        })
    }

    pub fn config(&self) -> Result<ModelConfig> {
        match self {
            Self::Gguf(g) => {
                let mut cfg = ModelConfig::from_gguf(g)?;
                if let Some(view) = self.tensor("rope_freqs.weight")? {
                    let mut f = vec![0f32; view.cols];
                    crate::quant::dequant::dequantize_row(view.ty, view.bytes, &mut f);
                    cfg.rope.freq_factors = Some(f);
                }
                Ok(cfg)
            }
            Self::Safetensors { config, .. } => ModelConfig::from_hf_config(config),
            Self::Dummy(d) => Ok(d.config.clone()),
        }
    }

    /// A tensor by its GGUF name, or `None` when absent. Vectors come back with `rows == 1`.
    pub fn tensor(&self, name: &str) -> Result<Option<WeightView<'_>>> {
        match self {
            Self::Dummy(d) => Ok(d.tensors.get(name).map(|t| WeightView {
                ty: t.ty,
                rows: t.rows,
                cols: t.cols,
                bytes: &(*d.backing).as_ref()
                    [t.start..t.start + t.rows * t.cols * t.ty.block_bytes()],
                shared: &d.backing,
                offset: t.start,
            })),
            Self::Gguf(g) => {
                let Some(t) = g.tensor(name) else {
                    return Ok(None);
                };
                let cols = t.dims[0] as usize;
                let rows = (t.elems() / t.dims[0].max(1)) as usize;
                Ok(Some(WeightView {
                    ty: t.ty,
                    rows,
                    cols,
                    bytes: g.tensor_bytes(t),
                    shared: g.shared(),
                    offset: t.start,
                }))
            }
            Self::Safetensors {
                shards, tensors, ..
            } => {
                let Some(e) = tensors.get(name) else {
                    return Ok(None);
                };
                let (rows, cols) = match e.shape.as_slice() {
                    [c] => (1, *c),
                    [r, c] => (*r, *c),
                    other => {
                        return Err(EngineError::BadTensor {
                            name: name.into(),
                            reason: format!("shape {other:?} is not 1-D or 2-D"),
                        });
                    }
                };
                let s = &shards[e.shard];
                let offset = s.data_start + e.start;
                let bytes = &(*s.map).as_ref()[offset..s.data_start + e.end];
                if bytes.len() != rows * cols * e.ty.block_bytes() {
                    return Err(EngineError::BadTensor {
                        name: name.into(),
                        reason: format!("{} bytes for shape {:?}", bytes.len(), e.shape),
                    });
                }
                Ok(Some(WeightView {
                    ty: e.ty,
                    rows,
                    cols,
                    bytes,
                    shared: &s.map,
                    offset,
                }))
            }
        }
    }

    /// A tensor that must exist with the given shape.
    pub fn require(&self, name: &str, rows: usize, cols: usize) -> Result<WeightView<'_>> {
        let v = self.tensor(name)?.ok_or_else(|| EngineError::BadTensor {
            name: name.into(),
            reason: "missing".into(),
        })?;
        if v.rows != rows || v.cols != cols {
            return Err(EngineError::BadTensor {
                name: name.into(),
                reason: format!("shape {}x{}, expected {rows}x{cols}", v.rows, v.cols),
            });
        }
        Ok(v)
    }

    /// The HF directory, when the model came from one (its tokenizer files live there).
    pub fn hf_dir(&self) -> Option<&Path> {
        match self {
            Self::Safetensors { dir, .. } => Some(dir),
            Self::Gguf(_) | Self::Dummy(_) => None,
        }
    }

    pub fn gguf(&self) -> Option<&GgufFile> {
        match self {
            Self::Gguf(g) => Some(g),
            Self::Safetensors { .. } | Self::Dummy(_) => None,
        }
    }

    /// Bytes of all tensors, i.e. what the weights occupy in memory.
    pub fn weight_bytes(&self) -> u64 {
        match self {
            Self::Gguf(g) => g.tensors.iter().map(|t| t.len as u64).sum(),
            Self::Safetensors { tensors, .. } => {
                tensors.values().map(|e| (e.end - e.start) as u64).sum()
            }
            Self::Dummy(d) => d
                .tensors
                .values()
                .map(|t| (t.rows * t.cols * t.ty.block_bytes()) as u64)
                .sum(),
        }
    }
}

/// Maps HF Llama/Qwen2 tensor names to GGUF names; unknown names pass through unchanged.
pub fn hf_to_gguf_name(name: &str) -> String {
    let simple = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
    ];
    if let Some((_, g)) = simple.iter().find(|(h, _)| *h == name) {
        return (*g).to_string();
    }
    let Some(rest) = name.strip_prefix("model.layers.") else {
        return name.to_string();
    };
    let Some((layer, field)) = rest.split_once('.') else {
        return name.to_string();
    };
    let mapped = match field {
        "input_layernorm.weight" => "attn_norm.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "self_attn.q_proj.bias" => "attn_q.bias",
        "self_attn.k_proj.bias" => "attn_k.bias",
        "self_attn.v_proj.bias" => "attn_v.bias",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        _ => return name.to_string(),
    };
    format!("blk.{layer}.{mapped}")
}
