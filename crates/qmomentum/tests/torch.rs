//! PyTorch state_dicts in and out (`qmomentum::torch`): the layouts against a forward pass
//! written here with PyTorch's semantics (NCHW convolution, batch norm in eval mode, CHW
//! flatten, `y = W·x + b`), the round trip, and the errors for state_dicts that do not fit.

use qmomentum::config::TrainConfig;
use qmomentum::rng::Rng;
use qmomentum::torch::{export_state_dict, import_state_dict};
use qmomentum::train::Trainer;
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use std::path::Path;

/// conv 2→4 2×2 valid on 3×3×2 → BN2d → relu → flatten (2×2×4: the CHW/HWC permutation
/// matters) → BN1d over the 16 flattened features → dense 3.
const SMALL: &str = r#"
epochs = 1
[model]
input = 18
input_shape = [3, 3, 2]
layers = [
  { type = "conv2d", filters = 4, kernel_size = 2 },
  { type = "batch_norm", torch_momentum = 0.1, epsilon = 1e-5 },
  { type = "activation", activation = "relu" },
  { type = "flatten" },
  { type = "batch_norm", torch_momentum = 0.1, epsilon = 1e-5 },
  { type = "dense", units = 3, activation = "softmax" },
]
"#;

fn config() -> TrainConfig {
    toml::from_str(SMALL).unwrap()
}

/// Deterministic values in about [-1, 1].
fn vals(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| ((i as f32 * 0.7548 + seed as f32 * 1.618).sin() * 1.3).clamp(-1.0, 1.0))
        .collect()
}

type Tensor = (String, Dtype, Vec<usize>, Vec<u8>);

fn f32t(name: &str, shape: &[usize], v: &[f32]) -> Tensor {
    (
        name.into(),
        Dtype::F32,
        shape.to_vec(),
        v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    )
}

fn serialize(ts: &[Tensor]) -> Vec<u8> {
    let views: Vec<(String, TensorView)> = ts
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize(views, None).unwrap()
}

/// The PyTorch state_dict of SMALL as `nn.Sequential(Conv2d, BatchNorm2d, ReLU, Flatten,
/// BatchNorm1d, Linear)`: modules 0, 1, 4, 5. Variances positive.
struct Torch {
    conv_w: Vec<f32>,
    conv_b: Vec<f32>,
    bn2: [Vec<f32>; 4],
    bn1: [Vec<f32>; 4],
    lin_w: Vec<f32>,
    lin_b: Vec<f32>,
}

fn bn(c: usize, seed: u32) -> [Vec<f32>; 4] {
    let var = vals(c, seed + 3).iter().map(|v| v.abs() + 0.25).collect();
    [
        vals(c, seed).iter().map(|v| 1.0 + 0.5 * v).collect(),
        vals(c, seed + 1),
        vals(c, seed + 2),
        var,
    ]
}

impl Torch {
    fn new() -> Self {
        Torch {
            conv_w: vals(4 * 2 * 2 * 2, 1),
            conv_b: vals(4, 2),
            bn2: bn(4, 10),
            bn1: bn(16, 20),
            lin_w: vals(3 * 16, 3),
            lin_b: vals(3, 4),
        }
    }

    fn tensors(&self, prefix: &str) -> Vec<Tensor> {
        let mut v = vec![
            f32t(&format!("{prefix}0.weight"), &[4, 2, 2, 2], &self.conv_w),
            f32t(&format!("{prefix}0.bias"), &[4], &self.conv_b),
            f32t(&format!("{prefix}5.weight"), &[3, 16], &self.lin_w),
            f32t(&format!("{prefix}5.bias"), &[3], &self.lin_b),
        ];
        for (m, b, c) in [("1", &self.bn2, 4usize), ("4", &self.bn1, 16)] {
            for (n, x) in ["weight", "bias", "running_mean", "running_var"].iter().zip(b) {
                v.push(f32t(&format!("{prefix}{m}.{n}"), &[c], x));
            }
            v.push((
                format!("{prefix}{m}.num_batches_tracked"),
                Dtype::I64,
                vec![],
                7i64.to_le_bytes().to_vec(),
            ));
        }
        v
    }

