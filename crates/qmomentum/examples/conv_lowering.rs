//! An experiment, not the library's code: cnn-small's second convolution (3×3, "same", 32 → 64
//! channels, 14×14, 64 samples: one core's half of a batch) lowered two ways on the same GEMM.
//!
//! - **im2col** (what `Conv2d` does): the `rows × 288` columns written, then `z = col·W`,
//!   `dW = colᵀ·dz`, `dcol = dz·Wᵀ` and col2im.
//! - **implicit GEMM over a padded input**: the input is stored with one zero column between
//!   its rows and one zero row between its images, so that the window of every output pixel
//!   starts at a fixed offset from it. Over that grid (15×15 per image instead of 14×14, 15 %
//!   more rows, the extra rows' results thrown away), each kernel row `ky` is one strided
//!   matrix whose rows overlap: three products with K = 96 forward, three weight-gradient
//!   products, and three input-gradient products of the zero-padded `dz` against the flipped
//!   kernel (K = 192). No columns are written. The sums over K are cut in three where the GEMM
//!   does not cut them, so the values differ from im2col's in the last bits: adopting this
//!   would change a trained network's bits.
//!
//! It prints the median time of each part and the largest difference between the two ways.
//! Measured on the Xeon VM of 2026-11-26, one thread: im2col way 13.2–14.1 ms, implicit
//! 11.7–11.9 ms per forward + backward (`doc/performance.md`, twelfth session).
//!
//! Run: `cargo run --release --example conv_lowering -p qmomentum [-- THREADS ROUNDS]`
//! (THREADS copies run at once, each on its own core and buffers, as training's two halves do;
//! the figures printed are the first copy's).

use qmomentum::gemm::{matmul_strided, Strides};
use std::time::Instant;

const B: usize = 64;
const H: usize = 14;
const W: usize = 14;
const CI: usize = 32;
const CO: usize = 64;
/// The padded grid: one shared zero column per row, one shared zero row per image.
const WP: usize = W + 1;
const HP: usize = H + 1;
/// Zero rows of the grid before and after the images (the taps reach `WP + 1` before a pixel
/// and the input gradient's flipped windows `WP + 1` after).
const MARGIN: usize = 2 * WP + 2;

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
    let grid = B * HP * WP;
    let (mut xp, mut dzp) = (vec![0.0; (grid + 2 * MARGIN) * CI], vec![0.0; (grid + 2 * MARGIN) * CO]);
    let (mut zp, mut dxp, mut dw2, mut dx2) = (
        vec![0.0; grid * CO],
        vec![0.0; grid * CI],
        vec![0.0; kg * CO],
        vec![0.0; x.len()],
    );
    // The kernel for the input gradient, per kernel row: row `(2 − kx)·CO + co`, column `ci`.
    let mut wflip = vec![0.0; 3 * 3 * CO * CI];
    for ky in 0..3 {
        for kx in 0..3 {
            for ci in 0..CI {
                for co in 0..CO {
                    wflip[(ky * 3 * CO + (2 - kx) * CO + co) * CI + ci] = w[((ky * 3 + kx) * CI + ci) * CO + co];
                }
            }
        }
    }
    let names = [
        "im2col",
        "forward",
        "weight grad",
        "input grad",
        "col2im",
        "pad x",
        "implicit forward",
        "pad dz",
        "implicit weight grad",
        "implicit input grad",
        "unpad dx",
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
        // Implicit: pixel (b, y, x) at grid row MARGIN + (b·HP + y)·WP + x; the window of output
        // p (same numbering) starts WP + 1 rows before it.
        for (b_y, src) in x.chunks_exact(W * CI).enumerate() {
            let at = (MARGIN + (b_y / H * HP + b_y % H) * WP) * CI;
            xp[at..at + W * CI].copy_from_slice(src);
        }
        lap(&mut t, &mut clock, 5);
        for ky in 0..3 {
            let a = &xp[(MARGIN - WP - 1 + ky * WP) * CI..];
            matmul_strided(
                grid,
                CO,
                3 * CI,
                a,
                rm(CI),
                &w[ky * 3 * CI * CO..],
                rm(CO),
                &mut zp,
                rm(CO),
                ky > 0,
            );
        }
        lap(&mut t, &mut clock, 6);
        for (b_y, src) in dz.chunks_exact(W * CO).enumerate() {
            let at = (MARGIN + (b_y / H * HP + b_y % H) * WP) * CO;
            dzp[at..at + W * CO].copy_from_slice(src);
        }
        lap(&mut t, &mut clock, 7);
        for ky in 0..3 {
            let a = &xp[(MARGIN - WP - 1 + ky * WP) * CI..];
            let dwk = &mut dw2[ky * 3 * CI * CO..(ky + 1) * 3 * CI * CO];
            matmul_strided(
                3 * CI,
                CO,
                grid,
                a,
                Strides::transposed(CI),
                &dzp[MARGIN * CO..],
                rm(CO),
                dwk,
                rm(CO),
                false,
            );
        }
        lap(&mut t, &mut clock, 8);
        for ky in 0..3 {
            // Input pixel q gets dz of outputs q + WP + 1 − ky·WP − kx, kx = 2, 1, 0 in a row.
            let a = &dzp[(MARGIN + WP + 1 - ky * WP - 2) * CO..];
            matmul_strided(
                grid,
                CI,
                3 * CO,
                a,
                rm(CO),
                &wflip[ky * 3 * CO * CI..],
                rm(CI),
                &mut dxp,
                rm(CI),
                ky > 0,
            );
        }
        lap(&mut t, &mut clock, 9);
        for (b_y, dst) in dx2.chunks_exact_mut(W * CI).enumerate() {
            let at = (b_y / H * HP + b_y % H) * WP * CI;
            dst.copy_from_slice(&dxp[at..at + W * CI]);
        }
        lap(&mut t, &mut clock, 10);
    }
    let zd = (0..rows)
        .map(|r| {
            let (b, oy, ox) = (r / (H * W), r / W % H, r % W);
            max_diff(&z[r * CO..][..CO], &zp[((b * HP + oy) * WP + ox) * CO..][..CO])
        })
        .fold(0.0, f32::max);
    let medians = names.iter().zip(t).map(|(&n, v)| (n, median(v))).collect();
    (medians, [zd, max_diff(&dw, &dw2), max_diff(&dx, &dx2)])
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
