//! AVX-512 VNNI tier: the int8 dense kernel on `vpdpbusd` and the vectorised epilogues.
//!
//! # Packed weight layout
//! Output channels are taken in groups of 16 (one zmm of i32 accumulators) and the inputs in
//! steps of 4 (one `vpdpbusd` lane sums 4 u8×i8 products). For group `g` and step `s`, 64
//! consecutive bytes hold `W[16g + c][4s + t]` at byte `4c + t`. The kernel broadcasts the 4
//! input bytes `x[4s..4s+4]` (one i32) to all lanes and does one `vpdpbusd` per group: 64
//! multiply-adds. Channels past `out` and inputs past `in` are zero-padded, so they contribute
//! nothing; a partial last input step reads only the row's valid bytes.
//!
//! # Register blocking
//! A tile of up to 4 rows × 4 groups (4 × 64 channels) keeps 16 accumulators in registers;
//! each weight vector loaded is used 4 times, each broadcast input 4 times. The 4-bit kernel
//! uses 8 rows × 2 groups (the same 16 accumulators), so that each weight vector expanded from
//! nibbles serves 8 rows.
//!
//! # 4-bit layers
//! [`pack4`] keeps half a byte per weight: input steps are taken in pairs, and for group `g`
//! and pair `p` the 64 bytes hold in byte `4c + t` the weight `W[16g + c][8p + t]` in the low
//! nibble and `W[16g + c][8p + 4 + t]` in the high nibble, each stored as `code + 8` (0..15;
//! padding nibbles hold 8, a zero weight). [`dense_i4`] loads one such vector and expands it in
//! registers: `v & 0x0f` (`vpandd`) is step `2p`'s vector of `code + 8` and `(v >> 4) & 0x0f`
//! (`vpsrlw`, `vpandd`) step `2p + 1`'s, both in 0..15 and so valid `vpdpbusd` i8 operands.
//! The `+ 8` is not subtracted per weight: `Σ x·(w + 8) = Σ x·w + 8·Σ x`, so each row's
//! accumulators start at `bias − 8·Σx` (the row's byte sum, taken once per row and shared by
//! every output channel). Inputs past the row's end read as zero, so padding nibbles add
//! nothing. The arithmetic is i32 modulo 2³² like the int8 kernel's (and exact whenever the
//! int8 kernel's is: every `x·(w + 8)` is ≥ 0, so the accumulator climbs from `bias − 8·Σx` to
//! its final value), so the results equal the int8 kernel's.
//!
//! `vpdpbusd` multiplies u8 by i8 into i16 products and adds them in i32 without saturation
//! (unlike `vpmaddubsw`), so the result equals the scalar tier's exactly.

use std::arch::x86_64::*;

use super::{Dequant, PackedDenseI8, Requant, SignBits, LANES};
use crate::aligned::Aligned;

const ROWS: usize = 4;
const GROUPS: usize = 4;
/// The 4-bit kernel's tile: 8 rows × 2 groups (16 accumulators, as the int8 tile), so each
/// weight vector expanded from nibbles serves 8 rows instead of 4. Measured against 4 × 4 and
/// 16 × 1 with `bench_lowbit`: see "4-bit weights on the VNNI tier" in `doc/runtime.md`.
const ROWS4: usize = 8;
const GROUPS4: usize = 2;

/// Packs `[out, in]` row-major weights into the layout described in the module doc.
pub(super) fn pack(inputs: usize, outputs: usize, weight: &[i8]) -> Aligned<i8> {
    let groups = outputs.div_ceil(LANES);
    let steps = inputs.div_ceil(4);
    let mut p = Aligned::zeroed(groups * steps * 64);
    for j in 0..outputs {
        let (g, c) = (j / LANES, j % LANES);
        for k in 0..inputs {
            let (s, t) = (k / 4, k % 4);
            p[(g * steps + s) * 64 + 4 * c + t] = weight[j * inputs + k];
        }
    }
    p
}

/// Packs `[out, in]` row-major codes in [-8, 7] into the 4-bit layout described in the module
/// doc: `groups·pairs·64` bytes, `pairs = ⌈⌈in/4⌉/2⌉`.
pub(super) fn pack4(inputs: usize, outputs: usize, weight: &[i8]) -> Aligned<u8> {
    let groups = outputs.div_ceil(LANES);
    let pairs = inputs.div_ceil(4).div_ceil(2);
    let mut p = Aligned::from_slice(&vec![0x88u8; groups * pairs * 64]);
    for j in 0..outputs {
        let (g, c) = (j / LANES, j % LANES);
        for k in 0..inputs {
            let (pair, half, t) = (k / 8, (k / 4) % 2, k % 4);
            let at = (g * pairs + pair) * 64 + 4 * c + t;
            let nibble = (weight[j * inputs + k] + 8) as u8 & 0x0f;
            let shift = 4 * half;
            p[at] = (p[at] & !(0x0f << shift)) | (nibble << shift);
        }
    }
    p
}

