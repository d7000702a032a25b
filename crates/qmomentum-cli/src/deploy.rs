//! `qmomentum quantize` (PTQ), `export`, `infer`, `bench infer`.

use crate::train_cmd::RunFiles;
use crate::DataArgs;
use anyhow::{bail, Context, Result};
use clap::Args;
use qmomentum::data::Dataset;
use qmomentum::quant::ptq::{quantize_float_model, Calibration};
use qmomentum::quant::Scheme;
use qmomentum::train::{evaluate, Trainer};
use std::path::{Path, PathBuf};

#[derive(Args, Debug)]
pub struct QuantizeArgs {
    /// A float checkpoint.
    checkpoint: PathBuf,
    #[command(flatten)]
    data: DataArgs,
    /// Scheme: w8a8 | w4a8 | w4a4 | w2a2 | ternary.
    #[arg(long, default_value = "w8a8")]
    quant: String,
    /// Calibration: minmax | percentile[:P] | mse.
    #[arg(long, default_value = "minmax")]
    calibration: String,
    /// Calibration batches (of 128 training images, in file order).
    #[arg(long, default_value_t = 10)]
    batches: usize,
    /// Then fine-tune with QAT for this many epochs.
    #[arg(long, default_value_t = 0)]
    finetune_epochs: usize,
    /// Learning rate of the fine-tuning.
    #[arg(long)]
    lr: Option<f32>,
    /// Output folder of the quantized checkpoint.
    #[arg(long, default_value = "runs/ptq")]
    out: PathBuf,
}

pub fn quantize(a: QuantizeArgs) -> Result<()> {
    let float = qmomentum::checkpoint::load(&a.checkpoint)?;
    let scheme: Scheme = a.quant.parse()?;
    if scheme == Scheme::Binary || scheme == Scheme::Fp32 {
        bail!("--quant {scheme}: post-training quantization supports w8a8, w4a8, w4a4, w2a2 and ternary (binary networks need training)");
    }
    let method: Calibration = a.calibration.parse()?;
    let (train, test) = Dataset::load_mnist_dir(&a.data.data)?;
    let (_, fp_acc) = evaluate(&mut float.model.clone(), &test)?;
    let q = quantize_float_model(
        &float.model,
        &float.config.model,
        scheme,
        &train,
        a.batches,
        128,
        method,
    )
    .with_context(|| format!("post-training quantization of {}", a.checkpoint.display()))?;
    let mut cfg = float.config.clone();
    cfg.quant = scheme;
    cfg.epochs = a.finetune_epochs.max(1);
    if let Some(lr) = a.lr {
        cfg.optimizer.lr = lr;
    }
    cfg.freeze_observers_after = None;
    let mut t = Trainer::new(cfg)?;
    t.model = q;
    let (_, ptq_acc) = t.evaluate(&test)?;
    println!(
        "fp32 {fp_acc:.4} → PTQ {scheme} ({:?}, {} batches) {ptq_acc:.4}",
        method, a.batches
    );
    std::fs::create_dir_all(&a.out)?;
    let files = RunFiles::new(&a.out);
    if a.finetune_epochs > 0 {
        for d in t.model.dense_mut() {
            if let Some(o) = d.observer.as_mut() {
                o.frozen = false;
            }
        }
        t.fit(&train, None, |_, e| {
            if let qmomentum::train::Event::Epoch(r) = e {
                println!(
                    "QAT fine-tune epoch {} - loss {:.4} - accuracy {:.4}",
                    r.epoch, r.loss, r.accuracy
                );
            }
        })?;
        let (_, acc) = t.evaluate(&test)?;
        println!("after {} epochs of QAT fine-tuning: {acc:.4}", a.finetune_epochs);
    } else {
        t.epoch = t.config.epochs;
    }
    qmomentum::checkpoint::save(&t, &files.checkpoint)?;
    println!("wrote {}", files.checkpoint.display());
    Ok(())
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// A quantized checkpoint (QAT or PTQ).
    checkpoint: PathBuf,
    /// The integer model file to write.
    #[arg(long, short, default_value = "model.qmm")]
    output: PathBuf,
}

pub fn export(a: ExportArgs) -> Result<()> {
    let t = qmomentum::checkpoint::load(&a.checkpoint)?;
    let m =
        qmomentum::export::to_runtime(&t.model).with_context(|| format!("cannot export {}", a.checkpoint.display()))?;
    m.save(&a.output)?;
    let size = std::fs::metadata(&a.output).map(|m| m.len()).unwrap_or(0);
    println!(
        "wrote {} ({} bytes, {} layers, {} scheme)",
        a.output.display(),
        size,
        m.layers().len(),
        t.config.quant
    );
    Ok(())
}

