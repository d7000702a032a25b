//! Export of a trained quantized model to the integer runtime (`doc/model-format.md`).
//!
//! The exported arithmetic is the training simulation's, in integers:
//! * input pixels are u8 with scale 1/255 and zero point 0 (the simulation's `x = p/255`);
//! * a quantized dense layer's `ŵ = s_w[j]·code` becomes i8 codes and its bias
//!   `round(b_j / (s_in·s_w[j]))` an i32 in accumulator units;
//! * an 8-bit (or narrower) output grid `(s_out, z_out)` becomes the fixed-point multiplier of
//!   `M_j = s_in·s_w[j]/s_out`, with the ReLU folded into the clamp;
//! * a sign activation becomes bits, and a binary layer compares its ±1 dot product with the
//!   integer threshold `⌈−b_j/α_j⌉` (since `α_j·dot + b_j ≥ 0 ⇔ dot ≥ −b_j/α_j` for `α_j > 0`;
//!   a channel with `α_j < 0` is exported with its weight bits flipped);
//! * the last layer's accumulator is dequantized to f32 logits — the only float after the input.
//!
//! Differences from the simulation are rounding only (the bias rounded to accumulator units,
//! round-half-up in the requantization versus half-to-even); `tests/export.rs` checks that the
//! runtime and the simulation agree on ≥ 99.9 % of the Fashion-MNIST test set.

use crate::data::PIXEL_SCALE;
use crate::error::{Error, Result};
use crate::layers::{Activation, Conv2d, Dense, Layer, PoolKind};
use crate::model::Sequential;
use crate::quant::affine::bias_on_grid;
use crate::quant::WeightQuant;
use qmomentum_runtime as rt;

enum Grid {
    U8 { scale: f32, zero_point: i32 },
    Bits,
}

fn quantize_multiplier(m: f64, what: &str) -> Result<(i32, i32)> {
    rt::requant::quantize_multiplier(m).map_err(|error| Error::Runtime {
        context: what.to_string(),
        error,
    })
}

