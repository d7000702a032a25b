//! `qmomentum quantize` (PTQ), `export`, `infer`, `bench infer`.

use crate::inputs::ModelFile;
use crate::output::{warn, write_output};
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

/// Refuse a file of the other kind with the command that fits it.
fn checkpoint_only(path: &Path, what: &str) -> Result<qmomentum::train::Trainer> {
    match ModelFile::load(path)? {
        ModelFile::Checkpoint(t) => Ok(*t),
        ModelFile::Integer(_) => bail!(
            "{} is an integer model (.qmm), not a checkpoint: {what} takes a checkpoint (for an integer model use `qmomentum evaluate`, `predict` or `infer`)",
            path.display()
        ),
    }
}

pub fn quantize(a: QuantizeArgs) -> Result<()> {
    let float = checkpoint_only(&a.checkpoint, "quantize")?;
    let scheme: Scheme = a.quant.parse()?;
    if scheme == Scheme::Fp32 {
        bail!(
            "--quant fp32: post-training quantization makes a quantized model; pick w8a8, w4a8, w4a4, w2a2 or ternary"
        );
    }
    if matches!(scheme, Scheme::Binary | Scheme::BinaryAll) {
        bail!("--quant {scheme}: post-training quantization supports w8a8, w4a8, w4a4, w2a2 and ternary (binary networks need training: qmomentum train --quant {scheme})");
    }
    let files = RunFiles::new(&a.out);
    if files.checkpoint.exists() {
        bail!(
            "{} already holds a checkpoint ({}); choose another --out (quantize never replaces a run)",
            a.out.display(),
            files.checkpoint.display()
        );
    }
    let method: Calibration = a.calibration.parse()?;
    let (_, train, test) = a.data.load()?;
    if a.batches == 0 {
        bail!("--batches 0: calibration needs at least one batch");
    }
    let available = train.len().div_ceil(128);
    if train.is_empty() {
        bail!("the training set is empty: there is nothing to calibrate on");
    }
    let batches = if a.batches > available {
        warn(format!(
            "--batches {}: the training set has only {available} batches of 128; calibrating on all of them",
            a.batches
        ));
        available
    } else {
        a.batches
    };
    let (_, fp_acc) = evaluate(&mut float.model.clone(), &test)?;
    let (folded, q) = quantize_float_model(&float.model, &float.config.model, scheme, &train, batches, 128, method)
        .with_context(|| format!("post-training quantization of {}", a.checkpoint.display()))?;
    let mut cfg = float.config.clone();
    cfg.model = folded;
    cfg.quant = scheme;
    cfg.epochs = a.finetune_epochs.max(1);
    cfg.schedule_epochs = None;
    if let Some(lr) = a.lr {
        cfg.optimizer.lr = lr;
    }
    cfg.freeze_observers_after = None;
    let mut t = Trainer::new(cfg)?;
    t.model = q;
    t.data = float.data.clone();
    t.class_names = float.class_names.clone();
    let (_, ptq_acc) = t.evaluate(&test)?;
    outln!("fp32 {fp_acc:.4} → PTQ {scheme} ({method} calibration, {batches} batches of 128) {ptq_acc:.4}")?;
    if a.finetune_epochs > 0 {
        for a in t.model.layers.iter_mut().filter_map(|l| l.act_quant_mut()) {
            if let Some(o) = a.observer.as_mut() {
                o.frozen = false;
            }
        }
        let mut printed = Ok(());
        t.fit(&train, None, |_, e| {
            if let qmomentum::train::Event::Epoch(r) = e {
                if printed.is_ok() {
                    printed = outln!(
                        "QAT fine-tune epoch {} - loss {:.4} - accuracy {:.4}",
                        r.epoch,
                        r.loss,
                        r.accuracy
                    );
                }
            }
        })?;
        printed?;
        let (_, acc) = t.evaluate(&test)?;
        outln!("after {} epochs of QAT fine-tuning: {acc:.4}", a.finetune_epochs)?;
    } else {
        t.epoch = t.config.epochs;
    }
    // The folder is made only now, when there is something to put in it, under the run lock.
    std::fs::create_dir_all(&a.out).with_context(|| format!("{}: cannot create the output folder", a.out.display()))?;
    let _lock = crate::lock::RunLock::acquire(&a.out)?;
    if files.checkpoint.exists() {
        bail!(
            "{} received a checkpoint while this command ran; nothing was written",
            a.out.display()
        );
    }
    qmomentum::checkpoint::save(&t, &files.checkpoint)?;
    outln!("wrote {}", files.checkpoint.display())?;
    Ok(())
}

