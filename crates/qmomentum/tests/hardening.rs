//! Regression tests of the hardening issue (library side): each failed before its fix.

use qmomentum::checkpoint;
use qmomentum::config::{LayerConfig, ModelConfig, OnNonFinite, TrainConfig};
use qmomentum::data::Dataset;
use qmomentum::layers::Activation;
use qmomentum::optim::OptimizerConfig;
use qmomentum::quant::ptq::{quantize_float_model, Calibration};
use qmomentum::quant::Scheme;
use qmomentum::train::Trainer;
use std::path::Path;
use std::sync::OnceLock;

fn data() -> &'static (Dataset, Dataset) {
    static D: OnceLock<(Dataset, Dataset)> = OnceLock::new();
    D.get_or_init(|| {
        Dataset::load_mnist_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/fashion-mnist")).unwrap()
    })
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

fn cfg(quant: Scheme) -> TrainConfig {
    TrainConfig {
        epochs: 1,
        quant,
        optimizer: OptimizerConfig {
            lr: 0.01,
            ..Default::default()
        },
        ..Default::default()
    }
}

/// PTQ of a sub-8-bit (LSQ) layer takes its step from the calibrated range. Before the fix the
/// step stayed at the untrained 1.0 whatever the range.
#[test]
fn ptq_below_8_bits_uses_the_calibrated_range() {
    let train = subset(&data().0, 2000);
    let mut fp = Trainer::new(cfg(Scheme::Fp32)).unwrap();
    fp.fit(&train, None, |_, _| {}).unwrap();
    // Scale the first layer by 50 so that its outputs range far from 1.
    let d = fp.model.dense_mut().next().unwrap();
    d.weight.value.iter_mut().for_each(|w| *w *= 50.0);
    d.bias.value.iter_mut().for_each(|b| *b *= 50.0);
    let (_, q) = quantize_float_model(
        &fp.model,
        &fp.config.model,
        Scheme::W4a4,
        &train,
        4,
        128,
        Calibration::MinMax,
    )
    .unwrap();
    // The float model's layer-0 outputs over the same 512 calibration samples.
    let mut f = fp.model.clone();
    let x: Vec<f32> = train.images[..512 * 784]
        .iter()
        .map(|&p| p as f32 * qmomentum::data::PIXEL_SCALE)
        .collect();
    f.input_mut(512).copy_from_slice(&x);
    f.forward(512, false, false, &mut qmomentum::rng::Rng::new(0, 0));
    let hi = f.layer_output(0, 512).iter().fold(0.0f32, |m, &v| m.max(v));
    assert!(hi > 10.0, "the test needs a range far from 1 (max {hi})");
    let qp = q.dense().next().unwrap().output_qparams().unwrap();
    // ReLU output, 4 bits, unsigned LSQ grid: s = max/15 (within 1 %: PTQ calibrates on the
    // outputs of the 8-bit weights, the float model's are the reference here). Before: 1.0.
    assert!(
        (qp.scale - hi / 15.0).abs() <= 0.01 * hi / 15.0,
        "step {} for a calibrated max of {hi} (expected {})",
        qp.scale,
        hi / 15.0
    );
}

/// A skipped (non-finite) step changes nothing, observers included.
#[test]
fn a_skipped_step_leaves_the_observers_alone() {
    let train = subset(&data().0, 1024);
    let mut c = cfg(Scheme::W8a8);
    c.on_non_finite = OnNonFinite::Skip;
    let mut t = Trainer::new(c).unwrap();
    t.step(&train, None).unwrap();
    let before: Vec<(f32, f32)> = t
        .model
        .dense()
        .filter_map(|d| d.out.act.observer.as_ref().map(|o| (o.min, o.max)))
        .collect();
    // A NaN in the last bias makes the loss NaN; the hidden layers' statistics stay finite.
    let last = t.model.dense_mut().last().unwrap();
    last.bias.value[0] = f32::NAN;
    t.step(&train, None).unwrap();
    assert_eq!(t.progress.skipped, 1);
    let after: Vec<(f32, f32)> = t
        .model
        .dense()
        .filter_map(|d| d.out.act.observer.as_ref().map(|o| (o.min, o.max)))
        .collect();
    assert_eq!(before, after, "the skipped batch moved an observer");
}

/// Two runs of the same config write byte-identical checkpoints (no wall-clock timings inside).
#[test]
fn identical_runs_write_identical_checkpoints() {
    let train = subset(&data().0, 1000);
    let run = || {
        let mut t = Trainer::new(cfg(Scheme::W4a4)).unwrap();
        t.fit(&train, None, |_, _| {}).unwrap();
        checkpoint::to_bytes(&t).unwrap()
    };
    let (a, b) = (run(), run());
    assert!(a == b, "checkpoints differ");
}

/// A model whose head is narrower than the labels is an error naming both, not an index panic.
#[test]
fn a_head_narrower_than_the_labels_is_an_error() {
    let test = subset(&data().1, 500);
    let c = TrainConfig {
        model: ModelConfig {
            input: 784,
            layers: vec![LayerConfig::Dense {
                units: 5,
                activation: Activation::Softmax,
                quant: None,
            }],
            ..Default::default()
        },
        ..Default::default()
    };
    let mut t = Trainer::new(c).unwrap();
    let e = t.evaluate(&test).unwrap_err().to_string();
    assert!(e.contains("labels up to 9") && e.contains("5 outputs"), "{e}");
    let e = t.step(&test, None).unwrap_err().to_string();
    assert!(e.contains("labels up to 9"), "{e}");
}

/// A run resumed onto data of another shape fails with a named error, even mid-epoch.
#[test]
fn resuming_mid_epoch_on_other_data_is_an_error() {
    let train = subset(&data().0, 1000);
    let mut t = Trainer::new(cfg(Scheme::Fp32)).unwrap();
    t.step(&train, None).unwrap();
    let bytes = checkpoint::to_bytes(&t).unwrap();
    let mut r = checkpoint::from_bytes(&bytes, Path::new("ck")).unwrap();
    assert_eq!(r.step_in_epoch, 1);
    let other = Dataset {
        images: vec![0; 300 * 1024],
        labels: vec![0; 300],
        features: 1024,
        classes: 10,
        shape: vec![32, 32],
    };
    let e = r.step(&other, None).unwrap_err().to_string();
    assert!(e.contains("1024 features") && e.contains("784"), "{e}");
}
