//! `qmomentum train`.

use crate::{lock::RunLock, plot, DataArgs};
use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use qmomentum::config::{OnNonFinite, TrainConfig};
use qmomentum::data::Dataset;
use qmomentum::optim::{BinaryOptimizer, Convention, DecayMode, Schedule};
use qmomentum::quant::Scheme;
use qmomentum::train::Trainer;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The run was interrupted (SIGINT) after writing a checkpoint.
#[derive(Debug)]
pub struct Interrupted(pub String);
impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for Interrupted {}

/// Flags mirror the Keras program; a flag overrides the `--config` file, which overrides the
/// defaults (the design document's program).
#[derive(Args, Debug, Clone, Default)]
pub struct TrainArgs {
    #[command(flatten)]
    pub data: DataArgs,
    /// A TOML config file (model, optimizer, quantization, …); see `configs/`.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Output folder (checkpoint, history, plot, lock).
    #[arg(long, default_value = "runs/train")]
    pub out: PathBuf,
    /// Continue the run in --out from its last checkpoint (to the same weights as without the
    /// interruption). Only --epochs may change on resume.
    #[arg(long)]
    pub resume: bool,
    /// Epochs.
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Batch size.
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Learning rate η.
    #[arg(long, visible_alias = "learning-rate")]
    pub lr: Option<f32>,
    /// Momentum μ in [0, 1) (0 = plain SGD).
    #[arg(long)]
    pub momentum: Option<f32>,
    /// Nesterov momentum.
    #[arg(long)]
    pub nesterov: bool,
    /// Dampening τ.
    #[arg(long)]
    pub dampening: Option<f32>,
    /// Where the learning rate enters: `keras` (v ← μv + ηg, θ ← θ − v; the design document)
    /// or `pytorch` (b ← μb + g, θ ← θ − ηb).
    #[arg(long, value_parser = ["keras", "pytorch", "lr_inside", "lr_outside"])]
    pub convention: Option<String>,
    /// Weight decay λ.
    #[arg(long)]
    pub weight_decay: Option<f32>,
    /// Decoupled weight decay (θ ← θ − ηλθ) instead of L2 in the gradient.
    #[arg(long)]
    pub decoupled: bool,
    /// Clip gradient values into [−c, c].
    #[arg(long)]
    pub clip_value: Option<f32>,
    /// Clip the global gradient norm.
    #[arg(long)]
    pub clip_norm: Option<f32>,
    /// Learning-rate schedule: constant | step:EVERY:GAMMA | exp:GAMMA | cosine[:WARMUP_EPOCHS[:MIN_LR]].
    #[arg(long)]
    pub schedule: Option<String>,
    /// Quantization: fp32 | w8a8 | w4a8 | w4a4 | w2a2 | ternary | binary | binary-all.
    #[arg(long)]
    pub quant: Option<String>,
    /// Train binary weights with momentum on latent floats instead of Bop.
    #[arg(long)]
    pub latent_binary: bool,
    /// Bop's adaptivity rate γ.
    #[arg(long)]
    pub bop_gamma: Option<f32>,
    /// Bop's flip threshold τ.
    #[arg(long)]
    pub bop_threshold: Option<f32>,
    /// Freeze activation observers after this many epochs.
    #[arg(long)]
    pub freeze_observers_after: Option<usize>,
    /// Seed of initialisation, shuffling and dropout.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Hold out this fraction of the training set (its end) for validation.
    #[arg(long)]
    pub validation_split: Option<f32>,
    /// Evaluate on the test set after every epoch (as Keras `validation_data`).
    #[arg(long)]
    pub validate_on_test: bool,
    /// Cores per training step (1 or 2).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Also write a checkpoint every N steps.
    #[arg(long)]
    pub checkpoint_every: Option<u64>,
    /// On a NaN/inf loss or gradient: stop (default) or skip the step.
    #[arg(long, value_parser = ["stop", "skip"])]
    pub on_nan: Option<String>,
    /// No progress bar: one line per epoch.
    #[arg(long, short)]
    pub quiet: bool,
    /// Stop after this many steps in total (for tests of interruption; the checkpoint is written).
    #[arg(long, hide = true)]
    pub stop_after_steps: Option<u64>,
}

