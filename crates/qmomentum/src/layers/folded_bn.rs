//! Batch norm folded into the convolution before it *during* quantization-aware training, as the
//! integer model will compute it (Jacob et al. 2018, §3.2; PyTorch's `ConvBn2d` /
//! `ConvBnReLU2d`, `torch/ao/nn/intrinsic/qat/modules/conv_fused.py`, `_forward_approximate`).
//!
//! With `s = γ/√(σ²_run + ε)` per output channel (running variance), the forward pass is
//!
//! ```text
//! Ŵ' = q(W·s)                       the folded kernel, fake-quantized per channel (the integer kernel)
//! z  = (col·Ŵ')/s + b               "conv_orig": the convolution the batch norm expects
//! y  = f(BN(z))                     batch statistics while training, running ones when frozen
//! ```
//!
//! so the weights are quantized on the grid the deployed, folded model uses, while the batch norm
//! still normalises with the batch statistics (and moves its running statistics). Once the
//! statistics are frozen (`freeze_bn_stats_after`, torch.ao's `freeze_bn_stats`),
//! `BN(z) = col·Ŵ' + β + s·(b − μ_run)`: the folded layer, up to the rounding of the bias to the
//! accumulator grid. Evaluation computes the folded layer itself, bias on the grid included
//! ([`FoldedBn::folded_bias`]), so it gives the exported model's bits.
//!
//! Backward (the chain rule of the lines above, as autograd computes it for `ConvBn2d`): with
//! `g = ∂L/∂z` from the batch norm, `∂L/∂b = Σ g`, `∂L/∂(col·Ŵ') = g/s`, the STE gives
//! `∂L/∂(W·s) = ∂L/∂Ŵ'`, hence `∂L/∂W = s·∂L/∂Ŵ'`, and `s` receives
//! `Σ_k ∂L/∂Ŵ'·W − Σ_rows g·(col·Ŵ')/s²`, which reaches `γ` as `∂s/∂γ = 1/σ_run` (the running
//! variance is a buffer: no gradient). The two terms of `∂L/∂s` cancel up to the quantization
//! error, so γ learns from the batch norm itself as in float training.
//!
//! **Binary kernels** ([`FoldedBn::after_binary`]): a ±1 kernel cannot absorb `s`, so the batch
//! norm stays *after* it, as in Larq's binary networks: `s ≡ 1` above, i.e.
//! `y = f(BN(col·Ŵ + b))` with `Ŵ = α·sign(W)`, in training and in evaluation (running statistics
//! there), and `γ` learns from the batch norm only. The output is a sign, so the deployed layer is
//! `sign(s·α·dot + β + s·(b − μ))`: one integer threshold per channel on the XNOR-popcount `dot`
//! ([`FoldedBn::sign_affine`] gives the exporter `s·α` and `β + s·(b − μ)`).
//!
//! Checked against PyTorch 2.15's `ConvBn2d` (forward, input, weight, bias, γ and β gradients,
//! with batch and with frozen statistics; evaluation; running statistics) in
//! `tests/conv_bn_qat.rs`.

use super::batch_norm::{Affine, BatchNorm};
use super::epilogue::{clip_grad, pass_grad, PooledBackward};
use super::param::{Param, ParamKind};
use super::pool::{from_pool, Pool2d, PoolGrid, PooledGrad};
use crate::quant::act::{Grid, Ste};
use crate::quant::observer::lsq_grad;

/// A batch norm folded into the convolution before it, with the scratch of the fold.
#[derive(Clone, Debug)]
pub struct FoldedBn {
    /// The batch norm (its parameters and buffers keep their names, `layers.{i}.gamma`, …, so a
    /// float checkpoint of the same network loads into the folded one).
    pub bn: BatchNorm,
    /// Normalise with the running statistics and stop moving them (torch.ao's `freeze_bn_stats`).
    pub frozen: bool,
    /// `s` is folded into the kernel (integer kernels), or the batch norm stays after it with
    /// `s ≡ 1` there (binary kernels: [`FoldedBn::after_binary`]).
    pub fold_scale: bool,
    /// `s = γ/σ_run` of the last forward pass.
    factor: Vec<f32>,
    /// `1/σ_run` of the last forward pass.
    inv_std: Vec<f32>,
    /// `W·s`, `[fan_in, channels]`.
    pub(crate) w_fold: Vec<f32>,
    /// `z` (the batch norm's input) of the last forward pass.
    pub(crate) z: Vec<f32>,
    /// `∂L/∂(col·Ŵ')` when the output stage passes its gradient through (else that stage's
    /// gradient buffer holds it; see [`FoldedBn::backward_in_place`]).
    dz: Vec<f32>,
    /// `∂L/∂s` per channel, summed in f64.
    ds: Vec<f64>,
    /// `∂L/∂b` per channel, summed in f64.
    db: Vec<f64>,
    /// Per-channel f32 sums of a block of rows (two halves of `channels`).
    block: Vec<f32>,
    /// The output stage's bias in training: 0 (the batch norm's β is the layer's bias there).
    pub(crate) zero_bias: Param,
    /// The folded bias `β + s·(b − μ_run)` of evaluation.
    folded_bias: Param,
}

