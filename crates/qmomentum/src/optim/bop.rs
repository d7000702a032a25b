//! Bop, the binary optimizer (Helwegen et al., NeurIPS 2019), as in Larq:
//! `m ← m + γ·(g − m)`; flip `w ← −w` iff `w·m > τ`. Weights stay exactly ±1; `m` is an
//! exponential moving average of the gradient (a momentum whose "adaptivity rate" is γ).
//! Larq's defaults: γ = 1e-4, τ = 1e-8.

/// Bop hyper-parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Bop {
    /// Adaptivity rate γ in (0, 1].
    pub gamma: f32,
    /// Flip threshold τ ≥ 0.
    pub threshold: f32,
}

impl Bop {
    /// One step; returns the number of flipped weights.
    pub fn apply(&self, w: &mut [f32], g: &[f32], m: &mut [f32]) -> usize {
        let mut flips = 0;
        for ((w, &g), m) in w.iter_mut().zip(g).zip(m.iter_mut()) {
            *m += self.gamma * (g - *m);
            if *w * *m > self.threshold {
                *w = -*w;
                flips += 1;
            }
        }
        flips
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn flips_when_the_gradient_agrees_with_the_weight() {
        let bop = Bop {
            gamma: 0.5,
            threshold: 0.1,
        };
        let mut w = [1.0f32, 1.0, -1.0];
        let mut m = [0.0f32; 3];
        // m = 0.5·g = (0.15, -0.3, 0.05): flip w0 (1·0.15 > 0.1), keep w1, keep w2 (-0.05 < 0.1).
        assert_eq!(bop.apply(&mut w, &[0.3, -0.6, 0.1], &mut m), 1);
        assert_eq!(w, [-1.0, 1.0, -1.0]);
        assert_eq!(m, [0.15, -0.3, 0.05]);
        // Next step m0 = 0.15 + 0.5(0.3−0.15) = 0.225; w0 = −1 → −0.225 < τ, no flip back.
        assert_eq!(bop.apply(&mut w, &[0.3, -0.6, 0.1], &mut m), 0);
    }
}
