//! QAT with batch norm folded into the convolution (`layers/folded_bn.rs`) against PyTorch 2.15's
//! `torch.ao.nn.intrinsic.qat.ConvBn2d` with qmomentum's 8-bit weight fake-quantizer
//! (`tests/reference/conv_bn_qat.py`, output committed as `conv_bn_qat.json`): the outputs and
//! the x, W, b, γ, β gradients with batch statistics, with frozen statistics and in evaluation,
//! and the running statistics after the step. Then the same layer with float weights against
//! central finite differences, and the folded model inside `Sequential`: evaluation equals the
//! baked (exported) form bit for bit.

use qmomentum::config::{LayerConfig, ModelConfig};
use qmomentum::layers::conv2d::{Conv2d, Conv2dConfig, Padding};
use qmomentum::layers::{Activation, BatchNorm, BnMomentum, Layer, Shape};
use qmomentum::model::Sequential;
use qmomentum::quant::{LayerQuant, Scheme, WeightQuant};
use qmomentum::rng::Rng;
use serde_json::Value;

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn reference() -> Value {
    let text = include_str!("reference/conv_bn_qat.json");
    serde_json::from_str(text).unwrap()
}

fn close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1.0);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol * scale,
            "{what}[{i}]: qmomentum {g} vs PyTorch {w} (tolerance {tol}·{scale})"
        );
    }
}

/// The reference's layer: conv 3×3 same over 6×6×3, 5 filters, bias, batch norm folded in,
/// 8-bit per-channel narrow-range weights, float outputs.
fn layer(r: &Value) -> Conv2d {
    let init = &r["init"];
    let cfg = Conv2dConfig {
        filters: 5,
        kernel: [3, 3],
        padding: Padding::Same,
        ..Default::default()
    };
    let mut c = Conv2d::new(0, Shape::new(6, 6, 3), cfg, Activation::Linear, &mut Rng::new(0, 0)).unwrap();
    c.weight.value = floats(&init["weight"]);
    c.bias.value = floats(&init["bias"]);
    let mut bn = BatchNorm::new(1, 5, 1e-5, BnMomentum::Torch { momentum: 0.1 });
    bn.gamma.value = floats(&init["gamma"]);
    bn.beta.value = floats(&init["beta"]);
    bn.running_mean.value = floats(&init["running_mean"]);
    bn.running_var.value = floats(&init["running_var"]);
    c.fold_batch_norm(bn, Activation::Linear, false);
    let q = LayerQuant {
        weights: Some(WeightQuant::Int {
            bits: 8,
            per_channel: true,
            narrow: true,
        }),
        activations: None,
    };
    c.set_quant(q, false);
    c
}

/// Forward (training or not), then backward with `r`; returns y and ∂L/∂x.
fn step(c: &mut Conv2d, x: &[f32], r: &[f32], training: bool) -> (Vec<f32>, Vec<f32>) {
    let batch = 4;
    let mut y = vec![0.0; r.len()];
    c.forward(x, &mut y, batch, training, false);
    let mut dx = vec![0.0; x.len()];
    if training {
        c.backward(x, r, Some(&mut dx), batch);
    }
    (y, dx)
}

fn check_grads(what: &str, c: &Conv2d, dx: &[f32], want: &Value) {
    let f = c.bn.as_deref().unwrap();
    close(&format!("{what} dx"), dx, &floats(&want["dx"]), 2e-5);
    close(&format!("{what} dW"), &c.weight.grad, &floats(&want["dw"]), 2e-5);
    close(&format!("{what} db"), &c.bias.grad, &floats(&want["db"]), 2e-5);
    close(&format!("{what} dγ"), &f.bn.gamma.grad, &floats(&want["dgamma"]), 2e-5);
    close(&format!("{what} dβ"), &f.bn.beta.grad, &floats(&want["dbeta"]), 2e-5);
}

#[test]
fn folded_batch_norm_matches_pytorch_convbn2d_with_batch_statistics() {
    let r = reference();
    let (x, rr) = (floats(&r["init"]["x"]), floats(&r["init"]["r"]));
    let mut c = layer(&r);
    let (y, dx) = step(&mut c, &x, &rr, true);
    let want = &r["train"];
    close("train y", &y, &floats(&want["y"]), 2e-5);
    check_grads("train", &c, &dx, want);
    // The running statistics after the step (PyTorch moves them inside the forward pass).
    let f = &mut c.bn.as_deref_mut().unwrap().bn;
    let (s1, s2, n) = f.batch_sums.clone();
    assert_eq!(n, 4 * 36, "rows of the batch statistics");
    f.update_running(&s1, &s2, n);
    close(
        "running mean",
        &f.running_mean.value,
        &floats(&want["running_mean"]),
        1e-6,
    );
    close("running var", &f.running_var.value, &floats(&want["running_var"]), 1e-6);
}

