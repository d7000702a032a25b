//! `conv2d_i8`: a 2-D convolution over NHWC u8 images with int8 weights.
//!
//! File: fields `in_shape [h, w, c]`, `out` (output channels), `kernel [kh, kw]`,
//! `stride [sh, sw]`, `padding [top, left, bottom, right]`, `dilation [dh, dw]`, `groups`,
//! `input_zero_point`, and the [`output`](super::output) fields (`relu_u8`/`u8`, or `logits` as
//! the last layer, or `sign_bits` (`acc ≥ 0`, one group only) for a bit image read by binary
//! layers); tensors `layers.i.weight` I8 `[out, kh, kw, c/groups]` and
//! `layers.i.bias` I32 `[out]`.
//!
//! # How it runs
//! The output positions of a block of samples are taken [`ACC_ROWS`] at a time (across sample
//! boundaries, so small images still fill a tile). For each tile and channel group, `im2col`
//! gathers the tile's input patches into a u8 scratch buffer (padding filled with `z_in`), the
//! int8 dense kernel of the chosen tier multiplies them by the group's packed weights
//! (`[tile × kh·kw·cg] · [kh·kw·cg × out/groups]`, the input zero point folded into the bias
//! exactly as for `dense_i8`), and the shared epilogue writes the group's channels of each
//! position. Patch rows are padded to a multiple of 4 bytes (with zero weights) so the kernels
//! only take whole 4-input steps. A 1×1 convolution with stride 1, no padding, one group and a
//! multiple of 4 channels needs no gather: its patches are the input rows themselves. Grouped and depthwise convolutions loop over the
//! groups with one small GEMM each (correct on every tier, but a depthwise layer's one-channel
//! GEMMs leave most of each vector unused; a dedicated depthwise kernel is future work).

use std::sync::Arc;

use serde_json::{json, Map, Value};

use super::output::{self, After, Epilogue};
use super::spatial::{check_dims, check_input, check_window, product, read_conv_window, write_conv_window};
use super::{ActSpec, Compiled, In, Layer, Op, Out, Output, Produces, Scratch, ScratchSize, ACC_ROWS};
use crate::error::Error;
use crate::format::{tname, Fields, Tensors, TensorsOut};
use crate::kernels::bitimage::words;
use crate::kernels::conv::{col_stride, im2col};
use crate::kernels::{self, padded, ConvGeometry, KernelKind, PackedDenseI8, Window};
use crate::lowbit;

/// The `conv2d_i8` op.
pub(crate) struct Conv2dI8;

/// The fields of a [`Layer::Conv2dI8`].
struct Parts<'a> {
    geometry: ConvGeometry,
    weight: &'a [i8],
    bias: &'a [i32],
    input_zero_point: u8,
    output: &'a Output,
}

fn parts(layer: &Layer) -> Parts<'_> {
    match layer {
        Layer::Conv2dI8 {
            in_shape,
            out_channels,
            kernel,
            stride,
            padding,
            dilation,
            groups,
            weight,
            bias,
            input_zero_point,
            output,
        } => Parts {
            geometry: ConvGeometry {
                window: Window {
                    in_shape: *in_shape,
                    kernel: *kernel,
                    stride: *stride,
                    padding: *padding,
                    dilation: *dilation,
                },
                out_channels: *out_channels,
                groups: *groups,
            },
            weight,
            bias,
            input_zero_point: *input_zero_point,
            output,
        },
        // `Layer::op` sends only `Conv2dI8` layers here.
        _ => unreachable!("conv2d_i8 op given a {} layer", layer.kind_name()),
    }
}

/// Checks the geometry (window, channels, groups, patch size) and returns `[oh, ow]`.
fn check_geometry(i: usize, g: &ConvGeometry) -> Result<[usize; 2], Error> {
    let out_hw = check_window(i, &g.window)?;
    check_dims(i, "out", [g.out_channels], 1)?;
    check_dims(i, "groups", [g.groups], 1)?;
    let c = g.window.in_shape[2];
    if !c.is_multiple_of(g.groups) {
        return Err(Error::field(
            format!("layers[{i}].groups"),
            format!(
                "{} does not divide the input channels {c} (in_shape {:?})",
                g.groups, g.window.in_shape
            ),
        ));
    }
    if !g.out_channels.is_multiple_of(g.groups) {
        return Err(Error::field(
            format!("layers[{i}].groups"),
            format!("{} does not divide out {}", g.groups, g.out_channels),
        ));
    }
    let patch = g.patch();
    if i32::try_from(patch).is_err() {
        return Err(Error::field(
            format!("layers[{i}].kernel"),
            format!(
                "patch kh·kw·c/groups = {patch} is too large: the i32 accumulator holds dot products over at most 2147483647 inputs"
            ),
        ));
    }
    Ok(out_hw)
}