    /// PyTorch's forward in eval mode, on one NHWC sample (read as NCHW).
    fn forward(&self, x_nhwc: &[f32]) -> Vec<f32> {
        let (h, w, c) = (3, 3, 2);
        let x = |ch: usize, y: usize, xx: usize| x_nhwc[(y * w + xx) * c + ch];
        let eps = 1e-5f32;
        let norm = |v: f32, b: &[Vec<f32>; 4], i: usize| (v - b[2][i]) / (b[3][i] + eps).sqrt() * b[0][i] + b[1][i];
        // Conv → BN2d → ReLU, NCHW [4, 2, 2], flattened as (c, h, w).
        let mut flat = [0.0f32; 16];
        for o in 0..4 {
            for oy in 0..h - 1 {
                for ox in 0..w - 1 {
                    let mut s = self.conv_b[o];
                    for ci in 0..c {
                        for ky in 0..2 {
                            for kx in 0..2 {
                                s += self.conv_w[((o * c + ci) * 2 + ky) * 2 + kx] * x(ci, oy + ky, ox + kx);
                            }
                        }
                    }
                    flat[o * 4 + oy * 2 + ox] = norm(s, &self.bn2, o).max(0.0);
                }
            }
        }
        let flat: Vec<f32> = flat.iter().enumerate().map(|(j, &v)| norm(v, &self.bn1, j)).collect();
        (0..3)
            .map(|k| self.lin_b[k] + (0..16).map(|j| self.lin_w[k * 16 + j] * flat[j]).sum::<f32>())
            .collect()
    }
}

fn logits(t: &mut Trainer, x: &[f32], batch: usize) -> Vec<f32> {
    t.model.input_mut(batch).copy_from_slice(x);
    t.model.forward(batch, false, true, &mut Rng::new(0, 0)).to_vec()
}

fn import(bytes: &[u8], names: Option<&[String]>) -> qmomentum::Result<Trainer> {
    import_state_dict(bytes, Path::new("sd.safetensors"), config(), names).map(|i| i.trainer)
}

