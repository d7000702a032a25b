//! AVX2 tier of the int8 dense kernel.
//!
//! AVX2 has no exact u8×i8 dot instruction: `vpmaddubsw` adds two u8×i8 products into a
//! *saturating* i16 (255·127·2 > 32767), which would silently clip. Instead the weights are
//! pre-widened to i16 at pack time and the input bytes are split into zero-extended i16 halves,
//! then `vpmaddwd` (i16×i16 → i32, pairwise sum, never overflows for these ranges) does the work.
//!
//! # Packed weight layout
//! Channels in groups of 8 (one ymm of i32), inputs in steps of 4. For group `g`, step `s`,
//! 32 consecutive i16 hold the "even" vector (lane pair `c`: `W[8g+c][4s]`, `W[8g+c][4s+2]`)
//! then the "odd" vector (`W[8g+c][4s+1]`, `W[8g+c][4s+3]`). The 4 input bytes of the step
//! are broadcast as one i32; masking each i16 lane with 0xff gives `(x0, x2)`, shifting it
//! right by 8 gives `(x1, x3)`, and two `vpmaddwd` against the even/odd weights sum all 4
//! products per channel.

use std::arch::x86_64::*;

use super::PackedDenseI8;
use crate::aligned::Aligned;

const GROUP: usize = 8;
const ROWS: usize = 4;
const GROUPS: usize = 2;

/// Packs `[out, in]` row-major weights into the layout described in the module doc.
pub(super) fn pack(inputs: usize, outputs: usize, weight: &[i8]) -> Aligned<i16> {
    let groups = outputs.div_ceil(GROUP);
    let steps = inputs.div_ceil(4);
    let mut p = Aligned::zeroed(groups * steps * 32);
    for j in 0..outputs {
        let (g, c) = (j / GROUP, j % GROUP);
        for k in 0..inputs {
            let (s, t) = (k / 4, k % 4);
            // t = 0, 2 → even vector, slots 0, 1; t = 1, 3 → odd vector, slots 0, 1.
            let idx = (g * steps + s) * 32 + (t % 2) * 16 + 2 * c + t / 2;
            p[idx] = i16::from(weight[j * inputs + k]);
        }
    }
    p
}

