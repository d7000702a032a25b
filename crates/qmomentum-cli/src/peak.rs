//! The f32 FMA peak of this machine, measured at run time (the `% of peak` of `bench train`).
//!
//! A constant from another CPU gave "88 % of peak" on a machine where the truth was 39 %: the
//! peak differs by a factor of two between Zen 4 (512-bit FMA double-pumped) and Zen 5 (full
//! width). So `bench train` runs a short FMA loop of the widest width the CPU has, on 1 and on
//! `threads` threads, and divides by that. Written by hand: no crate measures this. Sixteen
//! independent accumulators per thread hide the FMA latency (4 cycles × 2 pipes × 2 lanes of
//! work in flight), as `shared/reference/peak_fma.rs` does.

use std::time::Instant;

/// Peak GFLOP/s measured on `threads` threads, and the instruction set used.
pub fn measure(threads: usize) -> (f64, &'static str) {
    let (width, name) = widest();
    // ~60 ms per round at ~250 GFLOP/s per core, after one warm-up round; median of 5. Rounds
    // of 1 ms (the first version) measured thread start-up and, on Intel, the AVX-512 power-licence
    // ramp: 186 GFLOP/s on 1 thread and 192 on 2 on a Xeon where this loop, run long enough,
    // gives 213 and 424.
    let iters = 25_000_000u64;
    let mut v: Vec<f64> = (0..6)
        .map(|_| {
            let t = Instant::now();
            std::thread::scope(|s| {
                for _ in 0..threads {
                    s.spawn(move || std::hint::black_box(run(width, iters)));
                }
            });
            let flops = threads as f64 * iters as f64 * 16.0 * width as f64 * 2.0;
            flops / t.elapsed().as_secs_f64() / 1e9
        })
        .skip(1)
        .collect();
    v.sort_by(|a, b| a.total_cmp(b));
    (v[v.len() / 2], name)
}

/// f32 lanes of the widest FMA the CPU has.
fn widest() -> (usize, &'static str) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return (16, "AVX-512 FMA");
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            return (8, "AVX2 FMA");
        }
    }
    (1, "scalar")
}

fn run(width: usize, iters: u64) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if width == 16 {
            // SAFETY: width 16 is chosen only when `avx512f` was detected at run time.
            return unsafe { x86::fma512(iters) };
        }
        if width == 8 {
            // SAFETY: width 8 is chosen only when `avx2` and `fma` were detected at run time.
            return unsafe { x86::fma256(iters) };
        }
    }
    let mut c = [1.0f32; 16];
    for _ in 0..iters {
        for v in c.iter_mut() {
            *v = v.mul_add(0.999_999, 1e-7);
        }
    }
    c.iter().sum()
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// # Safety
    /// The CPU must support AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn fma512(iters: u64) -> f32 {
        let (a, b) = (_mm512_set1_ps(0.999_999), _mm512_set1_ps(1e-7));
        let mut c = [_mm512_set1_ps(1.0); 16];
        for _ in 0..iters {
            for v in c.iter_mut() {
                *v = _mm512_fmadd_ps(*v, a, b);
            }
        }
        let mut s = _mm512_setzero_ps();
        for v in c {
            s = _mm512_add_ps(s, v);
        }
        _mm512_reduce_add_ps(s)
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn fma256(iters: u64) -> f32 {
        let (a, b) = (_mm256_set1_ps(0.999_999), _mm256_set1_ps(1e-7));
        let mut c = [_mm256_set1_ps(1.0); 16];
        for _ in 0..iters {
            for v in c.iter_mut() {
                *v = _mm256_fmadd_ps(*v, a, b);
            }
        }
        let mut s = _mm256_setzero_ps();
        for v in c {
            s = _mm256_add_ps(s, v);
        }
        let mut out = [0f32; 8];
        _mm256_storeu_ps(out.as_mut_ptr(), s);
        out.iter().sum()
    }
}
