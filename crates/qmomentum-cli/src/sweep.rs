//! `qmomentum sweep`: a grid of training runs (optimizer × momentum × learning rate × batch size
//! × bit width × oscillation control × seeds), run in parallel, resumable, summarised as a CSV,
//! a markdown table (mean ± std over seeds) and heat maps over momentum × bit width.
//!
//! Each cell is an ordinary `qmomentum train` run in its own folder, started as a child process
//! of this executable: the sweep inherits every guarantee of `train` (validation, atomic
//! checkpoints, exact resume, the run lock) instead of re-implementing them. A finished cell
//! (its `result.json` exists) is kept; a cell with a checkpoint but no result is resumed; an
//! interrupted sweep is continued by running the same command again. The grid is copied into
//! the sweep folder and a folder made by another grid is refused.
//!
//! The grid file (TOML; `configs/sweeps/` has the study's):
//!
//! ```toml
//! epochs = 10
//! seeds = [0, 1, 2]
//! model = "mlp"                       # optional: mlp | cnn-small | lenet5
//! optimizer = ["heavy-ball", "nesterov"]  # sgd | heavy-ball | heavy-ball-torch | nesterov | bop
//! momentum = [0.0, 0.9, 0.95]
//! lr = [0.1]                          # with effective_lr = true: η/(1−μ), the cell's η follows
//! effective_lr = true
//! batch_size = [128]
//! quant = ["fp32", "w8a8", "w4a4", "w2a2", "binary"]
//! control = ["none", "dampen:0.5", "freeze:0.02"]
//! bop_gamma = [1e-4]                  # only for optimizer "bop" (binary schemes); momentum
//!                                     # and lr then train the latent parameters (biases)
//! ```

use crate::compare::mean_std;
use crate::plot;
use crate::DataArgs;
use anyhow::{bail, Context, Result};
use clap::Args;
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

#[derive(Args, Debug)]
pub struct SweepArgs {
    /// The grid (TOML; see `configs/sweeps/`).
    grid: PathBuf,
    #[command(flatten)]
    data: DataArgs,
    /// Sweep folder: one sub-folder per cell, results.csv, summary.md, heat maps.
    #[arg(long)]
    out: PathBuf,
    /// Cells trained at the same time [default: the cores divided by --threads].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=256))]
    jobs: Option<u64>,
    /// Threads of each cell's trainer (1 or 2).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=2))]
    threads: u64,
    /// List the cells and exit.
    #[arg(long)]
    dry_run: bool,
}

/// The grid file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grid {
    /// Epochs per cell.
    pub epochs: usize,
    /// Seeds: every cell is trained once per seed.
    pub seeds: Vec<u64>,
    /// A model by name (default: the design document's MLP).
    #[serde(default)]
    pub model: Option<String>,
    /// Optimizers.
    pub optimizer: Vec<String>,
    /// Momentum values (ignored by `sgd`, which is momentum 0).
    #[serde(default = "zero")]
    pub momentum: Vec<f32>,
    /// Learning rates (η, or η/(1−μ) with `effective_lr`).
    pub lr: Vec<f32>,
    /// The `lr` axis is the effective learning rate η/(1−μ): each cell trains with
    /// η = lr·(1−μ), so cells of different momentum take steps of the same long-run size.
    #[serde(default)]
    pub effective_lr: bool,
    /// Batch sizes.
    #[serde(default = "batch")]
    pub batch_size: Vec<usize>,
    /// Quantization schemes (`train --quant`).
    pub quant: Vec<String>,
    /// Oscillation control: `none`, `dampen:λ`, `freeze:threshold`.
    #[serde(default = "none")]
    pub control: Vec<String>,
    /// Bop's γ values (only cells with optimizer `bop`).
    #[serde(default = "gamma")]
    pub bop_gamma: Vec<f32>,
}

fn zero() -> Vec<f32> {
    vec![0.9]
}
fn batch() -> Vec<usize> {
    vec![128]
}
fn none() -> Vec<String> {
    vec!["none".into()]
}
fn gamma() -> Vec<f32> {
    vec![1e-4]
}

