//! The integer runtime agrees with the training-time simulation on convolutional networks:
//! cnn-small (conv – BN – ReLU – max pool, twice, then dense), trained in float, batch norm folded,
//! quantized post-training, run by the runtime's `conv2d_i8`/`maxpool_u8` ops on the 10,000
//! Fashion-MNIST test images: ≥ 99.9 % identical predictions and accuracy within 0.1 point.

mod common;

use common::agreement;
use qmomentum::config::{ModelConfig, TrainConfig};
use qmomentum::data::Dataset;
use qmomentum::optim::OptimizerConfig;
use qmomentum::quant::ptq::{quantize_float_model, Calibration};
use qmomentum::quant::Scheme;
use qmomentum::train::Trainer;
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

/// Binary cnn-small (`--quant binary`): the first convolution reads the u8 pixels with 8-bit
/// weights, its batch norm folded, and writes sign bits; the second has ±1 weights with its batch
/// norm kept after the kernel (`FoldedBn::after_binary`) and +1 padding; then a binary classifier.
/// The runtime runs `conv2d_i8` → `maxpool_bin` → `conv2d_bin` → `maxpool_bin` → `dense_bin`:
/// ≥ 99.9 % identical predictions, after QAT and with the batch norms frozen.
#[test]
fn cnn_small_binary_qat_runtime_agrees_with_simulation() {
    let (train, test) = data();
    let train = subset(&train, 6_000);
    let cfg = TrainConfig {
        model: ModelConfig::named("cnn-small").unwrap(),
        quant: Scheme::Binary,
        epochs: 2,
        freeze_bn_stats_after: Some(1),
        optimizer: OptimizerConfig {
            lr: 0.01,
            ..Default::default()
        },
        ..Default::default()
    };
    let mut t = Trainer::new(cfg).unwrap();
    t.fit(&train, None, |_, _| {}).unwrap();
    let kinds: Vec<&str> = to_runtime_kinds(&t.model);
    assert_eq!(
        kinds,
        ["conv2d_i8", "maxpool_bin", "conv2d_bin", "maxpool_bin", "dense_bin"]
    );
    agreement(&mut t.model, &test, "cnn-small binary QAT");
}

fn to_runtime_kinds(m: &qmomentum::model::Sequential) -> Vec<&'static str> {
    qmomentum::export::to_runtime(m)
        .unwrap()
        .layers()
        .iter()
        .map(|l| l.kind_name())
        .collect()
}
