//! AVX-512F kernels for [`super::ImplicitGemm`]'s products: a sum over taps (kernel rows) of
//! strided products, each tap's K summed in registers.
//!
//! # Why by hand
//! On the padded grid each pass is a sum of `kh` products (one per kernel row) whose K is
//! small: cnn-small's conv2 has K = 96 in the forward pass and the weight gradient, and 192 in
//! the input gradient. On the `gemm` crate each tap is a separate product. It packs its operands
//! and reads and writes the whole output once per tap. Measured in one training profile
//! (`doc/performance.md`, thirteenth session), the three passes ran at about 45 % of the
//! core's FMA peak. No crate we know computes a sum of products over one output tile. BLAS
//! implementations and `gemm` take one product per call.
//!
//! Here a register tile of the output takes all of a tap's K before it is stored, and the taps
//! add into the same output while it is still in cache:
//! - **rows** ([`tap_rows`], forward and input gradient): `R` rows × `NV` vectors of 16
//!   columns (6 × 64, 8 × 48, 12 × 32, 24 × 16: 24 accumulators). Per k, `NV` loads of the
//!   right operand and `R` broadcasts of the strided left one feed `R·NV` FMAs. Blocks of
//!   [`ROWS_BLOCK`] rows take the taps in turn (the tile reloaded from what the tap before
//!   stored: exact, so the same sum as in registers throughout).
//! - **weight gradient** ([`tap_weight_grad`]): `KT` values of k × `NV` vectors of the
//!   output, summed over the rows in blocks of [`GRAD_ROWS`]. A block's operands stay in L1
//!   while every tile of the weight gradient passes over it.
//!
//! Every sum runs in a fixed order: tap by tap, k by k, row by row, so the kernels' bits depend
//! only on the shapes, not on timing or threads. They equal the `gemm` crate's results to
//! rounding, not bit for bit: a CPU without AVX-512F (which takes the `gemm` crate) trains other
//! bits from the same seed than one with it.
//!
//! Checked against the scalar definition (f64) on odd shapes by this file's tests, and
//! through [`super::ImplicitGemm`] against the convolution's definition.

use std::arch::x86_64::{
    _mm512_add_ps, _mm512_fmadd_ps, _mm512_loadu_ps, _mm512_set1_ps, _mm512_setzero_ps, _mm512_storeu_ps,
};

/// Rows of the weight gradient's sum taken per pass over the output tiles. At 64 output
/// columns a block's gradient is 16 KB and the input it meets about 12 KB, both in L1.
const GRAD_ROWS: usize = 64;

/// Rows of [`tap_rows`] computed tap after tap before the next block (a multiple of every row
/// tile: 6, 8, 12, 24). A tap's right operand (cnn-small: 96 × 64 or 192 × 32 values, 24 KB)
/// stays in L1 while it meets the block's rows, and the block's output (60 KB at 64 columns)
/// stays in L2 while the taps add into it.
const ROWS_BLOCK: usize = 240;

/// Whether these kernels run here: on x86-64 with AVX-512F, for outputs of a multiple of 16
/// columns.
pub(super) fn usable(n: usize) -> bool {
    n > 0 && n.is_multiple_of(16) && std::arch::is_x86_feature_detected!("avx512f")
}

/// One past the largest index of `a` that the taps read:
/// `max(offsets) + max(rowmap)·sa + kk` (0 without rows), or `None` if that overflows.
fn a_extent(offsets: &[usize], rowmap: &[u32], sa: usize, kk: usize) -> Option<usize> {
    match (offsets.iter().max(), rowmap.iter().max()) {
        (Some(&o), Some(&r)) => (r as usize).checked_mul(sa)?.checked_add(o)?.checked_add(kk),
        _ => Some(0),
    }
}

