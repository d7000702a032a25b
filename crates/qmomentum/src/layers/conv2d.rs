//! `Conv2d`: a 2-D convolution over NHWC activations, lowered onto the tuned GEMM by im2col (or,
//! for a one-group, stride-1, "same" convolution with an odd kernel, without columns over a
//! padded grid: [`ImplicitGemm`]), plus the quantization components every layer shares
//! ([`WeightFakeQuant`], [`Epilogue`]).
//!
//! Layout: one sample is `h·w·c` values with the channel fastest (NHWC), so `Flatten` after a
//! convolution is free and the integer runtime reads the same order. The kernel is Keras's HWIO,
//! stored `[kh·kw·(cin/groups), cout]`: row `(ky·kw + kx)·cg + ci`, column = output channel, the
//! layout of a dense kernel, so weight quantization is per output channel for both.
//!
//! Forward, for each group `g` (`cg = cin/groups` inputs, `og = cout/groups` outputs):
//! `col_g[r, (ky·kw+kx)·cg + ci] = x[b, oy·sh − top + ky·dh, ox·sw − left + kx·dw, g·cg + ci]`
//! (0 outside the input, +1 for binary weights: [`Conv2d::pad_value`]),
//! `z[:, g·og..] = col_g · Ŵ_g`; backward `dŴ_g = col_gᵀ·dz_g`, `dcol_g = dz_g·Ŵ_gᵀ`, and `dx` is
//! `dcol` added back where it came from (col2im). Padding with real 0 is the integer model's
//! padding with the input zero point.
//!
//! ```
//! use qmomentum::layers::{conv2d::{Conv2d, Conv2dConfig, Padding}, Activation, Shape};
//! use qmomentum::rng::Rng;
//! let cfg = Conv2dConfig { filters: 4, kernel: [3, 3], padding: Padding::Same, ..Default::default() };
//! let mut c = Conv2d::new(0, Shape::new(5, 5, 2), cfg, Activation::Relu, &mut Rng::new(0, 0)).unwrap();
//! assert_eq!(c.out_shape, Shape::new(5, 5, 4));
//! let x = vec![0.5f32; 2 * 5 * 5 * 2];
//! let mut y = vec![0.0f32; 2 * 5 * 5 * 4];
//! c.forward(&x, &mut y, 2, false, false);
//! ```

use super::activation::Activation;
use super::batch_norm::BatchNorm;
use super::conv_implicit::ImplicitGemm;
use super::epilogue::Epilogue;
use super::folded_bn::FoldedBn;
use super::param::{Param, ParamKind};
use super::pool::{Pool2d, PooledGrad};
use super::Shape;
use crate::error::{Error, Result};
use crate::gemm::{matmul_strided, Strides};
use crate::quant::affine::QParams;
use crate::quant::weight::WeightFakeQuant;
use crate::quant::LayerQuant;
use crate::rng::Rng;
use serde::{Deserialize, Serialize};

/// Padding of a convolution or a pooling window.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Padding {
    /// No padding.
    #[default]
    Valid,
    /// TensorFlow's `same`: `out = ⌈in/stride⌉`, the odd pixel of padding at the bottom/right.
    Same,
    /// `[top, left, bottom, right]`.
    Explicit([usize; 4]),
}

impl Padding {
    /// `[top, left, bottom, right]` for an input of `(h, w)` and an effective kernel extent.
    pub fn resolve(self, h: usize, w: usize, extent: [usize; 2], stride: [usize; 2]) -> [usize; 4] {
        match self {
            Padding::Valid => [0; 4],
            Padding::Explicit(p) => p,
            Padding::Same => {
                let total = |n: usize, k: usize, s: usize| {
                    let out = n.div_ceil(s);
                    ((out - 1) * s + k).saturating_sub(n)
                };
                let (th, tw) = (total(h, extent[0], stride[0]), total(w, extent[1], stride[1]));
                [th / 2, tw / 2, th - th / 2, tw - tw / 2]
            }
        }
    }
}

/// Geometry of a convolution (the config struct of the layer, Keras's names).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Conv2dConfig {
    /// Output channels.
    pub filters: usize,
    /// `[kh, kw]`.
    pub kernel: [usize; 2],
    /// `[sh, sw]`.
    pub stride: [usize; 2],
    /// Padding.
    pub padding: Padding,
    /// `[dh, dw]`.
    pub dilation: [usize; 2],
    /// Groups (1: a full convolution; `cin`: depthwise).
    pub groups: usize,
}

impl Default for Conv2dConfig {
    fn default() -> Self {
        Conv2dConfig {
            filters: 1,
            kernel: [3, 3],
            stride: [1, 1],
            padding: Padding::Valid,
            dilation: [1, 1],
            groups: 1,
        }
    }
}

/// Output size of a window of `extent` sliding with `stride` over `n + pad` values (`None` when
/// the window does not fit once).
pub fn out_size(n: usize, pad: usize, extent: usize, stride: usize) -> Option<usize> {
    (n + pad).checked_sub(extent).map(|v| v / stride + 1)
}

