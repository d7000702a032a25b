//! Oscillation tracking of quantized weights (Nagel et al., "Overcoming Oscillations in
//! Quantization-Aware Training", ICML 2022), in the integer domain.
//!
//! At each optimizer step the integer code of every weight is compared with its code at the
//! previous step. A change is a *flip*; a flip whose direction is opposite to the weight's
//! previous change is an *oscillation*. Each weight's oscillation frequency is an EMA of those
//! events, `f ← m·osc + (1 − m)·f` (the paper's `m = 0.01`), updated every step. Per layer and
//! epoch we report flips and oscillations per step, the mean frequency and the fraction of
//! weights whose frequency exceeds a threshold. Binary weights (latent or Bop) use their sign as
//! the code, so Bop's flips and the ones that reverse a recent flip are counted the same way.
//!
//! The codes are those the step's forward pass used (computed once by the weight
//! fake-quantizer); the per-weight state is checkpointed, so a resumed run tracks on.

use crate::layers::Buffer;
use serde::{Deserialize, Serialize};

/// Settings (the `[oscillation]` table of a config).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OscillationConfig {
    /// Track quantized layers (cheap; on by default).
    pub track: bool,
    /// EMA weight of each new event (the paper's 0.01).
    pub momentum: f32,
    /// A weight "oscillates" when its frequency exceeds this.
    pub threshold: f32,
    /// Oscillation dampening: the final λ of the regulariser `λ·Σ(ŵ − w)²` (ŵ detached) on
    /// integer and ternary weights, annealed from 0 with a cosine over the run, as in the paper
    /// (0: off). The reported loss does not include it.
    pub dampening: f32,
    /// Iterative freezing: a weight whose oscillation frequency exceeds this threshold is frozen
    /// at the rounded EMA of its integer code, and the optimizer no longer moves it (0: off).
    /// With `freeze_threshold_start`, the threshold is cosine-annealed from that value down to
    /// this one over the run (a lenient start, a strict end).
    pub freeze_threshold: f32,
    /// The threshold at the first step (default: `freeze_threshold`, i.e. constant).
    pub freeze_threshold_start: Option<f32>,
}

impl OscillationConfig {
    /// Whether iterative freezing is on.
    pub fn freezing(&self) -> bool {
        self.freeze_threshold > 0.0
    }

    /// The freezing threshold at 0-based step `t` of `total`:
    /// `end + (start − end)·(1 + cos(π·t/total))/2`.
    pub fn freeze_threshold_at(&self, t: u64, total: u64) -> f32 {
        let end = self.freeze_threshold as f64;
        let start = self.freeze_threshold_start.unwrap_or(self.freeze_threshold) as f64;
        let x = (t as f64 / total.max(1) as f64).min(1.0);
        (end + (start - end) * (1.0 + (std::f64::consts::PI * x).cos()) / 2.0) as f32
    }

    /// λ at 0-based step `t` of `total`: `λ·(1 − cos(π·t/total))/2`.
    pub fn dampening_at(&self, t: u64, total: u64) -> f32 {
        if self.dampening <= 0.0 {
            return 0.0;
        }
        let x = (t as f64 / total.max(1) as f64).min(1.0);
        (self.dampening as f64 * (1.0 - (std::f64::consts::PI * x).cos()) / 2.0) as f32
    }
}

impl Default for OscillationConfig {
    fn default() -> Self {
        OscillationConfig {
            track: true,
            momentum: 0.01,
            threshold: 0.02,
            dampening: 0.0,
            freeze_threshold: 0.0,
            freeze_threshold_start: None,
        }
    }
}

/// One layer's figures for one epoch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerOscillation {
    /// Layer index.
    pub layer: usize,
    /// Code changes per step (all weights of the layer).
    pub flips_per_step: f32,
    /// Changes that reverse the previous change, per step.
    pub oscillations_per_step: f32,
    /// Mean oscillation frequency at the end of the epoch.
    pub mean_frequency: f32,
    /// Fraction of weights whose frequency exceeds the threshold.
    pub fraction_oscillating: f32,
    /// Fraction of weights frozen (iterative freezing; 0 when it is off).
    #[serde(default)]
    pub fraction_frozen: f32,
}

/// Per-weight state of one layer (buffers: checkpointed, never optimized).
#[derive(Clone, Debug)]
pub struct OscillationTracker {
    /// The code of the previous step and the direction of the weight's last change, packed in
    /// one value `4·code + (direction + 1)` (direction −1, 0, +1; exact in f32 for every code of
    /// an 8-bit grid); NaN before the first step. One value instead of two: this state is read
    /// and written for every weight at every step, so its size is the pass's cost.
    pub state: Buffer,
    /// Oscillation frequency (EMA).
    pub freq: Buffer,
    /// EMA of the integer code (only with iterative freezing: the value a weight freezes at).
    pub ema_code: Option<Buffer>,
    flips: u64,
    oscillations: u64,
    steps: u64,
}

