//! Training: `fit`/`evaluate` with a per-epoch [`History`], resumable at any step.
//!
//! A [`Trainer`] owns the model, the optimizer and every bit of state a run needs to continue
//! exactly: the epoch, the position in the epoch and the running sums of the current epoch. The
//! epoch's sample order is a pure function of `(seed, epoch)` and the dropout draws of
//! `(seed, step)`, so a checkpoint written after any step resumes to the very same weights
//! (`tests/training.rs`, and the SIGKILL test of the CLI).
//!
//! ```no_run
//! use qmomentum::{config::TrainConfig, data::Dataset, train::Trainer};
//! let (train, test) = Dataset::load_mnist_dir("data/fashion-mnist".as_ref()).unwrap();
//! let mut t = Trainer::new(TrainConfig::default()).unwrap();
//! let history = t.fit(&train, Some(&test), |_t, _event| {}).unwrap();
//! println!("{:?}", history.epochs.last());
//! ```

use crate::config::{OnNonFinite, TrainConfig};
use crate::data::Dataset;
use crate::distributed::{shard, Collective};
use crate::error::{Error, Result};
use crate::layers::{Buffer, ParamKind};
use crate::model::Sequential;
use crate::optim::{BinaryOptimizer, Optimizer};
use crate::rng::Rng;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Instant;

/// One epoch's figures (the rows of `history.csv`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    /// 1-based epoch.
    pub epoch: usize,
    /// Mean training loss.
    pub loss: f32,
    /// Training accuracy.
    pub accuracy: f32,
    /// Validation loss, if validation data was given.
    pub val_loss: Option<f32>,
    /// Validation accuracy.
    pub val_accuracy: Option<f32>,
    /// Learning rate at the last step of the epoch.
    pub lr: f32,
    /// Wall time of the training steps (validation excluded), seconds.
    pub seconds: f64,
    /// Training samples per second.
    pub samples_per_sec: f64,
    /// Steps whose update was skipped because of NaN/inf.
    pub skipped_steps: u64,
    /// Oscillation figures of each quantized layer (see `quant::oscillation`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub oscillation: Vec<crate::quant::oscillation::LayerOscillation>,
    /// Data-parallel runs: seconds of the epoch's steps spent in collective calls (this rank's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comm_seconds: Option<f64>,
    /// Seconds of the epoch's steps spent in oscillation tracking (and iterative freezing), when
    /// it is on: its cost, measured where it runs (part of `seconds`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracking_seconds: Option<f64>,
}

/// Per-epoch history, as Keras's `History`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct History {
    /// One record per finished epoch.
    pub epochs: Vec<EpochRecord>,
}

impl History {
    /// CSV with a header row.
    pub fn to_csv(&self) -> String {
        let mut s = String::from("epoch,loss,accuracy,val_loss,val_accuracy,lr,seconds,samples_per_sec");
        // Oscillation columns, one group per tracked layer (from the first epoch's layers).
        let layers: Vec<usize> = self
            .epochs
            .first()
            .map(|r| r.oscillation.iter().map(|o| o.layer).collect())
            .unwrap_or_default();
        for l in &layers {
            s.push_str(&format!(
                ",flips_per_step_l{l},oscillations_per_step_l{l},mean_osc_frequency_l{l},fraction_oscillating_l{l},fraction_frozen_l{l}"
            ));
        }
        s.push('\n');
        let o = |v: Option<f32>| v.map(|v| v.to_string()).unwrap_or_default();
        for r in &self.epochs {
            s.push_str(&format!(
                "{},{},{},{},{},{},{:.4},{:.0}",
                r.epoch,
                r.loss,
                r.accuracy,
                o(r.val_loss),
                o(r.val_accuracy),
                r.lr,
                r.seconds,
                r.samples_per_sec
            ));
            for l in &layers {
                match r.oscillation.iter().find(|x| x.layer == *l) {
                    Some(x) => s.push_str(&format!(
                        ",{},{},{},{},{}",
                        x.flips_per_step,
                        x.oscillations_per_step,
                        x.mean_frequency,
                        x.fraction_oscillating,
                        x.fraction_frozen
                    )),
                    None => s.push_str(",,,,,"),
                }
            }
            s.push('\n');
        }
        s
    }
}