/// The AVX2 int8 dense kernel (see [`super::dense_i8`]).
///
/// # Safety
/// - The CPU must support AVX2 (`KernelKind::Avx2.is_available()`).
/// - `packed` must be the whole slice of the [`Aligned`] buffer that [`pack`] returned for
///   `w.inputs` × `w.outputs` (what `PackedDenseI8::new` stores in `w.avx2`): `groups·steps·32`
///   i16 with `groups = ⌈outputs/8⌉`, `steps = ⌈inputs/4⌉`, starting on a 64-byte boundary.
///   The kernel reads it with aligned 32-byte loads and does not check its length in release.
/// - `x` must hold `rows` rows of `w.inputs` bytes at stride `x_stride`, and `acc` `rows` rows
///   of `w.outputs` values at stride `acc_stride` (`(rows − 1)·stride + width ≤ len`, what
///   `check_2d` asserts in [`super::dense_i8`]).
///
/// `w.bias` holds `padded(outputs) ≥ 8·groups` values on a 64-byte boundary by construction
/// (`PackedDenseI8::new`), so it needs nothing from the caller.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn dense_i8(
    w: &PackedDenseI8,
    packed: &[i16],
    x: &[u8],
    x_stride: usize,
    rows: usize,
    acc: &mut [i32],
    acc_stride: usize,
) {
    let groups = w.outputs.div_ceil(GROUP);
    let steps = w.inputs.div_ceil(4);
    debug_assert_eq!(packed.len(), groups * steps * 32);
    debug_assert_eq!(packed.as_ptr() as usize % 32, 0);
    debug_assert!(w.bias.len() >= groups * GROUP);
    debug_assert!(rows == 0 || x.len() >= (rows - 1) * x_stride + w.inputs);
    debug_assert!(rows == 0 || acc.len() >= (rows - 1) * acc_stride + w.outputs);
    let s = Shape {
        gstride: steps * 32,
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
            // - `g0 < groups`, so `g0·gstride < groups·steps·32 = packed.len()` (precondition);
            // - `g0·8 < 8·groups ≤ w.bias.len()` (the bias is padded to 16 channels);
            // - `r0 < rows` and `inputs ≥ 1`: `r0·x_stride < (rows − 1)·x_stride + inputs ≤ x.len()`;
            // - `g0·8 < outputs`: `r0·acc_stride + 8·g0 < (rows − 1)·acc_stride + outputs ≤ acc.len()`.
            let t = unsafe {
                Tile {
                    w: packed.as_ptr().add(g0 * s.gstride),
                    x: x.as_ptr().add(r0 * x_stride),
                    bias: w.bias.as_ptr().add(g0 * GROUP),
                    acc: acc.as_mut_ptr().add(r0 * acc_stride + g0 * GROUP),
                    valid: w.outputs - g0 * GROUP,
                }
            };
            // SAFETY: AVX2 is a precondition of this function. `t` describes `nr` rows and
            // `ng` groups that exist, as `tile` requires: rows `r0..r0 + nr ≤ rows` of `x` and
            // `acc` (sizes are a precondition), groups `g0..g0 + ng ≤ groups` of `packed` and
            // of the bias, and `t.valid = outputs − 8·g0 > 8·(ng − 1)` because group `g0 + ng − 1`
            // exists. Alignment: `packed` starts on a 64-byte boundary (precondition) and
            // `t.w` is `g0·steps·64` bytes into it; `w.bias` is an `Aligned` buffer (64 bytes)
            // and `t.bias` is `32·g0` bytes into it. Each arm passes `R = nr` and `G = ng`
            // (`nr ≤ ROWS = 4`, `ng ≤ GROUPS = 2`).
            unsafe {
                match (nr, ng) {
                    (1, 1) => tile::<1, 1>(&s, &t),
                    (1, _) => tile::<1, 2>(&s, &t),
                    (2, 1) => tile::<2, 1>(&s, &t),
                    (2, _) => tile::<2, 2>(&s, &t),
                    (3, 1) => tile::<3, 1>(&s, &t),
                    (3, _) => tile::<3, 2>(&s, &t),
                    (_, 1) => tile::<4, 1>(&s, &t),
                    (_, _) => tile::<4, 2>(&s, &t),
                }
            }
            g0 += ng;
        }
        r0 += nr;
    }
}

/// Loop bounds shared by all tiles of one call.
struct Shape {
    /// i16 between consecutive channel groups in the packed weights (`steps·32`).
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
    w: *const i16,
    x: *const u8,
    bias: *const i32,
    acc: *mut i32,
    /// Valid channels from the tile's first channel on (may exceed the tile's width).
    valid: usize,
}

/// Adds one step's products for all `R × G` accumulators.
///
/// # Safety
/// AVX2 must be available, and `wp + g·gstride + i` must be readable for `g < G`, `i < 32`,
/// with `wp + g·gstride` on a 32-byte boundary: `wp` points at one step of a group in a
/// [`pack`]ed buffer (steps are 32 i16 = 64 bytes, groups `gstride = steps·32` i16 apart, the
/// buffer 64-byte aligned) and `G` groups exist from there.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn step<const R: usize, const G: usize>(
    c: &mut [[__m256i; G]; R],
    four: [i32; R],
    wp: *const i16,
    gstride: usize,
) {
    let low = _mm256_set1_epi16(0xff);
    let mut we = [_mm256_setzero_si256(); G];
    let mut wo = [_mm256_setzero_si256(); G];
    for g in 0..G {
        // SAFETY: the even (i16 0..16) and odd (16..32) halves of group `g`'s step are
        // readable and 32-byte aligned (precondition), as `_mm256_load_si256` requires.
        unsafe {
            we[g] = _mm256_load_si256(wp.add(g * gstride).cast());
            wo[g] = _mm256_load_si256(wp.add(g * gstride + 16).cast());
        }
    }
    for (row, &f) in c.iter_mut().zip(four.iter()) {
        let xb = _mm256_set1_epi32(f);
        let xe = _mm256_and_si256(xb, low);
        let xo = _mm256_srli_epi16(xb, 8);
        for g in 0..G {
            let p = _mm256_add_epi32(_mm256_madd_epi16(xe, we[g]), _mm256_madd_epi16(xo, wo[g]));
            row[g] = _mm256_add_epi32(row[g], p);
        }
    }
}