/// The file `export` writes.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportFormat {
    /// The integer model of `qmomentum-runtime` (`doc/model-format.md`).
    Qmm,
    /// ONNX (opset 21): float operators for a float model, QDQ with integer initializers for a
    /// quantized one (`doc/onnx.md`).
    Onnx,
    /// A PyTorch state_dict in safetensors, with the matching nn.Sequential (any checkpoint;
    /// `doc/pytorch.md`).
    Torch,
}

impl ExportFormat {
    fn default_output(self) -> &'static str {
        match self {
            ExportFormat::Qmm => "model.qmm",
            ExportFormat::Onnx => "model.onnx",
            ExportFormat::Torch => "state_dict.safetensors",
        }
    }
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// A checkpoint: quantized (QAT or PTQ) for `qmm`; float or quantized for `onnx` and `torch`.
    checkpoint: PathBuf,
    /// What to write.
    #[arg(long, value_enum, default_value = "qmm")]
    format: ExportFormat,
    /// The file to write (`-` is stdout) [default: model.qmm, model.onnx with --format onnx,
    /// state_dict.safetensors with --format torch].
    #[arg(long, short)]
    output: Option<PathBuf>,
}

pub fn export(a: ExportArgs) -> Result<()> {
    let output = a.output.clone().unwrap_or_else(|| a.format.default_output().into());
    crate::output::refuse_if_input(&output, &[&a.checkpoint])?;
    let t = checkpoint_only(&a.checkpoint, "export")?;
    let (bytes, what) = match a.format {
        ExportFormat::Torch => return crate::torch_io::export(&t, &a.checkpoint, &output),
        ExportFormat::Qmm => {
            let m = qmomentum::export::to_runtime(&t.model)
                .with_context(|| format!("cannot export {}", a.checkpoint.display()))?
                .with_class_names(t.class_names.clone());
            (m.to_bytes()?, format!("{} layers", m.layers().len()))
        }
        ExportFormat::Onnx => {
            let mut meta = vec![("scheme".to_string(), t.config.quant.to_string())];
            if let Some(names) = &t.class_names {
                meta.push(("class_names".to_string(), serde_json::to_string(names)?));
            }
            let bytes = qmomentum::onnx::to_onnx(&t.model, &meta)
                .with_context(|| format!("cannot export {} to ONNX", a.checkpoint.display()))?;
            (bytes, format!("ONNX opset {}", qmomentum::onnx::OPSET))
        }
    };
    write_output(&output, &bytes)?;
    let msg = format!(
        "wrote {} ({} bytes, {what}, {} scheme)",
        output.display(),
        bytes.len(),
        t.config.quant
    );
    // With the model itself on stdout, the summary goes to stderr.
    if crate::output::is_stdout(&output) {
        eprintln!("{msg}");
        Ok(())
    } else {
        outln!("{msg}")
    }
}

#[derive(Args, Debug)]
pub struct InferArgs {
    /// An exported integer model.
    model: PathBuf,
    #[command(flatten)]
    data: DataArgs,
    /// Threads.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=256))]
    threads: u16,
    /// Write `index,label,predicted` CSV here (`-` is stdout).
    #[arg(long, short)]
    output: Option<PathBuf>,
}