/// Running sums of the epoch in progress (checkpointed, so a resumed epoch reports the same).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EpochProgress {
    /// Σ loss·batch.
    pub loss_sum: f64,
    /// Correct predictions.
    pub correct: u64,
    /// Samples seen.
    pub seen: u64,
    /// Seconds spent in steps.
    pub seconds: f64,
    /// Skipped (non-finite) steps.
    pub skipped: u64,
    /// Seconds spent in oscillation tracking.
    #[serde(default)]
    pub tracking_seconds: f64,
}

/// What one [`Trainer::step`] did (a struct, not a list: the step allocates nothing).
#[derive(Clone, Debug)]
pub struct StepReport {
    /// Batch loss.
    pub loss: f32,
    /// Steps done in this epoch.
    pub step: usize,
    /// Steps in the epoch.
    pub of: usize,
    /// The epoch's record when this step ended an epoch.
    pub epoch: Option<EpochRecord>,
}

/// What [`Trainer::fit`] reports to its callback.
#[derive(Clone, Debug)]
pub enum Event {
    /// A step ended (loss of the batch).
    Step {
        /// Batch loss.
        loss: f32,
        /// Steps done in this epoch.
        step: usize,
        /// Steps in the epoch.
        of: usize,
    },
    /// An epoch ended.
    Epoch(EpochRecord),
}

/// A training run in progress.
#[derive(Clone, Debug)]
pub struct Trainer {
    /// The configuration.
    pub config: TrainConfig,
    /// The model.
    pub model: Sequential,
    /// The optimizer and its state.
    pub optimizer: Optimizer,
    /// 0-based epoch in progress.
    pub epoch: usize,
    /// Steps done in the epoch in progress.
    pub step_in_epoch: usize,
    /// Optimizer steps done in total.
    pub global_step: u64,
    /// Sums of the epoch in progress.
    pub progress: EpochProgress,
    /// Finished epochs.
    pub history: History,
    /// The data set this run trains on (stored in checkpoints; a resume onto other data is
    /// refused by the CLI unless forced).
    pub data: Option<crate::data::DataIdentity>,
    /// Class names in label order, if known.
    pub class_names: Option<Vec<String>>,
    order: Vec<usize>,
    order_epoch: Option<usize>,
    labels: Vec<u32>,
    replica: Option<Box<(Sequential, Vec<u32>)>>,
    /// Scratch: what this step's tracking pass reads on each core (prefetched at the end of each
    /// core's share of the step).
    tracking_regions: Vec<[[crate::simd::Region; 2]; 2]>,
    fits_checked: Option<(usize, usize, usize)>,
    /// The number of processes whose shares made up each step (1: a single process; set by
    /// [`Trainer::set_collective`], checkpointed, so a resume can tell what would change).
    pub world_size: usize,
    dist: Option<Box<Distributed>>,
}

/// Polled once per step by a data-parallel run: whether this process was asked to stop.
pub type StopRequest = Arc<dyn Fn() -> bool + Send + Sync>;

/// A data-parallel run's link to the other ranks, and the buffers of its reductions (kept
/// between steps: the step allocates nothing).
#[derive(Clone)]
struct Distributed {
    comm: Arc<dyn Collective>,
    stop: Option<StopRequest>,
    stop_agreed: bool,
    grads: Vec<f32>,
    sums: Vec<f64>,
    maxes: Vec<f32>,
}

impl std::fmt::Debug for Distributed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Distributed")
            .field("comm", &self.comm)
            .field("stop_agreed", &self.stop_agreed)
            .finish_non_exhaustive()
    }
}