#[derive(Args, Debug)]
pub struct InferArgs {
    /// An exported integer model.
    model: PathBuf,
    #[command(flatten)]
    data: DataArgs,
    /// Threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Write `index,label,predicted` CSV here.
    #[arg(long)]
    output: Option<PathBuf>,
}

pub fn infer(a: InferArgs) -> Result<()> {
    let m = qmomentum_runtime::Model::load(&a.model)?;
    let (_, test) = Dataset::load_mnist_dir(&a.data.data)?;
    if test.features != m.input().size {
        bail!(
            "{}: the model reads {} values per sample, the images in {} have {}",
            a.model.display(),
            m.input().size,
            a.data.data.display(),
            test.features
        );
    }
    let t0 = std::time::Instant::now();
    let pred = m.predict(&test.images, test.len(), a.threads)?;
    let secs = t0.elapsed().as_secs_f64();
    let correct = pred.iter().zip(&test.labels).filter(|(p, &l)| **p == l as u32).count();
    println!(
        "integer inference: accuracy {:.4} on {} samples in {:.1} ms ({:.0} samples/s, {} threads, kernel {:?})",
        correct as f64 / test.len() as f64,
        test.len(),
        secs * 1e3,
        test.len() as f64 / secs,
        a.threads,
        qmomentum_runtime::KernelKind::detect()
    );
    if let Some(p) = a.output {
        let mut s = String::from("index,label,predicted\n");
        for (i, (p, l)) in pred.iter().zip(&test.labels).enumerate() {
            s.push_str(&format!("{i},{l},{p}\n"));
        }
        qmomentum::checkpoint::write_atomic(&p, s.as_bytes())?;
    }
    Ok(())
}

pub fn info_model(path: &Path, bytes: &[u8]) -> Result<()> {
    let m = qmomentum_runtime::Model::from_bytes(bytes).with_context(|| {
        format!(
            "{}: neither a qmomentum checkpoint nor an integer model",
            path.display()
        )
    })?;
    println!("integer model {} ({} bytes)", path.display(), bytes.len());
    println!(
        "  input {} values, scale {} zero point {}",
        m.input().size,
        m.input().scale,
        m.input().zero_point
    );
    for (i, l) in m.layers().iter().enumerate() {
        match l {
            qmomentum_runtime::Layer::DenseI8 {
                inputs,
                outputs,
                output,
                ..
            } => println!("  layer {i}: dense_i8 {inputs}→{outputs} → {}", output_name(output)),
            qmomentum_runtime::Layer::DenseBin {
                inputs,
                outputs,
                output,
                ..
            } => println!("  layer {i}: dense_bin {inputs}→{outputs} → {}", output_name(output)),
        }
    }
    Ok(())
}

fn output_name(o: &qmomentum_runtime::Output) -> &'static str {
    match o {
        qmomentum_runtime::Output::U8 { relu: true, .. } => "relu_u8",
        qmomentum_runtime::Output::U8 { relu: false, .. } => "u8",
        qmomentum_runtime::Output::SignBits { .. } => "sign_bits",
        qmomentum_runtime::Output::Logits { .. } => "logits",
    }
}

