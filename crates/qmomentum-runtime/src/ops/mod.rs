//! The operators: one file per layer kind, each the one place for everything about it.
//!
//! An op implements [`Op`]: `read` (its JSON object and tensors → a [`Layer`]), `write` (the
//! reverse), `validate` (what it reads → what it produces, with named errors), and `compile`
//! (pack the weights for the kernel tiers → a [`Compiled`] op that `run`s on a block of rows).
//! The output step shared by the accumulating ops (requantize, sign bits, logits) is
//! [`output`].
//!
//! Adding an op: a new file here implementing [`Op`], its [`Layer`] variant, and one line in
//! each of [`REGISTRY`] (kind name → op, for reading) and [`Layer::op`] (variant → op).

mod avgpool_u8;
mod conv2d_bin;
mod conv2d_i8;
mod dense_bin;
mod dense_i8;
mod global_avgpool_u8;
mod maxpool_bin;
mod maxpool_u8;
pub(crate) mod output;
mod spatial;

use std::sync::Arc;

use serde_json::{Map, Value};

use crate::aligned::Aligned;
use crate::error::Error;
use crate::format::{Fields, Tensors, TensorsOut};
use crate::kernels::KernelKind;

pub use spatial::{MAC_FACTOR, VALUE_FACTOR};

pub use output::Output;

/// Rows per dense-kernel call: the i32 accumulator tile (`ACC_ROWS × outputs`) stays in L1.
pub const ACC_ROWS: usize = 32;

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
    /// A 2-D convolution over an NHWC u8 input, int8 weights:
    /// `acc[oy,ox,o] = bias[o] + Σ_{ky,kx,ci} (x[iy,ix,g·cg+ci] − z_in)·W[o,ky,kx,ci]` with
    /// `iy = oy·sh − top + ky·dh`, `ix = ox·sw − left + kx·dw`, `g = o / (out/groups)`,
    /// `cg = c/groups`. Taps in the padding read `z_in` (so they contribute 0). The output is
    /// `[oh, ow, out]` NHWC, `oh = (h + top + bottom − dh·(kh−1) − 1)/sh + 1` (floor), the
    /// same for `ow`; as logits (last layer only) it is those `oh·ow·out` values.
    Conv2dI8 {
        /// `[h, w, c]` of the input.
        in_shape: [usize; 3],
        /// Output channels (the file's `out`).
        out_channels: usize,
        /// `[kh, kw]`.
        kernel: [usize; 2],
        /// `[sh, sw]`.
        stride: [usize; 2],
        /// `[top, left, bottom, right]`, each below the kernel extent `d·(k−1)+1`.
        padding: [usize; 4],
        /// `[dh, dw]`.
        dilation: [usize; 2],
        /// Channel groups, dividing `c` and `out` (1: dense over channels; `c`: depthwise).
        groups: usize,
        /// `[out, kh, kw, c/groups]` row-major, any i8.
        weight: Vec<i8>,
        /// `[out]`, in units of `s_in·s_w[o]`.
        bias: Vec<i32>,
        /// `z_in`, the zero point of the u8 input (and the value of the padding).
        input_zero_point: u8,
        /// What to do with `acc`: `relu_u8`/`u8` per channel, or `logits` (last layer).
        output: Output,
    },
    /// A binary convolution over a bit image (`kernels::bitimage`), ±1 weights:
    /// `dot[oy,ox,o] = Σ_{ky,kx,ci} x[iy,ix,ci]·W[o,ky,kx,ci]` over ±1 values, taps in the
    /// padding reading +1; the output bit image is `dot ≥ threshold[o]` (`sign_bits` only).
    Conv2dBin {
        /// `[h, w, c]` of the input.
        in_shape: [usize; 3],
        /// Output channels (the file's `out`).
        out_channels: usize,
        /// `[kh, kw]`.
        kernel: [usize; 2],
        /// `[sh, sw]`.
        stride: [usize; 2],
        /// `[top, left, bottom, right]`, each below the kernel extent `d·(k−1)+1`.
        padding: [usize; 4],
        /// `[dh, dw]`.
        dilation: [usize; 2],
        /// `[out, kh, kw, ⌈c/64⌉]`: each tap's channels in whole words, 1 = +1, bits past `c` 0.
        weight: Vec<u64>,
        /// `sign_bits` with per-channel thresholds.
        output: Output,
    },
    /// Max pooling of a bit image (the OR of the window's pixels; padding ignored).
    MaxPoolBin {
        /// `[h, w, c]` of the input.
        in_shape: [usize; 3],
        /// `[kh, kw]`.
        kernel: [usize; 2],
        /// `[sh, sw]`.
        stride: [usize; 2],
        /// `[top, left, bottom, right]`, each below the kernel size.
        padding: [usize; 4],
    },
    /// Max pooling, u8 → u8 on the same grid (max commutes with a monotone quantizer):
    /// `y[oy,ox,c] = max x[iy,ix,c]` over the window's taps inside the input (padding is
    /// ignored, like PyTorch's −∞ padding).
    MaxPoolU8 {
        /// `[h, w, c]` of the input.
        in_shape: [usize; 3],
        /// `[kh, kw]`.
        kernel: [usize; 2],
        /// `[sh, sw]`.
        stride: [usize; 2],
        /// `[top, left, bottom, right]`, each below the kernel size.
        padding: [usize; 4],
    },
    /// Average pooling without padding, u8 → u8: `y = (Σ x + n/2) / n` over the `n = kh·kw`
    /// taps (integer, round half up).
    AvgPoolU8 {
        /// `[h, w, c]` of the input.
        in_shape: [usize; 3],
        /// `[kh, kw]`.
        kernel: [usize; 2],
        /// `[sh, sw]`.
        stride: [usize; 2],
    },
    /// Global average pooling, `[h, w, c]` → `[1, 1, c]`: `y[c] = (Σ x + n/2) / n`, `n = h·w`.
    GlobalAvgPoolU8 {
        /// `[h, w, c]` of the input.
        in_shape: [usize; 3],
    },
}

