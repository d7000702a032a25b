//! Binary and ternary weight quantizers.
//!
//! * Binary: `ŵ = α_j · sign(w)` with `sign(0) = +1` (Larq's convention) and `α_j` either 1 or the
//!   per-output-channel `mean|w|` of XNOR-Net (Rastegari et al. 2016). Backward: the clipped
//!   straight-through estimator of Larq's `ste_sign` (gradient passes where `|w| ≤ 1`), `α` held
//!   constant.
//! * Ternary TWN (Li & Liu 2016): threshold `Δ = 0.7·mean|w|`, `α = mean{|w| : |w| > Δ}`,
//!   `ŵ = α·sign(w)·[|w| > Δ]`.
//! * Ternary absmean (BitNet b1.58, Ma et al. 2024): `γ = mean|w|`,
//!   `ŵ = γ·clamp(round(w/γ), −1, 1)`.
//!
//! Ternary quantizers use the plain straight-through estimator. Scales are per output channel
//! (columns of the `[inputs, outputs]` kernel) so the integer runtime can use them as its
//! per-channel dequantization scales.

/// `+1` for `x ≥ 0`, `−1` otherwise.
#[inline]
pub fn sign(x: f32) -> f32 {
    if x >= 0.0 {
        1.0
    } else {
        -1.0
    }
}

/// Per-channel binarization of a `[inputs, outputs]` kernel. `scaled` picks `α = mean|w|`.
pub fn binarize(w: &[f32], outputs: usize, scaled: bool, w_hat: &mut [f32], alpha: &mut [f32]) {
    let alpha = &mut alpha[..outputs];
    if scaled {
        alpha.fill(0.0);
        for row in w.chunks_exact(outputs) {
            for (a, &v) in alpha.iter_mut().zip(row) {
                *a += v.abs();
            }
        }
        let n = (w.len() / outputs).max(1) as f32;
        for a in alpha.iter_mut() {
            *a /= n;
        }
    } else {
        alpha.fill(1.0);
    }
    for (row, out) in w.chunks_exact(outputs).zip(w_hat.chunks_exact_mut(outputs)) {
        for ((o, &v), &a) in out.iter_mut().zip(row).zip(alpha.iter()) {
            *o = a * sign(v);
        }
    }
}

/// Which ternary rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TernaryRule {
    /// Ternary Weight Networks: `Δ = 0.7·mean|w|`.
    Twn,
    /// BitNet b1.58 absmean rounding.
    Absmean,
}

crate::simd::widest! {
    /// Per-channel ternarization; writes `ŵ` and `α_j` (the magnitude of the non-zero codes).
    /// Compiled for the widest instruction set (`crate::simd`); every pass runs row by row with
    /// per-column accumulators, which add in the same order as a column-by-column loop.
    pub fn ternarize(w: &[f32], outputs: usize, rule: TernaryRule, w_hat: &mut [f32], alpha: &mut [f32], tmp: &mut [f32]) {
        let n = (w.len() / outputs).max(1) as f32;
        let mean = &mut tmp[..outputs];
        mean.fill(0.0);
        for row in w.chunks_exact(outputs) {
            for (m, &v) in mean.iter_mut().zip(row) {
                *m += v.abs();
            }
        }
        for m in mean.iter_mut() {
            *m /= n;
        }
        match rule {
            TernaryRule::Absmean => {
                for (a, &m) in alpha.iter_mut().zip(mean.iter()) {
                    *a = if m > 0.0 { m } else { 1.0 };
                }
                for (row, out) in w.chunks_exact(outputs).zip(w_hat.chunks_exact_mut(outputs)) {
                    for ((o, &v), &a) in out.iter_mut().zip(row).zip(alpha.iter()) {
                        *o = a * crate::quant::affine::round_even_small((v / a).clamp(-1.0, 1.0));
                    }
                }
            }
            TernaryRule::Twn => {
                // Δ_j = 0.7·mean|w|; α_j = mean of the |w| above Δ_j: sums in `alpha`, counts in
                // the first row of `w_hat` (overwritten below).
                for m in mean.iter_mut() {
                    *m *= 0.7;
                }
                let count = &mut w_hat[..outputs];
                count.fill(0.0);
                alpha[..outputs].fill(0.0);
                for row in w.chunks_exact(outputs) {
                    for (((s, c), &v), &d) in alpha.iter_mut().zip(count.iter_mut()).zip(row).zip(mean.iter()) {
                        let v = v.abs();
                        let above = v > d;
                        *s += if above { v } else { 0.0 };
                        *c += if above { 1.0 } else { 0.0 };
                    }
                }
                for (s, &c) in alpha.iter_mut().zip(count.iter()) {
                    *s = if c > 0.0 { *s / c } else { 1.0 };
                }
                for (row, out) in w.chunks_exact(outputs).zip(w_hat.chunks_exact_mut(outputs)) {
                    for ((o, &v), (&d, &a)) in out.iter_mut().zip(row).zip(mean.iter().zip(alpha.iter())) {
                        *o = if v.abs() > d { a * sign(v) } else { 0.0 };
                    }
                }
            }
        }
    }
}