/// Computes an `R`-row × `G`-group tile; accumulators start at the folded bias.
///
/// # Safety
/// AVX2 must be available, and `t` must describe `R` rows and `G` channel groups that exist:
/// - `t.w` points at the first step of a group in a [`pack`]ed buffer (64-byte aligned) of
///   `s.full + (s.tail > 0)` steps per group, `s.gstride` i16 apart, with `G` groups from there;
/// - `t.bias` points at a 32-byte aligned run of at least `8·G` i32;
/// - `t.x + r·s.x_stride` has `4·s.full + s.tail` readable bytes for every `r < R`;
/// - `t.valid > 8·(G − 1)` (every group has a valid channel) and `t.acc + r·s.acc_stride` has
///   `min(t.valid, 8·G)` writable i32 for every `r < R`.
#[target_feature(enable = "avx2")]
unsafe fn tile<const R: usize, const G: usize>(s: &Shape, t: &Tile) {
    let mut c = [[_mm256_setzero_si256(); G]; R];
    for g in 0..G {
        // SAFETY: `8·g + 8 ≤ 8·G` values are readable from `t.bias`; the offset is a multiple
        // of 8 i32 = 32 bytes from a 32-byte aligned pointer, as `_mm256_load_si256` requires.
        let b = unsafe { _mm256_load_si256(t.bias.add(g * GROUP).cast()) };
        for row in c.iter_mut() {
            row[g] = b;
        }
    }
    let mut wp = t.w;
    for k in 0..s.full {
        let mut four = [0i32; R];
        for (r, f) in four.iter_mut().enumerate() {
            // SAFETY: bytes `4k..4k + 4` of row `r` are readable since `k < s.full` (4·full ≤
            // the row's readable bytes); `read_unaligned` has no alignment requirement.
            *f = unsafe { t.x.add(r * s.x_stride + 4 * k).cast::<i32>().read_unaligned() };
        }
        // SAFETY: AVX2 is available (precondition); `wp` is step `k` of the tile's first group,
        // `k < steps`, so step `k` of each of the `G` groups is readable and 64-byte aligned.
        unsafe { step(&mut c, four, wp, s.gstride) };
        // SAFETY: step `k + 1 ≤ steps` of the first group: inside the buffer or one past it.
        wp = unsafe { wp.add(32) };
    }
    if s.tail > 0 {
        let mut four = [0i32; R];
        for (r, f) in four.iter_mut().enumerate() {
            // Only the row's remaining bytes are read; the missing ones meet zero weights.
            let mut bytes = [0u8; 4];
            for (i, b) in bytes.iter_mut().enumerate().take(s.tail) {
                // SAFETY: `4·full + i < 4·full + tail`, the row's readable length.
                *b = unsafe { *t.x.add(r * s.x_stride + 4 * s.full + i) };
            }
            *f = i32::from_le_bytes(bytes);
        }
        // SAFETY: as above; with a tail there are `full + 1` steps and `wp` is the last one.
        unsafe { step(&mut c, four, wp, s.gstride) };
    }
    for (r, row) in c.iter().enumerate() {
        for (g, v) in row.iter().enumerate() {
            let n = t.valid.saturating_sub(g * GROUP).min(GROUP);
            // SAFETY: `g·8 < t.valid` (every group has a valid channel), so `dst` is inside
            // row `r`'s writable run of `min(t.valid, 8·G)` i32.
            let dst = unsafe { t.acc.add(r * s.acc_stride + g * GROUP) };
            if n == GROUP {
                // SAFETY: channels `8g..8g + 8` are all valid, so all 8 i32 at `dst` are
                // writable; `storeu` has no alignment requirement.
                unsafe { _mm256_storeu_si256(dst.cast(), *v) };
            } else {
                let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
                let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), lane);
                // SAFETY: only the first `n` lanes (the valid channels) are selected, and
                // `vpmaskmovd` does not access, nor fault on, the masked-off ones.
                unsafe { _mm256_maskstore_epi32(dst, mask, *v) };
            }
        }
    }
}
