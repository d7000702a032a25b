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
    // Inside a rayon task (a training replica) the other core is busy already.
    if 2 * m * n * k >= PARALLEL_MIN_FLOP && rayon::current_num_threads() > 1 && rayon::current_thread_index().is_none()
    {
        Parallelism::Rayon(2)
    } else {
        Parallelism::None
    }
}

/// `C[m×n] = alpha·C + op(A)·op(B)` where `op(A)` is `m×k` and `op(B)` is `k×n`.
///
/// `a` is stored row-major as `m×k` (`Op::N`) or `k×m` (`Op::T`), likewise `b`. With
/// `accumulate = false` the old content of `c` is ignored (alpha is 0).
#[allow(clippy::too_many_arguments)]
pub fn matmul(m: usize, n: usize, k: usize, a: &[f32], op_a: Op, b: &[f32], op_b: Op, c: &mut [f32], accumulate: bool) {
    assert!(a.len() >= m * k, "matmul: A has {} < {}", a.len(), m * k);
    assert!(b.len() >= k * n, "matmul: B has {} < {}", b.len(), k * n);
    assert!(c.len() >= m * n, "matmul: C has {} < {}", c.len(), m * n);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c[..m * n].fill(0.0);
        }
        return;
    }
    // (row stride, column stride) of op(A) and op(B) in elements.
    let (a_rs, a_cs) = match op_a {
        Op::N => (k as isize, 1),
        Op::T => (1, m as isize),
    };
    let (b_rs, b_cs) = match op_b {
        Op::N => (n as isize, 1),
        Op::T => (1, k as isize),
    };
    // SAFETY: the asserts above guarantee every index the strides reach is inside the slices;
    // `c` is exclusively borrowed and does not alias `a` or `b` (Rust borrow rules).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            a_cs,
            a_rs,
            b.as_ptr(),
            b_cs,
            b_rs,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            threads_for(m, n, k),
        );
    }
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
