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
//! The codes are those the step's forward pass used: the weight fake-quantizer writes them as
//! i8 in the pass that computes ŵ, so they are computed once per step. The per-weight state is
//! checkpointed (as `code + direction/4` in f32, made when a checkpoint is written), so a resumed
//! run tracks on; the step's pass works on the state as `4·code + direction` in an i16, so it
//! reads three bytes per weight (code and state) instead of the eight of ŵ and an f32 state.
//!
//! **Lazy decay.** Most weights neither flip nor oscillate at a given step, yet the EMA decays
//! every frequency every step: done eagerly, the pass reads and writes every frequency at every
//! step. Instead, steps are grouped in blocks of `K` (the largest `K ≤ 64` with
//! `(1 − m)^−K ≤ 2²⁰`); within a block the stored value is `S = f₀ + Σ_j m·(1 − m)^−j` over the
//! block's events `j = 1…K`, so that the true frequency after `k` steps of the block is
//! `f = (1 − m)^k·S`. An event adds `m·(1 − m)^−j` to one weight; nothing else is touched until
//! the block ends (or the epoch does), when one pass multiplies every `S` by `(1 − m)^k`. The
//! step's pass then reads the codes and the state and writes only the lanes where something
//! changed. The phase `k` is the tracker's step count within the epoch, which is checkpointed,
//! so a resumed run continues the same blocks. Equal to the eager EMA up to f32 rounding (tested
//! against it); an `m` so close to 1 that even one step exceeds the bound runs eagerly.

use crate::layers::Buffer;
use crate::simd::Region;
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
    /// The name of the checkpointed form of `last` ([`OscillationTracker::state`]),
    /// `layers.{i}.osc_last`.
    state_name: String,
    /// Oscillation frequency (EMA), stored lazily: the true value is `(1 − m)^k` times this,
    /// `k` being the steps since the last block boundary ([`OscillationTracker::freq_scale`]);
    /// `k = 0` at the end of each epoch.
    pub freq: Buffer,
    /// EMA of the integer code (only with iterative freezing: the value a weight freezes at).
    pub ema_code: Option<Buffer>,
    /// The previous code of each weight and the direction of its last change, packed as
    /// `4·code + direction` (direction −1, 0, +1) in an i16, [`FRESH`] before the first step.
    /// Two bytes per weight: this is read for every weight at every step, so its size is the
    /// pass's cost (an f32 form costs twice the traffic, and keeping an f32 copy up to date in
    /// the pass measured 3–5 ms per MLP epoch). The checkpoint holds it as f32 `code +
    /// direction/4`, made when asked for ([`OscillationTracker::state`]).
    last: Vec<i16>,
    flips: u64,
    oscillations: u64,
    steps: u64,
}

/// The packed state of a weight that has no previous code yet.
const FRESH: i16 = i16::MIN;

