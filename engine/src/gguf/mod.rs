//! The GGUF model file format (versions 2 and 3), memory-mapped and bounds-checked.
//!
//! Layout (GGUF spec, ggml `docs/gguf.md`): magic `GGUF`, version, tensor count, metadata count, the metadata
//! key/value pairs, the tensor descriptors (name, dims with the fastest-varying first, type, offset), then padding to
//! `general.alignment` (default 32) and the tensor data. Every count is checked against the bytes left before anything
//! is allocated, and every tensor's byte range is checked against the file, so a truncated or lying file gives an
//! error naming what is wrong instead of a crash or a huge allocation. Tensor data is never copied: views borrow
//! from the map.

mod value;

pub use value::MetaValue;

use crate::error::{EngineError, Result};
use crate::quant::GgmlType;
use std::collections::BTreeMap;
use std::path::Path;
use value::Cursor;

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
const MAX_DIMS: u32 = 4;

/// Where one tensor lives in the file.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions, fastest-varying first (ggml's `ne`): a matrix of `rows` x `cols` is `[cols, rows]`.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Absolute byte range in the file.
    pub start: usize,
    pub len: usize,
}

impl TensorInfo {
    pub fn elems(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// Bytes that back a model, shared so that backends can keep zero-copy views of tensors alive: a memory map, or
/// an owned buffer (tests, synthesized files).
pub type SharedBytes = std::sync::Arc<dyn Backing>;

/// What [`SharedBytes`] holds.
pub trait Backing: AsRef<[u8]> + Send + Sync {
    /// Says that `range` will not be read again soon (a backend copied it into its own layout or memory), so that
    /// its resident pages can go: a memory map drops them from this process (a later read faults them back in from
    /// the file), an owned buffer keeps them.
    fn release(&self, _range: std::ops::Range<usize>) {}
}

impl Backing for Vec<u8> {}

impl Backing for memmap2::Mmap {
    fn release(&self, range: std::ops::Range<usize>) {
        // SAFETY: model maps are private, read-only file mappings, never written through, so dropping their pages
        // discards nothing: the next read of the range faults the same bytes back in from the file. Out-of-range
        // arguments are refused by memmap2 (an error, ignored: releasing is advice).
        let _ = unsafe {
            self.unchecked_advise_range(
                memmap2::UncheckedAdvice::DontNeed,
                range.start,
                range.len(),
            )
        };
    }
}

/// An opened GGUF file: metadata, tensor table, and the mapped bytes the tensor views borrow from.
pub struct GgufFile {
    backing: SharedBytes,
    pub version: u32,
    pub metadata: BTreeMap<String, MetaValue>,
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("version", &self.version)
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Maps and parses `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let io = |source| EngineError::ModelIo {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY (not an unsafe block of ours, but the contract of `Mmap::map`): the file must not be truncated
        // while mapped. Model files are read-only inputs; every access is bounds-checked against the length seen
        // at parse time.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        Self::parse(std::sync::Arc::new(map))
    }

    /// Parses an in-memory file.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self> {
        Self::parse(std::sync::Arc::new(bytes))
    }

    pub fn bytes(&self) -> &[u8] {
        (*self.backing).as_ref()
    }

    /// The shared backing, for views that outlive a borrow of this file.
    pub fn shared(&self) -> &SharedBytes {
        &self.backing
    }

    fn parse(backing: SharedBytes) -> Result<Self> {
        let bytes = (*backing).as_ref();
        let mut c = Cursor::new(bytes);
        let magic = c.take(4, "magic")?;
        if magic != MAGIC {
            return Err(EngineError::malformed(format!(
                "not a GGUF file (magic {magic:02x?}, expected \"GGUF\")"
            )));
        }
        let version = c.u32("version")?;
        if version != 2 && version != 3 {
            let hint = if version.swap_bytes() == 2 || version.swap_bytes() == 3 {
                " (big-endian files are not supported)"
            } else {
                ""
            };
            return Err(EngineError::UnsupportedModel(format!(
                "GGUF version {version}{hint}; supported: 2, 3"
            )));
        }
        // A tensor descriptor takes at least 8 (name len) + 4 (n_dims) + 4 (type) + 8 (offset) bytes.
        let tensor_count = c.count("tensor count", 24)?;
        // A metadata pair takes at least 8 (key len) + 4 (type) + 1 byte.
        let kv_count = c.count("metadata count", 13)?;

        let mut metadata = BTreeMap::new();
        for _ in 0..kv_count {
            let key = c.string("metadata key")?;
            let type_id = c.u32("metadata value type")?;
            let value = c.value(type_id, &key)?;
            if metadata.insert(key.clone(), value).is_some() {
                return Err(EngineError::malformed(format!(
                    "metadata key {key:?} appears twice"
                )));
            }
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 20 => a,
                _ => {
                    return Err(EngineError::malformed(format!(
                        "general.alignment {v:?} is not a power of two"
                    )));
                }
            },
        };

        struct Raw {
            name: String,
            dims: Vec<u64>,
            ty: GgmlType,
            offset: u64,
        }
        let mut raws = Vec::with_capacity(tensor_count);
        for i in 0..tensor_count {
            let name = c.string("tensor name")?;
            let n_dims = c.u32("tensor dims")?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(EngineError::malformed(format!(
                    "tensor {name:?} has {n_dims} dims (1..={MAX_DIMS} allowed)"
                )));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(c.u64("tensor dim")?);
            }
            let ty = GgmlType::from_id(c.u32("tensor type")?).map_err(|e| {
                EngineError::UnsupportedModel(format!("tensor {name:?} (#{i}): {e}"))
            })?;
            let offset = c.u64("tensor offset")?;
            raws.push(Raw {
                name,
                dims,
                ty,
                offset,
            });
        }
        let data_start = (c.pos() as u64).div_ceil(alignment) * alignment;
        let file_len = bytes.len() as u64;
        let mut tensors = Vec::with_capacity(raws.len());
        let mut seen = std::collections::HashSet::new();
        for r in raws {
            if !seen.insert(r.name.clone()) {
                return Err(EngineError::malformed(format!(
                    "tensor {:?} appears twice",
                    r.name
                )));
            }
            let elems = r.dims.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
            let row = r.dims[0];
            let len = elems.and_then(|e| {
                let be = r.ty.block_elems() as u64;
                if row % be == 0 {
                    (e / be).checked_mul(r.ty.block_bytes() as u64)
                } else {
                    None
                }
            });
            let Some(len) = len else {
                return Err(EngineError::malformed(format!(
                    "tensor {:?}: dims {:?} overflow or rows not a multiple of the {} block size",
                    r.name, r.dims, r.ty
                )));
            };
            if r.offset % alignment != 0 {
                return Err(EngineError::malformed(format!(
                    "tensor {:?} offset {} is not aligned to {alignment}",
                    r.name, r.offset
                )));
            }
            let start = data_start.checked_add(r.offset);
            let end = start.and_then(|s| s.checked_add(len));
            match (start, end) {
                (Some(s), Some(e)) if e <= file_len => tensors.push(TensorInfo {
                    name: r.name,
                    dims: r.dims,
                    ty: r.ty,
                    start: s as usize,
                    len: len as usize,
                }),
                _ => {
                    return Err(EngineError::malformed(format!(
                        "tensor {:?} ({} bytes at offset {}) runs past the end of the file ({file_len} bytes): truncated?",
                        r.name, len, r.offset
                    )));
                }
            }
        }
        Ok(Self {
            backing,
            version,
            metadata,
            tensors,
            alignment,
        })
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The bytes of a tensor (validated at parse time to lie inside the file).
    pub fn tensor_bytes(&self, t: &TensorInfo) -> &[u8] {
        &self.bytes()[t.start..t.start + t.len]
    }

    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }

    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(MetaValue::as_str)
    }

    pub fn get_u64(&self, key: &str) -> Option<u64> {
        self.get(key).and_then(MetaValue::as_u64)
    }

    pub fn get_f64(&self, key: &str) -> Option<f64> {
        self.get(key).and_then(MetaValue::as_f64)
    }

    /// A string array (e.g. the vocabulary), or an error naming the key.
    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>> {
        let arr = self.get(key).and_then(MetaValue::as_array).ok_or_else(|| {
            EngineError::malformed(format!("metadata {key} is missing or not an array"))
        })?;
        arr.iter()
            .map(|v| {
                v.as_str().ok_or_else(|| {
                    EngineError::malformed(format!("metadata {key} holds a non-string"))
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests;
