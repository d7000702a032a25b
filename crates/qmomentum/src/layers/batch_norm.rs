//! `BatchNorm`: `y = γ·(x − μ)/√(σ² + ε) + β` per channel (the last dimension, NHWC).
//!
//! Training normalises with the batch's mean and (biased) variance over every row (samples ×
//! positions) and updates the running statistics; evaluation uses the running statistics. Those
//! are [`Buffer`]s: checkpointed, never optimized. γ is a scale and β a bias for the optimizer's
//! groups (no weight decay unless asked).
//!
//! The running statistics' "momentum" has opposite conventions, both accepted, spelled out:
//! * Keras `BatchNormalization(momentum=m)`, `m` = weight of the OLD value (default 0.99):
//!   `μ_run ← m·μ_run + (1 − m)·μ_B`, `σ²_run ← m·σ²_run + (1 − m)·σ²_B` (biased batch variance).
//! * PyTorch `BatchNorm2d(momentum=p)`, `p` = weight of the NEW batch (default 0.1):
//!   `μ_run ← (1 − p)·μ_run + p·μ_B`, `σ²_run ← (1 − p)·σ²_run + p·σ²_B·n/(n − 1)` (unbiased).
//!
//! When a training step is split over two cores, each half is normalised with its own batch
//! statistics (as data-parallel training without synchronised BN does) and the running statistics
//! are updated once per step from the statistics of the whole batch (the halves combined exactly).

use super::param::{Buffer, Param, ParamKind};
use serde::{Deserialize, Serialize};

/// How the running statistics follow the batches.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "convention", rename_all = "snake_case")]
pub enum BnMomentum {
    /// Keras: `momentum` is the weight of the old value; biased batch variance.
    Keras {
        /// In [0, 1).
        momentum: f32,
    },
    /// PyTorch: `momentum` is the weight of the new batch; unbiased batch variance.
    Torch {
        /// In (0, 1].
        momentum: f32,
    },
}

/// Per-channel batch normalisation.
#[derive(Clone, Debug)]
pub struct BatchNorm {
    /// Index in the model.
    pub index: usize,
    /// Channels.
    pub channels: usize,
    /// ε.
    pub epsilon: f32,
    /// Running-statistics rule.
    pub momentum: BnMomentum,
    /// γ `[c]`.
    pub gamma: Param,
    /// β `[c]`.
    pub beta: Param,
    /// Running mean `[c]`.
    pub running_mean: Buffer,
    /// Running (population) variance `[c]`.
    pub running_var: Buffer,
    /// Statistics of the last training batch this replica saw: Σx, Σx² per channel (f64) and the
    /// rows counted (merged over replicas by the model, then [`BatchNorm::update_running`]).
    pub batch_sums: (Vec<f64>, Vec<f64>, u64),
    x_hat: Vec<f32>,
    inv_std: Vec<f32>,
    mean: Vec<f32>,
    dsum: Vec<f64>,
    dsum_xhat: Vec<f64>,
}

impl BatchNorm {
    /// γ = 1, β = 0, running mean 0 and variance 1 (both frameworks' initial state).
    pub fn new(index: usize, channels: usize, epsilon: f32, momentum: BnMomentum) -> Self {
        BatchNorm {
            index,
            channels,
            epsilon,
            momentum,
            gamma: Param::new(
                format!("layers.{index}.gamma"),
                ParamKind::Scale,
                vec![channels],
                vec![1.0; channels],
            ),
            beta: Param::new(
                format!("layers.{index}.beta"),
                ParamKind::Bias,
                vec![channels],
                vec![0.0; channels],
            ),
            running_mean: Buffer::new(
                format!("layers.{index}.running_mean"),
                vec![channels],
                vec![0.0; channels],
            ),
            running_var: Buffer::new(
                format!("layers.{index}.running_var"),
                vec![channels],
                vec![1.0; channels],
            ),
            batch_sums: (vec![0.0; channels], vec![0.0; channels], 0),
            x_hat: Vec::new(),
            inv_std: vec![0.0; channels],
            mean: vec![0.0; channels],
            dsum: vec![0.0; channels],
            dsum_xhat: vec![0.0; channels],
        }
    }

