//! Uniform affine quantization: `q = clamp(round(x/s) + z, qmin, qmax)`, `x̂ = s·(q − z)`.
//!
//! Rounding is half to even (`f32::round_ties_even`), as `nearbyint` in TensorFlow and PyTorch.
//! Ranges are always widened to contain 0 and the zero point is an integer, so 0.0 is exactly on
//! the grid (zero padding and ReLU zeros are exact). A degenerate range (all zeros) gets scale 1:
//! every value then quantizes to the zero point and dequantizes to exactly 0 — never a NaN.

/// Round half to even, exact for `|x| < 2^22`: adding `1.5·2^23` moves `x` to where the float
/// spacing is 1, so the FPU's default round-to-nearest-even does the rounding; subtracting it
/// back is exact. Written by hand because `f32::round_ties_even` compiles to a libm call per
/// element on the baseline x86-64 target (no SSE4.1 `roundps`), which made fake quantization 42 %
/// of a QAT step; this form vectorises. Callers clamp to the integer grid first (`|x| ≤ 2^8`).
#[inline(always)]
pub fn round_even_small(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5·2^23
    (x + MAGIC) - MAGIC
}

/// A bias on the accumulator grid of its layer, the one function both the training simulation
/// and the exporter use: the code `round(b / (s_in·s_w))` (half away from zero, in f64, clamped
/// to ±2^30 so that adding it to an accumulator cannot overflow) and its real value
/// `code·s_in·s_w`. This is the int32 bias of TFLite and the ONNX QLinear operators.
pub fn bias_on_grid(b: f32, s_in: f32, s_w: f32) -> (i32, f32) {
    let unit = s_in as f64 * s_w as f64;
    if !(unit > 0.0 && unit.is_finite()) {
        return (0, b);
    }
    let code = (b as f64 / unit)
        .round()
        .clamp(i32::MIN as f64 / 2.0, i32::MAX as f64 / 2.0);
    (code as i32, (code * unit) as f32)
}

/// `s` if it is a usable step (positive, finite, with a finite reciprocal: below ~3e-39 the
/// reciprocal overflows and `0·(1/s)` is NaN), else 1 — the degenerate-range rule.
#[inline]
pub fn usable_scale(s: f32) -> f32 {
    if s > 0.0 && s.is_finite() && (1.0 / s).is_finite() {
        s
    } else {
        1.0
    }
}

/// Scale, zero point and integer range of one quantized tensor (or one channel).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct QParams {
    /// Step between grid points (> 0, finite).
    pub scale: f32,
    /// Integer that represents 0.0.
    pub zero_point: i32,
    /// Smallest integer.
    pub qmin: i32,
    /// Largest integer.
    pub qmax: i32,
}

impl QParams {
    /// Symmetric signed grid for `bits` with `|x| ≤ max_abs`. `narrow` drops the most negative
    /// code (`[-(2^(b-1)-1), 2^(b-1)-1]`, scale `max_abs/(2^(b-1)-1)`: the TFLite weight
    /// convention). Full range uses every code `[-2^(b-1), 2^(b-1)-1]` with PyTorch's symmetric
    /// rule, scale `max_abs/((qmax − qmin)/2)` (127.5 at 8 bits): the most negative weight lands
    /// on −128, the most positive is clipped by half a step to 127.
    pub fn symmetric(max_abs: f32, bits: u32, narrow: bool) -> Self {
        let qmax = (1i32 << (bits - 1)) - 1;
        let qmin = if narrow { -qmax } else { -qmax - 1 };
        let m = if max_abs.is_finite() { max_abs.abs() } else { 0.0 };
        let levels = if narrow {
            qmax as f32
        } else {
            (qmax - qmin) as f32 / 2.0
        };
        let scale = if m > 0.0 { m / levels } else { 1.0 };
        QParams {
            scale: usable_scale(scale),
            zero_point: 0,
            qmin,
            qmax,
        }
    }

