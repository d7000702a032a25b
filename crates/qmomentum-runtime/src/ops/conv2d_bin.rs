//! `conv2d_bin`: a binary convolution, XNOR-popcount over a bit image, ±1 weights.
//!
//! `dot[oy,ox,o] = Σ_{ky,kx,ci} x[iy,ix,ci]·W[o,ky,kx,ci]` over ±1 values, with
//! `iy = oy·sh − top + ky·dh`, `ix = ox·sw − left + kx·dw`; a tap in the padding reads **+1** on
//! every channel (Larq's `pad_values = 1`: the training simulation pads binary convolutions the
//! same way, so the border is exact). The output is a bit image `[oh, ow, out]`, bit
//! `dot ≥ threshold[o]` (the batch norm and sign after the convolution, folded by the exporter
//! into one integer per channel; a channel whose batch-norm scale is negative is exported with
//! its weight bits flipped).
//!
//! File: fields `in_shape [h, w, c]`, `out`, `kernel [kh, kw]`, `stride [sh, sw]`,
//! `padding [top, left, bottom, right]`, `dilation [dh, dw]`, `output` = `sign_bits`; tensors
//! `layers.i.weight` U64 `[out, kh, kw, ⌈c/64⌉]` (each tap's channels in whole words, bit b of
//! word k is channel `64·k + b`, 1 = +1, bits past `c` 0) and `layers.i.threshold` I32 `[out]`.
//! No channel groups: a binary convolution is a full one.
//!
//! # How it runs
//! Tiles of [`ACC_ROWS`] output positions (across samples): `im2col_bits` gathers each
//! position's patch as `kh·kw·⌈c/64⌉` words, and the fused XNOR-popcount + threshold kernel of
//! `dense_bin` (every tier: scalar, POPCNT, AVX-512 VPOPCNTDQ) writes the output bits. The patch
//! row then has `kh·kw·64·⌈c/64⌉` bit positions; the `kh·kw·(64·⌈c/64⌉ − c)` padding positions
//! are 0 in both operands, agree, and add exactly that many to every dot product, so `compile`
//! adds the same count to the thresholds.

use std::sync::Arc;

use serde_json::{Map, Value};

use super::output::{self, After};
use super::spatial::{check_bit_input, check_dims, check_window, product, read_conv_window, write_conv_window};
use super::{ActSpec, Compiled, In, Layer, Op, Out, Output, Produces, Scratch, ScratchSize, ACC_ROWS};
use crate::error::Error;
use crate::format::{tname, Fields, Tensors, TensorsOut};
use crate::kernels::bitimage::{im2col_bits, ones, words};
use crate::kernels::{self, KernelKind, PackedDenseBin, SignBits, Window};

/// The `conv2d_bin` op.
pub(crate) struct Conv2dBin;

/// The fields of a [`Layer::Conv2dBin`].
struct Parts<'a> {
    window: Window,
    out_channels: usize,
    weight: &'a [u64],
    output: &'a Output,
}

fn parts(layer: &Layer) -> Parts<'_> {
    match layer {
        Layer::Conv2dBin {
            in_shape,
            out_channels,
            kernel,
            stride,
            padding,
            dilation,
            weight,
            output,
        } => Parts {
            window: Window {
                in_shape: *in_shape,
                kernel: *kernel,
                stride: *stride,
                padding: *padding,
                dilation: *dilation,
            },
            out_channels: *out_channels,
            weight,
            output,
        },
        // `Layer::op` sends only `Conv2dBin` layers here.
        _ => unreachable!("conv2d_bin op given a {} layer", layer.kind_name()),
    }
}

/// Words of one weight row (one patch): `kh·kw·⌈c/64⌉`.
fn row_words(w: &Window) -> usize {
    w.kernel[0] * w.kernel[1] * words(w.in_shape[2])
}

