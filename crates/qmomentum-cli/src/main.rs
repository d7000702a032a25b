//! `qmomentum`: train, quantize, export and run quantized networks from the command line.

mod bench;
mod compare;
mod deploy;
mod lock;
mod plot;
mod train_cmd;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

/// Train quantized neural networks with the Momentum optimizer family; run them on integers.
#[derive(Parser, Debug)]
#[command(name = "qmomentum", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Train a model (the design document's MLP on Fashion-MNIST by default).
    Train(train_cmd::TrainArgs),
    /// Loss and accuracy of a checkpoint on the test set.
    Evaluate(EvalArgs),
    /// Class predictions of a checkpoint for the test images (CSV on stdout or --output).
    Predict(PredictArgs),
    /// What a checkpoint holds.
    Info(InfoArgs),
    /// Post-training quantization of a float checkpoint (optionally followed by QAT fine-tuning).
    Quantize(deploy::QuantizeArgs),
    /// Write the integer model file that `qmomentum-runtime` runs.
    Export(deploy::ExportArgs),
    /// Run an exported integer model on an IDX test set.
    Infer(deploy::InferArgs),
    /// Train or evaluate fp32, PTQ and QAT at several bit widths and seeds; markdown + PNG.
    Compare(compare::CompareArgs),
    /// Benchmarks: `bench train` (epoch time, GFLOP/s) and `bench infer` (latency, throughput).
    Bench(bench::BenchArgs),
}

/// Where the data come from.
#[derive(Args, Debug, Clone, Default)]
pub struct DataArgs {
    /// A folder with the MNIST-family IDX files (train-images-idx3-ubyte[.gz], …).
    #[arg(long, default_value = "data/fashion-mnist")]
    pub data: PathBuf,
}

#[derive(Args, Debug)]
struct EvalArgs {
    /// The checkpoint.
    checkpoint: PathBuf,
    #[command(flatten)]
    data: DataArgs,
}

#[derive(Args, Debug)]
struct PredictArgs {
    /// The checkpoint.
    checkpoint: PathBuf,
    #[command(flatten)]
    data: DataArgs,
    /// Only the first N test images.
    #[arg(long)]
    limit: Option<usize>,
    /// Write the CSV here instead of stdout.
    #[arg(long)]
    output: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct InfoArgs {
    /// The checkpoint (or an exported integer model).
    file: PathBuf,
}

fn main() {
    // A write past a file-size limit (`ulimit -f`) must fail with EFBIG and be reported, not
    // kill the process with SIGXFSZ before it can say anything.
    #[cfg(unix)]
    // SAFETY: setting a signal's disposition to SIG_IGN at start-up, before any thread exists.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    let cli = Cli::parse();
    let res = match cli.command {
        Command::Train(a) => train_cmd::run(a),
        Command::Evaluate(a) => evaluate(a),
        Command::Predict(a) => predict(a),
        Command::Info(a) => info(a),
        Command::Quantize(a) => deploy::quantize(a),
        Command::Export(a) => deploy::export(a),
        Command::Infer(a) => deploy::infer(a),
        Command::Compare(a) => compare::run(a),
        Command::Bench(a) => bench::run(a),
    };
    if let Err(e) = res {
        eprintln!("error: {e:#}");
        let code = if e.downcast_ref::<train_cmd::Interrupted>().is_some() {
            130
        } else {
            1
        };
        std::process::exit(code);
    }
}

fn evaluate(a: EvalArgs) -> Result<()> {
    let mut t = qmomentum::checkpoint::load(&a.checkpoint)?;
    let (_, test) = qmomentum::data::Dataset::load_mnist_dir(&a.data.data)?;
    let (loss, acc) = t.evaluate(&test)?;
    println!(
        "test loss {loss:.4}  accuracy {acc:.4}  ({} samples, {})",
        test.len(),
        a.checkpoint.display()
    );
    Ok(())
}

fn predict(a: PredictArgs) -> Result<()> {
    use std::io::Write;
    let mut t = qmomentum::checkpoint::load(&a.checkpoint)?;
    let (_, test) = qmomentum::data::Dataset::load_mnist_dir(&a.data.data)?;
    if test.features != t.model.input_size {
        anyhow::bail!(
            "{}: the model reads {} values per sample, the images in {} have {}",
            a.checkpoint.display(),
            t.model.input_size,
            a.data.data.display(),
            test.features
        );
    }
    let n = a.limit.unwrap_or(test.len()).min(test.len());
    let idx: Vec<usize> = (0..n).collect();
    let mut x = vec![0.0f32; n * test.features];
    let mut y = vec![0u32; n];
    test.gather_normalised(&idx, &mut x, &mut y);
    let probs = t.model.predict(&x, n);
    let c = t.model.classes();
    let mut out = String::from("index,label,predicted,probability\n");
    let mut pred = Vec::new();
    qmomentum::metrics::argmax_rows(&probs, c, &mut pred);
    for i in 0..n {
        out.push_str(&format!(
            "{i},{},{},{:.5}\n",
            y[i],
            pred[i],
            probs[i * c + pred[i] as usize]
        ));
    }
    match a.output {
        Some(p) => qmomentum::checkpoint::write_atomic(&p, out.as_bytes())?,
        None => std::io::stdout().write_all(out.as_bytes())?,
    }
    Ok(())
}

fn info(a: InfoArgs) -> Result<()> {
    let bytes = std::fs::read(&a.file).map_err(|e| anyhow::anyhow!("{}: {e}", a.file.display()))?;
    if let Ok(meta) = qmomentum::checkpoint::read_meta(&bytes, &a.file) {
        let t = qmomentum::checkpoint::from_bytes(&bytes, &a.file)?;
        println!("checkpoint {}", a.file.display());
        println!(
            "  epochs done    {} of {} (step {} of the next, {} steps in total)",
            meta.epoch, meta.config.epochs, meta.step_in_epoch, meta.global_step
        );
        println!("  quantization   {}", meta.config.quant);
        println!("  optimizer      {:?}", meta.config.optimizer);
        println!("  parameters     {}", t.model.param_count());
        for d in t.model.dense() {
            println!(
                "  layer {}: dense {}→{} {:?}  weights {:?}  activations {:?}{}",
                d.index,
                d.inputs,
                d.outputs,
                d.activation,
                d.quant.weights,
                d.quant.activations.map(|a| a.bits),
                d.output_qparams()
                    .map(|q| format!("  grid scale {:.5} zero point {}", q.scale, q.zero_point))
                    .unwrap_or_default()
            );
        }
        if let Some(last) = meta.history.epochs.last() {
            println!(
                "  last epoch     loss {:.4} accuracy {:.4} val {:?}",
                last.loss, last.accuracy, last.val_accuracy
            );
        }
        return Ok(());
    }
    deploy::info_model(&a.file, &bytes)
}
