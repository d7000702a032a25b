//! Convolution and pooling: the im2col + GEMM path of every kernel tier against the direct-loop
//! reference on odd shapes, hand-computed examples (including the zero-point padding), and the
//! cnn-small network end to end.

mod common;

use common::{cnn_small_model, identity_1x1, image_input, tiers, Rng};
use proptest::prelude::*;
use qmomentum_runtime::kernels::{scalar, ConvGeometry, Window};
use qmomentum_runtime::requant::requantize_u8;
use qmomentum_runtime::{InputSpec, KernelKind, Layer, Model, Output};

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// A 1×1 convolution with identity weights and `logits` at scale 1: its logits are exactly the
/// u8 values it reads, so a model ending in it exposes the previous layer's output.
fn identity_head(shape: [usize; 3]) -> Layer {
    let scale = vec![1.0; shape[2]];
    identity_1x1(shape, 0, Output::Logits { scale, bias: None })
}

fn input(shape: [usize; 3]) -> InputSpec {
    InputSpec {
        size: shape.iter().product(),
        scale: 1.0,
        zero_point: 0,
        binarize_at: None,
        shape: Some(shape),
    }
}

/// Runs `model` on `x` (`rows` samples) with every tier and checks they all give `want`.
fn assert_all_tiers(model: &Model, x: &[u8], rows: usize, want: &[f32], what: &str) -> Result<(), TestCaseError> {
    for kind in tiers() {
        let mut ws = model.workspace(rows);
        let got = model.run_with(kind, &mut ws, x, rows).unwrap();
        prop_assert_eq!(bits(got), bits(want), "{}: {:?}", what, kind);
    }
    Ok(())
}

#[derive(Debug, Clone)]
struct ConvCase {
    g: ConvGeometry,
    rows: usize,
    x: Vec<u8>,
    weight: Vec<i8>,
    bias: Vec<i32>,
    z_in: u8,
    /// (m, r) per channel.
    requant: Vec<(i32, i32)>,
    z_out: u8,
    qmax: u8,
    relu: bool,
}

/// Odd geometries: h, w in 1..12, c and out in 1..20, kernel 1..5, stride 1..3, dilation
/// 1..2, asymmetric padding below the kernel extent, groups 1, c (depthwise) or a divisor.
fn geometry() -> impl Strategy<Value = ConvGeometry> {
    let channels = prop_oneof![
        // groups = 1
        (1usize..20, 1usize..20).prop_map(|(c, out)| (c, out, 1)),
        // depthwise, channel multiplier 1 or 2
        (1usize..20, 1usize..3).prop_map(|(c, m)| (c, c * m, c)),
        // a divisor: groups of cg inputs and og outputs
        (2usize..5, 1usize..6, 1usize..6).prop_map(|(g, cg, og)| (g * cg, g * og, g)),
    ];
    (
        (1usize..12, 1usize..12),
        channels,
        (1usize..6, 1usize..6),
        (1usize..4, 1usize..4),
        (1usize..3, 1usize..3),
        any::<[u16; 4]>(),
    )
        .prop_map(|((h, w), (c, out, groups), (kh, kw), (sh, sw), (dh, dw), pad)| {
            let (eh, ew) = (dh * (kh - 1) + 1, dw * (kw - 1) + 1);
            let padding = [
                pad[0] as usize % eh,
                pad[1] as usize % ew,
                pad[2] as usize % eh,
                pad[3] as usize % ew,
            ];
            // Grow the image until the kernel fits the padded input.
            let h = h.max(eh.saturating_sub(padding[0] + padding[2]));
            let w = w.max(ew.saturating_sub(padding[1] + padding[3]));
            ConvGeometry {
                window: Window {
                    in_shape: [h, w, c],
                    kernel: [kh, kw],
                    stride: [sh, sw],
                    padding,
                    dilation: [dh, dw],
                },
                out_channels: out,
                groups,
            }
        })
}

