//! The container: the safetensors file, its tensor table, the metadata document's field
//! helpers, the input spec and the top-level document.
//!
//! The file format is specified in `doc/model-format.md`. This module knows nothing about layer
//! kinds: [`parse`] hands each `layers[i]` object to a reader and [`serialize`] asks a writer for
//! each layer's fields and tensors; the op registry (`crate::ops`) supplies both. It only checks
//! the container (header length, data offsets, dtypes, shapes, names, unknown or unused fields
//! and tensors); the values are validated by [`crate::Model::new`], the single gate for models
//! built in memory and models read from disk alike.

use std::collections::{BTreeSet, HashMap};

use safetensors::tensor::{Metadata, TensorView};
use safetensors::{Dtype, SafeTensors};
use serde_json::{json, Map, Value};

use crate::error::Error;

/// The `format` string of the metadata document.
pub const FORMAT: &str = "qmomentum-int";
/// The `version` this crate reads and writes.
pub const VERSION: u64 = 1;
/// The `__metadata__` key holding the metadata document.
pub const METADATA_KEY: &str = "qmomentum";

/// How a real-valued input maps to the u8 the first layer reads:
/// `q = clamp(round(x / scale) + zero_point, 0, 255)`.
#[derive(Clone, Debug, PartialEq)]
pub struct InputSpec {
    /// Values per sample (the first layer's `in`).
    pub size: usize,
    /// Real value of one input step; finite and positive.
    pub scale: f32,
    /// The u8 that represents real 0.
    pub zero_point: u8,
    /// Binary input: the first layer reads one bit per value, `pixel ≥ binarize_at` (the
    /// file's optional `input.binarize_at`), and must be a `dense_bin` layer.
    pub binarize_at: Option<u8>,
    /// The sample as an image, `[h, w, c]` in NHWC order (channel fastest; the file's optional
    /// `input.shape`), with `h·w·c = size`. Convolution and pooling layers need it when they
    /// read the model input; dense layers read the same bytes as a flat vector.
    pub shape: Option<[usize; 3]>,
}

impl InputSpec {
    /// Checks the input's own fields (how layers chain onto it is the ops' business).
    pub(crate) fn validate(&self) -> Result<(), Error> {
        if self.size == 0 {
            return Err(Error::field("input.size", "must be at least 1"));
        }
        if !(self.scale.is_finite() && self.scale > 0.0) {
            return Err(Error::field(
                "input.scale",
                format!("{} is not a finite positive number", self.scale),
            ));
        }
        if let Some(shape) = self.shape {
            if shape.iter().any(|&d| d == 0 || d > MAX_DIM) {
                return Err(Error::field(
                    "input.shape",
                    format!("{shape:?}: every dimension must be in [1, {MAX_DIM}]"),
                ));
            }
            let values = shape.iter().product::<usize>();
            if values != self.size {
                return Err(Error::field(
                    "input.shape",
                    format!("{shape:?} has {values} values, input.size is {}", self.size),
                ));
            }
        }
        Ok(())
    }

    fn read(f: &mut Fields<'_>) -> Result<InputSpec, Error> {
        Ok(InputSpec {
            size: f.size("size")?,
            scale: f.f32("scale")?,
            zero_point: f.uint("zero_point", 255)? as u8,
            binarize_at: f.opt_uint("binarize_at", 255)?.map(|t| t as u8),
            shape: f.opt_sizes("shape")?,
        })
    }

    fn write(&self) -> Value {
        let mut doc = Map::new();
        doc.insert("size".into(), json!(self.size));
        doc.insert("scale".into(), json_f32(self.scale));
        doc.insert("zero_point".into(), json!(self.zero_point));
        if let Some(t) = self.binarize_at {
            doc.insert("binarize_at".into(), json!(t));
        }
        if let Some(shape) = self.shape {
            doc.insert("shape".into(), json!(shape));
        }
        Value::Object(doc)
    }
}

/// The largest image dimension (height, width, channels, kernel size, stride, dilation,
/// padding) a model may use.
pub const MAX_DIM: usize = 1 << 16;

