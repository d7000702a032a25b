//! Binary (±1) dense layers: XNOR-popcount.
//!
//! With bit 1 = +1 and bit 0 = −1, two bits multiply to +1 exactly when they are equal, so over
//! `in` inputs `dot = (#equal) − (#different) = in − 2·popcount(x XOR w)`. Padding bits are 0
//! in both operands, so they never differ and never count.
//!
//! Three tiers:
//! - `Scalar`: `u64::count_ones` in plain Rust (whatever the baseline target emits);
//! - `Avx2`: the same loop compiled with the `popcnt` feature (one `popcnt` per word);
//! - `Avx512Vnni`: VPOPCNTDQ when the CPU has it, vectorised *across output channels*: the
//!   weights are regrouped as `[ceil(out/8)][words][8]`, each input word is broadcast and
//!   XOR-popcounted against 8 channels' words at once. This works for any `in`, including the
//!   common 1–2 word case where a per-row horizontal popcount would not fill a vector. Without
//!   VPOPCNTDQ it falls back to the `popcnt` loop.
//!
//! Measured on Zen 4 (`examples/bench_kernels.rs`, 128 rows): for 128-bit rows × 64 channels
//! the scalar `popcnt` loop does ~140 binary GOP/s and VPOPCNTDQ ~1500; for 1024-bit rows ×
//! 256 channels ~350 vs ~2250. So even for short rows the vector path wins by 10×, and the
//! `Avx512Vnni` tier always uses it when available.

use super::{KernelKind, PackedDenseBin, SignBits};
use crate::aligned::Aligned;

/// Channels per group: one zmm of u64.
const GROUP: usize = 8;

/// Regroups `[out, words]` row-major weights as `[ceil(out/8)][words][8]`, zero-padded.
pub(super) fn pack(outputs: usize, words: usize, weight: &[u64]) -> Aligned<u64> {
    let groups = outputs.div_ceil(GROUP);
    let mut p = Aligned::zeroed(groups * words * GROUP);
    for j in 0..outputs {
        for w in 0..words {
            p[((j / GROUP) * words + w) * GROUP + j % GROUP] = weight[j * words + w];
        }
    }
    p
}

/// Dispatches to the tier (`kind` is already known to be available; sizes are checked).
pub(super) fn dense_bin(
    kind: KernelKind,
    w: &PackedDenseBin,
    x: &[u64],
    x_stride: usize,
    rows: usize,
    acc: &mut [i32],
    acc_stride: usize,
) {
    match kind {
        KernelKind::Scalar => super::scalar::dense_bin(w, x, x_stride, rows, acc, acc_stride),
        #[cfg(target_arch = "x86_64")]
        KernelKind::Avx512Vnni if is_x86_feature_detected!("avx512vpopcntdq") => {
            // SAFETY: AVX-512 F/VL (part of the tier) and VPOPCNTDQ (just checked) are present;
            // the caller checked the buffer sizes, and `w.grouped` was built by `pack`.
            unsafe { avx512::dense_bin(w, x, x_stride, rows, acc, acc_stride) }
        }
        #[cfg(target_arch = "x86_64")]
        _ => {
            // SAFETY: both remaining SIMD tiers require POPCNT, and their availability was
            // checked; the caller checked the buffer sizes.
            unsafe { popcnt_rows(w, x, x_stride, rows, acc, acc_stride) }
        }
        #[cfg(not(target_arch = "x86_64"))]
        _ => super::scalar::dense_bin(w, x, x_stride, rows, acc, acc_stride),
    }
}

/// Dispatches the fused dense + sign layer (`kind` is available; sizes are checked).
#[allow(clippy::too_many_arguments)]
pub(super) fn dense_bin_sign(
    kind: KernelKind,
    w: &PackedDenseBin,
    sign: &SignBits,
    x: &[u64],
    x_stride: usize,
    rows: usize,
    out: &mut [u64],
    out_words: usize,
) {
    let t = &sign.threshold[..w.outputs];
    match kind {
        KernelKind::Scalar => super::scalar::dense_bin_sign(w, t, x, x_stride, rows, out, out_words),
        #[cfg(target_arch = "x86_64")]
        KernelKind::Avx512Vnni if is_x86_feature_detected!("avx512vpopcntdq") => {
            // SAFETY: as in `dense_bin`; `sign.threshold` is padded to a multiple of 16 channels,
            // so the kernel's 8-channel threshold loads stay inside it.
            unsafe { avx512::dense_bin_sign(w, &sign.threshold, x, x_stride, rows, out, out_words) }
        }
        #[cfg(target_arch = "x86_64")]
        _ => {
            // SAFETY: both remaining SIMD tiers require POPCNT, checked with their availability.
            unsafe { popcnt_sign_rows(w, t, x, x_stride, rows, out, out_words) }
        }
        #[cfg(not(target_arch = "x86_64"))]
        _ => super::scalar::dense_bin_sign(w, t, x, x_stride, rows, out, out_words),
    }
}

