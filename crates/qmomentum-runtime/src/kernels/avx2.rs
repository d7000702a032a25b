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
/// The CPU must support AVX2; `packed` must come from [`pack`] for `w`'s shape; `x` must hold
/// `rows` rows of `w.inputs` bytes at stride `x_stride` and `acc` `rows` rows of `w.outputs`
/// values at stride `acc_stride`.
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
            let t = Tile {
                w: packed.as_ptr().add(g0 * s.gstride),
                x: x.as_ptr().add(r0 * x_stride),
                bias: w.bias.as_ptr().add(g0 * GROUP),
                acc: acc.as_mut_ptr().add(r0 * acc_stride + g0 * GROUP),
                valid: w.outputs - g0 * GROUP,
            };
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
            g0 += ng;
        }
        r0 += nr;
    }
}

struct Shape {
    gstride: usize,
    x_stride: usize,
    full: usize,
    tail: usize,
    acc_stride: usize,
}

struct Tile {
    w: *const i16,
    x: *const u8,
    bias: *const i32,
    acc: *mut i32,
    valid: usize,
}

/// Adds one step's products for all `R × G` accumulators.
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
        we[g] = _mm256_load_si256(wp.add(g * gstride).cast());
        wo[g] = _mm256_load_si256(wp.add(g * gstride + 16).cast());
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
#[target_feature(enable = "avx2")]
unsafe fn tile<const R: usize, const G: usize>(s: &Shape, t: &Tile) {
    let mut c = [[_mm256_setzero_si256(); G]; R];
    for g in 0..G {
        let b = _mm256_load_si256(t.bias.add(g * GROUP).cast());
        for row in c.iter_mut() {
            row[g] = b;
        }
    }
    let mut wp = t.w;
    for k in 0..s.full {
        let mut four = [0i32; R];
        for (r, f) in four.iter_mut().enumerate() {
            *f = t.x.add(r * s.x_stride + 4 * k).cast::<i32>().read_unaligned();
        }
        step(&mut c, four, wp, s.gstride);
        wp = wp.add(32);
    }
    if s.tail > 0 {
        let mut four = [0i32; R];
        for (r, f) in four.iter_mut().enumerate() {
            // Only the row's remaining bytes are read; the missing ones meet zero weights.
            let mut bytes = [0u8; 4];
            for (i, b) in bytes.iter_mut().enumerate().take(s.tail) {
                *b = *t.x.add(r * s.x_stride + 4 * s.full + i);
            }
            *f = i32::from_le_bytes(bytes);
        }
        step(&mut c, four, wp, s.gstride);
    }
    for (r, row) in c.iter().enumerate() {
        for (g, v) in row.iter().enumerate() {
            let dst = t.acc.add(r * s.acc_stride + g * GROUP);
            let n = t.valid.saturating_sub(g * GROUP).min(GROUP);
            if n == GROUP {
                _mm256_storeu_si256(dst.cast(), *v);
            } else {
                let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
                let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), lane);
                _mm256_maskstore_epi32(dst, mask, *v);
            }
        }
    }
}
