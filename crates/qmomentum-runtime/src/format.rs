//! The model: its layers as stored in the file, validation, and the safetensors reader/writer.
//!
//! The file format is specified in `doc/model-format.md`; this module implements it exactly.
//! [`Model::new`] is the single validation gate: [`Model::from_bytes`] only checks the container
//! (header length, dtypes, shapes, tensor names, metadata fields) and then calls it, so a model
//! built in memory and a model loaded from disk obey the same rules.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use safetensors::tensor::{Metadata, TensorView};
use safetensors::{Dtype, SafeTensors};
use serde_json::{json, Map, Value};

use crate::engine::{self, CompiledLayer};
use crate::error::Error;
use crate::kernels::KernelKind;
use crate::requant::{multiplier_in_range, shift_in_range, SHIFT_MAX, SHIFT_MIN};

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
}

/// What a layer does with its i32 accumulator (`acc` for `dense_i8`, `dot` for `dense_bin`).
#[derive(Clone, Debug, PartialEq)]
pub enum Output {
    /// `y = clamp(requant(acc, m, r) + z_out, lo, qmax)` with `lo = z_out` (ReLU: the file's
    /// `relu_u8`) or `lo = 0` (the file's `u8`).
    U8 {
        /// ReLU fused into the clamp (`relu_u8` in the file).
        relu: bool,
        /// Per-channel multiplier `m`: 0 or in [2^30, 2^31 − 1].
        multiplier: Vec<i32>,
        /// Per-channel shift `r` in [-30, 31].
        shift: Vec<i32>,
        /// `z_out` (with `relu`, also the lower clamp).
        zero_point: u8,
        /// Upper clamp, `zero_point ≤ qmax` (255 for 8-bit grids, 15 for 4-bit, 3 for 2-bit);
        /// the file's optional `output_qmax`.
        qmax: u8,
    },
    /// One bit per channel: `acc ≥ 0` after `dense_i8` (`threshold: None`),
    /// `dot ≥ threshold[j]` after `dense_bin` (`threshold: Some`).
    SignBits {
        /// Per-channel thresholds; present exactly for `dense_bin` layers.
        threshold: Option<Vec<i32>>,
    },
    /// The final dequantization: `logit = scale[j]·acc (+ bias[j] after dense_bin)`.
    Logits {
        /// Per-channel scale, finite.
        scale: Vec<f32>,
        /// Per-channel bias, finite; present exactly for `dense_bin` layers.
        bias: Option<Vec<f32>>,
    },
}

impl Output {
    /// The name used in the file (`relu_u8`, `u8`, `sign_bits`, `logits`).
    pub fn kind_name(&self) -> &'static str {
        match self {
            Output::U8 { relu: true, .. } => "relu_u8",
            Output::U8 { relu: false, .. } => "u8",
            Output::SignBits { .. } => "sign_bits",
            Output::Logits { .. } => "logits",
        }
    }

    /// Whether this output is u8 (what a `dense_i8` layer reads).
    pub fn is_u8(&self) -> bool {
        matches!(self, Output::U8 { .. })
    }
}

/// One layer, as stored in the file.
#[derive(Clone, Debug, PartialEq)]
pub enum Layer {
    /// `acc[j] = Σ_k (x[k] − z_in)·W[j,k] + bias[j]` over u8 inputs.
    DenseI8 {
        /// Input features.
        inputs: usize,
        /// Output channels.
        outputs: usize,
        /// `[outputs, inputs]` row-major, any i8 (narrow-range grids use [-127, 127], full-range
        /// 8-bit grids −128 too; every kernel tier is exact on the whole i8 range).
        weight: Vec<i8>,
        /// `[outputs]`, in units of `s_in·s_w[j]`.
        bias: Vec<i32>,
        /// `z_in`, the zero point of the u8 input.
        input_zero_point: u8,
        /// What to do with `acc`.
        output: Output,
    },
    /// `dot[j] = in − 2·popcount(x XOR W[j])` over bit inputs.
    DenseBin {
        /// Input bits.
        inputs: usize,
        /// Output channels.
        outputs: usize,
        /// `[outputs, ceil(inputs/64)]`; bit b of word w is input `64·w + b`, 1 = +1;
        /// padding bits 0.
        weight: Vec<u64>,
        /// What to do with `dot`.
        output: Output,
    },
}

