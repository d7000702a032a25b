//! ONNX export of a float or quantized model (`qmomentum export CKPT --format onnx`,
//! `doc/onnx.md`).
//!
//! Two stages:
//! 1. [`lower`] turns a [`Sequential`] into an intermediate representation, [`Ir`]: one [`Step`]
//!    per layer, with the **real** scales and zero points of the quantizers (per-channel weight
//!    scales, the integer codes, the bias on the accumulator grid `s_in·s_w` from
//!    [`bias_on_grid`], each activation grid `(s, z, qmin, qmax)`), computed by the same library
//!    functions the training simulation and the `.qmm` exporter call — not read back from the
//!    runtime file, whose fixed-point multipliers have lost the scales.
//! 2. [`Ir::to_onnx`] writes the ONNX graph (opset [`OPSET`], IR version [`IR_VERSION`]) with the
//!    hand-written `prost` messages of [`proto`]. Quantized layers use the QDQ form with integer
//!    initializers: `DequantizeLinear(int8 or int4 weights, per-channel scales, axis)`,
//!    `DequantizeLinear(int32 bias, s_in·s_w)`, activations as `QuantizeLinear` /
//!    `DequantizeLinear` pairs on uint8 (int8 for signed grids), so onnxruntime can fuse each
//!    pattern into an integer kernel and the file holds one byte (or half a byte) per weight.
//!
//! Layout: the graph input is `input`, float `[batch, h·w·c]` in `[0, 1]` (pixel/255), the rows
//! our data pipeline feeds the model; images are NHWC-flattened as everywhere in qmomentum.
//! Convolutions and pools run in ONNX's NCHW: the exporter inserts `Reshape` + `Transpose` before
//! the first of them, permutes the kernels to OIHW, and transposes back to NHWC before a dense
//! layer reads the flattened image, so dense kernels keep our order.

pub mod proto;

use crate::data::PIXEL_SCALE;
use crate::error::{Error, Result};
use crate::layers::{Activation, Layer, PoolKind, Shape};
use crate::model::Sequential;
use crate::quant::affine::bias_on_grid;
use crate::quant::WeightQuant;
use proto::{
    attribute_type, data_type, AttributeProto, Dimension, GraphProto, ModelProto, NodeProto, OperatorSetIdProto,
    StringStringEntryProto, TensorProto, TensorShapeProto, TypeProto, TypeProtoTensor, ValueInfoProto,
};

/// The ONNX operator set the export targets (21: the first with INT4 `DequantizeLinear`).
pub const OPSET: i64 = 21;
/// The ONNX IR version of the file (10 goes with opset 21).
pub const IR_VERSION: i64 = 10;

/// An integer grid: `x̂ = scale·(q − zero_point)`, `q ∈ [qmin, qmax]` (per tensor).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Grid {
    /// Step.
    pub scale: f32,
    /// Integer that represents 0.0.
    pub zero_point: i32,
    /// Smallest code.
    pub qmin: i32,
    /// Largest code.
    pub qmax: i32,
}

impl Grid {
    /// The grid of the model input: pixels, scale 1/255, zero point 0, codes 0..255.
    pub const PIXELS: Grid = Grid {
        scale: PIXEL_SCALE,
        zero_point: 0,
        qmin: 0,
        qmax: 255,
    };
    /// Whether the codes are stored as int8 (a signed grid) rather than uint8.
    pub fn signed(&self) -> bool {
        self.qmin < 0
    }
    /// Whether the grid uses fewer codes than its 8-bit storage type holds (then the export
    /// clips the real values to the grid's range before `QuantizeLinear`).
    pub fn narrower_than_storage(&self) -> bool {
        if self.signed() {
            self.qmin > -128 || self.qmax < 127
        } else {
            self.qmin > 0 || self.qmax < 255
        }
    }
}

/// How the kernel of a dense or convolution layer is stored.
#[derive(Clone, Debug, PartialEq)]
pub enum Weights {
    /// Float weights `[fan_in, outputs]`.
    Float(Vec<f32>),
    /// Integer codes `[fan_in, outputs]` with one scale per output channel: `ŵ = scale[j]·code`.
    Int {
        /// Codes (binary: ±1, ternary: −1/0/1).
        codes: Vec<i8>,
        /// Scale of each output channel.
        scales: Vec<f32>,
        /// Stored as ONNX INT4 (codes in [−8, 7]: 2- to 4-bit integer grids) or INT8.
        int4: bool,
    },
}

/// The bias of a dense or convolution layer.
#[derive(Clone, Debug, PartialEq)]
pub enum Bias {
    /// Float bias (float layers, binary layers, integer layers with a float input).
    Float(Vec<f32>),
    /// int32 codes on the accumulator grid: `b̂[j] = scale[j]·code[j]`, `scale[j] = s_in·s_w[j]`.
    Int {
        /// Codes.
        codes: Vec<i32>,
        /// Scale of each output channel.
        scales: Vec<f32>,
    },
}

