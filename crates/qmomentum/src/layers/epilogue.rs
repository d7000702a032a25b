//! What follows a layer's matrix product, `y = q_a(f(z + b̂))`, and its backward pass: the bias
//! (on the accumulator grid `s_in·s_w` when the weights are integer, as the integer runtime adds
//! it), the activation (or a sign for 1-bit outputs), the batch range statistics and the output
//! fake quantization ([`ActFakeQuant`]).
//!
//! Shared by every layer whose output is `[rows, channels]`: a dense layer (rows = samples) and a
//! convolution in NHWC (rows = samples × output positions). Element-wise work is fused: bias,
//! activation, statistics and (for ReLU and linear outputs) fake quantization are one pass over
//! the product, and the backward pass folds the STE mask, the activation derivative and the bias
//! gradient into one; it can read `∂L/∂y` through a 2×2 max pooling after the layer
//! ([`Epilogue::backward_pooled`]).

use super::activation::{softmax_rows, Activation};
use super::param::Param;
use super::pool::{from_pool, PooledGrad};
use crate::quant::act::{ActFakeQuant, BatchStats, Grid, Ste};
use crate::quant::affine::bias_on_grid;
use crate::quant::binary::sign;
use crate::quant::observer::lsq_grad;
use crate::quant::weight::WeightFakeQuant;

/// What [`Epilogue::pooled_backward_parts`] gives a layer's fused backward pass.
pub(crate) struct PooledBackward<'a> {
    /// The buffer for `∂L/∂z`.
    pub(crate) dz: &'a mut [f32],
    /// The bias the forward pass added after the layer's own output.
    pub(crate) bias: &'a [f32],
    /// The straight-through estimator of the forward pass's grid.
    pub(crate) ste: Ste,
    /// A ReLU (else a linear output).
    pub(crate) relu: bool,
    /// LSQ's per-channel sums of `g·∂v̂/∂s`.
    pub(crate) ds_col: &'a mut [f32],
}

/// The output stage of a layer with `channels` outputs per row.
#[derive(Clone, Debug)]
pub struct Epilogue {
    /// Activation applied after the bias.
    pub activation: Activation,
    /// Output quantization.
    pub act: ActFakeQuant,
    channels: usize,
    /// The pre-activation `z + b̂` after the forward pass; `∂L/∂z` after the backward pass, which
    /// overwrites it (nothing reads `z` after its own element's gradient: one buffer for both,
    /// for cnn-small's two QAT replicas 19 MB less). After [`Epilogue::forward_pooled`], which
    /// stores no `z`, only the layer's fused backward pass writes it.
    z: Vec<f32>,
    b_hat: Vec<f32>,
    ds_col: Vec<f32>,
    lo_col: Vec<f32>,
    hi_col: Vec<f32>,
    /// The last forward pass was [`Epilogue::forward_pooled`]: `z` was not stored.
    z_left_to_layer: bool,
}

impl Epilogue {
    /// A float output stage.
    pub fn new(channels: usize, activation: Activation) -> Self {
        Epilogue {
            activation,
            act: ActFakeQuant::default(),
            channels,
            z: Vec::new(),
            b_hat: vec![0.0; channels],
            ds_col: vec![0.0; channels],
            lo_col: vec![0.0; channels],
            hi_col: vec![0.0; channels],
            z_left_to_layer: false,
        }
    }

    /// Whether `y = z + b` exactly: a linear activation and float outputs (a convolution before
    /// batch norm, say). Then the product is written straight into `y`, `∂L/∂z = ∂L/∂y`, and no
    /// copy of `z` or `∂L/∂z` is kept (for cnn-small's two replicas: 38 MB).
    pub fn passthrough(&self) -> bool {
        self.activation == Activation::Linear && self.act.quant.is_none()
    }

    /// The buffer the matrix product writes `z` into (`n` values): `y` itself when
    /// [`Epilogue::passthrough`], else a buffer of this stage (grown once).
    pub fn product_target<'a>(&'a mut self, y: &'a mut [f32], n: usize) -> &'a mut [f32] {
        if self.passthrough() {
            return &mut y[..n];
        }
        if self.z.len() < n {
            self.z.resize(n, 0.0);
        }
        &mut self.z[..n]
    }