/// The integer thresholds of a binary layer followed by a sign: `α_j·dot + b_j ≥ 0 ⇔ dot ≥ t_j`
/// with `t_j = ⌈−b_j/α_j⌉` for `α_j > 0` (a non-positive α never fires or always fires, by the
/// bias's sign), clamped to `±(fan_in + 1)`, beyond which every ±1 dot product lies. The one rule
/// the `.qmm` exporter (`dot ≥ t`) and the ONNX exporter (`dot − t`) both use.
pub fn sign_thresholds(alpha: &[f32], bias: &[f32], fan_in: usize) -> Vec<i32> {
    let lim = fan_in as f64 + 1.0;
    alpha
        .iter()
        .zip(bias)
        .map(|(&a, &b)| {
            let t = if a > 0.0 {
                (-(b as f64) / a as f64).ceil()
            } else if b >= 0.0 {
                -lim
            } else {
                lim
            };
            t.clamp(-lim, lim) as i32
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn binary_definition() {
        // [inputs=3, outputs=2]; column 0 = (0.5, -1, 0), column 1 = (-0.2, 0.2, 0.2).
        let w = [0.5, -0.2, -1.0, 0.2, 0.0, 0.2];
        let (mut wh, mut a) = ([0.0f32; 6], [0.0f32; 2]);
        binarize(&w, 2, true, &mut wh, &mut a);
        assert!((a[0] - 0.5).abs() < 1e-7 && (a[1] - 0.2).abs() < 1e-7);
        assert_eq!(wh, [0.5, -0.2, -0.5, 0.2, 0.5, 0.2]); // sign(0) = +1
        binarize(&w, 2, false, &mut wh, &mut a);
        assert_eq!(wh, [1.0, -1.0, -1.0, 1.0, 1.0, 1.0]);
    }
    #[test]
    fn twn_threshold_and_scale() {
        // One column (outputs = 1): |w| = 1, 0.1, 0.5, 0.4 → mean 0.5, Δ = 0.35, α = mean(1, .5, .4).
        let w = [1.0, -0.1, -0.5, 0.4];
        let (mut wh, mut a, mut t) = ([0.0f32; 4], [0.0f32; 1], [0.0f32; 1]);
        ternarize(&w, 1, TernaryRule::Twn, &mut wh, &mut a, &mut t);
        let alpha = (1.0 + 0.5 + 0.4) / 3.0;
        assert!((a[0] - alpha).abs() < 1e-6);
        assert_eq!(wh, [alpha, 0.0, -alpha, alpha]);
    }
    #[test]
    fn absmean_rule() {
        let w = [0.9, -0.1, -0.5, 0.1];
        let (mut wh, mut a, mut t) = ([0.0f32; 4], [0.0f32; 1], [0.0f32; 1]);
        ternarize(&w, 1, TernaryRule::Absmean, &mut wh, &mut a, &mut t);
        // γ = 0.4; w/γ = 2.25, -0.25, -1.25, 0.25 → 1, 0, -1, 0.
        assert!((a[0] - 0.4).abs() < 1e-6);
        assert_eq!(wh, [a[0], 0.0, -a[0], 0.0]);
    }
}