/// What a layer's output becomes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Out {
    /// Float values.
    Float,
    /// Quantized to a grid.
    Quant(Grid),
    /// `+1` for `z ≥ 0`, `−1` otherwise (1-bit activations; sign(0) = +1).
    Sign,
}

/// The geometry of a convolution or pooling window (`pad` = top, left, bottom, right).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Window {
    /// `[kh, kw]`.
    pub kernel: [usize; 2],
    /// `[sh, sw]`.
    pub stride: [usize; 2],
    /// `[top, left, bottom, right]` (the order of ONNX's `pads` for 2-D).
    pub pad: [usize; 4],
    /// `[dh, dw]`.
    pub dilation: [usize; 2],
}

/// A dense or convolution layer of the IR.
#[derive(Clone, Debug, PartialEq)]
pub struct Linear {
    /// Index of the layer in the model (names: `layers.{index}.…`).
    pub index: usize,
    /// `None`: dense; `Some((window, groups))`: convolution.
    pub conv: Option<(Window, usize)>,
    /// Fan-in (dense: inputs; conv: `kh·kw·c/groups`).
    pub fan_in: usize,
    /// Output features or channels.
    pub outputs: usize,
    /// The grid the layer reads its input on (`None`: a float input).
    pub input: Option<Grid>,
    /// The kernel.
    pub weights: Weights,
    /// The bias.
    pub bias: Bias,
    /// The activation (softmax only on the last layer: its logits are the model's `logits`).
    pub activation: Activation,
    /// The output stage.
    pub out: Out,
}

/// One layer of the IR.
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    /// Dense or convolution.
    Linear(Linear),
    /// Max pooling (on the codes: the max commutes with the quantizer).
    MaxPool(Window),
    /// Average pooling (no padded positions counted).
    AvgPool(Window),
    /// Mean over all positions of each channel.
    GlobalAvgPool,
    /// Batch normalisation at inference (float models).
    BatchNorm {
        /// Index of the layer in the model.
        index: usize,
        /// γ.
        gamma: Vec<f32>,
        /// β.
        beta: Vec<f32>,
        /// Running mean.
        mean: Vec<f32>,
        /// Running variance.
        var: Vec<f32>,
        /// ε.
        epsilon: f32,
    },
    /// A stand-alone element-wise activation on float values (a final softmax is `Ir::softmax`).
    Activation(Activation),
    /// Flatten (NHWC order).
    Flatten,
}

/// The intermediate representation of a model: its input and its steps, with the shape of each
/// step's output.
#[derive(Clone, Debug, PartialEq)]
pub struct Ir {
    /// The sample shape of the input (`1×1×n` for a flat vector).
    pub input_shape: Shape,
    /// `Some(t)`: the input is binarized, `x ≥ t` → +1, else −1.
    pub binarize_at: Option<f32>,
    /// Steps and the sample shape of each output.
    pub steps: Vec<(Step, Shape)>,
    /// Whether a softmax follows the logits (then the graph also outputs `probabilities`).
    pub softmax: bool,
}

/// What a value between layers is in the lowering (the simulation's view of it).
#[derive(Clone, Copy, PartialEq)]
enum Val {
    Float,
    Grid(Grid),
    Sign,
}

fn named(li: usize, layer: &Layer) -> String {
    format!("layers[{li}] ({})", layer.kind())
}

fn out_grid(li: usize, layer: &Layer, qp: crate::quant::QParams) -> Result<Grid> {
    if qp.qmin < -128 || qp.qmax > 255 || (qp.qmin < 0 && qp.qmax > 127) {
        return Err(Error::config(
            format!("{}.activations", named(li, layer)),
            format!("[{}, {}]", qp.qmin, qp.qmax),
            "ONNX export takes activation grids of at most 8 bits",
        ));
    }
    Ok(Grid {
        scale: qp.scale,
        zero_point: qp.zero_point,
        qmin: qp.qmin,
        qmax: qp.qmax,
    })
}