    /// `∂L/∂z` of the last backward pass from `dy` (which it is, when [`Epilogue::passthrough`]).
    pub fn dz<'a>(&'a self, dy: &'a [f32], n: usize) -> &'a [f32] {
        if self.passthrough() {
            &dy[..n]
        } else {
            &self.z[..n]
        }
    }

    /// `∂L/∂z` of the last backward pass, writable (a layer may rewrite it in place into the
    /// gradient of what precedes this stage), or `None` when [`Epilogue::passthrough`] (then
    /// `∂L/∂z` is the caller's read-only `dy`).
    pub fn dz_mut(&mut self, n: usize) -> Option<&mut [f32]> {
        if self.passthrough() {
            None
        } else {
            Some(&mut self.z[..n])
        }
    }

    /// Forward over the `n = rows·channels` values in [`Epilogue::product_target`], writing `y`.
    /// `input_scale` is the grid of the layer's input (`s_in`); `training` records the range
    /// statistics; `logits` leaves a final softmax to the loss.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &mut self,
        bias: &Param,
        wq: &WeightFakeQuant,
        input_scale: Option<f32>,
        y: &mut [f32],
        n: usize,
        training: bool,
        logits: bool,
    ) {
        self.z_left_to_layer = false;
        let bias: &[f32] = if bias_on_stage_grid(&mut self.b_hat, bias, wq, input_scale) {
            &self.b_hat
        } else {
            &bias.value
        };
        if self.passthrough() {
            // The product is in `y` already: add the bias (no statistics: no observer).
            add_rows(&mut y[..n], bias);
            self.forward_without_bias(n, training);
            return;
        }
        // Pass 1: bias + activation (+ range statistics).
        let act = self.activation;
        let sign_out = self.act.sign();
        let c = self.channels;
        let (mut lo, mut hi, mut sum_abs) = (f32::INFINITY, f32::NEG_INFINITY, 0.0f64);
        // Statistics only feed an observer: a float layer skips them (the f64 sum is a serial
        // chain that would dominate this pass).
        let stats = training && self.act.observer.is_some();
        // Σ|a| is read once, to start an LSQ step (`ActObserver::observe`): only then is the
        // serial f64 chain paid. Otherwise the range is kept per channel (`lo_col`, `hi_col`),
        // so the pass vectorises; min and max are exact, so the reduction order changes nothing.
        let sum_needed = self
            .act
            .observer
            .as_ref()
            .is_some_and(|o| o.observer == crate::quant::observer::Observer::Lsq && !o.initialized);
        let mut quantized = false;
        if stats && !sum_needed {
            let (lo_col, hi_col) = (&mut self.lo_col[..c], &mut self.hi_col[..c]);
            lo_col.fill(f32::INFINITY);
            hi_col.fill(f32::NEG_INFINITY);
            let z = &mut self.z[..n];
            // A ReLU or linear output is fake-quantized in this pass too (the grid is the one
            // observed before this batch; the range is of the values before quantization).
            let grid = matches!((sign_out, act), (false, Activation::Relu | Activation::Linear))
                .then(|| self.act.grid())
                .flatten();
            quantized = grid.is_some();
            match (sign_out, act, grid) {
                (false, Activation::Relu, Some(g)) => range_quant_pass_relu(z, y, bias, lo_col, hi_col, g),
                (false, Activation::Linear, Some(g)) => range_quant_pass_linear(z, y, bias, lo_col, hi_col, g),
                (false, Activation::Relu, None) => range_pass_relu(z, y, bias, lo_col, hi_col),
                (false, Activation::Linear, None) => range_pass_linear(z, y, bias, lo_col, hi_col),
                _ => range_pass(
                    z,
                    y,
                    bias,
                    lo_col,
                    hi_col,
                    |z| if sign_out { sign(z) } else { act.forward(z) },
                    |a| a,
                ),
            }
            lo = lo_col.iter().fold(lo, |m, &v| m.min(v));
            hi = hi_col.iter().fold(hi, |m, &v| m.max(v));
        }
        let plain = !stats && !sign_out && matches!(act, Activation::Relu | Activation::Linear | Activation::Softmax);
        if plain {
            // A float output (or evaluation): bias and activation, vectorised (the loop below
            // would test the activation per value).
            let (z, y) = (&mut self.z[..n], &mut y[..n]);
            if act == Activation::Relu {
                range_free_pass_relu(z, y, bias);
            } else {
                range_free_pass_linear(z, y, bias);
            }
        }
        for (zr, yr) in self.z[..n].chunks_exact_mut(c).zip(y[..n].chunks_exact_mut(c)) {
            if (stats && !sum_needed) || plain {
                break;
            }
            if stats {
                for ((z, yv), &b) in zr.iter_mut().zip(yr.iter_mut()).zip(bias) {
                    *z += b;
                    let a = if sign_out { sign(*z) } else { act.forward(*z) };
                    lo = lo.min(a);
                    hi = hi.max(a);
                    sum_abs += a.abs() as f64;
                    *yv = a;
                }
            } else {
                for ((z, yv), &b) in zr.iter_mut().zip(yr.iter_mut()).zip(bias) {
                    *z += b;
                    *yv = if sign_out { sign(*z) } else { act.forward(*z) };
                }
            }
        }
        if act == Activation::Softmax && !logits && !sign_out {
            softmax_rows(&mut y[..n], c);
        }
        if training {
            self.act.stats = BatchStats {
                lo,
                hi,
                sum_abs,
                count: n as u64,
            };
        }
        // Pass 2: fake quantization of the outputs (unless pass 1 did it).
        if !quantized {
            self.act.apply(&mut y[..n]);
        }
    }

    /// [`Epilogue::forward`] by a pass of the layer's own, where that pass can do this stage's
    /// work with the layer's (QAT's folded batch norm with the 2×2 max pooling after it:
    /// `FoldedBn::normalize_quant_pool`): a ReLU output on a grid in training, with its range
    /// statistics (not a sign, not LSQ's first batch). Then `pass`
    /// gets the bias as [`Epilogue::forward`] adds it, the per-channel range to update and the
    /// grid, and this returns `true`; otherwise it does nothing and returns `false` (call
    /// [`Epilogue::forward`]). The pre-activation `z` is not stored: the layer's backward pass
    /// recomputes it ([`Epilogue::pooled_backward_parts`] gives it this bias again).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn forward_pooled(
        &mut self,
        bias: &Param,
        wq: &WeightFakeQuant,
        input_scale: Option<f32>,
        n: usize,
        training: bool,
        pass: impl FnOnce(&[f32], &mut [f32], &mut [f32], Grid),
    ) -> bool {
        // No observer (a float stage), or LSQ's first batch, which needs Σ|a|
        // (`Epilogue::forward`): this pass takes neither case.
        let no_grid_or_lsq_start = self
            .act
            .observer
            .as_ref()
            .is_none_or(|o| o.observer == crate::quant::observer::Observer::Lsq && !o.initialized);
        if !training
            || self.passthrough()
            || self.act.sign()
            || self.activation != Activation::Relu
            || no_grid_or_lsq_start
        {
            return false;
        }
        let Some(grid) = self.act.grid() else {
            return false;
        };
        let c = self.channels;
        // The bias in `b_hat` either way, where the backward pass finds it.
        if !bias_on_stage_grid(&mut self.b_hat, bias, wq, input_scale) {
            self.b_hat.copy_from_slice(&bias.value);
        }
        // The backward pass's buffer for `∂L/∂z`.
        if self.z.len() < n {
            self.z.resize(n, 0.0);
        }
        let (lo_col, hi_col) = (&mut self.lo_col[..c], &mut self.hi_col[..c]);
        lo_col.fill(f32::INFINITY);
        hi_col.fill(f32::NEG_INFINITY);
        pass(&self.b_hat, lo_col, hi_col, grid);
        self.z_left_to_layer = true;
        self.act.stats = BatchStats {
            lo: lo_col.iter().fold(f32::INFINITY, |m, &v| m.min(v)),
            hi: hi_col.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)),
            sum_abs: 0.0,
            count: n as u64,
        };
        true
    }

    /// For a layer whose own backward pass does this stage's and the pooling's after it after a
    /// forward pass by [`Epilogue::forward_pooled`] (`FoldedBn::backward_through_pool`, which
    /// recomputes `z`): the buffer for `∂L/∂z` (`n` values, where [`Epilogue::dz`] reads it),
    /// the bias that forward pass added, the estimator, whether the activation is a ReLU, and a
    /// row of `channels` for LSQ's per-channel sums of `∂v̂/∂s` (then give their total to
    /// [`Epilogue::set_step_grad`]).
    pub(crate) fn pooled_backward_parts(&mut self, n: usize) -> PooledBackward<'_> {
        debug_assert!(self.z_left_to_layer);
        let ste = self.act.ste();
        PooledBackward {
            dz: &mut self.z[..n],
            bias: &self.b_hat,
            ste,
            relu: self.activation == Activation::Relu,
            ds_col: &mut self.ds_col,
        }
    }

    /// The LSQ step gradient from `Σ g·∂v̂/∂s` (`features` output values per sample; nothing
    /// for the other estimators), as [`Epilogue::backward`] sets it.
    pub(crate) fn set_step_grad(&mut self, ds: f32, features: usize) {
        self.act.set_step_grad(ds, features);
    }

    /// [`Epilogue::forward`] of a [`Epilogue::passthrough`] stage whose bias the next layer adds
    /// (`Conv2d::forward_bias_to_batch_norm`): nothing to compute.
    pub(crate) fn forward_without_bias(&mut self, n: usize, training: bool) {
        debug_assert!(self.passthrough());
        self.z_left_to_layer = false;
        if training {
            self.act.stats = BatchStats {
                lo: f32::INFINITY,
                hi: f32::NEG_INFINITY,
                sum_abs: 0.0,
                count: n as u64,
            };
        }
    }

    /// Whether the last forward pass was [`Epilogue::forward_pooled`], which leaves `z` to the
    /// layer's backward pass ([`Epilogue::pooled_backward_parts`]).
    pub(crate) fn z_left_to_layer(&self) -> bool {
        self.z_left_to_layer
    }

    /// Whether the backward pass of the last forward pass reads the gradient of a 2×2 max
    /// pooling after this stage as the pooled gradient: after [`Epilogue::forward_pooled`] (the
    /// layer's own fused backward pass, LSQ included), or where [`Epilogue::backward_pooled`]
    /// applies.
    pub fn backward_reads_pooled(&self) -> bool {
        self.z_left_to_layer || self.stage_reads_pooled()
    }

    /// Whether [`Epilogue::backward_pooled`] applies: a ReLU or linear output, float or on a
    /// grid with the clipped straight-through estimator (not LSQ, not sign), with its own `z`
    /// (not [`Epilogue::passthrough`]).
    fn stage_reads_pooled(&self) -> bool {
        !self.passthrough()
            && !self.act.sign()
            && matches!(self.activation, Activation::Relu | Activation::Linear)
            && matches!(self.act.ste(), Ste::Pass | Ste::Clip { .. })
    }

    /// [`Epilogue::backward`] when a 2×2/stride-2 max pooling follows: `∂L/∂y` is read from the
    /// pooled gradient and the pooling's argmax ([`PooledGrad`]), so the pooling writes no
    /// full-size gradient first. The bits are those of the pooling's backward and then
    /// [`Epilogue::backward`]. Only where [`Epilogue::stage_reads_pooled`], after
    /// [`Epilogue::forward`].
    pub fn backward_pooled(&mut self, p: PooledGrad, bias: &mut Param, n: usize, features: usize) {
        debug_assert!(self.stage_reads_pooled() && !self.z_left_to_layer);
        let relu = self.activation == Activation::Relu;
        let (zd, db) = (&mut self.z[..n], &mut bias.grad);
        match self.act.ste() {
            Ste::Clip { lo, hi } => clip_backward_pooled(zd, p, db, lo, hi, relu),
            _ => pass_backward_pooled(zd, p, db, relu),
        }
        self.act.set_step_grad(0.0, features);
    }

    /// Backward from `dy` (`n` values): writes `∂L/∂z` over the stored `z` (read it with
    /// [`Epilogue::dz`]; a second backward needs a new forward), the bias gradient, and the LSQ
    /// step gradient (`features` = output values per sample).
    pub fn backward(&mut self, dy: &[f32], bias: &mut Param, n: usize, features: usize) {
        if self.passthrough() {
            // `∂L/∂z = dy`: only the bias gradient, `Σ_rows dy` per channel.
            column_sums(&dy[..n], &mut bias.grad);
            return;
        }
        let act = self.activation;
        let sign_out = self.act.sign();
        let ste = self.act.ste();
        let (zd, db) = (&mut self.z[..n], &mut bias.grad);
        let relu = act == Activation::Relu;
        let relu_or_linear = matches!(act, Activation::Relu | Activation::Linear);
        let mut ds = 0.0f32;
        // Each branch is one pass over the outputs (STE mask, activation derivative, bias
        // gradient); the common cases are written so the compiler vectorises them.
        match (sign_out, ste) {
            (false, Ste::Pass) if relu_or_linear || act == Activation::Softmax => pass_backward(zd, dy, db, relu),
            (false, Ste::Clip { lo, hi }) if relu_or_linear => clip_backward(zd, dy, db, lo, hi, relu),
            (false, Ste::Lsq { inv, qn, qp }) if relu_or_linear => {
                // ∂v̂/∂s summed per channel in `ds_col`, so the pass stays vectorisable.
                let ds_col = &mut self.ds_col[..self.channels];
                lsq_backward(zd, dy, db, ds_col, inv, qn, qp, relu);
                ds = ds_col.iter().sum();
            }
            _ => {
                // Everything else: sign outputs (clipped STE of sign, the hard-tanh derivative),
                // sigmoid/tanh, with or without a grid.
                backward_pass(zd, dy, db, |_, z, g| {
                    if sign_out {
                        return if z.abs() <= 1.0 { g } else { 0.0 };
                    }
                    let a = act.forward(z);
                    let (g, gs) = ste.apply(a, g);
                    ds += gs;
                    g * act.derivative(z, a)
                });
            }
        }
        self.act.set_step_grad(ds, features);
    }
}

