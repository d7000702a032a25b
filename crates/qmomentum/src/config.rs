//! Configuration: the model architecture and the whole training run, as TOML.
//!
//! ```
//! let cfg: qmomentum::config::TrainConfig = toml::from_str(r#"
//!     epochs = 2
//!     quant = "w8a8"
//!     [optimizer]
//!     lr = 0.01
//!     momentum = 0.9
//! "#).unwrap();
//! cfg.validate().unwrap();
//! assert_eq!(cfg.model.layers.len(), 3); // the design document's MLP by default
//! ```

use crate::error::{Error, Result};
use crate::layers::Activation;
use crate::optim::OptimizerConfig;
use crate::quant::{LayerQuant, Scheme};
use serde::{Deserialize, Serialize};

/// One layer of the architecture.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum LayerConfig {
    /// `Dense(units, activation)`, optionally with its own quantization (overrides the scheme).
    Dense {
        /// Output features.
        units: usize,
        /// Activation.
        #[serde(default)]
        activation: Activation,
        /// Per-layer quantization override.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        quant: Option<LayerQuant>,
    },
    /// Dropout.
    Dropout {
        /// Fraction dropped.
        rate: f32,
    },
    /// A stand-alone activation.
    Activation {
        /// Which.
        activation: Activation,
    },
    /// Flatten.
    Flatten,
}

/// A `Sequential` architecture.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Input features.
    pub input: usize,
    /// Binarize the input (values in [0, 1]): `x ≥ t` → +1, else −1. The `binary-all` preset
    /// sets 0.5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub binarize_input: Option<f32>,
    /// Layers in order.
    pub layers: Vec<LayerConfig>,
}

impl Default for ModelConfig {
    /// The design document's MLP: 784 → Dense(128, relu) → Dense(64, relu) → Dense(10, softmax).
    fn default() -> Self {
        let d = |units, activation| LayerConfig::Dense {
            units,
            activation,
            quant: None,
        };
        ModelConfig {
            input: 784,
            binarize_input: None,
            layers: vec![
                d(128, Activation::Relu),
                d(64, Activation::Relu),
                d(10, Activation::Softmax),
            ],
        }
    }
}

/// Largest layer width (inputs or units) a config may ask for.
pub const MAX_UNITS: usize = 1 << 20;
/// Largest number of weights in a model (×4 bytes for values, gradients and optimizer state:
/// about 1.5 GiB at this bound). Checked before anything is allocated, so a config or a
/// checkpoint header asking for `units = 10^12` is an error, not an allocation abort.
pub const MAX_PARAMS: usize = 1 << 27;

impl ModelConfig {
    /// `(layer index, inputs, units)` of every dense layer, from the config alone (no allocation
    /// of weights): what `validate` bounds and what a checkpoint's tensors are checked against.
    pub fn dense_shapes(&self) -> Vec<(usize, usize, usize)> {
        let mut width = self.input;
        let mut out = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            if let LayerConfig::Dense { units, .. } = l {
                out.push((i, width, *units));
                width = *units;
            }
        }
        out
    }

    /// Check sizes and values.
    pub fn validate(&self) -> Result<()> {
        if self.input == 0 {
            return Err(Error::config("model.input", 0, "must be at least 1"));
        }
        if self.input > MAX_UNITS {
            return Err(Error::config(
                "model.input",
                self.input,
                format!("at most {MAX_UNITS} input features"),
            ));
        }
        if let Some(t) = self.binarize_input {
            if !(0.0..=1.0).contains(&t) {
                return Err(Error::config(
                    "model.binarize_input",
                    t,
                    "the threshold must be in [0, 1]",
                ));
            }
        }
        let mut dense = 0;
        for (i, l) in self.layers.iter().enumerate() {
            match l {
                LayerConfig::Dense {
                    units,
                    activation,
                    quant,
                } => {
                    if *units == 0 || *units > MAX_UNITS {
                        return Err(Error::config(
                            format!("model.layers[{i}].units"),
                            units,
                            format!("must be in 1..={MAX_UNITS}"),
                        ));
                    }
                    if *activation == Activation::Softmax && i + 1 != self.layers.len() {
                        return Err(Error::config(
                            format!("model.layers[{i}].activation"),
                            "softmax",
                            "softmax is only supported on the last layer",
                        ));
                    }
                    if let Some(q) = quant {
                        q.validate(i)?;
                    }
                    dense += 1;
                }
                LayerConfig::Dropout { rate } => {
                    if !(0.0..1.0).contains(rate) {
                        return Err(Error::config(
                            format!("model.layers[{i}].rate"),
                            rate,
                            "dropout rate must be in [0, 1)",
                        ));
                    }
                }
                LayerConfig::Activation { activation } => {
                    if *activation == Activation::Softmax && i + 1 != self.layers.len() {
                        return Err(Error::config(
                            format!("model.layers[{i}].activation"),
                            "softmax",
                            "softmax is only supported on the last layer",
                        ));
                    }
                }
                LayerConfig::Flatten => {}
            }
        }
        if dense == 0 {
            return Err(Error::config("model.layers", "[]", "needs at least one dense layer"));
        }
        let weights: usize = self.dense_shapes().iter().map(|&(_, i, o)| i * o).sum();
        if weights > MAX_PARAMS {
            return Err(Error::config(
                "model.layers",
                format!("{weights} weights"),
                format!("the model may hold at most {MAX_PARAMS} weights"),
            ));
        }
        Ok(())
    }
}

