//! Every layer's backward pass against central finite differences (in f64 where it matters),
//! and the straight-through estimators against their definitions.

use qmomentum::layers::{Activation, Dense, Dropout, Layer};
use qmomentum::quant::{ActQuant, LayerQuant, Observer, WeightQuant};
use qmomentum::rng::Rng;

/// L(y) = Σ r·y for a fixed random r, so ∂L/∂y = r.
fn loss(y: &[f32], r: &[f32]) -> f64 {
    y.iter().zip(r).map(|(a, b)| *a as f64 * *b as f64).sum()
}

fn dense_fd(act: Activation) {
    let (batch, inp, out) = (3, 7, 5);
    let mut rng = Rng::new(11, 0);
    let mut d = Dense::new(0, inp, out, act, &mut rng);
    for b in d.bias.value.iter_mut() {
        *b = rng.uniform_range(-0.5, 0.5);
    }
    let x: Vec<f32> = (0..batch * inp).map(|_| rng.uniform_range(-1.0, 1.0)).collect();
    let r: Vec<f32> = (0..batch * out).map(|_| rng.uniform_range(-1.0, 1.0)).collect();
    let mut y = vec![0.0; batch * out];
    // Softmax is fused with the loss in training; its own Jacobian is not used, so check the
    // linear part for it (logits = true).
    let logits = act == Activation::Softmax;
    d.forward(&x, &mut y, batch, true, logits);
    let mut dx = vec![0.0; batch * inp];
    d.backward(&x, &r, Some(&mut dx), batch);
    let h = 1e-2f32;
    let f = |d: &mut Dense, x: &[f32]| {
        let mut y = vec![0.0; batch * out];
        d.forward(x, &mut y, batch, false, logits);
        loss(&y, &r)
    };
    for i in 0..d.weight.value.len() {
        let w0 = d.weight.value[i];
        d.weight.value[i] = w0 + h;
        let lp = f(&mut d, &x);
        d.weight.value[i] = w0 - h;
        let lm = f(&mut d, &x);
        d.weight.value[i] = w0;
        let fd = (lp - lm) / (2.0 * h as f64);
        assert!(
            (fd - d.weight.grad[i] as f64).abs() < 2e-3,
            "{act:?} dW[{i}]: fd {fd} vs {}",
            d.weight.grad[i]
        );
    }
    for j in 0..out {
        let b0 = d.bias.value[j];
        d.bias.value[j] = b0 + h;
        let lp = f(&mut d, &x);
        d.bias.value[j] = b0 - h;
        let lm = f(&mut d, &x);
        d.bias.value[j] = b0;
        let fd = (lp - lm) / (2.0 * h as f64);
        assert!(
            (fd - d.bias.grad[j] as f64).abs() < 2e-3,
            "{act:?} db[{j}]: fd {fd} vs {}",
            d.bias.grad[j]
        );
    }
    for i in 0..x.len() {
        let (mut xp, mut xm) = (x.clone(), x.clone());
        xp[i] += h;
        xm[i] -= h;
        let fd = (f(&mut d, &xp) - f(&mut d, &xm)) / (2.0 * h as f64);
        assert!(
            (fd - dx[i] as f64).abs() < 2e-3,
            "{act:?} dx[{i}]: fd {fd} vs {}",
            dx[i]
        );
    }
}

#[test]
fn dense_linear_matches_finite_differences() {
    dense_fd(Activation::Linear);
}
#[test]
fn dense_relu_matches_finite_differences() {
    dense_fd(Activation::Relu);
}
#[test]
fn dense_sigmoid_matches_finite_differences() {
    dense_fd(Activation::Sigmoid);
}
#[test]
fn dense_tanh_matches_finite_differences() {
    dense_fd(Activation::Tanh);
}
#[test]
fn dense_softmax_logits_path_matches_finite_differences() {
    dense_fd(Activation::Softmax);
}

#[test]
fn standalone_activation_and_dropout_match_finite_differences() {
    let mut rng = Rng::new(5, 0);
    let x: Vec<f32> = (0..12).map(|_| rng.uniform_range(-2.0, 2.0)).collect();
    let r: Vec<f32> = (0..12).map(|_| rng.uniform_range(-1.0, 1.0)).collect();
    for act in [Activation::Relu, Activation::Sigmoid, Activation::Tanh] {
        let mut l = Layer::Activation(act);
        let mut dx = vec![0.0; 12];
        l.backward(&x, &r, Some(&mut dx), 3);
        for i in 0..12 {
            let h = 1e-3;
            let (mut xp, mut xm) = (x.clone(), x.clone());
            xp[i] += h;
            xm[i] -= h;
            let (mut yp, mut ym) = (vec![0.0; 12], vec![0.0; 12]);
            l.forward(&xp, &mut yp, 3, false, false, &mut rng);
            l.forward(&xm, &mut ym, 3, false, false, &mut rng);
            let fd = (loss(&yp, &r) - loss(&ym, &r)) / (2.0 * h as f64);
            assert!((fd - dx[i] as f64).abs() < 1e-2, "{act:?}[{i}]: {fd} vs {}", dx[i]);
        }
    }
    // Dropout: y = x·mask (a fixed mask once drawn), so ∂y/∂x = mask.
    let mut d = Dropout::new(0.5);
    let mut y = vec![0.0; 12];
    d.forward(&x, &mut y, true, &mut Rng::new(1, 1));
    let mut dx = vec![0.0; 12];
    d.backward(&r, &mut dx);
    for i in 0..12 {
        let m = if x[i] != 0.0 { y[i] / x[i] } else { 0.0 };
        assert!(m == 0.0 || (m - 2.0).abs() < 1e-6, "mask must be 0 or 1/(1−p)");
        assert!((dx[i] - r[i] * m).abs() < 1e-6);
    }
}

