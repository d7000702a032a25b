//! `BatchNorm`: `y = γ·(x − μ)/√(σ² + ε) + β` per channel (the last dimension, NHWC).
//!
//! Training normalises with the batch's mean and (biased) variance over every row (samples ×
//! positions) and updates the running statistics; evaluation uses the running statistics. Those
//! are [`Buffer`]s: checkpointed, never optimized. γ is a scale and β a bias for the optimizer's
//! groups (no weight decay unless asked).
//!
//! The running statistics' "momentum" has opposite conventions, both accepted, spelled out:
//! * Keras `BatchNormalization(momentum=m)`, `m` = weight of the OLD value (default 0.99):
//!   `μ_run ← m·μ_run + (1 − m)·μ_B`, `σ²_run ← m·σ²_run + (1 − m)·σ²_B` (biased batch variance).
//! * PyTorch `BatchNorm2d(momentum=p)`, `p` = weight of the NEW batch (default 0.1):
//!   `μ_run ← (1 − p)·μ_run + p·μ_B`, `σ²_run ← (1 − p)·σ²_run + p·σ²_B·n/(n − 1)` (unbiased).
//!
//! When a training step is split over two cores, each half is normalised with its own batch
//! statistics (as data-parallel training without synchronised BN does) and the running statistics
//! are updated once per step from the statistics of the whole batch (the halves combined exactly).

use super::param::{Buffer, Param, ParamKind};
use super::pool::{from_pool, PoolGrid};
use serde::{Deserialize, Serialize};

/// How the running statistics follow the batches.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "convention", rename_all = "snake_case")]
pub enum BnMomentum {
    /// Keras: `momentum` is the weight of the old value; biased batch variance.
    Keras {
        /// In [0, 1).
        momentum: f32,
    },
    /// PyTorch: `momentum` is the weight of the new batch; unbiased batch variance.
    Torch {
        /// In (0, 1].
        momentum: f32,
    },
}

/// `(μ, 1/σ, γ, β)` per channel.
pub(crate) type Affine<'a> = (&'a [f32], &'a [f32], &'a [f32], &'a [f32]);

/// The per-channel coefficients of the input gradient `k·(dy − m1 − x̂·m2)`,
/// `x̂ = (x − μ)·(1/σ)` ([`BatchNorm::grads_with`]).
pub(crate) struct InputGradCoefficients<'a> {
    pub(crate) k: &'a [f32],
    pub(crate) m1: &'a [f32],
    pub(crate) m2: &'a [f32],
    /// `(μ, 1/σ, γ, β)`.
    pub(crate) affine: Affine<'a>,
}

/// Per-channel batch normalisation.
#[derive(Clone, Debug)]
pub struct BatchNorm {
    /// Index in the model.
    pub index: usize,
    /// Channels.
    pub channels: usize,
    /// ε.
    pub epsilon: f32,
    /// Running-statistics rule.
    pub momentum: BnMomentum,
    /// γ `[c]`.
    pub gamma: Param,
    /// β `[c]`.
    pub beta: Param,
    /// Running mean `[c]`.
    pub running_mean: Buffer,
    /// Running (population) variance `[c]`.
    pub running_var: Buffer,
    /// Statistics of the last training batch this replica saw: Σx, Σx² per channel (f64) and the
    /// rows counted (merged over replicas by the model, then [`BatchNorm::update_running`]).
    pub batch_sums: (Vec<f64>, Vec<f64>, u64),
    /// Whether a ReLU is applied in the same passes: `y = max(BN(x), 0)` forward, and the
    /// backward pass masks `∂L/∂y` where `BN(x) ≤ 0` (recomputed from `x`, as `x̂` is) before its
    /// sums. Set by the model when the next layer is a ReLU ([`super::Layer::fuses_next`]),
    /// which then computes nothing; the result is the two layers' bits (measured: see
    /// `doc/performance.md`, "Fused passes"). A batch norm taken out of a model that has run
    /// keeps the flag: clear it to run it alone.
    pub relu: bool,
    /// Whether the last forward pass normalised with the batch statistics (else the running
    /// ones, which the backward pass then treats as constants).
    batch_stats: bool,
    inv_std: Vec<f32>,
    mean: Vec<f32>,
    dsum: Vec<f64>,
    dsum_xhat: Vec<f64>,
    dsum_f32: Vec<f32>,
    dsum_xhat_f32: Vec<f32>,
    k: Vec<f32>,
    /// `Σ_rows ∂L/∂x` per channel of the last pooled backward pass.
    colsum: Vec<f32>,
    /// Added to each input value as the pooled passes read it: the bias of the layer before when
    /// that layer left it to this one (`Conv2d::forward_bias_to_batch_norm`), else −0, which
    /// gives every value back unchanged (`x + (−0) = x`, also for `x = −0`). The input itself
    /// is never rewritten, so the statistics pass only reads it.
    shift: Vec<f32>,
}