/// The geometry resolved for one input shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Input shape.
    pub input: Shape,
    /// Output shape.
    pub output: Shape,
    /// `[kh, kw]`.
    pub kernel: [usize; 2],
    /// `[sh, sw]`.
    pub stride: [usize; 2],
    /// `[dh, dw]`.
    pub dilation: [usize; 2],
    /// `[top, left, bottom, right]`.
    pub pad: [usize; 4],
}

impl Geometry {
    /// Resolve `cfg` on `input` (channels checked by the caller); errors name layer `index` and
    /// both shapes.
    pub fn new(
        index: usize,
        input: Shape,
        channels: usize,
        kernel: [usize; 2],
        stride: [usize; 2],
        dilation: [usize; 2],
        padding: Padding,
    ) -> Result<Self> {
        let field = |f: &str| format!("model.layers[{index}].{f}");
        for (name, v) in [
            ("kernel_size", kernel),
            ("strides", stride),
            ("dilation_rate", dilation),
        ] {
            if v[0] == 0 || v[1] == 0 || v[0] > 4096 || v[1] > 4096 {
                return Err(Error::config(
                    field(name),
                    format!("{v:?}"),
                    "each value must be in 1..=4096",
                ));
            }
        }
        let extent = [dilation[0] * (kernel[0] - 1) + 1, dilation[1] * (kernel[1] - 1) + 1];
        let pad = padding.resolve(input.h, input.w, extent, stride);
        if pad[0] >= extent[0] || pad[2] >= extent[0] || pad[1] >= extent[1] || pad[3] >= extent[1] {
            return Err(Error::config(
                field("padding"),
                format!("{pad:?}"),
                format!(
                    "each side must be smaller than the window ({}×{})",
                    extent[0], extent[1]
                ),
            ));
        }
        let oh = out_size(input.h, pad[0] + pad[2], extent[0], stride[0]);
        let ow = out_size(input.w, pad[1] + pad[3], extent[1], stride[1]);
        match (oh, ow) {
            (Some(oh), Some(ow)) => Ok(Geometry {
                input,
                output: Shape::new(oh, ow, channels),
                kernel,
                stride,
                dilation,
                pad,
            }),
            _ => Err(Error::Shape(format!(
                "layer {index}: a {}×{} window (kernel {:?}, dilation {:?}) does not fit the padded input {}×{} (input {input})",
                extent[0],
                extent[1],
                kernel,
                dilation,
                input.h + pad[0] + pad[2],
                input.w + pad[1] + pad[3]
            ))),
        }
    }

    /// The input position `(iy, ix)` of output `(oy, ox)` and kernel tap `(ky, kx)`, if inside.
    #[inline(always)]
    pub fn source(&self, oy: usize, ox: usize, ky: usize, kx: usize) -> Option<(usize, usize)> {
        let iy = (oy * self.stride[0] + ky * self.dilation[0]).checked_sub(self.pad[0])?;
        let ix = (ox * self.stride[1] + kx * self.dilation[1]).checked_sub(self.pad[1])?;
        (iy < self.input.h && ix < self.input.w).then_some((iy, ix))
    }
}

