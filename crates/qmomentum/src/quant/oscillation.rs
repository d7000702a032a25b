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
//!
//! **Lazy decay.** Most weights neither flip nor oscillate at a given step, yet the EMA decays
//! every frequency every step: done eagerly, the pass reads and writes every frequency at every
//! step. Instead, steps are grouped in blocks of `K` (the largest `K ≤ 64` with
//! `(1 − m)^−K ≤ 2²⁰`); within a block the stored value is `S = f₀ + Σ_j m·(1 − m)^−j` over the
//! block's events `j = 1…K`, so that the true frequency after `k` steps of the block is
//! `f = (1 − m)^k·S`. An event adds `m·(1 − m)^−j` to one weight; nothing else is touched until
//! the block ends (or the epoch does), when one pass multiplies every `S` by `(1 − m)^k`. The
//! step's pass then reads ŵ and the state and writes only the 16-weight chunks where something
//! changed. The phase `k` is the tracker's step count within the epoch, which is checkpointed,
//! so a resumed run continues the same blocks. Equal to the eager EMA up to f32 rounding (tested
//! against it); an `m` so close to 1 that even one step exceeds the bound runs eagerly.

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
    /// one value `code + direction/4` (direction −1, 0, +1; exact in f32 for every code of an
    /// 8-bit grid): the code is its nearest integer, the direction the sign of the rest; NaN
    /// before the first step. One value instead of two: this state is read for every weight at
    /// every step, so its size is the pass's cost; and the encoding costs few instructions to
    /// unpack (the pass is compute-bound once the data are in cache).
    pub state: Buffer,
    /// Oscillation frequency (EMA), stored lazily: the true value is `(1 − m)^k` times this,
    /// `k` being the steps since the last block boundary ([`OscillationTracker::freq_scale`]);
    /// `k = 0` at the end of each epoch.
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
            state: b("last", f32::NAN),
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
        let step = Step::new(self.steps, momentum);
        let (state, freq) = (&mut self.state.value, &mut self.freq.value);
        let (flips, osc) = codes_pass(codes, state, freq, step.add, step.eager);
        if let Some(e) = self.ema_code.as_mut() {
            update_ema(&mut e.value, codes.iter().copied(), momentum);
        }
        self.finish_step(flips, osc, step);
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
        let step = Step::new(self.steps, momentum);
        let c = inv.len().max(1);
        let rows = w_hat.len() / c;
        let (flips, osc) = if threads >= 2 && rows >= 2 && w_hat.len() >= SPLIT_MIN {
            let at = rows.div_ceil(2) * c;
            let (w0, w1) = w_hat.split_at(at);
            let (s0, s1) = state.split_at_mut(at);
            let (f0, f1) = freq.split_at_mut(at);
            let ((a, b), (x, y)) = qmomentum_runtime::pool::join(
                || grid_pass(w0, inv, s0, f0, step.add, step.eager),
                || grid_pass(w1, inv, s1, f1, step.add, step.eager),
            );
            (a + x, b + y)
        } else {
            grid_pass(w_hat, inv, state, freq, step.add, step.eager)
        };
        if let Some(e) = self.ema_code.as_mut() {
            // The codes again (a second pass, only when freezing is on): `state` now holds them.
            update_ema(&mut e.value, self.state.value.iter().map(|&s| code_of(s)), momentum);
        }
        self.finish_step(flips, osc, step);
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

/// The tracking pass over a `[rows, inv.len()]` kernel: codes `round(ŵ·inv[j])`, then the step
/// of each weight. `(flips, oscillations)`. On AVX-512 an explicit kernel (`x86`); elsewhere the
/// portable code below, which is its reference (identical results, tested).
fn grid_pass(w_hat: &[f32], inv: &[f32], state: &mut [f32], freq: &mut [f32], add: f32, eager: f32) -> (u32, u32) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("popcnt") {
        // SAFETY: AVX-512F and POPCNT were detected on the line above; the slices are checked
        // inside.
        return unsafe { x86::grid_pass(w_hat, inv, state, freq, add, eager) };
    }
    grid_pass_portable(w_hat, inv, state, freq, add, eager)
}

/// [`grid_pass`] for codes given (binary weights: their signs).
fn codes_pass(codes: &[f32], state: &mut [f32], freq: &mut [f32], add: f32, eager: f32) -> (u32, u32) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("popcnt") {
        // SAFETY: as in `grid_pass`.
        return unsafe { x86::codes_pass(codes, state, freq, add, eager) };
    }
    codes_pass_portable(codes, state, freq, add, eager)
}

