//! `qmomentum train`.

use crate::output::warn;
use crate::{lock::RunLock, plot, DataArgs};
use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use qmomentum::config::{LayerConfig, OnNonFinite, TrainConfig};
use qmomentum::data::{DataIdentity, Dataset};
use qmomentum::optim::{BinaryOptimizer, Convention, DecayMode, Schedule};
use qmomentum::quant::Scheme;
use qmomentum::train::Trainer;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Set by SIGTERM (what `mpirun` sends its ranks when it gets Ctrl-C, and what batch schedulers
/// send before they kill a job): the run checkpoints and stops as on Ctrl-C.
static TERMINATED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigterm(_: libc::c_int) {
    TERMINATED.store(true, Ordering::SeqCst);
}

/// Ctrl-C (SIGINT) and SIGTERM set `stop` (read through [`stop_requested`]).
fn install_stop_handlers(stop: &Arc<AtomicBool>) {
    let s = stop.clone();
    // A second Ctrl-C while the checkpoint is written is ignored; the run ends right after.
    let _ = ctrlc::set_handler(move || s.store(true, Ordering::SeqCst));
    #[cfg(unix)]
    // SAFETY: the handler only stores to a static atomic, which is async-signal-safe; installed
    // before the training loop, replacing the default disposition (termination).
    unsafe {
        libc::signal(libc::SIGTERM, on_sigterm as *const () as libc::sighandler_t);
    }
}

fn stop_requested(stop: &AtomicBool) -> bool {
    stop.load(Ordering::SeqCst) || TERMINATED.load(Ordering::SeqCst)
}

/// The run was interrupted (SIGINT, SIGTERM) after writing a checkpoint.
#[derive(Debug)]
pub struct Interrupted(pub String);
impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for Interrupted {}

/// Flags mirror the Keras program; a flag overrides the `--config` file, which overrides the
/// defaults (the design document's program). The defaults shown are those of the design document.
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
    /// interruption). Flags may repeat the run's settings; a flag that conflicts with the
    /// checkpoint is refused, except --epochs, which extends (or finishes) the run.
    #[arg(long)]
    pub resume: bool,
    /// With --resume --epochs: stretch the learning-rate schedule to the new length (by default
    /// it keeps its original horizon, so the epochs already trained keep their rates).
    #[arg(long, requires = "resume")]
    pub reschedule: bool,
    /// With --resume: accept data whose files differ from those the run was trained on.
    #[arg(long, requires = "resume")]
    pub force_data: bool,
    /// A model by name: mlp | cnn-small | lenet5 [default: mlp, the design document's 784-128-64-10].
    #[arg(long)]
    pub model: Option<String>,
    /// Epochs [default: 10].
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Batch size [default: 128].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Learning rate η [default: 0.001].
    #[arg(long, visible_alias = "learning-rate")]
    pub lr: Option<f32>,
    /// Momentum μ in [0, 1) (0 = plain SGD) [default: 0.9].
    #[arg(long)]
    pub momentum: Option<f32>,
    /// Nesterov momentum.
    #[arg(long)]
    pub nesterov: bool,
    /// Dampening τ [default: 0].
    #[arg(long)]
    pub dampening: Option<f32>,
    /// Where the learning rate enters: `keras` (v ← μv + ηg, θ ← θ − v; the design document)
    /// or `pytorch` (b ← μb + g, θ ← θ − ηb) [default: keras].
    #[arg(long, value_parser = ["keras", "pytorch", "lr_inside", "lr_outside"])]
    pub convention: Option<String>,
    /// Weight decay λ, on weights only (see the config's decay_biases / decay_scales) [default: 0].
    #[arg(long)]
    pub weight_decay: Option<f32>,
    /// Bits of the momentum state: 32 or 8 (block-wise dynamic quantization, ≈ 0.25× the memory)
    /// [default: 32].
    #[arg(long)]
    pub state_bits: Option<u32>,
    /// Decoupled weight decay (θ ← θ − ηλθ) instead of L2 in the gradient.
    #[arg(long)]
    pub decoupled: bool,
    /// Clip gradient values into [−c, c].
    #[arg(long)]
    pub clip_value: Option<f32>,
    /// Clip the global gradient norm.
    #[arg(long)]
    pub clip_norm: Option<f32>,
    /// Learning-rate schedule: constant | step:EVERY:GAMMA | exp:GAMMA |
    /// cosine[:WARMUP_EPOCHS[:MIN_LR]] [default: constant].
    #[arg(long)]
    pub schedule: Option<String>,
    /// Quantization: fp32 | w8a8 | w4a8 | w4a4 | w3a3 | w2a2 | ternary | binary | binary-all
    /// [default: fp32].
    #[arg(long)]
    pub quant: Option<String>,
    /// Train binary weights with momentum on latent floats instead of Bop.
    #[arg(long)]
    pub latent_binary: bool,
    /// Bop's adaptivity rate γ [default: 0.0001].
    #[arg(long)]
    pub bop_gamma: Option<f32>,
    /// Bop's flip threshold τ [default: 1e-8].
    #[arg(long)]
    pub bop_threshold: Option<f32>,
    /// Freeze activation observers after this many epochs [default: never].
    #[arg(long)]
    pub freeze_observers_after: Option<usize>,
    /// Fix the per-channel scales of integer weight grids after this many epochs (then weights
    /// beyond the range clip) [default: never; max-abs scales recomputed every step].
    #[arg(long)]
    pub freeze_weight_scales_after: Option<usize>,
    /// QAT with batch norm (folded into its convolution): use the running statistics, and stop
    /// moving them, from this epoch on (torch.ao's freeze_bn_stats) [default: never].
    #[arg(long)]
    pub freeze_bn_stats_after: Option<usize>,
    /// Seed of initialisation, shuffling and dropout [default: 0].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Hold out this fraction of the training set (its end) for validation [default: 0].
    #[arg(long)]
    pub validation_split: Option<f32>,
    /// Evaluate on the test set after every epoch (as Keras `validation_data`).
    #[arg(long, conflicts_with = "validation_split")]
    pub validate_on_test: bool,
    /// Cores per training step (1 or 2) [default: 2].
    #[arg(long)]
    pub threads: Option<usize>,
    /// Also write a checkpoint every N steps [default: only at the end of each epoch].
    #[arg(long)]
    pub checkpoint_every: Option<u64>,
    /// On a NaN/inf loss or gradient: stop or skip the step [default: stop].
    #[arg(long, value_parser = ["stop", "skip"])]
    pub on_nan: Option<String>,
    /// Class names, one per line in label order [default: classes.txt in the data folder, or
    /// Fashion-MNIST's names when the data are Fashion-MNIST].
    #[arg(long)]
    pub class_names: Option<PathBuf>,
    /// Oscillation dampening: final λ of `λ·Σ(ŵ − w)²` on integer/ternary weights, cosine-annealed
    /// from 0 over the run (Nagel et al. 2022) [default: 0, off].
    #[arg(long)]
    pub osc_dampening: Option<f32>,
    /// Iterative freezing (Nagel et al. 2022): a quantized weight whose oscillation frequency
    /// exceeds this threshold is frozen at the rounded EMA of its integer code and no longer
    /// updated [default: 0, off]. The paper's rule of thumb: 2–3× the tracking EMA (0.01).
    #[arg(long)]
    pub osc_freeze: Option<f32>,
    /// Start the freezing threshold here and anneal it (cosine) down to `--osc-freeze` over the
    /// run [default: constant].
    #[arg(long, requires = "osc_freeze")]
    pub osc_freeze_start: Option<f32>,
    /// Do not track weight-code oscillations of quantized layers (tracked by default; written to
    /// history.csv/json and oscillations.png).
    #[arg(long)]
    pub no_oscillation_tracking: bool,
    /// No progress bar: one line per epoch.
    #[arg(long, short)]
    pub quiet: bool,
    /// Stop after this many steps in total (for tests of interruption; the checkpoint is written).
    #[arg(long, hide = true)]
    pub stop_after_steps: Option<u64>,
    /// Data-parallel training over MPI: run as `mpirun -np N qmomentum train … --distributed`
    /// (also on when an MPI launcher starts more than one process). --batch-size is the global
    /// batch, shared evenly among the ranks; rank 0 writes the files. Needs a build with
    /// `--features mpi`. See doc/distributed.md.
    #[arg(long)]
    pub distributed: bool,
    /// With --distributed: add the ranks' gradients in rank order (gather, sum, broadcast)
    /// instead of MPI_Allreduce, so runs on the same number of ranks are bit-identical whatever
    /// the MPI library's algorithm.
    #[arg(long)]
    pub reduce_in_rank_order: bool,
    /// With --resume: continue a run on another number of ranks than it was started with (the
    /// gradient sums are then formed in another order; see doc/distributed.md).
    #[arg(long, requires = "resume")]
    pub allow_world_size_change: bool,
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
    let (schedule, fields) = match parts[0] {
        "constant" => (Schedule::Constant, 1),
        "step" => {
            let every = num(1, "EVERY")?;
            if every.fract() != 0.0 || every < 1.0 {
                bail!("--schedule {s}: EVERY must be a whole number of epochs ≥ 1");
            }
            (
                Schedule::Step {
                    every: every as usize,
                    gamma: num(2, "GAMMA")?,
                },
                3,
            )
        }
        "exp" | "exponential" => (
            Schedule::Exponential {
                gamma: num(1, "GAMMA")?,
            },
            2,
        ),
        "cosine" => (
            Schedule::Cosine {
                warmup_epochs: if parts.len() > 1 { num(1, "WARMUP_EPOCHS")? } else { 0.0 },
                min_lr: if parts.len() > 2 { num(2, "MIN_LR")? } else { 0.0 },
            },
            3,
        ),
        other => {
            bail!("--schedule {other}: expected constant, step:EVERY:GAMMA, exp:GAMMA or cosine[:WARMUP[:MIN_LR]]")
        }
    };
    if parts.len() > fields {
        bail!(
            "--schedule {s}: {} takes at most {} field(s) after its name, got {}",
            parts[0],
            fields - 1,
            parts.len() - 1
        );
    }
    Ok(schedule)
}

