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

use super::batch_norm::BatchNorm;
use super::param::{Param, ParamKind};

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
        unfold(&mut self.z[..n], &self.factor, b);
        let batch_stats = training && !self.frozen;
        self.bn.forward(&self.z[..n], y, n, batch_stats);
        if training && self.frozen {
            // No batch sums: the running statistics stay where they are.
            self.bn.batch_sums.2 = 0;
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
        for ((d, &s), (o, &v)) in self.ds.iter_mut().zip(&self.factor).zip(db.iter_mut().zip(&self.db)) {
            *d = -*d / s as f64;
            *o = v as f32;
        }
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