/// The VNNI 4-bit dense kernel: [`dense_i8`] on [`pack4`]ed weights, expanded in registers.
///
/// # Safety
/// - The CPU must support AVX-512 F/BW/VL/VNNI (`KernelKind::Avx512Vnni.is_available()`).
/// - `packed` must be the whole slice of the [`Aligned`] buffer that [`pack4`] returned for
///   `w.inputs` × `w.outputs`: `groups·pairs·64` bytes with `groups = ⌈outputs/16⌉`,
///   `pairs = ⌈⌈inputs/4⌉/2⌉`, starting on a 64-byte boundary.
/// - `x` and `acc` as for [`dense_i8`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
pub(super) unsafe fn dense_i4(
    w: &PackedDenseI8,
    packed: &[u8],
    x: &[u8],
    x_stride: usize,
    rows: usize,
    acc: &mut [i32],
    acc_stride: usize,
) {
    let groups = w.outputs.div_ceil(LANES);
    let pairs = w.inputs.div_ceil(4).div_ceil(2);
    debug_assert_eq!(packed.len(), groups * pairs * 64);
    debug_assert_eq!(packed.as_ptr() as usize % 64, 0);
    debug_assert!(w.bias.len() >= groups * LANES);
    debug_assert!(rows == 0 || x.len() >= (rows - 1) * x_stride + w.inputs);
    debug_assert!(rows == 0 || acc.len() >= (rows - 1) * acc_stride + w.outputs);
    let shape = Shape {
        gstride: pairs * 64,
        x_stride,
        full: w.inputs / 4,
        tail: w.inputs % 4,
        acc_stride,
    };
    let mut r0 = 0;
    while r0 < rows {
        let nr = ROWS4.min(rows - r0);
        // 8·Σx of each row of the block (see the module doc), modulo 2³² like the accumulators.
        let mut eight_xsum = [0i32; ROWS4];
        for (r, e) in eight_xsum.iter_mut().enumerate().take(nr) {
            let row = &x[(r0 + r) * x_stride..][..w.inputs];
            *e = row
                .iter()
                .fold(0i32, |a, &b| a.wrapping_add(i32::from(b)))
                .wrapping_mul(8);
        }
        let mut g0 = 0;
        while g0 < groups {
            let ng = GROUPS4.min(groups - g0);
            // SAFETY: every offset is inside its buffer (so `add` stays in bounds):
            // - `g0 < groups`, so `g0·gstride < groups·pairs·64 = packed.len()` (precondition);
            // - `16·g0 < 16·groups = w.bias.len()`;
            // - `r0 < rows` and `inputs ≥ 1`: `r0·x_stride < (rows − 1)·x_stride + inputs ≤ x.len()`;
            // - `16·g0 < outputs`: `r0·acc_stride + 16·g0 < (rows − 1)·acc_stride + outputs ≤ acc.len()`.
            let t = unsafe {
                Tile {
                    w: packed.as_ptr().add(g0 * shape.gstride).cast(),
                    x: x.as_ptr().add(r0 * x_stride),
                    bias: w.bias.as_ptr().add(g0 * LANES),
                    acc: acc.as_mut_ptr().add(r0 * acc_stride + g0 * LANES),
                    valid: w.outputs - g0 * LANES,
                }
            };
            // SAFETY: AVX-512 F/BW/VL/VNNI are a precondition of this function. `t` describes
            // `nr` rows and `ng` groups that exist, as `tile4` requires: rows `r0..r0 + nr ≤
            // rows` of `x` and `acc` (sizes are a precondition), groups `g0..g0 + ng ≤ groups`
            // of `packed` (each `pairs` vectors of 64 bytes, `gstride` apart) and of the bias,
            // and `t.valid = outputs − 16·g0 > 16·(ng − 1)` because group `g0 + ng − 1`
            // exists. Alignment: `packed` starts on a 64-byte boundary (precondition) and `t.w`
            // is `g0·pairs·64` bytes into it; `t.bias` is `64·g0` bytes into the `Aligned`
            // bias. The match covers every `(nr, ng)` and passes `R = nr`, `G = ng`.
            unsafe {
                macro_rules! go {
                    ($($r:literal $g:literal),*) => {
                        match (nr, ng) {
                            $(($r, $g) => tile4::<$r, $g>(&shape, &t, &eight_xsum),)*
                            _ => unreachable!(),
                        }
                    };
                }
                go!(1 1, 1 2, 2 1, 2 2, 3 1, 3 2, 4 1, 4 2, 5 1, 5 2, 6 1, 6 2, 7 1, 7 2, 8 1, 8 2);
            }
            g0 += ng;
        }
        r0 += nr;
    }
}

