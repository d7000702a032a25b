//! Portable reference kernels: plain loops, obviously correct, used as the oracle in tests and
//! as the fallback tier on CPUs without AVX2.
//!
//! All i32 arithmetic wraps (two's complement), like the SIMD instructions do. For any layer
//! whose exact accumulator fits in i32 (always, for `in` below ~66 000 at full range) this is
//! the exact integer result; beyond that every tier still agrees bit for bit.
//!
//! The tier's kernels are `#[inline(never)]`: each stays a function of its own, which
//! `scripts/check-integer-kernels.sh` finds in the disassembly and checks for floating-point
//! instructions (inlined, a kernel's code would go unchecked, or the check would fail, depending
//! on how the compiler happened to split the crate into codegen units). Each is called once per
//! layer and block of rows, so the call costs nothing measurable.

use super::conv::ConvGeometry;
use super::{Nibbles, PackedDenseBin, PackedDenseI8, Requant};

/// The `dense_i8` accumulator exactly as the format spec writes it:
/// `acc[b][j] = Σ_k (x[b][k] − z_in)·W[j][k] + bias[j]`, with `W` row-major `[out, in]`.
///
/// This is the oracle the tests compare every tier against; it does not use the packed form
/// or the folded bias.
#[allow(clippy::too_many_arguments)]
pub fn dense_i8_reference(
    x: &[u8],
    x_stride: usize,
    rows: usize,
    weight: &[i8],
    bias: &[i32],
    input_zero_point: u8,
    acc: &mut [i32],
    acc_stride: usize,
) {
    let outputs = bias.len();
    let inputs = weight.len() / outputs.max(1);
    for b in 0..rows {
        let xr = &x[b * x_stride..b * x_stride + inputs];
        for j in 0..outputs {
            let wr = &weight[j * inputs..(j + 1) * inputs];
            let mut s = 0i32;
            for (&xv, &wv) in xr.iter().zip(wr) {
                let d = i32::from(xv) - i32::from(input_zero_point);
                s = s.wrapping_add(d * i32::from(wv));
            }
            acc[b * acc_stride + j] = s.wrapping_add(bias[j]);
        }
    }
}

/// The `conv2d_i8` accumulator exactly as the format spec writes it, by direct loops:
/// `acc[oy,ox,o] = bias[o] + Σ_{ky,kx,ci} (x[iy,ix,g·cg+ci] − z_in)·W[o,ky,kx,ci]` with
/// `iy = oy·sh − top + ky·dh`, `ix = ox·sw − left + kx·dw`, `g = o / (out/groups)`,
/// `cg = c/groups`; taps outside the input contribute 0 (they read `z_in`).
///
/// `x` holds `rows` samples of `h·w·c` bytes back to back (NHWC), `weight` is
/// `[out, kh, kw, cg]`, and `acc` receives `rows` samples of `oh·ow·out` values (NHWC). This is
/// the oracle the tests compare every tier's im2col + GEMM path against; it shares no code with
/// it. The geometry must be valid ([`Window::out_hw`](super::conv::Window::out_hw) is `Some`).
pub fn conv2d_i8_reference(
    g: &ConvGeometry,
    x: &[u8],
    rows: usize,
    weight: &[i8],
    bias: &[i32],
    input_zero_point: u8,
    acc: &mut [i32],
) {
    let [h, w, c] = g.window.in_shape;
    let [kh, kw] = g.window.kernel;
    let [sh, sw] = g.window.stride;
    let [top, left, ..] = g.window.padding;
    let [dh, dw] = g.window.dilation;
    let [oh, ow] = g.window.out_hw().expect("conv2d_i8_reference: invalid geometry");
    let out = g.out_channels;
    let (cg, og) = (c / g.groups, out / g.groups);
    let z = i32::from(input_zero_point);
    for s in 0..rows {
        let xs = &x[s * h * w * c..(s + 1) * h * w * c];
        for oy in 0..oh {
            for ox in 0..ow {
                for o in 0..out {
                    let grp = o / og;
                    let mut a = bias[o];
                    for ky in 0..kh {
                        for kx in 0..kw {
                            let iy = (oy * sh + ky * dh) as isize - top as isize;
                            let ix = (ox * sw + kx * dw) as isize - left as isize;
                            if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                continue;
                            }
                            for ci in 0..cg {
                                let xv = i32::from(xs[(iy as usize * w + ix as usize) * c + grp * cg + ci]);
                                let wv = i32::from(weight[((o * kh + ky) * kw + kx) * cg + ci]);
                                a = a.wrapping_add((xv - z) * wv);
                            }
                        }
                    }
                    acc[((s * oh + oy) * ow + ox) * out + o] = a;
                }
            }
        }
    }
}