/// The effective configuration: defaults < file < flags.
pub fn build_config(a: &TrainArgs) -> Result<TrainConfig> {
    let base = match &a.config {
        Some(p) => TrainConfig::from_toml_file(p)?,
        None => TrainConfig::default(),
    };
    apply_flags(base, a)
}

/// `base` with the flags of `a` applied on top, validated.
fn apply_flags(mut c: TrainConfig, a: &TrainArgs) -> Result<TrainConfig> {
    macro_rules! set {
        ($flag:expr, $field:expr) => {
            if let Some(v) = $flag.clone() {
                $field = v;
            }
        };
    }
    if let Some(m) = &a.model {
        c.model = qmomentum::config::ModelConfig::named(m)?;
    }
    set!(a.epochs, c.epochs);
    set!(a.batch_size, c.batch_size);
    set!(a.lr, c.optimizer.lr);
    set!(a.momentum, c.optimizer.momentum);
    set!(a.dampening, c.optimizer.dampening);
    set!(a.weight_decay, c.optimizer.weight_decay);
    set!(a.state_bits, c.optimizer.state_bits);
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
    if let Some(n) = a.freeze_weight_scales_after {
        c.freeze_weight_scales_after = Some(n);
    }
    if let Some(n) = a.freeze_bn_stats_after {
        c.freeze_bn_stats_after = Some(n);
    }
    set!(a.osc_dampening, c.oscillation.dampening);
    set!(a.osc_freeze, c.oscillation.freeze_threshold);
    if a.osc_freeze_start.is_some() {
        c.oscillation.freeze_threshold_start = a.osc_freeze_start;
    }
    if a.no_oscillation_tracking {
        c.oscillation.track = false;
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

/// Settings that are accepted but do nothing, or that are probably a mistake: warnings.
fn warnings(c: &TrainConfig, a: &TrainArgs, train_len: usize) {
    let o = &c.optimizer;
    if c.batch_size > train_len && train_len > 0 {
        warn(format!(
            "--batch-size {} is larger than the {train_len} training samples: every step sees the whole set",
            c.batch_size
        ));
    }
    if o.decay_mode == DecayMode::Decoupled && o.weight_decay == 0.0 {
        warn("--decoupled without --weight-decay: there is no decay to decouple");
    }
    let binary_layers = c
        .quant
        .layers(
            c.model
                .layers
                .iter()
                .filter(|l| matches!(l, LayerConfig::Dense { .. } | LayerConfig::Conv2d { .. }))
                .count(),
        )
        .iter()
        .any(|q| matches!(q.weights, Some(qmomentum::quant::WeightQuant::Binary { .. })));
    if a.latent_binary && !binary_layers {
        warn(format!(
            "--latent-binary has no effect: quantization {} has no binary weights",
            c.quant
        ));
    }
    if let Schedule::Cosine { min_lr, .. } = o.schedule {
        if min_lr > o.lr {
            warn(format!(
                "the cosine's final learning rate ({min_lr}) is above the base rate ({}): the rate rises",
                o.lr
            ));
        }
    }
    if let Schedule::Cosine { warmup_epochs, .. } = o.schedule {
        let horizon = c.schedule_epochs.unwrap_or(c.epochs) as f32;
        if warmup_epochs >= horizon {
            warn(format!(
                "the cosine warm-up ({warmup_epochs} epochs) is not shorter than the run ({horizon} epochs): the learning rate never decays"
            ));
        }
    }
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
        if t.history.epochs.iter().any(|r| !r.oscillation.is_empty()) {
            plot::oscillations(
                &t.history,
                &f.plot.with_file_name("oscillations.png"),
                &format!("{}: weight-code oscillation per quantized layer", t.config.quant),
            )?;
        }
        plot::curves(
            &t.history,
            &f.plot,
            &format!(
                "{} — {}",
                t.config.quant,
                f.plot.parent().map(|p| p.display().to_string()).unwrap_or_default()
            ),
        )?;
    }
    Ok(())
}

/// A config value for a message: f32 fields in their shortest form (`0.01`, not the f64
/// widening `0.009999999776482582`).
fn show(v: &serde_json::Value) -> String {
    match v.as_f64() {
        Some(x) if v.is_f64() && (x as f32) as f64 == x => (x as f32).to_string(),
        _ => v.to_string(),
    }
}

/// Every field where `now` differs from the checkpoint's `was`, as `path: was → now`.
fn config_conflicts(was: &TrainConfig, now: &TrainConfig) -> Vec<String> {
    fn walk(path: &str, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<String>) {
        match (a, b) {
            (serde_json::Value::Object(x), serde_json::Value::Object(y)) => {
                let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
                for k in keys {
                    let null = serde_json::Value::Null;
                    let p = if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    };
                    walk(&p, x.get(k).unwrap_or(&null), y.get(k).unwrap_or(&null), out);
                }
            }
            _ if a != b => out.push(format!("{path}: {} in the checkpoint, {} now", show(a), show(b))),
            _ => {}
        }
    }
    let mut out = Vec::new();
    let a = serde_json::to_value(was).unwrap_or_default();
    let b = serde_json::to_value(now).unwrap_or_default();
    walk("", &a, &b, &mut out);
    // Not settings of the run: its length (extended with --epochs) and the threads a step uses
    // (an execution setting, like the number of ranks; it changes the order of the sums).
    out.retain(|c| !c.starts_with("epochs:") && !c.starts_with("schedule_epochs:") && !c.starts_with("threads:"));
    out
}

