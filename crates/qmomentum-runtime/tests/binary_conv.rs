//! Binary convolutions and bit-image pooling (`conv2d_bin`, `maxpool_bin`, and `conv2d_i8`
//! with a `sign_bits` output) against a direct loop over ±1 values, on every kernel tier: odd
//! shapes, strides, dilations, asymmetric padding (which reads +1) and channel counts on both
//! sides of a 64-bit word. Plus a hand-computed border case.

mod common;

use common::{identity_1x1, tiers, Rng};
use proptest::prelude::*;
use qmomentum_runtime::{InputSpec, Layer, Model, Output};

fn words(c: usize) -> usize {
    c.div_ceil(64)
}

/// `x ≥ 128` → +1: a 1×1 `conv2d_i8` with identity weights, `z_in = 128` and `sign_bits`
/// output turns a u8 image into the bit image of those signs.
fn signs_of_u8(shape: [usize; 3]) -> Layer {
    identity_1x1(shape, 128, Output::SignBits { threshold: None })
}

/// A `dense_bin` head whose logits expose the bits of a bit image `[h, w, c]`: output 0 has
/// all-zero weights (`dot₀ = in − 2·popcount(x)`), output `1 + (p·c + ch)` has only the bit of
/// channel `ch` of pixel `p` (`dot = dot₀ − 2 + 4·x`), so that bit is `(dot − dot₀ + 2)/4`.
fn bit_head(shape: [usize; 3]) -> (Layer, usize) {
    let [h, w, c] = shape;
    let inputs = h * w * 64 * words(c);
    let iw = inputs / 64;
    let real = h * w * c;
    let mut weight = vec![0u64; (1 + real) * iw];
    for p in 0..h * w {
        for ch in 0..c {
            let k = p * 64 * words(c) + ch;
            weight[(1 + p * c + ch) * iw + k / 64] |= 1 << (k % 64);
        }
    }
    let layer = Layer::DenseBin {
        inputs,
        outputs: 1 + real,
        weight,
        output: Output::Logits {
            scale: vec![1.0; 1 + real],
            bias: Some(vec![0.0; 1 + real]),
        },
    };
    (layer, real)
}

fn decode(logits: &[f32]) -> Vec<i32> {
    logits[1..]
        .iter()
        .map(|&d| {
            let b = (d - logits[0] + 2.0) / 4.0;
            assert!(b == 0.0 || b == 1.0, "head logit {d} vs {}", logits[0]);
            if b == 1.0 {
                1
            } else {
                -1
            }
        })
        .collect()
}

#[derive(Debug, Clone)]
struct Case {
    in_shape: [usize; 3],
    out: usize,
    kernel: [usize; 2],
    stride: [usize; 2],
    dilation: [usize; 2],
    padding: [usize; 4],
    pool: bool,
    seed: u64,
}

fn case() -> impl Strategy<Value = Case> {
    (
        (1usize..7, 1usize..7),
        prop_oneof![1usize..5, 60usize..70, 120usize..135],
        prop_oneof![1usize..5, 62usize..67],
        (1usize..4, 1usize..4),
        (1usize..3, 1usize..3),
        (1usize..3, 1usize..3),
        any::<[u16; 4]>(),
        any::<bool>(),
        any::<u64>(),
    )
        .prop_map(|((h, w), c, out, (kh, kw), (sh, sw), (dh, dw), pad, pool, seed)| {
            let (eh, ew) = (dh * (kh - 1) + 1, dw * (kw - 1) + 1);
            let padding = [
                pad[0] as usize % eh,
                pad[1] as usize % ew,
                pad[2] as usize % eh,
                pad[3] as usize % ew,
            ];
            let h = h.max(eh.saturating_sub(padding[0] + padding[2]));
            let w = w.max(ew.saturating_sub(padding[1] + padding[3]));
            Case {
                in_shape: [h, w, c],
                out,
                kernel: [kh, kw],
                stride: [sh, sw],
                dilation: [dh, dw],
                padding,
                pool,
                seed,
            }
        })
}