impl Trainer {
    /// A fresh run (validated config, initialised model).
    pub fn new(config: TrainConfig) -> Result<Self> {
        config.validate()?;
        let bop = matches!(config.optimizer.binary, BinaryOptimizer::Bop { .. });
        let mut model = Sequential::from_config(&config.model, config.quant, bop, config.seed)?;
        if !config.oscillation.track {
            model.drop_trackers();
        }
        if config.oscillation.freezing() {
            model.enable_freezing();
        }
        if config.freeze_weight_scales_after.is_some() {
            model.enable_fixed_scales();
        }
        if model.has_scale_folded_batch_norm() {
            // The kernel these act on is W·γ/σ, not the parameter W: not combined yet. (A batch
            // norm kept after a binary kernel leaves the kernel W.)
            let o = config.oscillation;
            let refuse = |field: &str, value: String| {
                Err(Error::config(
                    field,
                    value,
                    "not available with batch norm folded into the convolutions during QAT (the quantized kernel is W·γ/σ, not the parameter W); use the fold-then-fine-tune recipe (`qmomentum quantize --finetune-epochs N`) for it",
                ))
            };
            if o.dampening > 0.0 {
                return refuse("oscillation.dampening", o.dampening.to_string());
            }
            if o.freezing() {
                return refuse("oscillation.freeze_threshold", o.freeze_threshold.to_string());
            }
            if let Some(k) = config.freeze_weight_scales_after {
                return refuse("freeze_weight_scales_after", k.to_string());
            }
        } else if let (Some(k), true) = (config.freeze_bn_stats_after, config.quant != crate::quant::Scheme::Fp32) {
            // (A float run ignores it: a config shared by a float baseline and its QAT runs,
            // as `compare` and `sweep` use, stays valid.)
            return Err(Error::config(
                "freeze_bn_stats_after",
                k,
                "the model has no batch norm folded into a convolution (only QAT of a batch-normalised network has one)",
            ));
        }
        model.check_loss_compatible()?;
        let optimizer = Optimizer::new(config.optimizer.clone())?;
        Ok(Trainer {
            config,
            model,
            optimizer,
            epoch: 0,
            step_in_epoch: 0,
            global_step: 0,
            progress: EpochProgress::default(),
            history: History::default(),
            data: None,
            class_names: None,
            order: Vec::new(),
            order_epoch: None,
            labels: Vec::new(),
            replica: None,
            tracking_regions: Vec::new(),
            fits_checked: None,
            world_size: 1,
            dist: None,
        })
    }

    /// Train data-parallel with the other ranks of `comm` (see [`crate::distributed`]): each
    /// step computes this rank's share of the global batch (`config.batch_size`, which must
    /// divide evenly among the ranks) and sums the gradients and batch statistics with the
    /// others before the update, so every rank holds the same weights. `stop` tells whether this
    /// process was asked to stop (its signal handler's flag): a request on any rank is seen by
    /// all after the same step ([`Trainer::stop_agreed`]). The world size is recorded in
    /// checkpoints.
    pub fn set_collective(&mut self, comm: Arc<dyn Collective>, stop: Option<StopRequest>) -> Result<()> {
        let n = comm.size();
        let bs = self.config.batch_size;
        if n == 0 || !bs.is_multiple_of(n) {
            return Err(Error::config(
                "batch_size",
                bs,
                format!(
                    "the global batch must divide evenly among the {n} ranks; choose a multiple of {n} (e.g. {})",
                    (bs / n.max(1)).max(1) * n
                ),
            ));
        }
        self.world_size = n;
        self.fits_checked = None;
        self.dist = Some(Box::new(Distributed {
            comm,
            stop,
            stop_agreed: false,
            grads: Vec::new(),
            sums: Vec::new(),
            maxes: Vec::new(),
        }));
        Ok(())
    }

    /// `(rank, world size)`: `(0, 1)` for a single process.
    pub fn rank(&self) -> (usize, usize) {
        self.dist
            .as_ref()
            .map(|d| (d.comm.rank(), d.comm.size()))
            .unwrap_or((0, 1))
    }

    /// Data-parallel runs: whether some rank asked to stop before the last step's reduction
    /// (every rank sees the same answer after the same step).
    pub fn stop_agreed(&self) -> bool {
        self.dist.as_ref().is_some_and(|d| d.stop_agreed)
    }

    /// Steps in an epoch of `n` samples.
    pub fn steps_per_epoch(&self, n: usize) -> usize {
        n.div_ceil(self.config.batch_size)
    }

