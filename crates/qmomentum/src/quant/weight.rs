//! The weight fake-quantizer of a layer: `ŵ = q(w)` per output channel, its scales, and the
//! straight-through backward that turns `∂L/∂ŵ` into `∂L/∂w`.
//!
//! A kernel is stored `[fan_in, outputs]` (output channel = column): a dense layer's `[in, out]`,
//! a convolution's `[kh·kw·cin/groups, cout]` (Keras's HWIO flattened). Every layer with weights
//! holds one `WeightFakeQuant`, so a new layer is "matrix product + these parts", never a copy
//! of the quantization code.
//!
//! * Integer (2–8 bits) and ternary: the plain STE, `∂L/∂w = ∂L/∂ŵ` (the symmetric max-scaled
//!   grid never clips its own weights).
//! * Binary on latent floats: Larq's `ste_sign`, the gradient passes where `|w| ≤ 1`.
//! * Binary with Bop: `w` holds ±1, `ŵ = w/√fan_in` (a fixed scale; see [`WeightFakeQuant::configure`]),
//!   so `∂L/∂w = ∂L/∂ŵ/√fan_in`.

use super::affine::{
    column_max_abs, fake_quant_weights_per_channel, fake_quant_weights_per_tensor, fake_quant_weights_with_scales,
    QParams,
};
use super::binary::{binarize, sign, ternarize};
use super::oscillation::OscillationTracker;
use super::WeightQuant;
use crate::layers::{Buffer, Param, ParamKind};
use std::sync::Arc;

/// Fake quantization of one kernel, with its scratch (sized once, reused every step).
#[derive(Clone, Debug)]
pub struct WeightFakeQuant {
    /// The rule (none = float weights).
    pub quant: Option<WeightQuant>,
    /// Bop mode: the weights are ±1 parameters and `ŵ = w/√fan_in`.
    pub bop: bool,
    fan_in: usize,
    outputs: usize,
    /// `ŵ`, in an `Arc` so that a training replica can read it ([`WeightFakeQuant::shared`]);
    /// written through `Arc::make_mut`, so a buffer still shared is copied before it is written,
    /// never changed under its other reader.
    w_hat: Arc<Vec<f32>>,
    /// The main model's `ŵ`, which this (replica's) quantizer uses instead of its own after
    /// [`WeightFakeQuant::quantize_shared`], until it quantizes by itself again.
    shared: Option<Arc<Vec<f32>>>,
    scale: Vec<f32>,
    tmp: Vec<f32>,
    dw_hat: Vec<f32>,
    /// Oscillation tracking of the integer codes (quantized layers; see `quant::oscillation`).
    pub tracker: Option<OscillationTracker>,
    /// Oscillation dampening λ of this step (0: off). Set by the trainer on the model that adds
    /// it (once per step, not per replica).
    pub dampening: f32,
    /// Iterative freezing: the frozen integer code of each weight (NaN: not frozen), a buffer
    /// named `layers.{i}.osc_frozen`. A frozen weight's `ŵ` is `code·s` whatever its latent value.
    pub frozen: Option<Buffer>,
    /// Fixed per-channel scales of an integer grid (`freeze_weight_scales_after`): NaN until they
    /// are fixed, then `ŵ = s·clamp(round(w/s))` with these `s` instead of this step's max-abs
    /// scales, and the STE passes the gradient only inside the grid's range. A buffer named
    /// `layers.{i}.w_scale`.
    pub fixed_scale: Option<Buffer>,
    /// The integer code of every weight in the last `quantize` (only with a tracker: what
    /// oscillation tracking reads; see [`WeightFakeQuant::track`]).
    codes: Vec<i8>,
    /// `ŵ` and the scales are already this step's ([`WeightFakeQuant::quantize_shared`]): the
    /// next [`WeightFakeQuant::quantize`] does nothing (once).
    ready: bool,
}

impl WeightFakeQuant {
    /// Float weights of a `[fan_in, outputs]` kernel.
    pub fn new(fan_in: usize, outputs: usize) -> Self {
        WeightFakeQuant {
            quant: None,
            bop: false,
            fan_in,
            outputs,
            w_hat: Arc::default(),
            shared: None,
            scale: vec![1.0; outputs],
            tmp: vec![0.0; outputs],
            dw_hat: Vec::new(),
            tracker: None,
            dampening: 0.0,
            frozen: None,
            fixed_scale: None,
            codes: Vec::new(),
            ready: false,
        }
    }