/// Panics unless the kernels can run on these operands: AVX-512F, `n` a multiple of 16, at
/// least one tap and one k, and every index below the slices' lengths (`b_len`: the values of
/// the operand indexed by tap, `taps·kk·n`; `c_len`, if given: the values indexed by row,
/// `rows·n`), with no overflow in the bounds.
#[allow(clippy::too_many_arguments)]
fn check(
    name: &str,
    a: &[f32],
    offsets: &[usize],
    sa: usize,
    kk: usize,
    rowmap: &[u32],
    n: usize,
    b_len: usize,
    c_len: Option<usize>,
) {
    assert!(usable(n), "{name}: AVX-512F and n = {n} a multiple of 16");
    assert!(kk > 0 && !offsets.is_empty(), "{name}: at least one tap and one k");
    let need = |v: Option<usize>, what: &str| v.unwrap_or_else(|| panic!("{name}: {what} overflows usize"));
    assert!(
        a.len() >= need(a_extent(offsets, rowmap, sa, kk), "a's extent"),
        "{name}: a too short"
    );
    let taps = need(
        offsets.len().checked_mul(kk).and_then(|v| v.checked_mul(n)),
        "taps·kk·n",
    );
    assert!(b_len >= taps, "{name}: b too short");
    if let Some(c_len) = c_len {
        assert!(
            c_len >= need(rowmap.len().checked_mul(n), "rows·n"),
            "{name}: c too short"
        );
    }
}

/// `c[r·n + j] = Σ_t Σ_{k<kk} a[offsets[t] + rowmap[r]·sa + k] · b[(t·kk + k)·n + j]` for every
/// row `r < rowmap.len()` and `j < n` (c overwritten): output row `r` reads its left operand at
/// row `rowmap[r]` of `a` (rows `sa` apart).
///
/// Panics unless [`usable`]`(n)`, `kk > 0`, `offsets` is not empty and the slices hold every
/// index the sum reads and writes.
#[allow(clippy::too_many_arguments)]
pub(super) fn tap_rows(
    a: &[f32],
    offsets: &[usize],
    sa: usize,
    kk: usize,
    rowmap: &[u32],
    b: &[f32],
    n: usize,
    c: &mut [f32],
) {
    check("tap_rows", a, offsets, sa, kk, rowmap, n, b.len(), Some(c.len()));
    let ops = Operands {
        a: a.as_ptr(),
        sa,
        kk,
        rowmap,
        b: b.as_ptr(),
        n,
    };
    // SAFETY: AVX-512F is present, `kk > 0` and `offsets` is not empty (asserted by `check`).
    // Every read is at `offsets[t] + rowmap[r]·sa + k < a_extent ≤ a.len()` and
    // `(t·kk + k)·n + j < b.len()`, and every write at `r·n + j < rowmap.len()·n ≤ c.len()`,
    // with `r < rowmap.len()`, `k < kk`, `j < n` (asserted by `check`, without overflow).
    unsafe { tap_rows_avx512(ops, offsets, c.as_mut_ptr()) }
}

/// `gw[(t·kk + k)·n + j] = Σ_r a[offsets[t] + rowmap[r]·sa + k] · d[rowmap[r]·n + j]` over the
/// rows `r < rowmap.len()`, for every tap `t`, `k < kk`, `j < n` (gw overwritten).
///
/// Panics unless [`usable`]`(n)`, `kk > 0`, `offsets` is not empty and the slices hold every
/// index the sum reads and writes.
#[allow(clippy::too_many_arguments)]
pub(super) fn tap_weight_grad(
    a: &[f32],
    offsets: &[usize],
    sa: usize,
    kk: usize,
    rowmap: &[u32],
    d: &[f32],
    n: usize,
    gw: &mut [f32],
) {
    check("tap_weight_grad", a, offsets, sa, kk, rowmap, n, gw.len(), None);
    let d_extent = a_extent(&[0], rowmap, n, n).expect("tap_weight_grad: d's extent overflows usize");
    assert!(d.len() >= d_extent, "tap_weight_grad: d too short");
    if rowmap.is_empty() {
        gw[..offsets.len() * kk * n].fill(0.0);
        return;
    }
    let ops = Operands {
        a: a.as_ptr(),
        sa,
        kk,
        rowmap,
        b: d.as_ptr(),
        n,
    };
    // SAFETY: as in `tap_rows`: AVX-512F is present, and every index read or written is below
    // the lengths asserted by `check` and above (`d` is read at
    // `rowmap[r]·n + j < max(rowmap)·n + n`).
    unsafe { tap_weight_grad_avx512(ops, offsets, gw.as_mut_ptr()) }
}

/// The operands of one call as raw pointers (bounds checked by the safe callers): `a` at a
/// tap's offset, and `b` at the tap's rows ([`tap_rows`]) or `d` ([`tap_weight_grad`]).
#[derive(Clone, Copy)]
struct Operands<'a> {
    a: *const f32,
    sa: usize,
    kk: usize,
    rowmap: &'a [u32],
    b: *const f32,
    n: usize,
}