crate::simd::widest! {
    /// The portable [`grid_pass`]: [`chunk_step`] 16 weights at a time, compiled for the widest
    /// instruction set (`crate::simd`; the baseline build only vectorises it with SSE2).
    fn grid_pass_portable(w_hat: &[f32], inv: &[f32], state: &mut [f32], freq: &mut [f32], add: f32, eager: f32) -> (u32, u32) {
        let c = inv.len();
        let (mut flips, mut osc) = (0u32, 0u32);
        for ((row, st), f) in w_hat
            .chunks_exact(c)
            .zip(state.chunks_exact_mut(c))
            .zip(freq.chunks_exact_mut(c))
        {
            let mut codes = [0.0f32; LANES];
            for (((w, k), st), f) in row
                .chunks(LANES)
                .zip(inv.chunks(LANES))
                .zip(st.chunks_mut(LANES))
                .zip(f.chunks_mut(LANES))
            {
                for ((c, &v), &k) in codes.iter_mut().zip(w).zip(k) {
                    *c = super::affine::round_even_small(v * k);
                }
                let (a, b) = chunk_step(st, f, &codes[..w.len()], add, eager);
                flips += a;
                osc += b;
            }
        }
        (flips, osc)
    }
}

crate::simd::widest! {
    /// The portable [`codes_pass`].
    fn codes_pass_portable(codes: &[f32], state: &mut [f32], freq: &mut [f32], add: f32, eager: f32) -> (u32, u32) {
        let (mut flips, mut osc) = (0u32, 0u32);
        for ((c, st), f) in codes.chunks(LANES).zip(state.chunks_mut(LANES)).zip(freq.chunks_mut(LANES)) {
            let (a, b) = chunk_step(st, f, c, add, eager);
            flips += a;
            osc += b;
        }
        (flips, osc)
    }
}

