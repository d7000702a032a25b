//! Convolutional layers against their definitions: the im2col convolution against direct loops,
//! every backward pass against central finite differences (f64 accumulation of the loss), and
//! batch norm's running statistics against Keras's and PyTorch's update rules.

use qmomentum::layers::conv2d::{Conv2d, Conv2dConfig, Padding};
use qmomentum::layers::{Activation, BatchNorm, BnMomentum, Layer, Pool2d, PoolKind, Shape};
use qmomentum::rng::Rng;

/// L(y) = Σ r·y, so ∂L/∂y = r.
fn loss(y: &[f32], r: &[f32]) -> f64 {
    y.iter().zip(r).map(|(a, b)| *a as f64 * *b as f64).sum()
}

fn rand(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.uniform_range(-1.0, 1.0)).collect()
}

/// Direct loops of the definition in `layers/conv2d.rs` (NHWC, HWIO kernel, groups).
fn naive_conv(c: &Conv2d, x: &[f32], batch: usize) -> Vec<f32> {
    let g = &c.geo;
    let (i, o) = (g.input, g.output);
    let (cg, og) = (i.c / c.groups, o.c / c.groups);
    let mut y = vec![0.0f32; batch * o.len()];
    for b in 0..batch {
        for oy in 0..o.h {
            for ox in 0..o.w {
                for oc in 0..o.c {
                    let grp = oc / og;
                    let mut s = c.bias.value[oc] as f64;
                    for ky in 0..g.kernel[0] {
                        for kx in 0..g.kernel[1] {
                            let iy = (oy * g.stride[0] + ky * g.dilation[0]) as isize - g.pad[0] as isize;
                            let ix = (ox * g.stride[1] + kx * g.dilation[1]) as isize - g.pad[1] as isize;
                            if iy < 0 || ix < 0 || iy >= i.h as isize || ix >= i.w as isize {
                                continue;
                            }
                            for ci in 0..cg {
                                let xv = x[b * i.len() + (iy as usize * i.w + ix as usize) * i.c + grp * cg + ci];
                                let wv = c.weight.value[((ky * g.kernel[1] + kx) * cg + ci) * o.c + oc];
                                s += xv as f64 * wv as f64;
                            }
                        }
                    }
                    y[b * o.len() + (oy * o.w + ox) * o.c + oc] = s as f32;
                }
            }
        }
    }
    y
}

fn configs() -> Vec<(Shape, Conv2dConfig)> {
    vec![
        (
            Shape::new(5, 6, 3),
            Conv2dConfig {
                filters: 4,
                kernel: [3, 3],
                padding: Padding::Same,
                ..Default::default()
            },
        ),
        (
            Shape::new(7, 5, 2),
            Conv2dConfig {
                filters: 3,
                kernel: [3, 2],
                stride: [2, 1],
                ..Default::default()
            },
        ),
        (
            Shape::new(8, 8, 4),
            Conv2dConfig {
                filters: 6,
                kernel: [3, 3],
                dilation: [2, 2],
                groups: 2,
                padding: Padding::Explicit([1, 2, 0, 1]),
                ..Default::default()
            },
        ),
        (
            Shape::new(6, 6, 4),
            Conv2dConfig {
                filters: 4,
                kernel: [3, 3],
                groups: 4,
                stride: [2, 2],
                padding: Padding::Same,
                ..Default::default()
            },
        ),
        // The products without columns (`ImplicitGemm`): an odd kernel, "same", stride 1.
        (
            Shape::new(6, 5, 4),
            Conv2dConfig {
                filters: 3,
                kernel: [5, 3],
                padding: Padding::Same,
                ..Default::default()
            },
        ),
        // One channel per group: the columns kernel-position-major (`Conv2d::k_major`), with a
        // tap outside the input on either side, a stride and a dilation.
        (
            Shape::new(7, 9, 1),
            Conv2dConfig {
                filters: 5,
                kernel: [3, 4],
                stride: [1, 2],
                dilation: [1, 2],
                padding: Padding::Explicit([2, 3, 0, 1]),
                ..Default::default()
            },
        ),
        (
            Shape::new(5, 7, 3),
            Conv2dConfig {
                filters: 6,
                kernel: [3, 3],
                groups: 3,
                padding: Padding::Explicit([0, 2, 1, 0]),
                ..Default::default()
            },
        ),
        // cnn-small's first layer in small: one channel, 16 filters (kernel-position-major
        // columns on the `gemm` crate).
        (
            Shape::new(6, 5, 1),
            Conv2dConfig {
                filters: 16,
                kernel: [3, 3],
                padding: Padding::Same,
                ..Default::default()
            },
        ),
        // Multiples of 16 channels: on a CPU with AVX-512F, the three products without columns
        // on the hand-written kernels of `conv_implicit/avx512.rs`.
        (
            Shape::new(4, 5, 16),
            Conv2dConfig {
                filters: 16,
                kernel: [3, 3],
                padding: Padding::Same,
                ..Default::default()
            },
        ),
    ]
}

