//! Oscillation tracking and dampening on a constructed case that oscillates: a weight whose
//! optimum lies between two grid points (Nagel et al. 2022, section 3).

use qmomentum::layers::{Activation, Dense};
use qmomentum::optim::{Optimizer, OptimizerConfig};
use qmomentum::quant::{LayerQuant, WeightQuant};
use qmomentum::rng::Rng;

/// A 2-input, 1-output layer with a per-tensor 2-bit grid {−s, 0, s}: weight 0 (input always 0,
/// so it never moves) holds the scale s = 1; weight 1 wants ŵ₁ = 0.5 (target y = 0.5 for x₁ = 1),
/// halfway between the grid points 0 and 1, so the STE gradient 2(ŵ₁ − 0.5) = ±1 pushes it back
/// and forth across 0.5 with momentum. Returns (code flips, oscillations, final |w₁ − 0.5|).
fn run(dampening: f32) -> (f32, f32, f32) {
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
        d.wq.track(&d.weight.value, 0.01);
        opt.step(&mut [&mut d.weight], t).unwrap();
    }
    let r = d.wq.tracker.as_mut().unwrap().take_epoch(0, 0.02);
    let steps = steps as f32;
    (
        r.flips_per_step * steps,
        r.oscillations_per_step * steps,
        (d.weight.value[1] - 0.5).abs(),
    )
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
