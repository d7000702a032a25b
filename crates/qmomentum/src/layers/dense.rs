//! `Dense`: `y = q_a(f(q_w(W)ᵀ·x + b))`, a fully connected layer with optional fake quantization.
//!
//! The kernel is stored `[inputs, outputs]` (the Keras layout) and initialised Glorot-uniform with
//! a zero bias, as Keras does. With a [`LayerQuant`], the forward pass uses the fake-quantized
//! kernel `ŵ` and fake-quantizes the output activations; the backward pass applies the
//! straight-through estimators of `crate::quant`. Element-wise work is fused: bias, activation and
//! the batch range statistics are one pass over the GEMM output, fake quantization one more, and
//! the backward pass folds the STE mask, the activation derivative and the bias gradient into a
//! single pass. No allocation after the first batch.
//!
//! ```
//! use qmomentum::layers::{Activation, Dense};
//! use qmomentum::rng::Rng;
//! let mut rng = Rng::new(0, 0);
//! let mut d = Dense::new(0, 3, 2, Activation::Relu, &mut rng);
//! let x = [1.0f32, 2.0, 3.0];
//! let mut y = [0.0f32; 2];
//! d.forward(&x, &mut y, 1, false, false);
//! assert!(y.iter().all(|&v| v >= 0.0));
//! ```

use super::activation::{softmax_rows, Activation};
use super::param::{Param, ParamKind};
use crate::gemm::{matmul, Op};
use crate::quant::affine::{
    bias_on_grid, fake_quant_weights_per_channel, fake_quant_weights_per_tensor, round_even_small, QParams,
};
use crate::quant::binary::{binarize, sign, ternarize};
use crate::quant::observer::{lsq_grad, ActObserver, Observer};
use crate::quant::{LayerQuant, WeightQuant};
use crate::rng::Rng;

/// Min, max and Σ|a| of a layer's outputs over (part of) a batch.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BatchStats {
    /// Smallest output.
    pub lo: f32,
    /// Largest output.
    pub hi: f32,
    /// Σ|a|.
    pub sum_abs: f64,
    /// Values counted.
    pub count: u64,
}

impl Default for BatchStats {
    fn default() -> Self {
        BatchStats {
            lo: f32::INFINITY,
            hi: f32::NEG_INFINITY,
            sum_abs: 0.0,
            count: 0,
        }
    }
}

impl BatchStats {
    /// Statistics of the union of two parts (exact for min/max; sums added in a fixed order).
    pub fn merge(self, o: BatchStats) -> BatchStats {
        BatchStats {
            lo: self.lo.min(o.lo),
            hi: self.hi.max(o.hi),
            sum_abs: self.sum_abs + o.sum_abs,
            count: self.count + o.count,
        }
    }
}

/// A fully connected layer.
#[derive(Clone, Debug)]
pub struct Dense {
    /// Index in the model (used in parameter names).
    pub index: usize,
    /// Input features.
    pub inputs: usize,
    /// Output features.
    pub outputs: usize,
    /// Activation applied after the bias.
    pub activation: Activation,
    /// Kernel `[inputs, outputs]` (latent float weights, or ±1 for Bop-trained binary weights).
    pub weight: Param,
    /// Bias `[outputs]`.
    pub bias: Param,
    /// Bop mode: the weights are ±1 parameters and `ŵ = w/√inputs` (see [`Dense::set_quant`]).
    pub bop: bool,
    /// Learned step of an LSQ activation quantizer.
    pub act_step: Option<Param>,
    /// Quantization of this layer.
    pub quant: LayerQuant,
    /// Output activation observer (when activations are quantized with 2 bits or more).
    pub observer: Option<ActObserver>,
    /// Scale of the grid this layer's input lies on (set by the model before each forward pass:
    /// 1/255 for pixels, the previous layer's output grid otherwise). With integer weights the
    /// bias is then quantized to the accumulator grid `s_in·s_w[j]`, exactly as the integer
    /// runtime adds it (int32 bias, the TFLite convention); straight-through in backward.
    pub input_scale: Option<f32>,
    /// Range statistics of the outputs of the last training batch (fed to the observer by the
    /// trainer once every replica's share of the batch is done).
    pub stats: BatchStats,
    // Scratch, sized on first use.
    b_hat: Vec<f32>,
    w_hat: Vec<f32>,
    w_scale: Vec<f32>,
    w_tmp: Vec<f32>,
    z: Vec<f32>,
    dz: Vec<f32>,
    dw_hat: Vec<f32>,
    qp: Option<QParams>,
}

