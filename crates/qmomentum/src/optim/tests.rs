//! Optimizer trajectories on f(θ) = θ²/2 (g = θ), θ₀ = 1, μ = 0.9, η = 0.1 unless stated,
//! computed by hand (the arithmetic is in each comment) and, for the PyTorch form, equal to what
//! `torch.optim.SGD(lr=0.1, momentum=0.9, …)` prints for the same problem.

use super::*;

fn run(cfg: OptimizerConfig, theta0: &[f32], steps: usize) -> Vec<Vec<f32>> {
    let mut opt = Optimizer::new(cfg).unwrap();
    let mut p = Param::new("theta", ParamKind::Weight, vec![theta0.len()], theta0.to_vec());
    let mut out = Vec::new();
    for t in 1..=steps {
        p.grad.copy_from_slice(&p.value); // g = θ
        opt.step(&mut [&mut p], t as u64).unwrap();
        out.push(p.value.clone());
    }
    out
}

fn base(conv: Convention) -> OptimizerConfig {
    OptimizerConfig {
        lr: 0.1,
        momentum: 0.9,
        convention: conv,
        ..Default::default()
    }
}

fn close(got: &[Vec<f32>], want: &[f32]) {
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g[0] - w).abs() < 1e-6, "step {}: got {}, want {}", i + 1, g[0], w);
    }
}

#[test]
fn heavy_ball_both_conventions_agree_at_constant_lr() {
    // lr inside: v1 = .1, θ1 = .9; v2 = .09 + .09 = .18, θ2 = .72; v3 = .162 + .072 = .234, θ3 = .486
    close(&run(base(Convention::LrInside), &[1.0], 3), &[0.9, 0.72, 0.486]);
    // PyTorch: b1 = 1, θ1 = .9; b2 = .9 + .9 = 1.8, θ2 = .72; b3 = 1.62 + .72 = 2.34, θ3 = .486
    close(&run(base(Convention::LrOutside), &[1.0], 3), &[0.9, 0.72, 0.486]);
}

#[test]
fn nesterov_both_conventions() {
    // Keras: v1 = .1, θ1 = 1 − (.09 + .1) = .81; v2 = .09 + .081 = .171, θ2 = .81 − (.1539 + .081) = .5751
    // PyTorch: b1 = 1, d = 1.9, θ1 = .81; b2 = .9 + .81 = 1.71, d = .81 + 1.539 = 2.349, θ2 = .5751
    for conv in [Convention::LrInside, Convention::LrOutside] {
        let cfg = OptimizerConfig {
            nesterov: true,
            ..base(conv)
        };
        close(&run(cfg, &[1.0], 2), &[0.81, 0.5751]);
    }
}

#[test]
fn dampening_first_step_rule() {
    // PyTorch skips dampening on step 1: b1 = 1, θ1 = .9; b2 = .9 + .5·.9 = 1.35, θ2 = .765
    let cfg = OptimizerConfig {
        dampening: 0.5,
        ..base(Convention::LrOutside)
    };
    close(&run(cfg, &[1.0], 2), &[0.9, 0.765]);
    // lr inside, zero-initialised v: v1 = .5·.1·1 = .05, θ1 = .95; v2 = .045 + .0475 = .0925, θ2 = .8575
    let cfg = OptimizerConfig {
        dampening: 0.5,
        ..base(Convention::LrInside)
    };
    close(&run(cfg, &[1.0], 2), &[0.95, 0.8575]);
}

#[test]
#[allow(clippy::approx_constant)] // 0.6931 is the hand-computed θ₂, not ln 2
fn coupled_and_decoupled_weight_decay() {
    // Coupled λ = .1: g' = 1.1θ. b1 = 1.1, θ1 = .89; g' = .979, b2 = .99 + .979 = 1.969, θ2 = .6931
    let cfg = OptimizerConfig {
        weight_decay: 0.1,
        ..base(Convention::LrOutside)
    };
    close(&run(cfg, &[1.0], 2), &[0.89, 0.6931]);
    // Decoupled λ = .1 (η·λ = .01): θ ← .99, v1 = .1, θ1 = .89; θ ← .8811, v2 = .09 + .089 = .179, θ2 = .7021
    let cfg = OptimizerConfig {
        weight_decay: 0.1,
        decay_mode: DecayMode::Decoupled,
        ..base(Convention::LrInside)
    };
    close(&run(cfg, &[1.0], 2), &[0.89, 0.7021]);
}