    /// True when every epoch is done.
    pub fn finished(&self) -> bool {
        self.epoch >= self.config.epochs
    }

    /// The sample order of `epoch`: a pure function of `(seed, epoch)`.
    fn prepare_order(&mut self, n: usize) {
        if self.order_epoch == Some(self.epoch) && self.order.len() == n {
            return;
        }
        self.order.clear();
        self.order.extend(0..n);
        if self.config.shuffle {
            Rng::new(self.config.seed, 0x5EED_0000u64.wrapping_add(self.epoch as u64)).shuffle(&mut self.order);
        }
        self.order_epoch = Some(self.epoch);
    }

    /// One optimizer step on the next batch of `train` (`None` once every epoch is done); at
    /// the end of an epoch, evaluates `validation` and returns the epoch's record too.
    pub fn step(&mut self, train: &Dataset, validation: Option<&Dataset>) -> Result<Option<StepReport>> {
        if self.finished() {
            return Ok(None);
        }
        // The data must fit the model; checked once per data set (a resumed run may be handed
        // other data than it started with), not at every step.
        let key = (train.images.as_ptr() as usize, train.len(), train.features);
        if self.fits_checked != Some(key) {
            check_fits(&self.model, train)?;
            let (_, ranks) = self.rank();
            let last = train.len() - (self.steps_per_epoch(train.len()).max(1) - 1) * self.config.batch_size;
            if ranks > 1 && last < ranks && !train.is_empty() {
                return Err(Error::config(
                    "batch_size",
                    self.config.batch_size,
                    format!(
                        "the epoch's last batch would hold {last} of the {} training samples, fewer than the {ranks} ranks; choose a batch size that leaves at least {ranks} samples for it",
                        train.len()
                    ),
                ));
            }
            self.fits_checked = Some(key);
        }
        if train.is_empty() {
            return Err(Error::config("training set", 0, "has no samples"));
        }
        // A pure function of the epoch, so a resumed run freezes where the original did.
        if let Some(k) = self.config.freeze_bn_stats_after {
            self.model.set_batch_norm_frozen(self.epoch >= k);
        }
        let n = train.len();
        let spe = self.steps_per_epoch(n);
        self.optimizer.steps_per_epoch = spe as u64;
        self.optimizer.total_epochs = self.config.schedule_epochs.unwrap_or(self.config.epochs);
        self.prepare_order(n);
        let bs = self.config.batch_size;
        let start = self.step_in_epoch.saturating_mul(bs);
        if start >= n {
            return Err(Error::Shape(format!(
                "the run is at step {} of an epoch of {spe} steps: the training set changed since the checkpoint",
                self.step_in_epoch
            )));
        }
        let end = (start + bs).min(n);
        let batch = end - start;
        let t0 = Instant::now();
        let step_no = self.global_step.saturating_add(1);
        let seed = self.config.seed;
        // Dropout draws are a pure function of (seed, step, part), a part being one thread's
        // share (`rank × threads + thread`): nothing to checkpoint, and two ranks of one thread
        // draw what one process of two threads draws.
        let threads = self.config.threads as u64;
        let rng_for = |part: u64| Rng::new(seed ^ step_no.wrapping_mul(0x9E37_79B9_7F4A_7C15), 0xD0 + part);
        // Data-parallel runs: this rank computes rows `mine` of the global batch (see
        // `distributed::shard`); the rest of the step is the single-process one on those rows,
        // then the sums of all ranks replace this rank's.
        let (rank, ranks) = self.rank();
        let mine = shard(batch, rank, ranks);
        // Within a process, its rows are split in two contiguous halves, one per core; each
        // replica computes the gradient of its half (of the mean loss over the whole batch), and
        // the halves are added in a fixed order, so the result does not depend on thread timing.
        // Oscillation dampening λ of this step, added to the main model's weight gradients only
        // (the replicas' gradients are summed into it).
        let total_steps = (self.config.schedule_epochs.unwrap_or(self.config.epochs) as u64).saturating_mul(spe as u64);
        // (Only rank 0 adds it: the ranks' gradients are summed.)
        let lambda = if rank == 0 {
            self.config.oscillation.dampening_at(self.global_step, total_steps)
        } else {
            0.0
        };
        if self.config.oscillation.dampening > 0.0 {
            for l in self.model.layers.iter_mut() {
                if let Some((_, wq)) = l.weight_quant_mut() {
                    wq.dampening = lambda;
                }
            }
        }
        let order = &self.order[start + mine.start..start + mine.end];
        // This rank's rows of the next step of the epoch (none after the last: the next epoch
        // is shuffled anew), prefetched by each core while it computes this step.
        let next: &[usize] = if end < n {
            let next_mine = shard((end + bs).min(n) - end, rank, ranks);
            &self.order[end + next_mine.start..end + next_mine.end]
        } else {
            &[]
        };
        let (first_part, batch_here) = (rank as u64 * threads, mine.len());
        let split = self.config.threads >= 2 && batch_here >= 2;
        let half = if split { batch_here.div_ceil(2) } else { batch_here };
        self.labels.resize(half, 0);
        // Whether the gradient is known to be finite already (tested while the halves were
        // added); otherwise `first_non_finite_grad` makes a pass of its own.
        let mut grads_finite = false;
        let (loss_sum, correct) = if split {
            let rep = self.replica.get_or_insert_with(|| {
                let mut r = self.model.clone();
                r.drop_trackers();
                for l in r.layers.iter_mut() {
                    if let Some((_, wq)) = l.weight_quant_mut() {
                        wq.dampening = 0.0;
                    }
                }
                Box::new((r, Vec::new()))
            });
            // The kernels quantized once for both first (the replica reads the one `ŵ`), then
            // the rest of the replica's parameters and state.
            self.model.quantize_shared(&mut rep.0, self.config.threads);
            rep.0.sync_from(&self.model, self.config.threads);
            // The codes this step's forward pass writes and the tracker's states, which the
            // tracking pass reads right after the step's shares; each core prefetches its half
            // once its share is done (regions are addresses: they stay valid, nothing is
            // reallocated during the step).
            self.tracking_regions.clear();
            if self.config.oscillation.track {
                let threads = self.config.threads;
                self.tracking_regions.extend(
                    self.model
                        .layers
                        .iter()
                        .filter_map(|l| l.quant_parts().and_then(|(w, _)| w.tracking_regions(threads))),
                );
            }
            let regions = &self.tracking_regions;
            rep.1.resize(batch_here - half, 0);
            let (m0, l0) = (&mut self.model, &mut self.labels);
            let (m1, l1) = (&mut rep.0, &mut rep.1);
            // On the process's spinning worker pool (shared with the integer runtime), not
            // rayon: a rayon worker sleeps between steps, and its futex wake-up twice per step
            // was ~12 % of a profile. Measured (MLP epoch, 4 interleaved rounds): 0.2577 s with
            // rayon::join, 0.2091 s on the pool.
            let ((s0, c0), (s1, c1)) = qmomentum_runtime::pool::join(
                || {
                    train.gather_normalised(&order[..half], m0.input_mut(half), l0);
                    let r = m0.forward_backward(l0, batch, &mut rng_for(first_part));
                    train.prefetch(&next[..next.len().div_ceil(2)]);
                    regions.iter().flat_map(|r| r[0]).for_each(crate::simd::prefetch_l2);
                    r
                },
                || {
                    train.gather_normalised(&order[half..], m1.input_mut(batch_here - half), l1);
                    let r = m1.forward_backward(l1, batch, &mut rng_for(first_part + 1));
                    train.prefetch(&next[next.len().div_ceil(2)..]);
                    regions.iter().flat_map(|r| r[1]).for_each(crate::simd::prefetch_l2);
                    r
                },
            );
            // The replica's backward is done: it lets go of the main model's `ŵ`.
            rep.0.release_shared();
            grads_finite = self.model.add_grads(&rep.0, self.config.threads);
            self.model.merge_step_stats(&[&rep.0]);
            (s0 + s1, c0 + c1)
        } else {
            let x = self.model.input_mut(batch_here);
            train.gather_normalised(order, x, &mut self.labels);
            train.prefetch(next);
            self.model
                .forward_backward(&self.labels, batch, &mut rng_for(first_part))
        };
        let (loss_sum, correct) = match self.dist.as_deref_mut() {
            Some(d) => {
                // The reduced gradients are new: test them (below).
                grads_finite = false;
                d.reduce_step(&mut self.model, loss_sum, correct)?
            }
            None => (loss_sum, correct),
        };
        let loss = (loss_sum / batch as f64) as f32;
        let bad = if !loss.is_finite() {
            Some(format!("loss is {loss}"))
        } else if grads_finite {
            None
        } else {
            self.model
                .first_non_finite_grad()
                .map(|(name, i)| format!("gradient of {name}[{i}] is not finite"))
        };
        match (bad, self.config.on_non_finite) {
            (Some(why), OnNonFinite::Stop) => {
                return Err(Error::Diverged(format!(
                    "training diverged at epoch {}, step {} (global step {step_no}): {why}. \
                     The last checkpoint written (if any) is kept as it was. Usual cures: a lower learning rate \
                     (now {}), gradient clipping (optimizer.clip_norm), or \
                     on_non_finite = \"skip\" to skip such steps",
                    self.epoch + 1,
                    self.step_in_epoch + 1,
                    self.optimizer.lr_at(self.global_step)
                )));
            }
            (Some(_), OnNonFinite::Skip) => {
                self.progress.skipped += 1;
            }
            (None, _) => {
                // Only a step that is taken feeds the observers: a skipped batch changes nothing.
                // (The replica's statistics were merged above, and other ranks' reduced in.)
                self.model.apply_step_stats();
                if self.config.oscillation.track {
                    // The codes this step's forward pass used (the main model's ŵ).
                    let m = self.config.oscillation.momentum;
                    // Iterative freezing decides on the frequencies this step updated.
                    let freeze = self.config.oscillation.freezing().then(|| {
                        self.config
                            .oscillation
                            .freeze_threshold_at(self.global_step, total_steps)
                    });
                    let tt = Instant::now();
                    for l in self.model.layers.iter_mut() {
                        if let Some((w, wq)) = l.weight_quant_mut() {
                            wq.track(m, self.config.threads);
                            if let Some(th) = freeze {
                                wq.freeze(w, th, m);
                            }
                        }
                    }
                    self.progress.tracking_seconds += tt.elapsed().as_secs_f64();
                }
                let sq = self
                    .optimizer
                    .needs_grad_norm()
                    .then(|| self.optimizer.grad_sq_norm(self.model.params_iter()));
                self.optimizer.threads = self.config.threads;
                self.optimizer.step_iter(self.model.params_iter_mut(), sq, step_no)?;
                self.progress.loss_sum += loss_sum;
                self.progress.correct += correct as u64;
                self.progress.seen += batch as u64;
            }
        }
        self.global_step = step_no;
        self.step_in_epoch += 1;
        self.progress.seconds += t0.elapsed().as_secs_f64();
        let mut report = StepReport {
            loss,
            step: self.step_in_epoch,
            of: spe,
            epoch: None,
        };
        if self.step_in_epoch == spe {
            let p = std::mem::take(&mut self.progress);
            let (val_loss, val_accuracy) = match validation {
                Some(v) if !v.is_empty() => {
                    let (l, a) = self.evaluate(v)?;
                    (Some(l), Some(a))
                }
                _ => (None, None),
            };
            let seen = p.seen.max(1) as f64;
            let rec = EpochRecord {
                epoch: self.epoch + 1,
                loss: (p.loss_sum / seen) as f32,
                accuracy: (p.correct as f64 / seen) as f32,
                val_loss,
                val_accuracy,
                lr: self.optimizer.lr_at(self.global_step.saturating_sub(1)),
                // Rounded to µs and to whole samples/s: the files show no float noise.
                seconds: (p.seconds * 1e6).round() / 1e6,
                samples_per_sec: (p.seen as f64 / p.seconds.max(1e-9)).round(),
                skipped_steps: p.skipped,
                oscillation: self.take_oscillation(),
                comm_seconds: self
                    .dist
                    .as_deref()
                    .map(|d| (d.comm.take_seconds() * 1e6).round() / 1e6),
                tracking_seconds: self.model.tracks().then_some((p.tracking_seconds * 1e6).round() / 1e6),
            };
            if let Some(d) = self.dist.as_deref() {
                self.check_ranks_hold_the_same_model(d.comm.as_ref())?;
            }
            self.history.epochs.push(rec.clone());
            self.epoch += 1;
            self.step_in_epoch = 0;
            if self.config.freeze_weight_scales_after.is_some_and(|k| self.epoch >= k) {
                self.model.fix_weight_scales();
            }
            if let Some(k) = self.config.freeze_observers_after {
                if self.epoch >= k {
                    for a in self.model.layers.iter_mut().filter_map(|l| l.act_quant_mut()) {
                        if let Some(o) = a.observer.as_mut() {
                            o.frozen = true;
                        }
                    }
                }
            }
            report.epoch = Some(rec);
        }
        Ok(Some(report))
    }