/// Every op, looked up by the `kind` of a layer's JSON object when a file is read.
static REGISTRY: &[&dyn Op] = &[
    &dense_i8::DenseI8,
    &dense_bin::DenseBin,
    &conv2d_i8::Conv2dI8,
    &conv2d_bin::Conv2dBin,
    &maxpool_u8::MaxPoolU8,
    &maxpool_bin::MaxPoolBin,
    &avgpool_u8::AvgPoolU8,
    &global_avgpool_u8::GlobalAvgPoolU8,
];

impl Layer {
    /// The op that implements this layer's kind.
    pub(crate) fn op(&self) -> &'static dyn Op {
        match self {
            Layer::DenseI8 { .. } => &dense_i8::DenseI8,
            Layer::DenseBin { .. } => &dense_bin::DenseBin,
            Layer::Conv2dI8 { .. } => &conv2d_i8::Conv2dI8,
            Layer::Conv2dBin { .. } => &conv2d_bin::Conv2dBin,
            Layer::MaxPoolU8 { .. } => &maxpool_u8::MaxPoolU8,
            Layer::MaxPoolBin { .. } => &maxpool_bin::MaxPoolBin,
            Layer::AvgPoolU8 { .. } => &avgpool_u8::AvgPoolU8,
            Layer::GlobalAvgPoolU8 { .. } => &global_avgpool_u8::GlobalAvgPoolU8,
        }
    }

    /// The name used in the file (`dense_i8`, `dense_bin`, `conv2d_i8`, `conv2d_bin`,
    /// `maxpool_u8`, `maxpool_bin`, `avgpool_u8`, `global_avgpool_u8`).
    pub fn kind_name(&self) -> &'static str {
        self.op().kind()
    }

    /// Input values per sample (bits for `dense_bin`, `h·w·c` for convolution and pooling).
    pub fn inputs(&self) -> usize {
        self.op().inputs(self)
    }

    /// Output values per sample (channels for dense layers, `oh·ow·channels` for convolution
    /// and pooling; 0 for a convolution or pooling layer whose geometry is invalid).
    pub fn outputs(&self) -> usize {
        self.op().outputs(self)
    }

    /// The `[h, w, c]` shape of the layer's output: `Some` for convolution and pooling layers
    /// with a valid geometry, `None` for dense layers (whose output is a flat vector).
    pub fn output_shape(&self) -> Option<[usize; 3]> {
        self.op().output_shape(self)
    }

    /// The layer's output step ([`Output::InputGrid`] for pooling layers, which have none).
    pub fn output(&self) -> &Output {
        self.op().output(self)
    }

    /// What the layer's tensors take in the file as [`crate::Model::to_bytes`] writes it
    /// (int8 layers at the narrowest `weight_bits` that holds their codes).
    pub fn storage(&self) -> LayerStorage {
        let op = self.op();
        let (weights, weight_bits, weight_bytes) = op.weight_storage(self);
        let bits = usize::from(weight_bits);
        // `param_bytes` counts int8 codes one byte each and `dense_bin` weights as stored.
        let counted = if bits >= 2 { weights } else { weight_bytes };
        LayerStorage {
            weights,
            weight_bits,
            weight_bytes,
            tensor_bytes: op.param_bytes(self) - counted + weight_bytes,
        }
    }
}

