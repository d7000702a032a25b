//! Fixed-point requantization: `acc · m · 2^-(31+r)`, rounded half up, in integer arithmetic.
//!
//! The model file stores for every output channel an integer multiplier `m` (0 or in
//! [2^30, 2^31 − 1]) and a shift `r` in [-30, 31] such that `m·2^-(31+r)` approximates the real
//! scale ratio `M = s_in·s_w / s_out`. Applying it needs one 64-bit multiply, one add and one
//! arithmetic shift, and is bit-for-bit reproducible on every machine.

use crate::error::Error;

/// Smallest non-zero multiplier, `2^30`.
pub const MULTIPLIER_MIN: i32 = 1 << 30;
/// Largest multiplier, `2^31 − 1`.
pub const MULTIPLIER_MAX: i32 = i32::MAX;
/// Smallest shift.
pub const SHIFT_MIN: i32 = -30;
/// Largest shift.
pub const SHIFT_MAX: i32 = 31;

/// Whether `m` is a valid multiplier: 0, or in [2^30, 2^31 − 1].
pub fn multiplier_in_range(m: i32) -> bool {
    m == 0 || m >= MULTIPLIER_MIN
}

/// Whether `r` is a valid shift: in [-30, 31].
pub fn shift_in_range(r: i32) -> bool {
    (SHIFT_MIN..=SHIFT_MAX).contains(&r)
}

/// `(acc·m + 2^(30+r)) >> (31+r)` computed exactly in i64, i.e. `acc·m·2^-(31+r)` rounded half
/// up (toward +∞), returned as i64 (with `r = -30` the result can exceed the i32 range).
///
/// `m` and `r` must satisfy [`multiplier_in_range`] and [`shift_in_range`]; then
/// `|acc·m| ≤ 2^62` and the rounding term is at most `2^61`, so nothing overflows.
#[inline]
pub fn requantize_wide(acc: i32, m: i32, r: i32) -> i64 {
    debug_assert!(multiplier_in_range(m) && shift_in_range(r));
    let p = i64::from(acc) * i64::from(m);
    (p + (1i64 << (30 + r))) >> (31 + r)
}

/// [`requantize_wide`] saturated to the i32 range.
///
/// Saturation never changes a layer's u8 output, which is clamped to [0, 255] afterwards.
#[inline]
pub fn requantize(acc: i32, m: i32, r: i32) -> i32 {
    requantize_wide(acc, m, r).clamp(i64::from(i32::MIN), i64::from(i32::MAX)) as i32
}

/// The u8 output rule of `relu_u8` / `u8` layers:
/// `clamp(requant(acc, m, r) + z_out, lo, hi)` with `lo = z_out` for `relu_u8`, 0 for `u8`,
/// and `hi = qmax` (255 unless the activation grid is narrower). Requires `lo ≤ hi`.
#[inline]
pub fn requantize_u8(acc: i32, m: i32, r: i32, z_out: u8, lo: u8, hi: u8) -> u8 {
    (requantize_wide(acc, m, r) + i64::from(z_out)).clamp(i64::from(lo), i64::from(hi)) as u8
}