    /// Train to the end; `on_event` sees every step and epoch.
    pub fn fit(
        &mut self,
        train: &Dataset,
        validation: Option<&Dataset>,
        mut on_event: impl FnMut(&Trainer, &Event),
    ) -> Result<History> {
        while let Some(r) = self.step(train, validation)? {
            on_event(
                self,
                &Event::Step {
                    loss: r.loss,
                    step: r.step,
                    of: r.of,
                },
            );
            if let Some(rec) = r.epoch {
                on_event(self, &Event::Epoch(rec));
            }
        }
        Ok(self.history.clone())
    }

    /// `(mean loss, accuracy)` on `data` (no training, observers untouched). Data-parallel
    /// runs share the samples among the ranks and sum their results (collective: every rank
    /// calls it).
    pub fn evaluate(&mut self, data: &Dataset) -> Result<(f32, f32)> {
        match self.dist.as_deref() {
            None => evaluate(&mut self.model, data),
            Some(d) => {
                check_fits(&self.model, data)?;
                let n = data.len();
                let rows = shard(n, d.comm.rank(), d.comm.size());
                let (l, c) = evaluate_rows(&mut self.model, data, rows);
                let mut sums = [l, c as f64];
                d.comm.sum_f64(&mut sums)?;
                Ok(((sums[0] / n.max(1) as f64) as f32, (sums[1] / n.max(1) as f64) as f32))
            }
        }
    }