impl FoldedBn {
    /// Fold `bn` into a layer with a `[fan_in, bn.channels]` kernel.
    pub fn new(bn: BatchNorm, fan_in: usize) -> Self {
        let c = bn.channels;
        let name = format!("layers.{}.folded_zero_bias", bn.index);
        FoldedBn {
            bn,
            frozen: false,
            fold_scale: true,
            factor: vec![1.0; c],
            inv_std: vec![1.0; c],
            w_fold: vec![0.0; fan_in * c],
            z: Vec::new(),
            dz: Vec::new(),
            ds: vec![0.0; c],
            db: vec![0.0; c],
            block: vec![0.0; 2 * c],
            zero_bias: Param::new(name.clone(), ParamKind::Bias, vec![c], vec![0.0; c]),
            folded_bias: Param::new(name, ParamKind::Bias, vec![c], vec![0.0; c]),
        }
    }

    /// `bn` kept after a binary `[fan_in, bn.channels]` kernel (not folded: `s ≡ 1` in the
    /// kernel; see the module doc).
    pub fn after_binary(bn: BatchNorm, fan_in: usize) -> Self {
        FoldedBn {
            fold_scale: false,
            ..FoldedBn::new(bn, fan_in)
        }
    }

    /// `s = γ/σ_run` and `W·s` (the kernel that is quantized); `W` itself when the scale is not
    /// folded.
    pub fn fold_weights(&mut self, w: &[f32]) {
        factors(&self.bn, &mut self.inv_std, &mut self.factor);
        if self.fold_scale {
            scale_columns(w, &self.factor, &mut self.w_fold);
        } else {
            self.factor.fill(1.0);
            self.w_fold.copy_from_slice(w);
        }
    }

    /// Whether the forward pass runs the batch norm: while training, and always when it stays
    /// after the kernel (evaluation of a folded layer runs the folded kernel and bias instead).
    pub fn runs_batch_norm(&self, training: bool) -> bool {
        training || !self.fold_scale
    }

    /// The deployed sign layer of a binary kernel with per-channel scale `alpha` and bias `b`:
    /// `BN(α·dot + b) = (s·α)·dot + β + s·(b − μ_run)` with `s = γ/σ_run` (the f32 operations of
    /// the forward pass's factor), as `(s·α, β + s·(b − μ_run))`. A negative `s·α` means the
    /// sign flips with the dot product.
    pub fn sign_affine(&self, alpha: &[f32], b: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let c = self.bn.channels;
        let (mut inv, mut s) = (vec![0.0; c], vec![0.0; c]);
        factors(&self.bn, &mut inv, &mut s);
        let bn = &self.bn;
        let scale = (0..c).map(|j| s[j] * alpha[j]).collect();
        let bias = (0..c)
            .map(|j| bn.beta.value[j] + s[j] * (b[j] - bn.running_mean.value[j]))
            .collect();
        (scale, bias)
    }

    /// `W·s` into a new buffer, leaving this layer's state alone (the checkpoint's integer
    /// codes are those of this kernel); `W` when the scale is not folded.
    pub fn folded_kernel(&self, w: &[f32]) -> Vec<f32> {
        if !self.fold_scale {
            return w.to_vec();
        }
        let c = self.bn.channels;
        let (mut inv, mut s, mut out) = (vec![0.0; c], vec![0.0; c], vec![0.0; w.len()]);
        factors(&self.bn, &mut inv, &mut s);
        scale_columns(w, &s, &mut out);
        out
    }

    /// The folded kernel `W·s` and the buffer the convolution writes `col·Ŵ'` into (`n` values,
    /// grown once).
    pub fn kernel_and_product(&mut self, n: usize) -> (&[f32], &mut [f32]) {
        if self.z.len() < n {
            self.z.resize(n, 0.0);
        }
        (&self.w_fold, &mut self.z[..n])
    }

    /// `z = (col·Ŵ')/s + b` in place, then the batch norm into `y` (`n` values): batch statistics
    /// when `training` and not frozen, running statistics otherwise.
    pub fn forward(&mut self, b: &[f32], y: &mut [f32], n: usize, training: bool) {
        self.statistics(b, n, training);
        self.bn.normalize_into(&self.z[..n], y, n);
    }

    /// The first half of [`FoldedBn::forward`]: `z = (col·Ŵ')/s + b` in place and the batch
    /// norm's statistics, in one pass when they are the batch's ([`unfold_sums`]: the sums of
    /// the batch norm's own pass, in its order, so the same bits).
    pub(crate) fn statistics(&mut self, b: &[f32], n: usize, training: bool) {
        if training && !self.frozen {
            let (z, s, c) = (&mut self.z[..n], &self.factor[..], self.bn.channels);
            self.bn
                .batch_statistics_with(n, |s1, s2, b1, b2| unfold_sums(z, s, b, c, s1, s2, b1, b2));
            return;
        }
        unfold(&mut self.z[..n], &self.factor, b);
        self.bn.statistics(&[], n, false);
        if training {
            // Frozen: no batch sums, the running statistics stay where they are.
            self.bn.batch_sums.2 = 0;
        }
    }

