//! GGUF reader: header, metadata and tensor directory, over a memory map.
//!
//! Reference: the GGUF format as specified in ggml-org/ggml `docs/gguf.md` (versions 2 and 3;
//! little-endian only). Every length and offset read from the file is checked against the file
//! size before it is used, so a truncated or corrupt file gives a [`GgufError`], never a panic or
//! a huge allocation. Tensor data is not copied here: [`GgufFile::tensor_bytes`] borrows it from
//! the map, so a loader can use weights in place.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;

use super::gguf_tokenizer::GgufVocab;
use crate::kernels::WeightType;

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml tensors have at most four dimensions.
const MAX_DIMS: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{path}: cannot open: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a GGUF file (magic {magic:?})")]
    BadMagic { path: PathBuf, magic: [u8; 4] },
    #[error("{path}: unsupported GGUF version {version} (supported: 2, 3)")]
    UnsupportedVersion { path: PathBuf, version: u32 },
    #[error("{path}: truncated or corrupt at byte {offset}: {what}")]
    Corrupt {
        path: PathBuf,
        offset: u64,
        what: String,
    },
    #[error("{path}: tensor {name}: unsupported tensor type {type_id} ({type_name})")]
    UnsupportedTensorType {
        path: PathBuf,
        name: String,
        type_id: u32,
        type_name: &'static str,
    },
    #[error("{path}: metadata key {key}: {problem}")]
    Metadata {
        path: PathBuf,
        key: String,
        problem: String,
    },
}

/// ggml's type number as a type the loader reads: exactly the types our kernels read
/// ([`WeightType`]). `Err` names the types we know but do not load.
fn ggml_type(id: u32) -> Result<WeightType, &'static str> {
    if let Ok(ty) = WeightType::from_ggml_type_id(id) {
        return Ok(ty);
    }
    Err(match id {
        9 => "Q8_1",
        15 => "Q8_K",
        16..=19 | 21 | 22 | 29 => "IQ (importance-matrix) quantization",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        34 | 35 => "TQ (ternary) quantization",
        39 => "MXFP4",
        _ => "unknown",
    })
}

/// Candle's name for a type (for Candle's path); `None` for the types Candle has no kernels
/// for (IQ4_NL, IQ4_XS), which its path reads dequantized.
pub fn candle_dtype(ty: WeightType) -> Option<candle_core::quantized::GgmlDType> {
    use candle_core::quantized::GgmlDType as C;
    Some(match ty {
        WeightType::F32 => C::F32,
        WeightType::F16 => C::F16,
        WeightType::BF16 => C::BF16,
        WeightType::Q4_0 => C::Q4_0,
        WeightType::Q4_1 => C::Q4_1,
        WeightType::Q5_0 => C::Q5_0,
        WeightType::Q5_1 => C::Q5_1,
        WeightType::Q8_0 => C::Q8_0,
        WeightType::Q2K => C::Q2K,
        WeightType::Q3K => C::Q3K,
        WeightType::Q4K => C::Q4K,
        WeightType::Q5K => C::Q5K,
        WeightType::Q6K => C::Q6K,
        WeightType::IQ4NL | WeightType::IQ4XS => return None,
    })
}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<GgufValue>),
}

impl GgufValue {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Self::U8(v) => Some(v.into()),
            Self::U16(v) => Some(v.into()),
            Self::U32(v) => Some(v.into()),
            Self::U64(v) => Some(v),
            Self::I8(v) => u64::try_from(v).ok(),
            Self::I16(v) => u64::try_from(v).ok(),
            Self::I32(v) => u64::try_from(v).ok(),
            Self::I64(v) => u64::try_from(v).ok(),
            Self::Bool(v) => Some(v.into()),
            _ => None,
        }
    }

    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Self::I8(v) => Some(v.into()),
            Self::I16(v) => Some(v.into()),
            Self::I32(v) => Some(v.into()),
            Self::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Self::F32(v) => Some(v.into()),
            Self::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Self::Bool(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            Self::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// Where one tensor's data lies in the file.
#[derive(Debug, Clone)]
pub struct GgufTensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the innermost (contiguous) dimension.
    pub dims: Vec<usize>,
    pub ty: WeightType,
    /// Absolute byte offset in the file.
    pub offset: usize,
    pub n_bytes: usize,
}

