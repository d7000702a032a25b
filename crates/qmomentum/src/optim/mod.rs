//! Optimizers: the Momentum family and Bop, composed from small transforms.
//!
//! * [`momentum`] — the momentum transform in both conventions (lr inside / outside), Nesterov,
//!   dampening.
//! * [`decay`] — coupled (L2) and decoupled weight decay.
//! * [`clip`] — clipping by value and by global norm.
//! * [`schedule`] — learning-rate schedules.
//! * [`bop`] — the binary optimizer for ±1 weights.
//!
//! An [`Optimizer`] sees the model's parameters as groups by [`ParamKind`]: `Binary` weights go
//! to Bop (when configured), everything else (latent weights, biases, scales) to Momentum.
//! Order within a step: clip → coupled L2 → decoupled decay → momentum.
//!
//! ```
//! use qmomentum::optim::{OptimizerConfig, Optimizer};
//! use qmomentum::layers::{Param, ParamKind};
//! // The design document's update, v ← γv + ηg, θ ← θ − v, on f(θ) = θ²/2 (g = θ).
//! let cfg = OptimizerConfig { lr: 0.1, momentum: 0.9, ..Default::default() };
//! let mut opt = Optimizer::new(cfg).unwrap();
//! let mut p = Param::new("theta", ParamKind::Weight, vec![1], vec![1.0]);
//! p.grad[0] = 1.0;
//! opt.step(&mut [&mut p], 1).unwrap();
//! assert!((p.value[0] - 0.9).abs() < 1e-7);
//! ```

pub mod bop;
pub mod clip;
pub mod decay;
pub mod momentum;
pub mod schedule;
pub mod state8;

use crate::error::{Error, Result};
use crate::layers::{Param, ParamKind};
pub use bop::Bop;
pub use decay::DecayMode;
pub use momentum::{Convention, Momentum};
pub use schedule::Schedule;
use serde::{Deserialize, Serialize};

/// Which optimizer trains ±1 weights.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum BinaryOptimizer {
    /// Momentum on latent float weights (the STE way).
    Latent,
    /// Bop on the ±1 weights themselves.
    Bop {
        /// Adaptivity rate γ (Larq default 1e-4).
        #[serde(default = "bop_gamma")]
        gamma: f32,
        /// Flip threshold τ (Larq default 1e-8).
        #[serde(default = "bop_threshold")]
        threshold: f32,
    },
}

fn bop_gamma() -> f32 {
    1e-4
}
fn bop_threshold() -> f32 {
    1e-8
}

impl Default for BinaryOptimizer {
    fn default() -> Self {
        BinaryOptimizer::Bop {
            gamma: bop_gamma(),
            threshold: bop_threshold(),
        }
    }
}

/// Everything that configures training updates (the `[optimizer]` table of a config file).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptimizerConfig {
    /// Base learning rate η ≥ 0.
    pub lr: f32,
    /// Momentum μ in [0, 1) (0 = plain SGD).
    pub momentum: f32,
    /// Dampening τ in [0, 1].
    pub dampening: f32,
    /// Nesterov momentum.
    pub nesterov: bool,
    /// `lr_inside` (design document, Keras) or `lr_outside` (PyTorch).
    pub convention: Convention,
    /// Weight decay λ ≥ 0.
    pub weight_decay: f32,
    /// Coupled (L2) or decoupled.
    pub decay_mode: DecayMode,
    /// Also decay biases (off by default: decay applies to weights only, as Keras's
    /// `kernel_regularizer` and the usual PyTorch parameter groups).
    pub decay_biases: bool,
    /// Also decay learned scales such as LSQ steps (off by default: decay would shrink the
    /// quantization grid, not regularise the model).
    pub decay_scales: bool,
    /// Clip each gradient value into [−c, c].
    pub clip_value: Option<f32>,
    /// Clip the global gradient norm to this.
    pub clip_norm: Option<f32>,
    /// Learning-rate schedule.
    pub schedule: Schedule,
    /// Optimizer of ±1 weights.
    pub binary: BinaryOptimizer,
    /// Bits of the momentum state: 32 (f32) or 8 (block-wise dynamic quantization, see
    /// [`state8`]).
    pub state_bits: u32,
}

impl Default for OptimizerConfig {
    /// The design document's optimizer: Momentum 0.9, lr 0.001, lr inside the velocity.
    fn default() -> Self {
        OptimizerConfig {
            lr: 0.001,
            momentum: 0.9,
            dampening: 0.0,
            nesterov: false,
            convention: Convention::LrInside,
            weight_decay: 0.0,
            decay_mode: DecayMode::Coupled,
            decay_biases: false,
            decay_scales: false,
            clip_value: None,
            clip_norm: None,
            schedule: Schedule::Constant,
            binary: BinaryOptimizer::default(),
            state_bits: 32,
        }
    }
}

