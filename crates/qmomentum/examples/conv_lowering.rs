//! cnn-small's second convolution (3×3, "same", 32 → 64 channels, 14×14, 64 samples: one core's
//! half of a batch) lowered two ways on the same GEMM: the experiment that measured the
//! library's [`ImplicitGemm`](qmomentum::layers::conv_implicit::ImplicitGemm) against im2col
//! before `Conv2d` took it.
//!
//! - **im2col** (what `Conv2d` does): the `rows × 288` columns written, then `z = col·W`,
//!   `dW = colᵀ·dz`, `dcol = dz·Wᵀ` and col2im.
//! - **implicit GEMM over a padded input** (`layers/conv_implicit.rs`): the input on a grid with
//!   one zero column between its rows and one zero row between its images (15×15 per image
//!   instead of 14×14, 15 % more rows), where each kernel row's windows are one strided matrix
//!   with overlapping rows: three products per pass and no columns. The sums over K are cut in
//!   three where the GEMM does not cut them, so the values differ from im2col's in the last bits.
//!   On a CPU with AVX-512F the library runs these passes on its hand-written kernels
//!   (`layers/conv_implicit/avx512.rs`: the pixels' rows only, each kernel row's K summed in
//!   registers), elsewhere on the `gemm` crate.
//!
//! It prints the median time of each part and the largest difference between the two ways.
//! Measured on the Xeon VM of 2026-11-26 (`doc/performance.md`): in the twelfth session, with
//! the implicit way on the `gemm` crate, one copy 13.1 ms against 11.8 ms per forward + backward
//! (1.11×), two copies at once 1.19–1.30×; in the thirteenth, on the kernels, 12.2–12.5 ms
//! against 9.9 ms (1.24–1.27×), two copies 1.26–1.28×.
//!
//! Run: `cargo run --release --example conv_lowering -p qmomentum [-- THREADS ROUNDS]`
//! (THREADS copies run at once, each on its own core and buffers, as training's two halves do;
//! the figures printed are the first copy's).

use qmomentum::gemm::{matmul_strided, Strides};
use qmomentum::layers::conv2d::{Conv2d, Conv2dConfig, Padding};
use qmomentum::layers::conv_implicit::ImplicitGemm;
use qmomentum::layers::{Activation, Shape};
use std::time::Instant;

const B: usize = 64;
const H: usize = 14;
const W: usize = 14;
const CI: usize = 32;
const CO: usize = 64;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2] * 1e3
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).fold(0.0, |m, (x, y)| m.max((x - y).abs()))
}