    /// Data-parallel runs, at the end of every epoch: every rank's weights and buffers must
    /// equal rank 0's, bit for bit (they do when every rank receives the same sums; MPI does not
    /// promise that for every algorithm, `--reduce-in-rank-order` does). Collective.
    fn check_ranks_hold_the_same_model(&self, comm: &dyn Collective) -> Result<()> {
        let mut bytes = Vec::new();
        let states: Vec<Buffer> = self.model.tracker_states().collect();
        for v in self
            .model
            .params_iter()
            .map(|p| &p.value)
            .chain(self.model.buffers_iter().map(|b| &b.value))
            .chain(states.iter().map(|b| &b.value))
        {
            bytes.extend(v.iter().flat_map(|x| x.to_le_bytes()));
        }
        let all = comm.gather_u64(crate::distributed::digest(&bytes))?;
        let odd = crate::distributed::disagreeing(&all);
        if odd.is_empty() {
            return Ok(());
        }
        Err(Error::Distributed(format!(
            "after epoch {}, rank(s) {odd:?} hold other weights than rank 0: the MPI library did not give every rank the same sums; run with --reduce-in-rank-order",
            self.epoch + 1
        )))
    }

    /// The oscillation figures of the epoch that ends (and reset the epoch counters).
    fn take_oscillation(&mut self) -> Vec<crate::quant::oscillation::LayerOscillation> {
        if !self.config.oscillation.track {
            return Vec::new();
        }
        let (threshold, m) = (self.config.oscillation.threshold, self.config.oscillation.momentum);
        self.model
            .layers
            .iter_mut()
            .enumerate()
            .filter_map(|(i, l)| {
                l.weight_quant_mut().and_then(|(_, wq)| {
                    let frozen = wq.frozen_count();
                    wq.tracker.as_mut().map(|t| {
                        let mut r = t.take_epoch(i, threshold, m);
                        r.fraction_frozen = frozen as f32 / t.freq.value.len().max(1) as f32;
                        r
                    })
                })
            })
            .collect()
    }