    /// The rest of [`FoldedBn::forward`] in one pass, when the output stage after the batch norm
    /// is `q(max(z + bias, 0))` on grid `g` with its range statistics (QAT's ReLU on a grid;
    /// [`Epilogue::forward_pooled`]) and a 2×2/stride-2 max pooling follows: the stage's
    /// per-channel range `lo`, `hi`, and the pooled output `y` with the pooling's argmax. Neither
    /// the stage's `z` nor the full-size output is written: the backward pass recomputes `z`
    /// ([`FoldedBn::backward_through_pool`]), and the pooling needs only its output. The
    /// operations of the batch norm, the stage and the pooling one after the other, so their
    /// bits (`tests/conv.rs`).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn normalize_quant_pool(
        &self,
        bias: &[f32],
        lo: &mut [f32],
        hi: &mut [f32],
        g: Grid,
        pool: &mut Pool2d,
        y: &mut [f32],
        n: usize,
    ) {
        debug_assert!(!self.bn.relu && pool.fast_2x2() && pool.geo.input.c == self.bn.channels);
        let st = Stage::new(self.bn.affine(), bias);
        let grid = pool.grid();
        let batch = n / pool.geo.input.len().max(1);
        let m = batch * pool.geo.output.len();
        normalize_relu_quant_pool(&self.z[..n], &mut y[..m], pool.argmax_mut(batch), grid, st, lo, hi, g);
    }

    /// The output stage's backward through the pooling (what [`Epilogue::backward_pooled`], or
    /// for LSQ the pooling's backward and the stage's `lsq_backward`, compute) and
    /// [`FoldedBn::backward_in_place`], in two passes, after [`FoldedBn::normalize_quant_pool`]: the output stage's `z` (the batch norm's
    /// output plus `stage_bias`) is recomputed from the batch norm's input with the forward
    /// pass's operations, its ReLU and straight-through estimator `ste` give `∂L/∂z` from the
    /// pooled gradient. The first pass takes the batch norm's sums of it, the second recomputes
    /// it, applies the batch norm's input gradient and the unfold's backward (its sums `∂L/∂b`,
    /// `∂L/∂s`) and writes `∂L/∂(col·Ŵ')` into `dz`. The operations and the orders of
    /// summation of the passes one after the other, so their bits (`tests/conv.rs`).
    /// Returns LSQ's `Σ g·∂v̂/∂s` over every output (0 for the other estimators), summed per
    /// channel in row order and then over channels, as the stage's own backward pass sums it.
    pub(crate) fn backward_through_pool(
        &mut self,
        stage: PooledBackward,
        p: PooledGrad,
        b: &[f32],
        db: &mut [f32],
        n: usize,
    ) -> f32 {
        let PooledBackward {
            dz,
            bias: stage_bias,
            ste,
            relu,
            ds_col,
        } = stage;
        let x = &self.z[..n];
        let dz = &mut dz[..n];
        let c = self.bn.channels;
        let ds_col = &mut ds_col[..c];
        let bn = self.bn.grads_with(n, |affine, s1, s2, b1, b2| {
            let st = Stage::new(affine, stage_bias);
            match ste {
                Ste::Clip { lo, hi } => pooled_sums_clip(p, x, st, s1, s2, b1, b2, ds_col, lo, hi, relu),
                Ste::Lsq { inv, qn, qp } => pooled_sums_lsq(p, x, st, s1, s2, b1, b2, ds_col, inv, qn, qp, relu),
                Ste::Pass => pooled_sums_pass(p, x, st, s1, s2, b1, b2, ds_col, relu),
            }
        });
        let coef = Coefficients {
            z: Stage::new(bn.affine, stage_bias),
            k: bn.k,
            m1: bn.m1,
            m2: bn.m2,
            s: &self.factor,
            b,
        };
        let (b1, b2) = self.block.split_at_mut(c);
        match ste {
            Ste::Clip { lo, hi } => {
                pooled_input_grad_clip(dz, p, x, coef, &mut self.db, &mut self.ds, b1, b2, lo, hi, relu)
            }
            Ste::Lsq { inv, qn, qp } => {
                pooled_input_grad_lsq(dz, p, x, coef, &mut self.db, &mut self.ds, b1, b2, inv, qn, qp, relu)
            }
            Ste::Pass => pooled_input_grad_pass(dz, p, x, coef, &mut self.db, &mut self.ds, b1, b2, relu),
        }
        self.finish_backward(db);
        match ste {
            Ste::Lsq { .. } => ds_col.iter().sum(),
            _ => 0.0,
        }
    }

    /// `∂L/∂s` (its second term) and `∂L/∂b` from the f64 sums of the backward pass.
    fn finish_backward(&mut self, db: &mut [f32]) {
        for ((d, &s), (o, &v)) in self.ds.iter_mut().zip(&self.factor).zip(db.iter_mut().zip(&self.db)) {
            *d = -*d / s as f64;
            *o = v as f32;
        }
    }

    /// Backward with `g = ∂L/∂BN(z)` (`n` values), rewritten in place into
    /// `∂L/∂(col·Ŵ') = (∂L/∂z)/s`: the batch norm's gradients, `∂L/∂b` into `db`, and the second
    /// term of `∂L/∂s` kept for [`FoldedBn::weight_grad`]. In place so that the output stage's
    /// gradient buffer serves (no buffer of this layer's output size here: for cnn-small's two
    /// replicas, 19 MB).
    pub fn backward_in_place(&mut self, g: &mut [f32], b: &[f32], db: &mut [f32], n: usize) {
        let c = self.bn.channels;
        self.bn.backward_in_place(&self.z[..n], &mut g[..n], n);
        // ds (second term) = −Σ g·(col·Ŵ')/s² = −Σ g·(z − b)/s.
        let (b1, b2) = self.block.split_at_mut(c);
        unfold_backward(
            &mut g[..n],
            &self.z[..n],
            &self.factor,
            b,
            &mut self.db,
            &mut self.ds,
            b1,
            b2,
        );
        self.finish_backward(db);
    }

    /// [`FoldedBn::backward_in_place`] from a read-only `dy` (an output stage that passes its
    /// gradient through): a copy into this layer's own buffer (grown once), where
    /// [`FoldedBn::product_grad`] reads it.
    pub fn backward(&mut self, dy: &[f32], b: &[f32], db: &mut [f32], n: usize) {
        let mut g = std::mem::take(&mut self.dz);
        if g.len() < n {
            g.resize(n, 0.0);
        }
        g[..n].copy_from_slice(&dy[..n]);
        self.backward_in_place(&mut g, b, db, n);
        self.dz = g;
    }

    /// `∂L/∂(col·Ŵ')` of the last [`FoldedBn::backward`] (`n` values).
    pub fn product_grad(&self, n: usize) -> &[f32] {
        &self.dz[..n]
    }

    /// With `∂L/∂Ŵ'` in `w.grad` (the STE's `∂L/∂(W·s)`): `∂L/∂W = s·∂L/∂Ŵ'` in place, and
    /// `∂L/∂γ += (Σ_k ∂L/∂Ŵ'·W + the second term)/σ_run`.
    pub fn weight_grad(&mut self, w: &mut Param) {
        if !self.fold_scale {
            // `s ≡ 1` in the kernel: `∂L/∂W = ∂L/∂Ŵ`, and γ learns from the batch norm alone.
            return;
        }
        let c = self.bn.channels;
        for (gr, wr) in w.grad.chunks_exact_mut(c).zip(w.value.chunks_exact(c)) {
            for j in 0..c {
                self.ds[j] += (gr[j] * wr[j]) as f64;
                gr[j] *= self.factor[j];
            }
        }
        for j in 0..c {
            self.bn.gamma.grad[j] += (self.ds[j] * self.inv_std[j] as f64) as f32;
        }
    }

    /// The folded bias `β + s·(b − μ_run)` of the deployed layer, for the `s` of the last
    /// [`FoldedBn::fold_weights`] (evaluation: the output stage puts it on the accumulator grid).
    pub fn folded_bias(&mut self, b: &[f32]) -> &Param {
        let bn = &self.bn;
        for ((((o, &s), &beta), &mu), &b) in self
            .folded_bias
            .value
            .iter_mut()
            .zip(&self.factor)
            .zip(&bn.beta.value)
            .zip(&bn.running_mean.value)
            .zip(b)
        {
            *o = beta + s * (b - mu);
        }
        &self.folded_bias
    }

    /// The folded kernel and bias of the deployed layer (running statistics): `W·s` and
    /// `β + s·(b − μ_run)`, with `s` computed by the same f32 operations as the forward pass, so
    /// the deployed kernel quantizes to the very codes the training used and evaluating the
    /// folded layer gives the same bits as evaluating this one.
    pub fn fold(&mut self, w: &mut [f32], b: &mut [f32]) {
        assert!(
            self.fold_scale,
            "a batch norm after a binary kernel is not folded into it"
        );
        self.fold_weights(w);
        w.copy_from_slice(&self.w_fold);
        let fb = self.folded_bias(b);
        b.copy_from_slice(&fb.value);
    }
}