fn conv_case() -> impl Strategy<Value = ConvCase> {
    (geometry(), 1usize..4)
        .prop_flat_map(|(g, rows)| {
            let [h, w, c] = g.window.in_shape;
            let out = g.out_channels;
            (
                Just((g, rows)),
                prop::collection::vec(any::<u8>(), rows * h * w * c),
                prop::collection::vec(any::<i8>(), out * g.patch()),
                prop::collection::vec(prop_oneof![-100_000i32..100_000, any::<i32>()], out),
                any::<u8>(),
                prop::collection::vec((1e-5f64..1e-2, prop::bool::weighted(0.05)), out),
                (any::<u8>(), any::<bool>(), any::<bool>()),
            )
        })
        .prop_map(
            |((g, rows), x, weight, bias, z_in, reals, (z_out, narrow, relu))| ConvCase {
                g,
                rows,
                x,
                weight,
                bias,
                z_in,
                requant: reals
                    .into_iter()
                    .map(|(real, zero)| {
                        if zero {
                            (0, 0)
                        } else {
                            qmomentum_runtime::quantize_multiplier(real).unwrap()
                        }
                    })
                    .collect(),
                // A 4-bit grid sometimes (qmax 15, zero point below it).
                z_out: if narrow { z_out % 16 } else { z_out },
                qmax: if narrow { 15 } else { 255 },
                relu,
            },
        )
}

fn conv_layer(c: &ConvCase, output: Output) -> Layer {
    let w = c.g.window;
    Layer::Conv2dI8 {
        in_shape: w.in_shape,
        out_channels: c.g.out_channels,
        kernel: w.kernel,
        stride: w.stride,
        padding: w.padding,
        dilation: w.dilation,
        groups: c.g.groups,
        weight: c.weight.clone(),
        bias: c.bias.clone(),
        input_zero_point: c.z_in,
        output,
    }
}

fn out_shape(g: &ConvGeometry) -> [usize; 3] {
    let [oh, ow] = g.window.out_hw().unwrap();
    [oh, ow, g.out_channels]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    /// The accumulators: a convolution with `logits` at scale 1 outputs `acc as f32`.
    #[test]
    fn conv_accumulators_match_reference(c in conv_case()) {
        let out = c.g.out_channels;
        let mut acc = vec![0i32; c.rows * out_shape(&c.g).iter().product::<usize>()];
        scalar::conv2d_i8_reference(&c.g, &c.x, c.rows, &c.weight, &c.bias, c.z_in, &mut acc);
        let want: Vec<f32> = acc.iter().map(|&a| a as f32 * 1.0).collect();
        let layer = conv_layer(&c, Output::Logits { scale: vec![1.0; out], bias: None });
        let model = Model::new(input(c.g.window.in_shape), vec![layer]).unwrap();
        assert_all_tiers(&model, &c.x, c.rows, &want, "accumulators")?;
    }

    /// The requantized u8 output (random multipliers, zero points, qmax, ReLU), read back
    /// through an identity 1×1 convolution.
    #[test]
    fn conv_u8_outputs_match_reference(c in conv_case()) {
        let out = c.g.out_channels;
        let shape = out_shape(&c.g);
        let mut acc = vec![0i32; c.rows * shape.iter().product::<usize>()];
        scalar::conv2d_i8_reference(&c.g, &c.x, c.rows, &c.weight, &c.bias, c.z_in, &mut acc);
        let lo = if c.relu { c.z_out } else { 0 };
        let want: Vec<f32> = acc
            .iter()
            .enumerate()
            .map(|(i, &a)| {
                let (m, r) = c.requant[i % out];
                f32::from(requantize_u8(a, m, r, c.z_out, lo, c.qmax))
            })
            .collect();
        let output = Output::U8 {
            relu: c.relu,
            multiplier: c.requant.iter().map(|p| p.0).collect(),
            shift: c.requant.iter().map(|p| p.1).collect(),
            zero_point: c.z_out,
            qmax: c.qmax,
        };
        let model = Model::new(input(c.g.window.in_shape), vec![conv_layer(&c, output), identity_head(shape)]).unwrap();
        assert_all_tiers(&model, &c.x, c.rows, &want, "u8 outputs")?;
    }
}