    /// Asymmetric unsigned grid `[0, 2^b − 1]` covering `[min(lo,0), max(hi,0)]`.
    pub fn asymmetric(lo: f32, hi: f32, bits: u32) -> Self {
        let qmin = 0;
        let qmax = (1i32 << bits) - 1;
        let lo = if lo.is_finite() { lo.min(0.0) } else { 0.0 };
        let hi = if hi.is_finite() { hi.max(0.0) } else { 0.0 };
        let range = hi - lo;
        if range.is_nan() || range <= 0.0 || !range.is_finite() {
            return QParams {
                scale: 1.0,
                zero_point: 0,
                qmin,
                qmax,
            };
        }
        let scale = range / (qmax - qmin) as f32;
        if usable_scale(scale) != scale {
            return QParams {
                scale: 1.0,
                zero_point: 0,
                qmin,
                qmax,
            };
        }
        let zp = (qmin as f32 - lo / scale).round_ties_even() as i32;
        QParams {
            scale,
            zero_point: zp.clamp(qmin, qmax),
            qmin,
            qmax,
        }
    }

    /// The integer code of `x`.
    #[inline]
    pub fn quantize(&self, x: f32) -> i32 {
        // round(x/s) + z = round(x/s + z) for integer z, and clamping to the integer bounds
        // before rounding gives the same code as after.
        let v = (x / self.scale + self.zero_point as f32).clamp(self.qmin as f32, self.qmax as f32);
        round_even_small(v) as i32
    }

    /// The real value of code `q`.
    #[inline]
    pub fn dequantize(&self, q: i32) -> f32 {
        (q - self.zero_point) as f32 * self.scale
    }

    /// `dequantize(quantize(x))`.
    #[inline]
    pub fn fake_quant(&self, x: f32) -> f32 {
        self.dequantize(self.quantize(x))
    }

    /// Lowest and highest representable real values.
    #[inline]
    pub fn range(&self) -> (f32, f32) {
        (self.dequantize(self.qmin), self.dequantize(self.qmax))
    }
}

/// Per-output-channel symmetric fake quantization of a `[inputs, outputs]` kernel (channel =
/// column). Writes `ŵ` and the scale of each channel, and the integer codes into `codes` unless it
/// is empty (see [`fake_quant_weights_with_scales`]). One pass to find `max|w|` per column, one to
/// quantize; no allocation.
#[allow(clippy::too_many_arguments)]
pub fn fake_quant_weights_per_channel(
    w: &[f32],
    outputs: usize,
    bits: u32,
    narrow: bool,
    w_hat: &mut [f32],
    scales: &mut [f32],
    max_abs: &mut [f32],
    codes: &mut [i8],
) {
    column_max_abs(w, &mut max_abs[..outputs]);
    for (s, &m) in scales.iter_mut().zip(max_abs.iter()) {
        *s = QParams::symmetric(m, bits, narrow).scale;
    }
    fake_quant_weights_with_scales(w, outputs, bits, narrow, scales, max_abs, w_hat, codes);
}

crate::simd::widest! {
    /// `max_j |w[k, j]|` over the rows of a `[rows, m.len()]` kernel (exact: the order of a max
    /// changes nothing).
    pub fn column_max_abs(w: &[f32], m: &mut [f32]) {
        m.fill(0.0);
        for row in w.chunks_exact(m.len()) {
            for (m, &v) in m.iter_mut().zip(row) {
                *m = m.max(v.abs());
            }
        }
    }
}