impl Layer {
    /// The name used in the file (`dense_i8`, `dense_bin`).
    pub fn kind_name(&self) -> &'static str {
        match self {
            Layer::DenseI8 { .. } => "dense_i8",
            Layer::DenseBin { .. } => "dense_bin",
        }
    }

    /// Input features (bits for `dense_bin`).
    pub fn inputs(&self) -> usize {
        match self {
            Layer::DenseI8 { inputs, .. } | Layer::DenseBin { inputs, .. } => *inputs,
        }
    }

    /// Output channels.
    pub fn outputs(&self) -> usize {
        match self {
            Layer::DenseI8 { outputs, .. } | Layer::DenseBin { outputs, .. } => *outputs,
        }
    }

    /// The layer's output step.
    pub fn output(&self) -> &Output {
        match self {
            Layer::DenseI8 { output, .. } | Layer::DenseBin { output, .. } => output,
        }
    }
}

/// A validated integer model with its weights packed for the kernels.
///
/// Build one with [`Model::new`] or [`Model::from_bytes`] / [`Model::load`]; run it with the
/// methods in [`crate::engine`].
#[derive(Clone)]
pub struct Model {
    pub(crate) input: InputSpec,
    pub(crate) layers: Vec<Layer>,
    pub(crate) compiled: Vec<CompiledLayer>,
    pub(crate) kernel: KernelKind,
    /// Identifies the model's shape for [`crate::Workspace`] checks (clones share it).
    pub(crate) id: u64,
    /// Names of the output classes (the file's optional `classes`).
    pub(crate) class_names: Option<Vec<String>>,
}

/// Shapes only: the weights would print hundreds of thousands of numbers.
impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let layers: Vec<String> = self
            .layers
            .iter()
            .map(|l| {
                format!(
                    "{} {}→{} {}",
                    l.kind_name(),
                    l.inputs(),
                    l.outputs(),
                    l.output().kind_name()
                )
            })
            .collect();
        f.debug_struct("Model")
            .field("input", &self.input)
            .field("layers", &layers)
            .field("kernel", &self.kernel)
            .finish()
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

impl Model {
    /// Validates `input` and `layers` against the format's rules and packs the weights.
    ///
    /// Errors name the offending tensor (by its file name, e.g. `layers.1.shift`), channel and
    /// value, or the layer and the sizes that do not chain.
    pub fn new(input: InputSpec, layers: Vec<Layer>) -> Result<Model, Error> {
        validate(&input, &layers)?;
        let compiled = engine::compile(&layers);
        Ok(Model {
            input,
            layers,
            compiled,
            kernel: KernelKind::detect(),
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            class_names: None,
        })
    }

    /// The input mapping.
    pub fn input(&self) -> &InputSpec {
        &self.input
    }

    /// The layers, as stored in the file.
    pub fn layers(&self) -> &[Layer] {
        &self.layers
    }

    /// Number of logits per sample (the last layer's outputs).
    pub fn num_classes(&self) -> usize {
        self.layers.last().map_or(0, Layer::outputs)
    }

    /// The kernel tier [`Model::run`](crate::Model::run) uses (the best this CPU supports).
    pub fn kernel(&self) -> KernelKind {
        self.kernel
    }

    /// Parses and validates a model file held in memory. Never panics, whatever the bytes;
    /// every allocation is bounded by a small multiple of `bytes.len()`.
    pub fn from_bytes(bytes: &[u8]) -> Result<Model, Error> {
        let (input, layers, classes) = parse(bytes)?;
        Ok(Model::new(input, layers)?.with_class_names(classes))
    }