fn parse_schedule(s: &str) -> Result<Schedule> {
    let parts: Vec<&str> = s.split(':').collect();
    let num = |i: usize, what: &str| -> Result<f32> {
        parts
            .get(i)
            .with_context(|| format!("--schedule {s}: missing {what}"))?
            .parse::<f32>()
            .with_context(|| format!("--schedule {s}: {what} is not a number"))
    };
    Ok(match parts[0] {
        "constant" => Schedule::Constant,
        "step" => Schedule::Step {
            every: num(1, "EVERY")? as usize,
            gamma: num(2, "GAMMA")?,
        },
        "exp" | "exponential" => Schedule::Exponential {
            gamma: num(1, "GAMMA")?,
        },
        "cosine" => Schedule::Cosine {
            warmup_epochs: if parts.len() > 1 { num(1, "WARMUP_EPOCHS")? } else { 0.0 },
            min_lr: if parts.len() > 2 { num(2, "MIN_LR")? } else { 0.0 },
        },
        other => {
            bail!("--schedule {other}: expected constant, step:EVERY:GAMMA, exp:GAMMA or cosine[:WARMUP[:MIN_LR]]")
        }
    })
}

/// The effective configuration: defaults < file < flags.
pub fn build_config(a: &TrainArgs) -> Result<TrainConfig> {
    let mut c = match &a.config {
        Some(p) => TrainConfig::from_toml_file(p)?,
        None => TrainConfig::default(),
    };
    macro_rules! set {
        ($flag:expr, $field:expr) => {
            if let Some(v) = $flag.clone() {
                $field = v;
            }
        };
    }
    set!(a.epochs, c.epochs);
    set!(a.batch_size, c.batch_size);
    set!(a.lr, c.optimizer.lr);
    set!(a.momentum, c.optimizer.momentum);
    set!(a.dampening, c.optimizer.dampening);
    set!(a.weight_decay, c.optimizer.weight_decay);
    set!(a.seed, c.seed);
    set!(a.validation_split, c.validation_split);
    set!(a.threads, c.threads);
    if a.nesterov {
        c.optimizer.nesterov = true;
    }
    if a.decoupled {
        c.optimizer.decay_mode = DecayMode::Decoupled;
    }
    if let Some(v) = a.clip_value {
        c.optimizer.clip_value = Some(v);
    }
    if let Some(v) = a.clip_norm {
        c.optimizer.clip_norm = Some(v);
    }
    if let Some(s) = &a.convention {
        c.optimizer.convention = match s.as_str() {
            "keras" | "lr_inside" => Convention::LrInside,
            _ => Convention::LrOutside,
        };
    }
    if let Some(s) = &a.schedule {
        c.optimizer.schedule = parse_schedule(s)?;
    }
    if let Some(q) = &a.quant {
        c.quant = q.parse::<Scheme>()?;
    }
    if a.latent_binary {
        c.optimizer.binary = BinaryOptimizer::Latent;
    }
    if a.bop_gamma.is_some() || a.bop_threshold.is_some() {
        let (g0, t0) = match c.optimizer.binary {
            BinaryOptimizer::Bop { gamma, threshold } => (gamma, threshold),
            BinaryOptimizer::Latent => (1e-4, 1e-8),
        };
        c.optimizer.binary = BinaryOptimizer::Bop {
            gamma: a.bop_gamma.unwrap_or(g0),
            threshold: a.bop_threshold.unwrap_or(t0),
        };
    }
    if let Some(n) = a.freeze_observers_after {
        c.freeze_observers_after = Some(n);
    }
    if let Some(n) = a.checkpoint_every {
        c.checkpoint.every_steps = n;
    }
    if let Some(s) = &a.on_nan {
        c.on_non_finite = if s == "skip" {
            OnNonFinite::Skip
        } else {
            OnNonFinite::Stop
        };
    }
    c.validate()?;
    Ok(c)
}

/// Paths of a run folder.
pub struct RunFiles {
    pub checkpoint: PathBuf,
    pub history_csv: PathBuf,
    pub history_json: PathBuf,
    pub plot: PathBuf,
    pub config: PathBuf,
    pub result: PathBuf,
}