/// Runs a one-layer convolution with `logits` at scale 1 and returns the accumulators.
fn conv_acc(layer: Layer, x: &[u8]) -> Vec<Vec<i32>> {
    let Layer::Conv2dI8 { in_shape, .. } = &layer else {
        unreachable!()
    };
    let model = Model::new(input(*in_shape), vec![layer]).unwrap();
    tiers()
        .into_iter()
        .map(|kind| {
            let mut ws = model.workspace(1);
            let logits = model.run_with(kind, &mut ws, x, 1).unwrap();
            logits.iter().map(|&v| v as i32).collect()
        })
        .collect()
}

#[allow(clippy::too_many_arguments)]
fn conv(
    in_shape: [usize; 3],
    out_channels: usize,
    kernel: [usize; 2],
    stride: [usize; 2],
    padding: [usize; 4],
    dilation: [usize; 2],
    groups: usize,
    weight: Vec<i8>,
    bias: Vec<i32>,
    input_zero_point: u8,
) -> Layer {
    Layer::Conv2dI8 {
        in_shape,
        out_channels,
        kernel,
        stride,
        padding,
        dilation,
        groups,
        weight,
        bias,
        input_zero_point,
        output: Output::Logits {
            scale: vec![1.0; out_channels],
            bias: None,
        },
    }
}

#[test]
fn padding_reads_the_input_zero_point() {
    // 3×3 image 1..9, z_in = 10, a 3×3 kernel of ones, "same" padding: each output sums
    // (x − 10) over the taps inside the image only. Padding with 0 instead of z_in would add
    // −10 per padded tap (the corner would be −78, not −28).
    let x: Vec<u8> = (1..=9).collect();
    let layer = conv(
        [3, 3, 1],
        1,
        [3, 3],
        [1, 1],
        [1, 1, 1, 1],
        [1, 1],
        1,
        vec![1; 9],
        vec![0],
        10,
    );
    let want = vec![-28, -39, -24, -33, -45, -27, -16, -21, -12];
    for got in conv_acc(layer, &x) {
        assert_eq!(got, want);
    }
}

#[test]
fn orientation_stride_and_asymmetric_padding() {
    // Input 2×3: [[1, 2, 3], [4, 5, 6]]; kernel 2×2, stride [1, 2], padding top 0, left 1,
    // bottom 1, right 0 (padded 3×4 → output 2×2); z_in = 0.
    // Channel 0: W = [[1, 2], [3, 4]], bias 100. Channel 1: W = [[-1, 0], [0, 0]], bias -5.
    //   (0,0): taps (0,-1) pad, (0,0)=1, (1,-1) pad, (1,0)=4 → 2·1 + 4·4 = 18; ch1: pad → 0
    //   (0,1): taps (0,1)=2, (0,2)=3, (1,1)=5, (1,2)=6 → 2 + 6 + 15 + 24 = 47; ch1: −2
    //   (1,0): taps (1,-1) pad, (1,0)=4, row 2 pad → 2·4 = 8; ch1: pad → 0
    //   (1,1): taps (1,1)=5, (1,2)=6, row 2 pad → 5 + 12 = 17; ch1: −5
    let x = [1, 2, 3, 4, 5, 6];
    let layer = conv(
        [2, 3, 1],
        2,
        [2, 2],
        [1, 2],
        [0, 1, 1, 0],
        [1, 1],
        1,
        vec![1, 2, 3, 4, -1, 0, 0, 0],
        vec![100, -5],
        0,
    );
    let want = vec![118, -5, 147, -7, 108, -5, 117, -10];
    for got in conv_acc(layer, &x) {
        assert_eq!(got, want);
    }
}

