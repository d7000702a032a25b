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

/// Dispatches to the tier.
///
/// # Safety
/// - `kind` must be available on this CPU (`kind.is_available()`): the `Avx2` and
///   `Avx512Vnni` tiers run code compiled for POPCNT, and `Avx512Vnni` for AVX-512 F/VL.
/// - `x` must hold `rows` rows of `w.words` words at stride `x_stride`, and `acc` `rows` rows
///   of `w.outputs` values at stride `acc_stride`, as `check_2d` asserts in
///   [`super::dense_bin`]: the VPOPCNTDQ kernel indexes them through raw pointers.
pub(super) unsafe fn dense_bin(
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
        KernelKind::Avx512Vnni | KernelKind::Amx if is_x86_feature_detected!("avx512vpopcntdq") => {
            // SAFETY: AVX-512 F/VL are part of the `Avx512Vnni` tier, available by this
            // function's precondition, and VPOPCNTDQ was detected just above. The sizes of `x`
            // and `acc` are a precondition of this function too, and `w.grouped` was built by
            // `pack` in `PackedDenseBin::new` for `w.outputs` × `w.words`.
            unsafe { avx512::dense_bin(w, x, x_stride, rows, acc, acc_stride) }
        }
        #[cfg(target_arch = "x86_64")]
        _ => {
            // SAFETY: the remaining tiers are `Avx2`, and `Avx512Vnni` or `Amx` without
            // VPOPCNTDQ; each includes POPCNT in `is_available` (`Amx` requires `Avx512Vnni`),
            // which holds by this function's precondition.
            unsafe { popcnt_rows(w, x, x_stride, rows, acc, acc_stride) }
        }
        #[cfg(not(target_arch = "x86_64"))]
        _ => super::scalar::dense_bin(w, x, x_stride, rows, acc, acc_stride),
    }
}

/// Dispatches the fused dense + sign layer.
///
/// # Safety
/// - `kind` must be available on this CPU, as for [`dense_bin`].
/// - `sign.outputs` must equal `w.outputs`; `x` must hold `rows` rows of `w.words` words at
///   stride `x_stride`, and `out` `rows` rows of `out_words = ⌈w.outputs/64⌉` words, as
///   [`super::dense_bin_sign`] asserts: the VPOPCNTDQ kernel indexes them through raw pointers.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn dense_bin_sign(
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
        KernelKind::Avx512Vnni | KernelKind::Amx if is_x86_feature_detected!("avx512vpopcntdq") => {
            // SAFETY: CPU features as in `dense_bin`; the sizes of `x` and `out` are this
            // function's precondition. `sign.threshold` holds `padded(outputs)` values
            // (`SignBits::new`, with `sign.outputs = w.outputs`), at least the `⌈outputs/8⌉·8`
            // the kernel's 8-channel threshold loads need.
            unsafe { avx512::dense_bin_sign(w, &sign.threshold, x, x_stride, rows, out, out_words) }
        }
        #[cfg(target_arch = "x86_64")]
        _ => {
            // SAFETY: the remaining tiers are `Avx2`, and `Avx512Vnni` or `Amx` without
            // VPOPCNTDQ; each includes POPCNT in `is_available` (`Amx` requires `Avx512Vnni`),
            // which holds by this function's precondition.
            unsafe { popcnt_sign_rows(w, t, x, x_stride, rows, out, out_words) }
        }
        #[cfg(not(target_arch = "x86_64"))]
        _ => super::scalar::dense_bin_sign(w, t, x, x_stride, rows, out, out_words),
    }
}

/// The scalar fused loop compiled with the hardware `popcnt` instruction.
///
/// # Safety
/// The CPU must support POPCNT. (That is all: the body is safe code that indexes with bounds
/// checks, so wrong sizes panic.)
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
    super::scalar::dense_bin_sign_inline(w, t, x, x_stride, rows, out, out_words)
}

