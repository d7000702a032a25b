//! `qmomentum compare`: fp32, PTQ and QAT at several bit widths and seeds, one table.

use crate::plot;
use crate::DataArgs;
use anyhow::{Context, Result};
use clap::Args;
use qmomentum::config::TrainConfig;
use qmomentum::data::Dataset;
use qmomentum::quant::ptq::{quantize_float_model, Calibration};
use qmomentum::quant::Scheme;
use qmomentum::train::{evaluate, Trainer};
use std::fmt::Write as _;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct CompareArgs {
    #[command(flatten)]
    data: DataArgs,
    /// QAT schemes to train (fp32 is always trained: it is the reference and the PTQ source).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "w8a8,w4a8,w4a4,w2a2,ternary,binary,binary-all"
    )]
    schemes: Vec<String>,
    /// PTQ schemes applied to each fp32 model.
    #[arg(long, value_delimiter = ',', default_value = "w8a8,w4a8")]
    ptq: Vec<String>,
    /// Seeds.
    #[arg(long, value_delimiter = ',', default_value = "0,1,2")]
    seeds: Vec<u64>,
    /// Epochs per training run.
    #[arg(long, default_value_t = 10)]
    epochs: usize,
    /// Learning rate of every run (momentum 0.9, batch 128, lr inside the velocity).
    #[arg(long, default_value_t = 0.01)]
    lr: f32,
    /// A base config file (optimizer, model) for every run.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Output folder for compare.md, compare.json and compare.png.
    #[arg(long, default_value = "runs/compare")]
    out: PathBuf,
}

struct Row {
    name: String,
    method: &'static str,
    accs: Vec<f32>,
    epoch_s: Vec<f64>,
}

fn mean_std(v: &[f32]) -> (f32, f32) {
    let n = v.len().max(1) as f32;
    let m = v.iter().sum::<f32>() / n;
    let var = v.iter().map(|x| (x - m).powi(2)).sum::<f32>() / (v.len().saturating_sub(1).max(1)) as f32;
    (m, var.sqrt())
}

fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn train_one(
    base: &TrainConfig,
    scheme: Scheme,
    seed: u64,
    train: &Dataset,
    test: &Dataset,
) -> Result<(Trainer, f32, Vec<f64>)> {
    let mut c = base.clone();
    c.quant = scheme;
    c.seed = seed;
    let mut t = Trainer::new(c)?;
    t.fit(train, None, |_, _| {})?;
    let (_, acc) = t.evaluate(test)?;
    let secs: Vec<f64> = t.history.epochs.iter().skip(1).map(|r| r.seconds).collect();
    Ok((t, acc, secs))
}

pub fn run(a: CompareArgs) -> Result<()> {
    std::fs::create_dir_all(&a.out).with_context(|| format!("{}: cannot create", a.out.display()))?;
    let (train, test) = Dataset::load_mnist_dir(&a.data.data)?;
    let mut base = match &a.config {
        Some(p) => TrainConfig::from_toml_file(p)?,
        None => TrainConfig::default(),
    };
    base.epochs = a.epochs;
    base.optimizer.lr = a.lr;
    base.validate()?;
    let qat: Vec<Scheme> = a.schemes.iter().map(|s| s.parse()).collect::<qmomentum::Result<_>>()?;
    let ptq: Vec<Scheme> = a.ptq.iter().map(|s| s.parse()).collect::<qmomentum::Result<_>>()?;
    let mut rows = vec![Row {
        name: "fp32".into(),
        method: "float",
        accs: vec![],
        epoch_s: vec![],
    }];
    for s in &ptq {
        rows.push(Row {
            name: s.to_string(),
            method: "PTQ (min-max, 10 batches)",
            accs: vec![],
            epoch_s: vec![],
        });
    }
    for s in &qat {
        rows.push(Row {
            name: s.to_string(),
            method: "QAT",
            accs: vec![],
            epoch_s: vec![],
        });
    }
    for &seed in &a.seeds {
        let (fp, acc, secs) = train_one(&base, Scheme::Fp32, seed, &train, &test)?;
        println!("seed {seed}: fp32 {acc:.4}");
        rows[0].accs.push(acc);
        rows[0].epoch_s.extend(secs);
        for (i, s) in ptq.iter().enumerate() {
            let mut q = quantize_float_model(&fp.model, &base.model, *s, &train, 10, 128, Calibration::MinMax)?;
            let (_, acc) = evaluate(&mut q, &test)?;
            println!("seed {seed}: PTQ {s} {acc:.4}");
            rows[1 + i].accs.push(acc);
        }
        for (i, s) in qat.iter().enumerate() {
            let (_, acc, secs) = train_one(&base, *s, seed, &train, &test)?;
            println!("seed {seed}: QAT {s} {acc:.4}");
            let r = &mut rows[1 + ptq.len() + i];
            r.accs.push(acc);
            r.epoch_s.extend(secs);
        }
    }
    let (fp_mean, _) = mean_std(&rows[0].accs);
    let fp_epoch = median(&mut rows[0].epoch_s.clone());
    let mut md = String::new();
    let o = &base.optimizer;
    writeln!(
        md,
        "Fashion-MNIST test accuracy, MLP 784-128-64-10, momentum {} (lr inside the velocity), lr {}, batch {}, {} epochs, seeds {:?}. \
         Low-bit presets keep the first and last layers' weights at 8 bits; binary = Bop (γ {:?}) on the ±1 weights of layers 2–3 with sign activations, layer 1 int8.\n",
        o.momentum, o.lr, base.batch_size, base.epochs, a.seeds, o.binary
    )?;
    writeln!(
        md,
        "| scheme | method | test accuracy (mean ± std) | Δ vs fp32 (points) | epoch s (median) | epoch time / fp32 |"
    )?;
    writeln!(md, "|---|---|---|---|---|---|")?;
    let mut bars = Vec::new();
    let mut json = Vec::new();
    for r in &mut rows {
        let (m, s) = mean_std(&r.accs);
        let ep = median(&mut r.epoch_s);
        let (ep_s, ratio) = if ep.is_finite() {
            (format!("{ep:.3}"), format!("{:.2}×", ep / fp_epoch))
        } else {
            ("–".into(), "–".into())
        };
        writeln!(
            md,
            "| {} | {} | {:.4} ± {:.4} | {:+.2} | {} | {} |",
            r.name,
            r.method,
            m,
            s,
            (m - fp_mean) * 100.0,
            ep_s,
            ratio
        )?;
        bars.push((
            format!(
                "{} {}",
                r.name,
                if r.method == "QAT" {
                    "QAT"
                } else if r.method == "float" {
                    ""
                } else {
                    "PTQ"
                }
            ),
            m,
            s,
        ));
        json.push(serde_json::json!({"scheme": r.name, "method": r.method, "accuracies": r.accs, "mean": m, "std": s, "epoch_seconds_median": ep}));
    }
    print!("{md}");
    let mdp = a.out.join("compare.md");
    qmomentum::checkpoint::write_atomic(&mdp, md.as_bytes())?;
    qmomentum::checkpoint::write_atomic(
        &a.out.join("compare.json"),
        serde_json::to_string_pretty(&json)?.as_bytes(),
    )?;
    let png = a.out.join("compare.png");
    plot::bars(
        &bars,
        &png,
        "Fashion-MNIST test accuracy by scheme (mean ± std over seeds)",
        "test accuracy",
    )?;
    println!("wrote {}, {}", mdp.display(), png.display());
    Ok(())
}