#[test]
fn dilation_and_groups() {
    // 1×5 image [1, 2, 3, 4, 5], kernel [1, 2] with dilation [1, 3]: taps 3 apart, extent 4,
    // two outputs: x0 + x3 = 5 and x1 + x4 = 7.
    let layer = conv([1, 5, 1], 1, [1, 2], [1, 1], [0; 4], [1, 3], 1, vec![1, 1], vec![0], 0);
    for got in conv_acc(layer, &[1, 2, 3, 4, 5]) {
        assert_eq!(got, vec![5, 7]);
    }
    // 1×1×4 input [1, 2, 3, 4], 2 groups of 2 channels: output 0 reads channels 0, 1 with
    // W = [1, 10] (1 + 20 = 21), output 1 reads channels 2, 3 with W = [100, -1]
    // (300 − 4 = 296).
    let layer = conv(
        [1, 1, 4],
        2,
        [1, 1],
        [1, 1],
        [0; 4],
        [1, 1],
        2,
        vec![1, 10, 100, -1],
        vec![0, 0],
        0,
    );
    for got in conv_acc(layer, &[1, 2, 3, 4]) {
        assert_eq!(got, vec![21, 296]);
    }
    // Depthwise 3×3 "same" on a 2×2×2 image, z_in = 1: channel c sums (x − 1) over its own
    // channel's taps inside the image, every one of the 4 pixels for every output position.
    let x = [1, 10, 2, 20, 3, 30, 4, 40];
    let layer = conv(
        [2, 2, 2],
        2,
        [3, 3],
        [1, 1],
        [1, 1, 1, 1],
        [1, 1],
        2,
        vec![1; 18],
        vec![0, 0],
        1,
    );
    for got in conv_acc(layer, &x) {
        assert_eq!(got, vec![6, 96, 6, 96, 6, 96, 6, 96]);
    }
}

/// The logits of `[layer, identity head]` on one sample: the layer's u8 output.
fn pool_out(layer: Layer, in_shape: [usize; 3], x: &[u8]) -> Vec<Vec<u8>> {
    let shape = layer.output_shape().unwrap();
    let model = Model::new(input(in_shape), vec![layer, identity_head(shape)]).unwrap();
    tiers()
        .into_iter()
        .map(|kind| {
            let mut ws = model.workspace(1);
            let logits = model.run_with(kind, &mut ws, x, 1).unwrap();
            logits.iter().map(|&v| v as u8).collect()
        })
        .collect()
}

#[test]
fn pooling_hand_computed() {
    // 3×3×2, channel 0 = [[1, 5, 2], [7, 3, 9], [4, 8, 6]], channel 1 = [[9, 8, 7], [6, 5, 4],
    // [3, 2, 1]], interleaved (NHWC).
    let c0 = [1, 5, 2, 7, 3, 9, 4, 8, 6];
    let c1 = [9, 8, 7, 6, 5, 4, 3, 2, 1];
    let x: Vec<u8> = c0.iter().zip(&c1).flat_map(|(&a, &b)| [a, b]).collect();
    // 2×2 windows, stride 1: channel 0 maxima 7, 9, 8, 9; channel 1: 9, 8, 6, 5.
    let max = |kernel, stride, padding| Layer::MaxPoolU8 {
        in_shape: [3, 3, 2],
        kernel,
        stride,
        padding,
    };
    for got in pool_out(max([2, 2], [1, 1], [0; 4]), [3, 3, 2], &x) {
        assert_eq!(got, vec![7, 9, 9, 8, 8, 6, 9, 5]);
    }
    // Stride 2 with padding top 1, left 1: windows {(0,0)}, {(0,1), (0,2)}, {(1,0), (2,0)},
    // {(1,1), (1,2), (2,1), (2,2)}; the padded taps are ignored.
    for got in pool_out(max([2, 2], [2, 2], [1, 1, 0, 0]), [3, 3, 2], &x) {
        assert_eq!(got, vec![1, 9, 5, 8, 7, 6, 9, 5]);
    }
    // Average 2×2 stride 2 on [[1, 2, 3, 4], [3, 4, 7, 9]]: 10/4 = 2.5 rounds half up to 3,
    // 23/4 = 5.75 to 6.
    let avg = Layer::AvgPoolU8 {
        in_shape: [2, 4, 1],
        kernel: [2, 2],
        stride: [2, 2],
    };
    for got in pool_out(avg, [2, 4, 1], &[1, 2, 3, 4, 3, 4, 7, 9]) {
        assert_eq!(got, vec![3, 6]);
    }
    // 3×3 average of 1..9: 45/9 = 5; of 1..8 and 0: 36/9 = 4.
    let avg = Layer::AvgPoolU8 {
        in_shape: [3, 3, 1],
        kernel: [3, 3],
        stride: [1, 1],
    };
    for got in pool_out(avg.clone(), [3, 3, 1], &[1, 2, 3, 4, 5, 6, 7, 8, 9]) {
        assert_eq!(got, vec![5]);
    }
    for got in pool_out(avg, [3, 3, 1], &[1, 2, 3, 4, 5, 6, 7, 8, 0]) {
        assert_eq!(got, vec![4]);
    }
    // Global average of 2×2×2: channel 0 [1, 2, 3, 5] = 11/4 = 2.75 → 3; channel 1
    // [0, 0, 1, 1] = 2/4 = 0.5 → 1 (half up); a 255 channel stays 255.
    let global = Layer::GlobalAvgPoolU8 { in_shape: [2, 2, 3] };
    let x = [1, 0, 255, 2, 0, 255, 3, 1, 255, 5, 1, 255];
    for got in pool_out(global, [2, 2, 3], &x) {
        assert_eq!(got, vec![3, 1, 255]);
    }
}

