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
use crate::layers::conv2d::{Geometry, Padding};
use crate::layers::{Activation, Shape};
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
    /// `Conv2D(filters, kernel_size, strides, padding, dilation_rate, groups, activation)` over
    /// NHWC activations (Keras's names), optionally with its own quantization.
    Conv2d {
        /// Output channels.
        filters: usize,
        /// `3` or `[3, 3]`.
        kernel_size: Pair,
        /// Default 1.
        #[serde(default = "pair1")]
        strides: Pair,
        /// `"valid"` (default), `"same"` or `{ explicit = [top, left, bottom, right] }`.
        #[serde(default)]
        padding: Padding,
        /// Default 1.
        #[serde(default = "pair1")]
        dilation_rate: Pair,
        /// Default 1 (`groups = channels`: depthwise).
        #[serde(default = "one")]
        groups: usize,
        /// Activation.
        #[serde(default)]
        activation: Activation,
        /// Per-layer quantization override.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        quant: Option<LayerQuant>,
    },
    /// `MaxPooling2D(pool_size, strides, padding)`.
    MaxPool2d {
        /// Default 2.
        #[serde(default = "pair2")]
        pool_size: Pair,
        /// Default: the pool size.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        strides: Option<Pair>,
        /// Default valid.
        #[serde(default)]
        padding: Padding,
    },
    /// `AveragePooling2D(pool_size, strides, padding)`; padded positions are not counted.
    AvgPool2d {
        /// Default 2.
        #[serde(default = "pair2")]
        pool_size: Pair,
        /// Default: the pool size.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        strides: Option<Pair>,
        /// Default valid.
        #[serde(default)]
        padding: Padding,
    },
    /// `GlobalAveragePooling2D`.
    GlobalAvgPool,
    /// `BatchNormalization`. The running statistics' momentum in ONE of the two conventions:
    /// `momentum` = Keras's (weight of the old value, default 0.99, biased batch variance) or
    /// `torch_momentum` = PyTorch's (weight of the new batch, e.g. 0.1, unbiased variance).
    BatchNorm {
        /// Keras convention.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        momentum: Option<f32>,
        /// PyTorch convention.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        torch_momentum: Option<f32>,
        /// ε (Keras's default 1e-3; PyTorch's is 1e-5).
        #[serde(default = "bn_epsilon")]
        epsilon: f32,
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

/// `3` or `[3, 3]`: a window size, stride or dilation (Keras accepts both).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Pair {
    /// The same value for height and width.
    One(usize),
    /// `[height, width]`.
    Two([usize; 2]),
}

impl Pair {
    /// `[height, width]`.
    pub fn get(self) -> [usize; 2] {
        match self {
            Pair::One(v) => [v, v],
            Pair::Two(v) => v,
        }
    }
}

fn pair1() -> Pair {
    Pair::One(1)
}
fn pair2() -> Pair {
    Pair::One(2)
}
fn one() -> usize {
    1
}
fn bn_epsilon() -> f32 {
    1e-3
}

/// One layer of a config with the shapes it reads and writes and the parameters it will hold,
/// worked out from the config alone (no weight is allocated).
#[derive(Clone, Debug, PartialEq)]
pub struct PlannedLayer {
    /// Index in `layers`.
    pub index: usize,
    /// Input shape of one sample.
    pub input: Shape,
    /// Output shape of one sample.
    pub output: Shape,
    /// `(name, shape)` of each parameter (`layers.i.weight`, …).
    pub params: Vec<(String, Vec<usize>)>,
    /// Multiply-accumulates per sample.
    pub macs: usize,
}