impl OptimizerConfig {
    /// Reject settings that cannot work, naming the field.
    pub fn validate(&self) -> Result<()> {
        let f = |name: &str, v: f32, ok: bool, why: &str| {
            if ok && v.is_finite() {
                Ok(())
            } else {
                Err(Error::config(format!("optimizer.{name}"), v, why))
            }
        };
        f(
            "lr",
            self.lr,
            self.lr >= 0.0,
            "the learning rate must be a finite number ≥ 0",
        )?;
        f(
            "momentum",
            self.momentum,
            (0.0..1.0).contains(&self.momentum),
            "momentum must be in [0, 1)",
        )?;
        f(
            "dampening",
            self.dampening,
            (0.0..=1.0).contains(&self.dampening),
            "dampening must be in [0, 1]",
        )?;
        f(
            "weight_decay",
            self.weight_decay,
            self.weight_decay >= 0.0,
            "must be ≥ 0",
        )?;
        if let Some(c) = self.clip_value {
            f("clip_value", c, c > 0.0, "must be > 0")?;
        }
        if let Some(c) = self.clip_norm {
            f("clip_norm", c, c > 0.0, "must be > 0")?;
        }
        if self.nesterov && self.momentum == 0.0 {
            return Err(Error::config("optimizer.nesterov", true, "Nesterov needs momentum > 0"));
        }
        if self.nesterov && self.dampening != 0.0 {
            return Err(Error::config(
                "optimizer.dampening",
                self.dampening,
                "Nesterov momentum requires zero dampening (as in PyTorch)",
            ));
        }
        if let BinaryOptimizer::Bop { gamma, threshold } = self.binary {
            f(
                "binary.gamma",
                gamma,
                gamma > 0.0 && gamma <= 1.0,
                "Bop's γ must be in (0, 1]",
            )?;
            f("binary.threshold", threshold, threshold >= 0.0, "Bop's τ must be ≥ 0")?;
        }
        if self.state_bits != 8 && self.state_bits != 32 {
            return Err(Error::config(
                "optimizer.state_bits",
                self.state_bits,
                "the momentum state is kept in 32 (f32) or 8 bits",
            ));
        }
        self.schedule.validate()
    }
}

/// Tensors of at least this many values have their gradient sum, momentum update and copy into
/// the training replica split over two cores when the trainer runs two threads (where the split
/// falls is measured: [`qmomentum_runtime::pool::Balance`]).
pub const SPLIT_MIN: usize = 32 * 1024;

/// The middle of a tensor of `n` values for a split in two: the first multiple of 16 values (64
/// bytes) at or after it, so that with a 64-byte aligned buffer the two cores never write the
/// same cache line (a `Vec<f32>` is only 16-byte aligned in general: then they share one line).
pub fn split_point(n: usize) -> usize {
    n.div_ceil(2).next_multiple_of(16).min(n)
}

/// Per-parameter state: velocity (or Bop's gradient average) and step count, matched to its
/// parameter by name.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamState {
    /// Parameter name (checked at every step and on resume).
    pub name: String,
    /// Momentum velocity `v` (`LrInside`), buffer `b` (`LrOutside`) or Bop's `m`, in f32
    /// (empty when the state is 8-bit).
    pub buffer: Vec<f32>,
    /// The same state in 8 bits (`optimizer.state_bits = 8`, tensors of 4096 values or more).
    pub q8: Option<state8::Quantized8>,
    /// Steps taken on this parameter.
    pub steps: u64,
}

/// A configured optimizer with its state.
#[derive(Clone, Debug)]
pub struct Optimizer {
    /// Configuration.
    pub config: OptimizerConfig,
    /// State per parameter, in model order.
    pub state: Vec<ParamState>,
    /// Steps per epoch (for epoch-based schedules).
    pub steps_per_epoch: u64,
    /// Total epochs (for the cosine schedule).
    pub total_epochs: usize,
    /// Bop flips in the last step.
    pub last_flips: usize,
    /// Cores the momentum update of a tensor of [`SPLIT_MIN`] values or more is split over (the
    /// trainer sets its thread count; 1 by default). The update is element-wise, so the result
    /// does not depend on it.
    pub threads: usize,
    scratch: Vec<f32>,
    state_scratch: Vec<f32>,
    /// Values of frozen entries of a Bop parameter, put back after its update (scratch).
    held: Vec<(usize, f32)>,
    /// The values before an update of a parameter with frozen entries (scratch).
    kept: Vec<f32>,
    /// Where each parameter's update is split over the two cores (measured, see
    /// [`qmomentum_runtime::pool::Balance`]; not state: the values do not depend on it).
    balance: Vec<qmomentum_runtime::pool::Balance>,
}