/// Load the run in `out` for `--resume`, check the flags against it and decide what happens.
fn prepare_resume(a: &TrainArgs, files: &RunFiles, identity: &DataIdentity) -> Result<Option<Trainer>> {
    let mut t = qmomentum::checkpoint::load(&files.checkpoint)
        .with_context(|| format!("cannot resume from {}", files.checkpoint.display()))?;
    let base = match &a.config {
        Some(p) => TrainConfig::from_toml_file(p)?,
        None => t.config.clone(),
    };
    let wanted = apply_flags(base, a)?;
    let conflicts = config_conflicts(&t.config, &wanted);
    if !conflicts.is_empty() {
        bail!(
            "--resume continues the run as its checkpoint configures it; these settings conflict with it:\n  {}\n\
             Drop those flags (or use another --out for a new run).",
            conflicts.join("\n  ")
        );
    }
    if a.threads.is_some() && wanted.threads != t.config.threads {
        warn(format!(
            "--threads {} (the run used {}): each step's sums are formed in another order from here on, so the weights are not bit-identical to an uninterrupted run",
            wanted.threads, t.config.threads
        ));
        t.config.threads = wanted.threads;
    }
    match &t.data {
        Some(d) if !d.same_data(identity) => {
            if a.force_data {
                warn(format!(
                    "resuming on {} although the run was trained on other files ({}): --force-data",
                    identity.path, d.path
                ));
            } else {
                bail!(
                    "the run in {} was trained on {} and the files of {} differ (SHA-256); pass the same --data, or --force-data to continue on these",
                    a.out.display(),
                    d.path,
                    identity.path
                );
            }
        }
        Some(_) => {}
        None => warn("the checkpoint does not record its data set (written by an older version): not checked"),
    }
    let done = t.epoch;
    let old = t.config.epochs;
    if let Some(e) = a.epochs {
        if e < done || (e == done && t.step_in_epoch > 0) {
            bail!(
                "--epochs {e}: the run has already trained {done} epoch(s){}; it cannot be shortened",
                if t.step_in_epoch > 0 {
                    " and part of the next"
                } else {
                    ""
                }
            );
        }
        if e != old {
            t.config.epochs = e;
            t.config.validate()?;
            if a.reschedule {
                t.config.schedule_epochs = None;
                outln!("extending the run from {old} to {e} epochs; the learning-rate schedule is stretched to {e} epochs (--reschedule)")?;
            } else {
                let horizon = t.config.schedule_epochs.unwrap_or(old);
                if t.config.optimizer.schedule != Schedule::Constant {
                    t.config.schedule_epochs = Some(horizon);
                }
                outln!(
                    "{} the run from {old} to {e} epochs; the learning-rate schedule ({}) keeps its horizon of {horizon} epochs (--reschedule stretches it)",
                    if e > old { "extending" } else { "changing" },
                    t.config.optimizer.schedule
                )?;
            }
        }
    }
    if t.finished() {
        outln!(
            "the run in {} is finished ({done} of {} epochs): nothing to do, nothing rewritten. Pass --epochs N (N > {done}) to extend it.",
            a.out.display(),
            t.config.epochs
        )?;
        return Ok(None);
    }
    Ok(Some(t))
}