/// Calls `tile::<R, NV>` with the tile shape for the columns `col ..`: 6 × 64, 8 × 48,
/// 12 × 32 or 24 × 16 (24 accumulators).
macro_rules! by_width {
    ($n:expr, $col:expr, $f:ident, $($arg:expr),*) => {
        match (($n - $col) / 16).min(4) {
            4 => $f::<6, 4>($($arg),*),
            3 => $f::<8, 3>($($arg),*),
            2 => $f::<12, 2>($($arg),*),
            _ => $f::<24, 1>($($arg),*),
        }
    };
}

#[target_feature(enable = "avx512f")]
unsafe fn tap_rows_avx512(ops: Operands, offsets: &[usize], c: *mut f32) {
    let rows = ops.rowmap.len();
    let n = ops.n;
    let mut r0 = 0;
    while r0 < rows {
        let block = ROWS_BLOCK.min(rows - r0);
        for (tap, &off) in offsets.iter().enumerate() {
            // SAFETY: the tap's offsets into `a` and `b` are within the caller's bounds.
            let t = unsafe {
                Operands {
                    a: ops.a.add(off),
                    b: ops.b.add(tap * ops.kk * n),
                    ..ops
                }
            };
            let mut col = 0;
            while col < n {
                // SAFETY: rows `r0 .. r0 + block ≤ rows`, columns `col .. col + 16·NV ≤ n`;
                // the caller's bounds cover them.
                unsafe { by_width!(n, col, rows_block, t, c, r0, block, col, tap > 0) };
                col += 64.min(n - col);
            }
        }
        r0 += block;
    }
}

/// Rows `r0 .. r0 + block`, columns `col .. col + 16·NV`, one tap: tiles of `R` rows, then
/// single rows.
#[target_feature(enable = "avx512f")]
unsafe fn rows_block<const R: usize, const NV: usize>(
    t: Operands,
    c: *mut f32,
    r0: usize,
    block: usize,
    col: usize,
    accumulate: bool,
) {
    let (mut r, end) = (r0, r0 + block);
    while r + R <= end {
        // SAFETY: rows `r .. r + R ≤ r0 + block`.
        unsafe { rows_tile::<R, NV>(t, c, r, col, accumulate) };
        r += R;
    }
    while r < end {
        // SAFETY: row `r < r0 + block`.
        unsafe { rows_tile::<1, NV>(t, c, r, col, accumulate) };
        r += 1;
    }
}

/// Rows `r0 .. r0 + R`, columns `col .. col + 16·NV`, one tap: `R·NV` accumulators, started
/// from what the taps before stored (`accumulate`) or from zero, over every k.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn rows_tile<const R: usize, const NV: usize>(
    t: Operands,
    c: *mut f32,
    r0: usize,
    col: usize,
    accumulate: bool,
) {
    let mut acc = [[_mm512_setzero_ps(); NV]; R];
    // SAFETY (the pointer arithmetic, loads and stores of this function): indices within the
    // caller's bounds (see `tap_rows`).
    let out = unsafe { c.add(r0 * t.n + col) };
    if accumulate {
        for (i, acc) in acc.iter_mut().enumerate() {
            for (v, acc) in acc.iter_mut().enumerate() {
                *acc = unsafe { _mm512_loadu_ps(out.add(i * t.n + 16 * v)) };
            }
        }
    }
    let mut a = [t.a; R];
    for (i, a) in a.iter_mut().enumerate() {
        *a = unsafe { t.a.add(t.rowmap[r0 + i] as usize * t.sa) };
    }
    let b = unsafe { t.b.add(col) };
    for k in 0..t.kk {
        let mut bv = [_mm512_setzero_ps(); NV];
        for (v, bv) in bv.iter_mut().enumerate() {
            *bv = unsafe { _mm512_loadu_ps(b.add(k * t.n + 16 * v)) };
        }
        for (acc, &a) in acc.iter_mut().zip(&a) {
            let s = _mm512_set1_ps(unsafe { *a.add(k) });
            for (acc, &bv) in acc.iter_mut().zip(&bv) {
                *acc = _mm512_fmadd_ps(s, bv, *acc);
            }
        }
    }
    for (i, acc) in acc.iter().enumerate() {
        for (v, &acc) in acc.iter().enumerate() {
            unsafe { _mm512_storeu_ps(out.add(i * t.n + 16 * v), acc) };
        }
    }
}