/// Where a convolution's output gradient comes from.
#[derive(Clone, Copy)]
enum Upstream<'a> {
    /// A full-size `∂L/∂y`.
    Full(&'a [f32]),
    /// Through the 2×2 max pooling after it.
    Pooled(PooledGrad<'a>),
}

/// A 2-D convolution layer.
#[derive(Clone, Debug)]
pub struct Conv2d {
    /// Index in the model (used in parameter names).
    pub index: usize,
    /// Input and output shapes, kernel, stride, dilation, padding.
    pub geo: Geometry,
    /// Output shape (`geo.output`).
    pub out_shape: Shape,
    /// Groups.
    pub groups: usize,
    /// Kernel `[kh·kw·cin/groups, cout]` (HWIO).
    pub weight: Param,
    /// Bias `[cout]`.
    pub bias: Param,
    /// Quantization of this layer.
    pub quant: LayerQuant,
    /// The weight fake-quantizer (per output channel).
    pub wq: WeightFakeQuant,
    /// Bias, activation and output quantization.
    pub out: Epilogue,
    /// The grid of the input (see [`crate::layers::Dense::input_scale`]).
    pub input_scale: Option<f32>,
    /// A batch norm folded into this convolution for QAT ([`FoldedBn`]): the output stage then
    /// follows the batch norm.
    pub bn: Option<Box<FoldedBn>>,
    /// The last forward pass left the bias to the batch norm after this layer
    /// ([`Conv2d::forward_bias_to_batch_norm`]), whose backward pass then also gives the bias
    /// gradient.
    bias_deferred: bool,
    col: Vec<f32>,
    /// The products without columns, where they apply ([`ImplicitGemm::applies`]; not for
    /// binary weights, whose padding is +1).
    implicit: Option<Box<ImplicitGemm>>,
}

impl Conv2d {
    /// A float convolution with Glorot-uniform weights (Keras's default: fan_in = kh·kw·cg,
    /// fan_out = kh·kw·cout/groups) and zero bias. Errors name the layer and both shapes.
    pub fn new(index: usize, input: Shape, cfg: Conv2dConfig, activation: Activation, rng: &mut Rng) -> Result<Self> {
        let field = |f: &str| format!("model.layers[{index}].{f}");
        let g = cfg.groups;
        if g == 0 || !input.c.is_multiple_of(g) || !cfg.filters.is_multiple_of(g) {
            return Err(Error::config(
                field("groups"),
                g,
                format!(
                    "must divide the input channels ({}) and the filters ({})",
                    input.c, cfg.filters
                ),
            ));
        }
        if cfg.filters == 0 || cfg.filters > crate::config::MAX_UNITS {
            return Err(Error::config(field("filters"), cfg.filters, "must be in 1..=1048576"));
        }
        let geo = Geometry::new(
            index,
            input,
            cfg.filters,
            cfg.kernel,
            cfg.stride,
            cfg.dilation,
            cfg.padding,
        )?;
        let cg = input.c / g;
        let k = cfg.kernel[0] * cfg.kernel[1] * cg;
        let fan_out = cfg.kernel[0] * cfg.kernel[1] * cfg.filters / g;
        let limit = (6.0 / (k + fan_out) as f32).sqrt();
        let w = (0..k * cfg.filters).map(|_| rng.uniform_range(-limit, limit)).collect();
        Ok(Conv2d {
            index,
            geo,
            out_shape: geo.output,
            groups: g,
            weight: Param::new(
                format!("layers.{index}.weight"),
                ParamKind::Weight,
                vec![k, cfg.filters],
                w,
            ),
            bias: Param::new(
                format!("layers.{index}.bias"),
                ParamKind::Bias,
                vec![cfg.filters],
                vec![0.0; cfg.filters],
            ),
            quant: LayerQuant::default(),
            wq: WeightFakeQuant::new(k, cfg.filters),
            out: Epilogue::new(cfg.filters, activation),
            input_scale: None,
            bn: None,
            bias_deferred: false,
            col: Vec::new(),
            implicit: ImplicitGemm::applies(&geo, g).then(Box::default),
        })
    }

    /// Apply a quantization (as [`crate::layers::Dense::set_quant`]).
    pub fn set_quant(&mut self, quant: LayerQuant, bop: bool) {
        self.quant = quant;
        self.wq.configure(quant.weights, bop, &mut self.weight);
        let signed = !self.out.activation.non_negative();
        self.out.act.configure(quant.activations, signed, self.index);
    }

    /// Fold `bn` (the layer after this one) into this convolution for QAT, with `activation`
    /// (the layer after the batch norm, if any) moved into the output stage; call before
    /// [`Conv2d::set_quant`]. The convolution must be linear. With `binary` weights the batch
    /// norm stays after the ±1 kernel ([`FoldedBn::after_binary`]).
    pub fn fold_batch_norm(&mut self, bn: BatchNorm, activation: Activation, binary: bool) {
        debug_assert_eq!(bn.channels, self.geo.output.c);
        let fan_in = self.weight.shape[0];
        self.bn = Some(Box::new(if binary {
            FoldedBn::after_binary(bn, fan_in)
        } else {
            FoldedBn::new(bn, fan_in)
        }));
        self.out = Epilogue::new(self.geo.output.c, activation);
    }

    /// The value of a tap in the padding: 0, or +1 for binary weights, whose input is signs
    /// (Larq's `pad_values = 1`): the padding is then a bit, and the integer runtime's binary
    /// convolution computes the same border.
    pub fn pad_value(&self) -> f32 {
        match self.quant.weights {
            Some(crate::quant::WeightQuant::Binary { .. }) => 1.0,
            _ => 0.0,
        }
    }

    /// The activation grid in force.
    pub fn output_qparams(&self) -> Option<QParams> {
        self.out.act.output_qparams()
    }

    /// Rows of the product (`batch·oh·ow`), the per-group depth `kh·kw·cg` and `cg`, `og`.
    fn dims(&self, batch: usize) -> (usize, usize, usize, usize) {
        let o = self.geo.output;
        let cg = self.geo.input.c / self.groups;
        (
            batch * o.h * o.w,
            self.geo.kernel[0] * self.geo.kernel[1] * cg,
            cg,
            o.c / self.groups,
        )
    }

    /// Where the `kw` taps of a kernel row of output column `ox` start in an input row, when
    /// they are adjacent there (dilation 1, one group: their channel vectors follow each other)
    /// and all inside it: im2col copies such a kernel row in one piece (cnn-small: 3·cg values
    /// instead of 3 taps of cg), col2im adds it back in one piece, each value once as before.
    #[inline(always)]
    fn row_segment(&self, ox: usize, cg: usize) -> Option<usize> {
        let geo = &self.geo;
        let ix0 = (ox * geo.stride[1]).checked_sub(geo.pad[1])?;
        (geo.dilation[1] == 1 && cg == geo.input.c && ix0 + geo.kernel[1] <= geo.input.w).then_some(ix0)
    }

    /// The input row of output row `oy` and kernel row `ky`, if inside the input.
    #[inline(always)]
    fn source_row(&self, oy: usize, ky: usize) -> Option<usize> {
        let geo = &self.geo;
        (oy * geo.stride[0] + ky * geo.dilation[0])
            .checked_sub(geo.pad[0])
            .filter(|&iy| iy < geo.input.h)
    }

    /// Whether the columns of group `g` are stored kernel-position-major (`kg` rows of `rows`
    /// values: element `(r, k)` at `k·ld + r`, `ld` = [`Conv2d::k_major_ld`]) rather than
    /// row-major. With one channel per group (a first
    /// layer on one-channel images, a depthwise convolution) a row of the columns is only
    /// `kh·kw` values, gathered one by one from around the input (cnn-small's conv1: 9 values
    /// per row, 4 % of an epoch in im2col); kernel-position-major, each kernel position
    /// (`ky`, `kx`) is a shifted copy of an input row, copied in one piece. The GEMM reads either
    /// layout through its strides, with the same products summed in the same order, and
    /// [`Conv2d::col2im_k_major`] adds in `col2im`'s order (a unit test compares both layouts
    /// bit for bit). A single output channel keeps the row-major layout: the `gemm` crate then
    /// takes a matrix-vector path chosen by the strides, which sums in another order.
    fn k_major(&self) -> bool {
        self.geo.input.c / self.groups == 1 && self.geo.output.c > 1
    }

    /// Whether the products run without columns ([`ImplicitGemm`]).
    fn lowers_implicitly(&self) -> bool {
        self.implicit.is_some() && self.pad_value() == 0.0
    }

    /// The strides of the columns of one group as the `rows × kg` matrix of the products.
    fn col_strides(&self, rows: usize, kg: usize) -> Strides {
        if self.k_major() {
            Strides::transposed(Self::k_major_ld(rows))
        } else {
            Strides::row_major(kg)
        }
    }

    /// How far apart the kernel positions' rows of kernel-position-major columns are: `rows`
    /// rounded up to a multiple of 1,024, plus 16. With rows exactly `rows` apart (cnn-small: 50,176
    /// values, 49 × 4 KiB), the kernel positions' rows all start at the same offset within a
    /// 4 KiB page, so a product reading one value of each meets 4 KiB aliasing and one L1 set;
    /// 16 more put them 64 bytes apart within the page.
    fn k_major_ld(rows: usize) -> usize {
        rows.next_multiple_of(1024) + 16
    }

    /// Values of one group's columns: `kg` rows of [`Conv2d::k_major_ld`], or `rows × kg`.
    fn group_len(&self, rows: usize, kg: usize) -> usize {
        if self.k_major() {
            kg * Self::k_major_ld(rows)
        } else {
            rows * kg
        }
    }

    /// The output columns `ox` whose tap `kx` falls inside the input: `lo..hi`.
    fn inside_columns(&self, kx: usize) -> (usize, usize) {
        let geo = &self.geo;
        let (sw, left, off) = (geo.stride[1], geo.pad[1], kx * geo.dilation[1]);
        let ow = geo.output.w;
        // ix = ox·sw + off − left must be ≥ 0 and < w.
        let lo = left.saturating_sub(off).div_ceil(sw).min(ow);
        let hi = (geo.input.w + left).saturating_sub(off).div_ceil(sw).min(ow);
        (lo, hi.max(lo))
    }

    /// im2col of group `g` into `col` (`kg` rows of `rows` values, [`Conv2d::k_major_ld`] apart;
    /// [`Conv2d::k_major`]: one channel per group):
    /// for each kernel position, the input rows it reads, shifted, padded where outside.
    fn im2col_k_major(&self, x: &[f32], batch: usize, g: usize, col: &mut [f32]) {
        let geo = &self.geo;
        let (i, o) = (geo.input, geo.output);
        let rows = batch * o.h * o.w;
        let pad = self.pad_value();
        let step = geo.stride[1] * i.c;
        for ky in 0..geo.kernel[0] {
            for kx in 0..geo.kernel[1] {
                let k = ky * geo.kernel[1] + kx;
                let (lo, hi) = self.inside_columns(kx);
                let at = k * Self::k_major_ld(rows);
                let dst_k = &mut col[at..at + rows];
                for (r, dst) in dst_k.chunks_exact_mut(o.w).enumerate() {
                    let (b, oy) = (r / o.h, r % o.h);
                    let Some(iy) = self.source_row(oy, ky) else {
                        dst.fill(pad);
                        continue;
                    };
                    dst[..lo].fill(pad);
                    dst[hi..].fill(pad);
                    if lo == hi {
                        continue;
                    }
                    let ix = lo * geo.stride[1] + kx * geo.dilation[1] - geo.pad[1];
                    let at = b * i.len() + (iy * i.w + ix) * i.c + g;
                    if step == 1 {
                        dst[lo..hi].copy_from_slice(&x[at..at + hi - lo]);
                    } else {
                        for (j, d) in dst[lo..hi].iter_mut().enumerate() {
                            *d = x[at + j * step];
                        }
                    }
                }
            }
        }
    }

    /// col2im of group `g` from kernel-position-major columns ([`Conv2d::im2col_k_major`]).
    fn col2im_k_major(&self, dcol: &[f32], batch: usize, g: usize, dx: &mut [f32]) {
        let geo = &self.geo;
        let (i, o) = (geo.input, geo.output);
        let rows = batch * o.h * o.w;
        let step = geo.stride[1] * i.c;
        // Each input value receives its terms in the order `col2im` adds them, by output row
        // `oy` then output column `ox` (one kernel row `ky` reaches one input row from a given
        // `oy`; `ox` falls as `kx` grows, so `kx` runs backwards): the same sums, the same bits.
        for r in 0..batch * o.h {
            let (b, oy) = (r / o.h, r % o.h);
            for ky in 0..geo.kernel[0] {
                let Some(iy) = self.source_row(oy, ky) else { continue };
                for kx in (0..geo.kernel[1]).rev() {
                    let (lo, hi) = self.inside_columns(kx);
                    if lo == hi {
                        continue;
                    }
                    let k = ky * geo.kernel[1] + kx;
                    let at = k * Self::k_major_ld(rows) + r * o.w;
                    let src = &dcol[at..at + o.w];
                    let ix = lo * geo.stride[1] + kx * geo.dilation[1] - geo.pad[1];
                    let at = b * i.len() + (iy * i.w + ix) * i.c + g;
                    for (j, &s) in src[lo..hi].iter().enumerate() {
                        dx[at + j * step] += s;
                    }
                }
            }
        }
    }

    /// im2col of group `g` into `col` (`rows × kg`).
    fn im2col(&self, x: &[f32], batch: usize, g: usize, col: &mut [f32]) {
        let geo = &self.geo;
        let (i, o) = (geo.input, geo.output);
        let (_, kg, cg, _) = self.dims(batch);
        let pad = self.pad_value();
        let seg = geo.kernel[1] * cg;
        // A few values (the first layer's 1 channel): a plain loop, not a memmove call.
        let copy = |dst: &mut [f32], src: &[f32]| {
            if dst.len() < 16 {
                for (d, &v) in dst.iter_mut().zip(src) {
                    *d = v;
                }
            } else {
                dst.copy_from_slice(src);
            }
        };
        let mut rows = col.chunks_exact_mut(kg);
        for b in 0..batch {
            let xb = &x[b * i.len()..(b + 1) * i.len()];
            for oy in 0..o.h {
                for ox in 0..o.w {
                    let Some(row) = rows.next() else { return };
                    let whole = self.row_segment(ox, cg);
                    for ky in 0..geo.kernel[0] {
                        let kernel_row = &mut row[ky * seg..(ky + 1) * seg];
                        match (self.source_row(oy, ky), whole) {
                            (None, _) => kernel_row.fill(pad),
                            (Some(iy), Some(ix0)) => {
                                let at = (iy * i.w + ix0) * i.c;
                                copy(kernel_row, &xb[at..at + seg]);
                            }
                            (Some(_), None) => {
                                for kx in 0..geo.kernel[1] {
                                    let dst = &mut kernel_row[kx * cg..(kx + 1) * cg];
                                    match geo.source(oy, ox, ky, kx) {
                                        Some((iy, ix)) => {
                                            let at = (iy * i.w + ix) * i.c + g * cg;
                                            copy(dst, &xb[at..at + cg]);
                                        }
                                        None => dst.fill(pad),
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// col2im of group `g`: add `dcol` (`rows × kg`) back into `dx`.
    fn col2im(&self, dcol: &[f32], batch: usize, g: usize, dx: &mut [f32]) {
        let geo = &self.geo;
        let (i, o) = (geo.input, geo.output);
        let (_, kg, cg, _) = self.dims(batch);
        let seg = geo.kernel[1] * cg;
        let mut rows = dcol.chunks_exact(kg);
        for b in 0..batch {
            let dxb = &mut dx[b * i.len()..(b + 1) * i.len()];
            for oy in 0..o.h {
                for ox in 0..o.w {
                    let Some(row) = rows.next() else { return };
                    let whole = self.row_segment(ox, cg);
                    for ky in 0..geo.kernel[0] {
                        let Some(iy) = self.source_row(oy, ky) else { continue };
                        let kernel_row = &row[ky * seg..(ky + 1) * seg];
                        if let Some(ix0) = whole {
                            let at = (iy * i.w + ix0) * i.c;
                            for (d, &s) in dxb[at..at + seg].iter_mut().zip(kernel_row) {
                                *d += s;
                            }
                            continue;
                        }
                        for kx in 0..geo.kernel[1] {
                            if let Some((iy, ix)) = geo.source(oy, ox, ky, kx) {
                                let at = (iy * i.w + ix) * i.c + g * cg;
                                let src = &kernel_row[kx * cg..(kx + 1) * cg];
                                for (d, &s) in dxb[at..at + cg].iter_mut().zip(src) {
                                    *d += s;
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// Forward over `batch` samples (`x`: `batch·h·w·cin`, `y`: `batch·oh·ow·cout`).
    pub fn forward(&mut self, x: &[f32], y: &mut [f32], batch: usize, training: bool, logits: bool) {
        self.bias_deferred = false;
        self.forward_impl(x, y, None, batch, training, logits);
    }

    /// [`Conv2d::forward`] of a float convolution without its output stage ([`Epilogue::passthrough`])
    /// followed by a batch norm in training, without adding the bias: the batch norm adds it to
    /// each value it reads and sums its input gradient into the bias gradient
    /// (`BatchNorm::forward_through_pool`, `BatchNorm::backward_in_place_through_pool`), the
    /// operations of this layer's bias pass and bias-gradient pass, so the same bits, with one
    /// read and one write of the output less each way. The output buffer then holds the product
    /// without the bias. Returns whether it did so (else it ran [`Conv2d::forward`]).
    pub fn forward_bias_to_batch_norm(&mut self, x: &[f32], y: &mut [f32], batch: usize) -> bool {
        // Not a float product, or a bias on the accumulator grid (which the output stage would
        // round): the layer adds its own bias.
        let on_grid = self.input_scale.is_some() && self.wq.on_integer_grid();
        if !self.out.passthrough() || self.bn.is_some() || on_grid {
            self.forward(x, y, batch, true, false);
            return false;
        }
        self.bias_deferred = true;
        self.forward_impl(x, y, None, batch, true, false);
        true
    }

    /// Whether the last forward pass left the bias to the batch norm after this layer.
    pub fn bias_deferred(&self) -> bool {
        self.bias_deferred
    }

    /// [`Conv2d::forward`] followed by the 2×2/stride-2 max pooling `pool` (past the layers
    /// folded into this convolution), whose output goes to `pooled`. A folded batch norm whose
    /// output stage is a ReLU on a grid, in training, computes the batch norm, the stage and the
    /// pooling in one pass ([`FoldedBn::normalize_quant_pool`]) and leaves `y` unwritten;
    /// otherwise `y` is written and pooled. The bits are those of the two layers.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_through_pool(
        &mut self,
        x: &[f32],
        pool: &mut Pool2d,
        y: &mut [f32],
        pooled: &mut [f32],
        batch: usize,
        training: bool,
        logits: bool,
    ) {
        debug_assert!(pool.fast_2x2());
        self.bias_deferred = false;
        if !self.forward_impl(x, y, Some((&mut *pool, &mut *pooled)), batch, training, logits) {
            let n = batch * self.geo.output.len();
            pool.forward(&y[..n], pooled, batch);
        }
    }

    /// [`Conv2d::forward`], and the pooling's forward when given and fused (returns whether it
    /// did it).
    fn forward_impl(
        &mut self,
        x: &[f32],
        y: &mut [f32],
        pool: Option<(&mut Pool2d, &mut [f32])>,
        batch: usize,
        training: bool,
        logits: bool,
    ) -> bool {
        let (rows, kg, _, og) = self.dims(batch);
        let cout = self.geo.output.c;
        let n = rows * cout;
        let implicit = self.lowers_implicitly();
        let glen = self.group_len(rows, kg);
        if !implicit && self.col.len() < self.groups * glen {
            self.col.resize(self.groups * glen, 0.0);
        }
        let mut bn = self.bn.take();
        match bn.as_deref_mut() {
            Some(f) => {
                f.fold_weights(&self.weight.value);
                self.wq.quantize(&f.w_fold);
            }
            None => self.wq.quantize(&self.weight.value),
        }
        let mut col = std::mem::take(&mut self.col);
        if !implicit {
            for g in 0..self.groups {
                let col_g = &mut col[g * glen..(g + 1) * glen];
                if self.k_major() {
                    self.im2col_k_major(x, batch, g, col_g);
                } else {
                    self.im2col(x, batch, g, col_g);
                }
            }
        }
        // Evaluation of a folded layer is the deployed layer: `col·Ŵ' + b_f` into the output
        // stage, the folded bias on the accumulator grid ([`FoldedBn::fold`]). A batch norm kept
        // after a binary kernel runs in evaluation too, on its running statistics.
        let cs = self.col_strides(rows, kg);
        let train_bn = bn.as_deref().is_some_and(|f| f.runs_batch_norm(training));
        let (kernel, z): (&[f32], &mut [f32]) = match bn.as_deref_mut() {
            Some(f) if train_bn => f.kernel_and_product(n),
            Some(f) => (&f.w_fold, self.out.product_target(y, n)),
            None => (&self.weight.value, self.out.product_target(y, n)),
        };
        let w = self.wq.weights(kernel);
        match self.implicit.as_deref_mut() {
            Some(imp) if implicit => imp.forward(&self.geo, x, w, z, batch),
            _ => {
                for g in 0..self.groups {
                    // z[:, g·og..] (row stride cout) = col_g (rows × kg) · Ŵ[:, g·og..] (row stride cout).
                    matmul_strided(
                        rows,
                        og,
                        kg,
                        &col[g * glen..],
                        cs,
                        &w[g * og..],
                        Strides::row_major(cout),
                        &mut z[g * og..],
                        Strides::row_major(cout),
                        false,
                    );
                }
            }
        }
        self.col = col;
        let mut pooled = false;
        match bn.as_deref_mut() {
            Some(f) if train_bn => {
                // Batch norm between the product and the output stage (whose bias is 0).
                f.statistics(&self.bias.value, n, training);
                if let Some((pool, out)) = pool {
                    let f = &*f;
                    pooled = self.out.forward_pooled(
                        &f.zero_bias,
                        &self.wq,
                        self.input_scale,
                        n,
                        training,
                        |bias, lo, hi, grid| f.normalize_quant_pool(bias, lo, hi, grid, pool, out, n),
                    );
                }
                if !pooled {
                    f.bn.normalize_into(&f.z[..n], self.out.product_target(y, n), n);
                    self.out
                        .forward(&f.zero_bias, &self.wq, self.input_scale, y, n, training, logits);
                }
            }
            Some(f) => {
                let b = f.folded_bias(&self.bias.value);
                self.out.forward(b, &self.wq, self.input_scale, y, n, training, logits);
            }
            None if self.bias_deferred => self.out.forward_without_bias(n, training),
            None => self
                .out
                .forward(&self.bias, &self.wq, self.input_scale, y, n, training, logits),
        }
        self.bn = bn;
        pooled
    }

    /// Backward: parameter gradients, and `dx` when given.
    pub fn backward(&mut self, x: &[f32], dy: &[f32], dx: Option<&mut [f32]>, batch: usize) {
        self.backward_from(x, Upstream::Full(dy), dx, batch);
    }

    /// [`Conv2d::backward`] of a convolution followed by a 2×2/stride-2 max pooling (past the
    /// layers folded into it), whose backward it does too, where
    /// [`Epilogue::backward_reads_pooled`]: after a fused forward pass
    /// ([`Conv2d::forward_through_pool`]) the folded batch norm's fused passes
    /// ([`FoldedBn::backward_through_pool`]), otherwise the output stage reading the pooled
    /// gradient ([`Epilogue::backward_pooled`]).
    pub fn backward_through_pool(&mut self, x: &[f32], pooled: PooledGrad, dx: Option<&mut [f32]>, batch: usize) {
        self.backward_from(x, Upstream::Pooled(pooled), dx, batch);
    }

    fn backward_from(&mut self, _x: &[f32], up: Upstream, mut dx: Option<&mut [f32]>, batch: usize) {
        let (rows, kg, _, og) = self.dims(batch);
        let cout = self.geo.output.c;
        let n = rows * cout;
        let features = self.geo.output.len();
        // A pooled gradient only reaches a stage with its own `z` (not a passthrough, which would
        // read `dy` itself below).
        let dy: &[f32] = match up {
            Upstream::Full(dy) => dy,
            Upstream::Pooled(_) => &[],
        };
        let out_backward = |out: &mut Epilogue, bias: &mut Param| match up {
            Upstream::Full(dy) => out.backward(dy, bias, n, features),
            Upstream::Pooled(p) => out.backward_pooled(p, bias, n, features),
        };
        let mut bn = self.bn.take();
        let fused = self.out.z_left_to_layer();
        // After a fused forward pass the stage's `z` was not stored: only the fused backward
        // (through the pooling, as the model calls it) can follow.
        assert!(
            !fused || matches!(up, Upstream::Pooled(_)),
            "layer {}: a forward pass fused with the pooling after it needs the backward through that pooling",
            self.index
        );
        if let (Some(f), Upstream::Pooled(p), true) = (bn.as_deref_mut(), up, fused) {
            // After the fused forward pass: the output stage's backward, the batch norm's and the
            // unfold's in two passes, `∂L/∂(col·Ŵ')` into the stage's gradient buffer.
            let stage = self.out.pooled_backward_parts(n);
            let ds = f.backward_through_pool(stage, p, &self.bias.value, &mut self.bias.grad, n);
            self.out.set_step_grad(ds, features);
        } else if let Some(f) = bn.as_deref_mut() {
            // ∂L/∂(col·Ŵ') in the output stage's gradient buffer (in place), or in the folded
            // batch norm's own when the stage passes `dy` through.
            out_backward(&mut self.out, &mut f.zero_bias);
            match self.out.dz_mut(n) {
                Some(g) => f.backward_in_place(g, &self.bias.value, &mut self.bias.grad, n),
                None => f.backward(dy, &self.bias.value, &mut self.bias.grad, n),
            }
        } else if !self.bias_deferred {
            out_backward(&mut self.out, &mut self.bias);
        }
        let dz = match bn.as_deref() {
            Some(f) if self.out.passthrough() => f.product_grad(n),
            _ => self.out.dz(dy, n),
        };
        let (groups, col) = (self.groups, &self.col);
        let cs = self.col_strides(rows, kg);
        let glen = self.group_len(rows, kg);
        let implicit = self.lowers_implicitly();
        let mut imp = self.implicit.take();
        if let (true, Some(imp)) = (implicit, imp.as_deref_mut()) {
            imp.load_output_grad(&self.geo, dz, batch);
        }
        let geo = &self.geo;
        self.wq.backward(&mut self.weight, |gw| {
            if let (true, Some(imp)) = (implicit, imp.as_deref()) {
                imp.weight_grad(geo, gw, batch);
                return;
            }
            for g in 0..groups {
                // dŴ[:, g·og..] = col_gᵀ (kg × rows) · dz[:, g·og..].
                matmul_strided(
                    kg,
                    og,
                    rows,
                    &col[g * glen..],
                    Strides { rs: cs.cs, cs: cs.rs },
                    &dz[g * og..],
                    Strides::row_major(cout),
                    &mut gw[g * og..],
                    Strides::row_major(cout),
                    false,
                );
            }
        });
        if let Some(f) = bn.as_deref_mut() {
            f.weight_grad(&mut self.weight);
        }
        let dz = match bn.as_deref() {
            Some(f) if self.out.passthrough() => f.product_grad(n),
            _ => self.out.dz(dy, n),
        };
        if let (true, Some(dx), Some(imp)) = (implicit, dx.as_deref_mut(), imp.as_deref_mut()) {
            let w = self.wq.weights(match bn.as_deref() {
                Some(f) => &f.w_fold,
                None => &self.weight.value,
            });
            imp.input_grad(&self.geo, w, dx, batch);
        }
        self.implicit = imp;
        if let (false, Some(dx)) = (implicit, dx) {
            dx.fill(0.0);
            // The columns are not needed any more (the weight gradient is done): their buffer
            // takes `∂L/∂col` (one buffer of the layer's largest size instead of two: for
            // cnn-small's two replicas, 29 MB).
            let mut dcol = std::mem::take(&mut self.col);
            let w = self.wq.weights(match bn.as_deref() {
                Some(f) => &f.w_fold,
                None => &self.weight.value,
            });
            for g in 0..self.groups {
                // dcol_g (rows × kg) = dz[:, g·og..] · Ŵ[:, g·og..]ᵀ.
                matmul_strided(
                    rows,
                    kg,
                    og,
                    &dz[g * og..],
                    Strides::row_major(cout),
                    &w[g * og..],
                    Strides::transposed(cout),
                    &mut dcol[..glen],
                    cs,
                    false,
                );
                if self.k_major() {
                    self.col2im_k_major(&dcol[..glen], batch, g, dx);
                } else {
                    self.col2im(&dcol[..glen], batch, g, dx);
                }
            }
            self.col = dcol;
        }
        self.bn = bn;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Geometries with one input channel per group (the kernel-position-major layout): strides,
    /// dilations, asymmetric padding, a kernel wider than the input, depthwise groups.
    fn one_channel_geometries() -> Vec<(Shape, Conv2dConfig)> {
        let cfg = |filters, kernel, stride, dilation, groups, padding| Conv2dConfig {
            filters,
            kernel,
            stride,
            dilation,
            groups,
            padding,
        };
        vec![
            (Shape::new(28, 28, 1), cfg(32, [3, 3], [1, 1], [1, 1], 1, Padding::Same)),
            (
                Shape::new(7, 9, 1),
                cfg(5, [3, 4], [1, 2], [1, 2], 1, Padding::Explicit([2, 3, 0, 1])),
            ),
            (
                Shape::new(5, 7, 3),
                cfg(6, [3, 3], [1, 1], [1, 1], 3, Padding::Explicit([0, 2, 1, 0])),
            ),
            (Shape::new(6, 6, 4), cfg(4, [3, 3], [2, 2], [1, 1], 4, Padding::Same)),
            (Shape::new(3, 2, 1), cfg(2, [1, 5], [1, 1], [1, 1], 1, Padding::Same)),
        ]
    }

    /// The kernel-position-major columns are the row-major ones transposed, value for value,
    /// and col2im from them adds the same terms in the same order: `dx` bit for bit.
    #[test]
    fn k_major_columns_are_the_row_major_ones_transposed() {
        let mut rng = Rng::new(7, 0);
        for (shape, cfg) in one_channel_geometries() {
            let c = Conv2d::new(0, shape, cfg, Activation::Linear, &mut rng).unwrap();
            assert!(c.k_major(), "{shape} {cfg:?}");
            let batch = 3;
            let (rows, kg, _, _) = c.dims(batch);
            let ld = Conv2d::k_major_ld(rows);
            let x: Vec<f32> = (0..batch * shape.len()).map(|_| rng.uniform_range(-1.0, 1.0)).collect();
            // Values of very different magnitudes, so that another order of the sums shows.
            let dcol: Vec<f32> = (0..rows * kg)
                .map(|i| rng.uniform_range(-1.0, 1.0) * [1.0, 1e4, 1e-4][i % 3])
                .collect();
            for g in 0..c.groups {
                let mut by_row = vec![f32::NAN; rows * kg];
                let mut by_k = vec![f32::NAN; c.group_len(rows, kg)];
                c.im2col(&x, batch, g, &mut by_row);
                c.im2col_k_major(&x, batch, g, &mut by_k);
                for r in 0..rows {
                    for k in 0..kg {
                        assert_eq!(
                            by_row[r * kg + k].to_bits(),
                            by_k[k * ld + r].to_bits(),
                            "{shape} {cfg:?} r {r} k {k}"
                        );
                    }
                }
                let mut dcol_k = vec![f32::NAN; c.group_len(rows, kg)];
                for r in 0..rows {
                    for k in 0..kg {
                        dcol_k[k * ld + r] = dcol[r * kg + k];
                    }
                }
                let (mut dx_row, mut dx_k) = (vec![0.0; x.len()], vec![0.0; x.len()]);
                c.col2im(&dcol, batch, g, &mut dx_row);
                c.col2im_k_major(&dcol_k, batch, g, &mut dx_k);
                for (i, (a, b)) in dx_row.iter().zip(&dx_k).enumerate() {
                    assert_eq!(a.to_bits(), b.to_bits(), "{shape} {cfg:?} dx[{i}]: {a} vs {b}");
                }
            }
        }
    }
}