    /// Apply a rule to the kernel `w`. `bop` turns binary weights into ±1 parameters (the signs of
    /// the current weights) for the Bop optimizer, with the fixed scale `ŵ = w/√fan_in`.
    ///
    /// Why a fixed scale: without batch normalisation, a learned per-channel scale trained by
    /// Momentum diverged in our runs (pre-activations left the STE window |z| ≤ 1 and the
    /// gradients died). With ±1 inputs, `w/√K` gives pre-activations of unit variance, a
    /// parameter-free normalisation; the biases still learn each channel's threshold.
    pub fn configure(&mut self, quant: Option<WeightQuant>, bop: bool, w: &mut Param) {
        self.quant = quant;
        self.bop = false;
        w.kind = ParamKind::Weight;
        if let (Some(WeightQuant::Binary { .. }), true) = (quant, bop) {
            for v in w.value.iter_mut() {
                *v = sign(*v);
            }
            w.kind = ParamKind::Binary;
            self.bop = true;
        }
        let n = if quant.is_some() { self.fan_in * self.outputs } else { 0 };
        Arc::make_mut(&mut self.w_hat).resize(n, 0.0);
        self.dw_hat.resize(n, 0.0);
        let index = w
            .name
            .strip_prefix("layers.")
            .and_then(|r| r.split('.').next())
            .and_then(|i| i.parse().ok());
        self.tracker = match (quant.is_some(), index) {
            (true, Some(i)) => Some(OscillationTracker::new(i, n)),
            _ => None,
        };
        self.codes = vec![0; if self.tracker.is_some() { n } else { 0 }];
        self.frozen = None;
        self.fixed_scale = None;
        w.frozen = None;
    }

    /// Make room for fixed scales on an integer grid (`layers.{index}.w_scale`, not fixed yet).
    pub fn enable_fixed_scales(&mut self, index: usize) {
        if let Some(WeightQuant::Int { .. }) = self.quant {
            let c = self.outputs;
            self.fixed_scale = Some(Buffer::new(
                format!("layers.{index}.w_scale"),
                vec![c],
                vec![f32::NAN; c],
            ));
        }
    }

    /// Fix the scales at their current values (the last forward pass's max-abs scales); once.
    pub fn fix_scales(&mut self) {
        if let Some(b) = self.fixed_scale.as_mut() {
            if b.value.iter().any(|s| s.is_nan()) {
                b.value.copy_from_slice(&self.scale);
            }
        }
    }

    /// The fixed scales, if they are fixed.
    fn fixed(&self) -> Option<&[f32]> {
        self.fixed_scale
            .as_ref()
            .filter(|b| b.value.first().is_some_and(|s| !s.is_nan()))
            .map(|b| &b.value[..])
    }

    /// Copy the state a replica needs from the main model's quantizer: frozen codes and fixed
    /// scales (the tracker stays with the main model).
    pub fn sync_state_from(&mut self, src: &WeightFakeQuant) {
        for (d, s) in [
            (&mut self.frozen, &src.frozen),
            (&mut self.fixed_scale, &src.fixed_scale),
        ] {
            match (d.as_mut(), s) {
                (Some(d), Some(s)) if d.value.len() == s.value.len() => d.value.copy_from_slice(&s.value),
                (_, s) => d.clone_from(s),
            }
        }
    }

    /// Turn iterative freezing on for this (quantized, tracked) layer `index`: the frozen codes
    /// buffer and the code EMA are created, nothing is frozen yet. No-op on float weights or
    /// without a tracker.
    pub fn enable_freezing(&mut self, index: usize) {
        let Some(t) = self.tracker.take() else { return };
        let n = self.fan_in * self.outputs;
        self.tracker = Some(t.with_code_ema(index));
        self.frozen = Some(Buffer::new(
            format!("layers.{index}.osc_frozen"),
            vec![n],
            vec![f32::NAN; n],
        ));
    }

    /// The checkpointed state of this quantizer: fixed scales, frozen codes, then the tracker's
    /// frequencies and code EMA (`None` slots for what is off). The tracker's packed previous
    /// codes are not a buffer: see [`OscillationTracker::state`].
    pub fn buffer_slots(&self) -> [Option<&Buffer>; 4] {
        let t = self.tracker.as_ref();
        [
            self.fixed_scale.as_ref(),
            self.frozen.as_ref(),
            t.map(|t| &t.freq),
            t.and_then(|t| t.ema_code.as_ref()),
        ]
    }