impl RunFiles {
    pub fn new(out: &Path) -> Self {
        RunFiles {
            checkpoint: out.join("checkpoint.safetensors"),
            history_csv: out.join("history.csv"),
            history_json: out.join("history.json"),
            plot: out.join("curves.png"),
            config: out.join("config.toml"),
            result: out.join("result.json"),
        }
    }
}

fn write_history(t: &Trainer, f: &RunFiles) -> Result<()> {
    use qmomentum::checkpoint::write_atomic;
    write_atomic(&f.history_csv, t.history.to_csv().as_bytes())?;
    write_atomic(&f.history_json, serde_json::to_string_pretty(&t.history)?.as_bytes())?;
    if !t.history.epochs.is_empty() {
        plot::curves(
            &t.history,
            &f.plot,
            &format!(
                "{} — {}",
                t.config.quant,
                f.plot.parent().map(|p| p.display().to_string()).unwrap_or_default()
            ),
        )
        .with_context(|| format!("{}: cannot draw the plot", f.plot.display()))?;
    }
    Ok(())
}

pub fn run(a: TrainArgs) -> Result<()> {
    std::fs::create_dir_all(&a.out).with_context(|| format!("{}: cannot create the output folder", a.out.display()))?;
    let _lock = RunLock::acquire(&a.out)?;
    remove_stale_temporaries(&a.out);
    let files = RunFiles::new(&a.out);
    let mut t = if a.resume {
        if a.config.is_some()
            || a.lr.is_some()
            || a.quant.is_some()
            || a.batch_size.is_some()
            || a.seed.is_some()
            || a.momentum.is_some()
        {
            bail!("--resume continues the run as configured in its checkpoint: only --epochs may change");
        }
        let mut t = qmomentum::checkpoint::load(&files.checkpoint)
            .with_context(|| format!("cannot resume from {}", files.checkpoint.display()))?;
        if let Some(e) = a.epochs {
            t.config.epochs = e;
        }
        t
    } else {
        if files.checkpoint.exists() {
            bail!(
                "{} already holds a checkpoint: pass --resume to continue it, or choose another --out",
                a.out.display()
            );
        }
        let cfg = build_config(&a)?;
        Trainer::new(cfg)?
    };
    qmomentum::checkpoint::write_atomic(&files.config, toml::to_string(&t.config)?.as_bytes())?;
    let (full_train, test) = Dataset::load_mnist_dir(&a.data.data)?;
    let (train, val) = if t.config.validation_split > 0.0 {
        let (tr, v) = full_train.split_validation(t.config.validation_split)?;
        (tr, Some(v))
    } else {
        (full_train, None)
    };
    let validation = if a.validate_on_test { Some(&test) } else { val.as_ref() };

    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        // A second Ctrl-C while the checkpoint is written is ignored; the run ends right after.
        let _ = ctrlc::set_handler(move || stop.store(true, Ordering::SeqCst));
    }
    let fancy = !a.quiet && std::io::stderr().is_terminal();
    let spe = t.steps_per_epoch(train.len());
    let mut bar: Option<ProgressBar> = None;
    if t.epoch == 0 && t.step_in_epoch == 0 {
        println!(
            "training {} on {} ({} samples, {} steps/epoch), {} params, quant {}, {}",
            a.out.display(),
            a.data.data.display(),
            train.len(),
            spe,
            t.model.param_count(),
            t.config.quant,
            describe_opt(&t.config)
        );
    } else {
        println!(
            "resuming {} at epoch {}, step {} of {spe}",
            a.out.display(),
            t.epoch + 1,
            t.step_in_epoch
        );
    }
    let every = t.config.checkpoint.every_steps;
    let (mut run_loss, mut run_n) = (0.0f64, 0u64);
    while !t.finished() {
        if fancy && bar.is_none() {
            let b = ProgressBar::new(spe as u64);
            b.set_style(
                ProgressStyle::with_template("epoch {prefix} [{bar:30}] {pos}/{len} {msg} ({eta})")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
            b.set_prefix(format!("{}/{}", t.epoch + 1, t.config.epochs));
            b.set_position(t.step_in_epoch as u64);
            bar = Some(b);
        }
        let Some(report) = t.step(&train, validation).map_err(|e| {
            if let Some(b) = bar.take() {
                b.abandon();
            }
            anyhow::Error::from(e)
        })?
        else {
            break;
        };
        run_loss += report.loss as f64;
        run_n += 1;
        if let Some(b) = &bar {
            b.inc(1);
            if run_n % 10 == 0 {
                let p = &t.progress;
                b.set_message(format!(
                    "loss {:.4} acc {:.4} {:.0} samples/s",
                    run_loss / run_n as f64,
                    p.correct as f64 / p.seen.max(1) as f64,
                    p.seen as f64 / p.seconds.max(1e-9)
                ));
            }
        }
        let epoch_ended = report.epoch.is_some();
        if let Some(r) = &report.epoch {
            run_loss = 0.0;
            run_n = 0;
            if let Some(b) = bar.take() {
                b.finish_and_clear();
            }
            let val = match (r.val_loss, r.val_accuracy) {
                (Some(l), Some(a)) => format!(" - val_loss {l:.4} - val_accuracy {a:.4}"),
                _ => String::new(),
            };
            let skipped = if r.skipped_steps > 0 {
                format!(" - {} steps skipped (NaN/inf)", r.skipped_steps)
            } else {
                String::new()
            };
            println!(
                "epoch {}/{} - {:.2}s - {:.0} samples/s - loss {:.4} - accuracy {:.4}{val} - lr {:.3e}{skipped}",
                r.epoch, t.config.epochs, r.seconds, r.samples_per_sec, r.loss, r.accuracy, r.lr,
            );
            qmomentum::checkpoint::save(&t, &files.checkpoint)?;
            write_history(&t, &files)?;
        }
        if every > 0 && t.global_step % every == 0 && !epoch_ended {
            qmomentum::checkpoint::save(&t, &files.checkpoint)?;
        }
        let halt = a.stop_after_steps.is_some_and(|n| t.global_step >= n);
        if stop.load(Ordering::SeqCst) || halt {
            if let Some(b) = bar.take() {
                b.abandon();
            }
            if !epoch_ended {
                qmomentum::checkpoint::save(&t, &files.checkpoint)?;
            }
            let msg = format!(
                "interrupted at epoch {}, step {} (global step {}); checkpoint written to {}. Continue with: qmomentum train --out {} --resume",
                t.epoch + 1,
                t.step_in_epoch,
                t.global_step,
                files.checkpoint.display(),
                a.out.display()
            );
            if halt && !stop.load(Ordering::SeqCst) {
                println!("{msg}");
                return Ok(());
            }
            return Err(Interrupted(msg).into());
        }
    }
    let (test_loss, test_acc) = t.evaluate(&test)?;
    println!("test loss {test_loss:.4} - test accuracy {test_acc:.4}");
    let total: f64 = t.history.epochs.iter().map(|r| r.seconds).sum();
    let result = serde_json::json!({
        "test_loss": test_loss,
        "test_accuracy": test_acc,
        "epochs": t.config.epochs,
        "train_seconds": total,
        "quant": t.config.quant.to_string(),
        "seed": t.config.seed,
        "lr": t.config.optimizer.lr,
    });
    qmomentum::checkpoint::write_atomic(&files.result, serde_json::to_string_pretty(&result)?.as_bytes())?;
    println!(
        "wrote {}, {}, {}, {}",
        files.checkpoint.display(),
        files.history_csv.display(),
        files.plot.display(),
        files.result.display()
    );
    Ok(())
}

/// Temporary files of atomic writes that a killed run left behind (`.NAME.tmp.PID`); safe to
/// remove while holding the lock, since no other run writes here.
fn remove_stale_temporaries(dir: &Path) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with('.') && n.contains(".tmp.") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

fn describe_opt(c: &TrainConfig) -> String {
    let o = &c.optimizer;
    format!(
        "momentum {} ({}{}), lr {} {:?}, batch {}, {} epochs, seed {}",
        o.momentum,
        match o.convention {
            Convention::LrInside => "lr inside v",
            Convention::LrOutside => "lr outside b",
        },
        if o.nesterov { ", nesterov" } else { "" },
        o.lr,
        o.schedule,
        c.batch_size,
        c.epochs,
        c.seed
    )
}