/// The bias as the integer runtime adds it, `round(b/(s_in·s_w))·s_in·s_w`, into `b_hat` when
/// the weights are on an integer grid and the input's grid `s_in` is known (returns `true`);
/// otherwise the float bias applies as it is (returns `false`, `b_hat` untouched).
fn bias_on_stage_grid(b_hat: &mut [f32], bias: &Param, wq: &WeightFakeQuant, input_scale: Option<f32>) -> bool {
    match (input_scale, wq.on_integer_grid()) {
        (Some(s_in), true) => {
            for ((bh, &b), &sw) in b_hat.iter_mut().zip(&bias.value).zip(wq.scales()) {
                *bh = bias_on_grid(b, s_in, sw).1;
            }
            true
        }
        _ => false,
    }
}

crate::simd::widest! {
    /// `y[r, :] += b` for every row of `b.len()` values.
    fn add_rows(y: &mut [f32], b: &[f32]) {
        for yr in y.chunks_exact_mut(b.len()) {
            for (yv, &b) in yr.iter_mut().zip(b) {
                *yv += b;
            }
        }
    }
}

crate::simd::widest! {
    /// `s = Σ_rows x[r, :]` (rows of `s.len()` values), each column summed in row order.
    fn column_sums(x: &[f32], s: &mut [f32]) {
        s.fill(0.0);
        for row in x.chunks_exact(s.len()) {
            for (b, &g) in s.iter_mut().zip(row) {
                *b += g;
            }
        }
    }
}

