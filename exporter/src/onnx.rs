//! ONNX protobuf types (the subset Kestrel reads and writes), with read/write helpers.
//!
//! Written by hand with prost's derive macros so no `protoc` is needed at build time. Field numbers
//! follow `onnx/onnx.proto` (IR version 8, opset 17). ONNX uses proto2; prost writes proto3-style
//! (default scalars omitted), which proto2 readers decode to the same defaults.

use std::path::Path;

use prost::Message;

use crate::error::{Error, Result};

/// The generated-style protobuf structs, as `pb::ModelProto` etc.
pub mod pb {
    /// A whole model: graph, opsets and metadata.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ModelProto {
        #[prost(int64, tag = "1")]
        pub ir_version: i64,
        #[prost(message, repeated, tag = "8")]
        pub opset_import: Vec<OperatorSetIdProto>,
        #[prost(string, tag = "2")]
        pub producer_name: String,
        #[prost(string, tag = "3")]
        pub producer_version: String,
        #[prost(string, tag = "4")]
        pub domain: String,
        #[prost(int64, tag = "5")]
        pub model_version: i64,
        #[prost(string, tag = "6")]
        pub doc_string: String,
        #[prost(message, optional, tag = "7")]
        pub graph: Option<GraphProto>,
        #[prost(message, repeated, tag = "14")]
        pub metadata_props: Vec<StringStringEntryProto>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct OperatorSetIdProto {
        #[prost(string, tag = "1")]
        pub domain: String,
        #[prost(int64, tag = "2")]
        pub version: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct StringStringEntryProto {
        #[prost(string, tag = "1")]
        pub key: String,
        #[prost(string, tag = "2")]
        pub value: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct GraphProto {
        #[prost(message, repeated, tag = "1")]
        pub node: Vec<NodeProto>,
        #[prost(string, tag = "2")]
        pub name: String,
        #[prost(message, repeated, tag = "5")]
        pub initializer: Vec<TensorProto>,
        #[prost(string, tag = "10")]
        pub doc_string: String,
        #[prost(message, repeated, tag = "11")]
        pub input: Vec<ValueInfoProto>,
        #[prost(message, repeated, tag = "12")]
        pub output: Vec<ValueInfoProto>,
        #[prost(message, repeated, tag = "13")]
        pub value_info: Vec<ValueInfoProto>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct NodeProto {
        #[prost(string, repeated, tag = "1")]
        pub input: Vec<String>,
        #[prost(string, repeated, tag = "2")]
        pub output: Vec<String>,
        #[prost(string, tag = "3")]
        pub name: String,
        #[prost(string, tag = "4")]
        pub op_type: String,
        #[prost(string, tag = "7")]
        pub domain: String,
        #[prost(message, repeated, tag = "5")]
        pub attribute: Vec<AttributeProto>,
        #[prost(string, tag = "6")]
        pub doc_string: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct AttributeProto {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(string, tag = "13")]
        pub doc_string: String,
        #[prost(enumeration = "AttributeType", tag = "20")]
        pub r#type: i32,
        #[prost(float, tag = "2")]
        pub f: f32,
        #[prost(int64, tag = "3")]
        pub i: i64,
        #[prost(bytes = "vec", tag = "4")]
        pub s: Vec<u8>,
        #[prost(message, optional, tag = "5")]
        pub t: Option<TensorProto>,
        #[prost(float, repeated, packed = "false", tag = "7")]
        pub floats: Vec<f32>,
        #[prost(int64, repeated, packed = "false", tag = "8")]
        pub ints: Vec<i64>,
        #[prost(bytes = "vec", repeated, tag = "9")]
        pub strings: Vec<Vec<u8>>,
    }

    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
    #[repr(i32)]
    pub enum AttributeType {
        Undefined = 0,
        Float = 1,
        Int = 2,
        String = 3,
        Tensor = 4,
        Graph = 5,
        Floats = 6,
        Ints = 7,
        Strings = 8,
        Tensors = 9,
        Graphs = 10,
        SparseTensor = 11,
        SparseTensors = 12,
        TypeProto = 13,
        TypeProtos = 14,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct TensorProto {
        #[prost(int64, repeated, packed = "false", tag = "1")]
        pub dims: Vec<i64>,
        #[prost(int32, tag = "2")]
        pub data_type: i32,
        #[prost(float, repeated, tag = "4")]
        pub float_data: Vec<f32>,
        #[prost(int32, repeated, tag = "5")]
        pub int32_data: Vec<i32>,
        #[prost(int64, repeated, tag = "7")]
        pub int64_data: Vec<i64>,
        #[prost(string, tag = "8")]
        pub name: String,
        #[prost(string, tag = "12")]
        pub doc_string: String,
        #[prost(bytes = "vec", tag = "9")]
        pub raw_data: Vec<u8>,
        #[prost(message, repeated, tag = "13")]
        pub external_data: Vec<StringStringEntryProto>,
        #[prost(int32, tag = "14")]
        pub data_location: i32,
        #[prost(double, repeated, tag = "10")]
        pub double_data: Vec<f64>,
    }

    /// `TensorProto.DataType` values.
    pub mod data_type {
        pub const FLOAT: i32 = 1;
        pub const UINT8: i32 = 2;
        pub const INT8: i32 = 3;
        pub const INT32: i32 = 6;
        pub const INT64: i32 = 7;
        pub const BOOL: i32 = 9;
        pub const FLOAT16: i32 = 10;
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ValueInfoProto {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(message, optional, tag = "2")]
        pub r#type: Option<TypeProto>,
        #[prost(string, tag = "3")]
        pub doc_string: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct TypeProto {
        #[prost(message, optional, tag = "1")]
        pub tensor_type: Option<type_proto::Tensor>,
        #[prost(string, tag = "6")]
        pub denotation: String,
    }

    pub mod type_proto {
        #[derive(Clone, PartialEq, prost::Message)]
        pub struct Tensor {
            #[prost(int32, tag = "1")]
            pub elem_type: i32,
            #[prost(message, optional, tag = "2")]
            pub shape: Option<super::TensorShapeProto>,
        }
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct TensorShapeProto {
        #[prost(message, repeated, tag = "1")]
        pub dim: Vec<tensor_shape_proto::Dimension>,
    }

    pub mod tensor_shape_proto {
        #[derive(Clone, PartialEq, prost::Message)]
        pub struct Dimension {
            #[prost(oneof = "dimension::Value", tags = "1, 2")]
            pub value: Option<dimension::Value>,
            #[prost(string, tag = "3")]
            pub denotation: String,
        }

        pub mod dimension {
            #[derive(Clone, PartialEq, prost::Oneof)]
            pub enum Value {
                #[prost(int64, tag = "1")]
                DimValue(i64),
                #[prost(string, tag = "2")]
                DimParam(String),
            }
        }
    }
}

/// Decode a model from protobuf bytes. `source` names the file in errors.
pub fn decode_model(bytes: &[u8], source: &Path) -> Result<pb::ModelProto> {
    if bytes.is_empty() {
        return Err(Error::NotOnnx {
            path: source.to_path_buf(),
            reason: "the file is empty".into(),
        });
    }
    let model = pb::ModelProto::decode(bytes).map_err(|e| Error::NotOnnx {
        path: source.to_path_buf(),
        reason: format!(
            "protobuf decoding failed ({e}); the file is truncated or not an ONNX model"
        ),
    })?;
    if model.graph.is_none() || model.ir_version == 0 {
        return Err(Error::NotOnnx {
            path: source.to_path_buf(),
            reason: "it has no graph or no IR version".into(),
        });
    }
    Ok(model)
}

/// Read an ONNX model from a file.
pub fn read_model(path: &Path) -> Result<pb::ModelProto> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decode_model(&bytes, path)
}

/// Encode a model to protobuf bytes.
pub fn encode_model(model: &pb::ModelProto) -> Vec<u8> {
    model.encode_to_vec()
}

/// Write an ONNX model atomically: a temporary file in the same folder, then a rename, so a
/// crash never leaves a half-written model under the final name.
pub fn write_model(model: &pb::ModelProto, path: &Path) -> Result<()> {
    write_atomic(path, &encode_model(model))
}

/// Write `bytes` to `path` through a uniquely named temporary file in the same folder and a
/// rename: readers never see a partial file, and concurrent writers of the same path each rename
/// a complete file (the last one wins).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".into());
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(".{name}.{}.{n}.tmp", std::process::id()));
    std::fs::write(&tmp, bytes).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(&tmp, e)
    })?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })
}