/// The threads each rank of a data-parallel run uses unless `--threads` says: this machine's
/// cores shared among its ranks (one each for two ranks on two cores), at most 2.
fn threads_per_rank() -> usize {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    (cores / crate::distributed::local_ranks()).clamp(1, 2)
}

pub fn run(a: TrainArgs) -> Result<()> {
    let comm = crate::distributed::start(a.distributed, a.reduce_in_rank_order)?;
    let res = match &comm {
        None => run_with(&a, None),
        Some(c) => {
            let c = c.clone();
            if c.rank() > 0 {
                crate::output::FOLLOWER.store(true, Ordering::Relaxed);
            }
            // The cores of this machine are shared among its ranks (one thread each on 2 cores
            // with 2 ranks), unless --threads says otherwise.
            let _ = rayon::ThreadPoolBuilder::new()
                .num_threads(a.threads.unwrap_or_else(threads_per_rank))
                .build_global();
            run_with(&a, Some(c))
        }
    };
    drop(comm);
    res
}

/// What a run needs once its inputs are read and checked (nothing written yet).
struct Prepared {
    t: Trainer,
    data_dir: PathBuf,
    train: Dataset,
    val: Option<Dataset>,
    test: Dataset,
    lock: Option<RunLock>,
    fresh: bool,
    identity: DataIdentity,
}

