//! `qmomentum import` and `export --format torch` on the PyTorch fixtures of
//! `tests/fixtures/torch/` (made once by `make_fixtures.py`; PyTorch is not needed here): the
//! imported models compute PyTorch's logits, go through PTQ and the integer export, and come
//! back out as the same state_dict.

mod common;

use common::{run, s, small_data, text, tmp};
use qmomentum::data::Dataset;
use qmomentum::rng::Rng;
use safetensors::SafeTensors;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/torch")
        .join(name)
}

/// Import `arch`'s fixture into `dir`, returning the checkpoint.
fn import(arch: &str, dir: &Path) -> PathBuf {
    let out = dir.join(arch);
    let o = run(&[
        "import",
        s(&fixture(&format!("{arch}.safetensors"))),
        "--model",
        if arch == "mlp" { "mlp" } else { "cnn-small" },
        "-o",
        s(&out),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    out.join("checkpoint.safetensors")
}

/// Max |our logit − PyTorch's| on the fixture's test images.
fn logit_difference(arch: &str, ckpt: &Path) -> f32 {
    let expected: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture(&format!("{arch}.json"))).unwrap()).unwrap();
    let images: Vec<usize> = expected["test_images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    let want: Vec<f32> = expected["logits"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|row| row.as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32))
        .collect();
    let test = Dataset::load_mnist_test(&common::shipped()).unwrap();
    let mut t = qmomentum::checkpoint::load(ckpt).unwrap();
    let n = images.len();
    let x = t.model.input_mut(n);
    for (k, &i) in images.iter().enumerate() {
        qmomentum::data::normalise(&test.images[i * 784..(i + 1) * 784], &mut x[k * 784..(k + 1) * 784]);
    }
    let got = t.model.forward(n, false, true, &mut Rng::new(0, 0)).to_vec();
    assert_eq!(got.len(), want.len());
    got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max)
}

#[test]
fn imported_models_compute_pytorchs_logits() {
    let dir = tmp("torch-logits");
    for arch in ["mlp", "cnn-small"] {
        let ckpt = import(arch, &dir);
        let d = logit_difference(arch, &ckpt);
        eprintln!("{arch}: max |logit − PyTorch's| over 8 test images = {d:.2e}");
        assert!(d <= 1e-4, "{arch}: max |logit difference| {d}");
    }
}

#[test]
fn import_output_is_a_file_or_a_folder_and_never_replaced() {
    let dir = tmp("torch-out");
    let file = dir.join("mlp.safetensors");
    let args = |out: &Path| {
        run(&[
            "import",
            s(&fixture("mlp.safetensors")),
            "--config",
            s(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/design_doc.toml")),
            "-o",
            s(out),
        ])
    };
    let o = args(&file);
    assert!(o.status.success(), "{}", text(&o));
    let out = text(&o);
    for line in [
        "'1' → layer 0 (dense 128)",
        "'3' → layer 1 (dense 64)",
        "'5' → layer 2 (dense 10)",
    ] {
        assert!(out.contains(line), "{out}");
    }
    assert!(logit_difference("mlp", &file) <= 1e-4);
    let before = std::fs::read(&file).unwrap();
    let o = args(&file);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("exists; import never replaces a checkpoint"),
        "{}",
        text(&o)
    );
    assert_eq!(std::fs::read(&file).unwrap(), before);
}