/// Convenience accessors on the generated types (extension-trait style, as tract does).
impl pb::AttributeProto {
    /// An INT attribute.
    pub fn int(name: &str, value: i64) -> Self {
        Self {
            name: name.into(),
            r#type: pb::AttributeType::Int as i32,
            i: value,
            ..Default::default()
        }
    }

    /// An INTS attribute.
    pub fn ints(name: &str, values: &[i64]) -> Self {
        Self {
            name: name.into(),
            r#type: pb::AttributeType::Ints as i32,
            ints: values.to_vec(),
            ..Default::default()
        }
    }

    /// A FLOAT attribute.
    pub fn float(name: &str, value: f32) -> Self {
        Self {
            name: name.into(),
            r#type: pb::AttributeType::Float as i32,
            f: value,
            ..Default::default()
        }
    }

    /// A STRING attribute.
    pub fn string(name: &str, value: &str) -> Self {
        Self {
            name: name.into(),
            r#type: pb::AttributeType::String as i32,
            s: value.as_bytes().to_vec(),
            ..Default::default()
        }
    }
}

impl pb::NodeProto {
    /// The attribute called `name`, if present.
    pub fn attr(&self, name: &str) -> Option<&pb::AttributeProto> {
        self.attribute.iter().find(|a| a.name == name)
    }