#[test]
fn folded_batch_norm_matches_pytorch_with_frozen_statistics_and_in_evaluation() {
    let r = reference();
    let (x, rr) = (floats(&r["init"]["x"]), floats(&r["init"]["r"]));
    let mut c = layer(&r);
    c.bn.as_deref_mut().unwrap().frozen = true;
    let (y, dx) = step(&mut c, &x, &rr, true);
    let want = &r["frozen"];
    close("frozen y", &y, &floats(&want["y"]), 2e-5);
    check_grads("frozen", &c, &dx, want);
    let f = &c.bn.as_deref().unwrap().bn;
    assert_eq!(f.batch_sums.2, 0, "frozen statistics do not move");
    let mut c = layer(&r);
    let (y, _) = step(&mut c, &x, &rr, false);
    close("eval y", &y, &floats(&r["eval"]["y"]), 2e-5);
}

/// L(y) = Σ r·y in f64.
fn loss(y: &[f32], r: &[f32]) -> f64 {
    y.iter().zip(r).map(|(a, b)| *a as f64 * *b as f64).sum()
}

#[test]
fn folded_batch_norm_with_float_weights_matches_finite_differences() {
    // With float weights the fold is exact (W·s/s = W up to rounding), so every gradient,
    // including γ's two paths, must be the batch-normalised convolution's.
    // Both with batch statistics and with frozen ones (where the two terms of ∂L/∂s do not
    // vanish one by one, as they do under batch statistics).
    for frozen in [false, true] {
        fd_check(frozen, false);
    }
}

/// The layout of binary kernels (`FoldedBn::after_binary`: the batch norm stays after the kernel,
/// `s ≡ 1` in it), with float weights, against finite differences: `∂L/∂W` without the factor
/// `s`, and γ learning through the batch norm alone.
#[test]
fn batch_norm_after_the_kernel_matches_finite_differences() {
    for frozen in [false, true] {
        fd_check(frozen, true);
    }
}

/// Evaluation of a layer whose batch norm stays after the kernel is the convolution followed by
/// the batch norm on its running statistics (not the folded kernel).
#[test]
fn batch_norm_after_the_kernel_evaluates_conv_then_bn() {
    let r = reference();
    let x = floats(&r["init"]["x"]);
    let mut c = after_binary_layer(&r);
    let mut y = vec![0.0; 4 * 6 * 6 * 5];
    c.forward(&x, &mut y, 4, false, false);
    let mut plain = c.clone();
    let bn = plain.bn.take().unwrap().bn;
    let mut z = vec![0.0; y.len()];
    plain.forward(&x, &mut z, 4, false, false);
    for (i, (&got, &zi)) in y.iter().zip(&z).enumerate() {
        let j = i % 5;
        let want = bn.gamma.value[j] * (zi - bn.running_mean.value[j]) / (bn.running_var.value[j] + bn.epsilon).sqrt()
            + bn.beta.value[j];
        assert!(
            (got - want).abs() <= 1e-5 * want.abs().max(1.0),
            "y[{i}]: {got} vs {want}"
        );
    }
}

/// A binary convolution reads +1 in its padding (Larq's `pad_values = 1`), so that the integer
/// runtime's bit padding computes the same border: on an input of −1 with every ŵ = α = 0.5,
/// a 3×3 "same" convolution gives −4.5 in the middle, 0.5 in a corner (4 taps of −1, 5 of +1)
/// and −1.5 on an edge (6 and 3).
#[test]
fn binary_convolutions_pad_with_plus_one() {
    let cfg = Conv2dConfig {
        filters: 1,
        kernel: [3, 3],
        padding: Padding::Same,
        ..Default::default()
    };
    let mut c = Conv2d::new(0, Shape::new(3, 3, 1), cfg, Activation::Linear, &mut Rng::new(0, 0)).unwrap();
    c.weight.value = vec![0.5; 9];
    c.set_quant(
        LayerQuant {
            weights: Some(WeightQuant::Binary { scaled: true }),
            activations: None,
        },
        false,
    );
    let mut y = vec![0.0; 9];
    c.forward(&[-1.0; 9], &mut y, 1, false, false);
    assert_eq!(y, [0.5, -1.5, 0.5, -1.5, -4.5, -1.5, 0.5, -1.5, 0.5]);
}