impl ParamState {
    /// Values held.
    pub fn len(&self) -> usize {
        self.q8.as_ref().map_or(self.buffer.len(), |q| q.len())
    }
    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Bytes of state held.
    pub fn bytes(&self) -> usize {
        self.q8.as_ref().map_or(4 * self.buffer.len(), |q| q.bytes())
    }
}

impl Optimizer {
    /// A new optimizer (validated).
    pub fn new(config: OptimizerConfig) -> Result<Self> {
        config.validate()?;
        Ok(Optimizer {
            config,
            state: Vec::new(),
            steps_per_epoch: 1,
            total_epochs: 1,
            last_flips: 0,
            threads: 1,
            scratch: Vec::new(),
            state_scratch: Vec::new(),
            held: Vec::new(),
            kept: Vec::new(),
            balance: Vec::new(),
        })
    }

    /// The learning rate of 0-based step `t`.
    pub fn lr_at(&self, t: u64) -> f32 {
        self.config
            .schedule
            .lr(self.config.lr, t, self.steps_per_epoch, self.total_epochs)
    }

    /// One update of every parameter from its `grad`; `t` is the 1-based global step.
    pub fn step(&mut self, params: &mut [&mut Param], t: u64) -> Result<()> {
        let sq = self
            .needs_grad_norm()
            .then(|| self.grad_sq_norm(params.iter().map(|p| &**p)));
        self.step_iter(params.iter_mut().map(|p| &mut **p), sq, t)
    }

    /// Whether [`Optimizer::step_iter`] needs the squared global gradient norm (clipping by norm).
    pub fn needs_grad_norm(&self) -> bool {
        self.config.clip_norm.is_some()
    }

