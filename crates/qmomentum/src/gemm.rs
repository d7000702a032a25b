//! Matrix products for training, on the `gemm` crate (AVX-512 kernels with its `x86-v4` feature).
//!
//! All matrices are row-major f32 slices. The three products of a dense layer run on the same
//! buffers with no transpose copies, by passing strides:
//! forward `Y = X·W`, weight gradient `dW = Xᵀ·dY`, input gradient `dX = dY·Wᵀ`.
//!
//! Threading (measured, see `doc/performance.md`): two threads only pay on large products, so a
//! product of at least [`PARALLEL_MIN_FLOP`] called from outside the thread pool (evaluation on
//! large batches) uses both cores; training splits the batch over the cores instead.

use gemm::Parallelism;

/// Products with at least this many FLOPs (2·m·n·k) run on two threads.
pub const PARALLEL_MIN_FLOP: usize = 12_000_000;

/// Whether a matrix is used as stored or transposed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// As stored (row-major, `rows × cols`).
    N,
    /// Transposed.
    T,
}

fn threads_for(m: usize, n: usize, k: usize) -> Parallelism {
    // Inside a share of a pool job (a training replica) or a rayon task the other core is busy
    // already.
    if 2 * m * n * k >= PARALLEL_MIN_FLOP
        && rayon::current_num_threads() > 1
        && rayon::current_thread_index().is_none()
        && !qmomentum_runtime::pool::inside_job()
    {
        Parallelism::Rayon(2)
    } else {
        Parallelism::None
    }
}

/// How a matrix is laid out in its slice: element `(i, j)` is at `i·rs + j·cs`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Strides {
    /// Row stride, in elements.
    pub rs: usize,
    /// Column stride, in elements.
    pub cs: usize,
}

impl Strides {
    /// A row-major matrix whose rows are `ld` elements apart.
    pub fn row_major(ld: usize) -> Self {
        Strides { rs: ld, cs: 1 }
    }
    /// The transpose of a row-major matrix whose rows are `ld` elements apart.
    pub fn transposed(ld: usize) -> Self {
        Strides { rs: 1, cs: ld }
    }
    /// One past the largest offset of an `r × c` matrix (0 when empty).
    fn extent(self, r: usize, c: usize) -> usize {
        if r == 0 || c == 0 {
            0
        } else {
            (r - 1) * self.rs + (c - 1) * self.cs + 1
        }
    }
}

/// `C[m×n] = (accumulate ? C : 0) + A[m×k]·B[k×n]` for matrices at any strides (a group of a
/// convolution: a column block of a wider matrix). Panics if a stride reaches past a slice.
#[allow(clippy::too_many_arguments)]
pub fn matmul_strided(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    sa: Strides,
    b: &[f32],
    sb: Strides,
    c: &mut [f32],
    sc: Strides,
    accumulate: bool,
) {
    assert!(
        a.len() >= sa.extent(m, k),
        "matmul: A has {} < {}",
        a.len(),
        sa.extent(m, k)
    );
    assert!(
        b.len() >= sb.extent(k, n),
        "matmul: B has {} < {}",
        b.len(),
        sb.extent(k, n)
    );
    assert!(
        c.len() >= sc.extent(m, n),
        "matmul: C has {} < {}",
        c.len(),
        sc.extent(m, n)
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    c[i * sc.rs + j * sc.cs] = 0.0;
                }
            }
        }
        return;
    }
    // SAFETY: the asserts above guarantee every index the strides reach is inside the slices;
    // `c` is exclusively borrowed and does not alias `a` or `b` (Rust borrow rules).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            sc.cs as isize,
            sc.rs as isize,
            accumulate,
            a.as_ptr(),
            sa.cs as isize,
            sa.rs as isize,
            b.as_ptr(),
            sb.cs as isize,
            sb.rs as isize,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            threads_for(m, n, k),
        );
    }
}

/// `C[m×n] = alpha·C + op(A)·op(B)` where `op(A)` is `m×k` and `op(B)` is `k×n`.
///
/// `a` is stored row-major as `m×k` (`Op::N`) or `k×m` (`Op::T`), likewise `b`. With
/// `accumulate = false` the old content of `c` is ignored (alpha is 0).
#[allow(clippy::too_many_arguments)]
pub fn matmul(m: usize, n: usize, k: usize, a: &[f32], op_a: Op, b: &[f32], op_b: Op, c: &mut [f32], accumulate: bool) {
    let sa = match op_a {
        Op::N => Strides::row_major(k),
        Op::T => Strides::transposed(m),
    };
    let sb = match op_b {
        Op::N => Strides::row_major(n),
        Op::T => Strides::transposed(k),
    };
    matmul_strided(m, n, k, a, sa, b, sb, c, Strides::row_major(n), accumulate);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn naive(m: usize, n: usize, k: usize, a: &[f32], ta: Op, b: &[f32], tb: Op) -> Vec<f32> {
        let mut c = vec![0.0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0.0f64;
                for p in 0..k {
                    let av = if ta == Op::N { a[i * k + p] } else { a[p * m + i] };
                    let bv = if tb == Op::N { b[p * n + j] } else { b[j * k + p] };
                    s += av as f64 * bv as f64;
                }
                c[i * n + j] = s as f32;
            }
        }
        c
    }

    #[test]
    fn all_transpose_combinations_match_naive() {
        let mut r = Rng::new(3, 0);
        for &(m, n, k) in &[(1, 1, 1), (7, 5, 3), (33, 17, 65), (128, 10, 64), (64, 128, 300)] {
            for ta in [Op::N, Op::T] {
                for tb in [Op::N, Op::T] {
                    let a: Vec<f32> = (0..m * k).map(|_| r.uniform_range(-1.0, 1.0)).collect();
                    let b: Vec<f32> = (0..k * n).map(|_| r.uniform_range(-1.0, 1.0)).collect();
                    let want = naive(m, n, k, &a, ta, &b, tb);
                    let mut c = vec![1.0f32; m * n];
                    matmul(m, n, k, &a, ta, &b, tb, &mut c, true);
                    for (x, y) in c.iter().zip(&want) {
                        assert!((x - (y + 1.0)).abs() < 1e-4 * (k as f32).sqrt() * 4.0);
                    }
                    matmul(m, n, k, &a, ta, &b, tb, &mut c, false);
                    for (x, y) in c.iter().zip(&want) {
                        assert!((x - y).abs() < 1e-4 * (k as f32).sqrt() * 4.0);
                    }
                }
            }
        }
    }
}