/// Max pooling by its definition (taps inside the image only), for the whole-model reference.
fn maxpool_reference(x: &[u8], [h, w, c]: [usize; 3], k: usize) -> Vec<u8> {
    let (oh, ow) = (h / k, w / k);
    let mut y = vec![0u8; oh * ow * c];
    for oy in 0..oh {
        for ox in 0..ow {
            for ch in 0..c {
                let mut m = 0;
                for ky in 0..k {
                    for kx in 0..k {
                        m = m.max(x[((oy * k + ky) * w + ox * k + kx) * c + ch]);
                    }
                }
                y[(oy * ow + ox) * c + ch] = m;
            }
        }
    }
    y
}

/// The cnn-small logits of one sample from the reference functions alone.
fn cnn_small_reference(model: &Model, x: &[u8]) -> Vec<f32> {
    let mut act = x.to_vec();
    let mut shape = model.input().shape.unwrap();
    for layer in model.layers() {
        match layer {
            Layer::Conv2dI8 {
                in_shape,
                out_channels,
                kernel,
                stride,
                padding,
                dilation,
                groups,
                weight,
                bias,
                input_zero_point,
                output,
            } => {
                let g = ConvGeometry {
                    window: Window {
                        in_shape: *in_shape,
                        kernel: *kernel,
                        stride: *stride,
                        padding: *padding,
                        dilation: *dilation,
                    },
                    out_channels: *out_channels,
                    groups: *groups,
                };
                shape = out_shape(&g);
                let mut acc = vec![0; shape.iter().product()];
                scalar::conv2d_i8_reference(&g, &act, 1, weight, bias, *input_zero_point, &mut acc);
                let Output::U8 {
                    relu,
                    multiplier,
                    shift,
                    zero_point,
                    qmax,
                } = output
                else {
                    unreachable!()
                };
                let lo = if *relu { *zero_point } else { 0 };
                act = acc
                    .iter()
                    .enumerate()
                    .map(|(i, &a)| {
                        let o = i % out_channels;
                        requantize_u8(a, multiplier[o], shift[o], *zero_point, lo, *qmax)
                    })
                    .collect();
            }
            Layer::MaxPoolU8 { in_shape, kernel, .. } => {
                act = maxpool_reference(&act, *in_shape, kernel[0]);
                shape = layer.output_shape().unwrap();
            }
            Layer::DenseI8 {
                outputs,
                weight,
                bias,
                input_zero_point,
                output: Output::Logits { scale, .. },
                ..
            } => {
                let mut acc = vec![0; *outputs];
                scalar::dense_i8_reference(&act, act.len(), 1, weight, bias, *input_zero_point, &mut acc, *outputs);
                return acc.iter().zip(scale).map(|(&a, &s)| a as f32 * s).collect();
            }
            other => panic!("unexpected layer {other:?}"),
        }
    }
    let _ = shape;
    unreachable!("cnn-small ends in a dense layer")
}