impl GgufTensorInfo {
    /// The shape in row-major order (outermost first), as Candle and safetensors write it.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().copied().collect()
    }
}

/// An open GGUF file: metadata and tensor directory parsed, tensor data mapped.
pub struct GgufFile {
    path: PathBuf,
    map: Arc<Mmap>,
    pub version: u32,
    metadata: HashMap<String, GgufValue>,
    tensors: HashMap<String, GgufTensorInfo>,
    tensor_order: Vec<String>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self, GgufError> {
        let file = File::open(path).map_err(|source| GgufError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        // SAFETY: the map is read-only; the file is a model the operator pointed us at and is not
        // expected to change while the worker runs (as with llama.cpp's mmap loading).
        let map = unsafe { Mmap::map(&file) }.map_err(|source| GgufError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path.to_path_buf(), Arc::new(map))
    }

    fn parse(path: PathBuf, map: Arc<Mmap>) -> Result<Self, GgufError> {
        let mut r = Reader {
            data: &map[..],
            pos: 0,
            path: &path,
        };
        let magic: [u8; 4] = r
            .bytes(4, "magic")?
            .try_into()
            .map_err(|_| r.corrupt("magic"))?;
        if &magic != MAGIC {
            return Err(GgufError::BadMagic { path, magic });
        }
        let version = r.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::UnsupportedVersion { path, version });
        }
        let n_tensors = r.u64("tensor count")?;
        let n_kv = r.u64("metadata count")?;
        // Each metadata entry takes at least 12 bytes and each tensor entry at least 24, which
        // bounds the counts by the file size before anything is allocated.
        r.check_count(n_kv, 12, "metadata count")?;
        r.check_count(n_tensors, 24, "tensor count")?;