/// The name of layer `layer`'s tensor `what` in the file: `layers.{layer}.{what}`.
pub(crate) fn tname(layer: usize, what: &str) -> String {
    format!("layers.{layer}.{what}")
}

// ---------------------------------------------------------------------------------------------
// Reading
// ---------------------------------------------------------------------------------------------

/// Reads one JSON object's fields, remembering which were used so leftovers can be rejected.
pub(crate) struct Fields<'a> {
    path: String,
    map: &'a Map<String, Value>,
    used: BTreeSet<&'static str>,
}

impl<'a> Fields<'a> {
    pub(crate) fn new(path: &str, v: &'a Value) -> Result<Self, Error> {
        match v.as_object() {
            Some(map) => Ok(Fields {
                path: path.to_string(),
                map,
                used: BTreeSet::new(),
            }),
            None => Err(Error::field(path, format!("expected an object, got {v}"))),
        }
    }

    pub(crate) fn name(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    pub(crate) fn get(&mut self, key: &'static str) -> Result<&'a Value, Error> {
        self.used.insert(key);
        self.map.get(key).ok_or_else(|| Error::field(self.name(key), "missing"))
    }

    pub(crate) fn str(&mut self, key: &'static str) -> Result<&'a str, Error> {
        let v = self.get(key)?;
        v.as_str()
            .ok_or_else(|| Error::field(self.name(key), format!("expected a string, got {v}")))
    }

    pub(crate) fn uint(&mut self, key: &'static str, max: u64) -> Result<u64, Error> {
        let v = self.get(key)?;
        self.check_uint(key, v, max)
    }

    /// An optional unsigned field: `None` when absent.
    pub(crate) fn opt_uint(&mut self, key: &'static str, max: u64) -> Result<Option<u64>, Error> {
        self.used.insert(key);
        match self.map.get(key) {
            Some(v) => self.check_uint(key, v, max).map(Some),
            None => Ok(None),
        }
    }

    fn check_uint(&self, key: &str, v: &Value, max: u64) -> Result<u64, Error> {
        match v.as_u64() {
            Some(n) if n <= max => Ok(n),
            _ => Err(Error::field(
                self.name(key),
                format!("expected an integer in [0, {max}], got {v}"),
            )),
        }
    }

    pub(crate) fn size(&mut self, key: &'static str) -> Result<usize, Error> {
        let n = self.uint(key, u64::MAX)?;
        usize::try_from(n).map_err(|_| Error::field(self.name(key), format!("{n} is too large")))
    }

    /// An array of exactly `N` unsigned integers (image shapes, kernel sizes, paddings).
    pub(crate) fn sizes<const N: usize>(&mut self, key: &'static str) -> Result<[usize; N], Error> {
        let v = self.get(key)?;
        self.check_sizes(key, v)
    }

    /// An optional [`Fields::sizes`]: `None` when absent.
    pub(crate) fn opt_sizes<const N: usize>(&mut self, key: &'static str) -> Result<Option<[usize; N]>, Error> {
        self.used.insert(key);
        match self.map.get(key) {
            Some(v) => self.check_sizes(key, v).map(Some),
            None => Ok(None),
        }
    }

    fn check_sizes<const N: usize>(&self, key: &str, v: &Value) -> Result<[usize; N], Error> {
        let bad = || {
            Error::field(
                self.name(key),
                format!("expected an array of {N} unsigned integers, got {v}"),
            )
        };
        let arr = v.as_array().filter(|a| a.len() == N).ok_or_else(bad)?;
        let mut out = [0usize; N];
        for (o, x) in out.iter_mut().zip(arr) {
            *o = x.as_u64().and_then(|n| usize::try_from(n).ok()).ok_or_else(bad)?;
        }
        Ok(out)
    }

    pub(crate) fn f32(&mut self, key: &'static str) -> Result<f32, Error> {
        let v = self.get(key)?;
        v.as_f64()
            .map(|x| x as f32)
            .ok_or_else(|| Error::field(self.name(key), format!("expected a number, got {v}")))
    }

    /// An optional array of at most `max` strings: `None` when absent.
    pub(crate) fn opt_strings(&mut self, key: &'static str, max: usize) -> Result<Option<Vec<String>>, Error> {
        self.used.insert(key);
        let Some(v) = self.map.get(key) else { return Ok(None) };
        let bad = || Error::field(self.name(key), format!("expected an array of at most {max} strings"));
        let arr = v.as_array().filter(|a| a.len() <= max).ok_or_else(bad)?;
        arr.iter()
            .map(|s| s.as_str().map(str::to_string).ok_or_else(bad))
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    /// Rejects keys that were never asked for (a typo must not silently become a default).
    pub(crate) fn done(self) -> Result<(), Error> {
        match self.map.keys().find(|k| !self.used.contains(k.as_str())) {
            Some(k) => Err(Error::field(self.name(k), "unknown field")),
            None => Ok(()),
        }
    }
}

/// The tensors of a file, looked up by name; remembers which were used.
pub(crate) struct Tensors<'a> {
    meta: Metadata,
    data: &'a [u8],
    used: BTreeSet<String>,
}

impl Tensors<'_> {
    /// The raw bytes of tensor `name`, after checking its dtype and shape.
    pub(crate) fn raw(&mut self, name: &str, dtype: Dtype, shape: &[usize]) -> Result<&[u8], Error> {
        let info = self.meta.info(name).ok_or_else(|| Error::tensor(name, "missing"))?;
        if info.dtype != dtype {
            return Err(Error::tensor(name, format!("dtype {}, expected {dtype}", info.dtype)));
        }
        if info.shape != shape {
            return Err(Error::tensor(
                name,
                format!("shape {:?}, expected {shape:?}", info.shape),
            ));
        }
        let (s, e) = info.data_offsets;
        self.used.insert(name.to_string());
        // `SafeTensors::read_metadata` checked that the offsets tile the data section exactly.
        self.data
            .get(s..e)
            .ok_or_else(|| Error::tensor(name, "data offsets outside the file"))
    }

    /// The dtype and shape of tensor `name`, if the file has it.
    pub(crate) fn info(&self, name: &str) -> Option<(Dtype, Vec<usize>)> {
        self.meta.info(name).map(|i| (i.dtype, i.shape.clone()))
    }

    pub(crate) fn i8s(&mut self, name: &str, shape: &[usize]) -> Result<Vec<i8>, Error> {
        Ok(self.raw(name, Dtype::I8, shape)?.iter().map(|&b| b as i8).collect())
    }

    pub(crate) fn i32s(&mut self, name: &str, shape: &[usize]) -> Result<Vec<i32>, Error> {
        Ok(self
            .raw(name, Dtype::I32, shape)?
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }

    pub(crate) fn f32s(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>, Error> {
        Ok(self
            .raw(name, Dtype::F32, shape)?
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }

    pub(crate) fn u64s(&mut self, name: &str, shape: &[usize]) -> Result<Vec<u64>, Error> {
        Ok(self
            .raw(name, Dtype::U64, shape)?
            .chunks_exact(8)
            .map(|c| {
                let mut b = [0u8; 8];
                b.copy_from_slice(c);
                u64::from_le_bytes(b)
            })
            .collect())
    }
}

/// Checks the 8-byte header length against the file size, then every tensor's `data_offsets`
/// against the data section, before handing the bytes to `safetensors` (whose own checks add
/// offsets and could overflow on absurd values).
fn precheck(bytes: &[u8]) -> Result<(), Error> {
    let Some(prefix) = bytes.get(..8) else {
        return Err(Error::Container(format!(
            "truncated: {} bytes, shorter than the 8-byte header length",
            bytes.len()
        )));
    };
    let mut len = [0u8; 8];
    len.copy_from_slice(prefix);
    let header_len = u64::from_le_bytes(len);
    let header_end = usize::try_from(header_len)
        .ok()
        .and_then(|n| n.checked_add(8))
        .filter(|&end| end <= bytes.len());
    let Some(header_end) = header_end else {
        return Err(Error::Truncated {
            header_len,
            file_len: bytes.len(),
        });
    };
    let data_len = (bytes.len() - header_end) as u64;
    let header: Value = serde_json::from_slice(&bytes[8..header_end])
        .map_err(|e| Error::Container(format!("header is not valid JSON: {e}")))?;
    let Some(entries) = header.as_object() else {
        return Err(Error::Container("header is not a JSON object".into()));
    };
    for (name, info) in entries {
        if name == "__metadata__" {
            continue;
        }
        let offsets = info
            .get("data_offsets")
            .and_then(Value::as_array)
            .map(|a| a.iter().map(Value::as_u64).collect::<Vec<_>>());
        if let Some([Some(s), Some(e)]) = offsets.as_deref() {
            if s > e || *e > data_len {
                return Err(Error::tensor(
                    name,
                    format!("data_offsets [{s}, {e}] outside the data section of {data_len} bytes"),
                ));
            }
        }
    }
    Ok(())
}

/// A parsed file: the input, the layers as the reader made them, and the class names.
pub(crate) struct Document<L> {
    pub(crate) input: InputSpec,
    pub(crate) layers: Vec<L>,
    pub(crate) classes: Option<Vec<String>>,
}

/// Parses the container and the metadata document. Each `layers[i]` object goes to
/// `read_layer(i, fields, tensors)`, which must call [`Fields::done`] itself (so it decides
/// whether unknown fields are reported before or after its tensors are read). Afterwards every
/// tensor of the file must have been read by some layer.
pub(crate) fn parse<L>(
    bytes: &[u8],
    mut read_layer: impl FnMut(usize, Fields<'_>, &mut Tensors<'_>) -> Result<L, Error>,
) -> Result<Document<L>, Error> {
    precheck(bytes)?;
    let (header_len, meta) = SafeTensors::read_metadata(bytes).map_err(|e| Error::Container(e.to_string()))?;
    let doc_text = meta
        .metadata()
        .as_ref()
        .and_then(|m: &HashMap<String, String>| m.get(METADATA_KEY))
        .ok_or_else(|| Error::field("__metadata__.qmomentum", "missing"))?;
    let doc: Value = serde_json::from_str(doc_text)
        .map_err(|e| Error::field("__metadata__.qmomentum", format!("not valid JSON: {e}")))?;
    let data = bytes.get(8 + header_len..).unwrap_or_default();
    let mut tensors = Tensors {
        meta,
        data,
        used: BTreeSet::new(),
    };

    let mut top = Fields::new("", &doc)?;
    let format = top.str("format")?;
    if format != FORMAT {
        return Err(Error::field("format", format!("{format:?}, expected {FORMAT:?}")));
    }
    let version = top.get("version")?;
    if version.as_u64() != Some(VERSION) {
        return Err(Error::field(
            "version",
            format!("{version}, this reader supports {VERSION}"),
        ));
    }
    let mut inp = Fields::new("input", top.get("input")?)?;
    let input = InputSpec::read(&mut inp)?;
    inp.done()?;
    let classes = top.opt_strings("classes", 1 << 16)?;
    let layer_docs = top.get("layers")?;
    let layer_docs = layer_docs
        .as_array()
        .ok_or_else(|| Error::field("layers", format!("expected an array, got {layer_docs}")))?;
    top.done()?;

    let mut layers = Vec::with_capacity(layer_docs.len().min(1024));
    for (i, ld) in layer_docs.iter().enumerate() {
        let f = Fields::new(&format!("layers[{i}]"), ld)?;
        layers.push(read_layer(i, f, &mut tensors)?);
    }
    let names: Vec<String> = tensors.meta.offset_keys();
    if let Some(extra) = names.iter().find(|n| !tensors.used.contains(*n)) {
        return Err(Error::tensor(extra.as_str(), "unexpected tensor"));
    }
    Ok(Document { input, layers, classes })
}

// ---------------------------------------------------------------------------------------------
// Writing
// ---------------------------------------------------------------------------------------------

/// An f32 as the JSON number that reads back to exactly the same f32: the shortest decimal
/// when that round-trips through f64 (it almost always does), else the exact f64 value.
pub(crate) fn json_f32(x: f32) -> Value {
    let short: f64 = format!("{x}").parse().unwrap_or(f64::from(x));
    json!(if short as f32 == x { short } else { f64::from(x) })
}

/// The tensors of a file being written, in the order they were added.
#[derive(Default)]
pub(crate) struct TensorsOut {
    list: Vec<(String, Dtype, Vec<usize>, Vec<u8>)>,
    /// The narrowest `weight_bits` the int8 layers may be written with (0 or 2: as narrow as
    /// the codes allow; 8: plain I8 tensors, readable by readers that predate `weight_bits`).
    pub(crate) min_weight_bits: u8,
}

fn le_bytes<T: Copy, const N: usize>(v: &[T], f: impl Fn(T) -> [u8; N]) -> Vec<u8> {
    v.iter().flat_map(|&x| f(x)).collect()
}

impl TensorsOut {
    pub(crate) fn i8s(&mut self, name: String, shape: Vec<usize>, v: &[i8]) {
        self.list.push((name, Dtype::I8, shape, le_bytes(v, i8::to_le_bytes)));
    }

    pub(crate) fn u8s(&mut self, name: String, shape: Vec<usize>, v: Vec<u8>) {
        self.list.push((name, Dtype::U8, shape, v));
    }

    pub(crate) fn i32s(&mut self, name: String, shape: Vec<usize>, v: &[i32]) {
        self.list.push((name, Dtype::I32, shape, le_bytes(v, i32::to_le_bytes)));
    }

    pub(crate) fn f32s(&mut self, name: String, shape: Vec<usize>, v: &[f32]) {
        self.list.push((name, Dtype::F32, shape, le_bytes(v, f32::to_le_bytes)));
    }

    pub(crate) fn u64s(&mut self, name: String, shape: Vec<usize>, v: &[u64]) {
        self.list.push((name, Dtype::U64, shape, le_bytes(v, u64::to_le_bytes)));
    }
}

/// Serialises a model: `write_layer(i, layer, doc, tensors)` fills layer `i`'s JSON object and
/// adds its tensors.
pub(crate) fn serialize<L>(
    input: &InputSpec,
    layers: &[L],
    classes: Option<&[String]>,
    min_weight_bits: u8,
    mut write_layer: impl FnMut(usize, &L, &mut Map<String, Value>, &mut TensorsOut),
) -> Result<Vec<u8>, Error> {
    let mut tensors = TensorsOut {
        min_weight_bits,
        ..TensorsOut::default()
    };
    let mut docs = Vec::with_capacity(layers.len());
    for (i, layer) in layers.iter().enumerate() {
        let mut doc = Map::new();
        write_layer(i, layer, &mut doc, &mut tensors);
        docs.push(Value::Object(doc));
    }
    let mut doc = json!({
        "format": FORMAT,
        "version": VERSION,
        "input": input.write(),
        "layers": docs,
    });
    if let (Some(c), Some(obj)) = (classes, doc.as_object_mut()) {
        obj.insert("classes".into(), json!(c));
    }
    let metadata = HashMap::from([(METADATA_KEY.to_string(), doc.to_string())]);
    let views = tensors
        .list
        .iter()
        .map(|(name, dtype, shape, data)| {
            TensorView::new(*dtype, shape.clone(), data)
                .map(|v| (name.clone(), v))
                .map_err(|e| Error::tensor(name.as_str(), e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    safetensors::serialize(views, Some(metadata)).map_err(|e| Error::Container(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_f32_round_trips() {
        for x in [0.003921569f32, 1.0 / 255.0, 1e-30, 3.4e38, 0.1, 7.0, f32::MIN_POSITIVE] {
            let v = json_f32(x);
            let back: Value = serde_json::from_str(&v.to_string()).unwrap();
            assert_eq!(back.as_f64().unwrap() as f32, x, "{v}");
        }
        assert_eq!(json_f32(0.003921569).to_string(), "0.003921569");
    }

    #[test]
    fn precheck_rejects_short_and_truncated() {
        assert!(precheck(&[1, 2, 3]).unwrap_err().to_string().contains("truncated"));
        let mut b = 123456u64.to_le_bytes().to_vec();
        b.resize(1000, b' ');
        assert_eq!(
            precheck(&b).unwrap_err().to_string(),
            "truncated: header says 123456 bytes, file has 1000"
        );
        let b = u64::MAX.to_le_bytes();
        assert!(precheck(&b).unwrap_err().to_string().contains("truncated"));
    }
}