/// Lower `model` to the [`Ir`]. Quantized models follow the arithmetic of the integer model
/// (`crate::export::to_runtime`): each integer layer reads the grid of the layer before (pixels
/// for the first), pooling keeps its input's grid, the bias is rounded onto `s_in·s_w`. Float
/// layers map to float operators. A layer that has no mapping is an error naming it.
pub fn lower(model: &Sequential) -> Result<Ir> {
    let mut model = model.clone();
    // QAT with batch norm folded into the convolutions: lower the folded layers.
    model.bake_folded_batch_norm();
    let last_weighted = model.layers.iter().rposition(|l| l.quant_parts().is_some());
    let mut val = if model.binarize_input.is_some() {
        Val::Sign
    } else {
        Val::Grid(Grid::PIXELS)
    };
    // Whether the model has any quantization at all (a float model keeps float values, and its
    // input is read as float).
    let quantized = model.layers.iter().any(|l| {
        l.quant_parts()
            .is_some_and(|(w, a)| w.quant.is_some() || a.quant.is_some())
    });
    if !quantized && val != Val::Sign {
        val = Val::Float;
    }
    let mut shape = model.input_shape;
    let mut steps = Vec::new();
    let mut softmax = false;
    let n_layers = model.layers.len();
    for (li, layer) in model.layers.iter_mut().enumerate() {
        let in_shape = shape;
        shape = layer.output_shape(shape);
        let what = named(li, layer);
        let step = match layer {
            Layer::Dropout(_) | Layer::Folded(_) => continue,
            Layer::Flatten => Step::Flatten,
            Layer::Pool2d(p) => {
                if val == Val::Sign {
                    return Err(Error::config(
                        what,
                        "sign inputs",
                        "pooling of sign (±1) activations has no mapping",
                    ));
                }
                let w = Window {
                    kernel: p.geo.kernel,
                    stride: p.geo.stride,
                    pad: p.geo.pad,
                    dilation: [1, 1],
                };
                match p.kind {
                    PoolKind::Max => Step::MaxPool(w),
                    PoolKind::Avg => Step::AvgPool(w),
                }
            }
            Layer::GlobalAvgPool(_) => {
                if val == Val::Sign {
                    return Err(Error::config(
                        what,
                        "sign inputs",
                        "pooling of sign (±1) activations has no mapping",
                    ));
                }
                Step::GlobalAvgPool
            }
            Layer::BatchNorm(b) => {
                if val != Val::Float {
                    return Err(Error::config(
                        what,
                        "quantized input",
                        "a batch norm between quantized layers has no integer mapping: fold it first (`qmomentum quantize` writes the folded checkpoint)",
                    ));
                }
                Step::BatchNorm {
                    index: b.index,
                    gamma: b.gamma.value.clone(),
                    beta: b.beta.value.clone(),
                    mean: b.running_mean.value.clone(),
                    var: b.running_var.value.clone(),
                    epsilon: b.epsilon,
                }
            }
            Layer::Activation(a) => {
                if val != Val::Float {
                    return Err(Error::config(
                        what,
                        *a,
                        "a stand-alone activation after a quantized layer has no integer mapping: give the activation to the dense or conv2d layer before it",
                    ));
                }
                if *a == Activation::Softmax {
                    if li + 1 != n_layers {
                        return Err(Error::config(
                            what,
                            "softmax",
                            "softmax is exported only as the last layer",
                        ));
                    }
                    softmax = true;
                    continue;
                }
                Step::Activation(*a)
            }
            Layer::Conv2d(c) if matches!(c.quant.weights, Some(WeightQuant::Binary { .. })) => {
                // Their padding reads +1 (`Conv2d::pad_value`) and a batch norm stays after the
                // ±1 kernel: neither is one ONNX Conv.
                return Err(Error::config(
                    what,
                    "binary",
                    "ONNX export of binary convolutions is not supported (their padding reads +1 and the batch norm stays after the ±1 kernel): export to .qmm, whose conv2d_bin runs them",
                ));
            }
            Layer::Dense(_) | Layer::Conv2d(_) => {
                let last = Some(li) == last_weighted;
                let step = lower_linear(li, layer, val, in_shape, last)?;
                if step.activation == Activation::Softmax {
                    if !last {
                        return Err(Error::config(
                            what,
                            "softmax",
                            "softmax is exported only on the last layer",
                        ));
                    }
                    softmax = true;
                }
                val = match step.out {
                    Out::Float => Val::Float,
                    Out::Quant(g) => Val::Grid(g),
                    Out::Sign => Val::Sign,
                };
                Step::Linear(step)
            }
        };
        steps.push((step, shape));
    }
    Ok(Ir {
        input_shape: model.input_shape,
        binarize_at: model.binarize_input,
        steps,
        softmax,
    })
}