/// The ±1 reference: `dot ≥ t` with +1 padding, then (optionally) a 2×2/2 max pool.
fn reference(c: &Case, x: &[i32], wpm: &[i32], t: &[i32]) -> (Vec<i32>, [usize; 3]) {
    let [h, w, ci] = c.in_shape;
    let [kh, kw] = c.kernel;
    let oh = (h + c.padding[0] + c.padding[2] - c.dilation[0] * (kh - 1) - 1) / c.stride[0] + 1;
    let ow = (w + c.padding[1] + c.padding[3] - c.dilation[1] * (kw - 1) - 1) / c.stride[1] + 1;
    let mut y = vec![0i32; oh * ow * c.out];
    for oy in 0..oh {
        for ox in 0..ow {
            for o in 0..c.out {
                let mut dot = 0;
                for ky in 0..kh {
                    for kx in 0..kw {
                        let iy = (oy * c.stride[0] + ky * c.dilation[0]) as isize - c.padding[0] as isize;
                        let ix = (ox * c.stride[1] + kx * c.dilation[1]) as isize - c.padding[1] as isize;
                        let inside = iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < w;
                        for ch in 0..ci {
                            let v = if inside {
                                x[(iy as usize * w + ix as usize) * ci + ch]
                            } else {
                                1
                            };
                            dot += v * wpm[((o * kh + ky) * kw + kx) * ci + ch];
                        }
                    }
                }
                y[(oy * ow + ox) * c.out + o] = if dot >= t[o] { 1 } else { -1 };
            }
        }
    }
    if !c.pool || oh < 2 || ow < 2 {
        return (y, [oh, ow, c.out]);
    }
    let (ph, pw) = (oh / 2, ow / 2);
    let mut p = vec![-1i32; ph * pw * c.out];
    for py in 0..ph {
        for px in 0..pw {
            for o in 0..c.out {
                for (dy, dx) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
                    let v = y[((2 * py + dy) * ow + 2 * px + dx) * c.out + o];
                    let m = &mut p[(py * pw + px) * c.out + o];
                    *m = (*m).max(v);
                }
            }
        }
    }
    (p, [ph, pw, c.out])
}

