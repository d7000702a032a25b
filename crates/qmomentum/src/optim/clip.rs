//! Gradient clipping: by value (Keras `clipvalue`) and by global norm (Keras `global_clipnorm`,
//! PyTorch `clip_grad_norm_`).

/// Clamp every gradient value into `[−c, c]`.
#[inline]
pub fn clip_value(g: &mut [f32], c: f32) {
    for v in g.iter_mut() {
        *v = v.clamp(-c, c);
    }
}

/// The factor that brings a global norm `norm` down to `max_norm` (1 if already below).
#[inline]
pub fn norm_factor(norm: f64, max_norm: f32) -> f32 {
    if norm > max_norm as f64 && norm > 0.0 {
        (max_norm as f64 / norm) as f32
    } else {
        1.0
    }
}