/// Checkpointing.
#[derive(Clone, Debug, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CheckpointConfig {
    /// Also checkpoint every N optimizer steps (0 = only at the end of each epoch).
    pub every_steps: u64,
}

/// What to do when the loss or a gradient is NaN/inf.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnNonFinite {
    /// Stop at once with the step and layer named (the last good checkpoint is kept).
    #[default]
    Stop,
    /// Skip the update of that step (as mixed-precision loss scalers do) and go on.
    Skip,
}

/// A whole training run (the TOML file of `qmomentum train --config`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Seed of initialisation, shuffling and dropout.
    pub seed: u64,
    /// Epochs.
    pub epochs: usize,
    /// Batch size.
    pub batch_size: usize,
    /// Reshuffle the training set every epoch.
    pub shuffle: bool,
    /// Cores a training step uses (1 or 2; the batch is split in two halves). Results are
    /// deterministic for a given value; 1 and 2 differ in float rounding only.
    pub threads: usize,
    /// Fraction of the training set (taken from its end, as Keras) held out for validation.
    pub validation_split: f32,
    /// Quantization preset applied to every dense layer without its own `quant`.
    pub quant: Scheme,
    /// Freeze activation observers after this many epochs.
    pub freeze_observers_after: Option<usize>,
    /// Length of the learning-rate schedule in epochs (the cosine's horizon); `None` = `epochs`.
    /// A run extended with `--resume --epochs N` keeps its original horizon here, so the
    /// schedule does not change under the epochs already trained.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule_epochs: Option<usize>,
    /// The architecture.
    pub model: ModelConfig,
    /// The optimizer.
    pub optimizer: OptimizerConfig,
    /// Checkpointing.
    pub checkpoint: CheckpointConfig,
    /// NaN/inf policy.
    pub on_non_finite: OnNonFinite,
}

impl Default for TrainConfig {
    /// The design document's program: 10 epochs, batch 128, Momentum 0.9, lr 0.001, no QAT.
    fn default() -> Self {
        TrainConfig {
            seed: 0,
            epochs: 10,
            batch_size: 128,
            shuffle: true,
            threads: 2,
            validation_split: 0.0,
            quant: Scheme::Fp32,
            freeze_observers_after: None,
            schedule_epochs: None,
            model: ModelConfig::default(),
            optimizer: OptimizerConfig::default(),
            checkpoint: CheckpointConfig::default(),
            on_non_finite: OnNonFinite::Stop,
        }
    }
}

impl TrainConfig {
    /// Read a TOML file; unknown keys and impossible values are errors naming the file and field.
    pub fn from_toml_file(path: &std::path::Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let cfg: TrainConfig = toml::from_str(&text).map_err(|e| Error::data(path, format!("invalid config: {e}")))?;
        cfg.validate().map_err(|e| Error::data(path, e.to_string()))?;
        Ok(cfg)
    }

    /// Check every value.
    pub fn validate(&self) -> Result<()> {
        if self.epochs == 0 || self.epochs > 1_000_000 {
            return Err(Error::config("epochs", self.epochs, "must be in 1..=1000000"));
        }
        if let Some(e) = self.schedule_epochs {
            if e == 0 || e > 1_000_000 {
                return Err(Error::config("schedule_epochs", e, "must be in 1..=1000000"));
            }
        }
        if self.batch_size == 0 || self.batch_size > 1 << 20 {
            return Err(Error::config("batch_size", self.batch_size, "must be in 1..=1048576"));
        }
        if !(1..=2).contains(&self.threads) {
            return Err(Error::config(
                "threads",
                self.threads,
                "a training step uses 1 or 2 threads",
            ));
        }
        if !(0.0..1.0).contains(&self.validation_split) {
            return Err(Error::config(
                "validation_split",
                self.validation_split,
                "must be in [0, 1)",
            ));
        }
        self.model.validate()?;
        self.optimizer.validate()
    }
}