/// What one layer's tensors take in the file ([`Layer::storage`], [`crate::Model::layer_storage`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerStorage {
    /// Weights (int8 codes; ±1 bits for `dense_bin`); 0 for pooling layers.
    pub weights: usize,
    /// Bits per stored weight: 8, 4 or 2 for `dense_i8` / `conv2d_i8`, 1 for `dense_bin`, 0
    /// for layers without weights. (Row padding makes `weight_bytes` slightly more than
    /// `weights · weight_bits / 8`.)
    pub weight_bits: u8,
    /// Bytes of the `layers.i.weight` tensor.
    pub weight_bytes: usize,
    /// Bytes of all the layer's tensors (weights, bias, output parameters).
    pub tensor_bytes: usize,
}

impl LayerStorage {
    /// Bytes the weights would take as f32 (4 per weight).
    pub fn f32_weight_bytes(&self) -> usize {
        4 * self.weights
    }

    /// `weight_bytes / f32_weight_bytes` (0 for layers without weights).
    pub fn ratio_to_f32(&self) -> f64 {
        if self.weights == 0 {
            0.0
        } else {
            self.weight_bytes as f64 / self.f32_weight_bytes() as f64
        }
    }
}

/// Reads `layers[i]`: its `kind` picks the op in [`REGISTRY`], which reads the rest.
pub(crate) fn read_layer(i: usize, mut f: Fields<'_>, t: &mut Tensors<'_>) -> Result<Layer, Error> {
    let kind = f.str("kind")?;
    match REGISTRY.iter().find(|op| op.kind() == kind) {
        Some(op) => op.read(i, f, t),
        None => {
            let known: Vec<String> = REGISTRY.iter().map(|op| format!("{:?}", op.kind())).collect();
            Err(Error::field(
                f.name("kind"),
                format!("{kind:?}, expected one of {}", known.join(", ")),
            ))
        }
    }
}

/// Writes layer `i`'s JSON object (its `kind` first) and tensors.
pub(crate) fn write_layer(i: usize, layer: &Layer, doc: &mut Map<String, Value>, t: &mut TensorsOut) {
    let op = layer.op();
    doc.insert("kind".into(), Value::from(op.kind()));
    op.write(layer, i, doc, t);
}