    /// An INT attribute's value, or `default`.
    pub fn attr_int(&self, name: &str, default: i64) -> i64 {
        self.attr(name).map(|a| a.i).unwrap_or(default)
    }

    /// An INTS attribute's values, or `None`.
    pub fn attr_ints(&self, name: &str) -> Option<&[i64]> {
        self.attr(name).map(|a| a.ints.as_slice())
    }

    /// A STRING attribute's value, or `None`.
    pub fn attr_string(&self, name: &str) -> Option<String> {
        self.attr(name)
            .map(|a| String::from_utf8_lossy(&a.s).into_owned())
    }
}

impl pb::TensorProto {
    /// Number of elements (product of dims; 1 for a scalar).
    pub fn numel(&self) -> usize {
        self.dims.iter().map(|&d| d.max(0) as usize).product()
    }

    /// The values as f32 (FLOAT tensors from raw_data or float_data).
    pub fn to_f32(&self) -> Option<Vec<f32>> {
        if self.data_type != pb::data_type::FLOAT {
            return None;
        }
        if !self.raw_data.is_empty() {
            if self.raw_data.len() != self.numel() * 4 {
                return None;
            }
            return Some(
                self.raw_data
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            );
        }
        (self.float_data.len() == self.numel()).then(|| self.float_data.clone())
    }

    /// The values as i64 (INT64 tensors from raw_data or int64_data).
    pub fn to_i64(&self) -> Option<Vec<i64>> {
        if self.data_type != pb::data_type::INT64 {
            return None;
        }
        if !self.raw_data.is_empty() {
            if self.raw_data.len() != self.numel() * 8 {
                return None;
            }
            return Some(
                self.raw_data
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                    .collect(),
            );
        }
        (self.int64_data.len() == self.numel()).then(|| self.int64_data.clone())
    }

    /// The values as i8 (INT8 tensors from raw_data, or int32_data where ONNX stores small ints).
    pub fn to_i8(&self) -> Option<Vec<i8>> {
        if self.data_type != pb::data_type::INT8 {
            return None;
        }
        if !self.raw_data.is_empty() {
            return (self.raw_data.len() == self.numel())
                .then(|| self.raw_data.iter().map(|&b| b as i8).collect());
        }
        if self.int32_data.len() != self.numel() {
            return None;
        }
        self.int32_data
            .iter()
            .map(|&v| i8::try_from(v).ok())
            .collect()
    }