fn lower_linear(li: usize, layer: &mut Layer, val: Val, in_shape: Shape, last: bool) -> Result<Linear> {
    let what = named(li, layer);
    let (index, conv, activation, bias, sign_out, qp, wq, latent, w_hat, scales, fan_in, outputs) = match layer {
        Layer::Dense(d) => {
            let (w, s) = d.effective_weights();
            let (w, s) = (w.to_vec(), s.to_vec());
            (
                d.index,
                None,
                d.activation,
                d.bias.value.clone(),
                d.sign_output(),
                d.output_qparams(),
                d.wq.quant,
                d.weight.value.clone(),
                w,
                s,
                d.inputs,
                d.outputs,
            )
        }
        Layer::Conv2d(c) => {
            c.wq.quantize(&c.weight.value);
            let w = c.wq.weights(&c.weight.value).to_vec();
            let s = c.wq.scales().to_vec();
            let g = c.geo;
            let window = Window {
                kernel: g.kernel,
                stride: g.stride,
                pad: g.pad,
                dilation: g.dilation,
            };
            if g.input != in_shape {
                return Err(Error::config(
                    what,
                    in_shape,
                    "the layer's input shape does not match the model",
                ));
            }
            (
                c.index,
                Some((window, c.groups)),
                c.out.activation,
                c.bias.value.clone(),
                c.out.act.sign(),
                c.output_qparams(),
                c.wq.quant,
                c.weight.value.clone(),
                w,
                s,
                c.weight.shape[0],
                c.weight.shape[1],
            )
        }
        _ => unreachable!("only dense and conv2d layers are lowered here"),
    };
    let input = match val {
        Val::Grid(g) => Some(g),
        Val::Float | Val::Sign => None,
    };
    let code_of = |k: usize, j: usize| {
        (w_hat[k * outputs + j] / scales[j])
            .round_ties_even()
            .clamp(-128.0, 127.0) as i8
    };
    let (weights, bias) = match wq {
        None => (Weights::Float(w_hat.clone()), Bias::Float(bias)),
        Some(WeightQuant::Int { .. } | WeightQuant::Ternary { .. }) => {
            let mut codes = vec![0i8; fan_in * outputs];
            for k in 0..fan_in {
                for j in 0..outputs {
                    codes[k * outputs + j] = code_of(k, j);
                }
            }
            let int4 = matches!(wq, Some(WeightQuant::Int { bits, .. }) if bits <= 4);
            let bias = match input {
                // The bias as the simulation and the integer runtime add it.
                Some(g) => Bias::Int {
                    codes: bias
                        .iter()
                        .zip(&scales)
                        .map(|(&b, &s_w)| bias_on_grid(b, g.scale, s_w).0)
                        .collect(),
                    scales: scales.iter().map(|&s_w| (g.scale as f64 * s_w as f64) as f32).collect(),
                },
                None => Bias::Float(bias),
            };
            (Weights::Int { codes, scales, int4 }, bias)
        }
        Some(WeightQuant::Binary { .. }) => {
            // ±1 codes with the scale |α|: a negative α flips the channel (as the `.qmm` export).
            let mut codes = vec![0i8; fan_in * outputs];
            for k in 0..fan_in {
                for j in 0..outputs {
                    let plus = (latent[k * outputs + j] >= 0.0) != (scales[j] < 0.0);
                    codes[k * outputs + j] = if plus { 1 } else { -1 };
                }
            }
            let alpha: Vec<f32> = scales.iter().map(|s| s.abs()).collect();
            if sign_out && !last {
                // `α·dot + b ≥ 0 ⇔ dot ≥ ⌈−b/α⌉` for α > 0: the layer is exported divided by α,
                // as `dot − t` with the integer threshold `t` of the `.qmm` export. With ±1
                // inputs and weights every value is an integer below 2^24, exact in float, so
                // the signs are the integer runtime's.
                let bias = crate::quant::binary::sign_thresholds(&alpha, &bias, fan_in)
                    .into_iter()
                    .map(|t| -(t as f32))
                    .collect();
                let scales = vec![1.0; outputs];
                (
                    Weights::Int {
                        codes,
                        scales,
                        int4: false,
                    },
                    Bias::Float(bias),
                )
            } else {
                (
                    Weights::Int {
                        codes,
                        scales: alpha,
                        int4: false,
                    },
                    Bias::Float(bias),
                )
            }
        }
    };
    let out = if last {
        Out::Float
    } else if sign_out {
        Out::Sign
    } else {
        match qp {
            Some(qp) => Out::Quant(out_grid(li, layer, qp)?),
            None if wq.is_some() => {
                return Err(Error::config(
                    format!("{what}.activations"),
                    "uncalibrated",
                    "the activation range has not been observed: train or calibrate first",
                ))
            }
            None => Out::Float,
        }
    };
    if !last && activation == Activation::Softmax {
        return Err(Error::config(
            what,
            "softmax",
            "softmax is exported only on the last layer",
        ));
    }
    Ok(Linear {
        index,
        conv,
        fan_in,
        outputs,
        input,
        weights,
        bias,
        activation,
        out,
    })
}

/// The ONNX model of `model`, serialized (see [`lower`] and [`Ir::to_onnx`]).
pub fn to_onnx(model: &Sequential, metadata: &[(String, String)]) -> Result<Vec<u8>> {
    let ir = lower(model)?;
    Ok(prost::Message::encode_to_vec(&ir.to_onnx(metadata)?))
}

/// Where a value lives in the graph.
#[derive(Clone, Debug)]
struct Value {
    name: String,
    /// Quantized: the grid and the names of its scale and zero-point initializers.
    q: Option<(Grid, String, String)>,
    /// NCHW (`true`) or flat NHWC rows `[batch, h·w·c]`.
    nchw: bool,
    shape: Shape,
}

#[derive(Default)]
struct Builder {
    nodes: Vec<NodeProto>,
    inits: Vec<TensorProto>,
    names: std::collections::HashSet<String>,
}