/// `z ← f(channel, z, dy)` (`∂L/∂z` over `z`) for every output, and the bias gradient
/// `Σ_rows ∂L/∂z` per channel, in one pass (rows of `db.len()` channels). Inlined so each
/// caller's `f` vectorises with it.
#[inline(always)]
fn backward_pass(zd: &mut [f32], dy: &[f32], db: &mut [f32], mut f: impl FnMut(usize, f32, f32) -> f32) {
    let c = db.len();
    db.fill(0.0);
    for (zr, dyr) in zd.chunks_exact_mut(c).zip(dy.chunks_exact(c)) {
        for (j, ((d, &g), b)) in zr.iter_mut().zip(dyr).zip(db.iter_mut()).enumerate() {
            let v = f(j, *d, g);
            *d = v;
            *b += v;
        }
    }
}

/// `∂L/∂z` of a float output (no grid): `g` behind the ReLU mask, if any.
#[inline(always)]
pub(super) fn pass_grad(z: f32, g: f32, relu: bool) -> f32 {
    if relu && z <= 0.0 {
        0.0
    } else {
        g
    }
}

/// `∂L/∂z` of an output on a grid `[lo, hi]` with the clipped straight-through estimator, after
/// a ReLU or nothing.
#[inline(always)]
pub(super) fn clip_grad(z: f32, g: f32, lo: f32, hi: f32, relu: bool) -> f32 {
    let a = if relu { z.max(0.0) } else { z };
    if a >= lo && a <= hi && (!relu || z > 0.0) {
        g
    } else {
        0.0
    }
}

