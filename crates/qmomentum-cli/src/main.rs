//! `qmomentum`: train, quantize, export and run quantized networks from the command line.

// First: its `outln!` macro is used by the modules below.
#[macro_use]
mod output;
mod bench;
mod compare;
mod deploy;
mod distributed;
mod info;
mod inputs;
mod lock;
mod peak;
mod plot;
mod predict;
mod sweep;
mod torch_io;
mod train_cmd;

use clap::{Parser, Subcommand};

pub use inputs::DataArgs;

/// Train quantized neural networks with the Momentum optimizer family; run them on integers.
#[derive(Parser, Debug)]
#[command(name = "qmomentum", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// `allow_negative_numbers`: `--lr -1` reaches the validation (which names the field and the
// rule) instead of clap's "unexpected argument '-1'".
#[derive(Subcommand, Debug)]
enum Command {
    /// Train a model (the design document's MLP on Fashion-MNIST by default).
    #[command(allow_negative_numbers = true)]
    Train(Box<train_cmd::TrainArgs>),
    /// Loss and accuracy of a checkpoint or an integer model (.qmm) on the test set.
    #[command(allow_negative_numbers = true)]
    Evaluate(predict::EvalArgs),
    /// Class predictions of a checkpoint or an integer model: for image files, folders of images,
    /// .npy arrays, or the test set (CSV or JSON).
    #[command(allow_negative_numbers = true)]
    Predict(predict::PredictArgs),
    /// What a checkpoint or an integer model file holds.
    Info(info::InfoArgs),
    /// Post-training quantization of a float checkpoint (optionally followed by QAT fine-tuning).
    #[command(allow_negative_numbers = true)]
    Quantize(deploy::QuantizeArgs),
    /// Write the integer model file that `qmomentum-runtime` runs (`--format qmm`), an ONNX model
    /// (`--format onnx`) or a PyTorch state_dict (`--format torch`).
    Export(deploy::ExportArgs),
    /// Read a PyTorch state_dict (safetensors) into a checkpoint, for the architecture of a config.
    Import(torch_io::ImportArgs),
    /// Run an exported integer model on the test set: accuracy, samples/s.
    #[command(allow_negative_numbers = true)]
    Infer(deploy::InferArgs),
    /// Train or evaluate fp32, PTQ and QAT at several bit widths and seeds; markdown + PNG.
    #[command(allow_negative_numbers = true)]
    Compare(compare::CompareArgs),
    /// Benchmarks: `bench train` (epoch time, GFLOP/s against the peak measured here) and
    /// `bench infer` (latency, throughput).
    #[command(allow_negative_numbers = true)]
    Bench(bench::BenchArgs),
    /// A grid of training runs (optimizer × momentum × lr × batch × bits × oscillation control ×
    /// seeds), in parallel and resumable: results.csv, summary.md, heat maps.
    Sweep(sweep::SweepArgs),
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
        Command::Train(a) => train_cmd::run(*a),
        Command::Evaluate(a) => predict::evaluate(a),
        Command::Predict(a) => predict::predict(a),
        Command::Info(a) => info::run(a),
        Command::Quantize(a) => deploy::quantize(a),
        Command::Export(a) => deploy::export(a),
        Command::Import(a) => torch_io::import(a),
        Command::Infer(a) => deploy::infer(a),
        Command::Compare(a) => compare::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Sweep(a) => sweep::run(a),
    };
    // Data-parallel runs end MPI here: cleanly, or by aborting the job when only this rank failed
    // (after its message is printed).
    if let Err(e) = res {
        let follower = output::FOLLOWER.load(std::sync::atomic::Ordering::Relaxed);
        let quiet = follower && e.downcast_ref::<train_cmd::Interrupted>().is_some();
        if !quiet && e.downcast_ref::<output::ClosedStdout>().is_none() {
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "error: {e:#}");
        }
        distributed::finish(Some(&e));
        if e.downcast_ref::<output::ClosedStdout>().is_some() {
            // The reader went away (`qmomentum info … | head -3`): end quietly, as Unix tools do.
            std::process::exit(141);
        }
        let code = if e.downcast_ref::<train_cmd::Interrupted>().is_some() {
            130
        } else {
            1
        };
        std::process::exit(code);
    }
    distributed::finish(None);
}