/// `1/σ_run` and `s = γ/σ_run` per channel: the one computation of the factor (training,
/// evaluation, export and checkpoint all fold with these f32 operations).
fn factors(bn: &BatchNorm, inv_std: &mut [f32], factor: &mut [f32]) {
    let (g, rv, eps) = (&bn.gamma.value, &bn.running_var.value, bn.epsilon);
    for j in 0..bn.channels {
        inv_std[j] = 1.0 / (rv[j] + eps).sqrt();
        factor[j] = g[j] * inv_std[j];
    }
}

/// `out[k, j] = w[k, j]·s[j]` for a `[fan_in, channels]` kernel.
fn scale_columns(w: &[f32], s: &[f32], out: &mut [f32]) {
    let c = s.len();
    for (dst, src) in out.chunks_exact_mut(c).zip(w.chunks_exact(c)) {
        for ((d, &v), &f) in dst.iter_mut().zip(src).zip(s) {
            *d = v * f;
        }
    }
}

/// Rows summed in f32 before the f64 total (as batch norm's sums: the channel loop vectorises).
const BLOCK_ROWS: usize = 64;

crate::simd::widest! {
    /// `z ← z/s + b` per channel over rows of `s.len()`.
    fn unfold(z: &mut [f32], s: &[f32], b: &[f32]) {
        for row in z.chunks_exact_mut(s.len()) {
            for ((v, &s), &b) in row.iter_mut().zip(s).zip(b) {
                *v = *v / s + b;
            }
        }
    }
}