impl Dense {
    /// A float layer with Glorot-uniform weights `U(−√(6/(in+out)), √(6/(in+out)))`, zero bias.
    pub fn new(index: usize, inputs: usize, outputs: usize, activation: Activation, rng: &mut Rng) -> Self {
        let limit = (6.0 / (inputs + outputs) as f32).sqrt();
        let w = (0..inputs * outputs)
            .map(|_| rng.uniform_range(-limit, limit))
            .collect();
        Dense {
            index,
            inputs,
            outputs,
            activation,
            weight: Param::new(
                format!("layers.{index}.weight"),
                ParamKind::Weight,
                vec![inputs, outputs],
                w,
            ),
            bias: Param::new(
                format!("layers.{index}.bias"),
                ParamKind::Bias,
                vec![outputs],
                vec![0.0; outputs],
            ),
            bop: false,
            act_step: None,
            quant: LayerQuant::default(),
            observer: None,
            stats: BatchStats::default(),
            input_scale: None,
            b_hat: Vec::new(),
            w_hat: Vec::new(),
            w_scale: Vec::new(),
            w_tmp: Vec::new(),
            z: Vec::new(),
            dz: Vec::new(),
            dw_hat: Vec::new(),
            qp: None,
        }
    }

    /// Apply a quantization. `bop` turns binary weights into ±1 parameters (the signs of the
    /// current weights) for the Bop optimizer, with the fixed scale `ŵ = w/√inputs`.
    ///
    /// Why a fixed scale: this MLP has no batch normalisation, and a learned per-channel scale
    /// trained by Momentum diverged in our runs (pre-activations left the STE window |z| ≤ 1 and
    /// the gradients died). With ±1 inputs, `w/√K` gives pre-activations of unit variance, a
    /// parameter-free normalisation; the biases still learn each channel's threshold.
    pub fn set_quant(&mut self, quant: LayerQuant, bop: bool) {
        self.quant = quant;
        self.act_step = None;
        self.weight.kind = ParamKind::Weight;
        self.bop = false;
        if let (Some(WeightQuant::Binary { .. }), true) = (quant.weights, bop) {
            for v in self.weight.value.iter_mut() {
                *v = sign(*v);
            }
            self.weight.kind = ParamKind::Binary;
            self.bop = true;
        }
        self.observer = match quant.activations {
            Some(a) if a.bits >= 2 => {
                if a.observer == Observer::Lsq {
                    self.act_step = Some(Param::new(
                        format!("layers.{}.act_step", self.index),
                        ParamKind::Scale,
                        vec![1],
                        vec![1.0],
                    ));
                }
                Some(ActObserver::new(a.bits, a.observer, !self.activation.non_negative()))
            }
            _ => None,
        };
    }

    /// True when the output is a sign (1-bit activation).
    pub fn sign_output(&self) -> bool {
        matches!(self.quant.activations, Some(a) if a.bits == 1)
    }

    /// The kernel the forward pass uses (`ŵ` if quantized) and its per-channel scales.
    pub fn effective_weights(&mut self) -> (&[f32], &[f32]) {
        self.quantize_weights();
        if self.quant.weights.is_some() {
            (&self.w_hat, &self.w_scale)
        } else {
            (&self.weight.value, &self.w_scale)
        }
    }

    /// The activation grid in force (after training or calibration).
    pub fn output_qparams(&self) -> Option<QParams> {
        let obs = self.observer.as_ref()?;
        let mut o = obs.clone();
        if let Some(p) = &self.act_step {
            o.lsq_scale = p.value[0];
        }
        o.initialized.then(|| o.qparams())
    }

    fn ensure(&mut self, batch: usize) {
        let n = batch * self.outputs;
        if self.z.len() < n {
            self.z.resize(n, 0.0);
            self.dz.resize(n, 0.0);
        }
        let wn = self.inputs * self.outputs;
        if self.quant.weights.is_some() && self.w_hat.len() != wn {
            self.w_hat.resize(wn, 0.0);
            self.dw_hat.resize(wn, 0.0);
        }
        if self.w_scale.len() != self.outputs {
            self.w_scale.resize(self.outputs, 1.0);
            self.w_tmp.resize(self.outputs, 0.0);
            self.b_hat.resize(self.outputs, 0.0);
        }
    }

