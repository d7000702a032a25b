//! 4-bit against 8-bit weights: file sizes, resident packed weights and throughput.
//!
//! `cargo run -p qmomentum-runtime --release --example bench_lowbit`
//!
//! A 784-128-64-10 MLP whose two hidden layers have random 4-bit codes ([-8, 7]; the output
//! layer stays 8-bit) against the same architecture with random 8-bit codes everywhere: the
//! `.qmm` sizes (the 4-bit model also written at 8 bits), bytes per layer, and samples/s at batch
//! 10 000 on one thread per tier, runs of the two models alternating, medians of 9. Then the
//! dense kernel alone on the same codes packed both ways ([10000×784]·[784×128]).

use std::hint::black_box;
use std::time::Instant;

use qmomentum_runtime::kernels::{self, KernelKind, PackedDenseI8};
use qmomentum_runtime::{quantize_multiplier, InputSpec, Layer, Model, Output};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform code of `bits` bits: [-8, 7] or [-128, 127].
    fn code(&mut self, bits: u32) -> i8 {
        let span = 1u64 << bits;
        ((self.next() % span) as i64 - (span / 2) as i64) as i8
    }
}

fn relu(outputs: usize, inputs: usize, bits: u32) -> Output {
    let w = (1i64 << (bits - 1)) as f64 / 2.0;
    let (m, r) = quantize_multiplier(100.0 / (128.0 * w * (inputs as f64).sqrt())).unwrap();
    Output::U8 {
        relu: true,
        multiplier: vec![m; outputs],
        shift: vec![r; outputs],
        zero_point: 0,
        qmax: 255,
    }
}

fn dense(rng: &mut Rng, inputs: usize, outputs: usize, bits: u32, output: Output) -> Layer {
    Layer::DenseI8 {
        inputs,
        outputs,
        weight: (0..inputs * outputs).map(|_| rng.code(bits)).collect(),
        bias: (0..outputs).map(|_| (rng.next() % 201) as i32 - 100).collect(),
        input_zero_point: 0,
        output,
    }
}

fn mlp(rng: &mut Rng, hidden_bits: u32) -> Model {
    let layers = vec![
        dense(rng, 784, 128, hidden_bits, relu(128, 784, hidden_bits)),
        dense(rng, 128, 64, hidden_bits, relu(64, 128, hidden_bits)),
        dense(
            rng,
            64,
            10,
            8,
            Output::Logits {
                scale: vec![0.001; 10],
                bias: None,
            },
        ),
    ];
    let input = InputSpec {
        size: 784,
        scale: 1.0 / 255.0,
        zero_point: 0,
        binarize_at: None,
        shape: None,
    };
    Model::new(input, layers).unwrap()
}

fn secs(f: impl FnOnce()) -> f64 {
    let s = Instant::now();
    f();
    s.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let mut rng = Rng(7);
    println!("kernel tiers available: {:?}", KernelKind::available());
    let w4 = mlp(&mut rng, 4);
    let w8 = mlp(&mut rng, 8);

    let f4 = w4.to_bytes().unwrap();
    let f4_at8 = w4.to_bytes_min_weight_bits(8).unwrap();
    let f8 = w8.to_bytes().unwrap();
    println!(
        "file sizes: 4-bit hidden {} B, same model at 8 bits {} B ({:.3}×), 8-bit model {} B",
        f4.len(),
        f4_at8.len(),
        f4.len() as f64 / f4_at8.len() as f64,
        f8.len()
    );
    for (name, m) in [("4-bit", &w4), ("8-bit", &w8)] {
        for (i, s) in m.layer_storage().iter().enumerate() {
            println!(
                "  {name} layer {i}: {} weights at {} bits = {} B ({} B with bias/requant), f32 {} B, ratio {:.4}",
                s.weights,
                s.weight_bits,
                s.weight_bytes,
                s.tensor_bytes,
                s.f32_weight_bytes(),
                s.ratio_to_f32()
            );
        }
    }

    let batch = 10_000;
    let x: Vec<u8> = (0..batch * 784).map(|_| rng.next() as u8).collect();
    let runs = 9;
    for kind in KernelKind::available().into_iter().rev() {
        let mut ws4 = w4.workspace(batch);
        let mut ws8 = w8.workspace(batch);
        // Warm-up (and the AVX2 tier's one-time i16 expansion of 4-bit layers).
        w4.run_with(kind, &mut ws4, &x, batch).unwrap();
        w8.run_with(kind, &mut ws8, &x, batch).unwrap();
        let (mut t4, mut t8) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            t4.push(secs(|| {
                black_box(w4.run_with(kind, &mut ws4, &x, batch).unwrap());
            }));
            t8.push(secs(|| {
                black_box(w8.run_with(kind, &mut ws8, &x, batch).unwrap());
            }));
        }
        let (m4, m8) = (median(t4), median(t8));
        println!(
            "{kind:?}: MLP batch {batch}, 1 thread: 4-bit hidden {:.0} samples/s, 8-bit {:.0} samples/s (4-bit/8-bit time {:.3})",
            batch as f64 / m4,
            batch as f64 / m8,
            m4 / m8
        );
    }

    // The dense kernel alone on the same codes, packed 4-bit and int8.
    let (k, n, rows) = (784, 128, 10_000);
    let w: Vec<i8> = (0..k * n).map(|_| rng.code(4)).collect();
    let bias = vec![0i32; n];
    let p4 = PackedDenseI8::new_4bit(k, n, &w, &bias, 0);
    let p8 = PackedDenseI8::new(k, n, &w, &bias, 0);
    println!(
        "resident packed weights of the {k}×{n} layer, all tiers built: 4-bit {} B, int8 {} B",
        p4.resident_weight_bytes(),
        p8.resident_weight_bytes()
    );
    let mut acc = vec![0i32; 32 * n];
    for kind in KernelKind::available().into_iter().rev() {
        let go = |p: &PackedDenseI8, acc: &mut [i32]| {
            secs(|| {
                for r in (0..rows).step_by(32) {
                    let m = 32.min(rows - r);
                    kernels::dense_i8(kind, p, &x[r * k..], k, m, acc, n).unwrap();
                }
                black_box(&acc);
            })
        };
        go(&p4, &mut acc);
        go(&p8, &mut acc);
        let (mut t4, mut t8) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            t4.push(go(&p4, &mut acc));
            t8.push(go(&p8, &mut acc));
        }
        let (m4, m8) = (median(t4), median(t8));
        let gops = |t: f64| 2.0 * (rows * k * n) as f64 / t / 1e9;
        println!(
            "{kind:?}: dense {rows}×{k}·{k}×{n} same codes: 4-bit {:.1} GOP/s, int8 {:.1} GOP/s (4-bit/int8 time {:.3})",
            gops(m4),
            gops(m8),
            m4 / m8
        );
    }
}