fn run_with(a: &TrainArgs, comm: Option<Arc<dyn qmomentum::distributed::Collective>>) -> Result<()> {
    let lead = comm.as_ref().is_none_or(|c| c.rank() == 0);
    let files = RunFiles::new(&a.out);
    // Every rank reads and checks its inputs; only when all succeeded does rank 0 touch the
    // output folder.
    let prepared = prepare(a, &files, lead);
    let prepared = match &comm {
        Some(c) => crate::distributed::agree(c.as_ref(), "read and check their inputs", prepared)?,
        None => prepared?,
    };
    let Some(Prepared {
        mut t,
        data_dir,
        train,
        val,
        test,
        lock,
        fresh,
        identity,
    }) = prepared
    else {
        return Ok(());
    };
    let stop = Arc::new(AtomicBool::new(false));
    // A data-parallel rank uses its share of the machine's cores unless --threads says (an
    // execution setting, like the world size: it changes the order of the sums, not the run).
    if comm.is_some() && a.threads.is_none() {
        t.config.threads = threads_per_rank();
    }
    let (rank, n) = comm.as_ref().map(|c| (c.rank(), c.size())).unwrap_or((0, 1));
    if t.global_step > 0 && t.world_size != n {
        let why = format!(
            "the run in {} was trained on {} process(es) and is resumed on {n}",
            a.out.display(),
            t.world_size
        );
        if !a.allow_world_size_change {
            let msg = format!(
                "{why}; pass --allow-world-size-change to continue anyway (the sample order, the schedule and every state continue exactly, but each step's gradient is then summed in another order, and with dropout or batch norm the shares each rank draws and normalises over change: the weights leave those of an uninterrupted run from there on)"
            );
            return Err(match &comm {
                Some(_) => crate::distributed::AllRanks(format!("rank {rank} of {n}: {msg}")).into(),
                None => anyhow::anyhow!(msg),
            });
        }
        warn(format!(
            "{why} (--allow-world-size-change): from here on each step's gradient is summed in another order, so the weights are not bit-identical to an uninterrupted run"
        ));
    }
    t.world_size = n;
    if let Some(c) = &comm {
        check_ranks_agree(c.as_ref(), a, &t, &identity, train.len())?;
        let asked = stop.clone();
        t.set_collective(c.clone(), Some(Arc::new(move || stop_requested(&asked))))
            .map_err(|e| crate::distributed::AllRanks(format!("rank {rank} of {n}: {e}")))?;
    }
    let validation = if a.validate_on_test { Some(&test) } else { val.as_ref() };
    let created = !a.out.exists();
    let lock = if lead {
        let made = std::fs::create_dir_all(&a.out)
            .with_context(|| format!("{}: cannot create the output folder", a.out.display()))
            .and_then(|_| match lock {
                Some(l) => Ok(Some(l)),
                None => RunLock::acquire(&a.out).map(Some),
            });
        match &comm {
            Some(c) => crate::distributed::agree(c.as_ref(), "create the output folder", made)?,
            None => made?,
        }
    } else {
        crate::distributed::agree(
            comm.as_deref().expect("a follower has a communicator"),
            "create the output folder",
            Ok(None),
        )?
    };
    let res = train_in(a, &data_dir, &files, &mut t, &train, validation, &test, stop, lead);
    drop(lock);
    // A fresh run that failed before its first checkpoint leaves no folder behind (only when
    // this command created it: an existing folder is never removed).
    if lead && res.is_err() && fresh && created && !files.checkpoint.exists() {
        let _ = std::fs::remove_dir_all(&a.out);
    }
    res
}