crate::simd::widest! {
    /// [`backward_pass`] of [`pass_grad`].
    fn pass_backward(zd: &mut [f32], dy: &[f32], db: &mut [f32], relu: bool) {
        backward_pass(zd, dy, db, |_, z, g| pass_grad(z, g, relu));
    }
}

crate::simd::widest! {
    /// [`backward_pass`] of [`clip_grad`].
    fn clip_backward(zd: &mut [f32], dy: &[f32], db: &mut [f32], lo: f32, hi: f32, relu: bool) {
        backward_pass(zd, dy, db, |_, z, g| clip_grad(z, g, lo, hi, relu));
    }
}

crate::simd::widest! {
    /// [`pass_backward`] with `dy` read through the pooling after this stage.
    fn pass_backward_pooled(zd: &mut [f32], p: PooledGrad, db: &mut [f32], relu: bool) {
        backward_pass_pooled(zd, p, db, |z, g| pass_grad(z, g, relu));
    }
}

crate::simd::widest! {
    /// [`clip_backward`] with `dy` read through the pooling after this stage.
    fn clip_backward_pooled(zd: &mut [f32], p: PooledGrad, db: &mut [f32], lo: f32, hi: f32, relu: bool) {
        backward_pass_pooled(zd, p, db, |z, g| clip_grad(z, g, lo, hi, relu));
    }
}