fn attr_i(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        i: Some(v),
        r#type: Some(attribute_type::INT),
        ..Default::default()
    }
}

fn attr_f(name: &str, v: f32) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        f: Some(v),
        r#type: Some(attribute_type::FLOAT),
        ..Default::default()
    }
}

fn attr_ints(name: &str, v: &[usize]) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        ints: v.iter().map(|&x| x as i64).collect(),
        r#type: Some(attribute_type::INTS),
        ..Default::default()
    }
}

fn dims(d: &[usize]) -> Vec<i64> {
    d.iter().map(|&x| x as i64).collect()
}

impl Builder {
    fn node(&mut self, op: &str, name: &str, inputs: &[&str], output: &str, attribute: Vec<AttributeProto>) -> String {
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.to_string()],
            name: Some(name.into()),
            op_type: Some(op.into()),
            attribute,
            domain: None,
        });
        output.to_string()
    }

    fn init(&mut self, name: &str, dt: i32, d: &[usize], raw: Vec<u8>) -> String {
        if self.names.insert(name.to_string()) {
            self.inits.push(TensorProto {
                dims: dims(d),
                data_type: Some(dt),
                name: Some(name.into()),
                raw_data: Some(raw),
            });
        }
        name.to_string()
    }

    fn f32s(&mut self, name: &str, d: &[usize], v: &[f32]) -> String {
        self.init(
            name,
            data_type::FLOAT,
            d,
            v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        )
    }

    fn i32s(&mut self, name: &str, d: &[usize], v: &[i32]) -> String {
        self.init(
            name,
            data_type::INT32,
            d,
            v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        )
    }

    fn i64s(&mut self, name: &str, d: &[usize], v: &[i64]) -> String {
        self.init(
            name,
            data_type::INT64,
            d,
            v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        )
    }

    /// One scale for all channels when they agree (per-tensor), else one per channel.
    fn scales(&mut self, name: &str, v: &[f32]) -> (String, Option<usize>) {
        if v.iter().all(|&s| s == v[0]) {
            (self.f32s(name, &[], &v[..1]), None)
        } else {
            (self.f32s(name, &[v.len()], v), Some(v.len()))
        }
    }

    /// The scale and zero-point initializers of a grid.
    fn grid(&mut self, prefix: &str, g: Grid) -> (String, String) {
        let s = self.f32s(&format!("{prefix}.scale"), &[], &[g.scale]);
        let (dt, z) = if g.signed() {
            (data_type::INT8, (g.zero_point as i8) as u8)
        } else {
            (data_type::UINT8, g.zero_point as u8)
        };
        let z = self.init(&format!("{prefix}.zero_point"), dt, &[], vec![z]);
        (s, z)
    }

    /// `v` as float: `DequantizeLinear` of a quantized value.
    fn float(&mut self, v: &Value, prefix: &str) -> Value {
        match &v.q {
            None => v.clone(),
            Some((_, s, z)) => {
                let out = format!("{prefix}.dq");
                self.node("DequantizeLinear", &out, &[&v.name, s, z], &out, vec![]);
                Value {
                    name: out,
                    q: None,
                    ..v.clone()
                }
            }
        }
    }

    /// `v` on grid `g`: `QuantizeLinear` of a float value (clipped first when the grid is
    /// narrower than its storage type), or the value itself when it is on `g` already.
    fn quantize(&mut self, v: &Value, g: Grid, prefix: &str) -> Value {
        if let Some((have, _, _)) = &v.q {
            if *have == g {
                return v.clone();
            }
        }
        let f = self.float(v, &format!("{prefix}.in"));
        let mut name = f.name.clone();
        if g.narrower_than_storage() {
            let lo = self.f32s(
                &format!("{prefix}.clip_lo"),
                &[],
                &[(g.qmin - g.zero_point) as f32 * g.scale],
            );
            let hi = self.f32s(
                &format!("{prefix}.clip_hi"),
                &[],
                &[(g.qmax - g.zero_point) as f32 * g.scale],
            );
            let out = format!("{prefix}.clip");
            name = self.node("Clip", &out, &[&name, &lo, &hi], &out, vec![]);
        }
        let (s, z) = self.grid(prefix, g);
        let out = format!("{prefix}.q");
        self.node("QuantizeLinear", &out, &[&name, &s, &z], &out, vec![]);
        Value {
            name: out,
            q: Some((g, s, z)),
            ..f
        }
    }

    /// `v` as NCHW `[batch, c, h, w]`.
    fn as_nchw(&mut self, v: &Value, prefix: &str) -> Value {
        if v.nchw {
            return v.clone();
        }
        let s = v.shape;
        let shape = self.i64s(
            &format!("{prefix}.nhwc_shape"),
            &[4],
            &[-1, s.h as i64, s.w as i64, s.c as i64],
        );
        let r = format!("{prefix}.nhwc");
        self.node("Reshape", &r, &[&v.name, &shape], &r, vec![]);
        let t = format!("{prefix}.nchw");
        self.node("Transpose", &t, &[&r], &t, vec![attr_ints("perm", &[0, 3, 1, 2])]);
        Value {
            name: t,
            nchw: true,
            ..v.clone()
        }
    }

    /// `v` as flat NHWC rows `[batch, h·w·c]`.
    fn as_flat(&mut self, v: &Value, prefix: &str) -> Value {
        if !v.nchw {
            return v.clone();
        }
        let t = format!("{prefix}.to_nhwc");
        self.node("Transpose", &t, &[&v.name], &t, vec![attr_ints("perm", &[0, 2, 3, 1])]);
        let f = format!("{prefix}.flat");
        self.node("Flatten", &f, &[&t], &f, vec![attr_i("axis", 1)]);
        Value {
            name: f,
            nchw: false,
            ..v.clone()
        }
    }

    fn linear(&mut self, l: &Linear, x: &Value, out_shape: Shape) -> Value {
        let p = format!("layers.{}", l.index);
        // The input: on the layer's grid (quantized) or float, in the layout of the operator.
        let x = match l.conv {
            Some(_) => self.as_nchw(x, &p),
            None => self.as_flat(x, &p),
        };
        let x = match l.input {
            Some(g) => self.quantize(&x, g, &format!("{p}.input")),
            None => x,
        };
        let x = self.float(&x, &format!("{p}.input"));
        // The kernel: `[fan_in, outputs]` for Gemm; OIHW for Conv (ours is HWIO flattened).
        let (k, o) = (l.fan_in, l.outputs);
        let (wdims, axis, order): (Vec<usize>, i64, Vec<usize>) = match l.conv {
            None => (vec![k, o], 1, (0..k * o).collect()),
            Some((w, _)) => {
                let [kh, kw] = w.kernel;
                let cg = k / (kh * kw);
                // Position in our layout of element (o, ci, ky, kx) of the OIHW tensor.
                let mut order = Vec::with_capacity(k * o);
                for oc in 0..o {
                    for ci in 0..cg {
                        for ky in 0..kh {
                            for kx in 0..kw {
                                order.push(((ky * kw + kx) * cg + ci) * o + oc);
                            }
                        }
                    }
                }
                (vec![o, cg, kh, kw], 0, order)
            }
        };
        let w = match &l.weights {
            Weights::Float(v) => {
                let data: Vec<f32> = order.iter().map(|&i| v[i]).collect();
                self.f32s(&format!("{p}.weight"), &wdims, &data)
            }
            Weights::Int { codes, scales, int4 } => {
                let data: Vec<i8> = order.iter().map(|&i| codes[i]).collect();
                let q = if *int4 {
                    let mut raw = vec![0u8; data.len().div_ceil(2)];
                    for (i, &c) in data.iter().enumerate() {
                        raw[i / 2] |= ((c as u8) & 0x0F) << (4 * (i % 2));
                    }
                    self.init(&format!("{p}.weight_q"), data_type::INT4, &wdims, raw)
                } else {
                    self.init(
                        &format!("{p}.weight_q"),
                        data_type::INT8,
                        &wdims,
                        data.iter().map(|&c| c as u8).collect(),
                    )
                };
                let (s, per_channel) = self.scales(&format!("{p}.weight_scale"), scales);
                // Explicit zero points (0, of the codes' type): onnxruntime fuses the QDQ pattern
                // into an integer kernel (QGemm, QLinearConv) only when they are present.
                let n = per_channel.unwrap_or(1);
                let zd: Vec<usize> = per_channel.into_iter().collect();
                let z = if *int4 {
                    self.init(
                        &format!("{p}.weight_zero_point"),
                        data_type::INT4,
                        &zd,
                        vec![0; n.div_ceil(2)],
                    )
                } else {
                    self.init(&format!("{p}.weight_zero_point"), data_type::INT8, &zd, vec![0; n])
                };
                let out = format!("{p}.weight");
                let attrs = if per_channel.is_some() {
                    vec![attr_i("axis", axis)]
                } else {
                    vec![]
                };
                self.node("DequantizeLinear", &out, &[&q, &s, &z], &out, attrs)
            }
        };
        let b = match &l.bias {
            Bias::Float(v) => self.f32s(&format!("{p}.bias"), &[o], v),
            Bias::Int { codes, scales } => {
                let q = self.i32s(&format!("{p}.bias_q"), &[o], codes);
                let (s, per_channel) = self.scales(&format!("{p}.bias_scale"), scales);
                let zd: Vec<usize> = per_channel.into_iter().collect();
                let z = self.i32s(&format!("{p}.bias_zero_point"), &zd, &vec![0; per_channel.unwrap_or(1)]);
                let out = format!("{p}.bias");
                let attrs = if per_channel.is_some() {
                    vec![attr_i("axis", 0)]
                } else {
                    vec![]
                };
                self.node("DequantizeLinear", &out, &[&q, &s, &z], &out, attrs)
            }
        };
        let mut y = match l.conv {
            None => {
                let out = format!("{p}.gemm");
                self.node("Gemm", &out, &[&x.name, &w, &b], &out, vec![])
            }
            Some((win, groups)) => {
                let out = format!("{p}.conv");
                let attrs = vec![
                    attr_ints("kernel_shape", &win.kernel),
                    attr_ints("strides", &win.stride),
                    attr_ints("pads", &win.pad),
                    attr_ints("dilations", &win.dilation),
                    attr_i("group", groups as i64),
                ];
                self.node("Conv", &out, &[&x.name, &w, &b], &out, attrs)
            }
        };
        // A 1-bit output replaces the activation by the sign (as the simulation does).
        y = if l.out == Out::Sign {
            self.sign(&y, &p)
        } else {
            self.activation(l.activation, &y, &p)
        };
        let v = Value {
            name: y,
            q: None,
            nchw: l.conv.is_some(),
            shape: out_shape,
        };
        match l.out {
            Out::Quant(g) => self.quantize(&v, g, &format!("{p}.output")),
            Out::Float | Out::Sign => v,
        }
    }

    fn activation(&mut self, a: Activation, x: &str, p: &str) -> String {
        let op = match a {
            Activation::Relu => "Relu",
            Activation::Sigmoid => "Sigmoid",
            Activation::Tanh => "Tanh",
            // Softmax is applied to the model's logits at the end.
            Activation::Linear | Activation::Softmax => return x.to_string(),
        };
        let out = format!("{p}.{}", op.to_lowercase());
        self.node(op, &out, &[x], &out, vec![])
    }

    /// `+1` where `x ≥ 0`, else `−1` (ONNX's `Sign` has sign(0) = 0, ours +1).
    fn sign(&mut self, x: &str, p: &str) -> String {
        let zero = self.f32s("const.zero", &[], &[0.0]);
        let one = self.f32s("const.one", &[], &[1.0]);
        let minus = self.f32s("const.minus_one", &[], &[-1.0]);
        let ge = format!("{p}.nonneg");
        self.node("GreaterOrEqual", &ge, &[x, &zero], &ge, vec![]);
        let out = format!("{p}.sign");
        self.node("Where", &out, &[&ge, &one, &minus], &out, vec![])
    }
}

