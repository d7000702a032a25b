//! The corrupt-input corpus: every file in `tests/corrupt/` is listed in `expected.tsv` with the
//! error it must produce; the test walks the folder. Errors must name the file and never panic.
//!
//! The `ckpt_*` files are small checkpoints of a 4→3 model broken in one way each; they are made
//! by `cargo test -p qmomentum --test bad_input -- --ignored regenerate` (committed, so the test
//! does not depend on today's writer).

use qmomentum::checkpoint;
use qmomentum::config::{LayerConfig, ModelConfig, TrainConfig};
use qmomentum::data::{idx::read_idx, Dataset};
use qmomentum::layers::Activation;
use qmomentum::train::Trainer;
use std::path::{Path, PathBuf};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corrupt")
}

fn error_for(path: &Path) -> Option<String> {
    let name = path.file_name()?.to_string_lossy().into_owned();
    let r = std::panic::catch_unwind(|| {
        if name.starts_with("idx_") {
            read_idx(path).err().map(|e| e.to_string())
        } else if name.starts_with("config_") {
            TrainConfig::from_toml_file(path).err().map(|e| e.to_string())
        } else if name.starts_with("ckpt_") {
            checkpoint::load(path).err().map(|e| e.to_string())
        } else {
            Some(format!("unknown kind of corpus file {name}"))
        }
    });
    r.unwrap_or_else(|_| panic!("{name}: the loader panicked"))
}

#[test]
fn every_corrupt_file_gives_its_named_error() {
    let expected = std::fs::read_to_string(dir().join("expected.tsv")).unwrap();
    let mut listed = Vec::new();
    for line in expected.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
        let (file, want) = line.split_once('\t').expect("file<TAB>message");
        let path = dir().join(file);
        let err = error_for(&path).unwrap_or_else(|| panic!("{file}: accepted, but it is corrupt"));
        assert!(err.contains(file), "{file}: the error does not name the file: {err}");
        assert!(err.contains(want), "{file}: expected «{want}», got «{err}»");
        listed.push(file.to_string());
    }
    for e in std::fs::read_dir(dir()).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        if name != "expected.tsv" {
            assert!(
                listed.contains(&name),
                "{name} is in the corpus but not in expected.tsv"
            );
        }
    }
    assert!(listed.len() >= 25, "corpus has {} files", listed.len());
}

fn write_idx(path: &Path, dims: &[u32], data: &[u8]) {
    let mut v = vec![0, 0, 8, dims.len() as u8];
    for d in dims {
        v.extend_from_slice(&d.to_be_bytes());
    }
    v.extend_from_slice(data);
    std::fs::write(path, v).unwrap();
}

#[test]
fn image_label_mismatches_name_the_labels_file() {
    let tmp = std::env::temp_dir().join(format!("qm-pairs-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let im = tmp.join("images");
    let lb = tmp.join("labels");
    write_idx(&im, &[2, 2, 2], &[0; 8]);
    write_idx(&lb, &[3], &[0, 1, 2]);
    let e = Dataset::from_idx_files(&im, &lb, 10).unwrap_err().to_string();
    assert!(
        e.contains("labels") && e.contains("3 labels but") && e.contains("has 2 images"),
        "{e}"
    );
    write_idx(&lb, &[2], &[3, 10]);
    let e = Dataset::from_idx_files(&im, &lb, 10).unwrap_err().to_string();
    assert!(e.contains("label 10 at index 1 is out of range (classes = 10)"), "{e}");
    let e = Dataset::load_mnist_dir(&tmp).unwrap_err().to_string();
    assert!(e.contains("train-images-idx3-ubyte") && e.contains("not found"), "{e}");
    std::fs::remove_dir_all(&tmp).unwrap();
}

fn tiny() -> Trainer {
    let cfg = TrainConfig {
        model: ModelConfig {
            input: 4,
            layers: vec![LayerConfig::Dense {
                units: 3,
                activation: Activation::Softmax,
                quant: None,
            }],
            ..Default::default()
        },
        ..Default::default()
    };
    Trainer::new(cfg).unwrap()
}

/// Rebuild a safetensors file with `edit` applied to its tensors and metadata.
fn rebuild(
    bytes: &[u8],
    edit: impl Fn(&mut Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)>, &mut String),
) -> Vec<u8> {
    let st = safetensors::SafeTensors::deserialize(bytes).unwrap();
    let (_, md) = safetensors::SafeTensors::read_metadata(bytes).unwrap();
    let mut meta = md.metadata().as_ref().unwrap()["qmomentum"].clone();
    let mut t: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    edit(&mut t, &mut meta);
    let views: Vec<_> = t
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize(views, Some([("qmomentum".to_string(), meta)].into())).unwrap()
}

#[test]
#[ignore]
fn regenerate() {
    let good = checkpoint::to_bytes(&tiny()).unwrap();
    let d = dir();
    let w = |n: &str, b: &[u8]| std::fs::write(d.join(n), b).unwrap();
    w("ckpt_truncated.safetensors", &good[..good.len() - 20]);
    let mut huge = good.clone();
    huge[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    w("ckpt_header_length_beyond_file.safetensors", &huge);
    w(
        "ckpt_not_safetensors.safetensors",
        b"this is a text file, not a checkpoint\n",
    );
    w(
        "ckpt_nan_weight.safetensors",
        &rebuild(&good, |t, _| {
            let p = t.iter_mut().find(|x| x.0 == "param.layers.0.weight").unwrap();
            p.3[8..12].copy_from_slice(&f32::NAN.to_le_bytes());
        }),
    );
    w(
        "ckpt_wrong_dtype.safetensors",
        &rebuild(&good, |t, _| {
            let p = t.iter_mut().find(|x| x.0 == "param.layers.0.bias").unwrap();
            p.1 = safetensors::Dtype::I32;
        }),
    );
    w(
        "ckpt_missing_tensor.safetensors",
        &rebuild(&good, |t, _| t.retain(|x| x.0 != "param.layers.0.bias")),
    );
    w(
        "ckpt_wrong_shape.safetensors",
        &rebuild(&good, |t, _| {
            let p = t.iter_mut().find(|x| x.0 == "param.layers.0.weight").unwrap();
            p.2 = vec![3, 4];
        }),
    );
    w(
        "ckpt_other_format.safetensors",
        &rebuild(&good, |_, m| *m = m.replace("qmomentum-checkpoint", "keras-weights")),
    );
    w(
        "ckpt_bad_metadata_json.safetensors",
        &rebuild(&good, |_, m| m.truncate(m.len() / 2)),
    );
    w(
        "ckpt_impossible_config.safetensors",
        &rebuild(&good, |_, m| *m = m.replace("\"momentum\":0.9", "\"momentum\":3.0")),
    );
    // A small file whose config asks for a layer of 10^12 units: refused before allocating.
    w(
        "ckpt_huge_units.safetensors",
        &rebuild(&good, |_, m| *m = m.replace("\"units\":3", "\"units\":1000000000000")),
    );
    w(
        "ckpt_huge_step.safetensors",
        &rebuild(&good, |_, m| {
            *m = m.replace("\"step_in_epoch\":0", "\"step_in_epoch\":144115188075855872")
        }),
    );
    w(
        "ckpt_class_names_count.safetensors",
        &rebuild(&good, |_, m| {
            *m = m.replace("\"observers\":[]", "\"observers\":[],\"class_names\":[\"a\"]")
        }),
    );
}