#[derive(Args, Debug)]
pub struct InferBench {
    #[command(flatten)]
    data: DataArgs,
    /// An int8 model file (default: a model quantized here from a 1-epoch float run).
    #[arg(long)]
    int8: Option<PathBuf>,
    /// A binary model file (default: a binary model trained here for 1 epoch; a `binary-all`
    /// model is always trained here too).
    #[arg(long)]
    binary: Option<PathBuf>,
    /// Threads for the large batch.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Rounds of the batch-10000 measurement (median reported).
    #[arg(long, default_value_t = 7)]
    rounds: usize,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn quick_model(scheme: Scheme, train: &Dataset) -> Result<Trainer> {
    let cfg = qmomentum::config::TrainConfig {
        epochs: 1,
        quant: scheme,
        optimizer: qmomentum::optim::OptimizerConfig {
            lr: 0.01,
            ..Default::default()
        },
        ..Default::default()
    };
    let mut t = Trainer::new(cfg)?;
    t.fit(train, None, |_, _| {})?;
    Ok(t)
}

pub fn bench_infer(b: InferBench) -> Result<()> {
    use std::time::Instant;
    let (train, test) = Dataset::load_mnist_dir(&b.data.data)?;
    let n = test.len();
    println!("bench infer: MLP 784-128-64-10 on the {n} Fashion-MNIST test images; batch 1 = median of 20000 single-sample calls; batch {n} = median of {} rounds, {} threads", b.rounds, b.threads);
    // Our f32 path.
    let fp = quick_model(Scheme::Fp32, &train)?;
    let mut f32_model = fp.model.clone();
    let x: Vec<f32> = test.images.iter().map(|&p| p as f32 / 255.0).collect();
    let mut lat = Vec::new();
    for i in 0..20000 {
        let r = i % n;
        let t0 = Instant::now();
        let row = f32_model.input_mut(1);
        row.copy_from_slice(&x[r * 784..(r + 1) * 784]);
        let out = f32_model.forward(1, false, true, &mut qmomentum::rng::Rng::new(0, 0));
        std::hint::black_box(out);
        lat.push(t0.elapsed().as_secs_f64());
    }
    let f32_lat = median(lat);
    let mut thr = Vec::new();
    for _ in 0..b.rounds {
        let t0 = Instant::now();
        std::hint::black_box(f32_model.predict(&x, n));
        thr.push(n as f64 / t0.elapsed().as_secs_f64());
    }
    let f32_thr = median(thr);
    let int8 = match &b.int8 {
        Some(p) => qmomentum_runtime::Model::load(p)?,
        None => {
            let q = quantize_float_model(
                &fp.model,
                &fp.config.model,
                Scheme::W8a8,
                &train,
                10,
                128,
                Calibration::MinMax,
            )?;
            qmomentum::export::to_runtime(&q)?
        }
    };
    let binary = match &b.binary {
        Some(p) => qmomentum_runtime::Model::load(p)?,
        None => qmomentum::export::to_runtime(&quick_model(Scheme::Binary, &train)?.model)?,
    };
    let binary_all = qmomentum::export::to_runtime(&quick_model(Scheme::BinaryAll, &train)?.model)?;
    println!(
        "| path | batch-1 latency µs | batch-{n} samples/s ({} threads) | vs f32 | accuracy |",
        b.threads
    );
    println!("|---|---|---|---|---|");
    let f32_acc = evaluate(&mut f32_model, &test)?.1;
    println!(
        "| f32 (qmomentum, gemm) | {:.2} | {:.0} | 1.00× | {:.4} |",
        f32_lat * 1e6,
        f32_thr,
        f32_acc
    );
    // Each integer model is timed in a fresh process of its own (as the peers were), so that
    // nothing of this process — rayon's worker pool in particular, which the f32 path and the
    // training above woke — competes with the runtime's threads.
    let dir = std::env::temp_dir().join(format!("qmomentum-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    for (name, m) in [
        ("int8 (runtime)", &int8),
        ("binary, int8 first layer (runtime)", &binary),
        ("binary-all, binarized input (runtime)", &binary_all),
    ] {
        let path = dir.join("model.qmm");
        m.save(&path)?;
        let out = std::process::Command::new(std::env::current_exe()?)
            .args(["bench", "runtime", "--model"])
            .arg(&path)
            .arg("--data")
            .arg(&b.data.data)
            .args(["--threads", &b.threads.to_string(), "--rounds", &b.rounds.to_string()])
            .output()?;
        if !out.status.success() {
            bail!("timing {name} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let r: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let num = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
        let (lat, thr, acc) = (num("latency_s"), num("samples_per_s"), num("accuracy"));
        println!(
            "| {name} | {:.2} | {:.0} | {:.2}× | {:.4} |",
            lat * 1e6,
            thr,
            thr / f32_thr,
            acc
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    println!("(models trained here for 1 epoch at lr 0.01 unless given: the accuracy column is a sanity check, not the benchmark)");
    Ok(())
}

#[derive(Args, Debug)]
pub struct RuntimeTiming {
    #[arg(long)]
    model: PathBuf,
    #[command(flatten)]
    data: DataArgs,
    #[arg(long, default_value_t = 2)]
    threads: usize,
    #[arg(long, default_value_t = 7)]
    rounds: usize,
}

/// Batch-1 latency (median of 20000 calls) and whole-test-set throughput (median of `rounds`).
pub fn runtime_timing(a: RuntimeTiming) -> Result<()> {
    use std::time::Instant;
    let m = qmomentum_runtime::Model::load(&a.model)?;
    let (_, test) = Dataset::load_mnist_dir(&a.data.data)?;
    let n = test.len();
    let f = test.features;
    let mut ws = m.workspace(1);
    let mut lat = Vec::new();
    for i in 0..20000 {
        let r = i % n;
        let t0 = Instant::now();
        std::hint::black_box(m.run(&mut ws, &test.images[r * f..(r + 1) * f], 1)?);
        lat.push(t0.elapsed().as_secs_f64());
    }
    let mut thr = Vec::new();
    let mut pred = Vec::new();
    for _ in 0..a.rounds {
        let t0 = Instant::now();
        pred = m.predict(&test.images, n, a.threads)?;
        thr.push(n as f64 / t0.elapsed().as_secs_f64());
    }
    let acc = pred.iter().zip(&test.labels).filter(|(p, &l)| **p == l as u32).count() as f64 / n as f64;
    println!(
        "{}",
        serde_json::json!({"latency_s": median(lat), "samples_per_s": median(thr), "accuracy": acc})
    );
    Ok(())
}
