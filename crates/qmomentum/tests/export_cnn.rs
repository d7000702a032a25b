//! The integer runtime agrees with the training-time simulation on convolutional networks:
//! cnn-small (conv – BN – ReLU – max pool, twice, then dense), trained in float, batch norm folded,
//! quantized post-training, run by the runtime's `conv2d_i8`/`maxpool_u8` ops on the 10,000
//! Fashion-MNIST test images: ≥ 99.9 % identical predictions and accuracy within 0.1 point.

use qmomentum::config::{ModelConfig, TrainConfig};
use qmomentum::data::Dataset;
use qmomentum::export::to_runtime;
use qmomentum::metrics::argmax_rows;
use qmomentum::optim::OptimizerConfig;
use qmomentum::quant::ptq::{quantize_float_model, Calibration};
use qmomentum::quant::Scheme;
use qmomentum::train::Trainer;
use qmomentum_runtime::KernelKind;
use std::path::Path;

fn data() -> (Dataset, Dataset) {
    Dataset::load_mnist_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/fashion-mnist")).unwrap()
}

fn subset(d: &Dataset, n: usize) -> Dataset {
    Dataset {
        images: d.images[..n * d.features].to_vec(),
        labels: d.labels[..n].to_vec(),
        features: d.features,
        classes: d.classes,
        shape: d.shape.clone(),
    }
}

fn agreement(model: &mut qmomentum::model::Sequential, test: &Dataset, label: &str) {
    let n = test.len();
    let mut x = vec![0.0f32; test.images.len()];
    qmomentum::data::normalise(&test.images, &mut x);
    let probs = model.predict(&x, n);
    let mut sim = Vec::new();
    argmax_rows(&probs, 10, &mut sim);
    let rt = to_runtime(model).unwrap();
    let rt = qmomentum_runtime::Model::from_bytes(&rt.to_bytes().unwrap()).unwrap();
    let mut per_kernel = Vec::new();
    for k in KernelKind::ALL.into_iter().filter(|k| k.is_available()) {
        let mut ws = rt.workspace(1000);
        let mut p = Vec::new();
        for start in (0..n).step_by(1000) {
            let b = (n - start).min(1000);
            let logits = rt
                .run_with(k, &mut ws, &test.images[start * 784..(start + b) * 784], b)
                .unwrap();
            let mut q = Vec::new();
            argmax_rows(logits, 10, &mut q);
            p.extend(q);
        }
        per_kernel.push(p);
    }
    for p in &per_kernel[1..] {
        assert_eq!(p, &per_kernel[0], "{label}: kernels disagree");
    }
    let got = rt.predict(&test.images, n, 2).unwrap();
    assert_eq!(got, per_kernel[0]);
    let same = got.iter().zip(&sim).filter(|(a, b)| a == b).count();
    let acc = |p: &[u32]| p.iter().zip(&test.labels).filter(|(a, &l)| **a == l as u32).count() as f64 / n as f64;
    let (a_rt, a_sim) = (acc(&got), acc(&sim));
    eprintln!("{label}: agreement {same}/{n}, accuracy runtime {a_rt:.4} simulation {a_sim:.4}");
    assert!(
        same as f64 >= 0.999 * n as f64,
        "{label}: only {same}/{n} predictions agree"
    );
    assert!(
        (a_rt - a_sim).abs() <= 0.001 + 1e-9,
        "{label}: accuracy {a_rt} vs {a_sim}"
    );
}

#[test]
fn cnn_small_ptq_runtime_agrees_with_simulation() {
    let (train, test) = data();
    let train = subset(&train, 12_000);
    // PyTorch's running-statistics momentum (0.1 of each new batch): after the 94 steps of this
    // short run, Keras's 0.99 would still hold 39 % of the initial statistics.
    let mut model = ModelConfig::named("cnn-small").unwrap();
    for l in model.layers.iter_mut() {
        if let qmomentum::config::LayerConfig::BatchNorm {
            momentum,
            torch_momentum,
            ..
        } = l
        {
            *momentum = None;
            *torch_momentum = Some(0.1);
        }
    }
    let cfg = TrainConfig {
        model,
        epochs: 1,
        optimizer: OptimizerConfig {
            lr: 0.01,
            ..Default::default()
        },
        ..Default::default()
    };
    let mut fp = Trainer::new(cfg).unwrap();
    fp.fit(&train, None, |_, _| {}).unwrap();
    for scheme in [Scheme::W8a8, Scheme::W4a8] {
        let (_, mut q) = quantize_float_model(
            &fp.model,
            &fp.config.model,
            scheme,
            &train,
            10,
            128,
            Calibration::MinMax,
        )
        .unwrap();
        agreement(&mut q, &test, &format!("cnn-small PTQ {scheme}"));
    }
}
