//! Oscillation tracking, dampening and iterative freezing on a constructed case that oscillates:
//! a weight whose optimum lies between two grid points (Nagel et al. 2022, sections 3 and 4).

use qmomentum::layers::{Activation, Dense};
use qmomentum::optim::{Optimizer, OptimizerConfig};
use qmomentum::quant::{LayerQuant, WeightQuant};
use qmomentum::rng::Rng;

/// A 2-input, 1-output layer with a per-tensor 2-bit grid {−s, 0, s}: weight 0 (input always 0,
/// so it never moves) holds the scale s = 1; weight 1 wants ŵ₁ = 0.5 (target y = 0.5 for x₁ = 1),
/// halfway between the grid points 0 and 1, so the STE gradient 2(ŵ₁ − 0.5) = ±1 pushes it back
/// and forth across 0.5 with momentum. Returns (code flips, oscillations, final |w₁ − 0.5|).
fn run(dampening: f32) -> (f32, f32, f32) {
    let (flips, osc, dist, _) = run_with(dampening, None);
    (flips, osc, dist)
}

/// [`run`] with iterative freezing at a constant threshold; also returns the layer.
fn run_with(dampening: f32, freeze: Option<f32>) -> (f32, f32, f32, Dense) {
    let mut d = Dense::new(0, 2, 1, Activation::Linear, &mut Rng::new(0, 0));
    d.set_quant(
        LayerQuant {
            weights: Some(WeightQuant::Int {
                bits: 2,
                per_channel: false,
                narrow: true,
            }),
            activations: None,
        },
        false,
    );
    d.weight.value = vec![1.0, 0.3];
    d.bias.value = vec![0.0];
    if freeze.is_some() {
        d.wq.enable_freezing(0);
    }
    let mut opt = Optimizer::new(OptimizerConfig {
        lr: 0.05,
        momentum: 0.9,
        ..Default::default()
    })
    .unwrap();
    let x = [0.0f32, 1.0];
    let steps = 200;
    for t in 1..=steps {
        d.wq.dampening = dampening;
        let mut y = [0.0f32];
        d.forward(&x, &mut y, 1, true, false);
        d.backward(&x, &[2.0 * (y[0] - 0.5)], None, 1);
        d.wq.track(0.01, 1);
        if let Some(th) = freeze {
            d.wq.freeze(&mut d.weight, th, 0.01);
        }
        opt.step(&mut [&mut d.weight], t).unwrap();
    }
    let r = d.wq.tracker.as_mut().unwrap().take_epoch(0, 0.02, 0.01);
    let steps = steps as f32;
    let dist = (d.weight.value[1] - 0.5).abs();
    (r.flips_per_step * steps, r.oscillations_per_step * steps, dist, d)
}

/// Iterative freezing: once weight 1's oscillation frequency passes the threshold it is frozen
/// at the rounded EMA of its code (0 or 1: the EMA of a code that spends about as long at each
/// is near 0.5), its latent value is put on that grid point, the optimizer no longer moves it,
/// and its code stops flipping. Weight 0 (input 0, gradient 0) is never frozen.
#[test]
fn iterative_freezing_stops_the_constructed_oscillation() {
    let (flips, _, _, _) = run_with(0.0, None);
    let (flips_f, osc_f, _, d) = run_with(0.0, Some(0.03));
    eprintln!("200 steps: {flips} flips without control, {flips_f} ({osc_f} oscillations) with freezing at 0.03");
    let frozen = d.wq.frozen.as_ref().unwrap();
    assert!(frozen.value[0].is_nan(), "weight 0 never oscillates");
    let code = frozen.value[1];
    assert!(code == 0.0 || code == 1.0, "frozen at code {code}");
    assert_eq!(d.weight.frozen.as_deref(), Some(&[false, true][..]));
    // The latent weight sits on its grid point (s = 1), and the forward pass uses that code.
    assert_eq!(d.weight.value[1], code);
    assert!(flips_f * 2.0 <= flips, "frozen run flips {flips_f} vs {flips}");
    // The weight stays where it froze: 50 more steps change neither value nor code.
    let mut d = d;
    let mut opt = Optimizer::new(OptimizerConfig {
        lr: 0.05,
        momentum: 0.9,
        weight_decay: 0.1,
        ..Default::default()
    })
    .unwrap();
    for t in 1..=50 {
        let mut y = [0.0f32];
        d.forward(&[0.0, 1.0], &mut y, 1, true, false);
        d.backward(&[0.0, 1.0], &[2.0 * (y[0] - 0.5)], None, 1);
        assert_eq!(d.weight.grad[1], 0.0, "a frozen weight has no gradient");
        opt.step(&mut [&mut d.weight], t).unwrap();
        assert_eq!(d.weight.value[1], code);
    }
    assert_eq!(opt.state[0].buffer[1], 0.0, "its momentum stays 0");
}