#[test]
fn conv_forward_matches_direct_loops() {
    let mut rng = Rng::new(1, 0);
    for (shape, cfg) in configs() {
        let mut c = Conv2d::new(0, shape, cfg, Activation::Linear, &mut rng).unwrap();
        c.bias.value = rand(&mut rng, cfg.filters);
        let batch = 2;
        let x = rand(&mut rng, batch * shape.len());
        let mut y = vec![0.0; batch * c.out_shape.len()];
        c.forward(&x, &mut y, batch, false, false);
        let want = naive_conv(&c, &x, batch);
        for (a, b) in y.iter().zip(&want) {
            assert!((a - b).abs() < 1e-4, "{shape} {cfg:?}: {a} vs {b}");
        }
    }
}

/// Central difference `(L(+h) − L(−h))/2h`, `f(h)` evaluating the loss with a value moved by h.
fn fd(f: impl Fn(f32) -> f64) -> f64 {
    (f(1e-2) - f(-1e-2)) / 2e-2
}

#[test]
fn conv_backward_matches_finite_differences() {
    let mut rng = Rng::new(2, 0);
    for (shape, cfg) in configs() {
        let mut c = Conv2d::new(0, shape, cfg, Activation::Tanh, &mut rng).unwrap();
        c.bias.value = rand(&mut rng, cfg.filters);
        let batch = 2;
        let mut x = rand(&mut rng, batch * shape.len());
        let n_out = batch * c.out_shape.len();
        let r = rand(&mut rng, n_out);
        let mut y = vec![0.0; n_out];
        c.forward(&x, &mut y, batch, true, false);
        let mut dx = vec![0.0; x.len()];
        c.backward(&x, &r, Some(&mut dx), batch);
        let (gw, gb) = (c.weight.grad.clone(), c.bias.grad.clone());
        let eval = |c: &mut Conv2d, x: &[f32]| {
            let mut y = vec![0.0; n_out];
            c.forward(x, &mut y, batch, false, false);
            loss(&y, &r)
        };
        for i in (0..gw.len()).step_by(3) {
            let got = fd(|h| {
                let mut c2 = c.clone();
                c2.weight.value[i] += h;
                eval(&mut c2, &x)
            });
            assert!(
                (got - gw[i] as f64).abs() < 3e-3,
                "{cfg:?} dW[{i}]: fd {got} vs {}",
                gw[i]
            );
        }
        for (j, &want) in gb.iter().enumerate() {
            let got = fd(|h| {
                let mut c2 = c.clone();
                c2.bias.value[j] += h;
                eval(&mut c2, &x)
            });
            assert!(
                (got - want as f64).abs() < 3e-3,
                "{cfg:?} db[{j}]: fd {got} vs {}",
                want
            );
        }
        for i in (0..x.len()).step_by(2) {
            let x0 = x[i];
            let h = 1e-2f32;
            x[i] = x0 + h;
            let lp = eval(&mut c, &x);
            x[i] = x0 - h;
            let lm = eval(&mut c, &x);
            x[i] = x0;
            let got = (lp - lm) / (2.0 * h as f64);
            assert!(
                (got - dx[i] as f64).abs() < 3e-3,
                "{cfg:?} dx[{i}]: fd {got} vs {}",
                dx[i]
            );
        }
    }
}