    /// [`WeightFakeQuant::buffer_slots`], mutable.
    pub fn buffer_slots_mut(&mut self) -> [Option<&mut Buffer>; 4] {
        let (a, b) = match self.tracker.as_mut() {
            Some(t) => (Some(&mut t.freq), t.ema_code.as_mut()),
            None => (None, None),
        };
        [self.fixed_scale.as_mut(), self.frozen.as_mut(), a, b]
    }

    /// The parameter's freeze mask from the frozen codes (after a checkpoint is loaded).
    pub fn refresh_mask(&self, w: &mut Param) {
        w.frozen = self
            .frozen
            .as_ref()
            .filter(|f| f.value.iter().any(|c| !c.is_nan()))
            .map(|f| f.value.iter().map(|c| !c.is_nan()).collect());
    }

    /// Iterative freezing, after [`WeightFakeQuant::track`] of this step: every free weight whose
    /// oscillation frequency exceeds `threshold` is frozen at the rounded EMA of its code, its
    /// latent value is set to `code·s` (so the max-scaled grid keeps it) and the optimizer skips
    /// it from now on. `momentum` is the tracking EMA weight. Returns how many weights froze.
    pub fn freeze(&mut self, w: &mut Param, threshold: f32, momentum: f32) -> usize {
        let (Some(frozen), Some(t)) = (self.frozen.as_mut(), self.tracker.as_ref()) else {
            return 0;
        };
        let Some(ema) = t.ema_code.as_ref() else { return 0 };
        let c = self.outputs;
        let ((lo, hi), bop) = (self.quant.map(code_range).unwrap_or((0.0, 0.0)), self.bop);
        let mut newly = 0;
        // Frequencies are stored with their decay pending (`OscillationTracker::freq_scale`).
        let k = t.freq_scale(momentum);
        // Most steps freeze nothing: one vectorised pass says whether any weight qualifies.
        if !any_to_freeze(&frozen.value, &t.freq.value, &ema.value, k, threshold) {
            return 0;
        }
        for (i, ((f, &freq), &e)) in frozen.value.iter_mut().zip(&t.freq.value).zip(&ema.value).enumerate() {
            if !f.is_nan() || freq * k <= threshold || e.is_nan() {
                continue;
            }
            let code = super::affine::round_even_small(e).clamp(lo, hi);
            // A binary code is never 0: an EMA that rounds to 0 keeps the current sign.
            let code = if code == 0.0 && matches!(self.quant, Some(WeightQuant::Binary { .. })) {
                sign(w.value[i])
            } else {
                code
            };
            *f = code;
            w.value[i] = if bop { code } else { code * self.scale[i % c] };
            newly += 1;
        }
        if newly > 0 {
            let mask = w.frozen.get_or_insert_with(|| vec![false; frozen.value.len()]);
            for (m, f) in mask.iter_mut().zip(&frozen.value) {
                *m = !f.is_nan();
            }
        }
        newly
    }

    /// Frozen codes read from a checkpoint must lie on this layer's grid: the first that does
    /// not, as `(index, code)`.
    pub fn invalid_frozen_code(&self) -> Option<(usize, f32)> {
        let f = self.frozen.as_ref()?;
        let (lo, hi) = self.quant.map(code_range).unwrap_or((0.0, 0.0));
        f.value
            .iter()
            .position(|&c| !(c.is_nan() || (c >= lo && c <= hi && c.fract() == 0.0)))
            .map(|i| (i, f.value[i]))
    }

    /// Number of frozen weights (what `history` reports per layer).
    pub fn frozen_count(&self) -> usize {
        self.frozen
            .as_ref()
            .map_or(0, |f| f.value.iter().filter(|c| !c.is_nan()).count())
    }

    /// One step of oscillation tracking with the codes of the kernel the last forward pass used
    /// (written by [`WeightFakeQuant::quantize`] in the pass that computes ŵ: `round(w/s)` for
    /// integer weights, −1/0/+1 for ternary ones, the sign for binary ones): no quantization again.
    pub fn track(&mut self, momentum: f32, threads: usize) {
        if let Some(t) = self.tracker.as_mut() {
            t.update(&self.codes, momentum, threads);
        }
    }

    /// What the next [`WeightFakeQuant::track`] reads on each of two cores (see
    /// [`OscillationTracker::regions`]); `None` without a tracker.
    pub(crate) fn tracking_regions(&self, threads: usize) -> Option<[[crate::simd::Region; 2]; 2]> {
        self.tracker.as_ref().map(|t| t.regions(&self.codes, threads))
    }

    /// Integer or ternary weights: the ones the bias is put on the accumulator grid for.
    pub fn on_integer_grid(&self) -> bool {
        matches!(self.quant, Some(WeightQuant::Int { .. } | WeightQuant::Ternary { .. }))
    }

