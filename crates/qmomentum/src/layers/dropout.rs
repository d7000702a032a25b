//! Inverted dropout (Keras `Dropout`): in training each value is kept with probability `1 − rate`
//! and scaled by `1/(1 − rate)`; at inference it is the identity.

use crate::rng::Rng;

/// Dropout with its last mask.
#[derive(Clone, Debug)]
pub struct Dropout {
    /// Fraction dropped, in [0, 1).
    pub rate: f32,
    mask: Vec<f32>,
}

impl Dropout {
    /// Dropout of `rate`.
    pub fn new(rate: f32) -> Self {
        Dropout { rate, mask: Vec::new() }
    }
    /// `y = x·mask` in training, `y = x` otherwise.
    pub fn forward(&mut self, x: &[f32], y: &mut [f32], training: bool, rng: &mut Rng) {
        if !training || self.rate == 0.0 {
            y.copy_from_slice(x);
            return;
        }
        if self.mask.len() < x.len() {
            self.mask.resize(x.len(), 0.0);
        }
        let keep = 1.0 - self.rate;
        let scale = 1.0 / keep;
        for ((m, yv), &xv) in self.mask.iter_mut().zip(y.iter_mut()).zip(x) {
            *m = if rng.uniform() < keep { scale } else { 0.0 };
            *yv = xv * *m;
        }
    }
    /// [`Dropout::backward`] with `∂L/∂y` and `∂L/∂x` in one buffer.
    pub fn backward_in_place(&self, g: &mut [f32]) {
        if self.rate == 0.0 {
            return;
        }
        for (d, &m) in g.iter_mut().zip(&self.mask) {
            *d *= m;
        }
    }

    /// `dx = dy·mask`.
    pub fn backward(&self, dy: &[f32], dx: &mut [f32]) {
        if self.rate == 0.0 {
            dx.copy_from_slice(dy);
            return;
        }
        for ((d, &g), &m) in dx.iter_mut().zip(dy).zip(&self.mask) {
            *d = g * m;
        }
    }
}