impl Op for Conv2dI8 {
    fn kind(&self) -> &'static str {
        "conv2d_i8"
    }

    fn read(&self, i: usize, mut f: Fields<'_>, t: &mut Tensors<'_>) -> Result<Layer, Error> {
        let (window, out_channels) = read_conv_window(&mut f)?;
        let Window {
            in_shape,
            kernel,
            stride,
            padding,
            dilation,
        } = window;
        let groups = f.size("groups")?;
        let input_zero_point = f.uint("input_zero_point", 255)? as u8;
        let bits = lowbit::read_bits(&mut f)?;
        let g = ConvGeometry {
            window,
            out_channels,
            groups,
        };
        // Before the tensors: their shapes follow from the geometry.
        check_geometry(i, &g)?;
        let output = output::read(i, &mut f, t, out_channels, After::I8(self.kind()))?;
        f.done()?;
        let weight_shape = [out_channels, kernel[0], kernel[1], in_shape[2] / groups];
        Ok(Layer::Conv2dI8 {
            in_shape,
            out_channels,
            kernel,
            stride,
            padding,
            dilation,
            groups,
            weight: lowbit::read_codes(t, &tname(i, "weight"), bits, out_channels, g.patch(), &weight_shape)?,
            bias: t.i32s(&tname(i, "bias"), &[out_channels])?,
            input_zero_point,
            output,
        })
    }

    fn write(&self, layer: &Layer, i: usize, doc: &mut Map<String, Value>, t: &mut TensorsOut) {
        let p = parts(layer);
        let g = p.geometry;
        let w = g.window;
        write_conv_window(doc, &w, g.out_channels);
        doc.insert("groups".into(), json!(g.groups));
        doc.insert("input_zero_point".into(), json!(p.input_zero_point));
        let shape = vec![g.out_channels, w.kernel[0], w.kernel[1], g.group_in()];
        let bits = lowbit::write_codes(t, tname(i, "weight"), p.weight, g.out_channels, g.patch(), shape);
        if bits != 8 {
            doc.insert("weight_bits".into(), json!(bits));
        }
        t.i32s(tname(i, "bias"), vec![g.out_channels], p.bias);
        output::write(i, p.output, doc, t);
    }

    fn inputs(&self, layer: &Layer) -> usize {
        parts(layer).geometry.window.in_shape.iter().product()
    }

    fn output_shape(&self, layer: &Layer) -> Option<[usize; 3]> {
        let g = parts(layer).geometry;
        let [oh, ow] = g.window.out_hw()?;
        Some([oh, ow, g.out_channels])
    }

    fn output<'a>(&self, layer: &'a Layer) -> &'a Output {
        parts(layer).output
    }

    fn param_bytes(&self, layer: &Layer) -> usize {
        let p = parts(layer);
        p.weight.len() + 4 * p.bias.len() + output::param_bytes(p.output)
    }

    fn weight_storage(&self, layer: &Layer) -> (usize, u8, usize) {
        let p = parts(layer);
        let (rows, k) = (p.geometry.out_channels, p.geometry.patch());
        let bits = lowbit::narrowest_bits(p.weight);
        (p.weight.len(), bits, rows * lowbit::row_bytes(k, bits))
    }

    fn validate(&self, layer: &Layer, i: usize, input: &ActSpec) -> Result<ActSpec, Error> {
        let p = parts(layer);
        let g = p.geometry;
        let [oh, ow] = check_geometry(i, &g)?;
        check_input(i, self.kind(), g.window.in_shape, input)?;
        let [kh, kw] = g.window.kernel;
        let cg = g.group_in();
        if Some(p.weight.len()) != g.out_channels.checked_mul(g.patch()) {
            return Err(Error::tensor(
                tname(i, "weight"),
                format!(
                    "has {} values, expected out × kh × kw × c/groups = {} × {kh} × {kw} × {cg}",
                    p.weight.len(),
                    g.out_channels
                ),
            ));
        }
        output::check_len(&tname(i, "bias"), p.bias, g.out_channels, "out")?;
        if let (Output::SignBits { .. }, true) = (p.output, g.groups > 1) {
            return Err(Error::field(
                format!("layers[{i}].output"),
                format!(
                    "sign_bits needs groups = 1 (got {}): a pixel's bits are written as one word run",
                    g.groups
                ),
            ));
        }
        output::validate(i, p.output, g.out_channels, After::I8(self.kind()))?;
        let macs = product(&[oh, ow, g.out_channels, g.patch()]);
        let shape = [oh, ow, g.out_channels];
        Ok(match p.output {
            Output::SignBits { .. } => ActSpec::bit_image(i, p.output.kind_name(), shape, macs),
            _ => ActSpec::image(i, p.output.kind_name(), shape, macs),
        })
    }

    fn compile(&self, layer: &Layer) -> Result<Arc<dyn Compiled>, Error> {
        let p = parts(layer);
        let g = p.geometry;
        let out_hw = g
            .window
            .out_hw()
            .ok_or(Error::Internal("a validated convolution has no output"))?;
        let (k, og) = (g.patch(), g.group_out());
        // Each patch row is padded to a multiple of 4 bytes with zero weights, so the int8
        // kernels take whole 4-input steps (whatever the padding bytes hold, they meet 0).
        let k4 = k.next_multiple_of(4);
        let groups = (0..g.groups)
            .map(|gi| {
                let ch = gi * og..(gi + 1) * og;
                let mut w = vec![0i8; og * k4];
                for (dst, src) in w
                    .chunks_exact_mut(k4)
                    .zip(p.weight[ch.start * k..ch.end * k].chunks_exact(k))
                {
                    dst[..k].copy_from_slice(src);
                }
                Ok((
                    PackedDenseI8::new_narrowest(k4, og, &w, &p.bias[ch.clone()], p.input_zero_point),
                    Epilogue::new(p.output, ch)?,
                ))
            })
            .collect::<Result<Vec<_>, Error>>()?;
        let w = g.window;
        let size = out_hw[0] * out_hw[1] * g.out_channels;
        Ok(Arc::new(CompiledConv2dI8 {
            g,
            out_hw,
            z_in: p.input_zero_point,
            groups,
            // The input rows are the patches only when no padding to 4 bytes is needed.
            direct: w.kernel == [1, 1] && w.stride == [1, 1] && w.padding == [0; 4] && g.groups == 1 && k == k4,
            produces: match p.output {
                Output::Logits { .. } => Produces::Logits { classes: size },
                // A bit image: `⌈out/64⌉` words per position.
                Output::SignBits { .. } => Produces::Bits {
                    bits: out_hw[0] * out_hw[1] * 64 * words(g.out_channels),
                },
                // Consecutive positions across samples: no padding between samples.
                _ => Produces::U8 { size, stride: size },
            },
        }))
    }
}

