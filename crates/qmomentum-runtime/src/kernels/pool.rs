//! Pooling over NHWC u8 samples: max, and the rounded mean.
//!
//! One tier for all CPUs: the loops run over the channels innermost (contiguous bytes), which
//! the compiler vectorises with the baseline SSE2 `pmaxub` / widening adds, and pooling is a
//! small share of a network's time (`examples/bench_kernels.rs` prints it for the CNN). Integer
//! only: the mean divides with an exact multiply-and-shift ([`DivRound`]).

use super::conv::Window;

/// `(sum + n/2) / n` (round half up) for `0 ≤ sum ≤ 255·n`, as one multiply and one shift.
///
/// With `x = sum + ⌊n/2⌋ < 256·n`, `s = 8 + 2·⌈log2 n⌉` and `m = ⌈2^s / n⌉`, the error
/// `e = m·n − 2^s < n` gives `x·e < 256·n² ≤ 2^s`, so `⌊x·m / 2^s⌋ = ⌊x / n⌋` exactly (the
/// classic round-up method); `x·m < 2^(s+8) + 256·n` fits u64 for `n ≤ 2^23`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DivRound {
    n: u32,
    m: u64,
    s: u32,
}

impl DivRound {
    /// Largest divisor supported.
    pub const MAX_N: usize = 1 << 23;

    /// The divider for windows of `n` values, `1 ≤ n ≤` [`DivRound::MAX_N`].
    ///
    /// # Panics
    /// If `n` is outside that range.
    pub fn new(n: usize) -> DivRound {
        assert!((1..=Self::MAX_N).contains(&n), "average of {n} values");
        let bits = usize::BITS - (n - 1).leading_zeros(); // ⌈log2 n⌉ (0 for n = 1)
        let s = 8 + 2 * bits;
        let m = (1u64 << s).div_ceil(n as u64);
        DivRound { n: n as u32, m, s }
    }

    /// `(sum + n/2) / n`, for `sum ≤ 255·n`.
    #[inline(always)]
    pub fn apply(&self, sum: u32) -> u8 {
        ((u64::from(sum + self.n / 2) * self.m) >> self.s) as u8
    }
}

/// The input rows (or columns) of window `o` on one axis: `o·s − pad ..` (`k` of them) clipped
/// to the `size` of the image (the taps of a max pooling window that lie inside the input).
#[inline(always)]
pub(crate) fn span(o: usize, s: usize, pad: usize, k: usize, size: usize) -> std::ops::Range<usize> {
    let start = (o * s).saturating_sub(pad);
    let end = (o * s + k).saturating_sub(pad).min(size);
    start..end
}

/// Max pooling: `y[oy, ox, c]` = the largest `x[iy, ix, c]` over the window's positions inside
/// the input (padding is ignored, like PyTorch's −∞ padding; validation guarantees every window
/// holds at least one input position). `rows` samples of `x` (stride `x_stride`) into `y`
/// (stride `y_stride`, `oh·ow·c` bytes each). The dilation must be 1.
#[allow(clippy::too_many_arguments)]
#[inline(never)] // a function of its own for `scripts/check-integer-kernels.sh`
pub fn maxpool_u8(
    win: &Window,
    out_hw: [usize; 2],
    x: &[u8],
    x_stride: usize,
    rows: usize,
    y: &mut [u8],
    y_stride: usize,
) {
    let [h, w, c] = win.in_shape;
    let [kh, kw] = win.kernel;
    let [sh, sw] = win.stride;
    let [top, left, ..] = win.padding;
    let [oh, ow] = out_hw;
    for b in 0..rows {
        let xs = &x[b * x_stride..b * x_stride + h * w * c];
        let ys = &mut y[b * y_stride..b * y_stride + oh * ow * c];
        for oy in 0..oh {
            let iys = span(oy, sh, top, kh, h);
            for ox in 0..ow {
                let ixs = span(ox, sw, left, kw, w);
                let out = &mut ys[(oy * ow + ox) * c..(oy * ow + ox + 1) * c];
                // 16 channels at a time, the running maximum in a register (fixed-size arrays
                // compile to `pmaxub`); then the remaining channels one by one.
                let mut ch = 0;
                while ch + 16 <= c {
                    let mut m = [0u8; 16];
                    for iy in iys.clone() {
                        for ix in ixs.clone() {
                            let at = (iy * w + ix) * c + ch;
                            let v: &[u8; 16] = xs[at..at + 16].try_into().unwrap_or(&[0; 16]);
                            for i in 0..16 {
                                m[i] = m[i].max(v[i]);
                            }
                        }
                    }
                    out[ch..ch + 16].copy_from_slice(&m);
                    ch += 16;
                }
                for (k, o) in out[ch..].iter_mut().enumerate() {
                    let mut m = 0u8;
                    for iy in iys.clone() {
                        for ix in ixs.clone() {
                            m = m.max(xs[(iy * w + ix) * c + ch + k]);
                        }
                    }
                    *o = m;
                }
            }
        }
    }
}