impl OscillationTracker {
    /// State for the `n` weights of layer `index`.
    pub fn new(index: usize, n: usize) -> Self {
        let b = |what: &str, v: f32| Buffer::new(format!("layers.{index}.osc_{what}"), vec![n], vec![v; n]);
        OscillationTracker {
            state: b("state", f32::NAN),
            freq: b("freq", 0.0),
            ema_code: None,
            flips: 0,
            oscillations: 0,
            steps: 0,
        }
    }

    /// Keep an EMA of each weight's code too (for iterative freezing), named
    /// `layers.{index}.osc_ema_code`.
    pub fn with_code_ema(mut self, index: usize) -> Self {
        let n = self.freq.value.len();
        self.ema_code = Some(Buffer::new(
            format!("layers.{index}.osc_ema_code"),
            vec![n],
            vec![f32::NAN; n],
        ));
        self
    }

    /// One step with the codes of this step (as f32 integers).
    pub fn update(&mut self, codes: &[f32], momentum: f32) {
        let (state, freq) = (&mut self.state.value, &mut self.freq.value);
        let (flips, osc) = step_block(state, freq, codes.iter().copied(), momentum);
        if let Some(e) = self.ema_code.as_mut() {
            update_ema(&mut e.value, codes.iter().copied(), momentum);
        }
        self.count(flips, osc);
    }

    /// One step with the codes of a `[rows, outputs]` kernel on a per-column grid, computed on the
    /// fly as `round(ŵ·inv[j])`: one pass over ŵ and the state, no codes buffer (this pass runs
    /// at every step, so its memory traffic is its cost).
    pub fn update_from_grid(&mut self, w_hat: &[f32], inv: &[f32], momentum: f32, threads: usize) {
        let (state, freq) = (&mut self.state.value, &mut self.freq.value);
        // Large kernels: the rows in two halves, one per core, on the runtime's spinning pool.
        // Measured (4 interleaved rounds, 4 epochs): W8A8 epoch 0.2683 → 0.2539 s, W2A2
        // 0.3331 → 0.3151 s; with rayon::join, whose worker sleeps between steps, the same split
        // measured no faster. Identical results (the halves' counts are added).
        let c = inv.len().max(1);
        let rows = w_hat.len() / c;
        let (flips, osc) = if threads >= 2 && rows >= 2 && w_hat.len() >= SPLIT_MIN {
            let at = rows.div_ceil(2) * c;
            let (w0, w1) = w_hat.split_at(at);
            let (s0, s1) = state.split_at_mut(at);
            let (f0, f1) = freq.split_at_mut(at);
            let ((a, b), (x, y)) = qmomentum_runtime::pool::join(
                || grid_pass(w0, inv, s0, f0, momentum),
                || grid_pass(w1, inv, s1, f1, momentum),
            );
            (a + x, b + y)
        } else {
            grid_pass(w_hat, inv, state, freq, momentum)
        };
        if let Some(e) = self.ema_code.as_mut() {
            // The codes again (a second pass, only when freezing is on): `state` now holds them.
            update_ema(&mut e.value, self.state.value.iter().map(|&s| code_of(s)), momentum);
        }
        self.count(flips, osc);
    }

    fn count(&mut self, flips: u32, osc: u32) {
        self.flips += flips as u64;
        self.oscillations += osc as u64;
        self.steps += 1;
    }

    /// The epoch's counters `(flips, oscillations, steps)` (checkpointed, so a resumed epoch
    /// reports what an uninterrupted one does).
    pub fn counts(&self) -> [u64; 3] {
        [self.flips, self.oscillations, self.steps]
    }

    /// Restore the epoch's counters.
    pub fn set_counts(&mut self, c: [u64; 3]) {
        [self.flips, self.oscillations, self.steps] = c;
    }

