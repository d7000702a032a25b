//! Bit images: the gather (im2col) of a binary convolution and max pooling, on sign bits.
//!
//! A bit image `[h, w, c]` stores each pixel's `c` sign bits in `⌈c/64⌉` u64 words ([`words`]):
//! bit `b` of word `k` is channel `64·k + b`, 1 = +1, and the bits past `c` are 0. Pixels are
//! row-major, so a sample is `h·w·⌈c/64⌉` words and a pixel's words are its channel vector, as
//! a u8 image's bytes are.
//!
//! * [`im2col_bits`] gathers the patches of a convolution tap by tap, whole words per tap (a
//!   tap's bits start a new word, so the XNOR-popcount kernels of [`super::dense_bin`] take the
//!   patch as a row of `kh·kw·⌈c/64⌉` words). A tap in the padding reads +1 on every channel
//!   (Larq's `pad_values = 1`, the padding the training simulation uses for binary
//!   convolutions): padding then is a bit pattern, and no correction is needed at the borders.
//! * [`maxpool_bits`]: the max of ±1 values is +1 exactly when one of them is, so max pooling
//!   is the OR of the window's words.
//!
//! Both are word moves and ORs in plain Rust (no tier of their own): for cnn-small the gather
//! moves 9 words per output position against 9·64 popcounts per channel group, and pooling is a
//! few ORs per output word.

use super::conv::Window;
use super::pool::span;

/// u64 words per pixel of a bit image with `c` channels.
#[inline]
pub fn words(c: usize) -> usize {
    c.div_ceil(64)
}

/// The `⌈c/64⌉` words of one pixel whose `c` bits are all +1 (the padding of a binary
/// convolution; [`im2col_bits`] takes it from its caller, so that it allocates nothing).
pub fn ones(c: usize) -> Vec<u64> {
    (0..words(c))
        .map(|k| {
            let bits = (c - 64 * k).min(64);
            if bits == 64 {
                !0
            } else {
                (1u64 << bits) - 1
            }
        })
        .collect()
}

/// Gathers the bit patches of `n` output positions of a convolution with window `win` (one
/// channel group).
///
/// Positions are numbered across samples as in [`super::conv::im2col`]: flat position
/// `r0 + r` is position `(r0 + r) mod (oh·ow)` of sample `(r0 + r) / (oh·ow)`, whose
/// `h·w·⌈c/64⌉` words start at `x[sample·x_stride]`. Row `r` of `col` (stride `col_stride ≥
/// kh·kw·⌈c/64⌉`) receives the taps in weight order `(ky, kx)`, each the `⌈c/64⌉` words of
/// pixel `(iy, ix)`, or `pad` ([`ones`]`(c)`) where the tap lies in the padding.
///
/// The window must be valid ([`Window::out_hw`] is `Some`); panics (slice bounds) if a buffer
/// is too small.
#[allow(clippy::too_many_arguments)]
#[inline(never)] // a function of its own for `scripts/check-integer-kernels.sh`
pub fn im2col_bits(
    win: &Window,
    out_hw: [usize; 2],
    x: &[u64],
    x_stride: usize,
    r0: usize,
    n: usize,
    pad: &[u64],
    col: &mut [u64],
    col_stride: usize,
) {
    let Window {
        in_shape: [h, w, c],
        kernel: [kh, kw],
        stride: [sh, sw],
        padding: [top, left, ..],
        dilation: [dh, dw],
    } = *win;
    let pw = words(c);
    let [oh, ow] = out_hw;
    let positions = oh * ow;
    assert!(col_stride >= kh * kw * pw && col.len() >= n * col_stride && pad.len() == pw);
    for r in 0..n {
        let flat = r0 + r;
        let (sample, p) = (flat / positions, flat % positions);
        let (oy, ox) = (p / ow, p % ow);
        let xs = &x[sample * x_stride..sample * x_stride + h * w * pw];
        let row = &mut col[r * col_stride..r * col_stride + kh * kw * pw];
        for ky in 0..kh {
            let iy = (oy * sh + ky * dh).checked_sub(top).filter(|&v| v < h);
            for kx in 0..kw {
                let ix = (ox * sw + kx * dw).checked_sub(left).filter(|&v| v < w);
                let dst = &mut row[(ky * kw + kx) * pw..(ky * kw + kx + 1) * pw];
                match (iy, ix) {
                    (Some(iy), Some(ix)) => dst.copy_from_slice(&xs[(iy * w + ix) * pw..(iy * w + ix + 1) * pw]),
                    _ => dst.copy_from_slice(pad),
                }
            }
        }
    }
}

/// Max pooling of bit images: `y[oy, ox]` = the OR of the words of the window's pixels inside
/// the input (padding is ignored, as in `maxpool_u8`; validation guarantees every window holds
/// at least one pixel). `rows` samples of `x` (stride `x_stride` words) into `y` (stride
/// `y_stride`, `oh·ow·⌈c/64⌉` words each). The dilation must be 1.
#[allow(clippy::too_many_arguments)]
#[inline(never)] // a function of its own for `scripts/check-integer-kernels.sh`
pub fn maxpool_bits(
    win: &Window,
    out_hw: [usize; 2],
    x: &[u64],
    x_stride: usize,
    rows: usize,
    y: &mut [u64],
    y_stride: usize,
) {
    let [h, w, c] = win.in_shape;
    let pw = words(c);
    let [kh, kw] = win.kernel;
    let [sh, sw] = win.stride;
    let [top, left, ..] = win.padding;
    let [oh, ow] = out_hw;
    for b in 0..rows {
        let xs = &x[b * x_stride..b * x_stride + h * w * pw];
        let ys = &mut y[b * y_stride..b * y_stride + oh * ow * pw];
        for oy in 0..oh {
            let iys = span(oy, sh, top, kh, h);
            for ox in 0..ow {
                let ixs = span(ox, sw, left, kw, w);
                let out = &mut ys[(oy * ow + ox) * pw..(oy * ow + ox + 1) * pw];
                out.fill(0);
                for iy in iys.clone() {
                    for ix in ixs.clone() {
                        let src = &xs[(iy * w + ix) * pw..(iy * w + ix + 1) * pw];
                        for (o, &v) in out.iter_mut().zip(src) {
                            *o |= v;
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padding_words_hold_exactly_c_ones() {
        for c in [1, 5, 63, 64, 65, 128, 130] {
            let v = ones(c);
            assert_eq!(v.len(), words(c));
            assert_eq!(v.iter().map(|w| w.count_ones() as usize).sum::<usize>(), c, "c {c}");
        }
    }
}