/// Rows summed in f32 before the f64 total: the inner loop runs over channels and vectorises,
/// and a block of 64 rows keeps the f32 rounding far below the f64 total's resolution needs.
const BLOCK_ROWS: usize = 64;

crate::simd::widest! {
    /// `Σx` and `Σx²` per channel of `x` (rows of `c`), in f32 blocks added into f64.
    fn block_sums(x: &[f32], c: usize, s1: &mut [f64], s2: &mut [f64], b1: &mut [f32], b2: &mut [f32]) {
        s1.fill(0.0);
        s2.fill(0.0);
        for block in x.chunks(BLOCK_ROWS * c) {
            let (a, b) = (&mut b1[..c], &mut b2[..c]);
            a.fill(0.0);
            b.fill(0.0);
            for row in block.chunks_exact(c) {
                for ((a, b), &v) in a.iter_mut().zip(b.iter_mut()).zip(row) {
                    *a += v;
                    *b += v * v;
                }
            }
            for ch in 0..c {
                s1[ch] += a[ch] as f64;
                s2[ch] += b[ch] as f64;
            }
        }
    }
}

crate::simd::widest! {
    /// `y = γ·((x − μ)·(1/σ)) + β` per channel over rows of `c`.
    fn normalize(x: &[f32], y: &mut [f32], c: usize, mean: &[f32], inv_std: &[f32], g: &[f32], b: &[f32]) {
        for (xr, yr) in x.chunks_exact(c).zip(y.chunks_exact_mut(c)) {
            for ((((y, &x), &m), &s), (&g, &b)) in yr.iter_mut().zip(xr).zip(mean).zip(inv_std).zip(g.iter().zip(b)) {
                *y = g * ((x - m) * s) + b;
            }
        }
    }
}

crate::simd::widest! {
    /// `y = max(γ·((x − μ)·(1/σ)) + β, 0)`: [`normalize`] and the ReLU after it in one pass (the
    /// same operations, so the same bits as the two passes).
    fn normalize_relu(x: &[f32], y: &mut [f32], c: usize, mean: &[f32], inv_std: &[f32], g: &[f32], b: &[f32]) {
        for (xr, yr) in x.chunks_exact(c).zip(y.chunks_exact_mut(c)) {
            for ((((y, &x), &m), &s), (&g, &b)) in yr.iter_mut().zip(xr).zip(mean).zip(inv_std).zip(g.iter().zip(b)) {
                *y = (g * ((x - m) * s) + b).max(0.0);
            }
        }
    }
}

/// `∂L/∂y` masked by a fused ReLU: `dy` where the forward output `γ·x̂ + β` was positive, else 0
/// (as the ReLU layer's backward: 0 for NaN too). `x̂` and the output are recomputed with the
/// forward pass's operations.
#[inline(always)]
fn relu_mask(dy: f32, xhat: f32, g: f32, b: f32) -> f32 {
    if g * xhat + b > 0.0 {
        dy
    } else {
        0.0
    }
}

// The statistics and gradient-sum passes repeat their block structure on purpose: one shared
// helper taking a per-row closure gave the same bits but measured 40 % slower on a cnn-small
// epoch (10.7 → 14.8 s, two alternating pairs), its loops no longer vectorised as these are.
crate::simd::widest! {
    /// [`grad_sums`] of `dy` masked by a fused ReLU ([`relu_mask`]).
    fn grad_sums_relu(
        dy: &[f32],
        x: &[f32],
        c: usize,
        mean: &[f32],
        inv_std: &[f32],
        gamma: &[f32],
        beta: &[f32],
        dsum: &mut [f64],
        dsum_xhat: &mut [f64],
        b1: &mut [f32],
        b2: &mut [f32],
    ) {
        dsum.fill(0.0);
        dsum_xhat.fill(0.0);
        for (gb, xb) in dy.chunks(BLOCK_ROWS * c).zip(x.chunks(BLOCK_ROWS * c)) {
            let (a, b) = (&mut b1[..c], &mut b2[..c]);
            a.fill(0.0);
            b.fill(0.0);
            for (gr, xr) in gb.chunks_exact(c).zip(xb.chunks_exact(c)) {
                for (((((a, b), &g), &x), (&m, &s)), (&ga, &be)) in
                    a.iter_mut().zip(b.iter_mut()).zip(gr).zip(xr).zip(mean.iter().zip(inv_std)).zip(gamma.iter().zip(beta))
                {
                    let xhat = (x - m) * s;
                    let g = relu_mask(g, xhat, ga, be);
                    *a += g;
                    *b += g * xhat;
                }
            }
            for ch in 0..c {
                dsum[ch] += a[ch] as f64;
                dsum_xhat[ch] += b[ch] as f64;
            }
        }
    }
}