/// The frozen code survives a moving scale: ŵ = code·s with this step's s, not the s it froze on.
#[test]
fn a_frozen_code_follows_the_scale() {
    let (_, _, _, mut d) = run_with(0.0, Some(0.03));
    let code = d.wq.frozen.as_ref().unwrap().value[1];
    d.weight.value[0] = 3.0; // s = 3 now (max-abs of the tensor, 2-bit narrow grid)
    let mut y = [0.0f32];
    d.forward(&[0.0, 1.0], &mut y, 1, true, false);
    assert_eq!(y[0], code * 3.0 + d.bias.value[0]);
}

#[test]
fn the_constructed_case_oscillates_and_dampening_stops_it() {
    let (flips, osc, _) = run(0.0);
    // Without control the code of weight 1 keeps flipping, nearly every flip reversing the last.
    assert!(flips >= 20.0, "flips {flips}");
    assert!(osc >= flips - 2.0, "oscillations {osc} of {flips} flips");
    // With dampening (λ = 1) the latent weight is pulled onto its grid point and stays there.
    let (flips_d, osc_d, _) = run(1.0);
    eprintln!("200 steps: {flips} flips / {osc} oscillations without dampening, {flips_d} / {osc_d} with λ = 1");
    assert!(flips_d * 4.0 <= flips, "dampened flips {flips_d} vs {flips}");
    assert!(osc_d * 4.0 <= osc, "dampened oscillations {osc_d} vs {osc}");
}

/// The regulariser's gradient by its definition: 2λ(w − ŵ) added to the STE gradient.
#[test]
fn dampening_gradient_by_definition() {
    let mut d = Dense::new(0, 2, 1, Activation::Linear, &mut Rng::new(0, 0));
    d.set_quant(
        LayerQuant {
            weights: Some(WeightQuant::Int {
                bits: 2,
                per_channel: false,
                narrow: true,
            }),
            activations: None,
        },
        false,
    );
    d.weight.value = vec![1.0, 0.3]; // ŵ = (1, 0)
    let x = [1.0f32, 1.0];
    let mut y = [0.0f32];
    d.forward(&x, &mut y, 1, true, false);
    d.wq.dampening = 0.0;
    d.backward(&x, &[1.0], None, 1);
    let plain = d.weight.grad.clone();
    d.wq.dampening = 0.5;
    d.backward(&x, &[1.0], None, 1);
    // 2·0.5·(w − ŵ) = (0, 0.3).
    assert!((d.weight.grad[0] - plain[0]).abs() < 1e-7);
    assert!(
        (d.weight.grad[1] - plain[1] - 0.3).abs() < 1e-6,
        "{:?} vs {plain:?}",
        d.weight.grad
    );
}

/// Fixed weight scales: once fixed, ŵ = s·clamp(round(w/s)) with the fixed s whatever the
/// largest weight does (max-abs scales would move every code of the channel), and the STE passes
/// the gradient inside the grid's range only (PyTorch's FakeQuantize rule).
#[test]
fn fixed_scales_stop_moving_with_the_largest_weight_and_clip() {
    let mut d = Dense::new(0, 3, 1, Activation::Linear, &mut Rng::new(0, 0));
    d.set_quant(
        LayerQuant {
            weights: Some(WeightQuant::Int {
                bits: 2,
                per_channel: true,
                narrow: true,
            }),
            activations: None,
        },
        false,
    );
    d.bias.value = vec![0.0];
    d.weight.value = vec![1.0, 0.6, 0.4]; // s = 1: codes 1, 1, 0
    d.wq.enable_fixed_scales(0);
    let x = [1.0f32, 1.0, 1.0];
    let mut y = [0.0f32];
    d.forward(&x, &mut y, 1, true, false);
    assert_eq!(y[0], 2.0);
    d.wq.fix_scales();
    // The largest weight doubles: with max-abs scales s = 2 and the codes become 1, 0, 0 (ŵ sum
    // 2); with the fixed s = 1 the first weight clips at code 1 and the others keep theirs.
    d.weight.value[0] = 2.0;
    d.forward(&x, &mut y, 1, true, false);
    assert_eq!(y[0], 2.0);
    d.weight.value[1] = 0.4;
    d.forward(&x, &mut y, 1, true, false);
    assert_eq!(y[0], 1.0, "codes 1, 0, 0 on the fixed grid");
    d.backward(&x, &[1.0], None, 1);
    // dL/dŵ = x = 1 for each; weight 0 (2.0) lies beyond the range [−1, 1]: no gradient.
    assert_eq!(d.weight.grad, vec![0.0, 1.0, 1.0]);
}