/// One copy of the experiment: `(names, median ms per part, largest differences)`.
fn run(rounds: usize, seed: u64) -> (Vec<(&'static str, f64)>, [f32; 3]) {
    let rows = B * H * W;
    let kg = 9 * CI;
    let mut rng = qmomentum::rng::Rng::new(seed, 0);
    let cfg = Conv2dConfig {
        filters: CO,
        kernel: [3, 3],
        padding: Padding::Same,
        ..Default::default()
    };
    let geo = Conv2d::new(0, Shape::new(H, W, CI), cfg, Activation::Linear, &mut rng)
        .expect("a 3×3 conv")
        .geo;
    let mut rand = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.uniform_range(-0.5, 0.5)).collect() };
    let x = rand(B * H * W * CI);
    let w = rand(kg * CO);
    let dz = rand(rows * CO);
    let (mut col, mut z, mut dw, mut dx) = (
        vec![0.0; rows * kg],
        vec![0.0; rows * CO],
        vec![0.0; kg * CO],
        vec![0.0; x.len()],
    );
    let (mut z2, mut dw2, mut dx2) = (vec![0.0; z.len()], vec![0.0; dw.len()], vec![0.0; dx.len()]);
    let mut imp = ImplicitGemm::default();
    let names = [
        "im2col",
        "forward",
        "weight grad",
        "input grad",
        "col2im",
        "implicit forward",
        "implicit load dz",
        "implicit weight grad",
        "implicit input grad",
    ];
    let mut t: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    let lap = |t: &mut Vec<Vec<f64>>, clock: &mut Instant, i: usize| {
        t[i].push(clock.elapsed().as_secs_f64());
        *clock = Instant::now();
    };
    let rm = Strides::row_major;
    for _ in 0..rounds {
        let mut clock = Instant::now();
        // im2col: for each output pixel, its 3×3 window (zeros outside).
        for (r, row) in col.chunks_exact_mut(kg).enumerate() {
            let (b, oy, ox) = (r / (H * W), r / W % H, r % W);
            for (t, dst) in row.chunks_exact_mut(CI).enumerate() {
                let (iy, ix) = ((oy + t / 3).wrapping_sub(1), (ox + t % 3).wrapping_sub(1));
                if iy < H && ix < W {
                    dst.copy_from_slice(&x[((b * H + iy) * W + ix) * CI..][..CI]);
                } else {
                    dst.fill(0.0);
                }
            }
        }
        lap(&mut t, &mut clock, 0);
        matmul_strided(rows, CO, kg, &col, rm(kg), &w, rm(CO), &mut z, rm(CO), false);
        lap(&mut t, &mut clock, 1);
        matmul_strided(
            kg,
            CO,
            rows,
            &col,
            Strides::transposed(kg),
            &dz,
            rm(CO),
            &mut dw,
            rm(CO),
            false,
        );
        lap(&mut t, &mut clock, 2);
        matmul_strided(
            rows,
            kg,
            CO,
            &dz,
            rm(CO),
            &w,
            Strides::transposed(CO),
            &mut col,
            rm(kg),
            false,
        );
        lap(&mut t, &mut clock, 3);
        dx.fill(0.0);
        for (r, row) in col.chunks_exact(kg).enumerate() {
            let (b, oy, ox) = (r / (H * W), r / W % H, r % W);
            for (t, src) in row.chunks_exact(CI).enumerate() {
                let (iy, ix) = ((oy + t / 3).wrapping_sub(1), (ox + t % 3).wrapping_sub(1));
                if iy < H && ix < W {
                    for (d, &s) in dx[((b * H + iy) * W + ix) * CI..][..CI].iter_mut().zip(src) {
                        *d += s;
                    }
                }
            }
        }
        lap(&mut t, &mut clock, 4);
        imp.forward(&geo, &x, &w, &mut z2, B);
        lap(&mut t, &mut clock, 5);
        imp.load_output_grad(&geo, &dz, B);
        lap(&mut t, &mut clock, 6);
        imp.weight_grad(&geo, &mut dw2, B);
        lap(&mut t, &mut clock, 7);
        imp.input_grad(&geo, &w, &mut dx2, B);
        lap(&mut t, &mut clock, 8);
    }
    let medians = names.iter().zip(t).map(|(&n, v)| (n, median(v))).collect();
    (medians, [max_diff(&z, &z2), max_diff(&dw, &dw2), max_diff(&dx, &dx2)])
}

fn main() {
    let mut args = std::env::args()
        .skip(1)
        .map(|a| a.parse::<usize>().expect("THREADS ROUNDS: numbers"));
    let threads = args.next().unwrap_or(1).max(1);
    let rounds = args.next().unwrap_or(30).max(1);
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|i| {
                s.spawn(move || {
                    // One thread per copy: the products run single-threaded, as in a training half.
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(1)
                        .build()
                        .expect("a rayon pool");
                    pool.install(|| run(rounds, i as u64))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a copy panicked"))
            .collect()
    });
    let (medians, diffs) = &results[0];
    println!("conv 3×3 same, {B}×{H}×{W}×{CI} → {CO}, {threads} copies at once, median of {rounds} rounds (ms):");
    for (name, ms) in medians {
        println!("  {name:<22} {ms:7.3}");
    }
    let im2col: f64 = medians[..5].iter().map(|m| m.1).sum();
    let implicit: f64 = medians[5..].iter().map(|m| m.1).sum();
    println!(
        "im2col way {im2col:.3} ms, implicit way {implicit:.3} ms ({:.2}×)",
        im2col / implicit
    );
    println!(
        "largest difference: z {:.1e}, dW {:.1e}, dx {:.1e}",
        diffs[0], diffs[1], diffs[2]
    );
}