/// Computes `(m, r)` with `M ≈ m·2^-(31+r)` and `m = round(M·2^(31+r))` in [2^30, 2^31 − 1].
///
/// `M = 0` gives `(0, 0)`. Fails for a negative or non-finite `M` and for an `M` whose shift
/// would fall outside [-30, 31] (roughly `M ≥ 2^30` or `M < 2^-31`).
pub fn quantize_multiplier(real: f64) -> Result<(i32, i32), Error> {
    let bad = |detail: &str| Error::Multiplier {
        real,
        detail: detail.to_string(),
    };
    if !real.is_finite() || real < 0.0 {
        return Err(bad("must be finite and non-negative"));
    }
    if real == 0.0 {
        return Ok((0, 0));
    }
    // real = f·2^e with f in [0.5, 1): then M·2^(31+r) = f·2^31 for r = -e.
    let biased = ((real.to_bits() >> 52) & 0x7ff) as i32;
    if biased == 0 {
        return Err(bad("subnormal, needs a shift above 31"));
    }
    let e = biased - 1023 + 1;
    let mut r = -e;
    // Scaling by a power of two is exact; `round` is half away from zero = half up here.
    let mut m = if shift_in_range(r) {
        (real * 2f64.powi(31 + r)).round()
    } else {
        0.0
    };
    if m == 2f64.powi(31) {
        // f rounded up to 1.0: use the next shift down, where the mantissa is exactly 2^30.
        r -= 1;
        m = 2f64.powi(30);
    }
    if !shift_in_range(r) {
        return Err(bad(&format!("needs shift {r}, outside [{SHIFT_MIN}, {SHIFT_MAX}]")));
    }
    Ok((m as i32, r))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn hand_worked_values() {
        // m = 2^30, r = 0: M = 2^30·2^-31 = 0.5.
        assert_eq!(requantize(3, 1 << 30, 0), 2); // 1.5 rounds up
        assert_eq!(requantize(-3, 1 << 30, 0), -1); // -1.5 rounds up to -1
        assert_eq!(requantize(5, 1 << 30, 0), 3); // 2.5 → 3
        assert_eq!(requantize(-5, 1 << 30, 0), -2); // -2.5 → -2
        assert_eq!(requantize(4, 1 << 30, 0), 2);
        // m = 2^30, r = 2: M = 0.125; 100·0.125 = 12.5 → 13.
        assert_eq!(requantize(100, 1 << 30, 2), 13);
        // m = 2^30, r = -30: M = 2^29; 4·M = 2^31 saturates.
        assert_eq!(requantize(4, 1 << 30, -30), i32::MAX);
        assert_eq!(requantize(-4, 1 << 30, -30), i32::MIN);
        assert_eq!(requantize_wide(4, 1 << 30, -30), 1 << 31);
        // m = 0 is always 0.
        assert_eq!(requantize(i32::MIN, 0, 31), 0);
        assert_eq!(requantize(i32::MAX, 0, -30), 0);
    }

    #[test]
    fn extreme_rounding() {
        // i32::MIN·(2^31−1)·2^-62 = -(2^31−1)/2^31 ≈ -0.99999 → rounds to -1.
        assert_eq!(requantize_wide(i32::MIN, i32::MAX, 31), -1);
        // i32::MAX·i32::MAX·2^-1 with r = -30: exact value (2^31−1)^2 / 2, rounds half up.
        let exact = (i64::from(i32::MAX) * i64::from(i32::MAX) + 1) >> 1;
        assert_eq!(requantize_wide(i32::MAX, i32::MAX, -30), exact);
    }

    #[test]
    fn u8_rule() {
        // relu_u8 with z_out = 10: negative values clamp to 10.
        assert_eq!(requantize_u8(-100, 1 << 30, 0, 10, 10, 255), 10);
        assert_eq!(requantize_u8(-100, 1 << 30, 0, 10, 0, 255), 0);
        assert_eq!(requantize_u8(-10, 1 << 30, 0, 10, 0, 255), 5);
        assert_eq!(requantize_u8(1000, 1 << 30, 0, 10, 10, 255), 255);
        assert_eq!(requantize_u8(i32::MAX, i32::MAX, -30, 255, 255, 255), 255);
        assert_eq!(requantize_u8(i32::MIN, i32::MAX, -30, 255, 0, 255), 0);
        // A 4-bit grid: qmax = 15.
        assert_eq!(requantize_u8(1000, 1 << 30, 0, 2, 2, 15), 15);
        assert_eq!(requantize_u8(20, 1 << 30, 0, 2, 2, 15), 12);
    }

    #[test]
    fn quantize_multiplier_hand_worked() {
        assert_eq!(quantize_multiplier(0.0).unwrap(), (0, 0));
        assert_eq!(quantize_multiplier(0.5).unwrap(), (1 << 30, 0));
        assert_eq!(quantize_multiplier(0.25).unwrap(), (1 << 30, 1));
        assert_eq!(quantize_multiplier(1.0).unwrap(), (1 << 30, -1));
        assert_eq!(quantize_multiplier(0.75).unwrap(), (3 << 29, 0));
        // Just below 1.0 rounds up to 2^31 and moves to the next shift.
        assert_eq!(quantize_multiplier(1.0 - 1e-12).unwrap(), (1 << 30, -1));
        // 2^29 needs r = -30.
        assert_eq!(quantize_multiplier(2f64.powi(29)).unwrap(), (1 << 30, -30));
        // 2^30 needs r = -31.
        assert!(quantize_multiplier(2f64.powi(30)).is_err());
        // 2^-32 needs r = 32.
        assert_eq!(quantize_multiplier(2f64.powi(-32)).unwrap(), (1 << 30, 31));
        assert!(quantize_multiplier(2f64.powi(-33)).is_err());
        assert!(quantize_multiplier(-1.0).is_err());
        assert!(quantize_multiplier(f64::NAN).is_err());
        assert!(quantize_multiplier(f64::INFINITY).is_err());
        assert!(quantize_multiplier(f64::MIN_POSITIVE / 4.0).is_err());
        let e = quantize_multiplier(1e-20).unwrap_err().to_string();
        assert!(e.contains("outside [-30, 31]"), "{e}");
    }

    /// Exact reference: `floor(acc·m / 2^(31+r) + 1/2)` in i128 (floor division).
    fn reference(acc: i32, m: i32, r: i32) -> i128 {
        let num = 2 * i128::from(acc) * i128::from(m) + (1i128 << (31 + r));
        let den = 1i128 << (32 + r);
        num.div_euclid(den)
    }

    proptest! {
        #[test]
        fn requantize_is_round_half_up(acc in any::<i32>(),
                                       m in prop_oneof![Just(0), MULTIPLIER_MIN..=MULTIPLIER_MAX],
                                       r in SHIFT_MIN..=SHIFT_MAX) {
            let want = reference(acc, m, r);
            prop_assert_eq!(i128::from(requantize_wide(acc, m, r)), want);
            let sat = want.clamp(i128::from(i32::MIN), i128::from(i32::MAX));
            prop_assert_eq!(i128::from(requantize(acc, m, r)), sat);
        }

        #[test]
        fn quantize_multiplier_is_close(real in 1e-9f64..1e8) {
            let (m, r) = quantize_multiplier(real).unwrap();
            prop_assert!(multiplier_in_range(m) && m != 0);
            prop_assert!(shift_in_range(r));
            let back = f64::from(m) * 2f64.powi(-(31 + r));
            // m = round(M·2^(31+r)) with m ≥ 2^30: relative error ≤ 2^-31.
            prop_assert!(((back - real) / real).abs() <= 2f64.powi(-31) * 1.000001);
        }
    }
}
