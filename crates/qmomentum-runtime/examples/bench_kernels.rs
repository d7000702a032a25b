//! Kernel and model throughput on this machine.
//!
//! `cargo run -p qmomentum-runtime --release --example bench_kernels`
//!
//! Prints GOP/s (1 multiply-add = 2 ops) of each int8 tier on a [128×784]·[784×128] product,
//! the binary tiers on 128- and 1024-bit rows, the fused binary layer with sign output against
//! the separate passes, samples/s of random 784-128-64-10 int8 and fully binary models on 1 and
//! 2 threads, and batch-1 latency; then the "cnn-small" convolutional network (28×28×1 → conv
//! 32 3×3 → maxpool 2 → conv 64 3×3 → maxpool 2 → dense 3136→10) per tier, at batch 256 and
//! 1000 on 1 and 2 threads and at batch 1, with the time its pooling kernels take. Each figure
//! is the median of several runs.

use std::hint::black_box;
use std::time::Instant;

use qmomentum_runtime::kernels::{self, pool, KernelKind, PackedDenseBin, PackedDenseI8, SignBits, Window};
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
    fn i8(&mut self) -> i8 {
        ((self.next() % 255) as i16 - 127) as i8
    }
}

/// Median seconds of `runs` timings of `f`.
fn median(runs: usize, mut f: impl FnMut()) -> f64 {
    let mut t: Vec<f64> = (0..runs)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[runs / 2]
}

fn dense(rng: &mut Rng, inputs: usize, outputs: usize, output: Output) -> Layer {
    Layer::DenseI8 {
        inputs,
        outputs,
        weight: (0..inputs * outputs).map(|_| rng.i8()).collect(),
        bias: (0..outputs).map(|_| (rng.next() % 2001) as i32 - 1000).collect(),
        input_zero_point: 0,
        output,
    }
}

/// A `relu_u8` output whose scale spreads typical accumulators over 0..255.
fn relu(outputs: usize, inputs: usize) -> Output {
    let (m, r) = quantize_multiplier(100.0 / (64.0 * 73.0 * (inputs as f64).sqrt())).unwrap();
    Output::U8 {
        relu: true,
        multiplier: vec![m; outputs],
        shift: vec![r; outputs],
        zero_point: 0,
        qmax: 255,
    }
}