fn run_case(c: &Case) -> Result<(), TestCaseError> {
    let mut rng = Rng(c.seed);
    let [h, w, ci] = c.in_shape;
    let [kh, kw] = c.kernel;
    let x = rng.bytes(h * w * ci);
    let xpm: Vec<i32> = x.iter().map(|&v| if v >= 128 { 1 } else { -1 }).collect();
    let wpm: Vec<i32> = (0..c.out * kh * kw * ci)
        .map(|_| if rng.next() & 1 == 1 { 1 } else { -1 })
        .collect();
    let patch = (kh * kw * ci) as i64;
    let t: Vec<i32> = (0..c.out).map(|_| rng.range(-patch - 1, patch + 1) as i32).collect();
    // Pack the weights: `[out, kh, kw, ⌈c/64⌉]`.
    let pw = words(ci);
    let mut weight = vec![0u64; c.out * kh * kw * pw];
    for (i, &v) in wpm.iter().enumerate() {
        let (tap, ch) = (i / ci, i % ci);
        if v == 1 {
            weight[tap * pw + ch / 64] |= 1 << (ch % 64);
        }
    }
    let conv = Layer::Conv2dBin {
        in_shape: c.in_shape,
        out_channels: c.out,
        kernel: c.kernel,
        stride: c.stride,
        padding: c.padding,
        dilation: c.dilation,
        weight,
        output: Output::SignBits {
            threshold: Some(t.clone()),
        },
    };
    let (want, shape) = reference(c, &xpm, &wpm, &t);
    let conv_shape = [conv.output_shape().unwrap()[0], conv.output_shape().unwrap()[1], c.out];
    let mut layers = vec![signs_of_u8(c.in_shape), conv];
    if shape != conv_shape {
        layers.push(Layer::MaxPoolBin {
            in_shape: conv_shape,
            kernel: [2, 2],
            stride: [2, 2],
            padding: [0; 4],
        });
    }
    let (head, real) = bit_head(shape);
    layers.push(head);
    let input = InputSpec {
        size: h * w * ci,
        scale: 1.0,
        zero_point: 0,
        binarize_at: None,
        shape: Some(c.in_shape),
    };
    let model = Model::new(input, layers).unwrap();
    // Two samples: the second one's positions follow the first's across the tile boundary.
    let x2: Vec<u8> = x.iter().chain(x.iter()).copied().collect();
    for kind in tiers() {
        let mut ws = model.workspace(2);
        let logits = model.run_with(kind, &mut ws, &x2, 2).unwrap().to_vec();
        for s in 0..2 {
            let got = decode(&logits[s * (1 + real)..(s + 1) * (1 + real)]);
            prop_assert_eq!(&got, &want, "{:?} sample {}", kind, s);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn binary_conv_and_pool_match_the_pm1_reference(c in case()) {
        run_case(&c)?;
    }
}

#[test]
fn padding_reads_plus_one() {
    // A 3×3 image of −1 (one channel), a 3×3 kernel of +1, "same" padding, threshold 0:
    // the centre sees nine −1 (dot −9 → −1); a corner four −1 and five padded +1 (dot 1 → +1);
    // an edge six −1 and three +1 (dot −3 → −1).
    let c = Case {
        in_shape: [3, 3, 1],
        out: 1,
        kernel: [3, 3],
        stride: [1, 1],
        dilation: [1, 1],
        padding: [1, 1, 1, 1],
        pool: false,
        seed: 0,
    };
    let (y, _) = reference(&c, &[-1; 9], &[1; 9], &[0]);
    assert_eq!(y, [1, -1, 1, -1, -1, -1, 1, -1, 1]);
    // And the runtime agrees (all tiers), with x = 0 bytes (−1) and +1 weights.
    let weight = vec![1u64; 9];
    let conv = Layer::Conv2dBin {
        in_shape: [3, 3, 1],
        out_channels: 1,
        kernel: [3, 3],
        stride: [1, 1],
        padding: [1, 1, 1, 1],
        dilation: [1, 1],
        weight,
        output: Output::SignBits {
            threshold: Some(vec![0]),
        },
    };
    let (head, real) = bit_head([3, 3, 1]);
    let input = InputSpec {
        size: 9,
        scale: 1.0,
        zero_point: 0,
        binarize_at: None,
        shape: Some([3, 3, 1]),
    };
    let model = Model::new(input, vec![signs_of_u8([3, 3, 1]), conv, head]).unwrap();
    for kind in tiers() {
        let mut ws = model.workspace(1);
        let logits = model.run_with(kind, &mut ws, &[0u8; 9], 1).unwrap();
        assert_eq!(logits.len(), 1 + real);
        assert_eq!(decode(logits), y, "{kind:?}");
    }
}

#[test]
fn binary_layers_refuse_what_they_cannot_read() {
    // conv2d_bin reading u8, maxpool_bin reading u8, and a grouped conv2d_i8 with sign bits.
    let input = InputSpec {
        size: 16,
        scale: 1.0,
        zero_point: 0,
        binarize_at: None,
        shape: Some([4, 4, 1]),
    };
    let conv = Layer::Conv2dBin {
        in_shape: [4, 4, 1],
        out_channels: 1,
        kernel: [1, 1],
        stride: [1, 1],
        padding: [0; 4],
        dilation: [1, 1],
        weight: vec![1],
        output: Output::SignBits {
            threshold: Some(vec![0]),
        },
    };
    let (head, _) = bit_head([4, 4, 1]);
    let e = Model::new(input.clone(), vec![conv.clone(), head.clone()])
        .unwrap_err()
        .to_string();
    assert!(e.contains("conv2d_bin reads sign bits but gets"), "{e}");
    let pool = Layer::MaxPoolBin {
        in_shape: [4, 4, 1],
        kernel: [2, 2],
        stride: [2, 2],
        padding: [0; 4],
    };
    let e = Model::new(input.clone(), vec![pool, bit_head([2, 2, 1]).0])
        .unwrap_err()
        .to_string();
    assert!(e.contains("maxpool_bin reads sign bits"), "{e}");
    // A binarized input is packed flat (72 bits in 2 words), not as a bit image [3, 3, 8]
    // (9 words): a binary convolution cannot read it.
    let flat = InputSpec {
        size: 72,
        scale: 1.0,
        zero_point: 0,
        binarize_at: Some(128),
        shape: Some([3, 3, 8]),
    };
    let on_flat = Layer::Conv2dBin {
        in_shape: [3, 3, 8],
        out_channels: 1,
        kernel: [1, 1],
        stride: [1, 1],
        padding: [0; 4],
        dilation: [1, 1],
        weight: vec![1],
        output: Output::SignBits {
            threshold: Some(vec![0]),
        },
    };
    let e = Model::new(flat, vec![on_flat, bit_head([3, 3, 1]).0])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("conv2d_bin reads a bit image (1 words per pixel) but the binarized input is 72 packed bits"),
        "{e}"
    );
    // Padding bits set in a weight word.
    let mut bad = conv.clone();
    if let Layer::Conv2dBin { weight, .. } = &mut bad {
        weight[0] = 0b11;
    }
    let e = Model::new(input.clone(), vec![signs_of_u8([4, 4, 1]), bad, head.clone()])
        .unwrap_err()
        .to_string();
    assert!(e.contains("padding bits set"), "{e}");
    // A logits output.
    let mut logits = conv;
    if let Layer::Conv2dBin { output, .. } = &mut logits {
        *output = Output::Logits {
            scale: vec![1.0],
            bias: Some(vec![0.0]),
        };
    }
    let e = Model::new(input, vec![signs_of_u8([4, 4, 1]), logits])
        .unwrap_err()
        .to_string();
    assert!(e.contains("not an output of conv2d_bin"), "{e}");
}