/// What a layer reads or produces per sample, for validation.
#[derive(Clone, Debug)]
pub(crate) struct ActSpec {
    /// Bits (`sign_bits`, a binarized input) rather than u8.
    pub(crate) bits: bool,
    /// Values per sample.
    pub(crate) size: usize,
    /// `[h, w, c]` for images (a shaped input, convolution and pooling outputs).
    pub(crate) shape: Option<[usize; 3]>,
    /// How the values are described in errors about sizes: `input.size`, `the binarized
    /// input`, `layer 2's relu_u8 output`, `layer 1's maxpool_u8 output [14, 14, 32]`.
    pub(crate) desc: String,
    /// How they are described in errors about shapes: `input.shape`, `layer 1's maxpool_u8
    /// output`.
    pub(crate) shape_desc: String,
    /// Multiply-adds (or comparisons, additions) per sample the layer spends producing them.
    pub(crate) macs: u128,
}

impl ActSpec {
    /// The flat output of dense layer `i` with output step `output`.
    pub(crate) fn layer_output(i: usize, output: &Output, size: usize, macs: u128) -> ActSpec {
        let desc = format!("layer {i}'s {} output", output.kind_name());
        ActSpec {
            bits: matches!(output, Output::SignBits { .. }),
            size,
            shape: None,
            shape_desc: desc.clone(),
            desc,
            macs,
        }
    }

    /// The bit image output of layer `i` (`[h, w, c]`, each pixel in `⌈c/64⌉` words: see
    /// `kernels::bitimage`), described as `what`. Its size counts the bits of those words, the
    /// padding bits of each pixel included (they are 0), which is what a `dense_bin` reading it
    /// flattened takes as `in`.
    pub(crate) fn bit_image(i: usize, what: &str, shape: [usize; 3], macs: u128) -> ActSpec {
        let [h, w, c] = shape;
        let mut a = ActSpec::image(i, what, shape, macs);
        a.bits = true;
        a.size = h * w * 64 * crate::kernels::bitimage::words(c);
        a
    }

    /// The u8 image output of layer `i`, described as `what` (its kind or output step).
    pub(crate) fn image(i: usize, what: &str, shape: [usize; 3], macs: u128) -> ActSpec {
        let shape_desc = format!("layer {i}'s {what} output");
        ActSpec {
            bits: false,
            size: shape.iter().product(),
            shape: Some(shape),
            desc: format!("{shape_desc} {shape:?}"),
            shape_desc,
            macs,
        }
    }
}

/// A layer kind: everything about it but the [`Layer`] variant that holds its data.
///
/// The methods take the whole [`Layer`]; they are only ever called through [`Layer::op`] (or,
/// for `read`, through [`REGISTRY`]), so each op only sees its own variant.
pub(crate) trait Op: Sync {
    /// The `kind` string in the file.
    fn kind(&self) -> &'static str;

    /// Reads the layer from its JSON object (`kind` already read) and its tensors; calls
    /// `f.done()` to reject unknown fields.
    fn read(&self, i: usize, f: Fields<'_>, t: &mut Tensors<'_>) -> Result<Layer, Error>;

    /// Writes the layer's fields (all but `kind`) and its tensors.
    fn write(&self, layer: &Layer, i: usize, doc: &mut Map<String, Value>, t: &mut TensorsOut);

    /// Input values per sample.
    fn inputs(&self, layer: &Layer) -> usize;

    /// Output values per sample (by default the product of [`Op::output_shape`]; dense ops,
    /// which have no image shape, give their width).
    fn outputs(&self, layer: &Layer) -> usize {
        self.output_shape(layer).map_or(0, |s| s.iter().product())
    }

    /// The `[h, w, c]` shape of the output, for image outputs.
    fn output_shape(&self, _layer: &Layer) -> Option<[usize; 3]> {
        None
    }

