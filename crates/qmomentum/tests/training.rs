//! Training on the real Fashion-MNIST set shipped in `data/`: stated accuracies, determinism by
//! seed, and exact resume from a checkpoint written after any step.

use qmomentum::checkpoint;
use qmomentum::config::{LayerConfig, TrainConfig};
use qmomentum::data::Dataset;
use qmomentum::layers::Activation;
use qmomentum::optim::OptimizerConfig;
use qmomentum::quant::Scheme;
use qmomentum::train::Trainer;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/fashion-mnist")
}

fn data() -> &'static (Dataset, Dataset) {
    static D: OnceLock<(Dataset, Dataset)> = OnceLock::new();
    D.get_or_init(|| Dataset::load_mnist_dir(&data_dir()).expect("the shipped Fashion-MNIST"))
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

fn cfg(quant: Scheme, epochs: usize, lr: f32) -> TrainConfig {
    TrainConfig {
        epochs,
        quant,
        optimizer: OptimizerConfig {
            lr,
            momentum: 0.9,
            ..Default::default()
        },
        ..Default::default()
    }
}

fn weights(t: &Trainer) -> Vec<Vec<f32>> {
    t.model.params().iter().map(|p| p.value.clone()).collect()
}

#[test]
fn full_fashion_mnist_is_shipped_and_parsed() {
    let (train, test) = data();
    assert_eq!(
        (train.len(), test.len(), train.features, train.classes),
        (60_000, 10_000, 784, 10)
    );
    let mut counts = [0usize; 10];
    for &l in &test.labels {
        counts[l as usize] += 1;
    }
    assert_eq!(
        counts, [1000; 10],
        "the Fashion-MNIST test set has 1000 images per class"
    );
}

#[test]
fn fp32_reaches_080_after_two_epochs_at_lr_001() {
    let (train, test) = data();
    let mut t = Trainer::new(cfg(Scheme::Fp32, 2, 0.01)).unwrap();
    t.fit(train, None, |_, _| {}).unwrap();
    let (_, acc) = t.evaluate(test).unwrap();
    assert!(acc >= 0.80, "test accuracy {acc} after 2 epochs");
    assert_eq!(t.history.epochs.len(), 2);
    assert!(t.history.epochs[1].loss < t.history.epochs[0].loss);
}

#[test]
fn w8a8_qat_reaches_080_after_two_epochs() {
    let (train, test) = data();
    let mut t = Trainer::new(cfg(Scheme::W8a8, 2, 0.01)).unwrap();
    t.fit(train, None, |_, _| {}).unwrap();
    let (_, acc) = t.evaluate(test).unwrap();
    assert!(acc >= 0.80, "W8A8 QAT test accuracy {acc} after 2 epochs");
    // The activation grids are calibrated and contain 0 exactly.
    for d in t.model.dense().take(2) {
        let qp = d.output_qparams().expect("observed");
        assert_eq!(qp.fake_quant(0.0), 0.0);
    }
}

#[test]
fn binary_bop_learns() {
    let (train, test) = data();
    let mut t = Trainer::new(cfg(Scheme::Binary, 2, 0.01)).unwrap();
    assert!(t.uses_bop());
    t.fit(train, None, |_, _| {}).unwrap();
    let (_, acc) = t.evaluate(test).unwrap();
    assert!(acc >= 0.70, "binary (Bop) test accuracy {acc} after 2 epochs");
    for d in t.model.dense().skip(1) {
        assert!(
            d.weight.value.iter().all(|&w| w == 1.0 || w == -1.0),
            "Bop keeps weights at ±1"
        );
    }
}

#[test]
fn same_seed_same_weights_other_seed_other_weights() {
    let (train, _) = data();
    let small = subset(train, 3000);
    let run = |seed| {
        let mut c = cfg(Scheme::W8a8, 1, 0.01);
        c.seed = seed;
        c.model.layers.insert(1, LayerConfig::Dropout { rate: 0.2 });
        let mut t = Trainer::new(c).unwrap();
        t.fit(&small, None, |_, _| {}).unwrap();
        weights(&t)
    };
    assert_eq!(run(7), run(7));
    assert_ne!(run(7), run(8));
}

