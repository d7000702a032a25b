//! The subset of `onnx.proto` the exporter writes, as hand-written `prost` messages (no `protoc`,
//! no build script).
//!
//! Field numbers and enum values are those of `onnx/onnx.proto` in the ONNX repository
//! (github.com/onnx/onnx, `onnx/onnx.proto`, proto2 syntax; `ModelProto`, `GraphProto`,
//! `NodeProto`, `AttributeProto`, `TensorProto`, `ValueInfoProto`, `TypeProto`,
//! `TensorShapeProto`, `OperatorSetIdProto`, `StringStringEntryProto`). The data types `UINT4` = 21
//! and `INT4` = 22 are from the same file's `TensorProto.DataType` (ONNX 1.16 and later, IR
//! version 10). Fields the exporter never sets are left out: a reader skips nothing it needs.

/// `ModelProto`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ModelProto {
    /// `ir_version = 1`.
    #[prost(int64, optional, tag = "1")]
    pub ir_version: Option<i64>,
    /// `producer_name = 2`.
    #[prost(string, optional, tag = "2")]
    pub producer_name: Option<String>,
    /// `producer_version = 3`.
    #[prost(string, optional, tag = "3")]
    pub producer_version: Option<String>,
    /// `doc_string = 6`.
    #[prost(string, optional, tag = "6")]
    pub doc_string: Option<String>,
    /// `graph = 7`.
    #[prost(message, optional, tag = "7")]
    pub graph: Option<GraphProto>,
    /// `opset_import = 8`.
    #[prost(message, repeated, tag = "8")]
    pub opset_import: Vec<OperatorSetIdProto>,
    /// `metadata_props = 14`.
    #[prost(message, repeated, tag = "14")]
    pub metadata_props: Vec<StringStringEntryProto>,
}

/// `OperatorSetIdProto`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct OperatorSetIdProto {
    /// `domain = 1` ("" = the default ONNX operator set).
    #[prost(string, optional, tag = "1")]
    pub domain: Option<String>,
    /// `version = 2`.
    #[prost(int64, optional, tag = "2")]
    pub version: Option<i64>,
}

/// `StringStringEntryProto`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct StringStringEntryProto {
    /// `key = 1`.
    #[prost(string, optional, tag = "1")]
    pub key: Option<String>,
    /// `value = 2`.
    #[prost(string, optional, tag = "2")]
    pub value: Option<String>,
}

/// `GraphProto`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct GraphProto {
    /// `node = 1` (topologically sorted).
    #[prost(message, repeated, tag = "1")]
    pub node: Vec<NodeProto>,
    /// `name = 2`.
    #[prost(string, optional, tag = "2")]
    pub name: Option<String>,
    /// `initializer = 5`.
    #[prost(message, repeated, tag = "5")]
    pub initializer: Vec<TensorProto>,
    /// `doc_string = 10`.
    #[prost(string, optional, tag = "10")]
    pub doc_string: Option<String>,
    /// `input = 11`.
    #[prost(message, repeated, tag = "11")]
    pub input: Vec<ValueInfoProto>,
    /// `output = 12`.
    #[prost(message, repeated, tag = "12")]
    pub output: Vec<ValueInfoProto>,
}

/// `NodeProto`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct NodeProto {
    /// `input = 1`.
    #[prost(string, repeated, tag = "1")]
    pub input: Vec<String>,
    /// `output = 2`.
    #[prost(string, repeated, tag = "2")]
    pub output: Vec<String>,
    /// `name = 3`.
    #[prost(string, optional, tag = "3")]
    pub name: Option<String>,
    /// `op_type = 4`.
    #[prost(string, optional, tag = "4")]
    pub op_type: Option<String>,
    /// `attribute = 5`.
    #[prost(message, repeated, tag = "5")]
    pub attribute: Vec<AttributeProto>,
    /// `domain = 7`.
    #[prost(string, optional, tag = "7")]
    pub domain: Option<String>,
}