    /// Size the codes for the tracker (or drop them without one).
    fn fit_codes(&mut self) {
        match (&self.tracker, self.codes.len()) {
            // The tracker was dropped (a replica, or tracking off): no codes to write.
            (None, n) if n > 0 => self.codes = Vec::new(),
            // A tracker set after `configure`: one code per weight.
            (Some(_), n) if n != self.w_hat.len() => self.codes = vec![0; self.w_hat.len()],
            _ => {}
        }
    }

    /// [`WeightFakeQuant::quantize`] of this quantizer and of a training replica's (same rule,
    /// same kernel `w`) at once, split by rows over two cores: each core finds the column
    /// maxima of its rows (the max of the two halves is the max of the whole, exactly), then
    /// quantizes its rows into one `ŵ` that both then read, and this quantizer's codes. The next `quantize`
    /// of both is then a no-op, so the step quantizes the kernel once instead of once per core
    /// (the whole kernel per core was 10 % of a W8A8 MLP epoch). Same values as `quantize`.
    ///
    /// Only per-channel integer grids (max-abs or fixed scales) of [`crate::optim::SPLIT_MIN`]
    /// weights or more without frozen codes take this path; for the rest it returns `false` and
    /// does nothing (binary and ternary scales are sums, whose order the split would change).
    ///
    /// The replica's kernel `replica_w` is written only where its backward reads it: with fixed
    /// scales (the STE clips at the grid's range), `w` is copied into it. Otherwise its values
    /// are left as they are (nothing of the replica reads them: its forward and backward use
    /// this `ŵ`), so a caller that syncs the replica skips that parameter when this returns
    /// `true`, and copies it on a step where this returns `false` (measured: the copy was 6 µs
    /// of a 335 µs W8A8 step).
    pub fn quantize_shared(&mut self, replica: &mut WeightFakeQuant, w: &[f32], replica_w: &mut [f32]) -> bool {
        // A flag left by a step that did not reach its forward passes (an unwound step) must not
        // survive into one this path does not take.
        self.ready = false;
        replica.ready = false;
        let (out, n) = (self.outputs, self.fan_in * self.outputs);
        let Some(WeightQuant::Int {
            bits,
            per_channel,
            narrow,
        }) = self.quant
        else {
            return false;
        };
        let fixed = self.fixed().is_some();
        let eligible = (per_channel || fixed)
            && self.fan_in >= 2
            && n >= crate::optim::SPLIT_MIN
            && w.len() == n
            && replica_w.len() == n
            && self.frozen.is_none()
            && replica.frozen.is_none()
            && replica.quant == self.quant
            && (replica.fan_in, replica.outputs) == (self.fan_in, out)
            && replica.fixed().is_some() == fixed
            && replica.tracker.is_none()
            && self.w_hat.len() == n;
        if !eligible {
            return false;
        }
        self.fit_codes();
        replica.fit_codes();
        // Rows split in the middle (each core then quantizes half of them).
        let rows0 = (crate::optim::split_point(n) / out).clamp(1, self.fan_in - 1);
        let at = rows0 * out;
        let (w0, w1) = w.split_at(at);
        if let Some(f) = self.fixed_scale.as_ref().filter(|_| fixed) {
            let (d0, d1) = replica_w.split_at_mut(at);
            self.scale.copy_from_slice(&f.value);
            qmomentum_runtime::pool::join(|| d0.copy_from_slice(w0), || d1.copy_from_slice(w1));
        } else {
            let (m0, m1) = (&mut self.tmp[..out], &mut replica.tmp[..out]);
            qmomentum_runtime::pool::join(|| column_max_abs(w0, m0), || column_max_abs(w1, m1));
            for ((s, &a), &b) in self.scale.iter_mut().zip(m0.iter()).zip(m1.iter()) {
                *s = QParams::symmetric(a.max(b), bits, narrow).scale;
            }
        }
        replica.scale.copy_from_slice(&self.scale);
        let scale = &self.scale;
        // One `ŵ` for both: the replica lets go of its share (so this one is written in place,
        // unless another clone holds it: then it is copied once), and reads this one below.
        replica.shared = None;
        let (h0, h1) = Arc::make_mut(&mut self.w_hat).split_at_mut(at);
        let (c0, c1) = if self.codes.is_empty() {
            (&mut [][..], &mut [][..])
        } else {
            self.codes.split_at_mut(at)
        };
        let (i0, i1) = (&mut self.tmp[..out], &mut replica.tmp[..out]);
        qmomentum_runtime::pool::join(
            || fake_quant_weights_with_scales(w0, out, bits, narrow, scale, i0, h0, c0),
            || fake_quant_weights_with_scales(w1, out, bits, narrow, scale, i1, h1, c1),
        );
        replica.shared = Some(Arc::clone(&self.w_hat));
        self.ready = true;
        replica.ready = true;
        true
    }

