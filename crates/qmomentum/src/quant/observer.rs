//! Activation quantizers: range observers (min-max, EMA) and learned step size (LSQ).
//!
//! Every observer yields an unsigned grid `q ∈ [0, 2^b − 1]` with a zero point, the form the
//! integer runtime reads (u8 activations). Ranges always contain 0.
//!
//! * `min_max`: running min and max over every batch seen (PyTorch `MinMaxObserver`).
//! * `ema`: `r ← d·r + (1 − d)·r_batch`, first batch taken as is. `d` is the weight of the old value:
//!   TF-MOT uses `d = 0.999`; PyTorch's `averaging_constant = 0.01` is `d = 0.99`.
//! * `lsq`: learned step size (Esser et al., ICLR 2020): `v̂ = s·clamp(round(v/s), −Qn, Qp)`,
//!   `∂v̂/∂s = round(v/s) − v/s` inside the range, `−Qn` / `Qp` outside, scaled by
//!   `g = 1/√(N·Qp)` (N = features of the layer); `s` initialised to `2·mean|v|/√Qp` on the first
//!   batch. Unsigned (`Qn = 0`) after ReLU/sigmoid, signed otherwise.
//!
//! Observers can be frozen (ranges stop moving), as after N epochs of QAT.

use super::affine::QParams;
use serde::{Deserialize, Serialize};

/// How an activation range is found.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Observer {
    /// Running min/max.
    MinMax,
    /// Exponential moving average of batch min/max; `decay` is the weight of the old value.
    Ema {
        /// In [0, 1).
        decay: f32,
    },
    /// Learned step size.
    Lsq,
}

/// State of one activation quantizer.
#[derive(Clone, Debug, PartialEq)]
pub struct ActObserver {
    /// Bits (2 to 8).
    pub bits: u32,
    /// Range rule.
    pub observer: Observer,
    /// Lower end of the observed range.
    pub min: f32,
    /// Upper end of the observed range.
    pub max: f32,
    /// Learned step (LSQ only).
    pub lsq_scale: f32,
    /// Signed LSQ grid (the activation can be negative).
    pub signed: bool,
    /// Whether a batch has been seen.
    pub initialized: bool,
    /// Ranges no longer move.
    pub frozen: bool,
}

impl ActObserver {
    /// A fresh observer.
    pub fn new(bits: u32, observer: Observer, signed: bool) -> Self {
        ActObserver {
            bits,
            observer,
            min: 0.0,
            max: 0.0,
            lsq_scale: 1.0,
            signed,
            initialized: false,
            frozen: false,
        }
    }

    /// Feed one batch's statistics (`lo`, `hi`, `mean_abs`) in training.
    pub fn observe(&mut self, lo: f32, hi: f32, mean_abs: f32) {
        if self.frozen || !lo.is_finite() || !hi.is_finite() {
            return;
        }
        if !self.initialized {
            self.min = lo;
            self.max = hi;
            if self.observer == Observer::Lsq {
                let s = 2.0 * mean_abs / (self.qp() as f32).sqrt();
                self.lsq_scale = if s > 0.0 && s.is_finite() { s } else { 1.0 };
            }
            self.initialized = true;
            return;
        }
        match self.observer {
            Observer::MinMax => {
                self.min = self.min.min(lo);
                self.max = self.max.max(hi);
            }
            Observer::Ema { decay } => {
                self.min = decay * self.min + (1.0 - decay) * lo;
                self.max = decay * self.max + (1.0 - decay) * hi;
            }
            Observer::Lsq => {}
        }
    }

    /// Set the range from calibration (PTQ) and mark the observer initialised. An LSQ quantizer
    /// takes its step from that range too (`s = max(hi/Qp, −lo/Qn)`), so the calibrated grid covers
    /// the calibrated range whatever the rule.
    pub fn set_range(&mut self, lo: f32, hi: f32) {
        self.min = lo;
        self.max = hi;
        if self.observer == Observer::Lsq {
            let up = if hi > 0.0 { hi / self.qp() as f32 } else { 0.0 };
            let down = if lo < 0.0 && self.qn() > 0 {
                -lo / self.qn() as f32
            } else {
                0.0
            };
            let s = up.max(down);
            self.lsq_scale = if s > 0.0 && s.is_finite() { s } else { 1.0 };
        }
        self.initialized = true;
    }

    /// `Qp` of the LSQ grid.
    pub fn qp(&self) -> i32 {
        if self.signed {
            (1 << (self.bits - 1)) - 1
        } else {
            (1 << self.bits) - 1
        }
    }
    /// `Qn` of the LSQ grid.
    pub fn qn(&self) -> i32 {
        if self.signed {
            1 << (self.bits - 1)
        } else {
            0
        }
    }

    /// The grid in force (unsigned codes `[0, 2^b − 1]` with a zero point).
    pub fn qparams(&self) -> QParams {
        match self.observer {
            Observer::Lsq => QParams {
                scale: if self.lsq_scale > 0.0 && self.lsq_scale.is_finite() {
                    self.lsq_scale
                } else {
                    1.0
                },
                zero_point: self.qn(),
                qmin: 0,
                qmax: (1 << self.bits) - 1,
            },
            _ => QParams::asymmetric(self.min, self.max, self.bits),
        }
    }
}

