//! Pooling over NHWC activations: `MaxPool2d`, `AvgPool2d` (Keras `MaxPooling2D`,
//! `AveragePooling2D`) and `GlobalAvgPool` (Keras `GlobalAveragePooling2D`).
//!
//! Max pooling ignores padded positions (PyTorch's −∞ padding); average pooling averages the
//! positions inside the input only (`count_include_pad = False`, Keras's `same`). Max pooling
//! keeps the input's quantization grid (max commutes with a monotone quantizer), so the integer
//! model pools the u8 codes directly.

use super::conv2d::{Geometry, Padding};
use super::Shape;
use crate::error::Result;

/// Which reduction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoolKind {
    /// Largest value of the window.
    Max,
    /// Mean of the window's positions inside the input.
    Avg,
}

/// A pooling window sliding over the spatial dimensions.
#[derive(Clone, Debug)]
pub struct Pool2d {
    /// Max or average.
    pub kind: PoolKind,
    /// Shapes, window, stride, padding.
    pub geo: Geometry,
    argmax: Vec<u32>,
}

impl Pool2d {
    /// A pooling layer at `index` for `input`.
    pub fn new(
        index: usize,
        kind: PoolKind,
        input: Shape,
        size: [usize; 2],
        stride: [usize; 2],
        padding: Padding,
    ) -> Result<Self> {
        let geo = Geometry::new(index, input, input.c, size, stride, [1, 1], padding)?;
        Ok(Pool2d {
            kind,
            geo,
            argmax: Vec::new(),
        })
    }

    /// Forward over `batch` samples; max pooling remembers where each maximum came from.
    pub fn forward(&mut self, x: &[f32], y: &mut [f32], batch: usize) {
        let (i, o) = (self.geo.input, self.geo.output);
        let c = i.c;
        if self.kind == PoolKind::Max && self.argmax.len() < batch * o.len() {
            self.argmax.resize(batch * o.len(), 0);
        }
        if self.fast_2x2() {
            max_2x2(x, y, &mut self.argmax, self.geo.input, self.geo.output, batch);
            return;
        }
        for b in 0..batch {
            let xb = &x[b * i.len()..(b + 1) * i.len()];
            for oy in 0..o.h {
                for ox in 0..o.w {
                    let at = b * o.len() + (oy * o.w + ox) * c;
                    let out = &mut y[at..at + c];
                    match self.kind {
                        PoolKind::Max => {
                            let arg = &mut self.argmax[at..at + c];
                            out.fill(f32::NEG_INFINITY);
                            for ky in 0..self.geo.kernel[0] {
                                for kx in 0..self.geo.kernel[1] {
                                    if let Some((iy, ix)) = self.geo.source(oy, ox, ky, kx) {
                                        let src = (iy * i.w + ix) * c;
                                        let row = &xb[src..src + c];
                                        // `>` keeps the first maximum (ties, as PyTorch); written
                                        // as selects so the channel loop vectorises.
                                        for (ch, ((o, a), &v)) in
                                            out.iter_mut().zip(arg.iter_mut()).zip(row).enumerate()
                                        {
                                            let take = v > *o;
                                            *o = if take { v } else { *o };
                                            *a = if take { (src + ch) as u32 } else { *a };
                                        }
                                    }
                                }
                            }
                        }
                        PoolKind::Avg => {
                            out.fill(0.0);
                            let mut n = 0usize;
                            for ky in 0..self.geo.kernel[0] {
                                for kx in 0..self.geo.kernel[1] {
                                    if let Some((iy, ix)) = self.geo.source(oy, ox, ky, kx) {
                                        n += 1;
                                        let src = (iy * i.w + ix) * c;
                                        for (d, &v) in out.iter_mut().zip(&xb[src..src + c]) {
                                            *d += v;
                                        }
                                    }
                                }
                            }
                            let inv = 1.0 / n.max(1) as f32;
                            out.iter_mut().for_each(|v| *v *= inv);
                        }
                    }
                }
            }
        }
    }

    /// 2×2 max pooling with stride 2 and no padding (cnn-small's, LeNet's): the windows tile
    /// the input, so the passes [`max_2x2`] and [`max_2x2_backward`] visit each input once.
    pub fn fast_2x2(&self) -> bool {
        self.kind == PoolKind::Max && self.geo.kernel == [2, 2] && self.geo.stride == [2, 2] && self.geo.pad == [0; 4]
    }

    /// The 2×2 windows of [`Pool2d::fast_2x2`], for a layer that does this pooling's passes.
    pub fn grid(&self) -> PoolGrid {
        let (i, o) = (self.geo.input, self.geo.output);
        PoolGrid {
            h: i.h,
            w: i.w,
            oh: o.h,
            ow: o.w,
        }
    }