    /// Whether `ŵ` is already this step's ([`WeightFakeQuant::quantize_shared`] ran, and no
    /// [`WeightFakeQuant::quantize`] since).
    pub fn is_ready(&self) -> bool {
        self.ready
    }

    /// Let go of the main model's `ŵ` (a replica after its step), so that the main model's next
    /// `quantize` outside training (evaluation, export) writes its `ŵ` in place instead of
    /// copying it; and forget a `quantize_shared` whose forward pass did not come.
    pub fn release_shared(&mut self) {
        self.shared = None;
        self.ready = false;
    }

    /// Compute `ŵ` and the per-channel scales from `w` (no-op for float weights, and once after
    /// [`WeightFakeQuant::quantize_shared`]).
    pub fn quantize(&mut self, w: &[f32]) {
        if std::mem::take(&mut self.ready) {
            return;
        }
        self.shared = None;
        let Some(wq) = self.quant else { return };
        self.fit_codes();
        let out = self.outputs;
        let fixed = self
            .fixed_scale
            .as_ref()
            .filter(|b| b.value.first().is_some_and(|s| !s.is_nan()));
        if let (WeightQuant::Int { bits, narrow, .. }, Some(f)) = (wq, fixed) {
            self.scale.copy_from_slice(&f.value);
            fake_quant_weights_with_scales(
                w,
                out,
                bits,
                narrow,
                &self.scale,
                &mut self.tmp,
                Arc::make_mut(&mut self.w_hat).as_mut_slice(),
                &mut self.codes,
            );
            self.apply_frozen();
            return;
        }
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
                Arc::make_mut(&mut self.w_hat).as_mut_slice(),
                &mut self.scale,
                &mut self.tmp,
                &mut self.codes,
            ),
            WeightQuant::Int {
                bits,
                per_channel: false,
                narrow,
            } => {
                let s = fake_quant_weights_per_tensor(w, bits, narrow, Arc::make_mut(&mut self.w_hat).as_mut_slice());
                self.scale.fill(s);
                let inv = 1.0 / s;
                for (c, &v) in self.codes.iter_mut().zip(self.w_hat.iter()) {
                    *c = super::affine::round_even_small(v * inv) as i8;
                }
            }
            WeightQuant::Binary { scaled } => {
                if self.bop {
                    // Bop: w is ±1 already, ŵ = w/√K.
                    let a = 1.0 / (self.fan_in as f32).sqrt();
                    for (o, &v) in Arc::make_mut(&mut self.w_hat).iter_mut().zip(w) {
                        *o = a * v;
                    }
                    self.scale.fill(a);
                } else {
                    binarize(
                        w,
                        out,
                        scaled,
                        Arc::make_mut(&mut self.w_hat).as_mut_slice(),
                        &mut self.scale,
                    )
                }
                for (c, &v) in self.codes.iter_mut().zip(w) {
                    *c = sign(v) as i8;
                }
            }
            WeightQuant::Ternary { rule } => {
                ternarize(
                    w,
                    out,
                    rule,
                    Arc::make_mut(&mut self.w_hat).as_mut_slice(),
                    &mut self.scale,
                    &mut self.tmp,
                );
                // ŵ = α·t with α > 0: the code t is the sign of ŵ, or 0.
                for (c, &v) in self.codes.iter_mut().zip(self.w_hat.iter()) {
                    *c = (v > 0.0) as i8 - (v < 0.0) as i8;
                }
            }
        }
        self.apply_frozen();
    }

    /// Frozen weights keep their code on this step's grid (the scale may have moved since).
    fn apply_frozen(&mut self) {
        let out = self.outputs;
        if let Some(f) = self.frozen.as_ref() {
            frozen_w_hat(
                Arc::make_mut(&mut self.w_hat).as_mut_slice(),
                &f.value,
                &self.scale[..out],
            );
            if !self.codes.is_empty() {
                frozen_codes(&mut self.codes, &f.value);
            }
        }
    }

    /// `ŵ`: this quantizer's, or the main model's it shares.
    fn w_hat(&self) -> &[f32] {
        self.shared.as_deref().unwrap_or(&self.w_hat)
    }

    /// The kernel the forward pass uses: `ŵ` (after [`WeightFakeQuant::quantize`]) or `w`.
    pub fn weights<'a>(&'a self, w: &'a [f32]) -> &'a [f32] {
        if self.quant.is_some() {
            self.w_hat()
        } else {
            w
        }
    }

    /// Per-output-channel scales of `ŵ` (1 for float weights).
    pub fn scales(&self) -> &[f32] {
        &self.scale
    }

    /// Backward: `grad_of_w_hat` writes `∂L/∂ŵ` into the buffer it is given; the result lands in
    /// `w.grad` as `∂L/∂w`. Without a transform (float, integer, ternary) the product is written
    /// straight into `w.grad` (no copy).
    pub fn backward(&mut self, w: &mut Param, grad_of_w_hat: impl FnOnce(&mut [f32])) {
        self.backward_unfrozen(w, grad_of_w_hat);
        // A frozen weight's ŵ does not depend on it: its gradient is 0.
        if let Some(f) = self.frozen.as_ref().filter(|_| w.frozen.is_some()) {
            zero_frozen(&mut w.grad, &f.value);
        }
    }

    fn backward_unfrozen(&mut self, w: &mut Param, grad_of_w_hat: impl FnOnce(&mut [f32])) {
        match self.quant {
            Some(WeightQuant::Binary { .. }) => {
                grad_of_w_hat(&mut self.dw_hat);
                if self.bop {
                    let a = 1.0 / (self.fan_in as f32).sqrt();
                    for (g, &d) in w.grad.iter_mut().zip(&self.dw_hat) {
                        *g = a * d;
                    }
                } else {
                    for ((g, &d), &v) in w.grad.iter_mut().zip(&self.dw_hat).zip(&w.value) {
                        *g = if v.abs() <= 1.0 { d } else { 0.0 };
                    }
                }
            }
            _ => {
                grad_of_w_hat(&mut w.grad);
                if let (Some(q), Some(f)) = (self.quant, self.fixed()) {
                    // Fixed scales clip: the STE passes the gradient inside the grid's range
                    // only, and dampening pulls toward ŵ from clip(w) = w there.
                    let (lo, hi) = code_range(q);
                    fixed_scale_ste(&mut w.grad, &w.value, self.w_hat(), f, lo, hi, 2.0 * self.dampening);
                    return;
                }
                // Oscillation dampening (Nagel et al. 2022): the gradient of λ·Σ(ŵ − w)² with ŵ
                // detached, 2λ(w − ŵ), pulls each latent weight toward its grid point (the
                // max-scaled symmetric grid holds every weight, so clip(w) = w).
                if self.dampening > 0.0 && self.quant.is_some() {
                    let k = 2.0 * self.dampening;
                    for ((g, &v), &q) in w.grad.iter_mut().zip(&w.value).zip(self.w_hat()) {
                        *g += k * (v - q);
                    }
                }
            }
        }
    }
}