/// Interrupt after step k (serialise the checkpoint to bytes, rebuild a trainer from it),
/// continue, and compare with the uninterrupted run: bit-identical weights.
#[test]
fn resume_after_any_step_is_bit_identical() {
    let (train, test) = data();
    let small = subset(train, 2560); // 20 steps per epoch
    for scheme in [Scheme::Fp32, Scheme::W4a4, Scheme::Binary] {
        let mut c = cfg(scheme, 2, 0.01);
        c.model.layers.insert(1, LayerConfig::Dropout { rate: 0.1 });
        c.optimizer.schedule = qmomentum::optim::Schedule::Cosine {
            warmup_epochs: 0.5,
            min_lr: 0.0,
        };
        let mut full = Trainer::new(c.clone()).unwrap();
        full.fit(&small, Some(&subset(test, 500)), |_, _| {}).unwrap();
        for k in [1u64, 13, 20, 27] {
            let mut t = Trainer::new(c.clone()).unwrap();
            while t.global_step < k {
                t.step(&small, Some(&subset(test, 500))).unwrap();
            }
            let bytes = checkpoint::to_bytes(&t).unwrap();
            let mut r = checkpoint::from_bytes(&bytes, Path::new("mem")).unwrap();
            r.fit(&small, Some(&subset(test, 500)), |_, _| {}).unwrap();
            assert_eq!(weights(&r), weights(&full), "{scheme}: resumed after step {k}");
            assert_eq!(r.history.epochs.len(), 2);
            for (a, b) in r.history.epochs.iter().zip(&full.history.epochs) {
                assert_eq!(
                    (a.loss, a.accuracy, a.val_accuracy),
                    (b.loss, b.accuracy, b.val_accuracy)
                );
            }
        }
    }
}

/// With 8-bit momentum state the run resumes bit-exactly too (codes and block maxima are
/// checkpointed as they are).
#[test]
fn eight_bit_state_resumes_bit_identically() {
    let (train, _) = data();
    let small = subset(train, 2560);
    let mut c = cfg(Scheme::W8a8, 2, 0.01);
    c.optimizer.state_bits = 8;
    let mut full = Trainer::new(c.clone()).unwrap();
    full.fit(&small, None, |_, _| {}).unwrap();
    assert!(full.optimizer.state.iter().any(|s| s.q8.is_some()));
    for k in [1u64, 13, 27] {
        let mut t = Trainer::new(c.clone()).unwrap();
        while t.global_step < k {
            t.step(&small, None).unwrap();
        }
        let bytes = checkpoint::to_bytes(&t).unwrap();
        let mut r = checkpoint::from_bytes(&bytes, Path::new("mem")).unwrap();
        r.fit(&small, None, |_, _| {}).unwrap();
        assert_eq!(weights(&r), weights(&full), "resumed after step {k}");
    }
}

