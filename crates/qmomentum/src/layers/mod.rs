//! Layers. One file per concept: [`dense`], [`activation`], [`dropout`], [`param`].
//! A new layer is a struct with `forward`/`backward` and a variant of [`Layer`].

pub mod activation;
pub mod dense;
pub mod dropout;
pub mod param;

pub use activation::Activation;
pub use dense::{BatchStats, Dense};
pub use dropout::Dropout;
pub use param::{Param, ParamKind};

use crate::rng::Rng;

/// A layer of a [`crate::model::Sequential`].
#[derive(Clone, Debug)]
pub enum Layer {
    /// Fully connected (with its own activation, as Keras `Dense(…, activation=…)`).
    Dense(Box<Dense>),
    /// Stand-alone element-wise activation (Keras `Activation`); softmax only as the last layer.
    Activation(Activation),
    /// Dropout.
    Dropout(Dropout),
    /// Flatten: the data are already flat rows, so it only keeps Keras programs readable.
    Flatten,
}

impl Layer {
    /// Output features for `inputs` input features.
    pub fn output_size(&self, inputs: usize) -> usize {
        match self {
            Layer::Dense(d) => d.outputs,
            _ => inputs,
        }
    }

    /// Forward over `batch` rows (`logits`: leave a final softmax to the loss).
    pub fn forward(&mut self, x: &[f32], y: &mut [f32], batch: usize, training: bool, logits: bool, rng: &mut Rng) {
        match self {
            Layer::Dense(d) => d.forward(x, y, batch, training, logits),
            Layer::Activation(a) => {
                let cols = x.len() / batch.max(1);
                for (yv, &xv) in y.iter_mut().zip(x) {
                    *yv = a.forward(xv);
                }
                if *a == Activation::Softmax && !logits {
                    activation::softmax_rows(y, cols);
                }
            }
            Layer::Dropout(d) => d.forward(x, y, training, rng),
            Layer::Flatten => y.copy_from_slice(x),
        }
    }

    /// Backward: parameter gradients, and `dx` when given.
    pub fn backward(&mut self, x: &[f32], dy: &[f32], dx: Option<&mut [f32]>, batch: usize) {
        match self {
            Layer::Dense(d) => d.backward(x, dy, dx, batch),
            Layer::Activation(a) => {
                if let Some(dx) = dx {
                    for ((d, &g), &z) in dx.iter_mut().zip(dy).zip(x) {
                        *d = g * a.derivative(z, a.forward(z));
                    }
                }
            }
            Layer::Dropout(d) => {
                if let Some(dx) = dx {
                    d.backward(dy, dx)
                }
            }
            Layer::Flatten => {
                if let Some(dx) = dx {
                    dx.copy_from_slice(dy)
                }
            }
        }
    }
}