/// The workflow: trained in PyTorch, imported, quantized (PTQ), exported to the integer
/// runtime; and QAT fine-tuning from the imported weights.
#[test]
fn imported_model_is_quantized_and_exported() {
    let dir = tmp("torch-ptq");
    let data = small_data(512, 500);
    let ckpt = import("cnn-small", &dir);
    let ptq = dir.join("ptq");
    let o = run(&[
        "quantize",
        s(&ckpt),
        "--data",
        s(&data),
        "--quant",
        "w8a8",
        "--batches",
        "2",
        "--out",
        s(&ptq),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    // "fp32 0.8xxx → PTQ w8a8 … 0.8xxx": the imported model is as good as PyTorch's.
    let out = text(&o);
    let accs: Vec<f64> = out
        .split_whitespace()
        .filter_map(|w| w.parse::<f64>().ok())
        .filter(|v| *v > 0.0 && *v < 1.0)
        .collect();
    assert!(accs.len() >= 2 && accs[0] > 0.8 && accs[1] > accs[0] - 0.02, "{out}");
    let qmm = dir.join("model.qmm");
    let o = run(&["export", s(&ptq.join("checkpoint.safetensors")), "-o", s(&qmm)]);
    assert!(o.status.success(), "{}", text(&o));
    let o = run(&["infer", s(&qmm), "--data", s(&data)]);
    assert!(o.status.success(), "{}", text(&o));
    let acc: f64 = text(&o)
        .split("accuracy ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(
        (acc - accs[1]).abs() <= 0.01,
        "integer {acc} vs simulated PTQ {}",
        accs[1]
    );
    // QAT fine-tuning of the imported MLP (PTQ w4a4, then one epoch of QAT).
    let mlp = import("mlp", &dir);
    let o = run(&[
        "quantize",
        s(&mlp),
        "--data",
        s(&data),
        "--quant",
        "w4a4",
        "--batches",
        "2",
        "--finetune-epochs",
        "1",
        "--lr",
        "0.0001",
        "--out",
        s(&dir.join("qat")),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("after 1 epochs of QAT fine-tuning"), "{}", text(&o));
}

fn tensors(bytes: &[u8]) -> Vec<(String, Vec<usize>, Vec<u8>)> {
    let st = SafeTensors::deserialize(bytes).unwrap();
    let mut v: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.shape().to_vec(), t.data().to_vec()))
        .collect();
    v.sort();
    v
}

#[test]
fn export_torch_gives_back_the_pytorch_state_dict() {
    let dir = tmp("torch-export");
    for arch in ["mlp", "cnn-small"] {
        let ckpt = import(arch, &dir);
        let sd = dir.join(format!("{arch}-out.safetensors"));
        let o = run(&["export", s(&ckpt), "--format", "torch", "-o", s(&sd)]);
        assert!(o.status.success(), "{}", text(&o));
        assert!(text(&o).contains("model = nn.Sequential("), "{}", text(&o));
        let bytes = std::fs::read(&sd).unwrap();
        // The same names, shapes and bytes as the PyTorch file, except the BN batch counters.
        let ours = tensors(&bytes);
        let theirs = tensors(&std::fs::read(fixture(&format!("{arch}.safetensors"))).unwrap());
        assert_eq!(ours.len(), theirs.len());
        for (a, b) in ours.iter().zip(&theirs) {
            assert_eq!((&a.0, &a.1), (&b.0, &b.1));
            if !a.0.ends_with("num_batches_tracked") {
                assert!(a.2 == b.2, "{arch}: {} differs", a.0);
            }
        }
        let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
        let meta = meta.metadata().clone().unwrap();
        assert_eq!(meta["format"], "pt");
        let def = &meta[qmomentum::torch::DEFINITION_KEY];
        if arch == "cnn-small" {
            assert!(
                def.contains("nn.BatchNorm2d(64, eps=1e-5, momentum=0.1),  # 5"),
                "{def}"
            );
            assert!(def.contains("nn.Linear(3136, 10),  # 9"), "{def}");
        } else {
            assert!(def.contains("nn.Linear(64, 10),  # 5"), "{def}");
        }
        // And back: identical weights.
        let again = dir.join(format!("{arch}-again"));
        let o = run(&[
            "import",
            s(&sd),
            "--model",
            if arch == "mlp" { "mlp" } else { "cnn-small" },
            "-o",
            s(&again),
        ]);
        assert!(o.status.success(), "{}", text(&o));
        let (a, b) = (
            qmomentum::checkpoint::load(&ckpt).unwrap(),
            qmomentum::checkpoint::load(&again.join("checkpoint.safetensors")).unwrap(),
        );
        for (p, q) in a.model.params_iter().zip(b.model.params_iter()) {
            assert!(
                p.value.iter().zip(&q.value).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{}",
                p.name
            );
        }
        for (p, q) in a.model.buffers_iter().zip(b.model.buffers_iter()) {
            assert!(
                p.value.iter().zip(&q.value).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{}",
                p.name
            );
        }
    }
    // --format qmm is the default and refuses a float checkpoint as before.
    let o = run(&[
        "export",
        s(&dir.join("mlp/checkpoint.safetensors")),
        "-o",
        s(&dir.join("m.qmm")),
    ]);
    assert!(!o.status.success());
}

#[test]
fn a_state_dict_of_another_architecture_is_refused_with_both_shapes() {
    let dir = tmp("torch-wrong");
    let out = dir.join("out");
    let o = run(&[
        "import",
        s(&fixture("mlp.safetensors")),
        "--model",
        "cnn-small",
        "-o",
        s(&out),
    ]);
    assert!(!o.status.success());
    let e = text(&o);
    assert!(
        e.contains("mlp.safetensors: the state_dict does not fit the config's model"),
        "{e}"
    );
    assert!(
        e.contains("misshaped '1.weight': the file has [128, 784], layer 0 (conv2d 32 3×3) needs [32, 1, 3, 3]"),
        "{e}"
    );
    assert!(
        e.contains("missing '3.running_mean' [32], for layer 1 (batch_norm 32)"),
        "{e}"
    );
    assert!(!out.exists(), "nothing is written for a refused import");
    // Modules whose names do not tell their order.
    let o = run(&[
        "import",
        s(&fixture("mlp.safetensors")),
        "--model",
        "mlp",
        "--names",
        "5,3,1",
        "-o",
        s(&out),
    ]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("misshaped '5.weight': the file has [10, 64], layer 0 (dense 128) needs [128, 784]"),
        "{}",
        text(&o)
    );
}