#[derive(Debug)]
struct CompiledConv2dI8 {
    g: ConvGeometry,
    out_hw: [usize; 2],
    z_in: u8,
    /// Per channel group: the packed weights (`out/groups` channels of `kh·kw·c/groups`
    /// inputs) and the epilogue of those channels.
    groups: Vec<(PackedDenseI8, Epilogue)>,
    /// A 1×1, stride 1, unpadded, ungrouped convolution over a multiple of 4 channels: the
    /// input rows are the patches.
    direct: bool,
    produces: Produces,
}

impl Compiled for CompiledConv2dI8 {
    fn produces(&self) -> Produces {
        self.produces
    }

    fn scratch(&self, _rows: usize) -> ScratchSize {
        ScratchSize {
            acc: ACC_ROWS * padded(self.g.group_out()),
            col: if self.direct {
                0
            } else {
                ACC_ROWS * col_stride(self.g.patch())
            },
            sums: 0,
            bits: 0,
        }
    }

    fn run(
        &self,
        kernel: KernelKind,
        x: In<'_>,
        rows: usize,
        mut y: Out<'_>,
        s: &mut Scratch<'_>,
    ) -> Result<(), Error> {
        // Excluded by validation (layer kinds chain) and by how the workspace is built.
        let In::U8 { x, stride: xs } = x else {
            return Err(Error::Internal("a conv2d_i8 layer reads bit activations"));
        };
        let [h, w, c] = self.g.window.in_shape;
        let positions = self.out_hw[0] * self.out_hw[1];
        let out = self.g.out_channels;
        let og = self.g.group_out();
        // Output elements per position: bytes, or the words of a bit image's pixel (one group).
        let per = match y {
            Out::Bits { .. } => words(out),
            _ => out,
        };
        if y.stride() != positions * per {
            return Err(Error::Internal("a conv2d_i8 output buffer with padded rows"));
        }
        // Patch rows padded to whole 4-byte steps (see `compile`).
        let cs = col_stride(self.g.patch());
        let acc_stride = padded(og);
        // Direct: position p of sample s is the input row at (s·positions + p)·c, which needs
        // samples back to back.
        let direct = self.direct && xs == h * w * c;
        let total = rows * positions;
        let mut r0 = 0;
        while r0 < total {
            let n = ACC_ROWS.min(total - r0);
            let acc = &mut s.acc[..n * acc_stride];
            for (gi, (wg, epilogue)) in self.groups.iter().enumerate() {
                if direct {
                    kernels::dense_i8(kernel, wg, &x[r0 * c..], c, n, acc, acc_stride)?;
                } else {
                    let col = &mut s.col[..n * cs];
                    im2col(&self.g, self.out_hw, gi, self.z_in, x, xs, r0, n, col, cs);
                    kernels::dense_i8(kernel, wg, col, cs, n, acc, acc_stride)?;
                }
                epilogue.apply(kernel, acc, acc_stride, n, &mut y, r0 * per + gi * og, per)?;
            }
            r0 += n;
        }
        Ok(())
    }
}