        let mut metadata = HashMap::new();
        for _ in 0..n_kv {
            let key = r.string("metadata key")?;
            let type_id = r.u32("metadata type")?;
            let value = r.value(type_id, &key, 0)?;
            metadata.insert(key, value);
        }

        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() => a,
                _ => {
                    return Err(GgufError::Metadata {
                        path,
                        key: "general.alignment".into(),
                        problem: format!("{v:?} is not a power of two"),
                    });
                }
            },
        };

        let mut infos = Vec::new();
        for _ in 0..n_tensors {
            let name = r.string("tensor name")?;
            let n_dims = r.u32("tensor dimension count")? as usize;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(r.corrupt(&format!("tensor {name}: {n_dims} dimensions")));
            }
            let mut dims = Vec::with_capacity(n_dims);
            for _ in 0..n_dims {
                let d = r.u64("tensor dimension")?;
                let d = usize::try_from(d)
                    .ok()
                    .filter(|&d| d > 0 && d <= map.len().max(1) * 256)
                    .ok_or_else(|| r.corrupt(&format!("tensor {name}: dimension {d}")))?;
                dims.push(d);
            }
            let type_id = r.u32("tensor type")?;
            let ty = ggml_type(type_id).map_err(|type_name| GgufError::UnsupportedTensorType {
                path: path.clone(),
                name: name.clone(),
                type_id,
                type_name,
            })?;
            let rel_offset = r.u64("tensor offset")?;
            infos.push((name, dims, ty, rel_offset));
        }

        let data_start = r.pos.div_ceil(alignment as usize) * alignment as usize;
        let mut tensors = HashMap::with_capacity(infos.len());
        let mut tensor_order = Vec::with_capacity(infos.len());
        for (name, dims, ty, rel_offset) in infos {
            let corrupt = |what: String| GgufError::Corrupt {
                path: path.clone(),
                offset: rel_offset,
                what: format!("tensor {name}: {what}"),
            };
            if dims[0] % ty.block_size() != 0 {
                return Err(corrupt(format!(
                    "row length {} is not a multiple of the {:?} block size {}",
                    dims[0],
                    ty,
                    ty.block_size()
                )));
            }
            let n_elems = dims
                .iter()
                .try_fold(1usize, |acc, &d| acc.checked_mul(d))
                .ok_or_else(|| corrupt("element count overflows".into()))?;
            let n_bytes = (n_elems / ty.block_size())
                .checked_mul(ty.block_bytes())
                .ok_or_else(|| corrupt("byte size overflows".into()))?;
            if rel_offset % alignment != 0 {
                return Err(corrupt(format!(
                    "data offset {rel_offset} is not aligned to {alignment}"
                )));
            }
            let offset = usize::try_from(rel_offset)
                .ok()
                .and_then(|o| o.checked_add(data_start))
                .ok_or_else(|| corrupt("data offset overflows".into()))?;
            let end = offset
                .checked_add(n_bytes)
                .ok_or_else(|| corrupt("data end overflows".into()))?;
            if end > map.len() {
                return Err(corrupt(format!(
                    "data [{offset}, {end}) lies beyond the end of the file ({} bytes): the file is truncated",
                    map.len()
                )));
            }
            if tensors.contains_key(&name) {
                return Err(corrupt("duplicate tensor name".into()));
            }
            tensor_order.push(name.clone());
            tensors.insert(
                name.clone(),
                GgufTensorInfo {
                    name,
                    dims,
                    ty,
                    offset,
                    n_bytes,
                },
            );
        }

        Ok(Self {
            path,
            map,
            version,
            metadata,
            tensors,
            tensor_order,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn metadata(&self) -> &HashMap<String, GgufValue> {
        &self.metadata
    }

    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    fn meta_error(&self, key: &str, problem: impl Into<String>) -> GgufError {
        GgufError::Metadata {
            path: self.path.clone(),
            key: key.to_string(),
            problem: problem.into(),
        }
    }

    /// The value at `key` read by `read`: `None` when the key is absent, an error saying
    /// `expected` when it holds something else.
    fn typed<'s, T>(
        &'s self,
        key: &str,
        read: impl FnOnce(&'s GgufValue) -> Option<T>,
        expected: &str,
    ) -> Result<Option<T>, GgufError> {
        self.metadata
            .get(key)
            .map(|v| read(v).ok_or_else(|| self.meta_error(key, expected)))
            .transpose()
    }

    /// Every item of the array at `key` read by `read`, as [`Self::typed`].
    fn typed_array<T>(
        &self,
        key: &str,
        read: impl Fn(&GgufValue) -> Option<T>,
        expected: &str,
    ) -> Result<Option<Vec<T>>, GgufError> {
        let Some(items) = self.typed(key, GgufValue::as_array, "expected an array")? else {
            return Ok(None);
        };
        items
            .iter()
            .map(|v| read(v).ok_or_else(|| self.meta_error(key, expected)))
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    pub fn get_str(&self, key: &str) -> Result<Option<&str>, GgufError> {
        self.typed(key, GgufValue::as_str, "expected a string")
    }

    pub fn require_str(&self, key: &str) -> Result<&str, GgufError> {
        self.get_str(key)?
            .ok_or_else(|| self.meta_error(key, "missing"))
    }

    pub fn get_usize(&self, key: &str) -> Result<Option<usize>, GgufError> {
        let read = |v: &GgufValue| v.as_u64().and_then(|v| usize::try_from(v).ok());
        self.typed(key, read, "expected a non-negative integer")
    }

    pub fn require_usize(&self, key: &str) -> Result<usize, GgufError> {
        self.get_usize(key)?
            .ok_or_else(|| self.meta_error(key, "missing"))
    }

    pub fn get_f64(&self, key: &str) -> Result<Option<f64>, GgufError> {
        self.typed(key, GgufValue::as_f64, "expected a number")
    }

    pub fn get_bool(&self, key: &str) -> Result<Option<bool>, GgufError> {
        self.typed(key, GgufValue::as_bool, "expected a boolean")
    }

    pub fn get_string_array(&self, key: &str) -> Result<Option<Vec<String>>, GgufError> {
        let read = |v: &GgufValue| v.as_str().map(str::to_string);
        self.typed_array(key, read, "expected an array of strings")
    }

    pub fn get_i64_array(&self, key: &str) -> Result<Option<Vec<i64>>, GgufError> {
        self.typed_array(key, GgufValue::as_i64, "expected an array of integers")
    }

    pub fn get_f32_array(&self, key: &str) -> Result<Option<Vec<f32>>, GgufError> {
        let read = |v: &GgufValue| v.as_f64().map(|f| f as f32);
        self.typed_array(key, read, "expected an array of numbers")
    }

    pub fn tensor_info(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.tensors.get(name)
    }

    /// Tensor names in file order.
    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.tensor_order.iter().map(String::as_str)
    }

    /// The raw bytes of a tensor, borrowed from the map (bounds were checked when parsing).
    pub fn tensor_bytes(&self, info: &GgufTensorInfo) -> &[u8] {
        &self.map[info.offset..info.offset + info.n_bytes]
    }

    /// The shared map, for loaders that keep tensors in place beyond this struct's life.
    pub fn map(&self) -> &Arc<Mmap> {
        &self.map
    }

    /// The tokenizer metadata (`tokenizer.ggml.*`), copied.
    pub fn vocab(&self) -> Result<GgufVocab, GgufError> {
        self.vocab_with(
            self.get_string_array(TOKENS_KEY)?,
            self.get_string_array(MERGES_KEY)?,
        )
    }

    /// The tokenizer metadata, with its per-token and per-merge arrays moved out of this
    /// file's metadata rather than copied. A loader builds its tokenizer once: left here, those
    /// arrays (hundreds of thousands of strings for a 150k vocabulary, tens of MB of heap)
    /// would stay alive beside the tokenizer for as long as the weights are served.
    pub fn take_vocab(&mut self) -> Result<GgufVocab, GgufError> {
        let tokens = self.take_string_array(TOKENS_KEY)?;
        let merges = self.take_string_array(MERGES_KEY)?;
        let vocab = self.vocab_with(tokens, merges)?;
        for key in [TOKEN_TYPES_KEY, SCORES_KEY] {
            self.metadata.remove(key);
        }
        Ok(vocab)
    }

    /// The strings of the array at `key`, moved out of the metadata.
    fn take_string_array(&mut self, key: &str) -> Result<Option<Vec<String>>, GgufError> {
        let value = self.metadata.remove(key);
        let expected = || self.meta_error(key, "expected an array of strings");
        match value {
            None => Ok(None),
            Some(GgufValue::Array(items)) => items
                .into_iter()
                .map(|item| match item {
                    GgufValue::String(s) => Ok(s),
                    _ => Err(expected()),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            Some(_) => Err(expected()),
        }
    }

    fn vocab_with(
        &self,
        tokens: Option<Vec<String>>,
        merges: Option<Vec<String>>,
    ) -> Result<GgufVocab, GgufError> {
        let model = self.require_str("tokenizer.ggml.model")?.to_string();
        let tokens = tokens.ok_or_else(|| self.meta_error(TOKENS_KEY, "missing"))?;
        let token_types = self
            .get_i64_array(TOKEN_TYPES_KEY)?
            .map(|v| v.into_iter().map(|t| t as i32).collect());
        let id = |key: &str| -> Result<Option<u32>, GgufError> {
            self.get_usize(key)?
                .map(|v| u32::try_from(v).map_err(|_| self.meta_error(key, "token id too large")))
                .transpose()
        };
        Ok(GgufVocab {
            model,
            pre: self.get_str("tokenizer.ggml.pre")?.map(str::to_string),
            tokens,
            token_types,
            scores: self.get_f32_array(SCORES_KEY)?,
            merges,
            bos_token_id: id("tokenizer.ggml.bos_token_id")?,
            eos_token_id: id("tokenizer.ggml.eos_token_id")?,
            unknown_token_id: id("tokenizer.ggml.unknown_token_id")?,
            padding_token_id: id("tokenizer.ggml.padding_token_id")?,
            add_bos_token: self.get_bool("tokenizer.ggml.add_bos_token")?,
            add_eos_token: self.get_bool("tokenizer.ggml.add_eos_token")?,
            add_space_prefix: self.get_bool("tokenizer.ggml.add_space_prefix")?,
        })
    }
}

const TOKENS_KEY: &str = "tokenizer.ggml.tokens";
const TOKEN_TYPES_KEY: &str = "tokenizer.ggml.token_type";
const SCORES_KEY: &str = "tokenizer.ggml.scores";
const MERGES_KEY: &str = "tokenizer.ggml.merges";

/// Reads the tokenizer metadata of a GGUF file.
pub fn read_vocab(path: &Path) -> Result<GgufVocab, GgufError> {
    GgufFile::open(path)?.take_vocab()
}

/// Nested arrays deeper than this are treated as corruption (real files use depth 1).
const MAX_ARRAY_DEPTH: usize = 4;

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Reader<'a> {
    fn corrupt(&self, what: &str) -> GgufError {
        GgufError::Corrupt {
            path: self.path.to_path_buf(),
            offset: self.pos as u64,
            what: what.to_string(),
        }
    }

    fn remaining(&self) -> usize {
        self.data.len() - self.pos
    }

    fn check_count(&self, count: u64, min_item_bytes: u64, what: &str) -> Result<(), GgufError> {
        if count.saturating_mul(min_item_bytes) > self.remaining() as u64 {
            return Err(self.corrupt(&format!(
                "{what} {count} cannot fit in the {} bytes left",
                self.remaining()
            )));
        }
        Ok(())
    }

    fn bytes(&mut self, n: usize, what: &str) -> Result<&'a [u8], GgufError> {
        if n > self.remaining() {
            return Err(self.corrupt(&format!(
                "{what}: need {n} bytes, {} left (truncated file)",
                self.remaining()
            )));
        }
        let out = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], GgufError> {
        let b = self.bytes(N, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(b);
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &str) -> Result<String, GgufError> {
        let len = self.u64(what)?;
        let len = usize::try_from(len)
            .ok()
            .filter(|&l| l <= self.remaining())
            .ok_or_else(|| self.corrupt(&format!("{what}: string length {len}")))?;
        let bytes = self.bytes(len, what)?;
        // Some converters wrote invalid UTF-8 in token strings; keep the file loadable.
        Ok(String::from_utf8_lossy(bytes).into_owned())
    }

    fn value(&mut self, type_id: u32, key: &str, depth: usize) -> Result<GgufValue, GgufError> {
        Ok(match type_id {
            0 => GgufValue::U8(self.array::<1>(key)?[0]),
            1 => GgufValue::I8(i8::from_le_bytes(self.array(key)?)),
            2 => GgufValue::U16(u16::from_le_bytes(self.array(key)?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.array(key)?)),
            4 => GgufValue::U32(self.u32(key)?),
            5 => GgufValue::I32(i32::from_le_bytes(self.array(key)?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.array(key)?)),
            7 => match self.array::<1>(key)?[0] {
                0 => GgufValue::Bool(false),
                1 => GgufValue::Bool(true),
                b => return Err(self.corrupt(&format!("{key}: boolean byte {b}"))),
            },
            8 => GgufValue::String(self.string(key)?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(self.corrupt(&format!("{key}: arrays nested too deeply")));
                }
                let item_type = self.u32(key)?;
                let count = self.u64(key)?;
                let min_bytes = match item_type {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8..=12 => 8,
                    _ => return Err(self.corrupt(&format!("{key}: array item type {item_type}"))),
                };
                self.check_count(count, min_bytes, key)?;
                let mut items = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    items.push(self.value(item_type, key, depth + 1)?);
                }
                GgufValue::Array(items)
            }
            10 => GgufValue::U64(self.u64(key)?),
            11 => GgufValue::I64(i64::from_le_bytes(self.array(key)?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.array(key)?)),
            other => return Err(self.corrupt(&format!("{key}: value type {other}"))),
        })
    }
}