/// Iterative freezing and fixed weight scales resume bit-exactly: the frozen codes, the code EMA
/// and the fixed scales are checkpointed buffers and the optimizer's freeze mask is rebuilt from
/// them on load.
#[test]
fn iterative_freezing_resumes_bit_identically() {
    let (train, _) = data();
    let small = subset(train, 2560);
    for scheme in [Scheme::W2a2, Scheme::Ternary] {
        let mut c = cfg(scheme, 2, 0.05);
        c.oscillation.freeze_threshold = 0.015;
        c.oscillation.freeze_threshold_start = Some(0.05);
        // Integer grids also fix their weight scales after the first epoch (a buffer too), and
        // the gradient is clipped by its global norm: the replica's frozen gradients must be 0
        // as the main model's are, or the norm differs between a fresh and a resumed run.
        c.freeze_weight_scales_after = Some(1);
        c.optimizer.clip_norm = Some(1.0);
        let mut full = Trainer::new(c.clone()).unwrap();
        full.fit(&small, None, |_, _| {}).unwrap();
        let frozen: Vec<f32> = full.history.epochs[1]
            .oscillation
            .iter()
            .map(|o| o.fraction_frozen)
            .collect();
        assert!(
            frozen.iter().any(|&f| f > 0.0),
            "{scheme}: something froze ({frozen:?})"
        );
        for k in [13u64, 27] {
            let mut t = Trainer::new(c.clone()).unwrap();
            while t.global_step < k {
                t.step(&small, None).unwrap();
            }
            let bytes = checkpoint::to_bytes(&t).unwrap();
            let mut r = checkpoint::from_bytes(&bytes, Path::new("mem")).unwrap();
            r.fit(&small, None, |_, _| {}).unwrap();
            assert_eq!(weights(&r), weights(&full), "{scheme}: resumed after step {k}");
            // The trackers' previous codes (made for the checkpoint from their i16 form).
            let states = |t: &Trainer| t.model.tracker_states().map(|b| b.value).collect::<Vec<_>>();
            let bits = |v: Vec<Vec<f32>>| v.into_iter().flatten().map(f32::to_bits).collect::<Vec<_>>();
            assert_eq!(bits(states(&r)), bits(states(&full)), "{scheme}: tracker state");
            for (a, b) in r.history.epochs.iter().zip(&full.history.epochs) {
                assert_eq!((a.loss, &a.oscillation), (b.loss, &b.oscillation), "{scheme}");
            }
        }
    }
}

/// A batch-normalised CNN resumes bit-exactly too: the running statistics are checkpointed as
/// buffers and move once per step with the statistics of the whole (split) batch.
#[test]
fn cnn_with_batch_norm_resumes_bit_identically() {
    let (train, test) = data();
    let small = subset(train, 512); // 4 steps per epoch
    let c = TrainConfig {
        model: qmomentum::config::ModelConfig::named("cnn-small").unwrap(),
        ..cfg(Scheme::Fp32, 2, 0.01)
    };
    let val = subset(test, 200);
    let mut full = Trainer::new(c.clone()).unwrap();
    full.fit(&small, Some(&val), |_, _| {}).unwrap();
    let buffers = |t: &Trainer| t.model.buffers_iter().map(|b| b.value.clone()).collect::<Vec<_>>();
    assert!(
        buffers(&full).iter().any(|b| b.iter().any(|&v| v != 0.0 && v != 1.0)),
        "running stats moved"
    );
    for k in [1u64, 4, 6] {
        let mut t = Trainer::new(c.clone()).unwrap();
        while t.global_step < k {
            t.step(&small, Some(&val)).unwrap();
        }
        let bytes = checkpoint::to_bytes(&t).unwrap();
        let mut r = checkpoint::from_bytes(&bytes, Path::new("mem")).unwrap();
        r.fit(&small, Some(&val), |_, _| {}).unwrap();
        assert_eq!(weights(&r), weights(&full), "resumed after step {k}");
        assert_eq!(buffers(&r), buffers(&full), "running statistics after step {k}");
        assert_eq!(r.history.epochs[1].val_accuracy, full.history.epochs[1].val_accuracy);
    }
}

#[test]
fn checkpoint_of_another_model_is_rejected_naming_the_tensor() {
    let mut c = cfg(Scheme::Fp32, 1, 0.01);
    let t = Trainer::new(c.clone()).unwrap();
    let bytes = checkpoint::to_bytes(&t).unwrap();
    // Same file, but tell the loader the model has 100 hidden units: rebuild the metadata.
    c.model.layers[0] = LayerConfig::Dense {
        units: 100,
        activation: Activation::Relu,
        quant: None,
    };
    let other = Trainer::new(c).unwrap();
    let other_bytes = checkpoint::to_bytes(&other).unwrap();
    // Splice: tensors of `t`, metadata of `other` — a checkpoint whose weights do not fit.
    let (_, meta_other) = safetensors::SafeTensors::read_metadata(&other_bytes).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let tensors: Vec<(String, safetensors::tensor::TensorView)> = st.tensors();
    let spliced = safetensors::serialize(tensors, meta_other.metadata().clone()).unwrap();
    let e = checkpoint::from_bytes(&spliced, Path::new("other.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("other.safetensors") && e.contains("param.layers.0.weight") && e.contains("[784, 100]"),
        "{e}"
    );
}
