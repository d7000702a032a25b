//! Weight decay, coupled or decoupled.
//!
//! * Coupled (L2, PyTorch `weight_decay`): `g ← g + λ·θ` before the momentum transform.
//! * Decoupled (Loshchilov & Hutter, Keras `weight_decay`): `θ ← θ − η_t·λ·θ`, outside the
//!   momentum buffer.

use serde::{Deserialize, Serialize};

/// How weight decay is applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DecayMode {
    /// L2 added to the gradient.
    #[default]
    Coupled,
    /// Shrink the weights directly.
    Decoupled,
}

/// `g ← g + λθ`.
#[inline]
pub fn couple(g: &mut [f32], theta: &[f32], lambda: f32) {
    for (g, &t) in g.iter_mut().zip(theta) {
        *g += lambda * t;
    }
}

/// `θ ← θ·(1 − η·λ)`.
#[inline]
pub fn decouple(theta: &mut [f32], lr: f32, lambda: f32) {
    let f = 1.0 - lr * lambda;
    for t in theta.iter_mut() {
        *t *= f;
    }
}