    /// The same model with class names (label order; shown by `predict`). Names that do not
    /// match the number of outputs are dropped.
    pub fn with_class_names(mut self, names: Option<Vec<String>>) -> Model {
        self.class_names = names.filter(|n| n.len() == self.num_classes());
        self
    }

    /// The class names stored in the file, if any.
    pub fn class_names(&self) -> Option<&[String]> {
        self.class_names.as_deref()
    }

    /// Reads and validates a model file; errors name the file.
    pub fn load(path: &Path) -> Result<Model, Error> {
        let bytes = std::fs::read(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Model::from_bytes(&bytes).map_err(|e| Error::InFile {
            path: path.to_path_buf(),
            source: Box::new(e),
        })
    }

    /// Serialises the model to the file format.
    pub fn to_bytes(&self) -> Result<Vec<u8>, Error> {
        serialize(&self.input, &self.layers, self.class_names.as_deref())
    }

    /// Writes the model file with [`crate::io::write_file`]: atomically (a temporary file in
    /// the same folder, synced, then renamed over `path`) when `path` is a regular file or
    /// does not exist, through it when it is a device or FIFO; a failure leaves `path` and its
    /// folder as they were.
    pub fn save(&self, path: &Path) -> Result<(), Error> {
        let bytes = self.to_bytes()?;
        crate::io::write_file(path, &bytes).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------------------------

fn tname(layer: usize, what: &str) -> String {
    format!("layers.{layer}.{what}")
}

fn check_len<T>(name: &str, v: &[T], want: usize, what: &str) -> Result<(), Error> {
    if v.len() == want {
        Ok(())
    } else {
        Err(Error::tensor(
            name,
            format!("has {} values, expected {want} ({what})", v.len()),
        ))
    }
}

/// Checks every rule of the format's Validation section on in-memory data.
fn validate(input: &InputSpec, layers: &[Layer]) -> Result<(), Error> {
    if input.size == 0 {
        return Err(Error::field("input.size", "must be at least 1"));
    }
    if !(input.scale.is_finite() && input.scale > 0.0) {
        return Err(Error::field(
            "input.scale",
            format!("{} is not a finite positive number", input.scale),
        ));
    }
    if layers.is_empty() {
        return Err(Error::field("layers", "the model has no layers"));
    }
    let last = layers.len() - 1;
    for (i, layer) in layers.iter().enumerate() {
        let (prev_out, prev_is_u8, prev_desc) = match i {
            0 => (
                input.size,
                input.binarize_at.is_none(),
                if input.binarize_at.is_some() {
                    "the binarized input".to_string()
                } else {
                    "input.size".to_string()
                },
            ),
            _ => {
                let p = &layers[i - 1];
                (
                    p.outputs(),
                    p.output().is_u8(),
                    format!("layer {}'s {} output", i - 1, p.output().kind_name()),
                )
            }
        };
        let (inputs, outputs) = (layer.inputs(), layer.outputs());
        if inputs == 0 {
            return Err(Error::field(format!("layers[{i}].in"), "must be at least 1"));
        }
        if outputs == 0 {
            return Err(Error::field(format!("layers[{i}].out"), "must be at least 1"));
        }
        if i32::try_from(inputs).is_err() {
            return Err(Error::field(
                format!("layers[{i}].in"),
                format!("{inputs} is too large: the i32 accumulator holds dot products over at most 2147483647 inputs"),
            ));
        }
        if inputs != prev_out {
            return Err(Error::layer(
                i,
                format!("in = {inputs} does not match {prev_desc} size {prev_out}"),
            ));
        }
        match layer {
            Layer::DenseI8 {
                weight, bias, output, ..
            } => {
                if !prev_is_u8 {
                    return Err(Error::layer(i, format!("dense_i8 reads u8 but gets {prev_desc}")));
                }
                let name = tname(i, "weight");
                if Some(weight.len()) != outputs.checked_mul(inputs) {
                    return Err(Error::tensor(
                        &name,
                        format!("has {} values, expected out × in = {outputs} × {inputs}", weight.len()),
                    ));
                }
                check_len(&tname(i, "bias"), bias, outputs, "out")?;
                validate_output(i, output, outputs, false)?;
            }
            Layer::DenseBin { weight, output, .. } => {
                if prev_is_u8 {
                    return Err(Error::layer(
                        i,
                        format!("dense_bin reads sign bits but gets {prev_desc}"),
                    ));
                }
                let name = tname(i, "weight");
                let words = inputs.div_ceil(64);
                if Some(weight.len()) != outputs.checked_mul(words) {
                    return Err(Error::tensor(
                        &name,
                        format!(
                            "has {} values, expected out × ceil(in/64) = {outputs} × {words}",
                            weight.len()
                        ),
                    ));
                }
                if !inputs.is_multiple_of(64) {
                    let pad = !0u64 << (inputs % 64);
                    for j in 0..outputs {
                        let w = weight[j * words + words - 1];
                        if w & pad != 0 {
                            return Err(Error::value(
                                &name,
                                format!("row {j} word {}", words - 1),
                                format!("padding bits set ({:#018x}) beyond input {inputs}", w & pad),
                            ));
                        }
                    }
                }
                validate_output(i, output, outputs, true)?;
            }
        }
        let is_logits = matches!(layer.output(), Output::Logits { .. });
        if is_logits && i != last {
            return Err(Error::layer(i, "only the last layer may output logits"));
        }
        if !is_logits && i == last {
            return Err(Error::layer(
                i,
                format!("the last layer must output logits, not {}", layer.output().kind_name()),
            ));
        }
    }
    Ok(())
}

fn validate_output(i: usize, output: &Output, outputs: usize, binary: bool) -> Result<(), Error> {
    let after = if binary { "dense_bin" } else { "dense_i8" };
    match output {
        Output::U8 {
            multiplier,
            shift,
            zero_point,
            qmax,
            ..
        } => {
            if zero_point > qmax {
                return Err(Error::field(
                    format!("layers[{i}].output_qmax"),
                    format!("{qmax} is below output_zero_point {zero_point}"),
                ));
            }
            let (mname, sname) = (tname(i, "multiplier"), tname(i, "shift"));
            check_len(&mname, multiplier, outputs, "out")?;
            check_len(&sname, shift, outputs, "out")?;
            for (j, &m) in multiplier.iter().enumerate() {
                if !multiplier_in_range(m) {
                    return Err(Error::value(
                        &mname,
                        format!("channel {j}"),
                        format!("multiplier {m} outside {{0}} ∪ [2^30, 2^31 - 1]"),
                    ));
                }
            }
            for (j, &r) in shift.iter().enumerate() {
                if !shift_in_range(r) {
                    return Err(Error::value(
                        &sname,
                        format!("channel {j}"),
                        format!("shift {r} outside [{SHIFT_MIN}, {SHIFT_MAX}]"),
                    ));
                }
            }
        }
        Output::SignBits { threshold } => {
            let name = tname(i, "threshold");
            match (threshold, binary) {
                (Some(t), true) => check_len(&name, t, outputs, "out")?,
                (None, false) => {}
                (None, true) => {
                    return Err(Error::tensor(
                        &name,
                        "missing: sign_bits after dense_bin needs thresholds",
                    ))
                }
                (Some(_), false) => {
                    return Err(Error::tensor(
                        &name,
                        "unexpected: sign_bits after dense_i8 has no thresholds",
                    ))
                }
            }
        }
        Output::Logits { scale, bias } => {
            let name = tname(i, "scale");
            check_len(&name, scale, outputs, "out")?;
            check_finite(&name, scale)?;
            let bname = tname(i, "bias");
            match (bias, binary) {
                (Some(b), true) => {
                    check_len(&bname, b, outputs, "out")?;
                    check_finite(&bname, b)?;
                }
                (None, false) => {}
                (None, true) => {
                    return Err(Error::tensor(
                        &bname,
                        "missing: logits after dense_bin needs a float bias",
                    ))
                }
                (Some(_), false) => {
                    return Err(Error::tensor(
                        &bname,
                        format!("unexpected: logits after {after} take no float bias"),
                    ))
                }
            }
        }
    }
    Ok(())
}

fn check_finite(name: &str, v: &[f32]) -> Result<(), Error> {
    match v.iter().position(|x| !x.is_finite()) {
        Some(j) => Err(Error::value(
            name,
            format!("channel {j}"),
            format!("value {} is not finite", v[j]),
        )),
        None => Ok(()),
    }
}

// ---------------------------------------------------------------------------------------------
// Reading
// ---------------------------------------------------------------------------------------------

/// Reads one JSON object's fields, remembering which were used so leftovers can be rejected.
struct Fields<'a> {
    path: String,
    map: &'a Map<String, Value>,
    used: BTreeSet<&'static str>,
}

impl<'a> Fields<'a> {
    fn new(path: &str, v: &'a Value) -> Result<Self, Error> {
        match v.as_object() {
            Some(map) => Ok(Fields {
                path: path.to_string(),
                map,
                used: BTreeSet::new(),
            }),
            None => Err(Error::field(path, format!("expected an object, got {v}"))),
        }
    }

    fn name(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    fn get(&mut self, key: &'static str) -> Result<&'a Value, Error> {
        self.used.insert(key);
        self.map.get(key).ok_or_else(|| Error::field(self.name(key), "missing"))
    }

    fn str(&mut self, key: &'static str) -> Result<&'a str, Error> {
        let v = self.get(key)?;
        v.as_str()
            .ok_or_else(|| Error::field(self.name(key), format!("expected a string, got {v}")))
    }

    fn uint(&mut self, key: &'static str, max: u64) -> Result<u64, Error> {
        let v = self.get(key)?;
        self.check_uint(key, v, max)
    }

    /// An optional unsigned field: `None` when absent.
    fn opt_uint(&mut self, key: &'static str, max: u64) -> Result<Option<u64>, Error> {
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

    fn size(&mut self, key: &'static str) -> Result<usize, Error> {
        let n = self.uint(key, u64::MAX)?;
        usize::try_from(n).map_err(|_| Error::field(self.name(key), format!("{n} is too large")))
    }

    fn f32(&mut self, key: &'static str) -> Result<f32, Error> {
        let v = self.get(key)?;
        v.as_f64()
            .map(|x| x as f32)
            .ok_or_else(|| Error::field(self.name(key), format!("expected a number, got {v}")))
    }

    /// An optional array of at most `max` strings: `None` when absent.
    fn opt_strings(&mut self, key: &'static str, max: usize) -> Result<Option<Vec<String>>, Error> {
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
    fn done(self) -> Result<(), Error> {
        match self.map.keys().find(|k| !self.used.contains(k.as_str())) {
            Some(k) => Err(Error::field(self.name(k), "unknown field")),
            None => Ok(()),
        }
    }
}

/// The tensors of a file, looked up by name; remembers which were used.
struct Tensors<'a> {
    meta: Metadata,
    data: &'a [u8],
    used: BTreeSet<String>,
}

impl Tensors<'_> {
    /// The raw bytes of tensor `name`, after checking its dtype and shape.
    fn raw(&mut self, name: &str, dtype: Dtype, shape: &[usize]) -> Result<&[u8], Error> {
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

    fn i8s(&mut self, name: &str, shape: &[usize]) -> Result<Vec<i8>, Error> {
        Ok(self.raw(name, Dtype::I8, shape)?.iter().map(|&b| b as i8).collect())
    }

    fn i32s(&mut self, name: &str, shape: &[usize]) -> Result<Vec<i32>, Error> {
        Ok(self
            .raw(name, Dtype::I32, shape)?
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }

    fn f32s(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>, Error> {
        Ok(self
            .raw(name, Dtype::F32, shape)?
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }

    fn u64s(&mut self, name: &str, shape: &[usize]) -> Result<Vec<u64>, Error> {
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

/// Parses the container and metadata into the in-memory form (not yet value-validated).
type Parsed = (InputSpec, Vec<Layer>, Option<Vec<String>>);

fn parse(bytes: &[u8]) -> Result<Parsed, Error> {
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
    let input = InputSpec {
        size: inp.size("size")?,
        scale: inp.f32("scale")?,
        zero_point: inp.uint("zero_point", 255)? as u8,
        binarize_at: inp.opt_uint("binarize_at", 255)?.map(|t| t as u8),
    };
    inp.done()?;
    let classes = top.opt_strings("classes", 1 << 16)?;
    let layer_docs = top.get("layers")?;
    let layer_docs = layer_docs
        .as_array()
        .ok_or_else(|| Error::field("layers", format!("expected an array, got {layer_docs}")))?;
    top.done()?;

    let mut layers = Vec::with_capacity(layer_docs.len().min(1024));
    for (i, ld) in layer_docs.iter().enumerate() {
        layers.push(parse_layer(i, ld, &mut tensors)?);
    }
    let names: Vec<String> = tensors.meta.offset_keys();
    if let Some(extra) = names.iter().find(|n| !tensors.used.contains(*n)) {
        return Err(Error::tensor(extra.as_str(), "unexpected tensor"));
    }
    if let (Some(c), Some(last)) = (&classes, layers.last()) {
        if c.len() != last.outputs() {
            return Err(Error::field(
                "classes",
                format!("{} names for {} outputs", c.len(), last.outputs()),
            ));
        }
    }
    Ok((input, layers, classes))
}

fn parse_layer(i: usize, ld: &Value, t: &mut Tensors<'_>) -> Result<Layer, Error> {
    let mut f = Fields::new(&format!("layers[{i}]"), ld)?;
    let kind = f.str("kind")?;
    let inputs = f.size("in")?;
    let outputs = f.size("out")?;
    let binary = match kind {
        "dense_i8" => false,
        "dense_bin" => true,
        other => {
            return Err(Error::field(
                f.name("kind"),
                format!("{other:?}, expected \"dense_i8\" or \"dense_bin\""),
            ))
        }
    };
    let input_zero_point = if binary {
        0
    } else {
        f.uint("input_zero_point", 255)? as u8
    };
    let out_kind = f.str("output")?;
    let out_shape = [outputs];
    let output = match out_kind {
        "relu_u8" | "u8" => {
            let zero_point = f.uint("output_zero_point", 255)? as u8;
            let qmax = f.opt_uint("output_qmax", 255)?.unwrap_or(255) as u8;
            let multiplier = t.i32s(&tname(i, "multiplier"), &out_shape)?;
            let shift = t.i32s(&tname(i, "shift"), &out_shape)?;
            Output::U8 {
                relu: out_kind == "relu_u8",
                multiplier,
                shift,
                zero_point,
                qmax,
            }
        }
        "sign_bits" => Output::SignBits {
            threshold: if binary {
                Some(t.i32s(&tname(i, "threshold"), &out_shape)?)
            } else {
                None
            },
        },
        "logits" => Output::Logits {
            scale: t.f32s(&tname(i, "scale"), &out_shape)?,
            bias: if binary {
                Some(t.f32s(&tname(i, "bias"), &out_shape)?)
            } else {
                None
            },
        },
        other => {
            return Err(Error::field(
                f.name("output"),
                format!("{other:?}, expected \"relu_u8\", \"u8\", \"sign_bits\" or \"logits\""),
            ))
        }
    };
    f.done()?;
    let layer = if binary {
        Layer::DenseBin {
            inputs,
            outputs,
            weight: t.u64s(&tname(i, "weight"), &[outputs, inputs.div_ceil(64)])?,
            output,
        }
    } else {
        Layer::DenseI8 {
            inputs,
            outputs,
            weight: t.i8s(&tname(i, "weight"), &[outputs, inputs])?,
            bias: t.i32s(&tname(i, "bias"), &out_shape)?,
            input_zero_point,
            output,
        }
    };
    Ok(layer)
}

// ---------------------------------------------------------------------------------------------
// Writing
// ---------------------------------------------------------------------------------------------

/// An f32 as the JSON number that reads back to exactly the same f32: the shortest decimal
/// when that round-trips through f64 (it almost always does), else the exact f64 value.
fn json_f32(x: f32) -> Value {
    let short: f64 = format!("{x}").parse().unwrap_or(f64::from(x));
    json!(if short as f32 == x { short } else { f64::from(x) })
}

fn le_bytes<T: Copy, const N: usize>(v: &[T], f: impl Fn(T) -> [u8; N]) -> Vec<u8> {
    v.iter().flat_map(|&x| f(x)).collect()
}

fn serialize(input: &InputSpec, layers: &[Layer], classes: Option<&[String]>) -> Result<Vec<u8>, Error> {
    let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut docs = Vec::with_capacity(layers.len());
    for (i, layer) in layers.iter().enumerate() {
        let (n, k) = (layer.outputs(), layer.inputs());
        let mut doc = Map::new();
        doc.insert("kind".into(), json!(layer.kind_name()));
        doc.insert("in".into(), json!(k));
        doc.insert("out".into(), json!(n));
        match layer {
            Layer::DenseI8 {
                weight,
                bias,
                input_zero_point,
                ..
            } => {
                doc.insert("input_zero_point".into(), json!(input_zero_point));
                tensors.push((
                    tname(i, "weight"),
                    Dtype::I8,
                    vec![n, k],
                    le_bytes(weight, i8::to_le_bytes),
                ));
                tensors.push((tname(i, "bias"), Dtype::I32, vec![n], le_bytes(bias, i32::to_le_bytes)));
            }
            Layer::DenseBin { weight, .. } => tensors.push((
                tname(i, "weight"),
                Dtype::U64,
                vec![n, k.div_ceil(64)],
                le_bytes(weight, u64::to_le_bytes),
            )),
        }
        let output = layer.output();
        doc.insert("output".into(), json!(output.kind_name()));
        match output {
            Output::U8 {
                multiplier,
                shift,
                zero_point,
                qmax,
                ..
            } => {
                doc.insert("output_zero_point".into(), json!(zero_point));
                // Optional in the file, default 255: written only when it differs.
                if *qmax != 255 {
                    doc.insert("output_qmax".into(), json!(qmax));
                }
                tensors.push((
                    tname(i, "multiplier"),
                    Dtype::I32,
                    vec![n],
                    le_bytes(multiplier, i32::to_le_bytes),
                ));
                tensors.push((
                    tname(i, "shift"),
                    Dtype::I32,
                    vec![n],
                    le_bytes(shift, i32::to_le_bytes),
                ));
            }
            Output::SignBits { threshold } => {
                if let Some(t) = threshold {
                    tensors.push((
                        tname(i, "threshold"),
                        Dtype::I32,
                        vec![n],
                        le_bytes(t, i32::to_le_bytes),
                    ));
                }
            }
            Output::Logits { scale, bias } => {
                tensors.push((
                    tname(i, "scale"),
                    Dtype::F32,
                    vec![n],
                    le_bytes(scale, f32::to_le_bytes),
                ));
                if let Some(b) = bias {
                    tensors.push((tname(i, "bias"), Dtype::F32, vec![n], le_bytes(b, f32::to_le_bytes)));
                }
            }
        }
        docs.push(Value::Object(doc));
    }
    let mut input_doc = json!({
        "size": input.size,
        "scale": json_f32(input.scale),
        "zero_point": input.zero_point,
    });
    if let (Some(t), Some(obj)) = (input.binarize_at, input_doc.as_object_mut()) {
        obj.insert("binarize_at".into(), json!(t));
    }
    let mut doc = json!({
        "format": FORMAT,
        "version": VERSION,
        "input": input_doc,
        "layers": docs,
    });
    if let (Some(c), Some(obj)) = (classes, doc.as_object_mut()) {
        obj.insert("classes".into(), json!(c));
    }
    let metadata = HashMap::from([(METADATA_KEY.to_string(), doc.to_string())]);
    let views = tensors
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
