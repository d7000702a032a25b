//! Sparse categorical cross-entropy fused with softmax (stable log-softmax), as paired
//! `forward`/`backward` functions.
//!
//! `L = −(1/B) Σ_b log softmax(z_b)[y_b]`, `∂L/∂z_b = (softmax(z_b) − onehot(y_b)) / B`.

/// Forward: writes the probabilities into `probs` and returns the mean loss over the batch.
/// `logits` and `probs` are `[batch, classes]`; labels must be `< classes` (checked by the
/// dataset loader).
pub fn softmax_crossentropy_forward(logits: &[f32], labels: &[u32], classes: usize, probs: &mut [f32]) -> f32 {
    let mut total = 0.0f64;
    for ((z, p), &y) in logits
        .chunks_exact(classes)
        .zip(probs.chunks_exact_mut(classes))
        .zip(labels)
    {
        let m = z.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let mut s = 0.0f32;
        for (pv, &zv) in p.iter_mut().zip(z) {
            *pv = (zv - m).exp();
            s += *pv;
        }
        let inv = 1.0 / s;
        for pv in p.iter_mut() {
            *pv *= inv;
        }
        // log softmax(z)[y] = z_y − m − log Σ e^(z−m)
        total += (m + s.ln() - z[y as usize]) as f64;
    }
    (total / labels.len().max(1) as f64) as f32
}

/// Backward: `dlogits = (probs − onehot) / batch`.
pub fn softmax_crossentropy_backward(probs: &[f32], labels: &[u32], classes: usize, dlogits: &mut [f32]) {
    let inv = 1.0 / labels.len().max(1) as f32;
    for ((p, d), &y) in probs
        .chunks_exact(classes)
        .zip(dlogits.chunks_exact_mut(classes))
        .zip(labels)
    {
        for (dv, &pv) in d.iter_mut().zip(p) {
            *dv = pv * inv;
        }
        d[y as usize] -= inv;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn matches_hand_computation_and_is_stable() {
        // z = (1, 2, 3), y = 2: L = log(e^1+e^2+e^3) − 3 = 0.40760596
        let mut p = [0.0f32; 3];
        let l = softmax_crossentropy_forward(&[1.0, 2.0, 3.0], &[2], 3, &mut p);
        assert!((l - 0.407_605_96).abs() < 1e-6);
        // Huge logits do not overflow.
        let l = softmax_crossentropy_forward(&[1000.0, 0.0, -1000.0], &[0], 3, &mut p);
        assert!(l.abs() < 1e-6 && p[0] == 1.0);
    }
    #[test]
    fn gradient_matches_finite_differences() {
        let z = [0.3f32, -1.2, 2.0, 0.5, 0.1, -0.4];
        let y = [2u32, 0];
        let mut p = [0.0f32; 6];
        let mut d = [0.0f32; 6];
        softmax_crossentropy_forward(&z, &y, 3, &mut p);
        softmax_crossentropy_backward(&p, &y, 3, &mut d);
        for i in 0..6 {
            let h = 1e-3;
            let (mut a, mut b) = (z, z);
            a[i] += h;
            b[i] -= h;
            let fd = (softmax_crossentropy_forward(&a, &y, 3, &mut p)
                - softmax_crossentropy_forward(&b, &y, 3, &mut p))
                / (2.0 * h);
            assert!((fd - d[i]).abs() < 1e-3, "{i}: {fd} vs {}", d[i]);
        }
    }
}