#[test]
fn pooling_forward_and_backward() {
    let mut rng = Rng::new(3, 0);
    // Max: a hand-worked 4×4×1 window of 2, stride 2.
    let mut p = Pool2d::new(0, PoolKind::Max, Shape::new(4, 4, 1), [2, 2], [2, 2], Padding::Valid).unwrap();
    let x: Vec<f32> = (0..16).map(|v| ((v * 7) % 16) as f32).collect();
    let mut y = vec![0.0; 4];
    p.forward(&x, &mut y, 1);
    // rows: [0 7 14 5 | 12 3 10 1 | 8 15 6 13 | 4 11 2 9]
    assert_eq!(y, vec![12.0, 14.0, 15.0, 13.0]);
    let mut dx = vec![0.0; 16];
    p.backward(&[1.0, 2.0, 3.0, 4.0], &mut dx, 1);
    assert_eq!((dx[4], dx[2], dx[9], dx[11]), (1.0, 2.0, 3.0, 4.0));
    assert_eq!(dx.iter().sum::<f32>(), 10.0);
    // Average with `same` padding (3×3 window, stride 2 on 5×5×2): FD on the input.
    let mut a = Pool2d::new(0, PoolKind::Avg, Shape::new(5, 5, 2), [3, 3], [2, 2], Padding::Same).unwrap();
    let mut x = rand(&mut rng, 2 * 50);
    let n_out = 2 * a.geo.output.len();
    let r = rand(&mut rng, n_out);
    let mut y = vec![0.0; n_out];
    a.forward(&x, &mut y, 2);
    let mut dx = vec![0.0; x.len()];
    a.backward(&r, &mut dx, 2);
    for i in 0..x.len() {
        let x0 = x[i];
        x[i] = x0 + 1e-2;
        a.forward(&x, &mut y, 2);
        let lp = loss(&y, &r);
        x[i] = x0 - 1e-2;
        a.forward(&x, &mut y, 2);
        let lm = loss(&y, &r);
        x[i] = x0;
        assert!(((lp - lm) / 2e-2 - dx[i] as f64).abs() < 1e-3, "avg dx[{i}]");
    }
}

/// The 2×2/stride-2 path's backward (one write per input) against its definition: each input
/// gets the gradient of the window it is the first maximum of, else 0; odd sizes leave a last
/// row and column in no window.
#[test]
fn max_pool_2x2_backward_is_the_scatter_to_the_first_maximum() {
    let mut rng = Rng::new(11, 0);
    for (h, w, c, batch) in [(4, 4, 1, 1), (5, 7, 3, 2), (28, 28, 32, 2), (6, 9, 17, 3)] {
        let mut p = Pool2d::new(0, PoolKind::Max, Shape::new(h, w, c), [2, 2], [2, 2], Padding::Valid).unwrap();
        let o = p.geo.output;
        // Repeated values, so that ties (the first maximum wins, as PyTorch) are exercised.
        let x: Vec<f32> = (0..batch * h * w * c)
            .map(|_| (rng.uniform_range(0.0, 4.0) as i32) as f32)
            .collect();
        let dy = rand(&mut rng, batch * o.len());
        let mut y = vec![0.0; batch * o.len()];
        p.forward(&x, &mut y, batch);
        let mut dx = vec![f32::NAN; x.len()];
        p.backward(&dy, &mut dx, batch);
        let mut want = vec![0.0f32; x.len()];
        for b in 0..batch {
            for oy in 0..o.h {
                for ox in 0..o.w {
                    for ch in 0..c {
                        let at = |iy: usize, ix: usize| b * h * w * c + (iy * w + ix) * c + ch;
                        let taps = [(0, 0), (0, 1), (1, 0), (1, 1)].map(|(dy, dx)| at(2 * oy + dy, 2 * ox + dx));
                        let best = taps.into_iter().fold(taps[0], |m, t| if x[t] > x[m] { t } else { m });
                        let out = b * o.len() + (oy * o.w + ox) * c + ch;
                        assert_eq!(y[out], x[best]);
                        want[best] += dy[out];
                    }
                }
            }
        }
        assert_eq!(dx, want, "{h}×{w}×{c}, batch {batch}");
    }
}