/// The row-major loop with the hardware `popcnt` instruction.
///
/// # Safety
/// The CPU must support POPCNT. (That is all: the body is safe code that indexes with bounds
/// checks, so wrong sizes panic.)
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
    /// The CPU must support AVX-512 F/VL and VPOPCNTDQ; `x` must hold `rows` rows of `w.words`
    /// words at stride `x_stride`, and `acc` `rows` rows of `w.outputs` values at stride
    /// `acc_stride` (`(rows − 1)·stride + width ≤ len`), as `check_2d` asserts in
    /// [`super::super::dense_bin`]. (`w.grouped` is built by `pack` in `PackedDenseBin::new`.)
    #[target_feature(enable = "avx512f,avx512vl,avx512vpopcntdq")]
    pub(super) unsafe fn dense_bin(
        w: &PackedDenseBin,
        x: &[u64],
        x_stride: usize,
        rows: usize,
        acc: &mut [i32],
        acc_stride: usize,
    ) {
        debug_assert!(rows == 0 || acc.len() >= (rows - 1) * acc_stride + w.outputs);
        let out = Out::Acc {
            ptr: acc.as_mut_ptr(),
            stride: acc_stride,
        };
        // SAFETY: the CPU features and the size of `x` are this function's preconditions;
        // `out` points at `acc`, exclusively borrowed for the call, whose size is one too.
        unsafe { run(w, x, x_stride, rows, out) };
    }

    /// VPOPCNTDQ kernel over the grouped layout with the sign epilogue fused: each tile's
    /// 8-channel compare mask is stored as one byte of the output bit row (channel `j` is bit
    /// `j % 8` of byte `j / 8`, which on little-endian x86 is bit `j % 64` of word `j / 64`).
    ///
    /// # Safety
    /// As [`dense_bin`] for the CPU and `x`; `threshold` must hold at least `⌈outputs/8⌉·8`
    /// values, and `out` at least `rows·out_words` words with `out_words = ⌈outputs/64⌉`, as
    /// [`super::super::dense_bin_sign`] asserts.
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
        debug_assert!(out_words == w.outputs.div_ceil(64) && out.len() >= rows * out_words);
        let o = Out::Bits {
            ptr: out.as_mut_ptr().cast::<u8>(),
            stride: out_words * 8,
            threshold: threshold.as_ptr(),
        };
        // SAFETY: the CPU features, the size of `x`, `threshold` and `out` are this function's
        // preconditions; `o` points at `out` (exclusively borrowed for the call) viewed as
        // bytes, `out_words·8` bytes per row, which u64 memory allows (u8 has alignment 1 and
        // every byte pattern is a valid u64).
        unsafe { run(w, x, x_stride, rows, o) };
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

    /// Walks the batch in tiles of up to `ROWS` rows × `GROUPS` groups of 8 channels.
    ///
    /// # Safety
    /// The CPU must support AVX-512 F/VL and VPOPCNTDQ; `x` must hold `rows` rows of `w.words`
    /// words at stride `x_stride`; and `out` must be writable for `rows` rows:
    /// - `Out::Acc`: `(rows − 1)·stride + w.outputs` i32 from `ptr`;
    /// - `Out::Bits`: `rows·stride` bytes from `ptr` with `stride ≥ ⌈outputs/8⌉`, and
    ///   `threshold` readable for `⌈outputs/8⌉·8` i32.
    #[target_feature(enable = "avx512f,avx512vl,avx512vpopcntdq")]
    #[inline(never)] // a function of its own for `scripts/check-integer-kernels.sh`
    unsafe fn run(w: &PackedDenseBin, x: &[u64], x_stride: usize, rows: usize, out: Out) {
        let groups = w.outputs.div_ceil(GROUP);
        debug_assert_eq!(w.grouped.len(), groups * w.words * GROUP);
        debug_assert!(rows == 0 || x.len() >= (rows - 1) * x_stride + w.words);
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
                // SAFETY: every offset is inside its buffer (so `add` stays in bounds):
                // - `g0 < groups`: `g0·gstride < groups·words·8 = w.grouped.len()` (`pack`);
                // - `r0 < rows`, `words ≥ 1`: `r0·x_stride < (rows − 1)·x_stride + words ≤ x.len()`;
                // - `Acc`: `c0 < outputs`, so `r0·stride + c0 < (rows − 1)·stride + outputs`;
                // - `Bits`: `g0 < ⌈outputs/8⌉ ≤ stride`, so `r0·stride + g0 < rows·stride`, and
                //   `c0 < ⌈outputs/8⌉·8` thresholds.
                let t = unsafe {
                    Tile {
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
                    }
                };
                // SAFETY: the CPU features are this function's precondition. `t` describes
                // `nr` rows and `ng` groups that exist, as `tile` requires: rows `r0..r0 + nr ≤
                // rows` of `x` and `out`, groups `g0..g0 + ng ≤ groups` of `w.grouped` (an
                // `Aligned` buffer: `t.w` is `64·g0·words` bytes into it, 64-byte aligned) and of
                // the thresholds, and `t.valid = outputs − c0 > 8·(ng − 1)`. The match covers
                // every `(nr, ng)` in `1..=ROWS × 1..=GROUPS` and passes `R = nr`, `G = ng`.
                unsafe {
                    macro_rules! go {
                        ($($r:literal $g:literal),*) => {
                            match (nr, ng) {
                                $(($r, $g) => tile::<$r, $g>(&s, &t),)*
                                _ => unreachable!(),
                            }
                        };
                    }
                    go!(1 1, 1 2, 1 3, 1 4, 2 1, 2 2, 2 3, 2 4, 3 1, 3 2, 3 3, 3 4, 4 1, 4 2, 4 3, 4 4);
                }
                g0 += ng;
            }
            r0 += nr;
        }
    }

    struct Shape {
        words: usize,
        /// u64 between consecutive 8-channel groups of the grouped weights (`words·8`).
        gstride: usize,
        x_stride: usize,
        inputs: i64,
    }

    struct Tile {
        w: *const u64,
        x: *const u64,
        out: Out,
        /// Valid channels from the tile's first channel on (may exceed the tile's width).
        valid: usize,
    }

    /// Computes an `R`-row × `G`-group tile (8 channels per group).
    ///
    /// # Safety
    /// AVX-512 F/VL and VPOPCNTDQ must be available, and `t` must describe `R` rows and `G`
    /// groups that exist:
    /// - `t.w + g·s.gstride` has `8·s.words` readable u64 on a 64-byte boundary for `g < G`;
    /// - `t.x + r·s.x_stride` has `s.words` readable u64 for `r < R`;
    /// - `t.valid > 8·(G − 1)`;
    /// - `Out::Acc`: `ptr + r·stride` has `min(t.valid, 8·G)` writable i32 for `r < R`;
    /// - `Out::Bits`: `ptr + r·stride` has `G` writable bytes for `r < R`, and `threshold` has
    ///   `8·G` readable i32.
    #[target_feature(enable = "avx512f,avx512vl,avx512vpopcntdq")]
    unsafe fn tile<const R: usize, const G: usize>(s: &Shape, t: &Tile) {
        let mut c = [[_mm512_setzero_si512(); G]; R];
        for k in 0..s.words {
            let mut wv = [_mm512_setzero_si512(); G];
            for (g, v) in wv.iter_mut().enumerate() {
                // SAFETY: word `k < words` of group `g < G`: 8 readable u64 (64 bytes) at a
                // multiple of 64 bytes from a 64-byte aligned group start, as
                // `_mm512_load_si512` requires.
                *v = unsafe { _mm512_load_si512(t.w.add(g * s.gstride + k * GROUP).cast()) };
            }
            for (r, row) in c.iter_mut().enumerate() {
                // SAFETY: word `k < words` of row `r < R`, readable (precondition).
                let xv = _mm512_set1_epi64(unsafe { *t.x.add(r * s.x_stride + k) } as i64);
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
                        // SAFETY: `8·g < t.valid`, so `dst` is inside row `r`'s writable run of
                        // `min(t.valid, 8·G)` i32; the masked store writes only the group's
                        // valid channels, and masked-off lanes are neither accessed nor faulted
                        // on; `storeu` needs no alignment.
                        unsafe {
                            let dst = ptr.add(r * stride + g * GROUP);
                            _mm256_mask_storeu_epi32(dst, valid(g), _mm512_cvtepi64_epi32(dot));
                        }
                    }
                }
            }
            Out::Bits { ptr, stride, threshold } => {
                for g in 0..G {
                    // in − 2·pc ≥ t  ⟺  pc ≤ ⌊(in − t)/2⌋, exactly in i64 (in ≤ i32::MAX, so
                    // the i32 dot product of the reference never wraps). Channels past `out`
                    // load padding thresholds and are masked off.
                    // SAFETY: thresholds `8g..8g + 8 ≤ 8·G` are readable; `loadu` needs no
                    // alignment.
                    let th = _mm512_cvtepi32_epi64(unsafe { _mm256_loadu_si256(threshold.add(g * GROUP).cast()) });
                    let pc_max = _mm512_srai_epi64(_mm512_sub_epi64(n, th), 1);
                    for (r, row) in c.iter().enumerate() {
                        let bits = _mm512_mask_cmple_epi64_mask(valid(g), row[g], pc_max);
                        // SAFETY: byte `g < G` of row `r < R`, writable (precondition).
                        unsafe { *ptr.add(r * stride + g) = bits };
                    }
                }
            }
        }
    }
}