/// The scalar fused loop compiled with the hardware `popcnt` instruction.
///
/// # Safety
/// The CPU must support POPCNT; sizes as checked by [`super::dense_bin_sign`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "popcnt")]
unsafe fn popcnt_sign_rows(
    w: &PackedDenseBin,
    t: &[i32],
    x: &[u64],
    x_stride: usize,
    rows: usize,
    out: &mut [u64],
    out_words: usize,
) {
    super::scalar::dense_bin_sign(w, t, x, x_stride, rows, out, out_words)
}

/// The row-major loop with the hardware `popcnt` instruction.
///
/// # Safety
/// The CPU must support POPCNT; sizes as checked by [`super::dense_bin`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "popcnt")]
unsafe fn popcnt_rows(w: &PackedDenseBin, x: &[u64], x_stride: usize, rows: usize, acc: &mut [i32], acc_stride: usize) {
    let words = w.words;
    let inputs = w.inputs as i32;
    for b in 0..rows {
        let xr = &x[b * x_stride..b * x_stride + words];
        let out = &mut acc[b * acc_stride..b * acc_stride + w.outputs];
        for (o, wr) in out.iter_mut().zip(w.rowmajor.chunks_exact(words)) {
            let diff: u32 = xr.iter().zip(wr).map(|(a, b)| (a ^ b).count_ones()).sum();
            *o = inputs.wrapping_sub((diff as i32).wrapping_mul(2));
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{PackedDenseBin, GROUP};

    const ROWS: usize = 4;
    const GROUPS: usize = 4;

    /// VPOPCNTDQ kernel over the grouped layout, i32 dot products out.
    ///
    /// # Safety
    /// The CPU must support AVX-512 F/VL and VPOPCNTDQ; sizes as checked by
    /// [`super::super::dense_bin`].
    #[target_feature(enable = "avx512f,avx512vl,avx512vpopcntdq")]
    pub(super) unsafe fn dense_bin(
        w: &PackedDenseBin,
        x: &[u64],
        x_stride: usize,
        rows: usize,
        acc: &mut [i32],
        acc_stride: usize,
    ) {
        let out = Out::Acc {
            ptr: acc.as_mut_ptr(),
            stride: acc_stride,
        };
        run(w, x, x_stride, rows, out);
    }

    /// VPOPCNTDQ kernel over the grouped layout with the sign epilogue fused: each tile's
    /// 8-channel compare mask is stored as one byte of the output bit row (channel `j` is bit
    /// `j % 8` of byte `j / 8`, which on little-endian x86 is bit `j % 64` of word `j / 64`).
    ///
    /// # Safety
    /// As [`dense_bin`]; `threshold` is padded to at least `ceil(outputs/8)·8` values and
    /// `out` holds `rows` rows of `out_words = ceil(outputs/64)` words.
    #[target_feature(enable = "avx512f,avx512vl,avx512vpopcntdq")]
    pub(super) unsafe fn dense_bin_sign(
        w: &PackedDenseBin,
        threshold: &[i32],
        x: &[u64],
        x_stride: usize,
        rows: usize,
        out: &mut [u64],
        out_words: usize,
    ) {
        // The tiles write the bytes of the channel groups that exist; the rest of each row
        // (whole padding bytes) is cleared here.
        let used = w.outputs.div_ceil(GROUP);
        for row in out.chunks_exact_mut(out_words).take(rows) {
            let last = row.len() - 1;
            row[last] = 0;
        }
        debug_assert!(threshold.len() >= used * GROUP);
        let o = Out::Bits {
            ptr: out.as_mut_ptr().cast::<u8>(),
            stride: out_words * 8,
            threshold: threshold.as_ptr(),
        };
        run(w, x, x_stride, rows, o);
    }

    /// Where a tile's results go.
    #[derive(Clone, Copy)]
    enum Out {
        /// i32 dot products, `[rows, stride]`.
        Acc { ptr: *mut i32, stride: usize },
        /// Bit rows of `stride` bytes, with the per-channel thresholds.
        Bits {
            ptr: *mut u8,
            stride: usize,
            threshold: *const i32,
        },
    }

    #[target_feature(enable = "avx512f,avx512vl,avx512vpopcntdq")]
    unsafe fn run(w: &PackedDenseBin, x: &[u64], x_stride: usize, rows: usize, out: Out) {
        let groups = w.outputs.div_ceil(GROUP);
        let s = Shape {
            words: w.words,
            gstride: w.words * GROUP,
            x_stride,
            inputs: w.inputs as i64,
        };
        let mut r0 = 0;
        while r0 < rows {
            let nr = ROWS.min(rows - r0);
            let mut g0 = 0;
            while g0 < groups {
                let ng = GROUPS.min(groups - g0);
                let c0 = g0 * GROUP;
                let t = Tile {
                    w: w.grouped.as_ptr().add(g0 * s.gstride),
                    x: x.as_ptr().add(r0 * x_stride),
                    out: match out {
                        Out::Acc { ptr, stride } => Out::Acc {
                            ptr: ptr.add(r0 * stride + c0),
                            stride,
                        },
                        Out::Bits { ptr, stride, threshold } => Out::Bits {
                            ptr: ptr.add(r0 * stride + g0),
                            stride,
                            threshold: threshold.add(c0),
                        },
                    },
                    valid: w.outputs - c0,
                };
                macro_rules! go {
                    ($($r:literal $g:literal),*) => {
                        match (nr, ng) {
                            $(($r, $g) => tile::<$r, $g>(&s, &t),)*
                            _ => unreachable!(),
                        }
                    };
                }
                go!(1 1, 1 2, 1 3, 1 4, 2 1, 2 2, 2 3, 2 4, 3 1, 3 2, 3 3, 3 4, 4 1, 4 2, 4 3, 4 4);
                g0 += ng;
            }
            r0 += nr;
        }
    }

    struct Shape {
        words: usize,
        gstride: usize,
        x_stride: usize,
        inputs: i64,
    }

    struct Tile {
        w: *const u64,
        x: *const u64,
        out: Out,
        valid: usize,
    }

    #[target_feature(enable = "avx512f,avx512vl,avx512vpopcntdq")]
    unsafe fn tile<const R: usize, const G: usize>(s: &Shape, t: &Tile) {
        let mut c = [[_mm512_setzero_si512(); G]; R];
        for k in 0..s.words {
            let mut wv = [_mm512_setzero_si512(); G];
            for (g, v) in wv.iter_mut().enumerate() {
                *v = _mm512_load_si512(t.w.add(g * s.gstride + k * GROUP).cast());
            }
            for (r, row) in c.iter_mut().enumerate() {
                let xv = _mm512_set1_epi64(*t.x.add(r * s.x_stride + k) as i64);
                for g in 0..G {
                    let d = _mm512_popcnt_epi64(_mm512_xor_si512(xv, wv[g]));
                    row[g] = _mm512_add_epi64(row[g], d);
                }
            }
        }
        let n = _mm512_set1_epi64(s.inputs);
        let valid = |g: usize| {
            let v = t.valid.saturating_sub(g * GROUP).min(GROUP);
            ((1u16 << v) - 1) as __mmask8
        };
        match t.out {
            Out::Acc { ptr, stride } => {
                for (r, row) in c.iter().enumerate() {
                    for (g, v) in row.iter().enumerate() {
                        // dot = in − 2·popcount, then narrow the i64 lanes to i32 (wrapping).
                        let dot = _mm512_sub_epi64(n, _mm512_slli_epi64(*v, 1));
                        let dst = ptr.add(r * stride + g * GROUP);
                        _mm256_mask_storeu_epi32(dst, valid(g), _mm512_cvtepi64_epi32(dot));
                    }
                }
            }
            Out::Bits { ptr, stride, threshold } => {
                for g in 0..G {
                    // in − 2·pc ≥ t  ⟺  pc ≤ ⌊(in − t)/2⌋, exactly in i64 (in ≤ i32::MAX, so
                    // the i32 dot product of the reference never wraps). Channels past `out`
                    // load padding thresholds and are masked off.
                    let th = _mm512_cvtepi32_epi64(_mm256_loadu_si256(threshold.add(g * GROUP).cast()));
                    let pc_max = _mm512_srai_epi64(_mm512_sub_epi64(n, th), 1);
                    for (r, row) in c.iter().enumerate() {
                        let bits = _mm512_mask_cmple_epi64_mask(valid(g), row[g], pc_max);
                        *ptr.add(r * stride + g) = bits;
                    }
                }
            }
        }
    }
}