    /// A FLOAT tensor from values and dims (stored as little-endian raw_data).
    pub fn from_f32(name: &str, dims: &[i64], values: &[f32]) -> Self {
        let mut raw = Vec::with_capacity(values.len() * 4);
        for v in values {
            raw.extend_from_slice(&v.to_le_bytes());
        }
        Self {
            name: name.into(),
            dims: dims.to_vec(),
            data_type: pb::data_type::FLOAT,
            raw_data: raw,
            ..Default::default()
        }
    }

    /// An INT8 tensor from values and dims (quantized weights, zero points).
    pub fn from_i8(name: &str, dims: &[i64], values: &[i8]) -> Self {
        Self {
            name: name.into(),
            dims: dims.to_vec(),
            data_type: pb::data_type::INT8,
            raw_data: values.iter().map(|&v| v as u8).collect(),
            ..Default::default()
        }
    }

    /// An INT64 tensor from values and dims.
    pub fn from_i64(name: &str, dims: &[i64], values: &[i64]) -> Self {
        let mut raw = Vec::with_capacity(values.len() * 8);
        for v in values {
            raw.extend_from_slice(&v.to_le_bytes());
        }
        Self {
            name: name.into(),
            dims: dims.to_vec(),
            data_type: pb::data_type::INT64,
            raw_data: raw,
            ..Default::default()
        }
    }
}

impl pb::ValueInfoProto {
    /// A tensor value description; a negative dim or a `Some(name)` symbolic entry becomes a `dim_param`.
    pub fn tensor(name: &str, elem_type: i32, dims: &[crate::shapes::Dim]) -> Self {
        use pb::tensor_shape_proto::{Dimension, dimension::Value};
        let dim = dims
            .iter()
            .map(|d| Dimension {
                value: Some(match d {
                    crate::shapes::Dim::Fixed(v) => Value::DimValue(*v),
                    crate::shapes::Dim::Symbol(s) => Value::DimParam(s.clone()),
                }),
                denotation: String::new(),
            })
            .collect();
        Self {
            name: name.into(),
            r#type: Some(pb::TypeProto {
                tensor_type: Some(pb::type_proto::Tensor {
                    elem_type,
                    shape: Some(pb::TensorShapeProto { dim }),
                }),
                denotation: String::new(),
            }),
            doc_string: String::new(),
        }
    }

    /// The element type and shape, when recorded.
    pub fn tensor_shape(&self) -> Option<(i32, Vec<crate::shapes::Dim>)> {
        use pb::tensor_shape_proto::dimension::Value;
        let t = self.r#type.as_ref()?.tensor_type.as_ref()?;
        let dims = t
            .shape
            .as_ref()?
            .dim
            .iter()
            .map(|d| match &d.value {
                Some(Value::DimValue(v)) => crate::shapes::Dim::Fixed(*v),
                Some(Value::DimParam(p)) => crate::shapes::Dim::Symbol(p.clone()),
                None => crate::shapes::Dim::Symbol("?".into()),
            })
            .collect();
        Some((t.elem_type, dims))
    }
}

impl pb::ModelProto {
    /// The graph (decode_model guarantees one is present).
    pub fn graph(&self) -> &pb::GraphProto {
        static EMPTY: std::sync::OnceLock<pb::GraphProto> = std::sync::OnceLock::new();
        self.graph
            .as_ref()
            .unwrap_or_else(|| EMPTY.get_or_init(pb::GraphProto::default))
    }

    /// A metadata value by key.
    pub fn metadata(&self, key: &str) -> Option<&str> {
        self.metadata_props
            .iter()
            .find(|p| p.key == key)
            .map(|p| p.value.as_str())
    }

    /// The default-domain opset version.
    pub fn opset(&self) -> Option<i64> {
        self.opset_import
            .iter()
            .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
            .map(|o| o.version)
    }
}
