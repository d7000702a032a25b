//! `qmomentum bench train` and `qmomentum bench infer`.
//!
//! Everything compared is run in the same process, one after the other, so the ratios are
//! side by side on the same machine state; each figure is a median.

use crate::DataArgs;
use anyhow::Result;
use clap::{Args, Subcommand};
use qmomentum::config::TrainConfig;
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
    /// Under `mpirun -np N` (build with `--features mpi`): time of one gradient allreduce per
    /// buffer size, with MPI_Allreduce and with the rank-order sum; rank 0 prints a table.
    Allreduce(AllreduceBench),
    /// (internal) time one integer model in this fresh process; prints JSON.
    #[command(hide = true)]
    Runtime(crate::deploy::RuntimeTiming),
}

#[derive(Args, Debug)]
struct TrainBench {
    #[command(flatten)]
    data: DataArgs,
    /// Epochs per configuration, at least 2 (the first is reported separately as warm-up).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(2..=1000))]
    epochs: u16,
    /// Schemes to time (fp32 first: the reference of the ratios). A scheme ending in `-notrack`
    /// runs without oscillation tracking (`w8a8,w8a8-notrack` measures what tracking costs).
    #[arg(long, value_delimiter = ',', default_value = "fp32,w8a8,w4a4,binary")]
    schemes: Vec<String>,
    /// A model by name: mlp | cnn-small | lenet5.
    #[arg(long, default_value = "mlp")]
    model: String,
    /// Cores per step (1 or 2).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=2))]
    threads: u16,
    /// Rounds: the schemes run interleaved this many times; medians pool all rounds.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..))]
    rounds: u16,
    /// Peak GFLOP/s the % column divides by [default: measured here at start, with an FMA loop of
    /// the widest width on --threads threads].
    #[arg(long)]
    peak_gflops: Option<f64>,
}

#[derive(Args, Debug)]
struct AllreduceBench {
    /// Buffer sizes in bytes (f32 values): by default the design document's MLP gradient
    /// (109,386 parameters = 437,544 B), cnn-small's (50,378 = 201,512 B) and a range around them.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "4096,65536,201512,437544,1048576,16777216"
    )]
    bytes: Vec<usize>,
    /// Timed calls per size and mode (after 10 untimed ones); the median is reported.
    #[arg(long, default_value_t = 200)]
    calls: usize,
}

#[cfg(feature = "mpi")]
fn allreduce(b: AllreduceBench) -> Result<()> {
    use qmomentum::distributed::mpi::{MpiCollective, Reduction};
    use qmomentum::distributed::Collective;
    let mut rows = Vec::new();
    // One MPI initialisation per process: the two modes share the world communicator.
    let mut c = MpiCollective::init(Reduction::Mpi)?;
    let n = c.size();
    for mode in [Reduction::Mpi, Reduction::RankOrder] {
        c.set_reduction(mode);
        for &bytes in &b.bytes {
            let mut buf = vec![1.0f32; bytes.div_ceil(4)];
            let mut times = Vec::with_capacity(b.calls);
            for i in 0..b.calls + 10 {
                c.barrier();
                let t = std::time::Instant::now();
                c.sum_f32(&mut buf)?;
                if i >= 10 {
                    times.push(t.elapsed().as_secs_f64());
                }
                buf.iter_mut().for_each(|v| *v = 1.0);
            }
            times.sort_by(f64::total_cmp);
            let med = times[times.len() / 2];
            let p90 = times[times.len() * 9 / 10];
            rows.push((mode, bytes, med, p90));
        }
    }
    if c.rank() == 0 {
        outln!(
            "allreduce of f32 gradients on {n} rank(s) (median of {} calls, each after a barrier)",
            b.calls
        )?;
        outln!("| bytes | reduction | median µs | p90 µs | bus GB/s (2(N−1)/N · bytes / t) |")?;
        outln!("|---:|---|---:|---:|---:|")?;
        for (mode, bytes, med, p90) in rows {
            let bus = 2.0 * (n as f64 - 1.0) / n as f64 * bytes as f64 / med / 1e9;
            outln!(
                "| {bytes} | {} | {:.1} | {:.1} | {bus:.2} |",
                match mode {
                    Reduction::Mpi => "MPI_Allreduce",
                    Reduction::RankOrder => "rank order",
                },
                med * 1e6,
                p90 * 1e6
            )?;
        }
    }
    drop(c);
    Ok(())
}

#[cfg(not(feature = "mpi"))]
fn allreduce(_b: AllreduceBench) -> Result<()> {
    anyhow::bail!(
        "bench allreduce needs a build with MPI support: cargo build --release -p qmomentum-cli --features mpi, then mpirun -np N qmomentum bench allreduce"
    )
}

pub fn run(a: BenchArgs) -> Result<()> {
    match a.what {
        BenchWhat::Allreduce(b) => allreduce(b),
        BenchWhat::Train(b) => train(b),
        BenchWhat::Infer(b) => crate::deploy::bench_infer(b),
        BenchWhat::Runtime(r) => crate::deploy::runtime_timing(r),
    }
}