/// Ranks started with other configurations, data or checkpoints would silently train different
/// models: every rank compares a digest of what it is about to run with rank 0's.
fn check_ranks_agree(
    c: &dyn qmomentum::distributed::Collective,
    a: &TrainArgs,
    t: &Trainer,
    identity: &DataIdentity,
    train_len: usize,
) -> Result<()> {
    // Everything that decides which collective calls a rank makes and what it computes; not
    // `threads` (each node may have its own number of cores).
    let mut config = serde_json::to_value(&t.config)?;
    if let Some(m) = config.as_object_mut() {
        m.remove("threads");
    }
    let what = serde_json::json!({
        "config": config,
        "data": identity.files,
        "train_samples": train_len,
        "position": [t.epoch, t.step_in_epoch, t.global_step, t.world_size],
        "out": a.out,
        "flags": [a.reduce_in_rank_order, a.validate_on_test, a.allow_world_size_change, a.reschedule, a.force_data],
        "stop_after_steps": a.stop_after_steps,
    });
    let digest = qmomentum::distributed::digest(what.to_string().as_bytes());
    let all = c.gather_u64(digest)?;
    let odd = qmomentum::distributed::disagreeing(&all);
    if !odd.is_empty() {
        return Err(crate::distributed::AllRanks(format!(
            "rank {} of {}: rank(s) {} were started with another configuration, data set, output folder or checkpoint than rank 0 (digests {}); every rank must run the same command on the same files",
            c.rank(),
            c.size(),
            odd.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(", "),
            all.iter().map(|d| format!("{d:016x}")).collect::<Vec<_>>().join(" ")
        ))
        .into());
    }
    Ok(())
}

/// Read and check everything a run needs, writing nothing (`None`: the resumed run is already
/// finished). `lead`: this process owns the output folder (the only process, or rank 0).
fn prepare(a: &TrainArgs, files: &RunFiles, lead: bool) -> Result<Option<Prepared>> {
    // Everything is read and checked before the output folder is touched, so a mistaken command
    // leaves nothing behind.
    let data_dir = a.data.resolve()?;
    let (full_train, test) = Dataset::load_mnist_dir(&data_dir)?;
    let identity = DataIdentity::of_dir(&data_dir)?;
    let class_names = match &a.class_names {
        Some(p) => Some(qmomentum::data::read_class_names(p)?),
        None => qmomentum::data::class_names_for(&data_dir, Some(&identity))?,
    };
    // A folder in use by another run is reported as such before anything else about it.
    let lock = if lead && a.out.is_dir() {
        Some(RunLock::acquire(&a.out)?)
    } else {
        None
    };
    let fresh = !a.resume;
    let mut t = if a.resume {
        if !files.checkpoint.exists() {
            bail!(
                "--resume: {} holds no checkpoint ({} not found)",
                a.out.display(),
                files.checkpoint.display()
            );
        }
        match prepare_resume(a, files, &identity)? {
            Some(t) => t,
            None => return Ok(None),
        }
    } else {
        if files.checkpoint.exists() {
            bail!(
                "{} already holds a checkpoint: pass --resume to continue it, or choose another --out",
                a.out.display()
            );
        }
        // A new run starts in a new or empty folder: it would replace history.csv, config.toml,
        // result.json and curves.png, which in a folder that holds no run are somebody's files.
        let others: Vec<String> = std::fs::read_dir(&a.out)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n != ".lock" && !(n.starts_with('.') && n.contains(".tmp.")))
                    .collect()
            })
            .unwrap_or_default();
        if !others.is_empty() {
            bail!(
                "{} is not empty ({}{}) and holds no qmomentum run: a new run starts in a new or empty folder; choose another --out",
                a.out.display(),
                others.iter().take(3).cloned().collect::<Vec<_>>().join(", "),
                if others.len() > 3 { ", …" } else { "" }
            );
        }
        let mut t = Trainer::new(build_config(a)?)?;
        t.data = Some(identity.clone());
        t.class_names = class_names;
        t
    };
    if let Some(n) = &t.class_names {
        if n.len() != t.model.classes() {
            warn(format!(
                "{} class names for a model of {} outputs: names are not stored",
                n.len(),
                t.model.classes()
            ));
            t.class_names = None;
        }
    }
    let (train, val) = if t.config.validation_split > 0.0 {
        let (tr, v) = full_train.split_validation(t.config.validation_split)?;
        (tr, Some(v))
    } else {
        (full_train, None)
    };
    qmomentum::train::check_fits(&t.model, &train)?;
    if fresh {
        warnings(&t.config, a, train.len());
    }
    Ok(Some(Prepared {
        t,
        data_dir,
        train,
        val,
        test,
        lock,
        fresh,
        identity,
    }))
}