impl Op for Conv2dBin {
    fn kind(&self) -> &'static str {
        "conv2d_bin"
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
        // Before the tensors: their shapes follow from the geometry.
        check_window(i, &window)?;
        check_dims(i, "out", [out_channels], 1)?;
        let output = output::read(i, &mut f, t, out_channels, After::Bin)?;
        f.done()?;
        let shape = [out_channels, kernel[0], kernel[1], words(in_shape[2])];
        Ok(Layer::Conv2dBin {
            in_shape,
            out_channels,
            kernel,
            stride,
            padding,
            dilation,
            weight: t.u64s(&tname(i, "weight"), &shape)?,
            output,
        })
    }

    fn write(&self, layer: &Layer, i: usize, doc: &mut Map<String, Value>, t: &mut TensorsOut) {
        let p = parts(layer);
        let w = p.window;
        write_conv_window(doc, &w, p.out_channels);
        let shape = vec![p.out_channels, w.kernel[0], w.kernel[1], words(w.in_shape[2])];
        t.u64s(tname(i, "weight"), shape, p.weight);
        output::write(i, p.output, doc, t);
    }

    fn inputs(&self, layer: &Layer) -> usize {
        parts(layer).window.in_shape.iter().product()
    }

    fn output_shape(&self, layer: &Layer) -> Option<[usize; 3]> {
        let p = parts(layer);
        let [oh, ow] = p.window.out_hw()?;
        Some([oh, ow, p.out_channels])
    }

    fn outputs(&self, layer: &Layer) -> usize {
        self.output_shape(layer).map_or(0, |s| s.iter().product())
    }

    fn output<'a>(&self, layer: &'a Layer) -> &'a Output {
        parts(layer).output
    }

    fn param_bytes(&self, layer: &Layer) -> usize {
        let p = parts(layer);
        8 * p.weight.len() + output::param_bytes(p.output)
    }

    fn weight_storage(&self, layer: &Layer) -> (usize, u8, usize) {
        let p = parts(layer);
        let [kh, kw] = p.window.kernel;
        let count = p.out_channels.saturating_mul(kh * kw * p.window.in_shape[2]);
        (count, 1, 8 * p.weight.len())
    }

    fn validate(&self, layer: &Layer, i: usize, input: &ActSpec) -> Result<ActSpec, Error> {
        let p = parts(layer);
        let w = p.window;
        let [oh, ow] = check_window(i, &w)?;
        check_dims(i, "out", [p.out_channels], 1)?;
        check_bit_input(i, self.kind(), w.in_shape, input)?;
        let [kh, kw] = w.kernel;
        let c = w.in_shape[2];
        let patch = kh * kw * c;
        if i32::try_from(kh * kw * 64 * words(c)).is_err() {
            return Err(Error::field(
                format!("layers[{i}].kernel"),
                format!("patch kh·kw·c = {patch} is too large for the i32 dot product"),
            ));
        }
        let name = tname(i, "weight");
        let rw = row_words(&w);
        if Some(p.weight.len()) != p.out_channels.checked_mul(rw) {
            return Err(Error::tensor(
                &name,
                format!(
                    "has {} values, expected out × kh × kw × ⌈c/64⌉ = {} × {kh} × {kw} × {}",
                    p.weight.len(),
                    p.out_channels,
                    words(c)
                ),
            ));
        }
        if !c.is_multiple_of(64) {
            let pad = !0u64 << (c % 64);
            let pw = words(c);
            for (r, row) in p.weight.chunks_exact(rw).enumerate() {
                for tap in 0..kh * kw {
                    let v = row[tap * pw + pw - 1];
                    if v & pad != 0 {
                        return Err(Error::value(
                            &name,
                            format!("channel {r} tap {tap}"),
                            format!("padding bits set ({:#018x}) beyond input channel {c}", v & pad),
                        ));
                    }
                }
            }
        }
        if !matches!(p.output, Output::SignBits { .. }) {
            return Err(Error::field(
                format!("layers[{i}].output"),
                format!(
                    "{} is not an output of conv2d_bin (sign_bits; put a dense_bin classifier after it)",
                    p.output.kind_name()
                ),
            ));
        }
        output::validate(i, p.output, p.out_channels, After::Bin)?;
        let macs = product(&[oh, ow, p.out_channels, patch]);
        Ok(ActSpec::bit_image(
            i,
            p.output.kind_name(),
            [oh, ow, p.out_channels],
            macs,
        ))
    }

    fn compile(&self, layer: &Layer) -> Result<Arc<dyn Compiled>, Error> {
        let p = parts(layer);
        let w = p.window;
        let out_hw = w
            .out_hw()
            .ok_or(Error::Internal("a validated convolution has no output"))?;
        let Output::SignBits { threshold: Some(t) } = p.output else {
            return Err(Error::Internal("a validated conv2d_bin without thresholds"));
        };
        let rw = row_words(&w);
        // Each tap's padding bits agree (0 in both operands): they add `npad` to every dot.
        let npad = (w.kernel[0] * w.kernel[1] * (64 * words(w.in_shape[2]) - w.in_shape[2])) as i64;
        let shifted: Vec<i32> = t
            .iter()
            .map(|&v| (i64::from(v) + npad).clamp(i64::from(i32::MIN), i64::from(i32::MAX)) as i32)
            .collect();
        let pwo = words(p.out_channels);
        Ok(Arc::new(CompiledConv2dBin {
            w,
            out_hw,
            packed: PackedDenseBin::new(64 * rw, p.out_channels, p.weight),
            sign: SignBits::new(&shifted),
            pad: ones(w.in_shape[2]),
            pwo,
            produces: Produces::Bits {
                bits: out_hw[0] * out_hw[1] * 64 * pwo,
            },
        }))
    }
}

#[derive(Debug)]
struct CompiledConv2dBin {
    w: Window,
    out_hw: [usize; 2],
    /// The weights as a dense binary layer over `kh·kw·⌈c/64⌉` words.
    packed: PackedDenseBin,
    /// The thresholds, shifted by the padding positions of a patch row.
    sign: SignBits,
    /// The words of a padding tap (all `c` bits +1).
    pad: Vec<u64>,
    /// Words per output pixel.
    pwo: usize,
    produces: Produces,
}

impl Compiled for CompiledConv2dBin {
    fn produces(&self) -> Produces {
        self.produces
    }

    fn scratch(&self, _rows: usize) -> ScratchSize {
        ScratchSize {
            bits: ACC_ROWS * self.packed.words(),
            ..ScratchSize::default()
        }
    }

    fn run(&self, kernel: KernelKind, x: In<'_>, rows: usize, y: Out<'_>, s: &mut Scratch<'_>) -> Result<(), Error> {
        // Excluded by validation (a bit image in, bits out) and by how the workspace is built.
        let (In::Bits { x, words: xs }, Out::Bits { y, words: ys }) = (x, y) else {
            return Err(Error::Internal("a conv2d_bin layer without bit input and output"));
        };
        let positions = self.out_hw[0] * self.out_hw[1];
        if ys != positions * self.pwo {
            return Err(Error::Internal("a conv2d_bin output buffer with padded rows"));
        }
        let cs = self.packed.words();
        let total = rows * positions;
        let mut r0 = 0;
        while r0 < total {
            let n = ACC_ROWS.min(total - r0);
            let col = &mut s.bits[..n * cs];
            im2col_bits(&self.w, self.out_hw, x, xs, r0, n, &self.pad, col, cs);
            kernels::dense_bin_sign(
                kernel,
                &self.packed,
                &self.sign,
                col,
                cs,
                n,
                &mut y[r0 * self.pwo..],
                self.pwo,
            )?;
            r0 += n;
        }
        Ok(())
    }
}