fn value_info(name: &str, elem: i32, batch_dims: &[usize]) -> ValueInfoProto {
    let mut dim = vec![Dimension {
        dim_value: None,
        dim_param: Some("batch".into()),
    }];
    dim.extend(batch_dims.iter().map(|&d| Dimension {
        dim_value: Some(d as i64),
        dim_param: None,
    }));
    ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(TypeProto {
            tensor_type: Some(TypeProtoTensor {
                elem_type: Some(elem),
                shape: Some(TensorShapeProto { dim }),
            }),
        }),
    }
}

impl Ir {
    /// The ONNX model: input `input` (float `[batch, h·w·c]`), outputs `logits` (float
    /// `[batch, classes]`) and, for a softmax model, `probabilities`. `metadata` goes to the
    /// model's `metadata_props`.
    pub fn to_onnx(&self, metadata: &[(String, String)]) -> Result<ModelProto> {
        let mut b = Builder::default();
        let n_in = self.input_shape.len();
        let mut v = Value {
            name: "input".into(),
            q: None,
            nchw: false,
            shape: self.input_shape,
        };
        if let Some(t) = self.binarize_at {
            let s = b.sign_input(&v.name, t);
            v.name = s;
        }
        for (step, shape) in &self.steps {
            v = match step {
                Step::Linear(l) => b.linear(l, &v, *shape),
                Step::Flatten => {
                    let f = b.as_flat(&v, &format!("flatten{}", b.nodes.len()));
                    Value { shape: *shape, ..f }
                }
                Step::MaxPool(w) | Step::AvgPool(w) => {
                    let p = format!("pool{}", b.nodes.len());
                    let x = b.as_nchw(&v, &p);
                    let mut attrs = vec![
                        attr_ints("kernel_shape", &w.kernel),
                        attr_ints("strides", &w.stride),
                        attr_ints("pads", &w.pad),
                    ];
                    let op = if matches!(step, Step::MaxPool(_)) {
                        "MaxPool"
                    } else {
                        attrs.push(attr_i("count_include_pad", 0));
                        "AveragePool"
                    };
                    b.pool(op, attrs, &x, *shape, &p)
                }
                Step::GlobalAvgPool => {
                    let p = format!("gap{}", b.nodes.len());
                    let x = b.as_nchw(&v, &p);
                    b.pool("GlobalAveragePool", vec![], &x, *shape, &p)
                }
                Step::BatchNorm {
                    index,
                    gamma,
                    beta,
                    mean,
                    var,
                    epsilon,
                } => {
                    let p = format!("layers.{index}");
                    let x = if v.shape.h * v.shape.w > 1 {
                        b.as_nchw(&v, &p)
                    } else {
                        v.clone()
                    };
                    let x = b.float(&x, &p);
                    let c = gamma.len();
                    let g = b.f32s(&format!("{p}.gamma"), &[c], gamma);
                    let be = b.f32s(&format!("{p}.beta"), &[c], beta);
                    let m = b.f32s(&format!("{p}.running_mean"), &[c], mean);
                    let va = b.f32s(&format!("{p}.running_var"), &[c], var);
                    let out = format!("{p}.batchnorm");
                    b.node(
                        "BatchNormalization",
                        &out,
                        &[&x.name, &g, &be, &m, &va],
                        &out,
                        vec![attr_f("epsilon", *epsilon)],
                    );
                    Value {
                        name: out,
                        shape: *shape,
                        ..x
                    }
                }
                Step::Activation(a) => {
                    let p = format!("act{}", b.nodes.len());
                    let x = b.float(&v, &p);
                    let out = b.activation(*a, &x.name, &p);
                    Value { name: out, ..x }
                }
            };
        }
        let v = b.as_flat(&v, "output");
        let v = b.float(&v, "output");
        let classes = v.shape.len();
        b.node("Identity", "logits", &[&v.name], "logits", vec![]);
        let mut outputs = vec![value_info("logits", data_type::FLOAT, &[classes])];
        if self.softmax {
            b.node(
                "Softmax",
                "probabilities",
                &["logits"],
                "probabilities",
                vec![attr_i("axis", -1)],
            );
            outputs.push(value_info("probabilities", data_type::FLOAT, &[classes]));
        }
        let graph = GraphProto {
            node: b.nodes,
            name: Some("qmomentum".into()),
            initializer: b.inits,
            doc_string: None,
            input: vec![value_info("input", data_type::FLOAT, &[n_in])],
            output: outputs,
        };
        Ok(ModelProto {
            ir_version: Some(IR_VERSION),
            producer_name: Some("qmomentum".into()),
            producer_version: Some(env!("CARGO_PKG_VERSION").into()),
            doc_string: None,
            graph: Some(graph),
            opset_import: vec![OperatorSetIdProto {
                domain: Some(String::new()),
                version: Some(OPSET),
            }],
            metadata_props: metadata
                .iter()
                .map(|(k, v)| StringStringEntryProto {
                    key: Some(k.clone()),
                    value: Some(v.clone()),
                })
                .collect(),
        })
    }
}