/// Decay reaches weights only unless biases/scales are asked for (an LSQ step must not shrink).
#[test]
fn weight_decay_is_per_group() {
    let step = |cfg: OptimizerConfig| {
        let mut opt = Optimizer::new(cfg).unwrap();
        let mut w = Param::new("w", ParamKind::Weight, vec![1], vec![1.0]);
        let mut b = Param::new("b", ParamKind::Bias, vec![1], vec![1.0]);
        let mut s = Param::new("s", ParamKind::Scale, vec![1], vec![1.0]);
        // Zero gradients: only decay can move a value. Decoupled, η·λ = 0.1·0.5 = 0.05.
        opt.step(&mut [&mut w, &mut b, &mut s], 1).unwrap();
        (w.value[0], b.value[0], s.value[0])
    };
    let cfg = OptimizerConfig {
        weight_decay: 0.5,
        decay_mode: DecayMode::Decoupled,
        ..base(Convention::LrInside)
    };
    assert_eq!(step(cfg.clone()), (0.95, 1.0, 1.0));
    let all = OptimizerConfig {
        decay_biases: true,
        decay_scales: true,
        ..cfg
    };
    assert_eq!(step(all), (0.95, 0.95, 0.95));
}

#[test]
fn clipping_by_value_and_by_global_norm() {
    // clip 0.5: g = .5, v1 = .05, θ1 = .95; g = .5, v2 = .045 + .05 = .095, θ2 = .855
    let cfg = OptimizerConfig {
        clip_value: Some(0.5),
        ..base(Convention::LrInside)
    };
    close(&run(cfg, &[1.0], 2), &[0.95, 0.855]);
    // θ = (3, 4), g = (3, 4), ‖g‖ = 5 → clipped to 1: g = (.6, .8); θ1 = (2.94, 3.92)
    let cfg = OptimizerConfig {
        clip_norm: Some(1.0),
        ..base(Convention::LrInside)
    };
    let t = run(cfg, &[3.0, 4.0], 1);
    assert!((t[0][0] - 2.94).abs() < 1e-6 && (t[0][1] - 3.92).abs() < 1e-6, "{t:?}");
}

#[test]
fn plain_sgd_is_momentum_zero() {
    let cfg = OptimizerConfig {
        momentum: 0.0,
        ..base(Convention::LrOutside)
    };
    close(&run(cfg, &[1.0], 2), &[0.9, 0.81]);
    let cfg = OptimizerConfig {
        momentum: 0.0,
        ..base(Convention::LrInside)
    };
    close(&run(cfg, &[1.0], 2), &[0.9, 0.81]);
}

/// The closed-form witness of the two conventions under a schedule: g = 1 (constant),
/// μ = 0.9, θ₀ = 0, η = 0.1 then 0.01. PyTorch: θ₂ = −0.1 − 0.01·1.9 = −0.119.
/// lr inside: v₂ = 0.09 + 0.01 = 0.1, θ₂ = −0.2.
#[test]
fn conventions_differ_under_a_schedule_witness() {
    for (conv, want) in [(Convention::LrOutside, -0.119f32), (Convention::LrInside, -0.2)] {
        // Keras semantics: step 0 ≤ boundary 0 takes 0.1, step 1 > 0 takes 0.01.
        let cfg = OptimizerConfig {
            schedule: Schedule::Piecewise {
                boundaries: vec![0],
                values: vec![0.1, 0.01],
            },
            ..base(conv)
        };
        let mut opt = Optimizer::new(cfg).unwrap();
        let mut p = Param::new("theta", ParamKind::Weight, vec![1], vec![0.0]);
        for t in 1..=2 {
            p.grad[0] = 1.0;
            opt.step(&mut [&mut p], t).unwrap();
        }
        assert!((p.value[0] - want).abs() < 1e-6, "{conv:?}: {}", p.value[0]);
    }
}

#[test]
fn impossible_settings_are_rejected_with_the_field_named() {
    let bad = [
        (
            OptimizerConfig {
                momentum: 1.0,
                ..Default::default()
            },
            "optimizer.momentum",
        ),
        (
            OptimizerConfig {
                momentum: -0.1,
                ..Default::default()
            },
            "optimizer.momentum",
        ),
        (
            OptimizerConfig {
                lr: -0.01,
                ..Default::default()
            },
            "optimizer.lr",
        ),
        (
            OptimizerConfig {
                lr: f32::NAN,
                ..Default::default()
            },
            "optimizer.lr",
        ),
        (
            OptimizerConfig {
                nesterov: true,
                dampening: 0.1,
                convention: Convention::LrOutside,
                ..Default::default()
            },
            "optimizer.dampening",
        ),
        (
            OptimizerConfig {
                nesterov: true,
                momentum: 0.0,
                ..Default::default()
            },
            "optimizer.nesterov",
        ),
        (
            OptimizerConfig {
                clip_norm: Some(0.0),
                ..Default::default()
            },
            "optimizer.clip_norm",
        ),
    ];
    for (cfg, field) in bad {
        let e = Optimizer::new(cfg).unwrap_err().to_string();
        assert!(e.contains(field), "{e}");
    }
}