// Iterative freezing's per-step passes, row by row and branch-free so they vectorise (the
// per-element `i % channels` and branches made a W8A8 run with `--osc-freeze` 4.6× slower than
// without it).

crate::simd::widest! {
    /// `ŵ = code·s` where a weight is frozen (its code is not NaN), rows of `s.len()` channels.
    fn frozen_w_hat(w_hat: &mut [f32], codes: &[f32], s: &[f32]) {
        let c = s.len();
        for (or, cr) in w_hat.chunks_exact_mut(c).zip(codes.chunks_exact(c)) {
            for ((o, &code), &s) in or.iter_mut().zip(cr).zip(s) {
                *o = if code.is_nan() { *o } else { code * s };
            }
        }
    }
}

crate::simd::widest! {
    /// Whether any weight would freeze: not frozen yet (code NaN), frequency `freq·k` above
    /// `threshold`, a code EMA that is a number ([`WeightFakeQuant::freeze`]'s test).
    // `!(x <= t)` on purpose: the exact negation of `freeze`'s `x <= t`, NaN included.
    #[allow(clippy::neg_cmp_op_on_partial_ord)]
    fn any_to_freeze(frozen: &[f32], freq: &[f32], ema: &[f32], k: f32, threshold: f32) -> bool {
        frozen
            .iter()
            .zip(freq)
            .zip(ema)
            .fold(false, |a, ((&f, &q), &e)| a | (f.is_nan() & !(q * k <= threshold) & !e.is_nan()))
    }
}