crate::simd::widest! {
    /// With `g = ∂L/∂z` in `dz`: `db = Σ g`, `ds = Σ g·(z − b)` per channel (f32 blocks of rows
    /// added into f64), and `dz ← g/s`.
    fn unfold_backward(
        dz: &mut [f32],
        z: &[f32],
        s: &[f32],
        b: &[f32],
        db: &mut [f64],
        ds: &mut [f64],
        b1: &mut [f32],
        b2: &mut [f32],
    ) {
        let c = s.len();
        db.fill(0.0);
        ds.fill(0.0);
        for (gb, zb) in dz.chunks_mut(BLOCK_ROWS * c).zip(z.chunks(BLOCK_ROWS * c)) {
            let (a1, a2) = (&mut b1[..c], &mut b2[..c]);
            a1.fill(0.0);
            a2.fill(0.0);
            for (gr, zr) in gb.chunks_exact_mut(c).zip(zb.chunks_exact(c)) {
                for (((((g, &z), &s), &b), p), q) in gr.iter_mut().zip(zr).zip(s).zip(b).zip(a1.iter_mut()).zip(a2.iter_mut()) {
                    *p += *g;
                    *q += *g * (z - b);
                    *g /= s;
                }
            }
            for j in 0..c {
                db[j] += a1[j] as f64;
                ds[j] += a2[j] as f64;
            }
        }
    }
}

// The fused passes below repeat the block structure of the batch norm's sums on purpose (as
// `batch_norm.rs` does, and for its reason: a shared helper taking a per-row closure measured
// 40 % slower there); `tests/conv.rs` checks them bit for bit against the passes one by one.
crate::simd::widest! {
    /// [`unfold`] and the batch norm's `Σz`, `Σz²` per channel of the result, in the blocks and
    /// order of `batch_norm::block_sums` (the same bits as the two passes).
    fn unfold_sums(
        z: &mut [f32],
        s: &[f32],
        b: &[f32],
        c: usize,
        s1: &mut [f64],
        s2: &mut [f64],
        b1: &mut [f32],
        b2: &mut [f32],
    ) {
        s1.fill(0.0);
        s2.fill(0.0);
        for block in z.chunks_mut(BLOCK_ROWS * c) {
            let (a1, a2) = (&mut b1[..c], &mut b2[..c]);
            a1.fill(0.0);
            a2.fill(0.0);
            for row in block.chunks_exact_mut(c) {
                for ((((v, &s), &b), p), q) in row.iter_mut().zip(s).zip(b).zip(a1.iter_mut()).zip(a2.iter_mut()) {
                    *v = *v / s + b;
                    *p += *v;
                    *q += *v * *v;
                }
            }
            for ch in 0..c {
                s1[ch] += a1[ch] as f64;
                s2[ch] += a2[ch] as f64;
            }
        }
    }
}

crate::simd::widest! {
    /// [`FoldedBn::normalize_quant_pool`]'s pass. Per value: the batch norm
    /// `γ·((x − μ)·(1/σ)) + β`, the stage's `z = · + bias`, `a = max(z, 0)`, its range and
    /// `q(a)`; per 2×2 window, the maximum of the four `q(a)` (the first on ties) and its offset
    /// in the sample, as `pool::max_2x2` takes them. An odd last row or column (in no window)
    /// counts in the range only.
    fn normalize_relu_quant_pool(
        x: &[f32],
        y: &mut [f32],
        argmax: &mut [u32],
        grid: PoolGrid,
        st: Stage,
        lo: &mut [f32],
        hi: &mut [f32],
        q: Grid,
    ) {
        let PoolGrid { h, w, oh, ow } = grid;
        let c = st.bias.len();
        // One value: its range kept, `q(a)` returned.
        #[inline(always)]
        fn one(x: f32, (m, s, g, be, b): (f32, f32, f32, f32, f32), l: &mut f32, hh: &mut f32, q: Grid) -> f32 {
            let a = stage_z(x, m, s, g, be, b).max(0.0);
            *l = l.min(a);
            *hh = hh.max(a);
            q.fake_quant(a)
        }
        let hw = h * w * c;
        for (sample, xb) in x.chunks_exact(hw).enumerate() {
            for oy in 0..oh {
                for ox in 0..ow {
                    let at = ((sample * oh + oy) * ow + ox) * c;
                    let s00 = (2 * oy * w + 2 * ox) * c;
                    let (out, arg) = (&mut y[at..at + c], &mut argmax[at..at + c]);
                    for (ch, (((o, a), &x), (k, (l, hh)))) in out
                        .iter_mut()
                        .zip(arg.iter_mut())
                        .zip(&xb[s00..s00 + c])
                        .zip(st.iter().zip(lo.iter_mut().zip(hi.iter_mut())))
                        .enumerate()
                    {
                        *o = one(x, k, l, hh, q);
                        *a = (s00 + ch) as u32;
                    }
                    for t in [s00 + c, s00 + w * c, s00 + w * c + c] {
                        for (ch, (((o, a), &x), (k, (l, hh)))) in out
                            .iter_mut()
                            .zip(arg.iter_mut())
                            .zip(&xb[t..t + c])
                            .zip(st.iter().zip(lo.iter_mut().zip(hi.iter_mut())))
                            .enumerate()
                        {
                            let v = one(x, k, l, hh, q);
                            let take = v > *o;
                            *o = if take { v } else { *o };
                            *a = if take { (t + ch) as u32 } else { *a };
                        }
                    }
                }
            }
            // Values in no window: an odd last column, then an odd last row.
            for yy in 0..h {
                let x0 = if yy < 2 * oh { 2 * ow } else { 0 };
                for xx in x0..w {
                    let t = (yy * w + xx) * c;
                    for (&x, (k, (l, hh))) in xb[t..t + c].iter().zip(st.iter().zip(lo.iter_mut().zip(hi.iter_mut()))) {
                        one(x, k, l, hh, q);
                    }
                }
            }
        }
    }
}