#[test]
fn cnn_small_end_to_end() {
    let mut rng = Rng(31);
    let model = cnn_small_model(&mut rng);
    assert_eq!(model.num_classes(), 10);
    let dbg = format!("{model:?}");
    assert!(dbg.contains("conv2d_i8 784→25088 relu_u8"), "{dbg}");
    assert!(dbg.contains("maxpool_u8 25088→6272 input_grid"), "{dbg}");
    // 130 samples: blocks of several samples and a partial one.
    let batch = 130;
    let x = rng.bytes(batch * 784);
    let mut ws = model.workspace(batch);
    let want = model.run_with(KernelKind::Scalar, &mut ws, &x, batch).unwrap().to_vec();
    let distinct: std::collections::BTreeSet<u32> = want.iter().map(|v| v.to_bits()).collect();
    assert!(
        distinct.len() > batch * 5,
        "degenerate model: {} distinct logits",
        distinct.len()
    );
    // The engine agrees with the reference functions chained by hand.
    for b in [0, 1, 77, 129] {
        let r = cnn_small_reference(&model, &x[b * 784..(b + 1) * 784]);
        assert_eq!(bits(&r), bits(&want[b * 10..(b + 1) * 10]), "sample {b}");
    }
    for kind in KernelKind::available() {
        assert_eq!(
            bits(model.run_with(kind, &mut ws, &x, batch).unwrap()),
            bits(&want),
            "{kind:?}"
        );
        let mut ws1 = model.workspace(1);
        for b in [0, 64, 129] {
            let got = model.run_with(kind, &mut ws1, &x[b * 784..(b + 1) * 784], 1).unwrap();
            assert_eq!(bits(got), bits(&want[b * 10..(b + 1) * 10]), "{kind:?} sample {b}");
        }
    }
    let argmax: Vec<u32> = want.chunks(10).map(qmomentum_runtime::argmax).collect();
    for threads in [1, 2] {
        assert_eq!(
            bits(&model.logits(&x, batch, threads).unwrap()),
            bits(&want),
            "{threads} threads"
        );
        assert_eq!(model.predict(&x, batch, threads).unwrap(), argmax, "{threads} threads");
    }
    // Files round-trip exactly.
    let bytes = model.to_bytes().unwrap();
    let again = Model::from_bytes(&bytes).unwrap();
    assert_eq!(again.layers(), model.layers());
    assert_eq!(again.input(), model.input());
    assert_eq!(again.to_bytes().unwrap(), bytes);
    assert_eq!(bits(&again.logits(&x, batch, 2).unwrap()), bits(&want));
    let dir = std::env::temp_dir().join(format!("qmomentum-runtime-cnn-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("cnn.qmm");
    model.save(&path).unwrap();
    let loaded = Model::load(&path).unwrap();
    assert_eq!(loaded.layers(), model.layers());
    assert_eq!(
        model.predict(&x, batch, 1).unwrap(),
        loaded.predict(&x, batch, 2).unwrap()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn conv_output_as_logits_and_a_global_pool_head() {
    // conv → global average → 1×1 conv as a classifier over the pooled channels: every tier
    // and thread count agree, and the files round-trip.
    let mut rng = Rng(5);
    let o = common::random_u8_output(&mut rng, 12, 27, false);
    let layers = vec![
        common::random_conv(&mut rng, [9, 7, 3], 12, [3, 3], [2, 2], [1, 0, 1, 2], 3, o),
        Layer::GlobalAvgPoolU8 { in_shape: [5, 4, 12] },
        Layer::Conv2dI8 {
            in_shape: [1, 1, 12],
            out_channels: 5,
            kernel: [1, 1],
            stride: [1, 1],
            padding: [0; 4],
            dilation: [1, 1],
            groups: 1,
            weight: (0..60).map(|_| rng.range(-128, 127) as i8).collect(),
            bias: (0..5).map(|_| rng.range(-500, 500) as i32).collect(),
            input_zero_point: 7,
            output: Output::Logits {
                scale: vec![0.01, 0.02, 0.03, 0.04, 0.05],
                bias: None,
            },
        },
    ];
    let model = Model::new(image_input(&mut rng, [9, 7, 3]), layers).unwrap();
    assert_eq!(model.num_classes(), 5);
    let batch = 100;
    let x = rng.bytes(batch * 9 * 7 * 3);
    let mut ws = model.workspace(batch);
    let want = model.run_with(KernelKind::Scalar, &mut ws, &x, batch).unwrap().to_vec();
    for kind in KernelKind::available() {
        assert_eq!(
            bits(model.run_with(kind, &mut ws, &x, batch).unwrap()),
            bits(&want),
            "{kind:?}"
        );
    }
    assert_eq!(bits(&model.logits(&x, batch, 2).unwrap()), bits(&want));
    let again = Model::from_bytes(&model.to_bytes().unwrap()).unwrap();
    assert_eq!(again.layers(), model.layers());
}

#[test]
fn validation_names_the_field_and_both_values() {
    let mut rng = Rng(3);
    let o = |rng: &mut Rng| common::random_u8_output(rng, 4, 18, true);
    let conv = |rng: &mut Rng, in_shape, kernel, padding, groups| {
        let out = o(rng);
        common::random_conv(rng, in_shape, 4, kernel, [1, 1], padding, groups, out)
    };
    let head =
        |shape: [usize; 3]| common::random_layer(&mut Rng(1), common::Kind::I8, shape.iter().product(), 2, "logits");
    let err = |input: InputSpec, layers: Vec<Layer>| Model::new(input, layers).unwrap_err().to_string();

    let c = conv(&mut rng, [4, 4, 2], [5, 5], [0; 4], 1);
    let e = err(image_input(&mut rng, [4, 4, 2]), vec![c, head([1, 1, 4])]);
    assert!(
        e.contains("layers[0].kernel") && e.contains("[5, 5]") && e.contains("padded input [4, 4]"),
        "{e}"
    );
    let c = conv(&mut rng, [4, 4, 2], [3, 3], [3, 0, 0, 0], 1);
    let e = err(image_input(&mut rng, [4, 4, 2]), vec![c, head([4, 2, 4])]);
    assert!(
        e.contains("layers[0].padding") && e.contains("top 3 is not below the kernel extent 3"),
        "{e}"
    );
    let c = conv(&mut rng, [4, 4, 2], [3, 3], [1; 4], 1);
    let e = err(image_input(&mut rng, [4, 4, 3]), vec![c.clone(), head([4, 4, 4])]);
    assert!(
        e.contains("layers[0].in_shape") && e.contains("[4, 4, 2] does not match input.shape [4, 4, 3]"),
        "{e}"
    );
    // A dense layer whose `in` is not the product of the image before it.
    let e = err(image_input(&mut rng, [4, 4, 2]), vec![c.clone(), head([4, 4, 3])]);
    assert!(
        e.contains("layer 1: in = 48 does not match layer 0's relu_u8 output [4, 4, 4] size 64"),
        "{e}"
    );
    // No shape: a flat input, or a dense output.
    let mut flat = image_input(&mut rng, [4, 4, 2]);
    flat.shape = None;
    let e = err(flat, vec![c.clone(), head([4, 4, 4])]);
    assert!(
        e.contains("layers[0].in_shape") && e.contains("input.size has no shape"),
        "{e}"
    );
    let dense = common::random_layer(&mut rng, common::Kind::I8, 32, 32, "relu_u8");
    let e = err(image_input(&mut rng, [4, 4, 2]), vec![dense, c, head([4, 4, 4])]);
    assert!(
        e.contains("layers[1].in_shape") && e.contains("layer 0's relu_u8 output has no shape"),
        "{e}"
    );
    // Groups and channels.
    let mut g = conv(&mut rng, [4, 4, 2], [3, 3], [1; 4], 1);
    if let Layer::Conv2dI8 { groups, .. } = &mut g {
        *groups = 3;
    }
    let e = err(image_input(&mut rng, [4, 4, 2]), vec![g, head([4, 4, 4])]);
    assert!(
        e.contains("layers[0].groups") && e.contains("3 does not divide the input channels 2"),
        "{e}"
    );
    // Weight of the wrong size.
    let mut wrong = conv(&mut rng, [4, 4, 2], [3, 3], [1; 4], 1);
    if let Layer::Conv2dI8 { weight, .. } = &mut wrong {
        weight.pop();
    }
    let e = err(image_input(&mut rng, [4, 4, 2]), vec![wrong, head([4, 4, 4])]);
    assert!(
        e.contains("layers.0.weight") && e.contains("expected out × kh × kw × c/groups = 4 × 3 × 3 × 2"),
        "{e}"
    );
    // Sign bits of a grouped convolution are refused (a pixel's bits are one word run), and a
    // bit image is 64 bits per pixel to a reader (here 4 channels: 1024); a pooling layer
    // cannot be last.
    let mut sign = conv(&mut rng, [4, 4, 2], [3, 3], [1; 4], 2);
    if let Layer::Conv2dI8 { output, .. } = &mut sign {
        *output = Output::SignBits { threshold: None };
    }
    let e = err(image_input(&mut rng, [4, 4, 2]), vec![sign, head([4, 4, 4])]);
    assert!(
        e.contains("layers[0].output") && e.contains("sign_bits needs groups = 1 (got 2)"),
        "{e}"
    );
    let mut sign = conv(&mut rng, [4, 4, 2], [3, 3], [1; 4], 1);
    if let Layer::Conv2dI8 { output, .. } = &mut sign {
        *output = Output::SignBits { threshold: None };
    }
    let e = err(image_input(&mut rng, [4, 4, 2]), vec![sign, head([4, 4, 4])]);
    assert!(
        e.contains("in = 64 does not match layer 0's sign_bits output [4, 4, 4] size 1024"),
        "{e}"
    );
    let pool = Layer::MaxPoolU8 {
        in_shape: [4, 4, 2],
        kernel: [2, 2],
        stride: [2, 2],
        padding: [0; 4],
    };
    let e = err(image_input(&mut rng, [4, 4, 2]), vec![pool]);
    assert!(e.contains("the last layer must output logits, not input_grid"), "{e}");
    // Dimensions beyond 65536, and an input shape that is not input.size.
    let c = conv(&mut rng, [4, 4, 2], [3, 3], [1; 4], 1);
    let mut huge = image_input(&mut rng, [4, 4, 2]);
    huge.shape = Some([65537, 1, 1]);
    huge.size = 65537;
    let e = err(huge, vec![c.clone(), head([4, 4, 4])]);
    assert!(
        e.contains("input.shape") && e.contains("[65537, 1, 1]: every dimension must be in [1, 65536]"),
        "{e}"
    );
    let mut off = image_input(&mut rng, [4, 4, 2]);
    off.size = 31;
    let e = err(off, vec![c, head([4, 4, 4])]);
    assert!(
        e.contains("input.shape") && e.contains("[4, 4, 2] has 32 values, input.size is 31"),
        "{e}"
    );
}

#[test]
fn a_few_weights_cannot_ask_for_huge_activations() {
    // A 3×3 kernel dilated by 4096 with maximal padding turns a 2×2×1 image into 8194×8194
    // positions of 8 channels from 72 weights: rejected by the size limits, not allocated.
    let mut rng = Rng(9);
    let out = common::random_u8_output(&mut rng, 8, 9, true);
    let mut c = common::random_conv(&mut rng, [2, 2, 1], 8, [3, 3], [1, 1], [8192; 4], 1, out);
    if let Layer::Conv2dI8 { dilation, .. } = &mut c {
        *dilation = [4096, 4096];
    }
    let head = common::random_layer(&mut rng, common::Kind::I8, 10, 2, "logits");
    let e = Model::new(image_input(&mut rng, [2, 2, 1]), vec![c, head])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("layer 0:") && e.contains("activation values per sample") && e.contains("256 ×"),
        "{e}"
    );
}