/// Build the integer model of a quantized `model` (every dense layer quantized, hidden
/// activations calibrated or trained).
pub fn to_runtime(model: &Sequential) -> Result<rt::Model> {
    let mut model = model.clone();
    // QAT with batch norm folded into the convolutions: export the folded layers.
    model.bake_folded_batch_norm();
    let n_dense = model.layers.iter().filter(|l| l.quant_parts().is_some()).count();
    let input =
        rt::InputSpec {
            size: model.input_size,
            scale: PIXEL_SCALE,
            zero_point: 0,
            shape: (model.input_shape.h > 1 || model.input_shape.w > 1).then_some([
                model.input_shape.h,
                model.input_shape.w,
                model.input_shape.c,
            ]),
            // The smallest pixel p with p·(1/255) ≥ t, in the very f32 arithmetic of the data
            // pipeline (`Dataset::gather_normalised`), so that the runtime's `p ≥ threshold` makes
            // the same bits as the simulation.
            binarize_at: match model.binarize_input {
                None => None,
                Some(t) => Some((0..=255u8).find(|&p| p as f32 * PIXEL_SCALE >= t).ok_or_else(|| {
                    Error::config("model.binarize_input", t, "no pixel value reaches this threshold")
                })?),
            },
        };
    let mut grid = if model.binarize_input.is_some() {
        Grid::Bits
    } else {
        Grid::U8 {
            scale: PIXEL_SCALE,
            zero_point: 0,
        }
    };
    let mut layers = Vec::new();
    let mut seen = 0;
    let mut shape = model.input_shape;
    // The shape of the bit image the current sign bits form, when a convolution or pooling
    // produced them (`⌈c/64⌉` words per pixel, `doc/model-format.md`); `None` for flat bits
    // (a binarized input, a dense layer's signs). Flatten and dropout keep it.
    let mut bit_image: Option<[usize; 3]> = None;
    for (li, layer) in model.layers.iter_mut().enumerate() {
        let in_shape = [shape.h, shape.w, shape.c];
        shape = layer.output_shape(shape);
        // Layers without weights: pooling runs on the u8 codes (max keeps the grid; the average
        // of codes on one grid is on that grid), flatten and dropout are nothing at inference.
        match layer {
            Layer::Dropout(_) | Layer::Flatten | Layer::Folded(_) => continue,
            Layer::Pool2d(p) if matches!(grid, Grid::Bits) => {
                let g = p.geo;
                if bit_image.is_none() {
                    return Err(Error::config(
                        format!("layers[{li}]"),
                        layer.kind(),
                        "the integer runtime pools bit images that a convolution wrote, not a binarized input",
                    ));
                }
                if p.kind != PoolKind::Max {
                    return Err(Error::config(
                        format!("layers[{li}]"),
                        layer.kind(),
                        "the average of sign bits is not a sign: use max pooling after a sign activation",
                    ));
                }
                layers.push(rt::Layer::MaxPoolBin {
                    in_shape,
                    kernel: g.kernel,
                    stride: g.stride,
                    padding: g.pad,
                });
                bit_image = Some([shape.h, shape.w, shape.c]);
                continue;
            }
            Layer::Pool2d(p) => {
                let g = p.geo;
                layers.push(match p.kind {
                    PoolKind::Max => rt::Layer::MaxPoolU8 {
                        in_shape,
                        kernel: g.kernel,
                        stride: g.stride,
                        padding: g.pad,
                    },
                    PoolKind::Avg if g.pad == [0; 4] => rt::Layer::AvgPoolU8 {
                        in_shape,
                        kernel: g.kernel,
                        stride: g.stride,
                    },
                    PoolKind::Avg => {
                        return Err(Error::config(
                            format!("layers[{li}].padding"),
                            "same",
                            "the integer runtime averages without padding: use padding = \"valid\"",
                        ))
                    }
                });
                continue;
            }
            Layer::GlobalAvgPool(_) if matches!(grid, Grid::Bits) => {
                return Err(Error::config(
                    format!("layers[{li}]"),
                    layer.kind(),
                    "the average of sign bits is not a sign: global average pooling needs u8 activations",
                ))
            }
            Layer::GlobalAvgPool(_) => {
                layers.push(rt::Layer::GlobalAvgPoolU8 { in_shape });
                continue;
            }
            Layer::BatchNorm(_) => {
                return Err(Error::config(
                    format!("layers[{li}]"),
                    "batch_norm",
                    "batch norm is folded into the layer before it for the integer model: export the checkpoint that `qmomentum quantize` writes",
                ))
            }
            Layer::Activation(a) => {
                return Err(Error::config(
                    "export",
                    *a,
                    "stand-alone activation layers are not exported; use Dense(…, activation=…) or Conv2D(…, activation=…)",
                ))
            }
            Layer::Dense(_) | Layer::Conv2d(_) => {}
        }
        seen += 1;
        let last = seen == n_dense;
        let (idx, quant, out_qp, sign_out, activation, bias, weight, geometry, bn) = match layer {
            Layer::Dense(d) => (
                d.index,
                d.quant,
                d.output_qparams(),
                d.sign_output(),
                d.activation,
                d.bias.value.clone(),
                &mut **d as &mut dyn ExportWeights,
                None,
                None,
            ),
            Layer::Conv2d(c) => {
                let geometry = Some((c.geo, c.groups));
                // Only a batch norm after a binary kernel is left by `bake_folded_batch_norm`.
                let bn = c.bn.take();
                (
                    c.index,
                    c.quant,
                    c.output_qparams(),
                    c.out.act.sign(),
                    c.out.activation,
                    c.bias.value.clone(),
                    &mut **c as &mut dyn ExportWeights,
                    geometry,
                    bn,
                )
            }
            _ => unreachable!("handled above"),
        };
        let Some(wq) = quant.weights else {
            return Err(Error::config(
                format!("layers[{idx}].quant.weights"),
                "none",
                "export needs a quantized model: train with --quant or run `qmomentum quantize` first",
            ));
        };
        let (inputs, outputs) = weight.kernel_shape();
        let sign_of_w: Vec<bool> = weight.latent().iter().map(|&w| w >= 0.0).collect();
        let (w_hat, w_scale) = weight.quantized();
        let next_grid;
        let q = match (wq, &grid) {
            (
                WeightQuant::Int { .. } | WeightQuant::Ternary { .. },
                Grid::U8 {
                    scale: s_in,
                    zero_point: z_in,
                },
            ) => {
                let (s_in, z_in) = (*s_in, *z_in);
                let mut weight = vec![0i8; inputs * outputs];
                for k in 0..inputs {
                    for j in 0..outputs {
                        let code = (w_hat[k * outputs + j] / w_scale[j])
                            .round_ties_even()
                            .clamp(-128.0, 127.0);
                        weight[j * inputs + k] = code as i8;
                    }
                }
                let acc_scale: Vec<f64> = w_scale.iter().map(|&s| s_in as f64 * s as f64).collect();
                let bias_q: Vec<i32> = bias
                    .iter()
                    .zip(&w_scale)
                    .map(|(&b, &s_w)| bias_on_grid(b, s_in, s_w).0)
                    .collect();
                let output = if last {
                    next_grid = None;
                    rt::Output::Logits {
                        scale: acc_scale.iter().map(|&s| s as f32).collect(),
                        bias: None,
                    }
                } else if sign_out {
                    if let Some((_, groups @ 2..)) = geometry {
                        return Err(Error::config(
                            format!("layers[{idx}].groups"),
                            groups,
                            "the integer runtime writes the sign bits of ungrouped convolutions only",
                        ));
                    }
                    next_grid = Some(Grid::Bits);
                    rt::Output::SignBits { threshold: None }
                } else {
                    let qp = out_qp.ok_or_else(|| {
                        Error::config(
                            format!("layers[{idx}].activations"),
                            "uncalibrated",
                            "the activation range has not been observed: train or calibrate first",
                        )
                    })?;
                    if qp.qmax > 255 || qp.qmin != 0 {
                        return Err(Error::config(
                            format!("layers[{idx}].activations"),
                            qp.qmax,
                            "the runtime takes unsigned grids of at most 8 bits",
                        ));
                    }
                    let mut multiplier = Vec::with_capacity(outputs);
                    let mut shift = Vec::with_capacity(outputs);
                    for (j, &s) in acc_scale.iter().enumerate() {
                        let (m, r) = quantize_multiplier(s / qp.scale as f64, &format!("layer {idx} channel {j}"))?;
                        multiplier.push(m);
                        shift.push(r);
                    }
                    next_grid = Some(Grid::U8 {
                        scale: qp.scale,
                        zero_point: qp.zero_point,
                    });
                    let zero_point = qp.zero_point as u8;
                    let qmax = qp.qmax as u8;
                    let relu = match activation {
                        Activation::Relu => true,
                        Activation::Linear => false,
                        other => {
                            return Err(Error::config(
                                format!("layers[{idx}].activation"),
                                other,
                                "the integer runtime supports relu and linear hidden activations",
                            ))
                        }
                    };
                    rt::Output::U8 {
                        relu,
                        multiplier,
                        shift,
                        zero_point,
                        qmax,
                    }
                };
                match geometry {
                    None => rt::Layer::DenseI8 {
                        inputs,
                        outputs,
                        weight,
                        bias: bias_q,
                        input_zero_point: z_in as u8,
                        output,
                    },
                    // The kernel `[kh·kw·cg, cout]` transposed is the runtime's `[out, kh, kw, cg]`.
                    Some((g, groups)) => rt::Layer::Conv2dI8 {
                        in_shape,
                        out_channels: outputs,
                        kernel: g.kernel,
                        stride: g.stride,
                        padding: g.pad,
                        dilation: g.dilation,
                        groups,
                        weight,
                        bias: bias_q,
                        input_zero_point: z_in as u8,
                        output,
                    },
                }
            }
            (WeightQuant::Binary { .. }, Grid::Bits) => {
                // A batch norm after the ±1 kernel: `BN(α·dot + b) = (s·α)·dot + β + s(b − μ)`.
                let (w_scale, bias) = match bn.as_deref() {
                    Some(f) => f.sign_affine(&w_scale, &bias),
                    None => (w_scale, bias),
                };
                // A negative scale flips the channel so that the exported scale is ≥ 0.
                let plus = |k: usize, j: usize| sign_of_w[k * outputs + j] != (w_scale[j] < 0.0);
                let alpha: Vec<f32> = w_scale.iter().map(|a| a.abs()).collect();
                if !sign_out && !last {
                    return Err(Error::config(
                        format!("layers[{idx}].activations"),
                        "not 1-bit",
                        "a binary layer's output must be a sign activation (or the logits)",
                    ));
                }
                match geometry {
                    Some((g, groups)) => {
                        let Some(image) = bit_image else {
                            return Err(Error::config(
                                format!("layers[{idx}]"),
                                "conv2d",
                                "the integer runtime's binary convolutions read bit images that a convolution wrote, not a binarized input",
                            ));
                        };
                        debug_assert_eq!(image, in_shape);
                        if groups != 1 {
                            return Err(Error::config(
                                format!("layers[{idx}].groups"),
                                groups,
                                "binary convolutions in the integer runtime have one group",
                            ));
                        }
                        if last {
                            return Err(Error::config(
                                format!("layers[{idx}]"),
                                "conv2d",
                                "a binary convolution cannot output the logits: end the model with a dense layer",
                            ));
                        }
                        // The kernel row `(ky·kw + kx)·c + ci` → tap `ky·kw + kx`, word `ci/64`.
                        let c = in_shape[2];
                        let pw = c.div_ceil(64);
                        let taps = g.kernel[0] * g.kernel[1];
                        let mut weight = vec![0u64; outputs * taps * pw];
                        for t in 0..taps {
                            for ci in 0..c {
                                for j in 0..outputs {
                                    if plus(t * c + ci, j) {
                                        weight[(j * taps + t) * pw + ci / 64] |= 1u64 << (ci % 64);
                                    }
                                }
                            }
                        }
                        next_grid = Some(Grid::Bits);
                        rt::Layer::Conv2dBin {
                            in_shape,
                            out_channels: outputs,
                            kernel: g.kernel,
                            stride: g.stride,
                            padding: g.pad,
                            dilation: g.dilation,
                            weight,
                            output: rt::Output::SignBits {
                                threshold: Some(crate::quant::binary::sign_thresholds(&alpha, &bias, inputs)),
                            },
                        }
                    }
                    None => {
                        // Input k of a flattened bit image `[h, w, c]` is bit `p·64·⌈c/64⌉ + ci`
                        // (`p = k / c`); the padding bits between pixels are −1 inputs that meet
                        // weight bit 0 (−1), so each adds 1 to the dot: `npad` in all.
                        let (padded_in, place): (usize, Box<dyn Fn(usize) -> usize>) = match bit_image {
                            Some([h, w, c]) if h * w * c == inputs && !c.is_multiple_of(64) => {
                                let pw = 64 * c.div_ceil(64);
                                (h * w * pw, Box::new(move |k| (k / c) * pw + k % c))
                            }
                            _ => (inputs, Box::new(|k| k)),
                        };
                        let npad = (padded_in - inputs) as i32;
                        let words = padded_in.div_ceil(64);
                        let mut weight = vec![0u64; outputs * words];
                        for k in 0..inputs {
                            let at = place(k);
                            for j in 0..outputs {
                                if plus(k, j) {
                                    weight[j * words + at / 64] |= 1u64 << (at % 64);
                                }
                            }
                        }
                        let output = if last {
                            next_grid = None;
                            rt::Output::Logits {
                                bias: Some(bias.iter().zip(&alpha).map(|(&b, &a)| b - a * npad as f32).collect()),
                                scale: alpha,
                            }
                        } else {
                            next_grid = Some(Grid::Bits);
                            let threshold = crate::quant::binary::sign_thresholds(&alpha, &bias, inputs);
                            rt::Output::SignBits {
                                threshold: Some(threshold.iter().map(|&t| t + npad).collect()),
                            }
                        };
                        rt::Layer::DenseBin {
                            inputs: padded_in,
                            outputs,
                            weight,
                            output,
                        }
                    }
                }
            }
            (WeightQuant::Binary { .. }, Grid::U8 { .. }) => {
                return Err(Error::config(
                    format!("layers[{idx}].quant.weights"),
                    "binary",
                    "binary weights need binary inputs: the layer before must have 1-bit (sign) activations",
                ))
            }
            (_, Grid::Bits) => {
                return Err(Error::config(
                    format!("layers[{idx}].quant.weights"),
                    wq,
                    "a layer reading binary (sign) inputs must have binary weights",
                ))
            }
        };
        bit_image = match (&q, &next_grid) {
            (rt::Layer::Conv2dI8 { .. } | rt::Layer::Conv2dBin { .. }, Some(Grid::Bits)) => {
                Some([shape.h, shape.w, shape.c])
            }
            _ => None,
        };
        layers.push(q);
        if let Some(g) = next_grid {
            grid = g;
        }
    }
    rt::Model::new(input, layers).map_err(|error| Error::Runtime {
        context: "the exported integer model".into(),
        error,
    })
}

/// What the exporter needs of a layer with a kernel (dense or conv): `[fan_in, outputs]`, the
/// latent weights and `(ŵ, per-channel scales)`.
trait ExportWeights {
    fn kernel_shape(&self) -> (usize, usize);
    fn latent(&self) -> &[f32];
    fn quantized(&mut self) -> (Vec<f32>, Vec<f32>);
}

impl ExportWeights for Dense {
    fn kernel_shape(&self) -> (usize, usize) {
        (self.inputs, self.outputs)
    }
    fn latent(&self) -> &[f32] {
        &self.weight.value
    }
    fn quantized(&mut self) -> (Vec<f32>, Vec<f32>) {
        let (w, s) = self.effective_weights();
        (w.to_vec(), s.to_vec())
    }
}

impl ExportWeights for Conv2d {
    fn kernel_shape(&self) -> (usize, usize) {
        (self.weight.shape[0], self.weight.shape[1])
    }
    fn latent(&self) -> &[f32] {
        &self.weight.value
    }
    fn quantized(&mut self) -> (Vec<f32>, Vec<f32>) {
        self.wq.quantize(&self.weight.value);
        (self.wq.weights(&self.weight.value).to_vec(), self.wq.scales().to_vec())
    }
}