#[allow(clippy::too_many_arguments)]
fn train_in(
    a: &TrainArgs,
    data_dir: &Path,
    files: &RunFiles,
    t: &mut Trainer,
    train: &Dataset,
    validation: Option<&Dataset>,
    test: &Dataset,
    stop: Arc<AtomicBool>,
    lead: bool,
) -> Result<()> {
    // Data-parallel runs: rank 0 writes every file; a failure every rank meets at the same step
    // (divergence, an agreed stop) is an `AllRanks` error, so the job ends cleanly.
    let (rank, ranks) = t.rank();
    let all_ranks = |e: qmomentum::Error| -> anyhow::Error {
        if ranks > 1 {
            crate::distributed::AllRanks(format!("rank {rank} of {ranks}: {e}")).into()
        } else {
            e.into()
        }
    };
    if !lead {
        return follow(a, t, train, validation, test, &stop, all_ranks);
    }
    remove_stale_temporaries(&a.out);
    // Timings are not in the checkpoint (it stays byte-identical across identical runs); a
    // resumed run takes those of the epochs already done from the history it wrote.
    if let Ok(text) = std::fs::read_to_string(&files.history_json) {
        if let Ok(h) = serde_json::from_str::<qmomentum::train::History>(&text) {
            for (r, old) in t.history.epochs.iter_mut().zip(&h.epochs) {
                if r.epoch == old.epoch {
                    r.seconds = old.seconds;
                    r.samples_per_sec = old.samples_per_sec;
                    r.comm_seconds = old.comm_seconds;
                    r.tracking_seconds = old.tracking_seconds;
                }
            }
        }
    }
    qmomentum::checkpoint::write_atomic(&files.config, toml::to_string(&t.config)?.as_bytes())?;

    install_stop_handlers(&stop);
    let fancy = !a.quiet && std::io::stderr().is_terminal();
    let spe = t.steps_per_epoch(train.len());
    let mut bar: Option<ProgressBar> = None;
    if t.epoch == 0 && t.step_in_epoch == 0 {
        outln!(
            "training {} on {} ({} samples, {} steps/epoch), {} params, quant {}, {}, batch {}{}, {} epochs, seed {}",
            a.out.display(),
            data_dir.display(),
            train.len(),
            spe,
            t.model.param_count(),
            t.config.quant,
            t.config.optimizer,
            t.config.batch_size,
            if ranks > 1 {
                format!(
                    " ({ranks} ranks × {}, {} thread(s) each{})",
                    t.config.batch_size / ranks,
                    t.config.threads,
                    if a.reduce_in_rank_order {
                        ", sums in rank order"
                    } else {
                        ""
                    }
                )
            } else {
                String::new()
            },
            t.config.epochs,
            t.config.seed
        )?;
    } else {
        outln!(
            "resuming {} at epoch {} of {}, step {} of {spe}",
            a.out.display(),
            t.epoch + 1,
            t.config.epochs,
            t.step_in_epoch
        )?;
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
        let Some(report) = t.step(train, validation).map_err(|e| {
            if let Some(b) = bar.take() {
                b.abandon();
            }
            all_ranks(e)
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
            // Saved first, printed after: a reader that goes away cannot cost the epoch.
            save_checkpoint(t, &files.checkpoint, &all_ranks)?;
            write_history(t, files)?;
            let val = match (r.val_loss, r.val_accuracy) {
                (Some(l), Some(a)) => format!(" - val_loss {l:.4} - val_accuracy {a:.4}"),
                _ => String::new(),
            };
            let skipped = if r.skipped_steps > 0 {
                format!(" - {} steps skipped (NaN/inf)", r.skipped_steps)
            } else {
                String::new()
            };
            let comm = match r.comm_seconds {
                Some(s) => format!(" - allreduce {s:.2}s"),
                None => String::new(),
            };
            outln!(
                "epoch {}/{} - {:.2}s{comm} - {:.0} samples/s - loss {:.4} - accuracy {:.4}{val} - lr {:.3e}{skipped}",
                r.epoch,
                t.config.epochs,
                r.seconds,
                r.samples_per_sec,
                r.loss,
                r.accuracy,
                r.lr,
            )?;
        }
        if every > 0 && t.global_step.is_multiple_of(every) && !epoch_ended {
            save_checkpoint(t, &files.checkpoint, &all_ranks)?;
        }
        let halt = a.stop_after_steps.is_some_and(|n| t.global_step >= n);
        // Data-parallel: the stop every rank agreed on at this step's reduction (a signal that
        // arrives later is seen at the next step), never this rank's flag alone.
        let stopping = if ranks > 1 {
            t.stop_agreed()
        } else {
            stop_requested(&stop)
        };
        if stopping || halt {
            if let Some(b) = bar.take() {
                b.abandon();
            }
            if !epoch_ended {
                save_checkpoint(t, &files.checkpoint, &all_ranks)?;
            }
            let data_flag = a
                .data
                .data
                .as_ref()
                .map(|d| format!(" --data {}", d.display()))
                .unwrap_or_default();
            let (launch, dist) = if ranks > 1 {
                (format!("mpirun -np {ranks} "), " --distributed")
            } else {
                (String::new(), "")
            };
            let msg = format!(
                "interrupted at epoch {}, step {} (global step {}); checkpoint written to {}. Continue with: {launch}qmomentum train --out {}{data_flag}{dist} --resume",
                t.epoch + 1,
                t.step_in_epoch,
                t.global_step,
                files.checkpoint.display(),
                a.out.display()
            );
            if halt && !stopping {
                outln!("{msg}")?;
                return Ok(());
            }
            return Err(Interrupted(msg).into());
        }
    }
    let (test_loss, test_acc) = t.evaluate(test).map_err(all_ranks)?;
    let total: f64 = t.history.epochs.iter().map(|r| r.seconds).sum();
    let result = serde_json::json!({
        "test_loss": crate::predict::json_f32(test_loss),
        "test_accuracy": crate::predict::json_f32(test_acc),
        "epochs": t.config.epochs,
        "train_seconds": (total * 1e3).round() / 1e3,
        "quant": t.config.quant.to_string(),
        "seed": t.config.seed,
        "lr": crate::predict::json_f32(t.config.optimizer.lr),
        "data": data_dir.display().to_string(),
    });
    qmomentum::checkpoint::write_atomic(&files.result, serde_json::to_string_pretty(&result)?.as_bytes())?;
    outln!("test loss {test_loss:.4} - test accuracy {test_acc:.4}")?;
    outln!(
        "wrote {}, {}, {}, {}",
        files.checkpoint.display(),
        files.history_csv.display(),
        files.plot.display(),
        files.result.display()
    )?;
    Ok(())
}

/// The loop of a rank other than 0: the same steps, stops and final evaluation as rank 0 (whose
/// collective calls it matches one for one), writing nothing.
fn follow(
    a: &TrainArgs,
    t: &mut Trainer,
    train: &Dataset,
    validation: Option<&Dataset>,
    test: &Dataset,
    stop: &Arc<AtomicBool>,
    all_ranks: impl Fn(qmomentum::Error) -> anyhow::Error,
) -> Result<()> {
    install_stop_handlers(stop);
    let every = t.config.checkpoint.every_steps;
    while !t.finished() {
        let Some(report) = t.step(train, validation).map_err(&all_ranks)? else {
            break;
        };
        let halt = a.stop_after_steps.is_some_and(|n| t.global_step >= n);
        // Where rank 0 writes a checkpoint, this rank makes the test the writing makes (weights
        // that became non-finite), so a divergence ends every rank alike.
        let saves =
            report.epoch.is_some() || (every > 0 && t.global_step.is_multiple_of(every)) || halt || t.stop_agreed();
        if saves {
            qmomentum::checkpoint::check_weights_finite(t, Path::new("checkpoint.safetensors")).map_err(&all_ranks)?;
        }
        if t.stop_agreed() {
            return Err(Interrupted(format!("rank {}: stopped with rank 0", t.rank().0)).into());
        }
        if halt {
            return Ok(());
        }
    }
    t.evaluate(test).map_err(all_ranks)?;
    Ok(())
}

/// Write the checkpoint; weights that became non-finite are a divergence every rank of a
/// data-parallel run meets at this step ([`follow`] makes the same test).
fn save_checkpoint(t: &Trainer, path: &Path, all_ranks: &impl Fn(qmomentum::Error) -> anyhow::Error) -> Result<()> {
    qmomentum::checkpoint::save(t, path).map_err(|e| match e {
        qmomentum::Error::Diverged(_) => all_ranks(e),
        other => other.into(),
    })
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