    /// Whether any parameter is trained by Bop.
    pub fn uses_bop(&self) -> bool {
        self.model.params().iter().any(|p| p.kind == ParamKind::Binary)
    }
}

/// `(mean loss, accuracy)` of `model` on `data`, in batches of [`Sequential::evaluation_batch`].
pub fn evaluate(model: &mut Sequential, data: &Dataset) -> Result<(f32, f32)> {
    check_fits(model, data)?;
    let n = data.len();
    let (loss, correct) = evaluate_rows(model, data, 0..n);
    Ok(((loss / n.max(1) as f64) as f32, correct as f32 / n.max(1) as f32))
}

/// `(Σ loss, correct)` of `model` on the samples `rows` of `data` (already checked to fit).
fn evaluate_rows(model: &mut Sequential, data: &Dataset, rows: std::ops::Range<usize>) -> (f64, usize) {
    let mut rng = Rng::new(0, 0);
    let (mut loss, mut correct) = (0.0f64, 0usize);
    let mut labels = Vec::new();
    let idx: Vec<usize> = rows.collect();
    for chunk in idx.chunks(model.evaluation_batch()) {
        labels.resize(chunk.len(), 0);
        let x = model.input_mut(chunk.len());
        data.gather_normalised(chunk, x, &mut labels);
        let (l, c) = model.evaluate_batch(&labels, &mut rng);
        loss += l as f64 * chunk.len() as f64;
        correct += c;
    }
    (loss, correct)
}