    /// Forward over `n` values (`n / channels` rows).
    pub fn forward(&mut self, x: &[f32], y: &mut [f32], n: usize, training: bool) {
        let c = self.channels;
        let rows = n / c;
        if training {
            let (s1, s2, count) = &mut self.batch_sums;
            s1.fill(0.0);
            s2.fill(0.0);
            for row in x[..n].chunks_exact(c) {
                for ((a, b), &v) in s1.iter_mut().zip(s2.iter_mut()).zip(row) {
                    *a += v as f64;
                    *b += v as f64 * v as f64;
                }
            }
            *count = rows as u64;
            let r = rows.max(1) as f64;
            for ch in 0..c {
                let m = s1[ch] / r;
                let var = (s2[ch] / r - m * m).max(0.0);
                self.mean[ch] = m as f32;
                self.inv_std[ch] = (1.0 / (var + self.epsilon as f64).sqrt()) as f32;
            }
            if self.x_hat.len() < n {
                self.x_hat.resize(n, 0.0);
            }
        } else {
            for ch in 0..c {
                self.mean[ch] = self.running_mean.value[ch];
                self.inv_std[ch] = 1.0 / (self.running_var.value[ch] + self.epsilon).sqrt();
            }
        }
        let (g, b) = (&self.gamma.value, &self.beta.value);
        for (r, (xr, yr)) in x[..n].chunks_exact(c).zip(y[..n].chunks_exact_mut(c)).enumerate() {
            for ch in 0..c {
                let xh = (xr[ch] - self.mean[ch]) * self.inv_std[ch];
                if training {
                    self.x_hat[r * c + ch] = xh;
                }
                yr[ch] = g[ch] * xh + b[ch];
            }
        }
    }

    /// Backward (training mode) over `n` values:
    /// `dx = (γ/σ)·(dy − mean(dy) − x̂·mean(dy·x̂))`, `dγ = Σ dy·x̂`, `dβ = Σ dy`.
    pub fn backward(&mut self, dy: &[f32], dx: Option<&mut [f32]>, n: usize) {
        let c = self.channels;
        let rows = (n / c).max(1) as f64;
        self.dsum.fill(0.0);
        self.dsum_xhat.fill(0.0);
        for (gr, xr) in dy[..n].chunks_exact(c).zip(self.x_hat[..n].chunks_exact(c)) {
            for ch in 0..c {
                self.dsum[ch] += gr[ch] as f64;
                self.dsum_xhat[ch] += gr[ch] as f64 * xr[ch] as f64;
            }
        }
        for ch in 0..c {
            self.beta.grad[ch] = self.dsum[ch] as f32;
            self.gamma.grad[ch] = self.dsum_xhat[ch] as f32;
        }
        if let Some(dx) = dx {
            for ((dxr, gr), xr) in dx[..n]
                .chunks_exact_mut(c)
                .zip(dy[..n].chunks_exact(c))
                .zip(self.x_hat[..n].chunks_exact(c))
            {
                for ch in 0..c {
                    let k = self.gamma.value[ch] * self.inv_std[ch];
                    let m1 = (self.dsum[ch] / rows) as f32;
                    let m2 = (self.dsum_xhat[ch] / rows) as f32;
                    dxr[ch] = k * (gr[ch] - m1 - xr[ch] * m2);
                }
            }
        }
    }

    /// Update the running statistics from the sums of a whole batch (`Σx`, `Σx²`, rows).
    pub fn update_running(&mut self, s1: &[f64], s2: &[f64], rows: u64) {
        if rows == 0 {
            return;
        }
        let r = rows as f64;
        for ch in 0..self.channels {
            let m = s1[ch] / r;
            let var = (s2[ch] / r - m * m).max(0.0);
            let (rm, rv) = (&mut self.running_mean.value[ch], &mut self.running_var.value[ch]);
            match self.momentum {
                BnMomentum::Keras { momentum } => {
                    let k = momentum as f64;
                    *rm = (k * *rm as f64 + (1.0 - k) * m) as f32;
                    *rv = (k * *rv as f64 + (1.0 - k) * var) as f32;
                }
                BnMomentum::Torch { momentum } => {
                    let p = momentum as f64;
                    let unbiased = if rows > 1 { var * r / (r - 1.0) } else { var };
                    *rm = ((1.0 - p) * *rm as f64 + p * m) as f32;
                    *rv = ((1.0 - p) * *rv as f64 + p * unbiased) as f32;
                }
            }
        }
    }
}