/// Clipped STE of the output quantizer: the gradient passes where the activation lies inside the
/// grid's range and is zero outside (definition), then the activation's derivative applies.
#[test]
fn activation_fake_quant_uses_the_clipped_ste() {
    let mut rng = Rng::new(2, 0);
    let mut d = Dense::new(0, 4, 3, Activation::Linear, &mut rng);
    d.set_quant(
        LayerQuant {
            weights: None,
            activations: Some(ActQuant {
                bits: 4,
                observer: Observer::MinMax,
            }),
        },
        false,
    );
    let x: Vec<f32> = (0..8).map(|_| rng.uniform_range(-1.0, 1.0)).collect();
    let mut y = vec![0.0; 6];
    // First batch: observe a narrow range so that a second, wider batch gets clipped.
    d.forward(&x, &mut y, 2, true, false);
    let stats = d.out.act.stats;
    d.observe(qmomentum::layers::BatchStats {
        lo: stats.lo * 0.5,
        hi: stats.hi * 0.5,
        ..stats
    });
    d.forward(&x, &mut y, 2, true, false);
    let qp = d.output_qparams().unwrap();
    let (lo, hi) = qp.range();
    for v in &y {
        let k = (v / qp.scale).round();
        assert!((v / qp.scale - k).abs() < 1e-3, "outputs lie on the grid");
    }
    let r = vec![1.0f32; 6];
    d.backward(&x, &r, None, 2);
    // Recompute z = x·W + b and compare the bias gradient (Σ over the batch of the mask).
    for j in 0..3 {
        let mut want = 0.0;
        for b in 0..2 {
            let mut z = d.bias.value[j];
            for k in 0..4 {
                z += x[b * 4 + k] * d.weight.value[k * 3 + j];
            }
            if z >= lo && z <= hi {
                want += 1.0;
            }
        }
        assert_eq!(d.bias.grad[j], want, "channel {j}");
    }
}

/// Binary weights with latent floats: ŵ = α·sign(w), ∂L/∂w = ∂L/∂ŵ·[|w| ≤ 1] (Larq ste_sign).
#[test]
fn binary_weight_ste_by_definition() {
    let mut rng = Rng::new(3, 0);
    let mut d = Dense::new(0, 3, 2, Activation::Linear, &mut rng);
    d.set_quant(
        LayerQuant {
            weights: Some(WeightQuant::Binary { scaled: false }),
            activations: None,
        },
        false,
    );
    d.weight.value = vec![0.5, -1.5, 2.0, -0.2, 0.0, 0.9];
    let x = [1.0f32, 2.0, 3.0];
    let mut y = [0.0f32; 2];
    d.forward(&x, &mut y, 1, true, false);
    // ŵ = sign(w): column 0 = (+1, +1, +1), column 1 = (−1, −1, +1) → y = (6, 0).
    assert_eq!(y, [6.0, 0.0]);
    d.backward(&x, &[1.0, 1.0], None, 1);
    // ∂L/∂ŵ[k][j] = x_k; masked where |w| > 1 (indices 1 and 2).
    assert_eq!(d.weight.grad, vec![1.0, 0.0, 0.0, 2.0, 3.0, 3.0]);
}

/// Bop mode: weights are the ±1 signs of the initial weights and ŵ = w/√K; the gradient that
/// reaches the ±1 weights is ∂L/∂ŵ/√K (checked against the latent-free definition).
#[test]
fn bop_mode_scale_and_gradient() {
    let mut rng = Rng::new(4, 0);
    let mut d = Dense::new(0, 4, 2, Activation::Linear, &mut rng);
    let signs: Vec<f32> = d
        .weight
        .value
        .iter()
        .map(|&w| if w >= 0.0 { 1.0 } else { -1.0 })
        .collect();
    d.set_quant(
        LayerQuant {
            weights: Some(WeightQuant::Binary { scaled: true }),
            activations: None,
        },
        true,
    );
    assert_eq!(d.weight.value, signs);
    let x = [1.0f32, -1.0, 1.0, 1.0];
    let mut y = [0.0f32; 2];
    d.forward(&x, &mut y, 1, true, false);
    for j in 0..2 {
        let dot: f32 = (0..4).map(|k| x[k] * signs[k * 2 + j]).sum();
        assert!((y[j] - dot / 2.0).abs() < 1e-6, "ŵ = w/√4");
    }
    d.backward(&x, &[1.0, -1.0], None, 1);
    for (k, &xk) in x.iter().enumerate() {
        assert_eq!(d.weight.grad[k * 2], xk / 2.0);
        assert_eq!(d.weight.grad[k * 2 + 1], -xk / 2.0);
    }
}