/// [`tile`] on [`pack4`]ed weights: each 64-byte vector holds two input steps as nibbles,
/// expanded in registers to `code + 8`; row `r`'s accumulators start at the folded bias minus
/// `eight_xsum[r]` (8·Σx of the row, see the module doc).
///
/// # Safety
/// As [`tile`], except that `t.w` points at the first pair of a group in a [`pack4`]ed buffer
/// (64-byte aligned) of `⌈(s.full + (s.tail > 0))/2⌉` vectors of 64 bytes per group,
/// `s.gstride` bytes apart, with `G` groups from there.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn tile4<const R: usize, const G: usize>(s: &Shape, t: &Tile, eight_xsum: &[i32; ROWS4]) {
    let mut c = [[_mm512_setzero_si512(); G]; R];
    for g in 0..G {
        // SAFETY: `16·g + 16 ≤ 16·G` values are readable from `t.bias`; the offset is a
        // multiple of 64 bytes from a 64-byte aligned pointer, as `_mm512_load_si512` requires.
        let b = unsafe { _mm512_load_si512(t.bias.add(g * LANES).cast()) };
        for (row, &e) in c.iter_mut().zip(eight_xsum) {
            row[g] = _mm512_sub_epi32(b, _mm512_set1_epi32(e));
        }
    }
    let low = _mm512_set1_epi8(0x0f);
    let steps = s.full + usize::from(s.tail > 0);
    // Pairs of two complete steps: no tail handling in the hot loop.
    let whole = s.full / 2;
    let mut wp = t.w;
    for p in 0..whole {
        let mut lo = [_mm512_setzero_si512(); G];
        let mut hi = [_mm512_setzero_si512(); G];
        for g in 0..G {
            // SAFETY: `wp` is pair `p < whole ≤ ⌈steps/2⌉` of the first group, so
            // `wp + g·gstride` is pair `p` of group `g < G`: 64 readable bytes on a 64-byte
            // boundary (pairs are 64 bytes, `gstride = 64·pairs`, the buffer is aligned).
            let v = unsafe { _mm512_load_si512(wp.add(g * s.gstride).cast()) };
            lo[g] = _mm512_and_si512(v, low);
            hi[g] = _mm512_and_si512(_mm512_srli_epi16::<4>(v), low);
        }
        for (r, row) in c.iter_mut().enumerate() {
            // SAFETY: bytes `8p..8p + 8` of row `r < R` are readable since `2p + 1 < full`
            // (4·full ≤ the row's readable bytes); `read_unaligned` needs no alignment.
            let (f0, f1) = unsafe {
                let xp = t.x.add(r * s.x_stride + 8 * p);
                (
                    xp.cast::<i32>().read_unaligned(),
                    xp.add(4).cast::<i32>().read_unaligned(),
                )
            };
            let (x0, x1) = (_mm512_set1_epi32(f0), _mm512_set1_epi32(f1));
            for g in 0..G {
                row[g] = _mm512_dpbusd_epi32(row[g], x0, lo[g]);
            }
            for g in 0..G {
                row[g] = _mm512_dpbusd_epi32(row[g], x1, hi[g]);
            }
        }
        // SAFETY: pair `p + 1 ≤ pairs` of the first group: inside the buffer or one past it.
        wp = unsafe { wp.add(64) };
    }
    // The remaining one or two steps (`2·whole .. steps`), the last maybe partial.
    if 2 * whole < steps {
        let mut lo = [_mm512_setzero_si512(); G];
        let mut hi = [_mm512_setzero_si512(); G];
        for g in 0..G {
            // SAFETY: `2·whole < steps`, so pair `whole < ⌈steps/2⌉` exists; as above.
            let v = unsafe { _mm512_load_si512(wp.add(g * s.gstride).cast()) };
            lo[g] = _mm512_and_si512(v, low);
            hi[g] = _mm512_and_si512(_mm512_srli_epi16::<4>(v), low);
        }
        for k in 2 * whole..steps {
            let wv = if k % 2 == 0 { &lo } else { &hi };
            for (r, row) in c.iter_mut().enumerate() {
                let four = if k < s.full {
                    // SAFETY: bytes `4k..4k + 4` of row `r` are readable since `k < s.full`.
                    unsafe { t.x.add(r * s.x_stride + 4 * k).cast::<i32>().read_unaligned() }
                } else {
                    // The partial last step: only the row's remaining bytes are read; the
                    // missing ones meet zero weights.
                    let mut four = [0u8; 4];
                    for (i, b) in four.iter_mut().enumerate().take(s.tail) {
                        // SAFETY: `4·full + i < 4·full + tail`, the row's readable length.
                        *b = unsafe { *t.x.add(r * s.x_stride + 4 * s.full + i) };
                    }
                    i32::from_le_bytes(four)
                };
                let xv = _mm512_set1_epi32(four);
                for g in 0..G {
                    row[g] = _mm512_dpbusd_epi32(row[g], xv, wv[g]);
                }
            }
        }
    }
    for (r, row) in c.iter().enumerate() {
        for (g, v) in row.iter().enumerate() {
            let n = t.valid.saturating_sub(g * LANES).min(LANES);
            // SAFETY: `16·g < t.valid` (every group has a valid channel), so `dst` is inside
            // row `r`'s writable run of `min(t.valid, 16·G)` i32; the masked store writes only
            // the first `n` lanes (the valid channels) and AVX-512 masked stores neither access
            // nor fault on masked-off lanes; `storeu` has no alignment requirement.
            unsafe {
                let dst = t.acc.add(r * s.acc_stride + g * LANES);
                _mm512_mask_storeu_epi32(dst, lane_mask(n), *v);
            }
        }
    }
}

