//! GGUF writer, used by the tests to build tiny models in code.
//!
//! Writes GGUF version 3 with 32-byte tensor alignment, the layout the worker's
//! `model::gguf` reader reads.

use std::io::Write;
use std::path::Path;

use llm_worker_rbee::kernels::WeightType;
use llm_worker_rbee::model::gguf::GgufValue;

const ALIGNMENT: usize = 32;

#[derive(Default)]
pub struct GgufWriter {
    metadata: Vec<(String, GgufValue)>,
    tensors: Vec<PendingTensor>,
}

struct PendingTensor {
    name: String,
    /// Row-major shape (outermost first).
    shape: Vec<usize>,
    ty: WeightType,
    data: Vec<u8>,
}

impl GgufWriter {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn metadata(&mut self, key: &str, value: impl MetaValue) -> &mut Self {
        let value = value.into_value();
        // A key is unique in a GGUF: setting it again replaces its value.
        match self.metadata.iter_mut().find(|(k, _)| k == key) {
            Some((_, v)) => *v = value,
            None => self.metadata.push((key.to_string(), value)),
        }
        self
    }

    /// Adds a tensor; `shape` is row-major (outermost first) and `data` its raw ggml bytes.
    pub fn tensor(
        &mut self,
        name: &str,
        shape: &[usize],
        ty: WeightType,
        data: Vec<u8>,
    ) -> &mut Self {
        self.tensors.push(PendingTensor {
            name: name.to_string(),
            shape: shape.to_vec(),
            ty,
            data,
        });
        self
    }

    /// Adds an F32 tensor from values.
    pub fn tensor_f32(&mut self, name: &str, shape: &[usize], values: &[f32]) -> &mut Self {
        let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.tensor(name, shape, WeightType::F32, data)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(b"GGUF");
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            write_string(&mut out, key);
            out.extend_from_slice(&value_type(value).to_le_bytes());
            write_value(&mut out, value);
        }
        let mut offset = 0usize;
        let mut offsets = Vec::with_capacity(self.tensors.len());
        for t in &self.tensors {
            write_string(&mut out, &t.name);
            out.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
            for d in t.shape.iter().rev() {
                out.extend_from_slice(&(*d as u64).to_le_bytes());
            }
            out.extend_from_slice(&t.ty.ggml_type_id().to_le_bytes());
            out.extend_from_slice(&(offset as u64).to_le_bytes());
            offsets.push(offset);
            offset = (offset + t.data.len()).div_ceil(ALIGNMENT) * ALIGNMENT;
        }
        let data_start = out.len().div_ceil(ALIGNMENT) * ALIGNMENT;
        out.resize(data_start, 0);
        for (t, off) in self.tensors.iter().zip(offsets) {
            out.resize(data_start + off, 0);
            out.extend_from_slice(&t.data);
        }
        out
    }

    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let mut f = std::fs::File::create(path)?;
        f.write_all(&self.to_bytes())?;
        f.sync_all()
    }
}

fn write_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn value_type(v: &GgufValue) -> u32 {
    match v {
        GgufValue::U8(_) => 0,
        GgufValue::I8(_) => 1,
        GgufValue::U16(_) => 2,
        GgufValue::I16(_) => 3,
        GgufValue::U32(_) => 4,
        GgufValue::I32(_) => 5,
        GgufValue::F32(_) => 6,
        GgufValue::Bool(_) => 7,
        GgufValue::String(_) => 8,
        GgufValue::Array(_) => 9,
        GgufValue::U64(_) => 10,
        GgufValue::I64(_) => 11,
        GgufValue::F64(_) => 12,
    }
}

fn write_value(out: &mut Vec<u8>, v: &GgufValue) {
    match v {
        GgufValue::U8(x) => out.push(*x),
        GgufValue::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::Bool(x) => out.push(u8::from(*x)),
        GgufValue::String(s) => write_string(out, s),
        GgufValue::Array(items) => {
            // An empty array's element type cannot be read off its items: string, as in the one
            // empty array the test files carry (`tokenizer.ggml.merges`, which llama.cpp
            // refuses as any other type).
            let item_type = items.first().map(value_type).unwrap_or(8);
            out.extend_from_slice(&item_type.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                write_value(out, item);
            }
        }
        GgufValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
    }
}

/// What [`GgufWriter::metadata`] takes: a [`GgufValue`], or a plain `&str`, `String`, `u32`,
/// `f32` or `bool` as the value of that type.
pub trait MetaValue {
    fn into_value(self) -> GgufValue;
}

impl MetaValue for GgufValue {
    fn into_value(self) -> GgufValue {
        self
    }
}

impl MetaValue for &str {
    fn into_value(self) -> GgufValue {
        GgufValue::String(self.to_string())
    }
}

impl MetaValue for String {
    fn into_value(self) -> GgufValue {
        GgufValue::String(self)
    }
}

impl MetaValue for u32 {
    fn into_value(self) -> GgufValue {
        GgufValue::U32(self)
    }
}

impl MetaValue for f32 {
    fn into_value(self) -> GgufValue {
        GgufValue::F32(self)
    }
}

impl MetaValue for bool {
    fn into_value(self) -> GgufValue {
        GgufValue::Bool(self)
    }
}