const OPTIMIZERS: [&str; 5] = ["sgd", "heavy-ball", "heavy-ball-torch", "nesterov", "bop"];

/// One training run of the grid.
#[derive(Clone, Debug, PartialEq)]
pub struct Cell {
    pub optimizer: String,
    pub momentum: f32,
    /// The learning rate the run uses (η).
    pub lr: f32,
    pub batch_size: usize,
    pub quant: String,
    pub control: String,
    pub bop_gamma: Option<f32>,
    pub seed: u64,
}

impl Cell {
    /// η/(1−μ): the step size momentum converges to under a constant gradient.
    /// For Bop cells it is that of the latent parameters (biases, scales), which momentum trains.
    pub fn effective_lr(&self) -> f32 {
        if self.optimizer == "sgd" {
            self.lr
        } else {
            round6(self.lr as f64 / (1.0 - decimal(self.momentum)))
        }
    }

    /// The cell without its seed: what the summary groups by.
    fn key(&self) -> String {
        let g = self.bop_gamma.map(|g| format!("_g{g}")).unwrap_or_default();
        format!(
            "{}_{}_m{}_lr{}_b{}_{}{g}",
            self.quant,
            self.optimizer,
            self.momentum,
            self.lr,
            self.batch_size,
            self.control.replace(':', "")
        )
    }

    /// Folder name of the cell.
    pub fn dir_name(&self) -> String {
        format!("{}_s{}", self.key(), self.seed)
    }

    /// The `train` arguments of the cell.
    fn train_args(&self) -> Vec<String> {
        let mut a: Vec<String> = vec![
            "--quant".into(),
            self.quant.clone(),
            "--lr".into(),
            self.lr.to_string(),
            "--batch-size".into(),
            self.batch_size.to_string(),
            "--seed".into(),
            self.seed.to_string(),
        ];
        match self.optimizer.as_str() {
            "bop" => {
                a.push("--bop-gamma".into());
                a.push(self.bop_gamma.unwrap_or(1e-4).to_string());
                // The latent parameters (biases, scales) still use momentum.
                a.push("--momentum".into());
                a.push(self.momentum.to_string());
            }
            other => {
                a.push("--momentum".into());
                a.push(self.momentum.to_string());
                if other == "nesterov" {
                    a.push("--nesterov".into());
                }
                if other == "heavy-ball-torch" {
                    a.push("--convention".into());
                    a.push("pytorch".into());
                }
                if is_binary(&self.quant) {
                    a.push("--latent-binary".into());
                }
            }
        }
        if let Some((kind, v)) = self.control.split_once(':') {
            a.push(
                if kind == "dampen" {
                    "--osc-dampening"
                } else {
                    "--osc-freeze"
                }
                .into(),
            );
            a.push(v.to_string());
        }
        a
    }
}

/// `x` to 6 significant digits (so η = 0.05·(1 − 0.9) is 0.005, not 0.0050000013).
fn round6(x: f64) -> f32 {
    format!("{x:.5e}").parse::<f64>().unwrap_or(x) as f32
}

/// An f32 as the decimal it was written as (0.99, not 0.9900000095367432).
fn decimal(x: f32) -> f64 {
    x.to_string().parse().unwrap_or(x as f64)
}

fn is_binary(q: &str) -> bool {
    q == "binary" || q == "binary-all"
}

/// Bits of a scheme's hidden weights, for the heat maps' axis (fp32 = 32).
fn bits_of(q: &str) -> u32 {
    match q {
        "fp32" => 32,
        "w8a8" => 8,
        "w4a8" | "w4a4" => 4,
        "w3a3" => 3,
        "w2a2" => 2,
        "ternary" => 2,
        _ if is_binary(q) => 1,
        _ => 0,
    }
}