pub fn infer(a: InferArgs) -> Result<()> {
    let m = match ModelFile::load(&a.model)? {
        ModelFile::Integer(m) => *m,
        ModelFile::Checkpoint(_) => bail!(
            "{} is a training checkpoint, not an integer model: `infer` runs integer models. \
             Use `qmomentum evaluate {}` for the checkpoint, or `qmomentum export {} -o model.qmm` first",
            a.model.display(),
            a.model.display(),
            a.model.display()
        ),
    };
    let (dir, test) = a.data.load_test()?;
    if let Some(o) = &a.output {
        let files = qmomentum::data::test_files(&dir);
        let mut inputs: Vec<&Path> = files.iter().map(|p| p.as_path()).collect();
        inputs.push(&a.model);
        crate::output::refuse_if_input(o, &inputs)?;
    }
    if test.features != m.input().size {
        bail!(
            "{}: the model reads {} values per sample, the images in {} have {}",
            a.model.display(),
            m.input().size,
            dir.display(),
            test.features
        );
    }
    let threads = a.threads as usize;
    let t0 = std::time::Instant::now();
    let pred = m.predict(&test.images, test.len(), threads)?;
    let secs = t0.elapsed().as_secs_f64();
    let correct = pred.iter().zip(&test.labels).filter(|(p, &l)| **p == l as u32).count();
    outln!(
        "integer inference: accuracy {:.4} on {} samples in {:.1} ms ({:.0} samples/s, {threads} threads, {} kernels)",
        correct as f64 / test.len() as f64,
        test.len(),
        secs * 1e3,
        test.len() as f64 / secs,
        qmomentum_runtime::KernelKind::detect()
    )?;
    if let Some(p) = a.output {
        let mut s = String::from("index,label,predicted\n");
        for (i, (p, l)) in pred.iter().zip(&test.labels).enumerate() {
            s.push_str(&format!("{i},{l},{p}\n"));
        }
        write_output(&p, s.as_bytes())?;
    }
    Ok(())
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
    /// A model by name: mlp | cnn-small | lenet5.
    #[arg(long, default_value = "mlp")]
    model: String,
    /// Threads for the large batch.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=256))]
    threads: u16,
    /// Rounds of the whole-test-set measurement (median reported).
    #[arg(long, default_value_t = 7, value_parser = clap::value_parser!(u16).range(1..))]
    rounds: u16,
}