/// The output stage's pre-activation after the batch norm, `(γ·((x − μ)·(1/σ)) + β) + bias`:
/// the batch norm's `normalize` and the stage's bias, the operations of the forward pass (the
/// backward pass recomputes it with them, so the same values).
#[inline(always)]
fn stage_z(x: f32, m: f32, s: f32, g: f32, be: f32, b: f32) -> f32 {
    (g * ((x - m) * s) + be) + b
}

/// The per-channel constants of [`stage_z`].
#[derive(Clone, Copy)]
struct Stage<'a> {
    mean: &'a [f32],
    inv_std: &'a [f32],
    gamma: &'a [f32],
    beta: &'a [f32],
    bias: &'a [f32],
}

impl<'a> Stage<'a> {
    /// The batch norm's `(μ, 1/σ, γ, β)` and the stage's bias.
    fn new((mean, inv_std, gamma, beta): Affine<'a>, bias: &'a [f32]) -> Self {
        Stage {
            mean,
            inv_std,
            gamma,
            beta,
            bias,
        }
    }

    /// `(μ, 1/σ, γ, β, bias)` channel by channel.
    #[inline(always)]
    fn iter(self) -> impl Iterator<Item = (f32, f32, f32, f32, f32)> + 'a {
        self.mean
            .iter()
            .zip(self.inv_std)
            .zip(self.gamma.iter().zip(self.beta))
            .zip(self.bias)
            .map(|(((&m, &s), (&g, &be)), &b)| (m, s, g, be, b))
    }
}

/// The per-channel coefficients of [`pooled_input_grad`]: the stage ([`stage_z`]), the batch
/// norm's input gradient `k·(g − m1 − x̂·m2)` with `x̂ = (x − μ)·(1/σ)`, and the unfold's `s`
/// and `b`.
#[derive(Clone, Copy)]
struct Coefficients<'a> {
    z: Stage<'a>,
    k: &'a [f32],
    m1: &'a [f32],
    m2: &'a [f32],
    s: &'a [f32],
    b: &'a [f32],
}

/// The first backward pass of [`FoldedBn::backward_through_pool`]: with `g = f.grad(z, ∂L/∂y)` (the
/// output stage's gradient, `z` recomputed by [`stage_z`], `∂L/∂y` read through the pooling), the
/// batch norm's `Σ g` and `Σ g·x̂` per channel in the blocks and order of
/// `batch_norm::grad_sums`. Inlined so each caller's estimator vectorises with it.
///
/// With `LSQ`, `f` also returns the value's `∂v̂/∂s`, and `ds_col` (a row of channels, untouched
/// without `LSQ`) receives `Σ ∂L/∂y·∂v̂/∂s` per channel in row order (the sums of the stage's
/// `lsq_backward`).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn pooled_sums<const LSQ: bool>(
    p: PooledGrad,
    x: &[f32],
    st: Stage,
    dsum: &mut [f64],
    dsum_xhat: &mut [f64],
    b1: &mut [f32],
    b2: &mut [f32],
    ds_col: &mut [f32],
    f: impl StageGrad,
) {
    if LSQ {
        ds_col.fill(0.0);
    }
    let c = st.bias.len();
    dsum.fill(0.0);
    dsum_xhat.fill(0.0);
    for (k, xb) in x.chunks(BLOCK_ROWS * c).enumerate() {
        let (a, b) = (&mut b1[..c], &mut b2[..c]);
        a.fill(0.0);
        b.fill(0.0);
        for (j, xr) in xb.chunks_exact(c).enumerate() {
            let (win, at, inside) = p.grid.source(k * BLOCK_ROWS + j, c);
            let (dp, arg) = (&p.dpool[win..win + c], &p.argmax[win..win + c]);
            for (ch, ((((a, b), &x), ((m, s, ga, be, bi), (&dp, &arg))), dsc)) in a
                .iter_mut()
                .zip(b.iter_mut())
                .zip(xr)
                .zip(st.iter().zip(dp.iter().zip(arg)))
                .zip(ds_col.iter_mut())
                .enumerate()
            {
                let dy = from_pool(dp, arg, at + ch as u32, inside);
                let (g, gs) = f.grad(stage_z(x, m, s, ga, be, bi), dy);
                if LSQ {
                    *dsc += dy * gs;
                }
                *a += g;
                *b += g * ((x - m) * s);
            }
        }
        for ch in 0..c {
            dsum[ch] += a[ch] as f64;
            dsum_xhat[ch] += b[ch] as f64;
        }
    }
}