/// The reference layer with its batch norm kept after the kernel.
fn after_binary_layer(r: &Value) -> Conv2d {
    let mut c = layer(r);
    let bn = c.bn.take().unwrap().bn;
    c.fold_batch_norm(bn, Activation::Linear, true);
    c.set_quant(LayerQuant::default(), false);
    c
}

fn fd_check(frozen: bool, after_binary: bool) {
    let r = reference();
    let (x, rr) = (floats(&r["init"]["x"]), floats(&r["init"]["r"]));
    let mut c = if after_binary {
        after_binary_layer(&r)
    } else {
        layer(&r)
    };
    c.set_quant(LayerQuant::default(), false);
    c.bn.as_deref_mut().unwrap().frozen = frozen;
    let (_, dx) = step(&mut c, &x, &rr, true);
    let eval = |c: &mut Conv2d, x: &[f32]| {
        let mut y = vec![0.0; rr.len()];
        c.forward(x, &mut y, 4, true, false);
        loss(&y, &rr)
    };
    let fd = |f: &dyn Fn(f32) -> f64| (f(1e-2) - f(-1e-2)) / 2e-2;
    let (gw, gb) = (c.weight.grad.clone(), c.bias.grad.clone());
    let f = c.bn.as_deref().unwrap();
    let (gg, gbeta) = (f.bn.gamma.grad.clone(), f.bn.beta.grad.clone());
    for i in (0..gw.len()).step_by(7) {
        let got = fd(&|h| {
            let mut c2 = c.clone();
            c2.weight.value[i] += h;
            eval(&mut c2, &x)
        });
        assert!(
            (got - gw[i] as f64).abs() < 5e-3,
            "frozen {frozen} after_binary {after_binary}: dW[{i}]: fd {got} vs {}",
            gw[i]
        );
    }
    for j in 0..5 {
        let got = fd(&|h| {
            let mut c2 = c.clone();
            c2.bias.value[j] += h;
            eval(&mut c2, &x)
        });
        // Under batch statistics the batch mean removes the bias: its gradient is 0 then.
        assert!(
            (got - gb[j] as f64).abs() < 5e-3,
            "frozen {frozen}: db[{j}]: fd {got} vs {}",
            gb[j]
        );
        let got = fd(&|h| {
            let mut c2 = c.clone();
            c2.bn.as_deref_mut().unwrap().bn.gamma.value[j] += h;
            eval(&mut c2, &x)
        });
        assert!(
            (got - gg[j] as f64).abs() < 5e-3,
            "frozen {frozen} after_binary {after_binary}: dγ[{j}]: fd {got} vs {}",
            gg[j]
        );
        let got = fd(&|h| {
            let mut c2 = c.clone();
            c2.bn.as_deref_mut().unwrap().bn.beta.value[j] += h;
            eval(&mut c2, &x)
        });
        assert!(
            (got - gbeta[j] as f64).abs() < 5e-3,
            "frozen {frozen}: dβ[{j}]: fd {got} vs {}",
            gbeta[j]
        );
    }
    let mut x2 = x.clone();
    for i in (0..x.len()).step_by(5) {
        let x0 = x2[i];
        x2[i] = x0 + 1e-2;
        let lp = eval(&mut c, &x2);
        x2[i] = x0 - 1e-2;
        let lm = eval(&mut c, &x2);
        x2[i] = x0;
        let got = (lp - lm) / 2e-2;
        assert!(
            (got - dx[i] as f64).abs() < 5e-3,
            "frozen {frozen}: dx[{i}]: fd {got} vs {}",
            dx[i]
        );
    }
}

fn cnn() -> ModelConfig {
    toml::from_str(
        r#"
        input = 64
        input_shape = [8, 8, 1]
        layers = [
          { type = "conv2d", filters = 4, kernel_size = 3, padding = "same" },
          { type = "batch_norm", torch_momentum = 0.1, epsilon = 1e-5 },
          { type = "activation", activation = "relu" },
          { type = "max_pool2d", pool_size = 2 },
          { type = "conv2d", filters = 6, kernel_size = 3, padding = "same" },
          { type = "batch_norm", torch_momentum = 0.1, epsilon = 1e-5 },
          { type = "activation", activation = "relu" },
          { type = "flatten" },
          { type = "dense", units = 3, activation = "softmax" },
        ]
        "#,
    )
    .unwrap()
}