/// Median (NaN for no values: the flags' ranges make that unreachable, but never a panic).
pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn quick_model(scheme: Scheme, model: &qmomentum::config::ModelConfig, train: &Dataset) -> Result<Trainer> {
    let cfg = qmomentum::config::TrainConfig {
        model: model.clone(),
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
    let (data_dir, train, test) = b.data.load()?;
    let model = qmomentum::config::ModelConfig::named(&b.model)?;
    let mlp = b.model == "mlp";
    let n = test.len();
    let calls = if mlp { 20000 } else { 2000 };
    outln!(
        "bench infer: {} on the {n} test images of {}; batch 1 = median of {calls} single-sample calls; batch {n} = median of {} rounds, {} threads",
        model.summary(),
        data_dir.display(),
        b.rounds,
        b.threads
    )?;
    // Our f32 path.
    let fp = quick_model(Scheme::Fp32, &model, &train)?;
    let f = test.features;
    let mut f32_model = fp.model.clone();
    let mut x = vec![0.0f32; test.images.len()];
    qmomentum::data::normalise(&test.images, &mut x);
    let mut lat = Vec::new();
    for i in 0..calls {
        let r = i % n;
        let t0 = Instant::now();
        let row = f32_model.input_mut(1);
        row.copy_from_slice(&x[r * f..(r + 1) * f]);
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
            let (_, q) = quantize_float_model(
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
    // Binary models: int8 first layer, then ±1 layers (XNOR-popcount dense or convolution);
    // `binary-all` (binarized pixels) for the MLP only, since the runtime's binary convolutions
    // read bit images that a convolution wrote.
    let mut integer = vec![("int8 (runtime)", int8)];
    let binary = match &b.binary {
        Some(p) => Some(qmomentum_runtime::Model::load(p)?),
        // LeNet-5 average-pools its first layer's outputs, which a binary network cannot do
        // on signs: no binary row then (the reason is printed).
        None => match qmomentum::export::to_runtime(&quick_model(Scheme::Binary, &model, &train)?.model) {
            Ok(m) => Some(m),
            Err(e) => {
                outln!("(no binary row: {e})")?;
                None
            }
        },
    };
    if let Some(m) = binary {
        integer.push(("binary, int8 first layer (runtime)", m));
    }
    if mlp {
        let all = qmomentum::export::to_runtime(&quick_model(Scheme::BinaryAll, &model, &train)?.model)?;
        integer.push(("binary-all, binarized input (runtime)", all));
    }
    outln!(
        "| path | batch-1 latency µs | batch-{n} samples/s ({} threads) | vs f32 | accuracy |",
        b.threads
    )?;
    outln!("|---|---|---|---|---|")?;
    let f32_acc = evaluate(&mut f32_model, &test)?.1;
    outln!(
        "| f32 (qmomentum, gemm) | {:.2} | {:.0} | 1.00× | {:.4} |",
        f32_lat * 1e6,
        f32_thr,
        f32_acc
    )?;
    // Each integer model is timed in a fresh process of its own (as the peers were), so that
    // nothing of this process — rayon's worker pool in particular, which the f32 path and the
    // training above woke — competes with the runtime's threads.
    let dir = std::env::temp_dir().join(format!("qmomentum-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    for (name, m) in &integer {
        let path = dir.join("model.qmm");
        m.save(&path)?;
        let out = std::process::Command::new(std::env::current_exe()?)
            .args(["bench", "runtime", "--model"])
            .arg(&path)
            .arg("--data")
            .arg(&data_dir)
            .args(["--threads", &b.threads.to_string(), "--rounds", &b.rounds.to_string()])
            .output()?;
        if !out.status.success() {
            bail!("timing {name} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let r: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let num = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
        let (lat, thr, acc) = (num("latency_s"), num("samples_per_s"), num("accuracy"));
        outln!(
            "| {name} | {:.2} | {:.0} | {:.2}× | {:.4} |",
            lat * 1e6,
            thr,
            thr / f32_thr,
            acc
        )?;
    }
    let _ = std::fs::remove_dir_all(&dir);
    outln!("(models trained here for 1 epoch at lr 0.01 unless given: the accuracy column is a sanity check, not the benchmark)")?;
    Ok(())
}

#[derive(Args, Debug)]
pub struct RuntimeTiming {
    #[arg(long)]
    model: PathBuf,
    #[command(flatten)]
    data: DataArgs,
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=256))]
    threads: u16,
    #[arg(long, default_value_t = 7, value_parser = clap::value_parser!(u16).range(1..))]
    rounds: u16,
}

/// Batch-1 latency (median of 20000 calls) and whole-test-set throughput (median of `rounds`).
pub fn runtime_timing(a: RuntimeTiming) -> Result<()> {
    use std::time::Instant;
    let m = qmomentum_runtime::Model::load(&a.model)?;
    let (_, test) = a.data.load_test()?;
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
        pred = m.predict(&test.images, n, a.threads as usize)?;
        thr.push(n as f64 / t0.elapsed().as_secs_f64());
    }
    let acc = pred.iter().zip(&test.labels).filter(|(p, &l)| **p == l as u32).count() as f64 / n as f64;
    outln!(
        "{}",
        serde_json::json!({"latency_s": median(lat), "samples_per_s": median(thr), "accuracy": acc})
    )?;
    Ok(())
}