/// The tracking step on AVX-512, 16 weights per register: the step of [`weight_step`] on
/// masks, counts by `popcnt` of the masks, and masked stores of only the lanes that change.
/// Written with intrinsics because the portable form, which the compiler does vectorise,
/// spends most of its time reducing each chunk's counts and "changed" flag horizontally
/// (measured: W8A8 tracking cost 35 % of the epoch in that form). Every operation is the
/// portable one in the same order, so the results are bit-identical (tested).
#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{chunk_step, LANES};
    use std::arch::x86_64::*;

    /// # Safety
    /// The CPU must support AVX-512F and POPCNT.
    #[target_feature(enable = "avx512f,popcnt")]
    pub(super) unsafe fn grid_pass(
        w_hat: &[f32],
        inv: &[f32],
        state: &mut [f32],
        freq: &mut [f32],
        add: f32,
        eager: f32,
    ) -> (u32, u32) {
        let c = inv.len();
        let full = c / LANES * LANES;
        let k = Consts::new(add, eager);
        let mut acc = (0u32, 0u32);
        let (mut flips, mut osc) = (0u32, 0u32);
        for ((row, st), f) in w_hat
            .chunks_exact(c)
            .zip(state.chunks_exact_mut(c))
            .zip(freq.chunks_exact_mut(c))
        {
            for j in (0..full).step_by(LANES) {
                // SAFETY: `j + 16 ≤ full ≤ c`, the length of `row`, `inv`, `st` and `f`.
                unsafe {
                    let w = _mm512_loadu_ps(row.as_ptr().add(j));
                    let s = _mm512_loadu_ps(inv.as_ptr().add(j));
                    let codes = round_even(_mm512_mul_ps(w, s));
                    step16(st.as_mut_ptr().add(j), f.as_mut_ptr().add(j), codes, &k, &mut acc);
                }
            }
            if full < c {
                let mut codes = [0.0f32; LANES];
                for ((c, &v), &s) in codes.iter_mut().zip(&row[full..]).zip(&inv[full..]) {
                    *c = crate::quant::affine::round_even_small(v * s);
                }
                let (a, b) = chunk_step(&mut st[full..], &mut f[full..], &codes[..c - full], add, eager);
                flips += a;
                osc += b;
            }
        }
        (flips + acc.0, osc + acc.1)
    }

    /// # Safety
    /// The CPU must support AVX-512F and POPCNT.
    #[target_feature(enable = "avx512f,popcnt")]
    pub(super) unsafe fn codes_pass(
        codes: &[f32],
        state: &mut [f32],
        freq: &mut [f32],
        add: f32,
        eager: f32,
    ) -> (u32, u32) {
        let n = codes.len().min(state.len()).min(freq.len());
        let full = n / LANES * LANES;
        let k = Consts::new(add, eager);
        let mut acc = (0u32, 0u32);
        for j in (0..full).step_by(LANES) {
            // SAFETY: `j + 16 ≤ full ≤ n`, at most the length of each slice.
            unsafe {
                let c = _mm512_loadu_ps(codes.as_ptr().add(j));
                step16(state.as_mut_ptr().add(j), freq.as_mut_ptr().add(j), c, &k, &mut acc);
            }
        }
        let (a, b) = chunk_step(&mut state[full..n], &mut freq[full..n], &codes[full..n], add, eager);
        (a + acc.0, b + acc.1)
    }

    /// Broadcast constants of one pass.
    struct Consts {
        add: __m512,
        eager: __m512,
        keep: __m512,
        is_eager: bool,
    }

    impl Consts {
        #[target_feature(enable = "avx512f,popcnt")]
        fn new(add: f32, eager: f32) -> Consts {
            Consts {
                add: _mm512_set1_ps(add),
                eager: _mm512_set1_ps(eager),
                keep: _mm512_set1_ps(1.0 - eager),
                is_eager: eager > 0.0,
            }
        }
    }

    /// `(x + 1.5·2²³) − 1.5·2²³`, as `round_even_small`.
    #[inline]
    #[target_feature(enable = "avx512f,popcnt")]
    fn round_even(x: __m512) -> __m512 {
        let magic = _mm512_set1_ps(12_582_912.0);
        _mm512_sub_ps(_mm512_add_ps(x, magic), magic)
    }

    /// `weight_step` and the frequency update of `chunk_step` on 16 weights; the flips and
    /// oscillations are counted per lane in `acc`.
    ///
    /// # Safety
    /// `st` and `f` must be valid for reading and writing 16 f32 each.
    #[inline]
    #[target_feature(enable = "avx512f,popcnt")]
    unsafe fn step16(st: *mut f32, f: *mut f32, c: __m512, k: &Consts, acc: &mut (u32, u32)) {
        let quarter = _mm512_set1_ps(0.25);
        // SAFETY: the caller's promise.
        let s = unsafe { _mm512_loadu_ps(st) };
        let p = round_even(s);
        let up = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(c, p);
        let down = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(c, p);
        let was_up = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(s, p);
        let was_down = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(s, p);
        let fresh = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(s, s);
        let o = (up & was_down) | (down & was_up);
        let changed = up | down;
        // Branch-free: about one chunk in eight has a flip, at random, so a branch per chunk
        // mispredicts often (measured slower). Masked stores write only the lanes that change.
        // SAFETY (all blocks): the caller's promise.
        unsafe {
            _mm512_mask_storeu_ps(st, up, _mm512_add_ps(c, quarter));
            _mm512_mask_storeu_ps(st, down, _mm512_sub_ps(c, quarter));
            _mm512_mask_storeu_ps(st, fresh, c);
        }
        if k.is_eager {
            unsafe {
                let fv = _mm512_loadu_ps(f);
                let ov = _mm512_maskz_mov_ps(o, _mm512_set1_ps(1.0));
                _mm512_storeu_ps(f, _mm512_add_ps(_mm512_mul_ps(k.eager, ov), _mm512_mul_ps(k.keep, fv)));
            }
        } else {
            unsafe {
                let fv = _mm512_maskz_loadu_ps(o, f);
                _mm512_mask_storeu_ps(f, o, _mm512_add_ps(fv, k.add));
            }
        }
        acc.0 += changed.count_ones();
        acc.1 += o.count_ones();
    }
}

/// Weights per chunk: one AVX-512 register of f32.
const LANES: usize = 16;

/// `e ← m·code + (1 − m)·e`, starting from the first code.
fn update_ema(ema: &mut [f32], codes: impl Iterator<Item = f32>, momentum: f32) {
    let keep = 1.0 - momentum;
    for (e, c) in ema.iter_mut().zip(codes) {
        *e = if e.is_nan() { c } else { momentum * c + keep * *e };
    }
}

/// The code held in a packed state value (NaN stays NaN): the nearest integer.
#[inline(always)]
fn code_of(s: f32) -> f32 {
    super::affine::round_even_small(s)
}

/// One weight's step: its new packed state, whether its code changed, and whether that change
/// reverses the previous one. Branch-free so that the compiler vectorises the loops around it;
/// the AVX-512 kernel (`x86::step16`) is this, operation for operation.
#[inline(always)]
fn weight_step(s: f32, c: f32) -> (f32, u32, u32) {
    // Unpack: previous code and direction. NaN before the first step: every comparison is
    // false, so no change is seen, and the state becomes the code with direction 0.
    let p = code_of(s);
    let (up, down) = ((c > p) as u32, (c < p) as u32);
    let (was_up, was_down) = ((s > p) as u32, (s < p) as u32);
    let o = (up & was_down) | (down & was_up);
    let ns = if up != 0 {
        c + 0.25
    } else if down != 0 {
        c - 0.25
    } else if s.is_nan() {
        c
    } else {
        s
    };
    (ns, up | down, o)
}