/// The second backward pass of [`FoldedBn::backward_through_pool`]: `g = f.grad(z, ∂L/∂y)` again, the
/// batch norm's input gradient `g' = k·(g − m1 − x̂·m2)` (`batch_norm::input_grad`), the
/// unfold's sums `Σ g'`, `Σ g'·(x − b)` in the blocks and order of [`unfold_backward`], and
/// `dz = g'/s`. Inlined so each caller's estimator vectorises with it.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn pooled_input_grad(
    dz: &mut [f32],
    p: PooledGrad,
    x: &[f32],
    co: Coefficients,
    db: &mut [f64],
    ds: &mut [f64],
    b1: &mut [f32],
    b2: &mut [f32],
    f: impl StageGrad,
) {
    let c = co.k.len();
    db.fill(0.0);
    ds.fill(0.0);
    for (kb, (db_, xb)) in dz.chunks_mut(BLOCK_ROWS * c).zip(x.chunks(BLOCK_ROWS * c)).enumerate() {
        let (a1, a2) = (&mut b1[..c], &mut b2[..c]);
        a1.fill(0.0);
        a2.fill(0.0);
        for (j, (dr, xr)) in db_.chunks_exact_mut(c).zip(xb.chunks_exact(c)).enumerate() {
            let (win, at, inside) = p.grid.source(kb * BLOCK_ROWS + j, c);
            let (dp, arg) = (&p.dpool[win..win + c], &p.argmax[win..win + c]);
            for (ch, (((d, &x), ((m, is, ga, be, bi), ((&k, &m1), &m2))), (((&s, &b), (&dp, &arg)), (p1, p2)))) in dr
                .iter_mut()
                .zip(xr)
                .zip(co.z.iter().zip(co.k.iter().zip(co.m1).zip(co.m2)))
                .zip(
                    co.s.iter()
                        .zip(co.b)
                        .zip(dp.iter().zip(arg))
                        .zip(a1.iter_mut().zip(a2.iter_mut())),
                )
                .enumerate()
            {
                let g = f
                    .grad(
                        stage_z(x, m, is, ga, be, bi),
                        from_pool(dp, arg, at + ch as u32, inside),
                    )
                    .0;
                let g = k * (g - m1 - ((x - m) * is) * m2);
                *p1 += g;
                *p2 += g * (x - b);
                *d = g / s;
            }
        }
        for ch in 0..c {
            db[ch] += a1[ch] as f64;
            ds[ch] += a2[ch] as f64;
        }
    }
}

crate::simd::widest! {
    /// [`pooled_sums`] of a stage on a grid (the clipped straight-through estimator).
    fn pooled_sums_clip(
        p: PooledGrad,
        x: &[f32],
        st: Stage,
        dsum: &mut [f64],
        dsum_xhat: &mut [f64],
        b1: &mut [f32],
        b2: &mut [f32],
        ds_col: &mut [f32],
        lo: f32,
        hi: f32,
        relu: bool,
    ) {
        pooled_sums::<false>(p, x, st, dsum, dsum_xhat, b1, b2, ds_col, ClipSte { lo, hi, relu });
    }
}

crate::simd::widest! {
    /// [`pooled_sums`] of a stage without a grid yet.
    fn pooled_sums_pass(
        p: PooledGrad,
        x: &[f32],
        st: Stage,
        dsum: &mut [f64],
        dsum_xhat: &mut [f64],
        b1: &mut [f32],
        b2: &mut [f32],
        ds_col: &mut [f32],
        relu: bool,
    ) {
        pooled_sums::<false>(p, x, st, dsum, dsum_xhat, b1, b2, ds_col, PassSte { relu });
    }
}

crate::simd::widest! {
    /// [`pooled_sums`] of a stage with a learned step (LSQ), with its sums of `∂v̂/∂s`.
    fn pooled_sums_lsq(
        p: PooledGrad,
        x: &[f32],
        st: Stage,
        dsum: &mut [f64],
        dsum_xhat: &mut [f64],
        b1: &mut [f32],
        b2: &mut [f32],
        ds_col: &mut [f32],
        inv: f32,
        qn: i32,
        qp: i32,
        relu: bool,
    ) {
        pooled_sums::<true>(p, x, st, dsum, dsum_xhat, b1, b2, ds_col, LsqSte { inv, qn, qp, relu });
    }
}

crate::simd::widest! {
    /// [`pooled_input_grad`] of a stage with a learned step (LSQ).
    fn pooled_input_grad_lsq(
        dz: &mut [f32],
        p: PooledGrad,
        x: &[f32],
        co: Coefficients,
        db: &mut [f64],
        ds: &mut [f64],
        b1: &mut [f32],
        b2: &mut [f32],
        inv: f32,
        qn: i32,
        qp: i32,
        relu: bool,
    ) {
        pooled_input_grad(dz, p, x, co, db, ds, b1, b2, LsqSte { inv, qn, qp, relu });
    }
}

/// The output stage's backward for one value: `(∂L/∂z, ∂v̂/∂s)` from its pre-activation `z` and
/// `∂L/∂y`, as the stage's own passes compute them. A trait with inlined methods rather than a
/// closure: a closure was not inlined into the long LSQ pass, which then ran scalar (2.3× its
/// time).
trait StageGrad: Copy {
    fn grad(self, z: f32, g: f32) -> (f32, f32);
}

/// The clipped straight-through estimator ([`clip_grad`]).
#[derive(Clone, Copy)]
struct ClipSte {
    lo: f32,
    hi: f32,
    relu: bool,
}

impl StageGrad for ClipSte {
    #[inline(always)]
    fn grad(self, z: f32, g: f32) -> (f32, f32) {
        (clip_grad(z, g, self.lo, self.hi, self.relu), 0.0)
    }
}

/// No grid yet ([`pass_grad`]).
#[derive(Clone, Copy)]
struct PassSte {
    relu: bool,
}

impl StageGrad for PassSte {
    #[inline(always)]
    fn grad(self, z: f32, g: f32) -> (f32, f32) {
        (pass_grad(z, g, self.relu), 0.0)
    }
}

/// A learned step: the clipped STE on LSQ's range, the ReLU mask and `∂v̂/∂s`, as the stage's
/// `lsq_backward` computes them.
#[derive(Clone, Copy)]
struct LsqSte {
    inv: f32,
    qn: i32,
    qp: i32,
    relu: bool,
}