    fn quantize_weights(&mut self) {
        self.ensure(0);
        let Some(wq) = self.quant.weights else { return };
        let w = &self.weight.value;
        let out = self.outputs;
        match wq {
            WeightQuant::Int {
                bits,
                per_channel: true,
                narrow,
            } => fake_quant_weights_per_channel(
                w,
                out,
                bits,
                narrow,
                &mut self.w_hat,
                &mut self.w_scale,
                &mut self.w_tmp,
            ),
            WeightQuant::Int {
                bits,
                per_channel: false,
                narrow,
            } => {
                let s = fake_quant_weights_per_tensor(w, bits, narrow, &mut self.w_hat);
                self.w_scale.fill(s);
            }
            WeightQuant::Binary { scaled } => {
                if self.bop {
                    // Bop: w is ±1 already, ŵ = w/√K.
                    let a = 1.0 / (self.inputs as f32).sqrt();
                    for (o, &v) in self.w_hat.iter_mut().zip(w) {
                        *o = a * v;
                    }
                    self.w_scale.fill(a);
                } else {
                    binarize(w, out, scaled, &mut self.w_hat, &mut self.w_scale)
                }
            }
            WeightQuant::Ternary { rule } => {
                ternarize(w, out, rule, &mut self.w_hat, &mut self.w_scale, &mut self.w_tmp)
            }
        }
    }

    /// Feed the statistics of a whole training batch to the observer (see [`Dense::stats`]).
    pub fn observe(&mut self, stats: BatchStats) {
        if stats.count == 0 {
            return;
        }
        if let Some(obs) = self.observer.as_mut() {
            if let Some(p) = &self.act_step {
                obs.lsq_scale = p.value[0];
            }
            obs.observe(stats.lo, stats.hi, (stats.sum_abs / stats.count as f64) as f32);
            if let (Some(p), Observer::Lsq) = (self.act_step.as_mut(), obs.observer) {
                p.value[0] = obs.lsq_scale;
            }
        }
    }

    /// Forward pass over `batch` rows: `x` is `[batch, inputs]`, `y` is `[batch, outputs]`.
    /// `training` records the output statistics in [`Dense::stats`]; the observer itself is
    /// updated by [`Dense::observe`] after the step, so a batch is quantized with the range
    /// observed through the previous batches (the first batch of a run, before any range
    /// exists, passes through unquantized). `logits` skips a softmax activation (the loss fuses
    /// it).
    pub fn forward(&mut self, x: &[f32], y: &mut [f32], batch: usize, training: bool, logits: bool) {
        self.ensure(batch);
        self.quantize_weights();
        let n = batch * self.outputs;
        let w: &[f32] = if self.quant.weights.is_some() {
            &self.w_hat
        } else {
            &self.weight.value
        };
        matmul(
            batch,
            self.outputs,
            self.inputs,
            x,
            Op::N,
            w,
            Op::N,
            &mut self.z[..n],
            false,
        );
        // The bias as the integer runtime adds it: round(b/(s_in·s_w))·s_in·s_w.
        let int_weights = matches!(
            self.quant.weights,
            Some(WeightQuant::Int { .. } | WeightQuant::Ternary { .. })
        );
        let bias: &[f32] = match (self.input_scale, int_weights) {
            (Some(s_in), true) => {
                for ((bh, &b), &sw) in self.b_hat.iter_mut().zip(&self.bias.value).zip(&self.w_scale) {
                    *bh = bias_on_grid(b, s_in, sw).1;
                }
                &self.b_hat
            }
            _ => &self.bias.value,
        };
        // Pass 1: bias + activation (+ range statistics).
        let act = self.activation;
        let sign_out = self.sign_output();
        let (mut lo, mut hi, mut sum_abs) = (f32::INFINITY, f32::NEG_INFINITY, 0.0f64);
        for (zr, yr) in self.z[..n]
            .chunks_exact_mut(self.outputs)
            .zip(y.chunks_exact_mut(self.outputs))
        {
            for ((z, yv), &b) in zr.iter_mut().zip(yr.iter_mut()).zip(bias) {
                *z += b;
                let a = if sign_out { sign(*z) } else { act.forward(*z) };
                lo = lo.min(a);
                hi = hi.max(a);
                sum_abs += a.abs() as f64;
                *yv = a;
            }
        }
        if act == Activation::Softmax && !logits && !sign_out {
            softmax_rows(&mut y[..n], self.outputs);
        }
        // Pass 2: fake quantization of the outputs.
        self.qp = None;
        if training {
            self.stats = BatchStats {
                lo,
                hi,
                sum_abs,
                count: n as u64,
            };
        }
        if let Some(obs) = self.observer.as_mut() {
            if let Some(p) = &self.act_step {
                obs.lsq_scale = p.value[0];
            }
            if obs.initialized {
                let qp = obs.qparams();
                // x̂ = s·(clamp(round(x/s + z)) − z), with 1/s multiplied rather than divided.
                let (inv, z) = (1.0 / qp.scale, qp.zero_point as f32);
                let (qmin, qmax) = (qp.qmin as f32, qp.qmax as f32);
                for v in y[..n].iter_mut() {
                    *v = (round_even_small((*v * inv + z).clamp(qmin, qmax)) - z) * qp.scale;
                }
                self.qp = Some(qp);
            }
        }
    }