fn err(bytes: &[u8]) -> String {
    match import(bytes, None) {
        Ok(_) => panic!("imported a state_dict that does not fit"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn imported_model_computes_what_pytorch_computes() {
    let tm = Torch::new();
    let bytes = serialize(&tm.tensors(""));
    let imp = import_state_dict(&bytes, Path::new("sd.safetensors"), config(), None).unwrap();
    assert_eq!(imp.tensors, 14, "4 conv/linear + 8 BN tensors + 2 num_batches_tracked");
    let order: Vec<_> = imp.mapping.iter().map(|(m, l, _)| (m.as_str(), *l)).collect();
    assert_eq!(order, [("0", 0), ("1", 1), ("4", 4), ("5", 5)]);
    let mut t = imp.trainer;
    let batch = 5;
    let x: Vec<f32> = vals(18 * batch, 9).iter().map(|v| v.abs()).collect();
    let ours = logits(&mut t, &x, batch);
    let mut worst = 0.0f32;
    for b in 0..batch {
        let want = tm.forward(&x[b * 18..(b + 1) * 18]);
        for k in 0..3 {
            worst = worst.max((ours[b * 3 + k] - want[k]).abs());
        }
    }
    assert!(worst < 1e-5, "max |logit difference| {worst}");
    // Without the flatten permutation the answer is different: the test can tell.
    let mut wrong = Torch::new();
    wrong.lin_w = (0..3)
        .flat_map(|k| {
            let row = &tm.lin_w[k * 16..(k + 1) * 16];
            (0..16).map(|j| row[(j % 4) * 4 + j / 4]).collect::<Vec<_>>()
        })
        .collect();
    let want_wrong = wrong.forward(&x[..18]);
    assert!((0..3).any(|k| (want_wrong[k] - ours[k]).abs() > 1e-3));
}

#[test]
fn prefixed_names_and_explicit_order_are_accepted() {
    let tm = Torch::new();
    let reference = logits(&mut import(&serialize(&tm.tensors("")), None).unwrap(), &vals(18, 5), 1);
    // A nested nn.Sequential: `net.0.weight`, … (numeric parts: the order is told).
    let mut t = import(&serialize(&tm.tensors("net.")), None).unwrap();
    assert_eq!(logits(&mut t, &vals(18, 5), 1), reference);
    // Named modules: the order must be given.
    let renamed: Vec<Tensor> = tm
        .tensors("")
        .into_iter()
        .map(|(n, d, s, b)| {
            let (m, rest) = n.split_once('.').unwrap();
            let m = match m {
                "0" => "conv",
                "1" => "bn_conv",
                "4" => "bn_flat",
                _ => "fc",
            };
            (format!("{m}.{rest}"), d, s, b)
        })
        .collect();
    let bytes = serialize(&renamed);
    let e = err(&bytes);
    assert!(e.contains("do not tell their order") && e.contains("--names"), "{e}");
    let names: Vec<String> = ["conv", "bn_conv", "bn_flat", "fc"].map(String::from).to_vec();
    let mut t = import(&bytes, Some(&names)).unwrap();
    assert_eq!(logits(&mut t, &vals(18, 5), 1), reference);
    // A wrong order is a shape mismatch, reported with both shapes.
    let swapped: Vec<String> = ["conv", "bn_flat", "bn_conv", "fc"].map(String::from).to_vec();
    let e = import(&bytes, Some(&swapped)).err().unwrap().to_string();
    assert!(
        e.contains("misshaped 'bn_flat.weight': the file has [16], layer 1 (batch_norm 4) needs [4]"),
        "{e}"
    );
}

#[test]
fn export_then_import_gives_identical_weights() {
    let mut cfg = config();
    cfg.seed = 3;
    let mut t = Trainer::new(cfg).unwrap();
    // Non-trivial batch-norm statistics and parameters.
    for (i, b) in t.model.buffers_iter_mut().enumerate() {
        b.value = vals(b.value.len(), 40 + i as u32)
            .iter()
            .map(|v| v.abs() + 0.1)
            .collect();
    }
    for (i, p) in t.model.params_iter_mut().enumerate() {
        p.value = vals(p.value.len(), 60 + i as u32);
    }
    let e = export_state_dict(&t).unwrap();
    // The same bytes every time (the metadata is a HashMap in `safetensors`; the header is
    // rewritten sorted): an export can be checksummed.
    for _ in 0..4 {
        assert!(
            export_state_dict(&t).unwrap().bytes == e.bytes,
            "export bytes differ between calls"
        );
    }
    let st = SafeTensors::deserialize(&e.bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "0.bias",
            "0.weight",
            "1.bias",
            "1.num_batches_tracked",
            "1.running_mean",
            "1.running_var",
            "1.weight",
            "4.bias",
            "4.num_batches_tracked",
            "4.running_mean",
            "4.running_var",
            "4.weight",
            "5.bias",
            "5.weight"
        ]
    );
    assert_eq!(st.tensor("0.weight").unwrap().shape(), [4, 2, 2, 2]);
    assert_eq!(st.tensor("5.weight").unwrap().shape(), [3, 16]);
    let (_, meta) = SafeTensors::read_metadata(&e.bytes).unwrap();
    let def = meta.metadata().as_ref().unwrap()[qmomentum::torch::DEFINITION_KEY].clone();
    assert!(
        def.contains("nn.BatchNorm1d(16, eps=1e-5, momentum=0.1),  # 4"),
        "{def}"
    );
    assert!(def.contains("nn.Linear(16, 3),  # 5"), "{def}");
    let back = import(&e.bytes, None).unwrap();
    for (a, b) in t.model.params_iter().zip(back.model.params_iter()) {
        assert_eq!(a.name, b.name);
        assert!(
            a.value.iter().zip(&b.value).all(|(x, y)| x.to_bits() == y.to_bits()),
            "{}",
            a.name
        );
    }
    for (a, b) in t.model.buffers_iter().zip(back.model.buffers_iter()) {
        assert!(
            a.value.iter().zip(&b.value).all(|(x, y)| x.to_bits() == y.to_bits()),
            "{}",
            a.name
        );
    }
    // And the PyTorch side sees what PyTorch would: the exported Linear equals the reference
    // forward of the exported tensors.
    let read = |n: &str| -> Vec<f32> {
        st.tensor(n)
            .unwrap()
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    };
    let bn4 = |m: &str| ["weight", "bias", "running_mean", "running_var"].map(|n| read(&format!("{m}.{n}")));
    let tm = Torch {
        conv_w: read("0.weight"),
        conv_b: read("0.bias"),
        bn2: bn4("1"),
        bn1: bn4("4"),
        lin_w: read("5.weight"),
        lin_b: read("5.bias"),
    };
    let x: Vec<f32> = vals(18, 11).iter().map(|v| v.abs()).collect();
    let want = tm.forward(&x);
    let got = logits(&mut t, &x, 1);
    for k in 0..3 {
        assert!((want[k] - got[k]).abs() < 1e-5, "{want:?} {got:?}");
    }
}

#[test]
fn missing_extra_and_misshaped_tensors_are_each_named() {
    let tm = Torch::new();
    let all = tm.tensors("");
    // Missing.
    let without: Vec<Tensor> = all.iter().filter(|t| t.0 != "1.running_var").cloned().collect();
    let e = err(&serialize(&without));
    assert!(e.starts_with("sd.safetensors: "), "{e}");
    assert!(e.contains("1 mismatch\n"), "{e}");
    assert!(
        e.contains("missing '1.running_var' [4], for layer 1 (batch_norm 4)"),
        "{e}"
    );
    // Extra, in a module and as a module of its own.
    let mut extra = all.clone();
    extra.push(f32t("1.running_std", &[4], &[1.0; 4]));
    extra.push(f32t("7.weight", &[2, 3], &[0.0; 6]));
    let e = err(&serialize(&extra));
    assert!(e.contains("2 mismatches"), "{e}");
    assert!(
        e.contains("extra '1.running_std' [4] in the module of layer 1 (batch_norm 4)"),
        "{e}"
    );
    assert!(
        e.contains("extra '7.weight' [2, 3] (the config has only 4 layers with parameters)"),
        "{e}"
    );
    // Misshaped: a conv for 3 input channels.
    let mut bad = all.clone();
    bad[0] = f32t("0.weight", &[4, 3, 2, 2], &vals(48, 1));
    let e = err(&serialize(&bad));
    assert!(
        e.contains("misshaped '0.weight': the file has [4, 3, 2, 2], layer 0 (conv2d 4 2×2) needs [4, 2, 2, 2]"),
        "{e}"
    );
    // The file's modules and the config's layers are listed side by side.
    assert!(
        e.contains("the file's modules, in the order used: '0' (weight [4, 3, 2, 2], bias [4]); '1' (weight [4], bias [4], running_mean [4], running_var [4]);")
            && e.contains("the config's layers with parameters: 0 conv2d 4 2×2 (weight [4, 2, 2, 2]"),
        "{e}"
    );
    // A dtype that is not a float, and a non-finite value.
    let mut ints = all.clone();
    ints[1] = ("0.bias".into(), Dtype::I32, vec![4], vec![0; 16]);
    let e = err(&serialize(&ints));
    assert!(e.contains("'0.bias' [4]: dtype I32 (expected F32"), "{e}");
    let mut nan = all.clone();
    nan[1] = f32t("0.bias", &[4], &[0.0, f32::NAN, 0.0, 0.0]);
    let e = err(&serialize(&nan));
    assert!(e.contains("'0.bias' [4]: a non-finite value (NaN) at index 1"), "{e}");
    // Not a safetensors file at all.
    let e = err(b"PK\x03\x04 a zip file");
    assert!(e.contains("sd.safetensors: not a readable safetensors file"), "{e}");
}

#[test]
fn another_architecture_lists_the_first_mismatches_with_both_shapes() {
    // An MLP's state_dict (nn.Sequential(Flatten, Linear(18, 8), ReLU, Linear(8, 8), ReLU,
    // Linear(8, 3))) for the small CNN: the modules are paired with the conv and the two batch
    // norms, and the dense layer has none.
    let sd = serialize(&[
        f32t("1.weight", &[8, 18], &vals(144, 1)),
        f32t("1.bias", &[8], &vals(8, 2)),
        f32t("3.weight", &[8, 8], &vals(64, 3)),
        f32t("3.bias", &[8], &vals(8, 4)),
        f32t("5.weight", &[3, 8], &vals(24, 5)),
        f32t("5.bias", &[3], &vals(3, 6)),
    ]);
    let e = err(&sd);
    assert!(
        e.contains("misshaped '1.weight': the file has [8, 18], layer 0 (conv2d 4 2×2) needs [4, 2, 2, 2]"),
        "{e}"
    );
    assert!(
        e.contains("misshaped '1.bias': the file has [8], layer 0 (conv2d 4 2×2) needs [4]"),
        "{e}"
    );
    assert!(
        e.contains("misshaped '3.weight': the file has [8, 8], layer 1 (batch_norm 4) needs [4]"),
        "{e}"
    );
    assert!(
        e.contains("missing '3.running_mean' [4], for layer 1 (batch_norm 4)"),
        "{e}"
    );
    assert!(e.contains("11 mismatches"), "{e}");
    // Past the first 8, the mismatches are counted; the summary still names every module.
    assert!(!e.contains("missing a module for layer 5 (dense 3)"), "{e}");
    assert!(e.contains("… and 3 more"), "{e}");
    assert!(e.contains("5 dense 3 (weight [3, 16], bias [3])"), "{e}");
    // Fewer modules than layers: the layers left without one are named.
    let e = err(&serialize(&[f32t("1.weight", &[8, 18], &vals(144, 1))]));
    assert!(e.contains("missing a module for layer 5 (dense 3): weight [3, 16], bias [3] (1 module(s) of the file matched, 4 layers with parameters in the config)"), "{e}");
}

/// f16, bf16 and f64 tensors are converted (exactly, for values these types hold).
#[test]
fn half_and_double_precision_are_converted() {
    let tm = Torch::new();
    let want = logits(&mut import(&serialize(&tm.tensors("")), None).unwrap(), &vals(18, 5), 1);
    let conv = |enc: &dyn Fn(f32) -> Vec<u8>, dt: Dtype| -> Vec<Tensor> {
        tm.tensors("")
            .into_iter()
            .map(|(n, d, s, b)| {
                if d != Dtype::F32 {
                    return (n, d, s, b);
                }
                let v: Vec<u8> = b
                    .chunks_exact(4)
                    .flat_map(|c| enc(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                    .collect();
                (n, dt, s, v)
            })
            .collect()
    };
    let f64s = conv(&|x| (x as f64).to_le_bytes().to_vec(), Dtype::F64);
    assert_eq!(
        logits(&mut import(&serialize(&f64s), None).unwrap(), &vals(18, 5), 1),
        want
    );
    // bf16 and f16 lose precision: compare with the f32 model of the rounded values.
    let bf = |x: f32| ((x.to_bits() + 0x8000) >> 16) as u16;
    let bf16 = conv(&|x| bf(x).to_le_bytes().to_vec(), Dtype::BF16);
    let rounded = conv(
        &|x| f32::from_bits((bf(x) as u32) << 16).to_le_bytes().to_vec(),
        Dtype::F32,
    );
    assert_eq!(
        logits(&mut import(&serialize(&bf16), None).unwrap(), &vals(18, 5), 1),
        logits(&mut import(&serialize(&rounded), None).unwrap(), &vals(18, 5), 1)
    );
    // f16: 1.0 = 0x3c00, -2.5 = 0xc100, 2^-24 (smallest subnormal) = 0x0001, 65504 = 0x7bff.
    let halves: [(u16, f32); 5] = [
        (0x3c00, 1.0),
        (0xc100, -2.5),
        (0x0001, 1.0 / 16_777_216.0),
        (0x7bff, 65504.0),
        (0x3555, 0.333_251_95),
    ];
    let mut ts = tm.tensors("");
    let i = ts.iter().position(|t| t.0 == "5.bias").unwrap();
    ts[i] = (
        "5.bias".into(),
        Dtype::F16,
        vec![3],
        halves[..3].iter().flat_map(|h| h.0.to_le_bytes()).collect(),
    );
    let t = import(&serialize(&ts), None).unwrap();
    let qmomentum::layers::Layer::Dense(d) = &t.model.layers[5] else {
        panic!()
    };
    assert_eq!(d.bias.value, halves[..3].iter().map(|h| h.1).collect::<Vec<_>>());
    ts[i] = (
        "5.bias".into(),
        Dtype::F16,
        vec![3],
        halves[2..].iter().flat_map(|h| h.0.to_le_bytes()).collect(),
    );
    let t = import(&serialize(&ts), None).unwrap();
    let qmomentum::layers::Layer::Dense(d) = &t.model.layers[5] else {
        panic!()
    };
    assert_eq!(d.bias.value, halves[2..].iter().map(|h| h.1).collect::<Vec<_>>());
    // An f16 infinity is refused like any non-finite value.
    ts[i] = (
        "5.bias".into(),
        Dtype::F16,
        vec![3],
        [0x3c00u16, 0x7c00, 0].iter().flat_map(|h| h.to_le_bytes()).collect(),
    );
    assert!(err(&serialize(&ts)).contains("'5.bias' [3]: a non-finite value (inf) at index 1"));
}

/// The state_dict has no ε: a config whose batch norm does not use PyTorch's 1e-5 is imported
/// with a warning, and computes with its own ε.
#[test]
fn a_batch_norm_epsilon_other_than_pytorchs_is_reported() {
    let tm = Torch::new();
    let bytes = serialize(&tm.tensors(""));
    let mut cfg = config();
    if let qmomentum::config::LayerConfig::BatchNorm { epsilon, .. } = &mut cfg.model.layers[1] {
        *epsilon = 1e-3;
    }
    let imp = import_state_dict(&bytes, Path::new("sd.safetensors"), cfg, None).unwrap();
    assert_eq!(imp.notes.len(), 1, "{:?}", imp.notes);
    assert!(imp.notes[0]
        .starts_with("layer 1 (batch_norm): the config's epsilon is 0.001, PyTorch's BatchNorm default is 1e-5"));
    let clean = import_state_dict(&bytes, Path::new("sd.safetensors"), config(), None).unwrap();
    assert!(clean.notes.is_empty());
}

/// The definition of layers PyTorch pads differently: TensorFlow's `same` with an even kernel
/// or a stride pads more at the bottom/right, written as an explicit pad module before the
/// layer (which shifts the indices of the tensors' names accordingly).
#[test]
fn asymmetric_padding_gets_an_explicit_pad_module() {
    let cfg: TrainConfig = toml::from_str(
        r#"
        [model]
        input = 64
        input_shape = [8, 8, 1]
        layers = [
          { type = "conv2d", filters = 2, kernel_size = 2, padding = "same", activation = "relu" },
          { type = "max_pool2d", pool_size = 3, strides = 2, padding = "same" },
          { type = "global_avg_pool" },
          { type = "dense", units = 3, activation = "softmax" },
        ]
        "#,
    )
    .unwrap();
    let (def, index_of, notes) = qmomentum::torch::sequential_definition(&cfg.model).unwrap();
    assert!(notes.is_empty(), "{notes:?}");
    let lines: Vec<&str> = def.lines().collect();
    assert_eq!(
        lines[1],
        "    nn.ZeroPad2d((0, 1, 0, 1)),  # 0: qmomentum layer 0: asymmetric padding"
    );
    assert!(
        lines[2].starts_with("    nn.Conv2d(1, 2, kernel_size=(2, 2), stride=(1, 1), padding=(0, 0)),  # 1"),
        "{def}"
    );
    assert!(
        lines[4].starts_with("    nn.ConstantPad2d((0, 1, 0, 1), float('-inf')),  # 3"),
        "{def}"
    );
    assert!(
        lines[5].starts_with("    nn.MaxPool2d(kernel_size=(3, 3), stride=(2, 2), padding=(0, 0)),  # 4"),
        "{def}"
    );
    assert!(lines[6].starts_with("    nn.AdaptiveAvgPool2d(1),  # 5"), "{def}");
    assert!(lines[8].starts_with("    nn.Linear(2, 3),  # 7"), "{def}");
    assert_eq!(index_of[&0], 1);
    assert_eq!(index_of[&3], 7);
    // And the export uses those indices, which import back.
    let mut t = Trainer::new(cfg.clone()).unwrap();
    for (i, p) in t.model.params_iter_mut().enumerate() {
        p.value = vals(p.value.len(), 80 + i as u32);
    }
    let e = export_state_dict(&t).unwrap();
    let st = SafeTensors::deserialize(&e.bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    assert_eq!(names, ["1.bias", "1.weight", "7.bias", "7.weight"]);
    let back = import_state_dict(&e.bytes, Path::new("x.safetensors"), cfg, None)
        .unwrap()
        .trainer;
    for (a, b) in t.model.params_iter().zip(back.model.params_iter()) {
        assert_eq!(a.value, b.value, "{}", a.name);
    }
}
