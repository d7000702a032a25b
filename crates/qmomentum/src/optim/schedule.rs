//! Learning-rate schedules, evaluated per optimizer step.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};

/// A schedule. Epoch-based rules use `steps_per_epoch` to turn the step into an epoch.
#[derive(Clone, Debug, PartialEq, Default, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Schedule {
    /// `η_t = η`.
    #[default]
    Constant,
    /// `η·γ^⌊epoch/every⌋`.
    Step {
        /// Epochs between drops.
        every: usize,
        /// Factor per drop.
        gamma: f32,
    },
    /// `η·γ^epoch` (per completed epoch).
    Exponential {
        /// Factor per epoch.
        gamma: f32,
    },
    /// Linear warm-up from 0 over `warmup_epochs`, then cosine from `η` to `min_lr` at the end
    /// of training.
    Cosine {
        /// Warm-up length in epochs (may be fractional).
        #[serde(default)]
        warmup_epochs: f32,
        /// Final learning rate.
        #[serde(default)]
        min_lr: f32,
    },
    /// Keras `PiecewiseConstantDecay`: `values[0]` while `step ≤ boundaries[0]`, `values[i]` while
    /// `boundaries[i−1] < step ≤ boundaries[i]`, the last value after the last boundary (`step` is
    /// the 0-based optimizer step, Keras's `optimizer.iterations` when the update is applied).
    Piecewise {
        /// Step boundaries (increasing).
        boundaries: Vec<u64>,
        /// One more value than boundaries.
        values: Vec<f32>,
    },
}

impl Schedule {
    /// Check the parameters.
    pub fn validate(&self) -> Result<()> {
        match self {
            Schedule::Step { every, gamma } => {
                if *every == 0 {
                    return Err(Error::config("schedule.every", every, "must be at least 1"));
                }
                check_gamma(*gamma)
            }
            Schedule::Exponential { gamma } => check_gamma(*gamma),
            Schedule::Cosine { warmup_epochs, min_lr } => {
                if !(*warmup_epochs >= 0.0 && warmup_epochs.is_finite()) {
                    return Err(Error::config("schedule.warmup_epochs", warmup_epochs, "must be ≥ 0"));
                }
                if !(*min_lr >= 0.0 && min_lr.is_finite()) {
                    return Err(Error::config("schedule.min_lr", min_lr, "must be ≥ 0"));
                }
                Ok(())
            }
            Schedule::Piecewise { boundaries, values } => {
                if values.len() != boundaries.len() + 1 {
                    return Err(Error::config(
                        "schedule.values",
                        values.len(),
                        format!("needs one more value than boundaries ({})", boundaries.len()),
                    ));
                }
                if boundaries.windows(2).any(|w| w[0] >= w[1]) {
                    return Err(Error::config(
                        "schedule.boundaries",
                        format!("{boundaries:?}"),
                        "must increase",
                    ));
                }
                if let Some(v) = values.iter().find(|v| !(**v >= 0.0 && v.is_finite())) {
                    return Err(Error::config("schedule.values", v, "learning rates must be ≥ 0"));
                }
                Ok(())
            }
            Schedule::Constant => Ok(()),
        }
    }

    /// The learning rate at 0-based `step`.
    pub fn lr(&self, base: f32, step: u64, steps_per_epoch: u64, total_epochs: usize) -> f32 {
        let spe = steps_per_epoch.max(1);
        let epoch = step / spe;
        match self {
            Schedule::Constant => base,
            Schedule::Step { every, gamma } => base * gamma.powi(exponent(epoch / (*every).max(1) as u64)),
            Schedule::Exponential { gamma } => base * gamma.powi(exponent(epoch)),
            Schedule::Cosine { warmup_epochs, min_lr } => {
                let warm = (*warmup_epochs as f64 * spe as f64) as u64;
                let total = (total_epochs as u64).saturating_mul(spe).max(1);
                if step < warm {
                    base * (step + 1) as f32 / warm as f32
                } else {
                    let t = ((step - warm) as f64 / (total.saturating_sub(warm)).max(1) as f64).min(1.0);
                    min_lr + (base - min_lr) * (0.5 * (1.0 + (std::f64::consts::PI * t).cos())) as f32
                }
            }
            Schedule::Piecewise { boundaries, values } => {
                let i = boundaries.iter().take_while(|&&b| step > b).count();
                values[i]
            }
        }
    }
}

/// An epoch count as a `powi` exponent, saturated rather than wrapped.
fn exponent(e: u64) -> i32 {
    e.min(i32::MAX as u64) as i32
}

fn check_gamma(g: f32) -> Result<()> {
    if g > 0.0 && g.is_finite() {
        Ok(())
    } else {
        Err(Error::config("schedule.gamma", g, "must be > 0"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn schedules_by_hand() {
        let s = Schedule::Step { every: 2, gamma: 0.5 };
        assert_eq!(s.lr(1.0, 0, 10, 6), 1.0);
        assert_eq!(s.lr(1.0, 19, 10, 6), 1.0);
        assert_eq!(s.lr(1.0, 20, 10, 6), 0.5);
        assert_eq!(s.lr(1.0, 45, 10, 6), 0.25);
        let e = Schedule::Exponential { gamma: 0.9 };
        assert!((e.lr(1.0, 25, 10, 6) - 0.81).abs() < 1e-6);
        let c = Schedule::Cosine {
            warmup_epochs: 1.0,
            min_lr: 0.0,
        };
        assert!((c.lr(1.0, 4, 10, 3) - 0.5).abs() < 1e-6); // warm-up: (4+1)/10
        assert!((c.lr(1.0, 10, 10, 3) - 1.0).abs() < 1e-6); // peak
        assert!((c.lr(1.0, 20, 10, 3) - 0.5).abs() < 1e-6); // half way down
                                                            // The last step that runs is step 29 of 30 (0-based): t = 19/20 of the cosine.
        let last = 0.5 * (1.0 + (std::f64::consts::PI * 19.0 / 20.0).cos());
        assert!((c.lr(1.0, 29, 10, 3) as f64 - last).abs() < 1e-6);
        assert!(c.lr(1.0, 29, 10, 3) > 0.0 && c.lr(1.0, 29, 10, 3) < 0.01);
        // Keras `PiecewiseConstantDecay(boundaries=[1, 3], values=[0.1, 0.01, 0.001])`, written
        // out from its definition: x ≤ 1 → 0.1; 1 < x ≤ 3 → 0.01; x > 3 → 0.001.
        let p = Schedule::Piecewise {
            boundaries: vec![1, 3],
            values: vec![0.1, 0.01, 0.001],
        };
        let got: Vec<f32> = (0..6).map(|x| p.lr(9.0, x, 1, 1)).collect();
        assert_eq!(got, vec![0.1, 0.1, 0.01, 0.01, 0.001, 0.001]);
        assert!(Schedule::Piecewise {
            boundaries: vec![1],
            values: vec![0.1]
        }
        .validate()
        .is_err());
    }
}