    /// Backward pass. `x` is the forward input, `dy` the gradient of the output; writes the
    /// parameter gradients and, when `dx` is given, the input gradient.
    pub fn backward(&mut self, x: &[f32], dy: &[f32], dx: Option<&mut [f32]>, batch: usize) {
        let n = batch * self.outputs;
        let act = self.activation;
        let sign_out = self.sign_output();
        let qp = self.qp;
        let lsq = self
            .observer
            .as_ref()
            .filter(|o| o.observer == Observer::Lsq)
            .map(|o| (o.qn(), o.qp()));
        let mut ds = 0.0f32;
        let (z, dz, db) = (&self.z[..n], &mut self.dz[..n], &mut self.bias.grad);
        let relu = act == Activation::Relu;
        let relu_or_linear = matches!(act, Activation::Relu | Activation::Linear);
        // Each branch is one pass over the outputs (STE mask, activation derivative, bias
        // gradient); the common cases are written so the compiler vectorises them.
        match (sign_out, qp, lsq) {
            (false, None, _) if relu_or_linear || act == Activation::Softmax => {
                // Float outputs.
                backward_pass(z, dy, dz, db, |_, z, g| if relu && z <= 0.0 { 0.0 } else { g });
            }
            (false, Some(q), None) if relu_or_linear => {
                // Min-max or EMA grid: clipped STE inside the grid's range.
                let (lo, hi) = q.range();
                backward_pass(z, dy, dz, db, |_, z, g| {
                    let a = if relu { z.max(0.0) } else { z };
                    if a >= lo && a <= hi && (!relu || z > 0.0) {
                        g
                    } else {
                        0.0
                    }
                });
            }
            (false, Some(q), Some((qn, qpos))) if relu_or_linear => {
                // LSQ: also ∂v̂/∂s = round(v/s) − v/s inside, −Qn / Qp outside, summed per channel
                // in `w_tmp` (free during backward) so the pass stays vectorisable.
                let inv = 1.0 / q.scale;
                let (lo, hi) = (-(qn as f32), qpos as f32);
                let ds_col = &mut self.w_tmp[..self.outputs];
                ds_col.fill(0.0);
                backward_pass(z, dy, dz, db, |j, z, g| {
                    let a = if relu { z.max(0.0) } else { z };
                    let r = a * inv;
                    let inside = r > lo && r < hi;
                    ds_col[j] += g * if inside {
                        round_even_small(r.clamp(lo, hi)) - r
                    } else if r <= lo {
                        lo
                    } else {
                        hi
                    };
                    if inside && (!relu || z > 0.0) {
                        g
                    } else {
                        0.0
                    }
                });
                ds = ds_col.iter().sum();
            }
            _ => {
                // Everything else: sign outputs (clipped STE of sign, the hard-tanh derivative),
                // sigmoid/tanh, with or without a grid.
                backward_pass(z, dy, dz, db, |_, z, g| {
                    if sign_out {
                        return if z.abs() <= 1.0 { g } else { 0.0 };
                    }
                    let a = act.forward(z);
                    let g = match (qp, lsq) {
                        (Some(q), Some((qn, qpos))) => {
                            let (gs, inside) = lsq_grad(a, q.scale, qn, qpos);
                            ds += g * gs;
                            if inside {
                                g
                            } else {
                                0.0
                            }
                        }
                        (Some(q), None) => {
                            let (l, h) = q.range();
                            if a >= l && a <= h {
                                g
                            } else {
                                0.0
                            }
                        }
                        _ => g,
                    };
                    g * act.derivative(z, a)
                });
            }
        }
        if let (Some(p), Some((_, qpos))) = (self.act_step.as_mut(), lsq) {
            // LSQ gradient scale g = 1/√(N·Qp), N = features of the layer.
            p.grad[0] = ds / ((self.outputs as f32) * qpos as f32).sqrt();
        }
        // Weight gradient dŴ = Xᵀ·dZ, then the weight quantizer's backward.
        let w_for_dx: &[f32];
        match self.quant.weights {
            None | Some(WeightQuant::Int { .. }) | Some(WeightQuant::Ternary { .. }) => {
                // Plain STE: the symmetric max-scaled grid never clips its own weights.
                matmul(
                    self.inputs,
                    self.outputs,
                    batch,
                    x,
                    Op::T,
                    &self.dz[..n],
                    Op::N,
                    &mut self.weight.grad,
                    false,
                );
            }
            Some(WeightQuant::Binary { .. }) => {
                matmul(
                    self.inputs,
                    self.outputs,
                    batch,
                    x,
                    Op::T,
                    &self.dz[..n],
                    Op::N,
                    &mut self.dw_hat,
                    false,
                );
                if self.bop {
                    // ŵ = w/√K: ∂L/∂w = ∂L/∂ŵ/√K.
                    let a = 1.0 / (self.inputs as f32).sqrt();
                    for (g, &d) in self.weight.grad.iter_mut().zip(&self.dw_hat) {
                        *g = a * d;
                    }
                } else {
                    // Clipped STE: gradient passes where |w| ≤ 1.
                    for ((g, &d), &w) in self.weight.grad.iter_mut().zip(&self.dw_hat).zip(&self.weight.value) {
                        *g = if w.abs() <= 1.0 { d } else { 0.0 };
                    }
                }
            }
        }
        if let Some(dx) = dx {
            w_for_dx = if self.quant.weights.is_some() {
                &self.w_hat
            } else {
                &self.weight.value
            };
            matmul(
                batch,
                self.inputs,
                self.outputs,
                &self.dz[..n],
                Op::N,
                w_for_dx,
                Op::T,
                dx,
                false,
            );
        }
    }