    /// Σ g² over the parameters that clipping by norm covers (Bop's ±1 weights excluded).
    pub fn grad_sq_norm<'a>(&self, params: impl Iterator<Item = &'a Param>) -> f64 {
        let bop = matches!(self.config.binary, BinaryOptimizer::Bop { .. });
        params
            .filter(|p| p.kind != ParamKind::Binary || !bop)
            .flat_map(|p| p.grad.iter())
            .map(|&g| g as f64 * g as f64)
            .sum()
    }

    /// [`Optimizer::step`] over an iterator of parameters (the allocation-free form the trainer
    /// uses); `grad_sq_norm` is [`Optimizer::grad_sq_norm`] when [`Optimizer::needs_grad_norm`].
    pub fn step_iter<'a>(
        &mut self,
        params: impl Iterator<Item = &'a mut Param>,
        grad_sq_norm: Option<f64>,
        t: u64,
    ) -> Result<()> {
        let cfg = &self.config;
        let lr = self.lr_at(t.saturating_sub(1));
        if !lr.is_finite() {
            return Err(Error::Diverged(format!(
                "the learning rate of step {t} is {lr} (schedule {}): no update was made",
                cfg.schedule
            )));
        }
        let bop = match cfg.binary {
            BinaryOptimizer::Bop { gamma, threshold } => Some(Bop { gamma, threshold }),
            BinaryOptimizer::Latent => None,
        };
        let norm_scale = match (cfg.clip_norm, grad_sq_norm) {
            (Some(c), Some(sq)) => clip::norm_factor(sq.sqrt(), c),
            (Some(_), None) => {
                return Err(Error::config(
                    "optimizer.clip_norm",
                    "set",
                    "step_iter needs the gradient norm",
                ));
            }
            _ => 1.0,
        };
        let mom = Momentum {
            momentum: cfg.momentum,
            dampening: cfg.dampening,
            nesterov: cfg.nesterov,
            convention: cfg.convention,
        };
        self.last_flips = 0;
        let eight_bit = cfg.state_bits == 8;
        for (i, p) in params.enumerate() {
            if i == self.state.len() {
                // First step: state is created as the parameters are first seen. Large tensors
                // of the momentum groups keep an 8-bit state when asked (Bop's stays f32).
                let q8 = eight_bit && p.len() >= state8::MIN_VALUES && !(p.kind == ParamKind::Binary && bop.is_some());
                self.state.push(ParamState {
                    name: p.name.clone(),
                    buffer: if q8 { Vec::new() } else { vec![0.0; p.len()] },
                    q8: q8.then(|| state8::Quantized8::zeros(p.len())),
                    steps: 0,
                });
            }
            let st = &mut self.state[i];
            if st.name != p.name {
                return Err(Error::Shape(format!(
                    "optimizer state {i} belongs to {}, the parameter is {}",
                    st.name, p.name
                )));
            }
            if st.len() != p.len() {
                return Err(Error::Shape(format!(
                    "optimizer state of {} has {} values, the parameter {}",
                    st.name,
                    st.len(),
                    p.len()
                )));
            }
            // Frozen entries (iterative freezing) are skipped: their values are put back after
            // the update and their momentum is kept at 0 (Bop's ±1 weights: from a list, to
            // count the flips undone; the others: from a copy, in one vectorised pass).
            self.held.clear();
            self.kept.clear();
            let bop_here = p.kind == ParamKind::Binary && bop.is_some();
            if let Some(mask) = p.frozen.as_ref() {
                if bop_here {
                    self.held.extend(
                        mask.iter()
                            .enumerate()
                            .filter(|(_, &m)| m)
                            .map(|(i, _)| (i, p.value[i])),
                    );
                } else {
                    self.kept.extend_from_slice(&p.value);
                }
            }
            if p.kind == ParamKind::Binary {
                if let Some(b) = bop {
                    self.last_flips += b.apply(&mut p.value, &p.grad, &mut st.buffer);
                    for &(i, v) in &self.held {
                        self.last_flips -= (p.value[i] != v) as usize;
                        p.value[i] = v;
                        st.buffer[i] = 0.0;
                    }
                    st.steps = st.steps.saturating_add(1);
                    continue;
                }
            }
            // The state in f32: the buffer itself, or the 8-bit state dequantized into scratch.
            let v: &mut Vec<f32> = match &st.q8 {
                Some(q) => {
                    self.state_scratch.resize(q.len(), 0.0);
                    q.dequantize(&mut self.state_scratch);
                    &mut self.state_scratch
                }
                None => &mut st.buffer,
            };
            let decays = cfg.weight_decay > 0.0
                && match p.kind {
                    ParamKind::Weight | ParamKind::Binary => true,
                    ParamKind::Bias => cfg.decay_biases,
                    ParamKind::Scale => cfg.decay_scales,
                };
            let plain = norm_scale == 1.0 && cfg.clip_value.is_none() && !decays;
            if plain && self.threads >= 2 && p.len() >= SPLIT_MIN {
                // Two shares on two cores, split where their measured times come out equal
                // (not in the middle: the worker's share of the first kernel costs up to three
                // times the caller's, see `pool::Balance`); element-wise, so the same values.
                if self.balance.len() <= i {
                    self.balance.resize(i + 1, Default::default());
                }
                let bal = &mut self.balance[i];
                let (first, n) = (st.steps == 0, p.len());
                let at = bal.split(n, 16);
                let (t0, t1) = p.value.split_at_mut(at);
                let (g0, g1) = p.grad.split_at(at);
                let (v0, v1) = v.split_at_mut(at);
                bal.join(
                    at,
                    n,
                    || mom.apply(t0, g0, v0, lr, first),
                    || mom.apply(t1, g1, v1, lr, first),
                );
            } else if plain {
                // Nothing to transform: update straight from the gradient (no copy).
                mom.apply(&mut p.value, &p.grad, v, lr, st.steps == 0);
            } else {
                let g = &mut self.scratch;
                g.clear();
                g.extend_from_slice(&p.grad);
                if norm_scale != 1.0 {
                    g.iter_mut().for_each(|v| *v *= norm_scale);
                }
                if let Some(c) = cfg.clip_value {
                    clip::clip_value(g, c);
                }
                if decays {
                    match cfg.decay_mode {
                        DecayMode::Coupled => decay::couple(g, &p.value, cfg.weight_decay),
                        DecayMode::Decoupled => decay::decouple(&mut p.value, lr, cfg.weight_decay),
                    }
                }
                mom.apply(&mut p.value, g, v, lr, st.steps == 0);
            }
            if let (Some(mask), false) = (p.frozen.as_ref(), self.kept.is_empty()) {
                restore_frozen(&mut p.value, v, mask, &self.kept);
            }
            if let Some(q) = st.q8.as_mut() {
                q.quantize(&self.state_scratch);
            }
            st.steps = st.steps.saturating_add(1);
        }
        Ok(())
    }
}

crate::simd::widest! {
    /// Put frozen entries back after an update: `θ = kept`, `v = 0` where `frozen`.
    fn restore_frozen(theta: &mut [f32], v: &mut [f32], frozen: &[bool], kept: &[f32]) {
        for (((t, v), &f), &k) in theta.iter_mut().zip(v.iter_mut()).zip(frozen).zip(kept) {
            *t = if f { k } else { *t };
            *v = if f { 0.0 } else { *v };
        }
    }
}

#[cfg(test)]
mod tests;