/// The step over up to [`LANES`] weights: `(flips, oscillations)`. The new states are computed
/// in registers and stored only if one differs from the old (a first step, or a flip); with
/// lazy decay the frequencies are read and written only then too. `eager > 0` runs the plain
/// EMA `f ← m·o + (1 − m)·f` on every weight instead.
#[inline(always)]
fn chunk_step(state: &mut [f32], freq: &mut [f32], codes: &[f32], add: f32, eager: f32) -> (u32, u32) {
    match (
        <&mut [f32; LANES]>::try_from(&mut *state),
        <&mut [f32; LANES]>::try_from(&mut *freq),
        <&[f32; LANES]>::try_from(codes),
    ) {
        (Ok(s), Ok(f), Ok(c)) => full_chunk(s, f, c, add, eager),
        _ => {
            // A row's tail: one weight at a time.
            let (mut flips, mut osc) = (0u32, 0u32);
            for ((s, f), &c) in state.iter_mut().zip(freq.iter_mut()).zip(codes) {
                let (ns, ch, o) = weight_step(*s, c);
                *s = ns;
                if eager > 0.0 {
                    *f = eager * o as f32 + (1.0 - eager) * *f;
                } else if o != 0 {
                    *f += add;
                }
                flips += ch;
                osc += o;
            }
            (flips, osc)
        }
    }
}