crate::simd::widest! {
    /// `ŵ = s_j·clamp(round(w/s_j), qmin, qmax)` with given per-channel scales (`inv` is scratch of
    /// `outputs` values). With the max-abs scales nothing is clamped; with fixed scales, weights
    /// beyond the range are. Compiled for the widest instruction set (`crate::simd`): every
    /// replica runs it over the whole kernel at every step.
    ///
    /// Unless `codes` is empty, the integer codes `clamp(round(w/s_j))` are written there too, in
    /// the same pass (the oscillation tracker reads them: one byte per weight instead of ŵ again).
    pub fn fake_quant_weights_with_scales(
        w: &[f32],
        outputs: usize,
        bits: u32,
        narrow: bool,
        scales: &[f32],
        inv: &mut [f32],
        w_hat: &mut [f32],
        codes: &mut [i8],
    ) {
        let qmax = ((1i32 << (bits - 1)) - 1) as f32;
        let qmin = if narrow { -qmax } else { -qmax - 1.0 };
        // Multiply by 1/s rather than divide: this pass runs over every weight at every step.
        for (i, &s) in inv.iter_mut().zip(scales.iter()) {
            *i = 1.0 / s;
        }
        if codes.is_empty() {
            for (row, out) in w.chunks_exact(outputs).zip(w_hat.chunks_exact_mut(outputs)) {
                for (((o, &v), &s), &i) in out.iter_mut().zip(row).zip(scales.iter()).zip(inv.iter()) {
                    *o = round_even_small((v * i).clamp(qmin, qmax)) * s;
                }
            }
            return;
        }
        assert_eq!(codes.len(), w_hat.len(), "one code per weight");
        // The codes are i8, and the unchecked conversion below needs every clamped value to be
        // an i32: both hold for the grids of 1 to 8 bits (the configuration allows 2 to 8).
        assert!((1..=8).contains(&bits), "codes of a {bits}-bit grid do not fit an i8");
        for ((row, out), cs) in w
            .chunks_exact(outputs)
            .zip(w_hat.chunks_exact_mut(outputs))
            .zip(codes.chunks_exact_mut(outputs))
        {
            for ((((o, c), &v), &s), &i) in out.iter_mut().zip(cs.iter_mut()).zip(row).zip(scales.iter()).zip(inv.iter()) {
                let q = round_even_small((v * i).clamp(qmin, qmax));
                *o = q * s;
                // SAFETY: `q` is finite and in [qmin, qmax] ⊂ [−128, 127] (clamped above, bits ≤ 8
                // asserted before the loop;
                // a NaN weight clamps to NaN, excluded by the check), so it is representable in
                // i32. Unchecked because the saturating `as` does not vectorise (measured: the
                // QAT epoch 1.5× slower with it).
                *c = if q.is_nan() { 0 } else { (unsafe { q.to_int_unchecked::<i32>() }) as i8 };
            }
        }
    }
}