/// The `dense_bin` dot product exactly as the spec writes it:
/// `dot[b][j] = in − 2·popcount(x[b] XOR W[j])`, with `W` row-major `[out, words]`.
#[allow(clippy::too_many_arguments)]
#[inline(never)]
pub fn dense_bin_reference(
    x: &[u64],
    x_stride: usize,
    rows: usize,
    inputs: usize,
    weight: &[u64],
    outputs: usize,
    acc: &mut [i32],
    acc_stride: usize,
) {
    let words = inputs.div_ceil(64);
    for b in 0..rows {
        let xr = &x[b * x_stride..b * x_stride + words];
        for j in 0..outputs {
            let wr = &weight[j * words..(j + 1) * words];
            let diff: u32 = xr.iter().zip(wr).map(|(a, w)| (a ^ w).count_ones()).sum();
            acc[b * acc_stride + j] = (inputs as i32).wrapping_sub((diff as i32).wrapping_mul(2));
        }
    }
}

/// Scalar tier of the fused binary layer with sign output: exactly [`dense_bin_reference`]
/// then [`sign_bits`], one output word (64 channels) at a time.
///
/// Never inlined (see the module doc); the body is [`dense_bin_sign_inline`], which the POPCNT
/// tier inlines instead.
#[inline(never)]
pub(super) fn dense_bin_sign(
    w: &PackedDenseBin,
    threshold: &[i32],
    x: &[u64],
    x_stride: usize,
    rows: usize,
    out: &mut [u64],
    out_words: usize,
) {
    dense_bin_sign_inline(w, threshold, x, x_stride, rows, out, out_words)
}

/// The body of [`dense_bin_sign`]. Always inlined, so that the POPCNT tier's wrapper
/// (`binary::popcnt_sign_rows`) compiles it with the `popcnt` instruction.
#[inline(always)]
pub(super) fn dense_bin_sign_inline(
    w: &PackedDenseBin,
    threshold: &[i32],
    x: &[u64],
    x_stride: usize,
    rows: usize,
    out: &mut [u64],
    out_words: usize,
) {
    let words = w.words;
    let inputs = w.inputs as i32;
    let weight = &w.rowmajor[..w.outputs * words];
    for b in 0..rows {
        let xr = &x[b * x_stride..b * x_stride + words];
        let o = &mut out[b * out_words..(b + 1) * out_words];
        for (word, (wc, tc)) in o.iter_mut().zip(weight.chunks(64 * words).zip(threshold.chunks(64))) {
            let mut bits = 0u64;
            for (c, (wr, &t)) in wc.chunks_exact(words).zip(tc).enumerate() {
                let diff: u32 = xr.iter().zip(wr).map(|(a, w)| (a ^ w).count_ones()).sum();
                let dot = inputs.wrapping_sub((diff as i32).wrapping_mul(2));
                bits |= u64::from(dot >= t) << c;
            }
            *word = bits;
        }
    }
}

/// Scalar tier of the int8 dense layer: `acc = folded_bias + Σ x·W` over the packed weights.
#[inline(never)]
pub(super) fn dense_i8(w: &PackedDenseI8, x: &[u8], x_stride: usize, rows: usize, acc: &mut [i32], acc_stride: usize) {
    let (n, k) = (w.outputs, w.inputs);
    for b in 0..rows {
        let xr = &x[b * x_stride..b * x_stride + k];
        let out = &mut acc[b * acc_stride..b * acc_stride + n];
        for (j, o) in out.iter_mut().enumerate() {
            let wr = &w.rowmajor[j * k..(j + 1) * k];
            let mut s = w.bias[j];
            for (&xv, &wv) in xr.iter().zip(wr) {
                s = s.wrapping_add(i32::from(xv) * i32::from(wv));
            }
            *o = s;
        }
    }
}