/// [`backward_pass`] with `∂L/∂y` of each value read from the pooled gradient ([`from_pool`]),
/// in the same order (rows, then channels), so the bias gradient's sums are the same.
#[inline(always)]
fn backward_pass_pooled(zd: &mut [f32], p: PooledGrad, db: &mut [f32], f: impl Fn(f32, f32) -> f32) {
    let c = db.len();
    db.fill(0.0);
    for (r, zr) in zd.chunks_exact_mut(c).enumerate() {
        let (win, at, inside) = p.grid.source(r, c);
        let (dp, arg) = (&p.dpool[win..win + c], &p.argmax[win..win + c]);
        for (j, ((d, b), (&dp, &arg))) in zr.iter_mut().zip(db.iter_mut()).zip(dp.iter().zip(arg)).enumerate() {
            let v = f(*d, from_pool(dp, arg, at + j as u32, inside));
            *d = v;
            *b += v;
        }
    }
}

crate::simd::widest! {
    /// [`range_pass`] of a ReLU, fake-quantized on `g` (the range is taken before).
    fn range_quant_pass_relu(z: &mut [f32], y: &mut [f32], bias: &[f32], lo: &mut [f32], hi: &mut [f32], g: Grid) {
        range_pass(z, y, bias, lo, hi, |z| z.max(0.0), |a| g.fake_quant(a));
    }
}

crate::simd::widest! {
    /// [`range_pass`] of a linear output, fake-quantized on `g` (the range is taken before).
    fn range_quant_pass_linear(z: &mut [f32], y: &mut [f32], bias: &[f32], lo: &mut [f32], hi: &mut [f32], g: Grid) {
        range_pass(z, y, bias, lo, hi, |z| z, |a| g.fake_quant(a));
    }
}

