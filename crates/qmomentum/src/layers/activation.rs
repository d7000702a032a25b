//! Element-wise activations, as paired `forward`/`derivative` functions.

use serde::{Deserialize, Serialize};

/// The activation of a layer (Keras names).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// Identity (Keras `linear`/`None`).
    #[default]
    Linear,
    /// `max(z, 0)`.
    Relu,
    /// `1/(1+e^-z)`.
    Sigmoid,
    /// `tanh z`.
    Tanh,
    /// Row-wise softmax; fused with the cross-entropy loss in training.
    Softmax,
}

impl Activation {
    /// `a = f(z)` for the element-wise activations (softmax is row-wise, see [`softmax_rows`]).
    #[inline]
    pub fn forward(self, z: f32) -> f32 {
        match self {
            Activation::Linear | Activation::Softmax => z,
            Activation::Relu => z.max(0.0),
            Activation::Sigmoid => 1.0 / (1.0 + (-z).exp()),
            Activation::Tanh => z.tanh(),
        }
    }
    /// `f'(z)` given `z` and `a = f(z)`.
    #[inline]
    pub fn derivative(self, z: f32, a: f32) -> f32 {
        match self {
            Activation::Linear | Activation::Softmax => 1.0,
            Activation::Relu => {
                if z > 0.0 {
                    1.0
                } else {
                    0.0
                }
            }
            Activation::Sigmoid => a * (1.0 - a),
            Activation::Tanh => 1.0 - a * a,
        }
    }
    /// Whether outputs are never negative (selects an unsigned LSQ grid).
    pub fn non_negative(self) -> bool {
        matches!(self, Activation::Relu | Activation::Sigmoid | Activation::Softmax)
    }
}

impl std::str::FromStr for Activation {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Self> {
        Ok(match s {
            "linear" | "none" => Activation::Linear,
            "relu" => Activation::Relu,
            "sigmoid" => Activation::Sigmoid,
            "tanh" => Activation::Tanh,
            "softmax" => Activation::Softmax,
            _ => {
                return Err(crate::Error::config(
                    "activation",
                    s,
                    "expected linear, relu, sigmoid, tanh or softmax",
                ))
            }
        })
    }
}

/// Numerically stable softmax of each row of `x` (`rows × cols`), in place.
pub fn softmax_rows(x: &mut [f32], cols: usize) {
    for row in x.chunks_exact_mut(cols) {
        let m = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let mut s = 0.0;
        for v in row.iter_mut() {
            *v = (*v - m).exp();
            s += *v;
        }
        let inv = 1.0 / s;
        for v in row.iter_mut() {
            *v *= inv;
        }
    }
}