#[target_feature(enable = "avx512f")]
unsafe fn tap_weight_grad_avx512(ops: Operands, offsets: &[usize], gw: *mut f32) {
    let (rows, n) = (ops.rowmap.len(), ops.n);
    let mut r0 = 0;
    while r0 < rows {
        let block = GRAD_ROWS.min(rows - r0);
        for (tap, &off) in offsets.iter().enumerate() {
            // SAFETY: the tap's offset into `a`, and its rows of `gw`, are within the caller's
            // bounds.
            let (t, gw) = unsafe {
                (
                    Operands {
                        a: ops.a.add(off),
                        ..ops
                    },
                    gw.add(tap * ops.kk * n),
                )
            };
            let mut col = 0;
            while col < n {
                // SAFETY: rows `r0 .. r0 + block ≤ rows`, columns `col .. col + 16·NV ≤ n`,
                // k below `kk`.
                unsafe { by_width!(n, col, grad_block, t, gw, r0, block, col) };
                col += 64.min(n - col);
            }
        }
        r0 += block;
    }
}

/// One tap's `kk` rows of the weight gradient, columns `col .. col + 16·NV`, summed over rows
/// `r0 .. r0 + block`: tiles of `KT` values of k, then single ones.
#[target_feature(enable = "avx512f")]
unsafe fn grad_block<const KT: usize, const NV: usize>(t: Operands, gw: *mut f32, r0: usize, block: usize, col: usize) {
    let mut k = 0;
    while k + KT <= t.kk {
        // SAFETY: k values `k .. k + KT ≤ kk`.
        unsafe { grad_tile::<KT, NV>(t, gw, k, r0, block, col) };
        k += KT;
    }
    while k < t.kk {
        // SAFETY: k value `k < kk`.
        unsafe { grad_tile::<1, NV>(t, gw, k, r0, block, col) };
        k += 1;
    }
}