crate::simd::widest! {
    /// `z += b`, `y = max(z, 0)` (no range: a float output, or evaluation).
    fn range_free_pass_relu(z: &mut [f32], y: &mut [f32], bias: &[f32]) {
        for (zr, yr) in z.chunks_exact_mut(bias.len()).zip(y.chunks_exact_mut(bias.len())) {
            for ((z, yv), &b) in zr.iter_mut().zip(yr.iter_mut()).zip(bias) {
                *z += b;
                *yv = z.max(0.0);
            }
        }
    }
}

crate::simd::widest! {
    /// `z += b`, `y = z` (no range: a float output, or evaluation).
    fn range_free_pass_linear(z: &mut [f32], y: &mut [f32], bias: &[f32]) {
        for (zr, yr) in z.chunks_exact_mut(bias.len()).zip(y.chunks_exact_mut(bias.len())) {
            for ((z, yv), &b) in zr.iter_mut().zip(yr.iter_mut()).zip(bias) {
                *z += b;
                *yv = *z;
            }
        }
    }
}

crate::simd::widest! {
    /// [`range_pass`] of a ReLU.
    fn range_pass_relu(z: &mut [f32], y: &mut [f32], bias: &[f32], lo: &mut [f32], hi: &mut [f32]) {
        range_pass(z, y, bias, lo, hi, |z| z.max(0.0), |a| a);
    }
}

crate::simd::widest! {
    /// [`range_pass`] of a linear output.
    fn range_pass_linear(z: &mut [f32], y: &mut [f32], bias: &[f32], lo: &mut [f32], hi: &mut [f32]) {
        range_pass(z, y, bias, lo, hi, |z| z, |a| a);
    }
}

/// `z += b`, `a = f(z)`, the per-channel range of `a` and `y = q(a)` in one pass (rows of
/// `bias.len()` channels). Inlined so each caller's `f` and `q` vectorise with it.
#[inline(always)]
fn range_pass(
    z: &mut [f32],
    y: &mut [f32],
    bias: &[f32],
    lo: &mut [f32],
    hi: &mut [f32],
    f: impl Fn(f32) -> f32,
    q: impl Fn(f32) -> f32,
) {
    let c = bias.len();
    for (zr, yr) in z.chunks_exact_mut(c).zip(y.chunks_exact_mut(c)) {
        for ((((z, yv), &b), l), h) in zr
            .iter_mut()
            .zip(yr.iter_mut())
            .zip(bias)
            .zip(lo.iter_mut())
            .zip(hi.iter_mut())
        {
            *z += b;
            let a = f(*z);
            *l = l.min(a);
            *h = h.max(a);
            *yv = q(a);
        }
    }
}

crate::simd::widest! {
    /// The LSQ backward pass of a ReLU or linear output stage (what [`backward_pass`] does for
    /// the other estimators): `∂L/∂z` over `z` (the clipped STE and the ReLU mask), the bias gradient, and
    /// `∂v̂/∂s` summed per channel in `ds_col`. Compiled for the widest instruction set
    /// (`crate::simd`): for 4- and 2-bit MLPs this pass was 10 % of an epoch's samples.
    fn lsq_backward(
        zd: &mut [f32],
        dy: &[f32],
        db: &mut [f32],
        ds_col: &mut [f32],
        inv: f32,
        qn: i32,
        qp: i32,
        relu: bool,
    ) {
        let c = db.len();
        db.fill(0.0);
        ds_col.fill(0.0);
        for (zr, dyr) in zd.chunks_exact_mut(c).zip(dy.chunks_exact(c)) {
            for (((d, &g), b), s) in zr.iter_mut().zip(dyr).zip(db.iter_mut()).zip(ds_col.iter_mut()) {
                let z = *d;
                let a = if relu { z.max(0.0) } else { z };
                let (gs, inside) = lsq_grad(a, inv, qn, qp);
                *s += g * gs;
                let v = if inside && (!relu || z > 0.0) { g } else { 0.0 };
                *d = v;
                *b += v;
            }
        }
    }
}