/// Scalar tier of the 4-bit dense layer: [`dense_i8`] on the row-major nibbles (two's
/// complement, low nibble first), each sign-extended as it is read.
#[inline(never)]
pub(super) fn dense_i4(
    w: &PackedDenseI8,
    nib: &Nibbles,
    x: &[u8],
    x_stride: usize,
    rows: usize,
    acc: &mut [i32],
    acc_stride: usize,
) {
    let (n, k, rb) = (w.outputs, w.inputs, nib.row_bytes);
    for b in 0..rows {
        let xr = &x[b * x_stride..b * x_stride + k];
        let out = &mut acc[b * acc_stride..b * acc_stride + n];
        for (j, o) in out.iter_mut().enumerate() {
            let wr = &nib.rowmajor[j * rb..(j + 1) * rb];
            let mut s = w.bias[j];
            let mut pairs = xr.chunks_exact(2);
            for (xp, &byte) in (&mut pairs).zip(wr) {
                let lo = i32::from(((byte << 4) as i8) >> 4);
                let hi = i32::from((byte as i8) >> 4);
                s = s.wrapping_add(i32::from(xp[0]) * lo + i32::from(xp[1]) * hi);
            }
            if let [last] = pairs.remainder() {
                let lo = i32::from(((wr[rb - 1] << 4) as i8) >> 4);
                s = s.wrapping_add(i32::from(*last) * lo);
            }
            *o = s;
        }
    }
}

/// Scalar tier of the binary layer, on the row-major weights.
pub(super) fn dense_bin(
    w: &PackedDenseBin,
    x: &[u64],
    x_stride: usize,
    rows: usize,
    acc: &mut [i32],
    acc_stride: usize,
) {
    dense_bin_reference(x, x_stride, rows, w.inputs, &w.rowmajor, w.outputs, acc, acc_stride);
}

/// `u8` / `relu_u8` output: `clamp(requant(acc, m, r) + z_out, lo, qmax)` per channel.
#[inline(never)]
pub(super) fn requant_u8(p: &Requant, acc: &[i32], acc_stride: usize, rows: usize, out: &mut [u8], out_stride: usize) {
    let n = p.outputs;
    for b in 0..rows {
        let a = &acc[b * acc_stride..b * acc_stride + n];
        let o = &mut out[b * out_stride..b * out_stride + n];
        for j in 0..n {
            o[j] = crate::requant::requantize_u8(a[j], p.m[j], p.r[j], p.z_out, p.lo, p.hi);
        }
    }
}

/// `sign_bits` output: bit j of the row is `acc[j] ≥ threshold[j]`; padding bits are cleared.
#[inline(never)]
pub(super) fn sign_bits(
    threshold: &[i32],
    acc: &[i32],
    acc_stride: usize,
    rows: usize,
    out: &mut [u64],
    out_words: usize,
) {
    let n = threshold.len();
    for b in 0..rows {
        let a = &acc[b * acc_stride..b * acc_stride + n];
        let o = &mut out[b * out_words..(b + 1) * out_words];
        o.fill(0);
        for j in 0..n {
            if a[j] >= threshold[j] {
                o[j / 64] |= 1 << (j % 64);
            }
        }
    }
}

/// `logits` output: `(acc as f32)·scale[j]`, plus `bias[j]` for binary layers.
///
/// This is the only place an integer becomes a float. Multiplication and addition are separate
/// f32 operations (never fused), so every tier rounds identically.
#[allow(clippy::too_many_arguments)]
#[inline(never)]
pub(super) fn dequantize(
    scale: &[f32],
    bias: Option<&[f32]>,
    acc: &[i32],
    acc_stride: usize,
    rows: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    let n = scale.len();
    for b in 0..rows {
        let a = &acc[b * acc_stride..b * acc_stride + n];
        let o = &mut out[b * out_stride..b * out_stride + n];
        for j in 0..n {
            o[j] = a[j] as f32 * scale[j];
            if let Some(bias) = bias {
                o[j] += bias[j];
            }
        }
    }
}