/// `gw[(k0 + i)·n + col ..][..16·NV] (+)= Σ_{r0 ≤ r < r0 + block} a[rowmap[r]·sa + k0 + i] · d[rowmap[r]·n + col ..]`
/// for `i < KT`: added to what the blocks before stored, or stored by the first block.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn grad_tile<const KT: usize, const NV: usize>(
    t: Operands,
    gw: *mut f32,
    k0: usize,
    r0: usize,
    block: usize,
    col: usize,
) {
    let mut acc = [[_mm512_setzero_ps(); NV]; KT];
    for &row in &t.rowmap[r0..r0 + block] {
        let row = row as usize;
        // SAFETY (the pointer arithmetic and loads of this loop): indices within the caller's
        // bounds (see `tap_weight_grad`).
        let (a, d) = unsafe { (t.a.add(row * t.sa + k0), t.b.add(row * t.n + col)) };
        let mut dv = [_mm512_setzero_ps(); NV];
        for (v, dv) in dv.iter_mut().enumerate() {
            *dv = unsafe { _mm512_loadu_ps(d.add(16 * v)) };
        }
        for (i, acc) in acc.iter_mut().enumerate() {
            let s = _mm512_set1_ps(unsafe { *a.add(i) });
            for (acc, &dv) in acc.iter_mut().zip(&dv) {
                *acc = _mm512_fmadd_ps(s, dv, *acc);
            }
        }
    }
    for (i, acc) in acc.iter().enumerate() {
        for (v, &acc) in acc.iter().enumerate() {
            // SAFETY: within `gw` (see `tap_weight_grad`); the first block stores, the others
            // add to what it stored.
            unsafe {
                let at = gw.add((k0 + i) * t.n + col + 16 * v);
                let v = if r0 == 0 {
                    acc
                } else {
                    _mm512_add_ps(_mm512_loadu_ps(at), acc)
                };
                _mm512_storeu_ps(at, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn rand(rng: &mut Rng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.uniform_range(-1.0, 1.0)).collect()
    }

    /// Both kernels against their definitions summed in f64, on shapes that take every tile
    /// (64, 48, 32 and 16 columns, and 80 and 128 as blocks of 64 plus the rest), row and k
    /// counts that leave tails, one to three taps, and a row count larger than a block.
    #[test]
    fn kernels_match_the_scalar_definition() {
        if !usable(16) {
            eprintln!("no AVX-512F here: the kernels are not used, nothing to check");
            return;
        }
        let mut rng = Rng::new(11, 0);
        for (n, kk, sa, rows, taps) in [
            (64, 96, 32, 150, 3),
            (48, 7, 5, 31, 2),
            (32, 192, 64, 13, 3),
            (16, 25, 9, 200, 1),
            (80, 11, 11, 7, 2),
            (128, 6, 3, 65, 3),
            (64, 1, 1, 1, 1),
            // More rows than a block of `tap_rows` (240) and of the weight gradient (64).
            (64, 9, 11, 487, 2),
        ] {
            let offsets: Vec<usize> = (0..taps).map(|t| t * 17 % 23 + t * sa).collect();
            // Rows mapped as pixels of 5-wide image rows on a grid 7 wide (a gap of 2).
            let rowmap: Vec<u32> = (0..rows as u32).map(|r| r / 5 * 7 + r % 5).collect();
            let top = *rowmap.last().unwrap() as usize;
            let a = rand(&mut rng, a_extent(&offsets, &rowmap, sa, kk).unwrap() + 3);
            let b = rand(&mut rng, taps * kk * n);
            let d = rand(&mut rng, (top + 1) * n);
            let mut c = vec![f32::NAN; rows * n];
            tap_rows(&a, &offsets, sa, kk, &rowmap, &b, n, &mut c);
            let mut gw = vec![f32::NAN; taps * kk * n];
            tap_weight_grad(&a, &offsets, sa, kk, &rowmap, &d, n, &mut gw);
            for r in 0..rows {
                for j in 0..n {
                    let mut want = 0.0f64;
                    for (t, &o) in offsets.iter().enumerate() {
                        for k in 0..kk {
                            want += a[o + rowmap[r] as usize * sa + k] as f64 * b[(t * kk + k) * n + j] as f64;
                        }
                    }
                    let got = c[r * n + j] as f64;
                    assert!(
                        (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                        "rows n={n} kk={kk}: c[{r},{j}] {got} vs {want}"
                    );
                }
            }
            for (t, &o) in offsets.iter().enumerate() {
                for k in 0..kk {
                    for j in 0..n {
                        let want: f64 = rowmap
                            .iter()
                            .map(|&q| a[o + q as usize * sa + k] as f64 * d[q as usize * n + j] as f64)
                            .sum();
                        let got = gw[(t * kk + k) * n + j] as f64;
                        assert!(
                            (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                            "grad n={n} kk={kk}: gw[{t},{k},{j}] {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    /// Operands that would be read or written out of bounds, or whose bounds overflow, are
    /// refused before any access, naming the operand.
    #[test]
    fn bad_operands_are_refused() {
        if !usable(16) {
            eprintln!("no AVX-512F here: the kernels are not used, nothing to check");
            return;
        }
        let refusal = |f: &dyn Fn()| {
            let e = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).expect_err("refused");
            match e.downcast_ref::<&str>() {
                Some(m) => m.to_string(),
                None => e.downcast_ref::<String>().cloned().unwrap_or_default(),
            }
        };
        let (a, b) = (vec![0.0; 10], vec![0.0; 16]);
        // Row 2 reads up to index 2·5 + 1 = 11 > 10.
        let msg = refusal(&|| tap_rows(&a, &[0], 5, 1, &[0, 1, 2], &b, 16, &mut [0.0; 48]));
        assert!(msg.contains("a too short"), "{msg}");
        let msg = refusal(&|| tap_rows(&a, &[0], 1, 1, &[0, 1, 2], &b, 16, &mut [0.0; 47]));
        assert!(msg.contains("c too short"), "{msg}");
        let msg = refusal(&|| tap_rows(&a, &[0, 1], 1, 1, &[0], &b, 16, &mut [0.0; 16]));
        assert!(msg.contains("b too short"), "{msg}");
        let msg = refusal(&|| tap_rows(&a, &[0], 1, 0, &[0], &b, 16, &mut [0.0; 16]));
        assert!(msg.contains("at least one tap and one k"), "{msg}");
        let msg = refusal(&|| tap_rows(&a, &[usize::MAX], 1, 1, &[0], &b, 16, &mut [0.0; 16]));
        assert!(msg.contains("overflows"), "{msg}");
        let msg = refusal(&|| tap_weight_grad(&a, &[0], 1, 1, &[0, 1], &b, 16, &mut [0.0; 16]));
        assert!(msg.contains("d too short"), "{msg}");
    }
}
