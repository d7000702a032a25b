//! Shared helpers: a deterministic RNG, random valid models, and a raw file builder for
//! writing deliberately broken files.
#![allow(dead_code)]

use qmomentum_runtime::{InputSpec, KernelKind, Layer, Model, Output};
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::{json, Value};
use std::collections::HashMap;

/// The SIMD tiers this CPU has; prints a note for each one it lacks (so a skip is visible).
pub fn tiers() -> Vec<KernelKind> {
    KernelKind::ALL
        .into_iter()
        .filter(|k| {
            let ok = k.is_available();
            if !ok {
                eprintln!("note: skipping kernel tier {k:?}: not supported by this CPU");
            }
            ok
        })
        .collect()
}

/// A 1×1 `conv2d_i8` over `shape` with identity weights, zero bias and input zero point `z_in`:
/// its accumulators are the input values minus `z_in`, which `output` then exposes (logits at
/// scale 1, or sign bits).
pub fn identity_1x1(shape: [usize; 3], z_in: u8, output: Output) -> Layer {
    let c = shape[2];
    Layer::Conv2dI8 {
        in_shape: shape,
        out_channels: c,
        kernel: [1, 1],
        stride: [1, 1],
        padding: [0; 4],
        dilation: [1, 1],
        groups: 1,
        weight: (0..c * c).map(|i| i8::from(i / c == i % c)).collect(),
        bias: vec![0; c],
        input_zero_point: z_in,
        output,
    }
}

/// SplitMix64: small, deterministic, good enough for test data.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: i64, hi: i64) -> i64 {
        lo + (self.next() % ((hi - lo + 1) as u64)) as i64
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// What a random layer should look like.
#[derive(Clone, Copy)]
pub enum Kind {
    I8,
    Bin,
}

/// A random valid layer `inputs → outputs` of `kind` with output `out` ("relu_u8", "u8",
/// "sign_bits", "logits"). Requantization scales are chosen so outputs spread over 0..255.
pub fn random_layer(rng: &mut Rng, kind: Kind, inputs: usize, outputs: usize, out: &str) -> Layer {
    let binary = matches!(kind, Kind::Bin);
    // Typical |acc|: i8 ≈ 128·127·sqrt(in)/2, bits ≈ sqrt(in).
    let typical = if binary {
        (inputs as f64).sqrt()
    } else {
        64.0 * 73.0 * (inputs as f64).sqrt()
    };
    let output = match out {
        "relu_u8" | "u8" => {
            let mut multiplier = Vec::new();
            let mut shift = Vec::new();
            for _ in 0..outputs {
                let real = 100.0 / typical * (0.5 + rng.range(0, 1000) as f64 / 1000.0);
                let (m, r) = qmomentum_runtime::quantize_multiplier(real).unwrap();
                // Some all-zero channels use m = 0.
                let zero = rng.range(0, 20) == 0;
                multiplier.push(if zero { 0 } else { m });
                shift.push(r);
            }
            // Mostly 8-bit grids, sometimes a 4-bit one.
            let (zero_point, qmax) = if rng.range(0, 3) == 0 {
                (rng.range(0, 4) as u8, 15)
            } else {
                (rng.range(0, 60) as u8, 255)
            };
            Output::U8 {
                relu: out == "relu_u8",
                multiplier,
                shift,
                zero_point,
                qmax,
            }
        }
        "sign_bits" => Output::SignBits {
            threshold: binary.then(|| {
                (0..outputs)
                    .map(|_| rng.range(-(inputs as i64) / 4, inputs as i64 / 4) as i32)
                    .collect()
            }),
        },
        "logits" => Output::Logits {
            scale: (0..outputs)
                .map(|_| (rng.range(1, 1000) as f32) * 1e-4 / typical as f32)
                .collect(),
            bias: binary.then(|| (0..outputs).map(|_| rng.range(-100, 100) as f32 * 0.01).collect()),
        },
        other => panic!("unknown output {other}"),
    };
    match kind {
        Kind::I8 => Layer::DenseI8 {
            inputs,
            outputs,
            weight: (0..inputs * outputs).map(|_| rng.range(-127, 127) as i8).collect(),
            bias: (0..outputs).map(|_| rng.range(-20_000, 20_000) as i32).collect(),
            input_zero_point: rng.range(0, 255) as u8,
            output,
        },
        Kind::Bin => {
            let words = inputs.div_ceil(64);
            let mut weight: Vec<u64> = (0..outputs * words).map(|_| rng.next()).collect();
            if !inputs.is_multiple_of(64) {
                let keep = (1u64 << (inputs % 64)) - 1;
                for j in 0..outputs {
                    weight[j * words + words - 1] &= keep;
                }
            }
            Layer::DenseBin {
                inputs,
                outputs,
                weight,
                output,
            }
        }
    }
}