/// A `Sequential` architecture.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Input features.
    pub input: usize,
    /// Shape of one input sample `[h, w, c]` (NHWC; needed by convolution and pooling layers;
    /// its product must equal `input`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_shape: Option<[usize; 3]>,
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
            input_shape: None,
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
    /// The models known by name: `mlp` (the design document's 784-128-64-10), `cnn-small`
    /// (Conv 32 3×3 same – BN – ReLU – MaxPool 2, Conv 64 3×3 same – BN – ReLU – MaxPool 2,
    /// Flatten, Dense 10: 50,378 parameters; batch norm as PyTorch's `BatchNorm2d` defaults,
    /// momentum 0.1 of each new batch and ε = 1e-5, the recipe of the PyTorch reference run) and `lenet5` (LeCun et al. 1998 on 28×28: Conv 6 5×5
    /// same – tanh→relu – AvgPool 2, Conv 16 5×5 – relu – AvgPool 2, Dense 120, 84, 10), all on
    /// 28×28×1 images.
    pub fn named(name: &str) -> Result<Self> {
        let text = match name {
            "mlp" => return Ok(ModelConfig::default()),
            "cnn-small" | "cnn_small" => {
                r#"
                input = 784
                input_shape = [28, 28, 1]
                layers = [
                  { type = "conv2d", filters = 32, kernel_size = 3, padding = "same" },
                  { type = "batch_norm", torch_momentum = 0.1, epsilon = 1e-5 },
                  { type = "activation", activation = "relu" },
                  { type = "max_pool2d", pool_size = 2 },
                  { type = "conv2d", filters = 64, kernel_size = 3, padding = "same" },
                  { type = "batch_norm", torch_momentum = 0.1, epsilon = 1e-5 },
                  { type = "activation", activation = "relu" },
                  { type = "max_pool2d", pool_size = 2 },
                  { type = "flatten" },
                  { type = "dense", units = 10, activation = "softmax" },
                ]
                "#
            }
            "lenet5" | "lenet-5" => {
                r#"
                input = 784
                input_shape = [28, 28, 1]
                layers = [
                  { type = "conv2d", filters = 6, kernel_size = 5, padding = "same", activation = "relu" },
                  { type = "avg_pool2d", pool_size = 2 },
                  { type = "conv2d", filters = 16, kernel_size = 5, activation = "relu" },
                  { type = "avg_pool2d", pool_size = 2 },
                  { type = "flatten" },
                  { type = "dense", units = 120, activation = "relu" },
                  { type = "dense", units = 84, activation = "relu" },
                  { type = "dense", units = 10, activation = "softmax" },
                ]
                "#
            }
            other => {
                return Err(Error::config(
                    "model",
                    other,
                    "expected mlp, cnn-small or lenet5 (or describe the layers in a --config file)",
                ))
            }
        };
        toml::from_str(text).map_err(|e| Error::config("model", name, format!("built-in definition: {e}")))
    }

    /// The input shape (`input_shape`, or a flat vector of `input` values).
    pub fn input_shape(&self) -> Result<Shape> {
        match self.input_shape {
            None => Ok(Shape::flat(self.input)),
            Some([h, w, c]) => {
                let s = Shape::new(h, w, c);
                if h.checked_mul(w).and_then(|v| v.checked_mul(c)) != Some(self.input) {
                    return Err(Error::config(
                        "model.input_shape",
                        format!("[{h}, {w}, {c}]"),
                        format!("its product must equal model.input = {}", self.input),
                    ));
                }
                Ok(s)
            }
        }
    }

    /// Shapes and parameter shapes of every layer, from the config alone; errors name the layer
    /// and both shapes where they do not fit.
    pub fn plan(&self) -> Result<Vec<PlannedLayer>> {
        let mut shape = self.input_shape()?;
        let mut out = Vec::with_capacity(self.layers.len());
        for (i, l) in self.layers.iter().enumerate() {
            let field = |f: &str| format!("model.layers[{i}].{f}");
            let spatial = |what: &str| -> Result<()> {
                if shape.h == 1 && shape.w == 1 && self.input_shape.is_none() {
                    return Err(Error::config(
                        "model.input_shape",
                        "unset",
                        format!("layer {i} ({what}) needs the input's [height, width, channels]"),
                    ));
                }
                Ok(())
            };
            let (output, params, macs) = match l {
                LayerConfig::Dense { units, .. } => {
                    let n = shape.len();
                    (
                        Shape::flat(*units),
                        vec![
                            (format!("layers.{i}.weight"), vec![n, *units]),
                            (format!("layers.{i}.bias"), vec![*units]),
                        ],
                        n.saturating_mul(*units),
                    )
                }
                LayerConfig::Conv2d {
                    filters,
                    kernel_size,
                    strides,
                    padding,
                    dilation_rate,
                    groups,
                    ..
                } => {
                    spatial("conv2d")?;
                    if *groups == 0 || !shape.c.is_multiple_of(*groups) || !filters.is_multiple_of(*groups) {
                        return Err(Error::config(
                            field("groups"),
                            groups,
                            format!(
                                "must divide the input channels ({}) and the filters ({filters})",
                                shape.c
                            ),
                        ));
                    }
                    let k = kernel_size.get();
                    let g = Geometry::new(i, shape, *filters, k, strides.get(), dilation_rate.get(), *padding)?;
                    let kg = k[0] * k[1] * (shape.c / groups);
                    (
                        g.output,
                        vec![
                            (format!("layers.{i}.weight"), vec![kg, *filters]),
                            (format!("layers.{i}.bias"), vec![*filters]),
                        ],
                        g.output.len().saturating_mul(kg),
                    )
                }
                LayerConfig::MaxPool2d {
                    pool_size,
                    strides,
                    padding,
                }
                | LayerConfig::AvgPool2d {
                    pool_size,
                    strides,
                    padding,
                } => {
                    spatial("pooling")?;
                    let k = pool_size.get();
                    let g = Geometry::new(
                        i,
                        shape,
                        shape.c,
                        k,
                        strides.unwrap_or(*pool_size).get(),
                        [1, 1],
                        *padding,
                    )?;
                    (g.output, vec![], 0)
                }
                LayerConfig::GlobalAvgPool => {
                    spatial("global_avg_pool")?;
                    (Shape::flat(shape.c), vec![], 0)
                }
                LayerConfig::BatchNorm { .. } => (
                    shape,
                    vec![
                        (format!("layers.{i}.gamma"), vec![shape.c]),
                        (format!("layers.{i}.beta"), vec![shape.c]),
                    ],
                    0,
                ),
                LayerConfig::Flatten => (Shape::flat(shape.len()), vec![], 0),
                LayerConfig::Dropout { .. } | LayerConfig::Activation { .. } => (shape, vec![], 0),
            };
            out.push(PlannedLayer {
                index: i,
                input: shape,
                output,
                params,
                macs,
            });
            shape = output;
        }
        Ok(out)
    }

    /// Output classes (the last layer's values per sample).
    pub fn classes(&self) -> Result<usize> {
        Ok(self.plan()?.last().map(|l| l.output.len()).unwrap_or(self.input))
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
                LayerConfig::Conv2d {
                    filters,
                    activation,
                    quant,
                    ..
                } => {
                    if *filters == 0 || *filters > MAX_UNITS {
                        return Err(Error::config(
                            format!("model.layers[{i}].filters"),
                            filters,
                            format!("must be in 1..={MAX_UNITS}"),
                        ));
                    }
                    if *activation == Activation::Softmax {
                        return Err(Error::config(
                            format!("model.layers[{i}].activation"),
                            "softmax",
                            "softmax is only supported on the last dense layer",
                        ));
                    }
                    if let Some(q) = quant {
                        q.validate(i)?;
                    }
                }
                LayerConfig::BatchNorm {
                    momentum,
                    torch_momentum,
                    epsilon,
                } => {
                    match (momentum, torch_momentum) {
                        (Some(_), Some(_)) => {
                            return Err(Error::config(
                                format!("model.layers[{i}].torch_momentum"),
                                "set with momentum",
                                "give the running-statistics momentum in one convention: momentum (Keras, weight of the old value) or torch_momentum (PyTorch, weight of the new batch)",
                            ))
                        }
                        (Some(m), None) if !(0.0..1.0).contains(m) => {
                            return Err(Error::config(
                                format!("model.layers[{i}].momentum"),
                                m,
                                "Keras's momentum (weight of the old value) must be in [0, 1)",
                            ))
                        }
                        (None, Some(p)) if !(*p > 0.0 && *p <= 1.0) => {
                            return Err(Error::config(
                                format!("model.layers[{i}].torch_momentum"),
                                p,
                                "PyTorch's momentum (weight of the new batch) must be in (0, 1]",
                            ))
                        }
                        _ => {}
                    }
                    if !(*epsilon > 0.0 && epsilon.is_finite()) {
                        return Err(Error::config(
                            format!("model.layers[{i}].epsilon"),
                            epsilon,
                            "must be > 0",
                        ));
                    }
                }
                LayerConfig::MaxPool2d { .. } | LayerConfig::AvgPool2d { .. } | LayerConfig::GlobalAvgPool => {}
                LayerConfig::Flatten => {}
            }
        }
        if dense == 0 {
            return Err(Error::config("model.layers", "[]", "needs at least one dense layer"));
        }
        let plan = self.plan()?;
        let weights: usize = plan
            .iter()
            .flat_map(|l| l.params.iter())
            .map(|(_, s)| s.iter().product::<usize>())
            .fold(0usize, |a, b| a.saturating_add(b));
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
    /// Fix the per-channel scales of integer weight grids after this many epochs (default:
    /// never; the max-abs scale is recomputed at every step). Recomputed scales move every code
    /// of a channel when its largest weight moves; fixed ones clip instead.
    #[serde(default)]
    pub freeze_weight_scales_after: Option<usize>,
    /// QAT of a batch-normalised network (batch norm folded into the convolution): normalise
    /// with the running statistics, and stop moving them, from this epoch on (torch.ao's
    /// `freeze_bn_stats`; default: never).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub freeze_bn_stats_after: Option<usize>,
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
    /// Oscillation tracking of quantized weights.
    pub oscillation: crate::quant::oscillation::OscillationConfig,
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
            freeze_weight_scales_after: None,
            freeze_bn_stats_after: None,
            schedule_epochs: None,
            model: ModelConfig::default(),
            optimizer: OptimizerConfig::default(),
            checkpoint: CheckpointConfig::default(),
            on_non_finite: OnNonFinite::Stop,
            oscillation: Default::default(),
        }
    }
}

