//! The llm.c-style end-to-end check: logits, loss, gradients and three training steps of a
//! 6-5-4-3 MLP against an independent float64 NumPy implementation of the same formulas
//! (`tests/reference/mlp_reference.py`, output committed as `mlp_reference.json`).

use qmomentum::config::{LayerConfig, ModelConfig};
use qmomentum::layers::{Activation, Layer};
use qmomentum::model::Sequential;
use qmomentum::optim::{Convention, Optimizer, OptimizerConfig};
use qmomentum::quant::Scheme;
use qmomentum::rng::Rng;
use serde_json::Value;

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn setup(r: &Value) -> Sequential {
    let d = |units, activation| LayerConfig::Dense {
        units,
        activation,
        quant: None,
    };
    let cfg = ModelConfig {
        input: 6,
        layers: vec![
            d(5, Activation::Relu),
            d(4, Activation::Relu),
            d(3, Activation::Softmax),
        ],
        ..Default::default()
    };
    let mut m = Sequential::from_config(&cfg, Scheme::Fp32, false, 0).unwrap();
    for (i, dense) in m.dense_mut().enumerate() {
        dense.weight.value = floats(&r["w0"][i]);
        dense.bias.value = floats(&r["b0"][i]);
    }
    m.input_mut(4).copy_from_slice(&floats(&r["x"]));
    m
}

fn check(name: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol * (1.0 + w.abs()),
            "{name}[{i}]: got {g}, reference {w}"
        );
    }
}

fn reference() -> Value {
    serde_json::from_str(include_str!("reference/mlp_reference.json")).unwrap()
}

#[test]
fn logits_loss_and_gradients_match_the_reference() {
    let r = reference();
    let mut m = setup(&r);
    let y: Vec<u32> = r["y"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let logits = m.forward(4, true, true, &mut Rng::new(0, 0)).to_vec();
    check("logits", &logits, &floats(&r["logits"]), 1e-5);
    m.input_mut(4).copy_from_slice(&floats(&r["x"]));
    let (loss_sum, _) = m.forward_backward(&y, 4, &mut Rng::new(0, 0));
    check(
        "loss",
        &[(loss_sum / 4.0) as f32],
        &[r["loss"].as_f64().unwrap() as f32],
        1e-5,
    );
    for (i, l) in m.layers.iter().enumerate() {
        let Layer::Dense(d) = l else { continue };
        check(&format!("grad W{i}"), &d.weight.grad, &floats(&r["grad_w"][i]), 1e-5);
        check(&format!("grad b{i}"), &d.bias.grad, &floats(&r["grad_b"][i]), 1e-5);
    }
}

#[test]
fn three_momentum_steps_match_the_reference_in_both_conventions() {
    let r = reference();
    for (conv, key) in [
        (Convention::LrInside, "steps_lr_inside"),
        (Convention::LrOutside, "steps_lr_outside"),
    ] {
        let mut m = setup(&r);
        let y: Vec<u32> = r["y"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let mut opt = Optimizer::new(OptimizerConfig {
            lr: 0.1,
            momentum: 0.9,
            convention: conv,
            ..Default::default()
        })
        .unwrap();
        for (t, step) in r[key].as_array().unwrap().iter().enumerate() {
            m.input_mut(4).copy_from_slice(&floats(&r["x"]));
            let (loss_sum, _) = m.forward_backward(&y, 4, &mut Rng::new(0, 0));
            check(
                &format!("{key} loss {t}"),
                &[(loss_sum / 4.0) as f32],
                &[step["loss"].as_f64().unwrap() as f32],
                1e-5,
            );
            opt.step(&mut m.params_mut(), t as u64 + 1).unwrap();
            for (i, d) in m.dense().enumerate() {
                check(
                    &format!("{key} step {t} W{i}"),
                    &d.weight.value,
                    &floats(&step["w"][i]),
                    2e-5,
                );
                check(
                    &format!("{key} step {t} b{i}"),
                    &d.bias.value,
                    &floats(&step["b"][i]),
                    2e-5,
                );
            }
        }
    }
}