/// Per-tensor symmetric fake quantization (one scale for the whole kernel).
pub fn fake_quant_weights_per_tensor(w: &[f32], bits: u32, narrow: bool, w_hat: &mut [f32]) -> f32 {
    let m = w.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let qp = QParams::symmetric(m, bits, narrow);
    for (o, &v) in w_hat.iter_mut().zip(w) {
        *o = qp.fake_quant(v);
    }
    qp.scale
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn fast_rounding_equals_round_ties_even(x in -4_000_000.0f32..4_000_000.0, k in -300i32..300) {
            prop_assert_eq!(round_even_small(x), x.round_ties_even());
            let tie = k as f32 + 0.5;
            prop_assert_eq!(round_even_small(tie), tie.round_ties_even());
        }

        // Definition checks: x̂ lies on the grid, 0 is on the grid, error ≤ s/2 inside the range.
        #[test]
        fn asymmetric_grid_properties(lo in -10.0f32..5.0, span in 0.0f32..20.0, bits in 2u32..=8, x in -30.0f32..30.0) {
            let qp = QParams::asymmetric(lo, lo + span, bits);
            prop_assert!(qp.scale > 0.0 && qp.scale.is_finite());
            prop_assert!(qp.zero_point >= qp.qmin && qp.zero_point <= qp.qmax);
            prop_assert_eq!(qp.fake_quant(0.0), 0.0);
            let xh = qp.fake_quant(x);
            let k = xh / qp.scale + qp.zero_point as f32;
            prop_assert!((k - k.round()).abs() < 1e-3, "x̂ = {} not on grid", xh);
            let (a, b) = qp.range();
            if x >= a && x <= b {
                prop_assert!((xh - x).abs() <= qp.scale * 0.5 * (1.0 + 1e-4) + 1e-6);
            } else {
                prop_assert!(xh == a || xh == b);
            }
        }
        #[test]
        fn symmetric_grid_properties(m in 0.0f32..10.0, bits in 2u32..=8, narrow: bool, x in -20.0f32..20.0) {
            let qp = QParams::symmetric(m, bits, narrow);
            prop_assert_eq!(qp.zero_point, 0);
            prop_assert_eq!(qp.fake_quant(0.0), 0.0);
            let q = qp.quantize(x);
            prop_assert!(q >= qp.qmin && q <= qp.qmax);
            if narrow { prop_assert_eq!(qp.qmin, -qp.qmax); }
            if x.abs() <= m && m > 0.0 {
                prop_assert!((qp.fake_quant(x) - x).abs() <= qp.scale * 0.5 * (1.0 + 1e-4) + 1e-6);
            }
        }
    }

    #[test]
    fn hand_worked_values() {
        // 8-bit asymmetric on [-1, 3]: s = 4/255, z = round(255/4) = 64.
        let qp = QParams::asymmetric(-1.0, 3.0, 8);
        assert!((qp.scale - 4.0 / 255.0).abs() < 1e-9);
        assert_eq!(qp.zero_point, 64);
        assert_eq!(qp.quantize(3.0), 255);
        assert_eq!(qp.quantize(-5.0), 0);
        // Range forced to include 0: [2, 4] becomes [0, 4].
        let qp = QParams::asymmetric(2.0, 4.0, 8);
        assert_eq!(qp.zero_point, 0);
        // 4-bit symmetric narrow, max 7: scale 1, codes -7..7, half to even.
        let qp = QParams::symmetric(7.0, 4, true);
        assert_eq!((qp.qmin, qp.qmax, qp.scale), (-7, 7, 1.0));
        assert_eq!(qp.quantize(2.5), 2);
        assert_eq!(qp.quantize(3.5), 4);
        assert_eq!(qp.quantize(-9.0), -7);
        // 8-bit full range, max 127.5 (PyTorch's symmetric rule): s = 127.5/127.5 = 1; the most
        // negative weight uses −128, the most positive is clipped to 127.
        let qp = QParams::symmetric(127.5, 8, false);
        assert_eq!((qp.qmin, qp.qmax, qp.scale), (-128, 127, 1.0));
        assert_eq!((qp.quantize(-127.5), qp.quantize(127.5)), (-128, 127));
        // The bias on the accumulator grid: half away from zero, value = code·s_in·s_w.
        assert_eq!(bias_on_grid(0.3125, 0.5, 0.25), (3, 0.375)); // 2.5 units → 3
        assert_eq!(bias_on_grid(-0.3125, 0.5, 0.25), (-3, -0.375));
        assert_eq!(bias_on_grid(1.0, 0.0, 0.25), (0, 1.0)); // no grid: the float bias
    }

    #[test]
    fn degenerate_ranges_are_defined() {
        for qp in [
            QParams::asymmetric(0.0, 0.0, 8),
            QParams::symmetric(0.0, 8, true),
            QParams::asymmetric(f32::NAN, f32::INFINITY, 4),
        ] {
            assert_eq!(qp.scale, 1.0);
            assert_eq!(qp.fake_quant(0.0), 0.0);
            assert!(qp.fake_quant(0.3).is_finite());
        }
        let w = [0.0f32; 12];
        let (mut wh, mut s, mut m) = ([1.0f32; 12], [0.0f32; 3], [0.0f32; 3]);
        fake_quant_weights_per_channel(&w, 3, 8, true, &mut wh, &mut s, &mut m, &mut []);
        assert!(wh.iter().all(|&v| v == 0.0) && s.iter().all(|&v| v == 1.0));
    }

    #[test]
    fn per_channel_uses_column_max() {
        // [inputs=2, outputs=2]: column 0 = (1, -0.5), column 1 = (0.1, 0.2).
        let w = [1.0, 0.1, -0.5, 0.2];
        let (mut wh, mut s, mut m) = ([0.0f32; 4], [0.0f32; 2], [0.0f32; 2]);
        fake_quant_weights_per_channel(&w, 2, 8, true, &mut wh, &mut s, &mut m, &mut []);
        assert!((s[0] - 1.0 / 127.0).abs() < 1e-9 && (s[1] - 0.2 / 127.0).abs() < 1e-9);
        assert_eq!(wh[0], 1.0);
        assert!((wh[3] - 0.2).abs() < 1e-7);
    }
}