    /// The epoch's figures for layer `layer`, and reset the epoch counters.
    pub fn take_epoch(&mut self, layer: usize, threshold: f32) -> LayerOscillation {
        let freq = &self.freq.value;
        let n = freq.len().max(1) as f64;
        let steps = self.steps.max(1) as f64;
        let mean = freq.iter().map(|&f| f as f64).sum::<f64>() / n;
        let above = freq.iter().filter(|&&f| f > threshold).count() as f64 / n;
        let r = LayerOscillation {
            layer,
            flips_per_step: (self.flips as f64 / steps) as f32,
            oscillations_per_step: (self.oscillations as f64 / steps) as f32,
            mean_frequency: mean as f32,
            fraction_oscillating: above as f32,
            fraction_frozen: 0.0,
        };
        self.flips = 0;
        self.oscillations = 0;
        self.steps = 0;
        r
    }
}

/// Kernels of at least this many weights are tracked on two cores.
const SPLIT_MIN: usize = 16 * 1024;

crate::simd::widest! {
    /// The tracking pass over a `[rows, inv.len()]` kernel: codes `round(ŵ·inv[j])`, then
    /// [`step_block`] row by row. Compiled for the widest instruction set (`crate::simd`): this
    /// pass runs over every weight at every step and the baseline build only vectorises it with
    /// SSE2; every version gives identical results.
    fn grid_pass(w_hat: &[f32], inv: &[f32], state: &mut [f32], freq: &mut [f32], momentum: f32) -> (u32, u32) {
        let c = inv.len();
        let (mut flips, mut osc) = (0u32, 0u32);
        for ((row, st), f) in w_hat
            .chunks_exact(c)
            .zip(state.chunks_exact_mut(c))
            .zip(freq.chunks_exact_mut(c))
        {
            let codes = row
                .iter()
                .zip(inv)
                .map(|(&v, &k)| super::affine::round_even_small(v * k));
            let (a, b) = step_block(st, f, codes, momentum);
            flips += a;
            osc += b;
        }
        (flips, osc)
    }
}

/// `e ← m·code + (1 − m)·e`, starting from the first code.
fn update_ema(ema: &mut [f32], codes: impl Iterator<Item = f32>, momentum: f32) {
    let keep = 1.0 - momentum;
    for (e, c) in ema.iter_mut().zip(codes) {
        *e = if e.is_nan() { c } else { momentum * c + keep * *e };
    }
}

/// The code held in a packed state value (NaN stays NaN): `(s − 1)/4` is the code ± 1/4.
#[inline(always)]
fn code_of(s: f32) -> f32 {
    super::affine::round_even_small((s - 1.0) * 0.25)
}

/// The per-weight step over one slice: `(flips, oscillations)`. Branch-free with integer
/// counters so the compiler vectorises it; inlined into both callers.
#[inline(always)]
fn step_block(state: &mut [f32], freq: &mut [f32], codes: impl Iterator<Item = f32>, momentum: f32) -> (u32, u32) {
    let (mut flips, mut osc) = (0u32, 0u32);
    let keep = 1.0 - momentum;
    for ((s, f), c) in state.iter_mut().zip(freq.iter_mut()).zip(codes) {
        // Unpack: previous code and direction (NaN before the first step: both comparisons
        // below are false, no change is seen, and the direction starts at 0).
        let p = code_of(*s);
        let d = *s - 4.0 * p - 1.0;
        let d = if d.is_nan() { 0.0 } else { d };
        let delta = c - p;
        let (up, down) = ((delta > 0.0) as u32, (delta < 0.0) as u32);
        let step_dir = up as f32 - down as f32;
        let changed = up | down;
        let o = changed & ((step_dir == -d) as u32);
        flips += changed;
        osc += o;
        *f = momentum * o as f32 + keep * *f;
        let nd = if changed != 0 { step_dir } else { d };
        *s = 4.0 * c + (nd + 1.0);
    }
    (flips, osc)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A weight whose code goes 0, 1, 0, 1 oscillates at every change after the first; one that
    /// climbs 0, 1, 2, 3 flips every step and never oscillates. EMA with m = 0.5 by hand:
    /// events (step 2: flip only; 3: osc; 4: osc) → f = 0, 0.5, 0.75.
    #[test]
    fn flips_and_oscillations_by_definition() {
        let mut t = OscillationTracker::new(0, 2);
        for codes in [[0.0, 0.0], [1.0, 1.0], [0.0, 2.0], [1.0, 3.0]] {
            t.update(&codes, 0.5);
        }
        assert_eq!(t.freq.value, vec![0.75, 0.0]);
        let r = t.take_epoch(3, 0.5);
        // 3 flips each for both weights over 4 steps; 2 oscillations (weight 0).
        assert_eq!(r.flips_per_step, 6.0 / 4.0);
        assert_eq!(r.oscillations_per_step, 2.0 / 4.0);
        assert_eq!(r.fraction_oscillating, 0.5);
        assert_eq!(r.mean_frequency, 0.375);
    }
}