/// The VNNI int8 dense kernel (see [`super::dense_i8`]).
///
/// # Safety
/// - The CPU must support AVX-512 F/BW/VL/VNNI (`KernelKind::Avx512Vnni.is_available()`).
/// - `packed` must be the whole slice of the [`Aligned`] buffer that [`pack`] returned for
///   `w.inputs` × `w.outputs` (what `PackedDenseI8::new` stores in `w.vnni`): `groups·steps·64`
///   bytes with `groups = ⌈outputs/16⌉`, `steps = ⌈inputs/4⌉`, starting on a 64-byte boundary.
///   The kernel reads it with aligned 64-byte loads and does not check its length in release.
/// - `x` must hold `rows` rows of `w.inputs` bytes at stride `x_stride`, and `acc` `rows` rows
///   of `w.outputs` values at stride `acc_stride` (`(rows − 1)·stride + width ≤ len`, what
///   `check_2d` asserts in [`super::dense_i8`]).
///
/// `w.bias` holds `padded(outputs) = 16·groups` values on a 64-byte boundary by construction
/// (`PackedDenseI8::new`), so it needs nothing from the caller.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
pub(super) unsafe fn dense_i8(
    w: &PackedDenseI8,
    packed: &[i8],
    x: &[u8],
    x_stride: usize,
    rows: usize,
    acc: &mut [i32],
    acc_stride: usize,
) {
    let groups = w.outputs.div_ceil(LANES);
    let steps = w.inputs.div_ceil(4);
    debug_assert_eq!(packed.len(), groups * steps * 64);
    debug_assert_eq!(packed.as_ptr() as usize % 64, 0);
    debug_assert!(w.bias.len() >= groups * LANES);
    debug_assert!(rows == 0 || x.len() >= (rows - 1) * x_stride + w.inputs);
    debug_assert!(rows == 0 || acc.len() >= (rows - 1) * acc_stride + w.outputs);
    let shape = Shape {
        gstride: steps * 64,
        x_stride,
        full: w.inputs / 4,
        tail: w.inputs % 4,
        acc_stride,
    };
    let mut r0 = 0;
    while r0 < rows {
        let nr = ROWS.min(rows - r0);
        let mut g0 = 0;
        while g0 < groups {
            let ng = GROUPS.min(groups - g0);
            // SAFETY: every offset is inside its buffer (so `add` stays in bounds):
            // - `g0 < groups`, so `g0·gstride < groups·steps·64 = packed.len()` (precondition);
            // - `16·g0 < 16·groups = w.bias.len()`;
            // - `r0 < rows` and `inputs ≥ 1`: `r0·x_stride < (rows − 1)·x_stride + inputs ≤ x.len()`;
            // - `16·g0 < outputs`: `r0·acc_stride + 16·g0 < (rows − 1)·acc_stride + outputs ≤ acc.len()`.
            let t = unsafe {
                Tile {
                    w: packed.as_ptr().add(g0 * shape.gstride),
                    x: x.as_ptr().add(r0 * x_stride),
                    bias: w.bias.as_ptr().add(g0 * LANES),
                    acc: acc.as_mut_ptr().add(r0 * acc_stride + g0 * LANES),
                    valid: w.outputs - g0 * LANES,
                }
            };
            // SAFETY: AVX-512 F/BW/VL/VNNI are a precondition of this function. `t` describes
            // `nr` rows and `ng` groups that exist, as `tile` requires: rows `r0..r0 + nr ≤
            // rows` of `x` and `acc` (sizes are a precondition), groups `g0..g0 + ng ≤ groups`
            // of `packed` and of the bias, and `t.valid = outputs − 16·g0 > 16·(ng − 1)`
            // because group `g0 + ng − 1` exists. Alignment: `packed` starts on a 64-byte
            // boundary (precondition) and `t.w` is `g0·steps·64` bytes into it; `w.bias` is an
            // `Aligned` buffer and `t.bias` is `64·g0` bytes into it. The match covers every
            // `(nr, ng)` in `1..=ROWS × 1..=GROUPS` and passes `R = nr`, `G = ng`.
            unsafe {
                macro_rules! go {
                    ($($r:literal $g:literal),*) => {
                        match (nr, ng) {
                            $(($r, $g) => tile::<$r, $g>(&shape, &t),)*
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

/// Loop bounds shared by all tiles of one call.
struct Shape {
    /// Bytes between consecutive channel groups in the packed weights.
    gstride: usize,
    x_stride: usize,
    /// Complete 4-byte input steps.
    full: usize,
    /// Inputs in the last, partial step (0..4).
    tail: usize,
    acc_stride: usize,
}

/// One tile's base pointers.
struct Tile {
    w: *const i8,
    x: *const u8,
    bias: *const i32,
    acc: *mut i32,
    /// Valid channels from the tile's first channel on (may exceed the tile's width).
    valid: usize,
}

/// Computes an `R`-row × `G`-group tile; accumulators start at the folded bias.
///
/// # Safety
/// AVX-512 F/BW/VL/VNNI must be available, and `t` must describe `R` rows and `G` channel
/// groups that exist:
/// - `t.w` points at the first step of a group in a [`pack`]ed buffer (64-byte aligned) of
///   `s.full + (s.tail > 0)` steps of 64 bytes per group, `s.gstride` bytes apart, with `G`
///   groups from there;
/// - `t.bias` points at a 64-byte aligned run of at least `16·G` i32;
/// - `t.x + r·s.x_stride` has `4·s.full + s.tail` readable bytes for every `r < R`;
/// - `t.valid > 16·(G − 1)` (every group has a valid channel) and `t.acc + r·s.acc_stride` has
///   `min(t.valid, 16·G)` writable i32 for every `r < R`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn tile<const R: usize, const G: usize>(s: &Shape, t: &Tile) {
    let mut c = [[_mm512_setzero_si512(); G]; R];
    for g in 0..G {
        // SAFETY: `16·g + 16 ≤ 16·G` values are readable from `t.bias`; the offset is a
        // multiple of 64 bytes from a 64-byte aligned pointer, as `_mm512_load_si512` requires.
        let b = unsafe { _mm512_load_si512(t.bias.add(g * LANES).cast()) };
        for row in c.iter_mut() {
            row[g] = b;
        }
    }
    let mut wp = t.w;
    for k in 0..s.full {
        let mut wv = [_mm512_setzero_si512(); G];
        for (g, v) in wv.iter_mut().enumerate() {
            // SAFETY: `wp` is step `k < steps` of the first group, so `wp + g·gstride` is step
            // `k` of group `g < G`: 64 readable bytes on a 64-byte boundary (steps are 64 bytes
            // and the buffer is 64-byte aligned).
            *v = unsafe { _mm512_load_si512(wp.add(g * s.gstride).cast()) };
        }
        for (r, row) in c.iter_mut().enumerate() {
            // SAFETY: bytes `4k..4k + 4` of row `r` are readable since `k < s.full` (4·full ≤
            // the row's readable bytes); `read_unaligned` has no alignment requirement.
            let four = unsafe { t.x.add(r * s.x_stride + 4 * k).cast::<i32>().read_unaligned() };
            let xv = _mm512_set1_epi32(four);
            for g in 0..G {
                row[g] = _mm512_dpbusd_epi32(row[g], xv, wv[g]);
            }
        }
        // SAFETY: step `k + 1 ≤ steps` of the first group: inside the buffer or one past it.
        wp = unsafe { wp.add(64) };
    }
    if s.tail > 0 {
        let mut wv = [_mm512_setzero_si512(); G];
        for (g, v) in wv.iter_mut().enumerate() {
            // SAFETY: as above; with a tail there are `full + 1` steps and `wp` is the last one.
            *v = unsafe { _mm512_load_si512(wp.add(g * s.gstride).cast()) };
        }
        for (r, row) in c.iter_mut().enumerate() {
            // Only the row's remaining bytes are read; the missing ones meet zero weights.
            let mut four = [0u8; 4];
            for (i, b) in four.iter_mut().enumerate().take(s.tail) {
                // SAFETY: `4·full + i < 4·full + tail`, the row's readable length.
                *b = unsafe { *t.x.add(r * s.x_stride + 4 * s.full + i) };
            }
            let xv = _mm512_set1_epi32(i32::from_le_bytes(four));
            for g in 0..G {
                row[g] = _mm512_dpbusd_epi32(row[g], xv, wv[g]);
            }
        }
    }
    for (r, row) in c.iter().enumerate() {
        for (g, v) in row.iter().enumerate() {
            let n = t.valid.saturating_sub(g * LANES).min(LANES);
            // SAFETY: `16·g < t.valid` (every group has a valid channel), so `dst` is inside
            // row `r`'s writable run of `min(t.valid, 16·G)` i32; the masked store writes only
            // the first `n` lanes (the valid channels) and AVX-512 masked stores neither access
            // nor fault on masked-off lanes; `storeu` has no alignment requirement.
            unsafe {
                let dst = t.acc.add(r * s.acc_stride + g * LANES);
                _mm512_mask_storeu_epi32(dst, lane_mask(n), *v);
            }
        }
    }
}

/// The mask selecting the first `n` (≤ 16) lanes.
#[inline]
fn lane_mask(n: usize) -> __mmask16 {
    if n >= 16 {
        0xffff
    } else {
        (1u16 << n) - 1
    }
}

/// Vectorised [`super::scalar::requant_u8`].
///
/// Per lane it computes the spec's `q = (acc·m + 2^(30+r)) >> (31+r)` in i64, which cannot
/// overflow (`|acc·m| ≤ 2^62`, the rounding term `≤ 2^61`). `vpmuldq` multiplies the even i32
/// lanes into i64; the odd lanes are shifted down and multiplied by `p.m_odd`, where the odd
/// channels' multipliers sit in even lanes. The rounding terms and shifts are stored per group
/// of 16 channels as 8 even then 8 odd i64 (`Requant::new`).
///
/// The clamp `clamp(q + z_out, lo, hi)` is done with saturating narrowing, 64 channels at a
/// time: `q` saturated to i32 (`vpmovsqd`), interleaved back to channel order, packed to i16
/// with saturation, `+ z_out` with saturation, packed to u8 with saturation, then `max lo`,
/// `min hi` on the bytes. Each saturation only moves values that end up clamped anyway (a
/// saturated value stays beyond every bound on its side), so the result is the spec's. Against
/// a 64-bit clamp per lane and a masked `vpmovdb` store per 16 channels (the first version),
/// `bench_kernels` measured 0.18 vs 0.22 ns per value on 32×64 tiles (equal on 32×32) and
/// cnn-small 4–7 % faster on a Xeon with AVX-512 VNNI.
///
/// # Safety
/// - The CPU must support AVX-512 F/BW/VL (part of `KernelKind::Avx512Vnni.is_available()`).
/// - `acc` must hold `rows` rows of `p.outputs` values at stride `acc_stride` and `out` `rows`
///   rows of `p.outputs` bytes at stride `out_stride`, as `check_2d` asserts in
///   [`super::requant_u8`].
///
/// `p.m`, `p.m_odd`, `p.round` and `p.shift` hold `padded(outputs)` values on a 64-byte
/// boundary by construction (`Requant::new`).
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(super) unsafe fn requant_u8(
    p: &Requant,
    acc: &[i32],
    acc_stride: usize,
    rows: usize,
    out: &mut [u8],
    out_stride: usize,
) {
    let n = p.outputs;
    let pn = n.next_multiple_of(LANES);
    debug_assert!(p.m.len() >= pn && p.m_odd.len() >= pn && p.round.len() >= pn && p.shift.len() >= pn);
    debug_assert!(rows == 0 || acc.len() >= (rows - 1) * acc_stride + n);
    debug_assert!(rows == 0 || out.len() >= (rows - 1) * out_stride + n);
    let z = _mm512_set1_epi16(i16::from(p.z_out));
    let lo = _mm512_set1_epi8(p.lo as i8);
    let hi = _mm512_set1_epi8(p.hi as i8);
    // Even lane i and odd lane i back to channels 2i and 2i + 1.
    let interleave = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    // Where `packus(packs(y0, y1), packs(y2, y3))` leaves 4-byte groups: 128-bit lane L holds
    // channels 4L.. of y0, y1, y2, y3 in turn; this gathers y0's groups first, then y1's, ….
    let order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    // The 16 channels at `j` of row `a`: `q` saturated to i32, in channel order.
    let chunk = |a: *const i32, j: usize| {
        let mask = lane_mask(n - j);
        // SAFETY: the masked load reads only lanes `j..min(j + 16, n)` of the row, which exist
        // (the caller passes `j < n` and a row pointer with `n` readable values); masked-off
        // lanes are neither accessed nor faulted on; `loadu` needs no alignment. `j` is a
        // multiple of 16 below `n`, so `j + 16 ≤ padded(n)`, the length of `p.m`, `p.m_odd`,
        // `p.round` and `p.shift`; their loads at `4·j` (i32) or `8·j` and `8·j + 64` (i64)
        // bytes from 64-byte aligned bases are 64-byte aligned, as `_mm512_load_si512` requires.
        let (v, m, mo, re, ro, se, so) = unsafe {
            (
                _mm512_maskz_loadu_epi32(mask, a.add(j)),
                _mm512_load_si512(p.m.as_ptr().add(j).cast()),
                _mm512_load_si512(p.m_odd.as_ptr().add(j).cast()),
                _mm512_load_si512(p.round.as_ptr().add(j).cast()),
                _mm512_load_si512(p.round.as_ptr().add(j + 8).cast()),
                _mm512_load_si512(p.shift.as_ptr().add(j).cast()),
                _mm512_load_si512(p.shift.as_ptr().add(j + 8).cast()),
            )
        };
        let pe = _mm512_mul_epi32(v, m);
        let po = _mm512_mul_epi32(_mm512_srli_epi64(v, 32), mo);
        let qe = _mm512_cvtsepi64_epi32(_mm512_srav_epi64(_mm512_add_epi64(pe, re), se));
        let qo = _mm512_cvtsepi64_epi32(_mm512_srav_epi64(_mm512_add_epi64(po, ro), so));
        _mm512_permutex2var_epi32(_mm512_castsi256_si512(qe), interleave, _mm512_castsi256_si512(qo))
    };
    for b in 0..rows {
        // SAFETY: `b < rows`, so `b·stride ≤ (rows − 1)·stride ≤ len − outputs`: in bounds (or
        // one past the end when `outputs = 0`, which `add` allows).
        let (a, o) = unsafe { (acc.as_ptr().add(b * acc_stride), out.as_mut_ptr().add(b * out_stride)) };
        for j in (0..n).step_by(4 * LANES) {
            let zero = _mm512_setzero_si512();
            let y0 = chunk(a, j);
            let y1 = if j + LANES < n { chunk(a, j + LANES) } else { zero };
            let y2 = if j + 2 * LANES < n {
                chunk(a, j + 2 * LANES)
            } else {
                zero
            };
            let y3 = if j + 3 * LANES < n {
                chunk(a, j + 3 * LANES)
            } else {
                zero
            };
            let w01 = _mm512_adds_epi16(_mm512_packs_epi32(y0, y1), z);
            let w23 = _mm512_adds_epi16(_mm512_packs_epi32(y2, y3), z);
            let bytes = _mm512_permutexvar_epi32(order, _mm512_packus_epi16(w01, w23));
            let bytes = _mm512_min_epu8(_mm512_max_epu8(bytes, lo), hi);
            let count = (n - j).min(64);
            let mask: __mmask64 = if count == 64 { !0 } else { (1u64 << count) - 1 };
            // SAFETY: the masked store writes only bytes `j..j + count = min(j + 64, n)` of
            // output row `b`, which exist; masked-off bytes are neither accessed nor faulted on.
            unsafe { _mm512_mask_storeu_epi8(o.add(j).cast(), mask, bytes) };
        }
    }
}

/// Vectorised [`super::scalar::sign_bits`]: one compare-to-mask per 16 channels.
///
/// # Safety
/// - The CPU must support AVX-512 F/BW/VL (part of `KernelKind::Avx512Vnni.is_available()`).
/// - `acc` must hold `rows` rows of `p.outputs` values at stride `acc_stride`, and `out` at
///   least `rows·out_words` words, as `check_2d` asserts in [`super::sign_bits`];
///   `out_words ≤ ⌈outputs/64⌉` would do, and that function asserts equality.
///
/// `p.threshold` holds `padded(outputs)` values on a 64-byte boundary by construction
/// (`SignBits::new`).
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(super) unsafe fn sign_bits(
    p: &SignBits,
    acc: &[i32],
    acc_stride: usize,
    rows: usize,
    out: &mut [u64],
    out_words: usize,
) {
    let n = p.outputs;
    debug_assert!(p.threshold.len() >= n.next_multiple_of(LANES));
    debug_assert!(rows == 0 || acc.len() >= (rows - 1) * acc_stride + n);
    debug_assert!(out.len() >= rows * out_words);
    for b in 0..rows {
        // SAFETY: `b < rows`, so `b·acc_stride ≤ len − outputs`: in bounds (or one past the end).
        let a = unsafe { acc.as_ptr().add(b * acc_stride) };
        for w in 0..out_words {
            let mut word = 0u64;
            for q in 0..4 {
                let j = w * 64 + q * LANES;
                if j >= n {
                    break;
                }
                let mask = lane_mask(n - j);
                // SAFETY: the masked load reads only lanes `j..min(j + 16, n)` of row `b`,
                // which exist; masked-off lanes are neither accessed nor faulted on. `j` is a
                // multiple of 16 below `n`, so `j + 16 ≤ padded(n) = p.threshold.len()` and the
                // threshold load is 64-byte aligned, as `_mm512_load_si512` requires.
                let (v, t) = unsafe {
                    (
                        _mm512_maskz_loadu_epi32(mask, a.add(j)),
                        _mm512_load_si512(p.threshold.as_ptr().add(j).cast()),
                    )
                };
                let bits = _mm512_mask_cmpge_epi32_mask(mask, v, t);
                word |= u64::from(bits) << (q * LANES);
            }
            // SAFETY: `b < rows` and `w < out_words`, so `b·out_words + w < rows·out_words ≤
            // out.len()` (precondition).
            unsafe { *out.get_unchecked_mut(b * out_words + w) = word };
        }
    }
}

/// Vectorised [`super::scalar::dequantize`]; multiply and add stay separate (no FMA) so the
/// rounding matches the scalar tier.
///
/// # Safety
/// - The CPU must support AVX-512 F/BW/VL (part of `KernelKind::Avx512Vnni.is_available()`).
/// - `acc` must hold `rows` rows of `p.outputs` values at stride `acc_stride` and `out` `rows`
///   rows of `p.outputs` values at stride `out_stride`, as `check_2d` asserts in
///   [`super::dequantize`].
///
/// `p.scale` and `p.bias` hold `padded(outputs)` values on a 64-byte boundary by construction
/// (`Dequant::new`).
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(super) unsafe fn dequantize(
    p: &Dequant,
    acc: &[i32],
    acc_stride: usize,
    rows: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    let n = p.outputs;
    debug_assert!(p.scale.len() >= n.next_multiple_of(LANES));
    debug_assert!(p.bias.as_ref().is_none_or(|b| b.len() >= n.next_multiple_of(LANES)));
    debug_assert!(rows == 0 || acc.len() >= (rows - 1) * acc_stride + n);
    debug_assert!(rows == 0 || out.len() >= (rows - 1) * out_stride + n);
    for b in 0..rows {
        // SAFETY: `b < rows`, so `b·stride ≤ (rows − 1)·stride ≤ len − outputs`: in bounds (or
        // one past the end when `outputs = 0`).
        let (a, o) = unsafe { (acc.as_ptr().add(b * acc_stride), out.as_mut_ptr().add(b * out_stride)) };
        for j in (0..n).step_by(LANES) {
            let mask = lane_mask(n - j);
            // SAFETY: the masked load reads only lanes `j..min(j + 16, n)` of row `b`, which
            // exist; masked-off lanes are neither accessed nor faulted on. `j` is a multiple of
            // 16 below `n`, so `j + 16 ≤ padded(n)`, the length of `p.scale` and `p.bias`, and
            // their loads at `4·j` bytes from a 64-byte aligned base are 64-byte aligned, as
            // `_mm512_load_ps` requires.
            let v = _mm512_cvtepi32_ps(unsafe { _mm512_maskz_loadu_epi32(mask, a.add(j)) });
            // SAFETY: see above.
            let mut y = _mm512_mul_ps(v, unsafe { _mm512_load_ps(p.scale.as_ptr().add(j)) });
            if let Some(bias) = &p.bias {
                // SAFETY: see above.
                y = _mm512_add_ps(y, unsafe { _mm512_load_ps(bias.as_ptr().add(j)) });
            }
            // SAFETY: the masked store writes only lanes `j..min(j + 16, n)` of output row `b`,
            // which exist; masked-off lanes are neither accessed nor faulted on.
            unsafe { _mm512_mask_storeu_ps(o.add(j), mask, y) };
        }
    }
}