    /// Parameters, in a fixed order (no allocation).
    pub fn params_iter(&self) -> impl Iterator<Item = &Param> {
        [&self.weight, &self.bias].into_iter().chain(self.act_step.as_ref())
    }
    /// Parameters, mutable, in the order of [`Dense::params_iter`].
    pub fn params_iter_mut(&mut self) -> impl Iterator<Item = &mut Param> {
        [&mut self.weight, &mut self.bias]
            .into_iter()
            .chain(self.act_step.as_mut())
    }
}

/// `dz = f(channel, z, dy)` for every output, and the bias gradient `Σ_rows dz` per channel,
/// in one pass (rows of `db.len()` channels). Inlined so each caller's `f` vectorises with it.
#[inline(always)]
fn backward_pass(z: &[f32], dy: &[f32], dz: &mut [f32], db: &mut [f32], mut f: impl FnMut(usize, f32, f32) -> f32) {
    let c = db.len();
    db.fill(0.0);
    for (zr, (dzr, dyr)) in z.chunks_exact(c).zip(dz.chunks_exact_mut(c).zip(dy.chunks_exact(c))) {
        for (j, (((&z, d), &g), b)) in zr.iter().zip(dzr.iter_mut()).zip(dyr).zip(db.iter_mut()).enumerate() {
            let v = f(j, z, g);
            *d = v;
            *b += v;
        }
    }
}
