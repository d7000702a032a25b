//! Human-readable forms of every value a user sees (the CLI's headers, `info`, tables and error
//! messages): `cosine(warm-up 5 epochs, min lr 0)`, `8-bit per-channel symmetric (narrow)`,
//! `momentum 0.9 (lr inside the velocity)`, never Rust's `Debug` output.

use crate::layers::Activation;
use crate::optim::{BinaryOptimizer, Convention, DecayMode, OptimizerConfig, Schedule};
use crate::quant::ptq::Calibration;
use crate::quant::{ActQuant, LayerQuant, Observer, TernaryRule, WeightQuant};
use std::fmt::{Display, Formatter, Result};

impl Display for Activation {
    fn fmt(&self, f: &mut Formatter<'_>) -> Result {
        f.write_str(match self {
            Activation::Linear => "linear",
            Activation::Relu => "relu",
            Activation::Sigmoid => "sigmoid",
            Activation::Tanh => "tanh",
            Activation::Softmax => "softmax",
        })
    }
}

impl Display for Schedule {
    fn fmt(&self, f: &mut Formatter<'_>) -> Result {
        match self {
            Schedule::Constant => f.write_str("constant"),
            Schedule::Step { every, gamma } => write!(f, "step(×{gamma} every {every} epochs)"),
            Schedule::Exponential { gamma } => write!(f, "exponential(×{gamma} per epoch)"),
            Schedule::Cosine { warmup_epochs, min_lr } => {
                write!(f, "cosine(warm-up {warmup_epochs} epochs, min lr {min_lr})")
            }
            Schedule::Piecewise { boundaries, values } => {
                write!(f, "piecewise(")?;
                for (i, v) in values.iter().enumerate() {
                    match boundaries.get(i) {
                        Some(b) => write!(f, "{v} to step {b}, ")?,
                        None => write!(f, "{v} after")?,
                    }
                }
                f.write_str(")")
            }
        }
    }
}

impl Display for Convention {
    fn fmt(&self, f: &mut Formatter<'_>) -> Result {
        f.write_str(match self {
            Convention::LrInside => "lr inside the velocity (design document, Keras)",
            Convention::LrOutside => "lr outside the buffer (PyTorch)",
        })
    }
}

impl Display for BinaryOptimizer {
    fn fmt(&self, f: &mut Formatter<'_>) -> Result {
        match self {
            BinaryOptimizer::Latent => f.write_str("momentum on latent float weights"),
            BinaryOptimizer::Bop { gamma, threshold } => write!(f, "Bop(γ {gamma}, τ {threshold})"),
        }
    }
}

impl Display for OptimizerConfig {
    /// `momentum 0.9 (lr inside the velocity …), lr 0.001 constant` and every non-default option.
    fn fmt(&self, f: &mut Formatter<'_>) -> Result {
        if self.momentum == 0.0 {
            write!(f, "plain SGD")?;
        } else {
            write!(f, "momentum {} ({}", self.momentum, self.convention)?;
            if self.nesterov {
                f.write_str(", Nesterov")?;
            }
            if self.dampening != 0.0 {
                write!(f, ", dampening {}", self.dampening)?;
            }
            f.write_str(")")?;
        }
        write!(f, ", lr {} {}", self.lr, self.schedule)?;
        if self.weight_decay > 0.0 {
            let mode = match self.decay_mode {
                DecayMode::Coupled => "coupled L2",
                DecayMode::Decoupled => "decoupled",
            };
            let mut on = vec!["weights"];
            if self.decay_biases {
                on.push("biases");
            }
            if self.decay_scales {
                on.push("scales");
            }
            write!(
                f,
                ", weight decay {} ({mode}, on {})",
                self.weight_decay,
                on.join(" and ")
            )?;
        }
        if let Some(c) = self.clip_value {
            write!(f, ", gradients clipped to ±{c}")?;
        }
        if let Some(c) = self.clip_norm {
            write!(f, ", global gradient norm clipped to {c}")?;
        }
        if self.state_bits == 8 {
            f.write_str(", 8-bit momentum state")?;
        }
        Ok(())
    }
}

impl Display for TernaryRule {
    fn fmt(&self, f: &mut Formatter<'_>) -> Result {
        f.write_str(match self {
            TernaryRule::Twn => "TWN threshold 0.7·mean|w|",
            TernaryRule::Absmean => "BitNet b1.58 absmean",
        })
    }
}

impl Display for WeightQuant {
    fn fmt(&self, f: &mut Formatter<'_>) -> Result {
        match self {
            WeightQuant::Int {
                bits,
                per_channel,
                narrow,
            } => write!(
                f,
                "{bits}-bit {} symmetric{}",
                if *per_channel { "per-channel" } else { "per-tensor" },
                if *narrow { " (narrow range)" } else { " (full range)" }
            ),
            WeightQuant::Binary { scaled: true } => f.write_str("binary ±α (per-channel mean|w|)"),
            WeightQuant::Binary { scaled: false } => f.write_str("binary ±1"),
            WeightQuant::Ternary { rule } => write!(f, "ternary ({rule})"),
        }
    }
}