crate::simd::widest! {
    /// The tracked code of a frozen weight is its frozen code (`codes` unchanged elsewhere).
    fn frozen_codes(codes: &mut [i8], frozen: &[f32]) {
        for (c, &code) in codes.iter_mut().zip(frozen) {
            // Clamped to the i8 range first: the same value as `code as i8` (which saturates and
            // truncates) for any code, valid or not.
            let q = if code.is_nan() { 0.0 } else { code.clamp(-128.0, 127.0) };
            // SAFETY: `q` is finite and in [−128, 127] (NaN replaced, then clamped), so it is
            // representable in i32. Unchecked because the saturating `as` does not vectorise.
            let qi = unsafe { q.to_int_unchecked::<i32>() } as i8;
            *c = if code.is_nan() { *c } else { qi };
        }
    }
}

crate::simd::widest! {
    /// `g = 0` where a weight is frozen (its code is not NaN).
    fn zero_frozen(g: &mut [f32], codes: &[f32]) {
        for (g, &code) in g.iter_mut().zip(codes) {
            *g = if code.is_nan() { *g } else { 0.0 };
        }
    }
}

crate::simd::widest! {
    /// The STE of a grid with fixed per-channel scales `s` (rows of `s.len()` channels): `g`
    /// passes where `lo·s ≤ w ≤ hi·s` (plus the dampening pull `k·(w − ŵ)`), 0 outside. Row by
    /// row, so it vectorises (the per-element `i % channels` of the first version made it 27 %
    /// of a W4A4 epoch's samples once the scales were fixed).
    fn fixed_scale_ste(g: &mut [f32], w: &[f32], w_hat: &[f32], s: &[f32], lo: f32, hi: f32, k: f32) {
        let c = s.len();
        for ((gr, wr), qr) in g.chunks_exact_mut(c).zip(w.chunks_exact(c)).zip(w_hat.chunks_exact(c)) {
            for (((g, &v), &q), &s) in gr.iter_mut().zip(wr).zip(qr).zip(s) {
                *g = if v >= lo * s && v <= hi * s { *g + k * (v - q) } else { 0.0 };
            }
        }
    }
}

