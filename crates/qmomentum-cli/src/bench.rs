//! `qmomentum bench train` and `qmomentum bench infer`.
//!
//! Everything compared is run in the same process, one after the other, so the ratios are
//! side by side on the same machine state; each figure is a median.

use crate::DataArgs;
use anyhow::Result;
use clap::{Args, Subcommand};
use qmomentum::config::TrainConfig;
use qmomentum::data::Dataset;
use qmomentum::quant::Scheme;
use qmomentum::train::Trainer;

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    what: BenchWhat,
}

#[derive(Subcommand, Debug)]
enum BenchWhat {
    /// Epoch time, samples/s, GFLOP/s and % of peak of the design document's MLP (fp32 and QAT).
    Train(TrainBench),
    /// Batch-1 latency and batch-10000 throughput: our f32 path, the int8 and the binary runtime.
    Infer(crate::deploy::InferBench),
    /// (internal) time one integer model in this fresh process; prints JSON.
    #[command(hide = true)]
    Runtime(crate::deploy::RuntimeTiming),
}

#[derive(Args, Debug)]
struct TrainBench {
    #[command(flatten)]
    data: DataArgs,
    /// Epochs per configuration (the first is reported separately as warm-up).
    #[arg(long, default_value_t = 4)]
    epochs: usize,
    /// Schemes to time (fp32 first: the reference of the ratios).
    #[arg(long, value_delimiter = ',', default_value = "fp32,w8a8,w4a4,binary")]
    schemes: Vec<String>,
    /// Cores per step.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Rounds: the schemes run interleaved this many times; medians pool all rounds.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Peak GFLOP/s the % column divides by (measured here: 2 cores × ~113 FMA GFLOP/s).
    #[arg(long, default_value_t = 227.0)]
    peak_gflops: f64,
}

pub fn run(a: BenchArgs) -> Result<()> {
    match a.what {
        BenchWhat::Train(b) => train(b),
        BenchWhat::Infer(b) => crate::deploy::bench_infer(b),
        BenchWhat::Runtime(r) => crate::deploy::runtime_timing(r),
    }
}

/// FLOPs of one epoch: forward `2·Σ in·out` per sample, backward `2·Σ in·out` for the weight
/// gradients plus `2·in·out` for the input gradients of every layer but the first.
pub fn train_flops(t: &Trainer, samples: usize) -> f64 {
    let dense: Vec<_> = t.model.dense().map(|d| (d.inputs, d.outputs)).collect();
    let fwd: usize = dense.iter().map(|(i, o)| 2 * i * o).sum();
    let dx: usize = dense.iter().skip(1).map(|(i, o)| 2 * i * o).sum();
    (samples * (2 * fwd + dx)) as f64
}

fn train(b: TrainBench) -> Result<()> {
    let (train, _) = Dataset::load_mnist_dir(&b.data.data)?;
    println!(
        "bench train: MLP 784-128-64-10, Fashion-MNIST {} samples, batch 128, momentum 0.9, {} threads; \
         {} rounds of {:?} interleaved, {} epochs each; median over rounds of epochs 2..",
        train.len(),
        b.threads,
        b.rounds,
        b.schemes,
        b.epochs
    );
    let schemes: Vec<Scheme> = b.schemes.iter().map(|s| s.parse()).collect::<qmomentum::Result<_>>()?;
    let mut epochs: Vec<Vec<f64>> = vec![Vec::new(); schemes.len()];
    let mut first: Vec<Vec<f64>> = vec![Vec::new(); schemes.len()];
    let mut flops = 0.0;
    for _ in 0..b.rounds.max(1) {
        for (i, &scheme) in schemes.iter().enumerate() {
            let cfg = TrainConfig {
                epochs: b.epochs,
                quant: scheme,
                threads: b.threads,
                optimizer: qmomentum::optim::OptimizerConfig {
                    lr: 0.01,
                    ..Default::default()
                },
                ..Default::default()
            };
            let mut t = Trainer::new(cfg)?;
            t.fit(&train, None, |_, _| {})?;
            first[i].push(t.history.epochs[0].seconds);
            epochs[i].extend(t.history.epochs.iter().skip(1).map(|r| r.seconds));
            flops = train_flops(&t, train.len());
        }
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    println!(
        "| scheme | epoch 1 s | median epoch s | samples/s | GFLOP/s (matmul) | % of {:.0} GFLOP/s peak | epoch / fp32 |",
        b.peak_gflops
    );
    println!("|---|---|---|---|---|---|---|");
    let base = med(&mut epochs[0].clone());
    for (i, s) in schemes.iter().enumerate() {
        let m = med(&mut epochs[i]);
        let f = med(&mut first[i]);
        let gf = flops / m / 1e9;
        println!(
            "| {s} | {f:.3} | {m:.3} | {:.0} | {gf:.1} | {:.0} % | {:.2}× |",
            train.len() as f64 / m,
            100.0 * gf / b.peak_gflops,
            m / base
        );
    }
    Ok(())
}