/// A random model from a list of `(kind, outputs, output)`.
pub fn random_model(rng: &mut Rng, input: usize, spec: &[(Kind, usize, &str)]) -> Model {
    let mut layers = Vec::new();
    let mut prev = input;
    for &(kind, out, output) in spec {
        layers.push(random_layer(rng, kind, prev, out, output));
        prev = out;
    }
    let input = InputSpec {
        size: input,
        scale: 1.0 / 255.0,
        zero_point: rng.range(0, 255) as u8,
        binarize_at: None,
        shape: None,
    };
    Model::new(input, layers).unwrap()
}

/// A mixed model exercising every layer kind and output.
pub fn mixed_model(rng: &mut Rng) -> Model {
    random_model(
        rng,
        50,
        &[
            (Kind::I8, 70, "sign_bits"),
            (Kind::Bin, 130, "sign_bits"),
            (Kind::Bin, 33, "relu_u8"),
            (Kind::I8, 29, "u8"),
            (Kind::I8, 7, "logits"),
        ],
    )
}

/// A model ending in a binary layer.
pub fn binary_head_model(rng: &mut Rng) -> Model {
    random_model(rng, 37, &[(Kind::I8, 65, "sign_bits"), (Kind::Bin, 10, "logits")])
}

/// A fully binary model: the u8 input is binarized, then three XNOR-popcount layers (two with
/// fused sign outputs, of odd widths).
pub fn binary_all_model(rng: &mut Rng) -> Model {
    let spec = [(300, 130, "sign_bits"), (130, 77, "sign_bits"), (77, 10, "logits")];
    let layers = spec
        .iter()
        .map(|&(i, o, out)| random_layer(rng, Kind::Bin, i, o, out))
        .collect();
    let input = InputSpec {
        size: 300,
        scale: 1.0 / 255.0,
        zero_point: 0,
        binarize_at: Some(rng.range(1, 255) as u8),
        shape: None,
    };
    Model::new(input, layers).unwrap()
}

/// A raw file: metadata document + named tensors, written with no validation at all.
pub struct RawFile {
    pub doc: Value,
    pub tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)>,
    pub metadata_key: String,
}