impl Grid {
    /// Read and validate a grid file.
    pub fn load(path: &Path) -> Result<Grid> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read the grid {}", path.display()))?;
        let g: Grid = toml::from_str(&text).map_err(|e| {
            anyhow::anyhow!(
                "{}: {}",
                path.display(),
                qmomentum::config::humanize_serde(&e.to_string())
            )
        })?;
        g.cells().with_context(|| format!("grid {}", path.display()))?;
        Ok(g)
    }

    /// Every cell, in a fixed order; an empty or impossible axis is an error naming it.
    pub fn cells(&self) -> Result<Vec<Cell>> {
        for (axis, empty) in [
            ("seeds", self.seeds.is_empty()),
            ("optimizer", self.optimizer.is_empty()),
            ("momentum", self.momentum.is_empty()),
            ("lr", self.lr.is_empty()),
            ("batch_size", self.batch_size.is_empty()),
            ("quant", self.quant.is_empty()),
            ("control", self.control.is_empty()),
            ("bop_gamma", self.bop_gamma.is_empty()),
        ] {
            if empty {
                bail!("axis `{axis}` is empty: give it at least one value");
            }
        }
        if self.epochs == 0 {
            bail!("epochs = 0: a cell must train at least one epoch");
        }
        for o in &self.optimizer {
            if !OPTIMIZERS.contains(&o.as_str()) {
                bail!("optimizer = \"{o}\" is not one of {}", OPTIMIZERS.join(", "));
            }
        }
        for &m in &self.momentum {
            if !(0.0..1.0).contains(&m) {
                bail!("momentum = {m} is impossible: momentum must be in [0, 1) (at 1 the velocity never forgets and diverges)");
            }
        }
        for &l in &self.lr {
            if !(l > 0.0 && l.is_finite()) {
                bail!("lr = {l} is impossible: a learning rate must be a finite number > 0");
            }
        }
        for &b in &self.batch_size {
            if b == 0 {
                bail!("batch_size = 0 is impossible");
            }
        }
        for &g in &self.bop_gamma {
            if !(g > 0.0 && g <= 1.0) {
                bail!("bop_gamma = {g} is impossible: Bop's γ must be in (0, 1]");
            }
        }
        for q in &self.quant {
            q.parse::<qmomentum::quant::Scheme>()
                .map_err(|e| anyhow::anyhow!("quant = \"{q}\": {e}"))?;
        }
        for c in &self.control {
            let ok = match c.split_once(':') {
                None => c == "none",
                Some(("dampen", v)) => v.parse::<f32>().is_ok_and(|x| x > 0.0 && x.is_finite()),
                Some(("freeze", v)) => v.parse::<f32>().is_ok_and(|x| x > 0.0 && x < 1.0),
                _ => false,
            };
            if !ok {
                bail!("control = \"{c}\" is not none, dampen:λ (λ > 0) or freeze:threshold (0 < threshold < 1)");
            }
        }
        let mut cells = Vec::new();
        for q in &self.quant {
            for o in &self.optimizer {
                if o == "bop" && !is_binary(q) {
                    if self.quant.iter().any(|q| is_binary(q)) {
                        continue; // Bop cells exist only for the binary schemes of the grid.
                    }
                    bail!("optimizer = \"bop\" trains ±1 weights only, and quant has no binary scheme (binary, binary-all)");
                }
                let moms: Vec<f32> = if o == "sgd" { vec![0.0] } else { self.momentum.clone() };
                let gammas: Vec<Option<f32>> = if o == "bop" {
                    self.bop_gamma.iter().map(|&g| Some(g)).collect()
                } else {
                    vec![None]
                };
                for &m in &moms {
                    if m == 0.0 && (o == "nesterov" || o == "heavy-ball-torch") {
                        continue; // at μ = 0 both are plain SGD: the heavy-ball μ = 0 cell is it
                    }
                    for &lr in &self.lr {
                        let lr = if self.effective_lr {
                            round6(decimal(lr) * (1.0 - decimal(m)))
                        } else {
                            lr
                        };
                        for &b in &self.batch_size {
                            for c in &self.control {
                                if c != "none" && q == "fp32" {
                                    continue; // nothing oscillates on a float grid
                                }
                                for &g in &gammas {
                                    for &seed in &self.seeds {
                                        cells.push(Cell {
                                            optimizer: o.clone(),
                                            momentum: m,
                                            lr,
                                            batch_size: b,
                                            quant: q.clone(),
                                            control: c.clone(),
                                            bop_gamma: g,
                                            seed,
                                        });
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        let mut seen = std::collections::HashSet::new();
        cells.retain(|c| seen.insert(c.dir_name()));
        if cells.is_empty() {
            bail!("the grid has no cell to train");
        }
        Ok(cells)
    }
}

/// What a finished cell measured.
#[derive(Clone, Debug)]
struct Outcome {
    cell: Cell,
    test_accuracy: f32,
    test_loss: f32,
    epoch_seconds: f64,
    wall_seconds: f64,
    /// Mean over the hidden quantized layers of the fraction of weights oscillating, last epoch.
    oscillating: Option<f32>,
    /// Mean code flips per step over the hidden quantized layers, last epoch.
    flips_per_step: Option<f32>,
    frozen: Option<f32>,
}

fn read_outcome(cell: &Cell, dir: &Path, wall: f64) -> Result<Outcome> {
    let res: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("result.json")).with_context(|| format!("{}", dir.display()))?,
    )
    .with_context(|| format!("{}/result.json", dir.display()))?;
    let hist: qmomentum::train::History = serde_json::from_str(
        &std::fs::read_to_string(dir.join("history.json")).with_context(|| format!("{}", dir.display()))?,
    )
    .with_context(|| format!("{}/history.json", dir.display()))?;
    let f = |k: &str| {
        res.get(k)
            .and_then(|v| v.as_f64())
            .map(|v| v as f32)
            .unwrap_or(f32::NAN)
    };
    let last = hist.epochs.last();
    // The hidden layers: the low-bit presets keep the first and last layers at 8 bits, whose
    // fine grids flip codes often and would drown the low-bit layers' figures.
    let osc = last.map(|r| &r.oscillation).filter(|o| !o.is_empty()).map(|o| {
        if o.len() >= 3 {
            &o[1..o.len() - 1]
        } else {
            &o[..]
        }
    });
    let mean = |g: &dyn Fn(&qmomentum::quant::oscillation::LayerOscillation) -> f32| {
        osc.map(|o| o.iter().map(g).sum::<f32>() / o.len() as f32)
    };
    let mut secs: Vec<f64> = hist.epochs.iter().map(|r| r.seconds).collect();
    secs.sort_by(f64::total_cmp);
    Ok(Outcome {
        cell: cell.clone(),
        test_accuracy: f("test_accuracy"),
        test_loss: f("test_loss"),
        epoch_seconds: secs.get(secs.len() / 2).copied().unwrap_or(f64::NAN),
        wall_seconds: wall,
        oscillating: mean(&|l| l.fraction_oscillating),
        flips_per_step: mean(&|l| l.flips_per_step),
        frozen: mean(&|l| l.fraction_frozen),
    })
}

/// Build the run a cell will start, from the very flags it will get, so that a combination the
/// trainer refuses (a scheme the model cannot take, oscillation control on a batch norm folded
/// for QAT, …) is reported before any cell runs.
fn check_cell(cell: &Cell, grid: &Grid) -> Result<()> {
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        train: crate::train_cmd::TrainArgs,
    }
    let mut args = vec!["train".to_string()];
    args.extend(cell.train_args());
    args.extend(["--epochs".into(), grid.epochs.to_string()]);
    if let Some(m) = &grid.model {
        args.extend(["--model".into(), m.clone()]);
    }
    let what = || format!("cell {} ({})", cell.dir_name(), args[1..].join(" "));
    let cli = <Cli as clap::Parser>::try_parse_from(&args).with_context(what)?;
    let cfg = crate::train_cmd::build_config(&cli.train).with_context(what)?;
    qmomentum::train::Trainer::new(cfg).with_context(what)?;
    Ok(())
}

pub fn run(a: SweepArgs) -> Result<()> {
    let grid = Grid::load(&a.grid)?;
    let cells = grid.cells()?;
    for c in &cells {
        check_cell(c, &grid)?;
    }
    let data = a.data.resolve()?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let jobs = a.jobs.unwrap_or((cores / a.threads).max(1)) as usize;
    if a.dry_run {
        for c in &cells {
            outln!("{}  (η = {}, η/(1−μ) = {})", c.dir_name(), c.lr, c.effective_lr())?;
        }
        outln!(
            "{} cells ({} seeds each), {} at a time",
            cells.len(),
            grid.seeds.len(),
            jobs
        )?;
        return Ok(());
    }
    // The grid the folder was made for: a folder of another grid is refused, not mixed.
    let saved = a.out.join("grid.toml");
    let this = toml::to_string(&grid)?;
    if saved.exists() {
        let before: Grid = toml::from_str(&std::fs::read_to_string(&saved)?)
            .with_context(|| format!("{} is damaged", saved.display()))?;
        if before != grid {
            bail!(
                "{} holds a sweep of another grid ({}): continue it with that grid, or choose another --out",
                a.out.display(),
                saved.display()
            );
        }
    } else if a.out.exists() && std::fs::read_dir(&a.out)?.next().is_some() {
        bail!(
            "{} is not empty and holds no sweep (no grid.toml): choose another --out",
            a.out.display()
        );
    }
    std::fs::create_dir_all(&a.out).with_context(|| format!("cannot create {}", a.out.display()))?;
    qmomentum::checkpoint::write_atomic(&saved, this.as_bytes())?;

    let exe = std::env::current_exe().context("cannot find the qmomentum executable")?;
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        // Ctrl-C reaches the cells too (same process group): each checkpoints and exits; the
        // sweep starts no new cell and says how to continue.
        let _ = ctrlc::set_handler(move || stop.store(true, Ordering::SeqCst));
    }
    let next = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    let outcomes: Mutex<Vec<Option<Outcome>>> = Mutex::new(vec![None; cells.len()]);
    let failures: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let t0 = Instant::now();
    let total = cells.len();
    std::thread::scope(|s| {
        for _ in 0..jobs.min(total) {
            s.spawn(|| loop {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some(cell) = cells.get(i) else { return };
                let dir = a.out.join(cell.dir_name());
                let t = Instant::now();
                let r = run_cell(&exe, cell, &dir, &grid, &data, a.threads);
                let wall = t.elapsed().as_secs_f64();
                let k = done.fetch_add(1, Ordering::SeqCst) + 1;
                match r.and_then(|fresh| read_outcome(cell, &dir, wall).map(|o| (o, fresh))) {
                    Ok((o, fresh)) => {
                        let _ = outln!(
                            "[{k}/{total}] {}  test accuracy {:.4}{}",
                            cell.dir_name(),
                            o.test_accuracy,
                            if fresh {
                                format!("  ({wall:.1} s)")
                            } else {
                                "  (kept)".into()
                            }
                        );
                        outcomes.lock().unwrap()[i] = Some(o);
                    }
                    Err(e) => {
                        if !stop.load(Ordering::SeqCst) {
                            let msg = format!("{}: {e:#}", cell.dir_name());
                            crate::output::warn(format!("[{k}/{total}] {msg}"));
                            failures.lock().unwrap().push(msg);
                        }
                    }
                }
            });
        }
    });
    if stop.load(Ordering::SeqCst) {
        return Err(crate::train_cmd::Interrupted(format!(
            "sweep interrupted: finished cells are kept and half-done ones checkpointed; run the same command again to continue ({})",
            a.out.display()
        ))
        .into());
    }
    let outcomes: Vec<Outcome> = outcomes.into_inner().unwrap().into_iter().flatten().collect();
    write_results(&a.out, &grid, &outcomes)?;
    outln!(
        "{} cells in {:.0} s; wrote {}/results.csv, summary.md, heatmap_*.png",
        outcomes.len(),
        t0.elapsed().as_secs_f64(),
        a.out.display()
    )?;
    let failures = failures.into_inner().unwrap();
    if !failures.is_empty() {
        bail!(
            "{} of {total} cells failed (their folders keep what they wrote):\n  {}",
            failures.len(),
            failures.join("\n  ")
        );
    }
    Ok(())
}

/// Train one cell (or continue it); `Ok(false)` when it had finished before.
fn run_cell(exe: &Path, cell: &Cell, dir: &Path, grid: &Grid, data: &Path, threads: u64) -> Result<bool> {
    if dir.join("result.json").is_file() {
        return Ok(false);
    }
    let mut cmd = Command::new(exe);
    // A cell is one process even when the sweep itself was started by an MPI launcher.
    for k in crate::distributed::LAUNCHER_WORLD_SIZE {
        cmd.env_remove(k);
    }
    cmd.arg("train")
        .arg("--quiet")
        .arg("--out")
        .arg(dir)
        .arg("--data")
        .arg(data);
    if dir.join("checkpoint.safetensors").is_file() {
        cmd.arg("--resume");
    } else {
        if dir.exists() {
            // Started but no checkpoint yet: nothing to keep.
            std::fs::remove_dir_all(dir).with_context(|| format!("cannot clear {}", dir.display()))?;
        }
        cmd.args(cell.train_args());
        cmd.arg("--epochs").arg(grid.epochs.to_string());
        cmd.arg("--threads").arg(threads.to_string());
        if let Some(m) = &grid.model {
            cmd.arg("--model").arg(m);
        }
    }
    let out = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("cannot start {}", exe.display()))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        bail!("train failed ({}): {}", out.status, err.trim());
    }
    Ok(true)
}

/// One summary row: a cell over its seeds.
struct Group {
    cell: Cell,
    acc: Vec<f32>,
    osc: Vec<f32>,
    frozen: Vec<f32>,
    epoch_s: Vec<f64>,
}

fn groups(outcomes: &[Outcome]) -> Vec<Group> {
    let mut out: Vec<Group> = Vec::new();
    for o in outcomes {
        let key = o.cell.key();
        let g = match out.iter_mut().position(|g| g.cell.key() == key) {
            Some(i) => &mut out[i],
            None => {
                out.push(Group {
                    cell: o.cell.clone(),
                    acc: Vec::new(),
                    osc: Vec::new(),
                    frozen: Vec::new(),
                    epoch_s: Vec::new(),
                });
                out.last_mut().unwrap()
            }
        };
        g.acc.push(o.test_accuracy);
        g.osc.extend(o.oscillating);
        g.frozen.extend(o.frozen);
        g.epoch_s.push(o.epoch_seconds);
    }
    out
}

fn write_results(out: &Path, grid: &Grid, outcomes: &[Outcome]) -> Result<()> {
    use qmomentum::checkpoint::write_atomic;
    let o = |v: Option<f32>| v.map(|v| v.to_string()).unwrap_or_default();
    let mut csv = String::from(
        "quant,bits,optimizer,momentum,lr,effective_lr,batch_size,control,bop_gamma,seed,test_accuracy,test_loss,median_epoch_s,cell_wall_s,fraction_oscillating,flips_per_step,fraction_frozen\n",
    );
    for r in outcomes {
        let c = &r.cell;
        let _ = writeln!(
            csv,
            "{},{},{},{},{},{},{},{},{},{},{},{},{:.4},{:.2},{},{},{}",
            c.quant,
            bits_of(&c.quant),
            c.optimizer,
            c.momentum,
            c.lr,
            c.effective_lr(),
            c.batch_size,
            c.control,
            o(c.bop_gamma),
            c.seed,
            r.test_accuracy,
            r.test_loss,
            r.epoch_seconds,
            r.wall_seconds,
            o(r.oscillating),
            o(r.flips_per_step),
            o(r.frozen)
        );
    }
    write_atomic(&out.join("results.csv"), csv.as_bytes())?;

    let gs = groups(outcomes);
    let mut md = format!(
        "# Sweep: {} cells × {} seed(s), {} epochs{}\n\n\
         Test accuracy on the 10,000 Fashion-MNIST test images, mean ± std over seeds (n = seeds \
         that finished). η/(1−μ) is the effective learning rate. Oscillating and frozen: fraction \
         of the weights of the hidden layers (the low-bit presets keep the first and last layers at \
         8 bits) whose oscillation frequency exceeds the threshold / that are frozen, last epoch.\n\n\
         | quant | optimizer | μ | η | η/(1−μ) | batch | control | test accuracy | n | oscillating | frozen | epoch s |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|\n",
        gs.len(),
        grid.seeds.len(),
        grid.epochs,
        grid.model.as_ref().map(|m| format!(", model {m}")).unwrap_or_default()
    );
    for g in &gs {
        let c = &g.cell;
        let (m, s) = mean_std(&g.acc);
        let osc = if g.osc.is_empty() {
            "–".into()
        } else {
            format!("{:.4}", mean_std(&g.osc).0)
        };
        let fr = if g.frozen.is_empty() || g.frozen.iter().all(|&f| f == 0.0) {
            "–".into()
        } else {
            format!("{:.4}", mean_std(&g.frozen).0)
        };
        let mut es = g.epoch_s.clone();
        es.sort_by(f64::total_cmp);
        let opt = match c.bop_gamma {
            Some(gm) => format!("bop γ={gm}"),
            None => c.optimizer.clone(),
        };
        let _ = writeln!(
            md,
            "| {} | {opt} | {} | {} | {} | {} | {} | {m:.4} ± {s:.4} | {} | {osc} | {fr} | {:.3} |",
            c.quant,
            c.momentum,
            c.lr,
            c.effective_lr(),
            c.batch_size,
            c.control,
            g.acc.len(),
            es[es.len() / 2]
        );
    }
    write_atomic(&out.join("summary.md"), md.as_bytes())?;

    // Heat maps over momentum × bit width, one per combination of the other axes that has more
    // than one momentum or scheme.
    let mut slices: Vec<(String, Vec<&Group>)> = Vec::new();
    for g in &gs {
        let c = &g.cell;
        let eff = if grid.effective_lr { c.effective_lr() } else { c.lr };
        let name = format!(
            "{}_lr{}_b{}_{}{}",
            c.optimizer,
            eff,
            c.batch_size,
            c.control.replace(':', ""),
            c.bop_gamma.map(|g| format!("_g{g}")).unwrap_or_default()
        );
        match slices.iter_mut().find(|(n, _)| *n == name) {
            Some((_, v)) => v.push(g),
            None => slices.push((name, vec![g])),
        }
    }
    for (name, gs) in slices {
        let mut moms: Vec<f32> = gs.iter().map(|g| g.cell.momentum).collect();
        moms.sort_by(f32::total_cmp);
        moms.dedup();
        let mut schemes: Vec<&str> = gs.iter().map(|g| g.cell.quant.as_str()).collect();
        schemes.sort_by_key(|q| std::cmp::Reverse(bits_of(q)));
        schemes.dedup();
        if moms.len() < 2 && schemes.len() < 2 {
            continue;
        }
        let cell = |q: &str, m: f32, f: &dyn Fn(&Group) -> Option<f32>| {
            gs.iter()
                .find(|g| g.cell.quant == q && g.cell.momentum == m)
                .and_then(|g| f(g))
        };
        let acc: Vec<Vec<Option<f32>>> = schemes
            .iter()
            .map(|q| {
                moms.iter()
                    .map(|&m| cell(q, m, &|g| Some(mean_std(&g.acc).0)))
                    .collect()
            })
            .collect();
        let osc: Vec<Vec<Option<f32>>> = schemes
            .iter()
            .map(|q| {
                moms.iter()
                    .map(|&m| cell(q, m, &|g| (!g.osc.is_empty()).then(|| mean_std(&g.osc).0)))
                    .collect()
            })
            .collect();
        let cols: Vec<String> = moms.iter().map(|m| format!("μ={m}")).collect();
        let rows: Vec<String> = schemes.iter().map(|s| s.to_string()).collect();
        let lr_word = if grid.effective_lr { "η/(1−μ)" } else { "η" };
        let what = name
            .replace("_lr", &format!(", {lr_word}="))
            .replace("_b", ", batch ")
            .replace('_', ", ");
        plot::heatmap(
            &rows,
            &cols,
            &acc,
            &out.join(format!("heatmap_accuracy_{name}.png")),
            &format!("test accuracy: {what}"),
            "{:.3}",
        )?;
        if osc.iter().flatten().any(|v| v.is_some()) {
            plot::heatmap(
                &rows,
                &cols,
                &osc,
                &out.join(format!("heatmap_oscillation_{name}.png")),
                &format!("fraction of weights oscillating: {what}"),
                "{:.3}",
            )?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grid() -> Grid {
        toml::from_str(
            r#"
            epochs = 1
            seeds = [0, 1]
            optimizer = ["sgd", "heavy-ball", "bop"]
            momentum = [0.5, 0.9]
            lr = [0.1]
            effective_lr = true
            quant = ["w4a4", "binary"]
            control = ["none", "freeze:0.02"]
            "#,
        )
        .unwrap()
    }

    /// Cells by hand: per scheme, sgd (μ = 0: one momentum) + heavy-ball (two) = 3 optimizer
    /// settings, × 2 controls × 2 seeds = 12; Bop only for binary: 2 momenta × 2 controls × 2
    /// seeds = 8. So 12 (w4a4) + 12 + 8 (binary) = 32. Effective lr: η = 0.1·(1−μ).
    #[test]
    fn cells_by_hand() {
        let cells = grid().cells().unwrap();
        assert_eq!(cells.len(), 32);
        let hb = cells
            .iter()
            .find(|c| c.optimizer == "heavy-ball" && c.momentum == 0.9)
            .unwrap();
        assert!((hb.lr - 0.01).abs() < 1e-7 && (hb.effective_lr() - 0.1).abs() < 1e-6);
        assert!(cells
            .iter()
            .filter(|c| c.optimizer == "bop")
            .all(|c| c.quant == "binary"));
        assert!(cells.iter().filter(|c| c.optimizer == "sgd").all(|c| c.momentum == 0.0));
        let a = hb.train_args().join(" ");
        assert!(a.contains("--momentum 0.9") && a.contains("--quant w4a4"), "{a}");
    }

    #[test]
    fn impossible_grids_are_refused_naming_axis_and_value() {
        let bad = |f: &dyn Fn(&mut Grid), want: &str| {
            let mut g = grid();
            f(&mut g);
            let e = format!("{:#}", g.cells().unwrap_err());
            assert!(e.contains(want), "{e} lacks {want}");
        };
        bad(&|g| g.momentum = vec![0.9, 1.0], "momentum = 1");
        bad(&|g| g.momentum.clear(), "axis `momentum` is empty");
        bad(&|g| g.optimizer = vec!["adam".into()], "optimizer = \"adam\"");
        bad(
            &|g| {
                g.quant = vec!["w4a4".into()];
                g.optimizer = vec!["bop".into()];
            },
            "optimizer = \"bop\"",
        );
        bad(&|g| g.quant = vec!["w9a9".into()], "quant = \"w9a9\"");
        bad(&|g| g.control = vec!["freeze:2".into()], "control = \"freeze:2\"");
        bad(&|g| g.lr = vec![-0.1], "lr = -0.1");
        bad(&|g| g.seeds.clear(), "axis `seeds` is empty");
    }

    /// A cell the trainer would refuse is found before the sweep runs: oscillation dampening
    /// on cnn-small, whose batch norms are folded into the convolutions for QAT.
    #[test]
    fn cells_the_trainer_refuses_are_found_up_front() {
        let mut g = grid();
        g.quant = vec!["w4a4".into()];
        g.optimizer = vec!["heavy-ball".into()];
        g.control = vec!["dampen:0.01".into()];
        g.model = Some("cnn-small".into());
        let cells = g.cells().unwrap();
        let e = format!("{:#}", check_cell(&cells[0], &g).unwrap_err());
        assert!(e.contains("oscillation.dampening") && e.contains("cell "), "{e}");
        g.control = vec!["none".into()];
        let cells = g.cells().unwrap();
        check_cell(&cells[0], &g).unwrap();
    }
}