impl OscillationTracker {
    /// State for the `n` weights of layer `index`.
    pub fn new(index: usize, n: usize) -> Self {
        let b = |what: &str, v: f32| Buffer::new(format!("layers.{index}.osc_{what}"), vec![n], vec![v; n]);
        OscillationTracker {
            state_name: format!("layers.{index}.osc_last"),
            freq: b("freq", 0.0),
            ema_code: None,
            last: vec![FRESH; n],
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

    /// The previous codes and directions as the checkpoint holds them: a buffer named
    /// `layers.{i}.osc_last` of `code + direction/4` (exact in f32), NaN before the first step.
    pub fn state(&self) -> Buffer {
        let v = self
            .last
            .iter()
            .map(|&l| if l == FRESH { f32::NAN } else { l as f32 * 0.25 })
            .collect();
        Buffer::new(self.state_name.clone(), vec![self.last.len()], v)
    }

    /// The name of [`OscillationTracker::state`].
    pub fn state_name(&self) -> &str {
        &self.state_name
    }

    /// Restore [`OscillationTracker::state`] (a checkpoint being loaded; one value per weight).
    /// A value not of the form `code + direction/4` (a damaged file) is rounded to that form.
    pub fn set_state(&mut self, v: &[f32]) {
        assert_eq!(v.len(), self.last.len(), "one state per tracked weight");
        for (l, &s) in self.last.iter_mut().zip(v) {
            *l = pack_state(s);
        }
    }

    /// One step with the integer codes this step's forward pass used (written by the weight
    /// fake-quantizer in its own pass: the codes are computed once per step). Large kernels run
    /// in two halves on the runtime's spinning pool when `threads ≥ 2`.
    pub fn update(&mut self, codes: &[i8], momentum: f32, threads: usize) {
        assert_eq!(codes.len(), self.last.len(), "one code per tracked weight");
        let step = Step::new(self.steps, momentum);
        let (last, freq) = (&mut self.last[..], &mut self.freq.value[..]);
        // Measured when the pass still read ŵ (4 interleaved rounds, 4 epochs): W8A8 epoch
        // 0.2683 → 0.2539 s split in two; with rayon::join, whose worker sleeps between steps,
        // the same split measured no faster. Identical results (the halves' counts are added).
        let (flips, osc) = if let Some(at) = split_point(codes.len(), threads) {
            let (c0, c1) = codes.split_at(at);
            let (l0, l1) = last.split_at_mut(at);
            let (f0, f1) = freq.split_at_mut(at);
            let ((a, b), (x, y)) = qmomentum_runtime::pool::join(
                || pass(c0, l0, f0, step.add, step.eager),
                || pass(c1, l1, f1, step.add, step.eager),
            );
            (a + x, b + y)
        } else {
            pass(codes, last, freq, step.add, step.eager)
        };
        if let Some(e) = self.ema_code.as_mut() {
            update_ema(&mut e.value, codes.iter().map(|&c| c as f32), momentum);
        }
        self.finish_step(flips, osc, step);
    }

    /// What the next [`OscillationTracker::update`] with `codes` reads on each core, as
    /// `[first core, second core]` (all on the first without a split): the codes and the packed
    /// states. The trainer prefetches them at the end of each core's share of the step, so that
    /// the pass reads them from L2 (measured: the pass takes about twice as long from L3).
    pub(crate) fn regions(&self, codes: &[i8], threads: usize) -> [[Region; 2]; 2] {
        let n = codes.len().min(self.last.len());
        let at = split_point(n, threads).unwrap_or(n);
        let (c, l) = (&codes[..n], &self.last[..n]);
        [
            [Region::of(&c[..at]), Region::of(&l[..at])],
            [Region::of(&c[at..]), Region::of(&l[at..])],
        ]
    }

    /// Count the step; at the end of a block, bring the stored frequencies to their true values.
    fn finish_step(&mut self, flips: u32, osc: u32, step: Step) {
        self.flips += flips as u64;
        self.oscillations += osc as u64;
        self.steps += 1;
        if step.ends_block {
            self.flush(step.scale_after);
        }
    }

    /// Multiply the stored frequencies by the pending decay `k` (a pass every `K` steps).
    fn flush(&mut self, k: f32) {
        if k != 1.0 {
            for f in self.freq.value.iter_mut() {
                *f *= k;
            }
        }
    }

    /// The factor that turns a stored frequency into the true one now, for EMA weight
    /// `momentum` (1 at block boundaries): compare `stored·freq_scale(m)` with a threshold.
    /// Derived from the step count, so it is right after a checkpoint is loaded too.
    pub fn freq_scale(&self, momentum: f32) -> f32 {
        Step::pending(self.steps, momentum)
    }

    /// The epoch's counters `(flips, oscillations, steps)` (checkpointed, so a resumed epoch
    /// reports what an uninterrupted one does, and continues the same lazy-decay blocks).
    pub fn counts(&self) -> [u64; 3] {
        [self.flips, self.oscillations, self.steps]
    }

    /// Restore the epoch's counters.
    pub fn set_counts(&mut self, c: [u64; 3]) {
        [self.flips, self.oscillations, self.steps] = c;
    }

    /// The epoch's figures for layer `layer`, and reset the epoch counters. `momentum` is the
    /// EMA weight the epoch's steps used: the stored frequencies are brought to their true values
    /// first (a resumed run has not yet recomputed the pending decay).
    pub fn take_epoch(&mut self, layer: usize, threshold: f32, momentum: f32) -> LayerOscillation {
        self.flush(Step::pending(self.steps, momentum));
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

/// Where a pass over `n` weights splits between two cores (a multiple of the kernel's lanes), if
/// it does.
fn split_point(n: usize, threads: usize) -> Option<usize> {
    (threads >= 2 && n >= SPLIT_MIN).then(|| n.div_ceil(2 * LANES) * LANES)
}

/// Longest block of the lazy decay (see the module doc).
const MAX_BLOCK: u64 = 64;

/// What one step adds and when it flushes, from the step count within the epoch.
#[derive(Clone, Copy, Debug)]
struct Step {
    /// Eager EMA weight `m` (blocks impossible: `m` too close to 1), else 0.
    eager: f32,
    /// Lazy: what an event adds to the stored value, `m·(1 − m)^−j` at step `j` of the block.
    add: f32,
    /// `(1 − m)^j`: stored → true after this step.
    scale_after: f32,
    /// This step is the last of its block.
    ends_block: bool,
}

impl Step {
    /// Steps per block for EMA weight `m`: the largest `K ≤ 64` with `(1 − m)^−K ≤ 2²⁰`, 0 if
    /// none (then the EMA runs eagerly).
    fn block_len(m: f32) -> u64 {
        let keep = 1.0 - m as f64;
        if keep <= 0.0 {
            return 0;
        }
        let k = (20.0 * std::f64::consts::LN_2 / -keep.ln()).floor();
        if k >= MAX_BLOCK as f64 {
            MAX_BLOCK
        } else {
            k.max(0.0) as u64
        }
    }

    /// The step after `done` steps of the epoch.
    fn new(done: u64, m: f32) -> Step {
        let block = Step::block_len(m);
        if block == 0 {
            return Step {
                eager: m,
                add: 0.0,
                scale_after: 1.0,
                ends_block: false,
            };
        }
        let j = (done % block + 1) as i32;
        let keep = 1.0 - m as f64;
        Step {
            eager: 0.0,
            add: (m as f64 / keep.powi(j)) as f32,
            scale_after: keep.powi(j) as f32,
            ends_block: j as u64 == block,
        }
    }

    /// The decay pending after `done` steps of the epoch.
    fn pending(done: u64, m: f32) -> f32 {
        let block = Step::block_len(m);
        if block == 0 {
            return 1.0;
        }
        (1.0 - m as f64).powi((done % block) as i32) as f32
    }
}

/// A checkpointed state value (`code + direction/4`, NaN: none yet) in the working form. A value
/// that is not of that form (a damaged checkpoint) saturates rather than panics.
fn pack_state(s: f32) -> i16 {
    if s.is_nan() {
        FRESH
    } else {
        (s * 4.0).round().clamp(-8_000.0, 8_000.0) as i16
    }
}

/// The tracking pass: the step of each weight for this step's `codes`, `(flips, oscillations)`.
/// `last` is the packed state, `freq` the lazily decayed frequencies. On AVX-512 an explicit
/// kernel (`x86`); elsewhere [`pass_portable`], which is its reference (identical results,
/// tested).
fn pass(codes: &[i8], last: &mut [i16], freq: &mut [f32], add: f32, eager: f32) -> (u32, u32) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("popcnt")
    {
        // SAFETY: AVX-512F/BW and POPCNT were detected on the lines above; the slices are
        // checked inside.
        return unsafe { x86::pass(codes, last, freq, add, eager) };
    }
    pass_portable(codes, last, freq, add, eager)
}

/// One weight's step on the working state `s` for code `c`: its new state, whether its code
/// changed, whether that change reverses the previous one. The AVX-512 kernel
/// (`x86::pass`) is this, operation for operation.
#[inline(always)]
fn weight_step(s: i16, c: i16) -> (i16, bool, bool) {
    if s == FRESH {
        // No previous code: the state becomes the code with direction 0, no event.
        return (4 * c, false, false);
    }
    // Unpack: `s = 4p + d` with d ∈ {−1, 0, 1}, so `p = (s + 2) >> 2` (arithmetic shift).
    let p = (s + 2) >> 2;
    let (up, down) = (c > p, c < p);
    let (was_up, was_down) = (s > 4 * p, s < 4 * p);
    let o = (up && was_down) || (down && was_up);
    let ns = if up {
        4 * c + 1
    } else if down {
        4 * c - 1
    } else {
        s
    };
    (ns, up || down, o)
}

crate::simd::widest! {
    /// The portable [`pass`], one weight at a time (the reference of the AVX-512 kernel, and the
    /// path of CPUs without AVX-512BW, compiled for AVX2 where there is one).
    fn pass_portable(codes: &[i8], last: &mut [i16], freq: &mut [f32], add: f32, eager: f32) -> (u32, u32) {
        let (mut flips, mut osc) = (0u32, 0u32);
        for ((&c, l), f) in codes.iter().zip(last.iter_mut()).zip(freq.iter_mut()) {
            let (ns, ch, o) = weight_step(*l, c as i16);
            *l = ns;
            if eager > 0.0 {
                *f = eager * o as u32 as f32 + (1.0 - eager) * *f;
            } else if o {
                *f += add;
            }
            flips += ch as u32;
            osc += o as u32;
        }
        (flips, osc)
    }
}

/// The tracking pass on AVX-512, 32 weights per register (i16 states, i8 codes): the step of
/// [`weight_step`] on masks, counts by `popcnt` of the masks, and masked stores of only the lanes
/// that change (states, frequencies). Written with intrinsics because the
/// portable form spends its time reducing each chunk's counts horizontally (measured, f32 form:
/// tracking cost 35 % of the epoch). Bit-identical to [`pass_portable`] (tested).
#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{pass_portable, FRESH};
    use std::arch::x86_64::*;

    /// Weights per step of the kernel: one register of i16.
    const W: usize = 32;

    /// # Safety
    /// The CPU must support AVX-512F, AVX-512BW and POPCNT.
    #[target_feature(enable = "avx512f,avx512bw,popcnt")]
    pub(super) unsafe fn pass(codes: &[i8], last: &mut [i16], freq: &mut [f32], add: f32, eager: f32) -> (u32, u32) {
        let n = codes.len().min(last.len()).min(freq.len());
        let full = n / W * W;
        let (two, one) = (_mm512_set1_epi16(2), _mm512_set1_epi16(1));
        let fresh_v = _mm512_set1_epi16(FRESH);
        let (add_v, eager_v, keep_v) = (_mm512_set1_ps(add), _mm512_set1_ps(eager), _mm512_set1_ps(1.0 - eager));
        let (mut flips, mut osc) = (0u32, 0u32);
        for j in (0..full).step_by(W) {
            // SAFETY (whole block): `j + 32 ≤ full ≤ n`, at most the length of every slice, so
            // each load and (masked) store below stays inside its slice.
            unsafe {
                let c = _mm512_cvtepi8_epi16(_mm256_loadu_si256(codes.as_ptr().add(j) as *const __m256i));
                let s = _mm512_loadu_si512(last.as_ptr().add(j) as *const __m512i);
                let fresh = _mm512_cmpeq_epi16_mask(s, fresh_v);
                let live = !fresh;
                let p = _mm512_srai_epi16::<2>(_mm512_add_epi16(s, two));
                let p4 = _mm512_slli_epi16::<2>(p);
                let up = _mm512_mask_cmpgt_epi16_mask(live, c, p);
                let down = _mm512_mask_cmplt_epi16_mask(live, c, p);
                let was_up = _mm512_cmpgt_epi16_mask(s, p4);
                let was_down = _mm512_cmplt_epi16_mask(s, p4);
                let o = (up & was_down) | (down & was_up);
                // Branch-free: about one chunk in eight has a flip, at random, so a branch per
                // chunk mispredicts often (measured slower in the f32 form). Masked stores touch
                // only the lanes that change.
                let touch = up | down | fresh;
                let c4 = _mm512_slli_epi16::<2>(c);
                let mut ns = _mm512_mask_mov_epi16(s, up, _mm512_add_epi16(c4, one));
                ns = _mm512_mask_mov_epi16(ns, down, _mm512_sub_epi16(c4, one));
                ns = _mm512_mask_mov_epi16(ns, fresh, c4);
                _mm512_mask_storeu_epi16(last.as_mut_ptr().add(j), touch, ns);
                let f = freq.as_mut_ptr().add(j);
                for (h, m) in [(0usize, o as u16), (16, (o >> 16) as u16)] {
                    let fp = f.add(h);
                    if eager > 0.0 {
                        let fv = _mm512_loadu_ps(fp);
                        let ov = _mm512_maskz_mov_ps(m, _mm512_set1_ps(1.0));
                        _mm512_storeu_ps(fp, _mm512_add_ps(_mm512_mul_ps(eager_v, ov), _mm512_mul_ps(keep_v, fv)));
                    } else {
                        let fv = _mm512_maskz_loadu_ps(m, fp);
                        _mm512_mask_storeu_ps(fp, m, _mm512_add_ps(fv, add_v));
                    }
                }
                flips += (up | down).count_ones();
                osc += o.count_ones();
            }
        }
        let (a, b) = pass_portable(&codes[full..n], &mut last[full..n], &mut freq[full..n], add, eager);
        (flips + a, osc + b)
    }
}

/// Weights per chunk of a split: the AVX-512 kernel's 32 i16 lanes.
const LANES: usize = 32;

/// `e ← m·code + (1 − m)·e`, starting from the first code.
fn update_ema(ema: &mut [f32], codes: impl Iterator<Item = f32>, momentum: f32) {
    let keep = 1.0 - momentum;
    for (e, c) in ema.iter_mut().zip(codes) {
        *e = if e.is_nan() { c } else { momentum * c + keep * *e };
    }
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
        for codes in [[0i8, 0], [1, 1], [0, 2], [1, 3]] {
            t.update(&codes, 0.5, 1);
        }
        // m = 0.5: blocks of 20 steps, stored values scaled by powers of two (exact).
        let f: Vec<f32> = t.freq.value.iter().map(|&f| f * t.freq_scale(0.5)).collect();
        assert_eq!(f, vec![0.75, 0.0]);
        // The checkpointed state: code + direction/4 (weight 0 last went up to 1, weight 1 to 3).
        assert_eq!(t.state().value, vec![1.25, 3.25]);
        assert_eq!(t.state().name, "layers.0.osc_last");
        let r = t.take_epoch(3, 0.5, 0.5);
        assert_eq!(t.freq.value, vec![0.75, 0.0]);
        // 3 flips each for both weights over 4 steps; 2 oscillations (weight 0).
        assert_eq!(r.flips_per_step, 6.0 / 4.0);
        assert_eq!(r.oscillations_per_step, 2.0 / 4.0);
        assert_eq!(r.fraction_oscillating, 0.5);
        assert_eq!(r.mean_frequency, 0.375);
    }

    /// The eager definition, in f64: per weight `(previous code, last direction, frequency)`.
    fn reference(codes: &[Vec<i8>], m: f64) -> Vec<f64> {
        let n = codes[0].len();
        let (mut prev, mut dir, mut f) = (vec![None::<i8>; n], vec![0i8; n], vec![0.0f64; n]);
        for step in codes {
            for i in 0..n {
                let mut o = 0.0;
                if let Some(p) = prev[i].filter(|&p| p != step[i]) {
                    let d = (step[i] - p).signum();
                    o = (d == -dir[i]) as u8 as f64;
                    dir[i] = d;
                }
                f[i] = m * o + (1.0 - m) * f[i];
                prev[i] = Some(step[i]);
            }
        }
        f
    }

    /// Lazy decay against the eager EMA: 3 epochs of 150 steps (blocks of 64 end mid-epoch and
    /// at odd phases), 22,200 weights (chunks of 32 plus a tail) on one and two cores, a run
    /// resumed mid-block from its checkpointed buffers and counters only, and m = 1 (eager).
    #[test]
    fn lazy_decay_matches_the_eager_definition() {
        for m in [0.01f32, 0.3, 1.0] {
            let n = 600usize * 37;
            let mut rng = crate::rng::Rng::new(7, 0);
            // Codes that wander by −1/0/+1, often back and forth.
            let mut cur = vec![0i8; n];
            let mut all = Vec::new();
            for _ in 0..450 {
                for c in cur.iter_mut() {
                    let u = rng.uniform();
                    let d = if u < 0.1 {
                        -1
                    } else if u > 0.9 {
                        1
                    } else {
                        0
                    };
                    *c = (*c + d).clamp(-127, 127);
                }
                all.push(cur.clone());
            }
            let mut one = OscillationTracker::new(0, n);
            let mut two = OscillationTracker::new(0, n);
            let mut resumed: Option<OscillationTracker> = None;
            for (t, codes) in all.iter().enumerate() {
                one.update(codes, m, 1);
                two.update(codes, m, 2);
                if let Some(r) = resumed.as_mut() {
                    r.update(codes, m, 1);
                }
                if t == 200 {
                    // What a checkpoint keeps: the buffers and the counters (not the i16 copy).
                    let mut r = OscillationTracker::new(0, n);
                    r.set_state(&one.state().value);
                    r.freq.value.clone_from(&one.freq.value);
                    r.set_counts(one.counts());
                    resumed = Some(r);
                }
                if t % 150 == 149 {
                    let want = reference(&all[..=t], m as f64);
                    let a = one.take_epoch(0, 0.02, m);
                    let b = two.take_epoch(0, 0.02, m);
                    let c = resumed.as_mut().map(|r| r.take_epoch(0, 0.02, m));
                    assert_eq!(a, b, "m {m}, step {t}: one core vs two");
                    assert_eq!(one.freq.value, two.freq.value);
                    if let Some(c) = c {
                        assert_eq!(a, c, "m {m}, step {t}: resumed");
                        assert_eq!(one.freq.value, resumed.as_ref().unwrap().freq.value);
                    }
                    for (i, (&got, &w)) in one.freq.value.iter().zip(&want).enumerate() {
                        assert!(
                            (got as f64 - w).abs() <= 1e-5,
                            "m {m}, step {t}, weight {i}: {got} vs {w}"
                        );
                    }
                    // m = 1 keeps only the last step's events.
                    let need = if m < 1.0 { n / 2 } else { n / 100 };
                    assert!(want.iter().filter(|&&f| f > 0.0).count() > need, "the case oscillates");
                }
            }
        }
    }

    /// The AVX-512 pass against the portable one, bit for bit: lengths of 32·k and with tails,
    /// codes over the whole i8 range, states that are fresh, unchanged or any packed value
    /// (codes −128…127, each direction), both the lazy and the eager frequency update; and the
    /// checkpointed form of every state reads back to it.
    #[test]
    fn avx512_pass_is_the_portable_pass() {
        let mut rng = crate::rng::Rng::new(11, 0);
        for &n in &[32usize, 288, 259, 15, 384, 1031] {
            let last: Vec<i16> = (0..n)
                .map(|i| match i % 5 {
                    0 => FRESH,
                    _ => 4 * ((rng.uniform() * 256.0) as i16 - 128) + (i % 3) as i16 - 1,
                })
                .collect();
            let codes: Vec<i8> = (0..n)
                .map(|i| match i % 4 {
                    // The previous code, or one step from it: flips and oscillations.
                    0 | 1 if last[i] != FRESH => {
                        let p = (last[i] + 2) >> 2;
                        (p + (i % 3) as i16 - 1).clamp(-128, 127) as i8
                    }
                    _ => ((rng.uniform() * 256.0) as i16 - 128) as i8,
                })
                .collect();
            let freq: Vec<f32> = (0..n).map(|_| rng.uniform()).collect();
            for (add, eager) in [(0.013f32, 0.0f32), (0.0, 0.25)] {
                let (mut l1, mut f1) = (last.clone(), freq.clone());
                let (mut l2, mut f2) = (last.clone(), freq.clone());
                let a = pass(&codes, &mut l1, &mut f1, add, eager);
                let b = pass_portable(&codes, &mut l2, &mut f2, add, eager);
                assert_eq!(a, b, "n {n}");
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(l1, l2, "n {n} states");
                assert_eq!(bits(&f1), bits(&f2), "n {n} frequencies");
                let mut t = OscillationTracker::new(0, n);
                t.last.clone_from(&l1);
                let mut back = OscillationTracker::new(0, n);
                back.set_state(&t.state().value);
                assert_eq!(back.last, l1, "the checkpointed form reads back");
                if n >= 32 {
                    assert!(a.0 > 0 && a.1 > 0, "the case flips and oscillates");
                }
            }
        }
    }
}