#[test]
fn bop_group_flips_binary_weights_and_momentum_trains_the_rest() {
    let cfg = OptimizerConfig {
        lr: 0.1,
        binary: BinaryOptimizer::Bop {
            gamma: 1.0,
            threshold: 0.0,
        },
        ..Default::default()
    };
    let mut opt = Optimizer::new(cfg).unwrap();
    let mut w = Param::new("w", ParamKind::Binary, vec![2], vec![1.0, -1.0]);
    let mut b = Param::new("b", ParamKind::Bias, vec![1], vec![0.0]);
    w.grad.copy_from_slice(&[0.5, 0.5]); // agrees with w0 → flip; disagrees with w1 → keep
    b.grad[0] = 1.0;
    opt.step(&mut [&mut w, &mut b], 1).unwrap();
    assert_eq!(w.value, [-1.0, -1.0]);
    assert!((b.value[0] + 0.1).abs() < 1e-7);
    assert_eq!(opt.last_flips, 1);
}

/// 8-bit state (Dettmers et al. 2021): a large tensor's trajectory follows the f32 one closely
/// (the state is re-quantized every step), a small one (< 4096 values) is exactly f32, and the
/// state takes about a quarter of the memory.
#[test]
fn eight_bit_state_tracks_the_f32_state() {
    let n = 6000;
    let theta0: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.01).sin()).collect();
    let mut f32_run = run(base(Convention::LrInside), &theta0, 20);
    let cfg8 = OptimizerConfig {
        state_bits: 8,
        ..base(Convention::LrInside)
    };
    let mut opt = Optimizer::new(cfg8.clone()).unwrap();
    let mut p = Param::new("theta", ParamKind::Weight, vec![n], theta0.clone());
    let mut last = Vec::new();
    for t in 1..=20 {
        p.grad.copy_from_slice(&p.value);
        opt.step(&mut [&mut p], t).unwrap();
        last = p.value.clone();
    }
    let want = f32_run.pop().unwrap();
    let worst = last
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(worst < 0.02, "8-bit state drifted by {worst}");
    assert!(last != want, "the state really is quantized");
    assert_eq!(opt.state[0].bytes(), n + 4 * 3);
    assert!(opt.state[0].bytes() * 10 < 4 * n * 3, "≈ 0.25× of f32");
    // Small tensors keep f32: identical to the f32 optimizer.
    let small = run(cfg8, &[1.0, -2.0], 5);
    assert_eq!(small, run(base(Convention::LrInside), &[1.0, -2.0], 5));
}

/// Frozen entries (iterative freezing) keep their value and a zero velocity through updates;
/// the others follow the heavy ball by hand (θ₀ = 1, g = θ: θ1 = .9, θ2 = .72), with the f32
/// and the 8-bit state, split over two cores or not.
#[test]
fn frozen_entries_keep_their_value_and_zero_velocity() {
    for (bits, threads, n) in [
        (32u32, 1usize, 8usize),
        (32, 2, SPLIT_MIN + 40),
        (8, 1, state8::MIN_VALUES + 8),
    ] {
        let cfg = OptimizerConfig {
            state_bits: bits,
            ..base(Convention::LrInside)
        };
        let mut opt = Optimizer::new(cfg).unwrap();
        opt.threads = threads;
        let mut p = Param::new("theta", ParamKind::Weight, vec![n], vec![1.0; n]);
        let mask: Vec<bool> = (0..n).map(|i| i % 3 == 1).collect();
        p.frozen = Some(mask.clone());
        for t in 1..=2u64 {
            p.grad.copy_from_slice(&p.value);
            opt.step(&mut [&mut p], t).unwrap();
        }
        for (i, (&v, &m)) in p.value.iter().zip(&mask).enumerate() {
            let want = if m { 1.0 } else { 0.72 };
            assert!(
                (v - want).abs() < 2e-3,
                "{bits}-bit state, {threads} threads, θ[{i}] = {v}, want {want}"
            );
        }
        let st = &opt.state[0];
        let vel: Vec<f32> = match &st.q8 {
            Some(q) => {
                let mut v = vec![0.0; n];
                q.dequantize(&mut v);
                v
            }
            None => st.buffer.clone(),
        };
        assert!(
            mask.iter().zip(&vel).all(|(&m, &v)| !m || v == 0.0),
            "frozen velocity is 0"
        );
    }
}