/// The integer codes a rule can produce, `(lowest, highest)`.
fn code_range(q: WeightQuant) -> (f32, f32) {
    match q {
        WeightQuant::Int { bits, narrow, .. } => {
            let hi = ((1i32 << (bits - 1)) - 1) as f32;
            (if narrow { -hi } else { -hi - 1.0 }, hi)
        }
        WeightQuant::Binary { .. } | WeightQuant::Ternary { .. } => (-1.0, 1.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn int(bits: u32) -> Option<WeightQuant> {
        Some(WeightQuant::Int {
            bits,
            per_channel: true,
            narrow: true,
        })
    }

    /// The vectorised fixed-scale STE is the per-element definition (`s = scales[i % c]`), on
    /// values inside, on and beyond the range's edges.
    #[test]
    fn fixed_scale_ste_is_its_definition() {
        let (rows, c) = (7, 19);
        let mut r = Rng::new(3, 0);
        let s: Vec<f32> = (0..c).map(|_| r.uniform_range(0.01, 0.1)).collect();
        let (lo, hi, k) = (-7.0f32, 7.0f32, 0.25f32);
        let w: Vec<f32> = (0..rows * c)
            .map(|i| match i % 5 {
                0 => hi * s[i % c],
                1 => lo * s[i % c],
                _ => r.uniform_range(-1.0, 1.0),
            })
            .collect();
        let q: Vec<f32> = w.iter().map(|v| v * 0.9).collect();
        let g0: Vec<f32> = (0..rows * c).map(|_| r.uniform_range(-1.0, 1.0)).collect();
        let mut g = g0.clone();
        fixed_scale_ste(&mut g, &w, &q, &s, lo, hi, k);
        for i in 0..rows * c {
            let si = s[i % c];
            let want = if w[i] >= lo * si && w[i] <= hi * si {
                g0[i] + k * (w[i] - q[i])
            } else {
                0.0
            };
            assert_eq!(g[i].to_bits(), want.to_bits(), "{i}");
        }
        assert!(g.contains(&0.0) && g.iter().any(|&v| v != 0.0), "both cases occur");
    }

    /// The shared, row-split quantization gives both quantizers exactly what `quantize` gives
    /// each (ŵ, scales, and the tracked model's codes), with max-abs and with fixed scales, and
    /// their next `quantize` is a no-op only once.
    #[test]
    fn quantize_shared_is_quantize_bit_for_bit() {
        let (fan_in, outputs) = (301, 128); // odd rows: the split is not in the middle
        let mut r = Rng::new(7, 0);
        let mut w = Param::new(
            "layers.0.weight",
            ParamKind::Weight,
            vec![fan_in, outputs],
            vec![0.0; fan_in * outputs],
        );
        for v in w.value.iter_mut() {
            *v = r.uniform_range(-1.0, 1.0) * r.uniform_range(0.0, 1.0);
        }
        w.value[5] = f32::NAN; // a NaN weight: ignored by the max, code 0
        for (bits, fixed) in [(8, false), (4, false), (2, false), (8, true)] {
            let mut want = WeightFakeQuant::new(fan_in, outputs);
            want.configure(int(bits), false, &mut w);
            if fixed {
                want.enable_fixed_scales(0);
                want.quantize(&w.value);
                want.fix_scales();
            }
            let (mut main, mut rep) = (want.clone(), want.clone());
            let mut copy = vec![0.0; w.value.len()];
            rep.tracker = None;
            want.quantize(&w.value);
            assert!(
                main.quantize_shared(&mut rep, &w.value, &mut copy),
                "{bits} bits, fixed {fixed}: not taken"
            );
            for q in [&main, &rep] {
                let same = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
                assert!(
                    same(q.w_hat(), &want.w_hat) && same(&q.scale, &want.scale),
                    "{bits} bits, fixed {fixed}"
                );
            }
            assert_eq!(main.codes, want.codes);
            // The replica's kernel is copied where its backward reads it (fixed scales) only.
            let copied = copy.iter().zip(&w.value).all(|(x, y)| x.to_bits() == y.to_bits());
            assert_eq!(copied, fixed, "{bits} bits, fixed {fixed}");
            assert!(fixed || copy.iter().all(|&x| x == 0.0));
            assert!(
                rep.shared.as_ref().is_some_and(|s| Arc::ptr_eq(&main.w_hat, s)),
                "one ŵ for both"
            );
            let before = rep.w_hat().to_vec();
            assert!(!main.codes.is_empty() && rep.codes.is_empty());
            // The next quantize keeps ŵ (even of other weights); the one after computes it.
            let other: Vec<f32> = w.value.iter().map(|v| v * 0.5).collect();
            main.quantize(&other);
            assert!(main
                .w_hat
                .iter()
                .zip(want.w_hat.iter())
                .all(|(x, y)| x.to_bits() == y.to_bits()));
            main.quantize(&other);
            want.quantize(&other);
            // Written through `make_mut`: the replica still reads the ŵ it was given.
            assert!(rep.w_hat().iter().zip(&before).all(|(x, y)| x.to_bits() == y.to_bits()));
            assert!(main
                .w_hat
                .iter()
                .zip(want.w_hat.iter())
                .all(|(x, y)| x.to_bits() == y.to_bits()));
        }
        // A step that never reached its forward passes leaves no flag behind once the kernel no
        // longer qualifies (here: frozen codes appeared), and the replica lets go of `ŵ`.
        let mut main = WeightFakeQuant::new(fan_in, outputs);
        main.configure(int(8), false, &mut w);
        let mut rep = main.clone();
        rep.tracker = None;
        let mut copy = vec![0.0; w.value.len()];
        assert!(main.quantize_shared(&mut rep, &w.value, &mut copy));
        main.enable_freezing(0);
        assert!(!main.quantize_shared(&mut rep, &w.value, &mut copy));
        assert!(!main.is_ready() && !rep.is_ready());
        rep.release_shared();
        assert!(rep.shared.is_none());
        // Not taken: a small kernel, binary weights, a replica with another rule.
        let mut small = WeightFakeQuant::new(4, 4);
        let mut ws = Param::new("layers.0.weight", ParamKind::Weight, vec![4, 4], vec![0.5; 16]);
        small.configure(int(8), false, &mut ws);
        assert!(!small
            .clone()
            .quantize_shared(&mut small.clone(), &ws.value, &mut [0.0; 16]));
        let mut bin = WeightFakeQuant::new(fan_in, outputs);
        bin.configure(Some(WeightQuant::Binary { scaled: true }), false, &mut w);
        assert!(!bin
            .clone()
            .quantize_shared(&mut bin.clone(), &w.value, &mut w.value.clone()));
        let mut a = WeightFakeQuant::new(fan_in, outputs);
        a.configure(int(8), false, &mut w);
        let mut b = WeightFakeQuant::new(fan_in, outputs);
        b.configure(int(4), false, &mut w);
        assert!(!a.quantize_shared(&mut b, &w.value, &mut w.value.clone()));
    }
}