/// Average pooling without padding: `y[oy, ox, c] = (Σ x + n/2) / n` over the `n = kh·kw`
/// window positions. `sums` is scratch of at least `c` values. The dilation must be 1, the
/// padding 0, and `div` made for `n`.
#[allow(clippy::too_many_arguments)]
#[inline(never)] // a function of its own for `scripts/check-integer-kernels.sh`
pub fn avgpool_u8(
    win: &Window,
    out_hw: [usize; 2],
    div: &DivRound,
    x: &[u8],
    x_stride: usize,
    rows: usize,
    y: &mut [u8],
    y_stride: usize,
    sums: &mut [u32],
) {
    let [h, w, c] = win.in_shape;
    let [kh, kw] = win.kernel;
    let [sh, sw] = win.stride;
    let [oh, ow] = out_hw;
    let sums = &mut sums[..c];
    for b in 0..rows {
        let xs = &x[b * x_stride..b * x_stride + h * w * c];
        let ys = &mut y[b * y_stride..b * y_stride + oh * ow * c];
        for (p, out) in ys.chunks_exact_mut(c).enumerate() {
            let (oy, ox) = (p / ow, p % ow);
            sums.fill(0);
            for iy in oy * sh..oy * sh + kh {
                for ix in ox * sw..ox * sw + kw {
                    let src = &xs[(iy * w + ix) * c..(iy * w + ix + 1) * c];
                    for (s, &v) in sums.iter_mut().zip(src) {
                        *s += u32::from(v);
                    }
                }
            }
            for (o, &s) in out.iter_mut().zip(sums.iter()) {
                *o = div.apply(s);
            }
        }
    }
}

/// Global average pooling: `y[c] = (Σ_{iy,ix} x[iy, ix, c] + n/2) / n` with `n = h·w`.
/// `sums` is scratch of at least `c` values; `div` is made for `n`.
#[allow(clippy::too_many_arguments)]
#[inline(never)] // a function of its own for `scripts/check-integer-kernels.sh`
pub fn global_avgpool_u8(
    in_shape: [usize; 3],
    div: &DivRound,
    x: &[u8],
    x_stride: usize,
    rows: usize,
    y: &mut [u8],
    y_stride: usize,
    sums: &mut [u32],
) {
    let [h, w, c] = in_shape;
    let sums = &mut sums[..c];
    for b in 0..rows {
        let xs = &x[b * x_stride..b * x_stride + h * w * c];
        sums.fill(0);
        for src in xs.chunks_exact(c) {
            for (s, &v) in sums.iter_mut().zip(src) {
                *s += u32::from(v);
            }
        }
        for (o, &s) in y[b * y_stride..b * y_stride + c].iter_mut().zip(sums.iter()) {
            *o = div.apply(s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn div_round_is_exact_for_every_sum() {
        for n in (1..=300).chain([511, 512, 513, 1000, 4096, 65535, 65536, 1 << 20]) {
            let d = DivRound::new(n);
            let n = n as u32;
            let max = 255 * n;
            // Every sum for small n; a stride through the range (plus its end) for large n.
            let step = (max / 20_000).max(1);
            for sum in (0..=max).step_by(step as usize).chain([max.saturating_sub(1), max]) {
                assert_eq!(u32::from(d.apply(sum)), (sum + n / 2) / n, "n {n} sum {sum}");
            }
        }
        let d = DivRound::new(DivRound::MAX_N);
        let n = DivRound::MAX_N as u32;
        for sum in [0, 1, n / 2 - 1, n / 2, 255 * n - n / 2 - 1, 255 * n - n / 2, 255 * n] {
            assert_eq!(u32::from(d.apply(sum)), (sum + n / 2) / n, "sum {sum}");
        }
    }
}