    /// The layer's output step.
    fn output<'a>(&self, layer: &'a Layer) -> &'a Output;

    /// Bytes of the layer's tensors with one byte per int8 weight code, whatever its storage
    /// width (the validation limits count these, so they do not depend on the packing). None
    /// by default (pooling).
    fn param_bytes(&self, _layer: &Layer) -> usize {
        0
    }

    /// The layer's weights as [`crate::Model::to_bytes`] stores them: `(count, bits per weight,
    /// bytes)`; `(0, 0, 0)` for layers without weights.
    fn weight_storage(&self, _layer: &Layer) -> (usize, u8, usize) {
        (0, 0, 0)
    }

    /// Checks layer `i` reading `input`, and returns what it produces. Errors name the field,
    /// tensor or channel and the values that do not fit.
    fn validate(&self, layer: &Layer, i: usize, input: &ActSpec) -> Result<ActSpec, Error>;

    /// Packs a validated layer for the kernels.
    fn compile(&self, layer: &Layer) -> Result<Arc<dyn Compiled>, Error>;
}

/// What a compiled layer writes per sample; the workspace allocates its buffer accordingly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Produces {
    /// `size` u8 per sample, rows `stride ≥ size` bytes apart (image outputs are read as
    /// consecutive positions across samples, so they ask for `stride = size`).
    U8 { size: usize, stride: usize },
    /// `bits` bits per sample, packed in u64 words.
    Bits { bits: usize },
    /// `classes` f32 logits per sample.
    Logits { classes: usize },
}

/// Per-thread scratch memory a compiled layer may use while it runs.
pub(crate) struct Scratch<'a> {
    /// i32 accumulator tile.
    pub(crate) acc: &'a mut Aligned<i32>,
    /// u8 patches (im2col).
    pub(crate) col: &'a mut Aligned<u8>,
    /// u32 sums (average pooling).
    pub(crate) sums: &'a mut Aligned<u32>,
    /// u64 bit patches (binary convolution).
    pub(crate) bits: &'a mut Aligned<u64>,
}

/// How much scratch memory a compiled layer needs for a block of `rows` rows.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct ScratchSize {
    /// i32 accumulators.
    pub(crate) acc: usize,
    /// u8 patch bytes.
    pub(crate) col: usize,
    /// u32 sums.
    pub(crate) sums: usize,
    /// u64 bit-patch words.
    pub(crate) bits: usize,
}

impl ScratchSize {
    /// Enough for both.
    pub(crate) fn max(self, other: ScratchSize) -> ScratchSize {
        ScratchSize {
            acc: self.acc.max(other.acc),
            col: self.col.max(other.col),
            sums: self.sums.max(other.sums),
            bits: self.bits.max(other.bits),
        }
    }
}

/// A layer's input for one block of rows.
#[derive(Clone, Copy)]
pub(crate) enum In<'a> {
    /// `[rows, stride]` u8.
    U8 { x: &'a [u8], stride: usize },
    /// `[rows, words]` u64 bit rows.
    Bits { x: &'a [u64], words: usize },
}

/// A layer's output for one block of rows.
pub(crate) enum Out<'a> {
    /// `[rows, stride]` u8.
    U8 { y: &'a mut [u8], stride: usize },
    /// `[rows, words]` u64 bit rows.
    Bits { y: &'a mut [u64], words: usize },
    /// `[rows, stride]` f32 logits.
    Logits { y: &'a mut [f32], stride: usize },
}

impl Out<'_> {
    /// Elements (words for bits) between consecutive rows.
    pub(crate) fn stride(&self) -> usize {
        match self {
            Out::U8 { stride, .. } | Out::Logits { stride, .. } => *stride,
            Out::Bits { words, .. } => *words,
        }
    }
}

/// A validated layer ready to run.
pub(crate) trait Compiled: Send + Sync + std::fmt::Debug {
    /// What the layer writes per sample.
    fn produces(&self) -> Produces;

    /// Scratch memory needed to run on blocks of up to `rows` rows.
    fn scratch(&self, rows: usize) -> ScratchSize;

    /// Runs the layer on `rows` rows of `x`, writing `rows` rows of `y`.
    fn run(&self, kernel: KernelKind, x: In<'_>, rows: usize, y: Out<'_>, s: &mut Scratch<'_>) -> Result<(), Error>;
}