/// [`chunk_step`] on exactly [`LANES`] weights (fixed-size arrays, so that the loops compile to
/// one vector register each).
#[inline(always)]
fn full_chunk(
    state: &mut [f32; LANES],
    freq: &mut [f32; LANES],
    codes: &[f32; LANES],
    add: f32,
    eager: f32,
) -> (u32, u32) {
    let mut ns = [0.0f32; LANES];
    let mut ch = [0u32; LANES];
    let mut os = [0u32; LANES];
    let mut differs = 0u32;
    for i in 0..LANES {
        let (s, c, o) = weight_step(state[i], codes[i]);
        differs |= (s.to_bits() != state[i].to_bits()) as u32;
        ns[i] = s;
        ch[i] = c;
        os[i] = o;
    }
    let mut flips = 0u32;
    let mut osc = 0u32;
    for i in 0..LANES {
        flips += ch[i];
        osc += os[i];
    }
    if eager > 0.0 {
        let keep = 1.0 - eager;
        for i in 0..LANES {
            freq[i] = eager * os[i] as f32 + keep * freq[i];
        }
    } else if osc > 0 {
        // Only the oscillating lanes, as the AVX-512 kernel's masked store.
        for i in 0..LANES {
            freq[i] = if os[i] != 0 { freq[i] + add } else { freq[i] };
        }
    }
    if differs != 0 {
        *state = ns;
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
        // m = 0.5: blocks of 20 steps, stored values scaled by powers of two (exact).
        let f: Vec<f32> = t.freq.value.iter().map(|&f| f * t.freq_scale(0.5)).collect();
        assert_eq!(f, vec![0.75, 0.0]);
        let r = t.take_epoch(3, 0.5, 0.5);
        assert_eq!(t.freq.value, vec![0.75, 0.0]);
        // 3 flips each for both weights over 4 steps; 2 oscillations (weight 0).
        assert_eq!(r.flips_per_step, 6.0 / 4.0);
        assert_eq!(r.oscillations_per_step, 2.0 / 4.0);
        assert_eq!(r.fraction_oscillating, 0.5);
        assert_eq!(r.mean_frequency, 0.375);
    }

    /// The eager definition, in f64: per weight `(previous code, last direction, frequency)`.
    fn reference(codes: &[Vec<f32>], m: f64) -> Vec<f64> {
        let n = codes[0].len();
        let (mut prev, mut dir, mut f) = (vec![f32::NAN; n], vec![0.0f32; n], vec![0.0f64; n]);
        for step in codes {
            for i in 0..n {
                let mut o = 0.0;
                if !prev[i].is_nan() && step[i] != prev[i] {
                    let d = (step[i] - prev[i]).signum();
                    o = (d == -dir[i]) as u8 as f64;
                    dir[i] = d;
                }
                f[i] = m * o + (1.0 - m) * f[i];
                prev[i] = step[i];
            }
        }
        f
    }

    /// Lazy decay against the eager EMA: 3 epochs of 150 steps (blocks of 64 end mid-epoch and
    /// at odd phases), kernels of 37 columns (chunks of 16 plus a tail) on one and two cores, a
    /// run resumed from a copy of its buffers and counters mid-block, and m = 1 (eager).
    #[test]
    fn lazy_decay_matches_the_eager_definition() {
        for m in [0.01f32, 0.3, 1.0] {
            let (rows, cols) = (600usize, 37usize);
            let n = rows * cols;
            let inv = vec![1.0f32; cols];
            let mut rng = crate::rng::Rng::new(7, 0);
            // Codes that wander by −1/0/+1, often back and forth.
            let mut cur = vec![0.0f32; n];
            let mut all = Vec::new();
            for _ in 0..450 {
                for c in cur.iter_mut() {
                    let u = rng.uniform();
                    *c += if u < 0.1 {
                        -1.0
                    } else if u > 0.9 {
                        1.0
                    } else {
                        0.0
                    };
                }
                all.push(cur.clone());
            }
            let mut one = OscillationTracker::new(0, n);
            let mut two = OscillationTracker::new(0, n);
            let mut resumed: Option<OscillationTracker> = None;
            for (t, codes) in all.iter().enumerate() {
                one.update_from_grid(codes, &inv, m, 1);
                two.update_from_grid(codes, &inv, m, 2);
                if let Some(r) = resumed.as_mut() {
                    r.update_from_grid(codes, &inv, m, 1);
                }
                if t == 200 {
                    // What a checkpoint keeps: the buffers and the counters.
                    let mut r = OscillationTracker::new(0, n);
                    r.state.value.clone_from(&one.state.value);
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

    /// The AVX-512 pass against the portable one, bit for bit: random kernels of 16·k and odd
    /// widths, codes with ties (x.5), states that are NaN, unchanged or any packed value, both the
    /// lazy and the eager frequency update, and the codes-given pass.
    #[test]
    fn avx512_pass_is_the_portable_pass() {
        let mut rng = crate::rng::Rng::new(11, 0);
        for &(rows, cols) in &[(9usize, 16usize), (7, 37), (5, 3), (3, 128)] {
            let n = rows * cols;
            let inv: Vec<f32> = (0..cols).map(|_| rng.uniform_range(0.5, 8.0)).collect();
            let w: Vec<f32> = (0..n)
                .map(|i| {
                    let v = rng.uniform_range(-4.0, 4.0);
                    // Every fifth weight exactly on a tie of its grid.
                    if i % 5 == 0 {
                        ((v.round() + 0.5) / inv[i % cols]).clamp(-40.0, 40.0)
                    } else {
                        v
                    }
                })
                .collect();
            let state: Vec<f32> = (0..n)
                .map(|i| match i % 4 {
                    0 => f32::NAN,
                    1 => (w[i] * inv[i % cols]).round() + 0.25 * ((i / 4) % 3) as f32 - 0.25,
                    _ => rng.uniform_range(-30.0, 30.0).round() + 0.25 * (i % 3) as f32 - 0.25,
                })
                .collect();
            let freq: Vec<f32> = (0..n).map(|_| rng.uniform()).collect();
            for (add, eager) in [(0.013f32, 0.0f32), (0.0, 0.25)] {
                let (mut s1, mut f1) = (state.clone(), freq.clone());
                let (mut s2, mut f2) = (state.clone(), freq.clone());
                let a = grid_pass(&w, &inv, &mut s1, &mut f1, add, eager);
                let b = grid_pass_portable(&w, &inv, &mut s2, &mut f2, add, eager);
                assert_eq!(a, b, "{rows}x{cols}");
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&s1), bits(&s2), "{rows}x{cols} states");
                assert_eq!(bits(&f1), bits(&f2), "{rows}x{cols} frequencies");
                assert!(a.0 > 0 && a.1 > 0, "the case flips and oscillates");
                let codes: Vec<f32> = w.iter().map(|v| v.signum()).collect();
                let (mut s1, mut f1) = (state.clone(), freq.clone());
                let (mut s2, mut f2) = (state.clone(), freq.clone());
                let a = codes_pass(&codes, &mut s1, &mut f1, add, eager);
                let b = codes_pass_portable(&codes, &mut s2, &mut f2, add, eager);
                assert_eq!(a, b);
                assert_eq!(bits(&s1), bits(&s2));
                assert_eq!(bits(&f1), bits(&f2));
            }
        }
    }
}