impl StageGrad for LsqSte {
    #[inline(always)]
    fn grad(self, z: f32, g: f32) -> (f32, f32) {
        let a = if self.relu { z.max(0.0) } else { z };
        let (gs, inside) = lsq_grad(a, self.inv, self.qn, self.qp);
        (if inside && (!self.relu || z > 0.0) { g } else { 0.0 }, gs)
    }
}

crate::simd::widest! {
    /// [`pooled_input_grad`] of a stage on a grid (the clipped straight-through estimator).
    fn pooled_input_grad_clip(
        dz: &mut [f32],
        p: PooledGrad,
        x: &[f32],
        co: Coefficients,
        db: &mut [f64],
        ds: &mut [f64],
        b1: &mut [f32],
        b2: &mut [f32],
        lo: f32,
        hi: f32,
        relu: bool,
    ) {
        pooled_input_grad(dz, p, x, co, db, ds, b1, b2, ClipSte { lo, hi, relu });
    }
}

crate::simd::widest! {
    /// [`pooled_input_grad`] of a stage without a grid yet.
    fn pooled_input_grad_pass(
        dz: &mut [f32],
        p: PooledGrad,
        x: &[f32],
        co: Coefficients,
        db: &mut [f64],
        ds: &mut [f64],
        b1: &mut [f32],
        b2: &mut [f32],
        relu: bool,
    ) {
        pooled_input_grad(dz, p, x, co, db, ds, b1, b2, PassSte { relu });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fused forward pass against its definition, value by value: the batch norm, the stage's
    /// bias, ReLU, range and fake quantization of every value (those of the odd last row and
    /// column, in no window, too), then 2×2 max pooling of the quantized values, the first
    /// maximum of a window winning ties (a coarse grid makes ties).
    #[test]
    fn normalize_relu_quant_pool_is_its_definition() {
        let (batch, h, w, c) = (2, 5, 7, 3);
        let grid = PoolGrid { h, w, oh: 2, ow: 3 };
        let n = batch * h * w * c;
        let mut rng = crate::rng::Rng::new(5, 0);
        // Channel 0 is largest in the last column and row, in no window: the range must see it.
        let edge = |i: usize| {
            let p = (i / c) % (h * w);
            p / w == h - 1 || p % w == w - 1
        };
        let x: Vec<f32> = (0..n)
            .map(|i| {
                if i % c == 0 && edge(i) {
                    3.0
                } else {
                    rng.uniform_range(-2.0, 2.0)
                }
            })
            .collect();
        let (mean, inv_std) = ([0.1f32, -0.2, 0.0], [1.5f32, 0.7, 1.0]);
        let (gamma, beta, bias) = ([1.0f32, -0.5, 2.0], [0.0f32, 0.3, -0.1], [0.0f32, 0.25, -0.5]);
        let q = Grid {
            inv: 4.0,
            zero: 0.0,
            qmin: 0.0,
            qmax: 6.0,
            scale: 0.25,
        };
        let m = batch * grid.oh * grid.ow * c;
        let (mut y, mut argmax) = (vec![0.0; m], vec![0u32; m]);
        let (mut lo, mut hi) = ([f32::INFINITY; 3], [f32::NEG_INFINITY; 3]);
        let st = Stage::new((&mean, &inv_std, &gamma, &beta), &bias);
        normalize_relu_quant_pool(&x, &mut y, &mut argmax, grid, st, &mut lo, &mut hi, q);
        // The definition.
        let mut full = vec![0.0f32; n];
        let (mut lo_ref, mut hi_ref) = ([f32::INFINITY; 3], [f32::NEG_INFINITY; 3]);
        for (i, (&v, f)) in x.iter().zip(full.iter_mut()).enumerate() {
            let ch = i % c;
            let z = (gamma[ch] * ((v - mean[ch]) * inv_std[ch]) + beta[ch]) + bias[ch];
            let a = z.max(0.0);
            lo_ref[ch] = lo_ref[ch].min(a);
            hi_ref[ch] = hi_ref[ch].max(a);
            *f = q.fake_quant(a);
        }
        assert_eq!(lo, lo_ref);
        assert_eq!(hi, hi_ref);
        let mut ties = 0;
        for b in 0..batch {
            for oy in 0..grid.oh {
                for ox in 0..grid.ow {
                    for ch in 0..c {
                        let taps =
                            [(0, 0), (0, 1), (1, 0), (1, 1)].map(|(dy, dx)| ((2 * oy + dy) * w + 2 * ox + dx) * c + ch);
                        let v = |t: usize| full[b * h * w * c + t];
                        let best = taps
                            .iter()
                            .copied()
                            .fold(taps[0], |m, t| if v(t) > v(m) { t } else { m });
                        ties += taps.iter().filter(|&&t| t != best && v(t) == v(best)).count();
                        let at = ((b * grid.oh + oy) * grid.ow + ox) * c + ch;
                        assert_eq!(y[at].to_bits(), v(best).to_bits(), "pooled {at}");
                        assert_eq!(argmax[at], best as u32, "argmax {at}");
                    }
                }
            }
        }
        assert!(ties > 0, "the grid makes ties");
        assert_eq!(
            hi[0],
            (3.0 - mean[0]) * inv_std[0],
            "channel 0's largest value is outside the windows"
        );
    }
}