crate::simd::widest! {
    /// [`input_grad`] of `g` masked by a fused ReLU ([`relu_mask`]), in place.
    fn input_grad_relu(
        g: &mut [f32],
        x: &[f32],
        c: usize,
        k: &[f32],
        m1: &[f32],
        m2: &[f32],
        mean: &[f32],
        inv_std: &[f32],
        gamma: &[f32],
        beta: &[f32],
    ) {
        for (gr, xr) in g.chunks_exact_mut(c).zip(x.chunks_exact(c)) {
            for ((((((d, &x), &k), &m1), &m2), (&m, &s)), (&ga, &be)) in
                gr.iter_mut().zip(xr).zip(k).zip(m1).zip(m2).zip(mean.iter().zip(inv_std)).zip(gamma.iter().zip(beta))
            {
                let xhat = (x - m) * s;
                *d = k * (relu_mask(*d, xhat, ga, be) - m1 - xhat * m2);
            }
        }
    }
}

crate::simd::widest! {
    /// [`normalize_relu`] followed by 2×2/stride-2 max pooling, without the full-size output:
    /// each window's four values are computed, and the maximum (the first one on ties) and its
    /// offset in the sample are written, as `pool::max_2x2` would from the written output.
    fn normalize_relu_pool(
        x: &[f32],
        shift: &[f32],
        y: &mut [f32],
        argmax: &mut [u32],
        grid: PoolGrid,
        c: usize,
        mean: &[f32],
        inv_std: &[f32],
        g: &[f32],
        b: &[f32],
    ) {
        let PoolGrid { h, w, oh, ow } = grid;
        let (mean, inv_std, g, b) = (&mean[..c], &inv_std[..c], &g[..c], &b[..c]);
        let f = |x: f32, m: f32, s: f32, g: f32, b: f32| (g * ((x - m) * s) + b).max(0.0);
        for (sample, xb) in x.chunks_exact(h * w * c).enumerate() {
            for oy in 0..oh {
                for ox in 0..ow {
                    let at = ((sample * oh + oy) * ow + ox) * c;
                    let s00 = (2 * oy * w + 2 * ox) * c;
                    let (out, arg) = (&mut y[at..at + c], &mut argmax[at..at + c]);
                    for (ch, ((((((o, a), &x), &sh), &m), &s), (&g, &b))) in
                        out.iter_mut().zip(arg.iter_mut()).zip(&xb[s00..s00 + c]).zip(shift).zip(mean).zip(inv_std).zip(g.iter().zip(b)).enumerate()
                    {
                        *o = f(x + sh, m, s, g, b);
                        *a = (s00 + ch) as u32;
                    }
                    for t in [s00 + c, s00 + w * c, s00 + w * c + c] {
                        for (ch, ((((((o, a), &x), &sh), &m), &s), (&g, &b))) in
                            out.iter_mut().zip(arg.iter_mut()).zip(&xb[t..t + c]).zip(shift).zip(mean).zip(inv_std).zip(g.iter().zip(b)).enumerate()
                        {
                            let v = f(x + sh, m, s, g, b);
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
    /// [`grad_sums_relu`] of the gradient the pooling after the batch norm would pass down
    /// ([`from_pool`]), read from the pooled gradient and the pooling's argmax.
    fn grad_sums_relu_pool(
        dpool: &[f32],
        argmax: &[u32],
        grid: PoolGrid,
        x: &[f32],
        shift: &[f32],
        c: usize,
        mean: &[f32],
        inv_std: &[f32],
        gamma: &[f32],
        beta: &[f32],
        dsum: &mut [f64],
        dsum_xhat: &mut [f64],
        b1: &mut [f32],
        b2: &mut [f32],
    ) {
        dsum.fill(0.0);
        dsum_xhat.fill(0.0);
        for (k, xb) in x.chunks(BLOCK_ROWS * c).enumerate() {
            let (a, b) = (&mut b1[..c], &mut b2[..c]);
            a.fill(0.0);
            b.fill(0.0);
            for (j, xr) in xb.chunks_exact(c).enumerate() {
                let (win, at, inside) = grid.source(k * BLOCK_ROWS + j, c);
                let (dp, arg) = (&dpool[win..win + c], &argmax[win..win + c]);
                for (ch, ((((((a, b), &x), &sh), (&m, &s)), (&ga, &be)), (&dp, &arg))) in a
                    .iter_mut()
                    .zip(b.iter_mut())
                    .zip(xr)
                    .zip(shift)
                    .zip(mean.iter().zip(inv_std))
                    .zip(gamma.iter().zip(beta))
                    .zip(dp.iter().zip(arg))
                    .enumerate()
                {
                    let xhat = ((x + sh) - m) * s;
                    let g = relu_mask(from_pool(dp, arg, at + ch as u32, inside), xhat, ga, be);
                    *a += g;
                    *b += g * xhat;
                }
            }
            for ch in 0..c {
                dsum[ch] += a[ch] as f64;
                dsum_xhat[ch] += b[ch] as f64;
            }
        }
    }
}

crate::simd::widest! {
    /// [`input_grad_relu`] of the gradient the pooling after the batch norm would pass down
    /// ([`from_pool`]), written to `g`, and `colsum = Σ_rows g` per channel, summed in row
    /// order as `epilogue::column_sums` sums it (the bias gradient of the layer before, when that
    /// layer leaves its bias to this one: `Conv2d::forward_bias_to_batch_norm`).
    fn input_grad_relu_pool(
        dpool: &[f32],
        argmax: &[u32],
        grid: PoolGrid,
        g: &mut [f32],
        x: &[f32],
        shift: &[f32],
        c: usize,
        k: &[f32],
        m1: &[f32],
        m2: &[f32],
        mean: &[f32],
        inv_std: &[f32],
        gamma: &[f32],
        beta: &[f32],
        colsum: &mut [f32],
    ) {
        colsum.fill(0.0);
        for (r, (gr, xr)) in g.chunks_exact_mut(c).zip(x.chunks_exact(c)).enumerate() {
            let (win, at, inside) = grid.source(r, c);
            let (dp, arg) = (&dpool[win..win + c], &argmax[win..win + c]);
            for (ch, ((((((((d, &x), &sh), &k), (&m1, &m2)), (&m, &s)), (&ga, &be)), (&dp, &arg)), cs)) in gr
                .iter_mut()
                .zip(xr)
                .zip(shift)
                .zip(k)
                .zip(m1.iter().zip(m2))
                .zip(mean.iter().zip(inv_std))
                .zip(gamma.iter().zip(beta))
                .zip(dp.iter().zip(arg))
                .zip(colsum.iter_mut())
                .enumerate()
            {
                let xhat = ((x + sh) - m) * s;
                let dy = relu_mask(from_pool(dp, arg, at + ch as u32, inside), xhat, ga, be);
                *d = k * (dy - m1 - xhat * m2);
                *cs += *d;
            }
        }
    }
}

crate::simd::widest! {
    /// [`block_sums`] of `x + b` per row (`b`: the bias of the layer before, added as
    /// `epilogue::add_rows` would), without writing `x + b`: the passes after add `b` again as
    /// they read `x` ([`BatchNorm::forward_through_pool`]).
    fn shifted_block_sums(x: &[f32], b: &[f32], s1: &mut [f64], s2: &mut [f64], b1: &mut [f32], b2: &mut [f32]) {
        let c = b.len();
        s1.fill(0.0);
        s2.fill(0.0);
        for block in x.chunks(BLOCK_ROWS * c) {
            let (p, q) = (&mut b1[..c], &mut b2[..c]);
            p.fill(0.0);
            q.fill(0.0);
            for row in block.chunks_exact(c) {
                for (((p, q), &x), &b) in p.iter_mut().zip(q.iter_mut()).zip(row).zip(b) {
                    let v = x + b;
                    *p += v;
                    *q += v * v;
                }
            }
            for ch in 0..c {
                s1[ch] += p[ch] as f64;
                s2[ch] += q[ch] as f64;
            }
        }
    }
}

crate::simd::widest! {
    /// `Σ dy` and `Σ dy·x̂` per channel (`x̂ = (x − μ)·(1/σ)`), in f32 blocks added into f64.
    fn grad_sums(
        dy: &[f32],
        x: &[f32],
        c: usize,
        mean: &[f32],
        inv_std: &[f32],
        dsum: &mut [f64],
        dsum_xhat: &mut [f64],
        b1: &mut [f32],
        b2: &mut [f32],
    ) {
        dsum.fill(0.0);
        dsum_xhat.fill(0.0);
        for (gb, xb) in dy.chunks(BLOCK_ROWS * c).zip(x.chunks(BLOCK_ROWS * c)) {
            let (a, b) = (&mut b1[..c], &mut b2[..c]);
            a.fill(0.0);
            b.fill(0.0);
            for (gr, xr) in gb.chunks_exact(c).zip(xb.chunks_exact(c)) {
                for (((((a, b), &g), &x), &m), &s) in a.iter_mut().zip(b.iter_mut()).zip(gr).zip(xr).zip(mean).zip(inv_std) {
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
}

crate::simd::widest! {
    /// `dx = k·(dy − m1 − x̂·m2)` per channel (`x̂ = (x − μ)·(1/σ)`) over rows of `c`: the
    /// operations of [`input_grad`], out of place (no copy of `dy` first).
    fn input_grad_from(dy: &[f32], dx: &mut [f32], x: &[f32], c: usize, k: &[f32], m1: &[f32], m2: &[f32], mean: &[f32], inv_std: &[f32]) {
        for ((gr, dr), xr) in dy.chunks_exact(c).zip(dx.chunks_exact_mut(c)).zip(x.chunks_exact(c)) {
            for (((((((&g, d), &x), &k), &m1), &m2), &m), &s) in gr.iter().zip(dr.iter_mut()).zip(xr).zip(k).zip(m1).zip(m2).zip(mean).zip(inv_std) {
                *d = k * (g - m1 - ((x - m) * s) * m2);
            }
        }
    }
}

crate::simd::widest! {
    /// `g ← k·(g − m1 − x̂·m2)` per channel (`x̂ = (x − μ)·(1/σ)`) over rows of `c`.
    fn input_grad(g: &mut [f32], x: &[f32], c: usize, k: &[f32], m1: &[f32], m2: &[f32], mean: &[f32], inv_std: &[f32]) {
        for (gr, xr) in g.chunks_exact_mut(c).zip(x.chunks_exact(c)) {
            for ((((((d, &x), &k), &m1), &m2), &m), &s) in gr.iter_mut().zip(xr).zip(k).zip(m1).zip(m2).zip(mean).zip(inv_std) {
                *d = k * (*d - m1 - ((x - m) * s) * m2);
            }
        }
    }
}

impl BatchNorm {
    /// γ = 1, β = 0, running mean 0 and variance 1 (both frameworks' initial state).
    pub fn new(index: usize, channels: usize, epsilon: f32, momentum: BnMomentum) -> Self {
        BatchNorm {
            index,
            channels,
            epsilon,
            momentum,
            gamma: Param::new(
                format!("layers.{index}.gamma"),
                ParamKind::Scale,
                vec![channels],
                vec![1.0; channels],
            ),
            beta: Param::new(
                format!("layers.{index}.beta"),
                ParamKind::Bias,
                vec![channels],
                vec![0.0; channels],
            ),
            running_mean: Buffer::new(
                format!("layers.{index}.running_mean"),
                vec![channels],
                vec![0.0; channels],
            ),
            running_var: Buffer::new(
                format!("layers.{index}.running_var"),
                vec![channels],
                vec![1.0; channels],
            ),
            batch_sums: (vec![0.0; channels], vec![0.0; channels], 0),
            relu: false,
            batch_stats: false,
            inv_std: vec![0.0; channels],
            mean: vec![0.0; channels],
            dsum: vec![0.0; channels],
            dsum_xhat: vec![0.0; channels],
            dsum_f32: vec![0.0; channels],
            dsum_xhat_f32: vec![0.0; channels],
            k: vec![0.0; channels],
            colsum: vec![0.0; channels],
            shift: vec![-0.0; channels],
        }
    }

    /// Forward over `n` values (`n / channels` rows).
    pub fn forward(&mut self, x: &[f32], y: &mut [f32], n: usize, training: bool) {
        self.statistics(x, n, training);
        self.normalize_into(x, y, n);
    }

    /// The normalisation of [`BatchNorm::forward`] with the statistics already in place
    /// ([`BatchNorm::statistics`] or [`BatchNorm::batch_statistics_with`]).
    pub(crate) fn normalize_into(&self, x: &[f32], y: &mut [f32], n: usize) {
        let c = self.channels;
        let (g, b) = (&self.gamma.value, &self.beta.value);
        let (mean, inv_std) = (&self.mean[..c], &self.inv_std[..c]);
        // `x̂ = (x − μ)·(1/σ)` is not stored: the backward pass computes it again from `x` (the
        // same f32 operations, so the same values), which saves a buffer as large as the
        // activations (for cnn-small's two replicas, 19 MB).
        if self.relu {
            normalize_relu(&x[..n], &mut y[..n], c, mean, inv_std, g, b);
        } else {
            normalize(&x[..n], &mut y[..n], c, mean, inv_std, g, b);
        }
    }

    /// The mean and `1/σ` this forward pass normalises with: the batch's (and its sums, for the
    /// running statistics) in training, else the running ones.
    pub(crate) fn statistics(&mut self, x: &[f32], n: usize, training: bool) {
        let c = self.channels;
        if training {
            self.batch_statistics_with(n, |s1, s2, b1, b2| block_sums(&x[..n], c, s1, s2, b1, b2));
        } else {
            self.batch_stats = false;
            for ch in 0..c {
                self.mean[ch] = self.running_mean.value[ch];
                self.inv_std[ch] = 1.0 / (self.running_var.value[ch] + self.epsilon).sqrt();
            }
        }
    }

    /// The batch statistics of `n` values whose sums `Σx`, `Σx²` per channel `sums` writes
    /// (into its first two arguments, with two f32 scratch rows of `channels`): [`block_sums`]
    /// of the input, or a pass that computes the input and its sums at once (QAT's folded batch
    /// norm: `FoldedBn::statistics`), in the same order so with the same bits.
    pub(crate) fn batch_statistics_with(
        &mut self,
        n: usize,
        sums: impl FnOnce(&mut [f64], &mut [f64], &mut [f32], &mut [f32]),
    ) {
        let c = self.channels;
        let rows = n / c;
        self.batch_stats = true;
        let (s1, s2, count) = &mut self.batch_sums;
        sums(s1, s2, &mut self.dsum_f32, &mut self.dsum_xhat_f32);
        *count = rows as u64;
        let r = rows.max(1) as f64;
        for ch in 0..c {
            let m = s1[ch] / r;
            let var = (s2[ch] / r - m * m).max(0.0);
            self.mean[ch] = m as f32;
            self.inv_std[ch] = (1.0 / (var + self.epsilon as f64).sqrt()) as f32;
        }
    }

    /// `(μ, 1/σ, γ, β)` of the last forward pass, for a layer that normalises in a pass of its
    /// own (with [`normalize`]'s operations: `γ·((x − μ)·(1/σ)) + β`).
    pub(crate) fn affine(&self) -> Affine<'_> {
        let c = self.channels;
        (&self.mean[..c], &self.inv_std[..c], &self.gamma.value, &self.beta.value)
    }

    /// [`BatchNorm::param_grads`] with the sums `Σ dy`, `Σ dy·x̂` written by `sums` (given
    /// `(μ, 1/σ, γ, β)`, into the two f64 rows, with two f32 scratch rows), for a layer whose
    /// pass computes `dy` itself (QAT's folded batch norm under a pooling). Then the
    /// coefficients of the input gradient (`k`, `m1 = mean(dy)`, `m2 = mean(dy·x̂)`, and
    /// `(μ, 1/σ, γ, β)`) for [`input_grad`]'s operations `k·(dy − m1 − x̂·m2)`.
    pub(crate) fn grads_with(
        &mut self,
        n: usize,
        sums: impl FnOnce(Affine, &mut [f64], &mut [f64], &mut [f32], &mut [f32]),
    ) -> InputGradCoefficients<'_> {
        let c = self.channels;
        self.sums_into_grads(sums);
        self.input_grad_coefficients(n);
        InputGradCoefficients {
            k: &self.k[..c],
            m1: &self.dsum_f32[..c],
            m2: &self.dsum_xhat_f32[..c],
            affine: (&self.mean[..c], &self.inv_std[..c], &self.gamma.value, &self.beta.value),
        }
    }

    /// [`BatchNorm::forward`] of a batch norm with its ReLU ([`BatchNorm::relu`]) followed by a
    /// 2×2/stride-2 max pooling, whose forward pass it does too: only the pooled output `y` and
    /// the pooling's argmax are written, not the full-size output the pooling would read back
    /// (cnn-small: one write and one read of the largest activation less per step). The bits are
    /// those of the three layers.
    ///
    /// With `bias` (the bias of the layer before, which left it to this one:
    /// `Conv2d::forward_bias_to_batch_norm`), the input is `x + bias`: each pass adds the bias
    /// as it reads `x`, which stays as it is (the statistics pass only reads it: one write of the
    /// largest activation less), and [`BatchNorm::backward_in_place_through_pool`] adds it again.
    pub fn forward_through_pool(
        &mut self,
        x: &mut [f32],
        bias: Option<&[f32]>,
        pool: &mut super::Pool2d,
        y: &mut [f32],
        n: usize,
        training: bool,
    ) {
        debug_assert!(self.relu && pool.fast_2x2() && pool.geo.input.c == self.channels);
        match bias {
            Some(b) => self.shift.copy_from_slice(b),
            None => self.shift.fill(-0.0),
        }
        match bias {
            Some(b) if training => {
                self.batch_statistics_with(n, |s1, s2, b1, b2| shifted_block_sums(&x[..n], b, s1, s2, b1, b2));
            }
            _ => self.statistics(x, n, training),
        }
        let c = self.channels;
        let (i, o) = (pool.geo.input, pool.geo.output);
        let grid = pool.grid();
        let batch = n / i.len().max(1);
        normalize_relu_pool(
            &x[..n],
            &self.shift,
            &mut y[..batch * o.len()],
            pool.argmax_mut(batch),
            grid,
            c,
            &self.mean[..c],
            &self.inv_std[..c],
            &self.gamma.value,
            &self.beta.value,
        );
    }

    /// Backward over `n` values of the forward input `x`, with `x̂ = (x − μ)/σ` of that forward
    /// pass: `dx = (γ/σ)·(dy − mean(dy) − x̂·mean(dy·x̂))` after batch statistics,
    /// `dx = (γ/σ)·dy` after running ones (constants then); `dγ = Σ dy·x̂`, `dβ = Σ dy`.
    pub fn backward(&mut self, x: &[f32], dy: &[f32], dx: Option<&mut [f32]>, n: usize) {
        if self.relu {
            // The fused ReLU's mask: the in-place pass on a copy (the model's own backward
            // always runs in place; this serves layer-by-layer callers).
            match dx {
                Some(dx) => {
                    dx[..n].copy_from_slice(&dy[..n]);
                    self.backward_in_place(x, dx, n);
                }
                None => self.param_grads(x, dy, n),
            }
            return;
        }
        self.param_grads(x, dy, n);
        if let Some(dx) = dx {
            self.input_grad_coefficients(n);
            let c = self.channels;
            input_grad_from(
                &dy[..n],
                &mut dx[..n],
                &x[..n],
                c,
                &self.k[..c],
                &self.dsum_f32[..c],
                &self.dsum_xhat_f32[..c],
                &self.mean[..c],
                &self.inv_std[..c],
            );
        }
    }

    /// [`BatchNorm::backward`] with `∂L/∂y` in `g`, replaced by `∂L/∂x` (the per-channel sums
    /// are taken first, then each value is rewritten from its own position).
    pub fn backward_in_place(&mut self, x: &[f32], g: &mut [f32], n: usize) {
        self.param_grads(x, g, n);
        self.input_grad_in_place(x, g, n);
    }

    /// [`BatchNorm::backward_in_place`] of a batch norm with its ReLU ([`BatchNorm::relu`])
    /// followed by a 2×2/stride-2 max pooling, whose backward it does too: `∂L/∂y` is read
    /// from the pooled gradient `dpool` and the pooling's `argmax` instead of a full-size buffer
    /// the pooling would write first (cnn-small: one write and two reads of the largest
    /// activation's gradient less per step). `g` receives `∂L/∂x`; the bits are those of the
    /// three layers' backward passes. `bias_grad`, if given, receives `Σ_rows ∂L/∂x` per channel
    /// (the bias gradient of the layer before, when it left its bias to this one).
    pub fn backward_in_place_through_pool(
        &mut self,
        x: &[f32],
        pool: &super::Pool2d,
        dpool: &[f32],
        g: &mut [f32],
        n: usize,
        bias_grad: Option<&mut [f32]>,
    ) {
        debug_assert!(self.relu && pool.fast_2x2() && pool.geo.input.c == self.channels);
        let c = self.channels;
        let grid = pool.grid();
        let argmax = pool.argmax();
        let shift = std::mem::take(&mut self.shift);
        self.sums_into_grads(|(mean, inv_std, gamma, beta), s1, s2, b1, b2| {
            grad_sums_relu_pool(
                dpool,
                argmax,
                grid,
                &x[..n],
                &shift,
                c,
                mean,
                inv_std,
                gamma,
                beta,
                s1,
                s2,
                b1,
                b2,
            );
        });
        self.input_grad_coefficients(n);
        input_grad_relu_pool(
            dpool,
            argmax,
            grid,
            &mut g[..n],
            &x[..n],
            &shift,
            c,
            &self.k[..c],
            &self.dsum_f32[..c],
            &self.dsum_xhat_f32[..c],
            &self.mean[..c],
            &self.inv_std[..c],
            &self.gamma.value,
            &self.beta.value,
            &mut self.colsum,
        );
        self.shift = shift;
        if let Some(bg) = bias_grad {
            bg.copy_from_slice(&self.colsum);
        }
    }

    /// `dγ`, `dβ` and the per-channel sums `Σ dy`, `Σ dy·x̂` the input gradient needs.
    fn param_grads(&mut self, x: &[f32], dy: &[f32], n: usize) {
        let (c, relu) = (self.channels, self.relu);
        self.sums_into_grads(|(mean, inv_std, gamma, beta), s1, s2, b1, b2| {
            if relu {
                grad_sums_relu(&dy[..n], &x[..n], c, mean, inv_std, gamma, beta, s1, s2, b1, b2);
            } else {
                grad_sums(&dy[..n], &x[..n], c, mean, inv_std, s1, s2, b1, b2);
            }
        });
    }

    /// `dγ = Σ dy·x̂`, `dβ = Σ dy` from the sums `sums` writes (given `(μ, 1/σ, γ, β)`, into
    /// `dsum`, `dsum_xhat`, with two f32 scratch rows), which the input gradient then uses.
    fn sums_into_grads(&mut self, sums: impl FnOnce(Affine, &mut [f64], &mut [f64], &mut [f32], &mut [f32])) {
        let c = self.channels;
        sums(
            (&self.mean[..c], &self.inv_std[..c], &self.gamma.value, &self.beta.value),
            &mut self.dsum,
            &mut self.dsum_xhat,
            &mut self.dsum_f32,
            &mut self.dsum_xhat_f32,
        );
        for ch in 0..c {
            self.beta.grad[ch] = self.dsum[ch] as f32;
            self.gamma.grad[ch] = self.dsum_xhat[ch] as f32;
        }
    }

    /// `g ← (γ/σ)·(g − mean(dy) − x̂·mean(dy·x̂))` after [`BatchNorm::param_grads`] on `g`.
    fn input_grad_in_place(&mut self, x: &[f32], g: &mut [f32], n: usize) {
        self.input_grad_coefficients(n);
        let c = self.channels;
        if self.relu {
            input_grad_relu(
                &mut g[..n],
                &x[..n],
                c,
                &self.k[..c],
                &self.dsum_f32[..c],
                &self.dsum_xhat_f32[..c],
                &self.mean[..c],
                &self.inv_std[..c],
                &self.gamma.value,
                &self.beta.value,
            );
            return;
        }
        input_grad(
            &mut g[..n],
            &x[..n],
            c,
            &self.k[..c],
            &self.dsum_f32[..c],
            &self.dsum_xhat_f32[..c],
            &self.mean[..c],
            &self.inv_std[..c],
        );
    }

    /// `k = γ/σ`, `mean(dy)` and `mean(dy·x̂)` per channel (0 after running statistics).
    fn input_grad_coefficients(&mut self, n: usize) {
        let c = self.channels;
        let rows = (n / c).max(1) as f64;
        // Per-channel coefficients first (divisions once per channel, not per value).
        // After running statistics, μ and σ do not depend on the batch: no mean terms.
        let live = if self.batch_stats { 1.0 } else { 0.0 };
        for ch in 0..c {
            self.dsum_f32[ch] = live * (self.dsum[ch] / rows) as f32;
            self.dsum_xhat_f32[ch] = live * (self.dsum_xhat[ch] / rows) as f32;
            self.k[ch] = self.gamma.value[ch] * self.inv_std[ch];
        }
    }

    /// Update the running statistics from the sums of a whole batch (`Σx`, `Σx²`, rows).
    pub fn update_running(&mut self, s1: &[f64], s2: &[f64], rows: u64) {
        if rows == 0 {
            return;
        }
        let r = rows as f64;
        for ch in 0..self.channels {
            let m = s1[ch] / r;
            let var = (s2[ch] / r - m * m).max(0.0);
            let (rm, rv) = (&mut self.running_mean.value[ch], &mut self.running_var.value[ch]);
            match self.momentum {
                BnMomentum::Keras { momentum } => {
                    let k = momentum as f64;
                    *rm = (k * *rm as f64 + (1.0 - k) * m) as f32;
                    *rv = (k * *rv as f64 + (1.0 - k) * var) as f32;
                }
                BnMomentum::Torch { momentum } => {
                    let p = momentum as f64;
                    let unbiased = if rows > 1 { var * r / (r - 1.0) } else { var };
                    *rm = ((1.0 - p) * *rm as f64 + p * m) as f32;
                    *rv = ((1.0 - p) * *rv as f64 + p * unbiased) as f32;
                }
            }
        }
    }
}

impl BatchNorm {
    /// Fold this batch norm (its running statistics) into the layer before it, whose kernel `w` is
    /// `[fan_in, channels]` and bias `b` `[channels]`: with `σ_j = √(σ²_run,j + ε)`,
    /// `W_f[:, j] = W[:, j]·γ_j/σ_j` and `b_f,j = β_j + γ_j(b_j − μ_j)/σ_j`, so that
    /// `BN(x·W + b) = x·W_f + b_f` in evaluation mode (PyTorch's `fuse_conv_bn_weights`, candle's
    /// `absorb_bn`). The one implementation: PTQ and the exporter of batch-normalised models use it.
    pub fn fold_into(&self, w: &mut [f32], b: &mut [f32]) {
        let c = self.channels;
        let scale: Vec<f64> = (0..c)
            .map(|j| self.gamma.value[j] as f64 / (self.running_var.value[j] as f64 + self.epsilon as f64).sqrt())
            .collect();
        for row in w.chunks_exact_mut(c) {
            for (v, s) in row.iter_mut().zip(&scale) {
                *v = (*v as f64 * s) as f32;
            }
        }
        for j in 0..c {
            b[j] = (self.beta.value[j] as f64 + scale[j] * (b[j] as f64 - self.running_mean.value[j] as f64)) as f32;
        }
    }
}