impl TrainConfig {
    /// Read a TOML file; unknown keys and impossible values are errors naming the file and field.
    pub fn from_toml_file(path: &std::path::Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let cfg: TrainConfig = toml::from_str(&text)
            .map_err(|e| Error::data(path, format!("invalid config: {}", humanize_serde(&e.to_string()))))?;
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
        let o = self.oscillation;
        if !(o.momentum > 0.0 && o.momentum <= 1.0) {
            return Err(Error::config("oscillation.momentum", o.momentum, "must be in (0, 1]"));
        }
        if !(0.0..=1.0).contains(&o.threshold) {
            return Err(Error::config("oscillation.threshold", o.threshold, "must be in [0, 1]"));
        }
        if !(o.dampening >= 0.0 && o.dampening.is_finite()) {
            return Err(Error::config(
                "oscillation.dampening",
                o.dampening,
                "must be a finite λ ≥ 0",
            ));
        }
        if o.freezing() {
            if !(o.freeze_threshold < 1.0 && o.freeze_threshold.is_finite()) {
                return Err(Error::config(
                    "oscillation.freeze_threshold",
                    o.freeze_threshold,
                    "must be in [0, 1) (0: off)",
                ));
            }
            if let Some(s) = o.freeze_threshold_start {
                if !(s > 0.0 && s <= 1.0) {
                    return Err(Error::config(
                        "oscillation.freeze_threshold_start",
                        s,
                        "must be in (0, 1]",
                    ));
                }
            }
            if !o.track {
                return Err(Error::config(
                    "oscillation.freeze_threshold",
                    o.freeze_threshold,
                    "needs oscillation tracking (it freezes on the tracked frequencies): turn tracking on",
                ));
            }
        } else if !(o.freeze_threshold == 0.0) {
            return Err(Error::config(
                "oscillation.freeze_threshold",
                o.freeze_threshold,
                "must be in [0, 1) (0: off)",
            ));
        }
        self.model.validate()?;
        self.optimizer.validate()
    }
}

/// A serde message in words: `expected usize` → `expected a whole number ≥ 0`, and so on (the
/// position and the key, which the TOML parser adds, are kept).
pub fn humanize_serde(msg: &str) -> String {
    let mut m = msg.to_string();
    for (rust, words) in [
        ("expected usize", "expected a whole number ≥ 0"),
        ("expected u64", "expected a whole number ≥ 0"),
        ("expected u32", "expected a whole number ≥ 0"),
        ("expected f32", "expected a number"),
        ("expected f64", "expected a number"),
        ("expected a boolean", "expected true or false"),
        (" as i128", ""),
        ("integer `", "`"),
        ("expected struct History", "expected the history object"),
    ] {
        m = m.replace(rust, words);
    }
    m
}