fn main() {
    let mut rng = Rng(42);
    println!("kernel tiers available: {:?}", KernelKind::available());

    // int8 GEMM [128×784]·[784×128].
    let (m, k, n) = (128, 784, 128);
    let w: Vec<i8> = (0..k * n).map(|_| rng.i8()).collect();
    let bias = vec![0i32; n];
    let x: Vec<u8> = (0..m * k).map(|_| rng.next() as u8).collect();
    let packed = PackedDenseI8::new(k, n, &w, &bias, 0);
    let mut acc = vec![0i32; m * n];
    let ops = 2.0 * (m * k * n) as f64;
    for kind in KernelKind::available() {
        let reps = if kind == KernelKind::Scalar { 2 } else { 50 };
        let t = median(9, || {
            for _ in 0..reps {
                kernels::dense_i8(kind, &packed, black_box(&x), k, m, &mut acc, n).unwrap();
            }
        }) / reps as f64;
        println!(
            "dense_i8 [{m}x{k}]x[{k}x{n}] {:>10}: {:7.1} GOP/s ({:.1} µs)",
            kind.name(),
            ops / t / 1e9,
            t * 1e6
        );
    }

    // Binary layer: 128 rows of 128 bits → 64 channels, and 1024 bits → 256 channels.
    for (bits, outs) in [(128usize, 64usize), (1024, 256)] {
        let words = bits / 64;
        let wb: Vec<u64> = (0..outs * words).map(|_| rng.next()).collect();
        let xb: Vec<u64> = (0..m * words).map(|_| rng.next()).collect();
        let pb = PackedDenseBin::new(bits, outs, &wb);
        let mut acc = vec![0i32; m * outs];
        let ops = 2.0 * (m * bits * outs) as f64;
        for kind in KernelKind::available() {
            let label = match kind {
                KernelKind::Scalar => "count_ones",
                KernelKind::Avx2 => "popcnt",
                KernelKind::Avx512Vnni | KernelKind::Amx => "vpopcntdq",
            };
            let t = median(9, || {
                for _ in 0..100 {
                    kernels::dense_bin(kind, &pb, black_box(&xb), words, m, &mut acc, outs).unwrap();
                }
            }) / 100.0;
            println!(
                "dense_bin [{m}x{bits}b]x[{bits}b x{outs}] {label:>10}: {:7.1} binary GOP/s ({:.2} µs)",
                ops / t / 1e9,
                t * 1e6
            );
        }
    }

    // The first layer of the fully binary MLP, 784 bits → 128 sign bits: fused or in two passes.
    {
        let (bits, outs) = (784usize, 128usize);
        let words = bits.div_ceil(64);
        let keep = (1u64 << (bits % 64)) - 1;
        let mut wb: Vec<u64> = (0..outs * words).map(|_| rng.next()).collect();
        let mut xb: Vec<u64> = (0..m * words).map(|_| rng.next()).collect();
        for row in wb.chunks_mut(words).chain(xb.chunks_mut(words)) {
            row[words - 1] &= keep;
        }
        let pb = PackedDenseBin::new(bits, outs, &wb);
        let sign = SignBits::new(&vec![0; outs]);
        let mut acc = vec![0i32; m * outs];
        let mut out = vec![0u64; m * 2];
        for kind in KernelKind::available() {
            let two = median(9, || {
                for _ in 0..100 {
                    kernels::dense_bin(kind, &pb, black_box(&xb), words, m, &mut acc, outs).unwrap();
                    kernels::sign_bits(kind, &sign, &acc, outs, m, &mut out, 2).unwrap();
                }
            }) / 100.0;
            let fused = median(9, || {
                for _ in 0..100 {
                    kernels::dense_bin_sign(kind, &pb, &sign, black_box(&xb), words, m, &mut out, 2).unwrap();
                }
            }) / 100.0;
            println!(
                "dense_bin+sign [{m}x{bits}b]x[{bits}b x{outs}] {:>10}: two passes {:.2} µs, fused {:.2} µs ({:.2}×)",
                kind.name(),
                two * 1e6,
                fused * 1e6,
                two / fused
            );
        }
    }

    // The requantization epilogue on 32-row accumulator tiles of 32 and 64 channels (a
    // convolution's tile: one value per output position and channel).
    for outs in [32usize, 64] {
        let rows = 32;
        let acc: Vec<i32> = (0..rows * outs)
            .map(|_| (rng.next() % 200_001) as i32 - 100_000)
            .collect();
        let (mq, rq) = quantize_multiplier(100.0 / 40_000.0).unwrap();
        let p = kernels::Requant::new(&vec![mq; outs], &vec![rq; outs], 3, 255, true);
        let mut out = vec![0u8; rows * outs];
        for kind in KernelKind::available() {
            let t = median(9, || {
                for _ in 0..1000 {
                    kernels::requant_u8(kind, &p, black_box(&acc), outs, rows, &mut out, outs).unwrap();
                }
            }) / 1000.0;
            println!(
                "requant_u8 [{rows}x{outs}] {:>10}: {:.2} ns per value",
                kind.name(),
                t / (rows * outs) as f64 * 1e9
            );
        }
    }

    // The MNIST-shaped int8 model.
    let layers = vec![
        dense(&mut rng, 784, 128, relu(128, 784)),
        dense(&mut rng, 128, 64, relu(64, 128)),
        dense(
            &mut rng,
            64,
            10,
            Output::Logits {
                scale: vec![1e-4; 10],
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
    let model = Model::new(input, layers).unwrap();
    let batch = 10_000;
    let x: Vec<u8> = (0..batch * 784).map(|_| rng.next() as u8).collect();
    for threads in [1, 2] {
        let t = median(31, || {
            black_box(model.predict(&x, batch, threads).unwrap());
        });
        println!(
            "model 784-128-64-10 batch {batch}, {threads} thread(s): {:6.2} M samples/s",
            batch as f64 / t / 1e6
        );
    }
    // The fully binary MLP: binarized input, three XNOR-popcount layers.
    let bin = |rng: &mut Rng, inputs: usize, outputs: usize, output: Output| {
        let words = inputs.div_ceil(64);
        let mut weight: Vec<u64> = (0..outputs * words).map(|_| rng.next()).collect();
        if !inputs.is_multiple_of(64) {
            for row in weight.chunks_mut(words) {
                row[words - 1] &= (1u64 << (inputs % 64)) - 1;
            }
        }
        Layer::DenseBin {
            inputs,
            outputs,
            weight,
            output,
        }
    };
    let sign = |n: usize| Output::SignBits {
        threshold: Some(vec![0; n]),
    };
    let binary_all = Model::new(
        InputSpec {
            size: 784,
            scale: 1.0 / 255.0,
            zero_point: 0,
            binarize_at: Some(128),
            shape: None,
        },
        vec![
            bin(&mut rng, 784, 128, sign(128)),
            bin(&mut rng, 128, 64, sign(64)),
            bin(
                &mut rng,
                64,
                10,
                Output::Logits {
                    scale: vec![0.1; 10],
                    bias: Some(vec![0.0; 10]),
                },
            ),
        ],
    )
    .unwrap();
    for rows in [1000, batch] {
        for threads in [1, 2] {
            let t = median(31, || {
                black_box(binary_all.predict(&x[..rows * 784], rows, threads).unwrap());
            });
            println!(
                "binary model 784-128-64-10 batch {rows}, {threads} thread(s): {:6.2} M samples/s",
                rows as f64 / t / 1e6
            );
        }
    }
    let mut ws = model.workspace(1);
    let one = &x[..784];
    let reps = 20_000;
    let t = median(9, || {
        for _ in 0..reps {
            black_box(model.run(&mut ws, black_box(one), 1).unwrap());
        }
    }) / reps as f64;
    println!("model batch-1 latency ({}): {:.2} µs", model.kernel().name(), t * 1e6);

    cnn_small(&mut rng);
    cnn_small_binary(&mut rng);
}

/// The binary cnn-small the exporter writes for `--quant binary`: conv 32 3×3 same over the u8
/// pixels with 8-bit weights and sign outputs → maxpool_bin 2 → conv2d_bin 64 3×3 same →
/// maxpool_bin 2 → dense_bin 3136 → 10 logits. Side by side with the int8 network above.
fn cnn_small_binary(rng: &mut Rng) {
    let pool = |in_shape| Layer::MaxPoolBin {
        in_shape,
        kernel: [2, 2],
        stride: [2, 2],
        padding: [0; 4],
    };
    let layers = vec![
        Layer::Conv2dI8 {
            in_shape: [28, 28, 1],
            out_channels: 32,
            kernel: [3, 3],
            stride: [1, 1],
            padding: [1, 1, 1, 1],
            dilation: [1, 1],
            groups: 1,
            weight: (0..32 * 9).map(|_| rng.i8()).collect(),
            bias: (0..32).map(|_| (rng.next() % 2001) as i32 - 1000).collect(),
            input_zero_point: 0,
            output: Output::SignBits { threshold: None },
        },
        pool([28, 28, 32]),
        Layer::Conv2dBin {
            in_shape: [14, 14, 32],
            out_channels: 64,
            kernel: [3, 3],
            stride: [1, 1],
            padding: [1, 1, 1, 1],
            dilation: [1, 1],
            // 32 channels: the upper half of each tap's word is padding (0).
            weight: (0..64 * 9).map(|_| rng.next() & 0xffff_ffff).collect(),
            output: Output::SignBits {
                threshold: Some((0..64).map(|_| (rng.next() % 41) as i32 - 20).collect()),
            },
        },
        pool([14, 14, 64]),
        Layer::DenseBin {
            inputs: 3136,
            outputs: 10,
            weight: (0..10 * 49).map(|_| rng.next()).collect(),
            output: Output::Logits {
                scale: vec![1e-2; 10],
                bias: Some(vec![0.0; 10]),
            },
        },
    ];
    let input = InputSpec {
        size: 784,
        scale: 1.0 / 255.0,
        zero_point: 0,
        binarize_at: None,
        shape: Some([28, 28, 1]),
    };
    let model = Model::new(input, layers).unwrap();
    let x: Vec<u8> = (0..1000 * 784).map(|_| rng.next() as u8).collect();
    for kind in KernelKind::available() {
        let rows = 256;
        let mut ws = model.workspace(rows);
        let runs = if kind == KernelKind::Scalar { 3 } else { 15 };
        let t = median(runs, || {
            black_box(
                model
                    .run_with(kind, &mut ws, black_box(&x[..rows * 784]), rows)
                    .unwrap(),
            );
        });
        println!(
            "binary cnn-small batch {rows}, 1 thread, {:>10}: {:8.1} k samples/s",
            kind.name(),
            rows as f64 / t / 1e3
        );
    }
    for threads in [1, 2] {
        let rows = 1000;
        let t = median(21, || {
            black_box(model.predict(&x[..rows * 784], rows, threads).unwrap());
        });
        println!(
            "binary cnn-small batch {rows}, {threads} thread(s): {:8.1} k samples/s",
            rows as f64 / t / 1e3
        );
    }
}

/// A random "cnn-small": 28×28×1 → conv 32 3×3 same (relu_u8) → maxpool 2 → conv 64 3×3 same
/// (relu_u8) → maxpool 2 → dense_i8 3136 → 10 logits.
fn cnn_small(rng: &mut Rng) {
    let conv = |rng: &mut Rng, in_shape: [usize; 3], out: usize| {
        let patch = 9 * in_shape[2];
        Layer::Conv2dI8 {
            in_shape,
            out_channels: out,
            kernel: [3, 3],
            stride: [1, 1],
            padding: [1, 1, 1, 1],
            dilation: [1, 1],
            groups: 1,
            weight: (0..out * patch).map(|_| rng.i8()).collect(),
            bias: (0..out).map(|_| (rng.next() % 2001) as i32 - 1000).collect(),
            input_zero_point: 0,
            output: relu(out, patch),
        }
    };
    let pool = |in_shape| Layer::MaxPoolU8 {
        in_shape,
        kernel: [2, 2],
        stride: [2, 2],
        padding: [0; 4],
    };
    let layers = vec![
        conv(rng, [28, 28, 1], 32),
        pool([28, 28, 32]),
        conv(rng, [14, 14, 32], 64),
        pool([14, 14, 64]),
        dense(
            rng,
            3136,
            10,
            Output::Logits {
                scale: vec![1e-4; 10],
                bias: None,
            },
        ),
    ];
    let input = InputSpec {
        size: 784,
        scale: 1.0 / 255.0,
        zero_point: 0,
        binarize_at: None,
        shape: Some([28, 28, 1]),
    };
    let model = Model::new(input, layers).unwrap();
    let macs = 28 * 28 * 32 * 9 + 14 * 14 * 64 * 288 + 3136 * 10;
    let x: Vec<u8> = (0..1000 * 784).map(|_| rng.next() as u8).collect();
    for kind in KernelKind::available() {
        let rows = 256;
        let mut ws = model.workspace(rows);
        let runs = if kind == KernelKind::Scalar { 3 } else { 15 };
        let t = median(runs, || {
            black_box(
                model
                    .run_with(kind, &mut ws, black_box(&x[..rows * 784]), rows)
                    .unwrap(),
            );
        });
        println!(
            "cnn-small batch {rows}, 1 thread, {:>10}: {:8.1} k samples/s ({:.0} GOP/s)",
            kind.name(),
            rows as f64 / t / 1e3,
            2.0 * (macs * rows) as f64 / t / 1e9
        );
    }
    for rows in [256, 1000] {
        for threads in [1, 2] {
            let t = median(21, || {
                black_box(model.predict(&x[..rows * 784], rows, threads).unwrap());
            });
            println!(
                "cnn-small batch {rows}, {threads} thread(s): {:8.1} k samples/s",
                rows as f64 / t / 1e3
            );
        }
    }
    // Batch 1: one sample cannot be split over threads (pieces are whole samples), so 2 threads
    // run it on the caller alone; `predict` also builds a workspace per call, `run` reuses one.
    for threads in [1, 2] {
        let reps = 2000;
        let t = median(9, || {
            for r in 0..reps {
                let s = (r % 1000) * 784;
                black_box(model.predict(black_box(&x[s..s + 784]), 1, threads).unwrap());
            }
        }) / reps as f64;
        println!(
            "cnn-small batch 1 (predict), {threads} thread(s): {:8.1} k samples/s ({:.1} µs)",
            1.0 / t / 1e3,
            t * 1e6
        );
    }
    let mut ws = model.workspace(1);
    let reps = 2000;
    let t = median(9, || {
        for r in 0..reps {
            let s = (r % 1000) * 784;
            black_box(model.run(&mut ws, black_box(&x[s..s + 784]), 1).unwrap());
        }
    }) / reps as f64;
    println!("cnn-small batch 1 (run, reused workspace): {:.1} µs", t * 1e6);
    // The pooling kernels alone, on the activations cnn-small pools (256 samples).
    let rows = 256;
    for (shape, name) in [([28usize, 28, 32], "28x28x32"), ([14, 14, 64], "14x14x64")] {
        let win = Window {
            in_shape: shape,
            kernel: [2, 2],
            stride: [2, 2],
            padding: [0; 4],
            dilation: [1, 1],
        };
        let size: usize = shape.iter().product();
        let a: Vec<u8> = (0..rows * size).map(|_| rng.next() as u8).collect();
        let mut y = vec![0u8; rows * size / 4];
        let t = median(15, || {
            pool::maxpool_u8(
                &win,
                [shape[0] / 2, shape[1] / 2],
                black_box(&a),
                size,
                rows,
                &mut y,
                size / 4,
            );
        });
        println!("maxpool_u8 2x2 on {name}: {:.2} µs per sample", t / rows as f64 * 1e6);
    }
}