impl Builder {
    /// A pooling operator on `x` (NCHW). Max pooling runs on the codes of a quantized value (the
    /// max commutes with the quantizer). Average pooling of codes is the integer runtime's
    /// `⌊(Σq + ⌊n/2⌋)/n⌋` (round half up), written as `Floor(AveragePool(q) + 0.5)` in float —
    /// exact, since the sums are integers below 2^24 and a tie `k + ½` is representable — rather
    /// than `QuantizeLinear`'s round half to even, which moved one code in 1 of 8 windows of 4.
    fn pool(&mut self, op: &str, attrs: Vec<AttributeProto>, x: &Value, shape: Shape, p: &str) -> Value {
        let out = format!("{p}.{}", op.to_lowercase());
        let q = x.q.clone();
        let name = match (&q, op) {
            (Some((g, _, _)), "AveragePool" | "GlobalAveragePool") => {
                let to = if g.signed() { data_type::INT8 } else { data_type::UINT8 };
                let f = format!("{p}.codes");
                self.node("Cast", &f, &[&x.name], &f, vec![attr_i("to", data_type::FLOAT as i64)]);
                self.node(op, &out, &[&f], &out, attrs);
                let half = self.f32s("const.half", &[], &[0.5]);
                let a = format!("{p}.plus_half");
                self.node("Add", &a, &[&out, &half], &a, vec![]);
                let fl = format!("{p}.floor");
                self.node("Floor", &fl, &[&a], &fl, vec![]);
                let c = format!("{p}.rounded");
                self.node("Cast", &c, &[&fl], &c, vec![attr_i("to", to as i64)])
            }
            _ => self.node(op, &out, &[&x.name], &out, attrs),
        };
        Value {
            name,
            q,
            nchw: true,
            shape,
        }
    }

    /// The binarized input: `+1` where `x ≥ t`, else `−1`.
    fn sign_input(&mut self, x: &str, t: f32) -> String {
        let th = self.f32s("input.binarize_at", &[], &[t]);
        let one = self.f32s("const.one", &[], &[1.0]);
        let minus = self.f32s("const.minus_one", &[], &[-1.0]);
        self.node("GreaterOrEqual", "input.ge", &[x, &th], "input.ge", vec![]);
        self.node("Where", "input.sign", &["input.ge", &one, &minus], "input.sign", vec![])
    }
}