/// `AttributeProto.AttributeType` values used here.
pub mod attribute_type {
    /// `FLOAT = 1`.
    pub const FLOAT: i32 = 1;
    /// `INT = 2`.
    pub const INT: i32 = 2;
    /// `INTS = 7`.
    pub const INTS: i32 = 7;
}

/// `AttributeProto`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AttributeProto {
    /// `name = 1`.
    #[prost(string, optional, tag = "1")]
    pub name: Option<String>,
    /// `f = 2`.
    #[prost(float, optional, tag = "2")]
    pub f: Option<f32>,
    /// `i = 3`.
    #[prost(int64, optional, tag = "3")]
    pub i: Option<i64>,
    /// `ints = 8`.
    #[prost(int64, repeated, packed = "false", tag = "8")]
    pub ints: Vec<i64>,
    /// `type = 20` (the discriminator, [`attribute_type`]).
    #[prost(int32, optional, tag = "20")]
    pub r#type: Option<i32>,
}

/// `TensorProto.DataType` values used here.
pub mod data_type {
    /// `FLOAT = 1`.
    pub const FLOAT: i32 = 1;
    /// `UINT8 = 2`.
    pub const UINT8: i32 = 2;
    /// `INT8 = 3`.
    pub const INT8: i32 = 3;
    /// `INT32 = 6`.
    pub const INT32: i32 = 6;
    /// `INT64 = 7`.
    pub const INT64: i32 = 7;
    /// `BOOL = 9`.
    pub const BOOL: i32 = 9;
    /// `INT4 = 22` (two values per byte, low nibble first).
    pub const INT4: i32 = 22;
}

/// `TensorProto` (data always in `raw_data`: little-endian, row-major).
#[derive(Clone, PartialEq, prost::Message)]
pub struct TensorProto {
    /// `dims = 1`.
    #[prost(int64, repeated, packed = "false", tag = "1")]
    pub dims: Vec<i64>,
    /// `data_type = 2` ([`data_type`]).
    #[prost(int32, optional, tag = "2")]
    pub data_type: Option<i32>,
    /// `name = 8`.
    #[prost(string, optional, tag = "8")]
    pub name: Option<String>,
    /// `raw_data = 9`.
    #[prost(bytes = "vec", optional, tag = "9")]
    pub raw_data: Option<Vec<u8>>,
}

/// `ValueInfoProto`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ValueInfoProto {
    /// `name = 1`.
    #[prost(string, optional, tag = "1")]
    pub name: Option<String>,
    /// `type = 2`.
    #[prost(message, optional, tag = "2")]
    pub r#type: Option<TypeProto>,
}

/// `TypeProto` (only its `tensor_type = 1` member of the `value` oneof).
#[derive(Clone, PartialEq, prost::Message)]
pub struct TypeProto {
    /// `tensor_type = 1`.
    #[prost(message, optional, tag = "1")]
    pub tensor_type: Option<TypeProtoTensor>,
}

/// `TypeProto.Tensor`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TypeProtoTensor {
    /// `elem_type = 1` ([`data_type`]).
    #[prost(int32, optional, tag = "1")]
    pub elem_type: Option<i32>,
    /// `shape = 2`.
    #[prost(message, optional, tag = "2")]
    pub shape: Option<TensorShapeProto>,
}

/// `TensorShapeProto`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TensorShapeProto {
    /// `dim = 1`.
    #[prost(message, repeated, tag = "1")]
    pub dim: Vec<Dimension>,
}

/// `TensorShapeProto.Dimension`: `dim_value = 1` or `dim_param = 2` (a oneof; exactly one set).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Dimension {
    /// `dim_value = 1`.
    #[prost(int64, optional, tag = "1")]
    pub dim_value: Option<i64>,
    /// `dim_param = 2` (a symbolic dimension such as `batch`).
    #[prost(string, optional, tag = "2")]
    pub dim_param: Option<String>,
}