impl Display for Observer {
    fn fmt(&self, f: &mut Formatter<'_>) -> Result {
        match self {
            Observer::MinMax => f.write_str("min-max range"),
            Observer::Ema { decay } => write!(f, "EMA range (decay {decay})"),
            Observer::Lsq => f.write_str("learned step (LSQ)"),
        }
    }
}

impl Display for ActQuant {
    fn fmt(&self, f: &mut Formatter<'_>) -> Result {
        if self.bits == 1 {
            f.write_str("sign (1-bit)")
        } else {
            write!(f, "{}-bit per-tensor asymmetric, {}", self.bits, self.observer)
        }
    }
}

impl Display for LayerQuant {
    fn fmt(&self, f: &mut Formatter<'_>) -> Result {
        match (&self.weights, &self.activations) {
            (None, None) => f.write_str("float"),
            (w, a) => {
                match w {
                    Some(w) => write!(f, "weights {w}")?,
                    None => f.write_str("float weights")?,
                }
                match a {
                    Some(a) => write!(f, "; outputs {a}"),
                    None => f.write_str("; float outputs"),
                }
            }
        }
    }
}

impl Display for Calibration {
    fn fmt(&self, f: &mut Formatter<'_>) -> Result {
        match self {
            Calibration::MinMax => f.write_str("min-max"),
            Calibration::Percentile { p } => write!(f, "percentile {p}"),
            Calibration::Mse => f.write_str("minimum MSE"),
        }
    }
}

impl crate::config::ModelConfig {
    /// A one-line description: `MLP 784-128-64-10` for a stack of dense layers, otherwise the
    /// layers in order (`28×28×1 → conv 32 3×3 same → batch_norm → relu → max_pool 2 → … → dense 10`).
    pub fn summary(&self) -> String {
        use crate::config::LayerConfig as L;
        let dense_only = self.layers.iter().all(|l| {
            matches!(
                l,
                L::Dense { .. } | L::Dropout { .. } | L::Flatten | L::Activation { .. }
            )
        });
        if dense_only {
            let mut parts = vec![self.input.to_string()];
            parts.extend(self.layers.iter().filter_map(|l| match l {
                L::Dense { units, .. } => Some(units.to_string()),
                _ => None,
            }));
            return format!("MLP {}", parts.join("-"));
        }
        let input = self
            .input_shape()
            .map(|s| s.to_string())
            .unwrap_or_else(|_| self.input.to_string());
        let mut parts = vec![input];
        for l in &self.layers {
            parts.push(match l {
                L::Dense { units, .. } => format!("dense {units}"),
                L::Conv2d {
                    filters,
                    kernel_size,
                    strides,
                    padding,
                    activation,
                    ..
                } => {
                    let k = kernel_size.get();
                    let s = strides.get();
                    let mut t = format!("conv {filters} {}×{}", k[0], k[1]);
                    if s != [1, 1] {
                        t += &format!(" stride {}", s[0]);
                    }
                    if *padding == crate::layers::conv2d::Padding::Same {
                        t += " same";
                    }
                    if *activation != Activation::Linear {
                        t += &format!(" {activation}");
                    }
                    t
                }
                L::MaxPool2d { pool_size, .. } => format!("max_pool {}", pool_size.get()[0]),
                L::AvgPool2d { pool_size, .. } => format!("avg_pool {}", pool_size.get()[0]),
                L::GlobalAvgPool => "global_avg_pool".into(),
                L::BatchNorm { .. } => "batch_norm".into(),
                L::Dropout { rate } => format!("dropout {rate}"),
                L::Activation { activation } => activation.to_string(),
                L::Flatten => "flatten".into(),
            });
        }
        parts.join(" → ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_are_human() {
        let s = Schedule::Cosine {
            warmup_epochs: 5.0,
            min_lr: 0.0,
        };
        assert_eq!(s.to_string(), "cosine(warm-up 5 epochs, min lr 0)");
        let w = WeightQuant::Int {
            bits: 8,
            per_channel: true,
            narrow: true,
        };
        assert_eq!(w.to_string(), "8-bit per-channel symmetric (narrow range)");
        let o = OptimizerConfig::default().to_string();
        assert_eq!(
            o,
            "momentum 0.9 (lr inside the velocity (design document, Keras)), lr 0.001 constant"
        );
        assert_eq!(BinaryOptimizer::default().to_string(), "Bop(γ 0.0001, τ 0.00000001)");
        assert_eq!(Calibration::Percentile { p: 99.9 }.to_string(), "percentile 99.9");
        for text in [o, s.to_string(), w.to_string()] {
            assert!(!text.contains('{') && !text.contains("Some("), "{text}");
        }
    }
}