impl RawFile {
    pub fn bytes(&self) -> Vec<u8> {
        let views: Vec<(String, TensorView<'_>)> = self
            .tensors
            .iter()
            .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
            .collect();
        let meta = HashMap::from([(self.metadata_key.clone(), self.doc.to_string())]);
        safetensors::serialize(views, Some(meta)).unwrap()
    }

    pub fn tensor_mut(&mut self, name: &str) -> &mut (String, Dtype, Vec<usize>, Vec<u8>) {
        self.tensors.iter_mut().find(|t| t.0 == name).unwrap()
    }

    pub fn remove(&mut self, name: &str) {
        self.tensors.retain(|t| t.0 != name);
    }

    pub fn set_i32(&mut self, name: &str, index: usize, v: i32) {
        self.tensor_mut(name).3[4 * index..4 * index + 4].copy_from_slice(&v.to_le_bytes());
    }

    pub fn set_f32(&mut self, name: &str, index: usize, v: f32) {
        self.tensor_mut(name).3[4 * index..4 * index + 4].copy_from_slice(&v.to_le_bytes());
    }
}

fn i32s(v: &[i32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn f32s(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// A valid 3-layer int8 file, 8 → 16 (relu_u8) → 12 (u8) → 3 (logits), as raw parts.
pub fn base_int8() -> RawFile {
    let mut rng = Rng(7);
    let doc = json!({
        "format": "qmomentum-int",
        "version": 1,
        "input": { "size": 8, "scale": 0.003921569, "zero_point": 0 },
        "layers": [
            { "kind": "dense_i8", "in": 8, "out": 16, "input_zero_point": 0,
              "output": "relu_u8", "output_zero_point": 0 },
            { "kind": "dense_i8", "in": 16, "out": 12, "input_zero_point": 0,
              "output": "u8", "output_zero_point": 3 },
            { "kind": "dense_i8", "in": 12, "out": 3, "input_zero_point": 0,
              "output": "logits" }
        ]
    });
    let mut tensors = Vec::new();
    for (i, (k, n)) in [(8usize, 16usize), (16, 12), (12, 3)].into_iter().enumerate() {
        let w: Vec<u8> = (0..k * n).map(|_| rng.range(-127, 127) as i8 as u8).collect();
        tensors.push((format!("layers.{i}.weight"), Dtype::I8, vec![n, k], w));
        let b: Vec<i32> = (0..n).map(|_| rng.range(-500, 500) as i32).collect();
        tensors.push((format!("layers.{i}.bias"), Dtype::I32, vec![n], i32s(&b)));
        if i < 2 {
            tensors.push((
                format!("layers.{i}.multiplier"),
                Dtype::I32,
                vec![n],
                i32s(&vec![1 << 30; n]),
            ));
            tensors.push((format!("layers.{i}.shift"), Dtype::I32, vec![n], i32s(&vec![8; n])));
        } else {
            tensors.push((format!("layers.{i}.scale"), Dtype::F32, vec![n], f32s(&vec![0.01; n])));
        }
    }
    RawFile {
        doc,
        tensors,
        metadata_key: "qmomentum".into(),
    }
}

/// Packs rows of `k` codes at `bits` bits, low bits first, zero padding (written out here
/// independently of the runtime's packer).
pub fn pack_codes(codes: &[i8], k: usize, bits: usize) -> Vec<u8> {
    let per = 8 / bits;
    let mut out = Vec::new();
    for row in codes.chunks(k) {
        for chunk in row.chunks(per) {
            let mut b = 0u8;
            for (t, &c) in chunk.iter().enumerate() {
                b |= ((c as u8) & ((1 << bits) - 1) as u8) << (t * bits);
            }
            out.push(b);
        }
    }
    out
}

/// A valid file with packed weights, 7 → 13 (4-bit, relu_u8) → 12 (2-bit, u8) → 3 (8-bit,
/// logits): rows of 7 codes (4 bytes, a padding nibble) and of 13 codes (4 bytes, 6 padding
/// bits).
pub fn base_packed() -> RawFile {
    let mut rng = Rng(17);
    let doc = json!({
        "format": "qmomentum-int",
        "version": 1,
        "input": { "size": 7, "scale": 0.003921569, "zero_point": 0 },
        "layers": [
            { "kind": "dense_i8", "in": 7, "out": 13, "input_zero_point": 0, "weight_bits": 4,
              "output": "relu_u8", "output_zero_point": 0 },
            { "kind": "dense_i8", "in": 13, "out": 12, "input_zero_point": 0, "weight_bits": 2,
              "output": "u8", "output_zero_point": 3 },
            { "kind": "dense_i8", "in": 12, "out": 3, "input_zero_point": 0,
              "output": "logits" }
        ]
    });
    let mut tensors = Vec::new();
    for (i, (k, n, bits)) in [(7usize, 13usize, 4usize), (13, 12, 2), (12, 3, 8)]
        .into_iter()
        .enumerate()
    {
        let half = 1i64 << (bits - 1);
        let codes: Vec<i8> = (0..k * n).map(|_| rng.range(-half, half - 1) as i8).collect();
        let (dtype, shape, data) = if bits == 8 {
            (Dtype::I8, vec![n, k], codes.iter().map(|&c| c as u8).collect())
        } else {
            (Dtype::U8, vec![n, (k * bits).div_ceil(8)], pack_codes(&codes, k, bits))
        };
        tensors.push((format!("layers.{i}.weight"), dtype, shape, data));
        let b: Vec<i32> = (0..n).map(|_| rng.range(-50, 50) as i32).collect();
        tensors.push((format!("layers.{i}.bias"), Dtype::I32, vec![n], i32s(&b)));
        if i < 2 {
            tensors.push((
                format!("layers.{i}.multiplier"),
                Dtype::I32,
                vec![n],
                i32s(&vec![1 << 30; n]),
            ));
            tensors.push((format!("layers.{i}.shift"), Dtype::I32, vec![n], i32s(&vec![2; n])));
        } else {
            tensors.push((format!("layers.{i}.scale"), Dtype::F32, vec![n], f32s(&vec![0.01; n])));
        }
    }
    RawFile {
        doc,
        tensors,
        metadata_key: "qmomentum".into(),
    }
}

/// A valid binary file, 8 → 70 (dense_i8, sign_bits) → 3 (dense_bin, logits).
pub fn base_binary() -> RawFile {
    let mut rng = Rng(11);
    let doc = json!({
        "format": "qmomentum-int",
        "version": 1,
        "input": { "size": 8, "scale": 0.5, "zero_point": 128 },
        "layers": [
            { "kind": "dense_i8", "in": 8, "out": 70, "input_zero_point": 128,
              "output": "sign_bits" },
            { "kind": "dense_bin", "in": 70, "out": 3, "output": "logits" }
        ]
    });
    let w0: Vec<u8> = (0..8 * 70).map(|_| rng.range(-127, 127) as i8 as u8).collect();
    let w1: Vec<u8> = (0..3)
        .flat_map(|_| [rng.next(), rng.next() & 0x3f])
        .flat_map(u64::to_le_bytes)
        .collect();
    let tensors = vec![
        ("layers.0.weight".to_string(), Dtype::I8, vec![70, 8], w0),
        ("layers.0.bias".to_string(), Dtype::I32, vec![70], i32s(&[0; 70])),
        ("layers.1.weight".to_string(), Dtype::U64, vec![3, 2], w1),
        (
            "layers.1.scale".to_string(),
            Dtype::F32,
            vec![3],
            f32s(&[0.1, 0.2, 0.3]),
        ),
        (
            "layers.1.bias".to_string(),
            Dtype::F32,
            vec![3],
            f32s(&[0.0, 1.0, -1.0]),
        ),
    ];
    RawFile {
        doc,
        tensors,
        metadata_key: "qmomentum".into(),
    }
}

// ---------------------------------------------------------------------------------------------
// Convolutional models
// ---------------------------------------------------------------------------------------------

/// A `relu_u8`/`u8` output for `channels` channels whose scale spreads accumulators of
/// `patch`-input dot products over the u8 range.
pub fn random_u8_output(rng: &mut Rng, channels: usize, patch: usize, relu: bool) -> Output {
    let typical = 64.0 * 73.0 * (patch as f64).sqrt();
    let (multiplier, shift) = (0..channels)
        .map(|_| {
            let real = 100.0 / typical * (0.5 + rng.range(0, 1000) as f64 / 1000.0);
            qmomentum_runtime::quantize_multiplier(real).unwrap()
        })
        .unzip();
    Output::U8 {
        relu,
        multiplier,
        shift,
        zero_point: rng.range(0, 40) as u8,
        qmax: 255,
    }
}

/// A random conv2d_i8 layer with full-range weights.
#[allow(clippy::too_many_arguments)]
pub fn random_conv(
    rng: &mut Rng,
    in_shape: [usize; 3],
    out_channels: usize,
    kernel: [usize; 2],
    stride: [usize; 2],
    padding: [usize; 4],
    groups: usize,
    output: Output,
) -> Layer {
    let patch = kernel[0] * kernel[1] * in_shape[2] / groups;
    Layer::Conv2dI8 {
        in_shape,
        out_channels,
        kernel,
        stride,
        padding,
        dilation: [1, 1],
        groups,
        weight: (0..out_channels * patch).map(|_| rng.range(-128, 127) as i8).collect(),
        bias: (0..out_channels).map(|_| rng.range(-20_000, 20_000) as i32).collect(),
        input_zero_point: rng.range(0, 255) as u8,
        output,
    }
}

/// An image input of `shape`.
pub fn image_input(rng: &mut Rng, shape: [usize; 3]) -> InputSpec {
    InputSpec {
        size: shape.iter().product(),
        scale: 1.0 / 255.0,
        zero_point: rng.range(0, 255) as u8,
        binarize_at: None,
        shape: Some(shape),
    }
}

/// The "cnn-small" network: 28×28×1 → conv 32 3×3 same (relu_u8) → maxpool 2 → conv 64 3×3
/// same (relu_u8) → maxpool 2 → dense_i8 3136 → 10 logits, with random weights.
pub fn cnn_small_model(rng: &mut Rng) -> Model {
    let same = [1, 1, 1, 1];
    let pool = |in_shape| Layer::MaxPoolU8 {
        in_shape,
        kernel: [2, 2],
        stride: [2, 2],
        padding: [0; 4],
    };
    let o1 = random_u8_output(rng, 32, 9, true);
    let o2 = random_u8_output(rng, 64, 9 * 32, true);
    let layers = vec![
        random_conv(rng, [28, 28, 1], 32, [3, 3], [1, 1], same, 1, o1),
        pool([28, 28, 32]),
        random_conv(rng, [14, 14, 32], 64, [3, 3], [1, 1], same, 1, o2),
        pool([14, 14, 64]),
        random_layer(rng, Kind::I8, 7 * 7 * 64, 10, "logits"),
    ];
    Model::new(image_input(rng, [28, 28, 1]), layers).unwrap()
}

/// A valid small CNN file, 6×6×2 → conv 4 3×3 pad 1 (relu_u8) → maxpool 2 → dense_i8 36 → 3
/// logits, as raw parts.
pub fn base_cnn() -> RawFile {
    let mut rng = Rng(13);
    let doc = json!({
        "format": "qmomentum-int",
        "version": 1,
        "input": { "size": 72, "scale": 0.003921569, "zero_point": 0, "shape": [6, 6, 2] },
        "layers": [
            { "kind": "conv2d_i8", "in_shape": [6, 6, 2], "out": 4, "kernel": [3, 3],
              "stride": [1, 1], "padding": [1, 1, 1, 1], "dilation": [1, 1], "groups": 1,
              "input_zero_point": 3, "output": "relu_u8", "output_zero_point": 0 },
            { "kind": "maxpool_u8", "in_shape": [6, 6, 4], "kernel": [2, 2], "stride": [2, 2],
              "padding": [0, 0, 0, 0] },
            { "kind": "dense_i8", "in": 36, "out": 3, "input_zero_point": 0, "output": "logits" }
        ]
    });
    let w0: Vec<u8> = (0..4 * 3 * 3 * 2).map(|_| rng.range(-128, 127) as i8 as u8).collect();
    let w2: Vec<u8> = (0..3 * 36).map(|_| rng.range(-127, 127) as i8 as u8).collect();
    let tensors = vec![
        ("layers.0.weight".to_string(), Dtype::I8, vec![4, 3, 3, 2], w0),
        (
            "layers.0.bias".to_string(),
            Dtype::I32,
            vec![4],
            i32s(&[10, -20, 30, 0]),
        ),
        (
            "layers.0.multiplier".to_string(),
            Dtype::I32,
            vec![4],
            i32s(&[1 << 30; 4]),
        ),
        ("layers.0.shift".to_string(), Dtype::I32, vec![4], i32s(&[6; 4])),
        ("layers.2.weight".to_string(), Dtype::I8, vec![3, 36], w2),
        ("layers.2.bias".to_string(), Dtype::I32, vec![3], i32s(&[0, 5, -5])),
        ("layers.2.scale".to_string(), Dtype::F32, vec![3], f32s(&[0.01; 3])),
    ];
    RawFile {
        doc,
        tensors,
        metadata_key: "qmomentum".into(),
    }
}

/// A small binary CNN: `conv2d_i8` (6×6×2 → 70 channels, crossing a word, `sign_bits`),
/// `maxpool_bin`, `conv2d_bin` (3×3×70 → 64, "same" padding), `dense_bin` logits.
pub fn base_bin_cnn() -> RawFile {
    let mut rng = Rng(17);
    let doc = json!({
        "format": "qmomentum-int",
        "version": 1,
        "input": { "size": 72, "scale": 0.003921569, "zero_point": 0, "shape": [6, 6, 2] },
        "layers": [
            { "kind": "conv2d_i8", "in_shape": [6, 6, 2], "out": 70, "kernel": [3, 3],
              "stride": [1, 1], "padding": [1, 1, 1, 1], "dilation": [1, 1], "groups": 1,
              "input_zero_point": 3, "output": "sign_bits" },
            { "kind": "maxpool_bin", "in_shape": [6, 6, 70], "kernel": [2, 2], "stride": [2, 2],
              "padding": [0, 0, 0, 0] },
            { "kind": "conv2d_bin", "in_shape": [3, 3, 70], "out": 64, "kernel": [3, 3],
              "stride": [1, 1], "padding": [1, 1, 1, 1], "dilation": [1, 1],
              "output": "sign_bits" },
            { "kind": "dense_bin", "in": 576, "out": 3, "output": "logits" }
        ]
    });
    let w0: Vec<u8> = (0..70 * 3 * 3 * 2).map(|_| rng.range(-127, 127) as i8 as u8).collect();
    // Each tap: one full word and one of 6 channels.
    let w2: Vec<u8> = (0..64 * 9)
        .flat_map(|_| [rng.next(), rng.next() & 0x3f])
        .flat_map(u64::to_le_bytes)
        .collect();
    let w3: Vec<u8> = (0..3 * 9).map(|_| rng.next()).flat_map(u64::to_le_bytes).collect();
    let t2: Vec<i32> = (0..64).map(|_| rng.range(-40, 40) as i32).collect();
    let tensors = vec![
        ("layers.0.weight".to_string(), Dtype::I8, vec![70, 3, 3, 2], w0),
        ("layers.0.bias".to_string(), Dtype::I32, vec![70], i32s(&[-50; 70])),
        ("layers.2.weight".to_string(), Dtype::U64, vec![64, 3, 3, 2], w2),
        ("layers.2.threshold".to_string(), Dtype::I32, vec![64], i32s(&t2)),
        ("layers.3.weight".to_string(), Dtype::U64, vec![3, 9], w3),
        (
            "layers.3.scale".to_string(),
            Dtype::F32,
            vec![3],
            f32s(&[0.1, 0.2, 0.3]),
        ),
        (
            "layers.3.bias".to_string(),
            Dtype::F32,
            vec![3],
            f32s(&[0.0, 1.0, -1.0]),
        ),
    ];
    RawFile {
        doc,
        tensors,
        metadata_key: "qmomentum".into(),
    }
}
