//! The activation fake-quantizer of a layer's outputs: the range rule (observer or learned step),
//! the batch statistics it learns from, the fake quantization `x̂ = s·(clamp(round(x/s)+z) − z)`
//! and the straight-through estimator of its backward pass.
//!
//! Layers with an output stage (dense, conv) hold one of these; the fused passes that use it are in
//! `crate::layers::epilogue`.

use super::affine::{round_even_small, QParams};
use super::observer::{lsq_grad, ActObserver, Observer};
use super::ActQuant;
use crate::layers::{Param, ParamKind};

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

/// The straight-through estimator of an output grid, as the backward pass applies it per value.
#[derive(Clone, Copy, Debug)]
pub enum Ste {
    /// Float outputs: the gradient passes.
    Pass,
    /// Min-max/EMA grid: the gradient passes inside `[lo, hi]` (the clipped STE).
    Clip {
        /// Lowest representable value.
        lo: f32,
        /// Highest representable value.
        hi: f32,
    },
    /// Learned step: the clipped STE on `[−Qn·s, Qp·s]` and LSQ's `∂v̂/∂s`.
    Lsq {
        /// `1/s`.
        inv: f32,
        /// `Qn`.
        qn: i32,
        /// `Qp`.
        qp: i32,
    },
}

/// Output quantization of one layer.
#[derive(Clone, Debug, Default)]
pub struct ActFakeQuant {
    /// The rule (none: float outputs; 1 bit: a sign activation, see [`ActFakeQuant::sign`]).
    pub quant: Option<ActQuant>,
    /// Range observer (outputs of 2 bits or more).
    pub observer: Option<ActObserver>,
    /// The learned step of an LSQ quantizer (a parameter the optimizer trains).
    pub step: Option<Param>,
    /// Range statistics of the outputs of the last training batch (fed to the observer by the
    /// trainer once every replica's share of the batch is done, and only if the step is taken).
    pub stats: BatchStats,
    qp: Option<QParams>,
}

impl ActFakeQuant {
    /// Configure for layer `index`; `signed` = the activation can be negative.
    pub fn configure(&mut self, quant: Option<ActQuant>, signed: bool, index: usize) {
        self.quant = quant;
        self.step = None;
        self.qp = None;
        self.observer = match quant {
            Some(a) if a.bits >= 2 => {
                if a.observer == Observer::Lsq {
                    self.step = Some(Param::new(
                        format!("layers.{index}.act_step"),
                        ParamKind::Scale,
                        vec![1],
                        vec![1.0],
                    ));
                }
                Some(ActObserver::new(a.bits, a.observer, signed))
            }
            _ => None,
        };
    }

    /// A 1-bit output: `sign(z)` replaces the activation.
    pub fn sign(&self) -> bool {
        matches!(self.quant, Some(a) if a.bits == 1)
    }

    /// The grid in force (after training or calibration).
    pub fn output_qparams(&self) -> Option<QParams> {
        let obs = self.observer.as_ref()?;
        let mut o = obs.clone();
        if let Some(p) = &self.step {
            o.lsq_scale = p.value[0];
        }
        o.initialized.then(|| o.qparams())
    }

    /// Feed the statistics of a whole training batch to the observer.
    pub fn observe(&mut self, stats: BatchStats) {
        if stats.count == 0 {
            return;
        }
        if let Some(obs) = self.observer.as_mut() {
            if let Some(p) = &self.step {
                obs.lsq_scale = p.value[0];
            }
            obs.observe(stats.lo, stats.hi, (stats.sum_abs / stats.count as f64) as f32);
            if let (Some(p), Observer::Lsq) = (self.step.as_mut(), obs.observer) {
                p.value[0] = obs.lsq_scale;
            }
        }
    }

    /// Fake-quantize the outputs `y` in place with the grid observed so far (none before the
    /// first batch of a run: that batch passes through unquantized). Remembers the grid for the
    /// backward pass.
    pub fn apply(&mut self, y: &mut [f32]) {
        if let Some(g) = self.grid() {
            fake_quant_values(y, g);
        }
    }

    /// The grid this forward pass quantizes on (what [`ActFakeQuant::apply`] uses and
    /// remembers), or `None` when the outputs pass through: for a caller that fake-quantizes the
    /// outputs in a pass of its own ([`Grid::fake_quant`]).
    pub fn grid(&mut self) -> Option<Grid> {
        self.qp = None;
        let obs = self.observer.as_mut()?;
        if let Some(p) = &self.step {
            obs.lsq_scale = p.value[0];
        }
        if !obs.initialized {
            return None;
        }
        let qp = obs.qparams();
        self.qp = Some(qp);
        Some(Grid {
            inv: 1.0 / qp.scale,
            zero: qp.zero_point as f32,
            qmin: qp.qmin as f32,
            qmax: qp.qmax as f32,
            scale: qp.scale,
        })
    }

    /// The estimator for the backward pass of the last forward pass.
    pub fn ste(&self) -> Ste {
        match (self.qp, self.observer.as_ref()) {
            (Some(q), Some(o)) if o.observer == Observer::Lsq => Ste::Lsq {
                inv: 1.0 / q.scale,
                qn: o.qn(),
                qp: o.qp(),
            },
            (Some(q), _) => {
                let (lo, hi) = q.range();
                Ste::Clip { lo, hi }
            }
            _ => Ste::Pass,
        }
    }

    /// Store the LSQ step gradient `Σ g·∂v̂/∂s`, scaled by `1/√(N·Qp)` (N = output features
    /// per sample).
    pub fn set_step_grad(&mut self, ds: f32, features: usize) {
        let ste = self.ste();
        if let (Some(p), Ste::Lsq { qp, .. }) = (self.step.as_mut(), ste) {
            p.grad[0] = ds / ((features as f32) * qp as f32).sqrt();
        }
    }
}

impl Ste {
    /// `(gradient that passes to the pre-quantization value, its term of ∂L/∂s)` for an output
    /// `a` with incoming gradient `g`. Inlined into the fused passes so they vectorise.
    #[inline(always)]
    pub fn apply(self, a: f32, g: f32) -> (f32, f32) {
        match self {
            Ste::Pass => (g, 0.0),
            Ste::Clip { lo, hi } => (if a >= lo && a <= hi { g } else { 0.0 }, 0.0),
            Ste::Lsq { inv, qn, qp } => {
                let (gs, inside) = lsq_grad(a, inv, qn, qp);
                (if inside { g } else { 0.0 }, g * gs)
            }
        }
    }
}

/// An activation grid as the fake quantization computes with it.
#[derive(Clone, Copy, Debug)]
pub struct Grid {
    /// `1/s`.
    pub inv: f32,
    /// The zero point `z`.
    pub zero: f32,
    /// Smallest code.
    pub qmin: f32,
    /// Largest code.
    pub qmax: f32,
    /// The step `s`.
    pub scale: f32,
}

impl Grid {
    /// `x̂ = s·(round(clamp(x/s + z, qmin, qmax)) − z)`, with 1/s multiplied rather than divided.
    #[inline(always)]
    pub fn fake_quant(self, x: f32) -> f32 {
        (round_even_small((x * self.inv + self.zero).clamp(self.qmin, self.qmax)) - self.zero) * self.scale
    }
}

crate::simd::widest! {
    /// [`Grid::fake_quant`] of every value, in place.
    fn fake_quant_values(y: &mut [f32], g: Grid) {
        for v in y.iter_mut() {
            *v = g.fake_quant(*v);
        }
    }
}