/// A batch norm followed by a ReLU, computed in one pass by the batch norm (`BatchNorm::relu`, as
/// the model runs them), gives the bits of the two layers run one after the other: output,
/// parameter gradients and input gradient, with batch and with running statistics.
#[test]
fn fused_batch_norm_relu_is_batch_norm_then_relu_bit_for_bit() {
    let mut rng = Rng::new(5, 0);
    for (rows, c) in [(50, 37), (8, 64), (3, 1)] {
        let n = rows * c;
        for training in [true, false] {
            let mut plain = BatchNorm::new(0, c, 1e-3, BnMomentum::Torch { momentum: 0.1 });
            plain.gamma.value = rand(&mut rng, c);
            plain.beta.value = rand(&mut rng, c);
            plain.running_mean.value = rand(&mut rng, c);
            plain.running_var.value = rand(&mut rng, c).iter().map(|v| v.abs() + 0.5).collect();
            let mut fused = plain.clone();
            fused.relu = true;
            let x = rand(&mut rng, n);
            let mut dy = rand(&mut rng, n);
            dy[n / 2] = f32::NAN; // masked or not, as the ReLU layer would
            let (mut y, mut z, mut yf) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
            let mut relu = Layer::Activation(Activation::Relu);
            let mut r = Rng::new(0, 0);
            plain.forward(&x, &mut z, n, training);
            relu.forward(&z, &mut y, rows, training, false, &mut r);
            fused.forward(&x, &mut yf, n, training);
            assert_eq!(bits(&y), bits(&yf), "forward, {rows}×{c}, training {training}");
            if n >= 64 {
                assert!(yf.contains(&0.0) && yf.iter().any(|&v| v > 0.0));
            }
            // Two layers: ReLU's backward, then the batch norm's in place (as the model runs it).
            let mut g = vec![0.0; n];
            relu.backward(&z, &dy, Some(&mut g), rows);
            plain.backward_in_place(&x, &mut g, n);
            let mut gf = dy.clone();
            fused.backward_in_place(&x, &mut gf, n);
            assert_eq!(bits(&g), bits(&gf), "input gradient, {rows}×{c}, training {training}");
            assert_eq!(bits(&plain.gamma.grad), bits(&fused.gamma.grad));
            assert_eq!(bits(&plain.beta.grad), bits(&fused.beta.grad));
            // The out-of-place form gives the same.
            let mut dx = vec![0.0; n];
            fused.backward(&x, &dy, Some(&mut dx), n);
            assert_eq!(bits(&g), bits(&dx));
        }
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn batch_norm_backward_matches_finite_differences() {
    let mut rng = Rng::new(4, 0);
    let (rows, c) = (6, 3);
    let mut bn = BatchNorm::new(0, c, 1e-3, BnMomentum::Keras { momentum: 0.99 });
    bn.gamma.value = vec![1.5, -0.5, 0.8];
    bn.beta.value = vec![0.1, 0.2, -0.3];
    let mut x = rand(&mut rng, rows * c);
    let r = rand(&mut rng, rows * c);
    let mut y = vec![0.0; rows * c];
    let n = rows * c;
    bn.forward(&x, &mut y, n, true);
    let mut dx = vec![0.0; n];
    bn.backward(&x, &r, Some(&mut dx), n);
    let (gg, gb) = (bn.gamma.grad.clone(), bn.beta.grad.clone());
    let eval = |bn: &mut BatchNorm, x: &[f32]| {
        let mut y = vec![0.0; n];
        bn.forward(x, &mut y, n, true);
        loss(&y, &r)
    };
    for i in 0..n {
        let x0 = x[i];
        x[i] = x0 + 1e-2;
        let lp = eval(&mut bn, &x);
        x[i] = x0 - 1e-2;
        let lm = eval(&mut bn, &x);
        x[i] = x0;
        let got = (lp - lm) / 2e-2;
        assert!((got - dx[i] as f64).abs() < 5e-3, "dx[{i}]: fd {got} vs {}", dx[i]);
    }
    for ch in 0..c {
        let g0 = bn.gamma.value[ch];
        bn.gamma.value[ch] = g0 + 1e-2;
        let lp = eval(&mut bn, &x);
        bn.gamma.value[ch] = g0 - 1e-2;
        let lm = eval(&mut bn, &x);
        bn.gamma.value[ch] = g0;
        assert!(((lp - lm) / 2e-2 - gg[ch] as f64).abs() < 2e-3, "dγ[{ch}]");
        let b0 = bn.beta.value[ch];
        bn.beta.value[ch] = b0 + 1e-2;
        let lp = eval(&mut bn, &x);
        bn.beta.value[ch] = b0 - 1e-2;
        let lm = eval(&mut bn, &x);
        bn.beta.value[ch] = b0;
        assert!(((lp - lm) / 2e-2 - gb[ch] as f64).abs() < 2e-3, "dβ[{ch}]");
    }
}

/// One channel, batch {1, 2, 3, 6}: mean 3, biased variance 3.5, unbiased 14/3.
/// Keras (momentum 0.9 = weight of the old value): mean 0·0.9 + 3·0.1 = 0.3,
/// var 1·0.9 + 3.5·0.1 = 1.25. PyTorch (momentum 0.1 = weight of the new batch): mean 0.3,
/// var 0.9·1 + 0.1·14/3 = 1.366667.
#[test]
fn running_statistics_follow_each_framework_definition() {
    let x = [1.0f32, 2.0, 3.0, 6.0];
    let mut y = [0.0f32; 4];
    let mut keras = BatchNorm::new(0, 1, 1e-3, BnMomentum::Keras { momentum: 0.9 });
    keras.forward(&x, &mut y, 4, true);
    let (s1, s2, n) = keras.batch_sums.clone();
    keras.update_running(&s1, &s2, n);
    assert!((keras.running_mean.value[0] - 0.3).abs() < 1e-6);
    assert!((keras.running_var.value[0] - 1.25).abs() < 1e-6);
    let mut torch = BatchNorm::new(0, 1, 1e-5, BnMomentum::Torch { momentum: 0.1 });
    torch.forward(&x, &mut y, 4, true);
    let (s1, s2, n) = torch.batch_sums.clone();
    torch.update_running(&s1, &s2, n);
    assert!((torch.running_mean.value[0] - 0.3).abs() < 1e-6);
    assert!((torch.running_var.value[0] - (0.9 + 0.1 * 14.0 / 3.0)).abs() < 1e-6);
    // Evaluation uses the running statistics: y = γ(x − μ_run)/√(σ²_run + ε) + β.
    torch.forward(&x, &mut y, 4, false);
    let want = (1.0 - 0.3) / (torch.running_var.value[0] + 1e-5).sqrt();
    assert!((y[0] - want).abs() < 1e-5);
}

/// Shapes that do not fit are refused at build time, naming the layer and both shapes.
#[test]
fn shape_errors_name_the_layer_and_shapes() {
    let cfg: qmomentum::config::ModelConfig = toml::from_str(
        r#"
        input = 16
        input_shape = [4, 4, 1]
        layers = [
          { type = "conv2d", filters = 2, kernel_size = 5 },
          { type = "flatten" },
          { type = "dense", units = 10, activation = "softmax" },
        ]
        "#,
    )
    .unwrap();
    let e = cfg.validate().unwrap_err().to_string();
    assert!(
        e.contains("layer 0") && e.contains("5×5 window") && e.contains("4×4"),
        "{e}"
    );
    let cfg: qmomentum::config::ModelConfig = toml::from_str(
        r#"
        input = 16
        input_shape = [4, 4, 1]
        layers = [
          { type = "conv2d", filters = 3, kernel_size = 3, groups = 2 },
          { type = "dense", units = 10, activation = "softmax" },
        ]
        "#,
    )
    .unwrap();
    let e = cfg.validate().unwrap_err().to_string();
    assert!(
        e.contains("model.layers[0].groups") && e.contains("input channels (1)"),
        "{e}"
    );
    let cfg: qmomentum::config::ModelConfig = toml::from_str(
        r#"
        input = 784
        layers = [{ type = "conv2d", filters = 3, kernel_size = 3 }, { type = "dense", units = 10 }]
        "#,
    )
    .unwrap();
    let e = cfg.validate().unwrap_err().to_string();
    assert!(e.contains("model.input_shape"), "{e}");
    let _ = Layer::Flatten;
}

/// Folding batch norm into the convolution before it leaves the evaluation outputs unchanged
/// (`BN(conv(x)) = conv_f(x)` with the running statistics), the relu moving into the conv.
#[test]
fn folding_batch_norm_keeps_the_outputs() {
    use qmomentum::model::Sequential;
    use qmomentum::quant::Scheme;
    let cfg: qmomentum::config::ModelConfig = toml::from_str(
        r#"
        input = 72
        input_shape = [6, 6, 2]
        layers = [
          { type = "conv2d", filters = 4, kernel_size = 3, padding = "same" },
          { type = "batch_norm", torch_momentum = 0.1, epsilon = 1e-5 },
          { type = "activation", activation = "relu" },
          { type = "max_pool2d" },
          { type = "flatten" },
          { type = "dense", units = 5 },
          { type = "batch_norm" },
          { type = "dense", units = 3, activation = "softmax" },
        ]
        "#,
    )
    .unwrap();
    let mut m = Sequential::from_config(&cfg, Scheme::Fp32, false, 7).unwrap();
    let mut rng = Rng::new(9, 0);
    // Non-trivial statistics and affine parameters.
    for l in m.layers.iter_mut() {
        if let Layer::BatchNorm(b) = l {
            for v in b.running_mean.value.iter_mut() {
                *v = rng.uniform_range(-0.5, 0.5);
            }
            for v in b.running_var.value.iter_mut() {
                *v = rng.uniform_range(0.2, 2.0);
            }
            for v in b.gamma.value.iter_mut() {
                *v = rng.uniform_range(0.5, 1.5);
            }
            for v in b.beta.value.iter_mut() {
                *v = rng.uniform_range(-0.3, 0.3);
            }
        }
    }
    let x = (0..3 * 72).map(|_| rng.uniform_range(0.0, 1.0)).collect::<Vec<f32>>();
    let want = m.predict(&x, 3);
    let (fcfg, mut f) = m.fold_batch_norm(&cfg).unwrap();
    assert_eq!(fcfg.layers.len(), 5, "conv+bn+relu → conv(relu); dense+bn → dense");
    assert!(!f.layers.iter().any(|l| matches!(l, Layer::BatchNorm(_))));
    let got = f.predict(&x, 3);
    for (a, b) in got.iter().zip(&want) {
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
    }
}

/// The model shares one gradient buffer across layers whose backward runs in place (batch norm,
/// activations, dropout, flatten). Reference: the same forward pass, then every layer's
/// out-of-place `Layer::backward` with a buffer per activation (what the model did before the
/// sharing): the parameter gradients must be bit-identical.
#[test]
fn shared_gradient_buffers_give_the_out_of_place_gradients() {
    use qmomentum::config::ModelConfig;
    use qmomentum::model::Sequential;
    use qmomentum::quant::Scheme;
    let cfg: ModelConfig = toml::from_str(
        r#"
        input = 72
        input_shape = [6, 6, 2]
        [[layers]]
        type = "conv2d"
        filters = 3
        kernel_size = 3
        padding = "same"
        [[layers]]
        type = "batch_norm"
        [[layers]]
        type = "activation"
        activation = "relu"
        [[layers]]
        type = "activation"
        activation = "tanh"
        [[layers]]
        type = "dropout"
        rate = 0.3
        [[layers]]
        type = "flatten"
        [[layers]]
        type = "dense"
        units = 4
        activation = "softmax"
        "#,
    )
    .unwrap();
    let mut a = Sequential::from_config(&cfg, Scheme::Fp32, false, 7).unwrap();
    let b = a.clone();
    let batch = 5;
    let mut rng = Rng::new(9, 0);
    let x = rand(&mut rng, batch * 72);
    let labels: Vec<u32> = (0..batch as u32).map(|i| i % 4).collect();
    a.input_mut(batch).copy_from_slice(&x);
    a.forward_backward(&labels, batch, &mut Rng::new(3, 1));
    // Reference: the same dropout stream, every layer on its own with its own buffers.
    let (_, _, layers) = layers_one_by_one(&b, b.layers.clone(), &x, &labels, &mut Rng::new(3, 1));
    for (p, q) in a.params_iter().zip(layers.iter().flat_map(|l| l.params())) {
        assert_eq!(p.grad, q.grad, "{}", p.name);
        assert!(p.grad.iter().any(|&g| g != 0.0), "{} has a gradient", p.name);
    }
}

/// The model's fused passes (batch norm + ReLU in one pass each way, the 2×2 max pooling done by
/// the batch norm before it; in QAT, the pooling's backward done by the convolution's output
/// stage; flatten sharing its input's buffer) give the bits of the layers run one by one,
/// unfused, each into its own buffers: outputs, loss and every parameter gradient, on a second
/// step (the QAT grids observed by the first). Odd sizes leave a row and column outside the
/// pooling windows.
#[test]
fn fused_passes_give_the_bits_of_the_layers_one_by_one() {
    use qmomentum::config::ModelConfig;
    use qmomentum::model::Sequential;
    use qmomentum::quant::Scheme;
    let cfg: ModelConfig = toml::from_str(
        r#"
        input = 147
        input_shape = [7, 7, 3]
        [[layers]]
        type = "conv2d"
        filters = 8
        kernel_size = 3
        padding = "same"
        [[layers]]
        type = "batch_norm"
        [[layers]]
        type = "activation"
        activation = "relu"
        [[layers]]
        type = "max_pool2d"
        pool_size = 2
        [[layers]]
        type = "conv2d"
        filters = 5
        kernel_size = 2
        [[layers]]
        type = "batch_norm"
        momentum = 0.9
        [[layers]]
        type = "activation"
        activation = "relu"
        [[layers]]
        type = "flatten"
        [[layers]]
        type = "dense"
        units = 4
        activation = "softmax"
        "#,
    )
    .unwrap();
    for scheme in [Scheme::Fp32, Scheme::W8a8, Scheme::W4a4] {
        let mut fused = Sequential::from_config(&cfg, scheme, false, 7).unwrap();
        // Biases and batch-norm shifts away from their initial 0, so that every pass that adds
        // them (in whichever layer a fusion moves it to) shows in the bits.
        for p in fused.params_iter_mut() {
            if p.name.ends_with(".bias") || p.name.ends_with(".beta") {
                for (j, v) in p.value.iter_mut().enumerate() {
                    *v = 0.1 * (j as f32 % 3.0) - 0.07;
                }
            }
        }
        let batch = 6;
        let mut rng = Rng::new(12, 0);
        let labels: Vec<u32> = (0..batch as u32).map(|i| i % 4).collect();
        let first = rand(&mut rng, batch * 147);
        fused.input_mut(batch).copy_from_slice(&first);
        fused.forward_backward(&labels, batch, &mut Rng::new(3, 1));
        fused.finish_step(&[]);
        let layers = fused.layers.clone();
        let x = rand(&mut rng, batch * 147);
        fused.input_mut(batch).copy_from_slice(&x);
        let (loss_sum, _) = fused.forward_backward(&labels, batch, &mut Rng::new(3, 1));
        // Reference: every layer on its own, out of place, nothing fused.
        let (loss, _, mut layers) = layers_one_by_one(&fused, layers, &x, &labels, &mut Rng::new(3, 1));
        assert_eq!(loss.to_bits(), loss_sum.to_bits(), "{scheme:?}");
        let one_by_one: Vec<_> = layers.iter().flat_map(|l| l.params()).collect();
        let model: Vec<_> = fused.params_iter().collect();
        assert_eq!(one_by_one.len(), model.len());
        for (p, q) in model.iter().zip(&one_by_one) {
            assert!(p.grad.iter().any(|&g| g != 0.0), "{} has a gradient", p.name);
            assert_eq!(bits(&p.grad), bits(&q.grad), "{scheme:?}: {}", p.name);
        }
        // What the step leaves for `finish_step`: the output ranges the observers take (of every
        // value, those outside the pooling windows too) and the batch norms' sums.
        for (l, r) in fused.layers.iter().zip(&layers) {
            if let (Layer::Conv2d(a), Layer::Conv2d(b)) = (l, r) {
                let (sa, sb) = (&a.out.act.stats, &b.out.act.stats);
                let key = |s: &qmomentum::quant::act::BatchStats| {
                    (s.lo.to_bits(), s.hi.to_bits(), s.sum_abs.to_bits(), s.count)
                };
                assert_eq!(key(sa), key(sb), "{scheme:?}: output range of layer {}", a.index);
                let sums = |c: &Conv2d| c.bn.as_ref().map(|f| f.bn.batch_sums.clone());
                assert_eq!(sums(a), sums(b), "{scheme:?}: batch-norm sums of layer {}", a.index);
            }
        }
        // Evaluation (running statistics, deployed QAT layers) through the same fused passes.
        fused.input_mut(batch).copy_from_slice(&x);
        let out = fused.forward(batch, false, true, &mut Rng::new(3, 1)).to_vec();
        let y = forward_one_by_one(&fused, &mut layers, &x, false, &mut Rng::new(3, 1));
        assert_eq!(bits(&out), bits(&y), "{scheme:?}: evaluation");
    }
}

/// The outputs of every layer of `layers` (the layers of `model`, unfused: `set_fused_next(false)`)
/// run one by one into buffers of their own on `x`, the input first; `rng` goes through the layers
/// in order, as the model passes it.
fn outputs_one_by_one(
    model: &qmomentum::model::Sequential,
    layers: &mut [Layer],
    x: &[f32],
    training: bool,
    rng: &mut Rng,
) -> Vec<Vec<f32>> {
    let sizes: Vec<usize> = model.shapes().map(|s| s.len()).collect();
    let batch = x.len() / sizes[0];
    let mut outs = vec![x.to_vec()];
    for (i, l) in layers.iter_mut().enumerate() {
        l.set_fused_next(false);
        // The grid of the layer's input (where a quantized layer puts its bias) as the model's
        // last pass set it from the layer before (`Sequential::forward`).
        match (&mut *l, &model.layers[i]) {
            (Layer::Dense(d), Layer::Dense(m)) => d.input_scale = m.input_scale,
            (Layer::Conv2d(c), Layer::Conv2d(m)) => c.input_scale = m.input_scale,
            _ => {}
        }
        let mut y = vec![0.0; batch * sizes[i + 1]];
        l.forward(outs.last().unwrap(), &mut y, batch, training, true, rng);
        outs.push(y);
    }
    outs
}

/// [`outputs_one_by_one`]'s last output (evaluation, logits).
fn forward_one_by_one(
    model: &qmomentum::model::Sequential,
    layers: &mut [Layer],
    x: &[f32],
    training: bool,
    rng: &mut Rng,
) -> Vec<f32> {
    outputs_one_by_one(model, layers, x, training, rng).pop().unwrap()
}

/// Reference for the model's fused passes and shared buffers: a training step of `layers` run one
/// by one ([`outputs_one_by_one`]), the softmax cross-entropy of the last output, then every
/// layer's out-of-place `Layer::backward` with a buffer per activation. Returns the summed loss,
/// the logits and the layers holding their gradients.
fn layers_one_by_one(
    model: &qmomentum::model::Sequential,
    mut layers: Vec<Layer>,
    x: &[f32],
    labels: &[u32],
    rng: &mut Rng,
) -> (f64, Vec<f32>, Vec<Layer>) {
    let outs = outputs_one_by_one(model, &mut layers, x, true, rng);
    let (batch, classes) = (labels.len(), model.classes());
    let last = outs.last().unwrap();
    let mut probs = vec![0.0; batch * classes];
    let loss = qmomentum::loss::softmax_crossentropy_forward(last, labels, classes, &mut probs);
    let mut dy = vec![0.0; batch * classes];
    qmomentum::loss::softmax_crossentropy_backward(&probs, labels, classes, &mut dy);
    for (i, l) in layers.iter_mut().enumerate().rev() {
        let mut dx = vec![0.0; outs[i].len()];
        l.backward(&outs[i], &dy, (i > 0).then_some(&mut dx[..]), batch);
        dy = dx;
    }
    (loss as f64 * batch as f64, last.clone(), layers)
}