#[test]
fn quantized_batch_normalised_models_fold_and_evaluate_as_exported() {
    let cfg = cnn();
    let mut m = Sequential::from_config(&cfg, Scheme::W8a8, false, 3).unwrap();
    // The batch norms and the activations after them are folded into the convolutions; their
    // parameters keep the float network's names.
    let kinds: Vec<&str> = m.layers.iter().map(|l| l.kind()).collect();
    assert_eq!(
        kinds,
        [
            "conv2d",
            "folded",
            "folded",
            "max_pool2d",
            "conv2d",
            "folded",
            "folded",
            "flatten",
            "dense"
        ]
    );
    let names: Vec<String> = m.params_iter().map(|p| p.name.clone()).collect();
    for n in ["layers.1.gamma", "layers.1.beta", "layers.5.gamma"] {
        assert!(names.iter().any(|x| x == n), "{n} missing from {names:?}");
    }
    let buffers: Vec<String> = m.buffers_iter().map(|b| b.name.clone()).collect();
    assert!(buffers.iter().any(|x| x == "layers.5.running_var"), "{buffers:?}");
    assert!(matches!(&m.layers[0], Layer::Conv2d(c) if c.out.activation == Activation::Relu));
    // A few training steps move the statistics and the observers.
    let mut rng = Rng::new(5, 0);
    let batch = 16;
    let labels: Vec<u32> = (0..batch).map(|i| (i % 3) as u32).collect();
    for _ in 0..4 {
        for v in m.input_mut(batch).iter_mut() {
            *v = rng.uniform_range(0.0, 1.0);
        }
        m.forward_backward(&labels, batch, &mut rng);
        m.finish_step(&[]);
    }
    assert_ne!(m.batch_norm_at(1).unwrap().running_var.value, vec![1.0; 4]);
    // Evaluation of the training model is the baked (exported) model, bit for bit.
    let x: Vec<f32> = (0..batch * 64).map(|_| rng.uniform_range(0.0, 1.0)).collect();
    let got = m.predict(&x, batch);
    let mut baked = m.clone();
    baked.bake_folded_batch_norm();
    assert!(!baked.has_folded_batch_norm());
    assert_eq!(got, baked.predict(&x, batch));
}

#[test]
fn batch_norm_that_cannot_be_folded_is_refused_naming_the_layer() {
    let mut cfg = cnn();
    if let LayerConfig::Conv2d { activation, .. } = &mut cfg.layers[0] {
        *activation = Activation::Relu;
    }
    let e = Sequential::from_config(&cfg, Scheme::W8a8, false, 0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("model.layers[0].activation"), "{e}");
    let mut cfg = cnn();
    cfg.layers.swap(3, 1); // pool between the convolution and its batch norm
    let e = Sequential::from_config(&cfg, Scheme::W8a8, false, 0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("model.layers[3]"), "{e}");
    // Float training keeps plain batch norm layers.
    let m = Sequential::from_config(&cnn(), Scheme::Fp32, false, 0).unwrap();
    assert!(matches!(m.layers[1], Layer::BatchNorm(_)));
}

#[test]
fn folded_layer_with_its_activation_gives_the_gradients_of_the_separate_relu() {
    // The output stage's gradient buffer is rewritten in place (ReLU folded in) — against the
    // passthrough layer followed by a ReLU by hand.
    let r = reference();
    let (x, rr) = (floats(&r["init"]["x"]), floats(&r["init"]["r"]));
    let mut lin = layer(&r);
    let mut y_lin = vec![0.0; rr.len()];
    lin.forward(&x, &mut y_lin, 4, true, false);
    let masked: Vec<f32> = rr
        .iter()
        .zip(&y_lin)
        .map(|(&g, &y)| if y > 0.0 { g } else { 0.0 })
        .collect();
    let mut dx_lin = vec![0.0; x.len()];
    lin.backward(&x, &masked, Some(&mut dx_lin), 4);

    let mut relu = layer(&r);
    let bn = relu.bn.take().unwrap().bn;
    relu.fold_batch_norm(bn, Activation::Relu, false);
    relu.set_quant(lin.quant, false);
    let mut y = vec![0.0; rr.len()];
    relu.forward(&x, &mut y, 4, true, false);
    let want_y: Vec<f32> = y_lin.iter().map(|v| v.max(0.0)).collect();
    assert_eq!(y, want_y);
    let mut dx = vec![0.0; x.len()];
    relu.backward(&x, &rr, Some(&mut dx), 4);
    assert_eq!(dx, dx_lin, "dx");
    assert_eq!(relu.weight.grad, lin.weight.grad, "dW");
    assert_eq!(relu.bias.grad, lin.bias.grad, "db");
    let (a, b) = (&relu.bn.as_deref().unwrap().bn, &lin.bn.as_deref().unwrap().bn);
    assert_eq!(a.gamma.grad, b.gamma.grad, "dγ");
    assert_eq!(a.beta.grad, b.beta.grad, "dβ");
}