impl Distributed {
    /// Replace this rank's gradients, batch statistics, loss and accuracy sums by those of all
    /// ranks (three collective calls: the gradients in one `f32` buffer, the sums in one `f64`
    /// buffer, the ranges and the stop request in one `max`). Returns the summed `(loss,
    /// correct)`.
    fn reduce_step(&mut self, model: &mut Sequential, loss_sum: f64, correct: usize) -> Result<(f64, usize)> {
        let Distributed {
            comm,
            stop,
            stop_agreed,
            grads,
            sums,
            maxes,
            ..
        } = self;
        grads.clear();
        for p in model.params_iter() {
            grads.extend_from_slice(&p.grad);
        }
        model.visit_step_stats(sums, maxes, true);
        sums.extend([loss_sum, correct as f64]);
        let asked = stop.as_ref().is_some_and(|s| s());
        maxes.push(if asked { 1.0 } else { 0.0 });
        comm.sum_f32(grads)?;
        comm.sum_f64(sums)?;
        comm.max_f32(maxes)?;
        let mut at = 0;
        for p in model.params_iter_mut() {
            let n = p.grad.len();
            p.grad.copy_from_slice(&grads[at..at + n]);
            at += n;
        }
        model.visit_step_stats(sums, maxes, false);
        *stop_agreed = maxes.last().is_some_and(|&v| v > 0.0);
        let k = sums.len();
        Ok((sums[k - 2], sums[k - 1] as usize))
    }
}

/// The data fit the model: as many features per sample as it reads, and every label below its
/// number of outputs (a label past the head would index out of the loss's row).
pub fn check_fits(model: &Sequential, data: &Dataset) -> Result<()> {
    if data.features != model.input_size {
        return Err(Error::Shape(format!(
            "the data have {} features per sample, the model reads {}",
            data.features, model.input_size
        )));
    }
    let classes = model.classes();
    if let Some(&max) = data.labels.iter().max() {
        if max as usize >= classes {
            return Err(Error::Shape(format!(
                "the data have labels up to {max}, the model has {classes} outputs (classes 0..{classes})"
            )));
        }
    }
    Ok(())
}
