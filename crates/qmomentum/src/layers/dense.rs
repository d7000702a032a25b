//! `Dense`: `y = q_a(f(q_w(W)ᵀ·x + b))`, a fully connected layer: one matrix product plus the
//! quantization components every layer shares ([`WeightFakeQuant`] for `q_w`, [`Epilogue`] for
//! the bias, the activation and `q_a`).
//!
//! The kernel is stored `[inputs, outputs]` (the Keras layout) and initialised Glorot-uniform with
//! a zero bias, as Keras does. No allocation after the first batch.
//!
//! ```
//! use qmomentum::layers::{Activation, Dense};
//! use qmomentum::rng::Rng;
//! let mut rng = Rng::new(0, 0);
//! let mut d = Dense::new(0, 3, 2, Activation::Relu, &mut rng);
//! let x = [1.0f32, 2.0, 3.0];
//! let mut y = [0.0f32; 2];
//! d.forward(&x, &mut y, 1, false, false);
//! assert!(y.iter().all(|&v| v >= 0.0));
//! ```

use super::activation::Activation;
use super::epilogue::Epilogue;
use super::param::{Param, ParamKind};
use crate::gemm::{matmul, Op};
use crate::quant::affine::QParams;
use crate::quant::weight::WeightFakeQuant;
use crate::quant::LayerQuant;
use crate::rng::Rng;

pub use crate::quant::act::BatchStats;

/// A fully connected layer.
#[derive(Clone, Debug)]
pub struct Dense {
    /// Index in the model (used in parameter names).
    pub index: usize,
    /// Input features.
    pub inputs: usize,
    /// Output features.
    pub outputs: usize,
    /// Activation applied after the bias.
    pub activation: Activation,
    /// Kernel `[inputs, outputs]` (latent float weights, or ±1 for Bop-trained binary weights).
    pub weight: Param,
    /// Bias `[outputs]`.
    pub bias: Param,
    /// Quantization of this layer.
    pub quant: LayerQuant,
    /// The weight fake-quantizer.
    pub wq: WeightFakeQuant,
    /// Bias, activation and output quantization.
    pub out: Epilogue,
    /// Scale of the grid this layer's input lies on (set by the model before each forward pass:
    /// 1/255 for pixels, the previous layer's output grid otherwise). With integer weights the
    /// bias is then quantized to the accumulator grid `s_in·s_w[j]`, exactly as the integer
    /// runtime adds it (int32 bias, the TFLite convention); straight-through in backward.
    pub input_scale: Option<f32>,
}

impl Dense {
    /// A float layer with Glorot-uniform weights `U(−√(6/(in+out)), √(6/(in+out)))`, zero bias.
    pub fn new(index: usize, inputs: usize, outputs: usize, activation: Activation, rng: &mut Rng) -> Self {
        let limit = (6.0 / (inputs + outputs) as f32).sqrt();
        let w = (0..inputs * outputs)
            .map(|_| rng.uniform_range(-limit, limit))
            .collect();
        Dense {
            index,
            inputs,
            outputs,
            activation,
            weight: Param::new(
                format!("layers.{index}.weight"),
                ParamKind::Weight,
                vec![inputs, outputs],
                w,
            ),
            bias: Param::new(
                format!("layers.{index}.bias"),
                ParamKind::Bias,
                vec![outputs],
                vec![0.0; outputs],
            ),
            quant: LayerQuant::default(),
            wq: WeightFakeQuant::new(inputs, outputs),
            out: Epilogue::new(outputs, activation),
            input_scale: None,
        }
    }

    /// Apply a quantization; `bop` turns binary weights into ±1 parameters for the Bop optimizer
    /// (see [`WeightFakeQuant::configure`] for the fixed scale that comes with it).
    pub fn set_quant(&mut self, quant: LayerQuant, bop: bool) {
        self.quant = quant;
        self.wq.configure(quant.weights, bop, &mut self.weight);
        self.out
            .act
            .configure(quant.activations, !self.activation.non_negative(), self.index);
    }

    /// True when the output is a sign (1-bit activation).
    pub fn sign_output(&self) -> bool {
        self.out.act.sign()
    }

    /// Bop mode (±1 weights).
    pub fn bop(&self) -> bool {
        self.wq.bop
    }

    /// The kernel the forward pass uses (`ŵ` if quantized) and its per-channel scales.
    pub fn effective_weights(&mut self) -> (&[f32], &[f32]) {
        self.wq.quantize(&self.weight.value);
        (self.wq.weights(&self.weight.value), self.wq.scales())
    }

    /// The activation grid in force (after training or calibration).
    pub fn output_qparams(&self) -> Option<QParams> {
        self.out.act.output_qparams()
    }

    /// Feed the statistics of a whole training batch to the observer.
    pub fn observe(&mut self, stats: BatchStats) {
        self.out.act.observe(stats);
    }

    /// Forward pass over `batch` rows: `x` is `[batch, inputs]`, `y` is `[batch, outputs]`.
    /// `training` records the output statistics; the observer itself is updated by
    /// [`Dense::observe`] after the step, so a batch is quantized with the range observed through
    /// the previous batches (the first batch of a run, before any range exists, passes through
    /// unquantized). `logits` skips a softmax activation (the loss fuses it).
    pub fn forward(&mut self, x: &[f32], y: &mut [f32], batch: usize, training: bool, logits: bool) {
        let n = batch * self.outputs;
        self.wq.quantize(&self.weight.value);
        let w = self.wq.weights(&self.weight.value);
        let z = self.out.product_target(y, n);
        matmul(batch, self.outputs, self.inputs, x, Op::N, w, Op::N, z, false);
        self.out
            .forward(&self.bias, &self.wq, self.input_scale, y, n, training, logits);
    }

    /// Backward pass. `x` is the forward input, `dy` the gradient of the output; writes the
    /// parameter gradients and, when `dx` is given, the input gradient.
    pub fn backward(&mut self, x: &[f32], dy: &[f32], dx: Option<&mut [f32]>, batch: usize) {
        let n = batch * self.outputs;
        self.out.backward(dy, &mut self.bias, n, self.outputs);
        let dz = self.out.dz(dy, n);
        let (inputs, outputs) = (self.inputs, self.outputs);
        // Weight gradient dŴ = Xᵀ·dZ, then the weight quantizer's backward.
        self.wq.backward(&mut self.weight, |g| {
            matmul(inputs, outputs, batch, x, Op::T, dz, Op::N, g, false)
        });
        if let Some(dx) = dx {
            let w = self.wq.weights(&self.weight.value);
            matmul(batch, inputs, outputs, dz, Op::N, w, Op::T, dx, false);
        }
    }

    /// Parameters, in a fixed order (no allocation).
    pub fn params_iter(&self) -> impl Iterator<Item = &Param> {
        [&self.weight, &self.bias].into_iter().chain(self.out.act.step.as_ref())
    }
    /// Parameters, mutable, in the order of [`Dense::params_iter`].
    pub fn params_iter_mut(&mut self) -> impl Iterator<Item = &mut Param> {
        [&mut self.weight, &mut self.bias]
            .into_iter()
            .chain(self.out.act.step.as_mut())
    }
}