/// FLOPs of the matrix products of one epoch: forward `2·MACs` per sample for every layer with
/// weights (dense and conv, from the config's plan), the weight gradients as much again, and the
/// input gradients of every such layer but the first.
pub fn train_flops(t: &Trainer, samples: usize) -> f64 {
    let macs: Vec<usize> = t
        .config
        .model
        .plan()
        .map(|p| {
            p.iter()
                .filter(|l| !l.params.is_empty() && l.macs > 0)
                .map(|l| l.macs)
                .collect()
        })
        .unwrap_or_default();
    let fwd: usize = macs.iter().map(|m| 2 * m).sum();
    let dx: usize = macs.iter().skip(1).map(|m| 2 * m).sum();
    (samples * (2 * fwd + dx)) as f64
}

fn train(b: TrainBench) -> Result<()> {
    let peak = match b.peak_gflops {
        Some(p) if (0.1..=1e7).contains(&p) => (p, "given with --peak-gflops".to_string()),
        Some(p) => anyhow::bail!("--peak-gflops {p}: must be a number of GFLOP/s in [0.1, 10000000]"),
        None => {
            let (p1, isa) = crate::peak::measure(1);
            let (p, _) = crate::peak::measure(b.threads as usize);
            (
                p,
                format!(
                    "{isa} measured here: {p1:.0} GFLOP/s on 1 thread, {p:.0} on {}",
                    b.threads
                ),
            )
        }
    };
    let model = qmomentum::config::ModelConfig::named(&b.model)?;
    let (_, train, _) = b.data.load()?;
    // (scheme, oscillation tracking on)
    let schemes: Vec<(Scheme, bool)> = b
        .schemes
        .iter()
        .map(|s| match s.strip_suffix("-notrack") {
            Some(q) => q.parse().map(|q| (q, false)),
            None => s.parse().map(|q| (q, true)),
        })
        .collect::<qmomentum::Result<_>>()?;
    let names: Vec<String> = schemes
        .iter()
        .map(|(s, track)| if *track { s.to_string() } else { format!("{s}-notrack") })
        .collect();
    for (i, s) in names.iter().enumerate() {
        if names[..i].contains(s) {
            anyhow::bail!("--schemes: {s} is listed twice");
        }
    }
    outln!(
        "bench train: {}, {} training samples, batch 128, momentum 0.9, {} threads; \
         {} rounds of [{}] interleaved, {} epochs each; median over rounds of epochs 2..; peak {:.0} GFLOP/s ({})",
        model.summary(),
        train.len(),
        b.threads,
        b.rounds,
        names.join(", "),
        b.epochs,
        peak.0,
        peak.1
    )?;
    let mut epochs: Vec<Vec<f64>> = vec![Vec::new(); schemes.len()];
    let mut first: Vec<Vec<f64>> = vec![Vec::new(); schemes.len()];
    // Tracking's share of each epoch, timed where it runs (the epoch-time difference against a
    // `-notrack` scheme is the other measure; this one is not at the mercy of the machine's noise).
    let mut tracking: Vec<Vec<f64>> = vec![Vec::new(); schemes.len()];
    let mut flops = 0.0;
    for _ in 0..b.rounds {
        for (i, &(scheme, track)) in schemes.iter().enumerate() {
            let mut cfg = TrainConfig {
                model: model.clone(),
                epochs: b.epochs as usize,
                quant: scheme,
                threads: b.threads as usize,
                optimizer: qmomentum::optim::OptimizerConfig {
                    lr: 0.01,
                    ..Default::default()
                },
                ..Default::default()
            };
            cfg.oscillation.track = track;
            let mut t = Trainer::new(cfg)?;
            t.fit(&train, None, |_, _| {})?;
            first[i].extend(t.history.epochs.first().map(|r| r.seconds));
            epochs[i].extend(t.history.epochs.iter().skip(1).map(|r| r.seconds));
            tracking[i].extend(
                t.history
                    .epochs
                    .iter()
                    .skip(1)
                    .filter_map(|r| r.tracking_seconds.map(|x| x / r.seconds.max(1e-9))),
            );
            flops = train_flops(&t, train.len());
        }
    }
    let med = crate::deploy::median;
    outln!(
        "| scheme | epoch 1 s | median epoch s | samples/s | GFLOP/s (matmul) | % of {:.0} GFLOP/s peak | epoch / fp32 | tracking, % of epoch |",
        peak.0
    )?;
    outln!("|---|---|---|---|---|---|---|---|")?;
    let base = med(epochs[0].clone());
    for (i, s) in names.iter().enumerate() {
        let m = med(epochs[i].clone());
        let f = med(first[i].clone());
        let gf = flops / m / 1e9;
        let tr = if tracking[i].is_empty() {
            "–".to_string()
        } else {
            format!("{:.1} %", 100.0 * med(tracking[i].clone()))
        };
        outln!(
            "| {s} | {f:.3} | {m:.3} | {:.0} | {gf:.1} | {:.0} % | {:.2}× | {tr} |",
            train.len() as f64 / m,
            100.0 * gf / peak.0,
            m / base
        )?;
    }
    Ok(())
}