/// LSQ gradient of `v̂` with respect to `s` for one value (before the `g` scale), and whether the
/// value is inside the range (the STE mask for `v`), with `r = v·(1/s)`: `round(r) − r` inside
/// `(−Qn, Qp)`, `−Qn` / `Qp` outside. The one implementation: the fused backward passes of every
/// layer call it (written without early returns so those passes vectorise).
#[inline(always)]
pub fn lsq_grad(v: f32, inv_s: f32, qn: i32, qp: i32) -> (f32, bool) {
    let r = v * inv_s;
    let (lo, hi) = (-(qn as f32), qp as f32);
    let inside = r > lo && r < hi;
    // Both candidates computed, then selected: no branch left in the loops that inline this
    // (a nested `if` here stayed a branch in a long fused pass, which then ran scalar).
    // `max`/`min`, not `clamp` (whose check of its bounds is a branch): the same value wherever
    // it is used (inside the range; a NaN `r` is outside).
    let rounded = super::affine::round_even_small(r.max(lo).min(hi)) - r;
    let edge = if r <= lo { lo } else { hi };
    (if inside { rounded } else { edge }, inside)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ema_and_minmax_follow_their_definitions() {
        let mut e = ActObserver::new(8, Observer::Ema { decay: 0.9 }, false);
        e.observe(0.0, 10.0, 1.0);
        e.observe(-1.0, 20.0, 1.0);
        assert!((e.max - 11.0).abs() < 1e-5 && (e.min + 0.1).abs() < 1e-6);
        let mut m = ActObserver::new(8, Observer::MinMax, false);
        m.observe(0.0, 10.0, 1.0);
        m.observe(-1.0, 5.0, 1.0);
        assert_eq!((m.min, m.max), (-1.0, 10.0));
        m.frozen = true;
        m.observe(-9.0, 99.0, 1.0);
        assert_eq!((m.min, m.max), (-1.0, 10.0));
        // Constant activations (all zero): defined grid, no NaN.
        let mut z = ActObserver::new(8, Observer::Ema { decay: 0.99 }, false);
        z.observe(0.0, 0.0, 0.0);
        assert_eq!(z.qparams().scale, 1.0);
    }

    /// PTQ of an LSQ layer: the calibrated range, not the untrained step 1.0, sets the grid.
    #[test]
    fn calibrated_range_sets_the_lsq_step() {
        let mut o = ActObserver::new(4, Observer::Lsq, false);
        o.set_range(0.0, 30.0);
        let q = o.qparams();
        assert!((q.scale - 2.0).abs() < 1e-6, "30/15 = 2, got {}", q.scale);
        assert_eq!(q.range(), (0.0, 30.0));
        let mut s = ActObserver::new(4, Observer::Lsq, true);
        s.set_range(-0.004, 0.0035); // Qn = 8, Qp = 7: s = max(0.0035/7, 0.004/8) = 0.0005
        assert!((s.qparams().scale - 0.0005).abs() < 1e-9);
    }

    #[test]
    fn lsq_init_follows_the_paper() {
        let mut o = ActObserver::new(4, Observer::Lsq, false);
        o.observe(0.0, 3.0, 0.75);
        // s = 2·0.75/√15
        assert!((o.lsq_scale - 1.5 / 15f32.sqrt()).abs() < 1e-6);
        assert_eq!(o.qparams().zero_point, 0);
        let s = ActObserver::new(4, Observer::Lsq, true);
        assert_eq!((s.qn(), s.qp(), s.qparams().zero_point), (8, 7, 8));
    }

    /// The LSQ step-size gradient checked by finite differences of its straight-through surrogate
    /// `v̂(s) = s·(r₀ + v/s − c₀)`, with `r₀ = round(v/s₀)` and `c₀ = v/s₀` frozen (the paper's
    /// `round_pass` idiom): its derivative at `s₀` is exactly LSQ's `round(v/s) − v/s`.
    #[test]
    fn lsq_gradient_matches_finite_differences_of_the_ste_surrogate() {
        let s0 = 0.37f32;
        for &v in &[0.1f32, 0.5, 1.33, 2.0, 2.6, -0.2] {
            let (g, inside) = lsq_grad(v, 1.0 / s0, 0, 7);
            let r0 = (v / s0).round_ties_even() as f64;
            let c0 = (v / s0) as f64;
            let f = |s: f64| {
                if inside {
                    s * (r0 + v as f64 / s - c0)
                } else if v / s0 <= 0.0 {
                    0.0 * s
                } else {
                    7.0 * s
                }
            };
            let h = 1e-4;
            let fd = (f(s0 as f64 + h) - f(s0 as f64 - h)) / (2.0 * h);
            assert!((fd - g as f64).abs() < 1e-3, "v={v}: fd {fd} vs lsq {g}");
        }
    }
}