    /// Max pooling: for each output value of the last forward pass, the offset (within its
    /// sample) of the input value it took.
    pub fn argmax(&self) -> &[u32] {
        &self.argmax
    }

    /// [`Pool2d::argmax`] for a forward pass over `batch` samples computed by the layer before
    /// (a batch norm that pools its own output: `BatchNorm::forward_through_pool`).
    pub fn argmax_mut(&mut self, batch: usize) -> &mut [u32] {
        let n = batch * self.geo.output.len();
        if self.argmax.len() < n {
            self.argmax.resize(n, 0);
        }
        &mut self.argmax[..n]
    }

    /// Backward: the gradient goes to the maximum (max) or is shared by the window (avg).
    pub fn backward(&self, dy: &[f32], dx: &mut [f32], batch: usize) {
        let (i, o) = (self.geo.input, self.geo.output);
        let c = i.c;
        if self.fast_2x2() {
            max_2x2_backward(dy, &self.argmax, dx, i, o, batch);
            return;
        }
        dx.fill(0.0);
        for b in 0..batch {
            let dxb = &mut dx[b * i.len()..(b + 1) * i.len()];
            for oy in 0..o.h {
                for ox in 0..o.w {
                    let at = b * o.len() + (oy * o.w + ox) * c;
                    let g = &dy[at..at + c];
                    match self.kind {
                        PoolKind::Max => {
                            for (&src, &gv) in self.argmax[at..at + c].iter().zip(g) {
                                dxb[src as usize] += gv;
                            }
                        }
                        PoolKind::Avg => {
                            let taps = || {
                                (0..self.geo.kernel[0])
                                    .flat_map(|ky| (0..self.geo.kernel[1]).map(move |kx| (ky, kx)))
                                    .filter_map(|(ky, kx)| self.geo.source(oy, ox, ky, kx))
                            };
                            let inv = 1.0 / taps().count().max(1) as f32;
                            for (iy, ix) in taps() {
                                let src = (iy * i.w + ix) * c;
                                for (d, &gv) in dxb[src..src + c].iter_mut().zip(g) {
                                    *d += gv * inv;
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// `[h, w, c] → [1, 1, c]`: the mean over all positions of each channel.
#[derive(Clone, Debug)]
pub struct GlobalAvgPool {
    /// Input shape.
    pub input: Shape,
}

impl GlobalAvgPool {
    /// Forward over `batch` samples.
    pub fn forward(&self, x: &[f32], y: &mut [f32], batch: usize) {
        let (hw, c) = (self.input.h * self.input.w, self.input.c);
        let inv = 1.0 / hw as f32;
        for b in 0..batch {
            let out = &mut y[b * c..(b + 1) * c];
            out.fill(0.0);
            for px in x[b * hw * c..(b + 1) * hw * c].chunks_exact(c) {
                for (d, &v) in out.iter_mut().zip(px) {
                    *d += v;
                }
            }
            out.iter_mut().for_each(|v| *v *= inv);
        }
    }

    /// Backward: each position gets `dy/(h·w)`.
    pub fn backward(&self, dy: &[f32], dx: &mut [f32], batch: usize) {
        let (hw, c) = (self.input.h * self.input.w, self.input.c);
        let inv = 1.0 / hw as f32;
        for b in 0..batch {
            let g = &dy[b * c..(b + 1) * c];
            for px in dx[b * hw * c..(b + 1) * hw * c].chunks_exact_mut(c) {
                for (d, &gv) in px.iter_mut().zip(g) {
                    *d = gv * inv;
                }
            }
        }
    }
}

crate::simd::widest! {
    /// The common 2×2, stride 2, unpadded max pool from `i` to `o`: the four taps of a window are
    /// fixed offsets, and the channel loop is branch-free (selects) so it vectorises. Same results
    /// as the general path (the first maximum wins ties, in tap order). Compiled for the widest
    /// instruction set (`crate::simd`): in the baseline SSE2 build the index selects became
    /// scalar stores, and max pooling was 9.9 % of a cnn-small epoch's samples (3.0 % now).
    fn max_2x2(x: &[f32], y: &mut [f32], argmax: &mut [u32], i: Shape, o: Shape, batch: usize) {
        let c = i.c;
        for b in 0..batch {
            let xb = &x[b * i.len()..(b + 1) * i.len()];
            for oy in 0..o.h {
                for ox in 0..o.w {
                    let at = b * o.len() + (oy * o.w + ox) * c;
                    let s00 = (2 * oy * i.w + 2 * ox) * c;
                    let taps = [s00, s00 + c, s00 + i.w * c, s00 + i.w * c + c];
                    let (out, arg) = (&mut y[at..at + c], &mut argmax[at..at + c]);
                    out.copy_from_slice(&xb[taps[0]..taps[0] + c]);
                    for (ch, a) in arg.iter_mut().enumerate() {
                        *a = (taps[0] + ch) as u32;
                    }
                    for &t in &taps[1..] {
                        for (ch, ((o, a), &v)) in out.iter_mut().zip(arg.iter_mut()).zip(&xb[t..t + c]).enumerate() {
                            let take = v > *o;
                            *o = if take { v } else { *o };
                            *a = if take { (t + ch) as u32 } else { *a };
                        }
                    }
                }
            }
        }
    }
}

crate::simd::widest! {
    /// Backward of [`max_2x2`]: each input position of a window receives the window's gradient if
    /// it was the maximum, else 0. One write per input position (the windows tile the input),
    /// instead of clearing `dx` and adding into it: the same values (written as `0 + g`).
    fn max_2x2_backward(dy: &[f32], argmax: &[u32], dx: &mut [f32], i: Shape, o: Shape, batch: usize) {
        let c = i.c;
        for b in 0..batch {
            let dxb = &mut dx[b * i.len()..(b + 1) * i.len()];
            if i.h != 2 * o.h || i.w != 2 * o.w {
                // An odd last row or column is in no window: its gradient is 0.
                dxb.fill(0.0);
            }
            for oy in 0..o.h {
                for ox in 0..o.w {
                    let at = b * o.len() + (oy * o.w + ox) * c;
                    let s00 = (2 * oy * i.w + 2 * ox) * c;
                    let (g, arg) = (&dy[at..at + c], &argmax[at..at + c]);
                    for t in [s00, s00 + c, s00 + i.w * c, s00 + i.w * c + c] {
                        for (ch, ((d, &g), &a)) in dxb[t..t + c].iter_mut().zip(g).zip(arg).enumerate() {
                            // `0.0 + g`: the value the cleared-and-added form gave (+0 for a −0 gradient).
                            *d = if a == (t + ch) as u32 { 0.0 + g } else { 0.0 };
                        }
                    }
                }
            }
        }
    }
}

/// The windows of a 2×2/stride-2 max pooling, for a layer before it that does its forward or
/// backward pass (`BatchNorm::forward_through_pool`, `BatchNorm::backward_in_place_through_pool`,
/// `Epilogue::backward_pooled`): the pooling's input `[h, w]` and output `[oh, ow]` per sample.
#[derive(Clone, Copy, Debug)]
pub struct PoolGrid {
    pub(crate) h: usize,
    pub(crate) w: usize,
    pub(crate) oh: usize,
    pub(crate) ow: usize,
}

impl PoolGrid {
    /// The window of row `r` (sample, y, x) as `(offset of its pooled row, offset of this row
    /// within its sample)` in values of `c` channels, and whether any window holds the row (an
    /// odd last row or column is in none).
    #[inline(always)]
    pub(crate) fn source(&self, r: usize, c: usize) -> (usize, u32, bool) {
        let hw = self.h * self.w;
        let (b, p) = (r / hw, r % hw);
        let (y, x) = (p / self.w, p % self.w);
        let (wy, wx) = (y / 2, x / 2);
        let inside = wy < self.oh && wx < self.ow;
        let win = if inside { (b * self.oh + wy) * self.ow + wx } else { 0 };
        (win * c, (p * c) as u32, inside)
    }
}

/// The gradient of one input value of the pooling: the window's gradient if this value was its
/// maximum (`argmax` holds its offset in the sample), else 0, as [`max_2x2_backward`] writes it.
#[inline(always)]
pub(crate) fn from_pool(dp: f32, arg: u32, at: u32, inside: bool) -> f32 {
    if inside && arg == at {
        0.0 + dp
    } else {
        0.0
    }
}

/// The gradient of a 2×2/stride-2 max pooling's input, given as the pooled gradient and the
/// pooling's argmax, for the layer before the pooling to read in its own backward pass
/// ([`from_pool`] per value) instead of a full-size buffer the pooling would write first.
#[derive(Clone, Copy, Debug)]
pub struct PooledGrad<'a> {
    /// `∂L/∂(pooled output)`.
    pub dpool: &'a [f32],
    /// [`Pool2d::argmax`].
    pub argmax: &'a [u32],
    /// [`Pool2d::grid`].
    pub grid: PoolGrid,
}
